//! Training: the pieces the trainer runs around the model's forward and backward passes.

pub mod grpo;
