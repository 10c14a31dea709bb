//! The subcommands.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use forge_cache::{Digest, GcOptions};
use forge_manifest::ArtifactId;
use forge_plan::{BuildOptions, CancelToken, Engine, LoadOptions, Status, Workspace, WorkspaceError};
use petgraph::graph::NodeIndex;
use serde_json::json;

use crate::Failure;
use crate::args::*;
use crate::output::{Color, Output, ago, bytes, render_diagnostic, render_diagnostic_json, seconds};
use crate::render::{Renderer, reasons_line};

/// Every stage this forge can build.
pub fn registry() -> forge_plan::Registry {
    forge_stages::registry()
}

/// The remote cache the command line or the environment names (the token from
/// `FORGE_REMOTE_CACHE_TOKEN`); else the manifest's, which `Workspace::load` reads.
fn remote_options(g: &Global) -> Result<Option<forge_plan::RemoteConfig>, Failure> {
    let timeout = match g.remote_timeout {
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => std::time::Duration::from_secs_f64(s),
        Some(s) => {
            return Err(Failure::Usage(format!("--remote-timeout: {s} is not a number of seconds in (0, 3600]")));
        }
        None => forge_plan::remote::DEFAULT_TIMEOUT,
    };
    let Some(url) = g.remote_cache.clone().filter(|u| !u.is_empty()) else { return Ok(None) };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Failure::Usage(format!("--remote-cache: `{url}` is not an http:// or https:// URL")));
    }
    let token = std::env::var("FORGE_REMOTE_CACHE_TOKEN").ok().filter(|t| !t.is_empty());
    Ok(Some(forge_plan::RemoteConfig { url, read_only: g.remote_read_only, token, timeout }))
}

pub(crate) fn load(g: &Global, out: &Output, json: bool) -> Result<Workspace, Failure> {
    let dir = g.directory.clone().unwrap_or_else(|| std::path::PathBuf::from("."));
    let opts = LoadOptions {
        cache_dir: g.cache_dir.clone(),
        registry: registry(),
        remote: remote_options(g)?,
        remote_read_only: g.remote_read_only,
        ..LoadOptions::default()
    };
    match Workspace::load(&dir, opts) {
        Ok(ws) => {
            for w in &ws.warnings {
                eprintln!("{}: {w}", out.paint("warning", Color::Yellow));
            }
            Ok(ws)
        }
        Err(WorkspaceError::Manifest(errors)) => {
            if json {
                crate::outln!("{}", render_diagnostic_json(&errors));
            } else {
                eprint!("{}", render_diagnostic(&errors, out));
            }
            Err(Failure::Usage(String::new()))
        }
        Err(e @ WorkspaceError::NotFound(_)) => Err(Failure::Usage(e.to_string())),
        Err(e) => Err(Failure::Internal(e.to_string())),
    }
}

/// Ctrl-C and SIGTERM set the token; a second Ctrl-C exits at once.
pub(crate) fn interrupt_token() -> CancelToken {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    CancelToken::from_flag(flag)
}

pub(crate) fn default_jobs(ws: &Workspace) -> usize {
    ws.manifest
        .workspace
        .jobs
        .map(|j| j as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

pub fn build(g: &Global, out: &Output, a: BuildArgs) -> Result<(), Failure> {
    let ws = load(g, out, a.json)?;
    // GitHub Actions, GitLab CI, CircleCI and others set `CI=true`.
    let ci = a.ci || std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    // A shard builds its targets among those named (or all).
    let (specs, targets) = match &a.shard {
        None => (a.artifacts.clone(), Vec::new()),
        Some(shard) => {
            let named: Vec<String> = if a.artifacts.is_empty() {
                ws.manifest.targets.iter().map(|t| t.name.value.clone()).collect()
            } else {
                a.artifacts.clone()
            };
            let mine: Vec<String> =
                named.into_iter().filter(|s| shard.owns(s.split(':').next().unwrap_or(s))).collect();
            let mut targets: Vec<String> = mine.iter().map(|s| s.split(':').next().unwrap_or(s).to_string()).collect();
            targets.dedup();
            (mine, targets)
        }
    };
    if a.shard.is_some() && specs.is_empty() {
        if !a.json {
            eprintln!(
                "{} no target in shard {}",
                out.verb("Nothing", Color::Green),
                a.shard.map(|s| format!("{}/{}", s.k, s.n)).unwrap_or_default()
            );
        }
        let summary = crate::ci::CiSummary { shard: a.shard.map(|s| format!("{}/{}", s.k, s.n)), ..Default::default() };
        return write_summary(a.summary.as_deref(), &summary);
    }
    let selection = ws.plan.select(&specs, a.until.as_deref())?;
    let _lock = if a.dry_run {
        None
    } else {
        let lock = ws.cache.lock(false)?;
        let lock = match lock {
            Some(l) => l,
            None => {
                eprintln!("{} for another forge build in this workspace to finish", out.verb("Waiting", Color::Yellow));
                ws.cache.lock(true)?.expect("a blocking lock is always taken")
            }
        };
        ws.cache.clean_staging()?;
        Some(lock)
    };
    let opts = BuildOptions {
        jobs: a.jobs.unwrap_or_else(|| default_jobs(&ws)).max(1),
        keep_going: a.keep_going,
        dry_run: a.dry_run,
        cancel: interrupt_token(),
    };
    let renderer = Renderer::new(*out, a.json);
    let recorder = crate::ci::Recorder::new(&renderer);
    let engine = Engine::new(&ws);
    let summary = engine.build(&selection, &opts, &recorder);
    if ci || a.summary.is_some() {
        let record = crate::ci::CiSummary {
            shard: a.shard.map(|s| format!("{}/{}", s.k, s.n)),
            targets,
            summary: summary.clone(),
            artifacts: recorder.artifacts.into_inner().unwrap_or_else(|p| p.into_inner()),
        };
        if ci && !a.json {
            eprint!("{}", crate::ci::render(&record));
        }
        write_summary(a.summary.as_deref(), &record)?;
    }
    if summary.interrupted {
        return Err(Failure::Interrupted);
    }
    if a.dry_run || summary.ok() {
        Ok(())
    } else if summary.io_failed > 0 {
        // The details were printed with each failure.
        Err(Failure::Internal(String::new()))
    } else {
        Err(Failure::Failed)
    }
}

/// Writes a build's summary as JSON to `path`, if given.
fn write_summary(path: Option<&std::path::Path>, summary: &crate::ci::CiSummary) -> Result<(), Failure> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(summary).map_err(|e| Failure::Internal(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Failure::Internal(format!("writing {}: {e}", path.display())))
}

fn status_word(s: &Status) -> &'static str {
    match s {
        Status::Fresh { .. } => "fresh",
        Status::Stale { .. } => "stale",
        Status::Pending { .. } => "pending",
        Status::Blocked { .. } => "blocked",
    }
}

fn status_detail(s: &Status) -> String {
    match s {
        Status::Fresh { tree, .. } => format!("{} files, {}", tree.entries.len(), bytes(tree.size())),
        Status::Stale { reasons, .. } => reasons_line(reasons),
        Status::Pending { upstream } => format!("after {upstream} is rebuilt"),
        Status::Blocked { reason, .. } => reason.clone(),
    }
}

/// What rebuilding each stale artifact of `statuses` would change and spend, where its stage
/// can tell; a stage that cannot work it out is warned about.
fn estimates(
    engine: &Engine<'_>,
    out: &Output,
    statuses: &HashMap<NodeIndex, Status>,
) -> HashMap<NodeIndex, forge_plan::Estimate> {
    let ws = engine.workspace();
    let mut found = HashMap::new();
    for (n, s) in statuses {
        if !matches!(s, Status::Stale { .. }) {
            continue;
        }
        match engine.estimate(*n) {
            Some(Ok(e)) => {
                found.insert(*n, e);
            }
            Some(Err(e)) => {
                eprintln!("{}: cannot estimate {}: {e}", out.paint("warning", Color::Yellow), ws.plan.graph[*n].id)
            }
            None => {}
        }
    }
    found
}

fn status_json(id: &ArtifactId, s: &Status, estimate: Option<&forge_plan::Estimate>) -> serde_json::Value {
    let mut v = json!({ "artifact": id.to_string(), "status": status_word(s) });
    if let Some(e) = estimate {
        v["estimate"] = json!(e);
    }
    match s {
        Status::Fresh { key, tree } => {
            v["key"] = json!(key);
            v["content"] = json!(tree.digest());
            v["bytes"] = json!(tree.size());
        }
        Status::Stale { key, reasons, .. } => {
            v["key"] = json!(key);
            v["reasons"] = json!(reasons);
        }
        Status::Pending { upstream } => v["upstream"] = json!(upstream.to_string()),
        Status::Blocked { reason, upstream } => {
            v["reason"] = json!(reason);
            v["upstream"] = json!(upstream.as_ref().map(|u| u.to_string()));
        }
    }
    v
}

/// Evaluates, then saves what the stat cache learned if no build holds the lock.
fn evaluate(ws: &Workspace, engine: &Engine<'_>, selection: &[NodeIndex]) -> HashMap<NodeIndex, Status> {
    let statuses = engine.evaluate(selection);
    if let Ok(Some(_lock)) = ws.cache.lock(false) {
        let _ = engine.persist();
    }
    statuses
}

pub fn status(g: &Global, out: &Output, a: StatusArgs) -> Result<(), Failure> {
    let ws = load(g, out, a.json)?;
    let selection = ws.plan.select(&a.artifacts, None)?;
    let engine = Engine::new(&ws);
    let statuses = evaluate(&ws, &engine, &selection);
    for w in engine.take_warnings() {
        eprintln!("{}: {w}", out.paint("warning", Color::Yellow));
    }
    let estimates = estimates(&engine, out, &statuses);
    if a.json {
        let rows: Vec<_> =
            selection.iter().map(|n| status_json(&ws.plan.graph[*n].id, &statuses[n], estimates.get(n))).collect();
        crate::outln!("{}", serde_json::to_string_pretty(&json!({ "artifacts": rows })).unwrap_or_default());
        return Ok(());
    }
    let width = selection.iter().map(|n| ws.plan.graph[*n].id.to_string().len()).max().unwrap_or(0);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &selection {
        let s = &statuses[n];
        let word = status_word(s);
        *counts.entry(word).or_default() += 1;
        let color = match s {
            Status::Fresh { .. } => Color::Green,
            Status::Stale { .. } | Status::Pending { .. } => Color::Yellow,
            Status::Blocked { .. } => Color::Red,
        };
        let id = ws.plan.graph[*n].id.to_string();
        let detail = match estimates.get(n) {
            Some(e) => format!("{}: {}", e.summary, e.cost),
            None => status_detail(s),
        };
        crate::outln!("{} {id:width$}  {detail}", out.paint(&format!("{word:<7}"), color));
    }
    if !out.quiet {
        let parts: Vec<String> = counts.iter().map(|(w, n)| format!("{n} {w}")).collect();
        let mut cost = forge_plan::Cost::default();
        for e in estimates.values() {
            cost += e.cost;
        }
        let cost = if estimates.is_empty() { String::new() } else { format!("; rebuilding would make {cost}") };
        eprintln!("{} artifacts: {}{cost}", selection.len(), parts.join(", "));
    }
    Ok(())
}

pub fn why(g: &Global, out: &Output, a: WhyArgs) -> Result<(), Failure> {
    let ws = load(g, out, a.json)?;
    let id: ArtifactId =
        a.artifact.parse().map_err(|e: forge_manifest::artifact::ArtifactIdError| Failure::Usage(e.to_string()))?;
    let n = ws
        .plan
        .node(&id)
        .ok_or_else(|| Failure::from(ws.plan.select(std::slice::from_ref(&a.artifact), None).unwrap_err()))?;
    let selection = ws.plan.closure(&[n]);
    let engine = Engine::new(&ws);
    let statuses = evaluate(&ws, &engine, &selection);
    // Follow pending artifacts up to the stale one that decides.
    let mut chain = vec![n];
    while let Status::Pending { upstream } = &statuses[chain.last().expect("chain is never empty")] {
        chain.push(ws.plan.node(upstream).expect("upstream artifacts are planned"));
    }
    let estimates = estimates(&engine, out, &chain.iter().map(|c| (*c, statuses[c].clone())).collect());
    if a.json {
        let steps: Vec<_> =
            chain.iter().map(|c| status_json(&ws.plan.graph[*c].id, &statuses[c], estimates.get(c))).collect();
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&json!({ "artifact": id.to_string(), "chain": steps })).unwrap_or_default()
        );
        return Ok(());
    }
    for (i, c) in chain.iter().enumerate() {
        let cid = &ws.plan.graph[*c].id;
        let lead = if i == 0 { format!("{cid} is") } else { format!("  because {cid} is") };
        match &statuses[c] {
            Status::Fresh { key, tree } => {
                crate::outln!("{lead} {}", out.paint("fresh", Color::Green));
                if let Some((entry, _)) = engine.last_fingerprint(cid) {
                    crate::outln!("  built {} in {}", ago(entry.created_unix_ms), seconds(entry.duration_ms));
                }
                crate::outln!("  action key {key}");
                crate::outln!("  content    {} ({} files, {})", tree.digest(), tree.entries.len(), bytes(tree.size()));
                crate::outln!("  path       {}", ws.cache.cas_dir(&tree.digest()).display());
            }
            Status::Stale { reasons, .. } => {
                crate::outln!("{lead} {}:", out.paint("stale", Color::Yellow));
                for r in reasons {
                    crate::outln!("  - {r}");
                }
                if let Some(e) = estimates.get(c) {
                    crate::outln!("  {}", e.summary);
                    crate::outln!("  rebuilding it would make {}", e.cost);
                }
            }
            Status::Pending { upstream } => {
                crate::outln!(
                    "{lead} {} until {upstream} is rebuilt (it may then stay fresh)",
                    out.paint("pending", Color::Yellow)
                );
            }
            Status::Blocked { reason, .. } => crate::outln!("{lead} {}: {reason}", out.paint("blocked", Color::Red)),
        }
    }
    Ok(())
}

pub fn graph(g: &Global, out: &Output, a: GraphArgs) -> Result<(), Failure> {
    let ws = load(g, out, false)?;
    match a.format {
        GraphFormat::Dot => crate::outln!("{}", ws.plan.to_dot().trim_end()),
        GraphFormat::Json => crate::outln!("{}", serde_json::to_string_pretty(&ws.plan.to_json()).unwrap_or_default()),
    }
    Ok(())
}

pub fn check(g: &Global, out: &Output, a: CheckArgs) -> Result<(), Failure> {
    let ws = load(g, out, a.json)?;
    let missing: Vec<String> = ws
        .plan
        .order()
        .iter()
        .filter(|n| ws.plan.graph[**n].executor.is_none())
        .map(|n| ws.plan.graph[*n].kind().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if a.json {
        let v = json!({
            "ok": true,
            "files": ws.manifest.files,
            "targets": ws.manifest.targets.len(),
            "artifacts": ws.plan.len(),
            "unsupported_stages": missing,
        });
        crate::outln!("{v}");
        return Ok(());
    }
    for kind in &missing {
        eprintln!("{}: this forge cannot build `{kind}` stages yet", out.paint("warning", Color::Yellow));
    }
    for w in ungraded_criteria(&ws.manifest) {
        eprintln!("{}: {w}", out.paint("warning", Color::Yellow));
    }
    if !out.quiet {
        eprintln!(
            "{} {} ({} files, {} targets, {} artifacts)",
            out.verb("Checked", Color::Green),
            ws.manifest_path.display(),
            ws.manifest.files.len(),
            ws.manifest.targets.len(),
            ws.plan.len()
        );
    }
    Ok(())
}

/// Benchmarks whose recipe asks `llm` questions but that name no `judge` model to ask: those
/// criteria are not graded (the report says so too).
fn ungraded_criteria(m: &forge_manifest::Manifest) -> Vec<String> {
    let mut out = Vec::new();
    for t in &m.targets {
        let Some(model) = &t.model else { continue };
        let (Some(b), Some(r)) = (&model.benchmark, m.recipe_of(model)) else {
            continue;
        };
        let llm: Vec<String> =
            r.judge.iter().filter(|c| c.check.is_llm()).map(|c| format!("`{}`", c.name.value)).collect();
        if b.judge.is_none() && !llm.is_empty() {
            out.push(format!(
                "the benchmark of `{}` names no `judge` model, so {} llm criteria are not graded: {}",
                t.name.value,
                llm.len(),
                llm.join(", ")
            ));
        }
    }
    out
}

fn take_lock(ws: &Workspace) -> Result<forge_cache::CacheLock, Failure> {
    ws.cache
        .lock(false)?
        .ok_or_else(|| Failure::Busy("a forge build is running in this workspace; try again when it is done".into()))
}

pub fn clean(g: &Global, out: &Output, a: CleanArgs) -> Result<(), Failure> {
    let ws = load(g, out, false)?;
    let _lock = take_lock(&ws)?;
    if a.artifacts.is_empty() {
        let mut removed = 0u64;
        for bucket in forge_cache::Bucket::ALL {
            if bucket == forge_cache::Bucket::Teacher && !a.all {
                continue;
            }
            let dir = ws.cache.bucket(bucket);
            removed += forge_cache::fsutil::tree_size(&dir);
            forge_cache::fsutil::remove_tree(&dir).map_err(|e| Failure::Internal(format!("{}: {e}", dir.display())))?;
        }
        for f in ["state-v1.bin", "stat-v1.bin"] {
            let _ = std::fs::remove_file(ws.cache.root().join(f));
        }
        if !out.quiet {
            let kept = if a.all { "" } else { " (kept the teacher-call cache; --all removes it too)" };
            eprintln!(
                "{} {} from {}{kept}",
                out.verb("Removed", Color::Green),
                bytes(removed),
                ws.cache.root().display()
            );
        }
        return Ok(());
    }
    let mut names: HashSet<String> = HashSet::new();
    for arg in &a.artifacts {
        let sel = ws.plan.select(std::slice::from_ref(arg), None)?;
        let wanted: Vec<String> = sel
            .iter()
            .map(|n| ws.plan.graph[*n].id.clone())
            .filter(|id| if arg.contains(':') { id.to_string().starts_with(arg.as_str()) } else { id.target == *arg })
            .map(|id| id.to_string())
            .collect();
        names.extend(wanted);
    }
    let mut state = ws.cache.load_state(&mut |_| {});
    let mut removed = 0;
    for key in ws.cache.action_keys() {
        if let Ok(Some(entry)) = ws.cache.read_action(&key)
            && names.contains(&entry.artifact)
        {
            ws.cache.remove_action(&key)?;
            removed += 1;
        }
    }
    state.artifacts.retain(|k, _| !names.contains(k));
    ws.cache.save_state(&state)?;
    if !out.quiet {
        eprintln!("{} {removed} cache entries of {} artifacts", out.verb("Removed", Color::Green), names.len());
    }
    Ok(())
}

pub fn cache(g: &Global, out: &Output, c: CacheCommand) -> Result<(), Failure> {
    let ws = load(g, out, false)?;
    let current: HashSet<Digest> = ws.cache.load_state(&mut |_| {}).artifacts.values().map(|e| e.key).collect();
    match c {
        CacheCommand::Ls { json } => {
            let listing = ws.cache.list(&current);
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&listing).unwrap_or_default());
                return Ok(());
            }
            for e in &listing.entries {
                let mark = if e.current { out.paint("current", Color::Green) } else { "       ".to_string() };
                crate::outln!(
                    "{mark} {:<40} {}  {:>10}  {:>3} files  {}",
                    e.artifact,
                    e.key.short(),
                    bytes(e.bytes),
                    e.files,
                    ago(e.created_unix_ms)
                );
            }
            for c in &listing.corrupt {
                crate::outln!("{} {c}", out.paint("corrupt", Color::Red));
            }
            if !out.quiet {
                let total: u64 = listing.entries.iter().map(|e| e.bytes).sum();
                eprintln!("{} entries, {}", listing.entries.len(), bytes(total));
            }
            Ok(())
        }
        CacheCommand::Gc { max_age, dry_run, json } => {
            let _lock = take_lock(&ws)?;
            // What the current manifest still declares is live; forget removed artifacts.
            let mut state = ws.cache.load_state(&mut |_| {});
            let declared: HashSet<String> = ws.plan.order().iter().map(|n| ws.plan.graph[*n].id.to_string()).collect();
            state.artifacts.retain(|k, _| declared.contains(k));
            let keep: HashSet<Digest> = state.artifacts.values().map(|e| e.key).collect();
            let opts = GcOptions { max_age: std::time::Duration::from_secs_f64(max_age.max(0.0) * 86400.0), dry_run };
            let report = ws.cache.gc(&keep, &opts)?;
            if !dry_run {
                ws.cache.save_state(&state)?;
                ws.stat.prune();
                ws.save_stat_cache()?;
            }
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                let verb = if dry_run { "Would remove" } else { "Removed" };
                eprintln!(
                    "{} {} action entries, {} stored artifacts, {} unknown buckets ({}); kept {} entries",
                    out.verb(verb, Color::Green),
                    report.actions_removed,
                    report.contents_removed,
                    report.unknown_removed.len(),
                    bytes(report.bytes_freed),
                    report.actions_kept
                );
            }
            Ok(())
        }
        CacheCommand::Verify { repair, json } => {
            let _lock = if repair { Some(take_lock(&ws)?) } else { None };
            let report = ws.cache.verify(repair)?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                for p in &report.problems {
                    let what = p.artifact.clone().unwrap_or_else(|| p.key.map(|k| k.short()).unwrap_or_default());
                    eprintln!("{} {what}: {}", out.verb("Damaged", Color::Red), p.problem);
                }
                let repaired =
                    if repair && !report.problems.is_empty() { " (removed; the next build rebuilds them)" } else { "" };
                eprintln!(
                    "{} {} entries, {} files, {}: {} problems{repaired}",
                    out.verb("Verified", if report.problems.is_empty() { Color::Green } else { Color::Red }),
                    report.actions_checked,
                    report.files_checked,
                    bytes(report.bytes_checked),
                    report.problems.len()
                );
            }
            if report.problems.is_empty() || repair { Ok(()) } else { Err(Failure::Failed) }
        }
    }
}

/// Loads the workspace without printing anything (for a background watcher): `None` when the
/// manifest does not load (a save mid-edit).
pub(crate) fn load_quietly(g: &Global) -> Option<Workspace> {
    let dir = g.directory.clone().unwrap_or_else(|| std::path::PathBuf::from("."));
    let opts = LoadOptions { cache_dir: g.cache_dir.clone(), registry: registry(), ..LoadOptions::default() };
    Workspace::load(&dir, opts).ok()
}

/// The directory of a built, fresh artifact, or `None` (not built, stale, or not in the plan).
pub(crate) fn fresh_dir(ws: &Workspace, artifact: &str) -> Option<std::path::PathBuf> {
    let id: ArtifactId = artifact.parse().ok()?;
    let n = ws.plan.node(&id)?;
    let engine = Engine::new(ws);
    match &evaluate(ws, &engine, &ws.plan.closure(&[n]))[&n] {
        Status::Fresh { tree, .. } => Some(ws.cache.cas_dir(&tree.digest())),
        _ => None,
    }
}

/// The directory of a built, fresh artifact; explains and fails otherwise.
pub(crate) fn fresh_artifact_dir(ws: &Workspace, out: &Output, artifact: &str) -> Result<std::path::PathBuf, Failure> {
    let id: ArtifactId =
        artifact.parse().map_err(|e: forge_manifest::artifact::ArtifactIdError| Failure::Usage(e.to_string()))?;
    let n =
        ws.plan.node(&id).ok_or_else(|| Failure::from(ws.plan.select(&[artifact.to_string()], None).unwrap_err()))?;
    let engine = Engine::new(ws);
    let statuses = evaluate(ws, &engine, &ws.plan.closure(&[n]));
    match &statuses[&n] {
        Status::Fresh { tree, .. } => Ok(ws.cache.cas_dir(&tree.digest())),
        other => {
            eprintln!(
                "{}: {id} is not built and fresh ({}: {}); run `forge build {id}`",
                out.paint("error", Color::Red),
                status_word(other),
                status_detail(other)
            );
            Err(Failure::Failed)
        }
    }
}

/// `artifact`'s last build and what it was built from: its content directory, and the content
/// directory of each artifact upstream of it (transitively) *as that build used it*. Unlike
/// [`fresh_artifact_dir`] it does not need the artifact fresh — a site's model goes stale the
/// moment the proxy captures another call, though its last build is still the candidate — and
/// says on stderr when it is not. A chain that no longer holds together (an upstream rebuilt
/// since, content collected) is an error that says to build.
pub(crate) fn built_artifact(
    ws: &Workspace,
    out: &Output,
    artifact: &str,
) -> Result<(std::path::PathBuf, BTreeMap<String, std::path::PathBuf>), Failure> {
    let id: ArtifactId =
        artifact.parse().map_err(|e: forge_manifest::artifact::ArtifactIdError| Failure::Usage(e.to_string()))?;
    let n =
        ws.plan.node(&id).ok_or_else(|| Failure::from(ws.plan.select(&[artifact.to_string()], None).unwrap_err()))?;
    let engine = Engine::new(ws);
    let broken = |why: String| {
        eprintln!("{}: {why}; run `forge build {id}`", out.paint("error", Color::Red));
        Failure::Failed
    };
    let rec = engine.recorded(&id).ok_or_else(|| broken(format!("{id} was never built")))?;
    let dir = ws.cache.cas_dir(&rec.tree.digest());
    if !dir.is_dir() {
        return Err(broken(format!("{id}'s last build is no longer in the cache")));
    }
    let statuses = evaluate(ws, &engine, &ws.plan.closure(&[n]));
    if !statuses[&n].is_fresh() {
        eprintln!(
            "{}: {id} is {} ({}): using its last build",
            out.paint("note", Color::Yellow),
            status_word(&statuses[&n]),
            status_detail(&statuses[&n])
        );
    }
    let mut upstream = BTreeMap::new();
    let mut todo = vec![(id.clone(), rec.tree.digest())];
    while let Some((at, digest)) = todo.pop() {
        let fp = engine
            .last_fingerprint(&at)
            .filter(|(e, _)| e.tree.digest() == digest)
            .map(|(_, fp)| fp)
            .ok_or_else(|| broken(format!("{at} was rebuilt since {id} was built from it")))?;
        for (up, d) in fp.upstream {
            let up_dir = ws.cache.cas_dir(&d);
            if !up_dir.is_dir() {
                return Err(broken(format!("{up}, which {id} was built from, is no longer in the cache")));
            }
            if let Ok(up_id) = up.parse::<ArtifactId>()
                && !upstream.contains_key(&up)
            {
                todo.push((up_id, d));
            }
            upstream.insert(up, up_dir);
        }
    }
    Ok((dir, upstream))
}

pub fn artifact(g: &Global, out: &Output, c: ArtifactCommand) -> Result<(), Failure> {
    let ArtifactCommand::Path { artifact } = c;
    let ws = load(g, out, false)?;
    let dir = fresh_artifact_dir(&ws, out, &artifact)?;
    crate::outln!("{}", dir.display());
    Ok(())
}
