//! Passes over the IR: the [`Pass`] trait, the registry of every pass by name, and the
//! context ([`PassCx`]) one pipeline run carries.
//!
//! The design follows rustc's `rustc_mir_transform` for the trait and the registry, and
//! cranelift's `Context::optimize` for the order:
//!
//! - A pass is a unit struct implementing [`Pass`], one file per pass, the struct named
//!   after the file (`cse.rs` / [`cse::Cse`]). Its [`Pass::name`] is what `--passes`,
//!   `DSC_DUMP` and dump file names use.
//! - A pass runs over the whole [`Module`]: most passes loop over its functions, but DCE
//!   drops unreachable functions and shape inference must visit callees before callers.
//! - [`Pass::is_required`] splits passes needed for correctness (verify, shape_infer) from
//!   optimizations. Only the latter may be turned off ([`runner::PassSelection`]); that
//!   is what makes `--passes -cse` and bisecting a miscompile safe.
//! - [`PASSES`] lists every pass once, so a pass name from the command line or from
//!   `DSC_DUMP` is checked against it. The order in which passes run lives elsewhere, in
//!   [`pipeline`], as explicit slices a reader sees on one screen.
//! - [`runner`] owns what every pass needs and none should repeat: skipping disabled
//!   passes, verifying after each pass, dumping IR, timing, and the phase order.
//!
//! A pass reports [`Changed`] so the runner (and fixed-point drivers) know whether the
//! module moved, or a [`PassError`] whose problems carry the spec span of the node they
//! concern, so the CLI can point into the spec file.

pub mod autodiff;
pub mod cse;
pub mod dce;
pub mod decompose;
pub mod fuse_attention;
pub mod fuse_elementwise;
pub mod fuse_rope;
pub mod fuse_swiglu;
pub mod memory_plan;
pub mod mla_absorb;
pub mod mtp_strip;
pub mod pattern;
pub mod pipeline;
pub mod rewrite;
pub mod runner;
pub mod shape_infer;
pub mod simplify;
pub mod verify;

#[cfg(test)]
pub(crate) mod test_util;

use crate::ir::{Bindings, Graph, Mode, Module, NodeId, VerifyError};
use dsc_dsl::span::{SourceMap, Span};
use dsc_dsl::{Diagnostic, Diagnostics};
use std::fmt;
use std::ops::BitOr;
use std::time::Duration;

pub use runner::{compile, run_pipeline, DumpConfig, PassSelection, PipelineError};

/// One transformation (or check) of a module.
///
/// `Sync` because the registry is a `static` slice of `&dyn Pass`; passes are unit
/// structs, and anything they learn goes into the [`PassCx`], not into `self`.
pub trait Pass: Sync {
    /// The short snake_case name used by `--passes`, `DSC_DUMP` and dump files.
    fn name(&self) -> &'static str;

    /// Whether the module is wrong without this pass (it cannot be turned off), as opposed
    /// to merely slower.
    fn is_required(&self) -> bool;

    /// The [`Phase`] the module is in after this pass, if the pass moves it forward. The
    /// runner rejects a pass that would move it backward.
    fn phase(&self) -> Option<Phase> {
        None
    }

    /// Whether the pass runs unless `--passes -name` turns it off. An opt-in pass
    /// (`decompose`) sits in its pipelines but runs only when `--passes +name` asks.
    fn on_by_default(&self) -> bool {
        true
    }

    /// Rewrite (or inspect) the module. On error the module may be left half-rewritten;
    /// the runner stops there, and a `DSC_DUMP` of this pass shows the state.
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError>;
}

/// Whether a pass modified the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Changed {
    #[default]
    No,
    Yes,
}

impl Changed {
    pub fn any(self) -> bool {
        self == Changed::Yes
    }
}

impl From<bool> for Changed {
    fn from(b: bool) -> Changed {
        if b {
            Changed::Yes
        } else {
            Changed::No
        }
    }
}

impl BitOr for Changed {
    type Output = Changed;
    fn bitor(self, o: Changed) -> Changed {
        (self.any() || o.any()).into()
    }
}

/// How far along the module is, rustc's `MirPhase` in small. Phases only move forward:
/// a pass that needs typed IR may rely on an earlier pass having typed it, and the runner
/// refuses a pipeline that would undo that. Later passes add their phases here in order
/// (MLA absorption, fusion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// As lowering built it: structurally valid, types as declared.
    Lowered,
    /// Every node's output types re-derived from its shape rule (after `shape_infer`).
    Typed,
    /// The train entry returns gradients (after `autodiff`): later passes see backward
    /// functions and gradient kernels.
    Differentiated,
    /// Fused kernels formed (after the `fuse_*` passes): later passes see `fused` nodes.
    Fused,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Lowered => "lowered",
            Phase::Typed => "typed",
            Phase::Differentiated => "differentiated",
            Phase::Fused => "fused",
        })
    }
}

/// One problem a pass found, located like a verifier error: the function, the node, and
/// the node's spec span.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The function it is in; empty for module-level problems.
    pub function: String,
    pub node: Option<NodeId>,
    pub span: Option<Span>,
    pub message: String,
}

impl Problem {
    /// A problem at node `n` of `g` (which lives in `function`), taking the node's span.
    pub fn at(function: &str, g: &Graph, n: NodeId, message: impl Into<String>) -> Problem {
        let span = if g.contains(n) { g.node(n).span } else { None };
        Problem { function: function.to_string(), node: Some(n), span, message: message.into() }
    }

    /// `in `layer_moe`: message` with `@file:line:col` when the span and sources are known.
    pub fn render(&self, sources: Option<&SourceMap>) -> String {
        let mut s = String::new();
        if !self.function.is_empty() {
            s.push_str(&format!("in `{}`: ", self.function));
        }
        s.push_str(&self.message);
        if let (Some(span), Some(map)) = (self.span, sources) {
            s.push_str(&format!(" @{}", map.location(span)));
        }
        s
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(None))
    }
}

impl From<VerifyError> for Problem {
    fn from(e: VerifyError) -> Problem {
        Problem { function: e.function, node: e.node, span: e.span, message: e.message }
    }
}

/// Why a pass failed: every problem it found (a pass, like the verifier, reports all it
/// sees rather than the first).
#[derive(Debug, Clone, PartialEq)]
pub struct PassError {
    pub problems: Vec<Problem>,
}

impl PassError {
    /// A module-level failure with no location.
    pub fn new(message: impl Into<String>) -> PassError {
        let problem = Problem { function: String::new(), node: None, span: None, message: message.into() };
        PassError { problems: vec![problem] }
    }

    /// A failure at node `n` of function `function`.
    pub fn at(function: &str, g: &Graph, n: NodeId, message: impl Into<String>) -> PassError {
        PassError { problems: vec![Problem::at(function, g, n, message)] }
    }

    /// One problem per line, with spec locations when `sources` is given.
    pub fn render(&self, sources: Option<&SourceMap>) -> String {
        self.problems.iter().map(|p| p.render(sources)).collect::<Vec<_>>().join("\n")
    }

    /// The problems as spec diagnostics, for rendering with carets under the spec text.
    /// `context` prefixes each message (e.g. "after pass `cse`").
    pub fn diagnostics(&self, context: &str) -> Diagnostics {
        problems_to_diagnostics(&self.problems, context)
    }
}

impl fmt::Display for PassError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(None))
    }
}

impl std::error::Error for PassError {}

impl From<Vec<VerifyError>> for PassError {
    fn from(errors: Vec<VerifyError>) -> PassError {
        PassError { problems: errors.into_iter().map(Problem::from).collect() }
    }
}

fn problems_to_diagnostics(problems: &[Problem], context: &str) -> Diagnostics {
    let mut ds = Diagnostics::default();
    for p in problems {
        let mut message = String::new();
        if !context.is_empty() {
            message.push_str(context);
            message.push_str(": ");
        }
        if !p.function.is_empty() {
            message.push_str(&format!("in `{}`: ", p.function));
        }
        message.push_str(&p.message);
        ds.push(match p.span {
            Some(span) => Diagnostic::new(span, message, "lowered from here"),
            None => Diagnostic::without_span(message),
        });
    }
    ds
}

/// How long one pass took, and whether it changed the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    pub pass: &'static str,
    pub run: Duration,
    /// The verifier run after the pass (zero when verification is off).
    pub verify: Duration,
    pub changed: Changed,
}

/// A pass's human-readable findings (rules fired, nodes removed, the memory plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub pass: &'static str,
    pub text: String,
}

/// What one pipeline run carries between passes: options in, reports out.
#[derive(Debug, Clone)]
pub struct PassCx<'s> {
    /// The mode being compiled; [`runner::compile`] keeps only its entry point.
    pub mode: Mode,
    /// The spec's sources, so dumps and errors print `@line:col` spans.
    pub sources: Option<&'s SourceMap>,
    /// The concrete sizes cost decisions evaluate symbolic shapes at: the memory plan
    /// now, fusion scoring later. Defaults to [`PassCx::default_sizes`].
    pub sizes: Bindings,
    /// Run the verifier after every pass and name the pass that broke an invariant.
    /// On in debug builds and tests, off in release builds unless asked for.
    pub verify_each: bool,
    /// Which passes to dump before and after, and where.
    pub dump: DumpConfig,
    phase: Phase,
    /// One entry per pass that ran, in order.
    pub timings: Vec<Timing>,
    pub reports: Vec<Report>,
    /// Set by the `memory_plan` pass.
    pub memory_plan: Option<memory_plan::Plan>,
    /// Which form MLA attention takes in inference (`mla_absorb`; `dsc compile --mla`).
    pub mla: mla_absorb::MlaMode,
    /// Recomputation and MTP options for `autodiff` (train only).
    pub train: autodiff::TrainOptions,
}

impl<'s> PassCx<'s> {
    /// A context for compiling `mode`, without sources, dumping nothing.
    pub fn new(mode: Mode) -> PassCx<'s> {
        PassCx {
            mode,
            sources: None,
            sizes: PassCx::default_sizes(mode),
            verify_each: cfg!(debug_assertions),
            dump: DumpConfig::none(),
            phase: Phase::Lowered,
            timings: Vec::new(),
            reports: Vec::new(),
            memory_plan: None,
            mla: mla_absorb::MlaMode::Auto,
            train: autodiff::TrainOptions::default(),
        }
    }

    /// [`PassCx::new`] with the dump settings of `DSC_DUMP` and `DSC_DUMP_DIR` (see
    /// [`DumpConfig::from_env`]); a pass name there is checked against the registry.
    /// `new` itself never reads the environment, so tests are not steered by it.
    pub fn from_env(mode: Mode) -> Result<PassCx<'s>, PipelineError> {
        let mut cx = PassCx::new(mode);
        cx.dump = DumpConfig::from_env()?;
        Ok(cx)
    }

    /// Print spans against these sources.
    pub fn with_sources(mut self, sources: &'s SourceMap) -> PassCx<'s> {
        self.sources = Some(sources);
        self
    }

    /// One sequence of 4096 tokens: a full prompt for prefill and train, one new token
    /// after 4096 cached ones for decode (the context `dsc stats` uses by default).
    pub fn default_sizes(mode: Mode) -> Bindings {
        match mode {
            Mode::Prefill | Mode::Train => Bindings { batch: 1, seq: 4096, cache: 0 },
            Mode::Decode => Bindings { batch: 1, seq: 1, cache: 4096 },
        }
    }

    /// The phase the module has reached.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Record a pass's findings.
    pub fn report(&mut self, pass: &'static str, text: impl Into<String>) {
        self.reports.push(Report { pass, text: text.into() });
    }

    /// A table of the time each pass took: `pass  run  verify  changed`.
    pub fn timing_report(&self) -> String {
        let mut s = String::from("pass                  run (ms)  verify (ms)  changed\n");
        for t in &self.timings {
            s.push_str(&format!(
                "{:<20} {:>9.3} {:>12.3}  {}\n",
                t.pass,
                t.run.as_secs_f64() * 1e3,
                t.verify.as_secs_f64() * 1e3,
                if t.changed.any() { "yes" } else { "no" }
            ));
        }
        s
    }
}

/// Every pass, once. `--passes` and `DSC_DUMP` names are checked against this list; the
/// order here is only the order error messages list the names in.
pub static PASSES: &[&dyn Pass] = &[
    &verify::Verify,
    &shape_infer::ShapeInfer,
    &simplify::Simplify,
    &mla_absorb::MlaAbsorb,
    &mtp_strip::MtpStrip,
    &autodiff::Autodiff,
    &cse::Cse,
    &dce::Dce,
    &decompose::Decompose,
    &fuse_swiglu::FuseSwiGlu,
    &fuse_rope::FuseRope,
    &fuse_attention::FuseAttention,
    &fuse_elementwise::FuseElementwise,
    &memory_plan::MemoryPlan,
];

/// The names of every registered pass, in registry order.
pub fn pass_names() -> Vec<&'static str> {
    PASSES.iter().map(|p| p.name()).collect()
}

/// The registered pass called `name`.
pub fn find_pass(name: &str) -> Option<&'static dyn Pass> {
    PASSES.iter().copied().find(|p| p.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn registry_names_are_unique_snake_case() {
        let names = pass_names();
        let set: HashSet<_> = names.iter().collect();
        assert_eq!(set.len(), names.len(), "{names:?}");
        for n in names {
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{n}");
            assert_eq!(find_pass(n).map(|p| p.name()), Some(n));
        }
        assert!(find_pass("fuse").is_none());
    }

    #[test]
    fn changed_combines() {
        assert_eq!(Changed::No | Changed::No, Changed::No);
        assert_eq!(Changed::No | Changed::Yes, Changed::Yes);
        assert_eq!(Changed::from(true), Changed::Yes);
    }

    #[test]
    fn errors_render_with_locations() {
        let mut sources = SourceMap::new();
        let f = sources.add(std::path::Path::new("t.dsc"), "t.dsc".into(), "model t {\n  x = 1\n}\n".into());
        let p = Problem { function: "layer".into(), node: None, span: Some(Span::new(f, 12, 13)), message: "bad".into() };
        let e = PassError { problems: vec![p] };
        assert_eq!(e.to_string(), "in `layer`: bad");
        assert_eq!(e.render(Some(&sources)), "in `layer`: bad @t.dsc:2:3");
        let d = e.diagnostics("after pass `cse`");
        assert_eq!(d.0[0].message, "after pass `cse`: in `layer`: bad");
        assert_eq!(d.0[0].span, Some(Span::new(f, 12, 13)));
    }
}
