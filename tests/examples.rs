//! The workspaces this repository ships: the root demo and `examples/`, checked and built
//! offline with the `forge` binary (into a temporary cache, leaving the checkout untouched).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Run;
use serde_json::Value;

fn forge(workspace: &str, cache: &Path, args: &[&str]) -> Run {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(workspace);
    let mut c = Command::new(env!("CARGO_BIN_EXE_forge"));
    c.arg("-C").arg(&dir).arg("--cache-dir").arg(cache).args(args).env("CI", "1");
    Run(c.output().unwrap())
}

fn samples(dir: &Path) -> Vec<Value> {
    ["train.jsonl", "eval.jsonl"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

#[test]
fn every_shipped_workspace_checks() {
    let cache = tempfile::tempdir().unwrap();
    for ws in [".", "examples/persona-npc", "examples/openai-teacher", "examples/gemma-defame", "examples/level-gen"] {
        let r = forge(ws, cache.path(), &["check"]);
        assert_eq!(r.code(), 0, "{ws}: {r:?}");
    }
}

/// Each example is its own workspace (a workspace reads nothing outside itself, links
/// included), so `examples/gemma-defame` and `examples/openai-teacher` carry copies of the root
/// demo's lore, recipe and base: they must stay the root's, or the demos stop measuring the same
/// task.
#[test]
fn the_examples_copies_of_the_root_demos_files_are_the_root_demos() {
    let mut copies = Vec::new();
    for example in ["examples/gemma-defame", "examples/openai-teacher", "examples/level-gen"] {
        for entry in walkdir::WalkDir::new(example).into_iter().filter_entry(|e| e.file_name() != ".forge-cache") {
            let entry = entry.unwrap();
            assert!(
                !entry.path_is_symlink(),
                "{} is a link: a workspace reads only its own files",
                entry.path().display()
            );
            let rel = entry.path().strip_prefix(example).unwrap().to_path_buf();
            let own = ["forge.kdl", "README.md", "verify_level.py", "capture.py"].iter().any(|f| rel == Path::new(f));
            if entry.file_type().is_file() && !own {
                copies.push((Path::new(example).join(&rel), rel));
            }
        }
    }
    assert!(copies.len() >= 9, "{copies:?}");
    for (copy, rel) in copies {
        let root = std::fs::read(&rel).unwrap_or_default();
        assert!(
            std::fs::read(&copy).unwrap() == root,
            "{} differs from {}: copy the root's file",
            copy.display(),
            rel.display()
        );
    }
}

#[test]
fn the_root_demo_builds_the_defame_dataset_offline() {
    let cache = tempfile::tempdir().unwrap();
    let r = forge(".", cache.path(), &["build", "defame:dataset"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let dir = PathBuf::from(forge(".", cache.path(), &["artifact", "path", "defame:dataset"]).stdout().trim());
    let all = samples(&dir);
    assert_eq!(all.len(), 360);
    for s in &all {
        let output = s["output"].as_str().unwrap();
        assert!(output.chars().count() <= 500, "{output}");
        // The grammar teacher's poster names the target and uses every piece of intelligence.
        let target = s["values"]["target"].as_str().unwrap();
        assert!(output.contains(target) || output.contains(s["values"]["target_given"].as_str().unwrap()), "{s:#}");
        for item in s["values"]["intel"].as_array().unwrap() {
            assert!(output.contains(item.as_str().unwrap()), "{s:#}");
        }
    }
    let eval = std::fs::read_to_string(dir.join("eval.jsonl")).unwrap().lines().count();
    assert_eq!(eval, 40);
    let second = forge(".", cache.path(), &["build", "--json", "defame:dataset"]);
    assert!(!second.stdout().contains("\"start\""), "a second build is a no-op: {second:?}");
}

#[test]
fn the_persona_example_deals_balanced_categories_and_unique_seeds() {
    let cache = tempfile::tempdir().unwrap();
    let r = forge("examples/persona-npc", cache.path(), &["build"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let dir = PathBuf::from(
        forge("examples/persona-npc", cache.path(), &["artifact", "path", "wenna:dataset"]).stdout().trim(),
    );
    let all = samples(&dir);
    assert_eq!(all.len(), 240);
    let mut per_category: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &all {
        *per_category.entry(s["values"]["category"].as_str().unwrap()).or_default() += 1;
        let plan = &s["values"]["plan"];
        for key in ["seed", "tags", "tone", "setting", "lore_targets"] {
            assert!(!plan[key].is_null(), "the planner's seed has `{key}`: {plan}");
        }
        assert_eq!(plan["tone"], s["values"]["tone"]);
        assert!(s["output"].as_str().unwrap().split_whitespace().count() >= 60);
    }
    assert_eq!(per_category.len(), 8);
    assert!(per_category.values().all(|n| *n == 30), "{per_category:?}");
    let seeds: BTreeSet<&str> = all.iter().map(|s| s["values"]["plan"]["seed"].as_str().unwrap()).collect();
    assert_eq!(seeds.len(), 240, "seeds are deduplicated");
}

/// `examples/ci/forge.yml` runs forge commands that this forge accepts: each `run: forge ...`
/// line, the matrix filled in, runs on the root workspace (builds as `--dry-run`).
#[test]
fn the_ci_example_runs_commands_forge_accepts() {
    let cache = tempfile::tempdir().unwrap();
    let workflow =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ci/forge.yml")).unwrap();
    let summary = cache.path().join("summary.json");
    let mut ran = 0;
    for line in workflow.lines() {
        let Some(cmd) = line.trim().strip_prefix("run: forge ") else { continue };
        let cmd = cmd.replace("${{ matrix.shard }}", "1");
        let mut args: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        if let Some(i) = args.iter().position(|a| a == "--summary") {
            args[i + 1] = summary.display().to_string();
        }
        if args[0] == "build" {
            args.push("--dry-run".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = forge(".", cache.path(), &args);
        assert_eq!(r.code(), 0, "forge {args:?}: {r:?}");
        ran += 1;
    }
    assert_eq!(ran, 2, "forge check and forge build");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["shard"], "1/4");
}

/// `examples/level-gen/verify_level.py`, seed 003's level filter, passes a playable level and
/// names what is wrong with each broken one.
#[test]
fn the_level_verifier_checks_spawn_enemies_exits_and_reachability() {
    let verify = |level: &str| -> Value {
        let mut child = std::process::Command::new("python3")
            .arg("examples/level-gen/verify_level.py")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the verifier");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(serde_json::json!({ "output": level }).to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // A 7 x 6 level: inside, x runs 1..=5 and y 1..=4.
    let level = |walls: &[[i64; 2]], spawn: [i64; 2], enemies: &[[i64; 2]], exits: &[[i64; 2]]| {
        serde_json::json!({
            "name": "crypt", "width": 7, "height": 6,
            "spawn": spawn, "enemies": enemies, "exits": exits, "walls": walls,
        })
        .to_string()
    };
    let good = format!("Here it is: {}", level(&[[3, 2], [3, 3]], [1, 1], &[[5, 4]], &[[5, 1]]));
    assert_eq!(verify(&good), serde_json::json!({"pass": true}));
    // A wall down column 3 cuts the level in two.
    let split = [[3, 1], [3, 2], [3, 3], [3, 4]];
    for (level, reason) in [
        (level(&[], [1, 1], &[[2, 2]], &[[5, 1]]), "next to the spawn"),
        (level(&[[3, 2]], [1, 1], &[[3, 2]], &[[5, 1]]), "not on a floor tile"),
        (level(&[], [1, 1], &[[6, 4]], &[[5, 1]]), "not on a floor tile"),
        (level(&[[0, 2]], [1, 1], &[[5, 4]], &[[5, 1]]), "outside the level's inside"),
        (level(&split, [1, 1], &[[2, 4]], &[[5, 1]]), "an exit at (5, 1) cannot be reached"),
        (level(&split, [1, 1], &[[2, 4]], &[[1, 4]]), "8 floor tiles cannot be reached"),
        (level(&[], [1, 1], &[[5, 4]], &[[5, 4]]), "shares its tile"),
        (level(&[], [1, 1], &[[5, 4]], &[]), "`exits` is not a list"),
        (level(&[], [1, 1], &[], &[[5, 1]]), "`enemies` is not a list"),
        (level(&[], [1, 1], &[[5, 4]], &[[5, 1]]).replace("[5,4]", "[5,4,0]"), "not an [x, y] tile"),
        (serde_json::json!({"name": "x", "width": 3, "height": 6}).to_string(), "from 5 to 40"),
        ("a level, sorry, no JSON".to_string(), "no JSON object"),
    ] {
        let v = verify(&level);
        assert_eq!(v["pass"], false, "{level}");
        assert!(v["reason"].as_str().unwrap().contains(reason), "{level}: {v}");
    }
}
