//! Weights kept in their checkpoint's precision, as the reference backend holds them for
//! inference: bf16 (its bits, read in place by the dot and `vdpbf16ps` kernels), f16 (its
//! bits), and FP8 e4m3 with DeepSeek-V3's block scales ([`Fp8`]).
//!
//! A matmul over an f16 or FP8 weight ([`super::linalg::linear_narrow`]) reads it in
//! registers for a few rows of `x` (the dot kernels widen f16 and e4m3 as they load; an
//! FP8 block's scale goes into `x`), and widens a block of rows at a time for gemm past
//! that, so the weight is never widened whole and stays a half or a quarter of its `f32`
//! bytes. A lookup (`gather` of embedding rows) widens only the rows it takes
//! ([`gather_rows`]). Any other op gets such an operand widened whole first ([`widen`]);
//! the interpreter keeps what it computes from weights alone between runs, so a weight
//! reshaped or sliced that way (absorbed MLA's `kv_b`) is widened once, not per step.

use super::dot::E4M3;
use super::elementwise::widen_bf16;
use super::real::Real;
use super::tensor::{Data, Tensor};
use super::KernelError as KErr;

/// FP8 e4m3 weights with block scales (DeepSeek-V3's `weight_scale_inv`): the data is
/// `[lead.., rows, cols]`, and element `(r, c)` of each `[rows, cols]` matrix is
/// `e4m3(bits) · scale` of its `block[0] × block[1]` block. Blocks at the right and
/// bottom edges may be partial.
#[derive(Clone, PartialEq, Debug)]
pub struct Fp8 {
    pub bits: Vec<u8>,
    /// `[lead.., ⌈rows / block₀⌉, ⌈cols / block₁⌉]`, row-major.
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub block: [usize; 2],
}

impl Fp8 {
    /// Checks that `bits` is whole `[rows, cols]` matrices and `scales` has one scale per
    /// block of each.
    pub fn new(bits: Vec<u8>, scales: Vec<f32>, rows: usize, cols: usize, block: [usize; 2]) -> Result<Fp8, String> {
        let per = rows * cols;
        let matrices = bits.len().checked_div(per).unwrap_or(0);
        let blocks = rows.div_ceil(block[0].max(1)) * cols.div_ceil(block[1].max(1));
        if block.contains(&0) || bits.len() != matrices * per || scales.len() != matrices * blocks {
            return Err(format!(
                "FP8 data of {} elements with {} scales is not whole [{rows}, {cols}] matrices in {block:?} blocks",
                bits.len(),
                scales.len()
            ));
        }
        Ok(Fp8 { bits, scales, rows, cols, block })
    }

    pub fn len(&self) -> usize {
        self.bits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// The scales of row `g` of the stacked matrices (`g / rows` is the matrix).
    pub(crate) fn row_scales(&self, g: usize) -> &[f32] {
        let sc = self.cols.div_ceil(self.block[1]);
        let (m, i) = (g / self.rows, g % self.rows);
        &self.scales[(m * self.rows.div_ceil(self.block[0]) + i / self.block[0]) * sc..][..sc]
    }

    /// Row `g` of the stacked matrices, dequantised into `out` (`cols` long).
    fn widen_row(&self, g: usize, out: &mut [f32]) {
        let table = &E4M3;
        let bits = &self.bits[g * self.cols..(g + 1) * self.cols];
        for ((o, b), &s) in out.chunks_mut(self.block[1]).zip(bits.chunks(self.block[1])).zip(self.row_scales(g)) {
            for (o, &b) in o.iter_mut().zip(b) {
                *o = table[b as usize] * s;
            }
        }
    }

    /// Element `i`, row-major, dequantised.
    pub fn get(&self, i: usize) -> f32 {
        let (g, c) = (i / self.cols, i % self.cols);
        E4M3[self.bits[i] as usize] * self.row_scales(g)[c / self.block[1]]
    }
}

/// A weight this module widens: f16 bits or FP8, with its row length.
#[derive(Clone, Copy)]
pub(crate) enum Narrow<'a> {
    F16(&'a [u16], usize),
    F8(&'a Fp8),
}

/// `t` as a [`Narrow`] weight (f16 or FP8 data of rank ≥ 1); `None` for anything else,
/// bf16 included.
pub(crate) fn narrow(t: &Tensor) -> Option<Narrow<'_>> {
    match t.data() {
        Data::F16(v) => Some(Narrow::F16(v, *t.shape().last()?)),
        Data::F8(f) => Some(Narrow::F8(f)),
        _ => None,
    }
}

impl Narrow<'_> {
    /// The length of a row (the last axis).
    pub(crate) fn cols(&self) -> usize {
        match self {
            Narrow::F16(_, k) => *k,
            Narrow::F8(f) => f.cols,
        }
    }

    /// Rows over every leading axis.
    pub(crate) fn rows(&self) -> usize {
        match self {
            Narrow::F16(v, k) => v.len().checked_div(*k).unwrap_or(0),
            Narrow::F8(f) => f.bits.len().checked_div(f.cols).unwrap_or(0),
        }
    }

    /// Rows `row0 .. row0 + out.len() / cols` widened into `out`.
    pub(crate) fn widen_rows(&self, row0: usize, out: &mut [f32]) {
        let k = self.cols();
        match self {
            Narrow::F16(v, _) => {
                use half::slice::HalfFloatSliceExt;
                let bits = &v[row0 * k..row0 * k + out.len()];
                let halves: &[half::f16] = half::slice::HalfBitsSliceExt::reinterpret_cast(bits);
                halves.convert_to_f32_slice(out);
            }
            Narrow::F8(f) => {
                for (i, row) in out.chunks_mut(k.max(1)).enumerate() {
                    f.widen_row(row0 + i, row);
                }
            }
        }
    }
}

/// Any weight kept in its stored precision (bf16, f16, FP8) widened whole to the run's
/// precision; `None` for other tensors.
pub fn widen<T: Real>(t: &Tensor) -> Option<Tensor> {
    if let Some(w) = widen_bf16::<T>(t) {
        return Some(w);
    }
    let out = widen_f32(t)?;
    Some(Tensor::from_parts(t.shape().to_vec(), T::wrap(out.into_iter().map(|x| T::of(x as f64)).collect())))
}

/// An f16 or FP8 tensor's elements as `f32` (dequantised), row-major; `None` for other
/// tensors.
pub(crate) fn widen_f32(t: &Tensor) -> Option<Vec<f32>> {
    let n = narrow(t)?;
    let mut out = vec![0f32; t.numel()];
    n.widen_rows(0, &mut out);
    Some(out)
}

/// Rows `ids` of a `[rows, cols]` f16 or FP8 weight (an embedding lookup), widened:
/// `[ids.., cols]` in the run's precision. `None` when `w` is not such a weight.
pub(crate) fn gather_rows<T: Real>(w: &Tensor, ids: &[i64], ids_shape: &[usize]) -> Option<Result<Tensor, KErr>> {
    let n = narrow(w).filter(|_| w.rank() == 2)?;
    let (rows, k) = (n.rows(), n.cols());
    let mut out = vec![0f32; ids.len() * k];
    for (&i, row) in ids.iter().zip(out.chunks_mut(k.max(1))) {
        match usize::try_from(i).ok().filter(|&i| i < rows) {
            Some(i) => n.widen_rows(i, row),
            None => return Some(Err(KErr::index(format!("gather index {i} out of range for {rows} rows")))),
        }
    }
    let mut shape = ids_shape.to_vec();
    shape.push(k);
    Some(Ok(Tensor::from_parts(shape, T::wrap(out.into_iter().map(|x| T::of(x as f64)).collect()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::store::dequantise;
    use crate::reference::weights::f8e4m3_to_f32;

    /// FP8 rows widen to `dequantise`'s values on partial edge blocks and stacked
    /// matrices; f16 rows to `f16_to_f32`'s; a gather takes the rows asked for and refuses
    /// one out of range.
    #[test]
    fn rows_widen_as_the_loader_dequantises() {
        let (rows, cols, block) = (5usize, 7usize, [2, 3]);
        let bits: Vec<u8> = (0..2 * rows * cols).map(|i| ((i * 37 + 5) % 256) as u8 & 0b1011_1111).collect();
        let (sr, sc) = (rows.div_ceil(2), cols.div_ceil(3));
        let scales: Vec<f32> = (0..2 * sr * sc).map(|i| 0.25 + i as f32 * 0.5).collect();
        let mut want: Vec<f32> = bits.iter().map(|&b| f8e4m3_to_f32(b)).collect();
        dequantise(&mut want, &[2, rows, cols], &scales, &[2, sr, sc], block);
        let f = Fp8::new(bits, scales, rows, cols, block).unwrap();
        let t = Tensor::from_parts(vec![2, rows, cols], Data::F8(f.clone()));
        assert_eq!(widen::<f32>(&t).unwrap().to_f32_vec(), want);
        assert_eq!((0..f.len()).map(|i| f.get(i)).collect::<Vec<_>>(), want);
        let mut part = vec![0f32; 3 * cols];
        Narrow::F8(&f).widen_rows(4, &mut part);
        assert_eq!(part, want[4 * cols..7 * cols]);
        assert!(Fp8::new(vec![0; 10], vec![1.0; 6], rows, cols, block).is_err());

        let h: Vec<u16> = (0..12).map(|i| half::f16::from_f32(i as f32 * 0.75 - 3.0).to_bits()).collect();
        let t = Tensor::from_parts(vec![4, 3], Data::F16(h.clone()));
        let wide: Vec<f32> = h.iter().map(|&b| super::super::weights::f16_to_f32(b)).collect();
        assert_eq!(widen::<f64>(&t).unwrap().to_f32_vec(), wide);
        let g = gather_rows::<f32>(&t, &[2, 0], &[1, 2]).unwrap().unwrap();
        assert_eq!(g.shape(), &[1, 2, 3]);
        assert_eq!(g.to_f32_vec(), [&wide[6..9], &wide[0..3]].concat());
        assert!(gather_rows::<f32>(&t, &[4], &[1]).unwrap().is_err());
        assert!(gather_rows::<f32>(&Tensor::f32(&[1, 1], vec![0.0]), &[0], &[1]).is_none());
    }
}
