//! GPU kernels for IR nodes: which nodes have a kernel ([`KernelSpec::from_node`]), how
//! each node runs as launches ([`select`], producing [`launch`]'s data: the ABI the plan
//! and the runtimes share), whole entry points as plans ([`plan`]) and their cost against
//! the hardware ([`traffic`]); with the `kernels` feature, the generic CubeCL `#[cube]`
//! kernels ([`kernels`]) and their device-free source text for CUDA C++ and WGSL
//! (`kernel_source`).
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
#[cfg(feature = "kernels")]
pub use source::{cube_dim, kernel_source, kernel_source_and_shared_bytes};
pub mod traffic;

use crate::ir::{BinaryOp, DType, FusedKernel, Graph, NodeId, Op, Operand, ReduceOp, StepOp, Ty, UnaryOp};
use kernels::{Access, EwOp, EwProgram};
use std::fmt;

/// The float type a kernel's buffers hold (the kernels accumulate in `f32` where it
/// matters: matmuls, norms, attention). `bf16`, the published DeepSeek checkpoints'
/// dtype, exists in CUDA C++ but not in WGSL ([`Elem::on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    pub fn from_dtype(d: DType) -> Option<Elem> {
        match d {
            DType::F32 => Some(Elem::F32),
            DType::F16 => Some(Elem::F16),
            DType::Bf16 => Some(Elem::Bf16),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
        }
    }
    /// Whether `target` has this type, or why not.
    pub fn on(self, target: Target) -> Result<(), String> {
        match (self, target) {
            (Elem::Bf16, Target::Wgsl) => Err("WGSL has no bf16: compile for --target cuda, or give the spec dtype f16 or f32".into()),
            _ => Ok(()),
        }
    }
}

/// One kernel: what it computes and its comptime configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelSpec {
    /// [`kernels::fused_ew`] running `program`.
    Elementwise { elem: Elem, program: EwProgram },
    /// [`kernels::fused_ew`] over `i32` inputs (index tensors), the result in `elem`.
    ElementwiseI32 { elem: Elem, program: EwProgram },
    /// [`kernels::reduce::reduce_axis`]: a sum, or with `mean` a mean, along one axis.
    Reduce { elem: Elem, mean: bool },
    /// [`kernels::reduce::iota`] of `i32`s.
    IotaI32,
    /// [`kernels::optim::adamw`]: one AdamW update of an `f32` master weight in place from a
    /// gradient in `grad` (no IR op: a training runtime launches it).
    AdamW { grad: Elem },
    /// [`kernels::optim::sum_squares`]: partial sums of squares (in `f32`) of a tensor.
    SumSquares { elem: Elem },
    /// [`kernels::sample::sample_rows`]: the next token of each row of logits (and its
    /// log-probability and the entropy), greedy or by a Gumbel-max draw.
    SampleRows { elem: Elem, greedy: bool },
    /// [`kernels::grad::moe_route_grad`].
    MoeRouteGrad { elem: Elem, cfg: kernels::grad::RouteGradConfig },
    /// One launch of the routed experts' backward ([`kernels::moe_grad`]).
    MoeGrad { elem: Elem, weights: Elem, part: kernels::moe_grad::MoeGradPart },
    /// [`kernels::rms_norm`] over the last axis; `eps` as `f32` bits.
    RmsNorm { elem: Elem, eps_bits: u32 },
    /// [`kernels::softmax`] over the last axis.
    Softmax { elem: Elem },
    /// [`kernels::matmul`]: `x[.., k] · w[n, k]ᵀ`; `skinny`: 8-row tiles, for few rows.
    MatMul { elem: Elem, skinny: bool },
    /// [`kernels::movement::strided_copy`] over a box of `rank` axes: permute, slice,
    /// broadcast, and concat / cache_append (one launch per input).
    Copy { elem: Elem, rank: u32 },
    /// [`kernels::movement::strided_copy`] over `i32` index tensors (labels, positions).
    CopyI32 { rank: u32 },
    /// [`kernels::movement::neg_i32`].
    NegI32,
    /// [`kernels::movement::gather`]: rows of a table by `i32` index.
    Gather { elem: Elem },
    /// [`kernels::rope::rope`], adjacent pairs when `interleaved`, else `rotate_half`.
    Rope { elem: Elem, interleaved: bool },
    /// [`kernels::heads::matmul_ew`]: a fused matmul head and its elementwise epilogue.
    MatMulEw { elem: Elem, epilogue: kernels::heads::Epilogue, skinny: bool },
    /// [`kernels::heads::matmul_ew`] whose head multiplies `head` operands (f32 gradients)
    /// into a result of `elem`.
    MatMulEwFrom { elem: Elem, head: Elem, epilogue: kernels::heads::Epilogue, skinny: bool },
    /// [`kernels::heads::rms_norm_ew`]: a fused rms_norm head and its epilogue.
    RmsNormEw { elem: Elem, eps_bits: u32, epilogue: kernels::heads::Epilogue },
    /// [`kernels::heads::matmul_gate_up`]: `silu(x·gateᵀ)·(x·upᵀ)`, SwiGLU's first launch.
    GateUp { elem: Elem, skinny: bool },
    /// [`kernels::movement::convert`] from one float element type to another.
    Cast { from: Elem, to: Elem },
    /// [`kernels::attention::attention`]: flash attention, one cube per (query block,
    /// kv head, batch).
    Attention { elem: Elem, cfg: kernels::attention::AttentionConfig },
    /// [`kernels::attention::attention_combine`]: split-K attention's chunks merged.
    AttentionCombine { elem: Elem },
    /// [`kernels::attention::batch_matmul`]: `a[B.., m, k] · b[B.., k, n]` over `rank`
    /// batch axes, each operand read through a strided view.
    /// With `accumulate` it adds the product to the output's contents.
    BatchMatMul { elem: Elem, rank: u32, accumulate: bool },
    /// [`kernels::moe::moe_route`]: the MoE router, one cube per token.
    MoeRoute { elem: Elem, cfg: kernels::moe::RouteConfig },
    /// [`kernels::moe::top_k`] over the last axis (values and i32 indices).
    TopK { elem: Elem },
    /// [`kernels::moe::moe_dispatch`]: sorts (token, slot) pairs by expert. Integers
    /// only; its [`KernelSpec::elem`] is nominally `f32`.
    MoeDispatch,
    /// [`kernels::moe::moe_gate_up`]: grouped `silu(x·gateᵀ)·(x·upᵀ)` over sorted rows.
    MoeGateUp { elem: Elem },
    /// [`kernels::moe::moe_down`]: grouped `act·downᵀ` over sorted rows.
    MoeDown { elem: Elem },
    /// [`kernels::moe::moe_combine`]: each token's rows times its gate weights (of
    /// `weights`' float type), summed.
    MoeCombine { elem: Elem, weights: Elem },
    /// One of [`kernels::loss`]'s label kernels over logits of `elem` (the reductions
    /// `Mean` and `Coef` read only `f32`s and labels); `has_ignore`: rows whose label is
    /// the ignore index count for nothing.
    Label { elem: Elem, kind: kernels::loss::LabelKernel, has_ignore: bool },
    /// [`kernels::grad::rms_norm_grad_rows`] (`dx` and each row's `r`), or with `gain`
    /// [`kernels::grad::rms_norm_grad_gain`] (`dgain`); `eps` as `f32` bits.
    RmsNormGrad { elem: Elem, eps_bits: u32, gain: bool },
    /// [`kernels::grad::scatter_links`]: integers only (nominally `f32`).
    ScatterLinks,
    /// [`kernels::grad::scatter_rows`]: scatter-add's accumulation.
    ScatterRows { elem: Elem },
    /// [`kernels::grad::swiglu_grad_ew`]: the elementwise middle of the SwiGLU backward.
    SwiGluGradEw { elem: Elem },
    /// One launch of the attention backward ([`kernels::attention_grad`]).
    AttentionGrad { elem: Elem, cfg: kernels::attention_grad::AttnGradConfig, part: kernels::attention_grad::AttnGradPart },
}

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

/// The source language to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Cuda,
    Wgsl,
}

impl Target {
    /// The file extension of this target's sources.
    pub fn extension(self) -> &'static str {
        match self {
            Target::Cuda => "cu",
            Target::Wgsl => "wgsl",
        }
    }
}

/// FNV-1a, 64-bit: a hash that is the same in every build and run (std's `DefaultHasher`
/// promises neither), for kernel names that can be golden-tested.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

impl KernelSpec {
    /// The kernel for node `n` of `g`, or why there is none.
    pub fn from_node(g: &Graph, n: NodeId) -> Result<KernelSpec, Unsupported> {
        let node = g.node(n);
        let op = node.op.name();
        let no = |reason: &str| Unsupported { op, reason: reason.to_string() };
        // Movement, rope, fused heads and swiglu decide their own specs (their files say how).
        if let Some(spec) = kernels::movement::spec(g, n).or_else(|| kernels::rope::spec(g, n)).or_else(|| kernels::heads::spec(g, n)) {
            return spec;
        }
        // MoE and selection nodes have several outputs and inputs of other dtypes.
        if let Some(spec) = kernels::moe::spec_from_node(g, n) {
            return spec;
        }
        if let Op::Iota { dtype, .. } = node.op {
            return match dtype {
                DType::I32 | DType::I64 => Ok(KernelSpec::IotaI32),
                d => Err(no(&format!("an iota of {} (index iotas only)", d.name()))),
            };
        }
        if let Some(spec) = kernels::loss::spec(g, n)
            .or_else(|| kernels::grad::spec(g, n))
            .or_else(|| kernels::attention_grad::spec(g, n))
            .or_else(|| kernels::moe_grad::spec(g, n))
        {
            return spec;
        }
        if !matches!(
            node.op,
            Op::Unary(_)
                | Op::Binary(_)
                | Op::Fused(_)
                | Op::RmsNorm { .. }
                | Op::Softmax { .. }
                | Op::MatMul
                | Op::Attention { .. }
                | Op::BatchMatMul
                | Op::WeightGrad
                | Op::Reduce { .. }
        ) {
            return Err(no("no kernel yet"));
        }
        let inputs: Vec<Ty> = g.inputs(n).iter().map(|&v| g.ty(v).clone()).collect();
        let Some(out) = node.outputs.first() else {
            return Err(no("no output"));
        };
        // Attention's second output, the log-sum-exp (f32), is written by the same kernel.
        let lse = matches!(node.op, Op::Attention { lse: true, .. }) && node.outputs.len() == 2 && node.outputs[1].dtype == DType::F32;
        if node.outputs.len() != 1 && !lse {
            return Err(no("more than one output"));
        }
        let elem =
            Elem::from_dtype(out.dtype).ok_or_else(|| no(&format!("result dtype {} (kernels hold f32, f16 or bf16)", out.dtype.name())))?;
        // A program over index tensors only (a one-hot `eq(indices, iota)` cast to floats).
        let int = |t: &Ty| matches!(t.dtype, DType::I32 | DType::I64);
        if let Op::Fused(k) = &node.op {
            if k.head.is_none() && !inputs.is_empty() && inputs.iter().all(int) {
                let ops = fused_ops(k, out.dtype).map_err(|r| no(&r))?;
                let program = ew_program(out, &inputs, &ops).map_err(|r| no(&r))?;
                return Ok(KernelSpec::ElementwiseI32 { elem, program });
            }
        }
        if let Some(t) = inputs.iter().find(|t| t.dtype != out.dtype) {
            return Err(no(&format!("input dtype {} differs from the result's {}", t.dtype.name(), out.dtype.name())));
        }
        match &node.op {
            Op::Unary(u) => {
                let program = ew_program(out, &inputs, &[ew_unary(*u, 0)]).map_err(|r| no(&r))?;
                Ok(KernelSpec::Elementwise { elem, program })
            }
            Op::Binary(b) => {
                let op = ew_binary(*b, 0, 1);
                let program = ew_program(out, &inputs, &[op]).map_err(|r| no(&r))?;
                Ok(KernelSpec::Elementwise { elem, program })
            }
            Op::Fused(k) => {
                if k.head.is_some() {
                    return Err(no("fused kernel with a matmul/rms_norm head"));
                }
                let ops = fused_ops(k, out.dtype).map_err(|r| no(&r))?;
                let program = ew_program(out, &inputs, &ops).map_err(|r| no(&r))?;
                Ok(KernelSpec::Elementwise { elem, program })
            }
            Op::RmsNorm { eps } => {
                if inputs[1].rank() != 1 {
                    return Err(no("gain of rank other than 1"));
                }
                Ok(KernelSpec::RmsNorm { elem, eps_bits: (eps.get() as f32).to_bits() })
            }
            Op::Softmax { axis } => {
                if *axis as usize + 1 != out.rank() {
                    return Err(no("softmax over an axis other than the last"));
                }
                Ok(KernelSpec::Softmax { elem })
            }
            Op::MatMul => Ok(KernelSpec::MatMul { elem, skinny: false }),
            Op::Reduce { op: ReduceOp::Sum, .. } => Ok(KernelSpec::Reduce { elem, mean: false }),
            Op::Reduce { op: ReduceOp::Mean, .. } => Ok(KernelSpec::Reduce { elem, mean: true }),
            Op::Attention { .. } => {
                let cfg = kernels::attention::config(&node.op, &inputs).map_err(|r| no(&r))?;
                Ok(KernelSpec::Attention { elem, cfg })
            }
            Op::BatchMatMul => Ok(KernelSpec::BatchMatMul { elem, rank: out.rank().saturating_sub(2) as u32, accumulate: false }),
            // `dyᵀ · x`, a batch matmul without batch axes (`attention::work_weight_grad`).
            Op::WeightGrad => Ok(KernelSpec::BatchMatMul { elem, rank: 0, accumulate: false }),
            _ => Err(no("no kernel yet")),
        }
    }

    /// A stable file and entry name: kind, dtype and, for configured kernels, a hash of
    /// the configuration (`ew_f32_1a2b3c4d5e6f7a8b`).
    pub fn name(&self) -> String {
        let h = || format!("{:016x}", fnv1a(format!("{self:?}").as_bytes()));
        match self {
            KernelSpec::Elementwise { elem, .. } => format!("ew_{}_{}", elem.name(), h()),
            KernelSpec::ElementwiseI32 { elem, .. } => format!("ew_i32_{}_{}", elem.name(), h()),
            KernelSpec::Reduce { elem, mean } => format!("reduce_{}_{}", if *mean { "mean" } else { "sum" }, elem.name()),
            KernelSpec::IotaI32 => "iota_i32".to_string(),
            KernelSpec::AdamW { grad } => format!("adamw_{}", grad.name()),
            KernelSpec::SumSquares { elem } => format!("sum_squares_{}", elem.name()),
            KernelSpec::SampleRows { elem, greedy } => format!("sample_rows_{}{}", elem.name(), if *greedy { "_greedy" } else { "" }),
            KernelSpec::MoeRouteGrad { elem, .. } => format!("moe_route_grad_{}_{}", elem.name(), h()),
            KernelSpec::MoeGrad { elem, weights, part } => {
                use kernels::moe_grad::MoeGradPart as P;
                let w = if weights == elem || *part != P::Mid { String::new() } else { format!("_w{}", weights.name()) };
                let part = match part {
                    P::Proj => "proj",
                    P::Mid => "mid",
                    P::DxRows => "dx_rows",
                    P::Dx => "dx",
                    P::Weights => "weights",
                };
                format!("moe_grad_{part}_{}{w}", elem.name())
            }
            KernelSpec::Copy { elem, rank } => format!("copy_{}_r{rank}", elem.name()),
            KernelSpec::CopyI32 { rank } => format!("copy_i32_r{rank}"),
            KernelSpec::NegI32 => "neg_i32".to_string(),
            KernelSpec::RmsNormGrad { elem, gain: false, .. } => format!("rms_norm_grad_rows_{}_{}", elem.name(), h()),
            KernelSpec::RmsNormGrad { elem, gain: true, .. } => format!("rms_norm_grad_gain_{}", elem.name()),
            KernelSpec::ScatterLinks => "scatter_links".to_string(),
            KernelSpec::ScatterRows { elem } => format!("scatter_rows_{}", elem.name()),
            KernelSpec::SwiGluGradEw { elem } => format!("swiglu_grad_ew_{}", elem.name()),
            KernelSpec::AttentionGrad { elem, part, .. } => {
                let part = match part {
                    kernels::attention_grad::AttnGradPart::Delta => "delta",
                    kernels::attention_grad::AttnGradPart::Dq => "dq",
                    kernels::attention_grad::AttnGradPart::Dkv => "dkv",
                };
                format!("attention_grad_{part}_{}_{}", elem.name(), h())
            }
            KernelSpec::Gather { elem } => format!("gather_{}", elem.name()),
            KernelSpec::Rope { elem, interleaved } => {
                format!("rope_{}_{}", elem.name(), if *interleaved { "interleaved" } else { "half_split" })
            }
            KernelSpec::MatMulEw { elem, skinny, .. } => format!("matmul_ew_{}{}_{}", elem.name(), skinny_suffix(*skinny), h()),
            KernelSpec::MatMulEwFrom { elem, head, skinny, .. } => {
                format!("matmul_ew_{}_from_{}{}_{}", elem.name(), head.name(), skinny_suffix(*skinny), h())
            }
            KernelSpec::RmsNormEw { elem, .. } => format!("rms_norm_ew_{}_{}", elem.name(), h()),
            KernelSpec::GateUp { elem, skinny } => format!("matmul_gate_up_{}{}", elem.name(), skinny_suffix(*skinny)),
            KernelSpec::Cast { from, to } => format!("cast_{}_{}", from.name(), to.name()),
            KernelSpec::RmsNorm { elem, .. } => format!("rms_norm_{}_{}", elem.name(), h()),
            KernelSpec::Softmax { elem } => format!("softmax_{}", elem.name()),
            KernelSpec::MatMul { elem, skinny } => format!("matmul_{}{}", elem.name(), skinny_suffix(*skinny)),
            KernelSpec::Attention { elem, .. } => format!("attention_{}_{}", elem.name(), h()),
            KernelSpec::AttentionCombine { elem } => format!("attention_combine_{}", elem.name()),
            KernelSpec::BatchMatMul { elem, rank, accumulate } => {
                format!("batch_matmul_{}_r{rank}{}", elem.name(), if *accumulate { "_acc" } else { "" })
            }
            KernelSpec::MoeRoute { elem, .. } => format!("moe_route_{}_{}", elem.name(), h()),
            KernelSpec::TopK { elem } => format!("top_k_{}", elem.name()),
            KernelSpec::MoeDispatch => "moe_dispatch".to_string(),
            KernelSpec::MoeGateUp { elem } => format!("moe_gate_up_{}", elem.name()),
            KernelSpec::MoeDown { elem } => format!("moe_down_{}", elem.name()),
            KernelSpec::MoeCombine { elem, weights } => format!("moe_combine_{}_{}", elem.name(), weights.name()),
            KernelSpec::Label { elem, kind, has_ignore } => {
                let kind = match kind {
                    kernels::loss::LabelKernel::LogProb => "logprob",
                    kernels::loss::LabelKernel::Mean => "mean",
                    kernels::loss::LabelKernel::Coef => "coef",
                    kernels::loss::LabelKernel::Grad { per_row: true } => "grad_rows",
                    kernels::loss::LabelKernel::Grad { per_row: false } => "grad",
                };
                format!("label_{kind}_{}{}", elem.name(), if *has_ignore { "_ignore" } else { "" })
            }
        }
    }

    /// Whether `target` has every element type this kernel uses, or why not.
    pub fn check_target(&self, target: Target) -> Result<(), String> {
        self.elem().on(target)?;
        match self {
            KernelSpec::Cast { from, .. } => from.on(target),
            KernelSpec::MoeCombine { weights, .. } => weights.on(target),
            KernelSpec::MatMulEwFrom { head, .. } => head.on(target),
            KernelSpec::MoeGrad { weights, .. } => weights.on(target),
            _ => Ok(()),
        }
    }

    pub fn elem(&self) -> Elem {
        match self {
            KernelSpec::Elementwise { elem, .. }
            | KernelSpec::ElementwiseI32 { elem, .. }
            | KernelSpec::Reduce { elem, .. }
            | KernelSpec::MoeRouteGrad { elem, .. }
            | KernelSpec::MoeGrad { elem, .. }
            | KernelSpec::RmsNorm { elem, .. }
            | KernelSpec::Copy { elem, .. }
            | KernelSpec::Gather { elem }
            | KernelSpec::Rope { elem, .. }
            | KernelSpec::MatMulEw { elem, .. }
            | KernelSpec::MatMulEwFrom { elem, .. }
            | KernelSpec::RmsNormEw { elem, .. }
            | KernelSpec::GateUp { elem, .. }
            | KernelSpec::Cast { to: elem, .. }
            | KernelSpec::Softmax { elem }
            | KernelSpec::MatMul { elem, .. }
            | KernelSpec::Attention { elem, .. }
            | KernelSpec::AttentionCombine { elem }
            | KernelSpec::BatchMatMul { elem, .. }
            | KernelSpec::MoeRoute { elem, .. }
            | KernelSpec::TopK { elem }
            | KernelSpec::MoeGateUp { elem }
            | KernelSpec::MoeDown { elem }
            | KernelSpec::MoeCombine { elem, .. }
            | KernelSpec::Label { elem, .. }
            | KernelSpec::RmsNormGrad { elem, .. }
            | KernelSpec::ScatterRows { elem }
            | KernelSpec::SwiGluGradEw { elem }
            | KernelSpec::AttentionGrad { elem, .. } => *elem,
            // Integer kernels: nominally f32 (the element type picks no code of theirs).
            KernelSpec::MoeDispatch | KernelSpec::CopyI32 { .. } | KernelSpec::NegI32 | KernelSpec::ScatterLinks | KernelSpec::IotaI32 => {
                Elem::F32
            }
            KernelSpec::AdamW { grad: elem } | KernelSpec::SumSquares { elem } | KernelSpec::SampleRows { elem, .. } => *elem,
        }
    }
}

/// The name suffix of a matmul's skinny form.
fn skinny_suffix(skinny: bool) -> &'static str {
    if skinny {
        "_skinny"
    } else {
        ""
    }
}

fn ew_unary(u: UnaryOp, a: u32) -> EwOp {
    match u {
        UnaryOp::Neg => EwOp::Neg(a),
        UnaryOp::Abs => EwOp::Abs(a),
        UnaryOp::Exp => EwOp::Exp(a),
        UnaryOp::Log => EwOp::Log(a),
        UnaryOp::Sqrt => EwOp::Sqrt(a),
        UnaryOp::Rsqrt => EwOp::Rsqrt(a),
        UnaryOp::Recip => EwOp::Recip(a),
        UnaryOp::Square => EwOp::Square(a),
        UnaryOp::Sigmoid => EwOp::Sigmoid(a),
        UnaryOp::Silu => EwOp::Silu(a),
        UnaryOp::Tanh => EwOp::Tanh(a),
        UnaryOp::Sin => EwOp::Sin(a),
        UnaryOp::Cos => EwOp::Cos(a),
    }
}

fn ew_binary(b: BinaryOp, x: u32, y: u32) -> EwOp {
    match b {
        BinaryOp::Add => EwOp::Add(x, y),
        BinaryOp::Sub => EwOp::Sub(x, y),
        BinaryOp::Mul => EwOp::Mul(x, y),
        BinaryOp::Div => EwOp::Div(x, y),
        BinaryOp::Max => EwOp::Max(x, y),
        BinaryOp::Min => EwOp::Min(x, y),
        BinaryOp::Pow => EwOp::Pow(x, y),
        BinaryOp::Lt => EwOp::Lt(x, y),
        BinaryOp::Eq => EwOp::Eq(x, y),
    }
}

/// The register program of a head-less fused kernel: registers `0..num_inputs` are the
/// loads, then one per step. Casts are only supported as copies: the program has one
/// float type, so a cast to another dtype (a rounding step) is refused.
fn fused_ops(k: &FusedKernel, dtype: DType) -> Result<Vec<EwOp>, String> {
    let n = k.num_inputs() as u32;
    let reg = |o: &Operand| match o {
        Operand::Input(i) => Ok(*i as u32),
        Operand::Step(j) => Ok(n + *j as u32),
        Operand::Head => Err("a step reads a head the kernel lacks".to_string()),
    };
    let mut ops = Vec::with_capacity(k.steps.len());
    for s in &k.steps {
        let a: Vec<u32> = s.args.iter().map(reg).collect::<Result<_, _>>()?;
        ops.push(match (s.op, a.as_slice()) {
            (StepOp::Unary(u), [x]) => ew_unary(u, *x),
            (StepOp::Binary(b), [x, y]) => ew_binary(b, *x, *y),
            (StepOp::Select, [c, x, y]) => EwOp::Select(*c, *x, *y),
            (StepOp::Cast(to), [x]) if to == dtype => EwOp::Copy(*x),
            (StepOp::Cast(to), _) => return Err(format!("a cast to {} inside an {} program", to.name(), dtype.name())),
            _ => return Err(format!("step {} with {} operands", s.op.op().name(), a.len())),
        });
    }
    if ops.is_empty() {
        return Err("an empty program".into());
    }
    Ok(ops)
}

/// The program for a node computing `ops` over `inputs` into `out`: how each input is
/// read, decided from the symbolic shapes (equal shape: direct; rank 0 or all-ones:
/// scalar; else strided broadcast).
fn ew_program(out: &Ty, inputs: &[Ty], ops: &[EwOp]) -> Result<EwProgram, String> {
    let rank = out.rank();
    let mut access = Vec::with_capacity(inputs.len());
    for t in inputs {
        if t.rank() > rank {
            return Err("an input of higher rank than the result".into());
        }
        access.push(if t.shape == out.shape {
            Access::Direct
        } else if t.shape.0.iter().all(|d| d.is(1)) {
            Access::Scalar
        } else {
            Access::Strided
        });
    }
    Ok(EwProgram { rank: rank as u32, inputs: access, ops: ops.to_vec() })
}

/// The cube shape each kernel is launched with, `[x, y, z]` units (the runtimes use the
/// same).
pub fn cube_shape(spec: &KernelSpec) -> [u32; 3] {
    match spec {
        KernelSpec::Elementwise { .. } | KernelSpec::ElementwiseI32 { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::Reduce { .. } | KernelSpec::IotaI32 | KernelSpec::MoeRouteGrad { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::AdamW { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::SumSquares { .. } | KernelSpec::SampleRows { .. } => [kernels::ROW_BLOCK, 1, 1],
        KernelSpec::MoeGrad { part: kernels::moe_grad::MoeGradPart::Mid, .. } => [kernels::ROW_BLOCK, 1, 1],
        KernelSpec::MoeGrad { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::Copy { .. } | KernelSpec::Gather { .. } | KernelSpec::Rope { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::CopyI32 { .. } | KernelSpec::NegI32 => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::RmsNormGrad { gain: false, .. } => [kernels::ROW_BLOCK, 1, 1],
        KernelSpec::RmsNormGrad { gain: true, .. }
        | KernelSpec::ScatterLinks
        | KernelSpec::ScatterRows { .. }
        | KernelSpec::SwiGluGradEw { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::Cast { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::RmsNormEw { .. } => [kernels::ROW_BLOCK, 1, 1],
        KernelSpec::MatMulEw { .. } | KernelSpec::MatMulEwFrom { .. } | KernelSpec::GateUp { .. } => {
            [kernels::MM_UNITS, kernels::MM_UNITS, 1]
        }
        KernelSpec::RmsNorm { .. } | KernelSpec::Softmax { .. } => [kernels::ROW_BLOCK, 1, 1],
        KernelSpec::MatMul { .. } => [kernels::MM_UNITS, kernels::MM_UNITS, 1],
        KernelSpec::BatchMatMul { .. } => [kernels::TILE, kernels::TILE, 1],
        KernelSpec::Attention { .. } | KernelSpec::AttentionGrad { .. } => [kernels::attention::ATTN_BLOCK, 1, 1],
        KernelSpec::AttentionCombine { .. } => [kernels::EW_BLOCK, 1, 1],
        KernelSpec::MoeRoute { .. } | KernelSpec::TopK { .. } | KernelSpec::MoeDispatch | KernelSpec::MoeCombine { .. } => {
            [kernels::moe::SELECT_BLOCK, 1, 1]
        }
        KernelSpec::MoeGateUp { .. } | KernelSpec::MoeDown { .. } => [kernels::TILE, kernels::TILE, 1],
        KernelSpec::Label { .. } => [kernels::ROW_BLOCK, 1, 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
