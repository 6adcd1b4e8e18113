//! `simplify`: algebraic identities and layout no-ops, as a rule table run to a fixed
//! point ([`super::rewrite`]).
//!
//! ```text
//!   %2 = mul(%0, %1=const 1)         ──▶  uses of %2 read %0
//!   %2 = reshape(%1=reshape(%0))     ──▶  %2 = reshape(%0)
//!   %2 = permute(%1=permute(%0, p), q) ──▶ %2 = permute(%0, p∘q), or %0 when that is identity
//! ```
//!
//! Each rule is one function with its identity as a comment, in the table [`RULES`]. A
//! rule matches one node and proposes either forwarding its uses to an existing value or
//! replacing it by a cheaper node of the same type; the rewrite driver checks the type
//! and removes what the rewrite orphaned. "`1`" and "`0`" mean a `const` node: a scalar,
//! so broadcasting against it never changes the other operand's type.
//!
//! Every identity is exact in IEEE arithmetic except that `x+0` and `x-0` may turn a
//! `-0` into `+0`; no model output depends on the sign of a zero sum.

use super::rewrite::{rewrite, Rewrite, Rule};
use super::{Changed, Pass, PassCx, PassError, Problem};
use crate::ir::{BinaryOp, DType, Dim, Graph, Module, NodeId, Op, UnaryOp, Value};
use std::collections::BTreeMap;

/// Applies [`RULES`] to every function until none fires.
pub struct Simplify;

impl Pass for Simplify {
    fn name(&self) -> &'static str {
        "simplify"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let mut fired: BTreeMap<&'static str, usize> = BTreeMap::new();
        for f in &mut m.functions {
            let stats = rewrite(&mut f.graph, RULES).map_err(|e| {
                let message = format!("rule `{}`: {}", e.rule, e.message);
                match e.node {
                    // The node may be gone after a failed rewrite; name the function then.
                    Some(n) if f.graph.contains(n) => PassError::at(&f.name, &f.graph, n, message),
                    _ => PassError { problems: vec![Problem { function: f.name.clone(), node: e.node, span: None, message }] },
                }
            })?;
            for (rule, k) in stats.fired {
                *fired.entry(rule).or_default() += k;
            }
        }
        if fired.is_empty() {
            return Ok(Changed::No);
        }
        let list: Vec<String> = fired.iter().map(|(r, k)| format!("{r} ×{k}")).collect();
        cx.report(self.name(), format!("fired {}", list.join(", ")));
        Ok(Changed::Yes)
    }
}

/// The rules, tried in this order at each node.
pub static RULES: &[Rule] = &[
    Rule { name: "mul_one", apply: mul_one },
    Rule { name: "add_zero", apply: add_zero },
    Rule { name: "sub_zero", apply: sub_zero },
    Rule { name: "div_one", apply: div_one },
    Rule { name: "neg_neg", apply: neg_neg },
    Rule { name: "reshape_reshape", apply: reshape_reshape },
    Rule { name: "reshape_same", apply: reshape_same },
    Rule { name: "permute_permute", apply: permute_permute },
    Rule { name: "permute_identity", apply: permute_identity },
    Rule { name: "cast_same", apply: cast_same },
    Rule { name: "cast_widen_cast", apply: cast_widen_cast },
    Rule { name: "slice_whole_axis", apply: slice_whole_axis },
    Rule { name: "concat_one", apply: concat_one },
];

// ---------------------------------------------------------------- helpers

/// The operands of `n` if it is the binary op `b`.
fn binary(g: &Graph, n: NodeId, b: BinaryOp) -> Option<(Value, Value)> {
    if g.node(n).op != Op::Binary(b) {
        return None;
    }
    let i = g.inputs(n);
    Some((i[0], i[1]))
}

/// Whether `v` is a `const` with value `k` (either sign of zero when `k` is 0).
fn is_const(g: &Graph, v: Value, k: f64) -> bool {
    matches!(g.node(v.node).op, Op::Const { value } if value.get() == k)
}

/// Forward `n` to `v` if that keeps the type (it always does when the other operand is
/// a scalar const; checking keeps the rules right if consts ever get shapes).
fn forward(g: &Graph, n: NodeId, v: Value) -> Option<Rewrite> {
    (g.ty(v) == g.node(n).ty()).then_some(Rewrite::Forward(v))
}

/// The single input of `n` if its op matches `want`.
fn unary_input(g: &Graph, n: NodeId, want: fn(&Op) -> bool) -> Option<Value> {
    want(&g.node(n).op).then(|| g.inputs(n)[0])
}

// ---------------------------------------------------------------- rules

/// x·1 = 1·x = x
fn mul_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let (a, b) = binary(g, n, BinaryOp::Mul)?;
    if is_const(g, b, 1.0) {
        forward(g, n, a)
    } else if is_const(g, a, 1.0) {
        forward(g, n, b)
    } else {
        None
    }
}

/// x+0 = 0+x = x
fn add_zero(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let (a, b) = binary(g, n, BinaryOp::Add)?;
    if is_const(g, b, 0.0) {
        forward(g, n, a)
    } else if is_const(g, a, 0.0) {
        forward(g, n, b)
    } else {
        None
    }
}

/// x−0 = x  (but 0−x = −x, which is not a removal)
fn sub_zero(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let (a, b) = binary(g, n, BinaryOp::Sub)?;
    is_const(g, b, 0.0).then(|| forward(g, n, a)).flatten()
}

/// x/1 = x
fn div_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let (a, b) = binary(g, n, BinaryOp::Div)?;
    is_const(g, b, 1.0).then(|| forward(g, n, a)).flatten()
}

/// −(−x) = x
fn neg_neg(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let is_neg = |op: &Op| *op == Op::Unary(UnaryOp::Neg);
    let inner = unary_input(g, n, is_neg)?;
    let x = unary_input(g, inner.node, is_neg)?;
    forward(g, n, x)
}

/// reshape(reshape(x, s₁), s₂) = reshape(x, s₂): both reinterpret the same row-major
/// elements, and "same element count" is transitive.
fn reshape_reshape(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Reshape { shape } = &g.node(n).op else { return None };
    let inner = g.inputs(n)[0];
    let x = unary_input(g, inner.node, |op| matches!(op, Op::Reshape { .. }))?;
    Some(Rewrite::Replace { op: Op::Reshape { shape: shape.clone() }, inputs: vec![x] })
}

/// reshape(x, shape(x)) = x
fn reshape_same(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Reshape { shape } = &g.node(n).op else { return None };
    let x = g.inputs(n)[0];
    (g.ty(x).shape == *shape).then(|| forward(g, n, x)).flatten()
}

/// permute(permute(x, p), q) = permute(x, r) with r[i] = p[q[i]]: output axis i of the
/// outer permute is axis q[i] of the inner result, which is axis p[q[i]] of x. When r is
/// the identity, `permute_identity` then removes it.
fn permute_permute(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Permute { perm: q } = &g.node(n).op else { return None };
    let inner = g.inputs(n)[0];
    let Op::Permute { perm: p } = &g.node(inner.node).op else { return None };
    let r: Vec<u8> = q.iter().map(|&qi| p[qi as usize]).collect();
    Some(Rewrite::Replace { op: Op::Permute { perm: r }, inputs: g.inputs(inner.node) })
}

/// permute(x, [0, 1, …, n−1]) = x
fn permute_identity(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Permute { perm } = &g.node(n).op else { return None };
    let identity = perm.iter().enumerate().all(|(i, &p)| p as usize == i);
    identity.then(|| forward(g, n, g.inputs(n)[0])).flatten()
}

/// cast(x: T, T) = x
fn cast_same(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Cast { to } = g.node(n).op else { return None };
    let x = g.inputs(n)[0];
    (g.ty(x).dtype == to).then(|| forward(g, n, x)).flatten()
}

/// cast(cast(x: A, B), C) = cast(x, C) when every A value is exactly a B value (a
/// lossless widening): the inner cast then changes no value, only its encoding. With
/// C = A the result is a `cast_same` and goes too: bf16 → f32 → bf16 is x.
fn cast_widen_cast(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Cast { to } = g.node(n).op else { return None };
    let inner = g.inputs(n)[0];
    let Op::Cast { to: mid } = g.node(inner.node).op else { return None };
    let x = g.inputs(inner.node)[0];
    widens_losslessly(g.ty(x).dtype, mid).then(|| Rewrite::Replace { op: Op::Cast { to }, inputs: vec![x] })
}

/// Whether every value of `from` is exactly representable in `to`.
fn widens_losslessly(from: DType, to: DType) -> bool {
    use DType::*;
    match (from, to) {
        _ if from == to => true,
        // 0 and 1 exist in every type.
        (Bool, _) => true,
        // e4m3: 3 mantissa bits, exponents 2⁻⁹..2⁸; f16 has 10 bits and 2⁻²⁴..2¹⁵,
        // bf16 7 bits and f32's exponent range.
        (F8E4M3, F16 | Bf16 | F32) => true,
        (F16 | Bf16, F32) => true,
        (I32, I64) => true,
        _ => false,
    }
}

/// slice(x, axis, 0, len(x, axis)) = x
fn slice_whole_axis(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Slice { axis, start, len } = g.node(n).op else { return None };
    let x = g.inputs(n)[0];
    let whole = start == Dim::lit(0) && g.ty(x).shape.get(axis as usize) == Some(&len);
    whole.then(|| forward(g, n, x)).flatten()
}

/// concat(x) = x
fn concat_one(g: &Graph, n: NodeId) -> Option<Rewrite> {
    let Op::Concat { .. } = g.node(n).op else { return None };
    match g.inputs(n).as_slice() {
        [x] => forward(g, n, *x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Mode, Shape, Ty};
    use crate::passes::test_util::{f32t, module_of, n, text};
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    const B: Dim = Dim::B;
    const S: Dim = Dim::S;

    /// Rules some test has seen fire; `every_rule_is_tested` checks the table against it.
    static SEEN: Mutex<BTreeSet<&str>> = Mutex::new(BTreeSet::new());

    /// Build a graph, check its text, simplify, check the text again, and check that the
    /// rule `rule` fired and a second run changes nothing (a fixed point).
    fn check(rule: &'static str, build: impl FnOnce(&mut Graph), before: &str, after: &str) {
        let mut g = Graph::new();
        build(&mut g);
        assert_eq!(text(&g), before.trim(), "before");
        let mut m = module_of("f", g, Mode::Prefill);
        let mut cx = PassCx::new(Mode::Prefill);
        assert_eq!(Simplify.run(&mut m, &mut cx), Ok(Changed::Yes));
        assert_eq!(crate::ir::verify(&m), Ok(()));
        assert_eq!(text(&m.functions[0].graph), after.trim(), "after");
        assert!(cx.reports[0].text.contains(rule), "{} did not fire: {:?}", rule, cx.reports);
        assert_eq!(Simplify.run(&mut m, &mut PassCx::new(Mode::Prefill)), Ok(Changed::No));
        SEEN.lock().unwrap().insert(rule);
    }

    fn x_in(g: &mut Graph, shape: impl Into<Shape>) -> Value {
        g.input(0, "x", f32t(shape), None).into()
    }
    fn op(g: &mut Graph, op: Op, inputs: &[Value]) -> Value {
        g.add_inferred(op, inputs, None).unwrap().into()
    }
    fn k(g: &mut Graph, v: f64) -> Value {
        g.constant(v, DType::F32, None).into()
    }
    fn ret(g: &mut Graph, v: Value) {
        g.ret(&[v], None);
    }

    #[test]
    fn mul_one() {
        check(
            "mul_one",
            |g| {
                let x = x_in(g, [B, n(4)]);
                let one = k(g, 1.0);
                let a = op(g, Op::Binary(BinaryOp::Mul), &[x, one]);
                let b = op(g, Op::Binary(BinaryOp::Mul), &[one, a]);
                ret(g, b);
            },
            r#"
%0:f32[b,4] = input 0 "x"
%1:f32[] = const 1
%2:f32[b,4] = mul(%0, %1)
%3:f32[b,4] = mul(%1, %2)
return %3"#,
            r#"
%0:f32[b,4] = input 0 "x"
return %0"#,
        );
    }

    #[test]
    fn mul_by_other_constants_stays() {
        let mut g = Graph::new();
        let x = x_in(&mut g, [n(4)]);
        let two = k(&mut g, 2.0);
        let a = op(&mut g, Op::Binary(BinaryOp::Mul), &[x, two]);
        let zero = k(&mut g, 0.0);
        let b = op(&mut g, Op::Binary(BinaryOp::Sub), &[zero, a]); // 0 − x is −x, not x
        ret(&mut g, b);
        let mut m = module_of("f", g, Mode::Prefill);
        assert_eq!(Simplify.run(&mut m, &mut PassCx::new(Mode::Prefill)), Ok(Changed::No));
    }

    #[test]
    fn add_zero() {
        check(
            "add_zero",
            |g| {
                let x = x_in(g, [B, n(4)]);
                let z = k(g, 0.0);
                let a = op(g, Op::Binary(BinaryOp::Add), &[z, x]);
                let e = op(g, Op::Unary(UnaryOp::Exp), &[a]);
                let b = op(g, Op::Binary(BinaryOp::Add), &[e, z]);
                ret(g, b);
            },
            r#"
%0:f32[b,4] = input 0 "x"
%1:f32[] = const 0
%2:f32[b,4] = add(%1, %0)
%3:f32[b,4] = exp(%2)
%4:f32[b,4] = add(%3, %1)
return %4"#,
            r#"
%0:f32[b,4] = input 0 "x"
%1:f32[b,4] = exp(%0)
return %1"#,
        );
    }

    #[test]
    fn sub_zero() {
        check(
            "sub_zero",
            |g| {
                let x = x_in(g, [S]);
                let z = k(g, 0.0);
                let a = op(g, Op::Binary(BinaryOp::Sub), &[x, z]);
                ret(g, a);
            },
            r#"
%0:f32[s] = input 0 "x"
%1:f32[] = const 0
%2:f32[s] = sub(%0, %1)
return %2"#,
            r#"
%0:f32[s] = input 0 "x"
return %0"#,
        );
    }

    #[test]
    fn div_one() {
        check(
            "div_one",
            |g| {
                let x = x_in(g, [n(2), n(3)]);
                let one = k(g, 1.0);
                let a = op(g, Op::Binary(BinaryOp::Div), &[x, one]);
                let b = op(g, Op::Binary(BinaryOp::Div), &[one, a]); // 1/x stays
                ret(g, b);
            },
            r#"
%0:f32[2,3] = input 0 "x"
%1:f32[] = const 1
%2:f32[2,3] = div(%0, %1)
%3:f32[2,3] = div(%1, %2)
return %3"#,
            r#"
%0:f32[2,3] = input 0 "x"
%1:f32[] = const 1
%2:f32[2,3] = div(%1, %0)
return %2"#,
        );
    }

    #[test]
    fn neg_neg() {
        // Three negations leave one.
        check(
            "neg_neg",
            |g| {
                let x = x_in(g, [n(4)]);
                let a = op(g, Op::Unary(UnaryOp::Neg), &[x]);
                let b = op(g, Op::Unary(UnaryOp::Neg), &[a]);
                let c = op(g, Op::Unary(UnaryOp::Neg), &[b]);
                ret(g, c);
            },
            r#"
%0:f32[4] = input 0 "x"
%1:f32[4] = neg(%0)
%2:f32[4] = neg(%1)
%3:f32[4] = neg(%2)
return %3"#,
            r#"
%0:f32[4] = input 0 "x"
%1:f32[4] = neg(%0)
return %1"#,
        );
    }

    #[test]
    fn reshape_reshape() {
        check(
            "reshape_reshape",
            |g| {
                let x = x_in(g, [B, S, n(64)]);
                let a = op(g, Op::Reshape { shape: Shape::from([B, S, n(4), n(16)]) }, &[x]);
                let b = op(g, Op::Reshape { shape: Shape::from([B, S, n(2), n(2), n(16)]) }, &[a]);
                ret(g, b);
            },
            r#"
%0:f32[b,s,64] = input 0 "x"
%1:f32[b,s,4,16] = reshape(%0) shape=[b,s,4,16]
%2:f32[b,s,2,2,16] = reshape(%1) shape=[b,s,2,2,16]
return %2"#,
            r#"
%0:f32[b,s,64] = input 0 "x"
%1:f32[b,s,2,2,16] = reshape(%0) shape=[b,s,2,2,16]
return %1"#,
        );
    }

    #[test]
    fn reshape_same() {
        // Split heads and merge them back: reshape_reshape, then reshape_same.
        check(
            "reshape_same",
            |g| {
                let x = x_in(g, [B, S, n(64)]);
                let a = op(g, Op::Reshape { shape: Shape::from([B, S, n(4), n(16)]) }, &[x]);
                let b = op(g, Op::Reshape { shape: Shape::from([B, S, n(64)]) }, &[a]);
                ret(g, b);
            },
            r#"
%0:f32[b,s,64] = input 0 "x"
%1:f32[b,s,4,16] = reshape(%0) shape=[b,s,4,16]
%2:f32[b,s,64] = reshape(%1) shape=[b,s,64]
return %2"#,
            r#"
%0:f32[b,s,64] = input 0 "x"
return %0"#,
        );
    }

    #[test]
    fn permute_permute() {
        // [b,s,h,d] → [b,h,s,d] → [b,h,d,s]; composed: [0,2,3,1].
        check(
            "permute_permute",
            |g| {
                let x = x_in(g, [B, S, n(4), n(16)]);
                let a = op(g, Op::Permute { perm: vec![0, 2, 1, 3] }, &[x]);
                let b = op(g, Op::Permute { perm: vec![0, 1, 3, 2] }, &[a]);
                ret(g, b);
            },
            r#"
%0:f32[b,s,4,16] = input 0 "x"
%1:f32[b,4,s,16] = permute(%0) perm=[0,2,1,3]
%2:f32[b,4,16,s] = permute(%1) perm=[0,1,3,2]
return %2"#,
            r#"
%0:f32[b,s,4,16] = input 0 "x"
%1:f32[b,4,16,s] = permute(%0) perm=[0,2,3,1]
return %1"#,
        );
    }

    #[test]
    fn permute_identity() {
        // A transpose and its inverse compose to the identity, which goes.
        check(
            "permute_identity",
            |g| {
                let x = x_in(g, [B, S, n(4)]);
                let a = op(g, Op::Permute { perm: vec![1, 2, 0] }, &[x]);
                let b = op(g, Op::Permute { perm: vec![2, 0, 1] }, &[a]);
                ret(g, b);
            },
            r#"
%0:f32[b,s,4] = input 0 "x"
%1:f32[s,4,b] = permute(%0) perm=[1,2,0]
%2:f32[b,s,4] = permute(%1) perm=[2,0,1]
return %2"#,
            r#"
%0:f32[b,s,4] = input 0 "x"
return %0"#,
        );
    }

    #[test]
    fn cast_same() {
        check(
            "cast_same",
            |g| {
                let x = x_in(g, [n(4)]);
                let a = op(g, Op::Cast { to: DType::F32 }, &[x]);
                ret(g, a);
            },
            r#"
%0:f32[4] = input 0 "x"
%1:f32[4] = cast(%0) to=f32
return %1"#,
            r#"
%0:f32[4] = input 0 "x"
return %0"#,
        );
    }

    #[test]
    fn cast_widen_cast() {
        // bf16 → f32 → f16 is bf16 → f16; bf16 → f32 → bf16 is the identity.
        check(
            "cast_widen_cast",
            |g| {
                let x: Value = g.input(0, "x", Ty::new(DType::Bf16, [n(4)]), None).into();
                let w = op(g, Op::Cast { to: DType::F32 }, &[x]);
                let h = op(g, Op::Cast { to: DType::F16 }, &[w]);
                let back = op(g, Op::Cast { to: DType::Bf16 }, &[w]);
                g.ret(&[h, back], None);
            },
            r#"
%0:bf16[4] = input 0 "x"
%1:f32[4] = cast(%0) to=f32
%2:f16[4] = cast(%1) to=f16
%3:bf16[4] = cast(%1) to=bf16
return %2, %3"#,
            r#"
%0:bf16[4] = input 0 "x"
%1:f16[4] = cast(%0) to=f16
return %1, %0"#,
        );
    }

    #[test]
    fn narrowing_casts_stay() {
        // f32 → bf16 → f32 rounds; i32 → f32 → i32 loses integers above 2²⁴.
        for (from, mid) in [(DType::F32, DType::Bf16), (DType::I32, DType::F32), (DType::F16, DType::Bf16)] {
            let mut g = Graph::new();
            let x: Value = g.input(0, "x", Ty::new(from, [n(4)]), None).into();
            let a = op(&mut g, Op::Cast { to: mid }, &[x]);
            let b = op(&mut g, Op::Cast { to: from }, &[a]);
            ret(&mut g, b);
            let mut m = module_of("f", g, Mode::Prefill);
            assert_eq!(Simplify.run(&mut m, &mut PassCx::new(Mode::Prefill)), Ok(Changed::No), "{from} via {mid}");
        }
        assert!(widens_losslessly(DType::Bool, DType::F8E4M3));
        assert!(widens_losslessly(DType::F8E4M3, DType::F16));
        assert!(!widens_losslessly(DType::Bf16, DType::F16));
        assert!(!widens_losslessly(DType::I64, DType::I32));
    }

    #[test]
    fn slice_whole_axis() {
        // The whole symbolic axis goes; a proper part (s-1) stays.
        check(
            "slice_whole_axis",
            |g| {
                let x = x_in(g, [B, S, n(8)]);
                let a = op(g, Op::Slice { axis: 1, start: Dim::lit(0), len: S }, &[x]);
                let b = op(g, Op::Slice { axis: 2, start: Dim::lit(0), len: n(8) }, &[a]);
                let c = op(g, Op::Slice { axis: 1, start: Dim::lit(0), len: S - 1 }, &[b]);
                ret(g, c);
            },
            r#"
%0:f32[b,s,8] = input 0 "x"
%1:f32[b,s,8] = slice(%0) axis=1 start=0 len=s
%2:f32[b,s,8] = slice(%1) axis=2 start=0 len=8
%3:f32[b,s-1,8] = slice(%2) axis=1 start=0 len=s-1
return %3"#,
            r#"
%0:f32[b,s,8] = input 0 "x"
%1:f32[b,s-1,8] = slice(%0) axis=1 start=0 len=s-1
return %1"#,
        );
    }

    #[test]
    fn concat_one() {
        check(
            "concat_one",
            |g| {
                let x = x_in(g, [B, n(8)]);
                let a = op(g, Op::Concat { axis: 1 }, &[x]);
                let b = op(g, Op::Concat { axis: 1 }, &[a, a]);
                ret(g, b);
            },
            r#"
%0:f32[b,8] = input 0 "x"
%1:f32[b,8] = concat(%0) axis=1
%2:f32[b,16] = concat(%1, %1) axis=1
return %2"#,
            r#"
%0:f32[b,8] = input 0 "x"
%1:f32[b,16] = concat(%0, %0) axis=1
return %1"#,
        );
    }

    #[test]
    fn every_rule_is_tested() {
        // The tests above run in any order; run them here too so SEEN is complete.
        mul_one();
        add_zero();
        sub_zero();
        div_one();
        neg_neg();
        reshape_reshape();
        reshape_same();
        permute_permute();
        permute_identity();
        cast_same();
        cast_widen_cast();
        slice_whole_axis();
        concat_one();
        let seen = SEEN.lock().unwrap();
        let untested: Vec<&str> = RULES.iter().map(|r| r.name).filter(|r| !seen.contains(r)).collect();
        assert!(untested.is_empty(), "rules without a test: {untested:?}");
    }

    #[test]
    fn spans_survive_replacement() {
        use dsc_dsl::span::{FileId, Span};
        let span = Some(Span::new(FileId(0), 3, 9));
        let mut g = Graph::new();
        let x = x_in(&mut g, [B, n(64)]);
        let a = op(&mut g, Op::Reshape { shape: Shape::from([B, n(4), n(16)]) }, &[x]);
        let b = g.add_inferred(Op::Reshape { shape: Shape::from([B, n(2), n(32)]) }, &[a], span).unwrap();
        g.ret(&[b.into()], None);
        let mut m = module_of("f", g, Mode::Prefill);
        Simplify.run(&mut m, &mut PassCx::new(Mode::Prefill)).unwrap();
        assert!(text(&m.functions[0].graph).contains("= reshape(%0) shape=[b,2,32] @3..9"));
    }
}
