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

use forge_gguf::GgmlType;

/// Bumped when what these stages write changes.
pub const GGUF_FORMAT: u32 = 2;

/// A GGUF base's tokenizer metadata, kept beside the adapter and the merged model trained on
/// it (a GGUF file of metadata only): the `gguf` stage writes it back unchanged.
pub const GGUF_TOKENIZER: &str = "tokenizer.gguf";

/// The file of a `TARGET:imatrix` artifact.
pub const IMATRIX_FILE: &str = "imatrix.gguf";

pub struct GgufExecutor;
pub struct GgufAdapterExecutor;

/// The file of a GGUF base: the fetched artifact's (`base:NAME`), or the workspace file
/// (checked against its sha256 when the manifest gives one).
pub fn gguf_base_file(
    m: &Manifest,
    base_name: &str,
    g: &forge_manifest::GgufBase,
    workspace: &std::path::Path,
    deps: &BTreeMap<forge_manifest::ArtifactId, PathBuf>,
) -> Result<PathBuf, ActionError> {
    match &g.path {
        Some(p) => {
            let file = workspace.join(&p.value);
            if let Some(want) = &g.sha256 {
                let got = crate::fetch::sha256_file(&file).map_err(|e| ActionError::io(&file, e))?;
                if got != want.value {
                    return Err(ActionError::msg(format!(
                        "base `{base_name}`: {} has sha256 {got}, but the manifest says {}",
                        p.value, want.value
                    )));
                }
            }
            Ok(file)
        }
        None => {
            let id = m.bases[base_name].fetch_artifact().expect("a base without a path is fetched");
            let dir = deps.get(&id).ok_or_else(|| ActionError::msg(format!("the fetched base {id} is missing")))?;
            Ok(dir.join(crate::fetch::FETCHED_FILE))
        }
    }
}

/// A GGUF base's own tokenizer metadata, kept beside a model trained on it.
fn stored_tokenizer(dir: &std::path::Path) -> Result<Option<Vec<(String, forge_gguf::Value)>>, ActionError> {
    let path = dir.join(GGUF_TOKENIZER);
    if !path.is_file() {
        return Ok(None);
    }
    forge_gguf::convert::read_tokenizer_file(&path).map(Some).map_err(ActionError::from_error)
}

fn log_types(ctx: &ActionContext<'_>, summary: &forge_gguf::convert::Summary) {
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
        let merged = ctx.dep_of(StageKind::Merged)?;
        let (model, tok) = forge_model::io::load_hf(&merged, &Device::Cpu).map_err(ActionError::from_error)?;
        let path = ctx.out_dir.join("model.gguf");
        let name = ctx.artifact.target.clone();
        let tok_md = stored_tokenizer(&merged)?;
        let imatrix_id = forge_manifest::ArtifactId::new(ctx.artifact.target.clone(), StageKind::Imatrix.name(), None);
        let imatrix = match ctx.deps.get(&imatrix_id) {
            Some(dir) => Some(forge_gguf::imatrix::read(&dir.join(IMATRIX_FILE)).map_err(ActionError::from_error)?),
            None => None,
        };
        let extras = forge_gguf::convert::Extras { tokenizer: tok_md.as_deref(), imatrix: imatrix.as_ref() };
        let summary = forge_gguf::convert::write_model(&path, &model, &tok, level, &name, extras)
            .map_err(ActionError::from_error)?;
        if imatrix.is_some() {
            let weighted = summary.tensors.iter().filter(|(_, _, t)| forge_gguf::quant::uses_imatrix(*t)).count();
            ctx.log.line(&format!("{weighted} tensors quantized with the importance matrix"));
        }
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
        let model = m.target_of(decl).model.as_ref().expect("gguf-adapter belongs to a model");
        let a = model.adapter.as_ref().expect("validated: an adapter");
        // An hf base or a workspace GGUF file is read from the workspace (the adapter only names
        // it); a fetched one is an upstream artifact.
        let normalize = |p: &str| forge_manifest::glob::normalize("", p).unwrap_or_else(|_| p.to_string());
        let inputs = match &m.bases[&a.base.value].kind {
            BaseKind::Hf { path } => vec![normalize(&path.value)],
            BaseKind::Gguf(g) => g.path.iter().map(|p| normalize(&p.value)).collect(),
            BaseKind::Scratch(_) => Vec::new(),
        };
        StagePlan { params: BTreeMap::new(), inputs, tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let adapter = ctx.dep_of(StageKind::Adapter)?;
        let name = ctx.artifact.target.clone();
        let model = ctx.manifest.target_of(ctx.decl).model.as_ref().expect("gguf-adapter belongs to a model");
        let a = model.adapter.as_ref().expect("validated: an adapter");
        if let BaseKind::Gguf(g) = &ctx.manifest.bases[&a.base.value].kind {
            // The base is a GGUF file already: ship it as it is, the adapter on top.
            let file = gguf_base_file(ctx.manifest, &a.base.value, g, ctx.workspace, ctx.deps)?;
            let g = forge_gguf::format::Gguf::open(&file).map_err(ActionError::from_error)?;
            let cfg = forge_gguf::load::config(&g).map_err(ActionError::from_error)?;
            let n = forge_gguf::adapter::write_adapter(&ctx.out_dir.join("adapter.gguf"), &cfg, &adapter, &name)
                .map_err(ActionError::from_error)?;
            ctx.log.line(&format!("adapter.gguf: {n} LoRA tensors"));
            let to = ctx.out_dir.join("base.gguf");
            std::fs::copy(&file, &to).map_err(|e| ActionError::io(&to, e))?;
            ctx.log.line(&format!("base.gguf: {} as fetched", a.base.value));
            return Ok(());
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).map_err(|e| ActionError::io(&adapter, e))?,
        )
        .map_err(ActionError::from_error)?;
        let base = cfg["base_model_name_or_path"].as_str().unwrap_or("base");
        let base_dir = if base == "base" { adapter.join("base") } else { ctx.workspace.join(base) };
        let (base_model, tok) = forge_model::io::load_hf(&base_dir, &Device::Cpu).map_err(ActionError::from_error)?;
        let n = forge_gguf::adapter::write_adapter(&ctx.out_dir.join("adapter.gguf"), &base_model.cfg, &adapter, &name)
            .map_err(ActionError::from_error)?;
        ctx.log.line(&format!("adapter.gguf: {n} LoRA tensors"));
        let summary = forge_gguf::convert::write_model(
            &ctx.out_dir.join("base.gguf"),
            &base_model,
            &tok,
            QuantLevel::F16,
            &format!("{name}-base"),
            Default::default(),
        )
        .map_err(ActionError::from_error)?;
        log_types(ctx, &summary);
        Ok(())
    }
}
