//! Build events for people (progress bar on a terminal, plain lines in CI) or machines
//! (`--json`: one JSON object per line on stdout).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use forge_plan::{DirtyReason, Event, EventSink};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::{Color, Output, seconds};

pub struct Renderer {
    out: Output,
    json: bool,
    /// Created when the plan says there is work, on a terminal.
    bar: OnceLock<ProgressBar>,
    running: Mutex<BTreeMap<String, String>>,
    last_progress: Mutex<HashMap<String, Instant>>,
    /// Fetched from the remote cache: their `Finish` says nothing more.
    fetched: Mutex<std::collections::HashSet<String>>,
}

/// Plain-mode progress lines per artifact at most this often.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub fn reasons_line(reasons: &[DirtyReason]) -> String {
    let mut parts: Vec<String> = reasons.iter().take(3).map(|r| r.to_string()).collect();
    if reasons.len() > 3 {
        parts.push(format!("and {} more", reasons.len() - 3));
    }
    parts.join("; ")
}

impl Renderer {
    pub fn new(out: Output, json: bool) -> Renderer {
        Renderer {
            out,
            json,
            bar: OnceLock::new(),
            running: Mutex::default(),
            last_progress: Mutex::default(),
            fetched: Mutex::default(),
        }
    }

    fn line(&self, s: String) {
        match self.bar.get() {
            Some(bar) => bar.println(s),
            None => eprintln!("{s}"),
        }
    }

    fn update_bar(&self) {
        if let Some(bar) = self.bar.get() {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            let msg: Vec<String> =
                running.iter().map(|(a, p)| if p.is_empty() { a.clone() } else { format!("{a} {p}") }).collect();
            bar.set_message(msg.join(", "));
        }
    }

    fn set_running(&self, artifact: &str, progress: Option<String>) {
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            match progress {
                Some(p) => running.insert(artifact.to_string(), p),
                None => running.remove(artifact),
            };
        }
        self.update_bar();
    }

    fn finish_bar(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}

impl EventSink for Renderer {
    fn emit(&self, event: Event) {
        if self.json {
            if let Ok(s) = serde_json::to_string(&event) {
                crate::outln!("{s}");
            }
            return;
        }
        let o = &self.out;
        match event {
            Event::Plan { to_check, .. } => {
                if o.tty && !o.quiet && to_check > 0 {
                    let bar = ProgressBar::with_draw_target(Some(to_check as u64), ProgressDrawTarget::stderr());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner:.cyan} [{pos}/{len}] {wide_msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.enable_steady_tick(Duration::from_millis(120));
                    let _ = self.bar.set(bar);
                }
            }
            Event::Fresh { artifact, cutoff } => {
                if cutoff {
                    if let Some(bar) = self.bar.get() {
                        bar.inc(1);
                    }
                    if !o.quiet {
                        self.line(format!(
                            "{} {artifact} {}",
                            o.verb("Fresh", Color::Green),
                            o.paint("(early cutoff: upstream content unchanged)", Color::Dim)
                        ));
                    }
                } else if o.verbose {
                    self.line(format!("{} {artifact}", o.verb("Fresh", Color::Green)));
                }
            }
            Event::Start { artifact, reasons } => {
                if !o.quiet {
                    self.line(format!(
                        "{} {artifact} {}",
                        o.verb("Building", Color::Cyan),
                        o.paint(&format!("({})", reasons_line(&reasons)), Color::Dim)
                    ));
                }
                self.set_running(&artifact, Some(String::new()));
            }
            Event::Progress { artifact, done, total, message } => {
                let p = if total > 0 { format!("{done}/{total} {message}") } else { message };
                if self.bar.get().is_some() {
                    self.set_running(&artifact, Some(p.trim().to_string()));
                } else if !o.quiet {
                    let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
                    let due = last.get(&artifact).is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY);
                    if due || (total > 0 && done == total) {
                        last.insert(artifact.clone(), Instant::now());
                        drop(last);
                        self.line(format!("{} {artifact} {}", o.verb("Progress", Color::Blue), p.trim()));
                    }
                }
            }
            Event::Fetched { artifact } => {
                if !o.quiet {
                    self.line(format!("{} {artifact} from the remote cache", o.verb("Fetched", Color::Green)));
                }
                self.fetched.lock().unwrap_or_else(|p| p.into_inner()).insert(artifact);
            }
            Event::Finish { artifact, duration_ms, unchanged, .. } => {
                self.set_running(&artifact, None);
                if let Some(bar) = self.bar.get() {
                    bar.inc(1);
                }
                let fetched = self.fetched.lock().unwrap_or_else(|p| p.into_inner()).contains(&artifact);
                if !o.quiet && !fetched {
                    let note = if unchanged { " (content unchanged)" } else { "" };
                    self.line(format!(
                        "{} {artifact} in {}{note}",
                        o.verb("Built", Color::Green),
                        seconds(duration_ms)
                    ));
                }
            }
            Event::Fail { artifact, error, log, .. } => {
                self.set_running(&artifact, None);
                if let Some(bar) = self.bar.get() {
                    bar.inc(1);
                }
                let mut lines = error.lines();
                let first = lines.next().unwrap_or("");
                let mut s = format!("{} {artifact}: {first}", o.verb("Failed", Color::Red));
                for l in lines {
                    s.push_str(&format!("\n         {}", o.paint(&format!("| {l}"), Color::Dim)));
                }
                if let Some(log) = log {
                    s.push_str(&format!("\n         log: {log}"));
                }
                self.line(s);
            }
            Event::Skip { artifact, because } => {
                if let Some(bar) = self.bar.get() {
                    bar.inc(1);
                }
                if !o.quiet {
                    self.line(format!("{} {artifact} (needs {because})", o.verb("Skipped", Color::Yellow)));
                }
            }
            Event::WouldBuild { artifact, reasons, estimate } => {
                self.line(format!("{} {artifact} ({})", o.verb("Stale", Color::Yellow), reasons_line(&reasons)));
                if let Some(e) = estimate {
                    self.line(format!("{:>8} {}: {}", "", e.summary, e.cost));
                }
            }
            Event::WouldCheck { artifact, upstream } => {
                self.line(format!("{} {artifact} (after {upstream} is rebuilt)", o.verb("Pending", Color::Yellow)));
            }
            Event::Warning { message } => self.line(format!("{}: {message}", o.paint("warning", Color::Yellow))),
            Event::Done(s) => {
                self.finish_bar();
                if o.quiet && s.ok() {
                    return;
                }
                let mut parts = Vec::new();
                let not_run = if s.dry_run { "to check or build" } else { "not run" };
                for (n, what) in [
                    (s.failed, "failed"),
                    (s.skipped, "skipped"),
                    (s.not_run, not_run),
                    (s.built, "built"),
                    (s.fresh, "fresh"),
                ] {
                    if n > 0 || what == "built" || what == "fresh" {
                        parts.push(format!("{n} {what}"));
                    }
                }
                let verb = if s.dry_run {
                    o.verb("Dry run", Color::Yellow)
                } else if s.interrupted {
                    o.verb("Stopped", Color::Red)
                } else if s.ok() {
                    o.verb("Finished", Color::Green)
                } else {
                    o.verb("Failed", Color::Red)
                };
                let cost = match &s.cost {
                    Some(c) => format!("; the stale artifacts would make {c}"),
                    None => String::new(),
                };
                eprintln!("{verb} {} in {}{cost}", parts.join(", "), seconds(s.duration_ms));
            }
        }
    }
}
