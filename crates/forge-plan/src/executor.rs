//! Stage executors: what runs an artifact's action.
//!
//! The planner knows *which* artifacts exist and how they depend on each other; an executor
//! knows, for one stage kind, which manifest parameters and input files its output depends on
//! ([`Executor::plan`]) and how to produce that output ([`Executor::run`]). Executors are
//! stateless and registered by kind in a [`Registry`]; later stages (dataset, adapter, ...)
//! plug in the same way as the built-in `command` stage.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use forge_cache::Cache;
use forge_manifest::{ArtifactDecl, ArtifactId, Manifest};
use serde_json::Value;

/// What an executor reads, decided at planning time.
#[derive(Clone, Debug, Default)]
pub struct StagePlan {
    /// The manifest parameters the output depends on (fingerprinted).
    pub params: BTreeMap<String, Value>,
    /// Workspace-relative file patterns the action reads (resolved and hashed per build).
    pub inputs: Vec<String>,
    /// Versions of tools that shape the output.
    pub tools: BTreeMap<String, String>,
}

pub trait Executor: Send + Sync {
    /// The stage kind this executor runs (`command`, `dataset`, ...).
    fn kind(&self) -> &'static str;
    /// The version of the output format; part of every fingerprint of this kind.
    fn format_version(&self) -> u32;
    /// What the action for `decl` reads.
    fn plan(&self, manifest: &Manifest, decl: &ArtifactDecl) -> StagePlan;
    /// Whether the action for `decl` must run alone: it measures time (a benchmark), and any
    /// action beside it — a quantization, another benchmark — would disturb its timings. The
    /// scheduler starts it once nothing else runs and starts nothing beside it.
    fn exclusive(&self, _decl: &ArtifactDecl) -> bool {
        false
    }
    /// Produces the artifact in `ctx.out_dir`. Must honour `ctx.cancel`.
    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError>;
    /// What running the action for a stale artifact would change and spend, worked out without
    /// running it (`forge status`, `forge why`, `forge build --dry-run`); `None` for stages with
    /// nothing to say beyond their dirty reasons.
    fn estimate(&self, _ctx: &EstimateContext<'_>) -> Option<Result<Estimate, String>> {
        None
    }
}

/// What [`Executor::estimate`] may read: the manifest, the cache (its teacher-call cache above
/// all) and the parameters of the artifact's last build, when the action cache still has them.
pub struct EstimateContext<'a> {
    pub decl: &'a ArtifactDecl,
    pub manifest: &'a Manifest,
    pub workspace: &'a Path,
    pub cache: &'a Cache,
    /// As [`ActionContext::shared_calls`]: read, never written.
    pub shared_calls: Option<Arc<dyn forge_cache::SharedStore>>,
    pub previous: Option<&'a BTreeMap<String, Value>>,
}

/// What a rebuild would change and spend.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// One line for people: `23 of 1800 samples change (list "intelligence": +1 entry)`.
    pub summary: String,
    /// What caused the change, each with the number of units (samples) it touches.
    pub causes: Vec<Cause>,
    /// The paid calls the action would make (answers not in the teacher-call cache).
    pub cost: Cost,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cause {
    pub what: String,
    pub count: u64,
}

/// Teacher calls and the tokens they would take (estimated from answers of the same requests'
/// nodes already cached, or from the prompts' lengths when there are none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cost {
    pub teacher_calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        self.teacher_calls += o.teacher_calls;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
    }
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let calls = if self.teacher_calls == 1 { "call" } else { "calls" };
        write!(f, "{} teacher {calls}", self.teacher_calls)?;
        if self.teacher_calls > 0 {
            write!(f, ", ~{} prompt + ~{} completion tokens", self.prompt_tokens, self.completion_tokens)?;
        }
        Ok(())
    }
}

/// Executors by stage kind.
#[derive(Clone, Default)]
pub struct Registry {
    executors: HashMap<&'static str, Arc<dyn Executor>>,
    /// Per stage kind, what shapes its output beyond its params and inputs — the digest of
    /// forge's code for the stage, the versions of the crates it uses — added to every plan's
    /// [`StagePlan::tools`] of that kind.
    tools: HashMap<String, BTreeMap<String, String>>,
}

impl Registry {
    /// A registry with the built-in `command` stage.
    pub fn with_builtin() -> Registry {
        let mut r = Registry::default();
        r.register(Arc::new(crate::command::CommandExecutor));
        r
    }

    pub fn register(&mut self, e: Arc<dyn Executor>) {
        self.executors.insert(e.kind(), e);
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Executor>> {
        self.executors.get(kind).cloned()
    }

    /// What shapes the output of every `kind` stage beyond its plan (see [`Registry::tools`]).
    pub fn set_tools(&mut self, kind: &str, tools: BTreeMap<String, String>) {
        self.tools.insert(kind.to_string(), tools);
    }

    /// What [`Registry::set_tools`] gave `kind`.
    pub fn tools(&self, kind: &str) -> Option<&BTreeMap<String, String>> {
        self.tools.get(kind)
    }
}

/// Set when the build is interrupted; actions stop as soon as they notice.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token that follows an existing flag (e.g. one a signal handler sets).
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        CancelToken(flag)
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// An action's log file (`.forge-cache/logs-v1/<artifact>.log`).
pub struct Log {
    path: PathBuf,
    file: Mutex<File>,
}

impl Log {
    pub fn create(path: &Path) -> std::io::Result<Log> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Log { path: path.to_path_buf(), file: Mutex::new(File::create(path)?) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn line(&self, text: &str) {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{text}");
    }

    /// A handle a child process can write its output to.
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).try_clone()
    }

    /// The last `n` lines of the log at `path`, for error messages.
    pub fn tail_of(path: &Path, n: usize) -> Vec<String> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect()
    }
}

/// Everything an action may use.
pub struct ActionContext<'a> {
    pub artifact: &'a ArtifactId,
    /// The action key: identifies this exact action across runs (a resumable action keeps its
    /// progress under it).
    pub key: &'a forge_cache::Digest,
    pub decl: &'a ArtifactDecl,
    pub manifest: &'a Manifest,
    pub params: &'a BTreeMap<String, Value>,
    /// The workspace root (the working directory of commands).
    pub workspace: &'a Path,
    /// The empty directory the artifact is written to.
    pub out_dir: &'a Path,
    /// The content directories of the upstream artifacts (read-only).
    pub deps: &'a BTreeMap<ArtifactId, PathBuf>,
    /// The resolved input files, workspace-relative.
    pub inputs: &'a [String],
    pub cache: &'a Cache,
    /// The remote cache's copy of the teacher-call cache, when answers are shared.
    pub shared_calls: Option<Arc<dyn forge_cache::SharedStore>>,
    pub log: &'a Log,
    pub cancel: &'a CancelToken,
    /// Reports progress: (done, total, what).
    pub progress: &'a (dyn Fn(u64, u64, &str) + Sync),
}

impl ActionContext<'_> {
    /// A directory that survives an interrupted run of this exact action (same key), for
    /// progress an action can resume from. Remove it when done.
    pub fn work_dir(&self) -> std::path::PathBuf {
        self.cache.bucket(forge_cache::Bucket::Work).join(self.key.hex())
    }

    /// The directory of this target's upstream `kind` stage (`TARGET:dataset`, ...).
    pub fn dep_of(&self, kind: forge_manifest::StageKind) -> Result<PathBuf, ActionError> {
        let id = ArtifactId::new(self.artifact.target.clone(), kind.name(), None);
        self.deps.get(&id).cloned().ok_or_else(|| ActionError::Failed(format!("the upstream artifact {id} is missing")))
    }
}

/// Why an action failed. A stage keeps the typed error it failed on as the source
/// ([`ActionError::Because`]), so a caller can tell a teacher's refusal from a damaged file by
/// downcasting, and forge's own I/O failures (a full disk) are told apart from the action's
/// ([`ActionError::is_io`]: exit status 3, not 1).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The stage failed for a reason it states.
    #[error("{0}")]
    Failed(String),
    /// The stage failed on a typed error: `context` (may be empty) says what it was doing.
    #[error("{}{source}", if context.is_empty() { String::new() } else { format!("{context}: ") })]
    Because {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interrupted")]
    Cancelled,
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ActionError {
    pub fn io(path: &Path, source: std::io::Error) -> ActionError {
        ActionError::Io { path: path.to_path_buf(), source }
    }

    /// A failure the stage describes in words.
    pub fn msg(message: impl std::fmt::Display) -> ActionError {
        ActionError::Failed(message.to_string())
    }

    /// A failure on a typed error, kept as the source.
    pub fn because(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> ActionError {
        ActionError::Because { context: context.into(), source: Box::new(source) }
    }

    /// A failure on a typed error, kept as the source, with no more to say.
    pub fn from_error(source: impl std::error::Error + Send + Sync + 'static) -> ActionError {
        ActionError::because("", source)
    }

    /// Whether forge could not do its work (an I/O error anywhere in the chain: a full disk, an
    /// unreadable cache) rather than the action failing on what it was given.
    pub fn is_io(&self) -> bool {
        let mut e: Option<&(dyn std::error::Error + 'static)> = match self {
            ActionError::Io { .. } => return true,
            ActionError::Because { source, .. } => Some(source.as_ref()),
            ActionError::Failed(_) | ActionError::Cancelled => None,
        };
        while let Some(err) = e {
            if err.is::<std::io::Error>()
                || matches!(err.downcast_ref::<forge_cache::CacheError>(), Some(forge_cache::CacheError::Io { .. }))
            {
                return true;
            }
            e = err.source();
        }
        false
    }
}

impl From<forge_cache::CacheError> for ActionError {
    fn from(e: forge_cache::CacheError) -> ActionError {
        match e {
            forge_cache::CacheError::Io { path, source } => ActionError::Io { path, source },
            other => ActionError::because("", other),
        }
    }
}
