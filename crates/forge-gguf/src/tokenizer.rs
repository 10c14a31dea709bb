//! A GGUF file's tokenizer back as a Hugging Face tokenizer (and forge's chat-template wrapper),
//! so a GGUF model runs on its own, as a game runtime would run it.
//!
//! `gpt2` (byte-level BPE) vocabularies with the pre-tokenizers `gpt-2`, `llama-bpe`/`llama3`,
//! `qwen2` and `smollm` are rebuilt from tokens and merges; control and user-defined tokens become
//! added tokens.

use forge_model::Tokenizer;
use serde_json::{Value as Json, json};

use crate::format::Gguf;
use crate::{GgufError, Result};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

fn split_then_bytes(pattern: &str) -> Json {
    json!({ "type": "Sequence", "pretokenizers": [
        { "type": "Split", "pattern": { "Regex": pattern }, "behavior": "Isolated", "invert": false },
        byte_level(false),
    ]})
}

/// Rebuilds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
pub fn tokenizer(g: &Gguf) -> Result<Tokenizer> {
    let model = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or_default();
    if model != "gpt2" {
        return Err(GgufError::Unsupported(format!(
            "running a `{model}` tokenizer from GGUF (forge runs byte-level BPE, `gpt2`)"
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        g.get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| GgufError::Invalid(format!("missing `{key}`")))?
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| GgufError::Invalid(format!("`{key}` holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = match pre {
        "gpt-2" | "default" => (byte_level(true), false),
        "llama-bpe" | "llama3" | "llama-v3" => (split_then_bytes(LLAMA3_SPLIT), true),
        "qwen2" => (split_then_bytes(QWEN2_SPLIT), false),
        "smollm" => (
            json!({ "type": "Sequence", "pretokenizers": [
                { "type": "Digits", "individual_digits": true }, byte_level(true)] }),
            false,
        ),
        other => return Err(GgufError::Unsupported(format!("running the `{other}` pre-tokenizer"))),
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(1) {
            3 | 4 => added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types.get(id) == Some(&3),
            })),
            5 => continue,
            _ => {}
        }
        vocab.insert(t.clone(), json!(id));
    }
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges,
        },
    });
    let inner: tokenizers::Tokenizer =
        spec.to_string().parse().map_err(|e| GgufError::Invalid(format!("the GGUF tokenizer does not load: {e}")))?;
    let special = |key: &str| {
        g.get(key).and_then(|v| v.as_u64()).and_then(|id| tokens.get(id as usize).map(|t| (t.clone(), id as u32)))
    };
    let chat_template = g.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
    Ok(Tokenizer::from_parts(
        inner,
        chat_template,
        special("tokenizer.ggml.bos_token_id"),
        special("tokenizer.ggml.eos_token_id"),
        special("tokenizer.ggml.padding_token_id"),
        add_bos,
    ))
}
