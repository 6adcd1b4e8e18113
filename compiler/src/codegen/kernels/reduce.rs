//! Reductions along one axis (`reduce_sum`, `reduce_mean`: the balance losses and the
//! expert loads of a training step) and `iota`.
//!
//! [`reduce_axis`] views its input as `[outer, n, inner]` and gives one unit per output
//! element `(o, i)`, which adds `x[o, 0..n, i]` in order in `f32` (the mean divides
//! once at the end): deterministic, and neighbouring units read neighbouring elements.
//! [`iota`] writes `start + i`.

use super::EW_BLOCK;
use crate::codegen::launch::{grid_linear, single, Arg, Buf, Launch, NodeWork, Size};
use crate::codegen::KernelSpec;
use crate::ir::{Graph, NodeId, Op};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// `out[o, i] = Σ_j x[o, j, i]` (÷ `n` when `mean`) for `x` viewed as `[outer, n, inner]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn reduce_axis<F: Float>(x: &[F], out: &mut [F], n: u32, inner: u32, #[comptime] mean: bool) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let p = pos as u32;
        let (o, i) = (p / inner, p % inner);
        let mut acc = 0.0f32;
        for j in 0..n {
            acc += f32::cast_from(x[((o * n + j) * inner + i) as usize]);
        }
        if comptime![mean] {
            acc /= f32::cast_from(n);
        }
        out[pos] = F::cast_from(acc);
    }
}

/// `out[i] = start + i`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn iota<N: Numeric>(out: &mut [N], start: u32) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        out[pos] = N::cast_from(start + pos as u32);
    }
}

/// The launch of a `reduce` or `iota` node whose spec `from_node` gave.
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let out = g.node(n).outputs[0].shape.0.clone();
    let grid = grid_linear(Size::product(&out).ceil_div(EW_BLOCK as i64));
    match &g.node(n).op {
        Op::Reduce { axis, .. } => {
            let x = &g.ty(g.inputs(n)[0]).shape.0;
            let ax = *axis as usize;
            let args =
                vec![Arg::Buf(Buf::Input(0)), Arg::Buf(Buf::Output(0)), Arg::U32(Size::Dim(x[ax])), Arg::U32(Size::product(&x[ax + 1..]))];
            single(Launch::new(spec, args, grid, Size::product(x)))
        }
        Op::Iota { start, .. } => {
            single(Launch::new(spec, vec![Arg::Buf(Buf::Output(0)), Arg::U32(Size::Dim(*start))], grid, Size::lit(0)))
        }
        op => unreachable!("reduce::work of {}", op.name()),
    }
}
