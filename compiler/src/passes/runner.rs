//! The pass runner: runs a pipeline over a module and owns the cross-cutting work, as
//! rustc's `run_passes_inner` does.
//!
//! For each pass of the slice, in order:
//!
//! ```text
//!   disabled by --passes? ── yes ──▶ skip (never a required pass: PassSelection refuses)
//!        │ no
//!   would move the phase backward? ──▶ PipelineError::PhaseRegression
//!   DSC_DUMP names it? ──▶ dump "before"
//!   run (timed)
//!   DSC_DUMP names it? ──▶ dump "after"   (even on failure, so a broken module is seen)
//!   pass returned Err? ──▶ PipelineError::Failed { pass, .. }
//!   verify_each? ──▶ ir::verify ──▶ Err ──▶ PipelineError::BrokeInvariants { pass, .. }
//! ```
//!
//! Verifying after every pass (cranelift's `verify_if`) is on in debug builds and tests:
//! a pass that breaks an invariant is named at once instead of surfacing passes later.
//! Dumps go to stderr, or to `DSC_DUMP_DIR/<mode>.<NN>.<pass>.<before|after>.ir` where
//! `NN` is the pass's position in the pipeline (so a pass that runs twice dumps twice).

use super::{find_pass, pass_names, pipeline, Pass, PassCx, PassError, Phase, Problem, Timing};
use crate::ir::{print_module, verify, Mode, Module, VerifyError};
use dsc_dsl::span::SourceMap;
use dsc_dsl::Diagnostics;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a pipeline did not finish, or could not be set up.
#[derive(Debug, Clone, PartialEq)]
pub enum PipelineError {
    /// `--passes` or `DSC_DUMP` named a pass that does not exist.
    UnknownPass { name: String, valid: Vec<&'static str> },
    /// `--passes` tried to turn off a pass the module cannot do without.
    RequiredPass { name: &'static str },
    /// A `--passes` item is neither `-name` nor `+name`.
    BadSelection { item: String },
    /// The mode has no entry point in the module.
    NoEntry { mode: Mode },
    /// A pass reported errors.
    Failed { pass: &'static str, error: PassError },
    /// The verifier rejected the module a pass left behind.
    BrokeInvariants { pass: &'static str, errors: Vec<VerifyError> },
    /// A pass would move the module to an earlier phase.
    PhaseRegression { pass: &'static str, from: Phase, to: Phase },
    /// A dump file could not be written.
    Dump { path: PathBuf, message: String },
}

impl PipelineError {
    /// The error with spec locations (`@file:line:col`) on each problem.
    pub fn render(&self, sources: Option<&SourceMap>) -> String {
        let list = |ps: &[Problem]| ps.iter().map(|p| format!("\n  {}", p.render(sources))).collect::<String>();
        match self {
            PipelineError::Failed { pass, error } => format!("pass `{pass}` failed:{}", list(&error.problems)),
            PipelineError::BrokeInvariants { pass, errors } => {
                let ps: Vec<Problem> = errors.iter().cloned().map(Problem::from).collect();
                format!("pass `{pass}` broke {} IR invariant(s):{}", ps.len(), list(&ps))
            }
            other => other.to_string(),
        }
    }

    /// The error as spec diagnostics, so the CLI can show the spec lines the failing nodes
    /// were lowered from. Errors with no node to point at become one span-less diagnostic.
    pub fn diagnostics(&self) -> Diagnostics {
        match self {
            PipelineError::Failed { pass, error } => error.diagnostics(&format!("pass `{pass}` failed")),
            PipelineError::BrokeInvariants { pass, errors } => {
                PassError::from(errors.clone()).diagnostics(&format!("pass `{pass}` broke an IR invariant"))
            }
            other => dsc_dsl::Diagnostic::without_span(other.to_string()).into(),
        }
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::UnknownPass { name, valid } => {
                write!(f, "unknown pass `{name}`; the passes are: {}", valid.join(", "))
            }
            PipelineError::RequiredPass { name } => {
                write!(f, "pass `{name}` is required for a correct module and cannot be turned off")
            }
            PipelineError::BadSelection { item } => {
                write!(f, "`{item}`: write `-name` to turn a pass off or `+name` to turn it back on")
            }
            PipelineError::NoEntry { mode } => write!(f, "the module has no {mode} entry point"),
            PipelineError::Failed { .. } | PipelineError::BrokeInvariants { .. } => f.write_str(&self.render(None)),
            PipelineError::PhaseRegression { pass, from, to } => {
                write!(f, "pass `{pass}` would move the module back from phase {from} to {to}")
            }
            PipelineError::Dump { path, message } => write!(f, "cannot write IR dump `{}`: {message}", path.display()),
        }
    }
}

impl std::error::Error for PipelineError {}

fn lookup(name: &str) -> Result<&'static dyn Pass, PipelineError> {
    find_pass(name).ok_or_else(|| PipelineError::UnknownPass { name: name.to_string(), valid: pass_names() })
}

// ---------------------------------------------------------------- selection

/// Which passes are turned off, from `--passes -cse,-simplify` (rustc's
/// `-Zmir-enable-passes`), and which opt-in passes ([`Pass::on_by_default`] false, such as
/// `decompose`) are turned on with `+name`. Names are checked against the registry, so a
/// typo is an error that lists the valid names, and a required pass can never be turned
/// off. A later item wins: `-cse,+cse` leaves CSE on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSelection {
    disabled: BTreeSet<&'static str>,
    enabled: BTreeSet<&'static str>,
}

impl PassSelection {
    /// Every pass that is on by default (opt-in passes stay off).
    pub fn all() -> PassSelection {
        PassSelection::default()
    }

    /// Parse a comma-separated list of `-name` / `+name`; blank items are ignored.
    pub fn parse(text: &str) -> Result<PassSelection, PipelineError> {
        let mut sel = PassSelection::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some(name) = item.strip_prefix('-') {
                sel.disable(name)?;
            } else if let Some(name) = item.strip_prefix('+') {
                sel.enable(name)?;
            } else {
                return Err(PipelineError::BadSelection { item: item.to_string() });
            }
        }
        Ok(sel)
    }

    /// Turn `name` off; refuses unknown and required passes.
    pub fn disable(&mut self, name: &str) -> Result<(), PipelineError> {
        let pass = lookup(name)?;
        if pass.is_required() {
            return Err(PipelineError::RequiredPass { name: pass.name() });
        }
        self.enabled.remove(pass.name());
        self.disabled.insert(pass.name());
        Ok(())
    }

    /// Turn `name` on (back on, or on at all for an opt-in pass).
    pub fn enable(&mut self, name: &str) -> Result<(), PipelineError> {
        let pass = lookup(name)?;
        self.disabled.remove(pass.name());
        if !pass.on_by_default() {
            self.enabled.insert(pass.name());
        }
        Ok(())
    }

    pub fn is_enabled(&self, pass: &dyn Pass) -> bool {
        if pass.on_by_default() {
            !self.disabled.contains(pass.name())
        } else {
            self.enabled.contains(pass.name())
        }
    }
}

// ---------------------------------------------------------------- dumps

/// Which passes to dump the module around, and where: `DSC_DUMP=cse,dce` or
/// `DSC_DUMP=all`, to stderr, or to files under `DSC_DUMP_DIR`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpConfig {
    all: bool,
    passes: BTreeSet<&'static str>,
    dir: Option<PathBuf>,
}

impl DumpConfig {
    /// Dump nothing.
    pub fn none() -> DumpConfig {
        DumpConfig::default()
    }

    /// From `DSC_DUMP` and `DSC_DUMP_DIR`.
    pub fn from_env() -> Result<DumpConfig, PipelineError> {
        let dump = std::env::var("DSC_DUMP").ok();
        let dir = std::env::var_os("DSC_DUMP_DIR").map(PathBuf::from);
        DumpConfig::parse(dump.as_deref(), dir.as_deref())
    }

    /// `which` is `all` or a comma-separated list of pass names (checked against the
    /// registry); `None` or blank dumps nothing. `dir` sends dumps to files instead of
    /// stderr.
    pub fn parse(which: Option<&str>, dir: Option<&Path>) -> Result<DumpConfig, PipelineError> {
        let mut cfg = DumpConfig { dir: dir.map(Path::to_path_buf), ..DumpConfig::default() };
        for item in which.unwrap_or("").split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if item == "all" {
                cfg.all = true;
            } else {
                cfg.passes.insert(lookup(item)?.name());
            }
        }
        Ok(cfg)
    }

    pub fn wants(&self, pass: &str) -> bool {
        self.all || self.passes.contains(pass)
    }

    fn write(&self, m: &Module, cx: &PassCx, index: usize, pass: &str, when: &str) -> Result<(), PipelineError> {
        let text = print_module(m, cx.sources);
        match &self.dir {
            None => {
                eprintln!("// ---- dsc dump: {} {index:02} {pass} {when} ----\n{text}", cx.mode);
                Ok(())
            }
            Some(dir) => {
                let path = dir.join(format!("{}.{index:02}.{pass}.{when}.ir", cx.mode));
                let err = |e: std::io::Error| PipelineError::Dump { path: path.clone(), message: e.to_string() };
                std::fs::create_dir_all(dir).map_err(err)?;
                std::fs::write(&path, text).map_err(err)
            }
        }
    }
}

// ---------------------------------------------------------------- running

/// Run `passes` in order over `m`, skipping those `selection` turns off. Stops at the
/// first failure; the module is then as the failing pass left it.
pub fn run_pipeline(m: &mut Module, passes: &[&dyn Pass], selection: &PassSelection, cx: &mut PassCx) -> Result<(), PipelineError> {
    for (index, &pass) in passes.iter().enumerate() {
        let name = pass.name();
        if !selection.is_enabled(pass) {
            continue;
        }
        // The phase a pass moves to is static, so a bad order is refused before it runs.
        if let Some(to) = pass.phase() {
            if to < cx.phase {
                return Err(PipelineError::PhaseRegression { pass: name, from: cx.phase, to });
            }
        }
        let dump = cx.dump.wants(name);
        if dump {
            cx.dump.write(m, cx, index, name, "before")?;
        }

        let start = Instant::now();
        let result = pass.run(m, cx);
        let run = start.elapsed();
        // Dump even when the pass failed: the half-rewritten module is what to look at.
        if dump {
            cx.dump.write(m, cx, index, name, "after")?;
        }
        let changed = result.map_err(|error| PipelineError::Failed { pass: name, error })?;
        if let Some(to) = pass.phase() {
            cx.phase = to;
        }

        let mut verify_time = Duration::ZERO;
        if cx.verify_each {
            let start = Instant::now();
            let result = verify(m);
            verify_time = start.elapsed();
            result.map_err(|errors| PipelineError::BrokeInvariants { pass: name, errors })?;
        }
        cx.timings.push(Timing { pass: name, run, verify: verify_time, changed });
    }
    Ok(())
}

/// Compile `m` for `cx.mode`: keep only that mode's entry point (so DCE drops what only
/// the other modes used, and an inference-only rewrite never touches the training
/// graph), then run the mode's pipeline from [`pipeline::for_mode`].
pub fn compile(m: &mut Module, selection: &PassSelection, cx: &mut PassCx) -> Result<(), PipelineError> {
    let mode = cx.mode;
    if !m.entries.contains_key(&mode) {
        return Err(PipelineError::NoEntry { mode });
    }
    m.entries.retain(|&k, _| k == mode);
    run_pipeline(m, pipeline::for_mode(mode), selection, cx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Dim, Graph, Mode, Op, Ty, UnaryOp};
    use crate::passes::test_util::{module_of, scratch_dir};
    use crate::passes::Changed;
    use crate::passes::{cse::Cse, dce::Dce, shape_infer::ShapeInfer, simplify::Simplify, verify::Verify};

    fn ty() -> Ty {
        Ty::new(DType::F32, [Dim::B, Dim::lit(4)])
    }

    /// `exp(x) + exp(x)` with a dead `neg`: CSE and DCE both have work.
    fn sample() -> Module {
        let mut g = Graph::new();
        let x = g.input(0, "x", ty(), None);
        let a = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        let b = g.add_inferred(Op::Unary(UnaryOp::Exp), &[x.into()], None).unwrap();
        g.add_inferred(Op::Unary(UnaryOp::Neg), &[x.into()], None).unwrap();
        let s = g.add_inferred(Op::Binary(BinaryOp::Add), &[a.into(), b.into()], None).unwrap();
        g.ret(&[s.into()], None);
        module_of("prefill", g, Mode::Prefill)
    }

    #[test]
    fn unknown_pass_lists_valid_names() {
        let e = PassSelection::parse("-fuse").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown pass `fuse`; the passes are: verify, shape_infer, simplify, mla_absorb, mtp_strip, autodiff, cse, dce, decompose, \
             fuse_swiglu, fuse_rope, fuse_attention, fuse_elementwise, memory_plan"
        );
        let e = DumpConfig::parse(Some("cse,nope"), None).unwrap_err();
        assert!(matches!(e, PipelineError::UnknownPass { ref name, .. } if name == "nope"), "{e}");
    }

    #[test]
    fn required_passes_cannot_be_disabled() {
        let e = PassSelection::parse("-cse,-shape_infer").unwrap_err();
        assert_eq!(e, PipelineError::RequiredPass { name: "shape_infer" });
        assert_eq!(e.to_string(), "pass `shape_infer` is required for a correct module and cannot be turned off");
        assert!(matches!(PassSelection::parse("-verify"), Err(PipelineError::RequiredPass { .. })));
        assert!(matches!(PassSelection::parse("cse"), Err(PipelineError::BadSelection { .. })));
    }

    #[test]
    fn opt_in_passes_run_only_when_asked() {
        use crate::passes::decompose::Decompose;
        assert!(!PassSelection::all().is_enabled(&Decompose));
        let on = PassSelection::parse("+decompose").unwrap();
        assert!(on.is_enabled(&Decompose) && on.is_enabled(&Cse));
        assert!(!PassSelection::parse("+decompose,-decompose").unwrap().is_enabled(&Decompose));
    }

    #[test]
    fn selection_last_item_wins() {
        let sel = PassSelection::parse(" -cse, -dce ,+cse,").unwrap();
        assert!(sel.is_enabled(&Cse));
        assert!(!sel.is_enabled(&Dce));
        assert!(sel.is_enabled(&ShapeInfer));
        assert_eq!(PassSelection::parse("").unwrap(), PassSelection::all());
    }

    #[test]
    fn disabled_passes_are_skipped() {
        let passes: &[&dyn Pass] = &[&Verify, &ShapeInfer, &Cse, &Dce];
        let mut m = sample();
        let mut cx = PassCx::new(Mode::Prefill);
        run_pipeline(&mut m, passes, &PassSelection::parse("-cse").unwrap(), &mut cx).unwrap();
        let ran: Vec<&str> = cx.timings.iter().map(|t| t.pass).collect();
        assert_eq!(ran, ["verify", "shape_infer", "dce"]);
        // DCE removed the neg; without CSE both exps stay.
        let text = print_module(&m, None);
        assert_eq!(text.matches("exp(").count(), 2, "{text}");
        assert!(!text.contains("neg("), "{text}");
        assert_eq!(cx.timings.iter().map(|t| t.changed).collect::<Vec<_>>(), [Changed::No, Changed::No, Changed::Yes]);
    }

    /// A pass that lies about a type, as a buggy rewrite might.
    struct BreakTypes;
    impl Pass for BreakTypes {
        fn name(&self) -> &'static str {
            "break_types"
        }
        fn is_required(&self) -> bool {
            false
        }
        fn run(&self, m: &mut Module, _: &mut PassCx) -> Result<Changed, PassError> {
            let g = &mut m.functions[0].graph;
            let n = g.nodes().into_iter().find(|&n| matches!(g.node(n).op, Op::Binary(_))).unwrap();
            g.node_mut(n).outputs[0] = Ty::new(DType::F32, [Dim::B, Dim::lit(5)]);
            Ok(Changed::Yes)
        }
    }

    #[test]
    fn verify_after_each_pass_names_the_culprit() {
        let passes: &[&dyn Pass] = &[&Verify, &Simplify, &BreakTypes, &Dce];
        let mut cx = PassCx::new(Mode::Prefill);
        cx.verify_each = true;
        let e = run_pipeline(&mut sample(), passes, &PassSelection::all(), &mut cx).unwrap_err();
        let PipelineError::BrokeInvariants { pass, errors } = &e else { panic!("{e}") };
        assert_eq!(*pass, "break_types");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("declared f32[b,5], but its shape rule gives f32[b,4]"), "{e}");
        assert!(e.to_string().starts_with("pass `break_types` broke 1 IR invariant(s):\n  in `prefill`: "), "{e}");
        // Passes before the culprit ran; the one after did not.
        let ran: Vec<&str> = cx.timings.iter().map(|t| t.pass).collect();
        assert_eq!(ran, ["verify", "simplify"]);

        // With verification off the breakage goes unnoticed by the runner.
        let mut cx = PassCx::new(Mode::Prefill);
        cx.verify_each = false;
        run_pipeline(&mut sample(), passes, &PassSelection::all(), &mut cx).unwrap();
    }

    struct Regress;
    impl Pass for Regress {
        fn name(&self) -> &'static str {
            "regress"
        }
        fn is_required(&self) -> bool {
            false
        }
        fn phase(&self) -> Option<Phase> {
            Some(Phase::Lowered)
        }
        fn run(&self, _: &mut Module, _: &mut PassCx) -> Result<Changed, PassError> {
            Ok(Changed::No)
        }
    }

    #[test]
    fn phases_only_move_forward() {
        let mut cx = PassCx::new(Mode::Prefill);
        let passes: &[&dyn Pass] = &[&ShapeInfer, &Regress];
        let e = run_pipeline(&mut sample(), passes, &PassSelection::all(), &mut cx).unwrap_err();
        assert_eq!(e, PipelineError::PhaseRegression { pass: "regress", from: Phase::Typed, to: Phase::Lowered });
        // Running shape_infer twice is fine: equal phases are not a regression.
        let mut cx = PassCx::new(Mode::Prefill);
        run_pipeline(&mut sample(), &[&ShapeInfer, &ShapeInfer], &PassSelection::all(), &mut cx).unwrap();
        assert_eq!(cx.phase(), Phase::Typed);
    }

    #[test]
    fn dumps_before_and_after_to_files() {
        let dir = scratch_dir("dump");
        let mut cx = PassCx::new(Mode::Prefill);
        cx.dump = DumpConfig::parse(Some("cse"), Some(&dir)).unwrap();
        let passes: &[&dyn Pass] = &[&Verify, &ShapeInfer, &Cse, &Dce];
        run_pipeline(&mut sample(), passes, &PassSelection::all(), &mut cx).unwrap();
        let mut files: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        files.sort();
        assert_eq!(files, ["prefill.02.cse.after.ir", "prefill.02.cse.before.ir"]);
        let before = std::fs::read_to_string(dir.join("prefill.02.cse.before.ir")).unwrap();
        let after = std::fs::read_to_string(dir.join("prefill.02.cse.after.ir")).unwrap();
        assert!(before.starts_with("entry prefill = prefill\n\nfn prefill {\n"), "{before}");
        assert_eq!(before.matches("exp(").count(), 2, "{before}");
        assert_eq!(after.matches("exp(").count(), 1, "{after}");
        // The neg is dead but still there: DCE runs after the dump.
        assert!(after.contains("neg("), "{after}");
        std::fs::remove_dir_all(&dir).unwrap();

        let all = DumpConfig::parse(Some("all"), None).unwrap();
        assert!(all.wants("dce") && all.wants("memory_plan"));
        let none = DumpConfig::parse(Some(" "), None).unwrap();
        assert_eq!(none, DumpConfig::none());
        assert!(!none.wants("cse"));
    }

    #[test]
    fn pass_errors_are_reported_with_the_pass() {
        // A call of a missing function: the verify pass fails first, with its location.
        let mut m = sample();
        let g = &mut m.functions[0].graph;
        let x = g.arguments()[0];
        let sig = crate::ir::Signature { inputs: vec![ty()], outputs: vec![ty()] };
        let c = g.call("nowhere", None, &sig, &[x.into()], None).unwrap();
        let r = g.return_node().unwrap();
        g.set_input(r, 0, c.into());
        let mut cx = PassCx::new(Mode::Prefill);
        let e = compile(&mut m, &PassSelection::all(), &mut cx).unwrap_err();
        assert!(matches!(e, PipelineError::Failed { pass: "verify", .. }), "{e}");
        assert!(e.to_string().contains("call of missing function `nowhere`"), "{e}");
        assert_eq!(e.diagnostics().len(), 1);
    }

    #[test]
    fn compile_keeps_only_the_mode_entry() {
        let mut m = sample();
        let mut cx = PassCx::new(Mode::Decode);
        assert_eq!(compile(&mut m, &PassSelection::all(), &mut cx), Err(PipelineError::NoEntry { mode: Mode::Decode }));

        // Two entries sharing nothing: compiling prefill drops the train function.
        let mut m = sample();
        let mut t = Graph::new();
        let x = t.input(0, "x", ty(), None);
        t.ret(&[x.into()], None);
        m.add_function(crate::ir::Function { name: "train".into(), graph: t });
        m.set_entry(Mode::Train, "train");
        let mut cx = PassCx::new(Mode::Prefill);
        compile(&mut m, &PassSelection::all(), &mut cx).unwrap();
        assert_eq!(m.entries.len(), 1);
        assert!(m.function("train").is_none());
        let ran: Vec<&str> = cx.timings.iter().map(|t| t.pass).collect();
        // decompose is opt-in: in the pipeline, but not run.
        let fusion = ["fuse_swiglu", "fuse_rope", "fuse_attention", "fuse_elementwise", "memory_plan"];
        assert_eq!(ran, [&["verify", "shape_infer", "simplify", "mla_absorb", "mtp_strip", "cse", "dce"][..], &fusion[..]].concat());
        assert!(cx.memory_plan.is_some());
        assert!(cx.timing_report().lines().count() == 13, "{}", cx.timing_report());
    }
}
