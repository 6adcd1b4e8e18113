//! The CUDA device: buffers, kernels compiled once per name, launches.

use super::abi;
use super::nvrtc;
use crate::reference::Tensor;
pub use crate::repr::Repr;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use dsc_compiler::codegen::launch::{Launch, NodeWork, Ptr, Size};
use dsc_compiler::codegen::select::node_work;
use dsc_compiler::codegen::{cube_dim, kernel_source_and_shared_bytes, KernelSpec, Target};
use dsc_compiler::ir::{Bindings, DType, Graph, NodeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A buffer on the device: `len` elements in `repr` (at least one element is
/// allocated). Clones share the memory, which is freed with the last one.
#[derive(Clone)]
pub struct DeviceBuf {
    mem: Arc<CudaSlice<u8>>,
    pub len: usize,
    pub repr: Repr,
}

#[cfg(test)]
impl DeviceBuf {
    /// The device memory (at least one element).
    pub(crate) fn mem(&self) -> &CudaSlice<u8> {
        &self.mem
    }
}

/// A kernel loaded on the device.
struct Loaded {
    func: CudaFunction,
    block: (u32, u32, u32),
    shared_bytes: u32,
}

/// Small read-only buffers (`info_st` structs and tables) kept by content: the same
/// sizes recur in every layer and step, so most launches upload nothing.
const CONST_CACHE_LIMIT: usize = 4096;

/// One CUDA device, one stream. Every copy and launch goes to that stream in order, so
/// no cross-stream synchronisation is needed (cudarc's event tracking is turned off).
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cc: (i32, i32),
    name: String,
    kernels: Mutex<HashMap<String, Arc<Loaded>>>,
    consts: Mutex<HashMap<Vec<u8>, Arc<CudaSlice<u8>>>>,
    /// Launches timed since [`CudaBackend::start_profile`], when profiling.
    profile: Mutex<Option<Vec<Timed>>>,
}

/// One launch timed with events recorded right before and after it on the stream.
struct Timed {
    kernel: String,
    bytes: usize,
    events: (cudarc::driver::CudaEvent, cudarc::driver::CudaEvent),
}

/// A profiled launch: the kernel, the bytes of every buffer it binds (each read or
/// written once: the compulsory traffic), and its time on the device.
#[derive(Debug, Clone)]
pub struct LaunchTime {
    pub kernel: String,
    pub bytes: usize,
    pub seconds: f64,
}

impl CudaBackend {
    /// Opens device `index`. A machine without the NVIDIA driver library, without a
    /// device, or without NVRTC gets an `Err` saying which, never a panic: cudarc panics
    /// when a library it loads lazily is missing, so the libraries are probed first
    /// (`cudarc::driver::sys::is_culib_present`, [`nvrtc::available`]) and the context
    /// is created under `catch_unwind` (a driver too old for a symbol cudarc looks up
    /// panics as well).
    pub fn new(index: usize) -> Result<CudaBackend, String> {
        // Safety: dlopen of the driver library; no driver function is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so.1) was not found: this machine has no NVIDIA driver".into());
        }
        nvrtc::available()?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(index))
            .map_err(|p| format!("CUDA device {index}: the driver library failed to load: {}", panic_text(&p)))?
            .map_err(|e| format!("CUDA device {index}: {e}"))?;
        let cc = ctx.compute_capability().map_err(|e| format!("CUDA device {index}: {e}"))?;
        let name = ctx.name().map_err(|e| format!("CUDA device {index}: {e}"))?;
        // Safety: one stream for everything (see the type's comment); set before any
        // buffer exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ctx,
            stream,
            cc,
            name,
            kernels: Mutex::new(HashMap::new()),
            consts: Mutex::new(HashMap::new()),
            profile: Mutex::new(None),
        })
    }

    /// The device's name (`NVIDIA H200`) and compute capability.
    pub fn device_name(&self) -> String {
        format!("{} (sm_{}{})", self.name, self.cc.0, self.cc.1)
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Times every launch from now on, until [`CudaBackend::take_profile`].
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// The launches timed since [`CudaBackend::start_profile`], in order (waits for them),
    /// and stops timing.
    pub fn take_profile(&self) -> Result<Vec<LaunchTime>, String> {
        let timed = self.profile.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        self.sync()?;
        timed
            .into_iter()
            .map(|t| {
                let ms = t.events.0.elapsed_ms(&t.events.1).map_err(|e| format!("CUDA event: {e}"))?;
                Ok(LaunchTime { kernel: t.kernel, bytes: t.bytes, seconds: ms as f64 / 1e3 })
            })
            .collect()
    }

    /// A buffer of `len` elements, each the bit pattern `word` (`repr`'s width), filled
    /// on the device (for benchmarks: no host copy of large inputs).
    pub fn filled(&self, len: usize, repr: Repr, word: u32) -> Result<DeviceBuf, String> {
        use cudarc::driver::DevicePtr;
        let b = self.empty(len, repr)?;
        let ptr = b.mem.device_ptr(&self.stream).0;
        let n = len.max(1);
        let s = self.stream.cu_stream();
        // Safety: `ptr` holds at least `n` elements of `repr`'s width.
        let r = unsafe {
            match repr.bytes() {
                2 => cudarc::driver::sys::cuMemsetD16Async(ptr, word as u16, n, s),
                _ => cudarc::driver::sys::cuMemsetD32Async(ptr, word, n, s),
            }
        };
        r.result().map_err(|e| format!("cuMemsetAsync: {e}"))?;
        Ok(b)
    }

    /// Waits for everything submitted so far; reports a kernel fault as an error.
    pub fn sync(&self) -> Result<(), String> {
        self.stream.synchronize().map_err(|e| format!("CUDA: {e}"))
    }

    fn bytes_to_device(&self, bytes: &[u8], len: usize, repr: Repr) -> Result<DeviceBuf, String> {
        // A zero-length tensor still gets one element, so every pointer is valid.
        let bytes = if bytes.is_empty() { &[0u8; 4][..] } else { bytes };
        let mem = self.stream.clone_htod(bytes).map_err(|e| format!("CUDA upload: {e}"))?;
        Ok(DeviceBuf { mem: Arc::new(mem), len, repr })
    }

    /// Copies `t` to the device in `repr` (integers must fit in `i32`).
    pub fn upload(&self, t: &Tensor, repr: Repr) -> Result<DeviceBuf, String> {
        self.bytes_to_device(&repr.encode(t)?, t.numel(), repr)
    }

    /// A buffer of `len` elements filled with NaN (floats) or `i32::MIN` (integers), so
    /// that an element no kernel writes cannot pass for a result.
    pub fn poisoned(&self, len: usize, repr: Repr) -> Result<DeviceBuf, String> {
        self.bytes_to_device(&repr.poison(len), len, repr)
    }

    /// An uninitialised buffer of `len` elements (plan execution writes every element of
    /// every buffer it allocates; the kernel tests poison theirs instead).
    pub fn empty(&self, len: usize, repr: Repr) -> Result<DeviceBuf, String> {
        // Safety: the memory is only read after a kernel wrote it (see above).
        let mem =
            unsafe { self.stream.alloc::<u8>(len.max(1) * repr.bytes()) }.map_err(|e| format!("CUDA alloc of {len} elements: {e}"))?;
        Ok(DeviceBuf { mem: Arc::new(mem), len, repr })
    }

    /// Reads `b` back as a tensor of `shape` (`f32` for floats, `i32` for integers).
    pub fn download(&self, b: &DeviceBuf, shape: &[usize]) -> Result<Tensor, String> {
        if b.len == 0 {
            return Ok(if b.repr == Repr::I32 { Tensor::i32(shape, vec![]) } else { Tensor::zeros(shape) });
        }
        // The buffer may hold more than the tensor (a cache with room): its front is read.
        let bytes = self.stream.clone_dtoh(&*b.mem).map_err(|e| format!("CUDA download: {e}"))?;
        self.sync()?;
        b.repr.decode(&bytes, shape)
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
            inputs.iter().zip(&in_tys).map(|(t, ty)| self.upload(t, Repr::of(ty.dtype)?)).collect::<Result<_, String>>()?;
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
    /// already allocated (an alias needs nothing). Asynchronous: errors a kernel raises
    /// surface at the next download or [`CudaBackend::sync`].
    pub fn execute(&self, work: &NodeWork, ins: &[DeviceBuf], outs: &[DeviceBuf], bind: &Bindings) -> Result<(), String> {
        // An append given an allocated output runs out of place (the plan executor runs
        // the in-place form itself).
        let (scratch, launches) = work.at(bind);
        let scratch: Vec<DeviceBuf> =
            scratch.iter().map(|s| self.poisoned(eval_len(&s.len, bind)?, Repr::of(s.dtype)?)).collect::<Result<_, String>>()?;
        for l in launches {
            self.launch(l, ins, outs, &scratch, bind).map_err(|e| format!("{}: {e}", l.kernel.name()))?;
        }
        Ok(())
    }

    /// The kernel `spec`, compiled and loaded on first use.
    fn kernel(&self, spec: &KernelSpec) -> Result<Arc<Loaded>, String> {
        let name = spec.name();
        if let Some(k) = self.kernels.lock().unwrap_or_else(|e| e.into_inner()).get(&name) {
            return Ok(k.clone());
        }
        let (src, shared) = kernel_source_and_shared_bytes(spec, Target::Cuda);
        // A cubin for this device's exact architecture rather than PTX: it loads on any
        // driver of NVRTC's major version, where PTX from a newer NVRTC than the driver
        // fails to JIT (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
        let image = nvrtc::compile(&src, &name, self.cc, nvrtc::Output::Cubin)?;
        let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image)).map_err(|e| format!("loading the cubin: {e}"))?;
        let func = module.load_function(&name).map_err(|e| format!("no entry point `{name}` in the module: {e}"))?;
        let shared_bytes = u32::try_from(shared).map_err(|_| format!("{shared} bytes of shared memory"))?;
        if shared_bytes > 48 * 1024 {
            // Above 48 KiB a kernel must opt in to dynamic shared memory.
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
            .map_err(|e| format!("{shared_bytes} bytes of shared memory: {e}"))?;
        }
        let d = cube_dim(spec);
        let k = Arc::new(Loaded { func, block: (d.x, d.y, d.z), shared_bytes });
        self.kernels.lock().unwrap_or_else(|e| e.into_inner()).insert(name, k.clone());
        Ok(k)
    }

    /// A read-only device copy of `bytes`, shared by every launch that needs the same.
    fn constant(&self, bytes: Vec<u8>) -> Result<Arc<CudaSlice<u8>>, String> {
        let mut c = self.consts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = c.get(&bytes) {
            return Ok(b.clone());
        }
        if c.len() >= CONST_CACHE_LIMIT {
            // Frees are stream-ordered: launches already queued keep their buffers.
            c.clear();
        }
        let padded = if bytes.is_empty() { vec![0u8; 4] } else { bytes.clone() };
        let b = Arc::new(self.stream.clone_htod(&padded).map_err(|e| format!("CUDA upload: {e}"))?);
        c.insert(bytes, b.clone());
        Ok(b)
    }

    /// One launch: pointers in the kernel's parameter order, then `info_st` (see
    /// [`abi`]); grid evaluated, block = the kernel's cube_dim.
    fn launch(&self, l: &Launch, ins: &[DeviceBuf], outs: &[DeviceBuf], scratch: &[DeviceBuf], bind: &Bindings) -> Result<(), String> {
        let [gx, gy, gz] = l.grid_at(bind)?;
        let grid = (gx, gy, gz);
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(()); // nothing to compute (an empty tensor)
        }
        if grid.0 > i32::MAX as u32 || grid.1 > 65535 || grid.2 > 65535 {
            return Err(format!("grid {grid:?} exceeds CUDA's limits (2³¹-1, 65535, 65535)"));
        }
        let k = self.kernel(&l.kernel)?;
        let r = l.resolve(ins, outs, scratch, bind)?;
        let info = abi::info(&r, |b: &DeviceBuf| b.len)?;
        let mut tables = Vec::new();
        for p in &r.ptrs {
            match p {
                Ptr::Buf(_) => {}
                Ptr::U32s(v) | Ptr::F32Bits(v) => tables.push(self.constant(v.iter().flat_map(|x| x.to_le_bytes()).collect())?),
            }
        }
        let info = self.constant(info.iter().flat_map(|x| x.to_le_bytes()).collect())?;
        let mut b = self.stream.launch_builder(&k.func);
        let mut t = tables.iter();
        for p in &r.ptrs {
            match p {
                Ptr::Buf(d) => b.arg(&*d.mem),
                Ptr::U32s(_) | Ptr::F32Bits(_) => b.arg(&**t.next().expect("one table per table pointer")),
            };
        }
        b.arg(&*info);
        let mut profile = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        if profile.is_some() {
            b.record_kernel_launch(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: k.block, shared_mem_bytes: k.shared_bytes };
        // Safety: the arguments are the kernel's parameters in order, as the generated
        // source declares them (checked against the source for every kernel in
        // `abi::tests`), each buffer at least as long as the length `info_st` gives it;
        // the kernels bound-check against those lengths.
        let events = unsafe { b.launch(cfg) }
            .map_err(|e| format!("cuLaunchKernel (grid {grid:?}, block {:?}, {} B shared): {e}", k.block, k.shared_bytes))?;
        if let (Some(p), Some(events)) = (profile.as_mut(), events) {
            let bytes =
                r.ptrs.iter().map(|p| p.len(|d: &DeviceBuf| d.len * d.repr.bytes()) * if matches!(p, Ptr::Buf(_)) { 1 } else { 4 }).sum();
            p.push(Timed { kernel: l.kernel.name(), bytes, events });
        }
        Ok(())
    }
}

fn eval_len(s: &Size, bind: &Bindings) -> Result<usize, String> {
    let v = s.eval(bind);
    usize::try_from(v).map_err(|_| format!("size {s} evaluates to {v} < 0"))
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "a panic".into())
}

impl crate::plan_exec::Device for CudaBackend {
    const NAME: &'static str = "cuda";
    type Buf = DeviceBuf;
    fn upload(&self, t: &Tensor, dtype: DType) -> Result<DeviceBuf, String> {
        CudaBackend::upload(self, t, Repr::of(dtype)?)
    }
    fn alloc(&self, len: usize, dtype: DType) -> Result<DeviceBuf, String> {
        self.empty(len, Repr::of(dtype)?)
    }
    fn download(&self, b: &DeviceBuf, shape: &[usize]) -> Result<Tensor, String> {
        CudaBackend::download(self, b, shape)
    }
    fn execute(&self, work: &NodeWork, ins: &[DeviceBuf], outs: &[DeviceBuf], bind: &Bindings) -> Result<(), String> {
        CudaBackend::execute(self, work, ins, outs, bind)
    }
    fn bytes(b: &DeviceBuf) -> usize {
        b.len * b.repr.bytes()
    }
    fn elem_bytes(dtype: DType) -> usize {
        Repr::of(dtype).map_or(4, Repr::bytes)
    }
}
