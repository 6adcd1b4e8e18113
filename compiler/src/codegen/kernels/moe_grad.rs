//! The routed experts' backward (`expert_ffn_grad`): the forward's dispatch, then the
//! SwiGLU backward of each (token, slot) pair through its expert, with the gate weight's
//! gradient. Six launches over the `P = T·k` pairs sorted by expert ([`moe_dispatch`]),
//! each output element owned by one unit (deterministic, no atomics):
//!
//! 1. [`moe_dispatch`] (the forward's): `rows`, `row_expert`, `pos`, `offsets`.
//! 2. [`moe_grad_proj`], one unit per (row, j < i): `g = x·gate_eᵀ`, `u = x·up_eᵀ` and
//!    `da = dy·down_e` (unweighted), recomputed.
//! 3. [`moe_grad_mid`], one cube per row: `dw = Σ_j da·silu(g)·u` (the gate weight's
//!    gradient `dy · ffn_e(x)`), then, weighted by the pair's gate weight `w`,
//!    `a = w·silu(g)·u`, `dg = w·da·u·silu'(g)`, `du = w·da·silu(g)` in place of `g`, `u`,
//!    `da`.
//! 4. [`moe_grad_dx_rows`], one unit per (row, h): `dg·gate_e + du·up_e`.
//! 5. [`moe_grad_dx`], one unit per (token, h): the token's rows added in row order, which
//!    is the reference's expert-id order.
//! 6. [`moe_grad_weights`], one unit per (expert, j, h): `dgate = Σ dgᵀ·x`, `dup = Σ duᵀ·x`,
//!    `ddown = Σ dyᵀ·a` over the expert's rows in order; an expert no pair reached gets 0.
//!
//! The products are plain loops (no shared-memory tiles): the backward is checked here
//! for what it computes; the tiled grouped GEMMs of the forward are the model for a
//! faster one.
//!
//! [`moe_dispatch`]: super::moe::moe_dispatch

use super::EW_BLOCK;
#[cfg(feature = "kernels")]
use super::{block_reduce, row_pos, ROW_BLOCK};
use crate::codegen::launch::{elem_dtype, grid_linear, grid_rows, Arg, Buf, Launch, NodeWork, Scratch, Size, Touch};
pub use crate::codegen::spec::MoeGradPart;
use crate::codegen::{Elem, KernelSpec, Unsupported};
use crate::ir::{DType, Graph, NodeId, Op};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// `g`, `u` and `da` of row `r`, column `j`; see the module header.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn moe_grad_proj<F: Float>(
    x: &[F],
    dy: &[F],
    rows: &[i32],
    row_expert: &[i32],
    gate: &[F],
    up: &[F],
    down: &[F],
    g: &mut [F],
    u: &mut [F],
    da: &mut [F],
    k: u32,
    h: u32,
    inter: u32,
) {
    let pos = ABSOLUTE_POS as u32;
    if (pos as usize) < g.len() {
        let (r, j) = (pos / inter, pos % inter);
        let t = u32::cast_from(rows[r as usize]) / k;
        let e = u32::cast_from(row_expert[r as usize]);
        // (Separate `let mut`s: a destructured tuple does not make kernel variables.)
        let mut sg = 0.0f32;
        let mut su = 0.0f32;
        let mut sd = 0.0f32;
        for c in 0..h {
            let xv = f32::cast_from(x[(t * h + c) as usize]);
            sg += xv * f32::cast_from(gate[((e * inter + j) * h + c) as usize]);
            su += xv * f32::cast_from(up[((e * inter + j) * h + c) as usize]);
            sd += f32::cast_from(dy[(t * h + c) as usize]) * f32::cast_from(down[((e * h + c) * inter + j) as usize]);
        }
        g[pos as usize] = F::cast_from(sg);
        u[pos as usize] = F::cast_from(su);
        da[pos as usize] = F::cast_from(sd);
    }
}

/// One row's `dw` and, in place, its weighted `a`, `dg`, `du`; see the module header. The
/// gate weights and their gradient are `W` (the router's f32 under a bf16 model).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn moe_grad_mid<F: Float, W: Float>(w: &[W], rows: &[i32], g: &mut [F], u: &mut [F], da: &mut [F], dw: &mut [W], inter: u32) {
    let r = row_pos();
    if r as usize >= rows.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = r * inter;
    let mut shared = Shared::<[f32]>::new_slice(ROW_BLOCK as usize);
    let mut acc = 0.0f32;
    for it in 0..inter.div_ceil(ROW_BLOCK) {
        let j = it * ROW_BLOCK + tid;
        if j < inter {
            let gv = f32::cast_from(g[(base + j) as usize]);
            let s = 1.0f32 / (1.0f32 + f32::exp(-gv));
            acc += f32::cast_from(da[(base + j) as usize]) * (gv * s * f32::cast_from(u[(base + j) as usize]));
        }
    }
    shared[tid as usize] = acc;
    block_reduce::<f32>(&mut shared, tid, false);
    let p = u32::cast_from(rows[r as usize]);
    let wp = f32::cast_from(w[p as usize]);
    if tid == 0 {
        dw[p as usize] = W::cast_from(shared[0]);
    }
    for it in 0..inter.div_ceil(ROW_BLOCK) {
        let j = it * ROW_BLOCK + tid;
        if j < inter {
            let at = (base + j) as usize;
            let gv = f32::cast_from(g[at]);
            let uv = f32::cast_from(u[at]);
            let d = f32::cast_from(da[at]) * wp;
            let s = 1.0f32 / (1.0f32 + f32::exp(-gv));
            let silu = gv * s;
            g[at] = F::cast_from(silu * uv * wp);
            u[at] = F::cast_from(d * uv * (s * (1.0f32 + gv * (1.0f32 - s))));
            da[at] = F::cast_from(d * silu);
        }
    }
}

/// `dx_rows[r, c] = Σ_j dg[r, j]·gate_e[j, c] + Σ_j du[r, j]·up_e[j, c]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn moe_grad_dx_rows<F: Float>(row_expert: &[i32], dg: &[F], du: &[F], gate: &[F], up: &[F], dxr: &mut [F], h: u32, inter: u32) {
    let pos = ABSOLUTE_POS as u32;
    if (pos as usize) < dxr.len() {
        let (r, c) = (pos / h, pos % h);
        let e = u32::cast_from(row_expert[r as usize]);
        let mut a = 0.0f32;
        let mut b = 0.0f32;
        for j in 0..inter {
            let w = ((e * inter + j) * h + c) as usize;
            a += f32::cast_from(dg[(r * inter + j) as usize]) * f32::cast_from(gate[w]);
            b += f32::cast_from(du[(r * inter + j) as usize]) * f32::cast_from(up[w]);
        }
        dxr[pos as usize] = F::cast_from(a + b);
    }
}

/// `dx[t, c] = Σ` of the token's `k` rows of `dxr`, in increasing row order.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn moe_grad_dx<F: Float>(dxr: &[F], pos: &[i32], dx: &mut [F], k: u32, h: u32) {
    let at = ABSOLUTE_POS as u32;
    if (at as usize) < dx.len() {
        let (t, c) = (at / h, at % h);
        let mut acc = 0.0f32;
        // The rows of the token's pairs are distinct: take them smallest first.
        let mut after = 0u32;
        for n in 0..k {
            let mut best = pos.len() as u32;
            for s in 0..k {
                let r = u32::cast_from(pos[(t * k + s) as usize]);
                if (n == 0 || r > after) && r < best {
                    best = r;
                }
            }
            acc += f32::cast_from(dxr[(best * h + c) as usize]);
            after = best;
        }
        dx[at as usize] = F::cast_from(acc);
    }
}

/// One unit per `(e, j, c)`: `dgate[e, j, c]`, `dup[e, j, c]` and `ddown[e, c, j]` over
/// the expert's rows `offsets[e]..offsets[e+1]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn moe_grad_weights<F: Float>(
    x: &[F],
    dy: &[F],
    rows: &[i32],
    offsets: &[i32],
    a: &[F],
    dg: &[F],
    du: &[F],
    dgate: &mut [F],
    dup: &mut [F],
    ddown: &mut [F],
    k: u32,
    h: u32,
    inter: u32,
) {
    let pos = ABSOLUTE_POS as u32;
    if (pos as usize) < dgate.len() {
        let c = pos % h;
        let j = (pos / h) % inter;
        let e = pos / (h * inter);
        let (r0, r1) = (u32::cast_from(offsets[e as usize]), u32::cast_from(offsets[(e + 1) as usize]));
        // (Separate `let mut`s: a destructured tuple does not make kernel variables.)
        let mut sg = 0.0f32;
        let mut su = 0.0f32;
        let mut sd = 0.0f32;
        for r in r0..r1 {
            let t = u32::cast_from(rows[r as usize]) / k;
            let xv = f32::cast_from(x[(t * h + c) as usize]);
            sg += f32::cast_from(dg[(r * inter + j) as usize]) * xv;
            su += f32::cast_from(du[(r * inter + j) as usize]) * xv;
            sd += f32::cast_from(dy[(t * h + c) as usize]) * f32::cast_from(a[(r * inter + j) as usize]);
        }
        dgate[pos as usize] = F::cast_from(sg);
        dup[pos as usize] = F::cast_from(su);
        ddown[((e * h + c) * inter + j) as usize] = F::cast_from(sd);
    }
}

/// The spec of an `expert_ffn_grad` node (its middle launch), `None` for other nodes.
pub(crate) fn spec(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    let Op::ExpertFfnGrad = g.node(n).op else { return None };
    let no = |reason: String| Unsupported { op: "expert_ffn_grad", reason };
    let ins = g.inputs(n);
    let t = |i: usize| g.ty(ins[i]);
    let Some(elem) = Elem::from_dtype(t(0).dtype) else {
        return Some(Err(no(format!("x of dtype {}", t(0).dtype.name()))));
    };
    if [3, 4, 5, 6].iter().any(|&i| t(i).dtype != t(0).dtype) || !matches!(t(1).dtype, DType::I32 | DType::I64) {
        return Some(Err(no("integer indices and the weights and dy of x's dtype expected".into())));
    }
    // The gate weights (and so their gradient) may be the router's own float type.
    let Some(weights) = Elem::from_dtype(t(2).dtype) else {
        return Some(Err(no(format!("gate weights of dtype {}", t(2).dtype.name()))));
    };
    if t(3).rank() != 3
        || t(3).shape.0.iter().chain(t(0).shape.0.last()).any(|d| d.as_const().is_none())
        || t(1).shape.0.last().and_then(|d| d.as_const()).is_none()
    {
        return Some(Err(no("constant expert, hidden and top_k sizes expected".into())));
    }
    Some(Ok(KernelSpec::MoeGrad { elem, weights, part: MoeGradPart::Mid }))
}

/// The launches of an `expert_ffn_grad` node: x, indices, weights, gate, up, down, dy →
/// dx, dweights, dgate, dup, ddown.
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let KernelSpec::MoeGrad { elem, weights, .. } = spec else { unreachable!("moe_grad::work of {spec:?}") };
    let ins: Vec<Vec<crate::ir::Dim>> = g.inputs(n).iter().map(|&v| g.ty(v).shape.0.clone()).collect();
    let c = |d: crate::ir::Dim| d.as_const().expect("spec checked the sizes are constants");
    let (x, idx, gate) = (&ins[0], &ins[1], &ins[3]);
    let (experts, inter, h, k) = (c(gate[0]), c(gate[1]), c(*x.last().expect("rank")), c(*idx.last().expect("rank")));
    let tokens = Size::product(&x[..x.len() - 1]);
    let pairs = tokens.clone().mul(Size::lit(k));
    let fdt = elem_dtype(elem);
    let pi = pairs.clone().mul(Size::lit(inter));
    let (mut scratch, dispatch) = super::moe::dispatch(&pairs, experts);
    scratch.extend([
        Scratch { dtype: fdt, len: pi.clone() },
        Scratch { dtype: fdt, len: pi.clone() },
        Scratch { dtype: fdt, len: pi.clone() },
        Scratch { dtype: fdt, len: pairs.clone().mul(Size::lit(h)) },
    ]);
    let (i, s, o) = (|j| Arg::Buf(Buf::Input(j)), |j| Arg::Buf(Buf::Scratch(j)), |j| Arg::Buf(Buf::Output(j)));
    let u = |v: i64| Arg::U32(Size::lit(v));
    let part = |p| KernelSpec::MoeGrad { elem, weights, part: p };
    let lin = |n: Size| grid_linear(n.ceil_div(EW_BLOCK as i64));
    let reached = || Touch::Experts { experts, top_k: k, tokens: tokens.clone() };
    let launches = vec![
        dispatch,
        Launch::new(
            part(MoeGradPart::Proj),
            vec![i(0), i(6), s(0), s(1), i(3), i(4), i(5), s(4), s(5), s(6), u(k), u(h), u(inter)],
            lin(pi.clone()),
            pi.clone().mul(Size::lit(6 * h)),
        )
        .touching(Buf::Input(3), reached())
        .touching(Buf::Input(4), reached())
        .touching(Buf::Input(5), reached()),
        Launch::new(
            part(MoeGradPart::Mid),
            vec![i(2), s(0), s(4), s(5), s(6), o(1), u(inter)],
            grid_rows(pairs.clone(), Size::lit(1)),
            pi.clone().mul(Size::lit(20)),
        ),
        Launch::new(
            part(MoeGradPart::DxRows),
            vec![s(1), s(5), s(6), i(3), i(4), s(7), u(h), u(inter)],
            lin(pairs.clone().mul(Size::lit(h))),
            pi.clone().mul(Size::lit(4 * h)),
        )
        .touching(Buf::Input(3), reached())
        .touching(Buf::Input(4), reached()),
        Launch::new(
            part(MoeGradPart::Dx),
            vec![s(7), s(2), o(0), u(k), u(h)],
            lin(tokens.clone().mul(Size::lit(h))),
            pairs.clone().mul(Size::lit(h)),
        ),
        Launch::new(
            part(MoeGradPart::Weights),
            vec![i(0), i(6), s(0), s(3), s(4), s(5), s(6), o(2), o(3), o(4), u(k), u(h), u(inter)],
            lin(Size::lit(experts * inter * h)),
            pi.mul(Size::lit(6 * h)),
        ),
    ];
    NodeWork::Launches { scratch, launches }
}
