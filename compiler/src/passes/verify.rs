//! `verify`: the IR verifier as the first step of every pipeline.
//!
//! ```text
//!   module ──ir::verify──▶ Ok: unchanged │ Err: every broken invariant, with spans
//! ```
//!
//! The runner also verifies after each pass in debug builds; this pass makes the check on
//! the *input* unconditional, so a lowering bug is reported as such (with the spec spans
//! of the nodes concerned) rather than as a failure of whichever pass trips over it.

use super::{Changed, Pass, PassCx, PassError};
use crate::ir::{self, Module};

/// Checks every invariant of [`crate::ir::verify()`]; changes nothing.
pub struct Verify;

impl Pass for Verify {
    fn name(&self) -> &'static str {
        "verify"
    }
    fn is_required(&self) -> bool {
        true
    }
    fn run(&self, m: &mut Module, _: &mut PassCx) -> Result<Changed, PassError> {
        ir::verify(m).map_err(PassError::from)?;
        Ok(Changed::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Graph, Mode, Op, UnaryOp};
    use crate::passes::test_util::{f32t, module_of, n};

    #[test]
    fn reports_every_problem() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let e = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        g.ret(&[e.into()], None);
        let mut m = module_of("f", g.clone(), Mode::Prefill);
        assert_eq!(Verify.run(&mut m, &mut PassCx::new(Mode::Prefill)), Ok(Changed::No));

        g.node_mut(e).outputs[0] = f32t([n(5)]);
        g.param("w", f32t([n(4)]), None);
        g.param("w", f32t([n(4)]), None);
        let mut m = module_of("f", g, Mode::Prefill);
        let err = Verify.run(&mut m, &mut PassCx::new(Mode::Prefill)).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems.iter().all(|p| p.function == "f"));
    }
}
