//! AVX512-VNNI kernels for `q8_0` and `q4_0` weights repacked by octets of rows: each
//! `vpdpbusd` lane is a different row, the float accumulators transposed, 8 rows times up to 2
//! inputs per tile.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use forge_gguf::GgmlType;

use super::hsum;
use super::legacy::{Args, block_bytes, f16_at, nibbles, prefetch_distance};
use crate::matmul::Acts;

/// Repacks a `q8_0`/`q4_0` matrix for the VNNI kernels by octets of rows: per octet and
/// block, the 8 f16 scales, then the values with the 8 rows interleaved by groups of 4
/// values — 32 bytes hold values `4g..4g + 4` of each of the 8 rows, so that lane `r` of a
/// `vpdpbusd` is row `r`'s sum over that group, candle's lane `g` of row `r`. `q8_0` values
/// are stored as `x + 128`; `q4_0` nibbles hold group `g` low and group `g + 4` high. The
/// last `n % 8` rows follow as the file has them.
pub fn repack8(data: &[u8], n: usize, nb: usize, dtype: GgmlType) -> Vec<u8> {
    let bs = block_bytes(dtype);
    assert_eq!(data.len(), n * nb * bs, "whole blocks");
    let mut out = Vec::with_capacity(data.len());
    for oct in 0..n / 8 {
        for b in 0..nb {
            let blk = |r: usize| &data[((oct * 8 + r) * nb + b) * bs..][..bs];
            (0..8).for_each(|r| out.extend_from_slice(&blk(r)[..2]));
            if dtype == GgmlType::Q8_0 {
                for g in 0..8 {
                    (0..8).for_each(|r| out.extend(blk(r)[2 + 4 * g..2 + 4 * g + 4].iter().map(|v| v ^ 0x80)));
                }
            } else {
                // The 0..=15 value of element e of a q4_0 block.
                let nib = |q: &[u8], e: usize| if e < 16 { q[2 + e] & 0x0F } else { q[2 + e - 16] >> 4 };
                for g in 0..4 {
                    for r in 0..8 {
                        let q = blk(r);
                        out.extend((0..4).map(|e| nib(q, 4 * g + e) | (nib(q, 4 * (g + 4) + e) << 4)));
                    }
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
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let a = Args::new(w, dtype, n, nb, acts, m, out, ld);
        if dtype == GgmlType::Q8_0 { q8_0_x8(&a, rows) } else { q4_0_x8(&a, rows) }
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
