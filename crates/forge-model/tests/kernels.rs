//! The fused f32 kernels against their plain-op references: same values, same gradients.

use candle_core::{DType, Device, Tensor, Var};
use forge_model::kernels;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = forge_rng::SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.next_normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Runs `f` (fused) and `r` (reference) on fresh variables made from `inputs`, with a random
/// linear functional of the output as the loss, and compares outputs and every input gradient.
fn compare(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, r: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
    let run = |g: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = g(&ts);
        let probe = randn(y.dims(), 99);
        let loss = (y.clone() * probe).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect();
        (y, gs)
    };
    let (yf, gf) = run(&f);
    let (yr, gr) = run(&r);
    assert!(max_diff(&yf, &yr) <= tol, "outputs differ by {}", max_diff(&yf, &yr));
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        assert!(max_diff(a, b) <= tol, "gradient {i} differs by {}", max_diff(a, b));
    }
}

#[test]
fn rms_norm() {
    let x = randn(&[37, 64], 1);
    let w = randn(&[64], 2).affine(0.2, 1.0).unwrap();
    compare(
        &[x, w],
        |t| kernels::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        |t| kernels::rms_norm_reference(&t[0], &t[1], 1e-5).unwrap(),
        1e-4,
    );
}

#[test]
fn masked_softmax() {
    let x = randn(&[2, 3, 5, 7], 3);
    let mut m = vec![0f32; 2 * 5 * 7];
    for (i, v) in m.iter_mut().enumerate() {
        if (i * 7919) % 5 == 0 && i % 7 != 0 {
            *v = -1e9;
        }
    }
    let mask = Tensor::from_vec(m, (2, 1, 5, 7), &Device::Cpu).unwrap();
    compare(
        &[x],
        |t| kernels::masked_softmax(&t[0], 0.37, &mask).unwrap(),
        |t| kernels::masked_softmax_reference(&t[0], 0.37, &mask).unwrap(),
        1e-5,
    );
}

#[test]
fn silu_mul() {
    let g = (randn(&[9, 33], 4) * 3.0).unwrap();
    let u = randn(&[9, 33], 5);
    compare(&[g, u], |t| kernels::silu_mul(&t[0], &t[1]).unwrap(), |t| (t[0].silu().unwrap() * &t[1]).unwrap(), 1e-5);
}

#[test]
fn gelu_mul() {
    let g = (randn(&[9, 33], 8) * 3.0).unwrap();
    let u = randn(&[9, 33], 9);
    compare(
        &[g, u],
        |t| kernels::gelu_mul(&t[0], &t[1]).unwrap(),
        |t| (kernels::gelu_tanh_reference(&t[0]).unwrap() * &t[1]).unwrap(),
        1e-5,
    );
}

#[test]
fn rope() {
    let x = randn(&[2, 3, 5, 8], 6);
    let cos = randn(&[2, 1, 5, 8], 7).cos().unwrap();
    let sin = randn(&[2, 1, 5, 8], 7).sin().unwrap();
    compare(
        &[x],
        |t| kernels::rope(&t[0], &cos, &sin).unwrap(),
        |t| kernels::rope_reference(&t[0], &cos, &sin).unwrap(),
        1e-5,
    );
}

#[test]
fn cross_entropy() {
    let logits = (randn(&[11, 50], 8) * 4.0).unwrap();
    let targets: Vec<u32> = (0..11).map(|i| (i * 7 % 50) as u32).collect();
    let weights: Vec<f32> = (0..11).map(|i| [0.0, 1.0, 0.5][i % 3]).collect();
    let total: f64 = weights.iter().map(|w| *w as f64).sum();
    compare(
        &[logits],
        |t| kernels::cross_entropy(&t[0], &targets, &weights, total).unwrap(),
        |t| kernels::cross_entropy_reference(&t[0], &targets, &weights, total).unwrap(),
        1e-5,
    );
}

#[test]
fn frozen_matmul_matches_and_leaves_the_weight_alone() {
    let x = Var::from_tensor(&randn(&[13, 24], 9)).unwrap();
    let w = randn(&[17, 24], 10);
    let y = kernels::frozen_matmul(x.as_tensor(), &w).unwrap();
    let r = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    assert!(max_diff(&y, &r) < 1e-5);
    let grads = y.sum_all().unwrap().backward().unwrap();
    let expected = Tensor::ones((13, 17), DType::F32, &Device::Cpu).unwrap().matmul(&w).unwrap();
    assert!(max_diff(grads.get(x.as_tensor()).unwrap(), &expected) < 1e-5);
}
