//! The recipe of `dsc train sft --config RECIPE.yaml`: what to train, on what, how.
//!
//! Parsed with serde_yaml into structs that deny unknown fields; the error for one is our
//! own (file, line, and the nearest valid field). Values are checked after parsing, each
//! error naming the field and, where the key can be found in the text, its line. Relative
//! paths are relative to the recipe's directory.
//!
//! ```yaml
//! model: DIR                # or `spec: FILE.dsc` (+ `init: {seed: N}`) for random weights
//! data: FILE.jsonl
//! out: RUN_DIR
//! steps: 100
//! batch_size: 8
//! optimizer: {lr: 3.0e-4, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1}
//! schedule: {kind: cosine, warmup_steps: 10, min_lr_ratio: 0.1}
//! ```

use super::optim::{AdamW, Schedule};
use super::TrainError;
pub use dsc_compiler::passes::autodiff::Recompute;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A recipe as written (every field documented here is what the README lists).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// A model directory as the hub ships it (`config.json`, `model.safetensors`): the
    /// starting weights. Exactly one of `model` and `spec` is required, unless both are
    /// given: then `spec` replaces the directory's `config.json` (as `--spec` does). A
    /// directory dsc wrote (a checkpoint, `final/`) is read with its own `spec.dsc`, which
    /// keeps the training-only settings (balance losses, bias update speed).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// A spec file (`.dsc`); without `model` training starts from random weights (`init`).
    #[serde(default)]
    pub spec: Option<PathBuf>,
    /// Which model of the spec file (default: its only one).
    #[serde(default)]
    pub spec_model: Option<String>,
    /// Random initialisation of a `spec` run: `{seed: N}` (default: the recipe's `seed`).
    /// Matrices N(0, 0.02²) (Hugging Face's `initializer_range`), norm gains 1, selection
    /// biases 0.
    #[serde(default)]
    pub init: Option<InitFile>,
    /// The training data: one `{"input_ids": [...], "loss_mask": [...]}` per line
    /// (`loss_mask` optional, 1 = the token is a target).
    pub data: PathBuf,
    /// The run directory: checkpoints, `metrics.jsonl`, `loss.svg`, `final/`.
    pub out: PathBuf,
    /// Optimizer steps to take (> 0).
    pub steps: u64,
    /// Sequences per step (> 0); the last batch of an epoch may be smaller.
    pub batch_size: u64,
    /// Shuffle the sequences every epoch (deterministically from `seed`); default true.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Seed of the data order (and of `init` unless it has its own); default 0.
    #[serde(default)]
    pub seed: u64,
    /// AdamW: `{lr, betas, eps, weight_decay}`, defaults 3e-4, [0.9, 0.95], 1e-8, 0.1.
    #[serde(default)]
    pub optimizer: OptimizerFile,
    /// Clip the global L2 norm of the gradients to this (> 0); `null` turns clipping off.
    /// Default 1.0.
    #[serde(default = "one")]
    pub grad_clip: Option<f64>,
    /// The learning-rate schedule (default constant, no warmup): see [`ScheduleFile`].
    #[serde(default)]
    pub schedule: ScheduleFile,
    /// Write `checkpoint-N/` every this many steps (> 0); default: only `final/`.
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// What runs the model: `reference` (the CPU interpreter), `wgpu` (the train graph's
    /// kernels on the default wgpu adapter) or `cuda` (device 0; feature `cuda`).
    #[serde(default = "reference")]
    pub backend: String,
    /// Add the multi-token-prediction loss (λ from the spec); default: when the spec has `mtp`.
    #[serde(default)]
    pub mtp: Option<bool>,
    /// Stop the MTP loss's gradient at the main model's hidden states; default false.
    #[serde(default)]
    pub mtp_stop_gradient: bool,
    /// Add the spec's balance losses (`balance { expert_aux, .., sequence_aux }`); default true.
    #[serde(default = "yes")]
    pub aux_loss: bool,
    /// DeepSeek-V3's aux-loss-free balancing: after each step every selection bias moves by
    /// `bias_update_speed` towards balance; default: when the spec sets that speed.
    #[serde(default)]
    pub bias_update: Option<bool>,
    /// What the backward pass recomputes instead of keeping: `none`, `norms`, `mla` or
    /// `layer`; default `none`.
    #[serde(default, with = "recompute_name")]
    pub recompute: Recompute,
    /// The longest sequence allowed; a longer one is an error naming its data line.
    #[serde(default)]
    pub max_seq_len: Option<u64>,
}

/// `init: {seed: N}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InitFile {
    pub seed: u64,
}

/// `optimizer: {lr, betas, eps, weight_decay}` (AdamW).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerFile {
    /// Peak learning rate (> 0).
    pub lr: f64,
    /// β1, β2, each in [0, 1).
    pub betas: [f64; 2],
    /// Added to the root of the second moment (> 0).
    pub eps: f64,
    /// Decoupled weight decay on matrices (≥ 0); none on norm gains and other vectors.
    pub weight_decay: f64,
}

impl Default for OptimizerFile {
    fn default() -> Self {
        OptimizerFile { lr: 3e-4, betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.1 }
    }
}

/// `schedule: {kind, warmup_steps, ...}`: linear warmup over `warmup_steps` (default 0),
/// then by kind:
/// - `constant`: the peak rate;
/// - `cosine`: cosine decay to `min_lr_ratio` × the peak (default 0, as Hugging Face's
///   cosine schedule; DeepSeek-V3 decays to 0.1) at the last step;
/// - `multistep`: DeepSeek's step-wise decay: the peak until the first of `milestones`
///   (fractions of `steps`, increasing, default [0.8, 0.9]), then `factors[i]` × the peak
///   (default [0.316, 0.1]: DeepSeek LLM's 100% / 31.6% / 10%).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    #[serde(default)]
    pub kind: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    #[serde(default)]
    pub milestones: Option<Vec<f64>>,
    #[serde(default)]
    pub factors: Option<Vec<f64>>,
}

impl Default for ScheduleFile {
    fn default() -> Self {
        ScheduleFile { kind: ScheduleKind::Constant, warmup_steps: 0, min_lr_ratio: None, milestones: None, factors: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Cosine,
    Multistep,
}

/// `recompute:` in YAML: the compiler's [`Recompute`] by its name. The names go through
/// a derived enum so that serde_yaml places a bad one on its line.
pub(crate) mod recompute_name {
    use super::Recompute;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "lowercase")]
    enum Name {
        None,
        Norms,
        Mla,
        Layer,
    }

    pub fn serialize<S: Serializer>(r: &Recompute, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Recompute, D::Error> {
        Ok(match Name::deserialize(d)? {
            Name::None => Recompute::None,
            Name::Norms => Recompute::Norms,
            Name::Mla => Recompute::Mla,
            Name::Layer => Recompute::Layer,
        })
    }
}

fn yes() -> bool {
    true
}
fn one() -> Option<f64> {
    Some(1.0)
}
fn reference() -> String {
    "reference".to_string()
}

/// Where the starting weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A model directory, with a spec replacing its `config.json` when given.
    Model { dir: PathBuf, spec: Option<PathBuf> },
    /// Random weights for a spec.
    Spec { path: PathBuf, init_seed: u64 },
}

/// A checked recipe, paths resolved against the recipe's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// As written (paths as written too).
    pub file: RecipeFile,
    pub source: Source,
    pub data: PathBuf,
    pub out: PathBuf,
    pub adamw: AdamW,
    pub schedule: Schedule,
    /// FNV-1a of the recipe without `out`, in `trainer_state.json`: a resumed run must use
    /// the recipe it started with.
    pub hash: String,
}

/// The `backend:`s a recipe may train on.
pub const TRAIN_BACKENDS: &[&str] = &[
    "reference",
    #[cfg(feature = "wgpu")]
    "wgpu",
    #[cfg(feature = "cuda")]
    "cuda",
];

impl Recipe {
    /// Reads and checks the recipe at `path`.
    pub fn load(path: &Path) -> Result<Recipe, TrainError> {
        let text = dsc_dsl::files::read_text(path, dsc_dsl::files::TEXT_LIMIT).map_err(|e| TrainError::io(path, e))?;
        Recipe::parse(path, &text)
    }

    /// Checks a recipe's text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Recipe, TrainError> {
        let file: RecipeFile = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
        let hash = {
            let mut f = file.clone();
            f.out = PathBuf::new();
            fnv1a(serde_json::to_string(&f).expect("a recipe serialises").as_bytes())
        };
        Recipe::check(path, text, file, hash)
    }

    /// Checks the values of a parsed recipe (`text` locates the keys in errors); `hash`
    /// identifies the run ([`Recipe::hash`]). GRPO's recipe shares these fields and checks.
    pub fn check(path: &Path, text: &str, file: RecipeFile, hash: String) -> Result<Recipe, TrainError> {
        let at = |key: &str, msg: String| at_line(path, text, key, msg);
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let rel = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };

        let source = match (&file.model, &file.spec, &file.init) {
            (Some(_), _, Some(_)) => {
                return Err(at("init", "`init` starts from random weights, but `model` gives the weights: remove one".into()))
            }
            (Some(dir), spec, None) => Source::Model { dir: rel(dir), spec: spec.as_deref().map(rel) },
            (None, Some(spec), init) => Source::Spec { path: rel(spec), init_seed: init.as_ref().map_or(file.seed, |i| i.seed) },
            (None, None, _) => {
                return Err(TrainError::invalid(format!(
                    "{}: no model: give `model: DIR` (a hub model directory) or `spec: FILE.dsc` with `init: {{seed: N}}`",
                    path.display()
                )))
            }
        };
        if file.spec_model.is_some() && file.spec.is_none() {
            return Err(at("spec_model", "`spec_model` picks a model of `spec`, but there is no `spec`".into()));
        }
        if file.steps == 0 {
            return Err(at("steps", "`steps` must be positive, found 0".into()));
        }
        if file.batch_size == 0 {
            return Err(at("batch_size", "`batch_size` must be positive, found 0".into()));
        }
        let o = &file.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(at("lr", format!("`optimizer.lr` must be positive, found {}", o.lr)));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(at("betas", format!("`optimizer.betas[{i}]` must be in [0, 1), found {b}")));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(at("eps", format!("`optimizer.eps` must be positive, found {}", o.eps)));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(at("weight_decay", format!("`optimizer.weight_decay` must be zero or positive, found {}", o.weight_decay)));
        }
        if let Some(c) = file.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(at("grad_clip", format!("`grad_clip` must be positive (or null for no clipping), found {c}")));
            }
        }
        if file.checkpoint_every == Some(0) {
            return Err(at("checkpoint_every", "`checkpoint_every` must be positive, found 0".into()));
        }
        if file.max_seq_len == Some(0) {
            return Err(at("max_seq_len", "`max_seq_len` must be positive, found 0".into()));
        }
        if !TRAIN_BACKENDS.contains(&file.backend.as_str()) {
            return Err(at("backend", format!("`backend: {}` cannot train: expected {}", file.backend, TRAIN_BACKENDS.join(" or "))));
        }
        let schedule = schedule(&file.schedule, file.steps).map_err(|(key, msg)| at(key, msg))?;
        let adamw = AdamW { betas: o.betas, eps: o.eps, weight_decay: o.weight_decay };
        Ok(Recipe { path: path.to_path_buf(), data: rel(&file.data), out: rel(&file.out), source, adamw, schedule, hash, file })
    }

    /// The peak learning rate.
    pub fn lr(&self) -> f64 {
        self.file.optimizer.lr
    }
}

/// The schedule a `schedule:` section describes, or (the key at fault, the message).
fn schedule(s: &ScheduleFile, steps: u64) -> Result<Schedule, (&'static str, String)> {
    if s.warmup_steps > steps {
        return Err(("warmup_steps", format!("`schedule.warmup_steps` = {} exceeds `steps` = {steps}", s.warmup_steps)));
    }
    let only = |present: bool, key: &'static str, kind: &str| -> Result<(), (&'static str, String)> {
        if present {
            Err((key, format!("`schedule.{key}` applies to `kind: {kind}` only")))
        } else {
            Ok(())
        }
    };
    let warmup = s.warmup_steps;
    match s.kind {
        ScheduleKind::Constant => {
            only(s.min_lr_ratio.is_some(), "min_lr_ratio", "cosine")?;
            only(s.milestones.is_some(), "milestones", "multistep")?;
            only(s.factors.is_some(), "factors", "multistep")?;
            Ok(Schedule::Constant { warmup })
        }
        ScheduleKind::Cosine => {
            only(s.milestones.is_some(), "milestones", "multistep")?;
            only(s.factors.is_some(), "factors", "multistep")?;
            let min_ratio = s.min_lr_ratio.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&min_ratio) {
                return Err(("min_lr_ratio", format!("`schedule.min_lr_ratio` must be in [0, 1], found {min_ratio}")));
            }
            Ok(Schedule::Cosine { warmup, total: steps, min_ratio })
        }
        ScheduleKind::Multistep => {
            only(s.min_lr_ratio.is_some(), "min_lr_ratio", "cosine")?;
            let milestones = s.milestones.clone().unwrap_or_else(|| vec![0.8, 0.9]);
            let factors = s.factors.clone().unwrap_or_else(|| vec![0.316, 0.1]);
            if milestones.len() != factors.len() {
                return Err((
                    "factors",
                    format!(
                        "`schedule.factors` has {} entries but `schedule.milestones` {}: one factor per milestone",
                        factors.len(),
                        milestones.len()
                    ),
                ));
            }
            for (i, m) in milestones.iter().enumerate() {
                if !(*m > 0.0 && *m <= 1.0) || (i > 0 && *m <= milestones[i - 1]) {
                    return Err((
                        "milestones",
                        format!("`schedule.milestones` must be increasing fractions of `steps` in (0, 1], found {milestones:?}"),
                    ));
                }
            }
            if let Some(f) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(("factors", format!("`schedule.factors` must be positive, found {f}")));
            }
            let boundaries = milestones.iter().map(|m| (m * steps as f64).round() as u64).collect();
            Ok(Schedule::MultiStep { warmup, boundaries, factors })
        }
    }
}

/// `FILE:LINE: msg` with the line where `key:` is written, `FILE: msg` when it cannot be
/// found.
pub(crate) fn at_line(path: &Path, text: &str, key: &str, msg: String) -> TrainError {
    match line_of(text, key) {
        Some(l) => TrainError::invalid(format!("{}:{l}: {msg}", path.display())),
        None => TrainError::invalid(format!("{}: {msg}", path.display())),
    }
}

/// serde_yaml's error as `FILE:LINE:COL: message`, with "did you mean" for a misspelt
/// field or value.
pub(crate) fn yaml_error(path: &Path, e: &serde_yaml::Error) -> TrainError {
    let text = e.to_string();
    // serde_yaml appends the location; we put it in front, as every dsc error does.
    let msg = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text.as_str(),
    };
    let mut msg = msg.to_string();
    for what in ["unknown field `", "unknown variant `"] {
        if let Some(i) = msg.find(what) {
            let rest = &msg[i + what.len()..];
            let got = rest.split('`').next().unwrap_or("").to_string();
            // The valid names are the other back-quoted words: "expected one of `a`, `b`".
            let known: Vec<String> =
                rest.split('`').skip(1).collect::<Vec<_>>().chunks(2).filter_map(|c| c.get(1).map(|s| s.to_string())).collect();
            // With a suggestion the list of every valid name is noise.
            if let Some(best) = nearest(&got, &known) {
                msg = format!("{}{what}{got}`; did you mean `{best}`?", &msg[..i]);
            }
        }
    }
    match e.location() {
        Some(l) => TrainError::invalid(format!("{}:{}:{}: {msg}", path.display(), l.line(), l.column())),
        None => TrainError::invalid(format!("{}: {msg}", path.display())),
    }
}

/// The known name closest to `got`, if any is close (the spec language's threshold).
fn nearest<'a>(got: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(got, k), k.as_str()))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// The 1-based line where `key:` is written (block or flow style), if it can be found.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let pat = format!("{key}:");
    text.lines()
        .position(|l| {
            let code = l.split('#').next().unwrap_or("");
            code.match_indices(&pat).any(|(i, _)| i == 0 || !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        })
        .map(|i| i + 1)
}

/// 64-bit FNV-1a, as 16 hex digits: stable across runs and builds, unlike `DefaultHasher`.
pub fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
model: ../models/tiny          # a hub directory
data: data.jsonl
out: runs/a
steps: 100
batch_size: 8
shuffle: true
seed: 3
optimizer: {lr: 3.0e-4, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1}
grad_clip: 1.0
schedule: {kind: multistep, warmup_steps: 10}
checkpoint_every: 50
backend: reference
recompute: mla
";

    fn parse(text: &str) -> Result<Recipe, TrainError> {
        Recipe::parse(Path::new("/r/recipe.yaml"), text)
    }

    #[test]
    fn a_valid_recipe() {
        let r = parse(GOOD).unwrap();
        assert_eq!(r.source, Source::Model { dir: PathBuf::from("/r/../models/tiny"), spec: None });
        assert_eq!((r.data.as_path(), r.out.as_path()), (Path::new("/r/data.jsonl"), Path::new("/r/runs/a")));
        assert_eq!((r.file.steps, r.file.batch_size, r.file.seed, r.file.checkpoint_every), (100, 8, 3, Some(50)));
        assert_eq!(r.adamw, AdamW { betas: [0.9, 0.95], eps: 1e-8, weight_decay: 0.1 });
        assert_eq!(r.schedule, Schedule::MultiStep { warmup: 10, boundaries: vec![80, 90], factors: vec![0.316, 0.1] });
        assert_eq!(r.file.recompute, Recompute::Mla);
        assert!(r.file.aux_loss && r.file.mtp.is_none() && r.file.bias_update.is_none() && !r.file.mtp_stop_gradient);
        // `out` does not change the hash; anything else does.
        assert_eq!(r.hash, parse(&GOOD.replace("runs/a", "runs/b")).unwrap().hash);
        assert_ne!(r.hash, parse(&GOOD.replace("seed: 3", "seed: 4")).unwrap().hash);

        // The smallest spec recipe: every default.
        let r = parse("spec: tiny.dsc\ndata: d.jsonl\nout: o\nsteps: 5\nbatch_size: 2\ngrad_clip: null\n").unwrap();
        assert_eq!(r.source, Source::Spec { path: PathBuf::from("/r/tiny.dsc"), init_seed: 0 });
        assert_eq!((r.lr(), r.file.grad_clip, r.file.shuffle), (3e-4, None, true));
        assert_eq!(r.schedule, Schedule::Constant { warmup: 0 });
    }

    #[test]
    fn unknown_fields_name_the_line_and_the_nearest_field() {
        let e = parse(&GOOD.replace("batch_size: 8", "batchsize: 8")).unwrap_err().to_string();
        assert!(e.starts_with("/r/recipe.yaml:5:"), "{e}");
        assert!(e.contains("unknown field `batchsize`") && e.ends_with("did you mean `batch_size`?"), "{e}");
        let e = parse(&GOOD.replace("eps: 1.0e-8", "epsilon: 1.0e-8")).unwrap_err().to_string();
        assert!(e.starts_with("/r/recipe.yaml:8:") && e.contains("`epsilon`"), "{e}");
        let e = parse(&GOOD.replace("recompute: mla", "recompute: layers")).unwrap_err().to_string();
        assert!(e.starts_with("/r/recipe.yaml:13:") && e.ends_with("did you mean `layer`?"), "{e}");
        // Nothing close: no suggestion.
        let e = parse(&format!("{GOOD}zzz: 1\n")).unwrap_err().to_string();
        assert!(e.contains("unknown field `zzz`") && !e.contains("did you mean"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("steps: 100", "steps: 0", "14", "`steps` must be positive"),
            ("lr: 3.0e-4", "lr: -1", "8", "`optimizer.lr` must be positive, found -1"),
            ("betas: [0.9, 0.95]", "betas: [0.9, 1.0]", "8", "`optimizer.betas[1]` must be in [0, 1)"),
            ("grad_clip: 1.0", "grad_clip: 0", "9", "`grad_clip` must be positive"),
            ("warmup_steps: 10", "warmup_steps: 200", "10", "exceeds `steps` = 100"),
            ("kind: multistep", "kind: cosine", "10", "`schedule.min_lr_ratio`"),
            ("backend: reference", "backend: metal", "12", "`backend: metal` cannot train: expected reference"),
            ("steps: 100", "steps: many", "4", "invalid type"),
        ];
        for (from, to, line, want) in cases {
            let mut text = GOOD.replace(from, to);
            if to == "kind: cosine" {
                text = text.replace("warmup_steps: 10}", "warmup_steps: 10, milestones: [0.5], min_lr_ratio: 2}");
            }
            let e = parse(&text).unwrap_err().to_string();
            let line = if to == "steps: 0" { "4" } else { line };
            assert!(e.starts_with(&format!("/r/recipe.yaml:{line}:")), "{to}: {e}");
            let want = if to == "kind: cosine" { "`schedule.milestones` applies to `kind: multistep` only" } else { want };
            assert!(e.contains(want), "{to}: {e}");
        }
        let e = parse("data: d\nout: o\nsteps: 1\nbatch_size: 1\n").unwrap_err().to_string();
        assert!(e.contains("no model"), "{e}");
        let e = parse(&format!("{GOOD}init: {{seed: 1}}\n")).unwrap_err().to_string();
        assert!(e.starts_with("/r/recipe.yaml:14:") && e.contains("`init`"), "{e}");
    }
}
