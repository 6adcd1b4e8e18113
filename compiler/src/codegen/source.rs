//! Kernel source text: each [`KernelSpec`] compiled by CubeCL to CUDA C++ or WGSL with
//! no device ([`kernel_source`]), and the cube shape each kernel launches with
//! ([`cube_dim`]). Built with the `kernels` feature (CubeCL); the rest of `codegen`
//! (specs, launches, plans, the traffic model) builds without it.

use super::kernels;
use super::{Elem, KernelSpec, Target};
use cubecl::prelude::*;
use cubecl::Compiler;
use std::sync::Arc;

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

/// The cube shape each kernel is launched with ([`super::cube_shape`]).
pub fn cube_dim(spec: &KernelSpec) -> CubeDim {
    let [x, y, z] = super::cube_shape(spec);
    CubeDim::new_3d(x, y, z)
}

/// The source text and the bytes of dynamic shared memory (`extern __shared__`) a CUDA
/// launch must reserve (0 for WGSL, whose workgroup arrays are sized in the text).
fn compile<K: CubeKernel>(k: K, name: String, target: Target) -> (String, usize) {
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
    (text.replace(&cubecl_name, &name), shared)
}

fn source_for<F: Float + CubeElement>(spec: &KernelSpec, target: Target) -> (String, usize) {
    let settings = KernelSettings::new(*cube_dim(spec), ExecutionMode::Checked, AddressType::U32);
    let (p, tp) = (offline_properties(), Arc::new(TargetProperties::default()));
    let b = || BufferCompilationArg { inplace: None };
    let name = spec.name();
    match spec {
        KernelSpec::Elementwise { program, .. } => {
            let inputs = SequenceCompilationArg::<Box<[F]>> { values: program.inputs.iter().map(|_| b()).collect() };
            compile(kernels::fused_ew::FusedEw::<F, F>::new(settings, p, tp, inputs, b(), b(), program.clone()), name, target)
        }
        KernelSpec::ElementwiseI32 { program, .. } => {
            let inputs = SequenceCompilationArg::<Box<[i32]>> { values: program.inputs.iter().map(|_| b()).collect() };
            compile(kernels::fused_ew::FusedEw::<F, i32>::new(settings, p, tp, inputs, b(), b(), program.clone()), name, target)
        }
        KernelSpec::Reduce { mean, .. } => {
            compile(kernels::reduce::reduce_axis::ReduceAxis::<F>::new(settings, p, tp, b(), b(), (), (), *mean), name, target)
        }
        KernelSpec::MoeGrad { part, weights, .. } => {
            use kernels::moe_grad::{self as mg, MoeGradPart as P};
            match part {
                P::Proj => compile(
                    mg::moe_grad_proj::MoeGradProj::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), b(), b(), b(), b(), (), (), ()),
                    name,
                    target,
                ),
                P::Mid => match weights {
                    Elem::F32 => compile(
                        mg::moe_grad_mid::MoeGradMid::<F, f32>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), ()),
                        name,
                        target,
                    ),
                    Elem::F16 => compile(
                        mg::moe_grad_mid::MoeGradMid::<F, half::f16>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), ()),
                        name,
                        target,
                    ),
                    Elem::Bf16 => compile(
                        mg::moe_grad_mid::MoeGradMid::<F, half::bf16>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), ()),
                        name,
                        target,
                    ),
                },
                P::DxRows => compile(
                    mg::moe_grad_dx_rows::MoeGradDxRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), (), ()),
                    name,
                    target,
                ),
                P::Dx => compile(mg::moe_grad_dx::MoeGradDx::<F>::new(settings, p, tp, b(), b(), b(), (), ()), name, target),
                P::Weights => compile(
                    mg::moe_grad_weights::MoeGradWeights::<F>::new(
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
                    ),
                    name,
                    target,
                ),
            }
        }
        KernelSpec::MoeRouteGrad { cfg, .. } => {
            compile(kernels::grad::moe_route_grad::MoeRouteGrad::<F>::new(settings, p, tp, b(), b(), b(), b(), *cfg), name, target)
        }
        KernelSpec::IotaI32 => compile(kernels::reduce::iota::Iota::<i32>::new(settings, p, tp, b(), ()), name, target),
        KernelSpec::AdamW { .. } => {
            compile(kernels::optim::adamw::Adamw::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), ()), name, target)
        }
        KernelSpec::SumSquares { .. } => {
            compile(kernels::optim::sum_squares::SumSquares::<F>::new(settings, p, tp, b(), b(), ()), name, target)
        }
        KernelSpec::SampleRows { greedy, .. } => {
            compile(kernels::sample::sample_rows::SampleRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), *greedy), name, target)
        }
        KernelSpec::Copy { rank, .. } => {
            compile(kernels::movement::strided_copy::StridedCopy::<F>::new(settings, p, tp, b(), b(), b(), *rank), name, target)
        }
        KernelSpec::CopyI32 { rank } => {
            compile(kernels::movement::strided_copy::StridedCopy::<i32>::new(settings, p, tp, b(), b(), b(), *rank), name, target)
        }
        KernelSpec::NegI32 => compile(kernels::movement::neg_i32::NegI32::new(settings, p, tp, b(), b()), name, target),
        KernelSpec::RmsNormGrad { eps_bits, gain: false, .. } => compile(
            kernels::grad::rms_norm_grad_rows::RmsNormGradRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), *eps_bits),
            name,
            target,
        ),
        KernelSpec::RmsNormGrad { gain: true, .. } => {
            compile(kernels::grad::rms_norm_grad_gain::RmsNormGradGain::<F>::new(settings, p, tp, b(), b(), b(), b(), ()), name, target)
        }
        KernelSpec::ScatterLinks => {
            compile(kernels::grad::scatter_links::ScatterLinks::new(settings, p, tp, b(), b(), b(), ()), name, target)
        }
        KernelSpec::ScatterRows { .. } => {
            compile(kernels::grad::scatter_rows::ScatterRows::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), (), ()), name, target)
        }
        KernelSpec::AttentionGrad { cfg, part, .. } => {
            use kernels::attention_grad::{self as ag, AttnGradPart};
            match part {
                AttnGradPart::Delta => {
                    compile(ag::attn_grad_delta::AttnGradDelta::<F>::new(settings, p, tp, b(), b(), b(), ()), name, target)
                }
                AttnGradPart::Dq => compile(
                    ag::attn_grad_dq::AttnGradDq::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), b(), b(), (), (), (), *cfg),
                    name,
                    target,
                ),
                AttnGradPart::Dkv => compile(
                    ag::attn_grad_dkv::AttnGradDkv::<F>::new(
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
                    ),
                    name,
                    target,
                ),
            }
        }
        KernelSpec::SwiGluGradEw { .. } => {
            compile(kernels::grad::swiglu_grad_ew::SwigluGradEw::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b()), name, target)
        }
        KernelSpec::Gather { .. } => {
            compile(kernels::movement::gather::Gather::<F>::new(settings, p, tp, b(), b(), b(), (), (), ()), name, target)
        }
        KernelSpec::Rope { interleaved, .. } => {
            compile(kernels::rope::rope::Rope::<F>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), *interleaved), name, target)
        }
        KernelSpec::MatMulEw { epilogue, skinny, .. } => {
            let inputs = SequenceCompilationArg::<Box<[F]>> { values: epilogue.loads.iter().map(|_| b()).collect() };
            let e = epilogue.clone();
            let k = kernels::heads::matmul_ew::MatmulEw::<F, F>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), inputs, e, *skinny);
            compile(k, name, target)
        }
        KernelSpec::MatMulEwFrom { head, epilogue, skinny, .. } => {
            let inputs = || SequenceCompilationArg::<Box<[F]>> { values: epilogue.loads.iter().map(|_| b()).collect() };
            let (e, sk) = (epilogue.clone(), *skinny);
            match head {
                Elem::F32 => compile(
                    kernels::heads::matmul_ew::MatmulEw::<F, f32>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), inputs(), e, sk),
                    name,
                    target,
                ),
                Elem::F16 => compile(
                    kernels::heads::matmul_ew::MatmulEw::<F, half::f16>::new(
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
                    ),
                    name,
                    target,
                ),
                Elem::Bf16 => compile(
                    kernels::heads::matmul_ew::MatmulEw::<F, half::bf16>::new(
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
                    ),
                    name,
                    target,
                ),
            }
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
            compile(k, name, target)
        }
        KernelSpec::GateUp { skinny, .. } => compile(
            kernels::heads::matmul_gate_up::MatmulGateUp::<F>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), *skinny),
            name,
            target,
        ),
        // The two element types are the spec's, not `F` (which is `to`).
        KernelSpec::Cast { from, to } => match (from, to) {
            (Elem::F32, Elem::F16) => {
                compile(kernels::movement::convert::Convert::<f32, half::f16>::new(settings, p, tp, b(), b()), name, target)
            }
            (Elem::F16, Elem::F32) => {
                compile(kernels::movement::convert::Convert::<half::f16, f32>::new(settings, p, tp, b(), b()), name, target)
            }
            (Elem::F32, Elem::Bf16) => {
                compile(kernels::movement::convert::Convert::<f32, half::bf16>::new(settings, p, tp, b(), b()), name, target)
            }
            (Elem::Bf16, Elem::F32) => {
                compile(kernels::movement::convert::Convert::<half::bf16, f32>::new(settings, p, tp, b(), b()), name, target)
            }
            (Elem::F16, Elem::Bf16) => {
                compile(kernels::movement::convert::Convert::<half::f16, half::bf16>::new(settings, p, tp, b(), b()), name, target)
            }
            (Elem::Bf16, Elem::F16) => {
                compile(kernels::movement::convert::Convert::<half::bf16, half::f16>::new(settings, p, tp, b(), b()), name, target)
            }
            // Same type on both sides: a copy.
            _ => compile(kernels::movement::convert::Convert::<F, F>::new(settings, p, tp, b(), b()), name, target),
        },
        KernelSpec::RmsNorm { eps_bits, .. } => {
            compile(kernels::rms_norm::RmsNorm::<F>::new(settings, p, tp, b(), b(), b(), (), *eps_bits), name, target)
        }
        KernelSpec::Softmax { .. } => compile(kernels::softmax::Softmax::<F>::new(settings, p, tp, b(), b(), ()), name, target),
        KernelSpec::MatMul { skinny, .. } => {
            compile(kernels::matmul::Matmul::<F>::new(settings, p, tp, b(), b(), b(), (), (), (), *skinny), name, target)
        }
        KernelSpec::Attention { cfg, .. } => compile(
            kernels::attention::attention::Attention::<F>::new(
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
            ),
            name,
            target,
        ),
        KernelSpec::AttentionCombine { .. } => compile(
            kernels::attention::attention_combine::AttentionCombine::<F>::new(settings, p, tp, b(), b(), b(), (), (), ()),
            name,
            target,
        ),
        KernelSpec::BatchMatMul { rank, accumulate, .. } => compile(
            kernels::attention::batch_matmul::BatchMatmul::<F>::new(settings, p, tp, b(), b(), b(), b(), (), (), (), *rank, *accumulate),
            name,
            target,
        ),
        KernelSpec::MoeRoute { cfg, .. } => {
            let inputs = SequenceCompilationArg::<Box<[F]>> { values: (0..1 + cfg.bias as usize).map(|_| b()).collect() };
            compile(kernels::moe::moe_route::MoeRoute::<F>::new(settings, p, tp, inputs, b(), b(), *cfg), name, target)
        }
        KernelSpec::TopK { .. } => compile(kernels::moe::top_k::TopK::<F>::new(settings, p, tp, b(), b(), b(), (), ()), name, target),
        KernelSpec::MoeDispatch => {
            compile(kernels::moe::moe_dispatch::MoeDispatch::new(settings, p, tp, b(), b(), b(), b(), b(), ()), name, target)
        }
        KernelSpec::MoeGateUp { .. } => {
            let k = kernels::moe::moe_gate_up::MoeGateUp::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), b(), b(), (), (), (), ());
            compile(k, name, target)
        }
        KernelSpec::MoeDown { .. } => {
            compile(kernels::moe::moe_down::MoeDown::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), (), ()), name, target)
        }
        KernelSpec::Label { kind, has_ignore, .. } => {
            use kernels::loss::{self, LabelKernel};
            match kind {
                LabelKernel::LogProb => compile(
                    loss::label_logprob::LabelLogprob::<F>::new(settings, p, tp, b(), b(), b(), b(), (), (), *has_ignore),
                    name,
                    target,
                ),
                LabelKernel::Mean => {
                    compile(loss::label_mean::LabelMean::new(settings, p, tp, b(), b(), b(), (), (), *has_ignore), name, target)
                }
                LabelKernel::Coef => {
                    compile(loss::label_coef::LabelCoef::new(settings, p, tp, b(), b(), b(), (), (), *has_ignore), name, target)
                }
                LabelKernel::Grad { per_row } => compile(
                    loss::label_grad::LabelGrad::<F>::new(settings, p, tp, b(), b(), b(), b(), b(), (), (), *has_ignore, *per_row),
                    name,
                    target,
                ),
            }
        }
        KernelSpec::MoeCombine { weights, .. } => match weights {
            Elem::F32 => {
                compile(kernels::moe::moe_combine::MoeCombine::<F, f32>::new(settings, p, tp, b(), b(), b(), b(), (), ()), name, target)
            }
            Elem::F16 => compile(
                kernels::moe::moe_combine::MoeCombine::<F, half::f16>::new(settings, p, tp, b(), b(), b(), b(), (), ()),
                name,
                target,
            ),
            Elem::Bf16 => compile(
                kernels::moe::moe_combine::MoeCombine::<F, half::bf16>::new(settings, p, tp, b(), b(), b(), b(), (), ()),
                name,
                target,
            ),
        },
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
    let (text, shared) = match spec.elem() {
        Elem::F32 => source_for::<f32>(spec, target),
        Elem::F16 => source_for::<half::f16>(spec, target),
        Elem::Bf16 => source_for::<half::bf16>(spec, target),
    };
    let comment = format!(
        "// dsc kernel {}: {:?}\n// Generated by CubeCL 0.11.3; the launch ABI is CubeCL's (buffers, then info_st).\n",
        spec.name(),
        spec
    );
    (format!("{comment}{text}"), shared)
}
