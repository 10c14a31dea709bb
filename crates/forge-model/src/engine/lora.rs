//! LoRA on the engine's frozen linear layers: the pairs' values and gradients in f32, and the
//! forward and backward pass of one adapted layer.

use rayon::prelude::*;

use super::Lin;
use super::gemm::gemm_f32;
use crate::Result;
use crate::llama::{Dropout, Llama};

/// One adapted module's pair, in f32.
#[derive(Clone, Debug)]
pub struct LoraMod {
    /// `[r, in]`.
    pub a: Vec<f32>,
    /// `[out, r]`.
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
    pub dropout: f32,
}

/// Every layer's LoRA pairs: `mods[layer][module]`.
#[derive(Clone, Debug)]
pub struct Lora {
    pub mods: Vec<[Option<LoraMod>; 7]>,
}

/// The gradients of a [`Lora`]: `(dA, dB)` per adapted module.
pub type LoraGrads = Vec<[Option<(Vec<f32>, Vec<f32>)>; 7]>;

impl Lora {
    /// The current values of a model's LoRA pairs.
    pub fn of(model: &Llama) -> Result<Lora> {
        let mut mods = Vec::with_capacity(model.layers.len());
        for block in &model.layers {
            let mut m: [Option<LoraMod>; 7] = Default::default();
            for (i, (_, lin)) in block.linears().into_iter().enumerate() {
                if let Some(p) = &lin.lora {
                    m[i] = Some(LoraMod {
                        a: p.a.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?,
                        b: p.b.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?,
                        rank: p.a.dim(0)?,
                        scale: p.scale as f32,
                        dropout: p.dropout,
                    });
                }
            }
            mods.push(m);
        }
        Ok(Lora { mods })
    }
}

/// `x ⊙ mask`.
fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(mask.par_chunks(4096))).for_each(|(o, (x, m))| {
        for i in 0..o.len() {
            o[i] = x[i] * m[i];
        }
    });
    out
}

/// `y = x Wᵀ (+ b) + s · dropout(x) Aᵀ Bᵀ`; returns the saved `s · dropout(x) Aᵀ`.
pub(super) fn linear(
    lin: &Lin,
    lora: Option<&LoraMod>,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    dropout: &Dropout,
    key: u64,
) -> Option<Vec<f32>> {
    lin.w.forward(x, n, y, false);
    if let Some(b) = &lin.bias {
        y.par_chunks_mut(b.len()).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    let m = lora?;
    let (inn, out, r) = (lin.w.cols, lin.w.rows, m.rank);
    let mask = dropout.mask(key, x.len(), m.dropout);
    let dropped = mask.as_ref().map(|mask| masked(x, mask));
    let xd = dropped.as_deref().unwrap_or(x);
    let mut us = vec![0f32; n * r];
    gemm_f32(n, r, inn, xd, inn, 1, &m.a, 1, inn, &mut us, false, true);
    us.iter_mut().for_each(|v| *v *= m.scale);
    gemm_f32(n, out, r, &us, r, 1, &m.b, 1, r, y, true, true);
    Some(us)
}

/// The backward pass of [`linear`]: `dx (+)= dy W + (s · dy B A) ⊙ mask`, and the
/// pair's gradients.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward(
    lin: &Lin,
    lora: Option<&LoraMod>,
    x: &[f32],
    us: Option<&Vec<f32>>,
    dy: &[f32],
    n: usize,
    dx: &mut [f32],
    accumulate: bool,
    dropout: &Dropout,
    key: u64,
) -> Option<(Vec<f32>, Vec<f32>)> {
    lin.w.backward(dy, n, dx, accumulate);
    let (m, us) = (lora?, us?);
    let (inn, out, r) = (lin.w.cols, lin.w.rows, m.rank);
    // dB = dyᵀ · us.
    let mut db = vec![0f32; out * r];
    gemm_f32(out, r, n, dy, 1, out, us, r, 1, &mut db, false, true);
    // gb = s · dy B.
    let mut gb = vec![0f32; n * r];
    gemm_f32(n, r, out, dy, out, 1, &m.b, r, 1, &mut gb, false, true);
    gb.iter_mut().for_each(|v| *v *= m.scale);
    // dA = gbᵀ · dropout(x).
    let mask = dropout.mask(key, x.len(), m.dropout);
    let dropped = mask.as_ref().map(|mask| masked(x, mask));
    let xd = dropped.as_deref().unwrap_or(x);
    let mut da = vec![0f32; r * inn];
    gemm_f32(r, inn, n, &gb, 1, r, xd, inn, 1, &mut da, false, true);
    // dx += (gb · A) ⊙ mask.
    match &mask {
        None => gemm_f32(n, inn, r, &gb, r, 1, &m.a, inn, 1, dx, true, true),
        Some(mask) => {
            let mut t = vec![0f32; n * inn];
            gemm_f32(n, inn, r, &gb, r, 1, &m.a, inn, 1, &mut t, false, true);
            dx.par_chunks_mut(4096).zip(t.par_chunks(4096).zip(mask.par_chunks(4096))).for_each(|(d, (t, k))| {
                for i in 0..d.len() {
                    d[i] += t[i] * k[i];
                }
            });
        }
    }
    Some((da, db))
}
