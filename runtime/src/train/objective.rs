//! The bridge from a spec to an [`Objective`]: the reference backend's loss and
//! gradients, from the spec's train entry differentiated by the autodiff pass
//! ([`super::model::TrainModel`]).

use super::model::{Terms, TrainModel};
use super::recipe::Recipe;
use super::{Batch, Objective, StepOutput, TrainError};
use crate::reference::{Precision, Tensor};
use dsc_compiler::passes::autodiff::TrainOptions;
use dsc_compiler::passes::PassSelection;
use dsc_dsl::model::Ffn;
use dsc_dsl::Spec;
use std::collections::HashMap;

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
        Ok(ObjectiveOptions { mtp, mtp_stop_gradient: f.mtp_stop_gradient, aux_loss: f.aux_loss, bias_update, recompute: f.recompute })
    }
}

/// The loss and gradients of `spec`'s training entry on the reference interpreter.
pub fn reference_objective(spec: &Spec, options: &ObjectiveOptions) -> Result<Box<dyn Objective>, TrainError> {
    let train = TrainOptions { recompute: options.recompute, mtp_stop_gradient: options.mtp_stop_gradient };
    let model = TrainModel::compile(spec, train, &PassSelection::default()).map_err(TrainError::Unsupported)?;
    let terms = Terms { main: 1.0, mtp: if options.mtp { 1.0 } else { 0.0 }, aux: if options.aux_loss { 1.0 } else { 0.0 } };
    let biased = spec.model.ffn.iter().any(|b| matches!(&b.kind, Ffn::Moe(m) if m.router.selection_bias));
    Ok(Box::new(Reference { model, terms, options: options.clone(), biased }))
}

/// [`reference_objective`]'s objective.
struct Reference {
    model: TrainModel,
    terms: Terms,
    options: ObjectiveOptions,
    /// The MoE layers carry a selection bias the loop may update.
    biased: bool,
}

impl Objective for Reference {
    fn step(&mut self, weights: &HashMap<String, Tensor>, batch: &Batch) -> Result<StepOutput, TrainError> {
        let args = [&batch.input_ids, &batch.positions, &batch.labels];
        let out = self.model.run(weights, args, self.terms, Precision::F32).map_err(|e| TrainError::Invalid(e.to_string()))?;
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
        Ok(StepOutput { loss: out.objective, terms, grads: out.grads, expert_loads })
    }
}
