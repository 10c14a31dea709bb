//! The `gguf:<level>` and `gguf-adapter` stages.
//!
//! `TARGET:gguf:<level>` converts the merged model to `model.gguf` at that level (levels build in
//! parallel). `TARGET:gguf-adapter` converts a LoRA adapter to `adapter.gguf` and writes its base
//! as `base.gguf` (f16), so a runtime can load the base once and hot-swap adapters.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Device;
use forge_manifest::{ArtifactDecl, BaseKind, Manifest, QuantLevel, StageKind};
use forge_plan::{ActionContext, ActionError, Executor, StagePlan};
use serde_json::json;

use crate::types::GgmlType;

/// Bumped when what these stages write changes.
pub const GGUF_FORMAT: u32 = 1;

pub struct GgufExecutor;
pub struct GgufAdapterExecutor;

fn failed(e: impl std::fmt::Display) -> ActionError {
    ActionError::Failed(e.to_string())
}

fn only_dep(ctx: &ActionContext<'_>) -> Result<PathBuf, ActionError> {
    ctx.deps.values().next().cloned().ok_or_else(|| failed("the upstream artifact is missing"))
}

fn log_types(ctx: &ActionContext<'_>, summary: &crate::convert::Summary) {
    let mut by: BTreeMap<GgmlType, usize> = BTreeMap::new();
    for (_, _, t) in &summary.tensors {
        *by.entry(*t).or_default() += 1;
    }
    let parts: Vec<String> = by.iter().map(|(t, n)| format!("{n} {t}")).collect();
    ctx.log.line(&format!("{} tensors: {}", summary.tensors.len(), parts.join(", ")));
}

impl Executor for GgufExecutor {
    fn kind(&self) -> &'static str {
        "gguf"
    }

    fn format_version(&self) -> u32 {
        GGUF_FORMAT
    }

    fn plan(&self, _m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        let StageKind::Gguf(level) = decl.kind else { panic!("the gguf executor got a {} stage", decl.kind.name()) };
        let mut params = BTreeMap::new();
        params.insert("level".into(), json!(level.as_str()));
        StagePlan { params, inputs: Vec::new(), tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let StageKind::Gguf(level) = ctx.decl.kind else { unreachable!("planned as gguf") };
        let merged = only_dep(ctx)?;
        let (model, tok) = forge_model::io::load_hf(&merged, &Device::Cpu).map_err(failed)?;
        let path = ctx.out_dir.join("model.gguf");
        let name = ctx.artifact.target.clone();
        let summary = crate::convert::write_model(&path, &model, &tok, level, &name).map_err(failed)?;
        log_types(ctx, &summary);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        ctx.log.line(&format!("{} at {level}: {:.1} MiB", path.display(), size as f64 / (1 << 20) as f64));
        Ok(())
    }
}

impl Executor for GgufAdapterExecutor {
    fn kind(&self) -> &'static str {
        "gguf-adapter"
    }

    fn format_version(&self) -> u32 {
        GGUF_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        let model = m.targets[decl.target].model.as_ref().expect("gguf-adapter belongs to a model");
        let a = model.adapter.as_ref().expect("validated: an adapter");
        // An hf base is read from the workspace (the adapter only names it).
        let inputs = match &m.bases[&a.base.value].kind {
            BaseKind::Hf { path } => {
                vec![forge_manifest::glob::normalize("", &path.value).unwrap_or_else(|_| path.value.clone())]
            }
            BaseKind::Scratch(_) => Vec::new(),
        };
        StagePlan { params: BTreeMap::new(), inputs, tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let adapter = only_dep(ctx)?;
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).map_err(|e| ActionError::io(&adapter, e))?,
        )
        .map_err(failed)?;
        let base = cfg["base_model_name_or_path"].as_str().unwrap_or("base");
        let base_dir = if base == "base" { adapter.join("base") } else { ctx.workspace.join(base) };
        let (base_model, tok) = forge_model::io::load_hf(&base_dir, &Device::Cpu).map_err(failed)?;
        let name = ctx.artifact.target.clone();
        let n = crate::adapter::write_adapter(&ctx.out_dir.join("adapter.gguf"), &base_model.cfg, &adapter, &name)
            .map_err(failed)?;
        ctx.log.line(&format!("adapter.gguf: {n} LoRA tensors"));
        let summary = crate::convert::write_model(
            &ctx.out_dir.join("base.gguf"),
            &base_model,
            &tok,
            QuantLevel::F16,
            &format!("{name}-base"),
        )
        .map_err(failed)?;
        log_types(ctx, &summary);
        Ok(())
    }
}
