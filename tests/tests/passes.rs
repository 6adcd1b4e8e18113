//! Per-pass before/after cases, in the style of rustc's `mir-opt` tests: for every pass in
//! the registry, a small input (a hand-built graph, or a tiny inline spec lowered for one
//! mode with the passes it normally follows already applied), the single pass run once,
//! and the IR before and after stored as one snapshot in `golden/passes/<pass>/<case>.snap`.
//!
//! A snapshot alone can be re-blessed without reading it, so each case also asserts the one
//! to three facts that make the pass correct (for `mla_absorb`: no per-head K/V over the
//! cache in decode, one shared KV head, the cache still latent + rope). A regression then
//! fails an assertion even when someone runs `INSTA_UPDATE=always`.
//!
//! Spans are not printed: the inputs are inline or hand-built, and a span change is not a
//! pass change.

use dsc_compiler::ir::{
    print_function, print_module, BinaryOp, DType, Dim, Function, Graph, Mode, Module, NodeId, Op, Operand, Shape, Sym, Ty, UnaryOp,
};
use dsc_compiler::lower::lower_mode;
use dsc_compiler::passes::mla_absorb::MlaMode;
use dsc_compiler::passes::{find_pass, pass_names, run_pipeline, Changed, PassCx, PassSelection, PipelineError};
use std::path::Path;

// ---------------------------------------------------------------- harness

/// Every pass the cases below cover. The first test fails when the registry gains a pass
/// this file does not know, so a new pass cannot ship without a case.
const COVERED: &[&str] = &[
    "verify",
    "shape_infer",
    "simplify",
    "mla_absorb",
    "mtp_strip",
    "autodiff",
    "cse",
    "dce",
    "decompose",
    "fuse_swiglu",
    "fuse_rope",
    "fuse_attention",
    "fuse_elementwise",
    "memory_plan",
];

#[test]
fn every_registered_pass_has_cases() {
    assert_eq!(pass_names(), COVERED);
}

/// Every pass switched on, the opt-in `decompose` included: a case names exactly the
/// passes it wants run.
fn everything() -> PassSelection {
    let mut sel = PassSelection::all();
    sel.enable("decompose").unwrap();
    sel
}

/// Run the named passes, in order, through the runner (so phases are checked and the
/// module is verified after each, as in a real compile).
fn run(m: &mut Module, names: &[&str], cx: &mut PassCx) -> Result<(), PipelineError> {
    let passes: Vec<_> = names.iter().map(|n| find_pass(n).unwrap_or_else(|| panic!("no pass `{n}`"))).collect();
    run_pipeline(m, &passes, &everything(), cx)
}

/// The snapshot of one case: the IR before, the IR after, and anything else the pass
/// produced (an error, a report).
fn before_after(before: &str, after: &str, extra: &[(&str, String)]) -> String {
    let mut s = format!("--- before\n{}\n--- after\n{}\n", before.trim_end(), after.trim_end());
    for (k, v) in extra {
        s.push_str(&format!("--- {k}\n{}\n", v.trim_end()));
    }
    s
}

/// Assert `text` against `golden/passes/<pass>/<case>.snap`.
fn snapshot(pass: &str, case: &str, text: String) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(format!("../../golden/passes/{pass}"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!(case.to_string(), text));
}

fn f32t(s: impl Into<Shape>) -> Ty {
    Ty::new(DType::F32, s)
}

fn n(v: i64) -> Dim {
    Dim::lit(v)
}

/// A module whose one function, `name`, is `mode`'s entry.
fn module_of(name: &str, g: Graph, mode: Mode) -> Module {
    let mut m = Module::new();
    m.add_function(Function { name: name.into(), graph: g });
    m.set_entry(mode, name);
    m
}

fn count(m: &Module, want: impl Fn(&Op) -> bool) -> usize {
    m.functions.iter().map(|f| f.graph.nodes().into_iter().filter(|&k| want(&f.graph.node(k).op)).count()).sum()
}

fn spec(text: &str) -> dsc_dsl::Spec {
    dsc_dsl::load_str(Path::new("inline.dsc"), text, None).unwrap_or_else(|f| panic!("{}", f.render()))
}

/// The one layer function of a one-layer model (the part worth reading in a snapshot).
fn layer(m: &Module) -> &Function {
    let mut layers = m.functions.iter().filter(|f| f.name.contains(".layer."));
    let f = layers.next().expect("no layer function");
    assert!(layers.next().is_none(), "more than one layer function");
    f
}

/// One dense layer of Llama-style attention (MHA, half-split RoPE, SwiGLU) at toy sizes.
const LLAMA: &str = "model toy_llama {
  vocab = 16
  hidden = 8
  layers = 1
  dtype = f32
  norm_eps = 1e-6
  attention mha { heads = 2, head_dim = 4 }
  rope { theta = 10000, layout = half_split }
  ffn dense { layers = 0.., intermediate = 8 }
}";

/// One dense MLA layer at toy sizes, every head dim different so a mixed-up axis shows.
const MLA: &str = "model toy_mla {
  vocab = 16
  hidden = 8
  layers = 1
  dtype = f32
  norm_eps = 1e-6
  attention mla {
    heads = 2
    q_lora_rank = 6
    kv_lora_rank = 5
    qk_nope_head_dim = 3
    qk_rope_head_dim = 2
    v_head_dim = 4
    latent_norm_eps = 1e-6
  }
  rope { theta = 10000, layout = interleaved }
  ffn dense { layers = 0.., intermediate = 8 }
}";

/// `text` lowered for `mode`, with `prefix` run over it.
fn lowered(text: &str, mode: Mode, prefix: &[&str], cx: &mut PassCx) -> Module {
    let mut m = lower_mode(&spec(text), mode).unwrap_or_else(|e| panic!("{e}"));
    run(&mut m, prefix, cx).unwrap_or_else(|e| panic!("{e}"));
    m
}

/// What precedes the fusion passes in the inference pipeline.
const BEFORE_FUSION: &[&str] = &["verify", "shape_infer", "simplify", "mla_absorb", "mtp_strip", "cse", "dce"];

// ---------------------------------------------------------------- verify, shape_infer

/// A graph with one bad node: `add` given one operand. The verifier must reject it and
/// say which node.
#[test]
fn verify_rejects_a_wrong_arity_and_names_the_node() {
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
    let bad = g.add(Op::Binary(BinaryOp::Add), &[x.into()], vec![f32t([Dim::B, n(4)])], None);
    g.ret(&[bad.into()], None);
    let mut m = module_of("prefill", g, Mode::Prefill);
    let before = print_module(&m, None);
    let err = run(&mut m, &["verify"], &mut PassCx::new(Mode::Prefill)).unwrap_err();
    let PipelineError::Failed { pass: "verify", error } = &err else { panic!("{err}") };
    // The one fact: the error is located at the bad node, in its function.
    assert!(error.problems.iter().any(|p| p.node == Some(bad) && p.function == "prefill"), "{error}");
    snapshot("verify", "wrong_arity", before_after(&before, &print_module(&m, None), &[("error", error.to_string())]));
}

/// `exp` declared `[b,5]` over a `[b,4]` input: its shape rule disagrees, which shape
/// inference must report at that node. (The verifier rejects it too; shape inference is
/// run alone here so that its own check is what is tested.)
#[test]
fn shape_infer_rejects_a_disagreeing_type_and_names_the_node() {
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
    let bad = g.add(Op::Unary(UnaryOp::Exp), &[x.into()], vec![f32t([Dim::B, n(5)])], None);
    g.ret(&[bad.into()], None);
    let mut m = module_of("prefill", g, Mode::Prefill);
    let before = print_module(&m, None);
    let err = run(&mut m, &["shape_infer"], &mut PassCx::new(Mode::Prefill)).unwrap_err();
    let PipelineError::Failed { pass: "shape_infer", error } = &err else { panic!("{err}") };
    assert!(error.problems.iter().any(|p| p.node == Some(bad) && p.function == "prefill"), "{error}");
    snapshot("shape_infer", "disagreeing_type", before_after(&before, &print_module(&m, None), &[("error", error.to_string())]));
}

/// A node built without output types gets them from its shape rule.
#[test]
fn shape_infer_fills_in_missing_types() {
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
    let w = g.param("w", f32t([n(3), n(4)]), None);
    let y = g.add(Op::MatMul, &[x.into(), w.into()], vec![], None);
    g.ret(&[y.into()], None);
    let mut m = module_of("prefill", g, Mode::Prefill);
    let before = print_module(&m, None);
    let mut cx = PassCx::new(Mode::Prefill);
    // No `verify` first: an untyped node is what shape inference exists to fill in.
    cx.verify_each = false;
    run(&mut m, &["shape_infer"], &mut cx).unwrap();
    let g = &m.functions[0].graph;
    assert_eq!(g.node(y).ty().shape.to_string(), "[b,3]");
    assert_eq!(m.functions[0].graph.signature().outputs[0].shape.to_string(), "[b,3]");
    snapshot("shape_infer", "fills_in_types", before_after(&before, &print_module(&m, None), &[]));
}

// ---------------------------------------------------------------- simplify

/// One chain that gives every rule category something to do: arithmetic identities,
/// double negation, reshape and permute round trips, a no-op cast, a whole-axis slice and
/// a one-input concat. All of it is the identity, so the function must collapse to
/// `return x`.
#[test]
fn simplify_fires_every_rule_category() {
    let t = f32t([Dim::B, n(4)]);
    let mut g = Graph::new();
    let x = g.input(0, "x", t.clone(), None);
    let one = g.constant(1.0, DType::F32, None);
    let zero = g.constant(0.0, DType::F32, None);
    let mut v: NodeId = g.add_inferred(Op::Binary(BinaryOp::Mul), &[x.into(), one.into()], None).unwrap();
    v = g.add_inferred(Op::Binary(BinaryOp::Add), &[v.into(), zero.into()], None).unwrap();
    v = g.add_inferred(Op::Unary(UnaryOp::Neg), &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Unary(UnaryOp::Neg), &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Reshape { shape: [Dim::B, n(2), n(2)].into() }, &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Reshape { shape: [Dim::B, n(4)].into() }, &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Permute { perm: vec![1, 0] }, &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Permute { perm: vec![1, 0] }, &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Cast { to: DType::F32 }, &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Slice { axis: 1, start: n(0), len: n(4) }, &[v.into()], None).unwrap();
    v = g.add_inferred(Op::Concat { axis: 1 }, &[v.into()], None).unwrap();
    g.ret(&[v.into()], None);
    let mut m = module_of("prefill", g, Mode::Prefill);
    let before = print_module(&m, None);
    let mut cx = PassCx::new(Mode::Prefill);
    run(&mut m, &["verify", "shape_infer", "simplify"], &mut cx).unwrap();
    let report = cx.reports.iter().find(|r| r.pass == "simplify").map(|r| r.text.clone()).unwrap_or_default();
    for rule in ["mul_one", "add_zero", "neg_neg", "reshape_", "permute_", "cast_same", "slice_whole_axis", "concat_one"] {
        assert!(report.contains(rule), "`{rule}` did not fire: {report}");
    }
    // Everything was an identity: the result is the argument itself.
    let g = &m.functions[0].graph;
    assert_eq!(g.inputs(g.return_node().unwrap())[0].node, x);
    snapshot("simplify", "every_rule_category", before_after(&before, &print_module(&m, None), &[("report", report)]));
}

// ---------------------------------------------------------------- mla_absorb

/// Whether a type is per-head over the key positions, `[b, c+1, heads, ·]`.
fn per_head_over_cache(t: &Ty, heads: i64) -> bool {
    t.rank() == 4 && t.shape[1].coeff(Sym::Cache) == 1 && t.shape[2].is(heads)
}

/// (nodes building a per-head tensor over the cache, whether kv_b_proj multiplies the
/// cache, the attention's (heads, kv_heads)).
fn mla_facts(f: &Function) -> (usize, bool, Option<(u32, u32)>) {
    let g = &f.graph;
    let expands = g.nodes().into_iter().filter(|&k| g.node(k).outputs.iter().any(|t| per_head_over_cache(t, 2))).count();
    let kv_b_over_cache = g.nodes().into_iter().any(|k| {
        g.node(k).op == Op::MatMul
            && g.inputs(k).iter().any(|v| matches!(&g.node(v.node).op, Op::Param { name } if name == "self_attn.kv_b_proj.weight"))
            && g.ty(g.inputs(k)[0]).shape.iter().any(|d| d.coeff(Sym::Cache) == 1)
    });
    let att = g.nodes().into_iter().find_map(|k| match g.node(k).op {
        Op::Attention { heads, kv_heads, .. } => Some((heads, kv_heads)),
        _ => None,
    });
    (expands, kv_b_over_cache, att)
}

#[test]
fn mla_absorb_keeps_decode_in_the_latent() {
    let mut cx = PassCx::new(Mode::Decode);
    cx.mla = MlaMode::Absorb;
    let mut m = lowered(MLA, Mode::Decode, &["verify", "shape_infer", "simplify"], &mut cx);
    let before = print_function(layer(&m), None);
    // The input really is the decompressed form, so the facts below are not vacuous.
    assert_eq!(mla_facts(layer(&m)), (5, true, Some((2, 2))));
    run(&mut m, &["mla_absorb"], &mut cx).unwrap();
    // 1. No per-head K or V over the cache, and kv_b_proj never multiplies the cache.
    // 2. Attention reads one shared (latent) KV head.
    assert_eq!(mla_facts(layer(&m)), (0, false, Some((2, 1))));
    // 3. The cache arguments are still exactly latent + rope.
    let sig = m.entry(Mode::Decode).unwrap().graph.signature();
    let caches: Vec<String> = sig.inputs[2..].iter().map(|t| t.shape.to_string()).collect();
    assert_eq!(caches, ["[c,b,5]", "[c,b,2]"]);
    snapshot("mla_absorb", "decode_one_layer", before_after(&before, &print_function(layer(&m), None), &[]));
}

// ---------------------------------------------------------------- mtp_strip

/// A hand-built inference entry that calls an MTP module: the check must fail at the call.
#[test]
fn mtp_strip_rejects_an_inference_entry_reaching_mtp() {
    let t = f32t([Dim::B, n(4)]);
    let mut mtp = Graph::new();
    let h = mtp.input(0, "h", t.clone(), None);
    let e = mtp.add_inferred(Op::Unary(UnaryOp::Exp), &[h.into()], None).unwrap();
    mtp.ret(&[e.into()], None);
    let mut m = Module::new();
    m.add_function(Function { name: "train.mtp.1".into(), graph: mtp });
    let sig = m.signature("train.mtp.1").unwrap();
    let mut g = Graph::new();
    let x = g.input(0, "x", t, None);
    let call = g.call("train.mtp.1", None, &sig, &[x.into()], None).unwrap();
    g.ret(&[call.into()], None);
    m.add_function(Function { name: "prefill".into(), graph: g });
    m.set_entry(Mode::Prefill, "prefill");
    let before = print_module(&m, None);
    let err = run(&mut m, &["verify", "mtp_strip"], &mut PassCx::new(Mode::Prefill)).unwrap_err();
    let PipelineError::Failed { pass: "mtp_strip", error } = &err else { panic!("{err}") };
    assert!(error.problems.iter().any(|p| p.node == Some(call) && p.function == "prefill"), "{error}");
    snapshot("mtp_strip", "entry_calls_mtp", before_after(&before, &print_module(&m, None), &[("error", error.to_string())]));
}

/// Functions reachable from `entry`, sorted.
fn reachable(m: &Module, entry: &str) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![entry.to_string()];
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let f = m.function(&name).unwrap();
        for k in f.graph.nodes() {
            if let Op::Call { function, .. } = &f.graph.node(k).op {
                todo.push(function.clone());
            }
        }
    }
    seen.into_iter().collect()
}

/// tiny_v3 has an MTP module: lowered for every mode, the pass accepts it (train may
/// reach MTP, inference does not) and changes nothing. The snapshot is the call graph.
#[test]
fn mtp_strip_accepts_tiny_v3() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_v3.dsc");
    let spec = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()));
    let mut m = dsc_compiler::lower::lower(&spec).unwrap();
    let graph = |m: &Module| {
        let mut s = String::new();
        for mode in Mode::ALL {
            let name = &m.entries[&mode];
            s.push_str(&format!("{mode}: {}\n", reachable(m, name).join(" ")));
        }
        s
    };
    let before = graph(&m);
    let mut cx = PassCx::new(Mode::Prefill);
    run(&mut m, &["verify", "mtp_strip"], &mut cx).unwrap();
    assert_eq!(cx.timings.last().map(|t| t.changed), Some(Changed::No));
    // The check is not vacuous: train reaches an MTP module; prefill and decode do not.
    assert!(reachable(&m, &m.entries[&Mode::Train]).iter().any(|f| f.contains(".mtp.")));
    for mode in [Mode::Prefill, Mode::Decode] {
        assert!(reachable(&m, &m.entries[&mode]).iter().all(|f| !f.contains(".mtp.")), "{mode}");
    }
    snapshot("mtp_strip", "tiny_v3_call_graph", before_after(&before, &graph(&m), &[]));
}

// ---------------------------------------------------------------- cse, dce

/// `x·w + x·w` with the product computed twice. (A param may be declared only once per
/// function, so the duplicate is the matmul.)
#[test]
fn cse_merges_a_duplicated_projection() {
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
    let w = g.param("w", f32t([n(4), n(4)]), None);
    let m1 = g.add_inferred(Op::MatMul, &[x.into(), w.into()], None).unwrap();
    let m2 = g.add_inferred(Op::MatMul, &[x.into(), w.into()], None).unwrap();
    let s = g.add_inferred(Op::Binary(BinaryOp::Add), &[m1.into(), m2.into()], None).unwrap();
    g.ret(&[s.into()], None);
    let mut m = module_of("prefill", g, Mode::Prefill);
    let before = print_module(&m, None);
    let mut cx = PassCx::new(Mode::Prefill);
    run(&mut m, &["verify", "shape_infer"], &mut cx).unwrap();
    assert_eq!(count(&m, |op| *op == Op::MatMul), 2);
    run(&mut m, &["cse"], &mut cx).unwrap();
    assert_eq!(count(&m, |op| *op == Op::MatMul), 1);
    // The add now reads one product twice.
    let g = &m.functions[0].graph;
    let ins = g.inputs(s);
    assert_eq!(ins[0], ins[1]);
    snapshot("cse", "duplicated_projection", before_after(&before, &print_module(&m, None), &[]));
}

/// The one-layer MLA model's train entry: the layer gets a backward function, the
/// forward returns what that backward reads, and the entry takes a cotangent per loss
/// term and returns every param's gradient. With `recompute = layer` the forward keeps
/// nothing but its arguments.
#[test]
fn autodiff_adds_a_backward_per_layer() {
    let mut cx = PassCx::new(Mode::Train);
    let mut m = lowered(MLA, Mode::Train, &["verify", "shape_infer"], &mut cx);
    let before = print_module(&m, None);
    run(&mut m, &["autodiff"], &mut cx).unwrap();
    let grads = m.gradients.clone().expect("differentiated");
    // loss, mtp_loss (0: no MTP), aux_loss (0: no MoE) → one cotangent, for the loss.
    assert_eq!((grads.results, grads.seeds.clone()), (3, vec![0]));
    let layer_params = m.function("train.layer.dense").unwrap().graph.nodes().into_iter();
    let n_params = layer_params.filter(|&k| matches!(m.function("train.layer.dense").unwrap().graph.node(k).op, Op::Param { .. })).count();
    // Every layer param, the embedding, the final norm and the head.
    assert_eq!(grads.params.len(), n_params + 3);
    let bwd = m.function("train.layer.dense.bwd").expect("a backward function");
    assert_eq!(count(&m, |op| matches!(op, Op::AttentionGrad { .. })), 1);
    assert_eq!(count(&m, |op| matches!(op, Op::Attention { lse: true, .. })), 1);
    let saved_all = m.signature("train.layer.dense").unwrap().outputs.len() - 1;
    assert!(saved_all > 5, "the forward returns its residuals");
    assert!(bwd.graph.len() > m.function("train.layer.dense").unwrap().graph.len() / 2);
    snapshot("autodiff", "mla_layer", before_after(&before, &print_module(&m, None), &[]));

    let mut cx = PassCx::new(Mode::Train);
    cx.train.recompute = dsc_compiler::passes::autodiff::Recompute::Layer;
    let mut m = lowered(MLA, Mode::Train, &["verify", "shape_infer", "autodiff"], &mut cx);
    assert_eq!(m.signature("train.layer.dense").unwrap().outputs.len(), 1, "recompute = layer keeps nothing");
    let _ = &mut m;
}

/// A dead node in the entry and a function nothing calls.
#[test]
fn dce_removes_a_dead_node_and_an_unreachable_function() {
    let t = f32t([Dim::B, n(4)]);
    let mut unused = Graph::new();
    let h = unused.input(0, "h", t.clone(), None);
    unused.ret(&[h.into()], None);
    let mut g = Graph::new();
    let x = g.input(0, "x", t, None);
    let e = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
    g.add_inferred(Op::Unary(UnaryOp::Neg), &[x.into()], None).unwrap();
    g.ret(&[e.into()], None);
    let mut m = module_of("prefill", g, Mode::Prefill);
    m.add_function(Function { name: "unused".into(), graph: unused });
    let before = print_module(&m, None);
    run(&mut m, &["verify", "shape_infer", "dce"], &mut PassCx::new(Mode::Prefill)).unwrap();
    assert_eq!(count(&m, |op| *op == Op::Unary(UnaryOp::Neg)), 0);
    assert!(m.function("unused").is_none());
    assert_eq!(count(&m, |op| *op == Op::Unary(UnaryOp::Exp)), 1, "the live node stays");
    snapshot("dce", "dead_node_and_function", before_after(&before, &print_module(&m, None), &[]));
}

// ---------------------------------------------------------------- decompose and the fusers

/// The toy Llama layer in prefill, through the passes before fusion.
fn llama_prefill(cx: &mut PassCx) -> Module {
    lowered(LLAMA, Mode::Prefill, BEFORE_FUSION, cx)
}

#[test]
fn decompose_leaves_only_the_kept_composites() {
    let mut cx = PassCx::new(Mode::Prefill);
    let mut m = llama_prefill(&mut cx);
    let before = print_function(layer(&m), None);
    assert!(count(&m, |op| op.is_composite() && !matches!(op, Op::ExpertFfn | Op::CacheAppend { .. })) > 0);
    run(&mut m, &["decompose"], &mut cx).unwrap();
    let left: Vec<&str> = m
        .functions
        .iter()
        .flat_map(|f| {
            f.graph.nodes().into_iter().map(|k| &f.graph.node(k).op).filter(|op| op.is_composite()).map(|op| op.name()).collect::<Vec<_>>()
        })
        .collect();
    assert!(left.iter().all(|op| ["expert_ffn", "cache_append"].contains(op)), "{left:?}");
    snapshot("decompose", "llama_layer_prefill", before_after(&before, &print_function(layer(&m), None), &[]));
}

/// A fuser after `decompose` (and after the fusers that precede it in the pipeline)
/// re-forms exactly as many of its composite as the undecomposed module had.
fn refuses(pass: &str, earlier: &[&str], is: fn(&Op) -> bool) {
    let mut cx = PassCx::new(Mode::Prefill);
    let original = count(&llama_prefill(&mut PassCx::new(Mode::Prefill)), is);
    assert!(original > 0, "{pass}: nothing to re-form");
    let mut m = llama_prefill(&mut cx);
    run(&mut m, &[&["decompose"][..], earlier].concat(), &mut cx).unwrap();
    assert_eq!(count(&m, is), 0, "{pass}: decompose left one");
    let before = print_function(layer(&m), None);
    run(&mut m, &[pass], &mut cx).unwrap();
    assert_eq!(count(&m, is), original, "{pass}: re-formed count");
    snapshot(pass, "after_decompose", before_after(&before, &print_function(layer(&m), None), &[]));
}

#[test]
fn fuse_swiglu_reforms_every_swiglu() {
    refuses("fuse_swiglu", &[], |op| *op == Op::SwiGlu);
}

#[test]
fn fuse_rope_reforms_every_rope() {
    refuses("fuse_rope", &["fuse_swiglu"], |op| matches!(op, Op::Rope { .. }));
}

#[test]
fn fuse_attention_reforms_every_attention() {
    refuses("fuse_attention", &["fuse_swiglu", "fuse_rope"], |op| matches!(op, Op::Attention { .. }));
}

#[test]
fn fuse_elementwise_fuses_single_user_chains() {
    let mut cx = PassCx::new(Mode::Prefill);
    let mut m = llama_prefill(&mut cx);
    run(&mut m, &["fuse_swiglu", "fuse_rope", "fuse_attention"], &mut cx).unwrap();
    let before = print_function(layer(&m), None);
    let elementwise = |m: &Module| count(m, |op| op.is_elementwise());
    let was = elementwise(&m);
    run(&mut m, &["fuse_elementwise"], &mut cx).unwrap();
    let kernels: Vec<_> = m
        .functions
        .iter()
        .flat_map(|f| {
            f.graph
                .nodes()
                .into_iter()
                .filter_map(|k| if let Op::Fused(kernel) = &f.graph.node(k).op { Some(kernel.clone()) } else { None })
        })
        .collect();
    assert!(!kernels.is_empty(), "nothing fused");
    // Each elementwise node removed is one step of a kernel: none lost, none duplicated.
    let steps: usize = kernels.iter().map(|k| k.steps.len()).sum();
    assert!(elementwise(&m) < was);
    assert_eq!(was - elementwise(&m), steps);
    // No intermediate of a kernel has two users: only the result leaves it, once.
    for k in &kernels {
        let result = k.result();
        let inner = (0..k.steps.len() as u16).map(Operand::Step).chain(k.head.map(|_| Operand::Head));
        for o in inner.filter(|&o| o != result) {
            assert_eq!(k.readers(o), 1, "{o:?} in {k:?}");
        }
    }
    snapshot("fuse_elementwise", "llama_layer_prefill", before_after(&before, &print_function(layer(&m), None), &[]));
}

// ---------------------------------------------------------------- memory_plan

/// The chain of the pass's doc comment, `return exp(exp(exp(x)))` over `f32[b,4]` at
/// b = 1: three 16-byte values, at most two live at once (an op never writes over its
/// input), so two buffers, 32 bytes.
#[test]
fn memory_plan_of_a_hand_checked_chain() {
    let mut g = Graph::new();
    let x = g.input(0, "x", f32t([Dim::B, n(4)]), None);
    let mut v = x;
    for _ in 0..3 {
        v = g.add_inferred(Op::Unary(UnaryOp::Exp), &[v.into()], None).unwrap();
    }
    g.ret(&[v.into()], None);
    let mut m = module_of("prefill", g, Mode::Prefill);
    let before = print_module(&m, None);
    let mut cx = PassCx::new(Mode::Prefill);
    run(&mut m, &["verify", "shape_infer", "memory_plan"], &mut cx).unwrap();
    let plan = cx.memory_plan.as_ref().unwrap();
    assert_eq!((plan.peak_live_bytes(), plan.allocated_bytes()), (32, 32), "{}", plan.summary());
    assert_eq!((plan.buffers_before(), plan.buffers_after()), (3, 2), "{}", plan.summary());
    assert_eq!(print_module(&m, None), before, "the plan changes nothing");
    snapshot("memory_plan", "exp_chain", before_after(&before, &print_module(&m, None), &[("plan", plan.summary())]));
}
