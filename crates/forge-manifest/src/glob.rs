//! Workspace-relative file patterns: literal files, directories (all files below) and globs.
//!
//! Used for `include` and for the inputs of command stages. A pattern is split into its literal
//! directory prefix and a glob remainder, and only that prefix is walked, so a thousand literal
//! inputs cost a thousand `stat` calls rather than a thousand walks of the workspace.
//!
//! Paths stay inside the workspace twice over: lexically ([`normalize`] refuses absolute paths
//! and `..` above the root) and on disk ([`confine`] follows symbolic links, and [`expand`]
//! refuses a match that a link takes outside).

use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use walkdir::WalkDir;

/// Directory names never matched by a pattern: the cache, VCS metadata, build output.
pub const SKIPPED_DIRS: &[&str] = &[".forge-cache", ".git", ".hg", ".svn", "target", "node_modules"];

#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("absolute paths are not allowed; write a path relative to the workspace")]
    Absolute,
    #[error("the pattern leaves the workspace")]
    Escapes,
    #[error("invalid glob: {0}")]
    Glob(String),
    #[error("`{path}` leads outside the workspace, to {} (through a symbolic link)", target.display())]
    Symlink { path: String, target: PathBuf },
    #[error("`{path}` is a symbolic link that points nowhere")]
    Dangling { path: String },
}

/// Checks that the workspace-relative `rel` (already [`normalize`]d) stays inside `root` once
/// symbolic links are followed, and returns `root/rel`. A path that does not exist yet is
/// judged by its deepest existing ancestor; a dangling link is refused (writing through it
/// would create a file wherever it points).
pub fn confine(root: &Path, rel: &str) -> Result<PathBuf, PatternError> {
    let joined = root.join(rel);
    let mut existing = joined.as_path();
    loop {
        match std::fs::symlink_metadata(existing) {
            Ok(meta) => {
                let target = match existing.canonicalize() {
                    Ok(t) => t,
                    Err(_) if meta.file_type().is_symlink() => {
                        return Err(PatternError::Dangling { path: display(root, existing) });
                    }
                    Err(_) => return Ok(joined),
                };
                let here = if root.as_os_str().is_empty() { Path::new(".") } else { root };
                let canon = here.canonicalize().unwrap_or_else(|_| here.to_path_buf());
                return if target.starts_with(&canon) {
                    Ok(joined)
                } else {
                    Err(PatternError::Symlink { path: display(root, existing), target })
                };
            }
            Err(_) => match existing.parent() {
                Some(parent) if parent.starts_with(root) && parent != existing => existing = parent,
                _ => return Ok(joined),
            },
        }
    }
}

fn display(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).map(to_slash).unwrap_or_else(|_| p.display().to_string())
}

fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Joins `dir` and `pattern` into a normalized workspace-relative pattern (`/` separators).
pub fn normalize(dir: &str, pattern: &str) -> Result<String, PatternError> {
    if Path::new(pattern).is_absolute() || pattern.starts_with('/') {
        return Err(PatternError::Absolute);
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    for comp in pattern.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(PatternError::Escapes);
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Expands a normalized workspace-relative pattern to the sorted workspace-relative paths of
/// the regular files it names.
pub fn expand(root: &Path, pattern: &str) -> Result<Vec<String>, PatternError> {
    let segments: Vec<&str> = pattern.split('/').collect();
    let literal = segments.iter().take_while(|s| !has_meta(s)).count();
    let prefix = segments[..literal].join("/");
    let base = if prefix.is_empty() { root.to_path_buf() } else { root.join(&prefix) };

    if std::fs::symlink_metadata(&base).is_ok() {
        confine(root, &prefix)?;
    }
    if literal == segments.len() {
        // No glob: a file names itself, a directory names every file below it.
        return match std::fs::metadata(&base) {
            Ok(m) if m.is_file() => Ok(vec![prefix]),
            Ok(m) if m.is_dir() => walk(root, &base, None),
            _ => Ok(Vec::new()),
        };
    }
    let glob = GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| PatternError::Glob(e.kind().to_string()))?
        .compile_matcher();
    if !base.is_dir() {
        return Ok(Vec::new());
    }
    walk(root, &base, Some(&glob))
}

/// The files below `base` (matching `glob`), following links that stay inside the workspace;
/// a link that leaves it is an error (a glob must not read `/etc` through `worlds/x.kdl`).
fn walk(root: &Path, base: &Path, glob: Option<&GlobMatcher>) -> Result<Vec<String>, PatternError> {
    let mut out = Vec::new();
    let walker = WalkDir::new(base).follow_links(true).into_iter().filter_entry(|e| {
        e.depth() == 0 || !(e.file_type().is_dir() && SKIPPED_DIRS.iter().any(|d| e.file_name() == *d))
    });
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            // A dangling link, a loop or an unreadable directory: nothing to match there,
            // unless it is a link, which is judged below like any other.
            Err(e) => match e.path() {
                Some(p) if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) => {
                    let rel = p.strip_prefix(root).map(to_slash).unwrap_or_default();
                    if glob.is_none_or(|g| g.is_match(&rel)) {
                        confine(root, &rel)?;
                    }
                    continue;
                }
                _ => continue,
            },
        };
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        let rel = to_slash(rel);
        if entry.path_is_symlink() && (entry.file_type().is_dir() || glob.is_none_or(|g| g.is_match(&rel))) {
            confine(root, &rel)?;
        }
        if entry.file_type().is_file() && glob.is_none_or(|g| g.is_match(&rel)) {
            out.push(rel);
        }
    }
    out.sort();
    Ok(out)
}

/// A relative path with `/` separators.
pub fn to_slash(p: &Path) -> String {
    let mut s = String::new();
    for c in p.components() {
        if let Component::Normal(part) = c {
            if !s.is_empty() {
                s.push('/');
            }
            s.push_str(&part.to_string_lossy());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_relative_to_the_including_directory() {
        assert_eq!(normalize("", "worlds/*.kdl").unwrap(), "worlds/*.kdl");
        assert_eq!(normalize("examples/npc", "../../worlds/x.kdl").unwrap(), "worlds/x.kdl");
        assert!(matches!(normalize("", "../x"), Err(PatternError::Escapes)));
        assert!(matches!(normalize("", "/etc/passwd"), Err(PatternError::Absolute)));
    }

    #[test]
    fn expands_files_directories_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("w/a")).unwrap();
        std::fs::create_dir_all(root.join(".forge-cache")).unwrap();
        for f in ["w/x.kdl", "w/a/y.kdl", "w/a/z.txt", ".forge-cache/c.kdl"] {
            std::fs::write(root.join(f), "").unwrap();
        }
        assert_eq!(expand(root, "w/x.kdl").unwrap(), ["w/x.kdl"]);
        assert_eq!(expand(root, "w").unwrap(), ["w/a/y.kdl", "w/a/z.txt", "w/x.kdl"]);
        assert_eq!(expand(root, "w/*.kdl").unwrap(), ["w/x.kdl"]);
        assert_eq!(expand(root, "w/**/*.kdl").unwrap(), ["w/a/y.kdl", "w/x.kdl"]);
        assert_eq!(expand(root, "**/*.kdl").unwrap(), ["w/a/y.kdl", "w/x.kdl"]);
        assert!(expand(root, "nope/*.kdl").unwrap().is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_workspace_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "root:x:0:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("worlds")).unwrap();
        std::fs::write(root.join("worlds/a.kdl"), "").unwrap();
        std::os::unix::fs::symlink("a.kdl", root.join("worlds/inside.kdl")).unwrap();
        assert!(confine(root, "worlds/inside.kdl").is_ok());
        assert_eq!(expand(root, "worlds/*.kdl").unwrap(), ["worlds/a.kdl", "worlds/inside.kdl"]);

        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("worlds/x.kdl")).unwrap();
        let e = expand(root, "worlds/*.kdl").unwrap_err();
        assert!(matches!(&e, PatternError::Symlink { path, .. } if path == "worlds/x.kdl"), "{e}");
        assert!(matches!(expand(root, "worlds/x.kdl"), Err(PatternError::Symlink { .. })));
        assert!(matches!(expand(root, "worlds"), Err(PatternError::Symlink { .. })));
        // Not matched by the glob: not read, so not an error.
        assert_eq!(expand(root, "worlds/a*.kdl").unwrap(), ["worlds/a.kdl"]);

        // A linked directory, and a file below it that does not exist yet.
        std::fs::remove_file(root.join("worlds/x.kdl")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("models")).unwrap();
        assert!(matches!(confine(root, "models/new.gguf"), Err(PatternError::Symlink { .. })));
        assert!(matches!(expand(root, "**/*"), Err(PatternError::Symlink { .. })));
        std::fs::remove_file(root.join("models")).unwrap();

        std::os::unix::fs::symlink(root.join("gone"), root.join("worlds/dangling.kdl")).unwrap();
        assert!(matches!(confine(root, "worlds/dangling.kdl"), Err(PatternError::Dangling { .. })));
        assert!(matches!(expand(root, "worlds/*.kdl"), Err(PatternError::Dangling { .. })));
        assert!(confine(root, "worlds/not-yet.kdl").is_ok());
    }
}
