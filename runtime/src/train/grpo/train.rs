//! The GRPO loop (`dsc train grpo`): one compiled model generates the rollouts and is
//! trained on them, in one process, on one copy of the weights. Per generation batch:
//!
//! 1. **Prompts**: the next `prompts_per_step` prompts (shuffled per epoch), each repeated
//!    G = `num_generations` times; or the next groups of a logged-rollouts file.
//! 2. **Rollouts**: the decode graph (absorbed MLA latent cache) generates every completion
//!    in one left-padded batch, sampling at the recipe's temperature / top-p / top-k, and
//!    records each token's log-probability at that temperature (`logp_rollout`) and, with
//!    `routing_replay`, the experts every router chose.
//! 3. **Rewards**: each reward function scores every decoded completion; the reward is
//!    their weighted sum. With dynamic sampling, groups whose rewards are all equal carry
//!    no signal: they are dropped and more prompts generated in their place (at most
//!    `max_extra_batches` rounds).
//! 4. **Updates** (`num_iterations` μ of them on this batch, one optimizer step each):
//!    the train graph's forward gives `logp_π` of the completion tokens (its first pass
//!    with μ = 1 recomputes exactly what the rollout sampled from: the largest difference
//!    is logged as `logp_diff_max`); `logp_old` is the rollout's; `logp_ref` the
//!    reference policy's (β > 0). [`super::grpo_loss`] gives the loss and its gradient
//!    with respect to `logp_π`, which the differentiated train graph takes as the
//!    cotangent of its log-probabilities ([`TrainModel::run_policy`]). Then, as SFT:
//!    global-norm clipping, AdamW, the aux-loss-free bias update, a line of
//!    `metrics.jsonl`.
//! 5. The reference moves toward the policy every `ref_sync_steps`; held-out greedy
//!    accuracy every `eval_every`; a checkpoint every `checkpoint_every` (at the end of a
//!    generation batch).
//!
//! Randomness: the prompt order comes from the recipe's seed and the [`Cursor`] saved in
//! checkpoints; the sampler of generation batch k is seeded from `(seed, k, round)`, so a
//! resumed run draws exactly the completions the uninterrupted run would have.

use super::data::{decode_bytes, load_prompts, load_rollouts, LoggedGroup, Prompt, TrainRows};
use super::loss::{grpo_loss, GrpoBatch};
use super::recipe::{GrpoRecipe, Input};
use super::reward::{Reward, RewardInput, RewardKind};
use super::runner::{DeviceRunner, HostRunner, Runner};
use crate::generate::{generate, Backend, CompileOptions, Engine, GenerateOptions, Interpreter, ModelBackend};
use crate::reference::{Options, Tensor};
use crate::rng::SplitMix64;
use crate::sampling::Sampling;
use crate::train::checkpoint::{self, ModelFiles, TrainerState};
use crate::train::data::{Cursor, Order};
use crate::train::metrics::{self, balance_ratio, Display, MetricsLog, Progress};
use crate::train::model::{TrainHead, TrainModel};
use crate::train::optim::{clip_coef, clip_grad_norm, grad_norm, OptimizerState};
use crate::train::sft::{bias_update_speed, update_bias, Start};
use crate::train::TrainError;
use dsc_compiler::passes::autodiff::TrainOptions;
use dsc_compiler::passes::PassSelection;
use dsc_dsl::Spec;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

/// Held-out accuracy, one line per evaluation (step 0 is the starting model).
pub const EVAL: &str = "eval.jsonl";
/// Reward, accuracy and KL over the steps.
pub const PLOT: &str = "grpo.svg";

/// Everything a run needs besides its starting point.
pub struct GrpoRun<'a> {
    pub recipe: &'a GrpoRecipe,
    pub spec: &'a Spec,
    pub run_dir: PathBuf,
    pub files: ModelFiles,
    pub display: Display,
    /// Stop after this optimizer step without writing `final/` (tests of resume).
    pub stop_after: Option<u64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoSummary {
    pub step: u64,
    pub final_dir: Option<PathBuf>,
    /// (step, held-out accuracy) of every evaluation this run made.
    pub eval: Vec<(u64, f64)>,
    /// The last metrics line written.
    pub last: Option<Value>,
}

/// One scored completion.
struct Completion {
    group: usize,
    prompt: Vec<i64>,
    tokens: Vec<i64>,
    /// Per token: log-probability under the sampling policy, and its entropy (generated
    /// rollouts only).
    logp: Option<Vec<f64>>,
    entropy: Vec<f64>,
    truncated: bool,
    /// With routing replay: per router of the rollout, `[tokens, top_k]` experts.
    routing: Vec<(Option<u32>, usize, Vec<i32>)>,
    reward: f64,
    /// Each reward function's score, in recipe order.
    scores: Vec<f64>,
}

/// The reward functions of a recipe, by name, with their weights.
struct Rewards {
    parts: Vec<(String, f64, Box<dyn Reward>)>,
    /// Index of the first exact-match reward: what `accuracy` reports.
    exact: Option<usize>,
}

impl Rewards {
    fn new(recipe: &GrpoRecipe) -> Rewards {
        let specs = &recipe.file.rewards;
        let parts = specs.iter().map(|s| (s.build().name().to_string(), s.weight, s.build())).collect();
        let exact = specs.iter().position(|s| matches!(s.kind, RewardKind::ExactMatch { .. }));
        Rewards { parts, exact }
    }

    /// `(weighted sum, each score)` of one completion.
    fn score(&self, prompt: &Prompt, tokens: &[i64]) -> Result<(f64, Vec<f64>), TrainError> {
        let (p, c) = (decode_bytes(&prompt.ids), decode_bytes(tokens));
        let input = RewardInput { prompt: &p, completion: &c, completion_tokens: tokens.len(), answer: prompt.answer.as_deref() };
        let mut scores = Vec::new();
        for (_, _, r) in &self.parts {
            scores.push(r.score(&input).map_err(|e| TrainError::invalid(format!("prompt on line {}: {e}", prompt.line)))?);
        }
        Ok((self.parts.iter().zip(&scores).map(|((_, w, _), s)| w * s).sum(), scores))
    }
}

/// Where prompts come from.
enum Source {
    Prompts { prompts: Vec<Prompt>, order: Order },
    Rollouts { groups: Vec<LoggedGroup>, next: usize },
}

/// `(seed, batch, round)` → the sampler's seed for that generation.
fn sampler_seed(seed: u64, batch: u64, round: u64) -> u64 {
    let mut g = SplitMix64(seed ^ batch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
    g.next_u64()
}

/// Runs GRPO from `start` to the recipe's `steps` optimizer steps.
pub fn train(run: GrpoRun, start: Start) -> Result<GrpoSummary, TrainError> {
    // Rollouts are generated by the recipe's backend; the policy's passes run there too.
    match run.recipe.file.backend.as_str() {
        #[cfg(feature = "wgpu")]
        "wgpu" => train_on(run, start, crate::wgpu::exec::WgpuEngine::new(), DeviceRunner::new),
        #[cfg(feature = "cuda")]
        "cuda" => train_on(run, start, crate::cuda::CudaEngine::new(0).map_err(TrainError::Unsupported)?, DeviceRunner::new),
        _ => train_on(run, start, Interpreter::new(Options::default()), |_, _| Ok(HostRunner)),
    }
}

/// [`train`] with rollouts generated on `engine`, and the policy's passes and update run
/// by what `runner` makes for it.
fn train_on<E: Engine, R: Runner<E>>(
    run: GrpoRun,
    start: Start,
    engine: E,
    runner: impl FnOnce(&TrainModel, &E) -> Result<R, TrainError>,
) -> Result<GrpoSummary, TrainError> {
    let r = run.recipe;
    let f = &r.file;
    let spec = run.spec;
    let vocab = spec.model.vocab;
    std::fs::create_dir_all(&run.run_dir).map_err(|e| TrainError::io(&run.run_dir, e))?;

    // The policy: the spec's train entry with per-token log-probabilities at the sampling
    // temperature, differentiated; MTP modules only when their loss is on.
    let mut train_spec = spec.clone();
    if !f.mtp {
        train_spec.model.mtp = None;
    }
    let head = TrainHead::LogProbs { temperature: f.sampling.temperature as f64 };
    let opts = TrainOptions { recompute: f.recompute, mtp_stop_gradient: f.mtp_stop_gradient };
    let policy =
        TrainModel::compile_with(&train_spec, head, opts, &PassSelection::default(), f.routing_replay).map_err(TrainError::Unsupported)?;
    let mut runner = runner(&policy, &engine)?;
    if f.routing_replay && policy.replayed.is_empty() {
        return Err(TrainError::invalid(format!(
            "{}: `routing_replay: true`, but model `{}` has no MoE router",
            r.base.path.display(),
            spec.model.name
        )));
    }
    let gamma = match f.bias_update {
        Some(false) => 0.0,
        _ => bias_update_speed(spec),
    };
    if f.bias_update == Some(true) && gamma <= 0.0 {
        return Err(TrainError::invalid(format!(
            "{}: `bias_update: true`, but model `{}` sets no `balance {{ bias_update_speed }}`",
            r.base.path.display(),
            spec.model.name
        )));
    }

    let (weights, mut opt, cursor, done, reference) = match start {
        Start::Fresh(w) => {
            if let Some(c) = checkpoint::latest(&run.run_dir)? {
                return Err(TrainError::invalid(format!(
                    "{} already holds a run (`{}`): continue it with `--resume {}`, or set another `out`",
                    run.run_dir.display(),
                    c.display(),
                    run.run_dir.display()
                )));
            }
            let reference = (r.loss.beta > 0.0).then(|| w.clone());
            (w, OptimizerState::default(), Cursor { epoch: 0, index: 0, rng: f.seed }, 0, reference)
        }
        Start::Resume(l) => {
            if l.state.recipe_hash != r.base.hash {
                return Err(TrainError::invalid(format!(
                    "{}: the run was made by another recipe (hash {}, `{}` is {})",
                    l.dir.display(),
                    l.state.recipe_hash,
                    r.base.path.display(),
                    r.base.hash
                )));
            }
            let reference = match (r.loss.beta > 0.0, l.reference) {
                (false, _) => None,
                (true, Some(rf)) => Some(rf),
                (true, None) => {
                    return Err(TrainError::invalid(format!("{}: no `{}` for beta > 0", l.dir.display(), checkpoint::REFERENCE)))
                }
            };
            (l.weights, l.optimizer, l.state.cursor, l.state.step, reference)
        }
    };
    let mut reference = reference;
    let mut source = match &r.input {
        Input::Prompts(p) => {
            let prompts = load_prompts(p, vocab)?;
            let order = Order::new(prompts.len(), f.shuffle, cursor);
            Source::Prompts { prompts, order }
        }
        Input::Rollouts(p) => {
            let groups = load_rollouts(p, vocab)?;
            let max = f.max_completion_length as usize;
            if let Some(g) = groups.iter().find(|g| g.completions.iter().any(|c| c.completion.len() > max)) {
                return Err(TrainError::invalid(format!(
                    "{}: a completion of prompt {:?} is longer than `max_completion_length` = {max}",
                    p.display(),
                    g.prompt
                )));
            }
            Source::Rollouts { groups, next: cursor.index }
        }
    };
    let eval_prompts = r.eval_prompts.as_deref().map(|p| load_prompts(p, vocab)).transpose()?;
    let rewards = Rewards::new(r);

    // The one copy of the weights: the backend generates with them, the optimizer updates
    // them in place, the train graph reads them. On a device that copy is the device's
    // (the host copy is brought up to date for reference syncs and checkpoints).
    let mut backend = ModelBackend::with_engine(spec.clone(), weights, CompileOptions::default(), engine);
    if let Some(mut d) = runner.device_state(backend.engine()) {
        d.load(backend.weights(), &opt)?;
    }
    let mut log = MetricsLog::open(&run.run_dir, (done > 0).then_some(done))?;
    let mut eval_log = MetricsLog::open_named(&run.run_dir, EVAL, Some(done))?;
    let progress = Progress::new(run.display, done, f.steps);
    let mu = f.num_iterations;
    let mut summary = GrpoSummary { step: done, final_dir: None, eval: Vec::new(), last: None };

    let evaluate = |backend: &dyn Backend, step: u64, log: &mut MetricsLog| -> Result<Option<f64>, TrainError> {
        let Some(prompts) = &eval_prompts else { return Ok(None) };
        let (correct, total) = evaluate(backend, prompts, &rewards, f.max_completion_length as usize, &f.stop_tokens)?;
        let acc = correct as f64 / total.max(1) as f64;
        log.append_json(&json!({"step": step, "accuracy": acc, "correct": correct, "total": total}))?;
        Ok(Some(acc))
    };
    if done == 0 {
        if let Some(acc) = evaluate(&backend, 0, &mut eval_log)? {
            summary.eval.push((0, acc));
        }
    }

    let mut step = done;
    while step < f.steps {
        let batch_index = step / mu;
        // ---- rollouts and rewards
        let t_gen = Instant::now();
        let (completions, skipped) = match &mut source {
            Source::Prompts { prompts, order } => rollouts(&backend, r, prompts, order, &rewards, batch_index)?,
            Source::Rollouts { groups, next } => {
                let mut out = Vec::new();
                for g in 0..f.prompts_per_step as usize {
                    let group = &groups[(*next + g) % groups.len()];
                    for c in &group.completions {
                        out.push(Completion {
                            group: g,
                            prompt: group.prompt.clone(),
                            tokens: c.completion.clone(),
                            logp: None,
                            entropy: Vec::new(),
                            truncated: false,
                            routing: Vec::new(),
                            reward: c.reward,
                            scores: Vec::new(),
                        });
                    }
                }
                *next = (*next + f.prompts_per_step as usize) % groups.len();
                (out, 0)
            }
        };
        let gen_secs = t_gen.elapsed().as_secs_f64();
        let gen_tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();

        // ---- the batch as the policy sees it
        let width = f.max_completion_length as usize;
        let pairs: Vec<(&[i64], &[i64])> = completions.iter().map(|c| (c.prompt.as_slice(), c.tokens.as_slice())).collect();
        let rows = TrainRows::new(&pairs);
        let replay = replay_tensors(&policy.replayed, &completions, rows.seq)?;
        let mut args = vec![&rows.input_ids, &rows.positions, &rows.labels];
        args.extend(replay.iter());
        let mask: Vec<Vec<bool>> = completions.iter().map(|c| (0..width).map(|j| j < c.tokens.len()).collect()).collect();
        let logp_ref = match &reference {
            Some(w) => Some(rows.gather(&runner.ref_log_probs(backend.engine(), &policy, w, &args)?, width)),
            None => None,
        };
        let pad = |v: &[f64]| -> Vec<f64> {
            let mut row = v.to_vec();
            row.resize(width, 0.0);
            row
        };
        let mut logp_old: Option<Vec<Vec<f64>>> = completions.iter().map(|c| c.logp.as_deref().map(pad)).collect();

        for it in 0..mu.min(f.steps - step) {
            step += 1;
            let t_train = Instant::now();
            let logp_pi = rows.gather(&runner.log_probs(backend.engine(), &policy, backend.weights(), &args)?, width);
            // For μ = 1 the rollout sampled from this very policy: how far apart the two
            // computations of its log-probabilities are.
            let diff = (it == 0 && logp_old.is_some()).then(|| {
                let old = logp_old.as_ref().expect("checked");
                let mut worst = 0.0f64;
                for (i, m) in mask.iter().enumerate() {
                    for (j, &on) in m.iter().enumerate() {
                        if on {
                            worst = worst.max((old[i][j] - logp_pi[i][j]).abs());
                        }
                    }
                }
                worst
            });
            // Replayed rollouts have no sampling log-probabilities: the first pass's are
            // logp_old for every iteration on this batch.
            let old = logp_old.get_or_insert_with(|| logp_pi.clone()).clone();
            let batch = GrpoBatch {
                rewards: completions.iter().map(|c| c.reward).collect(),
                groups: Some(completions.iter().map(|c| c.group as u64).collect()),
                mask: mask.clone(),
                logp_pi,
                logp_old: Some(old),
                logp_ref: logp_ref.clone(),
                truncated: Some(completions.iter().map(|c| c.truncated).collect()),
                num_items_in_batch: None,
            };
            let out = grpo_loss(&r.loss, &batch).map_err(|e| TrainError::invalid(format!("step {step}: {}: {}", e.field, e.message)))?;
            let dlogp = rows.scatter(&out.grad_logp_pi);
            let (mtp_w, aux_w) = (if f.mtp { 1.0 } else { 0.0 }, if f.aux_loss { 1.0 } else { 0.0 });
            let pol = runner.run_policy(backend.engine(), &policy, backend.weights(), &args, &dlogp, mtp_w, aux_w)?;
            let objective = out.loss + mtp_w * pol.mtp_loss + aux_w * pol.aux_loss;
            if !objective.is_finite() {
                return Err(TrainError::invalid(format!("step {step}: the objective is {objective}; stopping before the update")));
            }

            // ---- the update, as SFT makes it, where the weights are
            let frozen: HashSet<String> = backend.weights().keys().filter(|n| n.ends_with(".e_score_correction_bias")).cloned().collect();
            let lr = r.base.lr() * r.base.schedule.factor(step);
            let bias = |l: &u32| format!("model.layers.{l}.mlp.gate.e_score_correction_bias");
            let on_device = runner.device_state(backend.engine()).is_some();
            let norm = if on_device {
                let mut d = runner.device_state(backend.engine()).expect("checked");
                let norm = d.grad_norm(&frozen)?;
                d.adamw(&r.base.adamw, lr, f.grad_clip.map_or(1.0, |c| clip_coef(norm, c)), &frozen)?;
                for (l, loads) in pol.loads.iter().filter(|_| gamma > 0.0) {
                    d.update_bias(&bias(l), loads, gamma)?;
                }
                norm
            } else {
                let mut grads = pol.grads;
                grads.retain(|n, _| !frozen.contains(n));
                let norm = match f.grad_clip {
                    Some(c) => clip_grad_norm(&mut grads, c),
                    None => grad_norm(&grads),
                };
                r.base.adamw.step(lr, &mut opt, backend.weights_mut(), &grads, &|n| frozen.contains(n))?;
                for (l, loads) in pol.loads.iter().filter(|_| gamma > 0.0) {
                    update_bias(backend.weights_mut(), &bias(l), loads, gamma)?;
                }
                norm
            };
            let mut load_balance = Map::new();
            for (l, loads) in &pol.loads {
                if let Some(b) = balance_ratio(loads) {
                    load_balance.insert(l.to_string(), num(b));
                }
            }
            let train_secs = t_train.elapsed().as_secs_f64();

            // ---- metrics
            let mut m = Map::new();
            m.insert("step".into(), step.into());
            m.insert("loss".into(), num(out.loss));
            if objective != out.loss {
                m.insert("objective".into(), num(objective));
            }
            let rs: Vec<f64> = completions.iter().map(|c| c.reward).collect();
            m.insert("reward".into(), num(mean(&rs)));
            m.insert("reward_std".into(), num(std(&rs)));
            let mut per = Map::new();
            for (k, (name, _, _)) in rewards.parts.iter().enumerate() {
                let s: Vec<f64> = completions.iter().filter_map(|c| c.scores.get(k).copied()).collect();
                if !s.is_empty() {
                    per.insert(name.clone(), json!({"mean": num(mean(&s)), "std": num(std(&s))}));
                }
            }
            if !per.is_empty() {
                m.insert("rewards".into(), Value::Object(per));
            }
            if let Some(k) = rewards.exact {
                let s: Vec<f64> = completions.iter().filter_map(|c| c.scores.get(k).copied()).collect();
                if !s.is_empty() {
                    m.insert("accuracy".into(), num(mean(&s)));
                }
            }
            if let Some(kl) = out.metrics.kl {
                m.insert("kl".into(), num(kl));
            }
            m.insert(
                "clip_ratio".into(),
                json!({"low": num(out.metrics.clip_ratio_low), "high": num(out.metrics.clip_ratio_high), "region": num(out.metrics.clip_ratio_region)}),
            );
            let ent: Vec<f64> = completions.iter().flat_map(|c| c.entropy.iter().copied()).collect();
            if !ent.is_empty() {
                m.insert("entropy".into(), num(mean(&ent)));
            }
            let lens: Vec<f64> = completions.iter().map(|c| c.tokens.len() as f64).collect();
            m.insert(
                "completion_length".into(),
                json!({"mean": num(mean(&lens)), "min": num(lens.iter().cloned().fold(f64::MAX, f64::min)), "max": num(lens.iter().cloned().fold(0.0, f64::max))}),
            );
            m.insert("truncated".into(), num(completions.iter().filter(|c| c.truncated).count() as f64 / completions.len().max(1) as f64));
            if let Some(d) = diff {
                m.insert("logp_diff_max".into(), num(d));
            }
            if skipped > 0 {
                m.insert("groups_skipped".into(), skipped.into());
            }
            m.insert("grad_norm".into(), num(norm));
            m.insert("lr".into(), num(lr));
            if it == 0 && gen_secs > 0.0 && logp_old.is_some() && matches!(r.input, Input::Prompts(_)) {
                m.insert("gen_tokens_per_s".into(), num(gen_tokens as f64 / gen_secs));
            }
            m.insert("train_tokens_per_s".into(), num(rows.tokens() as f64 / train_secs.max(1e-9)));
            if !load_balance.is_empty() {
                m.insert("load_balance".into(), Value::Object(load_balance));
            }

            // ---- reference sync, evaluation, checkpoint
            let batch_done = step % mu == 0 || step == f.steps;
            let syncs = f.ref_sync_steps.is_some_and(|k| step % k == 0) && reference.is_some();
            let saves = (batch_done && f.checkpoint_every.is_some_and(|k| step % k == 0) && step < f.steps) || step == f.steps;
            if syncs || saves {
                // Both read the weights on the host.
                let (engine, host) = backend.engine_and_host_weights();
                if let Some(mut d) = runner.device_state(engine) {
                    d.store(host, &mut opt)?;
                }
            }
            if let (Some(k), Some(rf)) = (f.ref_sync_steps, reference.as_mut()) {
                if step % k == 0 {
                    runner.reference_changed();
                    let a = f.ref_mixup_alpha as f32;
                    for (n, w) in rf.iter_mut() {
                        if let Some(p) = backend.weights().get(n) {
                            let (pv, mut rv) = (p.to_f32_vec(), w.to_f32_vec());
                            rv.iter_mut().zip(&pv).for_each(|(r, p)| *r = a * p + (1.0 - a) * *r);
                            *w = Tensor::f32(w.shape(), rv);
                        }
                    }
                }
            }
            if f.eval_every.is_some_and(|k| step % k == 0) || (step == f.steps && eval_prompts.is_some()) {
                if let Some(acc) = evaluate(&backend, step, &mut eval_log)? {
                    m.insert("eval_accuracy".into(), num(acc));
                    summary.eval.push((step, acc));
                }
            }
            let line = Value::Object(m);
            log.append_json(&line)?;
            let show = |k: &str| line.get(k).and_then(Value::as_f64).map_or(String::new(), |v| format!("  {k} {v:.3}"));
            progress.show(step, format!("loss {:.4}{}{}{}", out.loss, show("reward"), show("accuracy"), show("eval_accuracy")));
            summary.last = Some(line);
            summary.step = step;

            let cursor = match &source {
                Source::Prompts { order, .. } => order.cursor(),
                Source::Rollouts { next, .. } => Cursor { epoch: 0, index: *next, rng: 0 },
            };
            let state = TrainerState { step, cursor, recipe_hash: r.base.hash.clone() };
            if batch_done && f.checkpoint_every.is_some_and(|k| step % k == 0) && step < f.steps {
                let name = format!("checkpoint-{step}");
                checkpoint::save_with_reference(&run.run_dir, &name, backend.weights(), &opt, &state, &run.files, reference.as_ref())?;
            }
            if run.stop_after == Some(step) {
                progress.finish();
                return Ok(summary);
            }
            if step == f.steps {
                progress.finish();
                let d = checkpoint::save_with_reference(
                    &run.run_dir,
                    "final",
                    backend.weights(),
                    &opt,
                    &state,
                    &run.files,
                    reference.as_ref(),
                )?;
                summary.final_dir = Some(d);
                plot(&run.run_dir)?;
            }
        }
    }
    Ok(summary)
}

/// Generates and scores one batch of groups: `prompts_per_step` prompts × G, and with
/// dynamic sampling more rounds in place of groups without signal. Returns the
/// completions (groups numbered from 0) and how many groups were dropped.
fn rollouts(
    backend: &dyn Backend,
    r: &GrpoRecipe,
    prompts: &[Prompt],
    order: &mut Order,
    rewards: &Rewards,
    batch_index: u64,
) -> Result<(Vec<Completion>, usize), TrainError> {
    let f = &r.file;
    let g = f.num_generations as usize;
    let want = f.prompts_per_step as usize;
    let rounds = 1 + f.dynamic_sampling.as_ref().map_or(0, |d| d.max_extra_batches);
    let (mut kept, mut skipped) = (Vec::new(), 0);
    for round in 0..rounds {
        let mut picked = Vec::new();
        while picked.len() < want {
            picked.extend(order.take(want - picked.len()));
        }
        let batch: Vec<Vec<i64>> = picked.iter().flat_map(|&i| std::iter::repeat_n(prompts[i].ids.clone(), g)).collect();
        let s = &f.sampling;
        let opts = GenerateOptions {
            max_new_tokens: f.max_completion_length as usize,
            sampling: Sampling {
                temperature: s.temperature,
                top_k: (s.top_k > 0).then_some(s.top_k as usize),
                top_p: (s.top_p < 1.0).then_some(s.top_p),
                seed: sampler_seed(f.seed, batch_index, round),
            },
            stop: f.stop_tokens.clone(),
            pad: 0,
            logprobs: true,
            capture_routing: f.routing_replay,
            keep_logits: false,
        };
        let gen = generate(backend, &batch, &opts).map_err(|e| TrainError::invalid(format!("generating rollouts: {e}")))?;
        let mut groups: Vec<Vec<Completion>> = Vec::new();
        for (p, &pi) in picked.iter().enumerate() {
            let mut group = Vec::new();
            for k in 0..g {
                let row = p * g + k;
                let tokens = gen.tokens[row].clone();
                let stopped = tokens.last().is_some_and(|t| f.stop_tokens.contains(t));
                let (reward, scores) = rewards.score(&prompts[pi], &tokens)?;
                group.push(Completion {
                    group: 0,
                    prompt: prompts[pi].ids.clone(),
                    truncated: !stopped && tokens.len() >= f.max_completion_length as usize,
                    routing: gen.routing.iter().map(|t| (t.layer, t.top_k, t.experts[row].clone())).collect(),
                    tokens,
                    logp: Some(gen.logprobs[row].clone()),
                    entropy: gen.entropy[row].clone(),
                    reward,
                    scores,
                });
            }
            groups.push(group);
        }
        if f.dynamic_sampling.is_none() {
            kept = groups;
            break;
        }
        for group in groups {
            let signal = group.iter().any(|c| c.reward != group[0].reward);
            if signal && kept.len() < want {
                kept.push(group);
            } else if !signal {
                skipped += 1;
            }
        }
        if kept.len() >= want {
            break;
        }
        if round + 1 == rounds && kept.is_empty() {
            return Err(TrainError::invalid(format!(
                "dynamic sampling: no group of generation batch {} had differing rewards after {rounds} rounds; raise the temperature or `max_extra_batches`",
                batch_index + 1
            )));
        }
    }
    let mut out = Vec::new();
    for (i, group) in kept.into_iter().enumerate() {
        out.extend(group.into_iter().map(|c| Completion { group: i, ..c }));
    }
    Ok((out, skipped))
}

/// The experts each replayed router (`layers`, in the policy's argument order) chose for
/// every token of every completion during its rollout, as `i32 [rows, seq, top_k]`.
/// Positions the rollout never ran through the model (the last token, padding) get
/// experts `0..top_k`: nothing the loss reads depends on them.
fn replay_tensors(layers: &[u32], completions: &[Completion], seq: usize) -> Result<Vec<Tensor>, TrainError> {
    let mut out = Vec::new();
    for &layer in layers {
        let mut k = 0;
        for c in completions {
            if let Some((_, top_k, _)) = c.routing.iter().find(|r| r.0 == Some(layer)) {
                k = *top_k;
            }
        }
        if k == 0 {
            return Err(TrainError::invalid(format!("routing replay: the rollout recorded no experts for layer {layer}")));
        }
        let mut data = Vec::with_capacity(completions.len() * seq * k);
        for c in completions {
            let recorded = c.routing.iter().find(|r| r.0 == Some(layer)).map_or(&[][..], |r| r.2.as_slice());
            let n = (recorded.len() / k).min(seq);
            data.extend_from_slice(&recorded[..n * k]);
            for _ in n..seq {
                data.extend(0..k as i32);
            }
        }
        out.push(Tensor::i32(&[completions.len(), seq, k], data));
    }
    Ok(out)
}

/// Greedy completions of `prompts` scored by the recipe's exact-match reward:
/// (correct, total).
fn evaluate(
    backend: &dyn Backend,
    prompts: &[Prompt],
    rewards: &Rewards,
    max_len: usize,
    stop: &[i64],
) -> Result<(usize, usize), TrainError> {
    let k = rewards.exact.expect("the recipe checks that eval has an exact-match reward");
    let mut correct = 0;
    for chunk in prompts.chunks(64) {
        let ids: Vec<Vec<i64>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let opts = GenerateOptions { max_new_tokens: max_len, stop: stop.to_vec(), ..GenerateOptions::default() };
        let gen = generate(backend, &ids, &opts).map_err(|e| TrainError::invalid(format!("evaluating: {e}")))?;
        for (p, tokens) in chunk.iter().zip(&gen.tokens) {
            if rewards.score(p, tokens)?.1[k] > 0.5 {
                correct += 1;
            }
        }
    }
    Ok((correct, prompts.len()))
}

/// Writes `grpo.svg`: reward, rollout accuracy, held-out accuracy and KL over the steps
/// (the panels the run has data for).
pub fn plot(run_dir: &std::path::Path) -> Result<(), TrainError> {
    let path = run_dir.join(metrics::METRICS);
    let mut panels = Vec::new();
    for (key, title) in [("reward", "reward (mean over rollouts)"), ("accuracy", "rollout accuracy (exact match)")] {
        let s = metrics::read_series(&path, key)?;
        // With exact match the only reward, the accuracy panel would repeat the reward's.
        if !s.is_empty() && panels.iter().all(|(_, p)| *p != s) {
            panels.push((title, s));
        }
    }
    let eval = run_dir.join(EVAL);
    if eval.is_file() {
        let s = metrics::read_series(&eval, "accuracy")?;
        if !s.is_empty() {
            panels.push(("held-out accuracy (greedy)", s));
        }
    }
    let kl = metrics::read_series(&path, "kl")?;
    if !kl.is_empty() {
        panels.push(("KL to the reference (k3)", kl));
    }
    metrics::plot_panels(&run_dir.join(PLOT), &panels)
}

fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Population standard deviation (a description of the batch, not an estimate).
fn std(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}
