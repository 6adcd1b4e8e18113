//! `decompose` (off by default; `--passes +decompose`): expand composites into
//! primitives, each as its op's `## Decomposition` note says.
//!
//! ```text
//!   rms_norm(x, g)   ──▶  mul(cast(mul(xf, rsqrt(add(reduce_mean(square(xf), -1, keepdim), eps)))), g)
//!   swiglu(x, G, U, D) ──▶ matmul(mul(silu(matmul(x, G)), matmul(x, U)), D)
//!   rope(x, pos)     ──▶  ang = mul(reshape(cast(pos, f32), [b,s,1]), rope_freqs())
//!                         cos·m, sin·m tables; x1·cos − x2·sin | x2·cos + x1·sin; concat
//!   attention(q,k,v) ──▶  softmax(select(lt(iota(sk-sq, sq), iota(0, sk)), -inf,
//!                                 batch_matmul(qᵀ, kᵀ)·scale [+ mask]))·v
//!   cross_entropy    ──▶  mean over kept labels of logsumexp(l) − Σ select(onehot, l, 0)
//!   token_logprob    ──▶  per label: Σ select(onehot, l, 0) − logsumexp(l), 0 where ignored
//!   moe_route        ──▶  softmax|sigmoid, + bias, group scores (reduce_max | top_k 2 + sum),
//!                         top_k groups → kept mask → select(−inf) → top_k experts → one-hot pick
//!   moe_route_replay ──▶  softmax|sigmoid → one-hot pick at the given indices (moe_route's tail)
//! ```
//!
//! What stays whole, and why:
//!
//! - `expert_ffn`: running each token through the experts its router chose is dispatch
//!   (the rows each expert sees depend on the routing, a data-dependent size), or else a
//!   gather of a full `[i, h]` weight copy per token and slot. Neither is a decomposition
//!   a backend would want; dispatch / grouped GEMM / combine is the kernel library's.
//! - `cache_append`: its value is a `concat`, but the op exists to say "write into the
//!   cache's buffer"; expanding it would lose exactly that.
//! - attention with its log-sum-exp output (training): `attention_grad` reads that
//!   statistic, which the point of the flash-style backward is never to rebuild from the
//!   probabilities; the decomposed form would have to materialise them.
//!
//! [`KEPT`] lists them, and the equivalence tests check that nothing else survives.
//!
//! Numerics: the expansions compute what the interpreter's composite kernels compute, op
//! for op where the kernel's order is documented (RMSNorm's reciprocal root then gain,
//! attention's `(q·k)·scale + mask`, the rotation's `x1·cos − x2·sin`), so decomposed and
//! composite graphs agree to rounding (the composites take cos/sin and sums in `f64`).
//! Two deliberate differences: the decomposed cross-entropy picks the label's logit with
//! a one-hot compare, so a label outside `0..V` (which the composite rejects) adds 0; and
//! the decomposed rope computes cos/sin of the `f32` angle in `f32`.
//!
//! Within one function the RoPE tables of one `positions` value and one setting are
//! built once and shared (queries and keys rotate by the same angles), as CSE would
//! share them; the output is otherwise left for the fusion passes, which run next.

use super::{Changed, Pass, PassCx, PassError};
use crate::ir::{
    BinaryOp, DType, Dim, Graph, GroupScore, Module, NodeId, Op, ReduceOp, RopeLayout, Routing, Scoring, Ty, UnaryOp, Value, Yarn,
};
use dsc_dsl::span::Span;
use std::collections::{BTreeMap, HashMap};

/// Expands every composite except [`KEPT`].
pub struct Decompose;

/// Composites the pass leaves whole (see the module doc for why).
pub fn kept(op: &Op) -> bool {
    matches!(op, Op::ExpertFfn | Op::CacheAppend { .. } | Op::Attention { lse: true, .. })
}

/// The names of [`kept`]'s ops, for messages and docs.
pub const KEPT: &[&str] = &["expert_ffn", "cache_append", "attention (with lse)"];

impl Pass for Decompose {
    fn name(&self) -> &'static str {
        "decompose"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn on_by_default(&self) -> bool {
        false
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let mut count: BTreeMap<&'static str, usize> = BTreeMap::new();
        for f in &mut m.functions {
            decompose_graph(&mut f.graph, &mut count).map_err(|(n, msg)| PassError::at(&f.name, &f.graph, n, msg))?;
        }
        if count.is_empty() {
            return Ok(Changed::No);
        }
        let list: Vec<String> = count.iter().map(|(op, k)| format!("{op} ×{k}")).collect();
        cx.report(self.name(), format!("expanded {}", list.join(", ")));
        Ok(Changed::Yes)
    }
}

/// Expand the composites of one graph, counting them by op name into `count`.
pub fn decompose_graph(g: &mut Graph, count: &mut BTreeMap<&'static str, usize>) -> Result<(), (NodeId, String)> {
    let order = g.topo_order().map_err(|c| (c.0[0], "the graph has a cycle".to_string()))?;
    let mut tables: Tables = HashMap::new();
    for n in order {
        let op = g.node(n).op.clone();
        if !op.is_composite() || kept(&op) {
            continue;
        }
        let ins = g.inputs(n);
        let mut e = Emit { g: &mut *g, span: None };
        e.span = e.g.node(n).span;
        let outs = match &op {
            Op::RmsNorm { eps } => vec![rms_norm(&mut e, ins[0], ins[1], eps.get())],
            Op::Rope { layout, theta, rotary_dim, yarn } => {
                let freqs = Op::RopeFreqs { theta: *theta, rotary_dim: *rotary_dim, yarn: *yarn };
                vec![rope(&mut e, &mut tables, ins[0], ins[1], *layout, freqs, yarn.as_ref())]
            }
            Op::Attention { heads, kv_heads, scale, causal, .. } => {
                let spec = Att { heads: *heads as i64, kv_heads: *kv_heads as i64, scale: scale.get(), causal: *causal };
                vec![attention(&mut e, ins[0], ins[1], ins[2], ins.get(3).copied(), spec)]
            }
            Op::SwiGlu => vec![swiglu(&mut e, ins[0], ins[1], ins[2], ins[3])],
            Op::CrossEntropy { ignore_index } => vec![cross_entropy(&mut e, ins[0], ins[1], *ignore_index)],
            Op::TokenLogProb { ignore_index } => vec![token_logprob(&mut e, ins[0], ins[1], *ignore_index)],
            Op::MoeRoute(r) => {
                let (i, w) = moe_route(&mut e, ins[0], ins.get(1).copied(), r);
                vec![i, w]
            }
            Op::MoeRouteReplay(r) => {
                let (i, w) = moe_route_replay(&mut e, ins[0], ins[1], r);
                vec![i, w]
            }
            _ => continue,
        };
        // Each expansion is written for the composite's own shape rule; a failure here is a
        // bug in this file, reported at the composite.
        let outs: Vec<Value> = outs.into_iter().collect::<R<_>>().map_err(|m| (n, format!("decomposing {}: {m}", op.name())))?;
        for (i, v) in outs.iter().enumerate() {
            let (have, want) = (g.ty(*v), &g.node(n).outputs[i]);
            if have != want {
                return Err((n, format!("decomposing {}: output {i} is {have}, not {want}", op.name())));
            }
            g.replace_uses(n.out(i as u16), *v);
        }
        g.remove(n);
        *count.entry(op.name()).or_default() += 1;
    }
    Ok(())
}

type R<T> = Result<T, String>;

/// RoPE cos/sin tables already built in this function, by (positions, `rope_freqs` op,
/// table dtype, the shape they were reshaped to).
type Tables = HashMap<(Value, Op, DType, Vec<Dim>), (Value, Value)>;

/// Node building with the composite's span, and shorthands that read like the formulas.
struct Emit<'g> {
    g: &'g mut Graph,
    span: Option<Span>,
}

impl Emit<'_> {
    fn op(&mut self, op: Op, ins: &[Value]) -> R<Value> {
        self.node(op, ins).map(Value::from)
    }
    fn node(&mut self, op: Op, ins: &[Value]) -> R<NodeId> {
        self.g.add_inferred(op, ins, self.span).map_err(|e| e.to_string())
    }
    fn ty(&self, v: Value) -> Ty {
        self.g.ty(v).clone()
    }
    fn k(&mut self, v: f64, dt: DType) -> Value {
        self.g.constant(v, dt, self.span).into()
    }
    fn un(&mut self, u: UnaryOp, x: Value) -> R<Value> {
        self.op(Op::Unary(u), &[x])
    }
    fn bin(&mut self, b: BinaryOp, x: Value, y: Value) -> R<Value> {
        self.op(Op::Binary(b), &[x, y])
    }
    /// `x` as `dt`; no node when it already is.
    fn cast(&mut self, x: Value, dt: DType) -> R<Value> {
        if self.g.ty(x).dtype == dt {
            Ok(x)
        } else {
            self.op(Op::Cast { to: dt }, &[x])
        }
    }
    fn reshape(&mut self, x: Value, dims: Vec<Dim>) -> R<Value> {
        self.op(Op::Reshape { shape: dims.into() }, &[x])
    }
    fn slice(&mut self, x: Value, axis: usize, start: Dim, len: Dim) -> R<Value> {
        self.op(Op::Slice { axis: axis as u8, start, len }, &[x])
    }
    fn concat(&mut self, xs: &[Value], axis: usize) -> R<Value> {
        self.op(Op::Concat { axis: axis as u8 }, xs)
    }
    fn permute(&mut self, x: Value, perm: &[u8]) -> R<Value> {
        self.op(Op::Permute { perm: perm.to_vec() }, &[x])
    }
    fn reduce(&mut self, op: ReduceOp, x: Value, axis: usize, keepdim: bool) -> R<Value> {
        self.op(Op::Reduce { op, axis: axis as u8, keepdim }, &[x])
    }
    fn select(&mut self, c: Value, a: Value, b: Value) -> R<Value> {
        self.op(Op::Select, &[c, a, b])
    }
    fn iota(&mut self, start: Dim, len: Dim, dtype: DType) -> R<Value> {
        self.op(Op::Iota { start, len, dtype }, &[])
    }
    /// `x` with its last axis split as `[.., n, 1]`-style dims: the shape of `x` with
    /// `extra` appended.
    fn with_axes(&self, x: Value, extra: &[Dim]) -> Vec<Dim> {
        let mut s = self.g.ty(x).shape.0.clone();
        s.extend_from_slice(extra);
        s
    }
}

/// The shape of `v` with its last axis replaced by `tail`.
fn lead_then(t: &Ty, tail: &[Dim]) -> Vec<Dim> {
    let mut s = t.shape[..t.rank() - 1].to_vec();
    s.extend_from_slice(tail);
    s
}

// ---------------------------------------------------------------- rms_norm

/// cast→f32, square, reduce_mean(keepdim), add eps, rsqrt, mul, cast back, mul gain.
fn rms_norm(e: &mut Emit, x: Value, gain: Value, eps: f64) -> R<Value> {
    let t = e.ty(x);
    let xf = e.cast(x, DType::F32)?;
    let sq = e.un(UnaryOp::Square, xf)?;
    let ms = e.reduce(ReduceOp::Mean, sq, t.rank() - 1, true)?;
    let eps = e.k(eps, DType::F32);
    let ms = e.bin(BinaryOp::Add, ms, eps)?;
    let inv = e.un(UnaryOp::Rsqrt, ms)?;
    let y = e.bin(BinaryOp::Mul, xf, inv)?;
    let y = e.cast(y, t.dtype)?;
    e.bin(BinaryOp::Mul, y, gain)
}

// ---------------------------------------------------------------- swiglu

/// matmul, silu, matmul, mul, matmul.
fn swiglu(e: &mut Emit, x: Value, gate: Value, up: Value, down: Value) -> R<Value> {
    let g = e.op(Op::MatMul, &[x, gate])?;
    let a = e.un(UnaryOp::Silu, g)?;
    let u = e.op(Op::MatMul, &[x, up])?;
    let h = e.bin(BinaryOp::Mul, a, u)?;
    e.op(Op::MatMul, &[h, down])
}

// ---------------------------------------------------------------- rope

/// The rotation, with cos/sin tables from `positions` and the frequencies.
fn rope(e: &mut Emit, tables: &mut Tables, x: Value, pos: Value, layout: RopeLayout, freqs: Op, yarn: Option<&Yarn>) -> R<Value> {
    let t = e.ty(x);
    let (r, ax) = (t.rank(), t.rank() - 1);
    let Op::RopeFreqs { rotary_dim, .. } = freqs else { unreachable!("rope passes its freqs op") };
    let (rd, half) = (Dim::lit(rotary_dim as i64), Dim::lit(rotary_dim as i64 / 2));
    let d = t.shape[ax];
    // The tables are [b, s, half]; broadcast against one head ([b,s,1,..]) when x has a
    // head axis, and against the pair axis ([.., half, 1]) when pairs are interleaved.
    let mut shape = t.shape[..2].to_vec();
    if r == 4 {
        shape.push(Dim::lit(1));
    }
    shape.push(half);
    if layout == RopeLayout::Interleaved {
        shape.push(Dim::lit(1));
    }
    let (cos, sin) = rope_tables(e, tables, pos, freqs, yarn, t.dtype, shape)?;
    let rot = |e: &mut Emit, x1: Value, x2: Value| -> R<(Value, Value)> {
        let (a, b) = (e.bin(BinaryOp::Mul, x1, cos)?, e.bin(BinaryOp::Mul, x2, sin)?);
        let o1 = e.bin(BinaryOp::Sub, a, b)?;
        let (a, b) = (e.bin(BinaryOp::Mul, x2, cos)?, e.bin(BinaryOp::Mul, x1, sin)?);
        Ok((o1, e.bin(BinaryOp::Add, a, b)?))
    };
    let pass = |e: &mut Emit| -> R<Option<Value>> {
        if d == rd {
            Ok(None)
        } else {
            e.slice(x, ax, rd, d - rd).map(Some)
        }
    };
    match layout {
        RopeLayout::HalfSplit => {
            let x1 = e.slice(x, ax, Dim::lit(0), half)?;
            let x2 = e.slice(x, ax, half, half)?;
            let (o1, o2) = rot(e, x1, x2)?;
            let mut parts = vec![o1, o2];
            parts.extend(pass(e)?);
            e.concat(&parts, ax)
        }
        RopeLayout::Interleaved => {
            let xr = if d == rd { x } else { e.slice(x, ax, Dim::lit(0), rd)? };
            let xp = e.reshape(xr, lead_then(&t, &[half, Dim::lit(2)]))?;
            let x1 = e.slice(xp, ax + 1, Dim::lit(0), Dim::lit(1))?;
            let x2 = e.slice(xp, ax + 1, Dim::lit(1), Dim::lit(1))?;
            let (o1, o2) = rot(e, x1, x2)?;
            let pairs = e.concat(&[o1, o2], ax + 1)?;
            let o = e.reshape(pairs, lead_then(&t, &[rd]))?;
            match pass(e)? {
                Some(p) => e.concat(&[o, p], ax),
                None => Ok(o),
            }
        }
    }
}

/// `cos(p·f)·m` and `sin(p·f)·m` in `dtype`, shaped `shape`, for `positions: [b, s]`.
fn rope_tables(
    e: &mut Emit,
    tables: &mut Tables,
    pos: Value,
    freqs: Op,
    yarn: Option<&Yarn>,
    dtype: DType,
    shape: Vec<Dim>,
) -> R<(Value, Value)> {
    let key = (pos, freqs.clone(), dtype, shape.clone());
    if let Some(&t) = tables.get(&key) {
        return Ok(t);
    }
    let p = e.cast(pos, DType::F32)?;
    let p = e.reshape(p, e.with_axes(p, &[Dim::lit(1)]))?;
    let f = e.op(freqs, &[])?;
    let ang = e.bin(BinaryOp::Mul, p, f)?;
    let mut cos = e.un(UnaryOp::Cos, ang)?;
    let mut sin = e.un(UnaryOp::Sin, ang)?;
    // YaRN's attention factor on cos and sin; the softmax part is in attention's scale.
    if let Some(y) = yarn {
        let m = mscale(y);
        if m != 1.0 {
            let k = e.k(m, DType::F32);
            cos = e.bin(BinaryOp::Mul, cos, k)?;
            sin = e.bin(BinaryOp::Mul, sin, k)?;
        }
    }
    let mut out = [cos, sin];
    for v in &mut out {
        *v = e.cast(*v, dtype)?;
        if e.g.ty(*v).shape.0 != shape {
            *v = e.reshape(*v, shape.clone())?;
        }
    }
    tables.insert(key, (out[0], out[1]));
    Ok((out[0], out[1]))
}

/// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`: what RoPE multiplies cos
/// and sin by under YaRN.
pub fn mscale(y: &Yarn) -> f64 {
    let f = y.factor.get();
    dsc_dsl::model::yarn_mscale(f, y.mscale.get()) / dsc_dsl::model::yarn_mscale(f, y.mscale_all_dim.get())
}

// ---------------------------------------------------------------- attention

struct Att {
    heads: i64,
    kv_heads: i64,
    scale: f64,
    causal: bool,
}

/// Grouped heads by broadcasting each kv head over its query heads, batch_matmul, mul
/// scale, (add mask), causal `select`, softmax, batch_matmul.
fn attention(e: &mut Emit, q: Value, k: Value, v: Value, mask: Option<Value>, a: Att) -> R<Value> {
    let (qt, kt) = (e.ty(q), e.ty(k));
    let (b, sq, sk) = (qt.shape[0], qt.shape[1], kt.shape[1]);
    let group = a.heads / a.kv_heads;
    // [b, sk, kv, d] → [b, sk, heads, d], query head h reading kv head h / group.
    let expand = |e: &mut Emit, x: Value| -> R<Value> {
        if group == 1 {
            return Ok(x);
        }
        let d = e.g.ty(x).shape[3];
        let (kv, g, h) = (Dim::lit(a.kv_heads), Dim::lit(group), Dim::lit(a.heads));
        let one = e.reshape(x, vec![b, sk, kv, Dim::lit(1), d])?;
        let all = e.op(Op::Broadcast { shape: vec![b, sk, kv, g, d].into() }, &[one])?;
        e.reshape(all, vec![b, sk, h, d])
    };
    let qh = e.permute(q, &[0, 2, 1, 3])?;
    let ke = expand(e, k)?;
    let kh = e.permute(ke, &[0, 2, 3, 1])?;
    let mut s = e.op(Op::BatchMatMul, &[qh, kh])?;
    let dt = e.ty(s).dtype;
    if a.scale != 1.0 {
        let c = e.k(a.scale, dt);
        s = e.bin(BinaryOp::Mul, s, c)?;
    }
    if let Some(m) = mask {
        let m = e.reshape(m, vec![b, Dim::lit(1), sq, sk])?;
        s = e.bin(BinaryOp::Add, s, m)?;
    }
    if a.causal {
        // Query i sees keys 0 ..= sk-sq+i: key j is hidden when sk-sq+i < j.
        let qi = e.iota(sk - sq, sq, DType::I64)?;
        let qi = e.reshape(qi, vec![sq, Dim::lit(1)])?;
        let kj = e.iota(Dim::lit(0), sk, DType::I64)?;
        let hidden = e.bin(BinaryOp::Lt, qi, kj)?;
        let ninf = e.k(f64::NEG_INFINITY, dt);
        s = e.select(hidden, ninf, s)?;
    }
    let p = e.op(Op::Softmax { axis: 3 }, &[s])?;
    let ve = expand(e, v)?;
    let vh = e.permute(ve, &[0, 2, 1, 3])?;
    let o = e.op(Op::BatchMatMul, &[p, vh])?;
    e.permute(o, &[0, 2, 1, 3])
}

// ---------------------------------------------------------------- cross_entropy

/// Mean over the labels not equal to `ignore` of `logsumexp(l) − l[label]`, in `f32`.
fn cross_entropy(e: &mut Emit, logits: Value, labels: Value, ignore: Option<i64>) -> R<Value> {
    let (loss, counted) = label_nll(e, logits, labels, ignore)?;
    let total = sum_all(e, loss)?;
    let count = sum_all(e, counted)?;
    e.bin(BinaryOp::Div, total, count)
}

/// `token_logprob`: the negated per-row loss of [`label_nll`], in the labels' shape.
fn token_logprob(e: &mut Emit, logits: Value, labels: Value, ignore: Option<i64>) -> R<Value> {
    let (loss, _) = label_nll(e, logits, labels, ignore)?;
    let logp = e.un(UnaryOp::Neg, loss)?;
    let shape = e.ty(labels).shape.0.clone();
    e.reshape(logp, shape)
}

/// Per row `lse(logits) − logits[label]` (f32, 0 where ignored) and whether the row
/// counts (1 or 0), both `[T.., 1]`.
fn label_nll(e: &mut Emit, logits: Value, labels: Value, ignore: Option<i64>) -> R<(Value, Value)> {
    let lt = e.ty(logits);
    let (ax, v) = (lt.rank() - 1, lt.shape[lt.rank() - 1]);
    let ldt = e.ty(labels).dtype;
    let l = e.cast(logits, DType::F32)?;
    let m = e.reduce(ReduceOp::Max, l, ax, true)?;
    let z = e.bin(BinaryOp::Sub, l, m)?;
    let ez = e.un(UnaryOp::Exp, z)?;
    let se = e.reduce(ReduceOp::Sum, ez, ax, true)?;
    let lse = e.un(UnaryOp::Log, se)?;
    let lse = e.bin(BinaryOp::Add, lse, m)?;
    let lab = e.reshape(labels, e.with_axes(labels, &[Dim::lit(1)]))?;
    let classes = e.iota(Dim::lit(0), v, ldt)?;
    let hot = e.bin(BinaryOp::Eq, lab, classes)?;
    let zero = e.k(0.0, DType::F32);
    let picked = e.select(hot, l, zero)?;
    let picked = e.reduce(ReduceOp::Sum, picked, ax, true)?;
    let mut loss = e.bin(BinaryOp::Sub, lse, picked)?;
    let one = e.k(1.0, DType::F32);
    let counted = match ignore {
        Some(i) => {
            let ig = e.k(i as f64, ldt);
            let skip = e.bin(BinaryOp::Eq, lab, ig)?;
            loss = e.select(skip, zero, loss)?;
            e.select(skip, zero, one)?
        }
        // Every label counts: a 1 per token, shaped like the labels.
        None => {
            let all = e.bin(BinaryOp::Eq, lab, lab)?;
            e.select(all, one, zero)?
        }
    };
    Ok((loss, counted))
}

/// Sum over every axis, to a scalar.
fn sum_all(e: &mut Emit, mut x: Value) -> R<Value> {
    while e.g.ty(x).rank() > 0 {
        x = e.reduce(ReduceOp::Sum, x, 0, false)?;
    }
    Ok(x)
}

// ---------------------------------------------------------------- moe_route

/// Scores, selection bias, group-limited top-k and the gate weights, with `top_k` for
/// every selection (its order: larger first, ties to the lower index, as the composite's).
fn moe_route(e: &mut Emit, logits: Value, bias: Option<Value>, r: &Routing) -> (R<Value>, R<Value>) {
    match moe_route_inner(e, logits, bias, r) {
        Ok((i, w)) => (Ok(i), Ok(w)),
        Err(m) => (Err(m.clone()), Err(m)),
    }
}

fn moe_route_inner(e: &mut Emit, logits: Value, bias: Option<Value>, r: &Routing) -> R<(Value, Value)> {
    let t = e.ty(logits);
    let (ax, dt) = (t.rank() - 1, t.dtype);
    let experts = t.shape[ax].as_const().ok_or("the expert axis must be constant")?;
    let scores = match r.scoring {
        Scoring::Softmax => e.op(Op::Softmax { axis: ax as u8 }, &[logits])?,
        Scoring::Sigmoid => e.un(UnaryOp::Sigmoid, logits)?,
    };
    let choice = match bias.filter(|_| r.selection_bias) {
        Some(b) => e.bin(BinaryOp::Add, scores, b)?,
        None => scores,
    };
    let groups = r.groups.max(1) as i64;
    let candidates = if groups > 1 {
        let per = experts / groups;
        let cg = e.reshape(choice, lead_then(&t, &[Dim::lit(groups), Dim::lit(per)]))?;
        let gs = match r.group_score {
            Some(GroupScore::Top2Sum) if per >= 2 => {
                let top2 = e.node(Op::TopK { k: 2, axis: ax as u8 + 1 }, &[cg])?;
                e.reduce(ReduceOp::Sum, top2.out(0), ax + 1, false)?
            }
            // The best member (a group of one scores that member under top2_sum too).
            _ => e.reduce(ReduceOp::Max, cg, ax + 1, false)?,
        };
        let kept = e.node(Op::TopK { k: r.groups_kept, axis: ax as u8 }, &[gs])?;
        let kept = e.reshape(kept.out(1), lead_then(&t, &[Dim::lit(r.groups_kept as i64), Dim::lit(1)]))?;
        let ids = e.iota(Dim::lit(0), Dim::lit(groups), DType::I32)?;
        let hit = e.bin(BinaryOp::Eq, kept, ids)?;
        let keep = e.reduce(ReduceOp::Max, hit, ax, false)?;
        let keep = e.reshape(keep, lead_then(&t, &[Dim::lit(groups), Dim::lit(1)]))?;
        let ninf = e.k(f64::NEG_INFINITY, dt);
        let masked = e.select(keep, cg, ninf)?;
        e.reshape(masked, lead_then(&t, &[Dim::lit(experts)]))?
    } else {
        choice
    };
    let top = e.node(Op::TopK { k: r.top_k, axis: ax as u8 }, &[candidates])?;
    let idx = top.out(1);
    let w = gate_weights(e, scores, idx, r)?;
    Ok((idx, w))
}

/// The replayed router: the scores, then the gate weights at the given indices
/// ([`gate_weights`], as the router's own); the indices pass through as `i32`.
fn moe_route_replay(e: &mut Emit, logits: Value, idx: Value, r: &Routing) -> (R<Value>, R<Value>) {
    let inner = |e: &mut Emit| -> R<(Value, Value)> {
        let ax = e.ty(logits).rank() - 1;
        let scores = match r.scoring {
            Scoring::Softmax => e.op(Op::Softmax { axis: ax as u8 }, &[logits])?,
            Scoring::Sigmoid => e.un(UnaryOp::Sigmoid, logits)?,
        };
        let idx = if e.ty(idx).dtype == DType::I32 { idx } else { e.op(Op::Cast { to: DType::I32 }, &[idx])? };
        let w = gate_weights(e, scores, idx, r)?;
        Ok((idx, w))
    };
    match inner(e) {
        Ok((i, w)) => (Ok(i), Ok(w)),
        Err(m) => (Err(m.clone()), Err(m)),
    }
}

/// The router's gate weights from its scores `[T.., E]` and chosen indices
/// `i32[T.., top_k]`: the scores there, normalised and scaled as `r` says. Shared by the
/// router and its replay, so the two cannot compute weights differently.
fn gate_weights(e: &mut Emit, scores: Value, idx: Value, r: &Routing) -> R<Value> {
    let t = e.ty(scores);
    let (ax, dt) = (t.rank() - 1, t.dtype);
    let experts = t.shape[ax].as_const().ok_or("the expert axis must be constant")?;
    // The unbiased scores of the chosen experts, by a one-hot sum (exact: one term).
    let idx3 = e.reshape(idx, lead_then(&t, &[Dim::lit(r.top_k as i64), Dim::lit(1)]))?;
    let ids = e.iota(Dim::lit(0), Dim::lit(experts), DType::I32)?;
    let hot = e.bin(BinaryOp::Eq, idx3, ids)?;
    let s3 = e.reshape(scores, lead_then(&t, &[Dim::lit(1), Dim::lit(experts)]))?;
    let zero = e.k(0.0, dt);
    let picked = e.select(hot, s3, zero)?;
    let mut w = e.reduce(ReduceOp::Sum, picked, ax + 1, false)?;
    if r.normalize {
        let sum = e.reduce(ReduceOp::Sum, w, ax, true)?;
        let tiny = e.k(1e-20, dt);
        let sum = e.bin(BinaryOp::Add, sum, tiny)?;
        w = e.bin(BinaryOp::Div, w, sum)?;
    }
    if r.scale.get() != 1.0 {
        let s = e.k(r.scale.get(), dt);
        w = e.bin(BinaryOp::Mul, w, s)?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Float;
    use crate::passes::test_util::{f32t, n, text};

    fn run(g: &mut Graph) -> BTreeMap<&'static str, usize> {
        let mut count = BTreeMap::new();
        decompose_graph(g, &mut count).unwrap();
        let m = crate::passes::test_util::module_of("f", g.clone(), crate::ir::Mode::Prefill);
        assert_eq!(crate::ir::verify(&m), Ok(()), "{}", text(g));
        count
    }

    #[test]
    fn rms_norm_and_swiglu_expand_as_documented() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, n(8)]), None);
        let w = g.param("w", f32t([n(8)]), None);
        let y = g.add_inferred(Op::RmsNorm { eps: Float::new(1e-6) }, &[x.into(), w.into()], None).unwrap();
        let gt = g.param("g", f32t([n(6), n(8)]), None);
        let dn = g.param("d", f32t([n(8), n(6)]), None);
        let s = g.add_inferred(Op::SwiGlu, &[y.into(), gt.into(), gt.into(), dn.into()], None).unwrap();
        g.ret(&[s.into()], None);
        let count = run(&mut g);
        assert_eq!(count.into_iter().collect::<Vec<_>>(), [("rms_norm", 1), ("swiglu", 1)]);
        let t = text(&g);
        for op in ["square(", "reduce_mean(", "rsqrt(", "silu(", "matmul("] {
            assert!(t.contains(op), "{op} missing:\n{t}");
        }
        assert!(!t.contains("rms_norm(") && !t.contains("swiglu(") && !t.contains("cast("), "{t}");
    }

    #[test]
    fn rope_tables_are_shared_and_kept_ops_stay() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, Dim::S, n(2), n(8)]), None);
        let pos = g.input(1, "pos", Ty::new(DType::I64, [Dim::B, Dim::S]), None);
        let c = g.input(2, "c", f32t([Dim::B, Dim::C, n(2), n(8)]), None);
        let rope = Op::Rope { layout: RopeLayout::Interleaved, theta: Float::new(1e4), rotary_dim: 6, yarn: None };
        let q = g.add_inferred(rope.clone(), &[x.into(), pos.into()], None).unwrap();
        let k = g.add_inferred(rope, &[x.into(), pos.into()], None).unwrap();
        let a = g.add_inferred(Op::CacheAppend { axis: 1 }, &[c.into(), k.into()], None).unwrap();
        g.ret(&[q.into(), a.into()], None);
        assert_eq!(run(&mut g).get("rope"), Some(&2));
        let t = text(&g);
        assert_eq!(t.matches("rope_freqs(").count(), 1, "{t}");
        assert_eq!(t.matches("cos(").count(), 1, "{t}");
        assert!(t.contains("cache_append("), "{t}");
    }
}
