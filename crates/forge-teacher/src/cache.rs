//! The teacher-call cache (`.forge-cache/teacher-v1/`).
//!
//! Teacher calls cost money and are not deterministic, so their answers are the dataset's
//! reproducibility: a call is made once per request key and replayed after that. Only
//! successful answers are stored — an error is never cached. Each entry holds the request
//! (without any secret) and the response, behind a checksum line like the action cache.

use std::path::PathBuf;

use forge_cache::{Cache, CacheError, Digest};
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
}

impl CallCache {
    pub fn new(cache: &Cache) -> CallCache {
        CallCache { dir: cache.bucket(forge_cache::Bucket::Teacher) }
    }

    fn path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The cached answer to `req`. A damaged entry is removed and reported as a miss.
    pub fn get(&self, req: &ChatRequest) -> Option<ChatResponse> {
        let path = self.path(&req.key());
        let data = std::fs::read(&path).ok()?;
        let parsed = (|| {
            let nl = data.iter().position(|b| *b == b'\n')?;
            let sum: Digest = std::str::from_utf8(&data[..nl]).ok()?.parse().ok()?;
            let body = &data[nl + 1..];
            if Digest::of(body) != sum {
                return None;
            }
            let e: Entry = serde_json::from_slice(body).ok()?;
            // A different request under the same key would be a hash collision or tampering.
            (e.request == *req).then_some(e.response)
        })();
        if parsed.is_none() {
            let _ = std::fs::remove_file(&path);
        }
        parsed
    }

    pub fn put(&self, req: &ChatRequest, resp: &ChatResponse) -> Result<(), CacheError> {
        let body = serde_json::to_vec(&Entry { request: req.clone(), response: resp.clone() })
            .expect("cache entries serialize");
        let mut data = format!("{}\n", Digest::of(&body)).into_bytes();
        data.extend_from_slice(&body);
        forge_cache::fsutil::write_atomic(&self.path(&req.key()), &data)
    }
}
