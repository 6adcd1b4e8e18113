//! `x · wᵀ` for a few rows of `x` (a decode step's tokens, an expert's rows) by dot
//! products, with the weight in `f32`, bf16, f16 or FP8 e4m3 (widened in registers; an
//! FP8 weight's block scales go into `x`, see [`super::linalg::linear_narrow`]),
//! vectorised for the CPU it runs on.
//!
//! A GEMM packs its operands before multiplying; for a few rows of `x` that costs more
//! than the arithmetic, and the step is bound by reading the weight anyway. Here each
//! weight row is read once per block of up to [`ROWS`] rows of `x`, and every dot
//! product accumulates in `f32` lanes.
//!
//! The build targets baseline x86-64 (SSE2), on which the compiler vectorised the old
//! lane-blocked loop to 4-wide SSE. So each weight type has tiles written with AVX-512
//! and with AVX2 + FMA intrinsics (`block_impl!`), picked once at run time ([`simd`];
//! `DSC_CPU_SIMD=avx2|portable` caps the choice), and a portable tile for other CPUs.
//! The fused tiles round once per multiply-add, the portable one twice, and the lanes are
//! summed in a different order: results differ in the last bits between CPUs, as any
//! BLAS's do.

/// Rows of `x` one pass of the kernel multiplies against each weight row: 4 rows × 2
/// accumulators of 16 lanes, 5 loads per 4 multiply-adds.
pub const ROWS: usize = 4;

/// Lanes of the portable tile's accumulators.
const LANES: usize = 16;

/// A weight element the kernel widens to `f32`: `f32` itself, bf16 bits (`u16`), f16,
/// or FP8 e4m3 bits (`u8`, unscaled).
pub trait WeightElem: Copy + Send + Sync + 'static + Block {
    fn widen(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElem for u16 {
    /// bf16 is the high half of an `f32`: widening is exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

impl WeightElem for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl WeightElem for u8 {
    /// FP8 e4m3 (the `fn` variant: no infinities, `S.1111.111` is NaN).
    #[inline(always)]
    fn widen(self) -> f32 {
        E4M3[self as usize]
    }
}

/// `2^120`: an e4m3 value's bits shifted into an `f32`'s place (exponent bias 7 against
/// 127) read as an `f32`, times this, is the value (subnormals included: the product of a
/// subnormal `f32` and a power of two is exact).
const E4M3_SCALE: f32 = f32::from_bits((120 + 127) << 23);

/// Every e4m3 bit pattern's value, as the vector loads compute it.
pub(super) static E4M3: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let mag = (b & 0x7f) as u32;
        let v = if mag == 0x7f { f32::NAN } else { f32::from_bits(mag << 20) * E4M3_SCALE };
        t[b] = if b & 0x80 != 0 { -v } else { v };
        b += 1;
    }
    t
};

/// `y[i·ldy + j] = Σ_kk x[i·k + kk] · w[j·k + kk]` for `i < m`, `j < n`: `x` is `[m, k]`,
/// `w` is `[n, k]` (rows of a torch `Linear` weight), `y` has row stride `ldy`.
///
/// Panics if a slice is shorter than those shapes need (callers check shapes first).
pub fn rows_times_weight<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, y: &mut [f32], ldy: usize) {
    rows_times_weight_on(simd(), x, m, k, (w, k), n, y, ldy)
}

/// [`rows_times_weight`] with `w`'s rows `ldw` apart (a strided view: the keys of one
/// sequence in a position-major KV cache).
#[allow(clippy::too_many_arguments)]
pub fn rows_times_weight_ld<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], ldw: usize, n: usize, y: &mut [f32], ldy: usize) {
    rows_times_weight_on(simd(), x, m, k, (w, ldw), n, y, ldy)
}

/// [`rows_times_weight_ld`] with the tiles of `simd`, which the CPU must have.
#[allow(clippy::too_many_arguments)]
fn rows_times_weight_on<W: WeightElem>(
    simd: Simd,
    x: &[f32],
    m: usize,
    k: usize,
    (w, ldw): (&[W], usize),
    n: usize,
    y: &mut [f32],
    ldy: usize,
) {
    assert!(ldw >= k, "dot: weight rows {ldw} apart are shorter than {k}");
    assert!(
        x.len() >= m * k && (n == 0 || w.len() >= (n - 1) * ldw + k),
        "dot: operands shorter than [{m}, {k}] and [{n}, {k}] (rows {ldw} apart)"
    );
    assert!(m == 0 || n == 0 || y.len() >= (m - 1) * ldy + n, "dot: output shorter than [{m}, {n}] at row stride {ldy}");
    // Four weight rows at a time where it pays: rows of at least 4 KiB, or many rows of
    // x (reading four short weight rows side by side streams them from memory at about
    // half the speed of one after the other, as with two rows before).
    let quad = m >= QUAD_MIN_ROWS || k * std::mem::size_of::<W>() >= QUAD_MIN_ROW_BYTES;
    let mut i = 0;
    while i < m {
        let r = (m - i).min(ROWS);
        let xs = &x[i * k..(i + r) * k];
        let ys = &mut y[i * ldy..];
        match r {
            4 if quad => W::block::<4>(simd.quad(), xs, k, (w, ldw), n, ys, ldy),
            4 => W::block::<4>(simd, xs, k, (w, ldw), n, ys, ldy),
            3 => W::block::<3>(simd, xs, k, (w, ldw), n, ys, ldy),
            2 => W::block::<2>(simd, xs, k, (w, ldw), n, ys, ldy),
            _ => W::block::<1>(simd, xs, k, (w, ldw), n, ys, ldy),
        }
        i += r;
    }
}

/// `R` rows of `x` against every row of `w`, one weight row after the other (one
/// sequential stream through the weight, which the hardware prefetcher follows: reading
/// two rows side by side halved the speed on short rows), with the widest kernel the CPU
/// runs (`simd`, which the CPU has).
pub trait Block: Sized {
    #[allow(private_interfaces)]
    fn block<const R: usize>(simd: Simd, x: &[f32], k: usize, w: (&[Self], usize), n: usize, y: &mut [f32], ldy: usize);
}

/// The portable tile: the `R` dot products of one weight row, lane-blocked so the
/// compiler may vectorise them; one rounding per multiply and add.
fn tile_portable<W: WeightElem, const R: usize>(x: &[&[f32]; R], w: &[W], k: usize) -> [f32; R] {
    let mut acc = [[0f32; LANES]; R];
    let full = k - k % LANES;
    let mut kk = 0;
    while kk < full {
        let ws = &w[kk..kk + LANES];
        for r in 0..R {
            let xs = &x[r][kk..kk + LANES];
            for l in 0..LANES {
                acc[r][l] += xs[l] * ws[l].widen();
            }
        }
        kk += LANES;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut t: f32 = acc[r].iter().sum();
        for kk in full..k {
            t += x[r][kk] * w[kk].widen();
        }
        out[r] = t;
    }
    out
}

/// Walks the weight rows with `tile`, writing each row's `R` results.
#[inline(always)]
fn walk<W, const R: usize>(
    x: &[f32],
    k: usize,
    (w, ldw): (&[W], usize),
    n: usize,
    y: &mut [f32],
    ldy: usize,
    tile: impl Fn(&[&[f32]; R], &[W]) -> [f32; R],
) {
    let xr: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    for j in 0..n {
        let acc = tile(&xr, &w[j * ldw..j * ldw + k]);
        for r in 0..R {
            y[r * ldy + j] = acc[r];
        }
    }
}

/// [`walk`] for four rows of `x`, four weight rows at a time with `quad`, the last
/// `n % 4` with `tile`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn walk_quad<W>(
    x: &[f32],
    k: usize,
    (w, ldw): (&[W], usize),
    n: usize,
    y: &mut [f32],
    ldy: usize,
    quad: impl Fn(&[&[f32]; 4], [&[W]; 4]) -> [[f32; 4]; 4],
    tile: impl Fn(&[&[f32]; 4], &[W]) -> [f32; 4],
) {
    let xr: [&[f32]; 4] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    let row = |j: usize| &w[j * ldw..j * ldw + k];
    let mut j = 0;
    while j + 4 <= n {
        let acc = quad(&xr, [row(j), row(j + 1), row(j + 2), row(j + 3)]);
        for r in 0..4 {
            y[r * ldy + j..r * ldy + j + 4].copy_from_slice(&acc[r]);
        }
        j += 4;
    }
    for j in j..n {
        let acc = tile(&xr, row(j));
        for r in 0..4 {
            y[r * ldy + j] = acc[r];
        }
    }
}

/// The lane sums of four vectors, `[Σa₀, Σa₁, Σa₂, Σa₃]`: pairs interleaved and added
/// within each 128-bit lane, then the four 128-bit lanes added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn reduce_quad(a: [std::arch::x86_64::__m512; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // Per 128-bit lane: [a0₀+a0₂, a1₀+a1₂, a0₁+a0₃, a1₁+a1₃], and the same of a2, a3.
    let x01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    let x23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    // Per 128-bit lane: [Σa0, Σa1, Σa2, Σa3] of its four elements.
    let y = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(x01, x23), _mm512_shuffle_ps::<0b11_10_11_10>(x01, x23));
    let lo = _mm_add_ps(_mm512_extractf32x4_ps::<0>(y), _mm512_extractf32x4_ps::<1>(y));
    let hi = _mm_add_ps(_mm512_extractf32x4_ps::<2>(y), _mm512_extractf32x4_ps::<3>(y));
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four f32s.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(lo, hi)) };
    out
}

/// Generates, for one weight type, the AVX-512 and AVX2 tiles (`$load512`, `$load256`
/// widen 16 / 8 weights at a pointer to `f32` lanes) and the run-time choice between
/// them and the portable tile. Each row of `x` has two accumulators (even and odd
/// vectors of `k`), so one row's multiply-adds do not wait on each other's latency.
macro_rules! block_impl {
    ($w:ty, $avx512:ident, $quad512:ident, $avx2:ident, $load512:expr, $load256:expr) => {
        /// Four rows of `x` against four weight rows at once (AVX-512): sixteen
        /// accumulators, each weight and `x` vector loaded once per four multiply-adds,
        /// and the sixteen horizontal sums done as one transposing reduction
        /// ([`reduce_quad`]) instead of sixteen: for short rows (attention's 32- and
        /// 128-long keys, a decode step's 8 to 16 rows) the sums were a third of the work.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        fn $quad512(x: &[&[f32]; 4], w: [&[$w]; 4], k: usize) -> [[f32; 4]; 4] {
            use std::arch::x86_64::*;
            let mut a = [[_mm512_setzero_ps(); 4]; 4];
            let (full, mut kk) = (k - k % 16, 0);
            while kk < full {
                // SAFETY: kk + 16 ≤ k, the length of every row here.
                let wv = unsafe {
                    [
                        $load512(w[0].as_ptr().add(kk)),
                        $load512(w[1].as_ptr().add(kk)),
                        $load512(w[2].as_ptr().add(kk)),
                        $load512(w[3].as_ptr().add(kk)),
                    ]
                };
                for r in 0..4 {
                    // SAFETY: as above.
                    let xv = unsafe { _mm512_loadu_ps(x[r].as_ptr().add(kk)) };
                    for j in 0..4 {
                        a[r][j] = _mm512_fmadd_ps(xv, wv[j], a[r][j]);
                    }
                }
                kk += 16;
            }
            let mut out = [[0f32; 4]; 4];
            for r in 0..4 {
                out[r] = reduce_quad(a[r]);
                for j in 0..4 {
                    for kk in full..k {
                        out[r][j] = x[r][kk].mul_add(w[j][kk].widen(), out[r][j]);
                    }
                }
            }
            out
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        fn $avx512<const R: usize>(x: &[&[f32]; R], w: &[$w], k: usize) -> [f32; R] {
            use std::arch::x86_64::*;
            let (mut a0, mut a1) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            let (full, mut kk) = (k - k % 16, 0);
            while kk + 32 <= full {
                // SAFETY: kk + 32 ≤ k, the length of the row and of each row of x.
                let (w0, w1) = unsafe { ($load512(w.as_ptr().add(kk)), $load512(w.as_ptr().add(kk + 16))) };
                for r in 0..R {
                    // SAFETY: as above.
                    let (x0, x1) = unsafe { (_mm512_loadu_ps(x[r].as_ptr().add(kk)), _mm512_loadu_ps(x[r].as_ptr().add(kk + 16))) };
                    a0[r] = _mm512_fmadd_ps(x0, w0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(x1, w1, a1[r]);
                }
                kk += 32;
            }
            if kk < full {
                // SAFETY: kk + 16 ≤ k.
                let w0 = unsafe { $load512(w.as_ptr().add(kk)) };
                for r in 0..R {
                    // SAFETY: as above.
                    a0[r] = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(x[r].as_ptr().add(kk)) }, w0, a0[r]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                let mut t = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
                for kk in full..k {
                    t = x[r][kk].mul_add(w[kk].widen(), t);
                }
                out[r] = t;
            }
            out
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $avx2<const R: usize>(x: &[&[f32]; R], w: &[$w], k: usize) -> [f32; R] {
            use std::arch::x86_64::*;
            let (mut a0, mut a1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
            let (full, mut kk) = (k - k % 8, 0);
            while kk + 16 <= full {
                // SAFETY: kk + 16 ≤ k, the length of the row and of each row of x.
                let (w0, w1) = unsafe { ($load256(w.as_ptr().add(kk)), $load256(w.as_ptr().add(kk + 8))) };
                for r in 0..R {
                    // SAFETY: as above.
                    let (x0, x1) = unsafe { (_mm256_loadu_ps(x[r].as_ptr().add(kk)), _mm256_loadu_ps(x[r].as_ptr().add(kk + 8))) };
                    a0[r] = _mm256_fmadd_ps(x0, w0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(x1, w1, a1[r]);
                }
                kk += 16;
            }
            if kk < full {
                // SAFETY: kk + 8 ≤ k.
                let w0 = unsafe { $load256(w.as_ptr().add(kk)) };
                for r in 0..R {
                    // SAFETY: as above.
                    a0[r] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(x[r].as_ptr().add(kk)) }, w0, a0[r]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                let v = _mm256_add_ps(a0[r], a1[r]);
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                let mut t = _mm_cvtss_f32(s);
                for kk in full..k {
                    t = x[r][kk].mul_add(w[kk].widen(), t);
                }
                out[r] = t;
            }
            out
        }

        impl Block for $w {
            #[allow(private_interfaces)]
            fn block<const R: usize>(simd: Simd, x: &[f32], k: usize, w: (&[$w], usize), n: usize, y: &mut [f32], ldy: usize) {
                #[cfg(target_arch = "x86_64")]
                {
                    if simd == Simd::Avx512Quad && R == 4 {
                        // SAFETY: the CPU has the features the tiles are compiled for.
                        return walk_quad::<$w>(
                            x,
                            k,
                            w,
                            n,
                            y,
                            ldy,
                            |x, w| unsafe { $quad512(x, w, k) },
                            |x, w| unsafe { $avx512::<4>(x, w, k) },
                        );
                    }
                    if matches!(simd, Simd::Avx512 | Simd::Avx512Quad) {
                        // SAFETY: the CPU has the features the tile is compiled for.
                        return walk::<$w, R>(x, k, w, n, y, ldy, |x, w| unsafe { $avx512(x, w, k) });
                    }
                    if simd == Simd::Avx2 {
                        // SAFETY: as above.
                        return walk::<$w, R>(x, k, w, n, y, ldy, |x, w| unsafe { $avx2(x, w, k) });
                    }
                }
                let _ = simd;
                walk::<$w, R>(x, k, w, n, y, ldy, |x, w| tile_portable(x, w, k))
            }
        }
    };
}

block_impl!(
    f32,
    tile_avx512_f32,
    quad_avx512_f32,
    tile_avx2_f32,
    |p: *const f32| std::arch::x86_64::_mm512_loadu_ps(p),
    |p: *const f32| { std::arch::x86_64::_mm256_loadu_ps(p) }
);
block_impl!(
    u16,
    tile_avx512_bf16,
    quad_avx512_bf16,
    tile_avx2_bf16,
    |p: *const u16| {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
    },
    |p: *const u16| {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
    }
);
block_impl!(
    half::f16,
    tile_avx512_f16,
    quad_avx512_f16,
    tile_avx2_f16,
    |p: *const half::f16| {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    },
    |p: *const half::f16| {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
);
block_impl!(
    u8,
    tile_avx512_e4m3,
    quad_avx512_e4m3,
    tile_avx2_e4m3,
    |p: *const u8| {
        use std::arch::x86_64::*;
        // The magnitude's bits into an f32's place, times 2^120; the sign bit moved to
        // bit 31; the NaN pattern (magnitude 0x7f) made NaN.
        let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
        let v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<20>(mag)), _mm512_set1_ps(E4M3_SCALE));
        let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(b, _mm512_set1_epi32(0x80)));
        let v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
        _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)), v, _mm512_set1_ps(f32::NAN))
    },
    |p: *const u8| {
        use std::arch::x86_64::*;
        let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        let mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
        let v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32::<20>(mag)), _mm256_set1_ps(E4M3_SCALE));
        let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(b, _mm256_set1_epi32(0x80)));
        let v = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
        _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f))))
    }
);

/// `y [m, n] = p [m, k] · v [k, n]`, row-major, the rows of `v` `ldv` apart (`v` in
/// `f32` or bf16), for a few rows of `p`: each row of `v` is read once and added, scaled,
/// to every row of `y` (attention's probabilities times its values in a decode step,
/// where a GEMM would pack `v` per call). Zero weights (keys a causal row does not see)
/// are skipped. The loop is written once and compiled for AVX-512 and AVX2 + FMA as well
/// as the baseline, picked as [`rows_times_weight`] is.
pub fn rows_times_matrix<W: WeightElem>(p: &[f32], m: usize, k: usize, v: &[W], ldv: usize, n: usize, y: &mut [f32]) {
    rows_times_matrix_on(simd(), p, m, k, (v, ldv), n, y)
}

/// [`rows_times_matrix`] compiled for `simd`, which the CPU must have.
fn rows_times_matrix_on<W: WeightElem>(simd: Simd, p: &[f32], m: usize, k: usize, v: (&[W], usize), n: usize, y: &mut [f32]) {
    let fits = k == 0 || (v.1 >= n && v.0.len() >= (k - 1) * v.1 + n);
    assert!(p.len() >= m * k && fits && y.len() >= m * n, "rows_times_matrix: operands shorter than [{m}, {k}] · [{k}, {n}]");
    match simd {
        // SAFETY: `simd` is a kernel the CPU has (the callers' contract).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx512Quad => unsafe { axpy_rows_avx512(p, m, k, v, n, y) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { axpy_rows_avx2(p, m, k, v, n, y) },
        _ => axpy_rows(p, m, k, v, n, y),
    }
}

#[inline(always)]
fn axpy_rows<W: WeightElem>(p: &[f32], m: usize, k: usize, (v, ldv): (&[W], usize), n: usize, y: &mut [f32]) {
    y[..m * n].fill(0.0);
    for j in 0..k {
        let vr = &v[j * ldv..j * ldv + n];
        for r in 0..m {
            let w = p[r * k + j];
            if w != 0.0 {
                for (o, &x) in y[r * n..(r + 1) * n].iter_mut().zip(vr) {
                    *o += w * x.widen();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn axpy_rows_avx512<W: WeightElem>(p: &[f32], m: usize, k: usize, v: (&[W], usize), n: usize, y: &mut [f32]) {
    axpy_rows(p, m, k, v, n, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_rows_avx2<W: WeightElem>(p: &[f32], m: usize, k: usize, v: (&[W], usize), n: usize, y: &mut [f32]) {
    axpy_rows(p, m, k, v, n, y)
}

/// The vector extensions the tiles can use on this CPU.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Simd {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
    /// AVX-512 with four weight rows at a time for four rows of `x` ([`walk_quad`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512Quad,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    Portable,
}

impl Simd {
    /// The kernels that take four weight rows at a time, where the CPU has them.
    fn quad(self) -> Simd {
        match self {
            Simd::Avx512 => Simd::Avx512Quad,
            s => s,
        }
    }
}

/// Rows of `x` from which [`rows_times_weight`] takes four weight rows at a time whatever
/// their length, and the weight row bytes from which it does for any number of rows.
const QUAD_MIN_ROWS: usize = 12;
const QUAD_MIN_ROW_BYTES: usize = 4096;

/// Detected once (`DSC_CPU_SIMD=portable|avx2` caps it, to compare the kernels).
fn simd() -> Simd {
    static FOUND: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        let cap = std::env::var("DSC_CPU_SIMD").ok();
        #[cfg(target_arch = "x86_64")]
        {
            // Every AVX2 CPU has F16C; the tiles' f16 loads use it.
            let fma = std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c");
            if cap.is_none() && fma && std::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if cap.as_deref() != Some("portable") && fma && std::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        let _ = cap;
        Simd::Portable
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64).sum();
            }
        }
        y
    }

    /// Every row-block size, odd weight rows, a tail past the full chunks, a row stride
    /// wider than `n`; f32 and bf16 weights against the product in f64.
    #[test]
    fn matches_the_f64_product() {
        let mut rng = crate::rng::SplitMix64(7);
        // (13, 40, 6) and (4, 1100, 5) take four weight rows at a time where the CPU can.
        let sizes = [
            (1, 16, 1),
            (1, 37, 5),
            (3, 64, 3),
            (4, 100, 7),
            (5, 513, 9),
            (9, 48, 2),
            (2, 5, 4),
            (0, 8, 3),
            (3, 0, 2),
            (13, 40, 6),
            (4, 1100, 5),
        ];
        for (m, k, n) in sizes {
            let x: Vec<f32> = (0..m * k).map(|_| (rng.next_f64() as f32) * 2.0 - 1.0).collect();
            let wf: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() as f32) * 2.0 - 1.0).collect();
            let wb: Vec<u16> = wf.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let wbf: Vec<f32> = wb.iter().map(|&b| b.widen()).collect();
            let ldy = n + 3;
            for (w, want) in [(None, naive(&x, m, k, &wf, n)), (Some(&wb), naive(&x, m, k, &wbf, n))] {
                let mut y = vec![f32::NAN; m.max(1) * ldy];
                match w {
                    None => rows_times_weight(&x, m, k, &wf, n, &mut y, ldy),
                    Some(b) => rows_times_weight(&x, m, k, b, n, &mut y, ldy),
                }
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (y[i * ldy + j] as f64, want[i * n + j]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "({m},{k},{n}) [{i},{j}] {got} vs {want}"
                        );
                    }
                    // The padding between rows is untouched.
                    assert!(y[i * ldy + n..i * ldy + ldy].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    /// Every kernel this CPU can run (AVX-512, AVX2, portable: the one a machine picks
    /// may not be this one) gives the product in f64 to rounding, for every row-block
    /// size, a tail past the vectors, and both weight types.
    #[test]
    fn every_kernel_this_cpu_runs_agrees() {
        let mut rng = crate::rng::SplitMix64(11);
        let (m, k, n) = (7, 301, 5);
        let x: Vec<f32> = (0..m * k).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let wbf: Vec<f32> = wb.iter().map(|&b| b.widen()).collect();
        let mut kernels = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
                kernels.push(Simd::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
                kernels.extend([Simd::Avx512, Simd::Avx512Quad]);
            }
        }
        for simd in kernels {
            let mut y = vec![0f32; m * n];
            rows_times_weight_on(simd, &x, m, k, (&w, k), n, &mut y, n);
            let mut yb = vec![0f32; m * n];
            rows_times_weight_on(simd, &x, m, k, (&wb, k), n, &mut yb, n);
            // x [m, k] · wᵀ [k, n] by rows of wᵀ, with some weights zero (skipped).
            let mut wt = vec![0f32; k * n];
            for j in 0..n {
                for kk in 0..k {
                    wt[kk * n + j] = w[j * k + kk];
                }
            }
            let xz: Vec<f32> = x.iter().enumerate().map(|(i, &v)| if i % 3 == 0 { 0.0 } else { v }).collect();
            let mut ya = vec![f32::NAN; m * n];
            rows_times_matrix_on(simd, &xz, m, k, (&wt, n), n, &mut ya);
            // Strided operands: weight rows 3 apart past their end, bf16 rows of v 2 past.
            let wpad: Vec<f32> =
                (0..n * (k + 3)).map(|i| if i % (k + 3) < k { w[i / (k + 3) * k + i % (k + 3)] } else { f32::NAN }).collect();
            let mut ys = vec![0f32; m * n];
            rows_times_weight_on(simd, &x, m, k, (&wpad[..(n - 1) * (k + 3) + k], k + 3), n, &mut ys, n);
            let wtb: Vec<u16> = (0..k * (n + 2))
                .map(|i| if i % (n + 2) < n { (wt[i / (n + 2) * n + i % (n + 2)].to_bits() >> 16) as u16 } else { 0x7fc0 })
                .collect();
            let wbt: Vec<f32> = (0..n * k).map(|i| wtb[(i % k) * (n + 2) + i / k].widen()).collect();
            let mut yab = vec![f32::NAN; m * n];
            rows_times_matrix_on(simd, &xz, m, k, (&wtb[..(k - 1) * (n + 2) + n], n + 2), n, &mut yab);
            // f16 and FP8 e4m3 weights (no NaN pattern here; see below).
            let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let we: Vec<u8> = (0..n * k).map(|i| ((i * 37 + 11) % 256) as u8 & 0b1011_1110).collect();
            let (mut yh, mut ye) = (vec![0f32; m * n], vec![0f32; m * n]);
            rows_times_weight_on(simd, &x, m, k, (&wh, k), n, &mut yh, n);
            rows_times_weight_on(simd, &x, m, k, (&we, k), n, &mut ye, n);
            let whf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            let wef: Vec<f32> = we.iter().map(|&b| super::super::weights::f8e4m3_to_f32(b)).collect();
            // Every e4m3 pattern through the vector load: weight row j is pattern j
            // repeated, x sums to exactly 1 (32 × 1/32), so y[j] is the pattern's value.
            let pat: Vec<u8> = (0..256 * 32).map(|i| (i / 32) as u8).collect();
            let mut yp = vec![0f32; 256];
            rows_times_weight_on(simd, &[1.0 / 32.0; 32], 1, 32, (&pat, 32), 256, &mut yp, 256);
            for (b, &v) in yp.iter().enumerate() {
                let want = super::super::weights::f8e4m3_to_f32(b as u8);
                assert!(v == want || (v.is_nan() && want.is_nan()), "{simd:?}: e4m3 {b:#04x} gave {v}, not {want}");
            }
            for (got, want) in [
                (&yh, naive(&x, m, k, &whf, n)),
                (&ye, naive(&x, m, k, &wef, n)),
                (&y, naive(&x, m, k, &w, n)),
                (&yb, naive(&x, m, k, &wbf, n)),
                (&ya, naive(&xz, m, k, &w, n)),
                (&ys, naive(&x, m, k, &w, n)),
                (&yab, naive(&xz, m, k, &wbt, n)),
            ] {
                for (a, b) in got.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{simd:?}: {a} vs {b}");
                }
            }
        }
    }
}
