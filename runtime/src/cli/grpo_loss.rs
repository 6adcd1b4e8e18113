//! `dsc grpo-loss --input BATCH.json`: GRPO's loss for one batch of per-token log-probabilities,
//! its gradient with respect to `logp_pi`, the advantages and the metrics, printed as JSON
//! (`{"advantages", "loss", "grad_logp_pi", "metrics"}`). The math is `train::grpo::loss`.
//!
//! Input, one JSON object ([G] one entry per completion, [G][T] rows padded to T):
//! required `rewards` [G], `mask` [G][T] (0/1 or booleans), `logp_pi` [G][T], `epsilon`, `beta`,
//! `loss_type` (grpo|bnpo|dr_grpo|dapo), `scale_rewards` (group|batch|none),
//! `max_completion_length`; optional `logp_old` [G][T] (default: logp_pi, every ratio 1),
//! `logp_ref` [G][T] (required when beta > 0), `epsilon_high` (default: epsilon), `delta`,
//! `importance_sampling_level` (token|sequence, default token), `groups` [G] (default: one
//! group), `truncated` [G] with `mask_truncated_completions`, `num_items_in_batch` (dapo).
//! Unknown fields are errors, so a misspelt option is never silently ignored.

use crate::train::grpo::{grpo_loss, GrpoBatch, GrpoConfig, ImportanceSamplingLevel, LossType, ScaleRewards};
use clap::Args;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// `dsc grpo-loss`.
#[derive(Args, Debug, Clone)]
pub struct GrpoLossArgs {
    /// The batch and the options, as one JSON object (see `dsc grpo-loss --help`).
    #[arg(long)]
    pub input: PathBuf,
}

const FIELDS: &[&str] = &[
    "rewards",
    "groups",
    "mask",
    "logp_pi",
    "logp_old",
    "logp_ref",
    "truncated",
    "epsilon",
    "epsilon_high",
    "delta",
    "beta",
    "loss_type",
    "scale_rewards",
    "importance_sampling_level",
    "max_completion_length",
    "mask_truncated_completions",
    "num_items_in_batch",
];

/// `dsc grpo-loss`: reads the input, prints the result.
pub fn grpo_loss_cmd(args: &GrpoLossArgs) -> Result<(), String> {
    let path = args.input.display();
    let text = dsc_dsl::files::read_text(&args.input, dsc_dsl::files::JSON_LIMIT).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    let out = run(&text).map_err(|e| format!("`{path}`: {e}"))?;
    println!("{out}");
    Ok(())
}

/// The command without files: input JSON text to output JSON text.
pub fn run(text: &str) -> Result<String, String> {
    let (cfg, batch) = parse_input(text)?;
    let out = grpo_loss(&cfg, &batch).map_err(|e| e.to_string())?;
    serde_json::to_string_pretty(&out).map_err(|e| format!("cannot write the output: {e}"))
}

/// Reads the options and the batch; every error names its field (and row, and column).
pub fn parse_input(text: &str) -> Result<(GrpoConfig, GrpoBatch), String> {
    let json: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(obj) = json else { return Err(format!("expected a JSON object, found {}", kind(&json))) };
    if let Some(key) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("`{key}`: unknown field; {}", crate::train::grpo::suggest(key, FIELDS)));
    }
    let f = Fields(&obj);
    let epsilon = f.required(f.number("epsilon"), "epsilon")?;
    let cfg = GrpoConfig {
        epsilon,
        epsilon_high: f.number("epsilon_high")?.unwrap_or(epsilon),
        delta: f.number("delta")?,
        beta: f.required(f.number("beta"), "beta")?,
        loss_type: LossType::parse(&f.required(f.string("loss_type"), "loss_type")?).map_err(|e| e.to_string())?,
        scale_rewards: ScaleRewards::parse(&f.required(f.string("scale_rewards"), "scale_rewards")?).map_err(|e| e.to_string())?,
        importance_sampling_level: match f.string("importance_sampling_level")? {
            Some(s) => ImportanceSamplingLevel::parse(&s).map_err(|e| e.to_string())?,
            None => ImportanceSamplingLevel::Token,
        },
        max_completion_length: f.required(f.count("max_completion_length"), "max_completion_length")?,
        mask_truncated_completions: f.boolean("mask_truncated_completions")?.unwrap_or(false),
    };
    let batch = GrpoBatch {
        rewards: f.required(f.list("rewards", |v| v.as_f64(), "a number"), "rewards")?,
        groups: f.list("groups", |v| v.as_u64(), "a group id (an integer >= 0)")?,
        mask: f.required(f.matrix("mask", mask_entry, "0, 1, true or false"), "mask")?,
        logp_pi: f.required(f.matrix("logp_pi", |v| v.as_f64(), "a number"), "logp_pi")?,
        logp_old: f.matrix("logp_old", |v| v.as_f64(), "a number")?,
        logp_ref: f.matrix("logp_ref", |v| v.as_f64(), "a number")?,
        truncated: f.list("truncated", |v| v.as_bool(), "true or false")?,
        num_items_in_batch: f.count("num_items_in_batch")?,
    };
    Ok((cfg, batch))
}

fn mask_entry(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) if n.as_f64() == Some(0.0) => Some(false),
        Value::Number(n) if n.as_f64() == Some(1.0) => Some(true),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed reads of the input object: `Ok(None)` for an absent or null field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn required<T>(&self, v: Result<Option<T>, String>, key: &str) -> Result<T, String> {
        v?.ok_or_else(|| format!("`{key}`: missing (required)"))
    }

    fn one<T>(&self, key: &str, read: impl Fn(&Value) -> Option<T>, expected: &str) -> Result<Option<T>, String> {
        self.get(key).map(|v| read(v).ok_or_else(|| format!("`{key}`: expected {expected}, found {}", kind(v)))).transpose()
    }

    fn number(&self, key: &str) -> Result<Option<f64>, String> {
        self.one(key, |v| v.as_f64(), "a number")
    }

    fn count(&self, key: &str) -> Result<Option<usize>, String> {
        self.one(key, |v| v.as_u64().and_then(|n| usize::try_from(n).ok()), "an integer >= 0")
    }

    fn string(&self, key: &str) -> Result<Option<String>, String> {
        self.one(key, |v| v.as_str().map(str::to_string), "a string")
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, String> {
        self.one(key, |v| v.as_bool(), "true or false")
    }

    fn row<T>(key: &str, v: &Value, read: &impl Fn(&Value) -> Option<T>, expected: &str) -> Result<Vec<T>, String> {
        let Value::Array(items) = v else { return Err(format!("`{key}`: expected an array, found {}", kind(v))) };
        items.iter().enumerate().map(|(i, x)| read(x).ok_or_else(|| format!("`{key}[{i}]`: expected {expected}, found {x}"))).collect()
    }

    fn list<T>(&self, key: &str, read: impl Fn(&Value) -> Option<T>, expected: &str) -> Result<Option<Vec<T>>, String> {
        self.get(key).map(|v| Self::row(key, v, &read, expected)).transpose()
    }

    /// An array of rows; their lengths are checked by `grpo_loss`, which names the ragged row.
    fn matrix<T>(&self, key: &str, read: impl Fn(&Value) -> Option<T>, expected: &str) -> Result<Option<Vec<Vec<T>>>, String> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let Value::Array(rows) = v else { return Err(format!("`{key}`: expected an array of rows, found {}", kind(v))) };
        rows.iter().enumerate().map(|(i, r)| Self::row(&format!("{key}[{i}]"), r, &read, expected)).collect::<Result<_, _>>().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = r#"{
        "rewards": [1.0, 0.0], "groups": [4, 4],
        "mask": [[1, 1, 0], [true, true, true]],
        "logp_pi": [[-1.0, -2.0, 0.0], [-0.5, -1.5, -0.25]],
        "logp_old": [[-1.2, -1.9, 0.0], [-0.4, -1.6, -0.3]],
        "logp_ref": [[-1.1, -2.0, 0.0], [-0.5, -1.4, -0.2]],
        "epsilon": 0.2, "epsilon_high": 0.28, "delta": null, "beta": 0.04,
        "loss_type": "dr_grpo", "scale_rewards": "group", "importance_sampling_level": "sequence",
        "max_completion_length": 4
    }"#;

    fn with(edit: &str, value: Value) -> String {
        let mut v: Value = serde_json::from_str(INPUT).unwrap();
        v[edit] = value;
        v.to_string()
    }

    #[test]
    fn output_is_the_library_result() {
        let out: Value = serde_json::from_str(&run(INPUT).unwrap()).unwrap();
        let (cfg, batch) = parse_input(INPUT).unwrap();
        assert_eq!(cfg.epsilon_high, 0.28);
        assert_eq!(cfg.importance_sampling_level, ImportanceSamplingLevel::Sequence);
        assert_eq!(batch.mask, vec![vec![true, true, false], vec![true; 3]]);
        let want = grpo_loss(&cfg, &batch).unwrap();
        assert_eq!(out["loss"].as_f64().unwrap(), want.loss);
        assert_eq!(out["grad_logp_pi"][1][2].as_f64().unwrap(), want.grad_logp_pi[1][2]);
        assert_eq!(out["advantages"].as_array().unwrap().len(), 2);
        assert_eq!(out["metrics"]["tokens"], 5);
    }

    #[test]
    fn bad_input_names_the_field_and_row() {
        let err = |text: String| run(&text).unwrap_err();
        assert_eq!(err(with("epsilon_hihg", 0.3.into())), "`epsilon_hihg`: unknown field; did you mean `epsilon_high`?");
        let ragged = serde_json::json!([[-1.0, -2.0, 0.0], [-0.5, -1.5]]);
        assert_eq!(err(with("logp_pi", ragged)), "`logp_pi[1]`: length 2, expected 3 (the length of mask[0])");
        assert_eq!(err(with("mask", serde_json::json!([[1, 1, 0], [1, 2, 1]]))), "`mask[1][1]`: expected 0, 1, true or false, found 2");
        assert_eq!(err(with("loss_type", "dapoo".into())), "`loss_type`: unknown value `dapoo`; did you mean `dapo`?");
        assert_eq!(err(with("beta", Value::Null)), "`beta`: missing (required)");
        assert_eq!(err(with("epsilon", "0.2".into())), "`epsilon`: expected a number, found a string");
        assert!(err(with("rewards", serde_json::json!([1.0]))).starts_with("`mask`: length 2, expected one row per reward (1)"));
        assert!(err("[1, 2]".into()).contains("expected a JSON object"));
    }
}
