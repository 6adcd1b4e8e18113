//! Structure of the lowered modules: sizes stay small for DeepSeek-V3, each layer kind is
//! one function with one grouped expert op, caches have the documented shapes, MTP lives
//! only in training, params get checkpoint names, and every node points at the spec.

use super::*;
use crate::ir::{param_path, print_module, Float, Function, Graph, NodeId, Op, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn specs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs")
}

fn spec(file: &str) -> Spec {
    let path = specs_dir().join(file);
    dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{file}:\n{}", f.render()))
}

fn spec_str(text: &str) -> Spec {
    dsc_dsl::load_str(Path::new("inline.dsc"), text, None).unwrap_or_else(|f| panic!("{}", f.render()))
}

fn lowered(s: &Spec) -> Module {
    lower(s).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `.dsc` under `specs/`.
fn all_specs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "dsc") {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&specs_dir(), &mut v);
    v.sort();
    v
}

fn nodes_of<'a>(f: &'a Function, name: &'a str) -> impl Iterator<Item = NodeId> + 'a {
    f.graph.nodes().into_iter().filter(move |&n| f.graph.node(n).op.name() == name)
}

fn count(f: &Function, name: &str) -> usize {
    nodes_of(f, name).count()
}

/// `(callee, layer)` of every call in `f`, in insertion order.
fn calls(f: &Function) -> Vec<(String, Option<u32>)> {
    f.graph
        .nodes()
        .into_iter()
        .filter_map(|n| match &f.graph.node(n).op {
            Op::Call { function, layer } => Some((function.clone(), *layer)),
            _ => None,
        })
        .collect()
}

/// Full param names (scoped through calls) reached from `mode`'s entry, with types.
fn params(m: &Module, mode: Mode) -> Vec<(String, Ty)> {
    let entry = m.entry(mode).unwrap();
    let mut out = Vec::new();
    let mut collect = |f: &Function, layer: Option<u32>| {
        for n in nodes_of(f, "param") {
            let Op::Param { name } = &f.graph.node(n).op else { unreachable!() };
            out.push((param_path(layer, name), f.graph.node(n).ty().clone()));
        }
    };
    collect(entry, None);
    for (callee, layer) in calls(entry) {
        collect(m.function(&callee).unwrap(), layer);
    }
    out
}

fn input_types(g: &Graph) -> Vec<(String, Ty)> {
    g.arguments()
        .into_iter()
        .map(|n| match &g.node(n).op {
            Op::Input { name, .. } => (name.clone(), g.node(n).ty().clone()),
            _ => unreachable!(),
        })
        .collect()
}

fn n(v: u64) -> Dim {
    Dim::from(v)
}

#[test]
fn every_spec_lowers_and_verifies() {
    for path in all_specs() {
        let s = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}:\n{}", path.display(), f.render()));
        let m = lower(&s).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(verify(&m), Ok(()));
        for mode in Mode::ALL {
            assert_eq!(m.entry(mode).map(|f| f.name.as_str()), Some(mode.name()), "{}", path.display());
        }
    }
}

#[test]
fn deepseek_v3_stays_small() {
    let m = lowered(&spec("deepseek_v3.dsc"));
    let names: Vec<&str> = m.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "prefill.layer.dense",
            "prefill.layer.moe",
            "prefill",
            "decode.layer.dense",
            "decode.layer.moe",
            "decode",
            "train.layer.dense",
            "train.layer.moe",
            "train.mtp.1",
            "train"
        ]
    );
    let total: usize = m.functions.iter().map(|f| f.graph.len()).sum();
    assert!(total < 1500, "{total} nodes");
    for f in &m.functions {
        // A layer body is a few dozen nodes whatever the expert count (in training a MoE
        // body also computes its balance losses and expert loads: two dozen more).
        if f.name.contains(".layer.") || f.name.contains(".mtp.") {
            assert!(f.graph.len() < 100, "{}: {} nodes", f.name, f.graph.len());
        }
        let experts = count(f, "expert_ffn");
        let want = usize::from(f.name.ends_with(".moe") || f.name.starts_with("train.mtp."));
        assert_eq!(experts, want, "{}", f.name);
        assert_eq!(count(f, "moe_route"), want, "{}", f.name);
    }
    // The stacked expert weights: 256 experts are one param each.
    let moe = m.function("decode.layer.moe").unwrap();
    let p: Vec<_> =
        params(&m, Mode::Decode).into_iter().filter(|(name, _)| name == "model.layers.3.mlp.experts.down_proj.weight").collect();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, Ty::new(DType::Bf16, [n(256), n(7168), n(2048)]));
    assert_eq!(count(moe, "param"), 17, "{}", crate::ir::print_function(moe, None));
}

#[test]
fn calls_cover_every_layer_once_with_its_kind() {
    let m = lowered(&spec("deepseek_v3.dsc"));
    for mode in Mode::ALL {
        let c = calls(m.entry(mode).unwrap());
        let layers: Vec<_> = c.iter().filter(|(f, _)| f.contains(".layer.")).collect();
        assert_eq!(layers.len(), 61);
        for (i, (f, l)) in layers.iter().enumerate() {
            assert_eq!(*l, Some(i as u32));
            let kind = if i < 3 { "dense" } else { "moe" };
            assert_eq!(*f, format!("{mode}.layer.{kind}"));
        }
    }
    // tiny_moe: stepped layer sets, dense at 0 and 2.
    let m = lowered(&spec("tiny/tiny_moe.dsc"));
    let kinds: Vec<String> = calls(m.entry(Mode::Prefill).unwrap()).into_iter().map(|(f, _)| f).collect();
    assert_eq!(kinds, ["prefill.layer.dense", "prefill.layer.moe", "prefill.layer.dense", "prefill.layer.moe"]);
}

#[test]
fn mla_cache_is_latent_and_rope_key() {
    let m = lowered(&spec("deepseek_v3.dsc"));
    let (b, c, s) = (Dim::B, Dim::C, Dim::S);
    let bf = |d: Vec<Dim>| Ty::new(DType::Bf16, d);
    let i64t = |d: Vec<Dim>| Ty::new(DType::I64, d);

    let decode = m.entry(Mode::Decode).unwrap();
    let inputs = input_types(&decode.graph);
    assert_eq!(inputs.len(), 2 + 2 * 61);
    assert_eq!(inputs[0], ("input_ids".into(), i64t(vec![b, n(1)])));
    assert_eq!(inputs[1], ("positions".into(), i64t(vec![b, n(1)])));
    // Position-major: appending writes past the end of the older positions.
    assert_eq!(inputs[2], ("cache.0.kv_latent".into(), bf(vec![c, b, n(512)])));
    assert_eq!(inputs[3], ("cache.0.k_pe".into(), bf(vec![c, b, n(64)])));
    assert_eq!(inputs[123], ("cache.60.k_pe".into(), bf(vec![c, b, n(64)])));
    let sig = decode.graph.signature();
    assert_eq!(sig.outputs.len(), 1 + 2 * 61);
    assert_eq!(sig.outputs[0], bf(vec![b, n(1), n(129280)]));
    assert_eq!(sig.outputs[1], bf(vec![c + 1, b, n(512)]));
    assert_eq!(sig.outputs[2], bf(vec![c + 1, b, n(64)]));

    let prefill = m.entry(Mode::Prefill).unwrap().graph.signature();
    assert_eq!(prefill.inputs, vec![i64t(vec![b, s]), i64t(vec![b, s])]);
    assert_eq!(prefill.outputs[0], bf(vec![b, s, n(129280)]));
    assert_eq!(prefill.outputs[1], bf(vec![s, b, n(512)]));
    assert_eq!(prefill.outputs[2], bf(vec![s, b, n(64)]));

    let train = m.entry(Mode::Train).unwrap().graph.signature();
    assert_eq!(train.inputs.len(), 3);
    // loss, mtp_loss, aux_loss, then the expert loads of the 58 MoE layers and the MTP module.
    let mut want = vec![Ty::scalar(DType::F32); 3];
    want.extend(std::iter::repeat_n(Ty::new(DType::F32, [n(256)]), 58 + 1));
    assert_eq!(train.outputs, want);

    // Decode appends one position to each cache tensor; prefill and train never append.
    assert_eq!(count(m.function("decode.layer.moe").unwrap(), "cache_append"), 2);
    assert_eq!(count(m.function("prefill.layer.moe").unwrap(), "cache_append"), 0);
    assert_eq!(count(m.function("train.layer.moe").unwrap(), "cache_append"), 0);
}

#[test]
fn gqa_cache_is_keys_and_values() {
    let m = lowered(&spec("tiny/tiny_llama_gqa.dsc"));
    let s = &spec("tiny/tiny_llama_gqa.dsc").model;
    let dsc_dsl::model::Attention::Gqa(a) = &s.attention else { panic!("gqa spec") };
    let t = Ty::new(DType::F32, [Dim::C, Dim::B, n(a.kv_heads), n(a.head_dim)]);
    let inputs = input_types(&m.entry(Mode::Decode).unwrap().graph);
    assert_eq!(inputs[2], ("cache.0.k".into(), t.clone()));
    assert_eq!(inputs[3], ("cache.0.v".into(), t));
    let att = m.function("decode.layer.dense").unwrap();
    let node = nodes_of(att, "attention").next().unwrap();
    let Op::Attention { heads, kv_heads, scale, causal, .. } = att.graph.node(node).op else { unreachable!() };
    assert_eq!((heads as u64, kv_heads as u64, causal), (a.heads, a.kv_heads, true));
    assert_eq!(scale, Float::new((a.head_dim as f64).powf(-0.5)));
}

#[test]
fn mtp_only_in_training() {
    let m = lowered(&spec("deepseek_v3.dsc"));
    for mode in [Mode::Prefill, Mode::Decode] {
        let ps = params(&m, mode);
        assert!(ps.iter().all(|(name, _)| !name.starts_with("model.layers.61.")), "{mode}");
        assert!(calls(m.entry(mode).unwrap()).iter().all(|(f, _)| f.starts_with(&format!("{mode}.layer."))));
    }
    let train = m.entry(Mode::Train).unwrap();
    assert!(calls(train).contains(&("train.mtp.1".to_string(), Some(61))));
    let ps = params(&m, Mode::Train);
    for want in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "mlp.experts.gate_proj.weight"] {
        assert!(ps.iter().any(|(name, _)| *name == format!("model.layers.61.{want}")), "{want}");
    }
    // Main loss plus one per depth, weighted by loss_weight / depth.
    assert_eq!(count(train, "cross_entropy"), 2);
    let w = nodes_of(train, "const").map(|n| train.graph.node(n).op.clone()).next();
    assert_eq!(w, Some(Op::Const { value: Float::new(0.3) }));
}

#[test]
fn mtp_depths_chain() {
    let text = include_str!("../../../specs/tiny/tiny_v3.dsc").replace("depth = 1", "depth = 2");
    let m = lowered(&spec_str(&text));
    let train = m.entry(Mode::Train).unwrap();
    let mtp: Vec<_> = calls(train).into_iter().filter(|(f, _)| f.starts_with("train.mtp.")).collect();
    assert_eq!(mtp, [("train.mtp.1".to_string(), Some(4)), ("train.mtp.2".to_string(), Some(5))]);
    let sig2 = m.signature("train.mtp.2").unwrap();
    assert_eq!(sig2.inputs[0], Ty::new(DType::F32, [Dim::B, Dim::S - 2, n(48)]));
    assert_eq!(count(train, "cross_entropy"), 3);
    let w = nodes_of(train, "const").map(|n| train.graph.node(n).op.clone()).next();
    assert_eq!(w, Some(Op::Const { value: Float::new(0.15) }));
}

#[test]
fn mla_scale_and_rope() {
    let m = lowered(&spec("deepseek_v3.dsc"));
    let f = m.function("prefill.layer.moe").unwrap();
    let att = nodes_of(f, "attention").next().unwrap();
    let Op::Attention { heads, kv_heads, scale, causal, masked, .. } = f.graph.node(att).op else { unreachable!() };
    assert_eq!((heads, kv_heads, causal, masked), (128, 128, true, false));
    let mscale = 0.1 * 40f64.ln() + 1.0;
    assert_eq!(scale, Float::new(192f64.powf(-0.5) * mscale * mscale));
    let ropes: Vec<_> = nodes_of(f, "rope").collect();
    assert_eq!(ropes.len(), 2);
    for r in ropes {
        let Op::Rope { rotary_dim, yarn, layout, .. } = f.graph.node(r).op else { unreachable!() };
        assert_eq!((rotary_dim, layout), (64, crate::ir::RopeLayout::Interleaved));
        assert_eq!(yarn.unwrap().factor, Float::new(40.0));
    }
    // The shared rope key reaches all 128 heads through one broadcast, and every concat
    // is a two-way nope | rope join.
    let bc: Vec<_> = nodes_of(f, "broadcast").collect();
    assert_eq!(bc.len(), 1);
    assert_eq!(f.graph.node(bc[0]).ty().shape, [Dim::B, Dim::S, n(128), n(64)].into());
    let widest = nodes_of(f, "concat").map(|c| f.graph.inputs(c).len()).max();
    assert_eq!(widest, Some(2));
}

#[test]
fn router_runs_in_f32() {
    let m = lowered(&spec("deepseek_v3.dsc"));
    let f = m.function("decode.layer.moe").unwrap();
    let route = nodes_of(f, "moe_route").next().unwrap();
    let ins: Vec<Value> = f.graph.inputs(route);
    assert_eq!(f.graph.ty(ins[0]), &Ty::new(DType::F32, [Dim::B, n(1), n(256)]));
    assert_eq!(f.graph.ty(ins[1]), &Ty::new(DType::F32, [n(256)]));
    assert_eq!(count(f, "cast"), 2);
    // tiny specs are f32 already: no casts at all.
    let tiny = lowered(&spec("tiny/tiny_v3.dsc"));
    assert_eq!(count(tiny.function("decode.layer.moe").unwrap(), "cast"), 0);
    // Without selection_bias the router has one input.
    let moe16 = lowered(&spec("deepseek_moe_16b.dsc"));
    let f = moe16.function("prefill.layer.moe").unwrap();
    assert_eq!(f.graph.inputs(nodes_of(f, "moe_route").next().unwrap()).len(), 1);
}

#[test]
fn tied_head_is_the_embedding() {
    let m = lowered(&spec_str(
        "model t { vocab = 32, hidden = 8, layers = 1, dtype = f32, tie_embeddings = true, norm_eps = 1e-5
           attention gqa { heads = 2, kv_heads = 1 }
           rope { theta = 10000, layout = half_split }
           ffn dense { layers = 0.., intermediate = 16 } }",
    ));
    for mode in Mode::ALL {
        let names: Vec<String> = params(&m, mode).into_iter().map(|p| p.0).collect();
        assert!(names.contains(&"model.embed_tokens.weight".to_string()));
        assert!(!names.contains(&"lm_head.weight".to_string()), "{mode}");
    }
}

#[test]
fn params_have_checkpoint_names() {
    let m = lowered(&spec("deepseek_v2_lite.dsc"));
    let ps = params(&m, Mode::Prefill);
    let has = |name: &str| ps.iter().any(|(p, _)| p == name);
    assert!(has("model.layers.0.self_attn.q_proj.weight"));
    assert!(!has("model.layers.0.self_attn.q_a_proj.weight"));
    assert!(has("model.layers.1.mlp.shared_experts.down_proj.weight"));
    assert!(has("model.layers.0.mlp.down_proj.weight"));
    assert!(has("lm_head.weight") && has("model.norm.weight") && has("model.embed_tokens.weight"));
    assert!(!has("model.layers.1.mlp.gate.e_score_correction_bias"));
}

#[test]
fn every_node_has_a_span() {
    for path in all_specs() {
        let s = dsc_dsl::load(&path, None).unwrap();
        let m = lowered(&s);
        for f in &m.functions {
            for node in f.graph.nodes() {
                let nd = f.graph.node(node);
                assert!(nd.span.is_some(), "{}: {} in {} has no span", path.display(), nd.op.name(), f.name);
            }
        }
    }
}

#[test]
fn lower_mode_matches_lower() {
    let s = spec("tiny/tiny_v3.dsc");
    let all = lowered(&s);
    for mode in Mode::ALL {
        let one = lower_mode(&s, mode).unwrap();
        assert_eq!(one.entries.len(), 1);
        for f in &one.functions {
            let same = all.function(&f.name).unwrap();
            assert_eq!(crate::ir::print_function(f, None), crate::ir::print_function(same, None));
        }
    }
    // The printed module names functions and entries as documented.
    let text = print_module(&all, Some(&s.sources));
    assert!(text.starts_with("entry prefill = prefill\nentry decode = decode\nentry train = train\n"), "{text}");
}

/// `cargo test -p dsc-compiler --release lowering_time -- --nocapture` prints it.
#[test]
fn lowering_time() {
    let s = spec("deepseek_v3.dsc");
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        lowered(&s);
    }
    let per = t.elapsed() / reps;
    let m = lowered(&s);
    let t = Instant::now();
    for _ in 0..reps {
        verify(&m).unwrap();
    }
    let verify_per = t.elapsed() / reps;
    let nodes: usize = m.functions.iter().map(|f| f.graph.len()).sum();
    println!("lowering DeepSeek-V3 (3 modes, {nodes} nodes): {per:?}, of which verify {verify_per:?}");
}

/// The shared rope key reaches the heads through one `broadcast`, so the head count is no
/// longer bounded by a concat's `u16` input slots (it was, when the key was concatenated
/// once per head).
#[test]
fn many_mla_heads_lower() {
    let s = spec_str(
        "model t { vocab = 32, hidden = 8, layers = 1, dtype = f32, norm_eps = 1e-5
           attention mla { heads = 70000, q_lora_rank = 4, kv_lora_rank = 4, qk_nope_head_dim = 2,
                           qk_rope_head_dim = 2, v_head_dim = 2, latent_norm_eps = 1e-6 }
           rope { theta = 10000, layout = interleaved }
           ffn dense { layers = 0.., intermediate = 16 } }",
    );
    let m = lower(&s).unwrap();
    let f = m.function("decode.layer.dense").unwrap();
    let bc = nodes_of(f, "broadcast").next().unwrap();
    assert_eq!(f.graph.node(bc).ty().shape, [Dim::B, Dim::C + 1, n(70000), n(2)].into());
}
