//! Where the interpreter gets weights: the [`Weights`] trait, a `HashMap` implementation,
//! and a safetensors reader that widens storage types to `f32`.
//!
//! Names are the IR's full param paths ([`dsc_compiler::ir::param_path`]), e.g.
//! `model.layers.3.self_attn.kv_b_proj.weight`; turning a checkpoint into tensors of those
//! names (stacking per-expert matrices along a leading expert axis, say) is the weight
//! loader's business, not this module's.

use super::tensor::{Data, Tensor};
use std::collections::HashMap;

/// A source of weights by full param path.
/// `Sync` so a run may read weights from rayon threads.
pub trait Weights: Sync {
    fn get(&self, name: &str) -> Option<&Tensor>;
}

impl Weights for HashMap<String, Tensor> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        HashMap::get(self, name)
    }
}

impl<W: Weights + ?Sized> Weights for &W {
    fn get(&self, name: &str) -> Option<&Tensor> {
        (**self).get(name)
    }
}

/// `f32` to `bf16` bits, rounded to nearest (ties to even).
pub fn f32_to_bf16(x: f32) -> u16 {
    // Round to nearest, ties to even, on the upper 16 bits; NaN stays a (quiet) NaN.
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `bf16` bits to `f32` (exact: bf16 is the top half of an f32).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// IEEE half bits to `f32` (exact, subnormals, infinities and NaN included).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1f) as i32;
    let man = (bits & 0x3ff) as f32;
    sign * match exp {
        0 => man * 2f32.powi(-24),
        31 if man == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + man / 1024.0) * 2f32.powi(e - 15),
    }
}

/// FP8 e4m3 (the `fn` variant DeepSeek-V3 stores: no infinities, `S.1111.111` is NaN,
/// largest finite 448) to `f32`. Block scales are separate tensors the graph applies.
pub fn f8e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((bits >> 3) & 0xf) as i32;
    let man = (bits & 0x7) as f32;
    sign * match exp {
        0 => man / 8.0 * 2f32.powi(-6),
        15 if man == 7.0 => f32::NAN,
        e => (1.0 + man / 8.0) * 2f32.powi(e - 7),
    }
}

/// Every tensor of a safetensors file, by its stored name. `bf16`, `f16` and `f8_e4m3`
/// become `f32`; `f32`, `f64`, `i32`, `i64` and `bool` stay as they are; other types are
/// refused with the tensor's name.
pub fn load_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>, String> {
    use safetensors::{Dtype, SafeTensors};
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    if let Some(name) = crate::checkpoint::files::duplicate_name(bytes) {
        return Err(format!("the safetensors header names tensor `{name}` twice (the format forbids it)"));
    }
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let b = view.data();
        let pairs = || b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        let quads = || b.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
        let octs = || b.chunks_exact(8).map(|c| [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let data = match view.dtype() {
            Dtype::F32 => Data::F32(quads().map(f32::from_le_bytes).collect()),
            Dtype::F64 => Data::F64(octs().map(f64::from_le_bytes).collect()),
            Dtype::BF16 => Data::F32(pairs().map(bf16_to_f32).collect()),
            Dtype::F16 => Data::F32(pairs().map(f16_to_f32).collect()),
            Dtype::F8_E4M3 => Data::F32(b.iter().map(|&x| f8e4m3_to_f32(x)).collect()),
            Dtype::I32 => Data::I32(quads().map(i32::from_le_bytes).collect()),
            Dtype::I64 => Data::I64(octs().map(i64::from_le_bytes).collect()),
            Dtype::BOOL => Data::Bool(b.iter().map(|&x| x != 0).collect()),
            other => return Err(format!("tensor `{name}` has element type {other:?}, which dsc does not load")),
        };
        let t = Tensor::new(view.shape().to_vec(), data).map_err(|e| format!("tensor `{name}`: {e}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_floats_decode_exactly() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc040), -3.0);
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0xc0), -2.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(f8e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn safetensors_roundtrip() {
        use safetensors::tensor::{serialize, TensorView};
        use safetensors::Dtype;
        let f: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let h: Vec<u8> = [0x3c00u16, 0x4000].iter().flat_map(|x| x.to_le_bytes()).collect();
        let bf: Vec<u8> = [0x3f80u16].iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![
            ("a", TensorView::new(Dtype::F32, vec![2], &f).unwrap()),
            ("b", TensorView::new(Dtype::F16, vec![1, 2], &h).unwrap()),
            ("c", TensorView::new(Dtype::BF16, vec![], &bf).unwrap()),
        ];
        let bytes = serialize(views, None).unwrap();
        let w = load_safetensors(&bytes).unwrap();
        assert_eq!(w["a"].to_f32_vec(), vec![1.5, -2.0]);
        assert_eq!(w["b"].shape(), &[1, 2]);
        assert_eq!(w["b"].to_f32_vec(), vec![1.0, 2.0]);
        assert_eq!(w["c"].to_f32_vec(), vec![1.0]);
        assert!(Weights::get(&w, "a").is_some() && Weights::get(&w, "z").is_none());
        assert!(load_safetensors(b"nope").is_err());
    }
}
