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

/// What a kernel states about itself: everything but its code, which is
/// `kernel_definition`'s (with the `kernels` feature). [`KernelSpec::about`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct About {
    /// The file and entry name, before the configuration hash when there is one.
    pub stem: String,
    /// Whether [`KernelSpec::name`] ends with a hash of the configuration (a kernel
    /// configured by more than its stem says: a program, a tiling, an epsilon).
    pub hashed: bool,
    /// The float type of the kernel's generic `F` (integer-only kernels: nominally `f32`,
    /// which picks none of their code).
    pub elem: Elem,
    /// A second float type it reads or writes (a cast's source, a fused head's operands,
    /// gate weights), which the target must have too.
    pub other: Option<Elem>,
    /// The cube shape it launches with, `[x, y, z]` units (the runtimes and `plan.json`
    /// use the same).
    pub cube: [u32; 3],
}

impl About {
    fn new(stem: String, elem: Elem, cube: [u32; 3]) -> About {
        About { stem, hashed: false, elem, other: None, cube }
    }
    fn hashed(self) -> About {
        About { hashed: true, ..self }
    }
    fn also(self, other: Elem) -> About {
        About { other: Some(other), ..self }
    }
}

impl KernelSpec {
    /// Each kernel's name, element types and cube shape, in one match.
    pub fn about(&self) -> About {
        use KernelSpec as K;
        const EW: [u32; 3] = [EW_BLOCK, 1, 1];
        const ROW: [u32; 3] = [ROW_BLOCK, 1, 1];
        const MM: [u32; 3] = [MM_UNITS, MM_UNITS, 1];
        const TILED: [u32; 3] = [TILE, TILE, 1];
        const SELECT: [u32; 3] = [SELECT_BLOCK, 1, 1];
        const ATTN: [u32; 3] = [ATTN_BLOCK, 1, 1];
        let f32 = Elem::F32;
        let a = About::new;
        match self {
            K::Elementwise { elem, .. } => a(format!("ew_{}", elem.name()), *elem, EW).hashed(),
            K::ElementwiseI32 { elem, .. } => a(format!("ew_i32_{}", elem.name()), *elem, EW).hashed(),
            K::Reduce { elem, mean } => a(format!("reduce_{}_{}", if *mean { "mean" } else { "sum" }, elem.name()), *elem, EW),
            K::IotaI32 => a("iota_i32".into(), f32, EW),
            K::AdamW { grad } => a(format!("adamw_{}", grad.name()), *grad, EW),
            K::SumSquares { elem } => a(format!("sum_squares_{}", elem.name()), *elem, ROW),
            K::SampleRows { elem, greedy } => a(format!("sample_rows_{}{}", elem.name(), if *greedy { "_greedy" } else { "" }), *elem, ROW),
            K::MoeRouteGrad { elem, .. } => a(format!("moe_route_grad_{}", elem.name()), *elem, EW).hashed(),
            K::MoeGrad { elem, weights, part } => {
                use MoeGradPart as P;
                let w = if weights == elem || *part != P::Mid { String::new() } else { format!("_w{}", weights.name()) };
                let (part, cube) = match part {
                    P::Proj => ("proj", EW),
                    P::Mid => ("mid", ROW),
                    P::DxRows => ("dx_rows", EW),
                    P::Dx => ("dx", EW),
                    P::Weights => ("weights", EW),
                };
                a(format!("moe_grad_{part}_{}{w}", elem.name()), *elem, cube).also(*weights)
            }
            K::RmsNorm { elem, .. } => a(format!("rms_norm_{}", elem.name()), *elem, ROW).hashed(),
            K::Softmax { elem } => a(format!("softmax_{}", elem.name()), *elem, ROW),
            K::MatMul { elem, skinny } => a(format!("matmul_{}{}", elem.name(), skinny_suffix(*skinny)), *elem, MM),
            K::Copy { elem, rank } => a(format!("copy_{}_r{rank}", elem.name()), *elem, EW),
            K::CopyI32 { rank } => a(format!("copy_i32_r{rank}"), f32, EW),
            K::NegI32 => a("neg_i32".into(), f32, EW),
            K::Gather { elem } => a(format!("gather_{}", elem.name()), *elem, EW),
            K::Rope { elem, interleaved } => {
                a(format!("rope_{}_{}", elem.name(), if *interleaved { "interleaved" } else { "half_split" }), *elem, EW)
            }
            K::MatMulEw { elem, skinny, .. } => a(format!("matmul_ew_{}{}", elem.name(), skinny_suffix(*skinny)), *elem, MM).hashed(),
            K::MatMulEwFrom { elem, head, skinny, .. } => {
                a(format!("matmul_ew_{}_from_{}{}", elem.name(), head.name(), skinny_suffix(*skinny)), *elem, MM).hashed().also(*head)
            }
            K::RmsNormEw { elem, .. } => a(format!("rms_norm_ew_{}", elem.name()), *elem, ROW).hashed(),
            K::GateUp { elem, skinny } => a(format!("matmul_gate_up_{}{}", elem.name(), skinny_suffix(*skinny)), *elem, MM),
            K::Cast { from, to } => a(format!("cast_{}_{}", from.name(), to.name()), *to, EW).also(*from),
            K::Attention { elem, .. } => a(format!("attention_{}", elem.name()), *elem, ATTN).hashed(),
            K::AttentionCombine { elem } => a(format!("attention_combine_{}", elem.name()), *elem, EW),
            K::BatchMatMul { elem, rank, accumulate } => {
                a(format!("batch_matmul_{}_r{rank}{}", elem.name(), if *accumulate { "_acc" } else { "" }), *elem, TILED)
            }
            K::MoeRoute { elem, .. } => a(format!("moe_route_{}", elem.name()), *elem, SELECT).hashed(),
            K::TopK { elem } => a(format!("top_k_{}", elem.name()), *elem, SELECT),
            K::MoeDispatch => a("moe_dispatch".into(), f32, SELECT),
            K::MoeGateUp { elem } => a(format!("moe_gate_up_{}", elem.name()), *elem, TILED),
            K::MoeDown { elem } => a(format!("moe_down_{}", elem.name()), *elem, TILED),
            K::MoeCombine { elem, weights } => a(format!("moe_combine_{}_{}", elem.name(), weights.name()), *elem, SELECT).also(*weights),
            K::Label { elem, kind, has_ignore } => {
                let kind = match kind {
                    LabelKernel::LogProb => "logprob",
                    LabelKernel::Mean => "mean",
                    LabelKernel::Coef => "coef",
                    LabelKernel::Grad { per_row: true } => "grad_rows",
                    LabelKernel::Grad { per_row: false } => "grad",
                };
                a(format!("label_{kind}_{}{}", elem.name(), if *has_ignore { "_ignore" } else { "" }), *elem, ROW)
            }
            K::RmsNormGrad { elem, gain: false, .. } => a(format!("rms_norm_grad_rows_{}", elem.name()), *elem, ROW).hashed(),
            K::RmsNormGrad { elem, gain: true, .. } => a(format!("rms_norm_grad_gain_{}", elem.name()), *elem, EW),
            K::ScatterLinks => a("scatter_links".into(), f32, EW),
            K::ScatterRows { elem } => a(format!("scatter_rows_{}", elem.name()), *elem, EW),
            K::SwiGluGradEw { elem } => a(format!("swiglu_grad_ew_{}", elem.name()), *elem, EW),
            K::AttentionGrad { elem, part, .. } => {
                let part = match part {
                    AttnGradPart::Delta => "delta",
                    AttnGradPart::Dq => "dq",
                    AttnGradPart::Dkv => "dkv",
                };
                a(format!("attention_grad_{part}_{}", elem.name()), *elem, ATTN).hashed()
            }
        }
    }

    /// A stable file and entry name: kind, dtype and, for configured kernels, a hash of
    /// the configuration (`ew_f32_1a2b3c4d5e6f7a8b`).
    pub fn name(&self) -> String {
        let a = self.about();
        if a.hashed {
            format!("{}_{:016x}", a.stem, fnv1a(format!("{self:?}").as_bytes()))
        } else {
            a.stem
        }
    }

    /// Whether `target` has every element type this kernel uses, or why not.
    pub fn check_target(&self, target: Target) -> Result<(), String> {
        let a = self.about();
        a.elem.on(target)?;
        a.other.map_or(Ok(()), |o| o.on(target))
    }

    /// The float type of the kernel's generic `F`.
    pub fn elem(&self) -> Elem {
        self.about().elem
    }

    /// The cube shape it launches with, `[x, y, z]` units.
    pub fn cube_shape(&self) -> [u32; 3] {
        self.about().cube
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

// ---- cube shapes (the `#[cube]` kernels are written for these)

/// Units per cube of the elementwise kernels.
pub const EW_BLOCK: u32 = 256;
/// Units per cube of the row kernels; a power of two so the tree reduction halves evenly.
pub const ROW_BLOCK: u32 = 128;
/// Side of the square shared-memory tiles of the batched matmul and the grouped expert
/// GEMMs (one output per unit).
pub const TILE: u32 = 16;
/// Units per side of the tiled matmuls' cubes (`MM_UNITS`² units per cube).
pub const MM_UNITS: u32 = 8;
/// Units per cube of the router, top-k, dispatch and combine kernels; a power of two for
/// the tree reductions and the prefix sum.
pub const SELECT_BLOCK: u32 = 128;

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
