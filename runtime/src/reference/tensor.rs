//! Host tensors: a concrete shape and contiguous row-major data of one element type.
//!
//! This is the value type of the reference interpreter and of its inputs, outputs and
//! weights. Inside a run every float tensor the ops compute holds the run's
//! [`super::Precision`]; weights may stay in their checkpoint's precision (`bf16`, `f16`,
//! FP8 e4m3 with block scales: [`super::narrow`]).

use super::narrow::Fp8;
use super::weights::{bf16_to_f32, f16_to_f32};
use std::fmt;

/// The elements of a tensor, row-major. One variant per element type the interpreter
/// computes with, and `Bf16`, `F16` and `F8` for weights kept in the checkpoint's
/// precision (their bits; `matmul`, `expert_ffn` and `gather` read them, widening to f32
/// as they go, and the interpreter widens them whole for any other op).
#[derive(Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
    F8(Fp8),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::Bool(v) => v.len(),
            Data::Bf16(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::F8(f) => f.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name, as the IR text form writes it.
    pub fn kind(&self) -> &'static str {
        match self {
            Data::F32(_) => "f32",
            Data::F64(_) => "f64",
            Data::I32(_) => "i32",
            Data::I64(_) => "i64",
            Data::Bool(_) => "bool",
            Data::Bf16(_) => "bf16",
            Data::F16(_) => "f16",
            Data::F8(_) => "f8e4m3",
        }
    }

    pub fn is_float(&self) -> bool {
        matches!(self, Data::F32(_) | Data::F64(_))
    }
}

impl fmt::Debug for Data {
    /// The kind and length only: printing a weight's elements is never what one wants.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.kind(), self.len())
    }
}

/// A tensor: shape (outermost first; a scalar has rank 0) and row-major data.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

/// A shape whose element count disagrees with the data handed to [`Tensor::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError {
    pub shape: Vec<usize>,
    pub len: usize,
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shape {:?} holds {} elements, but the data has {}", self.shape, numel(&self.shape), self.len)
    }
}

impl std::error::Error for ShapeError {}

/// Elements of a shape (1 for a scalar).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A tensor from a shape and data of the same element count.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor, ShapeError> {
        if numel(&shape) != data.len() {
            return Err(ShapeError { shape, len: data.len() });
        }
        Ok(Tensor { shape, data })
    }

    /// Like [`Tensor::new`] for callers that computed the data from the shape; a mismatch
    /// is a bug in the caller, so this panics.
    pub(crate) fn from_parts(shape: Vec<usize>, data: Data) -> Tensor {
        assert_eq!(numel(&shape), data.len(), "tensor shape {shape:?} vs {} elements", data.len());
        Tensor { shape, data }
    }

    /// Panics when `shape` does not hold `data.len()` elements (a test/construction helper).
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Tensor {
        Tensor::from_parts(shape.to_vec(), Data::F32(data))
    }
    pub fn f64(shape: &[usize], data: Vec<f64>) -> Tensor {
        Tensor::from_parts(shape.to_vec(), Data::F64(data))
    }
    pub fn i32(shape: &[usize], data: Vec<i32>) -> Tensor {
        Tensor::from_parts(shape.to_vec(), Data::I32(data))
    }
    pub fn i64(shape: &[usize], data: Vec<i64>) -> Tensor {
        Tensor::from_parts(shape.to_vec(), Data::I64(data))
    }
    pub fn bool(shape: &[usize], data: Vec<bool>) -> Tensor {
        Tensor::from_parts(shape.to_vec(), Data::Bool(data))
    }

    /// An `f32` tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::f32(shape, vec![0.0; numel(shape)])
    }

    /// An `f32` tensor whose element at row-major position `i` is `f(i)`.
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> f32) -> Tensor {
        Tensor::f32(shape, (0..numel(shape)).map(f).collect())
    }

    /// An `f32` scalar.
    pub fn scalar(v: f32) -> Tensor {
        Tensor::f32(&[], vec![v])
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// The tensor's first `shape[0]` entries along its first axis, as a tensor of `shape`,
    /// when the rest of `shape` is this tensor's (what a KV cache was before an append).
    pub fn leading(&self, shape: &[usize]) -> Option<Tensor> {
        let ok = shape.len() == self.rank() && !shape.is_empty() && shape[0] <= self.shape[0] && shape[1..] == self.shape[1..];
        if !ok {
            return None;
        }
        let n = numel(shape);
        let data = match &self.data {
            Data::F32(v) => Data::F32(v[..n].to_vec()),
            Data::F64(v) => Data::F64(v[..n].to_vec()),
            Data::I32(v) => Data::I32(v[..n].to_vec()),
            Data::I64(v) => Data::I64(v[..n].to_vec()),
            Data::Bool(v) => Data::Bool(v[..n].to_vec()),
            Data::Bf16(v) => Data::Bf16(v[..n].to_vec()),
            Data::F16(v) => Data::F16(v[..n].to_vec()),
            Data::F8(_) => return None,
        };
        Some(Tensor { shape: shape.to_vec(), data })
    }

    pub fn data(&self) -> &Data {
        &self.data
    }
    pub fn into_data(self) -> Data {
        self.data
    }
    pub fn into_parts(self) -> (Vec<usize>, Data) {
        (self.shape, self.data)
    }

    /// The same elements under another shape of equal element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Tensor, ShapeError> {
        Tensor::new(shape, self.data)
    }

    /// Row-major offset of a multi-index; `None` when its rank or any coordinate is out
    /// of range.
    pub fn offset(&self, index: &[usize]) -> Option<usize> {
        if index.len() != self.shape.len() {
            return None;
        }
        let mut off = 0;
        for (&i, &d) in index.iter().zip(&self.shape) {
            if i >= d {
                return None;
            }
            off = off * d + i;
        }
        Some(off)
    }

    /// The element at a multi-index as `f64` (integers and booleans convert; booleans as
    /// 0/1). `None` when the index is out of range.
    pub fn get(&self, index: &[usize]) -> Option<f64> {
        self.offset(index).map(|o| self.get_flat(o))
    }

    /// The element at a row-major position as `f64`. Panics when out of range.
    pub fn get_flat(&self, i: usize) -> f64 {
        match &self.data {
            Data::F32(v) => v[i] as f64,
            Data::F64(v) => v[i],
            Data::I32(v) => v[i] as f64,
            Data::I64(v) => v[i] as f64,
            Data::Bool(v) => v[i] as u8 as f64,
            Data::Bf16(v) => bf16_to_f32(v[i]) as f64,
            Data::F16(v) => f16_to_f32(v[i]) as f64,
            Data::F8(f) => f.get(i) as f64,
        }
    }

    /// Every element as `f64`, row-major.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
            Data::Bf16(v) => v.iter().map(|&x| bf16_to_f32(x) as f64).collect(),
            Data::F16(_) | Data::F8(_) => self.to_f32_vec().into_iter().map(|x| x as f64).collect(),
        }
    }

    /// Every element as `f32` (rounded from `f64`), row-major.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::Bf16(v) => v.iter().map(|&x| bf16_to_f32(x)).collect(),
            Data::F16(_) | Data::F8(_) => super::narrow::widen_f32(self).expect("narrow data"),
            _ => self.to_f64_vec().into_iter().map(|x| x as f32).collect(),
        }
    }

    /// Every element as `i64` when the tensor holds integers, `None` otherwise.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        match &self.data {
            Data::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            Data::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The first NaN or infinity of a float tensor: its flat index and "NaN" or "inf".
    pub fn first_non_finite(&self) -> Option<(usize, &'static str)> {
        let kind = |x: f64| if x.is_nan() { "NaN" } else { "inf" };
        match &self.data {
            Data::F32(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, kind(v[i] as f64))),
            Data::F64(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, kind(v[i]))),
            Data::Bf16(v) => v.iter().position(|&x| !bf16_to_f32(x).is_finite()).map(|i| (i, kind(bf16_to_f32(v[i]) as f64))),
            Data::F16(_) | Data::F8(_) => {
                let v = self.to_f32_vec();
                v.iter().position(|x| !x.is_finite()).map(|i| (i, kind(v[i] as f64)))
            }
            _ => None,
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<&[f64]> {
        match &self.data {
            Data::F64(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I32(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<&[bool]> {
        match &self.data {
            Data::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// bf16 elements given by their bits (a weight kept in its checkpoint's precision).
    pub fn bf16_bits(shape: &[usize], bits: Vec<u16>) -> Tensor {
        Tensor::from_parts(shape.to_vec(), Data::Bf16(bits))
    }

    pub fn as_bf16_bits(&self) -> Option<&[u16]> {
        match &self.data {
            Data::Bf16(v) => Some(v),
            _ => None,
        }
    }

    /// The same tensor with float elements as `f32` (others unchanged).
    pub fn to_f32(&self) -> Tensor {
        match &self.data {
            Data::F64(v) => Tensor::from_parts(self.shape.clone(), Data::F32(v.iter().map(|&x| x as f32).collect())),
            Data::Bf16(_) | Data::F16(_) | Data::F8(_) => Tensor::from_parts(self.shape.clone(), Data::F32(self.to_f32_vec())),
            _ => self.clone(),
        }
    }

    /// The same tensor with float elements as `f64` (others unchanged).
    pub fn to_f64(&self) -> Tensor {
        match &self.data {
            Data::F32(v) => Tensor::from_parts(self.shape.clone(), Data::F64(v.iter().map(|&x| x as f64).collect())),
            Data::Bf16(_) | Data::F16(_) | Data::F8(_) => Tensor::from_parts(self.shape.clone(), Data::F64(self.to_f64_vec())),
            _ => self.clone(),
        }
    }

    /// The largest `|a - b|` over all elements, compared as `f64`; `None` when the shapes
    /// differ. A NaN on either side (but not both) counts as an infinite difference, so a
    /// NaN never hides.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f64> {
        if self.shape != other.shape {
            return None;
        }
        let mut worst = 0.0f64;
        for i in 0..self.numel() {
            let (a, b) = (self.get_flat(i), other.get_flat(i));
            let d = if a.is_nan() && b.is_nan() || a == b {
                0.0
            } else if a.is_nan() || b.is_nan() {
                f64::INFINITY
            } else {
                (a - b).abs()
            };
            worst = worst.max(d);
        }
        Some(worst)
    }

    /// Whether the shapes agree and every element satisfies
    /// `|self - other| <= atol + rtol * |other|` (numpy's `allclose`, `other` the
    /// reference). NaNs are equal only to NaNs; equal infinities are close.
    pub fn allclose(&self, other: &Tensor, atol: f64, rtol: f64) -> bool {
        if self.shape != other.shape {
            return false;
        }
        (0..self.numel()).all(|i| {
            let (a, b) = (self.get_flat(i), other.get_flat(i));
            if a.is_nan() || b.is_nan() {
                return a.is_nan() && b.is_nan();
            }
            a == b || (a - b).abs() <= atol + rtol * b.abs()
        })
    }
}

impl fmt::Debug for Tensor {
    /// Shape, kind and up to eight leading elements.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<f64> = (0..self.numel().min(8)).map(|i| self.get_flat(i)).collect();
        let more = if self.numel() > 8 { ", ..." } else { "" };
        write!(f, "Tensor({}{:?} {:?}{more})", self.data.kind(), self.shape, shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construct_and_access() {
        let t = Tensor::from_fn(&[2, 3], |i| i as f32);
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.get(&[1, 2]), Some(5.0));
        assert_eq!(t.get(&[2, 0]), None);
        assert_eq!(t.get(&[0]), None);
        assert_eq!(Tensor::scalar(2.5).get(&[]), Some(2.5));
        assert!(Tensor::new(vec![2, 2], Data::I32(vec![1, 2, 3])).is_err());
        let r = t.clone().reshape(vec![3, 2]).unwrap();
        assert_eq!(r.get(&[2, 1]), Some(5.0));
        assert_eq!(Tensor::bool(&[2], vec![true, false]).to_f64_vec(), vec![1.0, 0.0]);
        assert_eq!(Tensor::i64(&[1], vec![7]).to_i64_vec(), Some(vec![7]));
        assert_eq!(t.to_f64().as_f64().unwrap()[4], 4.0);
    }

    #[test]
    fn comparisons() {
        let a = Tensor::f32(&[3], vec![1.0, 2.0, f32::NAN]);
        let b = Tensor::f64(&[3], vec![1.0, 2.001, f64::NAN]);
        assert!((a.max_abs_diff(&b).unwrap() - 0.001).abs() < 1e-9);
        assert!(a.allclose(&b, 1e-2, 0.0));
        assert!(!a.allclose(&b, 1e-4, 1e-4));
        assert!(a.allclose(&b, 0.0, 1e-3));
        let c = Tensor::f32(&[3], vec![1.0, 2.0, 3.0]);
        assert_eq!(a.max_abs_diff(&c), Some(f64::INFINITY));
        assert!(!a.allclose(&c, 1.0, 1.0));
        assert_eq!(a.max_abs_diff(&Tensor::zeros(&[2])), None);
    }
}
