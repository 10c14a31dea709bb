//! The `dataset` stage: lore lists and a recipe's DAG, sampled stably; teachers; validation,
//! deduplication, exact-N top-up, resume and a deterministic split.

pub mod dataset;
pub mod json_recovery;
pub mod sampler;
pub mod split;
mod stage;
pub mod validate;

pub use dataset::{Meta, Sample, read_meta, read_samples};
pub use stage::DatasetExecutor;
