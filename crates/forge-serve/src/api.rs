//! The HTTP surface: routes, request checks, OpenAI's wire format, and errors in its shape.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use forge_infer::Sampling;
use forge_infer::tokenizer::ChatMessage;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{Receiver, channel};

use crate::metrics::Metrics;
use crate::registry::{GetError, Handle, Registry};
use crate::worker::{Event, Finish, Job};
use crate::{Config, Npc};

pub struct State {
    pub registry: Arc<Registry>,
    pub config: Config,
    pub metrics: Metrics,
    next_id: AtomicU64,
}

impl State {
    pub fn new(npcs: Vec<Npc>, config: Config) -> State {
        let registry = Arc::new(Registry::new(npcs, config.memory, config.threads, config.batch, config.queue));
        State { registry, config, metrics: Metrics::default(), next_id: AtomicU64::new(1) }
    }
}

type Shared = Arc<State>;

/// Text pieces a model may run ahead of a streaming client that is not reading.
const EVENTS: usize = 32;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/list", get(list))
        .route("/chat/{npc}", post(chat_npc))
        .route("/preload/{npc}", post(preload))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint", "invalid_request_error") })
        .layer(DefaultBodyLimit::max(state.config.max_body))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// An error as OpenAI's API answers one.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param), ..ApiError::new(StatusCode::BAD_REQUEST, message, "invalid_request_error") }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<GetError> for ApiError {
    fn from(e: GetError) -> ApiError {
        match e {
            GetError::Unknown(_) => ApiError {
                code: Some("model_not_found"),
                param: Some("model"),
                ..ApiError::new(StatusCode::NOT_FOUND, e.to_string(), "invalid_request_error")
            },
            GetError::Load(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m, "server_error"),
        }
    }
}

/// `Authorization: Bearer <key>` on every route but `/health`, when the server has a key.
async fn auth(AxState(st): AxState<Shared>, req: Request, next: Next) -> Response {
    let Some(key) = &st.config.api_key else { return next.run(req).await };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    ApiError {
        code: Some("invalid_api_key"),
        ..ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid API key is required (Authorization: Bearer ...)",
            "invalid_request_error",
        )
    }
    .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Counts every request by route and status, with its latency.
async fn record(AxState(st): AxState<Shared>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let t0 = Instant::now();
    let r = next.run(req).await;
    st.metrics.request(&route, r.status().as_u16(), t0.elapsed().as_secs_f64());
    r
}

async fn health(AxState(st): AxState<Shared>) -> Response {
    let resident = st.registry.resident();
    axum::Json(json!({
        "status": "ok",
        "models": st.registry.npcs().len(),
        "resident": resident.len(),
        "resident_bytes": resident.iter().map(|r| r.1).sum::<u64>(),
    }))
    .into_response()
}

async fn metrics(AxState(st): AxState<Shared>) -> Response {
    let text = st.metrics.render(&st.registry);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(AxState(st): AxState<Shared>) -> Response {
    let created = now();
    let data: Vec<Value> = st
        .registry
        .npcs()
        .iter()
        .map(|n| json!({"id": n.name, "object": "model", "created": created, "owned_by": "forge"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn list(AxState(st): AxState<Shared>) -> Response {
    let npcs: Vec<Value> = st
        .registry
        .npcs()
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "resident": st.registry.is_resident(&n.name),
                "file": n.file,
                "adapter": n.adapter,
            })
        })
        .collect();
    axum::Json(json!({"npcs": npcs})).into_response()
}

async fn preload(AxState(st): AxState<Shared>, Path(npc): Path<String>) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let m = st.registry.get(&npc).await?;
    Ok(axum::Json(json!({
        "npc": npc,
        "resident": true,
        "bytes": m.model.bytes,
        "adapter_bytes": m.adapter.as_ref().map(|a| a.bytes()),
        "architecture": m.model.architecture,
        "seconds": t0.elapsed().as_secs_f64(),
    }))
    .into_response())
}

/// A message's content: a string, or OpenAI's list of parts (only text parts are read).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The sampling fields both chat endpoints take.
#[derive(Deserialize, Default)]
struct Knobs {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Stop>,
}

/// forge's own request fields: retry-until-success (DefameLM §4.2) with the NPC's verifiers.
#[derive(Deserialize, Default)]
struct ForgeExt {
    /// Grade each answer with the target's verifiers and retry with the next seed until one
    /// passes or `max_attempts` are spent.
    #[serde(default)]
    verify: bool,
    max_attempts: Option<i64>,
    /// The recipe node values `contains` criteria look for (e.g. `{"target": "the Baron"}`).
    #[serde(default)]
    values: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<MessageIn>,
    #[serde(default)]
    stream: bool,
    n: Option<i64>,
    #[serde(default)]
    forge: Option<ForgeExt>,
    #[serde(flatten)]
    knobs: Knobs,
}

/// `POST /chat/{npc}`: one message (and the conversation before it, if any).
#[derive(Deserialize)]
struct NpcRequest {
    message: String,
    #[serde(default)]
    history: Vec<MessageIn>,
    system: Option<String>,
    #[serde(default)]
    forge: Option<ForgeExt>,
    #[serde(flatten)]
    knobs: Knobs,
}

/// The JSON body, or an OpenAI-shaped error for a malformed or oversized one.
fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".to_string()
        } else {
            format!("the request body could not be read: {}", r.body_text())
        };
        ApiError::new(status, msg, "invalid_request_error")
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON for this endpoint: {e}"),
            "invalid_request_error",
        )
    })
}

fn messages(items: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    items
        .into_iter()
        .map(|m| {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                return Err(ApiError::invalid("messages", format!("unknown message role `{}`", m.role)));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        (kind, _) => Err(ApiError::invalid(
                            "messages",
                            format!("content parts of type `{kind}` are not supported"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
            };
            let role = if m.role == "developer" { "system" } else { m.role.as_str() };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

/// The request's sampling, checked, and its stop strings.
fn sampling(k: &Knobs, d: &crate::Defaults, config: &Config, room: usize) -> Result<(Sampling, Vec<String>), ApiError> {
    let temperature = k.temperature.unwrap_or(d.temperature);
    if !(0.0..=2.0).contains(&temperature) || !temperature.is_finite() {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, not {temperature}"),
        ));
    }
    let top_p = k.top_p.unwrap_or(d.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("top_p must be in (0, 1], not {top_p}")));
    }
    let top_k = match k.top_k {
        None => d.top_k,
        Some(0) => None,
        Some(n) if n > 0 => Some(n as usize),
        Some(n) => return Err(ApiError::invalid("top_k", format!("top_k must be positive, not {n}"))),
    };
    let cap = config.max_tokens.min(room);
    let max_tokens = match k.max_completion_tokens.or(k.max_tokens) {
        None => d.max_tokens.unwrap_or(cap).min(cap),
        Some(n) if n >= 1 && n as u64 <= config.max_tokens as u64 => (n as usize).min(room),
        Some(n) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be between 1 and {}, not {n}", config.max_tokens),
            ));
        }
    };
    if max_tokens == 0 {
        return Err(ApiError::invalid("messages", "the conversation fills the model's whole context"));
    }
    let stops = match &k.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(_)) => return Err(ApiError::invalid("stop", "at most 4 stop sequences")),
    };
    let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
    Ok((Sampling { temperature, top_p, top_k, seed: k.seed.unwrap_or(0), max_tokens }, stops))
}

/// A conversation in the model's chat format: its text and token ids.
struct Prompt {
    text: String,
    ids: Vec<u32>,
    /// The last user message: what a verifier calls the input.
    input: String,
}

fn prepare(model: &Handle, mut conversation: Vec<ChatMessage>) -> Result<Prompt, ApiError> {
    if conversation.is_empty() {
        return Err(ApiError::invalid("messages", "the conversation has no messages"));
    }
    if let Some(system) = &model.npc.system
        && conversation.first().is_none_or(|m| m.role != "system")
    {
        conversation.insert(0, ChatMessage::new("system", system));
    }
    let input = conversation.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default();
    let tok = &model.model.worker.model.tokenizer;
    let text = tok.render_chat(&conversation, true).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = tok.encode_prompt(&text).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let context = model.model.worker.model.cfg.max_positions;
    if ids.len() >= context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                "messages",
                format!("the conversation is {} tokens; the model's context is {context}", ids.len()),
            )
        });
    }
    Ok(Prompt { text, ids, input })
}

/// Queues one generation of `prompt`.
fn queue(
    st: &State,
    model: &Handle,
    prompt: &Prompt,
    sampling: Sampling,
    stops: Vec<String>,
) -> Result<Receiver<Event>, ApiError> {
    let (tx, rx) = channel(EVENTS);
    let job = Job { prompt: prompt.ids.clone(), sampling, stops, adapter: model.adapter.clone(), events: tx };
    model.model.worker.submit(job).map_err(|_| {
        st.metrics.rejected();
        ApiError {
            retry_after: Some(1),
            code: Some("queue_full"),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "`{}` is answering {} requests and {} more are waiting; try again shortly",
                    model.npc.name, st.config.batch, st.config.queue
                ),
                "server_error",
            )
        }
    })?;
    Ok(rx)
}

/// A whole answer.
struct Answer {
    text: String,
    finish: Finish,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Retry-until-success: per attempt, the criteria that failed (empty: it passed).
    attempts: Option<Vec<Vec<String>>>,
}

impl Answer {
    /// forge's report of the attempts, for the response.
    fn report(&self) -> Option<Value> {
        self.attempts.as_ref().map(|a| {
            json!({
                "attempts": a.len(),
                "passed": a.last().is_some_and(Vec::is_empty),
                "failed": a.iter().map(|f| json!(f)).collect::<Vec<_>>(),
            })
        })
    }
}

/// Collects a whole answer.
async fn collect(st: &State, mut rx: Receiver<Event>) -> Result<Answer, ApiError> {
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, prompt_tokens, completion_tokens } => {
                st.metrics.tokens(prompt_tokens, completion_tokens);
                return Ok(Answer { text, finish, prompt_tokens, completion_tokens, attempts: None });
            }
            Event::Error(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e, "server_error")),
            Event::NoMemory(e) => return Err(no_memory(e)),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model stopped before answering", "server_error"))
}

/// 503: the memory budget stayed full.
fn no_memory(why: String) -> ApiError {
    ApiError {
        retry_after: Some(1),
        code: Some("memory_full"),
        ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why, "server_error")
    }
}

/// The attempts a request asked for, checked against the NPC (which must have verifiers).
fn attempts(model: &Handle, ext: Option<&ForgeExt>) -> Result<Option<usize>, ApiError> {
    let Some(ext) = ext.filter(|e| e.verify || e.max_attempts.is_some()) else { return Ok(None) };
    if model.npc.judge.is_none() {
        return Err(ApiError::invalid(
            "forge.verify",
            format!("`{}` has no verifiers to grade answers with", model.npc.name),
        ));
    }
    match ext.max_attempts {
        None => Ok(Some(model.npc.defaults.attempts)),
        Some(n) if (1..=MAX_ATTEMPTS as i64).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::invalid(
            "forge.max_attempts",
            format!("max_attempts must be between 1 and {MAX_ATTEMPTS}, not {n}"),
        )),
    }
}

/// The most attempts one request may ask for.
const MAX_ATTEMPTS: usize = 32;

/// Generates an answer, or with `forge.verify` retries with the next seed until one passes
/// the NPC's verifiers or the attempts are spent (then the last answer, marked failed).
async fn answer(
    st: &State,
    model: &Handle,
    conversation: Vec<ChatMessage>,
    knobs: &Knobs,
    ext: Option<&ForgeExt>,
) -> Result<Answer, ApiError> {
    let prompt = prepare(model, conversation)?;
    let room = model.model.worker.model.cfg.max_positions - prompt.ids.len();
    let (sampling, stops) = sampling(knobs, &model.npc.defaults, &st.config, room)?;
    let Some(tries) = attempts(model, ext)? else {
        return collect(st, queue(st, model, &prompt, sampling, stops)?).await;
    };
    let judge = model.npc.judge.clone().expect("checked by attempts()");
    let values = Arc::new(ext.map(|e| e.values.clone()).unwrap_or_default());
    let prompt = Arc::new(prompt);
    let mut failures = Vec::new();
    loop {
        let seed = sampling.seed.wrapping_add(failures.len() as u64);
        let rx = queue(st, model, &prompt, Sampling { seed, ..sampling.clone() }, stops.clone())?;
        let mut a = collect(st, rx).await?;
        let (judge, values, prompt, output) = (judge.clone(), values.clone(), prompt.clone(), a.text.clone());
        let failed = tokio::task::spawn_blocking(move || {
            let subject = forge_bench::judge::Subject {
                input: &prompt.input,
                prompt: &prompt.text,
                output: &output,
                values: &values,
            };
            let grades = judge.grade_verifiers(&subject);
            judge
                .names()
                .iter()
                .zip(grades)
                .filter(|(_, g)| g.as_ref().is_some_and(|o| !o.pass))
                .map(|(n, _)| n.clone())
                .collect::<Vec<String>>()
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("grading: {e}"), "server_error"))?;
        let passed = failed.is_empty();
        failures.push(failed);
        st.metrics.attempt(passed);
        if passed || failures.len() >= tries {
            a.attempts = Some(failures);
            return Ok(a);
        }
    }
}

/// An answer of an NPC's model retried until its verifiers pass (`forge proxy`'s promoted
/// sites use it in-process).
#[derive(Clone, Debug)]
pub struct Verified {
    pub text: String,
    pub finish: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub attempts: usize,
    /// The last attempt passed every verifier (always, for an NPC without verifiers).
    pub passed: bool,
}

/// `npc`'s answer to `conversation` (role, text), at most `max_tokens` long (else the NPC's
/// default), with up to `attempts` tries until its verifiers pass (one try, unverified, when it
/// has none); the error in words.
pub async fn verified_answer(
    st: &State,
    npc: &str,
    conversation: &[(String, String)],
    attempts: usize,
    max_tokens: Option<usize>,
) -> Result<Verified, String> {
    let model = st.registry.get(npc).await.map_err(|e| ApiError::from(e).message)?;
    let conversation = conversation.iter().map(|(role, text)| ChatMessage::new(role, text)).collect();
    let ext =
        ForgeExt { verify: true, max_attempts: Some(attempts.clamp(1, MAX_ATTEMPTS) as i64), values: BTreeMap::new() };
    let ext = model.npc.judge.is_some().then_some(&ext);
    let knobs = Knobs { max_tokens: max_tokens.map(|n| n.min(i64::MAX as usize) as i64), ..Knobs::default() };
    let a = answer(st, &model, conversation, &knobs, ext).await.map_err(|e| e.message)?;
    Ok(Verified {
        passed: a.attempts.as_ref().is_none_or(|f| f.last().is_some_and(Vec::is_empty)),
        attempts: a.attempts.as_ref().map_or(1, Vec::len),
        text: a.text,
        finish: a.finish.as_str(),
        prompt_tokens: a.prompt_tokens,
        completion_tokens: a.completion_tokens,
    })
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn chat_completions(
    AxState(st): AxState<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let conversation = messages(req.messages)?;
    let model = st.registry.get(&req.model).await?;
    let id = format!("chatcmpl-{}", st.next_id.fetch_add(1, Ordering::Relaxed));
    let created = now();
    let name = req.model.clone();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let verified = attempts(&model, req.forge.as_ref())?.is_some();
    if req.stream && !verified {
        let prompt = prepare(&model, conversation)?;
        let room = model.model.worker.model.cfg.max_positions - prompt.ids.len();
        let (sampling, stops) = sampling(&req.knobs, &model.npc.defaults, &st.config, room)?;
        let rx = queue(&st, &model, &prompt, sampling, stops)?;
        return Ok(Sse::new(sse(st.clone(), rx, chunk)).keep_alive(KeepAlive::default()).into_response());
    }
    let a = answer(&st, &model, conversation, &req.knobs, req.forge.as_ref()).await?;
    if req.stream {
        // Verified answers stream once they pass: the role, the text, the finish and the report.
        let mut last = chunk(json!({}), Some(a.finish.as_str()));
        if let Some(r) = a.report() {
            last["forge"] = r;
        }
        let events = vec![
            chunk(json!({"role": "assistant", "content": ""}), None).to_string(),
            chunk(json!({"content": a.text}), None).to_string(),
            last.to_string(),
            "[DONE]".to_string(),
        ];
        let s = stream::iter(events.into_iter().map(|e| Ok::<_, Infallible>(SseEvent::default().data(e))));
        return Ok(Sse::new(s).into_response());
    }
    let mut body = json!({
        "id": chunk(json!({}), None)["id"],
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": a.text},
            "finish_reason": a.finish.as_str(),
            "logprobs": null,
        }],
        "usage": {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens,
        },
    });
    if let Some(r) = a.report() {
        body["forge"] = r;
    }
    Ok(axum::Json(body).into_response())
}

/// The answer as OpenAI's stream of chunks: the role, the text as it comes, the finish reason,
/// then `[DONE]`. Dropping the stream (a client that hung up) closes the channel, and the model
/// stops that answer.
fn sse(
    st: Shared,
    rx: Receiver<Event>,
    chunk: impl Fn(Value, Option<&str>) -> Value + Send + 'static,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    enum Phase {
        Start,
        Body,
        Done,
        Over,
    }
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    stream::unfold((rx, Phase::Start, st, chunk), move |(mut rx, phase, st, chunk)| async move {
        match phase {
            Phase::Start => {
                let first = chunk(json!({"role": "assistant", "content": ""}), None);
                Some((data(first), (rx, Phase::Body, st, chunk)))
            }
            Phase::Body => match rx.recv().await {
                Some(Event::Text(t)) => {
                    let c = chunk(json!({"content": t}), None);
                    Some((data(c), (rx, Phase::Body, st, chunk)))
                }
                Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                    st.metrics.tokens(prompt_tokens, completion_tokens);
                    let c = chunk(json!({}), Some(finish.as_str()));
                    Some((data(c), (rx, Phase::Done, st, chunk)))
                }
                Some(Event::Error(e)) => {
                    let err = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e, "server_error").body();
                    Some((data(err), (rx, Phase::Done, st, chunk)))
                }
                Some(Event::NoMemory(e)) => Some((data(no_memory(e).body()), (rx, Phase::Done, st, chunk))),
                None => None,
            },
            Phase::Done => Some((Ok(SseEvent::default().data("[DONE]")), (rx, Phase::Over, st, chunk))),
            Phase::Over => None,
        }
    })
}

async fn chat_npc(
    AxState(st): AxState<Shared>,
    Path(npc): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: NpcRequest = parse(body)?;
    let mut conversation = Vec::new();
    if let Some(s) = &req.system {
        conversation.push(ChatMessage::new("system", s));
    }
    conversation.extend(messages(req.history)?);
    conversation.push(ChatMessage::new("user", &req.message));
    let model = st.registry.get(&npc).await?;
    let a = answer(&st, &model, conversation, &req.knobs, req.forge.as_ref()).await?;
    let mut body = json!({
        "npc": npc,
        "reply": a.text,
        "finish_reason": a.finish.as_str(),
        "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens},
    });
    if let Some(r) = a.report() {
        body["forge"] = r;
    }
    Ok(axum::Json(body).into_response())
}
