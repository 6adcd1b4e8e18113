//! Runs `dsc_compiler::codegen` kernels on an NVIDIA GPU through the CUDA driver API
//! (feature `cuda`; `dsc generate --backend cuda`).
//!
//! No CubeCL runtime is involved: each kernel's CUDA C++ (`kernel_source(spec,
//! Target::Cuda)`, the text `dsc compile --target cuda` writes) is compiled once per
//! kernel name with NVRTC ([`nvrtc`]) and launched with cudarc, its arguments laid out as
//! CubeCL's generated code expects them ([`abi`]). Launches come from the same
//! [`dsc_compiler::codegen::launch::NodeWork`]s as on wgpu and in `plan.json`, and whole
//! plans run through [`crate::plan_exec`].
//!
//! Both libraries are opened with dlopen at run time (cudarc's `dynamic-loading`), so the
//! feature builds on machines without CUDA; [`CudaBackend::new`] returns an error there.
//! [`abi`] needs no device and is tested in every build.

pub mod abi;
#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
pub mod nvrtc;

#[cfg(feature = "cuda")]
pub use backend::{CudaBackend, DeviceBuf, LaunchTime, Repr};

#[cfg(feature = "cuda")]
pub use engine::CudaEngine;

#[cfg(feature = "cuda")]
mod engine {
    use super::{CudaBackend, DeviceBuf};
    use crate::plan_exec::{self, DeviceWeights, PlanEngine};
    use crate::reference::{Tensor, Weights};
    use dsc_compiler::codegen::plan::Plan;

    impl CudaBackend {
        /// Runs the plan's entry on host `args` (in the entry's argument order) with
        /// `weights` (uploaded on first use and kept in `cache`) and returns its results
        /// as host tensors (`f32` for floats, `i32` for integers).
        pub fn run_plan(
            &self,
            plan: &Plan,
            args: &[Tensor],
            weights: &dyn Weights,
            cache: &DeviceWeights<DeviceBuf>,
        ) -> Result<Vec<Tensor>, String> {
            plan_exec::run_plan(self, plan, args, weights, cache)
        }
    }

    /// The CUDA device as a generation and training engine ([`PlanEngine`]).
    pub type CudaEngine = PlanEngine<CudaBackend>;

    impl PlanEngine<CudaBackend> {
        /// Device `index`, or why it cannot be opened.
        pub fn new(index: usize) -> Result<CudaEngine, String> {
            CudaBackend::new(index).map(CudaEngine::on)
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod bench;
#[cfg(all(test, feature = "cuda"))]
mod tests;
