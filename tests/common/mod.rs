//! A small test context for running the `forge` binary on a copy of a workspace.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct TestWorkspace {
    dir: tempfile::TempDir,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == ".forge-cache" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

impl TestWorkspace {
    /// A fresh copy of `tests/workspaces/<name>`.
    pub fn copy_of(name: &str) -> TestWorkspace {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workspaces").join(name);
        copy_dir(&src, dir.path());
        TestWorkspace { dir }
    }

    /// A workspace with only a forge.kdl.
    pub fn with_manifest(text: &str) -> TestWorkspace {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("forge.kdl"), text).unwrap();
        TestWorkspace { dir }
    }

    /// Copies the repository's directory `rel` (e.g. `worlds`) into the workspace.
    pub fn copy_from_repo(&self, rel: &str) {
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join(rel), &self.path().join(rel));
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, rel: &str) -> PathBuf {
        self.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.file(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.file(rel)).unwrap()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forge"));
        c.args(args).current_dir(self.path()).env("CI", "1").env_remove("FORGE_CACHE_DIR");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run(self.cmd(args).output().unwrap())
    }

    /// `forge build --json ARGS`, parsed into events.
    pub fn build_json(&self, args: &[&str]) -> (Run, Vec<serde_json::Value>) {
        let mut all = vec!["build", "--json"];
        all.extend_from_slice(args);
        let run = self.run(&all);
        let events = run.stdout().lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
        (run, events)
    }

    /// The path `forge artifact path` prints.
    pub fn artifact_path(&self, artifact: &str) -> PathBuf {
        let r = self.run(&["artifact", "path", artifact]);
        assert_eq!(r.code(), 0, "{r:?}");
        PathBuf::from(r.stdout().trim())
    }
}

pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code(), self.stdout(), self.stderr())
    }
}

/// Artifacts with an event of `kind` (`start`, `finish`, `fresh`, ...).
pub fn with_event(events: &[serde_json::Value], kind: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == kind)
        .map(|e| e["artifact"].as_str().unwrap_or_default().to_string())
        .collect()
}

pub fn done(events: &[serde_json::Value]) -> &serde_json::Value {
    events.iter().find(|e| e["event"] == "done").expect("a done event")
}

/// Fetches `base:NAME` with the repository's `bases/NAME.kdl` into a cache every test of this
/// run shares, `tests/bases.rs` and `tests/gguf_fuzz_real.rs` alike (and a later run reuses: a
/// second build is a no-op), and returns the file.
pub fn fetch_base(name: &str) -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bases");
        std::fs::create_dir_all(dir.join("bases")).unwrap();
        std::fs::write(dir.join("forge.kdl"), "forge 1\ninclude \"bases/*.kdl\"\n").unwrap();
        for f in ["smollm2-135m.kdl", "gemma3-270m.kdl"] {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bases").join(f);
            std::fs::copy(src, dir.join("bases").join(f)).unwrap();
        }
        dir
    });
    let forge = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_forge"))
            .arg("-C")
            .arg(root)
            .args(args)
            .env("CI", "1")
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert!(out.status.success(), "forge {args:?}:\n{}\n{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    };
    let artifact = format!("base:{name}");
    forge(&["build", &artifact]);
    PathBuf::from(forge(&["artifact", "path", &artifact]).trim()).join("model.gguf")
}
