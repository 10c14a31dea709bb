//! The dataset stage end to end: the shipped DefameLM recipe and lore, an OpenAI-compatible
//! teacher that is a real HTTP server on 127.0.0.1 (injecting faults), and the `forge` binary.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use forge_fake_teacher::{FakeTeacher, Faults};
use serde_json::Value;

/// Answers that pass the recipe's validators: a one-sentence backstory for the `generate`
/// nodes, a 40-word poster for the final prompt. Each is unique to its request.
fn answer(body: &Value) -> String {
    let digest = blake3::hash(body.to_string().as_bytes()).to_hex();
    let system = body["messages"][0]["content"].as_str().unwrap_or_default();
    if system.contains("terse lore") {
        format!("Raised among goats and ledgers, this one keeps a grudge numbered {}.", &digest[..12])
    } else {
        format!(
            "HEAR YE, good people! Poster {} proclaims that the target is a scoundrel of the lowest sort, \
             fit only to muck out the stables of honest folk. Trust instead the sender, whose word is iron \
             and whose purse is open to all who ask.",
            &digest[..16]
        )
    }
}

/// A workspace with the repository's lore and DefameLM recipe, asking `base_url` for answers.
fn defame_workspace(base_url: &str, samples: u32, eval: u32, max_parallel: u32) -> TestWorkspace {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ws = TestWorkspace::with_manifest(&format!(
        r#"forge 1
include "worlds/*.kdl" "recipes/defame.kdl"
teacher "fake" kind="openai" model="fake-4o" base-url="{base_url}" max-parallel={max_parallel} timeout=1 max-retries=10
model "defame" recipe="defame" {{
    dataset samples={samples} eval={eval} seed=7 teacher="fake" split-by="audience" attempts=3
}}
"#
    ));
    for entry in std::fs::read_dir(root.join("worlds/ardenfall")).unwrap() {
        let entry = entry.unwrap();
        ws.write(
            &format!("worlds/{}", entry.file_name().to_string_lossy()),
            &std::fs::read_to_string(entry.path()).unwrap(),
        );
    }
    ws.write("recipes/defame.kdl", &std::fs::read_to_string(root.join("recipes/defame.kdl")).unwrap());
    ws
}

fn samples(ws: &TestWorkspace) -> Vec<Value> {
    let dir = ws.artifact_path("defame:dataset");
    let mut all = Vec::new();
    for split in ["train.jsonl", "eval.jsonl"] {
        for line in std::fs::read_to_string(dir.join(split)).unwrap().lines() {
            all.push(serde_json::from_str(line).unwrap());
        }
    }
    all
}

fn assert_exactly(samples: &[Value], n: usize) {
    assert_eq!(samples.len(), n);
    let ids: std::collections::BTreeSet<&str> = samples.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), n, "sample ids are unique");
    let outputs: std::collections::BTreeSet<&str> = samples.iter().map(|s| s["output"].as_str().unwrap()).collect();
    assert_eq!(outputs.len(), n, "outputs are unique");
}

/// Every entry of the teacher-call cache parses and holds a successful answer.
fn cached_answers(ws: &TestWorkspace) -> usize {
    let mut n = 0;
    for entry in walkdir::WalkDir::new(ws.file(".forge-cache/teacher-v1")) {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let (_, body) = text.split_once('\n').expect("a checksum line");
        let v: Value = serde_json::from_str(body).expect("a cache entry is JSON");
        let content = v["response"]["content"].as_str().expect("an answer");
        assert!(content.starts_with("HEAR YE") || content.starts_with("Raised among goats"), "{content}");
        n += 1;
    }
    n
}

#[test]
fn exactly_n_samples_through_429s_500s_timeouts_slow_and_malformed_responses() {
    let server = FakeTeacher::with_responder(
        Faults {
            every_rate_limit: Some(7),
            retry_after: Some("0.1".into()),
            every_server_error: Some(11),
            every_hang: Some(29),
            hang: Duration::from_secs(3),
            every_malformed: Some(13),
            latency: Duration::from_millis(15),
            ..Faults::default()
        },
        Arc::new(answer),
    );
    let ws = defame_workspace(&server.base_url(), 40, 8, 6);
    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let all = samples(&ws);
    assert_exactly(&all, 40);
    let statuses: BTreeMap<u16, usize> = server.requests().iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.status).or_default() += 1;
        m
    });
    for status in [429, 500, 0, 2000] {
        assert!(statuses.get(&status).copied().unwrap_or(0) > 0, "fault {status} was injected: {statuses:?}");
    }
    // Only answers were cached, one per answered request, never an error.
    eprintln!("requests by status: {statuses:?}");
    assert_eq!(cached_answers(&ws), server.answered(), "{statuses:?}");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(ws.artifact_path("defame:dataset").join("meta.json")).unwrap())
            .unwrap();
    assert!(meta["usage"]["prompt"]["completion_tokens"].as_u64().unwrap() > 0, "{meta:#}");
    assert!(meta["usage"]["sender_backstory"]["prompt_tokens"].as_u64().unwrap() > 0, "{meta:#}");

    // Rebuilding from scratch replays every answer from the call cache: no request at all.
    let before = server.requests().len();
    assert_eq!(ws.run(&["clean", "defame"]).code(), 0);
    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(server.requests().len(), before, "the rebuild asked the teacher again");
    assert_eq!(samples(&ws), all, "the rebuild reproduces the dataset");
}

/// Samples that change, teacher calls, and the causes with their counts.
type Said = (u64, u64, Vec<(String, u64)>);

/// What `forge status`, `forge why` and `forge build --dry-run` say rebuilding the stale
/// `defame:dataset` would do: (samples that change, teacher calls, the causes and their
/// counts). The three must agree.
fn estimate(ws: &TestWorkspace) -> Said {
    let r = ws.run(&["status", "--json", "defame:dataset"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout()).unwrap();
    let e = &v["artifacts"][0]["estimate"];
    assert_eq!(v["artifacts"][0]["status"], "stale", "{v:#}");
    let summary = e["summary"].as_str().unwrap().to_string();
    let changed: u64 = summary.split(' ').next().unwrap().parse().unwrap();
    let calls = e["cost"]["teacher_calls"].as_u64().unwrap();
    let causes: Vec<(String, u64)> = e["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["what"].as_str().unwrap().to_string(), c["count"].as_u64().unwrap()))
        .collect();
    let line = format!("{summary}: {calls} teacher call");
    let status = ws.run(&["status", "defame:dataset"]).stdout();
    assert!(status.contains(&line), "forge status says `{line}`: {status}");
    let why = ws.run(&["why", "defame:dataset"]).stdout();
    assert!(why.contains(&summary) && why.contains(&format!("would make {calls} teacher call")), "{why}");
    let dry = ws.run(&["build", "--dry-run"]);
    assert_eq!(dry.code(), 0, "{dry:?}");
    assert!(dry.stderr().contains(&line), "forge build --dry-run says `{line}`: {}", dry.stderr());
    assert!(dry.stderr().contains(&format!("the stale artifacts would make {calls} teacher call")), "{}", dry.stderr());
    eprintln!("{status}{why}{}", dry.stderr());
    (changed, calls, causes)
}

/// [`estimate`], then the build: and the teacher calls it made.
fn estimate_then_build(ws: &TestWorkspace, server: &FakeTeacher) -> (Said, usize) {
    let estimated = estimate(ws);
    let before = server.requests().len();
    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 0, "{r:?}");
    (estimated, server.requests().len() - before)
}

#[test]
fn adding_one_lore_entry_asks_only_for_the_samples_it_changes() {
    let server = FakeTeacher::with_responder(Faults::default(), Arc::new(answer));
    let n = 200;
    let ws = defame_workspace(&server.base_url(), n, 40, 16);
    let (never, calls, _) = estimate(&ws);
    assert_eq!((never, calls), (n as u64, 3 * n as u64), "a first build asks for everything");
    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let before = samples(&ws);
    let calls_before = server.requests().len();
    assert_eq!(calls_before, 3 * n as usize, "two backstories and a poster per sample");

    let lore = ws.read("worlds/intrigue.kdl").replacen(
        "list \"intelligence\" {",
        "list \"intelligence\" {\n    items \"sold the crown jewels to a travelling puppeteer\"",
        1,
    );
    ws.write("worlds/intrigue.kdl", &lore);
    let (estimated, estimated_calls, causes) = estimate(&ws);
    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let after = samples(&ws);
    assert_exactly(&after, n as usize);

    let by_id = |v: &[Value]| -> BTreeMap<String, Value> {
        v.iter().map(|s| (s["id"].as_str().unwrap().to_string(), s["values"].clone())).collect()
    };
    let (old, new) = (by_id(&before), by_id(&after));
    let changed = new.iter().filter(|(id, values)| old.get(*id) != Some(values)).count();
    let with_new_entry =
        after.iter().filter(|s| s["values"]["intel"].to_string().contains("travelling puppeteer")).count();
    let calls = server.requests().len() - calls_before;
    eprintln!("{changed} of {n} samples changed; {calls} teacher calls; estimated {estimated} and {estimated_calls}");
    // The new intelligence item only enters the poster prompt: one call per changed sample.
    assert_eq!(calls, changed, "teacher calls after the edit");
    assert_eq!(changed, with_new_entry, "only samples that now pick the new entry changed");
    assert!(changed > 0 && changed * 10 < n as usize, "{changed} of {n} samples changed");
    // Said before the build, to the sample and the call.
    assert_eq!((estimated, estimated_calls), (changed as u64, calls as u64));
    assert_eq!(causes, [("list \"intelligence\": +1 entry".to_string(), changed as u64)]);

    // Removing an entry changes the samples that had picked it; they pick another.
    let gone = "sleeps with a lantern lit for fear of the dark";
    let had_it = after.iter().filter(|s| s["values"]["intel"].to_string().contains(gone)).count();
    ws.write("worlds/intrigue.kdl", &ws.read("worlds/intrigue.kdl").replacen(&format!("items \"{gone}\""), "", 1));
    let ((estimated, estimated_calls, causes), calls) = estimate_then_build(&ws, &server);
    assert_eq!((estimated, estimated_calls), (had_it as u64, calls as u64), "{causes:?}");
    assert_eq!(causes, [("list \"intelligence\": −1 entry".to_string(), had_it as u64)]);

    // A country's attribute that the sender's backstory reads, and a place of its own (a
    // nested list) that the poster reads: the country's samples change, for two reasons.
    let valmora = samples(&ws).iter().filter(|s| s["values"]["sender_country"] == "Valmora").count();
    let realm = ws.read("worlds/realm.kdl").replacen("demonym=\"Valmoran\"", "demonym=\"Valmorese\"", 1).replacen(
        "items \"the Saltreach fish market\"",
        "items \"the gallows of Saltreach\" \"the Saltreach fish market\"",
        1,
    );
    ws.write("worlds/realm.kdl", &realm);
    let ((estimated, estimated_calls, causes), calls) = estimate_then_build(&ws, &server);
    let gallows = samples(&ws).iter().filter(|s| s["values"]["place"] == "the gallows of Saltreach").count();
    assert!(valmora > gallows && gallows > 0, "{valmora} {gallows}");
    assert_eq!((estimated, estimated_calls), (valmora as u64, calls as u64), "{causes:?}");
    assert_eq!(calls, 2 * valmora, "a sender backstory and a poster for each Valmoran sender");
    assert_eq!(
        causes,
        [
            ("list \"countries\": entry \"Valmora\" changed".to_string(), valmora as u64),
            ("list \"countries/Valmora/places\": +1 entry".to_string(), gallows as u64)
        ]
    );

    // A backstory's prompt edited: every sender backstory is asked again, and every poster,
    // which reads it; the target backstories are not.
    let recipe = ws.read("recipes/defame.kdl").replacen(
        "In one sentence, give a backstory for {{ sender }}",
        "In one sentence, tell the past of {{ sender }}",
        1,
    );
    ws.write("recipes/defame.kdl", &recipe);
    let ((estimated, estimated_calls, causes), calls) = estimate_then_build(&ws, &server);
    assert_eq!((estimated, estimated_calls), (n as u64, calls as u64));
    assert_eq!(calls, 2 * n as usize);
    assert_eq!(causes, [("node \"sender_backstory\" changed".to_string(), n as u64)]);
    // Fresh now: nothing to estimate, nothing asked.
    let dry = ws.run(&["build", "--dry-run"]);
    assert!(!dry.stderr().contains("teacher call"), "{}", dry.stderr());
}

#[test]
fn sigkill_during_generation_then_rerun_gives_exactly_n_unique_samples() {
    let server = FakeTeacher::with_responder(
        Faults { latency: Duration::from_millis(30), ..Faults::default() },
        Arc::new(answer),
    );
    let n = 150;
    let ws = defame_workspace(&server.base_url(), n, 30, 4);
    let mut child = ws.cmd(&["build"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Wait until a third of the samples are committed to the journal, then kill -9.
    let t0 = Instant::now();
    let journal_lines = || -> usize {
        walkdir::WalkDir::new(ws.file(".forge-cache/work-v1"))
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_name() == "journal.jsonl")
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().lines().count())
            .sum()
    };
    while journal_lines() < n as usize / 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "generation never got going");
        assert!(child.try_wait().unwrap().is_none(), "the build ended before it could be killed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let committed = journal_lines();
    let calls_first = server.requests().len();
    assert!(committed < n as usize, "killed before the end ({committed} committed)");

    let r = ws.run(&["build"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let resumed = samples(&ws);
    assert_exactly(&resumed, n as usize);
    let log = ws.read(".forge-cache/logs-v1/defame--dataset.log");
    assert!(log.contains("resuming:"), "{log}");
    // Nothing committed was asked for again: at most the calls in flight at the kill repeat.
    let calls_second = server.requests().len() - calls_first;
    eprintln!("killed after {committed} committed of {n}; {calls_first} calls before, {calls_second} after");
    assert!(calls_second <= 3 * (n as usize - committed) + 3 * 8, "{calls_second} calls to finish");

    // The result is exactly what an uninterrupted build makes.
    let clean = defame_workspace(&server.base_url(), n, 30, 4);
    assert_eq!(clean.run(&["build"]).code(), 0);
    assert_eq!(samples(&clean), resumed);
}
