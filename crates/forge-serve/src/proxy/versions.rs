//! A site's promoted models, on disk in the workspace (not the cache: they are what the game is
//! served, and outlive `forge clean`):
//!
//! ```text
//! sites/SITE/v1/model.gguf      the promoted GGUF (a hard link to the artifact when it can be)
//! sites/SITE/v1/version.json    what it is: the artifact, its content digest, the decision
//! sites/SITE/live.json          which version answers now (none: the upstream), since when, why
//! sites/SITE/history.jsonl      every switch, appended
//! sites/SITE/decisions.jsonl    every promotion's grading: the candidate, the decision, the version
//! sites/SITE/served.jsonl       every call the proxy answered for the site: locally or upstream
//! ```
//!
//! A version's directory is written whole under a temporary name and renamed into place, and
//! `live.json` is replaced by a rename: a reader sees the old file or the new one, never half.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub number: u32,
    pub created_ms: u64,
    /// The artifact promoted (`TARGET:gguf:LEVEL`) and its content digest.
    pub artifact: String,
    pub content: String,
    /// The promotion decision (`forge_bench::promote::Decision`), when one was made.
    pub decision: Option<Value>,
    /// Promoted by hand past the decision.
    #[serde(default)]
    pub forced: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Live {
    /// `None`: the upstream answers.
    pub version: Option<u32>,
    pub since_ms: u64,
    pub reason: String,
}

/// One call the proxy answered for a site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Served {
    pub at_ms: u64,
    /// The live version when it came (`None`: no local model).
    pub version: Option<u32>,
    /// `local`, `fallback` (the local model failed its verifiers, the upstream answered) or
    /// `upstream`.
    pub by: String,
    pub latency_ms: u64,
}

/// One promotion's grading of a candidate (promoted or not).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    pub at_ms: u64,
    pub artifact: String,
    /// The candidate's content digest.
    pub content: String,
    /// What it was graded under: a digest of the site's judge, validate and policy (a candidate
    /// graded again under another judge is a new grading).
    pub grading: String,
    /// `forge_bench::promote::Decision`.
    pub decision: Value,
    /// The version it became, when it was promoted.
    pub version: Option<u32>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The versions of site `site` in the workspace at `root`.
#[derive(Clone, Debug)]
pub struct Versions {
    dir: PathBuf,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    forge_cache::fsutil::write_atomic(path, bytes).map_err(io::Error::other)
}

fn append_line(path: &Path, value: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(&line)
}

impl Versions {
    pub fn of(root: &Path, site: &str) -> Versions {
        Versions { dir: root.join("sites").join(site) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model(&self, number: u32) -> PathBuf {
        self.dir.join(format!("v{number}")).join("model.gguf")
    }

    pub fn live_path(&self) -> PathBuf {
        self.dir.join("live.json")
    }

    /// Every version, oldest first.
    pub fn list(&self) -> io::Result<Vec<Version>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.strip_prefix('v').is_some_and(|n| n.parse::<u32>().is_ok())
                && let Ok(text) = std::fs::read(e.path().join("version.json"))
                && let Ok(v) = serde_json::from_slice::<Version>(&text)
            {
                out.push(v);
            }
        }
        out.sort_by_key(|v| v.number);
        Ok(out)
    }

    /// Which version answers now.
    pub fn live(&self) -> io::Result<Live> {
        match std::fs::read(self.live_path()) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| io::Error::other(format!("{}: {e}", self.live_path().display())))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Live::default()),
            Err(e) => Err(e),
        }
    }

    /// Makes `version` live (`None`: the upstream), atomically, and records the switch.
    pub fn set_live(&self, version: Option<u32>, reason: &str) -> io::Result<Live> {
        if let Some(n) = version
            && !self.model(n).is_file()
        {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("site version v{n} does not exist")));
        }
        std::fs::create_dir_all(&self.dir)?;
        let live = Live { version, since_ms: now_ms(), reason: reason.to_string() };
        write_atomic(&self.live_path(), &serde_json::to_vec_pretty(&live).map_err(io::Error::other)?)?;
        append_line(&self.dir.join("history.jsonl"), &live)?;
        Ok(live)
    }

    /// What was live before `version` last became live (`None`: the upstream).
    pub fn before(&self, version: u32) -> Option<u32> {
        let history = self.history();
        let i = history.iter().rposition(|l| l.version == Some(version))?;
        history[..i].iter().rev().find(|l| l.version != Some(version)).and_then(|l| l.version)
    }

    /// Every switch, oldest first.
    pub fn history(&self) -> Vec<Live> {
        let text = std::fs::read_to_string(self.dir.join("history.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Adds `gguf` as the next version (not live yet).
    pub fn add(
        &self,
        gguf: &Path,
        artifact: &str,
        content: &str,
        decision: Option<Value>,
        forced: bool,
    ) -> io::Result<Version> {
        std::fs::create_dir_all(&self.dir)?;
        let number = self.list()?.last().map_or(1, |v| v.number + 1);
        let staging = self.dir.join(format!(".v{number}.tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging)?;
        let file = staging.join("model.gguf");
        if std::fs::hard_link(gguf, &file).is_err() {
            std::fs::copy(gguf, &file)?;
        }
        let v = Version {
            number,
            created_ms: now_ms(),
            artifact: artifact.to_string(),
            content: content.to_string(),
            decision,
            forced,
        };
        write_atomic(&staging.join("version.json"), &serde_json::to_vec_pretty(&v).map_err(io::Error::other)?)?;
        std::fs::rename(&staging, self.dir.join(format!("v{number}")))?;
        Ok(v)
    }

    /// Records a promotion's grading.
    pub fn decided(&self, d: &Decided) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        append_line(&self.dir.join("decisions.jsonl"), d)
    }

    /// Every grading recorded by [`Versions::decided`], oldest first.
    pub fn decisions(&self) -> Vec<Decided> {
        let text = std::fs::read_to_string(self.dir.join("decisions.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Records a call the proxy answered.
    pub fn served(&self, s: &Served) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        append_line(&self.dir.join("served.jsonl"), s)
    }

    /// Every call recorded by [`Versions::served`].
    pub fn served_calls(&self) -> Vec<Served> {
        let text = std::fs::read_to_string(self.dir.join("served.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}
