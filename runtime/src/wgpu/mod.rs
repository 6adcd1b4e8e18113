//! Runs `dsc_compiler::codegen` kernels on a wgpu device through CubeCL (feature `wgpu`).
//!
//! Every launch goes through [`dsc_compiler::codegen::launch`]: a node's [`NodeWork`]
//! (kernels, argument lists, grids as expressions of `b`, `c`, `s`) is evaluated against
//! the step's [`Bindings`] and launched as written, the same description `dsc compile`
//! prints into `plan.json`. Buffers live on the device as [`DeviceBuf`]s; floats are held
//! in the kernel's element type (`f32` or `f16`), integers (token ids, positions, expert
//! indices) as `i32`.

use crate::reference::Tensor;
pub use crate::repr::Repr;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::wgpu::WgpuDevice;
use dsc_compiler::codegen::launch::{Arg, Buf, Launch, NodeWork};
use dsc_compiler::codegen::select::node_work;
use dsc_compiler::codegen::{cube_dim, kernels, KernelSpec};
use dsc_compiler::ir::{Bindings, Graph, NodeId};

/// A buffer on the device: `len` elements in `repr`.
#[derive(Clone)]
pub struct DeviceBuf {
    pub handle: Handle,
    pub len: usize,
    pub repr: Repr,
}

/// A wgpu device and CubeCL's client for it.
pub struct WgpuBackend {
    client: cubecl::client::Client,
}

impl Default for WgpuBackend {
    fn default() -> Self {
        WgpuBackend::new()
    }
}

impl WgpuBackend {
    /// The default wgpu adapter (a GPU when there is one, else lavapipe). Panics inside
    /// CubeCL when there is no adapter at all, which is what tests want: a machine
    /// without one must fail them, not skip them.
    pub fn new() -> WgpuBackend {
        WgpuBackend { client: cubecl::Device::Wgpu(WgpuDevice::default()).client() }
    }

    /// The adapter `which` names: `default`, `cpu` (a software adapter such as lavapipe),
    /// or `discrete`, `integrated`, `virtual`, each with an optional `:N` index. An adapter
    /// the machine lacks is an error that lists the adapters it has (CubeCL's lazy client
    /// would panic on it), so the device is set up here, fallibly, before its client.
    pub fn with_adapter(which: &str) -> Result<WgpuBackend, String> {
        use cubecl::wgpu::WgpuDeviceKind as K;
        let (kind, index) = match which.split_once(':') {
            Some((k, i)) => (k, Some(i.parse::<usize>().map_err(|_| format!("adapter `{which}`: `{i}` is not an index"))?)),
            None => (which, None),
        };
        let i = index.unwrap_or(0);
        let kind = match kind {
            "default" if index.is_none() => K::DefaultDevice,
            "cpu" if index.is_none() => K::Cpu,
            "discrete" => K::DiscreteGpu(i),
            "integrated" => K::IntegratedGpu(i),
            "virtual" => K::VirtualGpu(i),
            _ => return Err(format!("unknown adapter `{which}`; expected default, cpu, discrete[:N], integrated[:N] or virtual[:N]")),
        };
        let device = WgpuDevice::new(kind);
        match cubecl::wgpu::try_init_setup::<cubecl::wgpu::AutoGraphicsApi>(&device, Default::default()) {
            // Registration fails when an earlier call in this process set the device up.
            Ok(_) | Err(cubecl::wgpu::WgpuInitError::Registration { .. }) => {}
            Err(cubecl::wgpu::WgpuInitError::AdapterUnavailable { .. }) => {
                return Err(format!("no wgpu adapter `{which}`; this machine has {}", adapter_list()))
            }
            Err(e) => return Err(format!("wgpu adapter `{which}`: {e}")),
        }
        Ok(WgpuBackend { client: cubecl::Device::Wgpu(device).client() })
    }

    /// The largest buffer the adapter allocates, in bytes.
    fn max_buffer_bytes(&self) -> u64 {
        self.client.properties().memory.max_page_size
    }

    /// `len` elements in `repr` as a byte count, or why the adapter cannot hold them.
    fn buffer_bytes(&self, len: usize, repr: Repr) -> Result<usize, String> {
        if repr == Repr::Bf16 {
            return Err("the wgpu backend has no bf16 buffers (WGSL has no bf16 type): run a bf16 model with `--backend cuda` or `--backend reference`, or declare the spec's dtype f16 or f32".into());
        }
        let bytes = len.max(1).checked_mul(repr.bytes()).ok_or_else(|| format!("a buffer of {len} elements overflows"))?;
        let max = self.max_buffer_bytes();
        if bytes as u64 > max {
            return Err(format!(
                "a buffer of {len} {repr:?} elements ({bytes} bytes) is larger than the {max} bytes adapter `{}` allocates at once",
                self.adapter_name()
            ));
        }
        Ok(bytes)
    }

    /// Waits until every launch submitted so far has finished (for timing).
    pub fn sync(&self) {
        let _ = cubecl::future::block_on(self.client.sync());
    }

    /// The adapter's name as the driver reports it (`llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub fn adapter_name(&self) -> String {
        self.client.properties().identity.name.clone()
    }

    /// Copies `t` to the device in `repr` (integers must fit in `i32`).
    pub fn upload(&self, t: &Tensor, repr: Repr) -> Result<DeviceBuf, String> {
        let len = t.numel();
        // Before the host copy: a tensor the adapter cannot hold is not converted first.
        self.buffer_bytes(len, repr)?;
        Ok(self.buffer_from_bytes(&repr.encode(t)?, len, repr))
    }

    /// A buffer holding `bytes`; the caller has checked the size against the adapter's
    /// limit ([`WgpuBackend::buffer_bytes`]) before making them.
    fn buffer_from_bytes(&self, bytes: &[u8], len: usize, repr: Repr) -> DeviceBuf {
        // wgpu refuses empty buffers; a zero-length tensor still gets one element.
        let handle = if bytes.is_empty() { self.client.create_from_slice(&[0u8; 4]) } else { self.client.create_from_slice(bytes) };
        DeviceBuf { handle, len, repr }
    }

    /// A buffer of `len` elements filled with NaN (floats) or `i32::MIN` (integers), so
    /// that an element no kernel writes cannot pass for a result.
    pub fn poisoned(&self, len: usize, repr: Repr) -> Result<DeviceBuf, String> {
        self.buffer_bytes(len, repr)?;
        Ok(self.buffer_from_bytes(&repr.poison(len), len, repr))
    }

    /// Reads the first `shape`'s worth of `b` back as a tensor (`f32` for floats, `i32`
    /// for integers); the buffer may hold more (a cache with room).
    pub fn download(&self, b: &DeviceBuf, shape: &[usize]) -> Result<Tensor, String> {
        if b.len == 0 {
            return Ok(if b.repr == Repr::I32 { Tensor::i32(shape, vec![]) } else { Tensor::zeros(shape) });
        }
        b.repr.decode(&self.client.read_one_unchecked(b.handle.clone()), shape)
    }

    /// Runs node `n` of `g` on host tensors (its inputs in slot order) with the run-time
    /// sizes `bind`, and returns its outputs. Outputs are poisoned first.
    pub fn run_node(&self, g: &Graph, n: NodeId, inputs: &[&Tensor], bind: &Bindings) -> Result<Vec<Tensor>, String> {
        let work = node_work(g, n).map_err(|u| u.to_string())?;
        let in_tys: Vec<_> = g.inputs(n).iter().map(|&v| g.ty(v).clone()).collect();
        if in_tys.len() != inputs.len() {
            return Err(format!("{} inputs for a node taking {}", inputs.len(), in_tys.len()));
        }
        let ins: Vec<DeviceBuf> =
            inputs.iter().zip(&in_tys).map(|(t, ty)| self.upload(t, Repr::of(ty.dtype)?)).collect::<Result<_, _>>()?;
        let outs_ty = &g.node(n).outputs;
        let shapes: Vec<Vec<usize>> = outs_ty.iter().map(|t| t.shape.eval(bind).into_iter().map(|d| d as usize).collect()).collect();
        let outs: Vec<DeviceBuf> = match &work {
            NodeWork::Alias(i) => vec![ins[*i as usize].clone()],
            NodeWork::Launches { .. } | NodeWork::Append { .. } => outs_ty
                .iter()
                .zip(&shapes)
                .map(|(t, s)| self.poisoned(s.iter().product(), Repr::of(t.dtype)?))
                .collect::<Result<_, String>>()?,
        };
        self.execute(&work, &ins, &outs, bind)?;
        outs.iter().zip(&shapes).map(|(b, s)| self.download(b, s)).collect()
    }

    /// Runs a node's launches on device buffers: `ins` and `outs` in slot order, outputs
    /// already allocated (an alias needs nothing).
    pub fn execute(&self, work: &NodeWork, ins: &[DeviceBuf], outs: &[DeviceBuf], bind: &Bindings) -> Result<(), String> {
        // An append given an allocated output runs out of place (the plan executor runs
        // the in-place form itself).
        let (scratch, launches) = work.at(bind);
        let scratch: Vec<DeviceBuf> =
            scratch.iter().map(|s| self.poisoned(eval_len(&s.len, bind)?, Repr::of(s.dtype)?)).collect::<Result<_, String>>()?;
        for l in launches {
            let bufs = Bound { ins, outs, scratch: &scratch };
            match l.kernel.elem() {
                dsc_compiler::codegen::Elem::F32 => self.launch::<f32>(l, &bufs, bind)?,
                dsc_compiler::codegen::Elem::F16 => self.launch::<half::f16>(l, &bufs, bind)?,
                e @ dsc_compiler::codegen::Elem::Bf16 => return e.on(dsc_compiler::codegen::Target::Wgsl),
            }
        }
        Ok(())
    }

    /// One launch, its arguments resolved: buffers by slot, sizes evaluated, tables
    /// uploaded. Each arm passes the arguments in the kernel's parameter order.
    fn launch<F: Float + CubeElement>(&self, l: &Launch, bufs: &Bound, bind: &Bindings) -> Result<(), String> {
        let a = Args { l, bufs, bind, backend: self };
        let [gx, gy, gz] = [0, 1, 2].map(|i| eval_len(&l.grid[i], bind).and_then(u32_of));
        let (gx, gy, gz) = (gx?, gy?, gz?);
        if gx == 0 || gy == 0 || gz == 0 {
            return Ok(()); // nothing to compute (an empty tensor)
        }
        let (mx, my, mz) = self.client.properties().hardware.max_cube_count;
        if gx > mx || gy > my || gz > mz {
            return Err(format!(
                "{}: a grid of {gx}×{gy}×{gz} cubes is more than adapter `{}` launches ({mx}×{my}×{mz})",
                l.kernel.name(),
                self.adapter_name()
            ));
        }
        let count = CubeCount::Static(gx, gy, gz);
        let dim = cube_dim(&l.kernel);
        let c = &self.client;
        match &l.kernel {
            KernelSpec::Elementwise { program, .. } => {
                let mut seq = SequenceArg::<Box<[F]>>::new();
                for b in bufs.ins {
                    seq.push(arg(b));
                }
                kernels::fused_ew::launch::<F, F>(c, count, dim, seq, a.table(1)?, a.buf(2)?, program.clone())
            }
            KernelSpec::ElementwiseI32 { program, .. } => {
                let mut seq = SequenceArg::<Box<[i32]>>::new();
                for b in bufs.ins {
                    seq.push(arg(b));
                }
                kernels::fused_ew::launch::<F, i32>(c, count, dim, seq, a.table(1)?, a.buf(2)?, program.clone())
            }
            KernelSpec::Reduce { mean, .. } => {
                kernels::reduce::reduce_axis::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.u32(2)?, a.u32(3)?, *mean)
            }
            KernelSpec::MoeGrad { part, weights, .. } => {
                use kernels::moe_grad::{self as mg, MoeGradPart as P};
                match part {
                    P::Proj => {
                        let (x, dy, rows, re, gate, up, down) =
                            (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?, a.buf(6)?);
                        let (g, u, da) = (a.buf(7)?, a.buf(8)?, a.buf(9)?);
                        mg::moe_grad_proj::launch::<F>(
                            c,
                            count,
                            dim,
                            x,
                            dy,
                            rows,
                            re,
                            gate,
                            up,
                            down,
                            g,
                            u,
                            da,
                            a.u32(10)?,
                            a.u32(11)?,
                            a.u32(12)?,
                        )
                    }
                    P::Mid => {
                        let (w, rows, g, u, da, dw) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?);
                        let inter = a.u32(6)?;
                        match weights {
                            dsc_compiler::codegen::Elem::F32 => {
                                mg::moe_grad_mid::launch::<F, f32>(c, count, dim, w, rows, g, u, da, dw, inter)
                            }
                            dsc_compiler::codegen::Elem::F16 => {
                                mg::moe_grad_mid::launch::<F, half::f16>(c, count, dim, w, rows, g, u, da, dw, inter)
                            }
                            e @ dsc_compiler::codegen::Elem::Bf16 => return e.on(dsc_compiler::codegen::Target::Wgsl),
                        }
                    }
                    P::DxRows => {
                        let (re, dg, du, gate, up, dxr) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?);
                        mg::moe_grad_dx_rows::launch::<F>(c, count, dim, re, dg, du, gate, up, dxr, a.u32(6)?, a.u32(7)?)
                    }
                    P::Dx => mg::moe_grad_dx::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.u32(3)?, a.u32(4)?),
                    P::Weights => {
                        let (x, dy, rows, off, aa, dg, du) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?, a.buf(6)?);
                        let (dgate, dup, ddown) = (a.buf(7)?, a.buf(8)?, a.buf(9)?);
                        mg::moe_grad_weights::launch::<F>(
                            c,
                            count,
                            dim,
                            x,
                            dy,
                            rows,
                            off,
                            aa,
                            dg,
                            du,
                            dgate,
                            dup,
                            ddown,
                            a.u32(10)?,
                            a.u32(11)?,
                            a.u32(12)?,
                        )
                    }
                }
            }
            KernelSpec::MoeRouteGrad { cfg, .. } => {
                kernels::grad::moe_route_grad::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, *cfg)
            }
            KernelSpec::IotaI32 => kernels::reduce::iota::launch::<i32>(c, count, dim, a.buf(0)?, a.u32(1)?),
            KernelSpec::AdamW { .. } => {
                kernels::optim::adamw::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.f32_table(4)?, a.u32(5)?)
            }
            KernelSpec::SampleRows { greedy, .. } => {
                let (x, consts, params, tokens, stats) = (a.buf(0)?, a.f32_table(1)?, a.table(2)?, a.buf(3)?, a.buf(4)?);
                kernels::sample::sample_rows::launch::<F>(c, count, dim, x, consts, params, tokens, stats, a.u32(5)?, *greedy)
            }
            KernelSpec::SumSquares { .. } => kernels::optim::sum_squares::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.u32(2)?),
            KernelSpec::RmsNorm { eps_bits, .. } => {
                kernels::rms_norm::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.u32(3)?, *eps_bits)
            }
            KernelSpec::Softmax { .. } => kernels::softmax::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.u32(2)?),
            KernelSpec::Copy { rank, .. } => {
                kernels::movement::strided_copy::launch::<F>(c, count, dim, a.buf(0)?, a.table(1)?, a.buf(2)?, *rank)
            }
            KernelSpec::CopyI32 { rank } => {
                kernels::movement::strided_copy::launch::<i32>(c, count, dim, a.buf(0)?, a.table(1)?, a.buf(2)?, *rank)
            }
            KernelSpec::NegI32 => kernels::movement::neg_i32::launch(c, count, dim, a.buf(0)?, a.buf(1)?),
            KernelSpec::RmsNormGrad { eps_bits, gain: false, .. } => {
                let (x, g, dy, dx, r) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?);
                kernels::grad::rms_norm_grad_rows::launch::<F>(c, count, dim, x, g, dy, dx, r, a.u32(5)?, *eps_bits)
            }
            KernelSpec::RmsNormGrad { gain: true, .. } => {
                let (x, dy, r, dg) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?);
                kernels::grad::rms_norm_grad_gain::launch::<F>(c, count, dim, x, dy, r, dg, a.u32(4)?)
            }
            KernelSpec::AttentionGrad { cfg, part, .. } => {
                use kernels::attention_grad::{self as ag, AttnGradPart};
                match part {
                    AttnGradPart::Delta => ag::attn_grad_delta::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.u32(3)?),
                    AttnGradPart::Dq => {
                        let (q, k, v, mask, lse, delta, dout, dq) =
                            (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?, a.buf(6)?, a.buf(7)?);
                        ag::attn_grad_dq::launch::<F>(
                            c,
                            count,
                            dim,
                            q,
                            k,
                            v,
                            mask,
                            lse,
                            delta,
                            dout,
                            dq,
                            a.u32(8)?,
                            a.u32(9)?,
                            a.u32(10)?,
                            *cfg,
                        )
                    }
                    AttnGradPart::Dkv => {
                        let (q, k, v, mask, lse, delta, dout) =
                            (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?, a.buf(6)?);
                        let (dk, dv) = (a.buf(7)?, a.buf(8)?);
                        let (sq, sk, kvh) = (a.u32(9)?, a.u32(10)?, a.u32(11)?);
                        ag::attn_grad_dkv::launch::<F>(c, count, dim, q, k, v, mask, lse, delta, dout, dk, dv, sq, sk, kvh, *cfg)
                    }
                }
            }
            KernelSpec::SwiGluGradEw { .. } => {
                let (g, u, da, x, dg, du) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?);
                kernels::grad::swiglu_grad_ew::launch::<F>(c, count, dim, g, u, da, x, dg, du)
            }
            KernelSpec::ScatterLinks => kernels::grad::scatter_links::launch(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.u32(3)?),
            KernelSpec::ScatterRows { .. } => {
                let (src, idx, next, first, out) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?);
                kernels::grad::scatter_rows::launch::<F>(c, count, dim, src, idx, next, first, out, a.u32(5)?, a.u32(6)?, a.u32(7)?)
            }
            // The element types are the spec's (`F` is the output's).
            KernelSpec::Cast { from, to } => {
                use dsc_compiler::codegen::Elem::{F16, F32};
                match (from, to) {
                    (F32, F16) => kernels::movement::convert::launch::<f32, half::f16>(c, count, dim, a.buf(0)?, a.buf(1)?),
                    (F16, F32) => kernels::movement::convert::launch::<half::f16, f32>(c, count, dim, a.buf(0)?, a.buf(1)?),
                    _ => kernels::movement::convert::launch::<F, F>(c, count, dim, a.buf(0)?, a.buf(1)?),
                }
            }
            KernelSpec::Gather { .. } => {
                kernels::movement::gather::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.u32(3)?, a.u32(4)?, a.u32(5)?)
            }
            KernelSpec::Rope { interleaved, .. } => {
                let (x, pos, freqs, out) = (a.buf(0)?, a.buf(1)?, a.f32_table(2)?, a.buf(3)?);
                kernels::rope::rope::launch::<F>(c, count, dim, x, pos, freqs, out, a.u32(4)?, a.u32(5)?, a.u32(6)?, *interleaved)
            }
            KernelSpec::MatMulEw { epilogue, skinny, .. } => {
                let (x, w, layout, out) = (a.buf(0)?, a.buf(1)?, a.table(2)?, a.buf(3)?);
                let (m, n, k) = (a.u32(4)?, a.u32(5)?, a.u32(6)?);
                kernels::heads::matmul_ew::launch::<F, F>(c, count, dim, x, w, layout, out, m, n, k, a.seq(7)?, epilogue.clone(), *skinny)
            }
            KernelSpec::MatMulEwFrom { head, epilogue, skinny, .. } => {
                let (x, w, layout, out) = (a.buf(0)?, a.buf(1)?, a.table(2)?, a.buf(3)?);
                let (m, n, k, e) = (a.u32(4)?, a.u32(5)?, a.u32(6)?, epilogue.clone());
                match head {
                    dsc_compiler::codegen::Elem::F32 => {
                        kernels::heads::matmul_ew::launch::<F, f32>(c, count, dim, x, w, layout, out, m, n, k, a.seq(7)?, e, *skinny)
                    }
                    dsc_compiler::codegen::Elem::F16 => {
                        kernels::heads::matmul_ew::launch::<F, half::f16>(c, count, dim, x, w, layout, out, m, n, k, a.seq(7)?, e, *skinny)
                    }
                    h @ dsc_compiler::codegen::Elem::Bf16 => return h.on(dsc_compiler::codegen::Target::Wgsl),
                }
            }
            KernelSpec::RmsNormEw { eps_bits, epilogue, .. } => {
                let (x, gain, layout, out) = (a.buf(0)?, a.buf(1)?, a.table(2)?, a.buf(3)?);
                kernels::heads::rms_norm_ew::launch::<F>(
                    c,
                    count,
                    dim,
                    x,
                    gain,
                    layout,
                    out,
                    a.u32(4)?,
                    a.seq(5)?,
                    *eps_bits,
                    epilogue.clone(),
                )
            }
            KernelSpec::GateUp { skinny, .. } => {
                let (x, gate, up, out) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?);
                kernels::heads::matmul_gate_up::launch::<F>(c, count, dim, x, gate, up, out, a.u32(4)?, a.u32(5)?, a.u32(6)?, *skinny)
            }
            KernelSpec::MatMul { skinny, .. } => {
                kernels::matmul::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.u32(3)?, a.u32(4)?, a.u32(5)?, *skinny)
            }
            KernelSpec::Attention { cfg, .. } => {
                let (q, k, k2, v, mask) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?);
                let (out, lse, part, consts, kv) = (a.buf(5)?, a.buf(6)?, a.buf(7)?, a.f32_table(8)?, a.table(9)?);
                let (sq, sk, kvh, splits) = (a.u32(10)?, a.u32(11)?, a.u32(12)?, a.u32(13)?);
                kernels::attention::attention::launch::<F>(
                    c, count, dim, q, k, k2, v, mask, out, lse, part, consts, kv, sq, sk, kvh, splits, *cfg,
                )
            }
            KernelSpec::AttentionCombine { .. } => {
                let (part, out, consts) = (a.buf(0)?, a.buf(1)?, a.f32_table(2)?);
                kernels::attention::attention_combine::launch::<F>(c, count, dim, part, out, consts, a.u32(3)?, a.u32(4)?, a.u32(5)?)
            }
            KernelSpec::BatchMatMul { rank, accumulate, .. } => {
                let (x, y, out, t) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.table(3)?);
                kernels::attention::batch_matmul::launch::<F>(
                    c,
                    count,
                    dim,
                    x,
                    y,
                    out,
                    t,
                    a.u32(4)?,
                    a.u32(5)?,
                    a.u32(6)?,
                    *rank,
                    *accumulate,
                )
            }
            KernelSpec::MoeRoute { cfg, .. } => {
                let mut seq = SequenceArg::<Box<[F]>>::new();
                for b in bufs.ins {
                    seq.push(arg(b));
                }
                kernels::moe::moe_route::launch::<F>(c, count, dim, seq, a.buf(1)?, a.buf(2)?, *cfg)
            }
            KernelSpec::TopK { .. } => {
                kernels::moe::top_k::launch::<F>(c, count, dim, a.buf(0)?, a.buf(1)?, a.buf(2)?, a.u32(3)?, a.u32(4)?)
            }
            KernelSpec::MoeDispatch => {
                let (ids, rows, row_expert, pos, offsets) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?);
                kernels::moe::moe_dispatch::launch(c, count, dim, ids, rows, row_expert, pos, offsets, a.u32(5)?)
            }
            KernelSpec::MoeGateUp { .. } => {
                let (x, rows, row_expert, offsets, gate, up, act) =
                    (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?, a.buf(5)?, a.buf(6)?);
                let (pairs, k, h, i) = (a.u32(7)?, a.u32(8)?, a.u32(9)?, a.u32(10)?);
                kernels::moe::moe_gate_up::launch::<F>(c, count, dim, x, rows, row_expert, offsets, gate, up, act, pairs, k, h, i)
            }
            KernelSpec::MoeDown { .. } => {
                let (act, row_expert, offsets, down, y) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.buf(4)?);
                kernels::moe::moe_down::launch::<F>(c, count, dim, act, row_expert, offsets, down, y, a.u32(5)?, a.u32(6)?, a.u32(7)?)
            }
            KernelSpec::Label { kind, has_ignore, .. } => {
                use kernels::loss::{self, LabelKernel};
                let (h, x, y) = (*has_ignore, a.buf(0)?, a.buf(1)?);
                match kind {
                    LabelKernel::LogProb => {
                        loss::label_logprob::launch::<F>(c, count, dim, x, y, a.f32_table(2)?, a.buf(3)?, a.u32(4)?, a.u32(5)?, h)
                    }
                    LabelKernel::Mean => loss::label_mean::launch(c, count, dim, x, y, a.buf(2)?, a.u32(3)?, a.u32(4)?, h),
                    LabelKernel::Coef => loss::label_coef::launch(c, count, dim, x, y, a.buf(2)?, a.u32(3)?, a.u32(4)?, h),
                    LabelKernel::Grad { per_row } => loss::label_grad::launch::<F>(
                        c,
                        count,
                        dim,
                        x,
                        y,
                        a.buf(2)?,
                        a.f32_table(3)?,
                        a.buf(4)?,
                        a.u32(5)?,
                        a.u32(6)?,
                        h,
                        *per_row,
                    ),
                }
            }
            KernelSpec::MoeCombine { weights, .. } => {
                let (y, pos, w, out, h, k) = (a.buf(0)?, a.buf(1)?, a.buf(2)?, a.buf(3)?, a.u32(4)?, a.u32(5)?);
                match weights {
                    dsc_compiler::codegen::Elem::F32 => kernels::moe::moe_combine::launch::<F, f32>(c, count, dim, y, pos, w, out, h, k),
                    dsc_compiler::codegen::Elem::F16 => {
                        kernels::moe::moe_combine::launch::<F, half::f16>(c, count, dim, y, pos, w, out, h, k)
                    }
                    e @ dsc_compiler::codegen::Elem::Bf16 => return e.on(dsc_compiler::codegen::Target::Wgsl),
                }
            }
        }
        Ok(())
    }
}

/// The buffers a launch can name.
struct Bound<'a> {
    ins: &'a [DeviceBuf],
    outs: &'a [DeviceBuf],
    scratch: &'a [DeviceBuf],
}

/// A launch's arguments, resolved by position.
struct Args<'a> {
    l: &'a Launch,
    bufs: &'a Bound<'a>,
    bind: &'a Bindings,
    backend: &'a WgpuBackend,
}

impl Args<'_> {
    fn get(&self, i: usize) -> Result<&Arg, String> {
        self.l.args.get(i).ok_or_else(|| format!("{}: no argument {i}", self.l.kernel.name()))
    }
    /// Argument `i`, a buffer. The kernel's parameter type decides the element type; the
    /// runtime only checks the length.
    fn buf(&self, i: usize) -> Result<BufferArg, String> {
        let Arg::Buf(b) = self.get(i)? else {
            return Err(format!("{}: argument {i} is not a buffer", self.l.kernel.name()));
        };
        let d = match *b {
            Buf::Input(k) => self.bufs.ins.get(k as usize),
            Buf::Output(k) => self.bufs.outs.get(k as usize),
            Buf::Scratch(k) => self.bufs.scratch.get(k as usize),
        };
        d.map(arg).ok_or_else(|| format!("{}: argument {i} names a missing buffer {b:?}", self.l.kernel.name()))
    }
    fn u32(&self, i: usize) -> Result<u32, String> {
        let Arg::U32(s) = self.get(i)? else {
            return Err(format!("{}: argument {i} is not a scalar", self.l.kernel.name()));
        };
        u32_of(eval_len(s, self.bind)?)
    }
    fn table(&self, i: usize) -> Result<BufferArg, String> {
        let Arg::Table(t) = self.get(i)? else {
            return Err(format!("{}: argument {i} is not a table", self.l.kernel.name()));
        };
        let v: Vec<u32> = t.iter().map(|s| eval_len(s, self.bind).and_then(u32_of)).collect::<Result<_, _>>()?;
        // A table holds a launch's sizes and strides: a few words, far below any limit.
        let b = self.backend.buffer_from_bytes(u32::as_bytes(&v), v.len(), Repr::I32);
        Ok(arg(&b))
    }
    /// Argument `i`, an [`Arg::F32Table`] uploaded as an `f32` buffer.
    fn f32_table(&self, i: usize) -> Result<BufferArg, String> {
        let Arg::F32Table(t) = self.get(i)? else {
            return Err(format!("{}: argument {i} is not an f32 table", self.l.kernel.name()));
        };
        let b = self.backend.buffer_from_bytes(u32::as_bytes(t), t.len(), Repr::F32);
        Ok(arg(&b))
    }
    /// Arguments `from..`, buffers, as one `Sequence` argument (the extra inputs a fused
    /// kernel's epilogue reads).
    fn seq<F: Float>(&self, from: usize) -> Result<SequenceArg<Box<[F]>>, String> {
        let mut seq = SequenceArg::<Box<[F]>>::new();
        for i in from..self.l.args.len() {
            seq.push(self.buf(i)?);
        }
        Ok(seq)
    }
}

fn arg(b: &DeviceBuf) -> BufferArg {
    // Safety: `len` is the element count the buffer was created with (at least one
    // element is always allocated), and kernels bound-check against it.
    unsafe { BufferArg::from_raw_parts(b.handle.clone(), b.len.max(1)) }
}

/// The adapters this machine has, as `name (kind, API)`, for an error message.
fn adapter_list() -> String {
    use cubecl::wgpu::wgpu;
    // The primary APIs (Vulkan, Metal, DX12): probing OpenGL as well wakes EGL, which
    // prints its own complaints about the display.
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let found: Vec<String> = cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
        .iter()
        .map(|a| {
            let i = a.get_info();
            let kind = match i.device_type {
                wgpu::DeviceType::DiscreteGpu => "discrete",
                wgpu::DeviceType::IntegratedGpu => "integrated",
                wgpu::DeviceType::VirtualGpu => "virtual",
                wgpu::DeviceType::Cpu => "cpu",
                wgpu::DeviceType::Other => "other",
            };
            format!("`{}` ({kind}, {:?})", i.name, i.backend)
        })
        .collect();
    if found.is_empty() {
        "no adapter at all (is a Vulkan driver installed? Mesa's lavapipe: `apt-get install mesa-vulkan-drivers`)".into()
    } else {
        format!("{}: {}", found.len(), found.join(", "))
    }
}

fn eval_len(s: &dsc_compiler::codegen::launch::Size, bind: &Bindings) -> Result<usize, String> {
    let v = s.eval(bind);
    usize::try_from(v).map_err(|_| format!("size {s} evaluates to {v} < 0"))
}

fn u32_of(n: usize) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("size {n} exceeds u32"))
}

pub mod exec;

#[cfg(test)]
mod test_data;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_attention;
#[cfg(test)]
mod tests_moe;
#[cfg(test)]
mod tests_movement;
#[cfg(test)]
mod tests_sample;

/// The engine the sampling tests run on (`cuda/tests.rs` has its own).
#[cfg(test)]
fn test_engine() -> exec::WgpuEngine {
    exec::WgpuEngine::new()
}
#[cfg(test)]
mod tests_train;

/// The adapter's limits, checked before CubeCL would panic on them. (Here, not in
/// `tests.rs`, which the CUDA backend compiles too.)
#[cfg(test)]
mod limits {
    use super::{Repr, WgpuBackend};

    /// A buffer larger than the adapter allocates at once is an error that says so, before
    /// anything is allocated (CubeCL panicked with "can't allocate buffer").
    #[test]
    fn oversized_buffers_are_errors() {
        let dev = WgpuBackend::new();
        let max = dev.max_buffer_bytes() as usize;
        let err = dev.empty(max / 4 + 1, Repr::F32).err().expect("too large");
        assert!(err.contains("is larger than the") && err.contains("allocates at once"), "{err}");
        assert!(dev.empty(usize::MAX / 2, Repr::F32).is_err());
    }

    /// WGSL has no bf16: a bf16 buffer is an error that says what to do instead.
    #[test]
    fn bf16_buffers_are_refused() {
        let dev = WgpuBackend::new();
        let err = dev.empty(4, Repr::Bf16).err().expect("no bf16 on wgpu");
        assert!(err.contains("no bf16") && err.contains("--backend cuda"), "{err}");
        let t = crate::reference::Tensor::f32(&[2], vec![1.0, 2.0]);
        assert!(dev.upload(&t, Repr::Bf16).is_err());
    }
}
