//! One step of the network: the prompt in one batch, or one new token. Plain loops over `f32`
//! buffers, no tensor graph; every parallel pass runs on the model's [`pool`](crate::pool).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use forge_model::Arch;

use crate::adapter::{Adapter, Proj};
use crate::generate::Cache;

/// The rows of a forward pass that belong to one sequence, its cache and its adapter.
struct Seq<'a> {
    cache: &'a mut Cache,
    rows: Range<usize>,
    adapter: Option<&'a Adapter>,
}
use crate::kernels::{self as simd, OutPtr};
use crate::matmul::{Acts, Kernels, Mat};
use crate::model::QModel;
use crate::{InferError, Result};

impl QModel {
    /// Logits of the last of `ids`, which follow the tokens in `cache` (extended with them).
    pub fn step(&self, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        self.step_with(ids, cache, None)
    }

    /// [`step`](Self::step) with a LoRA adapter on the weights (`None`: the base alone).
    pub fn step_with(&self, ids: &[u32], cache: &mut Cache, adapter: Option<&Adapter>) -> Result<Vec<f32>> {
        let mut seqs = [Seq { cache, rows: 0..ids.len(), adapter }];
        Ok(self.forward(ids, &mut seqs)?.pop().expect("one sequence"))
    }

    /// One new token for each of several sequences — each with its cache and perhaps an
    /// adapter — in one forward pass: the matrix products run on all the rows together (the
    /// weights read once for the batch), attention per sequence. Each sequence's logits are
    /// what [`step_with`](Self::step_with) gives it alone, bit for bit.
    pub fn step_many(&self, next: &mut [(u32, &mut Cache, Option<&Adapter>)]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<u32> = next.iter().map(|n| n.0).collect();
        let mut seqs: Vec<Seq<'_>> =
            next.iter_mut().enumerate().map(|(i, n)| Seq { cache: &mut *n.1, rows: i..i + 1, adapter: n.2 }).collect();
        self.forward(&ids, &mut seqs)
    }

    /// The forward pass of `ids`, whose rows belong to `seqs` (each a contiguous range, its
    /// tokens following those in its cache); the logits after each sequence's last row.
    fn forward(&self, ids: &[u32], seqs: &mut [Seq<'_>]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let t = ids.len();
        if t == 0 || seqs.is_empty() || seqs.iter().any(|s| s.rows.is_empty() || s.rows.end > t) {
            return Err(InferError::Model("no tokens to decode".into()));
        }
        for s in seqs.iter_mut() {
            if s.cache.len + s.rows.len() > cfg.max_positions {
                return Err(InferError::Model(format!(
                    "{} tokens exceed the context of {}",
                    s.cache.len + s.rows.len(),
                    cfg.max_positions
                )));
            }
            s.cache.fit(self.blocks.len(), cfg.kv_heads * cfg.head_dim, s.cache.len + s.rows.len());
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab) {
            return Err(InferError::Model(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab)));
        }
        let (nh, nkv, hd, hidden) = (cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.hidden);
        let ffn = self.blocks.first().map_or(0, |b| b.up.n);
        let eps = cfg.rms_eps as f32;
        // The adapters' update of projection `p` of layer `l`, added to its product `y` with `x`
        // (rows of `xw` and `yw` values), each sequence's rows with its own adapter.
        let lora = |seqs: &[Seq<'_>], l: usize, p: Proj, x: &[f32], xw: usize, y: &mut [f32], yw: usize| {
            for s in seqs {
                if let Some(lora) = s.adapter.and_then(|a| a.get(l, p)) {
                    let r = &s.rows;
                    lora.apply(&x[r.start * xw..r.end * xw], r.len(), &mut y[r.start * yw..r.end * yw]);
                }
            }
        };
        let mut x = self.embed.rows(ids, &self.output)?;
        let gemma = self.cfg.arch == Arch::Gemma3;
        if gemma {
            let scale = (hidden as f32).sqrt();
            x.iter_mut().for_each(|x| *x *= scale);
        }
        let (qw, kw) = (nh * hd, nkv * hd);
        let mut h = vec![0f32; t * hidden];
        let mut q = vec![0f32; t * qw];
        let mut k = vec![0f32; t * kw];
        let mut v = vec![0f32; t * kw];
        let mut att = vec![0f32; t * qw];
        let mut gate = vec![0f32; t * ffn];
        let mut up = vec![0f32; t * ffn];
        let mut acts = Acts { forge: self.kernels != Kernels::Candle, ..Acts::default() };
        for (l, b) in self.blocks.iter().enumerate() {
            self.rms_norm_rows(&x, &b.attn_norm, eps, &mut h);
            self.matmuls(&mut [(&b.q, &mut q), (&b.k, &mut k), (&b.v, &mut v)], &h, t, &mut acts);
            lora(seqs, l, Proj::Q, &h, hidden, &mut q, qw);
            lora(seqs, l, Proj::K, &h, hidden, &mut k, kw);
            lora(seqs, l, Proj::V, &h, hidden, &mut v, kw);
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
            for s in seqs.iter() {
                let (r, past) = (&s.rows, s.cache.len);
                self.rope(&mut q[r.start * qw..r.end * qw], nh, past, local);
                self.rope(&mut k[r.start * kw..r.end * kw], nkv, past, local);
            }
            if gemma {
                // Gemma 3 (all but 27B): queries scaled by 1/√head_dim before attention.
                let scale = 1.0 / (hd as f32).sqrt();
                q.iter_mut().for_each(|q| *q *= scale);
            }
            for s in seqs.iter_mut() {
                let (r, past) = (s.rows.clone(), s.cache.len);
                let (kc, vc) = s.cache.layer(l);
                let (kc, vc) = (&mut kc[..(past + r.len()) * kw], &mut vc[..(past + r.len()) * kw]);
                // llama.cpp's default cache holds keys and values as f16.
                simd::to_f16(&k[r.start * kw..r.end * kw], &mut kc[past * kw..]);
                simd::to_f16(&v[r.start * kw..r.end * kw], &mut vc[past * kw..]);
                let out = &mut att[r.start * qw..r.end * qw];
                self.attention(&q[r.start * qw..r.end * qw], kc, vc, past, r.len(), b.window, out);
            }
            self.matmuls(&mut [(&b.o, &mut h)], &att, t, &mut acts);
            lora(seqs, l, Proj::O, &att, qw, &mut h, hidden);
            if let Some(w) = &b.post_attn_norm {
                rms_norm_in_place(&mut h, w, eps);
            }
            x.iter_mut().zip(&h).for_each(|(x, o)| *x += o);
            self.rms_norm_rows(&x, &b.ffn_norm, eps, &mut h);
            self.matmuls(&mut [(&b.gate, &mut gate), (&b.up, &mut up)], &h, t, &mut acts);
            lora(seqs, l, Proj::Gate, &h, hidden, &mut gate, ffn);
            lora(seqs, l, Proj::Up, &h, hidden, &mut up, ffn);
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
            lora(seqs, l, Proj::Down, &gate, ffn, &mut h, hidden);
            if let Some(w) = &b.post_ffn_norm {
                rms_norm_in_place(&mut h, w, eps);
            }
            x.iter_mut().zip(&h).for_each(|(x, d)| *x += d);
        }
        // Each sequence's last row, normed, through the head in one product.
        let mut hl = vec![0f32; seqs.len() * hidden];
        for (s, out) in seqs.iter_mut().zip(hl.chunks_exact_mut(hidden)) {
            s.cache.len += s.rows.len();
            let last = s.rows.end - 1;
            rms_norm(&x[last * hidden..(last + 1) * hidden], &self.norm, eps, out);
        }
        let mut logits = vec![0f32; seqs.len() * self.output.n];
        self.matmuls(&mut [(&self.output, &mut logits)], &hl, seqs.len(), &mut acts);
        Ok(logits.chunks_exact(self.output.n).map(<[f32]>::to_vec).collect())
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
        kc: &[u16],
        vc: &[u16],
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
}

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
