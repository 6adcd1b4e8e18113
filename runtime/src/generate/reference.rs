//! Compiled models as [`Backend`]s: the spec lowered per mode, run through that mode's
//! pass pipeline (as `dsc compile` does), and executed by an [`Engine`]: the reference
//! interpreter on the CPU ([`Interpreter`], [`ReferenceBackend`]) or, with the `wgpu`
//! feature, the plan of GPU kernels on a wgpu device (`WgpuEngine`).
//!
//! A step picks one of a few compiled variants of its mode, built on first use and kept:
//! with or without the attention-mask argument (only padded batches need it) and with or
//! without the routers' decisions exposed ([`super::rewrite`]). Arguments go in the
//! entry's order: `input_ids`, `positions`, the decode caches, then `attention_mask`.

use super::backend::{Backend, BackendError, KvCache, LayerRouting, StepInput, StepOutput};
use super::rewrite::{add_attention_mask, expose_routing, RouteSite};
use crate::reference::{run, Options, Tensor, Weights};
use dsc_compiler::ir::Mode;
use dsc_compiler::ir::Module;
use dsc_compiler::lower::{lower_mode, lower_prefill, PrefillLogits};
use dsc_compiler::passes::mla_absorb::MlaMode;
use dsc_compiler::passes::{self, PassCx, PassSelection};
use dsc_dsl::Spec;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which compiled form of an entry point a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Variant {
    mode: Mode,
    masked: bool,
    capture: bool,
    /// Prefill with the last position's logits only.
    last: bool,
}

/// What executes a compiled entry point.
pub trait Engine: Send + Sync {
    /// What the engine derives once per compiled module (the reference interpreter needs
    /// nothing; a device runtime builds its launch plan).
    type Prepared: Send + Sync;
    /// `--backend`'s name for it.
    fn name(&self) -> &str;
    fn prepare(&self, module: &Module, mode: Mode) -> Result<Self::Prepared, String>;
    /// The weights may have changed in place (an optimizer step): an engine that keeps
    /// device copies drops them, so the next run uploads the new values.
    fn weights_changed(&self) {}
    /// Runs `mode`'s entry on host arguments and returns its results.
    fn run(
        &self,
        module: &Module,
        prepared: &Self::Prepared,
        mode: Mode,
        args: &[Tensor],
        weights: &dyn Weights,
    ) -> Result<Vec<Tensor>, String>;
}

/// The reference interpreter as an [`Engine`].
#[derive(Debug, Clone, Default)]
pub struct Interpreter {
    pub options: Options,
}

impl Engine for Interpreter {
    type Prepared = ();
    fn name(&self) -> &str {
        "reference"
    }
    fn prepare(&self, _: &Module, _: Mode) -> Result<(), String> {
        Ok(())
    }
    /// A first result (the logits) holding a NaN or an infinity is an error, never an
    /// output: the run is repeated with every value checked, and the error names the first
    /// node that made a non-finite value and its spec span.
    fn run(&self, module: &Module, _: &(), mode: Mode, args: &[Tensor], weights: &dyn Weights) -> Result<Vec<Tensor>, String> {
        let out = run(module, mode, args, weights, &self.options).map_err(|e| e.to_string())?;
        if out.first().is_some_and(|t| t.first_non_finite().is_some()) {
            let checked = Options { check_finite: true, ..self.options.clone() };
            return match run(module, mode, args, weights, &checked) {
                Err(e) => Err(format!("non-finite logits: {e}")),
                Ok(_) => Err("the logits hold a NaN or an infinity (no single node could be named)".into()),
            };
        }
        Ok(out)
    }
}

/// A compiled entry point and how to read its results.
struct Compiled<P> {
    module: Module,
    prepared: P,
    /// Results before any exposed routing: logits and two cache tensors per layer.
    results: usize,
    routes: Vec<RouteSite>,
}

/// How the entry points are compiled: as `dsc compile --passes .. --mla ..` would.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// Passes turned off or on (all on by default).
    pub passes: PassSelection,
    /// Absorbed or decompressed MLA, or the cost model's choice (default).
    pub mla: MlaMode,
}

/// Runs a spec's prefill and decode on engine `E` with weights `W`.
pub struct ModelBackend<W: Weights, E: Engine> {
    spec: Spec,
    weights: W,
    compile: CompileOptions,
    engine: E,
    compiled: Mutex<HashMap<Variant, Arc<Compiled<E::Prepared>>>>,
}

/// The reference interpreter's backend.
pub type ReferenceBackend<W> = ModelBackend<W, Interpreter>;

impl<W: Weights> ModelBackend<W, Interpreter> {
    /// A backend for `spec` compiled as `compile` says; `options` sets threads and
    /// precision of the interpreter.
    pub fn new(spec: Spec, weights: W, compile: CompileOptions, options: Options) -> ReferenceBackend<W> {
        ModelBackend::with_engine(spec, weights, compile, Interpreter { options })
    }
}

impl<W: Weights, E: Engine> ModelBackend<W, E> {
    /// A backend for `spec` compiled as `compile` says, run by `engine`.
    pub fn with_engine(spec: Spec, weights: W, compile: CompileOptions, engine: E) -> ModelBackend<W, E> {
        ModelBackend { spec, weights, compile, engine, compiled: Mutex::new(HashMap::new()) }
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    pub fn weights(&self) -> &W {
        &self.weights
    }

    /// The weights, to update in place (a trainer's optimizer step): the next step runs
    /// on them (the engine is told, so device copies are uploaded again).
    pub fn weights_mut(&mut self) -> &mut W {
        self.engine.weights_changed();
        &mut self.weights
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The module a step of `mode` runs (compiled now if it was not yet), for tools that
    /// want to see it.
    pub fn module(&self, mode: Mode, masked: bool) -> Result<dsc_compiler::ir::Module, BackendError> {
        Ok(self.compiled(Variant { mode, masked, capture: false, last: false })?.module.clone())
    }

    fn compiled(&self, v: Variant) -> Result<Arc<Compiled<E::Prepared>>, BackendError> {
        let mut cache = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&v) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.compile(v)?);
        cache.insert(v, c.clone());
        Ok(c)
    }

    fn compile(&self, v: Variant) -> Result<Compiled<E::Prepared>, BackendError> {
        let err = |e: String| BackendError::new(format!("compiling {}: {e}", v.mode));
        let lowered = match (v.mode, v.last) {
            (Mode::Prefill, true) => lower_prefill(&self.spec, PrefillLogits::Last),
            _ => lower_mode(&self.spec, v.mode),
        };
        let mut module = lowered.map_err(|e| err(e.to_string()))?;
        let mut cx = PassCx::new(v.mode);
        cx.mla = self.compile.mla;
        passes::compile(&mut module, &self.compile.passes, &mut cx).map_err(|e| err(e.render(Some(&self.spec.sources))))?;
        let results = module.entry(v.mode).and_then(|f| f.graph.return_node().map(|r| f.graph.inputs(r).len())).unwrap_or(0);
        if v.masked {
            add_attention_mask(&mut module, v.mode).map_err(err)?;
        }
        let routes = if v.capture { expose_routing(&mut module, v.mode).map_err(err)? } else { Vec::new() };
        let prepared = self.engine.prepare(&module, v.mode).map_err(err)?;
        Ok(Compiled { module, prepared, results, routes })
    }

    fn step(&self, mode: Mode, input: &StepInput, cache: Vec<Tensor>) -> Result<StepOutput, BackendError> {
        let (b, s) = (input.batch, input.seq);
        if input.ids.len() != b * s || input.positions.len() != b * s {
            return Err(BackendError::new(format!("{} ids and {} positions for a {b}×{s} step", input.ids.len(), input.positions.len())));
        }
        let c = cache_len(&cache);
        let last = mode == Mode::Prefill && input.last_logits;
        let v = Variant { mode, masked: input.mask.is_some(), capture: input.capture_routing, last };
        let compiled = self.compiled(v)?;
        let mut args = vec![Tensor::i64(&[b, s], input.ids.clone()), Tensor::i64(&[b, s], input.positions.clone())];
        args.extend(cache);
        if let Some(mask) = &input.mask {
            let sk = c + s;
            if mask.len() != b * s * sk {
                return Err(BackendError::new(format!("a mask of {} values for [{b}, {s}, {sk}]", mask.len())));
            }
            args.push(Tensor::f32(&[b, s, sk], mask.clone()));
        }
        let mut out = self.engine.run(&compiled.module, &compiled.prepared, mode, &args, &self.weights).map_err(BackendError::new)?;
        if out.len() != compiled.results + 2 * compiled.routes.len() || compiled.results == 0 {
            return Err(BackendError::new(format!("{mode} returned {} results", out.len())));
        }
        let routed = out.split_off(compiled.results);
        let mut it = out.into_iter();
        let logits = it.next().expect("checked").to_f32();
        // The interpreter names the node that made a NaN (above); a device engine cannot
        // cheaply, but its NaN logits are still an error, never printed or sampled from.
        if let Some((i, what)) = logits.first_non_finite() {
            return Err(BackendError::new(format!(
                "the logits hold {what} (element {i}) on the {} backend; `--backend reference` names the node that made it",
                self.engine.name()
            )));
        }
        let cache = KvCache { tensors: it.collect() };
        let routing = compiled
            .routes
            .iter()
            .zip(routed.chunks_exact(2))
            .map(|(&layer, pair)| LayerRouting { layer, indices: pair[0].clone(), weights: pair[1].to_f32() })
            .collect();
        Ok(StepOutput { logits, cache, routing })
    }
}

fn cache_len(cache: &[Tensor]) -> usize {
    cache.first().and_then(|t| t.shape().get(1).copied()).unwrap_or(0)
}

impl<W: Weights, E: Engine> Backend for ModelBackend<W, E> {
    fn name(&self) -> &str {
        self.engine.name()
    }

    fn vocab(&self) -> usize {
        self.spec.model.vocab as usize
    }

    fn prefill(&self, input: &StepInput) -> Result<StepOutput, BackendError> {
        self.step(Mode::Prefill, input, Vec::new())
    }

    fn decode(&self, input: &StepInput, cache: KvCache) -> Result<StepOutput, BackendError> {
        if input.seq != 1 {
            return Err(BackendError::new(format!("decode takes one token per sequence, not {}", input.seq)));
        }
        self.step(Mode::Decode, input, cache.tensors)
    }
}
