//! Training: LoRA or full fine-tuning on forge's decoder (the autograd path or the hand-written
//! engine), as DefameLM (§3.3: LoRA, prompt-loss weight 0) and the NPC persona pipeline (full
//! fine-tune, packing) train their models. The `adapter`, `merged` and `imatrix` stages that
//! drive it from a manifest are in `forge-stages`.

pub mod data;
pub mod optim;
pub mod train;

use std::path::{Path, PathBuf};

pub use train::{Curve, Hooks, Report, TrainConfig, train};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(String),
    #[error("variable `{0}` received no gradient: the graph is cut somewhere between it and the loss")]
    NoGradient(String),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("interrupted")]
    Cancelled,
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] forge_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> TrainError {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
