//! Every codegen kernel on the wgpu adapter (lavapipe in CI) against the reference
//! interpreter running the same node: random non-zero inputs, sizes that are not
//! multiples of any block or tile, NaN-poisoned outputs, tolerance by dtype. There is
//! no skip: without an adapter [`WgpuBackend::new`] panics and the tests fail.

use super::test_data::{backend, random};
use crate::reference::{run, Options, Tensor};
use dsc_compiler::codegen::KernelSpec;
use dsc_compiler::ir::fused::{FusedKernel, Operand, Step, StepOp};
use dsc_compiler::ir::{BinaryOp, Bindings, DType, Dim, Float, Function, Graph, Mode, Module, Op, Ty, UnaryOp, Value};

/// Builds `op` over inputs of `shapes`, runs it in the reference interpreter and on the
/// device, and compares.
fn check(op: Op, shapes: &[&[usize]], dtype: DType) {
    let mut g = Graph::new();
    let args: Vec<Value> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let dims: Vec<Dim> = s.iter().map(|&d| Dim::lit(d as i64)).collect();
            g.input(i as u32, &format!("x{i}"), Ty::new(dtype, dims), None).into()
        })
        .collect();
    let n = g.add_inferred(op.clone(), &args, None).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    g.ret(&[n.into()], None);
    let spec = KernelSpec::from_node(&g, n).unwrap_or_else(|u| panic!("{op:?}: {u}"));
    let node = n;
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g.clone() });
    m.set_entry(Mode::Prefill, "main");

    let inputs: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| random(s, 17 + i as u64, dtype)).collect();
    let want = run(&m, Mode::Prefill, &inputs, &std::collections::HashMap::<String, Tensor>::new(), &Options::default())
        .unwrap_or_else(|e| panic!("reference {op:?}: {e}"))
        .remove(0);
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let got = backend().run_node(&g, node, &refs, &Bindings::default()).unwrap_or_else(|e| panic!("{}: {e}", spec.name())).remove(0);
    // f16 keeps 11 significant bits; its results also round every intermediate.
    let tol = if dtype == DType::F16 { 2e-2 } else { 1e-4 };
    let (w, gv) = (want.to_f32_vec(), got.to_f32_vec());
    assert_eq!(w.len(), gv.len());
    for (i, (a, b)) in w.iter().zip(&gv).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + a.abs()), "{} ({op:?}, {dtype}) element {i}: reference {a}, device {b}", spec.name());
    }
}

#[test]
fn unary_and_binary_nodes() {
    for u in [UnaryOp::Neg, UnaryOp::Exp, UnaryOp::Silu, UnaryOp::Tanh, UnaryOp::Rsqrt, UnaryOp::Abs] {
        let x = if u == UnaryOp::Rsqrt {
            Op::Fused(FusedKernel {
                head: None,
                steps: vec![
                    Step { op: StepOp::Unary(UnaryOp::Abs), args: vec![Operand::Input(0)] },
                    Step { op: StepOp::Unary(UnaryOp::Rsqrt), args: vec![Operand::Step(0)] },
                ],
            })
        } else {
            Op::Unary(u)
        };
        check(x, &[&[3, 37, 11]], DType::F32);
    }
    for b in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min] {
        // Same shape, a broadcast row, a broadcast column and a rank-0 operand.
        check(Op::Binary(b), &[&[5, 301], &[5, 301]], DType::F32);
        check(Op::Binary(b), &[&[5, 301], &[301]], DType::F32);
        check(Op::Binary(b), &[&[3, 5, 7], &[3, 1, 7]], DType::F32);
        check(Op::Binary(b), &[&[7, 13], &[]], DType::F32);
    }
    check(Op::Binary(BinaryOp::Mul), &[&[3, 257], &[3, 1]], DType::F16);
}

#[test]
fn fused_program_with_select_and_broadcast() {
    // silu(i0) * i1 + (i2 < i0 ? i2 : i0·i0), with i1 broadcast along rows.
    let k = FusedKernel {
        head: None,
        steps: vec![
            Step { op: StepOp::Unary(UnaryOp::Silu), args: vec![Operand::Input(0)] },
            Step { op: StepOp::Binary(BinaryOp::Mul), args: vec![Operand::Step(0), Operand::Input(1)] },
            Step { op: StepOp::Binary(BinaryOp::Lt), args: vec![Operand::Input(2), Operand::Input(0)] },
            Step { op: StepOp::Binary(BinaryOp::Mul), args: vec![Operand::Input(0), Operand::Input(0)] },
            Step { op: StepOp::Select, args: vec![Operand::Step(2), Operand::Input(2), Operand::Step(3)] },
            Step { op: StepOp::Binary(BinaryOp::Add), args: vec![Operand::Step(1), Operand::Step(4)] },
        ],
    };
    check(Op::Fused(k.clone()), &[&[9, 131], &[131], &[9, 131]], DType::F32);
    check(Op::Fused(k), &[&[9, 131], &[131], &[9, 131]], DType::F16);
}

#[test]
fn rms_norm_rows() {
    for (rows, cols) in [(1, 7), (5, 129), (3, 1000)] {
        check(Op::RmsNorm { eps: Float::new(1e-6) }, &[&[rows, cols], &[cols]], DType::F32);
    }
    check(Op::RmsNorm { eps: Float::new(1e-5) }, &[&[2, 3, 77], &[77]], DType::F32);
    check(Op::RmsNorm { eps: Float::new(1e-6) }, &[&[4, 200], &[200]], DType::F16);
}

#[test]
fn softmax_last_axis() {
    for shape in [&[1usize, 5][..], &[6, 129], &[2, 3, 1001]] {
        check(Op::Softmax { axis: (shape.len() - 1) as u8 }, &[shape], DType::F32);
    }
    check(Op::Softmax { axis: 1 }, &[&[3, 300]], DType::F16);
}

#[test]
fn tiled_matmul_odd_sizes() {
    for (m, k, n) in [(1, 1, 1), (17, 33, 19), (5, 100, 47), (40, 7, 3)] {
        check(Op::MatMul, &[&[m, k], &[n, k]], DType::F32);
    }
    check(Op::MatMul, &[&[2, 9, 21], &[13, 21]], DType::F32);
    check(Op::MatMul, &[&[9, 37], &[11, 37]], DType::F16);
    // Around the 64×64 output tile and the 16-wide k step: partial and several tiles.
    for (m, k, n) in [(63, 65, 130), (65, 1, 63), (130, 63, 1), (1, 130, 65)] {
        check(Op::MatMul, &[&[m, k], &[n, k]], DType::F32);
    }
    check(Op::MatMul, &[&[65, 130], &[63, 130]], DType::F16);
}

/// More elements than 65,535 cubes of 256 units cover: the grid folds into y
/// (`launch::grid_linear`) and every element is still written once.
#[test]
fn elementwise_beyond_one_grid_axis() {
    check(Op::Unary(UnaryOp::Neg), &[&[65_536 * 256 + 37]], DType::F32);
}

/// More rows than one grid axis holds (65,535): row kernels fold their rows into `x · z`
/// (`launch::grid_rows`), each row is computed once, and the cubes past the last row of
/// the last slice write nothing (the outputs are NaN-poisoned, so a skipped row shows).
#[test]
fn row_kernels_beyond_one_grid_axis() {
    let rows = 65_535 + 1_000;
    check(Op::RmsNorm { eps: Float::new(1e-6) }, &[&[rows, 3], &[3]], DType::F32);
    check(Op::Softmax { axis: 1 }, &[&[rows, 2]], DType::F32);
    let k = Op::TopK { k: 1, axis: 1 };
    let mut g = Graph::new();
    let x = g.input(0, "x", Ty::new(DType::F32, vec![Dim::lit(rows as i64), Dim::lit(3)]), None);
    let n = g.add_inferred(k, &[x.into()], None).unwrap();
    let input = random(&[rows, 3], 5, DType::F32);
    let got = backend().run_node(&g, n, &[&input], &Bindings::default()).unwrap();
    let (v, idx) = (got[0].to_f32_vec(), got[1].to_f32_vec());
    let xs = input.to_f32_vec();
    for r in 0..rows {
        let row = &xs[r * 3..r * 3 + 3];
        let best = (0..3).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        assert_eq!((v[r], idx[r] as usize), (row[best], best), "row {r}");
    }
}
