//! The MoE and selection kernels (router, top-k, the four expert-FFN launches) on the wgpu
//! adapter against the reference interpreter running the same node: random non-zero
//! inputs, odd sizes, poisoned outputs and scratch (NaN / `i32::MIN`, see `run_node`),
//! integer outputs exact, floats within 1e-4·(1 + |ref|) (f16: 2e-2).

use super::test_data::{backend, random};
use crate::reference::{run, Data, Options, Tensor};
use dsc_compiler::codegen::launch::NodeWork;
use dsc_compiler::codegen::select::node_work;
use dsc_compiler::codegen::{kernel_source, KernelSpec, Target};
use dsc_compiler::ir::{Bindings, DType, Dim, Float, Function, Graph, GroupScore, Mode, Module, Op, Routing, Scoring, Ty, Value};
use std::collections::HashMap;

/// One node input: its declared type and its value.
struct In {
    ty: Ty,
    value: Tensor,
}

fn input(dtype: DType, shape: &[Dim], value: Tensor) -> In {
    In { ty: Ty::new(dtype, shape.to_vec()), value }
}

fn lits(s: &[usize]) -> Vec<Dim> {
    s.iter().map(|&d| Dim::lit(d as i64)).collect()
}

/// Builds `op` over `inputs`, runs it in the reference interpreter and on the device with
/// sizes `bind`, and compares every output: integers exactly, floats within the tolerance
/// of `tol_dtype`. Checks that every kernel of the node generates the same CUDA and WGSL
/// twice, and returns the node's kernels.
fn check(op: Op, inputs: &[In], tol_dtype: DType, bind: Bindings) -> Vec<KernelSpec> {
    let mut g = Graph::new();
    let args: Vec<Value> = inputs.iter().enumerate().map(|(i, x)| g.input(i as u32, &format!("x{i}"), x.ty.clone(), None).into()).collect();
    let n = g.add_inferred(op.clone(), &args, None).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    let outs: Vec<Value> = (0..g.node(n).outputs.len() as u16).map(|j| n.out(j)).collect();
    g.ret(&outs, None);
    let work = node_work(&g, n).unwrap_or_else(|u| panic!("{op:?}: {u}"));
    let NodeWork::Launches { launches, .. } = &work else { panic!("{op:?} is an alias") };
    let specs: Vec<KernelSpec> = launches.iter().map(|l| l.kernel.clone()).collect();
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g.clone() });
    m.set_entry(Mode::Prefill, "main");

    let values: Vec<Tensor> = inputs.iter().map(|x| x.value.clone()).collect();
    let want = run(&m, Mode::Prefill, &values, &HashMap::<String, Tensor>::new(), &Options::default())
        .unwrap_or_else(|e| panic!("reference {op:?}: {e}"));
    let refs: Vec<&Tensor> = values.iter().collect();
    let got = backend().run_node(&g, n, &refs, &bind).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    assert_eq!(want.len(), got.len());
    let tol = if tol_dtype == DType::F16 { 2e-2 } else { 1e-4 };
    for (j, (w, d)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.shape(), d.shape(), "{op:?} output {j}");
        match (w.data(), d.data()) {
            (Data::I32(a), Data::I32(b)) => assert_eq!(a, b, "{op:?} output {j}: reference vs device indices"),
            (Data::I64(a), Data::I32(b)) => assert!(a.iter().zip(b).all(|(x, y)| *x == *y as i64), "{op:?} output {j}: {a:?} vs {b:?}"),
            _ => {
                let (a, b) = (w.to_f32_vec(), d.to_f32_vec());
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    let ok = (x - y).abs() <= tol * (1.0 + x.abs()) || (x.is_nan() && y.is_nan());
                    assert!(ok, "{op:?} ({tol_dtype}) output {j} element {i}: reference {x}, device {y}");
                }
            }
        }
    }
    for s in &specs {
        for t in [Target::Cuda, Target::Wgsl] {
            let a = kernel_source(s, t);
            assert!(a == kernel_source(s, t), "{} {t:?}: two generations differ", s.name());
            assert!(a.contains(&s.name()), "{}: entry not renamed", s.name());
        }
    }
    specs
}

#[allow(clippy::too_many_arguments)]
fn routing(
    top_k: u32,
    scoring: Scoring,
    bias: bool,
    groups: u32,
    kept: u32,
    gs: Option<GroupScore>,
    normalize: bool,
    scale: f64,
) -> Routing {
    Routing { top_k, scoring, selection_bias: bias, groups, groups_kept: kept, group_score: gs, normalize, scale: Float::new(scale) }
}

/// Router over `tokens × experts` random logits (and a random bias when the routing has
/// one), in f32.
fn check_route(r: Routing, tokens: &[usize], experts: usize) {
    let mut shape = tokens.to_vec();
    shape.push(experts);
    let mut ins = vec![input(DType::F32, &lits(&shape), random(&shape, 5 + experts as u64, DType::F32))];
    if r.selection_bias {
        // DeepSeek-V3's correction bias is small next to the sigmoid scores.
        let b = random(&[experts], 77, DType::F32).to_f32_vec().iter().map(|v| v * 0.1).collect();
        ins.push(input(DType::F32, &lits(&[experts]), Tensor::f32(&[experts], b)));
    }
    let specs = check(Op::MoeRoute(r), &ins, DType::F32, Bindings::default());
    assert!(matches!(specs[..], [KernelSpec::MoeRoute { .. }]), "{specs:?}");
}

#[test]
fn route_softmax_without_groups() {
    // DeepSeekMoE / V2-Lite: softmax over all experts, top-6, no normalisation.
    check_route(routing(6, Scoring::Softmax, false, 1, 1, None, false, 1.0), &[7], 64);
    // Normalised and scaled, an expert count that is a multiple of nothing, two token axes.
    check_route(routing(5, Scoring::Softmax, false, 1, 1, None, true, 2.5), &[3, 5], 37);
    // k = 1 and k = E.
    check_route(routing(1, Scoring::Softmax, false, 1, 1, None, false, 1.0), &[4], 9);
    check_route(routing(9, Scoring::Softmax, false, 1, 1, None, true, 1.0), &[2], 9);
    // More experts than units per cube.
    check_route(routing(8, Scoring::Softmax, false, 1, 1, None, true, 1.0), &[3], 300);
}

#[test]
fn route_softmax_group_max() {
    // DeepSeek-V2: 8 groups of 5, best 3 groups kept by their best expert.
    check_route(routing(6, Scoring::Softmax, false, 8, 3, Some(GroupScore::Max), false, 16.0), &[5], 40);
    check_route(routing(3, Scoring::Softmax, false, 4, 2, Some(GroupScore::Max), true, 1.0), &[11], 12);
}

#[test]
fn route_sigmoid_bias_top2_sum() {
    // DeepSeek-V3: 256 experts, 8 groups keep 4 by the sum of their two best, top-8,
    // sigmoid scores, selection-only bias, normalised and scaled.
    check_route(routing(8, Scoring::Sigmoid, true, 8, 4, Some(GroupScore::Top2Sum), true, 2.5), &[9], 256);
    // Not normalised; odd token count over two axes.
    check_route(routing(4, Scoring::Sigmoid, true, 6, 2, Some(GroupScore::Top2Sum), false, 1.5), &[3, 3], 24);
    // Groups of one expert score that expert alone.
    check_route(routing(2, Scoring::Sigmoid, true, 6, 3, Some(GroupScore::Top2Sum), true, 1.0), &[5], 6);
    // Sigmoid without bias or groups.
    check_route(routing(3, Scoring::Sigmoid, false, 1, 1, None, true, 1.0), &[13], 17);
}

#[test]
fn top_k_rows() {
    for (rows, cols, k) in [(3, 1000, 1), (5, 37, 5), (1, 8, 8), (4, 300, 20)] {
        let x = random(&[rows, cols], 3 + cols as u64, DType::F32);
        let specs = check(Op::TopK { k, axis: 1 }, &[input(DType::F32, &lits(&[rows, cols]), x)], DType::F32, Bindings::default());
        assert_eq!(specs, vec![KernelSpec::TopK { elem: dsc_compiler::codegen::Elem::F32 }]);
    }
    // Ties go to the lower index: five distinct values over 131 columns.
    let ties = Tensor::f32(&[3, 131], (0..3 * 131).map(|i| ((i * 7) % 5) as f32 - 2.0).collect());
    check(Op::TopK { k: 12, axis: 1 }, &[input(DType::F32, &lits(&[3, 131]), ties)], DType::F32, Bindings::default());
    // NaN ranks above every number (torch.topk), several NaNs by index.
    let mut v = random(&[2, 50], 11, DType::F32).to_f32_vec();
    for i in [3, 17, 60, 99] {
        v[i] = f32::NAN;
    }
    check(Op::TopK { k: 4, axis: 1 }, &[input(DType::F32, &lits(&[2, 50]), Tensor::f32(&[2, 50], v))], DType::F32, Bindings::default());
    // f16 input (values exactly representable, so both sides order the same numbers).
    let x = random(&[2, 3, 77], 9, DType::F16);
    check(Op::TopK { k: 7, axis: 2 }, &[input(DType::F16, &lits(&[2, 3, 77]), x)], DType::F16, Bindings::default());
}

/// An expert FFN with `tokens` of width `h`, `k` slots routed by `route(t, s)`, `experts`
/// experts of intermediate size `inter`; `x`'s dtype `dt`, the gate weights' `wdt`.
#[allow(clippy::too_many_arguments)]
fn check_experts(
    tokens: &[Dim],
    bind: Bindings,
    h: usize,
    k: usize,
    experts: usize,
    inter: usize,
    route: impl Fn(usize, usize) -> i32,
    dt: DType,
    wdt: DType,
) {
    let t_dims: Vec<usize> = tokens.iter().map(|d| d.eval(&bind) as usize).collect();
    let t: usize = t_dims.iter().product();
    let with = |last: usize| {
        let mut s = tokens.to_vec();
        s.push(Dim::lit(last as i64));
        s
    };
    let concrete = |last: usize| {
        let mut s = t_dims.clone();
        s.push(last);
        s
    };
    // f16 keeps 11 bits: expert weights of a trained model's size (a quarter of the
    // usual ±[0.25, 1.25)) keep the intermediate sums, and so their rounding, small next
    // to the result, as in a real layer.
    let wscale = if dt == DType::F16 { 0.25 } else { 1.0 };
    let weight = |shape: &[usize], seed: u64| {
        let v = random(shape, seed, dt).to_f32_vec().into_iter().map(|x| x * wscale);
        Tensor::f32(shape, v.map(|x| if dt == DType::F16 { half::f16::from_f32(x).to_f32() } else { x }).collect())
    };
    let ids: Vec<i32> = (0..t * k).map(|p| route(p / k, p % k)).collect();
    assert!(ids.iter().all(|&e| (0..experts as i32).contains(&e)));
    let ins = vec![
        input(dt, &with(h), random(&concrete(h), 1, dt)),
        input(DType::I32, &with(k), Tensor::i32(&concrete(k), ids)),
        input(wdt, &with(k), random(&concrete(k), 2, wdt)),
        input(dt, &lits(&[experts, inter, h]), weight(&[experts, inter, h], 3)),
        input(dt, &lits(&[experts, inter, h]), weight(&[experts, inter, h], 4)),
        input(dt, &lits(&[experts, h, inter]), weight(&[experts, h, inter], 5)),
    ];
    let specs = check(Op::ExpertFfn, &ins, dt, bind);
    let names: Vec<String> = specs.iter().map(|s| s.name()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(names[0], "moe_dispatch");
}

#[test]
fn expert_ffn_k2_odd_sizes() {
    let f = DType::F32;
    // 7 tokens, k = 2 over 13 experts of which 3 get nothing (10, 11, 12), several tokens
    // per expert; h and i not multiples of the tile.
    check_experts(&lits(&[7]), Bindings::default(), 19, 2, 13, 23, |t, s| ((t * 3 + s * 5) % 10) as i32, f, f);
    // One token (decode), k = 2.
    check_experts(&lits(&[1]), Bindings::default(), 33, 2, 5, 17, |_, s| (4 - s) as i32, f, f);
    // Every token to the same two experts: one expert's rows span several row tiles.
    check_experts(&lits(&[37]), Bindings::default(), 21, 2, 4, 18, |_, s| [3, 1][s], f, f);
}

#[test]
fn expert_ffn_k6_symbolic_tokens() {
    // [b, s, h] tokens: the launch sizes are expressions of b and s, evaluated here.
    let bind = Bindings { batch: 3, seq: 5, cache: 0 };
    let route = |t: usize, s: usize| ((t * 7 + s * 11 + t * s) % 29) as i32;
    check_experts(&[Dim::B, Dim::S], bind, 40, 6, 31, 24, route, DType::F32, DType::F32);
    // The same expert twice in one token's slots counts twice, as in the reference.
    check_experts(&lits(&[5]), Bindings::default(), 16, 6, 9, 20, |t, s| ((t + s / 2) % 9) as i32, DType::F32, DType::F32);
}

#[test]
fn expert_ffn_f16_with_f32_gate_weights() {
    let route = |t: usize, s: usize| ((t * 5 + s * 3) % 11) as i32;
    check_experts(&lits(&[6]), Bindings::default(), 24, 3, 11, 20, route, DType::F16, DType::F32);
    check_experts(&lits(&[6]), Bindings::default(), 24, 3, 11, 20, route, DType::F16, DType::F16);
}
