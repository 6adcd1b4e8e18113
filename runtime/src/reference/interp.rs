//! The graph walker: binds the symbols, evaluates a function's live nodes in topological
//! order, checks each result against its declared type, recurses into calls, and frees
//! values after their last use.
//!
//! Values are `Cow<Tensor>`: weights and caller-owned tensors are borrowed (a 61-layer
//! run never copies a weight or a call argument), results of ops are owned. A `Reshape`
//! or same-precision `Cast` that is the last user of an owned value moves it instead of
//! copying.

use super::elementwise::{binary, cast, round_bf16, select, unary};
use super::layout::{broadcast, concat, concat_onto, gather, indices, permute, reduce, scatter_add, slice, top_k};
use super::linalg::{batch_matmul, batch_matmul_bf16, linear, linear_bf16, linear_narrow};
use super::narrow::{gather_rows, narrow, widen as widen_stored};
use super::nn::grad::{
    attention_grad, cross_entropy_grad, expert_ffn_grad, moe_route_grad, rms_norm_grad, swiglu_grad, token_logprob_grad, weight_grad,
};
use super::nn::{
    attention, attention_lse, attention_views, cross_entropy, expert_ffn, moe_route, moe_route_replay, rms_norm, rope, rope_frequencies,
    softmax, swiglu, token_logprob, AttentionSpec, KvView,
};
use super::real::Real;
use super::tensor::{numel, Data, Tensor};
use super::weights::Weights;
use super::{Arg, ErrorKind, ExecError, KernelError, Prepared};
use dsc_compiler::codegen::kernels::movement::{fold_view, strides, View};
use dsc_compiler::codegen::launch::Size;
use dsc_compiler::ir::{
    param_path, solve_symbols, DType, Dim, Function, FusedKernel, Module, Node, NodeId, Op, Operand, Shape, Sym, Ty, Value,
};
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// A value of the walk: a result it owns, a weight or argument it borrows, or a result
/// computed from weights alone, kept across runs ([`Hoisted`]).
enum Val<'a> {
    Owned(Tensor),
    Borrowed(&'a Tensor),
    Shared(Arc<Tensor>),
}

impl std::ops::Deref for Val<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        match self {
            Val::Owned(t) => t,
            Val::Borrowed(t) => t,
            Val::Shared(t) => t,
        }
    }
}

impl Val<'_> {
    fn into_owned(self) -> Tensor {
        match self {
            Val::Owned(t) => t,
            Val::Borrowed(t) => t.clone(),
            Val::Shared(t) => Arc::unwrap_or_clone(t),
        }
    }
}

/// Run `function` of `module` on `inputs` in precision `T`, with what `prepared` keeps
/// for `module`.
pub(super) fn run<T: Real>(
    module: &Module,
    prepared: &Prepared,
    function: &str,
    inputs: Vec<Arg<'_>>,
    weights: &dyn Weights,
    check_finite: bool,
    bf16_inputs: bool,
) -> Result<Vec<Tensor>, ExecError> {
    let f =
        module.function(function).ok_or_else(|| ExecError::new(ErrorKind::Entry, format!("the module has no function `{function}`")))?;
    let sizes = bind_symbols(f, &inputs.iter().map(Arg::tensor).collect::<Vec<_>>())?;
    let weights_key = (weights as *const dyn Weights as *const () as usize, prepared.epoch.load(Ordering::Acquire));
    let it = Interp::<T> { module, prepared, weights, weights_key, sizes, check_finite, bf16_inputs, _t: PhantomData };
    let args = inputs
        .into_iter()
        .map(|a| match a {
            Arg::Lent(t) => Val::Borrowed(t),
            Arg::Given(t) => Val::Owned(t),
        })
        .collect();
    let mut stack = Vec::new();
    it.call(f, None, args, &mut stack)
}

/// Bind `b`, `s`, `c` from the argument shapes ([`solve_symbols`]); an unbound `b` or `s`
/// is an error only where a shape needs it.
fn bind_symbols(f: &Function, inputs: &[&Tensor]) -> Result<[Option<i64>; 3], ExecError> {
    let g = &f.graph;
    let mut pairs: Vec<(Dim, i64, String)> = Vec::new();
    for n in g.arguments() {
        let node = g.node(n);
        let (Op::Input { index, name }, Some(ty)) = (&node.op, node.outputs.first()) else { continue };
        let Some(t) = inputs.get(*index as usize) else { continue };
        // A rank mismatch is reported when the input node is checked.
        if t.rank() == ty.rank() {
            for (d, &a) in ty.shape.iter().zip(t.shape()) {
                pairs.push((*d, a as i64, name.clone()));
            }
        }
    }
    let dims: Vec<(Dim, i64)> = pairs.iter().map(|(d, a, _)| (*d, *a)).collect();
    solve_symbols(&dims).map_err(|e| {
        let (d, actual, name) = &pairs[e.pair];
        let msg = format!("argument `{name}` has size {actual} where `{}` declares {d}: no non-negative {} fits", f.name, e.sym.letter());
        at_fn(ExecError::new(ErrorKind::Binding, msg), &f.name)
    })
}

fn at_fn(mut e: ExecError, function: &str) -> ExecError {
    e.function.get_or_insert_with(|| function.to_string());
    e
}

/// What the walker derives from a function before evaluating it: its live nodes (those
/// the return depends on) in topological order, where each reads its inputs, and which
/// values die after it. Worked out once per function of a module and kept
/// ([`Schedules`]): a decode step calls each layer's function once per layer and step.
pub(super) struct Schedule {
    steps: Vec<Step>,
    n_args: usize,
    /// Per step: whether its value comes from weights alone, and if so whether a step
    /// that does not reads it (then it is kept across runs, [`Hoisted`]).
    hoist: Vec<Hoist>,
    kept: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hoist {
    No,
    /// Read only by other steps computed from weights.
    Interior,
    /// The `i`-th value kept.
    Kept(usize),
}

struct Step {
    node: NodeId,
    /// The IR printer's number for the node (its place in the whole topological order).
    pos: usize,
    /// Each input as (the step that makes it, which output).
    inputs: Vec<(usize, u32)>,
    /// Per input: this step is the last to read it, and reads it once.
    last: Vec<bool>,
    /// Steps whose values no later step reads.
    frees: Vec<usize>,
    /// An attention node reading its keys and values in place ([`KvFold`]).
    kv: Option<KvFold>,
}

/// Where a folded attention node reads its key parts and its value: each a strided view
/// ([`fold_view`]) of one of its inputs, in place of the permutes, reshapes and concat
/// that would copy them (a decode step's position-major cache, read batch-major).
struct KvFold {
    key: Vec<FoldedView>,
    value: FoldedView,
    /// The mask's input.
    mask: Option<usize>,
}

/// A view of the step's input `input`: element `(i, j, h, c)` of the `shape` it stands
/// for is element `offset + Σ index · strides + c` of the input's buffer.
struct FoldedView {
    input: usize,
    offset: Size,
    strides: [Size; 3],
    shape: Shape,
}

impl Schedule {
    pub(super) fn of(f: &Function) -> Result<Schedule, ExecError> {
        let g = &f.graph;
        let fail = |kind, msg: String| at_fn(ExecError::new(kind, msg), &f.name);
        let order = g.topo_order().map_err(|c| fail(ErrorKind::Graph, format!("the graph has a cycle through {} nodes", c.0.len())))?;
        let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let ret = g.return_node().ok_or_else(|| fail(ErrorKind::Graph, "the function has no return".into()))?;

        // Inputs per node, checked for dense slots; then the nodes the return needs.
        let mut inputs: HashMap<NodeId, Vec<Value>> = HashMap::new();
        let mut live: HashSet<NodeId> = HashSet::new();
        let mut folds: HashMap<NodeId, KvFold> = HashMap::new();
        let mut todo = vec![ret];
        while let Some(n) = todo.pop() {
            if !live.insert(n) {
                continue;
            }
            let edges = g.input_edges(n);
            if edges.iter().enumerate().any(|(i, (slot, _))| *slot as usize != i) {
                let name = node_name(pos[&n], g.node(n));
                return Err(ExecError { node: Some(name), ..fail(ErrorKind::Graph, "input slots are not 0..n, each once".into()) });
            }
            let mut vals: Vec<Value> = edges.into_iter().map(|(_, v)| v).collect();
            if matches!(g.node(n).op, Op::BatchMatMul) {
                // A batch matmul reads an operand broadcast along added leading axes (absorbed
                // MLA's W_UK and W_UV over the batch) from before the broadcast, which
                // `batch_matmul` repeats by index: the copy is never made (per decode step
                // it was the largest cost after the matmuls).
                for v in vals.iter_mut() {
                    if let Some(from) = leading_broadcast_source(g, *v) {
                        *v = from;
                    }
                }
            }
            if let Op::Attention { masked, .. } = g.node(n).op {
                if let Some((read, fold)) = kv_fold(g, &vals, masked) {
                    vals = read;
                    folds.insert(n, fold);
                }
            }
            todo.extend(vals.iter().map(|v| v.node));
            inputs.insert(n, vals);
        }
        // The return is last: every live node is one of its ancestors.
        let live_order: Vec<NodeId> = order.into_iter().filter(|n| live.contains(n)).collect();
        let step_of: HashMap<NodeId, usize> = live_order.iter().enumerate().map(|(j, &n)| (n, j)).collect();
        let mut last_use: HashMap<NodeId, usize> = HashMap::new();
        for (j, n) in live_order.iter().enumerate() {
            for v in &inputs[n] {
                last_use.insert(v.node, j);
            }
        }
        let mut steps: Vec<Step> = live_order
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                let ins = &inputs[&n];
                let last = ins.iter().map(|v| last_use[&v.node] == j && ins.iter().filter(|w| *w == v).count() == 1).collect();
                Step {
                    node: n,
                    pos: pos[&n],
                    inputs: ins.iter().map(|v| (step_of[&v.node], v.output as u32)).collect(),
                    last,
                    frees: Vec::new(),
                    kv: folds.remove(&n),
                }
            })
            .collect();
        for (node, j) in last_use {
            steps[j].frees.push(step_of[&node]);
        }
        let (hoist, kept) = hoisting(g, &steps);
        Ok(Schedule { steps, n_args: g.arguments().len(), hoist, kept })
    }
}

#[cfg(test)]
impl Schedule {
    /// How many attention steps read their keys and values through views, and how many
    /// permutes are evaluated.
    pub(super) fn folded(&self, g: &dsc_compiler::ir::Graph) -> (usize, usize) {
        let permutes = self.steps.iter().filter(|s| matches!(g.node(s.node).op, Op::Permute { .. })).count();
        (self.steps.iter().filter(|s| s.kv.is_some()).count(), permutes)
    }
}

/// Which steps compute from weights alone: pure ops whose inputs are params, constants or
/// such steps, with no symbol in their shapes or attributes (so every run of the same
/// weights makes the same value). Absorbed MLA reshapes, slices and transposes `kv_b`
/// this way in every layer of every decode step: kept, that is a copy of the weight less
/// per layer and step.
fn hoisting(g: &dsc_compiler::ir::Graph, steps: &[Step]) -> (Vec<Hoist>, usize) {
    let fixed = |d: &Dim| d.as_const().is_some();
    let mut from_weights = vec![false; steps.len()];
    let mut source = vec![false; steps.len()];
    for (j, step) in steps.iter().enumerate() {
        let node = g.node(step.node);
        let attrs_fixed = match &node.op {
            Op::Slice { start, .. } => fixed(start),
            Op::Iota { .. } | Op::Input { .. } | Op::Call { .. } | Op::Return => false,
            _ => true,
        };
        source[j] = matches!(node.op, Op::Param { .. } | Op::Const { .. });
        from_weights[j] = source[j]
            || (attrs_fixed
                && !step.inputs.is_empty()
                && step.inputs.iter().all(|&(p, _)| from_weights[p])
                && node.outputs.iter().all(|t| t.shape.iter().all(fixed)));
    }
    let mut read_outside = vec![false; steps.len()];
    for (j, step) in steps.iter().enumerate() {
        if !from_weights[j] {
            for &(p, _) in &step.inputs {
                read_outside[p] = true;
            }
        }
    }
    let mut kept = 0;
    let hoist = (0..steps.len())
        .map(|j| match (from_weights[j] && !source[j], read_outside[j]) {
            (false, _) => Hoist::No,
            (true, false) => Hoist::Interior,
            (true, true) => {
                kept += 1;
                Hoist::Kept(kept - 1)
            }
        })
        .collect();
    (hoist, kept)
}

/// What weights a [`Hoisted`] set was computed from: the weights' address and the
/// [`Prepared`]'s weight epoch at the time.
type WeightsKey = (usize, u64);

/// The values [`Hoist::Kept`] of each (function, layer), computed from weights alone,
/// kept across runs of the same weights.
#[derive(Default)]
pub(super) struct Hoisted(Mutex<HashMap<CallSite, Arc<HoistedSet>>>);

/// A function and the layer its params are scoped to.
type CallSite = (String, Option<u32>);

struct HoistedSet {
    weights: WeightsKey,
    values: Vec<Vec<Arc<Tensor>>>,
}

impl Hoisted {
    fn get(&self, function: &str, layer: Option<u32>, weights: WeightsKey) -> Option<Arc<HoistedSet>> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(function.to_string(), layer)).filter(|h| h.weights == weights).cloned()
    }

    fn put(&self, function: &str, layer: Option<u32>, set: HoistedSet) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert((function.to_string(), layer), Arc::new(set));
    }
}

/// The [`Schedule`]s of one module's functions, each made on first use.
#[derive(Default)]
pub(super) struct Schedules(Mutex<HashMap<String, Arc<Schedule>>>);

impl Schedules {
    fn get(&self, f: &Function) -> Result<Arc<Schedule>, ExecError> {
        if let Some(s) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&f.name) {
            return Ok(s.clone());
        }
        let s = Arc::new(Schedule::of(f)?);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(f.name.clone(), s.clone());
        Ok(s)
    }
}

struct Interp<'m, T> {
    module: &'m Module,
    prepared: &'m Prepared,
    weights_key: WeightsKey,
    weights: &'m dyn Weights,
    sizes: [Option<i64>; 3],
    check_finite: bool,
    /// [`super::Options::bf16_inputs`] (f32 runs only).
    bf16_inputs: bool,
    _t: PhantomData<T>,
}

/// The value `v` broadcasts, when `v` is a broadcast that only adds leading axes (its
/// input's shape is the end of its own).
fn leading_broadcast_source(g: &dsc_compiler::ir::Graph, v: Value) -> Option<Value> {
    if !matches!(g.node(v.node).op, Op::Broadcast { .. }) {
        return None;
    }
    let (_, from) = *g.input_edges(v.node).first()?;
    let (out, src) = (&g.ty(v).shape.0, &g.ty(from).shape.0);
    (src.len() < out.len() && out[out.len() - src.len()..] == src[..]).then_some(from)
}

/// The inputs an attention node (`q, k, v[, mask]`) reads when its key and value come
/// through views: `q`, the roots of the key's first part and of the value, the mask,
/// then the roots of the key's other parts (a key concatenated along its last axis is
/// read part by part). `None` when nothing would be saved (no operand is a view or a
/// concat) or a view's last axis is not contiguous.
fn kv_fold(g: &dsc_compiler::ir::Graph, ins: &[Value], masked: bool) -> Option<(Vec<Value>, KvFold)> {
    let (k, v) = (*ins.get(1)?, *ins.get(2)?);
    let parts = match &g.node(k.node).op {
        Op::Concat { axis: 3 } => g.inputs(k.node).to_vec(),
        _ => vec![k],
    };
    let mut folded = parts.len() > 1;
    // Each operand as a view of its root: through the movement nodes before it, or the
    // operand itself read contiguously.
    let mut view = |x: Value| -> Option<(View, Shape)> {
        let shape = g.ty(x).shape.clone();
        let view = match fold_view(g, x) {
            Some(view) => {
                folded = true;
                view
            }
            None => View { root: x, offset: Size::lit(0), strides: strides(&shape.0) },
        };
        (shape.0.len() == 4 && view.strides[3].as_const() == Some(1)).then_some((view, shape))
    };
    let key: Vec<(View, Shape)> = parts.iter().map(|&p| view(p)).collect::<Option<_>>()?;
    let value = view(v)?;
    if !folded {
        return None;
    }
    let mut read = vec![ins[0], key[0].0.root, value.0.root];
    if masked {
        read.push(*ins.get(3)?);
    }
    let at = |input: usize, (View { offset, strides, .. }, shape): (View, Shape)| {
        let [b, s, h, _] = <[Size; 4]>::try_from(strides).expect("rank 4");
        FoldedView { input, offset, strides: [b, s, h], shape }
    };
    let mut views = Vec::new();
    for (i, part) in key.into_iter().enumerate() {
        // The first part's root takes k's place; the others come after the mask.
        let input = if i == 0 {
            1
        } else {
            read.push(part.0.root);
            read.len() - 1
        };
        views.push(at(input, part));
    }
    Some((read, KvFold { key: views, value: at(2, value), mask: masked.then_some(3) }))
}

/// Drop the values no later step reads.
fn release(env: &mut [Vec<Option<Val<'_>>>], steps: &[usize]) {
    for &p in steps {
        env[p] = Vec::new();
    }
}

/// How a node refers to itself in errors: `%n op`, numbered as the printer does.
fn node_name(pos: usize, node: &Node) -> String {
    match &node.op {
        Op::Param { name } => format!("%{pos} param \"{name}\""),
        Op::Input { index, name } => format!("%{pos} input {index} \"{name}\""),
        Op::Call { function, layer } => match layer {
            Some(l) => format!("%{pos} call {function} layer={l}"),
            None => format!("%{pos} call {function}"),
        },
        op => format!("%{pos} {}", op.name()),
    }
}

/// The data of a float tensor of the run's precision.
fn floats<'t, T: Real>(t: &'t Tensor, what: &str) -> Result<&'t [T], KernelError> {
    T::view(t.data()).ok_or_else(|| KernelError::dtype(format!("{what} must be {}, got {}", T::NAME, t.data().kind())))
}

fn graph_err(msg: impl Into<String>) -> KernelError {
    KernelError { kind: ErrorKind::Graph, message: msg.into() }
}

impl<'m, T: Real> Interp<'m, T> {
    /// A launch-table size ([`fold_view`]'s offsets and strides) under the bindings.
    fn eval_size(&self, s: &Size) -> Result<usize, KernelError> {
        // An unbound symbol stands as i64::MAX, which no size of a value fits: its use
        // overflows or fails the views' bounds check.
        let bound = |s: Sym| self.sizes[s as usize].map_or(i64::MAX as u64, |v| v as u64);
        let b = dsc_compiler::ir::Bindings { batch: bound(Sym::Batch), seq: bound(Sym::Seq), cache: bound(Sym::Cache) };
        s.checked_eval(&b)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| KernelError { kind: ErrorKind::Binding, message: format!("a key/value view's size {s:?} does not evaluate") })
    }

    /// A dim under the bindings.
    fn eval_dim(&self, d: &Dim) -> Result<i64, KernelError> {
        let mut v = d.constant_term();
        for s in Sym::ALL {
            let k = d.coeff(s);
            if k != 0 {
                let Some(x) = self.sizes[s as usize] else {
                    return Err(KernelError {
                        kind: ErrorKind::Binding,
                        message: format!("symbol {} in {d} is not determined by the entry's arguments", s.letter()),
                    });
                };
                v += k * x;
            }
        }
        Ok(v)
    }

    fn eval_shape(&self, s: &Shape) -> Result<Vec<usize>, KernelError> {
        s.iter()
            .map(|d| {
                let v = self.eval_dim(d)?;
                usize::try_from(v).map_err(|_| KernelError { kind: ErrorKind::Binding, message: format!("{d} evaluates to {v} < 0") })
            })
            .collect()
    }

    /// A value against its declared type: element type class and concrete shape.
    fn check(&self, t: &Tensor, ty: &Ty, what: &str) -> Result<(), KernelError> {
        let ok = match ty.dtype {
            // A weight kept in its checkpoint's precision stands for any float type.
            d if d.is_float() => T::view(t.data()).is_some() || matches!(t.data(), Data::Bf16(_) | Data::F16(_) | Data::F8(_)),
            DType::I32 => matches!(t.data(), Data::I32(_)),
            DType::I64 => matches!(t.data(), Data::I64(_)),
            DType::Bool => matches!(t.data(), Data::Bool(_)),
            _ => false,
        };
        if !ok {
            let held = if ty.dtype.is_float() { T::NAME } else { ty.dtype.name() };
            return Err(KernelError::dtype(format!("{what} is {} but is declared {} (held as {held})", t.data().kind(), ty)));
        }
        if t.rank() != ty.rank() {
            return Err(KernelError::shape(format!("{what} has shape {:?} but is declared {}", t.shape(), ty.shape)));
        }
        let want = self.eval_shape(&ty.shape)?;
        if t.shape() != want.as_slice() {
            return Err(KernelError::shape(format!("{what} has shape {:?} but is declared {} = {want:?}", t.shape(), ty.shape)));
        }
        Ok(())
    }

    /// Convert an argument or weight to how the run holds its declared dtype: floats to
    /// `T`, integers between widths (failing when a value does not fit).
    fn coerce<'a>(&self, v: Val<'a>, dtype: DType, what: &str) -> Result<Val<'a>, KernelError> {
        let ok = match (dtype, v.data()) {
            (d, x) if d.is_float() => T::view(x).is_some() || !x.is_float(),
            (DType::I32, Data::I32(_)) | (DType::I64, Data::I64(_)) | (DType::Bool, Data::Bool(_)) => true,
            (DType::I32, Data::I64(_)) | (DType::I64, Data::I32(_)) => false,
            _ => true,
        };
        if ok {
            return Ok(v); // as is, or a class mismatch `check` reports
        }
        let out = cast::<T>(v.into_owned(), dtype).map_err(|e| KernelError { message: format!("{what}: {}", e.message), ..e })?;
        Ok(Val::Owned(out))
    }

    /// Evaluate `f` on `args`, with params scoped to `layer`. `stack` holds the functions
    /// being evaluated, to refuse recursion instead of overflowing.
    fn call<'a>(&self, f: &'m Function, layer: Option<u32>, args: Vec<Val<'a>>, stack: &mut Vec<&'m str>) -> Result<Vec<Tensor>, ExecError>
    where
        'm: 'a,
    {
        if stack.contains(&f.name.as_str()) {
            let msg = format!("`{}` calls itself (through {})", f.name, stack.join(" → "));
            return Err(ExecError::new(ErrorKind::Graph, msg));
        }
        stack.push(&f.name);
        let r = self.eval_graph(f, layer, args, stack).map_err(|e| at_fn(e, &f.name));
        stack.pop();
        r
    }

    fn eval_graph<'a>(
        &self,
        f: &'m Function,
        layer: Option<u32>,
        args: Vec<Val<'a>>,
        stack: &mut Vec<&'m str>,
    ) -> Result<Vec<Tensor>, ExecError>
    where
        'm: 'a,
    {
        let g = &f.graph;
        let plan = self.prepared.schedules.get(f)?;
        let kept = if plan.kept > 0 { self.prepared.hoisted.get(&f.name, layer, self.weights_key) } else { None };
        let mut fresh: Vec<Vec<Arc<Tensor>>> = Vec::new();
        if args.len() != plan.n_args {
            let msg = format!("`{}` takes {} arguments, got {}", f.name, plan.n_args, args.len());
            return Err(at_fn(ExecError::new(ErrorKind::Arguments, msg), &f.name));
        }
        let mut args: Vec<Option<Val<'a>>> = args.into_iter().map(Some).collect();
        // The values of each step's node, by step; a step's values are dropped after
        // their last reader.
        let mut env: Vec<Vec<Option<Val<'a>>>> = Vec::with_capacity(plan.steps.len());
        for (j, step) in plan.steps.iter().enumerate() {
            let n = step.node;
            let node = g.node(n);
            let here = |e: KernelError| ExecError {
                kind: e.kind,
                message: e.message,
                function: Some(f.name.clone()),
                node: Some(node_name(step.pos, node)),
                span: node.span,
                calls: Vec::new(),
            };
            let ins = &step.inputs;
            if j + 1 == plan.steps.len() {
                if kept.is_none() && plan.kept > 0 && fresh.len() == plan.kept {
                    self.prepared.hoisted.put(&f.name, layer, HoistedSet { weights: self.weights_key, values: fresh });
                }
                return self.collect_results(ins, &mut env).map_err(here);
            }
            let reused = match (plan.hoist[j], &kept) {
                (Hoist::Interior, Some(_)) => Some(Vec::new()),
                (Hoist::Kept(i), Some(k)) => Some(k.values[i].iter().map(|t| Some(Val::Shared(t.clone()))).collect()),
                _ => None,
            };
            if let Some(outs) = reused {
                env.push(outs);
                release(&mut env, &step.frees);
                continue;
            }
            let outs: Vec<Val<'a>> = match &node.op {
                Op::Input { index, name } => {
                    let a = args
                        .get_mut(*index as usize)
                        .and_then(Option::take)
                        .ok_or_else(|| here(graph_err(format!("argument {index} is missing or used by two inputs"))))?;
                    let ty = node.outputs.first().ok_or_else(|| here(graph_err("an input without a type")))?;
                    vec![self.coerce(a, ty.dtype, &format!("argument `{name}`")).map_err(here)?]
                }
                Op::Param { name } => {
                    let full = param_path(layer, name);
                    let w = self
                        .weights
                        .get(&full)
                        .ok_or_else(|| here(KernelError { kind: ErrorKind::MissingWeight, message: format!("missing weight `{full}`") }))?;
                    let ty = node.outputs.first().ok_or_else(|| here(graph_err("a param without a type")))?;
                    vec![self.coerce(Val::Borrowed(w), ty.dtype, &format!("weight `{full}`")).map_err(here)?]
                }
                Op::Const { value } => {
                    let ty = node.outputs.first().ok_or_else(|| here(graph_err("a constant without a type")))?;
                    vec![Val::Owned(self.constant(value.get(), ty.dtype).map_err(here)?)]
                }
                Op::Call { function, layer: call_layer } => {
                    let callee = self
                        .module
                        .function(function)
                        .ok_or_else(|| here(KernelError { kind: ErrorKind::Entry, message: format!("no function `{function}`") }))?;
                    let scope = match (call_layer, layer) {
                        (Some(l), None) => Some(*l),
                        (None, outer) => outer,
                        (Some(l), Some(outer)) => {
                            let msg = format!("a call scoped to layer {l} inside layer {outer}: param scopes do not nest");
                            return Err(here(KernelError { kind: ErrorKind::Unsupported, message: msg }));
                        }
                    };
                    // A value the call reads last goes in owned, so the callee can reuse
                    // its buffer (a layer appends to its KV cache in place).
                    let mut moved: Vec<Option<Tensor>> =
                        ins.iter().zip(&step.last).map(|(v, &last)| if last { Self::take(&mut env, *v) } else { None }).collect();
                    let call_args: Vec<Val<'_>> = ins
                        .iter()
                        .zip(moved.iter_mut())
                        .map(|(v, m)| match m.take() {
                            Some(t) => Ok(Val::Owned(t)),
                            None => Self::value(&env, *v).map(Val::Borrowed),
                        })
                        .collect::<Result<_, _>>()
                        .map_err(here)?;
                    let results = self.call(callee, scope, call_args, stack).map_err(|mut e| {
                        e.calls.push(format!("`{}` {}", f.name, node_name(step.pos, node)));
                        e
                    })?;
                    results.into_iter().map(Val::Owned).collect()
                }
                Op::Attention { heads, kv_heads, scale, causal, lse, .. } if step.kv.is_some() => {
                    let fold = step.kv.as_ref().expect("guarded");
                    let started = super::profile::start();
                    let value = |i: usize| Self::value(&env, ins[i]);
                    let view = |f: &FoldedView| -> Result<KvView<'_>, KernelError> {
                        let shape = self.eval_shape(&f.shape)?;
                        let size = |s: &Size| self.eval_size(s);
                        Ok(KvView {
                            data: value(f.input)?,
                            offset: size(&f.offset)?,
                            strides: [size(&f.strides[0])?, size(&f.strides[1])?, size(&f.strides[2])?],
                            shape: [shape[0], shape[1], shape[2], shape[3]],
                        })
                    };
                    let run = || -> Result<Vec<Tensor>, KernelError> {
                        let key: Vec<KvView> = fold.key.iter().map(view).collect::<Result<_, _>>()?;
                        let v = view(&fold.value)?;
                        let mask = fold.mask.map(value).transpose()?;
                        let spec =
                            AttentionSpec { heads: *heads as usize, kv_heads: *kv_heads as usize, scale: scale.get(), causal: *causal };
                        let (o, l) = attention_views::<T>(value(0)?, &key, &v, mask, spec, *lse)?;
                        Ok(std::iter::once(o).chain(l).collect())
                    };
                    let result = run();
                    super::profile::record("attention", started);
                    result.map_err(here)?.into_iter().map(Val::Owned).collect()
                }
                op => {
                    if !op.arity().accepts(ins.len()) {
                        return Err(here(graph_err(format!("takes {} inputs, got {}", op.arity(), ins.len()))));
                    }
                    // A reshape or cast that is the last reader of an owned value takes it,
                    // and so does a cache append its first operand (appending in place).
                    let movable = match op {
                        Op::Reshape { .. } | Op::Cast { .. } => ins.len() == 1 && step.last[0],
                        Op::CacheAppend { .. } => step.last[0],
                        _ => false,
                    };
                    let taken = if movable { Self::take(&mut env, ins[0]) } else { None };
                    let started = super::profile::start();
                    let result = match taken {
                        Some(t) => {
                            let rest: Vec<&Tensor> =
                                ins[1..].iter().map(|v| Self::value(&env, *v)).collect::<Result<_, _>>().map_err(here)?;
                            self.exec_owned(op, t, &rest)
                        }
                        None => {
                            let vals: Vec<&Tensor> = ins.iter().map(|v| Self::value(&env, *v)).collect::<Result<_, _>>().map_err(here)?;
                            self.exec(op, &vals)
                        }
                    };
                    super::profile::record(op.name(), started);
                    result.map_err(here)?.into_iter().map(Val::Owned).collect()
                }
            };
            if outs.len() != node.outputs.len() {
                let msg = format!("produced {} values but declares {}", outs.len(), node.outputs.len());
                return Err(here(graph_err(msg)));
            }
            for (i, (t, ty)) in outs.iter().zip(&node.outputs).enumerate() {
                let what = if outs.len() == 1 { "the result".to_string() } else { format!("result {i}") };
                self.check(t, ty, &what).map_err(here)?;
                // A call's results were checked inside it, where the first bad node is.
                if self.check_finite && !matches!(node.op, Op::Call { .. }) {
                    if let Some((i, k)) = t.first_non_finite() {
                        let message =
                            format!("{what} holds a non-finite value ({k}) at element {i}: the first node of the run to make one");
                        return Err(here(KernelError { kind: ErrorKind::Numeric, message }));
                    }
                }
            }
            let outs = match plan.hoist[j] {
                Hoist::Kept(_) => {
                    let shared: Vec<Arc<Tensor>> = outs.into_iter().map(|v| Arc::new(v.into_owned())).collect();
                    fresh.push(shared.clone());
                    shared.into_iter().map(Val::Shared).collect()
                }
                _ => outs,
            };
            env.push(outs.into_iter().map(Some).collect());
            release(&mut env, &step.frees);
        }
        unreachable!("the return is the last step")
    }

    fn value<'e>(env: &'e [Vec<Option<Val<'_>>>], (step, output): (usize, u32)) -> Result<&'e Tensor, KernelError> {
        env.get(step)
            .and_then(|outs| outs.get(output as usize))
            .and_then(|o| o.as_deref())
            .ok_or_else(|| graph_err(format!("reads output {output} of a node that has no such value")))
    }

    /// Remove an owned value from the environment (for its last reader); borrowed values
    /// stay, since moving them would not save a copy.
    fn take(env: &mut [Vec<Option<Val<'_>>>], (step, output): (usize, u32)) -> Option<Tensor> {
        let slot = env.get_mut(step)?.get_mut(output as usize)?;
        match slot.take()? {
            Val::Owned(t) => Some(t),
            b => {
                *slot = Some(b);
                None
            }
        }
    }

    /// The return's values, each taken from the environment at its last occurrence and
    /// copied for earlier ones.
    fn collect_results(&self, ins: &[(usize, u32)], env: &mut [Vec<Option<Val<'_>>>]) -> Result<Vec<Tensor>, KernelError> {
        let mut out = Vec::with_capacity(ins.len());
        for (i, v) in ins.iter().enumerate() {
            if ins[i + 1..].contains(v) {
                out.push(Self::value(env, *v)?.clone());
            } else {
                let slot = env.get_mut(v.0).and_then(|o| o.get_mut(v.1 as usize)).and_then(Option::take);
                let t = slot.ok_or_else(|| graph_err("the return reads a missing value"))?;
                out.push(t.into_owned());
            }
        }
        Ok(out)
    }

    fn constant(&self, v: f64, dtype: DType) -> Result<Tensor, KernelError> {
        Ok(match dtype {
            d if d.is_float() => Tensor::from_parts(Vec::new(), T::wrap(vec![T::of(v)])),
            DType::Bool => Tensor::bool(&[], vec![v != 0.0]),
            d => cast::<T>(Tensor::f64(&[], vec![v]), d)?,
        })
    }

    /// Ops that can reuse their first input's buffer, given it (`rest` are the others).
    fn exec_owned(&self, op: &Op, x: Tensor, rest: &[&Tensor]) -> Result<Vec<Tensor>, KernelError> {
        match op {
            Op::Reshape { shape } => Ok(vec![self.reshape(x, shape)?]),
            Op::Cast { to } => Ok(vec![cast::<T>(x, *to)?]),
            Op::CacheAppend { axis } if *axis as usize >= x.rank() => {
                Err(KernelError::shape(format!("axis {axis} out of range for rank {}", x.rank())))
            }
            Op::CacheAppend { axis } if rest.iter().all(|r| r.data().kind() == x.data().kind()) => {
                Ok(vec![concat_onto(x, rest, *axis as usize)?])
            }
            // A cache held in bf16 (`Options::bf16_cache`) takes its new entries rounded.
            Op::CacheAppend { axis } if x.as_bf16_bits().is_some() => {
                let rounded: Vec<Tensor> = rest
                    .iter()
                    .map(|r| round_bf16::<T>(r).ok_or_else(|| KernelError::dtype(format!("a {} entry for a bf16 cache", r.data().kind()))))
                    .collect::<Result<_, _>>()?;
                Ok(vec![concat_onto(x, &rounded.iter().collect::<Vec<_>>(), *axis as usize)?])
            }
            _ => {
                let mut all = vec![&x];
                all.extend_from_slice(rest);
                self.exec(op, &all)
            }
        }
    }

    /// A fused kernel, step by step with the unfused kernels (so fusing never changes a
    /// result in this interpreter: each intermediate is materialised, then dropped).
    fn fused(&self, k: &FusedKernel, x: &[&Tensor]) -> Result<Tensor, KernelError> {
        let head = match k.head {
            Some(h) if x.len() >= 2 => Some(self.exec(&h.op(), &x[..2])?.remove(0)),
            Some(_) => return Err(graph_err("a fused kernel's head reads two inputs")),
            None => None,
        };
        let mut steps: Vec<Tensor> = Vec::with_capacity(k.steps.len());
        for (j, s) in k.steps.iter().enumerate() {
            let args: Vec<&Tensor> = s
                .args
                .iter()
                .map(|a| match *a {
                    Operand::Head => head.as_ref(),
                    Operand::Input(i) => x.get(i as usize).copied(),
                    Operand::Step(i) if (i as usize) < j => steps.get(i as usize),
                    Operand::Step(_) => None,
                })
                .collect::<Option<_>>()
                .ok_or_else(|| graph_err(format!("fused step s{j} reads a value not defined before it")))?;
            let y = self.exec(&s.op.op(), &args)?.remove(0);
            steps.push(y);
        }
        match steps.pop().or(head) {
            Some(t) => Ok(t),
            None => Err(graph_err("an empty fused kernel")),
        }
    }

    fn reshape(&self, x: Tensor, shape: &Shape) -> Result<Tensor, KernelError> {
        let want = self.eval_shape(shape)?;
        let from = x.shape().to_vec();
        x.reshape(want.clone())
            .map_err(|_| KernelError::shape(format!("cannot reshape {from:?} ({} elements) to {shape} = {want:?}", numel(&from))))
    }

    /// One primitive or composite op on its inputs (arity already checked).
    fn exec(&self, op: &Op, x: &[&Tensor]) -> Result<Vec<Tensor>, KernelError> {
        let one = |t: Tensor| Ok(vec![t]);
        let axis = |a: u8, t: &Tensor| -> Result<usize, KernelError> {
            let a = a as usize;
            if a < t.rank() {
                Ok(a)
            } else {
                Err(KernelError::shape(format!("axis {a} out of range for rank {}", t.rank())))
            }
        };
        // Weights kept in their checkpoint's precision (bf16, f16, FP8): the ops that read
        // weights take them as they are, the movement ops move bf16 bits when every float
        // operand is bf16, a lookup widens the rows it takes, and any other op gets such
        // operands widened to the run's precision first.
        let bf16 = |t: &Tensor| matches!(t.data(), Data::Bf16(_));
        let stored = |t: &Tensor| matches!(t.data(), Data::Bf16(_) | Data::F16(_) | Data::F8(_));
        if x.iter().any(|t| stored(t)) {
            let native = match op {
                Op::MatMul | Op::SwiGlu => !stored(x[0]),
                Op::BatchMatMul => !stored(x[0]) && (bf16(x[1]) || !stored(x[1])),
                // Its steps go through `exec` one by one, each widening what it must
                // (a matmul head reads its weight in place).
                Op::Fused(_) => true,
                Op::ExpertFfn => !stored(x[0]) && !stored(x[2]),
                Op::Gather { axis: 0 } if narrow(x[0]).is_some() && x[0].rank() == 2 && !stored(x[1]) => true,
                Op::Gather { .. }
                | Op::Slice { .. }
                | Op::Permute { .. }
                | Op::Reshape { .. }
                | Op::Broadcast { .. }
                | Op::Concat { .. } => x.iter().all(|t| bf16(t) || !(t.data().is_float() || stored(t))),
                _ => false,
            };
            if !native {
                // bf16 and f16 widen exactly; FP8 is dequantised by its block scales. The
                // other operands are passed as they are, not copied.
                let wide: Vec<Option<Tensor>> = x.iter().map(|t| widen_stored::<T>(t)).collect();
                let args: Vec<&Tensor> = x.iter().zip(&wide).map(|(&t, w)| w.as_ref().unwrap_or(t)).collect();
                return self.exec(op, &args);
            }
        }
        match op {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Call { .. } | Op::Return => {
                Err(graph_err(format!("{} is not evaluated as an op", op.name())))
            }
            Op::MatMul => {
                let (a, w) = (x[0], x[1]);
                let (Some(&k), [n, wk]) = (a.shape().last(), w.shape()) else {
                    return Err(KernelError::shape(format!("matmul of {:?} by weight {:?}", a.shape(), w.shape())));
                };
                if *wk != k {
                    return Err(KernelError::shape(format!("matmul: x {:?} contracts {k}, weight {:?} takes {wk}", a.shape(), w.shape())));
                }
                let av = floats::<T>(a, "matmul x")?;
                let m = av.len().checked_div(k).unwrap_or_else(|| numel(&a.shape()[..a.rank() - 1]));
                let y = match (w.as_bf16_bits(), narrow(w)) {
                    (Some(bits), _) => linear_bf16(av, m, k, bits, *n, true, self.bf16_inputs)?,
                    (None, Some(wn)) => linear_narrow(av, m, k, wn, 0, *n, true)?,
                    (None, None) => linear(av, m, k, floats::<T>(w, "matmul weight")?, *n, true)?,
                };
                let mut shape = a.shape().to_vec();
                *shape.last_mut().expect("rank >= 1") = *n;
                one(Tensor::from_parts(shape, T::wrap(y)))
            }
            Op::BatchMatMul => {
                let a = floats::<T>(x[0], "batch_matmul a")?;
                let (shape, y) = match x[1].as_bf16_bits() {
                    Some(bits) => batch_matmul_bf16(a, x[0].shape(), bits, x[1].shape())?,
                    None => batch_matmul(a, x[0].shape(), floats::<T>(x[1], "batch_matmul b")?, x[1].shape())?,
                };
                one(Tensor::from_parts(shape, T::wrap(y)))
            }
            Op::Unary(u) => one(unary::<T>(*u, x[0])?),
            Op::Binary(b) => one(binary::<T>(*b, x[0], x[1])?),
            Op::Select => one(select(x[0], x[1], x[2])?),
            Op::Reduce { op: r, axis: a, keepdim } => one(reduce::<T>(x[0], *r, axis(*a, x[0])?, *keepdim)?),
            Op::Softmax { axis: a } => one(softmax::<T>(x[0], axis(*a, x[0])?)?),
            // An embedding kept in f16 or FP8: the rows looked up, widened.
            Op::Gather { axis: 0 } if narrow(x[0]).is_some() => {
                match gather_rows::<T>(x[0], &indices(x[1], "gather indices")?, x[1].shape()) {
                    Some(rows) => one(rows?),
                    None => Err(KernelError::dtype(format!("a gather from {} data of rank {}", x[0].data().kind(), x[0].rank()))),
                }
            }
            Op::Gather { axis: a } => one(gather(x[0], x[1], axis(*a, x[0])?)?),
            Op::ScatterAdd { axis: a } => one(scatter_add(x[0], x[1], x[2], axis(*a, x[0])?)?),
            Op::TopK { k, axis: a } => {
                let (v, i) = top_k(x[0], *k as usize, axis(*a, x[0])?)?;
                Ok(vec![v, i])
            }
            Op::Reshape { shape } => one(self.reshape(x[0].clone(), shape)?),
            Op::Permute { perm } => one(permute(x[0], &perm.iter().map(|&p| p as usize).collect::<Vec<_>>())?),
            Op::Broadcast { shape } => one(broadcast(x[0], &self.eval_shape(shape)?)?),
            Op::Slice { axis: a, start, len } => {
                let ax = axis(*a, x[0])?;
                let (s, l) = (self.eval_dim(start)?, self.eval_dim(len)?);
                let n = x[0].shape()[ax] as i64;
                if s < 0 || l < 0 || s + l > n {
                    return Err(KernelError::shape(format!("slice {start}..{start}+{len} = {s}..{} of an axis of {n}", s + l)));
                }
                one(slice(x[0], ax, s as usize, l as usize)?)
            }
            Op::Concat { axis: a } | Op::CacheAppend { axis: a } => one(concat(x, axis(*a, x[0])?)?),
            Op::Cast { to } => one(cast::<T>(x[0].clone(), *to)?),
            Op::Iota { start, len, dtype } => {
                let (s, n) = (self.eval_dim(start)?, self.eval_dim(len)?);
                let n = usize::try_from(n).map_err(|_| KernelError::shape(format!("iota of length {len} = {n}")))?;
                one(cast::<T>(Tensor::i64(&[n], (s..s + n as i64).collect()), *dtype)?)
            }
            Op::RopeFreqs { theta, rotary_dim, yarn } => {
                let (f, _) = rope_frequencies(theta.get(), *rotary_dim as usize, yarn.as_ref());
                one(Tensor::from_parts(vec![f.len()], T::wrap(f.into_iter().map(T::of).collect())))
            }
            Op::Fused(k) => one(self.fused(k, x)?),
            Op::RmsNorm { eps } => one(rms_norm::<T>(x[0], x[1], eps.get())?),
            Op::Rope { layout, theta, rotary_dim, yarn } => {
                one(rope::<T>(x[0], x[1], *layout, theta.get(), *rotary_dim as usize, yarn.as_ref())?)
            }
            Op::Attention { heads, kv_heads, scale, causal, masked, lse: false } => {
                let spec = AttentionSpec { heads: *heads as usize, kv_heads: *kv_heads as usize, scale: scale.get(), causal: *causal };
                one(attention::<T>(x[0], x[1], x[2], if *masked { Some(x[3]) } else { None }, spec)?)
            }
            Op::Attention { heads, kv_heads, scale, causal, masked, lse: true } => {
                let spec = AttentionSpec { heads: *heads as usize, kv_heads: *kv_heads as usize, scale: scale.get(), causal: *causal };
                let (o, l) = attention_lse::<T>(x[0], x[1], x[2], if *masked { Some(x[3]) } else { None }, spec)?;
                Ok(vec![o, l])
            }
            Op::WeightGrad => one(weight_grad::<T>(x[0], x[1])?),
            Op::RmsNormGrad { eps } => {
                let (dx, dg) = rms_norm_grad::<T>(x[0], x[1], x[2], eps.get())?;
                Ok(vec![dx, dg])
            }
            Op::AttentionGrad { heads, kv_heads, scale, causal, masked } => {
                let spec = AttentionSpec { heads: *heads as usize, kv_heads: *kv_heads as usize, scale: scale.get(), causal: *causal };
                let (mask, rest) = if *masked { (Some(x[3]), &x[4..]) } else { (None, &x[3..]) };
                let (dq, dk, dv) = attention_grad::<T>(x[0], x[1], x[2], mask, rest[0], rest[1], rest[2], spec)?;
                Ok(vec![dq, dk, dv])
            }
            Op::SwiGluGrad => Ok(swiglu_grad::<T>(x[0], x[1], x[2], x[3], x[4])?.into()),
            Op::ExpertFfnGrad => Ok(expert_ffn_grad::<T>(x[0], x[1], x[2], x[3], x[4], x[5], x[6])?.into()),
            Op::MoeRouteGrad(r) => one(moe_route_grad::<T>(x[0], x[1], x[2], r)?),
            Op::CrossEntropyGrad { ignore_index } => one(cross_entropy_grad::<T>(x[0], x[1], x[2], *ignore_index)?),
            Op::TokenLogProbGrad { ignore_index } => one(token_logprob_grad::<T>(x[0], x[1], x[2], *ignore_index)?),
            Op::MoeRoute(r) => {
                let (i, w) = moe_route::<T>(x[0], x.get(1).copied().filter(|_| r.selection_bias), r)?;
                Ok(vec![i, w])
            }
            Op::MoeRouteReplay(r) => {
                let (i, w) = moe_route_replay::<T>(x[0], x[1], r)?;
                Ok(vec![i, w])
            }
            Op::ExpertFfn => one(expert_ffn::<T>(x[0], x[1], x[2], x[3], x[4], x[5], self.bf16_inputs)?),
            Op::SwiGlu => one(swiglu::<T>(x[0], x[1], x[2], x[3], self.bf16_inputs)?),
            Op::CrossEntropy { ignore_index } => one(cross_entropy::<T>(x[0], x[1], *ignore_index)?),
            Op::TokenLogProb { ignore_index } => one(token_logprob::<T>(x[0], x[1], *ignore_index)?),
        }
    }
}
