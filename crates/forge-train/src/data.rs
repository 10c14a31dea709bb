//! From dataset samples to training batches: the chat-formatted prompt and completion, per-token
//! loss weights (the prompt-loss weight), truncation, optional packing, and micro-batches in a
//! seeded order.

use candle_core::{Device, Tensor};
use forge_model::{Layout, Tokenizer};

use crate::{Result, TrainError};

/// One tokenized training pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Tokens that belong to the prompt (the first `prompt_len` of `ids`).
    pub prompt_len: usize,
}

/// Tokenizes `prompt` (the student's input through the chat template) and `completion` (the
/// teacher's answer plus the template's end of turn), cut to `seq_len` tokens. `None` when the
/// prompt alone fills `seq_len` and nothing would be learned.
pub fn example(tok: &Tokenizer, input: &str, output: &str, seq_len: usize) -> Result<Option<Example>> {
    let prompt = tok.prompt(None, input)?;
    let mut ids = tok.encode_prompt(&prompt)?;
    let prompt_len = ids.len();
    if prompt_len + 1 >= seq_len {
        return Ok(None);
    }
    let suffix = tok.completion_suffix()?;
    ids.extend(tok.encode(&format!("{output}{suffix}"))?);
    ids.truncate(seq_len);
    Ok(Some(Example { ids, prompt_len }))
}

/// A batch ready for the model: ids `[B, T]` (row-major), their layout, and per position the
/// next-token target and its loss weight.
pub struct Batch {
    pub ids: Vec<u32>,
    pub layout: Layout,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

impl Batch {
    /// The ids as a `[B, T]` tensor.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.ids.clone(), (self.layout.batch, self.layout.len), device)?)
    }

    /// The batch as the training engine reads it.
    pub fn engine(&self) -> forge_model::engine::Batch<'_> {
        forge_model::engine::Batch {
            ids: &self.ids,
            layout: &self.layout,
            targets: &self.targets,
            weights: &self.weights,
        }
    }
}

/// A row of one or more examples (several when packing).
#[derive(Clone, Debug, Default)]
pub struct Row {
    examples: Vec<usize>,
    len: usize,
}

/// Groups examples (in `order`) into rows: one example per row, or with `packing` as many whole
/// examples as fit in `seq_len`, in order.
pub fn rows(examples: &[Example], order: &[usize], seq_len: usize, packing: bool) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for &i in order {
        let n = examples[i].ids.len();
        match out.last_mut() {
            Some(r) if packing && r.len + n <= seq_len => {
                r.examples.push(i);
                r.len += n;
            }
            _ => out.push(Row { examples: vec![i], len: n }),
        }
    }
    out
}

/// A seeded permutation of `0..n` (Fisher–Yates over forge's RNG).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = forge_rng::SplitMix64::new(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Builds the batch of `rows`, padded to the longest. Position `t` of a segment predicts the
/// token at `t + 1` with weight `prompt_loss_weight` if that token is part of the prompt and 1
/// if it is part of the completion; the last token of a segment and padding predict nothing.
pub fn batch(examples: &[Example], rows: &[Row], prompt_loss_weight: f32, pad: u32) -> Result<Batch> {
    let t = rows.iter().map(|r| r.len).max().ok_or_else(|| TrainError::Data("an empty batch".into()))?;
    let b = rows.len();
    let mut ids = vec![pad; b * t];
    let mut positions = vec![0u32; b * t];
    let mut segments = vec![0u32; b * t];
    let mut targets = vec![0u32; b * t];
    let mut weights = vec![0f32; b * t];
    let mut tokens = 0;
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * t;
        for (s, &e) in row.examples.iter().enumerate() {
            let ex = &examples[e];
            for (p, &id) in ex.ids.iter().enumerate() {
                ids[at + p] = id;
                positions[at + p] = p as u32;
                segments[at + p] = s as u32 + 1;
                if let Some(&next) = ex.ids.get(p + 1) {
                    targets[at + p] = next;
                    weights[at + p] = if p + 1 < ex.prompt_len { prompt_loss_weight } else { 1.0 };
                }
            }
            tokens += ex.ids.len();
            at += ex.ids.len();
        }
    }
    Ok(Batch { ids, layout: Layout { batch: b, len: t, positions, segments }, targets, weights, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, prompt: usize) -> Example {
        Example { ids: (10..10 + n as u32).collect(), prompt_len: prompt }
    }

    #[test]
    fn packing_keeps_examples_whole_and_in_order() {
        let examples = vec![ex(5, 2), ex(4, 1), ex(6, 3), ex(2, 1)];
        let packed = rows(&examples, &[0, 1, 2, 3], 10, true);
        assert_eq!(packed.iter().map(|r| r.examples.clone()).collect::<Vec<_>>(), vec![vec![0, 1], vec![2, 3]]);
        let single = rows(&examples, &[3, 0, 1, 2], 10, false);
        assert_eq!(single.len(), 4);
        assert_eq!(single[0].examples, vec![3]);
    }

    #[test]
    fn batch_targets_weights_positions_and_segments() {
        let examples = vec![ex(3, 2), ex(2, 1)];
        let r = rows(&examples, &[0, 1], 8, true);
        let b = batch(&examples, &r, 0.25, 0).unwrap();
        assert_eq!(b.layout.positions, vec![0, 1, 2, 0, 1]);
        assert_eq!(b.layout.segments, vec![1, 1, 1, 2, 2]);
        // Example 0: ids 10 11 12, prompt 10 11 → 10 predicts 11 (prompt), 11 predicts 12 (answer).
        assert_eq!(b.targets, vec![11, 12, 0, 11, 0]);
        assert_eq!(b.weights, vec![0.25, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(b.tokens, 5);
        // Unpacked rows are padded to the longest.
        let r = rows(&examples, &[0, 1], 8, false);
        let b = batch(&examples, &r, 0.0, 99).unwrap();
        assert_eq!(
            b.ids_tensor(&Device::Cpu).unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![10, 11, 12], vec![10, 11, 99]]
        );
        assert_eq!(b.layout.segments, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(b.weights, vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn shuffles_are_seeded_permutations() {
        let a = shuffled(50, 7);
        assert_eq!(a, shuffled(50, 7));
        assert_ne!(a, shuffled(50, 8));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}
