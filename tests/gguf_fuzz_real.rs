//! Corrupt GGUF files made from a real file forge did not write — SmolLM2-135M-Instruct as
//! llama.cpp's tools ship it (Q4_1, 98 MB), fetched as `tests/bases.rs` fetches it — get a clear
//! error or a valid parse, never a panic, an abort, unbounded memory or a hang. A bounded property
//! test with a fixed seed: the header region (counts, the 49,152-token vocabulary and its merges,
//! the tensor descriptors) mutated at random places and at its own fields, or the file cut short;
//! each mutant read by forge's header reader, inspected as `forge inspect` does, its config and
//! (sometimes) its tokenizer built and a few tensors decoded. Mutants are read in memory, the
//! original's bytes shared, so a case costs what its header does.
//!
//! `crates/forge-gguf/tests/fuzz.rs` does the same to a file forge wrote, through the whole loader.
//! This one lives in the root package because the fetch goes through the `forge` binary.

mod common;
#[path = "../crates/forge-gguf/tests/common/mod.rs"]
mod gguf_common;

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use forge_gguf::{Gguf, Value, inspect, load};
use gguf_common::{assert_llama_cpp_layout, fields, peak_rss};

/// A mutant of a file without copying it: its first `head.len()` bytes are `head`, the rest the
/// original's, and it ends at `len`.
struct Mutant<'a> {
    head: &'a [u8],
    original: &'a [u8],
    len: u64,
    pos: u64,
}

impl Read for Mutant<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.len {
            return Ok(0);
        }
        let p = self.pos as usize;
        let n = buf.len().min((self.len - self.pos) as usize);
        let src =
            if p < self.head.len() { &self.head[p..self.head.len().min(p + n)] } else { &self.original[p..p + n] };
        buf[..src.len()].copy_from_slice(src);
        self.pos += src.len() as u64;
        Ok(src.len())
    }
}

impl Seek for Mutant<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let at = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = at.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// SplitMix64, for a fixed sequence of cases (forge-rng's, which this crate does not depend on).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0), near enough.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Values worth writing over a length or count.
const NASTY: [u64; 10] = [0, 1, 7, 255, 65_535, 49_152, 1 << 31, u32::MAX as u64, 1 << 40, u64::MAX];

/// What one mutant gives: Ok with the tensors decoded, or the error.
fn exercise(m: &mut Mutant, build_tokenizer: bool, pick: usize) -> Result<(Gguf, usize), String> {
    // Buffered, as forge reads files: the metadata is read a few bytes at a time.
    let m = &mut std::io::BufReader::with_capacity(1 << 16, m);
    let g = forge_gguf::format::read(m).map_err(|e| e.to_string())?;
    // What `forge inspect` prints, and the loader's checks.
    let report = inspect::report(&g);
    assert_eq!(report["problems"].as_array().map(Vec::len), Some(inspect::problems(&g).len()));
    let _ = load::config(&g);
    if build_tokenizer {
        let _ = forge_gguf::tokenizer::tokenizer(&g);
    }
    // A couple of tensors decoded, the small ones (the descriptors say what the data is).
    let mut decoded = 0;
    let small: Vec<_> = g.tensors.iter().filter(|t| t.bytes <= 1 << 21).collect();
    for t in [small.first(), small.get(pick % small.len().max(1))].into_iter().flatten() {
        let bytes = g.tensor_bytes(m, t).map_err(|e| e.to_string())?;
        if forge_gguf::quant::dequantize(t.ty, &bytes, t.elements()).is_ok() {
            decoded += 1;
        }
    }
    Ok((g, decoded))
}

#[test]
fn mutated_real_gguf_files_get_clear_errors_in_bounded_time_and_memory() {
    let path = common::fetch_base("smollm2-135m");
    let original = std::fs::read(&path).unwrap();
    let len = original.len() as u64;
    // The file as shipped: it reads, and llama.cpp's rules as `forge inspect` checks them hold.
    let (g, _) = exercise(&mut Mutant { head: &[], original: &original, len, pos: 0 }, true, 0).unwrap();
    assert_llama_cpp_layout(&g, 0);
    assert_eq!(inspect::problems(&g), Vec::<String>::new(), "a file llama.cpp loads is ok");
    assert_eq!((g.tensors.len(), g.get("llama.block_count").and_then(Value::as_u64)), (272, Some(30)));
    let region = (g.data_start as usize).min(4 << 20);
    let fields = fields(&original, &g);

    let mut rng = SplitMix64(135);
    let (mut cases, mut rejected, mut read, mut decoded, mut tokenizers) = (0, 0, 0, 0, 0);
    let started = Instant::now();
    while cases < 400 && (cases < 40 || started.elapsed() < Duration::from_secs(2)) {
        let case = cases;
        cases += 1;
        let mut head = original[..region].to_vec();
        let mut end = len;
        match case % 6 {
            // A u64 anywhere in the header region.
            0 => {
                let at = rng.below(region - 8);
                head[at..at + 8].copy_from_slice(&NASTY[rng.below(NASTY.len())].to_le_bytes());
            }
            // A u32.
            1 => {
                let at = rng.below(region - 4);
                head[at..at + 4].copy_from_slice(&(NASTY[rng.below(NASTY.len())] as u32).to_le_bytes());
            }
            // One of the header's fields (a count, a type, a length, a dimension, an offset).
            2 | 3 => {
                let (at, width) = fields[rng.below(fields.len())];
                let old = if width == 8 {
                    u64::from_le_bytes(head[at..at + 8].try_into().unwrap())
                } else {
                    u32::from_le_bytes(head[at..at + 4].try_into().unwrap()) as u64
                };
                let v = match rng.below(3) {
                    0 => old.wrapping_add(1),
                    1 => old.wrapping_sub(1),
                    _ => NASTY[rng.below(NASTY.len())],
                };
                head[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            // Random bytes.
            4 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(region);
                    head[at] = rng.next_u64() as u8;
                }
            }
            // Cut short: in the header, or in the tensor data.
            _ => end = if rng.below(2) == 0 { rng.below(region) as u64 } else { rng.below(original.len()) as u64 },
        }
        let t = Instant::now();
        let mut m = Mutant { head: &head, original: &original, len: end, pos: 0 };
        let build_tokenizer = read % 16 == 0 && tokenizers < 6;
        let pick = rng.below(1 << 20);
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(&mut m, build_tokenizer, pick)))
                .unwrap_or_else(|_| panic!("case {case}: a panic"));
        assert!(t.elapsed() < Duration::from_secs(5), "case {case}: {:?}", t.elapsed());
        match outcome {
            Ok((g, n)) => {
                assert_llama_cpp_layout(&g, case);
                read += 1;
                decoded += n;
                tokenizers += build_tokenizer as usize;
            }
            Err(e) => {
                assert!(e.len() > 10 && !e.contains("panicked"), "case {case}: a clear error: {e}");
                rejected += 1;
            }
        }
    }
    let rss = peak_rss();
    eprintln!(
        "{cases} mutants of {}: {rejected} rejected, {read} read ({decoded} tensors decoded, {tokenizers} \
         tokenizers built) in {:.1?}, peak RSS {} MiB",
        path.display(),
        started.elapsed(),
        rss >> 20
    );
    assert!(cases >= 40 && rejected * 3 > cases, "{rejected} of {cases} rejected");
    assert!(rss < 1 << 30, "peak RSS {} MiB", rss >> 20);
}
