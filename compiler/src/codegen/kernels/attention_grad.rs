//! The attention backward (`attention_grad`), flash-style: the probabilities are
//! recomputed from the forward's log-sum-exp, never stored. Three launches, each output
//! element owned by one unit (deterministic, no atomics):
//!
//! 1. [`attn_grad_delta`], one unit per query row `(b, i, h)`: `D = Σ_c dout·out` in f32.
//! 2. [`attn_grad_dq`], one cube of [`ATTN_BLOCK`] units per query row: `q_i` and
//!    `dout_i` are staged in shared memory; per tile of keys each unit takes one key `j`
//!    the row sees and computes `s = (q_i·k_j)·scale (+ mask)`, `p = exp(s − lse)`,
//!    `dp = dout_i·v_j`, `ds = p·(dp − D)` into shared memory; then each unit adds
//!    `Σ_j ds_j·k_j[d]` for its columns `d`. `dq = that · scale`.
//! 3. [`attn_grad_dkv`], one cube per key `(b, j, kv head)`: `k_j`, `v_j` staged; per tile
//!    of (query, head of the group) pairs that see `j`, each unit computes its pair's `p`
//!    and `ds` as above; then each unit adds `Σ p·dout_i[c]` (→ `dv`) and
//!    `Σ ds·q_i[d]` (→ `dk`, times scale) for its columns.
//!
//! A row whose log-sum-exp is −∞ saw no key and contributes nothing; keys past the causal
//! diagonal (bottom-right aligned, as the forward) have `p = 0`; the mask takes no
//! gradient (`dmask` is not an output). Scores use the forward's float order.

use super::attention::ATTN_BLOCK;
#[cfg(feature = "kernels")]
use super::row_pos;
use crate::codegen::launch::{grid_linear, grid_rows, Arg, Buf, Launch, NodeWork, Scratch, Size};
pub use crate::codegen::spec::{AttnGradConfig, AttnGradPart};
use crate::codegen::{Elem, KernelSpec, Unsupported};
use crate::ir::{DType, Dim, Graph, NodeId, Op};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// `delta[row] = Σ_c out[row, c] · dout[row, c]` over the `dv` columns of each query row.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn attn_grad_delta<F: Float>(out: &[F], dout: &[F], delta: &mut [f32], dv: u32) {
    let row = ABSOLUTE_POS;
    if row < delta.len() {
        let base = row as u32 * dv;
        let mut acc = 0.0f32;
        for c in 0..dv {
            acc += f32::cast_from(out[(base + c) as usize]) * f32::cast_from(dout[(base + c) as usize]);
        }
        delta[row] = acc;
    }
}

/// Keys a query at position `i` of `sq` sees among `sk` (bottom-right causal alignment).
#[cfg(feature = "kernels")]
#[cube]
fn visible_keys(i: u32, sq: u32, sk: u32, #[comptime] causal: bool) -> u32 {
    let mut lim = sk;
    if comptime![causal] {
        let l2 = sk + i + 1;
        lim = select(l2 > sq, l2 - sq, 0);
        lim = select(lim < sk, lim, sk);
    }
    lim
}

/// Stages row `row` of a `dk`-wide tensor (`q` or `k`) at shared 0 and of a `dv`-wide one
/// (`dout` or `v`) at `dk`, in `f32`, then waits for the whole cube.
#[cfg(feature = "kernels")]
#[cube]
fn stage_rows<F: Float>(a: &[F], b: &[F], row: u32, smem: &mut Shared<[f32]>, tid: u32, #[comptime] cfg: AttnGradConfig) {
    let dk = comptime![cfg.dk];
    let dv = comptime![cfg.dv];
    for it in 0..comptime![cfg.dk.div_ceil(ATTN_BLOCK)] {
        let d = it * ATTN_BLOCK + tid;
        if d < dk {
            smem[d as usize] = f32::cast_from(a[(row * dk + d) as usize]);
        }
    }
    for it in 0..comptime![cfg.dv.div_ceil(ATTN_BLOCK)] {
        let c = it * ATTN_BLOCK + tid;
        if c < dv {
            smem[(dk + c) as usize] = f32::cast_from(b[(row * dv + c) as usize]);
        }
    }
    sync_cube();
}

/// `p` and `ds` of query row `qrow` (`(b·sq + i)·heads + h`) against key `krow`
/// (`(b·sk + j)·kv_heads + kvh`), with `q_i`/`dout_i` or `k_j`/`v_j` read from shared
/// memory at `q_at`/`o_at` when `staged_query`, else the key side staged at `k_at`/`v_at`.
#[cfg(feature = "kernels")]
#[cube]
#[allow(clippy::too_many_arguments)]
fn p_and_ds<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[F],
    dout: &[F],
    smem: &Shared<[f32]>,
    qrow: u32,
    krow: u32,
    mrow: u32,
    l: f32,
    delta: f32,
    #[comptime] staged_query: bool,
    #[comptime] cfg: AttnGradConfig,
) -> (f32, f32) {
    let dk = comptime![cfg.dk];
    let dv = comptime![cfg.dv];
    let mut dot = 0.0f32;
    let mut dp = 0.0f32;
    if comptime![staged_query] {
        for d in 0..dk {
            dot += smem[d as usize] * f32::cast_from(k[(krow * dk + d) as usize]);
        }
        for c in 0..dv {
            dp += smem[(dk + c) as usize] * f32::cast_from(v[(krow * dv + c) as usize]);
        }
    } else {
        for d in 0..dk {
            dot += f32::cast_from(q[(qrow * dk + d) as usize]) * smem[d as usize];
        }
        for c in 0..dv {
            dp += f32::cast_from(dout[(qrow * dv + c) as usize]) * smem[(dk + c) as usize];
        }
    }
    let mut s = dot * comptime![f32::from_bits(cfg.scale_bits)];
    if comptime![cfg.masked] {
        s += f32::cast_from(mask[mrow as usize]);
    }
    let p = f32::exp(s - l);
    (p, p * (dp - delta))
}

/// `dq` of one query row; see the module header. `lse`, `delta` are `[b, sq, heads]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn attn_grad_dq<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[F],
    lse: &[f32],
    delta: &[f32],
    dout: &[F],
    dq: &mut [F],
    sq: u32,
    sk: u32,
    kv_heads: u32,
    #[comptime] cfg: AttnGradConfig,
) {
    let row = row_pos();
    if row as usize >= lse.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let dk = comptime![cfg.dk];
    let heads = kv_heads * comptime![cfg.group];
    let h = row % heads;
    let t = row / heads;
    let i = t % sq;
    let bi = t / sq;
    let kvh = h / comptime![cfg.group];
    // q_i at 0, dout_i at dk, the tile's ds at dk + dv.
    let mut smem = Shared::<[f32]>::new_slice(comptime![(cfg.dk + cfg.dv + ATTN_BLOCK) as usize]);
    let ds_at = comptime![cfg.dk + cfg.dv];
    stage_rows::<F>(q, dout, row, &mut smem, tid, cfg);
    let l = lse[row as usize];
    let dl = delta[row as usize];
    let mut keys = visible_keys(i, sq, sk, comptime![cfg.causal]);
    if l.is_inf() {
        keys = 0;
    }
    let mut acc = Array::<f32>::new(comptime![cfg.dk_per_unit() as usize]);
    #[unroll]
    for u in 0..comptime![cfg.dk_per_unit()] {
        acc[u as usize] = 0.0;
    }
    for tile in 0..keys.div_ceil(ATTN_BLOCK) {
        let j0 = tile * ATTN_BLOCK;
        let j = j0 + tid;
        let mut ds = 0.0f32;
        if j < keys {
            let krow = (bi * sk + j) * kv_heads + kvh;
            let (_, d) = p_and_ds::<F>(q, k, v, mask, dout, &smem, row, krow, (bi * sq + i) * sk + j, l, dl, true, cfg);
            ds = d;
        }
        smem[(ds_at + tid) as usize] = ds;
        sync_cube();
        let n = select(keys - j0 < ATTN_BLOCK, keys - j0, ATTN_BLOCK);
        #[unroll]
        for u in 0..comptime![cfg.dk_per_unit()] {
            let d = tid + u * ATTN_BLOCK;
            if d < dk {
                let mut a = acc[u as usize];
                for jj in 0..n {
                    a += smem[(ds_at + jj) as usize] * f32::cast_from(k[(((bi * sk + j0 + jj) * kv_heads + kvh) * dk + d) as usize]);
                }
                acc[u as usize] = a;
            }
        }
        sync_cube();
    }
    let scale = comptime![f32::from_bits(cfg.scale_bits)];
    #[unroll]
    for u in 0..comptime![cfg.dk_per_unit()] {
        let d = tid + u * ATTN_BLOCK;
        if d < dk {
            dq[(row * dk + d) as usize] = F::cast_from(acc[u as usize] * scale);
        }
    }
}

/// `dk` and `dv` of one key row `(b, j, kvh)`; see the module header.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn attn_grad_dkv<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[F],
    lse: &[f32],
    delta: &[f32],
    dout: &[F],
    dk_out: &mut [F],
    dv_out: &mut [F],
    sq: u32,
    sk: u32,
    kv_heads: u32,
    #[comptime] cfg: AttnGradConfig,
) {
    let krow = row_pos();
    if (krow * comptime![cfg.dv]) as usize >= dv_out.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let dk = comptime![cfg.dk];
    let dv = comptime![cfg.dv];
    let group = comptime![cfg.group];
    let heads = kv_heads * group;
    let kvh = krow % kv_heads;
    let t = krow / kv_heads;
    let j = t % sk;
    let bi = t / sk;
    // k_j at 0, v_j at dk, the tile's p at dk + dv and ds after them.
    let mut smem = Shared::<[f32]>::new_slice(comptime![(cfg.dk + cfg.dv + 2 * ATTN_BLOCK) as usize]);
    let p_at = comptime![cfg.dk + cfg.dv];
    let ds_at = comptime![cfg.dk + cfg.dv + ATTN_BLOCK];
    stage_rows::<F>(k, v, krow, &mut smem, tid, cfg);
    // The first query that sees key j: causal rows i see keys < sk − sq + i + 1.
    let mut i0 = 0u32;
    if comptime![cfg.causal] {
        if j + sq >= sk {
            i0 = j + sq - sk;
        } else {
            i0 = 0;
        }
    }
    let mut pairs = 0u32;
    if i0 < sq {
        pairs = (sq - i0) * group;
    }
    let mut acc_k = Array::<f32>::new(comptime![cfg.dk_per_unit() as usize]);
    let mut acc_v = Array::<f32>::new(comptime![cfg.dv_per_unit() as usize]);
    #[unroll]
    for u in 0..comptime![cfg.dk_per_unit()] {
        acc_k[u as usize] = 0.0;
    }
    #[unroll]
    for u in 0..comptime![cfg.dv_per_unit()] {
        acc_v[u as usize] = 0.0;
    }
    for tile in 0..pairs.div_ceil(ATTN_BLOCK) {
        let e0 = tile * ATTN_BLOCK;
        let e = e0 + tid;
        let mut p = 0.0f32;
        let mut ds = 0.0f32;
        if e < pairs {
            // Pairs go query-major, the group's heads inner.
            let i = i0 + e / group;
            let h = kvh * group + e % group;
            let qrow = (bi * sq + i) * heads + h;
            let l = lse[qrow as usize];
            if !l.is_inf() {
                let (pp, dd) =
                    p_and_ds::<F>(q, k, v, mask, dout, &smem, qrow, krow, (bi * sq + i) * sk + j, l, delta[qrow as usize], false, cfg);
                p = pp;
                ds = dd;
            }
        }
        smem[(p_at + tid) as usize] = p;
        smem[(ds_at + tid) as usize] = ds;
        sync_cube();
        let n = select(pairs - e0 < ATTN_BLOCK, pairs - e0, ATTN_BLOCK);
        #[unroll]
        for u in 0..comptime![cfg.dv_per_unit()] {
            let c = tid + u * ATTN_BLOCK;
            if c < dv {
                let mut a = acc_v[u as usize];
                for ee in 0..n {
                    let qrow = (bi * sq + i0 + (e0 + ee) / group) * heads + kvh * group + (e0 + ee) % group;
                    a += smem[(p_at + ee) as usize] * f32::cast_from(dout[(qrow * dv + c) as usize]);
                }
                acc_v[u as usize] = a;
            }
        }
        #[unroll]
        for u in 0..comptime![cfg.dk_per_unit()] {
            let d = tid + u * ATTN_BLOCK;
            if d < dk {
                let mut a = acc_k[u as usize];
                for ee in 0..n {
                    let qrow = (bi * sq + i0 + (e0 + ee) / group) * heads + kvh * group + (e0 + ee) % group;
                    a += smem[(ds_at + ee) as usize] * f32::cast_from(q[(qrow * dk + d) as usize]);
                }
                acc_k[u as usize] = a;
            }
        }
        sync_cube();
    }
    let scale = comptime![f32::from_bits(cfg.scale_bits)];
    #[unroll]
    for u in 0..comptime![cfg.dk_per_unit()] {
        let d = tid + u * ATTN_BLOCK;
        if d < dk {
            dk_out[(krow * dk + d) as usize] = F::cast_from(acc_k[u as usize] * scale);
        }
    }
    #[unroll]
    for u in 0..comptime![cfg.dv_per_unit()] {
        let c = tid + u * ATTN_BLOCK;
        if c < dv {
            dv_out[(krow * dv + c) as usize] = F::cast_from(acc_v[u as usize]);
        }
    }
}

/// The spec of an `attention_grad` node (its `dq` launch), `None` for other nodes.
pub(crate) fn spec(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    let Op::AttentionGrad { heads, kv_heads, scale, causal, masked } = g.node(n).op else { return None };
    let no = |reason: String| Unsupported { op: "attention_grad", reason };
    let ins = g.inputs(n);
    let t = |i: usize| g.ty(ins[i]);
    let Some(elem) = Elem::from_dtype(t(0).dtype) else {
        return Some(Err(no(format!("q of dtype {}", t(0).dtype.name()))));
    };
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Some(Err(no(format!("{heads} heads over {kv_heads} kv heads"))));
    }
    let lse_at = 3 + usize::from(masked) + 1;
    if t(lse_at).dtype != DType::F32 {
        return Some(Err(no("a log-sum-exp that is not f32".into())));
    }
    let head = |i: usize| t(i).shape.0.get(3).and_then(|d| d.as_const()).and_then(|v| u32::try_from(v).ok());
    let (Some(dk), Some(dv)) = (head(0), head(2)) else {
        return Some(Err(no("head sizes that are not constants".into())));
    };
    if dk == 0 || dv == 0 {
        return Some(Err(no("empty heads".into())));
    }
    let cfg = AttnGradConfig { dk, dv, group: heads / kv_heads, scale_bits: (scale.get() as f32).to_bits(), causal, masked };
    Some(Ok(KernelSpec::AttentionGrad { elem, cfg, part: AttnGradPart::Dq }))
}

/// The three launches of an `attention_grad` node. Inputs: q, k, v, [mask], out, lse, dout.
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let KernelSpec::AttentionGrad { elem, cfg, .. } = spec else { unreachable!("attention_grad::work of {spec:?}") };
    let ins: Vec<Vec<Dim>> = g.inputs(n).iter().map(|&v| g.ty(v).shape.0.clone()).collect();
    let (q, k) = (&ins[0], &ins[1]);
    let (b, sq, heads, sk, kv_heads) = (q[0], q[1], q[2], k[1], k[2]);
    let at = 3 + usize::from(cfg.masked);
    let (i, o) = (|j: usize| Arg::Buf(Buf::Input(j as u16)), |j| Arg::Buf(Buf::Output(j)));
    let mut scratch = vec![Scratch { dtype: DType::F32, len: Size::product(&[b, sq, heads]) }];
    let mask = if cfg.masked {
        i(3)
    } else {
        scratch.push(Scratch { dtype: crate::codegen::launch::elem_dtype(elem), len: Size::lit(1) });
        Arg::Buf(Buf::Scratch(1))
    };
    let (out, lse, dout, delta) = (i(at), i(at + 1), i(at + 2), Arg::Buf(Buf::Scratch(0)));
    let q_rows = Size::product(&[b, sq, heads]);
    let k_rows = Size::product(&[b, sk, kv_heads]);
    let sizes = [Arg::U32(Size::Dim(sq)), Arg::U32(Size::Dim(sk)), Arg::U32(Size::Dim(kv_heads))];
    let part = |p| KernelSpec::AttentionGrad { elem, cfg, part: p };
    // Per (query, key) pair of a head: the score and dp products, exp, ds, and the two
    // products into dq and into dk/dv: about 4·(dk + dv) multiply-adds, counted over every
    // pair (the causal half is skipped, not counted separately here).
    let pairs = Size::product(&[b, heads, sq, sk]);
    let per_pair = 2 * (2 * cfg.dk as i64 + cfg.dv as i64);
    let mut dq_args = vec![i(0), i(1), i(2), mask.clone(), lse.clone(), delta.clone(), dout.clone(), o(0)];
    dq_args.extend(sizes.clone());
    let mut dkv_args = vec![i(0), i(1), i(2), mask, lse, delta.clone(), dout.clone(), o(1), o(2)];
    dkv_args.extend(sizes);
    let launches = vec![
        Launch::new(
            part(AttnGradPart::Delta),
            vec![out, dout, delta, Arg::U32(Size::lit(cfg.dv as i64))],
            grid_linear(q_rows.clone().ceil_div(ATTN_BLOCK as i64)),
            q_rows.clone().mul(Size::lit(2 * cfg.dv as i64)),
        ),
        Launch::new(part(AttnGradPart::Dq), dq_args, grid_rows(q_rows, Size::lit(1)), pairs.clone().mul(Size::lit(per_pair))),
        Launch::new(part(AttnGradPart::Dkv), dkv_args, grid_rows(k_rows, Size::lit(1)), pairs.mul(Size::lit(per_pair + 2 * cfg.dv as i64))),
    ];
    NodeWork::Launches { scratch, launches }
}
