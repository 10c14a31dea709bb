//! `forge proxy`: captures an upstream teacher's answers per call site (`forge_serve::proxy`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use forge_manifest::{DataSource, TeacherKind};
use forge_serve::proxy::local::{Local, SiteModel};
use forge_serve::proxy::{CaptureStore, Routes, Upstream};

use crate::Failure;
use crate::args::{Global, ProxyArgs};
use crate::commands::load;
use crate::output::Output;

/// The teacher to forward to: the one named, else the manifest's only OpenAI-compatible one.
fn upstream(ws: &forge_plan::Workspace, name: Option<&str>) -> Result<Upstream, Failure> {
    let openai: Vec<&str> = ws
        .manifest
        .teachers
        .values()
        .filter(|t| matches!(t.kind, TeacherKind::Openai(_)))
        .map(|t| t.name.value.as_str())
        .collect();
    let name = match name {
        Some(n) => n,
        None => match openai.as_slice() {
            [one] => one,
            [] => return Err(Failure::Usage("the manifest has no OpenAI-compatible teacher to forward to".into())),
            many => {
                return Err(Failure::Usage(format!(
                    "the manifest has {} OpenAI-compatible teachers ({}): name one with --upstream",
                    many.len(),
                    many.join(", ")
                )));
            }
        },
    };
    teacher(ws, name, &openai)
}

/// The manifest's teacher `name` as an upstream (its key read from its `api-key-env`).
fn teacher(ws: &forge_plan::Workspace, name: &str, openai: &[&str]) -> Result<Upstream, Failure> {
    let t = ws.manifest.teachers.get(name).ok_or_else(|| {
        Failure::Usage(format!("--upstream {name}: no such teacher (the manifest has: {})", openai.join(", ")))
    })?;
    let TeacherKind::Openai(o) = &t.kind else {
        return Err(Failure::Usage(format!("--upstream {name}: an offline grammar teacher cannot be proxied")));
    };
    let api_key = match &o.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
            _ => return Err(Failure::Usage(format!("teacher `{name}`: {var} is not set (its API key)"))),
        },
    };
    Ok(Upstream {
        name: name.to_string(),
        base_url: o.base_url.clone(),
        model: o.model.clone(),
        api_key,
        // A whole answer, streamed or not: the teacher's timeout per request, with room for
        // long generations.
        timeout: Duration::from_secs_f64((o.timeout_s * 4.0).max(60.0)),
    })
}

/// The teacher a site's calls go to: its own `upstream`, else the proxy's default.
pub(crate) fn site_upstream(ws: &forge_plan::Workspace, site: &forge_manifest::Site) -> Result<Upstream, Failure> {
    match &site.upstream {
        Some(u) => teacher(ws, &u.value, &[]),
        None => upstream(ws, None),
    }
}

/// A site `forge proxy --train` distils: its captures file, and what it rebuilds.
struct Distilled {
    site: String,
    artifact: String,
    captures: PathBuf,
    min_new: usize,
}

/// The global options a child `forge` needs to see the same workspace and caches.
fn global_args(g: &Global, root: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["-C".into(), root.into()];
    if let Some(d) = &g.cache_dir {
        a.extend(["--cache-dir".into(), d.into()]);
    }
    if let Some(r) = &g.remote_cache {
        a.extend(["--remote-cache".into(), r.into()]);
    }
    if g.remote_read_only {
        a.push("--remote-read-only".into());
    }
    if let Some(t) = g.remote_timeout {
        a.extend(["--remote-timeout".into(), t.to_string().into()]);
    }
    a
}

/// Lines in a capture file (a capture is a line): cheap enough to poll.
fn lines(path: &Path) -> usize {
    let Ok(mut f) = std::fs::File::open(path) else { return 0 };
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    while let Ok(k) = f.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|b| **b == b'\n').count();
    }
    n
}

/// `--train`: at the start, and then every 2 s, each site whose captures reached a new multiple
/// of its `min-new` is rebuilt (`forge build ARTIFACT`: the dataset takes the new captures, the
/// model is retrained and quantized) and graded (`forge site promote SITE --if-new`), one at a
/// time, as child processes: a failed or killed training leaves the proxy answering, and the
/// cache consistent. A promotion rewrites `live.json`, which the proxy follows on its next call
/// of the site.
fn train(args: Vec<OsString>, sites: Vec<Distilled>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let exe = std::env::current_exe()?;
    Ok(std::thread::spawn(move || {
        let mut seen: HashMap<String, usize> = HashMap::new();
        loop {
            for d in &sites {
                let batches = lines(&d.captures) / d.min_new;
                if batches == 0 || seen.get(&d.site) == Some(&batches) {
                    continue;
                }
                seen.insert(d.site.clone(), batches);
                eprintln!(
                    "forge proxy: {}: {} captures taken; rebuilding {} and grading it",
                    d.site,
                    batches * d.min_new,
                    d.artifact
                );
                let run = |what: &[&str]| {
                    let s = Command::new(&exe).args(&args).args(what).stdin(Stdio::null()).status();
                    s.map_err(|e| e.to_string()).and_then(|s| if s.success() { Ok(()) } else { Err(s.to_string()) })
                };
                if let Err(e) = run(&["build", &d.artifact]) {
                    eprintln!("forge proxy: {}: the rebuild failed ({e}); waiting for more captures", d.site);
                    continue;
                }
                match run(&["site", "promote", &d.site, "--if-new"]) {
                    Ok(()) => {}
                    Err(_) => eprintln!("forge proxy: {}: not promoted; waiting for more captures", d.site),
                }
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }))
}

pub fn proxy(g: &Global, out: &Output, a: ProxyArgs) -> Result<(), Failure> {
    let ws = load(g, out, false)?;
    let mut routes = Routes::to(upstream(&ws, a.upstream.as_deref())?);
    for site in ws.manifest.sites.values() {
        if site.upstream.is_some() {
            routes.sites.insert(site.name.value.clone(), site_upstream(&ws, site)?);
        }
        for f in &site.fingerprints {
            routes.aliases.insert(f.value.clone(), site.name.value.clone());
        }
    }
    // Promoted sites answer from their local model: each with its target's verifiers and
    // sampling defaults, and its policy's attempts and rollback window.
    let mut locals = Vec::new();
    for site in ws.manifest.sites.values() {
        let name = &site.name.value;
        let (judge, defaults) = match crate::site::target_of(&ws, name) {
            Ok(t) => {
                let npc = crate::serve::npc(&ws, &t.name.value, std::path::PathBuf::new())?;
                (npc.judge, npc.defaults)
            }
            Err(_) => (None, forge_serve::Defaults::default()),
        };
        locals.push(SiteModel {
            name: name.clone(),
            judge,
            defaults,
            attempts: site.policy.attempts as usize,
            rollback_below: site.policy.rollback_below,
            rollback_window: site.policy.rollback_window as usize,
        });
    }
    routes.local = Some(std::sync::Arc::new(Local::new(ws.root.clone(), locals, forge_serve::Config::default())));
    let upstream = routes.default.clone();
    let addr: std::net::SocketAddr =
        a.addr.parse().map_err(|_| Failure::Usage(format!("--addr {}: not an address like 127.0.0.1:8090", a.addr)))?;
    let dir = a.store.clone().unwrap_or_else(|| ws.root.join(forge_data::captures::DEFAULT_DIR));
    let store = CaptureStore::open(&dir).map_err(|e| Failure::Usage(format!("{}: {e}", dir.display())))?;
    if a.train {
        let mut sites = Vec::new();
        for site in ws.manifest.sites.values() {
            let name = &site.name.value;
            let Ok(target) = crate::site::target_of(&ws, name) else {
                eprintln!("forge proxy: site `{name}` has no model target: captured, not distilled");
                continue;
            };
            let source = target.model.as_ref().and_then(|m| m.dataset.as_ref()).map(|d| &d.source);
            let Some(DataSource::Captures { min_new, .. }) = source else { continue };
            let (_, artifact) = crate::site::candidate(&ws, name)?;
            sites.push(Distilled {
                site: name.clone(),
                artifact,
                captures: ws.root.join(forge_data::captures::default_file(name)),
                min_new: (*min_new).max(1) as usize,
            });
        }
        if sites.is_empty() {
            return Err(Failure::Usage("--train: no site has a model with `dataset from=\"captures\"`".into()));
        }
        train(global_args(g, &ws.root), sites).map_err(|e| Failure::Internal(format!("--train: {e}")))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Internal(format!("starting the proxy's runtime: {e}")))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Failure::Usage(format!("listening on {addr}: {e}")))?;
        eprintln!(
            "forge proxy: http://{}/v1 → teacher `{}` ({}), capturing to {}; Ctrl-C stops",
            listener.local_addr().map_or(addr, |a| a),
            upstream.name,
            upstream.base_url,
            dir.display()
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        forge_serve::proxy::serve(listener, routes, store, shutdown)
            .await
            .map_err(|e| Failure::Internal(format!("serving: {e}")))
    })
}
