//! Datasets: lore lists and a recipe's DAG, sampled stably ([`sampler`]); validation and
//! deduplication ([`validate`]); the sample files ([`dataset`]) and a deterministic split
//! ([`split`]). The `dataset` stage that asks the teachers, tops up to exactly N samples and
//! resumes from its journal is in `forge-stages`. [`captures`] is the store of a call site's
//! captured calls (`forge proxy` writes it; a `dataset from="captures"` reads it).

pub mod captures;
pub mod dataset;
pub mod json_recovery;
pub mod sampler;
pub mod split;
pub mod validate;

pub use dataset::{Meta, Sample, read_meta, read_samples};
