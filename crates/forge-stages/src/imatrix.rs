//! The `imatrix` stage: the importance matrix the quantized levels are made with.
//!
//! `TARGET:imatrix` runs the merged model over the first `imatrix` train samples (the student's
//! prompt and the teacher's answer, as at training) and sums the squares of every linear layer's
//! inputs, column by column, over their tokens — what llama.cpp's `llama-imatrix` computes over a
//! calibration text — and writes them as `imatrix.gguf` in llama.cpp's format (so
//! `llama-quantize --imatrix` can use it too). A quantizer then spends its precision where the
//! model's inputs are large: for a model trained on one narrow task, its own task's data is the
//! right calibration.

use std::collections::BTreeMap;

use forge_gguf::imatrix::Entry;
use forge_manifest::{ArtifactDecl, Manifest, StageKind};
use forge_model::engine::{BaseDtype, Engine, InputSums};
use forge_plan::{ActionContext, ActionError, Executor, StagePlan};
use serde_json::json;

use crate::train::{read_split, tokenize};
use forge_train::data::{Row, batch, rows};

/// Bumped when what the stage writes changes.
pub const IMATRIX_FORMAT: u32 = 1;

/// Rows per forward pass.
const BATCH: usize = 4;

pub struct ImatrixExecutor;

fn quantize_stage<'m>(m: &'m Manifest, decl: &ArtifactDecl) -> &'m forge_manifest::QuantizeStage {
    let model = m.target_of(decl).model.as_ref().expect("imatrix stages belong to models");
    model.quantize.as_ref().expect("validated: the model has a quantize block")
}

impl Executor for ImatrixExecutor {
    fn kind(&self) -> &'static str {
        "imatrix"
    }

    fn format_version(&self) -> u32 {
        IMATRIX_FORMAT
    }

    fn plan(&self, m: &Manifest, decl: &ArtifactDecl) -> StagePlan {
        assert_eq!(decl.kind, StageKind::Imatrix);
        let q = quantize_stage(m, decl);
        let model = m.target_of(decl).model.as_ref().expect("a model");
        let a = model.adapter.as_ref().expect("validated: an adapter");
        let mut params = BTreeMap::new();
        params.insert("samples".into(), json!(q.imatrix));
        // The student's format: the same examples as training, cut at the same length.
        params.insert("seq-len".into(), json!(a.seq_len));
        StagePlan { params, inputs: Vec::new(), tools: BTreeMap::new() }
    }

    fn run(&self, ctx: &ActionContext<'_>) -> Result<(), ActionError> {
        let q = quantize_stage(ctx.manifest, ctx.decl);
        let a = ctx.manifest.target_of(ctx.decl).model.as_ref().and_then(|m| m.adapter.as_ref()).expect("an adapter");
        let merged = ctx.dep_of(StageKind::Merged)?;
        let dataset = ctx.dep_of(StageKind::Dataset)?;
        let (model, tok) =
            forge_model::io::load_hf(&merged, &candle_core::Device::Cpu).map_err(ActionError::from_error)?;
        let samples = read_split(&dataset, "train")?;
        let take = &samples[..samples.len().min(q.imatrix as usize)];
        let seq_len = (a.seq_len as usize).min(model.cfg.max_positions);
        let examples = tokenize(&tok, take, seq_len, ctx.log, "calibration")?;
        // Statistics of the activations, not of the last bits: bf16 weights do.
        let engine = Engine::new(&model, BaseDtype::Bf16).map_err(ActionError::from_error)?;
        let pad = tok.pad.as_ref().or(tok.eos.as_ref()).map(|p| p.1).unwrap_or(0);
        let order: Vec<usize> = (0..examples.len()).collect();
        let all: Vec<Row> = rows(&examples, &order, seq_len, false);
        let mut sums = InputSums::default();
        let total = all.len().div_ceil(BATCH) as u64;
        for (i, chunk) in all.chunks(BATCH).enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(ActionError::Cancelled);
            }
            let b = batch(&examples, chunk, 1.0, pad).map_err(ActionError::from_error)?;
            engine.input_sums(&b.engine(), &mut sums).map_err(ActionError::from_error)?;
            (ctx.progress)(i as u64 + 1, total, "batches");
        }
        let cfg = &model.cfg;
        let mut entries = Vec::new();
        for (l, layer) in sums.layers.iter().enumerate() {
            for (m, name) in
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].iter().enumerate()
            {
                let hf = format!("{}.weight", forge_model::llama::module_path(l, name));
                let gguf = forge_gguf::convert::gguf_name(cfg.arch, &hf).expect("a linear layer has a GGUF name");
                entries.push(Entry {
                    name: gguf,
                    sums: layer[InputSums::input_of(m)].clone(),
                    count: sums.tokens as u64,
                });
            }
        }
        let head = if cfg.tie_embeddings { "token_embd.weight" } else { "output.weight" };
        entries.push(Entry { name: head.to_string(), sums: sums.head.clone(), count: sums.tokens as u64 });
        let path = ctx.out_dir.join(crate::gguf::IMATRIX_FILE);
        let source = format!("{} (train, first {})", dep_name(ctx), take.len());
        forge_gguf::imatrix::write(&path, &entries, &[source], examples.len() as u32)
            .map_err(ActionError::from_error)?;
        ctx.log.line(&format!(
            "importance matrix of {} weights from {} tokens of {} train samples",
            entries.len(),
            sums.tokens,
            take.len()
        ));
        Ok(())
    }
}

fn dep_name(ctx: &ActionContext<'_>) -> String {
    format!("{}:dataset", ctx.artifact.target)
}
