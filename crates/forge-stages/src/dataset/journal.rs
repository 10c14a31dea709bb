//! The dataset's journal: one JSON line per settled attempt (a sample accepted, an answer
//! rejected, a sample abandoned), appended and synced as each is settled, so a killed build
//! resumes where it stopped. Reading forgives what kills and hand edits leave: a repeated line is
//! read once, a conflicting second entry for an attempt loses to the first, an unreadable middle
//! line is skipped, a torn last line is cut off.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use forge_data::dataset::Sample;
use forge_teacher::Usage;
use serde::{Deserialize, Serialize};

/// A journal line: a committed outcome.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum Journal {
    Accepted(Box<Sample>),
    Rejected { index: u64, repeat: u32, key: String, detail: String, usage: BTreeMap<String, Usage> },
    Abandoned { index: u64, reason: String },
}

impl Journal {
    /// Which attempt this entry settles: (sample index, repeat; none for an abandoned sample).
    pub(super) fn slot(&self) -> (u64, Option<u32>) {
        match self {
            Journal::Accepted(s) => (s.index, Some(s.repeat)),
            Journal::Rejected { index, repeat, .. } => (*index, Some(*repeat)),
            Journal::Abandoned { index, .. } => (*index, None),
        }
    }

    pub(super) fn index(&self) -> u64 {
        self.slot().0
    }
}

pub(super) fn append(journal: &mut File, entry: &Journal) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
    line.push(b'\n');
    journal.write_all(&line)?;
    journal.sync_data()
}

/// What reading a journal found besides its entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct JournalReport {
    /// Lines repeating an entry already read, word for word.
    pub(super) duplicates: usize,
    /// Entries for an attempt already settled by an earlier, different line (the first wins).
    pub(super) conflicting: usize,
    /// Lines in the middle that are not an entry (skipped).
    pub(super) unreadable: usize,
    /// Whether the last line was torn (a kill mid-write) and cut off.
    pub(super) torn: bool,
}

impl JournalReport {
    pub(super) fn is_clean(&self) -> bool {
        *self == JournalReport::default()
    }
}

impl std::fmt::Display for JournalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ignored {} duplicated and {} conflicting entries (the first of each was kept) and {} unreadable lines",
            self.duplicates, self.conflicting, self.unreadable
        )?;
        if self.torn {
            write!(f, "; cut off a torn last line")?;
        }
        Ok(())
    }
}

/// The journal's entries, each attempt once, in order. Reading never fails on the content:
/// a line repeated (an entry appended twice) is read once; a second, different entry for the
/// same attempt (sample index and repeat) is ignored — the first was committed first; a line in
/// the middle that is not an entry is skipped; a torn last line (a kill mid-write) is cut off
/// the file, and a last entry that lost only its newline gets it back, so appends start on a
/// line of their own.
pub(super) fn read_journal(path: &Path) -> std::io::Result<(Vec<Journal>, JournalReport)> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), JournalReport::default())),
        Err(e) => return Err(e),
    };
    let mut report = JournalReport::default();
    let mut entries = Vec::new();
    let mut seen: HashMap<(u64, Option<u32>), blake3::Hash> = HashMap::new();
    let complete = data.last().is_none_or(|b| *b == b'\n');
    let lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    // `split` yields an empty piece after a final newline.
    let n = if complete { lines.len() - 1 } else { lines.len() };
    for (i, line) in lines[..n].iter().enumerate() {
        let last = i + 1 == n;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let entry = match serde_json::from_slice::<Journal>(line) {
            Ok(e) => e,
            Err(_) if last && !complete => {
                report.torn = true;
                let keep = data.len() - line.len();
                OpenOptions::new().write(true).open(path)?.set_len(keep as u64)?;
                break;
            }
            Err(_) => {
                report.unreadable += 1;
                continue;
            }
        };
        if last && !complete {
            OpenOptions::new().append(true).open(path)?.write_all(b"\n")?;
        }
        let digest = blake3::hash(line);
        match seen.get(&entry.slot()) {
            Some(d) if *d == digest => report.duplicates += 1,
            Some(_) => report.conflicting += 1,
            None => {
                seen.insert(entry.slot(), digest);
                entries.push(entry);
            }
        }
    }
    Ok((entries, report))
}
