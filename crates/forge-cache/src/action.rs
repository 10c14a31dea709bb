//! The action cache: what building an artifact with a given action key produced.
//!
//! An entry is written only after the artifact's content is published to the content store,
//! so an entry never points at half-written content; a build killed before that point leaves
//! no entry and the action simply runs again. Each entry starts with a checksum line over the
//! JSON body, so a damaged entry is recognised as corrupt rather than misread.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::tree::Tree;

/// Bumped when the entry format changes; the bucket name carries it (`ac-v1`).
pub const ACTION_SCHEMA: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionEntry {
    pub schema: u32,
    /// `TARGET:STAGE[:VARIANT]` that was built.
    pub artifact: String,
    /// blake3 of the canonical fingerprint.
    pub key: Digest,
    /// The fingerprint itself, so `forge why` can show what changed.
    pub fingerprint: serde_json::Value,
    /// The artifact's files; their combined digest is the content digest.
    pub tree: Tree,
    pub created_unix_ms: u64,
    pub duration_ms: u64,
}

impl ActionEntry {
    pub fn content_digest(&self) -> Digest {
        self.tree.digest()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("action entries serialize");
        let mut out = format!("{}\n", Digest::of(&body)).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    pub(crate) fn decode(data: &[u8]) -> Result<ActionEntry, String> {
        let nl = data.iter().position(|b| *b == b'\n').ok_or("no checksum line")?;
        let sum: Digest = std::str::from_utf8(&data[..nl])
            .map_err(|_| "bad checksum line")?
            .parse()
            .map_err(|_| "bad checksum line".to_string())?;
        let body = &data[nl + 1..];
        if Digest::of(body) != sum {
            return Err("checksum mismatch".to_string());
        }
        let entry: ActionEntry = serde_json::from_slice(body).map_err(|e| format!("invalid entry: {e}"))?;
        if entry.schema != ACTION_SCHEMA {
            return Err(format!("entry schema {} (expected {ACTION_SCHEMA})", entry.schema));
        }
        Ok(entry)
    }
}
