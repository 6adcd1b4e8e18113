//! Kernels that move elements without arithmetic (permute, slice, concat, gather,
//! scatter-add, top-k) and reductions along one axis.
//!
//! Each is generic over [`Elem`], so one implementation serves floats, integers and
//! booleans; `with_elem!` picks the instantiation from a tensor's data. Axis ops view a
//! tensor as `[outer, n, inner]` around the axis, which keeps every loop contiguous in
//! its innermost dimension.

use super::real::{desc_then_index, Elem, Real};
use super::tensor::{numel, Data, Tensor};
use super::KernelError as KErr;
use dsc_compiler::ir::ReduceOp;
use rayon::prelude::*;

/// Run `$body` with the type alias `$E` set to the element type of `$data`.
macro_rules! with_elem {
    ($data:expr, $E:ident => $body:expr) => {
        match $data {
            Data::F32(_) => {
                type $E = f32;
                $body
            }
            Data::F64(_) => {
                type $E = f64;
                $body
            }
            Data::I32(_) => {
                type $E = i32;
                $body
            }
            Data::I64(_) => {
                type $E = i64;
                $body
            }
            Data::Bool(_) => {
                type $E = bool;
                $body
            }
            Data::Bf16(_) => {
                type $E = u16;
                $body
            }
            // The interpreter widens them before any op that moves elements.
            Data::F16(_) | Data::F8(_) => return Err(KErr::dtype(format!("{} data cannot be moved as it is", $data.kind()))),
        }
    };
}

/// `[outer, n, inner]` around `axis`.
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (numel(&shape[..axis]), shape[axis], numel(&shape[axis + 1..]))
}

fn view<E: Elem>(t: &Tensor) -> Result<&[E], KErr> {
    E::view(t.data()).ok_or_else(|| KErr::dtype(format!("expected a tensor like its peers, got {}", t.data().kind())))
}

/// Index tensors as `i64`, whichever integer type they hold.
pub fn indices(t: &Tensor, what: &str) -> Result<Vec<i64>, KErr> {
    t.to_i64_vec().ok_or_else(|| KErr::dtype(format!("{what} must be integers, got {}", t.data().kind())))
}

/// Output axis `i` is input axis `perm[i]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor, KErr> {
    let rank = x.rank();
    let mut seen = vec![false; rank];
    if perm.len() != rank || !perm.iter().all(|&p| p < rank && !std::mem::replace(&mut seen[p], true)) {
        return Err(KErr::shape(format!("perm {perm:?} is not a permutation of 0..{rank}")));
    }
    let shape = x.shape();
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    // Axes of more than one element in the same order: the elements do not move (a
    // position-major cache read batch-major at batch 1), so the data is copied whole.
    let moved: Vec<usize> = perm.iter().copied().filter(|&p| shape[p] != 1).collect();
    if moved.windows(2).all(|w| w[0] < w[1]) {
        return Ok(Tensor::from_parts(out_shape, x.data().clone()));
    }
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * shape[i + 1];
    }
    // The input stride of each output axis.
    let st: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let data = with_elem!(x.data(), E => E::wrap(permute_impl::<E>(view(x)?, &out_shape, &st)));
    Ok(Tensor::from_parts(out_shape, data))
}

fn permute_impl<E: Elem>(x: &[E], out_shape: &[usize], st: &[usize]) -> Vec<E> {
    let total = numel(out_shape);
    let Some(&inner) = out_shape.last() else { return x.to_vec() };
    if total == 0 {
        return Vec::new();
    }
    let rank = out_shape.len();
    let inner_st = st[rank - 1];
    let row = |r: usize, out: &mut [E]| {
        let (mut rem, mut base) = (r, 0);
        for ax in (0..rank - 1).rev() {
            base += (rem % out_shape[ax]) * st[ax];
            rem /= out_shape[ax];
        }
        if inner_st == 1 {
            // The last axis stays last (a cache's [c, b, d] read as [b, c, d]): rows move whole.
            out.copy_from_slice(&x[base..base + out.len()]);
        } else {
            for (j, o) in out.iter_mut().enumerate() {
                *o = x[base + j * inner_st];
            }
        }
    };
    let mut out = vec![x[0]; total];
    if total >= super::elementwise::PAR_MIN {
        out.par_chunks_mut(inner).enumerate().for_each(|(r, c)| row(r, c));
    } else {
        out.chunks_mut(inner).enumerate().for_each(|(r, c)| row(r, c));
    }
    out
}

/// `x` repeated up to `shape` (numpy's `broadcast_to`): aligned at the right, each axis
/// of `x` is either `shape`'s or 1. The copy reads `x` at stride 0 along the repeated
/// axes, the gather [`permute`] already does with other strides.
pub fn broadcast(x: &Tensor, shape: &[usize]) -> Result<Tensor, KErr> {
    let xs = x.shape();
    let fits = shape.len() >= xs.len() && xs.iter().zip(&shape[shape.len() - xs.len()..]).all(|(&d, &o)| d == o || d == 1);
    if !fits {
        return Err(KErr::shape(format!("cannot broadcast {xs:?} to {shape:?}")));
    }
    let off = shape.len() - xs.len();
    let mut st = vec![0usize; shape.len()];
    let mut stride = 1;
    for i in (0..xs.len()).rev() {
        // A repeated axis (size 1 in x, more in the output) is read at stride 0.
        st[off + i] = if xs[i] == 1 { 0 } else { stride };
        stride *= xs[i];
    }
    let data = with_elem!(x.data(), E => E::wrap(permute_impl::<E>(view(x)?, shape, &st)));
    Ok(Tensor::from_parts(shape.to_vec(), data))
}

/// Elements `start .. start+len` along `axis` (bounds already checked by the caller).
pub fn slice(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor, KErr> {
    let (outer, n, inner) = split_at_axis(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    let data = with_elem!(x.data(), E => {
        let v = E::view(x.data()).expect("dispatched on this kind");
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let base = (o * n + start) * inner;
            out.extend_from_slice(&v[base..base + len * inner]);
        }
        E::wrap(out)
    });
    Ok(Tensor::from_parts(shape, data))
}

/// Join tensors of one kind and rank, equal off `axis`, along `axis`.
pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor, KErr> {
    let first = xs.first().ok_or_else(|| KErr::shape("concat of nothing".into()))?;
    let rank = first.rank();
    if axis >= rank {
        return Err(KErr::shape(format!("axis {axis} out of range for rank {rank}")));
    }
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for x in xs {
        let ok = x.rank() == rank && (0..rank).all(|i| i == axis || x.shape()[i] == first.shape()[i]);
        if !ok {
            return Err(KErr::shape(format!("cannot join {:?} to {:?} along axis {axis}", x.shape(), first.shape())));
        }
        shape[axis] += x.shape()[axis];
    }
    let (outer, _, inner) = split_at_axis(first.shape(), axis);
    let data = with_elem!(first.data(), E => {
        let parts = xs.iter().map(|x| view::<E>(x)).collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(numel(&shape));
        for o in 0..outer {
            for (p, x) in parts.iter().zip(xs) {
                let chunk = x.shape()[axis] * inner;
                out.extend_from_slice(&p[o * chunk..(o + 1) * chunk]);
            }
        }
        E::wrap(out)
    });
    Ok(Tensor::from_parts(shape, data))
}

/// [`concat`] onto `first`, reusing its buffer when nothing of `first` comes after the
/// joined part (every axis before `axis` has length 1: a position-major KV cache
/// appended along its position axis): a decode step's append then copies only the new
/// entries, into the buffer's spare room, which grows by doubling. Otherwise, or when
/// the element types differ, as [`concat`].
pub fn concat_onto(first: Tensor, rest: &[&Tensor], axis: usize) -> Result<Tensor, KErr> {
    let rank = first.rank();
    let fits = axis < rank
        && first.shape()[..axis].iter().all(|&d| d == 1)
        && rest.iter().all(|x| {
            x.data().kind() == first.data().kind() && x.rank() == rank && (0..rank).all(|i| i == axis || x.shape()[i] == first.shape()[i])
        });
    if !fits {
        let mut all = vec![&first];
        all.extend_from_slice(rest);
        return concat(&all, axis);
    }
    let mut shape = first.shape().to_vec();
    shape[axis] += rest.iter().map(|x| x.shape()[axis]).sum::<usize>();
    let kind = first.data().kind();
    let (_, data) = first.into_parts();
    let data = with_elem!(&data, E => {
        let mut v = E::take(data).map_err(|d| KErr::dtype(format!("{kind} data held as {}", d.kind())))?;
        for x in rest {
            v.extend_from_slice(view::<E>(x)?);
        }
        E::wrap(v)
    });
    Ok(Tensor::from_parts(shape, data))
}

/// Check one index against the axis length; negative indices are errors, not
/// Python-style counts from the end.
fn row_index(i: i64, n: usize, what: &str) -> Result<usize, KErr> {
    usize::try_from(i)
        .ok()
        .filter(|&u| u < n)
        .ok_or_else(|| KErr::index(format!("{what} index {i} is out of range for an axis of length {n}")))
}

/// `table: [A.., n, B..]` gathered by `idx: [I..]` along `axis` → `[A.., I.., B..]`.
pub fn gather(table: &Tensor, idx: &Tensor, axis: usize) -> Result<Tensor, KErr> {
    if axis >= table.rank() {
        return Err(KErr::shape(format!("axis {axis} out of range for rank {}", table.rank())));
    }
    let (outer, n, inner) = split_at_axis(table.shape(), axis);
    let ids = indices(idx, "gather indices")?;
    let rows = ids.iter().map(|&i| row_index(i, n, "gather")).collect::<Result<Vec<_>, _>>()?;
    let mut shape = table.shape()[..axis].to_vec();
    shape.extend_from_slice(idx.shape());
    shape.extend_from_slice(&table.shape()[axis + 1..]);
    let data = with_elem!(table.data(), E => {
        let v = view::<E>(table)?;
        let mut out = Vec::with_capacity(outer * rows.len() * inner);
        for o in 0..outer {
            for &r in &rows {
                let base = (o * n + r) * inner;
                out.extend_from_slice(&v[base..base + inner]);
            }
        }
        E::wrap(out)
    });
    Ok(Tensor::from_parts(shape, data))
}

/// `dst` with `src: [A.., I.., B..]` added at the rows `idx: [I..]` name along `axis`;
/// repeated indices accumulate, in index order.
pub fn scatter_add(dst: &Tensor, idx: &Tensor, src: &Tensor, axis: usize) -> Result<Tensor, KErr> {
    if axis >= dst.rank() {
        return Err(KErr::shape(format!("axis {axis} out of range for rank {}", dst.rank())));
    }
    let (outer, n, inner) = split_at_axis(dst.shape(), axis);
    let ids = indices(idx, "scatter_add indices")?;
    let mut want = dst.shape()[..axis].to_vec();
    want.extend_from_slice(idx.shape());
    want.extend_from_slice(&dst.shape()[axis + 1..]);
    if src.shape() != want.as_slice() {
        return Err(KErr::shape(format!("src {:?} must be {want:?}", src.shape())));
    }
    let rows = ids.iter().map(|&i| row_index(i, n, "scatter_add")).collect::<Result<Vec<_>, _>>()?;
    let data = with_elem!(dst.data(), E => {
        let mut out = view::<E>(dst)?.to_vec();
        let s = view::<E>(src)?;
        for o in 0..outer {
            for (j, &r) in rows.iter().enumerate() {
                let (d0, s0) = ((o * n + r) * inner, (o * rows.len() + j) * inner);
                for (d, &x) in out[d0..d0 + inner].iter_mut().zip(&s[s0..s0 + inner]) {
                    *d = d.accumulate(x);
                }
            }
        }
        E::wrap(out)
    });
    Ok(Tensor::from_parts(dst.shape().to_vec(), data))
}

/// The `k` largest along `axis`, descending, ties to the lower index, NaN largest:
/// (values, `i32` indices).
pub fn top_k(x: &Tensor, k: usize, axis: usize) -> Result<(Tensor, Tensor), KErr> {
    if axis >= x.rank() {
        return Err(KErr::shape(format!("axis {axis} out of range for rank {}", x.rank())));
    }
    let (outer, n, inner) = split_at_axis(x.shape(), axis);
    if k > n {
        return Err(KErr::shape(format!("top_k k = {k} exceeds axis {axis} of {:?}", x.shape())));
    }
    let mut shape = x.shape().to_vec();
    shape[axis] = k;
    let mut idx_out = vec![0i32; outer * k * inner];
    let vals = with_elem!(x.data(), E => {
        let v = view::<E>(x)?;
        let mut out = vec![E::zero(); outer * k * inner];
        let mut lane: Vec<(E, usize)> = Vec::with_capacity(n);
        for o in 0..outer {
            for i in 0..inner {
                lane.clear();
                lane.extend((0..n).map(|j| (v[(o * n + j) * inner + i], j)));
                top_k_lane(&mut lane, k);
                for (r, &(val, j)) in lane[..k].iter().enumerate() {
                    let at = (o * k + r) * inner + i;
                    out[at] = val;
                    idx_out[at] = j as i32;
                }
            }
        }
        E::wrap(out)
    });
    Ok((Tensor::from_parts(shape.clone(), vals), Tensor::from_parts(shape, Data::I32(idx_out))))
}

/// Leave the `k` best of `lane` first, in order.
pub fn top_k_lane<E: Elem>(lane: &mut [(E, usize)], k: usize) {
    if k == 0 {
        return;
    }
    if k < lane.len() {
        lane.select_nth_unstable_by(k - 1, |a, b| desc_then_index(*a, *b));
    }
    lane[..k].sort_unstable_by(|a, b| desc_then_index(*a, *b));
}

/// Sum, max or mean along `axis`. Float sums accumulate in `f64` and round once, so a
/// reduction in an `f32` run is as accurate as the result type allows. An empty axis
/// gives 0 (sum), -inf or the type's minimum (max) and NaN (mean); booleans reduce by
/// `or`.
pub fn reduce<T: Real>(x: &Tensor, op: ReduceOp, axis: usize, keepdim: bool) -> Result<Tensor, KErr> {
    if axis >= x.rank() {
        return Err(KErr::shape(format!("axis {axis} out of range for rank {}", x.rank())));
    }
    let (outer, n, inner) = split_at_axis(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    if keepdim {
        shape[axis] = 1;
    } else {
        shape.remove(axis);
    }
    let lanes = |f: &dyn Fn(usize, usize) -> f64| -> Vec<f64> { (0..outer * inner).map(|l| f(l / inner, l % inner)).collect() };
    let data = match x.data() {
        d if T::view(d).is_some() => {
            let v = T::view(d).expect("checked");
            let at = |o: usize, j: usize, i: usize| v[(o * n + j) * inner + i].to_f64();
            let r = match op {
                ReduceOp::Sum => lanes(&|o, i| (0..n).map(|j| at(o, j, i)).sum()),
                ReduceOp::Mean => lanes(&|o, i| (0..n).map(|j| at(o, j, i)).sum::<f64>() / n as f64),
                ReduceOp::Max => lanes(&|o, i| (0..n).map(|j| at(o, j, i)).fold(f64::NEG_INFINITY, |a, b| a.max_nan(b))),
            };
            T::wrap(r.into_iter().map(T::of).collect())
        }
        Data::I32(v) => Data::I32(int_reduce(v, op, outer, n, inner, i32::MIN)?),
        Data::I64(v) => Data::I64(int_reduce(v, op, outer, n, inner, i64::MIN)?),
        Data::Bool(v) => {
            if op == ReduceOp::Mean {
                return Err(KErr::dtype("reduce_mean of a bool tensor".into()));
            }
            Data::Bool((0..outer * inner).map(|l| (0..n).any(|j| v[((l / inner) * n + j) * inner + l % inner])).collect())
        }
        d => return Err(KErr::dtype(format!("a {} tensor in a {} run", d.kind(), T::NAME))),
    };
    Ok(Tensor::from_parts(shape, data))
}

fn int_reduce<I: Elem + Ord>(v: &[I], op: ReduceOp, outer: usize, n: usize, inner: usize, min: I) -> Result<Vec<I>, KErr> {
    let lane = |l: usize| (0..n).map(move |j| v[((l / inner) * n + j) * inner + l % inner]);
    match op {
        ReduceOp::Sum => Ok((0..outer * inner).map(|l| lane(l).fold(I::zero(), I::accumulate)).collect()),
        ReduceOp::Max => Ok((0..outer * inner).map(|l| lane(l).fold(min, |a, b| a.max(b))).collect()),
        ReduceOp::Mean => Err(KErr::dtype("reduce_mean of an integer tensor".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::from_fn(shape, |i| i as f32)
    }

    #[test]
    fn permute_matches_index_formula() {
        let x = t(&[2, 3, 4]);
        let y = permute(&x, &[2, 0, 1]).unwrap();
        assert_eq!(y.shape(), &[4, 2, 3]);
        for a in 0..2 {
            for b in 0..3 {
                for c in 0..4 {
                    assert_eq!(y.get(&[c, a, b]), x.get(&[a, b, c]));
                }
            }
        }
        assert!(permute(&x, &[0, 0, 1]).is_err());
        let s = permute(&Tensor::scalar(3.0), &[]).unwrap();
        assert_eq!(s.to_f32_vec(), vec![3.0]);
        let big = t(&[64, 33, 17]);
        let back = permute(&permute(&big, &[1, 2, 0]).unwrap(), &[2, 0, 1]).unwrap();
        assert_eq!(back, big);
        // Moving only unit axes keeps every element where it is (the copy-whole path),
        // and agrees with the index formula.
        let c = t(&[5, 1, 3]);
        let y = permute(&c, &[1, 0, 2]).unwrap();
        assert_eq!(y.shape(), &[1, 5, 3]);
        assert_eq!(y.to_f32_vec(), c.to_f32_vec());
        for a in 0..5 {
            for d in 0..3 {
                assert_eq!(y.get(&[0, a, d]), c.get(&[a, 0, d]));
            }
        }
    }

    #[test]
    fn broadcast_repeats_unit_axes() {
        // [b=2, s=3, 1, d=2] → [2, 3, h=4, 2]: every head reads the one shared row.
        let x = t(&[2, 3, 1, 2]);
        let y = broadcast(&x, &[2, 3, 4, 2]).unwrap();
        for (a, b, h, d) in (0..2).flat_map(|a| (0..3).flat_map(move |b| (0..4).flat_map(move |h| (0..2).map(move |d| (a, b, h, d))))) {
            assert_eq!(y.get(&[a, b, h, d]), x.get(&[a, b, 0, d]));
        }
        // New leading axes, and a scalar.
        let w = t(&[3, 2]);
        let y = broadcast(&w, &[2, 3, 2]).unwrap();
        assert_eq!(y.to_f32_vec(), [w.to_f32_vec(), w.to_f32_vec()].concat());
        assert_eq!(broadcast(&Tensor::scalar(7.0), &[3]).unwrap().to_f32_vec(), vec![7.0; 3]);
        assert_eq!(broadcast(&Tensor::i32(&[1], vec![5]), &[0]).unwrap().numel(), 0);
        assert!(broadcast(&x, &[2, 4, 4, 2]).is_err());
        assert!(broadcast(&w, &[2]).is_err());
    }

    #[test]
    fn slice_concat_roundtrip() {
        let x = t(&[2, 5, 3]);
        let a = slice(&x, 1, 0, 2).unwrap();
        let b = slice(&x, 1, 2, 3).unwrap();
        assert_eq!(a.shape(), &[2, 2, 3]);
        assert_eq!(b.get(&[1, 0, 1]), x.get(&[1, 2, 1]));
        assert_eq!(concat(&[&a, &b], 1).unwrap(), x);
        let empty = slice(&x, 1, 5, 0).unwrap();
        assert_eq!(concat(&[&empty, &x], 1).unwrap(), x);
        assert!(concat(&[&a, &t(&[2, 2, 4])], 1).is_err());
        assert!(concat(&[&a, &Tensor::i32(&[2, 2, 3], vec![0; 12])], 1).is_err());
    }

    #[test]
    fn gather_and_scatter() {
        let table = t(&[4, 3]);
        let ids = Tensor::i32(&[2, 2], vec![3, 0, 0, 2]);
        let g = gather(&table, &ids, 0).unwrap();
        assert_eq!(g.shape(), &[2, 2, 3]);
        assert_eq!(g.to_f32_vec()[..6], [9.0, 10.0, 11.0, 0.0, 1.0, 2.0]);
        // Along an inner axis: [A=4, n=3] by [2] -> [4, 2].
        let g1 = gather(&table, &Tensor::i64(&[2], vec![2, 2]), 1).unwrap();
        assert_eq!(g1.to_f32_vec(), vec![2.0, 2.0, 5.0, 5.0, 8.0, 8.0, 11.0, 11.0]);
        let e = gather(&table, &Tensor::i32(&[1], vec![4]), 0).unwrap_err();
        assert!(e.message.contains("index 4 is out of range"), "{}", e.message);
        assert!(gather(&table, &Tensor::i32(&[1], vec![-1]), 0).is_err());

        let s = scatter_add(&Tensor::zeros(&[4, 3]), &ids, &g, 0).unwrap();
        // Row 0 was gathered twice, so it comes back doubled.
        assert_eq!(s.get(&[0, 1]), Some(2.0));
        assert_eq!(s.get(&[3, 2]), Some(11.0));
        assert_eq!(s.get(&[1, 0]), Some(0.0));
        assert!(scatter_add(&Tensor::zeros(&[4, 3]), &ids, &table, 0).is_err());
    }

    #[test]
    fn top_k_order_and_ties() {
        let x = Tensor::f32(&[2, 5], vec![1.0, 3.0, 3.0, -1.0, 2.0, 0.0, 0.0, 0.0, 5.0, 0.0]);
        let (v, i) = top_k(&x, 3, 1).unwrap();
        assert_eq!(v.to_f32_vec(), vec![3.0, 3.0, 2.0, 5.0, 0.0, 0.0]);
        assert_eq!(i.as_i32().unwrap(), &[1, 2, 4, 3, 0, 1]);
        // Along axis 0 of the transpose gives the same answer.
        let xt = permute(&x, &[1, 0]).unwrap();
        let (_, it) = top_k(&xt, 3, 0).unwrap();
        assert_eq!(permute(&it, &[1, 0]).unwrap().as_i32().unwrap(), &[1, 2, 4, 3, 0, 1]);
        assert!(top_k(&x, 6, 1).is_err());
        let (_, ii) = top_k(&Tensor::i64(&[3], vec![5, 9, 9]), 2, 0).unwrap();
        assert_eq!(ii.as_i32().unwrap(), &[1, 2]);
    }

    #[test]
    fn reductions() {
        let x = t(&[2, 3, 2]);
        let s = reduce::<f32>(&x, ReduceOp::Sum, 1, false).unwrap();
        assert_eq!(s.shape(), &[2, 2]);
        assert_eq!(s.to_f32_vec(), vec![6.0, 9.0, 24.0, 27.0]);
        let m = reduce::<f32>(&x, ReduceOp::Mean, 2, true).unwrap();
        assert_eq!(m.shape(), &[2, 3, 1]);
        assert_eq!(m.to_f32_vec(), vec![0.5, 2.5, 4.5, 6.5, 8.5, 10.5]);
        let mx = reduce::<f32>(&x, ReduceOp::Max, 0, false).unwrap();
        assert_eq!(mx.get(&[2, 1]), Some(11.0));
        let i = Tensor::i32(&[2, 2], vec![1, -4, 3, 2]);
        assert_eq!(reduce::<f32>(&i, ReduceOp::Sum, 1, false).unwrap().as_i32().unwrap(), &[-3, 5]);
        assert_eq!(reduce::<f32>(&i, ReduceOp::Max, 0, false).unwrap().as_i32().unwrap(), &[3, 2]);
        assert!(reduce::<f32>(&i, ReduceOp::Mean, 0, false).is_err());
        let empty = Tensor::zeros(&[2, 0]);
        assert_eq!(reduce::<f32>(&empty, ReduceOp::Sum, 1, false).unwrap().to_f32_vec(), vec![0.0, 0.0]);
        assert_eq!(reduce::<f32>(&empty, ReduceOp::Max, 1, false).unwrap().to_f32_vec()[0], f32::NEG_INFINITY);
    }

    fn ptr(t: &Tensor) -> *const f32 {
        match t.data() {
            Data::F32(v) => v.as_ptr(),
            _ => unreachable!(),
        }
    }

    /// Appending along the outermost non-unit axis gives `concat`'s result in the first
    /// operand's buffer (its spare room, once there is some); along an inner axis, or
    /// onto another element type, it is `concat` (or its error).
    #[test]
    fn concat_onto_appends_in_place_where_the_layout_allows() {
        let mut cache = Tensor::f32(&[3, 1, 2], (0..6).map(|i| i as f32).collect());
        let new = Tensor::f32(&[1, 1, 2], vec![10.0, 11.0]);
        let mut seen = Vec::new();
        for step in 0..6 {
            let want = concat(&[&cache, &new], 0).unwrap();
            cache = concat_onto(cache, &[&new], 0).unwrap();
            assert_eq!(cache, want, "step {step}");
            seen.push(ptr(&cache));
        }
        // The buffer grows by doubling: most appends find room where the last one left it.
        assert!(seen.windows(2).filter(|w| w[0] == w[1]).count() >= 3, "{seen:?}");
        // [1, 3, 2] along axis 1: the leading axis is 1, so it appends in place too.
        let a = Tensor::f32(&[1, 3, 2], (0..6).map(|i| i as f32).collect());
        let b = Tensor::f32(&[1, 2, 2], vec![7.0; 4]);
        assert_eq!(concat_onto(a.clone(), &[&b], 1).unwrap(), concat(&[&a, &b], 1).unwrap());
        // [2, 3] along axis 1 interleaves rows: concat's result, copied.
        let (x, y) = (Tensor::f32(&[2, 3], vec![1.0; 6]), Tensor::f32(&[2, 1], vec![2.0, 3.0]));
        assert_eq!(concat_onto(x.clone(), &[&y], 1).unwrap(), concat(&[&x, &y], 1).unwrap());
        assert!(concat_onto(x.clone(), &[&Tensor::i64(&[2, 1], vec![1, 2])], 1).is_err());
        assert!(concat_onto(x.clone(), &[&Tensor::f32(&[3, 1], vec![0.0; 3])], 1).is_err(), "rows disagree");
    }
}
