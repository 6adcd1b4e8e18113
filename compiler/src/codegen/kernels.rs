//! The generic `#[cube]` kernels. Each is specialised by comptime data derived from the
//! IR (an elementwise program, an epsilon, a block size), so one Rust function stands
//! for a family of kernels and CubeCL caches each distinct specialisation once.
//!
//! Launch shapes (the host side, `dsc_runtime::wgpu`, follows them):
//! - [`fused_ew`]: 1-D, one unit per output element, [`EW_BLOCK`] units per cube.
//! - [`rms_norm`], [`softmax`]: one cube per row, [`ROW_BLOCK`] units per cube.
//! - [`matmul`]: [`MM_UNITS`]×[`MM_UNITS`] units per cube, one cube per [`MM_TILE`]²
//!   output tile, [`MM_REG`]² outputs per unit.

pub use super::spec::{Access, EwOp, EwProgram};
#[cfg(feature = "kernels")]
use cubecl::prelude::*;

pub mod attention;
pub mod attention_grad;
pub mod grad;
pub mod heads;
pub mod loss;
pub mod moe;
pub mod moe_grad;
pub mod movement;
pub mod optim;
pub mod reduce;
pub mod rope;
pub mod sample;

pub use super::spec::{EW_BLOCK, MM_UNITS, ROW_BLOCK, TILE};
/// `log2(ROW_BLOCK)`: the reduction is a comptime-unrolled halving loop (a runtime
/// `while` over a shared-memory index trips a CubeCL 0.11.3 verifier bug, CUBECL.md §2).
pub const ROW_BLOCK_LOG2: u32 = 7;
/// Side of the output tile one cube of [`matmul`], [`heads::matmul_ew`] and
/// [`heads::matmul_gate_up`] computes.
pub const MM_TILE: u32 = 64;
/// Outputs per unit per side: each unit accumulates `MM_REG`² outputs in registers, at
/// rows `ty + i·MM_UNITS` and columns `tx + j·MM_UNITS` of the tile (strided, so
/// neighbouring units touch neighbouring addresses). On lavapipe 8×8 per unit ran ~2×
/// faster than 4×4 with 256 units, and 16×16 spilled.
pub const MM_REG: u32 = MM_TILE / MM_UNITS;
/// Register rows per unit of the skinny form of the matmuls (`skinny`): an 8-row tile
/// ([`mm_rows`]), for a step of few rows (a decode step's `b` tokens), where the 64-row
/// tile would compute 63 rows of padding per real one at `b = 1`.
pub const MM_REG_SKINNY: u32 = 1;
/// The k extent of one staged step (two barriers per step).
pub const MM_BK: u32 = 16;
/// Row stride of a staged `[kk][r]` tile: one padding element against bank conflicts.
pub const MM_STRIDE: u32 = MM_TILE + 1;
/// Elements of one staged tile in the matmuls' shared buffer.
pub const MM_STAGE: u32 = MM_BK * MM_STRIDE;

/// The fused elementwise kernel. `layout` holds the output shape (`rank` values) then,
/// per input, `rank` strides (only read for [`Access::Strided`] inputs; the host
/// writes them for every input so the layout does not depend on the program). The
/// inputs are `I`: `F` itself, or `i32` index tensors a program compares (a one-hot
/// `eq(indices, iota)`), converted to `F` as they are loaded (exact below 2²⁴).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn fused_ew<F: Float, I: Numeric>(inputs: &Sequence<Box<[I]>>, layout: &[u32], out: &mut [F], #[comptime] prog: EwProgram) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let mut regs = Sequence::<F>::new();
        #[unroll]
        for j in 0..prog.inputs.len() {
            let access = comptime![prog.inputs[j]];
            match access {
                Access::Direct => regs.push(F::cast_from(inputs.index(j)[pos])),
                Access::Scalar => regs.push(F::cast_from(inputs.index(j)[0])),
                Access::Strided => {
                    // Walk the axes from the last: coordinate = rem % dim.
                    let mut rem = pos as u32;
                    let mut offset = 0u32;
                    #[unroll]
                    for r in 0..prog.rank {
                        let d = comptime![prog.rank - 1 - r];
                        let dim = layout[d as usize];
                        let stride = layout[comptime![(prog.rank * (1 + j as u32) + d) as usize]];
                        offset += (rem % dim) * stride;
                        rem /= dim;
                    }
                    regs.push(F::cast_from(inputs.index(j)[offset as usize]));
                }
            }
        }
        ew_eval::<F>(&mut regs, prog.ops.clone());
        out[pos] = *regs.index(comptime![prog.inputs.len() + prog.ops.len() - 1]);
    }
}

/// Runs the elementwise `ops` over `regs`, pushing one register per op: the interpreter
/// of [`fused_ew`]'s program, shared with the kernels whose epilogue is such a program
/// (a matmul or rms_norm head, `kernels::heads`). It runs at expansion time over comptime
/// data, so the generated code is straight-line.
/// (The unrolled loop indexes `ops` because `#[unroll]` needs a range.)
#[allow(clippy::needless_range_loop)]
#[cfg(feature = "kernels")]
#[cube]
pub fn ew_eval<F: Float>(regs: &mut Sequence<F>, #[comptime] ops: Vec<EwOp>) {
    #[unroll]
    for i in 0..ops.len() {
        let op = comptime![ops[i]];
        match op {
            EwOp::Neg(a) => regs.push(-*regs.index(a as usize)),
            EwOp::Abs(a) => regs.push(F::abs(*regs.index(a as usize))),
            EwOp::Exp(a) => regs.push(F::exp(*regs.index(a as usize))),
            EwOp::Log(a) => regs.push(F::ln(*regs.index(a as usize))),
            EwOp::Sqrt(a) => regs.push(F::sqrt(*regs.index(a as usize))),
            EwOp::Rsqrt(a) => regs.push(F::new(1.0) / F::sqrt(*regs.index(a as usize))),
            EwOp::Recip(a) => regs.push(F::new(1.0) / *regs.index(a as usize)),
            EwOp::Square(a) => {
                let x = *regs.index(a as usize);
                regs.push(x * x)
            }
            EwOp::Sigmoid(a) => regs.push(F::new(1.0) / (F::new(1.0) + F::exp(-*regs.index(a as usize)))),
            EwOp::Silu(a) => {
                let x = *regs.index(a as usize);
                regs.push(x / (F::new(1.0) + F::exp(-x)))
            }
            EwOp::Tanh(a) => regs.push(F::tanh(*regs.index(a as usize))),
            EwOp::Sin(a) => regs.push(F::sin(*regs.index(a as usize))),
            EwOp::Cos(a) => regs.push(F::cos(*regs.index(a as usize))),
            EwOp::Add(a, b) => regs.push(*regs.index(a as usize) + *regs.index(b as usize)),
            EwOp::Sub(a, b) => regs.push(*regs.index(a as usize) - *regs.index(b as usize)),
            EwOp::Mul(a, b) => regs.push(*regs.index(a as usize) * *regs.index(b as usize)),
            EwOp::Div(a, b) => regs.push(*regs.index(a as usize) / *regs.index(b as usize)),
            EwOp::Max(a, b) => {
                let x = *regs.index(a as usize);
                let y = *regs.index(b as usize);
                regs.push(select(x > y, x, y))
            }
            EwOp::Min(a, b) => {
                let x = *regs.index(a as usize);
                let y = *regs.index(b as usize);
                regs.push(select(x < y, x, y))
            }
            EwOp::Pow(a, b) => regs.push(F::powf(*regs.index(a as usize), *regs.index(b as usize))),
            EwOp::Lt(a, b) => {
                let c = *regs.index(a as usize) < *regs.index(b as usize);
                regs.push(select(c, F::new(1.0), F::new(0.0)))
            }
            EwOp::Eq(a, b) => {
                let c = *regs.index(a as usize) == *regs.index(b as usize);
                regs.push(select(c, F::new(1.0), F::new(0.0)))
            }
            EwOp::Select(c, a, b) => {
                let cond = *regs.index(c as usize) != F::new(0.0);
                regs.push(select(cond, *regs.index(a as usize), *regs.index(b as usize)))
            }
            EwOp::Copy(a) => regs.push(*regs.index(a as usize)),
        }
    }
}

/// Tree reduction of `shared[0..ROW_BLOCK]` into `shared[0]`, by sum or by max.
#[cfg(feature = "kernels")]
#[cube]
fn block_reduce<F: Float>(shared: &mut Shared<[F]>, tid: u32, #[comptime] max: bool) {
    sync_cube();
    #[unroll]
    for s in 0..ROW_BLOCK_LOG2 {
        let stride = comptime![ROW_BLOCK >> (s + 1)];
        if tid < stride {
            let a = shared[tid as usize];
            let b = shared[(tid + stride) as usize];
            if comptime![max] {
                shared[tid as usize] = select(a > b, a, b);
            } else {
                shared[tid as usize] = a + b;
            }
        }
        sync_cube();
    }
}

/// [`block_reduce`]'s sum for two arrays of [`ROW_BLOCK`] partials at once (at 0 and at
/// `ROW_BLOCK` of one shared buffer), each into its first slot.
#[cfg(feature = "kernels")]
#[cube]
pub(crate) fn reduce_pair(shared: &mut Shared<[f32]>, tid: u32) {
    sync_cube();
    #[unroll]
    for s in 0..ROW_BLOCK_LOG2 {
        let stride = comptime![ROW_BLOCK >> (s + 1)];
        if tid < stride {
            shared[tid as usize] += shared[(tid + stride) as usize];
            shared[(ROW_BLOCK + tid) as usize] += shared[(ROW_BLOCK + tid + stride) as usize];
        }
        sync_cube();
    }
}

/// The row a row kernel's cube works on, under [`launch::grid_rows`]: rows fold into
/// `x · z`, so the last `z` slice may hold cubes past the last row (each kernel skips
/// those, a whole cube at a time, so its barriers stay uniform).
///
/// [`launch::grid_rows`]: crate::codegen::launch::grid_rows
#[cfg(feature = "kernels")]
#[cube]
pub fn row_pos() -> u32 {
    CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X
}

/// `y = x · rsqrt(mean(x²) + eps) · gain` over each row of `cols` elements; one cube per
/// row, the sum of squares reduced in shared memory (no plane ops: the plane size differs
/// between lavapipe (8) and NVIDIA (32), and lavapipe's WGSL path reports none).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn rms_norm<F: Float>(x: &[F], gain: &[F], out: &mut [F], cols: u32, #[comptime] eps_bits: u32) {
    let row = row_pos();
    if row as usize * cols as usize >= out.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * cols;
    let mut shared = Shared::<[F]>::new_slice(ROW_BLOCK as usize);
    let mut acc = F::new(0.0);
    let iters = cols.div_ceil(ROW_BLOCK);
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            let v = x[(base + c) as usize];
            acc += v * v;
        }
    }
    shared[tid as usize] = acc;
    block_reduce::<F>(&mut shared, tid, false);
    let eps = F::new(comptime![f32::from_bits(eps_bits)]);
    let scale = F::new(1.0) / F::sqrt(shared[0] / F::cast_from(cols) + eps);
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            out[(base + c) as usize] = x[(base + c) as usize] * scale * gain[c as usize];
        }
    }
}

/// Max-subtracted softmax over each row of `cols` elements; one cube per row.
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn softmax<F: Float>(x: &[F], out: &mut [F], cols: u32) {
    let row = row_pos();
    if row as usize * cols as usize >= out.len() {
        terminate!();
    }
    let tid = UNIT_POS_X;
    let base = row * cols;
    let mut shared = Shared::<[F]>::new_slice(ROW_BLOCK as usize);
    let iters = cols.div_ceil(ROW_BLOCK);
    // Every row has at least one element, so element 0 seeds the max of idle units.
    let mut m = x[base as usize];
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            let v = x[(base + c) as usize];
            m = select(v > m, v, m);
        }
    }
    shared[tid as usize] = m;
    block_reduce::<F>(&mut shared, tid, true);
    let row_max = shared[0];
    // Everyone has read the max before the buffer is reused for the sum.
    sync_cube();
    let mut acc = F::new(0.0);
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            acc += F::exp(x[(base + c) as usize] - row_max);
        }
    }
    shared[tid as usize] = acc;
    block_reduce::<F>(&mut shared, tid, false);
    let inv = F::new(1.0) / shared[0];
    for it in 0..iters {
        let c = it * ROW_BLOCK + tid;
        if c < cols {
            out[(base + c) as usize] = F::exp(x[(base + c) as usize] - row_max) * inv;
        }
    }
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` (the IR's `matmul`: a torch `Linear` weight
/// `[out, in]`), register-blocked: one cube per [`MM_TILE`]² output tile, each of its
/// [`MM_UNITS`]² units accumulating [`MM_REG`]² outputs in `f32` (see [`mm_stage`] and
/// [`mm_step`]); loads outside the matrices read as 0 so any M, N, K works. `skinny`
/// tiles rows by 8 instead of 64 (each unit one row of outputs).
#[cfg(feature = "kernels")]
#[cube(launch, create_dummy_kernel)]
pub fn matmul<F: Float>(x: &[F], w: &[F], out: &mut [F], m: u32, n: u32, k: u32, #[comptime] skinny: bool) {
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let rr = comptime![mm_rows(skinny)];
    let row0 = CUBE_POS_Y * comptime![rr * MM_UNITS];
    let col0 = CUBE_POS_X * MM_TILE;
    // One shared buffer holding both staged tiles (x's at 0, w's at MM_STAGE): with two,
    // CubeCL 0.11.3 lays them out in a different order from run to run, and the
    // generated source must be byte-identical.
    let mut smem = Shared::<[F]>::new_slice(comptime![(2 * MM_STAGE) as usize]);
    let mut acc = mm_zero(rr);
    for t in 0..k.div_ceil(MM_BK) {
        let k0 = t * MM_BK;
        mm_stage::<F>(x, &mut smem, 0u32, row0, m, k0, k, comptime![rr * MM_UNITS]);
        mm_stage::<F>(w, &mut smem, MM_STAGE, col0, n, k0, k, MM_TILE);
        sync_cube();
        mm_step::<F>(&smem, MM_STAGE, &mut acc, tx, ty, rr);
        sync_cube();
    }
    #[unroll]
    for i in 0..rr {
        let row = row0 + ty + i * MM_UNITS;
        #[unroll]
        for j in 0..MM_REG {
            let col = col0 + tx + j * MM_UNITS;
            if row < m && col < n {
                out[(row * n + col) as usize] = F::cast_from(acc[(i * MM_REG + j) as usize]);
            }
        }
    }
}

/// Register rows per unit: [`MM_REG`], or [`MM_REG_SKINNY`] in the skinny form.
pub const fn mm_rows(skinny: bool) -> u32 {
    if skinny {
        MM_REG_SKINNY
    } else {
        MM_REG
    }
}

/// The matmuls' accumulators, `rr`·[`MM_REG`] zeros (`acc[i·MM_REG + j]` is the output at
/// row `ty + i·MM_UNITS`, column `tx + j·MM_UNITS` of the cube's tile).
#[cfg(feature = "kernels")]
#[cube]
pub fn mm_zero(#[comptime] rr: u32) -> Array<f32> {
    let mut acc = Array::<f32>::new(comptime![(rr * MM_REG) as usize]);
    #[unroll]
    for i in 0..comptime![rr * MM_REG] {
        acc[i as usize] = 0.0;
    }
    acc
}

/// Stages `src[r0 .. r0 + tile, k0 .. k0 + MM_BK]` (`src` is `[rows, k]`, row-major)
/// into `smem[off ..]` transposed, `[kk][r]` with a row stride of [`MM_STRIDE`]
/// (`MM_TILE + 1`, so a warp's transposed stores fall in distinct banks); elements
/// outside `rows × k` are 0. Consecutive units read consecutive `k` (coalesced); each
/// unit loads `tile · MM_BK / MM_UNITS²` elements.
#[cfg(feature = "kernels")]
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mm_stage<F: Float>(
    src: &[F],
    smem: &mut Shared<[F]>,
    #[comptime] off: u32,
    r0: u32,
    rows: u32,
    k0: u32,
    k: u32,
    #[comptime] tile: u32,
) {
    let tid = UNIT_POS_Y * MM_UNITS + UNIT_POS_X;
    #[unroll]
    for s in 0..comptime![tile * MM_BK / (MM_UNITS * MM_UNITS)] {
        let e = tid + s * comptime![MM_UNITS * MM_UNITS];
        let r = e / MM_BK;
        let kk = e % MM_BK;
        let gr = r0 + r;
        let gk = k0 + kk;
        let mut v = F::new(0.0);
        if gr < rows && gk < k {
            v = src[(gr * k + gk) as usize];
        }
        smem[(off + kk * MM_STRIDE + r) as usize] = v;
    }
}

/// One k step of the register-blocked product: `acc[i, j] += Σ_kk xs[kk][ty + i·MM_UNITS]
/// · ws[kk][tx + j·MM_UNITS]` (`i < rr`) over a staged x tile at `smem[0 ..]` and a staged
/// weight tile at `smem[wo ..]`, both as [`mm_stage`] writes them; products in `f32`.
#[cfg(feature = "kernels")]
#[cube]
pub fn mm_step<F: Float>(smem: &Shared<[F]>, #[comptime] wo: u32, acc: &mut Array<f32>, tx: u32, ty: u32, #[comptime] rr: u32) {
    // A run-time loop over the staged k: unrolling it too would repeat the 64
    // multiply-adds 16 times, making each matmul's source ~200 KB and `dsc compile` of a
    // full spec take seconds, for no gain on lavapipe (measured) and little on GPUs.
    for kk in 0..MM_BK {
        let mut a = Array::<f32>::new(comptime![rr as usize]);
        let mut b = Array::<f32>::new(comptime![MM_REG as usize]);
        #[unroll]
        for i in 0..rr {
            a[i as usize] = f32::cast_from(smem[(kk * MM_STRIDE + ty + i * MM_UNITS) as usize]);
        }
        #[unroll]
        for j in 0..MM_REG {
            b[j as usize] = f32::cast_from(smem[(wo + kk * MM_STRIDE + tx + j * MM_UNITS) as usize]);
        }
        #[unroll]
        for i in 0..rr {
            #[unroll]
            for j in 0..MM_REG {
                acc[(i * MM_REG + j) as usize] += a[i as usize] * b[j as usize];
            }
        }
    }
}
