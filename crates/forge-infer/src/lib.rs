//! forge-infer: the runtime a game links to run forge's models. Its quantized decoder runs a GGUF llama, qwen2 or gemma3 model as llama.cpp would —
//! weights stay quantized and multiply as integer dot products against the activations quantized
//! to the weight's dot-product type (as ggml does) — with a KV cache, sampling (temperature,
//! top-p, top-k, seed), stop tokens and a token budget, and the student's prompt format from the
//! file's chat template.
//!
//! RoPE follows the file: llama's Q/K rows were interleaved by the converter, so pairs of
//! adjacent dimensions rotate (`rope_i`); qwen2's and gemma3's were not, so halves rotate
//! (`rope`). `rope_freqs.weight` (Llama 3 scaling) divides each pair's frequency.
//!
//! Gemma 3 (llama.cpp's `gemma3` graph): embeddings scaled by √hidden; RMSNorm on each query and
//! key head and after attention and after the FFN (GGUF stores these norms' weights with
//! Gemma's +1 folded in, so all are plain RMSNorms); queries scaled by 1/√head_dim; GELU (tanh)
//! gate; five of every six layers attend to a sliding window (`gemma3.attention.sliding_window`)
//! with RoPE base 10000, the sixth globally with the file's base; no logit soft-capping. Its
//! SentencePiece vocabulary is read as llama.cpp tokenizes it (`forge_gguf::tokenizer`).
//!
//! Timings are split as DefameLM reports them: preparation (loading, then the prompt) and the
//! time per generated token.
//!
//! # How it runs
//!
//! One step (the prompt in one batch, or one new token) is plain loops over `f32` buffers, no
//! tensor graph: RMSNorm, then Q, K and V in one parallel pass, RoPE, the new keys and values
//! written to the cache (one allocation, f16, position-major), attention, the output projection, then gate and
//! up in one pass, the activation, down. Every matrix product quantizes its input once per
//! dot-product type (`q8_0` for `q8_0`/`q4_0`/`q5_0` weights, `q8_1`, `q8_K` for the k-quants)
//! and runs:
//!
//! - `q8_0`, `q4_0` and `q5_0` weights: forge's own AVX2 kernels (AVX512-VNNI `vpdpbusd` where
//!   the CPU has it) over weights repacked at load so that a group of rows streams from memory
//!   in order: with VNNI, `q8_0`/`q4_0` rows by octets interleaved 4 values at a time (each
//!   `vpdpbusd` lane is a different row, the float accumulators transposed), 8 rows times 2
//!   inputs at a time; otherwise quads of rows times 4 inputs. They compute exactly candle's
//!   `vec_dot`, so the logits are bit-identical to candle's quantized matmul
//!   ([`Kernels::Candle`] runs candle's own, for comparison);
//! - other block types: candle's `GgmlType::vec_dot` row by row;
//! - `f32`/`f16`/`bf16` weights: dequantized to `f32` at load, an FMA dot product with the input
//!   rounded to the weights' precision (ggml's dot-product type for `f16` is `f16`, for `bf16`
//!   `bf16`).
//!
//! Attention follows llama.cpp's default (no flash attention, an `f16` KV cache): keys and values
//! are stored as `f16`, each query is rounded to `f16` before its dot products with the
//! keys, the softmax sums in `f64` and the probabilities are rounded to `f16` before they weight
//! the values; RoPE angles are computed in `f32` as ggml computes them. So the numbers llama.cpp's
//! own decoding rounds are rounded here too: on forge's `q8_0` files the logits after a prompt
//! equal llama.cpp's bit for bit, and `f32`/`f16` agree to about 1e-4/1e-3
//! (`scripts/gguf_check.py`). Every row of a batch is computed as if alone, so a prompt in one
//! batch equals the same tokens fed one at a time, bit for bit.
//!
//! Parallel passes run on the model's own thread pool (`threads`, default `FORGE_THREADS`, else
//! `RAYON_NUM_THREADS`, else the CPU count): workers take chunks of rows from a shared cursor —
//! matrix rows, (query, head) pairs of attention, and for a prompt its rows' norms, RoPE,
//! activation and quantization; a pass too small to pay for the hand-off ([`PAR_MIN_WORK`])
//! runs on the calling thread alone.
//! The pool waits by spinning briefly, then yielding, then parking, and a pass never waits for a
//! worker that had not started it — on a busy machine a descheduled worker cannot stall a token.
//! (candle's own pool did: its caller spins until every worker has checked in, for every
//! matmul — 10-20 ms per token of a 1-layer model on a loaded 2-core machine.)

//! # Files
//!
//! - [`model`]: [`QModel`] and loading a GGUF file (one parse of its header, tensors read once);
//! - [`adapter`]: LoRA adapters applied per request on a shared base;
//! - [`forward`]: one step of the network (norms, attention, RoPE, the FFN);
//! - [`matmul`]: weight matrices, the activations quantized for them, and which kernels run;
//! - [`kernels`]: the SIMD kernels, one file per block family;
//! - [`pool`]: the thread pool the passes run on;
//! - [`sampling`] and [`generate`]: picking tokens, the KV cache, prompts and answers;
//! - [`tokenizer`]: chat prompts, stop tokens, and text streamed as it is generated.

pub mod adapter;
pub mod forward;
pub mod generate;
pub mod kernels;
pub mod matmul;
pub mod model;
pub mod pool;
pub mod sampling;
pub mod tokenizer;

pub use adapter::Adapter;
pub use generate::{BenchRun, Cache, Generation, Prefill};
pub use matmul::Kernels;
pub use model::QModel;
pub use sampling::Sampling;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The file is not a model this decoder runs, or a request it cannot serve.
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Io(String),
    /// The memory a load needs was refused.
    #[error("{0}")]
    Memory(String),
    #[error(transparent)]
    Gguf(#[from] forge_gguf::GgufError),
    #[error(transparent)]
    Forge(#[from] forge_model::ModelError),
}

pub type Result<T> = std::result::Result<T, InferError>;

/// Below this many multiply-adds a pass runs on the calling thread: handing work to another
/// thread costs more than it saves.
pub const PAR_MIN_WORK: usize = 256 * 1024;
/// The thread count a model starts with: `FORGE_THREADS`, else `RAYON_NUM_THREADS`, else the
/// number of CPUs this process may use.
pub fn default_threads() -> usize {
    ["FORGE_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse::<usize>().ok()).filter(|n| *n > 0))
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}
