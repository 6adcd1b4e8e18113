//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and
//! top-p, reproducibly from a seed.
//!
//! Semantics follow Hugging Face's `generate` logits processors, in its order:
//! temperature divides the logits, top-k keeps the `k` largest, top-p keeps the smallest
//! set of most probable tokens whose probability reaches `p` (always at least one), and
//! the token is drawn from the renormalised softmax of what is left. Temperature 0 is
//! greedy (arg-max, the lowest id on a tie, as `torch.argmax`), and ignores the rest.
//!
//! Randomness comes from a small deterministic generator (SplitMix64) per sequence,
//! seeded by `seed` and the sequence's index in the batch, so a sequence's tokens depend
//! on its seed and its own logits only, not on what else shares the batch.

use crate::rng::SplitMix64;
use std::fmt;

/// How to choose tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling::greedy()
    }
}

/// Settings that mean nothing (a negative temperature, `top_p` outside `(0, 1]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingError(pub String);

impl fmt::Display for SamplingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SamplingError {}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(SamplingError(format!("temperature must be a finite number ≥ 0, got {}", self.temperature)));
        }
        if self.top_k == Some(0) {
            return Err(SamplingError("top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplingError(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        Ok(())
    }
}

/// Chooses tokens for a batch of sequences.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: Sampling,
    rngs: Vec<SplitMix64>,
}

impl Sampler {
    /// A sampler for `batch` sequences.
    pub fn new(cfg: Sampling, batch: usize) -> Result<Sampler, SamplingError> {
        cfg.validate()?;
        // Distinct, decorrelated streams: sequence i starts from a SplitMix64 output.
        let rngs = (0..batch as u64).map(|i| SplitMix64(SplitMix64(cfg.seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64())).collect();
        Ok(Sampler { cfg, rngs })
    }

    /// The next token of sequence `seq` from its logits over the vocabulary.
    pub fn sample(&mut self, seq: usize, logits: &[f32]) -> i64 {
        if self.cfg.is_greedy() {
            return argmax(logits) as i64;
        }
        let t = self.cfg.temperature as f64;
        // Candidates by descending logit (NaN last, ties by id): what top-k and top-p cut.
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
        if order.is_empty() {
            return 0;
        }
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.cfg.top_k {
            order.truncate(k.max(1));
        }
        let m = logits[order[0]] as f64 / t;
        let mut probs: Vec<f64> = order.iter().map(|&i| (logits[i] as f64 / t - m).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.cfg.top_p {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += q;
                    acc >= p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let u = self.rngs[seq].next_f64() * total;
        let mut acc = 0.0;
        for (i, &p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return order[i] as i64;
            }
        }
        order[probs.len() - 1] as i64
    }
}

/// Index of the largest value; the first on a tie; NaN never wins.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(Sampling::greedy(), 1).unwrap();
        assert_eq!(s.sample(0, &[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let cfg = Sampling { temperature: 5.0, top_k: Some(1), top_p: None, seed: 3 };
        let mut s = Sampler::new(cfg, 1).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(0, &[0.0, 1.0, 0.5]), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities ≈ 0.665, 0.245, 0.090: p = 0.6 keeps only the first.
        let cfg = Sampling { temperature: 1.0, top_k: None, top_p: Some(0.6), seed: 9 };
        let mut s = Sampler::new(cfg, 1).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(0, &[2.0, 1.0, 0.0]), 0);
        }
        // p = 0.9 keeps two; the third never appears.
        let cfg = Sampling { top_p: Some(0.9), ..cfg };
        let mut s = Sampler::new(cfg, 1).unwrap();
        let seen: Vec<i64> = (0..400).map(|_| s.sample(0, &[2.0, 1.0, 0.0])).collect();
        assert!(seen.contains(&0) && seen.contains(&1) && !seen.contains(&2));
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let cfg = Sampling { temperature: 1.0, top_k: None, top_p: None, seed: 42 };
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut s = Sampler::new(cfg, 2).unwrap();
        let draws: Vec<i64> = (0..4000).map(|_| s.sample(0, &logits)).collect();
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        // Same seed, same sequence index: same tokens; another index: another stream.
        let mut again = Sampler::new(cfg, 2).unwrap();
        let replay: Vec<i64> = (0..4000).map(|_| again.sample(0, &logits)).collect();
        assert_eq!(draws, replay);
        let other: Vec<i64> = (0..64).map(|_| again.sample(1, &logits)).collect();
        assert_ne!(&draws[..64], &other[..]);
        // High temperature flattens towards uniform.
        let hot = Sampling { temperature: 100.0, ..cfg };
        let mut s = Sampler::new(hot, 1).unwrap();
        let ones = (0..4000).filter(|_| s.sample(0, &logits) == 1).count() as f64 / 4000.0;
        assert!((ones - 0.5).abs() < 0.04, "{ones}");
    }

    #[test]
    fn nonsense_settings_are_refused() {
        assert!(Sampler::new(Sampling { temperature: -1.0, ..Sampling::greedy() }, 1).is_err());
        assert!(Sampler::new(Sampling { temperature: f32::NAN, ..Sampling::greedy() }, 1).is_err());
        assert!(Sampler::new(Sampling { top_k: Some(0), ..Sampling::greedy() }, 1).is_err());
        assert!(Sampler::new(Sampling { top_p: Some(1.5), ..Sampling::greedy() }, 1).is_err());
        assert!(Sampler::new(Sampling { top_p: Some(0.0), ..Sampling::greedy() }, 1).is_err());
    }
}
