//! `forge export TARGET... --to DIR`: what a game or an engine needs to ship the models.
//!
//! ```text
//! DIR/models/NPC-LEVEL.gguf         every built level of each target (copied)
//! DIR/models/NPC-adapter.gguf       the LoRA adapter and its base, when the target builds them
//! DIR/models/NPC-base.gguf
//! DIR/models.json                   per model: file, sha256, bytes, architecture, context,
//!                                   chat template, stop tokens, sampling defaults, verifiers
//! DIR/ollama/NPC-LEVEL/Modelfile    FROM / ADAPTER / TEMPLATE / PARAMETER for Ollama
//! DIR/llama-server.json             llama-cpp-python's server `--config_file`, every model
//! ```
//!
//! The export is written to a temporary directory beside `DIR` and renamed into place, so a
//! failed export leaves no half of one.

use std::io::Read;
use std::path::{Path, PathBuf};

use forge_manifest::QuantLevel;
use forge_model::tokenizer::ChatMessage;
use serde_json::{Value, json};
use sha2::Digest;

use crate::Failure;
use crate::args::{ExportArgs, Global};
use crate::commands::{fresh_artifact_dir, load};
use crate::output::Output;

/// One exported model file and what a runtime needs to run it.
struct Exported {
    npc: String,
    /// `q4_0`, ..., or `adapter` (on `base`).
    level: String,
    file: String,
    adapter: Option<String>,
    meta: Value,
}

pub fn export(g: &Global, out: &Output, a: ExportArgs) -> Result<(), Failure> {
    let ws = load(g, out, false)?;
    let levels: Option<Vec<QuantLevel>> = if a.level.is_empty() {
        None
    } else {
        Some(
            a.level
                .iter()
                .map(|l| {
                    QuantLevel::parse(l).ok_or_else(|| Failure::Usage(format!("--level {l}: not a level forge writes")))
                })
                .collect::<Result<_, _>>()?,
        )
    };
    let to = a.to.clone();
    if to.exists() && !a.force {
        return Err(Failure::Usage(format!("{} exists; pass --force to replace it", to.display())));
    }
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Failure::Internal(format!("{}: {e}", parent.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".forge-export-")
        .tempdir_in(parent)
        .map_err(|e| Failure::Internal(format!("{}: {e}", parent.display())))?;
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).map_err(|e| Failure::Internal(e.to_string()))?;
    let mut exported = Vec::new();
    for name in &a.targets {
        let target = ws
            .manifest
            .targets
            .iter()
            .find(|t| &t.name.value == name)
            .and_then(|t| t.model.as_ref())
            .ok_or_else(|| Failure::Usage(format!("no model target named `{name}`")))?;
        let built: Vec<QuantLevel> =
            target.quantize.as_ref().map_or(Vec::new(), |q| q.levels.iter().map(|l| l.value).collect());
        let wanted = match &levels {
            None => built.clone(),
            Some(l) => {
                if let Some(missing) = l.iter().find(|l| !built.contains(l)) {
                    return Err(Failure::Usage(format!("`{name}` does not build a {missing} GGUF")));
                }
                l.clone()
            }
        };
        let defaults = sampling(target.benchmark.as_ref());
        let verifiers = verifiers(&ws, target);
        for level in wanted {
            let dir = fresh_artifact_dir(&ws, out, &format!("{name}:gguf:{level}"))?;
            let file = format!("{name}-{level}.gguf");
            let meta = copy_and_describe(&dir.join("model.gguf"), &models.join(&file))?;
            exported.push(Exported {
                npc: name.clone(),
                level: level.to_string(),
                file: format!("models/{file}"),
                adapter: None,
                meta: with(meta, &defaults, &verifiers),
            });
        }
        let adapter_id = format!("{name}:gguf-adapter");
        if ws.plan.node(&adapter_id.parse().map_err(|e| Failure::Internal(format!("{e}")))?).is_some() {
            let dir = fresh_artifact_dir(&ws, out, &adapter_id)?;
            let (base, adapter) = (format!("{name}-base.gguf"), format!("{name}-adapter.gguf"));
            let meta = copy_and_describe(&dir.join("base.gguf"), &models.join(&base))?;
            let adapter_meta = copy_and_describe(&dir.join("adapter.gguf"), &models.join(&adapter))?;
            let mut meta = with(meta, &defaults, &verifiers);
            meta["adapter"] = json!({"sha256": adapter_meta["sha256"], "bytes": adapter_meta["bytes"]});
            exported.push(Exported {
                npc: name.clone(),
                level: "adapter".into(),
                file: format!("models/{base}"),
                adapter: Some(format!("models/{adapter}")),
                meta,
            });
        }
    }
    write_manifests(tmp.path(), &exported)?;
    if to.exists() {
        std::fs::remove_dir_all(&to).map_err(|e| Failure::Internal(format!("{}: {e}", to.display())))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &to)
        .map_err(|e| Failure::Internal(format!("{} -> {}: {e}", kept.display(), to.display())))?;
    if !out.quiet {
        eprintln!("exported {} models to {}", exported.len(), to.display());
    }
    Ok(())
}

/// The benchmark's sampling, as `models.json` and the Modelfiles give it.
fn sampling(b: Option<&forge_manifest::BenchmarkStage>) -> Value {
    match b {
        Some(b) => json!({
            "temperature": b.temperature, "top_p": b.top_p, "top_k": b.top_k, "max_tokens": b.max_tokens,
            "attempts": b.attempts,
        }),
        None => json!({"temperature": 1.0, "top_p": 1.0, "top_k": null, "max_tokens": null, "attempts": 1}),
    }
}

/// The recipe's judge criteria, as the manifest states them.
fn verifiers(ws: &forge_plan::Workspace, target: &forge_manifest::ModelStages) -> Value {
    let recipe = ws.manifest.recipe_of(target);
    json!(
        recipe.map_or(Vec::new(), |r| r
            .judge
            .iter()
            .map(|c| json!({"name": c.name.value, "check": c.check}))
            .collect())
    )
}

fn with(mut meta: Value, sampling: &Value, verifiers: &Value) -> Value {
    meta["sampling"] = sampling.clone();
    meta["verifiers"] = verifiers.clone();
    meta
}

/// Copies a GGUF file, hashing it on the way, and reads what a runtime needs from its header.
fn copy_and_describe(from: &Path, to: &Path) -> Result<Value, Failure> {
    let fail = |e: std::io::Error| Failure::Internal(format!("{} -> {}: {e}", from.display(), to.display()));
    let mut src = std::fs::File::open(from).map_err(fail)?;
    let mut dst = std::fs::File::create(to).map_err(fail)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(fail)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        std::io::Write::write_all(&mut dst, &buf[..n]).map_err(fail)?;
        bytes += n as u64;
    }
    dst.sync_all().map_err(fail)?;
    let gguf = forge_gguf::Gguf::open(to).map_err(|e| Failure::Internal(e.to_string()))?;
    let sha256: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let mut meta = json!({"sha256": sha256, "bytes": bytes});
    meta["architecture"] = json!(gguf.get("general.architecture").and_then(|v| v.as_str()));
    if gguf.get("general.type").and_then(|v| v.as_str()) == Some("adapter") {
        return Ok(meta);
    }
    let cfg = forge_gguf::load::config(&gguf).map_err(|e| Failure::Internal(e.to_string()))?;
    let tok = forge_gguf::tokenizer::tokenizer(&gguf).map_err(|e| Failure::Internal(e.to_string()))?;
    let stop_ids = tok.stop_ids(&cfg.eos);
    let stop: Vec<Option<String>> = stop_ids.iter().map(|&id| tok.inner.id_to_token(id)).collect();
    meta["context"] = json!(cfg.max_positions);
    meta["chat_template"] = json!(tok.chat_template);
    meta["stop"] = json!(stop);
    meta["stop_ids"] = json!(stop_ids);
    meta["ollama_template"] = json!(ollama_template(&tok));
    Ok(meta)
}

/// The chat format as an Ollama (Go) template: the file's own template rendered around
/// placeholders for the system message and the prompt.
fn ollama_template(tok: &forge_model::Tokenizer) -> Option<String> {
    const SYS: &str = "\u{1}SYSTEM\u{1}";
    const USER: &str = "\u{1}PROMPT\u{1}";
    let bare = tok.render_chat(&[ChatMessage::new("user", USER)], true).ok()?;
    let with_system = tok.render_chat(&[ChatMessage::new("system", SYS), ChatMessage::new("user", USER)], true).ok()?;
    let bare = bare.replace(USER, "{{ .Prompt }}");
    let with_system = with_system.replace(SYS, "{{ .System }}").replace(USER, "{{ .Prompt }}");
    if !with_system.contains("{{ .System }}") {
        return Some(bare);
    }
    Some(format!("{{{{ if .System }}}}{with_system}{{{{ else }}}}{bare}{{{{ end }}}}"))
}

fn write_manifests(dir: &Path, models: &[Exported]) -> Result<(), Failure> {
    let write = |path: PathBuf, text: String| {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| Failure::Internal(format!("{}: {e}", p.display())))?;
        }
        std::fs::write(&path, text).map_err(|e| Failure::Internal(format!("{}: {e}", path.display())))
    };
    let entries: Vec<Value> = models
        .iter()
        .map(|m| {
            let mut e = json!({"npc": m.npc, "level": m.level, "file": m.file, "name": alias(m)});
            if let Some(a) = &m.adapter {
                e["adapter_file"] = json!(a);
            }
            e.as_object_mut().expect("an object").extend(m.meta.as_object().cloned().unwrap_or_default());
            e
        })
        .collect();
    let doc = json!({"forge": env!("CARGO_PKG_VERSION"), "models": entries});
    write(dir.join("models.json"), serde_json::to_string_pretty(&doc).expect("json") + "\n")?;
    for m in models {
        let mut f = format!("# {} ({}), exported by forge\nFROM ../../{}\n", m.npc, m.level, m.file);
        if let Some(a) = &m.adapter {
            f += &format!("ADAPTER ../../{a}\n");
        }
        if let Some(t) = m.meta["ollama_template"].as_str() {
            f += &format!("TEMPLATE \"\"\"{t}\"\"\"\n");
        }
        for s in m.meta["stop"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            f += &format!("PARAMETER stop {}\n", json!(s));
        }
        let s = &m.meta["sampling"];
        for (key, name) in
            [("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("max_tokens", "num_predict")]
        {
            if !s[key].is_null() {
                f += &format!("PARAMETER {name} {}\n", s[key]);
            }
        }
        if let Some(ctx) = m.meta["context"].as_u64() {
            f += &format!("PARAMETER num_ctx {ctx}\n");
        }
        write(dir.join("ollama").join(alias(m)).join("Modelfile"), f)?;
    }
    // llama-cpp-python's server: `python -m llama_cpp.server --config_file llama-server.json`,
    // paths relative to the export (run it there); the chat format comes from each file.
    let servers: Vec<Value> = models
        .iter()
        .map(|m| {
            let mut s = json!({"model": m.file, "model_alias": alias(m), "n_ctx": m.meta["context"].as_u64().unwrap_or(2048).min(8192)});
            if let Some(a) = &m.adapter {
                s["lora_path"] = json!(a);
            }
            s
        })
        .collect();
    let cfg = json!({"host": "127.0.0.1", "port": 8080, "models": servers});
    write(dir.join("llama-server.json"), serde_json::to_string_pretty(&cfg).expect("json") + "\n")
}

/// The name a runtime serves a model under: `NPC-LEVEL`, so that one export can hold several
/// levels of an NPC.
fn alias(m: &Exported) -> String {
    format!("{}-{}", m.npc, m.level)
}
