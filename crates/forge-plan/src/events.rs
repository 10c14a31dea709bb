//! Build events: rendered as progress and lines by the CLI, or streamed as JSON lines.

use forge_cache::Digest;
use serde::Serialize;

use crate::dirty::DirtyReason;
use crate::executor::{Cost, Estimate};

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// Planning is done: how many selected artifacts are fresh and how many may need work.
    Plan {
        artifacts: usize,
        fresh: usize,
        to_check: usize,
        jobs: usize,
    },
    /// Up to date; `cutoff` when it was checked only after an upstream rebuild produced the
    /// same content as before (early cutoff).
    Fresh {
        artifact: String,
        cutoff: bool,
    },
    Start {
        artifact: String,
        reasons: Vec<DirtyReason>,
    },
    Progress {
        artifact: String,
        done: u64,
        total: u64,
        message: String,
    },
    /// Fetched from the remote cache (verified) instead of built.
    Fetched {
        artifact: String,
    },
    /// Built and recorded; `unchanged` when the content equals the previous build's.
    Finish {
        artifact: String,
        content: Digest,
        duration_ms: u64,
        unchanged: bool,
    },
    Fail {
        artifact: String,
        error: String,
        /// forge could not do the work (an I/O error, a full disk): not the action's fault.
        io: bool,
        log: Option<String>,
    },
    /// Not built because an upstream artifact failed or cannot be built.
    Skip {
        artifact: String,
        because: String,
    },
    /// `--dry-run`: would be built, for these reasons; with what the build would change and
    /// spend when the stage can tell.
    WouldBuild {
        artifact: String,
        reasons: Vec<DirtyReason>,
        #[serde(skip_serializing_if = "Option::is_none")]
        estimate: Option<Estimate>,
    },
    /// `--dry-run`: is checked again once `upstream` is rebuilt (it may then be fresh).
    WouldCheck {
        artifact: String,
        upstream: String,
    },
    Warning {
        message: String,
    },
    Done(Summary),
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub built: usize,
    /// Of `built`, those fetched from the remote cache rather than run here.
    pub fetched: usize,
    pub fresh: usize,
    pub failed: usize,
    /// Of `failed`, those that failed on forge's own I/O (a full disk, an unreadable cache).
    pub io_failed: usize,
    pub skipped: usize,
    /// Stale artifacts left alone because the build stopped early.
    pub not_run: usize,
    pub interrupted: bool,
    /// Nothing was built: `not_run` counts what would have been checked or built.
    pub dry_run: bool,
    /// `--dry-run`: the teacher calls and tokens the stale artifacts would spend (artifacts
    /// pending on an upstream rebuild are not counted: what they spend depends on it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    pub duration_ms: u64,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.skipped == 0 && (self.not_run == 0 || self.dry_run) && !self.interrupted
    }
}

pub trait EventSink: Sync {
    fn emit(&self, event: Event);
}

/// Collects events (tests, `forge status`).
#[derive(Default)]
pub struct Collect(pub std::sync::Mutex<Vec<Event>>);

impl EventSink for Collect {
    fn emit(&self, event: Event) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

impl Collect {
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
