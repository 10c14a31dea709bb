//! The training stages end to end with the `forge` binary: dataset → LoRA adapter (PEFT files)
//! → merged Hugging Face folder → `forge gen`; a no-op rebuild; a training killed with SIGKILL
//! that resumes from its checkpoint to the same adapter; and a benchmark killed with SIGKILL
//! that resumes after its finished prompts to the same answers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn json_file(path: std::path::PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn dataset_adapter_merged_and_gen() {
    let ws = TestWorkspace::copy_of("tiny-model");
    let (r, ev) = ws.build_json(&[]);
    assert_eq!(r.code(), 0, "{r:?}");
    let mut finished = with_event(&ev, "finish");
    finished.sort();
    let expected = [
        "tiny:adapter",
        "tiny:dataset",
        "tiny:gguf-adapter",
        "tiny:gguf:f16",
        "tiny:gguf:q4_k_m",
        "tiny:gguf:q8_0",
        "tiny:imatrix",
        "tiny:merged",
    ];
    assert_eq!(finished, expected);

    let adapter = ws.artifact_path("tiny:adapter");
    let config = json_file(adapter.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    assert_eq!(config["base_model_name_or_path"], "base");
    for f in [
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "base/config.json",
        "base/model.safetensors",
    ] {
        assert!(adapter.join(f).is_file(), "{f}");
    }
    let curve = json_file(adapter.join("loss.json"));
    let train = curve["train"].as_array().unwrap();
    assert!(train.last().unwrap()["loss"].as_f64().unwrap() < train[0]["loss"].as_f64().unwrap());
    assert_eq!(curve["eval"].as_array().unwrap().len(), 3, "an eval loss per epoch");

    let merged = ws.artifact_path("tiny:merged");
    let cfg = json_file(merged.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert!(merged.join("model.safetensors").is_file() && merged.join("tokenizer.json").is_file());

    let r = ws.run(&["gen", "tiny", "--input", "Target: Maud. Intel: fears geese.", "--max-tokens", "24", "--json"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let answer: Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert!(answer["tokens"].as_u64().unwrap() > 0, "{answer}");
    // The same answer from the unmerged adapter on its base.
    let r2 = ws.run(&[
        "gen",
        "tiny",
        "--stage",
        "adapter",
        "--input",
        "Target: Maud. Intel: fears geese.",
        "--max-tokens",
        "24",
        "--json",
    ]);
    let unmerged: Value = serde_json::from_str(r2.stdout().trim()).unwrap();
    assert_eq!(answer["output"], unmerged["output"]);

    // The GGUF files have what llama.cpp needs (scripts/gguf_check.py runs them in llama.cpp).
    for (artifact, file) in [
        ("tiny:gguf:q8_0", "model.gguf"),
        ("tiny:gguf:q4_k_m", "model.gguf"),
        ("tiny:gguf-adapter", "adapter.gguf"),
        ("tiny:gguf-adapter", "base.gguf"),
    ] {
        let path = ws.artifact_path(artifact).join(file);
        let r = ws.run(&["inspect", "--json", path.to_str().unwrap()]);
        assert_eq!(r.code(), 0, "{artifact}: {r:?}");
        let report: Value = serde_json::from_str(&r.stdout()).unwrap();
        assert_eq!(report["problems"], serde_json::json!([]), "{artifact}");
    }
    let q4 = ws.run(&["inspect", "--json", ws.artifact_path("tiny:gguf:q4_k_m").join("model.gguf").to_str().unwrap()]);
    let q4: Value = serde_json::from_str(&q4.stdout()).unwrap();
    assert_eq!(q4["metadata"]["general.file_type"], 15);
    // Rows of 64 are not whole 256-blocks: llama-quantize's fallbacks apply.
    assert!(q4["types"]["q5_0"].is_object() && q4["types"]["q8_0"].is_object(), "{:#}", q4["types"]);
    // The fallback q5_0 tensors are quantized with the importance matrix computed on the train
    // split (in llama.cpp's format), which only the quantized levels need.
    let imatrix = forge_gguf::imatrix::read(&ws.artifact_path("tiny:imatrix").join("imatrix.gguf")).unwrap();
    assert_eq!(imatrix["blk.0.attn_q.weight"].len(), 64);
    assert!(imatrix.values().all(|w| w.iter().all(|v| v.is_finite() && *v >= 0.0)));
    let log = ws.read(".forge-cache/logs-v1/tiny--gguf--q4_k_m.log");
    assert!(log.contains("quantized with the importance matrix"), "{log}");
    // The benchmarked file itself, on forge's runtime; a level the target does not build is a
    // usage error naming it.
    let r = ws.run(&["gen", "tiny", "--gguf", "q8_0", "--input", "Target: Maud. Intel: fears geese.", "--json"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let q8: Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert!(q8["tokens"].as_u64().unwrap() > 0 && q8["output"].is_string(), "{q8}");
    let r = ws.run(&["gen", "tiny", "--gguf", "q5_1", "--input", "x"]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr().contains("tiny:gguf:q5_1"), "{r:?}");
    let r = ws.run(&["inspect", ws.file("forge.kdl").to_str().unwrap()]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("not a GGUF file"), "{r:?}");

    // What a game ships: every level and the adapter on its base, checksummed and described.
    let export = ws.path().join("ship");
    let r = ws.run(&["export", "tiny", "--to", export.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    let models = json_file(export.join("models.json"));
    let entries = models["models"].as_array().unwrap();
    let levels: Vec<&str> = entries.iter().map(|m| m["level"].as_str().unwrap()).collect();
    assert_eq!(levels, ["f16", "q8_0", "q4_k_m", "adapter"]);
    for m in entries {
        let file = export.join(m["file"].as_str().unwrap());
        assert_eq!(forge_stages::fetch::sha256_file(&file).unwrap(), m["sha256"].as_str().unwrap(), "{m}");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), m["bytes"].as_u64().unwrap());
        assert_eq!(m["architecture"], "llama");
        assert!(m["context"].as_u64().unwrap() > 0 && !m["stop"].as_array().unwrap().is_empty(), "{m}");
        assert!(m["sampling"]["temperature"].is_number(), "{m}");
        let modelfile =
            std::fs::read_to_string(export.join("ollama").join(m["name"].as_str().unwrap()).join("Modelfile")).unwrap();
        assert!(modelfile.contains(&format!("FROM ../../{}", m["file"].as_str().unwrap())), "{modelfile}");
        assert!(modelfile.contains("PARAMETER stop ") && modelfile.contains("TEMPLATE \"\"\""), "{modelfile}");
        assert_eq!(
            modelfile.contains("ADAPTER ../../models/tiny-adapter.gguf"),
            m["level"] == "adapter",
            "{modelfile}"
        );
    }
    let server = json_file(export.join("llama-server.json"));
    let aliases: Vec<&str> =
        server["models"].as_array().unwrap().iter().map(|m| m["model_alias"].as_str().unwrap()).collect();
    assert_eq!(aliases, ["tiny-f16", "tiny-q8_0", "tiny-q4_k_m", "tiny-adapter"]);
    assert_eq!(server["models"][3]["lora_path"], "models/tiny-adapter.gguf");
    let again = ws.run(&["export", "tiny", "--to", export.to_str().unwrap()]);
    assert_eq!(again.code(), 2, "an existing export is replaced only with --force: {again:?}");
    let r = ws.run(&["export", "tiny", "--level", "q8_0", "--force", "--to", export.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(json_file(export.join("models.json"))["models"].as_array().unwrap().len(), 2, "q8_0 and the adapter");

    let (_, ev) = ws.build_json(&[]);
    assert!(with_event(&ev, "start").is_empty(), "a second build is a no-op");
}

#[test]
fn a_killed_training_resumes_from_its_checkpoint() {
    let ws = TestWorkspace::copy_of("tiny-model");
    let longer = ws.read("forge.kdl").replace("epochs=3", "epochs=12");
    ws.write("forge.kdl", &longer);
    assert_eq!(ws.run(&["build", "tiny:dataset"]).code(), 0);
    let mut child = ws.cmd(&["build", "tiny:adapter"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Checkpoints are written at every epoch end: kill -9 once one exists.
    let t0 = Instant::now();
    let checkpoint = || {
        walkdir::WalkDir::new(ws.file(".forge-cache/work-v1"))
            .into_iter()
            .filter_map(Result::ok)
            .any(|e| e.file_name() == "state.json" && e.path().parent().is_some_and(|p| p.ends_with("checkpoint")))
    };
    while !checkpoint() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "training ended before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let status: Value = serde_json::from_str(&ws.run(&["status", "--json", "tiny:adapter"]).stdout()).unwrap();
    assert_eq!(status["artifacts"][1]["status"], "stale", "{status:#}");

    let r = ws.run(&["build", "tiny:adapter"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let log = ws.read(".forge-cache/logs-v1/tiny--adapter.log");
    assert!(log.contains("resuming from the checkpoint at step"), "{log}");
    let resumed = std::fs::read(ws.artifact_path("tiny:adapter").join("adapter_model.safetensors")).unwrap();

    let clean = TestWorkspace::copy_of("tiny-model");
    clean.write("forge.kdl", &longer);
    assert_eq!(clean.run(&["build", "tiny:adapter"]).code(), 0);
    let whole = std::fs::read(clean.artifact_path("tiny:adapter").join("adapter_model.safetensors")).unwrap();
    assert!(resumed == whole, "the resumed adapter is byte-identical to an uninterrupted run's");
}

/// The tiny model with a benchmark of its q8_0 file whose verifier takes a while, so a build
/// can be killed in the middle of it.
fn with_slow_benchmark(ws: &TestWorkspace) {
    let m = ws.read("forge.kdl").replace(
        "    quantize \"f16\" \"q8_0\" \"q4_k_m\"\n",
        "    quantize \"q8_0\"\n    benchmark prompts=8 samples=2 attempts=2 max-tokens=24 seed=3\n",
    );
    let m = m.replace(
        "    grammar \"poster\" start=\"poster\" {",
        "    judge { command \"sh\" \"-c\" \"sleep 0.15; cat > /dev/null; echo pass\" name=\"slow\" }\n    grammar \"poster\" start=\"poster\" {",
    );
    assert!(m.contains("benchmark") && m.contains("judge"), "{m}");
    ws.write("forge.kdl", &m);
}

/// The answers of a benchmark: what was generated and how it was graded (timings differ).
fn answers(ws: &TestWorkspace) -> Vec<(String, Vec<(String, bool)>)> {
    let bench = json_file(ws.artifact_path("tiny:bench:q8_0").join("bench.json"));
    bench["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let samples = p["samples"].as_array().unwrap();
            let graded =
                samples.iter().map(|s| (s["text"].as_str().unwrap().to_string(), s["pass"].as_bool().unwrap()));
            (p["id"].as_str().unwrap().to_string(), graded.collect())
        })
        .collect()
}

/// Hostile testing: a killed benchmark's resume was untested.
#[test]
fn a_killed_benchmark_resumes_after_its_finished_prompts() {
    let ws = TestWorkspace::copy_of("tiny-model");
    with_slow_benchmark(&ws);
    assert_eq!(ws.run(&["build", "tiny:gguf:q8_0"]).code(), 0);
    let mut child = ws.cmd(&["build", "tiny:bench:q8_0"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    let finished_prompts = || {
        walkdir::WalkDir::new(ws.file(".forge-cache/work-v1"))
            .into_iter()
            .filter_map(Result::ok)
            .find(|e| e.file_name() == "prompts.jsonl")
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .map_or(0, |t| t.lines().count())
    };
    while finished_prompts() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no prompt finished");
        assert!(child.try_wait().unwrap().is_none(), "the benchmark ended before it could be killed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let done = finished_prompts();
    assert!(done < 8, "killed after all prompts: nothing left to resume");

    let r = ws.run(&["build", "tiny:bench:q8_0"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let log = ws.read(".forge-cache/logs-v1/tiny--bench--q8_0.log");
    assert!(log.contains(&format!("resuming after {done} finished prompts")), "{log}");
    let resumed = answers(&ws);
    assert_eq!(resumed.len(), 8);

    let clean = TestWorkspace::copy_of("tiny-model");
    with_slow_benchmark(&clean);
    assert_eq!(clean.run(&["build", "tiny:bench:q8_0"]).code(), 0);
    assert_eq!(resumed, answers(&clean), "the resumed benchmark answers as an uninterrupted one does");
}

/// Hostile testing: a context shorter than the benchmark's prompts failed only after training.
/// Now the adapter stage measures the prompts with the base's tokenizer before it trains.
#[test]
fn a_prompt_longer_than_the_context_fails_before_training() {
    let ws = TestWorkspace::copy_of("tiny-model");
    let long = "Hear the long decree of the realm, read aloud in every square. ".repeat(12);
    let m = ws.read("forge.kdl").replace("input \"Target:", &format!("input \"{long}Target:")).replace(
        "    quantize \"f16\" \"q8_0\" \"q4_k_m\"\n",
        "    quantize \"q8_0\"\n    benchmark prompts=2 samples=1 max-tokens=32\n",
    );
    ws.write("forge.kdl", &m);
    assert_eq!(ws.run(&["check"]).code(), 0, "the prompt's length in tokens is not known before the tokenizer is");
    let r = ws.run(&["build", "tiny:adapter"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr().contains("but the base's context holds 128"), "{r:?}");
    let log = ws.read(".forge-cache/logs-v1/tiny--adapter.log");
    assert!(!log.contains(" steps on "), "it trained first: {log}");
}
