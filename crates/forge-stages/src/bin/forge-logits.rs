//! `forge-logits MODEL (--ids 1,2,3 | --text TEXT) [--workspace DIR] [--base FILE.gguf]`: forge's
//! logits for a token sequence, as JSON, for the comparison scripts in `scripts/` (transformers,
//! PEFT, llama.cpp). MODEL is a Hugging Face folder, an adapter artifact (PEFT adapter on its
//! base; `--base` gives a GGUF base's file) or a GGUF file (dequantized to f32; `--text` is then
//! encoded with the file's tokenizer, BOS as the file asks).

use candle_core::Tensor;
use forge_model::{Dropout, Layout};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut ids: Option<Vec<u32>> = None;
    let mut text = None;
    let mut workspace = std::path::PathBuf::from(".");
    let mut base: Option<std::path::PathBuf> = None;
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
            "--base" => base = Some(args.next().expect("--base FILE.gguf").into()),
            _ if dir.is_none() => dir = Some(std::path::PathBuf::from(a)),
            other => {
                eprintln!("unexpected argument {other}");
                std::process::exit(2);
            }
        }
    }
    let dir = dir.unwrap_or_else(|| {
        eprintln!("usage: forge-logits MODEL (--ids 1,2,3 | --text TEXT) [--workspace DIR] [--base FILE.gguf]");
        std::process::exit(2)
    });
    let fail = |e: String| -> ! {
        eprintln!("{e}");
        std::process::exit(1)
    };
    let base = base.as_deref().map_or(forge_stages::train::BaseFile::None, forge_stages::train::BaseFile::Gguf);
    let (model, ids) = match (ids, text) {
        // A GGUF file, dequantized.
        (ids, text) if dir.extension().is_some_and(|e| e == "gguf") => {
            let (model, tok) = forge_gguf::load::open_base(&dir).unwrap_or_else(|e| fail(e.to_string()));
            let ids = match (ids, text) {
                (Some(ids), _) => ids,
                (None, Some(t)) => tok.encode_prompt(&t).unwrap_or_else(|e| fail(e.to_string())),
                (None, None) => fail("give --ids or --text".into()),
            };
            (model, ids)
        }
        // Token ids need no tokenizer: a bare checkpoint folder will do.
        (Some(ids), _) if !dir.join("adapter_config.json").is_file() => {
            (forge_model::io::read_model(&dir, &candle_core::Device::Cpu).unwrap_or_else(|e| fail(e.to_string())), ids)
        }
        (Some(ids), _) => {
            (forge_stages::train::load_adapted(&dir, &workspace, base).unwrap_or_else(|e| fail(e)).0, ids)
        }
        (None, Some(t)) => {
            let (model, tok) = forge_stages::train::load_adapted(&dir, &workspace, base).unwrap_or_else(|e| fail(e));
            let ids = tok.encode(&t).unwrap_or_else(|e| fail(e.to_string()));
            (model, ids)
        }
        (None, None) => fail("give --ids or --text".into()),
    };
    let input = Tensor::new(ids.as_slice(), model.device()).and_then(|t| t.unsqueeze(0)).expect("a tensor");
    let logits = model.forward(&input, &Layout::dense(1, ids.len()), &Dropout::off()).expect("forward");
    let rows: Vec<Vec<f32>> = logits.squeeze(0).and_then(|l| l.to_vec2()).expect("logits");
    println!("{}", serde_json::json!({ "ids": ids, "logits": rows }));
}
