//! The element traits the kernels are generic over.
//!
//! [`Elem`] is any element type a [`Data`] can hold, so layout kernels (gather, permute,
//! concat, top-k) are written once for all five. [`Real`] is the float type a run
//! computes in, `f32` or `f64`: every numeric kernel is generic over it, so an `f64`
//! check of an `f32` graph runs the very same code at higher precision.

use super::tensor::Data;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// An element type of [`Data`].
pub trait Elem: Copy + Send + Sync + PartialOrd + Debug + 'static {
    /// The slice when `d` holds this type.
    fn view(d: &Data) -> Option<&[Self]>;
    /// The vector when `d` holds this type, `d` back otherwise.
    fn take(d: Data) -> Result<Vec<Self>, Data>;
    fn wrap(v: Vec<Self>) -> Data;
    /// How [`Op::ScatterAdd`](dsc_compiler::ir::Op::ScatterAdd) and sum reductions combine
    /// two elements: `+` for numbers (wrapping for integers), `or` for booleans.
    fn accumulate(self, other: Self) -> Self;
    /// The identity of [`Elem::accumulate`].
    fn zero() -> Self;
}

macro_rules! elem {
    ($t:ty, $var:ident, $acc:expr, $zero:expr) => {
        impl Elem for $t {
            fn view(d: &Data) -> Option<&[Self]> {
                match d {
                    Data::$var(v) => Some(v),
                    _ => None,
                }
            }
            fn take(d: Data) -> Result<Vec<Self>, Data> {
                match d {
                    Data::$var(v) => Ok(v),
                    other => Err(other),
                }
            }
            fn wrap(v: Vec<Self>) -> Data {
                Data::$var(v)
            }
            fn accumulate(self, other: Self) -> Self {
                let f: fn($t, $t) -> $t = $acc;
                f(self, other)
            }
            fn zero() -> Self {
                $zero
            }
        }
    };
}

elem!(f32, F32, |a, b| a + b, 0.0);
elem!(f64, F64, |a, b| a + b, 0.0);
elem!(i32, I32, |a: i32, b| a.wrapping_add(b), 0);
elem!(i64, I64, |a: i64, b| a.wrapping_add(b), 0);
elem!(bool, Bool, |a, b| a || b, false);
// bf16 weights as their bits: the movement ops (slice, permute, concat, gather) move them
// as they are; arithmetic widens first (the interpreter sees to it), so the ordering of
// the bits is never used as a value's, and the sum is rounded from f32.
elem!(u16, Bf16, |a: u16, b| super::weights::f32_to_bf16(super::weights::bf16_to_f32(a) + super::weights::bf16_to_f32(b)), 0);

/// The float type a run computes in.
pub trait Real:
    Elem + Default + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self> + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    /// The name of the precision, for messages.
    const NAME: &'static str;

    /// Round an `f64` to this type.
    fn of(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, e: Self) -> Self;
    fn is_nan(self) -> bool;
    /// `max`/`min` that propagate NaN (as torch's `maximum`/`minimum`), unlike
    /// `f32::max`, which would hide a NaN produced upstream.
    fn max_nan(self, o: Self) -> Self {
        if self.is_nan() || o.is_nan() {
            Self::of(f64::NAN)
        } else if o > self {
            o
        } else {
            self
        }
    }
    fn min_nan(self, o: Self) -> Self {
        if self.is_nan() || o.is_nan() {
            Self::of(f64::NAN)
        } else if o < self {
            o
        } else {
            self
        }
    }
    /// `σ(x) = 1 / (1 + e^-x)`; saturates cleanly to 0 and 1.
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }
    /// `x·σ(x)`.
    fn silu(self) -> Self {
        self * self.sigmoid()
    }
}

macro_rules! real {
    ($t:ty, $name:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            const NAME: &'static str = $name;
            fn of(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn powf(self, e: Self) -> Self {
                <$t>::powf(self, e)
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}

real!(f32, "f32");
real!(f64, "f64");

/// The order top-k and routing use: larger first, NaN above everything (as
/// `torch.topk`), and among equals the lower index first, so results never depend on
/// the sort algorithm.
pub fn desc_then_index<E: Elem>(a: (E, usize), b: (E, usize)) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    #[allow(clippy::eq_op)] // x != x is the NaN test that works for every Elem.
    let (an, bn) = (a.0 != a.0, b.0 != b.0);
    let by_value = match (an, bn) {
        (true, true) => Equal,
        (true, false) => Less,
        (false, true) => Greater,
        (false, false) => b.0.partial_cmp(&a.0).unwrap_or(Equal),
    };
    by_value.then(a.1.cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering() {
        let mut v = [(1.0f32, 0), (f32::NAN, 1), (3.0, 2), (1.0, 3), (3.0, 4)];
        v.sort_by(|a, b| desc_then_index(*a, *b));
        let idx: Vec<usize> = v.iter().map(|p| p.1).collect();
        assert_eq!(idx, vec![1, 2, 4, 0, 3]);
        let mut b = [(false, 0), (true, 1), (true, 2)];
        b.sort_by(|a, b| desc_then_index(*a, *b));
        assert_eq!(b.iter().map(|p| p.1).collect::<Vec<_>>(), vec![1, 2, 0]);
    }

    #[test]
    fn real_helpers() {
        assert_eq!(f32::of(0.5).max_nan(1.0), 1.0);
        assert!(f64::NAN.max_nan(1.0).is_nan());
        assert!(1.0f64.min_nan(f64::NAN).is_nan());
        assert_eq!((-1e4f32).sigmoid(), 0.0);
        assert_eq!(1e4f32.sigmoid(), 1.0);
        assert!((2.0f64.silu() - 2.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
        assert_eq!(i32::zero().accumulate(3), 3);
        assert!(false.accumulate(true));
    }
}
