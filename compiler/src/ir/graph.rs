//! The dataflow graph of one function, and the module of functions and entry points.
//!
//! [`Graph`] wraps a `petgraph` `StableGraph` so that passes never handle edge plumbing:
//! they ask for [`Graph::inputs`] in slot order, [`Graph::users`], and rewire with
//! [`Graph::replace_all_uses`]. `StableGraph` keeps every [`NodeId`] valid across
//! removals (a pass may hold ids while it deletes), at the price of index holes, which
//! is why the printer renumbers.
//!
//! An edge runs from producer to consumer and carries [`Edge`] `{ slot, output }`: which
//! input of the consumer it feeds and which output of the producer it reads. A consumer
//! names its input as a [`Value`] `{ node, output }`.

use super::dtype::Ty;
use super::infer::{infer, InferError};
use super::op::{Float, Op};
use dsc_dsl::span::Span;
use petgraph::stable_graph::{EdgeIndex, NodeIndex, StableGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction::{Incoming, Outgoing};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;

/// A node of one [`Graph`]. Ids are not reused while the node lives, but may be reused
/// after it is removed; they are not stable across graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(NodeIndex);

impl NodeId {
    /// Output `i` of this node.
    pub fn out(self, i: u16) -> Value {
        Value { node: self, output: i }
    }
    /// The raw index (for error messages; the text form renumbers).
    pub fn index(self) -> usize {
        self.0.index()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0.index())
    }
}

/// One output of one node: what an op consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeId,
    pub output: u16,
}

impl From<NodeId> for Value {
    /// Output 0, the only one of most ops.
    fn from(n: NodeId) -> Value {
        n.out(0)
    }
}

/// An edge: the consumer's input `slot` reads the producer's `output`. Both are `u16`
/// because an entry point of a 95-layer GQA model passes one K and one V cache per layer
/// through its `Return`, which is close to what `u8` could number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Edge {
    pub slot: u16,
    pub output: u16,
}

/// What a node is: an op, the type of each of its outputs, and the spec text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: Op,
    /// One type per output (`TopK`: values, indices; `Return`: none).
    pub outputs: Vec<Ty>,
    /// The spec text the node was lowered from; nodes a pass creates take the span of the
    /// node they replace.
    pub span: Option<Span>,
}

impl Node {
    /// The type of output 0. Panics for a node with no outputs (`Return`).
    pub fn ty(&self) -> &Ty {
        &self.outputs[0]
    }
}

/// What the graph stores: the node plus its insertion number, which breaks ties in
/// [`Graph::topo_order`] so that order does not depend on petgraph's slot reuse.
#[derive(Debug, Clone)]
struct Entry {
    node: Node,
    seq: u64,
}

/// The types a function takes (its `Input`s by index) and returns.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Signature {
    pub inputs: Vec<Ty>,
    pub outputs: Vec<Ty>,
}

/// A graph cycle found by [`Graph::topo_order`]: the nodes on or behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle(pub Vec<NodeId>);

/// The dataflow graph of one function.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    g: StableGraph<Entry, Edge>,
    next_seq: u64,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    // ------------------------------------------------------------ building

    /// Add a node with the given output types, unchecked (the verifier checks them).
    /// For passes that already know the types; others use [`Graph::add_inferred`].
    pub fn add(&mut self, op: Op, inputs: &[Value], outputs: Vec<Ty>, span: Option<Span>) -> NodeId {
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = self.g.add_node(Entry { node: Node { op, outputs, span }, seq });
        for (slot, v) in inputs.iter().enumerate() {
            self.g.add_edge(v.node.0, id, Edge { slot: slot as u16, output: v.output });
        }
        NodeId(id)
    }

    /// Add a node whose output types follow from its inputs by the op's shape rule.
    /// Leaves must use [`Graph::input`], [`Graph::param`] or [`Graph::constant`], and calls
    /// [`Graph::call`].
    pub fn add_inferred(&mut self, op: Op, inputs: &[Value], span: Option<Span>) -> Result<NodeId, InferError> {
        self.add_checked(op, inputs, None, span)
    }

    /// Add a call of `function` with signature `sig` (from [`Module::signature`]).
    pub fn call(
        &mut self,
        function: &str,
        layer: Option<u32>,
        sig: &Signature,
        args: &[Value],
        span: Option<Span>,
    ) -> Result<NodeId, InferError> {
        self.add_checked(Op::Call { function: function.into(), layer }, args, Some(sig), span)
    }

    fn add_checked(&mut self, op: Op, inputs: &[Value], sig: Option<&Signature>, span: Option<Span>) -> Result<NodeId, InferError> {
        let tys: Vec<&Ty> = inputs.iter().map(|v| self.ty(*v)).collect();
        let outputs = match infer(&op, &tys, sig) {
            Ok(Some(o)) => o,
            Ok(None) => {
                let message = "a leaf has a declared type: use input, param or constant".to_string();
                return Err(InferError { op: op.name(), span, message });
            }
            Err(e) => return Err(InferError { span, ..e }),
        };
        Ok(self.add(op, inputs, outputs, span))
    }

    /// The `index`-th argument of the function.
    pub fn input(&mut self, index: u32, name: &str, ty: Ty, span: Option<Span>) -> NodeId {
        self.add(Op::Input { index, name: name.into() }, &[], vec![ty], span)
    }

    /// A weight named relative to the function.
    pub fn param(&mut self, name: &str, ty: Ty, span: Option<Span>) -> NodeId {
        self.add(Op::Param { name: name.into() }, &[], vec![ty], span)
    }

    /// A scalar constant of `dtype`.
    pub fn constant(&mut self, value: f64, dtype: super::dtype::DType, span: Option<Span>) -> NodeId {
        self.add(Op::Const { value: Float::new(value) }, &[], vec![Ty::scalar(dtype)], span)
    }

    /// The function's results.
    pub fn ret(&mut self, values: &[Value], span: Option<Span>) -> NodeId {
        self.add(Op::Return, values, Vec::new(), span)
    }

    // ------------------------------------------------------------ reading

    pub fn node(&self, n: NodeId) -> &Node {
        &self.g[n.0].node
    }

    /// Change a node in place (its op after a rewrite, its types after inference).
    pub fn node_mut(&mut self, n: NodeId) -> &mut Node {
        &mut self.g[n.0].node
    }

    pub fn contains(&self, n: NodeId) -> bool {
        self.g.contains_node(n.0)
    }

    /// The type of a value. Panics if the node is gone or has no such output.
    pub fn ty(&self, v: Value) -> &Ty {
        &self.node(v.node).outputs[v.output as usize]
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Every live node, in insertion order.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut v: Vec<(u64, NodeIndex)> = self.g.node_indices().map(|i| (self.g[i].seq, i)).collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| NodeId(i)).collect()
    }

    /// The node's inputs in slot order. On a well-formed graph slot `i` is at index `i`;
    /// the verifier reports gaps and duplicates, which this does not hide or repair.
    pub fn inputs(&self, n: NodeId) -> Vec<Value> {
        self.input_edges(n).into_iter().map(|(_, v)| v).collect()
    }

    /// `(slot, value)` for every incoming edge, sorted by slot.
    pub fn input_edges(&self, n: NodeId) -> Vec<(u16, Value)> {
        let mut v: Vec<(u16, Value)> =
            self.g.edges_directed(n.0, Incoming).map(|e| (e.weight().slot, NodeId(e.source()).out(e.weight().output))).collect();
        v.sort_unstable();
        v
    }

    /// `(user, slot, output)` for every use of any output of `n`, sorted.
    pub fn users(&self, n: NodeId) -> Vec<(NodeId, u16, u16)> {
        let mut v: Vec<(NodeId, u16, u16)> =
            self.g.edges_directed(n.0, Outgoing).map(|e| (NodeId(e.target()), e.weight().slot, e.weight().output)).collect();
        v.sort_unstable();
        v
    }

    /// Whether any node reads an output of `n`.
    pub fn has_users(&self, n: NodeId) -> bool {
        self.g.edges_directed(n.0, Outgoing).next().is_some()
    }

    /// The `Input` nodes sorted by index.
    pub fn arguments(&self) -> Vec<NodeId> {
        let mut v: Vec<(u32, u64, NodeId)> = self
            .nodes()
            .into_iter()
            .filter_map(|n| match &self.node(n).op {
                Op::Input { index, .. } => Some((*index, self.g[n.0].seq, n)),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, _, n)| n).collect()
    }

    /// The `Return` node (the first, if a broken graph has several).
    pub fn return_node(&self) -> Option<NodeId> {
        self.nodes().into_iter().find(|&n| self.node(n).op == Op::Return)
    }

    /// The signature: argument types by index, and the types returned. A graph without
    /// a `Return` returns nothing. Never panics, even on a graph the verifier would reject
    /// (it computes signatures before checking): ill-formed entries are skipped.
    pub fn signature(&self) -> Signature {
        let inputs = self.arguments().into_iter().filter_map(|n| self.node(n).outputs.first().cloned()).collect();
        let outputs = match self.return_node() {
            Some(r) => self.inputs(r).into_iter().filter_map(|v| self.node(v.node).outputs.get(v.output as usize).cloned()).collect(),
            None => Vec::new(),
        };
        Signature { inputs, outputs }
    }

    // ------------------------------------------------------------ rewiring

    /// Make every use of `old` read `new` instead. Uses by `new`'s own node are left
    /// alone, so the common "wrap `x` in `y = f(x)` and redirect `x`'s users to `y`"
    /// cannot create a self-loop.
    pub fn replace_uses(&mut self, old: Value, new: Value) {
        let edges: Vec<(EdgeIndex, NodeIndex, Edge)> = self
            .g
            .edges_directed(old.node.0, Outgoing)
            .filter(|e| e.weight().output == old.output && e.target() != new.node.0)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (id, user, w) in edges {
            self.g.remove_edge(id);
            self.g.add_edge(new.node.0, user, Edge { slot: w.slot, output: new.output });
        }
    }

    /// Make every use of output `i` of `old` read output `i` of `new` (nodes with the same
    /// outputs, e.g. a composite and the node that replaces it), excepting `new` itself.
    pub fn replace_all_uses(&mut self, old: NodeId, new: NodeId) {
        let outputs = self.node(old).outputs.len() as u16;
        for i in 0..outputs {
            self.replace_uses(old.out(i), new.out(i));
        }
    }

    /// Point input `slot` of `n` at `v`, adding the slot if `n` had none there.
    pub fn set_input(&mut self, n: NodeId, slot: u16, v: Value) {
        let old: Vec<EdgeIndex> = self.g.edges_directed(n.0, Incoming).filter(|e| e.weight().slot == slot).map(|e| e.id()).collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(v.node.0, n.0, Edge { slot, output: v.output });
    }

    /// Remove a node that nobody uses, with its input edges, and return it.
    ///
    /// Panics if the node still has users: a removal that left consumers with a missing
    /// input slot would only surface later, in the verifier, far from the bug. Call
    /// [`Graph::replace_all_uses`] first.
    pub fn remove(&mut self, n: NodeId) -> Node {
        assert!(!self.has_users(n), "remove({n}): the node still has users; call replace_all_uses first");
        self.g.remove_node(n.0).expect("remove: no such node").node
    }

    // ------------------------------------------------------------ order

    /// Nodes in topological order (producers first). Among nodes that are ready at the
    /// same time the earliest inserted goes first, so the order depends only on the
    /// graph's structure and insertion history, never on petgraph's slot reuse; removing a
    /// node does not reorder the others. Fails with the nodes left over if there is a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, Cycle> {
        let mut pending: HashMap<NodeIndex, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        for i in self.g.node_indices() {
            let deg = self.g.edges_directed(i, Incoming).count();
            if deg == 0 {
                ready.push(Reverse((self.g[i].seq, i)));
            } else {
                pending.insert(i, deg);
            }
        }
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse((_, i))) = ready.pop() {
            order.push(NodeId(i));
            // One decrement per edge: `mul(x, x)` has two edges from `x`.
            for e in self.g.edges_directed(i, Outgoing) {
                let t = e.target();
                let d = pending.get_mut(&t).expect("a target with an incoming edge is pending");
                *d -= 1;
                if *d == 0 {
                    pending.remove(&t);
                    ready.push(Reverse((self.g[t].seq, t)));
                }
            }
        }
        if pending.is_empty() {
            Ok(order)
        } else {
            let mut left: Vec<NodeId> = pending.into_keys().map(NodeId).collect();
            left.sort_unstable_by_key(|n| self.g[n.0].seq);
            Err(Cycle(left))
        }
    }

    /// Raw edges `(producer, consumer, edge)`, for the verifier.
    pub(crate) fn edges(&self) -> Vec<(NodeId, NodeId, Edge)> {
        (&self.g).edge_references().map(|e| (NodeId(e.source()), NodeId(e.target()), *e.weight())).collect()
    }

    /// Drop an edge without touching nodes; lets verifier tests build broken graphs.
    #[cfg(test)]
    pub(crate) fn remove_input_edge(&mut self, n: NodeId, slot: u16) {
        let e = self.g.edges_directed(n.0, Incoming).find(|e| e.weight().slot == slot).map(|e| e.id());
        self.g.remove_edge(e.expect("no such slot"));
    }

    /// Add an edge as is; lets verifier tests build broken graphs.
    #[cfg(test)]
    pub(crate) fn add_raw_edge(&mut self, from: NodeId, to: NodeId, e: Edge) {
        self.g.add_edge(from.0, to.0, e);
    }
}

// ---------------------------------------------------------------- module

/// What an entry point is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// The full prompt: writes the cache, returns logits (and the new caches).
    Prefill,
    /// One new token per sequence: reads and appends the cache.
    Decode,
    /// The full sequence with labels: returns the loss.
    Train,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Prefill, Mode::Decode, Mode::Train];
    pub fn name(self) -> &'static str {
        match self {
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
            Mode::Train => "train",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A named graph: an entry point or a layer body.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    pub graph: Graph,
}

impl Function {
    pub fn new(name: &str) -> Function {
        Function { name: name.into(), graph: Graph::new() }
    }
}

/// What the autodiff pass (`passes::autodiff`) made of the train entry: which of its
/// results take a cotangent argument and which param gradients it returns.
///
/// The differentiated entry takes its own arguments, then one cotangent per entry of
/// `seeds` (the type of result `seeds[i]`); it returns its own `results` results, then
/// the gradient of `Σ cotangent · result` for each param path of `params`, in order.
/// Params missing from `params` get no gradient (the selection bias, unused params).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gradients {
    pub results: usize,
    pub seeds: Vec<usize>,
    pub params: Vec<String>,
}

/// A compiled model: its functions (in creation order, which is print order) and which of
/// them is the entry point for each mode.
#[derive(Debug, Clone, Default)]
pub struct Module {
    pub functions: Vec<Function>,
    pub entries: BTreeMap<Mode, String>,
    /// Set once the train entry is differentiated.
    pub gradients: Option<Gradients>,
}

impl Module {
    pub fn new() -> Module {
        Module::default()
    }

    /// Add a function; returns its position. Names must be unique (the verifier checks).
    pub fn add_function(&mut self, f: Function) -> usize {
        self.functions.push(f);
        self.functions.len() - 1
    }

    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == name)
    }

    pub fn function_mut(&mut self, name: &str) -> Option<&mut Function> {
        self.functions.iter_mut().find(|f| f.name == name)
    }

    /// The signature of a function, for building calls to it.
    pub fn signature(&self, name: &str) -> Option<Signature> {
        self.function(name).map(|f| f.graph.signature())
    }

    pub fn set_entry(&mut self, mode: Mode, function: &str) {
        self.entries.insert(mode, function.into());
    }

    pub fn entry(&self, mode: Mode) -> Option<&Function> {
        self.entries.get(&mode).and_then(|n| self.function(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::dim::Dim;
    use crate::ir::dtype::DType;
    use crate::ir::op::{BinaryOp, UnaryOp};

    fn x_ty() -> Ty {
        Ty::new(DType::F32, [Dim::B, Dim::lit(4)])
    }

    #[test]
    fn build_and_read() {
        let mut g = Graph::new();
        let x = g.input(0, "x", x_ty(), None);
        let y = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        let z = g.add_inferred(Op::Binary(BinaryOp::Mul), &[y.into(), x.into()], None).unwrap();
        let r = g.ret(&[z.into()], None);
        assert_eq!(g.inputs(z), vec![y.into(), x.into()]);
        assert_eq!(g.users(x), vec![(y, 0, 0), (z, 1, 0)]);
        assert_eq!(g.topo_order().unwrap(), vec![x, y, z, r]);
        assert_eq!(g.signature(), Signature { inputs: vec![x_ty()], outputs: vec![x_ty()] });
        assert_eq!(g.return_node(), Some(r));
        let w = g.param("w", Ty::new(DType::F32, [Dim::lit(3), Dim::lit(5)]), None);
        let e = g.add_inferred(Op::MatMul, &[x.into(), w.into()], None).unwrap_err();
        assert_eq!(e.to_string(), "matmul: x [b,4] contracts 4, but weight [3,5] takes 5");
        let leaf = g.add_inferred(Op::Param { name: "v".into() }, &[], None).unwrap_err();
        assert!(leaf.message.contains("declared type"), "{leaf}");
    }

    #[test]
    fn replace_and_remove() {
        let mut g = Graph::new();
        let x = g.input(0, "x", x_ty(), None);
        let a = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        let b = g.add_inferred(Op::Binary(BinaryOp::Add), &[a.into(), a.into()], None).unwrap();
        let r = g.ret(&[b.into()], None);
        // CSE-style: a second exp(x) takes over a's uses, then a goes.
        let a2 = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        g.replace_all_uses(a, a2);
        assert_eq!(g.inputs(b), vec![a2.into(), a2.into()]);
        assert!(!g.has_users(a));
        g.remove(a);
        assert!(!g.contains(a));
        // Insertion order breaks ties, so a2 (inserted after r) still precedes b.
        assert_eq!(g.topo_order().unwrap(), vec![x, a2, b, r]);
    }

    #[test]
    fn wrap_does_not_self_loop() {
        let mut g = Graph::new();
        let x = g.input(0, "x", x_ty(), None);
        let r = g.ret(&[x.into()], None);
        let y = g.add_inferred(Op::Unary(UnaryOp::Neg), &[x.into()], None).unwrap();
        g.replace_uses(x.into(), y.into());
        assert_eq!(g.inputs(y), vec![x.into()]);
        assert_eq!(g.inputs(r), vec![y.into()]);
        g.set_input(r, 0, x.into());
        assert_eq!(g.inputs(r), vec![x.into()]);
    }

    #[test]
    #[should_panic(expected = "still has users")]
    fn remove_used_node_panics() {
        let mut g = Graph::new();
        let x = g.input(0, "x", x_ty(), None);
        g.ret(&[x.into()], None);
        g.remove(x);
    }

    #[test]
    fn cycle_is_reported() {
        let mut g = Graph::new();
        let x = g.input(0, "x", x_ty(), None);
        let a = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        let b = g.add_inferred(Op::Unary(UnaryOp::Log), &[a.into()], None).unwrap();
        g.set_input(a, 0, b.into());
        assert_eq!(g.topo_order(), Err(Cycle(vec![a, b])));
    }

    #[test]
    fn module_lookup() {
        let mut m = Module::new();
        let mut f = Function::new("layer");
        let x = f.graph.input(0, "x", x_ty(), None);
        f.graph.ret(&[x.into()], None);
        m.add_function(f);
        m.set_entry(Mode::Decode, "layer");
        assert_eq!(m.entry(Mode::Decode).map(|f| f.name.as_str()), Some("layer"));
        assert!(m.entry(Mode::Train).is_none());
        assert_eq!(m.signature("layer").unwrap().outputs, vec![x_ty()]);
    }
}
