//! The training loop: seeded epochs of (optionally packed) micro-batches, gradient accumulation,
//! clipping, AdamW with a warmup schedule, eval loss every epoch, and checkpoints a killed run
//! resumes from — landing on exactly the weights an uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use forge_manifest::Schedule;
use forge_model::engine::{Engine, Lora, LoraGrads};
use forge_model::{Dropout, Llama, weighted_cross_entropy};
use serde::{Deserialize, Serialize};

use crate::data::{Example, batch, rows, shuffled};
use crate::optim::{AdamW, Moments, clip, lr_at};
use crate::{Result, TrainError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: Option<u32>,
    /// Optimizer steps; overrides `epochs` when given.
    pub steps: Option<u32>,
    pub lr: f64,
    /// Rows per micro-batch.
    pub batch: usize,
    pub grad_accum: usize,
    /// Warmup as a fraction of all optimizer steps.
    pub warmup: f64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub prompt_loss_weight: f32,
    pub seq_len: usize,
    pub packing: bool,
    pub seed: u64,
}

/// What the loop reports to, and asks of, its caller.
pub struct Hooks<'a> {
    pub log: &'a (dyn Fn(&str) + Sync),
    /// (optimizer steps done, total).
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Where checkpoints go; `None` disables them.
    pub checkpoint_dir: Option<PathBuf>,
    /// Wall time between checkpoints (also written at every epoch end and on cancel).
    pub checkpoint_every: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub epoch: u32,
    pub step: usize,
    pub loss: f64,
}

/// The loss curve saved with the artifact.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub train: Vec<StepRecord>,
    pub eval: Vec<EvalRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub curve: Curve,
    pub steps: usize,
    pub epochs: u32,
    /// Real tokens seen (padding excluded), and the training throughput.
    pub tokens: usize,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    /// The step a checkpoint resumed from, if any.
    pub resumed_from: Option<usize>,
}

/// The step plan: micro-batches per epoch and optimizer steps in all.
struct Plan {
    epochs: u32,
    steps_per_epoch: usize,
    total: usize,
    warmup: usize,
}

impl Plan {
    fn new(cfg: &TrainConfig, rows_per_epoch: usize) -> Result<Plan> {
        let micro = rows_per_epoch.div_ceil(cfg.batch.max(1));
        let steps_per_epoch = micro.div_ceil(cfg.grad_accum.max(1));
        if steps_per_epoch == 0 {
            return Err(TrainError::Data("the train split has no usable example".into()));
        }
        let (epochs, total) = match (cfg.steps, cfg.epochs) {
            (Some(s), _) => ((s as usize).div_ceil(steps_per_epoch) as u32, s as usize),
            (None, e) => {
                let e = e.unwrap_or(1);
                (e, e as usize * steps_per_epoch)
            }
        };
        let warmup = (cfg.warmup * total as f64).ceil() as usize;
        Ok(Plan { epochs, steps_per_epoch, total, warmup })
    }
}

/// Everything a resumed run needs besides the weights and moments.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    config: TrainConfig,
    total: usize,
    step: usize,
    tokens: usize,
    train_seconds: f64,
    curve: Curve,
    vars: Vec<String>,
}

fn seed_for(parts: &[&[u8]]) -> u64 {
    forge_rng::hash64(parts)
}

/// How the loop gets a micro-batch's loss and gradients.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    /// candle's autograd on the model: any variables (full fine-tuning, LoRA).
    Autograd,
    /// The LoRA engine over the frozen base (the model's LoRA pairs are the variables).
    Engine(&'a Engine),
}

/// The engine's gradients as tensors, in the order [`forge_model::lora::attach`] returns the
/// variables: per layer, per adapted module, A then B.
pub fn grads_as_tensors(model: &Llama, grads: &LoraGrads) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for (block, layer) in model.layers.iter().zip(grads) {
        for ((_, lin), g) in block.linears().into_iter().zip(layer) {
            if let (Some(p), Some((da, db))) = (&lin.lora, g) {
                out.push(Tensor::from_slice(da, p.a.shape(), p.a.device())?.to_dtype(p.a.dtype())?);
                out.push(Tensor::from_slice(db, p.b.shape(), p.b.device())?.to_dtype(p.b.dtype())?);
            }
        }
    }
    Ok(out)
}

impl Backend<'_> {
    /// The weighted mean loss of a micro-batch and the gradient of every variable.
    fn step(
        &self,
        model: &Llama,
        vars: &[(String, Var)],
        b: &crate::data::Batch,
        dropout: &Dropout,
    ) -> Result<(f64, Vec<Tensor>)> {
        match self {
            Backend::Autograd => {
                let logits = model.forward(&b.ids_tensor(model.device())?, &b.layout, dropout)?;
                let logits = logits.reshape((b.targets.len(), model.cfg.vocab))?;
                let (loss, _) = weighted_cross_entropy(&logits, &b.targets, &b.weights)?;
                let grads = loss.backward()?;
                let g = vars
                    .iter()
                    .map(|(name, v)| {
                        grads.get(v.as_tensor()).cloned().ok_or_else(|| TrainError::NoGradient(name.clone()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((scalar(&loss)?, g))
            }
            Backend::Engine(e) => {
                let (loss, grads) = e.loss_and_grads(&Lora::of(model)?, &b.engine(), dropout)?;
                let g = grads_as_tensors(model, &grads)?;
                if g.len() != vars.len() {
                    return Err(TrainError::Data(format!(
                        "the engine has {} gradients for {} variables",
                        g.len(),
                        vars.len()
                    )));
                }
                Ok((loss, g))
            }
        }
    }

    /// A micro-batch's weighted loss sum and total weight (no dropout, no gradient).
    fn loss(&self, model: &Llama, b: &crate::data::Batch) -> Result<(f64, f64)> {
        match self {
            Backend::Autograd => {
                let logits = model.forward(&b.ids_tensor(model.device())?, &b.layout, &Dropout::off())?.detach();
                let logits = logits.reshape((b.targets.len(), model.cfg.vocab))?;
                let (loss, w) = weighted_cross_entropy(&logits, &b.targets, &b.weights)?;
                Ok((scalar(&loss)? * w, w))
            }
            Backend::Engine(e) => Ok(e.loss(&Lora::of(model)?, &b.engine())?),
        }
    }
}

/// The weighted mean loss of `examples` (no dropout, no gradient).
pub fn evaluate(model: &Llama, backend: Backend<'_>, examples: &[Example], cfg: &TrainConfig, pad: u32) -> Result<f64> {
    let order: Vec<usize> = (0..examples.len()).collect();
    let all = rows(examples, &order, cfg.seq_len, cfg.packing);
    let (mut sum, mut weight) = (0f64, 0f64);
    for chunk in all.chunks(cfg.batch.max(1)) {
        let b = batch(examples, chunk, cfg.prompt_loss_weight, pad)?;
        let (s, w) = backend.loss(model, &b)?;
        sum += s;
        weight += w;
    }
    Ok(if weight > 0.0 { sum / weight } else { f64::NAN })
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Trains `vars` (variables inside `model`) on `train`, evaluating on `eval` after every epoch.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &Llama,
    backend: Backend<'_>,
    vars: &[(String, Var)],
    train: &[Example],
    eval: &[Example],
    pad: u32,
    cfg: &TrainConfig,
    hooks: &Hooks<'_>,
) -> Result<Report> {
    let device = model.device().clone();
    let epoch_rows = |epoch: u32| {
        let order = shuffled(train.len(), seed_for(&[&cfg.seed.to_le_bytes(), &epoch.to_le_bytes(), b"order"]));
        rows(train, &order, cfg.seq_len, cfg.packing)
    };
    let plan = Plan::new(cfg, epoch_rows(0).len())?;
    let mut opt = AdamW::new(vars, cfg.weight_decay)?;
    let mut curve = Curve::default();
    let (mut step, mut tokens, mut train_seconds) = (0usize, 0usize, 0f64);
    let mut resumed_from = None;
    if let Some(dir) = &hooks.checkpoint_dir
        && let Some(state) = load_checkpoint(dir, cfg, plan.total, vars, &mut opt, &device)?
    {
        (hooks.log)(&format!("resuming from the checkpoint at step {} of {}", state.step, plan.total));
        step = state.step;
        tokens = state.tokens;
        train_seconds = state.train_seconds;
        curve = state.curve;
        resumed_from = Some(step);
    }
    (hooks.log)(&format!(
        "training {} variables ({} parameters) for {} steps: {} epochs of {} steps, {} rows per micro-batch, {} micro-batches per step",
        vars.len(),
        vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        plan.total,
        plan.epochs,
        plan.steps_per_epoch,
        cfg.batch,
        cfg.grad_accum
    ));
    let mut last_checkpoint = Instant::now();
    let save = |step: usize, tokens: usize, secs: f64, curve: &Curve, opt: &AdamW| -> Result<()> {
        if let Some(dir) = &hooks.checkpoint_dir {
            let state = CheckpointState {
                config: cfg.clone(),
                total: plan.total,
                step,
                tokens,
                train_seconds: secs,
                curve: curve.clone(),
                vars: vars.iter().map(|(n, _)| n.clone()).collect(),
            };
            save_checkpoint(dir, &state, vars, opt)?;
        }
        Ok(())
    };
    while step < plan.total {
        let epoch = (step / plan.steps_per_epoch) as u32;
        let all_rows = epoch_rows(epoch);
        let micro: Vec<&[crate::data::Row]> = all_rows.chunks(cfg.batch.max(1)).collect();
        let first = (step % plan.steps_per_epoch) * cfg.grad_accum;
        let group = &micro[first..(first + cfg.grad_accum).min(micro.len())];
        let started = Instant::now();
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut step_tokens) = (0f64, 0usize);
        for (k, rows) in group.iter().enumerate() {
            let b = batch(train, rows, cfg.prompt_loss_weight, pad)?;
            let dropout = Dropout::seeded(seed_for(&[
                &cfg.seed.to_le_bytes(),
                &(step as u64).to_le_bytes(),
                &(k as u64).to_le_bytes(),
                b"dropout",
            ]));
            let (loss, grads) = backend.step(model, vars, &b, &dropout)?;
            loss_sum += loss;
            step_tokens += b.tokens;
            for (i, g) in grads.into_iter().enumerate() {
                sums[i] = Some(match sums[i].take() {
                    None => g,
                    Some(s) => (s + g)?,
                });
            }
        }
        let n = group.len() as f64;
        let mut grads: Vec<Tensor> =
            sums.into_iter().map(|s| Ok((s.expect("every variable has a gradient") / n)?)).collect::<Result<_>>()?;
        let loss = loss_sum / n;
        if !loss.is_finite() {
            return Err(TrainError::Diverged(format!("the loss is {loss} at step {step}")));
        }
        let grad_norm = clip(&mut grads, cfg.max_grad_norm)?;
        let lr = lr_at(cfg.schedule, cfg.lr, step, plan.warmup, plan.total);
        opt.update(vars, &grads, lr)?;
        train_seconds += started.elapsed().as_secs_f64();
        tokens += step_tokens;
        curve.train.push(StepRecord {
            step,
            epoch: step as f64 / plan.steps_per_epoch as f64,
            loss,
            lr,
            grad_norm,
            tokens: step_tokens,
        });
        step += 1;
        (hooks.progress)(step as u64, plan.total as u64);
        if step % 10 == 0 || step == plan.total {
            (hooks.log)(&format!(
                "step {step}/{}: loss {loss:.4}, lr {lr:.2e}, grad norm {grad_norm:.3}, {:.0} tokens/s",
                plan.total,
                tokens as f64 / train_seconds.max(1e-9)
            ));
        }
        let epoch_done = step % plan.steps_per_epoch == 0 || step == plan.total;
        if epoch_done && !eval.is_empty() {
            let loss = evaluate(model, backend, eval, cfg, pad)?;
            (hooks.log)(&format!("epoch {}: eval loss {loss:.4}", epoch + 1));
            curve.eval.push(EvalRecord { epoch: epoch + 1, step, loss });
        }
        let cancelled = (hooks.cancelled)();
        if step < plan.total && (epoch_done || cancelled || last_checkpoint.elapsed() >= hooks.checkpoint_every) {
            save(step, tokens, train_seconds, &curve, &opt)?;
            last_checkpoint = Instant::now();
        }
        if cancelled && step < plan.total {
            return Err(TrainError::Cancelled);
        }
    }
    Ok(Report {
        curve,
        steps: plan.total,
        epochs: plan.epochs,
        tokens,
        train_seconds,
        tokens_per_second: tokens as f64 / train_seconds.max(1e-9),
        resumed_from,
    })
}

fn save_checkpoint(dir: &Path, state: &CheckpointState, vars: &[(String, Var)], opt: &AdamW) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let params: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    forge_model::io::write_safetensors(&tmp.join("params.safetensors"), &params)?;
    let mut moments = Vec::new();
    for ((n, _), m) in vars.iter().zip(&opt.moments) {
        moments.push((format!("{n}#m"), m.m.clone()));
        moments.push((format!("{n}#v"), m.v.clone()));
    }
    forge_model::io::write_safetensors(&tmp.join("moments.safetensors"), &moments)?;
    let text = serde_json::to_string(state).expect("serializes");
    std::fs::write(tmp.join("state.json"), text).map_err(|e| TrainError::io(&tmp, e))?;
    // The old checkpoint is replaced only by a complete new one.
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))
}

/// Restores a checkpoint written for this exact configuration; anything else is ignored
/// (and reported by the caller as a fresh start).
fn load_checkpoint(
    dir: &Path,
    cfg: &TrainConfig,
    total: usize,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    device: &Device,
) -> Result<Option<CheckpointState>> {
    let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else { return Ok(None) };
    let Ok(state) = serde_json::from_str::<CheckpointState>(&text) else { return Ok(None) };
    let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    if state.config != *cfg || state.total != total || state.vars != names {
        return Ok(None);
    }
    let params = forge_model::io::read_safetensors(&dir.join("params.safetensors"), device)?;
    let moments = forge_model::io::read_safetensors(&dir.join("moments.safetensors"), device)?;
    for (i, (n, v)) in vars.iter().enumerate() {
        let get = |k: &str| moments.get(k).cloned().ok_or_else(|| TrainError::Data(format!("checkpoint lacks {k}")));
        let p = params.get(n).ok_or_else(|| TrainError::Data(format!("checkpoint lacks {n}")))?;
        v.set(&p.to_dtype(v.dtype())?)?;
        opt.moments[i] = Moments {
            m: get(&format!("{n}#m"))?.to_dtype(v.dtype())?,
            v: get(&format!("{n}#v"))?.to_dtype(v.dtype())?,
        };
    }
    opt.step = state.step;
    Ok(Some(state))
}
