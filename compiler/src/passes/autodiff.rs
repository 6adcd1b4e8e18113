//! `autodiff`: reverse-mode differentiation of the train entry, layer by layer, as IR.
//!
//! ```text
//!   fn train.layer.moe(x, pos) → y                      fn train.layer.moe(x, pos) → (y, saved.0, saved.1, …)
//!   fn train(ids, pos, labels) → (loss, …)     ──▶      fn train.layer.moe.bwd(d.0, x, saved.0, …) → (dx, d params…)
//!                                                       fn train(ids, pos, labels, d.0, …) → (loss, …, d params…)
//! ```
//!
//! Layers stay functions. A layer function `F` becomes its own forward, returning after
//! its results the **residuals** its backward needs; a generated `F.bwd` takes the
//! cotangents of `F`'s differentiable results and those residuals and returns the
//! cotangents of `F`'s float arguments, then the gradients of `F`'s params (by name,
//! scoped by the call's `layer` like the forward's). The entry calls `F.bwd` once per call
//! of `F`, in reverse order, so V3's 61 layers stay two function bodies plus their
//! backward bodies, never unrolled.
//!
//! # The differentiated entry
//!
//! The train entry is rewritten in place: after its own arguments it takes one
//! **cotangent** per differentiable result (`d.{i}`, the result's type), and after its own
//! results it returns the gradient of `Σ_i d.i · result_i` for every param that has one,
//! in param-path order. [`crate::ir::Gradients`] on the module records which results are
//! seeded and which params follow. Seeding with arguments rather than fixing the
//! objective in the graph is what lets one compiled module serve `dsc grad` (main loss
//! only: seeds `1, 0, 0`), SFT with MTP and balance losses (`1, 1, 1`), and a policy
//! gradient whose cotangent is a per-token tensor.
//!
//! # Residuals and recomputation
//!
//! Every forward value a derivative rule reads is, in the backward function, either a
//! **residual** (an argument the forward returns), or **recomputed** there from other
//! values by a copy of its forward node. [`Recompute`] chooses: layout ops (`reshape`,
//! `permute`, `broadcast`, `slice`, `concat`, `cast`) are always recomputed (they cost a
//! copy at most, and saving them would store the same elements twice); `norms` also
//! recomputes RMSNorm outputs and `mla` the MLA up-projections (`q_b_proj`, `kv_b_proj`),
//! as DeepSeek-V3 §3.2.3 does; `layer` keeps only the layer's arguments and recomputes
//! the whole forward in the backward. The function's arguments themselves are never
//! returned again: `F.bwd`'s call site passes the caller's values.
//!
//! # Rules
//!
//! One derivative rule per op, in [`Sweep::rule`], each with its math; the op's
//! `## Derivative` section in `ir/op.rs` says the same. The composites have their own
//! backward kernels (`rms_norm_grad`, `attention_grad`, …); the forward attention of a
//! train graph is switched to emit its log-sum-exp (`lse`) so `attention_grad` never
//! needs the `[b, h, s, s]` probabilities. Gradients stop at integer values and at
//! selections (`moe_route`'s indices, `top_k`'s indices, comparisons): the router's
//! gradient reaches the logits only through the chosen experts' gate weights, and the
//! selection bias takes none.
//!
//! Numerics are checked by finite differences in f64, per rule and for whole tiny models
//! of every family (`tests/tests/autodiff.rs`), and against PyTorch's autograd on the
//! transformers fixtures (`tests/tests/train_parity.rs`).

use super::{Changed, Pass, PassCx, PassError, Phase};
use crate::ir::{
    param_path, BinaryOp, DType, Dim, Function, Gradients, Graph, Mode, Module, NodeId, Op, ReduceOp, Signature, Ty, UnaryOp, Value,
};
use dsc_dsl::span::Span;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Appends the reverse pass to the train entry.
pub struct Autodiff;

/// Which forward values the backward recomputes instead of keeping (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Recompute {
    /// Keep every value a rule reads (layout ops excepted).
    #[default]
    None,
    /// Also recompute RMSNorm outputs.
    Norms,
    /// Also recompute the MLA up-projections (`q_b_proj`, `kv_b_proj`), as DeepSeek-V3.
    Mla,
    /// Keep only each layer's arguments; the backward runs the layer's forward again.
    Layer,
}

impl Recompute {
    pub const ALL: [Recompute; 4] = [Recompute::None, Recompute::Norms, Recompute::Mla, Recompute::Layer];

    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Norms => "norms",
            Recompute::Mla => "mla",
            Recompute::Layer => "layer",
        }
    }

    pub fn parse(s: &str) -> Option<Recompute> {
        Recompute::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// What a training compile asks of autodiff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainOptions {
    pub recompute: Recompute,
    /// Multi-token prediction trains its modules but sends no gradient into the trunk
    /// through the hidden state it reads (the shared embedding and head still get theirs).
    pub mtp_stop_gradient: bool,
}

impl Pass for Autodiff {
    fn name(&self) -> &'static str {
        "autodiff"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn phase(&self) -> Option<Phase> {
        Some(Phase::Differentiated)
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let Some(entry) = m.entries.get(&Mode::Train).cloned() else { return Ok(Changed::No) };
        if m.gradients.is_some() {
            // Already differentiated (a pipeline run twice): nothing to add.
            return Ok(Changed::No);
        }
        let summary = differentiate(m, &entry, cx.train)?;
        cx.report(self.name(), summary);
        Ok(Changed::Yes)
    }
}

/// Where a backward function's residual argument comes from at the call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Residual {
    /// The call's own argument `i` (never returned again).
    Arg(u32),
    /// A value the forward returns after its own results.
    Out(Value),
}

/// What the entry needs to call a layer's backward.
struct Backward {
    name: String,
    sig: Signature,
    /// The forward's results before the residuals.
    results: usize,
    /// Which results take a cotangent (in the backward's argument order).
    seeds: Vec<usize>,
    residuals: Vec<Residual>,
    /// The forward's arguments whose cotangents the backward returns, in order.
    dinputs: Vec<u32>,
    /// The params (relative names) whose gradients follow.
    dparams: Vec<String>,
}

fn differentiate(m: &mut Module, entry: &str, opts: TrainOptions) -> Result<String, PassError> {
    let fail =
        |f: &str, msg: String| PassError { problems: vec![super::Problem { function: f.into(), node: None, span: None, message: msg }] };
    let ef = m.function(entry).ok_or_else(|| PassError::new(format!("no entry function `{entry}`")))?;
    // Callees in order of first call.
    let mut callees: Vec<String> = Vec::new();
    let order = ef.graph.topo_order().map_err(|_| fail(entry, "the entry has a cycle".into()))?;
    for &n in &order {
        if let Op::Call { function, .. } = &ef.graph.node(n).op {
            if !callees.contains(function) {
                callees.push(function.clone());
            }
        }
    }

    let mut backward: HashMap<String, Backward> = HashMap::new();
    let mut active_out: HashMap<String, Vec<bool>> = HashMap::new();
    let mut saved_total = 0usize;
    for name in &callees {
        let f = m.function_mut(name).ok_or_else(|| fail(entry, format!("calls a missing function `{name}`")))?;
        mark_lse(&mut f.graph);
        let (bwd, info) = split_function(f, opts.recompute)?;
        saved_total += info.residuals.iter().filter(|r| matches!(r, Residual::Out(_))).count();
        let mut act = vec![false; info.results];
        for &i in &info.seeds {
            act[i] = true;
        }
        active_out.insert(name.clone(), act);
        m.add_function(bwd);
        backward.insert(name.clone(), info);
    }

    // The entry: calls now return the residuals too.
    let sigs: HashMap<String, Signature> = callees.iter().map(|c| (c.clone(), m.signature(c).unwrap_or_default())).collect();
    let f = m.function_mut(entry).expect("checked above");
    mark_lse(&mut f.graph);
    for n in f.graph.nodes() {
        if let Op::Call { function, .. } = &f.graph.node(n).op {
            let outs = sigs[function].outputs.clone();
            f.graph.node_mut(n).outputs = outs;
        }
    }
    let src = f.graph.clone();
    let active = activity(&src, false, &active_out).map_err(|(n, msg)| PassError::at(entry, &src, n, msg))?;
    let ret = src.return_node().ok_or_else(|| fail(entry, "the entry has no return".into()))?;
    let results = src.inputs(ret);
    let n_args = src.arguments().len() as u32;

    let mut sw = Sweep::new(&src, &mut f.graph, None, &active);
    sw.calls = Some((&backward, opts.mtp_stop_gradient));
    let mut seeds = Vec::new();
    for (i, v) in results.iter().enumerate() {
        if active.contains(v) {
            let ty = src.ty(*v).clone();
            let d = sw.t.input(n_args + seeds.len() as u32, &format!("d.{i}"), ty, src.node(ret).span);
            sw.accumulate(*v, d.into()).map_err(|msg| PassError::at(entry, &src, ret, msg))?;
            seeds.push(i);
        }
    }
    sw.run().map_err(|(n, msg)| PassError::at(entry, &src, n, msg))?;

    // Gradients by full param path: the entry's own params, then what the calls returned.
    let mut grads: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for n in src.nodes() {
        if let Op::Param { name } = &src.node(n).op {
            if let Some(&d) = sw.acc.get(&n.out(0)) {
                grads.entry(name.clone()).or_default().push(d);
            }
        }
    }
    for (path, d) in std::mem::take(&mut sw.param_grads) {
        grads.entry(path).or_default().push(d);
    }
    let mut outs = results.clone();
    let mut params = Vec::new();
    for (path, ds) in grads {
        let mut total = ds[0];
        for d in &ds[1..] {
            total = sw.bin(BinaryOp::Add, total, *d).map_err(|msg| PassError::at(entry, &src, ret, msg))?;
        }
        outs.push(total);
        params.push(path);
    }
    let span = src.node(ret).span;
    drop(sw);
    f.graph.remove(ret);
    f.graph.ret(&outs, span);
    let n_grads = params.len();
    m.gradients = Some(Gradients { results: results.len(), seeds, params });
    Ok(format!(
        "{} layer function(s) differentiated, {saved_total} residual value(s) saved (recompute = {}), {n_grads} gradients",
        callees.len(),
        opts.recompute.name()
    ))
}

/// Train-mode attention emits its log-sum-exp for the backward.
fn mark_lse(g: &mut Graph) {
    for n in g.nodes() {
        if let Op::Attention { heads, kv_heads, scale, causal, masked, lse: false } = g.node(n).op {
            let out = g.node(n).outputs[0].clone();
            let node = g.node_mut(n);
            node.op = Op::Attention { heads, kv_heads, scale, causal, masked, lse: true };
            node.outputs.push(Ty::new(DType::F32, [out.shape[0], out.shape[1], out.shape[2]]));
        }
    }
}

/// The values of `g` that depend differentiably on a param (or, with `inputs`, on a float
/// argument): float values computed from an active value. A call's result is active when
/// the callee's is (`callees`) and the call reads an active value.
fn activity(g: &Graph, inputs: bool, callees: &HashMap<String, Vec<bool>>) -> Result<HashSet<Value>, (NodeId, String)> {
    let order = g.topo_order().map_err(|c| (c.0[0], "cycle".to_string()))?;
    let mut active = HashSet::new();
    for n in order {
        let node = g.node(n);
        let ins = g.inputs(n);
        let any_in = ins.iter().any(|v| active.contains(v));
        for (i, ty) in node.outputs.iter().enumerate() {
            let on = ty.dtype.is_float()
                && match &node.op {
                    Op::Input { .. } => inputs,
                    Op::Param { .. } => true,
                    Op::Const { .. } | Op::Iota { .. } | Op::RopeFreqs { .. } => false,
                    Op::Call { function, .. } => any_in && callees.get(function).is_some_and(|a| a.get(i).copied().unwrap_or(false)),
                    _ => any_in,
                };
            if on {
                active.insert(n.out(i as u16));
            }
        }
    }
    Ok(active)
}

/// Builds `F.bwd` for layer function `f` and makes `f` return the residuals it keeps.
fn split_function(f: &mut Function, policy: Recompute) -> Result<(Function, Backward), PassError> {
    let src = f.graph.clone();
    let active = activity(&src, true, &HashMap::new()).map_err(|(n, msg)| PassError::at(&f.name, &src, n, msg))?;
    let ret = src.return_node().ok_or_else(|| PassError::new(format!("`{}` has no return", f.name)))?;
    let results = src.inputs(ret);
    let mut bwd = Function::new(&format!("{}.bwd", f.name));
    let mut sw = Sweep::new(&src, &mut bwd.graph, Some(policy), &active);
    let span = src.node(ret).span;
    let mut seeds = Vec::new();
    for (i, v) in results.iter().enumerate() {
        if active.contains(v) {
            let d = sw.t.input(sw.next_input, &format!("d.{i}"), src.ty(*v).clone(), span);
            sw.next_input += 1;
            sw.accumulate(*v, d.into()).map_err(|msg| PassError::at(&f.name, &src, ret, msg))?;
            seeds.push(i);
        }
    }
    sw.run().map_err(|(n, msg)| PassError::at(&f.name, &src, n, msg))?;

    let mut outs = Vec::new();
    let mut dinputs = Vec::new();
    let mut args: Vec<(u32, NodeId)> = src
        .arguments()
        .into_iter()
        .filter_map(|n| match src.node(n).op {
            Op::Input { index, .. } => Some((index, n)),
            _ => None,
        })
        .collect();
    args.sort();
    for (index, n) in args {
        if !src.node(n).ty().dtype.is_float() {
            continue;
        }
        let d = match sw.acc.get(&n.out(0)) {
            Some(&d) => d,
            None => sw.zeros(src.node(n).ty()).map_err(|msg| PassError::at(&f.name, &src, n, msg))?,
        };
        outs.push(d);
        dinputs.push(index);
    }
    let mut params: Vec<(String, Value)> = src
        .nodes()
        .into_iter()
        .filter_map(|n| match &src.node(n).op {
            Op::Param { name } => sw.acc.get(&n.out(0)).map(|&d| (name.clone(), d)),
            _ => None,
        })
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    outs.extend(params.iter().map(|p| p.1));
    let residuals = std::mem::take(&mut sw.residuals);
    drop(sw);
    bwd.graph.ret(&outs, span);

    // The forward returns its results, then the saved residuals.
    let mut fwd_outs = results.clone();
    fwd_outs.extend(residuals.iter().filter_map(|r| match r {
        Residual::Out(v) => Some(*v),
        Residual::Arg(_) => None,
    }));
    f.graph.remove(ret);
    f.graph.ret(&fwd_outs, span);
    let info = Backward {
        name: bwd.name.clone(),
        sig: bwd.graph.signature(),
        results: results.len(),
        seeds,
        residuals,
        dinputs,
        dparams: params.into_iter().map(|p| p.0).collect(),
    };
    Ok((bwd, info))
}

type R<T> = Result<T, String>;

/// One reverse sweep over `src`, emitting into `t`. For the entry, `t` is `src`'s own
/// graph and a forward value is itself; for a layer, `t` is the backward function and
/// forward values are residual arguments or recomputed ([`Sweep::primal`]).
struct Sweep<'a> {
    src: &'a Graph,
    t: &'a mut Graph,
    /// `None` for the entry (forward values are at hand), else the layer's policy.
    policy: Option<Recompute>,
    active: &'a HashSet<Value>,
    /// The cotangent accumulated so far for each forward value.
    acc: HashMap<Value, Value>,
    span: Option<Span>,
    // ---- layer backward: how forward values reach `t`
    cloned: HashMap<NodeId, NodeId>,
    saved: HashMap<Value, Value>,
    residuals: Vec<Residual>,
    next_input: u32,
    // ---- entry: the layers' backward functions, and the MTP stop-gradient option
    calls: Option<(&'a HashMap<String, Backward>, bool)>,
    param_grads: Vec<(String, Value)>,
}

impl<'a> Sweep<'a> {
    fn new(src: &'a Graph, t: &'a mut Graph, policy: Option<Recompute>, active: &'a HashSet<Value>) -> Sweep<'a> {
        Sweep {
            src,
            t,
            policy,
            active,
            acc: HashMap::new(),
            span: None,
            cloned: HashMap::new(),
            saved: HashMap::new(),
            residuals: Vec::new(),
            next_input: 0,
            calls: None,
            param_grads: Vec::new(),
        }
    }

    /// Visit every node in reverse order, turning its results' cotangents into its
    /// inputs' with the node's rule.
    fn run(&mut self) -> Result<(), (NodeId, String)> {
        let order = self.src.topo_order().map_err(|c| (c.0[0], "cycle".to_string()))?;
        for &n in order.iter().rev() {
            let node = self.src.node(n);
            if node.op.is_leaf() || matches!(node.op, Op::Return) {
                continue;
            }
            let douts: Vec<Option<Value>> = (0..node.outputs.len()).map(|i| self.acc.get(&n.out(i as u16)).copied()).collect();
            if douts.iter().all(Option::is_none) {
                continue;
            }
            let ins = self.src.inputs(n);
            let need: Vec<bool> = ins.iter().map(|v| self.active.contains(v)).collect();
            // A call owes its params' gradients even when no argument needs one.
            if !need.iter().any(|&b| b) && !matches!(node.op, Op::Call { .. }) {
                continue;
            }
            self.span = node.span;
            let dins = self.rule(n, &ins, &need, &douts).map_err(|m| (n, m))?;
            for ((v, d), need) in ins.iter().zip(dins).zip(need) {
                if let (Some(d), true) = (d, need) {
                    self.accumulate(*v, d).map_err(|m| (n, m))?;
                }
            }
        }
        Ok(())
    }

    fn accumulate(&mut self, v: Value, d: Value) -> R<()> {
        let total = match self.acc.get(&v) {
            Some(&old) => self.bin(BinaryOp::Add, old, d)?,
            None => d,
        };
        self.acc.insert(v, total);
        Ok(())
    }

    // ------------------------------------------------------------ forward values

    /// Forward value `v` as seen by the backward: itself in the entry; in a layer's
    /// backward a copy of a leaf, a residual argument, or a recomputation.
    fn primal(&mut self, v: Value) -> R<Value> {
        let Some(policy) = self.policy else { return Ok(v) };
        if let Some(&s) = self.saved.get(&v) {
            return Ok(s);
        }
        if let Some(&c) = self.cloned.get(&v.node) {
            return Ok(c.out(v.output));
        }
        let node = self.src.node(v.node).clone();
        if let Op::Input { index, name } = &node.op {
            let i = self.t.input(self.next_input, name, node.ty().clone(), node.span);
            self.next_input += 1;
            self.residuals.push(Residual::Arg(*index));
            self.saved.insert(v, i.into());
            return Ok(i.into());
        }
        let leaf = node.op.is_leaf() || matches!(node.op, Op::Iota { .. } | Op::RopeFreqs { .. });
        if leaf || self.recomputed(policy, v.node) {
            let ins: Vec<Value> = self.src.inputs(v.node);
            let mut mapped = Vec::with_capacity(ins.len());
            for i in ins {
                mapped.push(self.primal(i)?);
            }
            let c = self.t.add(node.op.clone(), &mapped, node.outputs.clone(), node.span);
            self.cloned.insert(v.node, c);
            return Ok(c.out(v.output));
        }
        let k = self.residuals.iter().filter(|r| matches!(r, Residual::Out(_))).count();
        let i = self.t.input(self.next_input, &format!("saved.{k}"), self.src.ty(v).clone(), node.span);
        self.next_input += 1;
        self.residuals.push(Residual::Out(v));
        self.saved.insert(v, i.into());
        Ok(i.into())
    }

    /// Whether the backward recomputes node `n` rather than keeping its results.
    fn recomputed(&self, policy: Recompute, n: NodeId) -> bool {
        let op = &self.src.node(n).op;
        if matches!(
            op,
            Op::Reshape { .. } | Op::Permute { .. } | Op::Broadcast { .. } | Op::Slice { .. } | Op::Concat { .. } | Op::Cast { .. }
        ) {
            return true;
        }
        let norm = matches!(op, Op::RmsNorm { .. });
        match policy {
            Recompute::None => false,
            Recompute::Norms => norm,
            Recompute::Mla => norm || self.is_mla_up_projection(n),
            Recompute::Layer => !matches!(op, Op::Call { .. }),
        }
    }

    /// A matmul by `q_b_proj` or `kv_b_proj`: MLA's up-projections from the latents.
    fn is_mla_up_projection(&self, n: NodeId) -> bool {
        if self.src.node(n).op != Op::MatMul {
            return false;
        }
        let w = self.src.inputs(n)[1];
        matches!(&self.src.node(w.node).op, Op::Param { name } if name.ends_with("q_b_proj.weight") || name.ends_with("kv_b_proj.weight"))
    }

    // ------------------------------------------------------------ emitting

    fn node(&mut self, op: Op, ins: &[Value]) -> R<NodeId> {
        self.t.add_inferred(op, ins, self.span).map_err(|e| e.to_string())
    }
    fn op(&mut self, op: Op, ins: &[Value]) -> R<Value> {
        self.node(op, ins).map(Value::from)
    }
    fn ty(&self, v: Value) -> Ty {
        self.t.ty(v).clone()
    }
    fn k(&mut self, v: f64, dt: DType) -> Value {
        self.t.constant(v, dt, self.span).into()
    }
    fn un(&mut self, u: UnaryOp, x: Value) -> R<Value> {
        self.op(Op::Unary(u), &[x])
    }
    fn bin(&mut self, b: BinaryOp, x: Value, y: Value) -> R<Value> {
        self.op(Op::Binary(b), &[x, y])
    }
    fn mul(&mut self, x: Value, y: Value) -> R<Value> {
        self.bin(BinaryOp::Mul, x, y)
    }
    fn scale(&mut self, x: Value, c: f64) -> R<Value> {
        let k = self.k(c, self.ty(x).dtype);
        self.mul(x, k)
    }
    fn select(&mut self, c: Value, a: Value, b: Value) -> R<Value> {
        self.op(Op::Select, &[c, a, b])
    }
    fn reduce(&mut self, x: Value, axis: usize, keepdim: bool) -> R<Value> {
        self.op(Op::Reduce { op: ReduceOp::Sum, axis: axis as u8, keepdim }, &[x])
    }
    fn reshape(&mut self, x: Value, shape: Vec<Dim>) -> R<Value> {
        if self.ty(x).shape.0 == shape {
            return Ok(x);
        }
        self.op(Op::Reshape { shape: shape.into() }, &[x])
    }
    fn broadcast(&mut self, x: Value, shape: Vec<Dim>) -> R<Value> {
        if self.ty(x).shape.0 == shape {
            return Ok(x);
        }
        self.op(Op::Broadcast { shape: shape.into() }, &[x])
    }
    /// `0` of type `ty`.
    fn zeros(&mut self, ty: &Ty) -> R<Value> {
        let z = self.k(0.0, ty.dtype);
        self.broadcast(z, ty.shape.0.clone())
    }
    /// `0` of `like`'s dtype, a scalar (broadcasts in `select`).
    fn zero_like(&mut self, like: Value) -> Value {
        let dt = self.ty(like).dtype;
        self.k(0.0, dt)
    }
    /// The cotangent `d` of a broadcast result, summed back to the operand type `to`:
    /// over the leading axes `to` lacks, and (keeping them) over its unit axes.
    fn unbroadcast(&mut self, mut d: Value, to: &Ty) -> R<Value> {
        let extra = self.ty(d).rank().saturating_sub(to.rank());
        for _ in 0..extra {
            d = self.reduce(d, 0, false)?;
        }
        let axes: Vec<usize> = (0..to.rank()).filter(|&i| to.shape[i].is(1) && !self.ty(d).shape[i].is(1)).collect();
        for a in axes {
            d = self.reduce(d, a, true)?;
        }
        Ok(d)
    }

    // ------------------------------------------------------------ the rules

    /// The cotangents of node `n`'s inputs (`None` where none flows or none is needed)
    /// from its results' cotangents `d`. `x'` below is a forward value as the backward
    /// sees it ([`Sweep::primal`]), `y` the node's own result, `dy` its cotangent.
    fn rule(&mut self, n: NodeId, ins: &[Value], need: &[bool], d: &[Option<Value>]) -> R<Vec<Option<Value>>> {
        let op = self.src.node(n).op.clone();
        let in_ty: Vec<Ty> = ins.iter().map(|v| self.src.ty(*v).clone()).collect();
        let mut out: Vec<Option<Value>> = vec![None; ins.len()];
        // Most ops have one result; rules that read several say so.
        let dy = || d[0].ok_or_else(|| format!("{} has no cotangent on its first result", op.name()));
        match &op {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Iota { .. } | Op::RopeFreqs { .. } | Op::Return => {}

            // y = x·Wᵀ:  dx = dy·W,  dW = Σ_tokens dyᵀ·x
            Op::MatMul => {
                let dy = dy()?;
                if need[0] {
                    let w = self.primal(ins[1])?;
                    let wt = self.op(Op::Permute { perm: vec![1, 0] }, &[w])?;
                    out[0] = Some(self.op(Op::MatMul, &[dy, wt])?);
                }
                if need[1] {
                    let x = self.primal(ins[0])?;
                    out[1] = Some(self.op(Op::WeightGrad, &[dy, x])?);
                }
            }
            // c = a·b:  da = dc·bᵀ,  db = aᵀ·dc
            Op::BatchMatMul => {
                let dy = dy()?;
                let r = in_ty[0].rank();
                let mut perm: Vec<u8> = (0..r as u8).collect();
                perm.swap(r - 1, r - 2);
                if need[0] {
                    let b = self.primal(ins[1])?;
                    let bt = self.op(Op::Permute { perm: perm.clone() }, &[b])?;
                    out[0] = Some(self.op(Op::BatchMatMul, &[dy, bt])?);
                }
                if need[1] {
                    let a = self.primal(ins[0])?;
                    let at = self.op(Op::Permute { perm }, &[a])?;
                    out[1] = Some(self.op(Op::BatchMatMul, &[at, dy])?);
                }
            }
            Op::Unary(u) => out[0] = Some(self.unary_rule(*u, n, ins[0], dy()?)?),
            Op::Binary(b) => {
                let dy = dy()?;
                let (da, db) = self.binary_rule(*b, n, ins, need, dy)?;
                if let Some(da) = da {
                    out[0] = Some(self.unbroadcast(da, &in_ty[0])?);
                }
                if let Some(db) = db {
                    out[1] = Some(self.unbroadcast(db, &in_ty[1])?);
                }
            }
            // y = c ? a : b:  da = c ? dy : 0,  db = c ? 0 : dy
            Op::Select => {
                let dy = dy()?;
                let c = self.primal(ins[0])?;
                let z = self.zero_like(dy);
                if need[1] {
                    let da = self.select(c, dy, z)?;
                    out[1] = Some(self.unbroadcast(da, &in_ty[1])?);
                }
                if need[2] {
                    let db = self.select(c, z, dy)?;
                    out[2] = Some(self.unbroadcast(db, &in_ty[2])?);
                }
            }
            // sum: dx = broadcast(dy);  mean: the same / n;  max: dy to the arg-max positions
            Op::Reduce { op: r, axis, keepdim } => {
                let dy = dy()?;
                let (axis, shape) = (*axis as usize, in_ty[0].shape.0.clone());
                let mut kept = shape.clone();
                kept[axis] = Dim::lit(1);
                let dyk = if *keepdim { dy } else { self.reshape(dy, kept.clone())? };
                out[0] = Some(match r {
                    ReduceOp::Sum => self.broadcast(dyk, shape)?,
                    ReduceOp::Mean => {
                        let b = self.broadcast(dyk, shape.clone())?;
                        match shape[axis].as_const() {
                            Some(len) => self.scale(b, 1.0 / len as f64)?,
                            // A symbolic length (tokens) is counted at run time: Σ 1 along the axis.
                            None => {
                                let one = self.k(1.0, in_ty[0].dtype);
                                let ones = self.broadcast(one, shape)?;
                                let len = self.reduce(ones, axis, true)?;
                                self.bin(BinaryOp::Div, b, len)?
                            }
                        }
                    }
                    ReduceOp::Max => {
                        let (x, y) = (self.primal(ins[0])?, self.primal(n.out(0))?);
                        let yk = if *keepdim { y } else { self.reshape(y, kept)? };
                        let at_max = self.bin(BinaryOp::Eq, x, yk)?;
                        let z = self.zero_like(dy);
                        let sel = self.select(at_max, dyk, z)?;
                        self.broadcast(sel, shape)?
                    }
                });
            }
            // y = softmax(x):  dx = y·(dy − Σ_axis dy·y)
            Op::Softmax { axis } => {
                let dy = dy()?;
                let y = self.primal(n.out(0))?;
                let dyy = self.mul(dy, y)?;
                let s = self.reduce(dyy, *axis as usize, true)?;
                let diff = self.bin(BinaryOp::Sub, dy, s)?;
                out[0] = Some(self.mul(y, diff)?);
            }
            // y = table[idx]:  dtable = scatter_add(0, idx, dy)
            Op::Gather { axis } => {
                let dy = dy()?;
                let idx = self.primal(ins[1])?;
                let z = self.zeros(&in_ty[0])?;
                out[0] = Some(self.op(Op::ScatterAdd { axis: *axis }, &[z, idx, dy])?);
            }
            // y = dst + scatter(idx, src):  ddst = dy,  dsrc = dy[idx]
            Op::ScatterAdd { axis } => {
                let dy = dy()?;
                out[0] = Some(dy);
                if need[2] {
                    let idx = self.primal(ins[1])?;
                    out[2] = Some(self.op(Op::Gather { axis: *axis }, &[dy, idx])?);
                }
            }
            // (v, i) = top_k(x):  dx = Σ_j onehot(i_j)·dv_j  (indices have none)
            Op::TopK { k, axis } => {
                let dv = dy()?;
                let r = in_ty[0].rank();
                if *axis as usize != r - 1 {
                    return Err("top_k is differentiable along the last axis only".into());
                }
                let len = in_ty[0].shape[r - 1];
                let idx = self.primal(n.out(1))?;
                let mut s = self.ty(idx).shape.0.clone();
                s.push(Dim::lit(1));
                let idx1 = self.reshape(idx, s.clone())?;
                let ramp = self.op(Op::Iota { start: Dim::lit(0), len, dtype: self.ty(idx).dtype }, &[])?;
                let hot = self.bin(BinaryOp::Eq, idx1, ramp)?;
                let dv1 = self.reshape(dv, s)?;
                let z = self.zero_like(dv);
                let spread = self.select(hot, dv1, z)?;
                out[0] = Some(self.reduce(spread, r - 1, false)?);
                let _ = k;
            }
            Op::Reshape { .. } => out[0] = Some(self.reshape(dy()?, in_ty[0].shape.0.clone())?),
            // dx = permute(dy, perm⁻¹)
            Op::Permute { perm } => {
                let mut inv = vec![0u8; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p as usize] = i as u8;
                }
                out[0] = Some(self.op(Op::Permute { perm: inv }, &[dy()?])?);
            }
            // dx = dy summed over the broadcast axes
            Op::Broadcast { .. } => {
                let d = self.unbroadcast(dy()?, &in_ty[0])?;
                out[0] = Some(self.reshape(d, in_ty[0].shape.0.clone())?);
            }
            // dx = [0 … | dy | … 0] along the axis
            Op::Slice { axis, start, len } => {
                let dy = dy()?;
                let a = *axis as usize;
                let full = in_ty[0].shape[a];
                let mut parts = Vec::new();
                for (i, l) in [(0, *start), (1, full - *start - *len)] {
                    if l.is(0) {
                        continue;
                    }
                    let mut s = in_ty[0].shape.0.clone();
                    s[a] = l;
                    let z = self.zeros(&Ty::new(in_ty[0].dtype, s))?;
                    parts.push((i, z));
                }
                let mut pieces: Vec<Value> = parts.iter().filter(|p| p.0 == 0).map(|p| p.1).collect();
                pieces.push(dy);
                pieces.extend(parts.iter().filter(|p| p.0 == 1).map(|p| p.1));
                out[0] = Some(if pieces.len() == 1 { dy } else { self.op(Op::Concat { axis: *axis }, &pieces)? });
            }
            // dxᵢ = the slice of dy that xᵢ filled
            Op::Concat { axis } | Op::CacheAppend { axis } => {
                let dy = dy()?;
                let a = *axis as usize;
                let mut at = Dim::lit(0);
                for (i, t) in in_ty.iter().enumerate() {
                    let l = t.shape[a];
                    if need[i] {
                        out[i] = Some(self.op(Op::Slice { axis: *axis, start: at, len: l }, &[dy])?);
                    }
                    at = at + l;
                }
            }
            // dx = cast(dy) back to x's float type
            Op::Cast { .. } => {
                if in_ty[0].dtype.is_float() {
                    let dy = dy()?;
                    out[0] = Some(if self.ty(dy).dtype == in_ty[0].dtype { dy } else { self.op(Op::Cast { to: in_ty[0].dtype }, &[dy])? });
                }
            }
            // (dx, dgain) = rms_norm_grad(x, gain, dy)
            Op::RmsNorm { eps } => {
                let (x, g) = (self.primal(ins[0])?, self.primal(ins[1])?);
                let gn = self.node(Op::RmsNormGrad { eps: *eps }, &[x, g, dy()?])?;
                out[0] = Some(gn.out(0));
                out[1] = Some(gn.out(1));
            }
            // A rotation is orthogonal (times YaRN's mscale): dx = rope(dy, −positions)
            Op::Rope { .. } => {
                let pos = self.primal(ins[1])?;
                let neg = self.un(UnaryOp::Neg, pos)?;
                out[0] = Some(self.op(op.clone(), &[dy()?, neg])?);
            }
            // (dq, dk, dv) = attention_grad(q, k, v[, mask], o, lse, do)
            Op::Attention { heads, kv_heads, scale, causal, masked, lse } => {
                if !lse {
                    return Err("attention must emit its log-sum-exp to be differentiated".into());
                }
                let mut args = Vec::new();
                for &v in ins {
                    args.push(self.primal(v)?);
                }
                args.push(self.primal(n.out(0))?);
                args.push(self.primal(n.out(1))?);
                args.push(dy()?);
                let op = Op::AttentionGrad { heads: *heads, kv_heads: *kv_heads, scale: *scale, causal: *causal, masked: *masked };
                let g = self.node(op, &args)?;
                for i in 0..3 {
                    out[i] = Some(g.out(i as u16));
                }
            }
            // dlogits = moe_route_grad(logits, indices, dweights): through the chosen gate
            // weights only; neither the selection nor the bias takes a gradient. A replayed
            // router's weights are the same function of the logits at its given indices
            // (its output 0), so the same rule serves it and its indices input gets none.
            Op::MoeRoute(r) | Op::MoeRouteReplay(r) => {
                if let Some(dw) = d[1] {
                    let logits = self.primal(ins[0])?;
                    let idx = self.primal(n.out(0))?;
                    out[0] = Some(self.op(Op::MoeRouteGrad(*r), &[logits, idx, dw])?);
                }
            }
            // (dx, dweights, dgate, dup, ddown) = expert_ffn_grad(x, idx, w, gate, up, down, dy)
            Op::ExpertFfn => {
                let mut args = Vec::new();
                for &v in ins {
                    args.push(self.primal(v)?);
                }
                args.push(dy()?);
                let g = self.node(Op::ExpertFfnGrad, &args)?;
                for (k, slot) in [0usize, 2, 3, 4, 5].into_iter().enumerate() {
                    out[slot] = Some(g.out(k as u16));
                }
            }
            // (dx, dgate, dup, ddown) = swiglu_grad(x, gate, up, down, dy)
            Op::SwiGlu => {
                let mut args = Vec::new();
                for &v in ins {
                    args.push(self.primal(v)?);
                }
                args.push(dy()?);
                let g = self.node(Op::SwiGluGrad, &args)?;
                for i in 0..4 {
                    out[i] = Some(g.out(i as u16));
                }
            }
            // dlogits = (softmax(logits) − onehot(labels))·dloss / count
            Op::CrossEntropy { ignore_index } => {
                let (logits, labels) = (self.primal(ins[0])?, self.primal(ins[1])?);
                out[0] = Some(self.op(Op::CrossEntropyGrad { ignore_index: *ignore_index }, &[logits, labels, dy()?])?);
            }
            // dlogits = (onehot(labels) − softmax(logits))·dy per row
            Op::TokenLogProb { ignore_index } => {
                let (logits, labels) = (self.primal(ins[0])?, self.primal(ins[1])?);
                out[0] = Some(self.op(Op::TokenLogProbGrad { ignore_index: *ignore_index }, &[logits, labels, dy()?])?);
            }
            Op::Call { function, layer } => return self.call_rule(n, function, *layer, ins, d),
            Op::Fused(_) => return Err("fused kernels are not differentiated: autodiff runs before fusion".into()),
            op if op.is_gradient() => return Err(format!("{} is a backward kernel: dsc takes first derivatives only", op.name())),
            op => return Err(format!("no derivative rule for {}", op.name())),
        }
        Ok(out)
    }

    fn unary_rule(&mut self, u: UnaryOp, n: NodeId, x: Value, dy: Value) -> R<Value> {
        use UnaryOp::*;
        let dt = self.ty(dy).dtype;
        Ok(match u {
            // -x: -dy
            Neg => self.un(Neg, dy)?,
            // |x|: dy·sign(x) (0 at 0 goes to +dy, as torch's sign(0)·dy = 0 is not needed here)
            Abs => {
                let x = self.primal(x)?;
                let z = self.k(0.0, dt);
                let neg = self.bin(BinaryOp::Lt, x, z)?;
                let m = self.un(Neg, dy)?;
                self.select(neg, m, dy)?
            }
            // e^x: dy·y
            Exp => {
                let y = self.primal(n.out(0))?;
                self.mul(dy, y)?
            }
            // ln x: dy/x
            Log => {
                let x = self.primal(x)?;
                self.bin(BinaryOp::Div, dy, x)?
            }
            // √x: dy/(2y)
            Sqrt => {
                let y = self.primal(n.out(0))?;
                let q = self.bin(BinaryOp::Div, dy, y)?;
                self.scale(q, 0.5)?
            }
            // x^-½: −dy·y³/2
            Rsqrt => {
                let y = self.primal(n.out(0))?;
                let y2 = self.mul(y, y)?;
                let y3 = self.mul(y2, y)?;
                let p = self.mul(dy, y3)?;
                self.scale(p, -0.5)?
            }
            // 1/x: −dy·y²
            Recip => {
                let y = self.primal(n.out(0))?;
                let y2 = self.mul(y, y)?;
                let p = self.mul(dy, y2)?;
                self.un(Neg, p)?
            }
            // x²: 2x·dy
            Square => {
                let x = self.primal(x)?;
                let p = self.mul(dy, x)?;
                self.scale(p, 2.0)?
            }
            // σ(x): dy·y(1−y)
            Sigmoid => {
                let y = self.primal(n.out(0))?;
                let one = self.k(1.0, dt);
                let om = self.bin(BinaryOp::Sub, one, y)?;
                let p = self.mul(y, om)?;
                self.mul(dy, p)?
            }
            // x·σ(x): dy·σ(x)(1 + x(1−σ(x)))
            Silu => {
                let x = self.primal(x)?;
                let s = self.un(Sigmoid, x)?;
                let one = self.k(1.0, dt);
                let om = self.bin(BinaryOp::Sub, one, s)?;
                let xo = self.mul(x, om)?;
                let inner = self.bin(BinaryOp::Add, one, xo)?;
                let p = self.mul(s, inner)?;
                self.mul(dy, p)?
            }
            // tanh x: dy(1−y²)
            Tanh => {
                let y = self.primal(n.out(0))?;
                let y2 = self.mul(y, y)?;
                let one = self.k(1.0, dt);
                let om = self.bin(BinaryOp::Sub, one, y2)?;
                self.mul(dy, om)?
            }
            // sin x: dy·cos x
            Sin => {
                let x = self.primal(x)?;
                let c = self.un(Cos, x)?;
                self.mul(dy, c)?
            }
            // cos x: −dy·sin x
            Cos => {
                let x = self.primal(x)?;
                let s = self.un(Sin, x)?;
                let p = self.mul(dy, s)?;
                self.un(Neg, p)?
            }
        })
    }

    /// The two operands' cotangents before un-broadcasting.
    fn binary_rule(&mut self, b: BinaryOp, n: NodeId, ins: &[Value], need: &[bool], dy: Value) -> R<(Option<Value>, Option<Value>)> {
        use BinaryOp::*;
        let (na, nb) = (need[0], need[1]);
        Ok(match b {
            // a + b: (dy, dy)
            Add => (na.then_some(dy), nb.then_some(dy)),
            // a − b: (dy, −dy)
            Sub => (na.then_some(dy), if nb { Some(self.un(UnaryOp::Neg, dy)?) } else { None }),
            // a·b: (dy·b, dy·a)
            Mul => {
                let da = if na {
                    let b = self.primal(ins[1])?;
                    Some(self.mul(dy, b)?)
                } else {
                    None
                };
                let db = if nb {
                    let a = self.primal(ins[0])?;
                    Some(self.mul(dy, a)?)
                } else {
                    None
                };
                (da, db)
            }
            // a/b: (dy/b, −dy·a/b²)
            Div => {
                let b = self.primal(ins[1])?;
                let da = if na { Some(self.bin(Div, dy, b)?) } else { None };
                let db = if nb {
                    let a = self.primal(ins[0])?;
                    let q = self.bin(Div, dy, b)?;
                    let q2 = self.bin(Div, q, b)?;
                    let p = self.mul(q2, a)?;
                    Some(self.un(UnaryOp::Neg, p)?)
                } else {
                    None
                };
                (da, db)
            }
            // max(a, b): dy to a where a ≥ b, else to b;  min(a, b): to a where a ≤ b
            Max | Min => {
                let (a, bv) = (self.primal(ins[0])?, self.primal(ins[1])?);
                let to_b = if b == Max { self.bin(Lt, a, bv)? } else { self.bin(Lt, bv, a)? };
                let z = self.zero_like(dy);
                let da = if na { Some(self.select(to_b, z, dy)?) } else { None };
                let db = if nb { Some(self.select(to_b, dy, z)?) } else { None };
                (da, db)
            }
            // a^b: (dy·b·a^(b−1), dy·ln(a)·a^b)
            Pow => {
                let (a, bv) = (self.primal(ins[0])?, self.primal(ins[1])?);
                let da = if na {
                    let one = self.k(1.0, self.ty(bv).dtype);
                    let bm = self.bin(Sub, bv, one)?;
                    let p = self.bin(Pow, a, bm)?;
                    let q = self.mul(p, bv)?;
                    Some(self.mul(dy, q)?)
                } else {
                    None
                };
                let db = if nb {
                    let y = self.primal(n.out(0))?;
                    let l = self.un(UnaryOp::Log, a)?;
                    let q = self.mul(l, y)?;
                    Some(self.mul(dy, q)?)
                } else {
                    None
                };
                (da, db)
            }
            // comparisons are not differentiable
            Lt | Eq => (None, None),
        })
    }

    /// A layer call in the entry: call its backward with the results' cotangents and the
    /// residuals; collect the param gradients under the call's layer scope.
    fn call_rule(&mut self, n: NodeId, function: &str, layer: Option<u32>, ins: &[Value], d: &[Option<Value>]) -> R<Vec<Option<Value>>> {
        let Some((calls, mtp_stop)) = self.calls else {
            return Err("calls inside a layer are not differentiated (calls do not nest)".into());
        };
        let info = calls.get(function).ok_or_else(|| format!("no backward for `{function}`"))?;
        let mut args = Vec::new();
        for &i in &info.seeds {
            args.push(match d.get(i).copied().flatten() {
                Some(v) => v,
                None => {
                    let ty = self.src.ty(n.out(i as u16)).clone();
                    self.zeros(&ty)?
                }
            });
        }
        let mut k = 0u16;
        for r in &info.residuals {
            args.push(match r {
                Residual::Arg(i) => ins[*i as usize],
                Residual::Out(_) => {
                    k += 1;
                    n.out(info.results as u16 + k - 1)
                }
            });
        }
        let call = self.t.call(&info.name, layer, &info.sig, &args, self.span).map_err(|e| e.to_string())?;
        let mut out = vec![None; ins.len()];
        for (k, &i) in info.dinputs.iter().enumerate() {
            out[i as usize] = Some(call.out(k as u16));
        }
        // MTP modules' names are `{mode}.mtp.{k}` (crate::lower); their first argument is
        // the trunk's hidden state.
        if mtp_stop && function.contains(".mtp.") {
            out[0] = None;
        }
        let base = info.dinputs.len();
        for (k, name) in info.dparams.iter().enumerate() {
            self.param_grads.push((param_path(layer, name), call.out((base + k) as u16)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, DType, Dim};

    /// A function `f(x) = matmul(rms_norm(x, g), w)` called from an entry whose result is
    /// `cross_entropy`, to check the plumbing: signatures, residuals, recorded gradients.
    fn tiny_module() -> Module {
        let mut m = Module::new();
        let mut f = Function::new("train.layer.dense");
        let g = &mut f.graph;
        let x = g.input(0, "x", Ty::new(DType::F32, [Dim::B, Dim::S, Dim::lit(4)]), None);
        let gain = g.param("norm.weight", Ty::new(DType::F32, [Dim::lit(4)]), None);
        let w = g.param("proj.weight", Ty::new(DType::F32, [Dim::lit(4), Dim::lit(4)]), None);
        let h = g.add_inferred(Op::RmsNorm { eps: 1e-6.into() }, &[x.into(), gain.into()], None).unwrap();
        let y = g.add_inferred(Op::MatMul, &[h.into(), w.into()], None).unwrap();
        let s = g.add_inferred(Op::Binary(BinaryOp::Add), &[x.into(), y.into()], None).unwrap();
        g.ret(&[s.into()], None);
        let sig = f.graph.signature();
        m.add_function(f);
        let mut e = Function::new("train");
        let g = &mut e.graph;
        let ids = g.input(0, "input_ids", Ty::new(DType::I64, [Dim::B, Dim::S]), None);
        let labels = g.input(1, "labels", Ty::new(DType::I64, [Dim::B, Dim::S]), None);
        let table = g.param("model.embed_tokens.weight", Ty::new(DType::F32, [Dim::lit(8), Dim::lit(4)]), None);
        let x = g.add_inferred(Op::Gather { axis: 0 }, &[table.into(), ids.into()], None).unwrap();
        let c0 = g.call("train.layer.dense", Some(0), &sig, &[x.into()], None).unwrap();
        let c1 = g.call("train.layer.dense", Some(1), &sig, &[c0.out(0)], None).unwrap();
        let logits = g.add_inferred(Op::MatMul, &[c1.out(0), table.into()], None).unwrap();
        let loss = g.add_inferred(Op::CrossEntropy { ignore_index: Some(-100) }, &[logits.into(), labels.into()], None).unwrap();
        g.ret(&[loss.into()], None);
        m.add_function(e);
        m.set_entry(Mode::Train, "train");
        m
    }

    #[test]
    fn layers_get_a_backward_function_and_the_entry_returns_gradients() {
        for policy in Recompute::ALL {
            let mut m = tiny_module();
            let opts = TrainOptions { recompute: policy, mtp_stop_gradient: false };
            differentiate(&mut m, "train", opts).unwrap();
            verify(&m).unwrap_or_else(|e| panic!("{policy:?}: {e:?}"));
            let grads = m.gradients.clone().unwrap();
            assert_eq!(grads.results, 1);
            assert_eq!(grads.seeds, vec![0]);
            assert_eq!(
                grads.params,
                [
                    "model.embed_tokens.weight",
                    "model.layers.0.norm.weight",
                    "model.layers.0.proj.weight",
                    "model.layers.1.norm.weight",
                    "model.layers.1.proj.weight"
                ]
            );
            let bwd = m.function("train.layer.dense.bwd").unwrap();
            let sig = bwd.graph.signature();
            // (dy, residuals…) → (dx, d norm.weight, d proj.weight)
            assert_eq!(sig.outputs.len(), 3, "{policy:?}");
            let fwd = m.signature("train.layer.dense").unwrap();
            let saved = fwd.outputs.len() - 1;
            match policy {
                // x is an argument; the normalised h is kept unless norms are recomputed
                Recompute::None => assert_eq!(saved, 1),
                Recompute::Norms | Recompute::Mla | Recompute::Layer => assert_eq!(saved, 0),
            }
            let entry = m.entry(Mode::Train).unwrap().graph.signature();
            assert_eq!(entry.inputs.len(), 3, "ids, labels, d.0");
            assert_eq!(entry.outputs.len(), 1 + 5);
        }
    }

    #[test]
    fn a_second_run_changes_nothing() {
        let mut m = tiny_module();
        let mut cx = PassCx::new(Mode::Train);
        assert_eq!(Autodiff.run(&mut m, &mut cx).unwrap(), Changed::Yes);
        let n = m.functions.len();
        assert_eq!(Autodiff.run(&mut m, &mut cx).unwrap(), Changed::No);
        assert_eq!(m.functions.len(), n);
    }
}
