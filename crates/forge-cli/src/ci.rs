//! `forge build` in CI: `--shard K/N` splits the targets across N jobs, and a summary of what
//! each artifact did and why (printed, and with `--summary FILE` written as JSON).

use std::collections::BTreeMap;
use std::sync::Mutex;

use forge_plan::{DirtyReason, Estimate, Event, EventSink, Summary};
use serde::Serialize;

use crate::render::reasons_line;

/// `K/N`: this job's shard, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub k: u64,
    pub n: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("`{s}` is not a shard: write K/N with 1 <= K <= N (e.g. 2/4)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (u64, u64) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if n == 0 || k == 0 || k > n {
            return Err(bad());
        }
        Ok(Shard { k, n })
    }
}

impl Shard {
    /// Whether target `name` is this shard's: by a hash of its name, so a target stays in its
    /// shard when others are added or removed (and every job computes the same split).
    pub fn owns(&self, name: &str) -> bool {
        let h = blake3::hash(name.as_bytes());
        let v = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        v % self.n == self.k - 1
    }
}

/// What one artifact did in a build.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ArtifactOutcome {
    /// `built`, `fetched` (from the remote cache), `fresh`, `cutoff` (fresh once its rebuilt
    /// upstream came out the same),
    /// `failed`, `skipped`, `would-build`, `would-check`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<DirtyReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Built, and came out byte-identical to the previous build.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `--dry-run`: what building it would change and spend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

/// The whole build, for `--summary`.
#[derive(Debug, Default, Serialize)]
pub struct CiSummary {
    pub shard: Option<String>,
    pub targets: Vec<String>,
    pub summary: Summary,
    pub artifacts: BTreeMap<String, ArtifactOutcome>,
}

/// Passes events on to `inner` and keeps each artifact's outcome.
pub struct Recorder<'a> {
    pub inner: &'a dyn EventSink,
    pub artifacts: Mutex<BTreeMap<String, ArtifactOutcome>>,
    pub summary: Mutex<Summary>,
}

impl<'a> Recorder<'a> {
    pub fn new(inner: &'a dyn EventSink) -> Recorder<'a> {
        Recorder { inner, artifacts: Mutex::default(), summary: Mutex::default() }
    }

    fn set(&self, artifact: &str, f: impl FnOnce(&mut ArtifactOutcome)) {
        let mut all = self.artifacts.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(artifact.to_string()).or_default());
    }
}

impl EventSink for Recorder<'_> {
    fn emit(&self, event: Event) {
        match &event {
            Event::Fresh { artifact, cutoff } => {
                self.set(artifact, |o| o.outcome = if *cutoff { "cutoff" } else { "fresh" }.into())
            }
            Event::Start { artifact, reasons } => self.set(artifact, |o| o.reasons = reasons.clone()),
            Event::Fetched { artifact } => self.set(artifact, |o| o.outcome = "fetched".into()),
            Event::Finish { artifact, duration_ms, unchanged, .. } => self.set(artifact, |o| {
                if o.outcome != "fetched" {
                    o.outcome = "built".into();
                }
                o.duration_ms = Some(*duration_ms);
                o.unchanged = *unchanged;
            }),
            Event::Fail { artifact, error, .. } => self.set(artifact, |o| {
                o.outcome = "failed".into();
                o.error = Some(error.clone());
            }),
            Event::Skip { artifact, because } => self.set(artifact, |o| {
                o.outcome = "skipped".into();
                o.error = Some(format!("{because} failed"));
            }),
            Event::WouldBuild { artifact, reasons, estimate } => self.set(artifact, |o| {
                o.outcome = "would-build".into();
                o.reasons = reasons.clone();
                o.estimate = estimate.clone();
            }),
            Event::WouldCheck { artifact, upstream } => self.set(artifact, |o| {
                o.outcome = "would-check".into();
                o.error = Some(format!("after {upstream} is rebuilt"));
            }),
            Event::Done(s) => *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = s.clone(),
            _ => {}
        }
        self.inner.emit(event);
    }
}

/// The summary a CI log shows: counts, then each artifact that did anything and why.
pub fn render(s: &CiSummary) -> String {
    let count = |o: &str| s.artifacts.values().filter(|a| a.outcome == o).count();
    let mut out = format!(
        "forge build summary{}: {} artifacts — {} built, {}{} fresh, {} fresh by early cutoff, {} failed, {} skipped\n",
        s.shard.as_ref().map(|k| format!(" (shard {k}, targets {})", s.targets.join(", "))).unwrap_or_default(),
        s.artifacts.len(),
        count("built"),
        match count("fetched") {
            0 => String::new(),
            n => format!("{n} fetched from the remote cache, "),
        },
        count("fresh"),
        count("cutoff"),
        count("failed"),
        count("skipped"),
    );
    for (id, a) in &s.artifacts {
        if a.outcome == "fresh" {
            continue;
        }
        let why = match (&a.error, a.reasons.is_empty()) {
            (Some(e), _) => e.clone(),
            (None, false) => reasons_line(&a.reasons),
            (None, true) => String::new(),
        };
        let time = a.duration_ms.map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0)).unwrap_or_default();
        out.push_str(&format!(
            "  {:<12} {id}{time}{}\n",
            a.outcome,
            if why.is_empty() { why } else { format!(": {why}") }
        ));
    }
    out
}
