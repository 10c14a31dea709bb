//! The engine on real workspaces of command stages.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use forge_manifest::{ArtifactDecl, Manifest};
use forge_plan::*;

struct Ws {
    dir: tempfile::TempDir,
}

impl Ws {
    fn new(manifest: &str) -> Ws {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("forge.kdl"), manifest).unwrap();
        Ws { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn load_with(&self, opts: LoadOptions) -> Workspace {
        match Workspace::load(self.path(), opts) {
            Ok(w) => w,
            Err(e) => panic!("{e:?}"),
        }
    }

    fn load(&self) -> Workspace {
        self.load_with(LoadOptions::default())
    }

    fn build_with(&self, ws: &Workspace, args: &[&str], opts: BuildOptions) -> (Summary, Vec<Event>) {
        let engine = Engine::new(ws);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let selection = ws.plan.select(&args, None).unwrap();
        let sink = Collect::default();
        let summary = engine.build(&selection, &opts, &sink);
        (summary, sink.take())
    }

    fn build(&self) -> (Summary, Vec<Event>) {
        let ws = self.load();
        self.build_with(&ws, &[], BuildOptions::default())
    }

    fn artifact(&self, id: &str) -> String {
        let ws = self.load();
        let engine = Engine::new(&ws);
        let rec = engine.recorded(&id.parse().unwrap()).expect("built");
        let dir = ws.cache.cas_dir(&rec.tree.digest());
        let file = &rec.tree.entries[0].path;
        std::fs::read_to_string(dir.join(file)).unwrap()
    }
}

fn started(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Start { artifact, .. } => Some(artifact.clone()),
            _ => None,
        })
        .collect()
}

fn reasons_of(events: &[Event], artifact: &str) -> Vec<String> {
    events
        .iter()
        .find_map(|e| match e {
            Event::Start { artifact: a, reasons } if a == artifact => {
                Some(reasons.iter().map(|r| r.to_string()).collect())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{artifact} did not start: {events:#?}"))
}

const CHAIN: &str = r#"
forge 1
target "t" {
    command "count" {
        run "sh" "-c" "wc -l < data/in.txt | tr -d ' ' > {out}/count.txt"
        inputs "data/in.txt"
        outputs "count.txt"
    }
    command "double" {
        run "sh" "-c" "echo $(( $(cat {dep:count}/count.txt) * 2 )) > {out}/double.txt"
        needs "count"
        outputs "double.txt"
    }
}
"#;

#[test]
fn builds_then_does_nothing() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\nb\nc\n");
    let (s, ev) = w.build();
    assert!(s.ok(), "{ev:#?}");
    assert_eq!(s.built, 2);
    assert_eq!(started(&ev), ["t:count", "t:double"]);
    assert_eq!(reasons_of(&ev, "t:count"), ["never built"]);
    assert_eq!(w.artifact("t:double").trim(), "6");

    let (s, ev) = w.build();
    assert_eq!((s.built, s.fresh), (0, 2), "{ev:#?}");
    assert!(started(&ev).is_empty());
}

#[test]
fn input_file_change_is_a_typed_reason_and_early_cutoff_stops_it() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\nb\nc\n");
    w.build();
    // Same line count, different bytes: `count` reruns, produces the same content, and
    // `double` stays fresh.
    w.write("data/in.txt", "x\ny\nz\n");
    let (s, ev) = w.build();
    assert!(s.ok());
    assert_eq!(started(&ev), ["t:count"]);
    let r = reasons_of(&ev, "t:count");
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("input data/in.txt changed ("), "{r:?}");
    assert!(ev.iter().any(|e| matches!(e, Event::Finish { artifact, unchanged: true, .. } if artifact == "t:count")));
    assert!(
        ev.iter().any(|e| matches!(e, Event::Fresh { artifact, cutoff: true } if artifact == "t:double")),
        "{ev:#?}"
    );

    // A real change flows downstream, with an `upstream` reason.
    w.write("data/in.txt", "x\ny\n");
    let (_, ev) = w.build();
    assert_eq!(started(&ev), ["t:count", "t:double"]);
    let r = reasons_of(&ev, "t:double");
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("upstream t:count changed ("), "{r:?}");
    assert_eq!(w.artifact("t:double").trim(), "4");
}

#[test]
fn param_change_then_revert_restores_from_the_action_cache() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\n");
    w.build();
    let edited = CHAIN.replace("* 2", "* 3");
    w.write("forge.kdl", &edited);
    let (_, ev) = w.build();
    assert_eq!(started(&ev), ["t:double"]);
    let r = reasons_of(&ev, "t:double");
    assert_eq!(r.len(), 1);
    assert_eq!(
        r,
        [r#"param run[2] changed ("…count.txt) * 2 )) > {out}/double.txt" → "…count.txt) * 3 )) > {out}/double.txt")"#]
    );
    assert_eq!(w.artifact("t:double").trim(), "3");
    // Back to the original: that build is still in the action cache.
    w.write("forge.kdl", CHAIN);
    let (s, ev) = w.build();
    assert!(started(&ev).is_empty(), "{ev:#?}");
    assert_eq!(s.fresh, 2);
    assert_eq!(w.artifact("t:double").trim(), "2");
}

#[test]
fn forge_version_change_rebuilds_everything() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\n");
    w.build();
    let opts = LoadOptions { forge_version: "99.0.0".into(), ..LoadOptions::default() };
    let ws = w.load_with(opts);
    let (_, ev) = w.build_with(&ws, &[], BuildOptions::default());
    assert_eq!(started(&ev), ["t:count", "t:double"]);
    assert_eq!(reasons_of(&ev, "t:count"), [format!("forge version changed ({} → 99.0.0)", FORGE_VERSION)]);
}

#[test]
fn env_and_output_changes_are_params() {
    let m = r#"
forge 1
target "t" {
    command "greet" stdout="hello.txt" {
        run "sh" "-c" "echo $GREETING"
        env GREETING="hello"
    }
}
"#;
    let w = Ws::new(m);
    w.build();
    assert_eq!(w.artifact("t:greet"), "hello\n");
    w.write("forge.kdl", &m.replace("\"hello\"", "\"bonjour\""));
    let (_, ev) = w.build();
    assert_eq!(reasons_of(&ev, "t:greet"), [r#"param env.GREETING changed ("hello" → "bonjour")"#]);
    assert_eq!(w.artifact("t:greet"), "bonjour\n");
}

#[test]
fn damaged_content_is_reported_and_rebuilt() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\nb\n");
    w.build();
    let ws = w.load();
    let rec = Engine::new(&ws).recorded(&"t:double".parse().unwrap()).unwrap();
    let file = ws.cache.cas_dir(&rec.tree.digest()).join("double.txt");
    forge_cache::fsutil::remove_tree(&file).unwrap();
    std::fs::write(&file, "666\n").unwrap();
    drop(ws);

    let (s, ev) = w.build();
    assert!(s.ok());
    assert_eq!(started(&ev), ["t:double"]);
    let r = reasons_of(&ev, "t:double");
    assert!(r[0].starts_with("stored content damaged: "), "{r:?}");
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::Warning { message } if message.starts_with("corrupt cache entry for t:double"))
        ),
        "{ev:#?}"
    );
    assert_eq!(w.artifact("t:double").trim(), "4");
}

/// Flips a byte in the middle of every action-cache entry.
fn damage_every_action_entry(cache: &Path) {
    for shard in std::fs::read_dir(cache.join("ac-v1")).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let mut data = std::fs::read(&p).unwrap();
            let n = data.len();
            data[n / 2] ^= 0x55;
            std::fs::write(&p, data).unwrap();
        }
    }
}

#[test]
fn corrupt_action_entry_is_reported_and_rebuilt() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\n");
    w.build();
    // Forget the state so the action cache is consulted, and damage every entry.
    let cache = w.path().join(".forge-cache");
    std::fs::remove_file(cache.join("state-v1.bin")).unwrap();
    damage_every_action_entry(&cache);
    let (s, ev) = w.build();
    assert!(s.ok());
    assert_eq!(started(&ev), ["t:count", "t:double"]);
    assert!(reasons_of(&ev, "t:count")[0].starts_with("cache entry corrupt: "), "{ev:#?}");
    let (s, _) = w.build();
    assert_eq!(s.fresh, 2);
}

/// Hostile testing: with the state file intact, a damaged action entry for the current key
/// was not noticed, so the build succeeded and left a cache that `verify` rejected.
#[test]
fn a_damaged_action_entry_for_the_current_key_is_rebuilt_not_trusted() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\n");
    w.build();
    let cache = w.path().join(".forge-cache");
    damage_every_action_entry(&cache);
    let (s, ev) = w.build();
    assert!(s.ok());
    assert_eq!(started(&ev), ["t:count", "t:double"]);
    assert!(reasons_of(&ev, "t:count")[0].starts_with("cache entry corrupt: "), "{ev:#?}");
    let ws = w.load();
    let report = ws.cache.verify(false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    drop(ws);
    let (s, _) = w.build();
    assert_eq!(s.fresh, 2);
}

const FAILING: &str = r#"
forge 1
target "t" {
    command "bad" { run "sh" "-c" "echo partial > {out}/x; echo boom >&2; exit 3"; }
    command "after" { run "true"; needs "bad"; }
    command "other" { run "sh" "-c" "sleep 0.2; echo ok > {out}/ok"; }
}
"#;

#[test]
fn failures_record_nothing_and_skip_dependents() {
    let w = Ws::new(FAILING);
    let ws = w.load();
    let opts = BuildOptions { jobs: 1, keep_going: true, ..BuildOptions::default() };
    let (s, ev) = w.build_with(&ws, &[], opts);
    assert_eq!((s.failed, s.skipped, s.built), (1, 1, 1), "{ev:#?}");
    let fail = ev
        .iter()
        .find_map(|e| match e {
            Event::Fail { artifact, error, log, .. } if artifact == "t:bad" => Some((error.clone(), log.clone())),
            _ => None,
        })
        .unwrap();
    assert!(fail.0.starts_with("`sh` exited with status 3"), "{}", fail.0);
    assert!(fail.0.contains("boom"), "the log tail is shown: {}", fail.0);
    assert!(fail.1.unwrap().ends_with("t--bad.log"));
    assert!(Engine::new(&ws).recorded(&"t:bad".parse().unwrap()).is_none());
    assert_eq!(
        std::fs::read_dir(ws.cache.bucket(forge_cache::Bucket::Tmp)).unwrap().count(),
        0,
        "staging is cleaned up"
    );

    // Without --keep-going nothing new starts after the first failure.
    let w = Ws::new(FAILING);
    let ws = w.load();
    let (s, ev) = w.build_with(&ws, &[], BuildOptions { jobs: 1, ..BuildOptions::default() });
    assert_eq!(s.failed, 1);
    assert_eq!(started(&ev), ["t:bad"], "declaration order, and a stop after the failure");
    assert_eq!((s.skipped, s.not_run), (1, 1), "{s:?}");
    assert!(!s.ok());
}

#[test]
fn missing_declared_output_and_missing_input_fail_clearly() {
    let w = Ws::new(
        r#"
forge 1
target "t" {
    command "lazy" { run "true"; outputs "result.json"; }
    command "reader" { run "cat" "{inputs}"; inputs "nope/*.txt"; }
}
"#,
    );
    let ws = w.load();
    let (s, ev) = w.build_with(&ws, &[], BuildOptions { keep_going: true, ..BuildOptions::default() });
    assert_eq!(s.failed, 2);
    let errors: Vec<String> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Fail { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert!(errors.iter().any(|e| e == "input `nope/*.txt` matches no file"), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.starts_with("`true` succeeded but did not write the declared output `result.json`")),
        "{errors:?}"
    );
}

#[test]
fn timeouts_kill_the_command() {
    let w = Ws::new(
        r#"
forge 1
target "t" {
    command "slow" timeout=0.3 { run "sleep" "30"; }
}
"#,
    );
    let t0 = std::time::Instant::now();
    let (s, ev) = w.build();
    assert_eq!(s.failed, 1);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(ev.iter().any(|e| matches!(e, Event::Fail { error, .. } if error.contains("timed out after"))), "{ev:#?}");
}

/// A plan whose only parameter is the artifact's name.
fn plan_by_id(decl: &ArtifactDecl) -> StagePlan {
    let mut p = StagePlan::default();
    p.params.insert("id".into(), decl.id.to_string().into());
    p
}

/// An executor that records how many of its actions run at once.
struct Probe {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Executor for Probe {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn format_version(&self) -> u32 {
        1
    }
    fn plan(&self, _: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        plan_by_id(decl)
    }
    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(60));
        std::fs::write(ctx.out_dir.join("id"), ctx.artifact.to_string()).unwrap();
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

fn concurrency(manifest: &str, jobs: usize) -> usize {
    let w = Ws::new(manifest);
    let probe = Arc::new(Probe { now: AtomicUsize::new(0), max: AtomicUsize::new(0) });
    let mut registry = Registry::default();
    registry.register(probe.clone());
    let ws = w.load_with(LoadOptions { registry, ..LoadOptions::default() });
    let (s, ev) = w.build_with(&ws, &[], BuildOptions { jobs, ..BuildOptions::default() });
    assert!(s.ok(), "{ev:#?}");
    assert_eq!(s.built, 6);
    probe.max.load(Ordering::SeqCst)
}

#[test]
fn jobs_and_pools_bound_parallelism() {
    let stages = |pool: &str| (0..6).map(|i| format!("command \"s{i}\" {pool} {{ run \"x\"; }}\n")).collect::<String>();
    let free = format!("forge 1\ntarget \"t\" {{\n{}}}\n", stages(""));
    assert_eq!(concurrency(&free, 4), 4);
    assert_eq!(concurrency(&free, 1), 1);
    let pooled =
        format!("forge 1\nworkspace {{ pool \"gpu\" capacity=2; }}\ntarget \"t\" {{\n{}}}\n", stages("pool=\"gpu\""));
    assert_eq!(concurrency(&pooled, 6), 2);
}

/// An executor whose `bench*` actions must run alone; it records whether anything ran beside
/// one, and how many ran at once.
struct Timed {
    now: AtomicUsize,
    max: AtomicUsize,
    disturbed: std::sync::atomic::AtomicBool,
    benches_running: AtomicUsize,
}

impl Executor for Timed {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn format_version(&self) -> u32 {
        1
    }
    fn plan(&self, _: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        plan_by_id(decl)
    }
    fn exclusive(&self, decl: &ArtifactDecl) -> bool {
        decl.id.to_string().contains("bench")
    }
    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let bench = ctx.artifact.to_string().contains("bench");
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        if bench {
            self.benches_running.fetch_add(1, Ordering::SeqCst);
        }
        for _ in 0..6 {
            let others = self.now.load(Ordering::SeqCst);
            if (bench && others > 1) || (!bench && self.benches_running.load(Ordering::SeqCst) > 0) {
                self.disturbed.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if bench {
            self.benches_running.fetch_sub(1, Ordering::SeqCst);
        }
        std::fs::write(ctx.out_dir.join("id"), ctx.artifact.to_string()).unwrap();
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A benchmark runs alone: nothing starts beside it and it waits for what runs; the other
/// actions still run in parallel.
#[test]
fn timed_actions_run_alone() {
    let stages: String = (0..8)
        .map(|i| {
            if i % 3 == 1 {
                format!("command \"bench{i}\" {{ run \"x\"; }}\n")
            } else {
                format!("command \"s{i}\" {{ run \"x\"; }}\n")
            }
        })
        .collect();
    let w = Ws::new(&format!("forge 1\ntarget \"t\" {{\n{stages}}}\n"));
    let timed = Arc::new(Timed {
        now: AtomicUsize::new(0),
        max: AtomicUsize::new(0),
        disturbed: Default::default(),
        benches_running: AtomicUsize::new(0),
    });
    let mut registry = Registry::default();
    registry.register(timed.clone());
    let ws = w.load_with(LoadOptions { registry, ..LoadOptions::default() });
    let (s, ev) = w.build_with(&ws, &[], BuildOptions { jobs: 4, ..BuildOptions::default() });
    assert!(s.ok(), "{ev:#?}");
    assert_eq!(s.built, 8);
    assert!(!timed.disturbed.load(Ordering::SeqCst), "something ran beside a benchmark");
    assert!(timed.max.load(Ordering::SeqCst) >= 2, "the other actions ran in parallel");
}

#[test]
fn selection_until_and_closure() {
    let w = Ws::new(CHAIN);
    w.write("data/in.txt", "a\n");
    let ws = w.load();
    let names = |sel: Vec<petgraph::graph::NodeIndex>| -> Vec<String> {
        sel.into_iter().map(|n| ws.plan.graph[n].id.to_string()).collect()
    };
    assert_eq!(names(ws.plan.select(&["t:double".into()], None).unwrap()), ["t:count", "t:double"]);
    assert_eq!(names(ws.plan.select(&["t".into()], Some("count")).unwrap()), ["t:count"]);
    assert_eq!(ws.plan.select(&["x".into()], None).unwrap_err().to_string(), "no target named `x`");
    assert_eq!(
        ws.plan.select(&["t:doubel".into()], None).unwrap_err().to_string(),
        "no artifact named `t:doubel` (did you mean `t:double`?)"
    );
    assert_eq!(
        ws.plan.select(&["t".into()], Some("cont")).unwrap_err().to_string(),
        "no selected target has a stage `cont` (did you mean `count`?)"
    );
    let (s, ev) = w.build_with(&ws, &["t:count"], BuildOptions::default());
    assert_eq!(s.built, 1);
    assert_eq!(started(&ev), ["t:count"]);
}

#[test]
fn the_config_cache_is_used_until_a_manifest_file_changes() {
    let w =
        Ws::new("forge 1\ninclude \"more/*.kdl\" optional=#true\ntarget \"t\" { command \"a\" { run \"true\"; }; }\n");
    assert!(!w.load().manifest_cached);
    let ws = w.load();
    assert!(ws.manifest_cached);
    ws.save_stat_cache().unwrap();
    assert!(w.load().manifest_cached);
    // A new file matching an include pattern invalidates it.
    w.write("more/x.kdl", "target \"u\" { command \"b\" { run \"true\"; }; }\n");
    let ws = w.load();
    assert!(!ws.manifest_cached);
    assert!(ws.manifest.target("u").is_some());
    // So does an edit.
    w.write("more/x.kdl", "target \"v\" { command \"b\" { run \"true\"; }; }\n");
    let ws = w.load();
    assert!(ws.manifest.target("v").is_some());
}

/// An executor whose `s0` fails on a full disk and `s1` on its input.
struct DiskFull;

impl Executor for DiskFull {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn format_version(&self) -> u32 {
        1
    }
    fn plan(&self, _: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        plan_by_id(decl)
    }
    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        if ctx.artifact.to_string() == "t:s0" {
            let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
            Err(ActionError::because("writing the dataset", full))
        } else {
            Err(ActionError::msg("the recipe names no teacher"))
        }
    }
}

/// Hostile testing: a full disk failed a build with exit status 1, the status of a failed
/// action, where forge's documented status for "could not do its work" is 3. An action that
/// fails on forge's own I/O is counted apart, whatever wraps the `io::Error`.
#[test]
fn a_full_disk_is_an_io_failure_not_an_action_failure() {
    let w = Ws::new("forge 1\ntarget \"t\" {\n command \"s0\" { run \"x\"; }\n command \"s1\" { run \"x\"; }\n}\n");
    let mut registry = Registry::default();
    registry.register(Arc::new(DiskFull));
    let ws = w.load_with(LoadOptions { registry, ..LoadOptions::default() });
    let (s, ev) = w.build_with(&ws, &[], BuildOptions { keep_going: true, ..BuildOptions::default() });
    assert_eq!((s.failed, s.io_failed), (2, 1), "{ev:#?}");
    let io: Vec<(String, bool)> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Fail { artifact, io, .. } => Some((artifact.clone(), *io)),
            _ => None,
        })
        .collect();
    assert!(io.contains(&("t:s0".into(), true)) && io.contains(&("t:s1".into(), false)), "{io:?}");
    assert!(ev.iter().any(|e| matches!(e, Event::Fail { error, .. } if error.starts_with("writing the dataset: "))));
}
