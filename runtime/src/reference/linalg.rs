//! Matrix products through the `gemm` crate.
//!
//! `gemm::gemm` takes raw pointers and strides, so it is `unsafe`; [`gemm()`] here is the
//! one place that calls it, after checking that every element the strides can reach lies
//! inside the slices it was given. Everything else (linear layers, batched products,
//! attention, experts) goes through that safe wrapper.

use super::dot::{rows_times_weight, WeightElem};
use super::narrow::Narrow;
use super::real::Real;
use super::weights::{bf16_to_f32, f32_to_bf16};
use super::KernelError as KErr;
use gemm::Parallelism;

/// A strided matrix inside a slice: element `(r, c)` is `data[offset + r*rs + c*cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major `rows × cols` matrix at `offset`.
    pub fn rows(data: &'a [T], offset: usize, cols: usize) -> Mat<'a, T> {
        Mat { data, offset, rs: cols, cs: 1 }
    }

    /// Whether every element of a `rows × cols` view is inside the slice.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        if rows == 0 || cols == 0 {
            return true;
        }
        let last = (rows - 1)
            .checked_mul(self.rs)
            .and_then(|a| (cols - 1).checked_mul(self.cs).and_then(|b| a.checked_add(b)))
            .and_then(|a| a.checked_add(self.offset));
        last.is_some_and(|l| l < self.data.len())
    }
}

/// Products at least this large (m·n·k) let gemm spread over rayon's threads.
const PAR_FLOPS: usize = 1 << 18;

/// `dst = lhs · rhs` with `lhs: m×k`, `rhs: k×n` and `dst` contiguous row-major `m×n`.
/// `parallel` allows gemm to use rayon (callers that already run one product per thread
/// pass `false`).
pub fn gemm<T: Real>(m: usize, n: usize, k: usize, dst: &mut [T], lhs: Mat<T>, rhs: Mat<T>, parallel: bool) {
    gemm_impl(m, n, k, dst, lhs, rhs, None, parallel)
}

/// `dst += beta · lhs · rhs`, shapes as [`gemm()`] (`dst` must be initialised). The
/// backward kernels use it to sum products (over the query heads of a kv head, over two
/// projections) without a temporary.
pub fn gemm_acc<T: Real>(m: usize, n: usize, k: usize, dst: &mut [T], lhs: Mat<T>, rhs: Mat<T>, beta: T, parallel: bool) {
    gemm_impl(m, n, k, dst, lhs, rhs, Some(beta), parallel)
}

/// `dst = lhs · rhs` (`acc` = None) or `dst += beta · lhs · rhs` (`acc` = Some(beta)).
#[allow(clippy::too_many_arguments)]
fn gemm_impl<T: Real>(m: usize, n: usize, k: usize, dst: &mut [T], lhs: Mat<T>, rhs: Mat<T>, acc: Option<T>, parallel: bool) {
    assert_eq!(dst.len(), m * n, "gemm: dst holds {} elements, not {m}x{n}", dst.len());
    assert!(lhs.fits(m, k) && rhs.fits(k, n), "gemm: an operand view runs past its slice");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc.is_none() {
            dst.fill(T::ZERO);
        }
        return;
    }
    let (read_dst, beta) = match acc {
        Some(b) => (true, b),
        None => (false, T::ONE),
    };
    let par = if parallel && m.saturating_mul(n).saturating_mul(k) >= PAR_FLOPS { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: `dst` is an exclusive borrow of exactly m·n elements written at row stride
    // n and column stride 1; `fits` checked above that every element of the m×k and k×n
    // operand views is inside its slice (offsets and strides are non-negative, so the
    // largest reachable index is the one checked). `T` is f32 or f64 (the only `Real`
    // types), which gemm supports; `read_dst = false` means `dst` need not be
    // initialised, and with alpha = 0, beta = 1 the result is exactly lhs·rhs; with
    // `read_dst` (accumulation) `dst` is initialised (it is a `&mut [T]` of floats) and
    // the result is dst + beta·lhs·rhs (gemm's alpha = 1 when reading dst).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.cs as isize,
            rhs.rs as isize,
            if read_dst { T::ONE } else { T::ZERO },
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// Torch's `Linear`: `x: [m, k]` (row-major) times `w: [n, k]` transposed → `[m, n]`.
/// `parallel` allows rayon (callers that already run one product per thread pass
/// `false`).
pub fn linear<T: Real>(x: &[T], m: usize, k: usize, w: &[T], n: usize, parallel: bool) -> Result<Vec<T>, KErr> {
    if x.len() != m * k || w.len() != n * k {
        return Err(KErr::shape(format!("linear: x has {} elements for [{m}, {k}], weight {} for [{n}, {k}]", x.len(), w.len())));
    }
    if let (Some(x32), Some(w32)) = (few_f32_rows(x, m, k), as_f32(w)) {
        return Ok(linear_dot(x32, m, k, w32, n, parallel));
    }
    let mut out = vec![T::ZERO; m * n];
    // Wᵀ as a k×n view of the [n, k] weight: element (kk, j) is w[j*k + kk].
    gemm(m, n, k, &mut out, Mat::rows(x, 0, k), Mat { data: w, offset: 0, rs: 1, cs: k }, parallel);
    Ok(out)
}

/// Rows of `x` up to which a `linear` in `f32` takes dot products ([`super::dot`])
/// instead of a GEMM: below this, packing the operands costs more than the arithmetic.
const DOT_ROWS: usize = 16;

/// The shortest rows [`super::dpbf16`] multiplies: each of its dot products ends in a sum
/// across 16 lanes, which at k = 512 cost as much as the instructions saved (benches/linear.rs:
/// 0.84-1.4× gemm's time at k ≤ 512, 0.5-0.75× at k = 4,096).
const DPBF16_MIN_K: usize = 1024;

/// Weight bytes per task of the dot path (whole rows, at least [`DOT_MIN_ROWS`]): large
/// enough that a task's set-up is noise against reading them, small enough to stay in
/// cache for every row of x and to spread over the threads.
const DOT_TASK_BYTES: usize = 512 << 10;
const DOT_MIN_ROWS: usize = 16;

/// `x` as `f32`s when the run's `T` is `f32`.
pub(super) fn as_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: `Real` is implemented for f32 and f64 only, so a 4-byte `T` is f32.
    (std::mem::size_of::<T>() == 4).then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

/// `f32` results as the run's `T` (a copy when `T` is f32, as every caller's is).
fn from_f32<T: Real>(v: Vec<f32>) -> Vec<T> {
    v.into_iter().map(|v| T::of(v as f64)).collect()
}

/// `x` as `f32`s when the run is in `f32` and `x` has few enough rows for the dot path.
fn few_f32_rows<T: Real>(x: &[T], m: usize, k: usize) -> Option<&[f32]> {
    if m == 0 || m > DOT_ROWS || k == 0 {
        return None;
    }
    as_f32(x)
}

/// An `[m, n]` product computed in blocks of `cols` output columns (weight rows):
/// `block(j0, nb)` gives columns `j0..j0 + nb` as `[m, nb]`, one task each when
/// `parallel`, and the blocks are copied into place.
pub(crate) fn column_blocks<E: Copy + Default + Send>(
    m: usize,
    n: usize,
    cols: usize,
    parallel: bool,
    block: impl Fn(usize, usize) -> Vec<E> + Sync + Send,
) -> Vec<E> {
    use rayon::prelude::*;
    let tasks = n.div_ceil(cols.max(1));
    let run = |t: usize| block(t * cols, cols.min(n - t * cols));
    let ys: Vec<Vec<E>> = if parallel && tasks > 1 { (0..tasks).into_par_iter().map(run).collect() } else { (0..tasks).map(run).collect() };
    let mut out = vec![E::default(); m * n];
    for (t, y) in ys.iter().enumerate() {
        let (j0, nb) = (t * cols, cols.min(n - t * cols));
        for i in 0..m {
            out[i * n + j0..i * n + j0 + nb].copy_from_slice(&y[i * nb..(i + 1) * nb]);
        }
    }
    out
}

/// `x [m, k] · wᵀ` in `f32` by dot products: blocks of [`DOT_TASK_BYTES`] of weight rows, one
/// task each when `parallel`, every row of `x` multiplied while the block is in cache.
fn linear_dot<T: Real, W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, parallel: bool) -> Vec<T> {
    let cols = (DOT_TASK_BYTES / (k * std::mem::size_of::<W>()).max(1)).max(DOT_MIN_ROWS);
    from_f32(column_blocks(m, n, cols, parallel, |j0, nb| {
        let mut y = vec![0f32; m * nb];
        rows_times_weight(x, m, k, &w[j0 * k..(j0 + nb) * k], nb, &mut y, nb);
        y
    }))
}

/// [`linear`] with the weight in bf16 (its bits, `[n, k]`): the weight is never widened
/// whole. A few rows of `x` in `f32` take the dot path, which widens in registers; else a
/// block of weight rows at a time is widened (each block a task) and multiplied as
/// [`linear`] multiplies, accumulating in `T`. A bf16 weight is half the bytes of an f32
/// one, which is what a decode step (a few rows of `x`) is bound by.
///
/// With `bf16_inputs` (an `f32` run; see [`super::Options::bf16_inputs`]) `x` is rounded
/// to bf16 first, and many rows are multiplied by [`super::dpbf16`] where the CPU can.
pub fn linear_bf16<T: Real>(x: &[T], m: usize, k: usize, w: &[u16], n: usize, parallel: bool, bf16_inputs: bool) -> Result<Vec<T>, KErr> {
    if x.len() != m * k || w.len() != n * k {
        return Err(KErr::shape(format!("linear: x has {} elements for [{m}, {k}], weight {} for [{n}, {k}]", x.len(), w.len())));
    }
    if m == 0 || n == 0 {
        return Ok(vec![T::ZERO; m * n]);
    }
    if let Some(x32) = as_f32(x).filter(|_| bf16_inputs) {
        if m > DOT_ROWS && k >= DPBF16_MIN_K {
            if let Some(y) = super::dpbf16::linear(x32, m, k, w, n, parallel) {
                return Ok(from_f32(y));
            }
        }
        // Elsewhere the same arithmetic: bf16 values of x, exact products, f32 sums.
        let rounded: Vec<T> = x32.iter().map(|&v| T::of(f32_to_bf16(v).widen() as f64)).collect();
        return linear_bf16(&rounded, m, k, w, n, parallel, false);
    }
    if let Some(x32) = few_f32_rows(x, m, k) {
        return Ok(linear_dot(x32, m, k, w, n, parallel));
    }
    // Blocks small enough to stay in cache for a few rows of x, larger when many rows
    // amortise the widening.
    let rows = if m >= 64 { 256 } else { 32 };
    Ok(column_blocks(m, n, rows, parallel, |j0, nb| {
        let wide: Vec<T> = w[j0 * k..(j0 + nb) * k].iter().map(|&v| T::of(v.widen() as f64)).collect();
        let mut y = vec![T::ZERO; m * nb];
        gemm(m, nb, k, &mut y, Mat::rows(x, 0, k), Mat { data: &wide, offset: 0, rs: 1, cs: k }, false);
        y
    }))
}

/// [`linear`] with the weight kept in f16 or FP8 ([`super::narrow`]): rows `row0 .. row0
/// + n` of `w` (one expert of a stack starts past row 0); the weight is never widened
/// whole. A few rows of `x` in `f32` take the dot kernels, which widen f16 and e4m3 in
/// registers; an FP8 weight's scales go into `x` instead, once per block of weight rows
/// (`x · (q·s)ᵀ = (x·s) · qᵀ` where `s` is constant along a block of rows: a block row of
/// scales times `x` is `m · k` multiplies against `block₀ · k` weights). More rows widen
/// a block of weight rows at a time (dequantised) and multiply it by gemm in `T`.
pub(crate) fn linear_narrow<T: Real>(
    x: &[T],
    m: usize,
    k: usize,
    w: Narrow<'_>,
    row0: usize,
    n: usize,
    parallel: bool,
) -> Result<Vec<T>, KErr> {
    if x.len() != m * k || w.cols() != k || row0 + n > w.rows() {
        return Err(KErr::shape(format!(
            "linear: x has {} elements for [{m}, {k}], weight rows {row0}..{} of [{}, {}]",
            x.len(),
            row0 + n,
            w.rows(),
            w.cols()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(vec![T::ZERO; m * n]);
    }
    if let Some(x32) = few_f32_rows(x, m, k) {
        let elem = if matches!(w, Narrow::F8(_)) { 1 } else { 2 };
        let cols = (DOT_TASK_BYTES / (k * elem).max(1)).max(DOT_MIN_ROWS);
        return Ok(from_f32(column_blocks(m, n, cols, parallel, |j0, nb| {
            let mut y = vec![0f32; m * nb];
            match w {
                Narrow::F16(bits, _) => {
                    let h: &[half::f16] = half::slice::HalfBitsSliceExt::reinterpret_cast(bits);
                    let r = row0 + j0;
                    rows_times_weight(x32, m, k, &h[r * k..(r + nb) * k], nb, &mut y, nb);
                }
                Narrow::F8(f) => {
                    let mut scaled = vec![0f32; m * k];
                    let mut j = j0;
                    while j < j0 + nb {
                        // Rows g .. g + len share their scales (one block row of one matrix).
                        let g = row0 + j;
                        let r = g % f.rows;
                        let len = ((r / f.block[0] + 1) * f.block[0]).min(f.rows).min(r + (j0 + nb - j)) - r;
                        let s = f.row_scales(g);
                        for (xs, xr) in scaled.chunks_mut(k).zip(x32.chunks(k)) {
                            for ((o, &v), c) in xs.iter_mut().zip(xr).zip(0..) {
                                *o = v * s[c / f.block[1]];
                            }
                        }
                        rows_times_weight(&scaled, m, k, &f.bits[g * k..(g + len) * k], len, &mut y[j - j0..], nb);
                        j += len;
                    }
                }
            }
            y
        })));
    }
    let rows = if m >= 64 { 256 } else { 32 };
    Ok(column_blocks(m, n, rows, parallel, |j0, nb| {
        let mut wide = vec![0f32; nb * k];
        w.widen_rows(row0 + j0, &mut wide);
        let wide: Vec<T> = wide.into_iter().map(|v| T::of(v as f64)).collect();
        let mut y = vec![T::ZERO; m * nb];
        gemm(m, nb, k, &mut y, Mat::rows(x, 0, k), Mat { data: &wide, offset: 0, rs: 1, cs: k }, false);
        y
    }))
}

/// `a: [B.., m, k] · b: [B.., k, n]` → `[B.., m, n]`. An operand may have fewer batch axes
/// than the other (the ones it lacks are leading): it is repeated over them, as a
/// broadcast along those axes would, without the copy. Many small products are spread
/// over threads one per task; a few large ones let gemm split each.
pub fn batch_matmul<T: Real>(a: &[T], ash: &[usize], b: &[T], bsh: &[usize]) -> Result<(Vec<usize>, Vec<T>), KErr> {
    batch_matmul_with(a, ash, b, bsh, |v| v)
}

/// [`batch_matmul`] with `b` a weight kept in bf16 (absorbed MLA's `W_UK` and `W_UV` in a
/// decode step), widened as it is read instead of copied whole first.
pub fn batch_matmul_bf16<T: Real>(a: &[T], ash: &[usize], b: &[u16], bsh: &[usize]) -> Result<(Vec<usize>, Vec<T>), KErr> {
    batch_matmul_with(a, ash, b, bsh, |v| T::of(bf16_to_f32(v) as f64))
}

fn batch_matmul_with<T: Real, B: Copy + Sync>(
    a: &[T],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    widen: impl Fn(B) -> T + Sync,
) -> Result<(Vec<usize>, Vec<T>), KErr> {
    let (ra, rb) = (ash.len(), bsh.len());
    let (ab, bb) = (&ash[..ra.saturating_sub(2)], &bsh[..rb.saturating_sub(2)]);
    let (long, short) = if ab.len() >= bb.len() { (ab, bb) } else { (bb, ab) };
    if ra < 2 || rb < 2 || long[long.len() - short.len()..] != *short || ash[ra - 1] != bsh[rb - 2] {
        return Err(KErr::shape(format!("batch_matmul of {ash:?} and {bsh:?}")));
    }
    let (m, k, n) = (ash[ra - 2], ash[ra - 1], bsh[rb - 1]);
    let batches: usize = long.iter().product();
    let (a_batches, b_batches): (usize, usize) = (ab.iter().product(), bb.iter().product());
    let mut shape = long.to_vec();
    shape.extend([m, n]);
    let mut out = vec![T::ZERO; batches * m * n];
    if m * n == 0 || a_batches == 0 || b_batches == 0 {
        return Ok((shape, out));
    }
    // The missing axes lead, so an operand's batch index is the output's modulo its count.
    let one = |i: usize, dst: &mut [T], par: bool| {
        let (ao, bo) = ((i % a_batches) * m * k, (i % b_batches) * k * n);
        let bi = &b[bo..bo + k * n];
        if m <= AXPY_ROWS {
            axpy_rows(&a[ao..ao + m * k], bi, k, n, dst, &widen);
        } else {
            let wide: Vec<T> = bi.iter().map(|&v| widen(v)).collect();
            gemm(m, n, k, dst, Mat::rows(a, ao, k), Mat::rows(&wide, 0, n), par);
        }
    };
    if batches >= rayon::current_num_threads() && batches * m * n * k >= PAR_FLOPS {
        use rayon::prelude::*;
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, d)| one(i, d, false));
    } else {
        out.chunks_mut(m * n).enumerate().for_each(|(i, d)| one(i, d, true));
    }
    Ok((shape, out))
}

/// Rows of `a` up to which a batch matmul's product is summed row by row of `b` instead
/// of by gemm: a decode step's products are one row per (sequence, head) (absorbed MLA's
/// `q · W_UK`, attention over the latent), where gemm's set-up per tiny product cost more
/// than the arithmetic.
const AXPY_ROWS: usize = 4;

/// `dst [m, n] = a [m, k] · b [k, n]`, all row-major: each row of `dst` accumulates
/// `a[r, kk] · b[kk, :]` over `kk` in order (contiguous rows of `b`, which vectorise).
fn axpy_rows<T: Real, B: Copy>(a: &[T], b: &[B], k: usize, n: usize, dst: &mut [T], widen: impl Fn(B) -> T) {
    for (r, row) in dst.chunks_mut(n.max(1)).enumerate() {
        row.fill(T::ZERO);
        for kk in 0..k {
            let x = a[r * k + kk];
            for (d, &w) in row.iter_mut().zip(&b[kk * n..(kk + 1) * n]) {
                *d += x * widen(w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    /// A bf16 weight, widened a block of rows at a time, gives what `linear` gives on the
    /// same values widened up front: one row of x (decode), many (prefill, the larger
    /// blocks), widths that leave a partial last block, and the size checks.
    #[test]
    fn linear_bf16_is_linear_on_the_widened_weight() {
        use super::super::weights::{bf16_to_f32, f32_to_bf16};
        for (m, k, n) in [(1, 7, 33), (3, 40, 100), (70, 19, 300), (64, 1, 257)] {
            let x: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
            let bits: Vec<u16> = (0..n * k).map(|i| f32_to_bf16((i as f32 * 0.11).cos())).collect();
            let wide: Vec<f64> = bits.iter().map(|&b| bf16_to_f32(b) as f64).collect();
            let y = linear_bf16(&x, m, k, &bits, n, true, false).unwrap();
            let want = linear(&x, m, k, &wide, n, false).unwrap();
            assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12), "{m}×{k}×{n}");
        }
        // In f32, a few rows of x take the dot-product path (its own summation order).
        for (m, k, n) in [(1, 100, 130), (8, 33, 65), (16, 16, 64), (17, 16, 64)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let bits: Vec<u16> = (0..n * k).map(|i| f32_to_bf16((i as f32 * 0.11).cos())).collect();
            let wide: Vec<f32> = bits.iter().map(|&b| bf16_to_f32(b)).collect();
            let y = linear_bf16(&x, m, k, &bits, n, true, false).unwrap();
            let want = linear(&x, m, k, &wide, n, false).unwrap();
            assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs())), "f32 {m}×{k}×{n}");
        }
        // f32 weights: up to DOT_ROWS rows of x take the dot-product path, more the GEMM;
        // both, in or out of rayon, give the product in f64 to f32 rounding.
        for (m, k, n) in [(1, 100, 130), (4, 17, 65), (16, 33, 64), (17, 33, 64)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let want = linear(&x64, m, k, &w64, n, false).unwrap();
            for par in [true, false] {
                let y = linear(&x, m, k, &w, n, par).unwrap();
                assert!(y.iter().zip(&want).all(|(&a, b)| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs())), "f32 weights {m}×{k}×{n}");
            }
        }
        assert!(linear_bf16(&[0.0f32; 6], 2, 3, &[0; 5], 2, true, false).is_err());
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }

    /// f16 and FP8 weights (stacked matrices with partial scale blocks, rows taken from
    /// the middle of the stack across a matrix's end), widened a block at a time or read
    /// by the dot kernels with the scales in `x`: the product in f64 of `x` and the
    /// dequantised weight, to f32 rounding; a size that does not fit is an error.
    #[test]
    fn linear_narrow_is_linear_on_the_dequantised_weight() {
        use super::super::narrow::{narrow, Fp8};
        use super::super::tensor::{Data, Tensor};
        let (mats, rows, k) = (3, 45, 70);
        let bits: Vec<u8> = (0..mats * rows * k).map(|i| ((i * 53 + 7) % 256) as u8 & 0b1011_1110).collect();
        let block = [16, 32];
        let scales: Vec<f32> = (0..mats * 3 * 3).map(|i| 0.5 + 0.125 * i as f32).collect();
        let f8 = Tensor::from_parts(vec![mats, rows, k], Data::F8(Fp8::new(bits, scales, rows, k, block).unwrap()));
        let h: Vec<u16> = (0..mats * rows * k).map(|i| half::f16::from_f32((i as f32 * 0.11).cos()).to_bits()).collect();
        let f16 = Tensor::from_parts(vec![mats * rows, k], Data::F16(h));
        for w in [&f8, &f16] {
            let wide = w.to_f64_vec();
            for (m, row0, n) in [(1, 0, 45), (3, 30, 40), (16, 44, 3), (17, 10, 90), (70, 0, 135)] {
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                let want = linear(&x64, m, k, &wide[row0 * k..(row0 + n) * k], n, false).unwrap();
                for par in [true, false] {
                    let y = linear_narrow(&x, m, k, narrow(w).unwrap(), row0, n, par).unwrap();
                    let ok = y.iter().zip(&want).all(|(&a, b)| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()));
                    assert!(ok, "{} {m} rows, weight rows {row0}..{}", w.data().kind(), row0 + n);
                }
            }
            assert!(linear_narrow(&[0f32; 70], 1, k, narrow(w).unwrap(), 130, 6, false).is_err());
        }
    }

    #[test]
    fn linear_is_x_times_w_transposed() {
        let (m, k, n) = (3, 5, 4);
        let x: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let w: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect();
        let mut wt = vec![0.0; k * n];
        for j in 0..n {
            for p in 0..k {
                wt[p * n + j] = w[j * k + p];
            }
        }
        let y = linear(&x, m, k, &w, n, true).unwrap();
        let want = naive(&x, &wt, m, k, n);
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
        assert!(linear(&x, m, k, &w[1..], n, true).is_err());
        // k = 0 is a product of empty sums.
        assert_eq!(linear::<f32>(&[], 2, 0, &[], 3, true).unwrap(), vec![0.0; 6]);
    }

    /// An operand with fewer batch axes is repeated over the leading ones it lacks: the
    /// same as multiplying its materialised broadcast; batch axes that disagree are refused.
    #[test]
    fn batch_matmul_repeats_an_operand_over_missing_leading_axes() {
        let a: Vec<f64> = (0..2 * 3 * 4 * 5).map(|i| (i as f64 * 0.3).sin()).collect();
        let b: Vec<f64> = (0..3 * 5 * 6).map(|i| (i as f64 * 0.7).cos()).collect();
        let wide: Vec<f64> = b.iter().chain(&b).copied().collect();
        let (shape, y) = batch_matmul(&a, &[2, 3, 4, 5], &b, &[3, 5, 6]).unwrap();
        let (shape2, want) = batch_matmul(&a, &[2, 3, 4, 5], &wide, &[2, 3, 5, 6]).unwrap();
        assert_eq!((shape, &y), (shape2, &want));
        // Few rows (the row-by-row path) and many (gemm) give the naive product.
        for m in [1, 3, 5, 9] {
            let a: Vec<f64> = (0..2 * m * 5).map(|i| (i as f64 * 0.11).sin()).collect();
            let (_, y) = batch_matmul(&a, &[2, m, 5], &b[..2 * 5 * 6], &[2, 5, 6]).unwrap();
            for bi in 0..2 {
                let want = naive(&a[bi * m * 5..(bi + 1) * m * 5], &b[bi * 30..(bi + 1) * 30], m, 5, 6);
                assert!(y[bi * m * 6..(bi + 1) * m * 6].iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-12), "m = {m}");
            }
        }
        // And on the left: a [4, 5] against b [2, 3, 5, 6].
        let a2 = &a[..20];
        let (shape, y) = batch_matmul(a2, &[4, 5], &wide, &[2, 3, 5, 6]).unwrap();
        assert_eq!(shape, [2, 3, 4, 6]);
        let a2wide: Vec<f64> = (0..6).flat_map(|_| a2.iter().copied()).collect();
        assert_eq!(y, batch_matmul(&a2wide, &[2, 3, 4, 5], &wide, &[2, 3, 5, 6]).unwrap().1);
        assert!(batch_matmul(&a, &[2, 3, 4, 5], &b[..2 * 5 * 6], &[2, 5, 6]).is_err(), "batch axes 3 and 2 disagree");
    }

    /// A bf16 right operand read in place gives the product of its widened copy, on the
    /// row-by-row path and gemm's, repeated over a missing leading axis.
    #[test]
    fn batch_matmul_bf16_is_batch_matmul_on_the_widened_operand() {
        let bits: Vec<u16> = (0..3 * 5 * 6).map(|i| f32_to_bf16(((i as f32) * 0.7).cos())).collect();
        let wide: Vec<f64> = bits.iter().map(|&b| bf16_to_f32(b) as f64).collect();
        for m in [1, 4, 5, 9] {
            let a: Vec<f64> = (0..2 * 3 * m * 5).map(|i| (i as f64 * 0.3).sin()).collect();
            let got = batch_matmul_bf16(&a, &[2, 3, m, 5], &bits, &[3, 5, 6]).unwrap();
            assert_eq!(got, batch_matmul(&a, &[2, 3, m, 5], &wide, &[3, 5, 6]).unwrap(), "m = {m}");
        }
        assert!(batch_matmul_bf16(&[0.0f32; 10], &[2, 5], &bits[..29], &[29]).is_err());
    }

    #[test]
    fn batched_and_large() {
        let (bt, m, k, n) = (7, 33, 65, 17);
        let a: Vec<f64> = (0..bt * m * k).map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0).collect();
        let b: Vec<f64> = (0..bt * k * n).map(|i| ((i * 104729) % 97) as f64 / 48.0 - 1.0).collect();
        let (s, c) = batch_matmul(&a, &[bt, m, k], &b, &[bt, k, n]).unwrap();
        assert_eq!(s, vec![bt, m, n]);
        for i in 0..bt {
            let want = naive(&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n], m, k, n);
            assert!(c[i * m * n..(i + 1) * m * n].iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-9));
        }
        assert!(batch_matmul(&a, &[bt, m, k], &b, &[bt, n, k]).is_err());
    }

    #[test]
    #[should_panic(expected = "runs past")]
    fn views_are_bounds_checked() {
        let mut d = vec![0.0f32; 4];
        let a = vec![0.0f32; 3];
        gemm(2, 2, 2, &mut d, Mat::rows(&a, 0, 2), Mat::rows(&a, 0, 2), false);
    }
}
