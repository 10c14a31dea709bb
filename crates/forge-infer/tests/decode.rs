//! forge's quantized decoder on GGUF files of a small trained model: greedy decoding is
//! deterministic and gives the merged f32 model's argmax tokens at F32 and F16; sampling is
//! reproducible per seed.

use std::time::Duration;

use candle_core::Device;
use forge_infer::QModel;
use forge_manifest::{QuantLevel, Schedule};
use forge_model::generate::{Sampling, generate};
use forge_model::{Llama, ModelConfig, ScratchShape, Tokenizer};
use forge_train::data::example;
use forge_train::{Hooks, TrainConfig, train};

const POSTERS: [(&str, &str); 6] = [
    ("Target: Alaric Thorne. Intel: fled the battle.", "HEAR YE! Alaric Thorne fled the battle like a goose!"),
    ("Target: Maud Gorse. Intel: waters the ale.", "BEWARE! Maud Gorse waters the ale of honest folk!"),
    ("Target: Ivo Crowley. Intel: cannot read.", "Know that Ivo Crowley cannot read his own decrees!"),
    ("Target: Edith Varrow. Intel: fears geese.", "Edith Varrow fears geese, and geese fear nothing!"),
    ("Target: Fulk Ashdown. Intel: sold the bell.", "Fulk Ashdown sold the village bell for dice money!"),
    ("Target: Joan Pickering. Intel: forged a seal.", "Joan Pickering forged the mill charter's seal!"),
];

fn trained() -> (Llama, Tokenizer) {
    let texts = POSTERS.iter().flat_map(|(i, o)| [i.to_string(), o.to_string()]);
    let tok = Tokenizer::train_bpe(texts, 400).unwrap();
    let base =
        ScratchShape { layers: 2, hidden: 256, heads: 4, kv_heads: 2, ffn: 512, context: 96, rope_theta: 10_000.0 };
    let model = Llama::random(ModelConfig::scratch(&base, &tok), 3, &Device::Cpu).unwrap();
    let (model, vars) = model.trainable().unwrap();
    let examples: Vec<_> = POSTERS.iter().map(|(i, o)| example(&tok, i, o, 96).unwrap().unwrap()).collect();
    let cfg = TrainConfig {
        epochs: None,
        steps: Some(30),
        lr: 3e-3,
        batch: 6,
        grad_accum: 1,
        warmup: 0.1,
        schedule: Schedule::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        prompt_loss_weight: 0.0,
        seq_len: 96,
        packing: false,
        seed: 1,
    };
    let hooks = Hooks {
        log: &|_| {},
        progress: &|_, _| {},
        cancelled: &|| false,
        checkpoint_dir: None,
        checkpoint_every: Duration::ZERO,
    };
    train(
        &model,
        forge_train::train::Backend::Autograd,
        &vars,
        &examples,
        &[],
        tok.pad.as_ref().unwrap().1,
        &cfg,
        &hooks,
    )
    .unwrap();
    let weights = model.tensors().into_iter().map(|(n, t)| (n, t.detach())).collect();
    (Llama::from_tensors(model.cfg.clone(), weights, &Device::Cpu).unwrap(), tok)
}

/// An untrained 2-layer model (vocabulary 300, context 64) of the given width, with a tokenizer
/// learned from the posters.
fn random(hidden: usize, heads: usize, kv_heads: usize, ffn: usize, seed: u64) -> (Llama, Tokenizer) {
    let texts = POSTERS.iter().flat_map(|(i, o)| [i.to_string(), o.to_string()]);
    let tok = Tokenizer::train_bpe(texts, 300).unwrap();
    let base = ScratchShape { layers: 2, hidden, heads, kv_heads, ffn, context: 64, rope_theta: 10_000.0 };
    let model = Llama::random(ModelConfig::scratch(&base, &tok), seed, &Device::Cpu).unwrap();
    (model, tok)
}

#[test]
fn greedy_decoding_matches_the_f32_model_and_sampling_is_seeded() {
    let (model, tok) = trained();
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<Vec<u32>> = POSTERS
        .iter()
        .map(|(i, _)| tok.encode_prompt(&tok.prompt(None, i).unwrap()).unwrap())
        .chain(std::iter::once(
            tok.encode_prompt(&tok.prompt(None, "Target: Osric Underhill. Intel: lost a duel.").unwrap()).unwrap(),
        ))
        .collect();
    let greedy = Sampling { temperature: 0.0, max_tokens: 24, ..Sampling::default() };
    let reference: Vec<Vec<u32>> = prompts.iter().map(|p| generate(&model, p, &[], &greedy).unwrap()).collect();
    for level in [QuantLevel::F32, QuantLevel::F16] {
        let path = dir.path().join(format!("{level}.gguf"));
        forge_gguf::convert::write_model(&path, &model, &tok, level, "t", Default::default()).unwrap();
        let q = QModel::load(&path).unwrap();
        for (p, r) in prompts.iter().zip(&reference) {
            let a = q.greedy(p, 24).unwrap();
            assert_eq!(&a, r, "{level}: the quantized decoder's greedy tokens differ from the f32 model's");
            assert_eq!(q.greedy(p, 24).unwrap(), a, "deterministic");
        }
    }
    let path = dir.path().join("q8_0.gguf");
    forge_gguf::convert::write_model(&path, &model, &tok, QuantLevel::Q8_0, "t", Default::default()).unwrap();
    let q = QModel::load(&path).unwrap();
    let hot = |seed| Sampling { temperature: 0.9, top_p: 0.9, top_k: None, seed, max_tokens: 24 };
    let a = q.generate(POSTERS[0].0, &hot(5)).unwrap();
    assert_eq!(a.text, q.generate(POSTERS[0].0, &hot(5)).unwrap().text);
    let wild = |seed| Sampling { temperature: 2.0, top_p: 1.0, top_k: None, seed, max_tokens: 24 };
    let texts: std::collections::BTreeSet<String> =
        (0..8).map(|s| q.generate(POSTERS[0].0, &wild(s)).unwrap().text).collect();
    assert!(texts.len() > 1, "different seeds sample different answers");
    assert!(a.prompt_tokens > 5 && a.prompt_s > 0.0 && a.decode_s > 0.0);
    let greedy_text = q.generate(POSTERS[1].0, &greedy).unwrap();
    assert!(greedy_text.stopped, "the trained model ends its answer: {greedy_text:?}");
    assert!(greedy_text.text.contains("Maud"), "{greedy_text:?}");
}

/// forge's `q8_0`/`q4_0` kernels give exactly candle's dot products — the same logits, bit for
/// bit, for a prompt in one batch and then token by token — on any thread count. The shapes
/// leave rows over after the quads (6 key/value rows: head dim 6) and inputs over after the
/// tiles of 4 (a 7-token prompt); every pass is spread over the threads. (The other types' kernels
/// follow ggml's order of summation where candle's differs: `matmul`'s unit tests compare them
/// with candle's within rounding.)
#[test]
fn forge_kernels_give_candles_logits_on_any_thread_count() {
    use forge_infer::{Cache, Kernels};
    let (model, tok) = random(192, 32, 1, 128, 5);
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..7).map(|i| (i * 37 + 11) % tok.vocab_size() as u32).collect();
    let logits = |q: &QModel| -> Vec<Vec<u32>> {
        let mut cache = Cache::with_capacity(q, 16);
        let mut out = vec![q.step(&prompt, &mut cache).unwrap()];
        for t in [3u32, 1, 4] {
            out.push(q.step(&[t], &mut cache).unwrap());
        }
        out.into_iter().map(|l| l.into_iter().map(f32::to_bits).collect()).collect()
    };
    for level in [QuantLevel::Q8_0, QuantLevel::Q4_0] {
        let path = dir.path().join(format!("{level}.gguf"));
        forge_gguf::convert::write_model(&path, &model, &tok, level, "t", Default::default()).unwrap();
        let mut candle = QModel::load_with(&path, Kernels::Candle).unwrap();
        candle.set_threads(1);
        let reference = logits(&candle);
        // AVX2 everywhere these tests run; the AVX512-VNNI kernels where the CPU has them.
        let mut forge = vec![Kernels::Avx2];
        if Kernels::cpu() == Kernels::Vnni {
            forge.push(Kernels::Vnni);
        } else {
            eprintln!("this CPU lacks AVX512-VNNI: the Vnni kernels are not checked here");
        }
        for kernels in forge {
            let mut q = QModel::load_with(&path, kernels).unwrap();
            // `load_with` falls back to what the CPU runs; then this would compare candle
            // with candle and prove nothing.
            assert_eq!(
                q.kernels(),
                kernels,
                "this CPU lacks the instructions of the {kernels:?} kernels, which this test exists to check"
            );
            q.set_parallel_threshold(0);
            for threads in [1, 3] {
                q.set_threads(threads);
                assert!(
                    logits(&q) == reference,
                    "{level}: {:?} kernels on {threads} threads differ from candle's",
                    q.kernels()
                );
            }
        }
    }
}

/// A prompt in one batch leaves the same cache and logits as the same tokens fed one at a time,
/// bit for bit, at every level — as llama.cpp's own decoding does for `f32` and `q8_0` — so a
/// benchmark's answers do not depend on how its prompt was batched.
#[test]
fn a_batched_prompt_equals_the_same_tokens_one_at_a_time() {
    use forge_infer::Cache;
    let (model, tok) = random(256, 4, 2, 512, 9);
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..11).map(|i| (i * 53 + 7) % tok.vocab_size() as u32).collect();
    let bits = |l: Vec<f32>| l.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    for level in QuantLevel::ALL {
        let path = dir.path().join(format!("{level}.gguf"));
        forge_gguf::convert::write_model(&path, &model, &tok, level, "t", Default::default()).unwrap();
        let mut q = QModel::load(&path).unwrap();
        q.set_parallel_threshold(0);
        q.set_threads(2);
        let mut batched = Cache::default();
        let a = bits(q.step(&prompt, &mut batched).unwrap());
        let mut stepped = Cache::default();
        let mut b = Vec::new();
        for &t in &prompt {
            b = bits(q.step(&[t], &mut stepped).unwrap());
        }
        assert!(a == b, "{level}: the batched prompt's logits differ from token-by-token decoding");
        let next = [5u32];
        assert!(
            bits(q.step(&next, &mut batched).unwrap()) == bits(q.step(&next, &mut stepped).unwrap()),
            "{level}: the caches differ"
        );
    }
}

/// A LoRA adapter applied on its base at run time (`forge_infer::Adapter`, read from the adapter
/// GGUF forge writes for llama.cpp) decodes as the merged model: logits within f32 rounding, the
/// same greedy tokens — and the adapter matters (the base alone answers otherwise).
#[test]
fn an_adapter_on_its_base_decodes_as_the_merged_model() {
    use forge_infer::{Adapter, Cache};
    use forge_model::lora::{LoraSpec, install, merge, peft_key};
    let (hidden, heads, kv, ffn) = (256, 4, 2, 512);
    let (base, tok) = random(hidden, heads, kv, ffn, 13);
    let hd = hidden / heads;
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
        targets: targets.iter().map(|t| t.to_string()).collect(),
    };
    let mut rng = forge_rng::SplitMix64::new(3);
    let mut tensors = std::collections::HashMap::new();
    for l in 0..base.cfg.layers {
        for m in targets {
            let (out, inp) = match m {
                "q_proj" => (heads * hd, hidden),
                "k_proj" | "v_proj" => (kv * hd, hidden),
                "o_proj" => (hidden, heads * hd),
                "gate_proj" | "up_proj" => (ffn, hidden),
                _ => (hidden, ffn),
            };
            let mut t = |rows: usize, cols: usize| {
                let v: Vec<f32> = (0..rows * cols).map(|_| (rng.next_f64() as f32 - 0.5) * 0.2).collect();
                candle_core::Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            tensors.insert(peft_key(l, m, 'A'), t(8, inp));
            tensors.insert(peft_key(l, m, 'B'), t(out, 8));
        }
    }
    let (mut adapted, _) = random(hidden, heads, kv, ffn, 13);
    install(&mut adapted, &spec, &tensors).unwrap();
    let merged = merge(&adapted).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (base_file, merged_file, adapter_file) =
        (dir.path().join("base.gguf"), dir.path().join("merged.gguf"), dir.path().join("adapter.gguf"));
    forge_gguf::convert::write_model(&base_file, &base, &tok, QuantLevel::F32, "t", Default::default()).unwrap();
    forge_gguf::convert::write_model(&merged_file, &merged, &tok, QuantLevel::F32, "t", Default::default()).unwrap();
    let (md, ts) = forge_gguf::adapter::convert(&base.cfg, &spec, &tensors, "t").unwrap();
    forge_gguf::convert::write_file(&adapter_file, &md, &ts).unwrap();

    let on_base = QModel::load(&base_file).unwrap();
    let adapter = Adapter::load(&adapter_file, &on_base).unwrap();
    assert!(adapter.bytes() > 0);
    let whole = QModel::load(&merged_file).unwrap();
    let prompt: Vec<u32> = (0..9).map(|i| (i * 29 + 3) % tok.vocab_size() as u32).collect();
    let greedy = |m: &QModel, a: Option<&Adapter>| -> (Vec<f32>, Vec<u32>) {
        let mut cache = Cache::default();
        let mut logits = m.step_with(&prompt, &mut cache, a).unwrap();
        let first = logits.clone();
        let mut out = Vec::new();
        for _ in 0..16 {
            let t = forge_infer::sampling::argmax(&logits);
            out.push(t);
            logits = m.step_with(&[t], &mut cache, a).unwrap();
        }
        (first, out)
    };
    let (la, ta) = greedy(&on_base, Some(&adapter));
    let (lm, tm) = greedy(&whole, None);
    let (lb, _) = greedy(&on_base, None);
    let worst = la.iter().zip(&lm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let moved = lb.iter().zip(&lm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-3, "adapter on base vs merged: max |Δ logit| {worst}");
    assert!(moved > 100.0 * worst.max(1e-5), "the adapter changes the logits ({moved})");
    assert_eq!(ta, tm, "the same greedy tokens");
}

/// Several sequences' next tokens in one forward pass (`step_many`, what a server runs for its
/// concurrent requests) give each sequence exactly the logits and cache it gets alone.
#[test]
fn a_batch_of_sequences_equals_each_sequence_alone() {
    use forge_infer::Cache;
    let (model, tok) = random(256, 4, 2, 512, 17);
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<Vec<u32>> =
        (0..5).map(|s| (0..(3 + 2 * s)).map(|i| (i * 41 + 7 * s + 1) % tok.vocab_size() as u32).collect()).collect();
    let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for level in [QuantLevel::F16, QuantLevel::Q8_0, QuantLevel::Q4_1, QuantLevel::Q4KM] {
        let path = dir.path().join(format!("{level}.gguf"));
        forge_gguf::convert::write_model(&path, &model, &tok, level, "t", Default::default()).unwrap();
        let mut q = QModel::load(&path).unwrap();
        q.set_parallel_threshold(0);
        q.set_threads(2);
        let mut alone: Vec<Cache> = prompts.iter().map(|_| Cache::default()).collect();
        let mut together: Vec<Cache> = prompts.iter().map(|_| Cache::default()).collect();
        for ((p, a), b) in prompts.iter().zip(&mut alone).zip(&mut together) {
            q.step(p, a).unwrap();
            q.step(p, b).unwrap();
        }
        for round in 0..3u32 {
            let next: Vec<u32> = (0..prompts.len() as u32).map(|s| (s * 13 + round * 5 + 2) % 300).collect();
            let want: Vec<Vec<u32>> =
                next.iter().zip(&mut alone).map(|(&t, c)| bits(&q.step(&[t], c).unwrap())).collect();
            let mut batch: Vec<(u32, &mut Cache, Option<&forge_infer::Adapter>)> =
                next.iter().zip(together.iter_mut()).map(|(&t, c)| (t, c, None)).collect();
            let got: Vec<Vec<u32>> = q.step_many(&mut batch).unwrap().iter().map(|l| bits(l)).collect();
            assert!(got == want, "{level}, round {round}: batched logits differ from each sequence alone");
        }
    }
}
