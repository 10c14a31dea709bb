//! `forge-logits MODEL_DIR (--ids 1,2,3 | --text TEXT) [--workspace DIR]`: forge's logits for a
//! token sequence, as JSON, for the comparison scripts in `scripts/` (transformers, PEFT).
//! MODEL_DIR is a Hugging Face folder or an adapter artifact (PEFT adapter on its base).

use candle_core::Tensor;
use forge_model::{Dropout, Layout};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut ids: Option<Vec<u32>> = None;
    let mut text = None;
    let mut workspace = std::path::PathBuf::from(".");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ids" => {
                ids = Some(
                    args.next()
                        .expect("--ids 1,2,3")
                        .split(',')
                        .map(|s| s.trim().parse().expect("a token id"))
                        .collect(),
                )
            }
            "--text" => text = args.next(),
            "--workspace" => workspace = args.next().expect("--workspace DIR").into(),
            _ if dir.is_none() => dir = Some(std::path::PathBuf::from(a)),
            other => {
                eprintln!("unexpected argument {other}");
                std::process::exit(2);
            }
        }
    }
    let dir = dir.unwrap_or_else(|| {
        eprintln!("usage: forge-logits MODEL_DIR (--ids 1,2,3 | --text TEXT) [--workspace DIR]");
        std::process::exit(2)
    });
    let fail = |e: String| -> ! {
        eprintln!("{e}");
        std::process::exit(1)
    };
    let (model, ids) = match (ids, text) {
        // Token ids need no tokenizer: a bare checkpoint folder will do.
        (Some(ids), _) if !dir.join("adapter_config.json").is_file() => {
            let device = candle_core::Device::Cpu;
            let cfg = forge_model::io::read_config(&dir).unwrap_or_else(|e| fail(e.to_string()));
            let weights = forge_model::io::read_weights(&dir, &device).unwrap_or_else(|e| fail(e.to_string()));
            (forge_model::Llama::from_tensors(cfg, weights, &device).unwrap_or_else(|e| fail(e.to_string())), ids)
        }
        (Some(ids), _) => (forge_train::load_adapted(&dir, &workspace).unwrap_or_else(|e| fail(e)).0, ids),
        (None, Some(t)) => {
            let (model, tok) = forge_train::load_adapted(&dir, &workspace).unwrap_or_else(|e| fail(e));
            let ids = tok.encode(&t).unwrap_or_else(|e| fail(e.to_string()));
            (model, ids)
        }
        (None, None) => fail("give --ids or --text".into()),
    };
    let input = Tensor::new(ids.as_slice(), model.device()).and_then(|t| t.unsqueeze(0)).expect("a tensor");
    let logits = model.forward(&input, &Layout::dense(1, ids.len()), &mut Dropout::off()).expect("forward");
    let rows: Vec<Vec<f32>> = logits.squeeze(0).and_then(|l| l.to_vec2()).expect("logits");
    println!("{}", serde_json::json!({ "ids": ids, "logits": rows }));
}
