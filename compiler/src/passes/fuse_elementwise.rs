//! `fuse_elementwise`: maximal trees of elementwise ops become one `fused` kernel, with the
//! matmul or RMSNorm that feeds them as the kernel's head (its epilogue) when that pays.
//!
//! ```text
//!   %7 = matmul(%5, %6)                         %9 = fused(%5, %6, %0, %8)
//!   %8 = const 0.5                  ──▶              {h=matmul(i0, i1); s0=add(i2, h); s1=mul(s0, i3)}
//!   %9 = mul(add(%0, %7), %8)                   (%7 and the add never reach memory)
//! ```
//!
//! A **sink** is an elementwise node that cannot join its consumer's kernel: it has several
//! users, or its one user is not elementwise. From each sink (visited last-first, so a
//! kernel is always grown from its bottom) the pass streams the producers above it, latest
//! first, to competing **fusers**, burn's `OperationFuser` in small:
//!
//! - [`fuse`](Fuser::fuse) offers a node; a fuser takes it when the node is elementwise
//!   (or the one head it may take) and its only user is already in the fuser's group, so
//!   every intermediate of a kernel has exactly one user, inside the kernel;
//! - [`status`](Fuser::status) is `Open` while the group has producers not yet offered,
//!   `Closed` once it can grow no further; streaming stops when every fuser is closed;
//! - [`properties`](Fuser::properties) give a `score`, the bytes of intermediates the
//!   kernel keeps out of memory at the pipeline's concrete sizes, and `ready`, whether the
//!   kernel is worth forming (at least two ops);
//! - the ready fuser with the best score is [`finish`](Fuser::finish)ed into the
//!   [`FusedKernel`] that replaces its group.
//!
//! The competitors are a plain elementwise fuser and an epilogue fuser per head kind
//! (`matmul`, `rms_norm`). An epilogue fuser sees the same tree plus the head, so it wins
//! whenever the head's single user is in the tree; the plain one forms kernels that have
//! no head to absorb. Fusion never changes a value: a kernel evaluates the same ops in
//! the same order, only without storing the intermediates.

use super::pattern::sole_user;
use super::{Changed, Pass, PassCx, PassError, Phase};
use crate::ir::{Bindings, FusedKernel, Graph, Head, Module, NodeId, Op, Operand, Step, StepOp, Ty, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Forms fused elementwise kernels and matmul / RMSNorm epilogues.
pub struct FuseElementwise;

impl Pass for FuseElementwise {
    fn name(&self) -> &'static str {
        "fuse_elementwise"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn phase(&self) -> Option<Phase> {
        Some(Phase::Fused)
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let mut formed: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut ops = 0;
        for f in &mut m.functions {
            let stats = fuse_graph(&mut f.graph, &cx.sizes).map_err(|(n, msg)| PassError::at(&f.name, &f.graph, n, msg))?;
            for (kind, k, n) in stats {
                *formed.entry(kind).or_default() += k;
                ops += n;
            }
        }
        if formed.is_empty() {
            return Ok(Changed::No);
        }
        let list: Vec<String> = formed.iter().map(|(k, n)| format!("{n} {k}")).collect();
        cx.report(self.name(), format!("formed {} kernel(s) from {ops} ops", list.join(", ")));
        Ok(Changed::Yes)
    }
}

/// Burn's `FuserStatus`: whether a fuser can still take nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuserStatus {
    Open,
    Closed,
}

/// Burn's `FuserProperties`: how good the kernel would be, and whether it is worth it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuserProperties {
    /// Bytes of intermediate values the kernel keeps out of memory.
    pub score: u64,
    /// Whether the kernel has at least two ops (one op alone saves nothing).
    pub ready: bool,
}

/// A kernel under construction, grown upward from a sink.
pub trait Fuser {
    /// What kind of kernel this fuser builds, for reports.
    fn kind(&self) -> &'static str;
    /// Offer producer `n` (one of the group's inputs); returns whether it was taken.
    fn fuse(&mut self, g: &Graph, n: NodeId) -> bool;
    fn status(&self) -> FuserStatus;
    fn properties(&self, g: &Graph, sizes: &Bindings) -> FuserProperties;
    /// The group's nodes (head included), for the driver to replace.
    fn members(&self) -> &BTreeSet<NodeId>;
    /// The kernel and the fused node's inputs; `rank` orders nodes topologically.
    fn finish(&self, g: &Graph, rank: &HashMap<NodeId, usize>) -> (FusedKernel, Vec<Value>);
}

/// The group every fuser shares the logic of: a tree of single-user elementwise nodes
/// below `sink`, plus (for an epilogue fuser) one head.
struct Group {
    sink: NodeId,
    members: BTreeSet<NodeId>,
    /// Producers of members not yet offered.
    frontier: BTreeSet<NodeId>,
    /// The head kind this fuser may take (`None`: a plain elementwise fuser).
    head_kind: Option<fn(&Op) -> bool>,
    head: Option<NodeId>,
    kind: &'static str,
}

impl Group {
    fn new(g: &Graph, sink: NodeId, kind: &'static str, head_kind: Option<fn(&Op) -> bool>) -> Group {
        let mut grp = Group { sink, members: BTreeSet::from([sink]), frontier: BTreeSet::new(), head_kind, head: None, kind };
        grp.frontier.extend(g.inputs(sink).into_iter().map(|v| v.node));
        grp
    }
}

impl Fuser for Group {
    fn kind(&self) -> &'static str {
        // An epilogue fuser that found no head built a plain elementwise kernel.
        if self.head.is_some() {
            self.kind
        } else {
            "elementwise"
        }
    }

    fn fuse(&mut self, g: &Graph, n: NodeId) -> bool {
        if !self.frontier.remove(&n) {
            return false;
        }
        // Its only user must be inside: then no value of the kernel is needed outside it.
        if !sole_user(g, n).is_some_and(|u| self.members.contains(&u)) {
            return false;
        }
        let op = &g.node(n).op;
        let take = if op.is_elementwise() {
            true
        } else {
            let is_head = self.head_kind.is_some_and(|k| k(op));
            if is_head && self.head.is_none() {
                self.head = Some(n);
            }
            self.head == Some(n)
        };
        if take {
            self.members.insert(n);
            // A head's inputs are the kernel's inputs; only elementwise nodes grow the tree.
            if op.is_elementwise() {
                self.frontier.extend(g.inputs(n).into_iter().map(|v| v.node));
            }
        }
        take
    }

    fn status(&self) -> FuserStatus {
        if self.frontier.is_empty() {
            FuserStatus::Closed
        } else {
            FuserStatus::Open
        }
    }

    fn properties(&self, g: &Graph, sizes: &Bindings) -> FuserProperties {
        let score = self.members.iter().filter(|&&n| n != self.sink).map(|&n| bytes(g.node(n).ty(), sizes)).sum();
        FuserProperties { score, ready: self.members.len() >= 2 }
    }

    fn members(&self) -> &BTreeSet<NodeId> {
        &self.members
    }

    fn finish(&self, g: &Graph, rank: &HashMap<NodeId, usize>) -> (FusedKernel, Vec<Value>) {
        let mut inputs: Vec<Value> = Vec::new();
        let mut operand: HashMap<Value, Operand> = HashMap::new();
        let head = self.head.map(|h| {
            inputs.extend(g.inputs(h));
            operand.insert(h.out(0), Operand::Head);
            Head::from_op(&g.node(h).op).expect("a head fuser only takes head ops")
        });
        let mut order: Vec<NodeId> = self.members.iter().copied().filter(|&n| Some(n) != self.head).collect();
        order.sort_by_key(|n| at(rank, *n));
        let mut steps = Vec::with_capacity(order.len());
        for n in order {
            let args = g
                .inputs(n)
                .into_iter()
                .map(|v| match operand.get(&v) {
                    Some(&o) => o,
                    None => {
                        // An outside value: a new input, unless the head already reads it.
                        let at = inputs.iter().position(|&i| i == v).unwrap_or_else(|| {
                            inputs.push(v);
                            inputs.len() - 1
                        });
                        Operand::Input(at as u16)
                    }
                })
                .collect();
            let op = StepOp::from_op(&g.node(n).op).expect("only elementwise nodes are steps");
            operand.insert(n.out(0), Operand::Step(steps.len() as u16));
            steps.push(Step { op, args });
        }
        (FusedKernel { head, steps }, inputs)
    }
}

/// Bytes of a value at concrete sizes.
fn bytes(t: &Ty, sizes: &Bindings) -> u64 {
    let n: i64 = t.shape.eval(sizes).into_iter().product();
    n.max(0) as u64 * t.dtype.bytes()
}

/// The fusers that compete for each sink, in tie-breaking order.
fn fusers(g: &Graph, sink: NodeId) -> Vec<Group> {
    vec![
        Group::new(g, sink, "matmul epilogue", Some(|op| matches!(op, Op::MatMul))),
        Group::new(g, sink, "rms_norm epilogue", Some(|op| matches!(op, Op::RmsNorm { .. }))),
        Group::new(g, sink, "elementwise", None),
    ]
}

/// `(kind, kernels, ops fused)` per kind of kernel [`fuse_graph`] formed.
pub type FuseStats = Vec<(&'static str, usize, usize)>;

/// Fuse one graph. An error names a node whose kernel failed its own shape rule (a bug
/// in this pass).
pub fn fuse_graph(g: &mut Graph, sizes: &Bindings) -> Result<FuseStats, (NodeId, String)> {
    let order = g.topo_order().map_err(|c| (c.0[0], "the graph has a cycle".to_string()))?;
    let rank: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut done: HashSet<NodeId> = HashSet::new();
    let mut stats: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    for &sink in order.iter().rev() {
        if done.contains(&sink) || !g.node(sink).op.is_elementwise() || joins_consumer(g, sink) {
            continue;
        }
        let mut fs = fusers(g, sink);
        // Stream producers latest-first to every open fuser that is waiting for them.
        while fs.iter().any(|f| f.status() == FuserStatus::Open) {
            let next = fs.iter().filter_map(|f| f.frontier.iter().max_by_key(|n| at(&rank, **n))).max_by_key(|n| at(&rank, **n)).copied();
            let Some(next) = next else { break };
            for f in &mut fs {
                f.fuse(g, next);
            }
        }
        let best = fs.iter().map(|f| (f, f.properties(g, sizes))).filter(|(_, p)| p.ready).fold(
            None::<(&Group, FuserProperties)>,
            |best, (f, p)| match best {
                Some((_, bp)) if bp.score >= p.score => best,
                _ => Some((f, p)),
            },
        );
        let Some((f, _)) = best else { continue };
        let (kernel, inputs) = f.finish(g, &rank);
        let want = g.node(sink).outputs.clone();
        let span = g.node(sink).span;
        let fused = g.add_inferred(Op::Fused(kernel), &inputs, span).map_err(|e| (sink, format!("fused kernel: {e}")))?;
        if g.node(fused).outputs != want {
            return Err((sink, format!("fused kernel has type {:?}, the sink {:?}", g.node(fused).outputs, want)));
        }
        g.replace_all_uses(sink, fused);
        let mut members: Vec<NodeId> = f.members().iter().copied().collect();
        // Users before producers, so each node is unused when it goes.
        members.sort_by_key(|n| std::cmp::Reverse(at(&rank, *n)));
        for &n in &members {
            g.remove(n);
            done.insert(n);
        }
        let e = stats.entry(f.kind()).or_default();
        e.0 += 1;
        e.1 += members.len();
    }
    Ok(stats.into_iter().map(|(k, (a, b))| (k, a, b)).collect())
}

/// `n`'s position in the topological order the pass started from. A kernel formed during
/// the pass is never upstream of a later sink, so it is never looked up; should that ever
/// change, such a node counts as the latest and is simply refused.
fn at(rank: &HashMap<NodeId, usize>, n: NodeId) -> usize {
    rank.get(&n).copied().unwrap_or(usize::MAX)
}

/// Whether `n`'s one user is elementwise, so `n` belongs to that user's kernel.
fn joins_consumer(g: &Graph, n: NodeId) -> bool {
    sole_user(g, n).is_some_and(|u| g.node(u).op.is_elementwise())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Dim, Float, Mode, UnaryOp};
    use crate::passes::test_util::{f32t, module_of, n, text};

    fn op(g: &mut Graph, o: Op, ins: &[NodeId]) -> NodeId {
        let v: Vec<Value> = ins.iter().map(|&i| i.into()).collect();
        g.add_inferred(o, &v, None).unwrap()
    }

    fn run(g: &mut Graph) -> FuseStats {
        let s = fuse_graph(g, &Bindings { batch: 1, seq: 8, cache: 0 }).unwrap();
        assert_eq!(crate::ir::verify(&module_of("f", g.clone(), Mode::Prefill)), Ok(()), "{}", text(g));
        s
    }

    #[test]
    fn matmul_epilogue_takes_the_residual_add() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([Dim::B, Dim::S, n(8)]), None);
        let w = g.param("w", f32t([n(8), n(8)]), None);
        let k = g.constant(0.5, DType::F32, None);
        let mm = op(&mut g, Op::MatMul, &[x, w]);
        let a = op(&mut g, Op::Binary(BinaryOp::Add), &[x, mm]);
        let m = op(&mut g, Op::Binary(BinaryOp::Mul), &[a, k]);
        g.ret(&[m.into()], None);
        assert_eq!(run(&mut g), [("matmul epilogue", 1, 3)]);
        let t = text(&g);
        assert!(t.contains("= fused(%0, %1, %2) {h=matmul(i0, i1); s0=add(i0, h); s1=mul(s0, i2)}"), "{t}");
    }

    #[test]
    fn shared_values_end_a_kernel_and_lone_ops_stay() {
        // e = exp(x) has two users: it is a sink of its own (a lone op, not fused); the
        // tree under each user takes it as an input.
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(4)]), None);
        let e = op(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
        let a = op(&mut g, Op::Unary(UnaryOp::Tanh), &[e]);
        let b = op(&mut g, Op::Binary(BinaryOp::Mul), &[a, a]);
        let c = op(&mut g, Op::Unary(UnaryOp::Neg), &[e]);
        let r = op(&mut g, Op::RmsNorm { eps: Float::new(1e-6) }, &[x, x]);
        let s = op(&mut g, Op::Unary(UnaryOp::Sqrt), &[r]);
        g.ret(&[b.into(), c.into(), s.into()], None);
        let stats = run(&mut g);
        assert_eq!(stats, [("elementwise", 1, 2), ("rms_norm epilogue", 1, 2)]);
        let t = text(&g);
        assert!(t.contains("exp(%0)") && t.contains("neg(%1)"), "{t}");
        assert!(t.contains("fused(%1) {s0=tanh(i0); s1=mul(s0, s0)}"), "{t}");
        assert!(t.contains("fused(%0, %0) {h=rms_norm(i0, i1) eps=1e-6; s0=sqrt(h)}"), "{t}");
        // A second run finds nothing left to fuse.
        assert!(run(&mut g).is_empty());
    }
}
