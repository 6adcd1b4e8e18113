//! Mixture-of-experts and selection kernels: the router ([`moe_route`]), top-k along the
//! last axis ([`top_k`], which is also greedy sampling's argmax), and the routed experts
//! ([`moe_dispatch`] → [`moe_gate_up`] → [`moe_down`] → [`moe_combine`]).
//!
//! Every kernel reproduces the reference interpreter's order exactly where the result is
//! discrete (indices) and is deterministic everywhere: no float atomics, no order that
//! depends on scheduling.
//!
//! Launch shapes (decided in [`work_expert_ffn`] / `select::node_work`, never in a runtime):
//! - [`moe_route`]: one cube of [`SELECT_BLOCK`] units per token. The token's `E` scores,
//!   choice scores and group scores sit in one shared buffer (E is a comptime constant
//!   from the IR, so the buffer size is known); softmax's max and sum are tree
//!   reductions. Selection is by *rank*: every kept expert counts the kept experts that
//!   come before it in the reference's order (choice score descending, lower id first),
//!   and writes itself to slot `rank` when `rank < top_k`. That is `E²/block` compares per
//!   unit (512 for DeepSeek-V3's 256 experts), needs no sort and no index reduction, and
//!   gives the reference's order by construction.
//! - [`top_k`]: one cube of [`SELECT_BLOCK`] units per row; `k` rounds of a block argmax,
//!   round `r` taking the best element strictly *after* round `r-1`'s pick in the total
//!   order (value descending, NaN first, lower index first). No per-row scratch, so rows
//!   of a 129k vocabulary work as well as rows of 8.
//! - The expert FFN takes four launches over `P = T·k` (token, slot) pairs:
//!   1. [`moe_dispatch`], one cube per expert `e`: `offset(e) = #{pairs with expert < e}`
//!      (a block reduction), then the pairs of `e`, compacted in pair order by a block
//!      prefix sum, are written at `offset(e)..`: `rows[r]` = pair, `row_expert[r]` = e,
//!      `pos[pair]` = r, `offsets[e+1]` = end of e's rows. Sorted rows are grouped by
//!      expert, and within one in (token, slot) order, as the reference's buckets.
//!   2. [`moe_gate_up`]: a [`TILE`]×[`TILE`] tiled GEMM over the sorted rows, grid
//!      `(⌈i/TILE⌉, ⌈P/TILE⌉)`. A row tile may straddle experts; the cube walks the
//!      tile's expert segments (one in the common case, at most `TILE`) and runs the
//!      shared-memory tile loop once per segment with that expert's weights, rows outside
//!      the segment masked. Gate and up share the x tile; `silu(g)·u` is fused into the
//!      store. Every cube has work (no grid over experts with empty cubes).
//!   3. [`moe_down`]: the same over `act [P, i]` and `down [E, h, i]` → `y [P, h]`.
//!   4. [`moe_combine`]: one unit per output element, summing its token's `k` rows of `y`
//!      times the gate weights in slot order (the reference adds in expert-id order;
//!      the difference is rounding only).

pub use crate::codegen::spec::RouteConfig;
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

use super::TILE;

pub use crate::codegen::spec::SELECT_BLOCK;
/// `log2(SELECT_BLOCK)`: reductions are comptime-unrolled halving loops (a runtime
/// `while` over a shared-memory index trips a CubeCL 0.11.3 verifier bug, CUBECL.md §2).
pub const SELECT_BLOCK_LOG2: u32 = 7;

/// `a` comes before `b` in the order top-k and routing use: larger first, NaN above every
/// number (as `torch.topk`), equal values to the lower index (`desc_then_index` in the
/// reference). NaN is tested on the bits (`is_nan`); `x != x` is folded to `false` by
/// WGSL compilers, which may assume there are no NaNs.
#[cfg(feature = "kernels")]
#[cube]
fn before<F: Float>(a: F, ia: u32, b: F, ib: u32) -> bool {
    let an = nan::<F>(a);
    let bn = nan::<F>(b);
    let lower = ia < ib;
    let mut r = false;
    if an {
        r = !bn || lower;
    } else if !bn {
        r = a > b || (a == b && lower);
    }
    r
}

/// `x` is NaN, as a plain `bool` (`F::is_nan` answers in `F`'s vector shape).
#[cfg(feature = "kernels")]
#[cube]
fn nan<F: Float>(x: F) -> bool {
    let one = Vector::<F, Const<1>>::new(x);
    let t = Vector::<F, Const<1>>::new(F::new(1.0));
    let z = Vector::<F, Const<1>>::new(F::new(0.0));
    select_many(one.is_nan(), t, z).extract(0usize) != F::new(0.0)
}

/// Tree reduction of `sh[at..at + SELECT_BLOCK]` into `sh[at]`, by sum or by max.
#[cfg(feature = "kernels")]
#[cube]
fn reduce_at<F: Float>(sh: &mut Shared<[F]>, at: u32, tid: u32, #[comptime] max: bool) {
    sync_cube();
    #[unroll]
    for s in 0..SELECT_BLOCK_LOG2 {
        let stride = comptime![SELECT_BLOCK >> (s + 1)];
        if tid < stride {
            let a = sh[(at + tid) as usize];
            let b = sh[(at + tid + stride) as usize];
            if comptime![max] {
                sh[(at + tid) as usize] = select(a > b, a, b);
            } else {
                sh[(at + tid) as usize] = a + b;
            }
        }
        sync_cube();
    }
}

/// The MoE router for one token per cube: `inputs` are the logits `[T, E]` and, when
/// `cfg.bias`, the selection bias `[E]`; writes `indices [T, k]` (expert ids in the
/// reference's order) and `weights [T, k]`.
///
/// Shared layout (one buffer, see `matmul`): scores `[E]`, choice scores `[E]`, group
/// scores `[G]`, group kept flags `[G]`, the chosen scores by rank `[k]`, then
/// [`SELECT_BLOCK`] of reduction scratch.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn moe_route<F: Float>(inputs: &Sequence<Box<[F]>>, indices: &mut [i32], weights: &mut [F], #[comptime] cfg: RouteConfig) {
    let t = crate::codegen::kernels::row_pos();
    let tid = UNIT_POS_X;
    let e = comptime![cfg.experts];
    let k = comptime![cfg.top_k];
    if t as usize * k as usize >= indices.len() {
        terminate!();
    }
    let groups = comptime![cfg.groups];
    let per_group = comptime![cfg.experts / cfg.groups];
    let (ch, gs, keep, sel, red) = comptime![(
        cfg.experts,
        2 * cfg.experts,
        2 * cfg.experts + cfg.groups,
        2 * cfg.experts + 2 * cfg.groups,
        2 * cfg.experts + 2 * cfg.groups + cfg.top_k
    )];
    let mut sh = Shared::<[F]>::new_slice(comptime![(2 * cfg.experts + 2 * cfg.groups + cfg.top_k + SELECT_BLOCK) as usize]);
    let iters = comptime![cfg.experts.div_ceil(SELECT_BLOCK)];
    let logits = inputs.index(0);
    let base = t * e;

    // Scores.
    if comptime![cfg.sigmoid] {
        for it in 0..iters {
            let j = it * SELECT_BLOCK + tid;
            if j < e {
                sh[j as usize] = F::new(1.0) / (F::new(1.0) + F::exp(-logits[(base + j) as usize]));
            }
        }
    } else {
        // Max-subtracted softmax over the experts; element 0 seeds idle units' max.
        let mut m = logits[base as usize];
        for it in 0..iters {
            let j = it * SELECT_BLOCK + tid;
            if j < e {
                let v = logits[(base + j) as usize];
                m = select(v > m, v, m);
            }
        }
        sh[(red + tid) as usize] = m;
        reduce_at::<F>(&mut sh, red, tid, true);
        let row_max = sh[red as usize];
        sync_cube(); // everyone has the max before the scratch is reused
        let mut acc = F::new(0.0);
        for it in 0..iters {
            let j = it * SELECT_BLOCK + tid;
            if j < e {
                let x = F::exp(logits[(base + j) as usize] - row_max);
                sh[j as usize] = x;
                acc += x;
            }
        }
        sh[(red + tid) as usize] = acc;
        reduce_at::<F>(&mut sh, red, tid, false);
        let sum = sh[red as usize];
        for it in 0..iters {
            let j = it * SELECT_BLOCK + tid;
            if j < e {
                sh[j as usize] /= sum;
            }
        }
    }
    // Choice scores: biased for choosing, the unbiased scores stay for the weights.
    for it in 0..iters {
        let j = it * SELECT_BLOCK + tid;
        if j < e {
            let mut c = sh[j as usize];
            if comptime![cfg.bias] {
                c += inputs.index(1)[j as usize];
            }
            sh[(ch + j) as usize] = c;
        }
    }
    sync_cube();

    // Group-limited routing: score each group by its best choice or its two best, keep
    // the `groups_kept` best groups (ties to the lower group).
    if comptime![cfg.groups > 1] {
        let giters = comptime![cfg.groups.div_ceil(SELECT_BLOCK)];
        for it in 0..giters {
            let g = it * SELECT_BLOCK + tid;
            if g < groups {
                let first = ch + g * per_group;
                let mut b1 = sh[first as usize];
                let mut i1 = 0u32;
                let mut b2 = F::new(0.0);
                let mut i2 = 0u32;
                let mut has2 = false;
                for j in 1..per_group {
                    let v = sh[(first + j) as usize];
                    if before::<F>(v, j, b1, i1) {
                        b2 = b1;
                        i2 = i1;
                        b1 = v;
                        i1 = j;
                        has2 = true;
                    } else if !has2 || before::<F>(v, j, b2, i2) {
                        b2 = v;
                        i2 = j;
                        has2 = true;
                    }
                }
                let mut score = b1;
                if comptime![cfg.top2_sum] && has2 {
                    score = b1 + b2;
                }
                sh[(gs + g) as usize] = score;
            }
        }
        sync_cube();
        for it in 0..giters {
            let g = it * SELECT_BLOCK + tid;
            if g < groups {
                let mine = sh[(gs + g) as usize];
                let mut rank = 0u32;
                for o in 0..groups {
                    if before::<F>(sh[(gs + o) as usize], o, mine, g) {
                        rank += 1;
                    }
                }
                sh[(keep + g) as usize] = select(rank < comptime![cfg.groups_kept], F::new(1.0), F::new(0.0));
            }
        }
        sync_cube();
    }

    // Rank of every candidate expert among the candidates; the first k take their slots.
    for it in 0..iters {
        let j = it * SELECT_BLOCK + tid;
        if j < e {
            let mut candidate = true;
            if comptime![cfg.groups > 1] {
                candidate = sh[(keep + j / per_group) as usize] != F::new(0.0);
            }
            if candidate {
                let cj = sh[(ch + j) as usize];
                let mut rank = 0u32;
                for i in 0..e {
                    let mut other = true;
                    if comptime![cfg.groups > 1] {
                        other = sh[(keep + i / per_group) as usize] != F::new(0.0);
                    }
                    if other && before::<F>(sh[(ch + i) as usize], i, cj, j) {
                        rank += 1;
                    }
                }
                if rank < k {
                    indices[(t * k + rank) as usize] = i32::cast_from(j);
                    sh[(sel + rank) as usize] = sh[j as usize];
                }
            }
        }
    }
    sync_cube();

    // Weights: the unbiased scores, over their sum in rank order + 1e-20 when normalising
    // (the reference's fold, so the same rounding), times the scale.
    let kiters = comptime![cfg.top_k.div_ceil(SELECT_BLOCK)];
    for it in 0..kiters {
        let r = it * SELECT_BLOCK + tid;
        if r < k {
            let mut w = sh[(sel + r) as usize];
            if comptime![cfg.normalize] {
                let mut sum = F::new(0.0);
                for q in 0..k {
                    sum += sh[(sel + q) as usize];
                }
                w /= sum + F::new(1e-20);
            }
            weights[(t * k + r) as usize] = w * F::new(comptime![f32::from_bits(cfg.scale_bits)]);
        }
    }
}

/// The `k` largest of each row of `cols` elements, descending, ties to the lower index,
/// NaN largest: `values [rows, k]` and `indices [rows, k]`. One cube per row; the shared
/// buffer holds candidate *indices* (values are re-read from `x`), so one `u32` buffer
/// serves any float type.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn top_k<F: Float>(x: &[F], values: &mut [F], indices: &mut [i32], cols: u32, k: u32) {
    let row = crate::codegen::kernels::row_pos();
    if row as usize * cols as usize >= x.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * cols;
    let mut sh = Shared::<[u32]>::new_slice(SELECT_BLOCK as usize);
    let iters = cols.div_ceil(SELECT_BLOCK);
    // `cols` means "no candidate".
    let mut prev = cols;
    let mut prev_v = F::new(0.0);
    for r in 0..k {
        let mut best = cols;
        let mut best_v = F::new(0.0);
        for it in 0..iters {
            let c = it * SELECT_BLOCK + tid;
            if c < cols {
                let v = x[(base + c) as usize];
                let eligible = prev == cols || before::<F>(prev_v, prev, v, c);
                if eligible && (best == cols || before::<F>(v, c, best_v, best)) {
                    best = c;
                    best_v = v;
                }
            }
        }
        sh[tid as usize] = best;
        sync_cube();
        #[unroll]
        for s in 0..SELECT_BLOCK_LOG2 {
            let stride = comptime![SELECT_BLOCK >> (s + 1)];
            if tid < stride {
                let a = sh[tid as usize];
                let b = sh[(tid + stride) as usize];
                if b != cols && (a == cols || before::<F>(x[(base + b) as usize], b, x[(base + a) as usize], a)) {
                    sh[tid as usize] = b;
                }
            }
            sync_cube();
        }
        prev = sh[0];
        prev_v = x[(base + prev) as usize];
        if tid == 0 {
            values[(row * k + r) as usize] = prev_v;
            indices[(row * k + r) as usize] = i32::cast_from(prev);
        }
        sync_cube(); // everyone has read the pick before the next round overwrites it
    }
}

/// Dispatch for expert `CUBE_POS_X` over the `pairs` (token, slot) expert ids: writes
/// that expert's sorted rows (`rows[r]` = pair, `row_expert[r]` = expert, `pos[pair]` =
/// r) and `offsets[e + 1]` (and `offsets[0] = 0`). Ids outside `0..experts` belong to no
/// expert and their pairs get no row (the reference rejects them).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn moe_dispatch(ids: &[i32], rows: &mut [i32], row_expert: &mut [i32], pos: &mut [i32], offsets: &mut [i32], pairs: u32) {
    let e = CUBE_POS_X;
    let ei = i32::cast_from(e);
    let tid = UNIT_POS_X;
    let mut sh = Shared::<[u32]>::new_slice(SELECT_BLOCK as usize);
    let iters = pairs.div_ceil(SELECT_BLOCK);
    // offset(e): pairs routed to a lower expert (negative ids are out of range).
    let mut lower = 0u32;
    for it in 0..iters {
        let p = it * SELECT_BLOCK + tid;
        if p < pairs {
            let id = ids[p as usize];
            if id >= 0 && id < ei {
                lower += 1;
            }
        }
    }
    sh[tid as usize] = lower;
    sync_cube();
    #[unroll]
    for s in 0..SELECT_BLOCK_LOG2 {
        let stride = comptime![SELECT_BLOCK >> (s + 1)];
        if tid < stride {
            sh[tid as usize] += sh[(tid + stride) as usize];
        }
        sync_cube();
    }
    let offset = sh[0];
    sync_cube();
    // Stream compaction, one block of pairs at a time: an inclusive prefix sum of the
    // "routed to e" flags (Hillis–Steele) gives each pair its place.
    let mut written = 0u32;
    for it in 0..iters {
        let p = it * SELECT_BLOCK + tid;
        let mut flag = 0u32;
        if p < pairs && ids[p as usize] == ei {
            flag = 1;
        }
        sh[tid as usize] = flag;
        sync_cube();
        #[unroll]
        for s in 0..SELECT_BLOCK_LOG2 {
            let stride = comptime![1u32 << s];
            let mut add = 0u32;
            if tid >= stride {
                add = sh[(tid - stride) as usize];
            }
            sync_cube();
            sh[tid as usize] += add;
            sync_cube();
        }
        if flag == 1 {
            let r = offset + written + sh[tid as usize] - 1;
            rows[r as usize] = i32::cast_from(p);
            row_expert[r as usize] = ei;
            pos[p as usize] = i32::cast_from(r);
        }
        written += sh[(SELECT_BLOCK - 1) as usize];
        sync_cube(); // the block total is read before the next block overwrites it
    }
    if tid == 0 {
        offsets[(e + 1) as usize] = i32::cast_from(offset + written);
        if e == 0 {
            offsets[0] = 0;
        }
    }
}

/// `act[r, n] = silu(x[tok(r)] · gate[e(r), n]) · (x[tok(r)] · up[e(r), n])` over the
/// sorted rows `r < pairs`, `tok(r) = rows[r] / top_k`, `e(r) = row_expert[r]`;
/// `x [T, h]`, `gate, up [E, inter, h]`, `act [pairs, inter]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn moe_gate_up<F: Float>(
    x: &[F],
    rows: &[i32],
    row_expert: &[i32],
    offsets: &[i32],
    gate: &[F],
    up: &[F],
    act: &mut [F],
    pairs: u32,
    top_k: u32,
    h: u32,
    inter: u32,
) {
    let tx = UNIT_POS_X; // along inter
    let ty = UNIT_POS_Y; // along the sorted rows
    let col = CUBE_POS_X * TILE + tx;
    let wn = CUBE_POS_X * TILE + ty; // the weight row this unit stages
    let start = CUBE_POS_Y * TILE;
    let end = min(start + TILE, pairs);
    let row = start + ty;
    let mut tok = 0u32;
    if row < end {
        tok = u32::cast_from(rows[row as usize]) / top_k;
    }
    // x tile at 0, gate tile at TILE², up tile at 2·TILE² (one shared buffer, see matmul).
    let mut mem = Shared::<[F]>::new_slice((3 * TILE * TILE) as usize);
    let tt = TILE * TILE;
    let ktiles = h.div_ceil(TILE);
    let mut seg = start;
    // One pass per expert segment of the tile; `seg` is the same in every unit, so the
    // barriers inside are reached by all of them.
    while seg < end {
        let e = u32::cast_from(row_expert[seg as usize]);
        let seg_end = min(u32::cast_from(offsets[(e + 1) as usize]), end);
        let mine = row >= seg && row < seg_end;
        let wbase = e * inter * h;
        let mut g = F::new(0.0);
        let mut u = F::new(0.0);
        for t in 0..ktiles {
            let kx = t * TILE + tx;
            let mut xv = F::new(0.0);
            if mine && kx < h {
                xv = x[(tok * h + kx) as usize];
            }
            mem[(ty * TILE + tx) as usize] = xv;
            let mut gv = F::new(0.0);
            let mut uv = F::new(0.0);
            if wn < inter && kx < h {
                gv = gate[(wbase + wn * h + kx) as usize];
                uv = up[(wbase + wn * h + kx) as usize];
            }
            mem[(tt + tx * TILE + ty) as usize] = gv;
            mem[(2 * tt + tx * TILE + ty) as usize] = uv;
            sync_cube();
            #[unroll]
            for kk in 0..TILE {
                let xa = mem[(ty * TILE + kk) as usize];
                g += xa * mem[(tt + kk * TILE + tx) as usize];
                u += xa * mem[(2 * tt + kk * TILE + tx) as usize];
            }
            sync_cube();
        }
        if mine && col < inter {
            act[(row * inter + col) as usize] = g / (F::new(1.0) + F::exp(-g)) * u;
        }
        seg = seg_end;
    }
}

/// `y[r, n] = act[r] · down[e(r), n]` over the sorted rows: `act [pairs, inter]`,
/// `down [E, h, inter]`, `y [pairs, h]`. The segment walk is [`moe_gate_up`]'s.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn moe_down<F: Float>(act: &[F], row_expert: &[i32], offsets: &[i32], down: &[F], y: &mut [F], pairs: u32, h: u32, inter: u32) {
    let tx = UNIT_POS_X; // along h
    let ty = UNIT_POS_Y; // along the sorted rows
    let col = CUBE_POS_X * TILE + tx;
    let wn = CUBE_POS_X * TILE + ty;
    let start = CUBE_POS_Y * TILE;
    let end = min(start + TILE, pairs);
    let row = start + ty;
    let mut mem = Shared::<[F]>::new_slice((2 * TILE * TILE) as usize);
    let tt = TILE * TILE;
    let ktiles = inter.div_ceil(TILE);
    let mut seg = start;
    while seg < end {
        let e = u32::cast_from(row_expert[seg as usize]);
        let seg_end = min(u32::cast_from(offsets[(e + 1) as usize]), end);
        let mine = row >= seg && row < seg_end;
        let wbase = e * h * inter;
        let mut acc = F::new(0.0);
        for t in 0..ktiles {
            let kx = t * TILE + tx;
            let mut av = F::new(0.0);
            if mine && kx < inter {
                av = act[(row * inter + kx) as usize];
            }
            mem[(ty * TILE + tx) as usize] = av;
            let mut wv = F::new(0.0);
            if wn < h && kx < inter {
                wv = down[(wbase + wn * inter + kx) as usize];
            }
            mem[(tt + tx * TILE + ty) as usize] = wv;
            sync_cube();
            #[unroll]
            for kk in 0..TILE {
                acc += mem[(ty * TILE + kk) as usize] * mem[(tt + kk * TILE + tx) as usize];
            }
            sync_cube();
        }
        if mine && col < h {
            y[(row * h + col) as usize] = acc;
        }
        seg = seg_end;
    }
}

/// `out[t, c] = Σ_s y[pos[t·k + s], c] · weights[t·k + s]` for slots `s` in order: token
/// `row_pos()`, columns `CUBE_POS_Y·SELECT_BLOCK + unit`. The gate weights may be of
/// another float type `W` (routers often run in f32).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn moe_combine<F: Float, W: Float>(y: &[F], pos: &[i32], weights: &[W], out: &mut [F], h: u32, top_k: u32) {
    let t = crate::codegen::kernels::row_pos();
    let c = CUBE_POS_Y * SELECT_BLOCK + UNIT_POS_X;
    if c < h && (t as usize) * (h as usize) < out.len() {
        let mut acc = F::new(0.0);
        for s in 0..top_k {
            let p = t * top_k + s;
            let r = u32::cast_from(pos[p as usize]);
            acc += y[(r * h + c) as usize] * F::cast_from(weights[p as usize]);
        }
        out[(t * h + c) as usize] = acc;
    }
}

// ------------------------------------------------------------------ host side: specs and launches

use crate::codegen::launch::{elem_dtype, grid_rows, grid_x, single, tiled_flops, Arg, Buf, Launch, NodeWork, Scratch, Size, Touch};
use crate::codegen::{Elem, KernelSpec, Unsupported};
use crate::ir::{DType, Dim, Graph, GroupScore, NodeId, Op, Scoring, Ty};

/// The most experts [`moe_route`] keeps in shared memory: `(2E + 2G + k + 128)` elements
/// must fit lavapipe's 32 KiB with `f32` (and leave room on any GPU).
pub const MAX_ROUTE_EXPERTS: u32 = 2048;

/// The kernel of a MoE / selection node (`None` for other ops). An `expert_ffn` is several
/// launches of different kernels, so it has no single spec; see [`work_expert_ffn`].
pub(crate) fn spec_from_node(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    let node = g.node(n);
    let op = node.op.name();
    let ins: Vec<Ty> = g.inputs(n).iter().map(|&v| g.ty(v).clone()).collect();
    let spec = match &node.op {
        Op::MoeRoute(r) => route_spec(r, &ins, &node.outputs),
        Op::TopK { k, axis } => top_k_spec(*k, *axis, &ins, &node.outputs),
        Op::ExpertFfn => Err("runs as several launches (dispatch, grouped GEMMs, combine): see select::node_work".into()),
        // Only train graphs replay routing, and those run on the reference interpreter.
        Op::MoeRouteReplay(_) => Err("routing replay is a training op: no kernel, train graphs run on the reference interpreter".into()),
        _ => return None,
    };
    Some(spec.map_err(|reason| Unsupported { op, reason }))
}

fn float_elem(t: &Ty, what: &str) -> Result<Elem, String> {
    Elem::from_dtype(t.dtype).ok_or_else(|| format!("{what} dtype {} (kernels hold f32, f16 or bf16)", t.dtype.name()))
}

fn const_dim(d: Dim, what: &str) -> Result<u32, String> {
    d.as_const().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| format!("{what} {d} is not a constant"))
}

fn route_spec(r: &crate::ir::Routing, ins: &[Ty], outs: &[Ty]) -> Result<KernelSpec, String> {
    let logits = &ins[0];
    let elem = float_elem(logits, "logits")?;
    if let Some(b) = ins.get(1).filter(|_| r.selection_bias) {
        if b.dtype != logits.dtype {
            return Err(format!("bias dtype {} differs from the logits' {}", b.dtype.name(), logits.dtype.name()));
        }
    }
    if outs.len() != 2 || outs[1].dtype != logits.dtype {
        return Err("weights of another dtype than the logits".into());
    }
    let experts = const_dim(*logits.shape.0.last().ok_or("logits of rank 0")?, "the expert count")?;
    if experts > MAX_ROUTE_EXPERTS {
        return Err(format!("{experts} experts (the router keeps at most {MAX_ROUTE_EXPERTS} in shared memory)"));
    }
    let groups = r.groups.max(1);
    if r.top_k == 0 || experts % groups != 0 || r.groups_kept == 0 || r.groups_kept > groups || r.groups_kept * (experts / groups) < r.top_k
    {
        return Err(format!("top_k {} from {} of {groups} groups of {experts} experts", r.top_k, r.groups_kept));
    }
    if groups > 1 && r.group_score.is_none() {
        return Err("groups > 1 without a group score".into());
    }
    let cfg = RouteConfig {
        experts,
        top_k: r.top_k,
        sigmoid: r.scoring == Scoring::Sigmoid,
        bias: r.selection_bias,
        groups,
        groups_kept: if groups > 1 { r.groups_kept } else { 1 },
        top2_sum: groups > 1 && r.group_score == Some(GroupScore::Top2Sum),
        normalize: r.normalize,
        scale_bits: (r.scale.get() as f32).to_bits(),
    };
    Ok(KernelSpec::MoeRoute { elem, cfg })
}

fn top_k_spec(k: u32, axis: u8, ins: &[Ty], outs: &[Ty]) -> Result<KernelSpec, String> {
    let x = &ins[0];
    let elem = float_elem(x, "input")?;
    if axis as usize + 1 != x.rank() {
        return Err("top_k over an axis other than the last".into());
    }
    if k == 0 {
        return Err("k = 0".into());
    }
    if outs.len() != 2 || outs[0].dtype != x.dtype {
        return Err("values of another dtype than the input".into());
    }
    Ok(KernelSpec::TopK { elem })
}

/// Rows of a `[T.., n]` shape: the product of all but the last dim.
fn rows(t: &Ty) -> Size {
    Size::product(&t.shape.0[..t.rank().saturating_sub(1)])
}

/// `moe_route`: one cube per token.
pub(crate) fn work_route(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let logits = g.ty(g.inputs(n)[0]).clone();
    let args = vec![Arg::Inputs, Arg::Buf(Buf::Output(0)), Arg::Buf(Buf::Output(1))];
    // The scores' sigmoid or softmax; the selection is comparisons.
    let flops = Size::numel(&logits.shape).mul(Size::lit(4));
    single(Launch::new(spec, args, grid_rows(rows(&logits), Size::lit(1)), flops))
}

/// `top_k` over the last axis: one cube per row.
pub(crate) fn work_top_k(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let x = g.ty(g.inputs(n)[0]).clone();
    let Op::TopK { k, .. } = g.node(n).op else { unreachable!("work_top_k of {}", g.node(n).op.name()) };
    let cols = Size::Dim(*x.shape.0.last().expect("top_k of rank 0 has no spec"));
    let args =
        vec![Arg::Buf(Buf::Input(0)), Arg::Buf(Buf::Output(0)), Arg::Buf(Buf::Output(1)), Arg::U32(cols), Arg::U32(Size::lit(k as i64))];
    single(Launch::new(spec, args, grid_rows(rows(&x), Size::lit(1)), Size::lit(0)))
}

/// The dispatch of `pairs` (token, slot) pairs over `experts` (the node's input 1 holds
/// the indices): its launch, and scratch buffers 0 `rows` i32[P], 1 `row_expert` i32[P],
/// 2 `pos` i32[P], 3 `offsets` i32[E+1], which the forward and the backward both read.
pub(crate) fn dispatch(pairs: &Size, experts: i64) -> (Vec<Scratch>, Launch) {
    let ints = |len: Size| Scratch { dtype: DType::I32, len };
    let scratch = vec![ints(pairs.clone()), ints(pairs.clone()), ints(pairs.clone()), ints(Size::lit(experts + 1))];
    let s = |j| Arg::Buf(Buf::Scratch(j));
    let args = vec![Arg::Buf(Buf::Input(1)), s(0), s(1), s(2), s(3), Arg::U32(pairs.clone())];
    (scratch, Launch::new(KernelSpec::MoeDispatch, args, grid_x(Size::lit(experts)), Size::lit(0)))
}

/// `expert_ffn`: dispatch, gate/up GEMM, down GEMM, combine over `P = T·k` sorted rows.
/// Scratch: 0 `rows` i32[P], 1 `row_expert` i32[P], 2 `pos` i32[P], 3 `offsets` i32[E+1],
/// 4 `act` [P, i], 5 `y` [P, h].
pub(crate) fn work_expert_ffn(g: &Graph, n: NodeId) -> Result<NodeWork, Unsupported> {
    let no = |reason: String| Unsupported { op: "expert_ffn", reason };
    let ins: Vec<Ty> = g.inputs(n).iter().map(|&v| g.ty(v).clone()).collect();
    let [x, idx, w, gate, up, down] = &ins[..] else {
        return Err(no(format!("{} inputs", ins.len())));
    };
    let elem = float_elem(x, "x").map_err(no)?;
    let welem = float_elem(w, "weights").map_err(no)?;
    if let Some(t) = [gate, up, down].into_iter().find(|t| t.dtype != x.dtype) {
        return Err(no(format!("expert weights of dtype {} for x of {}", t.dtype.name(), x.dtype.name())));
    }
    if !matches!(idx.dtype, DType::I32 | DType::I64) {
        return Err(no(format!("indices of dtype {}", idx.dtype.name())));
    }
    if gate.rank() != 3 || down.rank() != 3 || x.rank() == 0 || idx.rank() == 0 {
        return Err(no("expert weights must be [E, i, h] and [E, h, i]".into()));
    }
    let cst = |d: Dim, what: &str| const_dim(d, what).map_err(no);
    let h = cst(*x.shape.0.last().expect("rank checked"), "hidden size")? as i64;
    let k = cst(*idx.shape.0.last().expect("rank checked"), "top_k")? as i64;
    let experts = cst(gate.shape.0[0], "the expert count")? as i64;
    let inter = cst(gate.shape.0[1], "the expert intermediate size")? as i64;
    let tokens = rows(x);
    let pairs = tokens.clone().mul(Size::lit(k));
    let fdt = elem_dtype(elem);
    let t = TILE as i64;
    let (mut scratch, dispatch) = dispatch(&pairs, experts);
    scratch.extend([
        Scratch { dtype: fdt, len: pairs.clone().mul(Size::lit(inter)) },
        Scratch { dtype: fdt, len: pairs.clone().mul(Size::lit(h)) },
    ]);
    let (i, s, o) = (|j| Arg::Buf(Buf::Input(j)), |j| Arg::Buf(Buf::Scratch(j)), Arg::Buf(Buf::Output(0)));
    let u = |v: i64| Arg::U32(Size::lit(v));
    let one = Size::lit(1);
    // The grouped GEMMs read the experts the batch reaches, each once (a row tile that
    // straddles two experts reads a tile of each), and run one segment per row tile.
    let reached = || Touch::Experts { experts, top_k: k, tokens: tokens.clone() };
    let gate_up_grid = [Size::lit(inter).ceil_div(t), pairs.clone().ceil_div(t), one.clone()];
    let down_grid = [Size::lit(h).ceil_div(t), pairs.clone().ceil_div(t), one.clone()];
    let launches = vec![
        dispatch,
        Launch::new(
            KernelSpec::MoeGateUp { elem },
            vec![i(0), s(0), s(1), s(3), i(3), i(4), s(4), Arg::U32(pairs.clone()), u(k), u(h), u(inter)],
            gate_up_grid.clone(),
            tiled_flops(&gate_up_grid, t, Size::lit(2 * h)),
        )
        .touching(Buf::Input(3), reached())
        .touching(Buf::Input(4), reached()),
        Launch::new(
            KernelSpec::MoeDown { elem },
            vec![s(4), s(1), s(3), i(5), s(5), Arg::U32(pairs.clone()), u(h), u(inter)],
            down_grid.clone(),
            tiled_flops(&down_grid, t, Size::lit(inter)),
        )
        .touching(Buf::Input(5), reached()),
        Launch::new(
            KernelSpec::MoeCombine { elem, weights: welem },
            vec![s(5), s(2), i(2), o, u(h), u(k)],
            grid_rows(tokens.clone(), Size::lit(h).ceil_div(SELECT_BLOCK as i64)),
            pairs.mul(Size::lit(2 * h)),
        ),
    ];
    Ok(NodeWork::Launches { scratch, launches })
}
