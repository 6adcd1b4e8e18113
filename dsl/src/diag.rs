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
    SourceSpan::from((span.start as usize, span.end.saturating_sub(span.start) as usize))
}

/// Lines longer than this are not shown whole: the renderer would lay out every column
/// (miette panics past column 65,535), and nobody reads a 70,000-character line.
const MAX_SHOWN_LINE: usize = 1000;

/// Renders one diagnostic: `error: ...`, `file:line:col`, the source with a caret, help.
pub fn render_one(sources: &SourceMap, d: &Diagnostic) -> String {
    if let Some(span) = d.span {
        let text = &sources.get(span.file).text;
        // miette shows the labelled lines and one line of context around them.
        let long = |sp: Span| {
            if sp.start as usize > text.len() || sp.end as usize > text.len() {
                return true;
            }
            let (start, end) = line_bounds(text, sp.start as usize);
            let (_, last_end) = line_bounds(text, sp.end as usize);
            let from = if start > 0 { line_bounds(text, start - 1).0 } else { start };
            let to = if last_end < text.len() { line_bounds(text, last_end + 1).1 } else { last_end };
            text[from..to].split('\n').any(|l| l.len() > MAX_SHOWN_LINE) || end.abs_diff(last_end) > 10 * MAX_SHOWN_LINE
        };
        if long(span) || d.related.iter().any(|(sp, _)| sp.file == span.file && long(*sp)) {
            let (start, end) = line_bounds(text, span.start as usize);
            return render_clipped(sources, d, span, start, end);
        }
    }
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

/// The byte range of the line holding `offset` (clamped to the text).
fn line_bounds(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char(text, offset.min(text.len()));
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    (start, end)
}

fn floor_char(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A diagnostic on a very long line, drawn as miette draws the others but with the line
/// cut to 60 characters either side of the span (`…` where it was cut); the location
/// keeps the real line and column.
fn render_clipped(sources: &SourceMap, d: &Diagnostic, span: Span, start: usize, end: usize) -> String {
    let text = &sources.get(span.file).text;
    let s = floor_char(text, (span.start as usize).clamp(start, end));
    let e = floor_char(text, (span.end as usize).clamp(s, end));
    let from = floor_char(text, s.saturating_sub(60).max(start));
    let to = floor_char(text, (e + 60).min(end));
    let (lead, trail) = (if from > start { "…" } else { "" }, if to < end { "…" } else { "" });
    let excerpt = format!("{lead}{}{trail}", &text[from..to]);
    let pad = lead.chars().count() + text[from..s].chars().count();
    let width = text[s..e].chars().count().max(1);
    let (line, _) = sources.line_col(span);
    let mut out = format!("  × {}\n   ╭─[{}]\n", d.message, sources.location(span));
    out.push_str(&format!("{line:>4} │ {excerpt}\n     · {}{} {}\n     ╰────\n", " ".repeat(pad), "─".repeat(width), d.label));
    if let Some(h) = &d.help {
        out.push_str(&format!("  help: {h}\n"));
    }
    for (rs, note) in &d.related {
        out.push_str(&format!("  note: {}: {}\n", sources.location(*rs), note));
    }
    out
}

/// Renders all diagnostics, separated by blank lines.
pub fn render(sources: &SourceMap, ds: &Diagnostics) -> String {
    ds.0.iter().map(|d| render_one(sources, d)).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::FileId;
    use std::path::Path;

    fn one_file(text: String) -> (SourceMap, FileId) {
        let mut m = SourceMap::new();
        let id = m.add(Path::new("t.dsc"), "t.dsc".into(), text);
        (m, id)
    }

    /// The error at the end of a 70,000-character line (miette panicked past column 65,535):
    /// the real line and column, and an excerpt around the span.
    #[test]
    fn a_very_long_line_is_clipped_around_the_span() {
        let text = format!("model m {{\n  vocab = 256 {}bogus = 1\n}}\n", " ".repeat(70_000));
        let at = text.find("bogus").unwrap();
        let (m, id) = one_file(text);
        let d = Diagnostic::new(Span::new(id, at, at + 5), "unknown field `bogus`", "here").with_help("remove it");
        let out = render_one(&m, &d);
        assert!(out.contains("[t.dsc:2:70015]") && out.contains("unknown field `bogus`") && out.contains("help: remove it"), "{out}");
        assert!(out.contains("…") && out.contains("bogus = 1") && out.len() < 1000, "{out}");
    }

    /// No span position makes the renderer panic: lines of every length up to past 65,535
    /// columns, multi-byte characters, spans at and past the end of the text, empty and
    /// line-crossing spans, a related label on another long line.
    #[test]
    fn rendering_never_panics_on_any_span() {
        let mut text = String::from("model m {\n  hidden = 7 // é ü 中文\n");
        for n in [0usize, 1, 80, 999, 1000, 1001, 65_534, 65_536, 70_000] {
            text.push_str(&"x".repeat(n));
            text.push_str("é\n");
        }
        text.push('}');
        let len = text.len();
        let (m, id) = one_file(text);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % (n as u64 + 1)) as usize
        };
        let mut starts: Vec<usize> = vec![0, 1, len - 1, len, len + 5];
        starts.extend((0..400).map(|_| next(len + 10)));
        for start in starts {
            let end = start + [0, 1, 3, 100, 70_000][next(4)];
            let related = Span::new(id, next(len), next(len).max(start.min(len)));
            let d = Diagnostic::new(Span::new(id, start, end), "m", "l").with_related(related, "r");
            let out = render_one(&m, &d);
            assert!(out.contains('m'), "{start}..{end}: {out}");
        }
    }
}
