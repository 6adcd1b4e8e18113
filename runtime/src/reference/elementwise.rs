//! Elementwise kernels: unary and binary functions with numpy broadcasting, `select`,
//! and casts.
//!
//! Broadcasting is planned once per op (`Plan`): the output is walked row by row (a
//! row is the innermost axis), each input's offset for a row comes from its strides with
//! broadcast axes at stride 0, and the inner loop only steps each input by 0 or 1. Rows
//! are independent, so large outputs are split over rayon's threads.

use super::real::{Elem, Real};
use super::tensor::{numel, Data, Tensor};
use super::KernelError as KErr;
use dsc_compiler::ir::{BinaryOp, DType, UnaryOp};
use rayon::prelude::*;

/// Outputs at least this large are computed in parallel; below it rayon's overhead
/// outweighs the work.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// numpy broadcasting of concrete shapes: align at the right; each pair of sizes is
/// equal or one of them is 1.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>, KErr> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(KErr::shape(format!("shapes {shapes:?} do not broadcast")));
            }
        }
    }
    Ok(out)
}

/// How `N` inputs map onto a broadcast output, row by row.
struct Plan<const N: usize> {
    out: Vec<usize>,
    /// Per input, the stride of each output axis (0 where the input is broadcast).
    strides: [Vec<usize>; N],
    /// Length of a row: the innermost output axis (1 for a scalar output).
    inner: usize,
}

impl<const N: usize> Plan<N> {
    fn new(shapes: [&[usize]; N]) -> Result<Plan<N>, KErr> {
        let out = broadcast_shapes(&shapes)?;
        let rank = out.len();
        let strides = shapes.map(|s| {
            let mut st = vec![0usize; rank];
            let off = rank - s.len();
            let mut acc = 1;
            for i in (0..s.len()).rev() {
                if s[i] != 1 {
                    st[off + i] = acc;
                }
                acc *= s[i];
            }
            st
        });
        let inner = out.last().copied().unwrap_or(1);
        Ok(Plan { out, strides, inner })
    }

    /// Each input's offset at the start of output row `row`.
    fn row_offsets(&self, row: usize) -> [usize; N] {
        let mut offs = [0usize; N];
        let rank = self.out.len();
        let mut r = row;
        for ax in (0..rank.saturating_sub(1)).rev() {
            let d = self.out[ax];
            let i = r % d;
            r /= d;
            for (o, st) in offs.iter_mut().zip(&self.strides) {
                *o += i * st[ax];
            }
        }
        offs
    }

    /// Each input's step along a row (0 or 1).
    fn inner_steps(&self) -> [usize; N] {
        let rank = self.out.len();
        std::array::from_fn(|k| if rank == 0 { 0 } else { self.strides[k][rank - 1] })
    }

    /// Fill the output by calling `f(row_offsets, steps, out_row)` for every row.
    fn run<O: Send + Copy + Default>(&self, f: impl Fn([usize; N], [usize; N], &mut [O]) + Sync) -> Vec<O> {
        let total = numel(&self.out);
        let mut out = vec![O::default(); total];
        if total == 0 {
            return out;
        }
        let steps = self.inner_steps();
        let body = |(row, chunk): (usize, &mut [O])| f(self.row_offsets(row), steps, chunk);
        if total >= PAR_MIN {
            out.par_chunks_mut(self.inner).enumerate().for_each(body);
        } else {
            out.chunks_mut(self.inner).enumerate().for_each(body);
        }
        out
    }
}

/// `f(a, b)` elementwise with broadcasting.
pub fn map2<A: Elem, B: Elem, O: Send + Copy + Default>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    f: impl Fn(A, B) -> O + Sync,
) -> Result<(Vec<usize>, Vec<O>), KErr> {
    if ash == bsh {
        // The common case: no index arithmetic at all.
        let out = if a.len() >= PAR_MIN {
            a.par_iter().zip(b.par_iter()).map(|(&x, &y)| f(x, y)).collect()
        } else {
            a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
        };
        return Ok((ash.to_vec(), out));
    }
    let plan = Plan::new([ash, bsh])?;
    let out = plan.run(|[oa, ob], [sa, sb], row: &mut [O]| {
        for (j, o) in row.iter_mut().enumerate() {
            *o = f(a[oa + j * sa], b[ob + j * sb]);
        }
    });
    Ok((plan.out, out))
}

/// `f(a, b, c)` elementwise with broadcasting.
pub fn map3<A: Elem, B: Elem, C: Elem, O: Send + Copy + Default>(
    a: (&[A], &[usize]),
    b: (&[B], &[usize]),
    c: (&[C], &[usize]),
    f: impl Fn(A, B, C) -> O + Sync,
) -> Result<(Vec<usize>, Vec<O>), KErr> {
    let plan = Plan::new([a.1, b.1, c.1])?;
    let out = plan.run(|[oa, ob, oc], [sa, sb, sc], row: &mut [O]| {
        for (j, o) in row.iter_mut().enumerate() {
            *o = f(a.0[oa + j * sa], b.0[ob + j * sb], c.0[oc + j * sc]);
        }
    });
    Ok((plan.out, out))
}

/// `f` over every element, in parallel when large.
pub fn map1<A: Elem, O: Send>(a: &[A], f: impl Fn(A) -> O + Sync + Send) -> Vec<O> {
    if a.len() >= PAR_MIN {
        a.par_iter().map(|&x| f(x)).collect()
    } else {
        a.iter().map(|&x| f(x)).collect()
    }
}

/// A unary op on a float tensor of the run's precision, or (`neg`, `abs`) on integers.
/// Integer `neg`/`abs` wrap at the type's minimum, as two's complement does.
pub fn unary<T: Real>(op: UnaryOp, x: &Tensor) -> Result<Tensor, KErr> {
    let shape = x.shape().to_vec();
    if let Some(v) = T::view(x.data()) {
        let f: fn(T) -> T = match op {
            UnaryOp::Neg => |x| -x,
            UnaryOp::Abs => |x| x.abs(),
            UnaryOp::Exp => |x| x.exp(),
            UnaryOp::Log => |x| x.ln(),
            UnaryOp::Sqrt => |x| x.sqrt(),
            UnaryOp::Rsqrt => |x| T::ONE / x.sqrt(),
            UnaryOp::Recip => |x| T::ONE / x,
            UnaryOp::Square => |x| x * x,
            UnaryOp::Sigmoid => |x| x.sigmoid(),
            UnaryOp::Silu => |x| x.silu(),
            UnaryOp::Tanh => |x| x.tanh(),
            UnaryOp::Sin => |x| x.sin(),
            UnaryOp::Cos => |x| x.cos(),
        };
        return Ok(Tensor::from_parts(shape, T::wrap(map1(v, f))));
    }
    let data = match (op, x.data()) {
        (UnaryOp::Neg, Data::I32(v)) => Data::I32(map1(v, i32::wrapping_neg)),
        (UnaryOp::Neg, Data::I64(v)) => Data::I64(map1(v, i64::wrapping_neg)),
        (UnaryOp::Abs, Data::I32(v)) => Data::I32(map1(v, i32::wrapping_abs)),
        (UnaryOp::Abs, Data::I64(v)) => Data::I64(map1(v, i64::wrapping_abs)),
        (_, d) => return Err(KErr::dtype(format!("{} of a {} tensor", op.name(), d.kind()))),
    };
    Ok(Tensor::from_parts(shape, data))
}

/// A binary op with broadcasting. Floats compute in the run's precision; integers wrap on
/// overflow and fail on division by zero; booleans only compare (`false < true`).
pub fn binary<T: Real>(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor, KErr> {
    let (ash, bsh) = (a.shape(), b.shape());
    let (shape, data) = match (a.data(), b.data()) {
        (Data::F32(_), Data::F32(_)) | (Data::F64(_), Data::F64(_)) => {
            let (x, y) = (T::view(a.data()).ok_or_else(|| precision_err::<T>(a))?, T::view(b.data()).ok_or_else(|| precision_err::<T>(b))?);
            float_binary(op, x, ash, y, bsh)?
        }
        (Data::I32(x), Data::I32(y)) => int_binary(op, x, ash, y, bsh)?,
        (Data::I64(x), Data::I64(y)) => int_binary(op, x, ash, y, bsh)?,
        (Data::Bool(x), Data::Bool(y)) => match op {
            BinaryOp::Lt => bool_data(map2(x, ash, y, bsh, |p, q| !p & q)?),
            BinaryOp::Eq => bool_data(map2(x, ash, y, bsh, |p, q| p == q)?),
            _ => return Err(KErr::dtype(format!("{} of bool tensors", op.name()))),
        },
        (x, y) => return Err(KErr::dtype(format!("{} of {} and {} tensors", op.name(), x.kind(), y.kind()))),
    };
    Ok(Tensor::from_parts(shape, data))
}

fn precision_err<T: Real>(t: &Tensor) -> KErr {
    KErr::dtype(format!("a {} tensor in a {} run", t.data().kind(), T::NAME))
}

fn bool_data((s, v): (Vec<usize>, Vec<bool>)) -> (Vec<usize>, Data) {
    (s, Data::Bool(v))
}

fn float_binary<T: Real>(op: BinaryOp, x: &[T], xs: &[usize], y: &[T], ys: &[usize]) -> Result<(Vec<usize>, Data), KErr> {
    let f: fn(T, T) -> T = match op {
        BinaryOp::Add => |a, b| a + b,
        BinaryOp::Sub => |a, b| a - b,
        BinaryOp::Mul => |a, b| a * b,
        BinaryOp::Div => |a, b| a / b,
        BinaryOp::Max => |a, b| a.max_nan(b),
        BinaryOp::Min => |a, b| a.min_nan(b),
        BinaryOp::Pow => |a, b| a.powf(b),
        BinaryOp::Lt => return Ok(bool_data(map2(x, xs, y, ys, |a, b| a < b)?)),
        BinaryOp::Eq => return Ok(bool_data(map2(x, xs, y, ys, |a, b| a == b)?)),
    };
    let (s, v) = map2(x, xs, y, ys, f)?;
    Ok((s, T::wrap(v)))
}

/// The integer types' arithmetic, so `int_binary` is written once.
pub trait Int: Elem + Ord + Default {
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// `None` on division by zero; truncates toward zero like C and Rust (torch's
    /// `div(rounding_mode='trunc')`).
    fn div(self, o: Self) -> Option<Self>;
    /// `None` for a negative exponent (torch refuses integers to negative powers).
    fn pow(self, o: Self) -> Option<Self>;
}

macro_rules! int {
    ($t:ty) => {
        impl Int for $t {
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            fn sub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            fn div(self, o: Self) -> Option<Self> {
                if o == 0 {
                    None
                } else {
                    Some(self.wrapping_div(o))
                }
            }
            fn pow(self, o: Self) -> Option<Self> {
                u32::try_from(o).ok().map(|e| self.wrapping_pow(e)).or_else(|| {
                    // Exponents beyond u32 only matter for 0, 1 and -1.
                    (o > 0).then(|| match self {
                        0 | 1 => self,
                        -1 => {
                            if o % 2 == 0 {
                                1
                            } else {
                                -1
                            }
                        }
                        _ => 0,
                    })
                })
            }
        }
    };
}

int!(i32);
int!(i64);

fn int_binary<I: Int>(op: BinaryOp, x: &[I], xs: &[usize], y: &[I], ys: &[usize]) -> Result<(Vec<usize>, Data), KErr> {
    let bad = std::sync::atomic::AtomicBool::new(false);
    let flag = |r: Option<I>| {
        r.unwrap_or_else(|| {
            bad.store(true, std::sync::atomic::Ordering::Relaxed);
            I::default()
        })
    };
    let (s, v) = match op {
        BinaryOp::Add => map2(x, xs, y, ys, I::add)?,
        BinaryOp::Sub => map2(x, xs, y, ys, I::sub)?,
        BinaryOp::Mul => map2(x, xs, y, ys, I::mul)?,
        BinaryOp::Max => map2(x, xs, y, ys, |a, b| a.max(b))?,
        BinaryOp::Min => map2(x, xs, y, ys, |a, b| a.min(b))?,
        BinaryOp::Div => map2(x, xs, y, ys, |a, b| flag(a.div(b)))?,
        BinaryOp::Pow => map2(x, xs, y, ys, |a, b| flag(a.pow(b)))?,
        BinaryOp::Lt => return Ok(bool_data(map2(x, xs, y, ys, |a, b| a < b)?)),
        BinaryOp::Eq => return Ok(bool_data(map2(x, xs, y, ys, |a, b| a == b)?)),
    };
    if bad.into_inner() {
        let what = if op == BinaryOp::Div { "integer division by zero" } else { "integer to a negative power" };
        return Err(KErr::numeric(what.to_string()));
    }
    Ok((s, I::wrap(v)))
}

/// `select(cond, a, b)` with three-way broadcasting.
pub fn select(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor, KErr> {
    let c = cond.data();
    let Data::Bool(c) = c else {
        return Err(KErr::dtype(format!("select's condition is {}, not bool", c.kind())));
    };
    macro_rules! go {
        ($x:expr, $y:expr) => {{
            let (s, v) = map3((&c[..], cond.shape()), ($x, a.shape()), ($y, b.shape()), |c, p, q| if c { p } else { q })?;
            (s, Elem::wrap(v))
        }};
    }
    let (shape, data) = match (a.data(), b.data()) {
        (Data::F32(x), Data::F32(y)) => go!(&x[..], &y[..]),
        (Data::F64(x), Data::F64(y)) => go!(&x[..], &y[..]),
        (Data::I32(x), Data::I32(y)) => go!(&x[..], &y[..]),
        (Data::I64(x), Data::I64(y)) => go!(&x[..], &y[..]),
        (Data::Bool(x), Data::Bool(y)) => go!(&x[..], &y[..]),
        (x, y) => return Err(KErr::dtype(format!("select between {} and {}", x.kind(), y.kind()))),
    };
    Ok(Tensor::from_parts(shape, data))
}

/// A bf16 tensor (a weight kept in the checkpoint's precision) widened to `T`, read in
/// place; `None` for any other tensor. Exact: every bf16 is an f32.
pub fn widen_bf16<T: Real>(t: &Tensor) -> Option<Tensor> {
    let bits = t.as_bf16_bits()?;
    Some(Tensor::from_parts(t.shape().to_vec(), T::wrap(bits.iter().map(|&b| T::of(super::weights::bf16_to_f32(b) as f64)).collect())))
}

/// A float tensor of the run's precision rounded to bf16 (nearest, ties to even); `None`
/// for any other tensor.
pub fn round_bf16<T: Real>(t: &Tensor) -> Option<Tensor> {
    let v = T::view(t.data())?;
    Some(Tensor::from_parts(t.shape().to_vec(), Data::Bf16(v.iter().map(|&x| super::weights::f32_to_bf16(x.to_f64() as f32)).collect())))
}

/// Convert to `to`, with floats held in the run's precision `T`.
///
/// Float-to-float casts keep the value: the interpreter computes every float type in `T`
/// (see the module doc of [`super`]). Float-to-int truncates toward zero and fails on
/// NaN or out-of-range values; int-to-int fails when a value does not fit; anything to
/// bool is `x != 0`; bool to a number is 0 or 1.
pub fn cast<T: Real>(x: Tensor, to: DType) -> Result<Tensor, KErr> {
    let (shape, data) = x.into_parts();
    let out = match to {
        DType::F32 | DType::Bf16 | DType::F16 | DType::F8E4M3 => match data {
            d if T::view(&d).is_some() => d,
            Data::F32(v) => T::wrap(map1(&v, |x| T::of(x as f64))),
            Data::F64(v) => T::wrap(map1(&v, T::of)),
            Data::I32(v) => T::wrap(map1(&v, |x| T::of(x as f64))),
            Data::I64(v) => T::wrap(map1(&v, |x| T::of(x as f64))),
            Data::Bool(v) => T::wrap(map1(&v, |x| if x { T::ONE } else { T::ZERO })),
            Data::Bf16(v) => T::wrap(map1(&v, |x| T::of(super::weights::bf16_to_f32(x) as f64))),
            d @ (Data::F16(_) | Data::F8(_)) => {
                let wide = super::narrow::widen::<T>(&Tensor::from_parts(shape.clone(), d)).expect("narrow data");
                wide.into_data()
            }
        },
        DType::I32 => Data::I32(to_int(data, 31, |x| x as i32)?),
        DType::I64 => Data::I64(to_int(data, 63, |x| x as i64)?),
        DType::Bool => Data::Bool(match data {
            Data::F32(v) => map1(&v, |x| x != 0.0),
            Data::F64(v) => map1(&v, |x| x != 0.0),
            Data::I32(v) => map1(&v, |x| x != 0),
            Data::I64(v) => map1(&v, |x| x != 0),
            Data::Bool(v) => v,
            Data::Bf16(v) => map1(&v, |x| super::weights::bf16_to_f32(x) != 0.0),
            d @ (Data::F16(_) | Data::F8(_)) => Tensor::from_parts(shape.clone(), d).to_f32_vec().into_iter().map(|x| x != 0.0).collect(),
        }),
    };
    Ok(Tensor::from_parts(shape, out))
}

/// Every element as the integer type `I` of `bits` value bits (31 or 63), through `f64`,
/// failing on NaN and on values outside `[-2^bits, 2^bits)`. Both bounds are exact in
/// `f64`, so the check is exact even where the values are not.
fn to_int<I: Elem>(data: Data, bits: i32, from: impl Fn(f64) -> I + Sync + Send) -> Result<Vec<I>, KErr> {
    let (lo, hi) = (-(2f64.powi(bits)), 2f64.powi(bits));
    let data = match I::take(data) {
        Ok(v) => return Ok(v),
        Err(d) => d,
    };
    let vals: Vec<f64> = match &data {
        Data::F32(v) => v.iter().map(|&x| (x as f64).trunc()).collect(),
        Data::F64(v) => v.iter().map(|x| x.trunc()).collect(),
        Data::I32(v) => v.iter().map(|&x| x as f64).collect(),
        Data::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
        Data::Bf16(v) => v.iter().map(|&x| (super::weights::bf16_to_f32(x) as f64).trunc()).collect(),
        Data::F16(_) | Data::F8(_) => Tensor::from_parts(vec![data.len()], data.clone()).to_f64_vec().into_iter().map(f64::trunc).collect(),
        // i64 → i32 goes through i64 to stay exact beyond 2^53.
        Data::I64(v) => {
            let mut out = Vec::with_capacity(v.len());
            for &x in v {
                if (x as f64) < lo || (x as f64) >= hi {
                    return Err(KErr::numeric(format!("{x} does not fit the target integer type")));
                }
                out.push(from(x as f64));
            }
            return Ok(out);
        }
    };
    let mut out = Vec::with_capacity(vals.len());
    for x in vals {
        if x.is_nan() || x < lo || x >= hi {
            return Err(KErr::numeric(format!("{x} does not fit the target integer type")));
        }
        out.push(from(x));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_binary() {
        // [2,1,3] + [4,1] -> [2,4,3]
        let a = Tensor::from_fn(&[2, 1, 3], |i| i as f32);
        let b = Tensor::from_fn(&[4, 1], |i| 10.0 * i as f32);
        let y = binary::<f32>(BinaryOp::Add, &a, &b).unwrap();
        assert_eq!(y.shape(), &[2, 4, 3]);
        for i in 0..2 {
            for j in 0..4 {
                for k in 0..3 {
                    let want = (i * 3 + k) as f64 + 10.0 * j as f64;
                    assert_eq!(y.get(&[i, j, k]), Some(want));
                }
            }
        }
        let s = binary::<f32>(BinaryOp::Mul, &Tensor::scalar(2.0), &a).unwrap();
        assert_eq!(s.to_f32_vec(), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert!(binary::<f32>(BinaryOp::Add, &a, &Tensor::zeros(&[2])).is_err());
        let lt = binary::<f32>(BinaryOp::Lt, &a, &Tensor::scalar(2.5)).unwrap();
        assert_eq!(lt.as_bool().unwrap(), &[true, true, true, false, false, false]);
        let big = Tensor::from_fn(&[70, 513], |i| i as f32);
        let row = Tensor::from_fn(&[513], |i| -(i as f32));
        let d = binary::<f32>(BinaryOp::Add, &big, &row).unwrap();
        assert!(d.to_f32_vec().iter().enumerate().all(|(i, &v)| v == (i - i % 513) as f32));
    }

    #[test]
    fn float_ops() {
        let x = Tensor::f64(&[3], vec![0.5, 2.0, 4.0]);
        let y = Tensor::f64(&[3], vec![2.0, 3.0, 0.5]);
        let get = |op, a: &Tensor, b: &Tensor| binary::<f64>(op, a, b).unwrap().to_f64_vec();
        assert_eq!(get(BinaryOp::Pow, &x, &y), vec![0.25, 8.0, 2.0]);
        assert_eq!(get(BinaryOp::Max, &x, &y), vec![2.0, 3.0, 4.0]);
        assert_eq!(get(BinaryOp::Min, &x, &y), vec![0.5, 2.0, 0.5]);
        assert_eq!(get(BinaryOp::Div, &x, &y), vec![0.25, 2.0 / 3.0, 8.0]);
        let u = |op| unary::<f64>(op, &x).unwrap().to_f64_vec();
        assert_eq!(u(UnaryOp::Rsqrt)[2], 0.5);
        assert_eq!(u(UnaryOp::Recip)[0], 2.0);
        assert_eq!(u(UnaryOp::Square)[1], 4.0);
        assert!((u(UnaryOp::Sigmoid)[0] - 1.0 / (1.0 + (-0.5f64).exp())).abs() < 1e-15);
        assert!((u(UnaryOp::Silu)[1] - 2.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
        assert!((u(UnaryOp::Tanh)[0] - 0.5f64.tanh()).abs() < 1e-15);
        assert!((u(UnaryOp::Log)[1] - 2.0f64.ln()).abs() < 1e-15);
        assert_eq!(u(UnaryOp::Sqrt)[2], 2.0);
        // A run in f64 refuses an f32 tensor rather than silently mixing precisions.
        assert!(unary::<f64>(UnaryOp::Exp, &Tensor::zeros(&[1])).is_err());
    }

    #[test]
    fn integer_ops() {
        let a = Tensor::i32(&[4], vec![7, -7, 3, i32::MIN]);
        let b = Tensor::i32(&[4], vec![2, 2, 0, 1]);
        assert!(binary::<f32>(BinaryOp::Div, &a, &b).unwrap_err().message.contains("division by zero"));
        let c = Tensor::i32(&[4], vec![2, 2, 1, 1]);
        assert_eq!(binary::<f32>(BinaryOp::Div, &a, &c).unwrap().as_i32().unwrap(), &[3, -3, 3, i32::MIN]);
        assert_eq!(binary::<f32>(BinaryOp::Pow, &a, &c).unwrap().as_i32().unwrap(), &[49, 49, 3, i32::MIN]);
        assert!(binary::<f32>(BinaryOp::Pow, &a, &Tensor::i32(&[], vec![-1])).is_err());
        assert_eq!(unary::<f32>(UnaryOp::Abs, &a).unwrap().as_i32().unwrap(), &[7, 7, 3, i32::MIN]);
        assert!(unary::<f32>(UnaryOp::Exp, &a).is_err());
        let e = binary::<f32>(BinaryOp::Eq, &a, &Tensor::i32(&[], vec![3])).unwrap();
        assert_eq!(e.as_bool().unwrap(), &[false, false, true, false]);
        assert!(binary::<f32>(BinaryOp::Add, &a, &Tensor::i64(&[4], vec![0; 4])).is_err());
    }

    #[test]
    fn select_and_cast() {
        let c = Tensor::bool(&[2, 1], vec![true, false]);
        let a = Tensor::from_fn(&[2, 3], |i| i as f32);
        let y = select(&c, &a, &Tensor::scalar(-1.0)).unwrap();
        assert_eq!(y.to_f32_vec(), vec![0.0, 1.0, 2.0, -1.0, -1.0, -1.0]);
        assert!(select(&a, &a, &a).is_err());

        let f = Tensor::f32(&[4], vec![1.7, -1.7, 0.0, 3.0]);
        assert_eq!(cast::<f32>(f.clone(), DType::I32).unwrap().as_i32().unwrap(), &[1, -1, 0, 3]);
        assert_eq!(cast::<f32>(f.clone(), DType::Bool).unwrap().as_bool().unwrap(), &[true, true, false, true]);
        assert_eq!(cast::<f64>(f.clone(), DType::Bf16).unwrap().as_f64().unwrap()[3], 3.0);
        assert!(cast::<f32>(Tensor::f32(&[1], vec![f32::NAN]), DType::I64).is_err());
        assert!(cast::<f32>(Tensor::i64(&[1], vec![1 << 40]), DType::I32).is_err());
        assert_eq!(cast::<f32>(Tensor::i64(&[1], vec![-5]), DType::I32).unwrap().as_i32().unwrap(), &[-5]);
        assert_eq!(cast::<f32>(Tensor::bool(&[1], vec![true]), DType::F32).unwrap().to_f32_vec(), vec![1.0]);
        let i = cast::<f32>(Tensor::i32(&[1], vec![1 << 30]), DType::I64).unwrap();
        assert_eq!(i.as_i64().unwrap(), &[1 << 30]);
    }
}
