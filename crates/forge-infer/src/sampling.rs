//! Picking the next token: greedy, or temperature with top-k and top-p (nucleus), from a seeded
//! generator — the sampler forge trains and benchmarks with (`forge_model::generate`), linear in
//! the vocabulary, so that a seed gives the same answer in the game as in the benchmark.

pub use forge_model::generate::{Sampling, argmax, sample};
/// The seeded generator answers draw from (the same for a seed everywhere in forge).
pub use forge_rng::SplitMix64 as Rng;
