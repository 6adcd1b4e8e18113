//! MLA weight absorption (`mla_absorb`) against the decompressed form lowering emits, on
//! the reference interpreter:
//!
//! - structure: after absorption, decode attends over the cached latent with one shared
//!   head; no node builds a per-head key or value over the cache and `kv_b_proj` never
//!   multiplies the cache, while the cache arguments stay `[b,c,kv_lora]` and `[b,c,rope]`;
//! - numbers: random weights (every param of the lowered module, `N(0, 1/fan_in)`),
//!   random prompts, prefill then greedy decode steps, once per form; the logits agree at
//!   every step (f32 and f64) and the greedy tokens are identical;
//! - speed (`#[ignore]`, run with `--release -- --ignored --nocapture`): decode tokens/s
//!   of both forms at several cache lengths, printed, never asserted.

use dsc_compiler::ir::{Mode, Module, Op, Sym, Ty};
use dsc_compiler::lower::lower_mode;
use dsc_compiler::passes::mla_absorb::{mla_sites, MlaMode};
use dsc_compiler::passes::{compile, PassCx, PassSelection};
use dsc_runtime::reference::{run, Options, Precision, Tensor};
use dsc_tests::{entry_params, random_weights, SplitMix64};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

// ---------------------------------------------------------------- specs and modules

fn tiny(name: &str) -> dsc_dsl::Spec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(name);
    dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()))
}

fn from_str(text: &str) -> dsc_dsl::Spec {
    dsc_dsl::load_str(Path::new("inline.dsc"), text, None).unwrap_or_else(|f| panic!("{}", f.render()))
}

/// Odd sizes everywhere: 5 heads, latent 19, nope 11, rope 6, v 7, q latent 13,
/// Llama's half-split RoPE, dense layers only.
const ODD: &str = "model odd {
  vocab = 97
  hidden = 40
  layers = 2
  dtype = f32
  norm_eps = 1e-6
  attention mla {
    heads = 5
    q_lora_rank = 13
    kv_lora_rank = 19
    qk_nope_head_dim = 11
    qk_rope_head_dim = 6
    v_head_dim = 7
    latent_norm_eps = 1e-6
  }
  rope { theta = 10000, layout = half_split }
  ffn dense { layers = 0.., intermediate = 36 }
}";

/// `spec` lowered for `mode` and compiled by the inference pipeline with `mla`.
fn compiled(spec: &dsc_dsl::Spec, mode: Mode, mla: MlaMode) -> Module {
    let mut m = lower_mode(spec, mode).unwrap();
    let mut cx = PassCx::new(mode);
    cx.mla = mla;
    compile(&mut m, &PassSelection::all(), &mut cx).unwrap_or_else(|e| panic!("{e}"));
    m
}

// ---------------------------------------------------------------- random data

fn vocab(m: &Module, mode: Mode) -> usize {
    let logits = &m.entry(mode).unwrap().graph.signature().outputs[0];
    logits.shape.last().unwrap().as_const().unwrap() as usize
}

// ---------------------------------------------------------------- comparing

/// The last position's logits as `f64`, one row per sequence.
fn last_rows(logits: &Tensor) -> Vec<Vec<f64>> {
    let (b, s, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let all = logits.to_f64_vec();
    (0..b).map(|i| all[(i * s + s - 1) * v..(i * s + s) * v].to_vec()).collect()
}

fn argmax(row: &[f64]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
}

/// `max |a - b| / max |b|` over all elements.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn ids(tokens: &[Vec<usize>]) -> Tensor {
    let (b, s) = (tokens.len(), tokens[0].len());
    Tensor::i64(&[b, s], tokens.iter().flatten().map(|&t| t as i64).collect())
}

fn positions(b: usize, from: usize, len: usize) -> Tensor {
    Tensor::i64(&[b, len], (0..b).flat_map(|_| from..from + len).map(|p| p as i64).collect())
}

/// Largest relative logit difference seen (prefill, decode) and the tokens emitted.
struct Outcome {
    prefill: f64,
    decode: f64,
    tokens: Vec<Vec<usize>>,
}

/// Prefill a random prompt (both forms), then `steps` greedy decode steps in each form,
/// each feeding its own argmax back with its own caches. Panics as soon as the logits
/// differ by more than `tol` (relative) or the greedy tokens differ.
fn greedy_both_ways(spec: &dsc_dsl::Spec, precision: Precision, batch: usize, prompt: usize, steps: usize, tol: f64, seed: u64) -> Outcome {
    let prefill = compiled(spec, Mode::Prefill, MlaMode::Decompress);
    let prefill_abs = compiled(spec, Mode::Prefill, MlaMode::Absorb);
    let dec = compiled(spec, Mode::Decode, MlaMode::Decompress);
    let abs = compiled(spec, Mode::Decode, MlaMode::Absorb);
    assert!(dec.functions.iter().any(|f| !mla_sites(&f.graph).is_empty()), "the decompressed decode is not decompressed");
    assert!(abs.functions.iter().all(|f| mla_sites(&f.graph).is_empty()), "the absorbed decode still decompresses");

    let mut p = entry_params(&lower_mode(spec, Mode::Prefill).unwrap(), Mode::Prefill);
    p.extend(entry_params(&lower_mode(spec, Mode::Decode).unwrap(), Mode::Decode));
    let w = random_weights(&p, &mut SplitMix64(seed));
    let opts = Options { precision, ..Options::default() };
    let v = vocab(&dec, Mode::Decode);

    let mut rng = SplitMix64(seed ^ 0x5eed);
    let prompt_ids: Vec<Vec<usize>> = (0..batch).map(|_| (0..prompt).map(|_| rng.below(v as u64) as usize).collect()).collect();
    let inputs = [ids(&prompt_ids), positions(batch, 0, prompt)];
    let out = run(&prefill, Mode::Prefill, &inputs, &w, &opts).unwrap();
    let out_abs = run(&prefill_abs, Mode::Prefill, &inputs, &w, &opts).unwrap();
    let mut worst = Outcome { prefill: rel_diff(&out_abs[0], &out[0]), decode: 0.0, tokens: vec![Vec::new(); batch] };
    assert!(worst.prefill < tol, "prefill logits differ by {:e}", worst.prefill);

    let first: Vec<usize> = last_rows(&out[0]).iter().map(|r| argmax(r)).collect();
    let (mut tok_d, mut tok_a) = (first.clone(), first);
    let (mut cache_d, mut cache_a): (Vec<Tensor>, Vec<Tensor>) = (out[1..].to_vec(), out[1..].to_vec());
    for step in 0..steps {
        let pos = positions(batch, prompt + step, 1);
        let step_in = |tok: &[usize], cache: &[Tensor]| {
            let mut a = vec![ids(&tok.iter().map(|&t| vec![t]).collect::<Vec<_>>()), pos.clone()];
            a.extend(cache.iter().cloned());
            a
        };
        let od = run(&dec, Mode::Decode, &step_in(&tok_d, &cache_d), &w, &opts).unwrap();
        let oa = run(&abs, Mode::Decode, &step_in(&tok_a, &cache_a), &w, &opts).unwrap();
        let d = rel_diff(&oa[0], &od[0]);
        assert!(d < tol, "step {step}: logits differ by {d:e} (tolerance {tol:e})");
        worst.decode = worst.decode.max(d);
        tok_d = last_rows(&od[0]).iter().map(|r| argmax(r)).collect();
        tok_a = last_rows(&oa[0]).iter().map(|r| argmax(r)).collect();
        assert_eq!(tok_a, tok_d, "step {step}: greedy tokens differ");
        for (b, &t) in tok_d.iter().enumerate() {
            worst.tokens[b].push(t);
        }
        // The caches grow by one position per step in both forms.
        assert_eq!(od[1].shape()[0], prompt + step + 1);
        cache_d = od[1..].to_vec();
        cache_a = oa[1..].to_vec();
    }
    worst
}

// ---------------------------------------------------------------- structure

/// Whether a type is per-head over the key positions, `[b, c+1, heads, ·]`.
fn per_head_over_cache(t: &Ty, heads: i64) -> bool {
    t.rank() == 4 && t.shape[1].coeff(Sym::Cache) == 1 && t.shape[2].is(heads)
}

#[test]
fn absorbed_decode_never_expands_the_cache() {
    let spec = tiny("tiny_v3.dsc");
    let before = compiled(&spec, Mode::Decode, MlaMode::Decompress);
    let after = compiled(&spec, Mode::Decode, MlaMode::Auto);
    let (kv_lora, rope, heads) = (24, 8, 3);
    for (m, absorbed) in [(&before, false), (&after, true)] {
        let entry = m.entry(Mode::Decode).unwrap();
        // The cache arguments are exactly the compressed cache, in both forms.
        let sig = entry.graph.signature();
        for (l, pair) in sig.inputs[2..].chunks(2).enumerate() {
            assert_eq!(pair[0].shape.to_string(), format!("[c,b,{kv_lora}]"), "layer {l}");
            assert_eq!(pair[1].shape.to_string(), format!("[c,b,{rope}]"), "layer {l}");
        }
        for f in m.functions.iter().filter(|f| f.name.starts_with("decode.layer.")) {
            let g = &f.graph;
            let expands = g.nodes().into_iter().filter(|&n| g.node(n).outputs.iter().any(|t| per_head_over_cache(t, heads))).count();
            // kv_b_proj's matmul reads the latent over every key position.
            let kv_b_over_cache = g.nodes().into_iter().any(|n| {
                g.node(n).op == Op::MatMul
                    && g.inputs(n).iter().any(|v| matches!(&g.node(v.node).op, Op::Param { name } if name == "self_attn.kv_b_proj.weight"))
                    && g.ty(g.inputs(n)[0]).shape[1].coeff(Sym::Cache) == 1
            });
            let att = g.nodes().into_iter().find_map(|n| match g.node(n).op {
                Op::Attention { heads, kv_heads, .. } => Some((heads, kv_heads)),
                _ => None,
            });
            if absorbed {
                assert_eq!(expands, 0, "{}: a per-head K or V over the cache", f.name);
                assert!(!kv_b_over_cache, "{}: kv_b_proj still multiplies the cache", f.name);
                assert_eq!(att, Some((3, 1)), "{}", f.name);
                // Its signature (the caches in and out) is the decompressed one's.
                assert_eq!(g.signature(), before.function(&f.name).unwrap().graph.signature());
            } else {
                // The decompressed form builds kv_b(latent), K_nope, V, the broadcast
                // rope key and K.
                assert_eq!(expands, 5, "{}", f.name);
                assert!(kv_b_over_cache, "{}", f.name);
                assert_eq!(att, Some((3, 3)), "{}", f.name);
            }
        }
    }
}

// ---------------------------------------------------------------- numbers

const STEPS: usize = 16;

fn check_spec(label: &str, spec: &dsc_dsl::Spec, seed: u64) {
    let f32 = greedy_both_ways(spec, Precision::F32, 2, 5, STEPS, 1e-4, seed);
    let f64 = greedy_both_ways(spec, Precision::F64, 2, 5, STEPS, 1e-9, seed);
    // The same weights and prompt: f32 and f64 pick the same tokens here.
    assert_eq!(f32.tokens, f64.tokens, "{label}");
    println!(
        "{label}: max relative logit difference absorbed vs decompressed: f32 prefill {:.2e} decode {:.2e}; f64 prefill {:.2e} decode {:.2e}; tokens {:?}",
        f32.prefill, f32.decode, f64.prefill, f64.decode, f32.tokens
    );
}

#[test]
fn absorbed_matches_decompressed_tiny_v2() {
    check_spec("tiny_v2", &tiny("tiny_v2.dsc"), 2);
}

#[test]
fn absorbed_matches_decompressed_tiny_v2_lite() {
    check_spec("tiny_v2_lite", &tiny("tiny_v2_lite.dsc"), 3);
}

#[test]
fn absorbed_matches_decompressed_tiny_v3() {
    check_spec("tiny_v3", &tiny("tiny_v3.dsc"), 4);
}

#[test]
fn absorbed_matches_decompressed_odd_sizes() {
    check_spec("odd", &from_str(ODD), 5);
}

// ---------------------------------------------------------------- speed

/// V2-Lite's attention and hidden sizes (16 heads, latent 512, nope 128, rope 64, v 128,
/// hidden 2048) with two dense layers (its first layer's FFN). The vocabulary is cut to
/// 4096 and the MoE layers left out: the head and the FFN are the same in both forms and
/// would only dilute the comparison (and not fit the test machine's memory).
const MID: &str = "model mid {
  vocab = 4096
  hidden = 2048
  layers = 2
  dtype = f32
  norm_eps = 1e-6
  attention mla {
    heads = 16
    q_lora_rank = none
    kv_lora_rank = 512
    qk_nope_head_dim = 128
    qk_rope_head_dim = 64
    v_head_dim = 128
    latent_norm_eps = 1e-6
  }
  rope { theta = 10000, layout = interleaved }
  ffn dense { layers = 0.., intermediate = 10944 }
}";

/// Decode tokens/s of one compiled module over a random cache of `c` positions (the same
/// cache every step, so `c` stays fixed), on one thread, from the median step time: a
/// shared test machine makes the mean (and multi-threaded runs) noisy.
fn tokens_per_second(m: &Module, w: &HashMap<String, Tensor>, c: usize, steps: usize) -> f64 {
    let sig = m.entry(Mode::Decode).unwrap().graph.signature();
    let mut rng = SplitMix64(7);
    let mut args = vec![Tensor::i64(&[1, 1], vec![1]), Tensor::i64(&[1, 1], vec![c as i64])];
    for t in &sig.inputs[2..] {
        let d = t.shape[2].as_const().unwrap() as usize;
        args.push(Tensor::f32(&[1, c, d], (0..c * d).map(|_| rng.normal() as f32).collect()));
    }
    let opts = Options { threads: Some(1), ..Options::default() };
    run(m, Mode::Decode, &args, w, &opts).unwrap(); // warm-up
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            let t = Instant::now();
            run(m, Mode::Decode, &args, w, &opts).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    1.0 / times[steps / 2]
}

#[test]
#[ignore = "timing; run with --release -- --ignored --nocapture"]
fn decode_speed_absorbed_vs_decompressed() {
    for (label, spec, steps) in [("tiny_v3", tiny("tiny_v3.dsc"), 200), ("mid (V2-Lite dims, 2 layers)", from_str(MID), 7)] {
        let dec = compiled(&spec, Mode::Decode, MlaMode::Decompress);
        let abs = compiled(&spec, Mode::Decode, MlaMode::Absorb);
        let w = random_weights(&entry_params(&dec, Mode::Decode), &mut SplitMix64(1));
        for c in [64, 256, 1024] {
            let (d, a) = (tokens_per_second(&dec, &w, c, steps), tokens_per_second(&abs, &w, c, steps));
            println!("{label:>30}  c={c:>5}  decompressed {d:>9.1} tok/s  absorbed {a:>9.1} tok/s  absorbed/decompressed {:.2}x", a / d);
        }
    }
}
