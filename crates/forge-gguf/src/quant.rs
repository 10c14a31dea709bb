//! Quantization to ggml's block formats and back, bit-compatible with llama.cpp's reference
//! quantizers (`ggml-quants.c`): the same block layouts, scale choices and rounding, so a file
//! forge writes decodes in llama.cpp to exactly the values forge computes here.
//!
//! Legacy blocks hold 32 weights: `Q8_0` (scale · int8), `Q4_0`/`Q5_0` (scale · (q − 8|16)),
//! `Q4_1`/`Q5_1` (scale · q + min). K-quant super-blocks hold 256 weights in sub-blocks with
//! 6-bit scales (`Q4_K`, `Q5_K`) or 8-bit scales (`Q6_K`), found by llama.cpp's weighted
//! least-squares searches ([`crate::kquant`]).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::GgufError;
use crate::kquant;
use crate::types::GgmlType;

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The element of largest magnitude, with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

// ---- Q8_0: d (f16), 32 × i8 -------------------------------------------------------------

fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16_bytes(d));
    for (j, v) in x.iter().enumerate() {
        out[2 + j] = (v * id).round() as i8 as u8;
    }
}

fn dq8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = b[2 + j] as i8 as f32 * d;
    }
}

// ---- Q4_0: d, 16 bytes of nibbles (element j low, j + 16 high) -----------------------

fn q4_0(x: &[f32], out: &mut [u8]) {
    let max = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16_bytes(d));
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        out[2 + j] = q0 | (q1 << 4);
    }
}

fn dq4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

// ---- Q4_1: d, m, 16 bytes of nibbles ----------------------------------------------------

fn q4_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16_bytes(d));
    out[2..4].copy_from_slice(&f16_bytes(min));
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        out[4 + j] = q0 | (q1 << 4);
    }
}

fn dq4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
        y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

// ---- Q5_0: d, qh (u32: bit j = 5th bit of element j), 16 bytes of nibbles ---------------

fn q5_0(x: &[f32], out: &mut [u8]) {
    let max = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16_bytes(d));
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let q1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        out[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
    }
    out[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn dq5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((b[6 + j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((b[6 + j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

// ---- Q5_1: d, m, qh, 16 bytes of nibbles ------------------------------------------------

fn q5_1(x: &[f32], out: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16_bytes(d));
    out[2..4].copy_from_slice(&f16_bytes(min));
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] - min) * id + 0.5) as u8;
        let q1 = ((x[j + 16] - min) * id + 0.5) as u8;
        out[8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
    }
    out[4..8].copy_from_slice(&qh.to_le_bytes());
}

fn dq5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((b[8 + j] & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((b[8 + j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// The block encoder and decoder of a type.
type Encode = fn(&[f32], &mut [u8]);
type Decode = fn(&[u8], &mut [f32]);

/// Types forge reads but does not write.
fn decoder(ty: GgmlType) -> Option<Decode> {
    Some(match ty {
        GgmlType::Q2K => kquant::dq2_k,
        GgmlType::Q3K => kquant::dq3_k,
        _ => return codec(ty).map(|c| c.1),
    })
}

fn codec(ty: GgmlType) -> Option<(Encode, Decode)> {
    Some(match ty {
        GgmlType::Q8_0 => (q8_0, dq8_0),
        GgmlType::Q4_0 => (q4_0, dq4_0),
        GgmlType::Q4_1 => (q4_1, dq4_1),
        GgmlType::Q5_0 => (q5_0, dq5_0),
        GgmlType::Q5_1 => (q5_1, dq5_1),
        GgmlType::Q4K => (kquant::q4_k, kquant::dq4_k),
        GgmlType::Q5K => (kquant::q5_k, kquant::dq5_k),
        GgmlType::Q6K => (kquant::q6_k, kquant::dq6_k),
        _ => return None,
    })
}

/// Whether forge can write `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || codec(ty).is_some()
}

/// Encodes `x` (a whole number of blocks) as `ty`.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>, GgufError> {
    match ty {
        GgmlType::F32 => return Ok(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => return Ok(x.par_iter().flat_map_iter(|v| f16::from_f32(*v).to_le_bytes()).collect()),
        GgmlType::BF16 => return Ok(x.par_iter().flat_map_iter(|v| bf16::from_f32(*v).to_le_bytes()).collect()),
        _ => {}
    }
    let (encode, _) = codec(ty).ok_or_else(|| GgufError::Unsupported(format!("writing {ty} tensors")))?;
    let (qk, bytes) = (ty.block(), ty.block_bytes());
    if !x.len().is_multiple_of(qk) {
        return Err(GgufError::Invalid(format!("{} values are not whole {ty} blocks of {qk}", x.len())));
    }
    let mut out = vec![0u8; x.len() / qk * bytes];
    out.par_chunks_mut(bytes).zip(x.par_chunks(qk)).for_each(|(o, b)| encode(b, o));
    Ok(out)
}

/// The types [`quantize_weighted`] applies an importance matrix to.
pub fn uses_imatrix(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0)
}

/// Encodes the rows of `x` (`[rows, cols]`) as `ty` guided by an importance matrix: `weights[j]`,
/// the mean square of input column `j` over calibration data (llama.cpp's `quantize_q4_0` /
/// `quantize_q5_0` with `quant_weights`: each block's scale is the weighted least-squares best,
/// weighting element `j` by `weights[j] · √(σ² + x_j²)`, σ² the row's mean square). Other types
/// quantize as [`quantize`] does.
pub fn quantize_weighted(ty: GgmlType, x: &[f32], cols: usize, weights: &[f32]) -> Result<Vec<u8>, GgufError> {
    if !uses_imatrix(ty) {
        return quantize(ty, x);
    }
    let (qk, bytes) = (ty.block(), ty.block_bytes());
    if cols == 0 || !x.len().is_multiple_of(cols) || !cols.is_multiple_of(qk) || weights.len() != cols {
        return Err(GgufError::Invalid(format!(
            "{} values in rows of {cols} with {} importance weights are not whole {ty} rows",
            x.len(),
            weights.len()
        )));
    }
    let row_bytes = cols / qk * bytes;
    let mut out = vec![0u8; x.len() / qk * bytes];
    out.par_chunks_mut(row_bytes).zip(x.par_chunks(cols)).for_each(|(o, row)| {
        let sigma2 = row.iter().fold(0f32, |s, v| s + v * v) / cols as f32;
        let mut w = [0f32; 32];
        let mut l = [0i8; 32];
        for ((ob, xb), qw) in o.chunks_mut(bytes).zip(row.chunks(qk)).zip(weights.chunks(qk)) {
            for j in 0..qk {
                w[j] = qw[j] * (sigma2 + xb[j] * xb[j]).sqrt();
            }
            let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
            let d = kquant::make_qx_quants_weighted(nmax, xb, &mut l, Some(&w));
            ob[..2].copy_from_slice(&f16_bytes(d));
            if ty == GgmlType::Q4_0 {
                for j in 0..16 {
                    ob[2 + j] = l[j] as u8 | ((l[j + 16] as u8) << 4);
                }
            } else {
                let mut qh = 0u32;
                for j in 0..16 {
                    let (a, b) = (l[j] as u8, l[j + 16] as u8);
                    ob[6 + j] = (a & 0x0F) | ((b & 0x0F) << 4);
                    qh |= (((a & 0x10) >> 4) as u32) << j;
                    qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
                }
                ob[2..6].copy_from_slice(&qh.to_le_bytes());
            }
        }
    });
    Ok(out)
}

/// Decodes `out.len()` values of type `ty` into `out` on this thread (a row of an embedding
/// table, say: too little for [`dequantize`]'s thread pool).
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    let n = out.len();
    let expected = ty.bytes_for(&[n])?;
    if bytes.len() != expected {
        return Err(GgufError::Invalid(format!("{} bytes for {n} {ty} values (expected {expected})", bytes.len())));
    }
    let mut each = |width: usize, f: &dyn Fn(&[u8]) -> f32| {
        out.iter_mut().zip(bytes.chunks_exact(width)).for_each(|(o, c)| *o = f(c));
    };
    match ty {
        GgmlType::F32 => each(4, &|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        GgmlType::F16 => each(2, &|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        GgmlType::BF16 => each(2, &|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        GgmlType::F64 => each(8, &|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32),
        _ => {
            let decode = decoder(ty).ok_or_else(|| GgufError::Unsupported(format!("decoding {ty} tensors")))?;
            let (qk, bb) = (ty.block(), ty.block_bytes());
            out.chunks_mut(qk).zip(bytes.chunks(bb)).for_each(|(o, b)| decode(b, o));
        }
    }
    Ok(())
}

/// Decodes `n` values of type `ty`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, GgufError> {
    let expected = ty.bytes_for(&[n])?;
    if bytes.len() != expected {
        return Err(GgufError::Invalid(format!("{} bytes for {n} {ty} values (expected {expected})", bytes.len())));
    }
    match ty {
        GgmlType::F32 => {
            return Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        }
        GgmlType::F16 => {
            return Ok(bytes.par_chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect());
        }
        GgmlType::BF16 => {
            return Ok(bytes.par_chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect());
        }
        GgmlType::F64 => {
            return Ok(bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect());
        }
        _ => {}
    }
    let decode = decoder(ty).ok_or_else(|| GgufError::Unsupported(format!("decoding {ty} tensors")))?;
    let (qk, bb) = (ty.block(), ty.block_bytes());
    let mut y = vec![0f32; n];
    y.par_chunks_mut(qk).zip(bytes.par_chunks(bb)).for_each(|(o, b)| decode(b, o));
    Ok(y)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::{BlockQ2K, BlockQ3K, GgmlType as CandleType};

    use super::*;

    /// The raw bytes of candle's blocks (ggml's layout, `repr(C)`).
    fn bytes_of<T>(blocks: &[T]) -> &[u8] {
        // SAFETY: the blocks are plain `repr(C)` data without padding, as ggml lays them out.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks)) }
    }

    fn check<T: CandleType + Clone>(ty: GgmlType, zero: T) {
        let mut rng = forge_rng::SplitMix64::new(ty.id() as u64);
        let x: Vec<f32> = (0..1024).map(|_| rng.next_normal() as f32 * 0.1).collect();
        let mut blocks = vec![zero; x.len() / 256];
        T::from_float(&x, &mut blocks);
        let mut want = vec![0f32; x.len()];
        T::to_float(&blocks, &mut want);
        let got = dequantize(ty, bytes_of(&blocks), x.len()).unwrap();
        assert_eq!(got, want, "{ty}");
        assert_eq!(bytes_of(&blocks).len(), ty.bytes_for(&[x.len()]).unwrap());
    }

    #[test]
    fn q2_k_and_q3_k_decode_as_ggml() {
        check(GgmlType::Q2K, BlockQ2K::zeros());
        check(GgmlType::Q3K, BlockQ3K::zeros());
    }
}
