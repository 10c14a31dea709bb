//! What rebuilding a stale dataset would ask of its teachers, worked out without asking.
//!
//! Sampling is stable (a sample's choices depend on the seed, its index and the lore entries
//! alone), templates are cheap, and answers already paid for are in the teacher-call cache. So
//! the estimate runs the stage's own candidate code with a teacher that answers from that cache
//! only: a request the cache does not hold is a call the build will make, and whatever reads
//! that call's answer (a later node, the final prompt) is a call too. Cached answers pass
//! through the same checks and deduplication as in a build, so a rejected cached answer is
//! retried here as there; an uncached candidate is taken to pass its checks. The count is
//! therefore exact when the new answers pass, and each new answer that is rejected costs the
//! build one more call per retry.
//!
//! Each changed sample is then explained by what its calls read: a recipe node
//! whose definition changed, or a lore entry it picked that is new or edited since the last
//! build; failing those, entries removed from a list it draws from (it picked one of them
//! before); failing those, the dataset's seed or teacher.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use forge_data::sampler::{NodeValue, Values};
use forge_manifest::{DatasetStage, NodeKind, Recipe};
use forge_plan::{Cause, Cost, Estimate, EstimateContext, Executor};
use serde_json::{Map, Value};

use super::{DatasetExecutor, Mode, Outcome, Run, Teacher, check_dedups};

/// A call the build would make.
pub(crate) struct Miss {
    /// The node asked (`prompt`: the final request).
    pub node: String,
    /// The length of the request's messages (of its templates, when what it reads is unknown).
    pub chars: usize,
    pub max_tokens: Option<u32>,
}

/// The lore entries a sample's choices picked, by node.
pub(crate) fn picks(values: &Values<'_>) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = values
        .iter()
        .filter_map(|(node, v)| match v {
            NodeValue::Picks { items, .. } => {
                Some((node.clone(), items.iter().map(|i| i.name.value.clone()).collect()))
            }
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// A sample the rebuild changes: its calls and its picks.
type Changed = (Vec<Miss>, Vec<(String, Vec<String>)>);

pub(super) fn estimate(ctx: &EstimateContext<'_>, d: &DatasetStage, recipe: &Recipe) -> Result<Estimate, String> {
    let run = Run::new(ctx.manifest, ctx.cache, ctx.shared_calls.clone(), d, recipe, Mode::Estimate)
        .map_err(|e| e.to_string())?;
    let target = u64::from(d.samples);
    if !run.teachers.values().any(|t| matches!(t, Teacher::Unasked { .. })) {
        return Ok(Estimate {
            summary: format!("{target} samples from the offline grammar teacher: no teacher calls"),
            ..Estimate::default()
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let changed = rt.block_on(walk(&run, target));
    let cost = cost(&run, &changed);
    let Some(previous) = ctx.previous else {
        let summary = if changed.len() as u64 == target {
            format!("{target} samples to generate")
        } else {
            format!("{} of {target} samples to generate (the teacher-call cache answers the rest)", changed.len())
        };
        return Ok(Estimate { summary, causes: Vec::new(), cost });
    };
    let now = DatasetExecutor.plan(ctx.manifest, ctx.decl).params;
    let diff = Diff { run: &run, previous, now: &now, lists: HashMap::new() };
    let causes = diff.explain(&changed);
    let mut summary = format!("{} of {target} samples change", changed.len());
    match causes.as_slice() {
        [] => summary.push_str(": the teacher-call cache answers every call"),
        [one] => summary.push_str(&format!(" ({})", one.what)),
        many => {
            let parts: Vec<String> = many.iter().map(|c| format!("{}: {}", c.count, c.what)).collect();
            summary.push_str(&format!(" ({})", parts.join("; ")));
        }
    }
    Ok(Estimate { summary, causes, cost })
}

/// The build's candidate loop, one candidate at a time: which samples it would accept, and
/// for those the cache cannot answer, their calls. (The build commits candidates in index
/// order, so running them one by one decides the same samples.)
async fn walk(run: &Run<'_>, target: u64) -> Vec<Changed> {
    let (mut dedup, mut node_dedups) = run.dedups();
    let (mut accepted, mut changed) = (0u64, Vec::new());
    let max_candidates = target * 4 + 32;
    let mut index = 0;
    while accepted < target && index < max_candidates {
        for repeat in 0..run.d.attempts {
            match run.produce(index, repeat).await {
                Outcome::Candidate(sample, _) => {
                    if check_dedups(&sample, &mut dedup, &mut node_dedups).is_ok() {
                        accepted += 1;
                        break;
                    }
                }
                Outcome::Uncached { misses, picks } => {
                    accepted += 1;
                    changed.push((misses, picks));
                    break;
                }
                Outcome::Rejected { .. } | Outcome::TeacherFailed(_) => {}
                Outcome::Invalid(_) | Outcome::Fatal(_) => break,
            }
        }
        index += 1;
    }
    changed
}

/// The calls and their tokens: a node's new answer is taken to cost what its cached answers
/// cost on average; a node with none, a token per four characters of its prompt and its
/// `max-tokens` bound (or nothing, unbounded) for the answer.
fn cost(run: &Run<'_>, changed: &[Changed]) -> Cost {
    let seen = run.cached_usage.lock().unwrap_or_else(|p| p.into_inner());
    let mut cost = Cost::default();
    for miss in changed.iter().flat_map(|(m, _)| m) {
        cost.teacher_calls += 1;
        match seen.get(&miss.node) {
            Some((usage, n)) if *n > 0 => {
                cost.prompt_tokens += usage.prompt_tokens / n;
                cost.completion_tokens += usage.completion_tokens / n;
            }
            _ => {
                cost.prompt_tokens += miss.chars.div_ceil(4) as u64;
                cost.completion_tokens += u64::from(miss.max_tokens.unwrap_or(0));
            }
        }
    }
    cost
}

/// A list's entries as fingerprinted (name → weight, attributes, sub-lists).
type Entries = Map<String, Value>;

/// The previous build's parameters against the current ones.
struct Diff<'a> {
    run: &'a Run<'a>,
    previous: &'a BTreeMap<String, Value>,
    now: &'a BTreeMap<String, Value>,
    /// Per list path: its added, changed and removed entries.
    lists: HashMap<Vec<String>, ListDiff>,
}

#[derive(Default)]
struct ListDiff {
    added: BTreeSet<String>,
    changed: BTreeSet<String>,
    removed: BTreeSet<String>,
}

/// The entries of the list at `path` — `[list]`, or `[list, entry, sub-list, ...]` for a
/// nested one — in fingerprinted `lists`.
fn list_at<'v>(lists: Option<&'v Value>, path: &[String]) -> Option<&'v Entries> {
    let mut entries = lists?.get(path.first()?)?.as_object()?;
    for step in path[1..].chunks(2) {
        let [entry, sub] = step else { return None };
        entries = entries.get(entry)?.get("lists")?.get(sub)?.as_object()?;
    }
    Some(entries)
}

fn label(path: &[String]) -> String {
    format!("list {:?}", path.join("/"))
}

impl Diff<'_> {
    fn recipe(params: &BTreeMap<String, Value>) -> Option<&Value> {
        params.get("recipe")
    }

    /// Whether recipe node `name`'s definition changed (`prompt`: the final request's).
    fn node_changed(&self, name: &str) -> bool {
        let (old, new) = (Self::recipe(self.previous), Self::recipe(self.now));
        let fields: &[&str] = if name == "prompt" { &["prompt", "system", "prompt_grammar", "validate"] } else { &[] };
        if fields.is_empty() {
            let get = |r: Option<&Value>| r.and_then(|r| r.get("nodes")).and_then(|n| n.get(name)).cloned();
            return get(old) != get(new);
        }
        fields.iter().any(|f| old.and_then(|r| r.get(f)) != new.and_then(|r| r.get(f)))
    }

    fn node_label(name: &str) -> String {
        if name == "prompt" { "the recipe's prompt changed".to_string() } else { format!("node {name:?} changed") }
    }

    fn list_diff(&mut self, path: &[String]) -> &ListDiff {
        let (previous, now) = (self.previous, self.now);
        self.lists.entry(path.to_vec()).or_insert_with(|| {
            let empty = Entries::new();
            let old = list_at(previous.get("lists"), path).unwrap_or(&empty);
            let new = list_at(now.get("lists"), path).unwrap_or(&empty);
            let shape = |e: &Value| (e.get("weight").cloned(), e.get("attrs").cloned());
            let mut d = ListDiff::default();
            for (name, e) in new {
                match old.get(name) {
                    None => {
                        d.added.insert(name.clone());
                    }
                    Some(o) if shape(o) != shape(e) => {
                        d.changed.insert(name.clone());
                    }
                    Some(_) => {}
                }
            }
            d.removed = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
            d
        })
    }

    /// The path of the list choice `node` drew `entry` from, given the sample's picks.
    fn entry_list(
        &self,
        node: &str,
        entry: &str,
        picks: &HashMap<&str, &[String]>,
        depth: usize,
    ) -> Option<Vec<String>> {
        let recipe = self.run.sampler.recipe;
        let NodeKind::Choice(c) = &recipe.node(node)?.kind else { return None };
        match c.from.value.split_once('.') {
            None => Some(vec![c.from.value.clone()]),
            Some(_) if depth > 16 => None,
            Some((up, sub)) => picks.get(up)?.iter().find_map(|parent| {
                let mut path = self.entry_list(up, parent, picks, depth + 1)?;
                path.push(parent.clone());
                path.push(sub.to_string());
                list_at(self.now.get("lists"), &path)?.contains_key(entry).then_some(path)
            }),
        }
    }

    /// What caused each changed sample, counted over the samples.
    fn explain(mut self, changed: &[Changed]) -> Vec<Cause> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (misses, picks) in changed {
            let picks: HashMap<&str, &[String]> = picks.iter().map(|(n, e)| (n.as_str(), e.as_slice())).collect();
            let mut causes = BTreeSet::new();
            let mut shrunk = BTreeSet::new();
            // Every call the sample makes, and what each reads: a poster asked again because the
            // backstory it reads was may also read a new place.
            for m in misses {
                if self.node_changed(&m.node) {
                    causes.insert(Self::node_label(&m.node));
                }
                // What the request reads, up to the answers it reads (those were cached).
                let run = self.run;
                let sampler = &run.sampler;
                let mut stack: Vec<String> =
                    if m.node == "prompt" { run.final_reads.clone() } else { sampler.dependencies(&m.node).to_vec() };
                let mut seen = HashSet::new();
                while let Some(a) = stack.pop() {
                    let Some(node) = sampler.recipe.node(&a) else { continue };
                    if !seen.insert(a.clone()) || matches!(node.kind, NodeKind::Generate(_)) {
                        continue;
                    }
                    if self.node_changed(&a) {
                        causes.insert(Self::node_label(&a));
                    }
                    for entry in picks.get(a.as_str()).copied().unwrap_or_default() {
                        let Some(path) = self.entry_list(&a, entry, &picks, 0) else { continue };
                        let d = self.list_diff(&path);
                        if d.added.contains(entry) {
                            let n = d.added.len();
                            causes.insert(format!(
                                "{}: +{n} {}",
                                label(&path),
                                if n == 1 { "entry" } else { "entries" }
                            ));
                        } else if d.changed.contains(entry) {
                            causes.insert(match d.changed.len() {
                                1 => format!("{}: entry {entry:?} changed", label(&path)),
                                n => format!("{}: {n} entries changed", label(&path)),
                            });
                        }
                        if !d.removed.is_empty() {
                            shrunk.insert(format!(
                                "{}: −{} {}",
                                label(&path),
                                d.removed.len(),
                                if d.removed.len() == 1 { "entry" } else { "entries" }
                            ));
                        }
                    }
                    stack.extend(sampler.dependencies(&a).iter().cloned());
                }
            }
            if causes.is_empty() {
                causes = shrunk;
            }
            if causes.is_empty() {
                causes.insert(self.fallback());
            }
            for c in causes {
                *counts.entry(c).or_default() += 1;
            }
        }
        let mut causes: Vec<Cause> = counts.into_iter().map(|(what, count)| Cause { what, count }).collect();
        causes.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.what.cmp(&b.what)));
        causes
    }

    /// Why a sample changed that reads no changed node or entry.
    fn fallback(&self) -> String {
        let changed = |k: &str| self.previous.get(k) != self.now.get(k);
        if changed("seed") {
            "the seed changed".to_string()
        } else if changed("teacher") || changed("teachers") {
            "the teacher changed".to_string()
        } else {
            "answers not in the teacher-call cache".to_string()
        }
    }
}
