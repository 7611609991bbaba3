//! Usage monitoring and violation detection: the [`UsageSource`] seam, the per-agent
//! [`ResourceUsage`] the API shows, and the per-agent escalation state machine that decides
//! which step of which ladder to take after each sample.
//!
//! Detection, per sample:
//! - **overuse** of CPU (cores used over the last interval), memory (bytes now), disk (MB/s
//!   read or written over the last interval) or network (Mb/s received or sent) above the
//!   allocated limit × `overuse_tolerance`, for `overuse_samples` consecutive samples;
//! - **execution timeout**: running (monitored) for longer than `execution_timeout`;
//! - **idle**: no CPU progress above `idle_cpu_threshold`, no change of any disk or network
//!   counter and no [`super::DefaultResourceManager::record_activity`] for `idle_timeout`.
//!
//! Each kind walks its own ladder (see [`super::EscalationConfig`]); at most one step per
//! agent is taken per round (the most severe one due) and no step starts while the agent's
//! previous one is still running.
//!
//! Time is measured with `tokio::time::Instant`, so the logic runs under a paused test clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::config::{EscalationAction, EscalationConfig, EscalationStep};
use super::ledger::fmt_mib;
use super::ResourceError;
use crate::sandbox::{Sandbox, SandboxStats};
use crate::types::{AgentId, ResourceLimits};

/// Where the monitor reads an agent's usage. Implemented for `Arc<dyn Sandbox>` (through
/// [`Sandbox::stats`], which reads cgroup counters, the Docker stats API or the VM's
/// process in the real tiers) and for [`super::CgroupUsageSource`].
#[async_trait]
pub trait UsageSource: Send + Sync + 'static {
    /// Cumulative counters now (CPU time, disk and network bytes since start) and current
    /// memory use.
    async fn sample(&self) -> Result<SandboxStats, ResourceError>;
}

#[async_trait]
impl UsageSource for Arc<dyn Sandbox> {
    async fn sample(&self) -> Result<SandboxStats, ResourceError> {
        self.stats()
            .await
            .map_err(|e| ResourceError::Usage(format!("{e} ({})", e.code())))
    }
}

/// What kind of limit was violated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// CPU use above `cpu_cores`.
    CpuOveruse,
    /// Memory use above `memory_mb`.
    MemoryOveruse,
    /// Disk bandwidth above `disk_io_mbps`.
    DiskOveruse,
    /// Network bandwidth above `network_io_mbps`.
    NetworkOveruse,
    /// Running longer than `execution_timeout`.
    ExecutionTimeout,
    /// Idle longer than `idle_timeout`.
    Idle,
}

impl ViolationKind {
    /// Every kind, in index order.
    pub const ALL: [ViolationKind; 6] = [
        ViolationKind::CpuOveruse,
        ViolationKind::MemoryOveruse,
        ViolationKind::DiskOveruse,
        ViolationKind::NetworkOveruse,
        ViolationKind::ExecutionTimeout,
        ViolationKind::Idle,
    ];

    /// The snake-case name used in audit records.
    pub fn name(&self) -> &'static str {
        match self {
            ViolationKind::CpuOveruse => "cpu_overuse",
            ViolationKind::MemoryOveruse => "memory_overuse",
            ViolationKind::DiskOveruse => "disk_overuse",
            ViolationKind::NetworkOveruse => "network_overuse",
            ViolationKind::ExecutionTimeout => "execution_timeout",
            ViolationKind::Idle => "idle",
        }
    }

    /// True for the four overuse kinds.
    pub fn is_overuse(&self) -> bool {
        (*self as usize) < 4
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The ladder configured for this kind.
    pub fn ladder(self, cfg: &EscalationConfig) -> &[EscalationStep] {
        match self {
            ViolationKind::ExecutionTimeout => &cfg.execution_timeout,
            ViolationKind::Idle => &cfg.idle,
            _ => &cfg.overuse,
        }
    }
}

/// A violation whose ladder is in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViolationStatus {
    /// What was violated.
    pub kind: ViolationKind,
    /// The latest measurement, e.g. `cpu overuse: 1.98 cores, limit 0.5 cores`.
    pub detail: String,
    /// When it was first detected.
    pub since: SystemTime,
    /// How many steps of its ladder were taken.
    pub steps_taken: usize,
    /// The last step taken.
    pub last_action: Option<EscalationAction>,
    /// How the last step ended (`ok` or the error).
    pub last_outcome: Option<String>,
}

/// One agent's measured usage, as the API shows it. Rates are over the last interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// The agent.
    pub agent_id: AgentId,
    /// When the last successful sample was taken (`None` before the first).
    pub sampled_at: Option<SystemTime>,
    /// Successful samples so far.
    pub samples: u64,
    /// Failed samples so far.
    pub sample_errors: u64,
    /// The last sampling error, cleared by the next success.
    pub last_error: Option<String>,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Peak memory, bytes (when the tier reports it).
    pub memory_peak_bytes: u64,
    /// CPU time consumed since start, nanoseconds.
    pub cpu_time_ns: u64,
    /// CPU cores used over the last interval (1.0 = one core busy).
    pub cpu_cores: f64,
    /// Bytes read from block devices since start.
    pub disk_read_bytes: u64,
    /// Bytes written to block devices since start.
    pub disk_write_bytes: u64,
    /// Read rate over the last interval, bytes/s.
    pub disk_read_bytes_per_sec: f64,
    /// Write rate over the last interval, bytes/s.
    pub disk_write_bytes_per_sec: f64,
    /// Bytes received since start.
    pub net_rx_bytes: u64,
    /// Bytes sent since start.
    pub net_tx_bytes: u64,
    /// Receive rate over the last interval, bytes/s.
    pub net_rx_bytes_per_sec: f64,
    /// Send rate over the last interval, bytes/s.
    pub net_tx_bytes_per_sec: f64,
    /// Processes/threads.
    pub pids: u64,
    /// When monitoring (and the execution clock) started.
    pub running_since: SystemTime,
    /// The last time the agent made progress (CPU, I/O, recorded activity).
    pub last_activity: SystemTime,
    /// The limits it was admitted with.
    pub limits: ResourceLimits,
    /// The limits in force now (lower than `limits` after a throttle).
    pub effective_limits: ResourceLimits,
    /// True while the agent is held suspended by an escalation step.
    pub held: bool,
    /// Violations whose ladder is in progress.
    pub violations: Vec<ViolationStatus>,
}

impl ResourceUsage {
    fn new(agent_id: AgentId, limits: ResourceLimits) -> Self {
        let now = SystemTime::now();
        Self {
            agent_id,
            sampled_at: None,
            samples: 0,
            sample_errors: 0,
            last_error: None,
            memory_bytes: 0,
            memory_peak_bytes: 0,
            cpu_time_ns: 0,
            cpu_cores: 0.0,
            disk_read_bytes: 0,
            disk_write_bytes: 0,
            disk_read_bytes_per_sec: 0.0,
            disk_write_bytes_per_sec: 0.0,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            net_rx_bytes_per_sec: 0.0,
            net_tx_bytes_per_sec: 0.0,
            pids: 0,
            running_since: now,
            last_activity: now,
            effective_limits: limits.clone(),
            limits,
            held: false,
            violations: Vec::new(),
        }
    }

    /// How much of its own limits the agent uses: the highest of CPU and memory use over
    /// their limits (0.0 idle, 1.0 at a limit, above 1.0 over it).
    pub fn load(&self) -> f64 {
        let cpu = if self.limits.cpu_cores > 0.0 {
            self.cpu_cores / self.limits.cpu_cores
        } else {
            0.0
        };
        let mem_limit = self.limits.memory_bytes();
        let mem = if mem_limit > 0 {
            self.memory_bytes as f64 / mem_limit as f64
        } else {
            0.0
        };
        cpu.max(mem)
    }
}

/// One step the monitor decided to take.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PlannedAction {
    pub(crate) agent_id: AgentId,
    pub(crate) kind: ViolationKind,
    /// 0-based index in the ladder.
    pub(crate) step: usize,
    pub(crate) ladder_len: usize,
    pub(crate) action: EscalationAction,
    pub(crate) reason: String,
    /// For throttle: the limits to apply.
    pub(crate) new_limits: Option<ResourceLimits>,
}

/// A step that was taken, and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// The agent.
    pub agent_id: AgentId,
    /// The violation.
    pub kind: ViolationKind,
    /// The action.
    pub action: EscalationAction,
    /// 1-based step in its ladder.
    pub step: usize,
    /// Why (the measurement and the limit).
    pub reason: String,
    /// For throttle: the limits applied.
    pub new_limits: Option<ResourceLimits>,
    /// `Ok` or what failed.
    pub outcome: Result<(), String>,
}

/// What one sample changed.
#[derive(Debug, Default)]
pub(crate) struct Observation {
    pub(crate) plan: Option<PlannedAction>,
    /// Ladders that reset because the agent is back within its limits.
    pub(crate) cleared: Vec<ViolationKind>,
}

#[derive(Clone, Debug, Default)]
struct Ladder {
    taken: usize,
    last_step_at: Option<Instant>,
    grace: Duration,
    clear_samples: u32,
    since: Option<SystemTime>,
    detail: String,
    last_action: Option<EscalationAction>,
    last_outcome: Option<String>,
}

/// One monitored agent: where to read it and its state.
pub(crate) struct Monitored {
    pub(crate) agent_id: AgentId,
    pub(crate) source: Arc<dyn UsageSource>,
    pub(crate) state: Mutex<AgentMonitor>,
}

/// The per-agent state machine.
pub(crate) struct AgentMonitor {
    agent_id: AgentId,
    limits: ResourceLimits,
    effective: ResourceLimits,
    usage: ResourceUsage,
    prev: Option<(Instant, SandboxStats)>,
    running_since: Instant,
    last_activity: Instant,
    over_counts: [u32; 4],
    ladders: [Ladder; 6],
    in_flight: bool,
    held: Option<ViolationKind>,
    /// Suspended (by anyone): idleness is not the agent's doing.
    suspended: bool,
    retired: bool,
}

const MB: f64 = 1_000_000.0;

fn ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

impl AgentMonitor {
    pub(crate) fn new(agent_id: AgentId, limits: ResourceLimits, now: Instant) -> Self {
        Self {
            agent_id,
            effective: limits.clone(),
            usage: ResourceUsage::new(agent_id, limits.clone()),
            limits,
            prev: None,
            running_since: now,
            last_activity: now,
            over_counts: [0; 4],
            ladders: Default::default(),
            in_flight: false,
            held: None,
            suspended: false,
            retired: false,
        }
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired
    }

    /// The agent made progress now (a task, a message).
    pub(crate) fn record_activity(&mut self, now: Instant) {
        self.last_activity = now;
        self.usage.last_activity = SystemTime::now();
    }

    /// Restarts the execution clock (a new execution began).
    pub(crate) fn restart_execution_clock(&mut self, now: Instant) {
        self.running_since = now;
        self.usage.running_since = SystemTime::now();
    }

    /// Forgets every violation (an operator resumed or forgave the agent). Throttled limits
    /// stay in force.
    pub(crate) fn clear_violations(&mut self, now: Instant) {
        self.ladders = Default::default();
        self.over_counts = [0; 4];
        self.held = None;
        self.prev = None;
        self.record_activity(now);
    }

    /// The lifecycle says the agent is (no longer) suspended. Leaving suspension releases a
    /// hold and forgets violations, as an operator's resume does.
    pub(crate) fn set_suspended(&mut self, suspended: bool, now: Instant) {
        if self.suspended && !suspended {
            self.clear_violations(now);
        }
        self.suspended = suspended;
    }

    /// New allocated limits (after `update_allocation`).
    pub(crate) fn set_limits(&mut self, limits: ResourceLimits) {
        self.usage.limits = limits.clone();
        self.usage.effective_limits = limits.clone();
        self.effective = limits.clone();
        self.limits = limits;
    }

    /// The usage as the API shows it.
    pub(crate) fn usage(&self) -> ResourceUsage {
        let mut usage = self.usage.clone();
        usage.effective_limits = self.effective.clone();
        usage.held = self.held.is_some();
        usage.violations = ViolationKind::ALL
            .iter()
            .zip(self.ladders.iter())
            .filter_map(|(kind, l)| {
                l.since.map(|since| ViolationStatus {
                    kind: *kind,
                    detail: l.detail.clone(),
                    since,
                    steps_taken: l.taken,
                    last_action: l.last_action,
                    last_outcome: l.last_outcome.clone(),
                })
            })
            .collect();
        usage
    }

    /// Load (see [`ResourceUsage::load`]) without cloning.
    pub(crate) fn load(&self) -> f64 {
        self.usage.load()
    }

    /// Takes one sample into account and decides the next step, if any.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        sample: Result<SandboxStats, String>,
        cfg: &EscalationConfig,
    ) -> Observation {
        let sys_now = SystemTime::now();
        // Which overuse checks this sample can answer: None = unknown.
        let mut over: [Option<bool>; 4] = [None; 4];
        match sample {
            Err(e) => {
                self.usage.sample_errors += 1;
                self.usage.last_error = Some(e);
            }
            Ok(stats) => {
                self.absorb(now, sys_now, stats, cfg, &mut over);
            }
        }

        let mut obs = Observation::default();
        let limits = &self.limits;
        let u = &self.usage;
        let mut active = [false; 6];
        let mut details: [Option<String>; 6] = Default::default();

        for i in 0..4 {
            match over[i] {
                Some(true) => {
                    self.over_counts[i] = self.over_counts[i].saturating_add(1);
                    self.ladders[i].clear_samples = 0;
                }
                Some(false) => {
                    self.over_counts[i] = 0;
                    self.ladders[i].clear_samples = self.ladders[i].clear_samples.saturating_add(1);
                }
                None => {}
            }
            active[i] = self.over_counts[i] >= cfg.overuse_samples;
            if active[i] {
                let n = self.over_counts[i];
                details[i] = Some(match ViolationKind::ALL[i] {
                    ViolationKind::CpuOveruse => format!(
                        "cpu overuse: {:.2} cores for {n} samples, limit {} cores",
                        u.cpu_cores, limits.cpu_cores
                    ),
                    ViolationKind::MemoryOveruse => format!(
                        "memory overuse: {} for {n} samples, limit {} MiB",
                        fmt_mib(u.memory_bytes),
                        limits.memory_mb
                    ),
                    ViolationKind::DiskOveruse => format!(
                        "disk overuse: read {:.1} MB/s, write {:.1} MB/s for {n} samples, limit {} MB/s",
                        u.disk_read_bytes_per_sec / MB,
                        u.disk_write_bytes_per_sec / MB,
                        limits.disk_io_mbps
                    ),
                    _ => format!(
                        "network overuse: rx {:.1} Mb/s, tx {:.1} Mb/s for {n} samples, limit {} Mb/s",
                        u.net_rx_bytes_per_sec * 8.0 / MB,
                        u.net_tx_bytes_per_sec * 8.0 / MB,
                        limits.network_io_mbps
                    ),
                });
            }
        }

        let running = now.saturating_duration_since(self.running_since);
        let exec_i = ViolationKind::ExecutionTimeout.index();
        active[exec_i] = running > limits.execution_timeout;
        if active[exec_i] {
            details[exec_i] = Some(format!(
                "execution timeout: running for {}, execution_timeout {}",
                humantime::format_duration(ms(running)),
                humantime::format_duration(limits.execution_timeout)
            ));
        } else {
            let l = &mut self.ladders[exec_i];
            l.clear_samples = l.clear_samples.saturating_add(1);
        }

        let idle_for = now.saturating_duration_since(self.last_activity);
        let idle_i = ViolationKind::Idle.index();
        // An agent we froze is idle because of us: that is not the agent's violation.
        let frozen_by_us = self.held.is_some_and(|k| k != ViolationKind::Idle);
        let frozen = frozen_by_us || (self.suspended && self.held.is_none());
        active[idle_i] = !frozen && idle_for >= limits.idle_timeout;
        if active[idle_i] {
            details[idle_i] = Some(format!(
                "idle: no activity for {}, idle_timeout {}",
                humantime::format_duration(ms(idle_for)),
                humantime::format_duration(limits.idle_timeout)
            ));
        } else {
            let l = &mut self.ladders[idle_i];
            l.clear_samples = l.clear_samples.saturating_add(1);
        }

        // A hold keeps its violation active until the agent is resumed.
        if let Some(kind) = self.held {
            let i = kind.index();
            if !active[i] {
                active[i] = true;
                details[i] = Some(format!(
                    "{} (held suspended)",
                    self.ladders[i].detail.trim_end_matches(" (held suspended)")
                ));
            }
        }

        let mut best: Option<(EscalationAction, ViolationKind)> = None;
        for kind in ViolationKind::ALL {
            let i = kind.index();
            let ladder_cfg = kind.ladder(cfg);
            let l = &mut self.ladders[i];
            if active[i] {
                if l.since.is_none() {
                    l.since = Some(sys_now);
                }
                if let Some(d) = details[i].take() {
                    l.detail = d;
                }
                if self.in_flight || self.retired || l.taken >= ladder_cfg.len() {
                    continue;
                }
                let due = match l.last_step_at {
                    None => true,
                    Some(at) => now.saturating_duration_since(at) >= l.grace,
                };
                if !due {
                    continue;
                }
                let action = ladder_cfg[l.taken].action;
                if best.is_none_or(|(a, _)| action > a) {
                    best = Some((action, kind));
                }
            } else if l.since.is_some() && l.clear_samples >= cfg.recovery_samples {
                *l = Ladder::default();
                obs.cleared.push(kind);
            }
        }

        if let Some((action, kind)) = best {
            let i = kind.index();
            let ladder_cfg = kind.ladder(cfg);
            let new_limits =
                (action == EscalationAction::Throttle).then(|| self.throttled(kind, cfg));
            let l = &mut self.ladders[i];
            let step = l.taken;
            l.taken += 1;
            l.last_step_at = Some(now);
            l.grace = ladder_cfg[step].grace.unwrap_or(cfg.default_grace);
            self.in_flight = true;
            obs.plan = Some(PlannedAction {
                agent_id: self.agent_id,
                kind,
                step,
                ladder_len: ladder_cfg.len(),
                action,
                reason: {
                    let e = ResourceError::LimitExceeded {
                        agent: self.agent_id,
                        detail: l.detail.clone(),
                    };
                    format!("{e} ({})", e.code())
                },
                new_limits,
            });
        }
        obs
    }

    fn absorb(
        &mut self,
        now: Instant,
        sys_now: SystemTime,
        stats: SandboxStats,
        cfg: &EscalationConfig,
        over: &mut [Option<bool>; 4],
    ) {
        let tol = cfg.overuse_tolerance;
        let u = &mut self.usage;
        u.samples += 1;
        u.sampled_at = Some(sys_now);
        u.last_error = None;
        u.memory_bytes = stats.memory_bytes;
        u.memory_peak_bytes = stats.memory_peak_bytes.max(stats.memory_bytes);
        u.pids = stats.pids;
        over[1] = Some(stats.memory_bytes as f64 > self.limits.memory_bytes() as f64 * tol);

        if let Some((t0, prev)) = &self.prev {
            let dt = now.saturating_duration_since(*t0).as_secs_f64();
            if dt > 0.0 {
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                u.cpu_cores = rate(stats.cpu_usage_ns, prev.cpu_usage_ns) / 1e9;
                u.disk_read_bytes_per_sec = rate(stats.disk_read_bytes, prev.disk_read_bytes);
                u.disk_write_bytes_per_sec = rate(stats.disk_write_bytes, prev.disk_write_bytes);
                u.net_rx_bytes_per_sec = rate(stats.net_rx_bytes, prev.net_rx_bytes);
                u.net_tx_bytes_per_sec = rate(stats.net_tx_bytes, prev.net_tx_bytes);

                let l = &self.limits;
                over[0] = Some(u.cpu_cores > l.cpu_cores * tol);
                over[2] = Some(
                    l.disk_io_mbps > 0
                        && u.disk_read_bytes_per_sec.max(u.disk_write_bytes_per_sec)
                            > l.disk_io_mbps as f64 * MB * tol,
                );
                over[3] = Some(
                    l.network_io_mbps > 0
                        && u.net_rx_bytes_per_sec.max(u.net_tx_bytes_per_sec) * 8.0
                            > l.network_io_mbps as f64 * MB * tol,
                );

                let io_changed = stats.disk_read_bytes != prev.disk_read_bytes
                    || stats.disk_write_bytes != prev.disk_write_bytes
                    || stats.net_rx_bytes != prev.net_rx_bytes
                    || stats.net_tx_bytes != prev.net_tx_bytes;
                // The program's own CPU when the tier tells it apart from its overhead.
                let activity = match (stats.program_cpu_ns, prev.program_cpu_ns) {
                    (Some(now), Some(before)) => rate(now, before) / 1e9,
                    _ => u.cpu_cores,
                };
                if activity > cfg.idle_cpu_threshold || io_changed {
                    self.last_activity = now;
                    u.last_activity = sys_now;
                    // Progress while held means someone resumed the agent.
                    self.held = None;
                }
            }
        }
        u.cpu_time_ns = stats.cpu_usage_ns;
        u.disk_read_bytes = stats.disk_read_bytes;
        u.disk_write_bytes = stats.disk_write_bytes;
        u.net_rx_bytes = stats.net_rx_bytes;
        u.net_tx_bytes = stats.net_tx_bytes;
        self.prev = Some((now, stats));
    }

    /// The limits a throttle step for `kind` applies.
    fn throttled(&self, kind: ViolationKind, cfg: &EscalationConfig) -> ResourceLimits {
        let mut l = self.effective.clone();
        let f = cfg.throttle_factor;
        match kind {
            ViolationKind::MemoryOveruse => l.memory_mb = self.limits.memory_mb,
            ViolationKind::DiskOveruse => {
                l.disk_io_mbps = ((l.disk_io_mbps as f64 * f).floor() as u64).max(1)
            }
            ViolationKind::NetworkOveruse => {
                l.network_io_mbps = ((l.network_io_mbps as f64 * f).floor() as u64).max(1)
            }
            ViolationKind::CpuOveruse | ViolationKind::ExecutionTimeout | ViolationKind::Idle => {
                // The kernel's smallest CFS quota is 1 ms per 100 ms period.
                l.cpu_cores = (l.cpu_cores * f).max(0.01)
            }
        }
        l
    }

    /// Records how a planned step ended.
    pub(crate) fn finish(
        &mut self,
        plan: &PlannedAction,
        outcome: &Result<(), String>,
        now: Instant,
    ) {
        self.in_flight = false;
        let i = plan.kind.index();
        let l = &mut self.ladders[i];
        l.last_action = Some(plan.action);
        l.last_outcome = Some(match outcome {
            Ok(()) => "ok".to_string(),
            Err(e) => e.clone(),
        });
        // Grace counts from the end of the step.
        l.last_step_at = Some(now);
        match outcome {
            Ok(()) => match plan.action {
                EscalationAction::Throttle => {
                    if let Some(limits) = &plan.new_limits {
                        self.effective = limits.clone();
                    }
                    if plan.kind.is_overuse() {
                        // The next step needs a fresh run of sustained overuse.
                        self.over_counts[i] = 0;
                    }
                }
                EscalationAction::Suspend => {
                    self.held = Some(plan.kind);
                    // Rates across the freeze would look like progress.
                    self.prev = None;
                }
                EscalationAction::Stop | EscalationAction::Kill => self.retired = true,
                EscalationAction::Warn => {}
            },
            Err(_) => {
                // A failed last step is retried after its grace.
                if plan.step + 1 == plan.ladder_len {
                    l.taken = plan.step;
                }
            }
        }
    }
}
