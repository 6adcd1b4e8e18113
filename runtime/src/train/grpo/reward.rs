//! Rule-based rewards over decoded completions (GRPO's outcome supervision without a reward
//! model): exact match of the final answer, DeepSeek-R1-Zero's format reward, DAPO's soft
//! overlong punishment, and a weighted sum of several. A training config lists them as
//! [`RewardSpec`]s (`name`, `weight`, options), read with serde from YAML or JSON.
//!
//! ```yaml
//! rewards:
//!   - name: exact_match                    # 1 if the extracted answer equals the reference
//!     extract: {tags: {open: "<answer>", close: "</answer>"}}   # the default; or
//!     # extract: {after_last: "="}          # the text after the last "="; or `extract: whole`
//!   - name: format                         # 1 for <think>…</think><answer>…</answer>
//!     weight: 0.5
//!   - name: overlong                       # 0 up to max_length − cache tokens, then down to −1
//!     max_length: 4096
//!     cache: 512
//! ```

use super::suggest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// One completion to score.
#[derive(Clone, Copy, Debug)]
pub struct RewardInput<'a> {
    pub prompt: &'a str,
    /// The decoded completion, special tokens included as text (the format reward reads tags).
    pub completion: &'a str,
    /// The completion's length in tokens (the overlong reward's unit, as in DAPO).
    pub completion_tokens: usize,
    /// The prompt's reference answer, for rewards that compare against one.
    pub answer: Option<&'a str>,
}

/// A reward that cannot score its input: which reward, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardError {
    pub reward: String,
    pub message: String,
}

impl fmt::Display for RewardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reward `{}`: {}", self.reward, self.message)
    }
}

impl std::error::Error for RewardError {}

/// Scores one decoded completion.
pub trait Reward: Send + Sync {
    /// The name a [`RewardSpec`] gives it.
    fn name(&self) -> &str;
    fn score(&self, input: &RewardInput<'_>) -> Result<f64, RewardError>;
}

/// Where the final answer sits in a completion. No regexes: each rule is a plain substring search.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Extract {
    /// The text between the last `open` and the first `close` after it.
    Tags { open: String, close: String },
    /// The text after the last occurrence of the marker (e.g. `=` for "... = 42").
    AfterLast(String),
    /// The whole completion.
    Whole,
}

impl Default for Extract {
    /// DeepSeek-R1's `<answer>…</answer>`.
    fn default() -> Self {
        Extract::Tags { open: "<answer>".into(), close: "</answer>".into() }
    }
}

impl Extract {
    /// The answer text (untrimmed), or `None` when the completion has none.
    pub fn extract<'a>(&self, text: &'a str) -> Option<&'a str> {
        match self {
            Extract::Tags { open, close } => {
                let start = text.rfind(open.as_str())? + open.len();
                let len = text[start..].find(close.as_str())?;
                Some(&text[start..start + len])
            }
            Extract::AfterLast(marker) => text.rfind(marker.as_str()).map(|p| &text[p + marker.len()..]),
            Extract::Whole => Some(text),
        }
    }
}

/// 1 if the extracted answer equals the reference answer, both trimmed, else 0 (also when the
/// completion has no answer to extract).
#[derive(Clone, Debug, PartialEq)]
pub struct ExactMatch {
    pub extract: Extract,
}

impl Reward for ExactMatch {
    fn name(&self) -> &str {
        "exact_match"
    }

    fn score(&self, input: &RewardInput<'_>) -> Result<f64, RewardError> {
        let answer = input.answer.ok_or_else(|| RewardError {
            reward: self.name().into(),
            message: "needs the prompt's reference answer, and this prompt has none".into(),
        })?;
        Ok(match self.extract.extract(input.completion) {
            Some(got) if got.trim() == answer.trim() => 1.0,
            _ => 0.0,
        })
    }
}

/// DeepSeek-R1-Zero's format reward: 1 if the completion is `<think>…</think><answer>…</answer>`
/// with only whitespace around and between the two blocks, else 0. Each tag must occur exactly
/// once, so a completion cannot nest a second answer block inside its thinking.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Format;

impl Format {
    const TAGS: [&'static str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

    pub fn matches(text: &str) -> bool {
        if Self::TAGS.iter().any(|tag| text.matches(tag).count() != 1) {
            return false;
        }
        let t = text.trim();
        let Some(rest) = t.strip_prefix("<think>") else { return false };
        let Some(body) = rest.strip_suffix("</answer>") else { return false };
        // Exactly one of each tag, so these finds are the only occurrences.
        match (body.find("</think>"), body.find("<answer>")) {
            (Some(end_think), Some(answer)) => end_think < answer && body[end_think + "</think>".len()..answer].trim().is_empty(),
            _ => false,
        }
    }
}

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, input: &RewardInput<'_>) -> Result<f64, RewardError> {
        Ok(if Self::matches(input.completion) { 1.0 } else { 0.0 })
    }
}

/// DAPO's soft overlong punishment on the completion's token length L, with L_max = `max_length`
/// and L_cache = `cache`: 0 for L ≤ L_max − L_cache, then ((L_max − L_cache) − L) / L_cache,
/// linear down to −1 at L_max, and −1 beyond.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overlong {
    pub max_length: usize,
    pub cache: usize,
}

impl Reward for Overlong {
    fn name(&self) -> &str {
        "overlong"
    }

    fn score(&self, input: &RewardInput<'_>) -> Result<f64, RewardError> {
        let len = input.completion_tokens;
        let start = self.max_length - self.cache;
        Ok(if len <= start {
            0.0
        } else if len <= self.max_length {
            (start as f64 - len as f64) / self.cache as f64
        } else {
            -1.0
        })
    }
}

/// Σ weight · reward over several rewards (TRL's `reward_weights`).
pub struct WeightedSum {
    pub parts: Vec<(f64, Box<dyn Reward>)>,
}

impl WeightedSum {
    pub fn from_specs(specs: &[RewardSpec]) -> Self {
        WeightedSum { parts: specs.iter().map(|s| (s.weight, s.build())).collect() }
    }
}

impl Reward for WeightedSum {
    fn name(&self) -> &str {
        "weighted_sum"
    }

    fn score(&self, input: &RewardInput<'_>) -> Result<f64, RewardError> {
        self.parts.iter().map(|(w, r)| r.score(input).map(|s| w * s)).sum()
    }
}

/// One reward of a training config: which, its weight in the sum, and its options.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "RawSpec")]
pub struct RewardSpec {
    pub weight: f64,
    pub kind: RewardKind,
}

/// The built-in rewards and their options.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum RewardKind {
    ExactMatch { extract: Extract },
    Format,
    Overlong { max_length: usize, cache: usize },
}

impl RewardSpec {
    pub const NAMES: &'static [&'static str] = &["exact_match", "format", "overlong"];

    pub fn build(&self) -> Box<dyn Reward> {
        match &self.kind {
            RewardKind::ExactMatch { extract } => Box::new(ExactMatch { extract: extract.clone() }),
            RewardKind::Format => Box::new(Format),
            RewardKind::Overlong { max_length, cache } => Box::new(Overlong { max_length: *max_length, cache: *cache }),
        }
    }
}

/// The spec as written, before the checks that need the name (which options apply).
#[derive(Deserialize)]
struct RawSpec {
    name: String,
    weight: Option<f64>,
    extract: Option<Extract>,
    max_length: Option<usize>,
    cache: Option<usize>,
    // Every other key, kept to report it with a suggestion rather than serde's bare list.
    #[serde(flatten)]
    rest: BTreeMap<String, serde::de::IgnoredAny>,
}

impl TryFrom<RawSpec> for RewardSpec {
    type Error = String;

    fn try_from(raw: RawSpec) -> Result<Self, String> {
        let name = raw.name.as_str();
        let options: &[&str] = match name {
            "exact_match" => &["name", "weight", "extract"],
            "format" => &["name", "weight"],
            "overlong" => &["name", "weight", "max_length", "cache"],
            _ => return Err(format!("unknown reward `{name}`; {}", suggest(name, Self::NAMES))),
        };
        if let Some(key) = raw.rest.keys().next() {
            return Err(format!("reward `{name}`: unknown option `{key}`; {}", suggest(key, options)));
        }
        let given = [("extract", raw.extract.is_some()), ("max_length", raw.max_length.is_some()), ("cache", raw.cache.is_some())];
        if let Some((key, _)) = given.iter().find(|(k, set)| *set && !options.contains(k)) {
            return Err(format!("reward `{name}`: `{key}` is not one of its options ({})", options[1..].join(", ")));
        }
        let weight = raw.weight.unwrap_or(1.0);
        if !weight.is_finite() {
            return Err(format!("reward `{name}`: `weight` must be a finite number, got {weight}"));
        }
        let kind = match name {
            "exact_match" => RewardKind::ExactMatch { extract: raw.extract.unwrap_or_default() },
            "format" => RewardKind::Format,
            _ => {
                let need = |v: Option<usize>, key: &str| v.ok_or_else(|| format!("reward `overlong`: `{key}` is required"));
                let (max_length, cache) = (need(raw.max_length, "max_length")?, need(raw.cache, "cache")?);
                if cache == 0 || cache > max_length {
                    return Err(format!(
                        "reward `overlong`: expected 1 <= cache <= max_length, got cache {cache}, max_length {max_length}"
                    ));
                }
                RewardKind::Overlong { max_length, cache }
            }
        };
        Ok(RewardSpec { weight, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(completion: &'a str, tokens: usize, answer: Option<&'a str>) -> RewardInput<'a> {
        RewardInput { prompt: "What is 6*7?", completion, completion_tokens: tokens, answer }
    }

    fn spec(json: &str) -> Result<RewardSpec, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn exact_match_extracts_then_compares_trimmed() {
        let tags = ExactMatch { extract: Extract::default() };
        let score = |r: &ExactMatch, c: &str| r.score(&input(c, 5, Some(" 42 "))).unwrap();
        assert_eq!(score(&tags, "<think>6*7</think><answer> 42\n</answer>"), 1.0);
        // The last answer block counts.
        assert_eq!(score(&tags, "<answer>41</answer> no, <answer>42</answer>"), 1.0);
        assert_eq!(score(&tags, "<answer>42</answer> no, <answer>41</answer>"), 0.0);
        assert_eq!(score(&tags, "42"), 0.0);
        assert_eq!(score(&tags, "<answer>42"), 0.0);
        let eq = ExactMatch { extract: Extract::AfterLast("=".into()) };
        assert_eq!(score(&eq, "6*7 = 40+2 = 42"), 1.0);
        assert_eq!(score(&eq, "6*7 = 42 = 43"), 0.0);
        assert_eq!(score(&eq, "forty-two"), 0.0);
        let whole = ExactMatch { extract: Extract::Whole };
        assert_eq!(score(&whole, "\t42 "), 1.0);
        let err = tags.score(&input("<answer>42</answer>", 5, None)).unwrap_err();
        assert_eq!(err.to_string(), "reward `exact_match`: needs the prompt's reference answer, and this prompt has none");
    }

    #[test]
    fn format_is_think_then_answer() {
        for ok in
            ["<think>a</think><answer>b</answer>", "  <think>\na\n</think>\n\n<answer>\nb\n</answer>\n", "<think></think><answer></answer>"]
        {
            assert!(Format::matches(ok), "{ok:?}");
            assert_eq!(Format.score(&input(ok, 1, None)).unwrap(), 1.0);
        }
        for bad in [
            "<answer>b</answer><think>a</think>",
            "<think>a</think> text <answer>b</answer>",
            "x<think>a</think><answer>b</answer>",
            "<think>a</think><answer>b</answer>x",
            "<think>a</think>",
            "<think>a<answer>c</answer></think><answer>b</answer>",
            "<think>a</think><answer>b</answer><answer>c</answer>",
            "<think>a<think></think><answer>b</answer>",
        ] {
            assert!(!Format::matches(bad), "{bad:?}");
            assert_eq!(Format.score(&input(bad, 1, None)).unwrap(), 0.0);
        }
    }

    #[test]
    fn overlong_is_zero_then_linear_then_minus_one() {
        let r = Overlong { max_length: 20, cache: 4 };
        let at = |n| r.score(&input("", n, None)).unwrap();
        // L_max − L_cache = 16: 0 up to 16, (16 − L)/4 up to 20, −1 beyond.
        assert_eq!([at(0), at(16), at(17), at(18), at(20), at(21), at(1000)], [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]);
    }

    #[test]
    fn specs_build_a_weighted_sum() {
        let specs: Vec<RewardSpec> = serde_json::from_str(
            r#"[{"name": "exact_match", "weight": 2, "extract": {"after_last": "="}},
                {"name": "format", "weight": 0.5},
                {"name": "overlong", "max_length": 10, "cache": 5}]"#,
        )
        .unwrap();
        assert_eq!(specs[0].kind, RewardKind::ExactMatch { extract: Extract::AfterLast("=".into()) });
        assert_eq!(specs[2], RewardSpec { weight: 1.0, kind: RewardKind::Overlong { max_length: 10, cache: 5 } });
        let sum = WeightedSum::from_specs(&specs);
        // 2·1 (answer) + 0.5·0 (no tags) + 1·(5 − 7)/5.
        assert_eq!(sum.score(&input("x = 42", 7, Some("42"))).unwrap(), 2.0 - 0.4);
        // The default extraction is the answer tags.
        let tags = spec(r#"{"name": "exact_match", "extract": "whole"}"#).unwrap();
        assert_eq!(tags.kind, RewardKind::ExactMatch { extract: Extract::Whole });
        assert_eq!(spec(r#"{"name": "exact_match"}"#).unwrap().kind, RewardKind::ExactMatch { extract: Extract::default() });
    }

    #[test]
    fn bad_specs_are_errors_with_a_suggestion() {
        let err = |json: &str| spec(json).unwrap_err();
        assert!(err(r#"{"name": "exact_mach"}"#).starts_with("unknown reward `exact_mach`; did you mean `exact_match`?"));
        assert!(err(r#"{"name": "length"}"#).contains("expected one of `exact_match`, `format`, `overlong`"));
        assert!(err(r#"{"name": "overlong", "max_length": 10, "cahce": 2}"#).contains("unknown option `cahce`; did you mean `cache`?"));
        assert!(err(r#"{"name": "format", "cache": 2}"#).contains("`cache` is not one of its options (weight)"));
        assert!(err(r#"{"name": "overlong", "max_length": 10}"#).contains("`cache` is required"));
        assert!(err(r#"{"name": "overlong", "max_length": 10, "cache": 11}"#).contains("expected 1 <= cache <= max_length"));
        assert!(err(r#"{"name": "exact_match", "extract": {"before": "="}}"#).contains("unknown variant `before`"));
        assert!(err(r#"{"weight": 1}"#).contains("missing field `name`"));
    }
}
