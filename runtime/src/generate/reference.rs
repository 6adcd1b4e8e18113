//! Compiled models as [`Backend`]s: the spec lowered per mode, run through that mode's
//! pass pipeline (as `dsc compile` does), and executed by an [`Engine`]: the reference
//! interpreter on the CPU ([`Interpreter`], [`ReferenceBackend`]) or, with the `wgpu`
//! feature, the plan of GPU kernels on a wgpu device (`WgpuEngine`).
//!
//! A step picks one of a few compiled variants of its mode, built on first use and kept:
//! with or without the attention-mask argument (only padded batches need it) and with or
//! without the routers' decisions exposed ([`super::rewrite`]). Arguments go in the
//! entry's order: `input_ids`, `positions`, the decode caches, then `attention_mask`.

use super::backend::{Backend, BackendError, CacheStore, KvCache, LayerRouting, SampleParams, Sampled, StepInput, StepOutput};
use super::rewrite::{add_attention_mask, expose_routing, RouteSite};
use crate::reference::elementwise::round_bf16;
use crate::reference::{run_prepared, run_prepared_args, Arg, Options, Prepared, Tensor, Weights};
use dsc_compiler::ir::Mode;
use dsc_compiler::ir::Module;
use dsc_compiler::lower::{lower_mode, lower_prefill, PrefillLogits};
use dsc_compiler::passes::mla_absorb::MlaMode;
use dsc_compiler::passes::{self, PassCx, PassSelection};
use dsc_dsl::Spec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// An argument or result of an [`Engine`] run: a host tensor, or a value the engine keeps
/// on its device between runs (a KV cache).
#[derive(Clone)]
pub enum Value<H> {
    Host(Tensor),
    Held(H),
}

impl<H> Value<H> {
    /// The host tensor, if this is one.
    pub fn into_host(self) -> Option<Tensor> {
        match self {
            Value::Host(t) => Some(t),
            Value::Held(_) => None,
        }
    }
}

/// What an engine knows of a value it keeps on its device.
pub trait HeldValue: Clone + Send + Sync + 'static {
    fn shape(&self) -> &[usize];
    /// Bytes it takes on the device.
    fn bytes(&self) -> u64;
}

/// The interpreter keeps nothing off the host.
impl HeldValue for std::convert::Infallible {
    fn shape(&self) -> &[usize] {
        match *self {}
    }
    fn bytes(&self) -> u64 {
        match *self {}
    }
}

/// What executes a compiled entry point.
pub trait Engine: Send + Sync {
    /// What the engine derives once per compiled module (the reference interpreter needs
    /// nothing; a device runtime builds its launch plan).
    type Prepared: Send + Sync;
    /// A result the engine keeps on its device (`Infallible` for the interpreter).
    type Held: HeldValue;
    /// `--backend`'s name for it.
    fn name(&self) -> &str;
    fn prepare(&self, module: &Module, mode: Mode) -> Result<Self::Prepared, String>;
    /// The weights may have changed in place (an optimizer step): an engine that keeps
    /// device copies drops them, so the next run uploads the new values.
    fn weights_changed(&self) {}
    /// Runs `mode`'s entry. Arguments are host tensors or values an earlier run of this
    /// engine kept; a device engine keeps the results whose `keep` flag is set on its
    /// device (missing flags are false), and an engine without a device returns them all
    /// on the host.
    fn run_values(
        &self,
        module: &Module,
        prepared: &Self::Prepared,
        mode: Mode,
        args: Vec<Value<Self::Held>>,
        keep: &[bool],
        weights: &dyn Weights,
    ) -> Result<Vec<Value<Self::Held>>, String>;
    /// What the engine has moved over the host link so far, when it has a device.
    fn counts(&self) -> Option<crate::plan_exec::Counts> {
        None
    }
    /// Whether [`Engine::sample`] works: the engine samples where its logits are.
    fn samples(&self) -> bool {
        false
    }
    /// The next token of each row of `logits` (a `[.., V]` result a run kept), its
    /// log-probability and the entropy.
    fn sample(&self, _logits: &Self::Held, _params: &SampleParams) -> Result<Sampled, String> {
        Err(format!("the {} engine does not sample on a device", self.name()))
    }
    /// Runs `mode`'s entry on host arguments and returns its results on the host.
    fn run(
        &self,
        module: &Module,
        prepared: &Self::Prepared,
        mode: Mode,
        args: &[Tensor],
        weights: &dyn Weights,
    ) -> Result<Vec<Tensor>, String> {
        let args = args.iter().map(|t| Value::Host(t.clone())).collect();
        let out = self.run_values(module, prepared, mode, args, &[], weights)?;
        out.into_iter().map(|v| v.into_host().ok_or_else(|| format!("{} kept a result it was not asked to keep", self.name()))).collect()
    }
}

/// The reference interpreter as an [`Engine`].
#[derive(Debug, Clone, Default)]
pub struct Interpreter {
    pub options: Options,
    /// Shared by the modules it prepares; bumped when the weights change in place, so
    /// their kept weight-derived values are computed again ([`Prepared`]).
    weights_epoch: Arc<AtomicU64>,
}

impl Interpreter {
    pub fn new(options: Options) -> Interpreter {
        Interpreter { options, weights_epoch: Arc::default() }
    }
}

impl Engine for Interpreter {
    /// Verified once, evaluation orders kept.
    type Prepared = Prepared;
    type Held = std::convert::Infallible;
    fn name(&self) -> &str {
        "reference"
    }
    fn prepare(&self, module: &Module, _: Mode) -> Result<Prepared, String> {
        Prepared::sharing_epoch(module, &self.options, self.weights_epoch.clone()).map_err(|e| e.to_string())
    }
    fn weights_changed(&self) {
        self.weights_epoch.fetch_add(1, Ordering::AcqRel);
    }
    /// A first result (the logits) holding a NaN or an infinity is an error, never an
    /// output: the run is repeated with every value checked, and the error names the first
    /// node that made a non-finite value and its spec span.
    ///
    /// A decode step's KV caches (arguments whose first axis counts the cached positions)
    /// are given to the run, which appends to them in place instead of copying them; for
    /// the repeat, each is the start of the matching cache result (`cache_of`'s order:
    /// the same as the arguments').
    fn run_values(
        &self,
        module: &Module,
        prepared: &Prepared,
        mode: Mode,
        args: Vec<Value<Self::Held>>,
        keep: &[bool],
        weights: &dyn Weights,
    ) -> Result<Vec<Value<Self::Held>>, String> {
        let args: Vec<Tensor> = args
            .into_iter()
            .map(|v| match v {
                Value::Host(t) => t,
                Value::Held(h) => match h {},
            })
            .collect();
        let given = cache_arguments(module, mode, args.len());
        let shapes: Vec<Vec<usize>> = args.iter().map(|t| t.shape().to_vec()).collect();
        let (mut lent, mut run_args) = (Vec::new(), Vec::with_capacity(args.len()));
        for (t, &g) in args.into_iter().zip(&given) {
            if g {
                run_args.push(Some(t));
            } else {
                lent.push(t);
                run_args.push(None);
            }
        }
        let mut lent_it = lent.iter();
        let call: Vec<Arg<'_>> =
            run_args.into_iter().map(|a| a.map_or_else(|| Arg::Lent(lent_it.next().expect("one per lent argument")), Arg::Given)).collect();
        let out = run_prepared_args(module, prepared, mode, call, weights, &self.options).map_err(|e| e.to_string())?;
        if out.first().is_some_and(|t| t.first_non_finite().is_some()) {
            let checked = Options { check_finite: true, ..self.options.clone() };
            let mut caches = out[1..].iter();
            let mut lent_it = lent.iter();
            let again: Option<Vec<Tensor>> = given
                .iter()
                .zip(&shapes)
                .map(|(&g, shape)| if g { caches.next().and_then(|c| c.leading(shape)) } else { lent_it.next().cloned() })
                .collect();
            let Some(again) = again else {
                return Err("the logits hold a NaN or an infinity (the step's caches could not be rebuilt to name the node)".into());
            };
            return match run_prepared(module, prepared, mode, &again, weights, &checked) {
                Err(e) => Err(format!("non-finite logits: {e}")),
                Ok(_) => Err("the logits hold a NaN or an infinity (no single node could be named)".into()),
            };
        }
        // The results a device engine would keep (the KV cache) are held in bf16 when asked:
        // rounded once when a prompt pass makes them, appended to in bf16 after that.
        let out = out.into_iter().enumerate().map(|(i, t)| match (self.options.bf16_cache && keep.get(i) == Some(&true), i) {
            (true, 1..) => round_bf16::<f32>(&t).unwrap_or(t),
            _ => t,
        });
        Ok(out.map(Value::Host).collect())
    }
}

/// Which arguments of `mode`'s entry are KV caches: declared with the cached positions
/// (`c`) in their first axis.
fn cache_arguments(module: &Module, mode: Mode, n: usize) -> Vec<bool> {
    let mut given = vec![false; n];
    if let Some(f) = module.entry(mode) {
        for a in f.graph.arguments() {
            let node = f.graph.node(a);
            if let (dsc_compiler::ir::Op::Input { index, .. }, Some(ty)) = (&node.op, node.outputs.first()) {
                if let (Some(g), Some(d)) = (given.get_mut(*index as usize), ty.shape.first()) {
                    *g = d.coeff(dsc_compiler::ir::Sym::Cache) != 0;
                }
            }
        }
    }
    given
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
        ModelBackend::with_engine(spec, weights, compile, Interpreter::new(options))
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

    /// The engine and the host copy of the weights, to update the copy from a device
    /// that holds the current weights without telling the engine (which would drop them).
    pub fn engine_and_host_weights(&mut self) -> (&E, &mut W) {
        (&self.engine, &mut self.weights)
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

    fn step(&self, mode: Mode, input: &StepInput, cache: Option<KvCache>) -> Result<StepOutput, BackendError> {
        let (b, s) = (input.batch, input.seq);
        if input.ids.len() != b * s || input.positions.len() != b * s {
            return Err(BackendError::new(format!("{} ids and {} positions for a {b}×{s} step", input.ids.len(), input.positions.len())));
        }
        let c = cache.as_ref().map_or(0, KvCache::len);
        let last = mode == Mode::Prefill && input.last_logits;
        let v = Variant { mode, masked: input.mask.is_some(), capture: input.capture_routing, last };
        let compiled = self.compiled(v)?;
        let mut args: Vec<Value<E::Held>> =
            vec![Value::Host(Tensor::i64(&[b, s], input.ids.clone())), Value::Host(Tensor::i64(&[b, s], input.positions.clone()))];
        if let Some(cache) = cache {
            args.extend(self.cache_args(cache)?);
        }
        if let Some(mask) = &input.mask {
            let sk = c + s;
            if mask.len() != b * s * sk {
                return Err(BackendError::new(format!("a mask of {} values for [{b}, {s}, {sk}]", mask.len())));
            }
            args.push(Value::Host(Tensor::f32(&[b, s, sk], mask.clone())));
        }
        // The logits and the routers' decisions come to the host; the cache stays where
        // the engine computed it. An engine that samples keeps the logits too.
        let sample = input.sample.filter(|_| self.engine.samples() && (mode == Mode::Decode || last));
        let keep: Vec<bool> = (0..compiled.results).map(|i| i > 0 || sample.is_some()).collect();
        let mut out =
            self.engine.run_values(&compiled.module, &compiled.prepared, mode, args, &keep, &self.weights).map_err(BackendError::new)?;
        if out.len() != compiled.results + 2 * compiled.routes.len() || compiled.results == 0 {
            return Err(BackendError::new(format!("{mode} returned {} results", out.len())));
        }
        let host = |v: Value<E::Held>| v.into_host().ok_or_else(|| BackendError::new("a result expected on the host stayed on the device"));
        let routed = out.split_off(compiled.results).into_iter().map(host).collect::<Result<Vec<_>, _>>()?;
        let mut it = out.into_iter();
        let non_finite = |what: &str| {
            BackendError::new(format!(
                "the logits hold {what} on the {} backend; `--backend reference` names the node that made it",
                self.engine.name()
            ))
        };
        let (logits, sampled) = match (it.next().expect("checked"), sample) {
            (Value::Held(h), Some(params)) => {
                let sampled = self.engine.sample(&h, &params).map_err(BackendError::new)?;
                // A NaN or +∞ logit makes its row's log-sum-exp NaN: an error, as below.
                if let Some(i) = sampled.logprobs.iter().position(|p| !p.is_finite()) {
                    return Err(non_finite(&format!("a NaN or an infinity (row {i})")));
                }
                (Tensor::zeros(&[b, 1, 0]), Some(sampled))
            }
            (v, _) => (host(v)?.to_f32(), None),
        };
        // The interpreter names the node that made a NaN (above); a device engine cannot
        // cheaply, but its NaN logits are still an error, never printed or sampled from.
        if let Some((i, what)) = logits.first_non_finite() {
            return Err(non_finite(&format!("{what} (element {i})")));
        }
        let cache = cache_of::<E::Held>(it.collect())?;
        let routing = compiled
            .routes
            .iter()
            .zip(routed.chunks_exact(2))
            .map(|(&layer, pair)| LayerRouting { layer, indices: pair[0].clone(), weights: pair[1].to_f32() })
            .collect();
        Ok(StepOutput { logits, sampled, cache, routing })
    }

    /// A cache as the engine's arguments: host tensors as they are, device values only if
    /// this engine made them.
    fn cache_args(&self, cache: KvCache) -> Result<Vec<Value<E::Held>>, BackendError> {
        match cache.into_store() {
            CacheStore::Host(t) => Ok(t.into_iter().map(Value::Host).collect()),
            CacheStore::Device(any) => match any.downcast::<Vec<E::Held>>() {
                Ok(held) => Ok(held.iter().cloned().map(Value::Held).collect()),
                Err(_) => Err(BackendError::new(format!("the KV cache lives on another device than the {} backend's", self.engine.name()))),
            },
        }
    }
}

/// The cache results of a step: all on the host, or all kept on the device.
fn cache_of<H: HeldValue>(values: Vec<Value<H>>) -> Result<KvCache, BackendError> {
    if values.iter().all(|v| matches!(v, Value::Host(_))) {
        return Ok(KvCache::host(values.into_iter().filter_map(Value::into_host).collect()));
    }
    let held: Vec<H> = values
        .into_iter()
        .map(|v| match v {
            Value::Held(h) => Ok(h),
            Value::Host(_) => Err(BackendError::new("part of the KV cache came back to the host")),
        })
        .collect::<Result<_, _>>()?;
    let shapes = held.iter().map(|h| h.shape().to_vec()).collect();
    let bytes = held.iter().map(HeldValue::bytes).sum();
    Ok(KvCache::on_device(shapes, bytes, Arc::new(held)))
}

impl<W: Weights, E: Engine> Backend for ModelBackend<W, E> {
    fn name(&self) -> &str {
        self.engine.name()
    }

    fn counts(&self) -> Option<crate::plan_exec::Counts> {
        self.engine.counts()
    }

    fn vocab(&self) -> usize {
        self.spec.model.vocab as usize
    }

    fn prefill(&self, input: &StepInput) -> Result<StepOutput, BackendError> {
        self.step(Mode::Prefill, input, None)
    }

    fn decode(&self, input: &StepInput, cache: KvCache) -> Result<StepOutput, BackendError> {
        if input.seq != 1 {
            return Err(BackendError::new(format!("decode takes one token per sequence, not {}", input.seq)));
        }
        self.step(Mode::Decode, input, Some(cache))
    }
}
