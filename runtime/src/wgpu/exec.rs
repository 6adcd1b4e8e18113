//! Executes a [`Plan`] on the wgpu device: the launches `dsc compile` writes into
//! `plan.json`, in order, on device-resident buffers.
//!
//! Arguments come from the host and results go back to it; everything between stays on
//! the device. Weights are uploaded on first use and kept, under their checkpoint names
//! (`param_path(layer, name)`), so a layer body planned once binds each layer's weights
//! at its call. Buffers the plan marks as released after a step are dropped there, which
//! hands their memory back to CubeCL's pool for the next allocation.

use super::{DeviceBuf, Repr, WgpuBackend};
use crate::reference::{Tensor, Weights};
use dsc_compiler::codegen::launch::NodeWork;
use dsc_compiler::codegen::plan::{FunctionPlan, Plan, Source, Step};
use dsc_compiler::ir::{param_path, Bindings, DType, Dim, Sym};
use std::collections::HashMap;
use std::sync::Mutex;

/// Device copies of weights and constants, kept between runs.
#[derive(Default)]
pub struct DeviceWeights {
    bufs: Mutex<HashMap<(String, Repr), DeviceBuf>>,
}

impl DeviceWeights {
    pub fn new() -> DeviceWeights {
        DeviceWeights::default()
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).values().map(|b| b.len * b.repr.bytes()).sum()
    }
}

impl WgpuBackend {
    /// Runs the plan's entry on host `args` (in the entry's argument order) with `weights`
    /// and returns its results as host tensors (`f32` for floats, `i32` for integers).
    pub fn run_plan(&self, plan: &Plan, args: &[Tensor], weights: &dyn Weights, cache: &DeviceWeights) -> Result<Vec<Tensor>, String> {
        let entry = plan.functions.get(&plan.entry).ok_or_else(|| format!("the plan has no function `{}`", plan.entry))?;
        if args.len() != entry.inputs.len() {
            return Err(format!("{} arguments for `{}`, which takes {}", args.len(), plan.entry, entry.inputs.len()));
        }
        let bind = bindings(entry, args)?;
        let dev: Vec<DeviceBuf> =
            args.iter().zip(&entry.inputs).map(|(t, &b)| self.upload(t, Repr::of(entry.buffers[b].dtype)?)).collect::<Result<_, String>>()?;
        let run = Run { backend: self, plan, weights, cache, bind };
        let results = run.function(entry, dev, None)?;
        Ok(results
            .iter()
            .zip(&entry.results)
            .map(|(d, &b)| {
                let shape: Vec<usize> = entry.buffers[b].shape.eval(&bind).into_iter().map(|v| v as usize).collect();
                self.download(d, &shape)
            })
            .collect())
    }

    /// An uninitialised buffer of `len` elements (plan execution writes every element of
    /// every buffer it allocates; the kernel tests poison theirs instead).
    pub fn empty(&self, len: usize, repr: Repr) -> DeviceBuf {
        DeviceBuf { handle: self.client.empty((len.max(1)) * repr.bytes()), len, repr }
    }
}

/// The run-time sizes, read off the arguments: a dim that is exactly `b`, `c` or `s`
/// binds it; every argument must then match its declared shape. A size no argument
/// shows is 0 (the cache length of a prefill).
fn bindings(f: &FunctionPlan, args: &[Tensor]) -> Result<Bindings, String> {
    let mut sizes: [Option<u64>; 3] = [None; 3];
    for (t, &b) in args.iter().zip(&f.inputs) {
        let decl = &f.buffers[b].shape;
        if decl.rank() != t.rank() {
            return Err(format!("argument {} has shape {:?}, declared {}", name_of(f, b), t.shape(), shape_text(&decl.0)));
        }
        for (d, &n) in decl.0.iter().zip(t.shape()) {
            for s in Sym::ALL {
                if *d == sym_dim(s) {
                    match sizes[s as usize] {
                        Some(v) if v != n as u64 => {
                            return Err(format!("argument {} sets {} = {n}, another set it to {v}", name_of(f, b), s.letter()))
                        }
                        _ => sizes[s as usize] = Some(n as u64),
                    }
                }
            }
        }
    }
    let bind = Bindings { batch: sizes[0].unwrap_or(0), cache: sizes[1].unwrap_or(0), seq: sizes[2].unwrap_or(0) };
    for (t, &b) in args.iter().zip(&f.inputs) {
        let want: Vec<usize> = f.buffers[b].shape.eval(&bind).into_iter().map(|v| v as usize).collect();
        if want != t.shape() {
            return Err(format!("argument {} has shape {:?}, expected {want:?} ({})", name_of(f, b), t.shape(), shape_text(&f.buffers[b].shape.0)));
        }
    }
    Ok(bind)
}

fn sym_dim(s: Sym) -> Dim {
    match s {
        Sym::Batch => Dim::B,
        Sym::Cache => Dim::C,
        Sym::Seq => Dim::S,
    }
}

fn name_of(f: &FunctionPlan, b: usize) -> String {
    match &f.buffers[b].source {
        Source::Input { name, .. } => format!("`{name}`"),
        _ => format!("#{b}"),
    }
}

fn shape_text(d: &[Dim]) -> String {
    format!("[{}]", d.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

struct Run<'a> {
    backend: &'a WgpuBackend,
    plan: &'a Plan,
    weights: &'a dyn Weights,
    cache: &'a DeviceWeights,
    bind: Bindings,
}

impl Run<'_> {
    fn function(&self, f: &FunctionPlan, args: Vec<DeviceBuf>, layer: Option<u32>) -> Result<Vec<DeviceBuf>, String> {
        let mut env: Vec<Option<DeviceBuf>> = vec![None; f.buffers.len()];
        for (a, &b) in args.into_iter().zip(&f.inputs) {
            env[b] = Some(a);
        }
        for (i, buf) in f.buffers.iter().enumerate() {
            match &buf.source {
                Source::Param { name } => env[i] = Some(self.weight(&param_path(layer, name), buf.dtype)?),
                Source::Const { value } => env[i] = Some(self.constant(*value, buf.dtype)?),
                _ => {}
            }
        }
        let get = |env: &[Option<DeviceBuf>], b: usize| env[b].clone().ok_or_else(|| format!("{}: buffer #{b} read before it is written", f.name));
        for (step, release) in f.steps.iter().zip(&f.release) {
            match step {
                Step::Node { label, inputs, outputs, work } => {
                    let ins: Vec<DeviceBuf> = inputs.iter().map(|&b| get(&env, b)).collect::<Result<_, _>>()?;
                    let outs: Vec<DeviceBuf> = match work {
                        NodeWork::Alias(k) => vec![ins[*k as usize].clone()],
                        NodeWork::Launches { .. } => outputs
                            .iter()
                            .map(|&b| {
                                let len = f.buffers[b].len().eval(&self.bind);
                                Ok(self.backend.empty(len as usize, Repr::of(f.buffers[b].dtype)?))
                            })
                            .collect::<Result<_, String>>()?,
                    };
                    self.backend.execute(work, &ins, &outs, &self.bind).map_err(|e| format!("{}: {label}: {e}", f.name))?;
                    for (o, &b) in outs.into_iter().zip(outputs) {
                        env[b] = Some(o);
                    }
                }
                Step::Call { function, layer, args, results } => {
                    let callee = self.plan.functions.get(function).ok_or_else(|| format!("{}: calls `{function}`, not in the plan", f.name))?;
                    let a: Vec<DeviceBuf> = args.iter().map(|&b| get(&env, b)).collect::<Result<_, _>>()?;
                    let r = self.function(callee, a, *layer)?;
                    for (o, &b) in r.into_iter().zip(results) {
                        env[b] = Some(o);
                    }
                }
            }
            for &b in release {
                env[b] = None;
            }
        }
        f.results.iter().map(|&b| get(&env, b)).collect()
    }

    fn weight(&self, name: &str, dtype: DType) -> Result<DeviceBuf, String> {
        let repr = Repr::of(dtype)?;
        let key = (name.to_string(), repr);
        if let Some(b) = self.cache.bufs.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(b.clone());
        }
        let t = self.weights.get(name).ok_or_else(|| format!("no weight `{name}`"))?;
        let b = self.backend.upload(t, repr)?;
        self.cache.bufs.lock().unwrap_or_else(|e| e.into_inner()).insert(key, b.clone());
        Ok(b)
    }

    fn constant(&self, value: f64, dtype: DType) -> Result<DeviceBuf, String> {
        let repr = Repr::of(dtype)?;
        let key = (format!("const:{:016x}", value.to_bits()), repr);
        if let Some(b) = self.cache.bufs.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(b.clone());
        }
        let t = match repr {
            Repr::I32 => Tensor::i32(&[], vec![value as i32]),
            _ => Tensor::f32(&[], vec![value as f32]),
        };
        let b = self.backend.upload(&t, repr)?;
        self.cache.bufs.lock().unwrap_or_else(|e| e.into_inner()).insert(key, b.clone());
        Ok(b)
    }
}

/// The wgpu device as a generation engine: each compiled entry point becomes a [`Plan`]
/// (the `plan.json` of `dsc compile --target wgpu`) and runs with [`WgpuBackend::run_plan`].
pub struct WgpuEngine {
    backend: WgpuBackend,
    weights: DeviceWeights,
}

impl WgpuEngine {
    /// The default adapter (see [`WgpuBackend::new`]).
    pub fn new() -> WgpuEngine {
        WgpuEngine::on(WgpuBackend::new())
    }

    /// An engine on an opened device.
    pub fn on(backend: WgpuBackend) -> WgpuEngine {
        WgpuEngine { backend, weights: DeviceWeights::new() }
    }

    pub fn backend(&self) -> &WgpuBackend {
        &self.backend
    }

    /// Bytes of weights and constants uploaded so far.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }
}

impl Default for WgpuEngine {
    fn default() -> Self {
        WgpuEngine::new()
    }
}

impl crate::generate::Engine for WgpuEngine {
    type Prepared = Plan;
    fn name(&self) -> &str {
        "wgpu"
    }
    fn prepare(&self, module: &dsc_compiler::ir::Module, mode: dsc_compiler::ir::Mode) -> Result<Plan, String> {
        Plan::build(module, mode).map_err(|e| e.to_string())
    }
    fn run(
        &self,
        _: &dsc_compiler::ir::Module,
        plan: &Plan,
        _: dsc_compiler::ir::Mode,
        args: &[Tensor],
        weights: &dyn Weights,
    ) -> Result<Vec<Tensor>, String> {
        self.backend.run_plan(plan, args, weights, &self.weights)
    }
}
