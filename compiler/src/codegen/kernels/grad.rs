//! Backward kernels of the train graphs: the RMSNorm backward, the scatter-add that is
//! the embedding's gradient, and the dense SwiGLU backward. Deterministic, without
//! atomics: each output element is owned by one unit, which adds its terms in the
//! reference's order.
//!
//! - `swiglu_grad`: nine launches, the products as [`batch_matmul`] over strided views (a
//!   transposed weight or activation is read in place, `attention::matmul_2d`): `g = x·gateᵀ`,
//!   `u = x·upᵀ`, `da = dy·down`; [`swiglu_grad_ew`] makes `a = silu(g)·u`,
//!   `dg = da·u·silu'(g)`, `du = da·silu(g)` in one pass; then `ddown = dyᵀ·a`,
//!   `dx = dg·gate`, `dx += du·up`, `dgate = dgᵀ·x`, `dup = duᵀ·x`. `g`, `u` are recomputed
//!   (the forward keeps neither), six `[tokens, i]` scratch buffers hold the rest.
//!
//! [`batch_matmul`]: super::attention::batch_matmul
//!
//! - `rms_norm_grad`: two launches. [`rms_norm_grad_rows`], one cube of [`ROW_BLOCK`]
//!   units per row: `r = (mean(x²) + eps)^-½` and `mean(dy·g·x)` as two shared-memory
//!   reductions in `f32`, then `dx = r·(dy·g) − x·r³·mean(dy·g·x)`, and `r` into a scratch
//!   vector. [`rms_norm_grad_gain`], one unit per column: `dg[j] = Σ_rows dy·x·r`, summed
//!   in row order.
//! - `scatter_add(dst, idx, src)` (`dst [A.., n, B..]`, `idx [I..]`, `src [A.., I.., B..]`):
//!   three launches. A strided copy of `dst` to the output; [`scatter_links`], one unit per
//!   index position `j`: `next[j]`, the next position with the same index (or −1), and
//!   whether `j` is the first of its index; [`scatter_rows`], one unit per (outer, first
//!   position, inner element): it walks its index's positions in order, adding each `src`
//!   row to the output row, as the reference does. An index outside `0..n` (an error in the
//!   reference) adds nothing: the forward gather of such an id already read zeros.

use super::attention::{matmul_2d, Operand};
#[cfg(feature = "kernels")]
use super::{reduce_pair, row_pos, ROW_BLOCK};
use crate::codegen::launch::{elem_dtype, grid_linear, grid_rows, Arg, Buf, Launch, NodeWork, Scratch, Size, Touch};
pub use crate::codegen::spec::RouteGradConfig;
use crate::codegen::{Elem, KernelSpec, Unsupported};
use crate::ir::{DType, Dim, Graph, NodeId, Op, Scoring};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// `dx` of one row and its `r`; see the module header.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn rms_norm_grad_rows<F: Float>(x: &[F], gain: &[F], dy: &[F], dx: &mut [F], r: &mut [f32], cols: u32, #[comptime] eps_bits: u32) {
    let row = row_pos();
    if row as usize >= r.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * cols;
    // Σx² at 0, Σ dy·g·x at ROW_BLOCK (one shared buffer, CUBECL.md §2).
    let mut shared = Shared::<[f32]>::new_slice((2 * ROW_BLOCK) as usize);
    let mut sq = 0.0f32;
    let mut dot = 0.0f32;
    for it in 0..cols.div_ceil(ROW_BLOCK) {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            let xv = f32::cast_from(x[(base + c) as usize]);
            sq += xv * xv;
            dot += f32::cast_from(dy[(base + c) as usize]) * f32::cast_from(gain[c as usize]) * xv;
        }
    }
    shared[tid as usize] = sq;
    shared[(ROW_BLOCK + tid) as usize] = dot;
    reduce_pair(&mut shared, tid);
    let n = f32::cast_from(cols);
    let inv = 1.0f32 / f32::sqrt(shared[0] / n + comptime![f32::from_bits(eps_bits)]);
    let k = inv * inv * inv * (shared[ROW_BLOCK as usize] / n);
    for it in 0..cols.div_ceil(ROW_BLOCK) {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            let xv = f32::cast_from(x[(base + c) as usize]);
            let g = f32::cast_from(dy[(base + c) as usize]) * f32::cast_from(gain[c as usize]);
            dx[(base + c) as usize] = F::cast_from(inv * g - xv * k);
        }
    }
    if tid == 0 {
        r[row as usize] = inv;
    }
}

/// `dg[j] = Σ_rows dy[row, j] · x[row, j] · r[row]`, one unit per column.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn rms_norm_grad_gain<F: Float>(x: &[F], dy: &[F], r: &[f32], dg: &mut [F], rows: u32) {
    let j = ABSOLUTE_POS;
    if j < dg.len() {
        let cols = dg.len() as u32;
        let mut acc = 0.0f32;
        for row in 0..rows {
            let at = (row * cols + j as u32) as usize;
            acc += f32::cast_from(dy[at]) * (f32::cast_from(x[at]) * r[row as usize]);
        }
        dg[j] = F::cast_from(acc);
    }
}

/// Per index position `j` of `count`: `next[j]`, the next position holding the same
/// index (`count` for none), and `first[j]`, 1 when no earlier position holds it.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn scatter_links(idx: &[i32], next: &mut [u32], first: &mut [u32], count: u32) {
    let j = ABSOLUTE_POS as u32;
    if j < count {
        let v = idx[j as usize];
        let mut nx = count;
        let mut k = count;
        while k > j + 1 {
            k -= 1;
            if idx[k as usize] == v {
                nx = k;
            }
        }
        let mut f = 1u32;
        for e in 0..j {
            if idx[e as usize] == v {
                f = 0u32;
            }
        }
        next[j as usize] = nx;
        first[j as usize] = f;
    }
}

/// `out[o, idx[j], i] += src[o, j', i]` for every position `j'` of `j`'s index, in order;
/// one unit per `(o, j, i)`, working only where `j` is its index's first position. The
/// bound test is its own `if`: a kernel's `&&` need not short-circuit.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
pub fn scatter_rows<F: Float>(src: &[F], idx: &[i32], next: &[u32], first: &[u32], out: &mut [F], rows: u32, count: u32, inner: u32) {
    let pos = ABSOLUTE_POS as u32;
    let i = pos % inner;
    let t = pos / inner;
    let j = t % count;
    let o = t / count;
    if (pos as usize) < src.len() {
        if first[j as usize] == 1 {
            let id = idx[j as usize];
            if id >= 0 && u32::cast_from(id) < rows {
                let at = ((o * rows + u32::cast_from(id)) * inner + i) as usize;
                let mut acc = out[at];
                let mut k = j;
                while k < count {
                    acc += src[((o * count + k) * inner + i) as usize];
                    k = next[k as usize];
                }
                out[at] = acc;
            }
        }
    }
}

/// `a = silu(g)·u`, `dg = da·u·silu'(g)`, `du = da·silu(g)` with `s = σ(g)`,
/// `silu'(g) = s·(1 + g·(1 − s))` (the reference's order), in `f32`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn swiglu_grad_ew<F: Float>(g: &[F], u: &[F], da: &[F], a: &mut [F], dg: &mut [F], du: &mut [F]) {
    let pos = ABSOLUTE_POS;
    if pos < a.len() {
        let gv = f32::cast_from(g[pos]);
        let uv = f32::cast_from(u[pos]);
        let d = f32::cast_from(da[pos]);
        let s = 1.0f32 / (1.0f32 + f32::exp(-gv));
        let silu = gv * s;
        a[pos] = F::cast_from(silu * uv);
        dg[pos] = F::cast_from(d * uv * (s * (1.0f32 + gv * (1.0f32 - s))));
        du[pos] = F::cast_from(d * silu);
    }
}

/// The router's backward for one token per unit: the scores `s` recomputed from the
/// logits (softmax, max-subtracted, or sigmoid); `ds_j = scale·(dw_j − Σ dw·s/z)/z` at
/// the chosen experts with `z = Σ_chosen s + 1e-20` when normalising (else
/// `scale·dw_j`), 0 elsewhere; then through the scores (softmax: `s·(ds − Σ ds·s)`;
/// sigmoid: `ds·s·(1 − s)`). The selection takes no gradient.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(unused_assignments)] // a kernel's `if`/`else` assigns a declared variable
pub fn moe_route_grad<F: Float>(logits: &[F], idx: &[i32], dw: &[F], out: &mut [F], #[comptime] cfg: RouteGradConfig) {
    let t = ABSOLUTE_POS as u32;
    let e = comptime![cfg.experts];
    let k = comptime![cfg.top_k];
    if ((t * e) as usize) < out.len() {
        let base = t * e;
        // The scores' normaliser (softmax: max and Σ exp).
        let mut m = f32::cast_from(logits[base as usize]);
        let mut sum = 0.0f32;
        if comptime![!cfg.sigmoid] {
            for j in 1..e {
                let x = f32::cast_from(logits[(base + j) as usize]);
                m = select(x > m, x, m);
            }
            for j in 0..e {
                sum += f32::exp(f32::cast_from(logits[(base + j) as usize]) - m);
            }
        }
        // Σ over the chosen slots: z and Σ dw·s.
        let mut z = 0.0f32;
        let mut dot = 0.0f32;
        for r in 0..k {
            let j = u32::cast_from(idx[(t * k + r) as usize]);
            let x = f32::cast_from(logits[(base + j) as usize]);
            let mut s = 0.0f32;
            if comptime![cfg.sigmoid] {
                s = 1.0f32 / (1.0f32 + f32::exp(-x));
            } else {
                s = f32::exp(x - m) / sum;
            }
            z += s;
            dot += f32::cast_from(dw[(t * k + r) as usize]) * s;
        }
        z += 1e-20f32;
        let scale = comptime![f32::from_bits(cfg.scale_bits)];
        // Σ_j ds_j·s_j (softmax's correction), over the chosen slots.
        let mut sdot = 0.0f32;
        for r in 0..comptime![if cfg.sigmoid { 0 } else { cfg.top_k }] {
            let j = u32::cast_from(idx[(t * k + r) as usize]);
            let x = f32::cast_from(logits[(base + j) as usize]);
            let s = f32::exp(x - m) / sum;
            let mut ds = scale * f32::cast_from(dw[(t * k + r) as usize]);
            if comptime![cfg.normalize] {
                ds = scale * (f32::cast_from(dw[(t * k + r) as usize]) - dot / z) / z;
            }
            sdot += ds * s;
        }
        for j in 0..e {
            let x = f32::cast_from(logits[(base + j) as usize]);
            let mut ds = 0.0f32;
            for r in 0..k {
                if u32::cast_from(idx[(t * k + r) as usize]) == j {
                    let d = f32::cast_from(dw[(t * k + r) as usize]);
                    if comptime![cfg.normalize] {
                        ds += scale * (d - dot / z) / z;
                    } else {
                        ds += scale * d;
                    }
                }
            }
            let mut g = 0.0f32;
            if comptime![cfg.sigmoid] {
                let s = 1.0f32 / (1.0f32 + f32::exp(-x));
                g = ds * s * (1.0f32 - s);
            } else {
                let s = f32::exp(x - m) / sum;
                g = s * (ds - sdot);
            }
            out[(base + j) as usize] = F::cast_from(g);
        }
    }
}

/// The spec of an `rms_norm_grad`, `scatter_add`, `swiglu_grad` or `moe_route_grad` node,
/// `None` for other nodes.
pub(crate) fn spec(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    let node = g.node(n);
    let no = |reason: String| Unsupported { op: node.op.name(), reason };
    let ins = g.inputs(n);
    let float =
        |i: usize| Elem::from_dtype(g.ty(ins[i]).dtype).ok_or_else(|| no(format!("input {i} of dtype {}", g.ty(ins[i]).dtype.name())));
    Some(match &node.op {
        Op::RmsNormGrad { eps } => float(0).and_then(|elem| {
            if [1, 2].iter().any(|&i| g.ty(ins[i]).dtype != g.ty(ins[0]).dtype) {
                return Err(no("x, gain and dy of different dtypes".into()));
            }
            Ok(KernelSpec::RmsNormGrad { elem, eps_bits: (eps.get() as f32).to_bits(), gain: true })
        }),
        Op::SwiGluGrad => float(0).and_then(|elem| {
            if (1..5).any(|i| g.ty(ins[i]).dtype != g.ty(ins[0]).dtype) {
                return Err(no("x, weights and dy of different dtypes".into()));
            }
            Ok(KernelSpec::SwiGluGradEw { elem })
        }),
        Op::MoeRouteGrad(r) => float(0).and_then(|elem| {
            let experts = g
                .ty(ins[0])
                .shape
                .0
                .last()
                .and_then(|d| d.as_const())
                .ok_or_else(|| no("an expert count that is not a constant".into()))?;
            if g.ty(ins[2]).dtype != g.ty(ins[0]).dtype || !matches!(g.ty(ins[1]).dtype, DType::I32 | DType::I64) {
                return Err(no("integer indices and dweights of the logits' dtype expected".into()));
            }
            let cfg = RouteGradConfig {
                experts: experts as u32,
                top_k: r.top_k,
                sigmoid: r.scoring == Scoring::Sigmoid,
                normalize: r.normalize,
                scale_bits: (r.scale.get() as f32).to_bits(),
            };
            Ok(KernelSpec::MoeRouteGrad { elem, cfg })
        }),
        Op::ScatterAdd { .. } => float(0).and_then(|elem| {
            if !matches!(g.ty(ins[1]).dtype, DType::I32 | DType::I64) || g.ty(ins[2]).dtype != g.ty(ins[0]).dtype {
                return Err(no("integer indices and src of dst's dtype expected".into()));
            }
            Ok(KernelSpec::ScatterRows { elem })
        }),
        _ => return None,
    })
}

/// The launches of a node whose spec [`spec`] gave.
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let ins: Vec<Vec<Dim>> = g.inputs(n).iter().map(|&v| g.ty(v).shape.0.clone()).collect();
    let (i, o, s) = (|k| Arg::Buf(Buf::Input(k)), |k| Arg::Buf(Buf::Output(k)), |k| Arg::Buf(Buf::Scratch(k)));
    match (&g.node(n).op, spec) {
        (Op::RmsNormGrad { .. }, KernelSpec::RmsNormGrad { elem, eps_bits, .. }) => {
            let x = &ins[0];
            let cols = *x.last().expect("rms_norm_grad of a scalar has no spec");
            let rows = Size::product(&x[..x.len() - 1]);
            let numel = Size::product(x);
            let row_kernel = KernelSpec::RmsNormGrad { elem, eps_bits, gain: false };
            let gain_kernel = KernelSpec::RmsNormGrad { elem, eps_bits, gain: true };
            NodeWork::Launches {
                scratch: vec![Scratch { dtype: DType::F32, len: rows.clone() }],
                launches: vec![
                    Launch::new(
                        row_kernel,
                        vec![i(0), i(1), i(2), o(0), s(0), Arg::U32(Size::Dim(cols))],
                        grid_rows(rows.clone(), Size::lit(1)),
                        numel.clone().mul(Size::lit(9)),
                    ),
                    Launch::new(
                        gain_kernel,
                        vec![i(0), i(2), s(0), o(1), Arg::U32(rows)],
                        grid_linear(Size::Dim(cols).ceil_div(super::EW_BLOCK as i64)),
                        numel.mul(Size::lit(3)),
                    ),
                ],
            }
        }
        (Op::ScatterAdd { axis }, KernelSpec::ScatterRows { elem }) => {
            let (dst, idx) = (&ins[0], &ins[1]);
            let ax = *axis as usize;
            let count = Size::product(idx);
            let src_len = Size::product(&ins[2]);
            // The copy of dst as `movement` copies a contiguous box.
            let strides: Vec<Size> = (0..dst.len()).map(|k| Size::product(&dst[k + 1..])).collect();
            let copy = super::movement::copy_launch(
                &KernelSpec::Copy { elem, rank: 0 },
                0,
                dst,
                (Size::lit(0), strides.clone()),
                (Size::lit(0), strides),
            );
            let links = Launch::new(
                KernelSpec::ScatterLinks,
                vec![i(1), s(0), s(1), Arg::U32(count.clone())],
                grid_linear(count.clone().ceil_div(super::EW_BLOCK as i64)),
                Size::lit(0),
            );
            let rows = Launch::new(
                KernelSpec::ScatterRows { elem },
                vec![
                    i(2),
                    i(1),
                    s(0),
                    s(1),
                    o(0),
                    Arg::U32(Size::Dim(dst[ax])),
                    Arg::U32(count.clone()),
                    Arg::U32(Size::product(&dst[ax + 1..])),
                ],
                grid_linear(src_len.clone().ceil_div(super::EW_BLOCK as i64)),
                src_len.clone(),
            )
            // Only the rows the indices name are read and written back.
            .touching(Buf::Output(0), Touch::Elems(src_len.mul(Size::lit(2))));
            NodeWork::Launches {
                scratch: vec![Scratch { dtype: DType::I32, len: count.clone() }, Scratch { dtype: DType::I32, len: count }],
                launches: vec![copy, links, rows],
            }
        }
        (Op::SwiGluGrad, KernelSpec::SwiGluGradEw { elem }) => {
            let x = &ins[0];
            let (h, inter) = (Size::Dim(*x.last().expect("rank checked")), Size::Dim(ins[1][0]));
            let m = Size::product(&x[..x.len() - 1]);
            let mi = m.clone().mul(inter.clone());
            let one = || Size::lit(1);
            let op = |b: Buf, row: &Size, col: Size| Operand(b, row.clone(), col);
            let (sc, inp) = (Buf::Scratch, Buf::Input);
            // Scratch: 0 g, 1 u, 2 da, 3 a, 4 dg, 5 du, each [m, i].
            let scratch = (0..6).map(|_| Scratch { dtype: elem_dtype(elem), len: mi.clone() }).collect();
            let mm = |a: Operand, b: Operand, out: Buf, mnk: [&Size; 3], acc: bool| {
                matmul_2d(elem, a, b, out, [mnk[0].clone(), mnk[1].clone(), mnk[2].clone()], acc)
            };
            let ew = Launch::new(
                KernelSpec::SwiGluGradEw { elem },
                vec![Arg::Buf(sc(0)), Arg::Buf(sc(1)), Arg::Buf(sc(2)), Arg::Buf(sc(3)), Arg::Buf(sc(4)), Arg::Buf(sc(5))],
                grid_linear(mi.clone().ceil_div(super::EW_BLOCK as i64)),
                mi.clone().mul(Size::lit(12)),
            );
            let launches = vec![
                // g = x·gateᵀ, u = x·upᵀ: the weight [i, h] read as [h, i].
                mm(op(inp(0), &h, one()), op(inp(1), &one(), h.clone()), sc(0), [&m, &inter, &h], false),
                mm(op(inp(0), &h, one()), op(inp(2), &one(), h.clone()), sc(1), [&m, &inter, &h], false),
                // da = dy·down, down [h, i] as it is.
                mm(op(inp(4), &h, one()), op(inp(3), &inter, one()), sc(2), [&m, &inter, &h], false),
                ew,
                // ddown = dyᵀ·a.
                mm(op(inp(4), &one(), h.clone()), op(sc(3), &inter, one()), Buf::Output(3), [&h, &inter, &m], false),
                // dx = dg·gate + du·up.
                mm(op(sc(4), &inter, one()), op(inp(1), &h, one()), Buf::Output(0), [&m, &h, &inter], false),
                mm(op(sc(5), &inter, one()), op(inp(2), &h, one()), Buf::Output(0), [&m, &h, &inter], true),
                // dgate = dgᵀ·x, dup = duᵀ·x.
                mm(op(sc(4), &one(), inter.clone()), op(inp(0), &h, one()), Buf::Output(1), [&inter, &h, &m], false),
                mm(op(sc(5), &one(), inter.clone()), op(inp(0), &h, one()), Buf::Output(2), [&inter, &h, &m], false),
            ];
            NodeWork::Launches { scratch, launches }
        }
        (Op::MoeRouteGrad(_), spec @ KernelSpec::MoeRouteGrad { .. }) => {
            let logits = &ins[0];
            let tokens = Size::product(&logits[..logits.len() - 1]);
            let numel = Size::product(logits);
            let args = vec![i(0), i(1), i(2), o(0)];
            NodeWork::Launches {
                scratch: vec![],
                launches: vec![Launch::new(spec, args, grid_linear(tokens.ceil_div(super::EW_BLOCK as i64)), numel.mul(Size::lit(12)))],
            }
        }
        (op, spec) => unreachable!("grad::work of {} as {spec:?}", op.name()),
    }
}
