//! `memory_plan`: buffer lifetimes, reuse and peak activation memory of an entry point at
//! concrete sizes.
//!
//! ```text
//!   step:      0      1        2        3        4
//!   node:   input x  a=exp(x)  b=exp(a)  c=exp(b)  return c
//!   live:      –      a        a b      b c      c          peak = 2 values
//!   buffer:           #0       #0 #1    #1 #0    #0         2 buffers for 3 values
//! ```
//!
//! Steps are the entry's topological order. A value is live from the step that produces
//! it to the last step that reads it; the function's results live to the `return`. At
//! each step the buffers whose values died earlier return to a free list, and each new
//! value takes the **best fit** from it: the smallest free buffer at least as large, else
//! the largest free buffer grown to fit (the plan is static, so a buffer's capacity is
//! simply the largest value it ever holds, and growing one costs less than a new one),
//! else a new buffer. Within a step, larger values are placed first. An op's output never
//! shares a buffer with its inputs: the plan assumes no op works in place.
//!
//! What counts as an activation:
//! - **not** weights (`param`) or immediates (`const`), and not the entry's arguments
//!   (token ids, positions, caches), which the caller owns; their bytes are reported
//!   separately;
//! - `reshape` is a view: its output shares its input's buffer, which then lives as long
//!   as either;
//! - `broadcast` is not: the plan counts its full output, as the reference interpreter
//!   materialises it (a strided runtime that makes it a stride-0 view needs less);
//! - `cache_append` writes into its cache's buffer (its documented in-place form), so
//!   appending to a cache argument allocates nothing here: the caller sizes the cache;
//! - a `call` is planned **once per callee**: the callee's own values form its arena,
//!   which the caller reserves as one scratch region for the step of each call (and may
//!   reuse between calls); the call's results are the caller's values. A callee result
//!   that is (a view of) one of its arguments aliases the caller's argument, so a layer
//!   that appends to the cache it was passed appends to the entry's cache.
//!
//! - what a composite op needs inside its kernel (attention scores, the experts'
//!   intermediate activations) is the kernel's workspace, not an IR value, and is not
//!   counted; after decomposition those become values and are.
//!
//! Two peaks are reported: `peak_live_bytes`, the most bytes live at any step (a lower
//! bound for every assignment), and `allocated_bytes`, the total capacity of the buffers
//! the best-fit assignment uses. The gap between them is fragmentation.

use super::{Changed, Pass, PassCx, PassError};
use crate::ir::{param_path, Bindings, Mode, Module, NodeId, Op, Ty, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

/// Records the [`Plan`] of `cx.mode`'s entry at `cx.sizes` in the [`PassCx`]; changes
/// nothing.
pub struct MemoryPlan;

impl Pass for MemoryPlan {
    fn name(&self) -> &'static str {
        "memory_plan"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let p = plan(m, cx.mode, &cx.sizes)?;
        cx.report(self.name(), p.summary());
        cx.memory_plan = Some(p);
        Ok(Changed::No)
    }
}

/// Where a function's result comes from, as its callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A value the function computes: the caller allocates a buffer for it.
    Fresh,
    /// (A view of, or an append to) argument `i`: the caller's buffer for that argument.
    Argument(u32),
    /// A weight or a constant: nothing to allocate.
    Static,
}

/// The plan of one function.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionPlan {
    pub name: String,
    /// The most bytes of this function's activations live at once, the peaks of the
    /// functions it calls included.
    pub peak_live_bytes: u64,
    /// Total capacity of [`FunctionPlan::buffers`]: the function's arena.
    pub allocated_bytes: u64,
    /// Buffer requests without reuse: one per activation (views share one), plus one
    /// scratch region per call.
    pub values: usize,
    /// Bytes of those requests without reuse.
    pub unshared_bytes: u64,
    /// The capacity of each buffer after reuse.
    pub buffers: Vec<u64>,
    /// Which buffer holds each activation value (views included).
    pub assignment: BTreeMap<Value, usize>,
    /// Which buffer each call's scratch region uses (calls whose callee needs none are
    /// absent).
    pub scratch: BTreeMap<NodeId, usize>,
    /// Where each result comes from. Results are planned as the caller's buffers, except
    /// in the entry, whose results are its own activations.
    pub outputs: Vec<Origin>,
    /// Bytes of each weight read, by name relative to this function (through calls too).
    pub weights: BTreeMap<String, u64>,
    /// Bytes of the function's arguments.
    pub argument_bytes: u64,
}

/// The memory plan of one entry point at concrete sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub mode: Mode,
    pub sizes: Bindings,
    /// The entry function's plan; its numbers are the totals (callees' arenas are scratch
    /// regions inside it).
    pub entry: FunctionPlan,
    /// Plans of the functions the entry calls, callees before callers.
    pub callees: Vec<FunctionPlan>,
    /// The entry's results (a train entry's gradients) are the caller's buffers.
    pub gradients_external: bool,
}

impl Plan {
    /// Most activation bytes live at once (weights and arguments excluded).
    pub fn peak_live_bytes(&self) -> u64 {
        self.entry.peak_live_bytes
    }
    /// What an allocator following the plan reserves.
    pub fn allocated_bytes(&self) -> u64 {
        self.entry.allocated_bytes
    }
    /// Buffers without reuse (the entry's values and one scratch region per call).
    pub fn buffers_before(&self) -> usize {
        self.entry.values
    }
    /// Buffers after reuse.
    pub fn buffers_after(&self) -> usize {
        self.entry.buffers.len()
    }
    /// Bytes of every distinct weight the entry reads (checked to fit when planned).
    pub fn weight_bytes(&self) -> u64 {
        self.entry.weights.values().fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// A few lines for reports.
    pub fn summary(&self) -> String {
        let b = &self.sizes;
        let mut s = format!("{} entry `{}` at b={} s={} c={}:\n", self.mode, self.entry.name, b.batch, b.seq, b.cache);
        let e = &self.entry;
        let _ = writeln!(
            s,
            "  activations: peak live {} bytes, allocated {} bytes in {} buffers ({} requests, {} bytes, without reuse)",
            e.peak_live_bytes,
            e.allocated_bytes,
            e.buffers.len(),
            e.values,
            e.unshared_bytes
        );
        let _ = writeln!(s, "  weights {} bytes, arguments {} bytes", self.weight_bytes(), e.argument_bytes);
        if self.gradients_external {
            let _ = writeln!(s, "  gradients: the entry's results, one per trained weight, in the caller's buffers (not counted above)");
        }
        for f in &self.callees {
            let _ = writeln!(
                s,
                "  fn {}: peak live {} bytes, arena {} bytes in {} buffers ({} requests)",
                f.name,
                f.peak_live_bytes,
                f.allocated_bytes,
                f.buffers.len(),
                f.values
            );
        }
        s
    }
}

/// Plan `mode`'s entry point of `m` with the symbols bound to `sizes`.
pub fn plan(m: &Module, mode: Mode, sizes: &Bindings) -> Result<Plan, PassError> {
    let entry = m.entry(mode).ok_or_else(|| PassError::new(format!("the module has no {mode} entry point")))?;
    let mut planner = Planner { m, sizes, done: HashMap::new(), order: Vec::new(), active: HashSet::new() };
    // A differentiated train entry returns a gradient per weight: buffers the optimizer
    // owns (as big as the weights), planned as the caller's so that the activations and
    // the residuals the backward keeps show on their own.
    let gradients_external = mode == Mode::Train && m.gradients.is_some();
    let entry = planner.plan_function(&entry.name, gradients_external)?;
    let callees = planner.order.iter().map(|n| planner.done[n].clone()).collect();
    Ok(Plan { mode, sizes: *sizes, entry, callees, gradients_external })
}

/// The bytes of a value of type `t` at `sizes` (a dim that evaluates negative counts 0).
pub fn bytes_of(t: &Ty, sizes: &Bindings) -> u64 {
    t.shape.eval(sizes).into_iter().fold(t.dtype.bytes(), |acc, d| acc.saturating_mul(d.max(0) as u64))
}

struct Planner<'m> {
    m: &'m Module,
    sizes: &'m Bindings,
    /// Callee plans by name (callees are planned once).
    done: HashMap<String, FunctionPlan>,
    /// Callee names in the order their plans finished.
    order: Vec<String>,
    /// Functions being planned, to refuse recursion.
    active: HashSet<String>,
}

/// Values sharing one buffer: a produced value and its views.
struct Class {
    origin: Origin,
    bytes: u64,
    def: usize,
    last: usize,
    returned: bool,
}

/// A buffer request on the timeline.
struct Request {
    bytes: u64,
    def: usize,
    last: usize,
    what: Holder,
}

#[derive(Clone, Copy)]
enum Holder {
    Class(usize),
    Scratch(NodeId),
}

impl Planner<'_> {
    /// Plan function `name`. With `results_external` (a callee) its results are the
    /// caller's buffers and not part of its arena.
    fn plan_function(&mut self, name: &str, results_external: bool) -> Result<FunctionPlan, PassError> {
        let f = self.m.function(name).ok_or_else(|| PassError::new(format!("call of missing function `{name}`")))?;
        let g = &f.graph;
        if !self.active.insert(name.to_string()) {
            return Err(PassError::new(format!("`{name}` is called recursively")));
        }
        let order = g.topo_order().map_err(|c| PassError::at(name, g, c.0[0], "the graph has a cycle"))?;
        let steps = order.len();
        let sizes = self.sizes;

        let mut classes: Vec<Class> = Vec::new();
        let mut class_of: HashMap<Value, usize> = HashMap::new();
        let mut scratch: Vec<(NodeId, usize, u64, u64)> = Vec::new(); // (call, step, peak, arena)
        let mut weights: BTreeMap<String, u64> = BTreeMap::new();
        let mut outputs = Vec::new();
        let mut argument_bytes = 0u64;

        for (t, &n) in order.iter().enumerate() {
            let node = g.node(n);
            let inputs = g.inputs(n);
            for v in &inputs {
                if let Some(&c) = class_of.get(v) {
                    classes[c].last = classes[c].last.max(t);
                }
            }
            let fresh = |classes: &mut Vec<Class>, class_of: &mut HashMap<Value, usize>, v: Value, origin: Origin| {
                let bytes = bytes_of(g.ty(v), sizes);
                classes.push(Class { origin, bytes, def: t, last: t, returned: false });
                class_of.insert(v, classes.len() - 1);
            };
            let alias = |classes: &mut Vec<Class>, class_of: &mut HashMap<Value, usize>, v: Value, of: Value| {
                let c = class_of[&of];
                classes[c].bytes = classes[c].bytes.max(bytes_of(g.ty(v), sizes));
                class_of.insert(v, c);
            };
            match &node.op {
                Op::Param { name } => {
                    weights.insert(name.clone(), bytes_of(node.ty(), sizes));
                    fresh(&mut classes, &mut class_of, n.out(0), Origin::Static);
                }
                Op::Const { .. } => fresh(&mut classes, &mut class_of, n.out(0), Origin::Static),
                Op::Input { index, .. } => {
                    argument_bytes = argument_bytes.saturating_add(bytes_of(node.ty(), sizes));
                    fresh(&mut classes, &mut class_of, n.out(0), Origin::Argument(*index));
                }
                Op::Return => {
                    for v in &inputs {
                        let c = class_of[v];
                        classes[c].returned = true;
                        outputs.push(classes[c].origin);
                    }
                }
                Op::Reshape { .. } | Op::CacheAppend { .. } => alias(&mut classes, &mut class_of, n.out(0), inputs[0]),
                Op::Call { function, layer } => {
                    let callee = match self.done.get(function) {
                        Some(p) => p.clone(),
                        None => {
                            let p = self.plan_function(function, true)?;
                            self.done.insert(function.clone(), p.clone());
                            self.order.push(function.clone());
                            p
                        }
                    };
                    for (w, &b) in &callee.weights {
                        weights.insert(param_path(*layer, w), b);
                    }
                    if callee.allocated_bytes > 0 {
                        scratch.push((n, t, callee.peak_live_bytes, callee.allocated_bytes));
                    }
                    for (j, origin) in callee.outputs.iter().enumerate() {
                        let v = n.out(j as u16);
                        match *origin {
                            Origin::Argument(i) => alias(&mut classes, &mut class_of, v, inputs[i as usize]),
                            o => fresh(&mut classes, &mut class_of, v, o),
                        }
                    }
                }
                _ => {
                    for j in 0..node.outputs.len() {
                        fresh(&mut classes, &mut class_of, n.out(j as u16), Origin::Fresh);
                    }
                }
            }
        }

        // The requests: activation classes (an external result is the caller's), then
        // one scratch region per call.
        let mut requests: Vec<Request> = classes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.origin == Origin::Fresh && !(results_external && c.returned))
            .map(|(i, c)| Request { bytes: c.bytes, def: c.def, last: c.last, what: Holder::Class(i) })
            .collect();
        requests.extend(scratch.iter().map(|&(n, t, _, arena)| Request { bytes: arena, def: t, last: t, what: Holder::Scratch(n) }));

        // Peak live bytes: a sweep over steps, callees' peaks counted at their call.
        let mut delta = vec![0i128; steps + 1];
        for r in &requests {
            if let Holder::Class(_) = r.what {
                delta[r.def] += r.bytes as i128;
                delta[r.last + 1] -= r.bytes as i128;
            }
        }
        for &(_, t, peak, _) in &scratch {
            delta[t] += peak as i128;
            delta[t + 1] -= peak as i128;
        }
        let (mut live, mut peak) = (0i128, 0i128);
        for d in &delta[..steps] {
            live += d;
            peak = peak.max(live);
        }

        let (buffers, placed) = best_fit(&requests);
        let mut members: HashMap<usize, Vec<Value>> = HashMap::new();
        for (&v, &c) in &class_of {
            members.entry(c).or_default().push(v);
        }
        let mut assignment = BTreeMap::new();
        let mut scratch_of = BTreeMap::new();
        for (r, &b) in requests.iter().zip(&placed) {
            match r.what {
                Holder::Class(c) => assignment.extend(members[&c].iter().map(|&v| (v, b))),
                Holder::Scratch(n) => {
                    scratch_of.insert(n, b);
                }
            }
        }
        self.active.remove(name);
        // Sizes the spec allows can make byte counts that no u64 holds (a huge vocabulary
        // at a huge batch): `bytes_of` saturates, and every figure is checked here, so a
        // plan is exact or an error, never a wrapped number.
        let too_big = || {
            PassError::new(format!(
                "memory plan of `{name}` at b={} s={} c={}: its byte counts exceed 2^64 - 1; give smaller sizes",
                sizes.batch, sizes.seq, sizes.cache
            ))
        };
        fn total(mut it: impl Iterator<Item = u64>) -> Option<u64> {
            it.try_fold(0u64, |a, b| if b == u64::MAX { None } else { a.checked_add(b) })
        }
        let allocated_bytes = total(buffers.iter().copied()).ok_or_else(too_big)?;
        let unshared_bytes = total(requests.iter().map(|r| r.bytes)).ok_or_else(too_big)?;
        total(weights.values().copied()).ok_or_else(too_big)?;
        if argument_bytes == u64::MAX {
            return Err(too_big());
        }
        let peak = u64::try_from(peak).map_err(|_| too_big())?;
        Ok(FunctionPlan {
            name: name.to_string(),
            peak_live_bytes: peak,
            allocated_bytes,
            values: requests.len(),
            unshared_bytes,
            buffers,
            assignment,
            scratch: scratch_of,
            outputs,
            weights,
            argument_bytes,
        })
    }
}

/// Assign requests to buffers, best fit over a free list; returns the buffer capacities
/// and each request's buffer.
fn best_fit(requests: &[Request]) -> (Vec<u64>, Vec<usize>) {
    // By step, larger first, then request order: deterministic, and large values get
    // first pick of the free buffers.
    let mut by_start: Vec<usize> = (0..requests.len()).collect();
    by_start.sort_by_key(|&i| (requests[i].def, std::cmp::Reverse(requests[i].bytes), i));

    let mut caps: Vec<u64> = Vec::new();
    let mut placed = vec![usize::MAX; requests.len()];
    let mut free: Vec<usize> = Vec::new();
    let mut busy: Vec<(usize, usize)> = Vec::new(); // (last step, buffer)
    for i in by_start {
        let r = &requests[i];
        // Buffers whose value died before this step are free again.
        busy.retain(|&(last, b)| {
            if last < r.def {
                free.push(b);
                false
            } else {
                true
            }
        });
        let fits = free.iter().enumerate().filter(|(_, &b)| caps[b] >= r.bytes).min_by_key(|(_, &b)| (caps[b], b));
        let k = match fits {
            Some((k, _)) => Some(k),
            // Nothing fits: grow the largest free buffer (cheaper than a new one).
            None => free.iter().enumerate().max_by_key(|(_, &b)| (caps[b], std::cmp::Reverse(b))).map(|(k, _)| k),
        };
        let b = match k {
            Some(k) => {
                let b = free.swap_remove(k);
                caps[b] = caps[b].max(r.bytes);
                b
            }
            None => {
                caps.push(r.bytes);
                caps.len() - 1
            }
        };
        placed[i] = b;
        busy.push((r.last, b));
    }
    (caps, placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Dim, Function, Graph, UnaryOp};
    use crate::passes::test_util::{f32t, module_of, n};

    const B: Dim = Dim::B;
    const S: Dim = Dim::S;
    const C: Dim = Dim::C;

    fn exp(g: &mut Graph, x: NodeId) -> NodeId {
        g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap()
    }

    #[test]
    fn chain_reuses_the_first_buffer() {
        // x → a → b → c, each f32[b,4] = 32 bytes at b=2. Live: {a}, {a,b}, {b,c}, {c}.
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([B, n(4)]), None);
        let a = exp(&mut g, x);
        let b = exp(&mut g, a);
        let c = exp(&mut g, b);
        g.ret(&[c.into()], None);
        let m = module_of("prefill", g, Mode::Prefill);
        let p = plan(&m, Mode::Prefill, &Bindings { batch: 2, seq: 1, cache: 0 }).unwrap();
        assert_eq!(p.peak_live_bytes(), 64);
        assert_eq!(p.allocated_bytes(), 64);
        assert_eq!((p.buffers_before(), p.buffers_after()), (3, 2));
        assert_eq!(p.entry.unshared_bytes, 96);
        assert_eq!(p.entry.argument_bytes, 32);
        let buf = |v: NodeId| p.entry.assignment[&v.out(0)];
        assert_eq!((buf(a), buf(b), buf(c)), (0, 1, 0));
        assert!(!p.entry.assignment.contains_key(&x.out(0)));
        assert_eq!(p.entry.outputs, [Origin::Fresh]);
    }

    /// Sizes that make byte counts past u64 (each value alone fits, their sum does not; or
    /// one value alone does not) are an error naming the sizes, never a wrapped figure.
    #[test]
    fn figures_that_overflow_are_errors() {
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([B, S, n(1 << 20)]), None);
        let a = exp(&mut g, x);
        let b = exp(&mut g, a);
        g.ret(&[b.into()], None);
        let m = module_of("prefill", g, Mode::Prefill);
        // 4 · 2^21 · 2^20 · 2^20 = 2^63 bytes per value: the two together pass 2^64.
        let e = plan(&m, Mode::Prefill, &Bindings { batch: 1 << 21, seq: 1 << 20, cache: 0 }).unwrap_err();
        assert!(e.to_string().contains("exceed 2^64 - 1") && e.to_string().contains("b=2097152"), "{e}");
        // One value of 2^66 bytes.
        let e = plan(&m, Mode::Prefill, &Bindings { batch: 1 << 24, seq: 1 << 20, cache: 0 }).unwrap_err();
        assert!(e.to_string().contains("exceed 2^64 - 1"), "{e}");
        // Just below: a plan.
        plan(&m, Mode::Prefill, &Bindings { batch: 1 << 10, seq: 1 << 10, cache: 0 }).unwrap();
    }

    fn req(bytes: u64, def: usize, last: usize) -> Request {
        Request { bytes, def, last, what: Holder::Class(0) }
    }

    #[test]
    fn best_fit_picks_the_smallest_free_buffer_that_fits() {
        // Three values die together (400, 100, 200 bytes); a 150-byte one is born next.
        // Best fit takes the 200-byte buffer: not the first free one, nor the largest.
        let (caps, placed) = best_fit(&[req(400, 0, 1), req(100, 0, 1), req(200, 0, 1), req(150, 2, 3)]);
        // (Within a step larger values are placed first: 400, 200, 100.)
        assert_eq!(caps, vec![400, 200, 100]);
        assert_eq!(placed, vec![0, 2, 1, 1]);
        // Placed largest first within a step, whatever the request order.
        let (caps, placed) = best_fit(&[req(8, 0, 0), req(32, 0, 0), req(16, 0, 0)]);
        assert_eq!(caps, vec![32, 16, 8]);
        assert_eq!(placed, vec![2, 0, 1]);
    }

    #[test]
    fn growing_a_free_buffer_beats_a_new_one() {
        // a (16 B) dies, then b (64 B) is born with only a's buffer free: it grows to 64.
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([n(16)]), None);
        let a = g.add_inferred(Op::Slice { axis: 0, start: Dim::lit(0), len: n(4) }, &[x.into()], None).unwrap();
        let r = g.add_inferred(Op::Reduce { op: crate::ir::ReduceOp::Max, axis: 0, keepdim: false }, &[a.into()], None).unwrap();
        let b = g.add_inferred(Op::Binary(BinaryOp::Mul), &[x.into(), r.into()], None).unwrap();
        g.ret(&[b.into()], None);
        let m = module_of("prefill", g, Mode::Prefill);
        let p = plan(&m, Mode::Prefill, &Bindings::default()).unwrap();
        // a 16, r 4, b 64: a and r overlap, then a dies, b takes a's buffer grown to 64.
        assert_eq!(p.entry.buffers, vec![64, 4]);
        assert_eq!(p.allocated_bytes(), 68);
        assert_eq!(p.peak_live_bytes(), 68);
    }

    /// A decode layer: `h' = h + exp(h)·2` and an append of `h` to the cache it is given.
    fn layer() -> Function {
        let mut g = Graph::new();
        let h = g.input(0, "h", f32t([B, S, n(8)]), None);
        let cache = g.input(1, "cache", f32t([B, C, n(8)]), None);
        let w = g.param("w", f32t([n(8)]), None);
        let e = exp(&mut g, h);
        let k = g.add_inferred(Op::Binary(BinaryOp::Mul), &[e.into(), w.into()], None).unwrap();
        let y = g.add_inferred(Op::Binary(BinaryOp::Add), &[h.into(), k.into()], None).unwrap();
        let c2 = g.add_inferred(Op::CacheAppend { axis: 1 }, &[cache.into(), h.into()], None).unwrap();
        g.ret(&[y.into(), c2.into()], None);
        Function { name: "layer".into(), graph: g }
    }

    #[test]
    fn calls_account_the_callee_peak_once_per_callee() {
        let mut m = Module::new();
        m.add_function(layer());
        let sig = m.signature("layer").unwrap();
        let mut g = Graph::new();
        let x = g.input(0, "x", f32t([B, S, n(8)]), None);
        let c0 = g.input(1, "cache.0", f32t([B, C, n(8)]), None);
        let c1 = g.input(2, "cache.1", f32t([B, C, n(8)]), None);
        let l0 = g.call("layer", Some(0), &sig, &[x.into(), c0.into()], None).unwrap();
        let l1 = g.call("layer", Some(1), &sig, &[l0.out(0), c1.into()], None).unwrap();
        g.ret(&[l1.out(0), l0.out(1), l1.out(1)], None);
        m.add_function(Function { name: "decode".into(), graph: g });
        m.set_entry(Mode::Decode, "decode");

        // b=1, s=1: one hidden row is 32 bytes.
        let p = plan(&m, Mode::Decode, &Bindings { batch: 1, seq: 1, cache: 10 }).unwrap();
        assert_eq!(p.callees.len(), 1);
        let l = &p.callees[0];
        // Inside the layer: e and k (32 B each) are its own; y is the caller's; the
        // appended cache is the caller's cache argument.
        assert_eq!(l.outputs, [Origin::Fresh, Origin::Argument(1)]);
        assert_eq!((l.peak_live_bytes, l.allocated_bytes, l.values), (64, 64, 2));
        // Entry timeline: step 3 (call 0): l0.0 (32) + scratch peak 64 = 96;
        // step 4 (call 1): l0.0 + l1.0 (64) + 64 = 128. Caches alias the arguments.
        assert_eq!(p.peak_live_bytes(), 128);
        assert_eq!(p.entry.values, 4); // l0.0, l1.0, two scratch regions
                                       // Scratch of call 0 is free again at call 1, so both calls share one region.
        assert_eq!(p.entry.scratch[&l0], p.entry.scratch[&l1]);
        assert_eq!(p.buffers_after(), 3);
        assert_eq!(p.allocated_bytes(), 32 + 32 + 64);
        assert!(!p.entry.assignment.contains_key(&l0.out(1)));
        // Weights: one per layer, scoped by the call.
        let names: Vec<String> = p.entry.weights.keys().cloned().collect();
        assert_eq!(names, [param_path(Some(0), "w"), param_path(Some(1), "w")]);
        assert_eq!(p.weight_bytes(), 64);
        assert_eq!(p.entry.argument_bytes, 32 + 2 * 320);
        assert!(p.summary().contains("fn layer: peak live 64 bytes, arena 64 bytes in 2 buffers (2 requests)"), "{}", p.summary());
    }

    #[test]
    fn the_pass_records_the_plan_at_the_context_sizes() {
        let mut g = Graph::new();
        let x = g.input(0, "x", Ty::new(DType::Bf16, [B, S, n(16)]), None);
        let e = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        g.ret(&[e.into()], None);
        let mut m = module_of("prefill", g, Mode::Prefill);
        let mut cx = PassCx::new(Mode::Prefill);
        assert_eq!(MemoryPlan.run(&mut m, &mut cx), Ok(Changed::No));
        // Default prefill sizes: b=1, s=4096; 4096·16·2 bytes.
        assert_eq!(cx.memory_plan.as_ref().unwrap().peak_live_bytes(), 4096 * 16 * 2);
        assert!(cx.reports[0].text.starts_with("prefill entry `prefill` at b=1 s=4096 c=0:"), "{}", cx.reports[0].text);

        let mut cx = PassCx::new(Mode::Decode);
        assert!(MemoryPlan.run(&mut m, &mut cx).unwrap_err().to_string().contains("no decode entry point"));
    }
}
