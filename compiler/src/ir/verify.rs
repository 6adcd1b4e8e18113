//! The IR verifier: checks a [`Module`] and reports *every* broken invariant, each with
//! the function, node and spec span it concerns (cranelift's verifier, naga's `WithSpan`).
//! It never stops at the first error, so one run after a buggy pass shows the whole damage.
//!
//! # Invariants
//!
//! Graph structure, per function:
//! - **S1 live edges.** Every edge joins two live nodes. `StableGraph` guarantees this by
//!   construction (removing a node removes its edges); what a removal *can* break is the
//!   consumer's slot list, which S2 checks.
//! - **S2 dense slots.** The input slots of a node are exactly `0..n`, each fed once.
//! - **S3 outputs exist.** An edge reads an output the producer has (`output < outputs`).
//! - **S4 arity.** The input count is one the op accepts ([`crate::ir::Op::arity`]).
//! - **S5 acyclic.** The graph has a topological order.
//!
//! Types, per node:
//! - **T1 output count.** A node has as many output types as its op produces (for a call,
//!   as many as the callee returns).
//! - **T2 shape rules.** A non-leaf node's output types are exactly what
//!   [`crate::ir::infer::infer`] gives for its inputs; this is where an op's documented
//!   shape rule, a call's argument types and `Concat`/`Attention` settings are checked.
//!   Skipped for nodes that already broke S2–S4.
//! - **T3 leaves.** `Input`, `Param` and `Const` have one output; a `Const` is a scalar.
//!
//! Functions:
//! - **F1 one return.** Exactly one `Return` node.
//! - **F2 arguments.** `Input` indices are `0..n`, each used once, with distinct names.
//! - **F3 params.** `Param` names are distinct within a function (one node per weight, so
//!   a weight is loaded once and CSE has nothing to find).
//!
//! Module:
//! - **M1 names.** Function names are distinct.
//! - **M2 calls.** Every `Call` names an existing function (its argument and result types
//!   are T2); the call graph has no cycles; and a function reached through a call scoped
//!   to a layer makes no layer-scoped calls itself, since param scopes do not compose
//!   ([`crate::ir::op::param_path`]).
//! - **M3 entries.** Every entry point names an existing function.

use super::graph::{Function, Graph, Module, NodeId, Signature};
use super::infer::infer;
use super::op::Op;
use dsc_dsl::span::Span;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyError {
    /// The function it is in; empty for module-level errors.
    pub function: String,
    /// The node, when the error concerns one.
    pub node: Option<NodeId>,
    /// The node's spec span, when known.
    pub span: Option<Span>,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.function.is_empty() {
            write!(f, "in `{}`: ", self.function)?;
        }
        if let Some(n) = self.node {
            write!(f, "{n}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Check every invariant of the module; `Err` holds all the errors found, in a
/// deterministic order (functions in module order, nodes in insertion order).
pub fn verify(module: &Module) -> Result<(), Vec<VerifyError>> {
    let mut errors = Vec::new();
    let module_err = |message: String| VerifyError { function: String::new(), node: None, span: None, message };

    // M1
    let mut seen = HashSet::new();
    for f in &module.functions {
        if !seen.insert(f.name.as_str()) {
            errors.push(module_err(format!("two functions are named `{}`", f.name)));
        }
    }
    // M3
    for (mode, name) in &module.entries {
        if module.function(name).is_none() {
            errors.push(module_err(format!("the {mode} entry names a missing function `{name}`")));
        }
    }

    let sigs: HashMap<&str, Signature> = module.functions.iter().map(|f| (f.name.as_str(), f.graph.signature())).collect();
    for f in &module.functions {
        errors.extend(verify_graph(&f.graph, &f.name, &|n| sigs.get(n).cloned()));
    }
    check_call_graph(module, &mut errors);

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Check the per-function invariants (S*, T*, F*, and M2's "target exists") of one graph.
/// `signature_of` gives callee signatures by name.
pub fn verify_graph(g: &Graph, name: &str, signature_of: &dyn Fn(&str) -> Option<Signature>) -> Vec<VerifyError> {
    let mut errors = Vec::new();
    let mut err = |n: Option<NodeId>, message: String| {
        let span = n.filter(|&n| g.contains(n)).and_then(|n| g.node(n).span);
        errors.push(VerifyError { function: name.to_string(), node: n, span, message });
    };
    let nodes = g.nodes();

    // S1 (defensive: cannot fail with StableGraph) and S3.
    for (from, to, e) in g.edges() {
        if !g.contains(from) || !g.contains(to) {
            err(Some(to), format!("an edge joins a removed node ({from} -> {to})"));
            continue;
        }
        let outs = g.node(from).outputs.len();
        if e.output as usize >= outs {
            let op = g.node(from).op.name();
            err(Some(to), format!("slot {} reads output {} of {from} ({op}), which has {outs}", e.slot, e.output));
        }
    }

    let mut returns = Vec::new();
    let mut args: BTreeMap<u32, Vec<NodeId>> = BTreeMap::new();
    let mut arg_names: HashMap<&str, NodeId> = HashMap::new();
    let mut params: HashMap<&str, NodeId> = HashMap::new();

    for &n in &nodes {
        let node = g.node(n);
        let op = &node.op;
        let edges = g.input_edges(n);
        let mut structural_ok = true;

        // S2
        let mut slot_seen = HashSet::new();
        for &(slot, _) in &edges {
            if !slot_seen.insert(slot) {
                err(Some(n), format!("{}: slot {slot} is fed twice", op.name()));
                structural_ok = false;
            }
        }
        for slot in 0..edges.len() as u16 {
            if !slot_seen.contains(&slot) {
                err(Some(n), format!("{}: input slot {slot} is missing", op.name()));
                structural_ok = false;
            }
        }
        // S4
        if !op.arity().accepts(slot_seen.len()) {
            err(Some(n), format!("{} takes {} inputs, has {}", op.name(), op.arity(), slot_seen.len()));
            structural_ok = false;
        }
        if edges.iter().any(|(_, v)| v.output as usize >= g.node(v.node).outputs.len()) {
            structural_ok = false; // already reported by S3
        }

        // Function-level bookkeeping (F1–F3) and T3.
        match op {
            Op::Return => returns.push(n),
            Op::Input { index, name } => {
                args.entry(*index).or_default().push(n);
                if let Some(prev) = arg_names.insert(name, n) {
                    err(Some(n), format!("argument name `{name}` is also used by {prev}"));
                }
            }
            Op::Param { name } => {
                if let Some(prev) = params.insert(name, n) {
                    err(Some(n), format!("param `{name}` is also declared by {prev}"));
                }
            }
            _ => {}
        }
        if op.is_leaf() {
            if node.outputs.len() != 1 {
                err(Some(n), format!("{} must have one output, has {}", op.name(), node.outputs.len()));
            } else if matches!(op, Op::Const { .. }) && node.outputs[0].rank() != 0 {
                err(Some(n), format!("const must be a scalar, declared {}", node.outputs[0]));
            }
            continue;
        }

        // M2 (target exists) and T1.
        let callee = match op {
            Op::Call { function, .. } => match signature_of(function) {
                Some(s) => Some(s),
                None => {
                    err(Some(n), format!("call of missing function `{function}`"));
                    continue;
                }
            },
            _ => None,
        };
        let want_outputs = op.num_outputs().or(callee.as_ref().map(|s| s.outputs.len()));
        if let Some(k) = want_outputs {
            if node.outputs.len() != k {
                err(Some(n), format!("{} produces {k} outputs, the node declares {}", op.name(), node.outputs.len()));
                continue;
            }
        }

        // T2
        if !structural_ok {
            continue;
        }
        let tys: Vec<_> = edges.iter().map(|(_, v)| g.ty(*v)).collect();
        match infer(op, &tys, callee.as_ref()) {
            Ok(Some(inferred)) => {
                for (i, (want, got)) in inferred.iter().zip(&node.outputs).enumerate() {
                    if want != got {
                        err(Some(n), format!("{} output {i} is declared {got}, but its shape rule gives {want}", op.name()));
                    }
                }
            }
            Ok(None) => {}
            Err(e) => err(Some(n), e.to_string()),
        }
    }

    // S5
    if let Err(cycle) = g.topo_order() {
        let names: Vec<String> = cycle.0.iter().map(|n| n.to_string()).collect();
        err(cycle.0.first().copied(), format!("the graph has a cycle through {}", names.join(", ")));
    }
    // F1
    match returns.len() {
        1 => {}
        0 => err(None, "the function has no return".into()),
        k => {
            for &r in &returns[1..] {
                err(Some(r), format!("the function has {k} returns"));
            }
        }
    }
    // F2
    for (i, (&index, ns)) in args.iter().enumerate() {
        if index as usize != i {
            err(Some(ns[0]), format!("argument indices skip {i} (next is {index})"));
            break;
        }
    }
    for ns in args.values() {
        for &n in &ns[1..] {
            err(Some(n), format!("argument index is also used by {}", ns[0]));
        }
    }
    errors
}

/// M2: no recursion, and scoped calls do not nest.
fn check_call_graph(module: &Module, errors: &mut Vec<VerifyError>) {
    // Edges of the call graph: (callee name, scoped?, call node).
    let calls = |f: &Function| -> Vec<(String, bool, NodeId)> {
        f.graph
            .nodes()
            .into_iter()
            .filter_map(|n| match &f.graph.node(n).op {
                Op::Call { function, layer } => Some((function.clone(), layer.is_some(), n)),
                _ => None,
            })
            .collect()
    };
    let by_name: HashMap<&str, &Function> = module.functions.iter().map(|f| (f.name.as_str(), f)).collect();

    for f in &module.functions {
        for (callee, scoped, n) in calls(f) {
            let Some(target) = by_name.get(callee.as_str()) else { continue };
            if scoped {
                if let Some((inner, _, _)) = calls(target).into_iter().find(|c| c.1) {
                    errors.push(VerifyError {
                        function: f.name.clone(),
                        node: Some(n),
                        span: f.graph.node(n).span,
                        message: format!("layer-scoped call of `{callee}`, which itself makes a layer-scoped call of `{inner}`"),
                    });
                }
            }
        }
    }

    // Recursion: depth-first search with colours, reporting each function on a cycle once.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    fn visit<'a>(
        name: &'a str,
        by_name: &HashMap<&'a str, &'a Function>,
        colour: &mut HashMap<&'a str, Colour>,
        errors: &mut Vec<VerifyError>,
    ) {
        colour.insert(name, Colour::Grey);
        let f = by_name[name];
        for n in f.graph.nodes() {
            let Op::Call { function, .. } = &f.graph.node(n).op else { continue };
            let Some((&callee, _)) = by_name.get_key_value(function.as_str()) else { continue };
            match colour.get(callee).copied().unwrap_or(Colour::White) {
                Colour::White => visit(callee, by_name, colour, errors),
                Colour::Grey => errors.push(VerifyError {
                    function: name.to_string(),
                    node: Some(n),
                    span: f.graph.node(n).span,
                    message: format!("recursive call of `{callee}`"),
                }),
                Colour::Black => {}
            }
        }
        colour.insert(name, Colour::Black);
    }
    let mut colour = HashMap::new();
    for f in &module.functions {
        if !colour.contains_key(f.name.as_str()) {
            visit(f.name.as_str(), &by_name, &mut colour, errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::dim::Dim;
    use crate::ir::dtype::{DType, Ty};
    use crate::ir::graph::{Edge, Mode};
    use crate::ir::op::{BinaryOp, UnaryOp};
    use dsc_dsl::span::FileId;

    fn t() -> Ty {
        Ty::new(DType::F32, [Dim::B, Dim::lit(4)])
    }

    /// `f(x) = exp(x) * w`: a valid function to break.
    fn func(name: &str) -> Function {
        let mut f = Function::new(name);
        let g = &mut f.graph;
        let x = g.input(0, "x", t(), None);
        let w = g.param("w", Ty::new(DType::F32, [Dim::lit(4)]), None);
        let e = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        let m = g.add_inferred(Op::Binary(BinaryOp::Mul), &[e.into(), w.into()], None).unwrap();
        g.ret(&[m.into()], None);
        f
    }

    fn module_with(f: Function) -> Module {
        let mut m = Module::new();
        m.add_function(f);
        m
    }

    /// The messages of all errors, for `contains` checks.
    fn errors(m: &Module) -> Vec<String> {
        verify(m).err().unwrap_or_default().iter().map(|e| e.to_string()).collect()
    }

    fn node_of(f: &Function, name: &str) -> NodeId {
        f.graph.nodes().into_iter().find(|&n| f.graph.node(n).op.name() == name).unwrap()
    }

    fn has(errs: &[String], needle: &str) -> bool {
        errs.iter().any(|e| e.contains(needle))
    }

    #[test]
    fn valid_module_passes() {
        let mut m = module_with(func("f"));
        m.set_entry(Mode::Prefill, "f");
        assert_eq!(verify(&m), Ok(()));
    }

    #[test]
    fn s2_missing_and_duplicate_slots() {
        let mut f = func("f");
        let mul = node_of(&f, "mul");
        f.graph.remove_input_edge(mul, 0);
        let errs = errors(&module_with(f.clone()));
        assert!(has(&errs, "mul: input slot 0 is missing"), "{errs:?}");
        assert!(has(&errs, "mul takes 2 inputs, has 1"), "{errs:?}");

        let mut f = func("f");
        let (mul, x) = (node_of(&f, "mul"), node_of(&f, "input"));
        f.graph.add_raw_edge(x, mul, Edge { slot: 1, output: 0 });
        assert!(has(&errors(&module_with(f)), "mul: slot 1 is fed twice"));
    }

    #[test]
    fn s3_output_out_of_range() {
        let mut f = func("f");
        let (exp, x) = (node_of(&f, "exp"), node_of(&f, "input"));
        f.graph.remove_input_edge(exp, 0);
        f.graph.add_raw_edge(x, exp, Edge { slot: 0, output: 2 });
        assert!(has(&errors(&module_with(f)), "slot 0 reads output 2 of n0 (input), which has 1"));
    }

    #[test]
    fn s4_arity() {
        let mut f = func("f");
        let x = node_of(&f, "input");
        f.graph.add(Op::MatMul, &[x.into()], vec![t()], None);
        assert!(has(&errors(&module_with(f)), "matmul takes 2 inputs, has 1"));
    }

    #[test]
    fn s5_cycle() {
        let mut f = func("f");
        let (exp, mul) = (node_of(&f, "exp"), node_of(&f, "mul"));
        f.graph.set_input(exp, 0, mul.into());
        assert!(has(&errors(&module_with(f)), "the graph has a cycle through n2, n3"));
    }

    #[test]
    fn t1_output_count() {
        let mut f = func("f");
        let x = node_of(&f, "input");
        f.graph.add(Op::TopK { k: 2, axis: 1 }, &[x.into()], vec![t()], None);
        assert!(has(&errors(&module_with(f)), "top_k produces 2 outputs, the node declares 1"));
    }

    #[test]
    fn t2_declared_type_disagrees_with_rule_and_keeps_span() {
        let mut f = func("f");
        let exp = node_of(&f, "exp");
        let span = Span::new(FileId(0), 10, 20);
        f.graph.node_mut(exp).outputs[0] = Ty::new(DType::Bf16, [Dim::B, Dim::lit(4)]);
        f.graph.node_mut(exp).span = Some(span);
        let all = verify(&module_with(f)).unwrap_err();
        let e = all.iter().find(|e| e.message.contains("exp output 0 is declared bf16[b,4]")).unwrap();
        assert_eq!(e.span, Some(span));
        assert_eq!(e.message, "exp output 0 is declared bf16[b,4], but its shape rule gives f32[b,4]");
        // The mul downstream now sees bf16 * f32: reported too, not hidden.
        assert!(all.iter().any(|e| e.message.contains("insert a cast")));
    }

    #[test]
    fn t3_leaves() {
        let mut f = func("f");
        f.graph.add(Op::Const { value: 1.0.into() }, &[], vec![t()], None);
        f.graph.add(Op::Param { name: "v".into() }, &[], vec![], None);
        // A typeless argument must not crash the signature computed before checking.
        f.graph.add(Op::Input { index: 1, name: "y".into() }, &[], vec![], None);
        let errs = errors(&module_with(f));
        assert!(has(&errs, "input must have one output, has 0"));
        assert!(has(&errs, "const must be a scalar, declared f32[b,4]"));
        assert!(has(&errs, "param must have one output, has 0"));
    }

    #[test]
    fn f1_returns() {
        let mut f = func("f");
        let r = node_of(&f, "return");
        f.graph.remove(r);
        assert!(has(&errors(&module_with(f)), "the function has no return"));
        let mut f = func("f");
        let x = node_of(&f, "input");
        f.graph.ret(&[x.into()], None);
        assert!(has(&errors(&module_with(f)), "the function has 2 returns"));
    }

    #[test]
    fn f2_arguments() {
        let mut f = func("f");
        f.graph.input(0, "y", t(), None);
        f.graph.input(3, "x", t(), None);
        let errs = errors(&module_with(f));
        assert!(has(&errs, "argument index is also used by n0"), "{errs:?}");
        assert!(has(&errs, "argument indices skip 1 (next is 3)"), "{errs:?}");
        assert!(has(&errs, "argument name `x` is also used by n0"), "{errs:?}");
    }

    #[test]
    fn f3_params() {
        let mut f = func("f");
        f.graph.param("w", Ty::new(DType::F32, [Dim::lit(4)]), None);
        assert!(has(&errors(&module_with(f)), "param `w` is also declared by n1"));
    }

    #[test]
    fn m1_m3_names_and_entries() {
        let mut m = module_with(func("f"));
        m.add_function(func("f"));
        m.set_entry(Mode::Train, "g");
        let errs = errors(&m);
        assert!(has(&errs, "two functions are named `f`"));
        assert!(has(&errs, "the train entry names a missing function `g`"));
    }

    #[test]
    fn m2_calls() {
        // main(x) = layer(x) with layer scope 0; then break it three ways.
        let build = |callee: &str, arg_ty: Ty| {
            let mut m = module_with(func("layer"));
            let sig = m.signature("layer").unwrap();
            let mut main = Function::new("main");
            let x = main.graph.input(0, "x", arg_ty, None);
            let c = main.graph.add(Op::Call { function: callee.into(), layer: Some(0) }, &[x.into()], sig.outputs, None);
            main.graph.ret(&[c.into()], None);
            m.add_function(main);
            m
        };
        assert_eq!(verify(&build("layer", t())), Ok(()));
        assert!(has(&errors(&build("nope", t())), "call of missing function `nope`"));
        let wrong = Ty::new(DType::F32, [Dim::S, Dim::lit(4)]);
        assert!(has(&errors(&build("layer", wrong)), "argument 0 of `layer` must be f32[b,4], got f32[s,4]"));

        // Recursion, and a scoped call inside a scoped callee.
        let mut m = build("layer", t());
        let f = m.function_mut("layer").unwrap();
        let (x, mul) = (node_of(f, "input"), node_of(f, "mul"));
        let c = f.graph.add(Op::Call { function: "main".into(), layer: Some(1) }, &[x.into()], vec![t()], None);
        f.graph.set_input(mul, 0, c.into());
        let errs = errors(&m);
        assert!(has(&errs, "recursive call of `layer`") || has(&errs, "recursive call of `main`"), "{errs:?}");
        assert!(has(&errs, "itself makes a layer-scoped call"), "{errs:?}");
    }

    #[test]
    fn collects_errors_across_functions() {
        let mut a = func("a");
        let mut b = func("b");
        let ra = node_of(&a, "return");
        a.graph.remove(ra);
        let rb = node_of(&b, "return");
        b.graph.remove(rb);
        let mut m = module_with(a);
        m.add_function(b);
        let errs = verify(&m).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].to_string(), "in `a`: the function has no return");
        assert_eq!(errs[1].function, "b");
    }
}
