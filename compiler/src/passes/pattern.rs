//! Matching helpers shared by the fusion passes that recognise a decomposed composite
//! (`fuse_swiglu`, `fuse_rope`, `fuse_attention`): read a value's producer, match the two
//! operands of a commutative op in either order, recognise scalar constants, and propose
//! a replacement only when its shape rule gives the matched root's exact types.
//!
//! Those passes are rule tables run by [`super::rewrite`]: a rule matches at the root of
//! the pattern (the node whose value the composite would produce) and proposes
//! `Replace { composite, inputs }`, where the inputs are values the pattern already reads
//! (`x`, the weights, `positions`). The driver removes the root and every node the
//! replacement orphans, so the rest of the pattern goes with it; parts still used
//! elsewhere (RoPE tables shared by queries and keys) stay until their last user goes.

use super::rewrite::Rewrite;
use crate::ir::{infer, BinaryOp, Graph, NodeId, Op, Ty, Value};

/// The op and inputs of the node producing `v`.
pub fn def(g: &Graph, v: Value) -> (&Op, Vec<Value>) {
    (&g.node(v.node).op, g.inputs(v.node))
}

/// The inputs of `v`'s producer when its op satisfies `want`.
pub fn of(g: &Graph, v: Value, want: impl Fn(&Op) -> bool) -> Option<Vec<Value>> {
    let (op, ins) = def(g, v);
    want(op).then_some(ins)
}

/// The two operands of `v`'s producer when it is the binary op `b`.
pub fn binary(g: &Graph, v: Value, b: BinaryOp) -> Option<(Value, Value)> {
    let ins = of(g, v, |o| *o == Op::Binary(b))?;
    Some((ins[0], ins[1]))
}

/// `f(a, b)` or else `f(b, a)`: matching a commutative op's operands in either order.
pub fn either<T>(a: Value, b: Value, f: impl Fn(Value, Value) -> Option<T>) -> Option<T> {
    f(a, b).or_else(|| f(b, a))
}

/// The value of a scalar `const`.
pub fn constant(g: &Graph, v: Value) -> Option<f64> {
    match g.node(v.node).op {
        Op::Const { value } => Some(value.get()),
        _ => None,
    }
}

/// Whether every use of `v`'s node is one node's (possibly in several slots): an
/// intermediate a fused op may swallow without computing it twice.
pub fn single_user(g: &Graph, v: Value) -> bool {
    let users = g.users(v.node);
    users.first().is_some_and(|first| users.iter().all(|u| u.0 == first.0))
}

/// The one node using `n`, if there is exactly one.
pub fn sole_user(g: &Graph, n: NodeId) -> Option<NodeId> {
    let users = g.users(n);
    let first = users.first()?.0;
    users.iter().all(|u| u.0 == first).then_some(first)
}

/// `Replace { op, inputs }` for node `n` if `op`'s shape rule over `inputs` gives `n`'s
/// types, else no match (so a near miss is skipped, never a failed rewrite).
pub fn replace_if_typed(g: &Graph, n: NodeId, op: Op, inputs: Vec<Value>) -> Option<Rewrite> {
    let tys: Vec<&Ty> = inputs.iter().map(|&v| g.ty(v)).collect();
    match infer(&op, &tys, None) {
        Ok(Some(t)) if t == g.node(n).outputs => Some(Rewrite::Replace { op, inputs }),
        _ => None,
    }
}
