//! All integration tests, as modules of one test binary: each test binary links CubeCL,
//! wgpu and the whole runtime, so one binary instead of fourteen saves minutes of linking
//! and gigabytes of disk. Run one group with a filter, e.g.
//! `cargo test -p dsc-tests --test integration robustness::`.

mod autodiff;
mod demo;
mod equivalence;
mod equivalence_mla;
mod hf_parity;
mod import;
mod ir_snapshots;
mod kernels_golden;
mod lowered_params;
mod nonfinite;
mod outputs;
mod pass_pipelines;
mod passes;
mod print;
mod readme;
mod resolved;
mod robustness;
mod stats;
mod train_parity;
mod ui;
