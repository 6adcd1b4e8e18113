//! `cse`: common-subexpression elimination, per function.
//!
//! ```text
//!   %1 = exp(%0)                 %1 = exp(%0)
//!   %2 = exp(%0)          ──▶    %3 = add(%1, %1)
//!   %3 = add(%1, %2)
//! ```
//!
//! Two nodes compute the same values when they have the same [`Op`] (settings included;
//! `Op` is `Eq + Hash`, floats compared by bit pattern), the same inputs and the same
//! output types. Visiting nodes in topological order and rewriting as we go makes inputs
//! canonical before their users are hashed, so one sweep finds every duplicate, chains
//! included (`exp(exp(x))` twice collapses to one). The first node in topological order
//! is kept, with its span.
//!
//! - For commutative ops (`add`, `mul`, `max`, `min`, `eq`) the inputs are hashed in
//!   sorted order, so `a+b` and `b+a` merge; the result type is the same either way
//!   (broadcasting is symmetric).
//! - Leaves merge too: equal `const`s, and `param`s with the same name (one weight).
//! - `input`s never merge: each is a distinct argument of the signature. `return` is
//!   unique anyway.
//! - Calls merge: the IR is pure and a call's `layer` is part of its op, so two calls of
//!   the same function, layer and arguments return the same values.

use super::{Changed, Pass, PassCx, PassError};
use crate::ir::{BinaryOp, Graph, Module, NodeId, Op, Ty, Value};
use std::collections::HashMap;

/// Merges nodes that compute the same values.
pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let mut merged = 0;
        for f in &mut m.functions {
            merged += cse_graph(&mut f.graph, &f.name)?;
        }
        if merged > 0 {
            cx.report(self.name(), format!("merged {merged} node(s)"));
        }
        Ok((merged > 0).into())
    }
}

/// What makes two nodes interchangeable.
#[derive(PartialEq, Eq, Hash)]
struct Key {
    op: Op,
    inputs: Vec<Value>,
    outputs: Vec<Ty>,
}

fn is_commutative(op: &Op) -> bool {
    matches!(op, Op::Binary(BinaryOp::Add | BinaryOp::Mul | BinaryOp::Max | BinaryOp::Min | BinaryOp::Eq))
}

/// Merge duplicates in one graph; returns how many nodes were removed.
pub fn cse_graph(g: &mut Graph, name: &str) -> Result<usize, PassError> {
    let order = g.topo_order().map_err(|c| PassError::at(name, g, c.0[0], "the graph has a cycle"))?;
    let mut seen: HashMap<Key, NodeId> = HashMap::new();
    let mut merged = 0;
    for n in order {
        let node = g.node(n);
        if matches!(node.op, Op::Input { .. } | Op::Return) {
            continue;
        }
        let mut inputs = g.inputs(n);
        if is_commutative(&node.op) {
            inputs.sort_unstable();
        }
        let key = Key { op: node.op.clone(), inputs, outputs: node.outputs.clone() };
        match seen.get(&key) {
            Some(&first) => {
                g.replace_all_uses(n, first);
                g.remove(n);
                merged += 1;
            }
            None => {
                seen.insert(key, n);
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Dim, Mode, UnaryOp};
    use crate::passes::test_util::{f32t, module_of, n, text};

    fn run(g: Graph) -> (String, Changed) {
        let mut m = module_of("f", g, Mode::Prefill);
        let changed = Cse.run(&mut m, &mut PassCx::new(Mode::Prefill)).unwrap();
        assert_eq!(crate::ir::verify(&m), Ok(()));
        (text(&m.functions[0].graph), changed)
    }

    fn unary(g: &mut Graph, u: UnaryOp, x: NodeId) -> NodeId {
        g.add_inferred(Op::Unary(u), &[x.into()], None).unwrap()
    }

    fn binary(g: &mut Graph, b: BinaryOp, x: NodeId, y: NodeId) -> NodeId {
        g.add_inferred(Op::Binary(b), &[x.into(), y.into()], None).unwrap()
    }

    #[test]
    fn merges_chains_in_one_sweep_and_reaches_a_fixed_point() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
        let a1 = unary(&mut g, UnaryOp::Exp, x);
        let b1 = unary(&mut g, UnaryOp::Tanh, a1);
        let a2 = unary(&mut g, UnaryOp::Exp, x);
        let b2 = unary(&mut g, UnaryOp::Tanh, a2);
        let s = binary(&mut g, BinaryOp::Sub, b1, b2);
        g.ret(&[s.into()], None);
        let (t, changed) = run(g.clone());
        assert_eq!(changed, Changed::Yes);
        assert_eq!(t, "%0:f32[b,4] = input 0 \"x\"\n%1:f32[b,4] = exp(%0)\n%2:f32[b,4] = tanh(%1)\n%3:f32[b,4] = sub(%2, %2)\nreturn %3");
        let mut m = module_of("f", g, Mode::Prefill);
        Cse.run(&mut m, &mut PassCx::new(Mode::Prefill)).unwrap();
        assert_eq!(Cse.run(&mut m, &mut PassCx::new(Mode::Prefill)), Ok(Changed::No));
    }

    #[test]
    fn commutative_ops_merge_in_either_order_but_sub_does_not() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let y = g.input(1, "y", f32t([n(4)]), None);
        let a = binary(&mut g, BinaryOp::Add, x, y);
        let b = binary(&mut g, BinaryOp::Add, y, x);
        let c = binary(&mut g, BinaryOp::Sub, x, y);
        let d = binary(&mut g, BinaryOp::Sub, y, x);
        g.ret(&[a.into(), b.into(), c.into(), d.into()], None);
        let (t, _) = run(g);
        assert_eq!(t.matches("add(").count(), 1, "{t}");
        assert_eq!(t.matches("sub(").count(), 2, "{t}");
        assert!(t.ends_with("return %2, %2, %3, %4"), "{t}");
    }

    #[test]
    fn leaves_merge_but_inputs_do_not() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let x2 = g.input(1, "x2", f32t([n(4)]), None);
        let k1 = g.constant(0.5, DType::F32, None);
        let k2 = g.constant(0.5, DType::F32, None);
        let k3 = g.constant(0.25, DType::F32, None);
        let k4 = g.constant(0.5, DType::Bf16, None);
        let p1 = g.param("w", f32t([n(4)]), None);
        let p2 = g.param("w", f32t([n(4)]), None);
        let m1 = binary(&mut g, BinaryOp::Mul, x, k1);
        let m2 = binary(&mut g, BinaryOp::Mul, x2, k2);
        let m3 = binary(&mut g, BinaryOp::Mul, x, k3);
        let m4 = binary(&mut g, BinaryOp::Mul, p1, p2);
        g.ret(&[m1.into(), m2.into(), m3.into(), m4.into(), k4.into()], None);
        let (t, _) = run(g);
        assert_eq!(t.matches("input").count(), 2, "{t}");
        assert_eq!(t.matches("const 0.5").count(), 2, "{t}"); // f32 and bf16 differ
        assert_eq!(t.matches("param \"w\"").count(), 1, "{t}");
        assert_eq!(t.matches("mul(").count(), 4, "{t}");
    }

    #[test]
    fn settings_distinguish_ops() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(2), n(4)]), None);
        let s0 = g.add_inferred(Op::Softmax { axis: 0 }, &[x.into()], None).unwrap();
        let s1 = g.add_inferred(Op::Softmax { axis: 1 }, &[x.into()], None).unwrap();
        let s1b = g.add_inferred(Op::Softmax { axis: 1 }, &[x.into()], None).unwrap();
        g.ret(&[s0.into(), s1.into(), s1b.into()], None);
        let (t, _) = run(g);
        assert_eq!(t.matches("softmax(").count(), 2, "{t}");
        assert!(t.ends_with("return %1, %2, %2"), "{t}");
    }
}
