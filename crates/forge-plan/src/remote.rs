//! A remote cache shared between machines, in the Bazel HTTP remote-cache layout, so that it
//! works with the servers people already run (nginx with WebDAV, bazel-remote):
//!
//! - `GET/PUT /ac/<action key>`: what the action produced — forge's action entry (fingerprint
//!   and file list) and each file's SHA-256;
//! - `GET/PUT/HEAD /cas/<sha256>`: a file's bytes, by the SHA-256 of its content.
//!
//! Everything fetched is verified before it is used: the entry's fingerprint must hash to the
//! key asked for, every file must match its SHA-256 and the BLAKE3 digest of the entry's tree,
//! and paths must stay inside the artifact; a corrupt entry is rejected (the artifact is built
//! locally). Entries are uploaded after their files, so an entry never names missing content.
//! A server that is down, slow or failing degrades the build to local work with one warning; a
//! read-only remote never uploads. The bearer token is sent in a header and nowhere else.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use forge_cache::{ACTION_SCHEMA, ActionEntry, Cache, Digest, Tree};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::fingerprint::Fingerprint;

/// How long a request to the remote cache may stall before forge builds locally instead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the remote cache is and how forge may use it.
#[derive(Clone)]
pub struct RemoteConfig {
    /// `http://host:port/prefix` (no trailing slash needed).
    pub url: String,
    pub read_only: bool,
    /// Sent as `Authorization: Bearer`; never logged.
    pub token: Option<String>,
    /// Per request (connecting, and each read or write of the body).
    pub timeout: Duration,
}

impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &self.url)
            .field("read_only", &self.read_only)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What `/ac/<key>` holds.
#[derive(Serialize, Deserialize)]
struct RemoteEntry {
    schema: u32,
    entry: ActionEntry,
    /// Per file of the entry's tree (by path): the SHA-256 its `/cas/` address uses.
    sha256: BTreeMap<String, String>,
}

const REMOTE_SCHEMA: u32 = 1;

/// What the remote cache did in a build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteCounts {
    pub hits: u64,
    pub misses: u64,
    pub uploads: u64,
    pub rejected: u64,
    /// Teacher answers fetched and uploaded (the shared teacher-call cache).
    pub call_hits: u64,
    pub call_uploads: u64,
}

pub struct Remote {
    cfg: RemoteConfig,
    client: reqwest::blocking::Client,
    /// Set after the first transport failure: the rest of the build stays local.
    down: AtomicBool,
    /// Uploading was refused (a read-only server, a bad token): stop trying.
    no_upload: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    uploads: AtomicU64,
    rejected: AtomicU64,
    call_hits: AtomicU64,
    call_uploads: AtomicU64,
    /// A teacher-call entry was rejected (reported once).
    call_rejected: AtomicBool,
    warnings: Mutex<Vec<String>>,
}

/// Why a fetch did not give an artifact.
enum Miss {
    /// The server does not have it.
    Absent,
    /// The server answered with something that is not the artifact.
    Rejected(String),
    /// The server could not be used.
    Down(String),
}

impl Remote {
    pub fn new(cfg: RemoteConfig) -> Result<Remote, String> {
        // reqwest's rustls backend needs a process-wide provider; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(cfg.timeout)
            .timeout(None)
            .build()
            .map_err(|e| format!("the remote cache's HTTP client: {e}"))?;
        Ok(Remote {
            cfg,
            client,
            down: AtomicBool::new(false),
            no_upload: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            call_hits: AtomicU64::new(0),
            call_uploads: AtomicU64::new(0),
            call_rejected: AtomicBool::new(false),
            warnings: Mutex::default(),
        })
    }

    /// The remote's URL as forge shows it: without a `user:password@` part.
    pub fn url(&self) -> String {
        shown(&self.cfg.url)
    }

    pub fn counts(&self) -> RemoteCounts {
        RemoteCounts {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            uploads: self.uploads.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            call_hits: self.call_hits.load(Ordering::Relaxed),
            call_uploads: self.call_uploads.load(Ordering::Relaxed),
        }
    }

    /// Warnings since the last call (each problem is reported once).
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn warn(&self, w: String) {
        self.warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }

    fn address(&self, kind: &str, hex: &str) -> String {
        format!("{}/{kind}/{hex}", self.cfg.url.trim_end_matches('/'))
    }

    /// A request that may take `timeout` plus a second per MiB of `bytes`.
    fn request_sized(&self, method: reqwest::Method, url: &str, bytes: u64) -> reqwest::blocking::RequestBuilder {
        let r = self.client.request(method, url).timeout(self.cfg.timeout + Duration::from_secs(bytes >> 20));
        match &self.cfg.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::blocking::RequestBuilder {
        let r = self.client.request(method, url).timeout(self.cfg.timeout);
        match &self.cfg.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// The artifact of action `key` from the remote cache, stored in `cache` (content and
    /// action entry) and returned; `None` when the remote does not have it, is down, or sent
    /// something that is not it (each reported once as a warning).
    pub fn fetch(&self, key: &Digest, artifact: &str, cache: &Cache, stat: &forge_cache::StatCache) -> Option<Tree> {
        if self.down.load(Ordering::Relaxed) {
            return None;
        }
        match self.try_fetch(key, cache, stat) {
            Ok(tree) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(tree)
            }
            Err(Miss::Absent) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(Miss::Rejected(why)) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                self.warn(format!("the remote cache's entry for {artifact} was rejected ({why}); building it here"));
                None
            }
            Err(Miss::Down(why)) => {
                self.went_down(why);
                None
            }
        }
    }

    fn went_down(&self, why: String) {
        if !self.down.swap(true, Ordering::Relaxed) {
            self.warn(format!("the remote cache at {} cannot be used ({why}); building locally", self.url()));
        }
    }

    /// What `/ac/<key>` holds, if it is at most `max` bytes.
    fn get_ac(&self, key: &Digest, max: u64) -> Result<Vec<u8>, Miss> {
        let url = self.address("ac", &key.hex());
        let resp = self.request(reqwest::Method::GET, &url).send().map_err(|e| Miss::Down(transport(e)))?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Err(Miss::Absent),
            // A failing server, or one that refuses this client: either way, unusable.
            s => return Err(Miss::Down(format!("GET /ac/ answered {s}"))),
        }
        let mut body = Vec::new();
        resp.take(max + 1).read_to_end(&mut body).map_err(|e| Miss::Down(format!("reading /ac/: {e}")))?;
        if body.len() as u64 > max {
            return Err(Miss::Rejected(format!("the entry is larger than {max} bytes")));
        }
        Ok(body)
    }

    fn try_fetch(&self, key: &Digest, cache: &Cache, stat: &forge_cache::StatCache) -> Result<Tree, Miss> {
        let body = self.get_ac(key, MAX_ENTRY)?;
        let remote: RemoteEntry =
            serde_json::from_slice(&body).map_err(|e| Miss::Rejected(format!("the entry is not forge's: {e}")))?;
        let entry = remote.entry;
        if remote.schema != REMOTE_SCHEMA || entry.schema != ACTION_SCHEMA {
            return Err(Miss::Rejected(format!("entry schema {}/{}", remote.schema, entry.schema)));
        }
        let fp = Fingerprint::from_json(&entry.fingerprint)
            .ok_or_else(|| Miss::Rejected("the entry's fingerprint does not parse".into()))?;
        if fp.key() != *key || entry.key != *key {
            return Err(Miss::Rejected("the entry is for another action".into()));
        }
        // Download into staging, verifying each file as it streams.
        let staging = cache.staging_dir().map_err(|e| Miss::Down(e.to_string()))?;
        let result = self.download_tree(&entry.tree, &remote.sha256, &staging);
        let tree = match result {
            Ok(()) => cache.publish(&staging, stat).map_err(|e| Miss::Down(e.to_string())),
            Err(e) => Err(e),
        };
        if tree.is_err() {
            let _ = forge_cache::fsutil::remove_tree(&staging);
        }
        let tree = tree?;
        if tree != entry.tree {
            return Err(Miss::Rejected("the files differ from the entry's list".into()));
        }
        cache.write_action(&entry).map_err(|e| Miss::Down(e.to_string()))?;
        Ok(tree)
    }

    fn download_tree(&self, tree: &Tree, sha: &BTreeMap<String, String>, staging: &Path) -> Result<(), Miss> {
        for e in &tree.entries {
            if !is_safe(&e.path) {
                return Err(Miss::Rejected(format!("the path `{}` leaves the artifact", e.path)));
            }
            let hex = sha
                .get(&e.path)
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| Miss::Rejected(format!("no SHA-256 for `{}`", e.path)))?;
            let url = self.address("cas", hex);
            let resp =
                self.request_sized(reqwest::Method::GET, &url, e.size).send().map_err(|e| Miss::Down(transport(e)))?;
            match resp.status().as_u16() {
                200 => {}
                404 => return Err(Miss::Rejected(format!("`{}` is missing from /cas/", e.path))),
                s => return Err(Miss::Down(format!("GET /cas/ answered {s}"))),
            }
            let path = staging.join(&e.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|err| Miss::Down(format!("{}: {err}", parent.display())))?;
            }
            let file = std::fs::File::create(&path).map_err(|err| Miss::Down(format!("{}: {err}", path.display())))?;
            let mut w = Hashing::new(std::io::BufWriter::new(file));
            std::io::copy(&mut resp.take(e.size + 1), &mut w)
                .map_err(|err| Miss::Down(format!("downloading `{}`: {err}", e.path)))?;
            let (n, got_sha, got_blake) = w.finish().map_err(|err| Miss::Down(format!("{}: {err}", path.display())))?;
            if n != e.size || got_sha != *hex || got_blake != e.digest {
                return Err(Miss::Rejected(format!("`{}` does not match its digest", e.path)));
            }
            if e.executable {
                set_executable(&path);
            }
        }
        Ok(())
    }

    /// Uploads a built artifact (its files, then its entry) unless the remote is read-only,
    /// down, or refused an upload before.
    pub fn push(&self, entry: &ActionEntry, cache: &Cache) {
        if self.may_upload() {
            let pushed = self.try_push(entry, cache);
            self.uploaded(pushed, &self.uploads);
        }
    }

    fn may_upload(&self) -> bool {
        !(self.cfg.read_only || self.down.load(Ordering::Relaxed) || self.no_upload.load(Ordering::Relaxed))
    }

    /// Counts an upload in `count`, or stops uploading (refused) or using the remote (failed).
    fn uploaded(&self, result: Result<(), (String, bool)>, count: &AtomicU64) {
        match result {
            Ok(()) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            Err((why, true)) => {
                if !self.no_upload.swap(true, Ordering::Relaxed) {
                    self.warn(format!("the remote cache at {} refused an upload ({why}); not uploading", self.url()));
                }
            }
            Err((why, false)) => self.went_down(why),
        }
    }

    /// Err((why, the server refused rather than failed)).
    fn try_push(&self, entry: &ActionEntry, cache: &Cache) -> Result<(), (String, bool)> {
        let dir = cache.cas_dir(&entry.tree.digest());
        let mut sha = BTreeMap::new();
        for e in &entry.tree.entries {
            let path = dir.join(&e.path);
            let hex = sha256_file(&path).map_err(|err| (format!("{}: {err}", path.display()), false))?;
            let url = self.address("cas", &hex);
            let head = self.request(reqwest::Method::HEAD, &url).send().map_err(|e| (transport(e), false))?;
            if head.status().as_u16() != 200 {
                let file = std::fs::File::open(&path).map_err(|err| (format!("{}: {err}", path.display()), false))?;
                let put = self
                    .request_sized(reqwest::Method::PUT, &url, e.size)
                    .body(reqwest::blocking::Body::sized(file, e.size))
                    .send()
                    .map_err(|e| (transport(e), false))?;
                check_put(put.status().as_u16(), "/cas/")?;
            }
            sha.insert(e.path.clone(), hex);
        }
        let body = serde_json::to_vec(&RemoteEntry { schema: REMOTE_SCHEMA, entry: entry.clone(), sha256: sha })
            .expect("entries serialize");
        let put = self
            .request(reqwest::Method::PUT, &self.address("ac", &entry.key.hex()))
            .body(body)
            .send()
            .map_err(|e| (transport(e), false))?;
        check_put(put.status().as_u16(), "/ac/")
    }
}

/// The largest teacher-call entry forge reads (a request and its answer).
const MAX_CALL: u64 = 16 << 20;

/// The shared teacher-call cache: each entry of the local one (checksum line, request without
/// secrets, answer) under `/ac/<request key>`. Request keys and action keys are digests of
/// different things, so they never meet; the reader checks that an entry is the answer to the
/// request it asked for.
impl forge_cache::SharedStore for Remote {
    fn get(&self, key: &Digest) -> Option<Vec<u8>> {
        if self.down.load(Ordering::Relaxed) {
            return None;
        }
        match self.get_ac(key, MAX_CALL) {
            Ok(body) => {
                self.call_hits.fetch_add(1, Ordering::Relaxed);
                Some(body)
            }
            // An answer larger than any answer is no answer: asked again, as if absent.
            Err(Miss::Absent | Miss::Rejected(_)) => None,
            Err(Miss::Down(why)) => {
                self.went_down(why);
                None
            }
        }
    }

    fn put(&self, key: &Digest, data: &[u8]) {
        if !self.may_upload() {
            return;
        }
        let put = self
            .request(reqwest::Method::PUT, &self.address("ac", &key.hex()))
            .body(data.to_vec())
            .send()
            .map_err(|e| (transport(e), false))
            .and_then(|r| check_put(r.status().as_u16(), "/ac/"));
        self.uploaded(put, &self.call_uploads);
    }

    fn rejected(&self, _key: &Digest, why: &str) {
        self.call_hits.fetch_sub(1, Ordering::Relaxed);
        self.rejected.fetch_add(1, Ordering::Relaxed);
        if !self.call_rejected.swap(true, Ordering::Relaxed) {
            self.warn(format!("the remote cache's answer to a teacher call was rejected ({why}); asking the teacher"));
        }
    }
}

/// `url` without the credentials of a `scheme://user:password@host` form.
fn shown(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://{host}{path}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// The largest `/ac/` entry forge reads (a file list; far larger is not forge's).
const MAX_ENTRY: u64 = 64 << 20;

fn check_put(status: u16, what: &str) -> Result<(), (String, bool)> {
    match status {
        200..=299 => Ok(()),
        s if s >= 500 => Err((format!("PUT {what} answered {s}"), false)),
        s => Err((format!("PUT {what} answered {s}"), true)),
    }
}

/// A transport error in words, without the request's headers.
fn transport(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        e.without_url().to_string()
    }
}

/// A relative path with no `..`, root or prefix: it stays inside the artifact.
fn is_safe(path: &str) -> bool {
    !path.is_empty() && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

/// The SHA-256 of a file, in lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Bytes in lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(unix)]
fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mut p = m.permissions();
        p.set_mode(p.mode() | 0o111);
        let _ = std::fs::set_permissions(path, p);
    }
}

#[cfg(not(unix))]
fn set_executable(_: &Path) {}

/// A writer that counts and hashes (SHA-256 and BLAKE3) what passes through.
struct Hashing<W: Write> {
    inner: W,
    n: u64,
    sha: sha2::Sha256,
    blake: blake3::Hasher,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing { inner, n: 0, sha: sha2::Sha256::new(), blake: blake3::Hasher::new() }
    }

    fn finish(mut self) -> std::io::Result<(u64, String, Digest)> {
        self.inner.flush()?;
        Ok((self.n, hex(&self.sha.finalize()), Digest(*self.blake.finalize().as_bytes())))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        self.sha.update(&buf[..n]);
        self.blake.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_a_url_are_never_shown() {
        assert_eq!(super::shown("http://ci:s3cret@cache:8080/forge"), "http://cache:8080/forge");
        assert_eq!(super::shown("https://cache/forge/a@b"), "https://cache/forge/a@b");
        assert_eq!(super::shown("http://cache:8080"), "http://cache:8080");
    }

    #[test]
    fn paths_that_leave_the_artifact_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "./.."] {
            assert!(!super::is_safe(bad), "{bad}");
        }
        for ok in ["x", "a/b/c.gguf", "samples.jsonl"] {
            assert!(super::is_safe(ok), "{ok}");
        }
    }
}
