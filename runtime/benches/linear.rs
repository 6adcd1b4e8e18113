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
//! The ratio columns are each time over gemm's; GFLOP/s is the fastest column's. The
//! machine's peaks are measured first, in the same run: f32 FMA and bf16 dot-product
//! throughput from independent register-resident chains on every thread, and the read
//! bandwidth of a 256 MiB sweep. The last columns put each shape against the peak that
//! bounds it: a few rows of `x` (up to 16) read the weight once, so the f32 and bf16
//! paths' weight bytes per second against the bandwidth (for the large weights; an
//! expert's stays in cache); more rows are arithmetic, so the f32 path's FLOP/s against
//! the f32 peak and `bf16in`'s against the bf16 peak.
//! Shapes: a 32,000-row head and a 4,096-square projection (weight-bound: one task per
//! 64 weight rows, on rayon's threads) and one expert of 256 × 512 on one thread (the
//! expert FFN runs experts in parallel, each sequentially).

use dsc_runtime::reference::linalg::{gemm, linear, linear_bf16, Mat};
use rayon::prelude::*;
use std::time::Instant;

/// Peak f32 FLOP/s of this machine: every thread runs 12 independent FMA chains of the
/// widest vectors it has for a fixed count; the best of 5.
fn peak_f32_flops() -> f64 {
    const ITERS: usize = 1 << 22;
    let one = || -> f64 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { fma_chains_avx512(ITERS) } * (ITERS * 12 * 16 * 2) as f64;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { fma_chains_avx2(ITERS) } * (ITERS * 12 * 8 * 2) as f64;
            }
        }
        0.0
    };
    best_over_threads(one)
}

/// Peak bf16 FLOP/s (`vdpbf16ps`: 32 products and sums per instruction), or 0 when the
/// CPU lacks AVX-512 BF16.
fn peak_bf16_flops() -> f64 {
    const ITERS: usize = 1 << 22;
    best_over_threads(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512bf16") {
                // SAFETY: the CPU has AVX-512 BF16.
                return unsafe { dpbf16_chains(ITERS) } * (ITERS * 12 * 32 * 2) as f64;
            }
        }
        0.0
    })
}

/// Runs `one` (which returns work per second of its thread's run, in units of 1/seconds
/// times the work it reports) on every rayon thread at once: the sum, best of 5.
fn best_over_threads(one: impl Fn() -> f64 + Sync) -> f64 {
    let threads = rayon::current_num_threads();
    (0..5).map(|_| (0..threads).into_par_iter().map(|_| one()).sum::<f64>()).fold(0.0, f64::max)
}

/// 1 / seconds for `iters` rounds of `step` on 12 independent chains from `init` (inlined
/// into each caller, so `step` runs with the caller's vector features).
#[inline(always)]
fn time_chains<V: Copy>(iters: usize, init: V, step: impl Fn(V) -> V) -> f64 {
    let mut acc = [init; 12];
    let t = Instant::now();
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = step(*v);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(acc);
    1.0 / secs
}

/// 1 / seconds for `iters` rounds of 12 independent 16-lane FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_chains_avx512(iters: usize) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_9), _mm512_set1_ps(1e-7));
    time_chains(iters, _mm512_set1_ps(1.0), |v| _mm512_fmadd_ps(v, a, b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_chains_avx2(iters: usize) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_9), _mm256_set1_ps(1e-7));
    time_chains(iters, _mm256_set1_ps(1.0), |v| _mm256_fmadd_ps(v, a, b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dpbf16_chains(iters: usize) -> f64 {
    use std::arch::x86_64::*;
    let x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
    time_chains(iters, _mm512_setzero_ps(), |v| _mm512_dpbf16_ps(v, x, x))
}

/// Read bandwidth in bytes/s: every thread sums its part of a 256 MiB buffer (far past
/// the caches) into 32 independent lanes, so the adds keep up with memory; best of 5.
fn read_bandwidth() -> f64 {
    let v: Vec<f32> = (0..64 << 20).map(|i| (i % 7) as f32).collect();
    let lanes = |c: &[f32]| -> f32 {
        let mut acc = [0f32; 32];
        for row in c.chunks_exact(32) {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += x;
            }
        }
        acc.iter().sum()
    };
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let s: f32 = v.par_chunks(1 << 16).map(lanes).sum();
            std::hint::black_box(s);
            (v.len() * 4) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    let mut reps: usize = 20;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--reps" {
            reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(reps);
        }
    }
    let (f32_peak, bf16_peak, bandwidth) = (peak_f32_flops(), peak_bf16_flops(), read_bandwidth());
    println!(
        "peaks on {} threads: f32 {:.0} GFLOP/s, bf16 dot {:.0} GFLOP/s, read {:.1} GB/s",
        rayon::current_num_threads(),
        f32_peak / 1e9,
        bf16_peak / 1e9,
        bandwidth / 1e9
    );
    println!(
        "{:>22} {:>4} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>16}",
        "n×k, threads", "m", "gemm µs", "f32 µs", "bf16 µs", "bf16in µs", "f32", "bf16", "bf16in", "GFLOP/s", "of its peak"
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
            // One thread's shapes against one thread's share of the peaks.
            let share = if parallel { 1.0 } else { 1.0 / rayon::current_num_threads() as f64 };
            let flops = 2.0 * (m * n * k) as f64;
            let of_peak = if m <= 16 && !parallel {
                // One expert's weight stays in cache between calls: no DRAM bound applies.
                "in cache".to_string()
            } else if m <= 16 {
                let bytes = (n * k) as f64;
                format!("{:.0}% {:.0}% of GB/s", 400.0 * bytes / td / (bandwidth * share), 200.0 * bytes / tb / (bandwidth * share))
            } else {
                let bf = if bf16_peak > 0.0 { format!("{:.0}%", 100.0 * flops / ti / (bf16_peak * share)) } else { "-".into() };
                format!("{:.0}% {bf} of FLOP/s", 100.0 * flops / td / (f32_peak * share))
            };
            println!(
                "{shape:>22} {m:>4} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.2} {:>7.2} {:>7.2} {:>7.1} {of_peak:>16}",
                tg * 1e6,
                td * 1e6,
                tb * 1e6,
                ti * 1e6,
                td / tg,
                tb / tg,
                ti / tg,
                flops / best / 1e9
            );
        }
    }
}
