//! `x · wᵀ` at decode and prompt shapes: `linear` (the dot path up to 16 rows of x, the
//! gemm crate past it) with the weight in f32, in bf16, and in bf16 with `x` rounded to
//! bf16 (`bf16_inputs`: AVX-512 BF16 past 16 rows where the CPU has it), against the gemm
//! crate on the same f32 operands, interleaved, as ratios in one run (this machine varies
//! ±30% between runs).
//!
//! ```text
//! cargo bench -p dsc-runtime --bench linear [-- --reps 20]
//! ```
//!
//! The ratio columns are each time over gemm's; GFLOP/s is the fastest column's.
//! Shapes: a 32,000-row head and a 4,096-square projection (weight-bound: one task per
//! 64 weight rows, on rayon's threads) and one expert of 256 × 512 on one thread (the
//! expert FFN runs experts in parallel, each sequentially).

use dsc_runtime::reference::linalg::{gemm, linear, linear_bf16, Mat};
use std::time::Instant;

fn main() {
    let mut reps: usize = 20;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--reps" {
            reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(reps);
        }
    }
    println!(
        "{:>22} {:>4} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7}",
        "n×k, threads", "m", "gemm µs", "f32 µs", "bf16 µs", "bf16in µs", "f32", "bf16", "bf16in", "GFLOP/s"
    );
    for &(n, k, parallel) in &[(32000usize, 512usize, true), (4096, 4096, true), (256, 512, false), (512, 256, false)] {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5).collect();
        let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        for &m in &[1usize, 4, 8, 16, 64, 512] {
            let reps = if m * n * k > 1 << 30 { reps.div_ceil(4) } else { reps };
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729 % 1000) as f32 / 1000.0) - 0.5).collect();
            let (mut tg, mut td, mut tb, mut ti) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..reps {
                let t = Instant::now();
                let mut out = vec![0f32; m * n];
                gemm(m, n, k, &mut out, Mat::rows(&x, 0, k), Mat { data: &w, offset: 0, rs: 1, cs: k }, parallel);
                std::hint::black_box(&out);
                tg = tg.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                std::hint::black_box(linear(&x, m, k, &w, n, parallel).unwrap());
                td = td.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                std::hint::black_box(linear_bf16(&x, m, k, &wb, n, parallel, false).unwrap());
                tb = tb.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                std::hint::black_box(linear_bf16(&x, m, k, &wb, n, parallel, true).unwrap());
                ti = ti.min(t.elapsed().as_secs_f64());
            }
            let shape = format!("{n}×{k}, {}", if parallel { "all" } else { "one" });
            let best = td.min(tb).min(ti).min(tg);
            println!(
                "{shape:>22} {m:>4} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.2} {:>7.2} {:>7.2} {:>7.1}",
                tg * 1e6,
                td * 1e6,
                tb * 1e6,
                ti * 1e6,
                td / tg,
                tb / tg,
                ti / tg,
                2.0 * (m * n * k) as f64 / best / 1e9
            );
        }
    }
}
