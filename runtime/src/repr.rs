//! How the device runtimes hold elements: floats in the kernel's element type (`f32`,
//! `f16`, `bf16`), integers (token ids, positions, expert indices) as `i32`. One
//! [`Repr`] and one host encoding for every device, so wgpu and CUDA upload, poison and
//! download the same bytes (little-endian, as both devices store them).

use crate::reference::{Data, Tensor};
use dsc_compiler::ir::DType;

/// How a device buffer holds its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repr {
    F32,
    F16,
    Bf16,
    I32,
}

impl Repr {
    /// The device representation of an IR dtype, or why there is none yet.
    pub fn of(d: DType) -> Result<Repr, String> {
        match d {
            DType::F32 => Ok(Repr::F32),
            DType::F16 => Ok(Repr::F16),
            DType::Bf16 => Ok(Repr::Bf16),
            DType::I32 | DType::I64 => Ok(Repr::I32),
            other => Err(format!("no device representation for {} yet", other.name())),
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Repr::F32 | Repr::I32 => 4,
            Repr::F16 | Repr::Bf16 => 2,
        }
    }

    /// `t`'s elements as this representation's bytes (integers must fit in `i32`).
    pub fn encode(self, t: &Tensor) -> Result<Vec<u8>, String> {
        Ok(match (self, t.data()) {
            (Repr::I32, Data::I64(v)) => v
                .iter()
                .map(|&x| i32::try_from(x).map(i32::to_le_bytes).map_err(|_| format!("index {x} exceeds i32")))
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            (Repr::I32, Data::I32(v)) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            (Repr::I32, d) => return Err(format!("{} data for an integer buffer", d.kind())),
            (Repr::F32, _) => t.to_f32_vec().iter().flat_map(|x| x.to_le_bytes()).collect(),
            (Repr::F16, _) => t.to_f32_vec().iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            (Repr::Bf16, _) => t.to_f32_vec().iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        })
    }

    /// `len` elements that cannot pass for a result: NaN, or `i32::MIN` for integers.
    pub fn poison(self, len: usize) -> Vec<u8> {
        let one: Vec<u8> = match self {
            Repr::F32 => f32::NAN.to_le_bytes().to_vec(),
            Repr::F16 => half::f16::NAN.to_le_bytes().to_vec(),
            Repr::Bf16 => half::bf16::NAN.to_le_bytes().to_vec(),
            Repr::I32 => i32::MIN.to_le_bytes().to_vec(),
        };
        one.repeat(len)
    }

    /// The first `shape`'s worth of elements of `bytes` as a tensor: `f32` for floats,
    /// `i32` for integers.
    pub fn decode(self, bytes: &[u8], shape: &[usize]) -> Result<Tensor, String> {
        let n: usize = shape.iter().product();
        let bytes = bytes.get(..n * self.bytes()).ok_or_else(|| format!("reading {n} elements of {} bytes", bytes.len()))?;
        Ok(match self {
            Repr::F32 => Tensor::f32(shape, bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Repr::F16 => Tensor::f32(shape, bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            Repr::Bf16 => Tensor::f32(shape, bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            Repr::I32 => Tensor::i32(shape, bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refusals() {
        let t = Tensor::f32(&[2, 2], vec![1.0, -2.5, 0.1, 65504.0]);
        for r in [Repr::F32, Repr::F16, Repr::Bf16] {
            let back = r.decode(&r.encode(&t).unwrap(), &[2, 2]).unwrap().to_f32_vec();
            let tol = if r == Repr::Bf16 { 1e-2 } else { 1e-3 };
            for (a, b) in back.iter().zip(t.to_f32_vec()) {
                assert!((a - b).abs() <= tol * b.abs(), "{r:?}: {a} vs {b}");
            }
        }
        let ids = Tensor::i64(&[3], vec![0, 7, -1]);
        assert_eq!(Repr::I32.decode(&Repr::I32.encode(&ids).unwrap(), &[3]).unwrap(), Tensor::i32(&[3], vec![0, 7, -1]));
        assert!(Repr::I32.encode(&Tensor::i64(&[1], vec![1 << 40])).unwrap_err().contains("exceeds i32"));
        assert!(Repr::I32.encode(&t).is_err());
        // A buffer with room: the front is read.
        let bytes = Repr::F32.encode(&Tensor::f32(&[3], vec![1.0, 2.0, 3.0])).unwrap();
        assert_eq!(Repr::F32.decode(&bytes, &[2]).unwrap().to_f32_vec(), vec![1.0, 2.0]);
        assert!(Repr::F32.decode(&bytes, &[4]).is_err());
        assert!(Repr::F16.poison(2).chunks(2).all(|c| half::f16::from_le_bytes([c[0], c[1]]).is_nan()));
        assert_eq!(Repr::of(DType::Bf16), Ok(Repr::Bf16));
    }
}
