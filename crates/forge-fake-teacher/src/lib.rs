//! A fake OpenAI-compatible chat-completions server for tests and benchmarks.
//!
//! It is a real HTTP server on 127.0.0.1 (axum on its own tokio runtime), so the client under
//! test goes through its whole stack. Faults are injected deterministically by request number:
//! every Nth request can be answered with 429 + `Retry-After`, a 500, a hang past the client's
//! timeout, or a body that is not JSON; every response can be delayed. Answers are a pure
//! function of the request (or of a closure the test supplies), so runs are repeatable.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
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
    /// Added to every response.
    pub latency: Duration,
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
    responder: Responder,
    counter: AtomicU64,
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

    pub fn bind(addr: &str, faults: Faults, responder: Responder) -> std::io::Result<FakeTeacher> {
        let shared = Arc::new(Shared { faults, responder, counter: AtomicU64::new(0), seen: Mutex::default() });
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
                let app = Router::new()
                    .route("/v1/chat/completions", post(handle))
                    .route("/chat/completions", post(handle))
                    .with_state(state);
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

    pub fn requests(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests answered successfully.
    pub fn answered(&self) -> usize {
        self.requests().iter().filter(|s| s.status == 200).count()
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
    every.is_some_and(|e| e > 0 && n % e == 0)
}

async fn handle(State(s): State<Arc<Shared>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let n = s.counter.fetch_add(1, Ordering::SeqCst) + 1;
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
    if !f.latency.is_zero() {
        tokio::time::sleep(f.latency).await;
    }
    if hits(f.every_rate_limit, n) {
        record(429);
        let mut resp =
            (StatusCode::TOO_MANY_REQUESTS, Json(json!({"error": {"message": "rate limited"}}))).into_response();
        if let Some(ra) = &f.retry_after {
            resp.headers_mut().insert("retry-after", ra.parse().expect("header value"));
        }
        return resp;
    }
    if hits(f.every_server_error, n) {
        record(500);
        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
    }
    if hits(f.every_hang, n) {
        record(0);
        tokio::time::sleep(f.hang).await;
    }
    if hits(f.every_malformed, n) {
        record(2000);
        return (StatusCode::OK, "{\"choices\": [ {\"message\": oops").into_response();
    }
    let content = (s.responder)(&body);
    let words = content.split_whitespace().count() as u64;
    if !hits(f.every_hang, n) {
        record(200);
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
