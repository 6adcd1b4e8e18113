//! Local rewrites as rule tables, run to a fixed point (tinygrad's `PatternMatcher` +
//! `graph_rewrite`).
//!
//! ```text
//!   rules: [Rule { name: "mul_one", apply: |g, n| /* x*1 */ Some(Forward(x)) }, ...]
//!
//!   repeat until a round fires nothing:
//!     for n in topo order:  first rule whose apply(g, n) is Some ──▶ apply the Rewrite
//! ```
//!
//! A rule only *reads* the graph and says what to do; [`rewrite`] does it, so the edge
//! plumbing is written once and every rule gets the same guards:
//!
//! - [`Rewrite::Forward`]`(v)`: every use of the node becomes a use of `v`.
//! - [`Rewrite::Replace`]`{ op, inputs }`: a new node takes the old one's place.
//!
//! Neither may change a value's type: a forwarded value must have the node's type, and a
//! replacement's shape rule must give the node's types. A rule that breaks this is a bug
//! and fails the rewrite loudly instead of silently producing ill-typed IR. The replaced
//! node is removed, along with any node it was the last user of (other than function
//! arguments), so no garbage is left for later rounds to match.
//!
//! Termination is the rules' business (each should shrink the graph or a chain in it);
//! a round limit turns a rule cycle into an error rather than a hang.

use crate::ir::{infer, Graph, NodeId, Op, Ty, Value};
use std::collections::BTreeMap;

/// What a rule does to the node it matched.
#[derive(Debug, Clone, PartialEq)]
pub enum Rewrite {
    /// Uses of the node's output read this value instead (the node has one output).
    Forward(Value),
    /// The node becomes `op(inputs)`, with the same output types and span.
    Replace { op: Op, inputs: Vec<Value> },
}

/// One local rewrite: a name for reports and a matcher that proposes a [`Rewrite`].
#[derive(Clone, Copy)]
pub struct Rule {
    pub name: &'static str,
    pub apply: fn(&Graph, NodeId) -> Option<Rewrite>,
}

/// What a [`rewrite`] run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewriteStats {
    /// How often each rule fired.
    pub fired: BTreeMap<&'static str, usize>,
    /// Rounds over the graph, the last one firing nothing.
    pub rounds: usize,
}

impl RewriteStats {
    pub fn total(&self) -> usize {
        self.fired.values().sum()
    }
}

/// A failed rewrite: a rule broke the type guard, or the rules never settled.
#[derive(Debug, Clone, PartialEq)]
pub struct RewriteError {
    pub rule: &'static str,
    pub node: Option<NodeId>,
    pub message: String,
}

/// Rounds allowed per node of the graph before giving up: a correct table settles in a
/// handful of rounds; only rules that undo each other get near this.
const ROUNDS_PER_NODE: usize = 4;

/// Apply `rules` to `g` until no rule fires. In each round nodes are visited in
/// topological order, and the first matching rule in table order fires.
pub fn rewrite(g: &mut Graph, rules: &[Rule]) -> Result<RewriteStats, RewriteError> {
    let mut stats = RewriteStats::default();
    let limit = 16 + ROUNDS_PER_NODE * g.len();
    loop {
        stats.rounds += 1;
        let order =
            g.topo_order().map_err(|c| RewriteError { rule: "", node: c.0.first().copied(), message: "the graph has a cycle".into() })?;
        let mut fired = false;
        for n in order {
            // Earlier rewrites in this round may have removed it (or reused its slot for
            // a new node, which is fine to visit: it is a live node like any other).
            if !g.contains(n) {
                continue;
            }
            for rule in rules {
                if let Some(rw) = (rule.apply)(g, n) {
                    apply(g, n, rw).map_err(|message| RewriteError { rule: rule.name, node: Some(n), message })?;
                    *stats.fired.entry(rule.name).or_default() += 1;
                    fired = true;
                    break;
                }
            }
        }
        if !fired {
            return Ok(stats);
        }
        if stats.rounds >= limit {
            let busiest = stats.fired.iter().max_by_key(|(_, &k)| k).map_or("", |(&r, _)| r);
            return Err(RewriteError {
                rule: busiest,
                node: None,
                message: format!("no fixed point after {} rounds; rule `{busiest}` fired most", stats.rounds),
            });
        }
    }
}

/// Carry out one rewrite of node `n`, checking that no type changes.
fn apply(g: &mut Graph, n: NodeId, rw: Rewrite) -> Result<(), String> {
    let outputs = g.node(n).outputs.clone();
    let span = g.node(n).span;
    let inputs_before = g.inputs(n);
    match rw {
        Rewrite::Forward(v) => {
            if outputs.len() != 1 {
                return Err(format!("forwarding a node with {} outputs", outputs.len()));
            }
            if v.node == n {
                return Err("forwarding a node to itself".into());
            }
            let have = g.node(v.node).outputs.get(v.output as usize);
            if have != Some(&outputs[0]) {
                return Err(format!("forwarding {} to a value of type {}", outputs[0], show(have)));
            }
            g.replace_uses(n.out(0), v);
        }
        Rewrite::Replace { op, inputs } => {
            if matches!(op, Op::Call { .. }) || op.is_leaf() {
                return Err(format!("cannot replace a node by `{}`: its type is not a shape rule of its inputs", op.name()));
            }
            let tys: Vec<&Ty> = inputs.iter().map(|&v| g.ty(v)).collect();
            match infer(&op, &tys, None) {
                Ok(Some(t)) if t == outputs => {}
                Ok(t) => return Err(format!("replacement `{}` has types {:?}, the node {:?}", op.name(), t, outputs)),
                Err(e) => return Err(format!("replacement is ill-typed: {e}")),
            }
            let new = g.add(op, &inputs, outputs, span);
            g.replace_all_uses(n, new);
        }
    }
    remove_with_orphans(g, n, inputs_before);
    Ok(())
}

/// Remove `n` (now unused) and, transitively, the producers it was the last user of.
/// Function arguments stay: they are the signature.
fn remove_with_orphans(g: &mut Graph, n: NodeId, inputs: Vec<Value>) {
    g.remove(n);
    let mut stack: Vec<NodeId> = inputs.into_iter().map(|v| v.node).collect();
    while let Some(p) = stack.pop() {
        if !g.contains(p) || g.has_users(p) || matches!(g.node(p).op, Op::Input { .. } | Op::Return) {
            continue;
        }
        stack.extend(g.inputs(p).into_iter().map(|v| v.node));
        g.remove(p);
    }
}

fn show(t: Option<&Ty>) -> String {
    t.map_or_else(|| "<none>".to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, Dim, UnaryOp};
    use crate::passes::test_util::{f32t, n, text};

    fn exp_to_tanh(g: &Graph, n: NodeId) -> Option<Rewrite> {
        (g.node(n).op == Op::Unary(UnaryOp::Exp)).then(|| Rewrite::Replace { op: Op::Unary(UnaryOp::Tanh), inputs: g.inputs(n) })
    }
    fn tanh_to_exp(g: &Graph, n: NodeId) -> Option<Rewrite> {
        (g.node(n).op == Op::Unary(UnaryOp::Tanh)).then(|| Rewrite::Replace { op: Op::Unary(UnaryOp::Exp), inputs: g.inputs(n) })
    }
    /// Wrong on purpose: forwards `x + y` to `y` even when `y` broadcasts.
    fn add_to_rhs(g: &Graph, n: NodeId) -> Option<Rewrite> {
        matches!(g.node(n).op, Op::Binary(BinaryOp::Add)).then(|| Rewrite::Forward(g.inputs(n)[1]))
    }

    #[test]
    fn rules_that_undo_each_other_hit_the_round_limit() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let e = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        g.ret(&[e.into()], None);
        let rules = [Rule { name: "exp_to_tanh", apply: exp_to_tanh }, Rule { name: "tanh_to_exp", apply: tanh_to_exp }];
        let err = rewrite(&mut g, &rules).unwrap_err();
        assert!(err.message.starts_with("no fixed point after "), "{err:?}");
    }

    #[test]
    fn type_changing_rewrites_are_refused() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
        let k = g.constant(1.0, crate::ir::DType::F32, None);
        let a = g.add_inferred(Op::Binary(BinaryOp::Add), &[x.into(), k.into()], None).unwrap();
        g.ret(&[a.into()], None);
        let err = rewrite(&mut g, &[Rule { name: "add_to_rhs", apply: add_to_rhs }]).unwrap_err();
        assert_eq!(err.rule, "add_to_rhs");
        assert_eq!(err.message, "forwarding f32[b,4] to a value of type f32[]");
    }

    /// Forwards `x + y` to `x` (right when `x` already has the result's type).
    fn add_to_lhs(g: &Graph, n: NodeId) -> Option<Rewrite> {
        matches!(g.node(n).op, Op::Binary(BinaryOp::Add)).then(|| Rewrite::Forward(g.inputs(n)[0]))
    }

    #[test]
    fn replaced_nodes_take_their_orphans_with_them() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let y = g.input(1, "y", f32t([n(4)]), None);
        let w = g.param("w", f32t([n(4)]), None);
        let s = g.add_inferred(Op::Binary(BinaryOp::Mul), &[y.into(), w.into()], None).unwrap();
        let a = g.add_inferred(Op::Binary(BinaryOp::Add), &[x.into(), s.into()], None).unwrap();
        let t = g.add_inferred(Op::Unary(UnaryOp::Tanh), &[s.into()], None).unwrap();
        g.ret(&[a.into()], None);
        // The tanh is dead from the start and not the rewrite's business: it stays, and
        // keeps the mul and the param alive.
        let mut g2 = g.clone();
        let stats = rewrite(&mut g2, &[Rule { name: "add_to_lhs", apply: add_to_lhs }]).unwrap();
        assert_eq!((stats.total(), stats.rounds), (1, 2));
        assert!(text(&g2).contains("tanh(%3)"), "{}", text(&g2));
        // Without it, the mul and then the param lose their last user and go; the
        // argument `y` stays.
        g.remove(t);
        rewrite(&mut g, &[Rule { name: "add_to_lhs", apply: add_to_lhs }]).unwrap();
        assert_eq!(text(&g), "%0:f32[4] = input 0 \"x\"\n%1:f32[4] = input 1 \"y\"\nreturn %0");
    }
}
