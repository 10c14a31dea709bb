//! `forge-decode MODEL (--ids 1,2,3) [--greedy N] [--threads N]`: greedy decoding with forge — its
//! quantized decoder for a GGUF file, its f32 decoder for a Hugging Face folder — as JSON, for
//! scripts/gguf_check.py, which compares it with llama.cpp on the same files. `--top K` prints
//! the K largest logits after the ids instead (GGUF files; `--stepwise` feeds the ids one at a time
//! rather than in one batch).
//!
//! `forge-decode MODEL.gguf --bench [--ids 1,2,3 | --prompt-tokens 128] [--gen 128] [--reps 3]
//! [--threads N]`: times the quantized decoder as bench/infer.py compares it with llama.cpp: per
//! rep, the prompt in one batch (prompt tokens/s), then `--gen` greedy tokens one step each,
//! never stopping at EOS (decode tokens/s). Prints one JSON object: every rep's seconds, the
//! medians as tokens/s, and the last rep's tokens.

use candle_core::Device;
use forge_model::generate::{Sampling, generate};

const USAGE: &str = "usage: forge-decode MODEL --ids 1,2,3 [--greedy N | --top K [--stepwise]] [--threads N]\n       \
                     forge-decode MODEL.gguf --bench [--ids 1,2,3 | --prompt-tokens N] [--gen N] [--reps N] \
                     [--threads N]";

fn usage(msg: &str) -> ! {
    eprintln!("forge-decode: {msg}\n{USAGE}");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut ids: Vec<u32> = Vec::new();
    let mut n = 32usize;
    let (mut bench, mut prompt_tokens, mut n_gen, mut reps, mut threads) = (false, 128usize, 128usize, 3usize, None);
    let mut top = None;
    let mut stepwise = false;
    let num = |args: &mut dyn Iterator<Item = String>, name: &str| -> usize {
        args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage(&format!("{name} needs a number")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ids" => {
                ids = args
                    .next()
                    .unwrap_or_else(|| usage("--ids 1,2,3"))
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage("--ids: not a token id")))
                    .collect()
            }
            "--greedy" => n = num(&mut args, "--greedy"),
            "--bench" => bench = true,
            "--prompt-tokens" => prompt_tokens = num(&mut args, "--prompt-tokens"),
            "--gen" => n_gen = num(&mut args, "--gen"),
            "--reps" => reps = num(&mut args, "--reps").max(1),
            "--threads" | "-t" => threads = Some(num(&mut args, "--threads").max(1)),
            "--top" => top = Some(num(&mut args, "--top")),
            "--stepwise" => stepwise = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            s if s.starts_with('-') => usage(&format!("unknown option {s}")),
            _ => path = Some(std::path::PathBuf::from(a)),
        }
    }
    let path = path.unwrap_or_else(|| usage("no MODEL"));
    let is_gguf = path.extension().is_some_and(|e| e == "gguf");
    if bench {
        if !is_gguf {
            usage("--bench times the quantized decoder: give a .gguf file");
        }
        let mut model = forge_infer::QModel::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(t) = threads {
            model.set_threads(t);
        }
        if ids.is_empty() {
            // A fixed prompt of ordinary token ids (bench/infer.py passes its own with --ids).
            let vocab = model.cfg.vocab as u64;
            ids = (0..prompt_tokens as u64).map(|i| (100 + (i * 7919 + 13) % (vocab.max(200) - 100)) as u32).collect();
        }
        let (runs, tokens) = model.bench(&ids, n_gen, reps).expect("decoding");
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
        };
        let prompt_s = median(runs.iter().map(|r| r.prompt_s).collect());
        let decode_s = median(runs.iter().map(|r| r.decode_s).collect());
        let report = serde_json::json!({
            "model": path.display().to_string(),
            "architecture": model.architecture(),
            "threads": model.threads(),
            "kernels": model.kernels().name(),
            "load_s": model.load_s,
            "prompt_tokens": ids.len(),
            "gen_tokens": n_gen,
            "reps": runs,
            "prompt_tok_s": ids.len() as f64 / prompt_s,
            "decode_tok_s": if decode_s > 0.0 { n_gen as f64 / decode_s } else { 0.0 },
            "tokens": tokens,
        });
        println!("{report}");
        return;
    }
    let tokens = if is_gguf {
        let mut model = forge_infer::QModel::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Some(t) = threads {
            model.set_threads(t);
        }
        if let Some(k) = top {
            // The k largest logits after `ids`, for comparing logits with llama.cpp.
            // `--stepwise`: one token at a time instead of the prompt in one batch.
            let mut cache = forge_infer::Cache::default();
            let logits = if stepwise {
                let mut last = Vec::new();
                for &id in &ids {
                    last = model.step(&[id], &mut cache).expect("decoding");
                }
                last
            } else {
                model.step(&ids, &mut cache).expect("decoding")
            };
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let best: Vec<_> = order.iter().take(k).map(|&i| serde_json::json!([i, logits[i]])).collect();
            println!("{}", serde_json::json!({ "top": best }));
            return;
        }
        model.greedy(&ids, n).expect("decoding")
    } else {
        let model =
            forge_model::io::load_hf(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display())).0;
        let s = Sampling { temperature: 0.0, max_tokens: n, ..Sampling::default() };
        generate(&model, &ids, &[], &s).expect("decoding")
    };
    println!("{}", serde_json::json!({ "tokens": tokens }));
}
