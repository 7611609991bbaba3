//! `symbiont`: the runtime's command-line interface.
//!
//! Each subcommand lives in its own module with its own `clap` types and a `run` function;
//! this file only parses the command line, sets up logging and maps outcomes to exit codes
//! (0 success, 1 a check failed, 2 the command could not run). Today: `symbiont audit`.

mod audit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A secure runtime for autonomous agents.
#[derive(Debug, Parser)]
#[command(name = "symbiont", version, about)]
struct Cli {
    /// runtime_config.toml to take defaults from (data directory, `[audit]` settings);
    /// without it, the built-in defaults and `SYMBIONT_*` variables apply.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify, read and export the audit trail (offline, on the log directory).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    symbiont_runtime::init_logging("warn", symbiont_runtime::config::LogFormat::Text);
    let outcome = match cli.command {
        Command::Audit(command) => audit::run(command, cli.config.as_deref()),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
