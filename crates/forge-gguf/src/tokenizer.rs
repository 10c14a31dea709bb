//! A GGUF file's tokenizer back as a Hugging Face tokenizer (and forge's chat-template wrapper),
//! so a GGUF model runs and trains on its own, as a game runtime would run it, and encodes text
//! to exactly llama.cpp's token ids.
//!
//! - `gpt2` (byte-level BPE) vocabularies with the pre-tokenizers `gpt-2`, `llama-bpe`/`llama3`,
//!   `qwen2` and `smollm` are rebuilt from tokens and merges; control and user-defined tokens
//!   become added tokens.
//! - `llama` (SentencePiece) vocabularies are rebuilt as a BPE over the same pieces with byte
//!   fallback. llama.cpp's SPM tokenizer (`llm_tokenizer_spm`) splits text into characters and
//!   repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece; a BPE
//!   whose merges are every split of every piece, ranked by the piece's score, merges the same
//!   pairs in the same order (transformers' `SentencePieceExtractor` builds Gemma's and Llama's
//!   `tokenizer.json` the same way). Spaces become `▁` (and a `▁` is prepended when the file asks
//!   for `add_space_prefix`); control and user-defined pieces match whole before that.

use std::collections::HashMap;

use forge_model::Tokenizer;
use serde_json::{Value as Json, json};
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

use crate::format::Gguf;
use crate::{GgufError, Result};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types.
const NORMAL: u64 = 1;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;
const UNUSED: u64 = 5;

fn byte_level(use_regex: bool) -> Json {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

fn split_then_bytes(pattern: &str) -> Json {
    json!({ "type": "Sequence", "pretokenizers": [
        { "type": "Split", "pattern": { "Regex": pattern }, "behavior": "Isolated", "invert": false },
        byte_level(false),
    ]})
}

fn invalid(msg: impl Into<String>) -> GgufError {
    GgufError::Invalid(msg.into())
}

/// The vocabulary: token strings and types.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<u64>,
}

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    g.get(key)
        .and_then(|v| v.as_array())
        .ok_or_else(|| invalid(format!("missing `{key}`")))?
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(|| invalid(format!("`{key}` holds a non-string"))))
        .collect()
}

fn vocab(g: &Gguf) -> Result<Vocab> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(invalid("the tokenizer has no tokens"));
    }
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_u64().unwrap_or(NORMAL)).collect(),
        Some(a) => {
            return Err(invalid(format!("{} token types for {} tokens", a.len(), tokens.len())));
        }
        None => vec![NORMAL; tokens.len()],
    };
    Ok(Vocab { tokens, types })
}

/// The tokens of type `ty`, matched whole in the text (llama.cpp's special-token partition,
/// which it does before any other processing).
fn added_tokens(v: &Vocab, ty: u64) -> Vec<AddedToken> {
    (0..v.tokens.len())
        .filter(|&i| v.types[i] == ty)
        .map(|i| AddedToken::from(v.tokens[i].clone(), ty == CONTROL).normalized(false))
        .collect()
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, v: Json) -> Result<T> {
    serde_json::from_value(v).map_err(|e| invalid(format!("building the {what}: {e}")))
}

/// Bytes the tokenizer of [`tokenizer`] holds in memory, estimated from the vocabulary: about
/// 240 bytes a token, 2 a byte of token text and 16 a merge (measured as the resident memory a
/// built tokenizer frees on SmolLM2's byte-level BPE, 49,152 tokens: 12 MiB, and Gemma 3's
/// SentencePiece vocabulary, 262,144 tokens: 66 MiB).
pub fn memory_estimate(g: &Gguf) -> u64 {
    let len = |key: &str| g.get(key).and_then(|v| v.as_array()).map_or(&[][..], |a| a);
    let tokens = len("tokenizer.ggml.tokens");
    let text: usize = tokens.iter().filter_map(|t| t.as_str()).map(str::len).sum();
    (240 * tokens.len() + 2 * text + 16 * len("tokenizer.ggml.merges").len()) as u64
}

/// Rebuilds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
pub fn tokenizer(g: &Gguf) -> Result<Tokenizer> {
    let model = g.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or_default();
    let v = vocab(g)?;
    let mut inner = match model {
        "gpt2" => byte_level_bpe(g, &v)?,
        "llama" => sentencepiece(g, &v)?,
        other => {
            return Err(GgufError::Unsupported(format!(
                "a `{other}` tokenizer (forge reads byte-level BPE, `gpt2`, and SentencePiece, `llama`)"
            )));
        }
    };
    // Control tokens are special (decoding skips them); user-defined ones are text.
    let added = |e: tokenizers::Error| invalid(format!("the vocabulary's special tokens: {e}"));
    inner.add_special_tokens(added_tokens(&v, CONTROL)).map_err(added)?;
    inner.add_tokens(added_tokens(&v, USER_DEFINED)).map_err(added)?;
    let special = |key: &str| {
        g.get(key).and_then(|x| x.as_u64()).and_then(|id| v.tokens.get(id as usize).map(|t| (t.clone(), id as u32)))
    };
    let chat_template = g.get("tokenizer.chat_template").and_then(|x| x.as_str()).map(str::to_string);
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|x| x.as_bool()).unwrap_or(model == "llama");
    Ok(Tokenizer::from_parts(
        inner,
        chat_template,
        special("tokenizer.ggml.bos_token_id"),
        special("tokenizer.ggml.eos_token_id"),
        special("tokenizer.ggml.padding_token_id"),
        add_bos,
    ))
}

fn byte_level_bpe(g: &Gguf, v: &Vocab) -> Result<tokenizers::Tokenizer> {
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let pre = g.get("tokenizer.ggml.pre").and_then(|x| x.as_str()).unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = match pre {
        "gpt-2" | "default" => (byte_level(true), false),
        "llama-bpe" | "llama3" | "llama-v3" => (split_then_bytes(LLAMA3_SPLIT), true),
        "qwen2" => (split_then_bytes(QWEN2_SPLIT), false),
        "smollm" => (
            json!({ "type": "Sequence", "pretokenizers": [
                { "type": "Digits", "individual_digits": true }, byte_level(true)] }),
            false,
        ),
        other => return Err(GgufError::Unsupported(format!("the `{other}` pre-tokenizer"))),
    };
    let mut vocab = serde_json::Map::new();
    for (id, t) in v.tokens.iter().enumerate() {
        if v.types[id] != UNUSED {
            vocab.insert(t.clone(), json!(id));
        }
    }
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
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
    spec.to_string().parse().map_err(|e| invalid(format!("the GGUF tokenizer does not load: {e}")))
}

/// The BPE merges that reproduce SentencePiece's score-ordered merging: every split of every
/// normal piece into two pieces of the vocabulary, by the piece's score (highest first; for
/// equal scores, the lower id, then the shorter left part).
pub fn spm_merges(tokens: &[String], types: &[u64], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != NORMAL {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            let known = |p: &str| ids.get(p).is_some_and(|&i| types[i] == NORMAL || types[i] == UNUSED);
            if known(left) && known(right) {
                ranked.push((scores[id], id, split));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked
        .into_iter()
        .map(|(_, id, split)| {
            let (l, r) = tokens[id].split_at(split);
            (l.to_string(), r.to_string())
        })
        .collect()
}

fn sentencepiece(g: &Gguf, v: &Vocab) -> Result<tokenizers::Tokenizer> {
    let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(|x| x.as_array()) {
        Some(a) if a.len() == v.tokens.len() => a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect(),
        Some(a) => return Err(invalid(format!("{} token scores for {} tokens", a.len(), v.tokens.len()))),
        None => return Err(invalid("a SentencePiece vocabulary without `tokenizer.ggml.scores`")),
    };
    let merges = spm_merges(&v.tokens, &v.types, &scores);
    let vocab: tokenizers::models::bpe::Vocab =
        v.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let unk = g
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|x| x.as_u64())
        .and_then(|i| v.tokens.get(i as usize))
        .cloned()
        .unwrap_or_else(|| "<unk>".to_string());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .byte_fallback(true)
        .fuse_unk(false)
        .build()
        .map_err(|e| invalid(format!("the SentencePiece vocabulary does not load as BPE: {e}")))?;
    let space_prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(|x| x.as_bool()).unwrap_or(true);
    let mut normalizers = vec![json!({ "type": "Replace", "pattern": { "String": " " }, "content": "\u{2581}" })];
    let mut decoders = vec![
        json!({ "type": "Replace", "pattern": { "String": "\u{2581}" }, "content": " " }),
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    if space_prefix {
        normalizers.insert(0, json!({ "type": "Prepend", "prepend": "\u{2581}" }));
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
    }
    let normalizer: NormalizerWrapper =
        from_json("normalizer", json!({ "type": "Sequence", "normalizers": normalizers }))?;
    let decoder: DecoderWrapper = from_json("decoder", json!({ "type": "Sequence", "decoders": decoders }))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_normalizer(Some(normalizer)).map_err(|e| invalid(format!("the SentencePiece normalizer: {e}")))?;
    t.with_decoder(Some(decoder));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spm_merges_follow_piece_scores() {
        let t = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let tokens = t(&["a", "b", "c", "ab", "bc", "abc", "<s>"]);
        let types = vec![NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, CONTROL];
        let scores = vec![0.0, 0.0, 0.0, -2.0, -1.0, -3.0, 0.0];
        let m = spm_merges(&tokens, &types, &scores);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // bc (-1) before ab (-2) before abc's two splits (-3), shorter left part first.
        assert_eq!(pairs, vec![("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]);
    }
}
