//! Training against PyTorch: every transformers fixture in `golden/hf/` (both config
//! layouts) differentiated by dsc must reproduce transformers' own autograd:
//!
//! - the mean next-token cross-entropy over all `B×(T−1)` positions within 1e-5;
//! - every tensor's gradient, under the checkpoint's names and per-expert layout, within
//!   1e-3 relative (Frobenius); the selection bias gets zeros there and none here.
//!
//! The references are `golden/hf/<case>/grads.safetensors` (copied from
//! `shared/reference`, produced by torch 2.15 / transformers 5.24 in float32).
//! Run with `--nocapture` for the worst error per case.

use dsc_compiler::passes::autodiff::TrainOptions;
use dsc_compiler::passes::PassSelection;
use dsc_runtime::checkpoint::{ModelDir, OpenOptions};
use dsc_runtime::reference::{load_safetensors, Precision, Tensor, Weights};
use dsc_runtime::train::model::{hub_tensors, Terms, TrainModel};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const CASES: [&str; 5] = ["llama_dense", "llama_gqa", "deepseek_v2", "deepseek_v2_lite", "deepseek_v3"];
const LAYOUTS: [&str; 2] = ["config.json", "config_legacy.json"];

fn dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(case)
}

/// The fixture's two sequences as a training batch: labels are the inputs.
pub fn fixture_batch(case: &str) -> [Tensor; 3] {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir(case).join("input_ids.json")).unwrap()).unwrap();
    let rows: Vec<Vec<i64>> =
        v["input_ids"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()).collect();
    let (b, s) = (rows.len(), rows[0].len());
    let ids: Vec<i64> = rows.concat();
    let pos: Vec<i64> = (0..b * s).map(|i| (i % s) as i64).collect();
    [Tensor::i64(&[b, s], ids.clone()), Tensor::i64(&[b, s], pos), Tensor::i64(&[b, s], ids)]
}

/// Frobenius `‖a − b‖ / ‖b‖` (absolute when `b` is zero).
pub fn rel_frobenius(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if n == 0.0 {
        d
    } else {
        d / n
    }
}

#[test]
fn gradients_match_pytorch_autograd() {
    for case in CASES {
        let reference = load_safetensors(&std::fs::read(dir(case).join("grads.safetensors")).unwrap()).unwrap();
        for layout in LAYOUTS {
            let opts = OpenOptions { config: Some(dir(case).join(layout)), ..OpenOptions::default() };
            let md = ModelDir::open(&dir(case), &opts).unwrap_or_else(|e| panic!("{case}: {e}"));
            let tm = TrainModel::compile(&md.spec, TrainOptions::default(), &PassSelection::default()).unwrap();
            let [ids, pos, labels] = fixture_batch(case);
            let weights: &dyn Weights = &md.weights;
            let out = tm.run(weights, [&ids, &pos, &labels], Terms::MAIN, Precision::F32).unwrap_or_else(|e| panic!("{case}: {e}"));
            let want_loss = reference["loss"].get_flat(0);
            assert!((out.loss - want_loss).abs() <= 1e-5, "{case} {layout}: loss {} vs {want_loss}", out.loss);
            let ours: BTreeMap<String, Tensor> = hub_tensors(out.grads.clone());
            let mut worst = (0.0f64, String::new());
            for (name, want) in &reference {
                if name == "loss" {
                    continue;
                }
                let got = match ours.get(name) {
                    Some(g) => g.clone(),
                    None => {
                        // No gradient: only the selection bias (transformers gives zeros).
                        assert!(name.ends_with("e_score_correction_bias"), "{case}: no gradient for `{name}`");
                        Tensor::zeros(want.shape())
                    }
                };
                assert_eq!(got.shape(), want.shape(), "{case}: {name}");
                let e = rel_frobenius(&got, want);
                if e > worst.0 {
                    worst = (e, name.clone());
                }
                assert!(e <= 1e-3, "{case} {layout}: gradient of {name} off by {e:.2e} (relative Frobenius)");
            }
            let extra: Vec<&String> = ours.keys().filter(|k| !reference.contains_key(*k)).collect();
            assert!(extra.is_empty(), "{case}: gradients for tensors the checkpoint does not have: {extra:?}");
            println!("{case:<18} {layout:<20} loss |Δ| {:.1e}  worst gradient {:.2e} ({})", (out.loss - want_loss).abs(), worst.0, worst.1);
        }
    }
}

/// Five AdamW steps on the fixture's batch, as `sft/recipe.json` says (global-norm
/// clipping to 1, lr 5e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on tensors of
/// rank ≥ 2): the loss before each step within 1e-4 of torch's, every final tensor within
/// 1e-3 relative.
#[test]
fn five_sft_steps_match_pytorch() {
    use dsc_runtime::train::optim::{clip_grad_norm, AdamW, OptimizerState};
    for case in CASES {
        for layout in LAYOUTS {
            let recipe: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir(case).join("sft/recipe.json")).unwrap()).unwrap();
            let losses: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir(case).join("sft/losses.json")).unwrap()).unwrap();
            let want: Vec<f64> = losses["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let final_ref = load_safetensors(&std::fs::read(dir(case).join("sft/final.safetensors")).unwrap()).unwrap();
            let opts = OpenOptions { config: Some(dir(case).join(layout)), ..OpenOptions::default() };
            let md = ModelDir::open(&dir(case), &opts).unwrap();
            let mut weights: std::collections::HashMap<String, Tensor> =
                md.weights.names().into_iter().map(|n| (n.to_string(), md.weights.get(n).unwrap().clone())).collect();
            let tm = TrainModel::compile(&md.spec, TrainOptions::default(), &PassSelection::default()).unwrap();
            let [ids, pos, labels] = fixture_batch(case);
            let betas = recipe["betas"].as_array().unwrap();
            let adamw = AdamW {
                betas: [betas[0].as_f64().unwrap(), betas[1].as_f64().unwrap()],
                eps: recipe["eps"].as_f64().unwrap(),
                weight_decay: recipe["weight_decay"].as_f64().unwrap(),
            };
            let lr = recipe["lr"].as_f64().unwrap();
            let mut state = OptimizerState::default();
            let mut worst_loss = 0.0f64;
            for (step, &w) in want.iter().enumerate() {
                let out = tm.run(&weights, [&ids, &pos, &labels], Terms::MAIN, Precision::F32).unwrap();
                let d = (out.loss - w).abs();
                worst_loss = worst_loss.max(d);
                assert!(d <= 1e-4, "{case} {layout}: step {} loss {} vs torch {w}", step + 1, out.loss);
                let mut grads = out.grads;
                clip_grad_norm(&mut grads, recipe["grad_clip"].as_f64().unwrap());
                adamw.step(lr, &mut state, &mut weights, &grads, &|_| false).unwrap();
            }
            let ours = hub_tensors(weights);
            let mut worst = (0.0f64, String::new());
            for (name, want) in &final_ref {
                let got = ours.get(name).unwrap_or_else(|| panic!("{case}: no tensor `{name}`"));
                let e = rel_frobenius(got, want);
                if e > worst.0 {
                    worst = (e, name.clone());
                }
                assert!(e <= 1e-3, "{case} {layout}: {name} after 5 steps off by {e:.2e}");
            }
            println!("{case:<18} {layout:<20} worst loss |Δ| {worst_loss:.1e}  worst final tensor {:.2e} ({})", worst.0, worst.1);
        }
    }
}

/// `dsc grad` writes every checkpoint tensor's gradient under its hub name (per-expert
/// layout, zeros for the selection bias) and `loss`: transformers' `grads.safetensors`.
#[test]
fn dsc_grad_writes_the_checkpoints_gradients() {
    use dsc_compiler::passes::autodiff::Recompute;
    use dsc_runtime::cli::grad::{grad_cmd, GradArgs};
    let case = "deepseek_v3";
    let out = std::env::temp_dir().join(format!("dsc-grad-{}.safetensors", std::process::id()));
    let args = GradArgs {
        model: dir(case),
        spec: None,
        input: dir(case).join("input_ids.json"),
        out: out.clone(),
        backend: "reference".into(),
        mtp: false,
        aux: false,
        recompute: Recompute::Mla,
    };
    grad_cmd(&args).unwrap();
    let got = load_safetensors(&std::fs::read(&out).unwrap()).unwrap();
    let want = load_safetensors(&std::fs::read(dir(case).join("grads.safetensors")).unwrap()).unwrap();
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names, "the same tensors as transformers' gradients");
    for (name, w) in &want {
        let e = rel_frobenius(&got[name], w);
        assert!(e <= 1e-3 || (name == "loss" && (got[name].get_flat(0) - w.get_flat(0)).abs() < 1e-5), "{name}: {e:.2e}");
    }
    // A wrong backend is a usage error, not a silent reference run.
    let e = grad_cmd(&GradArgs { backend: "metal".into(), ..args }).unwrap_err();
    assert!(e.contains("gradients run on reference or wgpu"), "{e}");
    let _ = std::fs::remove_file(&out);
}

/// Every fixture's train graph on the wgpu adapter (lavapipe in CI), kernel by kernel
/// from the same plan `dsc compile --target wgpu --mode train` writes (MLA, routed and
/// shared experts, sigmoid routing with groups): the loss within 1e-5 of transformers'
/// and every gradient within 1e-3 relative, the tolerances the reference backend meets.
/// Also through `dsc grad --backend wgpu`.
#[test]
fn gradients_on_wgpu_match_pytorch() {
    device_gradients_match_pytorch(dsc_runtime::wgpu::exec::WgpuEngine::new);
}

/// The same on CUDA device 0 (feature `cuda`; run where a GPU is lent).
#[cfg(feature = "cuda")]
#[test]
fn gradients_on_cuda_match_pytorch() {
    device_gradients_match_pytorch(|| dsc_runtime::cuda::CudaEngine::new(0).unwrap_or_else(|e| panic!("{e}")));
}

/// Every fixture's loss and gradients from its train plan on the engines `engine` makes.
fn device_gradients_match_pytorch<D>(engine: impl Fn() -> dsc_runtime::plan_exec::PlanEngine<D>)
where
    D: dsc_runtime::plan_exec::Device + Send + Sync,
    D::Buf: Send,
{
    use dsc_compiler::ir::Mode;
    use dsc_runtime::generate::Engine;
    for case in CASES {
        // One engine per model: an engine keeps its weights by checkpoint name.
        let engine = engine();
        let reference = load_safetensors(&std::fs::read(dir(case).join("grads.safetensors")).unwrap()).unwrap();
        let md = ModelDir::open(&dir(case), &OpenOptions::default()).unwrap_or_else(|e| panic!("{case}: {e}"));
        let tm = TrainModel::compile(&md.spec, TrainOptions::default(), &PassSelection::default()).unwrap();
        let plan = engine.prepare(&tm.module, Mode::Train).unwrap_or_else(|e| panic!("{case}: {e}"));
        let [ids, pos, labels] = fixture_batch(case);
        let out = tm.run_on(&engine, &plan, &md.weights, [&ids, &pos, &labels], Terms::MAIN).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want_loss = reference["loss"].get_flat(0);
        assert!((out.loss - want_loss).abs() <= 1e-5, "{case}: loss {} vs {want_loss}", out.loss);
        let ours = hub_tensors(out.grads);
        let mut worst = (0.0f64, String::new());
        for (name, want) in reference.iter().filter(|(n, _)| *n != "loss") {
            // No gradient only for the selection bias (transformers gives zeros).
            let zeros = Tensor::zeros(want.shape());
            let got = ours.get(name).unwrap_or_else(|| {
                assert!(name.ends_with("e_score_correction_bias"), "{case}: no gradient for `{name}`");
                &zeros
            });
            let e = rel_frobenius(got, want);
            if e > worst.0 {
                worst = (e, name.clone());
            }
            assert!(e <= 1e-3, "{case}: gradient of {name} off by {e:.2e} on {}", D::NAME);
        }
        println!("{case:<12} {}: loss |Δ| {:.1e}  worst gradient {:.2e} ({})", D::NAME, (out.loss - want_loss).abs(), worst.0, worst.1);
    }
}

/// `dsc grad --backend wgpu` on DeepSeek-V3 writes transformers' gradients.
#[test]
fn dsc_grad_on_wgpu() {
    use dsc_runtime::cli::grad::{grad_cmd, GradArgs};
    let out = std::env::temp_dir().join(format!("dsc-grad-wgpu-{}.safetensors", std::process::id()));
    let args = GradArgs {
        model: dir("deepseek_v3"),
        spec: None,
        input: dir("deepseek_v3").join("input_ids.json"),
        out: out.clone(),
        backend: "wgpu".into(),
        mtp: false,
        aux: false,
        recompute: dsc_compiler::passes::autodiff::Recompute::None,
    };
    grad_cmd(&args).unwrap();
    let got = load_safetensors(&std::fs::read(&out).unwrap()).unwrap();
    let want = load_safetensors(&std::fs::read(dir("deepseek_v3").join("grads.safetensors")).unwrap()).unwrap();
    for (name, w) in &want {
        let e = rel_frobenius(&got[name], w);
        assert!(
            e <= 1e-3 || (name == "loss" && (got[name].get_flat(0) - w.get_flat(0)).abs() < 1e-5),
            "dsc grad --backend wgpu: {name}: {e:.2e}"
        );
    }
    let _ = std::fs::remove_file(&out);
}

/// `dsc train grpo` on the replayed rollouts of `golden/grpo/<case>/` (2 prompts × G = 4,
/// three steps on the same batch, β 0.04, ε 0.2, `loss_type: grpo`, group scaling, the
/// SFT fixtures' AdamW and clipping): the objective before each step within 1e-5 of
/// torch's (`losses.json`) and every tensor after step 3 within 1e-3 relative of
/// `final.safetensors`. Step 1's objective is 0 (the advantages of a group sum to 0, the
/// KL is 0); steps 2 and 3 see the ratio and the KL move.
#[test]
fn grpo_on_replayed_rollouts_matches_pytorch() {
    use dsc_runtime::cli::train::{grpo_cmd, SftArgs};
    use dsc_runtime::train::metrics::Display;
    // The policy's passes on the reference interpreter, and on wgpu (lavapipe) from plans.
    for (case, backend) in ["llama_gqa", "deepseek_v2_lite", "deepseek_v3"].into_iter().flat_map(|c| [(c, "reference"), (c, "wgpu")]) {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/grpo").join(case);
        let recipe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden.join("recipe.json")).unwrap()).unwrap();
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden.join("losses.json")).unwrap()).unwrap();
        let scratch = std::env::temp_dir().join(format!("dsc-grpo-parity-{case}-{backend}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        let yaml = format!(
            "model: {}\nrollouts_from: {}\nout: {}\nsteps: {}\nprompts_per_step: 2\nnum_generations: {}\nmax_completion_length: 8\n\
             loss_type: {}\nscale_rewards: {}\nepsilon: {}\nbeta: {}\nnum_iterations: {}\n\
             optimizer: {{lr: {}, betas: {}, eps: {}, weight_decay: {}}}\ngrad_clip: {}\naux_loss: false\nbias_update: false\nshuffle: false\nbackend: {backend}\n",
            dir(case).display(),
            golden.join("rollouts.jsonl").display(),
            scratch.join("run").display(),
            recipe["steps"],
            recipe["G"],
            recipe["loss_type"].as_str().unwrap(),
            recipe["scale_rewards"].as_str().unwrap(),
            recipe["epsilon"],
            recipe["beta"],
            recipe["num_iterations"],
            recipe["lr"],
            recipe["betas"],
            recipe["eps"],
            recipe["weight_decay"],
            recipe["grad_clip"],
        );
        let path = scratch.join("grpo.yaml");
        std::fs::write(&path, yaml).unwrap();
        let summary = grpo_cmd(&SftArgs { config: path, resume: None }, Display::Quiet, None).unwrap_or_else(|e| panic!("{case}: {e}"));
        let final_dir = summary.final_dir.expect("the run completes");
        let metrics = std::fs::read_to_string(scratch.join("run/metrics.jsonl")).unwrap();
        let got: Vec<f64> =
            metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect();
        let want_losses: Vec<f64> = want["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want_losses.len(), "{case}: one metrics line per step");
        let mut worst_loss = 0.0f64;
        for (k, (g, w)) in got.iter().zip(&want_losses).enumerate() {
            worst_loss = worst_loss.max((g - w).abs());
            assert!((g - w).abs() <= 1e-5, "{case}: step {} objective {g} vs torch {w}", k + 1);
        }
        let final_ref = load_safetensors(&std::fs::read(golden.join("final.safetensors")).unwrap()).unwrap();
        let ours = load_safetensors(&std::fs::read(final_dir.join("model.safetensors")).unwrap()).unwrap();
        let mut worst = (0.0f64, String::new());
        for (name, want) in &final_ref {
            let got = ours.get(name).unwrap_or_else(|| panic!("{case}: no tensor `{name}`"));
            let e = rel_frobenius(got, want);
            if e > worst.0 {
                worst = (e, name.clone());
            }
            assert!(e <= 1e-3, "{case}: {name} after 3 GRPO steps off by {e:.2e}");
        }
        println!(
            "{case:<18} {backend:<9} GRPO replay: worst objective |Δ| {worst_loss:.1e}, worst final tensor {:.2e} ({})",
            worst.0, worst.1
        );
        let _ = std::fs::remove_dir_all(&scratch);
    }
}

/// Five SFT steps of every fixture with the objective `backend: wgpu` builds (the train
/// graph's plan on lavapipe; the weights and AdamW's state on the device from the first
/// step to the last, the optimizer run there): every loss within 1e-4 of torch's, every
/// final tensor within 1e-3. After the first step's upload no weight crosses the host
/// link again, and a step moves a small fraction of the weights' bytes (the batch in;
/// the losses and the gradient norm's partial sums out).
#[test]
fn five_sft_steps_on_wgpu_match_pytorch() {
    five_sft_steps_on("wgpu");
}

/// The same on CUDA device 0 (feature `cuda`; no device fails the test).
#[cfg(feature = "cuda")]
#[test]
fn five_sft_steps_on_cuda_match_pytorch() {
    five_sft_steps_on("cuda");
}

fn five_sft_steps_on(backend: &str) {
    use dsc_runtime::train::objective::{objective, ObjectiveOptions};
    use dsc_runtime::train::optim::{clip_coef, AdamW, OptimizerState};
    use dsc_runtime::train::Batch;
    use std::collections::HashSet;
    for case in CASES {
        let recipe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir(case).join("sft/recipe.json")).unwrap()).unwrap();
        let losses: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir(case).join("sft/losses.json")).unwrap()).unwrap();
        let want: Vec<f64> = losses["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let final_ref = load_safetensors(&std::fs::read(dir(case).join("sft/final.safetensors")).unwrap()).unwrap();
        let md = ModelDir::open(&dir(case), &OpenOptions::default()).unwrap();
        let mut weights: std::collections::HashMap<String, Tensor> =
            md.weights.names().into_iter().map(|n| (n.to_string(), md.weights.get(n).unwrap().clone())).collect();
        let weight_bytes: u64 = weights.values().map(|t| 4 * t.numel() as u64).sum();
        let options = ObjectiveOptions {
            mtp: false,
            mtp_stop_gradient: false,
            aux_loss: false,
            bias_update: false,
            recompute: Default::default(),
            backend: backend.into(),
        };
        let mut obj = objective(&md.spec, &options).unwrap_or_else(|e| panic!("{case}: {e}"));
        let [ids, pos, labels] = fixture_batch(case);
        let batch = Batch { input_ids: ids, positions: pos, labels, tokens: 0, lengths: vec![] };
        let betas = recipe["betas"].as_array().unwrap();
        let adamw = AdamW {
            betas: [betas[0].as_f64().unwrap(), betas[1].as_f64().unwrap()],
            eps: recipe["eps"].as_f64().unwrap(),
            weight_decay: recipe["weight_decay"].as_f64().unwrap(),
        };
        let mut state = OptimizerState::default();
        let none = HashSet::new();
        obj.device_state().expect("a device objective keeps its weights on the device").load(&weights, &state).unwrap();
        let mut after_first = None;
        for (step, &w) in want.iter().enumerate() {
            let out = obj.step(&weights, &batch).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!((out.loss - w).abs() <= 1e-4, "{case}: step {} loss {} vs torch {w}", step + 1, out.loss);
            assert!(out.grads.is_empty(), "{case}: the gradients came to the host");
            let d = obj.device_state().unwrap();
            let norm = d.grad_norm(&none).unwrap();
            d.adamw(&adamw, recipe["lr"].as_f64().unwrap(), clip_coef(norm, recipe["grad_clip"].as_f64().unwrap()), &none).unwrap();
            let c = d.counts();
            assert_eq!(
                c.weights_to_device,
                after_first.map_or(c.weights_to_device, |f: dsc_runtime::plan_exec::Counts| f.weights_to_device)
            );
            after_first.get_or_insert(c);
        }
        let (first, last) = (after_first.unwrap(), obj.device_state().unwrap().counts());
        let per_step = (last.to_device + last.to_host - first.to_device - first.to_host) / (want.len() as u64 - 1);
        eprintln!("{case}: {weight_bytes} bytes of weights; per step after the first {per_step} bytes over the host link");
        assert!(per_step * 20 < weight_bytes, "{case}: {per_step} bytes per step for {weight_bytes} bytes of weights");
        obj.device_state().unwrap().store(&mut weights, &mut state).unwrap();
        assert_eq!(state.params.values().map(|p| p.step).max(), Some(want.len() as u64), "{case}: AdamW's state came back");
        let ours = hub_tensors(weights);
        for (name, want) in &final_ref {
            let e = rel_frobenius(&ours[name], want);
            assert!(e <= 1e-3, "{case}: {name} after 5 steps on wgpu off by {e:.2e}");
        }
    }
}
