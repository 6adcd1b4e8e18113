//! What a kernel is, as data: its element type ([`Elem`]), the target language
//! ([`Target`]), and [`KernelSpec`] with every configuration a kernel is specialised on
//! (an elementwise program, attention's tiling, a router's settings). Nothing here
//! depends on CubeCL or on the rest of codegen: the launch ABI ([`super::launch`]) names
//! a kernel by its spec, the kernel modules implement the specs, and [`super::select`]
//! picks them for IR nodes.

use crate::ir::DType;

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
    /// [`super::kernels::fused_ew`] running `program`.
    Elementwise { elem: Elem, program: EwProgram },
    /// [`super::kernels::fused_ew`] over `i32` inputs (index tensors), the result in `elem`.
    ElementwiseI32 { elem: Elem, program: EwProgram },
    /// [`super::kernels::reduce::reduce_axis`]: a sum, or with `mean` a mean, along one axis.
    Reduce { elem: Elem, mean: bool },
    /// [`super::kernels::reduce::iota`] of `i32`s.
    IotaI32,
    /// [`super::kernels::optim::adamw`]: one AdamW update of an `f32` master weight in place from a
    /// gradient in `grad` (no IR op: a training runtime launches it).
    AdamW { grad: Elem },
    /// [`super::kernels::optim::sum_squares`]: partial sums of squares (in `f32`) of a tensor.
    SumSquares { elem: Elem },
    /// [`super::kernels::sample::sample_rows`]: the next token of each row of logits (and its
    /// log-probability and the entropy), greedy or by a Gumbel-max draw.
    SampleRows { elem: Elem, greedy: bool },
    /// [`super::kernels::grad::moe_route_grad`].
    MoeRouteGrad { elem: Elem, cfg: RouteGradConfig },
    /// One launch of the routed experts' backward ([`super::kernels::moe_grad`]).
    MoeGrad { elem: Elem, weights: Elem, part: MoeGradPart },
    /// [`super::kernels::rms_norm`] over the last axis; `eps` as `f32` bits.
    RmsNorm { elem: Elem, eps_bits: u32 },
    /// [`super::kernels::softmax`] over the last axis.
    Softmax { elem: Elem },
    /// [`super::kernels::matmul`]: `x[.., k] · w[n, k]ᵀ`; `skinny`: 8-row tiles, for few rows.
    MatMul { elem: Elem, skinny: bool },
    /// [`super::kernels::movement::strided_copy`] over a box of `rank` axes: permute, slice,
    /// broadcast, and concat / cache_append (one launch per input).
    Copy { elem: Elem, rank: u32 },
    /// [`super::kernels::movement::strided_copy`] over `i32` index tensors (labels, positions).
    CopyI32 { rank: u32 },
    /// [`super::kernels::movement::neg_i32`].
    NegI32,
    /// [`super::kernels::movement::gather`]: rows of a table by `i32` index.
    Gather { elem: Elem },
    /// [`super::kernels::rope::rope`], adjacent pairs when `interleaved`, else `rotate_half`.
    Rope { elem: Elem, interleaved: bool },
    /// [`super::kernels::heads::matmul_ew`]: a fused matmul head and its elementwise epilogue.
    MatMulEw { elem: Elem, epilogue: Epilogue, skinny: bool },
    /// [`super::kernels::heads::matmul_ew`] whose head multiplies `head` operands (f32 gradients)
    /// into a result of `elem`.
    MatMulEwFrom { elem: Elem, head: Elem, epilogue: Epilogue, skinny: bool },
    /// [`super::kernels::heads::rms_norm_ew`]: a fused rms_norm head and its epilogue.
    RmsNormEw { elem: Elem, eps_bits: u32, epilogue: Epilogue },
    /// [`super::kernels::heads::matmul_gate_up`]: `silu(x·gateᵀ)·(x·upᵀ)`, SwiGLU's first launch.
    GateUp { elem: Elem, skinny: bool },
    /// [`super::kernels::movement::convert`] from one float element type to another.
    Cast { from: Elem, to: Elem },
    /// [`super::kernels::attention::attention`]: flash attention, one cube per (query block,
    /// kv head, batch).
    Attention { elem: Elem, cfg: AttentionConfig },
    /// [`super::kernels::attention::attention_combine`]: split-K attention's chunks merged.
    AttentionCombine { elem: Elem },
    /// [`super::kernels::attention::batch_matmul`]: `a[B.., m, k] · b[B.., k, n]` over `rank`
    /// batch axes, each operand read through a strided view.
    /// With `accumulate` it adds the product to the output's contents.
    BatchMatMul { elem: Elem, rank: u32, accumulate: bool },
    /// [`super::kernels::moe::moe_route`]: the MoE router, one cube per token.
    MoeRoute { elem: Elem, cfg: RouteConfig },
    /// [`super::kernels::moe::top_k`] over the last axis (values and i32 indices).
    TopK { elem: Elem },
    /// [`super::kernels::moe::moe_dispatch`]: sorts (token, slot) pairs by expert. Integers
    /// only; its [`KernelSpec::elem`] is nominally `f32`.
    MoeDispatch,
    /// [`super::kernels::moe::moe_gate_up`]: grouped `silu(x·gateᵀ)·(x·upᵀ)` over sorted rows.
    MoeGateUp { elem: Elem },
    /// [`super::kernels::moe::moe_down`]: grouped `act·downᵀ` over sorted rows.
    MoeDown { elem: Elem },
    /// [`super::kernels::moe::moe_combine`]: each token's rows times its gate weights (of
    /// `weights`' float type), summed.
    MoeCombine { elem: Elem, weights: Elem },
    /// One of [`super::kernels::loss`]'s label kernels over logits of `elem` (the reductions
    /// `Mean` and `Coef` read only `f32`s and labels); `has_ignore`: rows whose label is
    /// the ignore index count for nothing.
    Label { elem: Elem, kind: LabelKernel, has_ignore: bool },
    /// [`super::kernels::grad::rms_norm_grad_rows`] (`dx` and each row's `r`), or with `gain`
    /// [`super::kernels::grad::rms_norm_grad_gain`] (`dgain`); `eps` as `f32` bits.
    RmsNormGrad { elem: Elem, eps_bits: u32, gain: bool },
    /// [`super::kernels::grad::scatter_links`]: integers only (nominally `f32`).
    ScatterLinks,
    /// [`super::kernels::grad::scatter_rows`]: scatter-add's accumulation.
    ScatterRows { elem: Elem },
    /// [`super::kernels::grad::swiglu_grad_ew`]: the elementwise middle of the SwiGLU backward.
    SwiGluGradEw { elem: Elem },
    /// One launch of the attention backward ([`super::kernels::attention_grad`]).
    AttentionGrad { elem: Elem, cfg: AttnGradConfig, part: AttnGradPart },
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
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

impl KernelSpec {
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
                use MoeGradPart as P;
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
                    AttnGradPart::Delta => "delta",
                    AttnGradPart::Dq => "dq",
                    AttnGradPart::Dkv => "dkv",
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
                    LabelKernel::LogProb => "logprob",
                    LabelKernel::Mean => "mean",
                    LabelKernel::Coef => "coef",
                    LabelKernel::Grad { per_row: true } => "grad_rows",
                    LabelKernel::Grad { per_row: false } => "grad",
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

// ---- from kernels: `kernels.rs`

/// How the elementwise kernel reads one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    /// The input has the output's shape: element `pos` is at `pos`.
    Direct,
    /// One element, read by every unit (a rank-0 input such as a constant).
    Scalar,
    /// Broadcast: the offset is the output coordinate dotted with the input's strides
    /// (0 along broadcast axes), read from the `layout` buffer.
    Strided,
}

/// One instruction of the elementwise program; register `k` is the `k`-th value the
/// program produced (the inputs' loads come first, one register per input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EwOp {
    Neg(u32),
    Abs(u32),
    Exp(u32),
    Log(u32),
    Sqrt(u32),
    Rsqrt(u32),
    Recip(u32),
    Square(u32),
    Sigmoid(u32),
    Silu(u32),
    Tanh(u32),
    Sin(u32),
    Cos(u32),
    Add(u32, u32),
    Sub(u32, u32),
    Mul(u32, u32),
    Div(u32, u32),
    Max(u32, u32),
    Min(u32, u32),
    Pow(u32, u32),
    /// `1` where `a < b`, else `0`: comparisons stay in the float registers and are only
    /// consumed by [`EwOp::Select`] inside the program.
    Lt(u32, u32),
    Eq(u32, u32),
    /// `c != 0 ? a : b`.
    Select(u32, u32, u32),
    /// A copy (a cast to the dtype the program already computes in).
    Copy(u32),
}

/// The comptime configuration of [`super::kernels::fused_ew`]: rank of the output, how each input is
/// read, and the instructions. The result is the last register.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EwProgram {
    pub rank: u32,
    pub inputs: Vec<Access>,
    pub ops: Vec<EwOp>,
}

// ---- from kernels: `kernels/attention.rs`

/// Units per attention cube (one dimension).
pub const ATTN_BLOCK: u32 = 128;

/// Columns of q and k staged per step of the score product.
pub const DK_CHUNK: u32 = 64;

/// Most query rows per cube: 16 rows × 512 value columns is 64 f32 accumulators per unit.
pub const ATTN_MAX_ROWS: u32 = 16;

/// Most keys per tile.
pub const ATTN_MAX_KEYS: u32 = 16;

/// Shared-memory elements the V tile may take (16 KiB of f32): the tile shrinks to fit
/// wide values (8 keys at dv = 512) so the whole buffer stays within the 32 KiB that
/// lavapipe, and every GPU, offers.
const V_TILE_BUDGET: u32 = 4096;

/// Shared-memory elements (f32) a cube may use at most.
const SHARED_LIMIT: u32 = 8192;

/// Keys per chunk of a split-K attention (a multiple of every tile's keys).
pub const SPLIT_KEYS: u32 = 512;

/// Split-K runs when the batch is at most this and the keys more than two chunks: then a
/// decode step has too few cubes for a GPU, and the partial results stay small.
pub const SPLIT_MAX_BATCH: i64 = 8;

/// The comptime configuration of [`super::kernels::attention::attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttentionConfig {
    /// Key (and query) head size.
    pub dk: u32,
    /// Value head size.
    pub dv: u32,
    /// Query heads per kv head.
    pub group: u32,
    /// Query rows per cube.
    pub rows: u32,
    /// Keys per tile.
    pub keys: u32,
    /// The softmax scale, as `f32` bits.
    pub scale_bits: u32,
    pub causal: bool,
    pub masked: bool,
    /// Also write each row's log-sum-exp (`[b, sq, heads]`, f32): the forward of a
    /// training step, which the backward recomputes the probabilities from.
    pub lse: bool,
    /// Key columns read from `k`; the rest (`dk - split`) come from `k2`. Absorbed MLA's
    /// key is the latent cache beside the rope-key cache, read where each lies instead of
    /// concatenated per step. `dk` when the key is one buffer.
    pub split: u32,
    /// Split-K (flash-decoding): the keys are cut into chunks of [`SPLIT_KEYS`], one cube
    /// per (row block, kv head, batch × chunk), each writing its normalised partial output
    /// and log-sum-exp to `part`; `attention_combine` merges them. A decode step over a
    /// long cache at a small batch has few cubes otherwise.
    pub key_split: bool,
}

impl AttentionConfig {
    /// The configuration for head sizes `dk`, `dv`, `group` query heads per kv head and,
    /// when the query length is a constant (decode), `sq`; or why there is none.
    pub fn new(dk: u32, dv: u32, group: u32, sq: Option<u32>, scale: f32, causal: bool, masked: bool) -> Result<Self, String> {
        if dk == 0 || dv == 0 || group == 0 {
            return Err(format!("empty heads (dk {dk}, dv {dv}, group {group})"));
        }
        // A short constant query (decode: sq·group rows) takes a cube of just that many rows.
        let rows = sq.map_or(ATTN_MAX_ROWS, |s| s.saturating_mul(group).clamp(1, ATTN_MAX_ROWS));
        // The largest power of two ≤ ATTN_MAX_KEYS whose V tile fits the budget.
        let mut keys = ATTN_MAX_KEYS;
        while keys > 1 && keys * dv > V_TILE_BUDGET {
            keys /= 2;
        }
        let c = AttentionConfig {
            dk,
            dv,
            group,
            rows,
            keys,
            scale_bits: scale.to_bits(),
            causal,
            masked,
            lse: false,
            split: dk,
            key_split: false,
        };
        if c.shared_len() > SHARED_LIMIT {
            return Err(format!("value head size {dv} needs more than {} KiB of shared memory", SHARED_LIMIT * 4 / 1024));
        }
        Ok(c)
    }
    /// Score chunks per tile.
    pub fn chunks(&self) -> u32 {
        self.dk.div_ceil(DK_CHUNK)
    }
    /// (row, key) scores per unit.
    pub fn scores_per_unit(&self) -> u32 {
        (self.rows * self.keys).div_ceil(ATTN_BLOCK)
    }
    /// (row, column) output accumulators per unit.
    pub fn outs_per_unit(&self) -> u32 {
        (self.rows * self.dv).div_ceil(ATTN_BLOCK)
    }
    /// Shared layout: the q chunk `[rows][DK_CHUNK]` at 0 and the k chunk `[keys][DK_CHUNK]`
    /// after it, or (aliasing both) the V tile `[keys][dv]`; then the scores.
    pub fn scores_at(&self) -> u32 {
        ((self.rows + self.keys) * DK_CHUNK).max(self.keys * self.dv)
    }
    /// Then four per-row statistics: the running max, sum, a seen-any-key flag and the
    /// current tile's rescale factor, `rows` each.
    pub fn stats_at(&self) -> u32 {
        self.scores_at() + self.rows * self.keys
    }
    pub fn shared_len(&self) -> u32 {
        self.stats_at() + 4 * self.rows
    }
}

// ---- from kernels: `kernels/attention_grad.rs`

/// The comptime configuration of the backward kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttnGradConfig {
    pub dk: u32,
    pub dv: u32,
    /// Query heads per kv head.
    pub group: u32,
    pub scale_bits: u32,
    pub causal: bool,
    pub masked: bool,
}

impl AttnGradConfig {
    /// Columns of `dk` / `dv` each unit accumulates.
    pub fn dk_per_unit(&self) -> u32 {
        self.dk.div_ceil(ATTN_BLOCK)
    }
    pub fn dv_per_unit(&self) -> u32 {
        self.dv.div_ceil(ATTN_BLOCK)
    }
}

/// Which launch of the backward a [`KernelSpec::AttentionGrad`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttnGradPart {
    Delta,
    Dq,
    Dkv,
}

// ---- from kernels: `kernels/grad.rs`

/// The comptime configuration of [`super::kernels::grad::moe_route_grad`], from the router's
/// [`crate::ir::Routing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteGradConfig {
    pub experts: u32,
    pub top_k: u32,
    pub sigmoid: bool,
    pub normalize: bool,
    /// The final factor, as `f32` bits.
    pub scale_bits: u32,
}

// ---- from kernels: `kernels/heads.rs`

/// The elementwise program that follows a head: register 0 is the head's value,
/// register `1 + l` is load `l` (node input `loads[l].0`, read as `loads[l].1`), then one
/// register per op; the result is the last register.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epilogue {
    /// Rank of the output (the strided loads walk this many axes).
    pub rank: u32,
    pub loads: Vec<(u32, Access)>,
    pub ops: Vec<EwOp>,
}

// ---- from kernels: `kernels/loss.rs`

/// Which of this module's kernels a [`KernelSpec::Label`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LabelKernel {
    LogProb,
    Mean,
    Coef,
    Grad { per_row: bool },
}

// ---- from kernels: `kernels/moe.rs`

/// The router's comptime configuration, from [`crate::ir::Routing`] and the expert count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteConfig {
    pub experts: u32,
    pub top_k: u32,
    /// Sigmoid scores (else softmax over the experts).
    pub sigmoid: bool,
    /// A bias input is added to the scores for choosing only.
    pub bias: bool,
    /// Expert groups (1: no group-limited routing) and how many are kept.
    pub groups: u32,
    pub groups_kept: u32,
    /// Groups score the sum of their two best choices (else their best).
    pub top2_sum: bool,
    pub normalize: bool,
    /// The final factor, as `f32` bits.
    pub scale_bits: u32,
}

// ---- from kernels: `kernels/moe_grad.rs`

/// Which launch of the expert backward a [`KernelSpec::MoeGrad`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MoeGradPart {
    Proj,
    Mid,
    DxRows,
    Dx,
    Weights,
}
