//! `x · wᵀ` at decode shapes: `linear` (the dot path up to 16 rows of x, with the
//! weight in f32 or bf16) against the gemm crate on the same operands, interleaved, as
//! ratios in one run (this machine varies ±30% between runs).
//!
//! ```text
//! cargo bench -p dsc-runtime --bench linear [-- --reps 20]
//! ```
//!
//! Shapes: a 32,000-row head and a 4,096-square projection (weight-bound: one task per
//! 64 weight rows, on rayon's threads) and one expert of 256 × 512 on one thread (the
//! expert FFN runs experts in parallel, each sequentially).

use dsc_runtime::reference::linalg::{gemm, linear, linear_bf16, Mat};
use std::time::Instant;

fn main() {
    let mut reps = 20;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--reps" {
            reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(reps);
        }
    }
    println!(
        "{:>28} {:>4} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "shape (n×k, threads)", "m", "gemm µs", "dot µs", "bf16 µs", "dot/gemm", "bf16/gemm"
    );
    for &(n, k, parallel) in &[(32000usize, 512usize, true), (4096, 4096, true), (256, 512, false), (512, 256, false)] {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5).collect();
        let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        for &m in &[1usize, 4, 8, 16] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729 % 1000) as f32 / 1000.0) - 0.5).collect();
            let (mut tg, mut td, mut tb) = (f64::MAX, f64::MAX, f64::MAX);
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
                std::hint::black_box(linear_bf16(&x, m, k, &wb, n, parallel).unwrap());
                tb = tb.min(t.elapsed().as_secs_f64());
            }
            let shape = format!("{n}×{k}, {}", if parallel { "all" } else { "one" });
            println!("{shape:>28} {m:>4} {:>10.1} {:>10.1} {:>10.1} {:>8.2} {:>8.2}", tg * 1e6, td * 1e6, tb * 1e6, td / tg, tb / tg);
        }
    }
}
