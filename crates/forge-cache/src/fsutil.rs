//! Filesystem helpers: atomic publication and read-only artifacts.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::CacheError;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsynced, then
/// renamed over the target. Readers see the old contents or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = path.parent().ok_or_else(|| CacheError::io(path, std::io::Error::other("no parent directory")))?;
    fs::create_dir_all(dir).map_err(|e| CacheError::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), unique()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(CacheError::io(path, e));
    }
    Ok(())
}

/// A process-unique counter for temporary names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (NEXT.fetch_add(1, Ordering::Relaxed) << 32) | t as u64
}

/// Makes every file below `dir` read-only, so a script that opens an artifact for writing by
/// mistake fails instead of silently corrupting the cache.
pub fn make_read_only(dir: &Path) -> std::io::Result<()> {
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(std::io::Error::other)?;
        if entry.file_type().is_file() {
            let mut perm = entry.metadata().map_err(std::io::Error::other)?.permissions();
            perm.set_readonly(true);
            fs::set_permissions(entry.path(), perm)?;
        }
    }
    Ok(())
}

/// Removes a directory tree, including read-only files in it. Missing is fine.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => {
            // Directories must be writable for their entries to be unlinked.
            for entry in walkdir::WalkDir::new(path).into_iter().flatten() {
                if entry.file_type().is_dir() {
                    #[allow(clippy::permissions_set_readonly_false)]
                    if let Ok(m) = entry.metadata() {
                        let mut perm = m.permissions();
                        if perm.readonly() {
                            perm.set_readonly(false);
                            let _ = fs::set_permissions(entry.path(), perm);
                        }
                    }
                }
            }
            fs::remove_dir_all(path)
        }
        Ok(_) => fs::remove_file(path),
    }
}

/// Total size in bytes of the files below `path`.
pub fn tree_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
