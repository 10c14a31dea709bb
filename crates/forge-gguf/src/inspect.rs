//! `forge inspect`: what a GGUF file holds, and whether llama.cpp has what it needs to load it.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value as Json, json};

use crate::format::{Gguf, Value};
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

/// llama.cpp's `LLAMA_MAX_LAYERS`: the most layers its per-layer hyperparameters hold.
pub const MAX_LAYERS: u64 = 512;

/// Tokenizer models llama.cpp knows (`llama_vocab::impl::load`; any other is a load error).
pub const KNOWN_TOKENIZERS: &[&str] = &["no", "none", "llama", "bert", "gpt2", "t5", "rwkv", "plamo2"];

/// A key llama.cpp reads as a u32, or as an array of one u32 per layer (`get_key_or_arr`).
fn per_layer(md: &BTreeMap<&str, &Value>, key: &str, n_layer: usize, p: &mut Vec<String>) -> Option<Vec<u64>> {
    match md.get(key)? {
        Value::U32(v) => Some(vec![u64::from(*v); n_layer]),
        Value::Array(items) => {
            if items.len() != n_layer {
                p.push(format!("`{key}` has {} entries, but the model has {n_layer} layers", items.len()));
                return None;
            }
            let values: Option<Vec<u64>> = items
                .iter()
                .map(|v| match v {
                    Value::U32(x) => Some(u64::from(*x)),
                    Value::I32(x) => u64::try_from(*x).ok(),
                    _ => None,
                })
                .collect();
            if values.is_none() {
                p.push(format!("`{key}` must hold u32 (or non-negative i32) values, one per layer"));
            }
            values
        }
        v => {
            p.push(format!("`{key}` is {} but llama.cpp reads u32 (or one u32 per layer)", v.type_name()));
            None
        }
    }
}

/// Lists up to six names, then how many more.
fn some(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    format!(
        "{}{}",
        shown.join(", "),
        if names.len() > 6 { format!(", ... ({} in all)", names.len()) } else { String::new() }
    )
}

/// A tensor llama.cpp's loader creates: name, shape (outermost first), whether it must exist.
struct Want {
    name: String,
    shape: Vec<usize>,
    required: bool,
}

/// Checks the tensors of a llama, qwen2 or gemma3 model against what llama.cpp's loader
/// creates for it (`load_tensors`): every required tensor present with the shape the
/// hyperparameters imply, and no tensor it would not use ("wrong number of tensors"). Every count
/// is checked against what the file holds before it sizes a list.
fn layout(g: &Gguf, md: &BTreeMap<&str, &Value>, arch: &str, n_vocab: Option<usize>, p: &mut Vec<String>) {
    let min_per_layer = match arch {
        "llama" => 9,
        "qwen2" => 12,
        "gemma3" => 15,
        other => {
            p.push(format!(
                "forge checks the tensors of llama, qwen2 and gemma3 models only: it cannot tell whether llama.cpp \
                 loads this `{other}` model"
            ));
            return;
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let u32_key = |key: &str| match md.get(key) {
        Some(Value::U32(v)) => Some(u64::from(*v)),
        _ => None,
    };
    // Missing or mistyped keys are reported by the caller; without them there is nothing to check.
    let (Some(n_layer), Some(n_embd), Some(n_vocab)) =
        (u32_key(&k("block_count")), u32_key(&k("embedding_length")), n_vocab)
    else {
        return;
    };
    // Each layer has several tensors: a count beyond the file's tensors is corrupt, and must not
    // size the list below (nor may one beyond llama.cpp's limit).
    if n_layer > g.tensors.len() as u64 {
        p.push(format!(
            "`{arch}.block_count` = {n_layer}, but the file has only {} tensors (a {arch} layer has at least \
             {min_per_layer})",
            g.tensors.len()
        ));
        return;
    }
    if n_layer > MAX_LAYERS {
        p.push(format!("`{arch}.block_count` = {n_layer}, but llama.cpp loads at most {MAX_LAYERS} layers"));
        return;
    }
    if u32_key(&k("expert_count")).is_some_and(|n| n > 0) {
        p.push(format!("a mixture-of-experts {arch} model: forge cannot check its tensors against llama.cpp's"));
        return;
    }
    let n_layer = n_layer as usize;
    let (Some(heads), Some(ff)) =
        (per_layer(md, &k("attention.head_count"), n_layer, p), per_layer(md, &k("feed_forward_length"), n_layer, p))
    else {
        return;
    };
    let kv_heads = match md.get(k("attention.head_count_kv").as_str()) {
        None => heads.clone(),
        Some(_) => match per_layer(md, &k("attention.head_count_kv"), n_layer, p) {
            Some(v) => v,
            None => return,
        },
    };
    let n_head = heads.first().copied().unwrap_or(0);
    if n_head == 0 {
        p.push(format!("`{arch}.attention.head_count` is 0"));
        return;
    }
    let head_k = u32_key(&k("attention.key_length")).unwrap_or(n_embd / n_head);
    let head_v = u32_key(&k("attention.value_length")).unwrap_or(n_embd / n_head);
    let n_rot = u32_key(&k("rope.dimension_count")).unwrap_or(head_k);
    if arch == "llama" && n_rot != head_k {
        p.push(format!("`llama.rope.dimension_count` = {n_rot}, but llama.cpp requires the head size, {head_k}"));
    }
    // All u32s: products of two fit in a u64, and a usize on the 64-bit targets forge runs on.
    let u = |v: u64| v as usize;
    let e = u(n_embd);
    let mut want = vec![
        Want { name: "token_embd.weight".into(), shape: vec![n_vocab, e], required: true },
        Want { name: "output_norm.weight".into(), shape: vec![e], required: true },
        Want { name: "output.weight".into(), shape: vec![n_vocab, e], required: false },
    ];
    if arch == "llama" {
        want.push(Want { name: "rope_freqs.weight".into(), shape: vec![u(n_rot / 2)], required: false });
    }
    for l in 0..n_layer {
        let (h, kv, f) = (heads[l], kv_heads[l], u(ff[l]));
        let (q, k_gqa, v_gqa) = (u(head_k * h), u(head_k * kv), u(head_v * kv));
        let mut t = |name: &str, shape: Vec<usize>, required: bool| {
            want.push(Want { name: format!("blk.{l}.{name}"), shape, required })
        };
        t("attn_norm.weight", vec![e], true);
        t("ffn_norm.weight", vec![e], true);
        t("ffn_gate.weight", vec![f, e], true);
        t("ffn_up.weight", vec![f, e], true);
        t("ffn_down.weight", vec![e, f], true);
        match arch {
            "qwen2" => {
                t("attn_q.weight", vec![e, e], true);
                t("attn_k.weight", vec![v_gqa, e], true);
                t("attn_v.weight", vec![v_gqa, e], true);
                t("attn_output.weight", vec![e, e], true);
                t("attn_q.bias", vec![e], true);
                t("attn_k.bias", vec![v_gqa], true);
                t("attn_v.bias", vec![v_gqa], true);
            }
            _ => {
                t("attn_q.weight", vec![q, e], true);
                t("attn_k.weight", vec![k_gqa, e], true);
                t("attn_v.weight", vec![v_gqa, e], true);
                t("attn_output.weight", vec![e, q], true);
            }
        }
        if arch == "llama" {
            for (name, shape) in [
                ("attn_q.bias", e),
                ("attn_k.bias", v_gqa),
                ("attn_v.bias", v_gqa),
                ("attn_output.bias", e),
                ("ffn_gate.bias", f),
                ("ffn_down.bias", e),
                ("ffn_up.bias", f),
            ] {
                t(name, vec![shape], false);
            }
        }
        if arch == "gemma3" {
            t("attn_q_norm.weight", vec![u(head_k)], true);
            t("attn_k_norm.weight", vec![u(head_k)], true);
            t("post_attention_norm.weight", vec![e], true);
            t("post_ffw_norm.weight", vec![e], true);
        }
    }
    let present: HashMap<&str, &crate::format::TensorInfo> = g.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let wanted: HashSet<&str> = want.iter().map(|w| w.name.as_str()).collect();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for w in &want {
        match present.get(w.name.as_str()) {
            None if w.required => missing.push(w.name.clone()),
            Some(t) if t.shape != w.shape => {
                wrong.push(format!("`{}` is {:?}, llama.cpp expects {:?}", w.name, t.shape, w.shape))
            }
            _ => {}
        }
    }
    let unused: Vec<String> =
        g.tensors.iter().filter(|t| !wanted.contains(t.name.as_str())).map(|t| t.name.clone()).collect();
    if !missing.is_empty() {
        p.push(format!("missing {} tensor(s): {}", missing.len(), some(&missing)));
    }
    if !wrong.is_empty() {
        p.push(format!("{} tensor(s) of the wrong shape: {}", wrong.len(), some(&wrong)));
    }
    if !unused.is_empty() {
        p.push(format!(
            "{} tensor(s) a {arch} model does not have (llama.cpp's loader fails on \"wrong number of tensors\"): {}",
            unused.len(),
            some(&unused)
        ));
    }
}

/// Checks an array of the vocabulary's size: present (when `required`), of `ty`, one per token.
fn vocab_array(md: &BTreeMap<&str, &Value>, key: &str, ty: &str, n: Option<usize>, p: &mut Vec<String>) {
    let Some(v) = md.get(key) else { return };
    let Some(items) = v.as_array() else {
        p.push(format!("`{key}` is {} but llama.cpp reads an array of {ty}", v.type_name()));
        return;
    };
    if items.iter().any(|i| i.type_name() != ty) {
        p.push(format!("`{key}` must hold {ty} values"));
    }
    if let Some(n) = n.filter(|n| *n != items.len()) {
        // llama.cpp reads one per token without checking the length.
        p.push(format!("`{key}` has {} entries for {n} tokens", items.len()));
    }
}

/// What llama.cpp would miss or reject, one line each (empty: llama.cpp's loader rules hold, as
/// far as forge checks them: the container's, which [`crate::format::read`] enforces, and the
/// keys, vocabulary and tensors of a llama, qwen2 or gemma3 model, or a LoRA adapter).
pub fn problems(g: &Gguf) -> Vec<String> {
    let mut p = Vec::new();
    let md = g.metadata_map();
    if md.len() != g.metadata.len() {
        p.push("duplicate metadata keys (llama.cpp rejects them)".into());
    }
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
        let by_name: HashMap<&str, &crate::format::TensorInfo> =
            g.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut ranks = BTreeMap::new();
        for t in &g.tensors {
            if let Some(base) = t.name.strip_suffix(".lora_a") {
                match by_name.get(format!("{base}.lora_b").as_str()) {
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
    for k in ["context_length", "embedding_length", "block_count"] {
        need(&mut p, &format!("{arch}.{k}"), "u32");
    }
    for k in ["feed_forward_length", "attention.head_count"] {
        let key = format!("{arch}.{k}");
        if !md.contains_key(key.as_str()) {
            p.push(format!("missing `{key}` (u32)"));
        }
    }
    need(&mut p, &format!("{arch}.attention.layer_norm_rms_epsilon"), "f32");
    if arch == "gemma3" {
        need(&mut p, "gemma3.attention.sliding_window", "u32");
    }
    match md.get("tokenizer.ggml.model").and_then(|v| v.as_str()) {
        None => p.push("missing `tokenizer.ggml.model` (no tokenizer)".into()),
        Some("gpt2") => {
            if !md.contains_key("tokenizer.ggml.merges") {
                p.push("a gpt2 tokenizer needs `tokenizer.ggml.merges`".into());
            }
            match md.get("tokenizer.ggml.pre").and_then(|v| v.as_str()) {
                None => p.push("missing `tokenizer.ggml.pre` (llama.cpp falls back to `default` and warns)".into()),
                Some(pre) if !KNOWN_PRE.contains(&pre) => {
                    p.push(format!("`tokenizer.ggml.pre` = `{pre}` is not a pre-tokenizer llama.cpp knows"))
                }
                _ => {}
            }
            if !md.contains_key("tokenizer.ggml.eos_token_id") {
                p.push("missing `tokenizer.ggml.eos_token_id` (llama.cpp would default to id 11)".into());
            }
        }
        Some("llama") => {
            if !md.contains_key("tokenizer.ggml.scores") {
                p.push("a llama (SentencePiece) tokenizer needs `tokenizer.ggml.scores`".into());
            }
        }
        Some(other) if !KNOWN_TOKENIZERS.contains(&other) => {
            p.push(format!("`tokenizer.ggml.model` = `{other}` is not a tokenizer llama.cpp knows"))
        }
        Some(_) => {}
    }
    let n_vocab = md.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len());
    if n_vocab.is_none() {
        p.push("missing `tokenizer.ggml.tokens`".into());
    }
    vocab_array(&md, "tokenizer.ggml.tokens", "string", None, &mut p);
    vocab_array(&md, "tokenizer.ggml.merges", "string", None, &mut p);
    vocab_array(&md, "tokenizer.ggml.scores", "f32", n_vocab, &mut p);
    vocab_array(&md, "tokenizer.ggml.token_type", "i32", n_vocab, &mut p);
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"] {
        match md.get(key) {
            Some(v) if v.type_name() != "u32" => {
                p.push(format!("`{key}` is {} but llama.cpp reads u32", v.type_name()))
            }
            Some(v) => {
                if let (Some(id), Some(n)) = (v.as_u64(), n_vocab)
                    && id >= n as u64
                {
                    p.push(format!("`{key}` = {id} is outside the vocabulary of {n}"));
                }
            }
            None => {}
        }
    }
    layout(g, &md, arch, n_vocab, &mut p);
    for t in &g.tensors {
        if t.name.len() >= crate::format::MAX_NAME {
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
    let params = g.tensors.iter().fold(0usize, |n, t| n.saturating_add(t.elements()));
    let data = g.tensors.iter().fold(0u64, |n, t| n.saturating_add(t.bytes));
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
