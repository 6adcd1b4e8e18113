//! The optimizer's kernels, run on a device that keeps a training run's weights and
//! AdamW state (`dsc_runtime::train::device`): they are no IR op, and a runtime launches
//! them through [`launches`] after each step's gradients.
//!
//! - [`adamw`]: one unit per element, `torch.optim.AdamW`'s update in its order of
//!   operations (the host form and its rounding are `dsc_runtime::train::optim`'s), the
//!   global-norm clip coefficient folded into the gradient as it is read. The weight it
//!   updates is the `f32` master; the gradient may be in the model's dtype (a bf16 or f16
//!   train graph), read as `f32`, and the model-dtype copy is then cast from the master
//!   ([`cast_work`]). Its scalars come in a table ([`AdamWScalars`]) the host computes in
//!   `f64` and rounds as torch does.
//! - [`sum_squares`]: the gradient norm's parts: cube `c` sums the squares of its
//!   [`SS_CHUNK`] elements in `f32` (tree-reduced in shared memory) into `out[c]`; the
//!   host adds the partials in `f64`. Cubes fold into `x · z` past 65,535 as the row
//!   kernels' do.

#[cfg(feature = "kernels")]
use super::block_reduce;
use super::ROW_BLOCK;
use crate::codegen::launch::{grid_rows, Arg, Buf, Launch, NodeWork, Size};
use crate::codegen::{Elem, KernelSpec};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// Elements one [`sum_squares`] cube sums.
pub const SS_CHUNK: u32 = 16 * ROW_BLOCK;

/// AdamW on one `f32` tensor of `n` elements: `p` the weight, `g` its gradient, `m` and
/// `v` the moments, `s` the step's scalars (see [`AdamWScalars::table`]):
///
/// ```text
/// g ← g·clip;  p ← p·decay
/// m ← lerp(m, g, w)           (fused multiply-add, torch's two forms by w < 0.5)
/// v ← v·β2 + (c2·g)·g
/// p ← p + (step·m) / (sqrt(v)/bc2 + eps)
/// ```
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn adamw<G: Float>(p: &mut [f32], g: &[G], m: &mut [f32], v: &mut [f32], s: &[f32], n: u32) {
    let i = ABSOLUTE_POS;
    if (i as u32) < n {
        let gi = f32::cast_from(g[i]) * s[0];
        let x = p[i] * s[1];
        let w = s[2];
        let mi = m[i];
        let d = gi - mi;
        let mut mn = fma(w - 1.0, d, gi);
        if w < 0.5 {
            mn = fma(w, d, mi);
        }
        m[i] = mn;
        let vn = v[i] * s[3] + (s[4] * gi) * gi;
        v[i] = vn;
        let denom = f32::sqrt(vn) / s[6] + s[7];
        p[i] = x + (s[5] * mn) / denom;
    }
}

/// `out[c] = Σ x[c·SS_CHUNK ..][..SS_CHUNK]²` in `f32`, for the cubes `c` covering `n`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn sum_squares<G: Float>(x: &[G], out: &mut [f32], n: u32) {
    let c = CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X;
    let base = c * SS_CHUNK;
    if base >= n {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let mut shared = Shared::<[f32]>::new_slice(ROW_BLOCK as usize);
    let mut acc = 0.0f32;
    #[unroll]
    for j in 0..comptime![SS_CHUNK / ROW_BLOCK] {
        let e = base + j * ROW_BLOCK + tid;
        if e < n {
            let v = f32::cast_from(x[e as usize]);
            acc += v * v;
        }
    }
    shared[tid as usize] = acc;
    block_reduce::<f32>(&mut shared, tid, false);
    if tid == 0 {
        out[c as usize] = shared[0];
    }
}

/// One AdamW step's scalars for one tensor, as torch rounds them to `f32`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// The clip coefficient (1 when the norm is within bounds).
    pub clip: f32,
    /// `1 - lr·weight_decay` (1 for tensors that are not decayed).
    pub decay: f32,
    /// `1 - β1`, the lerp weight.
    pub w: f32,
    pub beta2: f32,
    /// `1 - β2`.
    pub c2: f32,
    /// `-lr / (1 - β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - β2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWScalars {
    /// The `s` table of [`adamw`], in its order.
    pub fn table(&self) -> Vec<u32> {
        [self.clip, self.decay, self.w, self.beta2, self.c2, self.step_size, self.bc2_sqrt, self.eps].map(f32::to_bits).to_vec()
    }
}

/// The work of one AdamW update of an `n`-element tensor: inputs `p` (`f32`), `g` (in
/// `grad`), `m`, `v` (the first, third and fourth updated in place), no outputs.
pub fn adamw_work(n: usize, grad: Elem, s: &AdamWScalars) -> NodeWork {
    let n = Size::lit(n as i64);
    let args = vec![
        Arg::Buf(Buf::Input(0)),
        Arg::Buf(Buf::Input(1)),
        Arg::Buf(Buf::Input(2)),
        Arg::Buf(Buf::Input(3)),
        Arg::F32Table(s.table()),
        Arg::U32(n.clone()),
    ];
    let grid = crate::codegen::launch::grid_linear(n.clone().ceil_div(super::EW_BLOCK as i64));
    let flops = n.mul(Size::lit(14));
    NodeWork::Launches { scratch: vec![], launches: vec![Launch::new(KernelSpec::AdamW { grad }, args, grid, flops)] }
}

/// Cubes [`sum_squares`] takes for `n` elements (the length of its output).
pub fn sum_squares_parts(n: usize) -> usize {
    n.div_ceil(SS_CHUNK as usize).max(1)
}

/// The work of [`sum_squares`] over input 0 (`n` elements in `elem`) into output 0
/// ([`sum_squares_parts`] `f32`s).
pub fn sum_squares_work(n: usize, elem: Elem) -> NodeWork {
    let parts = Size::lit(sum_squares_parts(n) as i64);
    let args = vec![Arg::Buf(Buf::Input(0)), Arg::Buf(Buf::Output(0)), Arg::U32(Size::lit(n as i64))];
    let launch = Launch::new(KernelSpec::SumSquares { elem }, args, grid_rows(parts, Size::lit(1)), Size::lit(2 * n as i64));
    NodeWork::Launches { scratch: vec![], launches: vec![launch] }
}

/// The work of casting input 0 (`n` elements of `from`) into output 0 (in `to`): a
/// master weight into the copy a train graph in another dtype reads.
pub fn cast_work(n: usize, from: Elem, to: Elem) -> NodeWork {
    let n = Size::lit(n as i64);
    let grid = crate::codegen::launch::grid_linear(n.ceil_div(super::EW_BLOCK as i64));
    let args = vec![Arg::Buf(Buf::Input(0)), Arg::Buf(Buf::Output(0))];
    NodeWork::Launches { scratch: vec![], launches: vec![Launch::new(KernelSpec::Cast { from, to }, args, grid, Size::lit(0))] }
}
