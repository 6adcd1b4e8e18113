//! `dsc train sft --config RECIPE.yaml [--resume RUN_DIR]`: supervised fine-tuning, and
//! `dsc train grpo --config RECIPE.yaml [--resume RUN_DIR]`: GRPO ([`crate::train::grpo`]).
//!
//! Opens what the recipe names (a hub model directory, or a spec and random weights),
//! checks the data against the model, builds the objective, and runs
//! [`crate::train::sft`]. With `--resume` the newest complete checkpoint of RUN_DIR is the
//! starting point and the run continues there.

use crate::checkpoint::{expected_params, ModelDir, OpenOptions};
use crate::reference::Tensor;
use crate::train::checkpoint::{self, ModelFiles};
use crate::train::data::{Dataset, Limits};
use crate::train::grpo::{self, recipe::GrpoRecipe, train::GrpoRun, train::GrpoSummary};
use crate::train::metrics::Display;
use crate::train::objective::{objective, ObjectiveOptions};
use crate::train::recipe::{Recipe, Source};
use crate::train::sft::{self, Run, Start};
use crate::train::{init, Objective, TrainError};
use clap::{Args, Subcommand};
use dsc_dsl::Spec;
use std::collections::HashMap;
use std::path::PathBuf;

/// `dsc train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub command: TrainCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum TrainCommand {
    /// Supervised fine-tuning on token ids (next-token cross-entropy on the masked tokens).
    Sft(SftArgs),
    /// GRPO with verifiable rewards: rollouts and training from one compiled model.
    Grpo(SftArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SftArgs {
    /// The recipe (YAML): model or spec, data, out, steps, batch_size, optimizer, schedule, ...
    #[arg(long)]
    pub config: PathBuf,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

pub fn train_cmd(args: &TrainArgs) -> Result<(), String> {
    match &args.command {
        TrainCommand::Sft(a) => sft_cmd(a, &|spec, opts| objective(spec, opts)).map_err(|e| e.to_string()),
        TrainCommand::Grpo(a) => grpo_cmd(a, Display::Auto, None).map(|_| ()).map_err(|e| e.to_string()),
    }
}

/// `dsc train grpo`; `stop_after` ends the run after that optimizer step as a kill would
/// (tests).
pub fn grpo_cmd(args: &SftArgs, display: Display, stop_after: Option<u64>) -> Result<GrpoSummary, TrainError> {
    let recipe = GrpoRecipe::load(&args.config)?;
    let f = &recipe.file;
    let opened = open_source(&recipe.base)?;
    let spec = &opened.spec;
    // Every weight the model has: the MTP modules too when the source has them (they are
    // carried to `final/` unchanged unless `mtp: true` trains them).
    let expected = expected_params(spec).map_err(TrainError::Unsupported)?;
    let in_source = |n: &str| opened.dir.as_ref().is_some_and(|d| d.weights.get(n).is_some());
    let wanted: HashMap<String, Vec<usize>> = expected
        .into_iter()
        .filter(|(n, e)| e.required || f.mtp || in_source(n) || matches!(recipe.base.source, Source::Spec { .. }))
        .map(|(n, e)| (n, e.shape))
        .collect();
    let (run_dir, start) = resume_or_start(args, &recipe.base, &opened, &wanted)?;
    let run = GrpoRun { recipe: &recipe, spec, run_dir, files: opened.files.clone(), display, stop_after };
    let summary = grpo::train::train(run, start)?;
    match &summary.final_dir {
        Some(d) => eprintln!("trained to step {}; model in {}", summary.step, d.display()),
        None if stop_after.is_some() => {}
        None => eprintln!("nothing to do: the run is at step {} of {}", summary.step, f.steps),
    }
    for (step, acc) in &summary.eval {
        eprintln!("held-out accuracy at step {step}: {:.1}%", 100.0 * acc);
    }
    Ok(summary)
}

/// The run directory and starting point: `--resume`'s newest checkpoint, or the recipe's
/// `out` and the starting weights.
fn resume_or_start(
    args: &SftArgs,
    recipe: &Recipe,
    opened: &Opened,
    wanted: &HashMap<String, Vec<usize>>,
) -> Result<(PathBuf, Start), TrainError> {
    Ok(match &args.resume {
        Some(dir) => {
            let Some(latest) = checkpoint::latest(dir)? else {
                return Err(TrainError::invalid(format!("{}: no complete checkpoint to resume from", dir.display())));
            };
            if dir != &recipe.out {
                eprintln!("note: resuming in {} (the recipe's `out` is {})", dir.display(), recipe.out.display());
            }
            let loaded = checkpoint::load(&latest)?;
            checkpoint::check_weights(&loaded.weights, wanted, &latest)?;
            eprintln!("resuming {} at step {}", latest.display(), loaded.state.step);
            (dir.clone(), Start::Resume(Box::new(loaded)))
        }
        None => (recipe.out.clone(), Start::Fresh(starting_weights(recipe, opened, wanted)?)),
    })
}

/// Builds an objective for a spec (the reference backend's, or a test's).
pub type MakeObjective<'a> = &'a dyn Fn(&Spec, &ObjectiveOptions) -> Result<Box<dyn Objective>, TrainError>;

/// `dsc train sft` with the objective from `make`.
pub fn sft_cmd(args: &SftArgs, make: MakeObjective) -> Result<(), TrainError> {
    let recipe = Recipe::load(&args.config)?;
    let f = &recipe.file;
    let opened = open_source(&recipe)?;
    let spec = &opened.spec;
    let options = ObjectiveOptions::resolve(&recipe, spec)?;
    // Before any weight is read: a model that cannot be trained fails at once.
    let mut objective = make(spec, &options)?;
    let data = Dataset::load(&recipe.data, Limits { vocab: Some(spec.model.vocab), max_seq_len: f.max_seq_len })?;

    // The weights trained: what inference reads, and the MTP modules when their loss is on.
    let expected = expected_params(spec).map_err(TrainError::Unsupported)?;
    let wanted: HashMap<String, Vec<usize>> =
        expected.into_iter().filter(|(_, e)| e.required || options.mtp).map(|(n, e)| (n, e.shape)).collect();

    let (run_dir, start) = resume_or_start(args, &recipe, &opened, &wanted)?;
    let run = Run {
        recipe: &recipe,
        run_dir,
        files: opened.files,
        data,
        bias_update_speed: if options.bias_update { sft::bias_update_speed(spec) } else { 0.0 },
        display: Display::Auto,
        stop_after: None,
    };
    let summary = sft::train(run, start, objective.as_mut())?;
    match (&summary.final_dir, summary.last_loss) {
        (Some(d), Some(loss)) => eprintln!("trained to step {}: loss {loss:.4}; model in {}", summary.step, d.display()),
        _ => eprintln!("nothing to do: the run is at step {} of {}", summary.step, f.steps),
    }
    Ok(())
}

/// The model a recipe starts from.
struct Opened {
    spec: Spec,
    /// The source directory (for `model:` recipes).
    dir: Option<ModelDir>,
    files: ModelFiles,
}

fn open_source(recipe: &Recipe) -> Result<Opened, TrainError> {
    let spec_model = recipe.file.spec_model.clone();
    match &recipe.source {
        Source::Model { dir, spec } => {
            // A directory dsc trained carries its spec, with the training-only settings
            // (balance losses, the bias update speed) that `config.json` cannot hold.
            let spec = spec.clone().or_else(|| Some(dir.join(checkpoint::SPEC)).filter(|p| p.is_file()));
            let md =
                ModelDir::open(dir, &OpenOptions { spec, spec_model, config: None }).map_err(|e| TrainError::invalid(e.to_string()))?;
            let config_path = dir.join("config.json");
            let text = std::fs::read_to_string(&config_path).map_err(|e| TrainError::io(&config_path, e))?;
            let config = serde_json::from_str(&text).map_err(|e| TrainError::invalid(format!("{}: {e}", config_path.display())))?;
            let extra = checkpoint::COPIED.iter().filter_map(|n| std::fs::read(dir.join(n)).ok().map(|b| (n.to_string(), b))).collect();
            let files = ModelFiles::new(&md.spec, config, extra);
            Ok(Opened { spec: md.spec.clone(), dir: Some(md), files })
        }
        Source::Spec { path, .. } => {
            let spec = dsc_dsl::load(path, spec_model.as_deref()).map_err(|f| TrainError::invalid(f.render()))?;
            let export = dsc_dsl::export::export_hf_config(&spec.model)
                .map_err(|e| TrainError::Unsupported(format!("{}: no Hugging Face config for this model: {e}", path.display())))?;
            let files = ModelFiles::new(&spec, export.config, Vec::new());
            Ok(Opened { spec, dir: None, files })
        }
    }
}

/// The weights of step 0: the source directory's, or random ones. MTP modules a hub
/// checkpoint leaves out (transformers drops them) start random when their loss is on.
fn starting_weights(recipe: &Recipe, opened: &Opened, wanted: &HashMap<String, Vec<usize>>) -> Result<HashMap<String, Tensor>, TrainError> {
    let seed = match recipe.source {
        Source::Spec { init_seed, .. } => init_seed,
        Source::Model { .. } => recipe.file.seed,
    };
    let mut out = HashMap::new();
    let mut fresh = Vec::new();
    for (name, shape) in wanted {
        let stored = opened.dir.as_ref().and_then(|d| d.weights.get(name));
        match stored {
            Some(t) => {
                out.insert(name.clone(), t.to_f32());
            }
            None => {
                if opened.dir.is_some() {
                    fresh.push(name.as_str());
                }
                out.insert(name.clone(), init::init_param(name, shape, seed));
            }
        }
    }
    if !fresh.is_empty() {
        fresh.sort();
        eprintln!("note: {} params are not in the model directory and start random: {}", fresh.len(), fresh.join(", "));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::objective::reference_objective;
    use crate::train::{Batch, StepOutput};
    use std::path::Path;

    /// Weight decay towards zero as the "loss": ½·0.01·|w|², gradient 0.01·w, for every
    /// weight but the selection biases; expert loads skewed to expert 0.
    struct Shrink;
    impl Objective for Shrink {
        fn step(&mut self, w: &HashMap<String, Tensor>, batch: &Batch) -> Result<StepOutput, TrainError> {
            let mut out = StepOutput::default();
            for (n, t) in w {
                if n.ends_with("e_score_correction_bias") {
                    let mut loads = vec![1.0; t.numel()];
                    loads[0] = batch.tokens as f64;
                    out.expert_loads.push((n.clone(), loads));
                    continue;
                }
                let v = t.to_f32_vec();
                out.loss += 0.005 * v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
                out.grads.insert(n.clone(), Tensor::f32(t.shape(), v.iter().map(|x| 0.01 * x).collect()));
            }
            out.terms.push(("loss".into(), out.loss));
            Ok(out)
        }
    }

    fn tiny(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(name)
    }

    fn write_recipe(dir: &Path, body: &str) -> PathBuf {
        std::fs::write(dir.join("d.jsonl"), "{\"input_ids\": [1, 2, 3, 4]}\n{\"input_ids\": [5, 6, 7], \"loss_mask\": [0, 1, 1]}\n")
            .unwrap();
        let p = dir.join("r.yaml");
        std::fs::write(&p, format!("data: d.jsonl\nout: run\nbatch_size: 2\n{body}")).unwrap();
        p
    }

    #[test]
    fn spec_run_trains_resumes_and_writes_an_openable_model() {
        let dir = crate::train::checkpoint::tests::scratch("cli");
        let r = write_recipe(&dir, &format!("spec: {}\ninit: {{seed: 1}}\nsteps: 3\ncheckpoint_every: 2\n", tiny("tiny_v3.dsc").display()));
        let args = SftArgs { config: r.clone(), resume: None };
        sft_cmd(&args, &|_, _| Ok(Box::new(Shrink))).unwrap();
        let out = dir.join("run");
        let md = ModelDir::open(&out.join("final"), &OpenOptions::default()).unwrap();
        let start = init::random_weights(&dsc_dsl::load(&tiny("tiny_v3.dsc"), None).unwrap(), 1).unwrap();
        let emb = "model.embed_tokens.weight";
        let (a, b) = (start[emb].get_flat(0), md.weights.get(emb).unwrap().get_flat(0));
        assert!(b.abs() < a.abs() && b * a > 0.0, "shrunk: {a} → {b}");
        // γ = 0.001 per step against the overloaded expert 0, +γ for the others.
        let bias = md.weights.get("model.layers.2.mlp.gate.e_score_correction_bias").unwrap().to_f32_vec();
        assert!((bias[0] + 0.003).abs() < 1e-6 && (bias[1] - 0.003).abs() < 1e-6, "{bias:?}");
        // The spec with its training-only settings travels with the weights.
        let spec_text = std::fs::read_to_string(out.join("final/spec.dsc")).unwrap();
        assert!(spec_text.contains("bias_update_speed = 0.001"), "{spec_text}");

        // Resume from a run cut back to checkpoint-2: the same final weights.
        std::fs::rename(out.join("final"), dir.join("final-a")).unwrap();
        let resume = SftArgs { config: r, resume: Some(out.clone()) };
        sft_cmd(&resume, &|_, _| Ok(Box::new(Shrink))).unwrap();
        let (a, b) = (checkpoint::load(&dir.join("final-a")).unwrap(), checkpoint::load(&out.join("final")).unwrap());
        assert_eq!(a.weights, b.weights);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The real objective (the autodiff'd tiny DeepSeek-V3: MLA, routed and shared
    /// experts, selection bias, MTP, balance loss): the loss falls, and a run stopped at
    /// a checkpoint and resumed gives the same losses and weights, bit for bit.
    #[test]
    fn real_gradients_train_and_resume_bit_for_bit() {
        train_and_resume("cli-real", "", &|spec, opts| reference_objective(spec, opts));
    }

    /// The same with the weights, AdamW's state and the bias update on a wgpu device: its
    /// checkpoints bring them to the host, and a resumed run continues on the device
    /// exactly as the run that never stopped; its losses are the reference backend's.
    #[cfg(feature = "wgpu")]
    #[test]
    fn device_training_resumes_bit_for_bit() {
        let (dev, _) = train_and_resume("cli-real-wgpu", "backend: wgpu\n", &|spec, opts| objective(spec, opts));
        let (host, _) = train_and_resume("cli-real-ref", "", &|spec, opts| reference_objective(spec, opts));
        for (a, b) in dev.iter().zip(&host) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "wgpu {dev:?} vs reference {host:?}");
        }
    }

    /// Six SFT steps of tiny_v3 with a checkpoint at 3, then the run resumed from
    /// checkpoint-3: the losses and final weights of both passes agree bit for bit.
    /// Returns the losses and the final weights.
    fn train_and_resume(tag: &str, extra: &str, make: MakeObjective) -> (Vec<f64>, HashMap<String, Tensor>) {
        let dir = crate::train::checkpoint::tests::scratch(tag);
        let body = format!(
            "spec: {}\ninit: {{seed: 3}}\nsteps: 6\ncheckpoint_every: 3\noptimizer: {{lr: 0.01}}\ngrad_clip: 0.5\n{extra}",
            tiny("tiny_v3.dsc").display()
        );
        let r = write_recipe(&dir, &body);
        let out = dir.join("run");
        sft_cmd(&SftArgs { config: r.clone(), resume: None }, make).unwrap();
        let losses = |path: &Path| -> Vec<f64> {
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
                .collect()
        };
        let first = losses(&out.join("metrics.jsonl"));
        assert_eq!(first.len(), 6);
        assert!(first[5] < first[0], "the loss falls: {first:?}");
        let weights_a = checkpoint::load(&out.join("final")).unwrap().weights;
        // Back to checkpoint-3 and on again.
        std::fs::remove_dir_all(out.join("final")).unwrap();
        sft_cmd(&SftArgs { config: r, resume: Some(out.clone()) }, make).unwrap();
        assert_eq!(losses(&out.join("metrics.jsonl")), first);
        assert_eq!(checkpoint::load(&out.join("final")).unwrap().weights, weights_a);
        let _ = std::fs::remove_dir_all(&dir);
        (first, weights_a)
    }

    /// Metrics lines without the wall-clock figures, which differ between two runs.
    fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let m = v.as_object_mut().unwrap();
                m.remove("gen_tokens_per_s");
                m.remove("train_tokens_per_s");
                v
            })
            .collect()
    }

    /// GRPO on generated rollouts with most of the recipe on: text prompts, three rewards,
    /// β > 0 with a moving reference, μ = 2, routing replay, held-out evaluation. Every
    /// step logs its figures; the first pass on each batch recomputes the rollout's
    /// log-probabilities; a run killed after step 2 and resumed is the uninterrupted run;
    /// `final/` opens as a model and, read back by another recipe, keeps the spec's
    /// training-only settings (the selection-bias update).
    #[test]
    fn grpo_generates_trains_and_resumes_exactly() {
        let dir = crate::train::checkpoint::tests::scratch("cli-grpo");
        let prompt = |a: u32, b: u32| format!("{{\"prompt\": \"{a}+{b}=\", \"answer\": \"{}\"}}\n", a + b);
        std::fs::write(dir.join("p.jsonl"), [(1, 2), (3, 4), (2, 2), (5, 1)].map(|(a, b)| prompt(a, b)).concat()).unwrap();
        std::fs::write(dir.join("e.jsonl"), [(1, 1), (4, 3), (6, 2)].map(|(a, b)| prompt(a, b)).concat()).unwrap();
        let body = |out: &str| {
            format!(
                "spec: {}\ninit: {{seed: 2}}\nprompts: p.jsonl\neval_prompts: e.jsonl\neval_every: 2\nout: {out}\nsteps: 4\n\
                 prompts_per_step: 2\nnum_generations: 4\nmax_completion_length: 6\nstop_tokens: [10]\n\
                 rewards: [{{name: exact_match, extract: whole}}, {{name: format, weight: 0.5}}, {{name: overlong, max_length: 6, cache: 2}}]\n\
                 beta: 0.04\nref_sync_steps: 2\nnum_iterations: 2\nrouting_replay: true\ncheckpoint_every: 2\n\
                 optimizer: {{lr: 1.0e-3}}\nseed: 5\n",
                tiny("tiny_v3.dsc").display()
            )
        };
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let a = write("a.yaml", body("run-a"));
        let summary = grpo_cmd(&SftArgs { config: a, resume: None }, Display::Quiet, None).unwrap();
        assert_eq!(summary.step, 4);
        assert_eq!(summary.eval.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 4]);
        let run_a = dir.join("run-a");
        let lines = metrics_lines(&run_a.join("metrics.jsonl"));
        assert_eq!(lines.len(), 4);
        for (i, l) in lines.iter().enumerate() {
            for k in [
                "loss",
                "reward",
                "reward_std",
                "rewards",
                "accuracy",
                "kl",
                "clip_ratio",
                "entropy",
                "completion_length",
                "grad_norm",
                "lr",
            ] {
                assert!(l.get(k).is_some(), "step {}: no `{k}` in {l}", i + 1);
            }
            // The first update on a batch (steps 1 and 3) recomputes what the rollout sampled.
            match l.get("logp_diff_max").and_then(|v| v.as_f64()) {
                Some(d) => assert!(i % 2 == 0 && d < 1e-4, "step {}: logp_diff_max {d}", i + 1),
                None => assert!(i % 2 == 1, "step {}: no logp_diff_max", i + 1),
            }
        }
        // Step 1 starts at the reference: KL 0; later steps have moved away from it.
        assert!(lines[0]["kl"].as_f64().unwrap().abs() < 1e-6 && lines[3]["kl"].as_f64().unwrap() > 0.0, "{lines:?}");
        assert!(run_a.join(grpo::train::PLOT).is_file() && run_a.join(grpo::train::EVAL).is_file());
        let init = init::random_weights(&dsc_dsl::load(&tiny("tiny_v3.dsc"), None).unwrap(), 2).unwrap();
        let fin = checkpoint::load(&run_a.join("final")).unwrap();
        assert!(fin.reference.is_some(), "beta > 0 keeps the reference");
        let q = "model.embed_tokens.weight";
        assert_ne!(fin.weights[q].to_f32_vec(), init[q].to_f32_vec(), "trained");
        ModelDir::open(&run_a.join("final"), &OpenOptions::default()).unwrap();

        // Killed after step 2 (its checkpoint written), then resumed.
        let b = write("b.yaml", body("run-b"));
        grpo_cmd(&SftArgs { config: b.clone(), resume: None }, Display::Quiet, Some(2)).unwrap();
        let run_b = dir.join("run-b");
        assert!(!run_b.join("final").exists());
        let resumed = grpo_cmd(&SftArgs { config: b, resume: Some(run_b.clone()) }, Display::Quiet, None).unwrap();
        assert_eq!(resumed.eval, summary.eval[2..]);
        assert_eq!(metrics_lines(&run_b.join("metrics.jsonl")), lines);
        assert_eq!(checkpoint::load(&run_b.join("final")).unwrap().weights, fin.weights);

        // Another recipe from `final/`: its spec.dsc (not config.json, which cannot hold
        // it) gives the bias update speed, so `bias_update: true` is accepted and moves
        // the selection bias.
        let c = write(
            "c.yaml",
            "model: run-a/final\nprompts: p.jsonl\nout: run-c\nsteps: 1\nprompts_per_step: 2\nnum_generations: 4\n\
             max_completion_length: 4\nrewards: [{name: exact_match, extract: whole}]\nbeta: 0\nbias_update: true\n"
                .into(),
        );
        grpo_cmd(&SftArgs { config: c, resume: None }, Display::Quiet, None).unwrap();
        let bias = "model.layers.2.mlp.gate.e_score_correction_bias";
        let after = checkpoint::load(&dir.join("run-c/final")).unwrap().weights;
        assert_ne!(after[bias].to_f32_vec(), fin.weights[bias].to_f32_vec(), "the selection bias moved");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// GRPO on wgpu: rollouts generated from the decode plan on the adapter, the policy's
    /// passes from theirs, on one engine whose device weights the optimizer updates in
    /// place. The weights change after every step (lr 1e-2), and each step's first pass
    /// recomputes what the rollout sampled: the two agree to 1e-3 on every step, which
    /// they would not if generation read the previous step's weights. The reference model
    /// (β > 0, synced every 2 steps) has its own device copies; a run killed after step 2
    /// and resumed from its checkpoint is the uninterrupted run.
    #[cfg(feature = "wgpu")]
    #[test]
    fn grpo_generates_and_trains_on_wgpu() {
        let dir = crate::train::checkpoint::tests::scratch("cli-grpo-wgpu");
        let prompt = |a: u32, b: u32| format!("{{\"prompt\": \"{a}+{b}=\", \"answer\": \"{}\"}}\n", a + b);
        std::fs::write(dir.join("p.jsonl"), [(1, 2), (3, 4), (2, 2), (5, 1)].map(|(a, b)| prompt(a, b)).concat()).unwrap();
        let body = |out: &str| {
            format!(
                "spec: {}\ninit: {{seed: 2}}\nprompts: p.jsonl\nout: {out}\nsteps: 4\nprompts_per_step: 2\nnum_generations: 4\n\
                 max_completion_length: 5\nrewards: [{{name: exact_match, extract: whole}}, {{name: format, weight: 0.5}}]\n\
                 beta: 0.04\nref_sync_steps: 2\ncheckpoint_every: 2\noptimizer: {{lr: 1.0e-2}}\nseed: 5\nbackend: wgpu\n",
                tiny("tiny_v3.dsc").display()
            )
        };
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let summary = grpo_cmd(&SftArgs { config: write("a.yaml", body("run-a")), resume: None }, Display::Quiet, None).unwrap();
        assert_eq!(summary.step, 4);
        let lines = metrics_lines(&dir.join("run-a/metrics.jsonl"));
        assert_eq!(lines.len(), 4);
        for (i, l) in lines.iter().enumerate() {
            let d = l["logp_diff_max"].as_f64().unwrap_or_else(|| panic!("step {}: no logp_diff_max in {l}", i + 1));
            assert!(d < 1e-3, "step {}: the rollout's log-probabilities are {d} away from the policy's", i + 1);
            assert!(l["loss"].as_f64().unwrap().is_finite() && l["grad_norm"].as_f64().unwrap() > 0.0, "{l}");
        }
        // KL 0 at the start; the reference moved at step 2, so step 3 starts near it again.
        assert!(lines[0]["kl"].as_f64().unwrap().abs() < 1e-6 && lines[1]["kl"].as_f64().unwrap() > 0.0, "{lines:?}");
        let fin = checkpoint::load(&dir.join("run-a/final")).unwrap();

        let b = write("b.yaml", body("run-b"));
        grpo_cmd(&SftArgs { config: b.clone(), resume: None }, Display::Quiet, Some(2)).unwrap();
        grpo_cmd(&SftArgs { config: b, resume: Some(dir.join("run-b")) }, Display::Quiet, None).unwrap();
        assert_eq!(metrics_lines(&dir.join("run-b/metrics.jsonl")), lines);
        let again = checkpoint::load(&dir.join("run-b/final")).unwrap();
        assert_eq!(again.weights, fin.weights);
        assert_eq!(again.optimizer, fin.optimizer);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The loop optimizes in the right direction: with top-k 2 sampling a random model picks
    /// between its two likeliest next tokens for a prompt about evenly; rewarding the second
    /// one, GRPO
    /// (through the rollouts, the rewards, the advantages, the gradient scattered into the
    /// train graph, routing replay and AdamW) makes it the one sampled nearly always. A sign
    /// error or a gradient landing on the wrong positions cannot pass this.
    #[test]
    fn grpo_raises_a_learnable_reward() {
        use crate::generate::{generate, CompileOptions, GenerateOptions, ReferenceBackend};
        let dir = crate::train::checkpoint::tests::scratch("cli-grpo-learn");
        let spec = dsc_dsl::load(&tiny("tiny_v3.dsc"), None).unwrap();
        let backend = ReferenceBackend::new(
            spec.clone(),
            init::random_weights(&spec, 4).unwrap(),
            CompileOptions::default(),
            crate::reference::Options::default(),
        );
        // A prompt whose two likeliest next tokens are printable ASCII: the answer is the
        // second. (One prompt: with several, pushing one answer up can push another
        // prompt's answer out of its top 2, where no sample finds it again.)
        let mut lines = String::new();
        for start in (40..120).step_by(7) {
            if !lines.is_empty() {
                break;
            }
            let prompt: Vec<i64> = (start..start + 4).collect();
            let opts = GenerateOptions { max_new_tokens: 1, keep_logits: true, ..GenerateOptions::default() };
            let logits = &generate(&backend, std::slice::from_ref(&prompt), &opts).unwrap().step_logits[0][0];
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            if order[..2].iter().all(|&t| (33..127).contains(&t)) {
                lines += &format!(
                    "{{\"prompt\": {prompt:?}, \"answer\": \"{}\"}}\n",
                    (order[1] as u8 as char).to_string().replace('\\', "\\\\").replace('"', "\\\"")
                );
            }
        }
        assert!(!lines.is_empty(), "no prompt found");
        std::fs::write(dir.join("p.jsonl"), lines).unwrap();
        let recipe = format!(
            "spec: {}\ninit: {{seed: 4}}\nprompts: p.jsonl\nout: run\nsteps: 30\nprompts_per_step: 1\nnum_generations: 16\n\
             max_completion_length: 1\nsampling: {{temperature: 1.0, top_k: 2}}\nrewards: [{{name: exact_match, extract: whole}}]\n\
             beta: 0\nrouting_replay: true\noptimizer: {{lr: 3.0e-3}}\n",
            tiny("tiny_v3.dsc").display()
        );
        std::fs::write(dir.join("r.yaml"), recipe).unwrap();
        grpo_cmd(&SftArgs { config: dir.join("r.yaml"), resume: None }, Display::Quiet, None).unwrap();
        let rewards: Vec<f64> = metrics_lines(&dir.join("run/metrics.jsonl")).iter().map(|l| l["reward"].as_f64().unwrap()).collect();
        let (first, last) = (rewards[..5].iter().sum::<f64>() / 5.0, rewards[25..].iter().sum::<f64>() / 5.0);
        assert!(first < 0.8 && last > 0.9, "reward {first:.2} → {last:.2}: {rewards:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_problem() {
        let dir = crate::train::checkpoint::tests::scratch("cli-err");
        // Data out of the vocabulary (256), a resume without checkpoints, an MTP loss without MTP.
        std::fs::write(dir.join("d2.jsonl"), "{\"input_ids\": [1, 999]}\n").unwrap();
        let r = write_recipe(&dir, &format!("spec: {}\nsteps: 3\n", tiny("tiny_llama.dsc").display()));
        std::fs::write(&r, std::fs::read_to_string(&r).unwrap().replace("d.jsonl", "d2.jsonl")).unwrap();
        let e = sft_cmd(&SftArgs { config: r.clone(), resume: None }, &|_, _| Ok(Box::new(Shrink))).unwrap_err().to_string();
        assert!(e.contains("d2.jsonl:1:") && e.contains("vocabulary size 256"), "{e}");
        let r = write_recipe(&dir, &format!("spec: {}\nsteps: 3\n", tiny("tiny_llama.dsc").display()));
        let e = sft_cmd(&SftArgs { config: r.clone(), resume: Some(dir.clone()) }, &|_, _| Ok(Box::new(Shrink))).unwrap_err();
        assert!(e.to_string().contains("no complete checkpoint"), "{e}");
        let r = write_recipe(&dir, &format!("spec: {}\nsteps: 3\nmtp: true\n", tiny("tiny_llama.dsc").display()));
        let e = sft_cmd(&SftArgs { config: r, resume: None }, &|_, _| Ok(Box::new(Shrink))).unwrap_err();
        assert!(e.to_string().contains("has no `mtp` section"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
