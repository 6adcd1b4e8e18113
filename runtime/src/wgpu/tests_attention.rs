//! The attention and batch_matmul kernels on the wgpu adapter against the reference
//! interpreter running the same node: random non-zero inputs, sizes that are not
//! multiples of the row block, key tile or dk chunk, NaN-poisoned outputs, f32 tolerance
//! 1e-4·(1 + |ref|), f16 2e-2·(1 + |ref|). Shapes may be symbolic (`b`, `s`, `c + s`), so
//! the launch expressions are evaluated the way a decode step would.

use super::test_data::{backend, random};
use crate::reference::{run, Options, Tensor};
use dsc_compiler::codegen::{kernel_source, KernelSpec, Target};
use dsc_compiler::ir::{Bindings, DType, Dim, Float, Function, Graph, Mode, Module, Op, Ty, Value};
use std::collections::HashMap;

/// Runs `op` over inputs of symbolic `shapes` (their values `data`, or random when
/// `None`) with sizes `bind`, in the reference and on the device, and compares. Returns
/// the kernel spec for further checks.
fn check_with(op: Op, shapes: &[Vec<Dim>], data: &[Option<Tensor>], dtype: DType, bind: Bindings) -> KernelSpec {
    let mut g = Graph::new();
    let args: Vec<Value> =
        shapes.iter().enumerate().map(|(i, s)| g.input(i as u32, &format!("x{i}"), Ty::new(dtype, s.clone()), None).into()).collect();
    let n = g.add_inferred(op.clone(), &args, None).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    g.ret(&[n.into()], None);
    let spec = KernelSpec::from_node(&g, n).unwrap_or_else(|u| panic!("{op:?}: {u}"));
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g.clone() });
    m.set_entry(Mode::Prefill, "main");

    let inputs: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let dims: Vec<usize> = s.iter().map(|d| d.eval(&bind) as usize).collect();
            match data.get(i).cloned().flatten() {
                Some(t) => {
                    assert_eq!(t.shape(), dims.as_slice(), "input {i}");
                    t
                }
                None => random(&dims, 31 + i as u64, dtype),
            }
        })
        .collect();
    let want = run(&m, Mode::Prefill, &inputs, &HashMap::<String, Tensor>::new(), &Options::default())
        .unwrap_or_else(|e| panic!("reference {op:?}: {e}"))
        .remove(0);
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let got = backend().run_node(&g, n, &refs, &bind).unwrap_or_else(|e| panic!("{}: {e}", spec.name())).remove(0);
    let tol = if dtype == DType::F16 { 2e-2 } else { 1e-4 };
    let (w, gv) = (want.to_f32_vec(), got.to_f32_vec());
    assert_eq!(w.len(), gv.len());
    for (i, (a, b)) in w.iter().zip(&gv).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + a.abs()), "{} ({op:?}, {dtype}) element {i}: reference {a}, device {b}", spec.name());
    }
    spec
}

fn lits(s: &[usize]) -> Vec<Dim> {
    s.iter().map(|&d| Dim::lit(d as i64)).collect()
}

fn attn(heads: u32, kv_heads: u32, dk: usize, causal: bool, masked: bool) -> Op {
    Op::Attention { heads, kv_heads, scale: Float::new(1.0 / (dk as f64).sqrt()), causal, masked, lse: false }
}

/// Attention over literal shapes `[b, sq, heads, dk]` and `[b, sk, kv_heads, dk|dv]`.
#[allow(clippy::too_many_arguments)]
fn check_attn(b: usize, sq: usize, sk: usize, heads: u32, kv_heads: u32, dk: usize, dv: usize, causal: bool, dtype: DType) -> KernelSpec {
    let (h, kv) = (heads as usize, kv_heads as usize);
    let shapes = [lits(&[b, sq, h, dk]), lits(&[b, sk, kv, dk]), lits(&[b, sk, kv, dv])];
    check_with(attn(heads, kv_heads, dk, causal, false), &shapes, &[], dtype, Bindings::default())
}

#[test]
fn attention_mha_and_gqa() {
    // Multi-head, non-causal; 19 keys = a full tile and a partial one.
    check_attn(2, 5, 19, 4, 4, 16, 16, false, DType::F32);
    // Grouped-query, causal prefill over 37 positions: three query blocks, three key tiles.
    check_attn(2, 37, 37, 6, 2, 12, 12, true, DType::F32);
    // Four heads per kv head, head size 80 (two dk chunks, the second partial).
    check_attn(1, 9, 9, 8, 2, 80, 80, true, DType::F32);
}

#[test]
fn attention_decode_and_chunked_prefill() {
    // Decode with a cache: one query, 77 keys.
    check_attn(3, 1, 77, 4, 2, 24, 24, true, DType::F32);
    check_attn(1, 1, 77, 5, 5, 24, 24, true, DType::F32);
    // Chunked prefill: 5 new queries over 23 keys, bottom-right aligned.
    check_attn(2, 5, 23, 4, 1, 16, 16, true, DType::F32);
    // More queries than keys: the first queries see nothing and give zeros.
    check_attn(1, 3, 2, 1, 1, 2, 2, true, DType::F32);
    check_attn(2, 20, 7, 3, 1, 8, 8, true, DType::F32);
}

#[test]
fn attention_symbolic_decode_step() {
    // The shapes a decode entry point has: q [b, s, h, d], k and v [b, c+s, kv, d].
    let (h, kv, d) = (6usize, 2usize, 20usize);
    let shapes = [
        vec![Dim::B, Dim::S, Dim::lit(h as i64), Dim::lit(d as i64)],
        vec![Dim::B, Dim::C + Dim::S, Dim::lit(kv as i64), Dim::lit(d as i64)],
        vec![Dim::B, Dim::C + Dim::S, Dim::lit(kv as i64), Dim::lit(d as i64)],
    ];
    for bind in [Bindings { batch: 2, seq: 1, cache: 40 }, Bindings { batch: 1, seq: 19, cache: 6 }] {
        check_with(attn(h as u32, kv as u32, d, true, false), &shapes, &[], DType::F32, bind);
    }
}

#[test]
fn attention_masked_with_neg_inf_rows() {
    let (b, sq, sk, heads, dk) = (2usize, 6usize, 21usize, 4u32, 16usize);
    // Padding-style mask: -inf on some keys, a whole -inf row (a query that sees nothing:
    // zeros, as the reference), a row of large finite negatives (an ordinary softmax).
    let mut m = vec![0.0f32; b * sq * sk];
    for bi in 0..b {
        for i in 0..sq {
            for j in 0..sk {
                let at = (bi * sq + i) * sk + j;
                m[at] = match (bi, i) {
                    (0, 2) => f32::NEG_INFINITY,
                    (1, 4) => -1e4 - j as f32,
                    _ if j < 3 + bi * 2 || (j + i) % 7 == 0 => f32::NEG_INFINITY,
                    _ => 0.25 * ((j + i) % 3) as f32,
                };
            }
        }
    }
    let mask = Tensor::f32(&[b, sq, sk], m);
    let shapes = [lits(&[b, sq, 4, dk]), lits(&[b, sk, 2, dk]), lits(&[b, sk, 2, dk]), lits(&[b, sq, sk])];
    for causal in [false, true] {
        let data = [None, None, None, Some(mask.clone())];
        check_with(attn(heads, 2, dk, causal, true), &shapes, &data, DType::F32, Bindings::default());
    }
    // A row whose first key tile is all -inf and later keys visible: the running max
    // starts at -inf and must recover.
    let sk = 40;
    let m: Vec<f32> = (0..sq * sk).map(|e| if e % sk < 20 { f32::NEG_INFINITY } else { 0.5 }).collect();
    let shapes = [lits(&[1, sq, 2, dk]), lits(&[1, sk, 1, dk]), lits(&[1, sk, 1, dk]), lits(&[1, sq, sk])];
    let data = [None, None, None, Some(Tensor::f32(&[1, sq, sk], m))];
    check_with(attn(2, 1, dk, false, true), &shapes, &data, DType::F32, Bindings::default());
}

#[test]
fn attention_dk_differs_from_dv() {
    // Naive MLA: per-head keys with a rope part, narrower values.
    check_attn(2, 7, 7, 3, 3, 24, 10, true, DType::F32);
    // Absorbed MLA at small scale: one kv head (the latent), dk = 64 + 8, dv = 64.
    check_attn(2, 3, 29, 8, 1, 72, 64, true, DType::F32);
    check_attn(1, 1, 33, 16, 1, 72, 64, true, DType::F32);
}

#[test]
fn attention_absorbed_mla_real_width() {
    // kv_lora_rank 512 + rope 64 over a shared latent, few keys: 8-key tiles, 9 dk chunks.
    let spec = check_attn(1, 2, 11, 4, 1, 576, 512, true, DType::F32);
    let KernelSpec::Attention { cfg, .. } = spec else { panic!("{spec:?}") };
    assert_eq!((cfg.keys, cfg.rows), (8, 8));
    check_attn(1, 1, 5, 16, 1, 576, 512, true, DType::F32);
}

#[test]
fn attention_f16() {
    check_attn(2, 11, 11, 4, 2, 32, 32, true, DType::F16);
    check_attn(1, 1, 45, 4, 1, 72, 64, true, DType::F16);
}

#[test]
fn batch_matmul_odd_sizes() {
    for (batch, m, k, n) in [(&[1usize][..], 1, 1, 1), (&[3], 17, 33, 19), (&[2, 3], 5, 40, 21), (&[4], 1, 24, 12)] {
        let a: Vec<usize> = batch.iter().copied().chain([m, k]).collect();
        let b: Vec<usize> = batch.iter().copied().chain([k, n]).collect();
        check_with(Op::BatchMatMul, &[lits(&a), lits(&b)], &[], DType::F32, Bindings::default());
    }
    // No batch axes at all (rank 2), and f16.
    check_with(Op::BatchMatMul, &[lits(&[7, 13]), lits(&[13, 9])], &[], DType::F32, Bindings::default());
    check_with(Op::BatchMatMul, &[lits(&[2, 9, 37]), lits(&[2, 37, 11])], &[], DType::F16, Bindings::default());
    // Symbolic batch, as decode's absorbed MLA has it: [b, heads, 1, d] · [b, heads, d, r].
    let a = vec![Dim::B, Dim::lit(3), Dim::S, Dim::lit(16)];
    let b = vec![Dim::B, Dim::lit(3), Dim::lit(16), Dim::lit(24)];
    check_with(Op::BatchMatMul, &[a.clone(), b.clone()], &[], DType::F32, Bindings { batch: 2, seq: 1, cache: 0 });
    // A batch past the 65,535 cubes of one grid axis (b · heads of a large decode batch),
    // with two m tiles per element: the grid folds it into y · z.
    check_with(Op::BatchMatMul, &[a, b], &[], DType::F32, Bindings { batch: 21_846, seq: 17, cache: 0 });
}

#[test]
fn sources_are_deterministic() {
    let mut specs = vec![KernelSpec::BatchMatMul { elem: dsc_compiler::codegen::Elem::F32, rank: 2, accumulate: false }];
    for (op, shapes) in [
        (attn(4, 2, 24, true, false), [lits(&[1, 1, 4, 24]), lits(&[1, 9, 2, 24]), lits(&[1, 9, 2, 24])]),
        (attn(16, 1, 576, true, false), [lits(&[1, 3, 16, 576]), lits(&[1, 9, 1, 576]), lits(&[1, 9, 1, 512])]),
    ] {
        for dtype in [DType::F32, DType::F16] {
            let mut g = Graph::new();
            let args: Vec<Value> =
                shapes.iter().enumerate().map(|(i, s)| g.input(i as u32, "x", Ty::new(dtype, s.clone()), None).into()).collect();
            let n = g.add_inferred(op.clone(), &args, None).unwrap();
            specs.push(KernelSpec::from_node(&g, n).unwrap());
        }
    }
    for s in &specs {
        for t in [Target::Cuda, Target::Wgsl] {
            let a = kernel_source(s, t);
            assert!(a == kernel_source(s, t), "{} {t:?}: two generations differ", s.name());
            assert!(a.contains(&s.name()), "{a}");
        }
    }
    assert!(specs[1].name().starts_with("attention_f32_"), "{}", specs[1].name());
}

#[test]
fn unsupported_attention_says_why() {
    let mut g = Graph::new();
    let sym = |d: Dim| vec![Dim::B, Dim::S, Dim::lit(2), d];
    let args: Vec<Value> = [sym(Dim::S), sym(Dim::S), sym(Dim::S)]
        .iter()
        .enumerate()
        .map(|(i, s)| g.input(i as u32, "x", Ty::new(DType::F32, s.clone()), None).into())
        .collect();
    let n = g.add_inferred(attn(2, 2, 8, true, false), &args, None).unwrap();
    let e = KernelSpec::from_node(&g, n).unwrap_err();
    assert!(e.reason.contains("not a constant"), "{e}");
}

/// Absorbed MLA's shape of work: two batch matmuls whose weight operands are a reshaped,
/// sliced (and permuted) weight broadcast over the batch, and whose activation operand
/// is a permute. The plan reads all of them through strided views (no copy step is
/// left) and gives the reference's result.
#[test]
fn batch_matmul_reads_views_in_place() {
    use crate::plan_exec::DeviceWeights;
    use dsc_compiler::codegen::plan::{Plan, Step};
    use dsc_compiler::ir::Shape;
    let (b, s) = (Dim::B, Dim::S);
    let mut g = Graph::new();
    let f32t = |d: Vec<Dim>| Ty::new(DType::F32, d);
    let op = |g: &mut Graph, op: Op, args: &[Value]| -> Value { g.add_inferred(op, args, None).unwrap().into() };
    let q = g.input(0, "q", f32t(vec![b, s, Dim::lit(3), Dim::lit(5)]), None).into();
    let w = g.param("w", f32t(lits(&[24, 6])), None).into();
    let qh = op(&mut g, Op::Permute { perm: vec![0, 2, 1, 3] }, &[q]);
    let w3 = op(&mut g, Op::Reshape { shape: Shape::from(lits(&[3, 8, 6])) }, &[w]);
    let uk = op(&mut g, Op::Slice { axis: 1, start: Dim::lit(2), len: Dim::lit(5) }, &[w3]);
    let ukb = op(&mut g, Op::Broadcast { shape: Shape::from(vec![b, Dim::lit(3), Dim::lit(5), Dim::lit(6)]) }, &[uk]);
    let lat = op(&mut g, Op::BatchMatMul, &[qh, ukb]);
    let uv = op(&mut g, Op::Slice { axis: 1, start: Dim::lit(0), len: Dim::lit(2) }, &[w3]);
    let uvt = op(&mut g, Op::Permute { perm: vec![0, 2, 1] }, &[uv]);
    let uvb = op(&mut g, Op::Broadcast { shape: Shape::from(vec![b, Dim::lit(3), Dim::lit(6), Dim::lit(2)]) }, &[uvt]);
    let o = op(&mut g, Op::BatchMatMul, &[lat, uvb]);
    g.ret(&[o], None);
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g });
    m.set_entry(Mode::Prefill, "main");

    let plan = Plan::build(&m, Mode::Prefill).unwrap();
    let steps: Vec<&str> = plan.functions["main"]
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Node { label, .. } => Some(label.as_str()),
            Step::Call { .. } => None,
        })
        .collect();
    assert!(steps.iter().all(|l| l.ends_with("batch_matmul")), "copies left in the plan: {steps:?}");

    let weights: HashMap<String, Tensor> = [("w".to_string(), random(&[24, 6], 7, DType::F32))].into();
    for (batch, seq) in [(1, 1), (2, 3)] {
        let x = random(&[batch, seq, 3, 5], 11, DType::F32);
        let want = run(&m, Mode::Prefill, std::slice::from_ref(&x), &weights, &Options::default()).unwrap().remove(0);
        let got = backend().run_plan(&plan, &[x], &weights, &DeviceWeights::new()).unwrap().remove(0);
        assert_eq!(got.shape(), want.shape());
        assert!(got.allclose(&want, 1e-5, 1e-5), "b={batch} s={seq}: {:?} vs {:?}", got.to_f32_vec(), want.to_f32_vec());
    }
}

/// Split-K decode (flash-decoding) over a long cache at a small batch: chunks of
/// `SPLIT_KEYS` keys, each cube's normalised partial output and log-sum-exp merged by
/// `attention_combine`; the plain kernel elsewhere. With a padding mask that hides a whole
/// chunk (its log-sum-exp −∞), and a row that sees no key at all (zeros).
#[test]
fn split_k_decode_over_a_long_cache() {
    use dsc_compiler::codegen::kernels::attention::{SPLIT_KEYS, SPLIT_MAX_BATCH};
    use dsc_compiler::codegen::launch::NodeWork;
    use dsc_compiler::codegen::select::node_work;
    let (h, kv, d) = (4usize, 2usize, 12usize);
    let q = vec![Dim::B, Dim::lit(1), Dim::lit(h as i64), Dim::lit(d as i64)];
    let kvs = vec![Dim::B, Dim::C + Dim::lit(1), Dim::lit(kv as i64), Dim::lit(d as i64)];
    let op = attn(h as u32, kv as u32, d, true, false);
    for (batch, cache) in [(2u64, 1500u64), (1, 2 * SPLIT_KEYS as u64 + 7), (1, 600), (SPLIT_MAX_BATCH as u64 + 1, 1100)] {
        let bind = Bindings { batch, seq: 1, cache };
        let spec = check_with(op.clone(), &[q.clone(), kvs.clone(), kvs.clone()], &[], DType::F32, bind);
        // Which form ran.
        let mut g = Graph::new();
        let args: Vec<Value> = [q.clone(), kvs.clone(), kvs.clone()]
            .iter()
            .enumerate()
            .map(|(i, s)| g.input(i as u32, &format!("x{i}"), Ty::new(DType::F32, s.clone()), None).into())
            .collect();
        let n = g.add_inferred(op.clone(), &args, None).unwrap();
        let NodeWork::Launches { launches, .. } = node_work(&g, n).unwrap() else { panic!("launches") };
        let names: Vec<String> = launches.iter().filter(|l| l.runs(&bind)).map(|l| l.kernel.name()).collect();
        let split = batch as i64 <= SPLIT_MAX_BATCH && cache + 1 > 2 * SPLIT_KEYS as u64;
        assert_eq!(names.len(), if split { 2 } else { 1 }, "{batch}×{cache}: {names:?} ({})", spec.name());
        assert_eq!(names.last().unwrap().starts_with("attention_combine"), split);
    }
    // A padding mask over 1300 keys that hides the first 600 (all of chunk 0) of row 0,
    // and every key of row 1.
    let (b, sk) = (2usize, 1300usize);
    let mut m = vec![0.0f32; b * sk];
    for j in 0..sk {
        if j < 600 {
            m[j] = f32::NEG_INFINITY;
        }
        m[sk + j] = f32::NEG_INFINITY;
    }
    let masked = Op::Attention { heads: h as u32, kv_heads: kv as u32, scale: Float::new(0.3), causal: false, masked: true, lse: false };
    let shapes = [q, kvs.clone(), kvs, vec![Dim::B, Dim::lit(1), Dim::C + Dim::lit(1)]];
    let data = [None, None, None, Some(Tensor::f32(&[b, 1, sk], m))];
    check_with(masked, &shapes, &data, DType::F32, Bindings { batch: b as u64, seq: 1, cache: sk as u64 - 1 });
}
