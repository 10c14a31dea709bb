//! forge's quantized decoder: runs a GGUF llama, qwen2 or gemma3 model as llama.cpp would —
//! weights stay quantized and multiply as integer dot products against the activations quantized
//! to the weight's dot-product type (as ggml does) — with a KV cache, sampling (temperature,
//! top-p, top-k, seed), stop tokens and a token budget, and the student's prompt format from the
//! file's chat template.
//!
//! RoPE follows the file: llama's Q/K rows were interleaved by the converter, so pairs of
//! adjacent dimensions rotate (`rope_i`); qwen2's and gemma3's were not, so halves rotate
//! (`rope`). `rope_freqs.weight` (Llama 3 scaling) divides each pair's frequency.
//!
//! Gemma 3 (llama.cpp's `gemma3` graph): embeddings scaled by √hidden; RMSNorm on each query and
//! key head and after attention and after the FFN (GGUF stores these norms' weights with
//! Gemma's +1 folded in, so all are plain RMSNorms); queries scaled by 1/√head_dim; GELU (tanh)
//! gate; five of every six layers attend to a sliding window (`gemma3.attention.sliding_window`)
//! with RoPE base 10000, the sixth globally with the file's base; no logit soft-capping. Its
//! SentencePiece vocabulary is read as llama.cpp tokenizes it (`forge_gguf::tokenizer`).
//!
//! Timings are split as DefameLM reports them: preparation (loading, then the prompt) and the
//! time per generated token.
//!
//! # How it runs
//!
//! One step (the prompt in one batch, or one new token) is plain loops over `f32` buffers, no
//! tensor graph: RMSNorm, then Q, K and V in one parallel pass, RoPE, the new keys and values
//! appended to a growable position-major cache, attention, the output projection, then gate and
//! up in one pass, the activation, down. Every matrix product quantizes its input once per
//! dot-product type (`q8_0` for `q8_0`/`q4_0`/`q5_0` weights, `q8_1`, `q8_K` for the k-quants)
//! and runs:
//!
//! - `q8_0`, `q4_0` and `q5_0` weights: forge's own AVX2 kernels (AVX512-VNNI `vpdpbusd` where
//!   the CPU has it) over weights repacked at load so that a group of rows streams from memory
//!   in order: with VNNI, `q8_0`/`q4_0` rows by octets interleaved 4 values at a time (each
//!   `vpdpbusd` lane is a different row, the float accumulators transposed), 8 rows times 2
//!   inputs at a time; otherwise quads of rows times 4 inputs. They compute exactly candle's
//!   `vec_dot`, so the logits are bit-identical to candle's quantized matmul
//!   ([`Kernels::Candle`] runs candle's own, for comparison);
//! - other block types: candle's `GgmlType::vec_dot` row by row;
//! - `f32`/`f16`/`bf16` weights: dequantized to `f32` at load, an FMA dot product with the input
//!   rounded to the weights' precision (ggml's dot-product type for `f16` is `f16`, for `bf16`
//!   `bf16`).
//!
//! Attention follows llama.cpp's default (no flash attention, an `f16` KV cache): keys and values
//! are stored rounded to `f16`, each query is rounded to `f16` before its dot products with the
//! keys, the softmax sums in `f64` and the probabilities are rounded to `f16` before they weight
//! the values; RoPE angles are computed in `f32` as ggml computes them. So the numbers llama.cpp's
//! own decoding rounds are rounded here too: on forge's `q8_0` files the logits after a prompt
//! equal llama.cpp's bit for bit, and `f32`/`f16` agree to about 1e-4/1e-3
//! (`scripts/gguf_check.py`). Every row of a batch is computed as if alone, so a prompt in one
//! batch equals the same tokens fed one at a time, bit for bit.
//!
//! Parallel passes run on the model's own thread pool (`threads`, default `FORGE_THREADS`, else
//! `RAYON_NUM_THREADS`, else the CPU count): workers take chunks of rows from a shared cursor —
//! matrix rows, (query, head) pairs of attention, and for a prompt its rows' norms, RoPE,
//! activation and quantization; a pass too small to pay for the hand-off ([`PAR_MIN_WORK`])
//! runs on the calling thread alone.
//! The pool waits by spinning briefly, then yielding, then parking, and a pass never waits for a
//! worker that had not started it — on a busy machine a descheduled worker cannot stall a token.
//! (candle's own pool did: its caller spins until every worker has checked in, for every
//! matmul — 10-20 ms per token of a 1-layer model on a loaded 2-core machine.)

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{D, Device, Tensor};
use forge_model::generate::{Sampling, sample};
use forge_model::{Arch, ModelConfig, Tokenizer};

use crate::{BenchError, Result};

struct Block {
    attn_norm: Vec<f32>,
    q: Mat,
    k: Mat,
    v: Mat,
    o: Mat,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Mat,
    up: Mat,
    down: Mat,
    /// Gemma 3: RMSNorm of each query and key head, of the attention output and of the FFN
    /// output.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    /// Gemma 3's sliding-window layers: attend to this many positions (the token's own
    /// included), with the local RoPE base.
    window: Option<usize>,
}

/// A GGUF model ready to generate.
pub struct QModel {
    pub cfg: ModelConfig,
    pub tokenizer: Tokenizer,
    embed: QTensor,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    output: Mat,
    /// RoPE angles per position: `[max_positions][head_dim / 2]`; Gemma 3's sliding-window
    /// layers use the local ones.
    cos: Vec<f32>,
    sin: Vec<f32>,
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
    /// Adjacent pairs rotate (llama's permuted Q/K) rather than halves (qwen2).
    interleaved: bool,
    kernels: Kernels,
    pool: pool::Pool,
    /// Passes of fewer multiply-adds run on the calling thread alone.
    par_min_work: usize,
    /// Seconds it took to load.
    pub load_s: f64,
}

/// Keys and values seen so far, per layer, position-major: `[position][kv head][head dim]`,
/// rounded to `f16` as llama.cpp's default cache stores them.
#[derive(Default, Clone, Debug)]
pub struct Cache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl Cache {
    /// An empty cache with room for `positions` tokens of `model` (it grows past them if need be).
    pub fn with_capacity(model: &QModel, positions: usize) -> Cache {
        let row = model.cfg.kv_heads * model.cfg.head_dim;
        let n = positions.min(model.cfg.max_positions) * row;
        Cache {
            layers: (0..model.blocks.len()).map(|_| (Vec::with_capacity(n), Vec::with_capacity(n))).collect(),
            len: 0,
        }
    }

    /// Tokens seen so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every token, keeping the memory.
    pub fn clear(&mut self) {
        for (k, v) in &mut self.layers {
            k.clear();
            v.clear();
        }
        self.len = 0;
    }
}

/// A processed prompt: its KV cache, the logits after it, and the seconds it took.
#[derive(Clone, Debug)]
pub struct Prefill {
    cache: Cache,
    logits: Vec<f32>,
    pub tokens: usize,
    pub seconds: f64,
}

/// One generation and its timings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    pub text: String,
    pub tokens: usize,
    pub prompt_tokens: usize,
    /// Seconds to process the prompt.
    pub prompt_s: f64,
    /// Seconds to generate the tokens.
    pub decode_s: f64,
    /// Ended on a stop token (rather than the budget).
    pub stopped: bool,
}

/// The thread count a model starts with: `FORGE_THREADS`, else `RAYON_NUM_THREADS`, else the
/// number of CPUs this process may use.
pub fn default_threads() -> usize {
    ["FORGE_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse::<usize>().ok()).filter(|n| *n > 0))
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

impl QModel {
    /// Loads a GGUF file, for the best kernels this CPU runs ([`Kernels::best`]).
    pub fn load(path: &Path) -> Result<QModel> {
        QModel::load_with(path, Kernels::best())
    }

    /// Loads a GGUF file for `kernels` (at most what this CPU runs).
    pub fn load_with(path: &Path, kernels: Kernels) -> Result<QModel> {
        let kernels = kernels.min(Kernels::cpu());
        let t0 = Instant::now();
        let ours = forge_gguf::Gguf::open(path)?;
        let cfg = forge_gguf::load::config(&ours)?;
        let tokenizer = forge_gguf::tokenizer::tokenizer(&ours)?;
        let gemma = cfg.arch == Arch::Gemma3;
        let mut f = std::fs::File::open(path).map_err(|e| BenchError::Io(format!("{}: {e}", path.display())))?;
        let content =
            gguf_file::Content::read(&mut f).map_err(|e| BenchError::Model(format!("{}: {e}", path.display())))?;
        let dev = Device::Cpu;
        let mut qt = |name: &str| -> Result<QTensor> {
            content.tensor(&mut f, name, &dev).map_err(|e| BenchError::Model(format!("tensor `{name}`: {e}")))
        };
        let vec = |t: QTensor| -> Result<Vec<f32>> { Ok(t.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?) };
        let embed = qt("token_embd.weight")?;
        let norm = vec(qt("output_norm.weight")?)?;
        let output = if ours.tensor("output.weight").is_some() {
            Mat::new(qt("output.weight")?, kernels)?
        } else {
            Mat::new(qt("token_embd.weight")?, kernels)?
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let mut mm = |n: &str| -> Result<Mat> { Mat::new(qt(&format!("blk.{l}.{n}.weight"))?, kernels) };
            let q = mm("attn_q")?;
            let k = mm("attn_k")?;
            let v = mm("attn_v")?;
            let o = mm("attn_output")?;
            let gate = mm("ffn_gate")?;
            let up = mm("ffn_up")?;
            let down = mm("ffn_down")?;
            let mut v1 = |n: &str| -> Result<Vec<f32>> { vec(qt(&format!("blk.{l}.{n}"))?) };
            let mut bias =
                |n: &str| -> Result<Option<Vec<f32>>> { if cfg.qkv_bias { Ok(Some(v1(n)?)) } else { Ok(None) } };
            let (q_bias, k_bias, v_bias) = (bias("attn_q.bias")?, bias("attn_k.bias")?, bias("attn_v.bias")?);
            let mut gemma_norm =
                |n: &str| -> Result<Option<Vec<f32>>> { if gemma { Ok(Some(v1(n)?)) } else { Ok(None) } };
            let (q_norm, k_norm) = (gemma_norm("attn_q_norm.weight")?, gemma_norm("attn_k_norm.weight")?);
            let (post_attn_norm, post_ffn_norm) =
                (gemma_norm("post_attention_norm.weight")?, gemma_norm("post_ffw_norm.weight")?);
            // Gemma 3: every 6th layer global, the others sliding.
            let window = cfg.gemma.as_ref().filter(|g| g.is_sliding(l)).map(|g| g.sliding_window);
            blocks.push(Block {
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                window,
                attn_norm: v1("attn_norm.weight")?,
                ffn_norm: v1("ffn_norm.weight")?,
                q_bias,
                k_bias,
                v_bias,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let shapes_ok = blocks.iter().all(|b| {
            b.q.k == cfg.hidden
                && b.q.n == nh * hd
                && b.k.n == nkv * hd
                && b.v.n == nkv * hd
                && b.o.k == nh * hd
                && b.o.n == cfg.hidden
                && b.gate.n == b.up.n
                && b.down.k == b.up.n
                && b.down.n == cfg.hidden
        });
        if !shapes_ok || nkv == 0 || nh % nkv != 0 || hd % 2 != 0 || output.k != cfg.hidden {
            return Err(BenchError::Model(format!("{}: tensor shapes do not match the config", path.display())));
        }
        // RoPE angles, divided by the file's frequency factors if it has them.
        let factors: Option<Vec<f32>> = match ours.tensor("rope_freqs.weight") {
            Some(_) => Some(vec(qt("rope_freqs.weight")?)?),
            None => None,
        };
        let half = cfg.head_dim / 2;
        // The angles as ggml computes them (`ggml_rope_cache_init`), in f32: the position times
        // `base^(-2/dims)` once per pair, each divided by its `rope_freqs` factor and times the
        // linear scale — so that keys round to the same f16 values as in llama.cpp's cache.
        let table = |theta: f64, factors: Option<&[f32]>, scale: f32| {
            let step = (theta as f32).powf(-2.0 / cfg.head_dim as f32);
            let mut cos = Vec::with_capacity(cfg.max_positions * half);
            let mut sin = Vec::with_capacity(cfg.max_positions * half);
            for p in 0..cfg.max_positions {
                let mut angle = p as f32;
                for i in 0..half {
                    let a = scale * (angle / factors.map_or(1.0, |f| f[i]));
                    cos.push(a.cos());
                    sin.push(a.sin());
                    angle *= step;
                }
            }
            (cos, sin)
        };
        let (cos, sin, cos_local, sin_local) = if gemma {
            // Global layers: the file's base and linear scaling; sliding ones: base 10000.
            let scale = match &cfg.rope_scaling {
                Some(forge_model::RopeScaling::Linear { factor }) => 1.0 / *factor as f32,
                _ => 1.0,
            };
            let (cos, sin) = table(cfg.rope_theta, None, scale);
            let local_theta = cfg.gemma.as_ref().map_or(10_000.0, |g| g.rope_local_theta);
            let (cos_local, sin_local) = table(local_theta, None, 1.0);
            (cos, sin, cos_local, sin_local)
        } else {
            let (cos, sin) = table(cfg.rope_theta, factors.as_deref(), 1.0);
            (cos, sin, Vec::new(), Vec::new())
        };
        let interleaved = cfg.arch == Arch::Llama;
        Ok(QModel {
            cfg,
            tokenizer,
            embed,
            blocks,
            norm,
            output,
            cos,
            sin,
            cos_local,
            sin_local,
            interleaved,
            kernels,
            pool: pool::Pool::new(default_threads()),
            par_min_work: PAR_MIN_WORK,
            load_s: t0.elapsed().as_secs_f64(),
        })
    }

    /// The file's architecture: `llama`, `qwen2` or `gemma3`.
    pub fn architecture(&self) -> &'static str {
        self.cfg.arch.gguf_name()
    }

    /// The number of threads a step runs on.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Runs steps on `n` threads (the caller and `n - 1` workers; at least 1).
    pub fn set_threads(&mut self, n: usize) {
        if n.max(1) != self.pool.threads() {
            self.pool = pool::Pool::new(n.max(1));
        }
    }

    /// Passes of fewer than `work` multiply-adds run on the calling thread alone (default
    /// [`PAR_MIN_WORK`]; 0 spreads every pass, for tests).
    pub fn set_parallel_threshold(&mut self, work: usize) {
        self.par_min_work = work;
    }

    /// The kernels its quantized matrices run.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Logits of the last of `ids`, which follow the tokens in `cache` (extended with them).
    pub fn step(&self, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (t, past) = (ids.len(), cache.len);
        if t == 0 {
            return Err(BenchError::Model("no tokens to decode".into()));
        }
        if past + t > cfg.max_positions {
            return Err(BenchError::Model(format!("{} tokens exceed the context of {}", past + t, cfg.max_positions)));
        }
        if cache.layers.len() != self.blocks.len() {
            cache.layers = (0..self.blocks.len()).map(|_| (Vec::new(), Vec::new())).collect();
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab) {
            return Err(BenchError::Model(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab)));
        }
        let (nh, nkv, hd, hidden) = (cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.hidden);
        let ffn = self.blocks.first().map_or(0, |b| b.up.n);
        let eps = cfg.rms_eps as f32;
        let mut x = self.embed.embedding(&Tensor::new(ids, &Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>()?;
        let gemma = self.cfg.arch == Arch::Gemma3;
        if gemma {
            let scale = (hidden as f32).sqrt();
            x.iter_mut().for_each(|x| *x *= scale);
        }
        let mut h = vec![0f32; t * hidden];
        let mut q = vec![0f32; t * nh * hd];
        let mut k = vec![0f32; t * nkv * hd];
        let mut v = vec![0f32; t * nkv * hd];
        let mut att = vec![0f32; t * nh * hd];
        let mut gate = vec![0f32; t * ffn];
        let mut up = vec![0f32; t * ffn];
        let mut acts = Acts { forge: self.kernels != Kernels::Candle, ..Acts::default() };
        for (l, b) in self.blocks.iter().enumerate() {
            self.rms_norm_rows(&x, &b.attn_norm, eps, &mut h);
            self.matmuls(&mut [(&b.q, &mut q), (&b.k, &mut k), (&b.v, &mut v)], &h, t, &mut acts);
            for (y, bias) in [(&mut q, &b.q_bias), (&mut k, &b.k_bias), (&mut v, &b.v_bias)] {
                if let Some(bias) = bias {
                    for row in y.chunks_exact_mut(bias.len()) {
                        row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                    }
                }
            }
            if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
                rms_norm_in_place(&mut q, qn, eps);
                rms_norm_in_place(&mut k, kn, eps);
            }
            let local = b.window.is_some();
            self.rope(&mut q, nh, past, local);
            self.rope(&mut k, nkv, past, local);
            if gemma {
                // Gemma 3 (all but 27B): queries scaled by 1/√head_dim before attention.
                let scale = 1.0 / (hd as f32).sqrt();
                q.iter_mut().for_each(|q| *q *= scale);
            }
            let (kc, vc) = &mut cache.layers[l];
            // llama.cpp's default cache holds keys and values as f16.
            let n0 = kc.len();
            kc.extend_from_slice(&k);
            vc.extend_from_slice(&v);
            simd::round_f16(&mut kc[n0..]);
            simd::round_f16(&mut vc[n0..]);
            self.attention(&q, kc, vc, past, t, b.window, &mut att);
            self.matmuls(&mut [(&b.o, &mut h)], &att, t, &mut acts);
            if let Some(w) = &b.post_attn_norm {
                rms_norm_in_place(&mut h, w, eps);
            }
            x.iter_mut().zip(&h).for_each(|(x, o)| *x += o);
            self.rms_norm_rows(&x, &b.ffn_norm, eps, &mut h);
            self.matmuls(&mut [(&b.gate, &mut gate), (&b.up, &mut up)], &h, t, &mut acts);
            let gp = OutPtr(gate.as_mut_ptr());
            self.par_range(t, ffn * 8, &|rows| {
                // SAFETY: each chunk writes its own rows of `gate`.
                let g = unsafe { std::slice::from_raw_parts_mut(gp.get().add(rows.start * ffn), rows.len() * ffn) };
                let u = &up[rows.start * ffn..rows.end * ffn];
                if gemma {
                    simd::gelu_mul(g, u);
                } else {
                    // silu(gate) * up, as candle computes it.
                    g.iter_mut().zip(u).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
                }
            });
            self.matmuls(&mut [(&b.down, &mut h)], &gate, t, &mut acts);
            if let Some(w) = &b.post_ffn_norm {
                rms_norm_in_place(&mut h, w, eps);
            }
            x.iter_mut().zip(&h).for_each(|(x, d)| *x += d);
        }
        cache.len += t;
        let last = &x[(t - 1) * hidden..];
        let mut hl = vec![0f32; hidden];
        rms_norm(last, &self.norm, eps, &mut hl);
        let mut logits = vec![0f32; self.output.n];
        self.matmuls(&mut [(&self.output, &mut logits)], &hl, 1, &mut acts);
        Ok(logits)
    }

    /// `outs[j] = x · mats[j]ᵀ` for the `m` rows of `x`, all matrices in one parallel pass.
    fn matmuls(&self, jobs: &mut [(&Mat, &mut Vec<f32>)], x: &[f32], m: usize, acts: &mut Acts) {
        let kdim = x.len() / m;
        acts.reset();
        for (mat, out) in jobs.iter_mut() {
            debug_assert_eq!(mat.k, kdim);
            out.resize(m * mat.n, 0.0);
            acts.prepare(mat.needs(), x, m, kdim, &|n, f| self.par_range(n, kdim * 8, f));
        }
        let acts = &*acts;
        let work: usize = jobs.iter().map(|(mat, _)| mat.n * mat.k * m).sum();
        let threads = if work < self.par_min_work { 1 } else { self.pool.threads() };
        let outs: Vec<(&Mat, OutPtr)> = jobs.iter_mut().map(|(mat, out)| (*mat, OutPtr(out.as_mut_ptr()))).collect();
        if threads == 1 {
            for (mat, out) in &outs {
                // SAFETY: `out` holds `m * mat.n` floats.
                unsafe { mat.compute(0..mat.n, x, acts, m, out.0, mat.n) };
            }
            return;
        }
        // Chunks of rows (a multiple of 8), about 8 per thread, none spanning two matrices.
        let rows: usize = outs.iter().map(|(mat, _)| mat.n).sum();
        let chunk = rows.div_ceil(threads * 8).next_multiple_of(8).clamp(8, 512);
        let mut starts = Vec::with_capacity(outs.len() + 1);
        starts.push(0usize);
        for (mat, _) in &outs {
            starts.push(starts.last().unwrap() + mat.n.div_ceil(chunk));
        }
        let total = *starts.last().unwrap();
        let cursor = AtomicUsize::new(0);
        self.pool.run(&|| {
            loop {
                let c = cursor.fetch_add(1, Ordering::Relaxed);
                if c >= total {
                    break;
                }
                let j = starts.partition_point(|&s| s <= c) - 1;
                let (mat, out) = &outs[j];
                let r0 = (c - starts[j]) * chunk;
                // SAFETY: every chunk writes its own rows of its own output.
                unsafe { mat.compute(r0..(r0 + chunk).min(mat.n), x, acts, m, out.get(), mat.n) };
            }
        });
    }

    /// Runs `f` over `0..n` in chunks, spread over the threads when `n` items of `per_item`
    /// multiply-adds each are worth it (a prompt's rows), else on this thread.
    fn par_range(&self, n: usize, per_item: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let threads = self.pool.threads();
        if threads == 1 || n < 2 || n * per_item < self.par_min_work {
            return f(0..n);
        }
        let chunk = n.div_ceil(threads * 4).max(1);
        let cursor = AtomicUsize::new(0);
        self.pool.run(&|| {
            loop {
                let c = cursor.fetch_add(chunk, Ordering::Relaxed);
                if c >= n {
                    break;
                }
                f(c..(c + chunk).min(n));
            }
        });
    }

    /// [`rms_norm`] of the rows of `x` into `out`, rows spread over the threads.
    fn rms_norm_rows(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let n = w.len();
        let o = OutPtr(out.as_mut_ptr());
        self.par_range(x.len() / n, n * 4, &|rows| {
            // SAFETY: each chunk writes its own rows of `out`.
            let out = unsafe { std::slice::from_raw_parts_mut(o.get().add(rows.start * n), rows.len() * n) };
            rms_norm(&x[rows.start * n..rows.end * n], w, eps, out);
        });
    }

    /// Rotates the `heads` heads of every row of `x` (rows at positions `past..`).
    fn rope(&self, x: &mut [f32], heads: usize, past: usize, local: bool) {
        let width = heads * self.cfg.head_dim;
        let p = OutPtr(x.as_mut_ptr());
        self.par_range(x.len() / width, width * 4, &|rows| {
            // SAFETY: each chunk rotates its own rows.
            let x = unsafe { std::slice::from_raw_parts_mut(p.get().add(rows.start * width), rows.len() * width) };
            self.rope_rows(x, heads, past + rows.start, local);
        });
    }

    fn rope_rows(&self, x: &mut [f32], heads: usize, past: usize, local: bool) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        let (cos, sin) = if local { (&self.cos_local, &self.sin_local) } else { (&self.cos, &self.sin) };
        for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
            let cos = &cos[(past + i) * half..(past + i + 1) * half];
            let sin = &sin[(past + i) * half..(past + i + 1) * half];
            for head in row.chunks_exact_mut(hd) {
                if self.interleaved {
                    for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * cos[j] - b * sin[j];
                        pair[1] = a * sin[j] + b * cos[j];
                    }
                } else {
                    let (lo, hi) = head.split_at_mut(half);
                    for j in 0..half {
                        let (a, b) = (lo[j], hi[j]);
                        lo[j] = a * cos[j] - b * sin[j];
                        hi[j] = a * sin[j] + b * cos[j];
                    }
                }
            }
        }
    }

    /// Causal attention of the `t` query rows of `q` (at positions `past..past + t`) over the
    /// cached keys and values — the last `window` positions only, if given — into `out`
    /// (`[t][heads * head_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        kc: &[f32],
        vc: &[f32],
        past: usize,
        t: usize,
        window: Option<usize>,
        out: &mut [f32],
    ) {
        let (nh, nkv, hd) = (self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        let rep = nh / nkv;
        // Gemma scales the queries instead.
        let scale = if self.cfg.arch == Arch::Gemma3 { 1.0 } else { (1.0 / (hd as f64).sqrt()) as f32 };
        let out_ptr = OutPtr(out.as_mut_ptr());
        let item = |it: usize, scores: &mut (Vec<f32>, Vec<f32>)| {
            let (i, head) = (it / nh, it % nh);
            let g = head / rep;
            let s = past + i + 1;
            let first = window.map_or(0, |w| s.saturating_sub(w));
            // As ggml multiplies an f16 cache: the query rounded to f16, the probabilities too.
            let (qv, scores) = (&mut scores.0, &mut scores.1);
            qv.clear();
            qv.extend_from_slice(&q[(i * nh + head) * hd..][..hd]);
            simd::round_f16(qv);
            scores.clear();
            simd::scores(qv, kc, nkv * hd, g * hd, first..s, scale, scores);
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f64;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += *x as f64;
            }
            let inv = (1.0 / sum) as f32;
            scores.iter_mut().for_each(|p| *p *= inv);
            simd::round_f16(scores);
            // SAFETY: each (query, head) item writes its own `hd` floats of `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add((i * nh + head) * hd), hd) };
            simd::weighted_sum(scores, vc, nkv * hd, g * hd, first, o);
        };
        let items = t * nh;
        let work = items * (past + t) * hd * 2;
        if work < self.par_min_work || self.pool.threads() == 1 {
            let mut scores = (Vec::with_capacity(hd), Vec::with_capacity(past + t));
            (0..items).for_each(|it| item(it, &mut scores));
            return;
        }
        let chunk = items.div_ceil(self.pool.threads() * 4).max(1);
        let cursor = AtomicUsize::new(0);
        self.pool.run(&|| {
            let mut scores = (Vec::with_capacity(hd), Vec::with_capacity(past + t));
            loop {
                let c = cursor.fetch_add(chunk, Ordering::Relaxed);
                if c >= items {
                    break;
                }
                (c..(c + chunk).min(items)).for_each(|it| item(it, &mut scores));
            }
        });
    }

    /// Generates after prompt ids `prompt`, stopping at `stop` or after `s.max_tokens`.
    pub fn generate_ids(&self, prompt: &[u32], stop: &[u32], s: &Sampling) -> Result<(Vec<u32>, f64, f64, bool)> {
        let p = self.prefill(prompt, s.max_tokens)?;
        let (out, decode_s, stopped) = self.continue_from(&p, stop, s)?;
        Ok((out, p.seconds, decode_s, stopped))
    }

    /// Processes a prompt once, for any number of generations to continue from.
    pub fn prefill(&self, prompt: &[u32], room: usize) -> Result<Prefill> {
        let mut cache = Cache::with_capacity(self, prompt.len() + room);
        let t0 = Instant::now();
        let logits = self.step(prompt, &mut cache)?;
        Ok(Prefill { cache, logits, tokens: prompt.len(), seconds: t0.elapsed().as_secs_f64() })
    }

    /// Samples an answer after a [`prefill`](Self::prefill)ed prompt: the tokens, the seconds
    /// they took, and whether a stop token ended them.
    pub fn continue_from(&self, p: &Prefill, stop: &[u32], s: &Sampling) -> Result<(Vec<u32>, f64, bool)> {
        let mut rng = forge_rng::SplitMix64::new(s.seed);
        let mut cache = p.cache.clone();
        let mut logits = p.logits.clone();
        let t1 = Instant::now();
        let mut out = Vec::new();
        let mut stopped = false;
        while out.len() < s.max_tokens {
            let token = sample(&logits, s, &mut rng);
            if stop.contains(&token) {
                stopped = true;
                break;
            }
            out.push(token);
            if cache.len + 1 > self.cfg.max_positions || out.len() == s.max_tokens {
                break;
            }
            logits = self.step(&[token], &mut cache)?;
        }
        Ok((out, t1.elapsed().as_secs_f64(), stopped))
    }

    /// The student's prompt for `input` (the file's chat format), prefilled.
    pub fn prefill_input(&self, input: &str, room: usize) -> Result<Prefill> {
        let prompt = self.tokenizer.prompt(None, input)?;
        let ids = self.tokenizer.encode_prompt(&prompt)?;
        self.prefill(&ids, room)
    }

    /// An answer after a prefilled input, decoded, with its timings.
    pub fn generate_after(&self, p: &Prefill, s: &Sampling) -> Result<Generation> {
        let stop = self.tokenizer.stop_ids(&self.cfg.eos);
        let (tokens, decode_s, stopped) = self.continue_from(p, &stop, s)?;
        Ok(Generation {
            text: self.tokenizer.decode(&tokens)?,
            tokens: tokens.len(),
            prompt_tokens: p.tokens,
            prompt_s: p.seconds,
            decode_s,
            stopped,
        })
    }

    /// The student's answer to `input`, in the file's chat format.
    pub fn generate(&self, input: &str, s: &Sampling) -> Result<Generation> {
        self.generate_after(&self.prefill_input(input, s.max_tokens)?, s)
    }

    /// Greedy tokens for `ids` — used to check the decoder against the f32 model.
    pub fn greedy(&self, ids: &[u32], n: usize) -> Result<Vec<u32>> {
        Ok(self.generate_ids(ids, &[], &Sampling { temperature: 0.0, max_tokens: n, ..Sampling::default() })?.0)
    }

    /// The argmax at the last position of `ids`.
    pub fn argmax(&self, ids: &[u32]) -> Result<u32> {
        let logits = self.step(ids, &mut Cache::default())?;
        let t = Tensor::new(logits.as_slice(), &Device::Cpu)?;
        Ok(t.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }

    /// Times `reps` runs of: the prompt `ids` in one batch, then `n_gen` greedy tokens one at a time
    /// (never stopping early). Returns each run's timings and the tokens of the last run.
    pub fn bench(&self, ids: &[u32], n_gen: usize, reps: usize) -> Result<(Vec<BenchRun>, Vec<u32>)> {
        let mut cache = Cache::with_capacity(self, ids.len() + n_gen + 1);
        let mut runs = Vec::with_capacity(reps);
        let mut tokens = Vec::with_capacity(n_gen);
        for _ in 0..reps {
            cache.clear();
            tokens.clear();
            let (t0, c0) = (Instant::now(), cpu_seconds());
            let mut logits = self.step(ids, &mut cache)?;
            let (prompt_s, c1) = (t0.elapsed().as_secs_f64(), cpu_seconds());
            let t1 = Instant::now();
            for _ in 0..n_gen {
                let token = argmax(&logits);
                tokens.push(token);
                logits = self.step(&[token], &mut cache)?;
            }
            let decode_s = t1.elapsed().as_secs_f64();
            runs.push(BenchRun { prompt_s, decode_s, prompt_cpu_s: c1 - c0, decode_cpu_s: cpu_seconds() - c1 });
        }
        Ok((runs, tokens))
    }
}

/// One timed run of [`QModel::bench`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BenchRun {
    /// Wall-clock seconds for the prompt, then for the generated tokens.
    pub prompt_s: f64,
    pub decode_s: f64,
    /// CPU seconds the process used meanwhile (all its threads, spinning included).
    pub prompt_cpu_s: f64,
    pub decode_cpu_s: f64,
}

/// CPU seconds this process has used.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The first index of the largest logit.
fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &l)| if l > b.1 { (i, l) } else { b }).0 as u32
}

/// Below this many multiply-adds a pass runs on the calling thread: handing work to another
/// thread costs more than it saves.
pub const PAR_MIN_WORK: usize = 256 * 1024;

/// RMSNorm of every row of `x` (rows of `w.len()`), as candle-nn's `rms_norm` computes it.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        o.iter_mut().zip(row).zip(w).for_each(|((o, v), w)| *o = *v / m * *w);
    }
}

/// RMSNorm of every `w.len()`-long piece of `x` (Gemma's per-head Q/K norms, its post-norms).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(v, w)| *v = *v / m * *w);
    }
}

/// GELU, tanh approximation (gemma's `gelu_pytorch_tanh`, ggml's `gelu`), written as
/// `x · sigmoid(2u)` = `x / (1 + e^(-2u))` with `u = √(2/π)(x + 0.044715x³)`.
fn gelu_tanh(x: f32) -> f32 {
    x / (1.0 + (x * (GELU_C1 + GELU_C2 * x * x)).exp())
}

/// `-2√(2/π)` and `-2√(2/π) · 0.044715`.
const GELU_C1: f32 = -1.595_769;
const GELU_C2: f32 = -0.071_354_82;

/// A raw output pointer shared by the workers of a pass, each writing its own elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs a function over ranges of `0..n`, perhaps on several threads: `par(n, f)`.
type Par<'a> = &'a dyn Fn(usize, &(dyn Fn(Range<usize>) + Sync));

/// The input format a matrix's dot products read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Need {
    F32,
    /// The input rounded to `f16` (ggml's dot-product type for `f16` weights).
    F16,
    /// The input rounded to `bf16`.
    BF16,
    Q8_0,
    Q8_1,
    Q8K,
}

/// One matrix input, quantized to each dot-product type its matrices need (once per pass).
#[derive(Default)]
struct Acts {
    /// The formats ready for the current input.
    ready: Vec<Need>,
    /// Quantized by forge's kernels (else candle's `from_float`).
    forge: bool,
    q8_0: Vec<BlockQ8_0>,
    /// Per `q8_0` block: its scale as `f32` and its 8 lane sums (of 4 values each) times -128
    /// and -8, for forge's kernels.
    dy: Vec<f32>,
    c128: Vec<[i32; 8]>,
    c8: Vec<[i32; 8]>,
    q8_1: Vec<BlockQ8_1>,
    q8k: Vec<BlockQ8K>,
    f16: Vec<f32>,
    bf16: Vec<f32>,
}

impl Acts {
    /// `x` as a matrix with `f32` weights of dot-product type `need` reads it.
    fn rounded<'a>(&'a self, need: Need, x: &'a [f32]) -> &'a [f32] {
        match need {
            Need::F16 => &self.f16,
            Need::BF16 => &self.bf16,
            _ => x,
        }
    }

    /// Forgets the last input.
    fn reset(&mut self) {
        self.ready.clear();
    }

    /// Quantizes `x` (`m` rows of `k`) for `need`; `par(m, f)` runs `f` over row ranges,
    /// perhaps on several threads.
    fn prepare(&mut self, need: Need, x: &[f32], m: usize, k: usize, par: Par<'_>) {
        if need == Need::F32 || self.ready.contains(&need) {
            return;
        }
        self.ready.push(need);
        match need {
            Need::F32 => {}
            Need::F16 => {
                self.f16.clear();
                self.f16.extend_from_slice(x);
                simd::round_f16(&mut self.f16);
            }
            Need::BF16 => {
                self.bf16.clear();
                self.bf16.extend(x.iter().map(|&x| half::bf16::from_f32(x).to_f32()));
            }
            Need::Q8_0 => {
                let nb = k / 32;
                if self.forge {
                    simd::quantize_q8_0(x, k, self, par);
                } else {
                    self.q8_0.resize(m * nb, BlockQ8_0::zeros());
                    for (row, y) in x.chunks_exact(k).zip(self.q8_0.chunks_exact_mut(nb)) {
                        BlockQ8_0::from_float(row, y);
                    }
                }
            }
            Need::Q8_1 => {
                let nb = k / 32;
                self.q8_1.resize(m * nb, BlockQ8_1::zeros());
                for (row, y) in x.chunks_exact(k).zip(self.q8_1.chunks_exact_mut(nb)) {
                    BlockQ8_1::from_float(row, y);
                }
            }
            Need::Q8K => {
                let nb = k / 256;
                self.q8k.resize(m * nb, BlockQ8K::zeros());
                for (row, y) in x.chunks_exact(k).zip(self.q8k.chunks_exact_mut(nb)) {
                    BlockQ8K::from_float(row, y);
                }
            }
        }
    }
}

/// The dot-product input blocks of a block type.
trait ActSlot: GgmlType {
    const NEED: Need;
    fn slot(a: &Acts) -> &[Self];
}

impl ActSlot for BlockQ8_0 {
    const NEED: Need = Need::Q8_0;
    fn slot(a: &Acts) -> &[Self] {
        &a.q8_0
    }
}

impl ActSlot for BlockQ8_1 {
    const NEED: Need = Need::Q8_1;
    fn slot(a: &Acts) -> &[Self] {
        &a.q8_1
    }
}

impl ActSlot for BlockQ8K {
    const NEED: Need = Need::Q8K;
    fn slot(a: &Acts) -> &[Self] {
        &a.q8k
    }
}

/// A weight matrix `[n][k]` (GGUF's `[k, n]`), kept as the file stores it.
struct Mat {
    n: usize,
    k: usize,
    w: Weights,
}

enum Weights {
    /// `f32`, `f16` or `bf16` weights as `f32`, and the precision ggml rounds the input to for
    /// them (its dot-product type: `F32`, `F16` or `BF16`).
    F32(Vec<f32>, Need),
    /// `f16` weights kept as `f16` (half the memory traffic of `F32`) and widened with F16C
    /// inside the dot product, which sums exactly as the `F32` one does.
    F16(Vec<u16>),
    /// `q8_0`, `q4_0` or `q5_0` blocks repacked by [`simd::repack`] for forge's kernels.
    Packed(Vec<u8>, GgmlDType, Kernels),
    /// `q8_0` or `q4_0` blocks repacked by [`simd::repack8`] for forge's VNNI kernels.
    Packed8(Vec<u8>, GgmlDType),
    /// candle's `vec_dot`.
    Blocks(Box<dyn BlockRows>),
}

impl Mat {
    fn new(t: QTensor, kernels: Kernels) -> Result<Mat> {
        let (n, k) = t.shape().dims2()?;
        let fast = kernels != Kernels::Candle;
        let w = match t.dtype() {
            GgmlDType::F16 if fast => {
                let data = t.data()?;
                Weights::F16(data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect())
            }
            d @ (GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                let need = match d {
                    GgmlDType::F16 => Need::F16,
                    GgmlDType::BF16 => Need::BF16,
                    _ => Need::F32,
                };
                Weights::F32(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?, need)
            }
            d @ (GgmlDType::Q8_0 | GgmlDType::Q4_0) if kernels == Kernels::Vnni => {
                Weights::Packed8(simd::repack8(&t.data()?, n, k / 32, d), d)
            }
            d @ (GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0) if fast => {
                Weights::Packed(simd::repack(&t.data()?, n, k / 32, d, kernels), d, kernels)
            }
            GgmlDType::Q8_0 => Weights::Blocks(Box::new(blocks::<BlockQ8_0>(&t)?)),
            GgmlDType::Q4_0 => Weights::Blocks(Box::new(blocks::<BlockQ4_0>(&t)?)),
            GgmlDType::Q4_1 => Weights::Blocks(Box::new(blocks::<BlockQ4_1>(&t)?)),
            GgmlDType::Q5_0 => Weights::Blocks(Box::new(blocks::<BlockQ5_0>(&t)?)),
            GgmlDType::Q5_1 => Weights::Blocks(Box::new(blocks::<BlockQ5_1>(&t)?)),
            GgmlDType::Q8_1 => Weights::Blocks(Box::new(blocks::<BlockQ8_1>(&t)?)),
            GgmlDType::Q2K => Weights::Blocks(Box::new(blocks::<BlockQ2K>(&t)?)),
            GgmlDType::Q3K => Weights::Blocks(Box::new(blocks::<BlockQ3K>(&t)?)),
            GgmlDType::Q4K => Weights::Blocks(Box::new(blocks::<BlockQ4K>(&t)?)),
            GgmlDType::Q5K => Weights::Blocks(Box::new(blocks::<BlockQ5K>(&t)?)),
            GgmlDType::Q6K => Weights::Blocks(Box::new(blocks::<BlockQ6K>(&t)?)),
            GgmlDType::Q8K => Weights::Blocks(Box::new(blocks::<BlockQ8K>(&t)?)),
        };
        Ok(Mat { n, k, w })
    }

    fn needs(&self) -> Need {
        match &self.w {
            Weights::F32(_, need) => *need,
            Weights::F16(_) => Need::F16,
            Weights::Packed(..) | Weights::Packed8(..) => Need::Q8_0,
            Weights::Blocks(b) => b.needs(),
        }
    }

    /// Rows `rows` of the product with the `m` rows of `x`: `out[i * ld + r]`.
    ///
    /// # Safety
    /// `out` must hold `m * ld` floats, `ld >= self.n`, `rows` within `0..self.n`; `acts` must be
    /// prepared for `x` with `self.needs()`.
    unsafe fn compute(&self, rows: Range<usize>, x: &[f32], acts: &Acts, m: usize, out: *mut f32, ld: usize) {
        let k = self.k;
        unsafe {
            match &self.w {
                Weights::F32(w, need) => simd::f32_rows(w, k, rows, acts.rounded(*need, x), m, out, ld),
                Weights::F16(w) => simd::f16_rows(w, k, rows, acts.rounded(Need::F16, x), m, out, ld),
                Weights::Packed(w, d, kern) => simd::q_rows(w, *d, *kern, self.n, k / 32, rows, acts, m, out, ld),
                Weights::Packed8(w, d) => simd::q_rows8(w, *d, self.n, k / 32, rows, acts, m, out, ld),
                Weights::Blocks(b) => b.rows(k, rows, acts, m, out, ld),
            }
        }
    }
}

/// Copies a tensor's blocks out of its storage.
fn blocks<T: GgmlType>(t: &QTensor) -> Result<Vec<T>> {
    let data = t.data()?;
    let size = std::mem::size_of::<T>();
    if data.len() % size != 0 || t.shape().dims().last().is_none_or(|k| k % T::BLCK_SIZE != 0) {
        return Err(BenchError::Model(format!("a {:?} tensor of {} bytes is not whole blocks", t.dtype(), data.len())));
    }
    let mut v: Vec<T> = (0..data.len() / size).map(|_| T::zeros()).collect();
    // SAFETY: `v` holds exactly `data.len()` bytes of plain-data blocks.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), v.as_mut_ptr() as *mut u8, data.len()) };
    Ok(v)
}

/// Rows of a block-quantized matrix through candle's `vec_dot`.
trait BlockRows: Send + Sync {
    fn needs(&self) -> Need;
    /// # Safety
    /// As [`Mat::compute`].
    unsafe fn rows(&self, k: usize, rows: Range<usize>, acts: &Acts, m: usize, out: *mut f32, ld: usize);
}

impl<T> BlockRows for Vec<T>
where
    T: GgmlType + Send + Sync,
    T::VecDotType: ActSlot,
{
    fn needs(&self) -> Need {
        T::VecDotType::NEED
    }

    unsafe fn rows(&self, k: usize, rows: Range<usize>, acts: &Acts, m: usize, out: *mut f32, ld: usize) {
        let nb = k / T::BLCK_SIZE;
        let ys = T::VecDotType::slot(acts);
        for r in rows {
            let w = &self[r * nb..(r + 1) * nb];
            for i in 0..m {
                let d = T::vec_dot(k, w, &ys[i * nb..(i + 1) * nb]);
                // SAFETY: the caller's contract.
                unsafe { *out.add(i * ld + r) = d };
            }
        }
    }
}

/// Which dot products a model's `q8_0` and `q4_0` matrices run (other types always run candle's).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernels {
    /// candle's `vec_dot` (its AVX2 kernels), row by row.
    Candle,
    /// forge's, with AVX2, FMA and F16C.
    Avx2,
    /// forge's, with AVX512-VNNI `vpdpbusd` (256-bit, AVX512-VL) as well.
    Vnni,
}

impl Kernels {
    /// The best this CPU runs, or less if `FORGE_KERNELS` (`candle`, `avx2`) asks for it.
    pub fn best() -> Kernels {
        static BEST: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cpu = Kernels::cpu();
            match std::env::var("FORGE_KERNELS").as_deref() {
                Ok("candle") | Ok("scalar") => Kernels::Candle,
                Ok("avx2") => cpu.min(Kernels::Avx2),
                _ => cpu,
            }
        })
    }

    /// The best this CPU has.
    pub fn cpu() -> Kernels {
        static CPU: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *CPU.get_or_init(Kernels::detect)
    }

    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                    return Kernels::Vnni;
                }
                return Kernels::Avx2;
            }
        }
        Kernels::Candle
    }

    fn min(self, other: Kernels) -> Kernels {
        if (self as u8) < (other as u8) { self } else { other }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Candle => "candle",
            Kernels::Avx2 => "avx2",
            Kernels::Vnni => "vnni",
        }
    }
}

/// forge's CPU kernels (x86-64). `q8_0`/`q4_0` weights times `q8_0` inputs give exactly candle's
/// `vec_dot` (`avx::vec_dot_q8_0_q8_0`, `vec_dot_q4_0_q8_0`): per 32-value block, 8 lanes of
/// 4-value integer sums, converted to f32, scaled by `d_w * d_x` (an f32 product) and
/// FMA-accumulated in block order, then candle's horizontal sum. Only the integer sums are
/// formed differently: VNNI's `vpdpbusd` needs unsigned × signed bytes, so `q8_0` weights are
/// stored as `x + 128` and `q4_0` nibbles stay `0..=15`, each corrected by a multiple of the
/// input block's lane sums — exact in `i32`.
mod simd {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    fn has_fma() -> bool {
        Kernels::cpu() != Kernels::Candle
    }

    /// Rounds every value to the nearest `f16` (ties to even), as ggml's `f32` → `f16` does.
    pub fn round_f16(x: &mut [f32]) {
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU has AVX2 and F16C.
            i = unsafe { round_f16_f16c(x) };
        }
        for v in &mut x[i..] {
            *v = half::f16::from_f32(*v).to_f32();
        }
    }

    /// [`round_f16`] of the multiples of 8; returns how many it did.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    fn round_f16_f16c(x: &mut [f32]) -> usize {
        let n = x.len() / 8 * 8;
        for c in (0..n).step_by(8) {
            // SAFETY: `c + 8 <= x.len()`.
            unsafe {
                let p = x.as_mut_ptr().add(c);
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
                _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
            }
        }
        n
    }

    /// `a · b`.
    #[inline]
    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { dot_f32_avx2(a, b) };
        }
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
    }

    /// `scores[j - keys.start] = (q · k_j) * scale` for the keys `k_j = kc[j * stride + off..][..q.len()]`,
    /// each dot product as [`dot_f32`] computes it.
    pub fn scores(
        q: &[f32],
        kc: &[f32],
        stride: usize,
        off: usize,
        keys: Range<usize>,
        scale: f32,
        out: &mut Vec<f32>,
    ) {
        let hd = q.len();
        let key = |j: usize| &kc[j * stride + off..][..hd];
        let mut j = keys.start;
        #[cfg(target_arch = "x86_64")]
        if has_fma() && hd.is_multiple_of(16) {
            while j + 4 <= keys.end {
                // SAFETY: the CPU has AVX2 and FMA; the 4 keys hold hd floats each.
                let d = unsafe { dot4_f32_avx2(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]) };
                out.extend(d.map(|d| d * scale));
                j += 4;
            }
        }
        out.extend((j..keys.end).map(|j| dot_f32(q, key(j)) * scale));
    }

    /// Four [`dot_f32`]s of `q` (a multiple of 16 long) sharing its loads.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn dot4_f32_avx2(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        let n = q.len();
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        unsafe {
            while i + 16 <= n {
                let q0 = _mm256_loadu_ps(q.as_ptr().add(i));
                let q1 = _mm256_loadu_ps(q.as_ptr().add(i + 8));
                for (acc, k) in acc.iter_mut().zip(&k) {
                    acc[0] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k.as_ptr().add(i)), acc[0]);
                    acc[1] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k.as_ptr().add(i + 8)), acc[1]);
                }
                i += 16;
            }
        }
        [0, 1, 2, 3].map(|j| hsum(_mm256_add_ps(acc[j][0], acc[j][1])))
    }

    /// `out = Σ_j p[j - first] · v_j` over `v_j = vc[j * stride + off..][..out.len()]`, each
    /// element accumulated in `j` order with FMAs, as repeated [`axpy`]s from zero do.
    pub fn weighted_sum(p: &[f32], vc: &[f32], stride: usize, off: usize, first: usize, out: &mut [f32]) {
        let hd = out.len();
        let mut c = 0;
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            while c + 64 <= hd {
                // SAFETY: the CPU has AVX2 and FMA; every value row holds hd floats at off.
                unsafe { weighted_sum64_avx2(p, vc, stride, off + c, first, &mut out[c..c + 64]) };
                c += 64;
            }
        }
        if c < hd {
            let rest = &mut out[c..];
            rest.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                axpy(pj, &vc[(first + j) * stride + off + c..][..hd - c], rest);
            }
        }
    }

    /// [`weighted_sum`] of 64 values, kept in registers across the keys.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_sum64_avx2(p: &[f32], vc: &[f32], stride: usize, off: usize, first: usize, out: &mut [f32]) {
        let mut o = [_mm256_setzero_ps(); 8];
        for (j, &pj) in p.iter().enumerate() {
            let v = vc[(first + j) * stride + off..][..64].as_ptr();
            let a = _mm256_set1_ps(pj);
            for (r, o) in o.iter_mut().enumerate() {
                *o = _mm256_fmadd_ps(a, unsafe { _mm256_loadu_ps(v.add(8 * r)) }, *o);
            }
        }
        for (r, o) in o.iter().enumerate() {
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * r), *o) };
        }
    }

    /// `g = gelu_tanh(g) * u`, elementwise.
    pub fn gelu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            i = unsafe { gelu_mul_avx2(&mut g[..n], &u[..n]) };
        }
        for j in i..n {
            g[j] = gelu_tanh(g[j]) * u[j];
        }
    }

    /// The multiples of 8 of [`gelu_mul`]; returns how many it did.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_mul_avx2(g: &mut [f32], u: &[f32]) -> usize {
        let n = g.len() / 8 * 8;
        let (c1, c2, one) = (_mm256_set1_ps(GELU_C1), _mm256_set1_ps(GELU_C2), _mm256_set1_ps(1.0));
        for i in (0..n).step_by(8) {
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr().add(i));
                let t = _mm256_mul_ps(x, _mm256_fmadd_ps(c2, _mm256_mul_ps(x, x), c1));
                let y = _mm256_div_ps(x, _mm256_add_ps(one, exp_avx2(t)));
                _mm256_storeu_ps(g.as_mut_ptr().add(i), _mm256_mul_ps(y, _mm256_loadu_ps(u.as_ptr().add(i))));
            }
        }
        n
    }

    /// `e^x` (Cephes' `expf`: within 2 ulp), clamped to finite results.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn exp_avx2(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
        let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
        let z = _mm256_mul_ps(x, x);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0));
        let n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
        _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n)))
    }

    /// `y += a * x`.
    #[inline]
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { axpy_avx2(a, x, y) };
        }
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut i = 0;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        unsafe {
            while i + 16 <= n {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
                i += 16;
            }
            if i + 8 <= n {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(acc0, acc1));
            while i < n {
                s += *pa.add(i) * *pb.add(i);
                i += 1;
            }
            s
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(
                    py.add(i),
                    _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))),
                );
                i += 8;
            }
            while i < n {
                *py.add(i) += a * *px.add(i);
                i += 1;
            }
        }
    }

    /// candle's `hsum_float_8`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let res = _mm256_extractf128_ps(x, 1);
        let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// Rows of an `f32` matrix times the `m` rows of `x`.
    ///
    /// # Safety
    /// As [`Mat::compute`].
    /// As [`f32_rows`] for `f16` weights (F16C; the caller checked the CPU has it).
    ///
    /// # Safety
    /// As [`f32_rows`].
    pub unsafe fn f16_rows(w: &[u16], k: usize, rows: Range<usize>, x: &[f32], m: usize, out: *mut f32, ld: usize) {
        for r in rows {
            let wr = &w[r * k..(r + 1) * k];
            for i in 0..m {
                unsafe { *out.add(i * ld + r) = dot_f16_avx2(wr, &x[i * k..(i + 1) * k]) };
            }
        }
    }

    /// [`dot_f32_avx2`] with `a` in `f16`: the same lanes, accumulators and order, so the same sum.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f16_avx2(a: &[u16], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let load = |p: *const u16| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) };
        let mut i = 0;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        unsafe {
            while i + 16 <= n {
                acc0 = _mm256_fmadd_ps(load(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(load(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
                i += 16;
            }
            if i + 8 <= n {
                acc0 = _mm256_fmadd_ps(load(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(acc0, acc1));
            while i < n {
                s += half::f16::from_bits(*pa.add(i)).to_f32() * *pb.add(i);
                i += 1;
            }
            s
        }
    }

    pub unsafe fn f32_rows(w: &[f32], k: usize, rows: Range<usize>, x: &[f32], m: usize, out: *mut f32, ld: usize) {
        for r in rows {
            let wr = &w[r * k..(r + 1) * k];
            for i in 0..m {
                unsafe { *out.add(i * ld + r) = dot_f32(wr, &x[i * k..(i + 1) * k]) };
            }
        }
    }

    /// Quantizes the rows of `x` to `q8_0` exactly as candle's `BlockQ8_0::from_float` does
    /// (scale `amax / 127` rounded to f16, values `round(x / d)` half away from zero), with each
    /// block's scale as `f32` and its lane sums (of 4 values) times -128 and -8.
    pub fn quantize_q8_0(x: &[f32], k: usize, a: &mut Acts, par: Par<'_>) {
        let nb = x.len() / 32;
        a.q8_0.resize(nb, BlockQ8_0::zeros());
        a.dy.resize(nb, 0.0);
        a.c128.resize(nb, [0; 8]);
        a.c8.resize(nb, [0; 8]);
        assert!(x.len() == nb * 32 && k.is_multiple_of(32));
        let (y, dy) = (a.q8_0.as_mut_ptr() as usize, OutPtr(a.dy.as_mut_ptr()));
        let (c128, c8) = (a.c128.as_mut_ptr() as usize, a.c8.as_mut_ptr() as usize);
        let kb = k / 32;
        par(x.len() / k, &|rows| {
            let b0 = rows.start * kb;
            let n = rows.len() * kb;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forge's kernels run only where the CPU has AVX2, FMA and F16C; each range
            // of rows writes its own blocks of the buffers sized above.
            unsafe {
                quantize_q8_0_avx2(
                    &x[b0 * 32..(b0 + n) * 32],
                    (y as *mut u8).add(b0 * 34),
                    std::slice::from_raw_parts_mut(dy.get().add(b0), n),
                    std::slice::from_raw_parts_mut((c128 as *mut [i32; 8]).add(b0), n),
                    std::slice::from_raw_parts_mut((c8 as *mut [i32; 8]).add(b0), n),
                )
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (b0, n, y, dy, c128, c8);
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_q8_0_avx2(x: &[f32], y: *mut u8, dy: &mut [f32], c128: &mut [[i32; 8]], c8: &mut [[i32; 8]]) {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let ones8 = _mm256_set1_epi8(1);
        let ones16 = _mm256_set1_epi16(1);
        for (b, xs) in x.chunks_exact(32).enumerate() {
            unsafe {
                let v = [
                    _mm256_loadu_ps(xs.as_ptr()),
                    _mm256_loadu_ps(xs.as_ptr().add(8)),
                    _mm256_loadu_ps(xs.as_ptr().add(16)),
                    _mm256_loadu_ps(xs.as_ptr().add(24)),
                ];
                let a = _mm256_max_ps(
                    _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
                );
                let a4 = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
                let a2 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
                let amax = _mm_cvtss_f32(_mm_max_ss(a2, _mm_movehdup_ps(a2)));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let dh = _mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(d));
                let bits = _mm_extract_epi16::<0>(dh) as u16;
                dy[b] = _mm_cvtss_f32(_mm_cvtph_ps(dh));
                let mul = _mm256_set1_ps(id);
                let mut q = [_mm256_setzero_si256(); 4];
                for (q, &v) in q.iter_mut().zip(&v) {
                    // round half away from zero: trunc, then one more unit where |frac| >= 0.5
                    let s = _mm256_mul_ps(v, mul);
                    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
                    let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(s, t));
                    let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
                    let unit = _mm256_or_ps(_mm256_and_ps(s, sign), one);
                    *q = _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, unit)));
                }
                let i01 = _mm256_packs_epi32(q[0], q[1]);
                let i23 = _mm256_packs_epi32(q[2], q[3]);
                let i = _mm256_packs_epi16(i01, i23);
                let i = _mm256_permutevar8x32_epi32(i, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                let blk = y.add(b * 34);
                std::ptr::write_unaligned(blk as *mut u16, bits);
                _mm256_storeu_si256(blk.add(2) as *mut __m256i, i);
                let s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, i), ones16);
                let neg = _mm256_sub_epi32(_mm256_setzero_si256(), s);
                _mm256_storeu_si256(c128[b].as_mut_ptr() as *mut __m256i, _mm256_slli_epi32::<7>(neg));
                _mm256_storeu_si256(c8[b].as_mut_ptr() as *mut __m256i, _mm256_slli_epi32::<3>(neg));
            }
        }
    }

    /// Repacks a `q8_0`/`q4_0` matrix of `n` rows of `nb` blocks for the kernels: each quad of
    /// rows becomes one stream, block by block — the 4 f16 scales, then the 4 rows' values — so
    /// that it streams from memory in order; the last `n % 4` rows follow as the file has them.
    /// `q8_0` values are stored as `x + 128` for VNNI; `q4_0` values go by pairs of rows, 32
    /// bytes whose low nibbles are the first row's 32 values in order and high nibbles the
    /// second's.
    pub fn repack(data: &[u8], n: usize, nb: usize, dtype: GgmlDType, kernels: Kernels) -> Vec<u8> {
        let bs = block_bytes(dtype);
        assert_eq!(data.len(), n * nb * bs, "whole blocks");
        let mut out = Vec::with_capacity(data.len());
        for quad in 0..n / 4 {
            for b in 0..nb {
                let blk = |j: usize| &data[((quad * 4 + j) * nb + b) * bs..][..bs];
                (0..4).for_each(|j| out.extend_from_slice(&blk(j)[..2]));
                let nibbles = |out: &mut Vec<u8>, at: usize| {
                    for pair in [0, 2] {
                        let (a, b) = (&blk(pair)[at..], &blk(pair + 1)[at..]);
                        out.extend((0..16).map(|e| (a[e] & 0x0F) | (b[e] << 4)));
                        out.extend((0..16).map(|e| (a[e] >> 4) | (b[e] & 0xF0)));
                    }
                };
                match dtype {
                    GgmlDType::Q8_0 => {
                        let flip = if kernels == Kernels::Vnni { 0x80 } else { 0 };
                        (0..4).for_each(|j| out.extend(blk(j)[2..].iter().map(|v| v ^ flip)));
                    }
                    GgmlDType::Q4_0 => nibbles(&mut out, 2),
                    _ => {
                        // q5_0: the 4 rows' high bits (4 bytes each), then their nibbles.
                        (0..4).for_each(|j| out.extend_from_slice(&blk(j)[2..6]));
                        nibbles(&mut out, 6);
                    }
                }
            }
        }
        out.extend_from_slice(&data[n / 4 * 4 * nb * bs..]);
        out
    }

    /// # Safety
    /// As [`Mat::compute`], with `w` from [`repack`] and `acts` prepared for `Need::Q8_0`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn q_rows(
        w: &[u8],
        dtype: GgmlDType,
        kernels: Kernels,
        n: usize,
        nb: usize,
        rows: Range<usize>,
        acts: &Acts,
        m: usize,
        out: *mut f32,
        ld: usize,
    ) {
        assert!(rows.end <= n, "rows within the matrix");
        assert!(rows.start.is_multiple_of(4) || rows.start >= n / 4 * 4, "row chunks start on a quad");
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let a = Args::new(w, dtype, n, nb, acts, m, out, ld);
            match (dtype, kernels) {
                (GgmlDType::Q8_0, Kernels::Vnni) => q8_0_vnni(&a, rows),
                (GgmlDType::Q8_0, _) => q8_0_avx2(&a, rows),
                (GgmlDType::Q4_0, Kernels::Vnni) => q4_0_vnni(&a, rows),
                (GgmlDType::Q4_0, _) => q4_0_avx2(&a, rows),
                (_, Kernels::Vnni) => q5_0_vnni(&a, rows),
                _ => q5_0_avx2(&a, rows),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (kernels, out, ld);
    }

    /// Bytes per block of the types forge's kernels run.
    fn block_bytes(dtype: GgmlDType) -> usize {
        match dtype {
            GgmlDType::Q8_0 => 34,
            GgmlDType::Q4_0 => 18,
            GgmlDType::Q5_0 => 22,
            other => unreachable!("no forge kernel for {other:?}"),
        }
    }

    #[cfg(target_arch = "x86_64")]
    struct Args {
        w: *const u8,
        n: usize,
        nb: usize,
        y: *const u8,
        dy: *const f32,
        /// Per input block, the 8 lane corrections (`acts.c128` or `acts.c8`).
        c: *const i32,
        m: usize,
        out: *mut f32,
        ld: usize,
    }

    #[cfg(target_arch = "x86_64")]
    impl Args {
        /// A kernel's view of `n` rows of `nb` repacked blocks of `w` and `m` inputs prepared in
        /// `acts`, checking that the buffers hold them.
        #[allow(clippy::too_many_arguments)]
        fn new(
            w: &[u8],
            dtype: GgmlDType,
            n: usize,
            nb: usize,
            acts: &Acts,
            m: usize,
            out: *mut f32,
            ld: usize,
        ) -> Args {
            assert!(w.len() == n * nb * block_bytes(dtype) && acts.q8_0.len() >= m * nb && acts.dy.len() >= m * nb);
            Args {
                w: w.as_ptr(),
                n,
                nb,
                y: acts.q8_0.as_ptr() as *const u8,
                dy: acts.dy.as_ptr(),
                c: if dtype == GgmlDType::Q8_0 { acts.c128.as_ptr() } else { acts.c8.as_ptr() } as *const i32,
                m,
                out,
                ld,
            }
        }
    }

    /// How far ahead (bytes) the one-input kernels prefetch the weights; `FORGE_PREFETCH` to tune.
    fn prefetch_distance() -> usize {
        static D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *D.get_or_init(|| std::env::var("FORGE_PREFETCH").ok().and_then(|v| v.parse().ok()).unwrap_or(2048))
    }

    /// A weight block's scale.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32))) }
    }

    /// The 32 4-bit values of a plain `q4_0` block (low nibbles, then high), 0..=15.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        unsafe {
            let tmp = _mm_loadu_si128(p as *const __m128i);
            let bytes = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
            _mm256_and_si256(_mm256_set1_epi8(0xF), bytes)
        }
    }

    /// Generates a kernel over a repacked matrix (`$bs`-byte blocks: an f16 scale and values):
    /// a quad of rows times `NR` inputs at a time. `$quad` loads the 4 rows' values of one block
    /// from its pointer, `$plain` one row's from a plain block's values, and `$dot` gives the
    /// 8 lane sums (`i32`) of values `$x` against input values `$y` with corrections `$c`.
    macro_rules! kernel {
        (
            $name:ident, $tile:ident, $feat:literal, $bs:expr,
            quad |$qp:ident| $quad:block,
            plain |$pp:ident| $plain:block,
            dot |$x:ident, $y:ident, $c:ident| $dot:block
        ) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feat)]
            unsafe fn $name(a: &Args, rows: Range<usize>) {
                let quads = a.n / 4;
                let mut r = rows.start;
                unsafe {
                    while r + 4 <= rows.end && r / 4 < quads {
                        let mut i = 0;
                        while i + 4 <= a.m {
                            $tile::<4>(a, r, i);
                            i += 4;
                        }
                        while i < a.m {
                            $tile::<1>(a, r, i);
                            i += 1;
                        }
                        r += 4;
                    }
                    // The last n % 4 rows, stored plainly after the quads.
                    let nb = a.nb;
                    let tail = a.w.add(quads * nb * (8 + 4 * ($bs - 2)));
                    while r < rows.end {
                        let w0 = tail.add((r - quads * 4) * nb * $bs);
                        for i in 0..a.m {
                            let y = a.y.add(i * nb * 34);
                            let dy = a.dy.add(i * nb);
                            let cs = a.c.add(i * nb * 8);
                            let mut acc = _mm256_setzero_ps();
                            for b in 0..nb {
                                let wb = w0.add(b * $bs);
                                let p = {
                                    let $x = {
                                        let $pp = wb.add(2);
                                        $plain
                                    };
                                    let $y = _mm256_loadu_si256(y.add(b * 34 + 2) as *const __m256i);
                                    let $c = _mm256_loadu_si256(cs.add(b * 8) as *const __m256i);
                                    $dot
                                };
                                let scale = _mm256_set1_ps(f16_at(wb) * *dy.add(b));
                                acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
                            }
                            *a.out.add(i * a.ld + r) = hsum(acc);
                        }
                        r += 1;
                    }
                }
            }

            /// Rows `r..r + 4` (a quad) times inputs `i..i + NR`.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn $tile<const NR: usize>(a: &Args, r: usize, i: usize) {
                const QUAD: usize = 8 + 4 * ($bs - 2);
                let nb = a.nb;
                unsafe {
                    let lane = [_mm256_set1_epi32(0), _mm256_set1_epi32(1), _mm256_set1_epi32(2), _mm256_set1_epi32(3)];
                    let base = a.w.add(r / 4 * nb * QUAD);
                    let mut acc = [[_mm256_setzero_ps(); 4]; NR];
                    for b in 0..nb {
                        let blk = base.add(b * QUAD);
                        if NR == 1 && $bs != 34 {
                            // One input: the weights stream from memory once; fetch ahead
                            // (q8_0's denser stream does better with the hardware's prefetch
                            // alone).
                            let ahead = blk.add(prefetch_distance());
                            for l in 0..QUAD.div_ceil(64) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * l) as *const i8);
                            }
                        }
                        let xs: [__m256i; 4] = {
                            let $qp = blk.add(8);
                            $quad
                        };
                        let d4 = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(blk as *const __m128i)));
                        let dx = [0, 1, 2, 3].map(|j| _mm256_permutevar8x32_ps(d4, lane[j]));
                        for ii in 0..NR {
                            let row = (i + ii) * nb + b;
                            let yb = _mm256_loadu_si256(a.y.add(row * 34 + 2) as *const __m256i);
                            let cb = _mm256_loadu_si256(a.c.add(row * 8) as *const __m256i);
                            let dy = _mm256_set1_ps(*a.dy.add(row));
                            for j in 0..4 {
                                let p = {
                                    let ($x, $y, $c) = (xs[j], yb, cb);
                                    $dot
                                };
                                // the row's scale times the input's, as candle's f32 product
                                let scale = _mm256_mul_ps(dx[j], dy);
                                acc[ii][j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[ii][j]);
                            }
                        }
                    }
                    for ii in 0..NR {
                        let o = a.out.add((i + ii) * a.ld + r);
                        for j in 0..4 {
                            *o.add(j) = hsum(acc[ii][j]);
                        }
                    }
                }
            }
        };
    }

    // q8_0, AVX2: candle's sign trick (|x| times y with x's sign) through maddubs + madd.
    kernel!(
        q8_0_avx2,
        q8_0_avx2_tile,
        "avx2,fma,f16c",
        34,
        quad | p | {
            [
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
                _mm256_loadu_si256(p.add(64) as *const __m256i),
                _mm256_loadu_si256(p.add(96) as *const __m256i),
            ]
        },
        plain | p | { _mm256_loadu_si256(p as *const __m256i) },
        dot | x,
        y,
        _c | {
            let ax = _mm256_sign_epi8(x, x);
            let sy = _mm256_sign_epi8(y, x);
            _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
        }
    );
    // q8_0, VNNI: the stored x + 128 times y, minus 128·Σy.
    kernel!(
        q8_0_vnni,
        q8_0_vnni_tile,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        34,
        quad | p | {
            [
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
                _mm256_loadu_si256(p.add(64) as *const __m256i),
                _mm256_loadu_si256(p.add(96) as *const __m256i),
            ]
        },
        plain | p | { _mm256_xor_si256(_mm256_loadu_si256(p as *const __m256i), _mm256_set1_epi8(-128)) },
        dot | x,
        y,
        c | { _mm256_dpbusd_epi32(c, x, y) }
    );
    // q4_0, AVX2: candle's (nibbles - 8, then the sign trick).
    kernel!(
        q4_0_avx2,
        q4_0_avx2_tile,
        "avx2,fma,f16c",
        18,
        quad | p | {
            let m = _mm256_set1_epi8(0x0F);
            let eight = _mm256_set1_epi8(8);
            let v01 = _mm256_loadu_si256(p as *const __m256i);
            let v23 = _mm256_loadu_si256(p.add(32) as *const __m256i);
            [
                _mm256_sub_epi8(_mm256_and_si256(v01, m), eight),
                _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(v01), m), eight),
                _mm256_sub_epi8(_mm256_and_si256(v23, m), eight),
                _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(v23), m), eight),
            ]
        },
        plain | p | { _mm256_sub_epi8(nibbles(p), _mm256_set1_epi8(8)) },
        dot | x,
        y,
        _c | {
            let ax = _mm256_sign_epi8(x, x);
            let sy = _mm256_sign_epi8(y, x);
            _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
        }
    );
    // q4_0, VNNI: nibbles times y, minus 8·Σy.
    kernel!(
        q4_0_vnni,
        q4_0_vnni_tile,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        18,
        quad | p | {
            let m = _mm256_set1_epi8(0x0F);
            let v01 = _mm256_loadu_si256(p as *const __m256i);
            let v23 = _mm256_loadu_si256(p.add(32) as *const __m256i);
            [
                _mm256_and_si256(v01, m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v01), m),
                _mm256_and_si256(v23, m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v23), m),
            ]
        },
        plain | p | { nibbles(p) },
        dot | x,
        y,
        c | { _mm256_dpbusd_epi32(c, x, y) }
    );

    /// Repacks a `q8_0`/`q4_0` matrix for the VNNI kernels by octets of rows: per octet and
    /// block, the 8 f16 scales, then the values with the 8 rows interleaved by groups of 4
    /// values — 32 bytes hold values `4g..4g + 4` of each of the 8 rows, so that lane `r` of a
    /// `vpdpbusd` is row `r`'s sum over that group, candle's lane `g` of row `r`. `q8_0` values
    /// are stored as `x + 128`; `q4_0` nibbles hold group `g` low and group `g + 4` high. The
    /// last `n % 8` rows follow as the file has them.
    pub fn repack8(data: &[u8], n: usize, nb: usize, dtype: GgmlDType) -> Vec<u8> {
        let bs = block_bytes(dtype);
        assert_eq!(data.len(), n * nb * bs, "whole blocks");
        let mut out = Vec::with_capacity(data.len());
        for oct in 0..n / 8 {
            for b in 0..nb {
                let blk = |r: usize| &data[((oct * 8 + r) * nb + b) * bs..][..bs];
                (0..8).for_each(|r| out.extend_from_slice(&blk(r)[..2]));
                if dtype == GgmlDType::Q8_0 {
                    for g in 0..8 {
                        (0..8).for_each(|r| out.extend(blk(r)[2 + 4 * g..2 + 4 * g + 4].iter().map(|v| v ^ 0x80)));
                    }
                } else {
                    // The 0..=15 value of element e of a q4_0 block.
                    let nib = |q: &[u8], e: usize| if e < 16 { q[2 + e] & 0x0F } else { q[2 + e - 16] >> 4 };
                    for g in 0..4 {
                        for r in 0..8 {
                            let q = blk(r);
                            out.extend((0..4).map(|e| nib(q, 4 * g + e) | (nib(q, 4 * (g + 4) + e) << 4)));
                        }
                    }
                }
            }
        }
        out.extend_from_slice(&data[n / 8 * 8 * nb * bs..]);
        out
    }

    /// # Safety
    /// As [`Mat::compute`], with `w` from [`repack8`] and `acts` prepared for `Need::Q8_0`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn q_rows8(
        w: &[u8],
        dtype: GgmlDType,
        n: usize,
        nb: usize,
        rows: Range<usize>,
        acts: &Acts,
        m: usize,
        out: *mut f32,
        ld: usize,
    ) {
        assert!(rows.end <= n, "rows within the matrix");
        assert!(rows.start.is_multiple_of(8) || rows.start >= n / 8 * 8, "row chunks start on an octet");
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let a = Args::new(w, dtype, n, nb, acts, m, out, ld);
            if dtype == GgmlDType::Q8_0 { q8_0_x8(&a, rows) } else { q4_0_x8(&a, rows) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (out, ld);
    }

    /// Generates a VNNI kernel over an octet-repacked matrix (`$bs`-byte blocks): 8 rows times
    /// `NR` inputs at a time, the accumulators transposed — `acc[g]` holds lane `g` of the 8
    /// rows' candle accumulators — and summed at the end in `hsum_float_8`'s order. `$groups`
    /// loads the 8 value groups of one block from its pointer; `$plain` one row's values (0..)
    /// from a plain block's values, for the rows after the octets.
    macro_rules! kernel8 {
        ($name:ident, $tile:ident, $bs:expr, groups |$gp:ident| $groups:block, plain |$pp:ident| $plain:block) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            unsafe fn $name(a: &Args, rows: Range<usize>) {
                let octs = a.n / 8;
                let mut r = rows.start;
                unsafe {
                    while r + 8 <= rows.end && r / 8 < octs {
                        let mut i = 0;
                        while i + 2 <= a.m {
                            $tile::<2>(a, r, i);
                            i += 2;
                        }
                        while i < a.m {
                            $tile::<1>(a, r, i);
                            i += 1;
                        }
                        r += 8;
                    }
                    // The last n % 8 rows, stored plainly after the octets.
                    let nb = a.nb;
                    let tail = a.w.add(octs * nb * 8 * $bs);
                    while r < rows.end {
                        let w0 = tail.add((r - octs * 8) * nb * $bs);
                        for i in 0..a.m {
                            let mut acc = _mm256_setzero_ps();
                            for b in 0..nb {
                                let wb = w0.add(b * $bs);
                                let row = i * nb + b;
                                let x = {
                                    let $pp = wb.add(2);
                                    $plain
                                };
                                let y = _mm256_loadu_si256(a.y.add(row * 34 + 2) as *const __m256i);
                                let c = _mm256_loadu_si256(a.c.add(row * 8) as *const __m256i);
                                let p = _mm256_dpbusd_epi32(c, x, y);
                                let scale = _mm256_set1_ps(f16_at(wb) * *a.dy.add(row));
                                acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
                            }
                            *a.out.add(i * a.ld + r) = hsum(acc);
                        }
                        r += 1;
                    }
                }
            }

            /// Rows `r..r + 8` (an octet) times inputs `i..i + NR`.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            #[inline]
            unsafe fn $tile<const NR: usize>(a: &Args, r: usize, i: usize) {
                const OCT: usize = 8 * $bs;
                let nb = a.nb;
                unsafe {
                    let base = a.w.add(r / 8 * nb * OCT);
                    let mut acc = [[_mm256_setzero_ps(); 8]; NR];
                    for b in 0..nb {
                        let blk = base.add(b * OCT);
                        if NR == 1 && $bs != 34 {
                            let ahead = blk.add(prefetch_distance());
                            for l in 0..OCT.div_ceil(64) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * l) as *const i8);
                            }
                        }
                        let xs: [__m256i; 8] = {
                            let $gp = blk.add(16);
                            $groups
                        };
                        // Each row's scale times the input's, as candle's f32 products.
                        let dx = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                        for ii in 0..NR {
                            let row = (i + ii) * nb + b;
                            let s = _mm256_mul_ps(dx, _mm256_set1_ps(*a.dy.add(row)));
                            let y = a.y.add(row * 34 + 2) as *const i32;
                            let c = a.c.add(row * 8);
                            for g in 0..8 {
                                let yg = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(g)));
                                let p = _mm256_dpbusd_epi32(_mm256_set1_epi32(*c.add(g)), xs[g], yg);
                                acc[ii][g] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[ii][g]);
                            }
                        }
                    }
                    for (ii, acc) in acc.iter().enumerate() {
                        // hsum_float_8's tree: ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)).
                        let t = _mm256_add_ps(_mm256_add_ps(acc[4], acc[0]), _mm256_add_ps(acc[6], acc[2]));
                        let u = _mm256_add_ps(_mm256_add_ps(acc[5], acc[1]), _mm256_add_ps(acc[7], acc[3]));
                        _mm256_storeu_ps(a.out.add((i + ii) * a.ld + r), _mm256_add_ps(t, u));
                    }
                }
            }
        };
    }

    kernel8!(
        q8_0_x8,
        q8_0_x8_tile,
        34,
        groups | p | {
            [
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(32) as *const __m256i),
                _mm256_loadu_si256(p.add(64) as *const __m256i),
                _mm256_loadu_si256(p.add(96) as *const __m256i),
                _mm256_loadu_si256(p.add(128) as *const __m256i),
                _mm256_loadu_si256(p.add(160) as *const __m256i),
                _mm256_loadu_si256(p.add(192) as *const __m256i),
                _mm256_loadu_si256(p.add(224) as *const __m256i),
            ]
        },
        plain | p | { _mm256_xor_si256(_mm256_loadu_si256(p as *const __m256i), _mm256_set1_epi8(-128)) }
    );
    kernel8!(
        q4_0_x8,
        q4_0_x8_tile,
        18,
        groups | p | {
            let m = _mm256_set1_epi8(0x0F);
            let v0 = _mm256_loadu_si256(p as *const __m256i);
            let v1 = _mm256_loadu_si256(p.add(32) as *const __m256i);
            let v2 = _mm256_loadu_si256(p.add(64) as *const __m256i);
            let v3 = _mm256_loadu_si256(p.add(96) as *const __m256i);
            [
                _mm256_and_si256(v0, m),
                _mm256_and_si256(v1, m),
                _mm256_and_si256(v2, m),
                _mm256_and_si256(v3, m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v0), m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v1), m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v2), m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v3), m),
            ]
        },
        plain | p | { nibbles(p) }
    );

    /// 32 bytes, 0x10 where bit `e` of the 4 bytes at `p` is set (a `q5_0` block's high bits).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn high_bits(p: *const u8) -> __m256i {
        unsafe {
            let x = _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32));
            let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
            let bytes = _mm256_or_si256(_mm256_shuffle_epi8(x, shuf), _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
            _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10))
        }
    }

    /// The integer sums of 4 blocks' 8 lanes: `[Σp0, Σp1, Σp2, Σp3]`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn sum4(p: [__m256i; 4]) -> __m128i {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }

    /// Generates a `q5_0` kernel. candle's `q5_0` dot product is its scalar one: per block the
    /// exact integer sum, then `sum += (sumi as f32 * d_w) * d_x`; here the 4 rows of a quad
    /// are the 4 lanes of a 128-bit vector, each lane doing exactly that. `$dot` gives a block's
    /// 8 lane sums from values `$x` (0..=31), input `$y` and the input's `-8·Σy` lanes `$c`.
    macro_rules! kernel_q5_0 {
        ($name:ident, $tile:ident, $feat:literal, dot |$x:ident, $y:ident, $c:ident| $dot:block) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feat)]
            unsafe fn $name(a: &Args, rows: Range<usize>) {
                const QUAD: usize = 88;
                let quads = a.n / 4;
                let nb = a.nb;
                let mut r = rows.start;
                unsafe {
                    while r + 4 <= rows.end && r / 4 < quads {
                        let mut i = 0;
                        while i + 4 <= a.m {
                            $tile::<4>(a, r, i);
                            i += 4;
                        }
                        while i < a.m {
                            $tile::<1>(a, r, i);
                            i += 1;
                        }
                        r += 4;
                    }
                    let tail = a.w.add(quads * nb * QUAD);
                    while r < rows.end {
                        let w0 = tail.add((r - quads * 4) * nb * 22);
                        for i in 0..a.m {
                            let mut sum = 0f32;
                            for b in 0..nb {
                                let wb = w0.add(b * 22);
                                let row = i * nb + b;
                                let p = {
                                    let $x = _mm256_or_si256(nibbles(wb.add(6)), high_bits(wb.add(2)));
                                    let $y = _mm256_loadu_si256(a.y.add(row * 34 + 2) as *const __m256i);
                                    let $c = _mm256_loadu_si256(a.c.add(row * 8) as *const __m256i);
                                    $dot
                                };
                                let z = _mm256_setzero_si256();
                                let sumi = _mm_cvtsi128_si32(sum4([p, z, z, z]));
                                sum += sumi as f32 * f16_at(wb) * *a.dy.add(row);
                            }
                            *a.out.add(i * a.ld + r) = sum;
                        }
                        r += 1;
                    }
                }
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn $tile<const NR: usize>(a: &Args, r: usize, i: usize) {
                const QUAD: usize = 88;
                let nb = a.nb;
                unsafe {
                    let base = a.w.add(r / 4 * nb * QUAD);
                    let mut acc = [_mm_setzero_ps(); NR];
                    for b in 0..nb {
                        let blk = base.add(b * QUAD);
                        if NR == 1 {
                            let ahead = blk.add(prefetch_distance());
                            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(ahead.add(64) as *const i8);
                        }
                        let m = _mm256_set1_epi8(0x0F);
                        let v01 = _mm256_loadu_si256(blk.add(24) as *const __m256i);
                        let v23 = _mm256_loadu_si256(blk.add(56) as *const __m256i);
                        let xs = [
                            _mm256_or_si256(_mm256_and_si256(v01, m), high_bits(blk.add(8))),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(v01), m), high_bits(blk.add(12))),
                            _mm256_or_si256(_mm256_and_si256(v23, m), high_bits(blk.add(16))),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(v23), m), high_bits(blk.add(20))),
                        ];
                        let dx = _mm_cvtph_ps(_mm_loadl_epi64(blk as *const __m128i));
                        for ii in 0..NR {
                            let row = (i + ii) * nb + b;
                            let yb = _mm256_loadu_si256(a.y.add(row * 34 + 2) as *const __m256i);
                            let cb = _mm256_loadu_si256(a.c.add(row * 8) as *const __m256i);
                            let mut p = [_mm256_setzero_si256(); 4];
                            for j in 0..4 {
                                p[j] = {
                                    let ($x, $y, $c) = (xs[j], yb, cb);
                                    $dot
                                };
                            }
                            let f = _mm_cvtepi32_ps(sum4(p));
                            let t = _mm_mul_ps(_mm_mul_ps(f, dx), _mm_set1_ps(*a.dy.add(row)));
                            acc[ii] = _mm_add_ps(acc[ii], t);
                        }
                    }
                    for ii in 0..NR {
                        _mm_storeu_ps(a.out.add((i + ii) * a.ld + r), acc[ii]);
                    }
                }
            }
        };
    }

    // q5_0, AVX2: (v - 16) with the sign trick; VNNI: v·y - 16·Σy (twice the q4_0 correction).
    kernel_q5_0!(
        q5_0_avx2,
        q5_0_avx2_tile,
        "avx2,fma,f16c",
        dot | x,
        y,
        _c | {
            let xs = _mm256_sub_epi8(x, _mm256_set1_epi8(16));
            let ax = _mm256_sign_epi8(xs, xs);
            let sy = _mm256_sign_epi8(y, xs);
            _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
        }
    );
    kernel_q5_0!(
        q5_0_vnni,
        q5_0_vnni_tile,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        dot | x,
        y,
        c | { _mm256_dpbusd_epi32(_mm256_slli_epi32::<1>(c), x, y) }
    );
}

/// forge's decoder thread pool: the caller plus `threads - 1` workers.
mod pool {
    use std::cell::UnsafeCell;
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// `state`: the pass number (high 32 bits), closed (bit 31), how many workers joined.
    const CLOSED: u64 = 1 << 31;
    const JOINED: u64 = CLOSED - 1;
    /// A waiting worker spins this long, then yields this long, then sleeps.
    const SPIN: Duration = Duration::from_micros(50);
    const YIELD: Duration = Duration::from_micros(500);

    type Job = *const (dyn Fn() + Sync + 'static);

    struct Shared {
        state: AtomicU64,
        left: AtomicU32,
        /// The pass's work, set before its number is published, cleared after every worker
        /// that joined it has left.
        job: UnsafeCell<Option<Job>>,
        parked: Box<[AtomicBool]>,
        stop: AtomicBool,
        panicked: AtomicBool,
    }

    // SAFETY: `job` is written only by the dispatcher while no worker may read it (see `run`).
    unsafe impl Sync for Shared {}
    unsafe impl Send for Shared {}

    pub struct Pool {
        shared: Arc<Shared>,
        workers: Vec<std::thread::JoinHandle<()>>,
        /// The last pass's number; locked while a pass runs.
        pass: Mutex<u32>,
    }

    impl Pool {
        pub fn new(threads: usize) -> Pool {
            let n = threads.max(1) - 1;
            let shared = Arc::new(Shared {
                state: AtomicU64::new(0),
                left: AtomicU32::new(0),
                job: UnsafeCell::new(None),
                parked: (0..n).map(|_| AtomicBool::new(false)).collect(),
                stop: AtomicBool::new(false),
                panicked: AtomicBool::new(false),
            });
            let workers = (0..n)
                .map(|id| {
                    let sh = shared.clone();
                    std::thread::Builder::new()
                        .name(format!("forge-decode-{}", id + 1))
                        .spawn(move || worker(&sh, id))
                        .expect("spawning a decoder thread")
                })
                .collect();
            Pool { shared, workers, pass: Mutex::new(0) }
        }

        pub fn threads(&self) -> usize {
            self.workers.len() + 1
        }

        /// Runs `f` on this thread and on every worker that picks the pass up before this
        /// thread's own call returns; `f` must share its work out (a shared cursor), since any
        /// number of workers, even none, may join. Returns when all that joined are done.
        pub fn run(&self, f: &(dyn Fn() + Sync)) {
            if self.workers.is_empty() {
                return f();
            }
            // Another thread mid-pass (two generations on one model): do it alone.
            let Ok(mut pass) = self.pass.try_lock() else { return f() };
            let sh = &*self.shared;
            *pass = pass.wrapping_add(1).max(1);
            // SAFETY: no worker reads `job` before it joins this pass, which needs the state
            // stored below; the lifetime is erased only until every joined worker has left.
            unsafe {
                *sh.job.get() = Some(std::mem::transmute::<*const (dyn Fn() + Sync + '_), Job>(f as *const _));
            }
            sh.left.store(0, Relaxed);
            sh.state.store((*pass as u64) << 32, SeqCst);
            for (w, parked) in self.workers.iter().zip(sh.parked.iter()) {
                if parked.swap(false, SeqCst) {
                    w.thread().unpark();
                }
            }
            let mine = catch_unwind(AssertUnwindSafe(f));
            let joined = (sh.state.fetch_or(CLOSED, SeqCst) & JOINED) as u32;
            let t0 = Instant::now();
            let mut spins = 0u32;
            while sh.left.load(Acquire) != joined {
                spins += 1;
                if spins < 64 || t0.elapsed() < SPIN {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            // SAFETY: every worker that joined has left; no other may join a closed pass.
            unsafe { *sh.job.get() = None };
            if let Err(p) = mine {
                resume_unwind(p);
            }
            if sh.panicked.swap(false, SeqCst) {
                panic!("a decoder thread panicked");
            }
        }
    }

    fn worker(sh: &Shared, id: usize) {
        let mut seen = 0u32;
        loop {
            // Wait for a new pass.
            let t0 = Instant::now();
            let mut spins = 0u32;
            let pass = loop {
                let p = (sh.state.load(Acquire) >> 32) as u32;
                if p != seen {
                    break p;
                }
                if sh.stop.load(Relaxed) {
                    return;
                }
                spins += 1;
                if !spins.is_multiple_of(64) {
                    std::hint::spin_loop();
                    continue;
                }
                let waited = t0.elapsed();
                if waited < SPIN {
                    std::hint::spin_loop();
                } else if waited < YIELD {
                    std::thread::yield_now();
                } else {
                    sh.parked[id].store(true, SeqCst);
                    if (sh.state.load(SeqCst) >> 32) as u32 == seen && !sh.stop.load(SeqCst) {
                        std::thread::park();
                    }
                    sh.parked[id].store(false, SeqCst);
                }
            };
            seen = pass;
            // Join it unless it is already closed.
            let mut s = sh.state.load(Acquire);
            while (s >> 32) as u32 == pass && s & CLOSED == 0 {
                match sh.state.compare_exchange_weak(s, s + 1, AcqRel, Acquire) {
                    Ok(_) => {
                        // SAFETY: joined an open pass: its job stays valid until we leave.
                        let job = unsafe { (*sh.job.get()).expect("an open pass has a job") };
                        if catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() })).is_err() {
                            sh.panicked.store(true, SeqCst);
                        }
                        sh.left.fetch_add(1, Release);
                        break;
                    }
                    Err(now) => s = now,
                }
            }
        }
    }

    impl Drop for Pool {
        fn drop(&mut self) {
            self.shared.stop.store(true, SeqCst);
            for w in &self.workers {
                w.thread().unpark();
            }
            for w in self.workers.drain(..) {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::simd;

    /// The vector rounding to `f16` equals the scalar one (round to nearest, ties to even) on
    /// ties, subnormals, overflow, infinities and NaN, and on values between.
    #[test]
    fn f16_rounding_rounds_to_nearest_even() {
        let mut x: Vec<f32> = vec![
            1.0 + 2f32.powi(-11),       // a tie: down to 1.0 (even)
            1.0 + 3.0 * 2f32.powi(-11), // a tie: up to 1 + 2^-9
            6.0e-8,                     // a subnormal f16
            1.0e-9,                     // underflows to 0
            65520.0,                    // overflows to infinity
            -65519.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let mut rng = forge_rng::SplitMix64::new(7);
        x.extend((0..997).map(|_| (rng.next_f64() as f32 - 0.5) * 2f32.powi((rng.next_u64() % 40) as i32 - 20)));
        let want: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let mut got = x.clone();
        simd::round_f16(&mut got);
        assert_eq!(got[0], 1.0);
        assert_eq!(got[1], 1.0 + 2f32.powi(-9));
        assert_eq!(got[4], f32::INFINITY);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{}: {g} vs {w}", x[i]);
        }
        let mut nan = [f32::NAN; 8];
        simd::round_f16(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
    }
}
