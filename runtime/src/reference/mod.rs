//! The reference interpreter: runs any IR [`Module`] entry point (and the functions it
//! calls) on the CPU, in `f32` or, for checks, in `f64`.
//!
//! It is the oracle every other backend is compared with, and a usable CPU backend for
//! small models. It therefore favours being obviously right over being fast, but uses a
//! real GEMM ([`linalg`]) and rayon where the work is large, so tiny and small models run
//! in milliseconds.
//!
//! # Using it
//!
//! ```no_run
//! # use dsc_compiler::ir::{Mode, Module};
//! # use dsc_runtime::reference::{run, Options, Precision, Tensor};
//! # use std::collections::HashMap;
//! # let module = Module::new();
//! let weights: HashMap<String, Tensor> = HashMap::new(); // or load_safetensors(..)
//! let ids = Tensor::i32(&[1, 3], vec![5, 9, 2]);
//! let pos = Tensor::i32(&[1, 3], vec![0, 1, 2]);
//! let outs = run(&module, Mode::Prefill, &[ids, pos], &weights, &Options::default())?;
//! let check = run(&module, Mode::Prefill, &[/* same */], &weights, &Options { precision: Precision::F64, ..Options::default() })?;
//! # Ok::<(), dsc_runtime::reference::ExecError>(())
//! ```
//!
//! Arguments are matched to the entry's [`Op::Input`](dsc_compiler::ir::Op::Input)s by
//! index ([`run_named`] matches by name); results are the entry's return values in
//! order, as tensors of the run's precision (integers and booleans as they are).
//!
//! # Semantics
//!
//! - **Precision.** Every float value of a run is held in the run's [`Precision`],
//!   whatever its declared float dtype (`bf16`, `f16`, `f8e4m3`, `f32`): inputs and
//!   weights are converted on entry, float-to-float [`Op::Cast`](dsc_compiler::ir::Op::Cast)s
//!   keep the value, and results come back in that precision. The interpreter thus
//!   computes what the graph means in exact-as-possible arithmetic, not what a `bf16`
//!   kernel would round to. Statistics (sums, norms, softmax denominators, the loss)
//!   accumulate in `f64` even in an `f32` run.
//! - **Shapes.** The symbols `b`, `s`, `c` are bound from the entry's argument shapes
//!   (solving affine dims like `c+s` once the other symbols are known); `c` is 0 when no
//!   argument mentions it (prefill, train). Every node's result is then checked against
//!   its declared type; a mismatch is an [`ExecError`] naming the function and node
//!   (numbered `%n` as the IR printer does), never a panic.
//! - **Weights.** A [`Op::Param`](dsc_compiler::ir::Op::Param) `name` in a function called
//!   with `layer = L` is looked up as [`param_path`](dsc_compiler::ir::param_path)`(L, name)`
//!   (the checkpoint name, `model.layers.L.name`); outside any layer as `name` itself.
//!   The interpreter calls that function rather than spelling the scheme out, so it
//!   follows the IR's naming wherever it goes. A function called without a layer
//!   from inside a layer inherits that layer's scope; a layer-scoped call inside a
//!   layer-scoped call (which the verifier rejects) is an error.
//! - **Memory.** Only nodes the function's return depends on are evaluated, and each
//!   value is dropped after its last use. Weights are borrowed, never copied, in an `f32`
//!   run of `f32` weights.
//! - **Per-op semantics** are documented on the kernels: [`elementwise`], [`layout`],
//!   [`linalg`], [`nn`] (the composites, with Hugging Face semantics).

mod dot;
pub mod dpbf16;
pub mod elementwise;
mod interp;
pub mod layout;
pub mod linalg;
pub mod narrow;
pub mod nn;
pub mod profile;
pub mod real;
pub mod tensor;
pub mod weights;

#[cfg(test)]
mod tests;

pub use tensor::{Data, ShapeError, Tensor};
pub use weights::{load_safetensors, Weights};

use dsc_compiler::ir::{Mode, Module};
use dsc_dsl::span::Span;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// The float type a run computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// For checking: the same graph, the same kernels, in double precision.
    F64,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub precision: Precision,
    /// Run the IR verifier first and refuse a module that fails it (default on). The
    /// interpreter never panics on a malformed graph either way, but the verifier's
    /// messages say more.
    pub verify: bool,
    /// Threads for this run (a private rayon pool); `None` uses rayon's global pool.
    pub threads: Option<usize>,
    /// Check every value as it is made and stop at the first node whose result holds a
    /// NaN or an infinity, naming it (a pass over each value: for diagnosis, off by default).
    pub check_finite: bool,
    /// In an `f32` run, a matmul whose weight is bf16 rounds its other operand to bf16
    /// (nearest, ties to even) and sums the exact products in `f32`: a bf16 kernel's
    /// arithmetic, as a GPU runs the checkpoint. Where the CPU has AVX-512 BF16 the prompt
    /// pass multiplies with it ([`dpbf16`]), twice the multiply-adds per instruction of
    /// `f32`. Off by default: the interpreter otherwise keeps activations in `f32`.
    pub bf16_inputs: bool,
    /// Hold the KV cache in bf16 between steps (new entries rounded to nearest even as
    /// they are appended), half the memory of the `f32` cache. The values the cache holds
    /// are the accuracy cost; everything else computes as before (a step widens the
    /// cache it reads to the run's precision).
    pub bf16_cache: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { precision: Precision::F32, verify: true, threads: None, check_finite: false, bf16_inputs: false, bf16_cache: false }
    }
}

/// What went wrong, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such entry point or function.
    Entry,
    /// Wrong number of arguments.
    Arguments,
    /// A symbol (`b`, `s`, `c`) could not be bound, or binds inconsistently.
    Binding,
    /// A value's shape disagrees with its declaration or its op's rule.
    Shape,
    /// A value's element type disagrees with its declaration or its op.
    DType,
    /// A param has no weight of that name.
    MissingWeight,
    /// An index (gather, scatter, expert id, label) is out of range.
    Index,
    /// An integer division by zero, a value that does not fit a cast, or (with
    /// `check_finite`) a NaN or infinity.
    Numeric,
    /// The module is malformed (cycle, missing return, bad slots, verifier errors).
    Graph,
    /// Something the interpreter does not do (reported with what and why).
    Unsupported,
}

/// A failed run: what, and where (function, node, spec span, call sites).
#[derive(Debug, Clone)]
pub struct ExecError {
    pub kind: ErrorKind,
    pub message: String,
    /// The function being evaluated.
    pub function: Option<String>,
    /// The node, as `%n op` with the IR printer's numbering.
    pub node: Option<String>,
    pub span: Option<Span>,
    /// Call sites from the innermost outwards, as `caller %n call callee layer=L`.
    pub calls: Vec<String>,
}

impl ExecError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> ExecError {
        ExecError { kind, message: message.into(), function: None, node: None, span: None, calls: Vec::new() }
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match (&self.function, &self.node) {
            (Some(func), Some(node)) => write!(f, " (at `{func}` {node})")?,
            (Some(func), None) => write!(f, " (in `{func}`)")?,
            _ => {}
        }
        for c in &self.calls {
            write!(f, ", called from {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ExecError {}

/// A kernel's failure, before the interpreter says where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    pub kind: ErrorKind,
    pub message: String,
}

impl KernelError {
    pub fn shape(message: String) -> KernelError {
        KernelError { kind: ErrorKind::Shape, message }
    }
    pub fn dtype(message: String) -> KernelError {
        KernelError { kind: ErrorKind::DType, message }
    }
    pub fn index(message: String) -> KernelError {
        KernelError { kind: ErrorKind::Index, message }
    }
    pub fn numeric(message: String) -> KernelError {
        KernelError { kind: ErrorKind::Numeric, message }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for KernelError {}

/// Run the entry point for `mode` on `inputs` (by argument index).
pub fn run(module: &Module, mode: Mode, inputs: &[Tensor], weights: &dyn Weights, options: &Options) -> Result<Vec<Tensor>, ExecError> {
    let f = module.entry(mode).ok_or_else(|| ExecError::new(ErrorKind::Entry, format!("the module has no {mode} entry point")))?;
    run_function(module, &f.name, inputs, weights, options)
}

/// Run the entry point for `mode` with arguments given by their `Input` names.
pub fn run_named(
    module: &Module,
    mode: Mode,
    inputs: &[(&str, &Tensor)],
    weights: &dyn Weights,
    options: &Options,
) -> Result<Vec<Tensor>, ExecError> {
    let f = module.entry(mode).ok_or_else(|| ExecError::new(ErrorKind::Entry, format!("the module has no {mode} entry point")))?;
    let mut ordered = Vec::new();
    for n in f.graph.arguments() {
        let dsc_compiler::ir::Op::Input { name, .. } = &f.graph.node(n).op else { unreachable!("arguments are inputs") };
        let t = inputs
            .iter()
            .find(|(k, _)| k == name)
            .ok_or_else(|| ExecError::new(ErrorKind::Arguments, format!("no input named `{name}` for `{}`", f.name)))?;
        ordered.push(t.1.clone());
    }
    if let Some((extra, _)) = inputs.iter().find(|(k, _)| {
        !f.graph.arguments().iter().any(|&n| matches!(&f.graph.node(n).op, dsc_compiler::ir::Op::Input { name, .. } if name == k))
    }) {
        return Err(ExecError::new(ErrorKind::Arguments, format!("`{}` has no argument named `{extra}`", f.name)));
    }
    run_function(module, &f.name, &ordered, weights, options)
}

/// Run any function of the module (an entry point or a layer body, unscoped) on
/// `inputs` (by argument index).
pub fn run_function(
    module: &Module,
    function: &str,
    inputs: &[Tensor],
    weights: &dyn Weights,
    options: &Options,
) -> Result<Vec<Tensor>, ExecError> {
    let prepared = Prepared::new(module, options)?;
    run_prepared_function(module, &prepared, function, inputs.iter().map(Arg::Lent).collect(), weights, options)
}

/// A module made ready to run many times: verified once (when [`Options::verify`] asks),
/// each function's evaluation order worked out on its first call and kept, and values
/// computed from weights alone (absorbed MLA's slices and transposes of `kv_b`) kept
/// between runs of the same weights. A decode loop runs the same module every step;
/// redoing the first two per step was 5% of a step, the third another copy of `kv_b`
/// per layer and step.
///
/// It belongs to the module it was made for: run it only with that module. Weights
/// changed in place must be announced ([`Prepared::weights_changed`]); other weights
/// (another object) are told apart by their address.
pub struct Prepared {
    schedules: interp::Schedules,
    /// Values computed from weights alone, kept between runs of the same weights.
    hoisted: interp::Hoisted,
    /// Bumped by [`Prepared::weights_changed`]: kept values of an older epoch are stale.
    epoch: Arc<AtomicU64>,
}

impl Prepared {
    pub fn new(module: &Module, options: &Options) -> Result<Prepared, ExecError> {
        Prepared::sharing_epoch(module, options, Arc::default())
    }

    /// [`Prepared::new`] whose kept weight-derived values go stale when `epoch` changes:
    /// an engine shares one epoch among the modules it prepares and bumps it when the
    /// weights change in place.
    pub(crate) fn sharing_epoch(module: &Module, options: &Options, epoch: Arc<AtomicU64>) -> Result<Prepared, ExecError> {
        if options.verify {
            if let Err(errs) = dsc_compiler::ir::verify(module) {
                let shown: Vec<String> = errs.iter().take(5).map(|e| e.to_string()).collect();
                let more = if errs.len() > 5 { format!(" (and {} more)", errs.len() - 5) } else { String::new() };
                return Err(ExecError::new(ErrorKind::Graph, format!("the module fails verification: {}{more}", shown.join("; "))));
            }
        }
        Ok(Prepared { schedules: interp::Schedules::default(), hoisted: interp::Hoisted::default(), epoch })
    }

    /// The weights changed in place (an optimizer step): values computed from them are
    /// computed again on the next run.
    pub fn weights_changed(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// [`run`] with a [`Prepared`] module (not verified again).
pub fn run_prepared(
    module: &Module,
    prepared: &Prepared,
    mode: Mode,
    inputs: &[Tensor],
    weights: &dyn Weights,
    options: &Options,
) -> Result<Vec<Tensor>, ExecError> {
    run_prepared_args(module, prepared, mode, inputs.iter().map(Arg::Lent).collect(), weights, options)
}

/// An argument of [`run_prepared_args`].
pub enum Arg<'a> {
    /// Read by the run, left as it was.
    Lent(&'a Tensor),
    /// The run's to keep: it may reuse the buffer (a decode step appends to a KV cache
    /// given to it in place, where a lent cache is copied whole).
    Given(Tensor),
}

impl Arg<'_> {
    fn tensor(&self) -> &Tensor {
        match self {
            Arg::Lent(t) => t,
            Arg::Given(t) => t,
        }
    }
}

/// [`run_prepared`] with arguments lent or given.
pub fn run_prepared_args(
    module: &Module,
    prepared: &Prepared,
    mode: Mode,
    inputs: Vec<Arg<'_>>,
    weights: &dyn Weights,
    options: &Options,
) -> Result<Vec<Tensor>, ExecError> {
    let f = module.entry(mode).ok_or_else(|| ExecError::new(ErrorKind::Entry, format!("the module has no {mode} entry point")))?;
    run_prepared_function(module, prepared, &f.name, inputs, weights, options)
}

fn run_prepared_function(
    module: &Module,
    prepared: &Prepared,
    function: &str,
    inputs: Vec<Arg<'_>>,
    weights: &dyn Weights,
    options: &Options,
) -> Result<Vec<Tensor>, ExecError> {
    let go = || match options.precision {
        Precision::F32 => interp::run::<f32>(module, prepared, function, inputs, weights, options.check_finite, options.bf16_inputs),
        Precision::F64 => interp::run::<f64>(module, prepared, function, inputs, weights, options.check_finite, false),
    };
    match options.threads {
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| ExecError::new(ErrorKind::Unsupported, format!("cannot start {n} threads: {e}")))?;
            pool.install(go)
        }
        // On a thread outside the pool (a program's main thread), the run moves into the
        // global pool and this thread waits asleep. Run here instead, its sequential ops
        // would compete for the cores with the pool's idle workers, which spin and yield
        // between parallel ops: on 2 cores a quarter of a decode step was the kernel
        // switching threads.
        None if rayon::current_thread_index().is_none() && rayon::current_num_threads() > 1 => {
            let mut out = None;
            rayon::scope(|_| out = Some(go()));
            out.expect("the scope ran the closure")
        }
        None => go(),
    }
}
