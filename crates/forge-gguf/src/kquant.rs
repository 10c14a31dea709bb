//! The k-quants `Q4_K`, `Q5_K` and `Q6_K`, as llama.cpp's reference quantizers make them (what
//! `llama-quantize` runs without an importance matrix), so forge's files are byte-identical to
//! llama.cpp's for the same f32 input.
//!
//! A super-block is 256 weights in sub-blocks. `Q4_K`/`Q5_K`: 8 sub-blocks of 32 with an affine
//! code `x ≈ d·sc·q − dmin·m`, where each sub-block's (scale, min) comes from a weighted least-
//! squares search over candidate grids ([`make_qkx2_quants`], weights `rms(x) + |x|`), and the 8
//! scales and mins are themselves quantized to 6 bits against the super-block's `d`, `dmin`.
//! `Q6_K`: 16 sub-blocks of 16 with a symmetric code `x ≈ d·sc·(q − 32)`, the scale found by
//! [`make_qx_quants`] (weights `x²`) and stored as int8 against `d`.
//!
//! Arithmetic follows the reference order exactly (sequential f32 sums, no fused multiply-adds),
//! and rounds half to even like ggml's `nearest_int`.

use half::f16;

/// Round to nearest, ties to even, for |f| ≤ 4194303 (ggml's `nearest_int` bit trick).
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0f32;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Weighted least-squares search for an affine code `x ≈ scale·L + min` with `L` in
/// `0..=nmax` (llama.cpp's `make_qkx2_quants`). Tries `nstep + 1` grids
/// `iscale = (rmin + rdelta·is + nmax) / (max − min)`, solving for the best scale and min on each
/// and keeping the one of least weighted squared error. Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Weighted least-squares search for a symmetric code `x ≈ scale·(L − nmax)` with `L − nmax` in
/// `−nmax..nmax` and weights `x²` (llama.cpp's `make_qx_quants`, `rmse_type` 1). Tries the grid
/// through the largest magnitude and 18 neighbours `(nmax ± 0.1·k) / max`. Returns the scale;
/// `l` holds the offset codes.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    make_qx_quants_weighted(nmax, x, l, None)
}

/// [`make_qx_quants`] with explicit weights (`quant_weights`, from an importance matrix) in place
/// of `x²`.
pub(crate) fn make_qx_quants_weighted(nmax: i32, x: &[f32], l: &mut [i8], weights: Option<&[f32]>) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < 1e-15 {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &v) in x.iter().enumerate() {
            let q = code(iscale, v) as f32;
            let w = weights.map_or(v * v, |w| w[i]);
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    for (i, &v) in x.iter().enumerate() {
        l[i] = (code(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (code(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The 6-bit scale and min of sub-block `j` from the 12 packed bytes of a Q4_K/Q5_K block.
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Packs 8 (scale, min) pairs of 6 bits into 12 bytes (the inverse of [`scale_min`]).
fn pack_scales(ls: &[u8; 8], lm: &[u8; 8], q: &mut [u8]) {
    for j in 0..8 {
        if j < 4 {
            q[j] = ls[j];
            q[j + 4] = lm[j];
        } else {
            q[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
            q[j - 4] |= (ls[j] >> 4) << 6;
            q[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// The affine sub-block search and 6-bit scale packing shared by Q4_K and Q5_K: fills `l` with
/// the final codes and writes `d`, `dmin` and the 12 scale bytes at the start of `out`.
fn affine_superblock(x: &[f32], nmax: i32, rmin: f32, nstep: i32, l: &mut [u8; 256], out: &mut [u8]) {
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], &mut laux, rmin, 0.1, nstep);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    put_f16(out, 0, max_scale / 63.0);
    put_f16(out, 2, max_min / 63.0);
    out[4..16].iter_mut().for_each(|b| *b = 0);
    pack_scales(&ls, &lm, &mut out[4..16]);
    let (d_all, dmin_all) = (f16_at(out, 0), f16_at(out, 2));
    for j in 0..8 {
        let (sc, m) = scale_min(j, &out[4..16]);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

/// Q4_K: d, dmin (f16), 12 scale bytes, 128 bytes of nibbles (144 bytes per 256 weights).
pub fn q4_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; 256];
    affine_superblock(x, 15, -1.0, 20, &mut l, out);
    for c in 0..4 {
        for j in 0..32 {
            out[16 + 32 * c + j] = l[64 * c + j] | (l[64 * c + 32 + j] << 4);
        }
    }
}

pub fn dq4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (s1, m1) = scale_min(2 * c, scales);
        let (s2, m2) = scale_min(2 * c + 1, scales);
        let (d1, mm1, d2, mm2) = (d * s1 as f32, dmin * m1 as f32, d * s2 as f32, dmin * m2 as f32);
        for j in 0..32 {
            let q = qs[32 * c + j];
            y[64 * c + j] = d1 * (q & 0x0F) as f32 - mm1;
            y[64 * c + 32 + j] = d2 * (q >> 4) as f32 - mm2;
        }
    }
}

/// Q5_K: d, dmin, 12 scale bytes, 32 bytes of fifth bits, 128 bytes of nibbles (176 bytes).
pub fn q5_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; 256];
    affine_superblock(x, 31, -0.5, 15, &mut l, out);
    out[16..48].iter_mut().for_each(|b| *b = 0);
    for c in 0..4 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for j in 0..32 {
            let mut l1 = l[64 * c + j];
            if l1 > 15 {
                l1 -= 16;
                out[16 + j] |= m1;
            }
            let mut l2 = l[64 * c + 32 + j];
            if l2 > 15 {
                l2 -= 16;
                out[16 + j] |= m2;
            }
            out[48 + 32 * c + j] = l1 | (l2 << 4);
        }
    }
}

pub fn dq5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (s1, m1) = scale_min(2 * c, scales);
        let (s2, m2) = scale_min(2 * c + 1, scales);
        let (d1, mm1, d2, mm2) = (d * s1 as f32, dmin * m1 as f32, d * s2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for j in 0..32 {
            let q = qs[32 * c + j];
            let h1 = if qh[j] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[j] & u2 != 0 { 16 } else { 0 };
            y[64 * c + j] = d1 * ((q & 0x0F) + h1) as f32 - mm1;
            y[64 * c + 32 + j] = d2 * ((q >> 4) + h2) as f32 - mm2;
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d last (210 bytes).
pub fn q6_k(x: &[f32], out: &mut [u8]) {
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        out.iter_mut().for_each(|b| *b = 0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(out, 208, 1.0 / iscale);
    for ib in 0..16 {
        out[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = f16_at(out, 208);
    for j in 0..16 {
        let d = d_all * (out[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
        }
    }
    for h in 0..2 {
        for j in 0..32 {
            let q = |o: usize| l[128 * h + j + o] as u8;
            let (q1, q2, q3, q4) = (q(0), q(32), q(64), q(96));
            out[64 * h + j] = (q1 & 15) | ((q3 & 15) << 4);
            out[64 * h + j + 32] = (q2 & 15) | ((q4 & 15) << 4);
            out[128 + 32 * h + j] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

pub fn dq6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = |i: usize| (b[192 + 8 * h + i] as i8) as f32;
        for j in 0..32 {
            let is = j / 16;
            let q1 = ((ql[j] & 0x0F) | ((qh[j] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[j + 32] & 0x0F) | (((qh[j] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[j] >> 4) | (((qh[j] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[j + 32] >> 4) | (((qh[j] >> 6) & 3) << 4)) as i32 - 32;
            y[128 * h + j] = d * sc(is) * q1 as f32;
            y[128 * h + j + 32] = d * sc(is + 2) * q2 as f32;
            y[128 * h + j + 64] = d * sc(is + 4) * q3 as f32;
            y[128 * h + j + 96] = d * sc(is + 6) * q4 as f32;
        }
    }
}

/// Q2_K (decode only): 16 scale bytes (4-bit scale, 4-bit min), 64 bytes of 2-bit quants,
/// d, dmin (84 bytes per 256 weights). ggml's `dequantize_row_q2_K`.
pub fn dq2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                let out = &mut y[128 * half + 32 * j + 16 * part..][..16];
                for (l, o) in out.iter_mut().enumerate() {
                    *o = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K (decode only): 32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes of 6-bit
/// scales, d (110 bytes per 256 weights). ggml's `dequantize_row_q3_K`.
pub fn dq3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    // The 16 six-bit scales: low nibbles from bytes 0..8, high two bits from bytes 8..12.
    let mut scales = [0i32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 { packed[i] & 0x0F } else { packed[i - 8] >> 4 };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | (high << 4)) as i32 - 32;
    }
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for part in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                let out = &mut y[128 * half + 32 * j + 16 * part..][..16];
                for (l, o) in out.iter_mut().enumerate() {
                    let i = 16 * part + l;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let sub = if hmask[i] & m != 0 { 0 } else { 4 };
                    *o = dl * (low - sub) as f32;
                }
            }
            m <<= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5f32, 1.5, 2.5, -0.5, -1.5, 2.4, -2.6].map(nearest_int), [0, 2, 2, 0, -2, 2, -3]);
    }

    #[test]
    fn scales_pack_and_unpack() {
        let ls = [0u8, 63, 17, 42, 5, 63, 33, 1];
        let lm = [63u8, 0, 9, 21, 60, 2, 47, 31];
        let mut q = [0u8; 12];
        pack_scales(&ls, &lm, &mut q);
        for j in 0..8 {
            assert_eq!(scale_min(j, &q), (ls[j], lm[j]), "sub-block {j}");
        }
    }
}
