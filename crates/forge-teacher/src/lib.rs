//! Teachers: the LLMs (or offline stand-ins) that write a dataset's answers.
//!
//! - [`OpenAiClient`]: any OpenAI-compatible chat-completions endpoint, with AIMD concurrency,
//!   `Retry-After`, backoff and timeouts.
//! - [`grammar`]: offline, deterministic Tracery-style expansion (the root demo's teacher).
//! - [`CallCache`]: answers by request key; errors are never cached, secrets never stored.

pub mod aimd;
mod cache;
pub mod grammar;
pub mod openai;
mod request;
pub use forge_rng as rng;

pub use cache::CallCache;
pub use openai::{OpenAiClient, OpenAiConfig, Stats, StatsSnapshot};
pub use request::{ChatRequest, ChatResponse, Message, Usage};

#[derive(Debug, thiserror::Error)]
pub enum TeacherError {
    #[error(
        "the teacher's API key variable ${var} is not set (export it, or remove api-key-env for servers without keys)"
    )]
    MissingApiKey { var: String },
    #[error("the teacher refused the request: HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("the teacher failed {attempts} times; last: {last}")]
    Exhausted { attempts: u32, last: String },
    #[error("could not create the HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Grammar(#[from] grammar::GrammarError),
}
