//! A model compiled for training: the spec's train entry through the training pipeline
//! (autodiff included), and one call that runs it on a batch and returns the loss terms,
//! every gradient and the MoE layers' expert loads.
//!
//! The differentiated entry ([`dsc_compiler::passes::autodiff`]) takes one cotangent per
//! loss term; [`Terms`] says how much of each the objective contains, so `dsc grad`
//! (main loss only), SFT (all terms the recipe enables) and later objectives share one
//! compiled module.

use crate::reference::{run, ExecError, Options, Precision, Tensor, Weights};
use dsc_compiler::ir::{Gradients, Mode, Module};
use dsc_compiler::lower::lower_mode;
use dsc_compiler::passes::autodiff::TrainOptions;
use dsc_compiler::passes::{self, PassCx, PassSelection};
use dsc_dsl::model::Ffn;
use dsc_dsl::Spec;
use std::collections::HashMap;

/// The weight of each loss term in the objective (the cotangents of the train entry's
/// first three results: main cross-entropy, MTP, balance losses).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Terms {
    pub main: f64,
    pub mtp: f64,
    pub aux: f64,
}

impl Terms {
    /// The main next-token loss alone (`dsc grad` without flags, the HF references).
    pub const MAIN: Terms = Terms { main: 1.0, mtp: 0.0, aux: 0.0 };
}

/// One batch's loss terms, gradients and expert loads.
#[derive(Debug, Clone)]
pub struct GradOutput {
    /// `loss`, `mtp_loss`, `aux_loss` as the entry computed them (unweighted by [`Terms`]).
    pub loss: f64,
    pub mtp_loss: f64,
    pub aux_loss: f64,
    /// `Σ terms · losses`: what the gradients are of.
    pub objective: f64,
    /// Gradient per IR param name (stacked experts); params without one are absent.
    pub grads: HashMap<String, Tensor>,
    /// Per MoE layer (main layers, then MTP modules): the layer index and the tokens sent
    /// to each expert.
    pub loads: Vec<(u32, Vec<f64>)>,
}

/// The train entry of a spec, differentiated.
#[derive(Debug, Clone)]
pub struct TrainModel {
    pub module: Module,
    pub gradients: Gradients,
    /// The layer index of each expert-load result, in result order.
    pub moe_layers: Vec<u32>,
}

impl TrainModel {
    /// Lowers `spec`'s train entry and runs the training pipeline with `opts`.
    pub fn compile(spec: &Spec, opts: TrainOptions, selection: &PassSelection) -> Result<TrainModel, String> {
        let mut module = lower_mode(spec, Mode::Train).map_err(|e| e.to_string())?;
        let mut cx = PassCx::new(Mode::Train);
        cx.train = opts;
        passes::compile(&mut module, selection, &mut cx).map_err(|e| e.to_string())?;
        let gradients = module.gradients.clone().ok_or("the training pipeline ran without autodiff (`--passes -autodiff`?)")?;
        let m = &spec.model;
        let is_moe = |f: &Ffn| matches!(f, Ffn::Moe(_));
        let mut moe_layers: Vec<u32> =
            (0..m.layers).filter(|&l| m.ffn.iter().any(|b| b.layers.contains(l) && is_moe(&b.kind))).map(|l| l as u32).collect();
        if let Some(mtp) = &m.mtp {
            if is_moe(&m.ffn[mtp.ffn].kind) {
                moe_layers.extend((0..mtp.depth).map(|k| (m.layers + k) as u32));
            }
        }
        let expected = 3 + moe_layers.len();
        if gradients.results != expected {
            return Err(format!(
                "the train entry returns {} results, expected {expected} (3 losses and one load per MoE layer)",
                gradients.results
            ));
        }
        Ok(TrainModel { module, gradients, moe_layers })
    }

    /// Runs the differentiated entry on one batch: `input_ids`, `positions`, `labels`
    /// (`i64 [b, s]`, labels unshifted with −100 for positions without a target).
    pub fn run(&self, weights: &dyn Weights, batch: [&Tensor; 3], terms: Terms, precision: Precision) -> Result<GradOutput, ExecError> {
        let mut args: Vec<Tensor> = batch.iter().map(|t| (*t).clone()).collect();
        let weight_of = [terms.main, terms.mtp, terms.aux];
        for &i in &self.gradients.seeds {
            let w = weight_of.get(i).copied().unwrap_or(0.0);
            args.push(match precision {
                Precision::F32 => Tensor::scalar(w as f32),
                Precision::F64 => Tensor::f64(&[], vec![w]),
            });
        }
        let opts = Options { precision, ..Options::default() };
        let mut outs = run(&self.module, Mode::Train, &args, weights, &opts)?.into_iter();
        let scalar = |t: Option<Tensor>| t.map(|t| t.get_flat(0)).unwrap_or(f64::NAN);
        let (loss, mtp_loss, aux_loss) = (scalar(outs.next()), scalar(outs.next()), scalar(outs.next()));
        let loads = self.moe_layers.iter().map(|&l| (l, outs.next().map(|t| t.to_f64_vec()).unwrap_or_default())).collect();
        let grads = self.gradients.params.iter().cloned().zip(outs).collect();
        let objective = terms.main * loss + terms.mtp * mtp_loss + terms.aux * aux_loss;
        Ok(GradOutput { loss, mtp_loss, aux_loss, objective, grads, loads })
    }
}

/// The checkpoint names, with shapes, an IR weight is stored under: a stacked
/// `…mlp.experts.{gate,up,down}_proj.weight` `[E, ..]` is `E` tensors
/// `…mlp.experts.{e}.{gate,up,down}_proj.weight`, as the hub stores experts; every other
/// IR param name already is the checkpoint's.
pub fn hub_names(name: &str, shape: &[usize]) -> Vec<(String, Vec<usize>)> {
    let stacked = ["gate_proj", "up_proj", "down_proj"].iter().find_map(|p| {
        let prefix = name.strip_suffix(&format!(".mlp.experts.{p}.weight"))?;
        Some((prefix.to_string(), *p))
    });
    match stacked {
        Some((prefix, proj)) if shape.len() == 3 => {
            (0..shape[0]).map(|e| (format!("{prefix}.mlp.experts.{e}.{proj}.weight"), shape[1..].to_vec())).collect()
        }
        _ => vec![(name.to_string(), shape.to_vec())],
    }
}

/// IR-named tensors under the checkpoint's names and layout ([`hub_names`]), in `f32`.
pub fn hub_tensors(tensors: HashMap<String, Tensor>) -> std::collections::BTreeMap<String, Tensor> {
    let mut out = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        let parts = hub_names(&name, t.shape());
        if parts.len() == 1 {
            out.insert(parts.into_iter().next().expect("one part").0, t);
            continue;
        }
        let v = t.to_f32_vec();
        let per = v.len() / parts.len();
        for (i, (hub, shape)) in parts.into_iter().enumerate() {
            out.insert(hub, Tensor::f32(&shape, v[i * per..(i + 1) * per].to_vec()));
        }
    }
    out
}
