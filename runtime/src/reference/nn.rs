//! The composite ops (and softmax), with the semantics of Hugging Face transformers'
//! Llama / DeepSeek-V2 / DeepSeek-V3 modeling code, which the runtime is checked against.
//!
//! Float order follows the reference where that is cheap (RMSNorm multiplies by the
//! reciprocal root, then the gain; experts add up in expert-id order), and statistics
//! (norms, softmax sums, losses) accumulate in `f64` before rounding to the run's
//! precision, so an `f32` run is never less accurate than the reference's `f32`.

use super::dot::{rows_times_matrix, rows_times_weight_ld};
use super::elementwise::PAR_MIN;
use super::layout::{indices, split_at_axis, top_k_lane};
use super::linalg::{as_f32, gemm, gemm_acc, linear, linear_bf16, linear_narrow, Mat};
use super::narrow::{narrow, Narrow};
use super::real::Real;
use super::tensor::{numel, Data, Tensor};
use super::KernelError as KErr;
use dsc_compiler::ir::{GroupScore, RopeLayout, Routing, Scoring, Yarn};
use rayon::prelude::*;

fn floats<'a, T: Real>(t: &'a Tensor, what: &str) -> Result<&'a [T], KErr> {
    T::view(t.data())
        .ok_or_else(|| KErr::dtype(format!("{what} must be a float tensor of the run's precision ({}), got {}", T::NAME, t.data().kind())))
}

/// Softmax of one lane of `n` elements `x[j*stride]` into `out[j*stride]`. A lane that
/// is all -inf (nothing visible) or empty gives zeros, as torch's `_safe_softmax` in
/// scaled-dot-product attention: a fully masked row contributes nothing instead of NaN.
/// Returns the lane's log-sum-exp `max + ln Σ exp(x - max)` in `f64` (-inf for such a
/// lane), which attention keeps for its backward.
fn softmax_lane<T: Real>(x: &[T], out: &mut [T], n: usize, stride: usize) -> f64 {
    let mut m = T::NEG_INF;
    for j in 0..n {
        m = m.max_nan(x[j * stride]);
    }
    if m == T::NEG_INF {
        for j in 0..n {
            out[j * stride] = T::ZERO;
        }
        return f64::NEG_INFINITY;
    }
    let mut sum = 0.0f64;
    for j in 0..n {
        let e = (x[j * stride] - m).exp();
        out[j * stride] = e;
        sum += e.to_f64();
    }
    let s = T::of(sum);
    for j in 0..n {
        out[j * stride] = out[j * stride] / s;
    }
    m.to_f64() + sum.ln()
}

/// Softmax along `axis`, max-subtracted.
pub fn softmax<T: Real>(x: &Tensor, axis: usize) -> Result<Tensor, KErr> {
    if axis >= x.rank() {
        return Err(KErr::shape(format!("axis {axis} out of range for rank {}", x.rank())));
    }
    let v = floats::<T>(x, "softmax input")?;
    let (_, n, inner) = split_at_axis(x.shape(), axis);
    let mut out = vec![T::ZERO; v.len()];
    let block = (n * inner).max(1);
    let work = |(o, chunk): (usize, &mut [T])| {
        let src = &v[o * block..o * block + chunk.len()];
        for i in 0..inner {
            let _ = softmax_lane(&src[i..], &mut chunk[i..], n, inner);
        }
    };
    if v.len() >= PAR_MIN {
        out.par_chunks_mut(block).enumerate().for_each(work);
    } else {
        out.chunks_mut(block).enumerate().for_each(work);
    }
    Ok(Tensor::from_parts(x.shape().to_vec(), T::wrap(out)))
}

/// `x · rsqrt(mean(x²) + eps) · gain` over the last axis, as HF's `RMSNorm`: the mean of
/// squares accumulates in `f64`, is rounded to the run's precision, and the rest runs in
/// it.
pub fn rms_norm<T: Real>(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor, KErr> {
    let d = *x.shape().last().ok_or_else(|| KErr::shape("rms_norm of a scalar".into()))?;
    let (v, g) = (floats::<T>(x, "x")?, floats::<T>(gain, "gain")?);
    if g.len() != d {
        return Err(KErr::shape(format!("gain {:?} for rows of {d}", gain.shape())));
    }
    let mut out = vec![T::ZERO; v.len()];
    let eps = T::of(eps);
    let row = |(r, o): (usize, &mut [T])| {
        let xr = &v[r * d..(r + 1) * d];
        let ms = xr.iter().map(|&a| a.to_f64() * a.to_f64()).sum::<f64>() / d as f64;
        let inv = T::ONE / (T::of(ms) + eps).sqrt();
        for ((o, &a), &w) in o.iter_mut().zip(xr).zip(g) {
            *o = (a * inv) * w;
        }
    };
    if d > 0 {
        if v.len() >= PAR_MIN {
            out.par_chunks_mut(d).enumerate().for_each(row);
        } else {
            out.chunks_mut(d).enumerate().for_each(row);
        }
    }
    Ok(Tensor::from_parts(x.shape().to_vec(), T::wrap(out)))
}

// One definition each, shared with the GPU kernels (which take their frequency tables
// from the same function): the IR's `rope_frequencies` and the spec's `yarn_mscale`.
pub use dsc_compiler::ir::rope_frequencies;
pub use dsc_dsl::model::yarn_mscale;

/// Rotary embedding of `x: [b, s, d]` or `[b, s, h, d]` at `positions: [b, s]`.
///
/// The angle of pair `i` at position `p` is `p · inv_freq[i]`, computed in the run's
/// precision from the frequency rounded to it (as HF computes its `f32` tables); cos and
/// sin are then taken of that angle and multiplied by the YaRN factor. `HalfSplit` pairs
/// dim `i` with `i + rotary_dim/2` (`rotate_half`); `Interleaved` rotates `(2i, 2i+1)` in
/// place with frequency `i`. Dims from `rotary_dim` on pass through.
pub fn rope<T: Real>(
    x: &Tensor,
    positions: &Tensor,
    layout: RopeLayout,
    theta: f64,
    rotary_dim: usize,
    yarn: Option<&Yarn>,
) -> Result<Tensor, KErr> {
    let sh = x.shape();
    if !(3..=4).contains(&sh.len()) || positions.shape() != &sh[..2] {
        return Err(KErr::shape(format!("rope of x {sh:?} at positions {:?}", positions.shape())));
    }
    let d = sh[sh.len() - 1];
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > d {
        return Err(KErr::shape(format!("rotary_dim {rotary_dim} must be even, positive and at most {d}")));
    }
    let v = floats::<T>(x, "x")?;
    let pos = indices(positions, "positions")?;
    let (freqs, mscale) = rope_frequencies(theta, rotary_dim, yarn);
    let freqs: Vec<T> = freqs.into_iter().map(T::of).collect();
    let mscale = T::of(mscale);
    let half = rotary_dim / 2;
    let row_len = numel(&sh[2..]); // one (b, s) position: h·d or d
    let mut out = v.to_vec();
    let work = |(r, o): (usize, &mut [T])| {
        let p = T::of(pos[r] as f64);
        let (cos, sin): (Vec<T>, Vec<T>) = freqs
            .iter()
            .map(|&f| {
                let a = (f * p).to_f64();
                (T::of(a.cos()) * mscale, T::of(a.sin()) * mscale)
            })
            .unzip();
        for head in o.chunks_mut(d) {
            for i in 0..half {
                let (a, b) = match layout {
                    RopeLayout::HalfSplit => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (head[a], head[b]);
                head[a] = x1 * cos[i] - x2 * sin[i];
                head[b] = x2 * cos[i] + x1 * sin[i];
            }
        }
    };
    if row_len > 0 {
        if v.len() >= PAR_MIN {
            out.par_chunks_mut(row_len).enumerate().for_each(work);
        } else {
            out.chunks_mut(row_len).enumerate().for_each(work);
        }
    }
    Ok(Tensor::from_parts(sh.to_vec(), T::wrap(out)))
}

/// Query rows [`attention`] scores at a time, per (batch, head): its scratch is
/// `2 · ATTENTION_ROWS · keys` elements however long the query.
const ATTENTION_ROWS: usize = 64;

/// Settings of one attention op.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub scale: f64,
    pub causal: bool,
}

/// `softmax(q·kᵀ·scale [+ mask] [causal]) · v` per batch and head, as HF's eager
/// attention: scores are `(q·k)·scale + mask`, in the run's precision. The causal mask is
/// aligned bottom-right (query `i` sees keys `0 ..= sk - sq + i`). Query head `h` reads kv
/// head `h / (heads / kv_heads)`. A query that sees no key gets zeros (see
/// `softmax_lane`).
pub fn attention<T: Real>(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, spec: AttentionSpec) -> Result<Tensor, KErr> {
    Ok(attention_impl::<T>(q, k, v, mask, spec, false)?.0)
}

/// [`attention`] and the log-sum-exp of each query row's scaled, masked scores,
/// `[b, sq, heads]` in the run's precision (the `lse: true` form of the op, which
/// [`grad::attention_grad`] reads back); -inf for a row that sees no key.
pub fn attention_lse<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    spec: AttentionSpec,
) -> Result<(Tensor, Tensor), KErr> {
    let (out, lse) = attention_impl::<T>(q, k, v, mask, spec, true)?;
    Ok((out, lse.expect("asked for")))
}

/// Attention's operands, checked: the sizes and the float data of q, k, v and the mask.
pub(crate) struct AttentionArgs<'a, T> {
    pub b: usize,
    pub sq: usize,
    pub sk: usize,
    pub dk: usize,
    pub dv: usize,
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub mask: Option<&'a [T]>,
}

/// Checks q `[b, sq, heads, dk]`, k `[b, sk, kv_heads, dk]`, v `[b, sk, kv_heads, dv]` and
/// the mask `[b, sq, sk]` for attention and its backward (`what` names the op in errors).
pub(crate) fn attention_args<'a, T: Real>(
    what: &str,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    mask: Option<&'a Tensor>,
    spec: AttentionSpec,
) -> Result<AttentionArgs<'a, T>, KErr> {
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let AttentionSpec { heads, kv_heads, .. } = spec;
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 {
        return Err(KErr::shape(format!("{what} needs rank-4 q, k, v, got {qs:?}, {ks:?}, {vs:?}")));
    }
    let (b, sq, dk) = (qs[0], qs[1], qs[3]);
    let (sk, dv) = (ks[1], vs[3]);
    if kv_heads == 0 || heads % kv_heads != 0 || qs[2] != heads || ks != [b, sk, kv_heads, dk] || vs[..3] != [b, sk, kv_heads] {
        return Err(KErr::shape(format!("{what} with {heads} heads / {kv_heads} kv heads of q {qs:?}, k {ks:?}, v {vs:?}")));
    }
    let mask = match mask {
        Some(m) if m.shape() != [b, sq, sk] => {
            return Err(KErr::shape(format!("mask {:?} must be [{b}, {sq}, {sk}]", m.shape())));
        }
        Some(m) => Some(floats::<T>(m, "mask")?),
        None => None,
    };
    Ok(AttentionArgs { b, sq, sk, dk, dv, q: floats::<T>(q, "q")?, k: floats::<T>(k, "k")?, v: floats::<T>(v, "v")?, mask })
}

/// One query row's scores made probabilities in place of `p`: keys from `visible` on
/// are -inf (they drop out of the softmax), the others `score · scale [+ mask]`.
/// Returns the row's log-sum-exp.
fn softmax_scores<T: Real>(s: &mut [T], p: &mut [T], visible: usize, scale: T, mask: Option<&[T]>) -> f64 {
    for (j, x) in s.iter_mut().enumerate() {
        *x = if j >= visible {
            T::NEG_INF
        } else {
            let sc = *x * scale;
            match mask {
                Some(m) => sc + m[j],
                None => sc,
            }
        };
    }
    let n = s.len();
    softmax_lane(s, p, n, 1)
}

/// Where attention reads a key or value operand `[b, sk, kv_heads, d]` in place: element
/// `(i, j, h, c)` is element `offset + i·strides[0] + j·strides[1] + h·strides[2] + c` of
/// `data` (the last axis contiguous). A decode step's keys and values are a
/// position-major cache `[len, b, ..]` read this way instead of permuted to batch-major
/// per layer and step; `data` is of the run's precision or bf16 (a cache held in bf16).
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub data: &'a Tensor,
    pub offset: usize,
    pub strides: [usize; 3],
    /// `[b, sk, kv_heads, d]`.
    pub shape: [usize; 4],
}

impl<'a> KvView<'a> {
    /// A contiguous rank-4 tensor read as it is.
    pub fn contiguous(t: &'a Tensor, what: &str) -> Result<KvView<'a>, KErr> {
        let s = t.shape();
        if s.len() != 4 {
            return Err(KErr::shape(format!("attention needs a rank-4 {what}, got {s:?}")));
        }
        Ok(KvView { data: t, offset: 0, strides: [s[1] * s[2] * s[3], s[2] * s[3], s[3]], shape: [s[0], s[1], s[2], s[3]] })
    }

    /// Where row `(i, j, h)` starts.
    fn at(&self, i: usize, j: usize, h: usize) -> usize {
        self.offset + i * self.strides[0] + j * self.strides[1] + h * self.strides[2]
    }

    /// Whether every element of the view lies inside `data` (an empty view always does).
    fn fits(&self) -> bool {
        if self.shape.contains(&0) {
            return true;
        }
        let mut last = self.offset.checked_add(self.shape[3] - 1);
        for a in 0..3 {
            last = last.and_then(|l| (self.shape[a] - 1).checked_mul(self.strides[a]).and_then(|x| x.checked_add(l)));
        }
        last.is_some_and(|l| l < self.data.numel())
    }

    /// The view over `data` widened from bf16 to the run's precision (`owned` holds it).
    fn widened(&self, owned: &'a Option<Tensor>) -> KvView<'a> {
        match owned {
            Some(t) => KvView { data: t, ..*self },
            None => *self,
        }
    }
}

/// Query rows per sequence up to which [`shared_kv_attention`] takes every head at once.
const SHARED_KV_ROWS: usize = 16;

/// A key, value or cache operand's elements as the few-row kernels read them.
enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

fn elems(t: &Tensor) -> Option<Elems<'_>> {
    match t.data() {
        Data::F32(v) => Some(Elems::F32(v)),
        Data::Bf16(v) => Some(Elems::Bf16(v)),
        _ => None,
    }
}

/// Attention of a few query rows against one key/value head that every query head
/// reads (MQA, and absorbed MLA's latent cache in decode), in an `f32` run: per
/// sequence all heads' rows at once, scored by the dot kernels, so the cache is read
/// once per step instead of once per head, where it lies (f32 or bf16), and no GEMM
/// packs it. `None` where it does not apply; the general path gives the same values up
/// to summation order.
#[allow(clippy::too_many_arguments)]
fn shared_kv_attention<T: Real>(
    q: &[T],
    [b, sq, heads]: [usize; 3],
    k: &[KvView],
    v: &KvView,
    md: Option<&[T]>,
    scale: T,
    visible: &(dyn Fn(usize) -> usize + Sync),
    want_lse: bool,
) -> Option<(Tensor, Option<Tensor>)> {
    let rows = sq * heads;
    let [_, sk, kv_heads, dv] = v.shape;
    let dk: usize = k.iter().map(|p| p.shape[3]).sum();
    if kv_heads != 1 || rows > SHARED_KV_ROWS || sk == 0 || dk == 0 {
        return None;
    }
    let qf = as_f32(q)?;
    let kd: Vec<Elems> = k.iter().map(|p| elems(p.data)).collect::<Option<_>>()?;
    let vd = elems(v.data)?;
    let mf = md.map(as_f32).map(|m| m.expect("the mask is of the run's precision"));
    let scale = scale.to_f64() as f32;
    let one = |bi: usize| -> (Vec<T>, Vec<T>) {
        let mut s = vec![0f32; rows * sk];
        let mut part = vec![0f32; if k.len() > 1 { rows * sk } else { 0 }];
        let mut c0 = 0;
        for (p, (view, data)) in k.iter().zip(&kd).enumerate() {
            let d = view.shape[3];
            // This part's columns of the query rows, contiguous.
            let qp: Vec<f32> = (0..rows).flat_map(|r| &qf[(bi * rows + r) * dk + c0..(bi * rows + r) * dk + c0 + d]).copied().collect();
            let out = if p == 0 { &mut s } else { &mut part };
            let at = view.at(bi, 0, 0);
            match data {
                Elems::F32(w) => rows_times_weight_ld(&qp, rows, d, &w[at..], view.strides[1], sk, out, sk),
                Elems::Bf16(w) => rows_times_weight_ld(&qp, rows, d, &w[at..], view.strides[1], sk, out, sk),
            }
            if p > 0 {
                s.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
            }
            c0 += d;
        }
        let mut p = vec![0f32; rows * sk];
        let mut lse = vec![T::ZERO; if want_lse { rows } else { 0 }];
        for r in 0..rows {
            // Row r is query position r / heads of head r % heads ([sq, heads] order).
            let i = r / heads;
            let mask_row = mf.map(|m| &m[(bi * sq + i) * sk..(bi * sq + i + 1) * sk]);
            let l = softmax_scores(&mut s[r * sk..(r + 1) * sk], &mut p[r * sk..(r + 1) * sk], visible(i), scale, mask_row);
            if want_lse {
                lse[r] = T::of(l);
            }
        }
        let mut o = vec![0f32; rows * dv];
        let at = v.at(bi, 0, 0);
        match &vd {
            Elems::F32(w) => rows_times_matrix(&p, rows, sk, &w[at..], v.strides[1], dv, &mut o),
            Elems::Bf16(w) => rows_times_matrix(&p, rows, sk, &w[at..], v.strides[1], dv, &mut o),
        }
        (o.into_iter().map(|x| T::of(x as f64)).collect(), lse)
    };
    let parts: Vec<(Vec<T>, Vec<T>)> = if b > 1 { (0..b).into_par_iter().map(one).collect() } else { (0..b).map(one).collect() };
    let (mut out, mut lse) = (Vec::with_capacity(b * rows * dv), Vec::with_capacity(if want_lse { b * rows } else { 0 }));
    for (o, l) in parts {
        out.extend(o);
        lse.extend(l);
    }
    let out = Tensor::from_parts(vec![b, sq, heads, dv], T::wrap(out));
    Some((out, want_lse.then(|| Tensor::from_parts(vec![b, sq, heads], T::wrap(lse)))))
}

fn attention_impl<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    spec: AttentionSpec,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>), KErr> {
    attention_views::<T>(q, &[KvView::contiguous(k, "k")?], &KvView::contiguous(v, "v")?, mask, spec, want_lse)
}

/// [`attention_lse`] (`want_lse`) or [`attention`] with the keys and values read through
/// views: the key is `k`'s parts side by side along its last axis (absorbed MLA's latent
/// and rope caches), each `[b, sk, kv_heads, d_p]`, and `v` is `[b, sk, kv_heads, dv]`.
pub fn attention_views<T: Real>(
    q: &Tensor,
    k: &[KvView],
    v: &KvView,
    mask: Option<&Tensor>,
    spec: AttentionSpec,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>), KErr> {
    let AttentionSpec { heads, kv_heads, .. } = spec;
    let qs = q.shape();
    let dk: usize = k.iter().map(|p| p.shape[3]).sum();
    let [_, sk, _, dv] = v.shape;
    let bad = qs.len() != 4
        || qs[2] != heads
        || qs[3] != dk
        || kv_heads == 0
        || heads % kv_heads != 0
        || k.is_empty()
        || v.shape[..3] != [qs[0], sk, kv_heads]
        || k.iter().any(|p| p.shape[..3] != v.shape[..3]);
    if bad {
        let ks: Vec<[usize; 4]> = k.iter().map(|p| p.shape).collect();
        return Err(KErr::shape(format!("attention with {heads} heads / {kv_heads} kv heads of q {qs:?}, k {ks:?}, v {:?}", v.shape)));
    }
    if let Some(p) = k.iter().chain([v]).find(|p| !p.fits()) {
        return Err(KErr::shape(format!(
            "a key/value view {:?} at {} strides {:?} runs past its {} elements",
            p.shape,
            p.offset,
            p.strides,
            p.data.numel()
        )));
    }
    let (b, sq) = (qs[0], qs[1]);
    let qd = floats::<T>(q, "q")?;
    let md = match mask {
        Some(m) if m.shape() != [b, sq, sk] => return Err(KErr::shape(format!("mask {:?} must be [{b}, {sq}, {sk}]", m.shape()))),
        Some(m) => Some(floats::<T>(m, "mask")?),
        None => None,
    };
    let group = heads / kv_heads;
    let scale = T::of(spec.scale);
    // Keys query `i` sees: the causal mask is aligned bottom-right.
    let visible = |i: usize| if spec.causal { (sk + i + 1).saturating_sub(sq).min(sk) } else { sk };
    if let Some(r) = shared_kv_attention(qd, [b, sq, heads], k, v, md, scale, &visible, want_lse) {
        return Ok(r);
    }
    // The general path reads the run's precision: a bf16 operand is widened first.
    let wide: Vec<Option<Tensor>> = k.iter().chain([v]).map(|p| super::elementwise::widen_bf16::<T>(p.data)).collect();
    let views: Vec<KvView> = k.iter().chain([v]).zip(&wide).map(|(p, w)| p.widened(w)).collect();
    let data: Vec<&[T]> = views.iter().map(|p| floats::<T>(p.data, "k and v")).collect::<Result<_, _>>()?;
    let (kv, vv, vd) = (&views[..k.len()], &views[k.len()], data[k.len()]);
    // One task per (batch, head), in blocks of query rows: scores [rows, sk], then
    // probabilities · v → [rows, dv], and the rows' log-sum-exps. Blocking the queries
    // keeps the scratch at ATTENTION_ROWS · sk per task, linear in the sequence (a whole
    // [sq, sk] at 100k tokens is 40 GB); each row's arithmetic is what it was unblocked.
    let one = |task: usize| -> (Vec<T>, Vec<T>) {
        let (bi, h) = (task / heads, task % heads);
        let kh = h / group;
        let rows = ATTENTION_ROWS.min(sq);
        let mut s = vec![T::ZERO; rows * sk];
        let mut p = vec![T::ZERO; rows * sk];
        let vm = Mat { data: vd, offset: vv.at(bi, 0, kh), rs: vv.strides[1], cs: 1 };
        let mut lse = vec![T::ZERO; if want_lse { sq } else { 0 }];
        let mut o = vec![T::ZERO; sq * dv];
        for i0 in (0..sq).step_by(rows.max(1)) {
            let n = rows.min(sq - i0);
            // Causal: no row of the block sees past its last row's diagonal, so the keys
            // after it are neither scored nor multiplied (their probabilities are exactly
            // 0): a causal prompt pass does about half the work.
            let keys = if spec.causal { (sk + i0 + n).saturating_sub(sq).min(sk) } else { sk };
            let (s, p) = (&mut s[..n * keys], &mut p[..n * keys]);
            // Scores: the sum over the key's parts of q's columns times the part (kᵀ as
            // a d × keys view).
            let mut c0 = 0;
            for (part, view) in kv.iter().enumerate() {
                let qm = Mat { data: qd, offset: ((bi * sq + i0) * heads + h) * dk + c0, rs: heads * dk, cs: 1 };
                let km = Mat { data: data[part], offset: view.at(bi, 0, kh), rs: 1, cs: view.strides[1] };
                if part == 0 {
                    gemm(n, keys, view.shape[3], s, qm, km, false);
                } else {
                    gemm_acc(n, keys, view.shape[3], s, qm, km, T::ONE, false);
                }
                c0 += view.shape[3];
            }
            for r in 0..n {
                let i = i0 + r;
                let mask_row = md.map(|m| &m[(bi * sq + i) * sk..(bi * sq + i) * sk + keys]);
                let l = softmax_scores(&mut s[r * keys..(r + 1) * keys], &mut p[r * keys..(r + 1) * keys], visible(i), scale, mask_row);
                if want_lse {
                    lse[i] = T::of(l);
                }
            }
            gemm(n, dv, keys, &mut o[i0 * dv..(i0 + n) * dv], Mat::rows(p, 0, keys), vm, false);
        }
        (o, lse)
    };
    let per_head: Vec<(Vec<T>, Vec<T>)> =
        if b * heads > 1 { (0..b * heads).into_par_iter().map(one).collect() } else { (0..b * heads).map(one).collect() };
    let mut out = vec![T::ZERO; b * sq * heads * dv];
    let mut lse = vec![T::ZERO; if want_lse { b * sq * heads } else { 0 }];
    for (task, (o, l)) in per_head.iter().enumerate() {
        let (bi, h) = (task / heads, task % heads);
        for i in 0..sq {
            let at = ((bi * sq + i) * heads + h) * dv;
            out[at..at + dv].copy_from_slice(&o[i * dv..(i + 1) * dv]);
            if want_lse {
                lse[(bi * sq + i) * heads + h] = l[i];
            }
        }
    }
    let out = Tensor::from_parts(vec![b, sq, heads, dv], T::wrap(out));
    Ok((out, want_lse.then(|| Tensor::from_parts(vec![b, sq, heads], T::wrap(lse)))))
}

/// The MoE router (HF `DeepseekV2MoE` gate / `DeepseekV3TopkRouter` + `route_tokens_to_experts`).
///
/// Per token: scores = softmax or sigmoid of the logits; choice = scores + bias when
/// `selection_bias`; with groups, each group is scored by its best choice (`Max`) or the
/// sum of its two best (`Top2Sum`; a group of one expert scores that expert), the
/// `groups_kept` best groups are kept (ties to the lower group) and the other experts
/// can never be chosen; the `top_k` best choices are the indices, **in descending order
/// of choice score** (ties to the lower expert id); the weights are the *unbiased*
/// scores there, divided by `sum + 1e-20` when `normalize`, times `scale`.
///
/// Experts outside the kept groups are excluded outright (DeepSeek's inference code
/// masks them with -inf). HF fills them with 0.0 instead, which differs only if fewer
/// than `top_k` kept experts have a positive biased score.
pub fn moe_route<T: Real>(logits: &Tensor, bias: Option<&Tensor>, r: &Routing) -> Result<(Tensor, Tensor), KErr> {
    let e = *logits.shape().last().ok_or_else(|| KErr::shape("moe_route of a scalar".into()))?;
    let lv = floats::<T>(logits, "logits")?;
    let bv = match bias {
        Some(b) if b.shape() != [e] => return Err(KErr::shape(format!("bias {:?} for {e} experts", b.shape()))),
        Some(b) => Some(floats::<T>(b, "bias")?),
        None if r.selection_bias => return Err(KErr::shape("selection_bias without a bias input".into())),
        None => None,
    };
    let (k, groups, kept) = (r.top_k as usize, r.groups.max(1) as usize, r.groups_kept as usize);
    if k == 0 || e % groups != 0 || kept == 0 || kept > groups || kept * (e / groups) < k {
        return Err(KErr::shape(format!("top_k {k} from {kept} of {groups} groups of {e} experts")));
    }
    if groups > 1 && r.group_score.is_none() {
        return Err(KErr::shape("groups > 1 without a group score".into()));
    }
    let per_group = e / groups;
    let tokens = lv.len().checked_div(e).unwrap_or(0);
    let route = |t: usize| -> (Vec<i32>, Vec<T>) {
        let mut scores = vec![T::ZERO; e];
        route_scores(&lv[t * e..(t + 1) * e], &mut scores, r.scoring);
        let choice: Vec<T> = match bv {
            Some(b) => scores.iter().zip(b).map(|(&s, &b)| s + b).collect(),
            None => scores.clone(),
        };
        let mut cand: Vec<(T, usize)> = Vec::with_capacity(e);
        if groups > 1 {
            let mut gs: Vec<(T, usize)> = (0..groups)
                .map(|g| {
                    let mut members: Vec<(T, usize)> = (0..per_group).map(|j| (choice[g * per_group + j], j)).collect();
                    let score = match r.group_score {
                        Some(GroupScore::Top2Sum) => {
                            let n = members.len().min(2);
                            top_k_lane(&mut members, n);
                            members[..n].iter().fold(T::ZERO, |a, m| a + m.0)
                        }
                        _ => {
                            top_k_lane(&mut members, 1);
                            members[0].0
                        }
                    };
                    (score, g)
                })
                .collect();
            top_k_lane(&mut gs, kept);
            let mut keep: Vec<usize> = gs[..kept].iter().map(|g| g.1).collect();
            keep.sort_unstable();
            for g in keep {
                cand.extend((g * per_group..(g + 1) * per_group).map(|x| (choice[x], x)));
            }
        } else {
            cand.extend(choice.iter().copied().zip(0..e));
        }
        top_k_lane(&mut cand, k);
        let chosen: Vec<usize> = cand[..k].iter().map(|c| c.1).collect();
        let w = gate_weights(&scores, &chosen, r);
        (chosen.into_iter().map(|c| c as i32).collect(), w)
    };
    let routed: Vec<(Vec<i32>, Vec<T>)> =
        if tokens * e >= PAR_MIN { (0..tokens).into_par_iter().map(route).collect() } else { (0..tokens).map(route).collect() };
    Ok(routed_tensors(logits.shape(), k, routed))
}

/// The router's scores of one token's logits: softmax over the experts, or sigmoid.
pub(crate) fn route_scores<T: Real>(logits: &[T], scores: &mut [T], scoring: Scoring) {
    match scoring {
        Scoring::Softmax => {
            let _ = softmax_lane(logits, scores, logits.len(), 1);
        }
        Scoring::Sigmoid => scores.iter_mut().zip(logits).for_each(|(s, &x)| *s = x.sigmoid()),
    }
}

/// One token's gate weights: its (unbiased) `scores` at the `chosen` experts, divided by
/// their `sum + 1e-20` when `normalize`, times `scale`. The router and its replay both
/// weigh with this, so a replay of the router's own choice gives its weights bit for bit.
fn gate_weights<T: Real>(scores: &[T], chosen: &[usize], r: &Routing) -> Vec<T> {
    let (scale, eps) = (T::of(r.scale.get()), T::of(1e-20));
    let mut w: Vec<T> = chosen.iter().map(|&c| scores[c]).collect();
    if r.normalize {
        let sum = w.iter().fold(T::ZERO, |a, &b| a + b) + eps;
        w.iter_mut().for_each(|x| *x = *x / sum);
    }
    w.iter_mut().for_each(|x| *x = *x * scale);
    w
}

/// Per-token `(indices, weights)` rows as the router's two outputs, `[T.., k]` each.
fn routed_tensors<T: Real>(logits_shape: &[usize], k: usize, routed: Vec<(Vec<i32>, Vec<T>)>) -> (Tensor, Tensor) {
    let mut shape = logits_shape.to_vec();
    *shape.last_mut().expect("rank checked") = k;
    let tokens = routed.len();
    let (mut iv, mut wv) = (Vec::with_capacity(tokens * k), Vec::with_capacity(tokens * k));
    for (i, w) in routed {
        iv.extend(i);
        wv.extend(w);
    }
    (Tensor::from_parts(shape.clone(), Data::I32(iv)), Tensor::from_parts(shape, T::wrap(wv)))
}

/// The MoE router with its selection given (`Op::MoeRouteReplay`, routing replay): the
/// `indices: int[T.., top_k]` pass through as `i32`, the weights are [`moe_route`]'s at
/// those experts (same scores, same [`gate_weights`]). An index outside `0..E` is an
/// index error; the selection settings (bias, groups) play no part.
pub fn moe_route_replay<T: Real>(logits: &Tensor, idx: &Tensor, r: &Routing) -> Result<(Tensor, Tensor), KErr> {
    let e = *logits.shape().last().ok_or_else(|| KErr::shape("moe_route_replay of a scalar".into()))?;
    let k = r.top_k as usize;
    let mut want = logits.shape().to_vec();
    *want.last_mut().expect("rank >= 1") = k;
    if idx.shape() != want {
        return Err(KErr::shape(format!("replayed indices {:?} must be {want:?} for logits {:?}", idx.shape(), logits.shape())));
    }
    let lv = floats::<T>(logits, "logits")?;
    let ids: Vec<usize> = indices(idx, "replayed expert indices")?
        .into_iter()
        .map(|x| {
            usize::try_from(x)
                .ok()
                .filter(|&u| u < e)
                .ok_or_else(|| KErr::index(format!("replayed expert index {x} is out of range for {e} experts")))
        })
        .collect::<Result<_, _>>()?;
    let tokens = lv.len().checked_div(e).unwrap_or(0);
    let route = |t: usize| -> (Vec<i32>, Vec<T>) {
        let mut scores = vec![T::ZERO; e];
        route_scores(&lv[t * e..(t + 1) * e], &mut scores, r.scoring);
        let chosen = &ids[t * k..(t + 1) * k];
        (chosen.iter().map(|&c| c as i32).collect(), gate_weights(&scores, chosen, r))
    };
    let routed: Vec<(Vec<i32>, Vec<T>)> =
        if tokens * e >= PAR_MIN { (0..tokens).into_par_iter().map(route).collect() } else { (0..tokens).map(route).collect() };
    Ok(routed_tensors(logits.shape(), k, routed))
}

/// One SwiGLU's torch-layout weights: `gate, up: [inter, h]`, `down: [h, inter]`.
struct Ffn<'a, T> {
    gate: &'a [T],
    up: &'a [T],
    down: &'a [T],
    inter: usize,
}

/// [`Ffn`]'s weights for the forward, which may be bf16 ([`WeightView`]).
struct FfnView<'a, T> {
    gate: WeightView<'a, T>,
    up: WeightView<'a, T>,
    down: WeightView<'a, T>,
    inter: usize,
    /// Round `x` to bf16 where a weight is bf16 ([`super::Options::bf16_inputs`]).
    bf16_inputs: bool,
}

/// `down(silu(gate(x)) · up(x))` for the rows of `x: [m, h]`.
fn swiglu_rows<T: Real>(x: &[T], h: usize, w: FfnView<T>, par: bool) -> Result<Vec<T>, KErr> {
    let (m, i) = (x.len().checked_div(h).unwrap_or(0), w.inter);
    let g = w.gate.linear(x, m, h, i, par, w.bf16_inputs)?;
    let u = w.up.linear(x, m, h, i, par, w.bf16_inputs)?;
    let a: Vec<T> = g.iter().zip(&u).map(|(&g, &u)| g.silu() * u).collect();
    w.down.linear(&a, m, i, h, par, w.bf16_inputs)
}

/// Dense SwiGLU: `x: [..., h]`, `gate, up: [i, h]`, `down: [h, i]`; `bf16_inputs` as
/// [`super::Options::bf16_inputs`].
pub fn swiglu<T: Real>(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor, bf16_inputs: bool) -> Result<Tensor, KErr> {
    let h = *x.shape().last().ok_or_else(|| KErr::shape("swiglu of a scalar".into()))?;
    let i = gate.shape().first().copied().unwrap_or(0);
    if gate.shape() != [i, h] || up.shape() != [i, h] || down.shape() != [h, i] {
        return Err(KErr::shape(format!("swiglu weights {:?}, {:?}, {:?} for h = {h}", gate.shape(), up.shape(), down.shape())));
    }
    let w = FfnView {
        gate: WeightView::of(gate, "gate")?,
        up: WeightView::of(up, "up")?,
        down: WeightView::of(down, "down")?,
        inter: i,
        bf16_inputs,
    };
    let out = swiglu_rows(floats::<T>(x, "x")?, h, w, true)?;
    Ok(Tensor::from_parts(x.shape().to_vec(), T::wrap(out)))
}

/// The sizes of an expert FFN (forward or backward) and its (token, slot) pairs per
/// expert: `x [.., h]`, `idx` and `w [.., k]`, `gate` and `up [E, i, h]`, `down [E, h, i]`.
pub(crate) struct Experts {
    pub h: usize,
    pub experts: usize,
    pub inter: usize,
    pub k: usize,
    pub tokens: usize,
    /// Per expert, the flat (token · k + slot) pairs routed to it, in order.
    pub buckets: Vec<Vec<usize>>,
}

impl Experts {
    /// Checks the shapes (`what` names the op) and the indices (each below `E`).
    pub(crate) fn of(what: &str, x: &Tensor, idx: &Tensor, w: &Tensor, [gate, up, down]: [&Tensor; 3]) -> Result<Experts, KErr> {
        let h = *x.shape().last().ok_or_else(|| KErr::shape(format!("{what} of a scalar")))?;
        let (gs, ds) = (gate.shape(), down.shape());
        if gs.len() != 3 || gs[2] != h || up.shape() != gs || ds != [gs[0], h, gs[1]] {
            return Err(KErr::shape(format!("expert weights {gs:?}, {:?}, {ds:?} for h = {h}", up.shape())));
        }
        let (experts, inter) = (gs[0], gs[1]);
        let k = *idx.shape().last().ok_or_else(|| KErr::shape("indices of rank 0".into()))?;
        if idx.shape()[..idx.rank() - 1] != x.shape()[..x.rank() - 1] || w.shape() != idx.shape() {
            return Err(KErr::shape(format!("indices {:?} and weights {:?} for x {:?}", idx.shape(), w.shape(), x.shape())));
        }
        let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); experts];
        for (pair, &ex) in indices(idx, "expert indices")?.iter().enumerate() {
            let ex = usize::try_from(ex)
                .ok()
                .filter(|&u| u < experts)
                .ok_or_else(|| KErr::index(format!("expert index {ex} is out of range for {experts} experts")))?;
            buckets[ex].push(pair);
        }
        Ok(Experts { h, experts, inter, k, tokens: x.numel().checked_div(h).unwrap_or(0), buckets })
    }
}

/// Routed experts: per token, `Σ_j w_j · down_e(silu(gate_e x) · up_e x)` over its `k`
/// (expert, weight) pairs.
///
/// As HF's eager experts: tokens are grouped per expert, each expert's output row is
/// multiplied by its gate weight, and the rows are added into the result in expert-id
/// order (within one expert, in slot order), which is the reference's float order.
/// Experts run in parallel; only the final additions are sequential. `bf16_inputs` as
/// [`super::Options::bf16_inputs`].
pub fn expert_ffn<T: Real>(
    x: &Tensor,
    idx: &Tensor,
    w: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
    bf16_inputs: bool,
) -> Result<Tensor, KErr> {
    let Experts { h, experts, inter, k, tokens, buckets } = Experts::of("expert_ffn", x, idx, w, [gate, up, down])?;
    let (xv, wv) = (floats::<T>(x, "x")?, floats::<T>(w, "weights")?);
    let (gv, uv, dv) = (WeightView::<T>::of(gate, "gate")?, WeightView::<T>::of(up, "up")?, WeightView::<T>::of(down, "down")?);
    let hit: Vec<usize> = (0..experts).filter(|&e| !buckets[e].is_empty()).collect();
    let per_expert = |&e: &usize| -> Result<Vec<T>, KErr> {
        let pairs = &buckets[e];
        let mut xs = Vec::with_capacity(pairs.len() * h);
        for &p in pairs {
            let t = p / k;
            xs.extend_from_slice(&xv[t * h..(t + 1) * h]);
        }
        let (wi, wd) = (inter * h, h * inter);
        let w = FfnView {
            gate: gv.slice(e * wi..(e + 1) * wi),
            up: uv.slice(e * wi..(e + 1) * wi),
            down: dv.slice(e * wd..(e + 1) * wd),
            inter,
            bf16_inputs,
        };
        let mut y = swiglu_rows(&xs, h, w, hit.len() == 1)?;
        for (row, &p) in y.chunks_mut(h.max(1)).zip(pairs) {
            row.iter_mut().for_each(|v| *v = *v * wv[p]);
        }
        Ok(y)
    };
    let ys: Vec<Vec<T>> = hit.par_iter().map(per_expert).collect::<Result<_, _>>()?;
    let mut out = vec![T::ZERO; tokens * h];
    for (&e, y) in hit.iter().zip(&ys) {
        for (row, &p) in y.chunks(h.max(1)).zip(&buckets[e]) {
            let t = p / k;
            out[t * h..(t + 1) * h].iter_mut().zip(row).for_each(|(o, &v)| *o += v);
        }
    }
    Ok(Tensor::from_parts(x.shape().to_vec(), T::wrap(out)))
}

/// A weight as the run holds it, or in its checkpoint's precision: bf16, which
/// [`linear_bf16`] multiplies without widening it whole, or f16 / FP8 from element
/// `offset` on (one expert of a stack), which [`linear_narrow`] widens a block at a time.
#[derive(Clone, Copy)]
enum WeightView<'a, T> {
    Real(&'a [T]),
    Bf16(&'a [u16]),
    Narrow(Narrow<'a>, usize),
}

impl<'a, T: Real> WeightView<'a, T> {
    fn of(t: &'a Tensor, what: &str) -> Result<WeightView<'a, T>, KErr> {
        if let Some(n) = narrow(t) {
            return Ok(WeightView::Narrow(n, 0));
        }
        match t.as_bf16_bits() {
            Some(bits) => Ok(WeightView::Bf16(bits)),
            None => Ok(WeightView::Real(floats::<T>(t, what)?)),
        }
    }

    /// Elements `r` (one expert of a stack).
    fn slice(&self, r: std::ops::Range<usize>) -> WeightView<'a, T> {
        match *self {
            WeightView::Real(v) => WeightView::Real(&v[r]),
            WeightView::Bf16(b) => WeightView::Bf16(&b[r]),
            WeightView::Narrow(n, at) => WeightView::Narrow(n, at + r.start),
        }
    }

    /// `x [m, k] · selfᵀ` with self `[n, k]`, as [`linear`] and [`linear_bf16`].
    fn linear(&self, x: &[T], m: usize, k: usize, n: usize, par: bool, bf16_inputs: bool) -> Result<Vec<T>, KErr> {
        match *self {
            WeightView::Real(w) => linear(x, m, k, w, n, par),
            WeightView::Bf16(w) => linear_bf16(x, m, k, w, n, par, bf16_inputs),
            WeightView::Narrow(w, at) if at % k.max(1) == 0 => linear_narrow(x, m, k, w, at / k.max(1), n, par),
            WeightView::Narrow(..) => Err(KErr::shape(format!("a weight of rows {k} long sliced mid-row"))),
        }
    }
}

/// Mean over the labels not equal to `ignore_index` of `logsumexp(logits) - logit[label]`
/// (max-subtracted, accumulated in `f64`). No counted label gives NaN, as torch's mean
/// over nothing; a counted label outside `0..V` is an error.
pub fn cross_entropy<T: Real>(logits: &Tensor, labels: &Tensor, ignore_index: Option<i64>) -> Result<Tensor, KErr> {
    let logp = label_logprobs::<T>(logits, labels, ignore_index, "cross_entropy")?;
    let count = logp.iter().filter(|l| l.is_some()).count();
    let total: f64 = -logp.iter().flatten().sum::<f64>();
    Ok(Tensor::from_parts(Vec::new(), T::wrap(vec![T::of(total / count as f64)])))
}

/// `log_softmax(logits)[label]` per row, 0 where the label is `ignore_index`
/// ([`dsc_compiler::ir::Op::TokenLogProb`]); the log-sum-exp in f64.
pub fn token_logprob<T: Real>(logits: &Tensor, labels: &Tensor, ignore_index: Option<i64>) -> Result<Tensor, KErr> {
    let logp = label_logprobs::<T>(logits, labels, ignore_index, "token_logprob")?;
    Ok(Tensor::from_parts(labels.shape().to_vec(), T::wrap(logp.into_iter().map(|l| T::of(l.unwrap_or(0.0))).collect())))
}

/// `log p(label)` of every row in f64, `None` where the label is ignored.
fn label_logprobs<T: Real>(logits: &Tensor, labels: &Tensor, ignore_index: Option<i64>, op: &str) -> Result<Vec<Option<f64>>, KErr> {
    let rows = label_rows(logits, labels, ignore_index, op)?;
    let v = *logits.shape().last().expect("label_rows checked the rank");
    let lv = floats::<T>(logits, "logits")?;
    Ok(rows
        .iter()
        .enumerate()
        .map(|(t, lab)| {
            lab.map(|l| {
                let row = &lv[t * v..(t + 1) * v];
                let m = row.iter().fold(f64::NEG_INFINITY, |a, x| a.max(x.to_f64()));
                let lse = m + row.iter().map(|x| (x.to_f64() - m).exp()).sum::<f64>().ln();
                row[l].to_f64() - lse
            })
        })
        .collect())
}

/// Each row's label as a class index, `None` where it is `ignore_index`: labels must be
/// the leading axes of `logits` and in `0..V`, checked before any work.
pub(crate) fn label_rows(logits: &Tensor, labels: &Tensor, ignore_index: Option<i64>, op: &str) -> Result<Vec<Option<usize>>, KErr> {
    let v = *logits.shape().last().ok_or_else(|| KErr::shape(format!("{op} of a scalar")))?;
    if labels.shape() != &logits.shape()[..logits.rank() - 1] {
        return Err(KErr::shape(format!("labels {:?} for logits {:?}", labels.shape(), logits.shape())));
    }
    indices(labels, "labels")?
        .into_iter()
        .map(|lab| {
            if Some(lab) == ignore_index {
                return Ok(None);
            }
            usize::try_from(lab)
                .ok()
                .filter(|&u| u < v)
                .map(Some)
                .ok_or_else(|| KErr::index(format!("label {lab} is out of range for {v} classes")))
        })
        .collect()
}

pub mod grad;

#[cfg(test)]
mod grad_tests;
#[cfg(test)]
mod tests;
