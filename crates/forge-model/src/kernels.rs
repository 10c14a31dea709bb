//! Fused CPU kernels with hand-written backward passes, for training speed.
//!
//! candle's autograd computes a gradient for *every* input of an op — including frozen weights
//! (a whole weight-gradient GEMM per layer under LoRA) — and every elementwise op allocates a
//! tensor and walks memory once forward and several times backward. The ops here do one pass
//! each way and only the gradients that are needed:
//!
//! - [`frozen_matmul`]: `x Wᵀ` with `W` frozen — backward computes `dx = dy W` only;
//! - [`rms_norm`]: RMSNorm forward/backward in one pass per row;
//! - [`masked_softmax`]: `softmax(scale·x + mask)` over the last dimension;
//! - [`silu_mul`], [`gelu_mul`]: `act(g) · u`, the SwiGLU and GeGLU gates ([`Act`]);
//! - [`rope`]: rotary embeddings (`x·cos + rotate_half(x)·sin`) and their transpose backward;
//! - [`cross_entropy`]: the weighted next-token cross-entropy straight from logits.
//!
//! Each has a reference in plain tensor ops (used for other dtypes, and by the tests, which check
//! values and gradients of both against each other and against finite differences in f64).
//! Only f32 takes the fused path.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused kernels need contiguous input"),
    }
}

/// The f32 data of a contiguous CPU tensor, borrowed (no copy).
struct View<G: std::ops::Deref<Target = Storage>> {
    guard: G,
    start: usize,
    end: usize,
}

impl<G: std::ops::Deref<Target = Storage>> View<G> {
    fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            _ => unreachable!("checked when the view was made"),
        }
    }
}

fn view(t: &Tensor) -> candle_core::Result<View<impl std::ops::Deref<Target = Storage> + '_>> {
    let (guard, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused kernels need contiguous tensors")
    };
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("fused kernels need f32 CPU tensors");
    }
    Ok(View { guard, start, end })
}

/// Reads a (small) f32 tensor into a vector.
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn fused(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu()
}

// ---- frozen matmul ----------------------------------------------------------------------

struct FrozenMatmul {
    /// `[out, in]`, not trained.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = l.shape().dims2()?;
        let (out, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: x is [{n}, {k}] but W is [{out}, {k2}]");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(wc) = &*ws else { candle_core::bail!("frozen-matmul: W is not on the CPU") };
        let wt = wl.transpose(0, 1)?;
        let y = s.matmul(wc, (1, n, out, k), l, &wt)?;
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w)?))
    }
}

/// `x Wᵀ` for `x` `[N, in]` and a weight `W` `[out, in]` that is not trained: its gradient is
/// never computed. (A trained weight must use `x.matmul(&w.t())`.)
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.detach().contiguous()?;
    Ok(x.contiguous()?.apply_op1(FrozenMatmul { w })?)
}

// ---- RMSNorm ----------------------------------------------------------------------------

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl)?;
        let w = contiguous_f32(ws, wl)?;
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for i in 0..h {
                y[i] = x[i] * r * w[i];
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (xv, wv, dyv) = (view(x)?, view(w)?, view(&dy)?);
        let (xv, wv, dyv) = (xv.slice(), wv.slice(), dyv.slice());
        let h = wv.len();
        let mut dx = vec![0f32; xv.len()];
        // dw = Σ_rows dy · x̂, accumulated per thread chunk then summed.
        let dw = dx
            .par_chunks_mut(h)
            .zip(xv.par_chunks(h).zip(dyv.par_chunks(h)))
            .fold(
                || vec![0f32; h],
                |mut dw, (dx, (x, dy))| {
                    let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                    let r = 1.0 / (ms + self.eps).sqrt();
                    // dx = r · (g − x̂ · mean(g · x̂)) with g = dy · w and x̂ = x · r.
                    let mut dot = 0f32;
                    for i in 0..h {
                        dot += dy[i] * wv[i] * x[i] * r;
                    }
                    let mean = dot / h as f32;
                    for i in 0..h {
                        let xh = x[i] * r;
                        dx[i] = r * (dy[i] * wv[i] - xh * mean);
                        dw[i] += dy[i] * xh;
                    }
                    dw
                },
            )
            .reduce(
                || vec![0f32; h],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

/// Reference RMSNorm in plain ops: `w · x / sqrt(mean(x²) + ε)`.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// RMSNorm over the last dimension of a `[N, H]` tensor.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(x) {
        return rms_norm_reference(x, weight, eps);
    }
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })?)
}

// ---- masked softmax ---------------------------------------------------------------------

struct MaskedSoftmax {
    scale: f32,
    /// `[B, 1, T, S]`, broadcast over heads; 0 allowed, a large negative number masked.
    mask: Vec<f32>,
    heads: usize,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let (_, nh, t, sl) = l.shape().dims4()?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(sl).zip(x.par_chunks(sl)).enumerate().for_each(|(row, (y, x))| {
            let b = row / (nh * t);
            let i = row % t;
            let m = &self.mask[(b * t + i) * sl..(b * t + i + 1) * sl];
            let mut max = f32::NEG_INFINITY;
            for j in 0..sl {
                let v = x[j] * self.scale + m[j];
                y[j] = v;
                max = max.max(v);
            }
            let mut sum = 0f32;
            for v in y.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|v| *v *= inv);
        });
        let _ = self.heads;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let (yv, dyv) = (view(y)?, view(&dy)?);
        let (yv, dyv) = (yv.slice(), dyv.slice());
        let sl = x.dim(D::Minus1)?;
        let mut dx = vec![0f32; yv.len()];
        dx.par_chunks_mut(sl).zip(yv.par_chunks(sl).zip(dyv.par_chunks(sl))).for_each(|(dx, (y, dy))| {
            let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
            for j in 0..sl {
                dx[j] = self.scale * y[j] * (dy[j] - dot);
            }
        });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Reference: `softmax(scale · x + mask)` with the max subtracted (detached) for stability.
pub fn masked_softmax_reference(x: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    let z = x.affine(scale, 0.0)?.broadcast_add(mask)?;
    let max = z.max_keepdim(D::Minus1)?.detach();
    let e = z.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// `softmax(scale · x + mask)` over the last dimension of attention scores `[B, nh, T, S]`,
/// with `mask` `[B, 1, T, S]`.
pub fn masked_softmax(x: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return masked_softmax_reference(x, scale, mask);
    }
    let heads = x.dim(1)?;
    let op = MaskedSoftmax { scale: scale as f32, mask: values(mask)?, heads };
    Ok(x.contiguous()?.apply_op1(op)?)
}

// ---- gated activations (SwiGLU, GeGLU) --------------------------------------------------

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `√(2/π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// The activation of a gated FFN, `act(g) · u`: SiLU (llama's SwiGLU) or GELU with the tanh
/// approximation (`gelu_pytorch_tanh`, Gemma's GeGLU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    Gelu,
}

impl Act {
    /// `act(g)` and its derivative.
    #[inline]
    pub fn value_and_slope(self, g: f32) -> (f32, f32) {
        match self {
            Act::Silu => {
                let s = sigmoid(g);
                (g * s, s * (1.0 + g * (1.0 - s)))
            }
            Act::Gelu => {
                let inner = SQRT_2_OVER_PI * (g + 0.044715 * g * g * g);
                let th = inner.tanh();
                let dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * g * g);
                (0.5 * g * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * dinner)
            }
        }
    }

    /// `y = act(g) · u`, elementwise.
    pub fn forward(self, g: &[f32], u: &[f32], y: &mut [f32]) {
        y.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(y, (g, u))| {
            for i in 0..y.len() {
                y[i] = self.value_and_slope(g[i]).0 * u[i];
            }
        });
    }

    /// The gradients of `g` and `u` from that of `y`.
    pub fn backward(self, g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(dy.par_chunks(4096)))
            .for_each(|((dg, du), ((g, u), dy))| {
                for i in 0..dg.len() {
                    let (a, da) = self.value_and_slope(g[i]);
                    du[i] = dy[i] * a;
                    dg[i] = dy[i] * u[i] * da;
                }
            });
    }
}

struct GatedMul(Act);

impl CustomOp2 for GatedMul {
    fn name(&self) -> &'static str {
        match self.0 {
            Act::Silu => "silu-mul",
            Act::Gelu => "gelu-mul",
        }
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous_f32(gs, gl)?, contiguous_f32(us, ul)?);
        let mut y = vec![0f32; g.len()];
        self.0.forward(g, u, &mut y);
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (gv, uv, dyv) = (view(g)?, view(u)?, view(&dy)?);
        let mut dg = vec![0f32; gv.slice().len()];
        let mut du = vec![0f32; gv.slice().len()];
        self.0.backward(gv.slice(), uv.slice(), dyv.slice(), &mut dg, &mut du);
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}

/// `silu(g) · u`.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !fused(g) {
        return Ok((g.silu()? * u)?);
    }
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, GatedMul(Act::Silu))?)
}

/// Reference GELU (tanh approximation) in plain ops: `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`.
pub fn gelu_tanh_reference(x: &Tensor) -> Result<Tensor> {
    let cube = (x.sqr()? * x)?;
    let inner = (x + cube.affine(0.044715, 0.0)?)?.affine((2.0 / std::f64::consts::PI).sqrt(), 0.0)?;
    Ok((x * (inner.tanh()? + 1.0)?)?.affine(0.5, 0.0)?)
}

/// `gelu_tanh(g) · u`.
pub fn gelu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if !fused(g) {
        return Ok((gelu_tanh_reference(g)? * u)?);
    }
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, GatedMul(Act::Gelu))?)
}

// ---- RoPE -------------------------------------------------------------------------------

struct Rope {
    /// `[B, T, hd]` (the half tables repeated), shared by all heads.
    cos: Vec<f32>,
    sin: Vec<f32>,
    heads: usize,
    t: usize,
}

impl Rope {
    /// `y = x·cos + rotate_half(x)·sin` (`inverse`: the transpose, for the backward pass:
    /// `dx = dy·cos + rotate_halfᵀ(dy·sin)`).
    fn apply(&self, x: &[f32], hd: usize, inverse: bool) -> Vec<f32> {
        let half = hd / 2;
        let mut y = vec![0f32; x.len()];
        let per_batch = self.heads * self.t * hd;
        y.par_chunks_mut(hd).zip(x.par_chunks(hd)).enumerate().for_each(|(row, (y, x))| {
            let b = row * hd / per_batch;
            let ti = row % self.t;
            let at = (b * self.t + ti) * hd;
            let (c, s) = (&self.cos[at..at + hd], &self.sin[at..at + hd]);
            for i in 0..half {
                if inverse {
                    y[i] = x[i] * c[i] + x[i + half] * s[i + half];
                    y[i + half] = x[i + half] * c[i + half] - x[i] * s[i];
                } else {
                    y[i] = x[i] * c[i] - x[i + half] * s[i];
                    y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
                }
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let hd = l.shape().dims4()?.3;
        Ok((CpuStorage::F32(self.apply(x, hd, false)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let hd = x.dim(D::Minus1)?;
        let dy = dy.contiguous()?;
        let dx = self.apply(view(&dy)?.slice(), hd, true);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Reference RoPE: `x · cos + rotate_half(x) · sin`, `rotate_half(x) = cat(−x₂, x₁)`.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Rotary embeddings of `x` `[B, nh, T, hd]` with `cos`, `sin` `[B, 1, T, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return rope_reference(x, cos, sin);
    }
    let (_, heads, t, _) = x.dims4()?;
    let op = Rope { cos: values(cos)?, sin: values(sin)?, heads, t };
    Ok(x.contiguous()?.apply_op1(op)?)
}

// ---- cross-entropy ----------------------------------------------------------------------

struct CrossEntropy {
    targets: Vec<u32>,
    /// Per-row weight divided by the total weight.
    weights: Vec<f32>,
}

impl CrossEntropy {
    /// Per row: the log-sum-exp and the max it was computed around.
    fn row_stats(x: &[f32]) -> (f32, f32) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
        (max, sum.ln())
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let (_, v) = l.shape().dims2()?;
        let loss: f64 = x
            .par_chunks(v)
            .enumerate()
            .map(|(i, row)| {
                let w = self.weights[i];
                if w == 0.0 {
                    return 0.0;
                }
                let (max, lse) = Self::row_stats(row);
                w as f64 * (lse + max - row[self.targets[i] as usize]) as f64
            })
            .sum();
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = dy.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let xv = view(x)?;
        let xv = xv.slice();
        let v = x.dim(D::Minus1)?;
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(v).zip(xv.par_chunks(v)).enumerate().for_each(|(i, (dx, row))| {
            let w = self.weights[i] * g;
            if w == 0.0 {
                return;
            }
            let (max, lse) = Self::row_stats(row);
            for j in 0..v {
                dx[j] = w * (row[j] - max - lse).exp();
            }
            dx[self.targets[i] as usize] -= w;
        });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Reference: weighted mean of `-log softmax(logits)[target]`.
pub fn cross_entropy_reference(logits: &Tensor, targets: &[u32], weights: &[f32], total: f64) -> Result<Tensor> {
    let device = logits.device();
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let idx = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), device)?;
    let picked = shifted.gather(&idx, D::Minus1)?;
    let nll = (log_z - picked)?.squeeze(D::Minus1)?;
    let w = Tensor::from_vec(weights.to_vec(), weights.len(), device)?.to_dtype(logits.dtype())?;
    Ok(((nll * w)?.sum_all()? / total.max(1e-12))?)
}

/// The weighted mean next-token cross-entropy `Σ wᵢ · −log softmax(logitsᵢ)[targetᵢ] / Σ wᵢ`
/// of `logits` `[N, V]`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32], total: f64) -> Result<Tensor> {
    if !fused(logits) {
        return cross_entropy_reference(logits, targets, weights, total);
    }
    let scale = 1.0 / total.max(1e-12) as f32;
    let op = CrossEntropy { targets: targets.to_vec(), weights: weights.iter().map(|w| w * scale).collect() };
    Ok(logits.contiguous()?.apply_op1(op)?)
}
