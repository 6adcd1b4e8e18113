//! Runs `dsc_compiler::codegen` kernels on a wgpu device through CubeCL (feature `wgpu`).
//!
//! Every launch goes through [`dsc_compiler::codegen::launch`]: a node's [`NodeWork`]
//! (kernels, argument lists, grids as expressions of `b`, `c`, `s`) is evaluated against
//! the step's [`Bindings`] and launched as written, the same description `dsc compile`
//! prints into `plan.json`, bound in the order the launch lists its arguments to the
//! kernel `kernel_definition` builds (no per-kernel code here). Buffers live on the device
//! as [`DeviceBuf`]s; floats are held in the kernel's element type (`f32` or `f16`),
//! integers (token ids, positions, expert indices) as `i32`.

use crate::reference::Tensor;
pub use crate::repr::Repr;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::wgpu::WgpuDevice;
use dsc_compiler::codegen::launch::{Launch, NodeWork, Ptr};
use dsc_compiler::codegen::select::node_work;
use dsc_compiler::codegen::{kernel_definition, kernel_settings, Target};
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
            self.launch(l, ins, outs, &scratch, bind)?;
        }
        Ok(())
    }

    /// One launch: its arguments resolved ([`Launch::resolve`]) and bound in the kernel's
    /// parameter order, buffers (tables uploaded for the launch) as resources and `u32`s
    /// as scalars, to the kernel [`kernel_definition`] builds for this adapter: what
    /// CubeCL's generated `launch` functions do, for every kernel at once.
    fn launch(&self, l: &Launch, ins: &[DeviceBuf], outs: &[DeviceBuf], scratch: &[DeviceBuf], bind: &Bindings) -> Result<(), String> {
        l.kernel.check_target(Target::Wgsl)?;
        let [gx, gy, gz] = l.grid_at(bind)?;
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
        let r = l.resolve(ins, outs, scratch, bind)?;
        let mut launcher = KernelLauncher::new(kernel_settings(&l.kernel));
        for p in &r.ptrs {
            // A table holds a launch's sizes, strides or constants: a few words, far below
            // any limit.
            let b = match p {
                Ptr::Buf(d) => (*d).clone(),
                Ptr::U32s(v) => self.buffer_from_bytes(u32::as_bytes(v), v.len(), Repr::I32),
                Ptr::F32Bits(v) => self.buffer_from_bytes(u32::as_bytes(v), v.len(), Repr::F32),
            };
            launcher.register_buffer(arg(&b), b.repr.bytes());
        }
        for &s in &r.scalars {
            launcher.register_scalar(s);
        }
        let kernel = kernel_definition(&l.kernel, self.client.properties_shared(), self.client.target_properties_shared());
        launcher.launch(CubeCount::Static(gx, gy, gz), kernel, &self.client);
        Ok(())
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
