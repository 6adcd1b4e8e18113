//! `shape_infer`: re-derive every node's output types from its op's shape rule.
//!
//! ```text
//!   %3:?          = exp(%1)     ──▶  %3:f32[b,4] = exp(%1)        (filled in)
//!   %3:f32[b,4]   = exp(%1)     ──▶  unchanged                     (agrees)
//!   %3:f32[b,5]   = exp(%1)     ──▶  error at %3's spec span       (disagrees)
//! ```
//!
//! A node with no output types yet (built with `Graph::add(op, inputs, vec![], span)`)
//! gets them from [`crate::ir::infer()`]; a node with types must agree with it. Leaves
//! (`input`, `param`, `const`) declare their types and are taken as they are.
//!
//! A call's result types are its callee's return types, so functions are visited callees
//! first (a post-order of the call graph) and each callee's signature is recomputed after
//! its own nodes are typed. Within a function nodes go in topological order, so a node's
//! inputs are typed before it. Every disagreement is reported, not just the first.

use super::{Changed, Pass, PassCx, PassError, Phase, Problem};
use crate::ir::{infer, Graph, Module, Op, Signature, Ty};
use std::collections::HashMap;

/// Fills in or checks every non-leaf node's output types; required.
pub struct ShapeInfer;

impl Pass for ShapeInfer {
    fn name(&self) -> &'static str {
        "shape_infer"
    }
    fn is_required(&self) -> bool {
        true
    }
    fn phase(&self) -> Option<Phase> {
        Some(Phase::Typed)
    }
    fn run(&self, m: &mut Module, _: &mut PassCx) -> Result<Changed, PassError> {
        let order = callees_first(m)?;
        let mut sigs: HashMap<String, Signature> = HashMap::new();
        let mut changed = Changed::No;
        let mut problems = Vec::new();
        for i in order {
            let f = &mut m.functions[i];
            changed = changed | infer_graph(&mut f.graph, &f.name, &sigs, &mut problems);
            sigs.insert(f.name.clone(), f.graph.signature());
        }
        if problems.is_empty() {
            Ok(changed)
        } else {
            Err(PassError { problems })
        }
    }
}

/// Type one graph in topological order, given the signatures of its callees.
fn infer_graph(g: &mut Graph, name: &str, sigs: &HashMap<String, Signature>, problems: &mut Vec<Problem>) -> Changed {
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(cycle) => {
            let at = cycle.0[0];
            problems.push(Problem::at(name, g, at, "the graph has a cycle; types cannot be inferred"));
            return Changed::No;
        }
    };
    let mut changed = Changed::No;
    for n in order {
        let op = &g.node(n).op;
        if op.is_leaf() {
            continue;
        }
        let callee = match op {
            Op::Call { function, .. } => match sigs.get(function) {
                Some(s) => Some(s),
                None => {
                    problems.push(Problem::at(name, g, n, format!("call of missing function `{function}`")));
                    continue;
                }
            },
            _ => None,
        };
        let mut tys: Vec<&Ty> = Vec::new();
        let mut untyped_input = false;
        for v in g.inputs(n) {
            match g.node(v.node).outputs.get(v.output as usize) {
                Some(t) => tys.push(t),
                None => untyped_input = true,
            }
        }
        if untyped_input {
            // The producer is untyped because its own inference failed (reported there),
            // or it reads an output that does not exist (the verifier's S3).
            problems.push(Problem::at(name, g, n, format!("`{}` reads an input that has no type", op.name())));
            continue;
        }
        let inferred = match infer(op, &tys, callee) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                problems.push(Problem::at(name, g, n, e.to_string()));
                continue;
            }
        };
        let declared = &g.node(n).outputs;
        if declared.is_empty() && !inferred.is_empty() {
            g.node_mut(n).outputs = inferred;
            changed = Changed::Yes;
        } else if *declared != inferred {
            let msg = format!("`{}` is declared {}, but its shape rule gives {}", op.name(), show(declared), show(&inferred));
            problems.push(Problem::at(name, g, n, msg));
        }
    }
    changed
}

/// `f32[b,4]`, or `(i32[b,2], f32[b,2])` for several outputs.
fn show(tys: &[Ty]) -> String {
    match tys {
        [t] => t.to_string(),
        ts => format!("({})", ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// Function positions in call-graph post-order: every callee before its callers, and
/// otherwise module order. Fails on recursion, which the verifier also rejects.
fn callees_first(m: &Module) -> Result<Vec<usize>, PassError> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        Visiting,
        Done,
    }
    fn visit(m: &Module, i: usize, by_name: &HashMap<&str, usize>, state: &mut [State], order: &mut Vec<usize>) -> Result<(), PassError> {
        state[i] = State::Visiting;
        let f = &m.functions[i];
        for n in f.graph.nodes() {
            let Op::Call { function, .. } = &f.graph.node(n).op else { continue };
            // A missing callee is reported where the call is typed.
            let Some(&j) = by_name.get(function.as_str()) else { continue };
            match state[j] {
                State::New => visit(m, j, by_name, state, order)?,
                State::Visiting => {
                    let msg = format!("`{function}` is called recursively; calls must form a DAG");
                    return Err(PassError::at(&f.name, &f.graph, n, msg));
                }
                State::Done => {}
            }
        }
        state[i] = State::Done;
        order.push(i);
        Ok(())
    }
    let by_name: HashMap<&str, usize> = m.functions.iter().enumerate().map(|(i, f)| (f.name.as_str(), i)).collect();
    let mut state = vec![State::New; m.functions.len()];
    let mut order = Vec::with_capacity(m.functions.len());
    for i in 0..m.functions.len() {
        if state[i] == State::New {
            visit(m, i, &by_name, &mut state, &mut order)?;
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, Dim, Function, Mode, UnaryOp};
    use crate::passes::test_util::{f32t, module_of, n, text};
    use dsc_dsl::span::{FileId, Span};

    fn run(m: &mut Module) -> Result<Changed, PassError> {
        ShapeInfer.run(m, &mut PassCx::new(Mode::Prefill))
    }

    #[test]
    fn fills_missing_types_then_is_a_fixed_point() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
        let e = g.add(Op::Unary(UnaryOp::Exp), &[x.into()], vec![], None);
        let s = g.add(Op::Binary(BinaryOp::Add), &[e.into(), x.into()], vec![], None);
        g.ret(&[s.into()], None);
        let mut m = module_of("f", g, Mode::Prefill);
        assert_eq!(run(&mut m), Ok(Changed::Yes));
        assert_eq!(text(&m.functions[0].graph), "%0:f32[b,4] = input 0 \"x\"\n%1:f32[b,4] = exp(%0)\n%2:f32[b,4] = add(%1, %0)\nreturn %2");
        assert_eq!(run(&mut m), Ok(Changed::No));
    }

    #[test]
    fn disagreement_fails_at_the_node_span() {
        let span = Some(Span::new(FileId(0), 10, 14));
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
        let e = g.add(Op::Unary(UnaryOp::Exp), &[x.into()], vec![f32t([Dim::B, n(5)])], span);
        let w = g.param("w", f32t([n(3), n(7)]), None);
        let y = g.add(Op::MatMul, &[x.into(), w.into()], vec![f32t([Dim::B, n(3)])], None);
        g.ret(&[e.into(), y.into()], None);
        let mut m = module_of("f", g, Mode::Prefill);
        let err = run(&mut m).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert_eq!(err.problems[0].span, span);
        assert_eq!(err.problems[0].node, Some(e));
        assert_eq!(err.problems[0].to_string(), "in `f`: `exp` is declared f32[b,5], but its shape rule gives f32[b,4]");
        assert_eq!(err.problems[1].message, "matmul: x [b,4] contracts 4, but weight [3,7] takes 7");
    }

    #[test]
    fn callees_are_typed_before_their_callers() {
        // The caller comes first in the module, and both bodies are untyped.
        let mut caller = Graph::new();
        let x = caller.input(0, "x", f32t([Dim::B, n(4)]), None);
        let c = caller.add(Op::Call { function: "layer".into(), layer: Some(0) }, &[x.into()], vec![], None);
        let c2 = caller.add(Op::Call { function: "layer".into(), layer: Some(1) }, &[c.into()], vec![], None);
        caller.ret(&[c2.into()], None);
        let mut m = module_of("entry", caller, Mode::Decode);
        let mut layer = Graph::new();
        let h = layer.input(0, "h", f32t([Dim::B, n(4)]), None);
        let t = layer.add(Op::Unary(UnaryOp::Tanh), &[h.into()], vec![], None);
        layer.ret(&[t.into()], None);
        m.add_function(Function { name: "layer".into(), graph: layer });

        assert_eq!(run(&mut m), Ok(Changed::Yes));
        assert!(text(&m.functions[0].graph).contains("%2:f32[b,4] = call layer(%1) layer=1"));
        assert_eq!(crate::ir::verify(&m), Ok(()));
    }

    #[test]
    fn recursion_is_an_error() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let c = g.add(Op::Call { function: "f".into(), layer: None }, &[x.into()], vec![f32t([n(4)])], None);
        g.ret(&[c.into()], None);
        let mut m = module_of("f", g, Mode::Prefill);
        let err = run(&mut m).unwrap_err();
        assert_eq!(err.to_string(), "in `f`: `f` is called recursively; calls must form a DAG");
    }
}
