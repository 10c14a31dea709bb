//! The capture store of `forge proxy`: one append-only JSON-lines file per call site (`captures/SITE.jsonl`).
//!
//! A capture is appended as one line, `{"sum": …, "capture": {…}}`, and fsynced before the
//! proxy lets its client see the end of the answer, so a capture the client was told of is on
//! disk. Lines are written whole by one writer per site; a `kill -9` can at worst leave a last
//! line without its end, which the reader cuts off (and counts). `sum` is the BLAKE3 digest of
//! the capture's canonical JSON: a damaged line is skipped and counted, never half-read.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One captured call: what the call site asked and what the upstream answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    /// Unique within the store (site, time and a counter, hashed).
    pub id: String,
    pub site: String,
    /// Milliseconds since the Unix epoch, when the answer was complete.
    pub at_ms: u64,
    /// The manifest's teacher that answered.
    pub upstream: String,
    /// The request body as forwarded (without forge's own fields), secrets redacted.
    pub request: Value,
    pub response: Answer,
    /// From receiving the request to the end of the answer.
    pub latency_ms: u64,
    pub stream: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    sum: String,
    capture: Capture,
}

fn sum(c: &Capture) -> String {
    let v = serde_json::to_value(c).expect("captures serialize");
    blake3::hash(&forge_cache::canonical::to_vec(&v)).to_hex().to_string()
}

/// A message's text: a string, or the text parts of a list of parts.
fn text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""),
        _ => String::new(),
    }
}

/// The student's input (the conversation without its system messages: the user's text when it
/// is one message, else each turn as `role: text`) and the system message.
pub fn student_input(request: &Value) -> (String, Option<String>) {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let is_system = |m: &Value| matches!(m["role"].as_str(), Some("system" | "developer"));
    let system: Vec<String> = messages.iter().filter(|m| is_system(m)).map(|m| text(&m["content"])).collect();
    let turns: Vec<&Value> = messages.iter().filter(|m| !is_system(m)).collect();
    let input = match turns.as_slice() {
        [one] if one["role"] == "user" => text(&one["content"]),
        many => many
            .iter()
            .map(|m| format!("{}: {}", m["role"].as_str().unwrap_or("user"), text(&m["content"])))
            .collect::<Vec<_>>()
            .join("\n"),
    };
    (input, (!system.is_empty()).then(|| system.join("\n")))
}

/// What reading a store file found besides its captures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Lines that do not parse or whose sum does not match: skipped.
    pub damaged: u64,
    /// A last line without its end (a write cut short): not a capture.
    pub torn: bool,
}

/// Where `forge proxy` keeps captures by default, relative to the workspace root.
pub const DEFAULT_DIR: &str = "captures";

/// A site's file in a capture store.
pub fn file_name(site: &str) -> String {
    format!("{site}.jsonl")
}

/// A site's file in the default store, workspace-relative (`captures/SITE.jsonl`).
pub fn default_file(site: &str) -> String {
    format!("{DEFAULT_DIR}/{}", file_name(site))
}

/// Appends captures; one open file per site.
#[derive(Clone)]
pub struct CaptureStore {
    dir: PathBuf,
    files: Arc<Mutex<HashMap<String, Arc<Mutex<File>>>>>,
}

/// Whether `f` is still the file at `path` (not deleted, renamed away or replaced meanwhile).
fn still_at(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl CaptureStore {
    pub fn open(dir: &Path) -> io::Result<CaptureStore> {
        std::fs::create_dir_all(dir)?;
        Ok(CaptureStore { dir: dir.to_path_buf(), files: Arc::default() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, site: &str) -> PathBuf {
        self.dir.join(file_name(site))
    }

    /// The open file of `site`; opened again when the one held is no longer at its path (a
    /// user moved or deleted the captures while the proxy ran: they must not go to a file
    /// nobody can read).
    fn file(&self, site: &str) -> io::Result<Arc<Mutex<File>>> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path(site);
        if let Some(f) = files.get(site)
            && still_at(&f.lock().unwrap_or_else(|p| p.into_inner()), &path)
        {
            return Ok(f.clone());
        }
        let mut f = OpenOptions::new().create(true).read(true).append(true).open(&path)?;
        mend(&mut f)?;
        let f = Arc::new(Mutex::new(f));
        files.insert(site.to_string(), f.clone());
        Ok(f)
    }

    /// Appends `c` to its site's file and syncs it to disk (blocking).
    pub fn append(&self, c: &Capture) -> io::Result<()> {
        let mut line = serde_json::to_vec(&Line { sum: sum(c), capture: c.clone() }).expect("captures serialize");
        line.push(b'\n');
        let file = self.file(&c.site)?;
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&line)?;
        f.sync_data()
    }
}

/// A file whose last line lost its end (the writer was killed mid-line): cut it off, so the
/// next capture starts a line of its own.
fn mend(f: &mut File) -> io::Result<()> {
    let len = f.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Find the start of the torn line.
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    let cut = loop {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    f.set_len(cut)?;
    f.sync_data()
}

/// The captures of one site file, in the order they were written.
pub fn read(path: &Path) -> io::Result<(Vec<Capture>, ReadReport)> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), ReadReport::default())),
        Err(e) => return Err(e),
    };
    let mut report = ReadReport::default();
    let mut out = Vec::new();
    let mut lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    // The text after the last newline: empty, or a line whose end was never written.
    let tail = lines.pop().unwrap_or_default();
    if !tail.is_empty() {
        report.torn = true;
    }
    for line in lines {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(l) if sum(&l.capture) == l.sum => out.push(l.capture),
            _ => report.damaged += 1,
        }
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(n: u64, content: &str) -> Capture {
        Capture {
            id: format!("{n:016x}"),
            site: "level-gen".into(),
            at_ms: n,
            upstream: "big".into(),
            request: serde_json::json!({"messages": [{"role": "user", "content": format!("level {n}")}]}),
            response: Answer { content: content.into(), finish_reason: Some("stop".into()), usage: None },
            latency_ms: 3,
            stream: false,
        }
    }

    #[test]
    fn a_damaged_line_is_skipped_and_counted_and_the_rest_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = CaptureStore::open(dir.path()).unwrap();
        for (n, text) in [(1, "a grid"), (2, "another grid"), (3, "a third")] {
            store.append(&capture(n, text)).unwrap();
        }
        let path = store.path("level-gen");
        let (caps, report) = read(&path).unwrap();
        assert_eq!((caps.len(), report), (3, ReadReport::default()));
        // Moved away while the store is open: the next capture starts a new file at the path.
        std::fs::rename(&path, dir.path().join("old.jsonl")).unwrap();
        store.append(&capture(4, "after the move")).unwrap();
        assert_eq!(read(&path).unwrap().0, vec![capture(4, "after the move")]);
        assert_eq!(read(&dir.path().join("old.jsonl")).unwrap().0.len(), 3);
        std::fs::remove_file(&path).unwrap();
        store.append(&capture(5, "after a delete")).unwrap();
        assert_eq!(read(&path).unwrap().0.len(), 1);
        std::fs::rename(dir.path().join("old.jsonl"), &path).unwrap();
        assert_eq!(caps[1], capture(2, "another grid"));
        // One changed byte (the content), and a line that is not JSON.
        let text = std::fs::read_to_string(&path).unwrap().replacen("another grid", "another grit", 1);
        std::fs::write(&path, format!("{text}not json\n")).unwrap();
        let (caps, report) = read(&path).unwrap();
        let contents: Vec<&str> = caps.iter().map(|c| c.response.content.as_str()).collect();
        assert_eq!(contents, ["a grid", "a third"]);
        assert_eq!(report, ReadReport { damaged: 2, torn: false });
        assert_eq!(read(&dir.path().join("none.jsonl")).unwrap().0, Vec::new(), "no file: no captures");
    }
}
