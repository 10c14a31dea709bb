// The code that shapes each stage's output, digested when forge is built (by `build.rs`) and
// held in every action key of that stage (`Fingerprint.tools`), so that upgrading forge rebuilds
// what the new code would make differently, and only that. Shared by the build script and the
// tests (`include!`d: a build script cannot depend on the crate it builds).
//
// A stage's code is its own source files in `forge-stages` plus every workspace crate it reaches
// through normal dependencies (read from each crate's `Cargo.toml`), except the crates that only
// decide what to build and where to keep it — the manifest parser, the planner, the cache and
// the process helpers, whose effect on an output reaches the key through the params and inputs
// it already holds. Whole-line comments and blank lines are not code: editing documentation
// rebuilds nothing. The external crates those crates depend on count by their `Cargo.lock`
// versions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Per stage kind: its files in `forge-stages/src` (or, for `command`, in `forge-plan/src`),
/// and the workspace crates its code calls directly.
pub const STAGES: &[(&str, &[&str], &[&str])] = &[
    ("command", &["forge-plan/src/command.rs"], &[]),
    ("fetch", &["forge-stages/src/fetch.rs"], &[]),
    ("dataset", &["forge-stages/src/dataset.rs", "forge-stages/src/dataset"], &["forge-data", "forge-teacher"]),
    ("adapter", &["forge-stages/src/train.rs"], &["forge-data", "forge-gguf", "forge-model", "forge-train"]),
    ("merged", &["forge-stages/src/train.rs"], &["forge-data", "forge-gguf", "forge-model", "forge-train"]),
    ("imatrix", &["forge-stages/src/imatrix.rs"], &["forge-gguf", "forge-model", "forge-train"]),
    ("gguf", &["forge-stages/src/gguf.rs"], &["forge-gguf", "forge-model"]),
    ("gguf-adapter", &["forge-stages/src/gguf.rs"], &["forge-gguf", "forge-model"]),
    (
        "bench",
        &["forge-stages/src/bench.rs"],
        &["forge-bench", "forge-data", "forge-infer", "forge-model", "forge-rng", "forge-teacher"],
    ),
    ("report", &["forge-stages/src/report.rs"], &["forge-bench"]),
];

/// Crates whose code does not shape what a stage writes (see the top of this file).
pub const NOT_SHAPING: &[&str] = &["forge-manifest", "forge-plan", "forge-cache", "forge-process"];

/// What shapes one stage: the digest of its code, and the external crates' versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageCode {
    pub digest: String,
    pub crates: BTreeMap<String, String>,
    /// Every file and directory read (for `cargo:rerun-if-changed`).
    pub read: Vec<PathBuf>,
}

/// The code of every stage of the workspace whose crates are in `crates` (`Cargo.lock` beside
/// it), by stage kind.
pub fn stage_code(crates: &Path) -> Result<BTreeMap<String, StageCode>, String> {
    let lock = std::fs::read_to_string(crates.join("../Cargo.lock")).map_err(|e| format!("Cargo.lock: {e}"))?;
    let versions = lock_versions(&lock);
    let mut out = BTreeMap::new();
    for (stage, files, direct) in STAGES {
        let mut closure = BTreeSet::new();
        let mut todo: Vec<String> = direct.iter().map(|s| s.to_string()).collect();
        while let Some(c) = todo.pop() {
            if NOT_SHAPING.contains(&c.as_str()) || !closure.insert(c.clone()) {
                continue;
            }
            todo.extend(manifest_deps(crates, &c)?.0);
        }
        let mut h = blake3::Hasher::new();
        let mut read = Vec::new();
        let add = |what: &str, path: &Path, h: &mut blake3::Hasher, read: &mut Vec<PathBuf>| -> Result<(), String> {
            for f in source_files(path)? {
                let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
                let rel = f.strip_prefix(crates).unwrap_or(&f).to_string_lossy().replace('\\', "/");
                h.update(format!("{what}\0{rel}\0").as_bytes());
                h.update(code_of(&text).as_bytes());
            }
            read.push(path.to_path_buf());
            Ok(())
        };
        for f in *files {
            add("stage", &crates.join(f), &mut h, &mut read)?;
        }
        let mut external = BTreeMap::new();
        for c in &closure {
            add("crate", &crates.join(c).join("src"), &mut h, &mut read)?;
            read.push(crates.join(c).join("Cargo.toml"));
            for dep in manifest_deps(crates, c)?.1 {
                if let Some(v) = versions.get(&dep) {
                    external.insert(dep, v.clone());
                }
            }
        }
        for (name, v) in &external {
            h.update(format!("dep\0{name}\0{v}\0").as_bytes());
        }
        let digest = h.finalize().to_hex()[..16].to_string();
        out.insert(stage.to_string(), StageCode { digest, crates: external, read });
    }
    Ok(out)
}

/// A source file's code: without blank lines, whole-line comments and trailing spaces.
pub fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim_end();
        if t.trim_start().is_empty() || t.trim_start().starts_with("//") {
            continue;
        }
        out.push_str(t);
        out.push('\n');
    }
    out
}

/// The `.rs` files under `path` (itself, if it is one), sorted.
fn source_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let p = e.map_err(|e| format!("{}: {e}", d.display()))?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A workspace crate's normal dependencies: the workspace crates, and the external ones.
fn manifest_deps(crates: &Path, name: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let path = crates.join(name).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut in_deps = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_deps = t == "[dependencies]";
            continue;
        }
        if !in_deps || t.is_empty() || t.starts_with('#') {
            continue;
        }
        let Some(dep) = t.split(['=', '.', ' ']).next().filter(|d| !d.is_empty()) else { continue };
        if dep.starts_with("forge-") {
            ours.push(dep.to_string());
        } else {
            theirs.push(dep.to_string());
        }
    }
    Ok((ours, theirs))
}

/// `name → version` of every package in a `Cargo.lock` (versions of one name joined by `+`).
fn lock_versions(lock: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name.take()) {
            let v = v.trim_matches('"');
            out.entry(n).and_modify(|e| *e = format!("{e}+{v}")).or_insert_with(|| v.to_string());
        }
    }
    out
}
