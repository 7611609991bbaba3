//! `symbiont bench api`: starts a real daemon (this binary, `symbiont up`) on a fresh data
//! directory and a free loopback port, and measures
//!
//! 1. its idle resident memory with 0 agents, then with N registered agents (cheap
//!    ephemeral agents created with `start: false`: definition compiled, resources
//!    admitted, bus keys made, no sandbox), read from `/proc/PID/status` (`VmRSS`,
//!    `RssAnon`) after the daemon has been idle for a while;
//! 2. API throughput and latency of `GET /v1/agents/{id}` (agent status, authenticated)
//!    with C concurrent keep-alive HTTP/1.1 clients, against baselines measured in the
//!    same run on the same daemon, interleaved: the HTTP stack's floor (an unrouted path:
//!    routing, middleware and a small JSON error body, no authentication, no runtime call)
//!    and `GET /health` (no authentication; it walks every agent);
//! 3. the graceful shutdown (SIGTERM → exit 0) time.
//!
//! The load client runs on the same machine as the daemon, so the figures are the pair's.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::Context;
use crate::api::{AgentView, CreateAgentRequest};
use crate::client::Client;
use crate::output::print_json;

/// `symbiont bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// API requests/s and latency for agent status; daemon RSS with 0 and N agents.
    Api(ApiArgs),
}

/// `symbiont bench api`
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// How long each load phase runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Concurrent clients (one keep-alive connection each).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Agents registered for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Idle time before each memory reading.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Keep the data directory (printed) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// Memory of a process from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// VmRSS, KiB.
    pub vm_rss_kib: u64,
    /// RssAnon, KiB.
    pub rss_anon_kib: u64,
    /// RssFile, KiB.
    pub rss_file_kib: u64,
}

/// Reads `/proc/PID/status`.
pub fn memory_of(pid: u32) -> Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        vm_rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        rss_file_kib: field("RssFile:"),
    })
}

/// One load phase's result.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// What was requested.
    pub target: String,
    /// Requests completed.
    pub requests: u64,
    /// Non-2xx answers or transport errors.
    pub errors: u64,
    /// Requests per second.
    pub requests_per_sec: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile latency, microseconds.
    pub p999_us: f64,
    /// Slowest, microseconds.
    pub max_us: f64,
}

/// Everything `bench api` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Concurrent clients.
    pub concurrency: usize,
    /// Seconds per load phase.
    pub duration_secs: f64,
    /// Daemon memory, idle, no agent.
    pub idle_0_agents: Memory,
    /// Daemon memory, idle, with `agents` registered.
    pub idle_n_agents: Memory,
    /// Agents registered.
    pub agents: usize,
    /// Seconds to register them.
    pub register_secs: f64,
    /// (RSS with N − RSS with 0) / N, KiB (VmRSS).
    pub per_agent_kib: f64,
    /// Same with RssAnon.
    pub per_agent_anon_kib: f64,
    /// Agent status load.
    pub status: LoadResult,
    /// Baseline: the HTTP stack's floor (an unrouted path, 404).
    pub floor: LoadResult,
    /// Reference: GET /health (walks every agent).
    pub health: LoadResult,
    /// status req/s ÷ floor req/s.
    pub status_vs_floor_ratio: f64,
    /// Seconds from SIGTERM to exit.
    pub shutdown_secs: f64,
    /// The daemon's exit code.
    pub exit_code: Option<i32>,
}

/// Runs a bench.
pub fn run(cmd: BenchCommand, ctx: &Context) -> Result<ExitCode> {
    let BenchCommand::Api(args) = cmd;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(api(&args))?;
    if ctx.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// A daemon started for a bench or a test: killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its URL.
    pub url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `exe up --config config` and waits for its "listening on" line.
pub fn start_daemon(exe: &Path, config: &Path) -> Result<Daemon> {
    let mut child = Command::new(exe)
        .arg("up")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("symbiont: listening on ") {
                    break url.trim().to_string();
                }
            }
            Some(Err(e)) => bail!("reading the daemon's output: {e}"),
            None => {
                let status = child.wait()?;
                bail!("the daemon exited before listening ({status})");
            }
        }
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(Daemon { child, url })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Drives `concurrency` keep-alive clients at `url` for `duration`; answers with status
/// `expect` count as successes.
pub async fn load(
    url: &str,
    token: Option<&str>,
    expect: u16,
    concurrency: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .context("HTTP client")?;
        let url = url.to_string();
        let token = token.map(str::to_string);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let mut req = http.get(&url);
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let ok = match req.send().await {
                    Ok(resp) => {
                        let ok = resp.status().as_u16() == expect;
                        ok && resp.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.context("load worker")?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok(LoadResult {
        target: url.to_string(),
        requests: all.len() as u64,
        errors,
        requests_per_sec: all.len() as f64 / elapsed,
        p50_us: percentile(&all, 50.0),
        p99_us: percentile(&all, 99.0),
        p999_us: percentile(&all, 99.9),
        max_us: all.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
    })
}

fn bench_config(dir: &Path) -> String {
    format!(
        r#"[storage]
data_dir = "{}"

[api]
listen = "127.0.0.1:0"

[lifecycle]
max_agents = 100000

[log]
level = "warn"
"#,
        dir.display()
    )
}

/// The cheap agent registered N times.
const CHEAP_AGENT: &str = r#"agent bench {
  run ["/bin/true"]
  limits { memory = 16MiB  cpu = 0.005 }
}"#;

async fn register(client: &Client, n: usize) -> Result<Vec<uuid::Uuid>> {
    let client = Arc::new(client.clone());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(ids);
                }
                let agent: AgentView = client
                    .post(
                        "/v1/agents",
                        &CreateAgentRequest {
                            definition: Some(CHEAP_AGENT.into()),
                            config: Some(serde_json::json!({
                                "name": format!("bench-{i}"),
                                "execution_mode": "Ephemeral",
                            })),
                            start: Some(false),
                            ..Default::default()
                        },
                    )
                    .await
                    .with_context(|| format!("registering agent {i}"))?;
                ids.push(agent.id);
            }
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.context("register worker")??);
    }
    Ok(ids)
}

async fn api(args: &ApiArgs) -> Result<BenchReport> {
    let dir = std::env::temp_dir().join(format!(
        "symbiont-bench-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = api_in(args, &dir).await;
    if args.keep {
        eprintln!("data directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn api_in(args: &ApiArgs, dir: &Path) -> Result<BenchReport> {
    let config_path: PathBuf = dir.join("runtime_config.toml");
    std::fs::write(&config_path, bench_config(&dir.join("data")))?;
    let (token, _) = crate::tokens::create(&dir.join("data"), "bench")?;
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut daemon = start_daemon(&exe, &config_path)?;
    let pid = daemon.child.id();
    let client = Client::new(&daemon.url, Some(token.clone()))?;

    eprintln!("daemon {pid} at {}; idle {:?}...", daemon.url, args.settle);
    tokio::time::sleep(args.settle).await;
    let idle_0 = memory_of(pid)?;

    eprintln!("registering {} agents...", args.agents);
    let t0 = Instant::now();
    let ids = register(&client, args.agents).await?;
    let register_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(args.settle).await;
    let idle_n = memory_of(pid)?;

    let target = ids.first().copied().context("no agent registered")?;
    let status_url = format!("{}/v1/agents/{target}", daemon.url);
    let health_url = format!("{}/health", daemon.url);
    let floor_url = format!("{}/bench-floor", daemon.url);
    let c = args.concurrency;
    eprintln!("warm-up...");
    load(&status_url, Some(&token), 200, c, Duration::from_secs(1)).await?;
    load(&floor_url, None, 404, c, Duration::from_secs(1)).await?;
    // Interleaved halves, so drift on a shared machine hits all alike.
    let half = args.duration / 2;
    let (mut status, mut floor, mut health) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..2 {
        eprintln!(
            "load round {}: agent status, floor, health; {:?} each...",
            round + 1,
            half
        );
        status.push(load(&status_url, Some(&token), 200, c, half).await?);
        floor.push(load(&floor_url, None, 404, c, half).await?);
        health.push(load(&health_url, None, 200, c, half).await?);
    }
    let merge = |v: &[LoadResult]| -> LoadResult {
        let requests: u64 = v.iter().map(|r| r.requests).sum();
        let weight = |f: fn(&LoadResult) -> f64| -> f64 {
            v.iter().map(|r| f(r) * r.requests as f64).sum::<f64>() / requests.max(1) as f64
        };
        LoadResult {
            target: v[0].target.clone(),
            requests,
            errors: v.iter().map(|r| r.errors).sum(),
            requests_per_sec: v.iter().map(|r| r.requests_per_sec).sum::<f64>() / v.len() as f64,
            p50_us: weight(|r| r.p50_us),
            p99_us: v.iter().map(|r| r.p99_us).fold(0.0, f64::max),
            p999_us: v.iter().map(|r| r.p999_us).fold(0.0, f64::max),
            max_us: v.iter().map(|r| r.max_us).fold(0.0, f64::max),
        }
    };
    let status = merge(&status);
    let floor = merge(&floor);
    let health = merge(&health);

    // Graceful shutdown.
    let t0 = Instant::now();
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    let rc = unsafe { libc_kill(pid) };
    if rc != 0 {
        bail!("cannot signal the daemon");
    }
    let exit = daemon.child.wait()?;
    let shutdown_secs = t0.elapsed().as_secs_f64();

    let n = ids.len().max(1) as f64;
    Ok(BenchReport {
        concurrency: args.concurrency,
        duration_secs: args.duration.as_secs_f64(),
        idle_0_agents: idle_0,
        idle_n_agents: idle_n,
        agents: ids.len(),
        register_secs,
        per_agent_kib: (idle_n.vm_rss_kib as f64 - idle_0.vm_rss_kib as f64) / n,
        per_agent_anon_kib: (idle_n.rss_anon_kib as f64 - idle_0.rss_anon_kib as f64) / n,
        status_vs_floor_ratio: status.requests_per_sec / floor.requests_per_sec.max(1e-9),
        status,
        floor,
        health,
        shutdown_secs,
        exit_code: exit.code(),
    })
}

/// Sends SIGTERM.
///
/// # Safety
/// `pid` must be a live child of this process.
unsafe fn libc_kill(pid: u32) -> i32 {
    let Ok(pid) = i32::try_from(pid) else {
        return -1;
    };
    // SAFETY: the caller guarantees `pid` is our own unreaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) }
}

fn print_report(r: &BenchReport) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "symbiont bench api ({} clients, {:.0}s per endpoint)",
        r.concurrency, r.duration_secs
    );
    println!(
        "idle RSS, 0 agents:      VmRSS {:.1} MiB  (RssAnon {:.1} MiB, RssFile {:.1} MiB)",
        mib(r.idle_0_agents.vm_rss_kib),
        mib(r.idle_0_agents.rss_anon_kib),
        mib(r.idle_0_agents.rss_file_kib)
    );
    println!(
        "idle RSS, {} agents:  VmRSS {:.1} MiB  (RssAnon {:.1} MiB, RssFile {:.1} MiB); registered in {:.1}s",
        r.agents,
        mib(r.idle_n_agents.vm_rss_kib),
        mib(r.idle_n_agents.rss_anon_kib),
        mib(r.idle_n_agents.rss_file_kib),
        r.register_secs
    );
    println!(
        "per agent:               {:.1} KiB VmRSS, {:.1} KiB RssAnon",
        r.per_agent_kib, r.per_agent_anon_kib
    );
    let health_name = format!("GET /health ({} agents)", r.agents);
    for (name, l) in [
        ("GET /v1/agents/{id}", &r.status),
        ("floor (unrouted, 404)", &r.floor),
        (health_name.as_str(), &r.health),
    ] {
        println!(
            "{name:<26} {:>8.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  p99.9 {:>7.0} µs  max {:>7.0} µs  ({} requests, {} errors)",
            l.requests_per_sec, l.p50_us, l.p99_us, l.p999_us, l.max_us, l.requests, l.errors
        );
    }
    println!(
        "agent status / floor throughput ratio: {:.2}",
        r.status_vs_floor_ratio
    );
    println!(
        "graceful shutdown: {:.2}s, exit code {:?}",
        r.shutdown_secs, r.exit_code
    );
}
