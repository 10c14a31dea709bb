//! `forge-train-bench [--hidden 512 --layers 4 --heads 8 --kv-heads 8 --ffn 1408 --vocab 4096
//! --batch 4 --seq 256 --rank 16 --targets q_proj,v_proj --steps 10 --warmup 2]`: LoRA training
//! throughput of forge's decoder on a random llama with random tokens, for bench/train.py (which
//! runs the same shape in PyTorch + PEFT). Prints one JSON line: tokens/s over the timed steps.

use std::time::Instant;

use candle_core::{Device, Tensor};
use forge_model::lora::{self, LoraSpec};
use forge_model::{Arch, Dropout, Layout, Llama, ModelConfig, weighted_cross_entropy};
use forge_train::optim::{AdamW, clip};

fn main() {
    forge_model::tune_allocator();
    let mut opt = std::collections::HashMap::new();
    let mut args = std::env::args().skip(1);
    while let (Some(k), Some(v)) = (args.next(), args.next()) {
        opt.insert(k.trim_start_matches("--").to_string(), v);
    }
    let get = |k: &str, d: usize| opt.get(k).map(|v| v.parse().expect("a number")).unwrap_or(d);
    let (hidden, heads) = (get("hidden", 512), get("heads", 8));
    let cfg = ModelConfig {
        arch: Arch::Llama,
        hidden,
        intermediate: get("ffn", 1408),
        layers: get("layers", 4),
        heads,
        kv_heads: get("kv-heads", heads),
        head_dim: hidden / heads,
        vocab: get("vocab", 4096),
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_positions: get("seq", 256).max(512),
        tie_embeddings: false,
        qkv_bias: false,
        bos: None,
        eos: vec![],
        pad: None,
        gemma: None,
    };
    let (batch, seq, steps, warmup) = (get("batch", 4), get("seq", 256), get("steps", 10), get("warmup", 2));
    let targets: Vec<String> =
        opt.get("targets").map(String::as_str).unwrap_or("q_proj,v_proj").split(',').map(str::to_string).collect();
    let spec = LoraSpec { rank: get("rank", 16), alpha: 32.0, dropout: 0.0, rslora: false, targets };
    let mut model = Llama::random(cfg.clone(), 0, &Device::Cpu).expect("model");
    let vars = lora::attach(&mut model, &spec, 0).expect("lora");
    let mut adam = AdamW::new(&vars, 0.0).expect("optimizer");
    let mut rng = forge_rng::SplitMix64::new(7);
    let layout = Layout::dense(batch, seq);
    let (mut timed_tokens, mut timed_s, mut last_loss) = (0usize, 0f64, 0f64);
    for step in 0..warmup + steps {
        let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(cfg.vocab) as u32).collect();
        let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(cfg.vocab) as u32).collect();
        let weights = vec![1f32; batch * seq];
        let t0 = Instant::now();
        let input = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).expect("ids");
        let logits = model.forward(&input, &layout, &Dropout::off()).expect("forward");
        let logits = logits.reshape((batch * seq, cfg.vocab)).expect("reshape");
        let (loss, _) = weighted_cross_entropy(&logits, &targets, &weights).expect("loss");
        let t_fwd = t0.elapsed().as_secs_f64();
        let grads = loss.backward().expect("backward");
        let t_bwd = t0.elapsed().as_secs_f64() - t_fwd;
        if std::env::var_os("FORGE_BENCH_VERBOSE").is_some() {
            eprintln!("step {step}: forward {t_fwd:.3}s backward {t_bwd:.3}s");
        }
        let mut g: Vec<Tensor> =
            vars.iter().map(|(_, v)| grads.get(v.as_tensor()).expect("a gradient").clone()).collect();
        clip(&mut g, 1.0).expect("clip");
        adam.update(&vars, &g, 1e-4).expect("update");
        last_loss = loss.to_scalar::<f32>().expect("scalar") as f64;
        if step >= warmup {
            timed_s += t0.elapsed().as_secs_f64();
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
        })
    );
}
