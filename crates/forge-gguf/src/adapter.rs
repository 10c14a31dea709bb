//! LoRA adapters as GGUF, for llama.cpp's `llama_adapter_lora_init`: a game loads one shared base
//! and hot-swaps a small adapter per NPC.
//!
//! `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32), and per
//! adapted weight `W` (GGUF name `N`) the pair `N.lora_a` = PEFT's A `[r, in]` and `N.lora_b` =
//! PEFT's B `[out, r]`, with llama's Q/K row permutation applied to B's rows (the base weight's
//! rows are permuted the same way). llama.cpp scales by `alpha / r`, `r` read from `lora_b`; an
//! rsLoRA adapter (`alpha / √r`) is written with `alpha·√r` so the product comes out the same.

use std::path::Path;

use forge_model::ModelConfig;
use forge_model::lora::{LoraSpec, peft_key};

use crate::convert::{gguf_name, permute_rows, write_file};
use crate::format::{TensorData, Value};
use crate::load::permuted_heads;
use crate::quant::quantize;
use crate::types::GgmlType;
use crate::{GgufError, Result};

/// The alpha llama.cpp must see to scale by the adapter's own factor.
pub fn effective_alpha(spec: &LoraSpec) -> f32 {
    if spec.rslora { (spec.alpha * (spec.rank as f64).sqrt()) as f32 } else { spec.alpha as f32 }
}

/// Builds the GGUF of a PEFT adapter for a base with config `cfg`.
pub fn convert(
    cfg: &ModelConfig,
    spec: &LoraSpec,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    name: &str,
) -> Result<crate::convert::Converted> {
    let md = vec![
        ("general.architecture".to_string(), Value::from(cfg.arch.gguf_name())),
        ("general.type".to_string(), "adapter".into()),
        ("general.name".to_string(), name.into()),
        ("adapter.type".to_string(), "lora".into()),
        ("adapter.lora.alpha".to_string(), Value::F32(effective_alpha(spec))),
    ];
    let mut out = Vec::new();
    for l in 0..cfg.layers {
        for m in &spec.targets {
            let base = format!("{}.weight", forge_model::llama::module_path(l, m));
            let gname =
                gguf_name(cfg.arch, &base).ok_or_else(|| GgufError::Invalid(format!("no GGUF name for `{base}`")))?;
            let get = |half: char| {
                let k = peft_key(l, m, half);
                tensors.get(&k).ok_or_else(|| GgufError::Invalid(format!("the adapter has no `{k}`")))
            };
            let (a, b) = (get('A')?, get('B')?);
            let a_shape = a.dims().to_vec();
            let b_shape = b.dims().to_vec();
            let a_data: Vec<f32> = a.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            let mut b_data: Vec<f32> = b.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            if let Some(n) = permuted_heads(cfg, &base) {
                b_data = permute_rows(&b_data, b_shape[0], b_shape[1], n, false);
            }
            out.push(TensorData {
                name: format!("{gname}.lora_a"),
                shape: a_shape,
                ty: GgmlType::F32,
                data: quantize(GgmlType::F32, &a_data)?,
            });
            out.push(TensorData {
                name: format!("{gname}.lora_b"),
                shape: b_shape,
                ty: GgmlType::F32,
                data: quantize(GgmlType::F32, &b_data)?,
            });
        }
    }
    Ok((md, out))
}

/// Converts a PEFT adapter directory for a base with config `cfg` and writes it to `path`.
pub fn write_adapter(path: &Path, cfg: &ModelConfig, adapter_dir: &Path, name: &str) -> Result<usize> {
    let (spec, tensors) = forge_model::lora::load_peft(adapter_dir)?;
    let (md, tensors) = convert(cfg, &spec, &tensors, name)?;
    write_file(path, &md, &tensors)?;
    Ok(tensors.len())
}
