//! The bridge from a spec to an [`Objective`]: the loss and gradients of the spec's train
//! entry differentiated by the autodiff pass ([`super::model::TrainModel`]), on the
//! reference interpreter or (recipe `backend: wgpu`) from its launch plan on a wgpu
//! adapter.

use super::device::{DeviceOptimizer, DeviceState};
use super::model::{GradOutput, Terms, TrainModel};
use super::optim::{AdamW, OptimizerState};
use super::recipe::Recipe;
use super::{Batch, Objective, StepOutput, TrainError};
use crate::plan_exec::{Device, PlanEngine};
use crate::reference::{Precision, Tensor};
use dsc_compiler::passes::autodiff::TrainOptions;
use dsc_compiler::passes::PassSelection;
use dsc_dsl::model::Ffn;
use dsc_dsl::Spec;
use std::collections::{HashMap, HashSet};

/// What the recipe asks of the objective, defaults resolved against the spec.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveOptions {
    /// Add the MTP loss (λ = the spec's `mtp.loss_weight`).
    pub mtp: bool,
    /// Stop the MTP loss's gradient at the main model's hidden states.
    pub mtp_stop_gradient: bool,
    /// Add the spec's balance losses.
    pub aux_loss: bool,
    /// Report expert loads for the aux-loss-free bias update.
    pub bias_update: bool,
    pub recompute: super::recipe::Recompute,
    /// The recipe's `backend`: what runs the train graph.
    pub backend: String,
}

impl ObjectiveOptions {
    /// The recipe's choices, with `mtp` and `bias_update` defaulting to what the spec has.
    pub fn resolve(recipe: &Recipe, spec: &Spec) -> Result<ObjectiveOptions, TrainError> {
        let f = &recipe.file;
        let has_mtp = spec.model.mtp.is_some();
        let speed = super::sft::bias_update_speed(spec);
        let mtp = f.mtp.unwrap_or(has_mtp);
        if mtp && !has_mtp {
            return Err(TrainError::invalid(format!(
                "{}: `mtp: true`, but model `{}` has no `mtp` section",
                recipe.path.display(),
                spec.model.name
            )));
        }
        let bias_update = f.bias_update.unwrap_or(speed > 0.0);
        if bias_update && speed <= 0.0 {
            return Err(TrainError::invalid(format!(
                "{}: `bias_update: true`, but model `{}` sets no `balance {{ bias_update_speed }}` (and needs `router {{ selection_bias = true }}`)",
                recipe.path.display(),
                spec.model.name
            )));
        }
        Ok(ObjectiveOptions {
            mtp,
            mtp_stop_gradient: f.mtp_stop_gradient,
            aux_loss: f.aux_loss,
            bias_update,
            recompute: f.recompute,
            backend: f.backend.clone(),
        })
    }
}

/// The objective `options.backend` names.
pub fn objective(spec: &Spec, options: &ObjectiveOptions) -> Result<Box<dyn Objective>, TrainError> {
    match options.backend.as_str() {
        #[cfg(feature = "wgpu")]
        "wgpu" => device_objective(spec, options, crate::wgpu::exec::WgpuEngine::new()),
        #[cfg(feature = "cuda")]
        "cuda" => device_objective(spec, options, crate::cuda::CudaEngine::new(0).map_err(TrainError::Unsupported)?),
        _ => reference_objective(spec, options),
    }
}

/// The loss and gradients of `spec`'s training entry on the reference interpreter.
pub fn reference_objective(spec: &Spec, options: &ObjectiveOptions) -> Result<Box<dyn Objective>, TrainError> {
    Ok(Box::new(Reference(Compiled::new(spec, options)?)))
}

/// The same on a device (`wgpu` or `cuda`): the train entry's launch plan, built once.
/// The weights and AdamW's state stay on the device for the whole run
/// ([`super::device`]): the gradients never leave it, and the optimizer updates the
/// weights in place.
pub fn device_objective<D>(spec: &Spec, options: &ObjectiveOptions, engine: PlanEngine<D>) -> Result<Box<dyn Objective>, TrainError>
where
    D: Device + Send + Sync + 'static,
{
    use crate::generate::Engine;
    let c = Compiled::new(spec, options)?;
    let plan = engine
        .prepare(&c.model.module, dsc_compiler::ir::Mode::Train)
        .map_err(|e| TrainError::Unsupported(format!("the train graph cannot run on {} yet: {e}", D::NAME)))?;
    Ok(Box::new(OnDevice { c, engine, plan, optimizer: DeviceOptimizer::default() }))
}

/// A compiled train entry and what the loop asked of it.
struct Compiled {
    model: TrainModel,
    terms: Terms,
    options: ObjectiveOptions,
    /// The MoE layers carry a selection bias the loop may update.
    biased: bool,
}

impl Compiled {
    fn new(spec: &Spec, options: &ObjectiveOptions) -> Result<Compiled, TrainError> {
        let train = TrainOptions { recompute: options.recompute, mtp_stop_gradient: options.mtp_stop_gradient };
        let model = TrainModel::compile(spec, train, &PassSelection::default()).map_err(TrainError::Unsupported)?;
        let terms = Terms { main: 1.0, mtp: if options.mtp { 1.0 } else { 0.0 }, aux: if options.aux_loss { 1.0 } else { 0.0 } };
        let biased = spec.model.ffn.iter().any(|b| matches!(&b.kind, Ffn::Moe(m) if m.router.selection_bias));
        Ok(Compiled { model, terms, options: options.clone(), biased })
    }

    /// The loop's view of one step's results.
    fn output(&self, out: GradOutput) -> StepOutput {
        let mut terms = vec![("loss".to_string(), out.loss)];
        if self.options.mtp {
            terms.push(("mtp_loss".into(), out.mtp_loss));
        }
        if self.options.aux_loss && out.aux_loss != 0.0 {
            terms.push(("aux_loss".into(), out.aux_loss));
        }
        let expert_loads = if self.biased {
            out.loads.into_iter().map(|(l, load)| (format!("model.layers.{l}.mlp.gate.e_score_correction_bias"), load)).collect()
        } else {
            Vec::new()
        };
        StepOutput { loss: out.objective, terms, grads: out.grads, expert_loads }
    }
}

/// [`reference_objective`]'s objective.
struct Reference(Compiled);

impl Objective for Reference {
    fn step(&mut self, weights: &HashMap<String, Tensor>, batch: &Batch) -> Result<StepOutput, TrainError> {
        let args = [&batch.input_ids, &batch.positions, &batch.labels];
        let c = &self.0;
        let out = c.model.run(weights, args, c.terms, Precision::F32).map_err(|e| TrainError::Invalid(e.to_string()))?;
        Ok(c.output(out))
    }
}

/// [`device_objective`]'s objective.
struct OnDevice<D: Device> {
    c: Compiled,
    engine: PlanEngine<D>,
    plan: dsc_compiler::codegen::plan::Plan,
    optimizer: DeviceOptimizer<D>,
}

impl<D> Objective for OnDevice<D>
where
    D: Device + Send + Sync,
{
    /// `weights` is read only for what the device does not hold yet (the first step's
    /// upload): from then on the device's copies are the weights.
    fn step(&mut self, weights: &HashMap<String, Tensor>, batch: &Batch) -> Result<StepOutput, TrainError> {
        let args = [&batch.input_ids, &batch.positions, &batch.labels];
        let c = &self.c;
        let (out, grads) = c.model.run_on_held(&self.engine, &self.plan, weights, args, c.terms).map_err(TrainError::Invalid)?;
        self.optimizer.set_grads(grads);
        Ok(c.output(out))
    }

    fn device_state(&mut self) -> Option<&mut dyn DeviceState> {
        Some(self)
    }
}

impl<D: Device + Send + Sync> DeviceState for OnDevice<D> {
    fn grad_norm(&mut self, frozen: &HashSet<String>) -> Result<f64, TrainError> {
        self.optimizer.grad_norm(&self.engine, frozen)
    }
    fn adamw(&mut self, adamw: &AdamW, lr: f64, clip: f32, frozen: &HashSet<String>) -> Result<(), TrainError> {
        self.optimizer.adamw(&self.engine, adamw, lr, clip, frozen)
    }
    fn update_bias(&mut self, name: &str, loads: &[f64], gamma: f64) -> Result<(), TrainError> {
        self.optimizer.update_bias(&self.engine, name, loads, gamma)
    }
    fn load(&mut self, weights: &HashMap<String, Tensor>, opt: &OptimizerState) -> Result<(), TrainError> {
        self.optimizer.load(&self.engine, weights, opt)
    }
    fn store(&mut self, weights: &mut HashMap<String, Tensor>, opt: &mut OptimizerState) -> Result<(), TrainError> {
        self.optimizer.store(&self.engine, weights, opt)
    }
    fn counts(&self) -> crate::plan_exec::Counts {
        self.engine.counts()
    }
}
