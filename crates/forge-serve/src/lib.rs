//! `forge serve`: a workspace's NPC models over HTTP, for a game.
//!
//! - OpenAI's `POST /v1/chat/completions` (streamed over server-sent events, or not) and
//!   `GET /v1/models`, so any OpenAI client library works;
//! - seed 004's `GET /list`, `POST /chat/{npc}` and `POST /preload/{npc}`;
//! - `GET /health` and `GET /metrics` (Prometheus text: requests, tokens, latency, loads,
//!   evictions, resident models and bytes).
//!
//! Models load on first use and stay resident under a byte budget, the least recently used
//! dropped first ([`registry`]); each resident model decodes on its own thread from a bounded
//! queue, and a request that finds the queue full gets 503 with `Retry-After` ([`worker`]).
//! [`proxy`] is `forge proxy`: the capture side of seed 003, in front of an upstream teacher.
//!
//! Errors are OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with a 4xx
//! status for anything the client can fix, and the server keeps serving.

pub mod api;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

pub use registry::{Defaults, Npc, Registry, budget_for, resident_bytes};

/// How a server runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes that models may hold at once: their weights, tokenizers and adapters, the KV
    /// caches and activations of the answers they run, and what a load holds while it reads.
    pub memory: u64,
    /// Decoding threads per model.
    pub threads: usize,
    /// Requests each model answers together, their next tokens in one forward pass.
    pub batch: usize,
    /// Requests that may wait for each model beyond those it is answering.
    pub queue: usize,
    /// Requests must carry `Authorization: Bearer <key>` (not `/health`).
    pub api_key: Option<String>,
    /// The most tokens one answer may ask for.
    pub max_tokens: usize,
    /// The largest request body, in bytes.
    pub max_body: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { memory: 2 << 30, threads: 2, batch: 8, queue: 16, api_key: None, max_tokens: 4096, max_body: 1 << 20 }
    }
}

/// Serves `npcs` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    npcs: Vec<Npc>,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_state(listener, Arc::new(api::State::new(npcs, config)), shutdown).await
}

/// Serves a server's state (whose registry the caller may keep, to point NPCs at rebuilt
/// files) on `listener` until `shutdown` resolves.
pub async fn serve_state(
    listener: tokio::net::TcpListener,
    state: Arc<api::State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tune_allocator();
    axum::serve(listener, api::router(state).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Makes glibc return freed memory to the system, so that the process's memory follows what
/// the budget counts: buffers of 128 KiB and more (weights, answers' KV caches, a prompt's
/// activations) are mapped on their own and unmapped when freed (glibc's default threshold
/// grows with the first large free, after which freed weights stay in the heap), and at most
/// two heaps serve every thread (by default each new thread may get a heap of its own, and a
/// model's decoding threads come and go with it, each leaving its freed pieces behind). With
/// 64 clients over 4 NPCs taking turns in room for 2 (`bench/serve.py`), the peak RSS beyond
/// the budget fell from 80 MiB to 0-12 MiB. Call it before the runtime starts its threads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands what the allocator keeps of freed memory back to the system (glibc keeps freed
/// small pieces, such as a dropped tokenizer's, in its arenas).
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `n` bytes for a person: `1.5 GiB`, `340 MiB`, `12 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// A byte count as people write it: `2GiB`, `512MiB`, `1.5G`, `300M`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 2GiB, 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("`{other}` is not a size unit (B, KiB, MiB, GiB)")),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("`{s}`: a size must be positive"));
    }
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_people_write_them() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("-1G").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }
}
