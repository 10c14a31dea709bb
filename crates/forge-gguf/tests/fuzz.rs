//! Corrupt and truncated GGUF files get errors, never panics, hangs or huge allocations: a
//! bounded property test over mutations of a real model file forge wrote (header counts, string
//! and array lengths, dimensions, types and offsets overwritten with small, huge and boundary
//! values; random bytes flipped; the file cut short), each read by the header reader and by the
//! base loader (config, tokenizer, every tensor dequantized).

use std::time::{Duration, Instant};

use candle_core::Device;
use forge_gguf::{Gguf, load};
use forge_manifest::QuantLevel;
use forge_model::{Arch, Llama, ModelConfig, Tokenizer};

fn model_file() -> Vec<u8> {
    let texts = ["HEAR YE! The baron fears geese.", "BEWARE! The miller waters the ale."]
        .iter()
        .map(|s| s.to_string())
        .cycle()
        .take(20);
    let tok = Tokenizer::train_bpe(texts, 280).unwrap();
    let cfg = ModelConfig {
        arch: Arch::Llama,
        hidden: 64,
        intermediate: 96,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
        vocab: tok.vocab_size(),
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_positions: 32,
        tie_embeddings: true,
        qkv_bias: false,
        bos: None,
        eos: vec![tok.eos.as_ref().unwrap().1],
        pad: None,
        gemma: None,
    };
    let model = Llama::random(cfg, 1, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    forge_gguf::convert::write_model(&path, &model, &tok, QuantLevel::Q8_0, "fuzz", Default::default()).unwrap();
    std::fs::read(path).unwrap()
}

/// Values worth writing over a length or count.
const NASTY: [u64; 9] = [0, 1, 7, 255, 65_535, 1 << 31, u32::MAX as u64, 1 << 40, u64::MAX];

#[test]
fn mutated_files_are_rejected_cleanly_in_bounded_time() {
    let original = model_file();
    let header_end = forge_gguf::format::read(&mut std::io::Cursor::new(&original)).unwrap().data_start as usize;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutant.gguf");
    let mut rng = forge_rng::SplitMix64::new(2024);
    let (mut rejected, mut loaded) = (0, 0);
    let started = Instant::now();
    for case in 0..600 {
        let mut bytes = original.clone();
        match case % 4 {
            // A u64 anywhere in the header (counts, string and array lengths, dims, offsets).
            0 => {
                let at = rng.below(header_end - 8);
                let v = NASTY[rng.below(NASTY.len())];
                bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            // A u32 (value types, dimension counts, ggml types).
            1 => {
                let at = rng.below(header_end - 4);
                let v = NASTY[rng.below(NASTY.len())] as u32;
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            // A few random bytes anywhere.
            2 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.next_u64() as u8;
                }
            }
            // Cut short.
            _ => bytes.truncate(rng.below(bytes.len())),
        }
        std::fs::write(&path, &bytes).unwrap();
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(|| {
            let header = Gguf::open(&path);
            let base = load::open_base(&path);
            (header.is_ok(), base.map(|(m, _)| m.cfg.layers))
        });
        let (header_ok, base) = outcome.unwrap_or_else(|_| panic!("case {case}: a panic (mutant written to {path:?})"));
        assert!(t.elapsed() < Duration::from_secs(5), "case {case}: {:?}", t.elapsed());
        match base {
            Ok(layers) => {
                assert!(header_ok);
                assert!(layers <= 2, "case {case}: {layers} layers");
                loaded += 1;
            }
            Err(e) => {
                // Errors say what is wrong, and name the file.
                assert!(e.to_string().contains("mutant.gguf"), "case {case}: {e}");
                rejected += 1;
            }
        }
    }
    eprintln!("600 mutants: {rejected} rejected, {loaded} still loaded, in {:.1?}", started.elapsed());
    assert!(rejected > 300, "most mutants are corrupt: {rejected}");
}
