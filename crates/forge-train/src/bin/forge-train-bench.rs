//! `forge-train-bench [--shape tiny|smollm2-135m|gemma3-270m] [--hidden ... --layers ... --heads ...
//! --kv-heads ... --ffn ... --vocab ... --tied 0|1] [--batch 4 --seq 256 --rank 16
//! --targets q_proj,v_proj --steps 10 --warmup 2 --base-dtype bf16|f32 --engine lora|autograd
//! --prompt 0]`: LoRA training throughput of forge on a random model of a named (or given) shape
//! with random tokens, for bench/train.py (which runs the same shape in PyTorch + PEFT). `--prompt
//! N` gives the first N tokens of each row loss weight 0 (as the prompt under prompt-loss-weight 0).
//! Prints one JSON line: tokens/s over the timed steps.

use std::time::Instant;

use candle_core::{Device, Tensor};
use forge_model::engine::{BaseDtype, Batch, Engine, Lora};
use forge_model::lora::{self, LoraSpec};
use forge_model::{Arch, Dropout, GemmaConfig, Layout, Llama, ModelConfig, weighted_cross_entropy};
use forge_train::optim::{AdamW, clip};

fn shape(name: &str) -> ModelConfig {
    let base = ModelConfig {
        arch: Arch::Llama,
        hidden: 512,
        intermediate: 1408,
        layers: 4,
        heads: 8,
        kv_heads: 8,
        head_dim: 64,
        vocab: 4096,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_positions: 2048,
        tie_embeddings: false,
        qkv_bias: false,
        bos: None,
        eos: vec![],
        pad: None,
        gemma: None,
    };
    match name {
        "tiny" => base,
        // SmolLM2-135M's shape (the bench unties its head, as in the measurement).
        "smollm2-135m" => ModelConfig {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            vocab: 49_152,
            rope_theta: 100_000.0,
            ..base
        },
        "gemma3-270m" => ModelConfig {
            arch: Arch::Gemma3,
            hidden: 640,
            intermediate: 2048,
            layers: 18,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            vocab: 262_144,
            rms_eps: 1e-6,
            rope_theta: 1_000_000.0,
            tie_embeddings: true,
            gemma: Some(GemmaConfig {
                sliding_window: 512,
                sliding_pattern: 6,
                rope_local_theta: 10_000.0,
                query_pre_attn_scalar: 256.0,
            }),
            ..base
        },
        other => {
            eprintln!("unknown shape {other} (tiny, smollm2-135m, gemma3-270m)");
            std::process::exit(2)
        }
    }
}

fn main() {
    forge_model::tune_allocator();
    let mut opt = std::collections::HashMap::new();
    let mut args = std::env::args().skip(1);
    while let (Some(k), Some(v)) = (args.next(), args.next()) {
        opt.insert(k.trim_start_matches("--").to_string(), v);
    }
    let get = |k: &str, d: usize| opt.get(k).map(|v| v.parse().expect("a number")).unwrap_or(d);
    let mut cfg = shape(opt.get("shape").map(String::as_str).unwrap_or("tiny"));
    cfg.hidden = get("hidden", cfg.hidden);
    cfg.layers = get("layers", cfg.layers);
    cfg.heads = get("heads", cfg.heads);
    cfg.kv_heads = get("kv-heads", cfg.kv_heads);
    cfg.intermediate = get("ffn", cfg.intermediate);
    cfg.vocab = get("vocab", cfg.vocab);
    cfg.tie_embeddings = get("tied", cfg.tie_embeddings as usize) != 0;
    if cfg.gemma.is_none() {
        cfg.head_dim = cfg.hidden / cfg.heads;
    }
    let (batch, seq, steps, warmup) = (get("batch", 4), get("seq", 256), get("steps", 10), get("warmup", 2));
    let prompt = get("prompt", 0).min(seq);
    let targets: Vec<String> =
        opt.get("targets").map(String::as_str).unwrap_or("q_proj,v_proj").split(',').map(str::to_string).collect();
    let spec = LoraSpec { rank: get("rank", 16), alpha: 32.0, dropout: 0.0, rslora: false, targets };
    let dtype = match opt.get("base-dtype").map(String::as_str).unwrap_or("bf16") {
        "f32" => BaseDtype::F32,
        _ => BaseDtype::Bf16,
    };
    let autograd = opt.get("engine").map(String::as_str) == Some("autograd");
    let mut model = Llama::random(cfg.clone(), 0, &Device::Cpu).expect("model");
    let vars = lora::attach(&mut model, &spec, 0).expect("lora");
    let engine = (!autograd).then(|| Engine::new(&model, dtype).expect("engine"));
    if engine.is_some() {
        // As the adapter stage does: the engine holds the frozen weights.
        model.release_frozen().expect("release");
    }
    let mut adam = AdamW::new(&vars, 0.0).expect("optimizer");
    let mut rng = forge_rng::SplitMix64::new(7);
    let layout = Layout::dense(batch, seq);
    let (mut timed_tokens, mut timed_s, mut last_loss) = (0usize, 0f64, 0f64);
    for step in 0..warmup + steps {
        let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(cfg.vocab) as u32).collect();
        let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(cfg.vocab) as u32).collect();
        let weights: Vec<f32> = (0..batch * seq).map(|i| if i % seq < prompt { 0.0 } else { 1.0 }).collect();
        let t0 = Instant::now();
        let mut g: Vec<Tensor> = match &engine {
            Some(e) => {
                let lora_now = Lora::of(&model).expect("lora");
                let b = Batch { ids: &ids, layout: &layout, targets: &targets, weights: &weights };
                let (loss, grads) = e.loss_and_grads(&lora_now, &b, &Dropout::off()).expect("step");
                last_loss = loss;
                forge_train::train::grads_as_tensors(&model, &grads).expect("gradients")
            }
            None => {
                let input = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).expect("ids");
                let logits = model.forward(&input, &layout, &Dropout::off()).expect("forward");
                let logits = logits.reshape((batch * seq, cfg.vocab)).expect("reshape");
                let (loss, _) = weighted_cross_entropy(&logits, &targets, &weights).expect("loss");
                let grads = loss.backward().expect("backward");
                last_loss = loss.to_scalar::<f32>().expect("scalar") as f64;
                vars.iter().map(|(_, v)| grads.get(v.as_tensor()).expect("a gradient").clone()).collect()
            }
        };
        clip(&mut g, 1.0).expect("clip");
        adam.update(&vars, &g, 1e-4).expect("update");
        let dt = t0.elapsed().as_secs_f64();
        if std::env::var_os("FORGE_BENCH_VERBOSE").is_some() {
            eprintln!("step {step}: {dt:.3}s, loss {last_loss:.4}");
        }
        if step >= warmup {
            timed_s += dt;
            timed_tokens += batch * seq;
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "tokens_per_second": timed_tokens as f64 / timed_s,
            "seconds_per_step": timed_s / steps as f64,
            "steps": steps, "batch": batch, "seq": seq, "loss": last_loss,
            "trainable": vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
            "parameters": cfg.parameter_count(),
            "engine": if autograd { "autograd" } else { "lora" },
            "base_dtype": if dtype == BaseDtype::Bf16 { "bf16" } else { "f32" },
            "frozen_bytes": engine.as_ref().map(|e| e.bytes()),
        })
    );
}
