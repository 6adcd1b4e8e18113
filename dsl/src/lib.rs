//! dsc-dsl: the spec language for DeepSeek-family architectures.
//!
//! Pipeline (one module each): [`parse`] text into the spanned [`ast`]; [`resolve`]
//! includes, `extends` chains and the schema into a checked [`model::Model`]; [`print`]
//! writes a model back as canonical spec text (`dsc check --resolved`, `dsc import`);
//! [`export`] writes the Hugging Face `config.json` of a model (training checkpoints);
//! [`import`] reads Hugging Face `config.json` files. Errors are [`diag::Diagnostic`]s
//! with spans, rendered only at the edge.

pub mod ast;
pub mod diag;
pub mod export;
pub mod files;
pub mod import;
pub mod model;
pub mod parse;
pub mod print;
pub mod resolve;
pub mod span;

pub use diag::{Diagnostic, Diagnostics};
pub use model::Model;
pub use resolve::{load, load_str, Failure, Spec};
