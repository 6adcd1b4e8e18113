//! What runs the GRPO policy's passes and its update: the reference interpreter on host
//! weights ([`HostRunner`]), or the generation engine's own device ([`DeviceRunner`]),
//! where the weights the rollouts are generated with are the weights the optimizer
//! updates: one copy, on the device, for the whole run.
//!
//! On a device the policy's two plans (its forward for log-probabilities, its
//! differentiated train entry) run on the engine that generates the rollouts, and read the
//! same device weights (`f32` masters; a bf16 or f16 model's copies are cast from them).
//! The gradients stay on the device and the optimizer updates the masters in place
//! ([`DeviceOptimizer`]). The reference model (β > 0) has its own device copies under the
//! same names, kept apart from the policy's, uploaded again when it moves.

use crate::generate::{Engine, Interpreter};
use crate::plan_exec::{Counts, Device, DeviceWeights, PlanEngine};
use crate::reference::{Precision, Tensor};
use crate::train::device::{DeviceOptimizer, DeviceState};
use crate::train::model::{PolicyOutput, TrainModel};
use crate::train::optim::{AdamW, OptimizerState};
use crate::train::TrainError;
use dsc_compiler::codegen::plan::Plan;
use std::collections::{HashMap, HashSet};

/// The policy's passes on the generation engine `E`.
pub(super) trait Runner<E: Engine> {
    /// `logp[b, s-1]` of the policy (`weights`: the host copy, read for what the engine
    /// does not hold).
    fn log_probs(&self, engine: &E, policy: &TrainModel, weights: &HashMap<String, Tensor>, args: &[&Tensor])
        -> Result<Tensor, TrainError>;
    /// The same under the reference model's weights.
    fn ref_log_probs(
        &self,
        engine: &E,
        policy: &TrainModel,
        reference: &HashMap<String, Tensor>,
        args: &[&Tensor],
    ) -> Result<Tensor, TrainError>;
    /// The reference weights moved (a sync): copies of the old ones are stale.
    fn reference_changed(&mut self) {}
    /// The log-probabilities and the gradient of `Σ dlogp·logp + mtp·L_mtp + aux·L_aux`.
    /// A runner that keeps the weights on a device keeps the gradients there too (the
    /// output's map is empty) for its [`Runner::device_state`].
    #[allow(clippy::too_many_arguments)]
    fn run_policy(
        &mut self,
        engine: &E,
        policy: &TrainModel,
        weights: &HashMap<String, Tensor>,
        args: &[&Tensor],
        dlogp: &Tensor,
        mtp: f64,
        aux: f64,
    ) -> Result<PolicyOutput, TrainError>;
    /// The weights and optimizer state on `engine`'s device, when the runner keeps them
    /// there; `None`: the loop updates the host copy.
    fn device_state<'a>(&'a mut self, _engine: &'a E) -> Option<Box<dyn DeviceState + 'a>> {
        None
    }
}

/// The reference interpreter on the host weights.
pub(super) struct HostRunner;

impl Runner<Interpreter> for HostRunner {
    fn log_probs(
        &self,
        _: &Interpreter,
        policy: &TrainModel,
        weights: &HashMap<String, Tensor>,
        args: &[&Tensor],
    ) -> Result<Tensor, TrainError> {
        policy.log_probs(weights, args, Precision::F32).map_err(exec)
    }

    fn ref_log_probs(
        &self,
        e: &Interpreter,
        policy: &TrainModel,
        reference: &HashMap<String, Tensor>,
        args: &[&Tensor],
    ) -> Result<Tensor, TrainError> {
        self.log_probs(e, policy, reference, args)
    }

    fn run_policy(
        &mut self,
        _: &Interpreter,
        policy: &TrainModel,
        weights: &HashMap<String, Tensor>,
        args: &[&Tensor],
        dlogp: &Tensor,
        mtp: f64,
        aux: f64,
    ) -> Result<PolicyOutput, TrainError> {
        policy.run_policy(weights, args, dlogp, mtp, aux, Precision::F32).map_err(exec)
    }
}

fn exec(e: crate::reference::ExecError) -> TrainError {
    TrainError::invalid(e.to_string())
}

/// The policy's plans on the generation engine's device, its weights and AdamW's state
/// there, and the reference model's device copies.
pub(super) struct DeviceRunner<D: Device> {
    forward: Plan,
    train: Plan,
    reference: DeviceWeights<D::Buf>,
    optimizer: DeviceOptimizer<D>,
}

impl<D: Device + Send + Sync> DeviceRunner<D> {
    /// The policy's two plans for `engine`.
    pub(super) fn new(policy: &TrainModel, engine: &PlanEngine<D>) -> Result<DeviceRunner<D>, TrainError> {
        let unsupported = |e: String| TrainError::Unsupported(format!("the policy cannot run on {} yet: {e}", D::NAME));
        let forward = policy.forward.as_ref().ok_or_else(|| TrainError::Unsupported("the policy has no forward entry".into()))?;
        let forward = engine.prepare(forward, dsc_compiler::ir::Mode::Train).map_err(unsupported)?;
        let train = engine.prepare(&policy.module, dsc_compiler::ir::Mode::Train).map_err(unsupported)?;
        Ok(DeviceRunner { forward, train, reference: DeviceWeights::new(), optimizer: DeviceOptimizer::default() })
    }
}

impl<D: Device + Send + Sync> Runner<PlanEngine<D>> for DeviceRunner<D> {
    fn log_probs(
        &self,
        engine: &PlanEngine<D>,
        policy: &TrainModel,
        weights: &HashMap<String, Tensor>,
        args: &[&Tensor],
    ) -> Result<Tensor, TrainError> {
        policy.log_probs_on(engine, &self.forward, weights, args).map_err(TrainError::Invalid)
    }

    fn ref_log_probs(
        &self,
        engine: &PlanEngine<D>,
        _: &TrainModel,
        reference: &HashMap<String, Tensor>,
        args: &[&Tensor],
    ) -> Result<Tensor, TrainError> {
        let args: Vec<Tensor> = args.iter().map(|t| (*t).clone()).collect();
        let out = engine.run_with(&self.reference, &self.forward, &args, reference).map_err(TrainError::Invalid)?;
        out.into_iter().next().ok_or_else(|| TrainError::invalid("the forward entry returned nothing"))
    }

    fn reference_changed(&mut self) {
        self.reference.clear();
    }

    fn run_policy(
        &mut self,
        engine: &PlanEngine<D>,
        policy: &TrainModel,
        weights: &HashMap<String, Tensor>,
        args: &[&Tensor],
        dlogp: &Tensor,
        mtp: f64,
        aux: f64,
    ) -> Result<PolicyOutput, TrainError> {
        let (out, grads) = policy.run_policy_on_held(engine, &self.train, weights, args, dlogp, mtp, aux).map_err(TrainError::Invalid)?;
        self.optimizer.set_grads(grads);
        Ok(out)
    }

    fn device_state<'a>(&'a mut self, engine: &'a PlanEngine<D>) -> Option<Box<dyn DeviceState + 'a>> {
        Some(Box::new(Bound { engine, optimizer: &mut self.optimizer }))
    }
}

/// A [`DeviceOptimizer`] with the engine it works on.
struct Bound<'a, D: Device> {
    engine: &'a PlanEngine<D>,
    optimizer: &'a mut DeviceOptimizer<D>,
}

impl<D: Device + Send + Sync> DeviceState for Bound<'_, D> {
    fn grad_norm(&mut self, frozen: &HashSet<String>) -> Result<f64, TrainError> {
        self.optimizer.grad_norm(self.engine, frozen)
    }
    fn adamw(&mut self, adamw: &AdamW, lr: f64, clip: f32, frozen: &HashSet<String>) -> Result<(), TrainError> {
        self.optimizer.adamw(self.engine, adamw, lr, clip, frozen)
    }
    fn update_bias(&mut self, name: &str, loads: &[f64], gamma: f64) -> Result<(), TrainError> {
        self.optimizer.update_bias(self.engine, name, loads, gamma)
    }
    fn load(&mut self, weights: &HashMap<String, Tensor>, opt: &OptimizerState) -> Result<(), TrainError> {
        self.optimizer.load(self.engine, weights, opt)
    }
    fn store(&mut self, weights: &mut HashMap<String, Tensor>, opt: &mut OptimizerState) -> Result<(), TrainError> {
        self.optimizer.store(self.engine, weights, opt)
    }
    fn counts(&self) -> Counts {
        self.engine.counts()
    }
}
