//! The label losses of the train graphs and their backward: `token_logprob` (GRPO's
//! per-token log-probability), `cross_entropy` (SFT's mean loss) and their gradients.
//!
//! - [`label_logprob`]: `log_softmax(logits)[label]` per row, 0 on ignored rows. One cube
//!   of [`ROW_BLOCK`] units per row (`launch::grid_rows`); the row's max and the sum of
//!   `exp(x − max)` are shared-memory tree reductions in `f32`.
//! - [`label_mean`]: `−Σ logp / count` over the rows whose label counts, one cube for the
//!   whole batch (rows strided over the units, then a tree reduction): `cross_entropy` is
//!   `label_logprob` into a scratch row vector, then this. No counted row gives `0/0`, NaN,
//!   as the reference's mean over nothing.
//! - [`label_coef`]: `−dloss / count` (0 when nothing counts), one cube: cross-entropy's
//!   gradient coefficient.
//! - [`label_grad`]: `(onehot(label) − softmax(logits)) · coef` per row, 0 on ignored rows,
//!   with `coef` per row (`token_logprob_grad`: `dy`) or one scalar (`cross_entropy_grad`:
//!   [`label_coef`]'s).
//!
//! Labels are `i32` on the device; the ignore index is a `u32` scalar compared with the
//! label's bits (both targets reinterpret `i32 ↔ u32`), present when the comptime
//! `ignore` flag is set. A counted label outside `0..V` is an error in the reference; a
//! kernel cannot report one, so the row's value is NaN and reaches the loss. The NaN is
//! read from a one-element table the launch uploads: WGSL has no NaN literal, and a NaN
//! computed in the kernel (`0/0`) is folded away by compilers that assume there are none.

#[cfg(feature = "kernels")]
use super::{block_reduce, reduce_pair, row_pos, ROW_BLOCK};
use crate::codegen::launch::{grid_rows, grid_x, Arg, Buf, Launch, NodeWork, Scratch, Size};
pub use crate::codegen::spec::LabelKernel;
use crate::codegen::{Elem, KernelSpec, Unsupported};
use crate::ir::{DType, Graph, NodeId, Op};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// Whether `label` counts: not the ignore index (its bits in `ignore`) when `has_ignore`.
#[cfg(feature = "kernels")]
#[cube]
fn counted(label: i32, ignore: u32, #[comptime] has_ignore: bool) -> bool {
    let mut c = true;
    if comptime![has_ignore] {
        c = u32::cast_from(label) != ignore;
    }
    c
}

/// The row's max and `ln Σ exp(x − max)` (so the log-sum-exp is their sum), in `f32`.
#[cfg(feature = "kernels")]
#[cube]
fn row_lse<F: Float>(x: &[F], base: u32, cols: u32, shared: &mut Shared<[f32]>, tid: u32) -> (f32, f32) {
    let iters = cols.div_ceil(ROW_BLOCK);
    let mut m = f32::cast_from(x[base as usize]);
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            let v = f32::cast_from(x[(base + c) as usize]);
            m = select(v > m, v, m);
        }
    }
    shared[tid as usize] = m;
    block_reduce::<f32>(shared, tid, true);
    let row_max = shared[0];
    // Everyone has read the max before the buffer is reused for the sum.
    sync_cube();
    let mut acc = 0.0f32;
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            acc += f32::exp(f32::cast_from(x[(base + c) as usize]) - row_max);
        }
    }
    shared[tid as usize] = acc;
    block_reduce::<f32>(shared, tid, false);
    let sum = shared[0];
    (row_max, sum)
}

/// `out[row] = log_softmax(logits[row])[labels[row]]`, 0 on ignored rows; `cols` = V.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn label_logprob<F: Float>(
    logits: &[F],
    labels: &[i32],
    nan: &[f32],
    out: &mut [f32],
    cols: u32,
    ignore: u32,
    #[comptime] has_ignore: bool,
) {
    let row = row_pos();
    if row as usize >= out.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * cols;
    let mut shared = Shared::<[f32]>::new_slice(ROW_BLOCK as usize);
    let (row_max, sum) = row_lse::<F>(logits, base, cols, &mut shared, tid);
    if tid == 0 {
        let label = labels[row as usize];
        let mut v = 0.0f32;
        if counted(label, ignore, has_ignore) {
            if label >= 0 && u32::cast_from(label) < cols {
                v = f32::cast_from(logits[(base + u32::cast_from(label)) as usize]) - row_max - f32::ln(sum);
            } else {
                v = nan[0];
            }
        }
        out[row as usize] = v;
    }
}

/// `(−Σ logp, count)` over the counted rows, reduced into `shared[0]` and
/// `shared[ROW_BLOCK]` by one cube. The row test stays a separate `if`: a kernel's `&&`
/// need not short-circuit, and the label read must not run past the last row.
#[cfg(feature = "kernels")]
#[cube]
#[allow(clippy::collapsible_if)]
fn counted_sum(
    logp: &[f32],
    labels: &[i32],
    rows: u32,
    ignore: u32,
    shared: &mut Shared<[f32]>,
    tid: u32,
    #[comptime] has_ignore: bool,
    #[comptime] with_logp: bool,
) {
    let mut s = 0.0f32;
    let mut n = 0.0f32;
    for it in 0..rows.div_ceil(ROW_BLOCK) {
        let r = it * ROW_BLOCK + tid;
        if r < rows {
            if counted(labels[r as usize], ignore, has_ignore) {
                if comptime![with_logp] {
                    s -= logp[r as usize];
                }
                n += 1.0;
            }
        }
    }
    shared[tid as usize] = s;
    shared[(ROW_BLOCK + tid) as usize] = n;
    reduce_pair(shared, tid);
}

/// `out[0] = −Σ logp / count` over the rows whose label counts (NaN when none does).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn label_mean(logp: &[f32], labels: &[i32], out: &mut [f32], rows: u32, ignore: u32, #[comptime] has_ignore: bool) {
    let tid = UNIT_POS_X;
    let mut shared = Shared::<[f32]>::new_slice((2 * ROW_BLOCK) as usize);
    counted_sum(logp, labels, rows, ignore, &mut shared, tid, has_ignore, true);
    if tid == 0 {
        out[0] = shared[0] / shared[ROW_BLOCK as usize];
    }
}

/// `out[0] = −dloss[0] / count`, 0 when no label counts.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn label_coef(labels: &[i32], dloss: &[f32], out: &mut [f32], rows: u32, ignore: u32, #[comptime] has_ignore: bool) {
    let tid = UNIT_POS_X;
    let mut shared = Shared::<[f32]>::new_slice((2 * ROW_BLOCK) as usize);
    counted_sum(dloss, labels, rows, ignore, &mut shared, tid, has_ignore, false);
    if tid == 0 {
        let n = shared[ROW_BLOCK as usize];
        let mut c = 0.0f32;
        if n > 0.0 {
            c = -dloss[0] / n;
        }
        out[0] = c;
    }
}

/// `out[row] = (onehot(label) − softmax(logits[row])) · coef`, 0 on ignored rows; `coef`
/// is `coef[row]` when `per_row`, else `coef[0]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn label_grad<F: Float>(
    logits: &[F],
    labels: &[i32],
    coef: &[f32],
    nan: &[f32],
    out: &mut [F],
    cols: u32,
    ignore: u32,
    #[comptime] has_ignore: bool,
    #[comptime] per_row: bool,
) {
    let row = row_pos();
    if row as usize * cols as usize >= out.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * cols;
    let mut shared = Shared::<[f32]>::new_slice(ROW_BLOCK as usize);
    let (row_max, sum) = row_lse::<F>(logits, base, cols, &mut shared, tid);
    let label = labels[row as usize];
    let mut c = coef[0];
    if comptime![per_row] {
        c = coef[row as usize];
    }
    let on = counted(label, ignore, has_ignore);
    let mut valid = label >= 0 && u32::cast_from(label) < cols;
    if !on {
        valid = true;
    }
    let inv = 1.0f32 / sum;
    for it in 0..cols.div_ceil(ROW_BLOCK) {
        let col = it * ROW_BLOCK + tid;
        if col < cols {
            let p = f32::exp(f32::cast_from(logits[(base + col) as usize]) - row_max) * inv;
            let mut one = 0.0f32;
            if i32::cast_from(col) == label {
                one = 1.0;
            }
            let mut v = (one - p) * c;
            if !on {
                v = 0.0;
            }
            if !valid {
                v = nan[0];
            }
            out[(base + col) as usize] = F::cast_from(v);
        }
    }
}

/// The spec of a label-loss node, `None` for other nodes.
pub(crate) fn spec(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    let (ignore, grad) = match &g.node(n).op {
        Op::CrossEntropy { ignore_index } | Op::TokenLogProb { ignore_index } => (*ignore_index, false),
        Op::CrossEntropyGrad { ignore_index } | Op::TokenLogProbGrad { ignore_index } => (*ignore_index, true),
        _ => return None,
    };
    let node = g.node(n);
    let no = |reason: String| Unsupported { op: node.op.name(), reason };
    let ins = g.inputs(n);
    let logits = g.ty(ins[0]);
    let Some(elem) = Elem::from_dtype(logits.dtype) else {
        return Some(Err(no(format!("logits of dtype {} (kernels hold f32, f16 or bf16)", logits.dtype.name()))));
    };
    if !matches!(g.ty(ins[1]).dtype, DType::I32 | DType::I64) {
        return Some(Err(no("labels must be integers".into())));
    }
    if grad && g.ty(ins[2]).dtype != DType::F32 {
        return Some(Err(no(format!("an f32 cotangent, not {}", g.ty(ins[2]).dtype.name()))));
    }
    if let Some(i) = ignore.filter(|i| i32::try_from(*i).is_err()) {
        return Some(Err(no(format!("ignore_index {i} outside i32 (labels are i32 on the device)"))));
    }
    // The node's main kernel; `work` adds the reduction a loss or its count needs.
    let kind = match node.op {
        Op::CrossEntropy { .. } | Op::TokenLogProb { .. } => LabelKernel::LogProb,
        _ => LabelKernel::Grad { per_row: matches!(node.op, Op::TokenLogProbGrad { .. }) },
    };
    Some(Ok(KernelSpec::Label { elem, kind, has_ignore: ignore.is_some() }))
}

/// The launches of a label-loss node (its spec from [`spec`]).
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let KernelSpec::Label { elem, has_ignore, .. } = spec else { unreachable!("loss::work of {spec:?}") };
    let node = g.node(n);
    let logits = &g.ty(g.inputs(n)[0]).shape.0;
    let cols = *logits.last().expect("logits have a class axis");
    let rows = Size::product(&logits[..logits.len() - 1]);
    let ignore = match node.op {
        Op::CrossEntropy { ignore_index }
        | Op::TokenLogProb { ignore_index }
        | Op::CrossEntropyGrad { ignore_index }
        | Op::TokenLogProbGrad { ignore_index } => ignore_index.map_or(0, |i| i as i32 as u32),
        _ => unreachable!("loss::work of {}", node.op.name()),
    };
    let (i, s, o) = (|k| Arg::Buf(Buf::Input(k)), |k| Arg::Buf(Buf::Scratch(k)), Arg::Buf(Buf::Output(0)));
    let (v, ig) = (Arg::U32(Size::Dim(cols)), Arg::U32(Size::lit(ignore as i64)));
    let nan = Arg::F32Table(vec![f32::NAN.to_bits()]);
    let row_grid = grid_rows(rows.clone(), Size::lit(1));
    // Per element: the max, exp and sum of the log-sum-exp.
    let lse_flops = rows.clone().mul(Size::Dim(cols)).mul(Size::lit(4));
    let k = |kind| KernelSpec::Label { elem, kind, has_ignore };
    let one_cube = grid_x(Size::lit(1));
    let (scratch, launches) = match node.op {
        Op::TokenLogProb { .. } => {
            (vec![], vec![Launch::new(k(LabelKernel::LogProb), vec![i(0), i(1), nan, o, v, ig], row_grid, lse_flops)])
        }
        Op::CrossEntropy { .. } => (
            vec![Scratch { dtype: DType::F32, len: rows.clone() }],
            vec![
                Launch::new(k(LabelKernel::LogProb), vec![i(0), i(1), nan, s(0), v, ig.clone()], row_grid, lse_flops),
                Launch::new(k(LabelKernel::Mean), vec![s(0), i(1), o, Arg::U32(rows.clone()), ig], one_cube, rows),
            ],
        ),
        Op::TokenLogProbGrad { .. } => (
            vec![],
            vec![Launch::new(
                k(LabelKernel::Grad { per_row: true }),
                vec![i(0), i(1), i(2), nan, o, v, ig],
                row_grid,
                lse_flops.mul(Size::lit(2)),
            )],
        ),
        Op::CrossEntropyGrad { .. } => (
            vec![Scratch { dtype: DType::F32, len: Size::lit(1) }],
            vec![
                Launch::new(k(LabelKernel::Coef), vec![i(1), i(2), s(0), Arg::U32(rows.clone()), ig.clone()], one_cube, Size::lit(1)),
                Launch::new(
                    k(LabelKernel::Grad { per_row: false }),
                    vec![i(0), i(1), s(0), nan, o, v, ig],
                    row_grid,
                    lse_flops.mul(Size::lit(2)),
                ),
            ],
        ),
        _ => unreachable!("loss::work of {}", node.op.name()),
    };
    NodeWork::Launches { scratch, launches }
}
