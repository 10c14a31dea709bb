//! `forge watch`: rebuild what a save made stale, as soon as it is saved.
//!
//! The workspace is watched as a whole (notify; the cache, `.git`, `target` and editors' swap
//! files aside), so every file the manifest reads is covered — the manifest and its includes,
//! lore, recipes, command inputs, verifier scripts — and a save of any other file costs only a
//! no-op build (the stat cache answers it without reading a file). Bursts of saves are
//! debounced; a save during a build cancels it (its half-done work is discarded, as after
//! Ctrl-C) and the build starts again with the newer files. A manifest saved mid-edit with an
//! error prints its diagnostic and the watch goes on. Expensive stages (training and all that
//! follows it) are left out unless `--until STAGE` or `--all` asks for them.

use std::path::{Component, Path};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use forge_plan::{BuildOptions, CancelToken, Engine, Workspace};
use notify::{EventKind, RecursiveMode, Watcher};
use petgraph::graph::NodeIndex;

use crate::Failure;
use crate::args::{Global, WatchArgs};
use crate::output::{Color, Output};
use crate::render::Renderer;

/// Stages a watch leaves out by default: training and everything built from its result.
const EXPENSIVE: &[&str] = &["adapter", "merged", "imatrix", "gguf", "gguf-adapter", "bench", "report"];

/// How long the files must be quiet before a build starts (editors write a file in bursts).
const DEBOUNCE: Duration = Duration::from_millis(100);

pub fn watch(g: &Global, out: &Output, a: WatchArgs) -> Result<(), Failure> {
    let start = g.directory.clone().unwrap_or_else(|| std::path::PathBuf::from("."));
    let manifest = forge_plan::find_manifest(&start).map_err(|e| Failure::Usage(e.to_string()))?;
    let manifest = std::path::absolute(&manifest).unwrap_or(manifest);
    let root = manifest.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
    let cache_dir = g.cache_dir.clone().map(|c| std::path::absolute(&c).unwrap_or(c));
    let (tx, rx) = channel();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if let Ok(e) = e {
            let _ = tx.send(e);
        }
    })
    .map_err(|e| Failure::Internal(format!("watching {}: {e}", root.display())))?;
    watcher
        .watch(&root, RecursiveMode::Recursive)
        .map_err(|e| Failure::Internal(format!("watching {}: {e}", root.display())))?;
    let stop = crate::commands::interrupt_token();
    let relevant = |e: &notify::Event| {
        matches!(e.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_))
            && e.paths.iter().any(|p| watched(&root, cache_dir.as_deref(), p))
    };
    let mut why = String::from("starting");
    loop {
        eprintln!("{} ({why})", out.verb("Building", Color::Cyan));
        let t0 = Instant::now();
        let changed = round(g, out, &a, &rx, &relevant, &stop);
        if stop.is_cancelled() {
            return Err(Failure::Interrupted);
        }
        match changed {
            Round::Cancelled(path) => {
                eprintln!("{} the build: {} changed while it ran", out.verb("Cancelled", Color::Yellow), path);
                why = format!("{path} changed");
            }
            Round::Broken | Round::Built => {
                if matches!(changed, Round::Broken) {
                    eprintln!("{} for the next save to fix it", out.verb("Waiting", Color::Yellow));
                } else {
                    eprintln!(
                        "{} in {:.2} s; watching {} for changes",
                        out.verb("Done", Color::Green),
                        t0.elapsed().as_secs_f64(),
                        root.display()
                    );
                }
                // Wait for the next save.
                let path = loop {
                    if stop.is_cancelled() {
                        return Err(Failure::Interrupted);
                    }
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(e) if relevant(&e) => break shown(&root, &e),
                        Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(Failure::Internal("the file watcher stopped".into()));
                        }
                    }
                };
                why = format!("{path} changed");
            }
        }
        debounce(&rx, &relevant);
    }
}

/// How a build round ended.
enum Round {
    Built,
    /// A save made it obsolete: this file changed.
    Cancelled(String),
    /// The manifest (or the selection) has an error, printed.
    Broken,
}

/// One build of what is stale.
fn round(
    g: &Global,
    out: &Output,
    a: &WatchArgs,
    rx: &Receiver<notify::Event>,
    relevant: &dyn Fn(&notify::Event) -> bool,
    stop: &CancelToken,
) -> Round {
    // A manifest with errors: its diagnostic is printed, and the next save tries again.
    let Ok(ws) = crate::commands::load(g, out, false) else { return Round::Broken };
    let selection = match selection(&ws, a) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", out.paint("error", Color::Red));
            return Round::Broken;
        }
    };
    let lock = match ws.cache.lock(true) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: {e}", out.paint("error", Color::Red));
            return Round::Broken;
        }
    };
    let _ = ws.cache.clean_staging();
    let round = CancelToken::new();
    let opts = BuildOptions {
        jobs: a.jobs.unwrap_or_else(|| crate::commands::default_jobs(&ws)).max(1),
        keep_going: true,
        dry_run: false,
        cancel: round.clone(),
    };
    let renderer = Renderer::new(*out, false);
    let engine = Engine::new(&ws);
    let root = ws.root.clone();
    let changed = std::thread::scope(|s| {
        let build = s.spawn(|| engine.build(&selection, &opts, &renderer));
        let mut changed = None;
        while !build.is_finished() {
            if stop.is_cancelled() {
                round.cancel();
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(e) if changed.is_none() && relevant(&e) => {
                    changed = Some(shown(&root, &e));
                    round.cancel();
                }
                _ => {}
            }
        }
        let _ = build.join();
        changed
    });
    drop(lock);
    changed.map_or(Round::Built, Round::Cancelled)
}

/// The artifacts a watch builds: those asked for, without the expensive stages unless asked.
fn selection(ws: &Workspace, a: &WatchArgs) -> Result<Vec<NodeIndex>, String> {
    let all = ws.plan.select(&a.targets, a.until.as_deref()).map_err(|e| e.to_string())?;
    if a.all || a.until.is_some() {
        return Ok(all);
    }
    Ok(all
        .into_iter()
        .filter(|&n| ws.plan.closure(&[n]).iter().all(|&d| !EXPENSIVE.contains(&ws.plan.graph[d].kind())))
        .collect())
}

/// Drains events until the files have been quiet for [`DEBOUNCE`].
fn debounce(rx: &Receiver<notify::Event>, relevant: &dyn Fn(&notify::Event) -> bool) {
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < DEBOUNCE {
        if let Ok(e) = rx.recv_timeout(DEBOUNCE.saturating_sub(quiet_since.elapsed()))
            && relevant(&e)
        {
            quiet_since = Instant::now();
        }
    }
}

/// Whether a change to `path` may matter to a build: not in the cache, `.git`, `target`, a
/// hidden directory, or an editor's swap or backup file.
fn watched(root: &Path, cache_dir: Option<&Path>, path: &Path) -> bool {
    if cache_dir.is_some_and(|c| path.starts_with(c)) {
        return false;
    }
    let Ok(rel) = path.strip_prefix(root) else { return false };
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with('~') || name.ends_with(".swp") || name.ends_with(".swx") || name.starts_with(".#") {
        return false;
    }
    !rel.components().any(|c| match c {
        Component::Normal(n) => {
            let n = n.to_string_lossy();
            n == ".forge-cache" || n == "target" || n.starts_with('.')
        }
        _ => false,
    })
}

/// An event's first path, relative to the workspace.
fn shown(root: &Path, e: &notify::Event) -> String {
    e.paths.first().map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string()).unwrap_or_else(|| "a file".into())
}
