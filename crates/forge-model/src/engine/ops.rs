//! The engine's elementwise and attention passes, each with its backward pass to the activations
//! (the frozen norm weights get no gradient). Formulas follow [`crate::kernels`], which candle's
//! reference model uses, so that the engine computes the same numbers.

use rayon::prelude::*;

use super::gemm::gemm_f32;
pub use crate::kernels::Act;

/// Rows per parallel task of a row-wise pass.
const ROWS: usize = 8;

/// RMSNorm of each row of `x` `[n, h]` into `y`; returns `1/rms` per row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> Vec<f32> {
    let h = w.len();
    let mut r = vec![0f32; x.len() / h];
    y.par_chunks_mut(h * ROWS).zip(x.par_chunks(h * ROWS)).zip(r.par_chunks_mut(ROWS)).for_each(|((y, x), r)| {
        for ((y, x), r) in y.chunks_mut(h).zip(x.chunks(h)).zip(r.iter_mut()) {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for i in 0..h {
                y[i] = x[i] * *r * w[i];
            }
        }
    });
    r
}

/// `dx (+)= RMSNorm'(x)ᵀ dy`: `r · (g − x̂ · mean(g · x̂))` with `g = dy · w`, `x̂ = x · r`.
pub fn rms_norm_backward(x: &[f32], r: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) {
    let h = w.len();
    dx.par_chunks_mut(h * ROWS)
        .zip(x.par_chunks(h * ROWS).zip(dy.par_chunks(h * ROWS)))
        .zip(r.par_chunks(ROWS))
        .for_each(|((dx, (x, dy)), r)| {
            for (((dx, x), dy), r) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)).zip(r) {
                let mut dot = 0f32;
                for i in 0..h {
                    dot += dy[i] * w[i] * x[i] * r;
                }
                let mean = dot / h as f32;
                for i in 0..h {
                    let v = r * (dy[i] * w[i] - x[i] * r * mean);
                    dx[i] = if accumulate { dx[i] + v } else { v };
                }
            }
        });
}

/// RoPE tables: `cos`/`sin` of `position · inv_freq`, `[positions, hd/2]`, computed as
/// [`crate::llama`] computes them.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(inv_freq: &[f64], positions: usize) -> RopeTable {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in inv_freq {
                let a = (p as f32 * *f as f32) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates every head of every row of `x` `[n, heads · hd]` in place (the transpose when
    /// `inverse`, for the backward pass); row `i` is at position `positions[i]`.
    pub fn apply(&self, x: &mut [f32], positions: &[u32], heads: usize, inverse: bool) {
        let half = self.half;
        let hd = 2 * half;
        x.par_chunks_mut(heads * hd).zip(positions.par_iter()).for_each(|(row, &p)| {
            let c = &self.cos[p as usize * half..(p as usize + 1) * half];
            let s = &self.sin[p as usize * half..(p as usize + 1) * half];
            for head in row.chunks_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    if inverse {
                        a[i] = x1 * c[i] + x2 * s[i];
                        b[i] = x2 * c[i] - x1 * s[i];
                    } else {
                        a[i] = x1 * c[i] - x2 * s[i];
                        b[i] = x2 * c[i] + x1 * s[i];
                    }
                }
            }
        });
    }
}

/// A run of tokens that attend to each other: rows `start..start + len` of the batch, causally.
/// Padding tokens are runs of one (they attend to themselves alone, as in the reference model).
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub start: usize,
    pub len: usize,
}

/// The runs of a layout's segments (`0` = padding), row by row.
pub fn runs(segments: &[u32], batch: usize, len: usize) -> Vec<Run> {
    let mut out = Vec::new();
    for b in 0..batch {
        let row = &segments[b * len..(b + 1) * len];
        let mut i = 0;
        while i < len {
            let mut j = i + 1;
            if row[i] != 0 {
                while j < len && row[j] == row[i] {
                    j += 1;
                }
            }
            out.push(Run { start: b * len + i, len: j - i });
            i = j;
        }
    }
    out
}

/// The shape of attention in a layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    pub scale: f32,
    /// A token sees at most this many positions (itself included).
    pub window: usize,
}

impl AttnShape {
    fn q_stride(&self) -> usize {
        self.heads * self.hd
    }

    fn kv_stride(&self) -> usize {
        self.kv_heads * self.hd
    }

    fn group(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// The keys query `i` of a run may see: `lo(i)..=i`.
    fn first_key(&self, i: usize) -> usize {
        (i + 1).saturating_sub(self.window)
    }
}

/// Query rows per block: a block's scores are computed against the keys its last row sees.
const QB: usize = 64;

/// `scores[i, j] = scale · q_i · k_j` for the block's rows `i0..i1` over keys `j0..i1`, masked
/// (−∞) outside each row's window; row-major with stride `i1 − j0`.
fn block_scores(
    s: &AttnShape,
    q: &[f32],
    k: &[f32],
    run: Run,
    h: usize,
    (i0, i1, j0): (usize, usize, usize),
    out: &mut Vec<f32>,
) {
    let (rows, cols) = (i1 - i0, i1 - j0);
    out.clear();
    out.resize(rows * cols, 0.0);
    let g = s.group(h);
    let qa = &q[(run.start + i0) * s.q_stride() + h * s.hd..];
    let kb = &k[(run.start + j0) * s.kv_stride() + g * s.hd..];
    // q rows (stride q_stride) times k rowsᵀ (k row j is column j of B: b_rs = 1, b_cs = kv_stride).
    gemm_f32(rows, cols, s.hd, qa, s.q_stride(), 1, kb, 1, s.kv_stride(), out, false, false);
    for r in 0..rows {
        let i = i0 + r;
        let lo = s.first_key(i);
        let row = &mut out[r * cols..(r + 1) * cols];
        for (c, v) in row.iter_mut().enumerate() {
            let j = j0 + c;
            *v = if j > i || j < lo { f32::NEG_INFINITY } else { *v * s.scale };
        }
    }
}

/// The query blocks of a run: `(i0, i1, j0)`.
fn blocks(s: &AttnShape, run: Run) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..run.len.div_ceil(QB)).map(move |b| {
        let (i0, i1) = (b * QB, ((b + 1) * QB).min(run.len));
        (i0, i1, s.first_key(i0))
    })
}

struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Attention forward: `o` `[n, heads · hd]` from `q`, `k`, `v`; returns the log-sum-exp of every
/// (row, head)'s scores, `[n, heads]`, which the backward pass recomputes the probabilities from.
pub fn attention(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], runs: &[Run], o: &mut [f32]) -> Vec<f32> {
    let n = q.len() / s.q_stride();
    let mut lse = vec![0f32; n * s.heads];
    let (op, lp) = (Shared(o.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let (op, lp) = (&op, &lp);
    let tasks: Vec<(Run, usize)> = runs.iter().flat_map(|r| (0..s.heads).map(move |h| (*r, h))).collect();
    tasks.par_iter().for_each_init(Vec::new, |scores, &(run, h)| {
        let g = s.group(h);
        for (i0, i1, j0) in blocks(s, run) {
            block_scores(s, q, k, run, h, (i0, i1, j0), scores);
            let cols = i1 - j0;
            for r in 0..i1 - i0 {
                let row = &mut scores[r * cols..(r + 1) * cols];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                // SAFETY: each (row, head) belongs to exactly one task.
                unsafe { *lp.0.add((run.start + i0 + r) * s.heads + h) = max + sum.ln() };
            }
            // o rows i0..i1 of head h = P · V[j0..i1] (disjoint per task).
            // SAFETY: the rows i0..i1 of head h's columns are written by this task alone; the
            // slice covers them at stride q_stride.
            let out = unsafe {
                let start = (run.start + i0) * s.q_stride() + h * s.hd;
                let len = (i1 - i0 - 1) * s.q_stride() + s.hd;
                std::slice::from_raw_parts_mut(op.0.add(start), len)
            };
            let vb = &v[(run.start + j0) * s.kv_stride() + g * s.hd..];
            gemm_strided_out(i1 - i0, s.hd, cols, scores, cols, 1, vb, s.kv_stride(), 1, out, s.q_stride());
        }
    });
    lse
}

/// `c (+)= a · b` with `c` at row stride `ldc` (single-threaded: called from parallel tasks).
#[allow(clippy::too_many_arguments)]
fn gemm_strided_out(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let mut tmp = vec![0f32; m * n];
    gemm_f32(m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, &mut tmp, false, false);
    for r in 0..m {
        c[r * ldc..r * ldc + n].copy_from_slice(&tmp[r * n..(r + 1) * n]);
    }
}

/// Attention backward: from `do_` (the gradient of `o`), writes `dq` and `dk`, `dv` (all zeroed
/// here first). Probabilities are recomputed from `q`, `k` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    s: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    do_: &[f32],
    runs: &[Run],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let dqp = Shared(dq.as_mut_ptr());
    let dqp = &dqp;
    // Tasks per (run, head); each returns its run's dK, dV for its head's group, summed below.
    let tasks: Vec<(usize, usize)> = (0..runs.len()).flat_map(|r| (0..s.heads).map(move |h| (r, h))).collect();
    let partial: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(p, dp, tmp), &(ri, h)| {
                let run = runs[ri];
                let g = s.group(h);
                let mut dk_run = vec![0f32; run.len * s.hd];
                let mut dv_run = vec![0f32; run.len * s.hd];
                for (i0, i1, j0) in blocks(s, run) {
                    let (rows, cols) = (i1 - i0, i1 - j0);
                    block_scores(s, q, k, run, h, (i0, i1, j0), p);
                    for r in 0..rows {
                        let l = lse[(run.start + i0 + r) * s.heads + h];
                        p[r * cols..(r + 1) * cols].iter_mut().for_each(|x| *x = (*x - l).exp());
                    }
                    let do_b = &do_[(run.start + i0) * s.q_stride() + h * s.hd..];
                    let vb = &v[(run.start + j0) * s.kv_stride() + g * s.hd..];
                    // dP = dO · Vᵀ.
                    dp.clear();
                    dp.resize(rows * cols, 0.0);
                    gemm_f32(rows, cols, s.hd, do_b, s.q_stride(), 1, vb, 1, s.kv_stride(), dp, false, false);
                    // dS = P ⊙ (dP − D), D_i = dO_i · O_i; then times the scale.
                    for r in 0..rows {
                        let row = (run.start + i0 + r) * s.q_stride() + h * s.hd;
                        let d: f32 = (0..s.hd).map(|t| do_[row + t] * o[row + t]).sum();
                        for c in 0..cols {
                            let x = r * cols + c;
                            dp[x] = p[x] * (dp[x] - d) * s.scale;
                        }
                    }
                    // dV[j0..i1] += Pᵀ · dO;  dK[j0..i1] += dSᵀ · Q;  dQ[i0..i1] = dS · K.
                    tmp.clear();
                    tmp.resize(cols * s.hd, 0.0);
                    gemm_f32(cols, s.hd, rows, p, 1, cols, do_b, s.q_stride(), 1, tmp, false, false);
                    add_rows(&mut dv_run[(j0) * s.hd..(i1) * s.hd], tmp);
                    let qb = &q[(run.start + i0) * s.q_stride() + h * s.hd..];
                    gemm_f32(cols, s.hd, rows, dp, 1, cols, qb, s.q_stride(), 1, tmp, false, false);
                    add_rows(&mut dk_run[(j0) * s.hd..(i1) * s.hd], tmp);
                    let kb = &k[(run.start + j0) * s.kv_stride() + g * s.hd..];
                    tmp.clear();
                    tmp.resize(rows * s.hd, 0.0);
                    gemm_f32(rows, s.hd, cols, dp, cols, 1, kb, s.kv_stride(), 1, tmp, false, false);
                    for r in 0..rows {
                        // SAFETY: the rows i0..i1 of head h belong to this task alone.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                dqp.0.add((run.start + i0 + r) * s.q_stride() + h * s.hd),
                                s.hd,
                            )
                        };
                        dst.copy_from_slice(&tmp[r * s.hd..(r + 1) * s.hd]);
                    }
                }
                (ri, g, dk_run, dv_run)
            },
        )
        .collect();
    for (ri, g, dk_run, dv_run) in partial {
        let run = runs[ri];
        for i in 0..run.len {
            let at = (run.start + i) * s.kv_stride() + g * s.hd;
            add_rows(&mut dk[at..at + s.hd], &dk_run[i * s.hd..(i + 1) * s.hd]);
            add_rows(&mut dv[at..at + s.hd], &dv_run[i * s.hd..(i + 1) * s.hd]);
        }
    }
}

fn add_rows(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// Cross-entropy of `logits` `[rows, v]` against `targets` with per-row weights already divided
/// by the total weight; replaces the logits with their gradient and returns the weighted loss.
pub fn cross_entropy_in_place(logits: &mut [f32], v: usize, targets: &[u32], weights: &[f32]) -> f64 {
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter().zip(weights.par_iter()))
        .map(|(row, (&t, &w))| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
            let lse = max + sum.ln();
            let loss = w as f64 * (lse - row[t as usize]) as f64;
            for x in row.iter_mut() {
                *x = w * (*x - lse).exp();
            }
            row[t as usize] -= w;
            loss
        })
        .sum()
}

/// The weighted loss alone (evaluation).
pub fn cross_entropy_loss(logits: &[f32], v: usize, targets: &[u32], weights: &[f32]) -> f64 {
    logits
        .par_chunks(v)
        .zip(targets.par_iter().zip(weights.par_iter()))
        .map(|(row, (&t, &w))| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
            w as f64 * (max + sum.ln() - row[t as usize]) as f64
        })
        .sum()
}
