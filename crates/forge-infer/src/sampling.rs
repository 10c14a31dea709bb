//! Picking the next token: greedy, or temperature with top-k and top-p (nucleus), from a seeded
//! generator — the same choices as `forge_model::generate::sample` (the trainer's decoder), in
//! time linear in the vocabulary instead of a sort of all of it per token (262,144 entries for
//! Gemma 3: milliseconds a token).
//!
//! Only tokens within `50 · temperature` of the largest logit are candidates: the others'
//! probabilities are below `e^-50` ≈ 2·10⁻²² of the largest, less than half an ulp of the total
//! (which is at least 1), so adding them to it changes no bit, and the candidates are sorted as
//! the full sort orders them. The two samplers differ only when the uniform draw falls in the last
//! 10⁻¹⁷ of the distribution.

pub use forge_model::generate::Sampling;
/// The seeded generator answers draw from (the same for a seed everywhere in forge).
pub use forge_rng::SplitMix64 as Rng;

/// How far below the largest logit, in units of the temperature, a token stays a candidate.
const CUTOFF: f64 = 50.0;

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut forge_rng::SplitMix64) -> u32 {
    if s.temperature <= 0.0 || logits.len() < 2 {
        return argmax(logits);
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let floor = max - CUTOFF * s.temperature;
    let mut idx: Vec<usize> = (0..logits.len()).filter(|&i| logits[i] as f64 > floor).collect();
    if idx.is_empty() {
        return argmax(logits);
    }
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = s.top_k.filter(|k| *k > 0) {
        idx.truncate(k);
    }
    let top = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - top) / s.temperature).exp()).collect();
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

/// The first index of the largest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &l)| if l > b.1 { (i, l) } else { b }).0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over many draws, temperatures, top-k and top-p settings and logit spreads (a peaked row
    /// whose tail falls below the cutoff included), every pick equals the full-sort sampler's.
    #[test]
    fn picks_the_same_tokens_as_the_full_sort_sampler() {
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
                assert_eq!(
                    sample(&logits, &s, &mut a),
                    forge_model::generate::sample(&logits, &s, &mut b),
                    "case {case}: {s:?}"
                );
            }
        }
    }

    #[test]
    fn greedy_takes_the_first_largest_logit() {
        let s = Sampling::default();
        assert_eq!(sample(&[0.0, 2.0, 2.0, -1.0], &s, &mut forge_rng::SplitMix64::new(0)), 1);
    }
}
