//! Two runtime-side edits of a compiled module, made after its pass pipeline so that no
//! pass has to know about them:
//!
//! - [`add_attention_mask`]: an additive `attention_mask [b, sq, sk]` argument, appended
//!   to the entry's arguments and threaded into every `attention` (which becomes
//!   `masked`). This is how batches of prompts of different lengths run: left-padded,
//!   with the pad keys masked out. Lowering's graphs stay mask-free, so an unpadded
//!   batch runs exactly the graph every pass was written against.
//! - [`expose_routing`]: every `moe_route`'s chosen experts and gate weights appended to
//!   its function's results and to the entry's, so parity tests and tools can see the
//!   router's decisions through the same interface every backend implements, without a
//!   hook inside any one interpreter.
//!
//! - [`replay_routing`]: the other way round, for training (routing replay, verl's "R3"
//!   fix for MoE RL instability): every router takes its experts from a new entry
//!   argument `routing.{k}` instead of choosing them, so a GRPO training forward runs
//!   each token through the experts the rollout chose. Unlike the two above it runs on
//!   the *lowered* module, before the pass pipeline, because autodiff must see the
//!   replayed router (`moe_route_replay`) to differentiate the recomputed gate weights.
//!
//! All work on whatever they are given (absorbed MLA included): they read shapes off the
//! nodes they touch, and the result is verified.

use dsc_compiler::ir::{verify, Function, Graph, Mode, Module, NodeId, Op, Routing, Ty, Value};
use std::collections::HashMap;

/// The name of the argument [`add_attention_mask`] adds.
pub const MASK_INPUT: &str = "attention_mask";

fn entry_name(m: &Module, mode: Mode) -> Result<String, String> {
    m.entries.get(&mode).cloned().ok_or_else(|| format!("the module has no {mode} entry point"))
}

fn attention_nodes(g: &Graph) -> Vec<NodeId> {
    g.nodes().into_iter().filter(|&n| matches!(g.node(n).op, Op::Attention { .. })).collect()
}

fn checked(m: &Module) -> Result<(), String> {
    verify(m).map_err(|errs| {
        let shown: Vec<String> = errs.iter().take(5).map(|e| e.to_string()).collect();
        format!("the rewritten module fails verification: {}", shown.join("; "))
    })
}

/// Makes every attention in `f` read one new argument `attention_mask`; returns its
/// index and type, or `None` when `f` has no attention.
fn mask_function(f: &mut Function) -> Result<Option<(u16, Ty)>, String> {
    let g = &mut f.graph;
    let atts = attention_nodes(g);
    let Some(&first) = atts.first() else { return Ok(None) };
    // [b, sq, sk] from q [b, sq, h, d] and k [b, sk, kvh, d].
    let ty_of = |g: &Graph, n: NodeId| -> Result<Ty, String> {
        let ins = g.inputs(n);
        let (q, k) = (g.ty(ins[0]), g.ty(ins[1]));
        if q.rank() != 4 || k.rank() != 4 {
            return Err(format!("`{}`: attention of rank-{} q and rank-{} k", f.name, q.rank(), k.rank()));
        }
        Ok(Ty::new(q.dtype, [q.shape.0[0], q.shape.0[1], k.shape.0[1]]))
    };
    let ty = ty_of(g, first)?;
    let index = g.arguments().len();
    let mask = g.input(index as u32, MASK_INPUT, ty.clone(), None);
    for n in atts {
        let t = ty_of(g, n)?;
        if t != ty {
            return Err(format!("`{}`: attentions over different key lengths ({} and {}) cannot share one mask", f.name, ty, t));
        }
        let Op::Attention { heads, kv_heads, scale, causal, masked, lse } = g.node(n).op.clone() else { unreachable!("attention") };
        if masked {
            return Err(format!("`{}`: an attention is already masked", f.name));
        }
        g.node_mut(n).op = Op::Attention { heads, kv_heads, scale, causal, masked: true, lse };
        g.set_input(n, 3, mask.into());
    }
    Ok(Some((index as u16, ty)))
}

/// Adds the `attention_mask` argument (last) to `mode`'s entry point and threads it into
/// every attention the entry reaches. The mask is added to the scaled scores: 0 where a
/// key is visible, `-inf` where not; the causal rule still applies on top.
pub fn add_attention_mask(m: &mut Module, mode: Mode) -> Result<(), String> {
    let entry = entry_name(m, mode)?;
    let mut masked: HashMap<String, (u16, Ty)> = HashMap::new();
    for f in m.functions.iter_mut().filter(|f| f.name != entry) {
        if let Some(slot) = mask_function(f)? {
            masked.insert(f.name.clone(), slot);
        }
    }
    let f = m.function_mut(&entry).expect("entry exists");
    let own = mask_function(f)?;
    let g = &mut f.graph;
    let calls: Vec<(NodeId, String)> = g
        .nodes()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::Call { function, .. } if masked.contains_key(function) => Some((n, function.clone())),
            _ => None,
        })
        .collect();
    // One mask for the entry and all its callees: they must agree on its type.
    let mut types = own.iter().map(|(_, t)| ("the entry itself", t)).chain(calls.iter().map(|(_, c)| (c.as_str(), &masked[c].1)));
    let Some((first, ty)) = types.next() else {
        return Err(format!("`{entry}` reaches no attention to mask"));
    };
    let ty = ty.clone();
    if let Some((other, t)) = types.find(|(_, t)| **t != ty) {
        return Err(format!("`{first}` and `{other}` attend over different key lengths ({ty} and {t})"));
    }
    let mask: Value = match own {
        Some((index, _)) => {
            let n = g.arguments().into_iter().find(|&n| matches!(&g.node(n).op, Op::Input { index: i, .. } if *i == index as u32));
            n.expect("the mask input was just added").into()
        }
        None => {
            let index = g.arguments().len() as u32;
            g.input(index, MASK_INPUT, ty, None).into()
        }
    };
    for (call, callee) in calls {
        let slot = masked[&callee].0;
        if g.inputs(call).len() != slot as usize {
            return Err(format!("a call of `{callee}` passes {} arguments, not {slot}", g.inputs(call).len()));
        }
        g.set_input(call, slot, mask);
    }
    checked(m)
}

/// Which router a pair of exposed results belongs to: the layer of the call that ran
/// it (`None` for a router outside any layer call).
pub type RouteSite = Option<u32>;

/// Appends every router's `(indices, weights)` to the results of `mode`'s entry point,
/// after the results it already had, one pair per router in call order; returns which
/// layer each pair comes from.
pub fn expose_routing(m: &mut Module, mode: Mode) -> Result<Vec<RouteSite>, String> {
    let entry = entry_name(m, mode)?;
    // Routers per function, appended to that function's return.
    let mut routers: HashMap<String, usize> = HashMap::new();
    for f in m.functions.iter_mut() {
        let g = &mut f.graph;
        let order = g.topo_order().map_err(|_| format!("`{}` has a cycle", f.name))?;
        let routes: Vec<NodeId> = order.into_iter().filter(|&n| matches!(g.node(n).op, Op::MoeRoute(_))).collect();
        if routes.is_empty() {
            continue;
        }
        let ret = g.return_node().ok_or_else(|| format!("`{}` has no return", f.name))?;
        let mut slot = g.inputs(ret).len() as u16;
        for r in &routes {
            g.set_input(ret, slot, r.out(0));
            g.set_input(ret, slot + 1, r.out(1));
            slot += 2;
        }
        routers.insert(f.name.clone(), routes.len());
    }
    let sigs: HashMap<String, Vec<Ty>> = routers.keys().map(|n| (n.clone(), m.signature(n).expect("exists").outputs)).collect();
    let own = routers.get(&entry).copied().unwrap_or(0);
    let f = m.function_mut(&entry).expect("entry exists");
    let g = &mut f.graph;
    let mut sites: Vec<RouteSite> = vec![None; own];
    let ret = g.return_node().ok_or_else(|| format!("`{entry}` has no return"))?;
    let order = g.topo_order().map_err(|_| format!("`{entry}` has a cycle"))?;
    let mut slot = g.inputs(ret).len() as u16;
    for n in order {
        let Op::Call { function, layer } = g.node(n).op.clone() else { continue };
        let (Some(&count), Some(outs)) = (routers.get(&function), sigs.get(&function)) else { continue };
        let before = outs.len() - 2 * count;
        g.node_mut(n).outputs = outs.clone();
        for i in before..outs.len() {
            g.set_input(ret, slot, n.out(i as u16));
            slot += 1;
        }
        sites.extend(std::iter::repeat_n(layer, count));
    }
    checked(m)?;
    Ok(sites)
}

/// The prefix of the arguments [`replay_routing`] adds: `routing.0`, `routing.1`, ...
pub const ROUTING_INPUT: &str = "routing";

/// The routers of `f` in topological order (the order [`expose_routing`] returns them in).
fn routers(f: &Function) -> Result<Vec<NodeId>, String> {
    let g = &f.graph;
    let order = g.topo_order().map_err(|_| format!("`{}` has a cycle", f.name))?;
    Ok(order.into_iter().filter(|&n| matches!(g.node(n).op, Op::MoeRoute(_))).collect())
}

/// Turns every router of `f` into a `moe_route_replay` reading one new argument, appended
/// after `f`'s arguments in router order; returns the new arguments' types. The bias
/// input (selection only) is dropped, and its param too once nothing else reads it.
fn replay_function(f: &mut Function, routes: &[NodeId], names: &mut dyn FnMut(usize) -> String) -> Vec<Ty> {
    let g = &mut f.graph;
    let first = g.arguments().len() as u32;
    let mut types = Vec::new();
    for (i, &n) in routes.iter().enumerate() {
        let Op::MoeRoute(r) = g.node(n).op.clone() else { unreachable!("a router") };
        let ty = g.node(n).outputs[0].clone();
        let arg = g.input(first + i as u32, &names(i), ty.clone(), g.node(n).span);
        let bias = g.inputs(n).get(1).copied().filter(|_| r.selection_bias);
        // The replayed op ignores the selection settings; clearing the bias flag keeps its
        // arity (always 2) and its printed form honest.
        g.node_mut(n).op = Op::MoeRouteReplay(Routing { selection_bias: false, ..r });
        g.set_input(n, 1, arg.into());
        if let Some(b) = bias.filter(|b| !g.has_users(b.node) && matches!(g.node(b.node).op, Op::Param { .. })) {
            g.remove(b.node);
        }
        types.push(ty);
    }
    types
}

/// Routing replay: makes the routers of `mode`'s entry point take their experts from new
/// entry arguments instead of choosing them; returns the site (layer) of each, in the
/// order of the arguments. Run it on the lowered module, before the pass pipeline.
///
/// `replay(site)` says which routers to replay, by the layer of the call that runs them
/// (`None`: a router in the entry itself): e.g. `|l| l.is_some_and(|l| l < layers)`
/// replays the main layers and leaves the MTP modules' routers (called with
/// `layer ≥ layers`) choosing freely, since a rollout never runs MTP. A function called
/// both at replayed and at free sites is an error (one body cannot both choose and be
/// told).
///
/// The added entry arguments, after the existing ones, are `routing.{k}: i32[b, s, top_k]`
/// (the router's own indices type, its token axes), `k` counting the replayed routers in
/// the order [`expose_routing`] reports them (the entry's own routers first, then call
/// order), so a rollout's exposed indices, filtered by the same `replay`, feed them
/// one to one. Each replayed router becomes [`Op::MoeRouteReplay`]: its indices are the
/// argument (an index outside `0..E` fails the run), its gate weights are recomputed from
/// the logits there and differentiated; the selection bias is no longer read.
pub fn replay_routing(m: &mut Module, mode: Mode, replay: impl Fn(RouteSite) -> bool) -> Result<Vec<RouteSite>, String> {
    let entry = entry_name(m, mode)?;
    let calls: Vec<(NodeId, String, Option<u32>)> = {
        let g = &m.entry(mode).expect("entry exists").graph;
        let order = g.topo_order().map_err(|_| format!("`{entry}` has a cycle"))?;
        order
            .into_iter()
            .filter_map(|n| match &g.node(n).op {
                Op::Call { function, layer } => Some((n, function.clone(), *layer)),
                _ => None,
            })
            .collect()
    };
    // Which callees are replayed, checked to agree over all their call sites.
    let mut replayed: HashMap<String, bool> = HashMap::new();
    for (_, callee, layer) in &calls {
        let f = m.function(callee).ok_or_else(|| format!("`{entry}` calls `{callee}`, which is not in the module"))?;
        if routers(f)?.is_empty() {
            continue;
        }
        let want = replay(*layer);
        if *replayed.entry(callee.clone()).or_insert(want) != want {
            return Err(format!("`{callee}` is called at both replayed and free sites (layer {layer:?}): cannot replay only some"));
        }
    }
    // Callees first: each gets its arguments and reports their types.
    let mut added: HashMap<String, (usize, Vec<Ty>)> = HashMap::new();
    for (callee, _) in replayed.iter().filter(|(_, &on)| on) {
        let f = m.function_mut(callee).expect("checked above");
        let routes = routers(f)?;
        let first = f.graph.arguments().len();
        let types = replay_function(f, &routes, &mut |i| format!("{ROUTING_INPUT}.{i}"));
        added.insert(callee.clone(), (first, types));
    }
    // Then the entry: its own routers, then one argument per callee router, in call order.
    let f = m.function_mut(&entry).expect("entry exists");
    let own: Vec<NodeId> = if replay(None) { routers(f)? } else { Vec::new() };
    let own_types = replay_function(f, &own, &mut |i| format!("{ROUTING_INPUT}.{i}"));
    let mut sites: Vec<RouteSite> = vec![None; own_types.len()];
    let g = &mut f.graph;
    let mut next = g.arguments().len() as u32;
    for (call, callee, layer) in calls {
        let Some((first, types)) = added.get(&callee) else { continue };
        if g.inputs(call).len() != *first {
            return Err(format!("a call of `{callee}` passes {} arguments, not {first}", g.inputs(call).len()));
        }
        for (i, ty) in types.iter().enumerate() {
            let k = sites.len();
            let arg = g.input(next, &format!("{ROUTING_INPUT}.{k}"), ty.clone(), g.node(call).span);
            next += 1;
            g.set_input(call, (first + i) as u16, arg.into());
            sites.push(layer);
        }
    }
    if sites.is_empty() {
        return Err(format!("`{entry}` reaches no router to replay"));
    }
    checked(m)?;
    Ok(sites)
}
