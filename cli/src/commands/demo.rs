//! `symbiont demo`: the README's main command. Starts a real daemon (`symbiont up`, this
//! binary, on a fresh data directory and a free loopback port), drives it over its HTTP API
//! the way an operator would, and narrates what happens:
//!
//! 1. the three example agents (`examples/agents`: collector → summarizer → reporter) are
//!    created from their definitions and run, each in its own sandbox of the configured
//!    default tier (native unless the configuration says otherwise);
//! 2. their messages flow over the bus (signed, encrypted, checked against each agent's
//!    policy), shown from the audit trail as they happen;
//! 3. a task is scheduled on the reporter, and its result (the report) is printed;
//! 4. the audit trail is verified through the API, the daemon is stopped with SIGTERM
//!    (graceful: agents stopped, audit flushed), and the trail is verified again offline.
//!
//! Nothing here is simulated: it fails (non-zero exit, with the daemon's log) if any step
//! does not happen for real within its deadline.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::Context;
use crate::client::Client;

/// `symbiont demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Data directory of the demo daemon (created; must not hold another daemon's state)
    /// [default: a new directory under the system's temporary directory].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The example agents' directory [default: `examples/agents` of the current directory
    /// or of the source tree this binary was built in].
    #[arg(long, value_name = "DIR")]
    pub examples: Option<PathBuf>,
    /// How long each step may take before the demo fails.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = humantime::parse_duration)]
    pub step_timeout: Duration,
}

/// The example agents, created consumers first so none of the collector's documents finds
/// its reader missing.
const AGENTS: [&str; 3] = ["reporter", "summarizer", "collector"];

/// Runs the demo.
pub fn run(args: DemoArgs, ctx: &Context) -> Result<ExitCode> {
    super::client_runtime()?.block_on(demo(args, ctx))
}

fn find_examples(given: Option<PathBuf>) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match given {
        Some(dir) => vec![dir],
        None => {
            let mut c = vec![PathBuf::from("examples/agents")];
            // target/{debug,release}/symbiont → the source tree.
            if let Ok(exe) = std::env::current_exe() {
                if let Some(root) = exe.ancestors().nth(3) {
                    c.push(root.join("examples/agents"));
                }
            }
            c.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/agents"));
            c
        }
    };
    for dir in &candidates {
        if dir.join("collector.agent").is_file() {
            return dir
                .canonicalize()
                .with_context(|| format!("resolving {}", dir.display()));
        }
    }
    bail!(
        "no example agents found (looked for collector.agent in {}); pass --examples DIR",
        candidates
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn fresh_data_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir,
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            std::env::temp_dir().join(format!("symbiont-demo-{stamp}-{}", std::process::id()))
        }
    };
    if dir.join("state.db").exists() || dir.join("audit").exists() {
        bail!(
            "{} already holds a runtime's state; the demo starts from an empty directory \
             (give another --data-dir, or remove this one)",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// The daemon child: killed if the demo fails half-way.
struct Daemon {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Daemon {
    async fn start(ctx: &Context, data_dir: &Path, timeout: Duration) -> Result<(Self, String)> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let log = data_dir.join("daemon.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(exe);
        if let Some(config) = &ctx.config_path {
            cmd.arg("--config").arg(config);
        }
        cmd.args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting `symbiont up`")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the daemon's stdout is not piped"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut daemon = Daemon { child, log };
        let url = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("symbiont: listening on ") {
                    return Ok::<_, std::io::Error>(Some(url.trim().to_string()));
                }
            }
            Ok(None)
        })
        .await;
        let url = match url {
            Ok(Ok(Some(url))) => url,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = daemon.child.wait().await.ok();
                bail!(
                    "the daemon exited before serving ({status:?}):\n{}",
                    daemon.log_tail()
                );
            }
            Err(_) => bail!(
                "the daemon did not start within {}:\n{}",
                humantime::format_duration(timeout),
                daemon.log_tail()
            ),
        };
        // Keep draining stdout so the daemon never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((daemon, url))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- last lines of {} ---\n{}",
            self.log.display(),
            lines[start..].join("\n")
        )
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self, timeout: Duration) -> Result<(std::process::ExitStatus, Duration)> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("the daemon has already exited"))?;
        let pid = libc::pid_t::try_from(pid).context("daemon pid")?;
        let t0 = Instant::now();
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped) and a valid
        // signal number; it touches no memory.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("signalling the daemon: {}", std::io::Error::last_os_error());
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok((status.context("waiting for the daemon")?, t0.elapsed())),
            Err(_) => bail!(
                "the daemon did not stop within {} of SIGTERM:\n{}",
                humantime::format_duration(timeout),
                self.log_tail()
            ),
        }
    }
}

fn say(text: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", text.as_ref());
    let _ = out.flush();
}

async fn demo(args: DemoArgs, ctx: &Context) -> Result<ExitCode> {
    let examples = find_examples(args.examples)?;
    let data_dir = fresh_data_dir(args.data_dir)?;
    let step = args.step_timeout;
    let t_start = Instant::now();

    say(format!(
        "==> starting the daemon (symbiont up) on a free loopback port, data in {}",
        data_dir.display()
    ));
    let (token, _) =
        crate::tokens::create(&data_dir, "demo").context("creating the demo's API token")?;
    let (daemon, url) = Daemon::start(ctx, &data_dir, step).await?;
    let outcome = drive(&url, token, &examples, step).await;
    let outcome = match outcome {
        Ok(summary) => summary,
        Err(e) => {
            let tail = daemon.log_tail();
            drop(daemon);
            return Err(e.context(tail));
        }
    };

    say("==> stopping the daemon with SIGTERM (agents stopped, audit flushed)");
    let (status, took) = daemon.stop(step).await?;
    if !status.success() {
        bail!("the daemon exited with {status}");
    }
    say(format!(
        "    stopped cleanly ({status}) in {:.2} s",
        took.as_secs_f64()
    ));

    say("==> verifying the audit trail offline (what `symbiont audit verify` does)");
    let mut config = ctx.load_config()?;
    config.storage.data_dir = data_dir.clone();
    let report = super::audit::verify_offline(&config, None, None)?;
    if !report.is_ok() {
        bail!("the audit trail does not verify after shutdown:\n{report}");
    }
    say(format!(
        "    ok: {} entries ({} events, {} signed checkpoints), hash chain and signatures intact",
        report.entries, report.events, report.checkpoints
    ));
    say(format!(
        "==> done in {:.1} s: {} agents ran in {} sandboxes, {} messages, 1 task, audit verified",
        t_start.elapsed().as_secs_f64(),
        AGENTS.len(),
        outcome.tier,
        outcome.messages
    ));
    say(format!(
        "    state kept in {dir}; restart it with: symbiont up --data-dir {dir}",
        dir = data_dir.display()
    ));
    Ok(ExitCode::SUCCESS)
}

struct Outcome {
    tier: String,
    messages: usize,
}

async fn drive(url: &str, token: String, examples: &Path, step: Duration) -> Result<Outcome> {
    let client = Client::new(url, Some(token))?;
    let health: Value = client.get("/health").await?;
    let tiers: Vec<String> = health["tiers"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["tier"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    say(format!(
        "    {url} is up (symbiont {}); sandbox tiers available here: {}",
        health["version"].as_str().unwrap_or("?"),
        tiers.join(", ")
    ));

    say(format!(
        "==> creating the example agents from {}",
        examples.display()
    ));
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let mut tier = String::from("?");
    for name in AGENTS {
        let path = examples.join(format!("{name}.agent"));
        let definition = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let t0 = Instant::now();
        let agent: Value = client
            .post(
                "/v1/agents",
                &json!({
                    "definition": definition,
                    "base_dir": examples.display().to_string(),
                }),
            )
            .await
            .map_err(|e| anyhow!("creating {name}: {e}"))?;
        let id = agent["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no id in {agent}"))?
            .to_string();
        let agent = wait_running(&client, &id, step).await?;
        tier = agent["effective_tier"]
            .as_str()
            .or(agent["tier"].as_str())
            .unwrap_or("?")
            .to_string();
        say(format!(
            "    {name:<10} {id}  {} in a {tier} sandbox {} ({} ms)",
            agent["state"].as_str().unwrap_or("?"),
            agent["sandbox_id"]
                .as_str()
                .map(|s| format!("[{s}]"))
                .unwrap_or_default(),
            t0.elapsed().as_millis()
        ));
        ids.insert(id, name.to_string());
    }

    say("==> messages on the bus (Ed25519-signed, AES-256-GCM-encrypted, policy-checked), from the audit trail");
    let messages = watch_messages(&client, &ids, step).await?;

    say("==> scheduling a task on the reporter (its result is the report)");
    let reporter = ids
        .iter()
        .find(|(_, n)| n.as_str() == "reporter")
        .map(|(id, _)| id.clone())
        .ok_or_else(|| anyhow!("the reporter was not created"))?;
    let receipt: Value = client
        .post(
            "/v1/tasks",
            &json!({"agent_id": reporter, "input": "{}", "priority": "high", "timeout": "30s"}),
        )
        .await
        .map_err(|e| anyhow!("submitting the task: {e}"))?;
    let task_id = receipt["task_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no task id in {receipt}"))?
        .to_string();
    say(format!("    task {task_id} queued (durable)"));
    let task: Value = client
        .get(&format!(
            "/v1/tasks/{task_id}?wait={}s",
            step.as_secs().max(1)
        ))
        .await?;
    if task["status"] != "completed" {
        bail!("the task did not complete: {task}");
    }
    let output: Value = serde_json::from_str(task["output"].as_str().unwrap_or("null"))
        .with_context(|| format!("the task's output is not JSON: {task}"))?;
    let report = output["report"]
        .as_str()
        .ok_or_else(|| anyhow!("no report in the task's output: {output}"))?;
    say(format!(
        "    completed after {} attempt(s); the report:",
        task["attempts"]
    ));
    for line in report.lines() {
        say(format!("      {line}"));
    }

    say("==> agents now");
    let agents: Value = client.get("/v1/agents").await?;
    for a in agents["agents"].as_array().into_iter().flatten() {
        say(format!(
            "    {:<10} {:<8} tier={:<7} restarts={}",
            a["name"].as_str().unwrap_or("?"),
            a["state"].as_str().unwrap_or("?"),
            a["effective_tier"]
                .as_str()
                .or(a["tier"].as_str())
                .unwrap_or("?"),
            a["restart_count"]
        ));
    }

    say("==> verifying the audit trail through the API (GET /v1/audit/verify)");
    let verify: Value = client.get("/v1/audit/verify").await?;
    if verify["ok"] != true {
        bail!("the audit trail does not verify: {verify}");
    }
    say(format!(
        "    ok: {} events, {} signed checkpoints, signed through #{}",
        verify["events"], verify["checkpoints"], verify["signed_through"]
    ));
    Ok(Outcome { tier, messages })
}

async fn wait_running(client: &Client, id: &str, step: Duration) -> Result<Value> {
    let deadline = Instant::now() + step;
    loop {
        let agent: Value = client.get(&format!("/v1/agents/{id}")).await?;
        match agent["state"].as_str() {
            Some("running") => return Ok(agent),
            Some("failed") | Some("terminated") => bail!(
                "agent {} ended {}: {}",
                agent["name"],
                agent["state"],
                agent["failure_reason"]
            ),
            _ if Instant::now() > deadline => bail!("agent did not reach running: {agent}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Prints every message the agents send as it is audited, until the reporter has received
/// a summary of each of the collector's two documents.
async fn watch_messages(
    client: &Client,
    names: &BTreeMap<String, String>,
    step: Duration,
) -> Result<usize> {
    let name = |id: Option<&str>| -> String {
        id.and_then(|id| names.get(id).cloned())
            .unwrap_or_else(|| "operator".to_string())
    };
    let deadline = Instant::now() + step;
    let mut seen: HashSet<String> = HashSet::new();
    let mut summaries = 0;
    loop {
        let list: Value = client.get("/v1/audit?type=MessageSent").await?;
        for event in list["events"].as_array().into_iter().flatten() {
            let Some(id) = event["id"].as_str() else {
                continue;
            };
            if !seen.insert(id.to_string()) {
                continue;
            }
            let meta = &event["metadata"];
            let topic = meta["topic"].as_str().unwrap_or("?");
            if topic == "summaries" && name(meta["to"].as_str()) == "reporter" {
                summaries += 1;
            }
            say(format!(
                "    {:<10} -> {:<10} topic={:<10} {:>5} B  {}",
                name(meta["from"].as_str()),
                name(meta["to"].as_str()),
                topic,
                meta["size"].as_str().unwrap_or("?"),
                event["timestamp"].as_str().unwrap_or("")
            ));
        }
        if summaries >= 2 {
            return Ok(seen.len());
        }
        if Instant::now() > deadline {
            bail!(
                "the reporter received {summaries} of 2 summaries within {}",
                humantime::format_duration(step)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
