//! Whole-graph tests of the interpreter: symbol binding, shape checks, calls with layer
//! scopes, error reporting, precision, and (in [`golden`]) full models against the
//! Hugging Face fixtures in `golden/hf`.

mod golden;

use super::*;
use dsc_compiler::ir::{
    param_path, BinaryOp, DType, Dim, Float, Function, Graph, Mode, Module, NodeId, Op, ReduceOp, Shape, Ty, UnaryOp, Value,
};
use std::collections::HashMap;

const B: Dim = Dim::B;
const S: Dim = Dim::S;
const C: Dim = Dim::C;

fn n(v: i64) -> Dim {
    Dim::lit(v)
}
fn f32t(dims: &[Dim]) -> Ty {
    Ty::new(DType::F32, dims.to_vec())
}
fn i32t(dims: &[Dim]) -> Ty {
    Ty::new(DType::I32, dims.to_vec())
}
fn op(g: &mut Graph, op: Op, ins: &[NodeId]) -> NodeId {
    let vals: Vec<Value> = ins.iter().map(|&i| i.into()).collect();
    g.add_inferred(op, &vals, None).unwrap_or_else(|e| panic!("building the test graph: {e}"))
}

/// A module with one function `main` as the prefill entry.
fn single(g: Graph) -> Module {
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g });
    m.set_entry(Mode::Prefill, "main");
    m
}

fn weights(pairs: &[(&str, Tensor)]) -> HashMap<String, Tensor> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn f64_opts() -> Options {
    Options { precision: Precision::F64, ..Options::default() }
}

/// `y = sum(softmax(silu(x·Wᵀ) * 2), -1, keepdim) / rms_norm(...)`: a little of everything.
fn small_graph() -> Module {
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t(&[B, S, n(5)]), None);
    let w = g.param("w", f32t(&[n(3), n(5)]), None);
    let gain = g.param("gain", f32t(&[n(3)]), None);
    let two = g.constant(2.0, DType::F32, None);
    let h = op(&mut g, Op::MatMul, &[x, w]);
    let a = op(&mut g, Op::Unary(UnaryOp::Silu), &[h]);
    let a2 = op(&mut g, Op::Binary(BinaryOp::Mul), &[a, two]);
    let sm = op(&mut g, Op::Softmax { axis: 2 }, &[a2]);
    let nrm = op(&mut g, Op::RmsNorm { eps: Float::new(1e-5) }, &[h, gain]);
    let q = op(&mut g, Op::Binary(BinaryOp::Div), &[sm, nrm]);
    let r = op(&mut g, Op::Reduce { op: ReduceOp::Sum, axis: 2, keepdim: true }, &[q]);
    g.ret(&[r.into(), h.into()], None);
    single(g)
}

fn small_weights() -> HashMap<String, Tensor> {
    weights(&[("w", Tensor::from_fn(&[3, 5], |i| ((i * 7 % 11) as f32 - 5.0) / 4.0)), ("gain", Tensor::f32(&[3], vec![1.0, 0.5, 2.0]))])
}

#[test]
fn f32_and_f64_runs_agree() {
    let m = small_graph();
    let x = Tensor::from_fn(&[2, 3, 5], |i| ((i * 13 % 17) as f32 - 8.0) / 5.0);
    let w = small_weights();
    let a = run(&m, Mode::Prefill, std::slice::from_ref(&x), &w, &Options::default()).unwrap();
    let b = run(&m, Mode::Prefill, &[x], &w, &f64_opts()).unwrap();
    assert_eq!(a[0].shape(), &[2, 3, 1]);
    assert_eq!(a[1].shape(), &[2, 3, 3]);
    assert!(a[0].as_f32().is_some() && b[0].as_f64().is_some(), "results come in the run's precision");
    for (x, y) in a.iter().zip(&b) {
        assert!(x.allclose(y, 1e-5, 1e-5), "f32 {x:?} vs f64 {y:?}");
        assert!(x.max_abs_diff(y).unwrap() > 0.0, "the f64 run really is a different computation");
    }
    // A private pool gives the same numbers.
    let x = Tensor::from_fn(&[2, 3, 5], |i| ((i * 13 % 17) as f32 - 8.0) / 5.0);
    let c = run(&m, Mode::Prefill, &[x], &w, &Options { threads: Some(1), ..Options::default() }).unwrap();
    assert_eq!(c, a);
}

#[test]
fn missing_weight_and_entry_are_errors() {
    let m = small_graph();
    let x = Tensor::zeros(&[1, 2, 5]);
    let w = weights(&[("w", Tensor::zeros(&[3, 5]))]);
    let e = run(&m, Mode::Prefill, std::slice::from_ref(&x), &w, &Options::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::MissingWeight);
    assert!(e.to_string().contains("missing weight `gain`"), "{e}");
    assert_eq!(e.function.as_deref(), Some("main"));
    let e = run(&m, Mode::Decode, &[x], &w, &Options::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Entry);
}

#[test]
fn wrong_shapes_are_errors_naming_the_node() {
    let m = small_graph();
    let w = small_weights();
    // Last axis 4 instead of 5.
    let e = run(&m, Mode::Prefill, &[Tensor::zeros(&[1, 2, 4])], &w, &Options::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape);
    assert_eq!(e.node.as_deref(), Some("%0 input 0 \"x\""), "{e}");
    assert!(e.message.contains("[1, 2, 4]") && e.message.contains("[b,s,5]"), "{e}");
    // Wrong rank, wrong dtype, wrong count.
    assert_eq!(run(&m, Mode::Prefill, &[Tensor::zeros(&[2, 5])], &w, &Options::default()).unwrap_err().kind, ErrorKind::Shape);
    let ints = Tensor::i32(&[1, 1, 5], vec![0; 5]);
    assert_eq!(run(&m, Mode::Prefill, &[ints], &w, &Options::default()).unwrap_err().kind, ErrorKind::DType);
    assert_eq!(run(&m, Mode::Prefill, &[], &w, &Options::default()).unwrap_err().kind, ErrorKind::Arguments);
    // A weight of the wrong shape is caught at its param.
    let bad = weights(&[("w", Tensor::zeros(&[3, 4])), ("gain", Tensor::zeros(&[3]))]);
    let e = run(&m, Mode::Prefill, &[Tensor::zeros(&[1, 2, 5])], &bad, &Options::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape);
    assert!(e.node.as_deref().unwrap().contains("param \"w\""), "{e}");
}

#[test]
fn symbols_bind_consistently() {
    // Two arguments that disagree on b.
    let mut g = Graph::new();
    let a = g.input(0, "a", f32t(&[B, S]), None);
    let b = g.input(1, "b", f32t(&[B, S]), None);
    let s = op(&mut g, Op::Binary(BinaryOp::Add), &[a, b]);
    g.ret(&[s.into()], None);
    let m = single(g);
    let w = HashMap::new();
    let e = run(&m, Mode::Prefill, &[Tensor::zeros(&[2, 3]), Tensor::zeros(&[1, 3])], &w, &Options::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape);
    assert!(e.node.as_deref().unwrap().contains("\"b\""), "{e}");
    let ok = run(&m, Mode::Prefill, &[Tensor::zeros(&[2, 3]), Tensor::zeros(&[2, 3])], &w, &Options::default()).unwrap();
    assert_eq!(ok[0].shape(), &[2, 3]);
}

#[test]
fn out_of_range_gather_is_an_error() {
    let mut g = Graph::new();
    let ids = g.input(0, "ids", i32t(&[B, S]), None);
    let table = g.param("embed", f32t(&[n(4), n(2)]), None);
    let e = op(&mut g, Op::Gather { axis: 0 }, &[table, ids]);
    g.ret(&[e.into()], None);
    let m = single(g);
    let w = weights(&[("embed", Tensor::from_fn(&[4, 2], |i| i as f32))]);
    let y = run(&m, Mode::Prefill, &[Tensor::i32(&[1, 2], vec![3, 1])], &w, &Options::default()).unwrap();
    assert_eq!(y[0].to_f32_vec(), vec![6.0, 7.0, 2.0, 3.0]);
    let err = run(&m, Mode::Prefill, &[Tensor::i32(&[1, 2], vec![3, 4])], &w, &Options::default()).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Index);
    assert_eq!(err.node.as_deref(), Some("%2 gather"), "{err}");
    // i64 ids are narrowed to the declared i32.
    let y = run(&m, Mode::Prefill, &[Tensor::i64(&[1, 1], vec![2])], &w, &Options::default()).unwrap();
    assert_eq!(y[0].to_f32_vec(), vec![4.0, 5.0]);
}

/// `layer(x, kc, vc) -> (x + attn, kc', vc')`: a cache-appending attention layer with
/// two params, called once per layer by `step(x, kc0, vc0, kc1, vc1)`.
fn cached_module() -> Module {
    let mut m = Module::new();
    let mut l = Function::new("layer");
    {
        let g = &mut l.graph;
        let x = g.input(0, "x", f32t(&[B, S, n(4)]), None);
        let kc = g.input(1, "k_cache", f32t(&[B, C, n(1), n(2)]), None);
        let vc = g.input(2, "v_cache", f32t(&[B, C, n(1), n(2)]), None);
        let wk = g.param("wk", f32t(&[n(2), n(4)]), None);
        let wq = g.param("wq", f32t(&[n(4), n(4)]), None);
        let q = op(g, Op::MatMul, &[x, wq]);
        let q = op(g, Op::Reshape { shape: Shape::from([B, S, n(2), n(2)]) }, &[q]);
        let k = op(g, Op::MatMul, &[x, wk]);
        let k = op(g, Op::Reshape { shape: Shape::from([B, S, n(1), n(2)]) }, &[k]);
        let k2 = op(g, Op::CacheAppend { axis: 1 }, &[kc, k]);
        let v2 = op(g, Op::CacheAppend { axis: 1 }, &[vc, k]);
        let att = Op::Attention { heads: 2, kv_heads: 1, scale: Float::new(0.5), causal: true, masked: false, lse: false };
        let a = op(g, att, &[q, k2, v2]);
        let a = op(g, Op::Reshape { shape: Shape::from([B, S, n(4)]) }, &[a]);
        let y = op(g, Op::Binary(BinaryOp::Add), &[x, a]);
        g.ret(&[y.into(), k2.into(), v2.into()], None);
    }
    let sig = l.graph.signature();
    m.add_function(l);
    let mut f = Function::new("step");
    {
        let g = &mut f.graph;
        let mut x: Value = g.input(0, "x", f32t(&[B, S, n(4)]), None).into();
        let mut outs = Vec::new();
        for layer in 0..2 {
            let kc = g.input(1 + 2 * layer, &format!("k{layer}"), f32t(&[B, C, n(1), n(2)]), None);
            let vc = g.input(2 + 2 * layer, &format!("v{layer}"), f32t(&[B, C, n(1), n(2)]), None);
            let c = g.call("layer", Some(layer), &sig, &[x, kc.into(), vc.into()], None).unwrap();
            x = c.out(0);
            outs.extend([c.out(1), c.out(2)]);
        }
        // The last position only: a symbolic slice.
        let last = g.add_inferred(Op::Slice { axis: 1, start: S - 1, len: n(1) }, &[x], None).unwrap();
        let mut rets = vec![last.into()];
        rets.extend(outs);
        g.ret(&rets, None);
    }
    m.add_function(f);
    m.set_entry(Mode::Prefill, "step");
    m.set_entry(Mode::Decode, "step");
    m
}

fn cached_weights() -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    for l in 0..2 {
        w.insert(param_path(Some(l as u32), "wk"), Tensor::from_fn(&[2, 4], |i| ((i + l * 3) % 5) as f32 / 5.0 - 0.3));
        w.insert(param_path(Some(l as u32), "wq"), Tensor::from_fn(&[4, 4], |i| ((i * 3 + l) % 7) as f32 / 7.0 - 0.4));
    }
    w
}

#[test]
fn calls_scope_params_and_caches_bind_c() {
    let m = cached_module();
    let w = cached_weights();
    let x = Tensor::from_fn(&[2, 3, 4], |i| ((i * 5) % 9) as f32 / 4.0 - 1.0);
    let empty = Tensor::zeros(&[2, 0, 1, 2]);
    let caches = vec![empty.clone(), empty.clone(), empty.clone(), empty];
    let mut args = vec![x.clone()];
    args.extend(caches);
    let full = run(&m, Mode::Prefill, &args, &w, &Options::default()).unwrap();
    assert_eq!(full[0].shape(), &[2, 1, 4]);
    assert_eq!(full[1].shape(), &[2, 3, 1, 2]);

    // Prefill two tokens, then decode the third through the caches: the same result.
    let first = layout::slice(&x, 1, 0, 2).unwrap();
    let third = layout::slice(&x, 1, 2, 1).unwrap();
    let mut args = vec![first];
    args.extend((0..4).map(|_| Tensor::zeros(&[2, 0, 1, 2])));
    let pre = run(&m, Mode::Prefill, &args, &w, &Options::default()).unwrap();
    let mut args = vec![third];
    args.extend(pre[1..].iter().cloned());
    let dec = run(&m, Mode::Decode, &args, &w, &Options::default()).unwrap();
    assert!(dec[0].allclose(&full[0], 1e-6, 1e-6), "{:?} vs {:?}", dec[0], full[0]);
    assert!(dec[3].allclose(&full[3], 1e-6, 1e-6));
    // The caches given to the run instead of lent (moved into the layer calls, appended
    // in place where the layout allows): the same results.
    let prepared = Prepared::new(&m, &Options::default()).unwrap();
    let given: Vec<Arg<'_>> = args.iter().enumerate().map(|(i, t)| if i == 0 { Arg::Lent(t) } else { Arg::Given(t.clone()) }).collect();
    assert_eq!(run_prepared_args(&m, &prepared, Mode::Decode, given, &w, &Options::default()).unwrap(), dec);

    // Layer-scoped names: without layer 1's weights the error names the full path and
    // the call site.
    let mut w1 = w.clone();
    let wq1 = param_path(Some(1), "wq");
    w1.remove(&wq1);
    let e = run(&m, Mode::Decode, &args, &w1, &Options::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::MissingWeight);
    assert!(e.message.contains(&format!("`{wq1}`")), "{e}");
    assert_eq!(e.function.as_deref(), Some("layer"));
    assert_eq!(e.calls.len(), 1);
    assert!(e.calls[0].contains("call layer layer=1"), "{e}");

    // A cache whose length disagrees between layers breaks `c`.
    let mut bad = args.clone();
    bad[3] = Tensor::zeros(&[2, 3, 1, 2]);
    bad[4] = Tensor::zeros(&[2, 3, 1, 2]);
    assert_eq!(run(&m, Mode::Decode, &bad, &w, &Options::default()).unwrap_err().kind, ErrorKind::Shape);
}

#[test]
fn named_arguments() {
    let m = cached_module();
    let w = cached_weights();
    let x = Tensor::from_fn(&[1, 2, 4], |i| i as f32 / 8.0);
    let z = Tensor::zeros(&[1, 0, 1, 2]);
    let named = [("x", &x), ("k0", &z), ("v0", &z), ("k1", &z), ("v1", &z)];
    let a = run_named(&m, Mode::Prefill, &named, &w, &Options::default()).unwrap();
    let b = run(&m, Mode::Prefill, &[x.clone(), z.clone(), z.clone(), z.clone(), z.clone()], &w, &Options::default()).unwrap();
    assert_eq!(a, b);
    let missing = run_named(&m, Mode::Prefill, &named[..4], &w, &Options::default()).unwrap_err();
    assert!(missing.message.contains("`v1`"), "{missing}");
    let extra = [("x", &x), ("k0", &z), ("v0", &z), ("k1", &z), ("v1", &z), ("y", &z)];
    assert_eq!(run_named(&m, Mode::Prefill, &extra, &w, &Options::default()).unwrap_err().kind, ErrorKind::Arguments);
}

#[test]
fn primitives_in_a_graph() {
    // top_k → gather by its indices → scatter_add back; permute, concat, select, cast,
    // batch_matmul; integer constants.
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t(&[B, n(6)]), None);
    let tk = op(&mut g, Op::TopK { k: 2, axis: 1 }, &[x]);
    let zero = g.constant(0.0, DType::F32, None);
    let gt = g.add_inferred(Op::Binary(BinaryOp::Lt), &[zero.into(), tk.out(0)], None).unwrap();
    let neg = op(&mut g, Op::Unary(UnaryOp::Neg), &[x]);
    let negk = g.add_inferred(Op::Slice { axis: 1, start: n(0), len: n(2) }, &[neg.into()], None).unwrap();
    let sel = g.add_inferred(Op::Select, &[gt.into(), tk.out(0), negk.into()], None).unwrap();
    let cat = op(&mut g, Op::Concat { axis: 1 }, &[sel, sel]);
    let idx = g.add_inferred(Op::Cast { to: DType::I64 }, &[tk.out(1)], None).unwrap();
    let one = g.constant(1.0, DType::I64, None);
    let idx1 = op(&mut g, Op::Binary(BinaryOp::Add), &[idx, one]);
    let t = op(&mut g, Op::Permute { perm: vec![1, 0] }, &[cat]);
    let r = op(&mut g, Op::Reshape { shape: Shape::from([n(1), n(4), B]) }, &[t]);
    let rt = op(&mut g, Op::Permute { perm: vec![0, 2, 1] }, &[r]);
    let bm = op(&mut g, Op::BatchMatMul, &[r, rt]);
    g.ret(&[cat.into(), idx1.into(), bm.into()], None);
    let m = single(g);
    let x = Tensor::f32(&[2, 6], vec![0.5, -1.0, 3.0, 2.0, -7.0, 0.0, -1.0, -2.0, -0.5, -3.0, -4.0, -6.0]);
    let out = run(&m, Mode::Prefill, &[x], &HashMap::new(), &Options::default()).unwrap();
    // Row 0: top-2 = 3 (2), 2 (3), both positive. Row 1: -0.5 (2), -1 (0), neither
    // positive, so -x[.., :2] = 1, 2.
    assert_eq!(out[0].to_f32_vec(), vec![3.0, 2.0, 3.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    assert_eq!(out[1].as_i64().unwrap(), &[3, 4, 3, 1]);
    let c = &out[0];
    let bm = &out[2];
    assert_eq!(bm.shape(), &[1, 4, 4]);
    for i in 0..4 {
        for j in 0..4 {
            let want: f64 = (0..2).map(|b| c.get(&[b, i]).unwrap() * c.get(&[b, j]).unwrap()).sum();
            assert_eq!(bm.get(&[0, i, j]), Some(want));
        }
    }
}

#[test]
fn recursion_and_malformed_graphs_are_errors() {
    // A function that calls itself (the verifier's M2 rejects this; without it the
    // interpreter still refuses instead of overflowing its stack).
    let mut m = Module::new();
    let mut f = Function::new("f");
    let x = f.graph.input(0, "x", f32t(&[n(1)]), None);
    let c = f.graph.add(Op::Call { function: "f".into(), layer: None }, &[x.into()], vec![f32t(&[n(1)])], None);
    f.graph.ret(&[c.into()], None);
    m.add_function(f);
    m.set_entry(Mode::Train, "f");
    let e = run(&m, Mode::Train, &[Tensor::zeros(&[1])], &HashMap::new(), &Options::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Graph, "the verifier refuses it: {e}");
    let no_verify = Options { verify: false, ..Options::default() };
    let e = run(&m, Mode::Train, &[Tensor::zeros(&[1])], &HashMap::new(), &no_verify).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Graph);
    assert!(e.message.contains("calls itself"), "{e}");

    // A node whose declared type lies (built unchecked) is caught at run time.
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t(&[B, n(2)]), None);
    let y = g.add(Op::Unary(UnaryOp::Exp), &[x.into()], vec![f32t(&[B, n(3)])], None);
    g.ret(&[y.into()], None);
    let m = single(g);
    let e = run(&m, Mode::Prefill, &[Tensor::zeros(&[1, 2])], &HashMap::new(), &no_verify).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape);
    assert_eq!(e.node.as_deref(), Some("%1 exp"));
}

#[test]
fn dead_nodes_are_not_evaluated() {
    // A dead gather with an out-of-range index and a dead param without a weight.
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t(&[n(2)]), None);
    let p = g.param("unused", f32t(&[n(3), n(2)]), None);
    let bad = g.constant(9.0, DType::I32, None);
    op(&mut g, Op::Gather { axis: 0 }, &[p, bad]);
    let y = op(&mut g, Op::Unary(UnaryOp::Square), &[x]);
    g.ret(&[y.into(), y.into(), x.into()], None);
    let m = single(g);
    let out = run(&m, Mode::Prefill, &[Tensor::f32(&[2], vec![3.0, -2.0])], &HashMap::new(), &Options::default()).unwrap();
    assert_eq!(out[0].to_f32_vec(), vec![9.0, 4.0]);
    assert_eq!(out[1], out[0]);
    assert_eq!(out[2].to_f32_vec(), vec![3.0, -2.0]);
}

/// `x · permute(W)ᵀ` where the permute reads only a weight: a prepared module keeps the
/// permuted weight between runs, and computes it again after `weights_changed` or for
/// another weights object; the answers are those of a fresh run each time.
#[test]
fn values_from_weights_alone_are_kept_until_the_weights_change() {
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t(&[B, n(2)]), None);
    let w = g.param("w", f32t(&[n(2), n(3)]), None);
    let wt = op(&mut g, Op::Permute { perm: vec![1, 0] }, &[w]);
    let y = op(&mut g, Op::MatMul, &[x, wt]);
    g.ret(&[y.into()], None);
    let m = single(g);
    let xs = Tensor::f32(&[1, 2], vec![1.0, 10.0]);
    let mut ws = weights(&[("w", Tensor::f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))]);
    let opts = Options::default();
    let prepared = Prepared::new(&m, &opts).unwrap();
    let go = |ws: &HashMap<String, Tensor>| run_prepared(&m, &prepared, Mode::Prefill, std::slice::from_ref(&xs), ws, &opts).unwrap();
    let fresh = |ws: &HashMap<String, Tensor>| run(&m, Mode::Prefill, std::slice::from_ref(&xs), ws, &opts).unwrap();
    assert_eq!(go(&ws), fresh(&ws));
    assert_eq!(go(&ws)[0].to_f32_vec(), vec![41.0, 52.0, 63.0]);
    ws.insert("w".into(), Tensor::f32(&[2, 3], vec![0.0; 6]));
    prepared.weights_changed();
    assert_eq!(go(&ws)[0].to_f32_vec(), vec![0.0; 3]);
    let other = weights(&[("w", Tensor::f32(&[2, 3], vec![1.0; 6]))]);
    assert_eq!(go(&other)[0].to_f32_vec(), vec![11.0; 3]);
    assert_eq!(go(&ws)[0].to_f32_vec(), vec![0.0; 3], "back to the first weights");
}

/// A decode step whose logits are not finite: the interpreter engine, which gave the
/// step its position-major cache (appended in place), rebuilds the cache from the step's
/// result and repeats the step with every value checked, naming the node.
#[test]
fn a_decode_step_with_non_finite_logits_names_the_node() {
    use crate::generate::{Engine, Interpreter, Value as EngineValue};
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t(&[B, S, n(2)]), None);
    let cache = g.input(1, "cache", f32t(&[C, B, n(2)]), None);
    let w = g.param("w", f32t(&[n(3), n(2)]), None);
    let new = op(&mut g, Op::Permute { perm: vec![1, 0, 2] }, &[x]);
    let grown = op(&mut g, Op::CacheAppend { axis: 0 }, &[cache, new]);
    let y = op(&mut g, Op::MatMul, &[x, w]);
    g.ret(&[y.into(), grown.into()], None);
    let mut m = Module::new();
    m.add_function(Function { name: "step".into(), graph: g });
    m.set_entry(Mode::Decode, "step");
    let mut ws = weights(&[("w", Tensor::f32(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))]);
    let engine = Interpreter::new(Options::default());
    let prepared = engine.prepare(&m, Mode::Decode).unwrap();
    let args =
        || vec![EngineValue::Host(Tensor::f32(&[1, 1, 2], vec![1.0, 1.0])), EngineValue::Host(Tensor::f32(&[2, 1, 2], vec![0.5; 4]))];
    let out = engine.run_values(&m, &prepared, Mode::Decode, args(), &[], &ws).unwrap();
    let grown = out[1].clone().into_host().unwrap();
    assert_eq!(grown.to_f32_vec(), vec![0.5, 0.5, 0.5, 0.5, 1.0, 1.0]);
    ws.insert("w".into(), Tensor::f32(&[3, 2], vec![1.0, f32::NAN, 3.0, 4.0, 5.0, 6.0]));
    engine.weights_changed();
    let e = engine.run_values(&m, &prepared, Mode::Decode, args(), &[], &ws).err().unwrap();
    assert!(e.contains("non-finite logits") && e.contains("param \"w\""), "{e}");
}

/// A decode step's attention over position-major caches (`[c, b, ..]`, appended along
/// axis 0, permuted batch-major and the key made of two caches side by side, as lowering
/// writes absorbed MLA) reads the caches in place instead of evaluating the permutes and
/// the concat, with the values of the same graph whose key and value are made contiguous
/// first (a cast in between stops the fold): in f32 (the few-row kernels, f32 and bf16
/// caches) and in f64 (the general path), with a mask.
#[test]
fn attention_reads_position_major_caches_in_place() {
    let graph = |contiguous: bool, masked: bool| {
        let mut g = Graph::new();
        let q = g.input(0, "q", f32t(&[B, n(1), n(4), n(6)]), None);
        let lc = g.input(1, "latent", f32t(&[C, B, n(4)]), None);
        let rc = g.input(2, "rope", f32t(&[C, B, n(2)]), None);
        let nl = g.input(3, "new_latent", f32t(&[n(1), B, n(4)]), None);
        let nr = g.input(4, "new_rope", f32t(&[n(1), B, n(2)]), None);
        let a1 = op(&mut g, Op::CacheAppend { axis: 0 }, &[lc, nl]);
        let a2 = op(&mut g, Op::CacheAppend { axis: 0 }, &[rc, nr]);
        let p1 = op(&mut g, Op::Permute { perm: vec![1, 0, 2] }, &[a1]);
        let p2 = op(&mut g, Op::Permute { perm: vec![1, 0, 2] }, &[a2]);
        let r1 = op(&mut g, Op::Reshape { shape: Shape::from([B, C + 1, n(1), n(4)]) }, &[p1]);
        let r2 = op(&mut g, Op::Reshape { shape: Shape::from([B, C + 1, n(1), n(2)]) }, &[p2]);
        let mut k = op(&mut g, Op::Concat { axis: 3 }, &[r1, r2]);
        let mut v = r1;
        if contiguous {
            k = op(&mut g, Op::Cast { to: DType::F32 }, &[k]);
            v = op(&mut g, Op::Cast { to: DType::F32 }, &[v]);
        }
        let mut ins = vec![q, k, v];
        if masked {
            ins.push(g.input(5, "mask", f32t(&[B, n(1), C + 1]), None));
        }
        let att = Op::Attention { heads: 4, kv_heads: 1, scale: Float::new(0.4), causal: true, masked, lse: false };
        let a = op(&mut g, att, &ins);
        g.ret(&[a.into(), a1.into(), a2.into()], None);
        single(g)
    };
    let fill = |shape: &[usize], seed: usize| Tensor::from_fn(shape, |i| (((i * 7 + seed * 13) % 23) as f32 / 11.5 - 1.0) * 0.9);
    for (b, c) in [(1, 6), (3, 5)] {
        let mut args = vec![fill(&[b, 1, 4, 6], 1), fill(&[c, b, 4], 2), fill(&[c, b, 2], 3), fill(&[1, b, 4], 4), fill(&[1, b, 2], 5)];
        for masked in [false, true] {
            if masked {
                args.push(fill(&[b, 1, c + 1], 6));
            }
            let (folded, plain) = (graph(false, masked), graph(true, masked));
            let f = &folded.functions[0];
            assert_eq!(interp::Schedule::of(f).unwrap().folded(&f.graph), (1, 0), "the folded graph evaluates no permute");
            let p = &plain.functions[0];
            assert_eq!(interp::Schedule::of(p).unwrap().folded(&p.graph), (0, 2));
            for opts in [Options::default(), f64_opts()] {
                let want = run(&plain, Mode::Prefill, &args, &HashMap::new(), &opts).unwrap();
                let got = run(&folded, Mode::Prefill, &args, &HashMap::new(), &opts).unwrap();
                assert_eq!(got[1..], want[1..]);
                assert!(got[0].allclose(&want[0], 1e-6, 1e-6), "b={b} masked={masked}: {:?} vs {:?}", got[0], want[0]);
            }
            // Caches held in bf16: read as they are, the same values as widened first.
            let mut bf = args.clone();
            for t in &mut bf[1..3] {
                *t = crate::reference::elementwise::round_bf16::<f32>(t).unwrap();
            }
            let widened: Vec<Tensor> =
                bf.iter().map(|t| crate::reference::elementwise::widen_bf16::<f32>(t).unwrap_or_else(|| t.clone())).collect();
            let want = run(&plain, Mode::Prefill, &widened, &HashMap::new(), &Options::default()).unwrap();
            let got = run(&folded, Mode::Prefill, &bf, &HashMap::new(), &Options::default()).unwrap();
            assert!(got[0].allclose(&want[0], 1e-6, 1e-6), "bf16 b={b} masked={masked}");
        }
    }
}
