//! `dataset from="captures"`: a site's captured calls (`forge proxy`) as a dataset.
//!
//! The site's file (`captures/SITE.jsonl`) is the stage's input, so a new capture makes this
//! site's dataset stale and no other. The dataset takes the captures `min-new` at a time — the
//! first ⌊count / min-new⌋ · min-new in the order they were captured — so until `min-new` new
//! ones have come, the rebuilt dataset is byte for byte the one before and everything after it
//! (training, quantization, benchmarks) stays fresh by early cutoff. Of those, an answer is
//! kept when it was complete (not cut off at its token limit), passes the site's `validate`
//! checks and is not a repeat of one already kept; the rest are counted by reason in
//! `meta.json`. The student's input is the call's conversation without its system message
//! (which is the same at every call of a site). With `train-on="passing"` the training split
//! keeps only answers the site's judge passes (seed 003's filter); the held-out split is left as
//! the upstream answered, for the promotion's paired test.

use std::collections::{BTreeMap, HashSet};

use forge_bench::judge::{Judge, Subject};
use forge_data::captures::{self, Capture, student_input};
use forge_data::dataset::{DATASET_FORMAT, Meta, Sample, write_samples};
use forge_data::split::split;
use forge_data::validate::Checks;
use forge_manifest::{ArtifactDecl, DataSource, DatasetStage, Manifest, Site};
use forge_plan::{ActionContext, ActionError, Estimate, EstimateContext, StagePlan};
use forge_teacher::Usage;
use serde_json::json;

pub(super) fn site<'m>(m: &'m Manifest, decl: &ArtifactDecl) -> &'m Site {
    let model = m.target_of(decl).model.as_ref().expect("dataset stages belong to models");
    let name = model.site.as_ref().expect("validated: a captures dataset names its site");
    m.sites.get(&name.value).expect("validated: the site exists")
}

pub(super) fn plan(m: &Manifest, decl: &ArtifactDecl, d: &DatasetStage, min_new: u32) -> StagePlan {
    let s = site(m, decl);
    let mut params = BTreeMap::new();
    params.insert("source".into(), json!("captures"));
    params.insert("site".into(), json!(s.name.value));
    params.insert("eval".into(), json!(d.eval));
    params.insert("seed".into(), json!(d.seed));
    params.insert("min_new".into(), json!(min_new));
    params.insert("validate".into(), serde_json::to_value(&s.checks.validate).expect("serializes"));
    let mut inputs = vec![captures::default_file(&s.name.value)];
    if train_on_passing(d) {
        params.insert("train_on".into(), json!("passing"));
        params.insert("judge".into(), serde_json::to_value(&s.checks.judge).expect("serializes"));
        inputs.extend(crate::bench::verifier_files(&s.checks));
    }
    StagePlan { params, inputs, tools: BTreeMap::new() }
}

fn train_on_passing(d: &DatasetStage) -> bool {
    matches!(d.source, DataSource::Captures { passing: true, .. })
}

/// `train-on="passing"`: the train samples whose answers pass the site's judge (verifiers and
/// command verifiers; `llm` criteria are left to the promotion), the rest counted by the
/// criterion they failed first.
fn passing<'s>(
    s: &Site,
    root: &std::path::Path,
    train: Vec<&'s Sample>,
    rejected: &mut BTreeMap<String, u64>,
) -> Result<Vec<&'s Sample>, ActionError> {
    let judge =
        Judge::new(&s.checks.judge, root, true).map_err(|e| ActionError::msg(format!("site `{}`: {e}", s.name)))?;
    let mut kept = Vec::new();
    for sample in train {
        let subject = Subject {
            input: &sample.input,
            prompt: sample.system.as_deref().unwrap_or(&sample.input),
            output: &sample.output,
            values: &sample.values,
        };
        let outcomes = judge.grade_verifiers(&subject);
        match judge.names().iter().zip(&outcomes).find(|(_, o)| o.as_ref().is_some_and(|o| !o.pass)) {
            Some((name, _)) => *rejected.entry(format!("judge:{name}")).or_default() += 1,
            None => kept.push(sample),
        }
    }
    Ok(kept)
}

fn usage(c: &Capture) -> BTreeMap<String, Usage> {
    let Some(u) = &c.response.usage else { return BTreeMap::new() };
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    BTreeMap::from([(
        "prompt".to_string(),
        Usage { prompt_tokens: n("prompt_tokens"), completion_tokens: n("completion_tokens") },
    )])
}

/// How many of `count` captures the dataset takes.
fn taken(count: usize, min_new: u32) -> usize {
    count / min_new as usize * min_new as usize
}

pub(super) fn run(ctx: &ActionContext<'_>, d: &DatasetStage, min_new: u32) -> Result<(), ActionError> {
    let s = site(ctx.manifest, ctx.decl);
    let path = ctx.workspace.join(captures::default_file(&s.name.value));
    let (all, report) = captures::read(&path).map_err(|e| ActionError::io(&path, e))?;
    if report.damaged > 0 || report.torn {
        ctx.log.line(&format!(
            "{}: {} damaged lines skipped{}",
            path.display(),
            report.damaged,
            if report.torn { ", and a torn last line" } else { "" }
        ));
    }
    let k = taken(all.len(), min_new);
    if k == 0 {
        return Err(ActionError::msg(format!(
            "site `{}` has {} captures; the dataset takes them {min_new} at a time (`min-new`), so it waits for {} more",
            s.name.value,
            all.len(),
            min_new as usize - all.len()
        )));
    }
    let checks =
        Checks::new(&s.checks.validate, None).map_err(|e| ActionError::msg(format!("site `{}`: {e}", s.name)))?;
    let mut dedup = checks.dedup();
    let mut pairs = HashSet::new();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = BTreeMap::new();
    let mut samples = Vec::new();
    for (i, c) in all[..k].iter().enumerate() {
        let (input, system) = student_input(&c.request);
        for (node, u) in usage(c) {
            *total.entry(node).or_insert_with(Usage::default) += u;
        }
        if c.response.finish_reason.as_deref() == Some("length") {
            *rejected.entry("truncated".into()).or_default() += 1;
            continue;
        }
        let output = match checks.check(&c.response.content) {
            Ok(Some(json)) => serde_json::to_string(&json).unwrap_or_default(),
            Ok(None) => c.response.content.trim().to_string(),
            Err(r) => {
                *rejected.entry(r.key().to_string()).or_default() += 1;
                continue;
            }
        };
        if !pairs.insert((input.clone(), output.clone())) {
            *rejected.entry("repeated-call".into()).or_default() += 1;
            continue;
        }
        if let Err(r) = dedup.check(&output) {
            *rejected.entry(r.key().to_string()).or_default() += 1;
            continue;
        }
        dedup.insert(&output);
        samples.push(Sample {
            id: format!("c{}", c.id),
            index: i as u64,
            repeat: 0,
            prompt: input.clone(),
            input,
            system,
            output,
            values: BTreeMap::from([("site".to_string(), json!(s.name.value))]),
            usage: usage(c),
        });
    }
    if samples.len() <= d.eval as usize {
        return Err(ActionError::msg(format!(
            "{} of site `{}`'s first {k} captures pass its checks ({}); a dataset with eval={} needs more",
            samples.len(),
            s.name.value,
            if rejected.is_empty() { "none rejected".to_string() } else { format!("rejected {rejected:?}") },
            d.eval
        )));
    }
    let ids: Vec<String> = samples.iter().map(|s| s.id.clone()).collect();
    let is_eval = split(&ids, &vec![String::new(); ids.len()], d.eval as usize, d.seed);
    let mut train: Vec<&Sample> = samples.iter().zip(&is_eval).filter(|(_, e)| !**e).map(|(s, _)| s).collect();
    let eval: Vec<&Sample> = samples.iter().zip(&is_eval).filter(|(_, e)| **e).map(|(s, _)| s).collect();
    if train_on_passing(d) {
        train = passing(s, ctx.workspace, train, &mut rejected)?;
        if train.is_empty() {
            return Err(ActionError::msg(format!(
                "none of site `{}`'s {} training captures passes its judge ({rejected:?}): there is nothing to train on",
                s.name.value,
                samples.len() - eval.len()
            )));
        }
    }
    let meta = Meta {
        format: DATASET_FORMAT,
        recipe: format!("site:{}", s.name.value),
        teacher: all[..k].first().map(|c| c.upstream.clone()).unwrap_or_default(),
        seed: d.seed,
        samples: (train.len() + eval.len()) as u32,
        train: train.len() as u32,
        eval: eval.len() as u32,
        split_by: None,
        candidates: k as u64,
        abandoned: rejected.values().sum(),
        rejected,
        usage: total,
        wasted: BTreeMap::new(),
        strata: BTreeMap::new(),
    };
    let out = ctx.out_dir;
    let io = |p: std::path::PathBuf| move |e| ActionError::io(&p, e);
    write_samples(&out.join("train.jsonl"), &train).map_err(io(out.join("train.jsonl")))?;
    write_samples(&out.join("eval.jsonl"), &eval).map_err(io(out.join("eval.jsonl")))?;
    let meta_text = serde_json::to_string_pretty(&meta).map_err(ActionError::from_error)?;
    std::fs::write(out.join("meta.json"), meta_text + "\n").map_err(io(out.join("meta.json")))?;
    ctx.log.line(&format!(
        "{} samples ({} train, {} eval) from the first {k} of {} captures; rejected {:?}",
        meta.samples,
        meta.train,
        meta.eval,
        all.len(),
        meta.rejected
    ));
    Ok(())
}

/// What a rebuild takes: no teacher calls, and which captures.
pub(super) fn estimate(ctx: &EstimateContext<'_>, min_new: u32) -> Result<Estimate, String> {
    let s = site(ctx.manifest, ctx.decl);
    let path = ctx.workspace.join(captures::default_file(&s.name.value));
    let (all, _) = captures::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let k = taken(all.len(), min_new);
    let next = min_new as usize - all.len() % min_new as usize;
    Ok(Estimate {
        summary: format!(
            "site `{}`: {} captures, the first {k} taken ({next} more until the dataset next changes)",
            s.name.value,
            all.len()
        ),
        ..Estimate::default()
    })
}
