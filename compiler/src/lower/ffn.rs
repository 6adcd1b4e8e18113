//! The feed-forward sublayer: a dense SwiGLU (`mlp.{gate,up,down}_proj`), or a DeepSeekMoE
//! layer (Hugging Face `DeepseekV2Moe` / `DeepseekV3MoE`): an f32 router, the routed
//! experts as one grouped [`Op::ExpertFfn`] over stacked weights, and the always-on shared
//! experts as one SwiGLU of width `shared_experts · expert_intermediate`.

use super::builder::Builder;
use super::{Cx, LowerError};
use crate::ir::{BinaryOp, DType, Dim, Op, Routing, Ty, Value};
use dsc_dsl::model::{Ffn, Moe};

/// Router logits, scores and gate weights are computed in f32 whatever the model dtype,
/// as Hugging Face's DeepSeek gates do (`F.linear(x.float(), weight.float())`): routing
/// decisions must not depend on bf16 rounding.
const ROUTER_DTYPE: DType = DType::F32;

/// `ffn(x)` for `x: [b, seq, hidden]` (already normalised). `key` is the spec path of the
/// block (`ffn.dense`, `ffn.moe`), whose sub-keys give the spans.
pub(super) fn ffn(b: &mut Builder, cx: &Cx, ffn: &Ffn, key: &str, x: Value) -> Result<Value, LowerError> {
    match ffn {
        Ffn::Dense { intermediate } => {
            b.at(&[&format!("{key}.intermediate"), key]);
            swiglu(b, cx, x, "mlp", *intermediate)
        }
        Ffn::Moe(moe) => self::moe(b, cx, moe, key, x),
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

fn moe(b: &mut Builder, cx: &Cx, moe: &Moe, key: &str, x: Value) -> Result<Value, LowerError> {
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
    if moe.shared_experts == 0 {
        return Ok(routed);
    }

    // Shared experts: every token, one SwiGLU as wide as all of them together.
    b.at(&[&format!("{key}.shared_experts"), key]);
    let shared = swiglu(b, cx, x, "mlp.shared_experts", moe.shared_experts * moe.expert_intermediate)?;
    b.at(&[key]);
    b.binary(BinaryOp::Add, routed, shared)
}
