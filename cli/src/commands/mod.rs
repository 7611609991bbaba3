//! The command line: global options, one module per subcommand, and the shared context
//! (configuration file, daemon URL, token, output mode) they run with.

pub mod agent;
pub mod audit;
pub mod bench;
pub mod config;
pub mod demo;
pub mod dsl;
pub mod send;
pub mod task;
pub mod token;
pub mod up;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use symbiont_runtime::config::RuntimeConfig;

use crate::client::{default_token_file, read_token_file, url_for_listen, Client};

/// A secure runtime for autonomous agents.
#[derive(Debug, Parser)]
#[command(name = "symbiont", version, about)]
pub struct Cli {
    /// runtime_config.toml (daemon settings; the client's default URL and data directory).
    /// Without it, the built-in defaults and `SYMBIONT_*` variables apply.
    #[arg(long, global = true, value_name = "FILE", env = "SYMBIONT_CONFIG")]
    pub config: Option<PathBuf>,

    /// The daemon's URL [default: http://<[api] listen>, i.e. http://127.0.0.1:7420].
    #[arg(long, global = true, value_name = "URL", env = "SYMBIONT_URL")]
    pub url: Option<String>,

    /// API token [default: the token file].
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "SYMBIONT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// File holding the API token [default: ~/.config/symbiont/token].
    #[arg(long, global = true, value_name = "FILE", env = "SYMBIONT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Machine-readable output (JSON) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the runtime and its REST API.
    Up(up::UpArgs),
    /// Create, inspect and control agents.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Submit, follow and cancel tasks.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Send a message to an agent, or publish it on a topic.
    Send(send::SendArgs),
    /// Messages that could not be delivered.
    DeadLetters,
    /// Verify, read and export the audit trail (offline on the log directory, or
    /// `--remote` through the daemon).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Check a runtime_config.toml (offline).
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Create, list and revoke API tokens (offline, on the data directory).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Check agent definitions (offline).
    #[command(subcommand)]
    Dsl(dsl::DslCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Start a daemon with the example agents on the default tier and show them working:
    /// messages flowing, a task scheduled, the audit trail verified.
    Demo(demo::DemoArgs),
}

/// What every command runs with.
#[derive(Debug, Clone)]
pub struct Context {
    /// `--config`.
    pub config_path: Option<PathBuf>,
    /// `--url`.
    pub url: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--json`.
    pub json: bool,
}

impl Context {
    /// The configuration: `--config FILE` (with env overrides) or defaults + env.
    pub fn load_config(&self) -> Result<RuntimeConfig> {
        load_config(self.config_path.as_deref())
    }

    /// The client of the daemon.
    pub fn client(&self) -> Result<Client> {
        let url = match &self.url {
            Some(url) => url.clone(),
            None => url_for_listen(&self.load_config()?.api.listen),
        };
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => match self.token_file.clone().or_else(default_token_file) {
                Some(path) => read_token_file(&path)?,
                None => None,
            },
        };
        Client::new(&url, token)
    }
}

/// Loads `path` (validated, env overrides applied) or the defaults plus env.
pub fn load_config(path: Option<&Path>) -> Result<RuntimeConfig> {
    match path {
        Some(path) => RuntimeConfig::load(path).context("loading the configuration"),
        None => RuntimeConfig::from_env().context("reading SYMBIONT_* variables"),
    }
}

/// A tokio runtime for a client command.
pub(crate) fn client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = Context {
        config_path: cli.config,
        url: cli.url,
        token: cli.token,
        token_file: cli.token_file,
        json: cli.json,
    };
    if !matches!(cli.command, Command::Up(_)) {
        symbiont_runtime::init_logging("warn", symbiont_runtime::config::LogFormat::Text);
    }
    match cli.command {
        Command::Up(args) => up::run(args, &ctx),
        Command::Agent(cmd) => client_runtime()?.block_on(agent::run(cmd, &ctx)),
        Command::Task(cmd) => client_runtime()?.block_on(task::run(cmd, &ctx)),
        Command::Send(args) => client_runtime()?.block_on(send::run(args, &ctx)),
        Command::DeadLetters => client_runtime()?.block_on(send::dead_letters(&ctx)),
        Command::Audit(cmd) => audit::run(cmd, &ctx),
        Command::Config(cmd) => config::run(cmd, &ctx),
        Command::Token(cmd) => token::run(cmd, &ctx),
        Command::Dsl(cmd) => dsl::run(cmd),
        Command::Bench(cmd) => bench::run(cmd, &ctx),
        Command::Demo(args) => demo::run(args, &ctx),
    }
}
