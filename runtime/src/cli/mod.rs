//! Command-line interface: argument parsing (clap) and one function per subcommand.
//! Errors are rendered here, at the edge, and turned into exit codes: 0 success,
//! 1 a problem with the user's input (diagnostics printed), 2 a usage error (clap).

use clap::{Parser, Subcommand};
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
        spec: PathBuf,
        /// Which model of the file (default: the only one the file defines).
        #[arg(long)]
        model: Option<String>,
        /// Print the fully resolved spec: inherited fields and documented defaults written out.
        #[arg(long)]
        resolved: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { spec, model, resolved } => check(&spec, model.as_deref(), resolved),
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
        print!("{:#?}", m);
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
