//! `forge gen`: sample from a trained model (the merged weights, or the adapter on its base).

use std::io::Read;
use std::time::Instant;

use forge_model::generate::{Sampling, generate as sample_tokens};
use serde_json::{Value, json};

use crate::Failure;
use crate::args::{GenArgs, GenStage, Global};
use crate::commands::{fresh_artifact_dir, load};
use crate::output::Output;

/// The inputs `--input` names: a file, stdin, or the text itself; JSON objects give `input`.
fn inputs(arg: &str, limit: usize) -> Result<Vec<String>, Failure> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| Failure::Internal(format!("stdin: {e}")))?;
        s
    } else if std::path::Path::new(arg).is_file() {
        std::fs::read_to_string(arg).map_err(|e| Failure::Usage(format!("{arg}: {e}")))?
    } else {
        arg.to_string()
    };
    let from_json = |v: Value| -> Result<String, Failure> {
        match v {
            Value::String(s) => Ok(s),
            Value::Object(o) => o
                .get("input")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| Failure::Usage("the JSON input has no string field `input`".into())),
            _ => Err(Failure::Usage("a JSON input must be a string or an object with `input`".into())),
        }
    };
    if let Ok(v) = serde_json::from_str::<Value>(text.trim()) {
        return Ok(vec![from_json(v)?]);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() > 1 && lines.iter().all(|l| serde_json::from_str::<Value>(l).is_ok()) {
        return lines.into_iter().take(limit).map(|l| from_json(serde_json::from_str(l).expect("checked"))).collect();
    }
    Ok(vec![text])
}

/// One answer and what it cost.
struct Answer {
    text: String,
    prompt_tokens: usize,
    tokens: usize,
    seconds: f64,
}

fn report(out: &Output, a: &GenArgs, input: &str, answer: &Answer, load_s: f64) {
    if a.json {
        crate::outln!(
            "{}",
            json!({
                "input": input, "output": answer.text, "prompt_tokens": answer.prompt_tokens,
                "tokens": answer.tokens, "seconds": answer.seconds, "load_seconds": load_s,
            })
        );
    } else {
        crate::outln!("{}", answer.text.trim_end());
        if !out.quiet {
            eprintln!(
                "({} prompt tokens, {} generated in {:.2}s)",
                answer.prompt_tokens, answer.tokens, answer.seconds
            );
        }
    }
}

fn sampling(a: &GenArgs, i: usize) -> Sampling {
    Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed.wrapping_add(i as u64),
        max_tokens: a.max_tokens,
    }
}

/// `forge gen --gguf LEVEL`: the quantized file, on forge's runtime.
fn generate_gguf(g: &Global, out: &Output, a: &GenArgs, level: &str) -> Result<(), Failure> {
    let ws = load(g, out, a.json)?;
    let level = forge_manifest::QuantLevel::parse(level)
        .ok_or_else(|| Failure::Usage(format!("--gguf {level}: not a level forge writes (q4_0, q8_0, f16, ...)")))?;
    let dir = fresh_artifact_dir(&ws, out, &format!("{}:gguf:{level}", a.target))?;
    let model = forge_infer::QModel::load(&dir.join("model.gguf")).map_err(|e| Failure::Internal(e.to_string()))?;
    for (i, input) in inputs(&a.input, a.limit)?.into_iter().enumerate() {
        let g = model.generate(&input, &sampling(a, i)).map_err(|e| Failure::Internal(e.to_string()))?;
        let answer =
            Answer { text: g.text, prompt_tokens: g.prompt_tokens, tokens: g.tokens, seconds: g.prompt_s + g.decode_s };
        report(out, a, &input, &answer, model.load_s);
    }
    Ok(())
}

pub fn generate(g: &Global, out: &Output, a: GenArgs) -> Result<(), Failure> {
    if let Some(level) = &a.gguf {
        return generate_gguf(g, out, &a, level);
    }
    let ws = load(g, out, a.json)?;
    let stage = match a.stage {
        GenStage::Merged => "merged",
        GenStage::Adapter => "adapter",
    };
    let dir = fresh_artifact_dir(&ws, out, &format!("{}:{stage}", a.target))?;
    let t0 = Instant::now();
    let (model, tok) = match a.stage {
        GenStage::Merged => {
            forge_model::io::load_hf(&dir, &candle_core::Device::Cpu).map_err(|e| Failure::Internal(e.to_string()))?
        }
        GenStage::Adapter => {
            // A GGUF base is the fetched artifact `base:NAME` (or a workspace file).
            let base_dir = match forge_stages::train::gguf_base_name(&dir) {
                Some(name) => match ws.manifest.bases.get(&name).and_then(|b| b.fetch_artifact()) {
                    Some(id) => {
                        Some(fresh_artifact_dir(&ws, out, &id.to_string())?.join(forge_stages::fetch::FETCHED_FILE))
                    }
                    None => match ws.manifest.bases.get(&name).map(|b| &b.kind) {
                        Some(forge_manifest::BaseKind::Gguf(g)) => g.path.as_ref().map(|p| ws.root.join(&p.value)),
                        _ => None,
                    },
                },
                None => None,
            };
            let base =
                base_dir.as_deref().map_or(forge_stages::train::BaseFile::None, forge_stages::train::BaseFile::Gguf);
            forge_stages::train::load_adapted(&dir, &ws.root, base).map_err(Failure::Internal)?
        }
    };
    let load_s = t0.elapsed().as_secs_f64();
    let stop = tok.stop_ids(&model.cfg.eos);
    for (i, input) in inputs(&a.input, a.limit)?.into_iter().enumerate() {
        let prompt = tok.prompt(None, &input).map_err(|e| Failure::Internal(e.to_string()))?;
        let ids = tok.encode_prompt(&prompt).map_err(|e| Failure::Internal(e.to_string()))?;
        let t = Instant::now();
        let tokens =
            sample_tokens(&model, &ids, &stop, &sampling(&a, i)).map_err(|e| Failure::Internal(e.to_string()))?;
        let seconds = t.elapsed().as_secs_f64();
        let text = tok.decode(&tokens).map_err(|e| Failure::Internal(e.to_string()))?;
        report(out, &a, &input, &Answer { text, prompt_tokens: ids.len(), tokens: tokens.len(), seconds }, load_s);
    }
    Ok(())
}
