//! A workspace: its root, its validated manifest, its cache and its plan.
//!
//! Parsing KDL is the slowest part of a no-op build for large manifests, so the validated
//! manifest is kept in the cache (`manifest-v1/`) together with the digests of the files it was
//! read from and what each `include` pattern matched. While those are unchanged (checked with
//! the stat cache, and by expanding the patterns again), the stored manifest is used as is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use forge_cache::{Cache, CacheError, Digest, StatCache};
use forge_manifest::{Manifest, ManifestErrors, glob};
use serde::{Deserialize, Serialize};

use crate::executor::Registry;
use crate::fingerprint::FORGE_VERSION;
use crate::plan::Plan;

pub const MANIFEST_FILE: &str = "forge.kdl";
pub const DEFAULT_CACHE_DIR: &str = ".forge-cache";

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("no {MANIFEST_FILE} in {} or any parent directory", .0.display())]
    NotFound(PathBuf),
    #[error(transparent)]
    Manifest(#[from] ManifestErrors),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl WorkspaceError {
    pub fn manifest_errors(&self) -> Option<&ManifestErrors> {
        match self {
            WorkspaceError::Manifest(m) => Some(m),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct LoadOptions {
    /// Where the cache lives (default `<root>/.forge-cache`).
    pub cache_dir: Option<PathBuf>,
    pub registry: Registry,
    /// Reuse the validated manifest while its files are unchanged.
    pub config_cache: bool,
    /// The version recorded in fingerprints (tests pretend to be another forge).
    pub forge_version: String,
    /// A remote cache to fetch from and upload to (the command line's, else the manifest's
    /// `workspace { cache remote=... }` is used by the caller).
    pub remote: Option<crate::RemoteConfig>,
    /// Never upload to the remote cache, whichever it is.
    pub remote_read_only: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            cache_dir: None,
            registry: Registry::with_builtin(),
            config_cache: true,
            forge_version: FORGE_VERSION.to_string(),
            remote: None,
            remote_read_only: false,
        }
    }
}

pub struct Workspace {
    pub root: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
    pub cache: Cache,
    pub stat: StatCache,
    pub plan: Plan,
    pub forge_version: String,
    /// Whether the manifest came from the configuration cache.
    pub manifest_cached: bool,
    /// Problems that did not stop loading (an ignored corrupt cache file, ...).
    pub warnings: Vec<String>,
    /// The remote cache, if one is configured.
    pub remote: Option<Arc<crate::Remote>>,
    /// Whether the remote cache holds the teacher-call cache too (`cache teacher-calls=`).
    pub share_teacher_calls: bool,
}

/// Finds the manifest: `path` itself if it is a file, else `forge.kdl` in `path` or the
/// nearest parent directory that has one.
pub fn find_manifest(path: &Path) -> Result<PathBuf, WorkspaceError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let start = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut dir = Some(start.as_path());
    while let Some(d) = dir {
        let candidate = d.join(MANIFEST_FILE);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(WorkspaceError::NotFound(start))
}

#[derive(Serialize, Deserialize)]
struct ConfigCache {
    forge: String,
    files: Vec<(String, Digest)>,
    manifest: Manifest,
}

impl Workspace {
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Workspace, WorkspaceError> {
        let manifest_path = std::path::absolute(find_manifest(path)?).map_err(|e| CacheError::io(path, e))?;
        let root = manifest_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| root.join(DEFAULT_CACHE_DIR));
        let cache = Cache::open(&cache_dir)?;
        let mut warnings = Vec::new();
        let stat = StatCache::load(&cache.stat_cache_path(), &mut |w| warnings.push(w));
        let cache_file = cache.bucket(forge_cache::Bucket::Manifest).join("manifest.json");

        let cached = if opts.config_cache { read_config_cache(&cache_file, &root, &stat) } else { None };
        let manifest_cached = cached.is_some();
        let manifest = match cached {
            Some(m) => m,
            None => {
                let m = forge_manifest::load(&manifest_path)?;
                if opts.config_cache
                    && let Err(e) = write_config_cache(&cache_file, &root, &stat, &m)
                {
                    warnings.push(format!("could not store the validated manifest: {e}"));
                }
                m
            }
        };
        let plan = Plan::new(&manifest, &opts.registry);
        let remote = opts.remote.clone().or_else(|| {
            manifest.workspace.cache.as_ref().map(|c| crate::RemoteConfig {
                url: c.url.value.clone(),
                read_only: c.read_only,
                token: c.token_env.as_ref().and_then(|v| std::env::var(v).ok()).filter(|t| !t.is_empty()),
                timeout: crate::remote::DEFAULT_TIMEOUT,
            })
        });
        let remote = remote.map(|r| crate::RemoteConfig { read_only: r.read_only || opts.remote_read_only, ..r });
        let remote = match remote.map(crate::Remote::new) {
            Some(Ok(r)) => Some(Arc::new(r)),
            Some(Err(e)) => {
                warnings.push(e);
                None
            }
            None => None,
        };
        let share_teacher_calls = manifest.workspace.cache.as_ref().is_none_or(|c| c.teacher_calls);
        Ok(Workspace {
            root,
            manifest_path,
            manifest,
            cache,
            stat,
            plan,
            forge_version: opts.forge_version,
            manifest_cached,
            warnings,
            share_teacher_calls,
            remote,
        })
    }

    /// The remote cache's copy of the teacher-call cache, when answers are shared.
    pub fn shared_calls(&self) -> Option<Arc<dyn forge_cache::SharedStore>> {
        let remote = self.remote.clone().filter(|_| self.share_teacher_calls)?;
        Some(remote)
    }

    /// Saves the stat cache (what was hashed while this workspace was in use).
    pub fn save_stat_cache(&self) -> Result<(), CacheError> {
        self.stat.save()
    }
}

fn read_config_cache(path: &Path, root: &Path, stat: &StatCache) -> Option<Manifest> {
    let data = std::fs::read(path).ok()?;
    let cached: ConfigCache = serde_json::from_slice(&data).ok()?;
    if cached.forge != FORGE_VERSION {
        return None;
    }
    for (name, digest) in &cached.files {
        if stat.digest(&root.join(name)).ok()? != *digest {
            return None;
        }
    }
    for inc in &cached.manifest.includes {
        let pattern = glob::normalize(&inc.dir, &inc.pattern).ok()?;
        if glob::expand(root, &pattern).ok()? != inc.matched {
            return None;
        }
    }
    Some(cached.manifest)
}

fn write_config_cache(path: &Path, root: &Path, stat: &StatCache, m: &Manifest) -> Result<(), CacheError> {
    let mut files = Vec::new();
    for name in &m.files {
        let p = root.join(name);
        files.push((name.clone(), stat.digest(&p).map_err(|e| CacheError::io(&p, e))?));
    }
    let cached = ConfigCache { forge: FORGE_VERSION.to_string(), files, manifest: m.clone() };
    let bytes = serde_json::to_vec(&cached).map_err(|e| CacheError::io(path, std::io::Error::other(e)))?;
    forge_cache::fsutil::write_atomic(path, &bytes)
}
