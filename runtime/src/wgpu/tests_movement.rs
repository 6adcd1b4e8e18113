//! The data-movement, gather, rope, swiglu and fused-head kernels on the wgpu adapter
//! against the reference interpreter running the same node: random non-zero inputs,
//! sizes that are not multiples of any block or tile, symbolic shapes evaluated as a
//! step would (`s-1`, `c+s`, an empty cache), NaN-poisoned outputs, f32 tolerance
//! 1e-4·(1 + |ref|), f16 2e-2·(1 + |ref|).

use super::test_data::{backend, random};
use crate::reference::{run, Options, Tensor};
use dsc_compiler::codegen::launch::NodeWork;
use dsc_compiler::codegen::select::node_work;
use dsc_compiler::codegen::{kernel_source, KernelSpec, Target};
use dsc_compiler::ir::fused::{FusedKernel, Head, Operand, Step, StepOp};
use dsc_compiler::ir::{
    BinaryOp, Bindings, DType, Dim, Float, Function, Graph, Mode, Module, NodeId, Op, RopeLayout, Shape, Ty, UnaryOp, Value, Yarn,
};
use std::collections::HashMap;

/// Deterministic integers in `0..n` (indices, positions).
fn indices(shape: &[usize], n: i64, seed: i64) -> Tensor {
    let len: usize = shape.iter().product();
    Tensor::i64(shape, (0..len as i64).map(|i| (i * 7919 + seed * 104729).rem_euclid(n)).collect())
}

/// One input of a test node: its symbolic shape, dtype, and values (random floats when
/// `None`; integer inputs must give theirs).
struct In {
    shape: Vec<Dim>,
    dtype: DType,
    data: Option<Tensor>,
}

fn f(shape: Vec<Dim>, dtype: DType) -> In {
    In { shape, dtype, data: None }
}

fn int(shape: Vec<Dim>, data: Tensor) -> In {
    In { shape, dtype: DType::I64, data: Some(data) }
}

fn lits(s: &[usize]) -> Vec<Dim> {
    s.iter().map(|&d| Dim::lit(d as i64)).collect()
}

/// A graph holding `op` over inputs of types `ins`.
fn graph(op: &Op, ins: &[In]) -> (Graph, NodeId) {
    let mut g = Graph::new();
    let args: Vec<Value> =
        ins.iter().enumerate().map(|(i, x)| g.input(i as u32, &format!("x{i}"), Ty::new(x.dtype, x.shape.clone()), None).into()).collect();
    let n = g.add_inferred(op.clone(), &args, None).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    g.ret(&[n.into()], None);
    (g, n)
}

/// The inputs' values at `bind`.
fn values(ins: &[In], bind: &Bindings) -> Vec<Tensor> {
    ins.iter()
        .enumerate()
        .map(|(i, x)| {
            let dims: Vec<usize> = x.shape.iter().map(|d| d.eval(bind) as usize).collect();
            match &x.data {
                Some(t) => {
                    assert_eq!(t.shape(), dims.as_slice(), "input {i}");
                    t.clone()
                }
                None => random(&dims, 31 + i as u64, x.dtype),
            }
        })
        .collect()
}

/// Runs `op` over `ins` with sizes `bind` in the reference and on the device, compares,
/// and returns the node's work (for checks on the launches).
fn check(op: Op, ins: &[In], bind: Bindings) -> NodeWork {
    let (g, n) = graph(&op, ins);
    let work = node_work(&g, n).unwrap_or_else(|u| panic!("{op:?}: {u}"));
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g.clone() });
    m.set_entry(Mode::Prefill, "main");
    let inputs = values(ins, &bind);
    let want = run(&m, Mode::Prefill, &inputs, &HashMap::<String, Tensor>::new(), &Options::default())
        .unwrap_or_else(|e| panic!("reference {op:?}: {e}"))
        .remove(0);
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let got = backend().run_node(&g, n, &refs, &bind).unwrap_or_else(|e| panic!("{op:?}: {e}")).remove(0);
    let dtype = g.node(n).outputs[0].dtype;
    let tol = if dtype == DType::F16 { 2e-2 } else { 1e-4 };
    let (w, gv) = (want.to_f32_vec(), got.to_f32_vec());
    assert_eq!(want.shape(), got.shape(), "{op:?}");
    for (i, (a, b)) in w.iter().zip(&gv).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + a.abs()), "({op:?}, {dtype}) element {i}: reference {a}, device {b}");
    }
    work
}

fn at(batch: u64, seq: u64, cache: u64) -> Bindings {
    Bindings { batch, seq, cache }
}

#[test]
fn permute_slice_broadcast() {
    let f32_ = DType::F32;
    let none = Bindings::default();
    check(Op::Permute { perm: vec![2, 0, 1] }, &[f(lits(&[3, 5, 7]), f32_)], none);
    check(Op::Permute { perm: vec![0, 2, 1, 3] }, &[f(lits(&[2, 3, 5, 7]), f32_)], none);
    check(Op::Permute { perm: vec![1, 0] }, &[f(lits(&[33, 17]), DType::F16)], none);
    // Symbolic batch and sequence, as the attention permutes.
    check(Op::Permute { perm: vec![0, 2, 1, 3] }, &[f(vec![Dim::B, Dim::S, Dim::lit(3), Dim::lit(16)], f32_)], at(2, 5, 0));

    check(Op::Slice { axis: 1, start: Dim::lit(5), len: Dim::lit(20) }, &[f(lits(&[3, 37, 11]), f32_)], none);
    check(
        Op::Slice { axis: 3, start: Dim::lit(16), len: Dim::lit(8) },
        &[f(vec![Dim::B, Dim::S, Dim::lit(3), Dim::lit(24)], f32_)],
        at(2, 3, 0),
    );
    // The last position of each sequence: a symbolic start.
    let last = Op::Slice { axis: 1, start: Dim::S - 1, len: Dim::lit(1) };
    check(last.clone(), &[f(vec![Dim::B, Dim::S, Dim::lit(13)], f32_)], at(3, 7, 0));
    check(last, &[f(vec![Dim::B, Dim::S, Dim::lit(13)], DType::F16)], at(2, 1, 0));

    let shape = |d: Vec<Dim>| Shape::new(d);
    check(Op::Broadcast { shape: shape(lits(&[4, 5, 7])) }, &[f(lits(&[5, 1]), f32_)], none);
    check(Op::Broadcast { shape: shape(lits(&[2, 3, 16, 24])) }, &[f(lits(&[3, 16, 24]), f32_)], none);
    check(
        Op::Broadcast { shape: shape(vec![Dim::B, Dim::S, Dim::lit(3), Dim::lit(8)]) },
        &[f(vec![Dim::B, Dim::S, Dim::lit(1), Dim::lit(8)], f32_)],
        at(2, 9, 0),
    );
}

#[test]
fn concat_and_cache_append() {
    let none = Bindings::default();
    let w = check(
        Op::Concat { axis: 1 },
        &[f(lits(&[2, 3, 5]), DType::F32), f(lits(&[2, 4, 5]), DType::F32), f(lits(&[2, 1, 5]), DType::F32)],
        none,
    );
    assert_eq!(w.kernels().count(), 3, "one copy per input");
    check(
        Op::Concat { axis: 3 },
        &[f(vec![Dim::B, Dim::S, Dim::lit(3), Dim::lit(16)], DType::F32), f(vec![Dim::B, Dim::S, Dim::lit(3), Dim::lit(8)], DType::F32)],
        at(2, 3, 0),
    );
    check(Op::Concat { axis: 0 }, &[f(lits(&[3, 7]), DType::F16), f(lits(&[5, 7]), DType::F16)], none);
    // The decode cache: [b, c, d] + [b, s, d] → [b, c+s, d], including an empty cache.
    let ins = || [f(vec![Dim::B, Dim::C, Dim::lit(24)], DType::F32), f(vec![Dim::B, Dim::S, Dim::lit(24)], DType::F32)];
    for bind in [at(2, 1, 5), at(3, 4, 0), at(1, 1, 300)] {
        check(Op::CacheAppend { axis: 1 }, &ins(), bind);
    }
}

#[test]
fn gather_rows_and_axis() {
    let ids = indices(&[2, 5], 37, 1);
    check(Op::Gather { axis: 0 }, &[f(lits(&[37, 19]), DType::F32), int(lits(&[2, 5]), ids.clone())], Bindings::default());
    check(Op::Gather { axis: 0 }, &[f(lits(&[37, 19]), DType::F16), int(lits(&[2, 5]), ids)], Bindings::default());
    // Symbolic ids [b, s], and a middle axis: [3, 11, 5] by [4] → [3, 4, 5].
    let bind = at(3, 4, 0);
    check(Op::Gather { axis: 0 }, &[f(lits(&[300, 48]), DType::F32), int(vec![Dim::B, Dim::S], indices(&[3, 4], 300, 2))], bind);
    check(Op::Gather { axis: 1 }, &[f(lits(&[3, 11, 5]), DType::F32), int(lits(&[4]), indices(&[4], 11, 3))], Bindings::default());
}

#[test]
fn gather_out_of_range_ids_give_zero_rows() {
    let ins = [f(lits(&[6, 9]), DType::F32), int(lits(&[4]), Tensor::i64(&[4], vec![2, -1, 6, 5]))];
    let (g, n) = graph(&Op::Gather { axis: 0 }, &ins);
    let table = random(&[6, 9], 5, DType::F32);
    let got = backend().run_node(&g, n, &[&table, ins[1].data.as_ref().unwrap()], &Bindings::default()).unwrap().remove(0).to_f32_vec();
    let t = table.to_f32_vec();
    assert_eq!(&got[..9], &t[18..27]);
    assert!(got[9..27].iter().all(|&v| v == 0.0), "ids -1 and 6 of 6 rows: {:?}", &got[9..27]);
    assert_eq!(&got[27..], &t[45..54]);
}

fn yarn() -> Yarn {
    Yarn {
        factor: Float::new(8.0),
        original_context: 32,
        beta_fast: Float::new(32.0),
        beta_slow: Float::new(1.0),
        mscale: Float::new(0.707),
        mscale_all_dim: Float::new(1.0),
    }
}

#[test]
fn rope_layouts_ranks_yarn() {
    let rope = |layout, rotary_dim, yarn| Op::Rope { layout, theta: Float::new(10000.0), rotary_dim, yarn };
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        // Rank 4 with partial rotation and positions up to thousands of radians.
        let pos = indices(&[2, 7], 6000, 4);
        let x = f(vec![Dim::B, Dim::S, Dim::lit(3), Dim::lit(24)], DType::F32);
        check(rope(layout, 16, None), &[x, int(vec![Dim::B, Dim::S], pos.clone())], at(2, 7, 0));
        // Rank 3, the full head rotated, YaRN (mscale ≠ 1).
        let x = f(vec![Dim::B, Dim::S, Dim::lit(8)], DType::F32);
        check(rope(layout, 8, Some(yarn())), &[x, int(vec![Dim::B, Dim::S], pos)], at(2, 7, 0));
        // Odd head size around an even rotary_dim; f16 with positions f16 holds exactly.
        let x = f(lits(&[3, 5, 2, 10]), DType::F16);
        check(rope(layout, 6, Some(yarn())), &[x, int(lits(&[3, 5]), indices(&[3, 5], 200, 5))], Bindings::default());
    }
}

#[test]
fn swiglu_dense_ffn() {
    let (h, i) = (37, 29);
    let ins = |dt| {
        [
            f(vec![Dim::B, Dim::S, Dim::lit(h)], dt),
            f(lits(&[i as usize, h as usize]), dt),
            f(lits(&[i as usize, h as usize]), dt),
            f(lits(&[h as usize, i as usize]), dt),
        ]
    };
    let w = check(Op::SwiGlu, &ins(DType::F32), at(2, 5, 0));
    // gate/up then down, each in its skinny and tiled forms (run-time rows b·s).
    let names: Vec<String> = w.kernels().map(|k| k.name()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names[0].starts_with("matmul_gate_up_f32_skinny") && names[1] == "matmul_gate_up_f32", "{names:?}");
    let NodeWork::Launches { launches, .. } = &w else { panic!("launches") };
    assert_eq!(launches.iter().filter(|l| l.runs(&at(2, 5, 0))).count(), 2, "one form of each runs");
    check(Op::SwiGlu, &ins(DType::F32), at(1, 1, 0));
    check(Op::SwiGlu, &ins(DType::F16), at(3, 2, 0));
    // Across the 64×64 output tiles: 65 rows, i = 130 and h = 70 (partial tiles both ways).
    let (h, i) = (70usize, 130usize);
    let wide = [
        f(vec![Dim::B, Dim::S, Dim::lit(h as i64)], DType::F32),
        f(lits(&[i, h]), DType::F32),
        f(lits(&[i, h]), DType::F32),
        f(lits(&[h, i]), DType::F32),
    ];
    check(Op::SwiGlu, &wide, at(5, 13, 0));
}

fn step(op: StepOp, args: &[Operand]) -> Step {
    Step { op, args: args.to_vec() }
}

#[test]
fn fused_matmul_and_rms_norm_heads() {
    use Operand::{Head as H, Input as I, Step as S};
    let add = StepOp::Binary(BinaryOp::Add);
    let mul = StepOp::Binary(BinaryOp::Mul);
    // The residual add after o_proj: {h=matmul(i0, i1); s0=add(i2, h)}.
    let residual = FusedKernel { head: Some(Head::MatMul), steps: vec![step(add, &[I(2), H])] };
    let x = |dt| f(vec![Dim::B, Dim::S, Dim::lit(36)], dt);
    let out = |dt| f(vec![Dim::B, Dim::S, Dim::lit(19)], dt);
    check(Op::Fused(residual.clone()), &[x(DType::F32), f(lits(&[19, 36]), DType::F32), out(DType::F32)], at(2, 9, 0));
    check(Op::Fused(residual), &[x(DType::F16), f(lits(&[19, 36]), DType::F16), out(DType::F16)], at(1, 3, 0));
    // A bias row (strided), a scalar, silu, and a head alone.
    let k = FusedKernel {
        head: Some(Head::MatMul),
        steps: vec![step(add, &[H, I(2)]), step(StepOp::Unary(UnaryOp::Silu), &[S(0)]), step(mul, &[S(1), I(3)])],
    };
    let k2 = k.clone();
    check(
        Op::Fused(k),
        &[f(lits(&[17, 33]), DType::F32), f(lits(&[21, 33]), DType::F32), f(lits(&[21]), DType::F32), f(vec![], DType::F32)],
        Bindings::default(),
    );
    // The same across the 64×64 output tiles (partial tiles along both axes).
    check(
        Op::Fused(k2.clone()),
        &[f(lits(&[130, 65]), DType::F32), f(lits(&[65, 65]), DType::F32), f(lits(&[65]), DType::F32), f(vec![], DType::F32)],
        Bindings::default(),
    );
    check(
        Op::Fused(FusedKernel { head: Some(Head::MatMul), steps: vec![] }),
        &[f(lits(&[5, 40]), DType::F32), f(lits(&[3, 40]), DType::F32)],
        Bindings::default(),
    );
    // rms_norm heads: {h=rms_norm(i0, i1); s0=mul(h, i2)} with a full and a broadcast column.
    let norm = FusedKernel { head: Some(Head::RmsNorm { eps: Float::new(1e-6) }), steps: vec![step(mul, &[H, I(2)])] };
    for (d, third) in [(129usize, vec![Dim::B, Dim::S, Dim::lit(129)]), (300, vec![Dim::B, Dim::S, Dim::lit(1)])] {
        let ins = [f(vec![Dim::B, Dim::S, Dim::lit(d as i64)], DType::F32), f(lits(&[d]), DType::F32), f(third, DType::F32)];
        check(Op::Fused(norm.clone()), &ins, at(2, 3, 0));
    }
    let ins = [f(lits(&[4, 200]), DType::F16), f(lits(&[200]), DType::F16), f(lits(&[4, 200]), DType::F16)];
    check(Op::Fused(norm), &ins, Bindings::default());
}

#[test]
fn casts_between_f32_and_f16() {
    // Values that f16 cannot hold exactly, so the narrowing cast must round (to nearest
    // even, as the reference).
    let x = Tensor::from_fn(&[3, 157], |i| (i as f32 * 0.7310586).sin() * 3.0 + 1e-3);
    let to16 = [In { shape: lits(&[3, 157]), dtype: DType::F32, data: Some(x) }];
    check(Op::Cast { to: DType::F16 }, &to16, Bindings::default());
    check(Op::Cast { to: DType::F32 }, &[f(vec![Dim::B, Dim::S, Dim::lit(33)], DType::F16)], at(2, 5, 0));
}

#[test]
fn unsupported_cases_say_why() {
    // A step reading the head's own input would bind one buffer twice.
    let k = FusedKernel {
        head: Some(Head::RmsNorm { eps: Float::new(1e-6) }),
        steps: vec![Step { op: StepOp::Binary(BinaryOp::Add), args: vec![Operand::Head, Operand::Input(0)] }],
    };
    let (g, n) = graph(&Op::Fused(k), &[f(lits(&[4, 8]), DType::F32), f(lits(&[8]), DType::F32)]);
    let e = KernelSpec::from_node(&g, n).unwrap_err();
    assert!(e.reason.contains("head's own inputs"), "{e}");
    // Integer tensors move (as i32) but do not cast to floats yet.
    let (g, n) = graph(&Op::Permute { perm: vec![1, 0] }, &[In { shape: lits(&[2, 3]), dtype: DType::I64, data: None }]);
    assert_eq!(KernelSpec::from_node(&g, n).unwrap(), KernelSpec::CopyI32 { rank: 2 });
    let (g, n) = graph(&Op::Cast { to: DType::F32 }, &[In { shape: lits(&[2, 3]), dtype: DType::I64, data: None }]);
    assert!(KernelSpec::from_node(&g, n).unwrap_err().reason.contains("a cast from i64 to f32"));
}

#[test]
fn sources_are_deterministic() {
    let ids = |shape: Vec<Dim>| In { shape, dtype: DType::I64, data: None };
    let mut specs: Vec<KernelSpec> = Vec::new();
    let mut add = |op: Op, ins: &[In]| {
        let (g, n) = graph(&op, ins);
        specs.extend(node_work(&g, n).unwrap_or_else(|u| panic!("{op:?}: {u}")).kernels().cloned());
    };
    add(Op::Permute { perm: vec![0, 2, 1, 3] }, &[f(vec![Dim::B, Dim::S, Dim::lit(3), Dim::lit(16)], DType::F32)]);
    add(Op::Concat { axis: 1 }, &[f(lits(&[2, 3]), DType::F16), f(lits(&[2, 4]), DType::F16)]);
    add(Op::Gather { axis: 0 }, &[f(lits(&[37, 19]), DType::F32), ids(vec![Dim::B, Dim::S])]);
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let op = Op::Rope { layout, theta: Float::new(10000.0), rotary_dim: 8, yarn: Some(yarn()) };
        add(op, &[f(lits(&[1, 2, 8]), DType::F32), ids(lits(&[1, 2]))]);
    }
    add(
        Op::SwiGlu,
        &[f(lits(&[3, 8]), DType::F16), f(lits(&[5, 8]), DType::F16), f(lits(&[5, 8]), DType::F16), f(lits(&[8, 5]), DType::F16)],
    );
    let k = FusedKernel { head: Some(Head::MatMul), steps: vec![step(StepOp::Binary(BinaryOp::Add), &[Operand::Input(2), Operand::Head])] };
    add(Op::Fused(k), &[f(lits(&[3, 8]), DType::F32), f(lits(&[5, 8]), DType::F32), f(lits(&[5]), DType::F32)]);
    let k = FusedKernel {
        head: Some(Head::RmsNorm { eps: Float::new(1e-6) }),
        steps: vec![step(StepOp::Binary(BinaryOp::Mul), &[Operand::Head, Operand::Input(2)])],
    };
    add(Op::Fused(k), &[f(lits(&[3, 8]), DType::F16), f(lits(&[8]), DType::F16), f(lits(&[3, 8]), DType::F16)]);
    add(Op::Cast { to: DType::F16 }, &[f(lits(&[3, 8]), DType::F32)]);
    add(Op::Cast { to: DType::F32 }, &[f(lits(&[3, 8]), DType::F16)]);
    for s in &specs {
        for t in [Target::Cuda, Target::Wgsl] {
            let a = kernel_source(s, t);
            assert!(a == kernel_source(s, t), "{} {t:?}: two generations differ", s.name());
            assert!(a.contains(&s.name()), "{a}");
        }
    }
}

/// A matmul over a run-time number of rows carries both forms, each launched where it
/// fits: the skinny one (8-row tiles) up to `SKINNY_ROWS` rows, the 64-row tiled one past
/// it; both match the reference on either side of the boundary and across column tiles.
#[test]
fn skinny_and_tiled_matmuls_by_rows() {
    use dsc_compiler::codegen::select::SKINNY_ROWS;
    let ins = [f(vec![Dim::B, Dim::S, Dim::lit(70)], DType::F32), f(lits(&[130, 70]), DType::F32)];
    for (b, s) in [(1, 1), (2, 8), (17, 1), (3, 7)] {
        let bind = at(b, s, 0);
        let w = check(Op::MatMul, &ins, bind);
        let NodeWork::Launches { launches, .. } = &w else { panic!("a matmul launches") };
        let running: Vec<bool> = launches.iter().map(|l| l.runs(&bind)).collect();
        let skinny = (b * s) as i64 <= SKINNY_ROWS;
        assert_eq!(running, [skinny, !skinny], "{} rows", b * s);
    }
    // Constant rows pick one form when planned.
    let w = check(Op::MatMul, &[f(lits(&[5, 40]), DType::F16), f(lits(&[3, 40]), DType::F16)], Bindings::default());
    assert_eq!(w.kernels().map(|k| k.name()).collect::<Vec<_>>(), ["matmul_f16_skinny"]);
}
