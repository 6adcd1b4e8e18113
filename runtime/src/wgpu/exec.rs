//! The wgpu device as a plan executor: [`crate::plan_exec`] walks the [`Plan`] that
//! `dsc compile --target wgpu` writes into `plan.json`, and the wgpu backend supplies the
//! device side ([`Device`]: buffers, uploads, one node's launches).

use super::{DeviceBuf, Repr, WgpuBackend};
use crate::plan_exec::{self, Device, DeviceWeights, PlanEngine};
use crate::reference::{Tensor, Weights};
use dsc_compiler::codegen::launch::NodeWork;
use dsc_compiler::codegen::plan::Plan;
use dsc_compiler::ir::{Bindings, DType};

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
    const NAME: &'static str = "wgpu";
    type Buf = DeviceBuf;
    fn upload(&self, t: &Tensor, dtype: DType) -> Result<DeviceBuf, String> {
        WgpuBackend::upload(self, t, Repr::of(dtype)?)
    }
    fn alloc(&self, len: usize, dtype: DType) -> Result<DeviceBuf, String> {
        self.empty(len, Repr::of(dtype)?)
    }
    fn download(&self, b: &DeviceBuf, shape: &[usize]) -> Result<Tensor, String> {
        WgpuBackend::download(self, b, shape)
    }
    fn execute(&self, work: &NodeWork, ins: &[DeviceBuf], outs: &[DeviceBuf], bind: &Bindings) -> Result<(), String> {
        WgpuBackend::execute(self, work, ins, outs, bind)
    }
    fn bytes(b: &DeviceBuf) -> usize {
        b.len * b.repr.bytes()
    }
    fn elem_bytes(dtype: DType) -> usize {
        Repr::of(dtype).map_or(4, Repr::bytes)
    }
}

/// The wgpu device as a generation and training engine ([`PlanEngine`]).
pub type WgpuEngine = PlanEngine<WgpuBackend>;

impl PlanEngine<WgpuBackend> {
    /// The default adapter (see [`WgpuBackend::new`]).
    pub fn new() -> WgpuEngine {
        WgpuEngine::on(WgpuBackend::new())
    }
}

impl Default for WgpuEngine {
    fn default() -> Self {
        WgpuEngine::new()
    }
}
