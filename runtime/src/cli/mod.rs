//! Command-line interface: argument parsing (clap) and one function per subcommand.
//! Errors are rendered here, at the edge, and turned into exit codes: 0 success,
//! 1 a problem with the user's input (diagnostics printed), 2 a usage error (clap).

pub mod compile;
pub mod cost;
pub mod generate;
pub mod grad;
pub mod grpo_loss;
pub mod import;
pub mod logits;
pub mod train;

use clap::{Parser, Subcommand};

/// A clap value parser for counts and sizes: a whole number, 0 or more, and a message that
/// says so (with `allow_negative_numbers` on the argument, `-1` reaches it instead of
/// being taken for an unknown flag).
pub fn unsigned<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse::<T>().map_err(|_| {
        if s.starts_with('-') {
            format!("`{s}` is negative; expected a whole number, 0 or more")
        } else {
            format!("expected a whole number, 0 or more, got `{s}`")
        }
    })
}
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dsc", version, about = "A declarative model compiler for the DeepSeek family")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check a spec; print a one-line summary, or the diagnostics.
    Check {
        /// The spec file (`.dsc`).
        spec: PathBuf,
        /// Which model of the file (default: the only one the file defines).
        #[arg(long)]
        model: Option<String>,
        /// Print the fully resolved spec: inherited fields and documented defaults written out.
        #[arg(long)]
        resolved: bool,
    },
    /// Report parameters (total, active, MTP), KV-cache size and FLOPs per token.
    Stats {
        /// The spec file (`.dsc`).
        spec: PathBuf,
        /// Which model of the file (default: the only one the file defines).
        #[arg(long)]
        model: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Positions attended to by the token whose FLOPs are counted.
        #[arg(long, default_value_t = 4096, allow_negative_numbers = true, value_parser = unsigned::<u64>)]
        context: u64,
    },
    /// Show what a variant changes: differing resolved fields, and the cost deltas.
    Diff {
        /// The spec the differences are measured from.
        spec_a: PathBuf,
        /// The variant.
        spec_b: PathBuf,
        /// Which model of SPEC_A (default: its only one).
        #[arg(long)]
        model_a: Option<String>,
        /// Which model of SPEC_B (default: its only one).
        #[arg(long)]
        model_b: Option<String>,
        /// Positions attended to by the token whose FLOPs are compared.
        #[arg(long, default_value_t = 4096, allow_negative_numbers = true, value_parser = unsigned::<u64>)]
        context: u64,
    },
    /// Lower a spec for one mode, run its pass pipeline, and print the IR.
    Compile {
        /// The spec file (`.dsc`).
        spec: PathBuf,
        /// Which model of the file (default: the only one the file defines).
        #[arg(long)]
        model: Option<String>,
        /// Which entry point to compile: prefill, decode or train.
        #[arg(long, default_value = "prefill", value_parser = compile::parse_mode)]
        mode: dsc_compiler::ir::Mode,
        /// Turn passes off (`-cse`) or back on (`+cse`), comma-separated.
        #[arg(long, allow_hyphen_values = true)]
        passes: Option<String>,
        /// MLA attention in prefill/decode: `auto` (cost model), `absorb` or `decompress`.
        #[arg(long, default_value = "auto", value_parser = compile::parse_mla)]
        mla: dsc_compiler::passes::mla_absorb::MlaMode,
        /// What to print: `ir` (default) or `memory-plan`; with `--target`, what to write,
        /// comma-separated: `ir`, `kernels`, `plan` (default all three), or `cost`: the
        /// plan's bytes and FLOPs per step against the step's ideal.
        #[arg(long)]
        emit: Option<String>,
        /// Write GPU kernel sources for this target (`cuda` or `wgpu`) into the directory `-o` names.
        #[arg(long, value_parser = compile::parse_target)]
        target: Option<dsc_compiler::codegen::Target>,
        #[command(flatten)]
        cost: compile::CostArgs,
        /// Write the output here (atomically) instead of printing it.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Train: what the backward recomputes instead of keeping (`none`, `norms`, `mla`,
        /// `layer`); `--emit memory-plan` shows what each saves.
        #[arg(long, default_value = "none", value_parser = grad::parse_recompute)]
        recompute: dsc_compiler::passes::autodiff::Recompute,
    },
    /// Turn a Hugging Face config.json into a spec.
    Import {
        /// A Hugging Face `config.json`.
        config: PathBuf,
        /// Write the spec here (atomically) instead of printing it.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Model name in the spec (default: from the config's directory name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run one forward pass of a model directory and write its logits (safetensors).
    Logits(logits::LogitsArgs),
    /// Generate tokens from a model directory through the KV cache.
    Generate(generate::GenerateArgs),
    /// The next-token loss of a batch and its gradient for every checkpoint tensor.
    Grad(grad::GradArgs),
    /// GRPO's loss and its gradient with respect to logp_pi for one batch (JSON in, JSON out).
    GrpoLoss(grpo_loss::GrpoLossArgs),
    /// Train a model: `dsc train sft --config RECIPE.yaml [--resume RUN_DIR]`.
    Train(train::TrainArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { spec, model, resolved } => check(&spec, model.as_deref(), resolved),
        Command::Stats { spec, model, json, context } => cost::stats_cmd(&spec, model.as_deref(), json, context),
        Command::Diff { spec_a, spec_b, model_a, model_b, context } => {
            cost::diff_cmd(&spec_a, model_a.as_deref(), &spec_b, model_b.as_deref(), context)
        }
        Command::Compile { spec, model, mode, passes, mla, emit, out, target, recompute, cost } => match (target, out) {
            (Some(t), out) if emit.as_deref() == Some("cost") => {
                compile::cost_cmd(&spec, model.as_deref(), mode, passes.as_deref(), mla, t, &cost, out.as_deref())
            }
            _ if cost.given().is_some() => Err(format!("`{}` belongs to `--target T --emit cost`", cost.given().unwrap_or_default())),
            (Some(t), Some(dir)) => compile::TargetEmit::parse(emit.as_deref().unwrap_or("ir,kernels,plan"))
                .and_then(|emit| compile::compile_target_cmd(&spec, model.as_deref(), mode, passes.as_deref(), mla, t, emit, &dir))
                .map(|_| ()),
            // A usage error, as clap's own (exit 2): only `--emit cost` prints instead.
            (Some(_), None) => <Cli as clap::CommandFactory>::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "`--target` writes a directory of kernels: give it with `--out DIR` (or print its cost with `--emit cost`)",
                )
                .exit(),
            (None, out) => compile::compile_cmd_with(
                &spec,
                model.as_deref(),
                mode,
                passes.as_deref(),
                mla,
                emit.as_deref().unwrap_or("ir"),
                out.as_deref(),
                recompute,
            ),
        },
        Command::Import { config, out, name } => import::import_cmd(&config, out.as_deref(), name.as_deref()),
        Command::Logits(args) => logits::logits_cmd(&args),
        Command::Generate(args) => generate::generate_cmd(&args),
        Command::Grad(args) => grad::grad_cmd(&args),
        Command::GrpoLoss(args) => grpo_loss::grpo_loss_cmd(&args),
        Command::Train(args) => train::train_cmd(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprint!("{msg}");
            if !msg.ends_with('\n') {
                eprintln!();
            }
            ExitCode::from(1)
        }
    }
}

/// Loads a spec or returns its rendered diagnostics.
pub fn load_spec(path: &Path, model: Option<&str>) -> Result<dsc_dsl::Spec, String> {
    dsc_dsl::load(path, model).map_err(|f| f.render())
}

fn check(path: &Path, model: Option<&str>, resolved: bool) -> Result<(), String> {
    let spec = load_spec(path, model)?;
    let m = &spec.model;
    if resolved {
        print!("{}", dsc_dsl::print::print_model(m));
        return Ok(());
    }
    let attn = match &m.attention {
        dsc_dsl::model::Attention::Gqa(a) if a.kv_heads == a.heads => format!("MHA {} heads", a.heads),
        dsc_dsl::model::Attention::Gqa(a) => format!("GQA {}/{} heads", a.heads, a.kv_heads),
        dsc_dsl::model::Attention::Mla(a) => format!("MLA {} heads, latent {}", a.heads, a.kv_lora_rank),
    };
    println!("ok: {} ({}): {} layers, hidden {}, {attn}", m.name, path.display(), m.layers, m.hidden);
    Ok(())
}
