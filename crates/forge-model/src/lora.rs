//! LoRA (Hu et al. 2021) as Hugging Face PEFT stores it, so PEFT loads forge's adapters.
//!
//! A adapted linear layer computes `x Wᵀ + s · dropout(x) Aᵀ Bᵀ` with `A` `[r, in]` initialised
//! like PEFT (`kaiming_uniform_(a=√5)`, i.e. U(±1/√in)), `B` `[out, r]` zero, and
//! `s = alpha / r` (or `alpha / √r` with rsLoRA, Kalajdzievski 2023). In the safetensors file the
//! pair is `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, beside an
//! `adapter_config.json` (`peft_type: LORA`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::io::{read_safetensors, write_safetensors};
use crate::llama::{Llama, module_path};
use crate::{ModelError, Result};

/// One adapted layer's low-rank pair.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
}

/// What an adapter adapts and how strongly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names (`q_proj`, `v_proj`, ...).
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// PEFT's `adapter_config.json`.
    pub fn peft_config(&self, base_model: &str) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "use_dora": false,
            "revision": null,
        })
    }

    pub fn from_peft_config(v: &Value) -> Result<LoraSpec> {
        let bad = |m: &str| ModelError::Config(format!("adapter_config.json: {m}"));
        if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
            return Err(bad("peft_type is not LORA"));
        }
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(ModelError::Unsupported("DoRA adapters".into()));
        }
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => return Err(bad("no target_modules")),
        };
        Ok(LoraSpec {
            rank: v.get("r").and_then(Value::as_u64).ok_or_else(|| bad("no r"))? as usize,
            alpha: v.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| bad("no lora_alpha"))?,
            dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            targets,
        })
    }
}

/// The PEFT key of one half of a pair.
pub fn peft_key(layer: usize, module: &str, half: char) -> String {
    format!("base_model.model.{}.lora_{half}.weight", module_path(layer, module))
}

/// Adds fresh, trainable LoRA pairs to the target modules of every layer; returns the variables
/// by PEFT key, in a stable order.
pub fn attach(model: &mut Llama, spec: &LoraSpec, seed: u64) -> Result<Vec<(String, Var)>> {
    let device = model.device().clone();
    let model_dtype = model.dtype();
    let mut rng = forge_rng::SplitMix64::new(seed);
    let mut vars = Vec::new();
    for (l, block) in model.layers.iter_mut().enumerate() {
        for (m, lin) in block.linears_mut() {
            if !spec.targets.iter().any(|t| t == m) {
                continue;
            }
            let (out_f, in_f) = lin.weight.dims2()?;
            let bound = 1.0 / (in_f as f64).sqrt();
            let a: Vec<f32> = (0..spec.rank * in_f).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, in_f), &device)?.to_dtype(model_dtype)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out_f, spec.rank), model_dtype, &device)?)?;
            lin.lora = Some(LoraPair {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: spec.scale(),
                dropout: spec.dropout as f32,
            });
            vars.push((peft_key(l, m, 'A'), a));
            vars.push((peft_key(l, m, 'B'), b));
        }
    }
    if vars.is_empty() {
        return Err(ModelError::Config(format!("no module of the model matches target modules {:?}", spec.targets)));
    }
    Ok(vars)
}

/// Installs LoRA pairs from PEFT-named tensors (e.g. a loaded adapter or a checkpoint).
pub fn install(model: &mut Llama, spec: &LoraSpec, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut used = 0;
    for (l, block) in model.layers.iter_mut().enumerate() {
        for (m, lin) in block.linears_mut() {
            if !spec.targets.iter().any(|t| t == m) {
                continue;
            }
            let get = |half| {
                let k = peft_key(l, m, half);
                tensors.get(&k).cloned().ok_or(ModelError::MissingTensor(k))
            };
            let (a, b) = (get('A')?, get('B')?);
            let (out_f, in_f) = lin.weight.dims2()?;
            for (name, t, want) in [("lora_A", &a, [spec.rank, in_f]), ("lora_B", &b, [out_f, spec.rank])] {
                if t.dims() != want {
                    return Err(ModelError::Shape {
                        name: format!("{}.{name}", module_path(l, m)),
                        expected: want.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
            }
            lin.lora = Some(LoraPair { a, b, scale: spec.scale(), dropout: spec.dropout as f32 });
            used += 2;
        }
    }
    if used != tensors.len() {
        let extra =
            tensors.keys().find(|k| !k.contains(".lora_")).or(tensors.keys().next()).cloned().unwrap_or_default();
        return Err(ModelError::UnexpectedTensor(extra));
    }
    Ok(())
}

/// Writes the adapter in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`.
pub fn save_peft(dir: &Path, spec: &LoraSpec, base_model: &str, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config = serde_json::to_string_pretty(&spec.peft_config(base_model)).expect("serializes") + "\n";
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, config).map_err(|e| ModelError::io(&path, e))?;
    write_safetensors(&dir.join("adapter_model.safetensors"), tensors)
}

/// Reads a PEFT adapter directory.
pub fn load_peft(dir: &Path) -> Result<(LoraSpec, HashMap<String, Tensor>)> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    let spec = LoraSpec::from_peft_config(&v)?;
    let tensors = read_safetensors(&dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu)?;
    Ok((spec, tensors))
}

/// Folds every LoRA pair into its weight: `W ← W + s · B A`. The result has no adapters.
pub fn merge(model: &Llama) -> Result<Llama> {
    let mut merged = model.clone();
    for block in merged.layers.iter_mut() {
        for (_, lin) in block.linears_mut() {
            if let Some(l) = lin.lora.take() {
                let delta = l.b.matmul(&l.a)?.affine(l.scale, 0.0)?;
                lin.weight = (lin.weight.detach() + delta.detach())?;
            }
        }
    }
    Ok(merged)
}
