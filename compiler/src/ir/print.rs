//! The stable text form of IR, used by golden snapshots, `DSC_DUMP` and error reports.
//!
//! ```text
//! entry prefill = prefill
//!
//! fn layer_0 {
//!   %0:bf16[b,s,64] = input 0 "x"
//!   %1:bf16[64] = param "input_layernorm.weight"
//!   %2:bf16[b,s,64] = rms_norm(%0, %1) eps=1e-6 @12:5
//!   %3:(i32[b,s,8], f32[b,s,8]) = moe_route(%2) top_k=8 ...
//!   %4:f32[b,s,8] = exp(%3.1)
//!   return %2
//! }
//! ```
//!
//! Nodes are numbered per function in topological order, ties broken by insertion order
//! ([`Graph::topo_order`]); raw `NodeId`s never appear. `StableGraph` leaves holes and
//! reuses slots after removals, so printing raw ids would make snapshots depend on a
//! pass's deletion history rather than on the graph (the reason naga compacts modules
//! before its snapshots). A value is `%n`, or `%n.i` when its node has several outputs.
//! Spans print as `@line:col` in the spec's main file (file 0 of the [`SourceMap`]),
//! `@name:line:col` in an included file, and as a byte range `@start..end` when no source
//! map is given.

use super::graph::{Function, Graph, Module, NodeId, Value};
use super::op::{GroupScore, Op, RopeLayout, Scoring, Yarn};
use dsc_dsl::span::{FileId, SourceMap, Span};
use std::collections::HashMap;
use std::fmt::Write;

/// The whole module: entry points (in mode order), then each function in module order.
pub fn print_module(m: &Module, sources: Option<&SourceMap>) -> String {
    let mut out = String::new();
    for (mode, name) in &m.entries {
        let _ = writeln!(out, "entry {mode} = {name}");
    }
    for f in &m.functions {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&print_function(f, sources));
    }
    out
}

/// One function, `fn name { ... }`.
pub fn print_function(f: &Function, sources: Option<&SourceMap>) -> String {
    let mut out = format!("fn {} {{\n", f.name);
    for line in print_graph(&f.graph, sources) {
        let _ = writeln!(out, "  {line}");
    }
    out.push_str("}\n");
    out
}

/// One line per node. A graph with a cycle (which the verifier rejects) is printed in
/// insertion order after a `; cycle` line, so it can still be looked at.
pub fn print_graph(g: &Graph, sources: Option<&SourceMap>) -> Vec<String> {
    let mut lines = Vec::new();
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(_) => {
            lines.push("; cycle: printed in insertion order".to_string());
            g.nodes()
        }
    };
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let value = |v: Value| -> String {
        let Some(k) = number.get(&v.node) else { return format!("%?{}", v.node) };
        if g.contains(v.node) && g.node(v.node).outputs.len() == 1 && v.output == 0 {
            format!("%{k}")
        } else {
            format!("%{k}.{}", v.output)
        }
    };

    for (k, &n) in order.iter().enumerate() {
        let node = g.node(n);
        let args: Vec<String> = g.inputs(n).into_iter().map(value).collect();
        let args = args.join(", ");
        let mut line = String::new();
        match &node.op {
            Op::Return => {
                line.push_str("return");
                if !args.is_empty() {
                    let _ = write!(line, " {args}");
                }
            }
            op => {
                let _ = write!(line, "%{k}:");
                match node.outputs.as_slice() {
                    [t] => {
                        let _ = write!(line, "{t}");
                    }
                    ts => {
                        let ts: Vec<String> = ts.iter().map(|t| t.to_string()).collect();
                        let _ = write!(line, "({})", ts.join(", "));
                    }
                }
                line.push_str(" = ");
                match op {
                    Op::Input { index, name } => {
                        let _ = write!(line, "input {index} {name:?}");
                    }
                    Op::Param { name } => {
                        let _ = write!(line, "param {name:?}");
                    }
                    Op::Const { value } => {
                        let _ = write!(line, "const {value}");
                    }
                    Op::Call { function, .. } => {
                        let _ = write!(line, "call {function}({args})");
                    }
                    _ => {
                        let _ = write!(line, "{}({args})", op.name());
                    }
                }
                let attrs = attrs(op);
                if !attrs.is_empty() {
                    let _ = write!(line, " {attrs}");
                }
            }
        }
        if let Some(span) = node.span {
            let _ = write!(line, " @{}", location(span, sources));
        }
        lines.push(line);
    }
    lines
}

/// `12:5` in the main file, `name:12:5` elsewhere, `120..130` without sources.
fn location(span: Span, sources: Option<&SourceMap>) -> String {
    match sources {
        Some(map) => {
            let (l, c) = map.line_col(span);
            if span.file == FileId(0) {
                format!("{l}:{c}")
            } else {
                format!("{}:{l}:{c}", map.get(span.file).name)
            }
        }
        None => format!("{}..{}", span.start, span.end),
    }
}

/// `yarn=(factor=.. ..)`, as `rope` and `rope_freqs` print it.
fn yarn_attr(y: &Yarn) -> String {
    format!(
        "yarn=(factor={} original_context={} beta_fast={} beta_slow={} mscale={} mscale_all_dim={})",
        y.factor, y.original_context, y.beta_fast, y.beta_slow, y.mscale, y.mscale_all_dim
    )
}

/// The op's settings as `key=value` pairs (flags as bare words), in declaration order.
fn attrs(op: &Op) -> String {
    let mut a: Vec<String> = Vec::new();
    match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Const { .. }
        | Op::MatMul
        | Op::BatchMatMul
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Select
        | Op::ExpertFfn
        | Op::SwiGlu
        | Op::WeightGrad
        | Op::SwiGluGrad
        | Op::ExpertFfnGrad
        | Op::Return => {}
        Op::Reduce { axis, keepdim, .. } => {
            a.push(format!("axis={axis}"));
            if *keepdim {
                a.push("keepdim".into());
            }
        }
        Op::Softmax { axis } | Op::Gather { axis } | Op::ScatterAdd { axis } | Op::Concat { axis } | Op::CacheAppend { axis } => {
            a.push(format!("axis={axis}"))
        }
        Op::TopK { k, axis } => a.push(format!("k={k} axis={axis}")),
        Op::Reshape { shape } | Op::Broadcast { shape } => a.push(format!("shape={shape}")),
        Op::Permute { perm } => {
            let p: Vec<String> = perm.iter().map(|p| p.to_string()).collect();
            a.push(format!("perm=[{}]", p.join(",")));
        }
        Op::Slice { axis, start, len } => a.push(format!("axis={axis} start={start} len={len}")),
        Op::Cast { to } => a.push(format!("to={to}")),
        Op::RmsNorm { eps } => a.push(format!("eps={eps}")),
        Op::Rope { layout, theta, rotary_dim, yarn } => {
            let layout = match layout {
                RopeLayout::HalfSplit => "half_split",
                RopeLayout::Interleaved => "interleaved",
            };
            a.push(format!("layout={layout} theta={theta} rotary_dim={rotary_dim}"));
            a.extend(yarn.as_ref().map(yarn_attr));
        }
        Op::Iota { start, len, dtype } => a.push(format!("start={start} len={len} dtype={dtype}")),
        Op::RopeFreqs { theta, rotary_dim, yarn } => {
            a.push(format!("theta={theta} rotary_dim={rotary_dim}"));
            a.extend(yarn.as_ref().map(yarn_attr));
        }
        Op::Fused(k) => a.push(k.to_string()),
        Op::Attention { heads, kv_heads, scale, causal, masked, lse } => {
            a.push(format!("heads={heads} kv_heads={kv_heads} scale={scale}"));
            if *causal {
                a.push("causal".into());
            }
            if *masked {
                a.push("masked".into());
            }
            if *lse {
                a.push("lse".into());
            }
        }
        Op::AttentionGrad { heads, kv_heads, scale, causal, masked } => {
            a.push(format!("heads={heads} kv_heads={kv_heads} scale={scale}"));
            if *causal {
                a.push("causal".into());
            }
            if *masked {
                a.push("masked".into());
            }
        }
        Op::RmsNormGrad { eps } => a.push(format!("eps={eps}")),
        Op::CrossEntropyGrad { ignore_index } | Op::TokenLogProbGrad { ignore_index } => {
            if let Some(i) = ignore_index {
                a.push(format!("ignore_index={i}"));
            }
        }
        Op::MoeRoute(r) | Op::MoeRouteReplay(r) | Op::MoeRouteGrad(r) => {
            let scoring = match r.scoring {
                Scoring::Softmax => "softmax",
                Scoring::Sigmoid => "sigmoid",
            };
            a.push(format!("top_k={} scoring={scoring}", r.top_k));
            if r.selection_bias {
                a.push("bias".into());
            }
            if r.groups > 1 {
                a.push(format!("groups={} kept={}", r.groups, r.groups_kept));
            }
            if let Some(gs) = r.group_score {
                a.push(format!(
                    "group_score={}",
                    match gs {
                        GroupScore::Max => "max",
                        GroupScore::Top2Sum => "top2_sum",
                    }
                ));
            }
            if r.normalize {
                a.push("normalize".into());
            }
            a.push(format!("scale={}", r.scale));
        }
        Op::CrossEntropy { ignore_index } | Op::TokenLogProb { ignore_index } => {
            if let Some(i) = ignore_index {
                a.push(format!("ignore_index={i}"));
            }
        }
        Op::Call { layer, .. } => {
            if let Some(l) = layer {
                a.push(format!("layer={l}"));
            }
        }
    }
    a.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::dim::{Dim, Shape};
    use crate::ir::dtype::{DType, Ty};
    use crate::ir::graph::Mode;
    use crate::ir::op::{BinaryOp, Float, Routing, Yarn};
    use crate::ir::verify::verify;
    use std::path::Path;

    const B: Dim = Dim::B;
    const S: Dim = Dim::S;
    const C: Dim = Dim::C;
    fn n(v: i64) -> Dim {
        Dim::lit(v)
    }
    fn bf(s: impl Into<Shape>) -> Ty {
        Ty::new(DType::Bf16, s)
    }

    /// One pre-norm attention block with a KV cache (hidden 64, 4 query heads, 2 kv heads
    /// of 16), the way lowering would emit a decode layer body.
    fn attention_block(span: Option<Span>) -> Function {
        let mut f = Function::new("attn_layer");
        let g = &mut f.graph;
        let x = g.input(0, "x", bf([B, S, n(64)]), None);
        let pos = g.input(1, "positions", Ty::new(DType::I32, [B, S]), None);
        let kc = g.input(2, "k_cache", bf([B, C, n(2), n(16)]), None);
        let vc = g.input(3, "v_cache", bf([B, C, n(2), n(16)]), None);
        let gain = g.param("input_layernorm.weight", bf([n(64)]), None);
        let h = g.add_inferred(Op::RmsNorm { eps: 1e-6.into() }, &[x.into(), gain.into()], span).unwrap();
        let proj = |g: &mut Graph, name: &str, out: i64, heads: i64| {
            let w = g.param(&format!("self_attn.{name}.weight"), bf([n(out), n(64)]), None);
            let y = g.add_inferred(Op::MatMul, &[h.into(), w.into()], None).unwrap();
            let shape = Shape::from([B, S, n(heads), n(16)]);
            g.add_inferred(Op::Reshape { shape }, &[y.into()], None).unwrap()
        };
        let q = proj(g, "q_proj", 64, 4);
        let k = proj(g, "k_proj", 32, 2);
        let v = proj(g, "v_proj", 32, 2);
        let rope = Op::Rope { layout: RopeLayout::HalfSplit, theta: 1e4.into(), rotary_dim: 16, yarn: None };
        let q = g.add_inferred(rope.clone(), &[q.into(), pos.into()], None).unwrap();
        let k = g.add_inferred(rope, &[k.into(), pos.into()], None).unwrap();
        let k_all = g.add_inferred(Op::CacheAppend { axis: 1 }, &[kc.into(), k.into()], None).unwrap();
        let v_all = g.add_inferred(Op::CacheAppend { axis: 1 }, &[vc.into(), v.into()], None).unwrap();
        let att = Op::Attention { heads: 4, kv_heads: 2, scale: 0.25.into(), causal: true, masked: false, lse: false };
        let a = g.add_inferred(att, &[q.into(), k_all.into(), v_all.into()], None).unwrap();
        let a = g.add_inferred(Op::Reshape { shape: Shape::from([B, S, n(64)]) }, &[a.into()], None).unwrap();
        let wo = g.param("self_attn.o_proj.weight", bf([n(64), n(64)]), None);
        let o = g.add_inferred(Op::MatMul, &[a.into(), wo.into()], None).unwrap();
        let y = g.add_inferred(Op::Binary(BinaryOp::Add), &[x.into(), o.into()], None).unwrap();
        g.ret(&[y.into(), k_all.into(), v_all.into()], None);
        f
    }

    #[test]
    fn attention_block_text() {
        let text = print_function(&attention_block(None), None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "fn attn_layer {");
        assert_eq!(lines[1], r#"  %0:bf16[b,s,64] = input 0 "x""#);
        assert!(lines.contains(&r#"  %4:bf16[64] = param "input_layernorm.weight""#), "{text}");
        assert!(lines.contains(&"  %5:bf16[b,s,64] = rms_norm(%0, %4) eps=1e-6"), "{text}");
        assert!(text.contains("= reshape(%7) shape=[b,s,4,16]\n"), "{text}");
        assert!(text.contains(":bf16[b,s,4,16] = rope(%8, %1) layout=half_split theta=10000 rotary_dim=16\n"), "{text}");
        assert!(text.contains(":bf16[b,c+s,2,16] = cache_append(%2, "), "{text}");
        assert!(text.contains(":bf16[b,s,4,16] = attention(") && text.contains("heads=4 kv_heads=2 scale=0.25 causal\n"), "{text}");
        assert!(text.contains(":bf16[b,s,64] = add(%0, "), "{text}");
        assert!(lines[lines.len() - 2].starts_with("  return %"), "{text}");
        assert_eq!(lines.last(), Some(&"}"));
        // Numbers are dense: 24 numbered nodes, then the unnumbered return.
        assert_eq!(lines.len(), 1 + 24 + 1 + 1);
    }

    #[test]
    fn module_with_calls_and_spans() {
        let mut sources = SourceMap::new();
        let main = sources.add(Path::new("tiny.dsc"), "tiny.dsc".into(), "model tiny {\n  norm eps 1e-6\n}\n".into());
        let inc = sources.add(Path::new("inc.dsc"), "inc.dsc".into(), "x\ny\n".into());
        let mut m = Module::new();
        m.add_function(attention_block(Some(Span::new(main, 15, 19))));
        let sig = m.signature("attn_layer").unwrap();

        let mut f = Function::new("decode");
        let g = &mut f.graph;
        let x = g.input(0, "hidden", bf([B, S, n(64)]), None);
        let pos = g.input(1, "positions", Ty::new(DType::I32, [B, S]), None);
        let caches: Vec<_> = (0..4).map(|i| g.input(2 + i, &format!("cache.{i}"), bf([B, C, n(2), n(16)]), None)).collect();
        let mut h = x;
        let mut rets = Vec::new();
        for layer in 0..2u32 {
            let (kc, vc) = (caches[2 * layer as usize], caches[2 * layer as usize + 1]);
            let args = [h.into(), pos.into(), kc.into(), vc.into()];
            let span = Some(Span::new(inc, 2, 3));
            let c = g.call("attn_layer", Some(layer), &sig, &args, span).unwrap();
            h = c;
            rets.push(c.out(1));
            rets.push(c.out(2));
        }
        let mut all = vec![Value::from(h)];
        all.extend(rets);
        g.ret(&all, None);
        m.add_function(f);
        m.set_entry(Mode::Decode, "decode");
        assert_eq!(verify(&m), Ok(()));

        let text = print_module(&m, Some(&sources));
        assert!(text.starts_with("entry decode = decode\n\nfn attn_layer {\n"), "{text}");
        assert!(text.contains("= rms_norm(%0, %4) eps=1e-6 @2:3\n"), "{text}");
        assert!(
            text.contains(
                "  %6:(bf16[b,s,64], bf16[b,c+s,2,16], bf16[b,c+s,2,16]) = call attn_layer(%0, %1, %2, %3) layer=0 @inc.dsc:2:1\n"
            ),
            "{text}"
        );
        assert!(text.contains("= call attn_layer(%6.0, %1, %4, %5) layer=1 @inc.dsc:2:1\n"), "{text}");
        assert!(text.contains("  return %7.0, %6.1, %6.2, %7.1, %7.2\n}\n"), "{text}");
        // Without sources, spans are byte ranges.
        assert!(print_module(&m, None).contains("eps=1e-6 @15..19\n"));
    }

    #[test]
    fn removals_do_not_churn() {
        // The same graph, built once directly and once with dead nodes that a pass then
        // deletes (leaving StableGraph holes that later insertions reuse), prints the same.
        let clean = print_function(&attention_block(None), None);

        let mut f = attention_block(None);
        let g = &mut f.graph;
        let x = g.arguments()[0];
        let dead: Vec<NodeId> =
            (0..3).map(|_| g.add_inferred(Op::Unary(crate::ir::op::UnaryOp::Exp), &[x.into()], None).unwrap()).collect();
        for d in dead {
            g.remove(d);
        }
        assert_eq!(print_function(&f, None), clean);
    }

    #[test]
    fn replacement_reuses_holes_but_prints_in_graph_order() {
        // Replace the residual add by an equal node created later: the new node reuses a
        // freed slot, yet numbering follows the dataflow, so the text is unchanged.
        let mut f = attention_block(None);
        let clean = print_function(&f, None);
        let g = &mut f.graph;
        let add = g.nodes().into_iter().find(|&n| g.node(n).op == Op::Binary(BinaryOp::Add)).unwrap();
        let ins = g.inputs(add);
        let tmp = g.add_inferred(Op::Unary(crate::ir::op::UnaryOp::Neg), &[ins[0]], None).unwrap();
        g.remove(tmp);
        let add2 = g.add_inferred(Op::Binary(BinaryOp::Add), &ins, None).unwrap();
        g.replace_all_uses(add, add2);
        g.remove(add);
        assert_eq!(print_function(&f, None), clean);
    }

    #[test]
    fn multi_output_and_attributes() {
        let mut g = Graph::new();
        let x = g.input(0, "x", Ty::new(DType::F32, [B, S, n(16)]), None);
        let bias = g.param("gate.e_score_correction_bias", Ty::new(DType::F32, [n(16)]), None);
        let routing = Routing {
            top_k: 2,
            scoring: Scoring::Sigmoid,
            selection_bias: true,
            groups: 4,
            groups_kept: 2,
            group_score: Some(GroupScore::Top2Sum),
            normalize: true,
            scale: 2.5.into(),
        };
        let r = g.add_inferred(Op::MoeRoute(routing), &[x.into(), bias.into()], None).unwrap();
        let e = g.add_inferred(Op::Unary(crate::ir::op::UnaryOp::Exp), &[r.out(1)], None).unwrap();
        let yarn = Yarn {
            factor: 40.0.into(),
            original_context: 4096,
            beta_fast: 32.0.into(),
            beta_slow: 1.0.into(),
            mscale: 1.0.into(),
            mscale_all_dim: 1.0.into(),
        };
        let pos = g.input(1, "positions", Ty::new(DType::I32, [B, S]), None);
        let rope = Op::Rope { layout: RopeLayout::Interleaved, theta: Float::new(1e4), rotary_dim: 16, yarn: Some(yarn) };
        let rp = g.add_inferred(rope, &[x.into(), pos.into()], None).unwrap();
        let last = g.add_inferred(Op::Slice { axis: 1, start: S - 1, len: n(1) }, &[rp.into()], None).unwrap();
        let eps = g.constant(1e-6, DType::F32, None);
        g.ret(&[e.into(), last.into(), eps.into()], None);
        let lines = print_graph(&g, None);
        assert_eq!(
            lines[2],
            "%2:(i32[b,s,2], f32[b,s,2]) = moe_route(%0, %1) top_k=2 scoring=sigmoid bias groups=4 kept=2 \
             group_score=top2_sum normalize scale=2.5"
        );
        assert_eq!(lines[3], "%3:f32[b,s,2] = exp(%2.1)");
        assert_eq!(lines[4], r#"%4:i32[b,s] = input 1 "positions""#);
        assert!(
            lines[5].ends_with("rotary_dim=16 yarn=(factor=40 original_context=4096 beta_fast=32 beta_slow=1 mscale=1 mscale_all_dim=1)")
        );
        assert_eq!(lines[6], "%6:f32[b,1,16] = slice(%5) axis=1 start=s-1 len=1");
        assert_eq!(lines[7], "%7:f32[] = const 1e-6");
        assert_eq!(lines[8], "return %3, %6, %7");
    }

    #[test]
    fn cyclic_graph_still_prints() {
        let mut g = Graph::new();
        let x = g.input(0, "x", Ty::new(DType::F32, [B]), None);
        let a = g.add_inferred(Op::Unary(crate::ir::op::UnaryOp::Exp), &[x.into()], None).unwrap();
        g.set_input(a, 0, a.into());
        let lines = print_graph(&g, None);
        assert_eq!(lines[0], "; cycle: printed in insertion order");
        assert_eq!(lines[2], "%1:f32[b] = exp(%1)");
    }
}
