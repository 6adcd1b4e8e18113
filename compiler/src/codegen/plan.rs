//! The execution plan of a compiled module: what `dsc compile --emit plan` writes as
//! `plan.json` and what the device runtimes execute.
//!
//! A [`Plan`] holds one [`FunctionPlan`] per function reachable from the entry point (the
//! entry and its layer bodies: a layer function is planned once and called per layer, as
//! in the IR, so DeepSeek-V3's plan does not repeat 61 layers). A function plan names
//! every value's buffer (dtype and shape in `b`, `c`, `s`), binds inputs by position,
//! weights by checkpoint name and constants by value, and lists the steps in order: a
//! node's launches ([`NodeWork`], decided by [`super::select::node_work`]) or a call.
//! After each step it lists the buffers no later step reads, so a runtime can release
//! them (the plan's own liveness, not the runtime's guess).

use super::launch::{Arg, Buf, Launch, NodeWork, Size};
use super::select::node_work_in_graph;
use super::{KernelSpec, Target};
use crate::ir::{param_path, DType, Function, Graph, Mode, Module, NodeId, Op, Shape, Value};
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// Where a buffer's contents come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// The function's `index`-th argument.
    Input { index: u32, name: String },
    /// A weight: `name` as the function sees it; the checkpoint name is
    /// `param_path(layer, name)` for the calling layer.
    Param { name: String },
    /// A scalar constant.
    Const { value: f64 },
    /// Written by a step (a node's kernels or a call's results).
    Computed,
    /// The same memory as another buffer (a reshape).
    Alias(usize),
}

/// One buffer of a function.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferPlan {
    pub dtype: DType,
    pub shape: Shape,
    pub source: Source,
}

impl BufferPlan {
    pub fn len(&self) -> Size {
        Size::numel(&self.shape)
    }
}

/// One step of a function.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Node `label` (`%12 matmul`, numbered as the IR printer does) runs `work` with its
    /// inputs and outputs in these buffers.
    Node { label: String, inputs: Vec<usize>, outputs: Vec<usize>, work: NodeWork },
    /// A call of another function of the plan; `layer` scopes its weights.
    Call { function: String, layer: Option<u32>, args: Vec<usize>, results: Vec<usize> },
}

/// The plan of one function.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionPlan {
    pub name: String,
    pub buffers: Vec<BufferPlan>,
    /// Buffer of each argument, by argument index.
    pub inputs: Vec<usize>,
    pub steps: Vec<Step>,
    /// Buffers no step after `steps[i]` reads (and that are not results), per step.
    pub release: Vec<Vec<usize>>,
    pub results: Vec<usize>,
}

/// A whole module's plan for one mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub mode: Mode,
    pub entry: String,
    pub functions: BTreeMap<String, FunctionPlan>,
}

/// Nodes that have no kernel: the plan cannot be built until they do.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanError {
    /// `function: %n op: reason`, one per node.
    pub unsupported: Vec<String>,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} node(s) have no GPU kernel yet:", self.unsupported.len())?;
        for u in &self.unsupported {
            writeln!(f, "  {u}")?;
        }
        Ok(())
    }
}

impl Plan {
    /// The plan of `module`'s entry point for `mode` and every function it calls.
    pub fn build(module: &Module, mode: Mode) -> Result<Plan, PlanError> {
        let entry = module.entry(mode).ok_or_else(|| PlanError { unsupported: vec![format!("the module has no {mode} entry point")] })?;
        let mut functions = BTreeMap::new();
        let mut unsupported = Vec::new();
        let mut todo = vec![entry.name.clone()];
        while let Some(name) = todo.pop() {
            if functions.contains_key(&name) {
                continue;
            }
            let Some(f) = module.function(&name) else {
                unsupported.push(format!("{name}: called but not in the module"));
                continue;
            };
            let fp = plan_function(f, &mut unsupported);
            for s in &fp.steps {
                if let Step::Call { function, .. } = s {
                    todo.push(function.clone());
                }
            }
            functions.insert(name, fp);
        }
        if unsupported.is_empty() {
            Ok(Plan { mode, entry: entry.name.clone(), functions })
        } else {
            Err(PlanError { unsupported })
        }
    }

    /// Every distinct kernel the plan launches, by name.
    pub fn kernels(&self) -> BTreeMap<String, KernelSpec> {
        let mut out = BTreeMap::new();
        for f in self.functions.values() {
            for s in &f.steps {
                if let Step::Node { work, .. } = s {
                    for k in work.kernels() {
                        out.insert(k.name(), k.clone());
                    }
                }
            }
        }
        out
    }

    /// The plan as `plan.json` (deterministic: maps are ordered, sizes print one way).
    pub fn to_json(&self, target: Target) -> Json {
        let kernels: serde_json::Map<String, Json> = self
            .kernels()
            .iter()
            .map(|(name, k)| {
                let d = k.cube_shape();
                (
                    name.clone(),
                    json!({ "file": format!("kernels/{name}.{}", target.extension()), "cube_dim": d, "config": format!("{k:?}") }),
                )
            })
            .collect();
        let functions: serde_json::Map<String, Json> = self.functions.iter().map(|(n, f)| (n.clone(), function_json(f))).collect();
        json!({
            "format": "dsc-plan/1",
            "mode": self.mode.name(),
            "target": match target { Target::Cuda => "cuda", Target::Wgsl => "wgpu" },
            "sizes": { "b": "sequences in the batch", "c": "positions already in the KV cache", "s": "new positions per sequence" },
            "abi": ABI,
            "entry": self.entry,
            "kernels": kernels,
            "functions": functions,
        })
    }
}

/// How a runtime calls a kernel of the plan, for people writing another runtime.
pub const ABI: &str = "Each launch lists its arguments in the kernel's parameter order: \
{\"buffer\": id} binds a buffer of the function (floats in the kernel's element type, integers as i32), \
\"inputs\" binds all the node's input buffers as one sequence (the elementwise kernel), \
{\"u32\": size} is a scalar, {\"table\": [sizes]} is a u32 array uploaded as a read-only buffer. \
After the kernel's buffers CubeCL binds one read-only struct `info_st` (WGSL: the last binding; CUDA: the last parameter): `scalars_u32` holds the u32 scalars in parameter order, then `static_meta` holds each buffer's length in elements (bounds checks), each array padded to a multiple of 8 bytes (CubeCL 0.11.3; runtime/src/cuda/abi.rs checks this against the generated sources). Grids count cubes along x, y, z; the cube's own shape is the kernel's cube_dim. \
Sizes are expressions of b, c, s; `ceil(a/d)` rounds up.";

fn size_json(s: &Size) -> Json {
    match s.as_const() {
        Some(n) => json!(n),
        None => json!(s.to_string()),
    }
}

fn shape_json(s: &Shape) -> Json {
    Json::Array(s.0.iter().map(|d| d.as_const().map_or_else(|| json!(d.to_string()), |n| json!(n))).collect())
}

fn function_json(f: &FunctionPlan) -> Json {
    let buffers: Vec<Json> = f
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut o = json!({ "id": i, "dtype": b.dtype.name(), "shape": shape_json(&b.shape) });
            let m = o.as_object_mut().expect("object");
            match &b.source {
                Source::Input { index, name } => {
                    m.insert("input".into(), json!({ "index": index, "name": name }));
                }
                Source::Param { name } => {
                    m.insert("weight".into(), json!(name));
                }
                Source::Const { value } => {
                    m.insert("const".into(), json!(value));
                }
                Source::Computed => {}
                Source::Alias(of) => {
                    m.insert("alias_of".into(), json!(of));
                }
            }
            o
        })
        .collect();
    let steps: Vec<Json> = f
        .steps
        .iter()
        .zip(&f.release)
        .map(|(s, rel)| {
            let mut o = match s {
                Step::Node { label, inputs, outputs, work } => {
                    let mut o = json!({ "node": label, "inputs": inputs, "outputs": outputs });
                    match work {
                        NodeWork::Alias(i) => {
                            o["alias"] = json!(inputs[*i as usize]);
                        }
                        NodeWork::Launches { scratch, launches } => {
                            let sc: Vec<Json> =
                                scratch.iter().map(|s| json!({ "dtype": s.dtype.name(), "len": size_json(&s.len) })).collect();
                            if !sc.is_empty() {
                                o["scratch"] = Json::Array(sc);
                            }
                            o["launches"] = Json::Array(launches.iter().map(|l| launch_json(l, inputs, outputs)).collect());
                        }
                        NodeWork::Append { copy, write } => {
                            o["append"] =
                                json!({ "copy": launch_json(copy, inputs, outputs), "write": launch_json(write, inputs, outputs) });
                        }
                    }
                    o
                }
                Step::Call { function, layer, args, results } => {
                    json!({ "call": function, "layer": layer, "args": args, "results": results,
                            "weights": layer.map(|l| param_path(Some(l), "*")) })
                }
            };
            if !rel.is_empty() {
                o["release"] = json!(rel);
            }
            o
        })
        .collect();
    json!({ "inputs": f.inputs, "results": f.results, "buffers": buffers, "steps": steps })
}

/// One launch as `plan.json` writes it: buffers by plan id.
fn launch_json(l: &Launch, inputs: &[usize], outputs: &[usize]) -> Json {
    let args: Vec<Json> = l
        .args
        .iter()
        .map(|a| match a {
            Arg::Buf(Buf::Input(i)) => json!({ "buffer": inputs[*i as usize] }),
            Arg::Buf(Buf::Output(i)) => json!({ "buffer": outputs[*i as usize] }),
            Arg::Buf(Buf::Scratch(i)) => json!({ "scratch": i }),
            Arg::Inputs => json!("inputs"),
            Arg::U32(s) => json!({ "u32": size_json(s) }),
            Arg::Table(t) => json!({ "table": t.iter().map(size_json).collect::<Vec<_>>() }),
            Arg::F32Table(t) => json!({ "f32_table": t.iter().map(|b| f32::from_bits(*b)).collect::<Vec<_>>() }),
        })
        .collect();
    let mut o = json!({ "kernel": l.kernel.name(), "args": args, "grid": l.grid.iter().map(size_json).collect::<Vec<_>>() });
    if let Some(w) = &l.when {
        o["when"] = w.to_json();
    }
    o
}

fn plan_function(f: &Function, unsupported: &mut Vec<String>) -> FunctionPlan {
    let g: &Graph = &f.graph;
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(c) => {
            unsupported.push(format!("{}: a cycle through {} nodes", f.name, c.0.len()));
            return FunctionPlan { name: f.name.clone(), buffers: vec![], inputs: vec![], steps: vec![], release: vec![], results: vec![] };
        }
    };
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut buffers: Vec<BufferPlan> = Vec::new();
    let mut of_value: HashMap<Value, usize> = HashMap::new();
    let mut inputs: Vec<(u32, usize)> = Vec::new();
    let mut steps = Vec::new();
    let mut results = Vec::new();
    let new_buf = |buffers: &mut Vec<BufferPlan>, dtype: DType, shape: Shape, source: Source| {
        buffers.push(BufferPlan { dtype, shape, source });
        buffers.len() - 1
    };
    for &n in &order {
        let node = g.node(n);
        let label = format!("%{} {}", pos[&n], node.op.name());
        let ins: Vec<usize> = g.inputs(n).iter().map(|v| of_value[v]).collect();
        let outs_ty = node.outputs.clone();
        match &node.op {
            Op::Input { index, name } => {
                let b =
                    new_buf(&mut buffers, outs_ty[0].dtype, outs_ty[0].shape.clone(), Source::Input { index: *index, name: name.clone() });
                inputs.push((*index, b));
                of_value.insert(n.out(0), b);
            }
            Op::Param { name } => {
                let b = new_buf(&mut buffers, outs_ty[0].dtype, outs_ty[0].shape.clone(), Source::Param { name: name.clone() });
                of_value.insert(n.out(0), b);
            }
            Op::Const { value } => {
                let b = new_buf(&mut buffers, outs_ty[0].dtype, outs_ty[0].shape.clone(), Source::Const { value: value.get() });
                of_value.insert(n.out(0), b);
            }
            Op::Return => results = ins,
            Op::Call { function, layer } => {
                let res: Vec<usize> = outs_ty
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let b = new_buf(&mut buffers, t.dtype, t.shape.clone(), Source::Computed);
                        of_value.insert(n.out(i as u16), b);
                        b
                    })
                    .collect();
                steps.push(Step::Call { function: function.clone(), layer: *layer, args: ins, results: res });
            }
            _ => match node_work_in_graph(g, n) {
                Ok((work, reads)) => {
                    let ins: Vec<usize> = reads.iter().map(|v| of_value[v]).collect();
                    let outs: Vec<usize> = outs_ty
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            let source = match work {
                                NodeWork::Alias(k) => Source::Alias(root(&buffers, ins[k as usize])),
                                NodeWork::Launches { .. } | NodeWork::Append { .. } => Source::Computed,
                            };
                            let b = new_buf(&mut buffers, t.dtype, t.shape.clone(), source);
                            of_value.insert(n.out(i as u16), b);
                            b
                        })
                        .collect();
                    steps.push(Step::Node { label, inputs: ins, outputs: outs, work });
                }
                Err(u) => {
                    unsupported.push(format!("{}: {label}: {}", f.name, u.reason));
                    // Its outputs still get buffers, so later nodes can be planned (and
                    // their own problems reported) in the same pass.
                    for (i, t) in outs_ty.iter().enumerate() {
                        let b = new_buf(&mut buffers, t.dtype, t.shape.clone(), Source::Computed);
                        of_value.insert(n.out(i as u16), b);
                    }
                }
            },
        }
    }
    inputs.sort();
    drop_unread_steps(&buffers, &mut steps, &results);
    let release = liveness(&buffers, &steps, &results);
    FunctionPlan { name: f.name.clone(), buffers, inputs: inputs.into_iter().map(|(_, b)| b).collect(), steps, release, results }
}

/// Drops the node steps whose outputs no later step and no result reads: the copies a
/// strided view made unnecessary (every kernel is free of side effects). Calls stay.
fn drop_unread_steps(buffers: &[BufferPlan], steps: &mut Vec<Step>, results: &[usize]) {
    let mut read: BTreeSet<usize> = results.iter().map(|&b| root(buffers, b)).collect();
    let mut keep = vec![true; steps.len()];
    for (i, s) in steps.iter().enumerate().rev() {
        let (reads, writes) = match s {
            Step::Node { inputs, outputs, .. } => (inputs, outputs),
            Step::Call { args, results, .. } => (args, results),
        };
        let is_call = matches!(s, Step::Call { .. });
        // An alias step's output is its input's memory: it is read when either is.
        if is_call || writes.iter().any(|b| read.contains(b)) {
            read.extend(reads.iter().flat_map(|&b| [b, root(buffers, b)]));
        } else {
            keep[i] = false;
        }
    }
    let mut k = keep.into_iter();
    steps.retain(|_| k.next().unwrap_or(true));
}

/// The buffer an alias chain ends at.
fn root(buffers: &[BufferPlan], mut b: usize) -> usize {
    while let Source::Alias(of) = buffers[b].source {
        b = of;
    }
    b
}

/// Per step, the computed buffers whose last reader it is. Liveness is tracked on alias
/// roots (a reshape keeps its source alive); inputs, weights and constants belong to the
/// caller and results outlive the function, so neither is ever released here.
fn liveness(buffers: &[BufferPlan], steps: &[Step], results: &[usize]) -> Vec<Vec<usize>> {
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        let (reads, writes) = match s {
            Step::Node { inputs, outputs, .. } => (inputs, outputs),
            Step::Call { args, results, .. } => (args, results),
        };
        for &b in reads.iter().chain(writes) {
            last.insert(root(buffers, b), i);
        }
    }
    let keep: BTreeSet<usize> = results.iter().map(|&b| root(buffers, b)).collect();
    let mut release = vec![Vec::new(); steps.len()];
    for (b, i) in last {
        if matches!(buffers[b].source, Source::Computed) && !keep.contains(&b) {
            release[i].push(b);
        }
    }
    for r in &mut release {
        r.sort();
    }
    release
}
