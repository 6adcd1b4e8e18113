//! GPU kernels for IR nodes. What a kernel is, as data ([`spec`]: [`KernelSpec`] and its
//! configurations, and [`KernelSpec::about`]: each kernel's name, element types and cube
//! shape in one match); which kernels and launches a node gets ([`select`]); the launch ABI
//! the plan and the runtimes share ([`launch`], which depends only on `spec`); whole
//! entry points as plans ([`plan`]) and their cost against the hardware ([`traffic`]);
//! with the `kernels` feature, the CubeCL `#[cube]` kernels ([`kernels`]), the one match
//! from a spec to its kernel (`kernel_definition`, which the wgpu runtime launches) and
//! the device-free source text for CUDA C++ and WGSL (`kernel_source`).
//!
//! A [`KernelSpec`] is everything a kernel is specialised on (op, dtype, comptime
//! program) and nothing it is not (symbolic sizes are runtime arguments), so equal
//! specs are one kernel: `dsc compile --target` writes one file per distinct spec and a
//! runtime compiles each once. CubeCL is named only in the kernels, the source
//! generation and the runtime; `ir` and `passes` stay backend-free.
//!
//! Ops without a kernel are [`Unsupported`] with the reason.

pub mod kernels;
pub mod launch;
pub mod plan;
pub mod select;
#[cfg(feature = "kernels")]
mod source;
pub mod spec;
#[cfg(feature = "kernels")]
pub use source::{cube_dim, kernel_definition, kernel_settings, kernel_source, kernel_source_and_shared_bytes};
pub mod traffic;

pub use spec::{Elem, KernelSpec, Target};
use std::fmt;

/// Why a node has no kernel yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub op: &'static str,
    pub reason: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::spec::{fnv1a, Access, EwOp};
    use super::*;
    use crate::ir::{BinaryOp, DType, Op, Ty};
    use crate::ir::{Dim, Float, Graph};

    fn node(op: Op, shapes: &[&[i64]], dtype: DType) -> Result<KernelSpec, Unsupported> {
        let mut g = Graph::new();
        let args: Vec<crate::ir::Value> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| g.input(i as u32, "x", Ty::new(dtype, s.iter().map(|&d| Dim::lit(d)).collect::<Vec<_>>()), None).into())
            .collect();
        let n = g.add_inferred(op, &args, None).unwrap();
        KernelSpec::from_node(&g, n)
    }

    #[test]
    fn specs_from_nodes() {
        let add = node(Op::Binary(BinaryOp::Add), &[&[2, 3], &[3]], DType::F32).unwrap();
        let KernelSpec::Elementwise { program, .. } = &add else { panic!("{add:?}") };
        assert_eq!(program.inputs, vec![Access::Direct, Access::Strided]);
        assert_eq!(program.ops, vec![EwOp::Add(0, 1)]);
        // The name depends on the configuration only, through a hash fixed across builds.
        assert_eq!(add.name(), format!("ew_f32_{:016x}", fnv1a(format!("{add:?}").as_bytes())));
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c, "the published FNV-1a test vector");
        assert_eq!(node(Op::MatMul, &[&[5, 7], &[3, 7]], DType::F16).unwrap().name(), "matmul_f16");
        let bf = node(Op::MatMul, &[&[5, 7], &[3, 7]], DType::Bf16).unwrap();
        assert_eq!(bf.name(), "matmul_bf16");
        assert!(bf.check_target(Target::Cuda).is_ok());
        assert!(bf.check_target(Target::Wgsl).unwrap_err().contains("WGSL has no bf16"));
        let e = node(Op::MatMul, &[&[5, 7], &[3, 7]], DType::F8E4M3).unwrap_err();
        assert_eq!(e.to_string(), "matmul: result dtype f8e4m3 (kernels hold f32, f16 or bf16)");
        let e = node(Op::Softmax { axis: 0 }, &[&[5, 7]], DType::F32).unwrap_err();
        assert!(e.reason.contains("other than the last"), "{e}");
        let r = node(Op::RmsNorm { eps: Float::new(1e-6) }, &[&[5, 7], &[7]], DType::F32).unwrap();
        assert_eq!(r, KernelSpec::RmsNorm { elem: Elem::F32, eps_bits: 1e-6f32.to_bits() });
    }

    #[cfg(feature = "kernels")]
    #[test]
    fn sources_are_deterministic() {
        let specs = [
            node(Op::Binary(BinaryOp::Mul), &[&[4, 9], &[]], DType::F32).unwrap(),
            node(Op::RmsNorm { eps: Float::new(1e-6) }, &[&[5, 7], &[7]], DType::F16).unwrap(),
            KernelSpec::Softmax { elem: Elem::F32 },
            KernelSpec::MatMul { elem: Elem::F32, skinny: false },
        ];
        for s in &specs {
            for t in [Target::Cuda, Target::Wgsl] {
                let a = kernel_source(s, t);
                assert!(a == kernel_source(s, t), "{} {t:?}: two generations differ", s.name());
                assert!(a.contains(&s.name()), "{}", a);
            }
        }
        assert!(kernel_source(&specs[3], Target::Cuda).contains("__global__"));
        assert!(kernel_source(&specs[3], Target::Wgsl).contains("@compute"));
    }

    /// The kernels no IR node maps to (the optimizer's, the sampler's) generate for both
    /// targets: CubeCL verifies each one's IR as it does.
    #[cfg(feature = "kernels")]
    #[test]
    fn runtime_kernels_generate() {
        for s in [
            KernelSpec::AdamW { grad: Elem::F32 },
            KernelSpec::SumSquares { elem: Elem::F16 },
            KernelSpec::SampleRows { elem: Elem::F32, greedy: true },
            KernelSpec::SampleRows { elem: Elem::F32, greedy: false },
        ] {
            for t in [Target::Cuda, Target::Wgsl] {
                assert!(kernel_source(&s, t).contains(&s.name()), "{} {t:?}", s.name());
            }
        }
    }
}
