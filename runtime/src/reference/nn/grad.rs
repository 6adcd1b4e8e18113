//! The backward kernels of the composites: the vector-Jacobian products the autodiff
//! pass emits (`Op::WeightGrad`, `Op::RmsNormGrad`, `Op::AttentionGrad`,
//! `Op::SwiGluGrad`, `Op::ExpertFfnGrad`, `Op::MoeRouteGrad`, `Op::CrossEntropyGrad`).
//!
//! Each is the exact derivative of its forward in [`super`] (the same float order where
//! it matters: the same scores, the same softmax, the same `1e-20` in the router's
//! normalisation), so a finite difference of the forward checks it (`grad_tests.rs`).
//! Statistics (row dot products, norms, softmax sums, sums over tokens that are not a
//! product) accumulate in `f64`; the products go through [`gemm()`] as the forward's do.

use super::{attention_args, floats, label_rows, AttentionArgs, AttentionSpec, Experts, Ffn};
use crate::reference::elementwise::PAR_MIN;
use crate::reference::layout::indices;
use crate::reference::linalg::{gemm, gemm_acc, linear, Mat};
use crate::reference::real::Real;
use crate::reference::tensor::{numel, Tensor};
use crate::reference::KernelError as KErr;
use dsc_compiler::ir::{Routing, Scoring};
use rayon::prelude::*;

/// `dw[n, k] = Σ_t dy[t, n] · x[t, k]` over every leading (token) axis of `dy: [T.., n]`
/// and `x: [T.., k]` (the weight gradient of `Op::MatMul`).
pub fn weight_grad<T: Real>(dy: &Tensor, x: &Tensor) -> Result<Tensor, KErr> {
    let (ds, xs) = (dy.shape(), x.shape());
    if ds.is_empty() || xs.len() != ds.len() || ds[..ds.len() - 1] != xs[..xs.len() - 1] {
        return Err(KErr::shape(format!("weight_grad of dy {ds:?} and x {xs:?}: equal leading axes needed")));
    }
    let (n, k, m) = (ds[ds.len() - 1], xs[xs.len() - 1], numel(&ds[..ds.len() - 1]));
    let mut dw = vec![T::ZERO; n * k];
    weight_grad_rows(floats::<T>(dy, "dy")?, n, floats::<T>(x, "x")?, k, m, &mut dw, true);
    Ok(Tensor::from_parts(vec![n, k], T::wrap(dw)))
}

/// `dst[n, k] = dyᵀ · x` for row-major `dy: [m, n]`, `x: [m, k]`.
fn weight_grad_rows<T: Real>(dy: &[T], n: usize, x: &[T], k: usize, m: usize, dst: &mut [T], par: bool) {
    // dyᵀ as an n×m view of [m, n].
    gemm(n, k, m, dst, Mat { data: dy, offset: 0, rs: 1, cs: n }, Mat::rows(x, 0, k), par);
}

/// Rows per parallel task for row-wise kernels over rows of `d` elements.
fn rows_per_task(d: usize) -> usize {
    (PAR_MIN / 4 / d.max(1)).max(1)
}

/// The backward of [`super::rms_norm`], `y = (x·r)·g` with `r = 1/sqrt(T(mean(x²)) + eps)`
/// (the mean in `f64`, as the forward): `dx = r·(dy·g) − x·r³·mean(dy·g·x)` and
/// `dgain = Σ_tokens dy·(x·r)`, the means and the token sum in `f64`.
pub fn rms_norm_grad<T: Real>(x: &Tensor, gain: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor), KErr> {
    let d = *x.shape().last().ok_or_else(|| KErr::shape("rms_norm_grad of a scalar".into()))?;
    let (xv, g, dyv) = (floats::<T>(x, "x")?, floats::<T>(gain, "gain")?, floats::<T>(dy, "dy")?);
    if g.len() != d || dy.shape() != x.shape() {
        return Err(KErr::shape(format!("rms_norm_grad of x {:?}, gain {:?}, dy {:?}", x.shape(), gain.shape(), dy.shape())));
    }
    let mut dx = vec![T::ZERO; xv.len()];
    if d == 0 {
        return Ok((Tensor::from_parts(x.shape().to_vec(), T::wrap(dx)), Tensor::from_parts(vec![0], T::wrap(vec![]))));
    }
    let eps = T::of(eps);
    let per = rows_per_task(d);
    // Each task: its rows' dx, and its partial dgain in f64; partials add in task order
    // so the result does not depend on scheduling.
    let task = |(c, chunk): (usize, &mut [T])| -> Vec<f64> {
        let mut acc = vec![0.0f64; d];
        for (lr, dxr) in chunk.chunks_mut(d).enumerate() {
            let r = c * per + lr;
            let (xr, dr) = (&xv[r * d..(r + 1) * d], &dyv[r * d..(r + 1) * d]);
            let ms = xr.iter().map(|&a| a.to_f64() * a.to_f64()).sum::<f64>() / d as f64;
            let inv = T::ONE / (T::of(ms) + eps).sqrt();
            let mean = xr.iter().zip(dr).zip(g).map(|((&a, &dy), &w)| (dy * w).to_f64() * a.to_f64()).sum::<f64>() / d as f64;
            let k = inv * inv * inv * T::of(mean);
            for (j, o) in dxr.iter_mut().enumerate() {
                *o = inv * (dr[j] * g[j]) - xr[j] * k;
                acc[j] += (dr[j] * (xr[j] * inv)).to_f64();
            }
        }
        acc
    };
    let partials: Vec<Vec<f64>> = if xv.len() >= PAR_MIN {
        dx.par_chunks_mut(per * d).enumerate().map(task).collect()
    } else {
        dx.chunks_mut(per * d).enumerate().map(task).collect()
    };
    let mut dg = vec![0.0f64; d];
    for p in &partials {
        dg.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    let dg = dg.into_iter().map(T::of).collect();
    Ok((Tensor::from_parts(x.shape().to_vec(), T::wrap(dx)), Tensor::from_parts(vec![d], T::wrap(dg))))
}

/// The backward of [`super::attention`], flash-style: per query row the probabilities
/// `p = exp((q·k)·scale + mask − lse)` are recomputed from the forward's log-sum-exp
/// (with the forward's float order for the scores), then `dv = pᵀ·do`, `dp = do·vᵀ`,
/// `ds = p·(dp − rowsum(do·o))` (the row sum in `f64`), `dq = ds·k·scale`,
/// `dk = dsᵀ·q·scale`. A row with `lse = -inf` saw no key and contributes nothing; keys
/// past the causal diagonal have `p = 0`; the mask takes no gradient.
///
/// One task per (batch, kv head): it walks the query heads of its group, so the kv
/// head's `dk`, `dv` sum over them without synchronisation. Query rows go in blocks of
/// 128 through two `[128, sk]` buffers (scores → p, dp → ds) allocated once per task; a
/// causal block stops at the last key its last row sees.
#[allow(clippy::too_many_arguments)]
pub fn attention_grad<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    spec: AttentionSpec,
) -> Result<(Tensor, Tensor, Tensor), KErr> {
    let AttentionSpec { heads, kv_heads, .. } = spec;
    let AttentionArgs { b, sq, sk, dk, dv, q: qd, k: kd, v: vd, mask: md } = attention_args::<T>("attention_grad", q, k, v, mask, spec)?;
    if out.shape() != [b, sq, heads, dv] || dout.shape() != [b, sq, heads, dv] || lse.shape() != [b, sq, heads] {
        return Err(KErr::shape(format!(
            "attention_grad: out {:?}, dout {:?} must be [{b}, {sq}, {heads}, {dv}] and lse {:?} [{b}, {sq}, {heads}]",
            out.shape(),
            dout.shape(),
            lse.shape()
        )));
    }
    let (od, ld, dod) = (floats::<T>(out, "out")?, floats::<T>(lse, "lse")?, floats::<T>(dout, "dout")?);
    let group = heads / kv_heads;
    let scale = T::of(spec.scale);
    let tasks = b * kv_heads;
    // Few tasks (one kv head, batch 1): let each product use the threads instead.
    let par = tasks < rayon::current_num_threads();
    // Query rows per block: the score and dp buffers are [QB, sk], not [sq, sk].
    const QB: usize = 128;
    let one = |task: usize| -> (Vec<T>, Vec<T>, Vec<T>) {
        let (bi, kh) = (task / kv_heads, task % kv_heads);
        let mut p = vec![T::ZERO; sq.min(QB) * sk];
        let mut ds = vec![T::ZERO; sq.min(QB) * sk];
        let mut dq = vec![T::ZERO; group * sq * dk];
        let mut dkt = vec![T::ZERO; sk * dk];
        let mut dvt = vec![T::ZERO; sk * dv];
        let (k_at, v_at) = ((bi * sk * kv_heads + kh) * dk, (bi * sk * kv_heads + kh) * dv);
        // kᵀ as dk×sk and vᵀ as dv×sk views of [b, sk, kv_heads, d]; k as sk×dk.
        let kt = Mat { data: kd, offset: k_at, rs: 1, cs: kv_heads * dk };
        let vt = Mat { data: vd, offset: v_at, rs: 1, cs: kv_heads * dv };
        let km = Mat { data: kd, offset: k_at, rs: kv_heads * dk, cs: 1 };
        for g in 0..group {
            let h = kh * group + g;
            for i0 in (0..sq).step_by(QB) {
                let rows = QB.min(sq - i0);
                // Keys the block's last row sees (causal): later keys have p = 0 throughout.
                let w = if spec.causal { (sk + i0 + rows).saturating_sub(sq).min(sk) } else { sk };
                if w == 0 {
                    continue;
                }
                let qm = Mat { data: qd, offset: ((bi * sq + i0) * heads + h) * dk, rs: heads * dk, cs: 1 };
                let dom = Mat { data: dod, offset: ((bi * sq + i0) * heads + h) * dv, rs: heads * dv, cs: 1 };
                let (pb, db) = (&mut p[..rows * w], &mut ds[..rows * w]);
                gemm(rows, w, dk, pb, qm, kt, par);
                gemm(rows, w, dv, db, dom, vt, par);
                for ii in 0..rows {
                    let i = i0 + ii;
                    let row = (bi * sq + i) * heads + h;
                    let (pr, dr) = (&mut pb[ii * w..(ii + 1) * w], &mut db[ii * w..(ii + 1) * w]);
                    let l = ld[row];
                    if l == T::NEG_INF || l.is_nan() {
                        pr.fill(T::ZERO);
                        dr.fill(T::ZERO);
                        continue;
                    }
                    let (o, d_o) = (&od[row * dv..(row + 1) * dv], &dod[row * dv..(row + 1) * dv]);
                    let delta = T::of(o.iter().zip(d_o).map(|(&a, &b)| a.to_f64() * b.to_f64()).sum::<f64>());
                    let visible = if spec.causal { (sk + i + 1).saturating_sub(sq).min(sk) } else { sk };
                    for j in 0..w {
                        let pj = if j >= visible {
                            T::ZERO
                        } else {
                            let sc = pr[j] * scale;
                            let sc = match md {
                                Some(m) => sc + m[(bi * sq + i) * sk + j],
                                None => sc,
                            };
                            (sc - l).exp()
                        };
                        pr[j] = pj;
                        dr[j] = pj * (dr[j] - delta);
                    }
                }
                // dv += pᵀ·do, dk += dsᵀ·q·scale (pᵀ, dsᵀ as w×rows views), dq = ds·k·scale.
                gemm_acc(w, dv, rows, &mut dvt[..w * dv], Mat { data: pb, offset: 0, rs: 1, cs: w }, dom, T::ONE, par);
                gemm_acc(w, dk, rows, &mut dkt[..w * dk], Mat { data: db, offset: 0, rs: 1, cs: w }, qm, scale, par);
                let at = (g * sq + i0) * dk;
                gemm_acc(rows, dk, w, &mut dq[at..at + rows * dk], Mat::rows(db, 0, w), km, scale, par);
            }
        }
        (dq, dkt, dvt)
    };
    let per_task: Vec<(Vec<T>, Vec<T>, Vec<T>)> =
        if tasks > 1 { (0..tasks).into_par_iter().map(one).collect() } else { (0..tasks).map(one).collect() };
    let mut dq = vec![T::ZERO; qd.len()];
    let mut dkk = vec![T::ZERO; kd.len()];
    let mut dvv = vec![T::ZERO; vd.len()];
    for (task, (tq, tk, tv)) in per_task.iter().enumerate() {
        let (bi, kh) = (task / kv_heads, task % kv_heads);
        for g in 0..group {
            let h = kh * group + g;
            for i in 0..sq {
                let at = ((bi * sq + i) * heads + h) * dk;
                dq[at..at + dk].copy_from_slice(&tq[(g * sq + i) * dk..(g * sq + i + 1) * dk]);
            }
        }
        for j in 0..sk {
            let at = (bi * sk + j) * kv_heads + kh;
            dkk[at * dk..(at + 1) * dk].copy_from_slice(&tk[j * dk..(j + 1) * dk]);
            dvv[at * dv..(at + 1) * dv].copy_from_slice(&tv[j * dv..(j + 1) * dv]);
        }
    }
    Ok((
        Tensor::from_parts(q.shape().to_vec(), T::wrap(dq)),
        Tensor::from_parts(k.shape().to_vec(), T::wrap(dkk)),
        Tensor::from_parts(v.shape().to_vec(), T::wrap(dvv)),
    ))
}

/// The SwiGLU backward for the rows of `x: [m, h]` with output cotangent `dy: [m, h]`,
/// each row's cotangent multiplied by `row_w[r]` when given (an expert's gate weight).
/// Writes `dgate`, `dup` (`[inter, h]`) and `ddown` (`[h, inter]`); returns `dx` and, with
/// `row_w`, each row's `dy · ffn(x)` (the gate weight's gradient, in `f64`, rounded).
///
/// `g = x·gateᵀ`, `u = x·upᵀ` are recomputed; `a = silu(g)·u`;
/// `da = dy·down` (so `⟨dy, ffn(x)⟩ = ⟨da, a⟩`); `ddown = dyᵀ·a`;
/// `dg = da·u·silu'(g)`, `du = da·silu(g)`; `dx = dg·gate + du·up`;
/// `dgate = dgᵀ·x`, `dup = duᵀ·x`.
#[allow(clippy::too_many_arguments)]
fn swiglu_rows_grad<T: Real>(
    x: &[T],
    dy: &[T],
    h: usize,
    w: Ffn<T>,
    row_w: Option<&[T]>,
    dgate: &mut [T],
    dup: &mut [T],
    ddown: &mut [T],
    par: bool,
) -> Result<(Vec<T>, Vec<T>), KErr> {
    let (m, i) = (x.len().checked_div(h).unwrap_or(0), w.inter);
    let mut g = linear(x, m, h, w.gate, i, par)?;
    let mut u = linear(x, m, h, w.up, i, par)?;
    let mut da = vec![T::ZERO; m * i];
    gemm(m, i, h, &mut da, Mat::rows(dy, 0, h), Mat::rows(w.down, 0, i), par);
    let mut a: Vec<T> = g.iter().zip(&u).map(|(&g, &u)| g.silu() * u).collect();
    let mut dw = Vec::new();
    if let Some(rw) = row_w {
        // The weight's gradient from the unweighted da, then weight da and a (for ddown).
        dw = da
            .chunks(i.max(1))
            .zip(a.chunks(i.max(1)))
            .map(|(d, a)| T::of(d.iter().zip(a).map(|(&d, &a)| d.to_f64() * a.to_f64()).sum::<f64>()))
            .collect();
        dw.resize(m, T::ZERO); // i = 0: an empty expert has output 0
        for (r, &s) in rw.iter().enumerate().take(m) {
            da[r * i..(r + 1) * i].iter_mut().for_each(|v| *v = *v * s);
            a[r * i..(r + 1) * i].iter_mut().for_each(|v| *v = *v * s);
        }
    }
    weight_grad_rows(dy, h, &a, i, m, ddown, par);
    drop(a);
    // g → dg, u → du in place.
    let step = |((g, u), &d): ((&mut T, &mut T), &T)| {
        let (gv, uv) = (*g, *u);
        let s = gv.sigmoid();
        let silu = gv * s;
        *g = d * uv * (s * (T::ONE + gv * (T::ONE - s)));
        *u = d * silu;
    };
    if par && m * i >= PAR_MIN {
        g.par_iter_mut().zip(u.par_iter_mut()).zip(da.par_iter()).for_each(step);
    } else {
        g.iter_mut().zip(u.iter_mut()).zip(da.iter()).for_each(step);
    }
    drop(da);
    let mut dx = vec![T::ZERO; m * h];
    gemm(m, h, i, &mut dx, Mat::rows(&g, 0, i), Mat::rows(w.gate, 0, h), par);
    gemm_acc(m, h, i, &mut dx, Mat::rows(&u, 0, i), Mat::rows(w.up, 0, h), T::ONE, par);
    weight_grad_rows(&g, i, x, h, m, dgate, par);
    weight_grad_rows(&u, i, x, h, m, dup, par);
    Ok((dx, dw))
}

/// The backward of [`super::swiglu`]: `(dx, dgate, dup, ddown)` (see `swiglu_rows_grad`).
pub fn swiglu_grad<T: Real>(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor, dy: &Tensor) -> Result<[Tensor; 4], KErr> {
    let h = *x.shape().last().ok_or_else(|| KErr::shape("swiglu_grad of a scalar".into()))?;
    let i = gate.shape().first().copied().unwrap_or(0);
    if gate.shape() != [i, h] || up.shape() != [i, h] || down.shape() != [h, i] || dy.shape() != x.shape() {
        return Err(KErr::shape(format!(
            "swiglu_grad weights {:?}, {:?}, {:?} and dy {:?} for x {:?}",
            gate.shape(),
            up.shape(),
            down.shape(),
            dy.shape(),
            x.shape()
        )));
    }
    let w = Ffn { gate: floats(gate, "gate")?, up: floats(up, "up")?, down: floats(down, "down")?, inter: i };
    let (mut dg, mut du, mut dd) = (vec![T::ZERO; i * h], vec![T::ZERO; i * h], vec![T::ZERO; h * i]);
    let (dx, _) = swiglu_rows_grad(floats::<T>(x, "x")?, floats::<T>(dy, "dy")?, h, w, None, &mut dg, &mut du, &mut dd, true)?;
    Ok([
        Tensor::from_parts(x.shape().to_vec(), T::wrap(dx)),
        Tensor::from_parts(vec![i, h], T::wrap(dg)),
        Tensor::from_parts(vec![i, h], T::wrap(du)),
        Tensor::from_parts(vec![h, i], T::wrap(dd)),
    ])
}

/// The backward of [`super::expert_ffn`]: `(dx, dweights, dgate, dup, ddown)`. Per
/// expert (in parallel), the (token, slot) pairs routed to it are gathered as the
/// forward does; `dweights[pair] = dy_t · ffn_e(x_t)` and the SwiGLU backward of
/// `w_pair·dy_t` writes that expert's weight gradients in place. `dx` adds the experts'
/// rows in expert-id order (slot order within one), the forward's order. Experts no
/// token chose keep zero gradients.
pub fn expert_ffn_grad<T: Real>(
    x: &Tensor,
    idx: &Tensor,
    w: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
    dy: &Tensor,
) -> Result<[Tensor; 5], KErr> {
    let Experts { h, experts, inter, k, tokens, buckets } = Experts::of("expert_ffn_grad", x, idx, w, [gate, up, down])?;
    if dy.shape() != x.shape() {
        return Err(KErr::shape(format!("dy {:?} for x {:?}", dy.shape(), x.shape())));
    }
    let (gs, ds) = (gate.shape(), down.shape());
    let (xv, wv, dyv) = (floats::<T>(x, "x")?, floats::<T>(w, "weights")?, floats::<T>(dy, "dy")?);
    let (gv, uv, dv) = (floats::<T>(gate, "gate")?, floats::<T>(up, "up")?, floats::<T>(down, "down")?);
    let wi = inter * h;
    let (mut dgate, mut dup, mut ddown) = (vec![T::ZERO; experts * wi], vec![T::ZERO; experts * wi], vec![T::ZERO; experts * wi]);
    let mut dx = vec![T::ZERO; tokens * h];
    let mut dw = vec![T::ZERO; w.numel()];
    let wrap = |dx: Vec<T>, dw: Vec<T>, dg: Vec<T>, du: Vec<T>, dd: Vec<T>| {
        [
            Tensor::from_parts(x.shape().to_vec(), T::wrap(dx)),
            Tensor::from_parts(w.shape().to_vec(), T::wrap(dw)),
            Tensor::from_parts(gs.to_vec(), T::wrap(dg)),
            Tensor::from_parts(gs.to_vec(), T::wrap(du)),
            Tensor::from_parts(ds.to_vec(), T::wrap(dd)),
        ]
    };
    if wi == 0 {
        // Every expert's output is empty or zero: no gradient anywhere.
        return Ok(wrap(dx, dw, dgate, dup, ddown));
    }
    let hit = buckets.iter().filter(|b| !b.is_empty()).count();
    let par = hit < rayon::current_num_threads();
    let per_expert = |(e, ((dg, du), dd)): (usize, ((&mut [T], &mut [T]), &mut [T]))| -> Result<Option<(Vec<T>, Vec<T>)>, KErr> {
        let pairs = &buckets[e];
        if pairs.is_empty() {
            return Ok(None);
        }
        let (mut xs, mut dys) = (Vec::with_capacity(pairs.len() * h), Vec::with_capacity(pairs.len() * h));
        for &p in pairs {
            let t = p / k;
            xs.extend_from_slice(&xv[t * h..(t + 1) * h]);
            dys.extend_from_slice(&dyv[t * h..(t + 1) * h]);
        }
        let rw: Vec<T> = pairs.iter().map(|&p| wv[p]).collect();
        let f = Ffn { gate: &gv[e * wi..(e + 1) * wi], up: &uv[e * wi..(e + 1) * wi], down: &dv[e * wi..(e + 1) * wi], inter };
        swiglu_rows_grad(&xs, &dys, h, f, Some(&rw), dg, du, dd, par).map(Some)
    };
    let per: Vec<Option<(Vec<T>, Vec<T>)>> = dgate
        .par_chunks_mut(wi)
        .zip(dup.par_chunks_mut(wi))
        .zip(ddown.par_chunks_mut(wi))
        .enumerate()
        .map(per_expert)
        .collect::<Result<_, _>>()?;
    for (e, r) in per.iter().enumerate() {
        let Some((dxs, dws)) = r else { continue };
        for ((row, &p), &g) in dxs.chunks(h.max(1)).zip(&buckets[e]).zip(dws) {
            let t = p / k;
            dx[t * h..(t + 1) * h].iter_mut().zip(row).for_each(|(o, &v)| *o += v);
            dw[p] = g;
        }
    }
    Ok(wrap(dx, dw, dgate, dup, ddown))
}

/// The backward of [`super::moe_route`] through its weights, with the indices fixed:
/// `w_j = scale·c_j / Z`, `c_j = s[e_j]`, `Z = Σ_j c_j + 1e-20` when normalising (the
/// forward's sum, in the run's precision) else 1. So
/// `ds[e_j] += scale·(dw_j − Σ_i dw_i·c_i / Z) / Z` (or `scale·dw_j`), then through the
/// score function: softmax `dl = s·(ds − Σ ds·s)`, sigmoid `dl = ds·s·(1 − s)`. The
/// sums are in `f64`; the selection bias takes no gradient.
pub fn moe_route_grad<T: Real>(logits: &Tensor, idx: &Tensor, dw: &Tensor, r: &Routing) -> Result<Tensor, KErr> {
    let e = *logits.shape().last().ok_or_else(|| KErr::shape("moe_route_grad of a scalar".into()))?;
    let k = r.top_k as usize;
    let mut want = logits.shape().to_vec();
    *want.last_mut().expect("rank >= 1") = k;
    if idx.shape() != want || dw.shape() != want {
        return Err(KErr::shape(format!("indices {:?} and dweights {:?} must be {want:?}", idx.shape(), dw.shape())));
    }
    let (lv, dwv) = (floats::<T>(logits, "logits")?, floats::<T>(dw, "dweights")?);
    let ids = indices(idx, "expert indices")?;
    let ids: Vec<usize> = ids
        .iter()
        .map(|&x| {
            usize::try_from(x)
                .ok()
                .filter(|&u| u < e)
                .ok_or_else(|| KErr::index(format!("expert index {x} is out of range for {e} experts")))
        })
        .collect::<Result<_, _>>()?;
    let (scale, eps) = (r.scale.get(), T::of(1e-20));
    let mut out = vec![T::ZERO; lv.len()];
    let row = |(s, ds): &mut (Vec<T>, Vec<f64>), (t, o): (usize, &mut [T])| {
        super::route_scores(&lv[t * e..(t + 1) * e], s, r.scoring);
        ds.fill(0.0);
        let (sel, dwt) = (&ids[t * k..(t + 1) * k], &dwv[t * k..(t + 1) * k]);
        if r.normalize {
            let z = (sel.iter().fold(T::ZERO, |a, &j| a + s[j]) + eps).to_f64();
            let dot = sel.iter().zip(dwt).map(|(&j, &d)| d.to_f64() * s[j].to_f64()).sum::<f64>() / z;
            for (&j, &d) in sel.iter().zip(dwt) {
                ds[j] += scale * (d.to_f64() - dot) / z;
            }
        } else {
            for (&j, &d) in sel.iter().zip(dwt) {
                ds[j] += scale * d.to_f64();
            }
        }
        match r.scoring {
            Scoring::Softmax => {
                let dot = ds.iter().zip(s.iter()).map(|(&d, &s)| d * s.to_f64()).sum::<f64>();
                for ((o, &d), &s) in o.iter_mut().zip(ds.iter()).zip(s.iter()) {
                    *o = T::of(s.to_f64() * (d - dot));
                }
            }
            Scoring::Sigmoid => {
                for ((o, &d), &s) in o.iter_mut().zip(ds.iter()).zip(s.iter()) {
                    let s = s.to_f64();
                    *o = T::of(d * s * (1.0 - s));
                }
            }
        }
    };
    if e > 0 {
        let init = || (vec![T::ZERO; e], vec![0.0f64; e]);
        if lv.len() >= PAR_MIN {
            out.par_chunks_mut(e).enumerate().for_each_init(init, row);
        } else {
            let mut scratch = init();
            out.chunks_mut(e).enumerate().for_each(|x| row(&mut scratch, x));
        }
    }
    Ok(Tensor::from_parts(logits.shape().to_vec(), T::wrap(out)))
}

/// The backward of [`super::cross_entropy`]: on a row whose label counts,
/// `(softmax(logits) − onehot(label)) · dloss / count` (the softmax max-subtracted, in
/// `f64`); 0 on ignored rows (and everywhere when no label counts, where the forward's
/// mean is NaN). A counted label outside `0..V` is an error, as in the forward.
pub fn cross_entropy_grad<T: Real>(logits: &Tensor, labels: &Tensor, dloss: &Tensor, ignore_index: Option<i64>) -> Result<Tensor, KErr> {
    let ls = label_rows(logits, labels, ignore_index, "cross_entropy_grad")?;
    let dl = match floats::<T>(dloss, "dloss")? {
        [d] => d.to_f64(),
        _ => return Err(KErr::shape(format!("dloss must be a scalar, got {:?}", dloss.shape()))),
    };
    let count = ls.iter().filter(|l| l.is_some()).count();
    let coef = if count > 0 { dl / count as f64 } else { 0.0 };
    // d(−log p_label)/dlogits = softmax − onehot, times dloss / count on every row.
    softmax_rows::<T>(logits, &ls, |_| -coef)
}

/// The backward of [`super::token_logprob`]: `dlogits = (onehot(label) − softmax) · dy`
/// per row, 0 on ignored rows.
pub fn token_logprob_grad<T: Real>(logits: &Tensor, labels: &Tensor, dy: &Tensor, ignore_index: Option<i64>) -> Result<Tensor, KErr> {
    let ls = label_rows(logits, labels, ignore_index, "token_logprob_grad")?;
    let dy = floats::<T>(dy, "dy")?;
    if dy.len() != ls.len() {
        return Err(KErr::shape(format!("dy has {} values for {} rows", dy.len(), ls.len())));
    }
    softmax_rows::<T>(logits, &ls, |t| dy[t].to_f64())
}

/// `(onehot(label) − softmax(row)) · coef(row)` for every row with a label, 0 elsewhere:
/// the gradient of `coef · log p_label`, which both label losses are.
fn softmax_rows<T: Real>(logits: &Tensor, ls: &[Option<usize>], coef: impl Fn(usize) -> f64 + Sync) -> Result<Tensor, KErr> {
    let v = *logits.shape().last().ok_or_else(|| KErr::shape("label gradient of a scalar".into()))?;
    let lv = floats::<T>(logits, "logits")?;
    let mut out = vec![T::ZERO; lv.len()];
    let row = |(t, o): (usize, &mut [T])| {
        let Some(lab) = ls[t] else { return };
        let c = coef(t);
        let x = &lv[t * v..(t + 1) * v];
        let m = x.iter().fold(f64::NEG_INFINITY, |a, x| a.max(x.to_f64()));
        let sum = x.iter().map(|x| (x.to_f64() - m).exp()).sum::<f64>();
        for (j, (o, &xj)) in o.iter_mut().zip(x).enumerate() {
            let p = (xj.to_f64() - m).exp() / sum;
            *o = T::of((if j == lab { 1.0 } else { 0.0 } - p) * c);
        }
    };
    if v > 0 {
        if lv.len() >= PAR_MIN {
            out.par_chunks_mut(v).enumerate().for_each(row);
        } else {
            out.chunks_mut(v).enumerate().for_each(row);
        }
    }
    Ok(Tensor::from_parts(logits.shape().to_vec(), T::wrap(out)))
}
