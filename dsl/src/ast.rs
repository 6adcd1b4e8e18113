//! The syntax tree of a spec file, as written: generic blocks of `key = value` and
//! `section [label] { ... }`. No meaning is attached here (that is `resolve`'s job), but
//! every node keeps its span so that meaning-level errors point at the text.

use crate::span::{Span, Spanned};

/// A parsed file.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `include "path"`, relative to the including file.
    Include(Spanned<String>),
    Model(ModelDecl),
}

/// `model NAME [extends PARENT] { ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDecl {
    pub name: Spanned<String>,
    pub extends: Option<Spanned<String>>,
    pub body: Block,
}

/// `{ entry* }`
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub entries: Vec<Entry>,
    pub span: Span,
}

/// `key [label] = value` or `key [label] { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: Spanned<String>,
    pub label: Option<Spanned<String>>,
    pub body: EntryBody,
    /// The whole entry.
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryBody {
    Value(Spanned<Value>),
    Block(Block),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    /// `none`: the field is absent (and, in a child model, removed from the parent).
    None,
    Ident(String),
    Str(String),
    /// `start..end step step`; `end` is `None` for an open range (`3..`).
    Range {
        start: i128,
        end: Option<i128>,
        step: Option<i128>,
    },
    List(Vec<Spanned<Value>>),
}

impl Value {
    /// How the value is described in "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::None => "`none`",
            Value::Ident(_) => "a name",
            Value::Str(_) => "a string",
            Value::Range { .. } => "a range",
            Value::List(_) => "a list",
        }
    }
}
