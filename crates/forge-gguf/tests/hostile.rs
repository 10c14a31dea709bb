//! Regression tests for corrupt GGUF files found by hostile testing, one per failure (named after
//! it), and llama.cpp's loader rules (`gguf_init_from_file_impl` in ggml's gguf.cpp and
//! `llama_model_loader`'s file-bounds check), which forge's reader applies so that `forge inspect`
//! only says "ok" of a file llama.cpp loads.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forge_gguf::format::{self, TensorData, Value};
use forge_gguf::{GgmlType, Gguf, inspect, load};
use forge_quant::QuantLevel;

/// A GGUF file built byte by byte, to hold what forge's writer refuses to write.
struct Raw {
    kv: Vec<u8>,
    n_kv: u64,
    ti: Vec<u8>,
    n_tensors: u64,
    align: usize,
    data: usize,
}

fn gguf_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

const F32: u32 = 0;
const Q8_0: u32 = 8;

impl Raw {
    fn new() -> Raw {
        Raw { kv: Vec::new(), n_kv: 0, ti: Vec::new(), n_tensors: 0, align: 32, data: 0 }
    }
    fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Raw {
        gguf_string(&mut self.kv, key.as_bytes());
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.kv.extend_from_slice(value);
        self.n_kv += 1;
        self
    }
    fn str_kv(self, key: &str, v: &str) -> Raw {
        let mut b = Vec::new();
        gguf_string(&mut b, v.as_bytes());
        self.kv(key, 8, &b)
    }
    fn u32_kv(self, key: &str, v: u32) -> Raw {
        self.kv(key, 4, &v.to_le_bytes())
    }
    fn tensor(mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> Raw {
        gguf_string(&mut self.ti, name.as_bytes());
        self.ti.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in ne {
            self.ti.extend_from_slice(&d.to_le_bytes());
        }
        self.ti.extend_from_slice(&ty.to_le_bytes());
        self.ti.extend_from_slice(&offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }
    /// `n` bytes of tensor data after the header.
    fn data(mut self, n: usize) -> Raw {
        self.data = n;
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&self.n_tensors.to_le_bytes());
        b.extend_from_slice(&self.n_kv.to_le_bytes());
        b.extend_from_slice(&self.kv);
        b.extend_from_slice(&self.ti);
        b.resize(b.len().div_ceil(self.align) * self.align, 0);
        b.resize(b.len() + self.data, 7);
        b
    }
}

/// Three f32 tensors of 8 elements (32 bytes each, so contiguous at 0, 32, 64).
fn three_tensors() -> Raw {
    Raw::new()
        .str_kv("general.architecture", "llama")
        .tensor("a", &[8], F32, 0)
        .tensor("b", &[8], F32, 32)
        .tensor("c", &[8], F32, 64)
        .data(96)
}

fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
    let path = dir.join("hostile.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The error reading these bytes as a file gives; it must name the file.
fn error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), bytes);
    let started = Instant::now();
    let e = Gguf::open(&path).expect_err("a corrupt file is an error").to_string();
    assert!(started.elapsed() < Duration::from_secs(2), "{e}: {:?}", started.elapsed());
    assert!(e.contains("hostile.gguf"), "the error names the file: {e}");
    e
}

fn assert_has(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in: {text}");
    }
}

fn to_bytes(md: &[(String, Value)], tensors: &[TensorData]) -> Vec<u8> {
    let mut buf = Vec::new();
    format::write(&mut buf, md, tensors).unwrap();
    buf
}

/// Where the value of metadata key `key` starts in a file (after its key and type).
fn value_at(bytes: &[u8], key: &str) -> usize {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    let at = bytes.windows(pat.len()).position(|w| w == pat).unwrap_or_else(|| panic!("no key {key}"));
    at + pat.len() + 4
}

fn with(md: &[(String, Value)], key: &str, v: Value) -> Vec<(String, Value)> {
    md.iter().map(|(k, old)| (k.clone(), if k == key { v.clone() } else { old.clone() })).collect()
}

fn read(bytes: Vec<u8>) -> Gguf {
    format::read(&mut std::io::Cursor::new(bytes)).unwrap()
}

// Failure 1: `forge inspect` on a 127 KB file with `llama.block_count = 2^32-1` grew to 6.6 GB.
#[test]
fn huge_block_count_is_rejected_in_bounded_time_and_memory() {
    let (md, tensors) = common::tiny_model();
    let mut bytes = to_bytes(&md, &tensors);
    let at = value_at(&bytes, "llama.block_count");
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &bytes);
    // The container is sound: it is the model that is corrupt.
    let g = Gguf::open(&path).unwrap();
    let started = Instant::now();
    let report = inspect::report(&g);
    let p = inspect::problems(&g);
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert!(
        p.iter().any(|l| l.contains("`llama.block_count` = 4294967295, but the file has only 20 tensors")),
        "{p:?}"
    );
    assert_eq!(report["problems"].as_array().unwrap().len(), p.len());
    let e = load::open_model(&path, None).err().unwrap_or_else(|| panic!("the loader refuses it")).to_string();
    assert_has(&e, &["hostile.gguf", "llama.block_count", "4294967295"]);
    // Past llama.cpp's 512 layers (with the tensors to back them, as far as their count goes).
    let mut many = tensors.clone();
    for i in 0..600 {
        many.push(TensorData { name: format!("x{i}"), shape: vec![1], ty: GgmlType::F32, data: vec![0; 4] });
    }
    let p = inspect::problems(&read(to_bytes(&with(&md, "llama.block_count", Value::U32(513)), &many)));
    assert!(p.iter().any(|l| l.contains("llama.cpp loads at most 512 layers")), "{p:?}");
}

/// Every count the header gives is checked against what the file holds before it sizes an
/// allocation or a loop.
#[test]
fn header_counts_beyond_the_file_are_rejected_before_allocating() {
    let (md, tensors) = common::tiny_model();
    let good = to_bytes(&md, &tensors);
    let patched = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    // A tensor descriptor takes at least 24 bytes, a key and value 14.
    let n = good.len() as u64;
    for (v, w) in [(u64::MAX, u64::MAX), (1 << 40, 1 << 40), (n / 24 + 1, n / 14 + 1)] {
        assert_has(&error(&patched(8, &v.to_le_bytes())), &[&format!("claims {v} tensors"), "more than"]);
        assert_has(&error(&patched(16, &w.to_le_bytes())), &[&format!("{w} metadata keys"), "more than"]);
    }
    // An array length: the tokens (a u32 element type, then the u64 count).
    let tokens = value_at(&good, "tokenizer.ggml.tokens") + 4;
    for v in [u64::MAX, 1 << 31, good.len() as u64 / 8] {
        assert_has(&error(&patched(tokens, &v.to_le_bytes())), &["`tokenizer.ggml.tokens`", "array of"]);
    }
    // A string length (the chat template's).
    if md.iter().any(|(k, _)| k == "tokenizer.chat_template") {
        let s = value_at(&good, "tokenizer.chat_template");
        assert_has(&error(&patched(s, &u64::MAX.to_le_bytes())), &["tokenizer.chat_template", "string of"]);
    }
    // Model dimensions: checked before anything is built from them. (llama.cpp sizes tensors by
    // the tokens, not `vocab_size`, so inspect has nothing against that one.)
    for key in ["llama.attention.head_count", "llama.embedding_length", "llama.feed_forward_length", "llama.vocab_size"]
    {
        let g = read(to_bytes(&with(&md, key, Value::U32(u32::MAX)), &tensors));
        let started = Instant::now();
        let p = inspect::problems(&g);
        assert!(key.ends_with("vocab_size") || !p.is_empty(), "{key}");
        let e = load::config(&g).err().unwrap_or_else(|| panic!("{key}: a config")).to_string();
        assert_has(&e, &[key, "4294967295"]);
        assert!(started.elapsed() < Duration::from_secs(2), "{key}: {:?}", started.elapsed());
    }
    // A dimension: a tensor that would be far larger than the file.
    let e = error(&Raw::new().tensor("big", &[1 << 40, 1 << 20], F32, 0).data(64).bytes());
    assert_has(&e, &["`big`", "past the end of the file"]);
}

// Failure 2: duplicate metadata keys were reported "ok: llama.cpp has what it needs".
#[test]
fn duplicate_metadata_keys_are_rejected() {
    let e = error(&Raw::new().str_kv("general.name", "a").u32_kv("x.y", 1).str_kv("general.name", "b").bytes());
    assert_has(&e, &["`general.name`", "twice", "entries 0 and 2"]);
    // The writer refuses to write them.
    let md = vec![("k".to_string(), Value::U32(1)), ("k".to_string(), Value::U32(2))];
    assert!(format::write(&mut Vec::<u8>::new(), &md, &[]).unwrap_err().to_string().contains("`k`"));
    // And inspect flags them in a file read some other way.
    let g = Gguf {
        version: 3,
        metadata: vec![
            ("general.architecture".into(), "llama".into()),
            ("general.architecture".into(), "llama".into()),
        ],
        tensors: vec![],
        alignment: 32,
        data_start: 32,
        file_size: 32,
    };
    assert!(inspect::problems(&g).iter().any(|l| l.contains("duplicate")));
}

// Failure 3: overlapping tensor data offsets were reported ok.
#[test]
fn overlapping_tensor_offsets_are_rejected() {
    let ok = three_tensors().bytes();
    assert_eq!(read(ok).tensors.len(), 3);
    let overlap = Raw::new().tensor("a", &[8], F32, 0).tensor("b", &[8], F32, 0).tensor("c", &[8], F32, 64).data(96);
    assert_has(
        &error(&overlap.bytes()),
        &["tensor `b` has data offset 0, expected 32", "overlaps the data of `a`", "padded to 32 bytes"],
    );
    let back = Raw::new().tensor("a", &[8], F32, 0).tensor("b", &[8], F32, 32).tensor("c", &[8], F32, 16).data(96);
    assert_has(&error(&back.bytes()), &["tensor `c` has data offset 16, expected 64", "overlaps the data of `b`"]);
    let gap = Raw::new().tensor("a", &[8], F32, 0).tensor("b", &[8], F32, 64).data(96);
    assert_has(&error(&gap.bytes()), &["tensor `b` has data offset 64, expected 32", "gap"]);
    let unaligned = Raw::new().tensor("a", &[7], F32, 0).tensor("b", &[8], F32, 28).data(96);
    assert_has(&error(&unaligned.bytes()), &["tensor `b` has data offset 28, expected 32"]);
    let first = Raw::new().tensor("a", &[8], F32, 32).data(96);
    assert_has(&error(&first.bytes()), &["tensor `a` has data offset 32, expected 0"]);
}

/// The rest of gguf.cpp's rules.
#[test]
fn llama_cpp_container_rules_are_applied() {
    let one = |name: &str, ne: &[u64], ty: u32| Raw::new().tensor(name, ne, ty, 0).data(4096).bytes();
    assert_has(
        &error(&Raw::new().tensor("a", &[8], F32, 0).tensor("a", &[8], F32, 32).data(64).bytes()),
        &["tensor `a` appears twice"],
    );
    assert_has(&error(&one("a", &[1, 1, 1, 1, 1], F32)), &["`a` has 5 dimensions", "at most 4"]);
    assert!(read(one("a", &[1, 1, 1, 8], F32)).tensors[0].shape == [8, 1, 1, 1]);
    assert_has(&error(&one("a", &[8, u64::MAX], F32)), &["`a`", "dimension 1 is -1"]);
    assert_has(&error(&one("a", &[1 << 32, 1 << 31], F32)), &["`a`", "2^63 elements"]);
    assert_has(&error(&one("a", &[1 << 21, 1 << 21, 1 << 21], F32)), &["`a`", "2^63 elements"]);
    // A zero dimension is an empty tensor, whatever the others claim.
    let empty = read(one("a", &[0, 1 << 62], F32));
    assert_eq!((empty.tensors[0].bytes, empty.tensors[0].elements()), (0, 0));
    assert_has(&error(&one("a", &[33], Q8_0)), &["`a`", "not a whole number of q8_0 blocks"]);
    for removed in [4, 5, 31, 36, 40, u32::MAX] {
        assert_has(&error(&one("a", &[8], removed)), &["`a` has ggml type", "llama.cpp does not define"]);
    }
    let long = "n".repeat(64);
    assert_has(&error(&one(&long, &[8], F32)), &["the name of tensor 0", "string of 64 bytes"]);
    assert_eq!(read(one(&"n".repeat(63), &[8], F32)).tensors[0].name.len(), 63);
    // Metadata.
    assert_has(&error(&Raw::new().u32_kv("", 1).bytes()), &["metadata entry 0 has an empty key"]);
    assert_has(&error(&Raw::new().kv("k", 13, &[]).bytes()), &["`k`", "unknown metadata value type 13"]);
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend(1u64.to_le_bytes());
    nested.extend(4u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    assert_has(&error(&Raw::new().kv("k", 9, &nested).bytes()), &["`k`", "arrays, which llama.cpp does not read"]);
    let mut strings = 8u32.to_le_bytes().to_vec();
    strings.extend(1000u64.to_le_bytes());
    assert_has(&error(&Raw::new().kv("k", 9, &strings).bytes()), &["`k`", "an array of 1000 string elements"]);
    // `general.alignment`: a u32 power of two.
    assert_has(
        &error(&Raw::new().kv("general.alignment", 10, &32u64.to_le_bytes()).bytes()),
        &["`general.alignment` is u64, but llama.cpp requires a u32"],
    );
    for bad in [0, 48] {
        assert_has(
            &error(&Raw::new().u32_kv("general.alignment", bad).bytes()),
            &[&format!("`general.alignment` = {bad} is not a power of two")],
        );
    }
    let mut wide = Raw::new().u32_kv("general.alignment", 64).tensor("a", &[8], F32, 0).tensor("b", &[8], F32, 64);
    wide.align = 64;
    let g = read(wide.data(96).bytes());
    assert_eq!((g.alignment, g.data_start % 64, g.tensors[1].offset - g.tensors[0].offset), (64, 0, 64));
    // Versions.
    let mut v1 = three_tensors().bytes();
    v1[4] = 1;
    assert_has(&error(&v1), &["GGUF version 1"]);
    // The writer refuses what the reader would.
    let t = |name: &str, shape: Vec<usize>| TensorData {
        name: name.into(),
        data: vec![0; 4 * shape.iter().product::<usize>()],
        shape,
        ty: GgmlType::F32,
    };
    for (md, tensors) in [
        (vec![], vec![t(&"n".repeat(64), vec![1])]),
        (vec![], vec![t("a", vec![1]), t("a", vec![1])]),
        (vec![], vec![t("a", vec![1, 1, 1, 1, 1])]),
        (vec![("general.alignment".to_string(), Value::U64(32))], vec![]),
        (vec![("general.alignment".to_string(), Value::U32(24))], vec![]),
        (vec![("".to_string(), Value::U32(1))], vec![]),
        (vec![("k".to_string(), Value::Array(vec![Value::Array(vec![])]))], vec![]),
    ] {
        assert!(format::write(&mut Vec::<u8>::new(), &md, &tensors).is_err(), "{md:?}");
    }
}

// Failure 4: one tensor more than the data holds (a tensor past the end of the file) was reported ok.
#[test]
fn a_tensor_past_the_end_of_the_file_is_rejected() {
    let header = three_tensors().data(0).bytes().len();
    // Data for two tensors of three.
    let e = error(&three_tensors().data(64).bytes());
    assert_has(
        &e,
        &[
            "tensor `c`",
            &format!("bytes {}..{}", header + 64, header + 96),
            &format!("past the end of the file ({} bytes)", header + 64),
        ],
    );
    // Cut inside the last tensor.
    assert_has(&error(&three_tensors().data(95).bytes()), &["tensor `c`", &format!("({} bytes)", header + 95)]);
    // Padding after the last tensor may be cut, as llama.cpp allows.
    let short = Raw::new().tensor("a", &[8], F32, 0).tensor("b", &[7], F32, 32).data(60).bytes();
    assert_eq!(read(short).tensors[1].bytes, 28);
    // No data at all, the header cut before the data section.
    let mut cut = three_tensors().data(0).bytes();
    cut.truncate(cut.len() - 1);
    assert_has(&error(&cut), &["past the end of the file"]);
    // A forge-written file one tensor short of its header.
    let (md, tensors) = common::tiny_model();
    let bytes = to_bytes(&md, &tensors);
    let g = read(bytes.clone());
    let last = g.tensors.last().unwrap();
    let e = error(&bytes[..last.offset as usize]);
    assert_has(&e, &[&format!("tensor `{}`", last.name), &format!("bytes {}..", last.offset)]);
}

// Failure 5: a directory argument said "the file ends early".
#[test]
fn a_directory_is_reported_as_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let e = Gguf::open(dir.path()).unwrap_err().to_string();
    assert_eq!(e, format!("{d} is a directory, not a GGUF file"));
    assert!(load::open_model(dir.path(), None).err().unwrap().to_string().contains("is a directory"));
    assert!(load::open_base(dir.path()).err().unwrap().to_string().contains("is a directory"));
    let out = dir.path().join("out.gguf");
    let e = forge_gguf::requant::requantize_file(dir.path(), &out, QuantLevel::Q8_0).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
    assert!(Gguf::open(Path::new("/dev/null")).unwrap_err().to_string().contains("/dev/null is a character device"));
    let missing = dir.path().join("missing.gguf");
    assert!(Gguf::open(&missing).unwrap_err().to_string().contains("missing.gguf"));
    // A named pipe is never opened (which would wait for a writer).
    let fifo = dir.path().join("pipe.gguf");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (send, recv) = std::sync::mpsc::channel();
    std::thread::spawn(move || send.send(Gguf::open(&fifo).map(|_| ()).unwrap_err().to_string()));
    let e = recv.recv_timeout(Duration::from_secs(5)).expect("opening a pipe does not block");
    assert!(e.contains("is a named pipe (FIFO), not a GGUF file"), "{e}");
}

/// `inspect`'s "ok" needs what llama.cpp's loader checks: every tensor it creates, with its shape,
/// and no others; the vocabulary's arrays one entry per token.
#[test]
fn inspect_says_ok_only_when_llama_cpp_loads_the_tensors() {
    let (md, tensors) = common::tiny_model();
    assert_eq!(inspect::problems(&read(to_bytes(&md, &tensors))), Vec::<String>::new());
    // Per-layer head counts are llama.cpp's too.
    let per_layer = with(&md, "llama.attention.head_count", Value::Array(vec![Value::U32(2), Value::U32(2)]));
    assert_eq!(inspect::problems(&read(to_bytes(&per_layer, &tensors))), Vec::<String>::new());
    let wrong_len = with(&md, "llama.attention.head_count", Value::Array(vec![Value::U32(2)]));
    let p = inspect::problems(&read(to_bytes(&wrong_len, &tensors)));
    assert!(p.iter().any(|l| l.contains("has 1 entries, but the model has 2 layers")), "{p:?}");

    let mut extra = tensors.clone();
    extra.push(TensorData { name: "blk.0.extra.weight".into(), shape: vec![4], ty: GgmlType::F32, data: vec![0; 16] });
    let p = inspect::problems(&read(to_bytes(&md, &extra)));
    assert!(p.iter().any(|l| l.contains("wrong number of tensors") && l.contains("blk.0.extra.weight")), "{p:?}");

    let transposed: Vec<TensorData> = tensors
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if t.name == "blk.1.ffn_up.weight" {
                t.shape = vec![t.shape[0] * 2, t.shape[1] / 2];
            }
            t
        })
        .collect();
    let p = inspect::problems(&read(to_bytes(&md, &transposed)));
    assert!(p.iter().any(|l| l.contains("`blk.1.ffn_up.weight` is [192, 32], llama.cpp expects [96, 64]")), "{p:?}");

    let p = inspect::problems(&read(to_bytes(&with(&md, "general.architecture", "phi3".into()), &tensors)));
    assert!(p.iter().any(|l| l.contains("cannot tell whether llama.cpp loads this `phi3` model")), "{p:?}");

    let n = md.iter().find(|(k, _)| k == "tokenizer.ggml.tokens").unwrap().1.as_array().unwrap().len();
    let short_types = with(&md, "tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); n - 1]));
    let p = inspect::problems(&read(to_bytes(&short_types, &tensors)));
    assert!(p.iter().any(|l| l.contains(&format!("`tokenizer.ggml.token_type` has {} entries for {n} tokens", n - 1))));

    let eos_i32 = with(&md, "tokenizer.ggml.eos_token_id", Value::I32(1));
    let p = inspect::problems(&read(to_bytes(&eos_i32, &tensors)));
    assert!(p.iter().any(|l| l.contains("`tokenizer.ggml.eos_token_id` is i32 but llama.cpp reads u32")), "{p:?}");

    let p = inspect::problems(&read(to_bytes(&with(&md, "tokenizer.ggml.model", "wordpiece".into()), &tensors)));
    assert!(p.iter().any(|l| l.contains("`wordpiece` is not a tokenizer llama.cpp knows")), "{p:?}");

    let p = inspect::problems(&read(to_bytes(&with(&md, "llama.rope.dimension_count", Value::U32(16)), &tensors)));
    assert!(p.iter().any(|l| l.contains("requires the head size, 32")), "{p:?}");
}
