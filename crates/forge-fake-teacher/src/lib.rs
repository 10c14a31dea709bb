//! A fake OpenAI-compatible chat-completions server for tests and benchmarks.
//!
//! It is a real HTTP server on 127.0.0.1 (axum on its own tokio runtime), so the client under
//! test goes through its whole stack. Faults are injected deterministically by request number:
//! every Nth request can be answered with 429 + `Retry-After`, a 500, a hang past the client's
//! timeout, or a body that is not JSON; every response can be delayed. Answers are a pure
//! function of the request (or of a closure the test supplies), so runs are repeatable.
//!
//! [`Serving`] makes it behave like a small local server: at most `slots` requests are served at
//! once and the rest wait in a FIFO queue (llama.cpp's server with `--parallel 1` answers one
//! request at a time), optionally advertised at `GET /props` and `GET /slots` as llama.cpp does;
//! a request whose client hangs up (a client timeout) is dropped, queued or not, and counted as
//! [`FakeTeacher::cancelled`]. It can also echo the `Authorization` header back in an error body,
//! as a careless server might.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

/// Which requests fail, and how. `every_*: Some(n)` hits requests n, 2n, 3n, ... (1-based).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub every_rate_limit: Option<u64>,
    /// The `Retry-After` header sent with 429s (`None`: no header).
    pub retry_after: Option<String>,
    pub every_server_error: Option<u64>,
    pub every_hang: Option<u64>,
    /// How long a hanging request waits before answering (longer than the client's timeout).
    pub hang: Duration,
    pub every_malformed: Option<u64>,
    /// Added to every response (with `slots`, the time a request holds its slot: its
    /// "generation").
    pub latency: Duration,
    /// With `"stream": true`: the pause before each streamed piece of the answer.
    pub stream_delay: Duration,
}

/// How the server serves, beyond faults.
#[derive(Clone, Debug, Default)]
pub struct Serving {
    /// At most this many requests are served at once; the others wait in a first-come,
    /// first-served queue. `None`: no limit.
    pub slots: Option<usize>,
    /// Say `slots` at `GET /props` (`total_slots`) and `GET /slots`, as llama.cpp's server does.
    pub advertise_slots: bool,
    /// Answer every chat request with this status and an error body that repeats the request's
    /// `Authorization` header (as is, percent-encoded and in base64).
    pub echo_authorization: Option<u16>,
}

pub type Responder = Arc<dyn Fn(&Value) -> String + Send + Sync>;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub number: u64,
    pub body: Value,
    pub authorization: Option<String>,
    /// What the server answered: 200, 429, 500, "hang" is 200 after a delay, malformed is 200.
    pub status: u16,
}

struct Shared {
    faults: Faults,
    serving: Serving,
    responder: Responder,
    counter: AtomicU64,
    cancelled: AtomicU64,
    slots: Option<tokio::sync::Semaphore>,
    seen: Mutex<Vec<Seen>>,
}

pub struct FakeTeacher {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The default answer: deterministic, different for every distinct request, long enough for
/// word-count validators.
pub fn default_answer(body: &Value) -> String {
    let digest = blake3::hash(body.to_string().as_bytes()).to_hex();
    let user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let gist: String = user.split_whitespace().take(12).collect::<Vec<_>>().join(" ");
    format!("Hear ye, good folk of the realm! Answer {} concerning: {gist}.", &digest[..16])
}

impl FakeTeacher {
    pub fn start(faults: Faults) -> FakeTeacher {
        Self::with_responder(faults, Arc::new(default_answer))
    }

    pub fn with_responder(faults: Faults, responder: Responder) -> FakeTeacher {
        Self::bind("127.0.0.1:0", faults, responder).expect("bind 127.0.0.1")
    }

    /// A server on 127.0.0.1 that serves as `serving` says.
    pub fn serving(faults: Faults, serving: Serving, responder: Responder) -> FakeTeacher {
        Self::bind_with("127.0.0.1:0", faults, serving, responder).expect("bind 127.0.0.1")
    }

    pub fn bind(addr: &str, faults: Faults, responder: Responder) -> std::io::Result<FakeTeacher> {
        Self::bind_with(addr, faults, Serving::default(), responder)
    }

    pub fn bind_with(
        addr: &str,
        faults: Faults,
        serving: Serving,
        responder: Responder,
    ) -> std::io::Result<FakeTeacher> {
        let slots = serving.slots.map(|n| tokio::sync::Semaphore::new(n.max(1)));
        let shared = Arc::new(Shared {
            faults,
            serving,
            responder,
            counter: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            slots,
            seen: Mutex::default(),
        });
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let mut app =
                    Router::new().route("/v1/chat/completions", post(handle)).route("/chat/completions", post(handle));
                if state.serving.advertise_slots && state.serving.slots.is_some() {
                    app = app.route("/props", get(props_handler)).route("/slots", get(slots_handler));
                }
                let app = app.with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        Ok(FakeTeacher { addr, shared, shutdown: Some(tx), thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The requests answered (or hanging), in the order they were answered.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests answered successfully.
    pub fn answered(&self) -> usize {
        self.requests().iter().filter(|s| s.status == 200).count()
    }

    /// Every chat request that arrived, whatever became of it.
    pub fn received(&self) -> u64 {
        self.shared.counter.load(Ordering::SeqCst)
    }

    /// Chat requests whose client hung up before the answer was ready (waiting for a slot or
    /// being "generated"): the server stopped working on them.
    pub fn cancelled(&self) -> u64 {
        self.shared.cancelled.load(Ordering::SeqCst)
    }
}

impl Drop for FakeTeacher {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn hits(every: Option<u64>, n: u64) -> bool {
    every.is_some_and(|e| e > 0 && n.is_multiple_of(e))
}

async fn props_handler(State(s): State<Arc<Shared>>) -> Json<Value> {
    let n = s.serving.slots.unwrap_or(1);
    Json(
        json!({ "total_slots": n, "default_generation_settings": { "n_ctx": 4096 }, "build_info": "forge-fake-teacher" }),
    )
}

async fn slots_handler(State(s): State<Arc<Shared>>) -> Json<Value> {
    let n = s.serving.slots.unwrap_or(1);
    Json(Value::Array((0..n).map(|id| json!({ "id": id, "is_processing": false })).collect()))
}

/// Counts a request as cancelled if its handler is dropped (the client hung up) before it
/// answered.
struct Pending<'a> {
    shared: &'a Shared,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            out.push(if k <= chunk.len() { A[(n >> (18 - 6 * k) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

async fn handle(State(s): State<Arc<Shared>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let n = s.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let mut pending = Pending { shared: &s, answered: false };
    let f = &s.faults;
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    let record = |status: u16| {
        s.seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
            number: n,
            body: body.clone(),
            authorization: authorization.clone(),
            status,
        })
    };
    if let Some(code) = s.serving.echo_authorization {
        let auth = authorization.clone().unwrap_or_default();
        let key = auth.strip_prefix("Bearer ").unwrap_or(&auth).to_string();
        record(code);
        pending.answered = true;
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::UNAUTHORIZED);
        return (
            status,
            Json(json!({
                "error": {
                    "message": format!(
                        "Incorrect API key provided: {auth}. Received authorization={} (base64 {}); key {} (base64 {}).",
                        percent_encode(&auth), base64(auth.as_bytes()), key, base64(key.as_bytes())
                    ),
                    "type": "invalid_request_error",
                },
                "headers": { "authorization": auth },
            })),
        )
            .into_response();
    }
    // Wait for a slot; a client that hangs up meanwhile drops this future, and its place.
    let _slot = match &s.slots {
        Some(sem) => Some(sem.acquire().await.expect("the semaphore is never closed")),
        None => None,
    };
    if !f.latency.is_zero() {
        tokio::time::sleep(f.latency).await;
    }
    if hits(f.every_rate_limit, n) {
        record(429);
        pending.answered = true;
        let mut resp =
            (StatusCode::TOO_MANY_REQUESTS, Json(json!({"error": {"message": "rate limited"}}))).into_response();
        if let Some(ra) = &f.retry_after {
            resp.headers_mut().insert("retry-after", ra.parse().expect("header value"));
        }
        return resp;
    }
    if hits(f.every_server_error, n) {
        record(500);
        pending.answered = true;
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
    }
    if hits(f.every_hang, n) {
        record(0);
        tokio::time::sleep(f.hang).await;
    }
    if hits(f.every_malformed, n) {
        record(2000);
        pending.answered = true;
        return (StatusCode::OK, "{\"choices\": [ {\"message\": oops").into_response();
    }
    let content = (s.responder)(&body);
    let words = content.split_whitespace().count() as u64;
    if !hits(f.every_hang, n) {
        record(200);
    }
    pending.answered = true;
    if body["stream"] == json!(true) {
        return stream(n, &body, &content, words, f.stream_delay);
    }
    Json(json!({
        "id": format!("chatcmpl-{n}"),
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words},
    }))
    .into_response()
}

/// The answer as OpenAI streams it: server-sent events, a word per chunk (each after `delay`),
/// then the finish reason, the usage and `[DONE]`.
fn stream(n: u64, body: &Value, content: &str, words: u64, delay: Duration) -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": format!("chatcmpl-{n}"),
            "object": "chat.completion.chunk",
            "model": body["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    let pieces: Vec<String> = content.split_inclusive(' ').map(str::to_string).collect();
    events.extend(pieces.into_iter().map(|p| chunk(json!({ "content": p }), Value::Null)));
    events.push(chunk(json!({}), json!("stop")));
    let mut usage = chunk(json!({}), Value::Null);
    usage["choices"] = json!([]);
    usage["usage"] = json!({"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words});
    events.push(usage);
    let mut lines: std::collections::VecDeque<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    lines.push_back("data: [DONE]\n\n".to_string());
    let body = futures_util::stream::unfold(lines, move |mut lines| async move {
        let line = lines.pop_front()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, std::convert::Infallible>(line), lines))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(body))
        .expect("a valid response")
}
