//! GRPO's inputs and the batch it trains on: prompt files, logged-rollout files, the byte
//! tokenizer, and [`TrainRows`], completions laid out for the policy model.
//!
//! A prompt line is `{"prompt": [ids] or "text", "answer": "..."}` (`answer` optional, a
//! string or a number). A rollout line is `{"prompt": [ids], "completion": [ids],
//! "reward": x, "group": k}`; lines with one `group` form one group, in the order groups
//! first appear. Errors name the file and line.

use crate::reference::Tensor;
use crate::train::TrainError;
use serde_json::Value;
use std::path::Path;

/// One prompt and its reference answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<i64>,
    pub answer: Option<String>,
    /// 1-based line in its file.
    pub line: usize,
}

/// Text to token ids, one per byte (the character-level demos' tokenizer).
pub fn encode_bytes(text: &str) -> Vec<i64> {
    text.bytes().map(i64::from).collect()
}

/// Token ids back to text: ids below 256 are bytes (invalid UTF-8 is replaced), others
/// are written `<id>`.
pub fn decode_bytes(ids: &[i64]) -> String {
    let mut out = String::new();
    let mut bytes = Vec::new();
    for &t in ids {
        if (0..256).contains(&t) {
            bytes.push(t as u8);
        } else {
            out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut bytes)));
            out.push_str(&format!("<{t}>"));
        }
    }
    out.push_str(&String::from_utf8_lossy(&bytes));
    out
}

fn lines(path: &Path) -> Result<Vec<(usize, Value)>, TrainError> {
    let text = dsc_dsl::files::read_text(path, dsc_dsl::files::JSON_LIMIT).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| TrainError::invalid(format!("{}:{}: not a JSON object: {e}", path.display(), i + 1)))?;
        if !v.is_object() {
            return Err(TrainError::invalid(format!("{}:{}: expected a JSON object", path.display(), i + 1)));
        }
        out.push((i + 1, v));
    }
    if out.is_empty() {
        return Err(TrainError::invalid(format!("{}: no lines", path.display())));
    }
    Ok(out)
}

/// Token ids in `0..vocab` from a JSON array (or, with `text`, a string).
fn ids(v: Option<&Value>, key: &str, text: bool, vocab: u64, at: &dyn Fn(String) -> TrainError) -> Result<Vec<i64>, TrainError> {
    let ids = match v {
        Some(Value::String(s)) if text => encode_bytes(s),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_i64().ok_or_else(|| at(format!("`{key}` must hold integer token ids, found {x}"))))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(at(format!(
                "`{key}` must be {}, found {other}",
                if text { "an array of ids or a string" } else { "an array of ids" }
            )))
        }
        None => return Err(at(format!("no `{key}`"))),
    };
    if let Some(t) = ids.iter().find(|&&t| t < 0 || t as u64 >= vocab) {
        return Err(at(format!("`{key}` has token id {t}, outside the vocabulary 0..{vocab}")));
    }
    Ok(ids)
}

/// Reads a prompt file, checking ids against `vocab`.
pub fn load_prompts(path: &Path, vocab: u64) -> Result<Vec<Prompt>, TrainError> {
    let mut out = Vec::new();
    for (line, v) in lines(path)? {
        let at = |m: String| TrainError::invalid(format!("{}:{line}: {m}", path.display()));
        let ids = ids(v.get("prompt"), "prompt", true, vocab, &at)?;
        if ids.is_empty() {
            return Err(at("`prompt` is empty".into()));
        }
        let answer = match v.get("answer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => return Err(at(format!("`answer` must be a string or a number, found {other}"))),
        };
        out.push(Prompt { ids, answer, line });
    }
    Ok(out)
}

/// One logged completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    pub completion: Vec<i64>,
    pub reward: f64,
}

/// A prompt's logged completions.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedGroup {
    pub prompt: Vec<i64>,
    pub completions: Vec<Logged>,
}

/// Reads a rollouts file: groups in order of first appearance; every completion of a group
/// must share its prompt.
pub fn load_rollouts(path: &Path, vocab: u64) -> Result<Vec<LoggedGroup>, TrainError> {
    let mut groups: Vec<(i64, LoggedGroup)> = Vec::new();
    for (line, v) in lines(path)? {
        let at = |m: String| TrainError::invalid(format!("{}:{line}: {m}", path.display()));
        let prompt = ids(v.get("prompt"), "prompt", false, vocab, &at)?;
        let completion = ids(v.get("completion"), "completion", false, vocab, &at)?;
        if prompt.is_empty() || completion.is_empty() {
            return Err(at("`prompt` and `completion` must not be empty".into()));
        }
        let reward = v
            .get("reward")
            .and_then(Value::as_f64)
            .filter(|r| r.is_finite())
            .ok_or_else(|| at("`reward` must be a finite number".into()))?;
        let group = v.get("group").and_then(Value::as_i64).ok_or_else(|| at("`group` must be an integer".into()))?;
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, g)) => {
                if g.prompt != prompt {
                    return Err(at(format!("group {group} has another prompt on an earlier line")));
                }
                g.completions.push(Logged { completion, reward });
            }
            None => groups.push((group, LoggedGroup { prompt, completions: vec![Logged { completion, reward }] })),
        }
    }
    if let Some((g, _)) = groups.iter().find(|(_, g)| g.completions.len() < 2) {
        return Err(TrainError::invalid(format!("{}: group {g} has one completion; GRPO compares at least two", path.display())));
    }
    Ok(groups.into_iter().map(|(_, g)| g).collect())
}

/// Completions laid out for the policy model: row i is `prompt_i ++ completion_i`,
/// right-padded; labels are the completion tokens (−100 elsewhere), so the model's
/// `logp[i, t]` is the log-probability of token `t+1`, and completion token j of row i
/// sits at column `prompt_len_i + j − 1`.
#[derive(Debug, Clone)]
pub struct TrainRows {
    pub input_ids: Tensor,
    pub positions: Tensor,
    pub labels: Tensor,
    /// Per row: prompt length and completion length.
    pub prompt_len: Vec<usize>,
    pub completion_len: Vec<usize>,
    /// Columns of every row.
    pub seq: usize,
}

impl TrainRows {
    pub fn new(rows: &[(&[i64], &[i64])]) -> TrainRows {
        let seq = rows.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0);
        let b = rows.len();
        let (mut ids, mut labels) = (vec![0i64; b * seq], vec![-100i64; b * seq]);
        for (r, (p, c)) in rows.iter().enumerate() {
            let row = &mut ids[r * seq..];
            row[..p.len()].copy_from_slice(p);
            row[p.len()..p.len() + c.len()].copy_from_slice(c);
            labels[r * seq + p.len()..r * seq + p.len() + c.len()].copy_from_slice(c);
        }
        let positions = (0..b * seq).map(|i| (i % seq) as i64).collect();
        TrainRows {
            input_ids: Tensor::i64(&[b, seq], ids),
            positions: Tensor::i64(&[b, seq], positions),
            labels: Tensor::i64(&[b, seq], labels),
            prompt_len: rows.iter().map(|(p, _)| p.len()).collect(),
            completion_len: rows.iter().map(|(_, c)| c.len()).collect(),
            seq,
        }
    }

    pub fn rows(&self) -> usize {
        self.prompt_len.len()
    }

    /// The completion tokens' values of a `[b, seq-1]` model output, as `[b][width]`
    /// (0 past each completion).
    pub fn gather(&self, logp: &Tensor, width: usize) -> Vec<Vec<f64>> {
        let v = logp.to_f64_vec();
        let w = self.seq.saturating_sub(1);
        (0..self.rows())
            .map(|i| {
                let mut row = vec![0.0; width];
                for (j, x) in row.iter_mut().enumerate().take(self.completion_len[i]) {
                    *x = v[i * w + self.prompt_len[i] + j - 1];
                }
                row
            })
            .collect()
    }

    /// `[b][width]` per completion token back to the model's `[b, seq-1]` layout.
    pub fn scatter(&self, per_token: &[Vec<f64>]) -> Tensor {
        let w = self.seq.saturating_sub(1);
        let mut out = vec![0.0f64; self.rows() * w];
        for (i, row) in per_token.iter().enumerate() {
            for (j, &x) in row.iter().enumerate().take(self.completion_len[i]) {
                out[i * w + self.prompt_len[i] + j - 1] = x;
            }
        }
        Tensor::f64(&[self.rows(), w], out)
    }

    /// Completion tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.completion_len.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_rows_line_up() {
        assert_eq!(encode_bytes("1+2="), vec![49, 43, 50, 61]);
        assert_eq!(decode_bytes(&[51, 10, 300]), "3\n<300>");
        let rows = TrainRows::new(&[(&[1, 2, 3], &[7, 8]), (&[4], &[9, 9, 9])]);
        assert_eq!(rows.seq, 5);
        assert_eq!(rows.labels.to_f64_vec(), vec![-100.0, -100.0, -100.0, 7.0, 8.0, -100.0, 9.0, 9.0, 9.0, -100.0]);
        // logp[i, t] predicts token t+1: row 0's completion at columns 2, 3; row 1's at 0..3.
        let logp = Tensor::f64(&[2, 4], vec![0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, 0.0]);
        let g = rows.gather(&logp, 4);
        assert_eq!(g, vec![vec![-1.0, -2.0, 0.0, 0.0], vec![-3.0, -4.0, -5.0, 0.0]]);
        assert_eq!(rows.scatter(&g).to_f64_vec(), logp.to_f64_vec());
    }

    #[test]
    fn files_are_checked_line_by_line() {
        let dir = std::env::temp_dir().join(format!("dsc-grpo-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("p.jsonl");
        std::fs::write(&p, "{\"prompt\": \"1+1=\", \"answer\": 2}\n{\"prompt\": [1, 2]}\n").unwrap();
        let ps = load_prompts(&p, 256).unwrap();
        assert_eq!((ps[0].ids.len(), ps[0].answer.as_deref(), ps[1].answer.as_deref()), (4, Some("2"), None));
        std::fs::write(&p, "{\"prompt\": [1, 999]}\n").unwrap();
        let e = load_prompts(&p, 256).unwrap_err().to_string();
        assert!(e.contains("p.jsonl:1") && e.contains("999"), "{e}");
        let r = dir.join("r.jsonl");
        std::fs::write(&r, "{\"prompt\": [1], \"completion\": [2], \"reward\": 1, \"group\": 0}\n{\"prompt\": [1], \"completion\": [3], \"reward\": 0, \"group\": 0}\n{\"prompt\": [5], \"completion\": [3], \"reward\": 0, \"group\": 0}\n").unwrap();
        let e = load_rollouts(&r, 256).unwrap_err().to_string();
        assert!(e.contains("r.jsonl:3") && e.contains("another prompt"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
