//! The `adapter` and `merged` stages.
//!
//! `TARGET:adapter` trains on the dataset's train split (evaluating on its eval split every
//! epoch) and writes, for `method="lora"`, a Hugging Face PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`); for `method="full"`, a whole Hugging Face model folder. Both
//! come with the tokenizer files and `loss.json` (the loss curve). A `scratch` base is created
//! here — a byte-level BPE trained on the train split, a llama initialised from the base's seed —
//! and shipped in `base/` so that the adapter can be loaded without forge.
//!
//! `TARGET:merged` folds the adapter into its base (`W + s·B·A`) and writes a Hugging Face
//! folder: `config.json`, `generation_config.json`, `model.safetensors`, tokenizer files.
//!
//! A `gguf` base (a workspace file, or the fetched artifact `base:NAME`) is dequantized to f32 for
//! training and merging; its tokenizer comes from the file, and the file's own `tokenizer.*`
//! metadata travels with the adapter and the merged model as `tokenizer.gguf` (a GGUF file of
//! metadata only), so the `gguf` stages write back exactly the tokenizer llama.cpp read.
//!
//! The artifacts hold nothing that varies between identical runs (timings go to the log), so a
//! retrained adapter that comes out bit-identical keeps everything downstream fresh.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Var};
use forge_manifest::{AdapterStage, ArtifactDecl, BaseKind, GgufBase, Manifest, StageKind, TrainMethod};
use forge_model::lora::{self, LoraSpec};
use forge_model::{Arch, Llama, ModelConfig, ScratchShape, Tokenizer};
use forge_plan::{ActionContext, ActionError, Executor, StagePlan};
use serde_json::{Value, json};

use forge_train::data::{Example, example};
use forge_train::train::{Backend, Hooks, TrainConfig, train};

/// Bumped when the adapter artifact's files change shape.
pub const ADAPTER_FORMAT: u32 = 2;
pub const MERGED_FORMAT: u32 = 3;

pub use crate::gguf::GGUF_TOKENIZER;
/// Which base an adapter was trained on, when PEFT's `base_model_name_or_path` cannot say
/// (a GGUF base): `{"kind": "gguf", "base": NAME, "file": PATH-or-null, "sha256": ...}`.
pub const BASE_INFO: &str = "forge-base.json";

pub struct AdapterExecutor;
pub struct MergedExecutor;

fn adapter_stage<'m>(m: &'m Manifest, decl: &ArtifactDecl) -> &'m AdapterStage {
    let model = m.target_of(decl).model.as_ref().expect("adapter stages belong to models");
    model.adapter.as_ref().expect("validated: the model has an adapter block")
}

fn base_of<'m>(m: &'m Manifest, a: &AdapterStage) -> &'m forge_manifest::Base {
    m.bases.get(&a.base.value).expect("validated: the base exists")
}

/// What shapes the base: its kind and parameters (an `hf` base's files are inputs too).
fn base_params(m: &Manifest, a: &AdapterStage) -> (Value, Vec<String>) {
    let base = base_of(m, a);
    match &base.kind {
        BaseKind::Scratch(s) => (json!({ "kind": "scratch", "scratch": s }), Vec::new()),
        BaseKind::Hf { path } => {
            let p = forge_manifest::glob::normalize("", &path.value).unwrap_or_else(|_| path.value.clone());
            (json!({ "kind": "hf", "path": p }), vec![p])
        }
        // A fetched file is an upstream artifact (its content is in the key); a workspace
        // file is an input.
        BaseKind::Gguf(g) => {
            let path = g
                .path
                .as_ref()
                .map(|p| forge_manifest::glob::normalize("", &p.value).unwrap_or_else(|_| p.value.clone()));
            let params = json!({
                "kind": "gguf",
                "path": path,
                "sha256": g.sha256.as_ref().map(|s| s.value.clone()),
                "chat-template": g.chat_template.as_ref().map(|t| t.value.clone()),
            });
            (params, path.into_iter().collect())
        }
    }
}

pub use crate::gguf::gguf_base_file;

pub fn train_config(a: &AdapterStage) -> TrainConfig {
    TrainConfig {
        epochs: a.epochs,
        steps: a.steps,
        lr: a.lr,
        batch: a.batch as usize,
        grad_accum: a.grad_accum as usize,
        warmup: a.warmup,
        schedule: a.schedule,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        prompt_loss_weight: a.prompt_loss_weight as f32,
        seq_len: a.seq_len as usize,
        packing: a.packing,
        seed: a.seed,
    }
}

pub fn lora_spec(a: &AdapterStage) -> LoraSpec {
    LoraSpec {
        rank: a.rank as usize,
        alpha: a.alpha,
        dropout: a.dropout,
        rslora: a.rslora,
        targets: a.target_modules.clone(),
    }
}

/// The config of a scratch llama whose vocabulary is the trained tokenizer's.
pub fn scratch_config(s: &forge_manifest::ScratchBase, tok: &Tokenizer) -> ModelConfig {
    let shape = ScratchShape {
        layers: s.layers as usize,
        hidden: s.hidden as usize,
        heads: s.heads as usize,
        kv_heads: s.kv_heads as usize,
        ffn: s.ffn as usize,
        context: s.context as usize,
        rope_theta: s.rope_theta,
    };
    ModelConfig::scratch(&shape, tok)
}

/// Reads a dataset artifact's split.
pub(crate) fn read_split(dir: &Path, split: &str) -> Result<Vec<forge_data::Sample>, ActionError> {
    forge_data::read_samples(&dir.join(format!("{split}.jsonl"))).map_err(ActionError::from_error)
}

/// A GGUF base and its tokenizer (with the manifest's chat template, or Gemma's when a Gemma
/// base model has none).
pub fn load_gguf_base(file: &Path, g: &GgufBase) -> Result<(Llama, Tokenizer), String> {
    let (model, mut tok) = forge_gguf::load::open_base(file).map_err(|e| e.to_string())?;
    if let Some(t) = &g.chat_template {
        tok.chat_template = Some(t.value.clone());
    } else if tok.chat_template.is_none() && model.cfg.arch == Arch::Gemma3 {
        tok.chat_template = Some(forge_model::tokenizer::GEMMA_CHAT_TEMPLATE.to_string());
    }
    Ok((model, tok))
}

/// The base model and tokenizer, ready to train.
fn prepare_base(
    ctx: &ActionContext<'_>,
    a: &AdapterStage,
    train: &[forge_data::Sample],
) -> Result<(Llama, Tokenizer), ActionError> {
    match &base_of(ctx.manifest, a).kind {
        BaseKind::Gguf(g) => {
            let file = gguf_base_file(ctx.manifest, &a.base.value, g, ctx.workspace, ctx.deps)?;
            let (model, tok) =
                load_gguf_base(&file, g).map_err(|e| ActionError::msg(format!("base `{}`: {e}", a.base.value)))?;
            ctx.log.line(&format!(
                "loaded base `{}`: {} ({} layers, hidden {}, {} parameters)",
                a.base.value,
                model.cfg.arch.hf_class(),
                model.cfg.layers,
                model.cfg.hidden,
                model.cfg.parameter_count()
            ));
            Ok((model, tok))
        }
        BaseKind::Scratch(s) => {
            let texts = train.iter().flat_map(|s| [s.input.clone(), s.output.clone()]).collect::<Vec<_>>();
            let tok = Tokenizer::train_bpe(texts.into_iter(), s.vocab as usize).map_err(ActionError::from_error)?;
            ctx.log.line(&format!("trained a byte-level BPE of {} tokens on the train split", tok.vocab_size()));
            let cfg = scratch_config(s, &tok);
            let model = Llama::random(cfg, s.seed, &Device::Cpu).map_err(ActionError::from_error)?;
            ctx.log.line(&format!("initialised a scratch llama of {} parameters", model.cfg.parameter_count()));
            Ok((model, tok))
        }
        BaseKind::Hf { path } => {
            let dir = ctx.workspace.join(&path.value);
            let (model, tok) = forge_model::io::load_hf(&dir, &Device::Cpu)
                .map_err(|e| ActionError::msg(format!("base `{}` ({}): {e}", a.base.value, path.value)))?;
            ctx.log.line(&format!("loaded {} ({} parameters)", path.value, model.cfg.parameter_count()));
            Ok((model, tok))
        }
    }
}

pub(crate) fn tokenize(
    tok: &Tokenizer,
    samples: &[forge_data::Sample],
    seq_len: usize,
    log: &forge_plan::Log,
    split: &str,
) -> Result<Vec<Example>, ActionError> {
    let mut out = Vec::with_capacity(samples.len());
    let mut truncated = 0;
    for s in samples {
        match example(tok, &s.input, &s.output, seq_len).map_err(ActionError::from_error)? {
            Some(e) => {
                if e.ids.len() == seq_len {
                    truncated += 1;
                }
                out.push(e);
            }
            None => log.line(&format!("{split}: skipped {}: its prompt alone fills seq-len {seq_len}", s.id)),
        }
    }
    let tokens: usize = out.iter().map(|e| e.ids.len()).sum();
    log.line(&format!(
        "{split}: {} examples, {tokens} tokens ({:.0} per example), {truncated} cut at seq-len {seq_len}",
        out.len(),
        tokens as f64 / out.len().max(1) as f64
    ));
    Ok(out)
}

impl Executor for AdapterExecutor {
    fn kind(&self) -> &'static str {
        "adapter"
    }

    fn format_version(&self) -> u32 {
        ADAPTER_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        assert_eq!(decl.kind, StageKind::Adapter);
        let a = adapter_stage(m, decl);
        let mut params = BTreeMap::new();
        let mut stage = serde_json::to_value(a).expect("serializes");
        // The pool decides when the action runs, not what it makes.
        stage.as_object_mut().expect("an object").remove("pool");
        params.insert("adapter".into(), stage);
        let (base, inputs) = base_params(m, a);
        params.insert("base".into(), base);
        StagePlan { params, inputs, tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let a = adapter_stage(ctx.manifest, ctx.decl);
        let dataset = ctx.dep_of(StageKind::Dataset)?;
        let train_samples = read_split(&dataset, "train")?;
        let eval_samples = read_split(&dataset, "eval")?;
        let (mut model, tok) = prepare_base(ctx, a, &train_samples)?;
        let cfg = train_config(a);
        let seq_len = cfg.seq_len.min(model.cfg.max_positions);
        let train_ex = tokenize(&tok, &train_samples, seq_len, ctx.log, "train")?;
        let eval_ex = tokenize(&tok, &eval_samples, seq_len, ctx.log, "eval")?;
        prompts_fit(ctx, &tok, model.cfg.max_positions, &eval_samples)?;
        let pad = tok.pad.as_ref().or(tok.eos.as_ref()).map(|p| p.1).unwrap_or(0);
        let vars: Vec<(String, Var)> = match a.method {
            TrainMethod::Lora => lora::attach(&mut model, &lora_spec(a), a.seed).map_err(ActionError::from_error)?,
            TrainMethod::Full => {
                let (trainable, vars) = model.trainable().map_err(ActionError::from_error)?;
                model = trainable;
                vars
            }
        };
        let log = |line: &str| ctx.log.line(line);
        let progress = |done: u64, total: u64| (ctx.progress)(done, total, "steps");
        let cancelled = || ctx.cancel.is_cancelled();
        let hooks = Hooks {
            log: &log,
            progress: &progress,
            cancelled: &cancelled,
            checkpoint_dir: Some(ctx.work_dir().join("checkpoint")),
            checkpoint_every: Duration::from_secs(60),
        };
        let cfg = TrainConfig { seq_len, ..cfg };
        // LoRA trains on the engine over the frozen base (kept in `base-dtype`); full
        // fine-tuning on candle's autograd.
        let engine = match a.method {
            TrainMethod::Lora => {
                let dtype = match a.base_dtype {
                    forge_manifest::BaseDtype::F32 => forge_model::engine::BaseDtype::F32,
                    forge_manifest::BaseDtype::Bf16 => forge_model::engine::BaseDtype::Bf16,
                };
                let e = forge_model::engine::Engine::new(&model, dtype).map_err(ActionError::from_error)?;
                // The engine has its own copy of the frozen weights; a scratch base is written
                // out first (it ships with the adapter), then the model keeps only its pairs.
                if let BaseKind::Scratch(_) = &base_of(ctx.manifest, a).kind {
                    save_scratch_base(ctx.out_dir, &model, &tok)?;
                }
                model.release_frozen().map_err(ActionError::from_error)?;
                ctx.log.line(&format!(
                    "frozen base in {}: {:.0} MiB{}",
                    a.base_dtype.as_str(),
                    e.bytes() as f64 / (1 << 20) as f64,
                    if dtype == forge_model::engine::BaseDtype::Bf16 && !forge_model::engine::gemm::has_bf16() {
                        " (this CPU has no AVX512-BF16: the bf16 products run in f32)"
                    } else {
                        ""
                    }
                ));
                Some(e)
            }
            TrainMethod::Full => None,
        };
        let backend = engine.as_ref().map_or(Backend::Autograd, Backend::Engine);
        let report = train(&model, backend, &vars, &train_ex, &eval_ex, pad, &cfg, &hooks).map_err(|e| match e {
            forge_train::TrainError::Cancelled => ActionError::Cancelled,
            other => ActionError::msg(other),
        })?;
        ctx.log.line(&format!(
            "trained {} steps on {} tokens in {:.1}s: {:.0} tokens/s",
            report.steps, report.tokens, report.train_seconds, report.tokens_per_second
        ));
        let out = ctx.out_dir;
        match a.method {
            TrainMethod::Lora => {
                let base_name = match &base_of(ctx.manifest, a).kind {
                    // Written before training (see above).
                    BaseKind::Scratch(_) => "base".to_string(),
                    BaseKind::Hf { path } => path.value.clone(),
                    BaseKind::Gguf(g) => {
                        let file = gguf_base_file(ctx.manifest, &a.base.value, g, ctx.workspace, ctx.deps)?;
                        write_gguf_base_info(out, &a.base.value, g, &file, &tok)?;
                        a.base.value.clone()
                    }
                };
                let tensors: Vec<(String, candle_core::Tensor)> =
                    vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
                lora::save_peft(out, &lora_spec(a), &base_name, &tensors).map_err(ActionError::from_error)?;
                tok.save(out).map_err(ActionError::from_error)?;
            }
            TrainMethod::Full => forge_model::io::save_hf(out, &model, &tok).map_err(ActionError::from_error)?,
        }
        let curve = serde_json::to_string_pretty(&report.curve).expect("serializes") + "\n";
        std::fs::write(out.join("loss.json"), curve).map_err(|e| ActionError::io(&out.join("loss.json"), e))?;
        let _ = std::fs::remove_dir_all(ctx.work_dir());
        Ok(())
    }
}

/// Writes what the adapter of a GGUF base needs to find it again and to write its tokenizer
/// back: [`BASE_INFO`] and [`GGUF_TOKENIZER`].
/// The benchmark prompts the student will be given must fit its context with room for an
/// answer: found out here, before training, not after it (a scratch base's context is checked
/// by `forge check`; a GGUF base's is in its file).
fn prompts_fit(
    ctx: &ActionContext<'_>,
    tok: &Tokenizer,
    context: usize,
    eval: &[forge_data::Sample],
) -> Result<(), ActionError> {
    let model = ctx.manifest.target_of(ctx.decl).model.as_ref();
    let Some(b) = model.and_then(|m| m.benchmark.as_ref()) else { return Ok(()) };
    for s in eval.iter().take(b.prompts as usize) {
        let ids = tok.prompt(None, &s.input).and_then(|p| tok.encode_prompt(&p)).map_err(ActionError::from_error)?;
        if ids.len() + 1 > context {
            return Err(ActionError::msg(format!(
                "eval sample {} is a prompt of {} tokens, but the base's context holds {context}: the benchmark could not \
                 give it to the model (shorten the recipe's `input`, or use a base with a longer context)",
                s.id,
                ids.len()
            )));
        }
    }
    Ok(())
}

fn write_gguf_base_info(out: &Path, name: &str, g: &GgufBase, file: &Path, tok: &Tokenizer) -> Result<(), ActionError> {
    let info = json!({
        "kind": "gguf",
        "base": name,
        "file": g.path.as_ref().map(|p| p.value.clone()),
        "sha256": g.sha256.as_ref().map(|s| s.value.clone()),
    });
    let path = out.join(BASE_INFO);
    std::fs::write(&path, serde_json::to_string_pretty(&info).expect("serializes") + "\n")
        .map_err(|e| ActionError::io(&path, e))?;
    forge_gguf::convert::write_tokenizer_file(file, &out.join(GGUF_TOKENIZER), tok.chat_template.as_deref())
        .map_err(ActionError::from_error)
}

/// Where a LoRA adapter's base is, when it is not named by `base_model_name_or_path` alone.
pub enum BaseFile<'a> {
    /// The caller has no GGUF base file at hand (it is an error to need one).
    None,
    /// The GGUF file the adapter was trained on.
    Gguf(&'a Path),
}

/// Reads an adapter's [`BASE_INFO`], if it has one: the base's name in the manifest.
pub fn gguf_base_name(adapter_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(adapter_dir.join(BASE_INFO)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("base").and_then(Value::as_str).map(str::to_string)
}

/// Writes the untrained scratch base beside its adapter (it exists nowhere else).
fn save_scratch_base(out: &Path, model: &Llama, tok: &Tokenizer) -> Result<(), ActionError> {
    let mut plain = model.clone();
    for b in plain.layers.iter_mut() {
        for (_, l) in b.linears_mut() {
            l.lora = None;
        }
    }
    forge_model::io::save_hf(&out.join("base"), &plain, tok).map_err(ActionError::from_error)
}

/// Loads what an adapter artifact describes as one model: a LoRA adapter on its base, or a
/// fully fine-tuned model. `workspace` resolves an `hf` base's path; `base` gives a GGUF
/// base's file.
pub fn load_adapted(adapter_dir: &Path, workspace: &Path, base: BaseFile<'_>) -> Result<(Llama, Tokenizer), String> {
    if adapter_dir.join("adapter_config.json").is_file() {
        let (spec, tensors) = lora::load_peft(adapter_dir).map_err(|e| e.to_string())?;
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let name = cfg.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("base");
        let mut model = if let Some(gguf) = gguf_base_name(adapter_dir) {
            let BaseFile::Gguf(file) = base else {
                return Err(format!("the adapter's base `{gguf}` is a GGUF file, and none was given"));
            };
            forge_gguf::load::open_model(file, None).map_err(|e| format!("the adapter's base `{gguf}`: {e}"))?
        } else {
            let base_dir = if name == "base" { adapter_dir.join("base") } else { workspace.join(name) };
            forge_model::io::load_hf(&base_dir, &Device::Cpu)
                .map_err(|e| format!("the adapter's base {}: {e}", base_dir.display()))?
                .0
        };
        lora::install(&mut model, &spec, &tensors).map_err(|e| e.to_string())?;
        let tok = Tokenizer::load(adapter_dir).map_err(|e| e.to_string())?;
        Ok((model, tok))
    } else {
        forge_model::io::load_hf(adapter_dir, &Device::Cpu).map_err(|e| e.to_string())
    }
}

impl Executor for MergedExecutor {
    fn kind(&self) -> &'static str {
        "merged"
    }

    fn format_version(&self) -> u32 {
        MERGED_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        assert_eq!(decl.kind, StageKind::Merged);
        let a = adapter_stage(m, decl);
        // The adapter's content covers everything else; an hf base is read again here.
        let (base, inputs) = base_params(m, a);
        let mut params = BTreeMap::new();
        params.insert("base".into(), base);
        StagePlan { params, inputs, tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let a = adapter_stage(ctx.manifest, ctx.decl);
        let adapter = ctx.dep_of(StageKind::Adapter)?;
        let file = match &base_of(ctx.manifest, a).kind {
            BaseKind::Gguf(g) => Some(gguf_base_file(ctx.manifest, &a.base.value, g, ctx.workspace, ctx.deps)?),
            _ => None,
        };
        let base = file.as_deref().map_or(BaseFile::None, BaseFile::Gguf);
        let (model, tok) = load_adapted(&adapter, ctx.workspace, base).map_err(ActionError::msg)?;
        let merged = lora::merge(&model).map_err(ActionError::from_error)?;
        forge_model::io::save_hf(ctx.out_dir, &merged, &tok).map_err(ActionError::from_error)?;
        let gguf_tok = adapter.join(GGUF_TOKENIZER);
        if gguf_tok.is_file() {
            let to = ctx.out_dir.join(GGUF_TOKENIZER);
            std::fs::copy(&gguf_tok, &to).map_err(|e| ActionError::io(&to, e))?;
        }
        ctx.log.line(&format!("merged model: {} parameters", merged.cfg.parameter_count()));
        Ok(())
    }
}
