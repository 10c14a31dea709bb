//! The LoRA training engine against candle's autograd on the reference model (itself checked
//! against finite differences in `grad.rs`): the same loss and the same gradient of every LoRA
//! parameter, for llama (grouped-query attention, untied head), qwen2 (q/k/v biases, tied) and
//! gemma3 (head norms, post-norms, GeGLU, a sliding window inside the batch), with packed
//! segments, padding, prompt tokens of weight 0 and dropout; and in bf16, close to f32.

use candle_core::{Device, Tensor};
use forge_model::engine::{BaseDtype, Batch, Engine, Lora};
use forge_model::lora::{self, LoraSpec};
use forge_model::{Arch, Dropout, GemmaConfig, Layout, Llama, ModelConfig, weighted_cross_entropy};

fn tiny(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        hidden: 32,
        intermediate: 48,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        vocab: 37,
        rms_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_positions: 64,
        tie_embeddings: arch != Arch::Llama,
        qkv_bias: arch == Arch::Qwen2,
        bos: None,
        eos: vec![],
        pad: None,
        gemma: (arch == Arch::Gemma3).then_some(GemmaConfig {
            sliding_window: 4,
            sliding_pattern: 3,
            rope_local_theta: 100.0,
            query_pre_attn_scalar: 6.0,
        }),
    }
}

/// Row 0: two packed samples and padding; row 1: one sample longer than the window.
fn batch() -> (Vec<u32>, Layout, Vec<u32>, Vec<f32>) {
    let ids = vec![1u32, 4, 7, 2, 9, 3, 0, 0, 0, 0, 5, 6, 8, 10, 1, 2, 3, 11, 12, 13];
    let layout = Layout {
        batch: 2,
        len: 10,
        positions: vec![0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        segments: vec![1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    };
    let targets = vec![4u32, 7, 0, 9, 3, 0, 0, 0, 0, 0, 6, 8, 10, 1, 2, 3, 11, 12, 13, 0];
    // Prompt tokens of weight 0, as under prompt-loss-weight 0.
    let weights =
        vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    (ids, layout, targets, weights)
}

/// A model whose every part matters (weights ~ 1.5/√fan-in, norms 1 ± 0.2), with LoRA pairs of
/// rank 3 on all seven projections, B non-zero.
fn model(arch: Arch, dropout: f64) -> (Llama, Vec<(String, candle_core::Var)>) {
    let cfg = tiny(arch);
    let mut rng = forge_rng::SplitMix64::new(11);
    let tensors = Llama::random(cfg.clone(), 3, &Device::Cpu)
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let dims = t.dims().to_vec();
            let n = t.elem_count();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                (0..n).map(|_| (1.0 + 0.2 * rng.next_normal()) as f32).collect()
            } else {
                let scale = 1.5 / (*dims.last().unwrap() as f64).sqrt();
                (0..n).map(|_| (scale * rng.next_normal()) as f32).collect()
            };
            (name, Tensor::from_vec(v, dims, &Device::Cpu).unwrap())
        })
        .collect();
    let mut model = Llama::from_tensors(cfg, tensors, &Device::Cpu).unwrap();
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec = LoraSpec { rank: 3, alpha: 6.0, dropout, rslora: false, targets: targets.map(String::from).to_vec() };
    let vars = lora::attach(&mut model, &spec, 5).unwrap();
    for (name, v) in &vars {
        if name.contains("lora_B") {
            let b: Vec<f32> = (0..v.elem_count()).map(|_| (0.3 * rng.next_normal()) as f32).collect();
            v.set(&Tensor::from_vec(b, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    // The pairs inside the model share storage with the variables.
    (model, vars)
}

fn reference(model: &Llama, vars: &[(String, candle_core::Var)], dropout: &Dropout) -> (f64, Vec<Vec<f32>>) {
    let (ids, layout, targets, weights) = batch();
    let n = ids.len();
    let input = Tensor::from_vec(ids, (layout.batch, layout.len), &Device::Cpu).unwrap();
    let logits = model.forward(&input, &layout, dropout).unwrap().reshape((n, model.cfg.vocab)).unwrap();
    let (loss, _) = weighted_cross_entropy(&logits, &targets, &weights).unwrap();
    let grads = loss.backward().unwrap();
    let g =
        vars.iter().map(|(_, v)| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect();
    (loss.to_scalar::<f32>().unwrap() as f64, g)
}

fn engine(model: &Llama, dtype: BaseDtype, dropout: &Dropout) -> (f64, Vec<Vec<f32>>, f64) {
    let (ids, layout, targets, weights) = batch();
    let e = Engine::new(model, dtype).unwrap();
    let lora = Lora::of(model).unwrap();
    let b = Batch { ids: &ids, layout: &layout, targets: &targets, weights: &weights };
    let (loss, grads) = e.loss_and_grads(&lora, &b, dropout).unwrap();
    let (sum, total) = e.loss(&lora, &b).unwrap();
    // In the variables' order: per layer, per adapted module, A then B.
    let mut flat = Vec::new();
    for layer in grads {
        for (da, db) in layer.into_iter().flatten() {
            flat.push(da);
            flat.push(db);
        }
    }
    (loss, flat, sum / total)
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-6);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

#[test]
fn engine_matches_autograd_in_f32() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
        for (p, seed) in [(0.0, None), (0.3, Some(42))] {
            let (model, vars) = model(arch, p);
            let dropout = seed.map_or(Dropout::off(), Dropout::seeded);
            let (want_loss, want) = reference(&model, &vars, &dropout);
            let (loss, got, eval) = engine(&model, BaseDtype::F32, &dropout);
            assert_eq!(got.len(), want.len());
            assert!((loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "{arch:?} p={p}: loss {loss} vs {want_loss}");
            let worst = got.iter().zip(&want).map(|(g, w)| max_rel(g, w)).fold(0f64, f64::max);
            eprintln!(
                "{arch:?} dropout {p}: loss {loss:.6} (autograd {want_loss:.6}), worst relative gradient error {worst:.2e}"
            );
            for ((name, _), (g, w)) in vars.iter().zip(got.iter().zip(&want)) {
                assert!(max_rel(g, w) < 1e-4, "{arch:?} p={p}: {name}: {:.2e}", max_rel(g, w));
                assert!(w.iter().any(|x| *x != 0.0), "{name} has no gradient");
            }
            if p == 0.0 {
                assert!(
                    (eval - want_loss).abs() <= 1e-5 * want_loss.abs(),
                    "{arch:?}: eval loss {eval} vs {want_loss}"
                );
            }
        }
    }
}

#[test]
fn bf16_base_stays_close_to_f32() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        let (model, _) = model(arch, 0.0);
        let (l32, g32, _) = engine(&model, BaseDtype::F32, &Dropout::off());
        let (l16, g16, _) = engine(&model, BaseDtype::Bf16, &Dropout::off());
        let worst = g16.iter().zip(&g32).map(|(a, b)| cosine(a, b)).fold(1f64, f64::min);
        eprintln!("{arch:?}: bf16 loss {l16:.5} vs f32 {l32:.5}; lowest gradient cosine {worst:.5}");
        assert!((l16 - l32).abs() < 0.02 * l32, "{arch:?}: {l16} vs {l32}");
        assert!(worst > 0.995, "{arch:?}: gradient cosine {worst}");
    }
}

#[test]
fn dropout_masks_change_with_the_seed() {
    let (model, _) = model(Arch::Llama, 0.05);
    let a = engine(&model, BaseDtype::Bf16, &Dropout::seeded(1));
    let b = engine(&model, BaseDtype::Bf16, &Dropout::seeded(2));
    let c = engine(&model, BaseDtype::Bf16, &Dropout::off());
    eprintln!("{} {} {}", a.0, b.0, c.0);
    assert_ne!(a.0, b.0);
    assert_ne!(a.0, c.0);
}
