//! Corrupt and truncated GGUF files get errors, never panics, hangs or huge allocations: a
//! bounded property test over mutations of a real model file forge wrote (header counts, string
//! and array lengths, dimensions, types and offsets overwritten with small, huge and boundary
//! values, at random places and at the header's own fields; random bytes flipped; the file cut
//! short), each read by the header reader, inspected as `forge inspect` does, and loaded by the
//! base loader (config, tokenizer, every tensor dequantized). A file that reads must satisfy
//! llama.cpp's container rules. `tests/gguf_fuzz_real.rs` at the repository root does the same
//! to a file forge did not write.

mod common;

use std::time::{Duration, Instant};

use common::{assert_llama_cpp_layout, fields, peak_rss};
use forge_gguf::{Gguf, inspect, load};
use forge_quant::QuantLevel;

fn model_file() -> Vec<u8> {
    let (model, tok) = common::tiny_llama();
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
    let parsed = forge_gguf::format::read(&mut std::io::Cursor::new(&original)).unwrap();
    assert!(inspect::problems(&parsed).is_empty(), "{:?}", inspect::problems(&parsed));
    let header_end = parsed.data_start as usize;
    let fields = fields(&original, &parsed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutant.gguf");
    let mut rng = forge_rng::SplitMix64::new(2024);
    let (mut rejected, mut loaded) = (0, 0);
    let started = Instant::now();
    for case in 0..750 {
        let mut bytes = original.clone();
        match case % 5 {
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
            // One of the header's own fields, or one of its values nudged by one.
            2 => {
                let (at, width) = fields[rng.below(fields.len())];
                let old = if width == 8 {
                    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
                } else {
                    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as u64
                };
                let v = match rng.below(3) {
                    0 => old.wrapping_add(1),
                    1 => old.wrapping_sub(1),
                    _ => NASTY[rng.below(NASTY.len())],
                };
                bytes[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            // A few random bytes anywhere.
            3 => {
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
            // What `forge inspect` does.
            let inspected = header.as_ref().ok().map(|g| (inspect::report(g), inspect::problems(g)));
            let base = load::open_base(&path);
            (header, inspected, base.map(|(m, _)| m.cfg.layers))
        });
        let (header, inspected, base) =
            outcome.unwrap_or_else(|_| panic!("case {case}: a panic (mutant written to {path:?})"));
        assert!(t.elapsed() < Duration::from_secs(5), "case {case}: {:?}", t.elapsed());
        let header_ok = header.is_ok();
        if let (Ok(g), Some((report, problems))) = (&header, inspected) {
            assert_llama_cpp_layout(g, case);
            assert_eq!(report["problems"].as_array().map(Vec::len), Some(problems.len()), "case {case}");
        }
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
    let rss = peak_rss();
    eprintln!(
        "750 mutants: {rejected} rejected, {loaded} still loaded, in {:.1?}, peak RSS {} MiB",
        started.elapsed(),
        rss >> 20
    );
    assert!(rejected > 375, "most mutants are corrupt: {rejected}");
    assert!(rss < 1 << 30, "peak RSS {} MiB", rss >> 20);
}
