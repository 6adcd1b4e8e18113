//! The bridge from a spec to an [`Objective`]: the reference backend's loss and gradients.
//!
//! Gradients come from the autodiff pass, which is being built; until it lands,
//! [`reference_objective`] says so instead of training on something else.

use super::recipe::Recipe;
use super::{Objective, TrainError};
use dsc_dsl::Spec;

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
    let _ = (spec, options);
    Err(TrainError::Unsupported("gradients are not available yet (autodiff pass pending)".to_string()))
}
