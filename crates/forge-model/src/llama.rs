//! forge's llama-family decoder, written with plain candle tensor ops so that every operation
//! has a gradient.
//!
//! It follows Hugging Face transformers' `modeling_llama.py` (`LlamaRMSNorm`,
//! `LlamaRotaryEmbedding` incl. `_compute_llama3_parameters`, `apply_rotary_pos_emb` with
//! `rotate_half`, `repeat_kv`, eager attention, `LlamaMLP`) and `modeling_qwen2.py` (the same
//! block with biases on q/k/v), so a checkpoint computes the same logits here as there (tested
//! against logits recorded from transformers: `tests/parity.rs`, `scripts/reference_logits.py`).
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope*` are deliberately not used:
//! they have no backward pass, and gradients silently stop at them (candle #2168, #3568).
//!
//! Shapes: B batch, T new tokens, S attended tokens (past + new), H hidden, V vocabulary,
//! nh query heads, nkv key/value heads, hd head dimension.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::{ModelConfig, RopeScaling};
use crate::kernels::{cross_entropy, frozen_matmul, masked_softmax, rms_norm, rope, silu_mul};
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

    /// `x`: `[N, in]` → `[N, out]`. A frozen weight's gradient is never computed.
    pub fn forward(&self, x: &Tensor, dropout: &mut Dropout) -> Result<Tensor> {
        let mut y = if self.weight.track_op() { x.matmul(&self.weight.t()?)? } else { frozen_matmul(x, &self.weight)? };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xd = dropout.apply(x, l.dropout)?;
            let update = xd.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + update.affine(l.scale, 0.0)?)?;
        }
        Ok(y)
    }
}

/// Inverted dropout with masks drawn from forge's deterministic RNG, so that a training run is
/// reproducible and a resumed run draws exactly the masks the uninterrupted one would have.
pub struct Dropout {
    rng: Option<forge_rng::SplitMix64>,
}

impl Dropout {
    /// No dropout (evaluation, inference).
    pub fn off() -> Dropout {
        Dropout { rng: None }
    }

    /// Training dropout seeded for one step.
    pub fn seeded(seed: u64) -> Dropout {
        Dropout { rng: Some(forge_rng::SplitMix64::new(seed)) }
    }

    fn apply(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        let Some(rng) = self.rng.as_mut() else { return Ok(x.clone()) };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - p);
        let threshold = (p as f64 * (1u64 << 53) as f64) as u64;
        let mask: Vec<f32> =
            (0..x.elem_count()).map(|_| if (rng.next_u64() >> 11) < threshold { 0.0 } else { keep }).collect();
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?)
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Block {
    pub input_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
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
    /// so no row is all masked.
    fn mask(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let (b, t) = (self.batch, self.len);
        let mut m = vec![0f32; b * t * t];
        for r in 0..b {
            let seg = &self.segments[r * t..(r + 1) * t];
            for i in 0..t {
                for j in 0..t {
                    let ok = if seg[i] == 0 { i == j } else { j <= i && seg[j] == seg[i] };
                    if !ok {
                        m[(r * t + i) * t + j] = MASKED;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, t), device)?.to_dtype(dtype)?)
    }
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

impl Rope {
    fn new(cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<Rope> {
        let inv = inv_freq(cfg);
        let n = cfg.max_positions;
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
    rope: Rope,
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
            layers.push(Block {
                input_norm: take(format!("model.layers.{l}.input_layernorm.weight"), &[h])?,
                q: Linear::new(take(p("q_proj"), &[cfg.heads * hd, h])?, q_bias),
                k: Linear::new(take(p("k_proj"), &[cfg.kv_heads * hd, h])?, k_bias),
                v: Linear::new(take(p("v_proj"), &[cfg.kv_heads * hd, h])?, v_bias),
                o: Linear::new(take(p("o_proj"), &[h, cfg.heads * hd])?, None),
                post_norm: take(format!("model.layers.{l}.post_attention_layernorm.weight"), &[h])?,
                gate: Linear::new(take(p("gate_proj"), &[i, h])?, None),
                up: Linear::new(take(p("up_proj"), &[i, h])?, None),
                down: Linear::new(take(p("down_proj"), &[h, i])?, None),
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
        let rope = Rope::new(&cfg, device, dtype)?;
        Ok(Llama { cfg, embed, layers, norm, lm_head, rope })
    }

    /// Every weight by its Hugging Face name (LoRA pairs not included).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.layers.iter().enumerate() {
            out.push((format!("model.layers.{l}.input_layernorm.weight"), b.input_norm.clone()));
            out.push((format!("model.layers.{l}.post_attention_layernorm.weight"), b.post_norm.clone()));
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
            for n in ["input_layernorm", "post_attention_layernorm"] {
                t.insert(format!("model.layers.{l}.{n}.weight"), Tensor::ones(h, DType::F32, device)?);
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

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Logits `[B, T, V]` for a batch of token ids `[B, T]` laid out by `layout`.
    pub fn forward(&self, ids: &Tensor, layout: &Layout, dropout: &mut Dropout) -> Result<Tensor> {
        let mask = layout.mask(self.device(), self.dtype())?;
        self.run(ids, &layout.positions, &mask, None, dropout)
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
        let mut m = vec![0f32; t * s];
        for i in 0..t {
            for j in past + i + 1..s {
                m[i * s + j] = MASKED;
            }
        }
        let mask = Tensor::from_vec(m, (1, 1, t, s), self.device())?.to_dtype(self.dtype())?;
        let positions: Vec<u32> = (past..s).map(|p| p as u32).collect();
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        self.run(ids, &positions, &mask, Some(cache), &mut Dropout::off())
    }

    fn run(
        &self,
        ids: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if let Some(&p) = positions.iter().max() {
            if p as usize >= self.cfg.max_positions {
                return Err(ModelError::TooLong { len: p as usize + 1, max: self.cfg.max_positions });
            }
        }
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let (cos, sin) = self.rope.at(positions, b, t)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // The residual stream, `[B·T, H]`.
        let mut h = self.embed.index_select(&ids.flatten_all()?, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention.
            let x = rms_norm(&h, &layer.input_norm, cfg.rms_eps)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(layer.q.forward(&x, dropout)?, nh)?;
            let k = heads(layer.k.forward(&x, dropout)?, nkv)?;
            let v = heads(layer.v.forward(&x, dropout)?, nkv)?;
            let q = rope(&q, &cos, &sin)?;
            let mut k = rope(&k, &cos, &sin)?;
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
            h = (h + layer.o.forward(&attn, dropout)?)?;
            // MLP: down(silu(gate(x)) · up(x)).
            let x = rms_norm(&h, &layer.post_norm, cfg.rms_eps)?;
            let act = silu_mul(&layer.gate.forward(&x, dropout)?, &layer.up.forward(&x, dropout)?)?;
            h = (h + layer.down.forward(&act, dropout)?)?;
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
