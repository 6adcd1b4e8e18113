//! Attention and batched matmul kernels, and their launches.
//!
//! ## [`attention`]: flash attention with an online softmax
//!
//! One cube per (query block, kv head, batch) — grid `[⌈sq·group / rows⌉, kv_heads, b]`,
//! [`ATTN_BLOCK`] units in one dimension. The cube's `rows` query rows are taken from the
//! `sq × group` (query position, head of the group) pairs that read the same kv head,
//! position-major, so under grouped-query and absorbed-MLA attention (kv_heads = 1, up to
//! 128 query heads) every K/V tile the cube stages serves all the heads of the group, and
//! in decode (sq = 1) one cube holds the whole group. Per tile of `keys` keys:
//!
//! 1. scores `S[rows, keys] = Q·Kᵀ`: q and k are staged in chunks of [`DK_CHUNK`]
//!    columns (dk may be 576: the whole tile would not fit in shared memory), each unit
//!    accumulating a fixed set of (row, key) dot products in registers;
//! 2. `S·scale + mask`, then per row (one unit each) the running max `m`, the rescale
//!    factor `exp(m_old - m_new)`, the probabilities `exp(S - m_new)` and the running sum
//!    `l`; meanwhile the other units stage the V tile over the then-free q/k area;
//! 3. `O = O·corr + P·V`, each unit owning a fixed set of (row, column) accumulators.
//!
//! At the end `O / l` is written; the `sq × sk` score matrix never leaves the cube. The
//! q chunk is re-staged for every key tile rather than kept: all of q would take
//! `rows · dk` floats (36 KiB at dk = 576), more than lavapipe's 32 KiB. Decode with one
//! query per kv head (MHA) runs one cube per (batch, head) stepping over all keys; a
//! split over the keys (flash-decoding) would add parallelism there.
//!
//! All arithmetic is in f32 whatever the buffers hold (f16 inputs included), as flash
//! attention does: a 576-long f16 dot product or an f16 running sum would lose the
//! digits the reference keeps.
//!
//! Semantics follow the reference (`dsc_runtime::reference::nn::attention`): causal masks
//! are aligned bottom-right (query `i` sees keys `< sk - sq + i + 1`), keys a query may
//! not see are skipped rather than given `-inf` (WGSL has no infinity literal), and a
//! query whose visible scores are all `-inf` (or that sees no key) gets zeros, like
//! torch's `_safe_softmax`. `scale` is a comptime `f32` (its bits, for `Hash`).
//!
//! ## [`batch_matmul`]
//!
//! `a[B, m, k] · b[B, k, n]` (b not transposed, unlike the IR's `matmul`): [`TILE`]² units
//! per cube, one cube per output tile, the flattened batch on grid z.
//!
//! Both kernels use one shared buffer (CUBECL.md §2: two are laid out in a run-dependent
//! order) and only comptime-unrolled loops or plain ranges over shared indices.

use super::TILE;
use crate::codegen::kernels::movement::View;
use crate::codegen::launch::{elem_dtype, grid_linear, tiled_flops, Arg, Buf, Launch, NodeWork, Scratch, Size, Touch, When, MAX_GRID_AXIS};
pub use crate::codegen::spec::{AttentionConfig, ATTN_BLOCK, ATTN_MAX_KEYS, ATTN_MAX_ROWS, DK_CHUNK, SPLIT_KEYS, SPLIT_MAX_BATCH};
use crate::codegen::{Elem, KernelSpec};
use crate::ir::{DType, Dim, Op, Shape, Ty};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// The configuration of an attention node (`op` with input types q, k, v[, mask]), or why
/// it has none: the head sizes must be constants (they are model constants in every
/// lowering), as the kernel unrolls over them.
pub(crate) fn config(op: &Op, inputs: &[Ty]) -> Result<AttentionConfig, String> {
    let Op::Attention { heads, kv_heads, scale, causal, masked, lse } = *op else {
        return Err(format!("{} is not attention", op.name()));
    };
    if inputs.len() < 3 || inputs[..3].iter().any(|t| t.rank() != 4) {
        return Err("q, k, v of rank other than 4".into());
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!("{heads} heads over {kv_heads} kv heads"));
    }
    let constant = |d: Dim, what: &str| {
        d.as_const().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| format!("{what} {d} is not a constant (the kernel unrolls over it)"))
    };
    let dk = constant(inputs[0].shape.0[3], "key head size")?;
    let dv = constant(inputs[2].shape.0[3], "value head size")?;
    let sq = inputs[0].shape.0[1].as_const().and_then(|v| u32::try_from(v).ok());
    AttentionConfig::new(dk, dv, heads / kv_heads, sq, scale.get() as f32, causal, masked).map(|c| AttentionConfig { lse, ..c })
}

/// Flash attention; see the module header for the launch shape. `q [b, sq, heads, dk]`,
/// `k [b, sk, kv_heads, dk]` (its first `cfg.split` columns from `k`, the rest from `k2`),
/// `v [b, sk, kv_heads, dv]`, each read through a strided view: `kv` holds, for `k`, `k2`
/// and `v` in turn, the offset and the strides of the batch, key and head axes (the last
/// axis is contiguous), so a position-major cache is read where it lies. `mask [b, sq,
/// sk]` (only read when `cfg.masked`; otherwise any buffer), `out [b, sq, heads, dv]`;
/// with `cfg.lse`,
/// `lse [b, sq, heads]` gets each row's `max + ln Σ exp(s − max)`, or `consts[0]` (−∞:
/// WGSL has no literal for it) for a row that saw no key.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn attention<F: Float>(
    q: &[F],
    k: &[F],
    k2: &[F],
    v: &[F],
    mask: &[F],
    out: &mut [F],
    lse: &mut [f32],
    part: &mut [f32],
    consts: &[f32],
    kv: &[u32],
    sq: u32,
    sk: u32,
    kv_heads: u32,
    splits: u32,
    #[comptime] cfg: AttentionConfig,
) {
    let tid = UNIT_POS_X;
    let kvh = CUBE_POS_Y;
    // The batch row, and with split-K the chunk of keys [lo, hi) this cube covers.
    let mut bi = CUBE_POS_Z;
    let mut lo = 0u32;
    let mut hi = sk;
    if comptime![cfg.key_split] {
        bi = CUBE_POS_Z / splits;
        lo = (CUBE_POS_Z % splits) * SPLIT_KEYS;
        hi = select(lo + SPLIT_KEYS < sk, lo + SPLIT_KEYS, sk);
    }
    let group = comptime![cfg.group];
    let rows = comptime![cfg.rows];
    let keys = comptime![cfg.keys];
    let dk = comptime![cfg.dk];
    let dv = comptime![cfg.dv];
    let heads = kv_heads * group;
    let rows_total = sq * group;
    let row0 = CUBE_POS_X * rows;
    let k_at = comptime![cfg.rows * DK_CHUNK];
    let s_at = comptime![cfg.scores_at()];
    let m_at = comptime![cfg.stats_at()];
    let l_at = comptime![cfg.stats_at() + cfg.rows];
    let seen_at = comptime![cfg.stats_at() + 2 * cfg.rows];
    let c_at = comptime![cfg.stats_at() + 3 * cfg.rows];
    let scale = comptime![f32::from_bits(cfg.scale_bits)];
    let split = comptime![cfg.split];
    // Where this cube's batch row and kv head start in k, k2 and v, and their key strides.
    let ka = kv[0] + bi * kv[1] + kvh * kv[3];
    let ka_key = kv[2];
    let kb = kv[4] + bi * kv[5] + kvh * kv[7];
    let kb_key = kv[6];
    let va = kv[8] + bi * kv[9] + kvh * kv[11];
    let va_key = kv[10];
    let mut smem = Shared::<[f32]>::new_slice(comptime![cfg.shared_len() as usize]);

    if tid < rows {
        smem[(m_at + tid) as usize] = 0.0;
        smem[(l_at + tid) as usize] = 0.0;
        smem[(seen_at + tid) as usize] = 0.0;
        smem[(c_at + tid) as usize] = 1.0;
    }
    // Keys any row of the cube sees: with a causal mask, the last row's (the grid has no
    // cube past the rows, so row0 < rows_total).
    let last_row = select(row0 + rows < rows_total, row0 + rows, rows_total) - 1;
    let mut key_end = hi;
    if comptime![cfg.causal] {
        let lim = sk + last_row / group + 1;
        key_end = select(lim > sq, lim - sq, 0);
        key_end = select(key_end < hi, key_end, hi);
    }
    let tiles = select(key_end > lo, key_end - lo, 0).div_ceil(keys);

    let mut acc = Array::<f32>::new(comptime![cfg.outs_per_unit() as usize]);
    #[unroll]
    for u in 0..comptime![cfg.outs_per_unit()] {
        acc[u as usize] = 0.0;
    }

    for t in 0..tiles {
        let j0 = lo + t * keys;
        // 1. Scores of this tile, dk in chunks.
        let mut sc = Array::<f32>::new(comptime![cfg.scores_per_unit() as usize]);
        #[unroll]
        for s in 0..comptime![cfg.scores_per_unit()] {
            sc[s as usize] = 0.0;
        }
        for ch in 0..comptime![cfg.chunks()] {
            let d0 = ch * DK_CHUNK;
            #[unroll]
            for s in 0..comptime![(cfg.rows * DK_CHUNK).div_ceil(ATTN_BLOCK)] {
                let e = tid + s * ATTN_BLOCK;
                if e < rows * DK_CHUNK {
                    let row = row0 + e / DK_CHUNK;
                    let d = d0 + e % DK_CHUNK;
                    let mut x = 0.0f32;
                    if row < rows_total && d < dk {
                        let h = kvh * group + row % group;
                        x = f32::cast_from(q[(((bi * sq + row / group) * heads + h) * dk + d) as usize]);
                    }
                    smem[e as usize] = x;
                }
            }
            #[unroll]
            for s in 0..comptime![(cfg.keys * DK_CHUNK).div_ceil(ATTN_BLOCK)] {
                let e = tid + s * ATTN_BLOCK;
                if e < keys * DK_CHUNK {
                    let key = j0 + e / DK_CHUNK;
                    let d = d0 + e % DK_CHUNK;
                    let mut x = 0.0f32;
                    if key < hi && d < dk {
                        if comptime![cfg.split < cfg.dk] {
                            if d < split {
                                x = f32::cast_from(k[(ka + key * ka_key + d) as usize]);
                            } else {
                                x = f32::cast_from(k2[(kb + key * kb_key + d - split) as usize]);
                            }
                        } else {
                            x = f32::cast_from(k[(ka + key * ka_key + d) as usize]);
                        }
                    }
                    smem[(k_at + e) as usize] = x;
                }
            }
            sync_cube();
            #[unroll]
            for s in 0..comptime![cfg.scores_per_unit()] {
                let p = tid + s * ATTN_BLOCK;
                if p < rows * keys {
                    let qa = (p / keys) * DK_CHUNK;
                    let ka = k_at + (p % keys) * DK_CHUNK;
                    let mut dot = 0.0f32;
                    for d in 0..DK_CHUNK {
                        dot += smem[(qa + d) as usize] * smem[(ka + d) as usize];
                    }
                    sc[s as usize] += dot;
                }
            }
            sync_cube();
        }
        #[unroll]
        for s in 0..comptime![cfg.scores_per_unit()] {
            let p = tid + s * ATTN_BLOCK;
            if p < rows * keys {
                let mut x = sc[s as usize] * scale;
                if comptime![cfg.masked] {
                    let row = row0 + p / keys;
                    let key = j0 + p % keys;
                    if row < rows_total && key < sk {
                        x += f32::cast_from(mask[((bi * sq + row / group) * sk + key) as usize]);
                    }
                }
                smem[(s_at + p) as usize] = x;
            }
        }
        sync_cube();

        // 2. The V tile over the q/k area (free now), and the online softmax per row.
        #[unroll]
        for s in 0..comptime![(cfg.keys * cfg.dv).div_ceil(ATTN_BLOCK)] {
            let e = tid + s * ATTN_BLOCK;
            if e < keys * dv {
                let key = j0 + e / dv;
                let mut x = 0.0f32;
                // Keys past hi must be 0, not garbage: their probability is 0 and 0·NaN is NaN.
                if key < hi {
                    x = f32::cast_from(v[(va + key * va_key + e % dv) as usize]);
                }
                smem[e as usize] = x;
            }
        }
        if tid < rows {
            let row = row0 + tid;
            // The keys this row sees form a prefix of the tile: [j0, j0 + visible).
            let mut visible = 0u32;
            if row < rows_total {
                let mut lim = hi;
                if comptime![cfg.causal] {
                    let l2 = sk + row / group + 1;
                    lim = select(l2 > sq, l2 - sq, 0);
                    lim = select(lim < hi, lim, hi);
                }
                if lim > j0 {
                    visible = select(lim - j0 < keys, lim - j0, keys);
                }
            }
            let base = s_at + tid * keys;
            let mut corr = 1.0f32;
            if visible > 0 {
                let mut tm = smem[base as usize];
                for j in 1..visible {
                    let x = smem[(base + j) as usize];
                    tm = select(x > tm, x, tm);
                }
                let seen = smem[(seen_at + tid) as usize] > 0.0;
                let m_old = smem[(m_at + tid) as usize];
                let mut m_new = tm;
                if seen {
                    m_new = select(m_old > tm, m_old, tm);
                }
                let mut sum = 0.0f32;
                if m_new.is_inf() {
                    // Every score this row has seen is -inf: nothing to weigh yet (the
                    // output and sum stay 0), and exp(-inf - -inf) would be NaN.
                    for j in 0..keys {
                        smem[(base + j) as usize] = 0.0;
                    }
                } else {
                    // m_old may be -inf (seen, all masked): exp(-inf) = 0 drops nothing.
                    corr = select(seen, f32::exp(m_old - m_new), 0.0);
                    for j in 0..keys {
                        let mut p = 0.0f32;
                        if j < visible {
                            p = f32::exp(smem[(base + j) as usize] - m_new);
                        }
                        smem[(base + j) as usize] = p;
                        sum += p;
                    }
                }
                smem[(m_at + tid) as usize] = m_new;
                smem[(seen_at + tid) as usize] = 1.0;
                smem[(l_at + tid) as usize] = smem[(l_at + tid) as usize] * corr + sum;
            } else {
                for j in 0..keys {
                    smem[(base + j) as usize] = 0.0;
                }
            }
            smem[(c_at + tid) as usize] = corr;
        }
        sync_cube();

        // 3. O = O·corr + P·V.
        #[unroll]
        for u in 0..comptime![cfg.outs_per_unit()] {
            let e = tid + u * ATTN_BLOCK;
            if e < rows * dv {
                let r = e / dv;
                let c = e % dv;
                let pa = s_at + r * keys;
                let mut o = acc[u as usize] * smem[(c_at + r) as usize];
                for j in 0..keys {
                    o += smem[(pa + j) as usize] * smem[(j * dv + c) as usize];
                }
                acc[u as usize] = o;
            }
        }
        // The next tile overwrites the q/k/V area and the scores.
        sync_cube();
    }

    #[unroll]
    for u in 0..comptime![cfg.outs_per_unit()] {
        let e = tid + u * ATTN_BLOCK;
        let row = row0 + e / dv;
        if e < rows * dv && row < rows_total {
            let l = smem[(l_at + e / dv) as usize];
            let o = select(l > 0.0, acc[u as usize] / l, 0.0);
            let h = kvh * group + row % group;
            if comptime![cfg.key_split] {
                part[(((CUBE_POS_Z * sq + row / group) * heads + h) * dv + e % dv) as usize] = o;
            } else {
                out[(((bi * sq + row / group) * heads + h) * dv + e % dv) as usize] = F::cast_from(o);
            }
        }
    }
    // Each row's log-sum-exp (−∞ where it saw no key): the train forward's `lse`, or with
    // split-K each chunk's, in `part` after all the partial outputs.
    if comptime![cfg.lse || cfg.key_split] {
        let row = row0 + tid;
        if tid < rows && row < rows_total {
            let l = smem[(l_at + tid) as usize];
            let mut x = consts[0];
            if l > 0.0 {
                x = smem[(m_at + tid) as usize] + f32::ln(l);
            }
            let at = (row / group) * heads + kvh * group + row % group;
            if comptime![cfg.key_split] {
                part[(CUBE_COUNT_Z * sq * heads * dv + CUBE_POS_Z * sq * heads + at) as usize] = x;
            } else {
                lse[(bi * sq * heads + at) as usize] = x;
            }
        }
    }
}

/// Merges split-K attention's chunks (`part` as [`attention`] writes it: `[b·splits, inner,
/// dv]` normalised outputs, then `[b·splits, inner]` log-sum-exps, `inner = sq·heads`):
/// `out = Σ_s e^(lse_s − m)·o_s / Σ_s e^(lse_s − m)`, `m` the largest `lse_s`; zeros for a
/// row no chunk saw a key of. One unit per output element.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn attention_combine<F: Float>(part: &[f32], out: &mut [F], consts: &[f32], splits: u32, inner: u32, dv: u32) {
    let pos = ABSOLUTE_POS as u32;
    if pos as usize >= out.len() {
        terminate!();
    }
    let r = pos / dv;
    let c = pos % dv;
    let bi = r / inner;
    let rest = r % inner;
    let lse_at = (out.len() as u32 / dv) * splits * dv;
    let mut m = consts[0];
    for s in 0..splits {
        let x = part[(lse_at + (bi * splits + s) * inner + rest) as usize];
        m = select(x > m, x, m);
    }
    let mut num = 0.0f32;
    let mut den = 0.0f32;
    if m != consts[0] {
        for s in 0..splits {
            let z = (bi * splits + s) * inner + rest;
            let w = f32::exp(part[(lse_at + z) as usize] - m);
            num += w * part[(z * dv + c) as usize];
            den += w;
        }
    }
    out[pos as usize] = F::cast_from(select(den > 0.0, num / den, 0.0));
}

/// `out[z, m, n] = Σ_k a[z, m, k] · b[z, k, n]`, z the flattened batch (grid z). Tiles
/// of a and b are staged in shared memory (as f32: f16 inputs accumulate in f32); loads
/// outside the matrices read 0, so any m, n, k works.
///
/// Both operands are read through strided views (`layout`): the `rank` batch axes of the
/// output, then for a its offset, one stride per batch axis and its row and column
/// strides, then the same for b. A weight broadcast over the batch is read with batch
/// stride 0 and a sliced or permuted one in place (`movement::fold_view`), so none of
/// them is copied first; a contiguous operand has the row-major strides.
///
/// With `accumulate` the product is added to what `out` holds (`out += a·b`, one unit per
/// element: a backward that sums two products, such as SwiGLU's `dx`).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn batch_matmul<F: Float>(
    a: &[F],
    b: &[F],
    out: &mut [F],
    layout: &[u32],
    m: u32,
    n: u32,
    k: u32,
    #[comptime] rank: u32,
    #[comptime] accumulate: bool,
) {
    let tx = UNIT_POS_X; // along n
    let ty = UNIT_POS_Y; // along m
                         // The batch folds into y · z past the 65,535 cubes an axis allows (grid y holds the
                         // m tiles of every fold): cubes past the last batch element do nothing, a whole cube
                         // at a time.
    let m_tiles = m.div_ceil(TILE);
    let z = (CUBE_POS_Y / m_tiles) * CUBE_COUNT_Z + CUBE_POS_Z;
    let mut total = 1u32;
    #[unroll]
    for r in 0..rank {
        total *= layout[r as usize];
    }
    if z >= total {
        terminate!();
    }
    let row = (CUBE_POS_Y % m_tiles) * TILE + ty;
    let col = CUBE_POS_X * TILE + tx;
    let (ao, bo) = (comptime![rank as usize], comptime![(2 * rank + 3) as usize]);
    let mut a0 = layout[ao];
    let mut b0 = layout[bo];
    let mut rem = z;
    #[unroll]
    for r in 0..rank {
        let ax = comptime![rank - 1 - r];
        let dim = layout[comptime![ax as usize]];
        let c = rem % dim;
        rem /= dim;
        a0 += c * layout[comptime![(rank + 1 + ax) as usize]];
        b0 += c * layout[comptime![(2 * rank + 4 + ax) as usize]];
    }
    let (a_row, a_col) = (layout[comptime![(2 * rank + 1) as usize]], layout[comptime![(2 * rank + 2) as usize]]);
    let (b_row, b_col) = (layout[comptime![(3 * rank + 4) as usize]], layout[comptime![(3 * rank + 5) as usize]]);
    // a's tile [ty][kk] at 0, b's tile [kk][tx] at TILE² (one buffer, CUBECL.md §2).
    let mut tiles_mem = Shared::<[f32]>::new_slice((2 * TILE * TILE) as usize);
    let bo = TILE * TILE;
    let mut acc = 0.0f32;
    for t in 0..k.div_ceil(TILE) {
        let ka = t * TILE + tx;
        let mut av = 0.0f32;
        if row < m && ka < k {
            av = f32::cast_from(a[(a0 + row * a_row + ka * a_col) as usize]);
        }
        tiles_mem[(ty * TILE + tx) as usize] = av;
        // b is [k, n] row-major: neighbouring units read neighbouring columns.
        let kb = t * TILE + ty;
        let mut bv = 0.0f32;
        if kb < k && col < n {
            bv = f32::cast_from(b[(b0 + kb * b_row + col * b_col) as usize]);
        }
        tiles_mem[(bo + ty * TILE + tx) as usize] = bv;
        sync_cube();
        #[unroll]
        for kk in 0..TILE {
            acc += tiles_mem[(ty * TILE + kk) as usize] * tiles_mem[(bo + kk * TILE + tx) as usize];
        }
        sync_cube();
    }
    if row < m && col < n {
        let at = (z * m * n + row * n + col) as usize;
        if comptime![accumulate] {
            acc += f32::cast_from(out[at]);
        }
        out[at] = F::cast_from(acc);
    }
}

/// Where attention reads one of its key or value operands: the input slot, the element
/// offset and the strides of the batch, key and head axes (the last axis is contiguous).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KvRead {
    pub slot: u16,
    pub offset: Size,
    pub strides: [Size; 3],
}

impl KvRead {
    /// A contiguous `[b, sk, heads, d]` operand in `slot`.
    pub(crate) fn contiguous(slot: u16, shape: &Shape) -> KvRead {
        let d = &shape.0;
        KvRead { slot, offset: Size::lit(0), strides: [Size::product(&d[1..]), Size::product(&d[2..]), Size::Dim(d[3])] }
    }

    /// Operand `slot` read through `view` (of a `[b, sk, heads, d]` value), or `None` when
    /// its last axis is not contiguous.
    pub(crate) fn through(slot: u16, view: &View) -> Option<KvRead> {
        let st = &view.strides;
        (st.len() == 4 && st[3].as_const() == Some(1)).then(|| KvRead {
            slot,
            offset: view.offset.clone(),
            strides: [st[0].clone(), st[1].clone(), st[2].clone()],
        })
    }
}

/// How an attention node reads its keys and values: `k2` holds the key columns past
/// `cfg.split`, when the key is two buffers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KvReads {
    pub k: KvRead,
    pub k2: Option<KvRead>,
    pub v: KvRead,
}

/// The launch of an attention node: `ins` are q, k, v and the optional mask (their
/// shapes as the node sees them); `kv` says where the keys and values are read. An
/// unmasked node binds a one-element scratch buffer in the mask's place (never read:
/// `masked` is comptime), and a one-buffer key one in `k2`'s, so the kernel has one
/// signature.
pub(crate) fn work_attention(spec: KernelSpec, ins: &[Shape], kv: &KvReads) -> NodeWork {
    let KernelSpec::Attention { elem, cfg } = spec else { unreachable!("work_attention of {spec:?}") };
    let (q, k) = (&ins[0].0, &ins[1].0);
    let (b, sq, sk, kv_heads) = (q[0], q[1], k[1], k[2]);
    let buf = |b| Arg::Buf(b);
    // Unused buffers bind one-element scratch: the mask of an unmasked node, the lse of a
    // node that does not return it, k2 of a one-buffer key, the partial results of a
    // launch that does not split.
    let mut scratch = Vec::new();
    let mut dummy = |dtype: DType, len: Size| {
        scratch.push(Scratch { dtype, len });
        buf(Buf::Scratch(scratch.len() as u16 - 1))
    };
    let mask = if cfg.masked { buf(Buf::Input(3)) } else { dummy(elem_dtype(elem), Size::lit(1)) };
    let lse = if cfg.lse { buf(Buf::Output(1)) } else { dummy(DType::F32, Size::lit(1)) };
    let k2 = match &kv.k2 {
        Some(r) => buf(Buf::Input(r.slot)),
        None => dummy(elem_dtype(elem), Size::lit(1)),
    };
    let no_part = dummy(DType::F32, Size::lit(1));
    // Split-K for a decode step (a constant query length, no lse) over a run-time key count.
    let splits = Size::Dim(sk).ceil_div(SPLIT_KEYS as i64);
    let inner = Size::Dim(sq).mul(Size::Dim(kv_heads)).mul(Size::lit(cfg.group as i64));
    let splittable = !cfg.lse && sq.as_const().is_some() && sk.as_const().is_none();
    let part = splittable.then(|| {
        let len = Size::Dim(b).mul(splits.clone()).mul(inner.clone()).mul(Size::lit(cfg.dv as i64 + 1));
        dummy(DType::F32, len)
    });
    let unused = scratch.len() as u16 - u16::from(part.is_some());
    let mut layout = Vec::with_capacity(12);
    for r in [&kv.k, kv.k2.as_ref().unwrap_or(&kv.k), &kv.v] {
        layout.push(r.offset.clone());
        layout.extend(r.strides.iter().cloned());
    }
    let args = |part: Arg, splits: Size| {
        vec![
            buf(Buf::Input(0)),
            buf(Buf::Input(kv.k.slot)),
            k2.clone(),
            buf(Buf::Input(kv.v.slot)),
            mask.clone(),
            buf(Buf::Output(0)),
            lse.clone(),
            part,
            Arg::F32Table(vec![f32::NEG_INFINITY.to_bits()]),
            Arg::Table(layout.clone()),
            Arg::U32(Size::Dim(sq)),
            Arg::U32(Size::Dim(sk)),
            Arg::U32(Size::Dim(kv_heads)),
            Arg::U32(splits),
        ]
    };
    let rows = Size::Dim(sq).mul(Size::lit(cfg.group as i64)).ceil_div(cfg.rows as i64);
    // Per (query, visible key): the score's dk multiply-adds, about five for the online
    // softmax, dv multiply-adds into the output. A causal query `i` sees `sk - sq + i + 1`
    // keys; the sum over `i` is `sq·(sk - sq) + sq·(sq + 1)/2`.
    let pairs = if cfg.causal {
        Size::Dim(sq).mul(Size::Dim(sk - sq)).plus(Size::Dim(sq).mul(Size::Dim(sq + 1)).ceil_div(2))
    } else {
        Size::Dim(sq).mul(Size::Dim(sk))
    };
    let per_pair = 2 * (cfg.dk + cfg.dv) as i64 + 5;
    let flops = pairs.mul(Size::product(&[b, kv_heads])).mul(Size::lit(per_pair * cfg.group as i64));
    // Each operand's buffer may be larger than what is read (k's view of a cache whose
    // rows hold more columns); the kernel reads its `[b, sk, kv_heads, ·]` elements.
    let per_key = Size::product(&[b, sk, kv_heads]);
    let touch = |mut l: Launch| {
        for i in 0..unused {
            l = l.touching(Buf::Scratch(i), Touch::Elems(Size::lit(0)));
        }
        l = l.touching(Buf::Input(kv.k.slot), Touch::Elems(per_key.clone().mul(Size::lit(cfg.split as i64))));
        if let Some(r) = &kv.k2 {
            l = l.touching(Buf::Input(r.slot), Touch::Elems(per_key.clone().mul(Size::lit((cfg.dk - cfg.split) as i64))));
        }
        if kv.v.slot != kv.k.slot {
            l = l.touching(Buf::Input(kv.v.slot), Touch::Elems(per_key.clone().mul(Size::lit(cfg.dv as i64))));
        }
        l
    };
    let plain = touch(Launch::new(spec, args(no_part, Size::lit(1)), [rows.clone(), Size::Dim(kv_heads), Size::Dim(b)], flops.clone()));
    let Some(part) = part else {
        return NodeWork::Launches { scratch, launches: vec![plain] };
    };
    let when = When::All(vec![When::AtMost(Size::Dim(b), SPLIT_MAX_BATCH), When::Above(Size::Dim(sk), 2 * SPLIT_KEYS as i64)]);
    let split_spec = KernelSpec::Attention { elem, cfg: AttentionConfig { key_split: true, ..cfg } };
    let grid = [rows, Size::Dim(kv_heads), Size::Dim(b).mul(splits.clone())];
    let split = touch(Launch::new(split_spec, args(part.clone(), splits.clone()), grid, flops));
    let out_len = Size::Dim(b).mul(inner.clone()).mul(Size::lit(cfg.dv as i64));
    let combine_args = vec![
        part,
        buf(Buf::Output(0)),
        Arg::F32Table(vec![f32::NEG_INFINITY.to_bits()]),
        Arg::U32(splits.clone()),
        Arg::U32(inner),
        Arg::U32(Size::lit(cfg.dv as i64)),
    ];
    let combine = Launch::new(
        KernelSpec::AttentionCombine { elem },
        combine_args,
        grid_linear(out_len.clone().ceil_div(super::EW_BLOCK as i64)),
        out_len.mul(splits).mul(Size::lit(4)),
    );
    NodeWork::Launches {
        scratch,
        launches: vec![
            Launch { when: Some(When::Not(Box::new(when.clone()))), ..plain },
            Launch { when: Some(when.clone()), ..split },
            Launch { when: Some(when), ..combine },
        ],
    }
}

/// The launch of a weight_grad node `dw[n, k] = Σ_t dy[t, n] · x[t, k]` (`ins`: dy
/// `[T.., n]`, x `[T.., k]`): [`batch_matmul`] with no batch axes over `dyᵀ`, read in
/// place (row stride 1, column stride n), and `x`; the tokens are the reduction axis,
/// summed in f32 in token order.
pub(crate) fn work_weight_grad(spec: KernelSpec, ins: &[Shape]) -> NodeWork {
    let (dy, x) = (&ins[0].0, &ins[1].0);
    let (n, k) = (Size::Dim(*dy.last().expect("rank checked")), Size::Dim(*x.last().expect("rank checked")));
    let tokens = Size::product(&dy[..dy.len() - 1]);
    let one = || Size::lit(1);
    let (a, b) = (Operand(Buf::Input(0), one(), n.clone()), Operand(Buf::Input(1), k.clone(), one()));
    NodeWork::Launches { scratch: vec![], launches: vec![matmul_2d(spec.elem(), a, b, Buf::Output(0), [n, k, tokens], false)] }
}

/// A matrix operand of [`matmul_2d`]: a buffer read with a row and a column stride.
pub(crate) struct Operand(pub Buf, pub Size, pub Size);

/// One [`batch_matmul`] launch without batch axes: `out[m, n] (+)= Σ_k a[m, k] · b[k, n]`
/// (`mnk` = `[m, n, k]`) over strided operands, so a transposed operand is read in place.
pub(crate) fn matmul_2d(elem: Elem, a: Operand, b: Operand, out: Buf, mnk: [Size; 3], accumulate: bool) -> Launch {
    let [m, n, k] = mnk;
    let t = TILE as i64;
    let zero = || Size::lit(0);
    let layout = vec![zero(), a.1, a.2, zero(), b.1, b.2];
    let args = vec![
        Arg::Buf(a.0),
        Arg::Buf(b.0),
        Arg::Buf(out),
        Arg::Table(layout),
        Arg::U32(m.clone()),
        Arg::U32(n.clone()),
        Arg::U32(k.clone()),
    ];
    let grid = [n.ceil_div(t), m.ceil_div(t), Size::lit(1)];
    let flops = tiled_flops(&grid, t, k);
    Launch::new(KernelSpec::BatchMatMul { elem, rank: 0, accumulate }, args, grid, flops)
}

/// The launch of a batch_matmul node `a [B.., m, k] · b [B.., k, n]`, each operand read
/// contiguously or through `views[i]` of the buffer the plan binds in its place.
pub(crate) fn work_batch_matmul(spec: KernelSpec, ins: &[Shape], views: [Option<&View>; 2]) -> NodeWork {
    let (a, bs) = (&ins[0].0, &ins[1].0);
    let r = a.len();
    let (m, k, n) = (a[r - 2], a[r - 1], bs[r - 1]);
    let batch: &[Dim] = &a[..r - 2];
    let t = TILE as i64;
    let mut layout: Vec<Size> = batch.iter().map(|d| Size::Dim(*d)).collect();
    for (shape, view) in [a, bs].into_iter().zip(views) {
        match view {
            Some(v) => {
                layout.push(v.offset.clone());
                layout.extend(v.strides.iter().cloned());
            }
            None => {
                layout.push(Size::lit(0));
                layout.extend((0..shape.len()).map(|i| Size::product(&shape[i + 1..])));
            }
        }
    }
    let args = vec![
        Arg::Buf(Buf::Input(0)),
        Arg::Buf(Buf::Input(1)),
        Arg::Buf(Buf::Output(0)),
        Arg::Table(layout),
        Arg::U32(Size::Dim(m)),
        Arg::U32(Size::Dim(n)),
        Arg::U32(Size::Dim(k)),
    ];
    // The batch on z, folded into y past the axis limit (the kernel unfolds it).
    let z = Size::product(batch);
    let folds = z.clone().ceil_div(MAX_GRID_AXIS);
    let grid = [Size::Dim(n).ceil_div(t), Size::Dim(m).ceil_div(t).mul(folds), z.min(MAX_GRID_AXIS)];
    let flops = tiled_flops(&grid, t, Size::Dim(k));
    let mut launch = Launch::new(spec, args, grid, flops);
    // A view reads the elements the operand holds, however large the buffer behind it
    // (a broadcast weight is read once, not once per batch element).
    for (i, (shape, view)) in [a, bs].into_iter().zip(views).enumerate() {
        if let Some(v) = view {
            let distinct =
                Size::product(&shape.iter().zip(&v.strides).filter(|(_, s)| s.as_const() != Some(0)).map(|(d, _)| *d).collect::<Vec<_>>());
            launch = launch.touching(Buf::Input(i as u16), Touch::Elems(distinct));
        }
    }
    NodeWork::Launches { scratch: vec![], launches: vec![launch] }
}
