//! forge's llama-family decoder, written with plain candle tensor ops so that every operation
//! has a gradient.
//!
//! It follows Hugging Face transformers' `modeling_llama.py` (`LlamaRMSNorm`,
//! `LlamaRotaryEmbedding` incl. `_compute_llama3_parameters`, `apply_rotary_pos_emb` with
//! `rotate_half`, `repeat_kv`, eager attention, `LlamaMLP`) and `modeling_qwen2.py` (the same
//! block with biases on q/k/v), so a checkpoint computes the same logits here as there (tested
//! against logits recorded from transformers: `tests/parity.rs`, `scripts/reference_logits.py`).
//!
//! Gemma 3 (`modeling_gemma3.py`, llama.cpp's `gemma3` graph) is the same skeleton with:
//! embeddings times √H; RMSNorm on every query and key head before RoPE; RMSNorms after
//! attention and after the FFN, before each residual add; `down(gelu_tanh(gate(x)) · up(x))`;
//! scores scaled by `query_pre_attn_scalar^-1/2`; sliding-window layers (a token sees the last
//! `sliding_window` positions) with RoPE base `rope_local_theta`, every `sliding_pattern`-th
//! layer global with `rope_theta`. Norm weights follow llama.cpp's convention — the multiplier
//! itself, i.e. transformers' `1 + weight` (converted at the Hugging Face boundary, [`crate::io`]).
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope*` are deliberately not used:
//! they have no backward pass, and gradients silently stop at them (candle #2168, #3568).
//!
//! Shapes: B batch, T new tokens, S attended tokens (past + new), H hidden, V vocabulary,
//! nh query heads, nkv key/value heads, hd head dimension.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::Arch;
use crate::config::{ModelConfig, RopeScaling};
use crate::kernels::{cross_entropy, frozen_matmul, gelu_mul, masked_softmax, rms_norm, rope, silu_mul};
use crate::lora::LoraPair;
use crate::{ModelError, Result};

/// A linear layer `y = x Wᵀ + b`, optionally with a LoRA update `+ s · dropout(x) Aᵀ Bᵀ`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`, as stored by PyTorch.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias, lora: None }
    }

    /// `x`: `[N, in]` → `[N, out]`. A frozen weight's gradient is never computed. `key` names the
    /// layer's dropout mask ([`dropout_key`]).
    pub fn forward(&self, x: &Tensor, dropout: &Dropout, key: u64) -> Result<Tensor> {
        let mut y = if self.weight.track_op() { x.matmul(&self.weight.t()?)? } else { frozen_matmul(x, &self.weight)? };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xd = dropout.apply(x, l.dropout, key)?;
            let update = xd.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + update.affine(l.scale, 0.0)?)?;
        }
        Ok(y)
    }
}

/// Inverted dropout on LoRA inputs, with masks drawn from forge's deterministic RNG, so that a
/// training run is reproducible and a resumed run draws exactly the masks the uninterrupted one
/// would have. Each mask is keyed by (step seed, [`dropout_key`]): it does not depend on the order
/// the layers run in, so the training engine draws the same masks as this model.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    seed: Option<u64>,
}

/// The key of the dropout mask on the input of module `module` (an index into
/// [`Block::linears`]) of layer `layer`.
pub fn dropout_key(layer: usize, module: usize) -> u64 {
    (layer as u64) << 8 | module as u64
}

impl Dropout {
    /// No dropout (evaluation, inference).
    pub fn off() -> Dropout {
        Dropout { seed: None }
    }

    /// Training dropout seeded for one step.
    pub fn seeded(seed: u64) -> Dropout {
        Dropout { seed: Some(seed) }
    }

    /// The mask for `len` inputs under key `key`: 0 for a dropped input, `1/(1-p)` for a kept
    /// one; `None` when nothing is dropped. Each input is dropped when a 16-bit uniform draw is
    /// below `p · 2¹⁶`; draws come four to a 64-bit number, from one stream per 4,096 inputs (so
    /// the mask is built in parallel and is the same on any number of threads).
    pub fn mask(&self, key: u64, len: usize, p: f32) -> Option<Vec<f32>> {
        use rayon::prelude::*;
        const CHUNK: usize = 4096;
        let seed = self.seed?;
        if p <= 0.0 {
            return None;
        }
        let stream = forge_rng::hash64(&[&seed.to_le_bytes(), &key.to_le_bytes()]);
        let keep = 1.0 / (1.0 - p);
        let threshold = (p as f64 * 65536.0).round() as u32;
        let mut mask = vec![0f32; len];
        mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let mut rng =
                forge_rng::SplitMix64::new(forge_rng::hash64(&[&stream.to_le_bytes(), &(c as u64).to_le_bytes()]));
            for quad in chunk.chunks_mut(4) {
                let r = rng.next_u64();
                for (i, v) in quad.iter_mut().enumerate() {
                    *v = if ((r >> (16 * i)) & 0xffff) < threshold as u64 { 0.0 } else { keep };
                }
            }
        });
        Some(mask)
    }

    fn apply(&self, x: &Tensor, p: f32, key: u64) -> Result<Tensor> {
        match self.mask(key, x.elem_count(), p) {
            None => Ok(x.clone()),
            Some(mask) => Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?),
        }
    }
}

/// Gemma 3's extra norms in a layer.
#[derive(Clone, Debug)]
pub struct GemmaNorms {
    /// `[hd]`, on every query head and every key head (before RoPE).
    pub q_norm: Tensor,
    pub k_norm: Tensor,
    /// `[H]`, on the attention output and the FFN output, before the residual add.
    pub attn_out: Tensor,
    pub ffn_out: Tensor,
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Block {
    /// Before attention (`input_layernorm`).
    pub input_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Before the FFN (llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    pub post_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub gemma: Option<GemmaNorms>,
}

impl Block {
    /// The linear layers by their Hugging Face module name (`q_proj`, ..., `down_proj`).
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("q_proj", &mut self.q),
            ("k_proj", &mut self.k),
            ("v_proj", &mut self.v),
            ("o_proj", &mut self.o),
            ("gate_proj", &mut self.gate),
            ("up_proj", &mut self.up),
            ("down_proj", &mut self.down),
        ]
    }

    /// A norm by its [`norm_names`] field.
    pub fn norm(&self, field: &str) -> &Tensor {
        let g = self.gemma.as_ref();
        match field {
            "input" => &self.input_norm,
            "post" => &self.post_norm,
            "q_norm" => &g.expect("a gemma block").q_norm,
            "k_norm" => &g.expect("a gemma block").k_norm,
            "attn_out" => &g.expect("a gemma block").attn_out,
            "ffn_out" => &g.expect("a gemma block").ffn_out,
            other => panic!("no norm `{other}`"),
        }
    }

    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("q_proj", &self.q),
            ("k_proj", &self.k),
            ("v_proj", &self.v),
            ("o_proj", &self.o),
            ("gate_proj", &self.gate),
            ("up_proj", &self.up),
            ("down_proj", &self.down),
        ]
    }
}

/// The Hugging Face names of a layer's norms, with the [`Block`] field each fills:
/// `(field, name)`, in a stable order.
pub fn norm_names(arch: Arch, layer: usize) -> Vec<(&'static str, String)> {
    let p = |n: &str| format!("model.layers.{layer}.{n}.weight");
    match arch {
        Arch::Llama | Arch::Qwen2 => {
            vec![("input", p("input_layernorm")), ("post", p("post_attention_layernorm"))]
        }
        Arch::Gemma3 => vec![
            ("input", p("input_layernorm")),
            ("attn_out", p("post_attention_layernorm")),
            ("post", p("pre_feedforward_layernorm")),
            ("ffn_out", p("post_feedforward_layernorm")),
            ("q_norm", p("self_attn.q_norm")),
            ("k_norm", p("self_attn.k_norm")),
        ],
    }
}

/// The module path of a linear layer in a Hugging Face checkpoint.
pub fn module_path(layer: usize, module: &str) -> String {
    let group = if matches!(module, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{module}")
}

/// Where the tokens of a batch sit: their positions, and which sequence each belongs to.
///
/// `segments[i] == 0` marks padding. A token attends to earlier tokens of its own segment only,
/// which is what makes packing several samples into one row correct; positions restart at 0 in
/// every segment.
#[derive(Clone, Debug)]
pub struct Layout {
    pub batch: usize,
    pub len: usize,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
}

impl Layout {
    /// One unpadded sequence per row, positions 0..len.
    pub fn dense(batch: usize, len: usize) -> Layout {
        Layout {
            batch,
            len,
            positions: (0..batch).flat_map(|_| 0..len as u32).collect(),
            segments: vec![1; batch * len],
        }
    }

    /// The additive attention mask `[B, 1, T, T]`: 0 where attention is allowed, a large
    /// negative number elsewhere. A padding token attends only to itself (its loss weight is 0),
    /// so no row is all masked. With a `window`, a token sees only the last `window` positions
    /// of its segment (itself included).
    fn mask(&self, window: Option<usize>, device: &Device, dtype: DType) -> Result<Tensor> {
        let (b, t) = (self.batch, self.len);
        let window = window.unwrap_or(usize::MAX);
        let mut m = vec![0f32; b * t * t];
        for r in 0..b {
            let seg = &self.segments[r * t..(r + 1) * t];
            for i in 0..t {
                for j in 0..t {
                    let ok = if seg[i] == 0 { i == j } else { j <= i && seg[j] == seg[i] && i - j < window };
                    if !ok {
                        m[(r * t + i) * t + j] = MASKED;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, t), device)?.to_dtype(dtype)?)
    }
}

/// The attention masks of one forward pass: global, and for Gemma the sliding window's.
struct Masks {
    global: Tensor,
    local: Option<Tensor>,
}

/// A masked score: far below any real one, but finite so that softmax stays exact.
const MASKED: f32 = -1e9;

/// Keys and values of the tokens seen so far, per layer, for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Precomputed RoPE angles: `cos`/`sin` of `position · inv_freq`, `[max_positions, hd/2]`.
#[derive(Clone, Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// The RoPE tables of a model: one, or Gemma's global and sliding-window pair.
#[derive(Clone, Debug)]
struct Ropes {
    global: Rope,
    local: Option<Rope>,
}

/// The inverse frequencies of RoPE, with Llama 3's or linear scaling applied
/// (transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`).
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Positions the RoPE tables cover at most (a model may claim a longer context; a sequence past
/// this is refused, not allocated for).
pub const ROPE_TABLE_MAX: usize = 32_768;

/// The positions a model's RoPE tables cover.
pub fn rope_positions(cfg: &ModelConfig) -> usize {
    cfg.max_positions.min(ROPE_TABLE_MAX)
}

impl Rope {
    fn new(inv: Vec<f64>, cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<Rope> {
        let n = rope_positions(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                // The angle is rounded to f32 as transformers computes it (`inv_freq @ positions`
                // in float32); its cosine and sine are then exact to f32.
                let a = (p as f32 * *f as f32) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let table = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (n, half), device)?.to_dtype(dtype)?) };
        Ok(Rope { cos: table(cos)?, sin: table(sin)? })
    }

    fn tables(cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<Ropes> {
        let global = Rope::new(inv_freq(cfg), cfg, device, dtype)?;
        let local = match &cfg.gemma {
            Some(g) => {
                let local_cfg = ModelConfig { rope_theta: g.rope_local_theta, rope_scaling: None, ..cfg.clone() };
                Some(Rope::new(inv_freq(&local_cfg), cfg, device, dtype)?)
            }
            None => None,
        };
        Ok(Ropes { global, local })
    }

    /// `cos`, `sin` for the given positions, `[B, 1, T, hd]` (the half table repeated, as
    /// transformers' `emb = cat(freqs, freqs)`).
    fn at(&self, positions: &[u32], b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::new(positions, self.cos.device())?;
        let pick = |table: &Tensor| -> Result<Tensor> {
            let half = table.index_select(&idx, 0)?;
            Ok(Tensor::cat(&[&half, &half], 1)?.reshape((b, 1, t, ()))?)
        };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

/// `[B, nkv, S, hd]` → `[B, nkv·n, S, hd]`, each key/value head repeated for its `n` query heads.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, kv, n, s, hd))?.reshape((b, kv * n, s, hd))?)
}

/// The model: embeddings, decoder layers, final norm and LM head.
#[derive(Clone, Debug)]
pub struct Llama {
    pub cfg: ModelConfig,
    /// `[V, H]`.
    pub embed: Tensor,
    pub layers: Vec<Block>,
    pub norm: Tensor,
    /// `[V, H]`; `None` when tied to the embeddings.
    pub lm_head: Option<Tensor>,
    rope: Ropes,
}

impl Llama {
    /// Builds the model from Hugging Face tensor names (`model.embed_tokens.weight`, ...),
    /// checking that every tensor is present with the shape the config implies.
    pub fn from_tensors(cfg: ModelConfig, t: HashMap<String, Tensor>, device: &Device) -> Result<Llama> {
        Self::from_tensors_as(cfg, t, device, DType::F32)
    }

    /// [`from_tensors`](Self::from_tensors) computing in `dtype` (F64 for gradient checks).
    pub fn from_tensors_as(
        cfg: ModelConfig,
        mut t: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Llama> {
        let (h, i, hd) = (cfg.hidden, cfg.intermediate, cfg.head_dim);
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let x = t.remove(&name).ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            if x.dims() != shape {
                return Err(ModelError::Shape { name, expected: shape.to_vec(), found: x.dims().to_vec() });
            }
            Ok(x.to_dtype(dtype)?)
        };
        let embed = take("model.embed_tokens.weight".into(), &[cfg.vocab, h])?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = |m: &str| format!("{}.weight", module_path(l, m));
            let bias = |take: &mut dyn FnMut(String, &[usize]) -> Result<Tensor>,
                        m: &str,
                        n: usize|
             -> Result<Option<Tensor>> {
                if cfg.qkv_bias { Ok(Some(take(format!("{}.bias", module_path(l, m)), &[n])?)) } else { Ok(None) }
            };
            let q_bias = bias(&mut take, "q_proj", cfg.heads * hd)?;
            let k_bias = bias(&mut take, "k_proj", cfg.kv_heads * hd)?;
            let v_bias = bias(&mut take, "v_proj", cfg.kv_heads * hd)?;
            let mut norms = HashMap::new();
            for (field, name) in norm_names(cfg.arch, l) {
                let len = if field.ends_with("_norm") { hd } else { h };
                norms.insert(field, take(name, &[len])?);
            }
            let mut norm = |field: &str| norms.remove(field).expect("norm_names lists it");
            let gemma = match cfg.arch {
                Arch::Gemma3 => Some(GemmaNorms {
                    q_norm: norm("q_norm"),
                    k_norm: norm("k_norm"),
                    attn_out: norm("attn_out"),
                    ffn_out: norm("ffn_out"),
                }),
                Arch::Llama | Arch::Qwen2 => None,
            };
            layers.push(Block {
                input_norm: norm("input"),
                q: Linear::new(take(p("q_proj"), &[cfg.heads * hd, h])?, q_bias),
                k: Linear::new(take(p("k_proj"), &[cfg.kv_heads * hd, h])?, k_bias),
                v: Linear::new(take(p("v_proj"), &[cfg.kv_heads * hd, h])?, v_bias),
                o: Linear::new(take(p("o_proj"), &[h, cfg.heads * hd])?, None),
                post_norm: norm("post"),
                gate: Linear::new(take(p("gate_proj"), &[i, h])?, None),
                up: Linear::new(take(p("up_proj"), &[i, h])?, None),
                down: Linear::new(take(p("down_proj"), &[h, i])?, None),
                gemma,
            });
        }
        let norm = take("model.norm.weight".into(), &[h])?;
        let lm_head = if cfg.tie_embeddings {
            t.remove("lm_head.weight");
            None
        } else {
            Some(take("lm_head.weight".into(), &[cfg.vocab, h])?)
        };
        // Rotary tables some checkpoints carry are recomputed from the config.
        t.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if let Some(extra) = t.keys().min() {
            return Err(ModelError::UnexpectedTensor(extra.clone()));
        }
        if cfg.arch == Arch::Gemma3 && cfg.gemma.is_none() {
            return Err(ModelError::Config("a gemma3 config without its gemma parameters".into()));
        }
        let rope = Rope::tables(&cfg, device, dtype)?;
        Ok(Llama { cfg, embed, layers, norm, lm_head, rope })
    }

    /// Every weight by its Hugging Face name (LoRA pairs not included).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.layers.iter().enumerate() {
            for (field, name) in norm_names(self.cfg.arch, l) {
                out.push((name, b.norm(field).clone()));
            }
            for (m, lin) in b.linears() {
                out.push((format!("{}.weight", module_path(l, m)), lin.weight.clone()));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{}.bias", module_path(l, m)), bias.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    /// A randomly initialised model from forge's deterministic RNG: weights ~ N(0, 1/H) (H the
    /// hidden size; transformers' `initializer_range` set to 1/√H rather than 0.02), norms 1,
    /// biases 0. At this scale the tied embedding gives logits of unit size at initialisation
    /// and leaves a frozen base enough range for LoRA to fit a task on it.
    pub fn random(cfg: ModelConfig, seed: u64, device: &Device) -> Result<Llama> {
        let mut t = HashMap::new();
        let mut rng = forge_rng::SplitMix64::new(seed);
        let (h, i, hd) = (cfg.hidden, cfg.intermediate, cfg.head_dim);
        let std = 1.0 / (h as f64).sqrt();
        let mut normal = |shape: &[usize]| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| (rng.next_normal() * std) as f32).collect();
            Ok(Tensor::from_vec(v, shape, device)?)
        };
        t.insert("model.embed_tokens.weight".to_string(), normal(&[cfg.vocab, h])?);
        for l in 0..cfg.layers {
            for (m, shape) in [
                ("q_proj", [cfg.heads * hd, h]),
                ("k_proj", [cfg.kv_heads * hd, h]),
                ("v_proj", [cfg.kv_heads * hd, h]),
                ("o_proj", [h, cfg.heads * hd]),
                ("gate_proj", [i, h]),
                ("up_proj", [i, h]),
                ("down_proj", [h, i]),
            ] {
                t.insert(format!("{}.weight", module_path(l, m)), normal(&shape)?);
                if cfg.qkv_bias && matches!(m, "q_proj" | "k_proj" | "v_proj") {
                    t.insert(format!("{}.bias", module_path(l, m)), Tensor::zeros(shape[0], DType::F32, device)?);
                }
            }
            for (field, name) in norm_names(cfg.arch, l) {
                let len = if field.ends_with("_norm") { hd } else { h };
                t.insert(name, Tensor::ones(len, DType::F32, device)?);
            }
        }
        t.insert("model.norm.weight".to_string(), Tensor::ones(h, DType::F32, device)?);
        if !cfg.tie_embeddings {
            t.insert("lm_head.weight".to_string(), normal(&[cfg.vocab, h])?);
        }
        Llama::from_tensors(cfg, t, device)
    }

    /// The same model with every weight a trainable variable (full fine-tuning); returns the
    /// variables by Hugging Face name. The variables share storage with the model's tensors,
    /// so an optimizer updating them updates the model.
    pub fn trainable(&self) -> Result<(Llama, Vec<(String, Var)>)> {
        let mut vars = Vec::new();
        let mut tensors = HashMap::new();
        for (name, t) in self.tensors() {
            let v = Var::from_tensor(&t.detach())?;
            tensors.insert(name.clone(), v.as_tensor().clone());
            vars.push((name, v));
        }
        let mut model = Llama::from_tensors_as(self.cfg.clone(), tensors, self.device(), self.dtype())?;
        // LoRA pairs, if any, stay as they are.
        for (dst, src) in model.layers.iter_mut().zip(&self.layers) {
            for ((_, d), (_, s)) in dst.linears_mut().into_iter().zip(src.linears()) {
                d.lora = s.lora.clone();
            }
        }
        Ok((model, vars))
    }

    /// Frees the frozen weights (every tensor but the LoRA pairs), once a training engine holds
    /// its own copy: the model keeps its config and its LoRA pairs (what training reads and
    /// saves) but can no longer run.
    pub fn release_frozen(&mut self) -> Result<()> {
        let empty = Tensor::zeros(0, self.dtype(), self.device())?;
        let release = |t: &mut Tensor| {
            if !t.track_op() {
                *t = empty.clone();
            }
        };
        release(&mut self.embed);
        release(&mut self.norm);
        if let Some(h) = self.lm_head.as_mut() {
            release(h);
        }
        for b in &mut self.layers {
            release(&mut b.input_norm);
            release(&mut b.post_norm);
            if let Some(g) = b.gemma.as_mut() {
                for t in [&mut g.q_norm, &mut g.k_norm, &mut g.attn_out, &mut g.ffn_out] {
                    release(t);
                }
            }
            for (_, lin) in b.linears_mut() {
                release(&mut lin.weight);
                if let Some(bias) = lin.bias.as_mut() {
                    release(bias);
                }
            }
        }
        self.rope = Ropes { global: Rope { cos: empty.clone(), sin: empty.clone() }, local: None };
        Ok(())
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Logits `[B, T, V]` for a batch of token ids `[B, T]` laid out by `layout`.
    pub fn forward(&self, ids: &Tensor, layout: &Layout, dropout: &Dropout) -> Result<Tensor> {
        let global = layout.mask(None, self.device(), self.dtype())?;
        let masks = match &self.cfg.gemma {
            Some(g) => Masks { local: Some(layout.mask(Some(g.sliding_window), self.device(), self.dtype())?), global },
            None => Masks { global, local: None },
        };
        self.run(ids, &layout.positions, &masks, None, dropout)
    }

    /// Logits `[1, T, V]` of `ids` `[1, T]` following the tokens already in `cache`, which is
    /// extended with them.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let past = cache.len();
        if past + t > self.cfg.max_positions {
            return Err(ModelError::TooLong { len: past + t, max: self.cfg.max_positions });
        }
        let s = past + t;
        if s > rope_positions(&self.cfg) {
            return Err(ModelError::TooLong { len: s, max: rope_positions(&self.cfg) });
        }
        let mask = |window: usize| -> Result<Tensor> {
            let mut m = vec![0f32; t * s];
            for i in 0..t {
                for j in 0..s {
                    if j > past + i || past + i - j >= window {
                        m[i * s + j] = MASKED;
                    }
                }
            }
            Ok(Tensor::from_vec(m, (1, 1, t, s), self.device())?.to_dtype(self.dtype())?)
        };
        let masks = Masks {
            global: mask(usize::MAX)?,
            local: self.cfg.gemma.as_ref().map(|g| mask(g.sliding_window)).transpose()?,
        };
        let positions: Vec<u32> = (past..s).map(|p| p as u32).collect();
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        self.run(ids, &positions, &masks, Some(cache), &Dropout::off())
    }

    fn run(
        &self,
        ids: &Tensor,
        positions: &[u32],
        masks: &Masks,
        mut cache: Option<&mut KvCache>,
        dropout: &Dropout,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if let Some(&p) = positions.iter().max() {
            let max = rope_positions(&self.cfg);
            if p as usize >= max {
                return Err(ModelError::TooLong { len: p as usize + 1, max });
            }
        }
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let (cos, sin) = self.rope.global.at(positions, b, t)?;
        let local = self.rope.local.as_ref().map(|r| r.at(positions, b, t)).transpose()?;
        let scale = match &cfg.gemma {
            Some(g) => 1.0 / g.query_pre_attn_scalar.sqrt(),
            None => 1.0 / (hd as f64).sqrt(),
        };
        // The residual stream, `[B·T, H]`.
        let mut h = self.embed.index_select(&ids.flatten_all()?, 0)?;
        if cfg.gemma.is_some() {
            h = h.affine((cfg.hidden as f64).sqrt(), 0.0)?;
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let sliding = cfg.gemma.as_ref().is_some_and(|g| g.is_sliding(l));
            let ((cos, sin), mask) = match (&local, sliding) {
                (Some((lc, ls)), true) => ((lc, ls), masks.local.as_ref().expect("gemma has a sliding mask")),
                _ => ((&cos, &sin), &masks.global),
            };
            // Attention.
            let x = rms_norm(&h, &layer.input_norm, cfg.rms_eps)?;
            // `[B·T, n·hd]` → `[B, n, T, hd]`, Gemma's per-head RMSNorm first.
            let heads = |y: Tensor, n: usize, norm: Option<&Tensor>| -> Result<Tensor> {
                let y = match norm {
                    Some(w) => rms_norm(&y.reshape((b * t * n, hd))?, w, cfg.rms_eps)?,
                    None => y,
                };
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let g = layer.gemma.as_ref();
            let key = |m| dropout_key(l, m);
            let q = heads(layer.q.forward(&x, dropout, key(0))?, nh, g.map(|g| &g.q_norm))?;
            let k = heads(layer.k.forward(&x, dropout, key(1))?, nkv, g.map(|g| &g.k_norm))?;
            let v = heads(layer.v.forward(&x, dropout, key(2))?, nkv, None)?;
            let q = rope(&q, cos, sin)?;
            let mut k = rope(&k, cos, sin)?;
            let mut v = v;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &c.layers[l] {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                c.layers[l] = Some((k.clone(), v.clone()));
            }
            let k = repeat_kv(&k, nh / nkv)?;
            let v = repeat_kv(&v, nh / nkv)?;
            let scores = q.matmul(&k.t()?.contiguous()?)?;
            let attn = masked_softmax(&scores, scale, mask)?.matmul(&v)?;
            let attn = attn.transpose(1, 2)?.contiguous()?.reshape((b * t, nh * hd))?;
            let mut a = layer.o.forward(&attn, dropout, key(3))?;
            if let Some(g) = g {
                a = rms_norm(&a, &g.attn_out, cfg.rms_eps)?;
            }
            h = (h + a)?;
            // MLP: down(act(gate(x)) · up(x)), SiLU for llama, GELU (tanh) for Gemma.
            let x = rms_norm(&h, &layer.post_norm, cfg.rms_eps)?;
            let (gate, up) = (layer.gate.forward(&x, dropout, key(4))?, layer.up.forward(&x, dropout, key(5))?);
            let act = if g.is_some() { gelu_mul(&gate, &up)? } else { silu_mul(&gate, &up)? };
            let mut f = layer.down.forward(&act, dropout, key(6))?;
            if let Some(g) = g {
                f = rms_norm(&f, &g.ffn_out, cfg.rms_eps)?;
            }
            h = (h + f)?;
        }
        let h = rms_norm(&h, &self.norm, cfg.rms_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = if head.track_op() { h.matmul(&head.t()?)? } else { frozen_matmul(&h, head)? };
        Ok(logits.reshape((b, t, cfg.vocab))?)
    }
}

/// The weighted mean next-token cross-entropy: `Σ wᵢ · −log p(targetᵢ) / Σ wᵢ`.
///
/// `logits` `[N, V]`, `targets` `N` token ids, `weights` `N` (0 for padding and for prompt
/// tokens when the prompt-loss weight is 0). Returns the loss and the total weight.
pub fn weighted_cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<(Tensor, f64)> {
    let total: f64 = weights.iter().map(|w| *w as f64).sum();
    Ok((cross_entropy(logits, targets, weights, total)?, total))
}
