//! `forge-decode MODEL (--ids 1,2,3) [--greedy N]`: greedy decoding with forge — its quantized
//! decoder for a GGUF file, its f32 decoder for a Hugging Face folder — as JSON, for
//! scripts/gguf_check.py, which compares it with llama.cpp on the same files.

use candle_core::Device;
use forge_model::generate::{Sampling, generate};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut ids: Vec<u32> = Vec::new();
    let mut n = 32usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ids" => {
                ids = args.next().expect("--ids 1,2,3").split(',').map(|s| s.trim().parse().expect("an id")).collect()
            }
            "--greedy" => n = args.next().and_then(|v| v.parse().ok()).expect("--greedy N"),
            _ => path = Some(std::path::PathBuf::from(a)),
        }
    }
    let path = path.expect("usage: forge-decode MODEL --ids 1,2,3 [--greedy N]");
    let tokens = if path.extension().is_some_and(|e| e == "gguf") {
        let model = forge_bench::infer::QModel::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        model.greedy(&ids, n).expect("decoding")
    } else {
        let model =
            forge_model::io::load_hf(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display())).0;
        let s = Sampling { temperature: 0.0, max_tokens: n, ..Sampling::default() };
        generate(&model, &ids, &[], &s).expect("decoding")
    };
    println!("{}", serde_json::json!({ "tokens": tokens }));
}
