//! The supervised fine-tuning loop. Per step:
//!
//! 1. the next batch of the data ([`super::data::Loader`]);
//! 2. the objective's loss and gradients ([`Objective::step`]);
//! 3. the gradients clipped to `grad_clip` by their global norm;
//! 4. AdamW at the schedule's learning rate; the selection biases are not its to move;
//! 5. DeepSeek-V3's aux-loss-free balancing: each selection bias `b` of a layer moves by
//!    `γ·sign(mean_load − load_i)` (γ = `balance.bias_update_speed`), so overloaded
//!    experts become less likely to be chosen;
//! 6. a line of `metrics.jsonl`, and a checkpoint every `checkpoint_every` steps.
//!
//! Steps 3–5 run where the weights are: on the host, or on the device of an objective that
//! keeps them there ([`Objective::device_state`]; its host copies are brought up to date
//! before each checkpoint).
//!
//! At the end: `final/` and `loss.svg`. A resumed run loads the newest complete
//! checkpoint (weights, AdamW state, step, data cursor) and continues exactly as the
//! uninterrupted run would have: the same batches, the same numbers, bit for bit.

use super::checkpoint::{self, Loaded, ModelFiles, TrainerState};
use super::data::{Dataset, Loader};
use super::metrics::{self, Display, MetricsLog, Progress, StepMetrics};
use super::optim::{clip_coef, clip_grad_norm, grad_norm, with_f32_mut, OptimizerState};
use super::recipe::Recipe;
use super::{Objective, TrainError};
use crate::reference::Tensor;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

/// Everything a run needs besides its objective and starting point.
pub struct Run<'a> {
    pub recipe: &'a Recipe,
    /// Where checkpoints and metrics go (the recipe's `out`, or the `--resume` directory).
    pub run_dir: PathBuf,
    /// How checkpoints describe the model.
    pub files: ModelFiles,
    pub data: Dataset,
    /// γ of the aux-loss-free bias update; 0 turns it off.
    pub bias_update_speed: f64,
    pub display: Display,
    /// Stop after this step without writing `final/`, as an interrupted run would (tests).
    pub stop_after: Option<u64>,
}

/// Where a run starts.
pub enum Start {
    /// From these weights, at step 0.
    Fresh(HashMap<String, Tensor>),
    /// From a checkpoint.
    Resume(Box<Loaded>),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The step reached.
    pub step: u64,
    /// The loss of the last step taken (None when none was).
    pub last_loss: Option<f64>,
    /// `final/`, when the run completed.
    pub final_dir: Option<PathBuf>,
}

/// The selection-bias update speed γ of a spec (0 when it has none).
pub fn bias_update_speed(spec: &dsc_dsl::Spec) -> f64 {
    spec.model
        .ffn
        .iter()
        .filter_map(|b| match &b.kind {
            dsc_dsl::model::Ffn::Moe(m) if m.router.selection_bias => Some(m.balance.bias_update_speed),
            _ => None,
        })
        .fold(0.0, f64::max)
}

/// Params only the bias update moves.
fn is_selection_bias(name: &str) -> bool {
    name.ends_with(".e_score_correction_bias")
}

/// Runs the loop from `start` to the recipe's `steps`.
pub fn train(run: Run, start: Start, objective: &mut dyn Objective) -> Result<Summary, TrainError> {
    let r = run.recipe;
    let f = &r.file;
    std::fs::create_dir_all(&run.run_dir).map_err(|e| TrainError::io(&run.run_dir, e))?;
    let (mut weights, mut opt, mut loader, done) = match start {
        Start::Fresh(w) => {
            if let Some(c) = checkpoint::latest(&run.run_dir)? {
                return Err(TrainError::invalid(format!(
                    "{} already holds a run (`{}`): continue it with `--resume {}`, or set another `out`",
                    run.run_dir.display(),
                    c.display(),
                    run.run_dir.display()
                )));
            }
            let loader = Loader::new(run.data, f.batch_size as usize, f.shuffle, f.seed);
            (w, OptimizerState::default(), loader, 0)
        }
        Start::Resume(l) => {
            if l.state.recipe_hash != r.hash {
                return Err(TrainError::invalid(format!(
                    "{}: the run was made by another recipe (hash {}, `{}` is {}): resuming it with this one would not continue the same run",
                    l.dir.display(),
                    l.state.recipe_hash,
                    r.path.display(),
                    r.hash
                )));
            }
            let loader = Loader::resume(run.data, f.batch_size as usize, f.shuffle, l.state.cursor);
            (l.weights, l.optimizer, loader, l.state.step)
        }
    };
    // An objective that keeps the weights on a device starts from these.
    if let Some(d) = objective.device_state() {
        d.load(&weights, &opt)?;
    }
    let mut log = MetricsLog::open(&run.run_dir, (done > 0).then_some(done))?;
    let progress = Progress::new(run.display, done, f.steps);
    let state = |step, loader: &Loader| TrainerState { step, cursor: loader.cursor(), recipe_hash: r.hash.clone() };
    let mut last_loss = None;

    for step in done + 1..=f.steps {
        let batch = loader.next_batch();
        let t0 = Instant::now();
        let out = objective.step(&weights, &batch)?;
        if !out.loss.is_finite() {
            return Err(TrainError::invalid(format!("step {step}: the loss is {}; stopping before the update", out.loss)));
        }
        let frozen: HashSet<String> =
            weights.keys().filter(|n| is_selection_bias(n)).cloned().chain(out.expert_loads.iter().map(|(n, _)| n.clone())).collect();
        let lr = r.lr() * r.schedule.factor(step);
        let speed = run.bias_update_speed;
        let norm = match objective.device_state() {
            // The same update where the weights are: clip, AdamW, then the biases.
            Some(d) => {
                let norm = d.grad_norm(&frozen)?;
                d.adamw(&r.adamw, lr, f.grad_clip.map_or(1.0, |c| clip_coef(norm, c)), &frozen)?;
                for (name, loads) in out.expert_loads.iter().filter(|_| speed > 0.0) {
                    d.update_bias(name, loads, speed)?;
                }
                norm
            }
            None => {
                let mut grads = out.grads;
                grads.retain(|n, _| !frozen.contains(n));
                let norm = match f.grad_clip {
                    Some(c) => clip_grad_norm(&mut grads, c),
                    None => grad_norm(&grads),
                };
                r.adamw.step(lr, &mut opt, &mut weights, &grads, &|n| frozen.contains(n))?;
                for (name, loads) in out.expert_loads.iter().filter(|_| speed > 0.0) {
                    update_bias(&mut weights, name, loads, speed)?;
                }
                norm
            }
        };

        let mut load_balance = BTreeMap::new();
        for (name, loads) in &out.expert_loads {
            let layer = name.strip_prefix("model.layers.").and_then(|s| s.split('.').next()).and_then(|l| l.parse().ok());
            if let (Some(l), Some(ratio)) = (layer, metrics::balance_ratio(loads)) {
                load_balance.insert(l, ratio);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let loss = out.terms.iter().find(|(k, _)| k == "loss").map_or(out.loss, |t| t.1);
        let m = StepMetrics {
            step,
            loss,
            objective: out.loss,
            grad_norm: norm,
            lr,
            tokens: batch.tokens,
            tokens_per_s: if secs > 0.0 { batch.tokens as f64 / secs } else { 0.0 },
            terms: out.terms.into_iter().filter(|(k, _)| k != "loss").collect(),
            load_balance,
        };
        log.append(&m)?;
        progress.step(&m);
        last_loss = Some(loss);

        if f.checkpoint_every.is_some_and(|k| step % k == 0) && step < f.steps {
            if let Some(d) = objective.device_state() {
                d.store(&mut weights, &mut opt)?;
            }
            checkpoint::save(&run.run_dir, &format!("checkpoint-{step}"), &weights, &opt, &state(step, &loader), &run.files)?;
        }
        if run.stop_after == Some(step) {
            progress.finish();
            return Ok(Summary { step, last_loss, final_dir: None });
        }
    }
    progress.finish();
    let final_dir = if done < f.steps {
        if let Some(d) = objective.device_state() {
            d.store(&mut weights, &mut opt)?;
        }
        let d = checkpoint::save(&run.run_dir, "final", &weights, &opt, &state(f.steps, &loader), &run.files)?;
        metrics::plot(&run.run_dir, &metrics::read_curve(&run.run_dir.join(metrics::METRICS))?)?;
        Some(d)
    } else {
        None
    };
    Ok(Summary { step: f.steps.max(done), last_loss, final_dir })
}

/// `b_i += γ·sign(mean − load_i)`: DeepSeek-V3 §2.1.2, once per step.
pub fn update_bias(weights: &mut HashMap<String, Tensor>, name: &str, loads: &[f64], gamma: f64) -> Result<(), TrainError> {
    let Some(b) = weights.get_mut(name) else {
        return Err(TrainError::invalid(format!("the objective reported expert loads for `{name}`, which is not a weight")));
    };
    if b.numel() != loads.len() {
        return Err(TrainError::invalid(format!("`{name}` has {} experts, the objective reported {} loads", b.numel(), loads.len())));
    }
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    with_f32_mut(b, name, |v| {
        for (x, &load) in v.iter_mut().zip(loads) {
            let s = if mean > load {
                1.0
            } else if mean < load {
                -1.0
            } else {
                0.0
            };
            *x += (gamma * s) as f32;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::checkpoint::tests::scratch;
    use super::super::data::{Limits, IGNORE};
    use super::super::Batch;
    use super::super::StepOutput;
    use super::*;
    use std::path::Path;

    const BIAS: &str = "model.layers.0.mlp.gate.e_score_correction_bias";

    /// Linear regression of the next token on the current one, both /10:
    /// `pred = w₀ + w₁·x + b`, loss = mean (pred − y)² over the target positions. Expert
    /// loads: the real tokens by id mod 3.
    struct Toy {
        calls: u64,
    }

    impl Objective for Toy {
        fn step(&mut self, w: &HashMap<String, Tensor>, batch: &Batch) -> Result<StepOutput, TrainError> {
            self.calls += 1;
            let (ids, labels) = (batch.input_ids.to_i64_vec().unwrap(), batch.labels.to_i64_vec().unwrap());
            let s = batch.input_ids.shape()[1];
            let (wv, b) = (w["w"].to_f32_vec(), w["b"].to_f32_vec()[0]);
            let (mut loss, mut gw, mut gb, mut n) = (0.0f64, [0.0f64; 2], 0.0f64, 0.0f64);
            let mut loads = vec![0.0; 3];
            for (r, &len) in batch.lengths.iter().enumerate() {
                for i in 0..len {
                    loads[ids[r * s + i] as usize % 3] += 1.0;
                    if i + 1 < s && labels[r * s + i + 1] != IGNORE {
                        let x = ids[r * s + i] as f64 / 10.0;
                        let y = labels[r * s + i + 1] as f64 / 10.0;
                        let e = wv[0] as f64 + wv[1] as f64 * x + b as f64 - y;
                        loss += e * e;
                        gw[0] += 2.0 * e;
                        gw[1] += 2.0 * e * x;
                        gb += 2.0 * e;
                        n += 1.0;
                    }
                }
            }
            let grads = HashMap::from([
                ("w".to_string(), Tensor::f32(&[1, 2], vec![(gw[0] / n) as f32, (gw[1] / n) as f32])),
                ("b".to_string(), Tensor::f32(&[1], vec![(gb / n) as f32])),
            ]);
            Ok(StepOutput {
                loss: loss / n + 0.01,
                terms: vec![("loss".into(), loss / n), ("aux_loss".into(), 0.01)],
                grads,
                expert_loads: vec![(BIAS.into(), loads)],
            })
        }
    }

    fn toy_weights() -> HashMap<String, Tensor> {
        HashMap::from([
            ("w".to_string(), Tensor::f32(&[1, 2], vec![0.5, -0.3])),
            ("b".to_string(), Tensor::f32(&[1], vec![0.2])),
            (BIAS.to_string(), Tensor::zeros(&[3])),
        ])
    }

    fn setup(tag: &str, steps: u64) -> (PathBuf, Recipe, Dataset) {
        let dir = scratch(tag);
        // Counting sequences of different lengths and starts, some with masks.
        let mut data = String::new();
        for k in 0..10u64 {
            let ids: Vec<u64> = (k..k + 3 + k % 4).collect();
            let mask: Vec<u64> = ids.iter().enumerate().map(|(i, _)| (i as u64 + k) % 3).map(|m| (m != 0) as u64).collect();
            if k % 2 == 0 {
                data.push_str(&format!("{{\"input_ids\": {ids:?}, \"loss_mask\": {mask:?}}}\n"));
            } else {
                data.push_str(&format!("{{\"input_ids\": {ids:?}}}\n"));
            }
        }
        std::fs::write(dir.join("d.jsonl"), &data).unwrap();
        let text = format!(
            "spec: none.dsc\ndata: d.jsonl\nout: run\nsteps: {steps}\nbatch_size: 3\nseed: 5\n\
             optimizer: {{lr: 0.05, betas: [0.9, 0.95], weight_decay: 0.01}}\ngrad_clip: 0.5\n\
             schedule: {{kind: cosine, warmup_steps: 2, min_lr_ratio: 0.1}}\ncheckpoint_every: 4\n"
        );
        let recipe = Recipe::parse(&dir.join("r.yaml"), &text).unwrap();
        let data = Dataset::load(&recipe.data, Limits::default()).unwrap();
        (dir, recipe, data)
    }

    fn run<'a>(recipe: &'a Recipe, data: &Dataset, files: ModelFiles, stop_after: Option<u64>) -> Run<'a> {
        Run {
            recipe,
            run_dir: recipe.out.clone(),
            files,
            data: data.clone(),
            bias_update_speed: 0.001,
            display: Display::Quiet,
            stop_after,
        }
    }

    fn losses(dir: &Path) -> Vec<(u64, u64)> {
        metrics::read_curve(&dir.join(metrics::METRICS)).unwrap().iter().map(|c| (c.0, c.1.to_bits())).collect()
    }

    #[test]
    fn the_loss_goes_down_and_the_bias_moves() {
        let (dir, recipe, data) = setup("down", 40);
        let mut toy = Toy { calls: 0 };
        let s = train(run(&recipe, &data, ModelFiles::default(), None), Start::Fresh(toy_weights()), &mut toy).unwrap();
        assert_eq!((s.step, toy.calls), (40, 40));
        let curve = metrics::read_curve(&recipe.out.join(metrics::METRICS)).unwrap();
        let first: f64 = curve[..5].iter().map(|c| c.1).sum();
        let last: f64 = curve[35..].iter().map(|c| c.1).sum();
        assert!(last < first * 0.3, "{first} → {last}");
        // The schedule: warmup then cosine down to 10%.
        assert_eq!((curve[0].2, curve[1].2), (0.025, 0.05));
        assert!((curve[39].2 - 0.005).abs() < 1e-12);
        // Token 0 mod 3 … each bias entry moved by ±γ per step, at most 40 γ.
        let fin = checkpoint::load(&recipe.out.join("final")).unwrap();
        let bias = fin.weights[BIAS].to_f32_vec();
        assert!(bias.iter().any(|&b| b != 0.0) && bias.iter().all(|b| b.abs() <= 0.0401), "{bias:?}");
        assert!(!fin.optimizer.params.contains_key(BIAS), "AdamW never touches the selection bias");
        assert_eq!(fin.state.step, 40);
        let line: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(recipe.out.join(metrics::METRICS)).unwrap().lines().next().unwrap()).unwrap();
        assert!(line["aux_loss"].as_f64() == Some(0.01) && line["load_balance"]["0"].as_f64().unwrap() >= 1.0, "{line}");
        assert!(recipe.out.join(metrics::PLOT).is_file());

        // Starting again in the same directory is refused; resuming a finished run does nothing.
        let e = train(run(&recipe, &data, ModelFiles::default(), None), Start::Fresh(toy_weights()), &mut toy).unwrap_err();
        assert!(e.to_string().contains("--resume"), "{e}");
        let l = checkpoint::load(&checkpoint::latest(&recipe.out).unwrap().unwrap()).unwrap();
        let s = train(run(&recipe, &data, ModelFiles::default(), None), Start::Resume(Box::new(l)), &mut toy).unwrap();
        assert_eq!((s.step, s.final_dir, toy.calls), (40, None, 40));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Stopped after step 6 (last checkpoint at 4), resumed: the same losses, bit for bit,
    /// and the same final weights and optimizer state as a run that never stopped.
    #[test]
    fn a_resumed_run_is_the_uninterrupted_run() {
        let (dir_a, recipe_a, data) = setup("whole", 13);
        train(run(&recipe_a, &data, ModelFiles::default(), None), Start::Fresh(toy_weights()), &mut Toy { calls: 0 }).unwrap();

        let (dir_b, recipe_b, _) = setup("stopped", 13);
        assert_eq!(recipe_a.hash, recipe_b.hash);
        let s = train(run(&recipe_b, &data, ModelFiles::default(), Some(6)), Start::Fresh(toy_weights()), &mut Toy { calls: 0 }).unwrap();
        assert_eq!((s.step, s.final_dir), (6, None));
        assert_eq!(losses(&recipe_b.out).len(), 6);
        let latest = checkpoint::latest(&recipe_b.out).unwrap().unwrap();
        assert_eq!(latest, recipe_b.out.join("checkpoint-4"));
        let l = checkpoint::load(&latest).unwrap();
        train(run(&recipe_b, &data, ModelFiles::default(), None), Start::Resume(Box::new(l)), &mut Toy { calls: 0 }).unwrap();

        assert_eq!(losses(&recipe_b.out), losses(&recipe_a.out));
        let (a, b) = (checkpoint::load(&recipe_a.out.join("final")).unwrap(), checkpoint::load(&recipe_b.out.join("final")).unwrap());
        assert_eq!((a.weights, a.optimizer, a.state), (b.weights, b.optimizer, b.state));

        // A different recipe cannot continue the run.
        let other =
            Recipe::parse(&recipe_b.path, &std::fs::read_to_string(&recipe_b.path).unwrap_or_default().replace("seed: 5", "seed: 6"));
        if let Ok(other) = other {
            let l = checkpoint::load(&latest).unwrap();
            let e = train(run(&other, &data, ModelFiles::default(), None), Start::Resume(Box::new(l)), &mut Toy { calls: 0 });
            assert!(e.unwrap_err().to_string().contains("another recipe"));
        }
        let _ = std::fs::remove_dir_all(&dir_a);
        let _ = std::fs::remove_dir_all(&dir_b);
    }

    /// A checkpoint that fails halfway leaves no `checkpoint-N` and no temporary directory.
    #[test]
    fn checkpoints_appear_whole_or_not_at_all() {
        let (dir, recipe, data) = setup("atomic", 13);
        let broken = ModelFiles { extra: vec![("no/such/dir.json".into(), b"{}".to_vec())], ..ModelFiles::default() };
        let e = train(run(&recipe, &data, broken, None), Start::Fresh(toy_weights()), &mut Toy { calls: 0 }).unwrap_err();
        assert!(e.to_string().contains("dir.json"), "{e}");
        let mut names: Vec<String> =
            std::fs::read_dir(&recipe.out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, [metrics::METRICS], "steps 1-4 logged, nothing else");

        // Every checkpoint of a good run has every file.
        std::fs::remove_dir_all(&recipe.out).unwrap();
        train(run(&recipe, &data, ModelFiles::default(), None), Start::Fresh(toy_weights()), &mut Toy { calls: 0 }).unwrap();
        for d in ["checkpoint-4", "checkpoint-8", "checkpoint-12", "final"] {
            for f in [checkpoint::MODEL, checkpoint::OPTIMIZER, checkpoint::STATE, checkpoint::CONFIG, checkpoint::SPEC] {
                assert!(recipe.out.join(d).join(f).is_file(), "{d}/{f}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
