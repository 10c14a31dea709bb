//! `forge proxy`: an OpenAI-compatible endpoint in front of an upstream teacher that records
//! every answered call per call site (seed 003's capture of `by <llm>` call sites).
//!
//! Each `POST /v1/chat/completions` is forwarded to the upstream (streamed answers are streamed
//! through as they come) and, once the answer is complete, captured in the site's file of the
//! store ([`forge_data::captures`]) — fsynced before the client sees the end of the answer (the body of a plain answer,
//! the `[DONE]` of a stream). The upstream's key comes from the manifest's `api-key-env`; when
//! the teacher has none, the client's `Authorization` is passed on. Neither key is stored or
//! logged: both are redacted from what is captured, logged and sent back, even when a server
//! echoes them. Failed calls are passed back as they are (redacted) and not captured.

pub mod local;
pub mod site;
pub mod versions;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use forge_teacher::Redactor;

use self::versions::now_ms;
use crate::api;
use futures_util::StreamExt;
use serde_json::{Value, json};

pub use forge_data::captures::{self as store, Answer, Capture, CaptureStore, ReadReport};

/// The teacher the proxy forwards to.
#[derive(Clone)]
pub struct Upstream {
    /// Its name in the manifest.
    pub name: String,
    pub base_url: String,
    /// Sent as the request's `model` (the call site's own is replaced: the manifest decides).
    pub model: String,
    /// From the teacher's `api-key-env`.
    pub api_key: Option<String>,
    /// For the whole answer.
    pub timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where each call site's calls go.
#[derive(Clone)]
pub struct Routes {
    /// For sites the manifest does not route.
    pub default: Upstream,
    /// Sites the manifest gives an upstream of their own (`site "NAME" upstream=...`).
    pub sites: HashMap<String, Upstream>,
    /// The names the proxy gives sites it recognises by their template (`site-…`), mapped to
    /// the manifest's sites that claim them (`fingerprint "site-…"`).
    pub aliases: HashMap<String, String>,
    /// Promoted sites, answered by their local model.
    pub local: Option<Arc<local::Local>>,
}

impl Routes {
    pub fn to(default: Upstream) -> Routes {
        Routes { default, sites: HashMap::new(), aliases: HashMap::new(), local: None }
    }
}

struct Proxy {
    routes: Routes,
    http: reqwest::Client,
    store: CaptureStore,
    captured: AtomicU64,
    failed: AtomicU64,
    /// Captures that could not be written (a full disk): answered, not kept.
    lost: AtomicU64,
    counter: AtomicU64,
}

/// What a proxy did (`GET /forge/stats`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProxyStats {
    pub captured: u64,
    pub failed: u64,
    pub lost: u64,
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Routes,
    store: CaptureStore,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let http = http_client()?;
    let proxy = Arc::new(Proxy {
        routes,
        http,
        store,
        captured: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        counter: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/forge/stats", get(stats))
        .with_state(proxy);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

fn http_client() -> std::io::Result<reqwest::Client> {
    // reqwest's rustls backend needs a process-wide provider; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| std::io::Error::other(format!("the proxy's HTTP client: {e}")))
}

/// The answer in an OpenAI chat completion's body.
fn answer_of(v: &Value) -> Option<Answer> {
    let choice = &v["choices"][0];
    Some(Answer {
        content: choice["message"]["content"].as_str()?.to_string(),
        finish_reason: choice["finish_reason"].as_str().map(str::to_string),
        usage: v.get("usage").cloned(),
    })
}

/// Asks `upstream` a captured call's `request` again, whole (not streamed) and not captured:
/// the upstream's fresh answer to an input it answered before (a promotion's paired test). The
/// error in words, with the upstream's key redacted.
pub async fn ask(upstream: &Upstream, request: &Value) -> Result<Answer, String> {
    let mut body = request.clone();
    if let Some(o) = body.as_object_mut() {
        o.insert("stream".into(), json!(false));
        o.remove("stream_options");
        if !upstream.model.is_empty() {
            o.insert("model".into(), json!(upstream.model));
        }
    }
    let redactor = Redactor::new(upstream.api_key.as_deref());
    let http = http_client().map_err(|e| e.to_string())?;
    let url = format!("{}/chat/completions", upstream.base_url.trim_end_matches('/'));
    let mut req = http.post(&url).json(&body).timeout(upstream.timeout);
    if let Some(k) = upstream.api_key.as_deref() {
        req = req.bearer_auth(k);
    }
    let fail = |why: String| format!("the upstream `{}`: {}", upstream.name, redactor.redact_long(&why));
    let resp = req.send().await.map_err(|e| fail(e.without_url().to_string()))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| fail(e.without_url().to_string()))?;
    if !status.is_success() {
        return Err(fail(format!("answered {status}: {text}")));
    }
    let v: Value = serde_json::from_str(&text).map_err(|_| fail("the answer is not JSON".into()))?;
    let a = answer_of(&v).ok_or_else(|| fail("the answer has no message".into()))?;
    Ok(Answer { content: redactor.redact_long(&a.content), ..a })
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": { "message": message, "type": "forge_proxy_error" } }))).into_response()
}

async fn models(State(p): State<Arc<Proxy>>) -> Json<Value> {
    Json(
        json!({ "object": "list", "data": [{ "id": p.routes.default.model, "object": "model", "owned_by": p.routes.default.name }] }),
    )
}

async fn stats(State(p): State<Arc<Proxy>>) -> Json<ProxyStats> {
    Json(ProxyStats {
        captured: p.captured.load(Ordering::Relaxed),
        failed: p.failed.load(Ordering::Relaxed),
        lost: p.lost.load(Ordering::Relaxed),
    })
}

/// Everything one call needs after it was forwarded.
struct Call {
    proxy: Arc<Proxy>,
    upstream: Upstream,
    site: String,
    /// The live local version, when it failed and the upstream answers instead.
    fallback_from: Option<u32>,
    request: Value,
    redactor: Redactor,
    started: Instant,
    stream: bool,
}

impl Call {
    /// Stores the capture (off the async threads), and says how it went in one log line.
    async fn capture(&self, answer: Answer) {
        let p = &self.proxy;
        let n = p.counter.fetch_add(1, Ordering::Relaxed);
        let at_ms = now_ms();
        let id = blake3::hash(format!("{}\0{at_ms}\0{n}\0{}", self.site, std::process::id()).as_bytes()).to_hex();
        let capture = Capture {
            id: id[..16].to_string(),
            site: self.site.clone(),
            at_ms,
            upstream: self.upstream.name.clone(),
            request: self.request.clone(),
            response: Answer { content: self.redactor.redact_long(&answer.content), ..answer },
            latency_ms: self.started.elapsed().as_millis() as u64,
            stream: self.stream,
        };
        let store = p.store.clone();
        let c = capture.clone();
        let written = tokio::task::spawn_blocking(move || store.append(&c)).await.map_err(std::io::Error::other);
        match written.and_then(|w| w) {
            Ok(()) => {
                if let Some(local) = &p.routes.local {
                    let by = if self.fallback_from.is_some() { "fallback" } else { "upstream" };
                    local.served(&self.site, self.fallback_from, by, capture.latency_ms);
                }
                p.captured.fetch_add(1, Ordering::Relaxed);
                eprintln!("{}: answered in {} ms, captured {}", self.site, capture.latency_ms, capture.id);
            }
            Err(e) => {
                p.lost.fetch_add(1, Ordering::Relaxed);
                eprintln!("{}: answered, but the capture could not be stored: {e}", self.site);
            }
        }
    }

    fn failed(&self, status: u16, detail: &str) {
        self.proxy.failed.fetch_add(1, Ordering::Relaxed);
        eprintln!("{}: upstream answered {status}: {}", self.site, self.redactor.redact(detail));
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).trim())
}

async fn chat(State(p): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let mut body: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return error(StatusCode::BAD_REQUEST, "the body is not a JSON object"),
    };
    let client_key = bearer(&headers).filter(|k| !k.is_empty()).map(str::to_string);
    let (site, named) = match site::site_of(&headers, &mut body) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let site = match p.routes.aliases.get(&site) {
        Some(declared) if !named => declared.clone(),
        _ => site,
    };
    let upstream = p.routes.sites.get(&site).unwrap_or(&p.routes.default).clone();
    let redactor = Redactor::new(client_key.as_deref().into_iter().chain(upstream.api_key.as_deref()));
    if !upstream.model.is_empty() {
        body["model"] = json!(upstream.model);
    }
    let stream = body["stream"] == json!(true);
    let mut fallback_from = None;
    if let Some(local) = &p.routes.local
        && let Some(version) = local.live(&site)
    {
        let answered = local.answer(&site, version, &body).await;
        let passed = answered.as_ref().is_ok_and(|v| v.passed);
        if let Some(switch) = local.outcome(&site, version, passed) {
            eprintln!("{switch}");
        }
        let ms = started.elapsed().as_millis() as u64;
        match answered {
            Ok(v) if v.passed => {
                local.served(&site, Some(version), "local", ms);
                eprintln!("{site}: answered locally by v{version} in {ms} ms ({} attempts)", v.attempts);
                return local_reply(&site, version, &upstream.model, stream, v);
            }
            Ok(v) => eprintln!("{site}: v{version} failed its verifiers {} times; asking the upstream", v.attempts),
            Err(e) => eprintln!("{site}: the local model could not answer ({e}); asking the upstream"),
        }
        fallback_from = Some(version);
    }
    // What is kept of the request: the body, with anything that looks like a key redacted.
    let request = serde_json::from_str(&redactor.redact_long(&body.to_string())).unwrap_or(Value::Null);
    let url = format!("{}/chat/completions", upstream.base_url.trim_end_matches('/'));
    let mut req = p.http.post(&url).json(&body).timeout(upstream.timeout);
    let auth = upstream.api_key.as_deref().or(client_key.as_deref());
    if let Some(k) = auth {
        req = req.bearer_auth(k);
    }
    let call =
        Call { proxy: p.clone(), upstream, site: site.clone(), fallback_from, request, redactor, started, stream };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let why = if e.is_timeout() { "timed out".to_string() } else { e.without_url().to_string() };
            call.failed(502, &why);
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("the upstream `{}` cannot be reached: {why}", call.upstream.name),
            );
        }
    };
    let status = resp.status();
    let site_header = HeaderValue::from_str(&site).expect("site names are header-safe");
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        call.failed(status.as_u16(), &text);
        let mut r = (
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            [("content-type", "application/json")],
            call.redactor.redact_long(&text),
        )
            .into_response();
        r.headers_mut().insert(site::SITE_HEADER, site_header);
        return r;
    }
    let mut r = if stream { streamed(call, resp) } else { answered(call, resp).await };
    r.headers_mut().insert(site::SITE_HEADER, site_header);
    r
}

/// A promoted site's local answer, in OpenAI's shape (streamed as one piece when asked to).
fn local_reply(site: &str, version: u32, model: &str, stream: bool, v: api::Verified) -> Response {
    let id = format!("chatcmpl-forge-{site}-v{version}-{}", now_ms());
    let created = now_ms() / 1000;
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let served = HeaderValue::from_str(&format!("local v{version}")).expect("ASCII");
    let site_header = HeaderValue::from_str(site).expect("site names are header-safe");
    let mut r = if stream {
        let events = [
            chunk(json!({"role": "assistant", "content": ""}), Value::Null).to_string(),
            chunk(json!({"content": v.text}), Value::Null).to_string(),
            chunk(json!({}), json!(v.finish)).to_string(),
            "[DONE]".to_string(),
        ];
        let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(Body::from(body))
            .expect("a valid response")
    } else {
        Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": v.text}, "finish_reason": v.finish}],
            "usage": {
                "prompt_tokens": v.prompt_tokens,
                "completion_tokens": v.completion_tokens,
                "total_tokens": v.prompt_tokens + v.completion_tokens,
            },
        }))
        .into_response()
    };
    r.headers_mut().insert("x-forge-served", served);
    r.headers_mut().insert(site::SITE_HEADER, site_header);
    r
}

/// A whole answer: captured, then passed back.
async fn answered(call: Call, resp: reqwest::Response) -> Response {
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => {
            call.failed(502, &e.without_url().to_string());
            return error(StatusCode::BAD_GATEWAY, "the upstream's answer was cut off");
        }
    };
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => {
            call.failed(502, "the answer is not JSON");
            return error(StatusCode::BAD_GATEWAY, "the upstream's answer is not JSON");
        }
    };
    let Some(answer) = answer_of(&v) else {
        call.failed(502, "the answer has no message");
        return error(StatusCode::BAD_GATEWAY, "the upstream's answer has no message");
    };
    call.capture(answer).await;
    (StatusCode::OK, [("content-type", "application/json")], call.redactor.redact_long(&text)).into_response()
}

/// The stream passed through event by event while the answer is put together; the capture is
/// stored before the closing `[DONE]` goes out. An upstream that breaks off mid-answer breaks
/// the client's stream off too, and nothing is captured.
fn streamed(call: Call, resp: reqwest::Response) -> Response {
    struct St {
        call: Call,
        upstream: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        buf: Vec<u8>,
        content: String,
        finish_reason: Option<String>,
        usage: Option<Value>,
        done: bool,
    }
    let st = St {
        call,
        upstream: resp.bytes_stream().boxed(),
        buf: Vec::new(),
        content: String::new(),
        finish_reason: None,
        usage: None,
        done: false,
    };
    let body = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some((event, rest)) = next_event(&st.buf) {
                let event = event.to_vec();
                st.buf.drain(..rest);
                let text = String::from_utf8_lossy(&event).into_owned();
                let data = sse_data(&text);
                if data.as_deref() == Some("[DONE]") {
                    continue;
                }
                if let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(&d).ok()) {
                    let choice = &v["choices"][0];
                    if let Some(piece) = choice["delta"]["content"].as_str() {
                        st.content.push_str(piece);
                    }
                    if let Some(f) = choice["finish_reason"].as_str() {
                        st.finish_reason = Some(f.to_string());
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        st.usage = Some(u.clone());
                    }
                }
                let out = format!("{}\n\n", st.call.redactor.redact(&text));
                return Some((Ok::<_, std::io::Error>(Bytes::from(out)), st));
            }
            match st.upstream.next().await {
                Some(Ok(bytes)) => st.buf.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    st.call.failed(502, &format!("the stream broke off: {}", e.without_url()));
                    st.done = true;
                    return Some((Err(std::io::Error::other("the upstream's stream broke off")), st));
                }
                None => {
                    st.done = true;
                    if st.finish_reason.is_none() {
                        st.call.failed(502, "the stream ended before the answer did");
                        return Some((Err(std::io::Error::other("the upstream's stream ended early")), st));
                    }
                    let answer = Answer {
                        content: std::mem::take(&mut st.content),
                        finish_reason: st.finish_reason.take(),
                        usage: st.usage.take(),
                    };
                    st.call.capture(answer).await;
                    return Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), st));
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .expect("a valid response")
}

/// The first whole event in `buf` (without its blank line) and where the rest begins.
fn next_event(buf: &[u8]) -> Option<(&[u8], usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    let (i, n) = match (lf, crlf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some((&buf[..i], i + n))
}

/// The `data:` of an event (its lines joined), if it has one.
fn sse_data(event: &str) -> Option<String> {
    let lines: Vec<&str> =
        event.lines().filter_map(|l| l.strip_prefix("data:")).map(|l| l.strip_prefix(' ').unwrap_or(l)).collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines_of_either_kind() {
        let buf = b"data: {\"a\":1}\n\ndata: [DONE]\r\n\r\npartial";
        let (e, rest) = next_event(buf).unwrap();
        assert_eq!(e, b"data: {\"a\":1}");
        let (e2, rest2) = next_event(&buf[rest..]).unwrap();
        assert_eq!(sse_data(std::str::from_utf8(e2).unwrap()).as_deref(), Some("[DONE]"));
        assert_eq!(&buf[rest + rest2..], b"partial");
        assert!(next_event(b"partial").is_none());
        assert_eq!(sse_data(": keep-alive"), None);
    }
}
