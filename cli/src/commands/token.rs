//! `symbiont token create|list|revoke`: API tokens, managed offline on the data directory
//! (the daemon picks changes up on the next request). `create` prints the token once;
//! only its SHA-256 is stored. `--save` also writes it to the client's token file.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use super::Context;
use crate::client::default_token_file;
use crate::output::{print_json, print_table, table};
use crate::tokens;

/// `symbiont token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (once).
    Create(CreateArgs),
    /// List tokens (ids and names; the tokens themselves are not stored).
    List(DirArgs),
    /// Revoke the tokens with this id or name.
    Revoke(RevokeArgs),
}

/// Where the tokens are.
#[derive(Debug, Args)]
pub struct DirArgs {
    /// The data directory [default: `[storage] data_dir`].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `symbiont token create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// A name to recognise it by.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Also write it to the token file the CLI reads (--token-file, else
    /// ~/.config/symbiont/token), mode 0600.
    #[arg(long)]
    pub save: bool,
}

/// `symbiont token revoke`
#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The token's id or name.
    pub which: String,
}

fn data_dir(args: &DirArgs, ctx: &Context) -> Result<PathBuf> {
    match &args.data_dir {
        Some(d) => Ok(d.clone()),
        None => Ok(ctx.load_config()?.storage.data_dir),
    }
}

/// Runs one `symbiont token` command.
pub fn run(cmd: TokenCommand, ctx: &Context) -> Result<ExitCode> {
    match cmd {
        TokenCommand::Create(args) => {
            let dir = data_dir(&args.dir, ctx)?;
            let (token, entry) = tokens::create(&dir, &args.name)?;
            if args.save {
                let path = ctx
                    .token_file
                    .clone()
                    .or_else(default_token_file)
                    .context("no token file: pass --token-file (HOME is not set)")?;
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                writeln!(f, "{token}")?;
                eprintln!("saved to {}", path.display());
            }
            if ctx.json {
                print_json(&serde_json::json!({
                    "token": token,
                    "id": entry.id,
                    "name": entry.name,
                    "created_at": entry.created_at,
                }))?;
            } else {
                println!("{token}");
                eprintln!(
                    "token `{}` (id {}) created; it is shown only this once",
                    entry.name, entry.id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List(args) => {
            let list = tokens::list(&data_dir(&args, ctx)?)?;
            if ctx.json {
                let items: Vec<_> = list
                    .iter()
                    .map(|t| serde_json::json!({"id": t.id, "name": t.name, "created_at": t.created_at}))
                    .collect();
                print_json(&items)?;
            } else {
                let mut t = table(&["id", "name", "created"]);
                for e in &list {
                    t.add_row(vec![e.id.clone(), e.name.clone(), e.created_at.clone()]);
                }
                print_table(&t);
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke(args) => {
            let gone = tokens::revoke(&data_dir(&args.dir, ctx)?, &args.which)?;
            for t in &gone {
                println!("revoked token `{}` (id {})", t.name, t.id);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
