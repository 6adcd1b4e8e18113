//! GRPO's loss over one batch of completions, in f64: group-relative advantages, the clipped
//! importance-weighted surrogate with the options of TRL's `GRPOConfig`, the k3 KL penalty to a
//! frozen reference, the four aggregations, and the analytic gradient of the loss with respect
//! to every `logp_pi[i][t]`. The trainer feeds log-probabilities from the forward pass and sends
//! `grad_logp_pi` back through it; nothing here knows the model.
//!
//! ## The formulas (completion i of G, token t, mask m, A_i its advantage)
//! ```text
//! A_i     = (r_i - mean_{g(i)} r) / (std + 1e-4)      std: sample std of the group (`group`),
//!                                                      of all rewards (`batch`); `none`: no division
//! ρ_it    = exp(x_it - o_it)                          x = logp_pi, o = logp_old   (token level)
//! ρ_i     = exp(Σ_t m(x - o) / max(Σ_t m, 1))         one ratio per completion    (sequence, GSPO)
//! u       = min(ρ, δ)  (ρ when δ is unset)            two-sided clipping (INTELLECT-2)
//! c       = clip(ρ, 1 - ε, 1 + ε_high)
//! s       = min(u·A, c·A)
//! kl_it   = exp(r_it - x_it) - (r_it - x_it) - 1     r = logp_ref (k3 estimator)
//! l_it    = -(s - β·kl_it)
//! loss    = Σ_i w_i Σ_t m_it l_it                    w_i: 1 / (G·max(n_i, 1))      grpo
//!                                                          1 / max(N, 1)             bnpo
//!                                                          1 / (G·max_completion_length) dr_grpo
//!                                                          1 / max(num_items, 1)     dapo
//! ```
//! with n_i = Σ_t m_it and N = Σ_i n_i. The `max(·, 1)` guards are TRL's `clamp(min=1)`: a
//! completion with no unmasked token (e.g. a masked truncated one) adds nothing but still counts
//! in G, as it does there.
//!
//! ## The gradient
//! With ρ' = ds/dρ: `min` passes its gradient to the smaller branch and half to each on a tie
//! (torch's rule for `torch.min(a, b)`; inside the clip range both branches are ρ·A and the
//! halves add up to A); `clip` and `min(·, δ)` pass it only inside their range, bounds included
//! (torch's `clamp`). Then
//! ```text
//! token:     dloss/dx_it = w_i m_it (-ρ'_it ρ_it + β(1 - exp(r_it - x_it)))
//! sequence:  dloss/dx_it = w_i m_it (-ρ'_i ρ_i + β(1 - exp(r_it - x_it)))
//! ```
//! (in the sequence form all n_i tokens carry the same s(ρ_i), and dρ_i/dx_it = ρ_i m_it / n_i,
//! so the n_i copies add up to one ρ'_i ρ_i). Masked positions get 0 and their
//! log-probabilities are never read, so padding may hold anything.

use super::suggest;
use serde::Serialize;
use std::fmt;

/// Added to the standard deviation before dividing, as TRL does: a group whose rewards are all
/// equal gets advantages 0 instead of 0/0.
pub const STD_EPS: f64 = 1e-4;

/// How the per-token losses are averaged into one number (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DeepSeekMath: the mean over completions of each completion's token mean.
    Grpo,
    /// The token mean over the batch.
    Bnpo,
    /// Dr. GRPO: the token sum over (completions × max_completion_length), a constant, so long
    /// completions are not down-weighted.
    DrGrpo,
    /// DAPO: the token sum over the unmasked tokens of the whole generation batch (equal to
    /// bnpo for one batch unless `num_items_in_batch` says otherwise).
    Dapo,
}

/// How rewards become advantages (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// (r − group mean) / (group sample std + 1e-4).
    Group,
    /// (r − group mean) / (sample std of every reward of the batch + 1e-4).
    Batch,
    /// r − group mean (Dr. GRPO).
    None,
}

/// Where the importance ratio lives (TRL's `importance_sampling_level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One ratio per token (PPO, GRPO).
    Token,
    /// One ratio per completion, the exponential of the mean token log-ratio (GSPO).
    Sequence,
}

impl LossType {
    pub const NAMES: &'static [&'static str] = &["grpo", "bnpo", "dr_grpo", "dapo"];
    const ALL: [LossType; 4] = [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The option named `s`, or an error naming the field and the nearest name.
    pub fn parse(s: &str) -> Result<Self, GrpoError> {
        Self::ALL.into_iter().find(|v| v.name() == s).ok_or_else(|| unknown("loss_type", s, Self::NAMES))
    }
}

impl ScaleRewards {
    pub const NAMES: &'static [&'static str] = &["group", "batch", "none"];
    const ALL: [ScaleRewards; 3] = [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(s: &str) -> Result<Self, GrpoError> {
        Self::ALL.into_iter().find(|v| v.name() == s).ok_or_else(|| unknown("scale_rewards", s, Self::NAMES))
    }
}

impl ImportanceSamplingLevel {
    pub const NAMES: &'static [&'static str] = &["token", "sequence"];
    const ALL: [ImportanceSamplingLevel; 2] = [ImportanceSamplingLevel::Token, ImportanceSamplingLevel::Sequence];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(s: &str) -> Result<Self, GrpoError> {
        Self::ALL.into_iter().find(|v| v.name() == s).ok_or_else(|| unknown("importance_sampling_level", s, Self::NAMES))
    }
}

fn unknown(field: &str, got: &str, known: &[&str]) -> GrpoError {
    GrpoError::new(field, format!("unknown value `{got}`; {}", suggest(got, known)))
}

/// The loss's options, named and defined as in TRL's `GRPOConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoConfig {
    /// Lower clip: ratios below 1 − epsilon are clipped.
    pub epsilon: f64,
    /// Upper clip: ratios above 1 + epsilon_high are clipped (DAPO's clip-higher; = epsilon
    /// for the symmetric PPO clip).
    pub epsilon_high: f64,
    /// Two-sided clipping: the unclipped branch uses min(ratio, delta), so a negative advantage
    /// cannot push an already large ratio up without bound.
    pub delta: Option<f64>,
    /// Weight of the k3 KL penalty to the reference policy; 0 needs no `logp_ref`.
    pub beta: f64,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// The generation limit: dr_grpo's constant divisor, and an upper bound on the row length.
    pub max_completion_length: usize,
    /// Completions flagged `truncated` get mask 0 everywhere (DAPO's overlong filtering).
    pub mask_truncated_completions: bool,
}

impl Default for GrpoConfig {
    /// DeepSeekMath's GRPO as the `grpo_replay` fixtures run it (ε 0.2 both sides, β 0.04,
    /// group scaling, token ratios), with TRL's default `max_completion_length` of 256.
    fn default() -> Self {
        GrpoConfig {
            epsilon: 0.2,
            epsilon_high: 0.2,
            delta: None,
            beta: 0.04,
            loss_type: LossType::Grpo,
            scale_rewards: ScaleRewards::Group,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            max_completion_length: 256,
            mask_truncated_completions: false,
        }
    }
}

impl GrpoConfig {
    /// Checks every option's range; the error names the option.
    pub fn validate(&self) -> Result<(), GrpoError> {
        // epsilon ≥ 1 would make the lower clip bound 1 − ε ≤ 0, below any ratio.
        if !(self.epsilon.is_finite() && (0.0..1.0).contains(&self.epsilon)) {
            return Err(GrpoError::new("epsilon", format!("expected 0 <= epsilon < 1, got {}", self.epsilon)));
        }
        if !(self.epsilon_high.is_finite() && self.epsilon_high >= 0.0) {
            return Err(GrpoError::new("epsilon_high", format!("expected a finite epsilon_high >= 0, got {}", self.epsilon_high)));
        }
        if let Some(d) = self.delta {
            if !(d.is_finite() && d > 0.0) {
                return Err(GrpoError::new("delta", format!("expected a finite delta > 0, got {d}")));
            }
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(GrpoError::new("beta", format!("expected a finite beta >= 0, got {}", self.beta)));
        }
        if self.max_completion_length == 0 {
            return Err(GrpoError::new("max_completion_length", "expected at least 1"));
        }
        Ok(())
    }
}

/// One batch of G completions padded to T tokens: row i of every matrix is completion i.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrpoBatch {
    /// [G] one scalar reward per completion.
    pub rewards: Vec<f64>,
    /// [G] the prompt (group) of each completion; `None`: all one group. Ids need not be
    /// contiguous or sorted.
    pub groups: Option<Vec<u64>>,
    /// [G][T] which positions are completion tokens (false: padding).
    pub mask: Vec<Vec<bool>>,
    /// [G][T] log π_θ of each sampled token, the variable the gradient is taken for.
    pub logp_pi: Vec<Vec<f64>>,
    /// [G][T] log π_old at sampling time; `None`: equal to `logp_pi` (one update per generation,
    /// TRL's `num_iterations = 1`: every ratio is 1 in value, and the gradient is unchanged).
    pub logp_old: Option<Vec<Vec<f64>>>,
    /// [G][T] log π_ref of the frozen reference; needed when beta > 0.
    pub logp_ref: Option<Vec<Vec<f64>>>,
    /// [G] completions cut off at max_completion_length (read with `mask_truncated_completions`).
    pub truncated: Option<Vec<bool>>,
    /// dapo only: unmasked tokens in the whole generation batch this batch is a slice of
    /// (default: this batch's own count).
    pub num_items_in_batch: Option<usize>,
}

/// What the loss reports besides its value and gradient, as TRL logs them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrpoMetrics {
    /// Fraction of ratios below 1 − ε where A < 0 (the clip is active).
    pub clip_ratio_low: f64,
    /// Fraction of ratios above 1 + ε_high where A > 0.
    pub clip_ratio_high: f64,
    /// Either of the two.
    pub clip_ratio_region: f64,
    /// Mean k3 KL over unmasked tokens; `None` without `logp_ref`.
    pub kl: Option<f64>,
    /// Mean ratio over unmasked tokens (sequence level: each token carries its completion's).
    pub ratio_mean: f64,
    /// Unmasked tokens after `mask_truncated_completions`.
    pub tokens: usize,
}

/// The loss, its gradient and the advantages it used.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrpoOutput {
    /// [G]
    pub advantages: Vec<f64>,
    pub loss: f64,
    /// [G][T] d loss / d logp_pi; 0 where the mask is 0.
    pub grad_logp_pi: Vec<Vec<f64>>,
    pub metrics: GrpoMetrics,
}

/// Bad input: which field (with row and column where there is one) and what was expected.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoError {
    /// The field as the JSON input names it, e.g. `logp_pi[2]` or `epsilon`.
    pub field: String,
    pub message: String,
}

impl GrpoError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        GrpoError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for GrpoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.field, self.message)
    }
}

impl std::error::Error for GrpoError {}

/// Group-relative advantages (see the module header). `groups: None` puts every completion in
/// one group. A group of one completion has std 0 (TRL's guard; torch's std would be NaN).
pub fn advantages(rewards: &[f64], groups: Option<&[u64]>, scale: ScaleRewards) -> Result<Vec<f64>, GrpoError> {
    if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(GrpoError::new(format!("rewards[{i}]"), format!("expected a finite number, got {r}")));
    }
    let ids: Vec<u64> = match groups {
        Some(g) if g.len() != rewards.len() => {
            return Err(GrpoError::new("groups", format!("length {}, expected one per reward ({})", g.len(), rewards.len())))
        }
        Some(g) => g.to_vec(),
        None => vec![0; rewards.len()],
    };
    // Members of each group, in order of first appearance.
    let mut members: Vec<(u64, Vec<usize>)> = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        match members.iter_mut().find(|(g, _)| *g == id) {
            Some((_, m)) => m.push(i),
            None => members.push((id, vec![i])),
        }
    }
    let batch_std = sample_std(rewards);
    let mut out = vec![0.0; rewards.len()];
    for (_, m) in &members {
        let vals: Vec<f64> = m.iter().map(|&i| rewards[i]).collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let divisor = match scale {
            ScaleRewards::Group => sample_std(&vals) + STD_EPS,
            ScaleRewards::Batch => batch_std + STD_EPS,
            ScaleRewards::None => 1.0,
        };
        for &i in m {
            out[i] = (rewards[i] - mean) / divisor;
        }
    }
    Ok(out)
}

/// Bessel-corrected standard deviation (torch.std), 0 for fewer than two values.
fn sample_std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// s = min(u·A, c·A) and ds/dρ (see the module header for the rule at ties and bounds).
fn surrogate(rho: f64, a: f64, cfg: &GrpoConfig) -> (f64, f64) {
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high);
    let (u, du) = match cfg.delta {
        Some(d) if rho > d => (d, 0.0),
        _ => (rho, 1.0),
    };
    let (c, dc) = if rho < lo {
        (lo, 0.0)
    } else if rho > hi {
        (hi, 0.0)
    } else {
        (rho, 1.0)
    };
    let (unclipped, clipped) = (u * a, c * a);
    if unclipped < clipped {
        (unclipped, a * du)
    } else if clipped < unclipped {
        (clipped, a * dc)
    } else {
        (unclipped, a * (du + dc) / 2.0)
    }
}

/// Checks that `rows` is `g` rows of `t` entries, finite where `mask` is set.
fn check_matrix(field: &str, rows: &[Vec<f64>], mask: &[Vec<bool>], t: usize) -> Result<(), GrpoError> {
    if rows.len() != mask.len() {
        return Err(GrpoError::new(field, format!("length {}, expected one row per completion ({})", rows.len(), mask.len())));
    }
    for (i, row) in rows.iter().enumerate() {
        if row.len() != t {
            return Err(GrpoError::new(format!("{field}[{i}]"), format!("length {}, expected {t} (the length of mask[0])", row.len())));
        }
        if let Some(j) = (0..t).find(|&j| mask[i][j] && !row[j].is_finite()) {
            return Err(GrpoError::new(format!("{field}[{i}][{j}]"), format!("expected a finite log-probability, got {}", row[j])));
        }
    }
    Ok(())
}

/// The loss, its gradient with respect to `logp_pi`, the advantages and the metrics for one
/// batch. Every input is checked first; a bad one is an error naming its field and row.
pub fn grpo_loss(cfg: &GrpoConfig, batch: &GrpoBatch) -> Result<GrpoOutput, GrpoError> {
    cfg.validate()?;
    let g = batch.rewards.len();
    if g == 0 {
        return Err(GrpoError::new("rewards", "expected at least one completion"));
    }
    if batch.mask.len() != g {
        return Err(GrpoError::new("mask", format!("length {}, expected one row per reward ({g})", batch.mask.len())));
    }
    let t = batch.mask[0].len();
    if let Some((i, row)) = batch.mask.iter().enumerate().find(|(_, r)| r.len() != t) {
        return Err(GrpoError::new(format!("mask[{i}]"), format!("length {}, expected {t} (the length of mask[0])", row.len())));
    }
    if t > cfg.max_completion_length {
        return Err(GrpoError::new(
            "mask",
            format!("rows of {t} positions, longer than max_completion_length ({})", cfg.max_completion_length),
        ));
    }
    let mut mask = batch.mask.clone();
    match (&batch.truncated, cfg.mask_truncated_completions) {
        (Some(tr), _) if tr.len() != g => {
            return Err(GrpoError::new("truncated", format!("length {}, expected one per completion ({g})", tr.len())))
        }
        (Some(tr), true) => {
            for (row, &cut) in mask.iter_mut().zip(tr) {
                if cut {
                    row.fill(false);
                }
            }
        }
        (None, true) => return Err(GrpoError::new("truncated", "required by mask_truncated_completions")),
        (_, false) => {}
    }
    check_matrix("logp_pi", &batch.logp_pi, &mask, t)?;
    if let Some(old) = &batch.logp_old {
        check_matrix("logp_old", old, &mask, t)?;
    }
    match &batch.logp_ref {
        Some(r) => check_matrix("logp_ref", r, &mask, t)?,
        None if cfg.beta > 0.0 => {
            return Err(GrpoError::new("logp_ref", format!("required when beta > 0 (beta is {}): the KL penalty needs it", cfg.beta)))
        }
        None => {}
    }
    let adv = advantages(&batch.rewards, batch.groups.as_deref(), cfg.scale_rewards)?;

    let counts: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m).count()).collect();
    let total: usize = counts.iter().sum();
    let items = match (batch.num_items_in_batch, cfg.loss_type) {
        (Some(_), lt) if lt != LossType::Dapo => {
            return Err(GrpoError::new("num_items_in_batch", format!("only the dapo loss reads it (loss_type is {})", lt.name())))
        }
        (Some(n), _) if n < total => {
            return Err(GrpoError::new(
                "num_items_in_batch",
                format!("{n} is fewer than the {total} unmasked tokens of this batch, which it must include"),
            ))
        }
        (Some(n), _) => n,
        (None, _) => total,
    };
    // Each completion's weight in loss = Σ_i w_i Σ_t m l.
    let weight = |i: usize| -> f64 {
        match cfg.loss_type {
            LossType::Grpo => 1.0 / (g as f64 * counts[i].max(1) as f64),
            LossType::Bnpo => 1.0 / total.max(1) as f64,
            LossType::DrGrpo => 1.0 / (g as f64 * cfg.max_completion_length as f64),
            LossType::Dapo => 1.0 / items.max(1) as f64,
        }
    };

    let old = batch.logp_old.as_ref().unwrap_or(&batch.logp_pi);
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high);
    let mut loss = 0.0;
    let mut grad = vec![vec![0.0; t]; g];
    let (mut clip_low, mut clip_high, mut clip_region, mut ratio_sum, mut kl_sum) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..g {
        let (a, w, n) = (adv[i], weight(i), counts[i]);
        let x = &batch.logp_pi[i];
        let seq = match cfg.importance_sampling_level {
            ImportanceSamplingLevel::Token => None,
            ImportanceSamplingLevel::Sequence => {
                let sum: f64 = (0..t).filter(|&j| mask[i][j]).map(|j| x[j] - old[i][j]).sum();
                let rho = (sum / n.max(1) as f64).exp();
                Some((rho, surrogate(rho, a, cfg)))
            }
        };
        // Clip metrics per completion at the sequence level (TRL's `x.mean()` over rows,
        // every completion counted), per unmasked token at the token level.
        let mut count_clip = |rho: f64| {
            // TRL tests the ratio after the delta cap.
            let u = cfg.delta.map_or(rho, |d| rho.min(d));
            let (l, h) = (u < lo && a < 0.0, u > hi && a > 0.0);
            clip_low += l as u8 as f64;
            clip_high += h as u8 as f64;
            clip_region += (l || h) as u8 as f64;
        };
        if let Some((rho, _)) = seq {
            count_clip(rho);
        }
        for j in (0..t).filter(|&j| mask[i][j]) {
            let (rho, (s, ds)) = match seq {
                Some(v) => v,
                None => {
                    let rho = (x[j] - old[i][j]).exp();
                    count_clip(rho);
                    (rho, surrogate(rho, a, cfg))
                }
            };
            ratio_sum += rho;
            // d(-s)/dx = -s'·ρ at both levels: token, dρ/dx = ρ; sequence, the n tokens all
            // carry s(ρ_i) and each moves ρ_i by ρ_i/n, so n·(ρ_i/n) = ρ_i.
            let (mut l, mut d) = (-s, -ds * rho);
            if let Some(r) = &batch.logp_ref {
                let diff = r[i][j] - x[j];
                let kl = diff.exp() - diff - 1.0;
                kl_sum += kl;
                l += cfg.beta * kl;
                d += cfg.beta * (1.0 - diff.exp());
            }
            loss += w * l;
            grad[i][j] = w * d;
        }
    }
    let per_token = |v: f64| v / total.max(1) as f64;
    let clip_mean = |v: f64| match cfg.importance_sampling_level {
        ImportanceSamplingLevel::Token => per_token(v),
        ImportanceSamplingLevel::Sequence => v / g as f64,
    };
    let metrics = GrpoMetrics {
        clip_ratio_low: clip_mean(clip_low),
        clip_ratio_high: clip_mean(clip_high),
        clip_ratio_region: clip_mean(clip_region),
        kl: batch.logp_ref.as_ref().map(|_| per_token(kl_sum)),
        ratio_mean: per_token(ratio_sum),
        tokens: total,
    };
    // Ratios overflow for log-ratios beyond ~709; say where rather than return inf or NaN.
    if !loss.is_finite() {
        return Err(GrpoError::new(
            "logp_pi",
            format!("the loss is {loss}: some exp(logp_pi - logp_old) or exp(logp_ref - logp_pi) overflows"),
        ));
    }
    for (i, row) in grad.iter().enumerate() {
        if let Some(j) = row.iter().position(|v| !v.is_finite()) {
            return Err(GrpoError::new(format!("logp_pi[{i}][{j}]"), "the gradient overflows here: the log-ratios are too large"));
        }
    }
    Ok(GrpoOutput { advantages: adv, loss, grad_logp_pi: grad, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::LN_2;

    fn cfg(loss_type: LossType, level: ImportanceSamplingLevel) -> GrpoConfig {
        GrpoConfig { loss_type, importance_sampling_level: level, max_completion_length: 6, ..GrpoConfig::default() }
    }

    /// Seven completions in two groups (ids 7 and 3, interleaved), T = 5, one fully masked. Row
    /// i's token log-ratios are ln(base_i) ± 0.05, so its token ratios and its sequence ratio sit
    /// in one region of the clip (lo 0.8, hi 1.28, delta 1.6 in the tests), at least 0.02 away
    /// from every bound: central differences never straddle a kink.
    fn fd_batch() -> GrpoBatch {
        let base = [0.6, 1.0, 1.4, 1.9, 1.5, 0.65, 1.0];
        let lens = [5, 3, 4, 2, 5, 1, 0];
        let mut b =
            GrpoBatch { rewards: vec![1.0, 0.2, 0.5, 0.0, 1.0, 0.3, 0.6], groups: Some(vec![7, 7, 7, 3, 3, 3, 3]), ..GrpoBatch::default() };
        let (mut old, mut reference) = (vec![], vec![]);
        for i in 0..7 {
            let mut mask: Vec<bool> = (0..5).map(|j| j < lens[i]).collect();
            if i == 2 {
                mask = vec![true, false, true, true, true]; // a hole: masks need not be prefixes
            }
            let pi: Vec<f64> = (0..5).map(|j| -0.2 - 0.37 * ((i * 5 + j) % 7) as f64).collect();
            let lr: Vec<f64> = (0..5).map(|j| f64::ln(base[i]) + 0.05 * ((i * 7 + j * 3) as f64).sin()).collect();
            old.push(pi.iter().zip(&lr).map(|(p, l)| p - l).collect::<Vec<_>>());
            reference.push(pi.iter().enumerate().map(|(j, p)| p + 0.3 * ((i + 2 * j) as f64).cos()).collect::<Vec<_>>());
            b.mask.push(mask);
            b.logp_pi.push(pi);
        }
        b.logp_old = Some(old);
        b.logp_ref = Some(reference);
        b
    }

    /// Central differences (step 1e-6) of the loss against `grad_logp_pi`, every position;
    /// returns the output and the largest |fd − analytic| / |analytic| over nonzero entries.
    fn check_gradient(cfg: &GrpoConfig, batch: &GrpoBatch) -> (GrpoOutput, f64) {
        let out = grpo_loss(cfg, batch).unwrap();
        let h = 1e-6;
        let mut worst: f64 = 0.0;
        for i in 0..batch.logp_pi.len() {
            for j in 0..batch.logp_pi[i].len() {
                let at = |dx: f64| {
                    let mut b = batch.clone();
                    b.logp_pi[i][j] += dx;
                    grpo_loss(cfg, &b).unwrap().loss
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let an = out.grad_logp_pi[i][j];
                assert!((fd - an).abs() <= 1e-6 * an.abs() + 1e-9, "{cfg:?}\n[{i}][{j}]: analytic {an:e}, finite difference {fd:e}");
                if !batch.mask[i][j] {
                    assert_eq!(an, 0.0);
                }
                if an != 0.0 {
                    worst = worst.max((fd - an).abs() / an.abs());
                }
            }
        }
        (out, worst)
    }

    #[test]
    fn gradient_matches_finite_differences_for_every_option() {
        let batch = fd_batch();
        let (mut checked, mut worst) = (0, 0.0f64);
        for loss_type in LossType::ALL {
            for level in [ImportanceSamplingLevel::Token, ImportanceSamplingLevel::Sequence] {
                for delta in [None, Some(1.6)] {
                    for beta in [0.0, 0.04] {
                        let c = GrpoConfig { epsilon: 0.2, epsilon_high: 0.28, delta, beta, ..cfg(loss_type, level) };
                        let (out, err) = check_gradient(&c, &batch);
                        worst = worst.max(err);
                        // The batch reaches both clip bounds with the sign of A that makes
                        // the clipped branch the minimum.
                        assert!(out.metrics.clip_ratio_low > 0.0 && out.metrics.clip_ratio_high > 0.0, "{:?}", out.metrics);
                        if beta == 0.0 {
                            // ... so some unmasked tokens get exactly zero gradient.
                            let zeros = (0..7).flat_map(|i| (0..5).map(move |j| (i, j))).filter(|&(i, j)| batch.mask[i][j]);
                            assert!(zeros.filter(|&(i, j)| out.grad_logp_pi[i][j] == 0.0).count() > 0);
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 32);
        eprintln!("largest relative error of the analytic gradient vs central differences: {worst:e}");
        // dapo over a larger generation batch, and the truncation mask.
        let mut b = batch.clone();
        b.num_items_in_batch = Some(40);
        check_gradient(&cfg(LossType::Dapo, ImportanceSamplingLevel::Token), &b);
        b.num_items_in_batch = None;
        b.truncated = Some(vec![false, true, false, false, false, false, false]);
        let c = GrpoConfig { mask_truncated_completions: true, ..cfg(LossType::Grpo, ImportanceSamplingLevel::Sequence) };
        let (out, _) = check_gradient(&c, &b);
        assert!(out.grad_logp_pi[1].iter().all(|&g| g == 0.0));
    }

    #[test]
    fn delta_zeroes_the_gradient_beyond_it() {
        // Row 3 (ratios ~1.9, A < 0): without delta the unclipped branch is the minimum and
        // carries gradient; with delta 1.6 it is min(ρ, δ)·A, constant in ρ.
        let batch = fd_batch();
        let c = GrpoConfig { beta: 0.0, epsilon_high: 0.28, ..cfg(LossType::Bnpo, ImportanceSamplingLevel::Token) };
        let without = grpo_loss(&c, &batch).unwrap();
        let with = grpo_loss(&GrpoConfig { delta: Some(1.6), ..c }, &batch).unwrap();
        assert!(without.advantages[3] < 0.0);
        assert!(without.grad_logp_pi[3][..2].iter().all(|&g| g != 0.0));
        assert!(with.grad_logp_pi[3][..2].iter().all(|&g| g == 0.0));
    }

    fn read_golden(case: &str) -> (Vec<f64>, Vec<u64>, Vec<usize>, serde_json::Value) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/grpo").join(case);
        let rollouts = std::fs::read_to_string(dir.join("rollouts.jsonl")).unwrap();
        let (mut rewards, mut groups, mut lens) = (vec![], vec![], vec![]);
        for line in rollouts.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            rewards.push(v["reward"].as_f64().unwrap());
            groups.push(v["group"].as_u64().unwrap());
            lens.push(v["completion"].as_array().unwrap().len());
        }
        let losses = serde_json::from_str(&std::fs::read_to_string(dir.join("losses.json")).unwrap()).unwrap();
        (rewards, groups, lens, losses)
    }

    #[test]
    fn advantages_and_first_loss_match_the_grpo_replay_fixtures() {
        for case in ["llama_gqa", "deepseek_v2_lite", "deepseek_v3"] {
            let (rewards, groups, lens, losses) = read_golden(case);
            let want: Vec<f64> = losses["advantages"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(rewards.len(), 8, "{case}");
            let got = advantages(&rewards, Some(&groups), ScaleRewards::Group).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-12, "{case} advantage {i}: {g} vs {w}");
            }
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
            eprintln!("{case}: largest advantage error {worst:e}");
            // Step 1 of the replay: logp_old = logp_ref = logp_pi, so ratio 1 and KL 0, and the
            // loss is −mean_i A_i, 0 up to rounding (the fixture's −2.8e-17).
            let t = *lens.iter().max().unwrap();
            let pi: Vec<Vec<f64>> = (0..8).map(|i| (0..t).map(|j| -1.0 - 0.1 * (i + j) as f64).collect()).collect();
            let batch = GrpoBatch {
                rewards,
                groups: Some(groups),
                mask: lens.iter().map(|&n| (0..t).map(|j| j < n).collect()).collect(),
                logp_ref: Some(pi.clone()),
                logp_pi: pi,
                ..GrpoBatch::default()
            };
            let out = grpo_loss(&GrpoConfig::default(), &batch).unwrap();
            assert_eq!(out.advantages, got);
            assert!((out.loss - losses["losses"][0].as_f64().unwrap()).abs() <= 1e-12, "{case}: {}", out.loss);
        }
    }

    /// G = 2 in one group, rewards 1 and 0, T = 3 with the last position of row 0 padding (NaN:
    /// never read). Ratios 1.5, 0.9 | 0.5, 1.1, 1.3; logp_ref − logp_pi is ln 2, 0 | 0, ln ½, ln 2.
    fn hand_batch() -> GrpoBatch {
        let pi = vec![vec![-1.0, -2.0, f64::NAN], vec![-0.5, -1.5, -0.25]];
        let ratio = [[1.5, 0.9, 1.0], [0.5, 1.1, 1.3]];
        let ref_gap = [[LN_2, 0.0, 0.0], [0.0, -LN_2, LN_2]];
        let shift = |m: &[[f64; 3]; 2], f: fn(f64, f64) -> f64| -> Vec<Vec<f64>> {
            (0..2).map(|i| (0..3).map(|j| f(pi[i][j], m[i][j])).collect()).collect()
        };
        GrpoBatch {
            rewards: vec![1.0, 0.0],
            mask: vec![vec![true, true, false], vec![true, true, true]],
            logp_old: Some(shift(&ratio, |p, r| p - r.ln())),
            logp_ref: Some(shift(&ref_gap, |p, g| p + g)),
            logp_pi: pi,
            ..GrpoBatch::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-14 * (1.0 + b.abs())
    }

    fn assert_output(out: &GrpoOutput, loss: f64, grad: [[f64; 3]; 2]) {
        assert!(close(out.loss, loss), "loss {} vs {loss}", out.loss);
        assert!(out.grad_logp_pi.len() == 2 && out.grad_logp_pi.iter().all(|r| r.len() == 3));
        for (i, (got, want)) in out.grad_logp_pi.iter().zip(&grad).enumerate() {
            for (j, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(close(*g, *w), "grad[{i}][{j}] {g} vs {w}");
            }
        }
    }

    #[test]
    fn token_level_losses_by_hand() {
        let b = hand_batch();
        let beta = 0.04;
        // A = ±0.5 / (sample std √0.5 + 1e-4).
        let a0 = 0.5 / (0.5f64.sqrt() + 1e-4);
        let a1 = -a0;
        let (k_up, k_down) = (1.0 - LN_2, LN_2 - 0.5); // k3 at r − x = ln 2 and ln ½
                                                       // Per token −(s − β·kl), and d/dx = −s'·ρ + β(1 − e^{r−x}):
                                                       //   ρ 1.5, A>0: s = 1.2·A (clipped high, chosen), s' = 0; kl(ln 2), d = β(1 − 2)
                                                       //   ρ 0.9:      s = 0.9·A;                                            d = −0.9·A
                                                       //   ρ 0.5, A<0: s = 0.8·A (clipped low, chosen), s' = 0;              d = 0
                                                       //   ρ 1.1:      s = 1.1·A; kl(ln ½);                                  d = −1.1·A + β(1 − ½)
                                                       //   ρ 1.3, A<0: s = min(1.3A, 1.2A) = 1.3·A (unclipped); kl(ln 2);     d = −1.3·A + β(1 − 2)
        let l = [[-(1.2 * a0 - beta * k_up), -(0.9 * a0)], [-(0.8 * a1), -(1.1 * a1 - beta * k_down)]];
        let l12 = -(1.3 * a1 - beta * k_up);
        let d = [[-beta, -0.9 * a0, 0.0], [0.0, -1.1 * a1 + 0.5 * beta, -1.3 * a1 - beta]];
        let sum = l[0][0] + l[0][1] + l[1][0] + l[1][1] + l12;
        let scaled = |w0: f64, w1: f64| [[w0 * d[0][0], w0 * d[0][1], 0.0], [w1 * d[1][0], w1 * d[1][1], w1 * d[1][2]]];
        let token = |lt| GrpoConfig { loss_type: lt, max_completion_length: 4, ..GrpoConfig::default() };

        let out = grpo_loss(&token(LossType::Grpo), &b).unwrap();
        assert!(close(out.advantages[0], a0) && close(out.advantages[1], a1));
        assert_output(&out, ((l[0][0] + l[0][1]) / 2.0 + (l[1][0] + l[1][1] + l12) / 3.0) / 2.0, scaled(0.25, 1.0 / 6.0));
        let m = &out.metrics;
        assert_eq!((m.clip_ratio_low, m.clip_ratio_high, m.clip_ratio_region, m.tokens), (0.2, 0.2, 0.4, 5));
        assert!(close(m.kl.unwrap(), (2.0 * k_up + k_down) / 5.0) && close(m.ratio_mean, 5.3 / 5.0));

        assert_output(&grpo_loss(&token(LossType::Bnpo), &b).unwrap(), sum / 5.0, scaled(0.2, 0.2));
        assert_output(&grpo_loss(&token(LossType::DrGrpo), &b).unwrap(), sum / 8.0, scaled(0.125, 0.125));
        assert_output(&grpo_loss(&token(LossType::Dapo), &b).unwrap(), sum / 5.0, scaled(0.2, 0.2));
        let wide = GrpoBatch { num_items_in_batch: Some(10), ..b.clone() };
        assert_output(&grpo_loss(&token(LossType::Dapo), &wide).unwrap(), sum / 10.0, scaled(0.1, 0.1));

        // delta 1.25: ρ 1.3 with A < 0 becomes min(1.25A, 1.2A) = 1.25·A, constant in ρ; ρ 1.5
        // with A > 0 stays 1.2·A. Only that token changes.
        let c = GrpoConfig { delta: Some(1.25), ..token(LossType::Bnpo) };
        let l12_delta = -(1.25 * a1 - beta * k_up);
        let mut g = scaled(0.2, 0.2);
        g[1][2] = 0.2 * -beta;
        assert_output(&grpo_loss(&c, &b).unwrap(), (sum - l12 + l12_delta) / 5.0, g);
    }

    #[test]
    fn sequence_level_losses_by_hand() {
        let b = hand_batch();
        let beta = 0.04;
        let a0 = 0.5 / (0.5f64.sqrt() + 1e-4);
        let a1 = -a0;
        let (k_up, k_down) = (1.0 - LN_2, LN_2 - 0.5);
        // GSPO ratios: the geometric means of the token ratios.
        let r0 = (1.5f64 * 0.9).sqrt(); // 1.162
        let r1 = (0.5f64 * 1.1 * 1.3).cbrt(); // 0.894
        let kl = [[k_up, 0.0, 0.0], [0.0, k_down, k_up]];
        let dkl = [[-beta, 0.0, 0.0], [0.0, 0.5 * beta, -beta]];
        let seq = |eps: f64| GrpoConfig {
            epsilon: eps,
            epsilon_high: eps,
            importance_sampling_level: ImportanceSamplingLevel::Sequence,
            ..GrpoConfig::default()
        };

        // ε 0.2: both ratios inside [0.8, 1.2]; every token has s = ρ_i·A_i and s' = A_i.
        let l0 = |t: usize| -(r0 * a0 - beta * kl[0][t]);
        let l1 = |t: usize| -(r1 * a1 - beta * kl[1][t]);
        let loss = ((l0(0) + l0(1)) / 2.0 + (l1(0) + l1(1) + l1(2)) / 3.0) / 2.0;
        let (w0, w1) = (0.25, 1.0 / 6.0);
        let g0 = |t: usize| w0 * (-a0 * r0 + dkl[0][t]);
        let g1 = |t: usize| w1 * (-a1 * r1 + dkl[1][t]);
        let out = grpo_loss(&seq(0.2), &b).unwrap();
        assert_output(&out, loss, [[g0(0), g0(1), 0.0], [g1(0), g1(1), g1(2)]]);
        assert_eq!(out.metrics.clip_ratio_region, 0.0);
        assert!(close(out.metrics.ratio_mean, (2.0 * r0 + 3.0 * r1) / 5.0));

        // ε 0.05: 1.162 > 1.05 with A > 0 and 0.894 < 0.95 with A < 0, both clipped and chosen:
        // s = 1.05·A0 and 0.95·A1, and only the KL term moves the gradient.
        let l0 = |t: usize| -(1.05 * a0 - beta * kl[0][t]);
        let l1 = |t: usize| -(0.95 * a1 - beta * kl[1][t]);
        let loss = ((l0(0) + l0(1)) / 2.0 + (l1(0) + l1(1) + l1(2)) / 3.0) / 2.0;
        let out = grpo_loss(&seq(0.05), &b).unwrap();
        assert_output(&out, loss, [[w0 * dkl[0][0], w0 * dkl[0][1], 0.0], [w1 * dkl[1][0], w1 * dkl[1][1], w1 * dkl[1][2]]]);
        let m = &out.metrics;
        assert_eq!((m.clip_ratio_low, m.clip_ratio_high, m.clip_ratio_region), (0.5, 0.5, 1.0));
    }

    #[test]
    fn advantages_by_hand_for_each_scaling() {
        let (r, g) = ([1.0, 0.0, 2.0, 2.0], [0u64, 0, 1, 1]);
        // Group means 0.5 and 2; group sample stds √0.5 and 0; all-batch sample std √(2.75/3).
        let group = advantages(&r, Some(&g), ScaleRewards::Group).unwrap();
        let s = 0.5f64.sqrt() + 1e-4;
        assert_eq!(group, vec![0.5 / s, -0.5 / s, 0.0, 0.0]);
        let batch = advantages(&r, Some(&g), ScaleRewards::Batch).unwrap();
        let s = (2.75f64 / 3.0).sqrt() + 1e-4;
        assert!(close(batch[0], 0.5 / s) && close(batch[1], -0.5 / s) && batch[2] == 0.0);
        assert_eq!(advantages(&r, Some(&g), ScaleRewards::None).unwrap(), vec![0.5, -0.5, 0.0, 0.0]);
        // No groups: one group of all four (mean 1.25).
        assert_eq!(advantages(&r, None, ScaleRewards::None).unwrap(), vec![-0.25, -1.25, 0.75, 0.75]);
        // A group of one has advantage 0, not NaN.
        assert_eq!(advantages(&[3.0], None, ScaleRewards::Group).unwrap(), vec![0.0]);
    }

    #[test]
    fn truncated_completions_are_masked_out() {
        let b = GrpoBatch { truncated: Some(vec![true, false]), ..hand_batch() };
        let c = GrpoConfig { mask_truncated_completions: true, loss_type: LossType::Bnpo, ..GrpoConfig::default() };
        let out = grpo_loss(&c, &b).unwrap();
        let mut by_hand = hand_batch();
        by_hand.mask[0] = vec![false; 3];
        let want = grpo_loss(&GrpoConfig { mask_truncated_completions: false, ..c.clone() }, &by_hand).unwrap();
        assert_eq!(out, want);
        assert_eq!(out.metrics.tokens, 3);
        assert_eq!(out.grad_logp_pi[0], vec![0.0; 3]);
        // The flag off: `truncated` is data, not applied.
        let off = grpo_loss(&GrpoConfig { mask_truncated_completions: false, ..c }, &b).unwrap();
        assert_eq!(off.metrics.tokens, 5);
    }

    #[test]
    fn bad_input_names_the_field() {
        let c = GrpoConfig::default();
        let err = |b: &GrpoBatch, c: &GrpoConfig| grpo_loss(c, b).unwrap_err();
        let mut b = hand_batch();
        b.logp_pi[1].pop();
        assert_eq!(err(&b, &c).field, "logp_pi[1]");
        let mut b = hand_batch();
        b.mask[1].push(true);
        assert_eq!(err(&b, &c).field, "mask[1]");
        let b = GrpoBatch { logp_ref: None, ..hand_batch() };
        assert!(err(&b, &c).to_string().contains("required when beta > 0"));
        assert!(grpo_loss(&GrpoConfig { beta: 0.0, ..c.clone() }, &b).is_ok());
        let b = GrpoBatch { num_items_in_batch: Some(9), ..hand_batch() };
        assert_eq!(err(&b, &c).field, "num_items_in_batch");
        let dapo = GrpoConfig { loss_type: LossType::Dapo, ..c.clone() };
        let b = GrpoBatch { num_items_in_batch: Some(4), ..hand_batch() };
        assert!(err(&b, &dapo).message.contains("fewer than the 5"));
        assert_eq!(err(&hand_batch(), &GrpoConfig { mask_truncated_completions: true, ..c.clone() }).field, "truncated");
        assert_eq!(err(&hand_batch(), &GrpoConfig { max_completion_length: 2, ..c.clone() }).field, "mask");
        assert_eq!(err(&hand_batch(), &GrpoConfig { epsilon: 1.5, ..c.clone() }).field, "epsilon");
        let mut b = hand_batch();
        b.logp_old.as_mut().unwrap()[1][2] = f64::INFINITY;
        assert_eq!(err(&b, &c).field, "logp_old[1][2]");
        let b = GrpoBatch { groups: Some(vec![0]), ..hand_batch() };
        assert_eq!(err(&b, &c).field, "groups");
        let mut b = hand_batch();
        b.logp_old.as_mut().unwrap()[0][0] = -1000.0; // exp(999) overflows
        assert!(err(&b, &GrpoConfig { delta: None, epsilon_high: 0.2, ..c.clone() }).message.contains("overflow"));
        assert_eq!(LossType::parse("drgrpo").unwrap_err().to_string(), "`loss_type`: unknown value `drgrpo`; did you mean `dr_grpo`?");
        assert!(ScaleRewards::parse("xyz").unwrap_err().message.contains("`group`, `batch`, `none`"));
        assert_eq!(ImportanceSamplingLevel::parse("sequence").unwrap(), ImportanceSamplingLevel::Sequence);
    }
}
