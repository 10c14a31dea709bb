//! End-to-end tests of the `forge` binary.

mod common;

use common::*;

#[test]
fn builds_a_workspace_incrementally() {
    let ws = TestWorkspace::copy_of("lore");
    let r = ws.run(&["check"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stderr().contains("2 targets, 5 artifacts"), "{r:?}");

    let (r, ev) = ws.build_json(&["lore"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(with_event(&ev, "finish"), ["lore:entries", "lore:count", "lore:summary"]);
    let summary = ws.artifact_path("lore:summary").join("summary.md");
    assert_eq!(std::fs::read_to_string(&summary).unwrap(), "entries: 6\nArdenfall\n");

    // A no-op.
    let (r, ev) = ws.build_json(&["lore"]);
    assert_eq!(r.code(), 0);
    assert!(with_event(&ev, "start").is_empty(), "{ev:#?}");
    assert_eq!(done(&ev)["fresh"], 3);

    // Reordering a list file changes the input but not the sorted entries: early cutoff.
    ws.write("worlds/countries.txt", "Ostrand\nValmora\nArdenfall\n");
    let (_, ev) = ws.build_json(&["lore"]);
    assert_eq!(with_event(&ev, "start"), ["lore:entries"]);
    let cutoff: Vec<_> = ev.iter().filter(|e| e["event"] == "fresh" && e["cutoff"] == true).collect();
    let cutoff: Vec<_> = cutoff.iter().map(|e| e["artifact"].as_str().unwrap()).collect();
    assert_eq!(cutoff, ["lore:count", "lore:summary"], "{ev:#?}");

    // A new entry flows all the way down.
    ws.write("worlds/classes.txt", "serf\nburgher\nnoble\nknight\n");
    let r = ws.run(&["status"]);
    assert!(r.stdout().contains("stale   lore:entries"), "{r:?}");
    assert!(r.stdout().contains("input worlds/classes.txt changed"), "{r:?}");
    assert!(r.stdout().contains("pending lore:count"), "{r:?}");
    let r = ws.run(&["why", "lore:summary"]);
    assert_eq!(
        r.stdout().lines().take(3).collect::<Vec<_>>(),
        [
            "lore:summary is pending until lore:count is rebuilt (it may then stay fresh)",
            "  because lore:count is pending until lore:entries is rebuilt (it may then stay fresh)",
            "  because lore:entries is stale:",
        ],
        "{r:?}"
    );
    let (_, ev) = ws.build_json(&["lore"]);
    assert_eq!(with_event(&ev, "start"), ["lore:entries", "lore:count", "lore:summary"]);
    let starts: Vec<_> = ev.iter().filter(|e| e["event"] == "start").collect();
    assert_eq!(starts[1]["reasons"][0]["reason"], "upstream");
    assert_eq!(starts[1]["reasons"][0]["artifact"], "lore:entries");
    assert_eq!(
        std::fs::read_to_string(ws.artifact_path("lore:summary").join("summary.md")).unwrap(),
        "entries: 7\nArdenfall\n"
    );

    // A parameter edit in the manifest.
    let m = ws.read("forge.kdl").replace("TITLE=\"Ardenfall\"", "TITLE=\"Valmora\"");
    ws.write("forge.kdl", &m);
    let r = ws.run(&["build", "lore"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(
        r.stderr().contains("Building lore:summary (param env.TITLE changed (\"Ardenfall\" → \"Valmora\"))"),
        "{r:?}"
    );

    // `--until` and artifact selection.
    let (_, ev) = ws.build_json(&["--dry-run", "lore", "--until", "count"]);
    assert_eq!(with_event(&ev, "fresh"), ["lore:entries", "lore:count"]);

    // Machine-readable views.
    let status: serde_json::Value = serde_json::from_str(&ws.run(&["status", "--json", "lore"]).stdout()).unwrap();
    assert!(status["artifacts"].as_array().unwrap().iter().all(|a| a["status"] == "fresh"), "{status:#}");
    let graph: serde_json::Value = serde_json::from_str(&ws.run(&["graph", "--format", "json"]).stdout()).unwrap();
    let count = graph["artifacts"].as_array().unwrap().iter().find(|a| a["artifact"] == "lore:count").unwrap();
    assert_eq!(count["deps"], serde_json::json!(["lore:entries"]));
    let dot = ws.run(&["graph"]).stdout();
    assert!(dot.contains("\"lore:count\" -> \"lore:summary\";"), "{dot}");
    let ls: serde_json::Value = serde_json::from_str(&ws.run(&["cache", "ls", "--json"]).stdout()).unwrap();
    assert!(ls["entries"].as_array().unwrap().len() >= 6);

    // Cleaning a target rebuilds it.
    assert_eq!(ws.run(&["clean", "lore"]).code(), 0);
    let (_, ev) = ws.build_json(&["lore"]);
    assert_eq!(with_event(&ev, "start").len(), 3);
}

#[test]
fn exit_codes() {
    let ws = TestWorkspace::with_manifest(
        "forge 1\ntarget \"t\" {\n  command \"bad\" { run \"sh\" \"-c\" \"echo nope >&2; exit 7\"; }\n  command \"good\" { run \"true\"; }\n}\n",
    );
    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr().contains("Failed t:bad: `sh` exited with status 7"), "{r:?}");
    assert!(r.stderr().contains("| nope"), "the log tail is shown: {r:?}");
    assert_eq!(ws.run(&["build", "nope"]).code(), 2);
    assert_eq!(ws.run(&["build", "--bogus"]).code(), 2);
    let r = ws.run(&["artifact", "path", "t:bad"]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("t:bad is not built and fresh (stale: never built)"), "{r:?}");
    assert_eq!(ws.run(&["build", "t:good"]).code(), 0);
    let help = ws.run(&["--help"]);
    assert!(help.stdout().contains("130  interrupted"), "exit codes are documented: {help:?}");
}

/// Hostile testing: "another build is running" exited 2, the status of a usage error, so a CI
/// script could not tell a busy workspace from a broken manifest.
#[test]
fn another_build_running_is_busy_not_a_usage_error() {
    let ws = TestWorkspace::with_manifest(
        "forge 1\ntarget \"t\" {\n  command \"slow\" { run \"sh\" \"-c\" \"sleep 3\"; }\n}\n",
    );
    let mut build = ws.cmd(&["build"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    // The action's staging directory exists once the build holds the lock and runs it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_dir(ws.file(".forge-cache/tmp")).map_or(true, |mut d| d.next().is_none()) {
        assert!(std::time::Instant::now() < deadline, "the build never started its action");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let busy = ws.run(&["clean", "--all"]);
    assert_eq!(busy.code(), 75, "{busy:?}");
    assert!(busy.stderr().contains("a forge build is running in this workspace"), "{busy:?}");
    assert!(build.wait().unwrap().success());
    assert_eq!(ws.run(&["clean", "--all"]).code(), 0);
}

#[test]
fn manifest_errors_are_diagnostics_with_codes() {
    let ws = TestWorkspace::with_manifest(
        "forge 1\nteacher \"offline\" kind=\"grammar\"\nteacher \"gpt\" kind=\"opanai\"\nbase \"b\" kind=\"hf\"\n",
    );
    let r = ws.run(&["check"]);
    assert_eq!(r.code(), 2, "{r:?}");
    let err = r.stderr();
    assert!(err.contains("the manifest has 2 errors"), "{err}");
    assert!(err.contains("forge::manifest::invalid-value"), "{err}");
    assert!(err.contains("did you mean `openai`?"), "{err}");
    assert!(err.contains("forge::manifest::missing-property"), "{err}");
    assert!(err.contains("forge.kdl:3:"), "the label points into the file: {err}");

    let r = ws.run(&["check", "--json"]);
    assert_eq!(r.code(), 2);
    let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    let codes: Vec<&str> = v["related"].as_array().unwrap().iter().map(|d| d["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["forge::manifest::invalid-value", "forge::manifest::missing-property"]);
}

#[test]
fn a_corrupted_cache_entry_is_detected_and_rebuilt() {
    let ws = TestWorkspace::copy_of("lore");
    assert_eq!(ws.run(&["build", "lore"]).code(), 0);
    let file = ws.artifact_path("lore:count").join("count.txt");
    let mut perm = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&file, perm).unwrap();
    std::fs::write(&file, "999\n").unwrap();

    let r = ws.run(&["cache", "verify"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr().contains("Damaged lore:count: content corrupt"), "{r:?}");

    let (r, ev) = ws.build_json(&["lore"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let warnings: Vec<_> = ev.iter().filter(|e| e["event"] == "warning").collect();
    assert_eq!(warnings.len(), 1, "{ev:#?}");
    assert!(warnings[0]["message"].as_str().unwrap().starts_with("corrupt cache entry for lore:count"));
    assert_eq!(with_event(&ev, "start"), ["lore:count"]);
    assert_eq!(ev.iter().find(|e| e["event"] == "start").unwrap()["reasons"][0]["reason"], "content-damaged");
    assert_eq!(std::fs::read_to_string(ws.artifact_path("lore:count").join("count.txt")).unwrap(), "6\n");
    assert_eq!(ws.run(&["cache", "verify"]).code(), 0);
}

#[test]
fn cache_gc_removes_what_is_unused() {
    let ws = TestWorkspace::copy_of("lore");
    assert_eq!(ws.run(&["build", "lore"]).code(), 0);
    ws.write("worlds/classes.txt", "serf\n");
    assert_eq!(ws.run(&["build", "lore"]).code(), 0);
    std::fs::create_dir_all(ws.file(".forge-cache/cas-v0")).unwrap();
    let r = ws.run(&["cache", "gc", "--max-age", "0", "--json"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    assert_eq!(report["actions_removed"], 3, "{report:#}");
    assert_eq!(report["unknown_removed"], serde_json::json!(["cas-v0"]));
    let (_, ev) = ws.build_json(&["lore"]);
    assert!(with_event(&ev, "start").is_empty(), "gc keeps current builds: {ev:#?}");
}

/// `--shard K/N` splits the targets between N jobs: the shards are disjoint and together build
/// everything; `--ci` (or `CI=true`) prints what each artifact did and why, `--summary` writes it
/// as JSON, and a failed artifact fails the job.
#[test]
fn ci_mode_shards_and_summaries() {
    let targets: String = (0..7)
        .map(|i| format!("target \"npc{i}\" {{\n  command \"a\" {{ run \"sh\" \"-c\" \"echo {i} > {{out}}/x\"; }}\n  command \"b\" {{ run \"cp\" \"{{dep:a}}/x\" \"{{out}}/y\"; needs \"a\"; }}\n}}\n"))
        .collect();
    let ws = TestWorkspace::with_manifest(&format!("forge 1\n{targets}"));
    let all: std::collections::BTreeSet<String> =
        (0..7).flat_map(|i| [format!("npc{i}:a"), format!("npc{i}:b")]).collect();
    let mut seen = std::collections::BTreeSet::new();
    for k in 1..=3 {
        let file = ws.file(&format!("shard{k}.json"));
        let r = ws.run(&["build", "--ci", "--shard", &format!("{k}/3"), "--summary", file.to_str().unwrap()]);
        assert_eq!(r.code(), 0, "{r:?}");
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(s["shard"], format!("{k}/3"));
        for (id, a) in s["artifacts"].as_object().unwrap() {
            assert_eq!(a["outcome"], "built", "{id}: {a}");
            assert!(seen.insert(id.clone()), "{id} is in two shards");
        }
        assert!(r.stderr().contains(&format!("forge build summary (shard {k}/3")), "{r:?}");
    }
    assert_eq!(seen, all, "the shards together build every artifact");
    assert_eq!(ws.run(&["build", "--shard", "0/3"]).code(), 2);
    assert_eq!(ws.run(&["build", "--shard", "4/3"]).code(), 2);

    // One target's command changes, not what it writes: CI rebuilds it alone, says why, and
    // the next stage stays fresh by early cutoff.
    let text = ws.read("forge.kdl").replace("echo 3 >", "echo 3  >");
    ws.write("forge.kdl", &text);
    let file = ws.file("ci.json");
    let r = ws.cmd(&["build", "--summary", file.to_str().unwrap()]).env("CI", "true").output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("14 artifacts — 1 built, 12 fresh, 1 fresh by early cutoff"), "{stderr}");
    assert!(stderr.contains("built        npc3:a"), "{stderr}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(s["artifacts"]["npc3:a"]["reasons"][0]["reason"], "param", "{s}");
    assert_eq!(s["artifacts"]["npc3:b"]["outcome"], "cutoff", "{s}");
    assert_eq!(s["summary"]["built"], 1);

    // A failing gate fails the job, and the summary says which.
    let text = ws.read("forge.kdl").replace("echo 5 >", "exit 3; echo 5 >");
    ws.write("forge.kdl", &text);
    let r = ws.run(&["build", "--ci", "--keep-going", "--summary", file.to_str().unwrap()]);
    assert_eq!(r.code(), 1, "{r:?}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(s["artifacts"]["npc5:a"]["outcome"], "failed", "{s}");
    assert_eq!(s["artifacts"]["npc5:b"]["outcome"], "skipped", "{s}");
    assert!(r.stderr().contains("failed       npc5:a"), "{r:?}");
}
