//! forge's quantized decoder: runs a GGUF llama/qwen2 model as llama.cpp would — weights stay
//! quantized and multiply through candle's quantized matmul (activations quantized to the
//! weight's dot-product type, as ggml does) — with a KV cache, sampling (temperature, top-p,
//! top-k, seed), stop tokens and a token budget, and the student's prompt format from the
//! file's chat template.
//!
//! RoPE follows the file: llama's Q/K rows were interleaved by the converter, so pairs of
//! adjacent dimensions rotate (`rope_i`); qwen2's were not, so halves rotate (`rope`).
//! `rope_freqs.weight` (Llama 3 scaling) divides each pair's frequency.
//!
//! Timings are split as DefameLM reports them: preparation (loading, then the prompt) and the
//! time per generated token.

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{D, DType, Device, Module, Tensor};
use forge_model::generate::{Sampling, sample};
use forge_model::{Arch, ModelConfig, Tokenizer};

use crate::{BenchError, Result};

struct Block {
    attn_norm: Tensor,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// A GGUF model ready to generate.
pub struct QModel {
    pub cfg: ModelConfig,
    pub tokenizer: Tokenizer,
    embed: QTensor,
    blocks: Vec<Block>,
    norm: Tensor,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    /// Adjacent pairs rotate (llama's permuted Q/K) rather than halves (qwen2).
    interleaved: bool,
    /// Seconds it took to load.
    pub load_s: f64,
}

/// Keys and values seen so far, per layer: `[1, nkv, S, hd]`.
#[derive(Default)]
pub struct Cache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
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

impl QModel {
    /// Loads a GGUF file.
    pub fn load(path: &Path) -> Result<QModel> {
        let t0 = Instant::now();
        let ours = forge_gguf::Gguf::open(path)?;
        let cfg = forge_gguf::load::config(&ours)?;
        let tokenizer = forge_gguf::tokenizer::tokenizer(&ours)?;
        let mut f = std::fs::File::open(path).map_err(|e| BenchError::Io(format!("{}: {e}", path.display())))?;
        let content =
            gguf_file::Content::read(&mut f).map_err(|e| BenchError::Model(format!("{}: {e}", path.display())))?;
        let dev = Device::Cpu;
        let mut qt = |name: &str| -> Result<QTensor> {
            content.tensor(&mut f, name, &dev).map_err(|e| BenchError::Model(format!("tensor `{name}`: {e}")))
        };
        let embed = qt("token_embd.weight")?;
        let norm = qt("output_norm.weight")?.dequantize(&dev)?;
        let output = if ours.tensor("output.weight").is_some() {
            QMatMul::from_qtensor(qt("output.weight")?)?
        } else {
            QMatMul::from_qtensor(qt("token_embd.weight")?)?
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let mut mm =
                |n: &str| -> Result<QMatMul> { Ok(QMatMul::from_qtensor(qt(&format!("blk.{l}.{n}.weight"))?)?) };
            let q = mm("attn_q")?;
            let k = mm("attn_k")?;
            let v = mm("attn_v")?;
            let o = mm("attn_output")?;
            let gate = mm("ffn_gate")?;
            let up = mm("ffn_up")?;
            let down = mm("ffn_down")?;
            let mut vec = |n: &str| -> Result<Tensor> { Ok(qt(&format!("blk.{l}.{n}"))?.dequantize(&dev)?) };
            let bias = |n: &str, vec: &mut dyn FnMut(&str) -> Result<Tensor>| -> Result<Option<Tensor>> {
                if cfg.qkv_bias { Ok(Some(vec(n)?)) } else { Ok(None) }
            };
            blocks.push(Block {
                attn_norm: vec("attn_norm.weight")?,
                ffn_norm: vec("ffn_norm.weight")?,
                q_bias: bias("attn_q.bias", &mut vec)?,
                k_bias: bias("attn_k.bias", &mut vec)?,
                v_bias: bias("attn_v.bias", &mut vec)?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        // RoPE angles, divided by the file's frequency factors if it has them.
        let factors: Option<Vec<f32>> = match ours.tensor("rope_freqs.weight") {
            Some(_) => Some(qt("rope_freqs.weight")?.dequantize(&dev)?.to_vec1()?),
            None => None,
        };
        let half = cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(cfg.max_positions * half);
        let mut sin = Vec::with_capacity(cfg.max_positions * half);
        for p in 0..cfg.max_positions {
            for i in 0..half {
                let mut freq = 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32);
                if let Some(f) = &factors {
                    freq /= f[i];
                }
                let a = p as f32 * freq;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (cfg.max_positions, half), &dev)?;
        let sin = Tensor::from_vec(sin, (cfg.max_positions, half), &dev)?;
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
            interleaved,
            load_s: t0.elapsed().as_secs_f64(),
        })
    }

    /// Logits of the last of `ids`, which follow the tokens in `cache` (extended with them).
    pub fn step(&self, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (t, past) = (ids.len(), cache.len);
        if past + t > cfg.max_positions {
            return Err(BenchError::Model(format!("{} tokens exceed the context of {}", past + t, cfg.max_positions)));
        }
        if cache.layers.len() != self.blocks.len() {
            cache.layers = (0..self.blocks.len()).map(|_| None).collect();
        }
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let eps = cfg.rms_eps as f32;
        let dev = Device::Cpu;
        let idx = Tensor::new(ids, &dev)?;
        let mut x = self.embed.embedding(&idx)?; // [T, H]
        let cos = self.cos.narrow(0, past, t)?;
        let sin = self.sin.narrow(0, past, t)?;
        let mask = if t > 1 {
            let s = past + t;
            let m: Vec<f32> =
                (0..t).flat_map(|i| (0..s).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
            Some(Tensor::from_vec(m, (t, s), &dev)?)
        } else {
            None
        };
        for (l, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, eps)?;
            let proj = |m: &QMatMul, bias: &Option<Tensor>, n: usize| -> Result<Tensor> {
                let mut y = m.forward(&h)?;
                if let Some(bias) = bias {
                    y = y.broadcast_add(bias)?;
                }
                Ok(y.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = proj(&b.q, &b.q_bias, nh)?;
            let k = proj(&b.k, &b.k_bias, nkv)?;
            let v = proj(&b.v, &b.v_bias, nkv)?;
            let rope = |x: &Tensor| -> Result<Tensor> {
                Ok(if self.interleaved {
                    candle_nn::rotary_emb::rope_i(x, &cos, &sin)?
                } else {
                    candle_nn::rotary_emb::rope(x, &cos, &sin)?
                })
            };
            let q = rope(&q)?;
            let mut k = rope(&k)?;
            let mut v = v;
            if let Some((pk, pv)) = &cache.layers[l] {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            cache.layers[l] = Some((k.clone(), v.clone()));
            let rep = nh / nkv;
            let (k, v) = if rep > 1 {
                let s = k.dim(2)?;
                let expand = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.unsqueeze(2)?.broadcast_as((1, nkv, rep, s, hd))?.reshape((1, nh, s, hd))?)
                };
                (expand(&k)?, expand(&v)?)
            } else {
                (k, v)
            };
            let mut scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let attn = attn.transpose(1, 2)?.reshape((t, nh * hd))?;
            x = (x + b.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, eps)?;
            let act = (candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?;
            x = (x + b.down.forward(&act)?)?;
        }
        cache.len += t;
        let last = x.narrow(0, t - 1, 1)?;
        let h = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = self.output.forward(&h)?.squeeze(0)?.to_dtype(DType::F32)?;
        Ok(logits.to_vec1()?)
    }

    /// Generates after prompt ids `prompt`, stopping at `stop` or after `s.max_tokens`.
    pub fn generate_ids(&self, prompt: &[u32], stop: &[u32], s: &Sampling) -> Result<(Vec<u32>, f64, f64, bool)> {
        let mut rng = forge_rng::SplitMix64::new(s.seed);
        let mut cache = Cache::default();
        let t0 = Instant::now();
        let mut logits = self.step(prompt, &mut cache)?;
        let prompt_s = t0.elapsed().as_secs_f64();
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
        Ok((out, prompt_s, t1.elapsed().as_secs_f64(), stopped))
    }

    /// The student's answer to `input`, in the file's chat format.
    pub fn generate(&self, input: &str, s: &Sampling) -> Result<Generation> {
        let prompt = self.tokenizer.prompt(None, input)?;
        let ids = self.tokenizer.encode_prompt(&prompt)?;
        let stop: Vec<u32> = self.tokenizer.eos.iter().map(|e| e.1).chain(self.cfg.eos.iter().copied()).collect();
        let (tokens, prompt_s, decode_s, stopped) = self.generate_ids(&ids, &stop, s)?;
        Ok(Generation {
            text: self.tokenizer.decode(&tokens)?,
            tokens: tokens.len(),
            prompt_tokens: ids.len(),
            prompt_s,
            decode_s,
            stopped,
        })
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
}
