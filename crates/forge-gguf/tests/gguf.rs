//! GGUF: the container round trip, quantization error bounds per type, the Q/K permutation
//! checked through logits, LoRA adapter files, and `inspect`'s checks.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use forge_gguf::format::{self, TensorData, Value};
use forge_gguf::quant::{dequantize, quantize};
use forge_gguf::{GgmlType, inspect, load};
use forge_model::{Arch, Dropout, Layout, Llama, ModelConfig, Tokenizer};
use forge_quant::QuantLevel;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = forge_rng::SplitMix64::new(seed);
    (0..n).map(|_| rng.next_normal() as f32).collect()
}

#[test]
fn metadata_and_tensors_round_trip() {
    let md = vec![
        ("general.architecture".to_string(), Value::from("llama")),
        ("a.u8".into(), Value::U8(7)),
        ("a.i8".into(), Value::I8(-7)),
        ("a.u16".into(), Value::U16(700)),
        ("a.i16".into(), Value::I16(-700)),
        ("a.u32".into(), Value::U32(70_000)),
        ("a.i32".into(), Value::I32(-70_000)),
        ("a.f32".into(), Value::F32(1.5)),
        ("a.bool".into(), Value::Bool(true)),
        ("a.u64".into(), Value::U64(1 << 40)),
        ("a.i64".into(), Value::I64(-(1 << 40))),
        ("a.f64".into(), Value::F64(-2.25)),
        ("a.strings".into(), Value::Array(vec!["x".into(), "yz".into(), "".into()])),
        ("a.floats".into(), Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)])),
        ("a.text".into(), Value::from("ünïcødé\n")),
    ];
    let data = randn(64 * 256, 1);
    let mut tensors = Vec::new();
    for (i, ty) in [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K]
        .into_iter()
        .enumerate()
    {
        tensors.push(TensorData {
            name: format!("t{i}.weight"),
            shape: vec![64, 256],
            ty,
            data: quantize(ty, &data).unwrap(),
        });
    }
    tensors.push(TensorData {
        name: "norm.weight".into(),
        shape: vec![7],
        ty: GgmlType::F32,
        data: quantize(GgmlType::F32, &data[..7]).unwrap(),
    });
    let mut buf = Vec::new();
    format::write(&mut buf, &md, &tensors).unwrap();
    let mut cur = Cursor::new(buf.clone());
    let g = format::read(&mut cur).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.metadata, md);
    assert_eq!(g.tensors.len(), tensors.len());
    for (info, t) in g.tensors.iter().zip(&tensors) {
        assert_eq!((&info.name, &info.shape, info.ty), (&t.name, &t.shape, t.ty));
        assert_eq!(info.offset % 32, 0, "aligned");
        assert_eq!(g.tensor_bytes(&mut cur, info).unwrap(), t.data);
    }
    // Truncated or damaged files are errors, not panics.
    assert!(format::read(&mut Cursor::new(buf[..buf.len() - 40].to_vec())).is_err());
    assert!(format::read(&mut Cursor::new(buf[..100].to_vec())).is_err());
    let mut bad = buf.clone();
    bad[0] = b'X';
    assert!(format::read(&mut Cursor::new(bad)).unwrap_err().to_string().contains("magic"));
}

/// Per type: the largest error any element may have, given its block's values.
fn check_bound(ty: GgmlType, x: &[f32], y: &[f32]) {
    let qk = ty.block();
    for (b, (xb, yb)) in x.chunks(qk).zip(y.chunks(qk)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (lo, hi) = xb.iter().fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
        // Half a quantization step, plus the f16 rounding of the scale (relative 2^-11). The
        // symmetric types put the largest magnitude at code −8 (−16), so the other end of the
        // range is clamped one step short: a whole step there.
        let bound = match ty {
            GgmlType::Q8_0 => amax / 127.0 / 2.0 + amax * 1e-3,
            GgmlType::Q4_0 => amax / 8.0 + amax * 2e-3,
            GgmlType::Q5_0 => amax / 16.0 + amax * 2e-3,
            GgmlType::Q4_1 => (hi - lo) / 15.0 / 2.0 + amax * 2e-3,
            GgmlType::Q5_1 => (hi - lo) / 31.0 / 2.0 + amax * 2e-3,
            GgmlType::F16 => amax * 1e-3,
            GgmlType::BF16 => amax * 8e-3,
            _ => unreachable!(),
        };
        for (i, (a, b2)) in xb.iter().zip(yb).enumerate() {
            assert!((a - b2).abs() <= bound, "{ty} block {b} element {i}: {a} → {b2} (bound {bound})");
        }
    }
}

fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
    (err / norm).sqrt()
}

#[test]
fn every_type_decodes_within_its_error_bound() {
    // Gaussian weights, some outliers, an all-zero block and a constant block.
    let mut x = randn(256 * 64, 2);
    for i in (0..x.len()).step_by(997) {
        x[i] *= 8.0;
    }
    x[256..512].iter_mut().for_each(|v| *v = 0.0);
    x[512..768].iter_mut().for_each(|v| *v = 0.3);
    for ty in
        [GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1]
    {
        let q = quantize(ty, &x).unwrap();
        assert_eq!(q.len(), ty.bytes_for(&[x.len()]).unwrap());
        let y = dequantize(ty, &q, x.len()).unwrap();
        check_bound(ty, &x, &y);
    }
    assert_eq!(dequantize(GgmlType::F32, &quantize(GgmlType::F32, &x).unwrap(), x.len()).unwrap(), x);
    // K-quants: relative RMS error on Gaussian data, against a naive min/max code of the same
    // bits, which the least-squares search must beat.
    let g = randn(256 * 256, 3);
    let naive = |bits: u32| {
        let levels = ((1u32 << bits) - 1) as f32;
        let y: Vec<f32> = g
            .chunks(32)
            .flat_map(|b| {
                let (lo, hi) = b.iter().fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
                let d = (hi - lo) / levels;
                b.iter().map(move |v| ((v - lo) / d).round() * d + lo).collect::<Vec<_>>()
            })
            .collect();
        rel_rmse(&g, &y)
    };
    for (ty, bits, bound) in [(GgmlType::Q4K, 4, 0.11), (GgmlType::Q5K, 5, 0.055), (GgmlType::Q6K, 6, 0.03)] {
        let y = dequantize(ty, &quantize(ty, &g).unwrap(), g.len()).unwrap();
        let e = rel_rmse(&g, &y);
        eprintln!("{ty}: relative RMSE {e:.4} (naive {bits}-bit min/max: {:.4})", naive(bits));
        assert!(e < bound, "{ty}: {e}");
        assert!(e < naive(bits), "{ty} is no better than a naive code");
        // Zero and constant blocks survive exactly enough.
        let z = vec![0f32; 256];
        assert!(dequantize(ty, &quantize(ty, &z).unwrap(), 256).unwrap().iter().all(|v| *v == 0.0));
    }
}

fn tiny(arch: Arch) -> (Llama, Tokenizer) {
    let texts =
        ["HEAR YE! The baron fears geese.", "BEWARE! The miller waters the ale.", "Know that the abbot cannot read."]
            .iter()
            .map(|s| s.to_string())
            .cycle()
            .take(30);
    let tok = Tokenizer::train_bpe(texts, 300).unwrap();
    let cfg = ModelConfig {
        arch,
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        vocab: tok.vocab_size(),
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_positions: 64,
        tie_embeddings: arch == Arch::Llama,
        qkv_bias: arch == Arch::Qwen2,
        bos: None,
        eos: vec![tok.eos.as_ref().unwrap().1],
        pad: None,
        // llama.cpp's fixed gemma3 pattern and local base; a window shorter than the test's 24
        // tokens.
        gemma: (arch == Arch::Gemma3).then_some(forge_model::GemmaConfig {
            sliding_window: 8,
            sliding_pattern: 6,
            rope_local_theta: 10_000.0,
            query_pre_attn_scalar: 64.0,
        }),
    };
    (Llama::random(cfg, 5, &Device::Cpu).unwrap(), tok)
}

fn logits(m: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.forward(&x, &Layout::dense(1, ids.len()), &Dropout::off()).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn gguf_logits_match_the_merged_weights_through_the_qk_permutation() {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 200) as u32).collect();
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
        let (model, tok) = tiny(arch);
        let reference = logits(&model, &ids);
        let dir = tempfile::tempdir().unwrap();
        let scale = reference.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        // Relative to the largest logit: exact at f32, f16 and q8_0 rounding errors beyond.
        for (level, tol) in [(QuantLevel::F32, 1e-6), (QuantLevel::F16, 2e-3), (QuantLevel::Q8_0, 5e-2)] {
            let path = dir.path().join(format!("{level}.gguf"));
            forge_gguf::convert::write_model(&path, &model, &tok, level, "tiny", Default::default()).unwrap();
            let g = forge_gguf::Gguf::open(&path).unwrap();
            assert!(inspect::problems(&g).is_empty(), "{:?}", inspect::problems(&g));
            let back = load::open_model(&path, None).unwrap();
            let d = max_diff(&reference, &logits(&back, &ids)) / scale;
            eprintln!("{arch:?} {level}: max |logit diff| / max |logit| = {d:.2e} (logits up to {scale:.2})");
            assert!(d <= tol, "{arch:?} {level}: {d}");
            if arch == Arch::Llama && level == QuantLevel::F32 {
                // The file's q rows really are in llama.cpp's interleaved order…
                let mut f = std::fs::File::open(&path).unwrap();
                let info = g.tensor("blk.0.attn_q.weight").unwrap();
                let raw = dequantize(info.ty, &g.tensor_bytes(&mut f, info).unwrap(), info.elements()).unwrap();
                let hf: Vec<f32> = model.layers[0].q.weight.flatten_all().unwrap().to_vec1().unwrap();
                assert_ne!(raw, hf);
                // …and a model read without undoing it computes something else.
                let unpermuted = {
                    let mut t = std::collections::HashMap::new();
                    for (n, v) in model.tensors() {
                        t.insert(n, v);
                    }
                    t.insert(
                        "model.layers.0.self_attn.q_proj.weight".into(),
                        Tensor::from_vec(raw, info.shape.as_slice(), &Device::Cpu).unwrap(),
                    );
                    Llama::from_tensors(model.cfg.clone(), t, &Device::Cpu).unwrap()
                };
                assert!(max_diff(&reference, &logits(&unpermuted, &ids)) > 1e-3);
            }
        }
    }
}

#[test]
fn lora_adapter_gguf_has_permuted_b_and_llama_cpp_scaling() {
    let (mut model, _) = tiny(Arch::Llama);
    let spec = forge_model::LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        rslora: true,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let vars = forge_model::lora::attach(&mut model, &spec, 1).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), Tensor::from_vec(randn(v.elem_count(), 9), v.shape(), &Device::Cpu).unwrap()))
        .collect();
    let (md, out) = forge_gguf::adapter::convert(&model.cfg, &spec, &tensors, "npc").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.gguf");
    forge_gguf::convert::write_file(&path, &md, &out).unwrap();
    let g = forge_gguf::Gguf::open(&path).unwrap();
    assert!(inspect::problems(&g).is_empty(), "{:?}", inspect::problems(&g));
    assert_eq!(g.get("general.type").unwrap().as_str(), Some("adapter"));
    // rsLoRA: llama.cpp's alpha / r must equal alpha / sqrt(r).
    assert!((g.get("adapter.lora.alpha").unwrap().as_f64().unwrap() / 4.0 - 8.0 / 2.0).abs() < 1e-5);
    let a = g.tensor("blk.1.attn_q.weight.lora_a").unwrap();
    let b = g.tensor("blk.1.attn_q.weight.lora_b").unwrap();
    assert_eq!((a.shape.clone(), b.shape.clone()), (vec![4, 256], vec![256, 4]));
    let mut f = std::fs::File::open(&path).unwrap();
    let b_file = dequantize(b.ty, &g.tensor_bytes(&mut f, b).unwrap(), b.elements()).unwrap();
    let b_peft: Vec<f32> = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(forge_gguf::convert::permute_rows(&b_peft, 256, 4, 4, false), b_file, "q's lora_b rows are permuted");
    let v_b = g.tensor("blk.1.attn_v.weight.lora_b").unwrap();
    let v_file = dequantize(v_b.ty, &g.tensor_bytes(&mut f, v_b).unwrap(), v_b.elements()).unwrap();
    let v_peft: Vec<f32> = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(v_file, v_peft, "v's are not");
}

#[test]
fn inspect_lists_what_llama_cpp_would_miss() {
    let (model, tok) = tiny(Arch::Llama);
    let (md, tensors) = forge_gguf::convert::convert(&model, &tok, QuantLevel::Q8_0, "tiny").unwrap();
    let write = |md: &[(String, Value)], t: &[TensorData]| {
        let mut buf = Vec::new();
        format::write(&mut buf, md, t).unwrap();
        format::read(&mut Cursor::new(buf)).unwrap()
    };
    assert!(inspect::problems(&write(&md, &tensors)).is_empty());
    let without = |key: &str| md.iter().filter(|(k, _)| k != key).cloned().collect::<Vec<_>>();
    let p = inspect::problems(&write(&without("llama.block_count"), &tensors));
    assert!(p.iter().any(|l| l.contains("llama.block_count")), "{p:?}");
    let p = inspect::problems(&write(&without("tokenizer.ggml.merges"), &tensors));
    assert!(p.iter().any(|l| l.contains("merges")), "{p:?}");
    let mut wrong = md.clone();
    for (k, v) in wrong.iter_mut() {
        if k == "tokenizer.ggml.pre" {
            *v = "my-tokenizer".into();
        }
        if k == "llama.attention.layer_norm_rms_epsilon" {
            *v = Value::F64(1e-5);
        }
    }
    let p = inspect::problems(&write(&wrong, &tensors));
    assert!(p.iter().any(|l| l.contains("my-tokenizer")), "{p:?}");
    assert!(p.iter().any(|l| l.contains("is f64 but llama.cpp reads f32")), "{p:?}");
    let fewer: Vec<TensorData> = tensors.iter().filter(|t| t.name != "blk.1.ffn_up.weight").cloned().collect();
    let p = inspect::problems(&write(&md, &fewer));
    assert!(p.iter().any(|l| l.contains("blk.1.ffn_up.weight")), "{p:?}");
    let p = inspect::problems(&write(&without("general.architecture"), &tensors));
    assert_eq!(p, vec!["missing `general.architecture`".to_string()]);
}

#[test]
fn the_tokenizer_comes_back_from_gguf_metadata() {
    let (model, tok) = tiny(Arch::Llama);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    forge_gguf::convert::write_model(&path, &model, &tok, QuantLevel::Q8_0, "tiny", Default::default()).unwrap();
    let back = forge_gguf::tokenizer::tokenizer(&forge_gguf::Gguf::open(&path).unwrap()).unwrap();
    for text in ["HEAR YE! The baron fears geese.", "  odd   spacing\nand lines 1234", "unseen: Zzyzx ünïcødé"] {
        let prompt = tok.prompt(None, text).unwrap();
        assert_eq!(back.prompt(None, text).unwrap(), prompt);
        assert_eq!(back.encode_prompt(&prompt).unwrap(), tok.encode_prompt(&prompt).unwrap(), "{text}");
        let ids = tok.encode(text).unwrap();
        assert_eq!(back.decode(&ids).unwrap(), tok.decode(&ids).unwrap());
    }
    assert_eq!(back.eos, tok.eos);
    assert_eq!(back.completion_suffix().unwrap(), tok.completion_suffix().unwrap());
}

/// Quantization with an importance matrix gives ggml's own bytes (`ggml_quantize_chunk` with
/// `imatrix`, recorded by `scripts/ggml_imatrix_reference.py`).
#[test]
fn imatrix_quantization_matches_ggml() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/imatrix.json");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats =
        |k: &str| -> Vec<f32> { r[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect() };
    let (x, w) = (floats("x"), floats("weights"));
    let cols = r["cols"].as_u64().unwrap() as usize;
    for (name, ty) in [("q4_0", GgmlType::Q4_0), ("q5_0", GgmlType::Q5_0)] {
        let got = forge_gguf::quant::quantize_weighted(ty, &x, cols, &w).unwrap();
        let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, r["expected"][name].as_str().unwrap(), "{name}");
        // And the importance matrix changed the result.
        assert_ne!(got, forge_gguf::quant::quantize(ty, &x).unwrap(), "{name}");
    }
}
