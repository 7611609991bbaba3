//! `symbiont config check [FILE] [--print]`: validates a runtime_config.toml offline.
//! Each problem is printed as `FILE:LINE: key: message`; exit 1 when there is one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use symbiont_runtime::config::RuntimeConfig;

use super::Context;

/// `symbiont config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file (and the SYMBIONT_* overrides).
    Check(CheckArgs),
}

/// `symbiont config check`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The file [default: --config, else the built-in defaults].
    pub file: Option<PathBuf>,
    /// Print the effective configuration (defaults, file and environment merged).
    #[arg(long)]
    pub print: bool,
}

/// Runs `config check`.
pub fn run(cmd: ConfigCommand, ctx: &Context) -> Result<ExitCode> {
    let ConfigCommand::Check(args) = cmd;
    let path = args.file.or_else(|| ctx.config_path.clone());
    let loaded = match &path {
        Some(p) => RuntimeConfig::load(p),
        None => RuntimeConfig::from_env(),
    };
    let name = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<defaults>".into());
    match loaded {
        Ok(config) => {
            if ctx.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "ok": true,
                        "file": name,
                        "config": config,
                    }))?
                );
            } else if args.print {
                print!("{}", config.to_toml());
            } else {
                println!("{name}: ok");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if ctx.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "ok": false,
                        "file": name,
                        "code": e.code(),
                        "errors": e.to_string().lines().collect::<Vec<_>>(),
                    }))?
                );
            } else {
                eprintln!("{e}");
            }
            Ok(ExitCode::from(1))
        }
    }
}
