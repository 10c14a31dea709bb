//! [`QModel`]: a GGUF model in memory, and loading it. The file's header is parsed once
//! (`forge_gguf`), then each tensor's bytes are read once and kept as the kernels want them.

use std::io::BufReader;
use std::path::Path;
use std::time::Instant;

use forge_gguf::{GgmlType, Gguf, TensorInfo};
use forge_model::{Arch, ModelConfig, Tokenizer};

use crate::matmul::{Kernels, Mat};
use crate::{InferError, PAR_MIN_WORK, Result, default_threads, pool};

/// The weights of one transformer layer.
pub(crate) struct Block {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) q: Mat,
    pub(crate) k: Mat,
    pub(crate) v: Mat,
    pub(crate) o: Mat,
    pub(crate) q_bias: Option<Vec<f32>>,
    pub(crate) k_bias: Option<Vec<f32>>,
    pub(crate) v_bias: Option<Vec<f32>>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: Mat,
    pub(crate) up: Mat,
    pub(crate) down: Mat,
    /// Gemma 3: RMSNorm of each query and key head, of the attention output and of the FFN
    /// output.
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) post_attn_norm: Option<Vec<f32>>,
    pub(crate) post_ffn_norm: Option<Vec<f32>>,
    /// Gemma 3's sliding-window layers: attend to this many positions (the token's own
    /// included), with the local RoPE base.
    pub(crate) window: Option<usize>,
}

impl Block {
    /// The weight of a projection an adapter may change.
    pub(crate) fn projection(&self, p: crate::adapter::Proj) -> &Mat {
        use crate::adapter::Proj;
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }
}

/// A GGUF model ready to generate.
pub struct QModel {
    pub cfg: ModelConfig,
    pub tokenizer: Tokenizer,
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Vec<f32>,
    pub(crate) output: Mat,
    /// RoPE angles per position: `[max_positions][head_dim / 2]`; Gemma 3's sliding-window
    /// layers use the local ones.
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    pub(crate) cos_local: Vec<f32>,
    pub(crate) sin_local: Vec<f32>,
    /// Adjacent pairs rotate (llama's permuted Q/K) rather than halves (qwen2).
    pub(crate) interleaved: bool,
    pub(crate) kernels: Kernels,
    pub(crate) pool: pool::Pool,
    /// Passes of fewer multiply-adds run on the calling thread alone.
    pub(crate) par_min_work: usize,
    /// Bytes of weights held in memory.
    bytes: usize,
    /// Seconds it took to load.
    pub load_s: f64,
}

impl QModel {
    /// Loads a GGUF file, for the best kernels this CPU runs ([`Kernels::best`]).
    pub fn load(path: &Path) -> Result<QModel> {
        QModel::load_with(path, Kernels::best())
    }

    /// Loads a GGUF file for `kernels` (at most what this CPU runs).
    pub fn load_with(path: &Path, kernels: Kernels) -> Result<QModel> {
        QModel::load_reserving(path, kernels, &mut |_| Ok(()))
    }

    /// [`QModel::load_with`], first asking `reserve` for the most memory the load will hold at
    /// once (its [`load_peak`], known from the header before any tensor is read); an error from
    /// `reserve` ends the load before it allocates.
    pub fn load_reserving(
        path: &Path,
        kernels: Kernels,
        reserve: &mut dyn FnMut(u64) -> std::result::Result<(), String>,
    ) -> Result<QModel> {
        let kernels = kernels.min(Kernels::cpu());
        let t0 = Instant::now();
        let file = forge_gguf::format::open_file(path)?;
        let mut r = BufReader::with_capacity(1 << 16, file);
        let gguf = forge_gguf::format::read(&mut r).map_err(|e| e.in_file(path))?;
        let cfg = forge_gguf::load::config(&gguf)?;
        reserve(load_peak(&gguf, &cfg, kernels)).map_err(InferError::Memory)?;
        let tokenizer_bytes = forge_gguf::tokenizer::memory_estimate(&gguf) as usize;
        let tokenizer = forge_gguf::tokenizer::tokenizer(&gguf)?;
        let gemma = cfg.arch == Arch::Gemma3;
        let mut tensors = Tensors { gguf: &gguf, r, bytes: 0 };
        let mut embed = tensors.embedding("token_embd.weight", cfg.hidden, cfg.vocab)?;
        let norm = tensors.vector("output_norm.weight", cfg.hidden)?;
        let output = match gguf.tensor("output.weight") {
            Some(_) => tensors.matrix("output.weight", kernels)?,
            None => {
                // A tied head: the embedding table laid out for the kernels. Where that layout
                // gives rows back (q8_0, the 16-bit types, k-quants, candle's blocks), it is the
                // only copy: the embeddings are read from it.
                let data = if Mat::gives_rows(embed.ty, kernels) {
                    tensors.bytes -= embed.data.len();
                    embed.tied = true;
                    std::mem::take(&mut embed.data)
                } else {
                    embed.data.clone()
                };
                let mat = Mat::new(embed.ty, cfg.vocab, cfg.hidden, data, kernels)?;
                tensors.bytes += mat.bytes();
                mat
            }
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let mut mm = |n: &str| tensors.matrix(&format!("blk.{l}.{n}.weight"), kernels);
            let (q, k, v, o) = (mm("attn_q")?, mm("attn_k")?, mm("attn_v")?, mm("attn_output")?);
            let (gate, up, down) = (mm("ffn_gate")?, mm("ffn_up")?, mm("ffn_down")?);
            let mut v1 = |n: &str, len: usize| tensors.vector(&format!("blk.{l}.{n}"), len);
            let (qw, kw) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
            let (q_bias, k_bias, v_bias) = if cfg.qkv_bias {
                (Some(v1("attn_q.bias", qw)?), Some(v1("attn_k.bias", kw)?), Some(v1("attn_v.bias", kw)?))
            } else {
                (None, None, None)
            };
            let (q_norm, k_norm, post_attn_norm, post_ffn_norm) = if gemma {
                (
                    Some(v1("attn_q_norm.weight", cfg.head_dim)?),
                    Some(v1("attn_k_norm.weight", cfg.head_dim)?),
                    Some(v1("post_attention_norm.weight", cfg.hidden)?),
                    Some(v1("post_ffw_norm.weight", cfg.hidden)?),
                )
            } else {
                (None, None, None, None)
            };
            // Gemma 3: every 6th layer global, the others sliding.
            let window = cfg.gemma.as_ref().filter(|g| g.is_sliding(l)).map(|g| g.sliding_window);
            blocks.push(Block {
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                window,
                attn_norm: v1("attn_norm.weight", cfg.hidden)?,
                ffn_norm: v1("ffn_norm.weight", cfg.hidden)?,
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
            return Err(InferError::Model(format!("{}: tensor shapes do not match the config", path.display())));
        }
        // RoPE angles, divided by the file's frequency factors if it has them.
        let factors = match gguf.tensor("rope_freqs.weight") {
            Some(_) => Some(tensors.vector("rope_freqs.weight", cfg.head_dim / 2)?),
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
        let bytes = tensors.bytes + 4 * (cos.len() + sin.len() + cos_local.len() + sin_local.len()) + tokenizer_bytes;
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
            bytes,
            load_s: t0.elapsed().as_secs_f64(),
        })
    }

    /// Bytes this model holds in memory while idle: its weights as the kernels lay them out, the
    /// RoPE tables and the tokenizer (estimated, [`forge_gguf::tokenizer::memory_estimate`]).
    /// What a sequence adds while it runs is [`QModel::sequence_bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes of KV cache a position takes: keys and values of every layer, as `f16`.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.blocks.len() * self.cfg.kv_heads * self.cfg.head_dim * 2 * 2
    }

    /// Bytes a sequence holds while it runs: the KV cache of `positions` positions (its prompt
    /// and answer), its logits, and the activations of its `prompt`-token first pass.
    pub fn sequence_bytes(&self, prompt: usize, positions: usize) -> usize {
        let c = &self.cfg;
        let (qw, kw, ffn) = (c.heads * c.head_dim, c.kv_heads * c.head_dim, self.blocks.first().map_or(0, |b| b.up.n));
        // x, h, q, k, v, att, gate, up and down's input in f32, plus its quantized copy.
        let rows = prompt * (4 * (2 * c.hidden + 2 * qw + 2 * kw + 3 * ffn) + ffn.max(c.hidden) * 2);
        positions.min(c.max_positions) * self.kv_bytes_per_position() + rows + 8 * self.output.n
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
}

/// The most memory loading `gguf` holds at once: every tensor as read (a tied head that the
/// kernels cannot read rows from keeps the table twice), the largest tensor once more (read
/// while its repacked copy is made), the RoPE tables, the tokenizer, and the parsed header
/// (about five times its bytes: every array element is a value of its own).
pub fn load_peak(gguf: &Gguf, cfg: &ModelConfig, kernels: Kernels) -> u64 {
    let tensors: u64 = gguf.tensors.iter().map(|t| t.bytes).sum();
    let largest = gguf.tensors.iter().map(|t| t.bytes).max().unwrap_or(0);
    let tied = match (gguf.tensor("output.weight"), gguf.tensor("token_embd.weight")) {
        (None, Some(e)) if !Mat::gives_rows(e.ty, kernels.min(Kernels::cpu())) => e.bytes,
        _ => 0,
    };
    let tables = if cfg.arch == Arch::Gemma3 { 2 } else { 1 };
    let rope = (tables * 4 * cfg.max_positions * cfg.head_dim) as u64;
    tensors + largest + tied + rope + forge_gguf::tokenizer::memory_estimate(gguf) + 5 * gguf.data_start
}

/// A model's token embeddings, kept in the file's type and decoded a row at a time.
pub(crate) struct Embedding {
    pub(crate) ty: GgmlType,
    /// The table as the file has it (empty when `tied`).
    pub(crate) data: Vec<u8>,
    pub(crate) hidden: usize,
    row_bytes: usize,
    /// The rows come from the output matrix (a tied head).
    pub(crate) tied: bool,
}

impl Embedding {
    /// The embeddings of `ids` (checked against the vocabulary), one row of `hidden` each.
    pub(crate) fn rows(&self, ids: &[u32], output: &Mat) -> Result<Vec<f32>> {
        let mut x = vec![0f32; ids.len() * self.hidden];
        for (&id, row) in ids.iter().zip(x.chunks_exact_mut(self.hidden)) {
            if self.tied {
                output.row_into(id as usize, row)?;
            } else {
                let bytes = &self.data[id as usize * self.row_bytes..][..self.row_bytes];
                forge_gguf::quant::dequantize_into(self.ty, bytes, row)?;
            }
        }
        Ok(x)
    }
}

/// Reads a file's tensors, checking each one's type and shape.
struct Tensors<'a, R> {
    gguf: &'a Gguf,
    r: R,
    /// Bytes read so far that the model keeps.
    bytes: usize,
}

impl<R: std::io::Read + std::io::Seek> Tensors<'_, R> {
    fn info(&self, name: &str) -> Result<TensorInfo> {
        self.gguf.tensor(name).cloned().ok_or_else(|| InferError::Model(format!("the file has no tensor `{name}`")))
    }

    fn read(&mut self, t: &TensorInfo) -> Result<Vec<u8>> {
        Ok(self.gguf.tensor_bytes(&mut self.r, t)?)
    }

    /// A 2-D weight `[n][k]` for the kernels.
    fn matrix(&mut self, name: &str, kernels: Kernels) -> Result<Mat> {
        let t = self.info(name)?;
        let [n, k] = t.shape[..] else {
            return Err(InferError::Model(format!("tensor `{name}` has shape {:?}, not a matrix", t.shape)));
        };
        let data = self.read(&t)?;
        let mat =
            Mat::new(t.ty, n, k, data, kernels).map_err(|e| InferError::Model(format!("tensor `{name}`: {e}")))?;
        self.bytes += mat.bytes();
        Ok(mat)
    }

    /// A 1-D tensor of `len` values (a norm's weights, a bias) as `f32`.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.info(name)?;
        if t.elements() != len {
            return Err(InferError::Model(format!("tensor `{name}` has {} values, not {len}", t.elements())));
        }
        let data = self.read(&t)?;
        let mut v = vec![0f32; len];
        forge_gguf::quant::dequantize_into(t.ty, &data, &mut v)?;
        self.bytes += 4 * len;
        Ok(v)
    }

    /// The `[vocab][hidden]` embedding table.
    fn embedding(&mut self, name: &str, hidden: usize, vocab: usize) -> Result<Embedding> {
        let t = self.info(name)?;
        if t.shape != [vocab, hidden] {
            return Err(InferError::Model(format!("tensor `{name}` has shape {:?}, not [{vocab}, {hidden}]", t.shape)));
        }
        let row_bytes = t.ty.bytes_for(&[hidden])?;
        let data = self.read(&t)?;
        self.bytes += data.len();
        Ok(Embedding { ty: t.ty, data, hidden, row_bytes, tied: false })
    }
}
