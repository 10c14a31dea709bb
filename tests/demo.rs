//! The root demo end to end at a reduced size: the root `forge.kdl` with smaller numbers
//! (dataset, training, benchmark) on its scratch base instead of SmolLM2 (tests/bases.rs covers
//! the real base), built offline from lore to report with the `forge` binary; a second build is
//! a no-op; a gate the model misses fails the build with the gate, the measured value and the
//! report's path.

mod common;

use common::*;
use serde_json::Value;

/// The root forge.kdl, shrunk: every replaced piece must exist, so the test follows the demo.
fn reduced_demo() -> String {
    let root = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/forge.kdl")).unwrap();
    let mut text = root.clone();
    for (from, to) in [
        ("samples=360 eval=40", "samples=120 eval=24"),
        (" \"bases/smollm2-135m.kdl\"", ""),
        ("base=\"smollm2-135m\"", "base=\"tiny\""),
        (
            "layers=4 hidden=256 heads=4 kv-heads=2 ffn=768 vocab=4096",
            "layers=1 hidden=64 heads=2 kv-heads=1 ffn=128 vocab=400",
        ),
        ("rank=16 alpha=32", "rank=4 alpha=8"),
        ("imatrix=32", "imatrix=8"),
        ("prompts=24 samples=4 attempts=8", "prompts=4 samples=2 attempts=3"),
        ("max-tokens=192", "max-tokens=40"),
    ] {
        assert!(text.contains(from), "the root forge.kdl no longer has `{from}`: update this test");
        text = text.replace(from, to);
    }
    text
}

fn json_file(path: std::path::PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn the_root_demo_builds_from_lore_to_report() {
    let ws = TestWorkspace::with_manifest(&reduced_demo());
    ws.copy_from_repo("worlds");
    ws.copy_from_repo("recipes");
    let (r, ev) = ws.build_json(&[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let mut finished = with_event(&ev, "finish");
    finished.sort();
    let expected = [
        "defame:adapter",
        "defame:bench:f16",
        "defame:bench:q4_0",
        "defame:bench:q8_0",
        "defame:dataset",
        "defame:gguf-adapter",
        "defame:gguf:f16",
        "defame:gguf:q4_0",
        "defame:gguf:q8_0",
        "defame:imatrix",
        "defame:merged",
        "defame:report",
    ];
    assert_eq!(finished, expected);

    let bench = json_file(ws.artifact_path("defame:bench:q4_0").join("bench.json"));
    assert_eq!(bench["level"], "q4_0");
    assert_eq!(
        bench["criteria"],
        serde_json::json!(["intelligence", "target-named", "max-chars", "min-words", "in-character"])
    );
    assert_eq!(bench["skipped"].as_array().unwrap().len(), 7, "the paper's llm criteria need a judge model");
    let prompts = bench["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 4);
    for p in prompts {
        let samples = p["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        let passes = samples.iter().filter(|s| s["pass"] == true).count();
        assert_eq!(p["passes"], passes);
        for s in samples {
            assert_eq!(s["criteria"].as_array().unwrap().len(), 5);
            assert!(s["tokens"].as_u64().unwrap() <= 40);
        }
        let retry = &p["retry"];
        assert!((1..=3).contains(&retry["attempts"].as_u64().unwrap()));
        assert!(retry["seconds"].as_f64().unwrap() > 0.0);
    }
    let summary = &bench["summary"];
    assert!(summary["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["expected_attempts"].as_array().unwrap().len(), 4);

    let report_dir = ws.artifact_path("defame:report");
    let report = json_file(report_dir.join("report.json"));
    let levels: Vec<&str> = report["levels"].as_array().unwrap().iter().map(|l| l["level"].as_str().unwrap()).collect();
    assert_eq!(levels, ["f16", "q8_0", "q4_0"]);
    assert_eq!(report["pairs"].as_array().unwrap().len(), 3, "every pair of levels");
    assert!(report["loss"]["train"].as_array().is_some_and(|t| !t.is_empty()));
    let html = std::fs::read_to_string(report_dir.join("report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 4, "ECDFs, criteria and loss plots");
    assert!(!html.contains("plot unavailable"));
    assert!(html.contains("McNemar"));
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    assert!(md.contains("| q4_0 |"), "{md}");
    assert!(ws.file(".forge-cache/reports-v1/defame/report.html").is_file(), "the latest report outside the store");

    let (_, ev) = ws.build_json(&[]);
    assert!(with_event(&ev, "start").is_empty(), "a second build is a no-op");

    // A gate the model cannot meet: the build fails naming it, and the report stays readable.
    let gated = ws.read("forge.kdl").replace(
        "max-tokens=40 seed=0",
        "max-tokens=40 seed=0 {\n        gate tokens-per-second=1000000000 level=\"q4_0\"\n    }",
    );
    assert_ne!(gated, ws.read("forge.kdl"));
    ws.write("forge.kdl", &gated);
    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 1, "{r:?}");
    let err = r.stderr();
    assert!(err.contains("gate tokens-per-second=1000000000 at q4_0: measured"), "{err}");
    assert!(err.contains("reports-v1/defame/report.html"), "{err}");
    let (_, ev) = ws.build_json(&[]);
    assert_eq!(with_event(&ev, "start"), ["defame:report"], "only the report is re-checked");
}
