//! `dsc compile SPEC [--model NAME] [--mode prefill|decode|train] [--passes -cse,...]
//! [--mla auto|absorb|decompress] [--emit ir|memory-plan] [-o FILE]`: lower a spec for
//! one mode, run that mode's pass pipeline, and print the result: the IR text with
//! `@line:col` spans into the spec, or the memory plan. `--mla` picks the form of MLA
//! attention in prefill and decode (`mla_absorb`'s cost model by default). `DSC_DUMP=<pass,...|all>` (and `DSC_DUMP_DIR`) dump the IR around
//! passes; see `dsc_compiler::passes::runner`.
//!
//! `dsc compile SPEC --target cuda|wgpu [--mode ..] [--emit ir,kernels,plan] -o DIR`
//! ([`compile_target_cmd`]) writes what a GPU runtime needs instead: `DIR/kernels/NAME.cu`
//! or `NAME.wgsl`, one per distinct kernel among the nodes `dsc_compiler::codegen`
//! supports; `DIR/plan.json`, the launches in order with buffers, weights, scalars and
//! grids (`dsc_compiler::codegen::plan`), which the `wgpu` backend executes; `DIR/ir.txt`
//! (the optimised IR) and `DIR/unsupported.txt` (ops without a kernel yet, with counts).
//! A plan needs every node to have a kernel: when one lacks it, the command fails naming
//! the nodes and writes nothing.

use super::load_spec;
use crate::output::write_output;
use dsc_compiler::codegen::plan::Plan;
use dsc_compiler::codegen::select::node_work_in_graph;
use dsc_compiler::codegen::traffic::{CostReport, Device, Traffic};
use dsc_compiler::codegen::{kernel_source, KernelSpec, Target};
use dsc_compiler::ir::Bindings;
use dsc_compiler::ir::{print_module, Mode, Module, Op};
use dsc_compiler::lower::{lower_mode, LowerError};
use dsc_compiler::passes::autodiff::Recompute;
use dsc_compiler::passes::mla_absorb::{MlaAbsorb, MlaMode};
use dsc_compiler::passes::{self, PassCx, PassSelection, PipelineError};
use dsc_compiler::stats::step_ideal;
use dsc_dsl::{Diagnostic, Spec};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What `--emit` can print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Emit {
    /// The module's text form after the pipeline.
    Ir,
    /// The `memory_plan` pass's report at the pipeline's default sizes.
    MemoryPlan,
}

impl Emit {
    const NAMES: &'static str = "ir, memory-plan";

    fn parse(s: &str) -> Result<Emit, String> {
        match s {
            "ir" => Ok(Emit::Ir),
            "memory-plan" => Ok(Emit::MemoryPlan),
            _ => Err(format!("unknown --emit `{s}`; expected one of: {}", Emit::NAMES)),
        }
    }
}

/// `prefill`, `decode` or `train`; for clap's `value_parser`.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| format!("unknown mode `{s}`; expected prefill, decode or train"))
}

/// `auto`, `absorb` or `decompress`; for clap's `value_parser` of `--mla`.
pub fn parse_mla(s: &str) -> Result<MlaMode, String> {
    MlaMode::parse(s)
}

/// [`compile_cmd_with`] with the MLA form left to the cost model.
pub fn compile_cmd(
    spec: &Path,
    model: Option<&str>,
    mode: Mode,
    passes: Option<&str>,
    emit: &str,
    out: Option<&Path>,
) -> Result<(), String> {
    compile_cmd_with(spec, model, mode, passes, MlaMode::Auto, emit, out, Recompute::None)
}

/// Compiles `spec` for `mode` with the passes `passes` leaves on and MLA in the form
/// `mla` says, and prints what `emit` names to stdout, or writes it atomically to `out`.
pub fn compile_cmd_with(
    spec: &Path,
    model: Option<&str>,
    mode: Mode,
    passes: Option<&str>,
    mla: MlaMode,
    emit: &str,
    out: Option<&Path>,
    recompute: Recompute,
) -> Result<(), String> {
    // Option errors first: they need no spec and should not wait for one to load.
    let emit = Emit::parse(emit)?;
    let selection = PassSelection::parse(passes.unwrap_or("")).map_err(|e| format!("--passes: {e}"))?;
    let mut cx = PassCx::from_env(mode).map_err(|e| format!("DSC_DUMP: {e}"))?;
    if emit == Emit::MemoryPlan && !selection.is_enabled(&passes::memory_plan::MemoryPlan) {
        return Err("--emit memory-plan needs the memory_plan pass, which --passes turns off".into());
    }
    // A forced absorption that cannot happen is an error rather than silently ignored.
    if mla == MlaMode::Absorb {
        if mode == Mode::Train {
            return Err("--mla absorb: training keeps MLA decompressed (the form its gradients are defined on)".into());
        }
        if !selection.is_enabled(&MlaAbsorb) {
            return Err("--mla absorb needs the mla_absorb pass, which --passes turns off".into());
        }
    }
    cx.mla = mla;
    cx.train.recompute = recompute;

    if let Some(o) = out {
        crate::output::check_output(o, &[spec.to_path_buf()])?;
    }
    let spec = load_spec(spec, model)?;
    let (module, cx) = compile_module(&spec, mode, &selection, cx)?;

    let text = match emit {
        Emit::Ir => print_module(&module, Some(&spec.sources)),
        Emit::MemoryPlan => match &cx.memory_plan {
            Some(p) => p.summary(),
            None => return Err("the pipeline made no memory plan".into()),
        },
    };
    match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(|e| format!("cannot write to stdout: {e}"))
        }
        Some(path) => write_output(path, text.as_bytes()),
    }
}

/// `cuda` or `wgpu`; for clap's `value_parser` of `--target`.
pub fn parse_target(s: &str) -> Result<Target, String> {
    match s {
        "cuda" => Ok(Target::Cuda),
        "wgpu" | "wgsl" => Ok(Target::Wgsl),
        _ => Err(format!("unknown target `{s}`; expected cuda or wgpu")),
    }
}

/// What a `--target` output directory may hold: an earlier output of this command.
const OUTPUT_ENTRIES: &[&str] = &["kernels", "plan.json", "ir.txt", "unsupported.txt"];

/// What `--emit` writes with `--target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetEmit {
    pub ir: bool,
    pub kernels: bool,
    pub plan: bool,
}

impl TargetEmit {
    pub const ALL: TargetEmit = TargetEmit { ir: true, kernels: true, plan: true };

    /// A comma-separated list of `ir`, `kernels`, `plan`.
    pub fn parse(s: &str) -> Result<TargetEmit, String> {
        let mut e = TargetEmit { ir: false, kernels: false, plan: false };
        for part in s.split(',').map(str::trim) {
            match part {
                "ir" => e.ir = true,
                "kernels" => e.kernels = true,
                "plan" => e.plan = true,
                _ => return Err(format!("unknown --emit `{part}` with --target; expected a list of: ir, kernels, plan")),
            }
        }
        Ok(e)
    }
}

/// The sizes and device of `--emit cost`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CostArgs {
    /// `--emit cost`: sequences in the batch (default 1).
    #[arg(long, allow_negative_numbers = true, value_parser = super::unsigned::<u64>)]
    pub batch: Option<u64>,
    /// `--emit cost`: positions already in the KV cache (decode; default 4096).
    #[arg(long, allow_negative_numbers = true, value_parser = super::unsigned::<u64>)]
    pub context: Option<u64>,
    /// `--emit cost`: new positions per sequence (prefill and train; default 2048).
    #[arg(long, allow_negative_numbers = true, value_parser = super::unsigned::<u64>)]
    pub seq: Option<u64>,
    /// `--emit cost`: the device its times are for: `h100`, `h200`, or `GB/s,TFLOP/s`
    /// (default h100).
    #[arg(long)]
    pub device: Option<String>,
    /// `--emit cost`: one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl CostArgs {
    /// The first cost option given, for an error when `--emit cost` is not.
    pub fn given(&self) -> Option<&'static str> {
        [
            (self.batch.is_some(), "--batch"),
            (self.context.is_some(), "--context"),
            (self.seq.is_some(), "--seq"),
            (self.device.is_some(), "--device"),
            (self.json, "--json"),
        ]
        .into_iter()
        .find_map(|(on, name)| on.then_some(name))
    }

    /// The step's sizes for `mode`: decode runs one new position after `--context`;
    /// prefill and train start from an empty cache.
    fn sizes(&self, mode: Mode) -> Result<Bindings, String> {
        let batch = self.batch.unwrap_or(1);
        let (cache, seq) = match mode {
            Mode::Decode => {
                if self.seq.is_some_and(|s| s != 1) {
                    return Err("--seq: decode runs one new position per sequence".into());
                }
                (self.context.unwrap_or(4096), 1)
            }
            Mode::Prefill | Mode::Train => {
                if self.context.is_some_and(|c| c != 0) {
                    return Err(format!("--context: {mode} starts from an empty KV cache; give the prompt's length with --seq"));
                }
                (0, self.seq.unwrap_or(2048))
            }
        };
        if batch == 0 || seq == 0 {
            return Err("--batch and --seq must be at least 1".into());
        }
        Ok(Bindings { batch, seq, cache })
    }
}

/// `--target T --emit cost`: compiles `spec` for `mode`, builds its plan and prints (or
/// writes to `out`) the plan's bytes and FLOPs per step at the sizes `cost` gives,
/// against the step's ideal, with the time each implies on `cost.device`
/// (`dsc_compiler::codegen::traffic`).
#[allow(clippy::too_many_arguments)]
pub fn cost_cmd(
    spec: &Path,
    model: Option<&str>,
    mode: Mode,
    passes: Option<&str>,
    mla: MlaMode,
    target: Target,
    cost: &CostArgs,
    out: Option<&Path>,
) -> Result<(), String> {
    let sizes = cost.sizes(mode)?;
    let device = Device::parse(cost.device.as_deref().unwrap_or("h100"))?;
    let selection = PassSelection::parse(passes.unwrap_or("")).map_err(|e| format!("--passes: {e}"))?;
    let mut cx = PassCx::from_env(mode).map_err(|e| format!("DSC_DUMP: {e}"))?;
    cx.mla = mla;
    if let Some(o) = out {
        crate::output::check_output(o, &[spec.to_path_buf()])?;
    }
    let spec = load_spec(spec, model)?;
    let (module, _) = compile_module(&spec, mode, &selection, cx)?;
    let plan = target_plan(&module, mode, target).map_err(|e| format!("no plan for {mode}, so no cost: {e}"))?;
    let m = &spec.model;
    let report = CostReport {
        model: m.name.clone(),
        traffic: Traffic::of(&plan, sizes)?,
        ideal: step_ideal(m, mode == Mode::Train, sizes.batch, sizes.cache, sizes.seq),
        device,
    };
    let text = if cost.json {
        let mut t = serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())?;
        t.push('\n');
        t
    } else {
        report.render()
    };
    match out {
        Some(o) => write_output(o, text.as_bytes()),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// Compiles `spec` for `mode` (as [`compile_cmd_with`] does for `--emit ir`) and writes
/// what `emit` names for `target` under `out_dir`: `kernels/NAME.EXT` per distinct kernel
/// (and `unsupported.txt`), `plan.json`, `ir.txt`. Returns how many kernel files were
/// written. Fails, writing nothing, when a plan is asked for and some node has no kernel.
/// The directory is written whole ([`crate::output::write_dir`]): it may be new, empty, or
/// an earlier output of this command, which it replaces.
#[allow(clippy::too_many_arguments)]
pub fn compile_target_cmd(
    spec: &Path,
    model: Option<&str>,
    mode: Mode,
    passes: Option<&str>,
    mla: MlaMode,
    target: Target,
    emit: TargetEmit,
    out_dir: &Path,
) -> Result<usize, String> {
    let selection = PassSelection::parse(passes.unwrap_or("")).map_err(|e| format!("--passes: {e}"))?;
    let mut cx = PassCx::from_env(mode).map_err(|e| format!("DSC_DUMP: {e}"))?;
    cx.mla = mla;
    // Before the compile: a directory we may not replace fails now, not after it.
    crate::output::check_dir(out_dir, OUTPUT_ENTRIES)?;
    let spec = load_spec(spec, model)?;
    let (module, _) = compile_module(&spec, mode, &selection, cx)?;

    // Everything is made first and written as one directory: a failure leaves no part
    // of this output, and no file of an earlier one.
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let (kernels, unsupported) = collect_kernels(&module, target);
    if emit.kernels {
        for (name, k) in &kernels {
            files.push((Path::new("kernels").join(format!("{name}.{}", target.extension())), kernel_source(k, target).into_bytes()));
        }
        let mut text = String::from("# ops of the optimised IR without a GPU kernel yet: op, nodes, why\n");
        for ((op, why), count) in &unsupported {
            text.push_str(&format!("{op} {count} {why}\n"));
        }
        files.push(("unsupported.txt".into(), text.into_bytes()));
    }
    if emit.ir {
        files.push(("ir.txt".into(), print_module(&module, Some(&spec.sources)).into_bytes()));
    }
    if emit.plan {
        let plan = target_plan(&module, mode, target).map_err(|e| format!("no plan.json for {mode}: {e}"))?;
        let mut text = serde_json::to_string_pretty(&plan.to_json(target)).map_err(|e| e.to_string())?;
        text.push('\n');
        files.push(("plan.json".into(), text.into_bytes()));
    }
    crate::output::write_dir(out_dir, &files, OUTPUT_ENTRIES)?;
    Ok(if emit.kernels { kernels.len() } else { 0 })
}

/// Lowers `spec` for `mode` and runs the pipeline `selection` leaves on with `cx`: the
/// compiled module, and the context (its memory plan, when the pipeline made one).
fn compile_module<'s>(spec: &'s Spec, mode: Mode, selection: &PassSelection, cx: PassCx<'s>) -> Result<(Module, PassCx<'s>), String> {
    let mut module = lower_mode(spec, mode).map_err(|e| lower_error(spec, &e))?;
    let mut cx = cx.with_sources(&spec.sources);
    passes::compile(&mut module, selection, &mut cx).map_err(|e| pipeline_error(spec, &e))?;
    Ok((module, cx))
}

/// The plan of `module`'s `mode` entry, or why there is none: a node without a kernel, or
/// a kernel `target` cannot express (WGSL has no bf16).
fn target_plan(module: &Module, mode: Mode, target: Target) -> Result<Plan, String> {
    let plan = Plan::build(module, mode).map_err(|e| e.to_string())?;
    match plan.kernels().iter().find_map(|(n, k)| k.check_target(target).err().map(|e| (n.clone(), e))) {
        Some((name, why)) => Err(format!("kernel {name}: {why}")),
        None => Ok(plan),
    }
}

/// The distinct kernels of every function of `module`, by name (sorted, so the output
/// does not depend on node order), and the unsupported nodes counted by (op, reason).
/// Graph plumbing (inputs, params, constants, calls, returns) is no kernel and not listed.
pub fn collect_kernels(module: &Module, target: Target) -> (BTreeMap<String, KernelSpec>, BTreeMap<(&'static str, String), usize>) {
    let mut kernels = BTreeMap::new();
    let mut unsupported = BTreeMap::new();
    for f in &module.functions {
        for n in f.graph.nodes() {
            let node = f.graph.node(n);
            if matches!(node.op, Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Call { .. } | Op::Return) {
                continue;
            }
            // A node may take several kernels (a SwiGLU, the dispatch / grouped GEMMs /
            // combine of an expert FFN); a reshape takes none. Each as the plan runs it
            // (attention reading a split key in place is its own kernel).
            match node_work_in_graph(&f.graph, n).map(|(work, _)| work) {
                Ok(work) => match work.kernels().find_map(|k| k.check_target(target).err()) {
                    Some(why) => *unsupported.entry((node.op.name(), why)).or_insert(0) += 1,
                    None => {
                        for k in work.kernels() {
                            kernels.insert(k.name(), k.clone());
                        }
                    }
                },
                Err(u) => *unsupported.entry((u.op, u.reason)).or_insert(0) += 1,
            }
        }
    }
    (kernels, unsupported)
}

/// A lowering error, under the spec line it concerns when it has one.
fn lower_error(spec: &Spec, e: &LowerError) -> String {
    match e.span() {
        Some(span) => dsc_dsl::diag::render_one(&spec.sources, &Diagnostic::new(span, e.to_string(), "while lowering this")),
        None => format!("error: {e}"),
    }
}

/// A pipeline error: each located problem under its spec line.
fn pipeline_error(spec: &Spec, e: &PipelineError) -> String {
    dsc_dsl::diag::render(&spec.sources, &e.diagnostics())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(name)
    }

    fn out_file(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsc-compile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("out.ir")
    }

    #[test]
    fn writes_the_compiled_ir_with_spans() {
        for mode in Mode::ALL {
            let out = out_file(mode.name());
            compile_cmd(&spec("tiny_v3.dsc"), None, mode, Some("-cse"), "ir", Some(&out)).unwrap();
            let text = std::fs::read_to_string(&out).unwrap();
            assert!(text.starts_with(&format!("entry {mode} = {mode}\n")), "{text}");
            // Only this mode's functions survive.
            for other in Mode::ALL.into_iter().filter(|&m| m != mode) {
                assert!(!text.contains(&format!("fn {other}")), "{mode}: {other} left in");
            }
            assert!(text.contains(" @"), "spans are printed: {text}");
            std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
        }
    }

    #[test]
    fn mla_selects_the_attention_form() {
        let run = |mla: MlaMode, mode: Mode| {
            let out = out_file(&format!("mla-{mla}-{mode}"));
            compile_cmd_with(&spec("tiny_v3.dsc"), None, mode, None, mla, "ir", Some(&out), Recompute::None).unwrap();
            let text = std::fs::read_to_string(&out).unwrap();
            std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
            text
        };
        // Decode: one query head group over the latent (kv_heads=1) unless told otherwise.
        assert!(run(MlaMode::Auto, Mode::Decode).contains("heads=3 kv_heads=1"));
        assert!(run(MlaMode::Decompress, Mode::Decode).contains("heads=3 kv_heads=3"));
        // Prefill: decompressed unless forced.
        assert!(run(MlaMode::Auto, Mode::Prefill).contains("heads=3 kv_heads=3"));
        assert!(run(MlaMode::Absorb, Mode::Prefill).contains("heads=3 kv_heads=1"));
    }

    #[test]
    fn emits_the_memory_plan() {
        let out = out_file("plan");
        compile_cmd(&spec("tiny_v3.dsc"), None, Mode::Decode, None, "memory-plan", Some(&out)).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("decode entry `decode` at b=1 s=1 c=4096:\n"), "{text}");
        std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
    }

    #[test]
    fn writes_kernels_for_a_target() {
        for (target, ext) in [(Target::Cuda, "cu"), (Target::Wgsl, "wgsl")] {
            let dir = out_file(&format!("target-{ext}")).parent().unwrap().to_path_buf();
            let emit = TargetEmit { plan: false, ..TargetEmit::ALL };
            let n = compile_target_cmd(&spec("tiny_v3.dsc"), None, Mode::Decode, None, MlaMode::Auto, target, emit, &dir).unwrap();
            let files: Vec<_> = std::fs::read_dir(dir.join("kernels")).unwrap().map(|e| e.unwrap().path()).collect();
            assert_eq!(files.len(), n);
            assert!(n > 0 && files.iter().all(|p| p.extension().unwrap() == ext), "{files:?}");
            assert!(files.iter().any(|p| p.file_name().unwrap().to_string_lossy().starts_with("matmul_")), "{files:?}");
            assert!(std::fs::read_to_string(dir.join("ir.txt")).unwrap().starts_with("entry decode = decode\n"));
            let unsupported = std::fs::read_to_string(dir.join("unsupported.txt")).unwrap();
            assert!(unsupported.starts_with("# ops of the optimised IR without a GPU kernel yet"), "{unsupported}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
        assert_eq!(parse_target("wgpu"), Ok(Target::Wgsl));
        assert!(parse_target("metal").unwrap_err().contains("expected cuda or wgpu"));
    }

    /// The published DeepSeek-V3 spec (bf16, 256 experts, MLA absorbed) has a kernel for
    /// every node of its decode step in CUDA C++ and a complete plan; WGSL has no bf16,
    /// which the command says instead of writing a plan.
    #[test]
    fn full_deepseek_v3_plans_for_cuda_only() {
        let v3 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/deepseek_v3.dsc");
        let dir = out_file("v3-cuda").parent().unwrap().to_path_buf();
        let n = compile_target_cmd(&v3, None, Mode::Decode, None, MlaMode::Auto, Target::Cuda, TargetEmit::ALL, &dir).unwrap();
        let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("plan.json")).unwrap()).unwrap();
        // Every kernel the plan launches is written (the plan may launch fewer: copies
        // that batch_matmul reads through a view are not run).
        let kernels = plan["kernels"].as_object().unwrap();
        assert!(kernels.len() <= n && kernels.len() > 10, "{} of {n}", kernels.len());
        for (name, k) in kernels {
            let file = k["file"].as_str().unwrap();
            assert!(dir.join(file).is_file(), "{name}: {file} not written");
        }
        assert!(plan["functions"]["decode.layer.moe"]["buffers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["weight"] == "mlp.experts.gate_proj.weight"));
        let unsupported = std::fs::read_to_string(dir.join("unsupported.txt")).unwrap();
        assert_eq!(unsupported.lines().count(), 1, "{unsupported}");
        std::fs::remove_dir_all(&dir).unwrap();
        let dir = out_file("v3-wgsl").parent().unwrap().to_path_buf();
        let e = compile_target_cmd(&v3, None, Mode::Decode, None, MlaMode::Auto, Target::Wgsl, TargetEmit::ALL, &dir).unwrap_err();
        assert!(e.contains("WGSL has no bf16"), "{e}");
        // Nothing of a failed output is written.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--emit cost --json` of a published spec, as a JSON value.
    fn cost_json(spec: &str, mode: Mode, batch: u64) -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs").join(spec);
        let out = out_file(&format!("cost-{spec}-{mode}-{batch}"));
        let args = CostArgs { batch: Some(batch), json: true, ..CostArgs::default() };
        cost_cmd(&path, None, mode, None, MlaMode::Auto, Target::Cuda, &args, Some(&out)).unwrap_or_else(|e| panic!("{spec} {mode}: {e}"));
        let j = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
        j
    }

    /// The traffic-model goals of the device-runtime issue: DeepSeek-V3's absorbed decode
    /// in bf16 at c = 4096 moves at most 1.15× the ideal bytes at b = 1 and 1.3× at
    /// b = 64. Before batch_matmul read its weights through views they were 1.17× and
    /// 1.31× (the weight's slice, permute and per-sequence broadcast were copied each step).
    #[test]
    fn deepseek_v3_decode_is_near_the_ideal_traffic() {
        for (batch, goal) in [(1, 1.15), (64, 1.3)] {
            let j = cost_json("deepseek_v3.dsc", Mode::Decode, batch);
            assert_eq!(j["sizes"], serde_json::json!({ "b": batch, "c": 4096, "s": 1 }));
            let (total, ideal) = (j["total_bytes"].as_f64().unwrap(), j["ideal_bytes"].as_f64().unwrap());
            assert!(total / ideal <= goal, "b={batch}: {total} bytes against {ideal}: {:.3}×", total / ideal);
            // The ideal itself: 37B active parameters in bf16 at b = 1, and 61 layers of a
            // 576-element latent cache over 4096 positions per sequence.
            let w = j["ideal"]["weight_bytes"].as_f64().unwrap();
            assert!(batch != 1 || (73.0e9..74.0e9).contains(&w), "{w}");
            assert_eq!(j["ideal"]["kv_read_bytes"].as_f64().unwrap(), (batch * 4096 * 61 * 576 * 2) as f64);
            // The launches add up to the totals, and no weight is broadcast any more.
            let kernels = j["kernels"].as_array().unwrap();
            let sum: f64 = kernels.iter().map(|k| k["bytes"].as_f64().unwrap()).sum();
            assert!((sum - total).abs() <= 1e-9 * total, "{sum} vs {total}");
            let flops: f64 = kernels.iter().map(|k| k["flops"].as_f64().unwrap()).sum();
            assert!((flops - j["total_flops"].as_f64().unwrap()).abs() <= 1e-9 * flops);
            assert!(!kernels.iter().any(|k| k["node"].as_str().unwrap().ends_with("broadcast")), "a broadcast is still copied");
            assert!(kernels.iter().any(|k| k["calls"] == 58 && k["function"] == "decode.layer.moe"));
        }
    }

    /// Every published spec has a cost for prefill and decode; the plan never does less
    /// than the model needs, and the time follows from the device's figures.
    #[test]
    fn every_published_spec_has_a_cost() {
        for spec in ["deepseek_llm_7b.dsc", "deepseek_moe_16b.dsc", "deepseek_v2_lite.dsc", "deepseek_v2.dsc", "deepseek_v3.dsc"] {
            for mode in [Mode::Prefill, Mode::Decode] {
                let j = cost_json(spec, mode, 4);
                let ratio = |k: &str| j[format!("total_{k}")].as_f64().unwrap() / j[format!("ideal_{k}")].as_f64().unwrap();
                // The plan's FLOPs include the model's (tiles only add padding); its bytes
                // include every weight, which dominates a decode step's ideal.
                assert!(ratio("flops") >= 0.999, "{spec} {mode}: FLOPs {}", ratio("flops"));
                assert!(mode == Mode::Prefill || ratio("bytes") >= 0.999, "{spec} {mode}: bytes {}", ratio("bytes"));
                let t = j["time_s"].as_f64().unwrap();
                assert!(t.is_finite() && t >= j["ideal_time_s"].as_f64().unwrap() * 0.999, "{spec} {mode}: {t}");
            }
        }
    }

    #[test]
    fn cost_option_errors() {
        let s = spec("tiny_v3.dsc");
        let run = |mode: Mode, args: CostArgs| cost_cmd(&s, None, mode, None, MlaMode::Auto, Target::Wgsl, &args, None);
        let e = run(Mode::Decode, CostArgs { seq: Some(4), ..CostArgs::default() }).unwrap_err();
        assert_eq!(e, "--seq: decode runs one new position per sequence");
        let e = run(Mode::Prefill, CostArgs { context: Some(4), ..CostArgs::default() }).unwrap_err();
        assert!(e.contains("prefill starts from an empty KV cache"), "{e}");
        let e = run(Mode::Prefill, CostArgs { batch: Some(0), ..CostArgs::default() }).unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
        // Sizes past 64-bit counts are refused, not wrapped into a wrong report.
        let huge = CostArgs { batch: Some(100_000_000_000), context: Some(100_000_000_000), ..CostArgs::default() };
        let e = run(Mode::Decode, huge).unwrap_err();
        assert!(e.contains("past 2^63") && e.contains("give smaller --batch"), "{e}");
        let e = run(Mode::Decode, CostArgs { device: Some("tpu".into()), ..CostArgs::default() }).unwrap_err();
        assert!(e.starts_with("unknown device `tpu`"), "{e}");
        // A training step has a plan: the f32 tiny model's and the bf16 published V3's
        // (mixed-precision backward kernels).
        let out = out_file("cost-train");
        cost_cmd(
            &s,
            None,
            Mode::Train,
            None,
            MlaMode::Auto,
            Target::Wgsl,
            &CostArgs { seq: Some(64), json: true, ..CostArgs::default() },
            Some(&out),
        )
        .unwrap();
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert!(j["flops_ratio"].as_f64().unwrap() >= 1.0, "{j}");
        std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
        let j = cost_json("deepseek_v3.dsc", Mode::Train, 1);
        let r = j["flops_ratio"].as_f64().unwrap();
        // Recomputation (the SwiGLU projections, attention's probabilities) costs FLOPs.
        assert!((1.0..2.0).contains(&r), "V3 train FLOPs ratio {r}");
        assert_eq!(CostArgs { json: true, ..CostArgs::default() }.given(), Some("--json"));
        assert_eq!(CostArgs::default().given(), None);
        // The table names the step, the device and the ratios.
        let out = out_file("cost-table");
        cost_cmd(&s, None, Mode::Decode, None, MlaMode::Auto, Target::Wgsl, &CostArgs::default(), Some(&out)).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("tiny_v3 decode step at b=1 c=4096 s=1 on h100:\n"), "{text}");
        assert!(text.contains("plan/ideal") && text.contains("expert_ffn"), "{text}");
        std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
    }

    #[test]
    fn option_errors() {
        let s = spec("tiny_v3.dsc");
        let e = compile_cmd(&s, None, Mode::Prefill, Some("-fuse"), "ir", None).unwrap_err();
        // The list is the registry's, whatever passes it holds.
        assert_eq!(e, format!("--passes: unknown pass `fuse`; the passes are: {}", passes::pass_names().join(", ")));
        let e = compile_cmd(&s, None, Mode::Prefill, Some("-shape_infer"), "ir", None).unwrap_err();
        assert!(e.contains("`shape_infer` is required"), "{e}");
        let e = compile_cmd(&s, None, Mode::Prefill, None, "kernels", None).unwrap_err();
        assert_eq!(e, "unknown --emit `kernels`; expected one of: ir, memory-plan");
        let e = compile_cmd(&s, None, Mode::Prefill, Some("-memory_plan"), "memory-plan", None).unwrap_err();
        assert!(e.contains("needs the memory_plan pass"), "{e}");
        let e = compile_cmd_with(&s, None, Mode::Decode, Some("-mla_absorb"), MlaMode::Absorb, "ir", None, Recompute::None).unwrap_err();
        assert_eq!(e, "--mla absorb needs the mla_absorb pass, which --passes turns off");
        let e = compile_cmd_with(&s, None, Mode::Train, None, MlaMode::Absorb, "ir", None, Recompute::None).unwrap_err();
        assert!(e.starts_with("--mla absorb: training keeps MLA decompressed"), "{e}");
        assert_eq!(parse_mla("absorb"), Ok(MlaMode::Absorb));
        assert!(parse_mla("naive").unwrap_err().contains("expected one of: auto, absorb, decompress"));
        assert_eq!(parse_mode("decode"), Ok(Mode::Decode));
        assert!(parse_mode("infer").unwrap_err().contains("expected prefill, decode or train"));
    }
}
