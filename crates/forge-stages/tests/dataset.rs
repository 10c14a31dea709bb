//! The dataset stage against OpenAI-compatible teachers that are real HTTP servers on
//! 127.0.0.1 (forge-fake-teacher), built through forge's planner and engine as `forge build`
//! does: a one-slot server at max-parallel 8, a server that echoes the key, refused and
//! malformed keys, progress lines, token bounds and wasted tokens, and a journal with
//! duplicated lines.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use forge_fake_teacher::{FakeTeacher, Faults, Serving, default_answer};
use forge_plan::{BuildOptions, CancelToken, Collect, Engine, Event, LoadOptions, Registry, Summary, Workspace};
use serde_json::Value;

const ECHO_KEY: &str = "sk-echoed-Secret+key/0123456789-abcdefghij";
const REFUSED_KEY: &str = "sk-refused-0123456789abcdefghij";

/// The variables these tests read, set once before any test reads one.
fn env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: set once, before any test of this binary reads these variables.
        unsafe {
            std::env::set_var("FORGE_DATA_TEST_ECHO_KEY", ECHO_KEY);
            std::env::set_var("FORGE_DATA_TEST_REFUSED_KEY", REFUSED_KEY);
            std::env::set_var("FORGE_DATA_TEST_CRLF_KEY", "sk-edited-on-windows-0123456789\r");
        }
    });
}

const LORE: &str = r#"
list "heroes" {
    items "Alaric" "Berengar" "Cedric" "Dunstan" "Edric" "Fulk" "Godwin" "Hamund" "Ivo" "Jocelin"
    items "Adelaide" "Brunhild" "Cecily" "Donella" "Edith" "Filippa" "Gisela" "Hildegard"
}
list "places" {
    items "Highmere" "Saltreach" "Kaldmark" "Greywater" "Mirewish" "Low Tide" "Drowned Rat"
}
recipe "posters" {
    choice "hero" from="heroes"
    choice "place" from="places"
    input "{{ hero }} of {{ place }}"
    prompt "Write a short poster about {{ hero }} of {{ place }}."
    validate {
        min-words 5
        max-chars 500
        dedup #true
    }
}
"#;

/// A workspace whose one model's dataset asks `teacher` (the attributes of a `teacher` node).
fn workspace(teacher: &str, samples: u32) -> tempfile::TempDir {
    env();
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        "forge 1\n{LORE}\nteacher \"t\" kind=\"openai\" model=\"fake-4o\" {teacher}\n\
         model \"m\" recipe=\"posters\" {{\n    dataset samples={samples} eval=2 seed=7 teacher=\"t\" attempts=3\n}}\n"
    );
    std::fs::write(dir.path().join("forge.kdl"), manifest).unwrap();
    dir
}

struct Built {
    summary: Summary,
    events: Vec<Event>,
    /// The dataset artifact's directory, when it was built.
    dataset: Option<PathBuf>,
    seconds: f64,
}

impl Built {
    fn error(&self) -> String {
        self.events
            .iter()
            .find_map(|e| match e {
                Event::Fail { error, .. } => Some(error.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn progress(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Progress { done, total, message, .. } => Some(format!("{done}/{total} {message}")),
                _ => None,
            })
            .collect()
    }

    fn samples(&self) -> Vec<Value> {
        let dir = self.dataset.as_ref().expect("the dataset was built");
        let mut all = Vec::new();
        for split in ["train.jsonl", "eval.jsonl"] {
            for line in std::fs::read_to_string(dir.join(split)).unwrap().lines() {
                all.push(serde_json::from_str(line).unwrap());
            }
        }
        all.sort_by_key(|s: &Value| s["index"].as_u64());
        all
    }
}

/// `forge build` of the workspace in `dir`, with the dataset stage, through the engine.
fn build(dir: &Path, cancel: CancelToken) -> Built {
    let mut registry = Registry::with_builtin();
    registry.register(Arc::new(forge_stages::dataset::DatasetExecutor));
    let ws = Workspace::load(dir, LoadOptions { registry, config_cache: false, ..LoadOptions::default() }).unwrap();
    let engine = Engine::new(&ws);
    let selection = ws.plan.select(&[], None).unwrap();
    let sink = Collect::default();
    let t0 = Instant::now();
    let summary = engine.build(&selection, &BuildOptions { jobs: 1, cancel, ..BuildOptions::default() }, &sink);
    let seconds = t0.elapsed().as_secs_f64();
    engine.persist().unwrap();
    let events = sink.take();
    let dataset = events.iter().find_map(|e| match e {
        Event::Finish { artifact, content, .. } if artifact == "m:dataset" => Some(ws.cache.cas_dir(content)),
        _ => None,
    });
    Built { summary, events, dataset, seconds }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(".forge-cache/logs-v1/m--dataset.log")).unwrap_or_default()
}

/// Every file under `dir`, with its path.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        // A directory may not exist yet, or a file be gone by the time it is read (a build is
        // running): skip those.
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(t) = entry.file_type() else { continue };
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file()
                && let Ok(bytes) = std::fs::read(entry.path())
            {
                out.push((entry.path(), bytes));
            }
        }
    }
    out
}

fn journals(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join(".forge-cache/work-v1"))
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.file_name().is_some_and(|n| n == "journal.jsonl"))
        .collect()
}

/// Neither `key` nor any encoding or 12-character piece of it is in `text`.
fn assert_no_key(what: &str, text: &str, key: &str) {
    let r = forge_teacher::Redactor::new([key]);
    assert_eq!(r.redact(text), text, "{what} holds the key (or an encoding of it): {text}");
}

/// The number before `word` in a progress message (`12 calls` → 12).
fn count(message: &str, word: &str) -> u64 {
    let words: Vec<&str> = message.split([' ', '(', ',']).filter(|w| !w.is_empty()).collect();
    let i = words.iter().position(|w| *w == word).unwrap_or_else(|| panic!("no `{word}` in {message}"));
    words[i - 1].parse().unwrap_or_else(|_| panic!("no count before `{word}` in {message}"))
}

/// The default answer, or for about a third of the requests (by their seed) one far longer
/// than the recipe's `max-chars 500`. A pure function of the request, as a seeded model is.
fn sometimes_too_long(body: &Value) -> String {
    let a = default_answer(body);
    let seed = body["seed"].as_u64().unwrap_or(0);
    if blake3::hash(&seed.to_le_bytes()).as_bytes()[0] % 3 == 1 {
        format!("{a} {}", "And furthermore, hear this. ".repeat(25))
    } else {
        a
    }
}

/// llama.cpp's server with one slot answers one request at a time and queues the rest; at
/// max-parallel 8 and a timeout shorter than 8 answers, the dataset must still be made without
/// flooding that queue with requests that time out (the hostile run sent 99 requests in 20
/// minutes, 64 timed out, none accepted).
#[test]
fn a_one_slot_teacher_at_max_parallel_8_completes_with_few_extra_requests() {
    let latency = Duration::from_millis(200);
    let samples = 16;
    for advertise in [false, true] {
        let server = FakeTeacher::serving(
            Faults { latency, ..Faults::default() },
            Serving { slots: Some(1), advertise_slots: advertise, ..Serving::default() },
            Arc::new(default_answer),
        );
        // timeout 1 s: five answers' time, less than the eight a full window queues.
        let ws =
            workspace(&format!("base-url=\"{}\" max-parallel=8 timeout=1 max-retries=8", server.base_url()), samples);
        let b = build(ws.path(), CancelToken::new());
        let received = server.received();
        eprintln!(
            "advertise={advertise}: {:.1}s, {received} requests received, {} cancelled by timeouts, {} answered\n{}",
            b.seconds,
            server.cancelled(),
            server.answered(),
            log(ws.path())
        );
        assert!(b.summary.ok(), "{}", b.error());
        let all = b.samples();
        assert_eq!(all.len(), samples as usize);
        let outputs: std::collections::BTreeSet<&str> = all.iter().map(|s| s["output"].as_str().unwrap()).collect();
        assert_eq!(outputs.len(), samples as usize);
        assert!(
            received <= samples as u64 + samples as u64 / 4,
            "{received} requests for {samples} samples: at most 25% more"
        );
        // Every request that timed out was dropped by the server (it stopped generating).
        assert_eq!(server.received() - server.cancelled(), server.answered() as u64);
        if advertise {
            assert_eq!(received, samples as u64, "a server that says it has one slot gets one request at a time");
            assert!(log(ws.path()).contains("server slots 1 (the server said)"), "{}", log(ws.path()));
        }
        assert!(b.seconds < 20.0, "{:.1}s", b.seconds);
    }
}

/// A server that echoes the `Authorization` header in its error bodies: the key must reach no
/// error, event (the `--json` stream), log, journal, cache entry or artifact.
#[test]
fn a_server_echoing_the_key_leaks_it_nowhere() {
    for status in [400, 401, 500] {
        let server = FakeTeacher::serving(
            Faults::default(),
            Serving { echo_authorization: Some(status), ..Serving::default() },
            Arc::new(default_answer),
        );
        let ws = workspace(
            &format!(
                "base-url=\"{}\" api-key-env=\"FORGE_DATA_TEST_ECHO_KEY\" max-parallel=4 timeout=5 max-retries=0",
                server.base_url()
            ),
            4,
        );
        let b = build(ws.path(), CancelToken::new());
        assert!(!b.summary.ok());
        assert_eq!(server.requests()[0].authorization.as_deref(), Some(format!("Bearer {ECHO_KEY}").as_str()));
        let error = b.error();
        assert!(error.contains("[redacted]"), "HTTP {status}: the echo is reported, redacted: {error}");
        for e in &b.events {
            assert_no_key("an event", &serde_json::to_string(e).unwrap(), ECHO_KEY);
        }
        let all = files(ws.path());
        assert!(all.iter().any(|(p, _)| p.ends_with("m--dataset.log")));
        for (path, bytes) in &all {
            assert_no_key(&path.display().to_string(), &String::from_utf8_lossy(bytes), ECHO_KEY);
        }
        if status != 401 {
            // Failures of single requests were journaled (redacted) before the run gave up.
            let journal = journals(ws.path());
            assert_eq!(journal.len(), 1, "HTTP {status}");
            let text = std::fs::read_to_string(&journal[0]).unwrap();
            assert!(text.contains("[redacted]") && text.contains("teacher-error"), "{text}");
        }
    }
}

/// A refused key (and 403, a model the server does not have) stops the dataset at the first
/// answer with one message naming the key's variable — not dozens of retries.
#[test]
fn a_permanent_401_stops_the_dataset_at_once() {
    for status in [401, 403, 404] {
        let server = FakeTeacher::serving(
            Faults::default(),
            Serving { echo_authorization: Some(status), ..Serving::default() },
            Arc::new(default_answer),
        );
        let ws = workspace(
            &format!(
                "base-url=\"{}\" api-key-env=\"FORGE_DATA_TEST_REFUSED_KEY\" max-parallel=8 timeout=5 max-retries=8",
                server.base_url()
            ),
            12,
        );
        let b = build(ws.path(), CancelToken::new());
        assert!(!b.summary.ok());
        let error = b.error();
        eprintln!("HTTP {status}: {error}");
        assert!(b.seconds < 5.0, "{:.1}s", b.seconds);
        assert!(server.received() <= 4, "HTTP {status}: {} requests", server.received());
        assert!(error.contains(&format!("HTTP {status}")) && error.contains("not retried"), "{error}");
        if status != 404 {
            assert!(error.contains("$FORGE_DATA_TEST_REFUSED_KEY"), "{error}");
        }
        assert_no_key("the error", &error, REFUSED_KEY);
        // Nothing about the samples was journaled: fixing the key resumes cleanly.
        for j in journals(ws.path()) {
            assert_eq!(std::fs::read_to_string(j).unwrap(), "");
        }
    }
}

/// A key read from a Windows-edited env file ends in `\r`: no request can be sent with it. The
/// dataset must fail at once saying so, not sit at "0/4 samples" retrying.
#[test]
fn a_key_with_a_carriage_return_fails_the_dataset_before_any_request() {
    let server = FakeTeacher::start(Faults::default());
    let ws = workspace(
        &format!(
            "base-url=\"{}\" api-key-env=\"FORGE_DATA_TEST_CRLF_KEY\" max-parallel=4 timeout=5",
            server.base_url()
        ),
        4,
    );
    let b = build(ws.path(), CancelToken::new());
    assert!(!b.summary.ok());
    let error = b.error();
    assert!(b.seconds < 5.0, "{:.1}s", b.seconds);
    assert_eq!(server.received(), 0, "no request was sent");
    assert!(error.contains("$FORGE_DATA_TEST_CRLF_KEY") && error.contains("carriage return"), "{error}");
    assert!(error.contains("Windows line endings"), "{error}");
    assert!(!error.contains("sk-edited"), "{error}");
}

/// Answers that are too long (a third of them), and every 7th request hanging past the
/// timeout: the progress line must show calls, answers, rejections and timeouts as they happen.
#[test]
fn progress_shows_calls_answers_rejections_and_timeouts() {
    let server = FakeTeacher::with_responder(
        Faults {
            every_hang: Some(7),
            hang: Duration::from_secs(3),
            latency: Duration::from_millis(20),
            ..Faults::default()
        },
        Arc::new(sometimes_too_long),
    );
    let ws = workspace(&format!("base-url=\"{}\" max-parallel=4 timeout=0.5 max-retries=8", server.base_url()), 12);
    let b = build(ws.path(), CancelToken::new());
    assert!(b.summary.ok(), "{}", b.error());
    let lines = b.progress();
    let last = lines.last().expect("progress lines");
    eprintln!("{} progress lines; last: {last}", lines.len());
    assert!(last.starts_with("12/12 samples ("), "{last}");
    assert!(count(last, "calls") >= count(last, "answers") && count(last, "answers") >= 12, "{last}");
    assert!(count(last, "rejected") >= 3, "{last}");
    assert!(count(last, "timed") >= 1, "{last}");
    // While samples were still missing, the line already said what the teacher was doing.
    assert!(lines.iter().any(|l| !l.starts_with("12/12") && count(l, "calls") > 0), "{lines:#?}");
}

/// The recipe's `max-chars 500` bounds the final prompt's max_tokens (the hostile run's teacher
/// wrote 1,096 tokens for a 500-character poster), and the tokens of rejected answers are
/// reported.
#[test]
fn max_chars_bounds_max_tokens_and_wasted_tokens_are_reported() {
    let server = FakeTeacher::with_responder(Faults::default(), Arc::new(sometimes_too_long));
    let ws = workspace(&format!("base-url=\"{}\" max-parallel=4 timeout=5", server.base_url()), 8);
    let b = build(ws.path(), CancelToken::new());
    assert!(b.summary.ok(), "{}", b.error());
    let seen = server.requests();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(s.body["max_tokens"], 500 + 500 / 8 + 16, "{}", s.body);
    }
    let log = log(ws.path());
    let line =
        log.lines().find(|l| l.starts_with("tokens wasted on rejected answers:")).unwrap_or_else(|| panic!("{log}"));
    let wasted: u64 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert!(wasted > 0, "{line}");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(b.dataset.unwrap().join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["wasted"]["prompt"]["completion_tokens"].as_u64(), Some(wasted), "{meta:#}");
    assert!(meta["usage"]["prompt"]["completion_tokens"].as_u64().unwrap() > wasted);
}

/// An interrupted build leaves its journal; a journal whose lines were duplicated (and whose
/// last line was torn) must resume into exactly the dataset an uninterrupted build makes —
/// not fail every later build until `forge clean --all`.
#[test]
fn duplicated_journal_lines_do_not_break_later_builds() {
    let server = FakeTeacher::start(Faults { latency: Duration::from_millis(30), ..Faults::default() });
    let teacher = format!("base-url=\"{}\" max-parallel=2 timeout=5", server.base_url());
    let samples = 24;
    let ws = workspace(&teacher, samples);
    // Interrupt once a few samples are committed.
    let cancel = CancelToken::new();
    let watcher = {
        let cancel = cancel.clone();
        let dir = ws.path().to_path_buf();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                let lines: usize =
                    journals(&dir).iter().map(|j| std::fs::read_to_string(j).unwrap_or_default().lines().count()).sum();
                if lines >= 6 {
                    cancel.cancel();
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let b = build(ws.path(), cancel);
    watcher.join().unwrap();
    assert!(!b.summary.ok(), "interrupted");
    let journal = journals(ws.path());
    assert_eq!(journal.len(), 1);
    let text = std::fs::read_to_string(&journal[0]).unwrap();
    assert!(text.lines().count() >= 6 && text.lines().count() < samples as usize, "{text}");
    // Every line twice, then a torn line.
    let first = text.lines().next().unwrap();
    std::fs::write(&journal[0], format!("{text}{text}{}", &first[..first.len() / 2])).unwrap();

    let resumed = build(ws.path(), CancelToken::new());
    assert!(resumed.summary.ok(), "{}", resumed.error());
    assert!(log(ws.path()).contains("ignored"), "{}", log(ws.path()));
    let clean_ws = workspace(&teacher, samples);
    let clean = build(clean_ws.path(), CancelToken::new());
    assert!(clean.summary.ok(), "{}", clean.error());
    assert_eq!(resumed.samples(), clean.samples(), "the resumed dataset is the uninterrupted one");
    assert_eq!(resumed.samples().len(), samples as usize);
    // And a further build is a no-op, not a failure.
    let again = build(ws.path(), CancelToken::new());
    assert!(again.summary.ok() && again.summary.built == 0, "{:?}", again.summary);
}

/// A rejected sample is asked for again; a seeded server answers the same request the same
/// way, so the new attempt must be a new request (a new seed), or it only buys the rejected
/// answer again (SmolLM2 behind llama.cpp's server wrote the same 578-token poster three times).
#[test]
fn retries_of_a_rejected_sample_use_a_new_seed() {
    let server = FakeTeacher::with_responder(Faults::default(), Arc::new(sometimes_too_long));
    let ws = workspace(&format!("base-url=\"{}\" max-parallel=4 timeout=5", server.base_url()), 12);
    let b = build(ws.path(), CancelToken::new());
    assert!(b.summary.ok(), "{}", b.error());
    let mut by_prompt: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for s in server.requests() {
        by_prompt.entry(s.body["messages"].to_string()).or_default().push(s.body["seed"].as_u64().unwrap());
    }
    let retried: Vec<&Vec<u64>> = by_prompt.values().filter(|seeds| seeds.len() > 1).collect();
    assert!(!retried.is_empty(), "some samples were rejected and asked for again");
    for seeds in retried {
        let distinct: std::collections::BTreeSet<&u64> = seeds.iter().collect();
        assert_eq!(distinct.len(), seeds.len(), "a retry repeated a seed: {seeds:?}");
    }
    // And so a sample rejected once is usually accepted at its next attempt, not given up.
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(b.dataset.unwrap().join("meta.json")).unwrap()).unwrap();
    assert!(meta["rejected"]["max-chars"].as_u64().unwrap() > 0, "{meta:#}");
    assert!(meta["abandoned"].as_u64().unwrap() < meta["rejected"]["max-chars"].as_u64().unwrap(), "{meta:#}");
}
