//! `dce`: dead-code elimination, of nodes and of functions.
//!
//! ```text
//!   %0 = input 0 "x"            %0 = input 0 "x"
//!   %1 = input 1 "mask"         %1 = input 1 "mask"      ← kept: arguments are the signature
//!   %2 = param "w"        ──▶   %2 = exp(%0)
//!   %3 = matmul(%0, %2)         return %2
//!   %4 = exp(%0)
//!   return %4                   (%2 param and %3 matmul had no path to the return)
//! ```
//!
//! A node is live when some path leads from it to the function's `Return`; every other
//! node goes, `Param`s and `Const`s included, except the function's `Input`s, which
//! define its signature (a caller passes every argument). The IR is pure dataflow, so
//! nothing is live for its effects: even a `cache_append` whose result nobody returns is
//! dead. A call is live if any of its outputs is used; its unused results stay (pruning
//! them would change the callee's signature, which every other caller shares).
//!
//! Then functions: one that no entry point reaches through calls is removed. A module
//! with no entry points at all is left whole, since nothing says which functions matter.

use super::{Changed, Pass, PassCx, PassError};
use crate::ir::{Graph, Module, NodeId, Op};
use std::collections::{BTreeSet, HashSet};

/// Removes nodes with no path to the return, and unreachable functions.
pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let mut removed_nodes = 0;
        for f in &mut m.functions {
            removed_nodes += dce_graph(&mut f.graph, &f.name)?;
        }
        let removed_fns = remove_unreachable_functions(m);
        if removed_nodes > 0 || !removed_fns.is_empty() {
            let mut r = format!("removed {removed_nodes} node(s)");
            if !removed_fns.is_empty() {
                r.push_str(&format!(" and function(s) {}", removed_fns.join(", ")));
            }
            cx.report(self.name(), r);
        }
        Ok((removed_nodes > 0 || !removed_fns.is_empty()).into())
    }
}

/// Remove the dead nodes of one graph; returns how many went.
pub fn dce_graph(g: &mut Graph, name: &str) -> Result<usize, PassError> {
    let Some(ret) = g.return_node() else {
        return Err(PassError::new(format!("`{name}` has no return, so nothing in it is live")));
    };
    let mut live: HashSet<NodeId> = HashSet::from([ret]);
    let mut stack = vec![ret];
    while let Some(n) = stack.pop() {
        for v in g.inputs(n) {
            if live.insert(v.node) {
                stack.push(v.node);
            }
        }
    }
    let order = g.topo_order().map_err(|c| PassError::at(name, g, c.0[0], "the graph has a cycle"))?;
    // Users before producers: a dead node's users are all dead (a live user would make it
    // live), so in reverse topological order each dead node has none left when reached.
    let mut removed = 0;
    for n in order.into_iter().rev() {
        if !live.contains(&n) && !matches!(g.node(n).op, Op::Input { .. }) {
            g.remove(n);
            removed += 1;
        }
    }
    Ok(removed)
}

/// Drop functions no entry point reaches; returns their names, in module order.
pub fn remove_unreachable_functions(m: &mut Module) -> Vec<String> {
    if m.entries.is_empty() {
        return Vec::new();
    }
    let mut reached: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = m.entries.values().cloned().collect();
    while let Some(name) = stack.pop() {
        if !reached.insert(name.clone()) {
            continue;
        }
        let Some(f) = m.function(&name) else { continue };
        for n in f.graph.nodes() {
            if let Op::Call { function, .. } = &f.graph.node(n).op {
                if !reached.contains(function) {
                    stack.push(function.clone());
                }
            }
        }
    }
    let removed: Vec<String> = m.functions.iter().filter(|f| !reached.contains(&f.name)).map(|f| f.name.clone()).collect();
    m.functions.retain(|f| reached.contains(&f.name));
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Dim, Function, Mode, Op, UnaryOp};
    use crate::passes::test_util::{f32t, module_of, n, text};

    fn run(m: &mut Module) -> Changed {
        Dce.run(m, &mut PassCx::new(Mode::Prefill)).unwrap()
    }

    #[test]
    fn removes_dead_nodes_params_and_consts_but_not_inputs() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
        let mask = g.input(1, "mask", f32t([Dim::B, n(4)]), None);
        let w = g.param("w", f32t([n(8), n(4)]), None);
        let y = g.add_inferred(Op::MatMul, &[x.into(), w.into()], None).unwrap();
        let k = g.constant(2.0, DType::F32, None);
        g.add_inferred(Op::Binary(BinaryOp::Mul), &[y.into(), k.into()], None).unwrap();
        let e = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        g.ret(&[e.into()], None);
        let _ = mask;
        let mut m = module_of("f", g, Mode::Prefill);
        assert_eq!(run(&mut m), Changed::Yes);
        assert_eq!(
            text(&m.functions[0].graph),
            "%0:f32[b,4] = input 0 \"x\"\n%1:f32[b,4] = input 1 \"mask\"\n%2:f32[b,4] = exp(%0)\nreturn %2"
        );
        // Fixed point.
        assert_eq!(run(&mut m), Changed::No);
    }

    #[test]
    fn a_call_with_one_used_output_stays() {
        let mut layer = Graph::new();
        let h = layer.input(0, "h", f32t([n(4)]), None);
        let t = layer.add_inferred(Op::Unary(UnaryOp::Tanh), &[h.into()], None).unwrap();
        layer.ret(&[t.into(), h.into()], None);
        let mut m = Module::new();
        m.add_function(Function { name: "layer".into(), graph: layer });
        let sig = m.signature("layer").unwrap();
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let c = g.call("layer", Some(0), &sig, &[x.into()], None).unwrap();
        g.ret(&[c.out(1)], None);
        m.add_function(Function { name: "entry".into(), graph: g });
        m.set_entry(Mode::Prefill, "entry");
        assert_eq!(run(&mut m), Changed::No);
        assert!(text(&m.function("entry").unwrap().graph).contains("call layer(%0)"));
    }

    #[test]
    fn removes_functions_no_entry_reaches() {
        let body = |name: &str| {
            let mut g = Graph::new();
            let x = g.input(0, "x", f32t([n(4)]), None);
            g.ret(&[x.into()], None);
            Function { name: name.into(), graph: g }
        };
        let mut m = Module::new();
        m.add_function(body("used"));
        m.add_function(body("unused"));
        m.add_function(body("only_unused_calls_me"));
        let sig = m.signature("used").unwrap();
        // `unused` calls `only_unused_calls_me`; neither is reachable from the entry.
        let g = &mut m.function_mut("unused").unwrap().graph;
        let x = g.arguments()[0];
        let c = g.call("only_unused_calls_me", None, &sig, &[x.into()], None).unwrap();
        let r = g.return_node().unwrap();
        g.set_input(r, 0, c.into());
        let mut e = Graph::new();
        let x = e.input(0, "x", f32t([n(4)]), None);
        let c = e.call("used", None, &sig, &[x.into()], None).unwrap();
        e.ret(&[c.into()], None);
        m.add_function(Function { name: "decode".into(), graph: e });
        m.set_entry(Mode::Decode, "decode");

        let mut cx = PassCx::new(Mode::Decode);
        assert_eq!(Dce.run(&mut m, &mut cx), Ok(Changed::Yes));
        let names: Vec<&str> = m.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["used", "decode"]);
        assert_eq!(cx.reports[0].text, "removed 0 node(s) and function(s) unused, only_unused_calls_me");

        // Without entries nothing is known to be unreachable.
        m.entries.clear();
        m.add_function(body("loose"));
        assert_eq!(run(&mut m), Changed::No);
        assert_eq!(m.functions.len(), 3);
    }
}
