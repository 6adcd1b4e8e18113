//! dsc-runtime: execution, checkpoints and the `dsc` command-line tool.

pub mod cli;
pub mod reference;
