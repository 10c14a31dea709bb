//! A client for OpenAI-compatible chat-completions endpoints (OpenAI, Ollama, vLLM, the
//! llama.cpp server).
//!
//! Failures are sorted by what they mean: 429 cuts the concurrency window and waits for
//! `Retry-After`; 5xx, timeouts, broken connections and unreadable bodies are retried with
//! jittered exponential backoff; other 4xx answers (a bad key, an unknown model) fail at once,
//! because retrying them only burns time. The API key is read from the environment variable the
//! manifest names and is sent only in the `Authorization` header.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

use crate::TeacherError;
use crate::aimd::Aimd;
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

/// Counters for logs and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub malformed: AtomicU64,
    pub connection_errors: AtomicU64,
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
        }
    }
}

pub struct OpenAiClient {
    http: reqwest::Client,
    config: OpenAiConfig,
    api_key: Option<String>,
    limiter: Aimd,
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
    },
    Fatal(TeacherError),
}

const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(20);

pub(crate) fn install_crypto_provider() {
    // reqwest's rustls backend needs a process-wide provider; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl OpenAiClient {
    pub fn new(config: OpenAiConfig) -> Result<OpenAiClient, TeacherError> {
        let api_key = match &config.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.trim().is_empty() => Some(k),
                _ => return Err(TeacherError::MissingApiKey { var: var.clone() }),
            },
        };
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(config.max_parallel as usize)
            .build()
            .map_err(|e| TeacherError::Client(e.to_string()))?;
        let limiter = Aimd::new(config.max_parallel as usize);
        Ok(OpenAiClient { http, config, api_key, limiter, stats: Arc::default() })
    }

    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    /// The current concurrency window.
    pub fn window(&self) -> f64 {
        self.limiter.limit()
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

    /// Sends `req`, retrying as its failure calls for, up to `max_retries` times.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, TeacherError> {
        let url = format!("{}/chat/completions", self.config.base_url);
        let body = self.body(req);
        let mut jitter = SplitMix64::new(req.key().0[0] as u64 ^ (req.sample << 8) ^ req.repeat as u64);
        let mut last = String::new();
        for attempt in 0..=self.config.max_retries {
            let permit = self.limiter.acquire().await;
            let started = permit.started;
            let outcome = self.attempt(&url, &body, started).await;
            drop(permit);
            let delay = match outcome {
                Attempt::Done(r) => {
                    self.limiter.success();
                    return Ok(r);
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry { why, after } => {
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

    async fn attempt(&self, url: &str, body: &Value, started: Instant) -> Attempt {
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let mut rb = self.http.post(url).json(body).timeout(self.config.timeout);
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => return self.transport_error(e),
        };
        let status = resp.status();
        if status.as_u16() == 429 {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
            self.limiter.overloaded(started, after);
            // With a Retry-After the limiter holds every request back until then; without one,
            // this request backs off like any other transient failure.
            return Attempt::Retry { why: "429 Too Many Requests".into(), after: after.map(|_| Duration::ZERO) };
        }
        if status.is_server_error() {
            self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            return Attempt::Retry { why: format!("server error {status}"), after: None };
        }
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => return self.transport_error(e),
        };
        if !status.is_success() {
            let snippet: String = text.chars().take(300).collect();
            let hint = match status.as_u16() {
                401 | 403 => match &self.config.api_key_env {
                    Some(v) => format!(" (check the key in ${v})"),
                    None => " (the teacher has no api-key-env)".to_string(),
                },
                404 => format!(
                    " (is `{}` the right base-url, and `{}` a model it serves?)",
                    self.config.base_url, self.config.model
                ),
                _ => String::new(),
            };
            return Attempt::Fatal(TeacherError::Rejected {
                status: status.as_u16(),
                body: format!("{snippet}{hint}"),
            });
        }
        match parse_response(&text) {
            Some(r) => {
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                Attempt::Done(r)
            }
            None => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let snippet: String = text.chars().take(120).collect();
                Attempt::Retry { why: format!("unreadable response: {snippet:?}"), after: None }
            }
        }
    }

    fn transport_error(&self, e: reqwest::Error) -> Attempt {
        if e.is_timeout() {
            self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            Attempt::Retry { why: format!("timed out after {:.1}s", self.config.timeout.as_secs_f64()), after: None }
        } else {
            self.stats.connection_errors.fetch_add(1, Ordering::Relaxed);
            Attempt::Retry { why: format!("request failed: {}", error_chain(&e)), after: None }
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
}
