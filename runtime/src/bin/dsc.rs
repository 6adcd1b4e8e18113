//! The `dsc` command-line tool. Each subcommand lives in `dsc_runtime::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    dsc_runtime::cli::main()
}
