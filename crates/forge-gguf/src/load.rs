//! A GGUF model back into forge's f32 decoder: metadata → config, tensors dequantized and
//! renamed to Hugging Face names, llama's Q/K rows permuted back. Used to check what a file
//! computes against the weights it was made from, and to read GGUF files as inputs.

use std::collections::HashMap;
use std::io::{Read, Seek};

use candle_core::{Device, Tensor};
use forge_model::{Arch, Llama, ModelConfig, RopeScaling};

use crate::convert::{gguf_name, permute_rows};
use crate::format::Gguf;
use crate::quant::dequantize;
use crate::{GgufError, Result};

fn meta_u64(g: &Gguf, key: &str) -> Result<u64> {
    g.get(key).and_then(|v| v.as_u64()).ok_or_else(|| GgufError::Invalid(format!("missing or non-integer `{key}`")))
}

fn meta_f64(g: &Gguf, key: &str) -> Option<f64> {
    g.get(key).and_then(|v| v.as_f64())
}

/// The architecture and config a GGUF file describes.
pub fn config(g: &Gguf) -> Result<ModelConfig> {
    let arch_name = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| GgufError::Invalid("missing `general.architecture`".into()))?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => return Err(GgufError::Unsupported(format!("architecture `{other}` (forge reads llama and qwen2)"))),
    };
    let k = |s: &str| format!("{arch_name}.{s}");
    let hidden = meta_u64(g, &k("embedding_length"))? as usize;
    let heads = meta_u64(g, &k("attention.head_count"))? as usize;
    let kv_heads = g.get(&k("attention.head_count_kv")).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(heads);
    let head_dim =
        g.get(&k("attention.key_length")).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(hidden / heads.max(1));
    let vocab = match g.get(&k("vocab_size")).and_then(|v| v.as_u64()) {
        Some(v) => v as usize,
        None => g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len()).unwrap_or(0),
    };
    let rope_theta = meta_f64(g, &k("rope.freq_base")).unwrap_or(10_000.0);
    let tie = g.tensor("output.weight").is_none();
    let eos = g.get("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()).map(|v| vec![v as u32]).unwrap_or_default();
    let mut cfg = ModelConfig {
        arch,
        hidden,
        intermediate: meta_u64(g, &k("feed_forward_length"))? as usize,
        layers: meta_u64(g, &k("block_count"))? as usize,
        heads,
        kv_heads,
        head_dim,
        vocab,
        rms_eps: meta_f64(g, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta,
        rope_scaling: None,
        max_positions: meta_u64(g, &k("context_length"))? as usize,
        tie_embeddings: tie,
        qkv_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        bos: g.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
        eos,
        pad: g.get("tokenizer.ggml.padding_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
    };
    if let (Some(ty), Some(factor)) =
        (g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()), meta_f64(g, &k("rope.scaling.factor")))
    {
        if ty == "linear" {
            cfg.rope_scaling = Some(RopeScaling::Linear { factor });
        }
    }
    Ok(cfg)
}

/// Loads a GGUF llama/qwen2 model into forge's decoder, dequantized to f32. A `rope_freqs`
/// tensor (Llama 3 scaling) is applied through the config it was derived from when given.
pub fn model(g: &Gguf, r: &mut (impl Read + Seek), rope_scaling: Option<RopeScaling>) -> Result<Llama> {
    let mut cfg = config(g)?;
    if rope_scaling.is_some() {
        cfg.rope_scaling = rope_scaling;
    }
    let mut tensors = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for hf in hf_names(&cfg) {
        names.insert(gguf_name(&hf).expect("known names map"), hf);
    }
    for info in &g.tensors {
        if info.name == "rope_freqs.weight" {
            continue;
        }
        let hf =
            names.get(&info.name).ok_or_else(|| GgufError::Invalid(format!("unexpected tensor `{}`", info.name)))?;
        let mut v = dequantize(info.ty, &g.tensor_bytes(r, info)?, info.elements())?;
        if cfg.arch == Arch::Llama {
            if let Some(n) = permuted_heads(&cfg, hf) {
                let cols = if info.shape.len() == 2 { info.shape[1] } else { 1 };
                v = permute_rows(&v, info.shape[0], cols, n, true);
            }
        }
        tensors.insert(hf.clone(), Tensor::from_vec(v, info.shape.as_slice(), &Device::Cpu)?);
    }
    Ok(Llama::from_tensors(cfg, tensors, &Device::Cpu)?)
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

/// Every Hugging Face tensor name of a model with this config.
pub fn hf_names(cfg: &ModelConfig) -> Vec<String> {
    let mut out = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    if !cfg.tie_embeddings {
        out.push("lm_head.weight".to_string());
    }
    for l in 0..cfg.layers {
        out.push(format!("model.layers.{l}.input_layernorm.weight"));
        out.push(format!("model.layers.{l}.post_attention_layernorm.weight"));
        for m in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] {
            let p = forge_model::llama::module_path(l, m);
            out.push(format!("{p}.weight"));
            if cfg.qkv_bias && matches!(m, "q_proj" | "k_proj" | "v_proj") {
                out.push(format!("{p}.bias"));
            }
        }
    }
    out
}

/// Opens and loads a GGUF model file.
pub fn open_model(path: &std::path::Path, rope_scaling: Option<RopeScaling>) -> Result<Llama> {
    let mut f = std::fs::File::open(path).map_err(|e| GgufError::Io(format!("{}: {e}", path.display())))?;
    let g = crate::format::read(&mut f)?;
    model(&g, &mut f, rope_scaling)
}
