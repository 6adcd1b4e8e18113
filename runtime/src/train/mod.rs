//! Training: models compiled for gradients ([`model`]) and the pieces the trainer runs
//! around the model's forward and backward passes ([`grpo`]'s objective and rewards).

pub mod grpo;
pub mod model;
