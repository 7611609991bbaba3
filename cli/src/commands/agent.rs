//! `symbiont agent create|list|status|logs|start|suspend|resume|stop|delete`.
//!
//! `create` picks the agent's id itself, so while the (possibly long: image builds, VM
//! boots) create request is in flight it can poll the agent's state and show each
//! transition under a spinner until the agent is running, ready or failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use super::Context;
use crate::api::{AgentList, AgentView, CreateAgentRequest, LogsView};
use crate::client::{Client, ClientError};
use crate::output::{human_bytes, print_json, print_table, spinner, table};

/// `symbiont agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Create an agent from a definition file (`.agent`), or from a JSON `AgentConfig`
    /// (`--from-json FILE`, or a FILE ending in `.json`), and start it.
    Create(CreateArgs),
    /// List agents.
    List,
    /// An agent's state and live resource usage.
    Status(IdArg),
    /// The last lines an agent's program wrote.
    Logs(LogsArgs),
    /// Start a ready or suspended agent.
    Start(IdArg),
    /// Freeze an agent's sandbox.
    Suspend(IdArg),
    /// Thaw a suspended agent.
    Resume(IdArg),
    /// Stop an agent for good.
    Stop(IdArg),
    /// Stop and forget an agent.
    Delete(IdArg),
}

/// `symbiont agent create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The definition file (its directory is where `file ... from` paths are read).
    #[arg(value_name = "FILE", required_unless_present = "from_json")]
    pub file: Option<PathBuf>,
    /// A JSON `AgentConfig` file instead (`dsl_source` holds the definition).
    #[arg(long, value_name = "FILE", conflicts_with = "file")]
    pub from_json: Option<PathBuf>,
    /// The agent's name (default: the definition's).
    #[arg(long)]
    pub name: Option<String>,
    /// Prepare the agent but leave it ready instead of starting it.
    #[arg(long)]
    pub no_start: bool,
}

/// An agent id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The agent's id.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// `symbiont agent logs`
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The agent's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// How many lines.
    #[arg(short = 'n', long = "lines", default_value_t = 50)]
    pub n: usize,
}

/// Runs one `symbiont agent` command.
pub async fn run(cmd: AgentCommand, ctx: &Context) -> Result<ExitCode> {
    let client = ctx.client()?;
    match cmd {
        AgentCommand::Create(args) => create(&client, args, ctx).await,
        AgentCommand::List => {
            let list: AgentList = client.get("/v1/agents").await?;
            if ctx.json {
                print_json(&list)?;
            } else {
                let mut t = table(&[
                    "id", "name", "state", "mode", "tier", "memory", "cpu", "restarts",
                ]);
                for a in &list.agents {
                    let (mem, cpu) = usage_cells(a);
                    t.add_row(vec![
                        a.id.to_string(),
                        a.name.clone(),
                        a.state.clone(),
                        a.mode.clone(),
                        a.effective_tier.clone().unwrap_or_else(|| a.tier.clone()),
                        mem,
                        cpu,
                        a.restart_count.to_string(),
                    ]);
                }
                print_table(&t);
            }
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Status(id) => {
            let agent: AgentView = client.get(&format!("/v1/agents/{}", id.id)).await?;
            show_agent(&agent, ctx)?;
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Logs(args) => {
            let logs: LogsView = client
                .get(&format!("/v1/agents/{}/logs?tail={}", args.id, args.n))
                .await?;
            if ctx.json {
                print_json(&logs)?;
            } else {
                for l in &logs.lines {
                    println!("{} [{}] {}", l.at, l.stream, l.line);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AgentCommand::Start(id) => action(&client, &id.id, "start", ctx).await,
        AgentCommand::Suspend(id) => action(&client, &id.id, "suspend", ctx).await,
        AgentCommand::Resume(id) => action(&client, &id.id, "resume", ctx).await,
        AgentCommand::Stop(id) => action(&client, &id.id, "stop", ctx).await,
        AgentCommand::Delete(id) => {
            client.delete(&format!("/v1/agents/{}", id.id)).await?;
            if ctx.json {
                print_json(&serde_json::json!({ "deleted": id.id }))?;
            } else {
                println!("agent {} deleted", id.id);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn usage_cells(a: &AgentView) -> (String, String) {
    match &a.usage {
        Some(u) => (human_bytes(u.memory_bytes), format!("{:.2}", u.cpu_cores)),
        None => ("-".into(), "-".into()),
    }
}

async fn action(client: &Client, id: &str, verb: &str, ctx: &Context) -> Result<ExitCode> {
    let agent: AgentView = client
        .post_empty(&format!("/v1/agents/{id}/{verb}"))
        .await?;
    if ctx.json {
        print_json(&agent)?;
    } else {
        println!("agent {} ({}) is {}", agent.id, agent.name, agent.state);
    }
    Ok(ExitCode::SUCCESS)
}

fn show_agent(a: &AgentView, ctx: &Context) -> Result<()> {
    if ctx.json {
        return print_json(a);
    }
    let mut t = table(&["field", "value"]);
    let mut row = |k: &str, v: String| {
        t.add_row(vec![k.to_string(), v]);
    };
    row("id", a.id.to_string());
    row("name", a.name.clone());
    row("state", a.state.clone());
    row("mode", a.mode.clone());
    row(
        "tier",
        a.effective_tier.clone().unwrap_or_else(|| a.tier.clone()),
    );
    row("created", a.created_at.clone());
    row("state since", a.state_changed_at.clone());
    row("restarts", a.restart_count.to_string());
    if let Some(r) = &a.failure_reason {
        row("failure", r.clone());
    }
    if !a.handlers.is_empty() {
        row("handlers", a.handlers.join(", "));
    }
    if let Some(s) = &a.sandbox_id {
        row("sandbox", s.clone());
    }
    if let Some(u) = &a.usage {
        row(
            "memory",
            format!(
                "{} (peak {}, limit {})",
                human_bytes(u.memory_bytes),
                human_bytes(u.memory_peak_bytes),
                human_bytes(u.memory_limit_bytes)
            ),
        );
        row(
            "cpu",
            format!("{:.2} of {:.2} cores", u.cpu_cores, u.cpu_limit_cores),
        );
        row("pids", u.pids.to_string());
        row(
            "disk",
            format!(
                "read {}, written {}",
                human_bytes(u.disk_read_bytes),
                human_bytes(u.disk_write_bytes)
            ),
        );
        row(
            "network",
            format!(
                "rx {}, tx {}",
                human_bytes(u.net_rx_bytes),
                human_bytes(u.net_tx_bytes)
            ),
        );
    }
    for w in &a.tier_warnings {
        row("warning", w.clone());
    }
    for n in &a.notes {
        row("note", n.clone());
    }
    print_table(&t);
    Ok(())
}

async fn create(client: &Client, args: CreateArgs, ctx: &Context) -> Result<ExitCode> {
    let id = uuid::Uuid::new_v4();
    let json_file = args.from_json.clone().or_else(|| {
        args.file
            .clone()
            .filter(|f| f.extension().is_some_and(|e| e == "json"))
    });
    let mut request = CreateAgentRequest {
        start: Some(!args.no_start),
        ..Default::default()
    };
    let mut config = serde_json::Map::new();
    if let Some(path) = json_file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        config = value.as_object().cloned().with_context(|| {
            format!(
                "{} must hold a JSON object (an AgentConfig)",
                path.display()
            )
        })?;
        if let Some(dir) = absolute_dir(&path)? {
            request.base_dir = Some(dir);
        }
    } else if let Some(path) = &args.file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        request.definition = Some(text);
        request.base_dir = absolute_dir(path)?;
    }
    config
        .entry("id")
        .or_insert_with(|| serde_json::Value::String(id.to_string()));
    if let Some(name) = args.name {
        config.insert("name".into(), serde_json::Value::String(name));
    }
    let id = config
        .get("id")
        .and_then(|v| v.as_str())
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .unwrap_or(id);
    request.config = Some(serde_json::Value::Object(config));

    let bar = spinner("creating agent", ctx.json);
    let watcher = {
        let client = client.clone();
        let bar = bar.clone();
        tokio::spawn(async move { follow_states(&client, id, &bar).await })
    };
    let result: Result<AgentView, ClientError> = client.post("/v1/agents", &request).await;
    watcher.abort();
    bar.finish_and_clear();
    let agent = result?;
    if ctx.json {
        print_json(&agent)?;
    } else {
        println!(
            "agent {} ({}) is {} [{} tier]",
            agent.id,
            agent.name,
            agent.state,
            agent.effective_tier.as_deref().unwrap_or(&agent.tier)
        );
        for w in &agent.tier_warnings {
            println!("warning: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls the agent being created and reports each state it passes through.
async fn follow_states(client: &Client, id: uuid::Uuid, bar: &indicatif::ProgressBar) {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(agent) = client.get::<AgentView>(&format!("/v1/agents/{id}")).await {
            if agent.state != last {
                let what = match agent.state.as_str() {
                    "initializing" => {
                        "initializing (preparing the sandbox: image build or VM boot)"
                    }
                    other => other,
                };
                bar.println(format!(
                    "  {:>6.1}s  {} -> {}",
                    started.elapsed().as_secs_f64(),
                    if last.is_empty() { "new" } else { &last },
                    agent.state
                ));
                bar.set_message(format!("agent {} {what}", agent.name));
                last = agent.state;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn absolute_dir(path: &std::path::Path) -> Result<Option<String>> {
    let abs =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    Ok(abs.parent().map(|p| p.display().to_string()))
}
