//! Training: models compiled for gradients ([`model`]), supervised fine-tuning, and
//! GRPO's objective and rewards ([`grpo`]).
//!
//! The SFT loop ([`sft`]) asks an [`Objective`] for the loss and gradients of one [`Batch`]
//! and does the rest: global-norm clipping and AdamW ([`optim`]) on a learning-rate
//! schedule, DeepSeek-V3's aux-loss-free bias update, metrics ([`metrics`]) and
//! checkpoints a hub loader can open ([`checkpoint`]). The recipe is a YAML file
//! ([`recipe`]), the data a JSONL file of token ids ([`data`]). Weights live in a
//! `HashMap<String, Tensor>` of `f32` tensors under the IR's param names (routed experts
//! stacked `[E, ..]`), as [`crate::checkpoint::ModelDir`] loads them.

pub mod checkpoint;
pub mod data;
pub mod device;
pub mod grpo;
pub mod init;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod optim;
pub mod recipe;
pub mod sft;

use crate::reference::Tensor;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// What the loop needs from a compiled model: the loss and gradients of one batch.
pub trait Objective {
    fn step(&mut self, weights: &HashMap<String, Tensor>, batch: &Batch) -> Result<StepOutput, TrainError>;
    /// The objective's own weights and optimizer state, when it keeps them on a device
    /// (its [`StepOutput::grads`] are then empty: they stay there too). `None`: the loop
    /// updates `weights` on the host.
    fn device_state(&mut self) -> Option<&mut dyn device::DeviceState> {
        None
    }
}

/// One batch of sequences, right-padded to the longest.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `i64 [b, s]`; padding is token 0.
    pub input_ids: Tensor,
    /// `i64 [b, s]`: `0..s` on every row (padding sits after the tokens, so a causal
    /// model never lets a real token see it).
    pub positions: Tensor,
    /// `i64 [b, s]`, Hugging Face's unshifted convention: `labels[i]` is the token at
    /// position `i` when it is a target, else -100; the logits at position `i` predict
    /// `labels[i + 1]`. Padding is always -100.
    pub labels: Tensor,
    /// Target tokens counted in the loss: labels other than -100 at positions 1.. .
    pub tokens: usize,
    /// Real tokens of each row (the rest is padding), for what must not count padding
    /// other than through the labels: routing statistics and balance losses.
    pub lengths: Vec<usize>,
}

/// What an [`Objective`] computed for one batch.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// The objective value (what is differentiated).
    pub loss: f64,
    /// Its parts for metrics, e.g. `("loss", ..)`, `("mtp_loss", ..)`, `("aux_loss", ..)`.
    pub terms: Vec<(String, f64)>,
    /// IR param name → gradient (same shape). Params without a gradient are absent: they
    /// count as zero in the gradient norm and AdamW leaves them alone, as torch skips a
    /// parameter whose `.grad` is `None`.
    pub grads: HashMap<String, Tensor>,
    /// (selection-bias param name, e.g. `model.layers.3.mlp.gate.e_score_correction_bias`,
    /// tokens routed to each expert in this batch).
    pub expert_loads: Vec<(String, Vec<f64>)>,
}

/// Why training could not start or go on. Rendered once, by the CLI.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainError {
    /// A file could not be read, written or renamed.
    Io { path: String, message: String },
    /// Bad input: the recipe, the data, a checkpoint; the message names the file (and line).
    Invalid(String),
    /// The model cannot be trained as asked (e.g. no gradients for it yet).
    Unsupported(String),
}

impl TrainError {
    pub fn io(path: &Path, e: impl fmt::Display) -> TrainError {
        TrainError::Io { path: path.display().to_string(), message: e.to_string() }
    }
    pub fn invalid(msg: impl Into<String>) -> TrainError {
        TrainError::Invalid(msg.into())
    }
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainError::Io { path, message } => write!(f, "{path}: {message}"),
            TrainError::Invalid(m) | TrainError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TrainError {}
