//! Targets: `model "NAME" recipe="R" { dataset ...; adapter ...; quantize ...; benchmark ... }`
//! and `target "NAME" { command "STAGE" { ... } }`.

use std::collections::BTreeMap;

use kdl::KdlNode;

use crate::artifact::RESERVED_STAGES;
use crate::decode::{Cx, NodeReader, unknown_node};
use crate::diagnostic::{Code, Diagnostic};
use crate::glob;
use crate::model::*;
use crate::parse::{check_name, duplicate};
use crate::source::{Span, Spanned};
use crate::suggest;

const MODEL_STAGES: &[&str] = &["dataset", "adapter", "quantize", "benchmark", "command"];

pub(crate) fn target(cx: &mut Cx<'_>, node: &KdlNode) -> Option<Target> {
    let is_model = node.name().value() == "model";
    let usage = if is_model {
        "model \"NAME\" recipe=\"RECIPE\" { dataset ...; adapter ...; quantize \"q8_0\"; benchmark ... }"
    } else {
        "target \"NAME\" { command \"STAGE\" { run \"prog\" \"arg\" } }"
    };
    let mut r = NodeReader::new(cx, node, usage);
    let name = r.arg_str(cx, 0, "a name");
    let recipe = if is_model { r.str(cx, "recipe") } else { None };
    let site = if is_model { r.str(cx, "site") } else { None };
    r.finish(cx);
    if let Some(n) = &name {
        // `:` separates a target from its stage in artifact names (`defame:adapter`).
        if !check_name(cx, if is_model { "model" } else { "target" }, n) {
            return None;
        }
    }
    if let (Some(r), Some(s)) = (&recipe, &site) {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                s.span,
                "a model learns from a recipe or from a site, not both",
                "and a site",
            )
            .with_note(r.span, "a recipe here")
            .with_help("keep `recipe=` to generate a dataset, or `site=` to distil captured calls"),
        );
    }
    let mut model = ModelStages { recipe, site, ..ModelStages::default() };
    let mut commands: Vec<CommandStage> = Vec::new();
    let mut seen: BTreeMap<&str, Span> = BTreeMap::new();
    let mut prompts_given: Option<Spanned<u32>> = None;
    for child in r.child_nodes() {
        let kind = child.name().value();
        let span = cx.span(child.name().span());
        if is_model && kind != "command" {
            if let Some(first) = seen.get(kind) {
                cx.push(
                    Diagnostic::new(
                        Code::DuplicateName,
                        span,
                        format!("stage `{kind}` is declared twice"),
                        "declared again",
                    )
                    .with_note(*first, "first declared here"),
                );
                continue;
            }
            seen.insert(kind, span);
        }
        match (kind, is_model) {
            ("dataset", true) => model.dataset = dataset(cx, child),
            ("adapter", true) => model.adapter = adapter(cx, child),
            ("quantize", true) => model.quantize = quantize(cx, child),
            ("benchmark", true) => {
                let (stage, given) = benchmark(cx, child);
                model.benchmark = stage;
                prompts_given = given;
            }
            ("command", _) => {
                if let Some(c) = command(cx, child) {
                    if let Some(first) = commands.iter().find(|o| o.name.value == c.name.value) {
                        cx.push(duplicate("stage", &c.name, first.name.span));
                    } else {
                        commands.push(c);
                    }
                }
            }
            (_, true) => unknown_node(cx, child, "a `model`", MODEL_STAGES),
            (_, false) => {
                let mut d = Diagnostic::new(
                    Code::UnknownNode,
                    span,
                    format!("unknown node `{kind}` in a `target`"),
                    "unknown node",
                );
                d = if MODEL_STAGES.contains(&kind) {
                    d.with_help(format!("`{kind}` is a stage of `model` targets; declare this target with `model`"))
                } else {
                    d.with_help("a `target` holds `command` stages")
                };
                cx.push(d);
            }
        }
    }
    if is_model {
        check_pipeline(cx, &model, &seen);
        if let (Some(b), Some(d)) = (&mut model.benchmark, &model.dataset) {
            match prompts_given {
                Some(p) if p.value > d.eval => cx.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        p.span,
                        format!("`prompts` ({}) is more than the dataset's eval split ({})", p.value, d.eval),
                        "more prompts than eval samples",
                    )
                    .with_note(d.span, "the dataset is declared here")
                    .with_help(format!("benchmark at most `prompts={}`, or raise the dataset's `eval`", d.eval)),
                ),
                Some(_) => {}
                // Unsaid: up to 50, as many as there are.
                None => b.prompts = b.prompts.min(d.eval),
            }
        }
    }
    Some(Target { name: name?, model: is_model.then_some(model), commands })
}

/// Each ML stage needs the one before it. A stage that is declared but invalid has its own
/// diagnostic, so the stages after it are not told that it is missing.
fn check_pipeline(cx: &mut Cx<'_>, m: &ModelStages, declared: &BTreeMap<&str, Span>) {
    let mut need = |present: bool, span: Option<Span>, what: &str, prior: &str| {
        let present = present || declared.contains_key(prior);
        if let (Some(span), false) = (span, present) {
            cx.push(
                Diagnostic::new(
                    Code::MissingNode,
                    span,
                    format!("`{what}` needs a `{prior}` stage in the same model"),
                    format!("no `{prior}` to work from"),
                )
                .with_help(format!("add a `{prior}` block to this model")),
            );
        }
    };
    need(m.dataset.is_some(), m.adapter.as_ref().map(|a| a.span), "adapter", "dataset");
    need(m.adapter.is_some(), m.quantize.as_ref().map(|q| q.span), "quantize", "adapter");
    need(m.quantize.is_some(), m.benchmark.as_ref().map(|b| b.span), "benchmark", "quantize");
}

fn seed(cx: &mut Cx<'_>, r: &mut NodeReader<'_>) -> u64 {
    r.int_in(cx, "seed", 0, u64::MAX as i128).map(|v| v.value as u64).unwrap_or(0)
}

fn dataset(cx: &mut Cx<'_>, node: &KdlNode) -> Option<DatasetStage> {
    let mut r = NodeReader::new(
        cx,
        node,
        "dataset samples=1800 eval=360 seed=7 teacher=\"TEACHER\"  or  dataset from=\"captures\" eval=20 min-new=50",
    );
    if let Some(from) = r.str(cx, "from") {
        return captures_dataset(cx, node, r, from);
    }
    let samples = r.req_int_in(cx, "samples", 1, 10_000_000);
    // The eval split is what the adapter's eval loss and the benchmark's prompts come from.
    let eval = r.int_in(cx, "eval", 1, 10_000_000);
    let seed = seed(cx, &mut r);
    let teacher = r.req_str(cx, "teacher");
    let split_by = r.str(cx, "split-by");
    let attempts = r.int_in(cx, "attempts", 1, 1000).map(|v| v.value as u32).unwrap_or(4);
    let pool = r.str(cx, "pool");
    r.no_children(cx);
    r.finish(cx);
    let samples = samples?;
    let eval_v = eval.as_ref().map(|e| e.value).unwrap_or((samples.value / 5).max(1));
    if eval_v >= samples.value {
        cx.push(Diagnostic::new(
            Code::InvalidValue,
            eval.map(|e| e.span).unwrap_or(samples.span),
            format!("`eval` ({eval_v}) must be smaller than `samples` ({})", samples.value),
            "leaves nothing to train on",
        ));
        return None;
    }
    Some(DatasetStage {
        span: cx.span(node.name().span()),
        samples: samples.value as u32,
        eval: eval_v as u32,
        seed,
        teacher: teacher?,
        split_by,
        attempts,
        pool,
        source: crate::model::DataSource::Recipe,
    })
}

/// `dataset from="captures" eval=20 seed=7 min-new=50 train-on="valid|passing"`: the model's
/// site's captured calls.
fn captures_dataset(
    cx: &mut Cx<'_>,
    node: &KdlNode,
    mut r: NodeReader<'_>,
    from: Spanned<String>,
) -> Option<DatasetStage> {
    let eval = r.int_in(cx, "eval", 1, 10_000_000).map(|v| v.value as u32).unwrap_or(20);
    let seed = seed(cx, &mut r);
    let min_new = r.int_in(cx, "min-new", 1, 10_000_000).map(|v| v.value as u32).unwrap_or(50);
    let pool = r.str(cx, "pool");
    let passing = r.choice(cx, "train-on", &["valid", "passing"]).is_some_and(|v| v.value == "passing");
    r.no_children(cx);
    r.finish(cx);
    if from.value != "captures" {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                from.span,
                format!("a dataset cannot come from `{}`", from.value),
                "unknown source",
            )
            .with_help(
                "write `from=\"captures\"` (a site's captured calls), or leave `from` out to generate from the recipe",
            ),
        );
        return None;
    }
    Some(DatasetStage {
        span: cx.span(node.name().span()),
        samples: 0,
        eval,
        seed,
        teacher: Spanned::new(String::new(), from.span),
        split_by: None,
        attempts: 1,
        pool,
        source: crate::model::DataSource::Captures { min_new, passing },
    })
}

fn adapter(cx: &mut Cx<'_>, node: &KdlNode) -> Option<AdapterStage> {
    let mut r = NodeReader::new(
        cx,
        node,
        "adapter base=\"BASE\" method=\"lora\" rank=16 alpha=32 lr=2e-4 epochs=3 { target-modules \"q_proj\" \"v_proj\" }",
    );
    let base = r.req_str(cx, "base");
    let method = match r.choice(cx, "method", &["lora", "full"]).as_ref().map(|m| m.value.as_str()) {
        Some("full") => TrainMethod::Full,
        _ => TrainMethod::Lora,
    };
    let rank = r.int_in(cx, "rank", 1, 65536).map(|v| v.value as u32).unwrap_or(16);
    let alpha = r.float_positive(cx, "alpha", 1e6).map(|v| v.value).unwrap_or(2.0 * rank as f64);
    let dropout = r.float_in(cx, "dropout", 0.0, 0.99).map(|v| v.value).unwrap_or(0.0);
    let rslora = r.bool(cx, "rslora").map(|v| v.value).unwrap_or(false);
    let lr = r.float_positive(cx, "lr", 10.0).map(|v| v.value).unwrap_or(2e-4);
    let epochs = r.int_in(cx, "epochs", 1, 100_000);
    let steps = r.int_in(cx, "steps", 1, 100_000_000);
    if let (Some(e), Some(_)) = (&epochs, &steps) {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                e.span,
                "give either `epochs` or `steps`, not both",
                "conflicts with `steps`",
            )
            .with_help("`steps` counts optimizer steps; `epochs` counts passes over the train split"),
        );
    }
    let epochs = epochs.map(|v| v.value as u32);
    let steps = steps.map(|v| v.value as u32);
    let batch = r.int_in(cx, "batch", 1, 65536).map(|v| v.value as u32).unwrap_or(4);
    let grad_accum = r.int_in(cx, "grad-accum", 1, 65536).map(|v| v.value as u32).unwrap_or(1);
    let warmup = r.float_in(cx, "warmup", 0.0, 1.0).map(|v| v.value).unwrap_or(0.03);
    let schedule = match r.choice(cx, "schedule", &["cosine", "linear", "constant"]).as_ref().map(|s| s.value.as_str())
    {
        Some("linear") => Schedule::Linear,
        Some("constant") => Schedule::Constant,
        _ => Schedule::Cosine,
    };
    let weight_decay = r.float_in(cx, "weight-decay", 0.0, 10.0).map(|v| v.value).unwrap_or(0.0);
    let max_grad_norm = r.float_in(cx, "max-grad-norm", 0.0, f64::INFINITY).map(|v| v.value).unwrap_or(1.0);
    let prompt_loss_weight = r.float_in(cx, "prompt-loss-weight", 0.0, 1.0).map(|v| v.value).unwrap_or(0.0);
    let seq_len = r.int_in(cx, "seq-len", 8, 1 << 20).map(|v| v.value as u32).unwrap_or(512);
    let packing = r.bool(cx, "packing").map(|v| v.value).unwrap_or(false);
    let seed = seed(cx, &mut r);
    let base_dtype = match r.choice(cx, "base-dtype", &["bf16", "f32"]).as_ref().map(|s| s.value.as_str()) {
        Some("f32") => BaseDtype::F32,
        _ => BaseDtype::Bf16,
    };
    let pool = r.str(cx, "pool");
    let mut target_modules: Option<Vec<String>> = None;
    for child in r.child_nodes() {
        match child.name().value() {
            "target-modules" => {
                let mut c = NodeReader::new(cx, child, "target-modules \"q_proj\" \"k_proj\" \"v_proj\" \"o_proj\"");
                let mods = c.rest_str(cx, 0, 1, "module names");
                for m in &mods {
                    if !LORA_MODULES.contains(&m.value.as_str()) {
                        cx.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                m.span,
                                format!("`{}` is not a module LoRA can adapt", m.value),
                                "unknown module",
                            )
                            .with_optional_help(suggest::help(
                                &m.value,
                                "module",
                                LORA_MODULES.iter().copied(),
                            )),
                        );
                    }
                }
                c.no_children(cx);
                c.finish(cx);
                target_modules = Some(mods.into_iter().map(|m| m.value).collect());
            }
            _ => unknown_node(cx, child, "an `adapter`", &["target-modules"]),
        }
    }
    r.finish(cx);
    Some(AdapterStage {
        span: cx.span(node.name().span()),
        base: base?,
        method,
        rank,
        alpha,
        dropout,
        rslora,
        target_modules: target_modules.unwrap_or_else(|| DEFAULT_LORA_MODULES.iter().map(|s| s.to_string()).collect()),
        lr,
        epochs: if steps.is_none() { Some(epochs.unwrap_or(3)) } else { None },
        steps,
        base_dtype,
        batch,
        grad_accum,
        warmup,
        schedule,
        weight_decay,
        max_grad_norm,
        prompt_loss_weight,
        seq_len,
        packing,
        seed,
        pool,
    })
}

/// The llama-family projections LoRA can target (Hugging Face module names).
pub const LORA_MODULES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
/// What PEFT adapts for llama when `target_modules` is not given.
pub const DEFAULT_LORA_MODULES: &[&str] = &["q_proj", "v_proj"];

fn quantize(cx: &mut Cx<'_>, node: &KdlNode) -> Option<QuantizeStage> {
    let mut r = NodeReader::new(cx, node, "quantize \"f16\" \"q8_0\" \"q4_0\"");
    let names = r.rest_str(cx, 0, 1, "quantization levels");
    let imatrix = r.int_in(cx, "imatrix", 0, 1_000_000).map(|v| v.value as u32).unwrap_or(32);
    let pool = r.str(cx, "pool");
    r.no_children(cx);
    r.finish(cx);
    let mut levels: Vec<Spanned<QuantLevel>> = Vec::new();
    for n in names {
        match QuantLevel::parse(&n.value) {
            Some(level) => {
                if let Some(first) = levels.iter().find(|l| l.value == level) {
                    cx.push(
                        Diagnostic::new(
                            Code::DuplicateName,
                            n.span,
                            format!("level `{level}` is listed twice"),
                            "listed again",
                        )
                        .with_note(first.span, "first listed here"),
                    );
                } else {
                    levels.push(Spanned::new(level, n.span));
                }
            }
            None => cx.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    n.span,
                    format!("`{}` is not a quantization level", n.value),
                    "unknown level",
                )
                .with_optional_help(suggest::help(
                    &n.value.to_ascii_lowercase(),
                    "level",
                    QuantLevel::ALL.iter().map(|l| l.as_str()),
                )),
            ),
        }
    }
    (!levels.is_empty()).then(|| QuantizeStage { span: cx.span(node.name().span()), levels, imatrix, pool })
}

const GATE_METRICS: &[&str] =
    &["success", "p50-seconds", "p95-seconds", "max-seconds", "expected-attempts", "tokens-per-second"];

/// The stage, and `prompts` when the manifest gives it.
fn benchmark(cx: &mut Cx<'_>, node: &KdlNode) -> (Option<BenchmarkStage>, Option<Spanned<u32>>) {
    let mut r = NodeReader::new(
        cx,
        node,
        "benchmark prompts=50 samples=8 attempts=8 temperature=0.75 top-p=0.9 { gate success=0.8 }",
    );
    let prompts_given = r.int_in(cx, "prompts", 1, 1_000_000).map(|v| v.map(|p| p as u32));
    let prompts = prompts_given.as_ref().map(|p| p.value).unwrap_or(50);
    let samples = r.int_in(cx, "samples", 1, 100_000).map(|v| v.value as u32).unwrap_or(8);
    let attempts = r.int_in(cx, "attempts", 1, 100_000).map(|v| v.value as u32).unwrap_or(8);
    let temperature = r.float_in(cx, "temperature", 0.0, 5.0).map(|v| v.value).unwrap_or(0.75);
    let top_p = r.float_in(cx, "top-p", 0.0, 1.0).map(|v| v.value).unwrap_or(0.9);
    let top_k = r.int_in(cx, "top-k", 1, 1 << 20).map(|v| v.value as u32);
    let max_tokens = r.int_in(cx, "max-tokens", 1, 1 << 20).map(|v| v.value as u32).unwrap_or(256);
    let seed = seed(cx, &mut r);
    let judge = r.str(cx, "judge");
    let pool = r.str(cx, "pool");
    r.finish(cx);
    let mut gates = Vec::new();
    for child in r.child_nodes() {
        match child.name().value() {
            "gate" => {
                let mut c = NodeReader::new(cx, child, "gate success=0.9 p95-seconds=3.4 level=\"q4_0\"");
                let level = c.str(cx, "level").and_then(|l| match QuantLevel::parse(&l.value) {
                    Some(q) => Some(Spanned::new(q, l.span)),
                    None => {
                        cx.push(Diagnostic::new(
                            Code::InvalidValue,
                            l.span,
                            format!("`{}` is not a quantization level", l.value),
                            "unknown level",
                        ));
                        None
                    }
                });
                for metric in GATE_METRICS {
                    if let Some(v) = c.float_in(cx, metric, 0.0, f64::INFINITY) {
                        if *metric == "success" && v.value > 1.0 {
                            cx.push(Diagnostic::new(
                                Code::InvalidValue,
                                v.span,
                                "`success` is a rate between 0 and 1",
                                "out of range",
                            ));
                            continue;
                        }
                        gates.push(Gate {
                            metric: Spanned::new(metric.to_string(), v.span),
                            value: v.value,
                            level: level.clone(),
                        });
                    }
                }
                c.no_children(cx);
                c.finish(cx);
            }
            _ => unknown_node(cx, child, "a `benchmark`", &["gate"]),
        }
    }
    let stage = BenchmarkStage {
        span: cx.span(node.name().span()),
        prompts,
        samples,
        attempts,
        temperature,
        top_p,
        top_k,
        max_tokens,
        seed,
        judge,
        gates,
        pool,
    };
    (Some(stage), prompts_given)
}

fn command(cx: &mut Cx<'_>, node: &KdlNode) -> Option<CommandStage> {
    let mut r = NodeReader::new(
        cx,
        node,
        "command \"STAGE\" { run \"prog\" \"arg\" \"{out}/file\"; inputs \"src/*.txt\"; outputs \"file\" }",
    );
    let name = r.arg_str(cx, 0, "a stage name");
    let stdout = r.str(cx, "stdout");
    let timeout_s = r.float_in(cx, "timeout", 0.001, 1e9).map(|v| v.value);
    let pool = r.str(cx, "pool");
    r.finish(cx);
    if let Some(s) = &stdout {
        check_out_path(cx, s);
    }
    let mut run: Option<Vec<Spanned<String>>> = None;
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut needs = Vec::new();
    let mut env = BTreeMap::new();
    for child in r.child_nodes() {
        let kind = child.name().value();
        let mut c = NodeReader::new(
            cx,
            child,
            "run \"prog\" \"arg\"; inputs \"a\" \"b\"; outputs \"x\"; needs \"stage\"; env NAME=\"value\"",
        );
        match kind {
            "run" => {
                let argv = c.rest_str(cx, 0, 1, "a program and its arguments");
                if run.is_some() {
                    cx.push(
                        Diagnostic::new(
                            Code::DuplicateName,
                            cx.span(child.name().span()),
                            "`run` is given twice",
                            "given again here",
                        )
                        .with_help(
                            "a command stage runs one program; chain programs with `run \"sh\" \"-c\" \"a && b\"`",
                        ),
                    );
                } else if !argv.is_empty() {
                    run = Some(argv);
                }
            }
            "inputs" => {
                for p in c.rest_str(cx, 0, 1, "file patterns") {
                    match glob::normalize("", &p.value) {
                        Ok(_) => inputs.push(p),
                        Err(e) => cx.push(Diagnostic::new(Code::InvalidPath, p.span, e.to_string(), "invalid input")),
                    }
                }
            }
            "outputs" => {
                for p in c.rest_str(cx, 0, 1, "output paths") {
                    if check_out_path(cx, &p) {
                        outputs.push(p);
                    }
                }
            }
            "needs" => needs.extend(c.rest_str(cx, 0, 1, "artifact references")),
            "env" => {
                c.allow_any_props();
                let props = c.other_props(cx);
                if props.is_empty() {
                    cx.push(Diagnostic::new(
                        Code::MissingProperty,
                        cx.span(child.name().span()),
                        "`env` needs NAME=\"value\" pairs",
                        "nothing set",
                    ));
                }
                for (k, v, span) in props {
                    match v.as_string() {
                        Some(s) => {
                            env.insert(k, s.to_string());
                        }
                        None => cx.push(Diagnostic::new(
                            Code::WrongType,
                            span,
                            "environment values are strings",
                            "expected a string",
                        )),
                    }
                }
            }
            _ => {
                unknown_node(cx, child, "a `command`", &["run", "inputs", "outputs", "needs", "env"]);
                continue;
            }
        }
        c.no_children(cx);
        c.finish(cx);
    }
    let name = name?;
    let valid = name.value.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                name.span,
                format!("`{}` is not a valid stage name", name.value),
                "invalid name",
            )
            .with_help("stage names use lowercase letters, digits, `-` and `_`"),
        );
        return None;
    }
    if RESERVED_STAGES.contains(&name.value.as_str()) {
        cx.push(
            Diagnostic::new(
                Code::InvalidValue,
                name.span,
                format!("`{}` is a stage of the ML pipeline", name.value),
                "reserved stage name",
            )
            .with_help("choose another name for this command stage"),
        );
        return None;
    }
    let Some(run) = run else {
        cx.push(
            Diagnostic::new(
                Code::MissingNode,
                name.span,
                format!("command stage `{}` has nothing to run", name.value),
                "no `run`",
            )
            .with_help("add `run \"program\" \"arg\" ...` to its block"),
        );
        return None;
    };
    Some(CommandStage { name, run, inputs, outputs, needs, env, stdout, timeout_s, pool })
}

/// Output paths are relative paths inside the artifact directory.
fn check_out_path(cx: &mut Cx<'_>, p: &Spanned<String>) -> bool {
    let ok = matches!(glob::normalize("", &p.value), Ok(n) if !n.is_empty() && !n.contains(['*', '?', '[']));
    if !ok {
        cx.push(
            Diagnostic::new(
                Code::InvalidPath,
                p.span,
                format!("`{}` is not a path inside `{{out}}`", p.value),
                "invalid output",
            )
            .with_help("outputs are relative paths inside the stage's output directory, e.g. `report.json`"),
        );
    }
    ok
}
