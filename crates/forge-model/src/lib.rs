//! forge's models: a differentiable llama-family decoder on candle-core ([`llama`]), LoRA in
//! PEFT's format ([`lora`]), Hugging Face folders ([`io`]), tokenizers and chat templates
//! ([`tokenizer`]) and sampling ([`generate`]).

pub mod config;
pub mod engine;
pub mod generate;
pub mod io;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod tokenizer;

use std::path::{Path, PathBuf};

pub use config::{Arch, GemmaConfig, ModelConfig, RopeScaling, ScratchShape};
pub use llama::{Dropout, KvCache, Layout, Llama, weighted_cross_entropy};
pub use lora::LoraSpec;
pub use tokenizer::{ChatMessage, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing file {}", .0.display())]
    MissingFile(PathBuf),
    #[error("{0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("the checkpoint has no tensor `{0}`")]
    MissingTensor(String),
    #[error("the checkpoint has a tensor forge does not know: `{0}`")]
    UnexpectedTensor(String),
    #[error("tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    Shape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{len} tokens exceed the model's context of {max}")]
    TooLong { len: usize, max: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> ModelError {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Keeps freed memory in the process instead of returning it to the kernel at once.
///
/// Training allocates and frees tensors of megabytes on every step; with glibc's defaults each
/// comes from a fresh `mmap` that the kernel must fault in and zero page by page, which cost a
/// quarter of a training step (measured with `perf`). Raising the mmap and trim thresholds lets
/// the heap reuse those blocks. Call once at program start; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
