//! `forge cache ls | gc | verify`.

use std::collections::HashSet;
use std::fs;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::{Bucket, Cache, CacheError, ContentProblem, Digest, ROOT_FILES, fsutil};

#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Action-cache entries not in use are kept this long after they were written.
    pub max_age: Duration,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub actions_removed: usize,
    pub actions_kept: usize,
    pub contents_removed: usize,
    pub bytes_freed: u64,
    /// Buckets and files of other forge versions (or strangers) that were removed.
    pub unknown_removed: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListedEntry {
    pub artifact: String,
    pub key: Digest,
    pub content: Digest,
    pub files: usize,
    pub bytes: u64,
    pub created_unix_ms: u64,
    /// The artifact's current build (what `forge artifact path` answers).
    pub current: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CacheListing {
    pub entries: Vec<ListedEntry>,
    /// Action-cache entries that could not be read.
    pub corrupt: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyProblem {
    pub artifact: Option<String>,
    pub key: Option<Digest>,
    pub problem: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub actions_checked: usize,
    pub files_checked: usize,
    pub bytes_checked: u64,
    pub problems: Vec<VerifyProblem>,
    /// Whether the damaged entries were removed (`--repair`).
    pub repaired: bool,
}

fn age(path: &std::path::Path) -> Duration {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

impl Cache {
    /// Lists the action cache. `current` holds the keys of the artifacts' current builds.
    pub fn list(&self, current: &HashSet<Digest>) -> CacheListing {
        let mut listing = CacheListing::default();
        for key in self.action_keys() {
            match self.read_action(&key) {
                Ok(Some(e)) => listing.entries.push(ListedEntry {
                    artifact: e.artifact.clone(),
                    key,
                    content: e.content_digest(),
                    files: e.tree.entries.len(),
                    bytes: e.tree.size(),
                    created_unix_ms: e.created_unix_ms,
                    current: current.contains(&key),
                }),
                Ok(None) => {}
                Err(err) => listing.corrupt.push(err.to_string()),
            }
        }
        listing.entries.sort_by(|a, b| (&a.artifact, b.created_unix_ms).cmp(&(&b.artifact, a.created_unix_ms)));
        listing
    }

    /// Removes what is neither in `keep` nor recent, and everything this forge does not know.
    /// Call with the build lock held.
    pub fn gc(&self, keep: &HashSet<Digest>, opts: &GcOptions) -> Result<GcReport, CacheError> {
        let mut report = GcReport::default();
        for entry in fs::read_dir(self.root()).map_err(|e| CacheError::io(self.root(), e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let known = Bucket::ALL.iter().any(|b| b.dir_name() == name)
                || ROOT_FILES.contains(&name.as_str())
                || name.starts_with('.');
            if !known {
                report.bytes_freed += fsutil::tree_size(&entry.path());
                report.unknown_removed.push(name);
                if !opts.dry_run {
                    fsutil::remove_tree(&entry.path()).map_err(|e| CacheError::io(&entry.path(), e))?;
                }
            }
        }
        if !opts.dry_run {
            self.clean_staging()?;
        }
        let mut live_content: HashSet<Digest> = HashSet::new();
        for key in self.action_keys() {
            let path = self.ac_path(&key);
            let entry = self.read_action(&key);
            let keep_it = match &entry {
                Ok(Some(_)) => keep.contains(&key) || age(&path) < opts.max_age,
                _ => false,
            };
            if keep_it {
                if let Ok(Some(e)) = entry {
                    live_content.insert(e.content_digest());
                }
                report.actions_kept += 1;
            } else {
                report.actions_removed += 1;
                if !opts.dry_run {
                    self.remove_action(&key)?;
                }
            }
        }
        for shard in fs::read_dir(self.bucket(Bucket::Cas)).into_iter().flatten().flatten() {
            for object in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let digest: Option<Digest> = object.file_name().to_string_lossy().parse().ok();
                if digest.is_some_and(|d| live_content.contains(&d)) {
                    continue;
                }
                report.contents_removed += 1;
                report.bytes_freed += fsutil::tree_size(&object.path());
                if !opts.dry_run {
                    fsutil::remove_tree(&object.path()).map_err(|e| CacheError::io(&object.path(), e))?;
                }
            }
        }
        Ok(report)
    }

    /// Re-hashes every stored artifact. With `repair`, damaged entries and content are removed
    /// so that the next build rebuilds them.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport { repaired: repair, ..VerifyReport::default() };
        for key in self.action_keys() {
            report.actions_checked += 1;
            let entry = match self.read_action(&key) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => {
                    report.problems.push(VerifyProblem { artifact: None, key: Some(key), problem: e.to_string() });
                    if repair {
                        self.remove_action(&key)?;
                    }
                    continue;
                }
            };
            report.files_checked += entry.tree.entries.len();
            report.bytes_checked += entry.tree.size();
            if let Err(p) = self.verify_tree(&entry.tree) {
                let problem = match &p {
                    ContentProblem::Missing { .. } => format!("content missing: {p}"),
                    ContentProblem::Corrupt { .. } => format!("content corrupt: {p}"),
                    ContentProblem::Extra { .. } => format!("content altered: {p}"),
                };
                report.problems.push(VerifyProblem { artifact: Some(entry.artifact.clone()), key: Some(key), problem });
                if repair {
                    self.remove_action(&key)?;
                    self.discard_content(&entry.content_digest())?;
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ACTION_SCHEMA, ActionEntry, StatCache};

    fn build(cache: &Cache, stat: &StatCache, name: &str, content: &str) -> ActionEntry {
        let s = cache.staging_dir().unwrap();
        fs::write(s.join("out.txt"), content).unwrap();
        let tree = cache.publish(&s, stat).unwrap();
        let e = ActionEntry {
            schema: ACTION_SCHEMA,
            artifact: name.into(),
            key: Digest::of(format!("{name}{content}").as_bytes()),
            fingerprint: serde_json::json!({}),
            tree,
            created_unix_ms: 1,
            duration_ms: 1,
        };
        cache.write_action(&e).unwrap();
        e
    }

    #[test]
    fn gc_keeps_live_entries_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let stat = StatCache::load(&cache.stat_cache_path(), &mut |_| {});
        let live = build(&cache, &stat, "t:a", "one");
        let dead = build(&cache, &stat, "t:a", "two");
        fs::create_dir_all(dir.path().join("cas-v0/xx")).unwrap();
        let keep: HashSet<Digest> = [live.key].into();
        let opts = GcOptions { max_age: Duration::ZERO, dry_run: true };
        let dry = cache.gc(&keep, &opts).unwrap();
        assert_eq!((dry.actions_removed, dry.contents_removed), (1, 1));
        assert!(cache.read_action(&dead.key).unwrap().is_some(), "a dry run removes nothing");
        let report = cache.gc(&keep, &GcOptions { dry_run: false, ..opts }).unwrap();
        assert_eq!(report.actions_removed, 1);
        assert_eq!(report.contents_removed, 1);
        assert_eq!(report.unknown_removed, vec!["cas-v0".to_string()]);
        assert!(cache.read_action(&dead.key).unwrap().is_none());
        assert!(!cache.cas_dir(&dead.content_digest()).exists());
        assert!(cache.verify_tree(&live.tree).is_ok());
        // Recent entries survive even when not live.
        let recent = build(&cache, &stat, "t:b", "three");
        cache.gc(&keep, &GcOptions { max_age: Duration::from_secs(3600), dry_run: false }).unwrap();
        assert!(cache.read_action(&recent.key).unwrap().is_some());
    }

    #[test]
    fn verify_finds_and_repairs_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let stat = StatCache::load(&cache.stat_cache_path(), &mut |_| {});
        let good = build(&cache, &stat, "t:a", "one");
        let bad = build(&cache, &stat, "t:b", "two");
        let file = cache.cas_dir(&bad.content_digest()).join("out.txt");
        fsutil::remove_tree(&file).unwrap();
        fs::write(&file, "TWO").unwrap();
        let report = cache.verify(false).unwrap();
        assert_eq!(report.actions_checked, 2);
        assert_eq!(report.problems.len(), 1);
        assert_eq!(report.problems[0].artifact.as_deref(), Some("t:b"));
        assert!(report.problems[0].problem.contains("corrupt"), "{}", report.problems[0].problem);
        cache.verify(true).unwrap();
        assert!(cache.read_action(&bad.key).unwrap().is_none());
        assert!(cache.read_action(&good.key).unwrap().is_some());
        assert!(cache.verify(false).unwrap().problems.is_empty());
    }
}
