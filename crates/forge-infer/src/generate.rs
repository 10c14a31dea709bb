//! Generation on a [`QModel`]: the KV cache, a processed prompt that several answers continue
//! from, sampling until a stop token or the budget, and the timed runs of the benchmark.
//! Timings are split as DefameLM reports them: preparation (loading, then the prompt) and the
//! time per generated token.

use std::time::Instant;

use crate::Result;
use crate::model::QModel;
use crate::sampling::{Sampling, argmax, sample};

/// Keys and values seen so far, stored as `f16` bits as llama.cpp's default cache stores
/// them, in one allocation (so that a finished answer's cache goes back to the system at once,
/// not as dozens of pieces the allocator keeps): per layer, keys then values, each
/// position-major (`[position][kv head][head dim]`) with room for `cap` positions.
#[derive(Default, Clone, Debug)]
pub struct Cache {
    data: Vec<u16>,
    layers: usize,
    /// Values per position of one layer's keys (or values).
    row: usize,
    cap: usize,
    pub(crate) len: usize,
}

impl Cache {
    /// An empty cache with room for `positions` tokens of `model` (it grows past them if need be).
    pub fn with_capacity(model: &QModel, positions: usize) -> Cache {
        let mut c = Cache::default();
        c.fit(model.blocks.len(), model.cfg.kv_heads * model.cfg.head_dim, positions.min(model.cfg.max_positions));
        c
    }

    /// Makes room for `positions` positions of `layers` layers of `row` values (keeping what
    /// is cached, which must have the same shape).
    pub(crate) fn fit(&mut self, layers: usize, row: usize, positions: usize) {
        if (layers, row) != (self.layers, self.row) {
            *self = Cache { layers, row, ..Cache::default() };
        }
        if positions <= self.cap {
            return;
        }
        let cap = positions.max(2 * self.cap);
        let mut data = vec![0u16; layers * 2 * cap * row];
        for part in 0..layers * 2 {
            let old = &self.data[part * self.cap * row..][..self.len * row];
            data[part * cap * row..][..old.len()].copy_from_slice(old);
        }
        (self.data, self.cap) = (data, cap);
    }

    /// Layer `l`'s keys and values, room for every position.
    pub(crate) fn layer(&mut self, l: usize) -> (&mut [u16], &mut [u16]) {
        let n = self.cap * self.row;
        self.data[2 * l * n..(2 * l + 2) * n].split_at_mut(n)
    }

    /// Tokens seen so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        2 * self.data.len()
    }

    /// Forgets every token, keeping the memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// A processed prompt: its KV cache, the logits after it, and the seconds it took.
#[derive(Clone, Debug)]
pub struct Prefill {
    cache: Cache,
    logits: Vec<f32>,
    pub tokens: usize,
    pub seconds: f64,
}

/// One generation and its timings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    pub text: String,
    pub tokens: usize,
    pub prompt_tokens: usize,
    /// Seconds to process the prompt.
    pub prompt_s: f64,
    /// Seconds to generate the tokens.
    pub decode_s: f64,
    /// Ended on a stop token (rather than the budget).
    pub stopped: bool,
}

impl QModel {
    /// Generates after prompt ids `prompt`, stopping at `stop` or after `s.max_tokens`.
    pub fn generate_ids(&self, prompt: &[u32], stop: &[u32], s: &Sampling) -> Result<(Vec<u32>, f64, f64, bool)> {
        let p = self.prefill(prompt, s.max_tokens)?;
        let (out, decode_s, stopped) = self.continue_from(&p, stop, s)?;
        Ok((out, p.seconds, decode_s, stopped))
    }

    /// Processes a prompt once, for any number of generations to continue from.
    pub fn prefill(&self, prompt: &[u32], room: usize) -> Result<Prefill> {
        let mut cache = Cache::with_capacity(self, prompt.len() + room);
        let t0 = Instant::now();
        let logits = self.step(prompt, &mut cache)?;
        Ok(Prefill { cache, logits, tokens: prompt.len(), seconds: t0.elapsed().as_secs_f64() })
    }

    /// Samples an answer after a [`prefill`](Self::prefill)ed prompt: the tokens, the seconds
    /// they took, and whether a stop token ended them.
    pub fn continue_from(&self, p: &Prefill, stop: &[u32], s: &Sampling) -> Result<(Vec<u32>, f64, bool)> {
        let mut rng = forge_rng::SplitMix64::new(s.seed);
        let mut cache = p.cache.clone();
        let mut logits = p.logits.clone();
        let t1 = Instant::now();
        let mut out = Vec::new();
        let mut stopped = false;
        while out.len() < s.max_tokens {
            let token = sample(&logits, s, &mut rng);
            if stop.contains(&token) {
                stopped = true;
                break;
            }
            out.push(token);
            if cache.len + 1 > self.cfg.max_positions || out.len() == s.max_tokens {
                break;
            }
            logits = self.step(&[token], &mut cache)?;
        }
        Ok((out, t1.elapsed().as_secs_f64(), stopped))
    }

    /// The student's prompt for `input` (the file's chat format), prefilled.
    pub fn prefill_input(&self, input: &str, room: usize) -> Result<Prefill> {
        let prompt = self.tokenizer.prompt(None, input)?;
        let ids = self.tokenizer.encode_prompt(&prompt)?;
        self.prefill(&ids, room)
    }

    /// An answer after a prefilled input, decoded, with its timings.
    pub fn generate_after(&self, p: &Prefill, s: &Sampling) -> Result<Generation> {
        let stop = self.tokenizer.stop_ids(&self.cfg.eos);
        let (tokens, decode_s, stopped) = self.continue_from(p, &stop, s)?;
        Ok(Generation {
            text: self.tokenizer.decode(&tokens)?,
            tokens: tokens.len(),
            prompt_tokens: p.tokens,
            prompt_s: p.seconds,
            decode_s,
            stopped,
        })
    }

    /// The student's answer to `input`, in the file's chat format.
    pub fn generate(&self, input: &str, s: &Sampling) -> Result<Generation> {
        self.generate_after(&self.prefill_input(input, s.max_tokens)?, s)
    }

    /// Greedy tokens for `ids` — used to check the decoder against the f32 model.
    pub fn greedy(&self, ids: &[u32], n: usize) -> Result<Vec<u32>> {
        Ok(self.generate_ids(ids, &[], &Sampling { temperature: 0.0, max_tokens: n, ..Sampling::default() })?.0)
    }

    /// The argmax at the last position of `ids`.
    pub fn argmax(&self, ids: &[u32]) -> Result<u32> {
        Ok(argmax(&self.step(ids, &mut Cache::default())?))
    }

    /// Times `reps` runs of: the prompt `ids` in one batch, then `n_gen` greedy tokens one at a time
    /// (never stopping early). Returns each run's timings and the tokens of the last run.
    pub fn bench(&self, ids: &[u32], n_gen: usize, reps: usize) -> Result<(Vec<BenchRun>, Vec<u32>)> {
        let mut cache = Cache::with_capacity(self, ids.len() + n_gen + 1);
        let mut runs = Vec::with_capacity(reps);
        let mut tokens = Vec::with_capacity(n_gen);
        for _ in 0..reps {
            cache.clear();
            tokens.clear();
            let (t0, c0) = (Instant::now(), cpu_seconds());
            let mut logits = self.step(ids, &mut cache)?;
            let (prompt_s, c1) = (t0.elapsed().as_secs_f64(), cpu_seconds());
            let t1 = Instant::now();
            for _ in 0..n_gen {
                let token = argmax(&logits);
                tokens.push(token);
                logits = self.step(&[token], &mut cache)?;
            }
            let decode_s = t1.elapsed().as_secs_f64();
            runs.push(BenchRun { prompt_s, decode_s, prompt_cpu_s: c1 - c0, decode_cpu_s: cpu_seconds() - c1 });
        }
        Ok((runs, tokens))
    }
}

/// One timed run of [`QModel::bench`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BenchRun {
    /// Wall-clock seconds for the prompt, then for the generated tokens.
    pub prompt_s: f64,
    pub decode_s: f64,
    /// CPU seconds the process used meanwhile (all its threads, spinning included).
    pub prompt_cpu_s: f64,
    pub decode_cpu_s: f64,
}

/// CPU seconds this process has used.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
