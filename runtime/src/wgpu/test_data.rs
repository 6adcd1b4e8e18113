//! What every kernel test suite shares: the device (one per test binary) and the
//! deterministic random inputs. The suites also run on CUDA (`cuda/tests.rs` includes
//! them with `#[path]`), where `super::WgpuBackend` is a shim over the CUDA device, so
//! this file names only `super::WgpuBackend`.

use super::WgpuBackend;
use crate::reference::Tensor;
use dsc_compiler::ir::DType;
use std::sync::OnceLock;

/// One client for the whole test binary: adapter start-up is the slow part.
pub(super) fn backend() -> &'static WgpuBackend {
    static B: OnceLock<WgpuBackend> = OnceLock::new();
    B.get_or_init(WgpuBackend::new)
}

/// Deterministic values in ±[0.25, 1.25): never 0, so a kernel that drops a term or
/// reads the wrong element shows.
pub(super) fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    Tensor::from_fn(shape, |_| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = (s >> 40) as f32 / (1u64 << 24) as f32;
        let v = if u < 0.5 { -(0.25 + 2.0 * u) } else { 0.25 + 2.0 * (u - 0.5) };
        // An f16 kernel sees f16 inputs: give the reference the same values.
        if dtype == DType::F16 {
            half::f16::from_f32(v).to_f32()
        } else {
            v
        }
    })
}
