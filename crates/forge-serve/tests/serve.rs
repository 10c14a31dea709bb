//! `forge serve` over real HTTP on 127.0.0.1: OpenAI's wire format (streamed and not) read by a
//! real HTTP client, seed 004's endpoints, the memory budget with more NPCs than fit, the
//! bounded queue, the API key, and bad input — every one a 4xx in OpenAI's error shape, after
//! which the server still answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use forge_infer::QModel;
use forge_infer::tokenizer::ChatMessage;
use forge_model::{Llama, ModelConfig, ScratchShape, Tokenizer};
use forge_quant::QuantLevel;
use forge_serve::{Config, Npc};
use serde_json::{Value, json};

/// Writes an untrained model (2 layers, hidden 128) as `NAME.gguf` in `dir`; seeds differ per NPC.
fn npc(dir: &Path, name: &str, seed: u64) -> Npc {
    let texts = ["HEAR YE! The baron hoards grain. Beware the miller, who waters the ale.".to_string()];
    let tok = Tokenizer::train_bpe(texts.into_iter().cycle().take(8), 300).unwrap();
    let shape =
        ScratchShape { layers: 2, hidden: 128, heads: 4, kv_heads: 2, ffn: 256, context: 256, rope_theta: 10_000.0 };
    let model = Llama::random(ModelConfig::scratch(&shape, &tok), seed, &Device::Cpu).unwrap();
    let file = dir.join(format!("{name}.gguf"));
    forge_gguf::convert::write_model(&file, &model, &tok, QuantLevel::Q8_0, name, Default::default()).unwrap();
    Npc::new(name, file)
}

struct Server {
    base: String,
    _rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    files: Vec<PathBuf>,
}

fn start(dir: &Path, names: &[&str], config: impl FnOnce(u64) -> Config) -> Server {
    let npcs: Vec<Npc> = names.iter().enumerate().map(|(i, n)| npc(dir, n, i as u64 + 1)).collect();
    start_with(npcs, config)
}

fn start_with(npcs: Vec<Npc>, config: impl FnOnce(u64) -> Config) -> Server {
    // reqwest's rustls backend (enabled in this workspace by the teacher client) needs a
    // process-wide crypto provider, even for plain HTTP.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let one = forge_serve::resident_bytes(&QModel::load(&npcs[0].file).unwrap());
    let config = config(one);
    let files = npcs.iter().map(|n| n.file.clone()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(forge_serve::serve(listener, npcs, config, std::future::pending()));
    Server { base, _rt: rt, client: reqwest::Client::new(), files }
}

impl Server {
    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self._rt.block_on(f)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
        self.block(async {
            let r = self.client.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
            let (status, headers) = (r.status().as_u16(), r.headers().clone());
            (status, r.json().await.unwrap_or(Value::Null), headers)
        })
    }

    fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        self.block(async {
            let r = self
                .client
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
        })
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.block(async {
            let r = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    }

    /// A streamed chat completion: the `data:` payloads in order.
    fn stream(&self, body: Value) -> Vec<String> {
        self.block(async {
            let r = self.client.post(format!("{}/v1/chat/completions", self.base)).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
            let text = r.text().await.unwrap();
            text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
        })
    }
}

fn chat(model: &str, content: &str, extra: Value) -> Value {
    let mut v =
        json!({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    v
}

fn is_openai_error(v: &Value) -> bool {
    v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) && v["error"]["type"].is_string()
}

/// The non-streamed answer is the decoder's own greedy answer to the same chat prompt; the
/// streamed one arrives as a role chunk, content chunks that add up to it, a finish reason and
/// `[DONE]`; `/v1/models`, `/list`, `/chat/{npc}` and `/preload/{npc}` answer in their shapes.
#[test]
fn the_openai_wire_format_and_seed_004s_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["aldric", "maud"], |_| Config::default());
    let (status, v, _) = s.post("/v1/chat/completions", chat("aldric", "Who hoards the grain?", json!({})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "aldric");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // The same answer straight from the decoder.
    let q = QModel::load(&s.files[0]).unwrap();
    let prompt = q.tokenizer.render_chat(&[ChatMessage::new("user", "Who hoards the grain?")], true).unwrap();
    let ids = q.tokenizer.encode_prompt(&prompt).unwrap();
    let greedy = forge_infer::Sampling { temperature: 0.0, max_tokens: 12, ..Default::default() };
    let p = q.prefill(&ids, 12).unwrap();
    assert_eq!(text, q.generate_after(&p, &greedy).unwrap().text);

    let events = s.stream(chat("aldric", "Who hoards the grain?", json!({"stream": true})));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text, "the streamed chunks add up to the whole answer");
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

    let (status, models) = s.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["aldric", "maud"]);

    let (status, v, _) = s.post("/preload/maud", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["resident"], true);
    let (_, list) = s.get("/list");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert!(list["npcs"].as_array().unwrap().iter().all(|n| n["resident"] == true), "{list}");
    let (status, v, _) =
        s.post("/chat/maud", json!({"message": "Beware the miller?", "temperature": 0, "max_tokens": 8}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["npc"], "maud");
    assert!(v["reply"].is_string() && v["usage"]["completion_tokens"].as_u64().unwrap() <= 8);
    let (status, metrics) = s.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("forge_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2"), "{metrics}");
    assert!(metrics.contains("forge_models_resident 2"), "{metrics}");
}

/// With room for two models, loading a third drops the least recently used; the resident bytes
/// never exceed the budget, and a dropped NPC loads again when asked for.
#[test]
fn the_memory_budget_holds_with_more_npcs_than_fit() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["a", "b", "c"], |one| Config {
        memory: forge_serve::budget_for(2 * one + one / 2),
        ..Config::default()
    });
    for npc in ["a", "b", "a", "c", "b"] {
        let (status, v, _) = s.post(&format!("/preload/{npc}"), json!({}));
        assert_eq!(status, 200, "{v}");
        let (_, list) = s.get("/list");
        let list: Value = serde_json::from_str(&list).unwrap();
        let resident: Vec<&str> = list["npcs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["resident"] == true)
            .map(|n| n["name"].as_str().unwrap())
            .collect();
        assert!(resident.len() <= 2 && resident.contains(&npc), "after {npc}: {resident:?}");
    }
    let (_, list) = s.get("/list");
    let list: Value = serde_json::from_str(&list).unwrap();
    // "a" was used before "c" and "b": it went.
    let resident: Vec<bool> = list["npcs"].as_array().unwrap().iter().map(|n| n["resident"] == true).collect();
    assert_eq!(resident, [false, true, true]);
    let (_, metrics) = s.get("/metrics");
    let value = |name: &str| -> f64 {
        metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().parse().unwrap()
    };
    assert!(value("forge_resident_bytes") <= value("forge_memory_budget_bytes"));
    assert_eq!(value("forge_model_evictions_total"), 2.0, "{metrics}");
    assert_eq!(value("forge_model_loads_total"), 4.0);
}

/// A model that is busy with one answer and has no room to queue turns the next request away
/// with 503 and `Retry-After` at once; a client that hangs up mid-stream frees the model.
#[test]
fn a_full_queue_answers_503_and_a_hung_up_stream_frees_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["a"], |_| Config { batch: 1, queue: 0, ..Config::default() });
    let (status, _, _) = s.post("/preload/a", json!({}));
    assert_eq!(status, 200);
    // The answer is long (greedy, no stop token for 200 tokens), and its client reads only the
    // first chunk: the model can run only a few dozen pieces ahead of it, so it stays busy.
    let (_, v, _) = s.post("/v1/chat/completions", chat("a", "Talk at length.", json!({"max_tokens": 200})));
    assert_eq!(v["usage"]["completion_tokens"], 200, "{v}");
    s.block(async {
        let long = chat("a", "Talk at length.", json!({"stream": true, "max_tokens": 200}));
        let mut r = s.client.post(format!("{}/v1/chat/completions", s.base)).json(&long).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // The first chunk: the model is answering it.
        let first = r.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("assistant"));
        let busy = s
            .client
            .post(format!("{}/v1/chat/completions", s.base))
            .json(&chat("a", "And me?", json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(busy.status(), 503);
        assert_eq!(busy.headers()["retry-after"], "1");
        let v: Value = busy.json().await.unwrap();
        assert!(is_openai_error(&v) && v["error"]["code"] == "queue_full", "{v}");
        drop(r);
        // Hung up: the model stops that answer and takes the next request.
        let t0 = std::time::Instant::now();
        loop {
            let r = s
                .client
                .post(format!("{}/v1/chat/completions", s.base))
                .json(&chat("a", "Now?", json!({})))
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the model never came free");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Every bad request gets its 4xx in OpenAI's error shape, and the server keeps serving.
#[test]
fn bad_requests_get_4xx_errors_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["a"], |_| Config { max_body: 64 * 1024, ..Config::default() });
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"model\": \"a\", \"messages\": [".to_vec(), 400),
        ("not an object", b"[1, 2, 3]".to_vec(), 400),
        ("oversized body", serde_json::to_vec(&chat("a", &"x".repeat(100_000), json!({}))).unwrap(), 413),
        ("unknown model", serde_json::to_vec(&chat("nobody", "hi", json!({}))).unwrap(), 404),
        (
            "absurd max_tokens",
            serde_json::to_vec(&chat("a", "hi", json!({"max_tokens": 1_000_000_000u64}))).unwrap(),
            400,
        ),
        ("zero max_tokens", serde_json::to_vec(&chat("a", "hi", json!({"max_tokens": 0}))).unwrap(), 400),
        ("negative temperature", serde_json::to_vec(&chat("a", "hi", json!({"temperature": -1}))).unwrap(), 400),
        ("top_p of 0", serde_json::to_vec(&chat("a", "hi", json!({"top_p": 0}))).unwrap(), 400),
        ("n of 2", serde_json::to_vec(&chat("a", "hi", json!({"n": 2}))).unwrap(), 400),
        ("no messages", serde_json::to_vec(&json!({"model": "a", "messages": []})).unwrap(), 400),
        (
            "unknown role",
            serde_json::to_vec(&json!({"model": "a", "messages": [{"role": "wizard", "content": "hi"}]})).unwrap(),
            400,
        ),
        ("five stops", serde_json::to_vec(&chat("a", "hi", json!({"stop": ["a", "b", "c", "d", "e"]}))).unwrap(), 400),
        (
            "a prompt beyond the context",
            serde_json::to_vec(&chat("a", &"grain ".repeat(2000), json!({}))).unwrap(),
            400,
        ),
    ];
    for (what, body, want) in cases {
        let (status, v) = s.post_raw("/v1/chat/completions", body);
        assert_eq!(status, want, "{what}: {v}");
        assert!(is_openai_error(&v), "{what}: {v}");
    }
    for path in ["/chat/..%2F..%2Fetc%2Fpasswd", "/chat/a%00", "/preload/../a", "/chat/nobody"] {
        let (status, v, _) = s.post(path, json!({"message": "hi"}));
        assert_eq!(status, 404, "{path}: {v}");
        assert!(is_openai_error(&v), "{path}: {v}");
    }
    let (status, _) = s.get("/no/such/endpoint");
    assert_eq!(status, 404);
    let (status, v, _) = s.post("/v1/chat/completions", chat("a", "still there?", json!({})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(s.get("/health").0, 200);
}

/// With a key, every route but `/health` needs `Authorization: Bearer <key>`.
#[test]
fn an_api_key_is_required_when_the_server_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["a"], |_| Config { api_key: Some("sekrit-123".into()), ..Config::default() });
    let (status, v, _) = s.post("/v1/chat/completions", chat("a", "hi", json!({})));
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(!v.to_string().contains("sekrit"), "the error does not echo the key");
    assert_eq!(s.get("/v1/models").0, 401);
    assert_eq!(s.get("/health").0, 200);
    let wrong = s.block(async {
        s.client.get(format!("{}/v1/models", s.base)).bearer_auth("sekrit-124").send().await.unwrap().status()
    });
    assert_eq!(wrong, 401);
    let ok = s.block(async {
        s.client
            .post(format!("{}/v1/chat/completions", s.base))
            .bearer_auth("sekrit-123")
            .json(&chat("a", "hi", json!({})))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(ok, 200);
}

/// Retry-until-success: the server grades each answer with the NPC's verifiers and retries with
/// the next seed until one passes; it returns only a passing answer (the very answer that seed
/// gives), the number of attempts and what failed in each; when the attempts run out it says so.
#[test]
fn retry_until_success_returns_a_passing_answer_and_its_attempts() {
    use forge_bench::judge::{Judge, Subject};
    use forge_manifest::{Check, Criterion, Span, Spanned};
    let dir = tempfile::tempdir().unwrap();
    let mut a = npc(dir.path(), "a", 1);
    // The answers of seeds 0.. straight from the decoder.
    let q = QModel::load(&a.file).unwrap();
    let prompt = q.tokenizer.render_chat(&[ChatMessage::new("user", "Speak.")], true).unwrap();
    let ids = q.tokenizer.encode_prompt(&prompt).unwrap();
    let p = q.prefill(&ids, 12).unwrap();
    let answers: Vec<String> = (0..16)
        .map(|seed| {
            let s = forge_infer::Sampling { temperature: 1.0, top_p: 1.0, top_k: None, seed, max_tokens: 12 };
            q.generate_after(&p, &s).unwrap().text
        })
        .collect();
    // A length limit that seed 0's answer breaks and a later one keeps.
    let judge_for = |max: u32| {
        let c = Criterion { name: Spanned::new("short".into(), Span::UNKNOWN), check: Check::MaxChars { max } };
        Judge::new(&[c], dir.path(), true).unwrap()
    };
    let values = Default::default();
    let passes = |j: &Judge, out: &str| {
        let subject = Subject { input: "Speak.", prompt: &prompt, output: out, values: &values };
        j.grade_verifiers(&subject).into_iter().all(|g| g.is_none_or(|o| o.pass))
    };
    let (max, first) = (1..200)
        .find_map(|max| {
            let j = judge_for(max);
            let pass: Vec<bool> = answers.iter().map(|t| passes(&j, t)).collect();
            (!pass[0]).then(|| pass.iter().position(|p| *p)).flatten().map(|f| (max, f))
        })
        .expect("some seed's answer is shorter than seed 0's");
    a.judge = Some(std::sync::Arc::new(judge_for(max)));
    let s = start_with(vec![a, npc(dir.path(), "plain", 2)], |_| Config::default());
    let ask = |attempts: u64| {
        let body = json!({
            "model": "a", "messages": [{"role": "user", "content": "Speak."}],
            "temperature": 1.0, "max_tokens": 12, "seed": 0,
            "forge": {"verify": true, "max_attempts": attempts},
        });
        s.post("/v1/chat/completions", body)
    };
    let (status, v, _) = ask(16);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["forge"]["passed"], true, "{v}");
    assert_eq!(v["forge"]["attempts"], first + 1, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], answers[first].as_str());
    let failed = v["forge"]["failed"].as_array().unwrap();
    assert!(failed[..first].iter().all(|f| f == &json!(["short"])) && failed[first] == json!([]), "{v}");

    let (status, v, _) = ask(1);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["forge"], json!({"attempts": 1, "passed": false, "failed": [["short"]]}));

    let (status, v, _) = s.post("/chat/plain", json!({"message": "Speak.", "forge": {"verify": true}}));
    assert_eq!(status, 400, "an NPC without verifiers cannot verify: {v}");
    assert!(is_openai_error(&v));
    let (status, v, _) = ask(1000);
    assert_eq!(status, 400, "{v}");
    let (_, metrics) = s.get("/metrics");
    assert!(metrics.contains("forge_verified_attempts_total{result=\"pass\"} 1"), "{metrics}");
}

/// Writes a random LoRA adapter GGUF (rank 4 on every projection) for `base`.
fn adapter_for(base: &Llama, path: &Path, seed: u64) {
    use forge_model::lora::{LoraSpec, peft_key};
    let cfg = &base.cfg;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec =
        LoraSpec { rank: 4, alpha: 8.0, dropout: 0.0, rslora: false, targets: targets.map(String::from).to_vec() };
    let mut rng = forge_rng::SplitMix64::new(seed);
    let mut tensors = std::collections::HashMap::new();
    let (q, kv) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
    for l in 0..cfg.layers {
        for m in targets {
            let (out, inp) = match m {
                "q_proj" => (q, cfg.hidden),
                "k_proj" | "v_proj" => (kv, cfg.hidden),
                "o_proj" => (cfg.hidden, q),
                "gate_proj" | "up_proj" => (cfg.intermediate, cfg.hidden),
                _ => (cfg.hidden, cfg.intermediate),
            };
            let mut t = |rows: usize, cols: usize| {
                let v: Vec<f32> = (0..rows * cols).map(|_| (rng.next_f64() as f32 - 0.5) * 0.3).collect();
                candle_core::Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            tensors.insert(peft_key(l, m, 'A'), t(4, inp));
            tensors.insert(peft_key(l, m, 'B'), t(out, 4));
        }
    }
    let (md, ts) = forge_gguf::adapter::convert(cfg, &spec, &tensors, "npc").unwrap();
    forge_gguf::convert::write_file(path, &md, &ts).unwrap();
}

/// NPCs trained as adapters on one base share it in memory: two NPCs whose adapter artifacts
/// each hold a copy of the base are resident together in a budget with room for one base (and
/// the adapters), and each answers exactly as the decoder does with its adapter on the base.
#[test]
fn npcs_with_adapters_share_their_base_in_memory() {
    use forge_infer::{Adapter, Cache};
    let dir = tempfile::tempdir().unwrap();
    let texts = ["HEAR YE! The baron hoards grain. Beware the miller, who waters the ale.".to_string()];
    let tok = Tokenizer::train_bpe(texts.into_iter().cycle().take(8), 300).unwrap();
    let shape =
        ScratchShape { layers: 2, hidden: 128, heads: 4, kv_heads: 2, ffn: 256, context: 256, rope_theta: 10_000.0 };
    let base = Llama::random(ModelConfig::scratch(&shape, &tok), 5, &Device::Cpu).unwrap();
    let mut npcs = Vec::new();
    for (i, name) in ["aldric", "maud"].iter().enumerate() {
        // Each NPC's own copy of the base, as each target's gguf-adapter artifact has.
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        forge_gguf::convert::write_model(
            &d.join("base.gguf"),
            &base,
            &tok,
            QuantLevel::Q8_0,
            "base",
            Default::default(),
        )
        .unwrap();
        adapter_for(&base, &d.join("adapter.gguf"), i as u64 + 7);
        let mut npc = Npc::new(name, d.join("base.gguf"));
        npc.adapter = Some(d.join("adapter.gguf"));
        npcs.push(npc);
    }
    let files: Vec<(PathBuf, PathBuf)> = npcs.iter().map(|n| (n.file.clone(), n.adapter.clone().unwrap())).collect();
    let s = start_with(npcs, |one| Config { memory: forge_serve::budget_for(one + one / 2), ..Config::default() });
    for name in ["aldric", "maud"] {
        let (status, v, _) = s.post(&format!("/preload/{name}"), json!({}));
        assert_eq!(status, 200, "{v}");
    }
    let (_, list) = s.get("/list");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert!(list["npcs"].as_array().unwrap().iter().all(|n| n["resident"] == true), "both resident: {list}");
    let (_, metrics) = s.get("/metrics");
    assert!(metrics.contains("forge_models_resident 1"), "one base in memory: {metrics}");

    let mut answers = Vec::new();
    for (name, (base_file, adapter_file)) in ["aldric", "maud"].iter().zip(&files) {
        let (status, v, _) =
            s.post("/v1/chat/completions", chat(name, "Who hoards the grain?", json!({"max_tokens": 10})));
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        // The decoder's greedy answer with the NPC's adapter on the base.
        let q = QModel::load(base_file).unwrap();
        let a = Adapter::load(adapter_file, &q).unwrap();
        let prompt = q.tokenizer.render_chat(&[ChatMessage::new("user", "Who hoards the grain?")], true).unwrap();
        let ids = q.tokenizer.encode_prompt(&prompt).unwrap();
        let stop = q.tokenizer.stop_ids(&q.cfg.eos);
        let mut cache = Cache::default();
        let mut logits = q.step_with(&ids, &mut cache, Some(&a)).unwrap();
        let mut out = Vec::new();
        for _ in 0..10 {
            let t = forge_infer::sampling::argmax(&logits);
            if stop.contains(&t) {
                break;
            }
            out.push(t);
            logits = q.step_with(&[t], &mut cache, Some(&a)).unwrap();
        }
        assert_eq!(text, q.tokenizer.decode(&out).unwrap(), "{name}");
        answers.push(text);
    }
    assert_ne!(answers[0], answers[1], "each NPC answers with its own adapter");
}

/// Concurrent requests to one model decode together (their next tokens in one forward pass),
/// and each gets the answer it gets alone.
#[test]
fn concurrent_requests_batched_together_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["a"], |_| Config::default());
    let prompts = ["Who hoards the grain?", "Beware the miller!", "HEAR YE", "ale", "The baron hoards grain.", "geese"];
    let body = |p: &str, seed: u64| chat("a", p, json!({"max_tokens": 24, "temperature": 0.8, "seed": seed}));
    let alone: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            s.post("/v1/chat/completions", body(p, i as u64)).1["choices"][0]["message"]["content"].to_string()
        })
        .collect();
    let together: Vec<String> = s.block(async {
        let calls =
            prompts.iter().enumerate().map(|(i, p)| {
                let req = s.client.post(format!("{}/v1/chat/completions", s.base)).json(&body(p, i as u64)).send();
                async move {
                    req.await.unwrap().json::<Value>().await.unwrap()["choices"][0]["message"]["content"].to_string()
                }
            });
        futures_util::future::join_all(calls).await
    });
    assert_eq!(together, alone);
}

/// Answers hold memory too (KV cache, activations): with room for the model and one answer,
/// concurrent requests take turns instead of overrunning the budget, and all are answered.
#[test]
fn answers_wait_for_memory_instead_of_overrunning_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let a = npc(dir.path(), "a", 1);
    let model = QModel::load(&a.file).unwrap();
    let gguf = forge_gguf::format::Gguf::open(&a.file).unwrap();
    let cfg = forge_gguf::load::config(&gguf).unwrap();
    let peak = forge_infer::model::load_peak(&gguf, &cfg, forge_infer::Kernels::best());
    let body = |i: u64| chat("a", &format!("Tell me about the baron, please ({i})."), json!({"max_tokens": 32}));
    // Room for the model and one and a half answers of these prompts' length (and for the
    // load's peak).
    let s = start_with(vec![a.clone()], |_| Config::default());
    let (status, v, _) = s.post("/v1/chat/completions", body(0));
    assert_eq!(status, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let answer = model.sequence_bytes(prompt, prompt + 32) as u64;
    let one = forge_serve::resident_bytes(&model);
    assert!(answer > 0 && peak > model.bytes() as u64, "{answer} {peak}");
    let budget = (one + answer * 3 / 2).max(peak);
    let room = (budget - one) / answer;
    assert!(room < 6, "the budget must hold fewer answers than are asked at once: {room}");
    let s = start_with(vec![a], |_| Config { memory: forge_serve::budget_for(budget), ..Config::default() });
    let done = std::sync::atomic::AtomicBool::new(false);
    let (statuses, most) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut most = 0f64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let (_, m) = s.get("/metrics");
                let v = |name: &str| -> f64 {
                    m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().parse().unwrap()
                };
                assert!(v("forge_resident_bytes") <= v("forge_memory_budget_bytes"), "{m}");
                most = most.max(v("forge_answer_bytes"));
            }
            most
        });
        let statuses = s.block(async {
            let calls = (1..7).map(|i| {
                let req = s.client.post(format!("{}/v1/chat/completions", s.base)).json(&body(i)).send();
                async move { req.await.unwrap().status().as_u16() }
            });
            futures_util::future::join_all(calls).await
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (statuses, watcher.join().unwrap())
    });
    assert_eq!(statuses, [200; 6]);
    assert!(most <= (room * answer) as f64, "answers held {most} bytes, room for {room} of {answer}");
}

/// With room for one model, an NPC whose model is busy without pause does not keep the memory
/// for ever: a request for another NPC drains it (after its turn), loads, and is answered.
#[test]
fn a_busy_model_gives_its_memory_to_another_npc_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), &["a", "b"], |one| Config {
        memory: forge_serve::budget_for(one + one / 2),
        ..Config::default()
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (b_status, a_answers) = s.block(async {
        let busy: Vec<_> = (0..3)
            .map(|i| {
                let (client, base, stop) = (s.client.clone(), s.base.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut ok = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let body = chat("a", &format!("Again ({i})."), json!({"max_tokens": 16}));
                        let r = client.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
                        ok += (r.status() == 200) as usize;
                    }
                    ok
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = std::time::Instant::now();
        let b = s.client.post(format!("{}/v1/chat/completions", s.base)).json(&chat("b", "Hello?", json!({})));
        let status = b.send().await.unwrap().status().as_u16();
        assert!(t0.elapsed() < forge_serve::registry::LOAD_WAIT, "b waited {:?}", t0.elapsed());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut a = 0;
        for t in busy {
            a += t.await.unwrap();
        }
        (status, a)
    });
    assert_eq!(b_status, 200);
    assert!(a_answers > 0);
    let (_, metrics) = s.get("/metrics");
    assert!(!metrics.contains("forge_model_evictions_total 0"), "{metrics}");
}
