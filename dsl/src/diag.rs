//! Diagnostics: structured errors with spans, rendered (with miette) only at the edge.
//!
//! Libraries return [`Diagnostic`]s; the CLI and the golden tests render them with
//! [`render`], which shows the file name, line and column, the source line and a caret
//! under the offending span. Rendering has no colour and a fixed width so output is stable.

use crate::span::{SourceMap, Span};
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};
use std::fmt;

/// One error, pointing into a spec file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// What is wrong, in one sentence.
    pub message: String,
    /// Where; `None` for errors about a file as a whole (e.g. it cannot be read).
    pub span: Option<Span>,
    /// Text under the caret.
    pub label: String,
    /// How to fix it, when we know.
    pub help: Option<String>,
    /// Other places worth showing (e.g. the field that declared a size).
    pub related: Vec<(Span, String)>,
}

impl Diagnostic {
    pub fn new(span: Span, message: impl Into<String>, label: impl Into<String>) -> Self {
        Diagnostic { message: message.into(), span: Some(span), label: label.into(), help: None, related: vec![] }
    }
    pub fn without_span(message: impl Into<String>) -> Self {
        Diagnostic { message: message.into(), span: None, label: String::new(), help: None, related: vec![] }
    }
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn with_related(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related.push((span, label.into()));
        self
    }
}

/// All errors of one run, in the order found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

/// A diagnostic bound to its source text, in the shape miette renders.
struct Report {
    message: String,
    help: Option<String>,
    source: Option<NamedSource<String>>,
    labels: Vec<LabeledSpan>,
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for Report {}
impl miette::Diagnostic for Report {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() {
            None
        } else {
            Some(Box::new(self.labels.iter().cloned()))
        }
    }
}

fn source_span(span: Span) -> SourceSpan {
    SourceSpan::from((span.start as usize, (span.end - span.start) as usize))
}

/// Renders one diagnostic: `error: ...`, `file:line:col`, the source with a caret, help.
pub fn render_one(sources: &SourceMap, d: &Diagnostic) -> String {
    let mut labels = Vec::new();
    let mut elsewhere = Vec::new();
    let source = d.span.map(|span| {
        let file = sources.get(span.file);
        labels.push(LabeledSpan::new_primary_with_span(Some(d.label.clone()), source_span(span)));
        for (s, text) in &d.related {
            if s.file == span.file {
                labels.push(LabeledSpan::new_with_span(Some(text.clone()), source_span(*s)));
            } else {
                elsewhere.push(format!("  note: {}: {}", sources.location(*s), text));
            }
        }
        NamedSource::new(file.name.clone(), file.text.clone())
    });
    let report = Report { message: d.message.clone(), help: d.help.clone(), source, labels };
    let mut out = String::new();
    let handler = GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(100);
    if handler.render_report(&mut out, &report).is_err() {
        out = format!("error: {}\n", d.message);
    }
    // miette prints the message after `×` and the location as `╭─[name:line:col]`.
    let mut text = out;
    for e in elsewhere {
        text.push_str(&e);
        text.push('\n');
    }
    text
}

/// Renders all diagnostics, separated by blank lines.
pub fn render(sources: &SourceMap, ds: &Diagnostics) -> String {
    ds.0.iter().map(|d| render_one(sources, d)).collect::<Vec<_>>().join("\n")
}
