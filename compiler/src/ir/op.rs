//! The closed set of IR operations.
//!
//! [`Op`] is one enum (no `Box<dyn Op>`): passes `match` on it, CSE hashes `(op, inputs)`,
//! and adding a variant makes every exhaustive `match` in the compiler point at the code
//! that must learn about it. Floats are stored as [`Float`] (the bit pattern) so that `Op`
//! is `Eq + Hash`.
//!
//! Each variant documents its **shape rule** (inputs in slot order → outputs), which
//! [`crate::ir::infer()`] implements one for one, and where it is not obvious, its local
//! **derivative**, which the later reverse-mode autodiff pass will implement. Notation:
//! `[..., d]` is any number of leading axes followed by `d`; `T..` names a run of leading
//! axes that must agree between inputs; `int` is `i32` or `i64`; `float` is any float
//! dtype. Unless a rule says otherwise, all float inputs share one dtype (no implicit
//! promotion: lowering inserts [`Op::Cast`] where it wants `f32` math).
//!
//! Ops come at two levels. **Primitives** are what the decomposition pass expands to and
//! the reference interpreter must run. **Composites** (from [`Op::RmsNorm`] on) are kept
//! whole by lowering because a kernel library has a fused kernel for each; each one's doc
//! says what it decomposes to.

use super::dim::{Dim, Shape};
use super::dtype::DType;
use super::fused::FusedKernel;
use std::fmt;

/// An `f64` stored by bit pattern, so ops can derive `Eq` and `Hash` for CSE. Two floats
/// are equal when their bits are (so `0.0 != -0.0` and a NaN equals itself), which is the
/// right notion for "same op".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Float(u64);

impl Float {
    pub fn new(v: f64) -> Float {
        Float(v.to_bits())
    }
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl From<f64> for Float {
    fn from(v: f64) -> Float {
        Float::new(v)
    }
}

impl fmt::Debug for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

impl fmt::Display for Float {
    /// Shortest round-trip digits; exponent form only for very small or large magnitudes
    /// (`1e-6`, `10000`, `0.5`), so the text form stays short and stable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.get();
        let a = v.abs();
        if a != 0.0 && a.is_finite() && !(1e-4..1e16).contains(&a) {
            write!(f, "{v:e}")
        } else {
            write!(f, "{v}")
        }
    }
}

/// How many inputs an op takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    Exact(usize),
    /// Variadic with a minimum ([`Op::Concat`], [`Op::Return`]); for [`Op::Call`] the
    /// callee's signature fixes the count.
    AtLeast(usize),
}

impl Arity {
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Exact(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

impl fmt::Display for Arity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arity::Exact(k) => write!(f, "{k}"),
            Arity::AtLeast(k) => write!(f, "at least {k}"),
        }
    }
}

/// Elementwise functions of one tensor.
///
/// ## Shape rule
/// `x: float[S]` → `float[S]`, same dtype. `neg` and `abs` also accept `int`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x`; d/dx = -1.
    Neg,
    /// `|x|`; d/dx = sign(x).
    Abs,
    /// `e^x`; d/dx = e^x (reuse the output).
    Exp,
    /// `ln x`; d/dx = 1/x.
    Log,
    /// `√x`; d/dx = 1/(2√x) (reuse the output).
    Sqrt,
    /// `1/√x`; d/dx = -y³/2 with y the output.
    Rsqrt,
    /// `1/x`; d/dx = -y².
    Recip,
    /// `x²`; d/dx = 2x.
    Square,
    /// `σ(x)`; d/dx = y(1-y).
    Sigmoid,
    /// `x·σ(x)`; d/dx = σ(x)(1 + x(1-σ(x))).
    Silu,
    /// `tanh x`; d/dx = 1-y².
    Tanh,
    /// `sin x`; d/dx = cos x. The decomposed RoPE's sine table.
    Sin,
    /// `cos x`; d/dx = -sin x. The decomposed RoPE's cosine table.
    Cos,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Square => "square",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
        }
    }
    /// Whether the op is defined on integers as well as floats.
    pub fn allows_int(self) -> bool {
        matches!(self, UnaryOp::Neg | UnaryOp::Abs)
    }
}

/// Elementwise functions of two tensors.
///
/// ## Shape rule
/// numpy broadcasting: align shapes at the right; each pair of dims must be equal or one
/// of them the constant 1, and the result takes the other. Symbolic dims broadcast only
/// against 1 or themselves. Both inputs have one dtype; arithmetic ops return it,
/// comparisons return `bool`.
///
/// ## Derivative
/// The local derivative of a broadcast input is summed ([`Op::Reduce`] with `keepdim`)
/// over the axes it was broadcast along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// d/da = 1, d/db = 1.
    Add,
    /// d/da = 1, d/db = -1.
    Sub,
    /// d/da = b, d/db = a.
    Mul,
    /// d/da = 1/b, d/db = -a/b².
    Div,
    /// The gradient goes to the larger input (`select(a >= b, ...)`).
    Max,
    Min,
    /// `a^b`; d/da = b·a^(b-1), d/db = ln(a)·a^b.
    Pow,
    /// `a < b` → `bool`; no derivative.
    Lt,
    /// `a == b` → `bool`; no derivative.
    Eq,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
            BinaryOp::Lt => "lt",
            BinaryOp::Eq => "eq",
        }
    }
    /// Whether the result is `bool` rather than the input dtype.
    pub fn is_comparison(self) -> bool {
        matches!(self, BinaryOp::Lt | BinaryOp::Eq)
    }
}

/// What [`Op::Reduce`] computes along its axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
    /// Float inputs only.
    Mean,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Max => "reduce_max",
            ReduceOp::Mean => "reduce_mean",
        }
    }
}

/// Which dims RoPE pairs up (mirrors `dsc_dsl::model::RopeLayout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Llama's `rotate_half`: dim i pairs with dim i + d/2.
    HalfSplit,
    /// Adjacent pairs (x0,x1), (x2,x3), ...: DeepSeek V2/V3.
    Interleaved,
}

impl From<dsc_dsl::model::RopeLayout> for RopeLayout {
    fn from(l: dsc_dsl::model::RopeLayout) -> RopeLayout {
        match l {
            dsc_dsl::model::RopeLayout::HalfSplit => RopeLayout::HalfSplit,
            dsc_dsl::model::RopeLayout::Interleaved => RopeLayout::Interleaved,
        }
    }
}

/// YaRN frequency scaling (mirrors `dsc_dsl::model::Yarn`). The softmax-scale part of
/// YaRN (`mscale(s, mscale_all_dim)²`) is folded into [`Op::Attention`]'s `scale` by
/// lowering; this struct is only what the cos/sin tables need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Yarn {
    pub factor: Float,
    pub original_context: u64,
    pub beta_fast: Float,
    pub beta_slow: Float,
    pub mscale: Float,
    pub mscale_all_dim: Float,
}

impl From<&dsc_dsl::model::Yarn> for Yarn {
    fn from(y: &dsc_dsl::model::Yarn) -> Yarn {
        Yarn {
            factor: y.factor.into(),
            original_context: y.original_context,
            beta_fast: y.beta_fast.into(),
            beta_slow: y.beta_slow.into(),
            mscale: y.mscale.into(),
            mscale_all_dim: y.mscale_all_dim.into(),
        }
    }
}

/// Router score function (mirrors `dsc_dsl::model::Scoring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

/// How a group of experts is scored before the top groups are kept (mirrors
/// `dsc_dsl::model::GroupScore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupScore {
    /// Best (biased) score in the group (DeepSeek-V2).
    Max,
    /// Sum of the two best (biased) scores in the group (DeepSeek-V3).
    Top2Sum,
}

/// Settings of [`Op::MoeRoute`] (and [`Op::MoeRouteReplay`]): `dsc_dsl::model::Router` with the spec's conditional
/// rules already applied, so a kernel reads plain values: `normalize` is decided for this
/// `top_k`, and `scale` is the factor actually applied (1 when the spec scales only
/// un-normalised weights and these are normalised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Routing {
    pub top_k: u32,
    pub scoring: Scoring,
    /// A per-expert bias input is added to the scores for selection only.
    pub selection_bias: bool,
    /// Expert groups; 1 disables group-limited routing.
    pub groups: u32,
    pub groups_kept: u32,
    /// `Some` exactly when `groups > 1`.
    pub group_score: Option<GroupScore>,
    /// Divide the chosen weights by their sum.
    pub normalize: bool,
    /// Multiply the final weights by this.
    pub scale: Float,
}

/// The rotary frequencies `inv_freq[i]`, `i < rotary_dim/2`, and the factor cos and sin
/// are multiplied by, in `f64`: what the reference interpreter's RoPE uses and what the
/// RoPE kernel receives as a table, so the two cannot drift apart.
///
/// Plain RoPE: `theta^(-2i/d)` with `d = rotary_dim`, factor 1. YaRN follows HF's
/// `_compute_yarn_parameters` (and DeepSeek's `yarn_find_correction_range` /
/// `yarn_linear_ramp_mask`): the correction range `low = floor(corr(beta_fast))`,
/// `high = ceil(corr(beta_slow))` with `corr(r) = d·ln(orig / (2πr)) / (2 ln theta)`,
/// clamped to `[0, d-1]`; `ramp = clamp((i - low)/(high - low), 0, 1)`; dims below the
/// range (ramp 0, high frequency) keep their frequency (extrapolation), dims above it
/// (ramp 1) are divided by `factor` (interpolation). The factor is
/// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`.
pub fn rope_frequencies(theta: f64, rotary_dim: usize, yarn: Option<&Yarn>) -> (Vec<f64>, f64) {
    let d = rotary_dim as f64;
    let base: Vec<f64> = (0..rotary_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d)).collect();
    let Some(y) = yarn else { return (base, 1.0) };
    let (factor, orig) = (y.factor.get(), y.original_context as f64);
    let corr = |rot: f64| d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let low = corr(y.beta_fast.get()).floor().max(0.0);
    let mut high = corr(y.beta_slow.get()).ceil().min(d - 1.0);
    if low == high {
        high += 0.001; // as the reference, to avoid dividing by zero
    }
    let inv = base
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            f / factor * ramp + f * (1.0 - ramp)
        })
        .collect();
    (inv, dsc_dsl::model::yarn_mscale(factor, y.mscale.get()) / dsc_dsl::model::yarn_mscale(factor, y.mscale_all_dim.get()))
}

impl From<&dsc_dsl::model::Router> for Routing {
    fn from(r: &dsc_dsl::model::Router) -> Routing {
        use dsc_dsl::model::{GroupScore as G, Normalize as N, Scoring as S};
        let normalize = match r.normalize {
            N::Always => true,
            N::Never => false,
            N::TopKGt1 => r.top_k > 1,
        };
        let scale = if normalize && !r.scale_normalized { 1.0 } else { r.scale };
        Routing {
            top_k: r.top_k as u32,
            scoring: match r.scoring {
                S::Softmax => Scoring::Softmax,
                S::Sigmoid => Scoring::Sigmoid,
            },
            selection_bias: r.selection_bias,
            groups: r.groups as u32,
            groups_kept: r.groups_kept as u32,
            group_score: r.group_score.map(|g| match g {
                G::Max => GroupScore::Max,
                G::Top2Sum => GroupScore::Top2Sum,
            }),
            normalize,
            scale: scale.into(),
        }
    }
}

/// One IR operation. Inputs are listed in slot order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    // ---------------------------------------------------------------- leaves
    /// The `index`-th argument of the function: token ids, positions, caches and labels in
    /// an entry point; the hidden state and per-layer caches in a layer function. `name`
    /// is for people and for binding host buffers; arguments are matched by `index`.
    ///
    /// ## Shape rule
    /// No inputs. One output whose type is *declared* when the node is built.
    Input { index: u32, name: String },
    /// A weight, named relative to the function (`self_attn.kv_b_proj.weight`). A
    /// [`Op::Call`] with a layer scopes the callee's params (see [`param_path`]), so one
    /// layer body serves all layers of its kind. Grouped expert weights are one param
    /// stacked along a leading expert axis (`mlp.experts.gate_proj.weight: [E, i, h]`).
    ///
    /// ## Shape rule
    /// No inputs. One output with a declared type.
    Param { name: String },
    /// A scalar constant. Integer constants are stored exactly up to 2⁵³.
    ///
    /// ## Shape rule
    /// No inputs. One output with a declared dtype and shape `[]` (broadcast it with a
    /// [`Op::Binary`]).
    Const { value: Float },

    // ---------------------------------------------------------------- primitives
    /// Linear layer, `y = x·Wᵀ` as torch's `Linear`: the weight is stored `[out, in]`.
    ///
    /// ## Shape rule
    /// `x: float[..., k]`, `w: float[n, k]` → `float[..., n]`.
    ///
    /// ## Derivative
    /// `dx = matmul(dy, permute(w, [1,0]))`; `dw = sum over leading axes of
    /// batch_matmul(permute(dy, [..., n, tokens]), x)`: no axis is ever flattened.
    MatMul,
    /// Batched matrix product.
    ///
    /// ## Shape rule
    /// `a: float[B.., m, k]`, `b: float[B.., k, n]` → `float[B.., m, n]`; same rank ≥ 2
    /// and equal batch axes (no broadcasting; insert a [`Op::Reshape`] to add unit axes).
    ///
    /// ## Derivative
    /// `da = dc·bᵀ`, `db = aᵀ·dc` (transposes are [`Op::Permute`] of the last two axes).
    BatchMatMul,
    /// See [`UnaryOp`] for the rule and derivatives.
    Unary(UnaryOp),
    /// See [`BinaryOp`] for the broadcasting rule and derivatives.
    Binary(BinaryOp),
    /// `select(cond, a, b)`: `a` where `cond`, else `b`.
    ///
    /// ## Shape rule
    /// `cond: bool`, `a`, `b` of one dtype; the three shapes broadcast together as in
    /// [`BinaryOp`]; the result has `a`'s dtype.
    ///
    /// ## Derivative
    /// `da = select(cond, dy, 0)`, `db = select(cond, 0, dy)`.
    Select,
    /// Reduction along one axis.
    ///
    /// ## Shape rule
    /// `x: [S]`, `axis < rank` → `S` without `axis` (or with it set to 1 when `keepdim`);
    /// same dtype. `mean` needs a float input.
    ///
    /// ## Derivative
    /// sum: broadcast `dy` back; mean: the same divided by the axis length; max: to the
    /// arg-max positions (`select(x == y, dy, 0)`).
    Reduce { op: ReduceOp, axis: u8, keepdim: bool },
    /// Softmax along one axis, computed max-subtracted.
    ///
    /// ## Shape rule
    /// `x: float[S]`, `axis < rank` → `float[S]`.
    ///
    /// ## Derivative
    /// `dx = y·(dy - sum(dy·y, axis))`.
    Softmax { axis: u8 },
    /// Index select (embedding lookup is `gather(table, ids)` with `axis = 0`).
    ///
    /// ## Shape rule
    /// `table: [A.., n, B..]` with `axis = len(A..)`, `idx: int[I..]` →
    /// `[A.., I.., B..]` with `table`'s dtype. `[V, h]` gathered by `[b, s]` is `[b, s, h]`.
    ///
    /// ## Derivative
    /// `dtable = scatter_add(zeros, idx, dy)` on the same axis; `idx` has none.
    Gather { axis: u8 },
    /// Accumulate `src` into `dst` at the rows named by `idx` (the transpose of
    /// [`Op::Gather`]); repeated indices add up.
    ///
    /// ## Shape rule
    /// `dst: [A.., n, B..]` with `axis = len(A..)`, `idx: int[I..]`,
    /// `src: [A.., I.., B..]` of `dst`'s dtype → `dst`'s type.
    ///
    /// ## Derivative
    /// `ddst = dy`, `dsrc = gather(dy, idx)`.
    ScatterAdd { axis: u8 },
    /// The `k` largest entries along `axis`, in descending order. Two outputs: values
    /// (output 0) and their indices (output 1).
    ///
    /// ## Shape rule
    /// `x: [S]` with `S[axis]` constant and `≥ k` (or symbolic) →
    /// `([S with S[axis] = k], i32[S with S[axis] = k])`, values in `x`'s dtype.
    ///
    /// ## Derivative
    /// `dx = scatter_add(zeros, indices, dvalues)` along `axis`; indices have none.
    TopK { k: u32, axis: u8 },
    /// Reinterpret the same elements, row-major, under a new shape.
    ///
    /// ## Shape rule
    /// `x: [S]` → `[shape]`, same dtype, provided `S` and `shape` hold the same number of
    /// elements for every binding of `b, s, c`. That is checked by factoring: equal product
    /// of constant dims and the same multiset of symbolic dims, so symbolic axes pass
    /// through unchanged and only constant axes split or merge (`[b,s,4096]` ↔
    /// `[b,s,32,128]`).
    ///
    /// ## Derivative
    /// `dx = reshape(dy, S)`.
    Reshape { shape: Shape },
    /// Reorder axes: output axis `i` is input axis `perm[i]`.
    ///
    /// ## Shape rule
    /// `x: [S]`, `perm` a permutation of `0..rank` → `[S[perm[0]], S[perm[1]], ...]`.
    ///
    /// ## Derivative
    /// `dx = permute(dy, inverse(perm))`.
    Permute { perm: Vec<u8> },
    /// Repeat `x` along unit axes (and new leading axes) up to `shape`, numpy's
    /// `broadcast_to` / torch's `expand`: the one head of MLA's shared rope key read by
    /// every head, a per-head weight read by every sequence of a batch. A runtime with
    /// strided views may make it a stride-0 view; the reference interpreter copies.
    ///
    /// ## Shape rule
    /// `x: [S]` → `[shape]`, same dtype, with `rank(shape) ≥ rank(S)`: aligned at the
    /// right, each `S[i]` equals its output dim or is the constant 1 (symbolic dims only
    /// ever match themselves, as in [`BinaryOp`] broadcasting).
    ///
    /// ## Derivative
    /// `dx` is `dy` summed ([`Op::Reduce`] with `keepdim`) over every axis that was
    /// broadcast, then reshaped to `S` (dropping the new leading axes).
    Broadcast { shape: Shape },
    /// The elements `start .. start+len` along `axis`. `start` and `len` may be symbolic:
    /// `start = s-1, len = 1` takes the last position.
    ///
    /// ## Shape rule
    /// `x: [S]` → `S` with `S[axis] = len`; same dtype. When the values are constant the
    /// rule checks `0 ≤ start`, `0 < len` and `start + len ≤ S[axis]`; symbolic bounds are
    /// checked at run time against the bindings.
    ///
    /// ## Derivative
    /// `dx` is `dy` padded with zeros (a `concat` with zero constants) back to `S[axis]`.
    Slice { axis: u8, start: Dim, len: Dim },
    /// Join tensors along one axis.
    ///
    /// ## Shape rule
    /// `x₀..xₙ` (at least one) of one dtype and rank, equal except at `axis` → the common shape
    /// with `S[axis] = Σ xᵢ[axis]` (symbolic sums are fine: `c + s`).
    ///
    /// ## Derivative
    /// Each `dxᵢ` is a [`Op::Slice`] of `dy`.
    Concat { axis: u8 },
    /// Convert element type (round-to-nearest-even for floats).
    ///
    /// ## Shape rule
    /// `x: [S]` → `to[S]`.
    ///
    /// ## Derivative
    /// Float to float: `dx = cast(dy)` back to `x`'s dtype. From an integer or `bool`
    /// there is none (gradients stop at discrete values).
    Cast { to: DType },
    /// The integers `start, start+1, …, start+len-1` as a vector (numpy's `arange`). The
    /// bounds may be symbolic, so the decomposed causal mask can compare query positions
    /// `sk-sq ..` with key positions `0 .. sk`, and one-hot encodings compare labels with
    /// `0 .. V`.
    ///
    /// ## Shape rule
    /// No inputs → `dtype[len]`; `dtype` is an integer or float type (not `bool`) and a
    /// constant `len` is positive. No derivative (nothing flows in).
    Iota { start: Dim, len: Dim, dtype: DType },
    /// RoPE's frequency table `inv_freq[i]`, `i < rotary_dim/2`, in `f32`: `theta^(-2i/d)`
    /// with `d = rotary_dim`, YaRN-corrected when `yarn` is set (the ramp between
    /// extrapolated and interpolated dims; see [`rope_frequencies`]). It is a primitive because those constants are a function of
    /// the settings alone: writing them as an `iota` and a dozen arithmetic nodes would
    /// hide the settings that [`Op::Rope`] carries, and the decomposed pattern could not
    /// be fused back. Its settings are [`Op::Rope`]'s, so a fuser reads them off this node.
    ///
    /// ## Shape rule
    /// No inputs → `f32[rotary_dim/2]`; `rotary_dim` even and positive, `theta > 0`.
    /// No derivative (a function of the settings alone).
    RopeFreqs { theta: Float, rotary_dim: u32, yarn: Option<Yarn> },

    // ---------------------------------------------------------------- composites
    /// RMSNorm: `x / sqrt(mean(x², -1) + eps) · gain`, statistics in f32.
    ///
    /// ## Shape rule
    /// `x: float[..., d]`, `gain: float[d]` → `x`'s type.
    ///
    /// ## Derivative
    /// [`Op::RmsNormGrad`]: `dgain = Σ_tokens dy·x·r`, `dx = r·(dy·g) − x·r³·mean(dy·g·x)`
    /// with `r = (mean(x²) + eps)^-½`.
    ///
    /// ## Decomposition
    /// cast→f32, square, reduce_mean(keepdim), add eps, rsqrt, mul, cast back, mul gain.
    RmsNorm { eps: Float },
    /// Rotary position embedding, with YaRN-scaled frequencies when `yarn` is set. The
    /// first `rotary_dim` dims of the last axis are rotated, pairs chosen by `layout`; the
    /// rest pass through. With YaRN the op also multiplies cos and sin by
    /// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`
    /// (`dsc_dsl::model::yarn_mscale`); the softmax-scale part of YaRN is not its job
    /// (lowering folds it into [`Op::Attention`]'s `scale`).
    ///
    /// ## Shape rule
    /// `x: float[b, s, d]` or `float[b, s, h, d]`, `positions: int[b, s]` (the leading two
    /// axes of `x`) → `x`'s type; `rotary_dim` is even, positive and `≤ d`.
    ///
    /// ## Derivative
    /// Rotation is linear in `x`: `dx = rope(dy)` with the angle negated; positions have
    /// none.
    ///
    /// ## Decomposition
    /// cos/sin tables from `positions` and the frequencies, slices, muls and adds.
    Rope { layout: RopeLayout, theta: Float, rotary_dim: u32, yarn: Option<Yarn> },
    /// Scaled dot-product attention, `softmax(q·kᵀ·scale + mask)·v`, grouped-query when
    /// `kv_heads < heads` (query head `i` reads kv head `i / (heads / kv_heads)`).
    /// With `causal`, the mask is aligned bottom-right: query `i` sees keys
    /// `0 ..= sk - sq + i`, so the same op serves prefill (`sk = s`) and decode with a
    /// cache (`sk = c + s`). MLA lowers to this too: naive form with `kv_heads = heads`
    /// and `dk ≠ dv`, absorbed form with `kv_heads = 1` over the latent.
    ///
    /// With `lse` (set by autodiff on the forward attention of a train graph) a second
    /// output holds each query row's log-sum-exp of the scaled, masked scores, so the
    /// backward ([`Op::AttentionGrad`]) recomputes the probabilities one key tile at a time
    /// instead of storing the `[b, heads, sq, sk]` matrix.
    ///
    /// ## Shape rule
    /// `q: float[b, sq, heads, dk]`, `k: float[b, sk, kv_heads, dk]`,
    /// `v: float[b, sk, kv_heads, dv]`, and when `masked` an additive
    /// `mask: float[b, sq, sk]` → `float[b, sq, heads, dv]` (and with `lse`,
    /// `f32[b, sq, heads]`); `heads % kv_heads == 0`.
    ///
    /// ## Derivative
    /// [`Op::AttentionGrad`] (flash-style, from the output and the log-sum-exp); the mask
    /// has none.
    ///
    /// ## Decomposition
    /// reshape to group heads, batch_matmul, mul scale, causal `select`, softmax,
    /// batch_matmul.
    Attention { heads: u32, kv_heads: u32, scale: Float, causal: bool, masked: bool, lse: bool },
    /// MoE router: from router logits to the chosen experts and their gate weights
    /// (score function, optional selection bias, group-limited top-k, normalisation,
    /// scaling; see [`Routing`]).
    ///
    /// ## Shape rule
    /// `logits: float[T.., E]`, and when `selection_bias` a `bias: float[E]` →
    /// `(indices: i32[T.., top_k], weights: float[T.., top_k])`, weights in the logits'
    /// dtype. `groups` divides `E`, `groups_kept ≤ groups`, `group_score` is set exactly
    /// when `groups > 1`, and the kept groups hold at least `top_k` experts.
    ///
    /// ## Derivative
    /// Only through the weights: the gathered scores of the chosen experts depend on
    /// `logits`; indices and the bias (selection only) have none.
    MoeRoute(Routing),
    /// [`Op::MoeRoute`] with the selection given: routing replay (verl's "R3" for MoE RL).
    /// A GRPO rollout records, per token and MoE layer, the experts its router chose; the
    /// training forward reuses them, so the policy gradient is taken through the same
    /// experts that produced the samples (recomputing the selection from training-time
    /// logits picks different experts for some tokens, which destabilises MoE RL). The gate
    /// weights are still recomputed from `logits` at the given indices, exactly as
    /// `MoeRoute` computes them at its own choice (score, gather, normalise, scale), and
    /// differentiated. The selection bias, the groups and `top_k`'s order only decide the
    /// selection, so the op has no bias input whatever `selection_bias` says; `groups`
    /// and `groups_kept` are not checked against the indices (a replayed expert may lie
    /// outside the groups the training logits would keep).
    ///
    /// ## Shape rule
    /// `logits: float[T.., E]`, `indices: int[T.., top_k]` →
    /// `(indices: i32[T.., top_k], weights: float[T.., top_k])`, as [`Op::MoeRoute`]'s
    /// outputs (the first is the given indices as `i32`); the [`Routing`] must be valid for
    /// `E` as for `MoeRoute`. Every index must lie in `0..E` (checked when it runs).
    ///
    /// ## Derivative
    /// As [`Op::MoeRoute`]: [`Op::MoeRouteGrad`] through the weights, at the given indices;
    /// the indices take none.
    ///
    /// ## Decomposition
    /// softmax|sigmoid, then `MoeRoute`'s weight tail: one-hot pick at the indices, sum,
    /// normalise, scale.
    MoeRouteReplay(Routing),
    /// The routed experts of one MoE layer as one grouped op: each token runs the SwiGLU
    /// experts named by its routing indices and sums their outputs weighted by the gate
    /// weights. The weights stay stacked, so 256 experts are one node, not 256. A
    /// decomposition to dispatch / grouped GEMM / combine is the kernel library's or a
    /// later pass's business.
    ///
    /// ## Shape rule
    /// `x: float[T.., h]`, `indices: int[T.., k]`, `weights: float[T.., k]`,
    /// `gate: float[E, i, h]`, `up: float[E, i, h]`, `down: float[E, h, i]` → `x`'s type.
    /// `weights` may have its own float dtype (routers often run in f32).
    ///
    /// ## Derivative
    /// [`Op::ExpertFfnGrad`]: per token and slot, `dweights_j = dy·ffn_{e_j}(x)` and the
    /// SwiGLU backward of `weights_j·dy` through expert `e_j` (to `dx` and that expert's
    /// weights); experts no token chose get zeros; `indices` have none.
    ExpertFfn,
    /// A dense SwiGLU feed-forward, `down(silu(gate(x)) · up(x))` (dense layers and the
    /// shared experts of an MoE layer).
    ///
    /// ## Shape rule
    /// `x: float[..., h]`, `gate: float[i, h]`, `up: float[i, h]`, `down: float[h, i]` →
    /// `x`'s type.
    ///
    /// ## Derivative
    /// [`Op::SwiGluGrad`]: with `g = x·gateᵀ`, `u = x·upᵀ`, `a = silu(g)·u`:
    /// `ddown = Σ dyᵀ·a`, `da = dy·down`, `dg = da·u·silu'(g)`, `du = da·silu(g)`,
    /// `dx = dg·gate + du·up`, `dgate = Σ dgᵀ·x`, `dup = Σ duᵀ·x`.
    ///
    /// ## Decomposition
    /// matmul, silu, matmul, mul, matmul.
    SwiGlu,
    /// Mean token cross-entropy of logits against labels, skipping labels equal to
    /// `ignore_index` (the training loss).
    ///
    /// ## Shape rule
    /// `logits: float[T.., V]`, `labels: int[T..]` → `f32[]`.
    ///
    /// ## Derivative
    /// [`Op::CrossEntropyGrad`]: `dlogits = (softmax(logits) - onehot(labels)) · dy / count`.
    CrossEntropy { ignore_index: Option<i64> },
    /// The log-probability of each label under the logits, `log_softmax(logits)[label]`,
    /// 0 on rows whose label is `ignore_index`: what a policy-gradient objective (GRPO) is
    /// a function of. Unlike [`Op::CrossEntropy`] it is not reduced, so the entry returns
    /// it and the objective, computed outside the graph, sends back its cotangent.
    ///
    /// ## Shape rule
    /// `logits: float[T.., V]`, `labels: int[T..]` → `f32[T..]`.
    ///
    /// ## Derivative
    /// [`Op::TokenLogProbGrad`]: `dlogits = (onehot(label) − softmax(logits)) · dy` per
    /// row, 0 on ignored rows.
    TokenLogProb { ignore_index: Option<i64> },
    /// Append new keys/values to a cache along `axis`. The value is the concatenation,
    /// like [`Op::Concat`], but the runtime may write it into the cache's own buffer
    /// (positions `c .. c+s`); this is why it is its own op. The lowering keeps caches
    /// position-major and appends along axis 0, so the new entries go after everything
    /// already there: a device runtime with room in the buffer writes only them
    /// (`codegen::launch::NodeWork::Append`).
    ///
    /// ## Shape rule
    /// `cache: [A.., c, B..]`, `new: [A.., s, B..]` of one dtype → `[A.., c+s, B..]`.
    ///
    /// ## Derivative
    /// As [`Op::Concat`]: each input's part of `dy` (never needed: training has no cache).
    CacheAppend { axis: u8 },

    // ---------------------------------------------------------------- gradients
    // The vector-Jacobian products of the composites (and of matmul's weight), which the
    // autodiff pass (`passes/autodiff.rs`) emits. Each is one kernel for the same reason
    // its forward is: a backend wants the whole computation (the flash-attention backward
    // never stores the probabilities, the expert backward walks the same dispatch as the
    // forward). dsc takes first derivatives only, so these have no derivative themselves.
    /// The weight gradient of [`Op::MatMul`]: `dw[n, k] = Σ_tokens dy[t, n] · x[t, k]`,
    /// summed over every leading (token) axis, without flattening them.
    ///
    /// ## Shape rule
    /// `dy: float[T.., n]`, `x: float[T.., k]` of one dtype and equal leading axes →
    /// `float[n, k]`.
    WeightGrad,
    /// The backward of [`Op::RmsNorm`] `y = x·r·g` with `r = (mean(x²) + eps)^-½`:
    /// `dg = Σ_tokens dy·x·r`, `dx = r·(dy·g) − x·r³·mean(dy·g·x)`, statistics in f32.
    ///
    /// ## Shape rule
    /// `x: float[..., d]`, `gain: float[d]`, `dy` of `x`'s type → `(dx: x's type,
    /// dgain: gain's type)`.
    RmsNormGrad { eps: Float },
    /// The backward of [`Op::Attention`] with the same settings, flash-style: per query
    /// row, `p = exp(q·kᵀ·scale + mask − lse)` is recomputed from the forward's
    /// log-sum-exp; `dv = pᵀ·do`, `dp = do·vᵀ`, `ds = p·(dp − rowsum(do·o))`,
    /// `dq = ds·k·scale`, `dk = dsᵀ·q·scale`; a kv head sums over the query heads of its
    /// group.
    ///
    /// ## Shape rule
    /// `q, k, v[, mask]` as [`Op::Attention`], then `out: float[b, sq, heads, dv]`,
    /// `lse: f32[b, sq, heads]`, `dout` of `out`'s type → `(dq, dk, dv)` of the types of
    /// `q`, `k`, `v`.
    AttentionGrad { heads: u32, kv_heads: u32, scale: Float, causal: bool, masked: bool },
    /// The backward of [`Op::SwiGlu`] `y = down(a)`, `a = silu(g)·u`, `g = x·gateᵀ`,
    /// `u = x·upᵀ`: `da = dy·down`, `ddown = Σ dyᵀ·a`, `dg = da·u·silu'(g)`,
    /// `du = da·silu(g)`, `dx = dg·gate + du·up`, `dgate = Σ dgᵀ·x`, `dup = Σ duᵀ·x`
    /// (sums over tokens); `g` and `u` are recomputed, not stored.
    ///
    /// ## Shape rule
    /// `x, gate, up, down` as [`Op::SwiGlu`], `dy` of `x`'s type → `(dx, dgate, dup,
    /// ddown)` of the types of `x`, `gate`, `up`, `down`.
    SwiGluGrad,
    /// The backward of [`Op::ExpertFfn`] `y = Σ_j w_j · ffn_{e_j}(x)`: for each token and
    /// slot `j` routed to expert `e_j`, `dw_j = dy · ffn_{e_j}(x)`, and the SwiGLU
    /// backward of `w_j·dy` through expert `e_j` adds to `dx` and to that expert's
    /// weight gradients. Experts no token was routed to get zero gradients; indices have
    /// none.
    ///
    /// ## Shape rule
    /// `x, indices, weights, gate, up, down` as [`Op::ExpertFfn`], `dy` of `x`'s type →
    /// `(dx, dweights, dgate, dup, ddown)` of the types of `x`, `weights`, `gate`, `up`,
    /// `down`.
    ExpertFfnGrad,
    /// The backward of [`Op::MoeRoute`] through its weights: with `s = score(logits)`
    /// (softmax over the experts, or sigmoid), `w_j = scale · s_{e_j} / Z` where
    /// `Z = Σ_j s_{e_j}` when normalising (else 1): `ds_{e_j} = scale·(dw_j − Σ_i dw_i·w_i/scale)/Z`
    /// (normalised) or `scale·dw_j`; then through the score function (softmax:
    /// `dl = s·(ds − Σ ds·s)`; sigmoid: `dl = ds·s·(1−s)`). The selection (and the
    /// selection bias) takes no gradient.
    ///
    /// ## Shape rule
    /// `logits: float[T.., E]`, `indices: int[T.., k]`, `dweights: float[T.., k]` →
    /// `logits`' type.
    MoeRouteGrad(Routing),
    /// The backward of [`Op::CrossEntropy`]: `dlogits = (softmax(logits) − onehot(label))
    /// · dloss / count` on rows whose label counts, 0 on ignored rows (`count` = rows that
    /// count).
    ///
    /// ## Shape rule
    /// `logits: float[T.., V]`, `labels: int[T..]`, `dloss: f32[]` → `logits`' type.
    CrossEntropyGrad { ignore_index: Option<i64> },
    /// The backward of [`Op::TokenLogProb`]: `dlogits = (onehot(label) − softmax(logits))
    /// · dy` per row, 0 on ignored rows.
    ///
    /// ## Shape rule
    /// `logits: float[T.., V]`, `labels: int[T..]`, `dy: f32[T..]` → `logits`' type.
    TokenLogProbGrad { ignore_index: Option<i64> },

    // ---------------------------------------------------------------- kernels
    /// A fused kernel: an optional head op (`matmul` or `rms_norm`) followed by a program
    /// of elementwise steps over the node's inputs, computed in one pass without writing
    /// the intermediates to memory. The fusion passes build it; see [`FusedKernel`] for
    /// the program and its text form.
    ///
    /// ## Shape rule
    /// The head reads inputs 0 and 1 under its own op's rule; each step applies its
    /// op's rule ([`UnaryOp`], [`BinaryOp`] broadcasting, [`Op::Select`], [`Op::Cast`])
    /// to the types of its operands; the result is the last step's type (the head's when
    /// there are no steps). The input count is fixed by the program: every input is read,
    /// every value but the result is read by a later step.
    ///
    /// ## Derivative
    /// Not taken: autodiff runs before fusion.
    Fused(FusedKernel),
    /// Call another function of the module (a layer body). `layer` scopes the callee's
    /// params: see [`param_path`].
    ///
    /// ## Shape rule
    /// Arguments match the callee's `Input`s by index, in count, dtype and shape; the
    /// outputs are the callee's return values, in order.
    ///
    /// ## Derivative
    /// A call of the callee's generated backward (`{function}.bwd`, same `layer`), which
    /// takes the results' cotangents and the residuals the forward returned and gives the
    /// arguments' cotangents and the callee's param gradients (`passes::autodiff`).
    Call { function: String, layer: Option<u32> },
    /// The function's results. Exactly one per function.
    ///
    /// ## Shape rule
    /// Any number of inputs of any type; no outputs.
    Return,
}

/// The full name of a param `name` seen through a call scoped to `layer`:
/// `model.layers.{layer}.{name}`, or `name` itself outside any layer. These are the
/// Hugging Face checkpoint names (`model.layers.3.self_attn.kv_b_proj.weight`), so weights
/// bind to checkpoint tensors by name; top-level params are already named in full
/// (`model.embed_tokens.weight`, `lm_head.weight`). Calls do not nest, so one level of
/// scoping is enough.
pub fn param_path(layer: Option<u32>, name: &str) -> String {
    match layer {
        Some(l) => format!("model.layers.{l}.{name}"),
        None => name.to_string(),
    }
}

impl Op {
    /// The name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Const { .. } => "const",
            Op::MatMul => "matmul",
            Op::BatchMatMul => "batch_matmul",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Select => "select",
            Op::Reduce { op, .. } => op.name(),
            Op::Softmax { .. } => "softmax",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::TopK { .. } => "top_k",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Broadcast { .. } => "broadcast",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Cast { .. } => "cast",
            Op::Iota { .. } => "iota",
            Op::RopeFreqs { .. } => "rope_freqs",
            Op::Fused(_) => "fused",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::MoeRoute(_) => "moe_route",
            Op::MoeRouteReplay(_) => "moe_route_replay",
            Op::ExpertFfn => "expert_ffn",
            Op::SwiGlu => "swiglu",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::TokenLogProb { .. } => "token_logprob",
            Op::CacheAppend { .. } => "cache_append",
            Op::WeightGrad => "weight_grad",
            Op::RmsNormGrad { .. } => "rms_norm_grad",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::SwiGluGrad => "swiglu_grad",
            Op::ExpertFfnGrad => "expert_ffn_grad",
            Op::MoeRouteGrad(_) => "moe_route_grad",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
            Op::TokenLogProbGrad { .. } => "token_logprob_grad",
            Op::Call { .. } => "call",
            Op::Return => "return",
        }
    }

    /// How many inputs the op takes.
    pub fn arity(&self) -> Arity {
        use Arity::*;
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Iota { .. } | Op::RopeFreqs { .. } => Exact(0),
            Op::Fused(k) => Exact(k.num_inputs()),
            Op::Unary(_)
            | Op::Reduce { .. }
            | Op::Softmax { .. }
            | Op::TopK { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Cast { .. } => Exact(1),
            Op::MatMul
            | Op::WeightGrad
            | Op::BatchMatMul
            | Op::Binary(_)
            | Op::Gather { .. }
            | Op::RmsNorm { .. }
            | Op::Rope { .. }
            | Op::CrossEntropy { .. }
            | Op::TokenLogProb { .. }
            | Op::CacheAppend { .. }
            | Op::MoeRouteReplay(_) => Exact(2),
            Op::Select
            | Op::ScatterAdd { .. }
            | Op::RmsNormGrad { .. }
            | Op::MoeRouteGrad(_)
            | Op::CrossEntropyGrad { .. }
            | Op::TokenLogProbGrad { .. } => Exact(3),
            Op::Attention { masked, .. } => Exact(if *masked { 4 } else { 3 }),
            Op::AttentionGrad { masked, .. } => Exact(if *masked { 7 } else { 6 }),
            Op::SwiGluGrad => Exact(5),
            Op::ExpertFfnGrad => Exact(7),
            Op::MoeRoute(r) => Exact(if r.selection_bias { 2 } else { 1 }),
            Op::SwiGlu => Exact(4),
            Op::ExpertFfn => Exact(6),
            Op::Concat { .. } => AtLeast(1),
            Op::Call { .. } | Op::Return => AtLeast(0),
        }
    }

    /// How many values the op produces; `None` for [`Op::Call`], whose callee decides.
    pub fn num_outputs(&self) -> Option<usize> {
        match self {
            Op::TopK { .. } | Op::MoeRoute(_) | Op::MoeRouteReplay(_) | Op::RmsNormGrad { .. } => Some(2),
            Op::Attention { lse, .. } => Some(if *lse { 2 } else { 1 }),
            Op::AttentionGrad { .. } => Some(3),
            Op::SwiGluGrad => Some(4),
            Op::ExpertFfnGrad => Some(5),
            Op::Return => Some(0),
            Op::Call { .. } => None,
            _ => Some(1),
        }
    }

    /// Whether output element `i` depends only on input elements `i` (after broadcasting):
    /// the ops a fuser may chain freely into one loop.
    pub fn is_elementwise(&self) -> bool {
        matches!(self, Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. })
    }

    /// Leaves have no inputs and a declared (not inferred) type.
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::Const { .. })
    }

    /// The backward kernels autodiff emits (`weight_grad`, `*_grad`): not composites
    /// (nothing decomposes them) and never differentiated again.
    pub fn is_gradient(&self) -> bool {
        matches!(
            self,
            Op::WeightGrad
                | Op::RmsNormGrad { .. }
                | Op::AttentionGrad { .. }
                | Op::SwiGluGrad
                | Op::ExpertFfnGrad
                | Op::MoeRouteGrad(_)
                | Op::CrossEntropyGrad { .. }
                | Op::TokenLogProbGrad { .. }
        )
    }

    /// Composites are kept whole by lowering and expanded by the decomposition pass.
    pub fn is_composite(&self) -> bool {
        matches!(
            self,
            Op::RmsNorm { .. }
                | Op::Rope { .. }
                | Op::Attention { .. }
                | Op::MoeRoute(_)
                | Op::MoeRouteReplay(_)
                | Op::ExpertFfn
                | Op::SwiGlu
                | Op::CrossEntropy { .. }
                | Op::TokenLogProb { .. }
                | Op::CacheAppend { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn float_formatting() {
        assert_eq!(Float::new(1e-6).to_string(), "1e-6");
        assert_eq!(Float::new(10000.0).to_string(), "10000");
        assert_eq!(Float::new(0.5).to_string(), "0.5");
        assert_eq!(Float::new(2.5).to_string(), "2.5");
        assert_eq!(Float::new(0.0).to_string(), "0");
        assert_eq!(Float::new(0.1352337788608801).to_string(), "0.1352337788608801");
    }

    #[test]
    fn ops_hash_and_compare_structurally() {
        // CSE relies on this: equal settings give equal, equally hashed ops.
        let a = Op::RmsNorm { eps: Float::new(1e-6) };
        let b = Op::RmsNorm { eps: Float::new(1e-6) };
        let c = Op::RmsNorm { eps: Float::new(1e-5) };
        let set: HashSet<Op> = [a.clone(), b, c].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains(&a));
    }

    #[test]
    fn arity_outputs_and_classes() {
        assert_eq!(Op::MatMul.arity(), Arity::Exact(2));
        let att = Op::Attention { heads: 8, kv_heads: 2, scale: 0.1.into(), causal: true, masked: true, lse: false };
        assert_eq!(att.arity(), Arity::Exact(4));
        assert_eq!(Op::TopK { k: 2, axis: 1 }.num_outputs(), Some(2));
        assert_eq!(Op::Return.num_outputs(), Some(0));
        assert_eq!(Op::Call { function: "f".into(), layer: None }.num_outputs(), None);
        assert!(Op::Binary(BinaryOp::Mul).is_elementwise());
        assert!(!Op::MatMul.is_elementwise());
        assert!(Op::SwiGlu.is_composite() && !Op::Softmax { axis: 0 }.is_composite());
        assert!(Arity::AtLeast(1).accepts(3) && !Arity::AtLeast(1).accepts(0));
        assert_eq!(param_path(Some(3), "mlp.gate.weight"), "model.layers.3.mlp.gate.weight");
        assert_eq!(param_path(None, "model.norm.weight"), "model.norm.weight");
    }

    #[test]
    fn routing_from_router() {
        use dsc_dsl::model as m;
        let r = m::Router {
            top_k: 8,
            scoring: m::Scoring::Sigmoid,
            selection_bias: true,
            groups: 8,
            groups_kept: 4,
            group_score: Some(m::GroupScore::Top2Sum),
            normalize: m::Normalize::TopKGt1,
            scale: 2.5,
            scale_normalized: true,
        };
        let ro = Routing::from(&r);
        assert!(ro.normalize);
        assert_eq!(ro.scale.get(), 2.5);
        assert_eq!(ro.group_score, Some(GroupScore::Top2Sum));
        // DeepSeek-V2's original code: normalised weights are not scaled.
        let v2 = m::Router { normalize: m::Normalize::Always, scale_normalized: false, ..r };
        assert_eq!(Routing::from(&v2).scale.get(), 1.0);
    }
}
