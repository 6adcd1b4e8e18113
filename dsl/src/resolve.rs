//! Resolution: files → one checked [`Model`].
//!
//! Three plain steps, each collecting every error it finds before giving up:
//! 1. **load**: parse the root file and, transitively, every `include` (paths relative to
//!    the including file; cycles and missing files are errors at the `include`);
//! 2. **merge**: flatten the `extends` chain of the chosen model into one block. A child
//!    entry replaces the parent's entry of the same key (for `ffn`, the same key *and*
//!    label); two sections that both are blocks merge field by field; `key = none`
//!    removes what the parent set;
//! 3. **elaborate**: read the merged block against the schema (unknown keys get a
//!    "did you mean", wrong types say what was expected, documented defaults fill what is
//!    absent), then check cross-field consistency.
//!
//! Every value read is recorded in a [`SpanMap`] under its dotted path
//! (`ffn.moe.router.top_k`), so later stages (lowering, checkpoint checks) can point at
//! the spec text too.

use crate::ast::{Block, Entry, EntryBody, File, Item, ModelDecl, Value};
use crate::diag::{Diagnostic, Diagnostics};
use crate::model::*;
use crate::parse::parse_file;
use crate::span::{FileId, SourceMap, Span, Spanned};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Bounds on sizes, so that every count downstream fits comfortably in u64/u128 and a
/// typo such as `hidden = 71680000000` is an error rather than an overflow later.
pub struct Limits;
impl Limits {
    pub const DIM: u64 = 1 << 24;
    pub const LAYERS: u64 = 1 << 14;
    pub const EXPERTS: u64 = 1 << 16;
    pub const VOCAB: u64 = 1 << 26;
    pub const CONTEXT: u64 = 1 << 40;
}
pub const LIMITS: Limits = Limits;

/// A resolved spec: the model, the sources it came from, and where each field was written.
#[derive(Debug, Clone)]
pub struct Spec {
    pub sources: SourceMap,
    pub model: Model,
    pub spans: SpanMap,
}

/// Resolution failed: the diagnostics, with the sources needed to render them.
#[derive(Debug, Clone)]
pub struct Failure {
    pub sources: SourceMap,
    pub diagnostics: Diagnostics,
}

impl Failure {
    pub fn render(&self) -> String {
        crate::diag::render(&self.sources, &self.diagnostics)
    }
}

/// Dotted field path → the span of its value (or of its section for blocks).
#[derive(Debug, Clone, Default)]
pub struct SpanMap(pub BTreeMap<String, Span>);

impl SpanMap {
    pub fn get(&self, path: &str) -> Option<Span> {
        self.0.get(path).copied()
    }
}

/// Loads the spec at `path` and resolves the model named `model` (or the only model the
/// file itself defines).
pub fn load(path: &Path, model: Option<&str>) -> Result<Spec, Failure> {
    let mut sources = SourceMap::new();
    let text = match crate::files::read_text(path, crate::files::TEXT_LIMIT) {
        Ok(t) => t,
        Err(e) => {
            let d = Diagnostic::without_span(format!("cannot read spec file `{}`: {e}", path.display()));
            return Err(Failure { sources, diagnostics: d.into() });
        }
    };
    let name = path.display().to_string();
    resolve_text(&mut sources, path, name, text, model).map_err(|diagnostics| Failure { sources, diagnostics })
}

/// Resolves spec text that has not been read from disk (`includes` are looked up
/// relative to `path`'s directory). Used by tests and the mutation fuzzer.
pub fn load_str(path: &Path, text: &str, model: Option<&str>) -> Result<Spec, Failure> {
    let mut sources = SourceMap::new();
    let name = path.display().to_string();
    resolve_text(&mut sources, path, name, text.to_string(), model).map_err(|diagnostics| Failure { sources, diagnostics })
}

fn resolve_text(sources: &mut SourceMap, path: &Path, name: String, text: String, model: Option<&str>) -> Result<Spec, Diagnostics> {
    let root = sources.add(path, name, text);
    let mut diags = Diagnostics::default();
    let mut files: Vec<(FileId, File)> = Vec::new();
    load_recursive(sources, root, &mut vec![], &mut files, &mut diags);
    if !diags.is_empty() {
        return Err(diags);
    }

    // Every model of every file, by name; names are global across includes.
    let mut table: HashMap<String, (FileId, &ModelDecl)> = HashMap::new();
    let mut root_models: Vec<&ModelDecl> = Vec::new();
    for (fid, file) in &files {
        for item in &file.items {
            if let Item::Model(m) = item {
                if let Some((_, prev)) = table.get(m.name.node.as_str()) {
                    diags.push(
                        Diagnostic::new(m.name.span, format!("model `{}` is defined twice", m.name.node), "second definition")
                            .with_related(prev.name.span, "first definition"),
                    );
                    continue;
                }
                table.insert(m.name.node.clone(), (*fid, m));
                if *fid == root {
                    root_models.push(m);
                }
            }
        }
    }
    for (_, file) in &files {
        for item in &file.items {
            if let Item::Model(m) = item {
                check_duplicates(&m.body, &mut diags);
            }
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }

    let chosen: &ModelDecl = match model {
        Some(want) => match table.get(want) {
            Some((_, m)) => m,
            None => {
                let names: Vec<&str> = table.keys().map(String::as_str).collect();
                let mut d =
                    Diagnostic::without_span(format!("no model named `{want}` in `{}` or the files it includes", sources.get(root).name));
                d = with_suggestion(d, want, &names, "model");
                return Err(d.into());
            }
        },
        None => match root_models.as_slice() {
            [one] => one,
            [] => {
                let span = Span::new(root, 0, 0);
                return Err(Diagnostic::new(span, "this file defines no model", "expected `model NAME { ... }`")
                    .with_help("add a `model NAME { ... }` block")
                    .into());
            }
            many => {
                let names: Vec<String> = many.iter().map(|m| format!("`{}`", m.name.node)).collect();
                return Err(Diagnostic::without_span(format!(
                    "`{}` defines {} models ({}); choose one with --model NAME",
                    sources.get(root).name,
                    many.len(),
                    names.join(", ")
                ))
                .into());
            }
        },
    };

    let merged = merge_chain(chosen, &table)?;
    let mut el = Elaborator { diags: Diagnostics::default(), spans: SpanMap::default() };
    let model = el.model(&chosen.name.node, &merged);
    match model {
        Some(m) if el.diags.is_empty() => Ok(Spec { sources: sources.clone(), model: m, spans: el.spans }),
        _ => {
            if el.diags.is_empty() {
                el.diags.push(Diagnostic::without_span("internal: resolution failed without a diagnostic"));
            }
            Err(el.diags)
        }
    }
}

/// Step 1: parse `id` and everything it includes, depth first; `stack` detects cycles.
fn load_recursive(sources: &mut SourceMap, id: FileId, stack: &mut Vec<FileId>, out: &mut Vec<(FileId, File)>, diags: &mut Diagnostics) {
    let file = match parse_file(id, &sources.get(id).text) {
        Ok(f) => f,
        Err(d) => {
            diags.push(d);
            return;
        }
    };
    stack.push(id);
    let base = sources.get(id).path.parent().map(Path::to_path_buf).unwrap_or_default();
    for item in &file.items {
        let Item::Include(inc) = item else { continue };
        let target: PathBuf = base.join(&inc.node);
        let canon = target.canonicalize().unwrap_or(target.clone());
        if let Some(existing) = sources.find(&canon) {
            if stack.contains(&existing) {
                diags.push(Diagnostic::new(inc.span, format!("`{}` includes itself (an include cycle)", inc.node), "cycle here"));
            }
            // Already loaded through another path: its models are in `out` once.
            continue;
        }
        match crate::files::read_text(&target, crate::files::TEXT_LIMIT) {
            Ok(text) => {
                let name = tidy_name(display_relative(&sources.get(id).name, &inc.node), &canon);
                let child = sources.add(&canon, name, text);
                load_recursive(sources, child, stack, out, diags);
            }
            Err(e) => diags.push(
                Diagnostic::new(inc.span, format!("cannot read included file `{}`: {e}", target.display()), "included here")
                    .with_help("include paths are relative to the file that contains the `include`"),
            ),
        }
    }
    stack.pop();
    out.push((id, file));
}

/// The display name of an included file: relative to the includer's name.
fn display_relative(includer: &str, inc: &str) -> String {
    match Path::new(includer).parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(inc).display().to_string(),
        _ => inc.to_string(),
    }
}

/// `name` without `.` and `dir/..` steps (`mine/../specs/v3.dsc` is `specs/v3.dsc`), when
/// that still names the file `canon` (a symlinked `mine` would make `..` go elsewhere;
/// the name is then kept as it was).
fn tidy_name(name: String, canon: &Path) -> String {
    use std::path::Component;
    let mut parts: Vec<Component> = Vec::new();
    for c in Path::new(&name).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(parts.last(), Some(Component::Normal(_))) => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let tidy: PathBuf = parts.iter().collect();
    if tidy.as_os_str().is_empty() || tidy.as_os_str() == name.as_str() || tidy.canonicalize().ok().as_deref() != Some(canon) {
        return name;
    }
    tidy.display().to_string()
}

/// Keys that may appear several times in one block, told apart by their label.
const MULTI_KEYS: &[&str] = &["ffn"];

fn same_entry(a: &Entry, b: &Entry) -> bool {
    a.key.node == b.key.node
        && (!MULTI_KEYS.contains(&a.key.node.as_str()) || a.label.as_ref().map(|l| &l.node) == b.label.as_ref().map(|l| &l.node))
}

/// A field written twice in one block is an error (in a child, overriding is the point).
fn check_duplicates(block: &Block, diags: &mut Diagnostics) {
    for (i, e) in block.entries.iter().enumerate() {
        if let Some(prev) = block.entries[..i].iter().find(|p| same_entry(p, e)) {
            diags.push(
                Diagnostic::new(e.key.span, format!("`{}` is set twice in the same block", entry_name(e)), "set again here")
                    .with_related(prev.key.span, "first set here"),
            );
        }
        if let EntryBody::Block(b) = &e.body {
            check_duplicates(b, diags);
        }
    }
}

fn entry_name(e: &Entry) -> String {
    match &e.label {
        Some(l) => format!("{} {}", e.key.node, l.node),
        None => e.key.node.clone(),
    }
}

/// Step 2: the model's body with its ancestors' bodies merged underneath.
fn merge_chain(m: &ModelDecl, table: &HashMap<String, (FileId, &ModelDecl)>) -> Result<Block, Diagnostics> {
    let mut chain = vec![m];
    let mut seen: HashSet<&str> = HashSet::from([m.name.node.as_str()]);
    let mut cur = m;
    while let Some(parent) = &cur.extends {
        match table.get(parent.node.as_str()) {
            Some((_, p)) => {
                if !seen.insert(p.name.node.as_str()) {
                    let mut names: Vec<&str> = chain.iter().map(|c| c.name.node.as_str()).collect();
                    names.push(&p.name.node);
                    return Err(Diagnostic::new(parent.span, format!("`extends` cycle: {}", names.join(" → ")), "closes the cycle")
                        .with_help("a model cannot be its own ancestor")
                        .into());
                }
                chain.push(p);
                cur = p;
            }
            None => {
                // Never suggest the model itself or one of its descendants: extending them
                // is a cycle, not a fix.
                let own: Vec<&str> = chain.iter().map(|c| c.name.node.as_str()).collect();
                let names: Vec<&str> = table.keys().map(String::as_str).filter(|n| !own.contains(n)).collect();
                let p = &parent.node;
                let bring = format!(
                    "a parent must be defined in this file or in one it includes: add `include \"FILE.dsc\"` for the file that defines `{p}` (the published ones are in specs/, e.g. `include \"deepseek_v2.dsc\"`)"
                );
                let best =
                    names.iter().map(|k| (strsim::jaro_winkler(p, k), *k)).filter(|(s, _)| *s > 0.8).max_by(|a, b| a.0.total_cmp(&b.0));
                let help = match best {
                    Some((_, k)) => format!("did you mean `{k}`? Otherwise, {bring}"),
                    None => bring,
                };
                let d = Diagnostic::new(parent.span, format!("unknown parent model `{p}`"), "not defined");
                return Err(d.with_help(help).into());
            }
        }
    }
    let mut merged = chain.pop().expect("chain holds at least the model").body.clone();
    while let Some(child) = chain.pop() {
        merged = merge_blocks(&merged, &child.body);
    }
    Ok(merged)
}

fn merge_blocks(parent: &Block, child: &Block) -> Block {
    let mut out = parent.clone();
    out.span = child.span;
    for ce in &child.entries {
        match out.entries.iter().position(|pe| same_entry(pe, ce)) {
            Some(i) => {
                let pe = &out.entries[i];
                let same_label = pe.label.as_ref().map(|l| &l.node) == ce.label.as_ref().map(|l| &l.node);
                out.entries[i] = match (&pe.body, &ce.body) {
                    (EntryBody::Block(pb), EntryBody::Block(cb)) if same_label => {
                        Entry { body: EntryBody::Block(merge_blocks(pb, cb)), ..ce.clone() }
                    }
                    _ => ce.clone(),
                };
            }
            None => out.entries.push(ce.clone()),
        }
    }
    out
}

/// Adds "did you mean `x`?" when a known name is close to `got`.
fn with_suggestion(d: Diagnostic, got: &str, known: &[&str], what: &str) -> Diagnostic {
    let best = known.iter().map(|k| (strsim::jaro_winkler(got, k), *k)).filter(|(s, _)| *s > 0.8).max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, k)) => d.with_help(format!("did you mean `{k}`?")),
        None if !known.is_empty() && known.len() <= 12 => {
            let mut ks: Vec<&str> = known.to_vec();
            ks.sort();
            d.with_help(format!("known {what}s: {}", ks.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")))
        }
        None => d,
    }
}

/// Step 3: reads merged blocks against the schema.
struct Elaborator {
    diags: Diagnostics,
    spans: SpanMap,
}

/// One block being read: which of its entries the schema has consumed.
struct Obj<'a> {
    block: &'a Block,
    /// Dotted path of this block, e.g. `ffn.moe.router`.
    path: String,
    /// How the block is named in messages, e.g. "`router`".
    what: String,
    known: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    fn new(block: &'a Block, path: &str, what: &str) -> Self {
        Obj { block, path: path.to_string(), what: what.to_string(), known: vec![] }
    }
    fn entry(&mut self, key: &'static str) -> Option<&'a Entry> {
        self.known.push(key);
        self.block.entries.iter().find(|e| e.key.node == key)
    }
    fn entries(&mut self, key: &'static str) -> Vec<&'a Entry> {
        self.known.push(key);
        self.block.entries.iter().filter(|e| e.key.node == key).collect()
    }
    fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

/// What kind of value a field holds, for "expected X" messages.
#[derive(Clone, Copy)]
enum Want {
    Int { min: u64, max: u64 },
    Float { min: f64, max: f64, min_exclusive: bool },
}

impl Elaborator {
    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// Reports entries the schema never asked for.
    fn finish(&mut self, obj: &Obj) {
        for e in &obj.block.entries {
            if !obj.known.contains(&e.key.node.as_str()) {
                let d = Diagnostic::new(e.key.span, format!("unknown field `{}` in {}", e.key.node, obj.what), "not a field here");
                let mut known = obj.known.clone();
                known.sort();
                known.dedup();
                self.err(with_suggestion(d, &e.key.node, &known, "field"));
            }
        }
    }

    /// The value of an attribute, or an error if `key` is a section. `none` reads as absent.
    fn value<'a>(&mut self, obj: &mut Obj<'a>, key: &'static str) -> Option<&'a Spanned<Value>> {
        let e = obj.entry(key)?;
        if let Some(l) = &e.label {
            self.err(Diagnostic::new(l.span, format!("`{key}` takes no label"), "unexpected label"));
        }
        match &e.body {
            EntryBody::Value(v) if matches!(v.node, Value::None) => None,
            EntryBody::Value(v) => {
                self.spans.0.insert(obj.field_path(key), v.span);
                Some(v)
            }
            EntryBody::Block(b) => {
                self.err(
                    Diagnostic::new(e.key.span, format!("`{key}` is a value, not a section"), "written as a section")
                        .with_help(format!("write `{key} = ...`"))
                        .with_related(b.span, "this block"),
                );
                None
            }
        }
    }

    /// Whether a required `key` is set (to something other than `none`); if not, reports
    /// it missing, suggesting `key = example`.
    fn require(&mut self, obj: &mut Obj, key: &'static str, example: &str) -> bool {
        if obj.block.entries.iter().any(|e| e.key.node == key && !is_none(e)) {
            return true;
        }
        obj.known.push(key);
        self.missing(obj, key, example);
        false
    }

    fn missing(&mut self, obj: &Obj, key: &str, example: &str) {
        self.err(
            Diagnostic::new(
                section_head(obj.block),
                format!("missing required field `{key}` in {}", obj.what),
                format!("{} needs `{key}`", obj.what),
            )
            .with_help(format!("add `{key} = {example}`")),
        );
    }

    fn number(&mut self, obj: &mut Obj, key: &'static str, want: Want) -> Option<f64> {
        let v = self.value(obj, key)?;
        let (x, is_int) = match v.node {
            Value::Int(i) => (i as f64, true),
            Value::Float(f) => (f, false),
            ref other => {
                let expected = match want {
                    Want::Int { .. } => "an integer",
                    Want::Float { .. } => "a number",
                };
                self.err(Diagnostic::new(
                    v.span,
                    format!("`{key}` must be {expected}, found {}", other.describe()),
                    format!("expected {expected}"),
                ));
                return None;
            }
        };
        match want {
            Want::Int { min, max } => {
                if !is_int {
                    self.err(Diagnostic::new(
                        v.span,
                        format!("`{key}` must be an integer, found a fractional number"),
                        "expected an integer",
                    ));
                    return None;
                }
                let Value::Int(i) = v.node else { unreachable!() };
                if i < min as i128 || i > max as i128 {
                    self.err(Diagnostic::new(v.span, format!("`{key}` = {i} is out of range"), format!("expected {min} ≤ {key} ≤ {max}")));
                    return None;
                }
                Some(x)
            }
            Want::Float { min, max, min_exclusive } => {
                let low_ok = if min_exclusive { x > min } else { x >= min };
                if !low_ok || x > max {
                    let op = if min_exclusive { "<" } else { "≤" };
                    // `{:e}` past 1e±6: `{}` would spell 1e-300 with 300 digits.
                    let show = |y: f64| if y != 0.0 && !(1e-6..1e6).contains(&y.abs()) { format!("{y:e}") } else { format!("{y}") };
                    self.err(Diagnostic::new(
                        v.span,
                        format!("`{key}` = {} is out of range", show(x)),
                        format!("expected {} {op} {key} ≤ {}", show(min), show(max)),
                    ));
                    return None;
                }
                Some(x)
            }
        }
    }

    fn int(&mut self, obj: &mut Obj, key: &'static str, min: u64, max: u64) -> Option<u64> {
        self.number(obj, key, Want::Int { min, max }).map(|x| x as u64)
    }
    fn req_int(&mut self, obj: &mut Obj, key: &'static str, min: u64, max: u64) -> Option<u64> {
        if !self.require(obj, key, "<integer>") {
            return None;
        }
        self.int(obj, key, min, max)
    }
    fn float(&mut self, obj: &mut Obj, key: &'static str, min: f64, max: f64, min_exclusive: bool) -> Option<f64> {
        self.number(obj, key, Want::Float { min, max, min_exclusive })
    }
    fn req_float(&mut self, obj: &mut Obj, key: &'static str, min: f64, max: f64, min_exclusive: bool) -> Option<f64> {
        if !self.require(obj, key, "<number>") {
            return None;
        }
        self.float(obj, key, min, max, min_exclusive)
    }
    fn boolean(&mut self, obj: &mut Obj, key: &'static str) -> Option<bool> {
        let v = self.value(obj, key)?;
        match v.node {
            Value::Bool(b) => Some(b),
            ref other => {
                self.err(Diagnostic::new(
                    v.span,
                    format!("`{key}` must be `true` or `false`, found {}", other.describe()),
                    "expected `true` or `false`",
                ));
                None
            }
        }
    }
    /// A name from a fixed set.
    fn choice<T: Copy>(&mut self, obj: &mut Obj, key: &'static str, options: &[(&'static str, T)]) -> Option<T> {
        let v = self.value(obj, key)?;
        let names: Vec<&str> = options.iter().map(|o| o.0).collect();
        let list = names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        match &v.node {
            Value::Ident(s) | Value::Str(s) => match options.iter().find(|o| o.0 == s) {
                Some(o) => Some(o.1),
                None => {
                    let d = Diagnostic::new(v.span, format!("`{s}` is not a valid `{key}`"), format!("expected one of {list}"));
                    self.err(with_suggestion(d, s, &names, "value"));
                    None
                }
            },
            other => {
                self.err(Diagnostic::new(v.span, format!("`{key}` must be one of {list}, found {}", other.describe()), "expected a name"));
                None
            }
        }
    }
    fn req_choice<T: Copy>(&mut self, obj: &mut Obj, key: &'static str, options: &[(&'static str, T)]) -> Option<T> {
        let ex = options.iter().map(|o| o.0).collect::<Vec<_>>().join(" | ");
        if !self.require(obj, key, &ex) {
            return None;
        }
        self.choice(obj, key, options)
    }

    /// A nested section `key { ... }` (without label). `Ok(None)` when absent or `none`.
    fn section<'a>(&mut self, obj: &mut Obj<'a>, key: &'static str) -> Option<&'a Entry> {
        let e = obj.entry(key)?;
        match &e.body {
            EntryBody::Block(b) => {
                self.spans.0.insert(obj.field_path(key), section_head_of(e, b));
                Some(e)
            }
            EntryBody::Value(v) if matches!(v.node, Value::None) => None,
            EntryBody::Value(v) => {
                self.err(
                    Diagnostic::new(v.span, format!("`{key}` is a section, not a value"), "expected `{ ... }`")
                        .with_help(format!("write `{key} {{ ... }}`, or `{key} = none` to remove it")),
                );
                None
            }
        }
    }

    fn model(&mut self, name: &str, body: &Block) -> Option<Model> {
        let mut top = Obj::new(body, "", &format!("model `{name}`"));
        let vocab = self.req_int(&mut top, "vocab", 1, Limits::VOCAB);
        let hidden = self.req_int(&mut top, "hidden", 1, Limits::DIM);
        let layers = self.req_int(&mut top, "layers", 1, Limits::LAYERS);
        let dtype = self
            .choice(&mut top, "dtype", &[("f32", DType::F32), ("bf16", DType::Bf16), ("f16", DType::F16), ("fp8", DType::Fp8)])
            .or(Some(DType::Bf16));
        let tie_embeddings = self.boolean(&mut top, "tie_embeddings").unwrap_or(false);
        let norm_eps = self.req_float(&mut top, "norm_eps", 0.0, 1.0, true);

        let attention = self.attention(&mut top, hidden);
        let rope = self.rope(&mut top);
        let ffn = self.ffns(&mut top, layers);
        let mtp = self.mtp(&mut top, ffn.as_deref());
        self.finish(&top);

        let model = Model {
            name: name.to_string(),
            vocab: vocab?,
            hidden: hidden?,
            layers: layers?,
            dtype: dtype?,
            tie_embeddings,
            norm_eps: norm_eps?,
            attention: attention?,
            rope: rope?,
            ffn: ffn?,
            mtp: mtp.ok()?,
        };
        Some(model)
    }

    fn attention(&mut self, top: &mut Obj, hidden: Option<u64>) -> Option<Attention> {
        let Some(e) = self.section(top, "attention") else {
            if top.block.entries.iter().all(|e| e.key.node != "attention") {
                self.err(
                    Diagnostic::new(
                        section_head(top.block),
                        format!("missing required section `attention` in {}", top.what),
                        "needs `attention`",
                    )
                    .with_help("add `attention mla { ... }`, `attention gqa { ... }` or `attention mha { ... }`"),
                );
            }
            return None;
        };
        let EntryBody::Block(b) = &e.body else { return None };
        let Some(kind) = &e.label else {
            self.err(
                Diagnostic::new(e.key.span, "`attention` needs a kind", "expected `attention mha`, `attention gqa` or `attention mla`")
                    .with_help("write `attention mla { ... }` (or `mha`, `gqa`)"),
            );
            return None;
        };
        match kind.node.as_str() {
            "mha" | "gqa" => {
                let mha = kind.node == "mha";
                let mut o = Obj::new(b, "attention", &format!("`attention {}`", kind.node));
                let heads = self.req_int(&mut o, "heads", 1, Limits::DIM);
                let kv_heads = if mha { heads } else { self.req_int(&mut o, "kv_heads", 1, Limits::DIM) };
                let head_dim_given = self.int(&mut o, "head_dim", 1, Limits::DIM);
                self.finish(&o);
                let (heads, kv_heads) = (heads?, kv_heads?);
                if heads % kv_heads != 0 {
                    let span = self.spans.get("attention.kv_heads").unwrap_or(kind.span);
                    let mut d = Diagnostic::new(
                        span,
                        format!("`heads` = {heads} is not divisible by `kv_heads` = {kv_heads}"),
                        "must divide `heads`",
                    )
                    .with_help("each key/value head serves an equal group of query heads");
                    if let Some(h) = self.spans.get("attention.heads") {
                        d = d.with_related(h, "heads declared here");
                    }
                    self.err(d);
                    return None;
                }
                let head_dim = match head_dim_given {
                    Some(d) => d,
                    None => {
                        let hidden = hidden?;
                        if hidden % heads != 0 {
                            let span = self.spans.get("attention.heads").unwrap_or(kind.span);
                            self.err(
                                Diagnostic::new(
                                    span,
                                    format!("`hidden` = {hidden} is not divisible by `heads` = {heads}"),
                                    "head_dim = hidden / heads is not whole",
                                )
                                .with_help("set `head_dim` explicitly"),
                            );
                            return None;
                        }
                        hidden / heads
                    }
                };
                if head_dim % 2 != 0 {
                    let span = self.spans.get("attention.head_dim").or(self.spans.get("attention.heads")).unwrap_or(kind.span);
                    self.err(
                        Diagnostic::new(span, format!("head_dim = {head_dim} is odd"), "RoPE rotates pairs of dims")
                            .with_help("use an even head dimension"),
                    );
                    return None;
                }
                Some(Attention::Gqa(Gqa { heads, kv_heads, head_dim }))
            }
            "mla" => {
                let mut o = Obj::new(b, "attention", "`attention mla`");
                let heads = self.req_int(&mut o, "heads", 1, Limits::DIM);
                let q_lora_rank = self.int(&mut o, "q_lora_rank", 1, Limits::DIM);
                let kv_lora_rank = self.req_int(&mut o, "kv_lora_rank", 1, Limits::DIM);
                let nope = self.req_int(&mut o, "qk_nope_head_dim", 1, Limits::DIM);
                let rope = self.req_int(&mut o, "qk_rope_head_dim", 1, Limits::DIM);
                let v = self.req_int(&mut o, "v_head_dim", 1, Limits::DIM);
                let eps = self.float(&mut o, "latent_norm_eps", 0.0, 1.0, true).unwrap_or(1e-6);
                self.finish(&o);
                let rope = rope?;
                if rope % 2 != 0 {
                    let span = self.spans.get("attention.qk_rope_head_dim").unwrap_or(kind.span);
                    self.err(
                        Diagnostic::new(span, format!("`qk_rope_head_dim` = {rope} is odd"), "RoPE rotates pairs of dims")
                            .with_help("use an even dimension"),
                    );
                    return None;
                }
                Some(Attention::Mla(Mla {
                    heads: heads?,
                    q_lora_rank,
                    kv_lora_rank: kv_lora_rank?,
                    qk_nope_head_dim: nope?,
                    qk_rope_head_dim: rope,
                    v_head_dim: v?,
                    latent_norm_eps: eps,
                }))
            }
            other => {
                let d = Diagnostic::new(kind.span, format!("unknown attention kind `{other}`"), "expected `mha`, `gqa` or `mla`");
                self.err(with_suggestion(d, other, &["mha", "gqa", "mla"], "attention kind"));
                None
            }
        }
    }

    fn rope(&mut self, top: &mut Obj) -> Option<Rope> {
        let Some(e) = self.section(top, "rope") else {
            if top.block.entries.iter().all(|e| e.key.node != "rope") {
                self.err(
                    Diagnostic::new(section_head(top.block), format!("missing required section `rope` in {}", top.what), "needs `rope`")
                        .with_help("add `rope { theta = 10000, layout = half_split }`"),
                );
            }
            return None;
        };
        let EntryBody::Block(b) = &e.body else { return None };
        self.no_label(e);
        let mut o = Obj::new(b, "rope", "`rope`");
        // Below 1 the inverse frequencies theta^(-2i/d) grow past f32 (1e-300 gave
        // all-NaN logits); published models use 1e4 to 1e7.
        let theta = self.req_float(&mut o, "theta", 1.0, 1e12, false);
        let layout = self.req_choice(&mut o, "layout", &[("half_split", RopeLayout::HalfSplit), ("interleaved", RopeLayout::Interleaved)]);
        let yarn = match self.section(&mut o, "yarn") {
            Some(ye) => {
                self.no_label(ye);
                let EntryBody::Block(yb) = &ye.body else { return None };
                let mut y = Obj::new(yb, "rope.yarn", "`yarn`");
                let factor = self.req_float(&mut y, "factor", 1.0, 1e6, false);
                let original = self.req_int(&mut y, "original_context", 1, Limits::CONTEXT);
                let beta_fast = self.float(&mut y, "beta_fast", 0.0, 1e6, true).unwrap_or(32.0);
                let beta_slow = self.float(&mut y, "beta_slow", 0.0, 1e6, true).unwrap_or(1.0);
                let mscale = self.req_float(&mut y, "mscale", 0.0, 100.0, false);
                let mscale_all_dim = self.req_float(&mut y, "mscale_all_dim", 0.0, 100.0, false);
                self.finish(&y);
                if beta_fast < beta_slow {
                    let span = self.spans.get("rope.yarn.beta_fast").unwrap_or(yb.span);
                    self.err(
                        Diagnostic::new(
                            span,
                            format!("`beta_fast` = {beta_fast} is below `beta_slow` = {beta_slow}"),
                            "expected beta_fast ≥ beta_slow",
                        )
                        .with_help("beta_fast bounds the high-frequency end of the YaRN ramp (32 in DeepSeek), beta_slow the low end (1)"),
                    );
                }
                Some(Some(Yarn {
                    factor: factor?,
                    original_context: original?,
                    beta_fast,
                    beta_slow,
                    mscale: mscale?,
                    mscale_all_dim: mscale_all_dim?,
                }))
            }
            None => Some(None),
        };
        self.finish(&o);
        Some(Rope { theta: theta?, layout: layout?, yarn: yarn? })
    }

    fn no_label(&mut self, e: &Entry) {
        if let Some(l) = &e.label {
            self.err(Diagnostic::new(l.span, format!("`{}` takes no label", e.key.node), "unexpected label"));
        }
    }

    fn ffns(&mut self, top: &mut Obj, layers: Option<u64>) -> Option<Vec<FfnBlock>> {
        let entries = top.entries("ffn");
        if entries.iter().all(|e| is_none(e)) {
            self.err(
                Diagnostic::new(
                    section_head(top.block),
                    format!("missing feed-forward blocks in {}", top.what),
                    "needs at least one `ffn`",
                )
                .with_help("add `ffn dense { layers = 0.., intermediate = ... }` or `ffn moe { ... }`"),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        // (block index, owner layer set span) for the coverage check.
        let mut owners: Vec<(usize, Span)> = Vec::new();
        for e in entries {
            if is_none(e) {
                continue;
            }
            let EntryBody::Block(b) = &e.body else {
                self.err(Diagnostic::new(e.key.span, "`ffn` is a section", "expected `ffn dense { ... }` or `ffn moe { ... }`"));
                ok = false;
                continue;
            };
            let Some(kind) = &e.label else {
                self.err(Diagnostic::new(e.key.span, "`ffn` needs a kind", "expected `ffn dense` or `ffn moe`"));
                ok = false;
                continue;
            };
            let path = format!("ffn.{}", kind.node);
            self.spans.0.insert(path.clone(), kind.span);
            let mut o = Obj::new(b, &path, &format!("`ffn {}`", kind.node));
            let set = self.layer_set(&mut o, layers);
            let kind_v = match kind.node.as_str() {
                "dense" => {
                    let i = self.req_int(&mut o, "intermediate", 1, Limits::DIM);
                    i.map(|intermediate| Ffn::Dense { intermediate })
                }
                "moe" => self.moe(&mut o, &path).map(Ffn::Moe),
                other => {
                    let d = Diagnostic::new(kind.span, format!("unknown feed-forward kind `{other}`"), "expected `dense` or `moe`");
                    self.err(with_suggestion(d, other, &["dense", "moe"], "ffn kind"));
                    None
                }
            };
            self.finish(&o);
            match (set, kind_v) {
                (Some((set, span)), Some(k)) => {
                    owners.push((out.len(), span));
                    out.push(FfnBlock { layers: set, kind: k });
                }
                _ => ok = false,
            }
        }
        if !ok {
            return None;
        }
        // Every layer belongs to exactly one block.
        let layers = layers?;
        let mut owner: Vec<Option<usize>> = vec![None; layers as usize];
        let mut bad = false;
        for (i, span) in &owners {
            for l in 0..layers {
                if out[*i].layers.contains(l) {
                    if let Some(prev) = owner[l as usize] {
                        if !bad {
                            self.err(
                                Diagnostic::new(*span, format!("layer {l} is given two feed-forward blocks"), "overlaps another block")
                                    .with_related(
                                        owners.iter().find(|o| o.0 == prev).map(|o| o.1).unwrap_or(*span),
                                        "which also has this layer",
                                    ),
                            );
                        }
                        bad = true;
                    }
                    owner[l as usize] = Some(*i);
                }
            }
        }
        let gaps: Vec<u64> = (0..layers).filter(|l| owner[*l as usize].is_none()).collect();
        if !gaps.is_empty() {
            let shown: Vec<String> = gaps.iter().take(8).map(u64::to_string).collect();
            let more = if gaps.len() > 8 { format!(" and {} more", gaps.len() - 8) } else { String::new() };
            let span = self.spans.get("layers").unwrap_or(section_head(top.block));
            let what = if gaps.len() == 1 { "layer" } else { "layers" };
            let verb = if gaps.len() == 1 { "has" } else { "have" };
            self.err(
                Diagnostic::new(
                    span,
                    format!("{what} {}{more} {verb} no feed-forward block", shown.join(", ")),
                    format!("{layers} layers declared here"),
                )
                .with_help("the `layers` ranges of the `ffn` blocks must cover 0..layers exactly once"),
            );
            bad = true;
        }
        if bad {
            return None;
        }
        Some(out)
    }

    /// `layers = 0..3`, `layers = 3..`, `layers = 5`, `layers = [0..1, 2..28 step 2]`.
    fn layer_set(&mut self, o: &mut Obj, layers: Option<u64>) -> Option<(LayerSet, Span)> {
        let key = "layers";
        if !self.require(o, key, "0..3") {
            return None;
        }
        let v = self.value(o, key)?;
        let items: Vec<&Spanned<Value>> = match &v.node {
            Value::List(items) if !items.is_empty() => items.iter().collect(),
            Value::List(_) => {
                self.err(Diagnostic::new(v.span, "`layers` is empty", "expected at least one range"));
                return None;
            }
            _ => vec![v],
        };
        let layers = layers?;
        let mut ranges = Vec::new();
        for it in items {
            let (start, end, step) = match &it.node {
                Value::Int(i) => (*i, Some(*i + 1), None),
                Value::Range { start, end, step } => (*start, *end, *step),
                other => {
                    self.err(Diagnostic::new(
                        it.span,
                        format!("`layers` must be a range such as `0..3` or `3..`, found {}", other.describe()),
                        "expected a layer range",
                    ));
                    return None;
                }
            };
            let open = end.is_none();
            let end = end.unwrap_or(layers as i128);
            let step = step.unwrap_or(1);
            if start < 0 || step < 1 || end < start || end > layers as i128 {
                let why = if step < 1 {
                    "the step must be at least 1".to_string()
                } else if open && start >= layers as i128 {
                    // `3..` with 2 layers: not reversed, it starts past the end.
                    format!("`{start}..` starts past the last layer ({})", layers.saturating_sub(1))
                } else if end < start {
                    "the range is reversed".to_string()
                } else {
                    format!("layers are numbered 0..{layers}")
                };
                let mut d = Diagnostic::new(it.span, format!("layer range out of bounds: {why}"), format!("the model has {layers} layers"));
                // The layer count may be set elsewhere (a child overriding its parent's
                // `layers`): point at it too.
                if let Some(at) = self.spans.get("layers").filter(|at| at.file != it.span.file) {
                    d = d.with_related(at, format!("`layers = {layers}` is set here"));
                }
                self.err(d);
                return None;
            }
            if end == start {
                self.err(Diagnostic::new(it.span, "empty layer range", "contains no layer"));
                return None;
            }
            ranges.push(LayerRange { start: start as u64, end: end as u64, step: step as u64 });
        }
        // Ranges of one set must not overlap either (`[0..3, 1..3]`): each layer is listed once.
        let set = LayerSet { ranges };
        if let Some(l) = (0..layers).find(|l| set.ranges.iter().filter(|r| LayerSet { ranges: vec![**r] }.contains(*l)).count() > 1) {
            self.err(
                Diagnostic::new(v.span, format!("layer {l} is listed twice in this layer set"), "ranges overlap")
                    .with_help("list each layer once"),
            );
            return None;
        }
        Some((set, v.span))
    }

    fn moe(&mut self, o: &mut Obj, path: &str) -> Option<Moe> {
        let routed = self.req_int(o, "routed_experts", 1, Limits::EXPERTS);
        let shared = self.int(o, "shared_experts", 0, Limits::EXPERTS).or(Some(0));
        let inter = self.req_int(o, "expert_intermediate", 1, Limits::DIM);
        let router = match self.section(o, "router") {
            Some(e) => {
                self.no_label(e);
                let EntryBody::Block(b) = &e.body else { return None };
                self.router(b, &format!("{path}.router"), routed)
            }
            None => {
                self.err(
                    Diagnostic::new(
                        section_head(o.block),
                        format!("missing required section `router` in {}", o.what),
                        "needs `router { ... }`",
                    )
                    .with_help("add `router { top_k = ..., scoring = softmax | sigmoid, normalize = always | never | top_k_gt_1 }`"),
                );
                None
            }
        };
        let balance = match self.section(o, "balance") {
            Some(e) => {
                self.no_label(e);
                let EntryBody::Block(b) = &e.body else { return None };
                let mut bo = Obj::new(b, &format!("{path}.balance"), "`balance`");
                let mut f = |el: &mut Self, k: &'static str| el.float(&mut bo, k, 0.0, 1e3, false).unwrap_or(0.0);
                let bal = Balance {
                    expert_aux: f(self, "expert_aux"),
                    device_aux: f(self, "device_aux"),
                    comm_aux: f(self, "comm_aux"),
                    sequence_aux: f(self, "sequence_aux"),
                    bias_update_speed: f(self, "bias_update_speed"),
                };
                self.finish(&bo);
                Some(bal)
            }
            None => Some(Balance { expert_aux: 0.0, device_aux: 0.0, comm_aux: 0.0, sequence_aux: 0.0, bias_update_speed: 0.0 }),
        };
        let (router, balance) = (router?, balance?);
        if balance.bias_update_speed > 0.0 && !router.selection_bias {
            let span = self.spans.get(&format!("{path}.balance.bias_update_speed")).unwrap_or(o.block.span);
            self.err(
                Diagnostic::new(span, "`bias_update_speed` needs a selection bias to update", "no `selection_bias` in the router")
                    .with_help("set `router { selection_bias = true }`, or remove `bias_update_speed`"),
            );
            return None;
        }
        Some(Moe { routed_experts: routed?, shared_experts: shared?, expert_intermediate: inter?, router, balance })
    }

    fn router(&mut self, b: &Block, path: &str, routed: Option<u64>) -> Option<Router> {
        let mut o = Obj::new(b, path, "`router`");
        let top_k = self.req_int(&mut o, "top_k", 1, Limits::EXPERTS);
        let scoring = self.req_choice(&mut o, "scoring", &[("softmax", Scoring::Softmax), ("sigmoid", Scoring::Sigmoid)]);
        let selection_bias = self.boolean(&mut o, "selection_bias").unwrap_or(false);
        let groups = self.int(&mut o, "groups", 1, Limits::EXPERTS).unwrap_or(1);
        let groups_kept = self.int(&mut o, "groups_kept", 1, Limits::EXPERTS).unwrap_or(groups);
        let group_score = self.choice(&mut o, "group_score", &[("max", GroupScore::Max), ("top2_sum", GroupScore::Top2Sum)]);
        let normalize = self.req_choice(
            &mut o,
            "normalize",
            &[("always", Normalize::Always), ("never", Normalize::Never), ("top_k_gt_1", Normalize::TopKGt1)],
        );
        let scale = self.float(&mut o, "scale", 0.0, 1e6, true).unwrap_or(1.0);
        let scale_normalized = self.boolean(&mut o, "scale_normalized").unwrap_or(true);
        self.finish(&o);
        let (top_k, routed) = (top_k?, routed?);
        let at = |s: &Self, k: &str| s.spans.get(&format!("{path}.{k}")).unwrap_or(b.span);
        let mut ok = true;
        if top_k > routed {
            let d = Diagnostic::new(
                at(self, "top_k"),
                format!("`top_k` = {top_k} exceeds the {routed} routed experts"),
                "more experts per token than exist",
            )
            .with_related(self.spans.get(&path.replace(".router", ".routed_experts")).unwrap_or(b.span), "routed experts declared here");
            self.err(d);
            ok = false;
        }
        if routed % groups != 0 {
            self.err(
                Diagnostic::new(
                    at(self, "groups"),
                    format!("`groups` = {groups} does not divide the {routed} routed experts"),
                    "must divide `routed_experts`",
                )
                .with_help("experts are split into equal groups"),
            );
            ok = false;
        } else if groups_kept > groups {
            self.err(Diagnostic::new(
                at(self, "groups_kept"),
                format!("`groups_kept` = {groups_kept} exceeds `groups` = {groups}"),
                "cannot keep more groups than exist",
            ));
            ok = false;
        } else if groups > 1 && groups_kept * (routed / groups) < top_k {
            self.err(
                Diagnostic::new(
                    at(self, "groups_kept"),
                    format!("the {groups_kept} kept groups hold {} experts, fewer than `top_k` = {top_k}", groups_kept * (routed / groups)),
                    "too few experts left to choose from",
                )
                .with_help("raise `groups_kept` or lower `top_k`"),
            );
            ok = false;
        }
        if groups > 1 && group_score.is_none() {
            self.err(
                Diagnostic::new(at(self, "groups"), format!("`groups` = {groups} needs a `group_score`"), "group-limited routing")
                    .with_help("add `group_score = max` (DeepSeek-V2) or `group_score = top2_sum` (DeepSeek-V3)"),
            );
            ok = false;
        }
        if groups > 1 && group_score == Some(GroupScore::Top2Sum) && routed % groups == 0 && routed / groups < 2 {
            self.err(Diagnostic::new(at(self, "group_score"), "`top2_sum` needs at least 2 experts per group", "groups of one expert"));
            ok = false;
        }
        if groups == 1 && group_score.is_some() {
            self.err(
                Diagnostic::new(at(self, "group_score"), "`group_score` has no effect without groups", "`groups` is 1")
                    .with_help("remove `group_score`, or set `groups` > 1"),
            );
            ok = false;
        }
        if !ok {
            return None;
        }
        Some(Router {
            top_k,
            scoring: scoring?,
            selection_bias,
            groups,
            groups_kept,
            group_score: if groups > 1 { group_score } else { None },
            normalize: normalize?,
            scale,
            scale_normalized,
        })
    }

    fn mtp(&mut self, top: &mut Obj, ffn: Option<&[FfnBlock]>) -> Result<Option<Mtp>, ()> {
        let Some(e) = self.section(top, "mtp") else { return Ok(None) };
        self.no_label(e);
        let EntryBody::Block(b) = &e.body else { return Err(()) };
        let mut o = Obj::new(b, "mtp", "`mtp`");
        let depth = self.req_int(&mut o, "depth", 1, 64);
        let loss_weight = self.req_float(&mut o, "loss_weight", 0.0, 1e3, false);
        let concat = match self.value(&mut o, "concat") {
            None => {
                o.known.push("concat");
                self.missing(&o, "concat", "[embedding, hidden]");
                None
            }
            Some(v) => {
                let parsed: Option<Vec<MtpInput>> = match &v.node {
                    Value::List(items) => items
                        .iter()
                        .map(|i| match &i.node {
                            Value::Ident(s) if s == "embedding" => Some(MtpInput::Embedding),
                            Value::Ident(s) if s == "hidden" => Some(MtpInput::Hidden),
                            _ => None,
                        })
                        .collect(),
                    _ => None,
                };
                match parsed.as_deref() {
                    Some([a, b]) if a != b => Some([*a, *b]),
                    _ => {
                        self.err(Diagnostic::new(
                            v.span,
                            "`concat` must list `embedding` and `hidden` once each",
                            "expected `[embedding, hidden]` or `[hidden, embedding]`",
                        ));
                        None
                    }
                }
            }
        };
        let ffn_name = self.value(&mut o, "ffn");
        self.finish(&o);
        let ffn_index = match (ffn_name, ffn) {
            (None, _) => {
                o.known.push("ffn");
                self.missing(&o, "ffn", "moe");
                None
            }
            (Some(v), Some(blocks)) => {
                let name = match &v.node {
                    Value::Ident(s) => s.as_str(),
                    _ => "",
                };
                let found = blocks.iter().position(|b| match (&b.kind, name) {
                    (Ffn::Dense { .. }, "dense") | (Ffn::Moe(_), "moe") => true,
                    _ => false,
                });
                if found.is_none() {
                    self.err(Diagnostic::new(
                        v.span,
                        "`ffn` must name one of the model's feed-forward blocks",
                        "expected `dense` or `moe`, as defined above",
                    ));
                }
                found
            }
            (Some(_), None) => None,
        };
        match (depth, loss_weight, concat, ffn_index) {
            (Some(depth), Some(loss_weight), Some(concat), Some(ffn)) => Ok(Some(Mtp { depth, loss_weight, concat, ffn })),
            _ => Err(()),
        }
    }
}

fn is_none(e: &Entry) -> bool {
    matches!(&e.body, EntryBody::Value(v) if matches!(v.node, Value::None))
}

/// The span to blame for a missing field: the opening of the block.
fn section_head(b: &Block) -> Span {
    Span { end: (b.span.start + 1).min(b.span.end), ..b.span }
}

fn section_head_of(e: &Entry, b: &Block) -> Span {
    e.key.span.to(section_head(b))
}
