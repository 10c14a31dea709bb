//! Teachers: the LLMs (or offline stand-ins) that write a dataset's answers.
//!
//! - [`OpenAiClient`]: any OpenAI-compatible chat-completions endpoint, with an adaptive
//!   concurrency window (slot discovery, slow start, timeouts and latency as congestion),
//!   `Retry-After`, backoff, timeouts, and secrets redacted from every error.
//! - [`grammar`]: offline, deterministic Tracery-style expansion (the root demo's teacher).
//! - [`CallCache`]: answers by request key; errors are never cached, secrets never stored.

pub mod aimd;
mod cache;
pub mod grammar;
pub mod openai;
pub mod redact;
mod request;
pub use forge_rng as rng;

pub use cache::CallCache;
pub use openai::{OpenAiClient, OpenAiConfig, Stats, StatsSnapshot};
pub use redact::Redactor;
pub use request::{ChatRequest, ChatResponse, Message, Usage};

#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error(
        "the teacher's API key variable ${var} is not set (export it, or remove api-key-env for servers without keys)"
    )]
    MissingApiKey { var: String },
    /// The key cannot be sent as an HTTP header (a carriage return from a Windows-edited env
    /// file, a space, a control character). `problem` never quotes the key.
    #[error("the teacher's API key variable ${var} {problem}")]
    BadApiKey { var: String, problem: String },
    #[error("the teacher refused the request: HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("the teacher failed {attempts} times; last: {last}")]
    Exhausted { attempts: u32, last: String },
    /// Requests sent alone (nothing else in flight) timed out again and again, with no answer
    /// in between: the server cannot answer within the timeout at all.
    #[error(
        "the teacher timed out {timeouts} times in a row with no other request in flight (timeout={timeout_s}s), so the server cannot answer within the timeout; raise the teacher's `timeout`, or bound the answers (max-tokens, or a max-chars check)"
    )]
    TooSlow { timeouts: u32, timeout_s: f64 },
    /// A request that cannot be sent as built (retrying it cannot help).
    #[error("could not send the request to the teacher: {0}")]
    Request(String),
    #[error("could not create the HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Grammar(#[from] grammar::GrammarError),
}

impl TeacherError {
    /// Asking again — this request or any other to the same teacher — cannot succeed: a
    /// missing or malformed key, a key the server refuses (401, 403), a wrong base URL or
    /// model (404), a request the client cannot build. A run should stop at once.
    pub fn stops_run(&self) -> bool {
        match self {
            TeacherError::MissingApiKey { .. }
            | TeacherError::BadApiKey { .. }
            | TeacherError::Request(_)
            | TeacherError::Client(_)
            | TeacherError::TooSlow { .. } => true,
            TeacherError::Rejected { status, .. } => openai::stops_run(*status),
            TeacherError::Exhausted { .. } | TeacherError::Grammar(_) => false,
        }
    }
}
