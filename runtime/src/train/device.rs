//! A training run's state on a device: the weights and AdamW's moments stay in device
//! buffers from the first step to the last. The weights are `f32` masters, uploaded once
//! as the engine's `f32` copies; a train graph in another dtype (bf16, f16) reads copies
//! cast from the masters after every update, and its gradients are read in that dtype. A
//! step moves its batch in and its loss terms, expert loads and the gradient norm's
//! partial sums (one `f32` per 2,048 gradient elements) out; the optimizer updates the
//! weights in place ([`kernels::optim`]). The host copies are brought up to date only
//! when the loop asks ([`DeviceState::store`], before a checkpoint).
//!
//! The arithmetic is the host optimizer's ([`super::optim`]): torch's AdamW order of
//! operations with its scalars computed in `f64` and rounded to `f32` on the host, the
//! norm as `clip_grad_norm_` forms it (per-tensor norms from `f64` sums, rounded to
//! `f32`). What differs is the order of the partial sums of squares (`f32` within a
//! 2,048-element chunk) and whatever fused multiply-adds the device compiler forms: the
//! SFT fixtures hold to the same tolerances on either.
//!
//! [`kernels::optim`]: dsc_compiler::codegen::kernels::optim

use super::optim::{AdamW, OptimizerState, ParamState};
use super::sft::update_bias;
use super::TrainError;
use crate::plan_exec::{Counts, Device, Held, PlanEngine};
use crate::reference::Tensor;
use dsc_compiler::codegen::kernels::optim::{adamw_work, cast_work, sum_squares_parts, sum_squares_work, AdamWScalars};
use dsc_compiler::codegen::Elem;
use dsc_compiler::ir::{Bindings, DType};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Weights and optimizer state an objective keeps on its device; the loop asks it to
/// update them there instead of updating its host copies.
pub trait DeviceState {
    /// The global 2-norm of the last step's gradients, those in `frozen` left out
    /// (torch's `clip_grad_norm_`).
    fn grad_norm(&mut self, frozen: &HashSet<String>) -> Result<f64, TrainError>;
    /// AdamW at `lr` on every gradient of the last step not in `frozen`, each scaled by
    /// `clip` first.
    fn adamw(&mut self, adamw: &AdamW, lr: f64, clip: f32, frozen: &HashSet<String>) -> Result<(), TrainError>;
    /// DeepSeek-V3's aux-loss-free update of selection bias `name` ([`update_bias`]).
    fn update_bias(&mut self, name: &str, loads: &[f64], gamma: f64) -> Result<(), TrainError>;
    /// Starts from these weights and optimizer state (a fresh run's, or a checkpoint's).
    fn load(&mut self, weights: &HashMap<String, Tensor>, opt: &OptimizerState) -> Result<(), TrainError>;
    /// Brings the host copies up to date with the device.
    fn store(&mut self, weights: &mut HashMap<String, Tensor>, opt: &mut OptimizerState) -> Result<(), TrainError>;
    /// What has crossed the host link so far.
    fn counts(&self) -> Counts;
}

/// AdamW's state of one param on the device.
struct Moments<B> {
    step: u64,
    exp_avg: B,
    exp_avg_sq: B,
}

/// The device side of an optimizer: the last step's gradients and every param's moments.
pub struct DeviceOptimizer<D: Device> {
    grads: Vec<(String, Held<D::Buf>)>,
    moments: BTreeMap<String, Moments<D::Buf>>,
}

impl<D: Device> Default for DeviceOptimizer<D> {
    fn default() -> Self {
        DeviceOptimizer { grads: Vec::new(), moments: BTreeMap::new() }
    }
}

fn device_err(e: String) -> TrainError {
    TrainError::Invalid(format!("on the device: {e}"))
}

impl<D: Device> DeviceOptimizer<D> {
    /// The gradients a step left on the device, by IR param name.
    pub fn set_grads(&mut self, grads: Vec<(String, Held<D::Buf>)>) {
        self.grads = grads;
    }

    /// See [`DeviceState::grad_norm`].
    pub fn grad_norm(&self, engine: &PlanEngine<D>, frozen: &HashSet<String>) -> Result<f64, TrainError> {
        let dev = engine.backend();
        let mut sq = 0.0f64;
        for (name, g) in self.sorted(frozen) {
            let n = numel(g);
            let parts = sum_squares_parts(n);
            let out = dev.alloc(parts, DType::F32).map_err(device_err)?;
            dev.execute(
                &sum_squares_work(n, elem(name, g.dtype)?),
                std::slice::from_ref(&g.buf),
                std::slice::from_ref(&out),
                &Bindings::default(),
            )
            .map_err(|e| device_err(format!("the norm of `{name}`'s gradient: {e}")))?;
            let partial = engine.download(&out, &[parts], DType::F32).map_err(device_err)?;
            let per = partial.to_f64_vec().iter().sum::<f64>().sqrt() as f32;
            sq += (per as f64) * (per as f64);
        }
        Ok(sq.sqrt() as f32 as f64)
    }

    /// The last step's gradients not in `frozen`, by name.
    fn sorted(&self, frozen: &HashSet<String>) -> Vec<(&String, &Held<D::Buf>)> {
        let mut grads: Vec<(&String, &Held<D::Buf>)> =
            self.grads.iter().filter(|(n, _)| !frozen.contains(n)).map(|(n, g)| (n, g)).collect();
        grads.sort_by(|a, b| a.0.cmp(b.0));
        grads
    }

    /// See [`DeviceState::adamw`]: [`AdamW::step`] on the `f32` masters, then the copies
    /// in other dtypes cast from them.
    pub fn adamw(&mut self, engine: &PlanEngine<D>, adamw: &AdamW, lr: f64, clip: f32, frozen: &HashSet<String>) -> Result<(), TrainError> {
        let dev = engine.backend();
        let grads: Vec<(String, Held<D::Buf>)> = self.sorted(frozen).into_iter().map(|(n, g)| (n.clone(), g.clone())).collect();
        for (name, g) in grads {
            let Some(p) = engine.weight(&name, DType::F32) else {
                return Err(TrainError::invalid(format!(
                    "the objective returned a gradient for `{name}`, which is not a weight on the device"
                )));
            };
            let n = numel(&g);
            let m = match self.moments.get_mut(&name) {
                Some(m) => m,
                None => {
                    let zeros = Tensor::zeros(&[n]);
                    let up = || engine.upload(&zeros, DType::F32).map_err(device_err);
                    let (a, b) = (up()?, up()?);
                    self.moments.entry(name.clone()).or_insert(Moments { step: 0, exp_avg: a, exp_avg_sq: b })
                }
            };
            m.step += 1;
            let decay = g.shape.len() >= 2 && adamw.weight_decay != 0.0;
            let s = scalars(adamw, lr, m.step, clip, decay);
            let ins = [p, g.buf.clone(), m.exp_avg.clone(), m.exp_avg_sq.clone()];
            dev.execute(&adamw_work(n, elem(&name, g.dtype)?, &s), &ins, &[], &Bindings::default())
                .map_err(|e| device_err(format!("AdamW on `{name}`: {e}")))?;
            refresh(engine, &name, n)?;
        }
        Ok(())
    }

    /// See [`DeviceState::update_bias`]: the bias is a few floats, updated on the host.
    pub fn update_bias(&self, engine: &PlanEngine<D>, name: &str, loads: &[f64], gamma: f64) -> Result<(), TrainError> {
        let Some(b) = engine.weight(name, DType::F32) else {
            return Err(TrainError::invalid(format!(
                "the objective reported expert loads for `{name}`, which is not a weight on the device"
            )));
        };
        let mut one = HashMap::from([(name.to_string(), engine.download(&b, &[loads.len()], DType::F32).map_err(device_err)?)]);
        update_bias(&mut one, name, loads, gamma)?;
        engine.set_weight(name, DType::F32, engine.upload(&one[name], DType::F32).map_err(device_err)?);
        refresh(engine, name, loads.len())
    }

    /// See [`DeviceState::load`]: the weights become the device's `f32` masters.
    pub fn load(&mut self, engine: &PlanEngine<D>, weights: &HashMap<String, Tensor>, opt: &OptimizerState) -> Result<(), TrainError> {
        engine.forget_weights();
        for (name, t) in weights {
            engine.put_weight(name, t, DType::F32).map_err(device_err)?;
        }
        self.grads.clear();
        self.moments.clear();
        for (name, s) in &opt.params {
            let n = s.exp_avg.len();
            let up = |v: &[f32]| engine.upload(&Tensor::f32(&[n], v.to_vec()), DType::F32).map_err(device_err);
            self.moments.insert(name.clone(), Moments { step: s.step, exp_avg: up(&s.exp_avg)?, exp_avg_sq: up(&s.exp_avg_sq)? });
        }
        Ok(())
    }

    /// See [`DeviceState::store`].
    pub fn store(&self, engine: &PlanEngine<D>, weights: &mut HashMap<String, Tensor>, opt: &mut OptimizerState) -> Result<(), TrainError> {
        for (name, t) in weights.iter_mut() {
            if let Some(b) = engine.weight(name, DType::F32) {
                *t = engine.download(&b, t.shape(), DType::F32).map_err(device_err)?;
            }
        }
        opt.params.clear();
        for (name, m) in &self.moments {
            let n = weights.get(name).map_or(0, Tensor::numel);
            let down = |b: &D::Buf| engine.download(b, &[n], DType::F32).map(|t| t.to_f32_vec()).map_err(device_err);
            opt.params.insert(name.clone(), ParamState { step: m.step, exp_avg: down(&m.exp_avg)?, exp_avg_sq: down(&m.exp_avg_sq)? });
        }
        Ok(())
    }
}

/// Casts the `f32` master of `name` (`n` elements) into each of its copies in another
/// dtype, in place.
fn refresh<D: Device>(engine: &PlanEngine<D>, name: &str, n: usize) -> Result<(), TrainError> {
    let Some(master) = engine.weight(name, DType::F32) else { return Ok(()) };
    for (dtype, copy) in engine.weight_copies(name).into_iter().filter(|(d, _)| *d != DType::F32) {
        let work = cast_work(n, Elem::F32, elem(name, dtype)?);
        engine
            .backend()
            .execute(&work, std::slice::from_ref(&master), std::slice::from_ref(&copy), &Bindings::default())
            .map_err(|e| device_err(format!("the {} copy of `{name}`: {e}", dtype.name())))?;
    }
    Ok(())
}

/// The kernel element type of a float dtype.
fn elem(name: &str, d: DType) -> Result<Elem, TrainError> {
    Elem::from_dtype(d).ok_or_else(|| TrainError::Unsupported(format!("`{name}` is {}, not a float", d.name())))
}

fn numel<B>(h: &Held<B>) -> usize {
    h.shape.iter().product()
}

/// The scalars of one AdamW update, as [`AdamW::update`] rounds them.
fn scalars(a: &AdamW, lr: f64, step: u64, clip: f32, decay: bool) -> AdamWScalars {
    let [b1, b2] = a.betas;
    let t = step as f64;
    AdamWScalars {
        clip,
        decay: if decay { (1.0 - lr * a.weight_decay) as f32 } else { 1.0 },
        w: (1.0 - b1) as f32,
        beta2: b2 as f32,
        c2: (1.0 - b2) as f32,
        step_size: (-(lr / (1.0 - b1.powf(t)))) as f32,
        bc2_sqrt: (1.0 - b2.powf(t)).sqrt() as f32,
        eps: a.eps as f32,
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::*;
    use crate::plan_exec::Device;
    use crate::wgpu::exec::WgpuEngine;

    /// One AdamW step of a weight whose train graph is f16: the gradient is read as f16,
    /// the f32 master moves as the host optimizer moves it (same scalars, same order of
    /// operations), the f16 copy is the master cast, and the norm is the host's.
    #[test]
    fn mixed_precision_step_matches_the_host() {
        let engine = WgpuEngine::new();
        let n = 5000; // more than one sum_squares chunk
        let w: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos() * 0.01).collect();
        let (wt, gt) = (Tensor::f32(&[50, 100], w.clone()), Tensor::f32(&[50, 100], g.clone()));
        let mut opt = DeviceOptimizer::<crate::wgpu::WgpuBackend>::default();
        opt.load(&engine, &HashMap::from([("w".to_string(), wt.clone())]), &OptimizerState::default()).unwrap();
        engine.put_weight("w", &wt, DType::F16).unwrap();
        let gbuf = Device::upload(engine.backend(), &gt, DType::F16).unwrap();
        opt.set_grads(vec![("w".into(), Held { buf: gbuf, shape: vec![50, 100], dtype: DType::F16, bytes: 0, room: None })]);

        // The host reference on the f16-rounded gradient.
        let g16: Vec<f32> = g.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        let host_norm = super::super::optim::grad_norm(&HashMap::from([("w".to_string(), Tensor::f32(&[50, 100], g16.clone()))]));
        let norm = opt.grad_norm(&engine, &HashSet::new()).unwrap();
        assert!((norm - host_norm).abs() <= 1e-6 * host_norm, "{norm} vs {host_norm}");
        let adamw = AdamW { betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.1 };
        let clip = 0.5f32;
        opt.adamw(&engine, &adamw, 1e-2, clip, &HashSet::new()).unwrap();

        let mut state = ParamState { step: 0, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n] };
        let mut p = w.clone();
        let scaled: Vec<f32> = g16.iter().map(|x| x * clip).collect();
        adamw.update(&mut p, &scaled, &mut state, 1e-2, true);
        let master = engine.download(&engine.weight("w", DType::F32).unwrap(), &[n], DType::F32).unwrap().to_f32_vec();
        let worst = master.iter().zip(&p).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "master off the host update by {worst}");
        let copy = engine.download(&engine.weight("w", DType::F16).unwrap(), &[n], DType::F16).unwrap().to_f32_vec();
        for (c, m) in copy.iter().zip(&master) {
            assert_eq!(*c, half::f16::from_f32(*m).to_f32(), "the f16 copy is the master cast");
        }
        // The moments come back with the step count.
        let mut weights = HashMap::from([("w".to_string(), wt)]);
        let mut back = OptimizerState::default();
        opt.store(&engine, &mut weights, &mut back).unwrap();
        assert_eq!(back.params["w"].step, 1);
        assert_eq!(weights["w"].to_f32_vec(), master);
    }
}
