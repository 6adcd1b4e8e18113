//! The recipe of `dsc train grpo --config RECIPE.yaml`. It shares the model, optimizer,
//! schedule, checkpoint and MoE fields of `dsc train sft` (same names, same checks:
//! [`crate::train::recipe`]) and adds the rollout, reward and loss options, named as
//! TRL's `GRPOConfig` names them.
//!
//! ```yaml
//! spec: ../tiny/tiny_v3.dsc        # or model: DIR
//! prompts: data/prompts.jsonl       # {"prompt": [ids] or "text", "answer": "..."} per line
//! out: ../../runs/grpo
//! steps: 200
//! prompts_per_step: 8
//! num_generations: 8                # G
//! max_completion_length: 32
//! sampling: {temperature: 1.0, top_p: 1.0, top_k: 0}
//! rewards: [{name: exact_match, weight: 1.0}]
//! loss_type: grpo
//! beta: 0.04
//! ```

use super::loss::{GrpoConfig, ImportanceSamplingLevel, LossType, ScaleRewards};
use super::reward::{RewardKind, RewardSpec};
use crate::train::recipe::{at_line, fnv1a, yaml_error, InitFile, OptimizerFile, Recipe, RecipeFile, Recompute, ScheduleFile};
use crate::train::TrainError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A GRPO recipe as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoFile {
    /// The starting model, as in SFT: a hub directory, or `spec` (+ `init`) for random weights.
    #[serde(default)]
    pub model: Option<PathBuf>,
    #[serde(default)]
    pub spec: Option<PathBuf>,
    #[serde(default)]
    pub spec_model: Option<String>,
    #[serde(default)]
    pub init: Option<InitFile>,
    /// The prompts: one `{"prompt": [ids] or "text", "answer": ...}` per line. Text is
    /// tokenized byte by byte (token id = byte), the tokenizer of the character-level
    /// demos; completions are decoded the same way for the rewards.
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    /// Replay logged rollouts instead of generating: one `{"prompt": [ids], "completion":
    /// [ids], "reward": x, "group": k}` per completion. Each step takes the next
    /// `prompts_per_step` groups (cycling); logp_old is the current policy's and the
    /// reference is the starting model.
    #[serde(default)]
    pub rollouts_from: Option<PathBuf>,
    pub out: PathBuf,
    /// Generation batches (each followed by `num_iterations` optimizer steps).
    pub steps: u64,
    /// Prompts per generation batch (> 0).
    pub prompts_per_step: u64,
    /// Completions per prompt, G (≥ 2: a group of one has no relative advantage).
    pub num_generations: u64,
    /// The longest completion in tokens (> 0); a longer one is cut there and `truncated`.
    pub max_completion_length: u64,
    /// How rollouts sample: `{temperature, top_p, top_k}` (top_k 0 = off); the loss's
    /// log-probabilities are taken at the same temperature.
    #[serde(default)]
    pub sampling: SamplingFile,
    /// Token ids that end a completion (kept in it); default none.
    #[serde(default)]
    pub stop_tokens: Vec<i64>,
    /// The rewards and their weights (see [`RewardSpec`]); the scalar reward is their sum.
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
    #[serde(default = "grpo_name")]
    pub loss_type: String,
    #[serde(default = "group_name")]
    pub scale_rewards: String,
    #[serde(default = "token_name")]
    pub importance_sampling_level: String,
    #[serde(default = "clip")]
    pub epsilon: f64,
    /// Default: `epsilon`.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    #[serde(default)]
    pub delta: Option<f64>,
    #[serde(default = "beta")]
    pub beta: f64,
    /// μ: optimizer steps per generation batch, logp_old fixed from the rollout.
    #[serde(default = "one")]
    pub num_iterations: u64,
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// DAPO's dynamic sampling: drop groups whose rewards are all equal and generate more
    /// prompts in their place, at most `max_extra_batches` extra generation rounds.
    #[serde(default)]
    pub dynamic_sampling: Option<DynamicSamplingFile>,
    /// Move the reference toward the policy every this many steps:
    /// `ref ← α·policy + (1−α)·ref` (TRL's `ref_model_sync_steps`); default never.
    #[serde(default)]
    pub ref_sync_steps: Option<u64>,
    /// α of that update; default 0.6 (TRL's).
    #[serde(default = "mixup")]
    pub ref_mixup_alpha: f64,
    /// The training forward reuses the experts the rollout chose (verl's R3).
    #[serde(default)]
    pub routing_replay: bool,
    /// Greedy exact-match accuracy on these prompts (same format as `prompts`) at step 0,
    /// every `eval_every` steps and at the end, as `eval_accuracy`.
    #[serde(default)]
    pub eval_prompts: Option<PathBuf>,
    #[serde(default)]
    pub eval_every: Option<u64>,
    #[serde(default = "yes")]
    pub shuffle: bool,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "rl_optimizer")]
    pub optimizer: OptimizerFile,
    #[serde(default = "grad_clip")]
    pub grad_clip: Option<f64>,
    #[serde(default)]
    pub schedule: ScheduleFile,
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    #[serde(default = "reference")]
    pub backend: String,
    /// Add the MTP loss on the completions; default false in RL.
    #[serde(default)]
    pub mtp: bool,
    #[serde(default)]
    pub mtp_stop_gradient: bool,
    /// Add the spec's balance losses; default true.
    #[serde(default = "yes")]
    pub aux_loss: bool,
    /// The aux-loss-free bias update after each optimizer step; default: when the spec
    /// sets a speed.
    #[serde(default)]
    pub bias_update: Option<bool>,
    #[serde(default, with = "crate::train::recipe::recompute_name")]
    pub recompute: Recompute,
}

/// `sampling: {temperature, top_p, top_k}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingFile {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u64,
}

impl Default for SamplingFile {
    fn default() -> Self {
        SamplingFile { temperature: 1.0, top_p: 1.0, top_k: 0 }
    }
}

/// `dynamic_sampling: {max_extra_batches: N}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicSamplingFile {
    /// Extra generation rounds per step to replace groups without signal (default 2).
    #[serde(default = "two")]
    pub max_extra_batches: u64,
}

fn grpo_name() -> String {
    "grpo".into()
}
fn group_name() -> String {
    "group".into()
}
fn token_name() -> String {
    "token".into()
}
fn clip() -> f64 {
    0.2
}
fn beta() -> f64 {
    0.04
}
fn one() -> u64 {
    1
}
fn two() -> u64 {
    2
}
fn mixup() -> f64 {
    0.6
}
fn yes() -> bool {
    true
}
fn grad_clip() -> Option<f64> {
    Some(1.0)
}
fn reference() -> String {
    "reference".into()
}
/// TRL's GRPO defaults: lr 1e-6 is for billion-parameter models; ours 1e-5, betas (0.9,
/// 0.99), no weight decay, as the issue's recipe.
fn rl_optimizer() -> OptimizerFile {
    OptimizerFile { lr: 1e-5, betas: [0.9, 0.99], eps: 1e-8, weight_decay: 0.0 }
}

/// A checked GRPO recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoRecipe {
    /// The shared fields, checked as SFT checks them (`data` is the prompts or rollouts
    /// file, `batch_size` the prompts per step).
    pub base: Recipe,
    pub file: GrpoFile,
    pub loss: GrpoConfig,
    /// Where prompts come from.
    pub input: Input,
    pub eval_prompts: Option<PathBuf>,
}

/// Generated rollouts from prompts, or logged ones replayed.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompts(PathBuf),
    Rollouts(PathBuf),
}

impl GrpoRecipe {
    pub fn load(path: &Path) -> Result<GrpoRecipe, TrainError> {
        let text = dsc_dsl::files::read_text(path, dsc_dsl::files::TEXT_LIMIT).map_err(|e| TrainError::io(path, e))?;
        GrpoRecipe::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<GrpoRecipe, TrainError> {
        let file: GrpoFile = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
        let at = |key: &str, msg: String| at_line(path, text, key, msg);
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let rel = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base_dir.join(p) };
        let input = match (&file.prompts, &file.rollouts_from) {
            (Some(p), None) => Input::Prompts(rel(p)),
            (None, Some(r)) => Input::Rollouts(rel(r)),
            (Some(_), Some(_)) => {
                return Err(at("rollouts_from", "`prompts` and `rollouts_from` exclude each other: generate, or replay".into()))
            }
            (None, None) => {
                return Err(TrainError::invalid(format!(
                    "{}: no input: give `prompts: FILE.jsonl` (generate rollouts) or `rollouts_from: FILE.jsonl` (replay them)",
                    path.display()
                )))
            }
        };
        let hash = {
            let mut f = file.clone();
            f.out = PathBuf::new();
            fnv1a(serde_json::to_string(&f).expect("a recipe serialises").as_bytes())
        };
        let data = file.prompts.clone().or(file.rollouts_from.clone()).expect("checked above");
        let shared = RecipeFile {
            model: file.model.clone(),
            spec: file.spec.clone(),
            spec_model: file.spec_model.clone(),
            init: file.init.clone(),
            data,
            out: file.out.clone(),
            steps: file.steps,
            batch_size: file.prompts_per_step,
            shuffle: file.shuffle,
            seed: file.seed,
            optimizer: file.optimizer.clone(),
            grad_clip: file.grad_clip,
            schedule: file.schedule.clone(),
            checkpoint_every: file.checkpoint_every,
            backend: file.backend.clone(),
            mtp: Some(file.mtp),
            mtp_stop_gradient: file.mtp_stop_gradient,
            aux_loss: file.aux_loss,
            bias_update: file.bias_update,
            recompute: file.recompute,
            max_seq_len: None,
        };
        let base = Recipe::check(path, text, shared, hash).map_err(|e| match e {
            // The shared check says `batch_size`; this recipe calls it `prompts_per_step`.
            TrainError::Invalid(m) => TrainError::Invalid(m.replace("`batch_size`", "`prompts_per_step`")),
            e => e,
        })?;
        if file.num_generations < 2 {
            return Err(at(
                "num_generations",
                format!("`num_generations` must be at least 2 (a group of one has no relative advantage), found {}", file.num_generations),
            ));
        }
        if file.max_completion_length == 0 {
            return Err(at("max_completion_length", "`max_completion_length` must be positive, found 0".into()));
        }
        if file.num_iterations == 0 {
            return Err(at("num_iterations", "`num_iterations` must be positive, found 0".into()));
        }
        let s = &file.sampling;
        if !(s.temperature.is_finite() && s.temperature > 0.0) {
            return Err(at(
                "temperature",
                format!("`sampling.temperature` must be positive (RL samples; the loss divides by it), found {}", s.temperature),
            ));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(at("top_p", format!("`sampling.top_p` must be in (0, 1], found {}", s.top_p)));
        }
        if matches!(input, Input::Prompts(_)) && file.rewards.is_empty() {
            return Err(at("prompts", "generated rollouts need `rewards` to score them (e.g. `rewards: [{name: exact_match}]`)".into()));
        }
        if file.ref_sync_steps == Some(0) {
            return Err(at("ref_sync_steps", "`ref_sync_steps` must be positive, found 0".into()));
        }
        if !(0.0..=1.0).contains(&file.ref_mixup_alpha) {
            return Err(at("ref_mixup_alpha", format!("`ref_mixup_alpha` must be in [0, 1], found {}", file.ref_mixup_alpha)));
        }
        if file.eval_every == Some(0) {
            return Err(at("eval_every", "`eval_every` must be positive, found 0".into()));
        }
        if file.eval_every.is_some() && file.eval_prompts.is_none() {
            return Err(at("eval_every", "`eval_every` needs `eval_prompts`".into()));
        }
        if file.eval_prompts.is_some() && !file.rewards.iter().any(|r| matches!(r.kind, RewardKind::ExactMatch { .. })) {
            return Err(at("eval_prompts", "`eval_prompts` scores with the `exact_match` reward, which `rewards` does not list".into()));
        }
        if file.routing_replay && matches!(input, Input::Rollouts(_)) {
            return Err(at(
                "routing_replay",
                "`routing_replay` reuses the experts of generated rollouts; replayed ones (`rollouts_from`) carry none".into(),
            ));
        }
        let named = |key: &str, e: super::GrpoError| at(key, e.message);
        let loss = GrpoConfig {
            epsilon: file.epsilon,
            epsilon_high: file.epsilon_high.unwrap_or(file.epsilon),
            delta: file.delta,
            beta: file.beta,
            loss_type: LossType::parse(&file.loss_type).map_err(|e| named("loss_type", e))?,
            scale_rewards: ScaleRewards::parse(&file.scale_rewards).map_err(|e| named("scale_rewards", e))?,
            importance_sampling_level: ImportanceSamplingLevel::parse(&file.importance_sampling_level)
                .map_err(|e| named("importance_sampling_level", e))?,
            max_completion_length: file.max_completion_length as usize,
            mask_truncated_completions: file.mask_truncated_completions,
        };
        loss.validate().map_err(|e| {
            let key = e.field.clone();
            at(&key, format!("`{key}`: {}", e.message))
        })?;
        let eval_prompts = file.eval_prompts.as_deref().map(rel);
        Ok(GrpoRecipe { base, file, loss, input, eval_prompts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GrpoRecipe, TrainError> {
        GrpoRecipe::parse(Path::new("/r/grpo.yaml"), text)
    }

    const OK: &str = "spec: tiny.dsc\nprompts: p.jsonl\nout: run\nsteps: 3\nprompts_per_step: 2\nnum_generations: 4\nmax_completion_length: 8\nrewards: [{name: exact_match}]\n";

    #[test]
    fn the_issue_s_recipe_parses_with_its_defaults() {
        let r = parse(OK).unwrap();
        assert_eq!(r.input, Input::Prompts(PathBuf::from("/r/p.jsonl")));
        assert_eq!(r.loss, GrpoConfig { max_completion_length: 8, ..GrpoConfig::default() });
        assert_eq!(r.file.num_iterations, 1);
        assert_eq!(r.base.lr(), 1e-5);
        assert!(!r.file.mtp && r.file.aux_loss && !r.file.routing_replay);
        let full = format!(
            "{OK}sampling: {{temperature: 0.7, top_p: 0.9, top_k: 5}}\nloss_type: dr_grpo\nscale_rewards: none\nimportance_sampling_level: sequence\nepsilon: 0.2\nepsilon_high: 0.28\ndelta: 2.0\nbeta: 0.0\nnum_iterations: 2\nrouting_replay: true\noptimizer: {{lr: 1.0e-5, betas: [0.9, 0.99], eps: 1.0e-8, weight_decay: 0.0}}\ngrad_clip: 1.0\nschedule: {{kind: constant, warmup_steps: 0}}\nseed: 0\nbackend: reference\n"
        );
        let r = parse(&full).unwrap();
        assert_eq!((r.loss.loss_type, r.loss.epsilon_high, r.loss.delta), (LossType::DrGrpo, 0.28, Some(2.0)));
        // The policy's passes may run on wgpu; an unknown backend is refused at its line.
        assert_eq!(parse(&format!("{OK}backend: wgpu\n")).unwrap().file.backend, "wgpu");
        let e = parse(&format!("{OK}backend: metal\n")).unwrap_err().to_string();
        assert!(e.contains("grpo.yaml:9") && e.contains("`backend: metal` cannot train"), "{e}");
    }

    #[test]
    fn mistakes_name_the_line_and_the_fix() {
        let e = parse(&format!("{OK}num_iteration: 2\n")).unwrap_err().to_string();
        assert!(e.contains("/r/grpo.yaml:9") && e.contains("did you mean `num_iterations`"), "{e}");
        let e = parse(&OK.replace("num_generations: 4", "num_generations: 1")).unwrap_err().to_string();
        assert!(e.contains("/r/grpo.yaml:6") && e.contains("at least 2"), "{e}");
        let e = parse(&format!("{OK}loss_type: grp\n")).unwrap_err().to_string();
        assert!(e.contains(":9:") && e.contains("did you mean `grpo`"), "{e}");
        let e = parse(&OK.replace("prompts_per_step: 2", "prompts_per_step: 0")).unwrap_err().to_string();
        assert!(e.contains("`prompts_per_step`"), "{e}");
        let e = parse(&format!("{OK}rollouts_from: r.jsonl\n")).unwrap_err().to_string();
        assert!(e.contains("exclude each other"), "{e}");
        let e = parse(&format!("{OK}epsilon: 1.5\n")).unwrap_err().to_string();
        assert!(e.contains(":9:") && e.contains("epsilon"), "{e}");
        let e = parse(&format!("{OK}sampling: {{temperature: 0}}\n")).unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
    }
}
