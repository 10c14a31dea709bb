//! `forge-quantize`: forge's counterpart of `llama-quantize`, for benchmarks and checks.
//!
//! ```text
//! forge-quantize IN.gguf OUT.gguf LEVEL [--threads N]
//! forge-quantize --from-hf DIR OUT.gguf LEVEL [--threads N]
//! ```
//!
//! The first form requantizes a GGUF model file (f32/f16/bf16 tensors, any llama-family
//! architecture) with forge's quantizers and the `gguf` stage's per-tensor mixing
//! ([`forge_gguf::requant`]); the second converts a Hugging Face llama/qwen2 folder as the `gguf`
//! stage does ([`forge_gguf::convert::write_model`]). LEVEL is one of `f32 f16 bf16 q8_0 q4_0 q4_1
//! q5_0 q5_1 q4_k_m q5_k_m q6_k`. `--threads` sizes rayon's pool (default: the CPU count).
//!
//! Prints one JSON object on stdout: the wall time from opening the input to the renamed output
//! (`seconds`), the CPU time of all threads over the same span (`cpu_seconds`, Linux), the
//! output's size, and its tensors per type. Exit status 2 for bad arguments, 1 if
//! the conversion fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use forge_gguf::convert::Summary;
use forge_quant::QuantLevel;

const USAGE: &str = "usage: forge-quantize IN.gguf OUT.gguf LEVEL [--threads N]\n       \
                     forge-quantize --from-hf DIR OUT.gguf LEVEL [--threads N]\n\
                     LEVEL: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k_m q5_k_m q6_k";

fn usage(msg: &str) -> ! {
    eprintln!("forge-quantize: {msg}\n{USAGE}");
    std::process::exit(2)
}

/// User + system CPU time of this process so far, all threads (Linux's `/proc/self/stat`, in
/// USER_HZ = 100 ticks per second); `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3)?.parse::<f64>().ok();
    Some((ticks(14)? + ticks(15)?) / 100.0)
}

fn main() {
    let mut positional = Vec::new();
    let mut threads: Option<usize> = None;
    let mut from_hf = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" | "-t" => {
                let v = args.next().unwrap_or_else(|| usage("--threads needs a value"));
                threads = Some(v.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| usage("--threads: not a count")));
            }
            "--from-hf" => from_hf = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            s if s.starts_with('-') => usage(&format!("unknown option {s}")),
            _ => positional.push(a),
        }
    }
    let [input, output, level] = positional.as_slice() else { usage("expected IN, OUT and LEVEL") };
    let level = QuantLevel::parse(level).unwrap_or_else(|| usage(&format!("unknown level `{level}`")));
    let (input, output) = (PathBuf::from(input), PathBuf::from(output));
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().expect("the rayon pool is built once");
    }

    let (start, cpu_start) = (Instant::now(), cpu_seconds());
    let result: Result<Summary, String> = if from_hf {
        forge_model::io::load_hf(&input, &candle_core::Device::Cpu).map_err(|e| e.to_string()).and_then(
            |(model, tok)| {
                let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                forge_gguf::convert::write_model(&output, &model, &tok, level, &name, Default::default())
                    .map_err(|e| e.to_string())
            },
        )
    } else {
        forge_gguf::requant::requantize_file(&input, &output, level).map_err(|e| e.to_string())
    };
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_start.zip(cpu_seconds()).map(|(a, b)| b - a);
    let summary = result.unwrap_or_else(|e| {
        eprintln!("forge-quantize: {e}");
        std::process::exit(1)
    });
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, t) in &summary.tensors {
        *types.entry(t.to_string()).or_default() += 1;
    }
    let bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    let report = serde_json::json!({
        "input": input.display().to_string(),
        "output": output.display().to_string(),
        "level": level.as_str(),
        "threads": rayon::current_num_threads(),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "bytes": bytes,
        "tensors": summary.tensors.len(),
        "types": types,
    });
    println!("{report}");
}
