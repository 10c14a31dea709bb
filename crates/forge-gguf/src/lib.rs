//! GGUF, the file format of llama.cpp and the game runtimes built on it.
//!
//! - [`format`]: the container (write v3, read v2/v3);
//! - [`quant`], [`kquant`]: ggml's block quantizations, bit-compatible with llama.cpp;
//! - [`convert`]: a forge/Hugging Face llama or qwen2 model → GGUF at a quantization level, with
//!   llama.cpp's per-tensor type mixing, tokenizer metadata and the Q/K row permutation;
//! - [`adapter`]: LoRA adapters as GGUF (`general.type = adapter`) for hot-loading on a base;
//! - [`inspect`]: what a file holds and whether llama.cpp has what it needs;
//! - [`load`]: a GGUF back into forge's decoder (dequantized), for checks and inputs;
//! - [`requant`]: a GGUF model file (f32, f16, bf16, ...) requantized to a level, as
//!   `llama-quantize` does, with the same mixing as [`convert`].

pub mod adapter;
pub mod convert;
pub mod format;
pub mod imatrix;
pub mod inspect;
pub mod kquant;
pub mod load;
pub mod quant;
pub mod requant;
pub mod tokenizer;
pub mod types;

pub use format::{Gguf, TensorData, TensorInfo, Value};
pub use types::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{0}")]
    Invalid(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Model(#[from] forge_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<std::io::Error> for GgufError {
    fn from(e: std::io::Error) -> GgufError {
        GgufError::Io(e.to_string())
    }
}

impl GgufError {
    /// The error with what it happened in (a key, a tensor) named first.
    pub fn context(self, what: &str) -> GgufError {
        match self {
            GgufError::Invalid(m) => GgufError::Invalid(format!("{what}: {m}")),
            GgufError::Unsupported(m) => GgufError::Unsupported(format!("{what}: {m}")),
            GgufError::Io(m) => GgufError::Io(format!("{what}: {m}")),
            other => other,
        }
    }

    /// The error with the file it is about named first.
    pub fn in_file(self, path: &std::path::Path) -> GgufError {
        let p = path.display();
        match self {
            GgufError::Invalid(m) => GgufError::Invalid(format!("{p}: {m}")),
            GgufError::Unsupported(m) => GgufError::Unsupported(format!("{p}: {m}")),
            GgufError::Io(m) if m.starts_with(&p.to_string()) => GgufError::Io(m),
            GgufError::Io(m) => GgufError::Io(format!("{p}: {m}")),
            other => GgufError::Invalid(format!("{p}: {other}")),
        }
    }
}

pub type Result<T> = std::result::Result<T, GgufError>;
