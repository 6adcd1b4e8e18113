//! `fuse_rope`: a rotary embedding written in primitives becomes one `rope` again.
//!
//! ```text
//!   %p   = reshape(cast(%pos, f32), [b,s,1])          the tables (may be shared by q and k)
//!   %ang = mul(%p, rope_freqs() theta rotary_dim yarn)
//!   %cos = [reshape|cast](mul(cos(%ang), m))          m: YaRN's cos/sin factor, absent if 1
//!   %sin = [reshape|cast](mul(sin(%ang), m))
//!
//!   half_split:   %x1 = slice(%x, -1, 0, d/2)          interleaved:  %xp = reshape(%x[..rd], [.., rd/2, 2])
//!                 %x2 = slice(%x, -1, d/2, d/2)                      %x1, %x2 = slice(%xp, -1, 0|1, 1)
//!   %o1 = sub(mul(%x1, %cos), mul(%x2, %sin))
//!   %o2 = add(mul(%x2, %cos), mul(%x1, %sin))
//!   %y  = concat(%o1, %o2[, %x[rd..]])                 %y = reshape(concat(%o1, %o2, -1), [.., rd])[ ++ %x[rd..]]
//!                                          ──▶   %y = rope(%x, %pos) layout theta rotary_dim yarn
//! ```
//!
//! The settings come off the `rope_freqs` node; the factor `m` must be YaRN's
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` for those settings (1 without
//! YaRN), and the positions must be an integer value cast to `f32`. Products match in
//! either operand order. This is the shape `decompose` writes, so decompose-then-fuse
//! gives the lowered graph back. The rotation's own nodes (slices, products, the concat)
//! must have no users outside the pattern; the tables may (queries and keys share them).

use super::decompose::mscale;
use super::fuse_swiglu::run_rules;
use super::pattern::{binary, constant, def, either, of, replace_if_typed, single_user, sole_user};
use super::rewrite::{Rewrite, Rule};
use super::{Changed, Pass, PassCx, PassError, Phase};
use crate::ir::{BinaryOp, DType, Dim, Graph, Module, NodeId, Op, RopeLayout, UnaryOp, Value};

/// Re-forms `rope` from its primitives.
pub struct FuseRope;

impl Pass for FuseRope {
    fn name(&self) -> &'static str {
        "fuse_rope"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn phase(&self) -> Option<Phase> {
        Some(Phase::Fused)
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        run_rules(self.name(), m, cx, RULES, "rope")
    }
}

/// The rule table: one rule per layout.
pub static RULES: &[Rule] = &[Rule { name: "rope_half_split", apply: half_split }, Rule { name: "rope_interleaved", apply: interleaved }];

/// What a rotation matched: the rotated pairs' source, the tables' positions and the
/// `rope_freqs` op.
struct Rotation {
    x1: Value,
    x2: Value,
    pos: Value,
    freqs: Op,
}

/// `concat(o1, o2[, pass])` along the last axis, the pass-through a slice of the same `x`.
fn half_split(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let ins = g.inputs(n);
    let x_rank = g.node(n).outputs.first()?.rank();
    if !(3..=4).contains(&x_rank) {
        return None;
    }
    if g.node(n).op != (Op::Concat { axis: x_rank as u8 - 1 }) || !(2..=3).contains(&ins.len()) {
        return None;
    }
    let rot = rotation(g, ins[0], ins[1])?;
    let (x, s1) = slice_of(g, rot.x1)?;
    let (x2src, s2) = slice_of(g, rot.x2)?;
    let half = s1.2;
    let ax = x_rank - 1;
    if x2src != x || s1 != (ax, Dim::lit(0), half) || s2 != (ax, half, half) {
        return None;
    }
    let rd = half * 2;
    if let Some(&p) = ins.get(2) {
        let (psrc, sp) = slice_of(g, p)?;
        if psrc != x || sp.0 != ax || sp.1 != rd || !single_user(g, p) {
            return None;
        }
    }
    finish(g, n, x, RopeLayout::HalfSplit, rd, rot)
}

/// `reshape(concat(o1, o2, pair axis), [.., rd])`, optionally followed by a concat with
/// the pass-through dims.
fn interleaved(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let rank = g.node(n).outputs.first()?.rank();
    if !(3..=4).contains(&rank) {
        return None;
    }
    let ax = rank - 1;
    let (rotated, pass) = match &g.node(n).op {
        // A partial rotation is matched at its outer concat, not at this inner reshape.
        Op::Reshape { .. } if passed_through(g, n, ax) => return None,
        Op::Reshape { .. } => (n.out(0), None),
        Op::Concat { axis } if *axis as usize == ax => match g.inputs(n)[..] {
            [o, p] if single_user(g, o) => (o, Some(p)),
            _ => return None,
        },
        _ => return None,
    };
    let pairs = of(g, rotated, |o| matches!(o, Op::Reshape { .. }))?[0];
    let pi = of(g, pairs, |o| *o == Op::Concat { axis: rank as u8 })?;
    if pi.len() != 2 || !single_user(g, pairs) {
        return None;
    }
    let rot = rotation(g, pi[0], pi[1])?;
    let (xp, s1) = slice_of(g, rot.x1)?;
    let (xp2, s2) = slice_of(g, rot.x2)?;
    if xp2 != xp || s1 != (rank, Dim::lit(0), Dim::lit(1)) || s2 != (rank, Dim::lit(1), Dim::lit(1)) {
        return None;
    }
    let xr = of(g, xp, |o| matches!(o, Op::Reshape { .. }))?[0];
    let rd = g.ty(xr).shape.last()?;
    // `xr` is `x` itself, or its first `rd` dims when the rest pass through.
    let x = match pass {
        None => xr,
        Some(p) => {
            let (x, sr) = slice_of(g, xr)?;
            let (psrc, sp) = slice_of(g, p)?;
            if psrc != x || sr != (ax, Dim::lit(0), rd) || sp.0 != ax || sp.1 != rd || !single_user(g, p) {
                return None;
            }
            x
        }
    };
    finish(g, n, x, RopeLayout::Interleaved, rd, rot)
}

/// Whether `n`'s one user is `concat(n, x[rd..])` along `ax`: the outer node of a partial
/// interleaved rotation.
fn passed_through(g: &Graph, n: NodeId, ax: usize) -> bool {
    let Some(u) = sole_user(g, n) else { return false };
    let ins = g.inputs(u);
    g.node(u).op == (Op::Concat { axis: ax as u8 })
        && ins.len() == 2
        && ins[0] == n.out(0)
        && matches!(g.node(ins[1].node).op, Op::Slice { .. })
}

/// The rope op for the match, if the tables' settings agree with what was rotated.
fn finish(g: &Graph, n: NodeId, x: Value, layout: RopeLayout, rd: Dim, rot: Rotation) -> Option<Rewrite> {
    let Op::RopeFreqs { theta, rotary_dim, yarn } = rot.freqs else { return None };
    if !rd.is(rotary_dim as i64) {
        return None;
    }
    replace_if_typed(g, n, Op::Rope { layout, theta, rotary_dim, yarn }, vec![x, rot.pos])
}

/// `o1 = x1·cos − x2·sin`, `o2 = x2·cos + x1·sin`, products in either order.
fn rotation(g: &Graph, o1: Value, o2: Value) -> Option<Rotation> {
    if !single_user(g, o1) || !single_user(g, o2) {
        return None;
    }
    let (a, b) = binary(g, o1, BinaryOp::Sub)?;
    let (x1, cos) = product(g, a)?;
    let (x2, sin) = product_with(g, b, |v| v != cos)?;
    let (c, d) = binary(g, o2, BinaryOp::Add)?;
    either(c, d, |p, q| {
        let (x2b, cosb) = product(g, p)?;
        let (x1b, sinb) = product(g, q)?;
        (x2b == x2 && cosb == cos && x1b == x1 && sinb == sin).then_some(())
    })?;
    let (pos, freqs) = tables(g, cos, sin)?;
    Some(Rotation { x1, x2, pos, freqs })
}

/// The factors of a single-user `mul` as `(x, table)`: the table is the factor that
/// traces back to `cos`/`sin` of an angle.
fn product(g: &Graph, v: Value) -> Option<(Value, Value)> {
    product_with(g, v, |_| true)
}

fn product_with(g: &Graph, v: Value, ok: impl Fn(Value) -> bool) -> Option<(Value, Value)> {
    if !single_user(g, v) {
        return None;
    }
    let (a, b) = binary(g, v, BinaryOp::Mul)?;
    either(a, b, |x, t| (table_source(g, t).is_some() && ok(t)).then_some((x, t)))
}

/// The `cos`/`sin` node a table value comes from, through optional reshape, cast and the
/// YaRN factor.
fn table_source(g: &Graph, mut v: Value) -> Option<(UnaryOp, Value, f64)> {
    while let (Op::Reshape { .. } | Op::Cast { .. }, ins) = def(g, v) {
        v = ins[0];
    }
    let mut factor = 1.0;
    if let Some((a, b)) = binary(g, v, BinaryOp::Mul) {
        let (t, k) = either(a, b, |t, k| constant(g, k).map(|k| (t, k)))?;
        factor = k;
        v = t;
    }
    match def(g, v) {
        (Op::Unary(u @ (UnaryOp::Cos | UnaryOp::Sin)), ins) => Some((*u, ins[0], factor)),
        _ => None,
    }
}

/// The positions and `rope_freqs` op behind the `cos` and `sin` tables: both of one angle
/// `mul(reshape(cast(pos)), rope_freqs())`, scaled by YaRN's factor for those settings.
fn tables(g: &Graph, cos: Value, sin: Value) -> Option<(Value, Op)> {
    let (cu, ca, cf) = table_source(g, cos)?;
    let (su, sa, sf) = table_source(g, sin)?;
    if cu != UnaryOp::Cos || su != UnaryOp::Sin || ca != sa || cf != sf {
        return None;
    }
    let (a, b) = binary(g, ca, BinaryOp::Mul)?;
    let (p, freqs) = either(a, b, |p, f| {
        let op = g.node(f.node).op.clone();
        matches!(op, Op::RopeFreqs { .. }).then_some((p, op))
    })?;
    let p = of(g, p, |o| matches!(o, Op::Reshape { .. }))?[0];
    let pos = of(g, p, |o| *o == Op::Cast { to: DType::F32 })?[0];
    if !g.ty(pos).dtype.is_int() {
        return None;
    }
    let Op::RopeFreqs { yarn, .. } = &freqs else { return None };
    let want = yarn.as_ref().map_or(1.0, mscale);
    // The factor was written as an f64 constant from the same formula.
    (cf == want).then_some((pos, freqs))
}

/// A slice's source and `(axis, start, len)`.
fn slice_of(g: &Graph, v: Value) -> Option<(Value, (usize, Dim, Dim))> {
    match def(g, v) {
        (Op::Slice { axis, start, len }, ins) => Some((ins[0], (*axis as usize, *start, *len))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Float, Ty, Yarn};
    use crate::passes::decompose::decompose_graph;
    use crate::passes::rewrite::rewrite;
    use crate::passes::test_util::{f32t, n, text};
    use std::collections::BTreeMap;

    /// Every layout, partial and full rotation, rank 3 and 4, with and without YaRN:
    /// decompose then fuse gives the same graph text back.
    #[test]
    fn decompose_then_fuse_round_trips() {
        let yarn = Yarn {
            factor: Float::new(8.0),
            original_context: 32,
            beta_fast: Float::new(32.0),
            beta_slow: Float::new(1.0),
            mscale: Float::new(1.0),
            mscale_all_dim: Float::new(0.707),
        };
        for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
            for (rd, rank4, y) in [(8, false, None), (6, true, Some(yarn)), (8, true, Some(yarn)), (4, false, None)] {
                let mut g = Graph::new();
                let shape = if rank4 { vec![Dim::B, Dim::S, n(2), n(8)] } else { vec![Dim::B, Dim::S, n(8)] };
                let x = g.input(0, "x", f32t(shape), None);
                let pos = g.input(1, "pos", Ty::new(DType::I64, [Dim::B, Dim::S]), None);
                let op = Op::Rope { layout, theta: Float::new(1e4), rotary_dim: rd, yarn: y };
                let q = g.add_inferred(op.clone(), &[x.into(), pos.into()], None).unwrap();
                let k = g.add_inferred(op, &[q.into(), pos.into()], None).unwrap();
                g.ret(&[k.into()], None);
                let before = text(&g);
                decompose_graph(&mut g, &mut BTreeMap::new()).unwrap();
                assert!(!text(&g).contains("rope("), "{}", text(&g));
                let stats = rewrite(&mut g, RULES).unwrap();
                assert_eq!(stats.total(), 2, "{layout:?} rd={rd}:\n{}", text(&g));
                assert_eq!(text(&g), before);
            }
        }
    }
}
