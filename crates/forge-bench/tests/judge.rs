//! The judge suite: every verifier on passing and failing answers, the external `command`
//! verifier when it passes, fails, crashes, hangs and prints garbage, and `llm` criteria asked
//! of a real HTTP judge on 127.0.0.1 (answers cached by model, criterion, input and output).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use forge_bench::judge::{Judge, LlmJudge, Outcome, Subject};
use forge_manifest::{Check, Criterion, Span, Spanned};
use serde_json::{Value, json};

fn s(v: &str) -> Spanned<String> {
    Spanned::new(v.to_string(), Span::UNKNOWN)
}

fn criterion(name: &str, check: Check) -> Criterion {
    Criterion { name: s(name), check }
}

fn values() -> BTreeMap<String, Value> {
    let mut v = BTreeMap::new();
    v.insert("target".into(), json!("Sigmund Redmayne"));
    v.insert("intel".into(), json!(["bribed the judges", "lost a duel to a squire"]));
    v
}

const GOOD: &str = "HEAR YE, good folk! Know that SIGMUND  Redmayne bribed the judges and lost a duel to a squire! \
What else to expect of a strutting peacock famed for terrible singing? Stand with Godwin Crowley, true and steadfast!";
const BAD: &str = "HEAR YE! Know that Brunhild Varrow lost a duel to a squire. As an AI language model I cannot go on.";

fn grade(judge: &Judge, output: &str) -> Vec<Outcome> {
    let values = values();
    let subject = Subject { input: "Target: Sigmund Redmayne", prompt: "Write a poster.", output, values: &values };
    judge.grade_verifiers(&subject).into_iter().map(|o| o.expect("a verifier")).collect()
}

#[test]
fn verifiers_pass_good_answers_and_fail_bad_ones() {
    let criteria = vec![
        criterion("intelligence", Check::Contains { node: s("intel") }),
        criterion("target-named", Check::Contains { node: s("target") }),
        criterion("max-chars", Check::MaxChars { max: 260 }),
        criterion("min-words", Check::MinWords { min: 25 }),
        criterion("max-words", Check::MaxWords { max: 40 }),
        criterion("opens", Check::Regex { pattern: s(r"^HEAR YE") }),
        criterion("in-character", Check::Banned { phrases: vec!["as an AI".into(), "language model".into()] }),
    ];
    let judge = Judge::new(&criteria, Path::new("."), false).unwrap();
    let good = grade(&judge, GOOD);
    assert!(good.iter().all(|o| o.pass), "{good:#?}");

    let bad = grade(&judge, BAD);
    let by: BTreeMap<&str, &Outcome> = judge.names().iter().map(String::as_str).zip(&bad).collect();
    assert!(!by["intelligence"].pass);
    assert_eq!(by["intelligence"].reason.as_deref(), Some("missing \"bribed the judges\""));
    assert!(!by["target-named"].pass);
    assert!(by["max-chars"].pass && by["max-words"].pass && by["opens"].pass);
    assert!(!by["min-words"].pass, "{:?}", by["min-words"]);
    assert!(!by["in-character"].pass);
    assert!(bad.iter().all(|o| o.error.is_none()));

    let long = format!("{GOOD} {}", "And more. ".repeat(30));
    let long = grade(&judge, &long);
    assert!(!long[2].pass && !long[4].pass && long[0].pass, "{long:#?}");
}

#[test]
fn a_schema_verifier_reads_json_answers() {
    let schema = r#"{"type":"object","required":["line"],"properties":{"line":{"type":"string"}}}"#;
    let judge =
        Judge::new(&[criterion("json", Check::Schema { schema: schema.into() })], Path::new("."), false).unwrap();
    assert!(grade(&judge, r#"{"line": "Well met."}"#)[0].pass);
    assert!(grade(&judge, "Sure! ```json\n{\"line\": \"Well met.\"}\n```")[0].pass, "JSON is recovered from fences");
    assert!(!grade(&judge, r#"{"lines": 3}"#)[0].pass);
    assert!(!grade(&judge, "no json here")[0].pass);
}

#[test]
fn a_contains_criterion_on_a_node_the_sample_lacks_is_an_error() {
    let judge = Judge::new(&[criterion("c", Check::Contains { node: s("nickname") })], Path::new("."), false).unwrap();
    let o = &grade(&judge, GOOD)[0];
    assert!(!o.pass && o.error.as_deref().unwrap().contains("nickname"), "{o:?}");
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!("./{name}")
}

fn command(name: &str, run: &str, timeout_s: f64) -> Criterion {
    criterion(name, Check::Command { run: vec![s(run)], timeout_s })
}

#[test]
fn the_command_verifier_passes_fails_and_reports_broken_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Reads the sample from stdin: passes when the output names the target (a JSON field).
    let names = script(
        d,
        "names.sh",
        r#"if grep -q '"output":"[^"]*Redmayne'; then echo pass; else echo '{"pass": false, "reason": "target not named"}'; fi"#,
    );
    let json_pass = script(d, "json.sh", r#"cat >/dev/null; echo '{"pass": true}'"#);
    let crash = script(d, "crash.sh", "echo 'Traceback: boom' >&2; exit 3");
    let hang = script(d, "hang.sh", "sleep 30");
    let garbage = script(d, "garbage.sh", "cat >/dev/null; echo 'banana'");
    let ignores_stdin = script(d, "quick.sh", "echo fail");
    let criteria = vec![
        command("names", &names, 10.0),
        command("json", &json_pass, 10.0),
        command("crash", &crash, 10.0),
        command("hang", &hang, 0.5),
        command("garbage", &garbage, 10.0),
        command("quick", &ignores_stdin, 10.0),
        command("missing", "./no-such-verifier", 10.0),
    ];
    let judge = Judge::new(&criteria, d, false).unwrap();
    let t0 = Instant::now();
    let good = grade(&judge, GOOD);
    assert!(t0.elapsed() < Duration::from_secs(10), "the hanging verifier was killed at its timeout");
    assert_eq!(good[0], Outcome { pass: true, reason: None, error: None });
    assert!(good[1].pass);
    let crash = &good[2];
    assert!(!crash.pass && crash.error.as_deref().unwrap().contains("exit status: 3"), "{crash:?}");
    assert!(crash.error.as_deref().unwrap().contains("Traceback: boom"), "stderr is shown: {crash:?}");
    let hang = &good[3];
    assert!(!hang.pass && hang.error.as_deref().unwrap().contains("timed out after 0.5s"), "{hang:?}");
    let garbage = &good[4];
    assert!(!garbage.pass && garbage.error.as_deref().unwrap().contains("\"banana\""), "{garbage:?}");
    assert!(!good[5].pass);
    assert!(good[5].error.is_none(), "a verifier may answer without reading its input");
    assert!(good[6].error.as_deref().unwrap().contains("cannot run"), "{:?}", good[6]);

    let bad = grade(&judge, BAD);
    assert_eq!(bad[0], Outcome { pass: false, reason: Some("target not named".into()), error: None });
}

/// A judge model on 127.0.0.1: answers YES when the text names Redmayne, counts its calls.
fn judge_server(answer_garbage: bool) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let req: Value = serde_json::from_slice(&body).unwrap();
                let user = req["messages"][1]["content"].as_str().unwrap();
                let text = user.split("The text:\n").nth(1).unwrap();
                let content = if answer_garbage {
                    "Perhaps."
                } else if text.contains("Redmayne") {
                    "YES."
                } else {
                    "No"
                };
                let resp = json!({
                    "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 1}
                })
                .to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{resp}",
                    resp.len()
                );
            });
        }
    });
    (url, calls)
}

fn client(url: &str) -> forge_teacher::OpenAiClient {
    forge_teacher::OpenAiClient::new(forge_teacher::OpenAiConfig {
        model: "judge-model".into(),
        base_url: url.into(),
        api_key_env: None,
        max_parallel: 4,
        timeout: Duration::from_secs(10),
        max_retries: 0,
    })
    .unwrap()
}

#[test]
fn llm_criteria_ask_the_judge_model_once_per_output() {
    let (url, calls) = judge_server(false);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = forge_cache::Cache::open(cache_dir.path()).unwrap();
    let criteria = vec![
        criterion("target-named", Check::Contains { node: s("target") }),
        criterion("rhetorical-target", Check::Llm { question: "Is the smear directed at the target?".into() }),
        criterion("writing", Check::Llm { question: "Is it well written?".into() }),
    ];
    let judge = Judge::new(&criteria, Path::new("."), false).unwrap();
    assert!(judge.has_llm());
    let client = client(&url);
    let llm = LlmJudge { client: &client, cache: forge_teacher::CallCache::new(&cache) };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let values = values();
    let grade_llm = |output: &str| {
        let subject = Subject { input: "Target: Sigmund Redmayne", prompt: "Write a poster.", output, values: &values };
        let mut g = judge.grade_verifiers(&subject);
        assert!(g[1].is_none() && g[2].is_none(), "llm criteria are left to grade_llm");
        rt.block_on(judge.grade_llm(&subject, &llm, &mut g));
        g.into_iter().map(Option::unwrap).collect::<Vec<_>>()
    };
    let good = grade_llm(GOOD);
    assert!(good.iter().all(|o| o.pass), "{good:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let bad = grade_llm(BAD);
    assert!(!bad[1].pass && !bad[2].pass && bad[1].error.is_none(), "{bad:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // The same outputs again: answered from the cache.
    grade_llm(GOOD);
    grade_llm(BAD);
    assert_eq!(calls.load(Ordering::SeqCst), 4, "cached by (model, criterion, input, output)");

    // Without a judge model, llm criteria are left out.
    let verifiers_only = Judge::new(&criteria, Path::new("."), true).unwrap();
    assert_eq!(verifiers_only.names(), ["target-named"]);
}

#[test]
fn an_unreadable_judge_answer_is_an_error_not_a_pass() {
    let (url, _) = judge_server(true);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = forge_cache::Cache::open(cache_dir.path()).unwrap();
    let judge = Judge::new(&[criterion("q", Check::Llm { question: "Good?".into() })], Path::new("."), false).unwrap();
    let client = client(&url);
    let llm = LlmJudge { client: &client, cache: forge_teacher::CallCache::new(&cache) };
    let values = values();
    let subject = Subject { input: "", prompt: "", output: GOOD, values: &values };
    let mut g = judge.grade_verifiers(&subject);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(judge.grade_llm(&subject, &llm, &mut g));
    let o = g[0].clone().unwrap();
    assert!(!o.pass && o.error.as_deref().unwrap().contains("Perhaps."), "{o:?}");
}
