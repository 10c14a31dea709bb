//! `forge watch` driven by a test that saves files, valid and invalid, and reads what it prints:
//! a save rebuilds what it made stale and nothing else, a manifest saved with an error prints its
//! diagnostic and the watch goes on, and a save during a build cancels it and builds again.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::*;

const MANIFEST: &str = r#"forge 1
target "t" {
    command "a" {
        run "sh" "-c" "cat data/*.txt > {out}/all.txt"
        inputs "data/*.txt"
    }
    command "slow" {
        run "sh" "-c" "sleep 3; cat slow/in.txt > {out}/out.txt"
        inputs "slow/in.txt"
    }
}
"#;

struct Watch {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Watch {
    fn start(ws: &TestWorkspace) -> Watch {
        let mut child = ws.cmd(&["watch"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch { child, lines, seen: Vec::new() }
    }

    /// The lines up to and including the first that contains `text`.
    fn until(&mut self, text: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    got.push(line.clone());
                    if line.contains(text) {
                        return got;
                    }
                }
                Err(_) => panic!("no line with {text:?} within {within:?}; printed so far:\n{}", self.seen.join("\n")),
            }
        }
    }
}

fn built(lines: &[String]) -> Vec<String> {
    lines.iter().filter_map(|l| l.split_whitespace().skip_while(|w| *w != "Built").nth(1).map(str::to_string)).collect()
}

#[test]
fn watch_rebuilds_what_a_save_made_stale_and_survives_a_bad_manifest() {
    let ws = TestWorkspace::with_manifest(MANIFEST);
    ws.write("data/one.txt", "one\n");
    ws.write("slow/in.txt", "first\n");
    let mut w = Watch::start(&ws);
    let first = w.until("Done", Duration::from_secs(60));
    let mut b = built(&first);
    b.sort();
    assert_eq!(b, ["t:a", "t:slow"], "{first:?}");

    // A lore-like edit: only `a` reads it.
    let t0 = Instant::now();
    ws.write("data/two.txt", "two\n");
    let lines = w.until("Done", Duration::from_secs(30));
    assert_eq!(built(&lines), ["t:a"], "{lines:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    // A file no stage reads: a no-op build.
    ws.write("notes.md", "todo\n");
    let lines = w.until("Done", Duration::from_secs(30));
    assert!(built(&lines).is_empty(), "{lines:?}");

    // A manifest saved mid-edit: its diagnostic, and the watch goes on.
    ws.write("forge.kdl", &MANIFEST.replace("command \"a\"", "comand \"a\""));
    let lines = w.until("comand", Duration::from_secs(30));
    assert!(lines.iter().any(|l| l.contains("comand")), "{lines:?}");
    ws.write("forge.kdl", &MANIFEST.replace("cat data/*.txt", "cat data/*.txt data/*.txt"));
    let lines = w.until("Done", Duration::from_secs(30));
    assert_eq!(built(&lines), ["t:a"], "{lines:?}");

    // A save while `slow` builds: the build is cancelled and starts again with the new file.
    ws.write("slow/in.txt", "second\n");
    w.until("Building", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(800));
    let t0 = Instant::now();
    ws.write("slow/in.txt", "third\n");
    let lines = w.until("Cancelled", Duration::from_secs(30));
    assert!(lines.iter().any(|l| l.contains("slow/in.txt changed")), "{lines:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "cancelled at once: {:?}", t0.elapsed());
    let lines = w.until("Done", Duration::from_secs(60));
    assert_eq!(built(&lines), ["t:slow"], "{lines:?}");
    let r = ws.run(&["artifact", "path", "t:slow"]);
    let out = std::path::PathBuf::from(r.stdout().trim()).join("out.txt");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "third\n");
}
