//! Running a model: one full forward pass ([`forward`], behind `dsc logits`) and token
//! generation through the KV cache ([`generate`], behind `dsc generate`), on any
//! [`Backend`].
//!
//! # Batches of different lengths
//!
//! Prompts are **left-padded** to the longest: every sequence's newest token is then in
//! the same (last) column, so one decode step serves the whole batch. Each sequence keeps
//! its own RoPE positions (`0..len`, pads at 0), and an additive mask hides the pad keys
//! from every real query: `-inf` where the key is a pad and the query is not, 0
//! elsewhere (pad queries may see pad keys, so no row is fully masked). A batch without
//! padding passes no mask at all and runs the unmasked graph, so equal-length batches are
//! computed exactly as the reference fixtures were.
//!
//! # Stopping
//!
//! A sequence stops after `max_new_tokens` or when it produces a stop token (which is
//! kept in its output, as Hugging Face keeps EOS). Finished sequences keep stepping with
//! the rest of the batch, their results ignored.

pub mod backend;
pub mod reference;
pub mod rewrite;

pub use backend::{
    parse_backend, Backend, BackendError, CacheStore, KvCache, LayerRouting, SampleParams, Sampled, StepInput, StepOutput, BACKENDS,
};
pub use reference::{CompileOptions, Engine, HeldValue, Interpreter, ModelBackend, ReferenceBackend, Value};

use crate::reference::Tensor;
use crate::sampling::{Sampler, Sampling, SamplingError};
use std::fmt;
use std::time::Instant;

/// Why a run could not produce its result.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateError {
    /// The prompts or options are unusable (empty, out-of-vocabulary ids, ragged batch
    /// where one forward pass needs equal lengths).
    Input(String),
    Sampling(SamplingError),
    Backend(BackendError),
}

impl fmt::Display for GenerateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GenerateError::Input(m) => f.write_str(m),
            GenerateError::Sampling(e) => write!(f, "sampling: {e}"),
            GenerateError::Backend(e) => write!(f, "backend: {e}"),
        }
    }
}

impl std::error::Error for GenerateError {}

impl From<BackendError> for GenerateError {
    fn from(e: BackendError) -> GenerateError {
        GenerateError::Backend(e)
    }
}

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end a sequence (usually the model's EOS).
    pub stop: Vec<i64>,
    /// The id written into pad positions (never seen by a real token).
    pub pad: i64,
    /// Keep the logits behind every chosen token ([`Generation::step_logits`]).
    pub keep_logits: bool,
    /// Record each chosen token's log-probability and its distribution's entropy
    /// ([`Generation::logprobs`], [`Generation::entropy`]).
    pub logprobs: bool,
    /// Record the experts every MoE router chose for every token ([`Generation::routing`]).
    pub capture_routing: bool,
}

impl Default for GenerateOptions {
    fn default() -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: 16,
            sampling: Sampling::greedy(),
            stop: Vec::new(),
            pad: 0,
            keep_logits: false,
            logprobs: false,
            capture_routing: false,
        }
    }
}

/// Timings and memory of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub batch: usize,
    /// Prompt tokens (without padding), and the padded prompt length.
    pub prompt_tokens: usize,
    pub padded_len: usize,
    pub prefill_secs: f64,
    /// Decode steps run (each one token for every sequence of the batch).
    pub decode_steps: usize,
    pub decode_secs: f64,
    /// The cache at the end: positions, bytes as held, elements per position.
    pub cache_len: usize,
    pub cache_bytes: u64,
    pub cache_elements_per_token: u64,
}

impl Stats {
    /// Tokens produced per second by decode steps (batch × steps / time).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        if self.decode_secs > 0.0 {
            (self.batch * self.decode_steps) as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// What [`generate`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new tokens of every sequence (stop token included when one ended it).
    pub tokens: Vec<Vec<i64>>,
    /// With `keep_logits`: per sequence, the logits each of its tokens was chosen from.
    pub step_logits: Vec<Vec<Vec<f32>>>,
    /// With `logprobs`: per sequence, `log_softmax(logits / T)[token]` of each new token,
    /// T the sampling temperature (1 for greedy), the full distribution before top-k and
    /// top-p: the policy's log-probability as a policy-gradient loss reads it. The scaled
    /// logits are rounded to f32 as the train graph's `mul` rounds them, the log-sum-exp
    /// taken in f64 as its `token_logprob` takes it.
    pub logprobs: Vec<Vec<f64>>,
    /// With `logprobs`: the entropy (nats) of each of those distributions.
    pub entropy: Vec<Vec<f64>>,
    /// With `capture_routing`: one trace per router, in the order the model calls them.
    pub routing: Vec<RoutingTrace>,
    pub stats: Stats,
}

/// The experts one MoE router chose for every token a generation ran through the model.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTrace {
    pub layer: Option<u32>,
    pub top_k: usize,
    /// Per sequence, `[tokens, top_k]` row-major: the prompt's tokens, then each new token
    /// that was fed back (every new token but the last; the last too when it was a stop
    /// token and the batch stepped on).
    pub experts: Vec<Vec<i32>>,
}

/// `(log_softmax(logits·(1/T))[token], entropy)`, the product rounded to f32 and the rest
/// in f64 (see [`Generation::logprobs`]).
pub fn token_logprob(logits: &[f32], token: usize, temperature: f32) -> (f64, f64) {
    let inv = (1.0 / if temperature > 0.0 { temperature as f64 } else { 1.0 }) as f32;
    let z: Vec<f64> = logits.iter().map(|&x| (x * inv) as f64).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|x| (x - m).exp()).sum();
    let lse = m + sum.ln();
    let entropy = -z.iter().map(|x| (x - lse).exp() * (x - lse)).filter(|v| v.is_finite()).sum::<f64>();
    (z[token] - lse, entropy)
}

/// A left-padded batch of prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Padded {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<i64>,
    pub positions: Vec<i64>,
    /// Pad positions at the start of each row.
    pub pads: Vec<usize>,
}

impl Padded {
    /// Left-pads `prompts` with `pad`; positions count from each prompt's first token.
    pub fn new(prompts: &[Vec<i64>], pad: i64) -> Padded {
        let seq = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut positions, mut pads) = (Vec::new(), Vec::new(), Vec::new());
        for p in prompts {
            let n = seq - p.len();
            pads.push(n);
            ids.extend(std::iter::repeat_n(pad, n).chain(p.iter().copied()));
            positions.extend(std::iter::repeat_n(0, n).chain(0..p.len() as i64));
        }
        Padded { batch: prompts.len(), seq, ids, positions, pads }
    }

    pub fn is_padded(&self) -> bool {
        self.pads.iter().any(|&p| p > 0)
    }

    /// The prompt pass's mask `[b, seq, seq]`, `None` without padding.
    pub fn prefill_mask(&self) -> Option<Vec<f32>> {
        self.is_padded().then(|| {
            let s = self.seq;
            let mut m = vec![0.0f32; self.batch * s * s];
            for (b, &pad) in self.pads.iter().enumerate() {
                for q in pad..s {
                    m[(b * s + q) * s..][..pad].fill(f32::NEG_INFINITY);
                }
            }
            m
        })
    }

    /// A decode step's mask `[b, 1, cached + 1]`, `None` without padding.
    pub fn decode_mask(&self, cached: usize) -> Option<Vec<f32>> {
        self.is_padded().then(|| {
            let sk = cached + 1;
            let mut m = vec![0.0f32; self.batch * sk];
            for (b, &pad) in self.pads.iter().enumerate() {
                m[b * sk..][..pad].fill(f32::NEG_INFINITY);
            }
            m
        })
    }
}

/// Prompts must be non-empty and in the vocabulary.
fn check_prompts(prompts: &[Vec<i64>], vocab: usize) -> Result<(), GenerateError> {
    if prompts.is_empty() {
        return Err(GenerateError::Input("no input sequences".into()));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(GenerateError::Input(format!("sequence {i} is empty")));
        }
        if let Some(&t) = p.iter().find(|&&t| t < 0 || t as u64 >= vocab as u64) {
            return Err(GenerateError::Input(format!("sequence {i} has token id {t}, outside the vocabulary 0..{vocab}")));
        }
    }
    Ok(())
}

/// One full forward pass over prompts of equal length, positions from 0: logits
/// `[b, s, vocab]` for every position (and, with `capture_routing`, the routers'
/// decisions).
pub fn forward(backend: &dyn Backend, prompts: &[Vec<i64>], capture_routing: bool) -> Result<StepOutput, GenerateError> {
    forward_impl(backend, prompts, capture_routing, false)
}

/// [`forward`] with the last position's logits only, `[b, 1, vocab]`: the prompt pass of
/// a generation without padding.
pub fn forward_last_logits(backend: &dyn Backend, prompts: &[Vec<i64>]) -> Result<StepOutput, GenerateError> {
    forward_impl(backend, prompts, false, true)
}

fn forward_impl(
    backend: &dyn Backend,
    prompts: &[Vec<i64>],
    capture_routing: bool,
    last_logits: bool,
) -> Result<StepOutput, GenerateError> {
    check_prompts(prompts, backend.vocab())?;
    let s = prompts[0].len();
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() != s) {
        return Err(GenerateError::Input(format!(
            "sequences must have equal lengths: sequence 0 has {s} tokens, sequence {i} has {}",
            p.len()
        )));
    }
    let padded = Padded::new(prompts, 0);
    let input = StepInput {
        batch: padded.batch,
        seq: s,
        ids: padded.ids,
        positions: padded.positions,
        mask: None,
        capture_routing,
        last_logits,
        sample: None,
    };
    Ok(backend.prefill(&input)?)
}

/// The logits of position `pos` of every row of `[b, s, V]`.
fn rows_at(logits: &crate::reference::Tensor, pos: usize) -> Vec<Vec<f32>> {
    let (s, v) = (logits.shape()[1], logits.shape()[2]);
    let data = logits.as_f32().expect("backends return f32 logits");
    data.chunks_exact(s * v).map(|row| row[pos * v..(pos + 1) * v].to_vec()).collect()
}

/// What a step gives the next tokens from: the logits of each sequence (sampled on the
/// host), or the tokens the backend sampled.
enum Next {
    Logits(Vec<Vec<f32>>),
    Sampled(Sampled),
}

impl Next {
    fn of(sampled: Option<Sampled>, logits: &Tensor) -> Next {
        match sampled {
            Some(x) => Next::Sampled(x),
            None => Next::Logits(rows_at(logits, logits.shape()[1] - 1)),
        }
    }
}

/// Generates up to `max_new_tokens` for each prompt: the prompt pass, then one decode
/// step per token through the KV cache. With plain greedy or temperature sampling (no
/// top-k or top-p) and no logits kept, a device backend samples where the logits are
/// and returns only the tokens; its temperature draws come from its own seeded stream
/// (`dsc_compiler::codegen::kernels::sample`), not the host sampler's.
pub fn generate(backend: &dyn Backend, prompts: &[Vec<i64>], opts: &GenerateOptions) -> Result<Generation, GenerateError> {
    check_prompts(prompts, backend.vocab())?;
    let mut sampler = Sampler::new(opts.sampling, prompts.len()).map_err(GenerateError::Sampling)?;
    let padded = Padded::new(prompts, opts.pad);
    let b = padded.batch;
    let mut stats = Stats { batch: b, prompt_tokens: prompts.iter().map(Vec::len).sum(), padded_len: padded.seq, ..Stats::default() };
    let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut step_logits: Vec<Vec<Vec<f32>>> = vec![Vec::new(); b];
    let (mut logprobs, mut entropy) = (vec![Vec::new(); b], vec![Vec::new(); b]);
    let mut routing: Vec<RoutingTrace> = Vec::new();
    if opts.max_new_tokens == 0 {
        return Ok(Generation { tokens, step_logits, logprobs, entropy, routing, stats });
    }

    // Sampling where the logits are, when the backend can and nothing needs the logits
    // themselves: greedy or plain temperature (top-k and top-p sort the vocabulary, which
    // the host does). The backend then returns tokens instead of logits.
    let s = &opts.sampling;
    let on_device = !opts.keep_logits && s.top_k.is_none() && s.top_p.is_none();
    let params = |step: usize| on_device.then_some(SampleParams { temperature: s.temperature, seed: s.seed, step: step as u32 });

    let start = Instant::now();
    let input = StepInput {
        batch: b,
        seq: padded.seq,
        ids: padded.ids.clone(),
        positions: padded.positions.clone(),
        mask: padded.prefill_mask(),
        capture_routing: opts.capture_routing,
        // Only the last position is sampled from (left padding puts every prompt's end there).
        last_logits: true,
        sample: params(0),
    };
    let out = backend.prefill(&input)?;
    stats.prefill_secs = start.elapsed().as_secs_f64();
    for r in &out.routing {
        let k = r.indices.shape().last().copied().unwrap_or(0);
        let idx = r.indices.to_f64_vec();
        let experts = (0..b)
            .map(|s| {
                let row = &idx[(s * padded.seq + padded.pads[s]) * k..(s + 1) * padded.seq * k];
                row.iter().map(|&e| e as i32).collect()
            })
            .collect();
        routing.push(RoutingTrace { layer: r.layer, top_k: k, experts });
    }
    let mut next = Next::of(out.sampled, &out.logits);
    let mut cache = out.cache;

    let mut done = vec![false; b];
    let decode_start = Instant::now();
    for step in 0..opts.max_new_tokens {
        for s in 0..b {
            if done[s] {
                continue;
            }
            let t = match &mut next {
                Next::Sampled(x) => x.tokens[s],
                Next::Logits(last) => sampler.sample(s, &last[s]),
            };
            tokens[s].push(t);
            if opts.logprobs {
                let (lp, h) = match &next {
                    Next::Sampled(x) => (x.logprobs[s], x.entropy[s]),
                    Next::Logits(last) => token_logprob(&last[s], t as usize, opts.sampling.temperature),
                };
                logprobs[s].push(lp);
                entropy[s].push(h);
            }
            if let (true, Next::Logits(last)) = (opts.keep_logits, &mut next) {
                step_logits[s].push(std::mem::take(&mut last[s]));
            }
            done[s] = opts.stop.contains(&t);
        }
        if step + 1 == opts.max_new_tokens || done.iter().all(|&d| d) {
            break;
        }
        let cached = cache.len();
        let input = StepInput {
            batch: b,
            seq: 1,
            // A finished sequence repeats its last token; its results are ignored.
            ids: tokens.iter().map(|t| *t.last().expect("one token per sequence so far")).collect(),
            positions: prompts.iter().map(|p| (p.len() + step) as i64).collect(),
            mask: padded.decode_mask(cached),
            capture_routing: opts.capture_routing,
            last_logits: false,
            sample: params(step + 1),
        };
        let out = backend.decode(&input, cache)?;
        stats.decode_steps += 1;
        for (trace, r) in routing.iter_mut().zip(&out.routing) {
            let idx = r.indices.to_f64_vec();
            for (s, row) in idx.chunks_exact(trace.top_k.max(1)).enumerate() {
                // The token fed in this step is sequence s's newest; a sequence that
                // finished earlier made no token this step, and its step is ignored.
                if tokens[s].len() == step + 1 {
                    trace.experts[s].extend(row.iter().map(|&e| e as i32));
                }
            }
        }
        next = Next::of(out.sampled, &out.logits);
        cache = out.cache;
    }
    stats.decode_secs = decode_start.elapsed().as_secs_f64();
    stats.cache_len = cache.len();
    stats.cache_bytes = cache.bytes();
    stats.cache_elements_per_token = cache.elements_per_token();
    Ok(Generation { tokens, step_logits, logprobs, entropy, routing, stats })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_and_masks() {
        let p = Padded::new(&[vec![5, 6, 7], vec![9]], 0);
        assert_eq!(p.ids, vec![5, 6, 7, 0, 0, 9]);
        assert_eq!(p.positions, vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(p.pads, vec![0, 2]);
        let m = p.prefill_mask().unwrap();
        let inf = f32::NEG_INFINITY;
        // Row 0 unpadded: all zeros. Row 1: pad queries see everything, the real query
        // (position 2) does not see the two pad keys.
        assert!(m[..9].iter().all(|&x| x == 0.0));
        assert_eq!(&m[9..], &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, inf, inf, 0.0]);
        assert_eq!(p.decode_mask(3).unwrap(), vec![0.0, 0.0, 0.0, 0.0, inf, inf, 0.0, 0.0]);
        let even = Padded::new(&[vec![1, 2], vec![3, 4]], 0);
        assert!(even.prefill_mask().is_none() && even.decode_mask(2).is_none());
    }
}
