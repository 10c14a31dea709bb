//! `forge serve`: the workspace's built GGUF models over HTTP (`forge_serve`).

use forge_manifest::QuantLevel;
use forge_serve::{Config, Npc};

use crate::Failure;
use crate::args::{Global, ServeArgs};
use crate::commands::{fresh_artifact_dir, load};
use crate::output::Output;

/// The target's NPC: its file, its benchmark's sampling, its recipe's judge.
pub(crate) fn npc(ws: &forge_plan::Workspace, name: &str, file: std::path::PathBuf) -> Result<Npc, Failure> {
    let mut npc = Npc::new(name, file);
    let target = ws.manifest.targets.iter().find(|t| t.name.value == name).and_then(|t| t.model.as_ref());
    if let Some(b) = target.and_then(|m| m.benchmark.as_ref()) {
        npc.defaults = forge_serve::Defaults {
            temperature: b.temperature,
            top_p: b.top_p,
            top_k: b.top_k.map(|k| k as usize),
            max_tokens: Some(b.max_tokens as usize),
            attempts: b.attempts.max(1) as usize,
        };
    }
    let recipe = target.and_then(|m| ws.manifest.recipe_of(m));
    if let Some(r) = recipe.filter(|r| !r.judge.is_empty()) {
        // `llm` criteria need a judge model: the server grades with the verifiers alone.
        let judge = forge_bench::judge::Judge::new(&r.judge, &ws.root, true)
            .map_err(|e| Failure::Usage(format!("`{name}`'s judge: {e}")))?;
        npc.judge = Some(std::sync::Arc::new(judge));
    }
    Ok(npc)
}

/// `--model NAME=FILE`s: GGUF files served as they are.
fn files(a: &ServeArgs) -> Result<Vec<Npc>, Failure> {
    let mut npcs: Vec<Npc> = Vec::new();
    for m in &a.model {
        let (name, file) =
            m.split_once('=').ok_or_else(|| Failure::Usage(format!("--model {m}: expected NAME=FILE")))?;
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(Failure::Usage(format!("--model {m}: a name is letters, digits, `-`, `_` and `.`")));
        }
        if npcs.iter().any(|n| n.name == name) {
            return Err(Failure::Usage(format!("--model {m}: `{name}` is named twice")));
        }
        let file = std::path::PathBuf::from(file);
        forge_gguf::Gguf::open(&file).map_err(|e| Failure::Usage(format!("--model {m}: {e}")))?;
        npcs.push(Npc::new(name, file));
    }
    Ok(npcs)
}

pub fn serve(g: &Global, out: &Output, a: ServeArgs) -> Result<(), Failure> {
    let s = settings(&a)?;
    if !a.model.is_empty() {
        if !a.targets.is_empty() {
            return Err(Failure::Usage("name targets or --model files, not both".into()));
        }
        let npcs = files(&a)?;
        let names: Vec<String> = npcs.iter().map(|n| n.name.clone()).collect();
        return run(&a, s, npcs, &names.join(", "), None);
    }
    let ws = load(g, out, false)?;
    // `--level adapter`: each target's LoRA adapter GGUF on its base (`TARGET:gguf-adapter`);
    // NPCs on one base share it in memory.
    let adapters = a.level == "adapter";
    let level = match QuantLevel::parse(&a.level) {
        Some(l) => Some(l),
        None if adapters => None,
        None => {
            return Err(Failure::Usage(format!(
                "--level {}: not a level forge writes (q4_0, q8_0, f16, ...) or `adapter`",
                a.level
            )));
        }
    };
    let has_level = |t: &forge_manifest::Target| match level {
        Some(level) => t
            .model
            .as_ref()
            .and_then(|m| m.quantize.as_ref())
            .is_some_and(|q| q.levels.iter().any(|l| l.value == level)),
        None => format!("{}:gguf-adapter", t.name.value).parse().is_ok_and(|id| ws.plan.node(&id).is_some()),
    };
    let level = a.level.clone();
    let targets: Vec<String> = if a.targets.is_empty() {
        ws.manifest.targets.iter().filter(|t| has_level(t)).map(|t| t.name.value.clone()).collect()
    } else {
        for name in &a.targets {
            match ws.manifest.targets.iter().find(|t| &t.name.value == name) {
                None => return Err(Failure::Usage(format!("no target named `{name}` in the manifest"))),
                Some(t) if !has_level(t) => {
                    return Err(Failure::Usage(format!("`{name}` builds no {} GGUF", a.level)));
                }
                Some(_) => {}
            }
        }
        a.targets.clone()
    };
    if targets.is_empty() {
        return Err(Failure::Usage(format!("no target builds a {} GGUF; name one, or pick another --level", a.level)));
    }
    let artifact = |t: &str| if adapters { format!("{t}:gguf-adapter") } else { format!("{t}:gguf:{level}") };
    let mut npcs = Vec::new();
    for t in &targets {
        let dir = fresh_artifact_dir(&ws, out, &artifact(t))?;
        npcs.push(npc_in(&ws, t, &dir, adapters)?);
    }
    // Hot reload: a rebuild that publishes a new artifact points its NPC at the new files;
    // requests in flight finish on the old model.
    let watch = Watch {
        global: g.clone(),
        targets: targets.clone(),
        artifacts: targets.iter().map(|t| artifact(t)).collect(),
        adapters,
    };
    run(&a, s, npcs, &format!("{} ({level})", targets.join(", ")), Some(watch))
}

/// An NPC from its artifact directory (`TARGET:gguf:LEVEL` or `TARGET:gguf-adapter`).
fn npc_in(ws: &forge_plan::Workspace, name: &str, dir: &std::path::Path, adapters: bool) -> Result<Npc, Failure> {
    if adapters {
        let mut n = npc(ws, name, dir.join("base.gguf"))?;
        n.adapter = Some(dir.join("adapter.gguf"));
        Ok(n)
    } else {
        npc(ws, name, dir.join("model.gguf"))
    }
}

/// What the reload watcher follows.
struct Watch {
    global: Global,
    targets: Vec<String>,
    artifacts: Vec<String>,
    adapters: bool,
}

impl Watch {
    /// Every 2 s, the targets' artifacts as the workspace now has them; an NPC whose fresh
    /// artifact moved is pointed at it. Stale artifacts (a rebuild in progress) are left alone.
    fn run(self, registry: std::sync::Arc<forge_serve::Registry>) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(2));
            let Some(ws) = crate::commands::load_quietly(&self.global) else { continue };
            for (t, artifact) in self.targets.iter().zip(&self.artifacts) {
                let Some(dir) = crate::commands::fresh_dir(&ws, artifact) else { continue };
                if let Ok(npc) = npc_in(&ws, t, &dir, self.adapters)
                    && registry.replace(npc)
                {
                    eprintln!("forge serve: {t}: now serving the rebuilt {artifact} ({})", dir.display());
                }
            }
        }
    }
}

/// The server's settings from the arguments, checked before anything loads.
struct Settings {
    memory: u64,
    api_key: Option<String>,
    addr: std::net::SocketAddr,
}

fn settings(a: &ServeArgs) -> Result<Settings, Failure> {
    let memory = forge_serve::parse_bytes(&a.memory).map_err(|e| Failure::Usage(format!("--memory: {e}")))?;
    let api_key = match &a.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
            _ => return Err(Failure::Usage(format!("--api-key-env {var}: the variable is not set"))),
        },
    };
    let addr: std::net::SocketAddr =
        a.addr.parse().map_err(|_| Failure::Usage(format!("--addr {}: not an address like 127.0.0.1:8080", a.addr)))?;
    if !addr.ip().is_loopback() && api_key.is_none() {
        eprintln!("warning: serving on {addr}, reachable from other machines, without --api-key-env");
    }
    Ok(Settings { memory, api_key, addr })
}

/// Serves `npcs` until Ctrl-C (following rebuilds with `watch`).
fn run(a: &ServeArgs, s: Settings, npcs: Vec<Npc>, what: &str, watch: Option<Watch>) -> Result<(), Failure> {
    let Settings { memory, api_key, addr } = s;
    let threads = a.threads.unwrap_or_else(forge_infer::default_threads).max(1);
    let config = Config {
        memory,
        threads,
        batch: a.batch.max(1),
        queue: a.queue,
        api_key,
        max_tokens: a.max_tokens.max(1),
        ..Config::default()
    };
    forge_serve::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Internal(format!("starting the server's runtime: {e}")))?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Failure::Usage(format!("listening on {addr}: {e}")))?;
        eprintln!(
            "forge serve: http://{} — {what}, up to {} resident; Ctrl-C stops",
            listener.local_addr().map_or(addr, |a| a),
            forge_serve::bytes(memory)
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        let state = std::sync::Arc::new(forge_serve::api::State::new(npcs, config));
        if let Some(w) = watch {
            let registry = state.registry.clone();
            std::thread::Builder::new()
                .name("forge-serve-reload".into())
                .spawn(move || w.run(registry))
                .map_err(|e| Failure::Internal(format!("starting the reload watcher: {e}")))?;
        }
        forge_serve::serve_state(listener, state, shutdown)
            .await
            .map_err(|e| Failure::Internal(format!("serving: {e}")))
    })
}
