//! What benchmarking the student as DefameLM does (§4) is made of, besides the decoder
//! (`forge-infer`): the recipe's judge suite ([`judge`]: all criteria must pass), the statistics that
//! compare levels ([`stats`]) and the plots ([`plot`]). The `bench` and `report` stages that run
//! them are in `forge-stages`.

pub mod judge;
pub mod plot;
pub mod promote;
pub mod stats;

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
    Infer(#[from] forge_infer::InferError),
}

pub type Result<T> = std::result::Result<T, BenchError>;
