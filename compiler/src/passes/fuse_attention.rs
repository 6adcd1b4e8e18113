//! `fuse_attention`: scaled dot-product attention written in primitives becomes one
//! `attention` again, and a constant factor on the queries or keys moves into its scale.
//!
//! ```text
//!   %qh = permute(%q, [0,2,1,3])                      [b,H,sq,dk]
//!   %ke = reshape(broadcast(reshape(%k, [b,sk,KV,1,dk]), [b,sk,KV,G,dk]), [b,sk,H,dk])   (G = H/KV > 1)
//!   %kh = permute(%ke, [0,2,3,1])                     [b,H,dk,sk]
//!   %s  = batch_matmul(%qh, %kh)
//!   %s  = mul(%s, scale)                               optional: scale 1 without it
//!   %s  = add(%s, reshape(%mask, [b,1,sq,sk]))         optional: masked
//!   %s  = select(lt(reshape(iota(sk-sq, sq), [sq,1]), iota(0, sk)), -inf, %s)   optional: causal
//!   %p  = softmax(%s, axis=3)
//!   %o  = batch_matmul(%p, permute(%ve, [0,2,1,3]))    (%ve: %v, expanded as %k)
//!   %y  = permute(%o, [0,2,1,3])       ──▶   %y = attention(%q, %k, %v[, %mask]) heads kv_heads scale
//!
//!   %y = attention(mul(%q, c), %k, %v) scale=a   ──▶   %y = attention(%q, %k, %v) scale=a·c
//! ```
//!
//! The first rule is the shape `decompose` writes, so decompose-then-fuse gives the
//! lowered graph back; the score chain's nodes must have no other users. The second folds
//! the scale multiply into the softmax input, where the kernel applies it to the scores
//! for free (`softmax(q·kᵀ·a·c)` is `softmax((c·q)·kᵀ·a)`): a model that pre-scales its
//! queries (or a rewrite that leaves a constant factor on them) loses one pass over `q`.
//! It changes the rounding of the product, not its value.

use super::fuse_swiglu::run_rules;
use super::pattern::{binary, constant, def, either, of, replace_if_typed, single_user};
use super::rewrite::{Rewrite, Rule};
use super::{Changed, Pass, PassCx, PassError, Phase};
use crate::ir::{BinaryOp, Dim, Graph, Module, NodeId, Op, Value};

/// Re-forms `attention` from its primitives and folds constant factors into its scale.
pub struct FuseAttention;

impl Pass for FuseAttention {
    fn name(&self) -> &'static str {
        "fuse_attention"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn phase(&self) -> Option<Phase> {
        Some(Phase::Fused)
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        run_rules(self.name(), m, cx, RULES, "attention rewrite(s)")
    }
}

/// The rule table.
pub static RULES: &[Rule] = &[Rule { name: "attention", apply: attention }, Rule { name: "attention_scale", apply: fold_scale }];

const HEADS_FIRST: [u8; 4] = [0, 2, 1, 3];

/// The primitive form (first picture) at its final permute.
fn attention(g: &Graph, n: NodeId) -> Option<Rewrite> {
    if g.node(n).op != (Op::Permute { perm: HEADS_FIRST.to_vec() }) {
        return None;
    }
    let o = g.inputs(n)[0];
    let [p, vh] = of(g, o, |op| *op == Op::BatchMatMul)?[..] else { return None };
    let s = of(g, p, |op| *op == Op::Softmax { axis: 3 })?[0];
    let ve = permuted(g, vh, &HEADS_FIRST)?;
    if ![o, p, vh].iter().all(|&v| single_user(g, v)) {
        return None;
    }

    // The score chain, outermost first: causal select, mask add, scale mul, q·kᵀ.
    let (s, causal) = match causal_select(g, s) {
        Some(inner) => (inner, true),
        None => (s, false),
    };
    let (s, mask) = match binary(g, s, BinaryOp::Add).filter(|_| single_user(g, s)) {
        Some((a, b)) => {
            let (sc, m) = either(a, b, |sc, m| {
                let mi = of(g, m, |op| matches!(op, Op::Reshape { .. }))?[0];
                (g.ty(mi).rank() == 3 && !matches!(g.node(sc.node).op, Op::Reshape { .. })).then_some((sc, mi))
            })?;
            (sc, Some(m))
        }
        None => (s, None),
    };
    let (s, scale) = match binary(g, s, BinaryOp::Mul).filter(|_| single_user(g, s)) {
        Some((a, b)) => either(a, b, |sc, k| constant(g, k).map(|k| (sc, k)))?,
        None => (s, 1.0),
    };
    let [qh, kh] = of(g, s, |op| *op == Op::BatchMatMul)?[..] else { return None };
    if !single_user(g, s) || !single_user(g, qh) || !single_user(g, kh) {
        return None;
    }
    let q = permuted(g, qh, &HEADS_FIRST)?;
    let ke = permuted(g, kh, &[0, 2, 3, 1])?;
    let heads = g.ty(q).shape.get(2)?.as_const()?;
    let (k, kv_heads) = unexpand(g, ke, heads)?;
    let (v, v_heads) = unexpand(g, ve, heads)?;
    if v_heads != kv_heads {
        return None;
    }
    if causal && !causal_bounds(g, p, g.ty(q).shape[1], g.ty(k).shape[1]) {
        return None;
    }
    let att =
        Op::Attention { heads: heads as u32, kv_heads: kv_heads as u32, scale: scale.into(), causal, masked: mask.is_some(), lse: false };
    let mut inputs = vec![q, k, v];
    inputs.extend(mask);
    replace_if_typed(g, n, att, inputs)
}

/// `permute(x, perm)`'s input when `v` is exactly that permute.
fn permuted(g: &Graph, v: Value, perm: &[u8]) -> Option<Value> {
    of(g, v, |op| matches!(op, Op::Permute { perm: p } if p == perm)).map(|i| i[0])
}

/// The kv value and its head count behind `[b,sk,H,d]`: `x` itself with `heads` heads, or
/// the `[b,sk,KV,d]` value that `reshape(broadcast(reshape(x)))` spread over `H/KV` query
/// heads each.
fn unexpand(g: &Graph, v: Value, heads: i64) -> Option<(Value, i64)> {
    let spread = (|| {
        let b = of(g, v, |op| matches!(op, Op::Reshape { .. }))?[0];
        let one = of(g, b, |op| matches!(op, Op::Broadcast { .. }))?[0];
        let x = of(g, one, |op| matches!(op, Op::Reshape { .. }))?[0];
        let kv = g.ty(x).shape.get(2)?.as_const()?;
        (g.ty(x).rank() == 4 && g.ty(one).shape.get(3)?.is(1) && single_user(g, b) && single_user(g, one)).then_some((x, kv))
    })();
    Some(spread.unwrap_or((v, heads)))
}

/// The scores under `select(hidden, -inf, scores)`, when `s` is that select.
fn causal_select(g: &Graph, s: Value) -> Option<Value> {
    let ins = of(g, s, |op| *op == Op::Select)?;
    (constant(g, ins[1]) == Some(f64::NEG_INFINITY) && single_user(g, s)).then_some(ins[2])
}

/// Whether the causal select feeding softmax `p` hides key `j` from query `i` exactly
/// when `sk - sq + i < j`: `lt(reshape(iota(sk-sq, sq), [sq,1]), iota(0, sk))`.
fn causal_bounds(g: &Graph, p: Value, sq: Dim, sk: Dim) -> bool {
    (|| {
        let s = g.inputs(p.node)[0];
        let hidden = g.inputs(s.node)[0];
        let (qi, kj) = binary(g, hidden, BinaryOp::Lt)?;
        let qi = of(g, qi, |op| matches!(op, Op::Reshape { .. }))?[0];
        let iq = matches!(def(g, qi).0, Op::Iota { start, len, .. } if *start == sk - sq && *len == sq);
        let ik = matches!(def(g, kj).0, Op::Iota { start, len, .. } if start.is(0) && *len == sk);
        (iq && ik).then_some(())
    })()
    .is_some()
}

/// `attention(mul(q, c), k, v)` → `attention(q, k, v)` with the scale times `c` (and the
/// same for a factor on `k`).
fn fold_scale(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Attention { heads, kv_heads, scale, causal, masked, lse: false } = g.node(n).op else { return None };
    let ins = g.inputs(n);
    for slot in 0..2 {
        let Some((a, b)) = binary(g, ins[slot], BinaryOp::Mul) else { continue };
        let Some((x, c)) = either(a, b, |x, k| constant(g, k).map(|k| (x, k))) else { continue };
        if !single_user(g, ins[slot]) {
            continue;
        }
        let mut inputs = ins.clone();
        inputs[slot] = x;
        let op = Op::Attention { heads, kv_heads, scale: (scale.get() * c).into(), causal, masked, lse: false };
        if let Some(rw) = replace_if_typed(g, n, op, inputs) {
            return Some(rw);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Float, Ty};
    use crate::passes::decompose::decompose_graph;
    use crate::passes::rewrite::rewrite;
    use crate::passes::test_util::{f32t, n, text};
    use std::collections::BTreeMap;

    #[test]
    fn decompose_then_fuse_round_trips() {
        for (heads, kv, causal, masked) in [(4, 4, true, false), (6, 2, true, true), (4, 1, false, true), (3, 3, false, false)] {
            let mut g = Graph::new();
            let q = g.input(0, "q", f32t([Dim::B, Dim::S, n(heads), n(8)]), None);
            let k = g.input(1, "k", f32t([Dim::B, Dim::C + Dim::S, n(kv), n(8)]), None);
            let v = g.input(2, "v", f32t([Dim::B, Dim::C + Dim::S, n(kv), n(5)]), None);
            let mut ins = vec![q.into(), k.into(), v.into()];
            if masked {
                ins.push(g.input(3, "mask", f32t([Dim::B, Dim::S, Dim::C + Dim::S]), None).into());
            }
            let att = Op::Attention { heads: heads as u32, kv_heads: kv as u32, scale: Float::new(0.25), causal, masked, lse: false };
            let y = g.add_inferred(att, &ins, None).unwrap();
            g.ret(&[y.into()], None);
            let before = text(&g);
            decompose_graph(&mut g, &mut BTreeMap::new()).unwrap();
            assert!(text(&g).contains("softmax("), "{}", text(&g));
            assert_eq!(rewrite(&mut g, RULES).unwrap().total(), 1, "{}", text(&g));
            assert_eq!(text(&g), before);
        }
    }

    #[test]
    fn a_constant_factor_on_q_moves_into_the_scale() {
        let mut g = Graph::new();
        let q = g.input(0, "q", f32t([Dim::B, Dim::S, n(2), n(4)]), None);
        let k = g.input(1, "k", f32t([Dim::B, Dim::S, n(2), n(4)]), None);
        let c = g.constant(0.5, DType::F32, None);
        let qs = g.add_inferred(Op::Binary(BinaryOp::Mul), &[c.into(), q.into()], None).unwrap();
        let att = Op::Attention { heads: 2, kv_heads: 2, scale: Float::new(0.25), causal: true, masked: false, lse: false };
        let y = g.add_inferred(att, &[qs.into(), k.into(), k.into()], None).unwrap();
        g.ret(&[y.into()], None);
        assert_eq!(rewrite(&mut g, RULES).unwrap().total(), 1);
        let t = text(&g);
        assert!(t.contains("attention(%0, %1, %1) heads=2 kv_heads=2 scale=0.125 causal"), "{t}");
        assert!(!t.contains("mul(") && !t.contains("const"), "{t}");
        let _ = Ty::scalar(DType::F32);
    }
}
