//! Rotary position embedding (`Op::Rope`), both pair layouts, partial `rotary_dim`,
//! `x` of rank 3 (`[b, s, d]`) or 4 (`[b, s, h, d]`), YaRN.
//!
//! Launch shape: 1-D, one unit per output element, [`EW_BLOCK`] units per cube. A unit
//! reads its own element and its pair partner and writes only its own, so no unit
//! waits on another; the partner is read twice overall, which costs less than the
//! synchronisation a one-unit-per-pair kernel would need for a layout-dependent write.
//! Dims from `rotary_dim` on are copied.
//!
//! The frequencies and the YaRN factor are functions of the op's settings alone. They
//! are computed on the host in `f64` by the function the reference interpreter uses
//! ([`rope_frequencies`]), rounded to
//! `f32` and passed as an [`Arg::F32Table`] `[inv_freq[0 .. rotary_dim/2], mscale]`, so
//! the device does not re-derive YaRN's ramp in lower precision and plain RoPE and
//! every YaRN setting share one kernel per layout.
//!
//! Numerics follow the reference: the angle is `inv_freq · position` rounded to the
//! kernel's float type (as HF builds its tables), cos and sin of it times the factor,
//! then `x1·cos - x2·sin` / `x2·cos + x1·sin`. cos and sin are taken in `f32` after an
//! explicit reduction of the angle to `[-π, π]`: positions reach tens of thousands of
//! radians, and GPU `cos`/`sin` are only specified to be accurate near 0 (WGSL allows an
//! absolute error of 2⁻¹¹ on `[-π, π]` and says nothing outside it).

use super::EW_BLOCK;
use crate::codegen::kernels::movement::float_elem;
use crate::codegen::launch::{grid_linear, single, Arg, Buf, Launch, NodeWork, Size};
use crate::codegen::{KernelSpec, Unsupported};
use crate::ir::{rope_frequencies, Graph, NodeId, Op, RopeLayout};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

/// `t` reduced to `[-π, π]`: `t - k·2π` with `k = round(t / 2π)` and 2π split in three
/// parts (Cody–Waite). The first two have few significant bits, so `k·C1` and `k·C2` are
/// exact for `|k| < 2¹³` (angles up to ~50 000 rad) and the reduced angle keeps nearly
/// all of `t`'s precision.
#[cfg(feature = "kernels")]
#[cube]
fn reduce_angle<G: Float>(t: G) -> G {
    let k = G::round(t * G::new(0.159_154_94));
    ((t - k * G::new(6.28125)) - k * G::new(0.001_935_005_2)) - k * G::new(3.019_916e-7)
}

/// Rotates each pair of the first `2·half` dims of every `d`-long head of `x`; a
/// position `positions[r]` covers `row_len` elements (`h·d`, or `d` at rank 3).
/// `freqs` is `[inv_freq[0..half], mscale]`.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
#[allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)] // `%` is what CubeCL expands
pub fn rope<F: Float>(
    x: &[F],
    positions: &[i32],
    freqs: &[f32],
    out: &mut [F],
    row_len: u32,
    d: u32,
    half: u32,
    #[comptime] interleaved: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let p = pos as u32;
        let j = p % d;
        if j < 2 * half {
            let head = p - j;
            // Pair i is (a, b); this unit computes the component `first` says.
            let mut i = j % half;
            let mut first = j < half;
            let mut a = head + i;
            let mut b = a + half;
            if comptime![interleaved] {
                i = j / 2;
                first = j % 2 == 0;
                a = head + 2 * i;
                b = a + 1;
            }
            let x1 = x[a as usize];
            let x2 = x[b as usize];
            let angle = F::cast_from(freqs[i as usize]) * F::cast_from(positions[(p / row_len) as usize]);
            let t = reduce_angle::<f32>(f32::cast_from(angle));
            let mscale = F::cast_from(freqs[half as usize]);
            let c = F::cast_from(f32::cos(t)) * mscale;
            let s = F::cast_from(f32::sin(t)) * mscale;
            if first {
                out[pos] = x1 * c - x2 * s;
            } else {
                out[pos] = x2 * c + x1 * s;
            }
        } else {
            out[pos] = x[pos];
        }
    }
}

/// The spec of a `rope` node, `None` when `n` is not one.
pub(crate) fn spec(g: &Graph, n: NodeId) -> Option<Result<KernelSpec, Unsupported>> {
    let Op::Rope { layout, rotary_dim, .. } = &g.node(n).op else { return None };
    let x = g.ty(g.inputs(n)[0]);
    let no = |reason: String| Unsupported { op: "rope", reason };
    Some(float_elem(g, n, &[1]).and_then(|elem| {
        if !(3..=4).contains(&x.rank()) {
            return Err(no(format!("x of rank {} (3 or 4 expected)", x.rank())));
        }
        match x.shape.last().and_then(|d| d.as_const()) {
            Some(d) if *rotary_dim > 0 && rotary_dim % 2 == 0 && i64::from(*rotary_dim) <= d => {}
            _ => return Err(no(format!("rotary_dim {rotary_dim} for a head of {}", x.shape.last().unwrap()))),
        }
        Ok(KernelSpec::Rope { elem, interleaved: *layout == RopeLayout::Interleaved })
    }))
}

/// The launch of a `rope` node whose spec is `spec`.
pub(crate) fn work(g: &Graph, n: NodeId, spec: KernelSpec) -> NodeWork {
    let Op::Rope { theta, rotary_dim, yarn, .. } = &g.node(n).op else { unreachable!("rope::work on a non-rope node") };
    let x = &g.ty(g.inputs(n)[0]).shape;
    let (freqs, mscale) = rope_frequencies(theta.get(), *rotary_dim as usize, yarn.as_ref());
    let table = freqs.iter().chain([&mscale]).map(|&f| (f as f32).to_bits()).collect();
    let d = x.last().expect("rank checked");
    let args = vec![
        Arg::Buf(Buf::Input(0)),
        Arg::Buf(Buf::Input(1)),
        Arg::F32Table(table),
        Arg::Buf(Buf::Output(0)),
        Arg::U32(Size::product(&x.0[2..])),
        Arg::U32(Size::Dim(d)),
        Arg::U32(Size::lit(i64::from(*rotary_dim / 2))),
    ];
    // Per element: its angle's cosine and sine, two products and a sum.
    single(Launch::new(spec, args, grid_linear(Size::numel(x).ceil_div(EW_BLOCK as i64)), Size::numel(x).mul(Size::lit(5))))
}
