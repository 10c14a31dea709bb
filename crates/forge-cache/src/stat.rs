//! The stat cache: a file's digest, trusted while its metadata is unchanged.
//!
//! A no-op `forge build` must not re-hash every input and every artifact file. Each entry
//! records size, mtime, ctime and inode at the moment the file was hashed; when all four still
//! match, the recorded digest is reused. ctime catches `touch -d` and archive extraction that
//! restore an old mtime; the inode catches files replaced by rename.
//!
//! Racy entries: a file modified in the same timestamp tick as it was hashed could change again
//! without its mtime moving (git's "racily clean" problem). Entries hashed less than
//! [`RACY_WINDOW_NS`] after the file's last modification are therefore never trusted; the file
//! is simply re-hashed until it has aged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::CacheError;
use crate::codec::{DecodeError, Decoder, Encoder};
use crate::digest::{Digest, hash_file};
use crate::fsutil::write_atomic;

const MAGIC: &[u8] = b"forge-stat-v1\n";

/// Coarser than any filesystem timestamp granularity forge is likely to meet (FAT: 2 s).
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    stamp: Stamp,
    digest: Digest,
    hashed_at_ns: i64,
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
        }
    }
    #[cfg(not(unix))]
    {
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos() as i64);
        Stamp { size: meta.len(), mtime_ns: mtime.unwrap_or(0), ctime_ns: 0, ino: 0 }
    }
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Digests of files by absolute path. Shared between threads; saved once at the end of a run.
pub struct StatCache {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    entries: HashMap<PathBuf, Entry>,
    dirty: bool,
    hashed: u64,
}

impl StatCache {
    /// Loads the cache at `path`. A missing file is an empty cache; a corrupt one is reported
    /// through `warn` and replaced.
    pub fn load(path: &Path, warn: &mut dyn FnMut(String)) -> StatCache {
        let entries = match std::fs::read(path) {
            Ok(data) => match decode(&data) {
                Ok(e) => e,
                Err(err) => {
                    warn(format!("ignoring the stat cache {}: {err}", path.display()));
                    HashMap::new()
                }
            },
            Err(_) => HashMap::new(),
        };
        StatCache { path: path.to_path_buf(), inner: Mutex::new(Inner { entries, dirty: false, hashed: 0 }) }
    }

    /// The digest of the file at `path`, hashing it only when its metadata changed.
    pub fn digest(&self, path: &Path) -> std::io::Result<Digest> {
        let meta = std::fs::metadata(path)?;
        self.digest_with(path, &meta)
    }

    /// The digest recorded for `path` if its metadata still matches `meta` (outside the racy
    /// window), without reading the file.
    pub fn vouches(&self, path: &Path, meta: &std::fs::Metadata) -> Option<Digest> {
        let s = stamp(meta);
        let inner = self.lock();
        let e = inner.entries.get(path)?;
        (e.stamp == s && e.hashed_at_ns - s.mtime_ns >= RACY_WINDOW_NS).then_some(e.digest)
    }

    /// Like [`digest`](Self::digest) with metadata the caller already has.
    pub fn digest_with(&self, path: &Path, meta: &std::fs::Metadata) -> std::io::Result<Digest> {
        if let Some(d) = self.vouches(path, meta) {
            return Ok(d);
        }
        let s = stamp(meta);
        let hashed_at_ns = now_ns();
        let digest = hash_file(path)?;
        let mut inner = self.lock();
        inner.entries.insert(path.to_path_buf(), Entry { stamp: s, digest, hashed_at_ns });
        inner.dirty = true;
        inner.hashed += 1;
        Ok(digest)
    }

    /// Records a digest the caller just computed (after publishing an artifact file).
    pub fn record(&self, path: &Path, digest: Digest) -> std::io::Result<()> {
        let meta = std::fs::metadata(path)?;
        let mut inner = self.lock();
        inner.entries.insert(path.to_path_buf(), Entry { stamp: stamp(&meta), digest, hashed_at_ns: now_ns() });
        inner.dirty = true;
        Ok(())
    }

    /// Forgets a file, so that its next digest is computed from its bytes.
    pub fn forget(&self, path: &Path) {
        let mut inner = self.lock();
        if inner.entries.remove(path).is_some() {
            inner.dirty = true;
        }
    }

    /// How many files were actually hashed since loading.
    pub fn hashed(&self) -> u64 {
        self.lock().hashed
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops entries whose files no longer exist.
    pub fn prune(&self) -> usize {
        let mut inner = self.lock();
        let before = inner.entries.len();
        inner.entries.retain(|p, _| p.exists());
        let removed = before - inner.entries.len();
        inner.dirty |= removed > 0;
        removed
    }

    /// Writes the cache back if anything changed.
    pub fn save(&self) -> Result<(), CacheError> {
        let mut inner = self.lock();
        if !inner.dirty {
            return Ok(());
        }
        let mut e = Encoder::new(MAGIC);
        e.u64(inner.entries.len() as u64);
        for (path, entry) in &inner.entries {
            e.bytes(path.as_os_str().as_encoded_bytes());
            e.u64(entry.stamp.size);
            e.i64(entry.stamp.mtime_ns);
            e.i64(entry.stamp.ctime_ns);
            e.u64(entry.stamp.ino);
            e.digest(&entry.digest);
            e.i64(entry.hashed_at_ns);
        }
        write_atomic(&self.path, &e.finish())?;
        inner.dirty = false;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(unix)]
fn path_from_bytes(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

#[cfg(not(unix))]
fn path_from_bytes(b: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(b).into_owned())
}

fn decode(data: &[u8]) -> Result<HashMap<PathBuf, Entry>, DecodeError> {
    let mut d = Decoder::new(data, MAGIC)?;
    let n = d.u64()? as usize;
    let mut entries = HashMap::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let path = path_from_bytes(d.bytes()?);
        let stamp = Stamp { size: d.u64()?, mtime_ns: d.i64()?, ctime_ns: d.i64()?, ino: d.u64()? };
        let digest = d.digest()?;
        let hashed_at_ns = d.i64()?;
        entries.insert(path, Entry { stamp, digest, hashed_at_ns });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path) {
        // Pretend the file was last modified long ago, so its entry is not racy.
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options().write(true).open(path).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn reuses_digests_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "one").unwrap();
        age(&f);
        let cache_path = dir.path().join("stat");
        let c = StatCache::load(&cache_path, &mut |w| panic!("{w}"));
        let d1 = c.digest(&f).unwrap();
        assert_eq!(c.hashed(), 1);
        assert_eq!(c.digest(&f).unwrap(), d1);
        assert_eq!(c.hashed(), 1, "unchanged file is not re-hashed");
        c.save().unwrap();

        let c = StatCache::load(&cache_path, &mut |w| panic!("{w}"));
        assert_eq!(c.digest(&f).unwrap(), d1);
        assert_eq!(c.hashed(), 0, "the saved cache is reused");

        std::fs::write(&f, "two").unwrap();
        let d2 = c.digest(&f).unwrap();
        assert_ne!(d1, d2);
        assert_eq!(d2, Digest::of(b"two"));
    }

    #[test]
    fn racy_entries_are_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "one").unwrap();
        let c = StatCache::load(&dir.path().join("stat"), &mut |w| panic!("{w}"));
        c.digest(&f).unwrap();
        // Same size, and possibly the same mtime tick: must still be seen.
        std::fs::write(&f, "two").unwrap();
        assert_eq!(c.digest(&f).unwrap(), Digest::of(b"two"));
    }

    #[test]
    fn corrupt_cache_is_ignored_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stat");
        std::fs::write(&p, b"forge-stat-v1\ngarbage that is long enough to have a checksum.....").unwrap();
        let mut warnings = Vec::new();
        let c = StatCache::load(&p, &mut |w| warnings.push(w));
        assert!(c.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("checksum"), "{}", warnings[0]);
    }
}
