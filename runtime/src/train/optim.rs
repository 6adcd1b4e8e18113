//! The optimizer side of a step: global-norm gradient clipping, AdamW, and the
//! learning-rate schedules, each reproducing what torch (and DeepSeek's reports) define.
//!
//! AdamW is `torch.optim.AdamW`'s single-tensor loop (what torch runs for CPU tensors),
//! in `f32` in torch's order of operations, with torch's scalars computed in `f64` and
//! rounded to `f32` where torch hands them to a kernel:
//!
//! ```text
//! step += 1
//! p      *= f32(1 - lr·wd)                         (tensors of rank ≥ 2 only)
//! m       = lerp(m, g, f32(1 - β1))                 (m + w·(g - m), one fused multiply-add)
//! v       = v·f32(β2) + (f32(1 - β2)·g)·g
//! bc1     = 1 - β1^step,  bc2 = 1 - β2^step         (f64)
//! denom   = sqrt(v) / f32(sqrt(bc2)) + f32(eps)
//! p      += (f32(-lr/bc1)·m) / denom
//! ```
//!
//! The lerp is fused because torch's vectorised CPU kernel is (`vec::fmadd`); the other
//! ops are the plain products and quotients of `addcmul_`/`addcdiv_`. The result agrees
//! with torch to the last bit or two, far inside the 1e-3 relative the SFT fixtures ask.

use super::TrainError;
use crate::reference::tensor::Data;
use crate::reference::Tensor;
use std::collections::{BTreeMap, HashMap};

/// AdamW's hyper-parameters (the learning rate comes from the schedule, step by step).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub betas: [f64; 2],
    pub eps: f64,
    /// Decoupled weight decay, applied to tensors of rank 2 and more only (not to norm
    /// gains or other vectors), as the DeepSeek and Hugging Face trainers group them.
    pub weight_decay: f64,
}

/// AdamW's state of one param; created on its first gradient, as torch does.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamState {
    /// Updates this param has had (torch keeps one count per param).
    pub step: u64,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// AdamW's state of every param that has had a gradient, by IR name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerState {
    pub params: BTreeMap<String, ParamState>,
}

impl AdamW {
    /// One update of every param in `grads` at learning rate `lr`. Params without a
    /// gradient are left alone (torch skips a parameter whose grad is `None`), and so are
    /// the names in `frozen` (the routers' selection biases, which only the bias update
    /// moves).
    pub fn step(
        &self,
        lr: f64,
        state: &mut OptimizerState,
        weights: &mut HashMap<String, Tensor>,
        grads: &HashMap<String, Tensor>,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<(), TrainError> {
        let mut names: Vec<&String> = grads.keys().filter(|n| !frozen(n)).collect();
        names.sort();
        for name in names {
            let g = &grads[name];
            let Some(p) = weights.get_mut(name) else {
                return Err(TrainError::invalid(format!("the objective returned a gradient for `{name}`, which is not a weight")));
            };
            if p.shape() != g.shape() {
                return Err(TrainError::invalid(format!("the gradient of `{name}` has shape {:?}, the weight {:?}", g.shape(), p.shape())));
            }
            let g = g.to_f32_vec();
            let rank = p.rank();
            let n = p.numel();
            let s =
                state.params.entry(name.clone()).or_insert_with(|| ParamState { step: 0, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n] });
            with_f32_mut(p, name, |data| self.update(data, &g, s, lr, rank >= 2))?;
        }
        Ok(())
    }

    /// torch's `_single_tensor_adam` with `decoupled_weight_decay=True` on one tensor.
    pub fn update(&self, p: &mut [f32], g: &[f32], s: &mut ParamState, lr: f64, decay: bool) {
        let [b1, b2] = self.betas;
        s.step += 1;
        if decay && self.weight_decay != 0.0 {
            let k = (1.0 - lr * self.weight_decay) as f32;
            p.iter_mut().for_each(|x| *x *= k);
        }
        let w = (1.0 - b1) as f32;
        for (m, &g) in s.exp_avg.iter_mut().zip(g) {
            // torch's lerp: `start + w·(end - start)` for w < 0.5, else `end + (w - 1)·(end - start)`.
            *m = if w < 0.5 { w.mul_add(g - *m, *m) } else { (w - 1.0).mul_add(g - *m, g) };
        }
        let (b2f, c2) = (b2 as f32, (1.0 - b2) as f32);
        for (v, &g) in s.exp_avg_sq.iter_mut().zip(g) {
            *v *= b2f;
            *v += c2 * g * g;
        }
        let t = s.step as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        let step_size = (-(lr / bc1)) as f32;
        let (bc2_sqrt, eps) = (bc2.sqrt() as f32, self.eps as f32);
        for ((x, &m), &v) in p.iter_mut().zip(&s.exp_avg).zip(&s.exp_avg_sq) {
            let denom = v.sqrt() / bc2_sqrt + eps;
            *x += step_size * m / denom;
        }
    }
}

/// Runs `f` on the `f32` elements of a weight, which every trained weight is.
pub(crate) fn with_f32_mut<R>(t: &mut Tensor, name: &str, f: impl FnOnce(&mut [f32]) -> R) -> Result<R, TrainError> {
    if t.as_f32().is_none() {
        return Err(TrainError::invalid(format!("weight `{name}` holds {} elements; training needs f32", t.data().kind())));
    }
    // Tensor keeps its fields private: take it apart and put it back (moves, no copies).
    let (shape, data) = std::mem::replace(t, Tensor::zeros(&[0])).into_parts();
    let Data::F32(mut v) = data else { unreachable!("checked above") };
    let r = f(&mut v);
    *t = Tensor::f32(&shape, v);
    Ok(r)
}

/// torch's `clip_grad_norm_(max_norm)` over every gradient: the 2-norm of the per-tensor
/// 2-norms; when `max_norm / (norm + 1e-6) < 1`, every gradient is multiplied by it.
/// Returns the norm before clipping. Norms are summed in `f64` and rounded to `f32` as
/// torch's `f32` results are.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> f64 {
    let total = grad_norm(grads);
    let coef = clip_coef(total, max_norm);
    if coef < 1.0 {
        for g in grads.values_mut() {
            let scaled: Vec<f32> = g.to_f32_vec().into_iter().map(|x| x * coef).collect();
            *g = Tensor::f32(g.shape(), scaled);
        }
    }
    total
}

/// What `clip_grad_norm_(max_norm)` multiplies every gradient by at global norm `norm`:
/// `max_norm / (norm + 1e-6)` in `f32` when that is below 1, else 1 (no change).
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    let coef = max_norm as f32 / (norm as f32 + 1e-6);
    coef.min(1.0)
}

/// The global 2-norm of the gradients, as torch's `clip_grad_norm_` computes it.
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> f64 {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let sq: f64 = names
        .iter()
        .map(|n| {
            let per = grads[*n].to_f64_vec().iter().map(|x| x * x).sum::<f64>().sqrt() as f32;
            (per as f64) * (per as f64)
        })
        .sum();
    sq.sqrt() as f32 as f64
}

/// A learning-rate schedule: the factor on the peak rate at optimizer step `t` (from 1).
/// Warmup is linear, `t / warmup` for `t ≤ warmup`, so the first step already learns.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// The peak rate after warmup.
    Constant { warmup: u64 },
    /// Warmup, then `min + (1 - min)·(1 + cos(π·p))/2` with `p` going from 0 after warmup
    /// to 1 at step `total`, then `min` (the ratio to the peak rate).
    Cosine { warmup: u64, total: u64, min_ratio: f64 },
    /// Warmup, then the peak rate until `boundaries[0]`, `factors[0]` times it until
    /// `boundaries[1]`, and so on (DeepSeek LLM's multi-step schedule). Factors are
    /// ratios to the peak rate, not cumulative; boundaries are steps, increasing.
    MultiStep { warmup: u64, boundaries: Vec<u64>, factors: Vec<f64> },
}

impl Schedule {
    pub fn factor(&self, t: u64) -> f64 {
        let warmup = match self {
            Schedule::Constant { warmup } | Schedule::Cosine { warmup, .. } | Schedule::MultiStep { warmup, .. } => *warmup,
        };
        if t <= warmup && warmup > 0 {
            return t as f64 / warmup as f64;
        }
        match self {
            Schedule::Constant { .. } => 1.0,
            Schedule::Cosine { total, min_ratio, .. } => {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let p = ((t - warmup) as f64 / span).clamp(0.0, 1.0);
                min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
            Schedule::MultiStep { boundaries, factors, .. } => {
                boundaries.iter().zip(factors).rfind(|(b, _)| t > **b).map_or(1.0, |(_, f)| *f)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adam() -> AdamW {
        AdamW { betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.1 }
    }

    /// One step by hand. With m = v = 0 the first update is lr·g/(|g| + eps') per
    /// element, i.e. ±lr, after the decay p·(1 - lr·wd).
    #[test]
    fn one_adamw_step_by_hand() {
        let opt = adam();
        let (lr, p0, g) = (0.01f64, [1.0f32, -2.0], [0.5f32, -4.0]);
        let mut weights = HashMap::from([("w".to_string(), Tensor::f32(&[1, 2], p0.to_vec()))]);
        let grads = HashMap::from([("w".to_string(), Tensor::f32(&[1, 2], g.to_vec()))]);
        let mut state = OptimizerState::default();
        opt.step(lr, &mut state, &mut weights, &grads, &|_| false).unwrap();
        let s = &state.params["w"];
        assert_eq!(s.step, 1);
        // m = 0.1·g, v = 0.05·g², m̂ = g, v̂ = g²: p = p·(1 - 0.001) - 0.01·g/(|g| + 1e-8).
        for i in 0..2 {
            let m = 0.1 * g[i] as f64;
            let v = 0.05 * (g[i] as f64).powi(2);
            assert!((s.exp_avg[i] as f64 - m).abs() < 1e-7, "{} vs {m}", s.exp_avg[i]);
            assert!((s.exp_avg_sq[i] as f64 - v).abs() < 1e-7);
            let want = p0[i] as f64 * 0.999 - lr * (m / 0.1) / ((v / 0.05).sqrt() + 1e-8);
            let got = weights["w"].get_flat(i);
            assert!((got - want).abs() < 1e-6, "element {i}: {got} vs {want}");
        }
        assert_eq!(weights["w"].to_f32_vec(), vec![0.989, -1.988]);

        // Second step with the same gradient, by the formulas in f64.
        opt.step(lr, &mut state, &mut weights, &grads, &|_| false).unwrap();
        let mut p = [0.989f64, -1.988];
        for i in 0..2 {
            let gi = g[i] as f64;
            let m = 0.9 * 0.1 * gi + 0.1 * gi;
            let v = 0.95 * 0.05 * gi * gi + 0.05 * gi * gi;
            let (mh, vh) = (m / (1.0 - 0.9f64.powi(2)), v / (1.0 - 0.95f64.powi(2)));
            p[i] = p[i] * 0.999 - lr * mh / (vh.sqrt() + 1e-8);
            assert!((weights["w"].get_flat(i) - p[i]).abs() < 1e-6, "{} vs {}", weights["w"].get_flat(i), p[i]);
        }
    }

    #[test]
    fn weight_decay_skips_vectors_and_frozen_params() {
        let opt = AdamW { weight_decay: 0.5, ..adam() };
        let mut weights = HashMap::from([
            ("gain".to_string(), Tensor::f32(&[2], vec![1.0, 1.0])),
            ("mat".to_string(), Tensor::f32(&[2, 1], vec![1.0, 1.0])),
            ("bias".to_string(), Tensor::f32(&[2], vec![3.0, 3.0])),
            ("untouched".to_string(), Tensor::f32(&[2, 1], vec![7.0, 7.0])),
        ]);
        // Zero gradients: Adam's own update is 0, so only weight decay can move a weight.
        let grads: HashMap<String, Tensor> =
            ["gain", "mat", "bias"].iter().map(|n| (n.to_string(), Tensor::zeros(weights[*n].shape()))).collect();
        let mut state = OptimizerState::default();
        opt.step(0.1, &mut state, &mut weights, &grads, &|n| n == "bias").unwrap();
        assert_eq!(weights["gain"].to_f32_vec(), vec![1.0, 1.0], "no decay on a 1-D tensor");
        assert_eq!(weights["mat"].to_f32_vec(), vec![0.95, 0.95], "p·(1 - lr·wd)");
        assert_eq!(weights["bias"].to_f32_vec(), vec![3.0, 3.0], "frozen");
        assert_eq!(weights["untouched"].to_f32_vec(), vec![7.0, 7.0], "no gradient, no decay");
        assert!(!state.params.contains_key("bias") && !state.params.contains_key("untouched"));
    }

    #[test]
    fn bad_gradients_are_errors() {
        let mut weights = HashMap::from([("w".to_string(), Tensor::f32(&[2], vec![1.0, 1.0]))]);
        let mut state = OptimizerState::default();
        let wrong = HashMap::from([("w".to_string(), Tensor::zeros(&[3]))]);
        let e = adam().step(0.1, &mut state, &mut weights, &wrong, &|_| false).unwrap_err();
        assert!(e.to_string().contains("shape [3]"), "{e}");
        let stray = HashMap::from([("x".to_string(), Tensor::zeros(&[2]))]);
        let e = adam().step(0.1, &mut state, &mut weights, &stray, &|_| false).unwrap_err();
        assert!(e.to_string().contains("`x`"), "{e}");
    }

    #[test]
    fn clipping_scales_by_the_global_norm() {
        // Norm of (3, 4) and (12): sqrt(9 + 16 + 144) = 13.
        let mut grads =
            HashMap::from([("a".to_string(), Tensor::f32(&[2], vec![3.0, 4.0])), ("b".to_string(), Tensor::f32(&[1, 1], vec![12.0]))]);
        let norm = clip_grad_norm(&mut grads, 1.0);
        assert_eq!(norm, 13.0);
        let c = 1.0 / (13.0 + 1e-6);
        assert!((grads["a"].get_flat(0) - 3.0 * c).abs() < 1e-7 && (grads["b"].get_flat(0) - 12.0 * c).abs() < 1e-7);
        assert!((grad_norm(&grads) - 1.0).abs() < 1e-6);
        // Under the limit nothing changes.
        let before = grads.clone();
        assert!((clip_grad_norm(&mut grads, 5.0) - 1.0).abs() < 1e-6);
        assert_eq!(grads, before);
    }

    #[test]
    fn schedules_at_chosen_steps() {
        let c = Schedule::Constant { warmup: 0 };
        assert_eq!((c.factor(1), c.factor(1000)), (1.0, 1.0));
        let c = Schedule::Constant { warmup: 4 };
        assert_eq!([1, 2, 4, 5].map(|t| c.factor(t)), [0.25, 0.5, 1.0, 1.0]);

        let cos = Schedule::Cosine { warmup: 2, total: 12, min_ratio: 0.1 };
        assert_eq!(cos.factor(1), 0.5);
        assert_eq!(cos.factor(2), 1.0);
        // Halfway through the decay (step 7 of 2..12): min + (1 - min)/2.
        assert!((cos.factor(7) - 0.55).abs() < 1e-12);
        assert!((cos.factor(12) - 0.1).abs() < 1e-12);
        assert!((cos.factor(50) - 0.1).abs() < 1e-12);
        assert!((cos.factor(4) - (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 0.2).cos()))).abs() < 1e-12);

        // DeepSeek LLM: 100% to 80% of the steps, 31.6% to 90%, 10% after.
        let ms = Schedule::MultiStep { warmup: 10, boundaries: vec![80, 90], factors: vec![0.316, 0.1] };
        assert_eq!([5, 10, 80, 81, 90, 91, 100].map(|t| ms.factor(t)), [0.5, 1.0, 1.0, 0.316, 0.316, 0.1, 0.1]);
    }
}
