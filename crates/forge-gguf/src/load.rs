//! A GGUF model back into forge's decoder: metadata → config, tensors dequantized and renamed to
//! Hugging Face names, llama's Q/K rows permuted back. Used to train on a GGUF base (llama,
//! qwen2, gemma3 — e.g. SmolLM2 or Gemma 3 as llama.cpp's tools ship them), to check what a file
//! computes against the weights it was made from, and to read GGUF files as inputs.
//!
//! Nothing in the file is trusted: the config must be consistent (heads divide, dimensions are
//! non-zero and bounded by what the tensors hold), every tensor must be present with the shape
//! the config implies before anything is dequantized, and unexpected tensors are errors.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use forge_model::{Arch, GemmaConfig, Llama, ModelConfig, RopeScaling};

use crate::convert::{gguf_name, permute_rows};
use crate::format::Gguf;
use crate::quant::dequantize;
use crate::{GgufError, Result};

fn invalid(msg: impl Into<String>) -> GgufError {
    GgufError::Invalid(msg.into())
}

fn meta_u64(g: &Gguf, key: &str) -> Result<u64> {
    g.get(key).and_then(|v| v.as_u64()).ok_or_else(|| invalid(format!("missing or non-integer `{key}`")))
}

fn meta_f64(g: &Gguf, key: &str) -> Option<f64> {
    g.get(key).and_then(|v| v.as_f64())
}

/// The model's architecture as a file names it.
pub fn architecture(g: &Gguf) -> Result<Arch> {
    let name = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| invalid("missing `general.architecture`"))?;
    match name {
        "llama" => Ok(Arch::Llama),
        "qwen2" => Ok(Arch::Qwen2),
        "gemma3" => Ok(Arch::Gemma3),
        other => Err(GgufError::Unsupported(format!("architecture `{other}` (forge reads llama, qwen2 and gemma3)"))),
    }
}

/// The largest dimension forge believes: far above any real model's, far below an overflow.
const MAX_DIM: u64 = 1 << 24;

/// The architecture and config a GGUF file describes, checked for consistency.
pub fn config(g: &Gguf) -> Result<ModelConfig> {
    let arch = architecture(g)?;
    let a = arch.gguf_name();
    let k = |s: &str| format!("{a}.{s}");
    let dim = |key: &str| -> Result<usize> {
        let v = meta_u64(g, key)?;
        if v == 0 || v > MAX_DIM {
            return Err(invalid(format!("`{key}` = {v} is not a plausible dimension")));
        }
        Ok(v as usize)
    };
    let opt_dim =
        |key: &str| -> Result<Option<usize>> { if g.get(key).is_some() { dim(key).map(Some) } else { Ok(None) } };
    let hidden = dim(&k("embedding_length"))?;
    let heads = dim(&k("attention.head_count"))?;
    let kv_heads = opt_dim(&k("attention.head_count_kv"))?.unwrap_or(heads);
    if heads % kv_heads != 0 {
        return Err(invalid(format!("{heads} attention heads are not a multiple of {kv_heads} key/value heads")));
    }
    let head_dim = match opt_dim(&k("attention.key_length"))? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => return Err(invalid(format!("embedding length {hidden} is not a multiple of {heads} heads"))),
    };
    if head_dim % 2 != 0 {
        return Err(invalid(format!("head dimension {head_dim} is odd; RoPE rotates pairs")));
    }
    let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len());
    let vocab = match opt_dim(&k("vocab_size"))? {
        Some(v) => v,
        None => tokens.filter(|n| *n > 0).ok_or_else(|| invalid("no vocabulary size and no tokenizer tokens"))?,
    };
    // Each layer has at least its seven projections: a block count the tensors cannot back is
    // a corrupt file (and must not size an allocation).
    let layers = meta_u64(g, &k("block_count"))?;
    if layers == 0 || layers > (g.tensors.len() / 7) as u64 {
        return Err(invalid(format!("`{a}.block_count` = {layers} but the file has {} tensors", g.tensors.len())));
    }
    let layers = layers as usize;
    let rms_default = if arch == Arch::Gemma3 { 1e-6 } else { 1e-5 };
    let rope_default = if arch == Arch::Gemma3 { 1_000_000.0 } else { 10_000.0 };
    let id = |key: &str| g.get(key).and_then(|v| v.as_u64()).filter(|v| (*v as usize) < vocab).map(|v| v as u32);
    let mut cfg = ModelConfig {
        arch,
        hidden,
        intermediate: dim(&k("feed_forward_length"))?,
        layers,
        heads,
        kv_heads,
        head_dim,
        vocab,
        rms_eps: meta_f64(g, &k("attention.layer_norm_rms_epsilon")).unwrap_or(rms_default),
        rope_theta: meta_f64(g, &k("rope.freq_base")).unwrap_or(rope_default),
        rope_scaling: None,
        max_positions: dim(&k("context_length"))?,
        tie_embeddings: g.tensor("output.weight").is_none(),
        qkv_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad: id("tokenizer.ggml.padding_token_id"),
        gemma: None,
    };
    if let (Some(ty), Some(factor)) =
        (g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()), meta_f64(g, &k("rope.scaling.factor")))
    {
        match ty {
            "linear" => cfg.rope_scaling = Some(RopeScaling::Linear { factor }),
            "none" => {}
            other => return Err(GgufError::Unsupported(format!("rope scaling `{other}`"))),
        }
    }
    if arch == Arch::Gemma3 {
        // llama.cpp's gemma3: every 6th layer global, base 10000 in the sliding ones, queries
        // scaled by 1/√head_dim (by 1/√(hidden/heads) in the 27B model, 62 layers).
        let pre_attn = if layers == 62 { (hidden / heads) as f64 } else { head_dim as f64 };
        cfg.gemma = Some(GemmaConfig {
            sliding_window: opt_dim(&k("attention.sliding_window"))?.unwrap_or(4096),
            sliding_pattern: opt_dim(&k("attention.sliding_window_pattern"))?.unwrap_or(6),
            rope_local_theta: meta_f64(g, &k("rope.freq_base_swa")).unwrap_or(10_000.0),
            query_pre_attn_scalar: pre_attn,
        });
    }
    Ok(cfg)
}

/// Heads whose rows llama.cpp's converter interleaves: q (query heads) and k (key/value heads).
pub fn permuted_heads(cfg: &ModelConfig, hf_name: &str) -> Option<usize> {
    if cfg.arch != Arch::Llama {
        return None;
    }
    if hf_name.contains("self_attn.q_proj.") {
        Some(cfg.heads)
    } else if hf_name.contains("self_attn.k_proj.") {
        Some(cfg.kv_heads)
    } else {
        None
    }
}

/// Every Hugging Face tensor name of a model with this config, with its shape.
pub fn hf_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, hd) = (cfg.hidden, cfg.intermediate, cfg.head_dim);
    let (q, kv) = (cfg.heads * hd, cfg.kv_heads * hd);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab, h])];
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab, h]));
    }
    for l in 0..cfg.layers {
        for (field, name) in forge_model::llama::norm_names(cfg.arch, l) {
            out.push((name, vec![if field.ends_with("_norm") { hd } else { h }]));
        }
        for (m, shape) in [
            ("q_proj", [q, h]),
            ("k_proj", [kv, h]),
            ("v_proj", [kv, h]),
            ("o_proj", [h, q]),
            ("gate_proj", [i, h]),
            ("up_proj", [i, h]),
            ("down_proj", [h, i]),
        ] {
            let p = forge_model::llama::module_path(l, m);
            out.push((format!("{p}.weight"), shape.to_vec()));
            if cfg.qkv_bias && matches!(m, "q_proj" | "k_proj" | "v_proj") {
                out.push((format!("{p}.bias"), vec![shape[0]]));
            }
        }
    }
    out
}

/// Every Hugging Face tensor name of a model with this config.
pub fn hf_names(cfg: &ModelConfig) -> Vec<String> {
    hf_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

/// Loads a GGUF llama/qwen2/gemma3 model into forge's decoder, every tensor dequantized to f32
/// (or to `dtype`). A `rope_freqs` tensor (Llama 3 scaling) is applied through the config it was
/// derived from, which the caller must give: the file does not say.
pub fn model_as(
    g: &Gguf,
    r: &mut (impl Read + Seek),
    rope_scaling: Option<RopeScaling>,
    dtype: DType,
) -> Result<Llama> {
    let mut cfg = config(g)?;
    if g.tensor("rope_freqs.weight").is_some() {
        match rope_scaling {
            Some(s) => cfg.rope_scaling = Some(s),
            None => {
                return Err(GgufError::Unsupported(
                    "a `rope_freqs` tensor (Llama 3.1+ RoPE scaling, whose parameters the file does not hold)".into(),
                ));
            }
        }
    }
    let mut expected: HashMap<String, (String, Vec<usize>)> = HashMap::new();
    for (hf, shape) in hf_shapes(&cfg) {
        let gname = gguf_name(cfg.arch, &hf).expect("every forge tensor has a GGUF name");
        expected.insert(gname, (hf, shape));
    }
    // Check every descriptor before reading any data.
    for info in &g.tensors {
        if info.name == "rope_freqs.weight" {
            continue;
        }
        let (hf, shape) =
            expected.get(&info.name).ok_or_else(|| invalid(format!("unexpected tensor `{}`", info.name)))?;
        if &info.shape != shape {
            return Err(invalid(format!(
                "tensor `{}` has shape {:?}, but the config implies {:?} (`{hf}`)",
                info.name, info.shape, shape
            )));
        }
    }
    let present: std::collections::HashSet<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(missing) = expected.keys().filter(|n| !present.contains(n.as_str())).min() {
        return Err(invalid(format!("the file has no tensor `{missing}`")));
    }
    let mut tensors = HashMap::new();
    for info in &g.tensors {
        let Some((hf, _)) = expected.get(&info.name) else { continue };
        let mut v = dequantize(info.ty, &g.tensor_bytes(r, info)?, info.elements())
            .map_err(|e| invalid(format!("tensor `{}`: {e}", info.name)))?;
        if let Some(n) = permuted_heads(&cfg, hf) {
            let cols = if info.shape.len() == 2 { info.shape[1] } else { 1 };
            v = permute_rows(&v, info.shape[0], cols, n, true);
        }
        let t = Tensor::from_vec(v, info.shape.as_slice(), &Device::Cpu)?;
        tensors.insert(hf.clone(), if dtype == DType::F32 { t } else { t.to_dtype(dtype)? });
    }
    Ok(Llama::from_tensors_as(cfg, tensors, &Device::Cpu, dtype)?)
}

/// [`model_as`] in f32.
pub fn model(g: &Gguf, r: &mut (impl Read + Seek), rope_scaling: Option<RopeScaling>) -> Result<Llama> {
    model_as(g, r, rope_scaling, DType::F32)
}

/// Opens and loads a GGUF model file; errors name the file.
pub fn open_model(path: &Path, rope_scaling: Option<RopeScaling>) -> Result<Llama> {
    let named = |e: GgufError| e.in_file(path);
    let mut f = open(path)?;
    let g = crate::format::read(&mut f).map_err(named)?;
    model(&g, &mut f, rope_scaling).map_err(named)
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>> {
    Ok(std::io::BufReader::with_capacity(1 << 16, crate::format::open_file(path)?))
}

/// A GGUF model and its tokenizer, as a training base.
pub fn open_base(path: &Path) -> Result<(Llama, forge_model::Tokenizer)> {
    let named = |e: GgufError| e.in_file(path);
    let mut f = open(path)?;
    let g = crate::format::read(&mut f).map_err(named)?;
    let tok = crate::tokenizer::tokenizer(&g).map_err(named)?;
    let model = model(&g, &mut f, None).map_err(named)?;
    Ok((model, tok))
}
