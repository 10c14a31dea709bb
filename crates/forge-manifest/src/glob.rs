//! Workspace-relative file patterns: literal files, directories (all files below) and globs.
//!
//! Used for `include` and for the inputs of command stages. A pattern is split into its literal
//! directory prefix and a glob remainder, and only that prefix is walked, so a thousand literal
//! inputs cost a thousand `stat` calls rather than a thousand walks of the workspace.

use std::path::{Component, Path};

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

    if literal == segments.len() {
        // No glob: a file names itself, a directory names every file below it.
        return match std::fs::metadata(&base) {
            Ok(m) if m.is_file() => Ok(vec![prefix]),
            Ok(m) if m.is_dir() => Ok(walk(root, &base, None)),
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
    Ok(walk(root, &base, Some(&glob)))
}

fn walk(root: &Path, base: &Path, glob: Option<&GlobMatcher>) -> Vec<String> {
    let mut out = Vec::new();
    let walker = WalkDir::new(base).follow_links(true).into_iter().filter_entry(|e| {
        e.depth() == 0 || !(e.file_type().is_dir() && SKIPPED_DIRS.iter().any(|d| e.file_name() == *d))
    });
    for entry in walker.flatten() {
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        let rel = to_slash(rel);
        if glob.is_none_or(|g| g.is_match(&rel)) {
            out.push(rel);
        }
    }
    out.sort();
    out
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
}
