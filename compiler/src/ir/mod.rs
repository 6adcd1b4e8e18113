//! The dsc IR: a typed dataflow graph per function, grouped into a [`Module`] with one
//! entry point per [`Mode`].
//!
//! Lowering (from a resolved `dsc_dsl::Model`) builds a module; passes rewrite it; the
//! verifier checks it between passes; the printer writes its stable text form for golden
//! tests. This page describes the data model; each file documents its part in full.
//!
//! # Nodes and values
//!
//! A function body is a [`Graph`], a `petgraph` `StableGraph` wrapped so that passes never
//! touch edges directly. A [`Node`] is
//!
//! - an [`Op`]: one variant of a closed enum, holding the op's settings (axis, eps, heads);
//! - one [`Ty`] per output: a [`DType`] and a [`Shape`] of symbolic [`Dim`]s;
//! - an optional [`Span`](dsc_dsl::span::Span) of the spec text it was lowered from. Nodes
//!   a pass creates take the span of the node they replace, so an error found late still
//!   points at the spec.
//!
//! A node reads its inputs as [`Value`]s, `{ node, output }`, in slot order
//! ([`Graph::inputs`]). Most ops have one output; `TopK` (values, indices), `MoeRoute`
//! (indices, weights) and `Call` (the callee's results) have several. Multiple outputs
//! are addressed by the **output index on the edge** ([`Edge`] `{ slot, output }`)
//! rather than by projection nodes (`get_tuple_element`): there is no tuple type to
//! verify, CSE and DCE see one node per computation, and a pass that rewires a value
//! names exactly the output it means. The text form writes `%5.1` for output 1 of `%5`.
//!
//! # Shapes and symbolic dims
//!
//! A [`Dim`] is an affine form over three run-time sizes: batch `b`, new tokens per
//! sequence `s`, and cached tokens `c`, with integer coefficients and a constant. That is
//! enough for every shape in a DeepSeek forward pass (`[b,s,7168]`, keys after a cache
//! append `[b,c+s,1,576]`, the shifted loss `s-1`) and keeps shape equality decidable by
//! comparing coefficients. Products of symbols are not representable; instead no op
//! flattens tokens: matmuls, norms and MoE ops treat all leading axes as token axes.
//!
//! Every op variant documents its `## Shape rule`, and [`infer::infer`] implements those
//! rules one for one; [`Graph::add_inferred`] uses it to build nodes, the verifier to
//! check them. There is no implicit dtype promotion: lowering inserts casts.
//!
//! # Two levels of ops
//!
//! *Primitives* (matmul, elementwise, reductions, softmax, gather/scatter, top-k, layout
//! ops, casts) are the small set the reference interpreter runs and the decomposition
//! pass expands to. *Composites* (`rms_norm`, `rope` with YaRN, `attention`,
//! `moe_route`, `expert_ffn`, `swiglu`, `cross_entropy`, `cache_append`) are what a
//! kernel library wants to see whole, so lowering emits them; [`Op::is_composite`] tells
//! them apart. Each op's doc notes its local derivative where it is not obvious, for the
//! reverse-mode autodiff pass.
//!
//! After fusion a third kind appears: `fused` ([`Op::Fused`]), one node standing for a
//! matmul or RMSNorm head and a tree of elementwise steps, whose program
//! ([`FusedKernel`]) is closed data like every other op setting. The decomposition pass
//! also needs two primitives only it emits: `iota` (index ramps for the causal mask and
//! one-hot compares) and `rope_freqs` (RoPE's frequency table, carrying the rope settings
//! so the pattern can be fused back).
//!
//! # Functions, calls and parameters
//!
//! Repeated layers are not unrolled. Lowering emits one function per *distinct* layer
//! kind and mode (e.g. `decode.layer.dense`, `decode.layer.moe`; see `crate::lower`) and
//! each entry point calls it once per layer:
//!
//! ```text
//! fn decode.layer.moe { %0 = input 0 "x" ... %9 = param "mlp.experts.gate_proj.weight" ... }
//! fn decode           { ... %7 = call decode.layer.moe(%6.0, %1, %4, %5) layer=3 ... }
//! ```
//!
//! - A function's arguments are its [`Op::Input`] nodes, ordered by their `index`; its
//!   results are the inputs of its single [`Op::Return`]. Its [`Signature`] follows.
//! - Weights are [`Op::Param`]s named relative to the function
//!   (`self_attn.kv_b_proj.weight`). A call `layer=3` scopes them to
//!   `model.layers.3.self_attn.kv_b_proj.weight` ([`op::param_path`]), the Hugging Face
//!   checkpoint name, so weights bind to checkpoint tensors by name. Weights are never
//!   passed as arguments, so a 61-layer call site stays a handful of edges.
//! - Routed experts are one grouped op ([`Op::ExpertFfn`]) over weights stacked with a
//!   leading expert axis, so 256 experts are one node. DeepSeek-V3 (61 layers × 256
//!   experts) is a few dozen nodes per layer kind plus 61 calls per entry point.
//!
//! # Entry points
//!
//! [`Module::entries`] maps each [`Mode`] to a function: `prefill` (full prompt, writes
//! the cache), `decode` (one new token per sequence, `s` bound to 1, reads and appends the
//! cache), and `train` (full sequence, returns the loss from labels). Caches are ordinary
//! arguments and results: a layer takes its cache, [`Op::CacheAppend`]s to it, and returns
//! the longer one, which the runtime may update in place.
//!
//! # Invariants
//!
//! [`verify::verify`] checks, and collects every violation of, the invariants listed in
//! its module doc: dense unique input slots, arity, acyclicity, output counts, every
//! non-leaf type equal to its shape rule, one return per function, dense argument indices,
//! unique param and function names, existing call targets with matching argument types, no
//! recursion, and existing entry functions. Passes may assume them on entry and must
//! restore them on exit.
//!
//! # Text form
//!
//! [`print::print_module`] writes one node per line,
//! `%3:bf16[b,s,7168] = rms_norm(%1, %2) eps=1e-6 @12:5`, numbering nodes in topological
//! order with ties broken by insertion order, so golden files depend on the graph and
//! not on how a pass's removals left `StableGraph`'s slots.

pub mod dim;
pub mod dtype;
pub mod fused;
pub mod graph;
pub mod infer;
pub mod op;
pub mod print;
pub mod verify;

pub use dim::{solve_symbols, Bindings, Dim, Shape, SolveError, Sym};
pub use dtype::{DType, Ty};
pub use fused::{FusedKernel, Head, Operand, Step, StepOp};
pub use graph::{Cycle, Edge, Function, Gradients, Graph, Mode, Module, Node, NodeId, Signature, Value};
pub use infer::{infer, InferError};
pub use op::{param_path, rope_frequencies, Arity, BinaryOp, Float, GroupScore, Op, ReduceOp, RopeLayout, Routing, Scoring, UnaryOp, Yarn};
pub use print::{print_function, print_module};
pub use verify::{verify, VerifyError};
