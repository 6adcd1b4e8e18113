//! `fuse_swiglu`: a SwiGLU feed-forward written in primitives becomes one `swiglu` again.
//!
//! ```text
//!   %g = matmul(%x, %Wg)
//!   %a = silu(%g)
//!   %u = matmul(%x, %Wu)           ──▶   %y = swiglu(%x, %Wg, %Wu, %Wd)
//!   %h = mul(%a, %u)      (either order)
//!   %y = matmul(%h, %Wd)
//! ```
//!
//! Both projections must read the same `x`, and `g`, `a`, `u`, `h` must have no other
//! user (otherwise the composite would compute them a second time). This is what
//! `decompose` writes for `swiglu`, so decompose-then-fuse gives the lowered graph back;
//! a hand-written or imported graph in the same shape fuses too. The result is the
//! kernel library's fused gate/up GEMM with the SiLU·mul epilogue.

use super::pattern::{binary, either, of, replace_if_typed, single_user};
use super::rewrite::{rewrite, Rewrite, Rule};
use super::{Changed, Pass, PassCx, PassError, Phase};
use crate::ir::{BinaryOp, Graph, Module, NodeId, Op, UnaryOp, Value};

/// Re-forms `swiglu` from its primitives.
pub struct FuseSwiGlu;

impl Pass for FuseSwiGlu {
    fn name(&self) -> &'static str {
        "fuse_swiglu"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn phase(&self) -> Option<Phase> {
        Some(Phase::Fused)
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        run_rules(self.name(), m, cx, RULES, "swiglu")
    }
}

/// The rule table.
pub static RULES: &[Rule] = &[Rule { name: "swiglu", apply: swiglu }];

/// Run `rules` over every function and report how many composites they formed; shared by
/// the pattern-fusion passes.
pub(super) fn run_rules(pass: &'static str, m: &mut Module, cx: &mut PassCx, rules: &[Rule], what: &str) -> Result<Changed, PassError> {
    let mut formed = 0;
    for f in &mut m.functions {
        let stats = rewrite(&mut f.graph, rules).map_err(|e| {
            let message = format!("rule `{}`: {}", e.rule, e.message);
            match e.node {
                Some(n) if f.graph.contains(n) => PassError::at(&f.name, &f.graph, n, message),
                _ => PassError { problems: vec![super::Problem { function: f.name.clone(), node: e.node, span: None, message }] },
            }
        })?;
        formed += stats.total();
    }
    if formed > 0 {
        cx.report(pass, format!("formed {formed} {what}"));
    }
    Ok((formed > 0).into())
}

/// `matmul(mul(silu(matmul(x, Wg)), matmul(x, Wu)), Wd)` → `swiglu(x, Wg, Wu, Wd)`.
fn swiglu(g: &Graph, n: NodeId) -> Option<Rewrite> {
    if g.node(n).op != Op::MatMul {
        return None;
    }
    let ins = g.inputs(n);
    let (h, down) = (ins[0], ins[1]);
    let (a, b) = binary(g, h, BinaryOp::Mul)?;
    let (x, gate, up) = either(a, b, |act, u| {
        let gm = of(g, act, |o| *o == Op::Unary(UnaryOp::Silu))?[0];
        let gi = of(g, gm, |o| *o == Op::MatMul)?;
        let ui = of(g, u, |o| *o == Op::MatMul)?;
        let only = [h, act, gm, u].iter().all(|&v: &Value| single_user(g, v));
        (gi[0] == ui[0] && only).then_some((gi[0], gi[1], ui[1]))
    })?;
    replace_if_typed(g, n, Op::SwiGlu, vec![x, gate, up, down])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Dim;
    use crate::passes::test_util::{f32t, n, text};

    #[test]
    fn fuses_either_operand_order_and_only_private_intermediates() {
        for swap in [false, true] {
            let mut g = Graph::new();
            let x = g.input(0, "x", f32t([Dim::B, n(8)]), None);
            let wg = g.param("g", f32t([n(6), n(8)]), None);
            let wu = g.param("u", f32t([n(6), n(8)]), None);
            let wd = g.param("d", f32t([n(8), n(6)]), None);
            let gm = g.add_inferred(Op::MatMul, &[x.into(), wg.into()], None).unwrap();
            let a = g.add_inferred(Op::Unary(UnaryOp::Silu), &[gm.into()], None).unwrap();
            let u = g.add_inferred(Op::MatMul, &[x.into(), wu.into()], None).unwrap();
            let pair = if swap { [u.into(), a.into()] } else { [a.into(), u.into()] };
            let h = g.add_inferred(Op::Binary(BinaryOp::Mul), &pair, None).unwrap();
            let y = g.add_inferred(Op::MatMul, &[h.into(), wd.into()], None).unwrap();
            g.ret(&[y.into()], None);
            let mut shared = g.clone();
            rewrite(&mut g, RULES).unwrap();
            assert_eq!(text(&g).matches("swiglu(%0, %1, %2, %3)").count(), 1, "{}", text(&g));
            assert!(!text(&g).contains("silu"), "{}", text(&g));
            // The gate activation is also returned: fusing would compute it twice.
            let r = shared.return_node().unwrap();
            shared.set_input(r, 1, a.into());
            assert_eq!(rewrite(&mut shared, RULES).unwrap().total(), 0);
        }
    }
}
