//! Requantizing a GGUF model file: what `llama-quantize IN.gguf OUT.gguf TYPE` does, with forge's
//! quantizers and the per-tensor mixing of the `gguf` stage ([`crate::convert::tensor_type`]).
//!
//! The input is any GGUF model of a llama-family architecture (llama, qwen2, gemma3, ... : one
//! `attn_v` and one `ffn_down` per block) whose tensors forge can decode: f32, f16, bf16, or one
//! of the block types forge writes (requantizing a quantized file loses precision twice, as with
//! `llama-quantize --allow-requantize`). The output follows `llama_model_quantize`:
//!
//! - the metadata is copied in order, less split keys and the two llama.cpp sets itself, then
//!   `general.quantization_version` (2) and `general.file_type` (the level) are appended;
//! - the tensors are written in llama.cpp's loader order (outside blocks first, then by block
//!   number, then by name);
//! - tensors llama.cpp never quantizes (1-D after dropping trailing 1s, names not ending in
//!   `weight`, norms, MoE routers, ...) are copied as they are, in their own type;
//! - every other tensor gets [`tensor_type`] — a tied `token_embd` (no `output.weight`) is
//!   treated as the output — with `attn_v`'s layer counted among the `attn_v` tensors and
//!   `ffn_down`'s among `ffn_down`'s, as llama.cpp counts them; a tensor already of its target
//!   type is copied byte for byte, the others are decoded to f32 and encoded.
//!
//! For an f32 or f16 input this gives byte-identical tensors to llama.cpp's own quantizer.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc;

use forge_quant::QuantLevel;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

use crate::convert::{Summary, file_type, layer_of, order_key, tensor_type};
use crate::format::{Gguf, TensorInfo, Value};
use crate::quant::{dequantize, quantize};
use crate::types::GgmlType;
use crate::{GgufError, Result};

/// Metadata keys `llama_model_quantize` drops from the copy (it sets the first two itself).
const DROPPED_KEYS: &[&str] =
    &["general.quantization_version", "general.file_type", "split.no", "split.count", "split.tensors.count"];

/// Whether llama.cpp's quantizer may change a tensor's type (`tensor_allows_quantization`, the
/// checks that apply to text decoders): at least 2 dimensions as ggml counts them (trailing 1s
/// dropped), a name ending in `weight`, and not a norm, MoE router or another small tensor
/// llama.cpp keeps as it is.
pub fn allows_quantization(name: &str, shape: &[usize]) -> bool {
    // ggml_n_dims: 1 + the index (in ggml's innermost-first order) of the last dimension > 1.
    let n_dims = shape.iter().position(|&d| d > 1).map(|i| shape.len() - i).unwrap_or(1);
    if n_dims < 2 || !name.ends_with("weight") {
        return false;
    }
    const KEPT: &[&str] = &[
        "_norm.weight",
        "ffn_gate_inp.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "attn_rel_b.weight",
        ".position_embd",
    ];
    !KEPT.iter().any(|k| name.contains(k)) && name != "position_embd.weight" && name != "token_types.weight"
}

/// The type a requantized tensor gets at `level`, given its type in the input; see the module doc.
/// `index` and `count` are llama.cpp's counters for the tensor's kind (`attn_v`, `ffn_down`).
fn target_type(
    level: QuantLevel,
    info: &TensorInfo,
    index: usize,
    count: usize,
    tied: bool,
    seventy_b: bool,
) -> GgmlType {
    if !allows_quantization(&info.name, &info.shape) {
        return info.ty;
    }
    tensor_type(level, &info.name, &info.shape, Some(index), count, tied, seventy_b)
}

fn meta_u64(g: &Gguf, key: &str) -> Option<u64> {
    g.get(key).and_then(Value::as_u64)
}

/// What requantizing a file to a level writes: the metadata, and each input tensor (in output
/// order) with the type it gets.
#[derive(Clone, Debug)]
pub struct Plan {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(TensorInfo, GgmlType)>,
}

/// Decides the output metadata and every tensor's type (see the module doc).
pub fn plan(g: &Gguf, level: QuantLevel) -> Plan {
    let arch = g.get("general.architecture").and_then(Value::as_str).unwrap_or("llama").to_string();
    let k = |s: &str| format!("{arch}.{s}");
    let n_layer = match meta_u64(g, &k("block_count")) {
        Some(n) => n as usize,
        None => g.tensors.iter().filter_map(|t| layer_of(&t.name)).max().map(|l| l + 1).unwrap_or(0),
    };
    // llama.cpp's LLM_TYPE_70B (llama with grouped-query attention, qwen2): attn_v gets more bits.
    let (heads, kv_heads) = (meta_u64(g, &k("attention.head_count")), meta_u64(g, &k("attention.head_count_kv")));
    let seventy_b = n_layer == 80 && (arch == "qwen2" || (arch == "llama" && kv_heads.is_some() && kv_heads != heads));
    let tied = g.tensor("output.weight").is_none();

    let mut metadata: Vec<(String, Value)> =
        g.metadata.iter().filter(|(key, _)| !DROPPED_KEYS.contains(&key.as_str())).cloned().collect();
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.push(("general.file_type".into(), Value::U32(file_type(level))));

    let mut infos: Vec<&TensorInfo> = g.tensors.iter().collect();
    infos.sort_by_cached_key(|t| order_key(&t.name));
    let is_attn_v = |t: &TensorInfo| t.name.contains("attn_v.weight") && allows_quantization(&t.name, &t.shape);
    let n_attn_v = infos.iter().filter(|t| is_attn_v(t)).count();
    let (mut i_attn_v, mut i_ffn_down) = (0usize, 0usize);
    let tensors = infos
        .into_iter()
        .map(|info| {
            let (index, count) = if is_attn_v(info) {
                i_attn_v += 1;
                (i_attn_v - 1, n_attn_v)
            } else if info.name.contains("ffn_down") && allows_quantization(&info.name, &info.shape) {
                i_ffn_down += 1;
                (i_ffn_down - 1, n_layer)
            } else {
                (layer_of(&info.name).unwrap_or(0), n_layer)
            };
            (info.clone(), target_type(level, info, index, count, tied, seventy_b))
        })
        .collect();
    Plan { metadata, tensors }
}

/// Elements per unit of work when converting a tensor: whole blocks of every type (llama.cpp
/// quantizes in chunks of at least 32 × 512 values too).
const CHUNK: usize = 64 * 256;

/// Decodes `x` (whole blocks of type `from`) into `out`. f16 and bf16 go through `half`'s slice
/// conversion (F16C where the CPU has it); other types through [`dequantize`].
fn decode(from: GgmlType, x: &[u8], out: &mut Vec<f32>, halves: &mut Vec<u16>) -> Result<()> {
    let n = x.len() / from.block_bytes() * from.block();
    out.resize(n, 0.0);
    match from {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(x.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            halves.clear();
            halves.extend(x.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
            if from == GgmlType::F16 {
                halves.reinterpret_cast::<half::f16>().convert_to_f32_slice(out);
            } else {
                halves.reinterpret_cast::<half::bf16>().convert_to_f32_slice(out);
            }
        }
        _ => out.copy_from_slice(&dequantize(from, x, n)?),
    }
    Ok(())
}

/// Converts one tensor's bytes `raw` to `to` into `out` (its exact size), in chunks of [`CHUNK`]
/// values across rayon's threads: each chunk decoded to f32 and encoded, with no tensor-sized
/// f32 copy.
fn convert(info: &TensorInfo, raw: &[u8], to: GgmlType, out: &mut [u8]) -> Result<()> {
    let from = info.ty;
    let n = info.elements();
    if !n.is_multiple_of(to.block()) || !n.is_multiple_of(from.block()) {
        return Err(GgufError::Invalid(format!("tensor {}: {n} values are not whole {from}/{to} blocks", info.name)));
    }
    let (in_chunk, out_chunk) = (CHUNK / from.block() * from.block_bytes(), CHUNK / to.block() * to.block_bytes());
    out.par_chunks_mut(out_chunk).zip(raw.par_chunks(in_chunk)).try_for_each_init(
        || (Vec::new(), Vec::new()),
        |(x, halves), (o, i)| -> Result<()> {
            decode(from, i, x, halves).map_err(|e| match e {
                GgufError::Unsupported(m) => GgufError::Unsupported(format!("tensor {}: {m}", info.name)),
                e => e,
            })?;
            encode(to, x, o, halves)
        },
    )
}

/// Encodes `x` as `to` into `o` (its exact size): the float types directly, the block types
/// through [`quantize`].
fn encode(to: GgmlType, x: &[f32], o: &mut [u8], halves: &mut Vec<u16>) -> Result<()> {
    match to {
        GgmlType::F32 => {
            for (o, v) in o.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            halves.resize(x.len(), 0);
            if to == GgmlType::F16 {
                halves.reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(x);
            } else {
                halves.reinterpret_cast_mut::<half::bf16>().convert_from_f32_slice(x);
            }
            for (o, h) in o.chunks_exact_mut(2).zip(halves.iter()) {
                o.copy_from_slice(&h.to_le_bytes());
            }
        }
        _ => o.copy_from_slice(&quantize(to, x)?),
    }
    Ok(())
}

/// What the writer thread appends next: a converted tensor, or a byte range of the input copied
/// as it is (by the kernel: `io::copy` between files uses `copy_file_range`).
enum Chunk {
    Data(Vec<u8>),
    Copy { offset: u64, bytes: u64 },
}

/// Appends tensors to `out` as they come, each padded to `align`, handing data buffers back
/// for reuse.
fn write_tensors(
    out: &mut std::fs::File,
    input: &std::fs::File,
    align: u64,
    chunks: mpsc::Receiver<Chunk>,
    recycle: mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let zeros = vec![0u8; align as usize];
    for chunk in chunks {
        let n = match chunk {
            Chunk::Data(buf) => {
                out.write_all(&buf)?;
                let n = buf.len() as u64;
                let _ = recycle.send(buf);
                n
            }
            Chunk::Copy { offset, bytes } => {
                let mut src = input;
                src.seek(SeekFrom::Start(offset))?;
                let copied = std::io::copy(&mut src.take(bytes), out)?;
                if copied != bytes {
                    return Err(GgufError::Invalid("the input file ends inside a tensor".into()));
                }
                bytes
            }
        };
        out.write_all(&zeros[..(n.div_ceil(align) * align - n) as usize])?;
    }
    Ok(())
}

/// Requantizes the GGUF model file `input` to `level` and writes `output` atomically (through a
/// temporary file renamed into place). Streams: the header first, then each tensor as it is
/// converted, written by a second thread while the next one is converted; tensors that keep
/// their type are copied file to file.
pub fn requantize_file(input: &Path, output: &Path, level: QuantLevel) -> Result<Summary> {
    let open = crate::format::open_file;
    // Buffered: the metadata is read a few bytes at a time (a 262k-token vocabulary is a million reads).
    let mut reader = std::io::BufReader::with_capacity(1 << 20, open(input)?);
    let g = crate::format::read(&mut reader).map_err(|e| e.in_file(input))?;
    let mut src = reader.into_inner();
    let plan = plan(&g, level);
    let descriptors: Vec<(&str, &[usize], GgmlType)> =
        plan.tensors.iter().map(|(t, ty)| (t.name.as_str(), t.shape.as_slice(), *ty)).collect();
    let head = crate::format::header(&plan.metadata, &descriptors)?;

    let tmp = output.with_extension("gguf.tmp");
    let mut out = std::fs::File::create(&tmp).map_err(|e| GgufError::Io(format!("{}: {e}", tmp.display())))?;
    out.write_all(&head)?;
    let copy_src = open(input)?;
    let align = crate::format::alignment(&plan.metadata);
    let result = std::thread::scope(|s| -> Result<()> {
        let (send, chunks) = mpsc::sync_channel::<Chunk>(1);
        let (recycle, buffers) = mpsc::channel::<Vec<u8>>();
        for _ in 0..2 {
            recycle.send(Vec::new()).expect("the receiver is here");
        }
        let writer = s.spawn(|| write_tensors(&mut out, &copy_src, align, chunks, recycle));
        let mut raw = Vec::new();
        let converted = (|| -> Result<()> {
            for (info, ty) in &plan.tensors {
                let chunk = if *ty == info.ty {
                    Chunk::Copy { offset: info.offset, bytes: info.bytes }
                } else {
                    raw.resize(info.bytes as usize, 0);
                    src.seek(SeekFrom::Start(info.offset))?;
                    src.read_exact(&mut raw)?;
                    // A buffer the writer is done with (none when it has stopped on an error).
                    let Ok(mut buf) = buffers.recv() else { break };
                    // Every byte is written by `convert`: no need to clear what a previous tensor left.
                    buf.resize(ty.bytes_for(&info.shape)?, 0);
                    convert(info, &raw, *ty, &mut buf)?;
                    Chunk::Data(buf)
                };
                if send.send(chunk).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(send);
        let written = writer.join().expect("the writer thread does not panic");
        converted.and(written)
    });
    drop(out);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, output).map_err(|e| GgufError::Io(format!("{}: {e}", output.display())))?;
    Ok(Summary { tensors: plan.tensors.iter().map(|(t, ty)| (t.name.clone(), t.shape.clone(), *ty)).collect() })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::Device;
    use forge_model::{Arch, Llama, ModelConfig, Tokenizer};

    use super::*;

    fn tiny(tie: bool, layers: usize) -> (Llama, Tokenizer) {
        let texts = ["HEAR YE! The baron fears geese.", "BEWARE! The miller waters the ale."]
            .iter()
            .map(|s| s.to_string())
            .cycle()
            .take(20);
        let tok = Tokenizer::train_bpe(texts, 300).unwrap();
        let cfg = ModelConfig {
            arch: Arch::Llama,
            hidden: 256,
            intermediate: 256,
            layers,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            vocab: tok.vocab_size(),
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_positions: 64,
            tie_embeddings: tie,
            qkv_bias: false,
            bos: None,
            eos: vec![tok.eos.as_ref().unwrap().1],
            pad: None,
            gemma: None,
        };
        (Llama::random(cfg, 3, &Device::Cpu).unwrap(), tok)
    }

    fn tensors_of(path: &Path) -> BTreeMap<String, (Vec<usize>, GgmlType, Vec<u8>)> {
        let mut f = std::fs::File::open(path).unwrap();
        let g = crate::format::read(&mut f).unwrap();
        g.tensors
            .iter()
            .map(|t| (t.name.clone(), (t.shape.clone(), t.ty, g.tensor_bytes(&mut f, t).unwrap())))
            .collect()
    }

    /// Requantizing forge's f32 file gives the tensors (bytes, types, order) and metadata values of
    /// converting the model at that level directly, for every level.
    #[test]
    fn requantizing_f32_equals_converting_directly() {
        let dir = tempfile::tempdir().unwrap();
        for tie in [true, false] {
            let (model, tok) = tiny(tie, 2);
            let f32_path = dir.path().join("f32.gguf");
            crate::convert::write_model(&f32_path, &model, &tok, QuantLevel::F32, "t", Default::default()).unwrap();
            for level in QuantLevel::ALL {
                let direct = dir.path().join(format!("{level}.gguf"));
                let summary =
                    crate::convert::write_model(&direct, &model, &tok, level, "t", Default::default()).unwrap();
                let re = dir.path().join(format!("re-{level}.gguf"));
                let re_summary = requantize_file(&f32_path, &re, level).unwrap();
                assert_eq!(
                    summary.tensors.iter().map(|t| (&t.0, t.2)).collect::<Vec<_>>(),
                    re_summary.tensors.iter().map(|t| (&t.0, t.2)).collect::<Vec<_>>(),
                    "{level}, tied {tie}: names, order and types"
                );
                assert!(tensors_of(&direct) == tensors_of(&re), "{level}, tied {tie}: tensor bytes");
                let (a, b) = (Gguf::open(&direct).unwrap(), Gguf::open(&re).unwrap());
                assert_eq!(a.metadata_map(), b.metadata_map(), "{level}: metadata");
            }
        }
    }

    /// From f16 input: tensors already of the target type are copied, norms keep their type, and
    /// the mixing counts `attn_v`/`ffn_down` like llama.cpp.
    #[test]
    fn requantizing_f16_keeps_copies_and_mixes() {
        let dir = tempfile::tempdir().unwrap();
        let (model, tok) = tiny(true, 9);
        let f16_path = dir.path().join("f16.gguf");
        crate::convert::write_model(&f16_path, &model, &tok, QuantLevel::F16, "t", Default::default()).unwrap();
        let f16 = tensors_of(&f16_path);
        let same = dir.path().join("same.gguf");
        requantize_file(&f16_path, &same, QuantLevel::F16).unwrap();
        assert!(tensors_of(&same) == f16);
        assert_eq!(Gguf::open(&same).unwrap().get("general.file_type").and_then(Value::as_u64), Some(1));

        let q = dir.path().join("q4_k_m.gguf");
        requantize_file(&f16_path, &q, QuantLevel::Q4KM).unwrap();
        let out = tensors_of(&q);
        assert_eq!(out["blk.0.attn_norm.weight"], f16["blk.0.attn_norm.weight"]);
        assert_eq!(out["token_embd.weight"].1, GgmlType::Q6K, "tied embeddings are the output");
        // 9 layers: use_more_bits picks 0, 3, 6, 7, 8.
        for l in 0..9 {
            let want = if [0, 3, 6, 7, 8].contains(&l) { GgmlType::Q6K } else { GgmlType::Q4K };
            assert_eq!(out[&format!("blk.{l}.attn_v.weight")].1, want, "attn_v {l}");
            assert_eq!(out[&format!("blk.{l}.ffn_down.weight")].1, want, "ffn_down {l}");
            assert_eq!(out[&format!("blk.{l}.attn_q.weight")].1, GgmlType::Q4K);
        }
        // The values are those of quantizing the f16 weights' f32 values.
        let (shape, ty, bytes) = &f16["blk.2.ffn_up.weight"];
        let x = dequantize(*ty, bytes, shape.iter().product()).unwrap();
        assert_eq!(out["blk.2.ffn_up.weight"].2, quantize(GgmlType::Q4K, &x).unwrap());
    }

    #[test]
    fn which_tensors_llama_cpp_quantizes() {
        assert!(allows_quantization("blk.0.attn_q.weight", &[256, 256]));
        assert!(allows_quantization("token_embd.weight", &[1000, 256]));
        assert!(!allows_quantization("blk.0.attn_q_norm.weight", &[256]));
        assert!(!allows_quantization("blk.0.post_ffw_norm.weight", &[1, 640]));
        assert!(!allows_quantization("blk.0.attn_q.bias", &[256, 256]));
        assert!(!allows_quantization("blk.0.ffn_gate_inp.weight", &[8, 256]));
        assert!(!allows_quantization("blk.0.attn_q.weight", &[1, 1, 256]));
        assert!(allows_quantization("blk.0.attn_q.weight", &[2, 1, 256]));
    }
}
