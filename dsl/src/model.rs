//! The resolved model: what a spec means once `extends`, `include` and documented
//! defaults are applied and every consistency rule has been checked.
//!
//! Everything downstream (stats, lowering, checkpoint loading) reads these types and never
//! the AST. A `Model` that came out of [`crate::resolve`] is internally consistent: heads
//! divide, ranges cover the layers exactly, experts per token fit, and every dimension is
//! positive and bounded (see [`crate::resolve::LIMITS`]), so consumers may compute with it
//! without further checks.

use serde::Serialize;

/// One architecture, fully resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Model {
    /// The name after `model` in the spec.
    pub name: String,
    /// Vocabulary size: rows of the embedding table and of the output head.
    pub vocab: u64,
    /// Model (residual stream) width.
    pub hidden: u64,
    /// Number of transformer layers in the main model (MTP modules not included).
    pub layers: u64,
    /// Storage and compute dtype of weights and activations.
    pub dtype: DType,
    /// Whether the output head reuses the input embedding table.
    pub tie_embeddings: bool,
    /// RMSNorm epsilon of the per-layer and final norms.
    pub norm_eps: f64,
    pub attention: Attention,
    pub rope: Rope,
    /// Feed-forward blocks; each owns a set of layers, together they cover `0..layers`
    /// exactly once. Kept in spec order.
    pub ffn: Vec<FfnBlock>,
    /// Multi-token prediction; `None` when the spec has no `mtp` section.
    pub mtp: Option<Mtp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// FP8 e4m3 (weights stored with 128x128 block scales in the published V3 checkpoints).
    Fp8,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::Bf16, DType::F16, DType::Fp8];
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::Fp8 => "fp8",
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::Fp8 => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Attention {
    /// Multi-head or grouped-query attention (`kv_heads == heads` is MHA).
    Gqa(Gqa),
    /// Multi-head latent attention (DeepSeek-V2 §2.1).
    Mla(Mla),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gqa {
    pub heads: u64,
    /// Key/value heads; divides `heads`. Equal to `heads` for MHA.
    pub kv_heads: u64,
    /// Per-head dimension of q, k and v (default `hidden / heads`).
    pub head_dim: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mla {
    pub heads: u64,
    /// Rank of the query compression (`q_a_proj`); `None` means a plain `q_proj`.
    pub q_lora_rank: Option<u64>,
    /// Rank of the joint key/value latent that is cached.
    pub kv_lora_rank: u64,
    /// Per-head query/key dims without position information.
    pub qk_nope_head_dim: u64,
    /// Per-head dims that carry RoPE; the key part is one decoupled key shared by all heads.
    pub qk_rope_head_dim: u64,
    /// Per-head value dim.
    pub v_head_dim: u64,
    /// Epsilon of the `q_a_layernorm` / `kv_a_layernorm` RMSNorms.
    pub latent_norm_eps: f64,
}

impl Attention {
    pub fn heads(&self) -> u64 {
        match self {
            Attention::Gqa(a) => a.heads,
            Attention::Mla(a) => a.heads,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rope {
    pub theta: f64,
    pub layout: RopeLayout,
    /// YaRN scaling; a property of the model that applies at every position.
    pub yarn: Option<Yarn>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Llama's `rotate_half`: dim i pairs with dim i + d/2.
    HalfSplit,
    /// Adjacent pairs (x0,x1),(x2,x3),...: DeepSeek V2/V3.
    Interleaved,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Yarn {
    /// Context extension factor s (> 1).
    pub factor: f64,
    /// Context length the model was pre-trained with.
    pub original_context: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim).
    pub mscale: f64,
    /// The softmax scale is multiplied by mscale(s, mscale_all_dim)^2.
    pub mscale_all_dim: f64,
}

/// `mscale(s, m) = 0.1 * m * ln(s) + 1` for s > 1, else 1 (YaRN; DeepSeek-V2 inference code).
pub fn yarn_mscale(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// A set of layer indices written as ranges, e.g. `[0..1, 2..28 step 2]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerSet {
    pub ranges: Vec<LayerRange>,
}

/// `start..end step step`, end exclusive; an open end (`3..`) is resolved to `layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerRange {
    pub start: u64,
    pub end: u64,
    pub step: u64,
}

impl LayerSet {
    /// Whether layer `l` belongs to the set.
    pub fn contains(&self, l: u64) -> bool {
        self.ranges.iter().any(|r| l >= r.start && l < r.end && (l - r.start).is_multiple_of(r.step))
    }
    /// Number of layers in the set (ranges of a resolved model never overlap).
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|r| if r.end > r.start { (r.end - r.start).div_ceil(r.step) } else { 0 }).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FfnBlock {
    pub layers: LayerSet,
    pub kind: Ffn,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Ffn {
    /// SwiGLU: down(silu(gate(x)) * up(x)).
    Dense {
        intermediate: u64,
    },
    Moe(Moe),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moe {
    /// Routed experts per layer.
    pub routed_experts: u64,
    /// Always-on shared experts; together they form one SwiGLU of width
    /// `shared_experts * expert_intermediate` (as the checkpoints store them).
    pub shared_experts: u64,
    /// Intermediate size of one (routed or shared) expert.
    pub expert_intermediate: u64,
    pub router: Router,
    pub balance: Balance,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Router {
    /// Experts each token is sent to.
    pub top_k: u64,
    pub scoring: Scoring,
    /// A learned per-expert bias added to the scores for *selection only* (V3's
    /// `e_score_correction_bias`); gate weights use the unbiased scores.
    pub selection_bias: bool,
    /// Expert groups (device-limited routing); 1 disables the group limit.
    pub groups: u64,
    /// Groups kept per token.
    pub groups_kept: u64,
    /// How a group is scored before the top groups are kept. Unkept groups are masked
    /// with -inf before the expert top-k. `None` exactly when `groups == 1`.
    pub group_score: Option<GroupScore>,
    pub normalize: Normalize,
    /// Routed scaling factor applied to the gate weights.
    pub scale: f64,
    /// Whether `scale` also applies when the weights were normalised (V3: yes; the
    /// original DeepSeek-V2 code scales only un-normalised weights).
    pub scale_normalized: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// The best (biased) score in the group (DeepSeek-V2).
    Max,
    /// The sum of the two best (biased) scores in the group (DeepSeek-V3).
    Top2Sum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Gate weights of the chosen experts are divided by their sum.
    Always,
    Never,
    /// Only when `top_k > 1`.
    TopKGt1,
}

/// Load-balancing settings; they change training, never the forward function.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Balance {
    /// Expert-level auxiliary loss coefficient (alpha_1 in DeepSeek-V2).
    pub expert_aux: f64,
    /// Device-level auxiliary loss coefficient (alpha_2).
    pub device_aux: f64,
    /// Communication balance loss coefficient (alpha_3).
    pub comm_aux: f64,
    /// Sequence-wise auxiliary loss coefficient (alpha in DeepSeek-V3).
    pub sequence_aux: f64,
    /// Aux-loss-free bias update speed (gamma in DeepSeek-V3); needs `selection_bias`.
    pub bias_update_speed: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mtp {
    /// Number of sequential MTP modules (D).
    pub depth: u64,
    /// Weight of the MTP loss (lambda).
    pub loss_weight: f64,
    /// Order of the two normalised inputs concatenated before `eh_proj`.
    pub concat: [MtpInput; 2],
    /// Index into `Model::ffn` of the feed-forward kind each MTP block uses.
    pub ffn: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtpInput {
    /// RMSNorm'd embedding of the token shifted by k (`enorm`).
    Embedding,
    /// RMSNorm'd hidden state of the previous depth (`hnorm`).
    Hidden,
}

impl Model {
    /// The feed-forward block that owns layer `l`.
    pub fn ffn_for_layer(&self, l: u64) -> &Ffn {
        let block = self.ffn.iter().find(|b| b.layers.contains(l));
        // A resolved model covers every layer exactly once (checked in resolve).
        &block.expect("resolved model covers every layer").kind
    }
}
