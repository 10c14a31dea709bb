//! Hugging Face model folders: `config.json`, `*.safetensors` (one file or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::{Arch, ModelConfig};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

/// Reads every tensor of one safetensors file, converted to f32.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(ModelError::MissingFile(path.to_path_buf()));
    }
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| ModelError::Config(format!("{}: not a readable safetensors file: {e}", path.display())))?;
    tensors.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?))).collect()
}

/// Writes tensors as safetensors with `{"format": "pt"}` metadata (transformers insists on it),
/// atomically (a temporary file renamed into place).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let contiguous: Vec<(String, Tensor)> =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.detach().contiguous()?))).collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(contiguous.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), &tmp)
        .map_err(|e| ModelError::Config(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// The weight files of a model folder: `model.safetensors`, or the shards its index lists.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config(format!("{}: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Config(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(Value::as_str).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if dir.join("pytorch_model.bin").exists() {
        return Err(ModelError::Unsupported(format!(
            "{}: pytorch_model.bin (convert the checkpoint to safetensors)",
            dir.display()
        )));
    }
    Err(ModelError::MissingFile(single))
}

/// Reads `config.json` of a model folder.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ModelError::MissingFile(path));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    ModelConfig::from_hf(&v).map_err(|e| match e {
        ModelError::Config(m) => ModelError::Config(format!("{}: {m}", path.display())),
        ModelError::Unsupported(m) => ModelError::Unsupported(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// A model folder's weights, by Hugging Face name.
pub fn read_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in weight_files(dir)? {
        all.extend(read_safetensors(&f, device)?);
    }
    Ok(all)
}

/// Gemma's norm weights are stored as `w` and multiply by `1 + w` (transformers'
/// `Gemma3RMSNorm`); forge holds the multiplier itself, as llama.cpp does. The offset to add
/// when reading a Hugging Face tensor (and subtract when writing one).
fn norm_offset(cfg: &ModelConfig, name: &str) -> f64 {
    if cfg.arch == Arch::Gemma3 && name.ends_with("norm.weight") { 1.0 } else { 0.0 }
}

/// Loads a Hugging Face llama/qwen2/gemma3 folder: the model and its tokenizer.
pub fn load_hf(dir: &Path, device: &Device) -> Result<(Llama, Tokenizer)> {
    let model = read_model(dir, device)?;
    Ok((model, Tokenizer::load(dir)?))
}

/// Loads the model of a Hugging Face folder (no tokenizer needed).
pub fn read_model(dir: &Path, device: &Device) -> Result<Llama> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile(dir.to_path_buf()));
    }
    let cfg = read_config(dir)?;
    let mut weights = read_weights(dir, device)?;
    for (name, t) in weights.iter_mut() {
        let offset = norm_offset(&cfg, name);
        if offset != 0.0 {
            *t = t.affine(1.0, offset)?;
        }
    }
    Llama::from_tensors(cfg, weights, device)
}

/// Writes a Hugging Face folder transformers loads: `config.json`, `generation_config.json`,
/// `model.safetensors` and the tokenizer files.
pub fn save_hf(dir: &Path, model: &Llama, tokenizer: &Tokenizer) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(v).expect("serializes") + "\n")
            .map_err(|e| ModelError::io(&path, e))
    };
    write_json("config.json", &model.cfg.to_hf())?;
    let mut generation = serde_json::json!({ "_from_model_config": true });
    if let Some(b) = model.cfg.bos {
        generation["bos_token_id"] = b.into();
    }
    if !model.cfg.eos.is_empty() {
        generation["eos_token_id"] = model.cfg.eos.clone().into();
    }
    write_json("generation_config.json", &generation)?;
    let tensors = model
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let offset = norm_offset(&model.cfg, &name);
            let t = if offset != 0.0 { t.affine(1.0, -offset)? } else { t };
            Ok((name, t))
        })
        .collect::<Result<Vec<_>>>()?;
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    tokenizer.save(dir)
}
