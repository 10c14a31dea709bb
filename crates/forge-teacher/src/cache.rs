//! The teacher-call cache (`.forge-cache/teacher-v1/`).
//!
//! Teacher calls cost money and are not deterministic, so their answers are the dataset's
//! reproducibility: a call is made once per request key and replayed after that. Only
//! successful answers are stored — an error is never cached. Each entry holds the request
//! (without any secret) and the response, behind a checksum line like the action cache.

use std::path::PathBuf;
use std::sync::Arc;

use forge_cache::{Cache, CacheError, Digest, SharedStore};
use serde::{Deserialize, Serialize};

use crate::request::{ChatRequest, ChatResponse};

#[derive(Serialize, Deserialize)]
struct Entry {
    request: ChatRequest,
    response: ChatResponse,
}

#[derive(Clone)]
pub struct CallCache {
    dir: PathBuf,
    /// The remote cache's copy, consulted on a local miss and given every new answer.
    shared: Option<Arc<dyn SharedStore>>,
}

/// An entry as stored: a checksum line, then the request and its answer as JSON.
fn encode(req: &ChatRequest, resp: &ChatResponse) -> Vec<u8> {
    let body =
        serde_json::to_vec(&Entry { request: req.clone(), response: resp.clone() }).expect("cache entries serialize");
    let mut data = format!("{}\n", Digest::of(&body)).into_bytes();
    data.extend_from_slice(&body);
    data
}

/// The answer in `data`, if it is an intact entry for exactly `req`.
fn decode(data: &[u8], req: &ChatRequest) -> Option<ChatResponse> {
    let nl = data.iter().position(|b| *b == b'\n')?;
    let sum: Digest = std::str::from_utf8(&data[..nl]).ok()?.parse().ok()?;
    let body = &data[nl + 1..];
    if Digest::of(body) != sum {
        return None;
    }
    let e: Entry = serde_json::from_slice(body).ok()?;
    // A different request under the same key would be a hash collision or tampering.
    (e.request == *req).then_some(e.response)
}

impl CallCache {
    pub fn new(cache: &Cache) -> CallCache {
        CallCache { dir: cache.bucket(forge_cache::Bucket::Teacher), shared: None }
    }

    /// Shares answers through `shared` (the remote cache), when given.
    pub fn with_shared(self, shared: Option<Arc<dyn SharedStore>>) -> CallCache {
        CallCache { shared, ..self }
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    fn path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The cached answer to `req`. A damaged entry is removed and reported as a miss.
    pub fn get(&self, req: &ChatRequest) -> Option<ChatResponse> {
        let path = self.path(&req.key());
        let data = std::fs::read(&path).ok()?;
        let parsed = decode(&data, req);
        if parsed.is_none() {
            let _ = std::fs::remove_file(&path);
        }
        parsed
    }

    /// The shared store's answer to `req` (blocking: call it off the async threads), verified
    /// like a local entry and then kept locally; `None` when there is no store, it lacks the
    /// answer, or what it sent is not the answer (reported to it).
    pub fn get_shared(&self, req: &ChatRequest) -> Option<ChatResponse> {
        let shared = self.shared.as_ref()?;
        let key = req.key();
        let data = shared.get(&key)?;
        match decode(&data, req) {
            Some(r) => {
                let _ = forge_cache::fsutil::write_atomic(&self.path(&key), &data);
                Some(r)
            }
            None => {
                shared.rejected(&key, "its checksum or its request does not match");
                None
            }
        }
    }

    pub fn put(&self, req: &ChatRequest, resp: &ChatResponse) -> Result<(), CacheError> {
        forge_cache::fsutil::write_atomic(&self.path(&req.key()), &encode(req, resp))
    }

    /// Gives the answer to the shared store, if there is one (blocking).
    pub fn share(&self, req: &ChatRequest, resp: &ChatResponse) {
        if let Some(shared) = &self.shared {
            shared.put(&req.key(), &encode(req, resp));
        }
    }
}
