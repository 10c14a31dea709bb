//! What the GGUF tests share: a tiny model forge converts, the header's fields as offsets, the
//! container rules llama.cpp's loader applies, and peak memory. Also included by the root
//! package's `tests/gguf_fuzz_real.rs`.

#![allow(dead_code)]

use candle_core::Device;
use forge_gguf::Gguf;
use forge_gguf::format::{TensorData, Value};
use forge_model::{Arch, Llama, ModelConfig, Tokenizer};
use forge_quant::QuantLevel;

/// A small random llama (2 layers, tied embeddings, a BPE vocabulary learned from two posters).
pub fn tiny_llama() -> (Llama, Tokenizer) {
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
    (Llama::random(cfg, 1, &Device::Cpu).unwrap(), tok)
}

/// [`tiny_llama`] converted at q8_0: the metadata and tensors of its GGUF file.
pub fn tiny_model() -> (Vec<(String, Value)>, Vec<TensorData>) {
    let (model, tok) = tiny_llama();
    forge_gguf::convert::convert(&model, &tok, QuantLevel::Q8_0, "tiny").unwrap()
}

/// The header's fields, as (offset, width): the counts; each key's type and value (an array's
/// element type and count); each tensor's dimension count, dimensions, type and offset.
pub fn fields(bytes: &[u8], g: &Gguf) -> Vec<(usize, usize)> {
    let header = &bytes[..g.data_start as usize];
    let find = |s: &str, last: bool| {
        let mut pat = (s.len() as u64).to_le_bytes().to_vec();
        pat.extend_from_slice(s.as_bytes());
        let mut hits = header.windows(pat.len()).enumerate().filter(|(_, w)| *w == pat.as_slice()).map(|(i, _)| i);
        let at = if last { hits.next_back() } else { hits.next() };
        at.unwrap_or_else(|| panic!("`{s}` is in the header")) + pat.len()
    };
    let mut out = vec![(8, 8), (16, 8)];
    for (k, v) in &g.metadata {
        let at = find(k, false);
        out.push((at, 4));
        match v {
            forge_gguf::Value::Array(_) => out.extend([(at + 4, 4), (at + 8, 8)]),
            forge_gguf::Value::String(_) => out.push((at + 4, 8)),
            _ => out.push((at + 4, 4)),
        }
    }
    for t in &g.tensors {
        let at = find(&t.name, true);
        out.push((at, 4));
        let dims = t.shape.len();
        out.extend((0..dims).map(|d| (at + 4 + 8 * d, 8)));
        out.extend([(at + 4 + 8 * dims, 4), (at + 8 + 8 * dims, 8)]);
    }
    out
}

/// llama.cpp's container rules, on a file that read: unique keys and names, at most 4
/// dimensions, names under 64 bytes, data contiguous from the data section and inside the file.
pub fn assert_llama_cpp_layout(g: &Gguf, case: usize) {
    let keys: std::collections::HashSet<&str> = g.metadata.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), g.metadata.len(), "case {case}: duplicate keys");
    assert!(g.alignment.is_power_of_two(), "case {case}");
    let names: std::collections::HashSet<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), g.tensors.len(), "case {case}: duplicate tensors");
    let mut expected = g.data_start;
    for t in &g.tensors {
        assert!(t.shape.len() <= 4 && t.name.len() < 64, "case {case}: {t:?}");
        assert_eq!(t.offset, expected, "case {case}: `{}` is not where the previous tensor ends", t.name);
        assert!(t.offset + t.bytes <= g.file_size, "case {case}: `{}` ends past the file", t.name);
        expected = t.offset + t.bytes.div_ceil(g.alignment) * g.alignment;
    }
}

/// The most memory this process has held, in bytes.
pub fn peak_rss() -> u64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}
