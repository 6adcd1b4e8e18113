//! dsc-runtime: execution, checkpoints and the `dsc` command-line tool.

pub mod checkpoint;
pub mod cli;
pub mod generate;
pub mod reference;
pub mod rng;
pub mod sampling;
#[cfg(feature = "wgpu")]
pub mod wgpu;
