//! Kernels for the k-quants — `q4_K`, `q5_K`, `q6_K`: 256-value super-blocks with 6-bit (8-bit
//! for `q6_K`) sub-block scales — times `q8_K` inputs, on the blocks as the file stores them.
//!
//! Each follows ggml's AVX2 `vec_dot_q*_K_q8_K`: per super-block, the unsigned values times the
//! input bytes (`maddubs`, exact in `i16`), times the sub-block scales (`madd`, `i32`), summed in
//! 8 lanes, then `d_w · d_x` times that, FMA-accumulated; `q4_K`/`q5_K`'s minimums come from the
//! input's 16-value sums (`bsums`) times the 6-bit mins, scaled by `-dmin_w · d_x` and summed
//! apart. A tile is one row times up to 4 inputs: the row's values are unpacked once per 64 of
//! them and multiplied with every input of the tile, so a prompt reads each weight once per 4
//! tokens from cache rather than once per token.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use forge_gguf::GgmlType;

use super::hsum;

/// Bytes of a `q8_K` input block: `d` (f32), 256 values, 16 sums of 16 (`i16`).
pub(crate) const Q8K_BYTES: usize = 292;

/// Rows `rows` of a k-quant matrix (`nb` super-blocks a row) times `m` `q8_K` inputs: `out[i * ld + r]`.
///
/// # Safety
/// As `Mat::compute`: `w` holds `n * nb` blocks of `ty` (`rows` within them), `y` holds `m * nb`
/// input blocks, and `out` has room for `m * ld` floats.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows(
    w: &[u8],
    ty: GgmlType,
    nb: usize,
    rows: Range<usize>,
    y: &[u8],
    m: usize,
    out: *mut f32,
    ld: usize,
) {
    assert!(rows.end * nb * ty.block_bytes() <= w.len() && m * nb * Q8K_BYTES <= y.len(), "blocks within the buffers");
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let a = Args { w: w.as_ptr(), nb, bs: ty.block_bytes(), y: y.as_ptr(), out, ld };
        for r in rows {
            let mut i = 0;
            while i + 4 <= m {
                tile::<4>(&a, ty, r, i);
                i += 4;
            }
            while i < m {
                tile::<1>(&a, ty, r, i);
                i += 1;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (rows, out, ld);
}

#[cfg(target_arch = "x86_64")]
struct Args {
    w: *const u8,
    nb: usize,
    bs: usize,
    y: *const u8,
    out: *mut f32,
    ld: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const NR: usize>(a: &Args, ty: GgmlType, r: usize, i: usize) {
    unsafe {
        match ty {
            GgmlType::Q4K => q4_k::<NR>(a, r, i),
            GgmlType::Q5K => q5_k::<NR>(a, r, i),
            _ => q6_k::<NR>(a, r, i),
        }
    }
}

/// An f16 at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32))) }
}

/// The 8 scales and 8 mins (6 bits each) packed in the 12 bytes at `p`, unpacked as ggml does:
/// 8 bytes of scales (`u[0]`, `u[1]`), then 8 bytes of mins (`u[2]`, `u[3]`).
#[inline]
unsafe fn scales_mins(p: *const u8) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let mut u = [0u32; 4];
    // SAFETY: the caller's block holds 12 scale bytes at `p`.
    unsafe { std::ptr::copy_nonoverlapping(p, u.as_mut_ptr() as *mut u8, 12) };
    u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
    let uaux = u[1] & KMASK1;
    u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
    u[2] = uaux;
    u[0] &= KMASK1;
    u
}

/// The input's sums of 32 values (8 `i16`), from its 16 sums of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn sums32(yb: *const u8) -> __m128i {
    unsafe {
        let s = _mm256_loadu_si256(yb.add(260) as *const __m256i);
        _mm_hadd_epi16(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s))
    }
}

/// The sum of 4 floats in ggml's order for `acc_m`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum4(x: __m128) -> f32 {
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
}

/// Generates the kernel of a k-quant with 6-bit scales and mins (`q4_K`, `q5_K`): `$values`
/// gives the 64 values `64j..64j + 64` of block `$x` as two registers (0..=15 or 0..=31).
macro_rules! k_with_mins {
    ($name:ident, |$x:ident, $j:ident| $values:block) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn $name<const NR: usize>(a: &Args, r: usize, i: usize) {
            unsafe {
                let nb = a.nb;
                let mut acc = [_mm256_setzero_ps(); NR];
                let mut acc_m = [_mm_setzero_ps(); NR];
                for b in 0..nb {
                    let $x = a.w.add((r * nb + b) * a.bs);
                    let (d, dmin) = (f16_at($x), f16_at($x.add(2)));
                    let u = scales_mins($x.add(4));
                    let sm = _mm256_cvtepu8_epi16(_mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32));
                    let mins = _mm256_extracti128_si256::<1>(sm);
                    let sc = u[0].to_le_bytes().into_iter().chain(u[1].to_le_bytes());
                    let mut scale = [_mm256_setzero_si256(); 8];
                    for (s, v) in scale.iter_mut().zip(sc) {
                        *s = _mm256_set1_epi16(v as i16);
                    }
                    let ys: [*const u8; NR] = std::array::from_fn(|ii| a.y.add(((i + ii) * nb + b) * Q8K_BYTES));
                    let mut sumi = [_mm256_setzero_si256(); NR];
                    for $j in 0..4 {
                        let (lo, hi): (__m256i, __m256i) = $values;
                        for ii in 0..NR {
                            let q8 = ys[ii].add(4 + 64 * $j);
                            let pl = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(q8 as *const __m256i));
                            let ph = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(q8.add(32) as *const __m256i));
                            let p = _mm256_add_epi32(
                                _mm256_madd_epi16(scale[2 * $j], pl),
                                _mm256_madd_epi16(scale[2 * $j + 1], ph),
                            );
                            sumi[ii] = _mm256_add_epi32(sumi[ii], p);
                        }
                    }
                    for ii in 0..NR {
                        let dy = std::ptr::read_unaligned(ys[ii] as *const f32);
                        let prod = _mm_madd_epi16(mins, sums32(ys[ii]));
                        acc_m[ii] = _mm_fmadd_ps(_mm_set1_ps(-dy * dmin), _mm_cvtepi32_ps(prod), acc_m[ii]);
                        acc[ii] = _mm256_fmadd_ps(_mm256_set1_ps(dy * d), _mm256_cvtepi32_ps(sumi[ii]), acc[ii]);
                    }
                }
                for ii in 0..NR {
                    *a.out.add((i + ii) * a.ld + r) = hsum(acc[ii]) + hsum4(acc_m[ii]);
                }
            }
        }
    };
}

// q4_K: d, dmin, 12 scale bytes, 128 bytes of nibbles (64 values per 32 bytes: low, then high).
k_with_mins!(q4_k, |x, j| {
    let m4 = _mm256_set1_epi8(0x0F);
    let q = _mm256_loadu_si256(x.add(16 + 32 * j) as *const __m256i);
    (_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4))
});

// q5_K: d, dmin, 12 scale bytes, 32 bytes of high bits (bit 2j of byte e: value 64j + e's, bit
// 2j + 1: value 64j + 32 + e's), 128 bytes of nibbles as q4_K's.
k_with_mins!(q5_k, |x, j| {
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let q = _mm256_loadu_si256(x.add(48 + 32 * j) as *const __m256i);
    let h = _mm256_loadu_si256(x.add(16) as *const __m256i);
    let bit = |s: i32| {
        let b = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(s)), one);
        _mm256_slli_epi16::<4>(b)
    };
    let lo = _mm256_or_si256(_mm256_and_si256(q, m4), bit(2 * j as i32));
    let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), bit(2 * j as i32 + 1));
    (lo, hi)
});

/// q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed 8-bit scales (one
/// per 16 values), d; values `q - 32`, the 32 taken off as `32 · Σy` (`maddubs` of 32s).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6_k<const NR: usize>(a: &Args, r: usize, i: usize) {
    unsafe {
        let nb = a.nb;
        let (m4, m2, m32) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
        let mut acc = [_mm256_setzero_ps(); NR];
        for b in 0..nb {
            let x = a.w.add((r * nb + b) * a.bs);
            let d = f16_at(x.add(208));
            let sc = x.add(192) as *const i8;
            let ys: [*const u8; NR] = std::array::from_fn(|ii| a.y.add(((i + ii) * nb + b) * Q8K_BYTES));
            let mut sumi = [_mm256_setzero_si256(); NR];
            for c in 0..2 {
                let l1 = _mm256_loadu_si256(x.add(64 * c) as *const __m256i);
                let l2 = _mm256_loadu_si256(x.add(64 * c + 32) as *const __m256i);
                let h = _mm256_loadu_si256(x.add(128 + 32 * c) as *const __m256i);
                let v = [
                    _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(h, m2))),
                    _mm256_or_si256(
                        _mm256_and_si256(l2, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(h), m2)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(h), m2)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(l2), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(h), m2)),
                    ),
                ];
                let s: [__m256i; 4] = std::array::from_fn(|k| {
                    let lo = _mm_set1_epi16(*sc.add(8 * c + 2 * k) as i16);
                    let hi = _mm_set1_epi16(*sc.add(8 * c + 2 * k + 1) as i16);
                    _mm256_set_m128i(hi, lo)
                });
                for ii in 0..NR {
                    let q8 = ys[ii].add(4 + 128 * c);
                    for k in 0..4 {
                        let y = _mm256_loadu_si256(q8.add(32 * k) as *const __m256i);
                        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(v[k], y), _mm256_maddubs_epi16(m32, y));
                        sumi[ii] = _mm256_add_epi32(sumi[ii], _mm256_madd_epi16(s[k], p));
                    }
                }
            }
            for ii in 0..NR {
                let dy = std::ptr::read_unaligned(ys[ii] as *const f32);
                acc[ii] = _mm256_fmadd_ps(_mm256_set1_ps(dy * d), _mm256_cvtepi32_ps(sumi[ii]), acc[ii]);
            }
        }
        for (ii, acc) in acc.iter().enumerate() {
            *a.out.add((i + ii) * a.ld + r) = hsum(*acc);
        }
    }
}
