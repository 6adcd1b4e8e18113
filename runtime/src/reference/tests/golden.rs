//! The interpreter against Hugging Face transformers, on the tiny models in `golden/hf`
//! (see its README): each model is written here by hand as IR, exactly as the layers
//! of `LlamaForCausalLM` / `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM` compute,
//! and must reproduce the reference logits (full forward and greedy decoding through the
//! KV cache) within the fixtures' tolerance of `1e-4 + 1e-4·|ref|`, and the routers'
//! expert choices and gate weights.
//!
//! These graphs are the interpreter's test, not the compiler's lowering: they use the
//! non-absorbed MLA that HF runs and cache the expanded keys and values.

use super::*;
use crate::reference::load_safetensors;
use dsc_compiler::ir::{GroupScore, RopeLayout, Routing, Scoring, Yarn};
use serde_json::Value as Json;
use std::path::PathBuf;

fn dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(case)
}

fn load(case: &str, file: &str) -> HashMap<String, Tensor> {
    let path = dir(case).join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    load_safetensors(&bytes).unwrap()
}

fn json(case: &str, file: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(dir(case).join(file)).unwrap()).unwrap()
}

/// HF checkpoint names as IR param paths: layer params are found through
/// [`param_path`]; per-expert matrices are stacked along a leading expert axis under
/// `param_path(L, "mlp.experts.gate_proj.weight")` (`[E, i, h]`); top-level names stay.
fn ir_weights(case: &str) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let mut experts: HashMap<String, Vec<(usize, Tensor)>> = HashMap::new();
    for (k, v) in load(case, "model.safetensors") {
        let parts: Vec<&str> = k.split('.').collect();
        if let ["model", "layers", l, rest @ ..] = &parts[..] {
            let l: u32 = l.parse().unwrap();
            if let ["mlp", "experts", e, proj, "weight"] = rest {
                let stacked = param_path(Some(l), &format!("mlp.experts.{proj}.weight"));
                experts.entry(stacked).or_default().push((e.parse().unwrap(), v));
            } else {
                out.insert(param_path(Some(l), &rest.join(".")), v);
            }
        } else {
            out.insert(k, v);
        }
    }
    for (name, mut list) in experts {
        list.sort_by_key(|(e, _)| *e);
        let mut shape = vec![list.len()];
        shape.extend_from_slice(list[0].1.shape());
        let data: Vec<f32> = list.iter().flat_map(|(_, t)| t.to_f32_vec()).collect();
        out.insert(name, Tensor::f32(&shape, data));
    }
    out
}

/// A param whose type is read off the weight it will be bound to (`probe` is the full
/// path of one instance; the graph names it relative to its function).
fn param(g: &mut Graph, w: &HashMap<String, Tensor>, probe: &str, name: &str) -> NodeId {
    let t = w.get(probe).unwrap_or_else(|| panic!("no weight {probe}"));
    let dims: Vec<Dim> = t.shape().iter().map(|&d| n(d as i64)).collect();
    g.param(name, f32t(&dims), None)
}

fn reshape(g: &mut Graph, x: NodeId, dims: &[Dim]) -> NodeId {
    op(g, Op::Reshape { shape: Shape::from(dims.to_vec()) }, &[x])
}

fn slice(g: &mut Graph, x: NodeId, axis: u8, start: i64, len: i64) -> NodeId {
    op(g, Op::Slice { axis, start: n(start), len: n(len) }, &[x])
}

/// What differs between the architectures.
enum Arch {
    Llama { head_dim: i64 },
    Deepseek { q_lora: bool, kv_lora: i64, nope: i64, rope: i64, v: i64, yarn: Option<Yarn>, first_dense: u32, routing: Routing },
}

struct Model {
    hidden: i64,
    layers: u32,
    heads: i64,
    kv_heads: i64,
    eps: f64,
    theta: f64,
    arch: Arch,
}

impl Model {
    fn from_config(case: &str) -> Model {
        let c = json(case, "config.json");
        let int = |k: &str| c[k].as_i64().unwrap_or_else(|| panic!("config {k}"));
        let rp = &c["rope_parameters"];
        let arch = if c["model_type"] == "llama" {
            Arch::Llama { head_dim: int("head_dim") }
        } else {
            let yarn = (rp["rope_type"] == "yarn").then(|| Yarn {
                factor: Float::new(rp["factor"].as_f64().unwrap()),
                original_context: rp["original_max_position_embeddings"].as_u64().unwrap(),
                beta_fast: Float::new(rp["beta_fast"].as_f64().unwrap()),
                beta_slow: Float::new(rp["beta_slow"].as_f64().unwrap()),
                mscale: Float::new(rp["mscale"].as_f64().unwrap()),
                mscale_all_dim: Float::new(rp["mscale_all_dim"].as_f64().unwrap()),
            });
            let method = c["topk_method"].as_str().unwrap();
            let groups = c["n_group"].as_u64().unwrap_or(1) as u32;
            let routing = Routing {
                top_k: int("num_experts_per_tok") as u32,
                scoring: if c["scoring_func"] == "sigmoid" { Scoring::Sigmoid } else { Scoring::Softmax },
                selection_bias: method == "noaux_tc",
                groups: if method == "greedy" { 1 } else { groups },
                groups_kept: if method == "greedy" { 1 } else { c["topk_group"].as_u64().unwrap() as u32 },
                group_score: match method {
                    "noaux_tc" => Some(GroupScore::Top2Sum),
                    "group_limited_greedy" => Some(GroupScore::Max),
                    _ => None,
                },
                // HF's V2 ignores norm_topk_prob; V3 honours it (see golden/hf/README.md).
                normalize: method == "noaux_tc" && c["norm_topk_prob"].as_bool().unwrap(),
                scale: Float::new(c["routed_scaling_factor"].as_f64().unwrap()),
            };
            Arch::Deepseek {
                q_lora: !c["q_lora_rank"].is_null(),
                kv_lora: int("kv_lora_rank"),
                nope: int("qk_nope_head_dim"),
                rope: int("qk_rope_head_dim"),
                v: int("v_head_dim"),
                yarn,
                first_dense: int("first_k_dense_replace") as u32,
                routing,
            }
        };
        Model {
            hidden: int("hidden_size"),
            layers: int("num_hidden_layers") as u32,
            heads: int("num_attention_heads"),
            kv_heads: int("num_key_value_heads"),
            eps: c["rms_norm_eps"].as_f64().unwrap(),
            theta: rp["rope_theta"].as_f64().unwrap(),
            arch,
        }
    }

    /// (kv heads, key dim, value dim) of the cache.
    fn cache_dims(&self) -> (i64, i64, i64) {
        match self.arch {
            Arch::Llama { head_dim } => (self.kv_heads, head_dim, head_dim),
            Arch::Deepseek { nope, rope, v, .. } => (self.heads, nope + rope, v),
        }
    }

    fn is_moe(&self, layer: u32) -> bool {
        matches!(self.arch, Arch::Deepseek { first_dense, .. } if layer >= first_dense)
    }

    fn rms(&self, g: &mut Graph, x: NodeId, gain: NodeId) -> NodeId {
        op(g, Op::RmsNorm { eps: Float::new(self.eps) }, &[x, gain])
    }

    /// `layer(x, positions, k_cache, v_cache) -> (x', k_cache', v_cache')`, with the
    /// weight shapes of layer `probe`.
    fn layer(&self, name: &str, probe: u32, w: &HashMap<String, Tensor>) -> Function {
        let mut f = Function::new(name);
        let g = &mut f.graph;
        let (h, heads) = (n(self.hidden), self.heads);
        let (kvh, dk, dv) = self.cache_dims();
        let x = g.input(0, "x", f32t(&[B, S, h]), None);
        let pos = g.input(1, "positions", i32t(&[B, S]), None);
        let kc = g.input(2, "k_cache", f32t(&[B, C, n(kvh), n(dk)]), None);
        let vc = g.input(3, "v_cache", f32t(&[B, C, n(kvh), n(dv)]), None);
        let p = |g: &mut Graph, rel: &str| param(g, w, &param_path(Some(probe), rel), rel);
        let ln1 = p(g, "input_layernorm.weight");
        let x1 = self.rms(g, x, ln1);
        let (q, k, v, scale) = match &self.arch {
            Arch::Llama { head_dim } => {
                let hd = *head_dim;
                let proj = |g: &mut Graph, wn: NodeId, hs: i64| {
                    let y = op(g, Op::MatMul, &[x1, wn]);
                    reshape(g, y, &[B, S, n(hs), n(hd)])
                };
                let (wq, wk, wv) = (p(g, "self_attn.q_proj.weight"), p(g, "self_attn.k_proj.weight"), p(g, "self_attn.v_proj.weight"));
                let (q, k, v) = (proj(g, wq, heads), proj(g, wk, kvh), proj(g, wv, kvh));
                let rope = Op::Rope { layout: RopeLayout::HalfSplit, theta: Float::new(self.theta), rotary_dim: hd as u32, yarn: None };
                let q = op(g, rope.clone(), &[q, pos]);
                let k = op(g, rope, &[k, pos]);
                (q, k, v, 1.0 / (hd as f64).sqrt())
            }
            Arch::Deepseek { q_lora, kv_lora, nope, rope, v: vd, yarn, .. } => {
                let (nope, rd, vd) = (*nope, *rope, *vd);
                let q = if *q_lora {
                    let (qa, qn, qb) =
                        (p(g, "self_attn.q_a_proj.weight"), p(g, "self_attn.q_a_layernorm.weight"), p(g, "self_attn.q_b_proj.weight"));
                    let a = op(g, Op::MatMul, &[x1, qa]);
                    let a = self.rms(g, a, qn);
                    op(g, Op::MatMul, &[a, qb])
                } else {
                    let wq = p(g, "self_attn.q_proj.weight");
                    op(g, Op::MatMul, &[x1, wq])
                };
                let q = reshape(g, q, &[B, S, n(heads), n(nope + rd)]);
                let q_nope = slice(g, q, 3, 0, nope);
                let q_pe = slice(g, q, 3, nope, rd);
                let wkv_a = p(g, "self_attn.kv_a_proj_with_mqa.weight");
                let ckv = op(g, Op::MatMul, &[x1, wkv_a]);
                let latent = slice(g, ckv, 2, 0, *kv_lora);
                let k_pe = slice(g, ckv, 2, *kv_lora, rd);
                let k_pe = reshape(g, k_pe, &[B, S, n(1), n(rd)]);
                let kv_norm = p(g, "self_attn.kv_a_layernorm.weight");
                let latent = self.rms(g, latent, kv_norm);
                let wkv_b = p(g, "self_attn.kv_b_proj.weight");
                let kv = op(g, Op::MatMul, &[latent, wkv_b]);
                let kv = reshape(g, kv, &[B, S, n(heads), n(nope + vd)]);
                let k_nope = slice(g, kv, 3, 0, nope);
                let v = slice(g, kv, 3, nope, vd);
                let rope = Op::Rope { layout: RopeLayout::Interleaved, theta: Float::new(self.theta), rotary_dim: rd as u32, yarn: *yarn };
                let q_pe = op(g, rope.clone(), &[q_pe, pos]);
                let k_pe = op(g, rope, &[k_pe, pos]);
                let q = op(g, Op::Concat { axis: 3 }, &[q_nope, q_pe]);
                // The shared rope key, once per head.
                let k_pe = op(g, Op::Concat { axis: 2 }, &vec![k_pe; heads as usize]);
                let k = op(g, Op::Concat { axis: 3 }, &[k_nope, k_pe]);
                let mut scale = 1.0 / ((nope + rd) as f64).sqrt();
                if let Some(y) = yarn {
                    let m = crate::reference::nn::yarn_mscale(y.factor.get(), y.mscale_all_dim.get());
                    scale *= m * m;
                }
                (q, k, v, scale)
            }
        };
        let k = op(g, Op::CacheAppend { axis: 1 }, &[kc, k]);
        let v = op(g, Op::CacheAppend { axis: 1 }, &[vc, v]);
        let att =
            Op::Attention { heads: heads as u32, kv_heads: kvh as u32, scale: Float::new(scale), causal: true, masked: false, lse: false };
        let a = op(g, att, &[q, k, v]);
        let a = reshape(g, a, &[B, S, n(heads * dv)]);
        let wo = p(g, "self_attn.o_proj.weight");
        let o = op(g, Op::MatMul, &[a, wo]);
        let x2 = op(g, Op::Binary(BinaryOp::Add), &[x, o]);
        let ln2 = p(g, "post_attention_layernorm.weight");
        let x3 = self.rms(g, x2, ln2);
        let mlp = if self.is_moe(probe) {
            let Arch::Deepseek { routing, .. } = &self.arch else { unreachable!() };
            let wg = p(g, "mlp.gate.weight");
            let logits = op(g, Op::MatMul, &[x3, wg]);
            let route = if routing.selection_bias {
                let bias = p(g, "mlp.gate.e_score_correction_bias");
                g.add_inferred(Op::MoeRoute(*routing), &[logits.into(), bias.into()], None).unwrap()
            } else {
                op(g, Op::MoeRoute(*routing), &[logits])
            };
            let (eg, eu, ed) =
                (p(g, "mlp.experts.gate_proj.weight"), p(g, "mlp.experts.up_proj.weight"), p(g, "mlp.experts.down_proj.weight"));
            let ins: Vec<Value> = vec![x3.into(), route.out(0), route.out(1), eg.into(), eu.into(), ed.into()];
            let routed = g.add_inferred(Op::ExpertFfn, &ins, None).unwrap();
            let (sg, su, sd) = (
                p(g, "mlp.shared_experts.gate_proj.weight"),
                p(g, "mlp.shared_experts.up_proj.weight"),
                p(g, "mlp.shared_experts.down_proj.weight"),
            );
            let shared = op(g, Op::SwiGlu, &[x3, sg, su, sd]);
            op(g, Op::Binary(BinaryOp::Add), &[routed, shared])
        } else {
            let (mg, mu, md) = (p(g, "mlp.gate_proj.weight"), p(g, "mlp.up_proj.weight"), p(g, "mlp.down_proj.weight"));
            op(g, Op::SwiGlu, &[x3, mg, mu, md])
        };
        let y = op(g, Op::Binary(BinaryOp::Add), &[x2, mlp]);
        g.ret(&[y.into(), k.into(), v.into()], None);
        f
    }

    /// `step(ids, positions, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...)`, the entry
    /// for both prefill (empty caches) and decode.
    fn module(&self, w: &HashMap<String, Tensor>) -> Module {
        let mut m = Module::new();
        let kinds: Vec<(String, u32)> = {
            let mut v: Vec<(String, u32)> = Vec::new();
            for l in 0..self.layers {
                let name = if self.is_moe(l) { "layer_moe" } else { "layer_dense" };
                if !v.iter().any(|(n, _)| n == name) {
                    v.push((name.to_string(), l));
                }
            }
            v
        };
        for (name, probe) in &kinds {
            m.add_function(self.layer(name, *probe, w));
        }
        let (kvh, dk, dv) = self.cache_dims();
        let mut f = Function::new("step");
        let g = &mut f.graph;
        let ids = g.input(0, "ids", i32t(&[B, S]), None);
        let pos = g.input(1, "positions", i32t(&[B, S]), None);
        let emb = param(g, w, "model.embed_tokens.weight", "model.embed_tokens.weight");
        let mut x: Value = op(g, Op::Gather { axis: 0 }, &[emb, ids]).into();
        let mut caches = Vec::new();
        for l in 0..self.layers {
            let kc = g.input(2 + 2 * l, &format!("k_cache.{l}"), f32t(&[B, C, n(kvh), n(dk)]), None);
            let vc = g.input(3 + 2 * l, &format!("v_cache.{l}"), f32t(&[B, C, n(kvh), n(dv)]), None);
            let name = if self.is_moe(l) { "layer_moe" } else { "layer_dense" };
            let sig = m.signature(name).unwrap();
            let c = g.call(name, Some(l), &sig, &[x, pos.into(), kc.into(), vc.into()], None).unwrap();
            x = c.out(0);
            caches.extend([c.out(1), c.out(2)]);
        }
        let norm = param(g, w, "model.norm.weight", "model.norm.weight");
        let xn = g.add_inferred(Op::RmsNorm { eps: Float::new(self.eps) }, &[x, norm.into()], None).unwrap();
        let head = param(g, w, "lm_head.weight", "lm_head.weight");
        let logits = op(g, Op::MatMul, &[xn, head]);
        let mut rets = vec![logits.into()];
        rets.extend(caches);
        g.ret(&rets, None);
        m.add_function(f);
        m.set_entry(Mode::Prefill, "step");
        m.set_entry(Mode::Decode, "step");
        m
    }

    fn empty_caches(&self, batch: usize) -> Vec<Tensor> {
        let (kvh, dk, dv) = self.cache_dims();
        (0..self.layers)
            .flat_map(|_| [Tensor::zeros(&[batch, 0, kvh as usize, dk as usize]), Tensor::zeros(&[batch, 0, kvh as usize, dv as usize])])
            .collect()
    }
}

fn ids(case: &str) -> Vec<Vec<i32>> {
    json(case, "input_ids.json")["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect())
        .collect()
}

/// `|got - want| <= 1e-4 + 1e-4·|want|`, with the worst difference in the message.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    let got = got.to_f32();
    let diff = got.max_abs_diff(want);
    assert!(got.allclose(want, 1e-4, 1e-4), "{what}: max |diff| {diff:?}");
    // Seen with --nocapture: how much margin the tolerance leaves.
    eprintln!("{what}: max |diff| {:.2e}", diff.unwrap_or(f64::NAN));
}

fn argmax(row: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as i32
}

/// Full forward of both prompts, in f32 and f64; then greedy decoding of the first
/// prompt through the KV cache, step by step.
fn check_model(case: &str) {
    let model = Model::from_config(case);
    let w = ir_weights(case);
    let m = model.module(&w);
    let prompts = ids(case);
    let (b, s) = (prompts.len(), prompts[0].len());
    let flat: Vec<i32> = prompts.concat();
    let positions: Vec<i32> = (0..b).flat_map(|_| 0..s as i32).collect();
    let mut args = vec![Tensor::i32(&[b, s], flat), Tensor::i32(&[b, s], positions)];
    args.extend(model.empty_caches(b));
    let reference = load(case, "logits.safetensors");
    for opts in [Options::default(), f64_opts()] {
        let out = run(&m, Mode::Prefill, &args, &w, &opts).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_close(&out[0], &reference["logits"], &format!("{case} logits ({:?})", opts.precision));
    }

    // Greedy decoding of prompt 0: step 0 from the prompt, then one token at a time.
    let steps = &reference["generate_step_logits"];
    let vocab = steps.shape()[1];
    let want_tokens: Vec<i32> =
        json(case, "generated.json")["generated"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect();
    let mut args = vec![Tensor::i32(&[1, s], prompts[0].clone()), Tensor::i32(&[1, s], (0..s as i32).collect())];
    args.extend(model.empty_caches(1));
    let mut out = run(&m, Mode::Prefill, &args, &w, &Options::default()).unwrap();
    let mut tokens = Vec::new();
    for step in 0..steps.shape()[0] {
        let logits = out[0].to_f32_vec();
        let last = Tensor::f32(&[vocab], logits[logits.len() - vocab..].to_vec());
        let want = Tensor::f32(&[vocab], steps.to_f32_vec()[step * vocab..(step + 1) * vocab].to_vec());
        assert_close(&last, &want, &format!("{case} decode step {step}"));
        let t = argmax(&last.to_f32_vec());
        tokens.push(t);
        let mut args = vec![Tensor::i32(&[1, 1], vec![t]), Tensor::i32(&[1, 1], vec![(s + step) as i32])];
        args.extend(out.drain(1..));
        out = run(&m, Mode::Decode, &args, &w, &Options::default()).unwrap();
    }
    assert_eq!(tokens, want_tokens, "{case}: greedy tokens");
}

#[test]
fn llama_dense_matches_transformers() {
    check_model("llama_dense");
}

#[test]
fn llama_gqa_matches_transformers() {
    check_model("llama_gqa");
}

#[test]
fn deepseek_v2_matches_transformers() {
    check_model("deepseek_v2");
}

#[test]
fn deepseek_v2_lite_matches_transformers() {
    check_model("deepseek_v2_lite");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_model("deepseek_v3");
}

/// `moe_route` on the recorded router logits chooses HF's experts (as sets) with HF's
/// final gate weights (to 1e-5), for every MoE layer of the three DeepSeek cases.
#[test]
fn routers_match_transformers() {
    for case in ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3"] {
        let model = Model::from_config(case);
        let Arch::Deepseek { routing, .. } = model.arch else { unreachable!() };
        let inter = load(case, "intermediates.safetensors");
        let w = ir_weights(case);
        let mut checked = 0;
        for l in 0..model.layers {
            let Some(logits) = inter.get(&format!("router_logits.{l}")) else { continue };
            let bias = w.get(&param_path(Some(l), "mlp.gate.e_score_correction_bias"));
            let (idx, wts) = crate::reference::nn::moe_route::<f32>(logits, bias.filter(|_| routing.selection_bias), &routing).unwrap();
            let want_idx = inter[&format!("topk_indices.{l}")].to_i64_vec().unwrap();
            let want_w = inter[&format!("topk_weights.{l}")].to_f32_vec();
            let k = routing.top_k as usize;
            let (got_idx, got_w) = (idx.to_i64_vec().unwrap(), wts.to_f32_vec());
            for t in 0..got_idx.len() / k {
                // HF lists experts by id; ours are by score: compare (id, weight) sets.
                let mut got: Vec<(i64, f32)> = (0..k).map(|j| (got_idx[t * k + j], got_w[t * k + j])).collect();
                let mut want: Vec<(i64, f32)> = (0..k).map(|j| (want_idx[t * k + j], want_w[t * k + j])).collect();
                got.sort_by_key(|p| p.0);
                want.sort_by_key(|p| p.0);
                for (g, r) in got.iter().zip(&want) {
                    assert_eq!(g.0, r.0, "{case} layer {l} token {t}: experts {got:?} vs {want:?}");
                    assert!((g.1 - r.1).abs() <= 1e-5, "{case} layer {l} token {t}: weights {got:?} vs {want:?}");
                }
            }
            checked += 1;
        }
        assert!(checked > 0, "{case} has MoE layers");
    }
}
