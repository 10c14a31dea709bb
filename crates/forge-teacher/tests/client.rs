//! The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that injects faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forge_fake_teacher::{FakeTeacher, Faults, Serving, default_answer};
use forge_teacher::*;

fn config(base_url: String, max_parallel: u32, timeout: Duration, key_env: Option<&str>) -> OpenAiConfig {
    OpenAiConfig {
        model: "fake-4o".into(),
        base_url,
        api_key_env: key_env.map(str::to_string),
        max_parallel,
        timeout,
        max_retries: 8,
    }
}

fn client(server: &FakeTeacher, max_parallel: u32, timeout: Duration, key_env: Option<&str>) -> OpenAiClient {
    OpenAiClient::new(config(server.base_url(), max_parallel, timeout, key_env)).unwrap()
}

fn request(i: u64) -> ChatRequest {
    ChatRequest {
        provider: "openai".into(),
        model: "fake-4o".into(),
        base_url: String::new(),
        messages: vec![Message::system("You are a scribe."), Message::user(format!("Write poster number {i}."))],
        temperature: Some(0.7),
        top_p: None,
        max_tokens: Some(64),
        seed: Some(i),
        response_schema: None,
        node: "prompt".into(),
        sample: i,
        repeat: 0,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Sends requests `0..n` at once; returns the results in request order.
fn chat_all(c: &Arc<OpenAiClient>, n: u64) -> Vec<Result<ChatResponse, TeacherError>> {
    runtime().block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let c = c.clone();
            tasks.spawn(async move { (i, c.chat(&request(i)).await) });
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap());
        }
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, r)| r).collect()
    })
}

/// Sets a variable only this test reads.
fn set_key(var: &str, value: &str) {
    // SAFETY: each test uses its own variable, and nothing in this binary reads it concurrently.
    unsafe { std::env::set_var(var, value) };
}

#[test]
fn every_request_succeeds_through_429s_500s_timeouts_and_garbage() {
    let server = FakeTeacher::start(Faults {
        every_rate_limit: Some(5),
        retry_after: Some("0.2".into()),
        every_server_error: Some(7),
        every_hang: Some(11),
        hang: Duration::from_secs(5),
        every_malformed: Some(13),
        latency: Duration::from_millis(5),
        ..Faults::default()
    });
    let c = Arc::new(client(&server, 8, Duration::from_millis(500), None));
    let n = 60;
    let answers: Vec<ChatResponse> =
        chat_all(&c, n).into_iter().map(|r| r.expect("every request eventually succeeds")).collect();
    assert_eq!(answers.len(), n as usize);
    for (i, a) in answers.iter().enumerate() {
        assert!(a.content.contains(&format!("Write poster number {i}.")), "{a:?}");
        assert!(a.usage.completion_tokens > 0);
    }
    let stats = c.stats.snapshot();
    assert!(
        stats.rate_limited > 0 && stats.server_errors > 0 && stats.timeouts > 0 && stats.malformed > 0,
        "{stats:?}"
    );
    assert_eq!(stats.ok, n);
    assert!(c.window() < 8.0 + 1e-9);
    assert!(c.window_cuts() > 0, "429s and timeouts cut the window");
}

#[test]
fn retry_after_is_honoured() {
    // Every first request is rate limited with a 1 s Retry-After (then the 2nd succeeds).
    let server =
        FakeTeacher::start(Faults { every_rate_limit: Some(2), retry_after: Some("1".into()), ..Faults::default() });
    let c = client(&server, 4, Duration::from_secs(5), None);
    let rt = runtime();
    rt.block_on(c.chat(&request(0))).unwrap(); // request 1: ok
    let t0 = Instant::now();
    rt.block_on(c.chat(&request(1))).unwrap(); // request 2: 429, then 3: ok
    assert!(t0.elapsed() >= Duration::from_millis(950), "waited {:?}", t0.elapsed());
    assert_eq!(c.stats.snapshot().rate_limited, 1);
}

#[test]
fn client_errors_fail_fast_and_name_the_key_variable() {
    let server = FakeTeacher::with_responder(Faults::default(), Arc::new(default_answer));
    // A 404 from a wrong base URL is not retried.
    let c = OpenAiClient::new(config(format!("{}/nope", server.base_url()), 2, Duration::from_secs(5), None)).unwrap();
    let t0 = Instant::now();
    let err = runtime().block_on(c.chat(&request(0))).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(matches!(err, TeacherError::Rejected { status: 404, .. }), "{err}");
    assert!(err.to_string().contains("is `"), "{err}");
    assert!(err.stops_run(), "a wrong URL fails every request");

    let err =
        OpenAiClient::new(config(server.base_url(), 1, Duration::from_secs(1), Some("FORGE_TEST_SURELY_UNSET_KEY")))
            .unwrap_err();
    assert!(err.to_string().contains("$FORGE_TEST_SURELY_UNSET_KEY is not set"), "{err}");
}

#[test]
fn the_key_goes_only_in_the_authorization_header() {
    let server = FakeTeacher::start(Faults::default());
    set_key("FORGE_TEST_TEACHER_KEY", "sk-test-secret-123");
    let c = client(&server, 1, Duration::from_secs(5), Some("FORGE_TEST_TEACHER_KEY"));
    runtime().block_on(c.chat(&request(0))).unwrap();
    let seen = server.requests();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-test-secret-123"));
    assert!(!seen[0].body.to_string().contains("sk-test"));
    assert!(!format!("{c:?}").contains("sk-test"), "Debug output hides the key");
}

/// The cache key is a pure function of the request: the same request always has the same key
/// (also across forge versions: a changed derivation would orphan every cached answer), and
/// any change to what the teacher is asked changes it.
#[test]
fn request_keys_are_stable_and_tell_requests_apart() {
    let key = request(0).key();
    assert_eq!(key.hex().len(), 64);
    assert_eq!(key, request(0).key());
    assert_eq!(key.hex(), KNOWN_KEY_OF_REQUEST_0, "the key derivation changed: cached answers would be lost");
    assert_ne!(key, request(1).key());
    let mut other_repeat = request(0);
    other_repeat.repeat = 1;
    assert_ne!(key, other_repeat.key());
    let roundtrip: ChatRequest = serde_json::from_str(&serde_json::to_string(&request(0)).unwrap()).unwrap();
    assert_eq!(roundtrip.key(), key);
}

const KNOWN_KEY_OF_REQUEST_0: &str = "4c2691a6ce5032ae6843ac8d4c9787e4ed10ab9eecf14b4c56f3abef459b9b04";

#[test]
fn gives_up_after_max_retries_with_the_last_error() {
    let server = FakeTeacher::start(Faults { every_server_error: Some(1), ..Faults::default() });
    let mut cfg = config(server.base_url(), 1, Duration::from_secs(5), None);
    cfg.max_retries = 2;
    let c = OpenAiClient::new(cfg).unwrap();
    let err = runtime().block_on(c.chat(&request(0))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the teacher failed 3 times; last: server error 500 Internal Server Error: upstream exploded"
    );
    assert_eq!(server.requests().len(), 3);
    assert!(!err.stops_run());
}

/// Every form of `key` the fake server echoes, for asserting none of them got out.
fn assert_no_key(text: &str, key: &str) {
    assert!(!text.contains(key), "the key leaked: {text}");
    let pieces = [&key[..12], &key[key.len() - 12..]];
    for p in pieces {
        assert!(!text.contains(p), "part of the key leaked ({p}): {text}");
    }
    let r = Redactor::new([key]);
    assert_eq!(r.redact(text), text, "an encoding of the key leaked: {text}");
}

#[test]
fn a_server_echoing_the_key_never_gets_it_into_an_error() {
    let key = "sk-echo-5ecret-Key+with/odd=chars-0123456789";
    set_key("FORGE_TEST_ECHO_KEY", key);
    for status in [401, 400, 500, 503] {
        let server = FakeTeacher::serving(
            Faults::default(),
            Serving { echo_authorization: Some(status), ..Serving::default() },
            Arc::new(default_answer),
        );
        let mut cfg = config(server.base_url(), 2, Duration::from_secs(5), Some("FORGE_TEST_ECHO_KEY"));
        cfg.max_retries = 1;
        let c = OpenAiClient::new(cfg).unwrap();
        let err = runtime().block_on(c.chat(&request(0))).unwrap_err();
        // The server did echo it.
        let echoed = server.requests()[0].authorization.clone().unwrap();
        assert_eq!(echoed, format!("Bearer {key}"));
        let text = err.to_string();
        assert!(text.contains("[redacted]"), "HTTP {status}: {text}");
        assert!(text.contains("Incorrect API key provided"), "the rest of the body is kept: {text}");
        assert_no_key(&text, key);
        assert_no_key(&format!("{err:?}"), key);
    }
}

#[test]
fn a_permanent_401_fails_fast_naming_the_key_variable() {
    let key = "sk-refused-0123456789abcdef";
    set_key("FORGE_TEST_REFUSED_KEY", key);
    for status in [401, 403, 404, 402] {
        let server = FakeTeacher::serving(
            Faults::default(),
            Serving { echo_authorization: Some(status), ..Serving::default() },
            Arc::new(default_answer),
        );
        let c = Arc::new(client(&server, 8, Duration::from_secs(5), Some("FORGE_TEST_REFUSED_KEY")));
        let t0 = Instant::now();
        let results = chat_all(&c, 12);
        assert!(t0.elapsed() < Duration::from_secs(2), "HTTP {status}: {:?}", t0.elapsed());
        for r in &results {
            let e = r.as_ref().unwrap_err();
            assert!(matches!(e, TeacherError::Rejected { status: s, .. } if *s == status), "{e}");
            assert!(e.stops_run(), "{e}");
            assert!(e.to_string().contains("not retried"), "{e}");
            assert_no_key(&e.to_string(), key);
        }
        if matches!(status, 401 | 403) {
            let e = results[0].as_ref().unwrap_err().to_string();
            assert!(e.contains("$FORGE_TEST_REFUSED_KEY"), "{e}");
        }
        // Never retried, and once refused no other request is sent: at most the first window.
        assert!(server.received() <= 4, "HTTP {status}: {} requests", server.received());
        let before = server.received();
        let again = runtime().block_on(c.chat(&request(99))).unwrap_err();
        assert!(matches!(again, TeacherError::Rejected { .. }));
        assert_eq!(server.received(), before, "a refused client sends nothing more");
    }
}

#[test]
fn retryable_4xx_are_retried_and_other_4xx_are_not() {
    for (status, retried) in [(408, true), (409, true), (425, true), (400, false), (422, false)] {
        let server = FakeTeacher::serving(
            Faults::default(),
            Serving { echo_authorization: Some(status), ..Serving::default() },
            Arc::new(default_answer),
        );
        let mut cfg = config(server.base_url(), 1, Duration::from_secs(5), None);
        cfg.max_retries = 2;
        let c = OpenAiClient::new(cfg).unwrap();
        let err = runtime().block_on(c.chat(&request(0))).unwrap_err();
        let expected = if retried { 3 } else { 1 };
        assert_eq!(server.received(), expected, "HTTP {status}: {err}");
        assert!(!err.stops_run(), "HTTP {status} is about one request: {err}");
    }
}

#[test]
fn a_key_with_a_carriage_return_fails_before_any_request() {
    let server = FakeTeacher::start(Faults::default());
    set_key("FORGE_TEST_CRLF_KEY", "sk-windows-edited-0123456789\r");
    let t0 = Instant::now();
    let err = OpenAiClient::new(config(server.base_url(), 4, Duration::from_secs(5), Some("FORGE_TEST_CRLF_KEY")))
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_millis(500));
    let text = err.to_string();
    assert!(matches!(err, TeacherError::BadApiKey { .. }), "{text}");
    assert!(err.stops_run());
    assert!(text.contains("$FORGE_TEST_CRLF_KEY") && text.contains("carriage return"), "{text}");
    assert!(text.contains("Windows line endings"), "says how to fix it: {text}");
    assert!(!text.contains("sk-windows"), "{text}");
    assert_eq!(server.received(), 0);
    // A trailing newline and an inner space are refused the same way.
    for (bad, what) in [("sk-abc\n", "line feed"), ("sk abc", "space")] {
        set_key("FORGE_TEST_CRLF_KEY", bad);
        let e = OpenAiClient::new(config(server.base_url(), 4, Duration::from_secs(5), Some("FORGE_TEST_CRLF_KEY")))
            .unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
}

#[test]
fn a_client_timeout_drops_the_connection_and_the_server_stops() {
    // One slot, 3 s per answer: the first request is being "generated", the second queued,
    // when the client gives up on both after 300 ms.
    let server = FakeTeacher::serving(
        Faults { latency: Duration::from_secs(3), ..Faults::default() },
        Serving { slots: Some(1), ..Serving::default() },
        Arc::new(default_answer),
    );
    let mut cfg = config(server.base_url(), 2, Duration::from_millis(300), None);
    cfg.max_retries = 0;
    let c = Arc::new(OpenAiClient::new(cfg).unwrap());
    let t0 = Instant::now();
    let results = chat_all(&c, 2);
    assert!(results.iter().all(|r| r.is_err()));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.cancelled() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.received(), 2);
    assert_eq!(server.cancelled(), 2, "the server saw both connections drop");
    assert_eq!(server.answered(), 0);
    assert_eq!(c.stats.snapshot().timeouts, 2);
}

/// llama.cpp's server with one slot serves one request at a time and queues the rest. At
/// max-parallel 8 with a timeout of 3.5 answers, the client must find that out and not flood
/// the queue with requests that time out.
#[test]
fn a_one_slot_server_at_max_parallel_8_is_not_flooded() {
    let latency = Duration::from_millis(200);
    let server = FakeTeacher::serving(
        Faults { latency, ..Faults::default() },
        Serving { slots: Some(1), ..Serving::default() },
        Arc::new(default_answer),
    );
    let c = Arc::new(client(&server, 8, latency * 7 / 2, None));
    let n = 24;
    let t0 = Instant::now();
    for r in chat_all(&c, n) {
        r.expect("every request is answered");
    }
    let stats = c.stats.snapshot();
    eprintln!(
        "{n} answers in {:?}: {} received, {} cancelled, {stats:?}, window {}",
        t0.elapsed(),
        server.received(),
        server.cancelled(),
        c.window()
    );
    assert!(server.received() <= n + n / 4, "{} requests for {n} answers", server.received());
    assert!(c.window() <= 2.5, "the window follows the one slot: {}", c.window());
}

#[test]
fn a_server_that_advertises_its_slots_gets_exactly_that_many() {
    let latency = Duration::from_millis(100);
    let server = FakeTeacher::serving(
        Faults { latency, ..Faults::default() },
        Serving { slots: Some(1), advertise_slots: true, ..Serving::default() },
        Arc::new(default_answer),
    );
    let c = Arc::new(client(&server, 8, latency * 3, None));
    let n = 12;
    let results = runtime().block_on(async {
        assert_eq!(c.discover_slots().await, Some(1));
        assert_eq!(c.slots(), Some(1));
        assert_eq!(c.window(), 1.0);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let c = c.clone();
            tasks.spawn(async move { c.chat(&request(i)).await });
        }
        tasks.join_all().await
    });
    for r in results {
        r.unwrap();
    }
    assert_eq!(server.received(), n, "no request timed out or was retried");
    assert_eq!(c.stats.snapshot().timeouts, 0);
    assert_eq!(c.window(), 1.0);

    // A server that does not say keeps the adaptive window.
    let quiet = FakeTeacher::start(Faults::default());
    let c = client(&quiet, 8, Duration::from_secs(5), None);
    assert_eq!(runtime().block_on(c.discover_slots()), None);
    assert_eq!(c.window(), aimd::INITIAL_WINDOW as f64);
}
