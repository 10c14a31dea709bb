//! The `bench:<level>` stage: DefameLM's multi-generation experiment (§4.2) on one GGUF file.
//!
//! For each of the first `prompts` eval samples, forge's quantized decoder writes `samples`
//! answers at the benchmark's temperature and top-p, each with its own seed (the same seeds at
//! every level, so outcomes pair up across levels for McNemar's test). Every answer is graded by
//! the recipe's judge suite; the prompt's success probability is p̂ = passes / samples and its
//! expected attempts 1/p̂ (eq. 2). Retry-until-success is then run for real: attempts follow the
//! same seeds (answers beyond `samples` are generated as needed) until one passes or
//! `attempts` is spent, and the time it took is measured.
//!
//! Timings follow the paper (Table 1): preparation is loading the model plus processing the
//! prompt, then a time per generated token; every attempt is charged a full preparation, as in
//! eq. 3 (the prompt is processed once per eval sample and its measured time charged to each of
//! its attempts: the same numbers, in less benchmark time). Benchmarks hold a process-wide lock while generating, so levels built in parallel do not
//! slow each other's timings down.
//!
//! Progress is kept per prompt in the action's work directory: a killed benchmark resumes at
//! the first prompt it had not finished.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use forge_data::Sample;
use forge_manifest::{ArtifactDecl, BenchmarkStage, Check, Manifest, Recipe, StageKind, TeacherKind};
use forge_model::generate::Sampling;
use forge_plan::{ActionContext, ActionError, Executor, StagePlan};
use forge_teacher::CallCache;
use serde::{Deserialize, Serialize};
use serde_json::json;

use forge_bench::judge::{Judge, LlmJudge, Outcome, Subject};
use forge_bench::stats::{self, Percentiles};
use forge_infer::QModel;

/// Bumped when what the bench stage writes changes.
pub const BENCH_FORMAT: u32 = 2;

/// One benchmark generates at a time in this process, also across builds (within a build the
/// scheduler runs a benchmark alone: [`Executor::exclusive`]).
static TIMING: Mutex<()> = Mutex::new(());

pub struct BenchExecutor;

/// The benchmark's settings, as recorded in its result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub prompts: u32,
    pub samples: u32,
    pub attempts: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<u32>,
    pub max_tokens: u32,
    pub seed: u64,
}

/// One generated answer and its grades.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub text: String,
    pub tokens: usize,
    pub prompt_tokens: usize,
    pub prompt_s: f64,
    pub decode_s: f64,
    pub pass: bool,
    /// One outcome per graded criterion, in `BenchResult::criteria` order.
    pub criteria: Vec<Outcome>,
}

/// Retry-until-success on one prompt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Retry {
    /// Attempts made (up to `attempts`).
    pub attempts: u32,
    pub success: bool,
    /// Measured: every attempt's preparation (load + prompt) and generation, summed.
    pub seconds: f64,
}

/// One eval prompt's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptResult {
    pub id: String,
    pub input: String,
    /// The teacher's answer in the dataset, for comparison.
    pub reference: String,
    /// The `samples` answers p̂ is estimated from (retry attempts beyond them are not kept).
    pub samples: Vec<Attempt>,
    pub passes: u32,
    /// p̂: passes / samples.
    pub p: f64,
    pub retry: Retry,
}

/// What `bench:<level>` writes to `bench.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub level: String,
    pub model_bytes: u64,
    pub settings: Settings,
    /// The criteria graded, in order.
    pub criteria: Vec<String>,
    /// `llm` criteria not graded because the benchmark names no `judge` model.
    pub skipped: Vec<String>,
    pub load_s: f64,
    pub prompts: Vec<PromptResult>,
    pub summary: LevelSummary,
}

/// A level's headline numbers (the paper's Fig. 5 and Tables 1 and 2).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LevelSummary {
    /// Passing answers over all answers, with the standard error over prompts' p̂.
    pub success: f64,
    #[serde(with = "forge_bench::stats::nonfinite")]
    pub success_se: f64,
    /// Per criterion: the fraction of answers passing it, and how many could not be evaluated.
    pub criteria: Vec<CriterionRate>,
    /// Medians: load, prompt processing, one attempt in all, one generated token.
    pub load_s: f64,
    pub prompt_s: f64,
    pub attempt_s: f64,
    pub per_token_s: f64,
    pub mean_tokens: f64,
    pub decode_tokens_per_s: f64,
    pub prompt_tokens_per_s: f64,
    /// Mean over prompts of 1/p̂ among prompts with p̂ > 0, and how many had p̂ = 0.
    #[serde(with = "forge_bench::stats::nonfinite")]
    pub expected_attempts_mean: f64,
    pub unsolved_prompts: usize,
    /// Expected attempts 1/p̂ per prompt (∞ when p̂ = 0).
    #[serde(with = "forge_bench::stats::nonfinite::vec")]
    pub expected_attempts: Vec<f64>,
    /// Expected time-to-success per prompt (eq. 3; ∞ when p̂ = 0), and its percentiles.
    #[serde(with = "forge_bench::stats::nonfinite::vec")]
    pub expected_seconds_per_prompt: Vec<f64>,
    pub expected_seconds: Percentiles,
    /// Measured retry-until-success: how often it succeeded within `attempts`, and the time it
    /// took over prompts (∞ when it never did).
    pub retry_success: f64,
    pub measured_seconds: Percentiles,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CriterionRate {
    pub name: String,
    pub pass: f64,
    pub errors: usize,
    /// The first error, to show what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

fn stage<'m>(m: &'m Manifest, decl: &ArtifactDecl) -> (&'m BenchmarkStage, &'m Recipe) {
    let model = m.target_of(decl).model.as_ref().expect("bench belongs to a model");
    let b = model.benchmark.as_ref().expect("planned from a benchmark");
    let r = m.recipe_of(model).expect("validated: the recipe or site exists");
    (b, r)
}

/// The workspace files `command` verifiers run (arguments that are relative paths with a `/`, or
/// named like a script, and no spaces: `verifiers/reach.py`, `verify.py`, not a `sh -c`
/// script): editing a verifier re-runs
/// the benchmark, and a missing one is a clear error before anything runs.
pub(crate) fn verifier_files(r: &Recipe) -> Vec<String> {
    // A script named without a directory (`python3 verify.py`) is a file as much as one with.
    const SCRIPTS: &[&str] = &[".py", ".sh", ".js", ".mjs", ".rb", ".pl", ".lua", ".jq"];
    let mut out = Vec::new();
    for c in &r.judge {
        if let Check::Command { run, .. } = &c.check {
            for a in run {
                let v = a.value.as_str();
                if (v.contains('/') || SCRIPTS.iter().any(|e| v.ends_with(e)))
                    && !v.starts_with('-')
                    && !v.contains(char::is_whitespace)
                    && Path::new(v).is_relative()
                    && let Ok(n) = forge_manifest::glob::normalize("", v)
                {
                    out.push(n);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

impl Executor for BenchExecutor {
    fn kind(&self) -> &'static str {
        "bench"
    }

    /// Benchmarks time the model: nothing else runs beside one.
    fn exclusive(&self, _decl: &ArtifactDecl) -> bool {
        true
    }

    fn format_version(&self) -> u32 {
        BENCH_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        let StageKind::Bench(level) = decl.kind else { panic!("the bench executor got a {} stage", decl.kind.name()) };
        let (b, r) = stage(m, decl);
        let mut params = BTreeMap::new();
        params.insert("level".into(), json!(level.as_str()));
        params.insert("settings".into(), serde_json::to_value(settings(b)).expect("serializes"));
        params.insert("judge".into(), serde_json::to_value(&r.judge).expect("serializes"));
        params.insert("student_input".into(), json!(r.input.as_ref().map(|i| i.value.clone())));
        if let Some(j) = &b.judge {
            let v = match &m.teachers[&j.value].kind {
                TeacherKind::Openai(o) => json!({ "model": o.model, "base_url": o.base_url }),
                TeacherKind::Grammar => json!(null),
            };
            params.insert("judge_model".into(), v);
        }
        StagePlan { params, inputs: verifier_files(r), tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let StageKind::Bench(level) = ctx.decl.kind else { unreachable!("planned as bench") };
        let (b, r) = stage(ctx.manifest, ctx.decl);
        let mut gguf = None;
        let mut dataset = None;
        for (id, dir) in ctx.deps {
            match id.stage.as_str() {
                "gguf" => gguf = Some(dir.join("model.gguf")),
                "dataset" => dataset = Some(dir.clone()),
                _ => {}
            }
        }
        let gguf = gguf.ok_or_else(|| ActionError::msg("the gguf artifact is missing"))?;
        let dataset =
            dataset.ok_or_else(|| ActionError::msg("the benchmark needs the model's dataset (its eval split)"))?;
        let eval = forge_data::read_samples(&dataset.join("eval.jsonl")).map_err(ActionError::from_error)?;
        if eval.is_empty() {
            return Err(ActionError::msg("the dataset's eval split is empty: nothing to benchmark"));
        }
        let n = (b.prompts as usize).min(eval.len());
        if n < b.prompts as usize {
            ctx.log.line(&format!("the eval split has {} samples; benchmarking all of them", eval.len()));
        }
        let llm_client = match &b.judge {
            Some(j) => match &ctx.manifest.teachers[&j.value].kind {
                TeacherKind::Openai(o) => Some(crate::openai_client(&j.value, o).map_err(ActionError::msg)?),
                TeacherKind::Grammar => None,
            },
            None => None,
        };
        let judge = Judge::new(&r.judge, ctx.workspace, llm_client.is_none()).map_err(ActionError::msg)?;
        let skipped: Vec<String> = if llm_client.is_none() {
            r.judge.iter().filter(|c| c.check.is_llm()).map(|c| c.name.value.clone()).collect()
        } else {
            Vec::new()
        };
        if !skipped.is_empty() {
            ctx.log.line(&format!(
                "not graded (the benchmark names no `judge` model): {}",
                skipped.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            ));
        }
        let llm = llm_client.as_ref().map(|client| LlmJudge { client, cache: CallCache::new(ctx.cache) });
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ActionError::from_error)?;

        let _timing = TIMING.lock().unwrap_or_else(|p| p.into_inner());
        let model = QModel::load(&gguf).map_err(ActionError::from_error)?;
        let load_s = model.load_s;
        ctx.log.line(&format!("{}: loaded in {:.3}s", gguf.display(), load_s));
        let settings = settings(b);
        let progress_path = ctx.work_dir().join("prompts.jsonl");
        let mut done = resume(&progress_path, &eval[..n]);
        if !done.is_empty() {
            ctx.log.line(&format!("resuming after {} finished prompts", done.len()));
        }
        let mut progress_file = open_progress(&progress_path, &done).map_err(|e| ActionError::io(&progress_path, e))?;
        for (i, sample) in eval[..n].iter().enumerate().skip(done.len()) {
            if ctx.cancel.is_cancelled() {
                return Err(ActionError::Cancelled);
            }
            (ctx.progress)(i as u64, n as u64, "prompts");
            let pr = bench_prompt(&model, &judge, llm.as_ref(), &runtime, sample, &settings, load_s)?;
            let line = serde_json::to_string(&pr).expect("serializes");
            writeln!(progress_file, "{line}")
                .and_then(|_| progress_file.sync_data())
                .map_err(|e| ActionError::io(&progress_path, e))?;
            done.push(pr);
        }
        drop(_timing);
        (ctx.progress)(n as u64, n as u64, "prompts");

        let criteria = judge.names().to_vec();
        // A criterion that errored on every answer is broken, not strict: fail loudly.
        for (ci, name) in criteria.iter().enumerate() {
            let outcomes: Vec<&Outcome> =
                done.iter().flat_map(|p| p.samples.iter().map(move |s| &s.criteria[ci])).collect();
            if !outcomes.is_empty() && outcomes.iter().all(|o| o.error.is_some()) {
                return Err(ActionError::msg(format!(
                    "judge criterion `{name}` could not be evaluated on any answer: {}",
                    outcomes[0].error.as_deref().unwrap_or_default()
                )));
            }
        }
        let summary = summarize(&done, &criteria, load_s);
        ctx.log.line(&format!(
            "{level}: success {:.3} ± {:.3}, {:.1} tokens/s, expected time-to-success median {:.2}s",
            summary.success, summary.success_se, summary.decode_tokens_per_s, summary.expected_seconds.median
        ));
        let result = BenchResult {
            level: level.as_str().to_string(),
            model_bytes: std::fs::metadata(&gguf).map(|m| m.len()).unwrap_or(0),
            settings,
            criteria,
            skipped,
            load_s,
            prompts: done,
            summary,
        };
        let path = ctx.out_dir.join("bench.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&result).expect("serializes"))
            .map_err(|e| ActionError::io(&path, e))?;
        let _ = std::fs::remove_dir_all(ctx.work_dir());
        Ok(())
    }
}

fn settings(b: &BenchmarkStage) -> Settings {
    Settings {
        prompts: b.prompts,
        samples: b.samples,
        attempts: b.attempts,
        temperature: b.temperature,
        top_p: b.top_p,
        top_k: b.top_k,
        max_tokens: b.max_tokens,
        seed: b.seed,
    }
}

/// The seed of answer `j` to eval sample `index`: the same at every level.
pub fn answer_seed(seed: u64, index: u64, j: u32) -> u64 {
    forge_rng::SplitMix64::from_parts(&[&seed.to_le_bytes(), &index.to_le_bytes(), &j.to_le_bytes()]).next_u64()
}

fn bench_prompt(
    model: &QModel,
    judge: &Judge,
    llm: Option<&LlmJudge<'_>>,
    runtime: &tokio::runtime::Runtime,
    sample: &Sample,
    s: &Settings,
    load_s: f64,
) -> Result<PromptResult, ActionError> {
    // The prompt is processed once and every answer continues from its cache; each attempt is
    // still charged the prompt's measured time (a runtime that does not keep the cache pays it).
    let prefill = model.prefill_input(&sample.input, s.max_tokens as usize).map_err(ActionError::from_error)?;
    let attempt = |j: u32| -> Result<Attempt, ActionError> {
        let sampling = Sampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k.map(|k| k as usize),
            seed: answer_seed(s.seed, sample.index, j),
            max_tokens: s.max_tokens as usize,
        };
        let g = model.generate_after(&prefill, &sampling).map_err(ActionError::from_error)?;
        let subject = Subject { input: &sample.input, prompt: &sample.prompt, output: &g.text, values: &sample.values };
        let mut grades = judge.grade_verifiers(&subject);
        if let Some(l) = llm {
            runtime.block_on(judge.grade_llm(&subject, l, &mut grades));
        }
        let criteria: Vec<Outcome> = grades.into_iter().map(|o| o.expect("every criterion graded")).collect();
        Ok(Attempt {
            pass: criteria.iter().all(|o| o.pass),
            criteria,
            text: g.text,
            tokens: g.tokens,
            prompt_tokens: g.prompt_tokens,
            prompt_s: g.prompt_s,
            decode_s: g.decode_s,
        })
    };
    let mut samples = Vec::with_capacity(s.samples as usize);
    for j in 0..s.samples {
        samples.push(attempt(j)?);
    }
    // Retry-until-success along the same seeds.
    let cost = |a: &Attempt| load_s + a.prompt_s + a.decode_s;
    let mut retry = Retry { attempts: 0, success: false, seconds: 0.0 };
    for j in 0..s.attempts {
        let extra;
        let a = match samples.get(j as usize) {
            Some(a) => a,
            None => {
                extra = attempt(j)?;
                &extra
            }
        };
        retry.attempts += 1;
        retry.seconds += cost(a);
        if a.pass {
            retry.success = true;
            break;
        }
    }
    let passes = samples.iter().filter(|a| a.pass).count() as u32;
    Ok(PromptResult {
        id: sample.id.clone(),
        input: sample.input.clone(),
        reference: sample.output.clone(),
        p: passes as f64 / samples.len().max(1) as f64,
        passes,
        samples,
        retry,
    })
}

/// The prompts finished by an interrupted run of this action (a torn last line is dropped).
fn resume(path: &Path, eval: &[Sample]) -> Vec<PromptResult> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let mut out = Vec::new();
    for (line, sample) in text.lines().zip(eval) {
        match serde_json::from_str::<PromptResult>(line) {
            Ok(p) if p.id == sample.id => out.push(p),
            _ => break,
        }
    }
    out
}

/// The progress file, rewritten to hold exactly the resumed prompts.
fn open_progress(path: &PathBuf, done: &[PromptResult]) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(path)?;
    for p in done {
        writeln!(f, "{}", serde_json::to_string(p).expect("serializes"))?;
    }
    f.sync_data()?;
    Ok(f)
}

/// A level's headline numbers from its prompts.
pub fn summarize(prompts: &[PromptResult], criteria: &[String], load_s: f64) -> LevelSummary {
    let answers: Vec<&Attempt> = prompts.iter().flat_map(|p| &p.samples).collect();
    let total = answers.len() as u64;
    let passed = answers.iter().filter(|a| a.pass).count() as u64;
    let ps: Vec<f64> = prompts.iter().map(|p| p.p).collect();
    let rates = criteria
        .iter()
        .enumerate()
        .map(|(ci, name)| {
            let outs: Vec<&Outcome> = answers.iter().map(|a| &a.criteria[ci]).collect();
            CriterionRate {
                name: name.clone(),
                pass: outs.iter().filter(|o| o.pass).count() as f64 / outs.len().max(1) as f64,
                errors: outs.iter().filter(|o| o.error.is_some()).count(),
                first_error: outs.iter().find_map(|o| o.error.clone()),
            }
        })
        .collect();
    let prompt_s: Vec<f64> = answers.iter().map(|a| a.prompt_s).collect();
    let attempt_s: Vec<f64> = answers.iter().map(|a| load_s + a.prompt_s + a.decode_s).collect();
    let per_token: Vec<f64> = answers.iter().filter(|a| a.tokens > 0).map(|a| a.decode_s / a.tokens as f64).collect();
    let tokens: f64 = answers.iter().map(|a| a.tokens as f64).sum();
    let decode_s: f64 = answers.iter().map(|a| a.decode_s).sum();
    let prompt_tokens: f64 = answers.iter().map(|a| a.prompt_tokens as f64).sum();
    let prompt_total: f64 = prompt_s.iter().sum();
    let prep = load_s + stats::percentile(&prompt_s, 50.0);
    let t_tok = stats::percentile(&per_token, 50.0);
    let expected: Vec<f64> = prompts
        .iter()
        .map(|p| {
            let mean_tokens = stats::mean(&p.samples.iter().map(|a| a.tokens as f64).collect::<Vec<_>>());
            stats::expected_time_to_success(p.p, prep, t_tok, mean_tokens)
        })
        .collect();
    let solved: Vec<f64> = ps.iter().filter(|p| **p > 0.0).map(|p| stats::expected_attempts(*p)).collect();
    let measured: Vec<f64> =
        prompts.iter().map(|p| if p.retry.success { p.retry.seconds } else { f64::INFINITY }).collect();
    LevelSummary {
        success: passed as f64 / total.max(1) as f64,
        success_se: stats::mean_se(&ps),
        criteria: rates,
        load_s,
        prompt_s: stats::percentile(&prompt_s, 50.0),
        attempt_s: stats::percentile(&attempt_s, 50.0),
        per_token_s: t_tok,
        mean_tokens: tokens / answers.len().max(1) as f64,
        decode_tokens_per_s: if decode_s > 0.0 { tokens / decode_s } else { 0.0 },
        prompt_tokens_per_s: if prompt_total > 0.0 { prompt_tokens / prompt_total } else { 0.0 },
        expected_attempts_mean: if solved.is_empty() { f64::INFINITY } else { stats::mean(&solved) },
        unsolved_prompts: ps.iter().filter(|p| **p == 0.0).count(),
        expected_attempts: ps.iter().map(|p| stats::expected_attempts(*p)).collect(),
        expected_seconds: stats::percentiles(&expected),
        expected_seconds_per_prompt: expected,
        retry_success: prompts.iter().filter(|p| p.retry.success).count() as f64 / prompts.len().max(1) as f64,
        measured_seconds: stats::percentiles(&measured),
    }
}

/// Reads a `bench.json`.
pub fn read_result(dir: &Path) -> Result<BenchResult, String> {
    let path = dir.join("bench.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
