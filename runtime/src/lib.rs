//! dsc-runtime: execution, checkpoints and the `dsc` command-line tool.

pub mod checkpoint;
pub mod cli;
// The CUDA runtime (feature `cuda`); its launch-ABI module and tests build everywhere.
#[cfg(any(feature = "cuda", test))]
pub mod cuda;
pub mod generate;
pub mod output;
pub mod plan_exec;
pub mod reference;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod repr;
pub mod rng;
pub mod sampling;
#[cfg(test)]
mod test_dir;
pub mod train;
#[cfg(feature = "wgpu")]
pub mod wgpu;
