//! Runs `dsc_compiler::codegen` kernels on a wgpu device through CubeCL (feature `wgpu`).
//!
//! First milestone: one node at a time, tensors in and out through host memory. The
//! kernels compute in the spec's dtype ([`Elem`]); [`Tensor`]s cross as `f32` (the
//! reference interpreter's precision), converted to `f16` on upload when the kernel
//! computes in `f16`. Graph execution, device-resident buffers and a memory plan come
//! later.

use crate::reference::Tensor;
use cubecl::prelude::*;
use cubecl::wgpu::WgpuDevice;
use dsc_compiler::codegen::{cube_dim, kernels, Elem, KernelSpec};

/// A wgpu device and CubeCL's client for it.
pub struct WgpuBackend {
    client: cubecl::client::Client,
}

impl WgpuBackend {
    /// The default wgpu adapter (a GPU when there is one, else lavapipe). Panics inside
    /// CubeCL when there is no adapter at all, which is what tests want: a machine
    /// without one must fail them, not skip them.
    pub fn new() -> WgpuBackend {
        WgpuBackend { client: cubecl::Device::Wgpu(WgpuDevice::default()).client() }
    }

    /// Runs `spec` on `inputs` (the node's inputs in slot order) and returns the result of
    /// shape `out_shape`. The output buffer is first filled with NaN so that an element
    /// the kernel fails to write cannot pass for a result.
    pub fn run(&self, spec: &KernelSpec, inputs: &[&Tensor], out_shape: &[usize]) -> Result<Tensor, String> {
        match spec.elem() {
            Elem::F32 => self.run_as::<f32>(spec, inputs, out_shape, |v| v, |v| v),
            Elem::F16 => self.run_as::<half::f16>(spec, inputs, out_shape, half::f16::from_f32, half::f16::to_f32),
        }
    }

    fn upload<F: CubeElement>(&self, data: &[F]) -> cubecl::server::Handle {
        self.client.create_from_slice(F::as_bytes(data))
    }

    fn run_as<F: Float + CubeElement>(
        &self,
        spec: &KernelSpec,
        inputs: &[&Tensor],
        out_shape: &[usize],
        to: impl Fn(f32) -> F,
        from: impl Fn(F) -> f32,
    ) -> Result<Tensor, String> {
        let numel: usize = out_shape.iter().product();
        if numel == 0 {
            return Ok(Tensor::zeros(out_shape));
        }
        let host: Vec<Vec<F>> = inputs.iter().map(|t| t.to_f32_vec().into_iter().map(&to).collect()).collect();
        let handles: Vec<_> = host.iter().map(|h| self.upload(h)).collect();
        let out = self.upload(&vec![to(f32::NAN); numel]);
        let buf = |i: usize| unsafe { BufferArg::from_raw_parts(handles[i].clone(), host[i].len()) };
        let out_arg = unsafe { BufferArg::from_raw_parts(out.clone(), numel) };
        let dim = cube_dim(spec);
        let u32_of = |n: usize| u32::try_from(n).map_err(|_| format!("size {n} exceeds u32"));
        match spec {
            KernelSpec::Elementwise { program, .. } => {
                if inputs.len() != program.inputs.len() {
                    return Err(format!("{} inputs for a program reading {}", inputs.len(), program.inputs.len()));
                }
                let layout = ew_layout(out_shape, inputs, program.rank as usize)?;
                let lh = self.upload(&layout);
                let mut seq = SequenceArg::<Box<[F]>>::new();
                for i in 0..inputs.len() {
                    seq.push(buf(i));
                }
                let count = CubeCount::Static(u32_of(numel.div_ceil(kernels::EW_BLOCK as usize))?, 1, 1);
                kernels::fused_ew::launch::<F>(
                    &self.client,
                    count,
                    dim,
                    seq,
                    unsafe { BufferArg::from_raw_parts(lh, layout.len()) },
                    out_arg,
                    program.clone(),
                );
            }
            KernelSpec::RmsNorm { eps_bits, .. } => {
                let cols = *out_shape.last().ok_or("rms_norm of a scalar")?;
                let rows = u32_of(numel / cols)?;
                kernels::rms_norm::launch::<F>(&self.client, CubeCount::Static(rows, 1, 1), dim, buf(0), buf(1), out_arg, u32_of(cols)?, *eps_bits);
            }
            KernelSpec::Softmax { .. } => {
                let cols = *out_shape.last().ok_or("softmax of a scalar")?;
                let rows = u32_of(numel / cols)?;
                kernels::softmax::launch::<F>(&self.client, CubeCount::Static(rows, 1, 1), dim, buf(0), out_arg, u32_of(cols)?);
            }
            KernelSpec::MatMul { .. } => {
                let (&n, [wn, k]) = (out_shape.last().ok_or("matmul of a scalar")?, inputs[1].shape()) else {
                    return Err(format!("matmul weight of shape {:?}", inputs[1].shape()));
                };
                if *wn != n {
                    return Err(format!("matmul weight {:?} for a result {out_shape:?}", inputs[1].shape()));
                }
                let m = numel / n;
                let t = kernels::TILE as usize;
                let count = CubeCount::Static(u32_of(n.div_ceil(t))?, u32_of(m.div_ceil(t))?, 1);
                kernels::matmul::launch::<F>(&self.client, count, dim, buf(0), buf(1), out_arg, u32_of(m)?, u32_of(n)?, u32_of(*k)?);
            }
        }
        let bytes = self.client.read_one_unchecked(out);
        let data: Vec<f32> = F::from_bytes(&bytes).iter().map(|&v| from(v)).collect();
        Ok(Tensor::f32(out_shape, data))
    }
}

/// The elementwise kernel's `layout` buffer: the output shape, then per input its
/// strides against the output's axes (right-aligned as numpy broadcasting; 0 along an
/// axis the input lacks or has as 1).
fn ew_layout(out_shape: &[usize], inputs: &[&Tensor], rank: usize) -> Result<Vec<u32>, String> {
    if out_shape.len() != rank {
        return Err(format!("result of rank {} for a rank-{rank} program", out_shape.len()));
    }
    let to_u32 = |n: usize| u32::try_from(n).map_err(|_| format!("size {n} exceeds u32"));
    let mut layout: Vec<u32> = out_shape.iter().map(|&d| to_u32(d)).collect::<Result<_, _>>()?;
    for t in inputs {
        let s = t.shape();
        if s.len() > rank {
            return Err(format!("input of shape {s:?} for a result {out_shape:?}"));
        }
        let pad = rank - s.len();
        let mut strides = vec![0u32; rank];
        let mut stride = 1usize;
        for d in (0..s.len()).rev() {
            if s[d] != 1 {
                if s[d] != out_shape[pad + d] {
                    return Err(format!("input of shape {s:?} does not broadcast to {out_shape:?}"));
                }
                strides[pad + d] = to_u32(stride)?;
            }
            stride *= s[d];
        }
        layout.extend(strides);
    }
    Ok(layout)
}

#[cfg(test)]
mod tests;
