//! The kernels of the train graphs (gradients, losses) on the wgpu adapter against the
//! reference interpreter running the same node: random non-zero inputs, integer labels
//! with ignored rows, sizes that are not multiples of any block or tile, every output
//! compared (multi-output nodes included), f32 tolerance 1e-4·(1 + |ref|).

use super::test_data::{backend, random};
use crate::reference::{run, Options, Tensor};
use dsc_compiler::codegen::KernelSpec;
use dsc_compiler::ir::{Bindings, DType, Dim, Function, Graph, Mode, Module, Op, Ty, Value};
use std::collections::HashMap;

/// Runs `op` over `inputs` (their types and values) with sizes `bind` in the reference
/// and on the device, and compares every output within `tol·(1 + |ref|)`.
fn check_node(op: Op, inputs: &[(Ty, Tensor)], bind: Bindings, tol: f32) -> KernelSpec {
    let (g, n) = one_node(&op, inputs);
    let spec = KernelSpec::from_node(&g, n).unwrap_or_else(|u| panic!("{op:?}: {u}"));
    let want = reference(op.clone(), inputs);
    let values: Vec<Tensor> = inputs.iter().map(|(_, t)| t.clone()).collect();
    let refs: Vec<&Tensor> = values.iter().collect();
    let got = backend().run_node(&g, n, &refs, &bind).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    assert_eq!(got.len(), want.len());
    for (o, (w, d)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.shape(), d.shape(), "{op:?} output {o}");
        let (w, d) = (w.to_f32_vec(), d.to_f32_vec());
        for (i, (a, b)) in w.iter().zip(&d).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + a.abs()), "{op:?} output {o} element {i}: reference {a}, device {b}");
        }
    }
    spec
}

fn f32_input(shape: &[Dim], bind: &Bindings, seed: u64) -> (Ty, Tensor) {
    let dims: Vec<usize> = shape.iter().map(|d| d.eval(bind) as usize).collect();
    (Ty::new(DType::F32, shape.to_vec()), random(&dims, seed, DType::F32))
}

fn lits(s: &[usize]) -> Vec<Dim> {
    s.iter().map(|&d| Dim::lit(d as i64)).collect()
}

#[test]
fn weight_grad_sums_over_every_token_axis() {
    for (tokens, n, k) in [(&[1usize][..], 1, 1), (&[2, 9][..], 17, 33), (&[3, 5, 7], 40, 21)] {
        let bind = Bindings::default();
        let dy: Vec<usize> = tokens.iter().copied().chain([n]).collect();
        let x: Vec<usize> = tokens.iter().copied().chain([k]).collect();
        let spec = check_node(Op::WeightGrad, &[f32_input(&lits(&dy), &bind, 3), f32_input(&lits(&x), &bind, 4)], bind, 1e-4);
        assert!(spec.name().starts_with("batch_matmul_f32_r0"), "{}", spec.name());
    }
    // Symbolic token axes, as the train graph has them.
    let bind = Bindings { batch: 3, seq: 11, cache: 0 };
    let dy = vec![Dim::B, Dim::S, Dim::lit(24)];
    let x = vec![Dim::B, Dim::S, Dim::lit(10)];
    check_node(Op::WeightGrad, &[f32_input(&dy, &bind, 5), f32_input(&x, &bind, 6)], bind, 1e-4);
}

/// Labels in `0..v` with every third row set to the ignore index `-100`.
fn labels(shape: &[Dim], bind: &Bindings, v: usize, seed: usize) -> (Ty, Tensor) {
    let dims: Vec<usize> = shape.iter().map(|d| d.eval(bind) as usize).collect();
    let n: usize = dims.iter().product();
    let vals: Vec<i64> = (0..n).map(|i| if i % 3 == 2 { -100 } else { ((i * 7 + seed) % v) as i64 }).collect();
    (Ty::new(DType::I64, shape.to_vec()), Tensor::i64(&dims, vals))
}

fn scalar(v: f32) -> (Ty, Tensor) {
    (Ty::new(DType::F32, Vec::<Dim>::new()), Tensor::f32(&[], vec![v]))
}

#[test]
fn label_losses_and_their_gradients() {
    let bind = Bindings { batch: 2, seq: 7, cache: 0 };
    for (rows, v) in [(vec![Dim::B, Dim::S], 300usize), (vec![Dim::lit(1)], 1), (vec![Dim::lit(5)], 129)] {
        let logits: Vec<Dim> = rows.iter().copied().chain([Dim::lit(v as i64)]).collect();
        for ignore in [Some(-100), None] {
            // Without an ignore index, -100 would be out of range: use in-range labels.
            let lab = match ignore {
                Some(_) => labels(&rows, &bind, v, 1),
                None => (Ty::new(DType::I64, rows.clone()), in_range(&rows, &bind, v)),
            };
            let x = f32_input(&logits, &bind, 9);
            check_node(Op::CrossEntropy { ignore_index: ignore }, &[x.clone(), lab.clone()], bind, 1e-4);
            check_node(Op::TokenLogProb { ignore_index: ignore }, &[x.clone(), lab.clone()], bind, 1e-4);
            check_node(Op::CrossEntropyGrad { ignore_index: ignore }, &[x.clone(), lab.clone(), scalar(0.7)], bind, 1e-5);
            check_node(Op::TokenLogProbGrad { ignore_index: ignore }, &[x.clone(), lab.clone(), f32_input(&rows, &bind, 12)], bind, 1e-5);
        }
    }
}

/// Labels in `0..v`, none ignored.
fn in_range(shape: &[Dim], bind: &Bindings, v: usize) -> Tensor {
    let dims: Vec<usize> = shape.iter().map(|d| d.eval(bind) as usize).collect();
    let n: usize = dims.iter().product();
    Tensor::i64(&dims, (0..n).map(|i| ((i * 5 + 3) % v) as i64).collect())
}

/// What the reference refuses, the device marks: a counted label outside `0..V` makes
/// the loss NaN, and a batch whose labels are all ignored has a NaN mean (torch's mean
/// over nothing) and a zero gradient.
#[test]
fn label_losses_mark_what_the_reference_refuses() {
    let bind = Bindings::default();
    let x = f32_input(&lits(&[3, 10]), &bind, 2);
    let lab_ty = Ty::new(DType::I64, lits(&[3]));
    let run = |op: Op, labels: Vec<i64>, extra: Option<(Ty, Tensor)>| -> Vec<f32> {
        let mut g = Graph::new();
        let mut ins = vec![x.clone(), (lab_ty.clone(), Tensor::i64(&[3], labels))];
        ins.extend(extra);
        let args: Vec<Value> = ins.iter().enumerate().map(|(i, (t, _))| g.input(i as u32, "x", t.clone(), None).into()).collect();
        let n = g.add_inferred(op, &args, None).unwrap();
        let refs: Vec<&Tensor> = ins.iter().map(|(_, t)| t).collect();
        backend().run_node(&g, n, &refs, &bind).unwrap().remove(0).to_f32_vec()
    };
    let ce = Op::CrossEntropy { ignore_index: Some(-100) };
    assert!(run(ce.clone(), vec![1, 10, 2], None)[0].is_nan());
    assert!(run(ce.clone(), vec![1, -7, 2], None)[0].is_nan());
    assert!(run(ce, vec![-100, -100, -100], None)[0].is_nan());
    let grad = run(Op::CrossEntropyGrad { ignore_index: Some(-100) }, vec![-100, -100, -100], Some(scalar(1.0)));
    assert!(grad.iter().all(|&g| g == 0.0), "{grad:?}");
    let grad = run(Op::CrossEntropyGrad { ignore_index: Some(-100) }, vec![4, 12, -100], Some(scalar(1.0)));
    assert!(
        grad[..10].iter().all(|g| g.is_finite()) && grad[10..20].iter().all(|g| g.is_nan()) && grad[20..].iter().all(|&g| g == 0.0),
        "{grad:?}"
    );
}

#[test]
fn rms_norm_grad_rows_and_gain() {
    use dsc_compiler::ir::Float;
    for (rows, d) in [(vec![Dim::lit(1)], 1usize), (vec![Dim::B, Dim::S], 48), (vec![Dim::lit(3), Dim::lit(5)], 300)] {
        let bind = Bindings { batch: 2, seq: 9, cache: 0 };
        let x: Vec<Dim> = rows.iter().copied().chain([Dim::lit(d as i64)]).collect();
        let ins = [f32_input(&x, &bind, 21), f32_input(&lits(&[d]), &bind, 22), f32_input(&x, &bind, 23)];
        check_node(Op::RmsNormGrad { eps: Float::new(1e-6) }, &ins, bind, 1e-4);
    }
}

#[test]
fn scatter_add_accumulates_repeated_indices_in_order() {
    let bind = Bindings { batch: 2, seq: 5, cache: 0 };
    // An embedding's gradient: dst [V, h] zeros, ids [b, s] with repeats, src [b, s, h].
    let ids: Vec<i64> = vec![3, 0, 3, 7, 3, 1, 1, 9, 0, 3];
    for (inner, axis) in [(5usize, 0u8), (1, 0)] {
        let dst = f32_input(&lits(&[10, inner]), &bind, 31);
        let idx = (Ty::new(DType::I64, vec![Dim::B, Dim::S]), Tensor::i64(&[2, 5], ids.clone()));
        let src = f32_input(&[Dim::B, Dim::S, Dim::lit(inner as i64)], &bind, 32);
        check_node(Op::ScatterAdd { axis }, &[dst, idx, src], bind, 1e-5);
    }
    // Along a middle axis: dst [2, 6, 3], idx [4], src [2, 4, 3].
    let bind = Bindings::default();
    let idx = (Ty::new(DType::I64, lits(&[4])), Tensor::i64(&[4], vec![5, 0, 5, 2]));
    check_node(
        Op::ScatterAdd { axis: 1 },
        &[f32_input(&lits(&[2, 6, 3]), &bind, 33), idx, f32_input(&lits(&[2, 4, 3]), &bind, 34)],
        bind,
        1e-5,
    );
}

#[test]
fn integer_index_tensors_move_and_negate() {
    use dsc_compiler::ir::UnaryOp;
    let bind = Bindings { batch: 2, seq: 6, cache: 0 };
    let pos = (Ty::new(DType::I64, vec![Dim::B, Dim::S]), Tensor::i64(&[2, 6], (0..12).map(|i| i * 3 - 7).collect()));
    check_node(Op::Unary(UnaryOp::Neg), std::slice::from_ref(&pos), bind, 0.0);
    // The labels' shift: a symbolic slice along the sequence.
    check_node(Op::Slice { axis: 1, start: Dim::lit(1), len: Dim::S - 1 }, std::slice::from_ref(&pos), bind, 0.0);
    check_node(Op::Permute { perm: vec![1, 0] }, std::slice::from_ref(&pos), bind, 0.0);
}

#[test]
fn swiglu_grad_of_every_input() {
    for (rows, h, i) in [(vec![Dim::lit(1)], 1usize, 1usize), (vec![Dim::B, Dim::S], 48, 40), (vec![Dim::lit(3), Dim::lit(7)], 33, 70)] {
        let bind = Bindings { batch: 2, seq: 5, cache: 0 };
        let x: Vec<Dim> = rows.iter().copied().chain([Dim::lit(h as i64)]).collect();
        let ins = [
            f32_input(&x, &bind, 41),
            f32_input(&lits(&[i, h]), &bind, 42),
            f32_input(&lits(&[i, h]), &bind, 43),
            f32_input(&lits(&[h, i]), &bind, 44),
            f32_input(&x, &bind, 45),
        ];
        check_node(Op::SwiGluGrad, &ins, bind, 1e-4);
    }
}

fn attn_op(heads: u32, kv_heads: u32, dk: usize, causal: bool, masked: bool, lse: bool) -> Op {
    Op::Attention { heads, kv_heads, scale: dsc_compiler::ir::Float::new(1.0 / (dk as f64).sqrt()), causal, masked, lse }
}

/// The attention forward of a training step also returns each row's log-sum-exp.
#[test]
fn attention_returns_its_log_sum_exp() {
    let bind = Bindings { batch: 2, seq: 13, cache: 0 };
    for (heads, kv, dk, dv, causal, masked) in
        [(4, 4, 12, 12, true, false), (4, 2, 24, 16, true, true), (3, 1, 8, 8, false, false), (4, 1, 12, 12, true, false)]
    {
        let (b, s) = (Dim::B, Dim::S);
        let mut ins = vec![
            f32_input(&[b, s, Dim::lit(heads), Dim::lit(dk)], &bind, 51),
            f32_input(&[b, s, Dim::lit(kv), Dim::lit(dk)], &bind, 52),
            f32_input(&[b, s, Dim::lit(kv), Dim::lit(dv)], &bind, 53),
        ];
        if masked {
            ins.push(f32_input(&[b, s, s], &bind, 54));
        }
        check_node(attn_op(heads as u32, kv as u32, dk as usize, causal, masked, true), &ins, bind, 1e-4);
    }
}

/// The reference's outputs of `op` over `inputs`.
fn reference(op: Op, inputs: &[(Ty, Tensor)]) -> Vec<Tensor> {
    let (g, _) = one_node(&op, inputs);
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g });
    m.set_entry(Mode::Prefill, "main");
    let values: Vec<Tensor> = inputs.iter().map(|(_, t)| t.clone()).collect();
    run(&m, Mode::Prefill, &values, &HashMap::<String, Tensor>::new(), &Options::default())
        .unwrap_or_else(|e| panic!("reference {op:?}: {e}"))
}

/// A graph of `op` over inputs of `inputs`' types, returning all its outputs.
fn one_node(op: &Op, inputs: &[(Ty, Tensor)]) -> (Graph, dsc_compiler::ir::NodeId) {
    let mut g = Graph::new();
    let args: Vec<Value> =
        inputs.iter().enumerate().map(|(i, (t, _))| g.input(i as u32, &format!("x{i}"), t.clone(), None).into()).collect();
    let n = g.add_inferred(op.clone(), &args, None).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    let outs: Vec<Value> = (0..g.node(n).outputs.len() as u16).map(|i| n.out(i)).collect();
    g.ret(&outs, None);
    (g, n)
}

/// The flash backward against the reference's, from the reference forward's output and
/// log-sum-exp: GQA groups, causal rows with a cache offset (sk > sq), masks, head sizes
/// past one block of units, and a query row that sees no key (its lse is −∞).
#[test]
fn attention_grad_of_q_k_and_v() {
    use dsc_compiler::ir::Float;
    let (b, s) = (Dim::B, Dim::S);
    let cases = [
        // heads, kv, dk, dv, causal, masked, sk
        (4, 4, 12, 12, true, false, s),
        (4, 2, 24, 16, true, true, s),
        (6, 2, 130, 129, true, false, s + 3),
        (3, 1, 8, 8, false, false, s),
        (2, 1, 16, 8, false, true, s + 2),
    ];
    for (idx, (heads, kv, dk, dv, causal, masked, sk)) in cases.into_iter().enumerate() {
        for (batch, seq) in [(1, 1), (2, 13), (1, 150)] {
            let bind = Bindings { batch, seq, cache: 0 };
            let seed = 60 + 10 * idx as u64;
            let mut ins = vec![
                f32_input(&[b, s, Dim::lit(heads), Dim::lit(dk)], &bind, seed),
                f32_input(&[b, sk, Dim::lit(kv), Dim::lit(dk)], &bind, seed + 1),
                f32_input(&[b, sk, Dim::lit(kv), Dim::lit(dv)], &bind, seed + 2),
            ];
            if masked {
                // Row 0 of every batch sees nothing (all −∞ before the softmax).
                let (ty, mut t) = f32_input(&[b, s, sk], &bind, seed + 3);
                let skn = sk.eval(&bind) as usize;
                let mut v = t.to_f32_vec();
                for bi in 0..batch as usize {
                    let at = bi * seq as usize * skn;
                    v[at..at + skn].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                }
                t = Tensor::f32(t.shape(), v);
                ins.push((ty, t));
            }
            let fwd = reference(attn_op(heads as u32, kv as u32, dk as usize, causal, masked, true), &ins);
            let (out, lse) = (fwd[0].clone(), fwd[1].clone());
            ins.push((Ty::new(DType::F32, vec![b, s, Dim::lit(heads), Dim::lit(dv)]), out));
            ins.push((Ty::new(DType::F32, vec![b, s, Dim::lit(heads)]), lse));
            ins.push(f32_input(&[b, s, Dim::lit(heads), Dim::lit(dv)], &bind, seed + 4));
            let op =
                Op::AttentionGrad { heads: heads as u32, kv_heads: kv as u32, scale: Float::new(1.0 / (dk as f64).sqrt()), causal, masked };
            check_node(op, &ins, bind, 2e-4);
        }
    }
}

#[test]
fn reductions_iota_and_one_hot_programs() {
    use dsc_compiler::ir::fused::{FusedKernel, Operand, Step, StepOp};
    use dsc_compiler::ir::{BinaryOp, ReduceOp};
    let bind = Bindings { batch: 2, seq: 7, cache: 0 };
    let x = f32_input(&[Dim::B, Dim::S, Dim::lit(3), Dim::lit(5)], &bind, 71);
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        for axis in 0..4u8 {
            for keepdim in [false, true] {
                check_node(Op::Reduce { op, axis, keepdim }, std::slice::from_ref(&x), bind, 1e-5);
            }
        }
    }
    check_node(Op::Iota { start: Dim::lit(0), len: Dim::lit(300), dtype: DType::I32 }, &[], bind, 0.0);
    check_node(Op::Iota { start: Dim::lit(4), len: Dim::lit(11), dtype: DType::I64 }, &[], bind, 0.0);
    // The balance loss's one-hot: eq(indices [b, s, k, 1], iota [E]) cast to f32.
    let idx = (
        Ty::new(DType::I32, vec![Dim::B, Dim::S, Dim::lit(2), Dim::lit(1)]),
        Tensor::i32(&[2, 7, 2, 1], (0..28).map(|i| (i * 5) % 8).collect()),
    );
    let iota = (Ty::new(DType::I32, lits(&[8])), Tensor::i32(&[8], (0..8).collect()));
    let k = FusedKernel {
        head: None,
        steps: vec![
            Step { op: StepOp::Binary(BinaryOp::Eq), args: vec![Operand::Input(0), Operand::Input(1)] },
            Step { op: StepOp::Cast(DType::F32), args: vec![Operand::Step(0)] },
        ],
    };
    let spec = check_node(Op::Fused(k), &[idx, iota], bind, 0.0);
    assert!(spec.name().starts_with("ew_i32_f32"), "{}", spec.name());
}

#[test]
fn moe_route_grad_for_each_scoring() {
    use dsc_compiler::ir::{Float, Routing, Scoring};
    let bind = Bindings { batch: 2, seq: 5, cache: 0 };
    for (experts, k, scoring, normalize, scale) in
        [(8usize, 2u32, Scoring::Softmax, false, 1.0), (16, 4, Scoring::Sigmoid, true, 2.5), (8, 3, Scoring::Softmax, true, 1.0)]
    {
        let logits = f32_input(&[Dim::B, Dim::S, Dim::lit(experts as i64)], &bind, 81);
        let n = 10 * k as usize;
        // Distinct experts per token, as top-k gives.
        let ids: Vec<i32> = (0..n).map(|p| ((p / k as usize * 3 + (p % k as usize) * 5) % experts) as i32).collect();
        let idx = (Ty::new(DType::I32, vec![Dim::B, Dim::S, Dim::lit(k as i64)]), Tensor::i32(&[2, 5, k as usize], ids));
        let dw = f32_input(&[Dim::B, Dim::S, Dim::lit(k as i64)], &bind, 82);
        let r = Routing {
            top_k: k,
            scoring,
            selection_bias: false,
            groups: 1,
            groups_kept: 1,
            group_score: None,
            normalize,
            scale: Float::new(scale),
        };
        check_node(Op::MoeRouteGrad(r), &[logits, idx, dw], bind, 1e-5);
    }
}

/// The routed experts' backward: tokens routed to overlapping sets of experts (some
/// experts reached by no pair get zero gradients), several slots per token, expert
/// sizes past one block of units.
#[test]
fn expert_ffn_grad_of_every_input() {
    for (experts, k, h, inter) in [(4usize, 2usize, 8usize, 6usize), (8, 3, 33, 130), (3, 1, 5, 4)] {
        let bind = Bindings { batch: 2, seq: 5, cache: 0 };
        let (b, s) = (Dim::B, Dim::S);
        let tokens = 10;
        // Distinct experts per token; expert `experts-1` is never chosen when k < experts.
        let ids: Vec<i32> = (0..tokens * k).map(|p| (((p / k) + (p % k) * 2) % (experts - usize::from(k < experts))) as i32).collect();
        let lit = |v: usize| Dim::lit(v as i64);
        let ins = [
            f32_input(&[b, s, lit(h)], &bind, 91),
            (Ty::new(DType::I32, vec![b, s, lit(k)]), Tensor::i32(&[2, 5, k], ids)),
            f32_input(&[b, s, lit(k)], &bind, 92),
            f32_input(&lits(&[experts, inter, h]), &bind, 93),
            f32_input(&lits(&[experts, inter, h]), &bind, 94),
            f32_input(&lits(&[experts, h, inter]), &bind, 95),
            f32_input(&[b, s, lit(h)], &bind, 96),
        ];
        check_node(Op::ExpertFfnGrad, &ins, bind, 2e-4);
    }
}

/// Mixed precision as a half-precision model's backward has it: a matmul head over f32
/// gradients rounded into an f16 stream with f16 epilogue inputs, and the expert backward
/// with the router's f32 gate weights under f16 activations (bf16 is the published
/// specs' case; WGSL has no bf16, so f16 stands in for it here).
#[test]
fn mixed_precision_backward_kernels() {
    use dsc_compiler::ir::fused::{FusedKernel, Head, Operand, Step, StepOp};
    use dsc_compiler::ir::BinaryOp;
    let bind = Bindings { batch: 2, seq: 5, cache: 0 };
    let (b, s) = (Dim::B, Dim::S);
    let half = |shape: &[Dim], seed| {
        let (_, t) = f32_input(shape, &bind, seed);
        let dims: Vec<usize> = t.shape().to_vec();
        (Ty::new(DType::F16, shape.to_vec()), random(&dims, seed, DType::F16))
    };
    let k = FusedKernel {
        head: Some(Head::MatMul),
        steps: vec![
            Step { op: StepOp::Binary(BinaryOp::Add), args: vec![Operand::Input(2), Operand::Input(3)] },
            Step { op: StepOp::Cast(DType::F16), args: vec![Operand::Head] },
            Step { op: StepOp::Binary(BinaryOp::Add), args: vec![Operand::Step(0), Operand::Step(1)] },
        ],
    };
    let ins = [
        f32_input(&[b, s, Dim::lit(40)], &bind, 101),
        f32_input(&lits(&[24, 40]), &bind, 102),
        half(&[b, s, Dim::lit(24)], 103),
        half(&[b, s, Dim::lit(24)], 104),
    ];
    let spec = check_node(Op::Fused(k), &ins, bind, 2e-2);
    assert!(spec.name().starts_with("matmul_ew_f16_from_f32"), "{}", spec.name());
    let (experts, kk, h, inter) = (4usize, 2usize, 16usize, 12usize);
    let ids: Vec<i32> = (0..10 * kk).map(|p| (((p / kk) + (p % kk)) % experts) as i32).collect();
    let lit = |v: usize| Dim::lit(v as i64);
    let ins = [
        half(&[b, s, lit(h)], 111),
        (Ty::new(DType::I32, vec![b, s, lit(kk)]), Tensor::i32(&[2, 5, kk], ids)),
        f32_input(&[b, s, lit(kk)], &bind, 112),
        half(&lits(&[experts, inter, h]), 113),
        half(&lits(&[experts, inter, h]), 114),
        half(&lits(&[experts, h, inter]), 115),
        half(&[b, s, lit(h)], 116),
    ];
    check_node(Op::ExpertFfnGrad, &ins, bind, 2e-2);
}
