//! `forge inspect`: what a GGUF file holds, and whether llama.cpp has what it needs to load it.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use crate::format::Gguf;
use crate::types::GgmlType;

/// BPE pre-tokenizer names llama.cpp accepts (an unknown one is a hard load error).
pub const KNOWN_PRE: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "pixtral",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "jina-v2-es",
    "jina-v2-de",
    "qwen2",
    "deepseek-r1-qwen",
    "megrez",
    "smollm",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "falcon",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "chatglm-bpe",
    "glm4",
    "viking",
    "jais",
    "tekken",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "chameleon",
    "minerva-7b",
    "gpt-4o",
    "llama4",
    "superbpe",
    "trillion",
    "bailingmoe",
    "seed-coder",
    "hunyuan",
    "kimi-k2",
    "grok-2",
];

/// What llama.cpp would miss or reject, one line each (empty: loadable as far as forge can tell).
pub fn problems(g: &Gguf) -> Vec<String> {
    let mut p = Vec::new();
    let md = g.metadata_map();
    let ty = md.get("general.type").and_then(|v| v.as_str()).unwrap_or("model");
    let Some(arch) = md.get("general.architecture").and_then(|v| v.as_str()) else {
        p.push("missing `general.architecture`".into());
        return p;
    };
    let need = |p: &mut Vec<String>, key: &str, want: &str| match md.get(key) {
        None => p.push(format!("missing `{key}` ({want})")),
        Some(v) if v.type_name() != want => p.push(format!("`{key}` is {} but llama.cpp reads {want}", v.type_name())),
        _ => {}
    };
    if ty == "adapter" {
        if md.get("adapter.type").and_then(|v| v.as_str()) != Some("lora") {
            p.push("an adapter needs `adapter.type` = \"lora\"".into());
        }
        need(&mut p, "adapter.lora.alpha", "f32");
        let mut ranks = BTreeMap::new();
        for t in &g.tensors {
            if let Some(base) = t.name.strip_suffix(".lora_a") {
                match g.tensor(&format!("{base}.lora_b")) {
                    None => p.push(format!("`{}` has no `{base}.lora_b`", t.name)),
                    Some(b) if b.shape.get(1) != t.shape.first() => {
                        p.push(format!("`{base}`: lora_a {:?} and lora_b {:?} disagree on the rank", t.shape, b.shape))
                    }
                    Some(b) => {
                        ranks.insert(base.to_string(), b.shape[1]);
                    }
                }
            } else if !t.name.ends_with(".lora_b") {
                p.push(format!("`{}` is neither a lora_a nor a lora_b", t.name));
            }
        }
        if ranks.is_empty() {
            p.push("the adapter has no lora_a/lora_b pairs".into());
        }
        return p;
    }
    for k in ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count"] {
        need(&mut p, &format!("{arch}.{k}"), "u32");
    }
    need(&mut p, &format!("{arch}.attention.layer_norm_rms_epsilon"), "f32");
    match md.get("tokenizer.ggml.model").and_then(|v| v.as_str()) {
        None => p.push("missing `tokenizer.ggml.model` (no tokenizer)".into()),
        Some("gpt2") => {
            if md.get("tokenizer.ggml.merges").is_none() {
                p.push("a gpt2 tokenizer needs `tokenizer.ggml.merges`".into());
            }
            match md.get("tokenizer.ggml.pre").and_then(|v| v.as_str()) {
                None => p.push("missing `tokenizer.ggml.pre` (llama.cpp falls back to `default` and warns)".into()),
                Some(pre) if !KNOWN_PRE.contains(&pre) => {
                    p.push(format!("`tokenizer.ggml.pre` = `{pre}` is not a pre-tokenizer llama.cpp knows"))
                }
                _ => {}
            }
            if md.get("tokenizer.ggml.eos_token_id").is_none() {
                p.push("missing `tokenizer.ggml.eos_token_id` (llama.cpp would default to id 11)".into());
            }
        }
        Some("llama") => {
            if md.get("tokenizer.ggml.scores").is_none() {
                p.push("a llama (SentencePiece) tokenizer needs `tokenizer.ggml.scores`".into());
            }
        }
        Some(_) => {}
    }
    let n_vocab = md.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len());
    if n_vocab.is_none() {
        p.push("missing `tokenizer.ggml.tokens`".into());
    }
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"] {
        if let (Some(id), Some(n)) = (md.get(key).and_then(|v| v.as_u64()), n_vocab) {
            if id as usize >= n {
                p.push(format!("`{key}` = {id} is outside the vocabulary of {n}"));
            }
        }
    }
    let hidden = md.get(format!("{arch}.embedding_length").as_str()).and_then(|v| v.as_u64()).map(|v| v as usize);
    let blocks = md.get(format!("{arch}.block_count").as_str()).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let mut required = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    for b in 0..blocks {
        for t in
            ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        {
            required.push(format!("blk.{b}.{t}.weight"));
        }
        if arch == "qwen2" {
            for t in ["attn_q", "attn_k", "attn_v"] {
                required.push(format!("blk.{b}.{t}.bias"));
            }
        }
    }
    let missing: Vec<&String> = required.iter().filter(|r| g.tensor(r).is_none()).collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(6).map(|s| s.as_str()).collect();
        p.push(format!(
            "missing {} tensor(s): {}{}",
            missing.len(),
            shown.join(", "),
            if missing.len() > 6 { ", ..." } else { "" }
        ));
    }
    if let (Some(t), Some(h), Some(n)) = (g.tensor("token_embd.weight"), hidden, n_vocab) {
        if t.shape != [n, h] {
            p.push(format!("token_embd.weight is {:?}, expected [{n}, {h}] (vocabulary × embedding)", t.shape));
        }
    }
    if arch == "qwen2" && g.tensor("rope_freqs.weight").is_some() {
        p.push("qwen2 models must not carry `rope_freqs.weight` (llama.cpp counts it as an extra tensor)".into());
    }
    for t in &g.tensors {
        if t.name.len() >= 64 {
            p.push(format!("tensor name `{}` is 64 bytes or longer", t.name));
        }
        if matches!(t.ty, GgmlType::Q8_1 | GgmlType::Q8K) {
            p.push(format!("`{}` is {}, an activation type that files do not hold", t.name, t.ty));
        }
    }
    p
}

/// The JSON report of `forge inspect --json`.
pub fn report(g: &Gguf) -> Json {
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in &g.tensors {
        let e = by_type.entry(t.ty.to_string()).or_default();
        e.0 += 1;
        e.1 += t.bytes;
    }
    let params: usize = g.tensors.iter().map(|t| t.elements()).sum();
    let data: u64 = g.tensors.iter().map(|t| t.bytes).sum();
    json!({
        "version": g.version,
        "file_size": g.file_size,
        "alignment": g.alignment,
        "parameters": params,
        "bits_per_weight": if params > 0 { data as f64 * 8.0 / params as f64 } else { 0.0 },
        "metadata": g.metadata.iter().map(|(k, v)| (k.clone(), v.to_json(true))).collect::<serde_json::Map<String, Json>>(),
        "tensors": g.tensors.iter().map(|t| json!({
            "name": t.name, "type": t.ty.to_string(), "shape": t.shape, "bytes": t.bytes, "offset": t.offset,
        })).collect::<Vec<_>>(),
        "types": by_type.into_iter().map(|(k, (n, b))| (k, json!({ "tensors": n, "bytes": b }))).collect::<serde_json::Map<String, Json>>(),
        "problems": problems(g),
    })
}
