//! `.forge-cache/`: where forge keeps what it built.
//!
//! ```text
//! .forge-cache/
//!   CACHEDIR.TAG          tells backup tools to skip the directory
//!   lock                  held by a running build
//!   cas-v1/ab/<digest>/   content store: one read-only directory per artifact content digest
//!   ac-v1/ab/<key>.json   action cache: action key → fingerprint and content (see action.rs)
//!   state-v1.bin          last action key per artifact (see state.rs)
//!   stat-v1.bin           file digests trusted while their metadata is unchanged (stat.rs)
//!   logs-v1/              the last log of each artifact's action
//!   teacher-v1/           teacher-call cache (forge-teacher)
//!   work-v1/<key>/        progress of resumable actions (a dataset's journal), by action key
//!   manifest-v1/          the validated manifest, reused while its files are unchanged
//!   tmp/                  staging directories of running actions
//! ```
//! Buckets carry a format version: a format change bumps the suffix, and `forge cache gc`
//! removes buckets this forge does not know.

mod action;
pub mod canonical;
mod codec;
mod digest;
pub mod fsutil;
mod maintenance;
mod stat;
mod state;
mod tree;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub use action::{ACTION_SCHEMA, ActionEntry};
pub use codec::{DecodeError, Decoder, Encoder};
pub use digest::{Digest, hash_file};
pub use maintenance::{CacheListing, GcOptions, GcReport, ListedEntry, VerifyProblem, VerifyReport};
pub use stat::StatCache;
pub use state::{BuildState, StateEntry};
pub use tree::{Tree, TreeEntry, hash_tree};

/// Entries shared between machines by key — the remote cache's copy of the teacher-call cache.
/// Blocking; a store that cannot be reached answers `None` and takes nothing (it says so once
/// itself). What `get` returns is untrusted: the caller verifies it, and reports what it
/// rejects with `rejected`.
pub trait SharedStore: Send + Sync {
    fn get(&self, key: &Digest) -> Option<Vec<u8>>;
    fn put(&self, key: &Digest, data: &[u8]);
    fn rejected(&self, key: &Digest, why: &str);
}

/// The directories of the cache, each with its format version in its name: the one list of
/// them (a format change bumps a suffix here; `forge cache gc` prunes every other directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Content store: one read-only directory per artifact content digest.
    Cas,
    /// Action cache: action key → fingerprint and content.
    Ac,
    /// The last log of each artifact's action.
    Logs,
    /// Teacher-call cache (forge-teacher); kept by `forge clean` unless `--all`.
    Teacher,
    /// Progress of resumable actions, by action key.
    Work,
    /// The validated manifest, reused while its files are unchanged.
    Manifest,
    /// The latest report of each target.
    Reports,
    /// Staging directories of running actions.
    Tmp,
}

impl Bucket {
    pub const ALL: [Bucket; 8] = [
        Bucket::Cas,
        Bucket::Ac,
        Bucket::Logs,
        Bucket::Teacher,
        Bucket::Work,
        Bucket::Manifest,
        Bucket::Reports,
        Bucket::Tmp,
    ];

    /// The directory's name under the cache root.
    pub fn dir_name(self) -> &'static str {
        match self {
            Bucket::Cas => "cas-v1",
            Bucket::Ac => "ac-v1",
            Bucket::Logs => "logs-v1",
            Bucket::Teacher => "teacher-v1",
            Bucket::Work => "work-v1",
            Bucket::Manifest => "manifest-v1",
            Bucket::Reports => "reports-v1",
            Bucket::Tmp => "tmp",
        }
    }
}
/// Files this forge keeps at the cache root.
pub const ROOT_FILES: &[&str] = &["CACHEDIR.TAG", "lock", "state-v1.bin", "stat-v1.bin"];

const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by forge.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt cache entry {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("another forge process is using {} (waiting for its lock failed: {source})", path.display())]
    Locked { path: PathBuf, source: std::io::Error },
}

impl CacheError {
    pub fn io(path: &Path, source: std::io::Error) -> CacheError {
        CacheError::Io { path: path.to_path_buf(), source }
    }
}

/// Why stored content cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentProblem {
    /// A file is gone (someone deleted part of the cache, or gc ran).
    Missing { path: PathBuf },
    /// A file's bytes no longer match their digest.
    Corrupt { path: PathBuf, expected: Digest, actual: Digest },
    /// A file (or link, or directory) that is not part of the artifact was added to it.
    Extra { path: PathBuf },
}

impl std::fmt::Display for ContentProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentProblem::Missing { path } => write!(f, "{} is missing", path.display()),
            ContentProblem::Corrupt { path, expected, actual } => {
                write!(f, "{} has digest {} but {} was stored", path.display(), actual.short(), expected.short())
            }
            ContentProblem::Extra { path } => write!(f, "{} is not part of the stored artifact", path.display()),
        }
    }
}

/// An open cache directory.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

/// Held while a build writes to the cache; released on drop (or when the process dies).
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        fs::create_dir_all(root).map_err(|e| CacheError::io(root, e))?;
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            fsutil::write_atomic(&tag, CACHEDIR_TAG.as_bytes())?;
        }
        for b in Bucket::ALL {
            let dir = root.join(b.dir_name());
            if !dir.is_dir() {
                fs::create_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
            }
        }
        Ok(Cache { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn bucket(&self, b: Bucket) -> PathBuf {
        self.root.join(b.dir_name())
    }

    /// Takes the build lock, waiting for another build to finish when `wait` is set.
    pub fn lock(&self, wait: bool) -> Result<Option<CacheLock>, CacheError> {
        let path = self.root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CacheError::io(&path, e))?;
        if wait {
            file.lock().map_err(|source| CacheError::Locked { path: path.clone(), source })?;
            return Ok(Some(CacheLock { _file: file }));
        }
        match file.try_lock() {
            Ok(()) => Ok(Some(CacheLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(source)) => Err(CacheError::Locked { path, source }),
        }
    }

    pub fn stat_cache_path(&self) -> PathBuf {
        self.root.join("stat-v1.bin")
    }

    pub fn state_path(&self) -> PathBuf {
        self.root.join("state-v1.bin")
    }

    /// Where the content with this digest lives.
    pub fn cas_dir(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.bucket(Bucket::Cas).join(&hex[..2]).join(hex)
    }

    fn ac_path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.bucket(Bucket::Ac).join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The log file of an artifact's most recent action.
    pub fn log_path(&self, artifact_stem: &str) -> PathBuf {
        self.bucket(Bucket::Logs).join(format!("{artifact_stem}.log"))
    }

    /// A fresh, empty staging directory for an action's output.
    pub fn staging_dir(&self) -> Result<PathBuf, CacheError> {
        let dir = self.bucket(Bucket::Tmp).join(format!("{}-{:x}", std::process::id(), fsutil::unique()));
        fs::create_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
        Ok(dir)
    }

    /// Removes staging directories left by killed builds. Call with the lock held.
    pub fn clean_staging(&self) -> Result<(), CacheError> {
        let tmp = self.bucket(Bucket::Tmp);
        let Ok(entries) = fs::read_dir(&tmp) else { return Ok(()) };
        for entry in entries.flatten() {
            fsutil::remove_tree(&entry.path()).map_err(|e| CacheError::io(&entry.path(), e))?;
        }
        Ok(())
    }

    /// Moves a finished staging directory into the content store and returns its tree. The
    /// files become read-only; if identical content is already stored, the staging copy is
    /// dropped. Digests of the published files are recorded in `stat`.
    pub fn publish(&self, staging: &Path, stat: &StatCache) -> Result<Tree, CacheError> {
        let tree = hash_tree(staging)?;
        let dest = self.cas_dir(&tree.digest());
        if dest.is_dir() && self.check_tree(&tree, stat).is_ok() {
            fsutil::remove_tree(staging).map_err(|e| CacheError::io(staging, e))?;
            return Ok(tree);
        }
        // A damaged copy of the same content is replaced by the fresh one.
        fsutil::remove_tree(&dest).map_err(|e| CacheError::io(&dest, e))?;
        fsutil::make_read_only(staging).map_err(|e| CacheError::io(staging, e))?;
        let parent = dest.parent().expect("cas paths have a parent");
        fs::create_dir_all(parent).map_err(|e| CacheError::io(parent, e))?;
        if let Err(e) = fs::rename(staging, &dest) {
            if !dest.is_dir() {
                return Err(CacheError::io(&dest, e));
            }
            // Another action published the same content first.
            fsutil::remove_tree(staging).map_err(|e| CacheError::io(staging, e))?;
        }
        for entry in &tree.entries {
            let path = dest.join(&entry.path);
            stat.record(&path, entry.digest).map_err(|e| CacheError::io(&path, e))?;
        }
        Ok(tree)
    }

    /// Checks that the stored content of `tree` is intact: by `stat` where the stat cache
    /// vouches for a file, by re-hashing it where not.
    pub fn check_tree(&self, tree: &Tree, stat: &StatCache) -> Result<(), ContentProblem> {
        let dir = self.cas_dir(&tree.digest());
        for entry in &tree.entries {
            let path = dir.join(&entry.path);
            let meta = match fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                _ => return Err(ContentProblem::Missing { path }),
            };
            let actual = if meta.len() != entry.size {
                // The size alone proves the damage; report the real digest all the same.
                hash_file(&path).unwrap_or_default()
            } else {
                match stat.digest_with(&path, &meta) {
                    Ok(d) => d,
                    Err(_) => return Err(ContentProblem::Missing { path }),
                }
            };
            if actual != entry.digest {
                stat.forget(&path);
                return Err(ContentProblem::Corrupt { path, expected: entry.digest, actual });
            }
        }
        exact_file_set(&dir, tree)
    }

    /// Re-hashes every file of `tree` from its bytes, ignoring the stat cache.
    pub fn verify_tree(&self, tree: &Tree) -> Result<(), ContentProblem> {
        let dir = self.cas_dir(&tree.digest());
        for entry in &tree.entries {
            let path = dir.join(&entry.path);
            match hash_file(&path) {
                Err(_) => return Err(ContentProblem::Missing { path }),
                Ok(actual) if actual != entry.digest => {
                    return Err(ContentProblem::Corrupt { path, expected: entry.digest, actual });
                }
                Ok(_) => {}
            }
        }
        exact_file_set(&dir, tree)
    }

    /// Removes stored content (after it was found damaged).
    pub fn discard_content(&self, digest: &Digest) -> Result<(), CacheError> {
        let dir = self.cas_dir(digest);
        fsutil::remove_tree(&dir).map_err(|e| CacheError::io(&dir, e))
    }

    /// The action-cache entry for `key`. `Ok(None)` is a miss; `Err(Corrupt)` a damaged entry,
    /// which the caller reports and treats as a miss.
    pub fn read_action(&self, key: &Digest) -> Result<Option<ActionEntry>, CacheError> {
        let path = self.ac_path(key);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io(&path, e)),
        };
        decode_action(path, key, &data).map(Some)
    }

    /// Records an action's result. Call only after its content is published.
    pub fn write_action(&self, entry: &ActionEntry) -> Result<(), CacheError> {
        fsutil::write_atomic(&self.ac_path(&entry.key), &entry.encode())
    }

    /// Checks that the action entry for `key` is present and intact: by `stat` where the stat
    /// cache vouches for the file (a no-op build reads no entry), by reading and decoding it
    /// where not, after which `stat` vouches for it.
    pub fn check_action(&self, key: &Digest, stat: &StatCache) -> Result<(), CacheError> {
        let path = self.ac_path(key);
        let meta = fs::metadata(&path).map_err(|e| CacheError::io(&path, e))?;
        if stat.vouches(&path, &meta).is_some() {
            return Ok(());
        }
        let data = fs::read(&path).map_err(|e| CacheError::io(&path, e))?;
        decode_action(path.clone(), key, &data)?;
        stat.record(&path, Digest::of(&data)).map_err(|e| CacheError::io(&path, e))
    }

    pub fn remove_action(&self, key: &Digest) -> Result<(), CacheError> {
        let path = self.ac_path(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CacheError::io(&path, e)),
            _ => Ok(()),
        }
    }

    /// Every action-cache entry's key, in no particular order.
    pub fn action_keys(&self) -> Vec<Digest> {
        let mut keys = Vec::new();
        for shard in fs::read_dir(self.bucket(Bucket::Ac)).into_iter().flatten().flatten() {
            for file in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let name = file.file_name();
                let name = name.to_string_lossy();
                if let Some(k) = name.strip_suffix(".json").and_then(|h| h.parse().ok()) {
                    keys.push(k);
                }
            }
        }
        keys
    }

    pub fn load_state(&self, warn: &mut dyn FnMut(String)) -> BuildState {
        BuildState::load(&self.state_path(), warn)
    }

    pub fn save_state(&self, state: &BuildState) -> Result<(), CacheError> {
        state.save(&self.state_path())
    }
}

/// The action entry stored at `path` for `key`: damaged if it does not decode or holds another key.
fn decode_action(path: PathBuf, key: &Digest, data: &[u8]) -> Result<ActionEntry, CacheError> {
    match ActionEntry::decode(data) {
        Ok(entry) if entry.key == *key => Ok(entry),
        Ok(entry) => Err(CacheError::Corrupt { path, reason: format!("it holds key {}", entry.key.short()) }),
        Err(reason) => Err(CacheError::Corrupt { path, reason }),
    }
}

/// The stored directory holds exactly the tree's files: nothing added beside them.
fn exact_file_set(dir: &Path, tree: &Tree) -> Result<(), ContentProblem> {
    let expected: std::collections::HashSet<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
    let mut files = 0usize;
    for entry in walkdir::WalkDir::new(dir).min_depth(1).follow_links(false) {
        let Ok(entry) = entry else {
            return Err(ContentProblem::Missing { path: dir.to_path_buf() });
        };
        let rel = entry.path().strip_prefix(dir).map(tree::slash_path).unwrap_or_default();
        let kind = entry.file_type();
        if kind.is_dir() {
            // Directories are implied by the files below them; an empty one is harmless.
            continue;
        }
        if !kind.is_file() || !expected.contains(rel.as_str()) {
            return Err(ContentProblem::Extra { path: entry.path().to_path_buf() });
        }
        files += 1;
    }
    if files < expected.len() {
        return Err(ContentProblem::Missing { path: dir.to_path_buf() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, Cache, StatCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join(".forge-cache")).unwrap();
        let stat = StatCache::load(&cache.stat_cache_path(), &mut |w| panic!("{w}"));
        (dir, cache, stat)
    }

    fn entry(key: Digest, tree: Tree) -> ActionEntry {
        ActionEntry {
            schema: ACTION_SCHEMA,
            artifact: "t:s".into(),
            key,
            fingerprint: serde_json::json!({"a": 1}),
            tree,
            created_unix_ms: 0,
            duration_ms: 0,
        }
    }

    #[test]
    fn layout_has_tag_and_buckets() {
        let (_d, cache, _) = cache();
        assert!(fs::read_to_string(cache.root().join("CACHEDIR.TAG")).unwrap().starts_with("Signature: 8a477f59"));
        for b in Bucket::ALL {
            assert!(cache.bucket(b).is_dir());
            assert_eq!(Bucket::ALL.iter().filter(|o| o.dir_name() == b.dir_name()).count(), 1);
        }
    }

    #[test]
    fn publish_is_content_addressed_and_read_only() {
        let (_d, cache, stat) = cache();
        let s = cache.staging_dir().unwrap();
        fs::write(s.join("a.txt"), "hello").unwrap();
        let tree = cache.publish(&s, &stat).unwrap();
        let dest = cache.cas_dir(&tree.digest());
        assert_eq!(fs::read_to_string(dest.join("a.txt")).unwrap(), "hello");
        assert!(fs::metadata(dest.join("a.txt")).unwrap().permissions().readonly());
        assert!(!s.exists());
        // Same content again: deduplicated.
        let s2 = cache.staging_dir().unwrap();
        fs::write(s2.join("a.txt"), "hello").unwrap();
        assert_eq!(cache.publish(&s2, &stat).unwrap(), tree);
        assert!(cache.check_tree(&tree, &stat).is_ok());
    }

    #[test]
    fn detects_corrupt_and_missing_content() {
        let (_d, cache, stat) = cache();
        let s = cache.staging_dir().unwrap();
        fs::write(s.join("a.txt"), "hello").unwrap();
        let tree = cache.publish(&s, &stat).unwrap();
        let file = cache.cas_dir(&tree.digest()).join("a.txt");
        let mut perm = fs::metadata(&file).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        fs::set_permissions(&file, perm).unwrap();
        fs::write(&file, "jello").unwrap();
        assert!(matches!(cache.check_tree(&tree, &stat), Err(ContentProblem::Corrupt { .. })));
        assert!(matches!(cache.verify_tree(&tree), Err(ContentProblem::Corrupt { .. })));
        cache.discard_content(&tree.digest()).unwrap();
        assert!(matches!(cache.check_tree(&tree, &stat), Err(ContentProblem::Missing { .. })));
    }

    fn writable(dir: &Path) {
        for e in walkdir::WalkDir::new(dir) {
            let e = e.unwrap();
            let mut perm = fs::metadata(e.path()).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            fs::set_permissions(e.path(), perm).unwrap();
        }
    }

    /// Hostile testing: a file added to a stored artifact was never detected (`cache verify`
    /// found 0 problems) and the build used the artifact with it.
    #[test]
    fn an_extra_file_in_a_stored_artifact_is_detected() {
        let (_d, cache, stat) = cache();
        let s = cache.staging_dir().unwrap();
        fs::create_dir(s.join("sub")).unwrap();
        fs::write(s.join("sub/a.txt"), "hello").unwrap();
        let tree = cache.publish(&s, &stat).unwrap();
        let dir = cache.cas_dir(&tree.digest());
        writable(&dir);
        // An empty directory changes nothing the digest covers.
        fs::create_dir(dir.join("empty")).unwrap();
        assert!(cache.check_tree(&tree, &stat).is_ok());
        for extra in ["extra.bin", "sub/extra.bin"] {
            fs::write(dir.join(extra), "x").unwrap();
            assert_eq!(cache.check_tree(&tree, &stat), Err(ContentProblem::Extra { path: dir.join(extra) }));
            assert_eq!(cache.verify_tree(&tree), Err(ContentProblem::Extra { path: dir.join(extra) }));
            fs::remove_file(dir.join(extra)).unwrap();
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("sub/a.txt", dir.join("link")).unwrap();
            assert!(matches!(cache.check_tree(&tree, &stat), Err(ContentProblem::Extra { .. })));
        }
    }

    /// Hostile testing: a damaged action entry for the current key went unnoticed by `build`
    /// (the fresh path trusted the state file), so a successful build left a cache that failed
    /// `verify`.
    #[test]
    fn check_action_notices_a_damaged_or_missing_entry_and_trusts_an_intact_one() {
        let (_d, cache, stat) = cache();
        let key = Digest::of(b"key");
        assert!(matches!(cache.check_action(&key, &stat), Err(CacheError::Io { .. })));
        cache.write_action(&entry(key, Tree::default())).unwrap();
        cache.check_action(&key, &stat).unwrap();
        let path = cache.ac_path(&key);
        let mut data = fs::read(&path).unwrap();
        data[10] ^= 0x01;
        fs::write(&path, &data).unwrap();
        assert!(matches!(cache.check_action(&key, &stat), Err(CacheError::Corrupt { .. })));
        // An entry stored under another key's name is damage too.
        let other = Digest::of(b"other");
        cache.write_action(&entry(other, Tree::default())).unwrap();
        fs::copy(cache.ac_path(&other), &path).unwrap();
        assert!(matches!(cache.check_action(&key, &stat), Err(CacheError::Corrupt { .. })));
    }

    #[test]
    fn action_entries_round_trip_and_corruption_is_reported() {
        let (_d, cache, _) = cache();
        let key = Digest::of(b"key");
        assert!(cache.read_action(&key).unwrap().is_none());
        cache.write_action(&entry(key, Tree::default())).unwrap();
        let e = cache.read_action(&key).unwrap().unwrap();
        assert_eq!(e.fingerprint, serde_json::json!({"a": 1}));
        assert_eq!(cache.action_keys(), vec![key]);
        let path = cache.ac_path(&key);
        let mut data = fs::read(&path).unwrap();
        let n = data.len();
        data[n - 3] ^= 0x20;
        fs::write(&path, data).unwrap();
        match cache.read_action(&key) {
            Err(CacheError::Corrupt { reason, .. }) => assert!(reason.contains("checksum"), "{reason}"),
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn state_round_trips() {
        let (_d, cache, stat) = cache();
        let s = cache.staging_dir().unwrap();
        fs::write(s.join("a.txt"), "hello").unwrap();
        let tree = cache.publish(&s, &stat).unwrap();
        let mut state = BuildState::default();
        state.artifacts.insert("t:s".into(), StateEntry { key: Digest::of(b"k"), tree });
        cache.save_state(&state).unwrap();
        let loaded = cache.load_state(&mut |w| panic!("{w}"));
        assert_eq!(loaded.artifacts, state.artifacts);
    }

    #[test]
    fn the_lock_excludes_a_second_holder() {
        let (_d, cache, _) = cache();
        let held = cache.lock(false).unwrap();
        assert!(held.is_some());
        assert!(cache.lock(false).unwrap().is_none());
        drop(held);
        assert!(cache.lock(false).unwrap().is_some());
    }
}
