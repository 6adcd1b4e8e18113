//! Parsing: pest pairs to the AST, one function per grammar rule. Syntax errors become
//! [`Diagnostic`]s that say what was expected, in the grammar's words.

use crate::ast::{Block, Entry, EntryBody, File, Item, ModelDecl, Value};
use crate::diag::Diagnostic;
use crate::span::{FileId, Span, Spanned};
use pest::iterators::Pair;
use pest::Parser;

#[derive(pest_derive::Parser)]
#[grammar = "grammar.pest"]
struct SpecParser;

/// Parses one file's text.
pub fn parse_file(file: FileId, text: &str) -> Result<File, Diagnostic> {
    let mut pairs = SpecParser::parse(Rule::file, text).map_err(|e| syntax_error(file, text, e))?;
    let root = pairs.next().expect("the file rule always yields one pair");
    let cx = Cx { file, depth: std::cell::Cell::new(0) };
    let mut items = Vec::new();
    for pair in root.into_inner() {
        match pair.as_rule() {
            Rule::include => items.push(Item::Include(cx.parse_include(pair)?)),
            Rule::model => items.push(Item::Model(cx.parse_model(pair)?)),
            Rule::EOI => {}
            r => unreachable!("grammar yields no {r:?} at top level"),
        }
    }
    Ok(File { items })
}

struct Cx {
    file: FileId,
    /// Current nesting of blocks and lists; bounded so that deep input cannot exhaust
    /// the stack of the recursive functions here and downstream.
    depth: std::cell::Cell<usize>,
}

/// Deepest nesting of blocks and lists a spec may use (real specs use 3 or 4).
pub const MAX_DEPTH: usize = 64;

impl Cx {
    fn span(&self, pair: &Pair<Rule>) -> Span {
        // Non-atomic rules end after the whitespace they skipped looking for an optional
        // part (`3..` then no `step`); carets should stop at the text itself.
        let s = pair.as_span();
        let trimmed = s.as_str().trim_end().len();
        Span::new(self.file, s.start(), s.start() + trimmed)
    }

    fn spanned_str(&self, pair: &Pair<Rule>) -> Spanned<String> {
        Spanned::new(pair.as_str().to_string(), self.span(pair))
    }

    fn parse_include(&self, pair: Pair<Rule>) -> Result<Spanned<String>, Diagnostic> {
        let s = pair.into_inner().next().expect("include has a string");
        let span = self.span(&s);
        Ok(Spanned::new(unescape(s.into_inner().next().map_or("", |p| p.as_str())), span))
    }

    fn parse_model(&self, pair: Pair<Rule>) -> Result<ModelDecl, Diagnostic> {
        let mut name = None;
        let mut extends = None;
        let mut body = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::ident => name = Some(self.spanned_str(&p)),
                Rule::extends => extends = p.into_inner().next().map(|i| self.spanned_str(&i)),
                Rule::block => body = Some(self.parse_block(p)?),
                r => unreachable!("model has no {r:?}"),
            }
        }
        Ok(ModelDecl { name: name.expect("model has a name"), extends, body: body.expect("model has a body") })
    }

    /// Runs `f` one nesting level deeper, or fails at `span` past [`MAX_DEPTH`].
    fn nested<T>(&self, span: Span, f: impl FnOnce() -> Result<T, Diagnostic>) -> Result<T, Diagnostic> {
        if self.depth.get() >= MAX_DEPTH {
            return Err(Diagnostic::new(span, format!("nesting deeper than {MAX_DEPTH} levels"), "too deep")
                .with_help("specs nest sections a few levels deep; this looks like a runaway bracket"));
        }
        self.depth.set(self.depth.get() + 1);
        let r = f();
        self.depth.set(self.depth.get() - 1);
        r
    }

    fn parse_block(&self, pair: Pair<Rule>) -> Result<Block, Diagnostic> {
        let span = self.span(&pair);
        self.nested(span, || {
            let entries = pair.into_inner().map(|p| self.parse_entry(p)).collect::<Result<_, _>>()?;
            Ok(Block { entries, span })
        })
    }

    fn parse_entry(&self, pair: Pair<Rule>) -> Result<Entry, Diagnostic> {
        let span = self.span(&pair);
        let is_attr = pair.as_rule() == Rule::attribute;
        let mut inner: Vec<Pair<Rule>> = pair.into_inner().collect();
        let last = inner.pop().expect("entry has a body");
        let key = self.spanned_str(&inner[0]);
        let label = inner.get(1).map(|l| self.spanned_str(l));
        let body = if is_attr { EntryBody::Value(self.parse_value(last)?) } else { EntryBody::Block(self.parse_block(last)?) };
        Ok(Entry { key, label, body, span })
    }

    fn parse_value(&self, pair: Pair<Rule>) -> Result<Spanned<Value>, Diagnostic> {
        let span = self.span(&pair);
        let v = match pair.as_rule() {
            Rule::int => Value::Int(self.parse_int(&pair)?),
            Rule::float => {
                let f: f64 = pair.as_str().parse().map_err(|_| Diagnostic::new(span, "invalid number", "here"))?;
                if !f.is_finite() {
                    return Err(Diagnostic::new(span, "number out of range", "not a finite number"));
                }
                Value::Float(f)
            }
            Rule::boolean => Value::Bool(pair.as_str() == "true"),
            Rule::none => Value::None,
            Rule::ident => Value::Ident(pair.as_str().to_string()),
            Rule::string => Value::Str(unescape(pair.into_inner().next().map_or("", |p| p.as_str()))),
            Rule::range => {
                // `a..`, `a..b`, `a.. step s`, `a..b step s`: an int after `step` is the step.
                let mut start = None;
                let mut end = None;
                let mut step = None;
                let mut after_step = false;
                for p in pair.into_inner() {
                    match p.as_rule() {
                        Rule::step_kw => after_step = true,
                        _ if after_step => step = Some(self.parse_int(&p)?),
                        _ if start.is_none() => start = Some(self.parse_int(&p)?),
                        _ => end = Some(self.parse_int(&p)?),
                    }
                }
                Value::Range { start: start.expect("a range starts with an int"), end, step }
            }
            Rule::list => Value::List(self.nested(span, || pair.into_inner().map(|p| self.parse_value(p)).collect::<Result<_, _>>())?),
            r => unreachable!("value has no {r:?}"),
        };
        Ok(Spanned::new(v, span))
    }

    fn parse_int(&self, pair: &Pair<Rule>) -> Result<i128, Diagnostic> {
        let digits: String = pair.as_str().chars().filter(|c| *c != '_').collect();
        digits.parse::<i128>().map_err(|_| Diagnostic::new(self.span(pair), "integer out of range", "this integer is too large"))
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The grammar's rule names as a user reads them.
fn rule_name(rule: &Rule) -> String {
    match rule {
        Rule::EOI => "end of file",
        Rule::file => "a spec file",
        Rule::include => "`include \"FILE\"`",
        Rule::model => "`model NAME { ... }`",
        Rule::extends => "`extends PARENT`",
        Rule::block => "`{`",
        Rule::attribute => "`key = value`",
        Rule::section => "`section { ... }`",
        Rule::list => "a list `[...]`",
        Rule::range => "a range `a..b`",
        Rule::float | Rule::int => "a number",
        Rule::boolean => "`true` or `false`",
        Rule::none => "`none`",
        Rule::string | Rule::string_inner => "a string",
        Rule::ident => "a name",
        Rule::keyword => "a keyword",
        Rule::entry => "`key = value` or `section { ... }`",
        Rule::item => "`model` or `include`",
        Rule::value | Rule::number => "a value",
        Rule::step_kw => "`step`",
        Rule::exponent => "an exponent",
        Rule::ident_char => "a name",
        Rule::WHITESPACE | Rule::COMMENT => "whitespace",
    }
    .to_string()
}

fn syntax_error(file: FileId, text: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let (start, end) = match e.location {
        InputLocation::Pos(p) => (p, (p + text[p..].chars().next().map_or(0, char::len_utf8)).min(text.len())),
        InputLocation::Span((s, e)) => (s, e),
    };
    let span = Span::new(file, start, end);
    let found = match text[start..].chars().next() {
        None => "end of file".to_string(),
        Some(c) if c.is_whitespace() => "whitespace".to_string(),
        Some(_) => {
            let tok: String = text[start..].chars().take_while(|c| !c.is_whitespace()).take(20).collect();
            format!("`{tok}`")
        }
    };
    let message = match &e.variant {
        ErrorVariant::ParsingError { positives, negatives } => {
            let mut names: Vec<String> = positives.iter().map(rule_name).collect();
            names.dedup();
            if names.is_empty() && !negatives.is_empty() {
                format!("unexpected {}", negatives.iter().map(rule_name).collect::<Vec<_>>().join(", "))
            } else {
                format!("expected {}, found {found}", join_or(&names))
            }
        }
        ErrorVariant::CustomError { message } => message.clone(),
    };
    Diagnostic::new(span, format!("syntax error: {message}"), "here")
}

fn join_or(names: &[String]) -> String {
    match names {
        [] => "something else".into(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    }
}
