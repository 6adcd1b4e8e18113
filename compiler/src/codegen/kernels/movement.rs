//! Data movement: one strided-copy kernel for `permute`, `slice`, `broadcast`, `concat`
//! and `cache_append`, the `gather` (embedding lookup) kernel, and `cast` between the
//! float types that have a kernel element type (f32 ↔ f16).
//!
//! Launch shape: 1-D, one unit per copied element, [`EW_BLOCK`] units per cube, as the
//! elementwise kernel. Every buffer the runtime holds is contiguous and row-major, so
//! each of these ops is "walk a box of `shape` and copy `src[src_offset + c·src_strides]`
//! to `out[dst_offset + c·dst_strides]`" for every coordinate `c` of the box:
//!
//! | op | box | source | destination |
//! | --- | --- | --- | --- |
//! | permute | output shape | input strides, permuted | contiguous |
//! | slice | output shape | input strides, offset `start·stride[axis]` | contiguous |
//! | broadcast | output shape | input strides, 0 along broadcast axes | contiguous |
//! | concat, cache_append | input `i`'s shape, one launch per input | contiguous | output strides, offset `Σ_{j<i} len_j·stride[axis]` |
//!
//! The box, offsets and strides are [`Size`] expressions of `b`, `c`, `s` in a
//! [`Arg::Table`], so a symbolic slice (`start = s-1`) or a concat into `c+s` rows is
//! one kernel for every binding; only the rank is comptime (the coordinate walk is
//! unrolled). Axes of literal length 1 are dropped from the box first: they contribute
//! nothing to an offset, and fewer axes mean fewer divisions and fewer distinct kernels.
//!
//! `gather` reads `table[o, ids[j], i]` for the output `[outer, count, inner]`. The
//! reference interpreter rejects an id outside `0..rows`; a kernel cannot report an
//! error, and clamping would silently return a plausible but wrong row, so such an
//! element is written as 0 (a zero embedding), which is visible and never reads out of
//! bounds.

use super::EW_BLOCK;
use crate::codegen::launch::{grid_linear, single, Arg, Buf, Launch, NodeWork, Size, Touch};
use crate::codegen::{Elem, KernelSpec, Unsupported};
use crate::ir::{DType, Dim, Graph, NodeId, Op, UnaryOp, Value};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// Copies the box described by `layout` from `src` to `out`. `layout` is
/// `[count, src_offset, dst_offset, shape[rank], src_strides[rank], dst_strides[rank]]`
/// with `count` the number of elements in the box.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn strided_copy<N: Numeric>(src: &[N], layout: &[u32], out: &mut [N], #[comptime] rank: u32) {
    let pos = ABSOLUTE_POS as u32;
    if pos < layout[0] {
        let mut rem = pos;
        let mut s = layout[1];
        let mut d = layout[2];
        // Walk the axes from the last: coordinate = rem % dim.
        #[unroll]
        for r in 0..rank {
            let a = comptime![rank - 1 - r];
            let dim = layout[comptime![(3 + a) as usize]];
            let c = rem % dim;
            rem /= dim;
            s += c * layout[comptime![(3 + rank + a) as usize]];
            d += c * layout[comptime![(3 + 2 * rank + a) as usize]];
        }
        out[d as usize] = src[s as usize];
    }
}

/// `out[i] = −x[i]` over `i32` indices (the rope backward turns by `−positions`).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn neg_i32(x: &[i32], out: &mut [i32]) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        out[pos] = -x[pos];
    }
}

/// `out[o, j, i] = table[o, ids[j], i]` with `out` viewed as `[outer, count, inner]` and
/// `table` as `[outer, rows, inner]`; an id outside `0..rows` gives 0 (module docs).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn gather<F: Float>(table: &[F], ids: &[i32], out: &mut [F], rows: u32, count: u32, inner: u32) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let p = pos as u32;
        let i = p % inner;
        let t = p / inner;
        let j = t % count;
        let o = t / count;
        let id = ids[j as usize];
        let mut v = F::new(0.0);
        if id >= 0 {
            let r = u32::cast_from(id);
            if r < rows {
                v = table[((o * rows + r) * inner + i) as usize];
            }
        }
        out[pos] = v;
    }
}

/// `out[i] = x[i]` converted from `S` to `D` (round to nearest even when narrowing), one
/// unit per element. (Not named `cast`: the kernel's generated struct would be `Cast`,
/// which shadows CubeCL's `Cast` trait inside it.)
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn convert<S: Float, D: Float>(x: &[S], out: &mut [D]) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        out[pos] = D::cast_from(x[pos]);
    }
}

/// The kernel element type of node `n`: its (single) output's float dtype, which every
/// input but those in `int_inputs` (index inputs, which must be integers) shares.
pub(crate) fn float_elem(g: &Graph, n: NodeId, int_inputs: &[usize]) -> Result<Elem, Unsupported> {
    let node = g.node(n);
    let no = |reason: String| Unsupported { op: node.op.name(), reason };
    let [out] = node.outputs.as_slice() else {
        return Err(no("more than one output".into()));
    };
    let elem =
        Elem::from_dtype(out.dtype).ok_or_else(|| no(format!("result dtype {} (kernels hold f32, f16 or bf16)", out.dtype.name())))?;
    for (i, v) in g.inputs(n).iter().enumerate() {
        let d = g.ty(*v).dtype;
        if int_inputs.contains(&i) {
            if !matches!(d, DType::I32 | DType::I64) {
                return Err(no(format!("input {i} must be an integer index, not {}", d.name())));
            }
        } else if d != out.dtype {
            return Err(no(format!("input dtype {} differs from the result's {}", d.name(), out.dtype.name())));
        }
    }
    Ok(elem)
}

/// The box's rank once unit axes are dropped (what [`strided_copy`] is specialised on).
fn box_rank(shape: &[Dim]) -> u32 {
    shape.iter().filter(|d| !d.is(1)).count() as u32
}

/// The spec of a movement node, `None` when `n` is not one.
pub(crate) fn spec(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    let node = g.node(n);
    let out = node.outputs.first()?;
    let int = matches!(out.dtype, DType::I32 | DType::I64);
    Some(match &node.op {
        // Integer index tensors (labels, positions) move as `i32`, the device's integers.
        Op::Permute { .. } | Op::Slice { .. } | Op::Broadcast { .. } if int => Ok(KernelSpec::CopyI32 { rank: box_rank(&out.shape) }),
        Op::Concat { .. } | Op::CacheAppend { .. } if int => {
            Ok(KernelSpec::CopyI32 { rank: g.inputs(n).iter().map(|&v| box_rank(&g.ty(v).shape)).max().unwrap_or(0) })
        }
        Op::Unary(UnaryOp::Neg) if int => Ok(KernelSpec::NegI32),
        Op::Permute { .. } | Op::Slice { .. } | Op::Broadcast { .. } => {
            float_elem(g, n, &[]).map(|elem| KernelSpec::Copy { elem, rank: box_rank(&out.shape) })
        }
        Op::Concat { .. } | Op::CacheAppend { .. } => float_elem(g, n, &[]).map(|elem| {
            // One launch per input, each of that input's box; the spec names the highest rank.
            let rank = g.inputs(n).iter().map(|&v| box_rank(&g.ty(v).shape)).max().unwrap_or(0);
            KernelSpec::Copy { elem, rank }
        }),
        Op::Gather { .. } => float_elem(g, n, &[1]).map(|elem| KernelSpec::Gather { elem }),
        Op::Cast { to } => {
            let from = g.ty(g.inputs(n)[0]).dtype;
            match (Elem::from_dtype(from), Elem::from_dtype(*to)) {
                (Some(from), Some(to)) => Ok(KernelSpec::Cast { from, to }),
                _ => Err(Unsupported {
                    op: "cast",
                    reason: format!("a cast from {} to {} (kernels hold f32, f16 or bf16)", from.name(), to.name()),
                }),
            }
        }
        _ => return None,
    })
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[Dim]) -> Vec<Size> {
    (0..shape.len()).map(|i| Size::product(&shape[i + 1..])).collect()
}

/// `d · stride`, folded to 0 for a literal 0 (most offsets).
fn offset(d: Dim, stride: Size) -> Size {
    if d.is(0) {
        Size::lit(0)
    } else {
        Size::Dim(d).mul(stride)
    }
}

/// A strided view of a contiguous buffer: element `c` of the view is
/// `root[offset + Σ c_i · strides_i]`. What a chain of permute / slice / broadcast nodes
/// computes by copying, a kernel that takes strides can read in place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct View {
    /// The value whose buffer is read.
    pub root: Value,
    pub offset: Size,
    /// One per axis of the viewed value.
    pub strides: Vec<Size>,
}

/// The view that the chain of movement nodes ending at `v` makes of the buffer before
/// it, or `None` when `v` is not made by a permute, slice or broadcast. Reading from the
/// root outward the chain is reshapes (free on a contiguous buffer), then any mix of
/// permute, slice, broadcast and reshapes that only add or drop axes of length 1 (a
/// general reshape after a strided op would need a copy, so the walk stops there and
/// that op's output is the root). Each op is applied as [`work`] applies it to a copy's
/// source.
pub fn fold_view(g: &Graph, v: Value) -> Option<View> {
    let mut chain: Vec<NodeId> = Vec::new();
    let mut cur = v;
    let mut reshapes_only = false;
    loop {
        let n = cur.node;
        match &g.node(n).op {
            Op::Reshape { .. } if !reshapes_only && unit_reshape(g, n) => {}
            Op::Reshape { .. } => reshapes_only = true,
            Op::Permute { .. } | Op::Slice { .. } | Op::Broadcast { .. } if !reshapes_only => {}
            _ => break,
        }
        chain.push(n);
        cur = g.inputs(n)[0];
    }
    // The reshapes next to the root only rename its contiguous buffer's shape: the
    // strided ops start from the last one's output.
    let root = cur;
    let mut start = cur;
    while let Some(&n) = chain.last().filter(|&&n| matches!(g.node(n).op, Op::Reshape { .. })) {
        start = n.out(0);
        chain.pop();
    }
    if chain.is_empty() {
        return None;
    }
    let mut shape = g.ty(start).shape.0.clone();
    let (mut offset, mut st) = (Size::lit(0), strides(&shape));
    for &n in chain.iter().rev() {
        let out = g.node(n).outputs[0].shape.0.clone();
        match &g.node(n).op {
            Op::Permute { perm } => st = perm.iter().map(|&p| st[p as usize].clone()).collect(),
            Op::Slice { axis, start, .. } => offset = offset.plus(self::offset(*start, st[*axis as usize].clone())),
            Op::Broadcast { .. } => {
                let pad = out.len() - shape.len();
                st = (0..out.len()).map(|a| if a < pad || shape[a - pad].is(1) { Size::lit(0) } else { st[a - pad].clone() }).collect();
            }
            Op::Reshape { .. } => {
                // The axes longer than 1 keep their strides, in order; the unit axes
                // are never stepped along.
                let mut kept = (0..shape.len()).filter(|&a| !shape[a].is(1)).map(|a| st[a].clone());
                st = out.iter().map(|d| if d.is(1) { Size::lit(0) } else { kept.next().expect("unit_reshape checked") }).collect();
            }
            op => unreachable!("fold_view through {}", op.name()),
        }
        shape = out;
    }
    Some(View { root, offset, strides: st })
}

/// Whether reshape node `n` only adds or drops axes of length 1.
fn unit_reshape(g: &Graph, n: NodeId) -> bool {
    let long = |v: &[Dim]| v.iter().filter(|d| !d.is(1)).copied().collect::<Vec<_>>();
    long(&g.ty(g.inputs(n)[0]).shape.0) == long(&g.node(n).outputs[0].shape.0)
}

/// One [`strided_copy`] launch of the box `shape` (unit axes dropped here).
pub(crate) fn copy_launch(spec: &KernelSpec, input: u16, shape: &[Dim], src: (Size, Vec<Size>), dst: (Size, Vec<Size>)) -> Launch {
    let keep: Vec<usize> = (0..shape.len()).filter(|&i| !shape[i].is(1)).collect();
    let count = Size::product(shape);
    let grid = grid_linear(count.clone().ceil_div(EW_BLOCK as i64));
    let mut table = vec![count.clone(), src.0, dst.0];
    table.extend(keep.iter().map(|&i| Size::Dim(shape[i])));
    table.extend(keep.iter().map(|&i| src.1[i].clone()));
    table.extend(keep.iter().map(|&i| dst.1[i].clone()));
    // The copy reads `count` elements of its input: a slice's window, a broadcast's whole
    // (smaller) source, one input of a concat (the touched fraction is capped at 1).
    let args = vec![Arg::Buf(Buf::Input(input)), Arg::Table(table), Arg::Buf(Buf::Output(0))];
    let rank = keep.len() as u32;
    let kernel = match spec {
        KernelSpec::CopyI32 { .. } => KernelSpec::CopyI32 { rank },
        _ => KernelSpec::Copy { elem: spec.elem(), rank },
    };
    Launch::new(kernel, args, grid, Size::lit(0))
        .touching(Buf::Input(input), Touch::Elems(count.clone()))
        .touching(Buf::Output(0), Touch::Elems(count))
}

/// The launches of a movement node whose spec is `spec` ([`spec`] accepted it).
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let node = g.node(n);
    let ins: Vec<Vec<Dim>> = g.inputs(n).iter().map(|&v| g.ty(v).shape.0.clone()).collect();
    let out = node.outputs[0].shape.0.clone();
    let zero = || Size::lit(0);
    let contiguous = || (zero(), strides(&out));
    let launch = |l: Launch| NodeWork::Launches { scratch: vec![], launches: vec![l] };
    match &node.op {
        Op::Permute { perm } => {
            let st = strides(&ins[0]);
            let src = perm.iter().map(|&p| st[p as usize].clone()).collect();
            launch(copy_launch(&spec, 0, &out, (zero(), src), contiguous()))
        }
        Op::Slice { axis, start, .. } => {
            let st = strides(&ins[0]);
            let offset = offset(*start, st[*axis as usize].clone());
            launch(copy_launch(&spec, 0, &out, (offset, st), contiguous()))
        }
        Op::Broadcast { .. } => {
            // Right-aligned: output axis `pad + i` reads input axis `i`, stride 0 where
            // the input has 1 (and along the new leading axes).
            let (st, pad) = (strides(&ins[0]), out.len() - ins[0].len());
            let src = (0..out.len()).map(|a| if a < pad || ins[0][a - pad].is(1) { zero() } else { st[a - pad].clone() }).collect();
            launch(copy_launch(&spec, 0, &out, (zero(), src), contiguous()))
        }
        Op::CacheAppend { axis: 0 } => {
            let ost = strides(&out);
            let copy = copy_launch(&spec, 0, &ins[0], (zero(), strides(&ins[0])), (zero(), ost.clone()));
            let at = offset(ins[0][0], ost[0].clone());
            let write = copy_launch(&spec, 1, &ins[1], (zero(), strides(&ins[1])), (at, ost));
            NodeWork::Append { copy: Box::new(copy), write: Box::new(write) }
        }
        Op::Concat { axis } | Op::CacheAppend { axis } => {
            let (ax, ost) = (*axis as usize, strides(&out));
            let mut before = Dim::lit(0);
            let mut launches = Vec::with_capacity(ins.len());
            for (i, s) in ins.iter().enumerate() {
                let offset = offset(before, ost[ax].clone());
                launches.push(copy_launch(&spec, i as u16, s, (zero(), strides(s)), (offset, ost.clone())));
                before = before + s[ax];
            }
            NodeWork::Launches { scratch: vec![], launches }
        }
        Op::Cast { .. } | Op::Unary(UnaryOp::Neg) => {
            let args = vec![Arg::Buf(Buf::Input(0)), Arg::Buf(Buf::Output(0))];
            single(Launch::new(spec, args, grid_linear(Size::product(&out).ceil_div(EW_BLOCK as i64)), Size::lit(0)))
        }
        Op::Gather { axis } => {
            let (t, ax) = (&ins[0], *axis as usize);
            let args = vec![
                Arg::Buf(Buf::Input(0)),
                Arg::Buf(Buf::Input(1)),
                Arg::Buf(Buf::Output(0)),
                Arg::U32(Size::Dim(t[ax])),
                Arg::U32(Size::product(&ins[1])),
                Arg::U32(Size::product(&t[ax + 1..])),
            ];
            // Only the gathered rows of the table are read (one embedding row per token).
            let launch = Launch::new(spec, args, grid_linear(Size::product(&out).ceil_div(EW_BLOCK as i64)), Size::lit(0));
            single(launch.touching(Buf::Input(0), Touch::Elems(Size::product(&out))))
        }
        op => unreachable!("movement::work on {}", op.name()),
    }
}
