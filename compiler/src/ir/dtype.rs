//! Element types and tensor types of IR values.
//!
//! The IR has its own [`DType`] rather than reusing `dsc_dsl::model::DType`: the spec only
//! names storage types of weights, while the IR also needs integer ids and indices and
//! booleans for masks (the AST/IR split of naga's frontends, applied to types).

use super::dim::Shape;
use std::fmt;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// FP8 e4m3; block scales are separate tensors.
    F8E4M3,
    /// Token ids, positions, expert indices.
    I32,
    I64,
    /// Results of comparisons; the condition of `select`.
    Bool,
}

impl DType {
    /// The name used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8e4m3",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::Bf16 | DType::F16 | DType::F8E4M3)
    }
    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }
    /// Bytes per element (`Bool` is stored as one byte).
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::F8E4M3 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }
}

impl From<dsc_dsl::model::DType> for DType {
    fn from(d: dsc_dsl::model::DType) -> DType {
        use dsc_dsl::model::DType as M;
        match d {
            M::F32 => DType::F32,
            M::Bf16 => DType::Bf16,
            M::F16 => DType::F16,
            M::Fp8 => DType::F8E4M3,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of one value: element type and shape. Prints as `bf16[b,s,7168]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ty {
    pub dtype: DType,
    pub shape: Shape,
}

impl Ty {
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> Ty {
        Ty { dtype, shape: shape.into() }
    }
    pub fn scalar(dtype: DType) -> Ty {
        Ty { dtype, shape: Shape::scalar() }
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::dim::Dim;

    #[test]
    fn names_and_classes() {
        let t = Ty::new(DType::Bf16, [Dim::B, Dim::S, Dim::lit(7168)]);
        assert_eq!(t.to_string(), "bf16[b,s,7168]");
        assert_eq!(Ty::scalar(DType::F32).to_string(), "f32[]");
        assert!(DType::F8E4M3.is_float() && !DType::I32.is_float());
        assert!(DType::I64.is_int() && !DType::Bool.is_int());
        assert_eq!(DType::from(dsc_dsl::model::DType::Fp8), DType::F8E4M3);
        assert_eq!(DType::from(dsc_dsl::model::DType::Bf16).bytes(), 2);
    }
}
