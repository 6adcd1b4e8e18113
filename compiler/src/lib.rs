//! dsc-compiler: from a resolved model to costs, IR and kernels.

pub mod codegen;
pub mod ir;
pub mod lower;
pub mod passes;
pub mod stats;
