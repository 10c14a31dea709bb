//! `forge site status|promote|rollback`: call sites' versions (`forge_serve::proxy::versions`).

use forge_bench::judge::{LlmJudge, Subject};
use forge_bench::promote::{Policy, Verdict, decide};
use forge_manifest::{Site, Target};
use forge_plan::Workspace;
use forge_serve::proxy::versions::{Decided, Live, Versions, now_ms};
use forge_teacher::CallCache;
use serde_json::json;

use crate::Failure;
use crate::args::{Global, SiteCommand};
use crate::commands::{built_artifact, load};
use crate::output::{Color, Output};

fn declared<'w>(ws: &'w Workspace, name: &str) -> Result<&'w Site, Failure> {
    ws.manifest.sites.get(name).ok_or_else(|| {
        let known: Vec<&str> = ws.manifest.sites.keys().map(String::as_str).collect();
        Failure::Usage(format!("no site named `{name}` (the manifest declares: {})", known.join(", ")))
    })
}

/// The model target that distils `site`.
pub(crate) fn target_of<'w>(ws: &'w Workspace, site: &str) -> Result<&'w Target, Failure> {
    ws.manifest
        .targets
        .iter()
        .find(|t| t.model.as_ref().and_then(|m| m.site.as_ref()).is_some_and(|s| s.value == site))
        .ok_or_else(|| Failure::Usage(format!("no model target has site=\"{site}\": nothing to promote")))
}

/// `vN` → `Some(N)`, `upstream` → `None`.
fn version_arg(s: &str) -> Result<Option<u32>, Failure> {
    if s == "upstream" {
        return Ok(None);
    }
    s.strip_prefix('v')
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| Failure::Usage(format!("`{s}` is not a version: write vN (e.g. v2) or `upstream`")))
}

fn io(v: &Versions) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::Internal(format!("{}: {e}", v.dir().display()))
}

fn shown(live: &Live) -> String {
    live.version.map_or("the upstream".to_string(), |v| format!("v{v}"))
}

pub fn site(g: &Global, out: &Output, c: SiteCommand) -> Result<(), Failure> {
    let ws = load(g, out, false)?;
    match c {
        SiteCommand::Status { sites, json } => status(&ws, &sites, json),
        SiteCommand::Promote { site, to, force, ask_upstream, if_new } => {
            promote(&ws, out, &site, to.as_deref(), force, Grading { ask_upstream, if_new })
        }
        SiteCommand::Rollback { site, to } => rollback(&ws, &site, to.as_deref()),
    }
}

fn switch(ws: &Workspace, site: &str, to: Option<u32>, reason: &str) -> Result<(), Failure> {
    let v = Versions::of(&ws.root, site);
    let live = v.set_live(to, reason).map_err(|e| Failure::Usage(format!("site `{site}`: {e}")))?;
    eprintln!("{site}: {} is live ({reason})", shown(&live));
    Ok(())
}

fn rollback(ws: &Workspace, site: &str, to: Option<&str>) -> Result<(), Failure> {
    declared(ws, site)?;
    let v = Versions::of(&ws.root, site);
    let current = v.live().map_err(io(&v))?;
    let to = match to {
        Some(t) => version_arg(t)?,
        None => {
            let Some(now) = current.version else {
                return Err(Failure::Usage(format!("site `{site}` is answered by the upstream already")));
            };
            v.before(now)
        }
    };
    switch(ws, site, to, &format!("rolled back by hand from {}", shown(&current)))
}

/// How a promotion grades: `--ask-upstream`, `--if-new`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Grading {
    /// Ask the upstream each held-out input again rather than grade its captured answers.
    pub ask_upstream: bool,
    /// Skip a candidate already graded under the same judge, policy and held-out inputs.
    pub if_new: bool,
}

/// Counts of the criteria failed, most failed first: `playable ×14, schema ×2`.
fn tally(failures: &[Vec<String>]) -> String {
    let mut n: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for f in failures.iter().flatten() {
        *n.entry(f.as_str()).or_default() += 1;
    }
    let mut v: Vec<(&str, usize)> = n.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if v.is_empty() {
        return "none failed".into();
    }
    v.iter().map(|(c, k)| format!("{c} ×{k}")).collect::<Vec<_>>().join(", ")
}

/// The model target that distils site `name`, and the artifact it promotes
/// (`TARGET:gguf:LEVEL`: the policy's `level`, else the target's first).
pub(crate) fn candidate<'w>(ws: &'w Workspace, name: &str) -> Result<(&'w Target, String), Failure> {
    let site = declared(ws, name)?;
    let target = target_of(ws, name)?;
    let t = &target.name.value;
    let model = target.model.as_ref().expect("a model target");
    let levels: Vec<&str> = model.quantize.iter().flat_map(|q| q.levels.iter().map(|l| l.value.as_str())).collect();
    let level = match &site.policy.level {
        Some(l) if levels.contains(&l.as_str()) => l.clone(),
        Some(l) => {
            return Err(Failure::Usage(format!("site `{name}` promotes level {l}, which `{t}` does not quantize to")));
        }
        None => levels
            .first()
            .map(|l| l.to_string())
            .ok_or_else(|| Failure::Usage(format!("`{t}` has no `quantize` stage: there is no GGUF to promote")))?,
    };
    Ok((target, format!("{t}:gguf:{level}")))
}

fn promote(
    ws: &Workspace,
    out: &Output,
    name: &str,
    to: Option<&str>,
    force: bool,
    how: Grading,
) -> Result<(), Failure> {
    let site = declared(ws, name)?;
    if let Some(to) = to {
        return switch(ws, name, version_arg(to)?, "promoted by hand");
    }
    let (target, artifact) = candidate(ws, name)?;
    let t = &target.name.value;
    // The last build, even when a capture since made it stale, graded on the held-out split of
    // the very dataset it was trained from.
    let (dir, upstream_dirs) = built_artifact(ws, out, &artifact)?;
    let gguf = dir.join("model.gguf");
    let content = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let data = upstream_dirs.get(&format!("{t}:dataset")).cloned().ok_or_else(|| {
        Failure::Internal(format!("{artifact} was not built from `{t}:dataset` (its fingerprint does not name it)"))
    })?;
    let held_out = forge_data::read_samples(&data.join("eval.jsonl"))
        .map_err(|e| Failure::Internal(format!("{}: {e}", data.display())))?;
    let upstream = crate::proxy::site_upstream(ws, site)?;
    let versions = Versions::of(&ws.root, name);
    // What this grading depends on besides the candidate: a candidate graded again under the
    // same ones would get the same decision (up to sampling).
    let grading = blake3::hash(
        json!({
            "judge": site.checks.judge,
            "validate": site.checks.validate,
            "policy": site.policy,
            "held-out": data.file_name().map(|n| n.to_string_lossy().into_owned()),
            "upstream": [&upstream.name, &upstream.model, &upstream.base_url],
            "ask-upstream": how.ask_upstream,
        })
        .to_string()
        .as_bytes(),
    )
    .to_hex()[..16]
        .to_string();
    if how.if_new
        && let Some(d) = versions.decisions().into_iter().rev().find(|d| d.content == content && d.grading == grading)
    {
        eprintln!(
            "{name}: {artifact} ({}) was graded already under this judge and policy: {}",
            &content[..content.len().min(12)],
            d.decision["verdict"].as_str().unwrap_or("?")
        );
        return Ok(());
    }
    let npc = crate::serve::npc(ws, t, gguf.clone())?;
    let r = &site.checks;
    if r.judge.is_empty() {
        return Err(Failure::Usage(format!(
            "site `{name}` has no `judge` to grade answers with, so parity cannot be measured"
        )));
    }
    // The whole judge: `llm` criteria are asked of the site's upstream.
    let client = match &ws.manifest.teachers[&upstream.name].kind {
        forge_manifest::TeacherKind::Openai(o) if r.judge.iter().any(|c| c.check.is_llm()) => {
            Some(forge_stages::openai_client(&upstream.name, o).map_err(Failure::Usage)?)
        }
        _ => None,
    };
    let judge = forge_bench::judge::Judge::new(&r.judge, &ws.root, client.is_none())
        .map_err(|e| Failure::Usage(format!("site `{name}`'s judge: {e}")))?;
    let llm = client.as_ref().map(|client| LlmJudge { client, cache: CallCache::new(&ws.cache) });
    // A fresh answer re-sends the captured call: its system message, schema and settings.
    let requests: std::collections::HashMap<String, serde_json::Value> = if how.ask_upstream {
        let path = ws.root.join(forge_data::captures::default_file(name));
        let (all, _) =
            forge_data::captures::read(&path).map_err(|e| Failure::Internal(format!("{}: {e}", path.display())))?;
        all.into_iter().map(|c| (format!("c{}", c.id), c.request)).collect()
    } else {
        Default::default()
    };
    let attempts = site.policy.attempts as usize;
    // As long as the target's benchmark lets an answer be, else 512 tokens.
    let max_tokens = npc.defaults.max_tokens.or(Some(512));
    eprintln!(
        "{} {t} ({artifact}) against the upstream's {} answers on {} held-out captures",
        out.verb("Grading", Color::Green),
        if how.ask_upstream { "fresh" } else { "captured" },
        held_out.len()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Internal(format!("starting the runtime: {e}")))?;
    let state = forge_serve::api::State::new(vec![npc], forge_serve::Config::default());
    let (mut candidate, mut upstream_passed) = (Vec::new(), Vec::new());
    let (mut candidate_failed, mut upstream_failed) = (Vec::new(), Vec::new());
    for (i, s) in held_out.iter().enumerate() {
        let prompt = s.system.as_deref().unwrap_or(&s.input);
        let conversation = [("user".to_string(), s.input.clone())];
        let v = rt
            .block_on(forge_serve::api::verified_answer(&state, t, &conversation, attempts, max_tokens))
            .map_err(|e| Failure::Internal(format!("{t}: {e}")))?;
        let mine = Subject { input: &s.input, prompt, output: &v.text, values: &s.values };
        let failed = rt.block_on(judge.failures(&mine, llm.as_ref()));
        candidate.push(failed.is_empty());
        candidate_failed.push(failed);
        let theirs = if how.ask_upstream {
            let request = requests.get(&s.id).ok_or_else(|| {
                Failure::Internal(format!("held-out sample {} is not among site `{name}`'s captures", s.id))
            })?;
            rt.block_on(forge_serve::proxy::ask(&upstream, request)).map_err(Failure::Internal)?.content
        } else {
            s.output.clone()
        };
        let subject = Subject { input: &s.input, prompt, output: &theirs, values: &s.values };
        let failed = rt.block_on(judge.failures(&subject, llm.as_ref()));
        upstream_passed.push(failed.is_empty());
        upstream_failed.push(failed);
        if (i + 1) % 10 == 0 && i + 1 < held_out.len() {
            eprintln!("  {}/{} graded", i + 1, held_out.len());
        }
    }
    let p = &site.policy;
    let policy = Policy { margin: p.margin, confidence: p.confidence, min_samples: u64::from(p.min_samples) };
    let d = decide(&candidate, &upstream_passed, &policy);
    eprintln!(
        "{name}: the candidate passes {:.1}% (in up to {attempts} attempts), the upstream {:.1}%, on {} inputs: {:?}, {}",
        100.0 * d.candidate_rate,
        100.0 * d.upstream_rate,
        d.n,
        d.verdict,
        d.reason
    );
    eprintln!("  the candidate failed: {}; the upstream failed: {}", tally(&candidate_failed), tally(&upstream_failed));
    let decision = serde_json::to_value(&d).unwrap_or_default();
    let promoted = d.verdict == Verdict::Promote || force;
    // The same model promoted before is made live again, not added twice.
    let existing = versions.list().map_err(io(&versions))?.into_iter().find(|v| v.content == content);
    let forced = d.verdict != Verdict::Promote;
    let v = match (&existing, promoted) {
        (_, false) => None,
        (Some(v), true) => Some(v.number),
        (None, true) => Some(
            versions.add(&gguf, &artifact, &content, Some(decision.clone()), forced).map_err(io(&versions))?.number,
        ),
    };
    let record = Decided { at_ms: now_ms(), artifact: artifact.clone(), content, grading, decision, version: v };
    versions.decided(&record).map_err(io(&versions))?;
    let Some(v) = v else { return Err(Failure::Failed) };
    let why = if forced { format!("promoted by hand past a {:?}", d.verdict).to_lowercase() } else { d.reason.clone() };
    switch(ws, name, Some(v), &why)
}

fn status(ws: &Workspace, names: &[String], json_out: bool) -> Result<(), Failure> {
    for n in names {
        declared(ws, n)?;
    }
    let mut rows = Vec::new();
    for (name, site) in &ws.manifest.sites {
        if !names.is_empty() && !names.contains(name) {
            continue;
        }
        let v = Versions::of(&ws.root, name);
        let live = v.live().map_err(io(&v))?;
        let versions = v.list().map_err(io(&v))?;
        let captures = forge_data::captures::read(&ws.root.join(forge_data::captures::default_file(name)))
            .map(|(c, _)| c.len())
            .unwrap_or(0);
        let served = v.served_calls();
        let count = |by: &str| served.iter().filter(|s| s.by == by).count();
        let (local, fallback, up) = (count("local"), count("fallback"), count("upstream"));
        // The live version's pass rate over the policy's window: its local answers that passed.
        let window = site.policy.rollback_window as usize;
        let tried: Vec<bool> = served
            .iter()
            .rev()
            .filter(|s| s.version.is_some() && s.version == live.version && s.by != "upstream")
            .take(window)
            .map(|s| s.by == "local")
            .collect();
        let pass_rate = (!tried.is_empty()).then(|| tried.iter().filter(|p| **p).count() as f64 / tried.len() as f64);
        let last = v.decisions().pop();
        rows.push(json!({
            "site": name,
            "last_grading": last,
            "captures": captures,
            "live": live,
            "versions": versions,
            "calls": served.len(),
            "local": local,
            "fallback": fallback,
            "upstream": up,
            "local_share": if served.is_empty() { 0.0 } else { local as f64 / served.len() as f64 },
            "upstream_calls_saved": local,
            "live_pass_rate": pass_rate,
        }));
    }
    if json_out {
        crate::outln!("{}", serde_json::to_string_pretty(&json!({ "sites": rows })).unwrap_or_default());
        return Ok(());
    }
    for r in &rows {
        let live = match r["live"]["version"].as_u64() {
            Some(v) => format!("v{v} live ({})", r["live"]["reason"].as_str().unwrap_or_default()),
            None => "the upstream answers".to_string(),
        };
        crate::outln!(
            "{}: {} captures; {} versions; {live}",
            r["site"].as_str().unwrap_or_default(),
            r["captures"],
            r["versions"].as_array().map_or(0, Vec::len)
        );
        let calls = r["calls"].as_u64().unwrap_or(0);
        if calls > 0 {
            let rate = r["live_pass_rate"].as_f64().map_or("—".to_string(), |p| format!("{:.0}%", 100.0 * p));
            crate::outln!(
                "  {calls} calls: {} answered locally ({:.0}%), {} fell back to the upstream, {} upstream; live pass rate {rate}; upstream calls saved {}",
                r["local"],
                100.0 * r["local_share"].as_f64().unwrap_or(0.0),
                r["fallback"],
                r["upstream"],
                r["upstream_calls_saved"]
            );
        }
        if let Some(d) = r["last_grading"].as_object() {
            let dd = &d["decision"];
            crate::outln!(
                "  last grading: {} {} — {} (the candidate {:.0}%, the upstream {:.0}%, n = {})",
                d["artifact"].as_str().unwrap_or_default(),
                d["content"].as_str().map_or("", |c| &c[..c.len().min(12)]),
                dd["verdict"].as_str().unwrap_or("?"),
                100.0 * dd["candidate_rate"].as_f64().unwrap_or(0.0),
                100.0 * dd["upstream_rate"].as_f64().unwrap_or(0.0),
                dd["n"]
            );
        }
        for v in r["versions"].as_array().into_iter().flatten() {
            let verdict = v["decision"]["verdict"].as_str().unwrap_or("none");
            crate::outln!(
                "  v{} {} ({}){}",
                v["number"],
                v["artifact"].as_str().unwrap_or_default(),
                verdict,
                if v["forced"] == true { ", forced" } else { "" }
            );
        }
    }
    Ok(())
}
