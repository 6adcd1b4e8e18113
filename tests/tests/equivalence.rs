//! Equivalence of every numerics-preserving pass, on the reference interpreter: for each
//! tiny spec in `specs/tiny/` and two odd-size variants written here (hidden 40, 5 heads,
//! odd intermediate sizes, partial RoPE, tied embeddings, two MTP modules), lower each
//! mode, bind random non-zero weights and random inputs, run the module before and after
//! each pass alone (`simplify`, `cse`, `dce`, `decompose`, each fusion pass, each fusion
//! pass after `decompose`) and after the full default pipeline (with and without
//! `+decompose`), and compare every output (in train mode, of the module autodiff made:
//! the losses and every gradient, for random cotangents): in `f32` within `1e-4 + 1e-4·|ref|`, in `f64`
//! within `1e-9 + 1e-9·|ref|`.
//!
//! Alongside the numbers, each pass's facts are asserted directly (no snapshots to
//! re-bless): after `decompose` no composite but the documented exceptions is left, and
//! decompose-then-fuse re-forms exactly as many `swiglu` / `rope` / `attention` nodes as
//! lowering made; `fuse_elementwise` leaves fewer elementwise nodes and every value inside
//! a kernel has exactly one reader; `simplify`, `cse` and `dce` never add nodes.
//!
//! Run with `--nocapture` to see the largest difference per pass and precision.

use dsc_compiler::ir::{Bindings, Mode, Module, Op, Operand, Ty};
use dsc_compiler::lower::lower_mode;
use dsc_compiler::passes::{find_pass, run_pipeline, Pass, PassCx, PassSelection};
use dsc_runtime::reference::{run, Options, Precision, Tensor};
use dsc_tests::{entry_params, random_weights, SplitMix64 as Rng};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Run sizes: two sequences of five tokens (prefill, train), one new token after three
/// cached ones (decode).
fn sizes(mode: Mode) -> Bindings {
    match mode {
        Mode::Prefill | Mode::Train => Bindings { batch: 2, seq: 5, cache: 0 },
        Mode::Decode => Bindings { batch: 2, seq: 1, cache: 3 },
    }
}

fn dims(t: &Ty, b: &Bindings) -> Vec<usize> {
    t.shape.eval(b).into_iter().map(|d| d as usize).collect()
}

/// Every weight the entry point reads, by full param path (see [`random_weights`]).
fn weights(m: &Module, mode: Mode, rng: &mut Rng) -> HashMap<String, Tensor> {
    random_weights(&entry_params(m, mode), rng)
}

/// The entry's arguments by index: token ids and labels in `0..vocab` (a fifth of the
/// labels −100, the ignore index), positions `c, c+1, ..`, caches `N(0, 1)`.
fn inputs(m: &Module, mode: Mode, vocab: u64, rng: &mut Rng) -> Vec<Tensor> {
    let b = sizes(mode);
    let g = &m.entry(mode).expect("entry").graph;
    g.arguments()
        .into_iter()
        .map(|n| {
            let node = g.node(n);
            let Op::Input { name, .. } = &node.op else { unreachable!() };
            let shape = dims(node.ty(), &b);
            let count: usize = shape.iter().product();
            match name.as_str() {
                "input_ids" => Tensor::i64(&shape, (0..count).map(|_| rng.below(vocab) as i64).collect()),
                "labels" => {
                    Tensor::i64(&shape, (0..count).map(|_| if rng.below(5) == 0 { -100 } else { rng.below(vocab) as i64 }).collect())
                }
                "positions" => Tensor::i64(&shape, (0..count).map(|i| (b.cache + (i as u64 % b.seq)) as i64).collect()),
                _ => Tensor::f32(&shape, (0..count).map(|_| rng.normal() as f32).collect()),
            }
        })
        .collect()
}

fn pass(name: &str) -> &'static dyn Pass {
    find_pass(name).unwrap_or_else(|| panic!("no pass `{name}`"))
}

/// `verify, shape_infer` and then `names`, with `decompose` allowed to run.
fn apply(m: &mut Module, mode: Mode, names: &[&str]) {
    let mut list: Vec<&dyn Pass> = vec![pass("verify"), pass("shape_infer")];
    list.extend(names.iter().map(|n| pass(n)));
    let mut cx = PassCx::new(mode);
    cx.sizes = sizes(mode);
    run_pipeline(m, &list, &PassSelection::parse("+decompose").unwrap(), &mut cx).unwrap_or_else(|e| panic!("{names:?}: {e}"));
}

/// Nodes over all functions whose op satisfies `f`.
fn count(m: &Module, f: impl Fn(&Op) -> bool) -> usize {
    m.functions.iter().map(|func| func.graph.nodes().into_iter().filter(|&n| f(&func.graph.node(n).op)).count()).sum()
}

fn nodes(m: &Module) -> usize {
    m.functions.iter().map(|f| f.graph.len()).sum()
}

/// What to run after lowering, and what must hold afterwards.
struct Variant {
    name: &'static str,
    /// Passes after verify + shape_infer; `None`: the mode's full pipeline.
    passes: Option<&'static [&'static str]>,
    /// `--passes` for the full pipeline.
    selection: &'static str,
}

const VARIANTS: &[Variant] = &[
    Variant { name: "simplify", passes: Some(&["simplify"]), selection: "" },
    Variant { name: "cse", passes: Some(&["cse"]), selection: "" },
    Variant { name: "dce", passes: Some(&["dce"]), selection: "" },
    Variant { name: "decompose", passes: Some(&["decompose"]), selection: "" },
    Variant { name: "fuse_swiglu", passes: Some(&["fuse_swiglu"]), selection: "" },
    Variant { name: "fuse_rope", passes: Some(&["fuse_rope"]), selection: "" },
    Variant { name: "fuse_attention", passes: Some(&["fuse_attention"]), selection: "" },
    Variant { name: "fuse_elementwise", passes: Some(&["fuse_elementwise"]), selection: "" },
    Variant { name: "decompose+fuse_swiglu", passes: Some(&["decompose", "fuse_swiglu"]), selection: "" },
    Variant { name: "decompose+fuse_rope", passes: Some(&["decompose", "fuse_rope"]), selection: "" },
    Variant { name: "decompose+fuse_attention", passes: Some(&["decompose", "fuse_attention"]), selection: "" },
    Variant { name: "decompose+fuse_elementwise", passes: Some(&["decompose", "fuse_elementwise"]), selection: "" },
    Variant { name: "pipeline", passes: None, selection: "" },
    Variant { name: "pipeline+decompose", passes: None, selection: "+decompose" },
];

/// The facts each variant must establish, checked on the module before and after.
fn check_facts(v: &Variant, before: &Module, after: &Module, what: &str) {
    let composite = |m: &Module, name: &str| count(m, |o| o.name() == name);
    let elementwise = |m: &Module| count(m, Op::is_elementwise);
    match v.name {
        "simplify" | "cse" | "dce" => assert!(nodes(after) <= nodes(before), "{what}: {} added nodes", v.name),
        "decompose" => {
            let left = count(after, |o| o.is_composite() && !dsc_compiler::passes::decompose::kept(o));
            assert_eq!(left, 0, "{what}: composites left after decompose");
            assert!(count(after, |o| matches!(o, Op::RopeFreqs { .. })) > 0, "{what}: no rope tables");
        }
        "decompose+fuse_swiglu" | "decompose+fuse_rope" | "decompose+fuse_attention" => {
            let op = &v.name["decompose+fuse_".len()..];
            assert_eq!(composite(after, op), composite(before, op), "{what}: every {op} re-formed");
            assert!(composite(before, op) > 0, "{what}: the spec has a {op}");
        }
        "fuse_elementwise" | "decompose+fuse_elementwise" | "pipeline" | "pipeline+decompose" => {
            if v.name == "fuse_elementwise" {
                assert!(elementwise(after) < elementwise(before), "{what}: no elementwise node was fused");
            }
            let mut kernels = 0;
            for f in &after.functions {
                for n in f.graph.nodes() {
                    let Op::Fused(k) = &f.graph.node(n).op else { continue };
                    kernels += 1;
                    assert!(k.len() >= 2, "{what}: a one-op kernel {k}");
                    let values = k.head.iter().map(|_| Operand::Head).chain((0..k.steps.len() as u16).map(Operand::Step));
                    for val in values.filter(|&o| o != k.result()) {
                        assert_eq!(k.readers(val), 1, "{what}: {val} of {k} has several readers");
                    }
                }
            }
            assert!(kernels > 0, "{what}: no kernel formed");
            if v.name == "pipeline+decompose" {
                for op in ["swiglu", "rope", "attention"] {
                    assert_eq!(composite(after, op), composite(before, op), "{what}: {op} re-formed in the pipeline");
                }
            }
        }
        _ => {}
    }
}

/// Largest `|a - b|` over the outputs, after checking `|a - b| <= tol·(1 + |ref|)`.
fn compare(reference: &[Tensor], got: &[Tensor], tol: f64, what: &str) -> f64 {
    assert_eq!(reference.len(), got.len(), "{what}: output count");
    let mut worst = 0.0f64;
    for (i, (r, g)) in reference.iter().zip(got).enumerate() {
        assert_eq!(r.shape(), g.shape(), "{what}: output {i} shape");
        assert!(g.allclose(r, tol, tol), "{what}: output {i} differs by {:?} (tolerance {tol})", g.max_abs_diff(r));
        worst = worst.max(g.max_abs_diff(r).unwrap_or(f64::INFINITY));
    }
    worst
}

/// All variants on one spec, every mode; prints the largest difference per variant.
fn check_spec(label: &str, spec: &dsc_dsl::Spec) {
    let vocab = spec.model.vocab;
    let mut table: BTreeMap<(&str, Mode), (f64, f64)> = BTreeMap::new();
    for mode in Mode::ALL {
        let what = format!("{label} {mode}");
        let mut lowered = lower_mode(spec, mode).unwrap_or_else(|e| panic!("{what}: {e}"));
        if mode == Mode::Train {
            // The passes after autodiff see the differentiated module: compare on it, so
            // every gradient (and the random cotangents' sum) is checked as well.
            apply(&mut lowered, mode, &["autodiff"]);
        }
        let mut rng = Rng(0x5eed ^ (mode as u64) << 8 ^ label.len() as u64);
        let w = weights(&lowered, mode, &mut rng);
        let args = inputs(&lowered, mode, vocab, &mut rng);
        let opts = |p| Options { precision: p, ..Options::default() };
        let args64: Vec<Tensor> = args.iter().map(Tensor::to_f64).collect();
        let exec = |m: &Module, p: Precision| {
            let a = if p == Precision::F64 { &args64 } else { &args };
            run(m, mode, a, &w, &opts(p)).unwrap_or_else(|e| panic!("{what}: {e}"))
        };
        let (ref32, ref64) = (exec(&lowered, Precision::F32), exec(&lowered, Precision::F64));
        assert!(ref32.iter().all(|t| t.to_f64_vec().iter().all(|x| x.is_finite())), "{what}: the reference is not finite");
        for v in VARIANTS {
            let mut m = lowered.clone();
            match v.passes {
                Some(names) => apply(&mut m, mode, names),
                None => {
                    let mut cx = PassCx::new(mode);
                    dsc_compiler::passes::compile(&mut m, &PassSelection::parse(v.selection).unwrap(), &mut cx)
                        .unwrap_or_else(|e| panic!("{what} {}: {e}", v.name));
                }
            }
            let what = format!("{what} after {}", v.name);
            check_facts(v, &lowered, &m, &what);
            let d32 = compare(&ref32, &exec(&m, Precision::F32), 1e-4, &what);
            let d64 = compare(&ref64, &exec(&m, Precision::F64), 1e-9, &what);
            table.insert((v.name, mode), (d32, d64));
        }
    }
    let mut out = format!("{label}: max |difference| per pass (f32 / f64)\n");
    for v in VARIANTS {
        let cells: Vec<String> = Mode::ALL
            .iter()
            .map(|&m| {
                let (a, b) = table[&(v.name, m)];
                format!("{m} {a:.1e} / {b:.1e}")
            })
            .collect();
        out.push_str(&format!("  {:<28} {}\n", v.name, cells.join("   ")));
    }
    println!("{out}");
}

fn tiny(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(name);
    let spec = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()));
    check_spec(name, &spec);
}

#[test]
fn tiny_llama() {
    tiny("tiny_llama.dsc");
}

#[test]
fn tiny_llama_gqa() {
    tiny("tiny_llama_gqa.dsc");
}

#[test]
fn tiny_moe() {
    tiny("tiny_moe.dsc");
}

#[test]
fn tiny_v2() {
    tiny("tiny_v2.dsc");
}

#[test]
fn tiny_v2_lite() {
    tiny("tiny_v2_lite.dsc");
}

#[test]
fn tiny_v3() {
    tiny("tiny_v3.dsc");
}

/// GQA with 5 query heads on one kv head (a group of 5), head dim 8 with only 6 dims
/// rotated, YaRN on interleaved pairs, odd FFN widths, softmax routing over 5 experts,
/// tied embeddings and two MTP modules.
const ODD_GQA: &str = r#"
model odd_gqa {
  vocab = 97
  hidden = 40
  layers = 3
  dtype = f32
  tie_embeddings = true
  norm_eps = 1e-5
  attention gqa { heads = 5, kv_heads = 1, head_dim = 8 }
  rope {
    theta = 500
    layout = interleaved
    yarn { factor = 4, original_context = 16, mscale = 0.9, mscale_all_dim = 0.5 }
  }
  ffn dense { layers = 0..1, intermediate = 37 }
  ffn moe {
    layers = 1..
    routed_experts = 5
    shared_experts = 1
    expert_intermediate = 11
    router { top_k = 2, scoring = softmax, normalize = always }
  }
  mtp { depth = 2, loss_weight = 0.3, concat = [hidden, embedding], ffn = dense }
}
"#;

/// MLA with 5 heads and no query compression, odd latent and head dims, sigmoid routing
/// with a selection bias over 3 groups of 3 experts (group score top-2 sum).
const ODD_MLA: &str = r#"
model odd_mla {
  vocab = 89
  hidden = 40
  layers = 2
  dtype = f32
  norm_eps = 1e-6
  attention mla {
    heads = 5
    q_lora_rank = none
    kv_lora_rank = 19
    qk_nope_head_dim = 7
    qk_rope_head_dim = 6
    v_head_dim = 9
  }
  rope { theta = 10000, layout = half_split }
  ffn dense { layers = 0..1, intermediate = 33 }
  ffn moe {
    layers = 1..
    routed_experts = 9
    shared_experts = 2
    expert_intermediate = 7
    router {
      top_k = 3
      scoring = sigmoid
      selection_bias = true
      groups = 3
      groups_kept = 2
      group_score = top2_sum
      normalize = always
      scale = 2.5
    }
  }
}
"#;

fn odd(name: &str, text: &str) {
    let spec = dsc_dsl::load_str(Path::new(name), text, None).unwrap_or_else(|f| panic!("{}", f.render()));
    check_spec(name, &spec);
}

#[test]
fn odd_gqa() {
    odd("odd_gqa.dsc", ODD_GQA);
}

#[test]
fn odd_mla() {
    odd("odd_mla.dsc", ODD_MLA);
}
