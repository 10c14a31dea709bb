//! Matrix products of the training engine.
//!
//! A frozen weight `W` `[out, in]` multiplies activations two ways: forward `Y = X Wᵀ` and, for
//! the gradient of the activations, `dX = dY W`. [`Frozen`] keeps it in one of two forms:
//!
//! - `f32`: both products run on the `gemm` crate (what candle uses), exactly in f32;
//! - `bf16`: the weight rounded to bf16 (round to nearest even) and packed once for each product,
//!   so that 32 output columns of one K-pair are one 64-byte line. A product rounds the
//!   activations to bf16 too and multiplies with AVX512-BF16 `vdpbf16ps`, summing in f32: two
//!   bf16 products per f32 lane per instruction, twice the multiply rate of f32 FMA, at half the
//!   memory. On a CPU without AVX512-BF16 the same rounded numbers are multiplied in f32 (the
//!   products of two bf16 values are exact in f32), so the result does not depend on the CPU
//!   beyond the order of the sums.
//!
//! The bf16 kernel is a register-blocked `MR × 32` tile (24 of the 32 zmm registers accumulate),
//! looping over K in blocks whose B panel stays in L1, parallel over row chunks.

use rayon::prelude::*;

/// Rounds to bf16 (nearest, ties to even), as its bits.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline]
pub fn bf16_value(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to bf16, as f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16_value(bf16_bits(x))
}

/// Columns per packed panel.
const NR: usize = 32;
/// Rows per register tile.
const MR: usize = 12;
/// K-pairs per block: a block of one panel is 256 × 128 B = 32 KiB.
const KC2: usize = 256;
/// Rows per parallel task.
const MC: usize = 96;

/// Whether this CPU multiplies bf16 in hardware.
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix `B` `[k, n]` packed for the bf16 kernel: `n` padded to panels of 32 columns, `k` to
/// pairs; panel `p`, pair `kp`, column `j` at `(p · k2 + kp) · 32 + j` holds
/// `B[2kp][32p+j] | B[2kp+1][32p+j] << 16`.
#[derive(Clone, Debug)]
struct Packed {
    k2: usize,
    n: usize,
    data: Vec<u32>,
}

impl Packed {
    /// Packs `B` given by `at(kk, j)` (already rounded to bf16 bits).
    fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> u16 + Sync) -> Packed {
        let k2 = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k2 * NR];
        data.par_chunks_mut(k2 * NR).enumerate().for_each(|(p, panel)| {
            for kp in 0..k2 {
                for j in 0..NR {
                    let col = p * NR + j;
                    if col >= n {
                        continue;
                    }
                    let lo = at(2 * kp, col) as u32;
                    let hi = if 2 * kp + 1 < k { at(2 * kp + 1, col) as u32 } else { 0 };
                    panel[kp * NR + j] = lo | (hi << 16);
                }
            }
        });
        Packed { k2, n, data }
    }

    fn panel(&self, p: usize) -> &[u32] {
        &self.data[p * self.k2 * NR..(p + 1) * self.k2 * NR]
    }

    /// The bf16 bits of `B[kk][j]`.
    #[inline]
    fn at(&self, kk: usize, j: usize) -> u16 {
        let word = self.data[((j / NR) * self.k2 + kk / 2) * NR + j % NR];
        (word >> (16 * (kk % 2))) as u16
    }
}

/// A frozen weight `[rows = out, cols = in]`.
#[derive(Clone, Debug)]
pub struct Frozen {
    pub rows: usize,
    pub cols: usize,
    repr: Repr,
}

#[derive(Clone, Debug)]
enum Repr {
    F32(Vec<f32>),
    /// Packed for `X Wᵀ` (B = Wᵀ: k = in, n = out) and, when kept, for `dY W` (B = W: k = out,
    /// n = in); otherwise that packing is made from the first for each product (a pass over the
    /// weight, small beside the product, for half the memory).
    Bf16 {
        nt: Packed,
        nn: Option<Packed>,
    },
    /// bf16 values in f32, for CPUs without AVX512-BF16.
    Bf16Emulated(Vec<f32>),
}

impl Frozen {
    /// `w` row-major `[rows, cols]`, kept in f32.
    pub fn f32(w: Vec<f32>, rows: usize, cols: usize) -> Frozen {
        assert_eq!(w.len(), rows * cols);
        Frozen { rows, cols, repr: Repr::F32(w) }
    }

    /// `w` row-major `[rows, cols]`, rounded to bf16 (2 bytes a weight; 4 with `both`, which
    /// keeps the backward packing too — for a matrix whose products come in many small calls, as
    /// the LM head's do).
    pub fn bf16(w: &[f32], rows: usize, cols: usize, both: bool) -> Frozen {
        assert_eq!(w.len(), rows * cols);
        if !has_bf16() {
            return Frozen { rows, cols, repr: Repr::Bf16Emulated(w.iter().map(|v| round_bf16(*v)).collect()) };
        }
        let nt = Packed::new(cols, rows, |kk, j| bf16_bits(w[j * cols + kk]));
        let nn = both.then(|| Packed::new(rows, cols, |kk, j| bf16_bits(w[kk * cols + j])));
        Frozen { rows, cols, repr: Repr::Bf16 { nt, nn } }
    }

    /// The `dY W` packing made from the `X Wᵀ` one.
    fn transposed(nt: &Packed, rows: usize, cols: usize) -> Packed {
        Packed::new(rows, cols, |kk, j| nt.at(j, kk))
    }

    pub fn is_bf16(&self) -> bool {
        !matches!(self.repr, Repr::F32(_))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.repr {
            Repr::F32(w) | Repr::Bf16Emulated(w) => w.len() * 4,
            Repr::Bf16 { nt, nn } => (nt.data.len() + nn.as_ref().map_or(0, |p| p.data.len())) * 4,
        }
    }

    /// Row `r` of the weight, in f32 (an embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match &self.repr {
            Repr::F32(w) | Repr::Bf16Emulated(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
            // In the `X Wᵀ` packing, W[r][c] is B[c][r].
            Repr::Bf16 { nt, .. } => out.iter_mut().enumerate().for_each(|(c, o)| *o = bf16_value(nt.at(c, r))),
        }
    }

    /// `y[m, rows] (+)= x[m, cols] · Wᵀ`.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        assert_eq!(x.len(), m * self.cols);
        assert_eq!(y.len(), m * self.rows);
        match &self.repr {
            Repr::F32(w) => gemm_f32(m, self.rows, self.cols, x, self.cols, 1, w, 1, self.cols, y, accumulate, true),
            Repr::Bf16Emulated(w) => {
                let xr: Vec<f32> = x.par_iter().map(|v| round_bf16(*v)).collect();
                gemm_f32(m, self.rows, self.cols, &xr, self.cols, 1, w, 1, self.cols, y, accumulate, true)
            }
            Repr::Bf16 { nt, .. } => gemm_bf16(m, x, self.cols, nt, y, accumulate),
        }
    }

    /// `dx[m, cols] (+)= dy[m, rows] · W`.
    pub fn backward(&self, dy: &[f32], m: usize, dx: &mut [f32], accumulate: bool) {
        assert_eq!(dy.len(), m * self.rows);
        assert_eq!(dx.len(), m * self.cols);
        match &self.repr {
            Repr::F32(w) => gemm_f32(m, self.cols, self.rows, dy, self.rows, 1, w, self.cols, 1, dx, accumulate, true),
            Repr::Bf16Emulated(w) => {
                let dr: Vec<f32> = dy.par_iter().map(|v| round_bf16(*v)).collect();
                gemm_f32(m, self.cols, self.rows, &dr, self.rows, 1, w, self.cols, 1, dx, accumulate, true)
            }
            Repr::Bf16 { nn: Some(nn), .. } => gemm_bf16(m, dy, self.rows, nn, dx, accumulate),
            Repr::Bf16 { nt, nn: None } => {
                gemm_bf16(m, dy, self.rows, &Self::transposed(nt, self.rows, self.cols), dx, accumulate)
            }
        }
    }
}

/// `c[m, n] (+)= a[m, k] · b[k, n]` in f32 on the `gemm` crate, with `a` given by its row and
/// column strides and `b` likewise; `c` is row-major. `parallel`: large products use the rayon
/// pool (pass `false` from inside parallel tasks).
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
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
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len(), "gemm: a is too short");
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len(), "gemm: b is too short");
    assert!(c.len() >= m * n, "gemm: c is too short");
    let threads = rayon::current_num_threads();
    let par = if parallel && m * n * k >= 1 << 18 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the strides and sizes were checked against the slices above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Rounds rows of `x` `[m, k]` to bf16 pairs `[m, k2]`.
fn to_pairs(x: &[f32], m: usize, k: usize, k2: usize) -> Vec<u32> {
    let mut out = vec![0u32; m * k2];
    out.par_chunks_mut(k2).zip(x.par_chunks(k)).with_min_len(16).for_each(|(o, row)| {
        for (kp, w) in o.iter_mut().enumerate() {
            let lo = bf16_bits(row[2 * kp]) as u32;
            let hi = if 2 * kp + 1 < k { bf16_bits(row[2 * kp + 1]) as u32 } else { 0 };
            *w = lo | (hi << 16);
        }
    });
    out
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `c[m, b.n] (+)= a[m, k] · B` with the bf16 kernel.
fn gemm_bf16(m: usize, a: &[f32], k: usize, b: &Packed, c: &mut [f32], accumulate: bool) {
    let (n, k2) = (b.n, b.k2);
    debug_assert_eq!(k.div_ceil(2), k2);
    let ap = to_pairs(a, m, k, k2);
    let cp = SendPtr(c.as_mut_ptr());
    let cp = &cp;
    let panels = n.div_ceil(NR);
    let chunks = m.div_ceil(MC);
    // Row chunks in parallel; when there are few rows, split the panels too.
    let split = if chunks >= rayon::current_num_threads() { 1 } else { panels.div_ceil(8).max(1) };
    (0..chunks * split).into_par_iter().for_each(|task| {
        let (ic, part) = (task / split, task % split);
        let (r0, r1) = (ic * MC, ((ic + 1) * MC).min(m));
        let per = panels.div_ceil(split);
        let (p0, p1) = (part * per, ((part + 1) * per).min(panels));
        let mut kb = 0;
        while kb < k2 {
            let kn = KC2.min(k2 - kb);
            let acc = accumulate || kb > 0;
            for p in p0..p1 {
                let panel = &b.panel(p)[kb * NR..(kb + kn) * NR];
                let cols = NR.min(n - p * NR);
                let mut r = r0;
                while r < r1 {
                    let rows = MR.min(r1 - r);
                    // SAFETY: tasks write disjoint (row chunk, panel) tiles of c; the tile lies
                    // inside c ([m, n] row-major) and a's rows r..r+rows, pairs kb..kb+kn exist.
                    unsafe {
                        let a_tile = ap.as_ptr().add(r * k2 + kb);
                        let c_tile = cp.0.add(r * n + p * NR);
                        tile(rows, cols, kn, a_tile, k2, panel.as_ptr(), c_tile, n, acc);
                    }
                    r += rows;
                }
            }
            kb += kn;
        }
    });
}

/// One `rows × cols` tile (rows ≤ MR, cols ≤ 32) over `kn` K-pairs.
///
/// # Safety
/// `a` holds `rows` rows of stride `lda` with `kn` pairs each, `b` `kn × 32` pairs, and `c`
/// `rows` rows of stride `ldc` with `cols` columns.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    rows: usize,
    cols: usize,
    kn: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract, and the packed form exists only where `has_bf16()`.
    unsafe {
        macro_rules! dispatch {
            ($($n:literal)*) => {
                match rows {
                    $($n => avx512::kernel::<$n>(cols, kn, a, lda, b, c, ldc, acc),)*
                    _ => unreachable!("a tile has 1..=MR rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, cols, kn, a, lda, b, c, ldc, acc);
        unreachable!("the packed bf16 form is built only on x86_64 with AVX512-BF16")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::NR;

    /// `C[MR × cols] (+)= A[MR × 2kn] · B[2kn × 32]`, bf16 pairs, f32 sums.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel<const MR: usize>(
        cols: usize,
        kn: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        // SAFETY: the caller's contract (see `super::tile`).
        unsafe {
            let mut s = [[_mm512_setzero_ps(); 2]; MR];
            for kp in 0..kn {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(kp * NR) as *const _));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(kp * NR + 16) as *const _));
                for (i, si) in s.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * lda + kp) as i32));
                    si[0] = _mm512_dpbf16_ps(si[0], av, b0);
                    si[1] = _mm512_dpbf16_ps(si[1], av, b1);
                }
            }
            let m0: __mmask16 = if cols >= 16 { 0xffff } else { (1u32 << cols) as u16 - 1 };
            let m1: __mmask16 = if cols >= 32 {
                0xffff
            } else if cols > 16 {
                (1u32 << (cols - 16)) as u16 - 1
            } else {
                0
            };
            for (i, si) in s.iter().enumerate() {
                let row = c.add(i * ldc);
                let (mut v0, mut v1) = (si[0], si[1]);
                if acc {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = forge_rng::SplitMix64::new(seed);
        (0..n).map(|_| rng.next_normal() as f32).collect()
    }

    /// The products in f64 of the bf16-rounded inputs: what the kernel computes up to f32 sums.
    fn reference(x: &[f32], w: &[f32], m: usize, out: usize, inn: usize, transpose: bool) -> Vec<f64> {
        let r = |v: f32| round_bf16(v) as f64;
        let mut y = vec![0f64; m * if transpose { out } else { inn }];
        for i in 0..m {
            if transpose {
                for o in 0..out {
                    y[i * out + o] = (0..inn).map(|k| r(x[i * inn + k]) * r(w[o * inn + k])).sum();
                }
            } else {
                for c in 0..inn {
                    y[i * inn + c] = (0..out).map(|k| r(x[i * out + k]) * r(w[k * inn + c])).sum();
                }
            }
        }
        y
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn bf16_products_match_the_rounded_reference_at_every_edge() {
        // Odd sizes: tails in rows (not whole tiles), columns (not whole panels) and K (odd).
        for &(m, out, inn) in &[(1, 1, 1), (13, 33, 7), (97, 70, 515), (25, 64, 600)] {
            let x = data(m * inn, 1);
            let w = data(out * inn, 2);
            let dy = data(m * out, 3);
            for both in [true, false] {
                let f = Frozen::bf16(&w, out, inn, both);
                let mut y = vec![0f32; m * out];
                f.forward(&x, m, &mut y, false);
                let want = reference(&x, &w, m, out, inn, true);
                for (a, b) in y.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "forward {m}x{out}x{inn}: {a} vs {b}");
                }
                let mut dx = vec![1f32; m * inn];
                f.backward(&dy, m, &mut dx, true);
                let want = reference(&dy, &w, m, out, inn, false);
                for (a, b) in dx.iter().zip(&want) {
                    assert!(
                        (*a as f64 - (b + 1.0)).abs() <= 1e-4 * (1.0 + b.abs()),
                        "backward {m}x{out}x{inn}: {a} vs {b}"
                    );
                }
                let mut row = vec![0f32; inn];
                f.row(out - 1, &mut row);
                assert_eq!(row, w[(out - 1) * inn..].iter().map(|v| round_bf16(*v)).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn f32_products_are_exact_to_f32() {
        let (m, out, inn) = (9, 17, 23);
        let (x, w) = (data(m * inn, 4), data(out * inn, 5));
        let f = Frozen::f32(w.clone(), out, inn);
        let mut y = vec![0f32; m * out];
        f.forward(&x, m, &mut y, false);
        for i in 0..m {
            for o in 0..out {
                let want: f64 = (0..inn).map(|k| x[i * inn + k] as f64 * w[o * inn + k] as f64).sum();
                assert!((y[i * out + o] as f64 - want).abs() < 1e-4);
            }
        }
    }
}
