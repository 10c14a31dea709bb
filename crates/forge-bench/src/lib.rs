//! Benchmarking the student as DefameLM does (§4): generate several answers per eval prompt with
//! forge's quantized decoder, grade each with the recipe's judge suite (all criteria must pass),
//! estimate every prompt's success probability, run retry-until-success, and compare levels.

pub mod bench;
pub mod infer;
pub mod judge;
pub mod plot;
pub mod report;
pub mod stats;

pub use bench::BenchExecutor;
pub use report::ReportExecutor;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Gguf(#[from] forge_gguf::GgufError),
    #[error(transparent)]
    Forge(#[from] forge_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, BenchError>;
