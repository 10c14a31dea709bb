//! The LoRA training engine: forge's decoder (llama, qwen2, gemma3) with a hand-written backward
//! pass for the case that dominates fine-tuning — a frozen base under trainable LoRA pairs.
//!
//! candle's autograd ([`crate::llama`]) is general, but under LoRA most of what it does is waste:
//! it allocates and walks every intermediate several times, and it cannot skip work the loss does
//! not need. The engine runs one forward pass that saves exactly what the backward pass reads and
//! one backward pass that computes only the activations' gradients and the LoRA pairs':
//!
//! - frozen weights live in f32 or in bf16 ([`gemm::Frozen`]), multiplied by forge's AVX512-BF16
//!   kernel; LoRA pairs, activations, gradients and every sum stay f32;
//! - logits are computed only for positions whose loss weight is not 0 (under DefameLM's
//!   prompt-loss weight 0, the prompt needs none), a few rows at a time, with the cross-entropy's
//!   gradient written over them;
//! - attention is computed per packed segment and per causal block, and its probabilities are
//!   recomputed in the backward pass from the saved log-sum-exp instead of being stored;
//! - dropout masks are the reference model's own ([`crate::Dropout::mask`]), regenerated in the
//!   backward pass.
//!
//! With f32 weights it computes what the reference model computes (the tests compare losses and
//! every LoRA gradient with candle's autograd, itself checked against finite differences).

pub mod gemm;
mod lora;
pub mod ops;

use rayon::prelude::*;

use crate::config::{Arch, ModelConfig};
use crate::llama::{Dropout, Layout, Llama, dropout_key};
use crate::{ModelError, Result};
use gemm::Frozen;
pub use lora::{Lora, LoraGrads, LoraMod};
use lora::{linear, linear_backward};
use ops::{Act, AttnShape, RopeTable, Run};

/// How the engine keeps the frozen base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseDtype {
    F32,
    /// Weights rounded to bf16, and the activations multiplying them too (f32 sums).
    Bf16,
}

/// A frozen linear layer.
struct Lin {
    w: Frozen,
    bias: Option<Vec<f32>>,
}

struct GemmaNorms {
    q: Vec<f32>,
    k: Vec<f32>,
    attn_out: Vec<f32>,
    ffn_out: Vec<f32>,
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    gemma: Option<GemmaNorms>,
    /// q, k, v, o, gate, up, down (the order of [`crate::llama::Block::linears`]).
    lin: [Lin; 7],
    sliding: bool,
}

/// The frozen model.
pub struct Engine {
    pub cfg: ModelConfig,
    act: Act,
    embed: Frozen,
    head: Option<Frozen>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    rope: RopeTable,
    rope_local: Option<RopeTable>,
    embed_scale: f32,
    attn_scale: f32,
}

/// Column sums of squares of the linear layers' inputs ([`Engine::input_sums`]): per layer, the
/// input of q/k/v, of o, of gate/up, of down; and of the LM head.
#[derive(Clone, Debug, Default)]
pub struct InputSums {
    pub layers: Vec<[Vec<f64>; 4]>,
    pub head: Vec<f64>,
    /// Tokens summed over.
    pub tokens: usize,
}

impl InputSums {
    /// Which of a layer's four inputs module `m` (an index into [`crate::llama::Block::linears`])
    /// reads.
    pub fn input_of(module: usize) -> usize {
        [0, 0, 0, 1, 2, 2, 3][module]
    }
}

/// A batch: token ids `[B·T]` laid out by `layout`, next-token targets and loss weights.
pub struct Batch<'a> {
    pub ids: &'a [u32],
    pub layout: &'a Layout,
    pub targets: &'a [u32],
    pub weights: &'a [f32],
}

fn values(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?)
}

/// A frozen weight in `dtype`; `head`: the LM head, whose backward packing is kept (its products
/// come a few rows at a time).
fn frozen(t: &candle_core::Tensor, dtype: BaseDtype, head: bool) -> Result<Frozen> {
    let (rows, cols) = t.dims2()?;
    let v = values(t)?;
    Ok(match dtype {
        BaseDtype::F32 => Frozen::f32(v, rows, cols),
        BaseDtype::Bf16 => Frozen::bf16(&v, rows, cols, head),
    })
}

/// Rows of logits computed at once.
const LOGIT_ROWS: usize = 64;

/// Gemma's q and k before their RMS norms, and each norm's 1/rms.
type QkRaw = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// What one layer's forward pass saves for its backward pass.
struct Saved {
    h_in: Vec<f32>,
    r1: Vec<f32>,
    xn1: Vec<f32>,
    /// `s · dropout(x) Aᵀ` of each adapted module.
    us: [Option<Vec<f32>>; 7],
    /// Gemma: q and k before their norms, and the norms' 1/rms.
    qk_raw: Option<QkRaw>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lse: Vec<f32>,
    o: Vec<f32>,
    /// Gemma: the attention output before its norm, and its 1/rms.
    a_raw: Option<(Vec<f32>, Vec<f32>)>,
    h_mid: Vec<f32>,
    r2: Vec<f32>,
    xn2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
    f_raw: Option<(Vec<f32>, Vec<f32>)>,
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(4096).zip(src.par_chunks(4096)).for_each(|(d, s)| {
        d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    });
}

impl Engine {
    /// The engine for `model`'s frozen weights (its LoRA pairs are passed to each step).
    pub fn new(model: &Llama, dtype: BaseDtype) -> Result<Engine> {
        let cfg = model.cfg.clone();
        if model.embed.track_op() {
            return Err(ModelError::Unsupported("the engine trains LoRA pairs on a frozen base".into()));
        }
        let gemma = cfg.gemma.clone();
        let mut layers = Vec::with_capacity(cfg.layers);
        for (l, b) in model.layers.iter().enumerate() {
            let lin = |x: &crate::llama::Linear| -> Result<Lin> {
                Ok(Lin { w: frozen(&x.weight, dtype, false)?, bias: x.bias.as_ref().map(values).transpose()? })
            };
            layers.push(Layer {
                input_norm: values(&b.input_norm)?,
                post_norm: values(&b.post_norm)?,
                gemma: match &b.gemma {
                    Some(g) => Some(GemmaNorms {
                        q: values(&g.q_norm)?,
                        k: values(&g.k_norm)?,
                        attn_out: values(&g.attn_out)?,
                        ffn_out: values(&g.ffn_out)?,
                    }),
                    None => None,
                },
                lin: [lin(&b.q)?, lin(&b.k)?, lin(&b.v)?, lin(&b.o)?, lin(&b.gate)?, lin(&b.up)?, lin(&b.down)?],
                sliding: gemma.as_ref().is_some_and(|g| g.is_sliding(l)),
            });
        }
        let positions = crate::llama::rope_positions(&cfg);
        let rope = RopeTable::new(&crate::llama::inv_freq(&cfg), positions);
        let rope_local = gemma.as_ref().map(|g| {
            let local = ModelConfig { rope_theta: g.rope_local_theta, rope_scaling: None, ..cfg.clone() };
            RopeTable::new(&crate::llama::inv_freq(&local), positions)
        });
        let embed_scale = if gemma.is_some() { (cfg.hidden as f64).sqrt() as f32 } else { 1.0 };
        let attn_scale = match &gemma {
            Some(g) => (1.0 / g.query_pre_attn_scalar.sqrt()) as f32,
            None => (1.0 / (cfg.head_dim as f64).sqrt()) as f32,
        };
        Ok(Engine {
            act: if cfg.arch == Arch::Gemma3 { Act::Gelu } else { Act::Silu },
            embed: frozen(&model.embed, dtype, model.lm_head.is_none())?,
            head: model.lm_head.as_ref().map(|h| frozen(h, dtype, true)).transpose()?,
            norm: values(&model.norm)?,
            layers,
            rope,
            rope_local,
            embed_scale,
            attn_scale,
            cfg,
        })
    }

    /// Bytes of frozen weights held.
    pub fn bytes(&self) -> usize {
        let lin: usize = self.layers.iter().flat_map(|l| l.lin.iter()).map(|l| l.w.bytes()).sum();
        lin + self.embed.bytes() + self.head.as_ref().map_or(0, |h| h.bytes())
    }

    fn head(&self) -> &Frozen {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    fn check(&self, lora: &Lora, batch: &Batch<'_>) -> Result<()> {
        let n = batch.layout.batch * batch.layout.len;
        if batch.ids.len() != n || batch.targets.len() != n || batch.weights.len() != n {
            return Err(ModelError::Config("a batch's ids, targets and weights must match its layout".into()));
        }
        if let Some(&p) = batch.layout.positions.iter().max() {
            let max = crate::llama::rope_positions(&self.cfg);
            if p as usize >= max {
                return Err(ModelError::TooLong { len: p as usize + 1, max });
            }
        }
        if let Some(&t) = batch.ids.iter().chain(batch.targets).max()
            && t as usize >= self.cfg.vocab
        {
            return Err(ModelError::Config(format!("token id {t} is outside the vocabulary of {}", self.cfg.vocab)));
        }
        if lora.mods.len() != self.layers.len() {
            return Err(ModelError::Config("the LoRA pairs are for another model".into()));
        }
        Ok(())
    }

    fn attn_shape(&self, layer: &Layer) -> AttnShape {
        let window = match (&self.cfg.gemma, layer.sliding) {
            (Some(g), true) => g.sliding_window,
            _ => usize::MAX,
        };
        AttnShape {
            heads: self.cfg.heads,
            kv_heads: self.cfg.kv_heads,
            hd: self.cfg.head_dim,
            scale: self.attn_scale,
            window,
        }
    }

    fn rope_of(&self, layer: &Layer) -> &RopeTable {
        match (&self.rope_local, layer.sliding) {
            (Some(local), true) => local,
            _ => &self.rope,
        }
    }

    /// One layer forward; `h` becomes the layer's output.
    fn layer_forward(
        &self,
        l: usize,
        lora: &[Option<LoraMod>; 7],
        h: &mut [f32],
        positions: &[u32],
        runs: &[Run],
        dropout: &Dropout,
    ) -> Saved {
        let layer = &self.layers[l];
        let cfg = &self.cfg;
        let (n, hd, eps) = (positions.len(), cfg.head_dim, cfg.rms_eps as f32);
        let (qd, kvd) = (cfg.heads * hd, cfg.kv_heads * hd);
        let key = |m| dropout_key(l, m);
        let h_in = h.to_vec();
        let mut xn1 = vec![0f32; h.len()];
        let r1 = ops::rms_norm(&h_in, &layer.input_norm, eps, &mut xn1);
        let mut us: [Option<Vec<f32>>; 7] = Default::default();
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        us[0] = linear(&layer.lin[0], lora[0].as_ref(), &xn1, n, &mut q, dropout, key(0));
        us[1] = linear(&layer.lin[1], lora[1].as_ref(), &xn1, n, &mut k, dropout, key(1));
        us[2] = linear(&layer.lin[2], lora[2].as_ref(), &xn1, n, &mut v, dropout, key(2));
        let qk_raw = layer.gemma.as_ref().map(|g| {
            let (q_raw, k_raw) = (q.clone(), k.clone());
            let rq = ops::rms_norm(&q_raw, &g.q, eps, &mut q);
            let rk = ops::rms_norm(&k_raw, &g.k, eps, &mut k);
            (q_raw, k_raw, rq, rk)
        });
        let rope = self.rope_of(layer);
        rope.apply(&mut q, positions, cfg.heads, false);
        rope.apply(&mut k, positions, cfg.kv_heads, false);
        let shape = self.attn_shape(layer);
        let mut o = vec![0f32; n * qd];
        let lse = ops::attention(&shape, &q, &k, &v, runs, &mut o);
        let mut a = vec![0f32; n * cfg.hidden];
        us[3] = linear(&layer.lin[3], lora[3].as_ref(), &o, n, &mut a, dropout, key(3));
        let a_raw = layer.gemma.as_ref().map(|g| {
            let raw = a.clone();
            let r = ops::rms_norm(&raw, &g.attn_out, eps, &mut a);
            (raw, r)
        });
        add_into(h, &a);
        let h_mid = h.to_vec();
        let mut xn2 = vec![0f32; h.len()];
        let r2 = ops::rms_norm(&h_mid, &layer.post_norm, eps, &mut xn2);
        let f = cfg.intermediate;
        let (mut g, mut u) = (vec![0f32; n * f], vec![0f32; n * f]);
        us[4] = linear(&layer.lin[4], lora[4].as_ref(), &xn2, n, &mut g, dropout, key(4));
        us[5] = linear(&layer.lin[5], lora[5].as_ref(), &xn2, n, &mut u, dropout, key(5));
        let mut act = vec![0f32; n * f];
        self.act.forward(&g, &u, &mut act);
        let mut down = a;
        us[6] = linear(&layer.lin[6], lora[6].as_ref(), &act, n, &mut down, dropout, key(6));
        let f_raw = layer.gemma.as_ref().map(|gn| {
            let raw = down.clone();
            let r = ops::rms_norm(&raw, &gn.ffn_out, eps, &mut down);
            (raw, r)
        });
        add_into(h, &down);
        Saved { h_in, r1, xn1, us, qk_raw, q, k, v, lse, o, a_raw, h_mid, r2, xn2, g, u, act, f_raw }
    }

    /// One layer backward: `dh` (the gradient of the layer's output) becomes the gradient of its
    /// input; the LoRA pairs' gradients are returned.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        lora: &[Option<LoraMod>; 7],
        s: &Saved,
        dh: &mut [f32],
        positions: &[u32],
        runs: &[Run],
        dropout: &Dropout,
    ) -> [Option<(Vec<f32>, Vec<f32>)>; 7] {
        let layer = &self.layers[l];
        let cfg = &self.cfg;
        let (n, hd) = (positions.len(), cfg.head_dim);
        let (qd, kvd, f) = (cfg.heads * hd, cfg.kv_heads * hd, cfg.intermediate);
        let key = |m| dropout_key(l, m);
        let mut grads: [Option<(Vec<f32>, Vec<f32>)>; 7] = Default::default();
        // The FFN branch: h_out = h_mid + norm?(down(act(gate(x)) · up(x))), x = norm(h_mid).
        let df_owned;
        let df: &[f32] = match (&layer.gemma, &s.f_raw) {
            (Some(g), Some((raw, r))) => {
                let mut d = vec![0f32; dh.len()];
                ops::rms_norm_backward(raw, r, &g.ffn_out, dh, &mut d, false);
                df_owned = d;
                &df_owned
            }
            _ => &*dh,
        };
        let mut dact = vec![0f32; n * f];
        grads[6] = linear_backward(
            &layer.lin[6],
            lora[6].as_ref(),
            &s.act,
            s.us[6].as_ref(),
            df,
            n,
            &mut dact,
            false,
            dropout,
            key(6),
        );
        let (mut dg, mut du) = (vec![0f32; n * f], vec![0f32; n * f]);
        self.act.backward(&s.g, &s.u, &dact, &mut dg, &mut du);
        drop(dact);
        let mut dxn2 = vec![0f32; n * cfg.hidden];
        grads[4] = linear_backward(
            &layer.lin[4],
            lora[4].as_ref(),
            &s.xn2,
            s.us[4].as_ref(),
            &dg,
            n,
            &mut dxn2,
            false,
            dropout,
            key(4),
        );
        grads[5] = linear_backward(
            &layer.lin[5],
            lora[5].as_ref(),
            &s.xn2,
            s.us[5].as_ref(),
            &du,
            n,
            &mut dxn2,
            true,
            dropout,
            key(5),
        );
        drop((dg, du));
        ops::rms_norm_backward(&s.h_mid, &s.r2, &layer.post_norm, &dxn2, dh, true);
        // The attention branch: h_mid = h_in + norm?(o_proj(attention(q, k, v))).
        let da_owned;
        let da: &[f32] = match (&layer.gemma, &s.a_raw) {
            (Some(g), Some((raw, r))) => {
                let mut d = vec![0f32; dh.len()];
                ops::rms_norm_backward(raw, r, &g.attn_out, dh, &mut d, false);
                da_owned = d;
                &da_owned
            }
            _ => &*dh,
        };
        let mut do_ = vec![0f32; n * qd];
        grads[3] = linear_backward(
            &layer.lin[3],
            lora[3].as_ref(),
            &s.o,
            s.us[3].as_ref(),
            da,
            n,
            &mut do_,
            false,
            dropout,
            key(3),
        );
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let shape = self.attn_shape(layer);
        ops::attention_backward(&shape, &s.q, &s.k, &s.v, &s.o, &s.lse, &do_, runs, &mut dq, &mut dk, &mut dv);
        drop(do_);
        let rope = self.rope_of(layer);
        rope.apply(&mut dq, positions, cfg.heads, true);
        rope.apply(&mut dk, positions, cfg.kv_heads, true);
        if let (Some(g), Some((q_raw, k_raw, rq, rk))) = (&layer.gemma, &s.qk_raw) {
            let mut t = vec![0f32; dq.len()];
            ops::rms_norm_backward(q_raw, rq, &g.q, &dq, &mut t, false);
            dq = t;
            let mut t = vec![0f32; dk.len()];
            ops::rms_norm_backward(k_raw, rk, &g.k, &dk, &mut t, false);
            dk = t;
        }
        let mut dxn1 = vec![0f32; n * cfg.hidden];
        grads[0] = linear_backward(
            &layer.lin[0],
            lora[0].as_ref(),
            &s.xn1,
            s.us[0].as_ref(),
            &dq,
            n,
            &mut dxn1,
            false,
            dropout,
            key(0),
        );
        grads[1] = linear_backward(
            &layer.lin[1],
            lora[1].as_ref(),
            &s.xn1,
            s.us[1].as_ref(),
            &dk,
            n,
            &mut dxn1,
            true,
            dropout,
            key(1),
        );
        grads[2] = linear_backward(
            &layer.lin[2],
            lora[2].as_ref(),
            &s.xn1,
            s.us[2].as_ref(),
            &dv,
            n,
            &mut dxn1,
            true,
            dropout,
            key(2),
        );
        ops::rms_norm_backward(&s.h_in, &s.r1, &layer.input_norm, &dxn1, dh, true);
        grads
    }

    /// The embeddings of `ids`, `[n, H]`.
    fn embed(&self, ids: &[u32]) -> Vec<f32> {
        let h = self.cfg.hidden;
        let mut x = vec![0f32; ids.len() * h];
        x.par_chunks_mut(h).zip(ids.par_iter()).for_each(|(row, &id)| {
            self.embed.row(id as usize, row);
            if self.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= self.embed_scale);
            }
        });
        x
    }

    /// The logits of the final hidden states `hf` at `rows`, [`LOGIT_ROWS`] at a time: `f(rows of
    /// the chunk, their hidden states, their logits)`.
    fn head_chunks(&self, hf: &[f32], rows: &[usize], mut f: impl FnMut(&[usize], &mut [f32], &mut [f32])) {
        let (h, v) = (self.cfg.hidden, self.cfg.vocab);
        for chunk in rows.chunks(LOGIT_ROWS) {
            let c = chunk.len();
            let mut x = vec![0f32; c * h];
            for (r, &i) in chunk.iter().enumerate() {
                x[r * h..(r + 1) * h].copy_from_slice(&hf[i * h..(i + 1) * h]);
            }
            let mut logits = vec![0f32; c * v];
            self.head().forward(&x, c, &mut logits, false);
            f(chunk, &mut x, &mut logits);
        }
    }

    /// The rows with a loss weight, and the total weight.
    fn weighted_rows(batch: &Batch<'_>) -> (Vec<usize>, f64) {
        let total: f64 = batch.weights.iter().map(|w| *w as f64).sum();
        let rows = (0..batch.weights.len()).filter(|&i| batch.weights[i] != 0.0).collect();
        (rows, total)
    }

    /// The weighted mean cross-entropy of a batch and the gradients of every LoRA pair.
    pub fn loss_and_grads(&self, lora: &Lora, batch: &Batch<'_>, dropout: &Dropout) -> Result<(f64, LoraGrads)> {
        self.check(lora, batch)?;
        let layout = batch.layout;
        let runs = ops::runs(&layout.segments, layout.batch, layout.len);
        let positions = &layout.positions;
        let hdim = self.cfg.hidden;
        let mut h = self.embed(batch.ids);
        let mut saved = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            saved.push(self.layer_forward(l, &lora.mods[l], &mut h, positions, &runs, dropout));
        }
        let mut hf = vec![0f32; h.len()];
        let rf = ops::rms_norm(&h, &self.norm, self.cfg.rms_eps as f32, &mut hf);
        let (rows, total) = Self::weighted_rows(batch);
        let mut dhf = vec![0f32; h.len()];
        let mut loss = 0f64;
        if total > 0.0 {
            self.head_chunks(&hf, &rows, |chunk, x, logits| {
                let weights: Vec<f32> = chunk.iter().map(|&i| (batch.weights[i] as f64 / total) as f32).collect();
                let targets: Vec<u32> = chunk.iter().map(|&i| batch.targets[i]).collect();
                loss += ops::cross_entropy_in_place(logits, self.cfg.vocab, &targets, &weights);
                self.head().backward(logits, chunk.len(), x, false);
                for (r, &i) in chunk.iter().enumerate() {
                    dhf[i * hdim..(i + 1) * hdim].copy_from_slice(&x[r * hdim..(r + 1) * hdim]);
                }
            });
        }
        let mut dh = vec![0f32; h.len()];
        ops::rms_norm_backward(&h, &rf, &self.norm, &dhf, &mut dh, false);
        drop((hf, dhf, h));
        let mut grads: LoraGrads = vec![Default::default(); self.layers.len()];
        for l in (0..self.layers.len()).rev() {
            let s = saved.pop().expect("one saved state per layer");
            grads[l] = self.layer_backward(l, &lora.mods[l], &s, &mut dh, positions, &runs, dropout);
        }
        Ok((loss, grads))
    }

    /// Adds to `sums` the squares of every linear layer's inputs over the batch's real tokens
    /// (padding excluded), column by column: the importance matrix of `llama-imatrix`.
    pub fn input_sums(&self, batch: &Batch<'_>, sums: &mut InputSums) -> Result<()> {
        let none = Lora { mods: vec![Default::default(); self.layers.len()] };
        self.check(&none, batch)?;
        let layout = batch.layout;
        let runs = ops::runs(&layout.segments, layout.batch, layout.len);
        let real: Vec<usize> = (0..layout.segments.len()).filter(|&i| layout.segments[i] != 0).collect();
        let add = |acc: &mut Vec<f64>, x: &[f32], width: usize| {
            acc.resize(width, 0.0);
            acc.par_chunks_mut(64).enumerate().for_each(|(c, a)| {
                for &i in &real {
                    let row = &x[i * width + c * 64..];
                    for (j, v) in a.iter_mut().enumerate() {
                        *v += (row[j] as f64) * (row[j] as f64);
                    }
                }
            });
        };
        if sums.layers.len() != self.layers.len() {
            sums.layers = vec![Default::default(); self.layers.len()];
        }
        let mut h = self.embed(batch.ids);
        for l in 0..self.layers.len() {
            let s = self.layer_forward(l, &none.mods[l], &mut h, &layout.positions, &runs, &Dropout::off());
            let (hd, f) = (self.cfg.hidden, self.cfg.intermediate);
            let acc = &mut sums.layers[l];
            add(&mut acc[0], &s.xn1, hd);
            add(&mut acc[1], &s.o, self.cfg.heads * self.cfg.head_dim);
            add(&mut acc[2], &s.xn2, hd);
            add(&mut acc[3], &s.act, f);
        }
        let mut hf = vec![0f32; h.len()];
        ops::rms_norm(&h, &self.norm, self.cfg.rms_eps as f32, &mut hf);
        add(&mut sums.head, &hf, self.cfg.hidden);
        sums.tokens += real.len();
        Ok(())
    }

    /// The weighted loss sum of a batch and its total weight (no dropout, no gradients).
    pub fn loss(&self, lora: &Lora, batch: &Batch<'_>) -> Result<(f64, f64)> {
        self.check(lora, batch)?;
        let layout = batch.layout;
        let runs = ops::runs(&layout.segments, layout.batch, layout.len);
        let mut h = self.embed(batch.ids);
        for l in 0..self.layers.len() {
            drop(self.layer_forward(l, &lora.mods[l], &mut h, &layout.positions, &runs, &Dropout::off()));
        }
        let mut hf = vec![0f32; h.len()];
        ops::rms_norm(&h, &self.norm, self.cfg.rms_eps as f32, &mut hf);
        let (rows, total) = Self::weighted_rows(batch);
        let mut sum = 0f64;
        self.head_chunks(&hf, &rows, |chunk, _, logits| {
            let targets: Vec<u32> = chunk.iter().map(|&i| batch.targets[i]).collect();
            let weights: Vec<f32> = chunk.iter().map(|&i| batch.weights[i]).collect();
            sum += ops::cross_entropy_loss(logits, self.cfg.vocab, &targets, &weights);
        });
        Ok((sum, total))
    }
}
