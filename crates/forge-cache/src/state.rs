//! The build state: for each artifact, the action key it was last built with.
//!
//! This is an index over the action cache, read on every build: a no-op compares each
//! artifact's current action key with the recorded one and checks the content by `stat`,
//! without opening one action-cache entry. It is only an accelerator: when it is missing, stale
//! or corrupt, the action cache answers (more slowly) and the state is rewritten.

use std::collections::BTreeMap;
use std::path::Path;

use crate::CacheError;
use crate::codec::{DecodeError, Decoder, Encoder};
use crate::digest::Digest;
use crate::fsutil::write_atomic;
use crate::tree::Tree;

const MAGIC: &[u8] = b"forge-state-v1\n";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateEntry {
    pub key: Digest,
    pub tree: Tree,
}

#[derive(Clone, Debug, Default)]
pub struct BuildState {
    pub artifacts: BTreeMap<String, StateEntry>,
}

impl BuildState {
    pub fn load(path: &Path, warn: &mut dyn FnMut(String)) -> BuildState {
        let Ok(data) = std::fs::read(path) else { return BuildState::default() };
        match decode(&data) {
            Ok(s) => s,
            Err(e) => {
                warn(format!("ignoring the build state {}: {e}", path.display()));
                BuildState::default()
            }
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), CacheError> {
        let mut e = Encoder::new(MAGIC);
        e.u64(self.artifacts.len() as u64);
        for (name, entry) in &self.artifacts {
            e.str(name);
            e.digest(&entry.key);
            entry.tree.encode(&mut e);
        }
        write_atomic(path, &e.finish())
    }
}

fn decode(data: &[u8]) -> Result<BuildState, DecodeError> {
    let mut d = Decoder::new(data, MAGIC)?;
    let n = d.u64()? as usize;
    let mut artifacts = BTreeMap::new();
    for _ in 0..n {
        let name = d.str()?.to_string();
        let key = d.digest()?;
        let tree = Tree::decode(&mut d)?;
        artifacts.insert(name, StateEntry { key, tree });
    }
    Ok(BuildState { artifacts })
}
