//! The program of a fused kernel ([`Op::Fused`]): an optional head op,
//! then elementwise steps over numbered inputs, each step reading the head, an input or
//! an earlier step.
//!
//! ```text
//!   %7 = matmul(%5, %6)                 %9 = fused(%5, %6, %0, %8)
//!   %8 = const 0.5            ──▶            {h=matmul(i0, i1); s0=add(i2, h); s1=mul(s0, i3)}
//!   %9 = mul(add(%0, %7), %8)
//! ```
//!
//! The text form names the head's value `h`, input `k` of the fused node `ik` and step
//! `j`'s value `sj`; the last step is the kernel's result. A kernel is closed data
//! (`Eq + Hash`) like every [`Op`] setting, so CSE merges equal kernels over
//! equal inputs, and a backend reads the whole loop body off the node.
//!
//! Why this shape: elementwise chains are what a fuser can always put in one loop, and
//! the two producers worth absorbing are the ones whose output is written once and then
//! only read elementwise: a matmul (its epilogue runs on the accumulator tile) and an
//! RMSNorm (its row is in registers when it is scaled). Anything else stays a node.

use super::dtype::DType;
use super::op::{BinaryOp, Float, Op, UnaryOp};
use std::fmt;

/// The kernel: `head` (reading inputs 0 and 1) and `steps`, in evaluation order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FusedKernel {
    pub head: Option<Head>,
    pub steps: Vec<Step>,
}

/// The non-elementwise op a kernel may start with; its result is the operand
/// [`Operand::Head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Head {
    /// `matmul(i0, i1)`: the kernel is the matmul's epilogue.
    MatMul,
    /// `rms_norm(i0, i1)`: the kernel runs on each normalised row.
    RmsNorm { eps: Float },
}

/// What a step reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operand {
    /// The head's result.
    Head,
    /// Input `k` of the fused node.
    Input(u16),
    /// The result of step `j` (an earlier step).
    Step(u16),
}

/// One elementwise operation of the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepOp {
    Unary(UnaryOp),
    Binary(BinaryOp),
    Select,
    Cast(DType),
}

/// `op(args)`, `args` in the op's slot order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Step {
    pub op: StepOp,
    pub args: Vec<Operand>,
}

impl Head {
    /// The head as a standalone op (same shape rule, same numerics).
    pub fn op(self) -> Op {
        match self {
            Head::MatMul => Op::MatMul,
            Head::RmsNorm { eps } => Op::RmsNorm { eps },
        }
    }

    /// The head form of `op`, when it can head a kernel.
    pub fn from_op(op: &Op) -> Option<Head> {
        match op {
            Op::MatMul => Some(Head::MatMul),
            Op::RmsNorm { eps } => Some(Head::RmsNorm { eps: *eps }),
            _ => None,
        }
    }
}

impl StepOp {
    /// The step as a standalone op (same shape rule, same numerics).
    pub fn op(self) -> Op {
        match self {
            StepOp::Unary(u) => Op::Unary(u),
            StepOp::Binary(b) => Op::Binary(b),
            StepOp::Select => Op::Select,
            StepOp::Cast(to) => Op::Cast { to },
        }
    }

    /// The step form of an elementwise op ([`Op::is_elementwise`]).
    pub fn from_op(op: &Op) -> Option<StepOp> {
        match op {
            Op::Unary(u) => Some(StepOp::Unary(*u)),
            Op::Binary(b) => Some(StepOp::Binary(*b)),
            Op::Select => Some(StepOp::Select),
            Op::Cast { to } => Some(StepOp::Cast(*to)),
            _ => None,
        }
    }
}

impl FusedKernel {
    /// How many inputs the fused node takes: one past the highest input any step reads,
    /// and at least the head's two.
    pub fn num_inputs(&self) -> usize {
        let head = if self.head.is_some() { 2 } else { 0 };
        let steps = self.steps.iter().flat_map(|s| &s.args).filter_map(|a| match a {
            Operand::Input(k) => Some(*k as usize + 1),
            _ => None,
        });
        steps.fold(head, usize::max)
    }

    /// The operand that is the kernel's result: the last step, or the head alone.
    pub fn result(&self) -> Operand {
        match self.steps.len() {
            0 => Operand::Head,
            n => Operand::Step(n as u16 - 1),
        }
    }

    /// How many times the program reads `o` (a step reading it twice counts twice).
    pub fn reads(&self, o: Operand) -> usize {
        self.steps.iter().flat_map(|s| &s.args).filter(|&&a| a == o).count()
    }

    /// How many distinct steps read `o`. In a kernel a fuser builds from a tree of
    /// single-user values this is 1 for every value but the result.
    pub fn readers(&self, o: Operand) -> usize {
        self.steps.iter().filter(|s| s.args.contains(&o)).count()
    }

    /// How many ops the kernel stands for (head and steps).
    pub fn len(&self) -> usize {
        self.steps.len() + usize::from(self.head.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Head => f.write_str("h"),
            Operand::Input(k) => write!(f, "i{k}"),
            Operand::Step(j) => write!(f, "s{j}"),
        }
    }
}

impl fmt::Display for FusedKernel {
    /// `{h=matmul(i0, i1); s0=add(i2, h); s1=cast(s0) to=bf16}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        match self.head {
            Some(Head::MatMul) => parts.push("h=matmul(i0, i1)".into()),
            Some(Head::RmsNorm { eps }) => parts.push(format!("h=rms_norm(i0, i1) eps={eps}")),
            None => {}
        }
        for (j, s) in self.steps.iter().enumerate() {
            let args: Vec<String> = s.args.iter().map(|a| a.to_string()).collect();
            let mut p = format!("s{j}={}({})", s.op.op().name(), args.join(", "));
            if let StepOp::Cast(to) = s.op {
                p.push_str(&format!(" to={to}"));
            }
            parts.push(p);
        }
        write!(f, "{{{}}}", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_text() {
        let k = FusedKernel {
            head: Some(Head::MatMul),
            steps: vec![
                Step { op: StepOp::Binary(BinaryOp::Add), args: vec![Operand::Input(2), Operand::Head] },
                Step { op: StepOp::Binary(BinaryOp::Mul), args: vec![Operand::Step(0), Operand::Step(0)] },
                Step { op: StepOp::Cast(DType::Bf16), args: vec![Operand::Step(1)] },
            ],
        };
        assert_eq!(k.num_inputs(), 3);
        assert_eq!(k.result(), Operand::Step(2));
        assert_eq!((k.reads(Operand::Step(0)), k.readers(Operand::Step(0))), (2, 1));
        assert_eq!(k.len(), 4);
        assert_eq!(k.to_string(), "{h=matmul(i0, i1); s0=add(i2, h); s1=mul(s0, s0); s2=cast(s1) to=bf16}");
        let n = FusedKernel { head: Some(Head::RmsNorm { eps: Float::new(1e-6) }), steps: vec![] };
        assert_eq!((n.num_inputs(), n.result()), (2, Operand::Head));
        assert_eq!(n.to_string(), "{h=rms_norm(i0, i1) eps=1e-6}");
        assert_eq!(Head::from_op(&Op::MatMul).map(Head::op), Some(Op::MatMul));
        assert_eq!(StepOp::from_op(&Op::Select).map(StepOp::op), Some(Op::Select));
        assert!(StepOp::from_op(&Op::MatMul).is_none());
    }
}
