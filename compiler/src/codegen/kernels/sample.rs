//! Sampling on the device ([`sample_rows`]): one cube per row of logits picks the next
//! token (the largest logit when greedy; at temperature T a draw from softmax(logits/T)
//! by the Gumbel-max trick) and writes that token's log-probability under
//! softmax(logits/T) and the distribution's entropy. A decode step then reads back `b`
//! tokens and `2·b` floats instead of `b·V` logits. No IR op: a device engine launches it
//! on the logits a step left on the device ([`sample_work`]).
//!
//! Gumbel-max: `argmax_i (x_i + g_i)` with `g_i = −ln(−ln u_i)`, `u_i` uniform in (0, 1),
//! is distributed as `softmax(x)`. `u_i` comes from a counter-based hash of (seed, row,
//! step, i), PCG's output function over 32-bit words (WGSL has no 64-bit integers), so a
//! draw needs no state on the device and is reproducible from the seed. It is not the
//! host sampler's stream: the same seed gives other (equally distributed) tokens.
//!
//! The scaled logits are `f32(logit · f32(1/T))`, as the train graph's `mul` rounds them
//! (the host's `token_logprob`); the log-sum-exp is in `f32` here (the host's in `f64`).
//! Ties go to the lowest index and NaN never wins, as the host's `argmax`.

#[cfg(feature = "kernels")]
use super::{reduce_pair, row_pos, ROW_BLOCK, ROW_BLOCK_LOG2};
use crate::codegen::launch::{grid_rows, Arg, Buf, Launch, NodeWork, Size};
use crate::codegen::{Elem, KernelSpec};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// PCG's output permutation of one 32-bit state: a well-mixed hash.
#[cfg(feature = "kernels")]
#[cube]
fn pcg(v: u32) -> u32 {
    let s = v * 747_796_405u32 + 2_891_336_453u32;
    let w = ((s >> ((s >> 28u32) + 4u32)) ^ s) * 277_803_737u32;
    (w >> 22u32) ^ w
}

/// The uniform in (0, 1) of element `i` of `row` at `step` under `seed`.
#[cfg(feature = "kernels")]
#[cube]
fn uniform(seed_lo: u32, seed_hi: u32, row: u32, step: u32, i: u32) -> f32 {
    let h = pcg(seed_lo ^ pcg(seed_hi ^ pcg(row ^ pcg(step ^ pcg(i)))));
    // 24 bits, centred in their interval: never 0, never 1.
    f32::cast_from(h >> 8u32) * comptime![1.0f32 / 16_777_216.0] + comptime![0.5f32 / 16_777_216.0]
}

/// Whether candidate `(bv, bi)` beats `(av, ai)`: a larger value, or the same value at a
/// lower index; index `none` is no candidate.
#[cfg(feature = "kernels")]
#[cube]
fn beats(av: f32, ai: f32, bv: f32, bi: f32, none: f32) -> bool {
    bi != none && (ai == none || bv > av || (bv == av && bi < ai))
}

/// One row of `logits [rows, v]` per cube: `tokens[row]` the chosen token,
/// `stats[2·row]` its log-probability and `stats[2·row + 1]` the entropy (nats) under
/// softmax(logits · consts[0]). `consts = [1/T, −∞]`, `p = [seed_lo, seed_hi, step]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn sample_rows<F: Float>(
    logits: &[F],
    consts: &[f32],
    p: &[u32],
    tokens: &mut [i32],
    stats: &mut [f32],
    v: u32,
    #[comptime] greedy: bool,
) {
    let row = row_pos();
    if row as usize >= tokens.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * v;
    let inv = consts[0];
    let none = f32::cast_from(v);
    // [best x][its index][best x + gumbel][its index], ROW_BLOCK each.
    let mut sh = Shared::<[f32]>::new_slice(comptime![(4 * ROW_BLOCK) as usize]);
    // (Separate `let mut`s: a tuple of mutable bindings fails CubeCL's IR verification.)
    let mut bv = consts[1];
    let mut bi = none;
    let mut gv = consts[1];
    let mut gi = none;
    let iters = v.div_ceil(ROW_BLOCK);
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < v {
            let x = f32::cast_from(logits[(base + c) as usize]) * inv;
            let cf = f32::cast_from(c);
            if !x.is_nan() {
                if beats(bv, bi, x, cf, none) {
                    bv = x;
                    bi = cf;
                }
                if !comptime![greedy] {
                    let g = x - f32::ln(-f32::ln(uniform(p[0], p[1], row, p[2], c)));
                    if beats(gv, gi, g, cf, none) {
                        gv = g;
                        gi = cf;
                    }
                }
            }
        }
    }
    sh[tid as usize] = bv;
    sh[(ROW_BLOCK + tid) as usize] = bi;
    sh[(2 * ROW_BLOCK + tid) as usize] = gv;
    sh[(3 * ROW_BLOCK + tid) as usize] = gi;
    sync_cube();
    #[unroll]
    for s in 0..ROW_BLOCK_LOG2 {
        let stride = comptime![ROW_BLOCK >> (s + 1)];
        if tid < stride {
            let o = tid + stride;
            if beats(sh[tid as usize], sh[(ROW_BLOCK + tid) as usize], sh[o as usize], sh[(ROW_BLOCK + o) as usize], none) {
                sh[tid as usize] = sh[o as usize];
                sh[(ROW_BLOCK + tid) as usize] = sh[(ROW_BLOCK + o) as usize];
            }
            let a = comptime![2 * ROW_BLOCK];
            let b = comptime![3 * ROW_BLOCK];
            if beats(sh[(a + tid) as usize], sh[(b + tid) as usize], sh[(a + o) as usize], sh[(b + o) as usize], none) {
                sh[(a + tid) as usize] = sh[(a + o) as usize];
                sh[(b + tid) as usize] = sh[(b + o) as usize];
            }
        }
        sync_cube();
    }
    let m = sh[0];
    let mut token = sh[ROW_BLOCK as usize];
    if !comptime![greedy] {
        token = sh[(3 * ROW_BLOCK) as usize];
    }
    sync_cube();
    // Σ e^(x−m) and Σ e^(x−m)·x. A −∞ logit weighs nothing; a NaN or +∞ one makes the
    // sums NaN, so the row's log-probability is NaN, which the host reports as an error
    // (as it reports NaN logits), never a token.
    let mut s0 = 0.0f32;
    let mut s1 = 0.0f32;
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < v {
            let x = f32::cast_from(logits[(base + c) as usize]) * inv;
            let e = f32::exp(x - m);
            s0 += e;
            if x != consts[1] {
                s1 += e * x;
            }
        }
    }
    sh[tid as usize] = s0;
    sh[(ROW_BLOCK + tid) as usize] = s1;
    reduce_pair(&mut sh, tid);
    if tid == 0 {
        let t = select(token == none, 0u32, u32::cast_from(token));
        let lse = m + f32::ln(sh[0]);
        let xt = f32::cast_from(logits[(base + t) as usize]) * inv;
        tokens[row as usize] = i32::cast_from(t);
        stats[(2 * row) as usize] = xt - lse;
        stats[(2 * row + 1) as usize] = lse - sh[ROW_BLOCK as usize] / sh[0];
    }
}

/// How a device samples one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// 0 for greedy.
    pub temperature: f32,
    pub seed: u64,
    /// Which draw of the sequence this is (the decode step).
    pub step: u32,
}

/// The work of [`sample_rows`] over input 0 (`rows × v` logits in `elem`) into outputs 0
/// (`rows` tokens, `i32`) and 1 (`2·rows` floats).
pub fn sample_work(rows: usize, v: usize, elem: Elem, s: &SampleParams) -> NodeWork {
    let greedy = s.temperature <= 0.0;
    let inv = if greedy { 1.0 } else { (1.0 / s.temperature as f64) as f32 };
    let lit = |x: u64| Size::lit(x as i64);
    let args = vec![
        Arg::Buf(Buf::Input(0)),
        Arg::F32Table(vec![inv.to_bits(), f32::NEG_INFINITY.to_bits()]),
        Arg::Table(vec![lit(s.seed & 0xffff_ffff), lit(s.seed >> 32), lit(s.step as u64)]),
        Arg::Buf(Buf::Output(0)),
        Arg::Buf(Buf::Output(1)),
        Arg::U32(Size::lit(v as i64)),
    ];
    let launch = Launch::new(
        KernelSpec::SampleRows { elem, greedy },
        args,
        grid_rows(Size::lit(rows as i64), Size::lit(1)),
        Size::lit(6 * (rows * v) as i64),
    );
    NodeWork::Launches { scratch: vec![], launches: vec![launch] }
}
