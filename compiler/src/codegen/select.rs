//! Which launches an IR node gets: the one place that maps an op to its kernels
//! ([`KernelSpec::from_node`]) and builds their launches ([`node_work`]; each kernel
//! module's `work` functions for its own kernels), and, inside a graph, which operands
//! are read in place through strided views instead of copied ([`node_work_in_graph`]).
//! The result is [`super::launch`]'s data.

use super::kernels::attention::{AttentionConfig, KvRead, KvReads};
use super::kernels::movement::{fold_view, View};
use super::launch::{grid_linear, grid_rows, single, Arg, Buf, Launch, NodeWork, Size, When};
use super::spec::{Access, Elem, EwOp, EwProgram};
use super::{kernels, KernelSpec, Unsupported};
use crate::ir::{BinaryOp, DType, Dim, FusedKernel, Graph, NodeId, Op, Operand, ReduceOp, Shape, StepOp, Ty, UnaryOp, Value};

/// Rows at most which the matmuls run their skinny form (8-row tiles): a decode step of a
/// few sequences. Up to two 8-row tiles still beat one 64-row tile that is mostly padding.
pub const SKINNY_ROWS: i64 = 16;

/// A matmul over `m` rows as `make` builds it in its skinny form and its tiled one: the
/// form that fits when `m` is a constant, else both, each for the sizes it fits.
pub fn by_rows(m: Size, make: impl Fn(bool) -> Launch) -> Vec<Launch> {
    match m.as_const() {
        Some(c) => vec![make(c <= SKINNY_ROWS)],
        None => {
            let (mut skinny, mut tiled) = (make(true), make(false));
            skinny.when = Some(When::AtMost(m.clone(), SKINNY_ROWS));
            tiled.when = Some(When::Above(m, SKINNY_ROWS));
            vec![skinny, tiled]
        }
    }
}

/// The grid of a matmul with `cols` output columns over `m` rows: one cube per
/// `MM_TILE`-column tile and per row tile (64 rows, or 8 in the skinny form).
pub fn mm_grid(cols: Dim, m: Size, skinny: bool) -> [Size; 3] {
    let rows = (super::kernels::mm_rows(skinny) * super::kernels::MM_UNITS) as i64;
    [Size::Dim(cols).ceil_div(super::kernels::MM_TILE as i64), m.ceil_div(rows), Size::lit(1)]
}

/// The multiply-adds (2 FLOPs each) of a matmul over `k` on `grid` ([`mm_grid`]): every
/// cube computes its whole tile, padding included.
pub fn mm_flops(grid: &[Size; 3], skinny: bool, k: Size) -> Size {
    let rows = (super::kernels::mm_rows(skinny) * super::kernels::MM_UNITS) as i64;
    let [x, y, z] = grid.clone();
    x.mul(y).mul(z).mul(Size::lit(2 * rows * super::kernels::MM_TILE as i64)).mul(k)
}

/// How node `n` of `g` runs as part of its graph, and the value each input slot binds:
/// [`node_work`], except that a batch_matmul reads an operand made by permute / slice /
/// broadcast nodes through a strided view of the buffer before them
/// ([`super::kernels::movement::fold_view`]), so those copies need not run (the plan
/// drops the steps nothing reads any more).
pub fn node_work_in_graph(g: &Graph, n: NodeId) -> Result<(NodeWork, Vec<Value>), Unsupported> {
    let mut reads = g.inputs(n).to_vec();
    if let Op::Attention { .. } = g.node(n).op {
        let KernelSpec::Attention { elem, mut cfg } = KernelSpec::from_node(g, n)? else { unreachable!("attention's spec") };
        let ins: Vec<Shape> = reads.iter().map(|&v| g.ty(v).shape.clone()).collect();
        let kv = attention_reads(g, &mut reads, &mut cfg);
        return Ok((super::kernels::attention::work_attention(KernelSpec::Attention { elem, cfg }, &ins, &kv), reads));
    }
    if let Op::BatchMatMul = g.node(n).op {
        let spec = KernelSpec::from_node(g, n)?;
        let views: Vec<Option<View>> = reads.iter().map(|&v| fold_view(g, v)).collect();
        if views.iter().any(Option::is_some) {
            let ins: Vec<Shape> = reads.iter().map(|&v| g.ty(v).shape.clone()).collect();
            for (r, v) in reads.iter_mut().zip(&views) {
                if let Some(v) = v {
                    *r = v.root;
                }
            }
            let work = super::kernels::attention::work_batch_matmul(spec, &ins, [views[0].as_ref(), views[1].as_ref()]);
            return Ok((work, reads));
        }
    }
    Ok((node_work(g, n)?, reads))
}

/// Where attention node's keys and values are read (`reads` is its input list, updated
/// to the buffers read): a key made by concatenating two values along its last axis is
/// read from both (`cfg.split` set), and each operand made by permute / slice /
/// broadcast / unit-axis reshape nodes through a strided view of the buffer before them.
/// A decode step then reads the position-major cache where it lies.
fn attention_reads(g: &Graph, reads: &mut Vec<Value>, cfg: &mut AttentionConfig) -> KvReads {
    let shape = |v: Value| g.ty(v).shape.clone();
    // Operand `v` bound to `slot`: through its view when the view's last axis is
    // contiguous, else as it is.
    let bind = |reads: &mut Vec<Value>, slot: usize, v: Value| -> KvRead {
        if let Some((view, r)) = fold_view(g, v).and_then(|view| KvRead::through(slot as u16, &view).map(|r| (view, r))) {
            set_slot(reads, slot, view.root);
            return r;
        }
        set_slot(reads, slot, v);
        KvRead::contiguous(slot as u16, &shape(v))
    };
    let (k, v) = (reads[1], reads[2]);
    let parts = match &g.node(k.node).op {
        Op::Concat { axis: 3 } if g.inputs(k.node).len() == 2 => {
            let p = g.inputs(k.node).to_vec();
            g.ty(p[0]).shape.0[3].as_const().map(|d| (p[0], p[1], d as u32))
        }
        _ => None,
    };
    let (k_read, k2) = match parts {
        Some((a, b, split)) if split > 0 && split < cfg.dk => {
            cfg.split = split;
            let slot = reads.len();
            (bind(reads, 1, a), Some(bind(reads, slot, b)))
        }
        _ => (bind(reads, 1, k), None),
    };
    let v_read = bind(reads, 2, v);
    KvReads { k: k_read, k2, v: v_read }
}

/// `reads[slot] = v`, appending when `slot` is one past the end.
fn set_slot(reads: &mut Vec<Value>, slot: usize, v: Value) {
    if slot == reads.len() {
        reads.push(v);
    } else {
        reads[slot] = v;
    }
}

/// How node `n` of `g` runs, or why it cannot yet.
pub fn node_work(g: &Graph, n: NodeId) -> Result<NodeWork, Unsupported> {
    let node = g.node(n);
    if let Op::Reshape { .. } = node.op {
        // Reshape is row-major reinterpretation of a contiguous buffer (every buffer the
        // runtime holds is contiguous), so it is free.
        return Ok(NodeWork::Alias(0));
    }
    if let Op::ExpertFfn = node.op {
        return super::kernels::moe::work_expert_ffn(g, n);
    }
    if let Op::WeightGrad = node.op {
        let spec = KernelSpec::from_node(g, n)?;
        let ins: Vec<Shape> = g.inputs(n).iter().map(|&v| g.ty(v).shape.clone()).collect();
        return Ok(super::kernels::attention::work_weight_grad(spec, &ins));
    }
    let spec = KernelSpec::from_node(g, n)?;
    let ins: Vec<Shape> = g.inputs(n).iter().map(|&v| g.ty(v).shape.clone()).collect();
    let out = node.outputs[0].shape.clone();
    let dims = |s: &Shape| s.0.clone();
    let io = |k: usize| (0..k as u16).map(|i| Arg::Buf(Buf::Input(i))).chain([Arg::Buf(Buf::Output(0))]).collect::<Vec<_>>();
    Ok(match &spec {
        KernelSpec::Elementwise { program, .. } | KernelSpec::ElementwiseI32 { program, .. } => {
            // layout: the output shape, then per input its strides against the output's
            // axes (right-aligned; 0 along axes the input lacks or has as 1).
            let rank = out.rank();
            let mut layout: Vec<Size> = out.0.iter().map(|d| Size::Dim(*d)).collect();
            for s in &ins {
                let pad = rank - s.rank();
                let mut strides = vec![Size::lit(0); rank];
                for d in 0..s.rank() {
                    if !s.0[d].is(1) {
                        strides[pad + d] = Size::product(&s.0[d + 1..]);
                    }
                }
                layout.extend(strides);
            }
            let grid = grid_linear(Size::numel(&out).ceil_div(super::kernels::EW_BLOCK as i64));
            debug_assert_eq!(program.inputs.len(), ins.len());
            let flops = Size::numel(&out).mul(Size::lit(program.ops.len() as i64));
            single(Launch::new(spec, vec![Arg::Inputs, Arg::Table(layout), Arg::Buf(Buf::Output(0))], grid, flops))
        }
        KernelSpec::RmsNorm { .. } => {
            let d = dims(&out);
            let rows = Size::product(&d[..d.len() - 1]);
            let mut args = io(2);
            args.push(Arg::U32(Size::Dim(*d.last().unwrap())));
            // Square, sum, scale, gain.
            single(Launch::new(spec, args, grid_rows(rows, Size::lit(1)), Size::numel(&out).mul(Size::lit(4))))
        }
        KernelSpec::Softmax { .. } => {
            let d = dims(&out);
            let rows = Size::product(&d[..d.len() - 1]);
            let mut args = io(1);
            args.push(Arg::U32(Size::Dim(*d.last().unwrap())));
            // Max, subtract-and-exp, sum, divide.
            single(Launch::new(spec, args, grid_rows(rows, Size::lit(1)), Size::numel(&out).mul(Size::lit(4))))
        }
        KernelSpec::Copy { .. } | KernelSpec::CopyI32 { .. } | KernelSpec::NegI32 | KernelSpec::Gather { .. } | KernelSpec::Cast { .. } => {
            super::kernels::movement::work(g, n, spec)
        }
        KernelSpec::Rope { .. } => super::kernels::rope::work(g, n, spec),
        KernelSpec::MatMulEw { .. } | KernelSpec::MatMulEwFrom { .. } | KernelSpec::RmsNormEw { .. } | KernelSpec::GateUp { .. } => {
            super::kernels::heads::work(g, n, spec)
        }
        KernelSpec::MatMul { elem, .. } => {
            let d = dims(&out);
            let m = Size::product(&d[..d.len() - 1]);
            let nn = *d.last().unwrap();
            let k = ins[1].0[1];
            let mut args = io(2);
            args.extend([Arg::U32(m.clone()), Arg::U32(Size::Dim(nn)), Arg::U32(Size::Dim(k))]);
            let launches = by_rows(m.clone(), |skinny| {
                let grid = mm_grid(nn, m.clone(), skinny);
                let flops = mm_flops(&grid, skinny, Size::Dim(k));
                Launch::new(KernelSpec::MatMul { elem: *elem, skinny }, args.clone(), grid, flops)
            });
            NodeWork::Launches { scratch: vec![], launches }
        }
        KernelSpec::Attention { .. } => {
            let kv = KvReads { k: KvRead::contiguous(1, &ins[1]), k2: None, v: KvRead::contiguous(2, &ins[2]) };
            super::kernels::attention::work_attention(spec, &ins, &kv)
        }
        KernelSpec::BatchMatMul { .. } => super::kernels::attention::work_batch_matmul(spec, &ins, [None, None]),
        KernelSpec::MoeRoute { .. } => super::kernels::moe::work_route(g, n, spec),
        KernelSpec::Label { .. } => super::kernels::loss::work(g, n, spec),
        KernelSpec::RmsNormGrad { .. }
        | KernelSpec::ScatterRows { .. }
        | KernelSpec::SwiGluGradEw { .. }
        | KernelSpec::MoeRouteGrad { .. } => super::kernels::grad::work(g, n, spec),
        KernelSpec::AttentionGrad { .. } => super::kernels::attention_grad::work(g, n, spec),
        KernelSpec::MoeGrad { .. } => super::kernels::moe_grad::work(g, n, spec),
        KernelSpec::Reduce { .. } | KernelSpec::IotaI32 => super::kernels::reduce::work(g, n, spec),
        KernelSpec::ScatterLinks => unreachable!("scatter_links comes from grad::work, not from_node"),
        KernelSpec::AdamW { .. } | KernelSpec::SumSquares { .. } | KernelSpec::SampleRows { .. } | KernelSpec::AttentionCombine { .. } => {
            unreachable!("the optimizer's and the sampler's kernels belong to no IR node")
        }
        KernelSpec::TopK { .. } => super::kernels::moe::work_top_k(g, n, spec),
        KernelSpec::MoeDispatch | KernelSpec::MoeGateUp { .. } | KernelSpec::MoeDown { .. } | KernelSpec::MoeCombine { .. } => {
            unreachable!("expert_ffn's kernels come from work_expert_ffn, not from_node")
        }
    })
}

impl KernelSpec {
    /// The kernel for node `n` of `g`, or why there is none.
    pub fn from_node(g: &Graph, n: NodeId) -> Result<KernelSpec, Unsupported> {
        let node = g.node(n);
        let op = node.op.name();
        let no = |reason: &str| Unsupported { op, reason: reason.to_string() };
        // Movement, rope, fused heads and swiglu decide their own specs (their files say how).
        if let Some(spec) = kernels::movement::spec(g, n).or_else(|| kernels::rope::spec(g, n)).or_else(|| kernels::heads::spec(g, n)) {
            return spec;
        }
        // MoE and selection nodes have several outputs and inputs of other dtypes.
        if let Some(spec) = kernels::moe::spec_from_node(g, n) {
            return spec;
        }
        if let Op::Iota { dtype, .. } = node.op {
            return match dtype {
                DType::I32 | DType::I64 => Ok(KernelSpec::IotaI32),
                d => Err(no(&format!("an iota of {} (index iotas only)", d.name()))),
            };
        }
        if let Some(spec) = kernels::loss::spec(g, n)
            .or_else(|| kernels::grad::spec(g, n))
            .or_else(|| kernels::attention_grad::spec(g, n))
            .or_else(|| kernels::moe_grad::spec(g, n))
        {
            return spec;
        }
        if !matches!(
            node.op,
            Op::Unary(_)
                | Op::Binary(_)
                | Op::Fused(_)
                | Op::RmsNorm { .. }
                | Op::Softmax { .. }
                | Op::MatMul
                | Op::Attention { .. }
                | Op::BatchMatMul
                | Op::WeightGrad
                | Op::Reduce { .. }
        ) {
            return Err(no("no kernel yet"));
        }
        let inputs: Vec<Ty> = g.inputs(n).iter().map(|&v| g.ty(v).clone()).collect();
        let Some(out) = node.outputs.first() else {
            return Err(no("no output"));
        };
        // Attention's second output, the log-sum-exp (f32), is written by the same kernel.
        let lse = matches!(node.op, Op::Attention { lse: true, .. }) && node.outputs.len() == 2 && node.outputs[1].dtype == DType::F32;
        if node.outputs.len() != 1 && !lse {
            return Err(no("more than one output"));
        }
        let elem =
            Elem::from_dtype(out.dtype).ok_or_else(|| no(&format!("result dtype {} (kernels hold f32, f16 or bf16)", out.dtype.name())))?;
        // A program over index tensors only (a one-hot `eq(indices, iota)` cast to floats).
        let int = |t: &Ty| matches!(t.dtype, DType::I32 | DType::I64);
        if let Op::Fused(k) = &node.op {
            if k.head.is_none() && !inputs.is_empty() && inputs.iter().all(int) {
                let ops = fused_ops(k, out.dtype).map_err(|r| no(&r))?;
                let program = ew_program(out, &inputs, &ops).map_err(|r| no(&r))?;
                return Ok(KernelSpec::ElementwiseI32 { elem, program });
            }
        }
        if let Some(t) = inputs.iter().find(|t| t.dtype != out.dtype) {
            return Err(no(&format!("input dtype {} differs from the result's {}", t.dtype.name(), out.dtype.name())));
        }
        match &node.op {
            Op::Unary(u) => {
                let program = ew_program(out, &inputs, &[ew_unary(*u, 0)]).map_err(|r| no(&r))?;
                Ok(KernelSpec::Elementwise { elem, program })
            }
            Op::Binary(b) => {
                let op = ew_binary(*b, 0, 1);
                let program = ew_program(out, &inputs, &[op]).map_err(|r| no(&r))?;
                Ok(KernelSpec::Elementwise { elem, program })
            }
            Op::Fused(k) => {
                if k.head.is_some() {
                    return Err(no("fused kernel with a matmul/rms_norm head"));
                }
                let ops = fused_ops(k, out.dtype).map_err(|r| no(&r))?;
                let program = ew_program(out, &inputs, &ops).map_err(|r| no(&r))?;
                Ok(KernelSpec::Elementwise { elem, program })
            }
            Op::RmsNorm { eps } => {
                if inputs[1].rank() != 1 {
                    return Err(no("gain of rank other than 1"));
                }
                Ok(KernelSpec::RmsNorm { elem, eps_bits: (eps.get() as f32).to_bits() })
            }
            Op::Softmax { axis } => {
                if *axis as usize + 1 != out.rank() {
                    return Err(no("softmax over an axis other than the last"));
                }
                Ok(KernelSpec::Softmax { elem })
            }
            Op::MatMul => Ok(KernelSpec::MatMul { elem, skinny: false }),
            Op::Reduce { op: ReduceOp::Sum, .. } => Ok(KernelSpec::Reduce { elem, mean: false }),
            Op::Reduce { op: ReduceOp::Mean, .. } => Ok(KernelSpec::Reduce { elem, mean: true }),
            Op::Attention { .. } => {
                let cfg = kernels::attention::config(&node.op, &inputs).map_err(|r| no(&r))?;
                Ok(KernelSpec::Attention { elem, cfg })
            }
            Op::BatchMatMul => Ok(KernelSpec::BatchMatMul { elem, rank: out.rank().saturating_sub(2) as u32, accumulate: false }),
            // `dyᵀ · x`, a batch matmul without batch axes (`attention::work_weight_grad`).
            Op::WeightGrad => Ok(KernelSpec::BatchMatMul { elem, rank: 0, accumulate: false }),
            _ => Err(no("no kernel yet")),
        }
    }
}

pub(crate) fn ew_unary(u: UnaryOp, a: u32) -> EwOp {
    match u {
        UnaryOp::Neg => EwOp::Neg(a),
        UnaryOp::Abs => EwOp::Abs(a),
        UnaryOp::Exp => EwOp::Exp(a),
        UnaryOp::Log => EwOp::Log(a),
        UnaryOp::Sqrt => EwOp::Sqrt(a),
        UnaryOp::Rsqrt => EwOp::Rsqrt(a),
        UnaryOp::Recip => EwOp::Recip(a),
        UnaryOp::Square => EwOp::Square(a),
        UnaryOp::Sigmoid => EwOp::Sigmoid(a),
        UnaryOp::Silu => EwOp::Silu(a),
        UnaryOp::Tanh => EwOp::Tanh(a),
        UnaryOp::Sin => EwOp::Sin(a),
        UnaryOp::Cos => EwOp::Cos(a),
    }
}

pub(crate) fn ew_binary(b: BinaryOp, x: u32, y: u32) -> EwOp {
    match b {
        BinaryOp::Add => EwOp::Add(x, y),
        BinaryOp::Sub => EwOp::Sub(x, y),
        BinaryOp::Mul => EwOp::Mul(x, y),
        BinaryOp::Div => EwOp::Div(x, y),
        BinaryOp::Max => EwOp::Max(x, y),
        BinaryOp::Min => EwOp::Min(x, y),
        BinaryOp::Pow => EwOp::Pow(x, y),
        BinaryOp::Lt => EwOp::Lt(x, y),
        BinaryOp::Eq => EwOp::Eq(x, y),
    }
}

/// The register program of a head-less fused kernel: registers `0..num_inputs` are the
/// loads, then one per step. Casts are only supported as copies: the program has one
/// float type, so a cast to another dtype (a rounding step) is refused.
fn fused_ops(k: &FusedKernel, dtype: DType) -> Result<Vec<EwOp>, String> {
    let n = k.num_inputs() as u32;
    let reg = |o: &Operand| match o {
        Operand::Input(i) => Ok(*i as u32),
        Operand::Step(j) => Ok(n + *j as u32),
        Operand::Head => Err("a step reads a head the kernel lacks".to_string()),
    };
    let mut ops = Vec::with_capacity(k.steps.len());
    for s in &k.steps {
        let a: Vec<u32> = s.args.iter().map(reg).collect::<Result<_, _>>()?;
        ops.push(match (s.op, a.as_slice()) {
            (StepOp::Unary(u), [x]) => ew_unary(u, *x),
            (StepOp::Binary(b), [x, y]) => ew_binary(b, *x, *y),
            (StepOp::Select, [c, x, y]) => EwOp::Select(*c, *x, *y),
            (StepOp::Cast(to), [x]) if to == dtype => EwOp::Copy(*x),
            (StepOp::Cast(to), _) => return Err(format!("a cast to {} inside an {} program", to.name(), dtype.name())),
            _ => return Err(format!("step {} with {} operands", s.op.op().name(), a.len())),
        });
    }
    if ops.is_empty() {
        return Err("an empty program".into());
    }
    Ok(ops)
}

/// The program for a node computing `ops` over `inputs` into `out`: how each input is
/// read, decided from the symbolic shapes (equal shape: direct; rank 0 or all-ones:
/// scalar; else strided broadcast).
fn ew_program(out: &Ty, inputs: &[Ty], ops: &[EwOp]) -> Result<EwProgram, String> {
    let rank = out.rank();
    let mut access = Vec::with_capacity(inputs.len());
    for t in inputs {
        if t.rank() > rank {
            return Err("an input of higher rank than the result".into());
        }
        access.push(if t.shape == out.shape {
            Access::Direct
        } else if t.shape.0.iter().all(|d| d.is(1)) {
            Access::Scalar
        } else {
            Access::Strided
        });
    }
    Ok(EwProgram { rank: rank as u32, inputs: access, ops: ops.to_vec() })
}
