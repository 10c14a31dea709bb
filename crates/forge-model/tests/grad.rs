//! Gradients of forge's decoder: checked against central finite differences in f64, and every
//! LoRA parameter gets a finite, non-zero gradient.

use candle_core::{DType, Device, Tensor, Var};
use forge_model::lora::{self, LoraSpec};
use forge_model::{Arch, Dropout, GemmaConfig, Layout, Llama, ModelConfig, weighted_cross_entropy};

fn tiny(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        vocab: 11,
        rms_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_positions: 32,
        tie_embeddings: arch != Arch::Llama,
        qkv_bias: arch == Arch::Qwen2,
        bos: None,
        eos: vec![],
        pad: None,
        // A window of 3 in the 7-token rows, and every other layer global, so both kinds of
        // layer and the window's edge are in the graph.
        gemma: (arch == Arch::Gemma3).then_some(GemmaConfig {
            sliding_window: 3,
            sliding_pattern: 2,
            rope_local_theta: 100.0,
            query_pre_attn_scalar: 3.0,
        }),
    }
}

/// Two packed samples and a padding token in one row, plus a second dense row.
fn batch() -> (Tensor, Layout, Vec<u32>, Vec<f32>) {
    let ids = vec![1u32, 4, 7, 2, 9, 3, 0, 5, 6, 8, 10, 1, 2, 3];
    let layout = Layout {
        batch: 2,
        len: 7,
        positions: vec![0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6],
        segments: vec![1, 1, 1, 2, 2, 2, 0, 1, 1, 1, 1, 1, 1, 1],
    };
    // Next-token targets; the last token of each segment and padding predict nothing.
    let targets = vec![4u32, 7, 0, 9, 3, 0, 0, 6, 8, 10, 1, 2, 3, 0];
    let weights = vec![1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    (Tensor::from_vec(ids, (2, 7), &Device::Cpu).unwrap(), layout, targets, weights)
}

fn loss(model: &Llama) -> Tensor {
    let (ids, layout, targets, weights) = batch();
    let logits = model.forward(&ids, &layout, &Dropout::off()).unwrap();
    let logits = logits.reshape((14, model.cfg.vocab)).unwrap();
    weighted_cross_entropy(&logits, &targets, &weights).unwrap().0
}

/// The tiny model in f64, its weights drawn large enough (std 1.5/√fan-in, norms 1 ± 0.2) that
/// every gradient is well above finite-difference noise.
fn lively(cfg: ModelConfig, seed: u64) -> Llama {
    let mut rng = forge_rng::SplitMix64::new(seed);
    let tensors = Llama::random(cfg.clone(), seed, &Device::Cpu)
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let dims = t.dims().to_vec();
            let n = t.elem_count();
            let v: Vec<f64> = if name.ends_with("norm.weight") {
                (0..n).map(|_| 1.0 + 0.2 * rng.next_normal()).collect()
            } else {
                let scale = 1.5 / (*dims.last().unwrap() as f64).sqrt();
                (0..n).map(|_| scale * rng.next_normal()).collect()
            };
            (name, Tensor::from_vec(v, dims, &Device::Cpu).unwrap())
        })
        .collect();
    Llama::from_tensors_as(cfg, tensors, &Device::Cpu, DType::F64).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Compares the analytic gradient of a few entries of each variable with central differences.
fn check_vars(model: &Llama, vars: &[(String, Var)]) {
    let grads = loss(model).backward().unwrap();
    let eps = 1e-5;
    let mut worst = 0f64;
    for (name, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for k in [0, n / 3, n / 2, n - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                scalar(&loss(model))
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let err = (numeric - g[k]).abs() / (numeric.abs() + g[k].abs()).max(1e-4);
            worst = worst.max(err);
            assert!(err < 1e-5, "{name}[{k}]: analytic {} vs numeric {numeric}", g[k]);
        }
    }
    eprintln!("worst relative error {worst:.2e} over {} variables", vars.len());
}

#[test]
fn full_parameter_gradients_match_finite_differences() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
        let (model, vars) = lively(tiny(arch), 3).trainable().unwrap();
        check_vars(&model, &vars);
    }
}

#[test]
fn lora_gradients_match_finite_differences_and_none_is_zero() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        lora_gradients(arch);
    }
}

fn lora_gradients(arch: Arch) {
    let mut model = lively(tiny(arch), 5);
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec =
        LoraSpec { rank: 2, alpha: 4.0, dropout: 0.0, rslora: false, targets: targets.map(String::from).to_vec() };
    let vars = lora::attach(&mut model, &spec, 9).unwrap();
    assert_eq!(vars.len(), 2 * 7 * 2);

    // At initialisation B = 0, so only B has a gradient (as in PEFT).
    let grads = loss(&model).backward().unwrap();
    for (name, v) in &vars {
        let g = grads.get(v.as_tensor()).expect("every LoRA variable is in the graph");
        let norm = scalar(&g.sqr().unwrap().sum_all().unwrap());
        assert!(norm.is_finite());
        assert_eq!(name.contains("lora_B"), norm > 0.0, "{name}: |g|² = {norm}");
    }
    // Once B moves, every LoRA parameter gets a finite, non-zero gradient, matching finite differences.
    for (name, v) in &vars {
        if name.contains("lora_B") {
            let g = grads.get(v.as_tensor()).unwrap();
            v.set(&(v.as_tensor() - (g * 0.1).unwrap()).unwrap()).unwrap();
        }
    }
    let grads = loss(&model).backward().unwrap();
    for (name, v) in &vars {
        let norm = scalar(&grads.get(v.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap());
        assert!(norm.is_finite() && norm > 0.0, "{name}: |g|² = {norm}");
    }
    check_vars(&model, &vars);
}

#[test]
fn merging_lora_gives_the_same_logits() {
    for arch in [Arch::Qwen2, Arch::Gemma3] {
        merging_lora(arch);
    }
}

fn merging_lora(arch: Arch) {
    let mut model = Llama::random(tiny(arch), 6, &Device::Cpu).unwrap();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        rslora: true,
        targets: vec!["q_proj".into(), "down_proj".into()],
    };
    let vars = lora::attach(&mut model, &spec, 1).unwrap();
    for (_, v) in &vars {
        let noise = Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).unwrap();
        v.set(&noise).unwrap();
    }
    let (ids, layout, _, _) = batch();
    let with_lora = model.forward(&ids, &layout, &Dropout::off()).unwrap();
    let merged = lora::merge(&model).unwrap();
    assert!(merged.layers.iter().all(|b| b.linears().iter().all(|(_, l)| l.lora.is_none())));
    let folded = merged.forward(&ids, &layout, &Dropout::off()).unwrap();
    let diff = scalar(&(with_lora - folded).unwrap().abs().unwrap().max_all().unwrap());
    assert!(diff < 1e-4, "{diff}");
}
