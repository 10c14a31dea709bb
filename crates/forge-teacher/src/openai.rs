//! A client for OpenAI-compatible chat-completions endpoints (OpenAI, Ollama, vLLM, the
//! llama.cpp server).
//!
//! Failures are sorted by what they mean:
//!
//! - 429 and 503 cut the concurrency window and wait for `Retry-After`; a timeout cuts the
//!   window too (the server is too busy to answer in time: sending the same request into the
//!   same queue would time out again), and so does latency that grows with the window (see
//!   [`crate::aimd`]).
//! - Other 5xx, 408, 409, 425, broken connections and unreadable bodies are retried with
//!   jittered exponential backoff.
//! - Other 4xx answers fail at once, because retrying them only burns time: a refused key (401,
//!   403), a wrong base URL or model (404) and the like also fail every later request of this
//!   client without sending it ([`crate::TeacherError::stops_run`]).
//! - A key that cannot be sent in a header (a `\r` from a Windows-edited env file) is refused
//!   when the client is made, before any request.
//!
//! The API key is read from the environment variable the manifest names and is sent only in the
//! `Authorization` header; every error text is passed through a [`Redactor`] that removes the
//! key (and its encodings) should the server echo it.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde::Serialize;
use serde_json::{Value, json};

use crate::TeacherError;
use crate::aimd::{Aimd, Ticket};
use crate::redact::Redactor;
use crate::request::{ChatRequest, ChatResponse, Usage};
use crate::rng::SplitMix64;

#[derive(Clone, Debug)]
pub struct OpenAiConfig {
    pub model: String,
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub max_parallel: u32,
    pub timeout: Duration,
    pub max_retries: u32,
}

/// Counters for logs, progress lines and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// HTTP requests sent (retries included).
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub malformed: AtomicU64,
    pub connection_errors: AtomicU64,
    /// 4xx answers other than 429.
    pub client_errors: AtomicU64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub sent: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub server_errors: u64,
    pub timeouts: u64,
    pub malformed: u64,
    pub connection_errors: u64,
    pub client_errors: u64,
}

impl StatsSnapshot {
    /// Requests that failed, whatever the reason.
    pub fn failed(&self) -> u64 {
        self.rate_limited
            + self.server_errors
            + self.timeouts
            + self.malformed
            + self.connection_errors
            + self.client_errors
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            sent: g(&self.sent),
            ok: g(&self.ok),
            rate_limited: g(&self.rate_limited),
            server_errors: g(&self.server_errors),
            timeouts: g(&self.timeouts),
            malformed: g(&self.malformed),
            connection_errors: g(&self.connection_errors),
            client_errors: g(&self.client_errors),
        }
    }
}

pub struct OpenAiClient {
    http: reqwest::Client,
    config: OpenAiConfig,
    /// `Bearer KEY`, validated and marked sensitive.
    auth: Option<HeaderValue>,
    redactor: Redactor,
    limiter: Aimd,
    slots: tokio::sync::OnceCell<Option<usize>>,
    /// Set by an answer that fails every later request too (a refused key, a wrong URL).
    dead: Mutex<Option<Dead>>,
    /// Timeouts of requests alone in flight since the last answer.
    lone_timeouts: AtomicU32,
    pub stats: Arc<Stats>,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("OpenAiClient").field("config", &self.config).finish_non_exhaustive()
    }
}

/// What one attempt ended with.
enum Attempt {
    Done(ChatResponse),
    /// Worth another try after the given delay (`None`: the usual backoff).
    Retry {
        why: String,
        after: Option<Duration>,
        timed_out: bool,
    },
    Fatal(TeacherError),
}

const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(20);
/// How much of an error body is quoted in a message.
const SNIPPET_CHARS: usize = 300;
/// After this many timeouts in a row of requests alone in flight, with no answer in between,
/// the client gives up: the server cannot answer within the timeout.
const LONE_TIMEOUTS: u32 = 3;

/// Why every further request would fail.
#[derive(Clone)]
enum Dead {
    Rejected { status: u16, body: String },
    TooSlow { timeouts: u32, timeout_s: f64 },
}

impl Dead {
    fn error(&self) -> TeacherError {
        match self.clone() {
            Dead::Rejected { status, body } => TeacherError::Rejected { status, body },
            Dead::TooSlow { timeouts, timeout_s } => TeacherError::TooSlow { timeouts, timeout_s },
        }
    }
}

pub(crate) fn install_crypto_provider() {
    // reqwest's rustls backend needs a process-wide provider; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether an HTTP status, not retried, also dooms every other request to the same teacher.
/// 400, 413 and 422 are about one request (a prompt too long, a content filter); the others
/// (401, 402, 403, 404, 405, ...) about the key, the account, the URL or the model.
pub(crate) fn stops_run(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 400 | 408 | 409 | 413 | 422 | 425 | 429)
}

/// Why a key cannot go in an `Authorization` header, if it cannot. Never quotes the key.
fn check_key(var: &str, key: &str) -> Result<(), TeacherError> {
    let n = key.chars().count();
    for (i, c) in key.chars().enumerate() {
        let what = match c {
            '\r' => "a carriage return (\\r)".to_string(),
            '\n' => "a line feed (\\n)".to_string(),
            '\t' => "a tab".to_string(),
            ' ' => "a space".to_string(),
            c if c.is_control() => format!("the control character U+{:04X}", c as u32),
            c if !c.is_ascii() => "a non-ASCII character".to_string(),
            _ => continue,
        };
        let fix = if matches!(c, '\r' | '\n') {
            format!(
                "the file it was set from probably has Windows line endings: remove them (`dos2unix FILE`, \
                 or `export {var}=\"$(printf %s \"${var}\" | tr -d '\\r\\n')\"`)"
            )
        } else {
            "an API key is a single run of visible ASCII characters: set the variable to the key alone".to_string()
        };
        return Err(TeacherError::BadApiKey {
            var: var.to_string(),
            problem: format!(
                "contains {what} at character {} of {n}, which cannot be sent in an HTTP header; {fix}. \
                 No request was sent",
                i + 1
            ),
        });
    }
    Ok(())
}

/// The server's root: `base_url` without a trailing `/v1` (llama.cpp serves `/props` there).
fn server_root(base_url: &str) -> &str {
    let b = base_url.trim_end_matches('/');
    b.strip_suffix("/v1").unwrap_or(b)
}

impl OpenAiClient {
    pub fn new(config: OpenAiConfig) -> Result<OpenAiClient, TeacherError> {
        let api_key = match &config.api_key_env {
            None => None,
            Some(var) => match std::env::var_os(var) {
                None => return Err(TeacherError::MissingApiKey { var: var.clone() }),
                Some(os) if os.is_empty() => return Err(TeacherError::MissingApiKey { var: var.clone() }),
                Some(os) => match os.into_string() {
                    Ok(k) => {
                        check_key(var, &k)?;
                        Some(k)
                    }
                    Err(_) => {
                        return Err(TeacherError::BadApiKey {
                            var: var.clone(),
                            problem: "is not valid UTF-8, so it cannot be an API key. No request was sent".into(),
                        });
                    }
                },
            },
        };
        let redactor = Redactor::new(api_key.as_deref());
        let auth = match &api_key {
            None => None,
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| TeacherError::BadApiKey {
                    var: config.api_key_env.clone().unwrap_or_default(),
                    problem: "cannot be sent in an HTTP header. No request was sent".into(),
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(config.max_parallel as usize)
            .build()
            .map_err(|e| TeacherError::Client(redactor.redact(&error_chain(&e))))?;
        let limiter = Aimd::adaptive(config.max_parallel as usize, config.timeout);
        Ok(OpenAiClient {
            http,
            config,
            auth,
            redactor,
            limiter,
            slots: tokio::sync::OnceCell::new(),
            dead: Mutex::new(None),
            lone_timeouts: AtomicU32::new(0),
            stats: Arc::default(),
        })
    }

    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    /// The current concurrency window.
    pub fn window(&self) -> f64 {
        self.limiter.limit()
    }

    /// How many times the window was cut for congestion.
    pub fn window_cuts(&self) -> u64 {
        self.limiter.decreases()
    }

    /// The server's slot count, if [`discover_slots`](Self::discover_slots) found it.
    pub fn slots(&self) -> Option<usize> {
        self.slots.get().copied().flatten()
    }

    /// `text` without the client's secrets.
    pub fn redact(&self, text: &str) -> String {
        self.redactor.redact(text)
    }

    /// Asks the server, once, how many requests it serves at once — llama.cpp's server says
    /// (`GET /props`: `total_slots`; `GET /slots`: one entry per slot) — and if it says, makes
    /// that the window and its ceiling. Servers that do not say (OpenAI, Ollama, vLLM,
    /// llama-cpp-python) keep the adaptive window. Never fails: a server that cannot be asked is
    /// reported by the first real request.
    pub async fn discover_slots(&self) -> Option<usize> {
        *self
            .slots
            .get_or_init(|| async {
                let n = self.probe_slots().await;
                if let Some(n) = n {
                    self.limiter.set_capacity(n);
                }
                n
            })
            .await
    }

    async fn probe_slots(&self) -> Option<usize> {
        let root = server_root(&self.config.base_url);
        let timeout = self.config.timeout.min(Duration::from_secs(5));
        for path in ["props", "slots"] {
            let mut rb = self.http.get(format!("{root}/{path}")).timeout(timeout);
            if let Some(a) = &self.auth {
                rb = rb.header(AUTHORIZATION, a.clone());
            }
            let resp = rb.send().await.ok()?;
            if !resp.status().is_success() {
                continue;
            }
            let Ok(v) = resp.json::<Value>().await else { continue };
            let n = match path {
                "props" => v.get("total_slots").and_then(Value::as_u64),
                _ => v.as_array().map(|a| a.len() as u64),
            };
            if let Some(n) = n.filter(|n| (1..=4096).contains(n)) {
                return Some(n as usize);
            }
        }
        None
    }

    fn body(&self, req: &ChatRequest) -> Value {
        let mut body = json!({ "model": self.config.model, "messages": req.messages });
        if let Some(t) = req.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(p) = req.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(m) = req.max_tokens {
            body["max_tokens"] = json!(m);
        }
        if let Some(s) = req.seed {
            body["seed"] = json!(s);
        }
        if let Some(schema) = &req.response_schema {
            body["response_format"] =
                json!({ "type": "json_schema", "json_schema": { "name": "answer", "schema": schema, "strict": true } });
        }
        body
    }

    fn dead(&self) -> Option<TeacherError> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(Dead::error)
    }

    fn set_dead(&self, d: Dead) {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(d);
    }

    /// Sends `req`, retrying as its failure calls for, up to `max_retries` times. No secret is
    /// in the error.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, TeacherError> {
        self.chat_inner(req).await.map_err(|e| self.redact_error(e))
    }

    fn redact_error(&self, e: TeacherError) -> TeacherError {
        let r = |s: String| self.redactor.redact(&s);
        match e {
            TeacherError::Rejected { status, body } => TeacherError::Rejected { status, body: r(body) },
            TeacherError::Exhausted { attempts, last } => TeacherError::Exhausted { attempts, last: r(last) },
            TeacherError::Request(s) => TeacherError::Request(r(s)),
            TeacherError::Client(s) => TeacherError::Client(r(s)),
            other => other,
        }
    }

    async fn chat_inner(&self, req: &ChatRequest) -> Result<ChatResponse, TeacherError> {
        if let Some(e) = self.dead() {
            return Err(e);
        }
        let url = format!("{}/chat/completions", self.config.base_url);
        let body = self.body(req);
        let mut jitter = SplitMix64::new(req.key().0[0] as u64 ^ (req.sample << 8) ^ req.repeat as u64);
        let mut last = String::new();
        for attempt in 0..=self.config.max_retries {
            let permit = self.limiter.acquire().await;
            // Another request may have found the key refused while this one waited.
            if let Some(e) = self.dead() {
                return Err(e);
            }
            let ticket = permit.ticket();
            let t0 = Instant::now();
            let outcome = self.attempt(&url, &body, ticket).await;
            let latency = t0.elapsed();
            drop(permit);
            let delay = match outcome {
                Attempt::Done(r) => {
                    self.lone_timeouts.store(0, Ordering::Relaxed);
                    let work = r.usage.completion_tokens.max(r.content.len() as u64 / 4);
                    self.limiter.success(ticket, latency, work);
                    return Ok(r);
                }
                Attempt::Fatal(e) => {
                    if let TeacherError::Rejected { status, body } = &e
                        && stops_run(*status)
                    {
                        self.set_dead(Dead::Rejected { status: *status, body: body.clone() });
                    }
                    return Err(e);
                }
                Attempt::Retry { why, after, timed_out } => {
                    if timed_out {
                        // Congestion: the retry goes out at a smaller window.
                        let alone = self.limiter.timed_out(ticket);
                        if alone {
                            let streak = self.lone_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                            if streak >= LONE_TIMEOUTS {
                                let d =
                                    Dead::TooSlow { timeouts: streak, timeout_s: self.config.timeout.as_secs_f64() };
                                self.set_dead(d.clone());
                                return Err(d.error());
                            }
                        }
                    }
                    last = why;
                    after.unwrap_or_else(|| {
                        let exp = BACKOFF_BASE.saturating_mul(1 << attempt.min(16)).min(BACKOFF_CAP);
                        exp.mul_f64(0.5 + jitter.next_f64())
                    })
                }
            };
            if attempt < self.config.max_retries {
                tokio::time::sleep(delay).await;
            }
        }
        Err(TeacherError::Exhausted { attempts: self.config.max_retries + 1, last })
    }

    /// The readable part of an error body (an OpenAI-style `error.message`, Ollama's `error`,
    /// or the text), without secrets, shortened: `": ..."`, or nothing for an empty body.
    async fn snippet(&self, resp: reqwest::Response) -> String {
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?;
                e.get("message").and_then(Value::as_str).or(e.as_str()).map(str::to_string)
            })
            .unwrap_or(text);
        let clean = self.redactor.redact(msg.trim());
        let clean: String = clean.split_whitespace().collect::<Vec<_>>().join(" ");
        if clean.is_empty() {
            return String::new();
        }
        let mut s: String = clean.chars().take(SNIPPET_CHARS).collect();
        if clean.chars().count() > SNIPPET_CHARS {
            s.push('…');
        }
        format!(": {s}")
    }

    fn rejected(&self, status: reqwest::StatusCode, snippet: &str) -> TeacherError {
        let code = status.as_u16();
        let hint = match code {
            401 | 403 => match &self.config.api_key_env {
                Some(v) => format!(
                    "the server refused the API key in ${v} (check that it is a valid key for {}); not retried",
                    self.config.base_url
                ),
                None => "the teacher has no api-key-env: if the server needs a key, name the variable that \
                         holds it with api-key-env=\"VAR\"; not retried"
                    .to_string(),
            },
            404 => format!(
                "is `{}` the right base-url, and `{}` a model it serves? not retried",
                self.config.base_url, self.config.model
            ),
            400 | 413 | 422 => "the server refused this request; not retried".to_string(),
            _ => "not retried".to_string(),
        };
        let reason = status.canonical_reason().unwrap_or("refused");
        TeacherError::Rejected { status: code, body: format!("{reason}{snippet} ({hint})") }
    }

    async fn attempt(&self, url: &str, body: &Value, ticket: Ticket) -> Attempt {
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let mut rb = self.http.post(url).json(body).timeout(self.config.timeout);
        if let Some(a) = &self.auth {
            rb = rb.header(AUTHORIZATION, a.clone());
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => return self.transport_error(e),
        };
        let status = resp.status();
        let code = status.as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        if code == 429 || code == 503 {
            if code == 429 {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            }
            self.limiter.overloaded(ticket.started, retry_after);
            let snippet = self.snippet(resp).await;
            // With a Retry-After the limiter holds every request back until then; without one,
            // this request backs off like any other transient failure.
            return Attempt::Retry {
                why: format!("{status}{snippet}"),
                after: retry_after.map(|_| Duration::ZERO),
                timed_out: false,
            };
        }
        if status.is_server_error() {
            self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            let snippet = self.snippet(resp).await;
            return Attempt::Retry { why: format!("server error {status}{snippet}"), after: None, timed_out: false };
        }
        if !status.is_success() {
            let snippet = self.snippet(resp).await;
            if matches!(code, 408 | 409 | 425) {
                self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
                return Attempt::Retry { why: format!("{status}{snippet}"), after: retry_after, timed_out: false };
            }
            self.stats.client_errors.fetch_add(1, Ordering::Relaxed);
            return Attempt::Fatal(self.rejected(status, &snippet));
        }
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => return self.transport_error(e),
        };
        match parse_response(&text) {
            Some(r) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                Attempt::Done(r)
            }
            None => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let snippet: String = self.redactor.redact(&text).chars().take(120).collect();
                Attempt::Retry { why: format!("unreadable response: {snippet:?}"), after: None, timed_out: false }
            }
        }
    }

    fn transport_error(&self, e: reqwest::Error) -> Attempt {
        if e.is_timeout() {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            Attempt::Retry {
                why: format!("timed out after {:.1}s", self.config.timeout.as_secs_f64()),
                after: None,
                timed_out: true,
            }
        } else if e.is_builder() {
            // Built wrong here (a malformed base-url): the same request fails the same way.
            Attempt::Fatal(TeacherError::Request(self.redactor.redact(&error_chain(&e))))
        } else {
            self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
            Attempt::Retry {
                why: format!("request failed: {}", self.redactor.redact(&error_chain(&e))),
                after: None,
                timed_out: false,
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).min(Duration::from_secs(3600)))
}

fn parse_response(text: &str) -> Option<ChatResponse> {
    let v: Value = serde_json::from_str(text).ok()?;
    let choice = v.get("choices")?.get(0)?;
    let content = choice.get("message")?.get("content")?.as_str()?.to_string();
    let finish_reason = choice.get("finish_reason").and_then(|f| f.as_str()).map(str::to_string);
    let usage = v
        .get("usage")
        .map(|u| Usage {
            prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
            completion_tokens: u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0),
        })
        .unwrap_or_default();
    Some(ChatResponse { content, usage, finish_reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let d = parse_retry_after(&future).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30), "{d:?}");
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn parses_chat_completions() {
        let r = parse_response(
            r#"{"choices":[{"message":{"role":"assistant","content":"Hear ye"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(r.content, "Hear ye");
        assert_eq!(r.usage, Usage { prompt_tokens: 12, completion_tokens: 3 });
        assert!(parse_response("{\"choices\":[]}").is_none());
        assert!(parse_response("<html>").is_none());
    }

    #[test]
    fn which_statuses_stop_a_run() {
        for s in [401, 402, 403, 404, 405, 410] {
            assert!(stops_run(s), "{s}");
        }
        for s in [200, 400, 408, 409, 413, 422, 425, 429, 500, 503] {
            assert!(!stops_run(s), "{s}");
        }
    }

    #[test]
    fn keys_that_cannot_be_headers_are_refused_without_quoting_them() {
        assert!(check_key("K", "sk-fine_KEY.123").is_ok());
        let e = check_key("OPENAI_API_KEY", "sk-secret-value\r").unwrap_err().to_string();
        assert!(
            e.contains("$OPENAI_API_KEY") && e.contains("carriage return") && e.contains("character 16 of 16"),
            "{e}"
        );
        assert!(e.contains("Windows line endings") && e.contains("No request was sent"), "{e}");
        assert!(!e.contains("sk-secret"), "{e}");
        for (key, what) in [("sk\nx", "line feed"), ("sk x", "space"), ("sk\u{7}x", "U+0007"), ("skéx", "non-ASCII")] {
            let e = check_key("K", key).unwrap_err().to_string();
            assert!(e.contains(what), "{key:?}: {e}");
        }
        assert_eq!(server_root("http://h:8080/v1/"), "http://h:8080");
        assert_eq!(server_root("http://h:8080"), "http://h:8080");
    }
}
