//! The acceptance test of loading and running: every transformers fixture in `golden/hf/`
//! opened as a model directory (with each of its two config layouts), compiled as
//! `dsc generate` compiles it (MLA absorbed, and decompressed), and run on the reference
//! backend, must reproduce
//!
//! - the full-forward logits of both prompts, within `1e-4 + 1e-4·|ref|`;
//! - every MoE layer's routing: the chosen experts per token exactly (as sets) and their
//!   gate weights within 1e-5;
//! - the 8 greedy tokens of `generated.json` through the KV cache, and the logits behind
//!   each of them (`generate_step_logits`) within the logits tolerance.
//!
//! Also: a batch of prompts of different lengths (left-padded and masked) gives every
//! prompt the tokens it gets alone, and absorbed and decompressed MLA decoding agree.
//!
//! The same acceptance holds on the `wgpu` backend (the compiled plan of GPU kernels,
//! on lavapipe in CI): `*_on_wgpu` below.
//!
//! Run with `--nocapture` to see the largest differences per case.

use dsc_compiler::ir::{Mode, Op};
use dsc_compiler::passes::mla_absorb::MlaMode;
use dsc_runtime::checkpoint::{CheckpointWeights, ModelDir, OpenOptions};
use dsc_runtime::generate::{
    forward, forward_last_logits, generate, Backend, CompileOptions, GenerateOptions, ModelBackend, ReferenceBackend, StepInput,
};
use dsc_runtime::reference::{load_safetensors, Options, Tensor};
use dsc_runtime::wgpu::exec::WgpuEngine;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const CASES: [&str; 5] = ["llama_dense", "llama_gqa", "deepseek_v2", "deepseek_v2_lite", "deepseek_v3"];
const LAYOUTS: [&str; 2] = ["config.json", "config_legacy.json"];

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(case)
}

fn load(case: &str, file: &str) -> HashMap<String, Tensor> {
    load_safetensors(&std::fs::read(dir(case).join(file)).unwrap()).unwrap()
}

fn json(case: &str, file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(case).join(file)).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

fn prompts(case: &str) -> Vec<Vec<i64>> {
    json(case, "input_ids.json")["input_ids"].as_array().unwrap().iter().map(ids).collect()
}

fn open(case: &str, config: &str) -> ModelDir {
    let opts = OpenOptions { config: Some(dir(case).join(config)), ..OpenOptions::default() };
    ModelDir::open(&dir(case), &opts).unwrap_or_else(|e| panic!("{case} ({config}): {e}"))
}

/// The fixture directory opened with one of its configs, on the reference backend,
/// compiled with MLA in the form `mla` asks for.
fn backend(case: &str, config: &str, mla: MlaMode) -> ReferenceBackend<CheckpointWeights> {
    let md = open(case, config);
    ReferenceBackend::new(md.spec, md.weights, CompileOptions { mla, ..CompileOptions::default() }, Options::default())
}

/// The same on the wgpu backend (the default adapter: lavapipe on a machine without a
/// GPU; no adapter at all fails the test).
fn wgpu_backend(case: &str, config: &str, mla: MlaMode) -> Box<dyn Backend> {
    let md = open(case, config);
    Box::new(ModelBackend::with_engine(md.spec, md.weights, CompileOptions { mla, ..CompileOptions::default() }, WgpuEngine::new()))
}

/// The same on CUDA device 0 (feature `cuda`; no device fails the test).
#[cfg(feature = "cuda")]
fn cuda_backend(case: &str, config: &str, mla: MlaMode) -> Box<dyn Backend> {
    let md = open(case, config);
    let engine = dsc_runtime::cuda::CudaEngine::new(0).unwrap_or_else(|e| panic!("{e}"));
    Box::new(ModelBackend::with_engine(md.spec, md.weights, CompileOptions { mla, ..CompileOptions::default() }, engine))
}

fn reference_backend(case: &str, config: &str, mla: MlaMode) -> Box<dyn Backend> {
    Box::new(backend(case, config, mla))
}

/// Whether a compiled decode attends over the latent (`kv_heads = 1` with MLA's heads).
fn absorbed(b: &ReferenceBackend<CheckpointWeights>) -> bool {
    let m = b.module(Mode::Decode, false).unwrap();
    m.functions
        .iter()
        .flat_map(|f| f.graph.nodes().into_iter().map(move |n| &f.graph.node(n).op))
        .any(|op| matches!(op, Op::Attention { kv_heads: 1, heads, .. } if *heads > 1))
}

/// Largest `|got - want|`, after checking `|got - want| <= 1e-4 + 1e-4·|want|` everywhere.
fn close(got: &[f32], want: &[f32], what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w as f64).abs();
        assert!(d <= 1e-4 + 1e-4 * (w as f64).abs(), "{what}: element {i}: {g} vs {w}");
        worst = worst.max(d);
    }
    worst
}

/// The largest errors of one case and layout, for the report.
#[derive(Default, Debug)]
struct Errors {
    logits: f64,
    steps: f64,
    gate_weights: f64,
    moe_layers: usize,
}

fn check_case(case: &str) {
    check_case_on(case, &LAYOUTS, reference_backend);
}

/// [`check_case`] on the backends `make` builds, for the given config layouts.
fn check_case_on(case: &str, layouts: &[&str], make: impl Fn(&str, &str, MlaMode) -> Box<dyn Backend>) {
    let reference = load(case, "logits.safetensors");
    let inter = load(case, "intermediates.safetensors");
    let want_tokens = ids(&json(case, "generated.json")["generated"]);
    let prompts = prompts(case);
    for (config, mla) in layouts.iter().flat_map(|c| [(*c, MlaMode::Absorb), (*c, MlaMode::Decompress)]) {
        let b = make(case, config, mla);
        let b = b.as_ref();
        let config = &format!("{config}, MLA {mla}, {}", b.name());
        let mut err = Errors::default();

        // Full forward of both prompts, with the routers' decisions.
        let out = forward(b, &prompts, true).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(out.logits.shape(), reference["logits"].shape(), "{case}: logits shape");
        err.logits = close(out.logits.as_f32().unwrap(), &reference["logits"].to_f32_vec(), &format!("{case} ({config}) logits"));

        let moe_layers: Vec<u32> = inter.keys().filter_map(|k| k.strip_prefix("topk_indices.")).map(|l| l.parse().unwrap()).collect();
        assert_eq!(out.routing.len(), moe_layers.len(), "{case}: one routing per MoE layer");
        for r in &out.routing {
            let l = r.layer.expect("routers run inside layer calls");
            let want_idx = inter[&format!("topk_indices.{l}")].to_i64_vec().unwrap();
            let want_w = inter[&format!("topk_weights.{l}")].to_f32_vec();
            let k = *r.indices.shape().last().unwrap();
            let (got_idx, got_w) = (r.indices.to_i64_vec().unwrap(), r.weights.to_f32_vec());
            assert_eq!(got_idx.len(), want_idx.len(), "{case} layer {l}: tokens × k");
            for t in 0..got_idx.len() / k {
                // HF lists a token's experts by id, the router by score: compare sets.
                let mut got: Vec<(i64, f32)> = (0..k).map(|j| (got_idx[t * k + j], got_w[t * k + j])).collect();
                let mut want: Vec<(i64, f32)> = (0..k).map(|j| (want_idx[t * k + j], want_w[t * k + j])).collect();
                got.sort_by_key(|p| p.0);
                want.sort_by_key(|p| p.0);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.0, w.0, "{case} ({config}) layer {l} token {t}: experts {got:?} vs {want:?}");
                    let d = (g.1 - w.1).abs() as f64;
                    assert!(d <= 1e-5, "{case} ({config}) layer {l} token {t}: gate weights {got:?} vs {want:?}");
                    err.gate_weights = err.gate_weights.max(d);
                }
            }
            err.moe_layers += 1;
        }

        // Greedy decoding of prompt 0 through the cache.
        let opts = GenerateOptions { max_new_tokens: want_tokens.len(), keep_logits: true, ..GenerateOptions::default() };
        let g = generate(b, &prompts[..1], &opts).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(g.tokens[0], want_tokens, "{case} ({config}): greedy tokens");
        let steps = &reference["generate_step_logits"];
        let vocab = steps.shape()[1];
        let steps = steps.to_f32_vec();
        for (i, got) in g.step_logits[0].iter().enumerate() {
            let d = close(got, &steps[i * vocab..(i + 1) * vocab], &format!("{case} ({config}) step {i}"));
            err.steps = err.steps.max(d);
        }
        eprintln!(
            "{case} ({config}): max |Δ| logits {:.2e}, step logits {:.2e}, gate weights {:.2e} over {} MoE layers",
            err.logits, err.steps, err.gate_weights, err.moe_layers
        );
    }
}

#[test]
fn llama_dense_matches_transformers() {
    check_case("llama_dense");
}

#[test]
fn llama_gqa_matches_transformers() {
    check_case("llama_gqa");
}

#[test]
fn deepseek_v2_matches_transformers() {
    check_case("deepseek_v2");
}

#[test]
fn deepseek_v2_lite_matches_transformers() {
    check_case("deepseek_v2_lite");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_case("deepseek_v3");
}

// The wgpu backend runs the plan `dsc compile --target wgpu` writes: one config layout
// suffices there (the layouts differ in import, not in what runs).
#[test]
fn llama_dense_on_wgpu() {
    check_case_on("llama_dense", &LAYOUTS[..1], wgpu_backend);
}

#[test]
fn llama_gqa_on_wgpu() {
    check_case_on("llama_gqa", &LAYOUTS[..1], wgpu_backend);
}

#[test]
fn deepseek_v2_on_wgpu() {
    check_case_on("deepseek_v2", &LAYOUTS[..1], wgpu_backend);
}

#[test]
fn deepseek_v2_lite_on_wgpu() {
    check_case_on("deepseek_v2_lite", &LAYOUTS[..1], wgpu_backend);
}

#[test]
fn deepseek_v3_on_wgpu() {
    check_case_on("deepseek_v3", &LAYOUTS[..1], wgpu_backend);
}

/// Prompts of different lengths in one batch (left-padded, pad keys masked) get the
/// tokens, and the logits, each gets alone.
#[test]
fn padded_batch_matches_each_prompt_alone() {
    padded_batch_on(&CASES, reference_backend);
}

/// The same on the wgpu backend (the masked variant of each entry point is its own plan),
/// for a dense GQA model and for MLA with MoE.
#[test]
fn padded_batch_on_wgpu() {
    padded_batch_on(&["llama_gqa", "deepseek_v3"], wgpu_backend);
}

fn padded_batch_on(cases: &[&str], make: impl Fn(&str, &str, MlaMode) -> Box<dyn Backend>) {
    for (case, mla) in cases.iter().flat_map(|c| [(*c, MlaMode::Absorb), (*c, MlaMode::Decompress)]) {
        let b = make(case, "config.json", mla);
        let b = b.as_ref();
        let p = prompts(case);
        let batch = vec![p[0].clone(), p[1][..5].to_vec(), p[1][3..11].to_vec()];
        let opts = GenerateOptions { max_new_tokens: 6, keep_logits: true, ..GenerateOptions::default() };
        let together = generate(b, &batch, &opts).unwrap();
        for (i, prompt) in batch.iter().enumerate() {
            let alone = generate(b, std::slice::from_ref(prompt), &opts).unwrap();
            assert_eq!(together.tokens[i], alone.tokens[0], "{case} (MLA {mla}, {}): prompt {i} of length {}", b.name(), prompt.len());
            for (s, (got, want)) in together.step_logits[i].iter().zip(&alone.step_logits[0]).enumerate() {
                close(got, want, &format!("{case} (MLA {mla}): prompt {i} step {s}"));
            }
        }
    }
}

/// Absorbed MLA (W_UK folded into the query, W_UV into the output, attention over the
/// latent) and the decompressed form HF runs give the fixtures' greedy tokens, and the
/// same logits within the fixtures' tolerance, for every MLA case.
#[test]
fn absorbed_and_decompressed_decode_agree() {
    for case in ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3"] {
        let want_tokens = ids(&json(case, "generated.json")["generated"]);
        let p = prompts(case);
        let opts = GenerateOptions { max_new_tokens: want_tokens.len(), keep_logits: true, ..GenerateOptions::default() };
        let (ba, bd) = (backend(case, "config.json", MlaMode::Absorb), backend(case, "config.json", MlaMode::Decompress));
        assert!(absorbed(&ba) && !absorbed(&bd), "{case}: the two forms are not what they claim");
        let absorbed = generate(&ba, &p[..1], &opts).unwrap();
        let plain = generate(&bd, &p[..1], &opts).unwrap();
        assert_eq!(absorbed.tokens[0], want_tokens, "{case}: absorbed tokens");
        assert_eq!(plain.tokens[0], want_tokens, "{case}: decompressed tokens");
        let steps = load(case, "logits.safetensors")["generate_step_logits"].to_f32_vec();
        let vocab = steps.len() / want_tokens.len();
        let (mut worst, mut vs_ref) = (0.0f64, 0.0f64);
        for (i, (a, d)) in absorbed.step_logits[0].iter().zip(&plain.step_logits[0]).enumerate() {
            worst = worst.max(close(a, d, &format!("{case}: step {i}, absorbed vs decompressed")));
            vs_ref = vs_ref.max(close(a, &steps[i * vocab..(i + 1) * vocab], &format!("{case}: step {i}, absorbed vs transformers")));
        }
        eprintln!("{case}: step logits max |Δ| absorbed vs decompressed {worst:.2e}, absorbed vs transformers {vs_ref:.2e}");
    }
}

/// The KV cache holds what the lowering documents, position-major: per layer `k` and `v`
/// per KV head for MHA/GQA, the normalised latent and the rotated rope key for MLA; decode
/// grows it by one position per step.
#[test]
fn kv_cache_layout() {
    for (case, per_layer) in [
        ("llama_dense", [vec![4, 12], vec![4, 12]]),
        ("llama_gqa", [vec![1, 12], vec![1, 12]]),
        ("deepseek_v2", [vec![24], vec![8]]),
        ("deepseek_v2_lite", [vec![24], vec![8]]),
        ("deepseek_v3", [vec![24], vec![8]]),
    ] {
        let b = backend(case, "config.json", MlaMode::Absorb);
        let p = prompts(case);
        let out = forward(&b, &p, false).unwrap();
        let layers = b.spec().model.layers as usize;
        let tensors = out.cache.tensors().expect("the reference backend keeps its cache on the host");
        assert_eq!(tensors.len(), 2 * layers, "{case}");
        for (i, t) in tensors.iter().enumerate() {
            let want: Vec<usize> = [vec![12, 2], per_layer[i % 2].clone()].concat();
            assert_eq!(t.shape(), &want[..], "{case}: cache tensor {i}");
        }
        let per_token: usize = per_layer.iter().map(|d| d.iter().product::<usize>()).sum::<usize>() * layers;
        assert_eq!(out.cache.elements_per_token(), per_token as u64, "{case}");
        assert_eq!(out.cache.bytes(), (2 * 12 * per_token * 4) as u64, "{case}: f32 on the reference backend");
        let opts = GenerateOptions { max_new_tokens: 4, ..GenerateOptions::default() };
        let g = generate(&b, &p, &opts).unwrap();
        assert_eq!(g.stats.cache_len, 12 + 3, "{case}: one position per decode step");
        assert_eq!(g.stats.decode_steps, 3);
    }
}

/// On a device the KV cache stays on the device from the prompt pass to the last decode
/// step, and greedy sampling happens there: the host link carries each step's token ids
/// and positions in and the sampled tokens (with their log-probabilities and entropies)
/// out, and nothing that grows with the cache or the vocabulary (measured by the engine's
/// count of the bytes its runs upload and download, weights apart). The tokens are the
/// reference backend's.
#[test]
fn decode_on_wgpu_keeps_the_cache_on_the_device() {
    for case in ["llama_gqa", "deepseek_v3"] {
        let md = open(case, "config.json");
        let vocab = md.spec.model.vocab as usize;
        let b = ModelBackend::with_engine(md.spec, md.weights, CompileOptions::default(), WgpuEngine::new());
        let p = prompts(case);
        let (batch, len) = (p.len(), p[0].len());
        assert!(p.iter().all(|q| q.len() == len), "{case}: equal prompts need no mask");
        let out = b.prefill(&StepInput {
            batch,
            seq: len,
            ids: p.concat(),
            positions: (0..batch).flat_map(|_| 0..len as i64).collect(),
            mask: None,
            capture_routing: false,
            last_logits: true,
            sample: None,
        });
        let out = out.unwrap();
        assert!(out.cache.tensors().is_none(), "{case}: the prompt pass left its cache on the host");
        assert_eq!(out.cache.len(), len);
        let opts = GenerateOptions { max_new_tokens: 6, ..GenerateOptions::default() };
        let before = b.engine().counts();
        let g = generate(&b, &p, &opts).unwrap();
        let after = b.engine().counts();
        let steps = g.stats.decode_steps as u64;
        assert_eq!(steps, 5);
        // i32 ids and positions in; the sampled tokens (i32) with their log-probabilities
        // and entropies (f32) out: the logits stay on the device too.
        let (b_, s_) = (batch as u64, len as u64);
        assert_eq!(after.to_device - before.to_device, 2 * 4 * b_ * s_ + steps * 2 * 4 * b_, "{case}: bytes to the device");
        assert_eq!(after.to_host - before.to_host, (1 + steps) * 12 * b_, "{case}: bytes to the host (vocabulary {vocab})");
        // Kept logits come to the host: 4·b·V bytes per step more.
        let keep = GenerateOptions { keep_logits: true, ..opts.clone() };
        let (c0, kept) = (b.engine().counts(), generate(&b, &p, &keep).unwrap());
        let c1 = b.engine().counts();
        assert_eq!(c1.to_host - c0.to_host, (1 + steps) * 4 * b_ * vocab as u64, "{case}");
        assert_eq!(kept.tokens, g.tokens, "{case}: greedy on the device is greedy on the host");
        assert_eq!(after.weights_to_device, before.weights_to_device, "{case}: the weights were uploaded by the first prefill");
        let want = generate(&backend(case, "config.json", MlaMode::Auto), &p, &opts).unwrap();
        assert_eq!(g.tokens, want.tokens, "{case}");
        assert_eq!(g.stats.cache_len, len + 5);
        assert!(g.stats.cache_bytes > 0);
    }
}

/// Decode appends to the device cache in place: the first step copies the prompt's cache
/// into a buffer with room, every later step writes only its new position (the buffer,
/// and so the cache's bytes, stay the same). A cache branched from an earlier step (a
/// clone decoded twice) is never overwritten: the second branch copies, and both give the
/// logits the reference backend gives.
#[test]
fn decode_on_wgpu_appends_in_place() {
    for case in ["llama_gqa", "deepseek_v3"] {
        let md = open(case, "config.json");
        let layers = md.spec.model.layers;
        let dev = ModelBackend::with_engine(md.spec, md.weights, CompileOptions::default(), WgpuEngine::new());
        let refb = backend(case, "config.json", MlaMode::Auto);
        let p = prompts(case);
        let (batch, len) = (p.len(), p[0].len());
        let step = |tokens: &[i64], at: usize| StepInput {
            batch,
            seq: tokens.len() / batch,
            ids: tokens.to_vec(),
            positions: (0..batch).flat_map(|_| at as i64..(at + tokens.len() / batch) as i64).collect(),
            mask: None,
            capture_routing: false,
            last_logits: true,
            sample: None,
        };
        let prompt = step(&p.concat(), 0);
        let (mut cache, mut ref_cache) = (dev.prefill(&prompt).unwrap().cache, refb.prefill(&prompt).unwrap().cache);
        let mut tokens: Vec<i64> = (0..batch as i64).map(|i| 3 + i).collect();
        let mut sizes = Vec::new();
        let mut branch = None;
        for s in 0..4 {
            let input = step(&tokens, len + s);
            if s == 2 {
                branch = Some((cache.clone(), ref_cache.clone(), input.clone()));
            }
            let (got, want) = (dev.decode(&input, cache).unwrap(), refb.decode(&input, ref_cache).unwrap());
            let d = max_diff(&got.logits, &want.logits);
            assert!(d < 1e-4, "{case}: step {s}: logits differ by {d}");
            sizes.push(got.cache.bytes());
            tokens = argmax_rows(&want.logits);
            (cache, ref_cache) = (got.cache, want.cache);
        }
        // One copy per cache tensor at the first step, in place after it.
        let c = dev.engine().counts();
        assert_eq!((c.appends_in_place, c.appends_copied), (3 * 2 * layers, 2 * layers), "{case}");
        assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{case}: the cache moved: {sizes:?}");
        // Step 2 again from the cache it started with: step 3 has written past it since.
        let (old, ref_old, input) = branch.unwrap();
        let (got, want) = (dev.decode(&input, old).unwrap(), refb.decode(&input, ref_old).unwrap());
        assert!(max_diff(&got.logits, &want.logits) < 1e-4, "{case}: the branched step");
        assert_eq!(dev.engine().counts().appends_copied, 4 * layers, "{case}: the branch must copy");
        // And the newer cache is intact: one more step from it still matches.
        let input = step(&tokens, len + 4);
        let (got, want) = (dev.decode(&input, cache).unwrap(), refb.decode(&input, ref_cache).unwrap());
        assert!(max_diff(&got.logits, &want.logits) < 1e-4, "{case}: the newer cache after the branch");
    }
}

/// Decode over a cache longer than two split-K chunks at batch 1 runs the split
/// attention on the device (absorbed MLA: its key read from the latent and rope-key
/// caches where they lie, in chunks): the logits of every step match the reference
/// backend's.
#[test]
fn long_context_decode_on_wgpu_matches_the_reference() {
    for case in ["deepseek_v3", "llama_gqa"] {
        let md = open(case, "config.json");
        let vocab = md.spec.model.vocab as i64;
        let dev = ModelBackend::with_engine(md.spec, md.weights, CompileOptions::default(), WgpuEngine::new());
        let prompt: Vec<i64> = (0..1100).map(|i| (i * 37 + 11) % vocab).collect();
        let opts = GenerateOptions { max_new_tokens: 3, keep_logits: true, ..GenerateOptions::default() };
        let (got, want) = (
            generate(&dev, std::slice::from_ref(&prompt), &opts).unwrap(),
            generate(&backend(case, "config.json", MlaMode::Auto), &[prompt], &opts).unwrap(),
        );
        assert_eq!(got.tokens, want.tokens, "{case}");
        for (a, b) in got.step_logits[0].iter().zip(&want.step_logits[0]) {
            close(a, b, &format!("{case}: a step's logits over 1100 cached positions"));
        }
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.to_f64_vec().iter().zip(b.to_f64_vec()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The greedy token of each row of `[b, 1, V]` logits.
fn argmax_rows(logits: &Tensor) -> Vec<i64> {
    let v = logits.shape()[2];
    logits.to_f64_vec().chunks(v).map(|r| (0..v).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap() as i64).collect()
}

// The CUDA backend runs the plan `dsc compile --target cuda` writes (feature `cuda`).
#[cfg(feature = "cuda")]
mod on_cuda {
    use super::{check_case_on, cuda_backend, LAYOUTS};

    #[test]
    fn llama_dense_on_cuda() {
        check_case_on("llama_dense", &LAYOUTS[..1], cuda_backend);
    }

    #[test]
    fn llama_gqa_on_cuda() {
        check_case_on("llama_gqa", &LAYOUTS[..1], cuda_backend);
    }

    #[test]
    fn deepseek_v2_on_cuda() {
        check_case_on("deepseek_v2", &LAYOUTS[..1], cuda_backend);
    }

    #[test]
    fn deepseek_v2_lite_on_cuda() {
        check_case_on("deepseek_v2_lite", &LAYOUTS[..1], cuda_backend);
    }

    #[test]
    fn deepseek_v3_on_cuda() {
        check_case_on("deepseek_v3", &LAYOUTS[..1], cuda_backend);
    }
}

/// The prompt pass of a generation computes the last position's logits only
/// (`StepInput::last_logits`, lowered with `PrefillLogits::Last`): they are the last row
/// of the full forward's logits, for every fixture. (Padded batches go through the same
/// prompt pass in `generate`: `padded_batch_matches_each_prompt_alone`.)
#[test]
fn last_position_prefill_is_the_last_row() {
    for case in CASES {
        let b = reference_backend(case, "config.json", MlaMode::Absorb);
        let p = prompts(case);
        let full = forward(b.as_ref(), &p, false).unwrap();
        let (batch, seq, vocab) = (full.logits.shape()[0], full.logits.shape()[1], full.logits.shape()[2]);
        let last = forward_last_logits(b.as_ref(), &p).unwrap();
        assert_eq!(last.logits.shape(), &[batch, 1, vocab], "{case}");
        let all = full.logits.as_f32().unwrap();
        for r in 0..batch {
            let want = &all[(r * seq + seq - 1) * vocab..(r * seq + seq) * vocab];
            close(&last.logits.as_f32().unwrap()[r * vocab..(r + 1) * vocab], want, &format!("{case} row {r}"));
        }
    }
}

/// A checkpoint stored in bf16 is run in bf16 (`keep_stored`, as `dsc logits` and
/// `generate` open it: weights never widened whole, matmuls widening a block of rows at a
/// time): the logits, routing and greedy tokens are those of the same weights widened to
/// f32 up front, for a dense model and for MLA with MoE.
/// A copy of fixture `case` with every weight rounded to bf16 (nearest, ties to even),
/// as a bf16 checkpoint ships, in a fresh temporary directory named for `what`.
fn bf16_copy(case: &str, what: &str) -> PathBuf {
    use dsc_runtime::reference::weights::f32_to_bf16;
    let root = std::env::temp_dir().join(format!("dsc-bf16-{what}-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(dir(case).join("config.json"), root.join("config.json")).unwrap();
    let bytes = std::fs::read(dir(case).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{case}: {n}");
            let bits = v.data().chunks_exact(4).flat_map(|c| f32_to_bf16(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes());
            (n, v.shape().to_vec(), bits.collect())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = converted
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(root.join("model.safetensors"), safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    root
}

/// What `Options::bf16_inputs` (bf16 matmul inputs) costs in accuracy: on a bf16 copy of
/// every fixture, the prompt's logits with bf16 inputs against the same weights with f32
/// inputs, both against transformers' f32 logits of the original weights, scaled by the
/// logits' largest magnitude; and how many greedy tokens agree. Bounded so a wrong
/// rounding (truncation, a lost pair) fails: bf16 keeps 8 bits, so each input is off by
/// at most 2^-9 of itself.
#[test]
fn bf16_inputs_cost_against_f32_inputs() {
    for case in CASES {
        let root = bf16_copy(case, "inputs");
        let p = prompts(case);
        let want = load(case, "logits.safetensors")["logits"].to_f32_vec();
        let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let run = |bf16_inputs: bool| {
            let mut d = ModelDir::open(&root, &OpenOptions::default()).unwrap();
            d.weights.keep_stored(true);
            let opts = Options { bf16_inputs, ..Options::default() };
            let b = ReferenceBackend::new(d.spec, d.weights, CompileOptions { mla: MlaMode::Absorb, ..Default::default() }, opts);
            let out = forward(&b, &p, true).unwrap();
            let g = generate(&b, &p[..1], &GenerateOptions { max_new_tokens: 8, ..GenerateOptions::default() }).unwrap();
            let experts: Vec<Vec<i64>> = out.routing.iter().map(|r| r.indices.to_i64_vec().unwrap()).collect();
            (out.logits.as_f32().unwrap().to_vec(), g.tokens, experts)
        };
        let ((f32_in, f32_tokens, f32_experts), (bf16_in, bf16_tokens, bf16_experts)) = (run(false), run(true));
        // A token whose expert choice flips (the fixtures' random routers have near-ties)
        // moves its logits by a different expert's output, not by rounding: bound only the
        // rows every layer routes alike.
        let flipped: usize = f32_experts.iter().zip(&bf16_experts).map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count()).sum();
        let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())) / scale;
        let (inputs, f32_vs_hf, bf16_vs_hf) = (worst(&bf16_in, &f32_in), worst(&f32_in, &want), worst(&bf16_in, &want));
        let agree = f32_tokens[0].iter().zip(&bf16_tokens[0]).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{case}: bf16 inputs vs f32 inputs {inputs:.2e}; vs transformers: f32 inputs {f32_vs_hf:.2e}, bf16 inputs {bf16_vs_hf:.2e} \
             (of the largest |logit| {scale:.2}); expert choices flipped {flipped}; greedy tokens agree for {agree} of {}",
            f32_tokens[0].len()
        );
        assert!(inputs > 0.0, "{case}: bf16 inputs changed nothing: the option is not applied");
        if flipped == 0 {
            assert!(inputs < 0.02, "{case}: bf16 inputs moved the logits by {inputs:.3e} of their scale");
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// `Options::bf16_cache`'s cost: the logits of every decode step with the KV cache held
/// in bf16 against the f32 cache, on each fixture's own (f32) weights, as a fraction of
/// the largest |logit|; the cache takes half the bytes; and how many greedy tokens agree.
/// The prompt pass is untouched (its logits are the same), so the cost is the cache's
/// rounding alone: bounded so a truncating or misplaced append fails.
#[test]
fn bf16_cache_cost_against_the_f32_cache() {
    for case in CASES {
        let p = prompts(case);
        let run = |bf16_cache: bool| {
            let d = open(case, "config.json");
            let opts = Options { bf16_cache, ..Options::default() };
            let b = ReferenceBackend::new(d.spec, d.weights, CompileOptions { mla: MlaMode::Absorb, ..Default::default() }, opts);
            let g = generate(&b, &p[..1], &GenerateOptions { max_new_tokens: 8, keep_logits: true, ..GenerateOptions::default() }).unwrap();
            let logits: Vec<f32> = g.step_logits[0].concat();
            (logits, g.tokens, g.stats.cache_bytes)
        };
        let ((f32_logits, f32_tokens, f32_bytes), (bf16_logits, bf16_tokens, bf16_bytes)) = (run(false), run(true));
        let scale = f32_logits.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let worst = f32_logits.iter().zip(&bf16_logits).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs())) / scale;
        let agree = f32_tokens[0].iter().zip(&bf16_tokens[0]).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{case}: bf16 cache vs f32 cache: logits {worst:.2e} of the largest |logit| {scale:.2}; cache {bf16_bytes} vs {f32_bytes} bytes; \
             greedy tokens agree for {agree} of {}",
            f32_tokens[0].len()
        );
        assert_eq!(bf16_bytes * 2, f32_bytes, "{case}: the cache is held in bf16");
        assert!(worst > 0.0 && worst < 0.02, "{case}: the bf16 cache moved the logits by {worst:.3e} of their scale");
    }
}

#[test]
fn bf16_weights_kept_in_bf16_match_widened() {
    for case in ["llama_gqa", "deepseek_v3"] {
        let root = bf16_copy(case, "kept");
        let p = prompts(case);
        let run = |keep: bool| {
            let mut d = ModelDir::open(&root, &OpenOptions::default()).unwrap();
            d.weights.keep_stored(keep);
            let b =
                ReferenceBackend::new(d.spec, d.weights, CompileOptions { mla: MlaMode::Absorb, ..Default::default() }, Options::default());
            let out = forward(&b, &p, true).unwrap();
            let opts = GenerateOptions { max_new_tokens: 6, keep_logits: true, ..GenerateOptions::default() };
            let g = generate(&b, &p[..1], &opts).unwrap();
            let kept = b.weights().get("model.embed_tokens.weight").unwrap().as_bf16_bits().is_some();
            (out, g, kept)
        };
        let ((bf, gb, kept), (wide, gw, widened)) = (run(true), run(false));
        assert!(kept && !widened, "{case}: weights held as asked");
        close(bf.logits.as_f32().unwrap(), wide.logits.as_f32().unwrap(), &format!("{case} bf16 logits"));
        for (a, b) in bf.routing.iter().zip(&wide.routing) {
            assert_eq!(a.indices, b.indices, "{case}: experts");
        }
        assert_eq!(gb.tokens, gw.tokens, "{case}: greedy tokens");
        let _ = std::fs::remove_dir_all(&root);
    }
}
