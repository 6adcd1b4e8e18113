//! The params of an opened checkpoint, decoded on first use.
//!
//! [`CheckpointWeights`] implements the interpreter's [`Weights`]: a param is decoded from
//! the memory-mapped files the first time a run asks for it (widened to `f32`, FP8
//! dequantised by its block scales, per-expert matrices stacked, fused ones cut) and kept
//! from then on. Nothing is decoded when a directory is opened, so checking a large
//! checkpoint against its spec costs its headers only, and a run that never reaches a
//! param (a train-only MTP module) never pays for it.
//!
//! With [`CheckpointWeights::keep_stored`] (inference), a param stored in bf16 or f16 is
//! kept so (its bits, stacked and cut as the others), half the memory of `f32`, and one
//! stored in FP8 e4m3 with block scales keeps its bytes and scales (a quarter): the
//! interpreter's matmuls widen them a block at a time ([`crate::reference::narrow`]).

use super::files::Shard;
use super::layout::{Piece, Source, Stored};
use crate::reference::narrow::Fp8;
use crate::reference::tensor::Data;
use crate::reference::weights::{bf16_to_f32, f16_to_f32, f8e4m3_to_f32};
use crate::reference::{Tensor, Weights};
use rayon::prelude::*;
use safetensors::Dtype;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// One param: where it comes from, and its decoded value once asked for.
struct Slot {
    source: Source,
    value: OnceLock<Tensor>,
}

/// The params of a checkpoint by IR name ([`dsc_compiler::ir::param_path`]), decoded lazily.
pub struct CheckpointWeights {
    shards: Vec<Shard>,
    slots: HashMap<String, Slot>,
    block: [usize; 2],
    keep_stored: bool,
}

/// Below this many elements a tensor is decoded on one thread (rayon's overhead would
/// dominate).
const PAR_MIN: usize = 1 << 16;

impl CheckpointWeights {
    pub(crate) fn new(shards: Vec<Shard>, plan: HashMap<String, Source>, block: [usize; 2]) -> CheckpointWeights {
        let slots = plan.into_iter().map(|(k, source)| (k, Slot { source, value: OnceLock::new() })).collect();
        CheckpointWeights { shards, slots, block, keep_stored: false }
    }

    /// Keep params in their stored precision (bf16, f16, FP8 with its block scales)
    /// instead of widening them to `f32` (set before the first [`CheckpointWeights::get`];
    /// training keeps `f32`, which it updates).
    pub fn keep_stored(&mut self, on: bool) {
        self.keep_stored = on;
    }

    /// The param names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.slots.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// Bytes of the mapped files (address space, not memory: pages come in as read).
    pub fn mapped_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.len() as u64).sum()
    }

    /// Bytes of the params decoded so far (`f32`; 2 per element kept in bf16 or f16, 1
    /// per FP8 element and 4 per scale).
    pub fn decoded_bytes(&self) -> u64 {
        let size = |t: &Tensor| match t.data() {
            Data::Bf16(v) | Data::F16(v) => 2 * v.len(),
            Data::F8(f) => f.bits.len() + 4 * f.scales.len(),
            _ => 4 * t.numel(),
        };
        self.slots.values().filter_map(|s| s.value.get()).map(|t| size(t) as u64).sum()
    }

    /// Bytes every param takes once decoded (`f32`), whether or not it has been.
    pub fn total_bytes(&self) -> u64 {
        self.slots
            .values()
            .map(|s| {
                let n: usize = match &s.source {
                    Source::One(p) => p.shape().iter().product(),
                    Source::Stack(ps) => ps.iter().map(|p| p.shape().iter().product::<usize>()).sum(),
                };
                (n * 4) as u64
            })
            .sum()
    }

    /// The param `name`, decoded now if it was not yet.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        let s = self.slots.get(name)?;
        Some(s.value.get_or_init(|| self.assemble(&s.source)))
    }

    /// Decodes every param now, in parallel (for timing runs without the first-use cost).
    pub fn preload(&self) {
        self.slots.par_iter().for_each(|(_, s)| {
            s.value.get_or_init(|| self.assemble(&s.source));
        });
    }

    fn assemble(&self, source: &Source) -> Tensor {
        let t = self.assemble_copy(source);
        for s in pieces(source).iter().flat_map(|p| std::iter::once(&p.data).chain(&p.scale)) {
            self.shards[s.shard].release(&s.info);
        }
        t
    }

    /// The param copied out of the mapping: in its stored precision (bf16 or f16 bits,
    /// FP8 bytes and scales) or widened to `f32`.
    fn assemble_copy(&self, source: &Source) -> Tensor {
        let pieces = pieces(source);
        let mut shape = pieces.first().map(|p| p.shape()).unwrap_or_default();
        if let Source::Stack(ps) = source {
            shape.insert(0, ps.len());
        }
        let all = |dtype: Dtype, scaled: bool| {
            !pieces.is_empty() && pieces.iter().all(|p| p.data.info.dtype == dtype && p.scale.is_some() == scaled)
        };
        if self.keep_stored && (all(Dtype::BF16, false) || all(Dtype::F16, false)) {
            // Piece by piece into one buffer (a flat_map collects element by element, which
            // took a third of a small model's start-up), each streamed into place.
            let mut bits = Vec::with_capacity(shape.iter().product());
            for p in pieces {
                self.piece_bits(p, &mut bits);
            }
            let data = if all(Dtype::BF16, false) { Data::Bf16(bits) } else { Data::F16(bits) };
            return Tensor::from_parts(shape, data);
        }
        // FP8 keeps its blocks whole: a piece cut out of a fused tensor (rows that need not
        // start on a block) is widened instead.
        if self.keep_stored && shape.len() >= 2 && all(Dtype::F8_E4M3, true) && pieces.iter().all(|p| p.rows.is_none()) {
            let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            let (mut bits, mut scales) = (Vec::with_capacity(shape.iter().product()), Vec::new());
            for p in pieces {
                self.piece_bytes(p, &mut bits);
                self.decode(p.scale.as_ref().expect("all scaled"), &mut scales);
            }
            // The layout check gave every scale its block count; `new` checks it again.
            if let Ok(f) = Fp8::new(bits, scales, rows, cols, self.block) {
                return Tensor::from_parts(shape, Data::F8(f));
            }
        }
        let mut data = Vec::with_capacity(shape.iter().product());
        for p in pieces {
            self.piece(p, &mut data);
        }
        Tensor::f32(&shape, data)
    }

    /// One piece appended to `out` as `f32`: widened, dequantised, cut.
    fn piece(&self, p: &Piece, out: &mut Vec<f32>) {
        match &p.scale {
            None => self.whole_or_cut(p, out, |out| self.decode(&p.data, out)),
            Some(sc) => {
                let (mut v, mut s) = (Vec::new(), Vec::new());
                self.decode(&p.data, &mut v);
                self.decode(sc, &mut s);
                dequantise(&mut v, &p.data.info.shape, &s, &sc.info.shape, self.block);
                out.extend_from_slice(&cut_rows(v, p));
            }
        }
    }

    /// One bf16 or f16 piece's bits appended to `out`, cut as [`Self::piece`] cuts.
    fn piece_bits(&self, p: &Piece, out: &mut Vec<u16>) {
        let shard = &self.shards[p.data.shard];
        self.whole_or_cut(p, out, |out| {
            shard.stream(&p.data.info, 2, |b| out.extend(b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))))
        });
    }

    /// One FP8 piece's bytes appended to `out`, cut as [`Self::piece`] cuts.
    fn piece_bytes(&self, p: &Piece, out: &mut Vec<u8>) {
        let shard = &self.shards[p.data.shard];
        self.whole_or_cut(p, out, |out| shard.stream(&p.data.info, 1, |b| out.extend_from_slice(b)));
    }

    /// `fill` appends a stored tensor's elements: straight into `out` when the piece is
    /// all of it (no second copy of a large weight while it is assembled), else into a
    /// scratch cut to the piece's rows.
    fn whole_or_cut<E: Copy>(&self, p: &Piece, out: &mut Vec<E>, fill: impl FnOnce(&mut Vec<E>)) {
        if p.rows.is_none() {
            return fill(out);
        }
        let mut v = Vec::new();
        fill(&mut v);
        out.extend_from_slice(&cut_rows(v, p));
    }

    /// A stored tensor's elements appended to `out` as `f32`. The layout check admitted
    /// only float types.
    fn decode(&self, s: &Stored, out: &mut Vec<f32>) {
        let shard = &self.shards[s.shard];
        // Whole bytes for every dtype `decode_bytes` reads.
        let unit = s.info.dtype.bitsize() / 8;
        out.reserve(shard.bytes(&s.info).len() / unit.max(1));
        shard.stream(&s.info, unit, |b| out.extend(decode_bytes(b, s.info.dtype)));
    }
}

/// The pieces a param is made of (one, or the stacked experts).
fn pieces(source: &Source) -> &[Piece] {
    match source {
        Source::One(p) => std::slice::from_ref(p),
        Source::Stack(ps) => ps,
    }
}

/// A piece's elements (`v`, all of its stored tensor's) with only the rows it takes (a
/// fused tensor's part), or all of them.
fn cut_rows<E: Copy>(v: Vec<E>, p: &Piece) -> Vec<E> {
    match p.rows {
        None => v,
        Some((start, len)) => {
            let shape = &p.data.info.shape;
            let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            v.chunks_exact(rows * cols).flat_map(|m| m[start * cols..(start + len) * cols].iter().copied()).collect()
        }
    }
}

/// Little-endian stored elements of a float `dtype` as `f32` (f64 rounds to nearest).
pub(crate) fn decode_bytes(b: &[u8], dtype: Dtype) -> Vec<f32> {
    fn go<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f32 + Sync) -> Vec<f32> {
        let conv = |c: &[u8]| f(c.try_into().expect("chunks_exact"));
        if b.len() / N >= PAR_MIN {
            b.par_chunks_exact(N).map(conv).collect()
        } else {
            b.chunks_exact(N).map(conv).collect()
        }
    }
    match dtype {
        Dtype::F32 => go::<4>(b, f32::from_le_bytes),
        Dtype::F64 => go::<8>(b, |x| f64::from_le_bytes(x) as f32),
        Dtype::BF16 => go::<2>(b, |x| bf16_to_f32(u16::from_le_bytes(x))),
        Dtype::F16 => go::<2>(b, |x| f16_to_f32(u16::from_le_bytes(x))),
        Dtype::F8_E4M3 => go::<1>(b, |x| f8e4m3_to_f32(x[0])),
        other => unreachable!("the layout check refuses {other:?}"),
    }
}

/// DeepSeek-V3's `weight_dequant`: `w[.., i, j] *= scale_inv[.., i / b₀, j / b₁]`, where
/// the weight is `[lead.., r, c]` and the scale `[lead.., ⌈r/b₀⌉, ⌈c/b₁⌉]` (checked when
/// the checkpoint was opened). Blocks at the right and bottom edges may be partial.
pub(crate) fn dequantise(w: &mut [f32], shape: &[usize], scale: &[f32], scale_shape: &[usize], block: [usize; 2]) {
    let n = shape.len();
    let (r, c) = (shape[n - 2], shape[n - 1]);
    let (sr, sc) = (scale_shape[n - 2], scale_shape[n - 1]);
    if r == 0 || c == 0 {
        return;
    }
    // One task per row of any of the stacked matrices.
    let one = |(g, row): (usize, &mut [f32])| {
        let (m, i) = (g / r, g % r);
        let srow = &scale[(m * sr + i / block[0]) * sc..][..sc];
        for (j, x) in row.iter_mut().enumerate() {
            *x *= srow[j / block[1]];
        }
    };
    if w.len() >= PAR_MIN {
        w.par_chunks_exact_mut(c).enumerate().for_each(one);
    } else {
        w.chunks_exact_mut(c).enumerate().for_each(one);
    }
}

impl Weights for CheckpointWeights {
    fn get(&self, name: &str) -> Option<&Tensor> {
        CheckpointWeights::get(self, name)
    }
}

/// Shared between a backend and whoever reports on it (`dsc generate --stats`).
impl Weights for Arc<CheckpointWeights> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        CheckpointWeights::get(self, name)
    }
}
