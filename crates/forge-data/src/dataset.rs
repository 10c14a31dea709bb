//! The dataset artifact: `train.jsonl`, `eval.jsonl` and `meta.json`.

use std::collections::BTreeMap;
use std::path::Path;

use forge_teacher::Usage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bumped when the files below change shape.
pub const DATASET_FORMAT: u32 = 1;

/// One training pair and how it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Stable across runs: `s` + the sample index.
    pub id: String,
    pub index: u64,
    /// Which attempt at this sample was accepted.
    pub repeat: u32,
    /// What the student model sees.
    pub input: String,
    /// The teacher's system message and prompt.
    pub system: Option<String>,
    pub prompt: String,
    /// The teacher's answer: the training target.
    pub output: String,
    /// Every recipe node's value (entry names, text or JSON).
    pub values: BTreeMap<String, Value>,
    /// Tokens used by the calls that produced this sample, per node.
    pub usage: BTreeMap<String, Usage>,
}

pub fn sample_id(index: u64) -> String {
    format!("s{index:06}")
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub recipe: String,
    pub teacher: String,
    pub seed: u64,
    pub samples: u32,
    pub train: u32,
    pub eval: u32,
    pub split_by: Option<String>,
    /// Sample indices tried to get `samples` accepted ones.
    pub candidates: u64,
    /// Rejected answers by reason (`max-chars`, `dedup`, `backstory:min-words`, ...).
    pub rejected: BTreeMap<String, u64>,
    /// Samples given up after all their attempts.
    pub abandoned: u64,
    /// Tokens used per node, rejected attempts included.
    pub usage: BTreeMap<String, Usage>,
    /// Of `usage`, the tokens of candidates that were rejected (paid for and thrown away).
    #[serde(default)]
    pub wasted: BTreeMap<String, Usage>,
    /// Eval samples per stratum, when split by a node.
    pub strata: BTreeMap<String, (u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Parse { path: String, line: usize, message: String },
}

/// Reads a JSONL file of samples.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>, ReadError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ReadError::Io { path: path.display().to_string(), source: e })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| ReadError::Parse {
                path: path.display().to_string(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

pub fn read_meta(dir: &Path) -> Result<Meta, ReadError> {
    let path = dir.join("meta.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| ReadError::Io { path: path.display().to_string(), source: e })?;
    serde_json::from_str(&text).map_err(|e| ReadError::Parse {
        path: path.display().to_string(),
        line: 1,
        message: e.to_string(),
    })
}

/// Writes samples as JSON lines, in index order.
pub fn write_samples(path: &Path, samples: &[&Sample]) -> std::io::Result<()> {
    let mut out = String::new();
    for s in samples {
        out.push_str(&serde_json::to_string(s).map_err(std::io::Error::other)?);
        out.push('\n');
    }
    std::fs::write(path, out)
}
