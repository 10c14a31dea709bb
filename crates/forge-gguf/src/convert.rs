//! A llama, qwen2 or gemma3 model → a GGUF file llama.cpp loads, at one of the manifest's quantization
//! levels. Follows llama.cpp's `convert_hf_to_gguf.py` (names, metadata, tokenizer, the Q/K row
//! permutation, Llama 3's `rope_freqs`) and `llama-quantize` (per-tensor type mixing for the
//! `_M` levels and its fallbacks when a row is not a multiple of the block).

use forge_model::{Arch, Llama, ModelConfig, RopeScaling, Tokenizer};
use forge_quant::QuantLevel;
use serde_json::Value as Json;

use crate::format::{TensorData, Value};
use crate::quant::quantize;
use crate::types::GgmlType;
use crate::{GgufError, Result};

/// The GGUF name of a Hugging Face tensor of an `arch` model.
pub fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gemma = arch == Arch::Gemma3;
    let name = match module {
        "input_layernorm" => "attn_norm",
        // Gemma's norm after attention; llama's before the FFN.
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        "self_attn.q_norm" if gemma => "attn_q_norm",
        "self_attn.k_norm" if gemma => "attn_k_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{suffix}"))
}

/// The row permutation llama.cpp's converter applies to llama's Q and K (its RoPE rotates
/// adjacent pairs; Hugging Face's rotates halves): within each head of `hd` rows, HF row
/// `c·hd/2 + i` becomes row `2i + c`. `inverse` undoes it.
pub fn permute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize, inverse: bool) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for c in 0..2 {
            for i in 0..half {
                let hf = h * hd + c * half + i;
                let gg = h * hd + 2 * i + c;
                let (src, dst) = if inverse { (gg, hf) } else { (hf, gg) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// `general.file_type` (llama.cpp's `llama_ftype`).
pub fn file_type(level: QuantLevel) -> u32 {
    match level {
        QuantLevel::F32 => 0,
        QuantLevel::F16 => 1,
        QuantLevel::Q4_0 => 2,
        QuantLevel::Q4_1 => 3,
        QuantLevel::Q8_0 => 7,
        QuantLevel::Q5_0 => 8,
        QuantLevel::Q5_1 => 9,
        QuantLevel::Q4KM => 15,
        QuantLevel::Q5KM => 17,
        QuantLevel::Q6K => 18,
        QuantLevel::Bf16 => 32,
    }
}

/// The type most weight matrices of a level get.
pub fn default_type(level: QuantLevel) -> GgmlType {
    match level {
        QuantLevel::F32 => GgmlType::F32,
        QuantLevel::F16 => GgmlType::F16,
        QuantLevel::Bf16 => GgmlType::BF16,
        QuantLevel::Q8_0 => GgmlType::Q8_0,
        QuantLevel::Q4_0 => GgmlType::Q4_0,
        QuantLevel::Q4_1 => GgmlType::Q4_1,
        QuantLevel::Q5_0 => GgmlType::Q5_0,
        QuantLevel::Q5_1 => GgmlType::Q5_1,
        QuantLevel::Q4KM => GgmlType::Q4K,
        QuantLevel::Q5KM => GgmlType::Q5K,
        QuantLevel::Q6K => GgmlType::Q6K,
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
}

/// When a row (`ne[0]`) is not whole blocks of `ty`: the type llama-quantize falls back to.
fn fallback(ty: GgmlType, row: usize) -> GgmlType {
    if row.is_multiple_of(ty.block()) {
        return ty;
    }
    let next = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        GgmlType::Q2K | GgmlType::Q3K => GgmlType::Q4_0,
        _ => GgmlType::F16,
    };
    if row.is_multiple_of(next.block()) { next } else { GgmlType::F16 }
}

/// The type of one tensor at `level` (llama-quantize's `llama_tensor_get_type` for dense llama
/// and qwen2 models without an importance matrix). `layer` is the block index of `blk.N.*`.
pub fn tensor_type(
    level: QuantLevel,
    name: &str,
    shape: &[usize],
    layer: Option<usize>,
    n_layer: usize,
    tied: bool,
    seventy_b: bool,
) -> GgmlType {
    if shape.len() < 2 || name.ends_with("_norm.weight") || !name.ends_with("weight") {
        return GgmlType::F32;
    }
    let row = *shape.last().expect("2-D");
    let default = default_type(level);
    if matches!(default, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return default;
    }
    let is_output = name == "output.weight" || (tied && name == "token_embd.weight");
    let ty = if is_output {
        if !row.is_multiple_of(default.block()) {
            GgmlType::Q8_0
        } else if default != GgmlType::Q8_0 {
            GgmlType::Q6K
        } else {
            GgmlType::Q8_0
        }
    } else if name.contains("attn_v.weight") {
        let mut t = default;
        if matches!(level, QuantLevel::Q4KM | QuantLevel::Q5KM) && use_more_bits(layer.unwrap_or(0), n_layer) {
            t = GgmlType::Q6K;
        }
        if seventy_b && matches!(t, GgmlType::Q3K | GgmlType::Q4K) {
            t = GgmlType::Q5K;
        }
        t
    } else if name.contains("ffn_down") {
        if matches!(level, QuantLevel::Q4KM | QuantLevel::Q5KM) && use_more_bits(layer.unwrap_or(0), n_layer) {
            GgmlType::Q6K
        } else {
            default
        }
    } else {
        default
    };
    fallback(ty, row)
}

/// The RoPE frequency factors llama.cpp divides each pair's angle by for Llama 3 scaling
/// (`rope_freqs.weight`): the unscaled inverse frequency over the scaled one.
pub fn rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    if !matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { .. })) || cfg.arch != Arch::Llama {
        return None;
    }
    let scaled = forge_model::llama::inv_freq(cfg);
    let base = forge_model::llama::inv_freq(&ModelConfig { rope_scaling: None, ..cfg.clone() });
    Some(base.iter().zip(&scaled).map(|(b, s)| (b / s) as f32).collect())
}

// ---- tokenizer --------------------------------------------------------------------------

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// llama.cpp's name for a byte-level BPE pre-tokenizer, recognised from tokenizer.json.
fn pre_tokenizer(tok: &Json, arch: Arch) -> Result<&'static str> {
    let pre = &tok["pre_tokenizer"];
    let text = pre.to_string();
    let kind = pre["type"].as_str().unwrap_or_default();
    if kind == "ByteLevel" && pre["use_regex"].as_bool().unwrap_or(true) {
        return Ok("gpt-2");
    }
    if text.contains(r"\\p{N}{1,3}") && text.contains("(?i:'s|'t|'re|'ve|'m|'ll|'d)") {
        return Ok("llama-bpe");
    }
    if text.contains(r"\\p{N}|") && text.contains("(?i:'s|'t|'re|'ve|'m|'ll|'d)") {
        return Ok("qwen2");
    }
    if text.contains("\"Digits\"") && text.contains("ByteLevel") {
        return Ok("smollm");
    }
    if arch == Arch::Qwen2 {
        return Ok("qwen2");
    }
    Err(GgufError::Unsupported(format!(
        "a pre-tokenizer llama.cpp would not recognise ({}); forge knows GPT-2, Llama 3, Qwen2 and SmolLM's",
        if kind.is_empty() { "none" } else { kind }
    )))
}

/// The `tokenizer.*` metadata of a model's tokenizer, padded to `vocab` entries.
pub fn tokenizer_metadata(tok: &Tokenizer, arch: Arch, vocab: usize) -> Result<Vec<(String, Value)>> {
    let json: Json = serde_json::from_str(&tok.inner.to_string(false).map_err(|e| GgufError::Invalid(e.to_string()))?)
        .map_err(|e| GgufError::Invalid(e.to_string()))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(GgufError::Unsupported(format!(
            "tokenizer model `{}` (forge writes BPE tokenizers: byte-level as `gpt2`, byte-fallback as `llama`)",
            model["type"].as_str().unwrap_or("?")
        )));
    }
    let spm = model["byte_fallback"].as_bool().unwrap_or(false);
    let mut tokens: Vec<Option<String>> = vec![None; vocab];
    let mut types = vec![UNUSED; vocab];
    let mut scores = vec![-10000.0f32; vocab];
    let mut place = |id: usize, text: &str, ty: i32, score: f32| {
        if id < vocab {
            tokens[id] = Some(text.to_string());
            types[id] = ty;
            scores[id] = score;
        }
    };
    if let Some(v) = model["vocab"].as_object() {
        for (text, id) in v {
            let id = id.as_u64().unwrap_or(u64::MAX) as usize;
            let ty =
                if spm && text.len() == 6 && text.starts_with("<0x") && text.ends_with('>') { BYTE } else { NORMAL };
            // SentencePiece-style BPE: earlier pieces merge first.
            place(id, text, ty, -(id as f32));
        }
    }
    let unk = model["unk_token"].as_str();
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        let id = a["id"].as_u64().unwrap_or(u64::MAX) as usize;
        let text = a["content"].as_str().unwrap_or_default();
        let ty = if Some(text) == unk {
            UNKNOWN
        } else if a["special"].as_bool().unwrap_or(false) {
            CONTROL
        } else {
            USER_DEFINED
        };
        place(id, text, ty, -1000.0);
    }
    let tokens: Vec<String> =
        tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = tokens.iter().find(|t| !seen.insert(t.as_str())) {
            return Err(GgufError::Invalid(format!("the vocabulary has `{dup}` twice, which llama.cpp rejects")));
        }
    }
    let mut md: Vec<(String, Value)> = Vec::new();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    if spm {
        md.push(("tokenizer.ggml.model".into(), "llama".into()));
        md.push(("tokenizer.ggml.pre".into(), "default".into()));
        md.push(("tokenizer.ggml.tokens".into(), strings(tokens)));
        md.push(("tokenizer.ggml.scores".into(), Value::Array(scores.into_iter().map(Value::F32).collect())));
        md.push(("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())));
    } else {
        let merges: Vec<String> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                Json::String(s) => Some(s.clone()),
                Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                _ => None,
            })
            .collect();
        if merges.is_empty() {
            return Err(GgufError::Invalid("the BPE tokenizer has no merges".into()));
        }
        md.push(("tokenizer.ggml.model".into(), "gpt2".into()));
        md.push(("tokenizer.ggml.pre".into(), pre_tokenizer(&json, arch)?.into()));
        md.push(("tokenizer.ggml.tokens".into(), strings(tokens)));
        md.push(("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())));
        md.push(("tokenizer.ggml.merges".into(), strings(merges)));
    }
    let id = |t: &Option<(String, u32)>| t.as_ref().map(|(_, id)| *id).filter(|id| (*id as usize) < vocab);
    if let Some(b) = id(&tok.bos) {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = id(&tok.eos) {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(p) = id(&tok.pad) {
        md.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(p)));
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(tok.add_bos)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    if let Some(t) = &tok.chat_template {
        md.push(("tokenizer.chat_template".into(), t.clone().into()));
    }
    Ok(md)
}

// ---- the model --------------------------------------------------------------------------

/// The block index of `blk.N.*`.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's order: tensors outside blocks first, then by block, then by name.
pub(crate) fn order_key(name: &str) -> (i64, String) {
    (layer_of(name).map(|l| l as i64).unwrap_or(-1), name.to_string())
}

/// The model's hyperparameters as `{arch}.*` metadata.
pub fn model_metadata(cfg: &ModelConfig) -> Vec<(String, Value)> {
    let arch = cfg.arch.gguf_name();
    let k = |s: &str| format!("{arch}.{s}");
    let mut md = vec![
        (k("context_length"), Value::U32(cfg.max_positions as u32)),
        (k("embedding_length"), Value::U32(cfg.hidden as u32)),
        (k("block_count"), Value::U32(cfg.layers as u32)),
        (k("feed_forward_length"), Value::U32(cfg.intermediate as u32)),
        (k("attention.head_count"), Value::U32(cfg.heads as u32)),
        (k("attention.head_count_kv"), Value::U32(cfg.kv_heads as u32)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_eps as f32)),
        (k("vocab_size"), Value::U32(cfg.vocab as u32)),
        (k("rope.dimension_count"), Value::U32(cfg.head_dim as u32)),
    ];
    if cfg.head_dim * cfg.heads != cfg.hidden || cfg.gemma.is_some() {
        md.push((k("attention.key_length"), Value::U32(cfg.head_dim as u32)));
        md.push((k("attention.value_length"), Value::U32(cfg.head_dim as u32)));
    }
    if let Some(g) = &cfg.gemma {
        md.push((k("attention.sliding_window"), Value::U32(g.sliding_window as u32)));
    }
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        md.push((k("rope.scaling.type"), "linear".into()));
        md.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    md
}

/// A GGUF file to write: its metadata, in order, and its tensors.
pub type Converted = (Vec<(String, Value)>, Vec<TensorData>);

/// What a conversion made, per tensor type, for logs and reports.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub tensors: Vec<(String, Vec<usize>, GgmlType)>,
}

/// Writes the `tokenizer.*` metadata of the GGUF file `from` (and its architecture) as a GGUF
/// file of metadata alone: what a model trained on `from` writes back as its tokenizer. The
/// chat template the model was trained with (a manifest's, or Gemma's for a base model without
/// one) replaces the file's, so a runtime prompts the model the way it learned.
pub fn write_tokenizer_file(from: &std::path::Path, to: &std::path::Path, chat_template: Option<&str>) -> Result<()> {
    let g = crate::format::Gguf::open(from)?;
    let mut md: Vec<(String, Value)> = g
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") || k == "general.architecture")
        .filter(|(k, _)| chat_template.is_none() || k != "tokenizer.chat_template")
        .cloned()
        .collect();
    if let Some(t) = chat_template {
        md.push(("tokenizer.chat_template".into(), t.into()));
    }
    write_file(to, &md, &[])
}

/// The `tokenizer.*` metadata of a file [`write_tokenizer_file`] wrote.
pub fn read_tokenizer_file(path: &std::path::Path) -> Result<Vec<(String, Value)>> {
    let g = crate::format::Gguf::open(path)?;
    Ok(g.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect())
}

/// Builds the metadata and tensors of a GGUF model file.
pub fn convert(model: &Llama, tok: &Tokenizer, level: QuantLevel, name: &str) -> Result<Converted> {
    let tok_md = tokenizer_metadata(tok, model.cfg.arch, model.cfg.vocab)?;
    convert_with(model, tok_md, level, name, None)
}

/// What a conversion may take besides the model.
#[derive(Clone, Copy, Default)]
pub struct Extras<'a> {
    /// The tokenizer metadata to write (a GGUF base's own, [`read_tokenizer_file`]) instead of
    /// metadata made from the tokenizer.
    pub tokenizer: Option<&'a [(String, Value)]>,
    /// An importance matrix ([`crate::imatrix::read`]) for the types that use one.
    pub imatrix: Option<&'a std::collections::HashMap<String, Vec<f32>>>,
}

/// [`convert`] with the tokenizer metadata given and an optional importance matrix.
pub fn convert_with(
    model: &Llama,
    tok_md: Vec<(String, Value)>,
    level: QuantLevel,
    name: &str,
    imatrix: Option<&std::collections::HashMap<String, Vec<f32>>>,
) -> Result<Converted> {
    let cfg = &model.cfg;
    let n_tokens =
        tok_md.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").and_then(|(_, v)| v.as_array()).map(|a| a.len());
    if n_tokens.is_some_and(|n| n != cfg.vocab) {
        return Err(GgufError::Invalid(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            n_tokens.unwrap_or(0),
            cfg.vocab
        )));
    }
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), cfg.arch.gguf_name().into()),
        ("general.type".into(), "model".into()),
        ("general.name".into(), name.into()),
        ("general.file_type".into(), Value::U32(file_type(level))),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    md.extend(model_metadata(cfg));
    md.extend(tok_md);
    let seventy_b = cfg.layers == 80 && (cfg.arch == Arch::Qwen2 || cfg.kv_heads != cfg.heads);
    let mut items: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (hf, t) in model.tensors() {
        let g = gguf_name(cfg.arch, &hf).ok_or_else(|| GgufError::Invalid(format!("no GGUF name for `{hf}`")))?;
        let shape = t.dims().to_vec();
        let mut data: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if let Some(n) = crate::load::permuted_heads(cfg, &hf) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            data = permute_rows(&data, shape[0], cols, n, false);
        }
        items.push((g, shape, data));
    }
    if let Some(f) = rope_factors(cfg) {
        items.push(("rope_freqs.weight".into(), vec![f.len()], f));
    }
    items.sort_by_cached_key(|a| order_key(&a.0));
    let tied = !items.iter().any(|(n, _, _)| n == "output.weight");
    let mut tensors = Vec::with_capacity(items.len());
    for (name, shape, data) in items {
        let ty = tensor_type(level, &name, &shape, layer_of(&name), cfg.layers, tied, seventy_b);
        let cols = *shape.last().unwrap_or(&1);
        let bytes = match imatrix.and_then(|m| m.get(&name)) {
            Some(w) if crate::quant::uses_imatrix(ty) => {
                if w.len() != cols {
                    return Err(GgufError::Invalid(format!(
                        "the importance matrix has {} columns for `{name}`, which has {cols}",
                        w.len()
                    )));
                }
                crate::quant::quantize_weighted(ty, &data, cols, w)?
            }
            _ => quantize(ty, &data)?,
        };
        tensors.push(TensorData { name, shape, ty, data: bytes });
    }
    Ok((md, tensors))
}

/// Converts and writes a model file atomically.
pub fn write_model(
    path: &std::path::Path,
    model: &Llama,
    tok: &Tokenizer,
    level: QuantLevel,
    name: &str,
    extras: Extras<'_>,
) -> Result<Summary> {
    let tok_md = match extras.tokenizer {
        Some(md) => md.to_vec(),
        None => tokenizer_metadata(tok, model.cfg.arch, model.cfg.vocab)?,
    };
    let (md, tensors) = convert_with(model, tok_md, level, name, extras.imatrix)?;
    let summary = Summary { tensors: tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.ty)).collect() };
    write_file(path, &md, &tensors)?;
    Ok(summary)
}

/// Writes a GGUF file through a temporary file renamed into place.
pub fn write_file(path: &std::path::Path, md: &[(String, Value)], tensors: &[TensorData]) -> Result<()> {
    let tmp = path.with_extension("gguf.tmp");
    {
        let f = std::fs::File::create(&tmp).map_err(|e| GgufError::Io(format!("{}: {e}", tmp.display())))?;
        let mut w = std::io::BufWriter::new(f);
        crate::format::write(&mut w, md, tensors)?;
        use std::io::Write;
        w.flush()?;
    }
    std::fs::rename(&tmp, path).map_err(|e| GgufError::Io(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_permutation() {
        let llama = |hf| gguf_name(Arch::Llama, hf);
        assert_eq!(llama("model.layers.3.self_attn.q_proj.weight").unwrap(), "blk.3.attn_q.weight");
        assert_eq!(llama("model.layers.0.self_attn.k_proj.bias").unwrap(), "blk.0.attn_k.bias");
        assert_eq!(llama("model.layers.11.mlp.down_proj.weight").unwrap(), "blk.11.ffn_down.weight");
        assert_eq!(llama("model.layers.1.post_attention_layernorm.weight").unwrap(), "blk.1.ffn_norm.weight");
        assert_eq!(llama("lm_head.weight").unwrap(), "output.weight");
        assert!(llama("model.layers.1.mlp.experts.weight").is_none());
        assert!(llama("model.layers.1.self_attn.q_norm.weight").is_none());
        let gemma = |hf| gguf_name(Arch::Gemma3, hf).unwrap();
        assert_eq!(gemma("model.layers.2.post_attention_layernorm.weight"), "blk.2.post_attention_norm.weight");
        assert_eq!(gemma("model.layers.2.pre_feedforward_layernorm.weight"), "blk.2.ffn_norm.weight");
        assert_eq!(gemma("model.layers.2.post_feedforward_layernorm.weight"), "blk.2.post_ffw_norm.weight");
        assert_eq!(gemma("model.layers.2.self_attn.k_norm.weight"), "blk.2.attn_k_norm.weight");
        // One head of 4 rows: HF rows [a0 a1 b0 b1] (halves) → GGUF [a0 b0 a1 b1] (pairs).
        let w = vec![0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0];
        let p = permute_rows(&w, 8, 1, 2, false);
        assert_eq!(p, vec![0.0, 2.0, 1.0, 3.0, 10.0, 12.0, 11.0, 13.0]);
        assert_eq!(permute_rows(&p, 8, 1, 2, true), w);
    }

    #[test]
    fn type_mixing_follows_llama_quantize() {
        let umb: Vec<usize> = (0..16).filter(|i| use_more_bits(*i, 16)).collect();
        assert_eq!(umb, vec![0, 1, 4, 7, 10, 13, 14, 15]);
        let t =
            |level, name: &str, shape: &[usize], tied| tensor_type(level, name, shape, layer_of(name), 16, tied, false);
        let m = QuantLevel::Q4KM;
        assert_eq!(t(m, "blk.0.attn_norm.weight", &[512], false), GgmlType::F32);
        assert_eq!(t(m, "blk.0.attn_q.bias", &[512], false), GgmlType::F32);
        assert_eq!(t(m, "output.weight", &[4096, 512], false), GgmlType::Q6K);
        assert_eq!(t(m, "token_embd.weight", &[4096, 512], false), GgmlType::Q4K);
        assert_eq!(t(m, "token_embd.weight", &[4096, 512], true), GgmlType::Q6K);
        assert_eq!(t(m, "blk.4.attn_v.weight", &[512, 512], false), GgmlType::Q6K);
        assert_eq!(t(m, "blk.5.attn_v.weight", &[512, 512], false), GgmlType::Q4K);
        assert_eq!(t(m, "blk.7.ffn_down.weight", &[512, 1536], false), GgmlType::Q6K);
        assert_eq!(t(m, "blk.8.ffn_down.weight", &[512, 1536], false), GgmlType::Q4K);
        assert_eq!(t(QuantLevel::Q5KM, "blk.8.ffn_up.weight", &[1536, 512], false), GgmlType::Q5K);
        // Rows that are not whole 256-blocks fall back.
        assert_eq!(t(m, "blk.8.attn_q.weight", &[96, 96], false), GgmlType::Q5_0);
        assert_eq!(t(QuantLevel::Q5KM, "blk.8.attn_q.weight", &[96, 96], false), GgmlType::Q5_1);
        assert_eq!(t(m, "blk.4.attn_v.weight", &[96, 96], false), GgmlType::Q8_0);
        assert_eq!(t(m, "blk.8.attn_q.weight", &[40, 40], false), GgmlType::F16);
        assert_eq!(t(m, "output.weight", &[128, 96], false), GgmlType::Q8_0);
        assert_eq!(t(QuantLevel::Q4_0, "output.weight", &[4096, 512], false), GgmlType::Q6K);
        assert_eq!(t(QuantLevel::Q4_0, "blk.1.ffn_up.weight", &[1536, 512], false), GgmlType::Q4_0);
        assert_eq!(t(QuantLevel::Q8_0, "output.weight", &[4096, 512], false), GgmlType::Q8_0);
        assert_eq!(t(QuantLevel::F16, "output.weight", &[4096, 512], false), GgmlType::F16);
    }
}
