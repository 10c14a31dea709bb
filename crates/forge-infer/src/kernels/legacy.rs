//! Kernels for ggml's 32-value blocks with an `f16` scale — `q8_0`, `q4_0`, `q5_0`, and with an
//! `f16` minimum too, `q4_1`, `q5_1` — times `q8_0` inputs (`q8_1` for the latter: the same values
//! and scale, and the block's sum `s`), over weights repacked at load so that a quad of rows
//! streams from memory in order: 4 rows times up to 4 inputs per tile, AVX2 or AVX512-VNNI.
//!
//! `q4_1`/`q5_1` follow ggml's AVX2 `vec_dot_q4_1_q8_1`/`vec_dot_q5_1_q8_1`: per block the
//! unsigned values times the input's (an exact `i32` sum in 8 lanes), scaled by `d_w · d_x` and
//! FMA-accumulated; the minimum's share `m_w · s_x` summed apart and added after the horizontal
//! sum.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use forge_gguf::GgmlType;

use super::hsum;
use crate::matmul::{Acts, Kernels};

/// Repacks a matrix of `n` rows of `nb` blocks for the kernels: each quad of rows becomes one
/// stream, block by block — the 4 f16 scales (then the 4 f16 minimums of `q4_1`/`q5_1`), then
/// the 4 rows' values — so that it streams from memory in order; the last `n % 4` rows follow
/// as the file has them. `q8_0` values are stored as `x + 128` for VNNI; 4-bit values go by
/// pairs of rows, 32 bytes whose low nibbles are the first row's 32 values in order and high
/// nibbles the second's, after the 4 rows' high bits (4 bytes each) for the 5-bit types.
pub fn repack(data: &[u8], n: usize, nb: usize, dtype: GgmlType, kernels: Kernels) -> Vec<u8> {
    let bs = block_bytes(dtype);
    assert_eq!(data.len(), n * nb * bs, "whole blocks");
    let mut out = Vec::with_capacity(data.len());
    for quad in 0..n / 4 {
        for b in 0..nb {
            let blk = |j: usize| &data[((quad * 4 + j) * nb + b) * bs..][..bs];
            (0..4).for_each(|j| out.extend_from_slice(&blk(j)[..2]));
            let nibbles = |out: &mut Vec<u8>, at: usize| {
                for pair in [0, 2] {
                    let (a, b) = (&blk(pair)[at..], &blk(pair + 1)[at..]);
                    out.extend((0..16).map(|e| (a[e] & 0x0F) | (b[e] << 4)));
                    out.extend((0..16).map(|e| (a[e] >> 4) | (b[e] & 0xF0)));
                }
            };
            match dtype {
                GgmlType::Q8_0 => {
                    let flip = if kernels == Kernels::Vnni { 0x80 } else { 0 };
                    (0..4).for_each(|j| out.extend(blk(j)[2..].iter().map(|v| v ^ flip)));
                }
                GgmlType::Q4_0 => nibbles(&mut out, 2),
                GgmlType::Q5_0 => {
                    (0..4).for_each(|j| out.extend_from_slice(&blk(j)[2..6]));
                    nibbles(&mut out, 6);
                }
                GgmlType::Q4_1 => {
                    (0..4).for_each(|j| out.extend_from_slice(&blk(j)[2..4]));
                    nibbles(&mut out, 4);
                }
                _ => {
                    (0..4).for_each(|j| out.extend_from_slice(&blk(j)[2..4]));
                    (0..4).for_each(|j| out.extend_from_slice(&blk(j)[4..8]));
                    nibbles(&mut out, 8);
                }
            }
        }
    }
    out.extend_from_slice(&data[n / 4 * 4 * nb * bs..]);
    out
}

/// # Safety
/// As [`Mat::compute`], with `w` from [`repack`] and `acts` prepared for `Need::Q8_0`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn q_rows(
    w: &[u8],
    dtype: GgmlType,
    kernels: Kernels,
    n: usize,
    nb: usize,
    rows: Range<usize>,
    acts: &Acts,
    m: usize,
    out: *mut f32,
    ld: usize,
) {
    assert!(rows.end <= n, "rows within the matrix");
    assert!(rows.start.is_multiple_of(4) || rows.start >= n / 4 * 4, "row chunks start on a quad");
    assert!(rows.end.is_multiple_of(4) || rows.end == n, "row chunks end on a quad");
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let a = Args::new(w, dtype, n, nb, acts, m, out, ld);
        match (dtype, kernels) {
            (GgmlType::Q8_0, Kernels::Vnni) => q8_0_vnni(&a, rows),
            (GgmlType::Q8_0, _) => q8_0_avx2(&a, rows),
            (GgmlType::Q4_0, Kernels::Vnni) => q4_0_vnni(&a, rows),
            (GgmlType::Q4_0, _) => q4_0_avx2(&a, rows),
            (GgmlType::Q5_0, Kernels::Vnni) => q5_0_vnni(&a, rows),
            (GgmlType::Q5_0, _) => q5_0_avx2(&a, rows),
            (GgmlType::Q4_1, Kernels::Vnni) => q4_1_vnni(&a, rows),
            (GgmlType::Q4_1, _) => q4_1_avx2(&a, rows),
            (_, Kernels::Vnni) => q5_1_vnni(&a, rows),
            _ => q5_1_avx2(&a, rows),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kernels, out, ld);
}

/// Bytes per block of the types forge's kernels run.
pub(super) fn block_bytes(dtype: GgmlType) -> usize {
    match dtype {
        GgmlType::Q8_0 => 34,
        GgmlType::Q4_0 => 18,
        GgmlType::Q5_0 => 22,
        GgmlType::Q4_1 => 20,
        GgmlType::Q5_1 => 24,
        other => unreachable!("no forge kernel for {other:?}"),
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) struct Args {
    pub(super) w: *const u8,
    pub(super) n: usize,
    pub(super) nb: usize,
    pub(super) y: *const u8,
    pub(super) dy: *const f32,
    /// Per input block, `Σy`.
    pub(super) ysum: *const i32,
    /// Per input block, `s = d · Σy` rounded to f16 (`q8_1`'s sum, for the types with a minimum).
    pub(super) s: *const f32,
    /// Per input block, the 8 lane corrections (`acts.c128` or `acts.c8`).
    pub(super) c: *const i32,
    pub(super) m: usize,
    pub(super) out: *mut f32,
    pub(super) ld: usize,
}

#[cfg(target_arch = "x86_64")]
impl Args {
    /// A kernel's view of `n` rows of `nb` repacked blocks of `w` and `m` inputs prepared in
    /// `acts`, checking that the buffers hold them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        w: &[u8],
        dtype: GgmlType,
        n: usize,
        nb: usize,
        acts: &Acts,
        m: usize,
        out: *mut f32,
        ld: usize,
    ) -> Args {
        assert!(w.len() == n * nb * block_bytes(dtype) && acts.q8_0.len() >= m * nb && acts.dy.len() >= m * nb);
        assert!(acts.s.len() >= m * nb && acts.ysum.len() >= m * nb, "the input blocks' sums");
        Args {
            w: w.as_ptr(),
            n,
            nb,
            y: acts.q8_0.as_ptr() as *const u8,
            dy: acts.dy.as_ptr(),
            s: acts.s.as_ptr(),
            ysum: acts.ysum.as_ptr(),
            c: if dtype == GgmlType::Q8_0 { acts.c128.as_ptr() } else { acts.c8.as_ptr() } as *const i32,
            m,
            out,
            ld,
        }
    }
}

/// How far ahead (bytes) the one-input kernels prefetch the weights; `FORGE_PREFETCH` to tune.
pub(super) fn prefetch_distance() -> usize {
    static D: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *D.get_or_init(|| std::env::var("FORGE_PREFETCH").ok().and_then(|v| v.parse().ok()).unwrap_or(2048))
}

/// A weight block's scale.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32))) }
}

/// The 32 4-bit values of a plain `q4_0` block (low nibbles, then high), 0..=15.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    unsafe {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let bytes = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
        _mm256_and_si256(_mm256_set1_epi8(0xF), bytes)
    }
}

/// Generates a kernel over a repacked matrix (`$bs`-byte blocks: an f16 scale, with `$mins` an
/// f16 minimum, and values): a quad of rows times `NR` inputs at a time. `$quad` loads the 4
/// rows' values of one block from its pointer, `$plain` one row's from a plain block's values,
/// and `$dot` gives the 8 lane sums (`i32`) of values `$x` against input values `$y` with
/// corrections `$c`.
macro_rules! kernel {
    (
        $name:ident, $tile:ident, $feat:literal, $bs:expr, mins = $mins:literal,
        quad |$qp:ident| $quad:block,
        plain |$pp:ident| $plain:block,
        dot |$x:ident, $y:ident, $c:ident| $dot:block
    ) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $name(a: &Args, rows: Range<usize>) {
            let quads = a.n / 4;
            let mut r = rows.start;
            unsafe {
                while r + 4 <= rows.end && r / 4 < quads {
                    let mut i = 0;
                    while i + 4 <= a.m {
                        $tile::<4>(a, r, i);
                        i += 4;
                    }
                    while i < a.m {
                        $tile::<1>(a, r, i);
                        i += 1;
                    }
                    r += 4;
                }
                // The last n % 4 rows, stored plainly after the quads.
                let nb = a.nb;
                let tail = a.w.add(quads * nb * (8 + 4 * ($bs - 2)));
                let head = if $mins { 4 } else { 2 };
                while r < rows.end {
                    let w0 = tail.add((r - quads * 4) * nb * $bs);
                    for i in 0..a.m {
                        let y = a.y.add(i * nb * 34);
                        let dy = a.dy.add(i * nb);
                        let cs = a.c.add(i * nb * 8);
                        let mut acc = _mm256_setzero_ps();
                        let mut summs = 0f32;
                        for b in 0..nb {
                            let wb = w0.add(b * $bs);
                            let p = {
                                let $x = {
                                    let $pp = wb.add(head);
                                    $plain
                                };
                                let $y = _mm256_loadu_si256(y.add(b * 34 + 2) as *const __m256i);
                                let $c = _mm256_loadu_si256(cs.add(b * 8) as *const __m256i);
                                $dot
                            };
                            let scale = _mm256_set1_ps(f16_at(wb) * *dy.add(b));
                            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
                            if $mins {
                                summs = f16_at(wb.add(2)).mul_add(*a.s.add(i * nb + b), summs);
                            }
                        }
                        *a.out.add(i * a.ld + r) = hsum(acc) + summs;
                    }
                    r += 1;
                }
            }
        }

        /// Rows `r..r + 4` (a quad) times inputs `i..i + NR`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $tile<const NR: usize>(a: &Args, r: usize, i: usize) {
            const QUAD: usize = 8 + 4 * ($bs - 2);
            let nb = a.nb;
            unsafe {
                let lane = [_mm256_set1_epi32(0), _mm256_set1_epi32(1), _mm256_set1_epi32(2), _mm256_set1_epi32(3)];
                let base = a.w.add(r / 4 * nb * QUAD);
                let mut acc = [[_mm256_setzero_ps(); 4]; NR];
                let mut summs = [_mm_setzero_ps(); NR];
                for b in 0..nb {
                    let blk = base.add(b * QUAD);
                    if NR == 1 && $bs != 34 {
                        // One input: the weights stream from memory once; fetch ahead
                        // (q8_0's denser stream does better with the hardware's prefetch
                        // alone).
                        let ahead = blk.add(prefetch_distance());
                        for l in 0..QUAD.div_ceil(64) {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * l) as *const i8);
                        }
                    }
                    let xs: [__m256i; 4] = {
                        let $qp = blk.add(if $mins { 16 } else { 8 });
                        $quad
                    };
                    let d4 = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(blk as *const __m128i)));
                    let dx = [0, 1, 2, 3].map(|j| _mm256_permutevar8x32_ps(d4, lane[j]));
                    let m4 = if $mins {
                        _mm_cvtph_ps(_mm_loadl_epi64(blk.add(8) as *const __m128i))
                    } else {
                        _mm_setzero_ps()
                    };
                    for ii in 0..NR {
                        let row = (i + ii) * nb + b;
                        let yb = _mm256_loadu_si256(a.y.add(row * 34 + 2) as *const __m256i);
                        let cb = _mm256_loadu_si256(a.c.add(row * 8) as *const __m256i);
                        let dy = _mm256_set1_ps(*a.dy.add(row));
                        for j in 0..4 {
                            let p = {
                                let ($x, $y, $c) = (xs[j], yb, cb);
                                $dot
                            };
                            // the row's scale times the input's, as an f32 product
                            let scale = _mm256_mul_ps(dx[j], dy);
                            acc[ii][j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[ii][j]);
                        }
                        if $mins {
                            summs[ii] = _mm_fmadd_ps(m4, _mm_set1_ps(*a.s.add(row)), summs[ii]);
                        }
                    }
                }
                for ii in 0..NR {
                    let o = a.out.add((i + ii) * a.ld + r);
                    let mut m = [0f32; 4];
                    _mm_storeu_ps(m.as_mut_ptr(), summs[ii]);
                    for j in 0..4 {
                        *o.add(j) = hsum(acc[ii][j]) + m[j];
                    }
                }
            }
        }
    };
}

// q8_0, AVX2: candle's sign trick (|x| times y with x's sign) through maddubs + madd.
kernel!(
    q8_0_avx2,
    q8_0_avx2_tile,
    "avx2,fma,f16c",
    34,
    mins = false,
    quad | p | { quad_bytes(p) },
    plain | p | { _mm256_loadu_si256(p as *const __m256i) },
    dot | x,
    y,
    _c | { sign_dot(x, y) }
);
// q8_0, VNNI: the stored x + 128 times y, minus 128·Σy.
kernel!(
    q8_0_vnni,
    q8_0_vnni_tile,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    34,
    mins = false,
    quad | p | { quad_bytes(p) },
    plain | p | { _mm256_xor_si256(_mm256_loadu_si256(p as *const __m256i), _mm256_set1_epi8(-128)) },
    dot | x,
    y,
    c | { _mm256_dpbusd_epi32(c, x, y) }
);
// q4_0, AVX2: candle's (nibbles - 8, then the sign trick).
kernel!(
    q4_0_avx2,
    q4_0_avx2_tile,
    "avx2,fma,f16c",
    18,
    mins = false,
    quad | p | { quad_nibbles(p).map(|v| _mm256_sub_epi8(v, _mm256_set1_epi8(8))) },
    plain | p | { _mm256_sub_epi8(nibbles(p), _mm256_set1_epi8(8)) },
    dot | x,
    y,
    _c | { sign_dot(x, y) }
);
// q4_0, VNNI: nibbles times y, minus 8·Σy.
kernel!(
    q4_0_vnni,
    q4_0_vnni_tile,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    18,
    mins = false,
    quad | p | { quad_nibbles(p) },
    plain | p | { nibbles(p) },
    dot | x,
    y,
    c | { _mm256_dpbusd_epi32(c, x, y) }
);

// q4_1: the nibbles (unsigned) times y — AVX2 `maddubs`, VNNI `vpdpbusd` — with no correction.
kernel!(
    q4_1_avx2,
    q4_1_avx2_tile,
    "avx2,fma,f16c",
    20,
    mins = true,
    quad | p | { quad_nibbles(p) },
    plain | p | { nibbles(p) },
    dot | x,
    y,
    _c | { _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1)) }
);
kernel!(
    q4_1_vnni,
    q4_1_vnni_tile,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    20,
    mins = true,
    quad | p | { quad_nibbles(p) },
    plain | p | { nibbles(p) },
    dot | x,
    y,
    _c | { _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y) }
);
// q5_1: the nibbles with their high bits (0..=31) times y.
kernel!(
    q5_1_avx2,
    q5_1_avx2_tile,
    "avx2,fma,f16c",
    24,
    mins = true,
    quad | p | { quad_five_bits(p) },
    plain | p | { _mm256_or_si256(nibbles(p.add(4)), high_bits(p)) },
    dot | x,
    y,
    _c | { _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1)) }
);
kernel!(
    q5_1_vnni,
    q5_1_vnni_tile,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    24,
    mins = true,
    quad | p | { quad_five_bits(p) },
    plain | p | { _mm256_or_si256(nibbles(p.add(4)), high_bits(p)) },
    dot | x,
    y,
    _c | { _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y) }
);

/// The 4 rows' bytes of a repacked `q8_0` quad's block: 128 bytes, a row after the other.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quad_bytes(p: *const u8) -> [__m256i; 4] {
    unsafe { [0, 1, 2, 3].map(|j| _mm256_loadu_si256(p.add(32 * j) as *const __m256i)) }
}

/// The 8 lane sums (of 4 products) of signed bytes `x` times signed bytes `y`: candle's sign
/// trick, `|x|` times `y` with `x`'s sign, through `maddubs` and `madd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn sign_dot(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// The 4 rows' 4-bit values (0..=15) of a repacked quad's block: 64 bytes, rows paired by nibble.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quad_nibbles(p: *const u8) -> [__m256i; 4] {
    unsafe {
        let m = _mm256_set1_epi8(0x0F);
        let v01 = _mm256_loadu_si256(p as *const __m256i);
        let v23 = _mm256_loadu_si256(p.add(32) as *const __m256i);
        [
            _mm256_and_si256(v01, m),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v01), m),
            _mm256_and_si256(v23, m),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v23), m),
        ]
    }
}

/// The 4 rows' 5-bit values (0..=31) of a repacked quad's block: the high bits of each row
/// (4 bytes each), then the nibbles as [`quad_nibbles`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quad_five_bits(p: *const u8) -> [__m256i; 4] {
    unsafe {
        let lo = quad_nibbles(p.add(16));
        [0, 1, 2, 3].map(|j| _mm256_or_si256(lo[j], high_bits(p.add(4 * j))))
    }
}

/// 32 bytes, 0x10 where bit `e` of the 4 bytes at `p` is set (a `q5_0` block's high bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn high_bits(p: *const u8) -> __m256i {
    unsafe {
        let x = _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32));
        let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_or_si256(_mm256_shuffle_epi8(x, shuf), _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10))
    }
}

// q5_0, AVX2: (v - 16) with the sign trick; VNNI: v·y - 16·Σy (twice the q4_0 correction).
kernel!(
    q5_0_avx2,
    q5_0_avx2_tile,
    "avx2,fma,f16c",
    22,
    mins = false,
    quad | p | { quad_five_bits(p) },
    plain | p | { _mm256_or_si256(nibbles(p.add(4)), high_bits(p)) },
    dot | x,
    y,
    _c | { sign_dot(_mm256_sub_epi8(x, _mm256_set1_epi8(16)), y) }
);
kernel!(
    q5_0_vnni,
    q5_0_vnni_tile,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    22,
    mins = false,
    quad | p | { quad_five_bits(p) },
    plain | p | { _mm256_or_si256(nibbles(p.add(4)), high_bits(p)) },
    dot | x,
    y,
    c | { _mm256_dpbusd_epi32(_mm256_slli_epi32::<1>(c), x, y) }
);
