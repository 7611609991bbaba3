//! `symbiont dsl check FILE...`: checks agent definitions offline and prints their
//! rendered diagnostics (line, column, excerpt, hint); exit 1 when a file has errors.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

/// `symbiont dsl ...`
#[derive(Debug, Subcommand)]
pub enum DslCommand {
    /// Check definition files (host files they name are read relative to each file).
    Check(CheckArgs),
}

/// `symbiont dsl check`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// Runs `dsl check`.
pub fn run(cmd: DslCommand) -> Result<ExitCode> {
    let DslCommand::Check(args) = cmd;
    let mut failed = false;
    for path in &args.files {
        match symbiont_runtime::dsl::check_file(path) {
            Ok(def) => {
                print!("{}", def.warnings.render());
                println!(
                    "{}: ok: agent `{}`, {} handler(s), {} policy statement(s)",
                    path.display(),
                    def.name,
                    def.handlers.len(),
                    def.policy.len()
                );
            }
            Err(diagnostics) => {
                failed = true;
                print!("{}", diagnostics.render());
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
