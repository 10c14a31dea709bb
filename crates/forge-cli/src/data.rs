//! `forge data show | stats`.

use std::collections::BTreeMap;

use forge_data::{Sample, read_meta, read_samples};
use serde_json::{Value, json};

use crate::Failure;
use crate::args::{DataCommand, Global, Split};
use crate::commands::{fresh_artifact_dir, load};
use crate::output::{Color, Output};

/// The directory of a target's fresh dataset and the names of its recipe's choice nodes.
fn dataset_dir(g: &Global, out: &Output, target: &str) -> Result<(std::path::PathBuf, Vec<String>), Failure> {
    let ws = load(g, out, false)?;
    let artifact = if target.contains(':') { target.to_string() } else { format!("{target}:dataset") };
    let dir = fresh_artifact_dir(&ws, out, &artifact)?;
    let name = artifact.split(':').next().unwrap_or_default();
    let choices = ws
        .manifest
        .target(name)
        .and_then(|t| t.model.as_ref())
        .and_then(|m| m.recipe.as_ref())
        .and_then(|r| ws.manifest.recipes.get(&r.value))
        .map(|r| {
            r.nodes
                .iter()
                .filter(|n| matches!(n.kind, forge_manifest::NodeKind::Choice(_)))
                .map(|n| n.name.value.clone())
                .collect()
        })
        .unwrap_or_default();
    Ok((dir, choices))
}

fn read(path: &std::path::Path) -> Result<Vec<Sample>, Failure> {
    read_samples(path).map_err(|e| Failure::Internal(e.to_string()))
}

pub fn data(g: &Global, out: &Output, c: DataCommand) -> Result<(), Failure> {
    match c {
        DataCommand::Show { target, split, limit, json } => {
            let (dir, _) = dataset_dir(g, out, &target)?;
            let file = match split {
                Split::Train => "train.jsonl",
                Split::Eval => "eval.jsonl",
            };
            let samples = read(&dir.join(file))?;
            for s in samples.iter().take(limit) {
                if json {
                    crate::outln!("{}", serde_json::to_string(s).unwrap_or_default());
                    continue;
                }
                crate::outln!(
                    "{} {}",
                    out.paint(&s.id, Color::Cyan),
                    out.paint(&format!("(attempt {})", s.repeat + 1), Color::Dim)
                );
                crate::outln!("{}", out.paint("input:", Color::Dim));
                for l in s.input.lines() {
                    crate::outln!("  {l}");
                }
                crate::outln!("{}", out.paint("output:", Color::Dim));
                for l in s.output.lines() {
                    crate::outln!("  {l}");
                }
                crate::outln!("");
            }
            if !json && !out.quiet {
                eprintln!(
                    "{} of {} {} samples",
                    limit.min(samples.len()),
                    samples.len(),
                    file.trim_end_matches(".jsonl")
                );
            }
            Ok(())
        }
        DataCommand::Stats { target, json } => {
            let (dir, choices) = dataset_dir(g, out, &target)?;
            let meta = read_meta(&dir).map_err(|e| Failure::Internal(e.to_string()))?;
            let mut all = read(&dir.join("train.jsonl"))?;
            all.extend(read(&dir.join("eval.jsonl"))?);
            let words: Vec<usize> = all.iter().map(|s| s.output.split_whitespace().count()).collect();
            let chars: Vec<usize> = all.iter().map(|s| s.output.chars().count()).collect();
            let summary = |v: &[usize]| {
                let n = v.len().max(1) as f64;
                json!({
                    "mean": v.iter().sum::<usize>() as f64 / n,
                    "min": v.iter().min().copied().unwrap_or(0),
                    "max": v.iter().max().copied().unwrap_or(0),
                })
            };
            // How often each lore entry was picked, per choice node.
            let mut picks: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
            for s in &all {
                for node in &choices {
                    let names: Vec<&str> = match s.values.get(node) {
                        Some(Value::String(x)) => vec![x.as_str()],
                        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
                        _ => continue,
                    };
                    for name in names {
                        *picks.entry(node.clone()).or_default().entry(name.to_string()).or_default() += 1;
                    }
                }
            }
            let report = json!({
                "meta": meta,
                "output_words": summary(&words),
                "output_chars": summary(&chars),
                "picks": picks,
            });
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                return Ok(());
            }
            crate::outln!(
                "{} samples ({} train, {} eval), recipe {}, teacher {}, seed {}",
                meta.samples,
                meta.train,
                meta.eval,
                meta.recipe,
                meta.teacher,
                meta.seed
            );
            let rejected: Vec<String> = meta.rejected.iter().map(|(k, n)| format!("{k} {n}")).collect();
            crate::outln!(
                "{} candidates; rejected: {}; given up: {}",
                meta.candidates,
                if rejected.is_empty() { "none".to_string() } else { rejected.join(", ") },
                meta.abandoned
            );
            for (node, u) in &meta.usage {
                crate::outln!("tokens {node}: {} prompt + {} completion", u.prompt_tokens, u.completion_tokens);
            }
            let w = &report["output_words"];
            let c = &report["output_chars"];
            crate::outln!(
                "output: {:.1} words ({}..{}), {:.1} characters ({}..{})",
                w["mean"].as_f64().unwrap_or(0.0),
                w["min"],
                w["max"],
                c["mean"].as_f64().unwrap_or(0.0),
                c["min"],
                c["max"]
            );
            for (node, counts) in &picks {
                let total: usize = counts.values().sum();
                let mut top: Vec<(&String, &usize)> = counts.iter().collect();
                top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                let shown: Vec<String> =
                    top.iter().take(4).map(|(k, n)| format!("{k} {:.0}%", **n as f64 * 100.0 / total as f64)).collect();
                crate::outln!(
                    "{node} ({} values): {}{}",
                    counts.len(),
                    shown.join(", "),
                    if top.len() > 4 { ", ..." } else { "" }
                );
            }
            Ok(())
        }
    }
}
