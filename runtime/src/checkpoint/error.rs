//! What can go wrong when opening a model directory, as one error type whose message a
//! person can act on: the file and what is wrong with it, or, for tensors that do not
//! fit the spec, every problem at once (a checkpoint that is wrong in 300 places should
//! not take 300 runs to fix).

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a model directory could not be opened.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointError {
    /// A file or directory could not be read (missing, permissions).
    Io { path: PathBuf, message: String },
    /// `config.json`, `generation_config.json` or the spec is unusable.
    Config { path: PathBuf, message: String },
    /// A safetensors file is not one: bad header, truncated, or its data does not match
    /// its header.
    Corrupt { path: PathBuf, message: String },
    /// `model.safetensors.index.json` is malformed, names a file that is not there, or
    /// disagrees with the files it names.
    Index { path: PathBuf, message: String },
    /// The tensors do not fit the spec: all the problems, listed (boxed: it is large,
    /// and every other error is small).
    Tensors(Box<TensorReport>),
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, e: impl fmt::Display) -> CheckpointError {
        CheckpointError::Io { path: path.to_path_buf(), message: e.to_string() }
    }
    pub(crate) fn config(path: &Path, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Config { path: path.to_path_buf(), message: message.into() }
    }
    pub(crate) fn corrupt(path: &Path, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Corrupt { path: path.to_path_buf(), message: message.into() }
    }
    pub(crate) fn index(path: &Path, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Index { path: path.to_path_buf(), message: message.into() }
    }
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::Io { path, message } => write!(f, "cannot read `{}`: {message}", path.display()),
            CheckpointError::Config { path, message } => write!(f, "`{}`: {message}", path.display()),
            CheckpointError::Corrupt { path, message } => {
                write!(f, "`{}` is not a valid safetensors file: {message}", path.display())
            }
            CheckpointError::Index { path, message } => write!(f, "`{}`: {message}", path.display()),
            CheckpointError::Tensors(r) => r.fmt(f),
        }
    }
}

impl std::error::Error for CheckpointError {}

/// Every way the checkpoint's tensors disagree with the spec. Names are the checkpoint's
/// (`model.layers.3.mlp.experts.7.up_proj.weight`), shapes as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorReport {
    /// The directory checked, and the model of the spec it was checked against.
    pub dir: PathBuf,
    pub model: String,
    /// Tensors the spec needs that no file holds, with the shape the spec expects.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Tensors no part of the spec reads, with their stored shape.
    pub unexpected: Vec<(String, Vec<usize>)>,
    /// `(name, stored shape, expected shape)`.
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Anything else about one tensor: an element type dsc does not load, a name given
    /// twice, an FP8 weight without its scale.
    pub invalid: Vec<(String, String)>,
}

impl TensorReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.misshaped.is_empty() && self.invalid.is_empty()
    }

    /// Sorted lists, so the message (and tests) do not depend on hash order.
    pub(crate) fn sort(&mut self) {
        self.missing.sort();
        self.unexpected.sort();
        self.misshaped.sort();
        self.invalid.sort();
    }
}

/// How many entries of one list the message shows: enough to see the pattern, short
/// enough that a checkpoint of the wrong model does not print 90,000 lines.
const SHOWN: usize = 40;

fn list<T>(f: &mut fmt::Formatter<'_>, title: &str, items: &[T], show: impl Fn(&T) -> String) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    write!(f, "\n  {title} ({}):", items.len())?;
    for it in items.iter().take(SHOWN) {
        write!(f, "\n    {}", show(it))?;
    }
    if items.len() > SHOWN {
        write!(f, "\n    ... and {} more", items.len() - SHOWN)?;
    }
    Ok(())
}

impl fmt::Display for TensorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the checkpoint in `{}` does not match the spec of `{}`:", self.dir.display(), self.model)?;
        list(f, "missing", &self.missing, |(n, s)| format!("{n} {s:?}"))?;
        list(f, "unexpected", &self.unexpected, |(n, s)| format!("{n} {s:?}"))?;
        list(f, "mis-shaped", &self.misshaped, |(n, got, want)| format!("{n}: stored {got:?}, the spec needs {want:?}"))?;
        list(f, "invalid", &self.invalid, |(n, why)| format!("{n}: {why}"))
    }
}
