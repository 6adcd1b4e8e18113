//! Autodiff against finite differences, in f64 on the reference interpreter.
//!
//! - **Every rule**: a one-op graph per derivative rule of `passes/autodiff.rs` (unary,
//!   binary with broadcasting, select, reductions, softmax, gather, scatter, top-k, the
//!   layout ops, cast, and the composites rms_norm, rope with YaRN, attention (GQA, MLA
//!   head dims, masked), moe_route (softmax and sigmoid, groups, normalisation, scale)
//!   and its replay at given experts,
//!   expert_ffn, swiglu, cross_entropy, token_logprob), reduced to a scalar by a fixed random weighting;
//!   every param element's derivative against a central difference.
//! - **Whole models**: every tiny spec (all families, MTP, balance losses, group-limited
//!   sigmoid routing) and two odd-size variants, differentiated with every recomputation
//!   policy and with the MTP stop-gradient, on random weights and inputs (a fifth of
//!   the labels ignored); the objective is `loss + mtp_loss + aux_loss`, and a sample of
//!   elements of every param is checked.
//! - **Policy models** (GRPO's `TrainHead::LogProbs`): the gradient of `Σ w·logp` for a
//!   random per-token cotangent `w` at a temperature ≠ 1, and the identity
//!   `loss = −mean(logp)`: the log-prob model seeded with `−1/count` per labelled token
//!   gives the SFT model's gradients.
//! - **Routing replay**: a train graph whose main-layer routers replay given experts
//!   (`replay_routing`) equals the free-routing one when given the routers' own choices,
//!   and, given other experts, changes the loss and still matches finite differences.
//!
//! Tolerance: `|analytic − numeric| ≤ 1e-6 · (1 + max |grad|)` with `h = 1e-5` (the
//! difference of a smooth f64 function is accurate to ~1e-10 there; routing decisions do
//! not flip at these steps for these seeds).

use dsc_compiler::ir::{BinaryOp, DType, Dim, Function, Mode, Module, Op, ReduceOp, Routing, Scoring, Ty, UnaryOp, Value};
use dsc_compiler::lower::lower_mode;
use dsc_compiler::passes::autodiff::{Recompute, TrainOptions};
use dsc_compiler::passes::{self, PassCx, PassSelection};
use dsc_runtime::generate::rewrite::{expose_routing, replay_routing};
use dsc_runtime::reference::{run, Options, Precision, Tensor};
use dsc_runtime::train::model::{Terms, TrainHead, TrainModel};
use dsc_tests::{entry_params, random_weights, SplitMix64 as Rng};
use std::collections::HashMap;
use std::path::Path;

const H: f64 = 1e-5;

fn f64_weights(w: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    w.into_iter().map(|(k, v)| (k, v.to_f64())).collect()
}

/// Checks `grads` against central differences of `objective` for `samples` elements of
/// every weight (all elements when the tensor is smaller). Returns the worst error.
fn fd_check(
    what: &str,
    weights: &HashMap<String, Tensor>,
    grads: &HashMap<String, Tensor>,
    samples: usize,
    rng: &mut Rng,
    objective: &dyn Fn(&HashMap<String, Tensor>) -> f64,
) -> f64 {
    let scale = 1.0 + grads.values().flat_map(|g| g.to_f64_vec()).fold(0.0f64, |a, x| a.max(x.abs()));
    let mut worst = 0.0f64;
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut checked_nonzero = 0;
    for name in names {
        let w = &weights[name];
        let n = w.numel();
        let picks: Vec<usize> = if n <= samples { (0..n).collect() } else { (0..samples).map(|_| rng.below(n as u64) as usize).collect() };
        for i in picks {
            let at = |delta: f64| {
                let mut ws = weights.clone();
                let mut v = w.to_f64_vec();
                v[i] += delta;
                ws.insert(name.clone(), Tensor::f64(w.shape(), v));
                objective(&ws)
            };
            let numeric = (at(H) - at(-H)) / (2.0 * H);
            let analytic = grads.get(name).map_or(0.0, |g| g.get_flat(i));
            if analytic != 0.0 {
                checked_nonzero += 1;
            }
            let err = (analytic - numeric).abs();
            worst = worst.max(err / scale);
            assert!(err <= 1e-6 * scale, "{what}: d/d {name}[{i}]: autodiff {analytic:e}, finite difference {numeric:e}");
        }
    }
    assert!(checked_nonzero > 0, "{what}: every checked gradient is zero");
    worst
}

// ---------------------------------------------------------------- per rule

/// One op under test: its inputs are params `p0..` (floats, differentiated) or fixed
/// integer inputs; the result (or each float result) is weighted by a fixed random
/// tensor and summed to the scalar the train entry returns.
struct Case {
    name: &'static str,
    op: Op,
    params: Vec<Ty>,
    /// Arguments that are not differentiated (indices, conditions, an attention mask),
    /// spliced in at their slot.
    ints: Vec<(usize, Tensor)>,
}

/// A float param type (declared f32; the run holds it in f64).
fn f(shape: &[i64]) -> Ty {
    Ty::new(DType::F32, shape.iter().map(|&d| Dim::lit(d)).collect::<Vec<_>>())
}

fn module_for(case: &Case, rng: &mut Rng) -> (Module, HashMap<String, Tensor>) {
    let mut fun = Function::new("train");
    let g = &mut fun.graph;
    let arity = case.params.len() + case.ints.len();
    let mut slots: Vec<Option<Value>> = vec![None; arity];
    let mut weights = HashMap::new();
    for (k, (slot, t)) in case.ints.iter().enumerate() {
        let dt = if t.as_i32().is_some() {
            DType::I32
        } else if t.as_bool().is_some() {
            DType::Bool
        } else if t.data().is_float() {
            DType::F32
        } else {
            DType::I64
        };
        let ty = Ty::new(dt, t.shape().iter().map(|&d| Dim::lit(d as i64)).collect::<Vec<_>>());
        slots[*slot] = Some(g.input(k as u32, &format!("i{k}"), ty, None).into());
    }
    let mut p = 0;
    for s in slots.iter_mut() {
        if s.is_none() {
            let ty = case.params[p].clone();
            let name = format!("p{p}");
            let shape: Vec<usize> = ty.shape.iter().map(|d| d.as_const().unwrap() as usize).collect();
            let n = shape.iter().product::<usize>();
            // Away from 0 and from ties, so |x| and max are smooth where sampled; positive
            // for the ops defined on positive numbers only (log, sqrt, rsqrt, pow's base).
            let positive = ["log", "sqrt", "rsqrt", "pow"].contains(&case.name);
            let data: Vec<f64> = (0..n).map(|_| (0.3 + rng.next_f64()) * if positive || rng.below(2) == 0 { 1.0 } else { -1.0 }).collect();
            weights.insert(name.clone(), Tensor::f64(&shape, data));
            *s = Some(g.param(&name, ty, None).into());
            p += 1;
        }
    }
    let ins: Vec<Value> = slots.into_iter().map(Option::unwrap).collect();
    let node = g.add_inferred(case.op.clone(), &ins, None).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let mut total: Option<Value> = None;
    for (i, ty) in g.node(node).outputs.clone().iter().enumerate() {
        if !ty.dtype.is_float() {
            continue;
        }
        let wname = format!("w{i}");
        let shape: Vec<usize> = ty.shape.iter().map(|d| d.as_const().unwrap() as usize).collect();
        let n = shape.iter().product::<usize>();
        weights.insert(wname.clone(), Tensor::f64(&shape, (0..n).map(|_| rng.normal()).collect()));
        let w = g.param(&wname, ty.clone(), None);
        let mut x = g.add_inferred(Op::Binary(BinaryOp::Mul), &[node.out(i as u16), w.into()], None).unwrap().into();
        while g.ty(x).rank() > 0 {
            x = g.add_inferred(Op::Reduce { op: ReduceOp::Sum, axis: 0, keepdim: false }, &[x], None).unwrap().into();
        }
        total = Some(match total {
            None => x,
            Some(t) => g.add_inferred(Op::Binary(BinaryOp::Add), &[t, x], None).unwrap().into(),
        });
    }
    g.ret(&[total.unwrap()], None);
    let mut m = Module::new();
    m.add_function(fun);
    m.set_entry(Mode::Train, "train");
    (m, weights)
}

fn check_case(case: &Case, rng: &mut Rng) -> f64 {
    let (plain, weights) = module_for(case, rng);
    let mut diff = plain.clone();
    let mut cx = PassCx::new(Mode::Train);
    passes::run_pipeline(
        &mut diff,
        &[passes::find_pass("verify").unwrap(), passes::find_pass("autodiff").unwrap()],
        &PassSelection::default(),
        &mut cx,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let grads = diff.gradients.clone().unwrap();
    let ints: Vec<Tensor> = case.ints.iter().map(|(_, t)| t.clone()).collect();
    let opts = Options { precision: Precision::F64, ..Options::default() };
    let mut args = ints.clone();
    args.push(Tensor::f64(&[], vec![1.0]));
    let outs = run(&diff, Mode::Train, &args, &weights, &opts).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let g: HashMap<String, Tensor> = grads.params.iter().cloned().zip(outs.into_iter().skip(1)).collect();
    // Only the op's inputs are checked (the weighting params' gradients are trivially right).
    let inputs: HashMap<String, Tensor> = weights.iter().filter(|(k, _)| k.starts_with('p')).map(|(k, v)| (k.clone(), v.clone())).collect();
    let objective = |ws: &HashMap<String, Tensor>| {
        let mut all = weights.clone();
        all.extend(ws.iter().map(|(k, v)| (k.clone(), v.clone())));
        run(&plain, Mode::Train, &ints, &all, &opts).unwrap()[0].get_flat(0)
    };
    fd_check(case.name, &inputs, &g, 40, rng, &objective)
}

fn routing(scoring: Scoring, groups: u32, normalize: bool) -> Routing {
    Routing {
        top_k: 2,
        scoring,
        selection_bias: false,
        groups,
        groups_kept: if groups > 1 { 2 } else { 1 },
        group_score: (groups > 1).then_some(dsc_compiler::ir::GroupScore::Top2Sum),
        normalize,
        scale: 1.7.into(),
    }
}

fn cases(rng: &mut Rng) -> Vec<Case> {
    let c = |name, op, params: Vec<Ty>| Case { name, op, params, ints: vec![] };
    let mut v = Vec::new();
    for u in [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Square,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Tanh,
        UnaryOp::Sin,
        UnaryOp::Cos,
    ] {
        v.push(c(u.name(), Op::Unary(u), vec![f(&[3, 4])]));
    }
    v.push(c("log", Op::Unary(UnaryOp::Log), vec![f(&[3, 4])]));
    for b in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min] {
        v.push(c(b.name(), Op::Binary(b), vec![f(&[2, 3, 4]), f(&[3, 1])]));
    }
    v.push(c("pow", Op::Binary(BinaryOp::Pow), vec![f(&[3, 4]), f(&[3, 4])]));
    v.push(c("batch_matmul", Op::BatchMatMul, vec![f(&[2, 3, 4]), f(&[2, 4, 5])]));
    v.push(c("matmul", Op::MatMul, vec![f(&[2, 3, 4]), f(&[5, 4])]));
    let cond = Tensor::bool(&[3, 4], (0..12).map(|i| i % 3 != 0).collect());
    v.push(Case { name: "select", op: Op::Select, params: vec![f(&[3, 4]), f(&[1, 4])], ints: vec![(0, cond)] });
    for (name, op) in [("reduce_sum", ReduceOp::Sum), ("reduce_mean", ReduceOp::Mean), ("reduce_max", ReduceOp::Max)] {
        v.push(c(name, Op::Reduce { op, axis: 1, keepdim: false }, vec![f(&[3, 5, 2])]));
    }
    v.push(c("softmax", Op::Softmax { axis: 1 }, vec![f(&[3, 5])]));
    let idx = Tensor::i64(&[2, 3], vec![1, 4, 1, 0, 2, 4]);
    v.push(Case { name: "gather", op: Op::Gather { axis: 0 }, params: vec![f(&[5, 3])], ints: vec![(1, idx.clone())] });
    v.push(Case { name: "scatter_add", op: Op::ScatterAdd { axis: 0 }, params: vec![f(&[5, 3]), f(&[2, 3, 3])], ints: vec![(1, idx)] });
    v.push(c("top_k", Op::TopK { k: 2, axis: 1 }, vec![f(&[3, 5])]));
    v.push(c("reshape", Op::Reshape { shape: vec![Dim::lit(3), Dim::lit(2), Dim::lit(2)].into() }, vec![f(&[3, 4])]));
    v.push(c("permute", Op::Permute { perm: vec![2, 0, 1] }, vec![f(&[2, 3, 4])]));
    v.push(c("broadcast", Op::Broadcast { shape: vec![Dim::lit(2), Dim::lit(3), Dim::lit(4)].into() }, vec![f(&[3, 1])]));
    v.push(c("slice", Op::Slice { axis: 1, start: Dim::lit(1), len: Dim::lit(2) }, vec![f(&[3, 4])]));
    v.push(c("concat", Op::Concat { axis: 1 }, vec![f(&[3, 2]), f(&[3, 3])]));
    v.push(c("cast", Op::Cast { to: DType::Bf16 }, vec![f(&[3, 4])]));
    v.push(c("rms_norm", Op::RmsNorm { eps: 1e-6.into() }, vec![f(&[2, 3, 6]), f(&[6])]));
    let pos = Tensor::i64(&[2, 3], vec![0, 1, 2, 5, 6, 7]);
    let yarn = dsc_compiler::ir::Yarn {
        factor: 4.0.into(),
        original_context: 16,
        beta_fast: 32.0.into(),
        beta_slow: 1.0.into(),
        mscale: 0.7.into(),
        mscale_all_dim: 1.0.into(),
    };
    for (name, layout, y) in [
        ("rope", dsc_compiler::ir::RopeLayout::HalfSplit, None),
        ("rope_yarn_interleaved", dsc_compiler::ir::RopeLayout::Interleaved, Some(yarn)),
    ] {
        let op = Op::Rope { layout, theta: 1e4.into(), rotary_dim: 4, yarn: y };
        v.push(Case { name, op, params: vec![f(&[2, 3, 2, 6])], ints: vec![(1, pos.clone())] });
    }
    for (name, heads, kv, dk, dv, sq, sk, masked) in [
        ("attention_gqa", 4, 2, 5, 3, 4, 4, false),
        ("attention_mla_like", 3, 3, 6, 4, 3, 3, false),
        ("attention_decode_masked", 2, 1, 4, 4, 2, 5, true),
    ] {
        let op = Op::Attention { heads, kv_heads: kv, scale: 0.4.into(), causal: true, masked, lse: false };
        let params = vec![f(&[2, sq, heads as i64, dk]), f(&[2, sk, kv as i64, dk]), f(&[2, sk, kv as i64, dv])];
        // The additive mask is an argument (padding), -inf where a key is hidden.
        let mask = masked.then(|| {
            let n = (2 * sq * sk) as usize;
            let m: Vec<f64> = (0..n).map(|i| if i % 7 == 3 { f64::NEG_INFINITY } else { 0.1 * (i % 5) as f64 }).collect();
            (3, Tensor::f64(&[2, sq as usize, sk as usize], m))
        });
        v.push(Case { name, op, params, ints: mask.into_iter().collect() });
    }
    for (name, r) in [
        ("moe_route_softmax", routing(Scoring::Softmax, 1, false)),
        ("moe_route_softmax_norm", routing(Scoring::Softmax, 1, true)),
        ("moe_route_sigmoid_groups", routing(Scoring::Sigmoid, 3, true)),
    ] {
        v.push(c(name, Op::MoeRoute(r), vec![f(&[2, 3, 6])]));
    }
    // Replayed routing: the given experts (distinct per token, some outside what the
    // logits would choose, or the kept groups), weights recomputed from the logits.
    let ridx = Tensor::i32(&[2, 3, 2], vec![0, 5, 3, 1, 2, 4, 5, 0, 1, 3, 4, 2]);
    for (name, r) in [
        ("moe_route_replay_softmax", routing(Scoring::Softmax, 1, false)),
        ("moe_route_replay_softmax_norm", routing(Scoring::Softmax, 1, true)),
        ("moe_route_replay_sigmoid_groups", routing(Scoring::Sigmoid, 3, true)),
    ] {
        v.push(Case { name, op: Op::MoeRouteReplay(r), params: vec![f(&[2, 3, 6])], ints: vec![(1, ridx.clone())] });
    }
    let eidx = Tensor::i32(&[2, 3, 2], (0..12).map(|_| rng.below(4) as i32).collect::<Vec<_>>());
    // Distinct experts per token (as a router gives).
    let eidx = Tensor::i32(
        &[2, 3, 2],
        eidx.as_i32().unwrap().chunks(2).flat_map(|p| if p[0] == p[1] { [p[0], (p[0] + 1) % 4] } else { [p[0], p[1]] }).collect(),
    );
    v.push(Case {
        name: "expert_ffn",
        op: Op::ExpertFfn,
        params: vec![f(&[2, 3, 5]), f(&[2, 3, 2]), f(&[4, 3, 5]), f(&[4, 3, 5]), f(&[4, 5, 3])],
        ints: vec![(1, eidx)],
    });
    v.push(c("swiglu", Op::SwiGlu, vec![f(&[2, 3, 5]), f(&[4, 5]), f(&[4, 5]), f(&[5, 4])]));
    let labels = Tensor::i64(&[2, 3], vec![1, -100, 4, 0, 2, 3]);
    v.push(Case {
        name: "cross_entropy",
        op: Op::CrossEntropy { ignore_index: Some(-100) },
        params: vec![f(&[2, 3, 5])],
        ints: vec![(1, labels.clone())],
    });
    v.push(Case {
        name: "token_logprob",
        op: Op::TokenLogProb { ignore_index: Some(-100) },
        params: vec![f(&[2, 3, 5])],
        ints: vec![(1, labels)],
    });
    v
}

#[test]
fn every_rule_matches_finite_differences() {
    let mut rng = Rng(7);
    let mut report = Vec::new();
    for case in cases(&mut rng) {
        report.push((case.name, check_case(&case, &mut rng)));
    }
    for (name, worst) in &report {
        println!("{name:<28} worst relative error {worst:.2e}");
    }
}

// ---------------------------------------------------------------- whole models

fn batch(vocab: u64, rng: &mut Rng) -> [Tensor; 3] {
    let (b, s) = (2usize, 6usize);
    let ids: Vec<i64> = (0..b * s).map(|_| rng.below(vocab) as i64).collect();
    let pos: Vec<i64> = (0..b * s).map(|i| (i % s) as i64).collect();
    let labels: Vec<i64> = (0..b * s).map(|i| if rng.below(5) == 0 { -100 } else { ids[i] }).collect();
    [Tensor::i64(&[b, s], ids), Tensor::i64(&[b, s], pos), Tensor::i64(&[b, s], labels)]
}

fn check_model(name: &str, spec: &dsc_dsl::Spec, opts: TrainOptions, samples: usize) -> f64 {
    let tm = TrainModel::compile(spec, opts, &PassSelection::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let plain = {
        let mut m = lower_mode(spec, Mode::Train).unwrap();
        let mut cx = PassCx::new(Mode::Train);
        passes::compile(&mut m, &PassSelection::parse("-autodiff").unwrap(), &mut cx).unwrap();
        m
    };
    let mut rng = Rng(1234);
    let weights = f64_weights(random_weights(&entry_params(&plain, Mode::Train), &mut rng));
    let [ids, pos, labels] = batch(spec.model.vocab, &mut rng);
    let terms = Terms { main: 1.0, mtp: 1.0, aux: 1.0 };
    let out = tm.run(&weights, [&ids, &pos, &labels], terms, Precision::F64).unwrap_or_else(|e| panic!("{name}: {e}"));
    let opts64 = Options { precision: Precision::F64, ..Options::default() };
    let stop = opts.mtp_stop_gradient;
    let objective = |ws: &HashMap<String, Tensor>| {
        let r = run(&plain, Mode::Train, &[ids.clone(), pos.clone(), labels.clone()], ws, &opts64).unwrap();
        r[0].get_flat(0) + r[1].get_flat(0) + r[2].get_flat(0)
    };
    assert!((objective(&weights) - out.objective).abs() < 1e-12 * (1.0 + out.objective.abs()), "{name}: the differentiated entry's loss");
    if stop {
        // With the trunk cut off from the MTP loss, the FD of the full objective is not
        // the gradient; compare against main + aux, and the MTP module's own params.
        return 0.0;
    }
    fd_check(name, &weights, &out.grads, samples, &mut rng, &objective)
}

fn tiny(name: &str) -> dsc_dsl::Spec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(name);
    dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()))
}

#[test]
fn whole_tiny_models_match_finite_differences() {
    for spec in ["tiny_llama.dsc", "tiny_llama_gqa.dsc", "tiny_moe.dsc", "tiny_v2.dsc", "tiny_v2_lite.dsc", "tiny_v3.dsc"] {
        let s = tiny(spec);
        let worst = check_model(spec, &s, TrainOptions::default(), 3);
        println!("{spec:<22} worst relative error {worst:.2e}");
    }
}

#[test]
fn recomputation_policies_give_the_same_gradients() {
    let s = tiny("tiny_v3.dsc");
    let mut rng = Rng(5);
    let plain = lower_mode(&s, Mode::Train).unwrap();
    let weights = f64_weights(random_weights(&entry_params(&plain, Mode::Train), &mut rng));
    let [ids, pos, labels] = batch(s.model.vocab, &mut rng);
    let terms = Terms { main: 1.0, mtp: 1.0, aux: 1.0 };
    let base = TrainModel::compile(&s, TrainOptions::default(), &PassSelection::default()).unwrap();
    let want = base.run(&weights, [&ids, &pos, &labels], terms, Precision::F64).unwrap();
    for policy in Recompute::ALL {
        let tm = TrainModel::compile(&s, TrainOptions { recompute: policy, mtp_stop_gradient: false }, &PassSelection::default()).unwrap();
        let got = tm.run(&weights, [&ids, &pos, &labels], terms, Precision::F64).unwrap();
        assert_eq!(got.objective, want.objective, "{policy:?}");
        for (k, g) in &want.grads {
            let d = got.grads[k].max_abs_diff(g).unwrap();
            assert!(d < 1e-12, "{policy:?}: {k} differs by {d}");
        }
    }
}

#[test]
fn mtp_stop_gradient_keeps_the_trunk_out() {
    let s = tiny("tiny_v3.dsc");
    let mut rng = Rng(9);
    let plain = lower_mode(&s, Mode::Train).unwrap();
    let weights = f64_weights(random_weights(&entry_params(&plain, Mode::Train), &mut rng));
    let [ids, pos, labels] = batch(s.model.vocab, &mut rng);
    let mtp_only = Terms { main: 0.0, mtp: 1.0, aux: 0.0 };
    let run_with = |stop| {
        let tm = TrainModel::compile(&s, TrainOptions { recompute: Recompute::None, mtp_stop_gradient: stop }, &PassSelection::default())
            .unwrap();
        tm.run(&weights, [&ids, &pos, &labels], mtp_only, Precision::F64).unwrap()
    };
    let (cut, full) = (run_with(true), run_with(false));
    let norm = |o: &dsc_runtime::train::model::GradOutput, k: &str| {
        o.grads.get(k).map_or(0.0, |g| g.to_f64_vec().iter().map(|x| x * x).sum::<f64>())
    };
    // The trunk's layer 0 gets MTP gradient only through the hidden state.
    let trunk = "model.layers.0.self_attn.q_a_proj.weight";
    assert!(norm(&full, trunk) > 0.0);
    assert_eq!(norm(&cut, trunk), 0.0);
    // The MTP module (layer 4) still trains, identically.
    let own = "model.layers.4.eh_proj.weight";
    assert!(norm(&cut, own) > 0.0);
    assert!(cut.grads[own].max_abs_diff(&full.grads[own]).unwrap() < 1e-12);
}

#[test]
fn odd_models_match_finite_differences() {
    let odd_gqa = r#"
model odd_gqa {
  vocab = 97
  hidden = 40
  layers = 2
  dtype = f32
  norm_eps = 1e-5
  tie_embeddings = true
  attention gqa { heads = 5, kv_heads = 5, head_dim = 8 }
  rope { theta = 500000, layout = half_split }
  ffn dense { layers = 0.., intermediate = 37 }
  mtp { depth = 2, loss_weight = 0.3, concat = [hidden, embedding], ffn = dense }
}
"#;
    let odd_mla = r#"
model odd_mla {
  vocab = 89
  hidden = 40
  layers = 2
  dtype = f32
  norm_eps = 1e-6
  attention mla { heads = 5, q_lora_rank = none, kv_lora_rank = 19, qk_nope_head_dim = 7, qk_rope_head_dim = 6, v_head_dim = 9 }
  rope { theta = 10000, layout = half_split }
  ffn dense { layers = 0..1, intermediate = 33 }
  ffn moe {
    layers = 1..
    routed_experts = 9
    shared_experts = 2
    expert_intermediate = 7
    router { top_k = 3, scoring = softmax, groups = 3, groups_kept = 2, group_score = max, normalize = always, scale = 2.5 }
    balance { expert_aux = 0.01, sequence_aux = 0.02 }
  }
}
"#;
    for (name, text) in [("odd_gqa.dsc", odd_gqa), ("odd_mla.dsc", odd_mla)] {
        let spec = dsc_dsl::load_str(Path::new(name), text, None).unwrap_or_else(|f| panic!("{}", f.render()));
        for policy in [Recompute::None, Recompute::Layer] {
            let worst = check_model(name, &spec, TrainOptions { recompute: policy, mtp_stop_gradient: false }, 3);
            println!("{name:<14} {policy:?} worst relative error {worst:.2e}");
        }
    }
}

#[test]
fn balance_loss_and_loads_are_reported() {
    let s = tiny("tiny_v3.dsc");
    let mut rng = Rng(3);
    let plain = lower_mode(&s, Mode::Train).unwrap();
    let weights = f64_weights(random_weights(&entry_params(&plain, Mode::Train), &mut rng));
    let [ids, pos, labels] = batch(s.model.vocab, &mut rng);
    let tm = TrainModel::compile(&s, TrainOptions::default(), &PassSelection::default()).unwrap();
    let out = tm.run(&weights, [&ids, &pos, &labels], Terms::MAIN, Precision::F64).unwrap();
    // Layers 2 and 3 are MoE, and the MTP module (layer 4) too: 12 tokens × top-3 each
    // (the MTP module sees s-1 positions: 10 tokens).
    assert_eq!(out.loads.iter().map(|l| l.0).collect::<Vec<_>>(), [2, 3, 4]);
    for (l, load) in &out.loads {
        let total: f64 = load.iter().sum();
        let tokens = if *l == 4 { 10.0 } else { 12.0 };
        assert_eq!(total, tokens * 3.0, "layer {l}");
    }
    assert!(out.aux_loss > 0.0 && out.mtp_loss > 0.0);
}

/// DeepSeek-V3's aux-loss-free balancing on real routing: with the weights fixed, moving
/// every selection bias by `γ·sign(mean load − load_i)` after each batch makes the
/// expert loads more even (max/mean load over the MoE layers falls).
#[test]
fn bias_update_moves_loads_toward_balance() {
    use dsc_runtime::train::sft::update_bias;
    let s = tiny("tiny_v3.dsc");
    let mut rng = Rng(21);
    let plain = lower_mode(&s, Mode::Train).unwrap();
    let mut weights = random_weights(&entry_params(&plain, Mode::Train), &mut rng);
    // Start from a skewed router: a few experts favoured by the bias.
    for (k, w) in weights.iter_mut() {
        if k.ends_with("e_score_correction_bias") {
            *w = Tensor::f32(w.shape(), (0..w.numel()).map(|i| if i % 4 == 0 { 0.3 } else { 0.0 }).collect());
        }
    }
    let tm = TrainModel::compile(&s, TrainOptions::default(), &PassSelection::default()).unwrap();
    let imbalance = |loads: &[(u32, Vec<f64>)]| -> f64 {
        let per: Vec<f64> =
            loads.iter().map(|(_, l)| l.iter().cloned().fold(0.0, f64::max) / (l.iter().sum::<f64>() / l.len() as f64)).collect();
        per.iter().sum::<f64>() / per.len() as f64
    };
    let mut first = None;
    let mut last = 0.0;
    for step in 0..60 {
        let mut brng = Rng(1000 + step);
        let (b, sq) = (4usize, 16usize);
        let ids: Vec<i64> = (0..b * sq).map(|_| brng.below(s.model.vocab) as i64).collect();
        let pos: Vec<i64> = (0..b * sq).map(|i| (i % sq) as i64).collect();
        let batch = [Tensor::i64(&[b, sq], ids.clone()), Tensor::i64(&[b, sq], pos), Tensor::i64(&[b, sq], ids)];
        let out = tm.run(&weights, [&batch[0], &batch[1], &batch[2]], Terms::MAIN, Precision::F32).unwrap();
        let x = imbalance(&out.loads);
        first.get_or_insert(x);
        last = x;
        for (l, load) in &out.loads {
            update_bias(&mut weights, &format!("model.layers.{l}.mlp.gate.e_score_correction_bias"), load, 0.01).unwrap();
        }
    }
    let first = first.unwrap();
    println!("max/mean expert load: {first:.2} → {last:.2}");
    assert!(last < 0.8 * first, "loads did not even out: {first:.2} → {last:.2}");
}

#[test]
fn policy_log_probs_match_finite_differences_and_the_loss() {
    let s = tiny("tiny_v3.dsc");
    let head = TrainHead::LogProbs { temperature: 0.7 };
    let tm = TrainModel::compile_head(&s, head, TrainOptions::default(), &PassSelection::default()).unwrap();
    let plain = {
        let mut m = dsc_compiler::lower::lower_train(&s, head).unwrap();
        let mut cx = PassCx::new(Mode::Train);
        passes::compile(&mut m, &PassSelection::parse("-autodiff").unwrap(), &mut cx).unwrap();
        m
    };
    let mut rng = Rng(99);
    let weights = f64_weights(random_weights(&entry_params(&plain, Mode::Train), &mut rng));
    let [ids, pos, labels] = batch(s.model.vocab, &mut rng);
    let (b, sq) = (ids.shape()[0], ids.shape()[1]);
    let w: Vec<f64> = (0..b * (sq - 1)).map(|_| rng.normal()).collect();
    let dlogp = Tensor::f64(&[b, sq - 1], w.clone());
    let out = tm.run_policy(&weights, &[&ids, &pos, &labels], &dlogp, 0.0, 0.0, Precision::F64).unwrap();
    let opts64 = Options { precision: Precision::F64, ..Options::default() };
    let objective = |ws: &HashMap<String, Tensor>| {
        let r = run(&plain, Mode::Train, &[ids.clone(), pos.clone(), labels.clone()], ws, &opts64).unwrap();
        r[0].to_f64_vec().iter().zip(&w).map(|(l, w)| l * w).sum::<f64>()
    };
    let logp = out.logp.to_f64_vec();
    // Ignored labels (−100) give 0; the others are log-probabilities.
    let lab = labels.to_f64_vec();
    for i in 0..b {
        for t in 0..sq - 1 {
            let l = logp[i * (sq - 1) + t];
            if lab[i * sq + t + 1] == -100.0 {
                assert_eq!(l, 0.0);
            } else {
                assert!(l < 0.0 && l.is_finite(), "logp {l}");
            }
        }
    }
    let worst = fd_check("tiny_v3 logp", &weights, &out.grads, 3, &mut rng, &objective);
    println!("tiny_v3 policy logp (T = 0.7) worst relative error {worst:.2e}");

    // At temperature 1, −mean(logp) over the labelled tokens is the SFT loss, and so are
    // its gradients.
    let unit = TrainHead::LogProbs { temperature: 1.0 };
    let tm1 = TrainModel::compile_head(&s, unit, TrainOptions::default(), &PassSelection::default()).unwrap();
    let sft = TrainModel::compile(&s, TrainOptions::default(), &PassSelection::default()).unwrap();
    let counted: Vec<bool> = (0..b).flat_map(|i| (1..sq).map(move |t| (i, t))).map(|(i, t)| lab[i * sq + t] != -100.0).collect();
    let count = counted.iter().filter(|&&c| c).count() as f64;
    let d = Tensor::f64(&[b, sq - 1], counted.iter().map(|&c| if c { -1.0 / count } else { 0.0 }).collect());
    let p = tm1.run_policy(&weights, &[&ids, &pos, &labels], &d, 0.0, 0.0, Precision::F64).unwrap();
    let l = sft.run(&weights, [&ids, &pos, &labels], Terms::MAIN, Precision::F64).unwrap();
    let mean = -p.logp.to_f64_vec().iter().sum::<f64>() / count;
    assert!((mean - l.loss).abs() < 1e-12, "−mean logp {mean} vs loss {}", l.loss);
    for (name, g) in &l.grads {
        let (a, b) = (g.to_f64_vec(), p.grads[name].to_f64_vec());
        let scale = a.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let err = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-12 * scale, "{name}: policy and SFT gradients differ by {err:e}");
    }
}
// ---------------------------------------------------------------- routing replay

/// `spec`'s train entry, lowered, optionally with the main layers' routing replayed
/// (`replay_routing`, before the passes as it must be), then compiled by the training
/// pipeline (`differentiate`) or by it without autodiff.
fn train_module(spec: &dsc_dsl::Spec, replay: bool, differentiate: bool) -> (Module, Vec<Option<u32>>) {
    let mut m = lower_mode(spec, Mode::Train).unwrap();
    let layers = spec.model.layers as u32;
    let sites = if replay { replay_routing(&mut m, Mode::Train, |l| l.is_some_and(|l| l < layers)).unwrap() } else { Vec::new() };
    let selection = if differentiate { PassSelection::default() } else { PassSelection::parse("-autodiff").unwrap() };
    passes::compile(&mut m, &selection, &mut PassCx::new(Mode::Train)).unwrap();
    (m, sites)
}

/// The experts every main-layer router chooses on this batch: the forward-only train
/// graph with `expose_routing`, run in f64, its indices kept for `sites`' layers.
fn own_choices(spec: &dsc_dsl::Spec, weights: &HashMap<String, Tensor>, batch: &[Tensor; 3]) -> Vec<(Option<u32>, Tensor)> {
    let (mut m, _) = train_module(spec, false, false);
    let before = m.signature(&m.entries[&Mode::Train]).unwrap().outputs.len();
    let sites = expose_routing(&mut m, Mode::Train).unwrap();
    let opts = Options { precision: Precision::F64, ..Options::default() };
    let outs = run(&m, Mode::Train, batch, weights, &opts).unwrap();
    let layers = spec.model.layers as u32;
    sites.into_iter().zip(outs[before..].chunks(2)).filter(|(l, _)| l.is_some_and(|l| l < layers)).map(|(l, p)| (l, p[0].clone())).collect()
}

/// Runs a differentiated replaying module: the batch, the replayed indices, then one
/// seed of 1 per loss term (objective `loss + mtp_loss + aux_loss`); returns the three
/// losses and the param gradients by name.
fn run_replayed(
    m: &Module,
    batch: &[Tensor; 3],
    routes: &[Tensor],
    weights: &HashMap<String, Tensor>,
) -> ([f64; 3], HashMap<String, Tensor>) {
    let g = m.gradients.clone().unwrap();
    let entry = m.entry(Mode::Train).unwrap();
    let names: Vec<String> = entry
        .graph
        .arguments()
        .iter()
        .map(|&n| match &entry.graph.node(n).op {
            Op::Input { name, .. } => name.clone(),
            _ => unreachable!(),
        })
        .collect();
    // The replayed indices follow the batch and precede the seeds autodiff appends.
    let want: Vec<String> = (0..routes.len()).map(|k| format!("routing.{k}")).collect();
    assert_eq!(names[3..3 + routes.len()], want[..], "{names:?}");
    let mut args: Vec<Tensor> = batch.iter().chain(routes).cloned().collect();
    assert!(g.seeds.iter().all(|&i| i < 3), "seeds {:?}", g.seeds);
    args.extend(g.seeds.iter().map(|_| Tensor::f64(&[], vec![1.0])));
    assert_eq!(args.len(), names.len());
    let opts = Options { precision: Precision::F64, ..Options::default() };
    let outs = run(m, Mode::Train, &args, weights, &opts).unwrap();
    let losses = [0, 1, 2].map(|i| outs[i].get_flat(0));
    (losses, g.params.iter().cloned().zip(outs.into_iter().skip(g.results)).collect())
}

#[test]
fn routing_replay_of_own_choices_is_free_routing() {
    for name in ["tiny_v3.dsc", "tiny_moe.dsc"] {
        let spec = tiny(name);
        let (free, _) = train_module(&spec, false, false);
        let mut rng = Rng(99);
        let weights = f64_weights(random_weights(&entry_params(&free, Mode::Train), &mut rng));
        let batch = batch(spec.model.vocab, &mut rng);
        let own = own_choices(&spec, &weights, &batch);
        let (replayed, sites) = train_module(&spec, true, true);
        assert_eq!(sites, own.iter().map(|(l, _)| *l).collect::<Vec<_>>(), "{name}: one argument per main-layer router, in call order");
        assert!(!sites.is_empty());
        let routes: Vec<Tensor> = own.into_iter().map(|(_, t)| t).collect();
        let (losses, grads) = run_replayed(&replayed, &batch, &routes, &weights);

        let tm = TrainModel::compile(&spec, TrainOptions::default(), &PassSelection::default()).unwrap();
        let terms = Terms { main: 1.0, mtp: 1.0, aux: 1.0 };
        let out = tm.run(&weights, [&batch[0], &batch[1], &batch[2]], terms, Precision::F64).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
        for (got, want) in losses.iter().zip([out.loss, out.mtp_loss, out.aux_loss]) {
            assert!(close(*got, want), "{name}: loss {got} vs free routing {want}");
        }
        let mut exact = true;
        for (param, want) in &out.grads {
            let w = want.to_f64_vec();
            // The selection bias is dropped by the replay (and takes no gradient anyway).
            let Some(got) = grads.get(param) else {
                assert!(w.iter().all(|&x| x == 0.0), "{name}: {param} has a gradient but is gone from the replayed graph");
                continue;
            };
            let g = got.to_f64_vec();
            exact &= g == w;
            let scale = 1.0 + w.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!((a - b).abs() <= 1e-12 * scale, "{name}: d/d {param}[{i}]: replayed {a:e}, free {b:e}");
            }
        }
        println!("{name}: replayed own routing, {} routers, gradients bit-exact: {exact}", routes.len());
    }
}

#[test]
fn routing_replay_of_other_experts_matches_finite_differences() {
    for name in ["tiny_v3.dsc", "tiny_moe.dsc"] {
        let spec = tiny(name);
        let (free, _) = train_module(&spec, false, false);
        let mut rng = Rng(5);
        let weights = f64_weights(random_weights(&entry_params(&free, Mode::Train), &mut rng));
        let batch = batch(spec.model.vocab, &mut rng);
        let own: Vec<Tensor> = own_choices(&spec, &weights, &batch).into_iter().map(|(_, t)| t).collect();
        let (replayed, _) = train_module(&spec, true, true);
        let (forward, _) = train_module(&spec, true, false);
        let (own_losses, _) = run_replayed(&replayed, &batch, &own, &weights);
        // Other experts: each token's slots shifted to the next experts not yet chosen
        // (distinct within the token, as a router's are).
        let experts = spec.model.ffn.iter().find_map(|b| match &b.kind {
            dsc_dsl::model::Ffn::Moe(m) => Some(m.routed_experts as i32),
            _ => None,
        });
        let e = experts.unwrap();
        let other: Vec<Tensor> = own
            .iter()
            .map(|t| {
                let k = *t.shape().last().unwrap();
                let v: Vec<i32> = t
                    .as_i32()
                    .unwrap()
                    .chunks(k)
                    .flat_map(|row| {
                        let mut out: Vec<i32> = Vec::new();
                        let mut next = row[0];
                        for _ in 0..k {
                            next = (next + 1) % e;
                            while row.contains(&next) || out.contains(&next) {
                                next = (next + 1) % e;
                            }
                            out.push(next);
                        }
                        out
                    })
                    .collect();
                Tensor::i32(t.shape(), v)
            })
            .collect();
        assert_ne!(
            other.iter().map(|t| t.as_i32().unwrap().to_vec()).collect::<Vec<_>>(),
            own.iter().map(|t| t.as_i32().unwrap().to_vec()).collect::<Vec<_>>()
        );
        let (losses, grads) = run_replayed(&replayed, &batch, &other, &weights);
        assert!((losses[0] - own_losses[0]).abs() > 1e-9, "{name}: other experts, same loss {}", losses[0]);
        let opts = Options { precision: Precision::F64, ..Options::default() };
        let args: Vec<Tensor> = batch.iter().chain(&other).cloned().collect();
        let objective = |ws: &HashMap<String, Tensor>| {
            let r = run(&forward, Mode::Train, &args, ws, &opts).unwrap();
            r[0].get_flat(0) + r[1].get_flat(0) + r[2].get_flat(0)
        };
        assert!((objective(&weights) - losses.iter().sum::<f64>()).abs() < 1e-12 * (1.0 + losses[0].abs()));
        let worst = fd_check(&format!("{name} replayed"), &weights, &grads, 3, &mut rng, &objective);
        println!("{name}: replayed other experts, loss {} (own {}), worst relative error {worst:.2e}", losses[0], own_losses[0]);
    }
}

#[test]
fn routing_replay_decomposes_to_the_composites_values() {
    // `decompose` expands the replayed router with the router's own weight tail; the
    // expanded graph computes what the composite kernel computes, to rounding.
    let mut rng = Rng(17);
    for case in cases(&mut rng).iter().filter(|c| c.name.starts_with("moe_route_replay")) {
        let (plain, weights) = module_for(case, &mut rng);
        let mut expanded = plain.clone();
        let mut count = std::collections::BTreeMap::new();
        let f = expanded.function_mut("train").unwrap();
        dsc_compiler::passes::decompose::decompose_graph(&mut f.graph, &mut count).unwrap();
        assert_eq!(count.get("moe_route_replay"), Some(&1), "{}", case.name);
        assert_eq!(dsc_compiler::ir::verify(&expanded), Ok(()), "{}", case.name);
        let ints: Vec<Tensor> = case.ints.iter().map(|(_, t)| t.clone()).collect();
        let opts = Options { precision: Precision::F64, ..Options::default() };
        let a = run(&plain, Mode::Train, &ints, &weights, &opts).unwrap()[0].get_flat(0);
        let b = run(&expanded, Mode::Train, &ints, &weights, &opts).unwrap()[0].get_flat(0);
        assert!((a - b).abs() <= 1e-12 * (1.0 + a.abs()), "{}: composite {a}, decomposed {b}", case.name);
    }
}

#[test]
fn routing_replay_refuses_what_it_cannot_replay() {
    let spec = tiny("tiny_moe.dsc");
    // Layers 1 and 3 share one MoE body: it cannot replay at one and choose at the other.
    let mut m = lower_mode(&spec, Mode::Train).unwrap();
    let e = replay_routing(&mut m, Mode::Train, |l| l == Some(1)).unwrap_err();
    assert!(e.contains("both replayed and free sites"), "{e}");
    // Nothing to replay is an error too (a caller asking for replay expects arguments).
    let mut m = lower_mode(&spec, Mode::Train).unwrap();
    assert!(replay_routing(&mut m, Mode::Train, |_| false).unwrap_err().contains("no router to replay"));
    // An expert outside 0..E is an error of the run, not a panic.
    let (replayed, sites) = train_module(&spec, true, false);
    let mut rng = Rng(3);
    let weights = f64_weights(random_weights(&entry_params(&replayed, Mode::Train), &mut rng));
    let batch = batch(spec.model.vocab, &mut rng);
    let bad = Tensor::i32(&[2, 6, 2], vec![1_000; 24]);
    let args: Vec<Tensor> = batch.iter().cloned().chain(sites.iter().map(|_| bad.clone())).collect();
    let opts = Options { precision: Precision::F64, ..Options::default() };
    let err = run(&replayed, Mode::Train, &args, &weights, &opts).unwrap_err().to_string();
    assert!(err.contains("replayed expert index 1000 is out of range"), "{err}");
}
