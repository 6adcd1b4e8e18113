//! The CubeCL side of every kernel: the one match from a [`KernelSpec`] to its `#[cube]`
//! function and comptime arguments ([`kernel_definition`]), which the wgpu runtime
//! launches and [`kernel_source`] compiles to CUDA C++ or WGSL with no device (the CUDA
//! runtime compiles that text with NVRTC). Built with the `kernels` feature (CubeCL); the
//! rest of `codegen` (specs, launches, plans, the traffic model) builds without it.

use super::kernels;
use super::{Elem, KernelSpec, Target};
use cubecl::prelude::*;
use cubecl::Compiler;
use std::sync::Arc;

/// `$body` with `$t` the Rust type of the `Elem` `$e` (`f32`, `half::f16`, `half::bf16`):
/// the one place a kernel's element type becomes a type parameter.
macro_rules! with_elem {
    ($e:expr, $t:ident => $body:expr) => {
        match $e {
            Elem::F32 => {
                type $t = f32;
                $body
            }
            Elem::F16 => {
                type $t = half::f16;
                $body
            }
            Elem::Bf16 => {
                type $t = half::bf16;
                $body
            }
        }
    };
}

/// Device properties for source generation: no device is opened, so the compilers see
/// a generic 1024-unit, 64 KiB shared-memory target (the kernels use far less).
fn offline_properties() -> Arc<DeviceProperties> {
    use cubecl::ir::{features::Features, DeviceIdentity, HardwareProperties, MemoryDeviceProperties};
    Arc::new(DeviceProperties::new(
        Features::default(),
        MemoryDeviceProperties::new(u64::MAX, 256),
        HardwareProperties {
            load_width: 128,
            vector_register_count: None,
            plane_size_min: 32,
            plane_size_max: 32,
            max_bindings: 32,
            max_shared_memory_size: 65536,
            max_cube_count: (u32::MAX, u16::MAX as u32, u16::MAX as u32),
            max_units_per_cube: 1024,
            max_cube_dim: (1024, 1024, 1024),
            num_streaming_multiprocessors: None,
            num_tensor_cores: None,
            min_tensor_cores_dim: None,
            num_cpu_cores: None,
            last_level_cache_size: None,
            max_vector_size: VectorSize::MAX,
            cube_mma_reserved_shared_memory: 0,
        },
        cubecl::profile::TimingMethod::Device,
        DeviceIdentity { name: "offline".into(), fingerprint: "offline".into(), physical: None },
    ))
}

/// The cube shape each kernel is launched with ([`KernelSpec::cube_shape`]).
pub fn cube_dim(spec: &KernelSpec) -> CubeDim {
    let [x, y, z] = spec.cube_shape();
    CubeDim::new_3d(x, y, z)
}

/// The source text and the bytes of dynamic shared memory (`extern __shared__`) a CUDA
/// launch must reserve (0 for WGSL, whose workgroup arrays are sized in the text).
fn compile(k: &dyn CubeKernel, name: &str, target: Target) -> (String, usize) {
    // CubeCL names the entry `<fn>_<hash of the kernel id>`, and that hash changes from one
    // build to the next; the file takes the spec's name instead so the text is stable.
    let def = k.define();
    let cubecl_name = def.settings.kernel_name.clone();
    let (text, shared) = match target {
        Target::Cuda => cubecl_cpp::shared::CppCompiler::<cubecl_cpp::target::Cuda>::default()
            .compile(def, &cubecl_cpp::shared::CompilationOptions::default())
            .map(|r| (r.to_string(), r.shared_memory_size)),
        Target::Wgsl => {
            cubecl::wgpu::WgslCompiler::default().compile(def, &cubecl::WgpuCompilationOptions::default()).map(|r| (r.to_string(), 0))
        }
    }
    // The kernels are fixed and their configurations validated by `from_node`: a
    // compilation error is a bug in this module, not in the user's spec.
    .unwrap_or_else(|e| panic!("CubeCL failed to compile a dsc kernel: {e:?}"));
    (text.replace(&cubecl_name, name), shared)
}

/// The CubeCL kernel a spec names, with its comptime configuration, for a device with
/// `props` (source generation passes a generic one; the wgpu runtime its adapter's).
/// This is the one place a [`KernelSpec`] meets its `#[cube]` function: source text
/// ([`kernel_source`]) and wgpu launches both start here, and a launch binds the
/// kernel's runtime parameters generically, in the order [`super::launch::Launch::args`]
/// lists them (buffers as resources, `u32`s as scalars).
pub fn kernel_definition(spec: &KernelSpec, props: Arc<DeviceProperties>, target: Arc<TargetProperties>) -> Defined {
    Defined(with_elem!(spec.elem(), F => definition::<F>(spec, props, target)))
}

/// A kernel [`kernel_definition`] built, as CubeCL's launcher and compilers take one.
pub struct Defined(Box<dyn CubeKernel>);

impl cubecl::prelude::KernelMetadata for Defined {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn id(&self) -> cubecl::prelude::KernelId {
        self.0.id()
    }
    fn address_type(&self) -> cubecl::ir::ElemType {
        self.0.address_type()
    }
}

impl CubeKernel for Defined {
    fn define(&self) -> cubecl::prelude::KernelDefinition {
        self.0.define()
    }
}

/// The settings a spec's kernel is compiled and launched with: its cube shape, bounds
/// checks on, 32-bit addressing.
pub fn kernel_settings(spec: &KernelSpec) -> KernelSettings {
    KernelSettings::new(*cube_dim(spec), ExecutionMode::Checked, AddressType::U32)
}

/// [`kernel_definition`] for kernels whose element type (`spec.elem()`) is `F`.
fn definition<F: Float + CubeElement>(spec: &KernelSpec, p: Arc<DeviceProperties>, tp: Arc<TargetProperties>) -> Box<dyn CubeKernel> {
    let settings = kernel_settings(spec);
    // Every buffer parameter is its own binding (no aliasing).
    let b = || BufferCompilationArg { inplace: None };
    match spec {
        KernelSpec::Elementwise { program, .. } => {
            let inputs = SequenceCompilationArg::<Box<[F]>> { values: program.inputs.iter().map(|_| b()).collect() };
            Box::new(kernels::fused_ew::FusedEw::<F, F>::new(settings, p, tp, inputs, b(), b(), program.clone()))
        }
        KernelSpec::ElementwiseI32 { program, .. } => {
            let inputs = SequenceCompilationArg::<Box<[i32]>> { values: program.inputs.iter().map(|_| b()).collect() };
            Box::new(kernels::fused_ew::FusedEw::<F, i32>::new(settings, p, tp, inputs, b(), b(), program.clone()))
        }
        KernelSpec::Reduce { mean, .. } => {
            Box::new(kernels::reduce::reduce_axis::ReduceAxis::<F>::new(settings, p, tp, b(), b(), (), (), *mean))
        }
        KernelSpec::MoeGrad { part, weights, .. } => {
            use kernels::moe_grad::{self as mg, MoeGradPart as P};
            match part {
                P::Proj => Box::new(mg::moe_grad_proj::MoeGradProj::<F>::new(
                    settings,
                    p,
                    tp,
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    (),
                    (),
                    (),
                )),
                P::Mid => with_elem!(*weights, W => Box::new(mg::moe_grad_mid::MoeGradMid::<F, W>::new(
                    settings,
                    p,
                    tp,
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    ()
                ))),
                P::DxRows => Box::new(mg::moe_grad_dx_rows::MoeGradDxRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), (), ())),
                P::Dx => Box::new(mg::moe_grad_dx::MoeGradDx::<F>::new(settings, p, tp, b(), b(), b(), (), ())),
                P::Weights => Box::new(mg::moe_grad_weights::MoeGradWeights::<F>::new(
                    settings,
                    p,
                    tp,
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    (),
                    (),
                    (),
                )),
            }
        }
        KernelSpec::MoeRouteGrad { cfg, .. } => {
            Box::new(kernels::grad::moe_route_grad::MoeRouteGrad::<F>::new(settings, p, tp, b(), b(), b(), b(), *cfg))
        }
        KernelSpec::IotaI32 => Box::new(kernels::reduce::iota::Iota::<i32>::new(settings, p, tp, b(), ())),
        KernelSpec::AdamW { .. } => Box::new(kernels::optim::adamw::Adamw::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), ())),
        KernelSpec::SumSquares { .. } => Box::new(kernels::optim::sum_squares::SumSquares::<F>::new(settings, p, tp, b(), b(), ())),
        KernelSpec::SampleRows { greedy, .. } => {
            Box::new(kernels::sample::sample_rows::SampleRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), *greedy))
        }
        KernelSpec::Copy { rank, .. } => {
            Box::new(kernels::movement::strided_copy::StridedCopy::<F>::new(settings, p, tp, b(), b(), b(), *rank))
        }
        KernelSpec::CopyI32 { rank } => {
            Box::new(kernels::movement::strided_copy::StridedCopy::<i32>::new(settings, p, tp, b(), b(), b(), *rank))
        }
        KernelSpec::NegI32 => Box::new(kernels::movement::neg_i32::NegI32::new(settings, p, tp, b(), b())),
        KernelSpec::RmsNormGrad { eps_bits, gain: false, .. } => {
            Box::new(kernels::grad::rms_norm_grad_rows::RmsNormGradRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), *eps_bits))
        }
        KernelSpec::RmsNormGrad { gain: true, .. } => {
            Box::new(kernels::grad::rms_norm_grad_gain::RmsNormGradGain::<F>::new(settings, p, tp, b(), b(), b(), b(), ()))
        }
        KernelSpec::ScatterLinks => Box::new(kernels::grad::scatter_links::ScatterLinks::new(settings, p, tp, b(), b(), b(), ())),
        KernelSpec::ScatterRows { .. } => {
            Box::new(kernels::grad::scatter_rows::ScatterRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), (), ()))
        }
        KernelSpec::AttentionGrad { cfg, part, .. } => {
            use kernels::attention_grad::{self as ag, AttnGradPart};
            match part {
                AttnGradPart::Delta => Box::new(ag::attn_grad_delta::AttnGradDelta::<F>::new(settings, p, tp, b(), b(), b(), ())),
                AttnGradPart::Dq => Box::new(ag::attn_grad_dq::AttnGradDq::<F>::new(
                    settings,
                    p,
                    tp,
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    (),
                    (),
                    (),
                    *cfg,
                )),
                AttnGradPart::Dkv => Box::new(ag::attn_grad_dkv::AttnGradDkv::<F>::new(
                    settings,
                    p,
                    tp,
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    b(),
                    (),
                    (),
                    (),
                    *cfg,
                )),
            }
        }
        KernelSpec::SwiGluGradEw { .. } => {
            Box::new(kernels::grad::swiglu_grad_ew::SwigluGradEw::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b()))
        }
        KernelSpec::Gather { .. } => Box::new(kernels::movement::gather::Gather::<F>::new(settings, p, tp, b(), b(), b(), (), (), ())),
        KernelSpec::Rope { interleaved, .. } => {
            Box::new(kernels::rope::rope::Rope::<F>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), *interleaved))
        }
        KernelSpec::MatMulEw { epilogue, skinny, .. } => {
            let inputs = SequenceCompilationArg::<Box<[F]>> { values: epilogue.loads.iter().map(|_| b()).collect() };
            let e = epilogue.clone();
            let k = kernels::heads::matmul_ew::MatmulEw::<F, F>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), inputs, e, *skinny);
            Box::new(k)
        }
        KernelSpec::MatMulEwFrom { head, epilogue, skinny, .. } => {
            let inputs = || SequenceCompilationArg::<Box<[F]>> { values: epilogue.loads.iter().map(|_| b()).collect() };
            let (e, sk) = (epilogue.clone(), *skinny);
            with_elem!(*head, H => Box::new(kernels::heads::matmul_ew::MatmulEw::<F, H>::new(
                settings,
                p,
                tp,
                b(),
                b(),
                b(),
                b(),
                (),
                (),
                (),
                inputs(),
                e,
                sk,
            )))
        }
        KernelSpec::RmsNormEw { eps_bits, epilogue, .. } => {
            let inputs = SequenceCompilationArg::<Box<[F]>> { values: epilogue.loads.iter().map(|_| b()).collect() };
            let k = kernels::heads::rms_norm_ew::RmsNormEw::<F>::new(
                settings,
                p,
                tp,
                b(),
                b(),
                b(),
                b(),
                (),
                inputs,
                *eps_bits,
                epilogue.clone(),
            );
            Box::new(k)
        }
        KernelSpec::GateUp { skinny, .. } => {
            Box::new(kernels::heads::matmul_gate_up::MatmulGateUp::<F>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), *skinny))
        }
        // `F` is `to` (the spec's `elem`); `from` is the second type.
        KernelSpec::Cast { from, .. } => {
            with_elem!(*from, A => Box::new(kernels::movement::convert::Convert::<A, F>::new(settings, p, tp, b(), b())))
        }
        KernelSpec::RmsNorm { eps_bits, .. } => {
            Box::new(kernels::rms_norm::RmsNorm::<F>::new(settings, p, tp, b(), b(), b(), (), *eps_bits))
        }
        KernelSpec::Softmax { .. } => Box::new(kernels::softmax::Softmax::<F>::new(settings, p, tp, b(), b(), ())),
        KernelSpec::MatMul { skinny, .. } => {
            Box::new(kernels::matmul::Matmul::<F>::new(settings, p, tp, b(), b(), b(), (), (), (), *skinny))
        }
        KernelSpec::Attention { cfg, .. } => Box::new(kernels::attention::attention::Attention::<F>::new(
            settings,
            p,
            tp,
            b(),
            b(),
            b(),
            b(),
            b(),
            b(),
            b(),
            b(),
            b(),
            b(),
            (),
            (),
            (),
            (),
            *cfg,
        )),
        KernelSpec::AttentionCombine { .. } => {
            Box::new(kernels::attention::attention_combine::AttentionCombine::<F>::new(settings, p, tp, b(), b(), b(), (), (), ()))
        }
        KernelSpec::BatchMatMul { rank, accumulate, .. } => Box::new(kernels::attention::batch_matmul::BatchMatmul::<F>::new(
            settings,
            p,
            tp,
            b(),
            b(),
            b(),
            b(),
            (),
            (),
            (),
            *rank,
            *accumulate,
        )),
        KernelSpec::MoeRoute { cfg, .. } => {
            let inputs = SequenceCompilationArg::<Box<[F]>> { values: (0..1 + cfg.bias as usize).map(|_| b()).collect() };
            Box::new(kernels::moe::moe_route::MoeRoute::<F>::new(settings, p, tp, inputs, b(), b(), *cfg))
        }
        KernelSpec::TopK { .. } => Box::new(kernels::moe::top_k::TopK::<F>::new(settings, p, tp, b(), b(), b(), (), ())),
        KernelSpec::MoeDispatch => Box::new(kernels::moe::moe_dispatch::MoeDispatch::new(settings, p, tp, b(), b(), b(), b(), b(), ())),
        KernelSpec::MoeGateUp { .. } => {
            let k = kernels::moe::moe_gate_up::MoeGateUp::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), b(), (), (), (), ());
            Box::new(k)
        }
        KernelSpec::MoeDown { .. } => {
            Box::new(kernels::moe::moe_down::MoeDown::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), (), ()))
        }
        KernelSpec::Label { kind, has_ignore, .. } => {
            use kernels::loss::{self, LabelKernel};
            match kind {
                LabelKernel::LogProb => {
                    Box::new(loss::label_logprob::LabelLogprob::<F>::new(settings, p, tp, b(), b(), b(), b(), (), (), *has_ignore))
                }
                LabelKernel::Mean => Box::new(loss::label_mean::LabelMean::new(settings, p, tp, b(), b(), b(), (), (), *has_ignore)),
                LabelKernel::Coef => Box::new(loss::label_coef::LabelCoef::new(settings, p, tp, b(), b(), b(), (), (), *has_ignore)),
                LabelKernel::Grad { per_row } => {
                    Box::new(loss::label_grad::LabelGrad::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), (), *has_ignore, *per_row))
                }
            }
        }
        KernelSpec::MoeCombine { weights, .. } => {
            with_elem!(*weights, W => Box::new(kernels::moe::moe_combine::MoeCombine::<F, W>::new(settings, p, tp, b(), b(), b(), b(), (), ())))
        }
    }
}

/// The kernel's source text for `target`, with a header naming the spec. Deterministic:
/// no device, no clock, and the entry point is renamed to [`KernelSpec::name`].
pub fn kernel_source(spec: &KernelSpec, target: Target) -> String {
    kernel_source_and_shared_bytes(spec, target).0
}

/// [`kernel_source`] and the bytes of dynamic shared memory the kernel declares
/// (`extern __shared__`): a CUDA launch must reserve them, and the text does not say how
/// many (CubeCL's own CUDA runtime reads the same number off the compiled kernel). 0 for
/// WGSL.
pub fn kernel_source_and_shared_bytes(spec: &KernelSpec, target: Target) -> (String, usize) {
    let k = kernel_definition(spec, offline_properties(), Arc::new(TargetProperties::default()));
    let (text, shared) = compile(&k, &spec.name(), target);
    let comment = format!(
        "// dsc kernel {}: {:?}\n// Generated by CubeCL 0.11.3; the launch ABI is CubeCL's (buffers, then info_st).\n",
        spec.name(),
        spec
    );
    (format!("{comment}{text}"), shared)
}
