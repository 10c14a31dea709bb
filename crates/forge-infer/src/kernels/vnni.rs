//! AVX512-VNNI kernels over weights repacked by octets of rows: each `vpdpbusd` lane is a
//! different row.
//!
//! - `q8_0`, `q4_0`: the float accumulators transposed (`acc[g]` holds lane `g` of the 8 rows'
//!   accumulators), which keeps candle's (and ggml's AVX2) order of summation exactly; 8 rows
//!   times up to 2 inputs per tile.
//! - `q5_0`, `q4_1`, `q5_1`: each block's 8 groups of 4 values chain into one integer
//!   accumulator per row — the block's exact integer sum, as ggml's reference `vec_dot` forms
//!   it — then one scale and one FMA per row and block; 8 rows times up to 4 inputs per tile.
//!   The 5th bits expand with an AVX512-BW byte mask (`vmovdqu8` zeroing).

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use forge_gguf::GgmlType;

use super::hsum;
use super::legacy::{Args, block_bytes, f16_at, nibbles, prefetch_distance};
use crate::matmul::Acts;

/// Repacks a matrix for the VNNI kernels by octets of rows: per octet and block, the 8 f16
/// scales (then the 8 f16 minimums of `q4_1`/`q5_1`, then for the 5-bit types 8 masks of 5th
/// bits), then the values with the 8 rows interleaved by groups of 4 values — 32 bytes hold
/// values `4g..4g + 4` of each of the 8 rows, so that lane `r` of a `vpdpbusd` is row `r`'s
/// sum over that group, candle's lane `g` of row `r`. `q8_0` values are stored as `x + 128`;
/// 4-bit values hold group `g` low and group `g + 4` high. The last `n % 8` rows follow as
/// the file has them.
pub fn repack8(data: &[u8], n: usize, nb: usize, dtype: GgmlType) -> Vec<u8> {
    let bs = block_bytes(dtype);
    assert_eq!(data.len(), n * nb * bs, "whole blocks");
    let mut out = Vec::with_capacity(data.len());
    // The 0..=15 value of element e of a 32-value block's 16 nibble bytes.
    let nib = |q: &[u8], e: usize| if e < 16 { q[e] & 0x0F } else { q[e - 16] >> 4 };
    for oct in 0..n / 8 {
        for b in 0..nb {
            let blk = |r: usize| &data[((oct * 8 + r) * nb + b) * bs..][..bs];
            (0..8).for_each(|r| out.extend_from_slice(&blk(r)[..2]));
            // Where each row's (high bits and) nibbles start.
            let (qh, qs) = match dtype {
                GgmlType::Q8_0 => {
                    for g in 0..8 {
                        (0..8).for_each(|r| out.extend(blk(r)[2 + 4 * g..2 + 4 * g + 4].iter().map(|v| v ^ 0x80)));
                    }
                    continue;
                }
                GgmlType::Q4_0 => (None, 2),
                GgmlType::Q5_0 => (Some(2), 6),
                GgmlType::Q4_1 => (None, 4),
                _ => (Some(4), 8),
            };
            if matches!(dtype, GgmlType::Q4_1 | GgmlType::Q5_1) {
                (0..8).for_each(|r| out.extend_from_slice(&blk(r)[2..4]));
            }
            if let Some(at) = qh {
                // Per group g, a 32-bit mask: bit 4r + e is row r's 5th bit of value 4g + e.
                for g in 0..8 {
                    let mut word = 0u32;
                    for r in 0..8 {
                        let bits = u32::from_le_bytes(blk(r)[at..at + 4].try_into().expect("4 bytes"));
                        word |= ((bits >> (4 * g)) & 0xF) << (4 * r);
                    }
                    out.extend_from_slice(&word.to_le_bytes());
                }
            }
            for g in 0..4 {
                for r in 0..8 {
                    let q = &blk(r)[qs..];
                    out.extend((0..4).map(|e| nib(q, 4 * g + e) | (nib(q, 4 * (g + 4) + e) << 4)));
                }
            }
        }
    }
    out.extend_from_slice(&data[n / 8 * 8 * nb * bs..]);
    out
}

/// # Safety
/// As [`Mat::compute`], with `w` from [`repack8`] and `acts` prepared for `Need::Q8_0`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn q_rows8(
    w: &[u8],
    dtype: GgmlType,
    n: usize,
    nb: usize,
    rows: Range<usize>,
    acts: &Acts,
    m: usize,
    out: *mut f32,
    ld: usize,
) {
    assert!(rows.end <= n, "rows within the matrix");
    assert!(rows.start.is_multiple_of(8) || rows.start >= n / 8 * 8, "row chunks start on an octet");
    assert!(rows.end.is_multiple_of(8) || rows.end == n, "row chunks end on an octet");
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let a = Args::new(w, dtype, n, nb, acts, m, out, ld);
        match dtype {
            GgmlType::Q8_0 => q8_0_x8(&a, rows),
            GgmlType::Q4_0 => q4_0_x8(&a, rows),
            GgmlType::Q5_0 => q5_0_x8(&a, rows),
            GgmlType::Q4_1 => q4_1_x8(&a, rows),
            _ => q5_1_x8(&a, rows),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (out, ld);
}

/// Generates a VNNI kernel over an octet-repacked matrix (`$bs`-byte blocks): 8 rows times
/// `NR` inputs at a time, the accumulators transposed — `acc[g]` holds lane `g` of the 8
/// rows' candle accumulators — and summed at the end in `hsum_float_8`'s order. `$groups`
/// loads the 8 value groups of one block from its pointer; `$plain` one row's values (0..)
/// from a plain block's values, for the rows after the octets.
macro_rules! kernel8 {
    ($name:ident, $tile:ident, $bs:expr, groups |$gp:ident| $groups:block, plain |$pp:ident| $plain:block) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        unsafe fn $name(a: &Args, rows: Range<usize>) {
            let octs = a.n / 8;
            let mut r = rows.start;
            unsafe {
                while r + 8 <= rows.end && r / 8 < octs {
                    let mut i = 0;
                    while i + 2 <= a.m {
                        $tile::<2>(a, r, i);
                        i += 2;
                    }
                    while i < a.m {
                        $tile::<1>(a, r, i);
                        i += 1;
                    }
                    r += 8;
                }
                // The last n % 8 rows, stored plainly after the octets.
                let nb = a.nb;
                let tail = a.w.add(octs * nb * 8 * $bs);
                while r < rows.end {
                    let w0 = tail.add((r - octs * 8) * nb * $bs);
                    for i in 0..a.m {
                        let mut acc = _mm256_setzero_ps();
                        for b in 0..nb {
                            let wb = w0.add(b * $bs);
                            let row = i * nb + b;
                            let x = {
                                let $pp = wb.add(2);
                                $plain
                            };
                            let y = _mm256_loadu_si256(a.y.add(row * 34 + 2) as *const __m256i);
                            let c = _mm256_loadu_si256(a.c.add(row * 8) as *const __m256i);
                            let p = _mm256_dpbusd_epi32(c, x, y);
                            let scale = _mm256_set1_ps(f16_at(wb) * *a.dy.add(row));
                            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
                        }
                        *a.out.add(i * a.ld + r) = hsum(acc);
                    }
                    r += 1;
                }
            }
        }

        /// Rows `r..r + 8` (an octet) times inputs `i..i + NR`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        #[inline]
        unsafe fn $tile<const NR: usize>(a: &Args, r: usize, i: usize) {
            const OCT: usize = 8 * $bs;
            let nb = a.nb;
            unsafe {
                let base = a.w.add(r / 8 * nb * OCT);
                let mut acc = [[_mm256_setzero_ps(); 8]; NR];
                for b in 0..nb {
                    let blk = base.add(b * OCT);
                    if NR == 1 && $bs != 34 {
                        let ahead = blk.add(prefetch_distance());
                        for l in 0..OCT.div_ceil(64) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * l) as *const i8);
                        }
                    }
                    let xs: [__m256i; 8] = {
                        let $gp = blk.add(16);
                        $groups
                    };
                    // Each row's scale times the input's, as candle's f32 products.
                    let dx = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    for ii in 0..NR {
                        let row = (i + ii) * nb + b;
                        let s = _mm256_mul_ps(dx, _mm256_set1_ps(*a.dy.add(row)));
                        let y = a.y.add(row * 34 + 2) as *const i32;
                        let c = a.c.add(row * 8);
                        for g in 0..8 {
                            let yg = _mm256_set1_epi32(std::ptr::read_unaligned(y.add(g)));
                            let p = _mm256_dpbusd_epi32(_mm256_set1_epi32(*c.add(g)), xs[g], yg);
                            acc[ii][g] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[ii][g]);
                        }
                    }
                }
                for (ii, acc) in acc.iter().enumerate() {
                    // hsum_float_8's tree: ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)).
                    let t = _mm256_add_ps(_mm256_add_ps(acc[4], acc[0]), _mm256_add_ps(acc[6], acc[2]));
                    let u = _mm256_add_ps(_mm256_add_ps(acc[5], acc[1]), _mm256_add_ps(acc[7], acc[3]));
                    _mm256_storeu_ps(a.out.add((i + ii) * a.ld + r), _mm256_add_ps(t, u));
                }
            }
        }
    };
}

kernel8!(
    q8_0_x8,
    q8_0_x8_tile,
    34,
    groups | p | {
        [
            _mm256_loadu_si256(p as *const __m256i),
            _mm256_loadu_si256(p.add(32) as *const __m256i),
            _mm256_loadu_si256(p.add(64) as *const __m256i),
            _mm256_loadu_si256(p.add(96) as *const __m256i),
            _mm256_loadu_si256(p.add(128) as *const __m256i),
            _mm256_loadu_si256(p.add(160) as *const __m256i),
            _mm256_loadu_si256(p.add(192) as *const __m256i),
            _mm256_loadu_si256(p.add(224) as *const __m256i),
        ]
    },
    plain | p | { _mm256_xor_si256(_mm256_loadu_si256(p as *const __m256i), _mm256_set1_epi8(-128)) }
);
kernel8!(
    q4_0_x8,
    q4_0_x8_tile,
    18,
    groups | p | {
        let m = _mm256_set1_epi8(0x0F);
        let v0 = _mm256_loadu_si256(p as *const __m256i);
        let v1 = _mm256_loadu_si256(p.add(32) as *const __m256i);
        let v2 = _mm256_loadu_si256(p.add(64) as *const __m256i);
        let v3 = _mm256_loadu_si256(p.add(96) as *const __m256i);
        [
            _mm256_and_si256(v0, m),
            _mm256_and_si256(v1, m),
            _mm256_and_si256(v2, m),
            _mm256_and_si256(v3, m),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v0), m),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v1), m),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v2), m),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v3), m),
        ]
    },
    plain | p | { nibbles(p) }
);

/// Generates a chained VNNI kernel over an octet-repacked matrix (`$bs`-byte blocks; `$mins`:
/// an f16 minimum after the scale; `$five`: 5th-bit masks before the nibbles), whose values
/// (0..=31) times the input come less `$shift`·Σy (`16` for `q5_0`: its values are `v − 16`;
/// 0 for the types with a minimum, which add `m · s` instead).
macro_rules! kernel8c {
    ($name:ident, $tile:ident, $bs:expr, mins = $mins:literal, five = $five:literal, shift = $shift:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw")]
        unsafe fn $name(a: &Args, rows: Range<usize>) {
            let octs = a.n / 8;
            let mut r = rows.start;
            unsafe {
                while r + 8 <= rows.end && r / 8 < octs {
                    let mut i = 0;
                    while i + 4 <= a.m {
                        $tile::<4>(a, r, i);
                        i += 4;
                    }
                    while i < a.m {
                        $tile::<1>(a, r, i);
                        i += 1;
                    }
                    r += 8;
                }
                // The last n % 8 rows, stored plainly after the octets: one block at a time.
                let nb = a.nb;
                let tail = a.w.add(octs * nb * 8 * $bs);
                let qs = 2 + if $mins { 2 } else { 0 } + if $five { 4 } else { 0 };
                while r < rows.end {
                    let w0 = tail.add((r - octs * 8) * nb * $bs);
                    for i in 0..a.m {
                        let (mut sum, mut summs) = (0f32, 0f32);
                        for b in 0..nb {
                            let wb = w0.add(b * $bs);
                            let row = i * nb + b;
                            let mut x = nibbles(wb.add(qs));
                            if $five {
                                let bits = std::ptr::read_unaligned(wb.add(qs - 4) as *const u32);
                                x = _mm256_or_si256(x, _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10)));
                            }
                            let y = _mm256_loadu_si256(a.y.add(row * 34 + 2) as *const __m256i);
                            let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y);
                            let sumi = hsum_i32(p) - $shift * *a.ysum.add(row);
                            sum += sumi as f32 * (f16_at(wb) * *a.dy.add(row));
                            if $mins {
                                summs = f16_at(wb.add(2)).mul_add(*a.s.add(row), summs);
                            }
                        }
                        *a.out.add(i * a.ld + r) = sum + summs;
                    }
                    r += 1;
                }
            }
        }

        /// Rows `r..r + 8` (an octet) times inputs `i..i + NR`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw")]
        #[inline]
        unsafe fn $tile<const NR: usize>(a: &Args, r: usize, i: usize) {
            const OCT: usize = 8 * $bs;
            const VALUES: usize = 16 + if $mins { 16 } else { 0 } + if $five { 32 } else { 0 };
            let nb = a.nb;
            unsafe {
                let base = a.w.add(r / 8 * nb * OCT);
                let m4 = _mm256_set1_epi8(0x0F);
                let bit5 = _mm256_set1_epi8(0x10);
                let mut acc = [_mm256_setzero_ps(); NR];
                let mut summs = [_mm256_setzero_ps(); NR];
                for b in 0..nb {
                    let blk = base.add(b * OCT);
                    if NR == 1 {
                        let ahead = blk.add(prefetch_distance());
                        for l in 0..OCT.div_ceil(64) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * l) as *const i8);
                        }
                    }
                    let masks = blk.add(16 + if $mins { 16 } else { 0 }) as *const u32;
                    let qs = blk.add(VALUES);
                    let ys: [*const i32; NR] =
                        std::array::from_fn(|ii| a.y.add(((i + ii) * nb + b) * 34 + 2) as *const i32);
                    let mut p: [__m256i; NR] =
                        std::array::from_fn(|ii| _mm256_set1_epi32(-$shift * *a.ysum.add((i + ii) * nb + b)));
                    for g in 0..4 {
                        let v = _mm256_loadu_si256(qs.add(32 * g) as *const __m256i);
                        let mut lo = _mm256_and_si256(v, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                        if $five {
                            lo = _mm256_or_si256(
                                lo,
                                _mm256_maskz_mov_epi8(std::ptr::read_unaligned(masks.add(g)), bit5),
                            );
                            hi = _mm256_or_si256(
                                hi,
                                _mm256_maskz_mov_epi8(std::ptr::read_unaligned(masks.add(g + 4)), bit5),
                            );
                        }
                        for ii in 0..NR {
                            let yl = _mm256_set1_epi32(std::ptr::read_unaligned(ys[ii].add(g)));
                            let yh = _mm256_set1_epi32(std::ptr::read_unaligned(ys[ii].add(g + 4)));
                            p[ii] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(p[ii], lo, yl), hi, yh);
                        }
                    }
                    let dx = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                    let mx = if $mins { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i)) } else { dx };
                    for ii in 0..NR {
                        let row = (i + ii) * nb + b;
                        let s =
                            _mm256_mul_ps(_mm256_cvtepi32_ps(p[ii]), _mm256_mul_ps(dx, _mm256_set1_ps(*a.dy.add(row))));
                        acc[ii] = _mm256_add_ps(acc[ii], s);
                        if $mins {
                            summs[ii] = _mm256_fmadd_ps(mx, _mm256_set1_ps(*a.s.add(row)), summs[ii]);
                        }
                    }
                }
                for ii in 0..NR {
                    _mm256_storeu_ps(a.out.add((i + ii) * a.ld + r), _mm256_add_ps(acc[ii], summs[ii]));
                }
            }
        }
    };
}

kernel8c!(q5_0_x8, q5_0_x8_tile, 22, mins = false, five = true, shift = 16);
kernel8c!(q4_1_x8, q4_1_x8_tile, 20, mins = true, five = false, shift = 0);
kernel8c!(q5_1_x8, q5_1_x8_tile, 24, mins = true, five = true, shift = 0);

/// The sum of 8 `i32` lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn hsum_i32(p: __m256i) -> i32 {
    let h = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256::<1>(p));
    let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
    _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h)))
}
