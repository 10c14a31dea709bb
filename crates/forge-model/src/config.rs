//! The architecture of a llama-family model, read from and written to Hugging Face's
//! `config.json` (`LlamaConfig`, `Qwen2Config`, `Gemma3TextConfig` in transformers).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ModelError;

/// The model families forge's decoder implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3.x, TinyLlama, SmolLM: `LlamaForCausalLM`.
    Llama,
    /// Qwen2 / Qwen2.5: the llama block with biases on q, k and v. `Qwen2ForCausalLM`.
    Qwen2,
    /// Gemma 3 (text): GeGLU, RMSNorm on each query and key head, norms before and after
    /// attention and the FFN, embeddings scaled by √hidden, interleaved sliding-window and
    /// global layers with their own RoPE bases. `Gemma3ForCausalLM`.
    Gemma3,
}

impl Arch {
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3_text",
        }
    }

    /// llama.cpp's `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// What Gemma 3 adds to the llama block's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GemmaConfig {
    /// Tokens a sliding-window layer attends to (itself included).
    pub sliding_window: usize,
    /// Every `sliding_pattern`-th layer attends globally; the others use the window.
    pub sliding_pattern: usize,
    /// The RoPE base of the sliding-window layers (`rope_local_base_freq`); global layers use
    /// `rope_theta` and the scaling.
    pub rope_local_theta: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
}

impl GemmaConfig {
    /// Whether layer `l` attends to a sliding window (transformers' `layer_types`, llama.cpp's
    /// `swa_pattern`).
    pub fn is_sliding(&self, l: usize) -> bool {
        self.sliding_pattern == 0 || !(l + 1).is_multiple_of(self.sliding_pattern)
    }
}

/// RoPE frequency scaling (`rope_scaling` in config.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1+: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    /// Biases on the q, k and v projections (always for Qwen2; `attention_bias` for llama).
    pub qkv_bias: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub pad: Option<u32>,
    /// Gemma 3's parameters; `Some` exactly when `arch` is [`Arch::Gemma3`].
    #[serde(default)]
    pub gemma: Option<GemmaConfig>,
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::Config(msg.into())
}

fn get_usize(v: &Value, key: &str) -> Result<usize, ModelError> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| bad(format!("config.json has no integer `{key}`")))
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

/// The shape of a small llama created from a seed (a manifest's `scratch` base).
#[derive(Clone, Debug)]
pub struct ScratchShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub rope_theta: f64,
}

impl ModelConfig {
    /// The config of a scratch llama whose vocabulary is `tok`'s (tied embeddings, as small
    /// models have them).
    pub fn scratch(s: &ScratchShape, tok: &crate::Tokenizer) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden: s.hidden,
            intermediate: s.ffn,
            layers: s.layers,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.hidden / s.heads,
            vocab: tok.vocab_size(),
            rms_eps: 1e-5,
            rope_theta: s.rope_theta,
            rope_scaling: None,
            max_positions: s.context,
            tie_embeddings: true,
            qkv_bias: false,
            bos: None,
            eos: tok.eos.as_ref().map(|e| vec![e.1]).unwrap_or_default(),
            pad: tok.pad.as_ref().map(|p| p.1),
            gemma: None,
        }
    }

    /// Reads a Hugging Face `config.json`. Anything the decoder would compute differently from
    /// transformers (another activation, MLP biases, an unknown RoPE scaling) is an error, not a
    /// silently different model.
    pub fn from_hf(v: &Value) -> Result<ModelConfig, ModelError> {
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or_default();
        let arch = if archs.contains(&"LlamaForCausalLM") || model_type == "llama" {
            Arch::Llama
        } else if archs.contains(&"Qwen2ForCausalLM") || model_type == "qwen2" {
            Arch::Qwen2
        } else if archs.contains(&"Gemma3ForCausalLM") || model_type == "gemma3_text" {
            Arch::Gemma3
        } else {
            let what = if archs.is_empty() { model_type.to_string() } else { archs.join(", ") };
            return Err(ModelError::Unsupported(format!(
                "architecture `{what}` (forge supports LlamaForCausalLM — Llama 2/3.x, TinyLlama, SmolLM —, Qwen2ForCausalLM and Gemma3ForCausalLM)"
            )));
        };
        let (act_key, want) =
            if arch == Arch::Gemma3 { ("hidden_activation", "gelu_pytorch_tanh") } else { ("hidden_act", "silu") };
        let act = v.get(act_key).and_then(Value::as_str).unwrap_or(want);
        if act != want {
            return Err(ModelError::Unsupported(format!("{act_key} `{act}` ({} uses {want})", arch.hf_class())));
        }
        if arch == Arch::Gemma3 {
            for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
                if v.get(cap).is_some_and(|c| !c.is_null()) {
                    return Err(ModelError::Unsupported(format!("{cap} (Gemma 3 has none)")));
                }
            }
        }
        if v.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(ModelError::Unsupported("mlp_bias=true".into()));
        }
        if arch != Arch::Gemma3 && v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err(ModelError::Unsupported("use_sliding_window=true (sliding-window attention)".into()));
        }
        let hidden = get_usize(v, "hidden_size")?;
        let heads = get_usize(v, "num_attention_heads")?;
        let kv_heads = v.get("num_key_value_heads").and_then(Value::as_u64).map(|n| n as usize).unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(d) => d as usize,
            None if hidden % heads == 0 => hidden / heads,
            None => return Err(bad(format!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}"))),
        };
        // transformers 5 writes `rope_parameters` (with `rope_theta` inside) where 4.x wrote
        // `rope_scaling` and a top-level `rope_theta`.
        let rope_parameters = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| rope_parameters.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10_000.0);
        let rope_scaling = match v.get("rope_scaling").filter(|s| !s.is_null()).or(rope_parameters) {
            None => None,
            Some(s) => {
                let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or_default();
                let f =
                    |k: &str| s.get(k).and_then(Value::as_f64).ok_or_else(|| bad(format!("rope_scaling has no `{k}`")));
                match kind {
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                    }),
                    "linear" => Some(RopeScaling::Linear { factor: f("factor")? }),
                    "default" => None,
                    other => {
                        return Err(ModelError::Unsupported(format!("rope_scaling type `{other}` (llama3, linear)")));
                    }
                }
            }
        };
        let qkv_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Llama | Arch::Gemma3 => v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        };
        let gemma = if arch == Arch::Gemma3 {
            let pattern = match v.get("layer_types").and_then(Value::as_array) {
                // The first global layer's index + 1 is the period (transformers writes the list).
                Some(types) => {
                    types.iter().position(|t| t.as_str() == Some("full_attention")).map(|i| i + 1).unwrap_or(usize::MAX)
                }
                None => v.get("sliding_window_pattern").and_then(Value::as_u64).unwrap_or(6) as usize,
            };
            Some(GemmaConfig {
                sliding_window: v.get("sliding_window").and_then(Value::as_u64).unwrap_or(4096) as usize,
                sliding_pattern: pattern,
                rope_local_theta: v.get("rope_local_base_freq").and_then(Value::as_f64).unwrap_or(10_000.0),
                query_pre_attn_scalar: v
                    .get("query_pre_attn_scalar")
                    .and_then(Value::as_f64)
                    .unwrap_or(v.get("head_dim").and_then(Value::as_f64).unwrap_or(256.0)),
            })
        } else {
            None
        };
        let pad = v.get("pad_token_id").and_then(Value::as_u64).map(|n| n as u32);
        Ok(ModelConfig {
            arch,
            hidden,
            intermediate: get_usize(v, "intermediate_size")?,
            layers: get_usize(v, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: get_usize(v, "vocab_size")?,
            rms_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_positions: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(2048) as usize,
            tie_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias,
            bos: v.get("bos_token_id").and_then(Value::as_u64).map(|n| n as u32),
            eos: token_ids(v.get("eos_token_id")),
            pad,
            gemma,
        })
    }

    /// The `config.json` transformers reads back as the same model.
    pub fn to_hf(&self) -> Value {
        let mut v = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let o = v.as_object_mut().expect("an object");
        match self.arch {
            Arch::Llama => {
                o.insert("hidden_act".into(), json!("silu"));
                o.insert("attention_bias".into(), json!(self.qkv_bias));
                o.insert("mlp_bias".into(), json!(false));
            }
            Arch::Qwen2 => {
                o.insert("hidden_act".into(), json!("silu"));
                o.insert("use_sliding_window".into(), json!(false));
            }
            Arch::Gemma3 => {
                let g = self.gemma.as_ref().expect("a gemma3 config has gemma parameters");
                o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
                o.insert("attention_bias".into(), json!(self.qkv_bias));
                o.insert("sliding_window".into(), json!(g.sliding_window));
                o.insert("sliding_window_pattern".into(), json!(g.sliding_pattern));
                let types: Vec<&str> = (0..self.layers)
                    .map(|l| if g.is_sliding(l) { "sliding_attention" } else { "full_attention" })
                    .collect();
                o.insert("layer_types".into(), json!(types));
                o.insert("rope_local_base_freq".into(), json!(g.rope_local_theta));
                // transformers declares it an integer.
                let scalar = g.query_pre_attn_scalar;
                o.insert(
                    "query_pre_attn_scalar".into(),
                    if scalar.fract() == 0.0 { json!(scalar as u64) } else { json!(scalar) },
                );
                o.insert("final_logit_softcapping".into(), Value::Null);
                o.insert("attn_logit_softcapping".into(), Value::Null);
            }
        }
        o.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(s) => serde_json::to_value(s).expect("serializes"),
            },
        );
        if let Some(b) = self.bos {
            o.insert("bos_token_id".into(), json!(b));
        }
        match self.eos.as_slice() {
            [] => {}
            [one] => {
                o.insert("eos_token_id".into(), json!(one));
            }
            many => {
                o.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = self.pad {
            o.insert("pad_token_id".into(), json!(p));
        }
        v
    }

    /// Parameters in the model.
    pub fn parameter_count(&self) -> usize {
        let (h, i, hd) = (self.hidden, self.intermediate, self.head_dim);
        let attn = h * self.heads * hd * 2 + h * self.kv_heads * hd * 2;
        let bias = if self.qkv_bias { (self.heads + 2 * self.kv_heads) * hd } else { 0 };
        // Gemma adds the q/k head norms and the norms after attention and the FFN.
        let norms = if self.gemma.is_some() { 4 * h + 2 * hd } else { 2 * h };
        let layer = attn + bias + 3 * h * i + norms;
        let head = if self.tie_embeddings { 0 } else { self.vocab * h };
        self.vocab * h + self.layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama3_and_round_trips() {
        let v = json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": [2, 3],
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        let c = ModelConfig::from_hf(&v).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos, vec![2, 3]);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0));
        assert_eq!(ModelConfig::from_hf(&c.to_hf()).unwrap(), c);
    }

    #[test]
    fn reads_gemma3_text_and_round_trips() {
        let v = json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
            "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
            "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
                            "sliding_attention", "full_attention"],
            "final_logit_softcapping": null, "attn_logit_softcapping": null, "tie_word_embeddings": true,
            "max_position_embeddings": 32768, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0
        });
        let c = ModelConfig::from_hf(&v).unwrap();
        let g = c.gemma.as_ref().unwrap();
        assert_eq!((g.sliding_window, g.sliding_pattern, g.query_pre_attn_scalar), (512, 6, 256.0));
        assert!(g.is_sliding(0) && g.is_sliding(4) && !g.is_sliding(5) && !g.is_sliding(11));
        let back = c.to_hf();
        // transformers' Gemma3TextConfig declares the scalar an integer.
        assert!(back["query_pre_attn_scalar"].is_u64(), "{back}");
        assert_eq!(ModelConfig::from_hf(&back).unwrap(), c);
        let soft = json!({"model_type": "gemma3_text", "final_logit_softcapping": 30.0});
        assert!(ModelConfig::from_hf(&soft).unwrap_err().to_string().contains("final_logit_softcapping"));
    }

    #[test]
    fn rejects_what_it_would_compute_differently() {
        let base = json!({"architectures": ["MistralForCausalLM"], "hidden_size": 8});
        let e = ModelConfig::from_hf(&base).unwrap_err().to_string();
        assert!(e.contains("MistralForCausalLM") && e.contains("Qwen2ForCausalLM"), "{e}");
        let v = json!({"model_type": "llama", "hidden_act": "gelu"});
        assert!(ModelConfig::from_hf(&v).unwrap_err().to_string().contains("gelu"));
        let v = json!({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2});
        assert!(ModelConfig::from_hf(&v).unwrap_err().to_string().contains("intermediate_size"));
    }
}
