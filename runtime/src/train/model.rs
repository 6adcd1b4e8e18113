//! A model compiled for training: the spec's train entry through the training pipeline
//! (autodiff included), and one call that runs it on a batch and returns the loss terms,
//! every gradient and the MoE layers' expert loads.
//!
//! The differentiated entry ([`dsc_compiler::passes::autodiff`]) takes one cotangent per
//! loss term; [`Terms`] says how much of each the objective contains, so `dsc grad`
//! (main loss only) and SFT (all terms the recipe enables) share one compiled module.
//! A policy model ([`TrainHead::LogProbs`], GRPO) returns per-token log-probabilities
//! instead of the loss and takes their cotangent, the objective's gradient with respect
//! to them, as a tensor ([`TrainModel::run_policy`]).

use crate::generate::rewrite::replay_routing;
use crate::generate::Engine;
use crate::reference::{run, ErrorKind, ExecError, Options, Precision, Tensor, Weights};
use dsc_compiler::ir::{Gradients, Mode, Module};
use dsc_compiler::lower::lower_train;
pub use dsc_compiler::lower::TrainHead;
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

    /// The three cotangents a device engine takes (`f32` scalars).
    fn cotangents_f32(self) -> [Tensor; 3] {
        [self.main, self.mtp, self.aux].map(|w| Tensor::scalar(w as f32))
    }
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

/// Gradients an engine kept on its device, by IR param name.
pub type HeldGrads<H> = Vec<(String, H)>;

/// The train entry of a spec, differentiated.
#[derive(Debug, Clone)]
pub struct TrainModel {
    pub module: Module,
    pub gradients: Gradients,
    /// The layer index of each expert-load result, in result order.
    pub moe_layers: Vec<u32>,
    pub head: TrainHead,
    /// The same entry through the pipeline without autodiff, for [`TrainModel::log_probs`]
    /// (built for [`TrainHead::LogProbs`] only).
    pub forward: Option<Module>,
    /// The layer of each replayed router's argument, in argument order (empty without
    /// routing replay).
    pub replayed: Vec<u32>,
}

/// One policy batch's per-token log-probabilities, gradients and expert loads.
#[derive(Debug, Clone)]
pub struct PolicyOutput {
    /// `[b, s-1]`: `logp[i, t]` is the log-probability of `labels[i, t+1]` (0 where it is
    /// ignored), at the model's temperature.
    pub logp: Tensor,
    pub mtp_loss: f64,
    pub aux_loss: f64,
    /// The gradient of `Σ dlogp·logp + mtp·mtp_loss + aux·aux_loss` per IR param name.
    pub grads: HashMap<String, Tensor>,
    pub loads: Vec<(u32, Vec<f64>)>,
}

impl TrainModel {
    /// Lowers `spec`'s train entry and runs the training pipeline with `opts`.
    pub fn compile(spec: &Spec, opts: TrainOptions, selection: &PassSelection) -> Result<TrainModel, String> {
        TrainModel::compile_head(spec, TrainHead::Loss, opts, selection)
    }

    /// As [`TrainModel::compile`], with `head` as the entry's first result.
    pub fn compile_head(spec: &Spec, head: TrainHead, opts: TrainOptions, selection: &PassSelection) -> Result<TrainModel, String> {
        TrainModel::compile_with(spec, head, opts, selection, false)
    }

    /// As [`TrainModel::compile_head`]; with `replay`, the main layers' routers take the
    /// experts to use as arguments (verl's routing replay, R3: [`replay_routing`]), one
    /// `i32 [b, s, top_k]` per router after the batch, in layer order
    /// ([`TrainModel::replayed`]); MTP routers still choose.
    pub fn compile_with(
        spec: &Spec,
        head: TrainHead,
        opts: TrainOptions,
        selection: &PassSelection,
        replay: bool,
    ) -> Result<TrainModel, String> {
        let mut lowered = lower_train(spec, head).map_err(|e| e.to_string())?;
        let layers = spec.model.layers;
        let replayed = if replay {
            replay_routing(&mut lowered, Mode::Train, |l| l.is_some_and(|l| u64::from(l) < layers))?
                .into_iter()
                .map(|l| l.expect("main-layer routers have a layer"))
                .collect()
        } else {
            Vec::new()
        };
        let mut module = lowered.clone();
        let mut cx = PassCx::new(Mode::Train);
        cx.train = opts;
        passes::compile(&mut module, selection, &mut cx).map_err(|e| e.to_string())?;
        let forward = match head {
            TrainHead::Loss => None,
            TrainHead::LogProbs { .. } => {
                let mut f = lowered;
                let mut sel = selection.clone();
                sel.disable("autodiff").map_err(|e| e.to_string())?;
                passes::compile(&mut f, &sel, &mut PassCx::new(Mode::Train)).map_err(|e| e.to_string())?;
                Some(f)
            }
        };
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
        Ok(TrainModel { module, gradients, moe_layers, head, forward, replayed })
    }

    /// Runs the differentiated entry on one batch: `input_ids`, `positions`, `labels`
    /// (`i64 [b, s]`, labels unshifted with −100 for positions without a target).
    pub fn run(&self, weights: &dyn Weights, batch: [&Tensor; 3], terms: Terms, precision: Precision) -> Result<GradOutput, ExecError> {
        let scalar = |w: f64| match precision {
            Precision::F32 => Tensor::scalar(w as f32),
            Precision::F64 => Tensor::f64(&[], vec![w]),
        };
        let raw = self.run_raw(weights, &batch, [scalar(terms.main), scalar(terms.mtp), scalar(terms.aux)], precision)?;
        Ok(raw.grad_output(terms))
    }

    /// The per-token log-probabilities `[b, s-1]` of a [`TrainHead::LogProbs`] model on
    /// `batch` (as [`TrainModel::run_policy`]'s), without gradients.
    pub fn log_probs(&self, weights: &dyn Weights, batch: &[&Tensor], precision: Precision) -> Result<Tensor, ExecError> {
        let Some(f) = &self.forward else {
            return Err(ExecError::new(ErrorKind::Entry, "log_probs needs a model compiled with TrainHead::LogProbs"));
        };
        let args: Vec<Tensor> = batch.iter().map(|t| (*t).clone()).collect();
        let opts = Options { precision, ..Options::default() };
        let first = run(f, Mode::Train, &args, weights, &opts)?.into_iter().next();
        first.ok_or_else(|| ExecError::new(ErrorKind::Entry, "the train entry returned nothing"))
    }

    /// Runs a [`TrainHead::LogProbs`] model on one batch with `dlogp` (`[b, s-1]`, the
    /// objective's gradient with respect to `logp`) as the cotangent of the
    /// log-probabilities and `mtp`, `aux` as the weights of the other two terms. `batch`
    /// is `input_ids`, `positions`, `labels`, then any inputs a rewrite added (replayed
    /// routing).
    pub fn run_policy(
        &self,
        weights: &dyn Weights,
        batch: &[&Tensor],
        dlogp: &Tensor,
        mtp: f64,
        aux: f64,
        precision: Precision,
    ) -> Result<PolicyOutput, ExecError> {
        let scalar = |w: f64| match precision {
            Precision::F32 => Tensor::scalar(w as f32),
            Precision::F64 => Tensor::f64(&[], vec![w]),
        };
        let d = match precision {
            Precision::F32 => dlogp.to_f32(),
            Precision::F64 => Tensor::f64(dlogp.shape(), dlogp.to_f64_vec()),
        };
        let raw = self.run_raw(weights, batch, [d, scalar(mtp), scalar(aux)], precision)?;
        Ok(raw.policy_output())
    }

    /// [`TrainModel::run`] on a device engine, in f32: `prepared` is
    /// `engine.prepare(&self.module, Mode::Train)` (a launch plan), made once and reused
    /// for every batch. The wgpu and CUDA engines run the same train graph as the
    /// reference interpreter, kernel by kernel.
    pub fn run_on<E: Engine>(
        &self,
        engine: &E,
        prepared: &E::Prepared,
        weights: &dyn Weights,
        batch: [&Tensor; 3],
        terms: Terms,
    ) -> Result<GradOutput, String> {
        let cot = terms.cotangents_f32();
        let outs = engine.run(&self.module, prepared, Mode::Train, &self.args(&batch, cot), weights)?;
        let raw = self.raw(outs);
        Ok(raw.grad_output(terms))
    }

    /// [`TrainModel::run_on`] with the gradients left on the engine's device: they come
    /// back by IR param name, and [`GradOutput::grads`] is empty. A device optimizer
    /// reads them there (`super::device`).
    pub fn run_on_held<E: Engine>(
        &self,
        engine: &E,
        prepared: &E::Prepared,
        weights: &dyn Weights,
        batch: [&Tensor; 3],
        terms: Terms,
    ) -> Result<(GradOutput, HeldGrads<E::Held>), String> {
        let cot = terms.cotangents_f32();
        let (raw, grads) = self.run_held(engine, prepared, weights, &batch, cot)?;
        Ok((raw.grad_output(terms), grads))
    }

    /// [`TrainModel::run_policy`] on a device engine (f32), `prepared` as for
    /// [`TrainModel::run_on`], with the gradients left on the engine's device
    /// ([`PolicyOutput::grads`] is empty).
    #[allow(clippy::too_many_arguments)]
    pub fn run_policy_on_held<E: Engine>(
        &self,
        engine: &E,
        prepared: &E::Prepared,
        weights: &dyn Weights,
        batch: &[&Tensor],
        dlogp: &Tensor,
        mtp: f64,
        aux: f64,
    ) -> Result<(PolicyOutput, HeldGrads<E::Held>), String> {
        let cot = [dlogp.to_f32(), Tensor::scalar(mtp as f32), Tensor::scalar(aux as f32)];
        let (raw, grads) = self.run_held(engine, prepared, weights, batch, cot)?;
        Ok((raw.policy_output(), grads))
    }

    /// The entry on `batch` with the gradients kept on the engine's device (the rest, and
    /// an empty gradient map, in the [`Raw`]).
    fn run_held<E: Engine>(
        &self,
        engine: &E,
        prepared: &E::Prepared,
        weights: &dyn Weights,
        batch: &[&Tensor],
        cot: [Tensor; 3],
    ) -> Result<(Raw, HeldGrads<E::Held>), String> {
        use crate::generate::Value;
        let args = self.args(batch, cot).into_iter().map(Value::Host).collect();
        let head = 3 + self.moe_layers.len();
        let keep: Vec<bool> = (0..head + self.gradients.params.len()).map(|i| i >= head).collect();
        let mut outs = engine.run_values(&self.module, prepared, Mode::Train, args, &keep, weights)?;
        let held = outs.split_off(head.min(outs.len()));
        let host: Vec<Tensor> =
            outs.into_iter().map(|v| v.into_host().ok_or("a loss came back on the device")).collect::<Result<_, _>>()?;
        let grads = self
            .gradients
            .params
            .iter()
            .cloned()
            .zip(held)
            .map(|(n, v)| match v {
                Value::Held(h) => Ok((n, h)),
                Value::Host(_) => Err(format!("the gradient of `{n}` came back to the host")),
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((self.raw(host), grads))
    }

    /// [`TrainModel::log_probs`] on a device engine: `prepared` is
    /// `engine.prepare(forward, Mode::Train)` for [`TrainModel::forward`].
    pub fn log_probs_on<E: Engine>(
        &self,
        engine: &E,
        prepared: &E::Prepared,
        weights: &dyn Weights,
        batch: &[&Tensor],
    ) -> Result<Tensor, String> {
        let f = self.forward.as_ref().ok_or("log_probs needs a model compiled with TrainHead::LogProbs")?;
        let args: Vec<Tensor> = batch.iter().map(|t| (*t).clone()).collect();
        engine
            .run(f, prepared, Mode::Train, &args, weights)?
            .into_iter()
            .next()
            .ok_or_else(|| "the train entry returned nothing".to_string())
    }

    /// The entry's arguments: `batch`, then one cotangent per seeded result.
    fn args(&self, batch: &[&Tensor], cot: [Tensor; 3]) -> Vec<Tensor> {
        let mut args: Vec<Tensor> = batch.iter().map(|t| (*t).clone()).collect();
        let mut cot = cot.map(Some);
        for &i in &self.gradients.seeds {
            args.push(cot.get_mut(i).and_then(Option::take).unwrap_or_else(|| Tensor::scalar(0.0)));
        }
        args
    }

    /// The entry on `batch` with one cotangent per seeded result.
    fn run_raw(&self, weights: &dyn Weights, batch: &[&Tensor], cot: [Tensor; 3], precision: Precision) -> Result<Raw, ExecError> {
        let opts = Options { precision, ..Options::default() };
        Ok(self.raw(run(&self.module, Mode::Train, &self.args(batch, cot), weights, &opts)?))
    }

    /// The entry's results, named: the first, the two other losses, the loads, the
    /// gradients.
    fn raw(&self, outs: Vec<Tensor>) -> Raw {
        let mut outs = outs.into_iter();
        let first = outs.next().unwrap_or_else(|| Tensor::scalar(f32::NAN));
        let scalar = |t: Option<Tensor>| t.map(|t| t.get_flat(0)).unwrap_or(f64::NAN);
        let (mtp_loss, aux_loss) = (scalar(outs.next()), scalar(outs.next()));
        let loads = self.moe_layers.iter().map(|&l| (l, outs.next().map(|t| t.to_f64_vec()).unwrap_or_default())).collect();
        let grads = self.gradients.params.iter().cloned().zip(outs).collect();
        Raw { first, mtp_loss, aux_loss, grads, loads }
    }
}

/// The entry's results, the first as it came.
struct Raw {
    first: Tensor,
    mtp_loss: f64,
    aux_loss: f64,
    grads: HashMap<String, Tensor>,
    loads: Vec<(u32, Vec<f64>)>,
}

impl Raw {
    /// A loss model's results: the losses, and the objective `terms` weighs them into.
    fn grad_output(self, terms: Terms) -> GradOutput {
        let loss = self.first.get_flat(0);
        let objective = terms.main * loss + terms.mtp * self.mtp_loss + terms.aux * self.aux_loss;
        GradOutput { loss, mtp_loss: self.mtp_loss, aux_loss: self.aux_loss, objective, grads: self.grads, loads: self.loads }
    }

    /// A policy model's results: the log-probabilities first.
    fn policy_output(self) -> PolicyOutput {
        PolicyOutput { logp: self.first, mtp_loss: self.mtp_loss, aux_loss: self.aux_loss, grads: self.grads, loads: self.loads }
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
