//! Random weights for a spec (`spec:` + `init: {seed}` in a recipe): every param the
//! lowered module reads, training-only ones (MTP) included.
//!
//! As Hugging Face's `_init_weights` does for these models: matrices and embeddings
//! N(0, 0.02²) (`initializer_range`), norm gains 1, the routers' selection biases 0.
//! Each param draws from its own SplitMix64 stream, seeded by the seed and its name, so
//! a param's values do not depend on which other params the model has.

use super::TrainError;
use crate::reference::Tensor;
use crate::rng::SplitMix64;
use dsc_dsl::Spec;
use std::collections::HashMap;

/// Hugging Face's default `initializer_range`.
pub const INIT_STD: f64 = 0.02;

/// Random weights for every param of `spec`, deterministic from `seed`.
pub fn random_weights(spec: &Spec, seed: u64) -> Result<HashMap<String, Tensor>, TrainError> {
    let expected = crate::checkpoint::expected_params(spec).map_err(TrainError::Unsupported)?;
    Ok(expected.into_iter().map(|(name, e)| (name.clone(), init_param(&name, &e.shape, seed))).collect())
}

/// One param's initial value.
pub fn init_param(name: &str, shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    if shape.len() <= 1 {
        let v = if name.ends_with("norm.weight") { 1.0 } else { 0.0 };
        return Tensor::f32(shape, vec![v; n]);
    }
    let mut g = SplitMix64(seed ^ name_hash(name));
    Tensor::f32(shape, (0..n).map(|_| (INIT_STD * g.normal()) as f32).collect())
}

fn name_hash(name: &str) -> u64 {
    u64::from_str_radix(&super::recipe::fnv1a(name.as_bytes()), 16).expect("16 hex digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_param_deterministic_from_the_seed() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_v3.dsc");
        let spec = dsc_dsl::load(&path, None).unwrap();
        let a = random_weights(&spec, 7).unwrap();
        let expected = crate::checkpoint::expected_params(&spec).unwrap();
        assert_eq!(a.len(), expected.len());
        for (name, e) in &expected {
            assert_eq!(a[name].shape(), e.shape.as_slice(), "{name}");
        }
        assert_eq!(a, random_weights(&spec, 7).unwrap());
        let b = random_weights(&spec, 8).unwrap();
        let emb = "model.embed_tokens.weight";
        assert_ne!(a[emb], b[emb]);
        // Norm gains 1, the selection bias 0 (an MTP param too), matrices ~N(0, 0.02²).
        assert!(a["model.norm.weight"].to_f32_vec().iter().all(|&x| x == 1.0));
        assert!(a["model.layers.4.enorm.weight"].to_f32_vec().iter().all(|&x| x == 1.0));
        assert!(a["model.layers.2.mlp.gate.e_score_correction_bias"].to_f32_vec().iter().all(|&x| x == 0.0));
        let x = a[emb].to_f64_vec();
        let std = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt();
        assert!((std - INIT_STD).abs() < 0.001, "{std}");
        // A param's values do not depend on the others.
        assert_eq!(init_param(emb, &[256, 48], 7), a[emb]);
    }
}
