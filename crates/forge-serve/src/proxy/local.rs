//! Promoted sites answered by their local model.
//!
//! A site whose `live.json` names a version is answered by that version's GGUF (forge serve's
//! registry and decoder, in-process), retried until the site's verifiers pass, up to the
//! policy's `attempts`; an answer that still fails is not sent — the upstream answers instead
//! (and that answer is captured: the local model's hard cases). Every local outcome enters the
//! site's window; when the pass rate over a full window falls below the policy, the proxy rolls
//! the site back to the version that was live before (or to the upstream) by itself.
//!
//! `live.json` is read again whenever it changes (`forge site promote|rollback` while the proxy
//! runs): the registry is pointed at the new file, requests already answering finish on the old
//! model, and no request sees half of a switch.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::Value;

use super::versions::{Served, Versions, now_ms};
use crate::api::{State, Verified, verified_answer};
use crate::{Config, Defaults, Npc};

/// What the proxy needs of a declared site to answer it locally.
#[derive(Clone)]
pub struct SiteModel {
    pub name: String,
    /// The site's verifiers (its `validate` and `judge`, without `llm` criteria).
    pub judge: Option<Arc<forge_bench::judge::Judge>>,
    pub defaults: Defaults,
    pub attempts: usize,
    pub rollback_below: f64,
    pub rollback_window: usize,
}

/// `live.json`'s modification time when last read, and the version it named.
type Seen = (Option<SystemTime>, Option<u32>);

pub struct Local {
    root: PathBuf,
    state: Arc<State>,
    sites: HashMap<String, SiteModel>,
    /// Per site: `live.json` as last read.
    live: Mutex<HashMap<String, Seen>>,
    /// Per site: the last local outcomes (passed or not) of the live version.
    windows: Mutex<HashMap<String, VecDeque<bool>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the site's model was trained to read: the call's conversation without its system
/// message (as `dataset from="captures"` makes it), as one user turn.
fn conversation(body: &Value) -> Vec<(String, String)> {
    vec![("user".to_string(), forge_data::captures::student_input(body).0)]
}

impl Local {
    pub fn new(root: PathBuf, sites: Vec<SiteModel>, config: Config) -> Local {
        Local {
            root,
            state: Arc::new(State::new(Vec::new(), config)),
            sites: sites.into_iter().map(|s| (s.name.clone(), s)).collect(),
            live: Mutex::default(),
            windows: Mutex::default(),
        }
    }

    pub fn versions(&self, site: &str) -> Option<Versions> {
        self.sites.contains_key(site).then(|| Versions::of(&self.root, site))
    }

    /// The live version of a declared `site`, the registry pointed at its file.
    pub fn live(&self, site: &str) -> Option<u32> {
        let s = self.sites.get(site)?;
        let versions = Versions::of(&self.root, site);
        let mtime = std::fs::metadata(versions.live_path()).and_then(|m| m.modified()).ok();
        let mut live = lock(&self.live);
        if let Some((seen, n)) = live.get(site)
            && *seen == mtime
        {
            return *n;
        }
        let n = versions.live().ok().and_then(|l| l.version);
        if let Some(n) = n {
            let mut npc = Npc::new(site, versions.model(n));
            npc.judge = s.judge.clone();
            npc.defaults = s.defaults.clone();
            self.state.registry.replace(npc);
        }
        if live.get(site).map(|(_, old)| *old) != Some(n) {
            lock(&self.windows).remove(site);
        }
        live.insert(site.to_string(), (mtime, n));
        n
    }

    /// The live version's answer to `body`, tried up to the policy's attempts.
    pub async fn answer(&self, site: &str, version: u32, body: &Value) -> Result<Verified, String> {
        let attempts = self.sites.get(site).map_or(1, |s| s.attempts);
        // The call's own bound on its answer holds for the local model too.
        let max_tokens = body["max_completion_tokens"].as_u64().or(body["max_tokens"].as_u64()).map(|n| n as usize);
        let a = verified_answer(&self.state, site, &conversation(body), attempts, max_tokens).await;
        a.map_err(|e| format!("{site} v{version}: {e}"))
    }

    /// Records a local outcome; rolls the site back when the window's pass rate fell below the
    /// policy, and says so.
    pub fn outcome(&self, site: &str, version: u32, passed: bool) -> Option<String> {
        let s = self.sites.get(site)?;
        let rate = {
            let mut windows = lock(&self.windows);
            let w = windows.entry(site.to_string()).or_default();
            w.push_back(passed);
            while w.len() > s.rollback_window {
                w.pop_front();
            }
            if w.len() < s.rollback_window {
                return None;
            }
            w.iter().filter(|p| **p).count() as f64 / w.len() as f64
        };
        if rate >= s.rollback_below {
            return None;
        }
        let versions = Versions::of(&self.root, site);
        // Back to what was live before this version (or to the upstream).
        let before = versions.before(version);
        let reason = format!(
            "automatic rollback: v{version} passed {:.0}% of its last {} calls, below {:.0}%",
            100.0 * rate,
            s.rollback_window,
            100.0 * s.rollback_below
        );
        match versions.set_live(before, &reason) {
            Ok(_) => {
                lock(&self.windows).remove(site);
                Some(format!(
                    "{site}: {reason}; now {}",
                    before.map_or("the upstream".to_string(), |v| format!("v{v}"))
                ))
            }
            Err(e) => Some(format!("{site}: {reason}, but the switch failed: {e}")),
        }
    }

    /// Records a call answered for a declared site.
    pub fn served(&self, site: &str, version: Option<u32>, by: &str, latency_ms: u64) {
        if let Some(v) = self.versions(site) {
            let _ = v.served(&Served { at_ms: now_ms(), version, by: by.to_string(), latency_ms });
        }
    }
}
