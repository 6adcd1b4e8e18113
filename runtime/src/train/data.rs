//! Training data: a JSONL file of token ids, batched in a deterministic order.
//!
//! One JSON object per line, `{"input_ids": [...], "loss_mask": [...]}` (other keys are
//! ignored, blank lines skipped). `loss_mask[j]` (0/1 or false/true, same length) says
//! whether token `j` is a target; labels follow Hugging Face's unshifted convention:
//! `labels[j] = input_ids[j]` when it is a target, else -100, and the loss at position
//! `i` predicts `labels[i + 1]` (so position 0 is never a target).
//!
//! An epoch visits every sequence once, in an order drawn from a SplitMix64 stream (or
//! file order without shuffling); a batch is the next `batch_size` sequences of the
//! epoch (the last may be smaller), right-padded with token 0 and label -100. The
//! [`Cursor`] (epoch, index, and the generator's state at the start of the epoch) is all
//! it takes to continue with the same batches after a resume.

use super::{Batch, TrainError};
use crate::reference::Tensor;
use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The label of a position that is not a target (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;
/// The token id of padding (never a target: its label is [`IGNORE`]).
pub const PAD: i64 = 0;

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// Its 1-based line in the data file.
    pub line: usize,
}

/// Every sequence of a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
}

/// What the data is checked against.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Token ids must be below this (the model's vocabulary).
    pub vocab: Option<u64>,
    /// The longest sequence allowed (the recipe's `max_seq_len`).
    pub max_seq_len: Option<u64>,
}

impl Dataset {
    pub fn load(path: &Path, limits: Limits) -> Result<Dataset, TrainError> {
        let text = dsc_dsl::files::read_text(path, dsc_dsl::files::JSON_LIMIT).map_err(|e| TrainError::io(path, e))?;
        Dataset::parse(path, &text, limits)
    }

    /// Reads the JSONL `text`; errors name `path` and the line.
    pub fn parse(path: &Path, text: &str, limits: Limits) -> Result<Dataset, TrainError> {
        let mut examples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |msg: String| TrainError::invalid(format!("{}:{}: {msg}", path.display(), i + 1));
            let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
            let Some(obj) = v.as_object() else {
                return Err(at("expected an object `{\"input_ids\": [...]}`".into()));
            };
            let Some(ids) = obj.get("input_ids").and_then(Value::as_array) else {
                return Err(at("expected `input_ids`, a list of token ids".into()));
            };
            let input_ids = ids
                .iter()
                .enumerate()
                .map(|(j, t)| match t.as_u64() {
                    Some(t) if limits.vocab.is_none_or(|v| t < v) => Ok(t as i64),
                    Some(t) => Err(at(format!("`input_ids[{j}]` = {t} is not below the vocabulary size {}", limits.vocab.unwrap_or(0)))),
                    None => Err(at(format!("`input_ids[{j}]` must be a non-negative integer, found {t}"))),
                })
                .collect::<Result<Vec<i64>, _>>()?;
            if input_ids.is_empty() {
                return Err(at("`input_ids` is empty".into()));
            }
            if let Some(max) = limits.max_seq_len {
                if input_ids.len() as u64 > max {
                    return Err(at(format!("{} tokens, more than `max_seq_len` = {max}", input_ids.len())));
                }
            }
            let labels = match obj.get("loss_mask") {
                None | Some(Value::Null) => input_ids.clone(),
                Some(Value::Array(mask)) if mask.len() == input_ids.len() => mask
                    .iter()
                    .zip(&input_ids)
                    .enumerate()
                    .map(|(j, (m, &t))| match m {
                        Value::Bool(b) => Ok(if *b { t } else { IGNORE }),
                        Value::Number(n) if n.as_u64() == Some(1) => Ok(t),
                        Value::Number(n) if n.as_u64() == Some(0) => Ok(IGNORE),
                        _ => Err(at(format!("`loss_mask[{j}]` must be 0, 1, true or false, found {m}"))),
                    })
                    .collect::<Result<Vec<i64>, _>>()?,
                Some(Value::Array(mask)) => {
                    return Err(at(format!(
                        "`loss_mask` has {} entries, `input_ids` {}: they must be as long",
                        mask.len(),
                        input_ids.len()
                    )))
                }
                Some(other) => return Err(at(format!("`loss_mask` must be a list of 0/1, found {other}"))),
            };
            examples.push(Example { input_ids, labels, line: i + 1 });
        }
        if examples.is_empty() {
            return Err(TrainError::invalid(format!("{}: no sequences", path.display())));
        }
        Ok(Dataset { path: path.to_path_buf(), examples })
    }
}

/// Where the data order stands: saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epochs completed.
    pub epoch: u64,
    /// Sequences of this epoch already used.
    pub index: usize,
    /// The SplitMix64 state this epoch's order was drawn from.
    pub rng: u64,
}

/// Batches of a dataset, epoch after epoch.
pub struct Loader {
    data: Dataset,
    batch_size: usize,
    order: Order,
}

impl Loader {
    /// At the start of the first epoch, the order drawn from `seed`.
    pub fn new(data: Dataset, batch_size: usize, shuffle: bool, seed: u64) -> Loader {
        Loader::resume(data, batch_size, shuffle, Cursor { epoch: 0, index: 0, rng: seed })
    }

    /// Where `cursor` says, with the same order as when it was saved.
    pub fn resume(data: Dataset, batch_size: usize, shuffle: bool, cursor: Cursor) -> Loader {
        let order = Order::new(data.examples.len(), shuffle, cursor);
        Loader { data, batch_size: batch_size.max(1), order }
    }

    pub fn cursor(&self) -> Cursor {
        self.order.cursor()
    }

    pub fn dataset(&self) -> &Dataset {
        &self.data
    }

    /// The next batch; moves to the next epoch when this one is used up.
    pub fn next_batch(&mut self) -> Batch {
        let rows: Vec<&Example> = self.order.take(self.batch_size).into_iter().map(|i| &self.data.examples[i]).collect();
        collate(&rows)
    }
}

/// The order items of a dataset are visited in, epoch after epoch (reshuffled per epoch
/// when `shuffle`), resumable from its [`Cursor`].
pub struct Order {
    n: usize,
    shuffle: bool,
    cursor: Cursor,
    order: Vec<usize>,
    /// The generator's state once this epoch's order is drawn: the next epoch's start.
    next_rng: u64,
}

impl Order {
    pub fn new(n: usize, shuffle: bool, cursor: Cursor) -> Order {
        let (order, next_rng) = epoch_order(n, shuffle, cursor.rng);
        Order { n, shuffle, cursor, order, next_rng }
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Up to `k` next indices, never across an epoch's end (the last take of an epoch may
    /// be short); moves to the next epoch when this one is used up.
    pub fn take(&mut self, k: usize) -> Vec<usize> {
        if self.cursor.index >= self.order.len() {
            self.cursor = Cursor { epoch: self.cursor.epoch + 1, index: 0, rng: self.next_rng };
            (self.order, self.next_rng) = epoch_order(self.n, self.shuffle, self.cursor.rng);
        }
        let end = (self.cursor.index + k.max(1)).min(self.order.len());
        let out = self.order[self.cursor.index..end].to_vec();
        self.cursor.index = end;
        out
    }
}

/// The order of one epoch (Fisher–Yates from `rng`) and the generator's state after it.
fn epoch_order(n: usize, shuffle: bool, rng: u64) -> (Vec<usize>, u64) {
    let mut order: Vec<usize> = (0..n).collect();
    if !shuffle {
        return (order, rng);
    }
    let mut g = SplitMix64(rng);
    for i in (1..n).rev() {
        let j = g.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    (order, g.0)
}

/// Sequences right-padded to the longest into one [`Batch`].
pub fn collate(rows: &[&Example]) -> Batch {
    let s = rows.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let (mut ids, mut labels) = (vec![PAD; b * s], vec![IGNORE; b * s]);
    let mut tokens = 0;
    for (r, e) in rows.iter().enumerate() {
        ids[r * s..r * s + e.input_ids.len()].copy_from_slice(&e.input_ids);
        labels[r * s..r * s + e.labels.len()].copy_from_slice(&e.labels);
        tokens += e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count();
    }
    let positions: Vec<i64> = (0..b).flat_map(|_| 0..s as i64).collect();
    Batch {
        input_ids: Tensor::i64(&[b, s], ids),
        positions: Tensor::i64(&[b, s], positions),
        labels: Tensor::i64(&[b, s], labels),
        tokens,
        lengths: rows.iter().map(|e| e.input_ids.len()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Dataset, TrainError> {
        Dataset::parse(Path::new("d.jsonl"), text, Limits { vocab: Some(100), max_seq_len: Some(6) })
    }

    #[test]
    fn masks_become_labels_and_padding_never_counts() {
        let d = parse("{\"input_ids\": [5, 6, 7, 8], \"loss_mask\": [0, 0, 1, 1], \"text\": \"x\"}\n\n{\"input_ids\": [9, 10]}\n").unwrap();
        assert_eq!(d.examples[0].labels, [IGNORE, IGNORE, 7, 8]);
        assert_eq!((d.examples[1].labels.as_slice(), d.examples[1].line), (&[9i64, 10][..], 3));
        let b = collate(&[&d.examples[0], &d.examples[1]]);
        assert_eq!(b.input_ids, Tensor::i64(&[2, 4], vec![5, 6, 7, 8, 9, 10, PAD, PAD]));
        assert_eq!(b.labels, Tensor::i64(&[2, 4], vec![IGNORE, IGNORE, 7, 8, 9, 10, IGNORE, IGNORE]));
        assert_eq!(b.positions, Tensor::i64(&[2, 4], vec![0, 1, 2, 3, 0, 1, 2, 3]));
        // Targets at positions ≥ 1 only: 7, 8 and 10.
        assert_eq!((b.tokens, b.lengths.as_slice()), (3, &[4usize, 2][..]));
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            ("{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 200]}", "d.jsonl:2: `input_ids[1]` = 200 is not below the vocabulary size 100"),
            ("{\"input_ids\": [1, -2]}", "d.jsonl:1: `input_ids[1]` must be a non-negative integer, found -2"),
            ("{\"input_ids\": [1, 2], \"loss_mask\": [1]}", "d.jsonl:1: `loss_mask` has 1 entries"),
            ("{\"input_ids\": [1, 2], \"loss_mask\": [1, 2]}", "d.jsonl:1: `loss_mask[1]` must be 0, 1"),
            ("{\"input_ids\": [1, 2, 3, 4, 5, 6, 7]}", "d.jsonl:1: 7 tokens, more than `max_seq_len` = 6"),
            ("\n{\"ids\": [1]}", "d.jsonl:2: expected `input_ids`"),
            ("{\"input_ids\": []}", "d.jsonl:1: `input_ids` is empty"),
            ("[1, 2]", "d.jsonl:1: expected an object"),
            ("{oops", "d.jsonl:1: not valid JSON"),
            ("\n\n", "d.jsonl: no sequences"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
    }

    fn firsts(loader: &mut Loader, n: usize) -> Vec<Vec<i64>> {
        (0..n).map(|_| loader.next_batch().input_ids.to_i64_vec().unwrap()).collect()
    }

    #[test]
    fn epochs_are_shuffled_deterministically_and_resume_exactly() {
        let text: String = (1..=7).map(|i| format!("{{\"input_ids\": [{i}]}}\n")).collect();
        let d = parse(&text).unwrap();
        let mut a = Loader::new(d.clone(), 3, true, 42);
        let run = firsts(&mut a, 9);
        // Three batches per epoch (3 + 3 + 1), each epoch a permutation of all seven.
        assert_eq!(run.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1, 3, 3, 1, 3, 3, 1]);
        for epoch in run.chunks(3) {
            let mut all: Vec<i64> = epoch.concat();
            all.sort();
            assert_eq!(all, [1, 2, 3, 4, 5, 6, 7]);
        }
        assert_ne!(run[0..3], run[3..6], "a new order each epoch");
        assert_ne!(run[0..3].concat(), [1, 2, 3, 4, 5, 6, 7], "shuffled");
        assert_eq!(firsts(&mut Loader::new(d.clone(), 3, true, 42), 9), run, "same seed, same batches");
        assert_ne!(firsts(&mut Loader::new(d.clone(), 3, true, 43), 9), run);

        // Stop anywhere, resume from the cursor: the same batches follow.
        for k in [1, 3, 4, 7] {
            let mut l = Loader::new(d.clone(), 3, true, 42);
            firsts(&mut l, k);
            let c = l.cursor();
            let json = serde_json::to_string(&c).unwrap();
            let mut r = Loader::resume(d.clone(), 3, true, serde_json::from_str(&json).unwrap());
            assert_eq!(firsts(&mut r, 9 - k), run[k..], "resumed after {k}");
        }

        let mut plain = Loader::new(d, 4, false, 42);
        assert_eq!(firsts(&mut plain, 3), [vec![1, 2, 3, 4], vec![5, 6, 7], vec![1, 2, 3, 4]]);
    }
}
