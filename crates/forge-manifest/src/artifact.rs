//! Artifact names and how targets expand into artifacts.
//!
//! Every artifact is named `TARGET:STAGE[:VARIANT]`. A `model` target expands into the ML
//! pipeline (`dataset` → `adapter` → `merged` → `gguf:<level>` → `bench:<level>` → `report`),
//! and any target adds one artifact per `command` stage. The dependency edges are decided here,
//! once, so that validation (unknown references, cycles) and the planner agree.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::{Manifest, QuantLevel, Target};
use crate::source::Span;

/// The target name a fetched base's artifact goes under: `base:NAME`. No target may take it.
pub const BASE_TARGET: &str = "base";

/// Stage names the ML pipeline owns; command stages may not use them.
pub const RESERVED_STAGES: &[&str] =
    &["dataset", "adapter", "merged", "imatrix", "gguf", "gguf-adapter", "bench", "report", "fetch"];

/// `TARGET:STAGE[:VARIANT]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactId {
    pub target: String,
    pub stage: String,
    pub variant: Option<String>,
}

impl ArtifactId {
    pub fn new(target: impl Into<String>, stage: impl Into<String>, variant: Option<String>) -> Self {
        ArtifactId { target: target.into(), stage: stage.into(), variant }
    }

    /// `STAGE[:VARIANT]`, the artifact's name within its target.
    pub fn local_name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}:{v}", self.stage),
            None => self.stage.clone(),
        }
    }

    /// A name safe as one path component: `defame:gguf:q4_0` → `defame--gguf--q4_0`.
    pub fn file_stem(&self) -> String {
        self.to_string().replace(':', "--")
    }
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.target, self.stage)?;
        if let Some(v) = &self.variant {
            write!(f, ":{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("`{0}` is not an artifact name: write TARGET:STAGE or TARGET:STAGE:VARIANT")]
pub struct ArtifactIdError(pub String);

impl FromStr for ArtifactId {
    type Err = ArtifactIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(ArtifactIdError(s.to_string()));
        }
        match parts.as_slice() {
            [t, st] => Ok(ArtifactId::new(*t, *st, None)),
            [t, st, v] => Ok(ArtifactId::new(*t, *st, Some(v.to_string()))),
            _ => Err(ArtifactIdError(s.to_string())),
        }
    }
}

impl Serialize for ArtifactId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArtifactId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What kind of stage produces an artifact, with the index of its declaration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageKind {
    Dataset,
    Adapter,
    Merged,
    /// The importance matrix the quantized levels are made with.
    Imatrix,
    Gguf(QuantLevel),
    /// The LoRA adapter as GGUF, for llama.cpp to load on the base.
    GgufAdapter,
    Bench(QuantLevel),
    Report,
    /// Index into the target's `commands`.
    Command(usize),
    /// A base model file fetched and verified (`base:NAME`).
    Fetch,
}

impl StageKind {
    /// The kind's name as executors are registered under.
    pub fn name(&self) -> &'static str {
        match self {
            StageKind::Dataset => "dataset",
            StageKind::Adapter => "adapter",
            StageKind::Merged => "merged",
            StageKind::Imatrix => "imatrix",
            StageKind::Gguf(_) => "gguf",
            StageKind::GgufAdapter => "gguf-adapter",
            StageKind::Bench(_) => "bench",
            StageKind::Report => "report",
            StageKind::Command(_) => "command",
            StageKind::Fetch => "fetch",
        }
    }
}

/// One dependency edge, with where it was declared.
#[derive(Clone, Debug)]
pub struct Dep {
    pub id: ArtifactId,
    pub span: Span,
}

/// One artifact a target declares.
#[derive(Clone, Debug)]
pub struct ArtifactDecl {
    pub id: ArtifactId,
    /// Index of the target in [`Manifest::targets`]; `None` for a base's `fetch` artifact.
    pub target: Option<usize>,
    pub kind: StageKind,
    pub deps: Vec<Dep>,
    /// The declaring node.
    pub span: Span,
    pub pool: Option<String>,
}

/// Resolves a `needs` reference written in `target`: first against that target's own
/// artifacts (`lint`, `gguf:q4_0`), then as a full `TARGET:STAGE[:VARIANT]` name.
pub fn resolve_ref(target: &Target, reference: &str, exists: impl Fn(&ArtifactId) -> bool) -> Option<ArtifactId> {
    let (stage, variant) = match reference.split_once(':') {
        Some((s, v)) => (s, Some(v.to_string())),
        None => (reference, None),
    };
    let local = ArtifactId::new(target.name.value.clone(), stage, variant);
    if !local.stage.is_empty() && !local.variant.as_deref().is_some_and(|v| v.contains(':')) && exists(&local) {
        return Some(local);
    }
    reference.parse::<ArtifactId>().ok().filter(|id| exists(id))
}

/// Every artifact the manifest declares, in declaration order (targets, then pipeline order,
/// then command stages). References that do not resolve are left out of `deps`; validation
/// reports them.
pub fn expand(manifest: &Manifest) -> Vec<ArtifactDecl> {
    let mut out = Vec::new();
    for base in manifest.bases.values() {
        if let Some(id) = base.fetch_artifact() {
            out.push(ArtifactDecl {
                id,
                target: None,
                kind: StageKind::Fetch,
                deps: vec![],
                span: base.name.span,
                pool: None,
            });
        }
    }
    for (ti, target) in manifest.targets.iter().enumerate() {
        expand_target(manifest, ti, target, &mut out);
    }
    let ids: std::collections::HashSet<ArtifactId> = out.iter().map(|a| a.id.clone()).collect();
    for decl in &mut out {
        if let (StageKind::Command(ci), Some(ti)) = (decl.kind, decl.target) {
            let target = &manifest.targets[ti];
            let stage = &target.commands[ci];
            decl.deps = stage
                .needs
                .iter()
                .filter_map(|n| resolve_ref(target, &n.value, |id| ids.contains(id)).map(|id| Dep { id, span: n.span }))
                .collect();
        }
    }
    out
}

fn pool(p: &Option<crate::source::Spanned<String>>) -> Option<String> {
    p.as_ref().map(|p| p.value.clone())
}

fn expand_target(manifest: &Manifest, ti: usize, target: &Target, out: &mut Vec<ArtifactDecl>) {
    let t = &target.name.value;
    let id = |stage: &str, variant: Option<String>| ArtifactId::new(t.clone(), stage, variant);
    let dep = |stage: &str, variant: Option<String>, span: Span| Dep { id: id(stage, variant), span };
    let ti = Some(ti);
    if let Some(m) = &target.model {
        // The stages that read the base's weights need its fetch artifact.
        let base_dep = m.adapter.as_ref().and_then(|a| {
            let base = manifest.bases.get(&a.base.value)?;
            Some(Dep { id: base.fetch_artifact()?, span: a.base.span })
        });
        if let Some(d) = &m.dataset {
            let decl = ArtifactDecl {
                id: id("dataset", None),
                target: ti,
                kind: StageKind::Dataset,
                deps: vec![],
                span: d.span,
                pool: pool(&d.pool),
            };
            out.push(decl);
        }
        if let Some(a) = &m.adapter {
            let mut deps = if m.dataset.is_some() { vec![dep("dataset", None, a.span)] } else { vec![] };
            deps.extend(base_dep.clone());
            let decl = ArtifactDecl {
                id: id("adapter", None),
                target: ti,
                kind: StageKind::Adapter,
                deps,
                span: a.span,
                pool: pool(&a.pool),
            };
            out.push(decl);
            let decl = ArtifactDecl {
                id: id("merged", None),
                target: ti,
                kind: StageKind::Merged,
                deps: std::iter::once(dep("adapter", None, a.span)).chain(base_dep.clone()).collect(),
                span: a.span,
                pool: pool(&a.pool),
            };
            out.push(decl);
        }
        if let (Some(q), Some(_)) = (&m.quantize, &m.adapter) {
            // The importance matrix: computed on the dataset's train split by the merged model,
            // needed by the levels it changes.
            let imatrix = q.imatrix > 0 && m.dataset.is_some() && q.levels.iter().any(|l| l.value.uses_imatrix());
            if imatrix {
                out.push(ArtifactDecl {
                    id: id("imatrix", None),
                    target: ti,
                    kind: StageKind::Imatrix,
                    deps: vec![dep("merged", None, q.span), dep("dataset", None, q.span)],
                    span: q.span,
                    pool: pool(&q.pool),
                });
            }
            for level in &q.levels {
                let mut deps = vec![dep("merged", None, level.span)];
                if imatrix && level.value.uses_imatrix() {
                    deps.push(dep("imatrix", None, level.span));
                }
                let decl = ArtifactDecl {
                    id: id("gguf", Some(level.value.to_string())),
                    target: ti,
                    kind: StageKind::Gguf(level.value),
                    deps,
                    span: level.span,
                    pool: pool(&q.pool),
                };
                out.push(decl);
            }
        }
        if let (Some(q), Some(a)) = (&m.quantize, &m.adapter)
            && a.method == crate::model::TrainMethod::Lora
        {
            out.push(ArtifactDecl {
                id: id("gguf-adapter", None),
                target: ti,
                kind: StageKind::GgufAdapter,
                deps: std::iter::once(dep("adapter", None, q.span)).chain(base_dep.clone()).collect(),
                span: q.span,
                pool: pool(&q.pool),
            });
        }
        if let (Some(b), Some(q), Some(_)) = (&m.benchmark, &m.quantize, &m.adapter) {
            for level in &q.levels {
                let mut deps = vec![dep("gguf", Some(level.value.to_string()), b.span)];
                if m.dataset.is_some() {
                    deps.push(dep("dataset", None, b.span));
                }
                let decl = ArtifactDecl {
                    id: id("bench", Some(level.value.to_string())),
                    target: ti,
                    kind: StageKind::Bench(level.value),
                    deps,
                    span: b.span,
                    pool: pool(&b.pool),
                };
                out.push(decl);
            }
            let mut deps: Vec<Dep> = q.levels.iter().map(|l| dep("bench", Some(l.value.to_string()), b.span)).collect();
            deps.push(dep("adapter", None, b.span));
            let decl = ArtifactDecl {
                id: id("report", None),
                target: ti,
                kind: StageKind::Report,
                deps,
                span: b.span,
                pool: None,
            };
            out.push(decl);
        }
    }
    for (ci, c) in target.commands.iter().enumerate() {
        let decl = ArtifactDecl {
            id: id(&c.name.value, None),
            target: ti,
            kind: StageKind::Command(ci),
            deps: vec![],
            span: c.name.span,
            pool: pool(&c.pool),
        };
        out.push(decl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_artifact_names() {
        let id: ArtifactId = "defame:gguf:q4_0".parse().unwrap();
        assert_eq!(id, ArtifactId::new("defame", "gguf", Some("q4_0".into())));
        assert_eq!(id.to_string(), "defame:gguf:q4_0");
        assert_eq!(id.local_name(), "gguf:q4_0");
        assert_eq!(id.file_stem(), "defame--gguf--q4_0");
        assert!("defame".parse::<ArtifactId>().is_err());
        assert!("a::b".parse::<ArtifactId>().is_err());
        assert!("a:b:c:d".parse::<ArtifactId>().is_err());
    }
}
