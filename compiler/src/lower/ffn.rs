//! The feed-forward sublayer: a dense SwiGLU (`mlp.{gate,up,down}_proj`), or a DeepSeekMoE
//! layer (Hugging Face `DeepseekV2Moe` / `DeepseekV3MoE`): an f32 router, the routed
//! experts as one grouped [`Op::ExpertFfn`] over stacked weights, and the always-on shared
//! experts as one SwiGLU of width `shared_experts · expert_intermediate`.
//!
//! In training a MoE layer also returns what its router did: the **load** (tokens sent to
//! each expert, `f32[E]`, for the aux-loss-free bias update and the balance metrics) and
//! its **balance loss** (`f32[]`), from the spec's `balance` coefficients:
//!
//! - expert-level (DeepSeekMoE §4.1, DeepSeek-V2 §2.2.3, α₁ = `expert_aux`), over every
//!   token of the batch: `α₁ Σᵢ fᵢ Pᵢ`, `fᵢ = E/(K·T) Σₜ 1(t chose i)`, `Pᵢ = 1/T Σₜ sᵢₜ`;
//! - sequence-wise (DeepSeek-V3 §2.1.2, α = `sequence_aux`), per sequence then averaged
//!   over the batch: the same with `T` the sequence's tokens.
//!
//! `s` are the router's scores over all experts, normalised to sum 1 per token (softmax
//! scores already do; sigmoid scores are divided by their sum, as V3's `s'`). The
//! indicator counts the experts actually chosen, i.e. after the selection bias and the
//! group limit: that is the routing whose balance the loss is meant to improve. Padding
//! tokens count like any other (a padded batch should mask them out of the data instead).
//! The device- and communication-level losses (α₂, α₃ = `device_aux`, `comm_aux`) need
//! the experts' placement on devices, which a spec does not give: they are not built, and
//! a spec's values for them do not enter the training objective.

use super::builder::Builder;
use super::{Cx, LowerError};
use crate::ir::{BinaryOp, DType, Dim, Op, ReduceOp, Routing, Scoring, Ty, UnaryOp, Value};
use dsc_dsl::model::{Ffn, Moe};

/// Router logits, scores and gate weights are computed in f32 whatever the model dtype,
/// as Hugging Face's DeepSeek gates do (`F.linear(x.float(), weight.float())`): routing
/// decisions must not depend on bf16 rounding.
const ROUTER_DTYPE: DType = DType::F32;

/// What a feed-forward sublayer returns: its output and, for a MoE layer in training,
/// the balance loss and the expert loads (see the module doc).
pub(super) struct FfnOut {
    pub y: Value,
    pub router: Option<RouterStats>,
}

/// A training MoE layer's balance loss `f32[]` and expert loads `f32[E]`.
pub(super) struct RouterStats {
    pub aux: Value,
    pub load: Value,
}

/// `ffn(x)` for `x: [b, seq, hidden]` (already normalised). `key` is the spec path of the
/// block (`ffn.dense`, `ffn.moe`), whose sub-keys give the spans. With `train`, a MoE
/// layer also reports its router's statistics.
pub(super) fn ffn(b: &mut Builder, cx: &Cx, ffn: &Ffn, key: &str, x: Value, train: bool) -> Result<FfnOut, LowerError> {
    match ffn {
        Ffn::Dense { intermediate } => {
            b.at(&[&format!("{key}.intermediate"), key]);
            Ok(FfnOut { y: swiglu(b, cx, x, "mlp", *intermediate)?, router: None })
        }
        Ffn::Moe(moe) => self::moe(b, cx, moe, key, x, train),
    }
}

/// `down(silu(gate(x)) · up(x))` with weights `{prefix}.{gate,up,down}_proj.weight`.
fn swiglu(b: &mut Builder, cx: &Cx, x: Value, prefix: &str, intermediate: u64) -> Result<Value, LowerError> {
    let (h, i) = (Dim::from(cx.m.hidden), Dim::from(intermediate));
    let gate = b.param(&format!("{prefix}.gate_proj.weight"), Ty::new(cx.dt, [i, h]));
    let up = b.param(&format!("{prefix}.up_proj.weight"), Ty::new(cx.dt, [i, h]));
    let down = b.param(&format!("{prefix}.down_proj.weight"), Ty::new(cx.dt, [h, i]));
    b.op(Op::SwiGlu, &[x, gate, up, down])
}

fn moe(b: &mut Builder, cx: &Cx, moe: &Moe, key: &str, x: Value, train: bool) -> Result<FfnOut, LowerError> {
    let (h, e) = (Dim::from(cx.m.hidden), Dim::from(moe.routed_experts));

    // Router: logits = x·Wᵀ in f32, then scores, selection and gate weights in one op.
    b.at(&[&format!("{key}.router"), key]);
    let w = b.param("mlp.gate.weight", Ty::new(cx.dt, [e, h]));
    let xf = b.cast(x, ROUTER_DTYPE)?;
    let wf = b.cast(w, ROUTER_DTYPE)?;
    let logits = b.matmul(xf, wf)?;
    let routing = Routing::from(&moe.router);
    let mut inputs = vec![logits];
    if routing.selection_bias {
        inputs.push(b.param("mlp.gate.e_score_correction_bias", Ty::new(ROUTER_DTYPE, [e])));
    }
    let route = b.node(Op::MoeRoute(routing), &inputs)?;

    // Routed experts: one grouped op over weights stacked along a leading expert axis.
    b.at(&[&format!("{key}.routed_experts"), key]);
    let i = Dim::from(moe.expert_intermediate);
    let gate = b.param("mlp.experts.gate_proj.weight", Ty::new(cx.dt, [e, i, h]));
    let up = b.param("mlp.experts.up_proj.weight", Ty::new(cx.dt, [e, i, h]));
    let down = b.param("mlp.experts.down_proj.weight", Ty::new(cx.dt, [e, h, i]));
    let routed = b.op(Op::ExpertFfn, &[x, route.out(0), route.out(1), gate, up, down])?;
    let router = if train {
        b.at(&[&format!("{key}.balance"), &format!("{key}.router"), key]);
        Some(router_stats(b, moe, &routing, logits, route.out(0))?)
    } else {
        None
    };
    if moe.shared_experts == 0 {
        return Ok(FfnOut { y: routed, router });
    }

    // Shared experts: every token, one SwiGLU as wide as all of them together.
    b.at(&[&format!("{key}.shared_experts"), key]);
    let shared = swiglu(b, cx, x, "mlp.shared_experts", moe.shared_experts * moe.expert_intermediate)?;
    b.at(&[key]);
    Ok(FfnOut { y: b.binary(BinaryOp::Add, routed, shared)?, router })
}

/// The expert loads and the balance loss of one MoE layer from its router logits
/// `[b, s, E]` and chosen experts `[b, s, K]` (formulas in the module doc).
fn router_stats(b: &mut Builder, moe: &Moe, routing: &Routing, logits: Value, idx: Value) -> Result<RouterStats, LowerError> {
    let (e, k) = (moe.routed_experts, routing.top_k as u64);
    let f32s = |b: &mut Builder, v: f64| b.constant(v, ROUTER_DTYPE);
    let reduce = |b: &mut Builder, op: ReduceOp, x: Value, axis: u8| b.op(Op::Reduce { op, axis, keepdim: false }, &[x]);
    // chosen[b, s, E] = 1 where the token chose the expert.
    let mut shape = b.ty(idx).shape.0.clone();
    shape.push(Dim::lit(1));
    let idx1 = b.reshape(idx, shape)?;
    let ramp = b.op(Op::Iota { start: Dim::lit(0), len: Dim::from(e), dtype: DType::I32 }, &[])?;
    let hot = b.binary(BinaryOp::Eq, idx1, ramp)?;
    let hot = b.cast(hot, ROUTER_DTYPE)?;
    let chosen = reduce(b, ReduceOp::Sum, hot, 2)?;
    let per_seq = reduce(b, ReduceOp::Sum, chosen, 1)?;
    let load = reduce(b, ReduceOp::Sum, per_seq, 0)?;

    let bal = &moe.balance;
    let mut aux: Option<Value> = None;
    if bal.expert_aux != 0.0 || bal.sequence_aux != 0.0 {
        // Scores over all experts, normalised per token.
        let scores = match routing.scoring {
            Scoring::Softmax => b.op(Op::Softmax { axis: 2 }, &[logits])?,
            Scoring::Sigmoid => {
                let s = b.op(Op::Unary(UnaryOp::Sigmoid), &[logits])?;
                let sum = b.op(Op::Reduce { op: ReduceOp::Sum, axis: 2, keepdim: true }, &[s])?;
                b.binary(BinaryOp::Div, s, sum)?
            }
        };
        // Per sequence: f[b, E] = E/K · mean_s chosen, P[b, E] = mean_s scores.
        let f_seq = reduce(b, ReduceOp::Mean, chosen, 1)?;
        let p_seq = reduce(b, ReduceOp::Mean, scores, 1)?;
        let c = f32s(b, e as f64 / k as f64);
        let f_seq = b.binary(BinaryOp::Mul, f_seq, c)?;
        let mut add = |b: &mut Builder, term: Value, alpha: f64| -> Result<(), LowerError> {
            let a = f32s(b, alpha);
            let t = b.binary(BinaryOp::Mul, term, a)?;
            aux = Some(match aux {
                None => t,
                Some(s) => b.binary(BinaryOp::Add, s, t)?,
            });
            Ok(())
        };
        if bal.sequence_aux != 0.0 {
            let fp = b.binary(BinaryOp::Mul, f_seq, p_seq)?;
            let per = reduce(b, ReduceOp::Sum, fp, 1)?;
            let l = reduce(b, ReduceOp::Mean, per, 0)?;
            add(b, l, bal.sequence_aux)?;
        }
        if bal.expert_aux != 0.0 {
            // Over the whole batch: with equal sequence lengths, the mean over sequences
            // of the per-sequence means is the mean over all tokens.
            let f = reduce(b, ReduceOp::Mean, f_seq, 0)?;
            let p = reduce(b, ReduceOp::Mean, p_seq, 0)?;
            let fp = b.binary(BinaryOp::Mul, f, p)?;
            let l = reduce(b, ReduceOp::Sum, fp, 0)?;
            add(b, l, bal.expert_aux)?;
        }
    }
    let aux = match aux {
        Some(a) => a,
        None => f32s(b, 0.0),
    };
    Ok(RouterStats { aux, load })
}
