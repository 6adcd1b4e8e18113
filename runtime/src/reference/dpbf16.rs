//! `x · wᵀ` with a bf16 weight and `x` rounded to bf16, multiplied by the CPU's bf16
//! dot-product instruction (`vdpbf16ps`, AVX-512 BF16): each instruction multiplies 16
//! pairs of bf16 pairs and adds them to 16 `f32` sums, twice the multiply-adds of an
//! `f32` FMA of the same width. What a GPU's bf16 matmul computes: bf16 operands, exact
//! products, `f32` sums. Used by the reference backend's `bf16_inputs` option for many
//! rows of `x` (the prompt pass); [`available`] says whether this CPU can.
//!
//! The operands are read as they lie, `[rows][k]`: a weight row's consecutive bf16 pairs
//! are exactly what the instruction pairs, so the weight needs no repacking (an expert's
//! matrices are small and many: packing each per call cost as much as multiplying it).
//! Each tile keeps 4 rows of `x` × 4 weight rows of 16-lane sums along `k` and adds each
//! one's lanes at the end.

use super::weights::f32_to_bf16;

/// Weight bytes per task: whole rows, kept in cache while every row of `x` passes (tasks
/// over rows of `x` instead would each read the whole weight from memory).
const TASK_BYTES: usize = 128 << 10;

/// Rows of `x` and of the weight per tile: 16 accumulators, 8 loads per 16 instructions.
const MR: usize = 4;
const NR: usize = 4;

/// Whether this CPU runs [`linear`] (AVX-512 F and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x [m, k] · wᵀ` with `w: [n, k]` (bf16 bits) into `[m, n]` `f32`s, `x` rounded to bf16
/// (nearest, ties to even). `None` when the CPU lacks AVX-512 BF16 ([`available`]) or `k`
/// is odd (a row's last pair would run into the next row). `parallel` spreads blocks of
/// weight rows over rayon's threads.
pub fn linear(x: &[f32], m: usize, k: usize, w: &[u16], n: usize, parallel: bool) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    assert!(x.len() == m * k && w.len() == n * k, "dpbf16: operands are not [{m}, {k}] and [{n}, {k}]");
    if !available() || k % 2 == 1 {
        return None;
    }
    let xb: Vec<u16> = if parallel {
        x.par_chunks(1 << 14).flat_map_iter(|c| c.iter().map(|&v| f32_to_bf16(v))).collect()
    } else {
        x.iter().map(|&v| f32_to_bf16(v)).collect()
    };
    let rows = (TASK_BYTES / (2 * k).max(1)).next_multiple_of(NR).max(NR);
    Some(super::linalg::column_blocks(m, n, rows, parallel, |j0, nb| {
        let wb = &w[j0 * k..(j0 + nb) * k];
        let mut y = vec![0f32; m * nb];
        let mut j = 0;
        while j < nb {
            let c = (nb - j).min(NR);
            let mut i = 0;
            while i < m {
                let r = (m - i).min(MR);
                let mut acc = [[0f32; NR]; MR];
                // SAFETY: `available()` said the CPU has the features; the slices hold r
                // and c rows of k (the tile's assertions).
                unsafe { tile(&xb[i * k..(i + r) * k], r, &wb[j * k..(j + c) * k], c, k, &mut acc) };
                for (ii, row) in acc.iter().enumerate().take(r) {
                    y[(i + ii) * nb + j..(i + ii) * nb + j + c].copy_from_slice(&row[..c]);
                }
                i += r;
            }
            j += c;
        }
        y
    }))
}

/// The `r × c` dot products of `r` rows of `x` and `c` weight rows (bf16, `k` even),
/// into `acc[..r][..c]`. Rows past `r` or `c` repeat the last one (their sums are
/// computed and dropped), so the loop has one shape.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(x: &[u16], r: usize, w: &[u16], c: usize, k: usize, acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    assert!((1..=MR).contains(&r) && (1..=NR).contains(&c) && k.is_multiple_of(2) && x.len() >= r * k && w.len() >= c * k);
    let xr: [*const u32; MR] = std::array::from_fn(|i| x[i.min(r - 1) * k..].as_ptr() as *const u32);
    let wr: [*const u32; NR] = std::array::from_fn(|j| w[j.min(c - 1) * k..].as_ptr() as *const u32);
    let mut sums = [[_mm512_setzero_ps(); NR]; MR];
    let (pairs, mut p) = (k / 2, 0);
    while p < pairs {
        // 16 pairs, or the masked rest (masked lanes read nothing and count zero).
        let mask: __mmask16 = if pairs - p >= 16 { 0xffff } else { (1u32 << (pairs - p)) as u16 - 1 };
        // SAFETY: lanes p.. p + popcount(mask) are pairs of each row (k/2 of them).
        let wv: [__m512bh; NR] =
            std::array::from_fn(|j| unsafe { std::mem::transmute(_mm512_maskz_loadu_epi32(mask, wr[j].add(p) as *const i32)) });
        for i in 0..MR {
            // SAFETY: as above.
            let xv: __m512bh = unsafe { std::mem::transmute(_mm512_maskz_loadu_epi32(mask, xr[i].add(p) as *const i32)) };
            for j in 0..NR {
                sums[i][j] = _mm512_dpbf16_ps(sums[i][j], xv, wv[j]);
            }
        }
        p += 16;
    }
    for i in 0..r {
        for j in 0..c {
            acc[i][j] = _mm512_reduce_add_ps(sums[i][j]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(_: &[u16], _: usize, _: &[u16], _: usize, _: usize, _: &mut [[f32; NR]; MR]) {
    unreachable!("dpbf16::linear returns None before tiling where the CPU has no AVX-512 BF16")
}

#[cfg(test)]
mod tests {
    use super::super::weights::bf16_to_f32;
    use super::*;

    /// Against the product of the bf16-rounded operands in f64, over row and column
    /// counts that leave partial tiles and tasks and k past and short of 32; an odd k and
    /// a CPU without the instructions return None.
    #[test]
    fn is_the_product_of_the_rounded_operands() {
        let mut rng = crate::rng::SplitMix64(5);
        for (m, k, n) in [(1, 2, 1), (9, 34, 40), (17, 64, 129), (8, 510, 33), (5, 32, 3), (3, 66, 7)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let w: Vec<u16> = (0..n * k).map(|_| f32_to_bf16(rng.next_f64() as f32 * 2.0 - 1.0)).collect();
            let Some(y) = linear(&x, m, k, &w, n, true) else {
                assert!(!available());
                return;
            };
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| bf16_to_f32(f32_to_bf16(x[i * k + c])) as f64 * bf16_to_f32(w[j * k + c]) as f64).sum();
                    let got = y[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(), "({m},{k},{n}) [{i},{j}] {got} vs {want}");
                }
            }
            assert_eq!(linear(&x, m, k, &w, n, false), Some(y), "threads change nothing");
        }
        assert_eq!(linear(&[0.0; 3], 1, 3, &[0; 3], 1, false), None, "odd k");
    }
}
