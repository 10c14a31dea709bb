//! The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that injects faults.

use std::time::{Duration, Instant};

use forge_fake_teacher::{FakeTeacher, Faults, default_answer};
use forge_teacher::*;

fn client(server: &FakeTeacher, max_parallel: u32, timeout: Duration, key_env: Option<&str>) -> OpenAiClient {
    OpenAiClient::new(OpenAiConfig {
        model: "fake-4o".into(),
        base_url: server.base_url(),
        api_key_env: key_env.map(str::to_string),
        max_parallel,
        timeout,
        max_retries: 8,
    })
    .unwrap()
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
    });
    let c = std::sync::Arc::new(client(&server, 8, Duration::from_millis(500), None));
    let n = 60;
    let answers: Vec<ChatResponse> = runtime().block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let c = c.clone();
            tasks.spawn(async move { (i, c.chat(&request(i)).await) });
        }
        let mut out: Vec<(u64, ChatResponse)> = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (i, r) = r.unwrap();
            out.push((i, r.expect("every request eventually succeeds")));
        }
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, r)| r).collect()
    });
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
    let server = FakeTeacher::with_responder(Faults::default(), std::sync::Arc::new(default_answer));
    // A 404 from a wrong base URL is not retried.
    let c = OpenAiClient::new(OpenAiConfig {
        model: "m".into(),
        base_url: format!("{}/nope", server.base_url()),
        api_key_env: None,
        max_parallel: 2,
        timeout: Duration::from_secs(5),
        max_retries: 8,
    })
    .unwrap();
    let t0 = Instant::now();
    let err = runtime().block_on(c.chat(&request(0))).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(matches!(err, TeacherError::Rejected { status: 404, .. }), "{err}");
    assert!(err.to_string().contains("is `"), "{err}");

    let err = OpenAiClient::new(OpenAiConfig {
        model: "m".into(),
        base_url: server.base_url(),
        api_key_env: Some("FORGE_TEST_SURELY_UNSET_KEY".into()),
        max_parallel: 1,
        timeout: Duration::from_secs(1),
        max_retries: 0,
    })
    .unwrap_err();
    assert!(err.to_string().contains("$FORGE_TEST_SURELY_UNSET_KEY is not set"), "{err}");
}

#[test]
fn the_key_goes_only_in_the_authorization_header() {
    let server = FakeTeacher::start(Faults::default());
    // SAFETY: tests in this binary do not read this variable concurrently.
    unsafe { std::env::set_var("FORGE_TEST_TEACHER_KEY", "sk-test-secret-123") };
    let c = client(&server, 1, Duration::from_secs(5), Some("FORGE_TEST_TEACHER_KEY"));
    runtime().block_on(c.chat(&request(0))).unwrap();
    let seen = server.requests();
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-test-secret-123"));
    assert!(!seen[0].body.to_string().contains("sk-test"));
    assert!(!format!("{c:?}").contains("sk-test"), "Debug output hides the key");
    assert!(!request(0).key().to_string().is_empty());
}

#[test]
fn gives_up_after_max_retries_with_the_last_error() {
    let server = FakeTeacher::start(Faults { every_server_error: Some(1), ..Faults::default() });
    let c = OpenAiClient::new(OpenAiConfig {
        model: "m".into(),
        base_url: server.base_url(),
        api_key_env: None,
        max_parallel: 1,
        timeout: Duration::from_secs(5),
        max_retries: 2,
    })
    .unwrap();
    let err = runtime().block_on(c.chat(&request(0))).unwrap_err();
    assert_eq!(err.to_string(), "the teacher failed 3 times; last: server error 500 Internal Server Error");
    assert_eq!(server.requests().len(), 3);
}
