//! Fingerprints: what an artifact's action key covers.
//!
//! An artifact is up to date when an action with the same key already ran. The key is the
//! BLAKE3 hash of [`Fingerprint`] in canonical JSON, so it changes exactly when something that
//! shapes the artifact's bytes changes.
//!
//! Tracked: the stage kind and its output format version; the parameters the stage reads
//! (only those: a stage's pool or timeout is not among them); the *content* digests of the
//! upstream artifacts (not their keys, which is what gives early cutoff); the content digests of
//! input files; forge's version; the versions of other tools that shape the output.
//!
//! Deliberately not tracked: mtimes (content is hashed; the stat cache only avoids re-hashing),
//! absolute paths (a workspace can move or be checked out elsewhere, e.g. in CI), secrets such
//! as API keys (only the *name* of their variable is a parameter), the environment a command
//! inherits (only the variables the manifest sets), and the programs a command runs from
//! `$PATH` (list a program as an input to track it).

use std::collections::BTreeMap;

use forge_cache::Digest;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::canonical;

/// Bumped when the meaning or layout of [`Fingerprint`] changes: every key changes with it.
pub const FINGERPRINT_SCHEMA: u32 = 1;

/// The version of forge that shapes every output.
pub const FORGE_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`FINGERPRINT_SCHEMA`]: which layout this is.
    pub schema: u32,
    /// forge's version: a new forge may write different bytes for the same inputs.
    pub forge: String,
    /// The stage kind (`command`, `dataset`, ...): two stages with equal parameters but
    /// different kinds must not share results.
    pub stage: String,
    /// The stage executor's output format version; bumped when its output changes shape.
    pub format: u32,
    /// The manifest parameters the stage reads, by name.
    pub params: BTreeMap<String, Value>,
    /// Upstream artifacts (`TARGET:STAGE[:VARIANT]`) → content digest.
    pub upstream: BTreeMap<String, Digest>,
    /// Input files (workspace-relative, `/`-separated) → content digest.
    pub inputs: BTreeMap<String, Digest>,
    /// Other tools whose version shapes the output (e.g. `candle-core`) → version.
    pub tools: BTreeMap<String, String>,
}

impl Fingerprint {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("fingerprints serialize")
    }

    pub fn from_json(v: &Value) -> Option<Fingerprint> {
        serde_json::from_value(v.clone()).ok()
    }

    /// The canonical serialization that [`key`](Self::key) hashes.
    pub fn canonical(&self) -> Vec<u8> {
        canonical::to_vec(&self.to_json())
    }

    /// The action key.
    pub fn key(&self) -> Digest {
        let mut h = Vec::with_capacity(512);
        h.extend_from_slice(b"forge-action\0");
        h.extend_from_slice(&self.canonical());
        Digest::of(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Fingerprint {
        Fingerprint {
            schema: FINGERPRINT_SCHEMA,
            forge: "0.1.0".into(),
            stage: "command".into(),
            format: 1,
            params: [
                ("run".to_string(), json!(["sh", "-c", "echo {out}"])),
                ("env".to_string(), json!({"B": "2", "A": "1"})),
                ("lr".to_string(), json!(2e-4)),
            ]
            .into(),
            upstream: [("t:a".to_string(), Digest::of(b"a"))].into(),
            inputs: [("data/x.txt".to_string(), Digest::of(b"x"))].into(),
            tools: BTreeMap::new(),
        }
    }

    /// Golden: changing this hash means every cached artifact of every user is rebuilt. Only
    /// update it together with FINGERPRINT_SCHEMA or a deliberate format change. The key was
    /// checked independently: `blake3.blake3(b"forge-action\0" + canonical)` in Python.
    #[test]
    fn golden_key() {
        let f = sample();
        assert_eq!(
            String::from_utf8(f.canonical()).unwrap(),
            r#"{"forge":"0.1.0","format":1,"inputs":{"data/x.txt":"3ae7d805f6789a6402acb70ad4096a85a56bf6804eaf25c0493ac697548d30b5"},"params":{"env":{"A":"1","B":"2"},"lr":0.0002,"run":["sh","-c","echo {out}"]},"schema":1,"stage":"command","tools":{},"upstream":{"t:a":"17762fddd969a453925d65717ac3eea21320b66b54342fde15128d6caf21215f"}}"#
        );
        assert_eq!(f.key().to_string(), "035362bda720dc5190887597ef3b04c083ca3e7d09eac11730c0e70ce8c75494");
    }

    #[test]
    fn map_order_does_not_change_the_key() {
        let a = sample();
        let mut b = sample();
        // The same object built in the opposite insertion order.
        let mut env = serde_json::Map::new();
        env.insert("A".into(), json!("1"));
        env.insert("B".into(), json!("2"));
        b.params.insert("env".into(), Value::Object(env));
        assert_eq!(a.key(), b.key());
        let reordered: Value = serde_json::from_str(r#"{"B":"2","A":"1"}"#).unwrap();
        b.params.insert("env".into(), reordered);
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = sample().key();
        let mut f = sample();
        f.forge = "0.2.0".into();
        assert_ne!(f.key(), base);
        let mut f = sample();
        f.format = 2;
        assert_ne!(f.key(), base);
        let mut f = sample();
        f.stage = "dataset".into();
        assert_ne!(f.key(), base);
        let mut f = sample();
        f.params.insert("lr".into(), json!(1e-4));
        assert_ne!(f.key(), base);
        let mut f = sample();
        f.upstream.insert("t:a".into(), Digest::of(b"b"));
        assert_ne!(f.key(), base);
        let mut f = sample();
        f.inputs.insert("data/y.txt".into(), Digest::of(b"y"));
        assert_ne!(f.key(), base);
        let mut f = sample();
        f.tools.insert("candle-core".into(), "0.11.1".into());
        assert_ne!(f.key(), base);
    }
}
