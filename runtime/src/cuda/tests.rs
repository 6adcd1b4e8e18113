//! The CUDA backend's tests (feature `cuda`).
//!
//! * NVRTC compiles every kernel the tiny specs use, to PTX and to a cubin, without a
//!   GPU. Without libnvrtc (or without the CUDA headers, for the f16 kernels) the test
//!   says so and passes, unless `DSC_REQUIRE_NVRTC=1`, which makes it fail.
//! * Opening a device never panics: without a driver or device it is an `Err`.
//! * The wgpu kernel suites (`wgpu/tests*.rs`, every kernel against the reference
//!   interpreter) compiled a second time against the CUDA device: in those files
//!   `super::WgpuBackend` is the shim below. Like on wgpu there is no skip: without a
//!   device they fail. Whole-model parity on CUDA is `tests/tests/hf_parity.rs`
//!   (`*_on_cuda`, feature `cuda` of dsc-tests).

use super::abi::tests::{compiled, launches};
use super::{nvrtc, CudaBackend};
use crate::reference::Tensor;
use dsc_compiler::codegen::{kernel_source, KernelSpec, Target};
use dsc_compiler::ir::{Bindings, Graph, Mode, NodeId};
use std::collections::BTreeMap;

/// Every kernel of the tiny specs' prefill and decode modules (both MLA forms) and of
/// their train modules (the nodes that have kernels so far): what
/// `dsc compile specs/tiny/*.dsc --target cuda` writes, and the launches of nodes whose
/// kernels come from `node_work` only (expert FFNs).
fn every_kernel() -> BTreeMap<String, KernelSpec> {
    let mut out: BTreeMap<String, KernelSpec> = launches().into_iter().map(|(_, l, ..)| (l.kernel.name(), l.kernel)).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny");
    for e in std::fs::read_dir(&dir).unwrap() {
        let file = e.unwrap().path();
        if file.extension().is_some_and(|x| x == "dsc") {
            use dsc_compiler::passes::mla_absorb::MlaMode;
            for mode in [Mode::Prefill, Mode::Decode, Mode::Train] {
                // Training keeps MLA decompressed.
                let forms: &[MlaMode] = if mode == Mode::Train { &[MlaMode::Decompress] } else { &[MlaMode::Absorb, MlaMode::Decompress] };
                for &mla in forms {
                    out.extend(crate::cli::compile::collect_kernels(&compiled(&file, mode, mla), dsc_compiler::codegen::Target::Cuda).0);
                }
            }
        }
    }
    out
}

#[test]
fn nvrtc_compiles_every_kernel() {
    if let Err(e) = nvrtc::available() {
        assert!(std::env::var("DSC_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "DSC_REQUIRE_NVRTC=1: {e}");
        eprintln!("SKIPPED nvrtc_compiles_every_kernel: {e}");
        return;
    }
    let v = nvrtc::version().unwrap();
    let mut kernels = every_kernel();
    // The optimizer's and the sampler's kernels belong to no IR node (`train::device` and
    // the engine launch them).
    use dsc_compiler::codegen::Elem as E;
    for k in [
        KernelSpec::AdamW { grad: E::F32 },
        KernelSpec::SumSquares { elem: E::F32 },
        KernelSpec::SampleRows { elem: E::F32, greedy: true },
        KernelSpec::SampleRows { elem: E::F32, greedy: false },
    ] {
        kernels.insert(k.name(), k);
    }
    // The tiny specs are f32; the f16 forms of the plain kernels as well, which include
    // cuda_fp16.h and so need the CUDA headers.
    use dsc_compiler::codegen::Elem;
    let f16 = if nvrtc::include_dir().is_some() {
        vec![
            KernelSpec::MatMul { elem: Elem::F16, skinny: true },
            KernelSpec::Softmax { elem: Elem::F16 },
            KernelSpec::RmsNorm { elem: Elem::F16, eps_bits: 1e-6f32.to_bits() },
            // A bf16 train graph's optimizer (f32 masters, bf16 gradients and copies).
            KernelSpec::AdamW { grad: Elem::Bf16 },
            KernelSpec::SumSquares { elem: Elem::Bf16 },
            KernelSpec::Cast { from: Elem::F32, to: Elem::Bf16 },
        ]
    } else {
        let e = "no cuda_fp16.h (set DSC_CUDA_INCLUDE or CUDA_PATH): f16 kernels not compiled";
        assert!(std::env::var("DSC_REQUIRE_NVRTC").map_or(true, |v| v != "1"), "DSC_REQUIRE_NVRTC=1: {e}");
        eprintln!("SKIPPED in nvrtc_compiles_every_kernel: {e}");
        vec![]
    };
    for k in f16 {
        kernels.insert(k.name(), k);
    }
    let t = std::time::Instant::now();
    for (name, k) in &kernels {
        let src = kernel_source(k, Target::Cuda);
        for cc in [(8, 0), (9, 0)] {
            let ptx = nvrtc::compile(&src, name, cc, nvrtc::Output::Ptx).unwrap_or_else(|e| panic!("{e}"));
            let ptx = String::from_utf8_lossy(&ptx);
            assert!(ptx.contains(&format!(".entry {name}(")), "{name}: no entry point in the PTX");
            assert!(ptx.contains(&format!(".target sm_{}{}", cc.0, cc.1)), "{name}: PTX for another target");
        }
        let cubin = nvrtc::compile(&src, name, (9, 0), nvrtc::Output::Cubin).unwrap_or_else(|e| panic!("{e}"));
        assert!(cubin.starts_with(b"\x7fELF"), "{name}: the cubin is not an ELF image");
    }
    eprintln!("NVRTC {}.{} compiled {} kernels (PTX sm_80 and sm_90, cubin sm_90) in {:.1?}", v.0, v.1, kernels.len(), t.elapsed());
    assert!(kernels.len() >= 5, "only {} kernels", kernels.len());
}

#[test]
fn opening_a_device_never_panics() {
    // A device index no machine has is an error everywhere, with or without a GPU.
    let e = CudaBackend::new(4096).err().expect("device 4096 opened");
    assert!(e.contains("CUDA") || e.contains("NVRTC"), "{e}");
    match CudaBackend::new(0) {
        Ok(b) => eprintln!("device 0: {}", b.device_name()),
        Err(e) => eprintln!("no CUDA device here: {e}"),
    }
}

/// The wgpu suites' view of a backend, on the CUDA device.
struct WgpuBackend(CudaBackend);

impl WgpuBackend {
    /// Device 0; panics without one, so the suites fail rather than skip.
    fn new() -> WgpuBackend {
        WgpuBackend(CudaBackend::new(0).unwrap_or_else(|e| panic!("the CUDA kernel tests need a device: {e}")))
    }

    fn run_node(&self, g: &Graph, n: NodeId, inputs: &[&Tensor], bind: &Bindings) -> Result<Vec<Tensor>, String> {
        self.0.run_node(g, n, inputs, bind)
    }

    fn run_plan(
        &self,
        plan: &dsc_compiler::codegen::plan::Plan,
        args: &[Tensor],
        weights: &dyn crate::reference::Weights,
        cache: &crate::plan_exec::DeviceWeights<super::DeviceBuf>,
    ) -> Result<Vec<Tensor>, String> {
        self.0.run_plan(plan, args, weights, cache)
    }
}

#[path = "../wgpu/tests.rs"]
#[allow(clippy::duplicate_mod)] // the wgpu suite, run a second time on CUDA
mod kernels;
#[path = "../wgpu/tests_attention.rs"]
#[allow(clippy::duplicate_mod)] // the wgpu suite, run a second time on CUDA
mod kernels_attention;
#[path = "../wgpu/tests_moe.rs"]
#[allow(clippy::duplicate_mod)] // the wgpu suite, run a second time on CUDA
mod kernels_moe;
#[path = "../wgpu/tests_movement.rs"]
#[allow(clippy::duplicate_mod)] // the wgpu suite, run a second time on CUDA
mod kernels_movement;
#[path = "../wgpu/tests_sample.rs"]
#[allow(clippy::duplicate_mod)] // the wgpu suite, run a second time on CUDA
mod kernels_sample;
#[path = "../wgpu/tests_train.rs"]
#[allow(clippy::duplicate_mod)] // the wgpu suite, run a second time on CUDA
mod kernels_train;

/// The sampling suite's engine: CUDA device 0 (no device fails the tests).
fn test_engine() -> super::CudaEngine {
    super::CudaEngine::new(0).unwrap_or_else(|e| panic!("the CUDA sampling tests need a device: {e}"))
}
#[path = "../wgpu/test_data.rs"]
#[allow(clippy::duplicate_mod)] // the wgpu suites' shared inputs, on the CUDA shim
mod test_data;
