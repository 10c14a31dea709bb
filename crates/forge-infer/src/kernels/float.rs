//! Kernels for `f16` and `bf16` weights, kept in their 16 bits (half the memory traffic of
//! `f32`) and widened in registers: F16C for `f16`, a shift for `bf16`.
//!
//! Each dot product is one 8-lane FMA accumulator over the row in steps of 8, then a horizontal
//! sum, then the last `k % 8` products in order — the same for every tile shape, so a prompt in
//! one batch gives the same numbers as its tokens one at a time. A prompt widens each quad of
//! rows to `f32` once (exactly) and runs tiles of 4 rows times 3 inputs (12 accumulators); one
//! token runs a row at a time.
//!
//! `bf16` weights on a CPU with AVX512-BF16 (and forge's AVX512 kernels) multiply in pairs with
//! `vdpbf16ps` instead — the input rounded to bf16 as well: the products are exact in f32, each
//! pair's sum rounds once — 16 lanes, 32 values a step, prompt tiles of 4 rows × 4 inputs.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::hsum;

/// The 16-bit weight formats.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Half {
    F16,
    BF16,
}

impl Half {
    pub(crate) fn to_f32(self, bits: u16) -> f32 {
        match self {
            Half::F16 => half::f16::from_bits(bits).to_f32(),
            Half::BF16 => half::bf16::from_bits(bits).to_f32(),
        }
    }
}

/// Rows `rows` of a `[n][k]` matrix of 16-bit weights times the `m` rows of `x` (already rounded
/// to the weights' precision): `out[i * ld + r]`.
///
/// # Safety
/// As `Mat::compute`: `w` holds the rows, `x` holds `m * k` values, `out` has room for
/// `m * ld` floats; the CPU has AVX2, FMA and F16C.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows(
    w: &[u16],
    ty: Half,
    k: usize,
    rows: Range<usize>,
    x: &[f32],
    xb: &[u16],
    m: usize,
    out: *mut f32,
    ld: usize,
) {
    assert!(rows.end * k <= w.len() && m * k <= x.len(), "within the buffers");
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match ty {
            Half::BF16 if has_dpbf16() => {
                assert!(m * k <= xb.len(), "the input as bf16");
                tiles_dpbf16(w, k, rows, xb, m, out, ld)
            }
            Half::F16 => tiles::<false>(w, k, rows, x, m, out, ld),
            Half::BF16 => tiles::<true>(w, k, rows, x, m, out, ld),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ty, xb, out, ld);
}

/// Whether `bf16` weights multiply with AVX512-BF16 (only with forge's AVX512 kernels,
/// `Kernels::Vnni`).
pub(crate) fn has_dpbf16() -> bool {
    static W: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *W.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if crate::matmul::Kernels::cpu() == crate::matmul::Kernels::Vnni {
            return is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16");
        }
        false
    })
}

/// `bf16` weights times `bf16` inputs with `vdpbf16ps`: 16 lanes, 32 values a step; tiles as
/// [`tiles`], 4 rows × 4 inputs for prompts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tiles_dpbf16(w: &[u16], k: usize, rows: Range<usize>, xb: &[u16], m: usize, out: *mut f32, ld: usize) {
    unsafe {
        let mut r = rows.start;
        if m > 1 {
            while r + 4 <= rows.end {
                let mut i = 0;
                while i + 4 <= m {
                    tile_dpbf16::<4, 4>(w, k, r, xb, i, out, ld);
                    i += 4;
                }
                while i < m {
                    tile_dpbf16::<4, 1>(w, k, r, xb, i, out, ld);
                    i += 1;
                }
                r += 4;
            }
        }
        while r < rows.end {
            for i in 0..m {
                tile_dpbf16::<1, 1>(w, k, r, xb, i, out, ld);
            }
            r += 1;
        }
    }
}

/// Rows `r..r + R` times inputs `i..i + C` with `vdpbf16ps`; the last `k % 32` products in
/// order after the horizontal sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dpbf16<const R: usize, const C: usize>(
    w: &[u16],
    k: usize,
    r: usize,
    xb: &[u16],
    i: usize,
    out: *mut f32,
    ld: usize,
) {
    unsafe {
        let wp: [*const u16; R] = std::array::from_fn(|j| w.as_ptr().add((r + j) * k));
        let xp: [*const u16; C] = std::array::from_fn(|c| xb.as_ptr().add((i + c) * k));
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let body = k / 32 * 32;
        let mut e = 0;
        while e < body {
            let xs: [__m512bh; C] =
                std::array::from_fn(|c| std::mem::transmute(_mm512_loadu_si512(xp[c].add(e) as *const _)));
            for j in 0..R {
                let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp[j].add(e) as *const _));
                for c in 0..C {
                    acc[j][c] = _mm512_dpbf16_ps(acc[j][c], wv, xs[c]);
                }
            }
            e += 32;
        }
        for j in 0..R {
            for c in 0..C {
                let v = acc[j][c];
                let mut s = hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v)));
                for t in body..k {
                    s += Half::BF16.to_f32(*wp[j].add(t)) * Half::BF16.to_f32(*xp[c].add(t));
                }
                *out.add((i + c) * ld + r + j) = s;
            }
        }
    }
}

/// 8-lane tiles: a prompt's rows by quads, widened to f32 once and multiplied with 3 inputs at a
/// time; one token a row at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles<const BF: bool>(
    w: &[u16],
    k: usize,
    rows: Range<usize>,
    x: &[f32],
    m: usize,
    out: *mut f32,
    ld: usize,
) {
    unsafe {
        let mut r = rows.start;
        if m > 1 {
            // Each quad of rows widened to f32 once (exactly), then multiplied by every input,
            // 3 at a time. (16-lane tiles and inputs blocked for L1 measured no faster.)
            let mut wide = vec![0f32; 4 * k];
            let ty = if BF { Half::BF16 } else { Half::F16 };
            while r + 4 <= rows.end {
                for (j, row) in wide.chunks_exact_mut(k).enumerate() {
                    let src = w.as_ptr().add((r + j) * k);
                    let mut e = 0;
                    while e + 8 <= k {
                        _mm256_storeu_ps(row.as_mut_ptr().add(e), widen::<BF>(src.add(e)));
                        e += 8;
                    }
                    (e..k).for_each(|t| row[t] = ty.to_f32(*src.add(t)));
                }
                let mut i = 0;
                while i + 3 <= m {
                    tile_f32::<4, 3>(&wide, k, r, x, i, out, ld);
                    i += 3;
                }
                while i < m {
                    tile_f32::<4, 1>(&wide, k, r, x, i, out, ld);
                    i += 1;
                }
                r += 4;
            }
        }
        // One token: a row at a time streams from memory fastest (measured: 2, 4 or 8 rows
        // interleaved run at half the speed on an EPYC).
        while r < rows.end {
            for i in 0..m {
                tile::<BF, 1, 1>(w, k, r, x, i, out, ld);
            }
            r += 1;
        }
    }
}

/// 8 weights at `p`, widened to `f32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen<const BF: bool>(p: *const u16) -> __m256 {
    unsafe {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))) } else { _mm256_cvtph_ps(h) }
    }
}

/// [`tile`] on rows already widened to `f32` (`w` holds rows `r..r + R`): the same sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_f32<const R: usize, const C: usize>(
    w: &[f32],
    k: usize,
    r: usize,
    x: &[f32],
    i: usize,
    out: *mut f32,
    ld: usize,
) {
    unsafe {
        let wp: [*const f32; R] = std::array::from_fn(|j| w.as_ptr().add(j * k));
        let xp: [*const f32; C] = std::array::from_fn(|c| x.as_ptr().add((i + c) * k));
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let body = k / 8 * 8;
        let mut e = 0;
        while e < body {
            let xs: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(xp[c].add(e)));
            for j in 0..R {
                let wv = _mm256_loadu_ps(wp[j].add(e));
                for c in 0..C {
                    acc[j][c] = _mm256_fmadd_ps(wv, xs[c], acc[j][c]);
                }
            }
            e += 8;
        }
        for j in 0..R {
            for c in 0..C {
                let mut s = hsum(acc[j][c]);
                for t in body..k {
                    s += *wp[j].add(t) * *xp[c].add(t);
                }
                *out.add((i + c) * ld + r + j) = s;
            }
        }
    }
}

/// Rows `r..r + R` times inputs `i..i + C`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const BF: bool, const R: usize, const C: usize>(
    w: &[u16],
    k: usize,
    r: usize,
    x: &[f32],
    i: usize,
    out: *mut f32,
    ld: usize,
) {
    unsafe {
        let wp: [*const u16; R] = std::array::from_fn(|j| w.as_ptr().add((r + j) * k));
        let xp: [*const f32; C] = std::array::from_fn(|c| x.as_ptr().add((i + c) * k));
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let body = k / 8 * 8;
        let mut e = 0;
        while e < body {
            let xs: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(xp[c].add(e)));
            for j in 0..R {
                let wv = widen::<BF>(wp[j].add(e));
                for c in 0..C {
                    acc[j][c] = _mm256_fmadd_ps(wv, xs[c], acc[j][c]);
                }
            }
            e += 8;
        }
        let ty = if BF { Half::BF16 } else { Half::F16 };
        for j in 0..R {
            for c in 0..C {
                let mut s = hsum(acc[j][c]);
                for t in body..k {
                    s += ty.to_f32(*wp[j].add(t)) * *xp[c].add(t);
                }
                *out.add((i + c) * ld + r + j) = s;
            }
        }
    }
}
