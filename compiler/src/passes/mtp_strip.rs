//! `mtp_strip`: multi-token prediction (DeepSeek-V3 §2.2) is a training objective;
//! inference must not run it. On the modules dsc lowers there is nothing to strip, so
//! this pass *checks* that, and fails loudly if an inference entry ever reaches an MTP
//! module.
//!
//! ```text
//!   entries:   prefill ──▶ prefill.layer.*          train ──▶ train.layer.*
//!              decode  ──▶ decode.layer.*                 └─▶ train.mtp.1 … train.mtp.D   (+ their loss terms)
//!                    ▲                                                   ▲
//!                    └── must never reach ────────────────────────────────┘
//! ```
//!
//! # Why a check and not a rewrite
//!
//! Lowering ([`crate::lower`]) builds the MTP modules as functions `train.mtp.{k}`, called
//! only from the `train` entry, whose loss they add to; the prefill and decode entries
//! never contain MTP (the lowering's documented convention). When an inference mode is
//! compiled, [`crate::passes::compile`] first keeps only that mode's entry, so the
//! `train` entry, and with it every call of an MTP module and every MTP loss term, is
//! already unreachable before any pass runs; [`super::dce`] then deletes those functions
//! with the rest of the training graph. Removing them here too would only duplicate DCE
//! (and, run before it, would leave the unreachable `train` function calling a missing
//! function, which the verifier rejects). Stripping MTP *inside* an inference entry would
//! mean dropping results of that entry, a change of its signature no pass may make
//! silently. So the one thing worth doing is to hold the line:
//!
//! - no function reachable from the prefill or decode entry is an MTP module
//!   (`{mode}.mtp.{k}`, [`is_mtp_function`]);
//! - none reads an MTP weight (`eh_proj`, `enorm`, `hnorm`, `shared_head.norm`,
//!   [`is_mtp_param`]), which catches an MTP module built inline rather than called.
//!
//! A violation is a [`PassError`] at the offending call or param, with its spec span. The
//! `train` entry is never inspected: its MTP loss is part of the objective. The pass
//! changes nothing, ever.

use super::{Changed, Pass, PassCx, PassError, Problem};
use crate::ir::{Mode, Module, Op};
use std::collections::BTreeSet;

/// Checks that no inference entry reaches an MTP module; changes nothing.
pub struct MtpStrip;

impl Pass for MtpStrip {
    fn name(&self) -> &'static str {
        "mtp_strip"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn run(&self, m: &mut Module, _cx: &mut PassCx) -> Result<Changed, PassError> {
        let problems = mtp_reachable_from_inference(m);
        if problems.is_empty() {
            Ok(Changed::No)
        } else {
            Err(PassError { problems })
        }
    }
}

/// Whether `name` is an MTP module function by the lowering's naming
/// (`train.mtp.1`; any mode prefix, so a future inference MTP is caught too).
pub fn is_mtp_function(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    matches!(parts[..], [_, "mtp", k] if k.parse::<u32>().is_ok())
}

/// Whether a param (named relative to its function) is one only an MTP module has.
pub fn is_mtp_param(name: &str) -> bool {
    ["eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"]
        .iter()
        .any(|p| name == *p || name.ends_with(&format!(".{p}")))
}

/// Every way the prefill and decode entries reach MTP: calls of an MTP function and MTP
/// params, each located at its node. Empty when the invariant holds.
pub fn mtp_reachable_from_inference(m: &Module) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for mode in [Mode::Prefill, Mode::Decode] {
        let Some(entry) = m.entries.get(&mode) else { continue };
        let mut stack: Vec<&str> = vec![entry.as_str()];
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            let Some(f) = m.function(name) else { continue };
            let g = &f.graph;
            for n in g.nodes() {
                match &g.node(n).op {
                    Op::Call { function, .. } if is_mtp_function(function) => {
                        let msg = format!("the {mode} entry reaches the MTP module `{function}`; inference must not run MTP");
                        problems.push(Problem::at(&f.name, g, n, msg));
                    }
                    Op::Call { function, .. } => stack.push(function),
                    Op::Param { name: p } if is_mtp_param(p) => {
                        let msg = format!("the {mode} entry reads the MTP weight `{p}`; inference must not run MTP");
                        problems.push(Problem::at(&f.name, g, n, msg));
                    }
                    _ => {}
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, Graph, Signature};
    use crate::lower::lower;
    use crate::passes::test_util::{f32t, module_of, n};
    use crate::passes::{compile, PassSelection};

    fn tiny_v3() -> dsc_dsl::Spec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_v3.dsc");
        dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()))
    }

    #[test]
    fn names() {
        assert!(is_mtp_function("train.mtp.1") && is_mtp_function("decode.mtp.12"));
        assert!(!is_mtp_function("train.layer.moe") && !is_mtp_function("train.mtp.x") && !is_mtp_function("mtp"));
        assert!(is_mtp_param("eh_proj.weight") && is_mtp_param("model.layers.4.shared_head.norm.weight"));
        assert!(!is_mtp_param("input_layernorm.weight") && !is_mtp_param("model.norm.weight"));
    }

    #[test]
    fn lowered_inference_entries_never_reach_mtp() {
        // All three modes in one module: the train entry does reach train.mtp.1, which is
        // not the pass's business; prefill and decode do not.
        let mut m = lower(&tiny_v3()).unwrap();
        assert!(m.function("train.mtp.1").is_some());
        let mut cx = PassCx::new(Mode::Decode);
        assert_eq!(MtpStrip.run(&mut m, &mut cx), Ok(Changed::No));
        // Compiling decode from it: the train graph, MTP included, is gone by the end
        // (DCE's doing), and mtp_strip ran without finding anything.
        compile(&mut m, &PassSelection::all(), &mut cx).unwrap();
        assert!(m.functions.iter().all(|f| !is_mtp_function(&f.name) && f.name.starts_with("decode")));
        assert!(cx.timings.iter().any(|t| t.pass == "mtp_strip"));
    }

    #[test]
    fn an_inference_entry_calling_mtp_is_an_error() {
        let ty = f32t([Dim::B, n(4)]);
        let mut g = Graph::new();
        let x = g.input(0, "x", ty.clone(), None);
        let sig = Signature { inputs: vec![ty.clone()], outputs: vec![ty.clone()] };
        let c = g.call("decode.mtp.1", Some(4), &sig, &[x.into()], None).unwrap();
        g.ret(&[c.into()], None);
        let mut m = module_of("decode", g, Mode::Decode);
        let mut body = Graph::new();
        let y = body.input(0, "x", ty.clone(), None);
        let w = body.param("enorm.weight", f32t([n(4)]), None);
        let z = body.add_inferred(Op::RmsNorm { eps: 1e-6.into() }, &[y.into(), w.into()], None).unwrap();
        body.ret(&[z.into()], None);
        m.add_function(crate::ir::Function { name: "decode.mtp.1".into(), graph: body });

        let e = MtpStrip.run(&mut m, &mut PassCx::new(Mode::Decode)).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.to_string(), "in `decode`: the decode entry reaches the MTP module `decode.mtp.1`; inference must not run MTP");

        // Inlined under another name, the weight gives it away.
        let f = m.functions.iter_mut().find(|f| f.name == "decode.mtp.1").unwrap();
        f.name = "decode.layer.extra".into();
        let g = &mut m.functions[0].graph;
        let call = g.nodes().into_iter().find(|&n| matches!(g.node(n).op, Op::Call { .. })).unwrap();
        g.node_mut(call).op = Op::Call { function: "decode.layer.extra".into(), layer: Some(4) };
        let e = MtpStrip.run(&mut m, &mut PassCx::new(Mode::Decode)).unwrap_err();
        assert!(e.to_string().contains("reads the MTP weight `enorm.weight`"), "{e}");
    }
}
