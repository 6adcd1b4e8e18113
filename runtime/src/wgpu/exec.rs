//! The wgpu device as a plan executor: [`crate::plan_exec`] walks the [`Plan`] that
//! `dsc compile --target wgpu` writes into `plan.json`, and the wgpu backend supplies the
//! device side ([`Device`]: buffers, uploads, one node's launches).

use super::{DeviceBuf, Repr, WgpuBackend};
use crate::plan_exec::{self, Device, DeviceWeights};
use crate::reference::{Tensor, Weights};
use dsc_compiler::codegen::launch::NodeWork;
use dsc_compiler::codegen::plan::Plan;
use dsc_compiler::ir::{Bindings, DType, Mode, Module};

impl WgpuBackend {
    /// Runs the plan's entry on host `args` (in the entry's argument order) with `weights`
    /// and returns its results as host tensors (`f32` for floats, `i32` for integers).
    pub fn run_plan(
        &self,
        plan: &Plan,
        args: &[Tensor],
        weights: &dyn Weights,
        cache: &DeviceWeights<DeviceBuf>,
    ) -> Result<Vec<Tensor>, String> {
        plan_exec::run_plan(self, plan, args, weights, cache)
    }

    /// An uninitialised buffer of `len` elements (plan execution writes every element of
    /// every buffer it allocates; the kernel tests poison theirs instead).
    pub fn empty(&self, len: usize, repr: Repr) -> Result<DeviceBuf, String> {
        let bytes = self.buffer_bytes(len, repr)?;
        Ok(DeviceBuf { handle: self.client.empty(bytes), len, repr })
    }
}

impl Device for WgpuBackend {
    type Buf = DeviceBuf;
    fn upload(&self, t: &Tensor, dtype: DType) -> Result<DeviceBuf, String> {
        WgpuBackend::upload(self, t, Repr::of(dtype)?)
    }
    fn alloc(&self, len: usize, dtype: DType) -> Result<DeviceBuf, String> {
        self.empty(len, Repr::of(dtype)?)
    }
    fn download(&self, b: &DeviceBuf, shape: &[usize]) -> Result<Tensor, String> {
        Ok(WgpuBackend::download(self, b, shape))
    }
    fn execute(&self, work: &NodeWork, ins: &[DeviceBuf], outs: &[DeviceBuf], bind: &Bindings) -> Result<(), String> {
        WgpuBackend::execute(self, work, ins, outs, bind)
    }
    fn bytes(b: &DeviceBuf) -> usize {
        b.len * b.repr.bytes()
    }
}

/// The wgpu device as a generation engine: each compiled entry point becomes a [`Plan`]
/// (the `plan.json` of `dsc compile --target wgpu`) and runs with [`WgpuBackend::run_plan`].
pub struct WgpuEngine {
    backend: WgpuBackend,
    weights: DeviceWeights<DeviceBuf>,
}

impl WgpuEngine {
    /// The default adapter (see [`WgpuBackend::new`]).
    pub fn new() -> WgpuEngine {
        WgpuEngine::on(WgpuBackend::new())
    }

    /// An engine on an opened device.
    pub fn on(backend: WgpuBackend) -> WgpuEngine {
        WgpuEngine { backend, weights: DeviceWeights::new() }
    }

    pub fn backend(&self) -> &WgpuBackend {
        &self.backend
    }

    /// Forgets the uploaded weights: after an optimizer step they are stale, and the next
    /// run uploads the new ones.
    pub fn forget_weights(&self) {
        self.weights.clear();
    }

    /// Bytes of weights and constants uploaded so far.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes(<WgpuBackend as Device>::bytes)
    }
}

impl Default for WgpuEngine {
    fn default() -> Self {
        WgpuEngine::new()
    }
}

impl crate::generate::Engine for WgpuEngine {
    type Prepared = Plan;
    fn name(&self) -> &str {
        "wgpu"
    }
    fn prepare(&self, module: &Module, mode: Mode) -> Result<Plan, String> {
        Plan::build(module, mode).map_err(|e| e.to_string())
    }
    fn run(&self, _: &Module, plan: &Plan, _: Mode, args: &[Tensor], weights: &dyn Weights) -> Result<Vec<Tensor>, String> {
        self.backend.run_plan(plan, args, weights, &self.weights)
    }
}
