//! `symbiont audit verify | tail | export`: offline access to the audit log directory
//! (no daemon needed). `verify` exits 1 and prints the first bad entry when the log does
//! not verify against the trusted public key.
//!
//! With `--remote`, `verify` and `tail` ask the daemon instead (`GET /v1/audit/verify`,
//! `GET /v1/audit?tail=N`): useful from another machine, or when the log directory is not
//! readable here. Offline stays the default: it needs no daemon and can check the log
//! against a public key kept elsewhere.

use std::io::{BufWriter, ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Result;
use clap::{Args, Subcommand};
use symbiont_runtime::config::RuntimeConfig;
use symbiont_runtime::integrations::audit_trail::{
    public_key_path, scan_dir, tail_dir, verify_dir, AuditEventType, AuditPublicKey, AuditQuery,
    AuditRecord, VerifyReport,
};
use symbiont_runtime::AgentId;

/// `symbiont audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain, sequence numbers, signatures and signed heads; exits 1 and
    /// names the first bad entry when the log does not verify.
    Verify(VerifyArgs),
    /// Print the last events.
    Tail(TailArgs),
    /// Print the events that match, one JSON object per line.
    Export(ExportArgs),
}

/// Where the log is.
#[derive(Debug, Args)]
pub struct DirArgs {
    /// The audit log directory [default: `[audit] dir`, else `<storage.data_dir>/audit`].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// `symbiont audit verify`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// The trusted public key (64 hex digits) [default: `<[audit] key_path>.pub`, else
    /// `<storage.data_dir>/keys/audit.ed25519.pub`]. Use a copy kept away from the log.
    #[arg(long, value_name = "FILE")]
    public_key: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Ask the daemon (with its own public key) instead of reading the directory.
    #[arg(long, conflicts_with_all = ["dir", "public_key"])]
    remote: bool,
}

/// `symbiont audit tail`
#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// How many events.
    #[arg(short = 'n', long = "lines", default_value_t = 10, value_name = "N")]
    n: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Ask the daemon instead of reading the directory.
    #[arg(long, conflicts_with = "dir")]
    remote: bool,
}

/// `symbiont audit export`
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Only events about this agent (its UUID).
    #[arg(long, value_name = "AGENT_ID")]
    agent: Option<AgentId>,
    /// Only events of this type (`StateChanged`, `message_rejected`, `custom:<name>`, ...).
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<AuditEventType>,
    /// Only events at or after this time: RFC 3339 (`2024-05-01T12:00:00Z`) or an age
    /// (`1h`, `30m`, `7d`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<SystemTime>,
    /// Only events before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<SystemTime>,
    /// At most this many events (oldest first).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

/// An RFC 3339 time, or a duration meaning that long ago.
fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    match humantime::parse_duration(text) {
        Ok(age) => SystemTime::now()
            .checked_sub(age)
            .ok_or_else(|| format!("`{text}` reaches before the epoch")),
        Err(_) => Err(format!(
            "`{text}` is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor an age (1h, 30m, 7d)"
        )),
    }
}

fn log_dir(args: &DirArgs, config: &RuntimeConfig) -> PathBuf {
    args.dir
        .clone()
        .unwrap_or_else(|| config.audit.resolved_dir(&config.storage.data_dir))
}

/// Runs one `symbiont audit` command.
pub fn run(command: AuditCommand, ctx: &super::Context) -> Result<ExitCode> {
    match &command {
        AuditCommand::Verify(args) if args.remote => {
            return remote_verify(ctx, args.json || ctx.json)
        }
        AuditCommand::Tail(args) if args.remote => {
            return remote_tail(ctx, args.n, args.json || ctx.json)
        }
        _ => {}
    }
    let config = ctx.load_config()?;
    match command {
        AuditCommand::Verify(args) => verify(args, &config),
        AuditCommand::Tail(args) => tail(args, &config),
        AuditCommand::Export(args) => export(args, &config),
    }
}

fn remote_verify(ctx: &super::Context, json: bool) -> Result<ExitCode> {
    let client = ctx.client()?;
    let report: crate::api::VerifyView =
        super::client_runtime()?.block_on(client.get("/v1/audit/verify"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.report);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn remote_tail(ctx: &super::Context, n: usize, json: bool) -> Result<ExitCode> {
    let client = ctx.client()?;
    let list: crate::api::AuditList =
        super::client_runtime()?.block_on(client.get(&format!("/v1/audit?tail={n}")))?;
    emit(|out| {
        for e in &list.events {
            if json {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            } else {
                let mut line = format!(
                    "{} #{} {} agent={} {}",
                    e.timestamp,
                    e.seq,
                    e.event_type,
                    e.agent.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                    e.details
                );
                for (k, v) in &e.metadata {
                    line.push_str(&format!(" {k}={v}"));
                }
                writeln!(out, "{line}")?;
            }
        }
        Ok(())
    })
}

/// Verifies the audit log of `config` offline: `dir` or the configured log directory,
/// against `public_key` or the public half of the configured signing key.
pub fn verify_offline(
    config: &RuntimeConfig,
    dir: Option<PathBuf>,
    public_key: Option<PathBuf>,
) -> Result<VerifyReport> {
    let dir = dir.unwrap_or_else(|| config.audit.resolved_dir(&config.storage.data_dir));
    let key_file = public_key.unwrap_or_else(|| {
        public_key_path(&config.audit.resolved_key_path(&config.storage.data_dir))
    });
    let key = AuditPublicKey::read_file(&key_file)?;
    Ok(verify_dir(&dir, &key)?)
}

fn verify(args: VerifyArgs, config: &RuntimeConfig) -> Result<ExitCode> {
    let report = verify_offline(config, args.dir.dir.clone(), args.public_key)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Writes lines to stdout; a closed pipe (`| head`) ends the output quietly.
fn emit(lines: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = lines(&mut out).and_then(|_| out.flush().map_err(Into::into));
    match result {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e),
        Ok(()) => Ok(ExitCode::SUCCESS),
    }
}

fn text_line(record: &AuditRecord) -> String {
    let event = &record.event;
    let mut meta: Vec<_> = event.metadata.iter().collect();
    meta.sort();
    let mut line = format!(
        "{} #{} {} agent={} {}",
        humantime::format_rfc3339_millis(event.timestamp),
        record.seq,
        event.event_type,
        event
            .agent_id
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        event.details
    );
    for (k, v) in meta {
        line.push_str(&format!(" {k}={v}"));
    }
    line
}

fn tail(args: TailArgs, config: &RuntimeConfig) -> Result<ExitCode> {
    let records = tail_dir(&log_dir(&args.dir, config), args.n)?;
    emit(|out| {
        for record in &records {
            if args.json {
                writeln!(out, "{}", record.to_json_line())?;
            } else {
                writeln!(out, "{}", text_line(record))?;
            }
        }
        Ok(())
    })
}

fn export(args: ExportArgs, config: &RuntimeConfig) -> Result<ExitCode> {
    let dir = log_dir(&args.dir, config);
    let query = AuditQuery {
        agent: args.agent,
        event_type: args.event_type,
        since: args.since,
        until: args.until,
        limit: args.limit,
    };
    emit(|out| {
        let mut failed: Option<std::io::Error> = None;
        scan_dir(&dir, &query, |record| {
            match writeln!(out, "{}", record.to_json_line()) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(subcommand)]
        command: AuditCommand,
    }

    #[test]
    fn times_parse_as_rfc3339_or_age() {
        let t = parse_time("2024-05-01T12:00:00Z").expect("rfc3339");
        assert_eq!(
            humantime::format_rfc3339(t).to_string(),
            "2024-05-01T12:00:00Z"
        );
        let hour_ago = parse_time("1h").expect("age");
        let age = SystemTime::now().duration_since(hour_ago).expect("past");
        assert!(age.as_secs() >= 3599 && age.as_secs() < 3700);
        assert!(parse_time("yesterday-ish").is_err());
    }

    #[test]
    fn export_flags_parse_into_a_query() {
        let agent = AgentId::new();
        let w = Wrapper::try_parse_from([
            "x",
            "export",
            "--agent",
            &agent.to_string(),
            "--type",
            "state_changed",
            "--since",
            "2024-01-01T00:00:00Z",
            "--limit",
            "5",
        ])
        .expect("parse");
        let AuditCommand::Export(args) = w.command else {
            panic!("expected export");
        };
        assert_eq!(args.agent, Some(agent));
        assert_eq!(args.event_type, Some(AuditEventType::StateChanged));
        assert_eq!(args.limit, Some(5));
        assert!(Wrapper::try_parse_from(["x", "export", "--type", "nonsense"]).is_err());
    }
}
