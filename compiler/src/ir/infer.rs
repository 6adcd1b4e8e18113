//! Shape and dtype inference: the `## Shape rule` of every [`Op`] variant, as code.
//!
//! [`infer`] is a pure function of the op, its input types and (for calls) the callee's
//! signature. The graph builder ([`crate::ir::Graph::add_inferred`]), the verifier and the
//! later shape-inference pass all call it, so a rule is written once. Errors name the op
//! and say which input disagrees with what; the caller attaches the node's span.

use super::dim::{Dim, Shape};
use super::dtype::{DType, Ty};
use super::fused::{FusedKernel, Operand};
use super::graph::Signature;
use super::op::{Op, ReduceOp, Routing};
use dsc_dsl::span::Span;
use std::fmt;

/// An op whose inputs break its shape rule.
#[derive(Debug, Clone, PartialEq)]
pub struct InferError {
    /// [`Op::name`] of the offending op.
    pub op: &'static str,
    /// The node's span, when the caller knows it.
    pub span: Option<Span>,
    pub message: String,
}

impl fmt::Display for InferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.message)
    }
}

impl std::error::Error for InferError {}

type R<T> = Result<T, String>;

/// The output types of `op` applied to inputs of types `inputs` (slot order).
///
/// Returns `Ok(None)` for leaves ([`Op::Input`], [`Op::Param`], [`Op::Const`]), whose
/// type is declared rather than inferred. `callee` is the signature of the function a
/// [`Op::Call`] names; other ops ignore it.
pub fn infer(op: &Op, inputs: &[&Ty], callee: Option<&Signature>) -> Result<Option<Vec<Ty>>, InferError> {
    if op.is_leaf() {
        return if inputs.is_empty() { Ok(None) } else { Err(err(op, format!("takes no inputs, got {}", inputs.len()))) };
    }
    if !op.arity().accepts(inputs.len()) {
        return Err(err(op, format!("takes {} inputs, got {}", op.arity(), inputs.len())));
    }
    rule(op, inputs, callee).map(Some).map_err(|m| err(op, m))
}

fn err(op: &Op, message: String) -> InferError {
    InferError { op: op.name(), span: None, message }
}

/// One output of type `t`.
fn one(t: Ty) -> R<Vec<Ty>> {
    Ok(vec![t])
}

fn rule(op: &Op, x: &[&Ty], callee: Option<&Signature>) -> R<Vec<Ty>> {
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => unreachable!("leaves return early"),

        Op::MatMul => {
            let (a, w) = (x[0], x[1]);
            float(a, "x")?;
            same_dtype(a, w, "x", "weight")?;
            if w.rank() != 2 {
                return Err(format!("weight must be [out, in], got {}", w.shape));
            }
            let k = last(a, "x")?;
            if w.shape[1] != k {
                return Err(format!("x {} contracts {k}, but weight {} takes {}", a.shape, w.shape, w.shape[1]));
            }
            one(Ty::new(a.dtype, with_last(&a.shape, w.shape[0])))
        }

        Op::BatchMatMul => {
            let (a, b) = (x[0], x[1]);
            float(a, "a")?;
            same_dtype(a, b, "a", "b")?;
            let r = a.rank();
            if r < 2 || b.rank() != r {
                return Err(format!("needs equal ranks >= 2, got a {} and b {}", a.shape, b.shape));
            }
            if a.shape[..r - 2] != b.shape[..r - 2] {
                return Err(format!("batch axes differ: a {} vs b {}", a.shape, b.shape));
            }
            if a.shape[r - 1] != b.shape[r - 2] {
                return Err(format!("a {} contracts {}, b {} offers {}", a.shape, a.shape[r - 1], b.shape, b.shape[r - 2]));
            }
            let mut s = a.shape.0.clone();
            s[r - 1] = b.shape[r - 1];
            one(Ty::new(a.dtype, s))
        }

        Op::Unary(u) => {
            let t = x[0];
            if !(t.dtype.is_float() || (u.allows_int() && t.dtype.is_int())) {
                return Err(format!("needs a float input, got {}", t.dtype));
            }
            one(t.clone())
        }

        Op::Binary(b) => {
            let (l, r) = (x[0], x[1]);
            same_dtype(l, r, "lhs", "rhs")?;
            if l.dtype == DType::Bool && !b.is_comparison() {
                return Err("arithmetic on bool".into());
            }
            let shape = broadcast(&[&l.shape, &r.shape])?;
            let dtype = if b.is_comparison() { DType::Bool } else { l.dtype };
            one(Ty::new(dtype, shape))
        }

        Op::Select => {
            let (c, a, b) = (x[0], x[1], x[2]);
            if c.dtype != DType::Bool {
                return Err(format!("condition must be bool, got {}", c.dtype));
            }
            same_dtype(a, b, "a", "b")?;
            let shape = broadcast(&[&c.shape, &a.shape, &b.shape])?;
            one(Ty::new(a.dtype, shape))
        }

        Op::Reduce { op: r, axis, keepdim } => {
            let t = x[0];
            let ax = axis_of(*axis, t.rank())?;
            if *r == ReduceOp::Mean {
                float(t, "x")?;
            }
            let mut s = t.shape.0.clone();
            if *keepdim {
                s[ax] = Dim::lit(1);
            } else {
                s.remove(ax);
            }
            one(Ty::new(t.dtype, s))
        }

        Op::Softmax { axis } => {
            float(x[0], "x")?;
            axis_of(*axis, x[0].rank())?;
            one(x[0].clone())
        }

        Op::Gather { axis } => {
            let (table, idx) = (x[0], x[1]);
            let ax = axis_of(*axis, table.rank())?;
            int(idx, "indices")?;
            let mut s = table.shape[..ax].to_vec();
            s.extend_from_slice(&idx.shape);
            s.extend_from_slice(&table.shape[ax + 1..]);
            one(Ty::new(table.dtype, s))
        }

        Op::ScatterAdd { axis } => {
            let (dst, idx, src) = (x[0], x[1], x[2]);
            let ax = axis_of(*axis, dst.rank())?;
            int(idx, "indices")?;
            same_dtype(dst, src, "dst", "src")?;
            let mut want = dst.shape[..ax].to_vec();
            want.extend_from_slice(&idx.shape);
            want.extend_from_slice(&dst.shape[ax + 1..]);
            if src.shape.0 != want {
                return Err(format!("src must be {} for dst {} and indices {}, got {}", Shape(want), dst.shape, idx.shape, src.shape));
            }
            one(dst.clone())
        }

        Op::TopK { k, axis } => {
            let t = x[0];
            let ax = axis_of(*axis, t.rank())?;
            if *k == 0 {
                return Err("k must be positive".into());
            }
            if let Some(n) = t.shape[ax].as_const() {
                if n < *k as i64 {
                    return Err(format!("k = {k} exceeds axis {ax} of {}", t.shape));
                }
            }
            let mut s = t.shape.0.clone();
            s[ax] = Dim::lit(*k as i64);
            Ok(vec![Ty::new(t.dtype, s.clone()), Ty::new(DType::I32, s)])
        }

        Op::Reshape { shape } => {
            let t = x[0];
            if !t.shape.same_numel(shape) {
                return Err(format!("{} and {shape} differ in element count (symbolic axes must pass through unchanged)", t.shape));
            }
            one(Ty::new(t.dtype, shape.clone()))
        }

        Op::Permute { perm } => {
            let t = x[0];
            let mut seen = vec![false; t.rank()];
            if perm.len() != t.rank() {
                return Err(format!("perm {perm:?} has {} entries for rank {}", perm.len(), t.rank()));
            }
            for &p in perm {
                match seen.get_mut(p as usize) {
                    Some(s) if !*s => *s = true,
                    _ => return Err(format!("perm {perm:?} is not a permutation of 0..{}", t.rank())),
                }
            }
            one(Ty::new(t.dtype, perm.iter().map(|&p| t.shape[p as usize]).collect::<Vec<_>>()))
        }

        Op::Broadcast { shape } => {
            let t = x[0];
            if shape.rank() < t.rank() {
                return Err(format!("cannot broadcast {} to {shape}, which has fewer axes", t.shape));
            }
            let off = shape.rank() - t.rank();
            for (i, d) in t.shape.iter().enumerate() {
                let o = shape[off + i];
                if *d != o && !d.is(1) {
                    return Err(format!("cannot broadcast {} to {shape}: axis {i} is {d}, neither 1 nor {o}", t.shape));
                }
            }
            one(Ty::new(t.dtype, shape.clone()))
        }

        Op::Slice { axis, start, len } => {
            let t = x[0];
            let ax = axis_of(*axis, t.rank())?;
            // Each bound is checked only where it is constant; see the op's doc.
            if start.as_const().is_some_and(|v| v < 0) {
                return Err(format!("start {start} is negative"));
            }
            if len.as_const().is_some_and(|v| v <= 0) {
                return Err(format!("len {len} must be positive"));
            }
            if (t.shape[ax] - (*start + *len)).as_const().is_some_and(|v| v < 0) {
                return Err(format!("{start}+{len} runs past axis {ax} of {}", t.shape));
            }
            let mut s = t.shape.0.clone();
            s[ax] = *len;
            one(Ty::new(t.dtype, s))
        }

        Op::Concat { axis } => {
            let first = x[0];
            let ax = axis_of(*axis, first.rank())?;
            let mut total = Dim::lit(0);
            for (i, t) in x.iter().enumerate() {
                same_dtype(first, t, "input 0", &format!("input {i}"))?;
                if !same_except(&first.shape, &t.shape, ax) {
                    return Err(format!("input {i} {} does not match input 0 {} off axis {ax}", t.shape, first.shape));
                }
                total = total + t.shape[ax];
            }
            let mut s = first.shape.0.clone();
            s[ax] = total;
            one(Ty::new(first.dtype, s))
        }

        Op::CacheAppend { axis } => {
            let (cache, new) = (x[0], x[1]);
            let ax = axis_of(*axis, cache.rank())?;
            same_dtype(cache, new, "cache", "new")?;
            if !same_except(&cache.shape, &new.shape, ax) {
                return Err(format!("new {} does not match cache {} off axis {ax}", new.shape, cache.shape));
            }
            let mut s = cache.shape.0.clone();
            s[ax] = cache.shape[ax] + new.shape[ax];
            one(Ty::new(cache.dtype, s))
        }

        Op::Cast { to } => one(Ty::new(*to, x[0].shape.clone())),

        Op::Iota { len, dtype, .. } => {
            if !(dtype.is_int() || dtype.is_float()) {
                return Err(format!("counts in an integer or float type, not {dtype}"));
            }
            if len.as_const().is_some_and(|n| n <= 0) {
                return Err(format!("len {len} must be positive"));
            }
            one(Ty::new(*dtype, [*len]))
        }

        Op::RopeFreqs { theta, rotary_dim, .. } => {
            if theta.get().is_nan() || theta.get() <= 0.0 {
                return Err(format!("theta must be positive, got {theta}"));
            }
            if *rotary_dim == 0 || rotary_dim % 2 != 0 {
                return Err(format!("rotary_dim {rotary_dim} must be even and positive"));
            }
            one(Ty::new(DType::F32, [Dim::lit(*rotary_dim as i64 / 2)]))
        }

        Op::Fused(k) => fused(k, x).map(|t| vec![t]),

        Op::RmsNorm { eps } => {
            let (t, g) = (x[0], x[1]);
            float(t, "x")?;
            same_dtype(t, g, "x", "gain")?;
            if eps.get().is_nan() || eps.get() <= 0.0 {
                return Err(format!("eps must be positive, got {eps}"));
            }
            let d = last(t, "x")?;
            if g.shape.0 != [d] {
                return Err(format!("gain must be [{d}] for x {}, got {}", t.shape, g.shape));
            }
            one(t.clone())
        }

        Op::Rope { rotary_dim, theta, .. } => {
            let (t, pos) = (x[0], x[1]);
            float(t, "x")?;
            int(pos, "positions")?;
            if !(3..=4).contains(&t.rank()) {
                return Err(format!("x must be [b, s, d] or [b, s, h, d], got {}", t.shape));
            }
            if pos.shape[..] != t.shape[..2] {
                return Err(format!("positions {} must be the leading axes {} of x", pos.shape, Shape(t.shape[..2].to_vec())));
            }
            if theta.get().is_nan() || theta.get() <= 0.0 {
                return Err(format!("theta must be positive, got {theta}"));
            }
            let d = t.shape[t.rank() - 1];
            if *rotary_dim == 0 || rotary_dim % 2 != 0 || d.as_const().is_some_and(|d| (*rotary_dim as i64) > d) {
                return Err(format!("rotary_dim {rotary_dim} must be even, positive and at most {d}"));
            }
            one(t.clone())
        }

        Op::Attention { heads, kv_heads, masked, lse, .. } => {
            let out = attention_out(x, *heads, *kv_heads, *masked)?;
            let mut outs = vec![out.clone()];
            if *lse {
                outs.push(Ty::new(DType::F32, [out.shape[0], out.shape[1], out.shape[2]]));
            }
            Ok(outs)
        }

        Op::AttentionGrad { heads, kv_heads, masked, .. } => {
            let out = attention_out(x, *heads, *kv_heads, *masked)?;
            let rest = &x[if *masked { 4 } else { 3 }..];
            let (o, lse, dout) = (rest[0], rest[1], rest[2]);
            if *o != out || *dout != out {
                return Err(format!("out and dout must be {out}, got {o} and {dout}"));
            }
            let want = Ty::new(DType::F32, [out.shape[0], out.shape[1], out.shape[2]]);
            if *lse != want {
                return Err(format!("lse must be {want}, got {lse}"));
            }
            Ok(vec![x[0].clone(), x[1].clone(), x[2].clone()])
        }

        Op::WeightGrad => {
            let (dy, t) = (x[0], x[1]);
            float(dy, "dy")?;
            same_dtype(dy, t, "dy", "x")?;
            let (n, k) = (last(dy, "dy")?, last(t, "x")?);
            if dy.rank() != t.rank() || dy.shape[..dy.rank() - 1] != t.shape[..t.rank() - 1] {
                return Err(format!("dy {} and x {} must share their leading (token) axes", dy.shape, t.shape));
            }
            one(Ty::new(dy.dtype, [n, k]))
        }

        Op::RmsNormGrad { eps } => {
            let fwd = rule(&Op::RmsNorm { eps: *eps }, &x[..2], callee)?;
            if *x[2] != fwd[0] {
                return Err(format!("dy must be {}, got {}", fwd[0], x[2]));
            }
            Ok(vec![x[0].clone(), x[1].clone()])
        }

        Op::SwiGluGrad => {
            let fwd = rule(&Op::SwiGlu, &x[..4], callee)?;
            if *x[4] != fwd[0] {
                return Err(format!("dy must be {}, got {}", fwd[0], x[4]));
            }
            Ok(x[..4].iter().map(|t| (*t).clone()).collect())
        }

        Op::ExpertFfnGrad => {
            let fwd = rule(&Op::ExpertFfn, &x[..6], callee)?;
            if *x[6] != fwd[0] {
                return Err(format!("dy must be {}, got {}", fwd[0], x[6]));
            }
            Ok([0, 2, 3, 4, 5].iter().map(|&i| x[i].clone()).collect())
        }

        Op::MoeRouteGrad(r) => {
            let (logits, idx, dw) = (x[0], x[1], x[2]);
            let fwd = rule(&Op::MoeRoute(Routing { selection_bias: false, ..*r }), &x[..1], callee)?;
            int(idx, "indices")?;
            if idx.shape != fwd[0].shape || *dw != fwd[1] {
                return Err(format!("indices and dweights must be [T.., {}] of the router, got {} and {}", r.top_k, idx, dw));
            }
            one(logits.clone())
        }

        Op::MoeRouteReplay(r) => {
            // The router's own rule (without the bias it ignores) fixes the outputs; the
            // given indices must be exactly the shape of the first.
            let fwd = rule(&Op::MoeRoute(Routing { selection_bias: false, ..*r }), &x[..1], callee)?;
            int(x[1], "indices")?;
            if x[1].shape != fwd[0].shape {
                return Err(format!("indices must be [T.., {}] of the logits, got {}", r.top_k, x[1]));
            }
            Ok(fwd)
        }

        Op::CrossEntropyGrad { ignore_index } => {
            rule(&Op::CrossEntropy { ignore_index: *ignore_index }, &x[..2], callee)?;
            if *x[2] != Ty::scalar(DType::F32) {
                return Err(format!("dloss must be f32[], got {}", x[2]));
            }
            one(x[0].clone())
        }

        Op::TokenLogProbGrad { ignore_index } => {
            let t = rule(&Op::TokenLogProb { ignore_index: *ignore_index }, &x[..2], callee)?;
            if *x[2] != t[0] {
                return Err(format!("dy must be {}, got {}", t[0], x[2]));
            }
            one(x[0].clone())
        }

        Op::MoeRoute(r) => {
            let logits = x[0];
            float(logits, "logits")?;
            let e = last(logits, "logits")?;
            if r.selection_bias {
                let bias = x[1];
                float(bias, "bias")?;
                if bias.shape.0 != [e] {
                    return Err(format!("bias must be [{e}], got {}", bias.shape));
                }
            }
            let Some(e) = e.as_const() else {
                return Err(format!("the expert axis of logits {} must be constant", logits.shape));
            };
            let (k, g, kept) = (r.top_k as i64, r.groups as i64, r.groups_kept as i64);
            if k == 0 || g == 0 || e % g != 0 {
                return Err(format!("top_k {k} and groups {g} must be positive, groups dividing {e} experts"));
            }
            if kept == 0 || kept > g || kept * (e / g) < k {
                return Err(format!("{kept} kept of {g} groups cannot supply top_k {k} of {e} experts"));
            }
            if r.group_score.is_some() != (g > 1) {
                return Err("group_score must be set exactly when groups > 1".into());
            }
            let s = with_last(&logits.shape, Dim::lit(k));
            Ok(vec![Ty::new(DType::I32, s.clone()), Ty::new(logits.dtype, s)])
        }

        Op::ExpertFfn => {
            let (t, idx, w, gate, up, down) = (x[0], x[1], x[2], x[3], x[4], x[5]);
            float(t, "x")?;
            int(idx, "indices")?;
            float(w, "weights")?;
            let h = last(t, "x")?;
            let tokens = &t.shape[..t.rank() - 1];
            if idx.rank() != t.rank() || &idx.shape[..tokens.len()] != tokens {
                return Err(format!("indices {} must be [T.., k] for x {}", idx.shape, t.shape));
            }
            if w.shape != idx.shape {
                return Err(format!("weights {} must match indices {}", w.shape, idx.shape));
            }
            for (m, n) in [(gate, "gate"), (up, "up"), (down, "down")] {
                same_dtype(t, m, "x", n)?;
                if m.rank() != 3 {
                    return Err(format!("{n} must be stacked [E, .., ..], got {}", m.shape));
                }
            }
            let (e, i) = (gate.shape[0], gate.shape[1]);
            if gate.shape.0 != [e, i, h] || up.shape != gate.shape || down.shape.0 != [e, h, i] {
                return Err(format!(
                    "expert weights must be gate/up [E, i, {h}] and down [E, {h}, i], got {}, {}, {}",
                    gate.shape, up.shape, down.shape
                ));
            }
            one(t.clone())
        }

        Op::SwiGlu => {
            let (t, gate, up, down) = (x[0], x[1], x[2], x[3]);
            float(t, "x")?;
            for (m, n) in [(gate, "gate"), (up, "up"), (down, "down")] {
                same_dtype(t, m, "x", n)?;
            }
            let h = last(t, "x")?;
            let i = gate.shape.first().copied().unwrap_or(Dim::lit(0));
            if gate.shape.0 != [i, h] || up.shape != gate.shape || down.shape.0 != [h, i] {
                return Err(format!(
                    "weights must be gate/up [i, {h}] and down [{h}, i], got {}, {}, {}",
                    gate.shape, up.shape, down.shape
                ));
            }
            one(t.clone())
        }

        Op::CrossEntropy { .. } => {
            let (logits, labels) = (x[0], x[1]);
            float(logits, "logits")?;
            int(labels, "labels")?;
            last(logits, "logits")?;
            if labels.shape[..] != logits.shape[..logits.rank() - 1] {
                return Err(format!("labels {} must be the leading axes of logits {}", labels.shape, logits.shape));
            }
            one(Ty::scalar(DType::F32))
        }

        Op::TokenLogProb { .. } => {
            let (logits, labels) = (x[0], x[1]);
            float(logits, "logits")?;
            int(labels, "labels")?;
            last(logits, "logits")?;
            if labels.shape[..] != logits.shape[..logits.rank() - 1] {
                return Err(format!("labels {} must be the leading axes of logits {}", labels.shape, logits.shape));
            }
            one(Ty { dtype: DType::F32, shape: labels.shape.clone() })
        }

        Op::Call { function, .. } => {
            let Some(sig) = callee else {
                return Err(format!("no function `{function}`"));
            };
            if sig.inputs.len() != x.len() {
                return Err(format!("`{function}` takes {} arguments, got {}", sig.inputs.len(), x.len()));
            }
            for (i, (want, got)) in sig.inputs.iter().zip(x).enumerate() {
                if want != *got {
                    return Err(format!("argument {i} of `{function}` must be {want}, got {got}"));
                }
            }
            Ok(sig.outputs.clone())
        }

        Op::Return => Ok(Vec::new()),
    }
}

// ---------------------------------------------------------------- helpers

/// The output type of attention over `q, k, v[, mask]` (the rule of [`Op::Attention`],
/// shared with its gradient).
fn attention_out(x: &[&Ty], heads: u32, kv_heads: u32, masked: bool) -> R<Ty> {
    let (q, k, v) = (x[0], x[1], x[2]);
    float(q, "q")?;
    same_dtype(q, k, "q", "k")?;
    same_dtype(q, v, "q", "v")?;
    for (t, n) in [(q, "q"), (k, "k"), (v, "v")] {
        if t.rank() != 4 {
            return Err(format!("{n} must be [b, seq, heads, dim], got {}", t.shape));
        }
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(format!("heads {heads} is not a multiple of kv_heads {kv_heads}"));
    }
    let (b, sq, dk) = (q.shape[0], q.shape[1], q.shape[3]);
    let sk = k.shape[1];
    if !q.shape[2].is(heads as i64) {
        return Err(format!("q {} must have {heads} heads", q.shape));
    }
    let kv_want = [b, sk, Dim::lit(kv_heads as i64), dk];
    if k.shape.0 != kv_want {
        return Err(format!("k must be {} for q {}, got {}", Shape(kv_want.to_vec()), q.shape, k.shape));
    }
    if v.shape[..3] != kv_want[..3] {
        return Err(format!("v {} must match k {} on [b, seq, kv_heads]", v.shape, k.shape));
    }
    if masked {
        let m = x[3];
        same_dtype(q, m, "q", "mask")?;
        if m.shape.0 != [b, sq, sk] {
            return Err(format!("mask must be {}, got {}", Shape(vec![b, sq, sk]), m.shape));
        }
    }
    Ok(Ty::new(q.dtype, [b, sq, q.shape[2], v.shape[3]]))
}

/// The result type of a fused kernel's program over inputs `x`, checking that every
/// operand exists, every input is read and every value but the result is read later.
fn fused(k: &FusedKernel, x: &[&Ty]) -> R<Ty> {
    if k.is_empty() {
        return Err("an empty kernel".into());
    }
    let head = match k.head {
        Some(h) => Some(rule(&h.op(), &x[..2], None).map_err(|e| format!("head: {e}"))?.remove(0)),
        None => None,
    };
    let mut steps: Vec<Ty> = Vec::with_capacity(k.steps.len());
    for (j, s) in k.steps.iter().enumerate() {
        let op = s.op.op();
        if !op.arity().accepts(s.args.len()) {
            return Err(format!("s{j}: {} takes {} operands, got {}", op.name(), op.arity(), s.args.len()));
        }
        let mut tys: Vec<&Ty> = Vec::with_capacity(s.args.len());
        for a in &s.args {
            let t = match *a {
                Operand::Head => head.as_ref(),
                Operand::Input(i) => x.get(i as usize).copied(),
                Operand::Step(i) if (i as usize) < j => steps.get(i as usize),
                Operand::Step(_) => None,
            };
            tys.push(t.ok_or_else(|| format!("s{j} reads {a}, which is not defined before it"))?);
        }
        let t = rule(&op, &tys, None).map_err(|e| format!("s{j}: {}: {e}", op.name()))?.remove(0);
        steps.push(t);
    }
    for i in (if k.head.is_some() { 2 } else { 0 })..x.len() {
        if k.reads(Operand::Input(i as u16)) == 0 {
            return Err(format!("input {i} is never read"));
        }
    }
    let result = k.result();
    let values = k.head.iter().map(|_| Operand::Head).chain((0..k.steps.len() as u16).map(Operand::Step));
    if let Some(dead) = values.filter(|&v| v != result).find(|&v| k.reads(v) == 0) {
        return Err(format!("{dead} is never read"));
    }
    Ok(match result {
        Operand::Head => head.expect("a kernel without steps has a head"),
        _ => steps.pop().expect("a kernel with a step result has steps"),
    })
}

fn float(t: &Ty, what: &str) -> R<()> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{what} must be a float tensor, got {t}"))
    }
}

fn int(t: &Ty, what: &str) -> R<()> {
    if t.dtype.is_int() {
        Ok(())
    } else {
        Err(format!("{what} must be an integer tensor, got {t}"))
    }
}

fn same_dtype(a: &Ty, b: &Ty, an: &str, bn: &str) -> R<()> {
    if a.dtype == b.dtype {
        Ok(())
    } else {
        Err(format!("{an} is {} but {bn} is {} (insert a cast)", a.dtype, b.dtype))
    }
}

fn last(t: &Ty, what: &str) -> R<Dim> {
    t.shape.last().ok_or_else(|| format!("{what} must have rank >= 1, got a scalar"))
}

fn with_last(s: &Shape, d: Dim) -> Shape {
    let mut v = s.0.clone();
    if let Some(l) = v.last_mut() {
        *l = d;
    }
    Shape(v)
}

fn axis_of(axis: u8, rank: usize) -> R<usize> {
    let a = axis as usize;
    if a < rank {
        Ok(a)
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

fn same_except(a: &Shape, b: &Shape, axis: usize) -> bool {
    a.rank() == b.rank() && a.iter().zip(b.iter()).enumerate().all(|(i, (x, y))| i == axis || x == y)
}

/// numpy broadcasting of several shapes (see [`crate::ir::op::BinaryOp`]).
pub fn broadcast(shapes: &[&Shape]) -> R<Shape> {
    let rank = shapes.iter().map(|s| s.rank()).max().unwrap_or(0);
    let mut out = vec![Dim::lit(1); rank];
    for s in shapes {
        let off = rank - s.rank();
        for (i, d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if o.is(1) {
                *o = *d;
            } else if !d.is(1) && d != o {
                let all: Vec<String> = shapes.iter().map(|s| s.to_string()).collect();
                return Err(format!("shapes {} do not broadcast ({d} vs {o})", all.join(", ")));
            }
        }
    }
    Ok(Shape(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::{BinaryOp, Float, GroupScore, Routing, Scoring, UnaryOp};

    const B: Dim = Dim::B;
    const S: Dim = Dim::S;
    const C: Dim = Dim::C;
    fn n(v: i64) -> Dim {
        Dim::lit(v)
    }
    fn bf(s: impl Into<Shape>) -> Ty {
        Ty::new(DType::Bf16, s)
    }
    fn i32t(s: impl Into<Shape>) -> Ty {
        Ty::new(DType::I32, s)
    }
    fn ok(op: Op, xs: &[&Ty]) -> Vec<Ty> {
        infer(&op, xs, None).unwrap().unwrap()
    }
    fn bad(op: Op, xs: &[&Ty]) -> String {
        infer(&op, xs, None).unwrap_err().to_string()
    }

    #[test]
    fn leaves_are_declared() {
        assert_eq!(infer(&Op::Param { name: "w".into() }, &[], None), Ok(None));
        assert!(infer(&Op::Const { value: Float::new(1.0) }, &[&bf([B])], None).is_err());
    }

    #[test]
    fn matmul() {
        let x = bf([B, S, n(7168)]);
        let w = bf([n(1536), n(7168)]);
        assert_eq!(ok(Op::MatMul, &[&x, &w]), vec![bf([B, S, n(1536)])]);
        let e = bad(Op::MatMul, &[&x, &bf([n(7168), n(1536)])]);
        assert!(e.starts_with("matmul: x [b,s,7168] contracts 7168"), "{e}");
        assert!(bad(Op::MatMul, &[&x, &Ty::new(DType::F32, [n(1), n(7168)])]).contains("insert a cast"));
        assert!(bad(Op::MatMul, &[&x]).contains("takes 2 inputs, got 1"));
    }

    #[test]
    fn batch_matmul() {
        let a = bf([B, n(8), S, n(64)]);
        let b = bf([B, n(8), n(64), C + S]);
        assert_eq!(ok(Op::BatchMatMul, &[&a, &b]), vec![bf([B, n(8), S, C + S])]);
        assert!(bad(Op::BatchMatMul, &[&a, &bf([B, n(4), n(64), S])]).contains("batch axes differ"));
    }

    #[test]
    fn broadcasting() {
        let x = bf([B, S, n(64)]);
        let g = bf([n(64)]);
        let sc = bf(Shape::scalar());
        assert_eq!(ok(Op::Binary(BinaryOp::Mul), &[&x, &g]), vec![x.clone()]);
        assert_eq!(ok(Op::Binary(BinaryOp::Add), &[&sc, &x]), vec![x.clone()]);
        assert_eq!(ok(Op::Binary(BinaryOp::Lt), &[&x, &sc])[0].dtype, DType::Bool);
        let e = bad(Op::Binary(BinaryOp::Add), &[&x, &bf([C, n(64)])]);
        assert!(e.contains("do not broadcast (c vs s)"), "{e}");
        let keep = bf([B, n(1), n(64)]);
        assert_eq!(ok(Op::Binary(BinaryOp::Sub), &[&x, &keep]), vec![x.clone()]);
        let cond = Ty::new(DType::Bool, [S, n(1)]);
        assert_eq!(ok(Op::Select, &[&cond, &x, &sc]), vec![bf([B, S, n(64)])]);
        assert!(bad(Op::Unary(UnaryOp::Exp), &[&i32t([B])]).contains("float"));
        assert_eq!(ok(Op::Unary(UnaryOp::Neg), &[&i32t([B])]), vec![i32t([B])]);
    }

    #[test]
    fn reductions_and_softmax() {
        let x = bf([B, S, n(64)]);
        assert_eq!(ok(Op::Reduce { op: ReduceOp::Sum, axis: 2, keepdim: false }, &[&x]), vec![bf([B, S])]);
        assert_eq!(ok(Op::Reduce { op: ReduceOp::Mean, axis: 1, keepdim: true }, &[&x]), vec![bf([B, n(1), n(64)])]);
        assert!(bad(Op::Reduce { op: ReduceOp::Max, axis: 3, keepdim: false }, &[&x]).contains("axis 3 out of range"));
        assert!(bad(Op::Reduce { op: ReduceOp::Mean, axis: 0, keepdim: false }, &[&i32t([B])]).contains("float"));
        assert_eq!(ok(Op::Softmax { axis: 2 }, &[&x]), vec![x.clone()]);
    }

    #[test]
    fn gather_scatter_topk() {
        let table = bf([n(102400), n(4096)]);
        let ids = i32t([B, S]);
        assert_eq!(ok(Op::Gather { axis: 0 }, &[&table, &ids]), vec![bf([B, S, n(4096)])]);
        assert!(bad(Op::Gather { axis: 0 }, &[&table, &bf([B, S])]).contains("integer"));
        let dy = bf([B, S, n(4096)]);
        assert_eq!(ok(Op::ScatterAdd { axis: 0 }, &[&table, &ids, &dy]), vec![table.clone()]);
        assert!(bad(Op::ScatterAdd { axis: 0 }, &[&table, &ids, &bf([B, n(4096)])]).contains("src must be [b,s,4096]"));
        let scores = bf([B, S, n(64)]);
        let out = ok(Op::TopK { k: 6, axis: 2 }, &[&scores]);
        assert_eq!(out, vec![bf([B, S, n(6)]), i32t([B, S, n(6)])]);
        assert!(bad(Op::TopK { k: 65, axis: 2 }, &[&scores]).contains("exceeds"));
    }

    #[test]
    fn layout_ops() {
        let x = bf([B, S, n(4096)]);
        let heads = Shape::from([B, S, n(32), n(128)]);
        assert_eq!(ok(Op::Reshape { shape: heads.clone() }, &[&x]), vec![bf(heads)]);
        assert!(bad(Op::Reshape { shape: Shape::from([B, n(4096)]) }, &[&x]).contains("element count"));
        let p = ok(Op::Permute { perm: vec![0, 2, 1] }, &[&x]);
        assert_eq!(p, vec![bf([B, n(4096), S])]);
        assert!(bad(Op::Permute { perm: vec![0, 0, 1] }, &[&x]).contains("not a permutation"));
        let k_pe = bf([B, C + S, n(1), n(64)]);
        let heads = Shape::from([B, C + S, n(128), n(64)]);
        assert_eq!(ok(Op::Broadcast { shape: heads.clone() }, &[&k_pe]), vec![bf(heads.clone())]);
        let w = bf([n(128), n(64)]);
        assert_eq!(ok(Op::Broadcast { shape: Shape::from([B, n(128), n(64)]) }, &[&w]), vec![bf([B, n(128), n(64)])]);
        let e = bad(Op::Broadcast { shape: Shape::from([B, S, n(128), n(64)]) }, &[&k_pe]);
        assert_eq!(e, "broadcast: cannot broadcast [b,c+s,1,64] to [b,s,128,64]: axis 1 is c+s, neither 1 nor s");
        assert!(bad(Op::Broadcast { shape: Shape::from([n(64)]) }, &[&w]).contains("fewer axes"));
        let last = Op::Slice { axis: 1, start: S - 1, len: n(1) };
        assert_eq!(ok(last, &[&x]), vec![bf([B, n(1), n(4096)])]);
        let nope = Op::Slice { axis: 2, start: n(0), len: n(128) };
        assert_eq!(ok(nope, &[&x]), vec![bf([B, S, n(128)])]);
        assert!(bad(Op::Slice { axis: 2, start: n(4000), len: n(128) }, &[&x]).contains("runs past"));
        let cache = bf([B, C, n(576)]);
        let new = bf([B, S, n(576)]);
        assert_eq!(ok(Op::Concat { axis: 1 }, &[&cache, &new]), vec![bf([B, C + S, n(576)])]);
        assert_eq!(ok(Op::CacheAppend { axis: 1 }, &[&cache, &new]), vec![bf([B, C + S, n(576)])]);
        assert!(bad(Op::Concat { axis: 1 }, &[&cache, &bf([B, S, n(512)])]).contains("off axis 1"));
        assert_eq!(ok(Op::Cast { to: DType::F32 }, &[&x])[0], Ty::new(DType::F32, [B, S, n(4096)]));
    }

    #[test]
    fn composites() {
        let x = bf([B, S, n(7168)]);
        assert_eq!(ok(Op::RmsNorm { eps: 1e-6.into() }, &[&x, &bf([n(7168)])]), vec![x.clone()]);
        let e = bad(Op::RmsNorm { eps: 1e-6.into() }, &[&x, &bf([n(4096)])]);
        assert_eq!(e, "rms_norm: gain must be [7168] for x [b,s,7168], got [4096]");

        let rope = Op::Rope { layout: crate::ir::op::RopeLayout::Interleaved, theta: 1e4.into(), rotary_dim: 64, yarn: None };
        let q_pe = bf([B, S, n(128), n(64)]);
        assert_eq!(ok(rope.clone(), &[&q_pe, &i32t([B, S])]), vec![q_pe.clone()]);
        assert!(bad(rope, &[&q_pe, &i32t([B, C])]).contains("leading axes"));

        let att = Op::Attention { heads: 32, kv_heads: 8, scale: 0.088.into(), causal: true, masked: false, lse: false };
        let q = bf([B, S, n(32), n(128)]);
        let k = bf([B, C + S, n(8), n(128)]);
        let v = bf([B, C + S, n(8), n(64)]);
        assert_eq!(ok(att.clone(), &[&q, &k, &v]), vec![bf([B, S, n(32), n(64)])]);
        assert!(bad(att, &[&q, &bf([B, S, n(4), n(128)]), &v]).contains("k must be [b,s,8,128]"));

        let routing = Routing {
            top_k: 8,
            scoring: Scoring::Sigmoid,
            selection_bias: true,
            groups: 8,
            groups_kept: 4,
            group_score: Some(GroupScore::Top2Sum),
            normalize: true,
            scale: 2.5.into(),
        };
        let logits = Ty::new(DType::F32, [B, S, n(256)]);
        let bias = Ty::new(DType::F32, [n(256)]);
        let out = ok(Op::MoeRoute(routing), &[&logits, &bias]);
        assert_eq!(out, vec![i32t([B, S, n(8)]), Ty::new(DType::F32, [B, S, n(8)])]);
        let lone = Routing { groups: 3, ..routing };
        assert!(bad(Op::MoeRoute(lone), &[&logits, &bias]).contains("groups dividing"));
        // Replay: no bias input whatever `selection_bias` says; the router's outputs.
        assert_eq!(ok(Op::MoeRouteReplay(routing), &[&logits, &out[0]]), out);
        assert!(bad(Op::MoeRouteReplay(routing), &[&logits, &i32t([B, S, n(6)])]).contains("indices must be [T.., 8]"));
        assert!(bad(Op::MoeRouteReplay(routing), &[&logits, &logits]).contains("indices"));

        let idx = &out[0];
        let w = &out[1];
        let gate = bf([n(256), n(2048), n(7168)]);
        let down = bf([n(256), n(7168), n(2048)]);
        assert_eq!(ok(Op::ExpertFfn, &[&x, idx, w, &gate, &gate, &down]), vec![x.clone()]);
        assert!(bad(Op::ExpertFfn, &[&x, idx, w, &gate, &gate, &gate]).contains("expert weights"));

        let g2 = bf([n(18432), n(7168)]);
        let d2 = bf([n(7168), n(18432)]);
        assert_eq!(ok(Op::SwiGlu, &[&x, &g2, &g2, &d2]), vec![x.clone()]);

        let ce = ok(Op::CrossEntropy { ignore_index: Some(-100) }, &[&bf([B, S, n(129280)]), &i32t([B, S])]);
        assert_eq!(ce, vec![Ty::scalar(DType::F32)]);
        let lp = Op::TokenLogProb { ignore_index: Some(-100) };
        let logp = ok(lp.clone(), &[&bf([B, S, n(129280)]), &i32t([B, S])]);
        assert_eq!(logp, vec![Ty::new(DType::F32, [B, S])]);
        assert!(bad(lp, &[&bf([B, S, n(8)]), &i32t([B])]).contains("leading axes"));
        let grad = Op::TokenLogProbGrad { ignore_index: None };
        assert_eq!(ok(grad.clone(), &[&bf([B, n(8)]), &i32t([B]), &Ty::new(DType::F32, [B])]), vec![bf([B, n(8)])]);
        assert!(bad(grad, &[&bf([B, n(8)]), &i32t([B]), &Ty::scalar(DType::F32)]).contains("dy must be"));
    }

    #[test]
    fn calls() {
        let x = bf([B, S, n(64)]);
        let sig = Signature { inputs: vec![x.clone()], outputs: vec![x.clone(), i32t([B])] };
        let call = Op::Call { function: "layer".into(), layer: Some(0) };
        assert_eq!(infer(&call, &[&x], Some(&sig)).unwrap().unwrap(), sig.outputs);
        let e = infer(&call, &[&bf([B, S, n(32)])], Some(&sig)).unwrap_err().to_string();
        assert_eq!(e, "call: argument 0 of `layer` must be bf16[b,s,64], got bf16[b,s,32]");
        assert!(infer(&call, &[&x], None).unwrap_err().message.contains("no function"));
        assert_eq!(infer(&Op::Return, &[&x, &x], None).unwrap().unwrap(), vec![]);
    }

    #[test]
    fn iota_rope_freqs_and_fused_kernels() {
        use crate::ir::fused::{Head, Step, StepOp};
        let iota = Op::Iota { start: C, len: S, dtype: DType::I64 };
        assert_eq!(ok(iota, &[]), vec![Ty::new(DType::I64, [S])]);
        assert!(bad(Op::Iota { start: n(0), len: n(0), dtype: DType::I32 }, &[]).contains("positive"));
        assert!(bad(Op::Iota { start: n(0), len: n(4), dtype: DType::Bool }, &[]).contains("not bool"));
        let freqs = Op::RopeFreqs { theta: Float::new(1e4), rotary_dim: 64, yarn: None };
        assert_eq!(ok(freqs, &[]), vec![Ty::new(DType::F32, [n(32)])]);
        assert!(bad(Op::RopeFreqs { theta: Float::new(1e4), rotary_dim: 3, yarn: None }, &[]).contains("even"));

        // add(i2, matmul(i0, i1)) then a cast: the result is the last step's type.
        let step = |op, args: &[Operand]| Step { op, args: args.to_vec() };
        let k = FusedKernel {
            head: Some(Head::MatMul),
            steps: vec![
                step(StepOp::Binary(BinaryOp::Add), &[Operand::Input(2), Operand::Head]),
                step(StepOp::Cast(DType::F32), &[Operand::Step(0)]),
            ],
        };
        let (x, w, r) = (bf([B, S, n(8)]), bf([n(6), n(8)]), bf([B, S, n(6)]));
        assert_eq!(Op::Fused(k.clone()).arity(), crate::ir::Arity::Exact(3));
        assert_eq!(ok(Op::Fused(k.clone()), &[&x, &w, &r]), vec![Ty::new(DType::F32, [B, S, n(6)])]);
        assert_eq!(bad(Op::Fused(k), &[&x, &w, &x]), "fused: s0: add: shapes [b,s,8], [b,s,6] do not broadcast (6 vs 8)");
        // Reading a later step, leaving a value unread, or an empty program are errors.
        let fwd = FusedKernel { head: None, steps: vec![step(StepOp::Unary(UnaryOp::Exp), &[Operand::Step(1)])] };
        assert!(bad(Op::Fused(fwd), &[]).contains("s0 reads s1"), "a step reading a later one");
        let dead = FusedKernel {
            head: None,
            steps: vec![step(StepOp::Unary(UnaryOp::Exp), &[Operand::Input(0)]), step(StepOp::Unary(UnaryOp::Neg), &[Operand::Input(0)])],
        };
        assert_eq!(bad(Op::Fused(dead), &[&x]), "fused: s0 is never read");
        assert_eq!(bad(Op::Fused(FusedKernel { head: None, steps: vec![] }), &[]), "fused: an empty kernel");
    }
}
