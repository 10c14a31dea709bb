//! Weight matrices and their products with the activations: a matrix keeps the file's block
//! type (repacked for forge's kernels where it has them), and every product quantizes its input
//! once per dot-product type, as ggml does (`q8_0` for `q8_0`/`q4_0`/`q5_0` weights, `q8_1` for
//! `q4_1`/`q5_1`, `q8_K` for the k-quants; `f16`/`bf16` weights read the input rounded to their
//! precision).

use std::ops::Range;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, GgmlType as Block,
};
use forge_gguf::GgmlType;

use crate::kernels::float::{self, Half};
use crate::kernels::{self as simd, kquant, legacy, vnni};
use crate::{InferError, Result};

/// Runs a function over ranges of `0..n`, perhaps on several threads: `par(n, f)`.
pub(crate) type Par<'a> = &'a dyn Fn(usize, &(dyn Fn(Range<usize>) + Sync));

/// The input format a matrix's dot products read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Need {
    F32,
    /// The input rounded to `f16` (ggml's dot-product type for `f16` weights).
    F16,
    /// The input rounded to `bf16`.
    BF16,
    Q8_0,
    Q8_1,
    Q8K,
}

/// One matrix input, quantized to each dot-product type its matrices need (once per pass).
#[derive(Default)]
pub(crate) struct Acts {
    /// The formats ready for the current input.
    pub(crate) ready: Vec<Need>,
    /// Quantized by forge's kernels (else candle's `from_float`).
    pub(crate) forge: bool,
    pub(crate) q8_0: Vec<BlockQ8_0>,
    /// Per `q8_0` block: its scale as `f32` and its 8 lane sums (of 4 values each) times -128
    /// and -8, for forge's kernels.
    pub(crate) dy: Vec<f32>,
    /// Per `q8_0` block: `q8_1`'s `s = d · Σy`, for `q4_1`/`q5_1` weights.
    pub(crate) s: Vec<f32>,
    /// Per `q8_0` block: `Σy`.
    pub(crate) ysum: Vec<i32>,
    pub(crate) c128: Vec<[i32; 8]>,
    pub(crate) c8: Vec<[i32; 8]>,
    pub(crate) q8_1: Vec<BlockQ8_1>,
    pub(crate) q8k: Vec<BlockQ8K>,
    pub(crate) f16: Vec<f32>,
    pub(crate) bf16: Vec<f32>,
    /// The same as bf16 bits, for `vdpbf16ps`.
    pub(crate) bf16_bits: Vec<u16>,
}

impl Acts {
    /// `x` as a matrix with `f32` weights of dot-product type `need` reads it.
    pub(crate) fn rounded<'a>(&'a self, need: Need, x: &'a [f32]) -> &'a [f32] {
        match need {
            Need::F16 => &self.f16,
            Need::BF16 => &self.bf16,
            _ => x,
        }
    }

    /// The `q8_K` input blocks as bytes, for the kernels.
    pub(crate) fn q8k_bytes(&self) -> &[u8] {
        const { assert!(std::mem::size_of::<BlockQ8K>() == kquant::Q8K_BYTES) };
        // SAFETY: plain-data blocks, viewed as their bytes.
        unsafe {
            std::slice::from_raw_parts(self.q8k.as_ptr() as *const u8, std::mem::size_of_val(self.q8k.as_slice()))
        }
    }

    /// Forgets the last input.
    pub(crate) fn reset(&mut self) {
        self.ready.clear();
    }

    /// Quantizes `x` (`m` rows of `k`) for `need`; `par(m, f)` runs `f` over row ranges,
    /// perhaps on several threads.
    pub(crate) fn prepare(&mut self, need: Need, x: &[f32], m: usize, k: usize, par: Par<'_>) {
        if need == Need::F32 || self.ready.contains(&need) {
            return;
        }
        self.ready.push(need);
        match need {
            Need::F32 => {}
            Need::F16 => {
                self.f16.clear();
                self.f16.extend_from_slice(x);
                simd::round_f16(&mut self.f16);
            }
            Need::BF16 => {
                self.bf16.clear();
                self.bf16_bits.clear();
                self.bf16_bits.extend(x.iter().map(|&x| half::bf16::from_f32(x).to_bits()));
                self.bf16.extend(self.bf16_bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()));
            }
            Need::Q8_0 => {
                let nb = k / 32;
                if self.forge {
                    simd::quantize_q8_0(x, k, self, par);
                } else {
                    self.q8_0.resize(m * nb, BlockQ8_0::zeros());
                    for (row, y) in x.chunks_exact(k).zip(self.q8_0.chunks_exact_mut(nb)) {
                        BlockQ8_0::from_float(row, y);
                    }
                }
            }
            Need::Q8_1 => {
                let nb = k / 32;
                self.q8_1.resize(m * nb, BlockQ8_1::zeros());
                for (row, y) in x.chunks_exact(k).zip(self.q8_1.chunks_exact_mut(nb)) {
                    BlockQ8_1::from_float(row, y);
                }
            }
            Need::Q8K => {
                let nb = k / 256;
                self.q8k.resize(m * nb, BlockQ8K::zeros());
                for (row, y) in x.chunks_exact(k).zip(self.q8k.chunks_exact_mut(nb)) {
                    BlockQ8K::from_float(row, y);
                }
            }
        }
    }
}

/// The dot-product input blocks of a block type.
trait ActSlot: Block {
    const NEED: Need;
    fn slot(a: &Acts) -> &[Self];
}

impl ActSlot for BlockQ8_0 {
    const NEED: Need = Need::Q8_0;
    fn slot(a: &Acts) -> &[Self] {
        &a.q8_0
    }
}

impl ActSlot for BlockQ8_1 {
    const NEED: Need = Need::Q8_1;
    fn slot(a: &Acts) -> &[Self] {
        &a.q8_1
    }
}

impl ActSlot for BlockQ8K {
    const NEED: Need = Need::Q8K;
    fn slot(a: &Acts) -> &[Self] {
        &a.q8k
    }
}

/// A weight matrix `[n][k]` (GGUF's `[k, n]`), kept as the file stores it.
pub(crate) struct Mat {
    pub(crate) n: usize,
    pub(crate) k: usize,
    w: Weights,
}

enum Weights {
    /// `f32`, `f16` or `bf16` weights as `f32`, and the precision ggml rounds the input to for
    /// them (its dot-product type: `F32`, `F16` or `BF16`).
    F32(Vec<f32>, Need),
    /// `f16` or `bf16` weights in their 16 bits, for [`float`]'s kernels.
    Half(Vec<u16>, Half),
    /// `q8_0`, `q4_0`, `q5_0`, `q4_1` or `q5_1` blocks repacked by [`legacy::repack`] for forge's kernels.
    Packed(Vec<u8>, GgmlType, Kernels),
    /// `q8_0` or `q4_0` blocks repacked by [`vnni::repack8`] for forge's VNNI kernels.
    Packed8(Vec<u8>, GgmlType),
    /// `q4_K`, `q5_K` or `q6_K` blocks as the file has them, for [`kquant`]'s kernels.
    KQuant(Vec<u8>, GgmlType),
    /// candle's `vec_dot`.
    Blocks(Box<dyn BlockRows>),
}

impl Mat {
    /// A matrix of `n` rows of `k` values of type `ty`, from its bytes as the file stores them.
    pub(crate) fn new(ty: GgmlType, n: usize, k: usize, data: Vec<u8>, kernels: Kernels) -> Result<Mat> {
        let want = ty.bytes_for(&[n, k])?;
        if data.len() != want {
            return Err(InferError::Model(format!("{} bytes for a {n}×{k} {ty} matrix (expected {want})", data.len())));
        }
        let fast = kernels != Kernels::Candle;
        let nb = k / ty.block();
        let w = match ty {
            GgmlType::F16 | GgmlType::BF16 if fast => {
                let half = if ty == GgmlType::F16 { Half::F16 } else { Half::BF16 };
                Weights::Half(data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(), half)
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let need = match ty {
                    GgmlType::F16 => Need::F16,
                    GgmlType::BF16 => Need::BF16,
                    _ => Need::F32,
                };
                Weights::F32(forge_gguf::quant::dequantize(ty, &data, n * k)?, need)
            }
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q4_1 | GgmlType::Q5_1
                if kernels == Kernels::Vnni =>
            {
                Weights::Packed8(vnni::repack8(&data, n, nb, ty), ty)
            }
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q4_1 | GgmlType::Q5_1 if fast => {
                Weights::Packed(legacy::repack(&data, n, nb, ty, kernels), ty, kernels)
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K if fast => Weights::KQuant(data, ty),
            GgmlType::Q8_0 => Weights::Blocks(Box::new(blocks::<BlockQ8_0>(&data)?)),
            GgmlType::Q4_0 => Weights::Blocks(Box::new(blocks::<BlockQ4_0>(&data)?)),
            GgmlType::Q4_1 => Weights::Blocks(Box::new(blocks::<BlockQ4_1>(&data)?)),
            GgmlType::Q5_0 => Weights::Blocks(Box::new(blocks::<BlockQ5_0>(&data)?)),
            GgmlType::Q5_1 => Weights::Blocks(Box::new(blocks::<BlockQ5_1>(&data)?)),
            GgmlType::Q8_1 => Weights::Blocks(Box::new(blocks::<BlockQ8_1>(&data)?)),
            GgmlType::Q2K => Weights::Blocks(Box::new(blocks::<BlockQ2K>(&data)?)),
            GgmlType::Q3K => Weights::Blocks(Box::new(blocks::<BlockQ3K>(&data)?)),
            GgmlType::Q4K => Weights::Blocks(Box::new(blocks::<BlockQ4K>(&data)?)),
            GgmlType::Q5K => Weights::Blocks(Box::new(blocks::<BlockQ5K>(&data)?)),
            GgmlType::Q6K => Weights::Blocks(Box::new(blocks::<BlockQ6K>(&data)?)),
            GgmlType::Q8K => Weights::Blocks(Box::new(blocks::<BlockQ8K>(&data)?)),
            other => return Err(InferError::Model(format!("no decoder for {other} matrices"))),
        };
        Ok(Mat { n, k, w })
    }

    /// Whether [`row_into`](Self::row_into) gives back the rows of a matrix of `ty` laid out
    /// for `kernels`: every layout but the repacked 4- and 5-bit blocks.
    pub(crate) fn gives_rows(ty: GgmlType, kernels: Kernels) -> bool {
        kernels == Kernels::Candle || !matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q4_1 | GgmlType::Q5_1)
    }

    /// Row `r`'s values (an embedding, for a tied head).
    pub(crate) fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if r >= n || out.len() != k {
            return Err(InferError::Model(format!("row {r} of a {n}×{k} matrix")));
        }
        let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        match &self.w {
            Weights::F32(w, _) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            Weights::Half(w, half) => {
                out.iter_mut().zip(&w[r * k..(r + 1) * k]).for_each(|(o, &b)| *o = half.to_f32(b))
            }
            Weights::KQuant(w, ty) => {
                let rb = ty.bytes_for(&[k])?;
                forge_gguf::quant::dequantize_into(*ty, &w[r * rb..(r + 1) * rb], out)?;
            }
            Weights::Blocks(b) => b.row_into(r, k, out)?,
            Weights::Packed(w, _, kernels) => {
                // q8_0 by quads: per block the 4 scales, then the 4 rows' values; the last
                // n % 4 rows plain.
                let (nb, flip) = (k / 32, if *kernels == Kernels::Vnni { 0x80 } else { 0 });
                let quads = n / 4;
                for (b, o) in out.chunks_exact_mut(32).enumerate() {
                    let (d, vals) = if r < quads * 4 {
                        let blk = &w[((r / 4) * nb + b) * 136..][..136];
                        (f16(blk, 2 * (r % 4)), &blk[8 + 32 * (r % 4)..][..32])
                    } else {
                        let blk = &w[quads * nb * 136 + ((r - quads * 4) * nb + b) * 34..][..34];
                        (f16(blk, 0), &blk[2..34])
                    };
                    o.iter_mut().zip(vals).for_each(|(o, &v)| *o = (v ^ flip) as i8 as f32 * d);
                }
            }
            Weights::Packed8(w, _) => {
                // q8_0 by octets: per block the 8 scales, then 8 groups of 4 values of each row
                // (stored + 128); the last n % 8 rows plain.
                let nb = k / 32;
                let octs = n / 8;
                for (b, o) in out.chunks_exact_mut(32).enumerate() {
                    if r < octs * 8 {
                        let blk = &w[((r / 8) * nb + b) * 272..][..272];
                        let d = f16(blk, 2 * (r % 8));
                        for g in 0..8 {
                            let vals = &blk[16 + 32 * g + 4 * (r % 8)..][..4];
                            o[4 * g..4 * g + 4]
                                .iter_mut()
                                .zip(vals)
                                .for_each(|(o, &v)| *o = (v ^ 0x80) as i8 as f32 * d);
                        }
                    } else {
                        let blk = &w[octs * nb * 272 + ((r - octs * 8) * nb + b) * 34..][..34];
                        let d = f16(blk, 0);
                        o.iter_mut().zip(&blk[2..34]).for_each(|(o, &v)| *o = v as i8 as f32 * d);
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of memory the weights take.
    pub(crate) fn bytes(&self) -> usize {
        match &self.w {
            Weights::F32(w, _) => 4 * w.len(),
            Weights::Half(w, _) => 2 * w.len(),
            Weights::Packed(w, ..) | Weights::Packed8(w, _) | Weights::KQuant(w, _) => w.len(),
            Weights::Blocks(b) => b.bytes(),
        }
    }

    pub(crate) fn needs(&self) -> Need {
        match &self.w {
            Weights::F32(_, need) => *need,
            Weights::Half(_, Half::F16) => Need::F16,
            Weights::Half(_, Half::BF16) => Need::BF16,
            Weights::Packed(..) | Weights::Packed8(..) => Need::Q8_0,
            Weights::KQuant(..) => Need::Q8K,
            Weights::Blocks(b) => b.needs(),
        }
    }

    /// Rows `rows` of the product with the `m` rows of `x`: `out[i * ld + r]`.
    ///
    /// # Safety
    /// `out` must hold `m * ld` floats, `ld >= self.n`, `rows` within `0..self.n`; `acts` must be
    /// prepared for `x` with `self.needs()`.
    pub(crate) unsafe fn compute(
        &self,
        rows: Range<usize>,
        x: &[f32],
        acts: &Acts,
        m: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let k = self.k;
        unsafe {
            match &self.w {
                Weights::F32(w, need) => simd::f32_rows(w, k, rows, acts.rounded(*need, x), m, out, ld),
                Weights::Half(w, half) => {
                    float::rows(w, *half, k, rows, acts.rounded(self.needs(), x), &acts.bf16_bits, m, out, ld)
                }
                Weights::Packed(w, d, kern) => legacy::q_rows(w, *d, *kern, self.n, k / 32, rows, acts, m, out, ld),
                Weights::Packed8(w, d) => vnni::q_rows8(w, *d, self.n, k / 32, rows, acts, m, out, ld),
                Weights::KQuant(w, ty) => kquant::rows(w, *ty, k / 256, rows, acts.q8k_bytes(), m, out, ld),
                Weights::Blocks(b) => b.rows(k, rows, acts, m, out, ld),
            }
        }
    }
}

/// Copies a matrix's blocks out of the file's bytes (a whole number of them: checked by the caller).
fn blocks<T: Block>(data: &[u8]) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !data.len().is_multiple_of(size) {
        return Err(InferError::Model(format!("{} bytes are not whole {}-byte blocks", data.len(), size)));
    }
    let mut v: Vec<T> = (0..data.len() / size).map(|_| T::zeros()).collect();
    // SAFETY: `v` holds exactly `data.len()` bytes of plain-data blocks.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), v.as_mut_ptr() as *mut u8, data.len()) };
    Ok(v)
}

/// Rows of a block-quantized matrix through candle's `vec_dot`.
trait BlockRows: Send + Sync {
    fn needs(&self) -> Need;
    fn bytes(&self) -> usize;
    /// Row `r` (of `k` values) decoded.
    fn row_into(&self, r: usize, k: usize, out: &mut [f32]) -> Result<()>;
    /// # Safety
    /// As [`Mat::compute`].
    unsafe fn rows(&self, k: usize, rows: Range<usize>, acts: &Acts, m: usize, out: *mut f32, ld: usize);
}

impl<T> BlockRows for Vec<T>
where
    T: Block + Send + Sync,
    T::VecDotType: ActSlot,
{
    fn needs(&self) -> Need {
        T::VecDotType::NEED
    }

    fn bytes(&self) -> usize {
        std::mem::size_of_val(self.as_slice())
    }

    fn row_into(&self, r: usize, k: usize, out: &mut [f32]) -> Result<()> {
        let nb = k / T::BLCK_SIZE;
        T::to_float(&self[r * nb..(r + 1) * nb], out);
        Ok(())
    }

    unsafe fn rows(&self, k: usize, rows: Range<usize>, acts: &Acts, m: usize, out: *mut f32, ld: usize) {
        let nb = k / T::BLCK_SIZE;
        let ys = T::VecDotType::slot(acts);
        for r in rows {
            let w = &self[r * nb..(r + 1) * nb];
            for i in 0..m {
                let d = T::vec_dot(k, w, &ys[i * nb..(i + 1) * nb]);
                // SAFETY: the caller's contract.
                unsafe { *out.add(i * ld + r) = d };
            }
        }
    }
}

/// Which dot products a model's `q8_0` and `q4_0` matrices run (other types always run candle's).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernels {
    /// candle's `vec_dot` (its AVX2 kernels), row by row.
    Candle,
    /// forge's, with AVX2, FMA and F16C.
    Avx2,
    /// forge's, with AVX512-VNNI `vpdpbusd` (256-bit, AVX512-VL) and AVX512-BW byte masks as well.
    Vnni,
}

impl Kernels {
    /// The best this CPU runs, or less if `FORGE_KERNELS` (`candle`, `avx2`) asks for it.
    pub fn best() -> Kernels {
        static BEST: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cpu = Kernels::cpu();
            match std::env::var("FORGE_KERNELS").as_deref() {
                Ok("candle") | Ok("scalar") => Kernels::Candle,
                Ok("avx2") => cpu.min(Kernels::Avx2),
                _ => cpu,
            }
        })
    }

    /// The best this CPU has.
    pub fn cpu() -> Kernels {
        static CPU: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
        *CPU.get_or_init(Kernels::detect)
    }

    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                if is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                {
                    return Kernels::Vnni;
                }
                return Kernels::Avx2;
            }
        }
        Kernels::Candle
    }

    pub(crate) fn min(self, other: Kernels) -> Kernels {
        if (self as u8) < (other as u8) { self } else { other }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Candle => "candle",
            Kernels::Avx2 => "avx2",
            Kernels::Vnni => "vnni",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels `k`, after checking the CPU runs them: a test of kernels the CPU lacks would
    /// silently compare the fallback with itself.
    fn require(k: Kernels) -> Kernels {
        assert!(
            Kernels::cpu() as u8 >= k as u8,
            "this CPU lacks the instructions of forge's {k:?} kernels, which this test exists to check"
        );
        k
    }

    /// forge's kernels this CPU runs: AVX2 (required: a test of kernels the CPU lacks would
    /// compare the fallback with itself), and the AVX512-VNNI ones where it has them — said on
    /// stderr when it has not, so a run on an AVX2-only CPU shows what it did not check.
    fn forge_kernels() -> Vec<Kernels> {
        let mut k = vec![require(Kernels::Avx2)];
        if Kernels::cpu() == Kernels::Vnni {
            k.push(Kernels::Vnni);
        } else {
            eprintln!("this CPU lacks AVX512-VNNI: forge's Vnni kernels are not checked here");
        }
        k
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = forge_rng::SplitMix64::new(seed);
        // Mostly small values with a few large ones, as trained weights have.
        (0..n).map(|i| (rng.next_f64() as f32 - 0.5) * if i % 61 == 0 { 8.0 } else { 1.0 }).collect()
    }

    /// `x · matᵀ` for the `m` rows of `x`, in row chunks of `chunk` as a parallel pass takes them.
    fn product(mat: &Mat, x: &[f32], m: usize, chunk: usize) -> Vec<f32> {
        let mut acts = Acts { forge: true, ..Acts::default() };
        acts.prepare(mat.needs(), x, m, mat.k, &|n, f| f(0..n));
        let mut out = vec![f32::NAN; m * mat.n];
        let mut r = 0;
        while r < mat.n {
            let end = (r + chunk).min(mat.n);
            // SAFETY: `out` holds `m * n` floats; the rows are within the matrix.
            unsafe { mat.compute(r..end, x, &acts, m, out.as_mut_ptr(), mat.n) };
            r = end;
        }
        out
    }

    /// forge's kernels against candle's `vec_dot` on the same weights of type `ty` and inputs,
    /// for every tile shape — rows left over after quads and octets, inputs left over after tiles
    /// of 4, row chunks as a parallel pass cuts them — within float rounding of the terms'
    /// magnitudes plus `min_tol` of the minimums' shares (`m · Σx` per block, for `q4_1`/`q5_1`).
    fn agree_with_candle(ty: GgmlType, kernels: Kernels, shapes: &[(usize, usize, usize)], min_tol: f32) {
        let qk = ty.block();
        for &(n, nb, m) in shapes {
            let k = qk * nb;
            let w = values(n * k, n as u64 * 31 + nb as u64);
            let data = forge_gguf::quant::quantize(ty, &w).unwrap();
            let x = values(m * k, 7 + m as u64);
            let reference = product(&Mat::new(ty, n, k, data.clone(), Kernels::Candle).unwrap(), &x, m, n);
            let mat = Mat::new(ty, n, k, data.clone(), kernels).unwrap();
            assert!(!matches!(mat.w, Weights::Blocks(..)), "{ty} runs forge's kernels");
            if kernels == Kernels::Vnni && ty.block() == 32 {
                assert!(matches!(mat.w, Weights::Packed8(..)), "{ty} runs the VNNI octet kernels");
            }
            for chunk in [n, 8, 16] {
                let got = product(&mat, &x, m, chunk);
                for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
                    let (row, col) = (i / n, i % n);
                    let scale: f32 = (0..k).map(|c| (w[col * k + c] * x[row * k + c]).abs()).sum::<f32>().max(1.0);
                    let mins: f32 = if min_tol == 0.0 {
                        0.0
                    } else {
                        (0..nb)
                            .map(|b| {
                                let at = (col * nb + b) * ty.block_bytes() + 2;
                                let m = half::f16::from_le_bytes([data[at], data[at + 1]]);
                                (m.to_f32() * x[row * k + qk * b..][..qk].iter().sum::<f32>()).abs()
                            })
                            .sum()
                    };
                    assert!(
                        (g - r).abs() <= 1e-5 * scale + min_tol * mins,
                        "{kernels:?} {ty} {n}×{k}, {m} inputs, chunks of {chunk}: [{row}][{col}] {g} vs {r}"
                    );
                }
            }
        }
    }

    /// `q4_1`, `q5_1`: candle rounds the input's sum `s` as `f16(Σq) · d` where ggml (and forge)
    /// round `d · Σq` once, an f16 ulp of the minimum's share apart. Candle insists on an even
    /// number of blocks a row.
    #[test]
    fn kernels_with_minimums_agree_with_candle_on_every_tile_shape() {
        for kernels in forge_kernels() {
            for ty in [GgmlType::Q4_1, GgmlType::Q5_1] {
                agree_with_candle(ty, kernels, &[(13, 2, 9), (4, 2, 1), (8, 4, 4), (7, 6, 5), (24, 2, 2)], 2e-3);
            }
        }
    }

    /// `q5_0` (ggml's order: 8 float lanes per row, where candle's is scalar), on an even number
    /// of blocks a row as candle's `q5_0` insists.
    #[test]
    fn q5_0_kernels_agree_with_candle_on_every_tile_shape() {
        for kernels in forge_kernels() {
            agree_with_candle(GgmlType::Q5_0, kernels, &[(13, 2, 9), (4, 2, 1), (8, 4, 4), (7, 6, 5)], 0.0);
        }
    }

    /// `f16` and `bf16` weights in their 16 bits against the `f32` path (the weights widened at
    /// load), for one token and for prompts, rows left over after the tiles of 8 and 4 and an
    /// input left over after the pairs; and a row whose length is not a multiple of 8.
    #[test]
    fn half_precision_kernels_agree_with_the_f32_path() {
        for ty in [GgmlType::F16, GgmlType::BF16] {
            for (n, k, m) in [(13, 64, 1), (13, 64, 5), (9, 72, 2), (3, 20, 3)] {
                let w = values(n * k, n as u64 + k as u64);
                let data = forge_gguf::quant::quantize(ty, &w).unwrap();
                let x = values(m * k, 3 + m as u64);
                let reference = product(&Mat::new(ty, n, k, data.clone(), Kernels::Candle).unwrap(), &x, m, n);
                let mat = Mat::new(ty, n, k, data, require(Kernels::Avx2)).unwrap();
                assert!(matches!(mat.w, Weights::Half(..)));
                for chunk in [n, 8] {
                    let got = product(&mat, &x, m, chunk);
                    for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
                        let scale: f32 =
                            (0..k).map(|c| (w[i % n * k + c] * x[i / n * k + c]).abs()).sum::<f32>().max(1.0);
                        assert!((g - r).abs() <= 1e-5 * scale, "{ty} {n}×{k}, {m} inputs: [{i}] {g} vs {r}");
                    }
                }
            }
        }
    }

    /// A tied head keeps one copy of the embedding table: every layout said to give its rows
    /// gives back exactly the file's values, for rows in the quads and octets and after them.
    #[test]
    fn matrices_give_back_their_rows() {
        let types = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
        ];
        for kernels in [vec![Kernels::Candle], forge_kernels()].concat() {
            for ty in types {
                let (n, k) = (13, 256);
                let data = forge_gguf::quant::quantize(ty, &values(n * k, 5)).unwrap();
                let want = forge_gguf::quant::dequantize(ty, &data, n * k).unwrap();
                let mat = Mat::new(ty, n, k, data, kernels).unwrap();
                if !Mat::gives_rows(ty, kernels) {
                    assert!(matches!(mat.w, Weights::Packed(..) | Weights::Packed8(..)), "{kernels:?} {ty}");
                    continue;
                }
                let mut row = vec![0f32; k];
                for r in 0..n {
                    mat.row_into(r, &mut row).unwrap();
                    assert_eq!(row, want[r * k..(r + 1) * k], "{kernels:?} {ty} row {r}");
                }
                assert!(mat.row_into(n, &mut row).is_err());
            }
        }
    }

    /// `q4_K`, `q5_K`, `q6_K`, on odd and even super-block counts.
    #[test]
    fn k_quant_kernels_agree_with_candle_on_every_tile_shape() {
        for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            agree_with_candle(ty, require(Kernels::Avx2), &[(13, 1, 9), (4, 2, 1), (9, 3, 4), (5, 1, 6)], 0.0);
        }
    }
}
