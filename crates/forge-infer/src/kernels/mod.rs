//! forge's CPU kernels (x86-64). `q8_0`/`q4_0` weights times `q8_0` inputs give exactly candle's
//! `vec_dot` (`avx::vec_dot_q8_0_q8_0`, `vec_dot_q4_0_q8_0`): per 32-value block, 8 lanes of
//! 4-value integer sums, converted to f32, scaled by `d_w * d_x` (an f32 product) and
//! FMA-accumulated in block order, then candle's horizontal sum. Only the integer sums are
//! formed differently: VNNI's `vpdpbusd` needs unsigned × signed bytes, so `q8_0` weights are
//! stored as `x + 128` and `q4_0` nibbles stay `0..=15`, each corrected by a multiple of the
//! input block's lane sums — exact in `i32`.

pub mod float;
pub mod kquant;
pub mod legacy;
pub mod vnni;

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType as _};

use crate::matmul::{Acts, Kernels, Par};

fn has_fma() -> bool {
    Kernels::cpu() != Kernels::Candle
}

/// Rounds every value to the nearest `f16` (ties to even), as ggml's `f32` → `f16` does.
pub fn round_f16(x: &mut [f32]) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has AVX2 and F16C.
        i = unsafe { round_f16_f16c(x) };
    }
    for v in &mut x[i..] {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

/// [`round_f16`] of the multiples of 8; returns how many it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn round_f16_f16c(x: &mut [f32]) -> usize {
    let n = x.len() / 8 * 8;
    for c in (0..n).step_by(8) {
        // SAFETY: `c + 8 <= x.len()`.
        unsafe {
            let p = x.as_mut_ptr().add(c);
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
            _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
        }
    }
    n
}

/// `a · b`.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { dot_avx2(a, b) };
    }
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `src` rounded to `f16` (ties to even) as raw `f16` bits into `out` (as long): KV cache rows.
pub fn to_f16(src: &[f32], out: &mut [u16]) {
    assert_eq!(src.len(), out.len());
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has AVX2 and F16C; both slices hold `src.len()` values.
        unsafe {
            while i + 8 <= src.len() {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
                _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
                i += 8;
            }
        }
    }
    for (o, v) in out[i..].iter_mut().zip(&src[i..]) {
        *o = half::f16::from_f32(*v).to_bits();
    }
}

/// `f16` bits as `f32`s (exact).
fn widen_f16(h: &[u16], out: &mut [f32]) {
    out.iter_mut().zip(h).for_each(|(o, h)| *o = half::f16::from_bits(*h).to_f32());
}

/// `scores[j - keys.start] = (q · k_j) * scale` for the `f16` keys `k_j = kc[j * stride + off..][..q.len()]`,
/// each dot product as [`dot_f32`] computes it on the keys widened to `f32`.
pub fn scores(q: &[f32], kc: &[u16], stride: usize, off: usize, keys: Range<usize>, scale: f32, out: &mut Vec<f32>) {
    let hd = q.len();
    let key = |j: usize| &kc[j * stride + off..][..hd];
    let mut j = keys.start;
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        if hd.is_multiple_of(16) {
            while j + 4 <= keys.end {
                // SAFETY: the CPU has AVX2, FMA and F16C; the 4 keys hold hd values each.
                let d = unsafe { dot4_f16_avx2(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]) };
                out.extend(d.map(|d| d * scale));
                j += 4;
            }
        }
        // SAFETY: as above.
        out.extend((j..keys.end).map(|j| unsafe { dot_avx2(q, key(j)) } * scale));
        return;
    }
    let mut k = vec![0f32; hd];
    for j in j..keys.end {
        widen_f16(key(j), &mut k);
        out.push(dot_f32(q, &k) * scale);
    }
}

/// Values a dot product with `f32`s reads 8 at a time, widened to `f32`: cached keys (`f16`
/// bits) or `f32`s.
#[cfg(target_arch = "x86_64")]
trait Lanes: Copy {
    /// 8 values from `p` as `f32`s.
    ///
    /// # Safety
    /// 8 values are readable at `p`; the CPU has AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
    fn to_f32(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for f32 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    fn to_f32(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for u16 {
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const u16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
}

/// `a · b` (`b` widened to `f32`): two accumulators over 16 values at a time, then 8, candle's
/// horizontal sum, then the rest one by one — [`dot_f32`]'s order whatever `b` holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_avx2<T: Lanes>(a: &[f32], b: &[T]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    unsafe {
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), T::load8(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), T::load8(pb.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), T::load8(pb.add(i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += *pa.add(i) * (*pb.add(i)).to_f32();
            i += 1;
        }
        s
    }
}

/// Four [`dot_avx2`]s of `q` (a multiple of 16 long) sharing its loads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_f16_avx2(q: &[f32], k: [&[u16]; 4]) -> [f32; 4] {
    let n = q.len();
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    unsafe {
        while i + 16 <= n {
            let q0 = _mm256_loadu_ps(q.as_ptr().add(i));
            let q1 = _mm256_loadu_ps(q.as_ptr().add(i + 8));
            for (acc, k) in acc.iter_mut().zip(&k) {
                acc[0] = _mm256_fmadd_ps(q0, u16::load8(k.as_ptr().add(i)), acc[0]);
                acc[1] = _mm256_fmadd_ps(q1, u16::load8(k.as_ptr().add(i + 8)), acc[1]);
            }
            i += 16;
        }
    }
    [0, 1, 2, 3].map(|j| hsum(_mm256_add_ps(acc[j][0], acc[j][1])))
}

/// `out = Σ_j p[j - first] · v_j` over the `f16` values `v_j = vc[j * stride + off..][..out.len()]`,
/// each element accumulated in `j` order with FMAs, as repeated [`axpy`]s from zero do.
pub fn weighted_sum(p: &[f32], vc: &[u16], stride: usize, off: usize, first: usize, out: &mut [f32]) {
    let hd = out.len();
    let mut c = 0;
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        while c + 64 <= hd {
            // SAFETY: the CPU has AVX2, FMA and F16C; every value row holds hd values at off.
            unsafe { weighted_sum64_avx2(p, vc, stride, off + c, first, &mut out[c..c + 64]) };
            c += 64;
        }
    }
    if c < hd {
        let rest = &mut out[c..];
        rest.fill(0.0);
        let mut v = vec![0f32; hd - c];
        for (j, &pj) in p.iter().enumerate() {
            widen_f16(&vc[(first + j) * stride + off + c..][..hd - c], &mut v);
            axpy(pj, &v, rest);
        }
    }
}

/// [`weighted_sum`] of 64 values, kept in registers across the keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum64_avx2(p: &[f32], vc: &[u16], stride: usize, off: usize, first: usize, out: &mut [f32]) {
    let mut o = [_mm256_setzero_ps(); 8];
    for (j, &pj) in p.iter().enumerate() {
        let v = vc[(first + j) * stride + off..][..64].as_ptr();
        let a = _mm256_set1_ps(pj);
        for (r, o) in o.iter_mut().enumerate() {
            *o = _mm256_fmadd_ps(a, unsafe { u16::load8(v.add(8 * r)) }, *o);
        }
    }
    for (r, o) in o.iter().enumerate() {
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * r), *o) };
    }
}

/// `g = gelu_tanh(g) * u`, elementwise.
pub fn gelu_mul(g: &mut [f32], u: &[f32]) {
    let n = g.len().min(u.len());
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        i = unsafe { gelu_mul_avx2(&mut g[..n], &u[..n]) };
    }
    for j in i..n {
        g[j] = gelu_tanh(g[j]) * u[j];
    }
}

/// The multiples of 8 of [`gelu_mul`]; returns how many it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_mul_avx2(g: &mut [f32], u: &[f32]) -> usize {
    let n = g.len() / 8 * 8;
    let (c1, c2, one) = (_mm256_set1_ps(GELU_C1), _mm256_set1_ps(GELU_C2), _mm256_set1_ps(1.0));
    for i in (0..n).step_by(8) {
        unsafe {
            let x = _mm256_loadu_ps(g.as_ptr().add(i));
            let t = _mm256_mul_ps(x, _mm256_fmadd_ps(c2, _mm256_mul_ps(x, x), c1));
            let y = _mm256_div_ps(x, _mm256_add_ps(one, exp_avx2(t)));
            _mm256_storeu_ps(g.as_mut_ptr().add(i), _mm256_mul_ps(y, _mm256_loadu_ps(u.as_ptr().add(i))));
        }
    }
    n
}

/// `e^x` (Cephes' `expf`: within 2 ulp), clamped to finite results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
    let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
    let z = _mm256_mul_ps(x, x);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0));
    let n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n)))
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { axpy_avx2(a, x, y) };
    }
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    unsafe {
        while i + 8 <= n {
            _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
            i += 8;
        }
        while i < n {
            *py.add(i) += a * *px.add(i);
            i += 1;
        }
    }
}

/// candle's `hsum_float_8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum(x: __m256) -> f32 {
    let res = _mm256_extractf128_ps(x, 1);
    let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// Rows of an `f32` matrix times the `m` rows of `x`.
///
/// # Safety
/// As `Mat::compute`.
pub unsafe fn f32_rows(w: &[f32], k: usize, rows: Range<usize>, x: &[f32], m: usize, out: *mut f32, ld: usize) {
    for r in rows {
        let wr = &w[r * k..(r + 1) * k];
        for i in 0..m {
            unsafe { *out.add(i * ld + r) = dot_f32(wr, &x[i * k..(i + 1) * k]) };
        }
    }
}

/// Quantizes the rows of `x` to `q8_0` exactly as candle's `BlockQ8_0::from_float` does
/// (scale `amax / 127` rounded to f16, values `round(x / d)` half away from zero), with each
/// block's scale as `f32`, its lane sums (of 4 values) times -128 and -8, and `q8_1`'s sum
/// `s = d · Σq` rounded to f16 (ggml's `quantize_row_q8_1`, with the unrounded scale).
pub(crate) fn quantize_q8_0(x: &[f32], k: usize, a: &mut Acts, par: Par<'_>) {
    let nb = x.len() / 32;
    a.q8_0.resize(nb, BlockQ8_0::zeros());
    a.dy.resize(nb, 0.0);
    a.s.resize(nb, 0.0);
    a.ysum.resize(nb, 0);
    a.c128.resize(nb, [0; 8]);
    a.c8.resize(nb, [0; 8]);
    assert!(x.len() == nb * 32 && k.is_multiple_of(32));
    let (y, dy, sums) = (a.q8_0.as_mut_ptr() as usize, OutPtr(a.dy.as_mut_ptr()), OutPtr(a.s.as_mut_ptr()));
    let ysum = a.ysum.as_mut_ptr() as usize;
    let (c128, c8) = (a.c128.as_mut_ptr() as usize, a.c8.as_mut_ptr() as usize);
    let kb = k / 32;
    par(x.len() / k, &|rows| {
        let b0 = rows.start * kb;
        let n = rows.len() * kb;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forge's kernels run only where the CPU has AVX2, FMA and F16C; each range
        // of rows writes its own blocks of the buffers sized above.
        unsafe {
            quantize_q8_0_avx2(
                &x[b0 * 32..(b0 + n) * 32],
                (y as *mut u8).add(b0 * 34),
                std::slice::from_raw_parts_mut(dy.get().add(b0), n),
                std::slice::from_raw_parts_mut(sums.get().add(b0), n),
                std::slice::from_raw_parts_mut((ysum as *mut i32).add(b0), n),
                std::slice::from_raw_parts_mut((c128 as *mut [i32; 8]).add(b0), n),
                std::slice::from_raw_parts_mut((c8 as *mut [i32; 8]).add(b0), n),
            )
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b0, n, y, dy, sums, ysum, c128, c8);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_0_avx2(
    x: &[f32],
    y: *mut u8,
    dy: &mut [f32],
    sums: &mut [f32],
    ysum: &mut [i32],
    c128: &mut [[i32; 8]],
    c8: &mut [[i32; 8]],
) {
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    for (b, xs) in x.chunks_exact(32).enumerate() {
        unsafe {
            let v = [
                _mm256_loadu_ps(xs.as_ptr()),
                _mm256_loadu_ps(xs.as_ptr().add(8)),
                _mm256_loadu_ps(xs.as_ptr().add(16)),
                _mm256_loadu_ps(xs.as_ptr().add(24)),
            ];
            let a = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
            );
            let a4 = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
            let a2 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            let amax = _mm_cvtss_f32(_mm_max_ss(a2, _mm_movehdup_ps(a2)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let dh = _mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set_ss(d));
            let bits = _mm_extract_epi16::<0>(dh) as u16;
            dy[b] = _mm_cvtss_f32(_mm_cvtph_ps(dh));
            let mul = _mm256_set1_ps(id);
            let mut q = [_mm256_setzero_si256(); 4];
            for (q, &v) in q.iter_mut().zip(&v) {
                // round half away from zero: trunc, then one more unit where |frac| >= 0.5
                let s = _mm256_mul_ps(v, mul);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(s, t));
                let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
                let unit = _mm256_or_ps(_mm256_and_ps(s, sign), one);
                *q = _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, unit)));
            }
            let i01 = _mm256_packs_epi32(q[0], q[1]);
            let i23 = _mm256_packs_epi32(q[2], q[3]);
            let i = _mm256_packs_epi16(i01, i23);
            let i = _mm256_permutevar8x32_epi32(i, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            let blk = y.add(b * 34);
            std::ptr::write_unaligned(blk as *mut u16, bits);
            _mm256_storeu_si256(blk.add(2) as *mut __m256i, i);
            let s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, i), ones16);
            let neg = _mm256_sub_epi32(_mm256_setzero_si256(), s);
            let h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h)));
            sums[b] = half::f16::from_f32(d * total as f32).to_f32();
            ysum[b] = total;
            _mm256_storeu_si256(c128[b].as_mut_ptr() as *mut __m256i, _mm256_slli_epi32::<7>(neg));
            _mm256_storeu_si256(c8[b].as_mut_ptr() as *mut __m256i, _mm256_slli_epi32::<3>(neg));
        }
    }
}

/// GELU, tanh approximation (gemma's `gelu_pytorch_tanh`, ggml's `gelu`), written as
/// `x · sigmoid(2u)` = `x / (1 + e^(-2u))` with `u = √(2/π)(x + 0.044715x³)`.
pub fn gelu_tanh(x: f32) -> f32 {
    x / (1.0 + (x * (GELU_C1 + GELU_C2 * x * x)).exp())
}

/// `-2√(2/π)` and `-2√(2/π) · 0.044715`.
const GELU_C1: f32 = -1.595_769;
const GELU_C2: f32 = -0.071_354_82;

/// A raw output pointer shared by the workers of a pass, each writing its own elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super as simd;

    /// The vector rounding to `f16` equals the scalar one (round to nearest, ties to even) on
    /// ties, subnormals, overflow, infinities and NaN, and on values between.
    #[test]
    fn f16_rounding_rounds_to_nearest_even() {
        let mut x: Vec<f32> = vec![
            1.0 + 2f32.powi(-11),       // a tie: down to 1.0 (even)
            1.0 + 3.0 * 2f32.powi(-11), // a tie: up to 1 + 2^-9
            6.0e-8,                     // a subnormal f16
            1.0e-9,                     // underflows to 0
            65520.0,                    // overflows to infinity
            -65519.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let mut rng = forge_rng::SplitMix64::new(7);
        x.extend((0..997).map(|_| (rng.next_f64() as f32 - 0.5) * 2f32.powi((rng.next_u64() % 40) as i32 - 20)));
        let want: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let mut got = x.clone();
        simd::round_f16(&mut got);
        assert_eq!(got[0], 1.0);
        assert_eq!(got[1], 1.0 + 2f32.powi(-9));
        assert_eq!(got[4], f32::INFINITY);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{}: {g} vs {w}", x[i]);
        }
        let mut nan = [f32::NAN; 8];
        simd::round_f16(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
    }
}
