//! Kernels with a head: `Fused` nodes whose program starts with a matmul or an rms_norm
//! ([`matmul_ew`], [`rms_norm_ew`]), and the dense SwiGLU FFN ([`matmul_gate_up`] then
//! [`matmul_ew`]).
//!
//! Launch shapes:
//! - [`matmul_ew`], [`matmul_gate_up`]: as [`super::matmul`], [`MM_UNITS`]×[`MM_UNITS`]
//!   units per cube, one cube per [`MM_TILE`]² output tile. The epilogue runs on the
//!   accumulator registers of the unit that owns the output element, so the head's result is never written.
//! - [`rms_norm_ew`]: as [`super::rms_norm`], one cube of [`ROW_BLOCK`] units per row;
//!   the epilogue runs on each normalised element as it is scaled.
//!
//! The epilogue is an [`Epilogue`]: the elementwise program of the fused node (the same
//! [`EwOp`]s and [`Access`] modes as [`super::fused_ew`], run by [`super::ew_eval`]) with
//! register 0 holding the head's value and one register per extra input the program
//! reads, loaded at the output index (direct, scalar, or strided through a layout table
//! of the output shape and each load's strides, as `fused_ew`'s).
//!
//! SwiGLU is two launches through one scratch buffer `[m, i]`: `silu(x·gateᵀ)·(x·upᵀ)`
//! in one pass (both products share the staged tile of `x`, and the gate/up results
//! never reach memory), then `·downᵀ` with [`matmul_ew`] and an empty epilogue.

#[cfg(feature = "kernels")]
use super::{ew_eval, mm_rows, mm_stage, mm_step, mm_zero, MM_BK, MM_REG, MM_STAGE, MM_TILE, MM_UNITS, ROW_BLOCK};
use super::{Access, EwOp};
use crate::codegen::kernels::movement::float_elem;
use crate::codegen::launch::{grid_rows, Arg, Buf, Launch, NodeWork, Scratch, Size};
use crate::codegen::select::{by_rows, mm_flops, mm_grid};
use crate::codegen::select::{ew_binary, ew_unary};
pub use crate::codegen::spec::Epilogue;
use crate::codegen::{Elem, KernelSpec, Unsupported};
use crate::ir::fused::{Head, Operand, StepOp};
use crate::ir::{Dim, Graph, NodeId, Op};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// The epilogue applied to the head's value `h` at output element `pos`. `inputs` holds
/// the loads in order; `layout` is the output shape then `rank` strides per load.
#[cfg(feature = "kernels")]
#[cube]
fn epilogue<F: Float>(h: F, inputs: &Sequence<Box<[F]>>, layout: &[u32], pos: u32, #[comptime] epi: Epilogue) -> F {
    let mut regs = Sequence::<F>::new();
    regs.push(h);
    #[unroll]
    for j in 0..epi.loads.len() {
        let access = comptime![epi.loads[j].1];
        match access {
            Access::Direct => regs.push(inputs.index(j)[pos as usize]),
            Access::Scalar => regs.push(inputs.index(j)[0]),
            Access::Strided => {
                let mut rem = pos;
                let mut offset = 0u32;
                #[unroll]
                for r in 0..epi.rank {
                    let d = comptime![epi.rank - 1 - r];
                    let dim = layout[d as usize];
                    offset += (rem % dim) * layout[comptime![(epi.rank * (1 + j as u32) + d) as usize]];
                    rem /= dim;
                }
                regs.push(inputs.index(j)[offset as usize]);
            }
        }
    }
    ew_eval::<F>(&mut regs, epi.ops.clone());
    *regs.index(comptime![epi.loads.len() + epi.ops.len()])
}

/// `out[m, n] = epilogue(Σ_k x[m, k] · w[n, k])`: [`super::matmul`]'s register-blocked
/// tiling (one shared buffer for both staged tiles, loads outside the matrices read as 0)
/// with the epilogue on each accumulator. The sums accumulate in `f32` whatever `F` is
/// (an `f16` running sum loses a digit every few hundred terms), then round to `F` for
/// the epilogue.
///
/// The head's operands are `M`: `F` itself, or `f32` where a mixed-precision backward
/// multiplies `f32` gradients and rounds the product into an `F` residual stream.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_ew<F: Float, M: Float>(
    x: &[M],
    w: &[M],
    layout: &[u32],
    out: &mut [F],
    m: u32,
    n: u32,
    k: u32,
    inputs: &Sequence<Box<[F]>>,
    #[comptime] epi: Epilogue,
    #[comptime] skinny: bool,
) {
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let rr = comptime![mm_rows(skinny)];
    let row0 = CUBE_POS_Y * comptime![rr * MM_UNITS];
    let col0 = CUBE_POS_X * MM_TILE;
    let mut smem = Shared::<[M]>::new_slice(comptime![(2 * MM_STAGE) as usize]);
    let mut acc = mm_zero(rr);
    for t in 0..k.div_ceil(MM_BK) {
        let k0 = t * MM_BK;
        mm_stage::<M>(x, &mut smem, 0u32, row0, m, k0, k, comptime![rr * MM_UNITS]);
        mm_stage::<M>(w, &mut smem, MM_STAGE, col0, n, k0, k, MM_TILE);
        sync_cube();
        mm_step::<M>(&smem, MM_STAGE, &mut acc, tx, ty, rr);
        sync_cube();
    }
    #[unroll]
    for i in 0..rr {
        let row = row0 + ty + i * MM_UNITS;
        #[unroll]
        for j in 0..MM_REG {
            let col = col0 + tx + j * MM_UNITS;
            if row < m && col < n {
                let pos = row * n + col;
                let h = F::cast_from(acc[(i * MM_REG + j) as usize]);
                out[pos as usize] = epilogue::<F>(h, inputs, layout, pos, epi.clone());
            }
        }
    }
}

/// `out[m, j] = silu(Σ_k x[m, k]·gate[j, k]) · Σ_k x[m, k]·up[j, k]`, the first half of a
/// SwiGLU, register-blocked as [`super::matmul`]: the tile of `x` is staged once for
/// both products (one shared buffer of three staged tiles: x at 0, gate at
/// `MM_STAGE`, up at `2·MM_STAGE`). Both sums and the silu run in `f32` (as in
/// [`matmul_ew`]); silu is `g·(1/(1 + e^-g))` then `·u`, the reference's order, and
/// only the product is rounded to `F`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_gate_up<F: Float>(x: &[F], gate: &[F], up: &[F], out: &mut [F], m: u32, n: u32, k: u32, #[comptime] skinny: bool) {
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let rr = comptime![mm_rows(skinny)];
    let row0 = CUBE_POS_Y * comptime![rr * MM_UNITS];
    let col0 = CUBE_POS_X * MM_TILE;
    let mut smem = Shared::<[F]>::new_slice(comptime![(3 * MM_STAGE) as usize]);
    let mut acc_g = mm_zero(rr);
    let mut acc_u = mm_zero(rr);
    for t in 0..k.div_ceil(MM_BK) {
        let k0 = t * MM_BK;
        mm_stage::<F>(x, &mut smem, 0u32, row0, m, k0, k, comptime![rr * MM_UNITS]);
        mm_stage::<F>(gate, &mut smem, MM_STAGE, col0, n, k0, k, MM_TILE);
        mm_stage::<F>(up, &mut smem, comptime![2 * MM_STAGE], col0, n, k0, k, MM_TILE);
        sync_cube();
        mm_step::<F>(&smem, MM_STAGE, &mut acc_g, tx, ty, rr);
        mm_step::<F>(&smem, comptime![2 * MM_STAGE], &mut acc_u, tx, ty, rr);
        sync_cube();
    }
    #[unroll]
    for i in 0..rr {
        let row = row0 + ty + i * MM_UNITS;
        #[unroll]
        for j in 0..MM_REG {
            let col = col0 + tx + j * MM_UNITS;
            if row < m && col < n {
                let g = acc_g[(i * MM_REG + j) as usize];
                let silu = g * (1.0 / (1.0 + f32::exp(-g)));
                out[(row * n + col) as usize] = F::cast_from(silu * acc_u[(i * MM_REG + j) as usize]);
            }
        }
    }
}

/// [`super::rms_norm`] with the epilogue applied to each normalised element
/// `x · rsqrt(mean(x²) + eps) · gain`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_ew<F: Float>(
    x: &[F],
    gain: &[F],
    layout: &[u32],
    out: &mut [F],
    cols: u32,
    inputs: &Sequence<Box<[F]>>,
    #[comptime] eps_bits: u32,
    #[comptime] epi: Epilogue,
) {
    let row = crate::codegen::kernels::row_pos();
    if row as usize * cols as usize >= out.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * cols;
    let mut shared = Shared::<[F]>::new_slice(ROW_BLOCK as usize);
    let mut acc = F::new(0.0);
    let iters = cols.div_ceil(ROW_BLOCK);
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            let v = x[(base + c) as usize];
            acc += v * v;
        }
    }
    shared[tid as usize] = acc;
    crate::codegen::kernels::block_reduce::<F>(&mut shared, tid, false);
    let eps = F::new(comptime![f32::from_bits(eps_bits)]);
    let scale = F::new(1.0) / F::sqrt(shared[0] / F::cast_from(cols) + eps);
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            let pos = base + c;
            let h = x[pos as usize] * scale * gain[c as usize];
            out[pos as usize] = epilogue::<F>(h, inputs, layout, pos, epi.clone());
        }
    }
}

/// The spec of a `fused` node with a head or a `swiglu` node, `None` for other nodes.
pub(crate) fn spec(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    match &g.node(n).op {
        Op::Fused(k) if k.head.is_some() => Some(fused_spec(g, n)),
        Op::SwiGlu => Some(float_elem(g, n, &[]).map(|elem| KernelSpec::GateUp { elem, skinny: false })),
        _ => None,
    }
}

fn fused_spec(g: &Graph, n: NodeId) -> Result<KernelSpec, Unsupported> {
    let node = g.node(n);
    let Op::Fused(k) = &node.op else { unreachable!() };
    let no = |reason: String| Unsupported { op: "fused", reason };
    // A matmul head may multiply f32 operands into a result of another float type (the
    // mixed-precision backward rounds an f32 gradient product into a bf16 stream): the
    // head's two inputs then share their own type, every other input the result's.
    let head_elem = match (k.head, g.inputs(n).as_slice()) {
        (Some(Head::MatMul), [a, b, ..]) if g.ty(*a).dtype != node.outputs[0].dtype && g.ty(*a).dtype == g.ty(*b).dtype => {
            Some(Elem::from_dtype(g.ty(*a).dtype).ok_or_else(|| no(format!("a matmul head of {} operands", g.ty(*a).dtype.name())))?)
        }
        _ => None,
    };
    let elem = match head_elem {
        Some(_) => {
            let out = node.outputs[0].dtype;
            if let Some(t) = g.inputs(n)[2..].iter().map(|&v| g.ty(v)).find(|t| t.dtype != out) {
                return Err(no(format!("an epilogue input of {} for a result of {}", t.dtype.name(), out.name())));
            }
            Elem::from_dtype(out).ok_or_else(|| no(format!("result dtype {}", out.name())))?
        }
        None => float_elem(g, n, &[])?,
    };
    let ins: Vec<_> = g.inputs(n).iter().map(|&v| g.ty(v).shape.clone()).collect();
    let out = &node.outputs[0].shape;
    // The epilogue runs once per element of the head's result, so the program must not
    // broadcast it to a larger shape.
    let head_shape: Vec<Dim> = match k.head.expect("checked by spec") {
        Head::MatMul => {
            let mut s = ins[0].0.clone();
            *s.last_mut().ok_or_else(|| no("a matmul head of a scalar".into()))? = ins[1].0[0];
            s
        }
        Head::RmsNorm { .. } => {
            if ins[1].rank() != 1 {
                return Err(no("an rms_norm head with a gain of rank other than 1".into()));
            }
            ins[0].0.clone()
        }
    };
    if head_shape != out.0 {
        return Err(no(format!("the program broadcasts the head's result {:?} to {out}", head_shape)));
    }
    // Loads: every input a step reads, in slot order (inputs 0 and 1 belong to the head;
    // reading them again would bind one buffer twice).
    let mut slots: Vec<u16> =
        k.steps.iter().flat_map(|s| &s.args).filter_map(|a| if let Operand::Input(i) = a { Some(*i) } else { None }).collect();
    slots.sort_unstable();
    slots.dedup();
    if slots.iter().any(|&i| i < 2) {
        return Err(no("a step reads one of the head's own inputs".into()));
    }
    let mut loads = Vec::with_capacity(slots.len());
    for &i in &slots {
        let t = &ins[i as usize];
        if t.rank() > out.rank() {
            return Err(no(format!("input {i} has a higher rank than the result")));
        }
        let access = if t.0 == out.0 {
            Access::Direct
        } else if t.0.iter().all(|d| d.is(1)) {
            Access::Scalar
        } else {
            Access::Strided
        };
        loads.push((u32::from(i), access));
    }
    let reg = |o: &Operand| -> u32 {
        match *o {
            Operand::Head => 0,
            Operand::Input(i) => 1 + slots.iter().position(|&s| s == i).expect("collected above") as u32,
            Operand::Step(j) => 1 + slots.len() as u32 + u32::from(j),
        }
    };
    let dtype = node.outputs[0].dtype;
    let mut ops = Vec::with_capacity(k.steps.len());
    for s in &k.steps {
        let a: Vec<u32> = s.args.iter().map(reg).collect();
        ops.push(match (s.op, a.as_slice()) {
            (StepOp::Unary(u), [x]) => ew_unary(u, *x),
            (StepOp::Binary(b), [x, y]) => ew_binary(b, *x, *y),
            (StepOp::Select, [c, x, y]) => EwOp::Select(*c, *x, *y),
            (StepOp::Cast(to), [x]) if to == dtype => EwOp::Copy(*x),
            (StepOp::Cast(to), _) => return Err(no(format!("a cast to {} inside an {} program", to.name(), dtype.name()))),
            _ => return Err(no(format!("step {} with {} operands", s.op.op().name(), a.len()))),
        });
    }
    let epilogue = Epilogue { rank: out.rank() as u32, loads, ops };
    Ok(match k.head.expect("checked by spec") {
        Head::MatMul => match head_elem {
            Some(head) => KernelSpec::MatMulEwFrom { elem, head, epilogue, skinny: false },
            None => KernelSpec::MatMulEw { elem, epilogue, skinny: false },
        },
        Head::RmsNorm { eps } => KernelSpec::RmsNormEw { elem, eps_bits: (eps.get() as f32).to_bits(), epilogue },
    })
}

/// The layout table of an epilogue: the output shape, then per load its strides against
/// the output's axes (right-aligned; 0 along axes the input lacks or has as 1).
fn layout(out: &[Dim], loads: &[&[Dim]]) -> Vec<Size> {
    let rank = out.len();
    let mut t: Vec<Size> = out.iter().map(|d| Size::Dim(*d)).collect();
    for s in loads {
        let pad = rank - s.len();
        t.extend((0..rank).map(|a| if a < pad || s[a - pad].is(1) { Size::lit(0) } else { Size::product(&s[a - pad + 1..]) }));
    }
    t
}

/// An epilogue's FLOPs: one per op per output element.
fn epilogue_flops(out: &[Dim], epi: &Epilogue) -> Size {
    Size::product(out).mul(Size::lit(epi.ops.len() as i64))
}

/// The launches of a node whose spec [`spec`] gave.
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let ins: Vec<Vec<Dim>> = g.inputs(n).iter().map(|&v| g.ty(v).shape.0.clone()).collect();
    let out = g.node(n).outputs[0].shape.0.clone();
    let rows = |s: &[Dim]| Size::product(&s[..s.len() - 1]);
    let (input, output) = (|i: u16| Arg::Buf(Buf::Input(i)), Arg::Buf(Buf::Output(0)));
    let loads = |epi: &Epilogue| -> (Arg, Vec<Arg>) {
        let shapes: Vec<&[Dim]> = epi.loads.iter().map(|(i, _)| ins[*i as usize].as_slice()).collect();
        (Arg::Table(layout(&out, &shapes)), epi.loads.iter().map(|(i, _)| input(*i as u16)).collect())
    };
    let launches = match &spec {
        KernelSpec::MatMulEw { epilogue, .. } | KernelSpec::MatMulEwFrom { epilogue, .. } => {
            let (m, nn, k) = (rows(&out), *out.last().expect("rank >= 1"), ins[1][1]);
            let (table, extra) = loads(epilogue);
            let mut args = vec![input(0), input(1), table, output, Arg::U32(m.clone()), Arg::U32(Size::Dim(nn)), Arg::U32(Size::Dim(k))];
            args.extend(extra);
            let ew = epilogue_flops(&out, epilogue);
            by_rows(m, |skinny| {
                let grid = mm_grid(nn, rows(&out), skinny);
                let flops = mm_flops(&grid, skinny, Size::Dim(k)).plus(ew.clone());
                Launch::new(with_skinny(&spec, skinny), args.clone(), grid, flops)
            })
        }
        KernelSpec::RmsNormEw { epilogue, .. } => {
            let (table, extra) = loads(epilogue);
            let mut args = vec![input(0), input(1), table, output, Arg::U32(Size::Dim(*out.last().expect("rank >= 1")))];
            args.extend(extra);
            let flops = Size::product(&out).mul(Size::lit(4)).plus(epilogue_flops(&out, epilogue));
            vec![Launch::new(spec.clone(), args, grid_rows(rows(&out), Size::lit(1)), flops)]
        }
        KernelSpec::GateUp { elem, .. } => {
            // x: [.., h], gate/up: [i, h], down: [h, i]; scratch 0 is silu(x·gateᵀ)·(x·upᵀ).
            let (m, h, i) = (rows(&out), ins[1][1], ins[1][0]);
            let scratch = Arg::Buf(Buf::Scratch(0));
            let (hs, is) = (Size::Dim(h), Size::Dim(i));
            let args = vec![input(0), input(1), input(2), scratch.clone(), Arg::U32(m.clone()), Arg::U32(is.clone()), Arg::U32(hs.clone())];
            // Two products over h, then silu and the product (about five per element).
            let act = m.clone().mul(is.clone()).mul(Size::lit(5));
            let mut launches = by_rows(m.clone(), |skinny| {
                let grid = mm_grid(i, m.clone(), skinny);
                let flops = mm_flops(&grid, skinny, Size::Dim(h).mul(Size::lit(2))).plus(act.clone());
                Launch::new(KernelSpec::GateUp { elem: *elem, skinny }, args.clone(), grid, flops)
            });
            // The down projection is `matmul_ew` without an epilogue rather than the plain
            // matmul: its f32 accumulator keeps an f16 FFN within f16 rounding of the
            // reference (the plain kernel sums in F).
            let plain = Epilogue { rank: out.len() as u32, loads: vec![], ops: vec![] };
            let args =
                vec![scratch, input(3), Arg::Table(layout(&out, &[])), output, Arg::U32(m.clone()), Arg::U32(hs), Arg::U32(is.clone())];
            launches.extend(by_rows(m.clone(), |skinny| {
                let grid = mm_grid(h, m.clone(), skinny);
                let spec = KernelSpec::MatMulEw { elem: *elem, epilogue: plain.clone(), skinny };
                Launch::new(spec, args.clone(), grid.clone(), mm_flops(&grid, skinny, is.clone()))
            }));
            let len = m.mul(is);
            return NodeWork::Launches { scratch: vec![Scratch { dtype: crate::codegen::launch::elem_dtype(*elem), len }], launches };
        }
        other => unreachable!("heads::work on {}", other.name()),
    };
    NodeWork::Launches { scratch: vec![], launches }
}

/// The spec in its skinny form or not.
fn with_skinny(spec: &KernelSpec, skinny: bool) -> KernelSpec {
    let mut s = spec.clone();
    match &mut s {
        KernelSpec::MatMul { skinny: k, .. }
        | KernelSpec::MatMulEw { skinny: k, .. }
        | KernelSpec::MatMulEwFrom { skinny: k, .. }
        | KernelSpec::GateUp { skinny: k, .. } => *k = skinny,
        _ => {}
    }
    s
}
