//! `forge proxy`: captures an upstream teacher's answers per call site (`forge_serve::proxy`).

use std::time::Duration;

use forge_manifest::TeacherKind;
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

pub fn proxy(g: &Global, out: &Output, a: ProxyArgs) -> Result<(), Failure> {
    let ws = load(g, out, false)?;
    let mut routes = Routes::to(upstream(&ws, a.upstream.as_deref())?);
    for site in ws.manifest.sites.values() {
        if let Some(u) = &site.upstream {
            routes.sites.insert(site.name.value.clone(), teacher(&ws, &u.value, &[])?);
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
        let target = ws
            .manifest
            .targets
            .iter()
            .find(|t| t.model.as_ref().and_then(|m| m.site.as_ref()).is_some_and(|s| &s.value == name));
        let (judge, defaults) = match target {
            Some(t) => {
                let npc = crate::serve::npc(&ws, &t.name.value, std::path::PathBuf::new())?;
                (npc.judge, npc.defaults)
            }
            None => (None, forge_serve::Defaults::default()),
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
