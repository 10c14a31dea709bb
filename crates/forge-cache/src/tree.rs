//! Artifact trees: the content of an artifact directory, and its digest.
//!
//! An artifact is a directory of regular files. Its content digest covers each file's relative
//! path, executable bit and content, in path order; it deliberately ignores mtimes, owners and
//! empty directories, so that rebuilding the same bytes yields the same digest (which is what
//! makes early cutoff work).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::CacheError;
use crate::codec::{DecodeError, Decoder, Encoder};
use crate::digest::{Digest, hash_file};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Path relative to the artifact root, `/`-separated.
    pub path: String,
    pub size: u64,
    pub digest: Digest,
    pub executable: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Sorted by path.
    pub entries: Vec<TreeEntry>,
}

impl Tree {
    /// The artifact's content digest.
    pub fn digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"forge-tree-v1\0");
        for e in &self.entries {
            h.update(&(e.path.len() as u64).to_le_bytes());
            h.update(e.path.as_bytes());
            h.update(&[e.executable as u8]);
            h.update(&e.size.to_le_bytes());
            h.update(&e.digest.0);
        }
        h.finalize().into()
    }

    pub fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    pub(crate) fn encode(&self, e: &mut Encoder) {
        e.u64(self.entries.len() as u64);
        for t in &self.entries {
            e.str(&t.path);
            e.u64(t.size);
            e.digest(&t.digest);
            e.bool(t.executable);
        }
    }

    pub(crate) fn decode(d: &mut Decoder<'_>) -> Result<Tree, DecodeError> {
        let n = d.u64()? as usize;
        let mut entries = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            entries.push(TreeEntry {
                path: d.str()?.to_string(),
                size: d.u64()?,
                digest: d.digest()?,
                executable: d.bool()?,
            });
        }
        Ok(Tree { entries })
    }
}

#[cfg(unix)]
fn is_executable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_: &std::fs::Metadata) -> bool {
    false
}

/// A relative path as a tree names it: components joined by `/`.
pub(crate) fn slash_path(rel: &Path) -> String {
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Hashes every file below `dir`. Symbolic links are refused: an artifact must hold its bytes.
pub fn hash_tree(dir: &Path) -> Result<Tree, CacheError> {
    let mut entries = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(|e| CacheError::io(dir, std::io::Error::other(e)))?;
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        let rel = slash_path(entry.path().strip_prefix(dir).unwrap_or(entry.path()));
        if !ft.is_file() {
            return Err(CacheError::Invalid {
                path: entry.path().to_path_buf(),
                reason: format!("`{rel}` is not a regular file (symbolic links and special files cannot be artifacts)"),
            });
        }
        let meta = entry.metadata().map_err(|e| CacheError::io(entry.path(), std::io::Error::other(e)))?;
        let digest = hash_file(entry.path()).map_err(|e| CacheError::io(entry.path(), e))?;
        entries.push(TreeEntry { path: rel, size: meta.len(), digest, executable: is_executable(&meta) });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Tree { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_content_and_names_not_mtimes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
            std::fs::write(d.join("sub/x.txt"), "x").unwrap();
            std::fs::write(d.join("y.txt"), "y").unwrap();
        }
        let ta = hash_tree(a.path()).unwrap();
        assert_eq!(ta.entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["sub/x.txt", "y.txt"]);
        assert_eq!(ta.digest(), hash_tree(b.path()).unwrap().digest());
        std::fs::write(b.path().join("y.txt"), "z").unwrap();
        assert_ne!(ta.digest(), hash_tree(b.path()).unwrap().digest());
        std::fs::rename(b.path().join("y.txt"), b.path().join("w.txt")).unwrap();
        std::fs::write(b.path().join("w.txt"), "y").unwrap();
        assert_ne!(ta.digest(), hash_tree(b.path()).unwrap().digest());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_symlinks() {
        let a = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/hostname", a.path().join("link")).unwrap();
        assert!(matches!(hash_tree(a.path()), Err(CacheError::Invalid { .. })));
    }
}
