//! Executes a [`Plan`] on any device: the plan walking that does not depend on how a
//! device allocates memory or launches a kernel.
//!
//! A device implements [`Device`] (upload, allocate, download, and run one node's
//! [`NodeWork`]); [`run_plan`] does the rest, as `plan.json` describes it: arguments come
//! from the host and results go back to it, everything between stays on the device.
//! Run-time sizes `b`, `c`, `s` are read off the arguments ([`bindings`]). Weights are
//! uploaded on first use and kept in a [`DeviceWeights`] under their checkpoint names
//! (`param_path(layer, name)`), so a layer body planned once binds each layer's weights
//! at its call. Buffers the plan marks as released after a step are dropped there, which
//! hands their memory back to the device's allocator.
//!
//! Both device runtimes run plans through this module: `wgpu::exec` and `cuda`.

use crate::generate::{Engine, HeldValue, SampleParams, Sampled, Value};
use crate::reference::{Tensor, Weights};
use dsc_compiler::codegen::launch::NodeWork;
use dsc_compiler::codegen::plan::{FunctionPlan, Plan, Source, Step};
use dsc_compiler::ir::{param_path, solve_symbols, Bindings, DType, Dim, Mode, Module, Sym};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What a device offers the plan walker. Buffers hold `len` elements of a dtype in the
/// device's representation of it (the GPU runtimes: floats in the kernel's element type,
/// integers as `i32`).
pub trait Device {
    /// `--backend`'s name for the device.
    const NAME: &'static str;
    /// A device buffer; cloning shares it (a reshape's alias, a cached weight).
    type Buf: Clone + Send + Sync + 'static;
    /// Copies `t` to the device as `dtype`.
    fn upload(&self, t: &Tensor, dtype: DType) -> Result<Self::Buf, String>;
    /// A buffer of `len` elements of `dtype` that a step is about to write in full.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Buf, String>;
    /// Reads the first `shape`'s worth of elements of `b` back as a tensor (`f32` for
    /// floats, `i32` for integers); a buffer may hold more (room for appends).
    fn download(&self, b: &Self::Buf, shape: &[usize]) -> Result<Tensor, String>;
    /// Runs one node's launches on `ins` and `outs` (slot order; outputs allocated).
    fn execute(&self, work: &NodeWork, ins: &[Self::Buf], outs: &[Self::Buf], bind: &Bindings) -> Result<(), String>;
    /// Bytes `b` occupies on the device.
    fn bytes(b: &Self::Buf) -> usize;
    /// Bytes one element of `dtype` takes on the device.
    fn elem_bytes(dtype: DType) -> usize;
}

/// A device as a generation and training engine, the same for every device: each
/// compiled entry point becomes a [`Plan`] (what `dsc compile --target` writes as
/// `plan.json`) and runs with [`run_plan`]; weights and constants are uploaded on first
/// use and kept by checkpoint name until [`PlanEngine::forget_weights`].
pub struct PlanEngine<D: Device> {
    device: D,
    weights: DeviceWeights<D::Buf>,
    counters: Counters,
}

impl<D: Device> PlanEngine<D> {
    /// An engine on an opened device.
    pub fn on(device: D) -> PlanEngine<D> {
        PlanEngine { device, weights: DeviceWeights::new(), counters: Counters::default() }
    }

    pub fn backend(&self) -> &D {
        &self.device
    }

    /// Forgets the uploaded weights: after an optimizer step they are stale, and the next
    /// run uploads the new ones.
    pub fn forget_weights(&self) {
        self.weights.clear();
    }

    /// The device copy of weight `name` held as `dtype`, if a run has uploaded it.
    pub fn weight(&self, name: &str, dtype: DType) -> Option<D::Buf> {
        self.weights.get(name, dtype)
    }

    /// Makes `buf` the device copy of weight `name` (an update made on the host, such as a
    /// selection bias's).
    pub fn set_weight(&self, name: &str, dtype: DType, buf: D::Buf) {
        self.weights.set(name, dtype, buf);
    }

    /// Uploads `t` as the device copy of weight `name` in `dtype` (counted as weights).
    pub fn put_weight(&self, name: &str, t: &Tensor, dtype: DType) -> Result<(), String> {
        let b = self.device.upload(t, dtype)?;
        Counters::add(&self.counters.weights_to_device, D::bytes(&b));
        self.weights.set(name, dtype, b);
        Ok(())
    }

    /// Every device copy of weight `name`, by dtype.
    pub fn weight_copies(&self, name: &str) -> Vec<(DType, D::Buf)> {
        self.weights.copies(name)
    }

    /// Runs `plan` on host arguments with the device weights in `cache` instead of the
    /// engine's own: a second model under the same names (GRPO's reference beside the
    /// policy). Counted as the engine's runs are.
    pub fn run_with(
        &self,
        cache: &DeviceWeights<D::Buf>,
        plan: &Plan,
        args: &[Tensor],
        weights: &dyn Weights,
    ) -> Result<Vec<Tensor>, String> {
        let args = args.iter().map(|t| Value::Host(t.clone())).collect();
        let out = run_plan_values(&self.device, plan, args, &[], weights, cache, &self.counters)?;
        out.into_iter().map(|v| v.into_host().ok_or_else(|| "a result stayed on the device".to_string())).collect()
    }

    /// What the engine's runs have moved and done so far.
    pub fn counts(&self) -> Counts {
        self.counters.get()
    }

    /// Copies `t` to the device as `dtype`, counted as host traffic (values a training
    /// step's optimizer needs beside the plan's runs).
    pub fn upload(&self, t: &Tensor, dtype: DType) -> Result<D::Buf, String> {
        let b = self.device.upload(t, dtype)?;
        Counters::add(&self.counters.to_device, D::bytes(&b));
        Ok(b)
    }

    /// Reads the front of `b` back as a tensor of `shape`, counted as host traffic.
    pub fn download(&self, b: &D::Buf, shape: &[usize], dtype: DType) -> Result<Tensor, String> {
        Counters::add(&self.counters.to_host, shape.iter().product::<usize>() * D::elem_bytes(dtype));
        self.device.download(b, shape)
    }

    /// Bytes of weights and constants uploaded so far.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes(D::bytes)
    }
}

impl<D: Device + Send + Sync> Engine for PlanEngine<D> {
    type Prepared = Plan;
    type Held = Held<D::Buf>;
    fn name(&self) -> &str {
        D::NAME
    }
    fn weights_changed(&self) {
        self.forget_weights();
    }
    fn prepare(&self, module: &Module, mode: Mode) -> Result<Plan, String> {
        Plan::build(module, mode).map_err(|e| e.to_string())
    }
    fn samples(&self) -> bool {
        true
    }
    fn counts(&self) -> Option<Counts> {
        Some(self.counters.get())
    }
    /// [`sample_rows`](dsc_compiler::codegen::kernels::sample) on the kept logits: `b`
    /// tokens and `2·b` floats come back instead of `b·V` logits.
    fn sample(&self, logits: &Held<D::Buf>, params: &SampleParams) -> Result<Sampled, String> {
        let v = logits.shape.last().copied().unwrap_or(0);
        let rows = logits.shape.iter().product::<usize>() / v.max(1);
        let elem = dsc_compiler::codegen::Elem::from_dtype(logits.dtype).ok_or("logits that are not floats")?;
        let (tokens, stats) = (self.device.alloc(rows, DType::I32)?, self.device.alloc(2 * rows, DType::F32)?);
        let work = dsc_compiler::codegen::kernels::sample::sample_work(rows, v, elem, params);
        self.device.execute(&work, std::slice::from_ref(&logits.buf), &[tokens.clone(), stats.clone()], &Bindings::default())?;
        let tokens = self.download(&tokens, &[rows], DType::I32)?.to_f64_vec().into_iter().map(|t| t as i64).collect();
        let stats = self.download(&stats, &[rows, 2], DType::F32)?.to_f64_vec();
        Ok(Sampled {
            tokens,
            logprobs: stats.iter().step_by(2).copied().collect(),
            entropy: stats.iter().skip(1).step_by(2).copied().collect(),
        })
    }
    fn run_values(
        &self,
        _: &Module,
        plan: &Plan,
        _: Mode,
        args: Vec<Value<Held<D::Buf>>>,
        keep: &[bool],
        weights: &dyn Weights,
    ) -> Result<Vec<Value<Held<D::Buf>>>, String> {
        run_plan_values(&self.device, plan, args, keep, weights, &self.weights, &self.counters)
    }
}

/// A result a run left on the device: its buffer, shape and dtype, the bytes the buffer
/// takes, and the room past its contents (a KV cache, which later runs append to).
#[derive(Clone)]
pub struct Held<B> {
    pub buf: B,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub bytes: u64,
    pub room: Option<Room>,
}

/// Room past a buffer's contents, shared by every value that reads the buffer: its
/// capacity and how many of its elements appends have written so far (the high-water
/// mark). An append writes in place only when its input ends exactly at the mark, and
/// moves the mark past what it wrote: every element is written once, so a value never
/// sees its buffer change under it, and an append from an older value (a cache branched
/// from an earlier step) copies instead.
#[derive(Clone, Debug)]
pub struct Room {
    capacity: usize,
    filled: Arc<AtomicUsize>,
}

impl Room {
    fn new(capacity: usize, filled: usize) -> Room {
        Room { capacity, filled: Arc::new(AtomicUsize::new(filled)) }
    }

    /// Claims elements `len..len + add` for an append whose input is `len` long.
    fn claim(&self, len: usize, add: usize) -> bool {
        len + add <= self.capacity && self.filled.compare_exchange(len, len + add, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Elements the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Positions of room a cache gets when an append has to copy it: at least this many
/// steps, and at least as many as it holds (so copies are rare: after the first, one
/// per doubling).
const ROOM_STEPS: usize = 64;

/// A buffer as a run holds it.
#[derive(Clone)]
struct Slot<B> {
    buf: B,
    room: Option<Room>,
}

impl<B: Clone + Send + Sync + 'static> HeldValue for Held<B> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// What an engine's runs moved over the host link and how their appends went, counted
/// since the engine was made ([`PlanEngine::counts`]).
#[derive(Debug, Default)]
pub struct Counters {
    to_device: AtomicU64,
    to_host: AtomicU64,
    weights_to_device: AtomicU64,
    in_place: AtomicU64,
    copied: AtomicU64,
}

/// A reading of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Bytes of run arguments (and of values uploaded for the optimizer) sent to the device.
    pub to_device: u64,
    /// Bytes of results (and optimizer values) read back.
    pub to_host: u64,
    /// Bytes of weights and constants uploaded.
    pub weights_to_device: u64,
    /// KV-cache appends made in place, and appends that copied the cache.
    pub appends_in_place: u64,
    pub appends_copied: u64,
}

impl Counters {
    pub fn get(&self) -> Counts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            to_device: r(&self.to_device),
            to_host: r(&self.to_host),
            weights_to_device: r(&self.weights_to_device),
            appends_in_place: r(&self.in_place),
            appends_copied: r(&self.copied),
        }
    }

    fn add(a: &AtomicU64, n: usize) {
        a.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Device copies of weights and constants, kept between runs.
pub struct DeviceWeights<B> {
    bufs: Mutex<HashMap<(String, DType), B>>,
}

impl<B> Default for DeviceWeights<B> {
    fn default() -> Self {
        DeviceWeights { bufs: Mutex::new(HashMap::new()) }
    }
}

impl<B: Clone> DeviceWeights<B> {
    pub fn new() -> DeviceWeights<B> {
        DeviceWeights::default()
    }

    /// Bytes held on the device, as `size` counts a buffer.
    pub fn bytes(&self, size: impl Fn(&B) -> usize) -> usize {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).values().map(size).sum()
    }

    /// Forgets every buffer: the weights changed (an optimizer step), so the next run
    /// uploads them again.
    pub fn clear(&self) {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn get(&self, name: &str, dtype: DType) -> Option<B> {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).get(&(name.to_string(), dtype)).cloned()
    }

    fn copies(&self, name: &str) -> Vec<(DType, B)> {
        let bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(DType, B)> = bufs.iter().filter(|((n, _), _)| n == name).map(|((_, d), b)| (*d, b.clone())).collect();
        v.sort_by_key(|(d, _)| d.name());
        v
    }

    fn set(&self, name: &str, dtype: DType, b: B) {
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).insert((name.to_string(), dtype), b);
    }

    /// The cached buffer under `key`, or `make`'s, cached.
    fn get_or_upload(&self, key: (String, DType), make: impl FnOnce() -> Result<B, String>) -> Result<B, String> {
        if let Some(b) = self.bufs.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(b.clone());
        }
        let b = make()?;
        self.bufs.lock().unwrap_or_else(|e| e.into_inner()).insert(key, b.clone());
        Ok(b)
    }
}

/// Runs the plan's entry on host `args` (in the entry's argument order) with `weights`
/// and returns its results as host tensors (`f32` for floats, `i32` for integers).
pub fn run_plan<D: Device>(
    dev: &D,
    plan: &Plan,
    args: &[Tensor],
    weights: &dyn Weights,
    cache: &DeviceWeights<D::Buf>,
) -> Result<Vec<Tensor>, String> {
    let args = args.iter().map(|t| Value::Host(t.clone())).collect();
    let out = run_plan_values(dev, plan, args, &[], weights, cache, &Counters::default())?;
    Ok(out.into_iter().map(|v| v.into_host().expect("no result was kept on the device")).collect())
}

/// Runs the plan's entry on arguments on the host or left on the device by an earlier
/// run. Results whose `keep` flag is set stay on the device ([`Held`]); the others are
/// downloaded. `counters` tallies the bytes that crossed and how the appends went.
pub fn run_plan_values<D: Device>(
    dev: &D,
    plan: &Plan,
    args: Vec<Value<Held<D::Buf>>>,
    keep: &[bool],
    weights: &dyn Weights,
    cache: &DeviceWeights<D::Buf>,
    counters: &Counters,
) -> Result<Vec<Value<Held<D::Buf>>>, String> {
    let entry = plan.functions.get(&plan.entry).ok_or_else(|| format!("the plan has no function `{}`", plan.entry))?;
    if args.len() != entry.inputs.len() {
        return Err(format!("{} arguments for `{}`, which takes {}", args.len(), plan.entry, entry.inputs.len()));
    }
    let shapes: Vec<&[usize]> = args
        .iter()
        .map(|a| match a {
            Value::Host(t) => t.shape(),
            Value::Held(h) => &h.shape[..],
        })
        .collect();
    let bind = bindings(entry, &shapes)?;
    let mut on_device: Vec<Slot<D::Buf>> = Vec::with_capacity(args.len());
    for (a, &b) in args.into_iter().zip(&entry.inputs) {
        let want = entry.buffers[b].dtype;
        on_device.push(match a {
            Value::Host(t) => {
                let buf = dev.upload(&t, want)?;
                Counters::add(&counters.to_device, D::bytes(&buf));
                Slot { buf, room: None }
            }
            Value::Held(h) if h.dtype == want => Slot { buf: h.buf, room: h.room },
            Value::Held(h) => {
                return Err(format!("argument {} is a {} device buffer; the plan takes {}", name_of(entry, b), h.dtype.name(), want.name()))
            }
        });
    }
    let run = Run { dev, plan, weights, cache, bind, counters };
    let results = run.function(entry, on_device, None)?;
    results
        .into_iter()
        .zip(&entry.results)
        .enumerate()
        .map(|(i, (d, &b))| {
            let shape: Vec<usize> = entry.buffers[b].shape.eval(&bind).into_iter().map(|v| v as usize).collect();
            let dtype = entry.buffers[b].dtype;
            if keep.get(i).copied().unwrap_or(false) {
                return Ok(Value::Held(Held { bytes: D::bytes(&d.buf) as u64, buf: d.buf, shape, dtype, room: d.room }));
            }
            let bytes = shape.iter().product::<usize>() * D::elem_bytes(dtype);
            Counters::add(&counters.to_host, bytes);
            dev.download(&d.buf, &shape).map(Value::Host)
        })
        .collect()
}

/// The run-time sizes, read off the arguments as the reference interpreter reads them
/// ([`solve_symbols`]); every argument must then match its declared shape. A size no
/// argument shows is 0 (the cache length of a prefill).
pub fn bindings(f: &FunctionPlan, args: &[&[usize]]) -> Result<Bindings, String> {
    let mut pairs: Vec<(Dim, i64)> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    for (t, &b) in args.iter().zip(&f.inputs) {
        let decl = &f.buffers[b].shape;
        if decl.rank() != t.len() {
            return Err(format!("argument {} has shape {t:?}, declared {}", name_of(f, b), shape_text(&decl.0)));
        }
        for (d, &n) in decl.0.iter().zip(t.iter()) {
            pairs.push((*d, n as i64));
            owner.push(b);
        }
    }
    let sizes = solve_symbols(&pairs).map_err(|e| {
        let (d, n) = pairs[e.pair];
        format!("argument {} has size {n} where the plan declares {d}: no non-negative {} fits", name_of(f, owner[e.pair]), e.sym.letter())
    })?;
    let size = |s: Sym| sizes[s as usize].unwrap_or(0) as u64;
    let bind = Bindings { batch: size(Sym::Batch), cache: size(Sym::Cache), seq: size(Sym::Seq) };
    for (t, &b) in args.iter().zip(&f.inputs) {
        let want: Vec<usize> = f.buffers[b].shape.eval(&bind).into_iter().map(|v| v as usize).collect();
        if want[..] != t[..] {
            return Err(format!("argument {} has shape {t:?}, expected {want:?} ({})", name_of(f, b), shape_text(&f.buffers[b].shape.0)));
        }
    }
    Ok(bind)
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

struct Run<'a, D: Device> {
    dev: &'a D,
    plan: &'a Plan,
    weights: &'a dyn Weights,
    cache: &'a DeviceWeights<D::Buf>,
    bind: Bindings,
    counters: &'a Counters,
}

impl<D: Device> Run<'_, D> {
    fn function(&self, f: &FunctionPlan, args: Vec<Slot<D::Buf>>, layer: Option<u32>) -> Result<Vec<Slot<D::Buf>>, String> {
        let mut env: Vec<Option<Slot<D::Buf>>> = vec![None; f.buffers.len()];
        for (a, &b) in args.into_iter().zip(&f.inputs) {
            env[b] = Some(a);
        }
        let fixed = |buf| Some(Slot { buf, room: None });
        for (i, buf) in f.buffers.iter().enumerate() {
            match &buf.source {
                Source::Param { name } => {
                    let len = usize::try_from(buf.len().eval(&self.bind)).map_err(|_| format!("weight `{name}` has no size"))?;
                    env[i] = fixed(self.weight(&param_path(layer, name), buf.dtype, len)?)
                }
                Source::Const { value } => env[i] = fixed(self.constant(*value, buf.dtype)?),
                _ => {}
            }
        }
        let get = |env: &[Option<Slot<D::Buf>>], b: usize| {
            env[b].clone().ok_or_else(|| format!("{}: buffer #{b} read before it is written", f.name))
        };
        let elems = |b: usize| {
            let len = f.buffers[b].len().eval(&self.bind);
            usize::try_from(len).map_err(|_| format!("{}: buffer #{b} has {len} elements", f.name))
        };
        for (step, release) in f.steps.iter().zip(&f.release) {
            match step {
                Step::Node { label, inputs, outputs, work } => {
                    let ins: Vec<Slot<D::Buf>> = inputs.iter().map(|&b| get(&env, b)).collect::<Result<_, _>>()?;
                    let bufs: Vec<D::Buf> = ins.iter().map(|s| s.buf.clone()).collect();
                    let err = |e: String| format!("{}: {label}: {e}", f.name);
                    let outs: Vec<Slot<D::Buf>> = match work {
                        // A reshape shares its input's memory, room included.
                        NodeWork::Alias(k) => vec![ins[*k as usize].clone()],
                        NodeWork::Launches { .. } => {
                            let outs: Vec<D::Buf> =
                                outputs.iter().map(|&b| self.dev.alloc(elems(b)?, f.buffers[b].dtype)).collect::<Result<_, String>>()?;
                            self.dev.execute(work, &bufs, &outs, &self.bind).map_err(err)?;
                            outs.into_iter().map(|buf| Slot { buf, room: None }).collect()
                        }
                        NodeWork::Append { write, .. } => {
                            let (len, add) = (elems(inputs[0])?, elems(inputs[1])?);
                            match ins[0].room.as_ref().filter(|r| r.claim(len, add)) {
                                Some(room) => {
                                    Counters::add(&self.counters.in_place, 1);
                                    let work = NodeWork::Launches { scratch: vec![], launches: vec![(**write).clone()] };
                                    self.dev.execute(&work, &bufs, &bufs[..1], &self.bind).map_err(err)?;
                                    vec![Slot { buf: bufs[0].clone(), room: Some(room.clone()) }]
                                }
                                None => {
                                    Counters::add(&self.counters.copied, 1);
                                    let dtype = f.buffers[outputs[0]].dtype;
                                    let (buf, capacity) = self.with_room(len + add, add, dtype).map_err(err)?;
                                    self.dev.execute(work, &bufs, std::slice::from_ref(&buf), &self.bind).map_err(err)?;
                                    vec![Slot { buf, room: Some(Room::new(capacity, len + add)) }]
                                }
                            }
                        }
                    };
                    for (o, &b) in outs.into_iter().zip(outputs) {
                        env[b] = Some(o);
                    }
                }
                Step::Call { function, layer, args, results } => {
                    let callee =
                        self.plan.functions.get(function).ok_or_else(|| format!("{}: calls `{function}`, not in the plan", f.name))?;
                    let a: Vec<Slot<D::Buf>> = args.iter().map(|&b| get(&env, b)).collect::<Result<_, _>>()?;
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

    /// A buffer for an append's `len` elements with room for later ones (`step` elements
    /// each): [`ROOM_STEPS`] steps or as much again as it holds, whichever is more; just
    /// `len` when the device cannot hold that much at once.
    fn with_room(&self, len: usize, step: usize, dtype: DType) -> Result<(D::Buf, usize), String> {
        let capacity = len.saturating_add(step.saturating_mul(ROOM_STEPS).max(len));
        match self.dev.alloc(capacity, dtype) {
            Ok(b) => Ok((b, capacity)),
            Err(_) => Ok((self.dev.alloc(len, dtype)?, len)),
        }
    }

    fn weight(&self, name: &str, dtype: DType, len: usize) -> Result<D::Buf, String> {
        self.cache.get_or_upload((name.to_string(), dtype), || {
            // A training run keeps its weights on the device as f32 masters, and the host
            // copy may be older: a copy in another dtype is cast from the master there.
            let elem = dsc_compiler::codegen::Elem::from_dtype(dtype);
            if let (Some(master), Some(to), false) = (self.cache.get(name, DType::F32), elem, dtype == DType::F32) {
                let copy = self.dev.alloc(len, dtype)?;
                let work = dsc_compiler::codegen::kernels::optim::cast_work(len, dsc_compiler::codegen::Elem::F32, to);
                self.dev.execute(&work, &[master], std::slice::from_ref(&copy), &Bindings::default())?;
                return Ok(copy);
            }
            let t = self.weights.get(name).ok_or_else(|| format!("no weight `{name}`"))?;
            let b = self.dev.upload(t, dtype)?;
            Counters::add(&self.counters.weights_to_device, D::bytes(&b));
            Ok(b)
        })
    }

    fn constant(&self, value: f64, dtype: DType) -> Result<D::Buf, String> {
        self.cache.get_or_upload((format!("const:{:016x}", value.to_bits()), dtype), || {
            let t = match dtype {
                DType::I32 | DType::I64 => Tensor::i32(&[], vec![value as i32]),
                _ => Tensor::f32(&[], vec![value as f32]),
            };
            self.dev.upload(&t, dtype)
        })
    }
}
