//! Which launches an IR node gets: the one place that maps an op to its kernels
//! ([`KernelSpec::from_node`]) and builds their launches ([`node_work`]; each kernel
//! module's `work` functions for its own kernels), and, inside a graph, which operands
//! are read in place through strided views instead of copied ([`node_work_in_graph`]).
//! The result is [`super::launch`]'s data.

use super::kernels::attention::{AttentionConfig, KvRead, KvReads};
use super::kernels::movement::{fold_view, View};
use super::launch::{grid_linear, grid_rows, single, Arg, Buf, Launch, NodeWork, Size, When};
use super::{KernelSpec, Unsupported};
use crate::ir::{Dim, Graph, NodeId, Op, Shape, Value};

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
