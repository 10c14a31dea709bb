//! Training on forge's decoder: a tiny model overfits eight samples, and a run interrupted
//! mid-way resumes from its checkpoint to exactly the weights of an uninterrupted run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use candle_core::{Device, Var};
use forge_manifest::Schedule;
use forge_model::engine::{BaseDtype, Engine};
use forge_model::lora::{self, LoraSpec};
use forge_model::{Llama, ModelConfig, ScratchShape, Tokenizer};
use forge_train::data::{Example, example};
use forge_train::train::Backend;
use forge_train::{Hooks, TrainConfig, train};

const POSTERS: [(&str, &str); 8] = [
    ("Target: Alaric Thorne. Intel: fled the battle.", "HEAR YE! Alaric Thorne fled the battle like a goose!"),
    ("Target: Maud Gorse. Intel: waters the ale.", "BEWARE! Maud Gorse waters the ale of honest folk!"),
    ("Target: Ivo Crowley. Intel: cannot read.", "Know that Ivo Crowley cannot read his own decrees!"),
    ("Target: Edith Varrow. Intel: fears geese.", "Edith Varrow fears geese, and geese fear nothing!"),
    ("Target: Fulk Ashdown. Intel: sold the bell.", "Fulk Ashdown sold the village bell for dice money!"),
    ("Target: Joan Pickering. Intel: forged a seal.", "Joan Pickering forged the mill charter's seal!"),
    ("Target: Osric Underhill. Intel: lost a duel.", "Osric Underhill lost a duel to a small squire!"),
    ("Target: Sabine Larkspur. Intel: hid in a barrel.", "Sabine Larkspur hid in a barrel during the siege!"),
];

fn setup() -> (Llama, Tokenizer, Vec<Example>) {
    let texts = POSTERS.iter().flat_map(|(i, o)| [i.to_string(), o.to_string()]);
    let tok = Tokenizer::train_bpe(texts, 400).unwrap();
    let base =
        ScratchShape { layers: 2, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, context: 128, rope_theta: 10_000.0 };
    let model = Llama::random(ModelConfig::scratch(&base, &tok), 1, &Device::Cpu).unwrap();
    let examples = POSTERS.iter().map(|(i, o)| example(&tok, i, o, 128).unwrap().unwrap()).collect();
    (model, tok, examples)
}

fn config(steps: u32) -> TrainConfig {
    TrainConfig {
        epochs: None,
        steps: Some(steps),
        lr: 3e-3,
        batch: 4,
        grad_accum: 2,
        warmup: 0.05,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        prompt_loss_weight: 0.0,
        seq_len: 128,
        packing: false,
        seed: 3,
    }
}

fn quiet<'a>(
    cancelled: &'a (dyn Fn() -> bool + Sync),
    progress: &'a (dyn Fn(u64, u64) + Sync),
    dir: Option<std::path::PathBuf>,
) -> Hooks<'a> {
    Hooks { log: &|_| {}, progress, cancelled, checkpoint_dir: dir, checkpoint_every: Duration::ZERO }
}

fn values(vars: &[(String, Var)]) -> Vec<Vec<f32>> {
    vars.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
}

#[test]
fn lora_on_eight_samples_cuts_the_training_loss_by_more_than_90_percent() {
    let (mut model, tok, examples) = setup();
    let spec = LoraSpec {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        rslora: false,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
    };
    let vars = lora::attach(&mut model, &spec, 0).unwrap();
    let pad = tok.pad.as_ref().unwrap().1;
    let cfg = TrainConfig { lr: 1e-2, ..config(60) };
    // On the LoRA engine with a bf16 base (what the adapter stage runs) and on autograd.
    let engine = Engine::new(&model, BaseDtype::Bf16).unwrap();
    let fresh: Vec<Vec<f32>> = values(&vars);
    for backend in [Backend::Engine(&engine), Backend::Autograd] {
        for ((_, v), init) in vars.iter().zip(&fresh) {
            v.set(&candle_core::Tensor::from_slice(init, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let report =
            train(&model, backend, &vars, &examples, &examples[..2], pad, &cfg, &quiet(&|| false, &|_, _| {}, None))
                .unwrap();
        let first = report.curve.train.first().unwrap().loss;
        let last = report.curve.train.last().unwrap().loss;
        eprintln!("LoRA: loss {first:.3} -> {last:.3} in {} steps; eval {:?}", report.steps, report.curve.eval.last());
        assert!(last < 0.1 * first, "loss {first} -> {last}");
        assert_eq!(report.curve.eval.len(), 60, "one eval per epoch (an epoch is one step here)");
    }
}

#[test]
fn full_fine_tuning_on_eight_samples_cuts_the_training_loss_by_more_than_90_percent() {
    let (model, tok, examples) = setup();
    let (model, vars) = model.trainable().unwrap();
    let pad = tok.pad.as_ref().unwrap().1;
    let cfg = TrainConfig { lr: 3e-3, packing: true, ..config(40) };
    let report =
        train(&model, Backend::Autograd, &vars, &examples, &[], pad, &cfg, &quiet(&|| false, &|_, _| {}, None))
            .unwrap();
    let first = report.curve.train.first().unwrap().loss;
    let last = report.curve.train.last().unwrap().loss;
    eprintln!("full: loss {first:.3} -> {last:.3} in {} steps", report.steps);
    assert!(last < 0.1 * first, "loss {first} -> {last}");
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let spec =
        LoraSpec { rank: 4, alpha: 8.0, dropout: 0.1, rslora: false, targets: vec!["q_proj".into(), "v_proj".into()] };
    let cfg = TrainConfig { epochs: Some(3), steps: None, ..config(0) };
    let run = |stop_after: Option<u64>, dir: Option<std::path::PathBuf>| {
        let (mut model, tok, examples) = setup();
        let vars = lora::attach(&mut model, &spec, 0).unwrap();
        let engine = Engine::new(&model, BaseDtype::Bf16).unwrap();
        let done = AtomicU64::new(0);
        let progress = |d: u64, _: u64| done.store(d, Ordering::SeqCst);
        let cancelled = || stop_after.is_some_and(|s| done.load(Ordering::SeqCst) >= s);
        let result = train(
            &model,
            Backend::Engine(&engine),
            &vars,
            &examples,
            &examples[..2],
            tok.pad.as_ref().unwrap().1,
            &cfg,
            &quiet(&cancelled, &progress, dir),
        );
        (result, values(&vars))
    };
    let (whole, expected) = run(None, None);
    let whole = whole.unwrap();
    assert_eq!(whole.steps, 3, "8 examples, 4 per micro-batch, 2 per step: one step per epoch");

    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("checkpoint");
    let (first, _) = run(Some(2), Some(ckpt.clone()));
    assert!(matches!(first, Err(forge_train::TrainError::Cancelled)));
    assert!(ckpt.join("state.json").is_file());
    let (second, resumed) = run(None, Some(ckpt.clone()));
    let second = second.unwrap();
    assert_eq!(second.resumed_from, Some(2));
    assert_eq!(resumed, expected, "resumed weights are bit-identical to an uninterrupted run");
    assert_eq!(second.curve, whole.curve, "and so is the loss curve");
}
