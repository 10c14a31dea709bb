//! Logit parity with Hugging Face transformers: tiny random checkpoints (a Llama with grouped
//! query attention and Llama 3 rope scaling, a Qwen2 with q/k/v biases and tied embeddings)
//! written by transformers, and the logits it computed, recorded by `scripts/reference_logits.py`.

use std::path::Path;

use candle_core::{Device, Tensor};
use forge_model::{Dropout, Layout, Llama, io};

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
    let cfg = io::read_config(&dir).unwrap();
    let model = Llama::from_tensors(cfg, io::read_weights(&dir, &Device::Cpu).unwrap(), &Device::Cpu).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap()).unwrap();
    let ids: Vec<u32> = reference["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let expected: Vec<Vec<f64>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&input, &Layout::dense(1, ids.len()), &Dropout::off()).unwrap();
    let got: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    let mut max_diff = 0f64;
    for (g, e) in got.iter().zip(&expected) {
        for (a, b) in g.iter().zip(e) {
            max_diff = max_diff.max((*a as f64 - b).abs());
        }
    }
    let scale = expected.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
    eprintln!("{name}: max |forge - transformers| = {max_diff:.2e} (logits up to {scale:.2})");
    assert!(scale > 1.0, "the reference logits are not trivial");
    assert!(max_diff <= 1e-4, "{name}: max abs diff {max_diff}");

    // Decoding token by token with the KV cache gives the same logits as one pass.
    let mut cache = forge_model::KvCache::new();
    for (i, id) in ids.iter().enumerate() {
        let step = Tensor::new(&[*id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let row: Vec<f32> = model.forward_cached(&step, &mut cache).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in row.iter().zip(&expected[i]) {
            assert!((*a as f64 - b).abs() <= 1e-4, "{name}: cached step {i}");
        }
    }
}

#[test]
fn llama_matches_transformers() {
    check("llama");
}

#[test]
fn qwen2_matches_transformers() {
    check("qwen2");
}
