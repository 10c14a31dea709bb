//! Sampling tokens: temperature, top-k and top-p (nucleus) with a seed, stop tokens and a
//! token budget, over forge's decoder with a KV cache.

use candle_core::{D, Tensor};

use crate::Result;
use crate::llama::{KvCache, Llama};

#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy (argmax).
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, top_k: None, seed: 0, max_tokens: 256 }
    }
}

/// How far below the largest logit, in units of the temperature, a token stays a candidate.
const CUTOFF: f64 = 50.0;

/// Picks the next token from one row of logits: greedy, or temperature with top-k and top-p,
/// from the seeded generator — in time linear in the vocabulary rather than a sort of all of it
/// per token (262,144 entries for Gemma 3: milliseconds a token).
///
/// Only tokens within `50 · temperature` of the largest logit are candidates: the others'
/// probabilities are below `e^-50` ≈ 2·10⁻²² of the largest, less than half an ulp of the total
/// (which is at least 1), so adding them to it changes no bit, and the candidates sort as the
/// full sort orders them. This picks what sorting the whole vocabulary picks unless the uniform
/// draw falls in the last 10⁻¹⁷ of the distribution (tested against the full sort).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut forge_rng::SplitMix64) -> u32 {
    if s.temperature <= 0.0 || logits.len() < 2 {
        return argmax(logits);
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let floor = max - CUTOFF * s.temperature;
    let idx: Vec<usize> = (0..logits.len()).filter(|&i| logits[i] as f64 > floor).collect();
    if idx.is_empty() {
        return argmax(logits);
    }
    pick(logits, idx, s, rng)
}

/// The first index of the largest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &l)| if l > b.1 { (i, l) } else { b }).0 as u32
}

/// Samples among the candidates `idx`: sorted by logit (then index), top-k, softmax at the
/// temperature, top-p, one uniform draw.
fn pick(logits: &[f32], mut idx: Vec<usize>, s: &Sampling, rng: &mut forge_rng::SplitMix64) -> u32 {
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = s.top_k.filter(|k| *k > 0) {
        idx.truncate(k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cum += p;
                cum >= s.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.next_f64();
    for (p, i) in probs.iter().zip(&idx) {
        if u < *p {
            return *i as u32;
        }
        u -= p;
    }
    *idx.last().expect("at least one candidate") as u32
}

/// Generates up to `s.max_tokens` tokens after `prompt`, stopping after any token in `stop`
/// (which is not returned).
pub fn generate(model: &Llama, prompt: &[u32], stop: &[u32], s: &Sampling) -> Result<Vec<u32>> {
    let mut rng = forge_rng::SplitMix64::new(s.seed);
    let mut cache = KvCache::new();
    let device = model.device();
    let mut out = Vec::new();
    let mut next_input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    for _ in 0..s.max_tokens {
        if cache.len() + next_input.dim(1)? > model.cfg.max_positions {
            break;
        }
        let logits = model.forward_cached(&next_input, &mut cache)?;
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        let row: Vec<f32> = last.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let token = sample(&row, s, &mut rng);
        if stop.contains(&token) {
            break;
        }
        out.push(token);
        next_input = Tensor::new(&[token], device)?.unsqueeze(0)?;
    }
    Ok(out)
}

/// The greedy next-token argmax at every position of `ids` (one forward pass).
pub fn argmax_tokens(model: &Llama, ids: &[u32]) -> Result<Vec<u32>> {
    let input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let logits = model.forward(&input, &crate::llama::Layout::dense(1, ids.len()), &crate::llama::Dropout::off())?;
    Ok(logits.squeeze(0)?.argmax(D::Minus1)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over many draws, temperatures, top-k and top-p settings and logit spreads (a peaked row
    /// whose tail falls below the cutoff included), every pick equals sorting the whole row.
    #[test]
    fn picks_the_same_tokens_as_sorting_the_whole_vocabulary() {
        let mut draw = forge_rng::SplitMix64::new(11);
        for case in 0..400u64 {
            let vocab = 50 + (case as usize * 37) % 3000;
            let spread = [0.5, 4.0, 40.0, 400.0][case as usize % 4];
            let logits: Vec<f32> = (0..vocab).map(|_| ((draw.next_f64() - 0.5) * spread) as f32).collect();
            let s = Sampling {
                temperature: [0.3, 0.7, 1.0, 1.5][(case / 4) as usize % 4],
                top_p: [1.0, 0.9, 0.5][(case / 16) as usize % 3],
                top_k: [None, Some(40), Some(1)][(case / 48) as usize % 3],
                seed: case,
                max_tokens: 1,
            };
            let (mut a, mut b) = (forge_rng::SplitMix64::new(case), forge_rng::SplitMix64::new(case));
            for _ in 0..8 {
                let full = pick(&logits, (0..vocab).collect(), &s, &mut b);
                assert_eq!(sample(&logits, &s, &mut a), full, "case {case}: {s:?}");
            }
        }
    }

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = forge_rng::SplitMix64::new(1);
        assert_eq!(sample(&logits, &Sampling::default(), &mut rng), 1);
        let top1 = Sampling { temperature: 1.0, top_k: Some(1), ..Sampling::default() };
        assert!((0..50).all(|_| sample(&logits, &top1, &mut rng) == 1));
        // top-p 0.5 keeps only the two leading tokens (1 and 3: 0.45 + 0.41 of the mass).
        let nucleus = Sampling { temperature: 1.0, top_p: 0.5, ..Sampling::default() };
        let seen: std::collections::BTreeSet<u32> = (0..200).map(|_| sample(&logits, &nucleus, &mut rng)).collect();
        assert_eq!(seen, [1, 3].into_iter().collect());
        // Same seed, same tokens.
        let hot = Sampling { temperature: 2.0, ..Sampling::default() };
        let run = |seed| {
            let mut r = forge_rng::SplitMix64::new(seed);
            (0..20).map(|_| sample(&logits, &hot, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
    }
}
