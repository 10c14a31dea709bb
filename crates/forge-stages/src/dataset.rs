//! The `dataset` stage (DefameLM §3.2; the NPC persona pipeline's stages I–II).
//!
//! For sample indices 0, 1, 2, ... the recipe's DAG is evaluated ([`forge_data::sampler`]), the
//! teacher answers `generate` nodes and then the final prompt, and the answer is validated.
//! Candidates are produced concurrently but *committed in index order*, so deduplication, the
//! error budget and the result are the same however the calls interleave. A rejected candidate
//! is asked for again (`repeat` + 1) up to `attempts` times; a sample that exhausts them is given
//! up and a later index takes its place, until exactly `samples` are accepted.
//!
//! Every committed outcome is appended to a journal (`work-v1/<action key>/journal.jsonl`,
//! fsynced), so a killed build resumes where it stopped; the teacher-call cache means calls
//! already answered are not paid for twice either way. Reading it back is tolerant: a repeated
//! line is read once, a second entry for the same attempt loses to the first, a torn last line
//! is cut off.
//!
//! A teacher that cannot answer at all (a refused or malformed key, a wrong URL or model) stops
//! the run at its first answer; one that fails a single request counts against the error budget.
//! Each call's `max_tokens` is bounded by what its length checks accept (see `token_bound`),
//! and the tokens of rejected answers are reported. The progress line counts calls, answers,
//! rejections and timeouts as they happen.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use forge_manifest::{ArtifactDecl, DataSource, DatasetStage, Manifest, NodeKind, Recipe, StageKind, TeacherKind};
use forge_plan::{ActionContext, ActionError, Estimate, EstimateContext, Executor, StagePlan};
use forge_teacher::rng::SplitMix64;
use forge_teacher::{CallCache, ChatRequest, ChatResponse, Message, OpenAiClient, TeacherError, Usage};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};

use forge_data::dataset::{DATASET_FORMAT, Meta, Sample, sample_id, write_samples};
use forge_data::sampler::{NodeValue, Sampler, Values, generate_prompt, generate_system};
use forge_data::split::split;
use forge_data::validate::{Checks, Dedup, Rejection};
use journal::{Journal, append, read_journal};

pub mod captured;
mod estimate;
mod journal;

pub struct DatasetExecutor;

/// The error budget: of the last `WINDOW` committed attempts, more than half failing stops the
/// build instead of burning tokens.
const WINDOW: usize = 32;

/// The rejection key of a candidate whose teacher failed after all its retries.
const TEACHER_ERROR: &str = "teacher-error";

fn dataset_of<'m>(m: &'m Manifest, decl: &ArtifactDecl) -> &'m DatasetStage {
    assert_eq!(decl.kind, StageKind::Dataset);
    let model = m.target_of(decl).model.as_ref().expect("dataset stages belong to models");
    model.dataset.as_ref().expect("the dataset artifact has a dataset block")
}

/// `min-new` of a dataset made from its site's captures.
fn captures(m: &Manifest, decl: &ArtifactDecl) -> Option<u32> {
    match dataset_of(m, decl).source {
        DataSource::Captures { min_new, .. } => Some(min_new),
        DataSource::Recipe => None,
    }
}

fn stage<'m>(m: &'m Manifest, decl: &ArtifactDecl) -> (&'m DatasetStage, &'m Recipe) {
    let model = m.target_of(decl).model.as_ref().expect("dataset stages belong to models");
    let d = dataset_of(m, decl);
    let recipe = model.recipe.as_ref().and_then(|r| m.recipes.get(&r.value)).expect("validated: the recipe exists");
    (d, recipe)
}

/// The teachers a dataset asks: its own and any a `generate` node names.
fn teacher_names<'m>(d: &'m DatasetStage, r: &'m Recipe) -> Vec<&'m str> {
    let mut names = vec![d.teacher.value.as_str()];
    for n in &r.nodes {
        if let NodeKind::Generate(g) = &n.kind
            && let Some(t) = &g.teacher
        {
            names.push(t.value.as_str());
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Lore entries keyed by name (their order in the file does not matter to sampling).
fn list_params(list: &forge_manifest::LoreList) -> Value {
    let items: serde_json::Map<String, Value> = list
        .items
        .iter()
        .map(|i| {
            let subs: serde_json::Map<String, Value> =
                i.lists.iter().map(|(k, l)| (k.clone(), list_params(l))).collect();
            (i.name.value.clone(), json!({ "weight": i.weight, "attrs": i.attrs, "lists": subs }))
        })
        .collect();
    Value::Object(items)
}

impl Executor for DatasetExecutor {
    fn kind(&self) -> &'static str {
        "dataset"
    }

    fn format_version(&self) -> u32 {
        DATASET_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        if let Some(min_new) = captures(m, decl) {
            return captured::plan(m, decl, dataset_of(m, decl), min_new);
        }
        let (d, r) = stage(m, decl);
        let mut params = BTreeMap::new();
        params.insert("samples".into(), json!(d.samples));
        params.insert("eval".into(), json!(d.eval));
        params.insert("seed".into(), json!(d.seed));
        params.insert("attempts".into(), json!(d.attempts));
        params.insert("teacher".into(), json!(d.teacher.value));
        params.insert("split_by".into(), json!(d.split_by.as_ref().map(|s| s.value.clone())));
        let nodes: serde_json::Map<String, Value> = r
            .nodes
            .iter()
            .map(|n| (n.name.value.clone(), serde_json::to_value(&n.kind).expect("nodes serialize")))
            .collect();
        params.insert(
            "recipe".into(),
            json!({
                "name": r.name.value,
                "nodes": nodes,
                "input": r.input, "system": r.system, "prompt": r.prompt, "prompt_grammar": r.prompt_grammar,
                "validate": r.validate,
            }),
        );
        // Only the lists the recipe draws from (a nested `node.sub` reads its parent's list).
        let mut lists = serde_json::Map::new();
        for n in &r.nodes {
            if let NodeKind::Choice(c) = &n.kind
                && let Some(l) = m.lists.get(&c.from.value)
            {
                lists.insert(l.name.value.clone(), list_params(l));
            }
        }
        params.insert("lists".into(), Value::Object(lists));
        // What shapes the answers: the teacher's kind, model and endpoint. Not its key variable,
        // its parallelism or its timeouts.
        let mut teachers = serde_json::Map::new();
        for name in teacher_names(d, r) {
            let t = &m.teachers[name];
            let v = match &t.kind {
                TeacherKind::Grammar => json!({ "kind": "grammar" }),
                TeacherKind::Openai(o) => json!({ "kind": "openai", "model": o.model, "base_url": o.base_url }),
            };
            teachers.insert(name.to_string(), v);
        }
        params.insert("teachers".into(), Value::Object(teachers));
        StagePlan { params, inputs: Vec::new(), tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        if let Some(min_new) = captures(ctx.manifest, ctx.decl) {
            return captured::run(ctx, dataset_of(ctx.manifest, ctx.decl), min_new);
        }
        let (d, recipe) = stage(ctx.manifest, ctx.decl);
        let run = Run::new(ctx.manifest, ctx.cache, ctx.shared_calls.clone(), d, recipe, Mode::Build)?;
        // Candidates are polled together on one thread: the work is waiting on teachers, and what
        // is not (templates, validation) is small.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ActionError::Failed(format!("cannot start the async runtime: {e}")))?;
        let result = rt.block_on(run.generate(ctx));
        run.log_stats(ctx);
        let accepted = result?;
        run.write(ctx, accepted)?;
        let _ = std::fs::remove_dir_all(ctx.work_dir());
        Ok(())
    }

    fn estimate(&self, ctx: &EstimateContext<'_>) -> Option<Result<Estimate, String>> {
        if let Some(min_new) = captures(ctx.manifest, ctx.decl) {
            return Some(captured::estimate(ctx, min_new));
        }
        let (d, recipe) = stage(ctx.manifest, ctx.decl);
        Some(estimate::estimate(ctx, d, recipe))
    }
}

/// Whether a run builds the dataset or only works out what building it would ask.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Build,
    /// Nothing is sent: answers come from the teacher-call cache, and what it lacks is counted
    /// as calls to make ([`estimate`]).
    Estimate,
}

/// A teacher, ready to be asked.
enum Teacher {
    Grammar,
    Openai(Box<OpenAiClient>),
    /// An OpenAI-compatible teacher while estimating: never asked, so it needs no key.
    Unasked {
        model: String,
        base_url: String,
    },
}

/// Why a teacher gave no answer.
enum AskError {
    Teacher(TeacherError),
    /// Estimating, and the teacher-call cache does not hold the answer: a call to make.
    NotCached,
}

/// What one candidate came to.
enum Outcome {
    /// Passed its checks (duplicates are decided at commit). Beside it, the usage of the node
    /// answers it rejected on the way: tokens paid for and thrown away.
    Candidate(Box<Sample>, BTreeMap<String, Usage>),
    Rejected {
        key: String,
        detail: String,
        usage: BTreeMap<String, Usage>,
    },
    /// Cannot be produced at all (e.g. a choice with nothing left to pick): given up at once.
    Invalid(String),
    /// The teacher failed after its retries: counts against the error budget.
    TeacherFailed(String),
    /// Estimating: the calls the candidate would make that the cache cannot answer, and the
    /// lore entries its choices picked (node → entries), to say what caused them.
    Uncached {
        misses: Vec<estimate::Miss>,
        picks: Vec<(String, Vec<String>)>,
    },
    /// The teacher cannot answer any request (a refused or malformed key, a wrong URL or
    /// model, a server that cannot answer within its timeout): the run stops at once.
    Fatal(String),
}

struct Run<'m> {
    d: &'m DatasetStage,
    sampler: Sampler<'m>,
    teachers: HashMap<String, Teacher>,
    cache: CallCache,
    final_checks: Checks,
    node_checks: HashMap<String, Checks>,
    /// The nodes the final request reads (its templates and its grammar).
    final_reads: Vec<String>,
    /// Teacher calls not answered from the cache (HTTP requests are counted by the clients).
    calls: AtomicU64,
    cache_hits: AtomicU64,
    /// Of `cache_hits`, the answers the remote cache's copy gave.
    shared_hits: AtomicU64,
    /// Offline (grammar) expansions.
    grammar_calls: AtomicU64,
    /// Answers that failed a check (a node's or the final one), in this run.
    rejected_answers: AtomicU64,
    /// Usage of node answers rejected inside candidates that were then accepted (this run).
    node_waste: std::sync::Mutex<BTreeMap<String, Usage>>,
    /// The statistics of the finished generation, for `meta.json`.
    stats: std::sync::Mutex<Stats>,
    /// Estimating: the usage of the cached answers read, by node (what a new answer will cost).
    cached_usage: std::sync::Mutex<BTreeMap<String, (Usage, u64)>>,
}

/// The most completion tokens an answer that passes `spec` can need, when `spec` bounds its
/// length: an answer of at most N characters. Byte-level tokenizers give a token at least one
/// byte; English text (what an ASCII prompt gets back, bar a few dashes and quotes) is about a
/// byte per character, so N + N/8 + 16 tokens hold it with room to spare, and any answer cut off
/// there was longer than N characters anyway. For other scripts a character is up to 4 bytes.
pub(crate) fn token_bound(spec: &forge_manifest::Validation, messages: &[Message]) -> Option<u32> {
    let n = spec.max_chars?;
    let ascii = messages.iter().all(|m| m.content.is_ascii());
    Some(if ascii { n.saturating_add(n / 8).saturating_add(16) } else { n.saturating_mul(4).saturating_add(16) })
}

/// The sampling seed of attempt `repeat` at sample `index`. A rejected answer is asked for
/// again with a new seed: a seeded server (llama.cpp, or OpenAI with `seed`) answers the same
/// request the same way, so asking with the old seed would only buy the rejected answer again.
/// The first attempt's seed is what it always was, so cached first answers stay valid.
fn request_seed(seed: u64, index: u64, repeat: u32) -> u64 {
    seed ^ index.rotate_left(17) ^ (repeat as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// `explicit` (a node's `max-tokens`), or the validators' bound when that is smaller; and
/// whether the validators set it.
fn max_tokens(explicit: Option<u32>, bound: Option<u32>) -> (Option<u32>, bool) {
    match (explicit, bound) {
        (Some(e), Some(b)) if b < e => (Some(b), true),
        (Some(e), _) => (Some(e), false),
        (None, Some(b)) => (Some(b), true),
        (None, None) => (None, false),
    }
}

/// The stage's progress line: sent when the count changes, else at most every 250 ms and only
/// when the teachers' counters moved.
#[derive(Default)]
struct Progress {
    last: Option<(usize, String)>,
    at: Option<std::time::Instant>,
}

impl Progress {
    fn report(&mut self, ctx: &ActionContext<'_>, done: usize, total: usize, unit: impl FnOnce() -> String) {
        let count_changed = self.last.as_ref().is_none_or(|(d, _)| *d != done);
        let due = self.at.is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
        if count_changed || due {
            self.force(ctx, done, total, unit());
        }
    }

    fn force(&mut self, ctx: &ActionContext<'_>, done: usize, total: usize, unit: String) {
        if self.last.as_ref().is_some_and(|(d, u)| *d == done && *u == unit) {
            return;
        }
        (ctx.progress)(done as u64, total as u64, &unit);
        self.last = Some((done, unit));
        self.at = Some(std::time::Instant::now());
    }
}

impl<'m> Run<'m> {
    fn new(
        manifest: &'m Manifest,
        cache: &forge_cache::Cache,
        shared_calls: Option<std::sync::Arc<dyn forge_cache::SharedStore>>,
        d: &'m DatasetStage,
        recipe: &'m Recipe,
        mode: Mode,
    ) -> Result<Run<'m>, ActionError> {
        let sampler = Sampler::new(manifest, recipe, d.seed).map_err(ActionError::msg)?;
        let mut teachers = HashMap::new();
        for name in teacher_names(d, recipe) {
            let t = match &manifest.teachers[name].kind {
                TeacherKind::Grammar => Teacher::Grammar,
                TeacherKind::Openai(o) if mode == Mode::Estimate => {
                    Teacher::Unasked { model: o.model.clone(), base_url: o.base_url.clone() }
                }
                TeacherKind::Openai(o) => {
                    Teacher::Openai(Box::new(crate::openai_client(name, o).map_err(ActionError::msg)?))
                }
            };
            teachers.insert(name.to_string(), t);
        }
        let final_checks = Checks::new(&recipe.validate, None)
            .map_err(|e| ActionError::msg(format!("recipe `{}`: {e}", recipe.name)))?;
        let mut node_checks = HashMap::new();
        for n in &recipe.nodes {
            if let NodeKind::Generate(g) = &n.kind {
                let spec = g.validate.clone().unwrap_or_default();
                let checks = Checks::new(&spec, g.schema.as_deref())
                    .map_err(|e| ActionError::msg(format!("node `{}`: {e}", n.name)))?;
                node_checks.insert(n.name.value.clone(), checks);
            }
        }
        let mut final_reads = sampler.template_dependencies("prompt");
        final_reads.extend(sampler.template_dependencies("system"));
        final_reads.extend(recipe.prompt_grammar.iter().map(|g| g.value.clone()));
        Ok(Run {
            final_reads,
            d,
            sampler,
            teachers,
            cache: CallCache::new(cache).with_shared(shared_calls),
            final_checks,
            node_checks,
            calls: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            shared_hits: AtomicU64::new(0),
            grammar_calls: AtomicU64::new(0),
            rejected_answers: AtomicU64::new(0),
            node_waste: std::sync::Mutex::default(),
            stats: std::sync::Mutex::default(),
            cached_usage: std::sync::Mutex::default(),
        })
    }

    /// How many candidates may be in flight: enough to keep every teacher busy.
    fn window(&self) -> usize {
        let http = self
            .teachers
            .values()
            .filter_map(|t| match t {
                Teacher::Openai(c) => Some(c.config().max_parallel as usize),
                Teacher::Grammar | Teacher::Unasked { .. } => None,
            })
            .max();
        http.map(|p| (2 * p).max(8)).unwrap_or(64)
    }

    fn log_stats(&self, ctx: &ActionContext<'_>) {
        let shared = match self.shared_hits.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(" ({n} of them from the remote cache)"),
        };
        ctx.log.line(&format!(
            "teacher calls: {} made, {} answered from the cache{shared}",
            self.calls.load(Ordering::Relaxed),
            self.cache_hits.load(Ordering::Relaxed)
        ));
        let mut names: Vec<&String> = self.teachers.keys().collect();
        names.sort();
        for name in names {
            if let Teacher::Openai(c) = &self.teachers[name] {
                let slots = match c.slots() {
                    Some(n) => format!("{n} (the server said)"),
                    None => "not advertised (adaptive window)".to_string(),
                };
                ctx.log.line(&format!(
                    "teacher `{name}`: {:?}; server slots {slots}; final window {:.1} of {}, cut {} times for congestion",
                    c.stats.snapshot(),
                    c.window(),
                    c.config().max_parallel,
                    c.window_cuts()
                ));
            }
        }
        // What a paid teacher wrote that was thrown away.
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut all_waste = stats.wasted.clone();
        for (k, u) in self.node_waste.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            *all_waste.entry(k.clone()).or_default() += *u;
        }
        let (mut wasted, mut spent) = (Usage::default(), Usage::default());
        let mut by_node = Vec::new();
        for (node, u) in &all_waste {
            if self.paid(node) && u.completion_tokens + u.prompt_tokens > 0 {
                wasted += *u;
                by_node.push(format!("{node} {}", u.completion_tokens));
            }
        }
        for (node, u) in &stats.usage {
            if self.paid(node) {
                spent += *u;
            }
        }
        if spent.completion_tokens + spent.prompt_tokens > 0 {
            ctx.log.line(&format!(
                "tokens wasted on rejected answers: {} of {} completion tokens and {} of {} prompt tokens ({})",
                wasted.completion_tokens,
                spent.completion_tokens,
                wasted.prompt_tokens,
                spent.prompt_tokens,
                if by_node.is_empty() { "none".to_string() } else { by_node.join(", ") }
            ));
        }
    }

    /// The teacher that answers `node` (`prompt`: the final answer).
    fn teacher_of(&self, node: &str) -> &str {
        let own = self.d.teacher.value.as_str();
        match self.sampler.recipe.node(node).map(|n| &n.kind) {
            Some(NodeKind::Generate(g)) => g.teacher.as_ref().map_or(own, |t| t.value.as_str()),
            _ => own,
        }
    }

    /// Whether `node`'s answers come from a model that costs tokens (not the offline grammar).
    fn paid(&self, node: &str) -> bool {
        matches!(self.teachers.get(self.teacher_of(node)), Some(Teacher::Openai(_) | Teacher::Unasked { .. }))
    }

    /// `text` without any teacher's secrets.
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for t in self.teachers.values() {
            if let Teacher::Openai(c) = t {
                out = c.redact(&out);
            }
        }
        out
    }

    /// The progress line's unit: samples, and what the teachers are doing.
    fn progress_unit(&self) -> String {
        let (mut requests, mut answers, mut timeouts, mut failed) = (0, 0, 0, 0);
        for t in self.teachers.values() {
            if let Teacher::Openai(c) = t {
                let s = c.stats.snapshot();
                requests += s.sent;
                answers += s.ok;
                timeouts += s.timeouts;
                failed += s.failed() - s.timeouts;
            }
        }
        let grammar = self.grammar_calls.load(Ordering::Relaxed);
        let cached = self.cache_hits.load(Ordering::Relaxed);
        let mut s = format!(
            "samples ({} calls, {} answers, {} rejected, {timeouts} timed out",
            requests + grammar,
            answers + grammar + cached,
            self.rejected_answers.load(Ordering::Relaxed)
        );
        if failed > 0 {
            s.push_str(&format!(", {failed} failed"));
        }
        if cached > 0 {
            s.push_str(&format!(", {cached} from the cache"));
        }
        s.push(')');
        s
    }

    /// Asks `teacher`; an offline grammar teacher expands `grammar` instead.
    async fn ask(
        &self,
        teacher: &str,
        req: ChatRequest,
        grammar: Option<&'m str>,
        values: &Values<'m>,
    ) -> Result<ChatResponse, AskError> {
        match &self.teachers[teacher] {
            Teacher::Grammar => {
                let name = grammar.expect("validated: grammar teachers get a grammar");
                let node = self.sampler.recipe.node(name).expect("validated: the grammar node exists");
                let NodeKind::Grammar(g) = &node.kind else { unreachable!("validated: a grammar node") };
                let mut rng = SplitMix64::from_parts(&[
                    &self.d.seed.to_le_bytes(),
                    &req.sample.to_le_bytes(),
                    req.node.as_bytes(),
                    &req.repeat.to_le_bytes(),
                ]);
                self.calls.fetch_add(1, Ordering::Relaxed);
                self.grammar_calls.fetch_add(1, Ordering::Relaxed);
                let content = self.sampler.expand(name, g, values, &mut rng).map_err(|e| {
                    AskError::Teacher(TeacherError::Grammar(forge_teacher::grammar::GrammarError::Expansion(
                        e.to_string(),
                    )))
                })?;
                let words = content.split_whitespace().count() as u64;
                Ok(ChatResponse {
                    content,
                    usage: Usage { prompt_tokens: 0, completion_tokens: words },
                    finish_reason: None,
                })
            }
            Teacher::Openai(client) => {
                if let Some(r) = self.cached(&req).await {
                    return Ok(r);
                }
                self.calls.fetch_add(1, Ordering::Relaxed);
                // Before the first real call (not for a run the cache answers): how many
                // requests the server serves at once, if it says (llama.cpp's server does).
                client.discover_slots().await;
                let r = client.chat(&req).await.map_err(AskError::Teacher)?;
                // Only answers are cached, never errors; a failed write only costs a re-ask.
                let _ = self.cache.put(&req, &r);
                if self.cache.is_shared() {
                    let (cache, req, r) = (self.cache.clone(), req.clone(), r.clone());
                    let _ = tokio::task::spawn_blocking(move || cache.share(&req, &r)).await;
                }
                Ok(r)
            }
            Teacher::Unasked { .. } => match self.cached(&req).await {
                Some(r) => {
                    let mut seen = self.cached_usage.lock().unwrap_or_else(|p| p.into_inner());
                    let (usage, n) = seen.entry(req.node.clone()).or_default();
                    *usage += r.usage;
                    *n += 1;
                    Ok(r)
                }
                None => Err(AskError::NotCached),
            },
        }
    }

    /// The answer to `req` from the teacher-call cache, or else from the remote cache's copy.
    async fn cached(&self, req: &ChatRequest) -> Option<ChatResponse> {
        let r = match self.cache.get(req) {
            Some(r) => r,
            None if self.cache.is_shared() => {
                let (cache, req) = (self.cache.clone(), req.clone());
                let r = tokio::task::spawn_blocking(move || cache.get_shared(&req)).await.ok().flatten()?;
                self.shared_hits.fetch_add(1, Ordering::Relaxed);
                r
            }
            None => return None,
        };
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(r)
    }

    fn request(&self, teacher: &str, node: &str, messages: Vec<Message>, index: u64, repeat: u32) -> ChatRequest {
        let (provider, model, base_url) = match &self.teachers[teacher] {
            Teacher::Grammar => ("grammar".to_string(), String::new(), String::new()),
            Teacher::Openai(c) => ("openai".to_string(), c.config().model.clone(), c.config().base_url.clone()),
            Teacher::Unasked { model, base_url } => ("openai".to_string(), model.clone(), base_url.clone()),
        };
        ChatRequest {
            provider,
            model,
            base_url,
            messages,
            temperature: None,
            top_p: None,
            max_tokens: None,
            seed: Some(request_seed(self.d.seed, index, repeat)),
            response_schema: None,
            node: node.to_string(),
            sample: index,
            repeat,
        }
    }

    /// What a failed teacher call makes of the candidate: a failure that counts against the
    /// error budget, or the end of the run when no call to that teacher can succeed.
    fn teacher_failed(&self, teacher: &str, what: Option<&str>, e: TeacherError) -> Outcome {
        let text = self.redact(&e.to_string());
        let text = match what {
            Some(node) => format!("node `{node}`: {text}"),
            None => text,
        };
        if e.stops_run() {
            Outcome::Fatal(format!("teacher `{teacher}`: {text}"))
        } else {
            Outcome::TeacherFailed(text)
        }
    }

    /// Produces candidate `repeat` of sample `index`.
    async fn produce(&self, index: u64, repeat: u32) -> Outcome {
        let mut values: Values<'m> = HashMap::new();
        let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
        let mut waste: BTreeMap<String, Usage> = BTreeMap::new();
        // Estimating: the calls the cache cannot answer, and the nodes whose values wait on them.
        let mut misses: Vec<estimate::Miss> = Vec::new();
        let mut unknown: HashSet<&str> = HashSet::new();
        'nodes: for node in self.sampler.order() {
            let name = node.name.value.as_str();
            if !unknown.is_empty() && self.sampler.dependencies(name).iter().any(|d| unknown.contains(d.as_str())) {
                unknown.insert(name);
                if let NodeKind::Generate(g) = &node.kind
                    && self.paid(name)
                {
                    let chars = g.prompt.value.len() + g.system.as_ref().map_or(0, |s| s.value.len());
                    misses.push(estimate::Miss { node: name.to_string(), chars, max_tokens: g.max_tokens });
                }
                continue;
            }
            let value = match &node.kind {
                NodeKind::Generate(g) => {
                    let teacher = g.teacher.as_ref().map(|t| t.value.as_str()).unwrap_or(&self.d.teacher.value);
                    let render = |t: &str| self.sampler.render(t, index, &values);
                    let prompt = match render(&generate_prompt(name)) {
                        Ok(p) => p,
                        Err(e) => return Outcome::Invalid(e.to_string()),
                    };
                    let mut messages = Vec::new();
                    if g.system.is_some() {
                        match render(&generate_system(name)) {
                            Ok(s) => messages.push(Message::system(s)),
                            Err(e) => return Outcome::Invalid(e.to_string()),
                        }
                    }
                    messages.push(Message::user(prompt));
                    let checks = &self.node_checks[name];
                    let bound = g.validate.as_ref().and_then(|v| token_bound(v, &messages));
                    let (limit, bounded) = max_tokens(g.max_tokens, bound);
                    let mut last: Option<Rejection> = None;
                    let mut accepted = None;
                    // A retry of the sample is a fresh candidate: its node answers are new too.
                    for attempt in 0..self.d.attempts {
                        let node_repeat = repeat * self.d.attempts + attempt;
                        let mut req = self.request(teacher, name, messages.clone(), index, node_repeat);
                        req.temperature = g.temperature;
                        req.top_p = g.top_p;
                        req.max_tokens = limit;
                        req.response_schema = g.schema.as_deref().and_then(|s| serde_json::from_str(s).ok());
                        let grammar = g.grammar.as_ref().map(|s| s.value.as_str());
                        let answer = match self.ask(teacher, req, grammar, &values).await {
                            Ok(a) => a,
                            Err(AskError::Teacher(e)) => return self.teacher_failed(teacher, Some(name), e),
                            Err(AskError::NotCached) => {
                                let chars = messages.iter().map(|m| m.content.len()).sum();
                                misses.push(estimate::Miss { node: name.to_string(), chars, max_tokens: limit });
                                unknown.insert(name);
                                continue 'nodes;
                            }
                        };
                        *usage.entry(name.to_string()).or_default() += answer.usage;
                        match check(checks, &answer, limit.filter(|_| bounded)) {
                            Ok(Some(json)) => {
                                accepted = Some(NodeValue::Json(json));
                                break;
                            }
                            Ok(None) => {
                                accepted = Some(NodeValue::Text(answer.content.trim().to_string()));
                                break;
                            }
                            Err(r) => {
                                self.rejected_answers.fetch_add(1, Ordering::Relaxed);
                                *waste.entry(name.to_string()).or_default() += answer.usage;
                                last = Some(r)
                            }
                        }
                    }
                    match accepted {
                        Some(v) => v,
                        None => {
                            let r = last.expect("attempts >= 1");
                            return Outcome::Rejected {
                                key: format!("{name}:{}", r.key()),
                                detail: r.to_string(),
                                usage,
                            };
                        }
                    }
                }
                _ => match self.sampler.evaluate(node, index, &values) {
                    Ok(v) => v,
                    Err(e) => return Outcome::Invalid(e.to_string()),
                },
            };
            values.insert(name.to_string(), value);
        }
        let teacher = self.d.teacher.value.as_str();
        if !unknown.is_empty() && self.final_reads.iter().any(|d| unknown.contains(d.as_str())) {
            if self.paid("prompt") {
                let r = &self.sampler.recipe;
                let chars = [&r.prompt, &r.system].iter().filter_map(|t| t.as_ref()).map(|t| t.value.len()).sum();
                let max_tokens = token_bound(&r.validate, &[]);
                misses.push(estimate::Miss { node: "prompt".into(), chars, max_tokens });
            }
            return Outcome::Uncached { misses, picks: estimate::picks(&values) };
        }
        let rendered = (|| -> Result<(String, String, Option<String>), String> {
            // Estimating, the input may read values that wait on an answer: it is not needed.
            let input = if unknown.is_empty() {
                self.sampler.render("input", index, &values).map_err(|e| e.to_string())?
            } else {
                String::new()
            };
            let prompt = self.sampler.render("prompt", index, &values).map_err(|e| e.to_string())?;
            let system = if self.sampler.has_template("system") {
                Some(self.sampler.render("system", index, &values).map_err(|e| e.to_string())?)
            } else {
                None
            };
            Ok((input, prompt, system))
        })();
        let (input, prompt, system) = match rendered {
            Ok(r) => r,
            Err(e) => return Outcome::Invalid(e),
        };
        let mut messages = Vec::new();
        if let Some(s) = &system {
            messages.push(Message::system(s.clone()));
        }
        messages.push(Message::user(prompt.clone()));
        // The final prompt has no max-tokens of its own: the recipe's checks bound it.
        let (limit, bounded) = max_tokens(None, token_bound(&self.sampler.recipe.validate, &messages));
        let chars = messages.iter().map(|m| m.content.len()).sum();
        let mut req = self.request(teacher, "prompt", messages, index, repeat);
        req.max_tokens = limit;
        let grammar = self.sampler.recipe.prompt_grammar.as_ref().map(|g| g.value.as_str());
        let answer = match self.ask(teacher, req, grammar, &values).await {
            Ok(a) => a,
            Err(AskError::Teacher(e)) => return self.teacher_failed(teacher, None, e),
            Err(AskError::NotCached) => {
                misses.push(estimate::Miss { node: "prompt".into(), chars, max_tokens: limit });
                return Outcome::Uncached { misses, picks: estimate::picks(&values) };
            }
        };
        if !misses.is_empty() {
            return Outcome::Uncached { misses, picks: estimate::picks(&values) };
        }
        *usage.entry("prompt".to_string()).or_default() += answer.usage;
        let output = match check(&self.final_checks, &answer, limit.filter(|_| bounded)) {
            Ok(Some(json)) => serde_json::to_string(&json).unwrap_or_default(),
            Ok(None) => answer.content.trim().to_string(),
            Err(r) => {
                self.rejected_answers.fetch_add(1, Ordering::Relaxed);
                return Outcome::Rejected { key: r.key().to_string(), detail: r.to_string(), usage };
            }
        };
        let mut names: Vec<&String> = values.keys().collect();
        names.sort();
        let values_json = names.into_iter().map(|k| (k.clone(), values[k].to_json())).collect();
        Outcome::Candidate(
            Box::new(Sample {
                id: sample_id(index),
                index,
                repeat,
                input,
                system,
                prompt,
                output,
                values: values_json,
                usage,
            }),
            waste,
        )
    }

    /// Deduplication of the final answer and of every `generate` node that asks for it.
    fn dedups(&self) -> (Dedup, Vec<(String, Dedup)>) {
        let nodes = self
            .sampler
            .order()
            .iter()
            .filter_map(|n| self.node_checks.get(&n.name.value).map(|c| (n.name.value.clone(), c.dedup())))
            .collect();
        (self.final_checks.dedup(), nodes)
    }

    /// Runs candidates until `samples` are accepted; returns them in index order.
    async fn generate(&self, ctx: &ActionContext<'_>) -> Result<Vec<Sample>, ActionError> {
        let target = self.d.samples as usize;
        let work = ctx.work_dir();
        std::fs::create_dir_all(&work).map_err(|e| ActionError::io(&work, e))?;
        let journal_path = work.join("journal.jsonl");
        let (mut dedup, mut node_dedups) = self.dedups();
        let mut state = Committed::default();
        // Replay what an interrupted run of this exact action committed.
        let (entries, mut report) = read_journal(&journal_path).map_err(|e| ActionError::io(&journal_path, e))?;
        for entry in entries {
            // An attempt at a sample already settled (accepted or given up): a stray line.
            if entry.index() < state.next_index {
                report.conflicting += 1;
                continue;
            }
            if let Journal::Accepted(s) = &entry {
                let _ = check_dedups(s, &mut dedup, &mut node_dedups);
            }
            state.resumed += 1;
            state.commit(entry, self.d.attempts);
        }
        if !report.is_clean() {
            ctx.log.line(&format!("journal {}: {report}", journal_path.display()));
        }
        if state.resumed > 0 {
            ctx.log.line(&format!("resuming: {} samples already accepted", state.accepted.len()));
        }
        let mut journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(|e| ActionError::io(&journal_path, e))?;
        let max_candidates = (target as u64) * 4 + 32;
        let window = self.window();
        let mut next_index = state.next_index;
        let mut commit_index = state.next_index;
        let mut results: BTreeMap<u64, (u32, Outcome)> = BTreeMap::new();
        let mut in_flight = FuturesUnordered::new();
        let produce = |index: u64, repeat: u32| async move { (index, repeat, self.produce(index, repeat).await) };
        // A sample an interrupted run was retrying continues at its next attempt.
        if let Some(&repeat) = state.pending_attempts.get(&commit_index) {
            in_flight.push(produce(commit_index, repeat));
            next_index = commit_index + 1;
        }
        let mut progress = Progress::default();
        let result = loop {
            progress.report(ctx, state.accepted.len(), target, || self.progress_unit());
            if state.accepted.len() >= target {
                break Ok(());
            }
            if ctx.cancel.is_cancelled() {
                break Err(ActionError::Cancelled);
            }
            // Keep the teachers busy, but never ask for more samples than are still missing.
            let outstanding = (next_index - commit_index) as usize;
            let mut room =
                window.saturating_sub(outstanding).min(target.saturating_sub(state.accepted.len() + outstanding));
            while room > 0 && next_index < max_candidates {
                in_flight.push(produce(next_index, 0));
                next_index += 1;
                room -= 1;
            }
            if in_flight.is_empty() {
                break Err(ActionError::msg(format!(
                    "gave up after trying {next_index} candidates for {target} samples ({} accepted); {}",
                    state.accepted.len(),
                    self.redact(&state.rejection_summary())
                )));
            }
            let joined = tokio::select! {
                j = in_flight.next() => j,
                _ = tokio::time::sleep(Duration::from_millis(100)) => None,
            };
            let Some((index, repeat, outcome)) = joined else { continue };
            if let Outcome::Fatal(message) = outcome {
                // No other call to this teacher can succeed: stop now, with the reason, and
                // journal nothing (the samples are not at fault; fixing the teacher resumes).
                break Err(ActionError::msg(message));
            }
            results.insert(index, (repeat, outcome));
            // Commit in index order.
            while let Some((repeat, outcome)) = results.remove(&commit_index) {
                let entry = match outcome {
                    Outcome::Candidate(sample, waste) => match check_dedups(&sample, &mut dedup, &mut node_dedups) {
                        Ok(()) => {
                            let mut w = self.node_waste.lock().unwrap_or_else(|p| p.into_inner());
                            for (k, u) in waste {
                                *w.entry(k).or_default() += u;
                            }
                            Journal::Accepted(sample)
                        }
                        Err((key, detail)) => {
                            self.rejected_answers.fetch_add(1, Ordering::Relaxed);
                            Journal::Rejected { index: commit_index, repeat, key, detail, usage: sample.usage.clone() }
                        }
                    },
                    Outcome::Rejected { key, detail, usage } => {
                        Journal::Rejected { index: commit_index, repeat, key, detail, usage }
                    }
                    Outcome::Invalid(reason) => Journal::Abandoned { index: commit_index, reason },
                    Outcome::TeacherFailed(detail) => Journal::Rejected {
                        index: commit_index,
                        repeat,
                        key: TEACHER_ERROR.into(),
                        detail: self.redact(&detail),
                        usage: BTreeMap::new(),
                    },
                    Outcome::Fatal(_) => unreachable!("fatal outcomes stop the run before commit"),
                    Outcome::Uncached { .. } => unreachable!("only an estimate leaves calls unmade"),
                };
                append(&mut journal, &entry).map_err(|e| ActionError::io(&journal_path, e))?;
                if let Some(next_repeat) = state.commit(entry, self.d.attempts) {
                    // Ask again for this sample; the ones after it wait behind it.
                    in_flight.push(produce(commit_index, next_repeat));
                    break;
                }
                commit_index += 1;
            }
            if state.over_budget() {
                break Err(ActionError::msg(format!(
                    "more than half of the last {WINDOW} answers failed, so generation stopped rather than burn tokens ({} of {target} samples accepted); {}",
                    state.accepted.len(),
                    self.redact(&state.rejection_summary())
                )));
            }
        };
        drop(in_flight);
        progress.force(ctx, state.accepted.len(), target, self.progress_unit());
        journal.sync_all().map_err(|e| ActionError::io(&journal_path, e))?;
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = state.stats.clone();
        result?;
        let mut accepted = state.accepted;
        accepted.truncate(target);
        Ok(accepted)
    }

    fn write(&self, ctx: &ActionContext<'_>, samples: Vec<Sample>) -> Result<(), ActionError> {
        let d = self.d;
        let ids: Vec<String> = samples.iter().map(|s| s.id.clone()).collect();
        let strata: Vec<String> = samples
            .iter()
            .map(|s| match &d.split_by {
                Some(node) => match s.values.get(&node.value) {
                    Some(Value::String(v)) => v.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                },
                None => String::new(),
            })
            .collect();
        let is_eval = split(&ids, &strata, d.eval as usize, d.seed);
        let train: Vec<&Sample> = samples.iter().zip(&is_eval).filter(|(_, e)| !**e).map(|(s, _)| s).collect();
        let eval: Vec<&Sample> = samples.iter().zip(&is_eval).filter(|(_, e)| **e).map(|(s, _)| s).collect();
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut strata_counts: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        if d.split_by.is_some() {
            for (s, e) in strata.iter().zip(&is_eval) {
                let c = strata_counts.entry(s.clone()).or_default();
                if *e { c.1 += 1 } else { c.0 += 1 }
            }
        }
        let meta = Meta {
            format: DATASET_FORMAT,
            recipe: self.sampler.recipe.name.value.clone(),
            teacher: d.teacher.value.clone(),
            seed: d.seed,
            samples: samples.len() as u32,
            train: train.len() as u32,
            eval: eval.len() as u32,
            split_by: d.split_by.as_ref().map(|s| s.value.clone()),
            candidates: stats.candidates,
            rejected: stats.rejected,
            abandoned: stats.abandoned,
            usage: stats.usage,
            wasted: stats.wasted,
            strata: strata_counts,
        };
        let out = ctx.out_dir;
        let io = |p: PathBuf| move |e| ActionError::io(&p, e);
        write_samples(&out.join("train.jsonl"), &train).map_err(io(out.join("train.jsonl")))?;
        write_samples(&out.join("eval.jsonl"), &eval).map_err(io(out.join("eval.jsonl")))?;
        let meta_text = serde_json::to_string_pretty(&meta).map_err(ActionError::from_error)?;
        std::fs::write(out.join("meta.json"), meta_text + "\n").map_err(io(out.join("meta.json")))?;
        ctx.log.line(&format!(
            "{} samples ({} train, {} eval) from {} candidates; rejected {:?}; abandoned {}",
            meta.samples, meta.train, meta.eval, meta.candidates, meta.rejected, meta.abandoned
        ));
        Ok(())
    }
}

/// `checks` on `answer`; and, when the validators set the answer's `max_tokens` to `bound`, an
/// answer the server cut off there is rejected too (it is incomplete, and would only pass a
/// max-chars check by being cut).
fn check(checks: &Checks, answer: &ChatResponse, bound: Option<u32>) -> Result<Option<Value>, Rejection> {
    let v = checks.check(&answer.content)?;
    match bound {
        Some(max_tokens) if answer.finish_reason.as_deref() == Some("length") => {
            Err(Rejection::Truncated { max_tokens })
        }
        _ => Ok(v),
    }
}

fn check_dedups(sample: &Sample, dedup: &mut Dedup, nodes: &mut [(String, Dedup)]) -> Result<(), (String, String)> {
    // Check all before recording any, so a rejected candidate leaves no trace.
    for (name, d) in nodes.iter() {
        if let Some(v) = sample.values.get(name) {
            d.check(&d.text_of(v)).map_err(|r| (format!("{name}:{}", r.key()), r.to_string()))?;
        }
    }
    dedup.check(&sample.output).map_err(|r| (r.key().to_string(), r.to_string()))?;
    for (name, d) in nodes.iter_mut() {
        if let Some(v) = sample.values.get(name) {
            let text = d.text_of(v);
            d.insert(&text);
        }
    }
    dedup.insert(&sample.output);
    Ok(())
}

#[derive(Clone, Default)]
struct Stats {
    candidates: u64,
    rejected: BTreeMap<String, u64>,
    abandoned: u64,
    usage: BTreeMap<String, Usage>,
    /// Usage of answers that were thrown away (rejected candidates, rejected node answers).
    wasted: BTreeMap<String, Usage>,
}

/// What has been committed, in index order.
#[derive(Default)]
struct Committed {
    accepted: Vec<Sample>,
    next_index: u64,
    /// Attempts made at the sample being retried: index → next repeat.
    pending_attempts: HashMap<u64, u32>,
    stats: Stats,
    window: VecDeque<bool>,
    last_error: Option<String>,
    resumed: usize,
}

impl Committed {
    fn add_usage(&mut self, usage: &BTreeMap<String, Usage>) {
        for (k, u) in usage {
            *self.stats.usage.entry(k.clone()).or_default() += *u;
        }
    }

    fn push_window(&mut self, ok: bool) {
        self.window.push_back(ok);
        while self.window.len() > WINDOW {
            self.window.pop_front();
        }
    }

    /// Records a committed entry; returns the repeat to retry the sample with, if any.
    fn commit(&mut self, entry: Journal, attempts: u32) -> Option<u32> {
        match entry {
            Journal::Accepted(s) => {
                self.add_usage(&s.usage);
                self.push_window(true);
                self.stats.candidates = self.stats.candidates.max(s.index + 1);
                self.next_index = s.index + 1;
                self.pending_attempts.remove(&s.index);
                self.accepted.push(*s);
                None
            }
            Journal::Rejected { index, repeat, key, detail, usage } => {
                self.add_usage(&usage);
                for (k, u) in &usage {
                    *self.stats.wasted.entry(k.clone()).or_default() += *u;
                }
                self.push_window(false);
                if key == TEACHER_ERROR {
                    self.last_error = Some(detail);
                }
                *self.stats.rejected.entry(key).or_default() += 1;
                self.stats.candidates = self.stats.candidates.max(index + 1);
                if repeat + 1 < attempts {
                    self.pending_attempts.insert(index, repeat + 1);
                    Some(repeat + 1)
                } else {
                    self.pending_attempts.remove(&index);
                    self.stats.abandoned += 1;
                    self.next_index = index + 1;
                    None
                }
            }
            Journal::Abandoned { index, .. } => {
                self.stats.abandoned += 1;
                self.stats.candidates = self.stats.candidates.max(index + 1);
                self.next_index = index + 1;
                self.pending_attempts.remove(&index);
                None
            }
        }
    }

    fn over_budget(&self) -> bool {
        self.window.len() >= WINDOW && self.window.iter().filter(|ok| !**ok).count() * 2 > WINDOW
    }

    fn rejection_summary(&self) -> String {
        let mut r: Vec<(&String, &u64)> = self.stats.rejected.iter().collect();
        r.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = r.iter().take(4).map(|(k, n)| format!("{k}: {n}")).collect();
        let mut s =
            if top.is_empty() { "nothing was rejected".to_string() } else { format!("rejections: {}", top.join(", ")) };
        if let Some(e) = &self.last_error {
            s.push_str(&format!("; last teacher error: {e}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::journal::JournalReport;
    use super::*;

    fn sample(index: u64, repeat: u32, output: &str) -> Journal {
        Journal::Accepted(Box::new(Sample {
            id: sample_id(index),
            index,
            repeat,
            input: format!("input {index}"),
            system: None,
            prompt: format!("prompt {index}"),
            output: output.to_string(),
            values: BTreeMap::new(),
            usage: BTreeMap::from([("prompt".to_string(), Usage { prompt_tokens: 10, completion_tokens: 20 })]),
        }))
    }

    fn rejected(index: u64, repeat: u32, detail: &str) -> Journal {
        Journal::Rejected {
            index,
            repeat,
            key: "max-chars".into(),
            detail: detail.into(),
            usage: BTreeMap::from([("prompt".to_string(), Usage { prompt_tokens: 10, completion_tokens: 900 })]),
        }
    }

    fn line(e: &Journal) -> String {
        serde_json::to_string(e).unwrap() + "\n"
    }

    /// Replays entries as `generate` does.
    fn replay(entries: Vec<Journal>, attempts: u32) -> (Committed, usize) {
        let mut state = Committed::default();
        let mut stray = 0;
        for e in entries {
            if e.index() < state.next_index {
                stray += 1;
                continue;
            }
            state.commit(e, attempts);
        }
        (state, stray)
    }

    #[test]
    fn duplicated_journal_lines_are_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let (a0, r1, a1) = (sample(0, 0, "first poster"), rejected(1, 0, "900 characters"), sample(1, 1, "second"));
        let mut text = String::new();
        // Every line twice (a journal appended to itself), a conflicting second answer for
        // sample 0, a conflicting rejection of attempt (1, 0), an accepted attempt for an index
        // already settled, a garbled line in the middle, and a torn last line.
        for e in [&a0, &a0, &sample(0, 0, "another poster"), &r1, &r1, &rejected(1, 0, "something else")] {
            text.push_str(&line(e));
        }
        text.push_str("{\"accepted\": garbage}\n");
        for e in [&a1, &a1, &sample(0, 1, "late"), &sample(2, 0, "third"), &sample(2, 0, "third")] {
            text.push_str(&line(e));
        }
        let torn = line(&sample(3, 0, "fourth"));
        text.push_str(&torn[..torn.len() / 2]);
        std::fs::write(&path, &text).unwrap();

        let (entries, report) = read_journal(&path).unwrap();
        assert_eq!(entries, vec![a0, r1, a1, sample(0, 1, "late"), sample(2, 0, "third")]);
        assert_eq!(report, JournalReport { duplicates: 4, conflicting: 2, unreadable: 1, torn: true }, "{report}");
        // The torn line is gone from the file, so the next append starts a line of its own.
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.ends_with('\n') && after.len() < text.len());
        let (state, stray) = replay(entries, 3);
        assert_eq!(stray, 1, "the late attempt at sample 0 is ignored");
        let outputs: Vec<&str> = state.accepted.iter().map(|s| s.output.as_str()).collect();
        assert_eq!(outputs, ["first poster", "second", "third"]);
        assert_eq!(state.next_index, 3);
        assert_eq!(state.stats.rejected.get("max-chars"), Some(&1));
        assert_eq!(state.stats.wasted["prompt"].completion_tokens, 900, "the rejected answer's tokens");

        // Reading again finds the same entries (the file was only repaired, not emptied).
        let (again, report) = read_journal(&path).unwrap();
        assert_eq!(again.len(), 5);
        assert!(!report.torn);
    }

    #[test]
    fn a_last_entry_that_lost_only_its_newline_is_kept_and_mended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let a0 = sample(0, 0, "only");
        std::fs::write(&path, line(&a0).trim_end()).unwrap();
        let (entries, report) = read_journal(&path).unwrap();
        assert_eq!(entries, vec![a0]);
        assert!(report.is_clean(), "{report}");
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
        assert_eq!(read_journal(&dir.path().join("missing.jsonl")).unwrap().0, Vec::new());
    }

    #[test]
    fn max_chars_bounds_max_tokens() {
        let v = |max_chars| forge_manifest::Validation { max_chars, ..Default::default() };
        let ascii = [Message::user("Write a poster.")];
        assert_eq!(token_bound(&v(Some(500)), &ascii), Some(578));
        assert_eq!(token_bound(&v(None), &ascii), None);
        assert_eq!(token_bound(&v(Some(100)), &[Message::user("Écris une affiche.")]), Some(416));
        // An explicit max-tokens wins when smaller.
        assert_eq!(max_tokens(Some(80), Some(578)), (Some(80), false));
        assert_eq!(max_tokens(Some(2000), Some(578)), (Some(578), true));
        assert_eq!(max_tokens(None, Some(578)), (Some(578), true));
        assert_eq!(max_tokens(None, None), (None, false));
    }
}
