//! The `[resource]` configuration section: capacity totals, the overcommit policy, the
//! monitoring cadence and the escalation ladders.
//!
//! ```toml
//! [resource]
//! total_memory = 0              # bytes; 0 = the machine's memory (MemTotal, or the
//!                               # runtime's own cgroup limit when lower)
//! total_cpu_cores = 0           # 0 = the CPUs this process may run on
//! total_disk_io_mbps = 0        # MB/s shared by all agents; 0 = no admission ceiling
//! total_network_io_mbps = 0     # Mb/s shared by all agents; 0 = no admission ceiling
//! enforcement_enabled = true    # SYMBIONT_RESOURCE_ENFORCEMENT overrides
//! monitoring_interval = "30s"
//!
//! [resource.overcommit]         # capacity = total × ratio
//! memory = 1.0                  # no memory overcommit: memory is not compressible
//! cpu = 4.0                     # CPU limits are ceilings (CFS quota), not reservations
//! disk_io = 1.0
//! network_io = 1.0
//!
//! [resource.escalation]
//! overuse = ["warn", "throttle", { action = "suspend", grace = "5m" }, "kill"]
//! execution_timeout = ["kill"]
//! idle = ["stop"]
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::{ConfigIssue, Validate};

/// `[resource]` configuration. Totals of 0 are detected from the machine (memory, CPU) or
/// mean "no admission ceiling" (disk and network bandwidth, which cannot be detected
/// reliably).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceManagerConfig {
    /// Memory available to agents, in bytes (0 = the machine's memory: `MemTotal` from
    /// `/proc/meminfo`, or the runtime's own cgroup memory limit when that is lower).
    pub total_memory: u64,
    /// CPU cores available to agents (0 = the CPUs this process may use:
    /// `std::thread::available_parallelism`, which honours the affinity mask and cgroup
    /// CPU quotas).
    pub total_cpu_cores: u32,
    /// Disk bandwidth shared by all agents, in MB/s (10^6 bytes per second). 0 = no
    /// admission ceiling: agents' disk limits are enforced per agent but not summed.
    pub total_disk_io_mbps: u64,
    /// Network bandwidth shared by all agents, in Mb/s (10^6 bits per second). 0 = no
    /// admission ceiling.
    pub total_network_io_mbps: u64,
    /// How far the sum of agents' limits may exceed the totals, per resource.
    pub overcommit: OvercommitPolicy,
    /// Refuse limits the agent's tier cannot enforce (RESOURCE_002). When off, that check is
    /// skipped (with a warning at start) but capacity is still accounted and usage still
    /// monitored and escalated. `SYMBIONT_RESOURCE_ENFORCEMENT` overrides it.
    pub enforcement_enabled: bool,
    /// How often usage is sampled.
    #[serde(with = "humantime_serde")]
    pub monitoring_interval: Duration,
    /// Longest one agent's usage sample may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub sample_timeout: Duration,
    /// How many agents are sampled concurrently in a round (matters for slow sources such
    /// as the Docker stats API; cgroup reads complete at once).
    pub sample_concurrency: usize,
    /// What happens when an agent violates its limits.
    pub escalation: EscalationConfig,
}

impl Default for ResourceManagerConfig {
    fn default() -> Self {
        Self {
            total_memory: 0,
            total_cpu_cores: 0,
            total_disk_io_mbps: 0,
            total_network_io_mbps: 0,
            overcommit: OvercommitPolicy::default(),
            enforcement_enabled: true,
            monitoring_interval: Duration::from_secs(30),
            sample_timeout: Duration::from_secs(5),
            sample_concurrency: 64,
            escalation: EscalationConfig::default(),
        }
    }
}

impl Validate for ResourceManagerConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.monitoring_interval.is_zero() {
            issues.push(ConfigIssue::new(
                "resource.monitoring_interval",
                "must be longer than 0s",
            ));
        }
        if self.sample_timeout.is_zero() {
            issues.push(ConfigIssue::new(
                "resource.sample_timeout",
                "must be longer than 0s",
            ));
        }
        if self.sample_concurrency == 0 {
            issues.push(ConfigIssue::new(
                "resource.sample_concurrency",
                "must be at least 1",
            ));
        }
        self.overcommit.validate(issues);
        self.escalation.validate(issues);
    }
}

/// Per-resource overcommit ratios: the admission capacity of a resource is its total times
/// its ratio. 1.0 means no overcommit; a ratio below 1.0 keeps a reserve for the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OvercommitPolicy {
    /// Memory (default 1.0: none; memory cannot be taken back without killing).
    pub memory: f64,
    /// CPU (default 4.0: agents' CPU limits are CFS ceilings and mostly idle).
    pub cpu: f64,
    /// Disk bandwidth (default 1.0), when `total_disk_io_mbps` is set.
    pub disk_io: f64,
    /// Network bandwidth (default 1.0), when `total_network_io_mbps` is set.
    pub network_io: f64,
}

impl Default for OvercommitPolicy {
    fn default() -> Self {
        Self {
            memory: 1.0,
            cpu: 4.0,
            disk_io: 1.0,
            network_io: 1.0,
        }
    }
}

/// Largest accepted overcommit ratio.
pub const MAX_OVERCOMMIT: f64 = 1000.0;

impl Validate for OvercommitPolicy {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        for (key, ratio) in [
            ("resource.overcommit.memory", self.memory),
            ("resource.overcommit.cpu", self.cpu),
            ("resource.overcommit.disk_io", self.disk_io),
            ("resource.overcommit.network_io", self.network_io),
        ] {
            if !ratio.is_finite() || ratio <= 0.0 || ratio > MAX_OVERCOMMIT {
                issues.push(ConfigIssue::new(
                    key,
                    format!("must be a ratio above 0 and at most {MAX_OVERCOMMIT}, got {ratio}"),
                ));
            }
        }
    }
}

/// One rung of an escalation ladder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscalationAction {
    /// Log a warning and record it in the audit trail.
    Warn,
    /// Lower the overused limit (`throttle_factor` × the current limit; for memory: apply
    /// the allocated limit) through `Sandbox::update_limits`.
    Throttle,
    /// Freeze the agent (cgroup freezer / `docker pause` / VM stop) and mark it Suspended.
    /// The agent is held: unless it is resumed, the next step follows after the grace.
    Suspend,
    /// Stop the agent gracefully (SIGTERM, then SIGKILL after `stop_grace`) and terminate
    /// it through the lifecycle controller.
    Stop,
    /// Kill everything in the sandbox at once and mark the agent Failed.
    Kill,
}

impl EscalationAction {
    /// The lower-case name used in configuration and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            EscalationAction::Warn => "warn",
            EscalationAction::Throttle => "throttle",
            EscalationAction::Suspend => "suspend",
            EscalationAction::Stop => "stop",
            EscalationAction::Kill => "kill",
        }
    }

    /// True for actions after which the agent is no longer monitored (stop, kill).
    pub fn is_final(&self) -> bool {
        matches!(self, EscalationAction::Stop | EscalationAction::Kill)
    }
}

impl fmt::Display for EscalationAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EscalationAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "warn" => Ok(EscalationAction::Warn),
            "throttle" => Ok(EscalationAction::Throttle),
            "suspend" => Ok(EscalationAction::Suspend),
            "stop" => Ok(EscalationAction::Stop),
            "kill" => Ok(EscalationAction::Kill),
            other => Err(format!(
                "unknown escalation action `{other}` (expected warn, throttle, suspend, stop or kill)"
            )),
        }
    }
}

/// One step of a ladder: an action, and how long the violation must persist after it
/// before the next step is taken (`None` = `escalation.default_grace`).
///
/// Written in TOML either as a bare action (`"warn"`) or as a table
/// (`{ action = "suspend", grace = "5m" }`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscalationStep {
    /// What to do.
    pub action: EscalationAction,
    /// Wait after this step before the next one.
    pub grace: Option<Duration>,
}

impl EscalationStep {
    /// A step with the default grace.
    pub const fn new(action: EscalationAction) -> Self {
        Self {
            action,
            grace: None,
        }
    }

    /// A step with its own grace.
    pub const fn with_grace(action: EscalationAction, grace: Duration) -> Self {
        Self {
            action,
            grace: Some(grace),
        }
    }
}

impl From<EscalationAction> for EscalationStep {
    fn from(action: EscalationAction) -> Self {
        Self::new(action)
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StepTable {
    action: EscalationAction,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    grace: Option<Duration>,
}

impl Serialize for EscalationStep {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.grace {
            None => self.action.serialize(serializer),
            Some(grace) => StepTable {
                action: self.action,
                grace: Some(grace),
            }
            .serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for EscalationStep {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StepVisitor;
        impl<'de> Visitor<'de> for StepVisitor {
            type Value = EscalationStep;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an action name (warn, throttle, suspend, stop, kill) or a table \
                     { action = \"...\", grace = \"30s\" }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse::<EscalationAction>()
                    .map(EscalationStep::new)
                    .map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let table = StepTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(EscalationStep {
                    action: table.action,
                    grace: table.grace,
                })
            }
        }
        deserializer.deserialize_any(StepVisitor)
    }
}

/// `[resource.escalation]`: how violations are detected and what is done about them.
///
/// Each kind of violation walks its own ladder one step at a time: the first step is taken
/// when the violation is detected, each later step when the violation still holds after the
/// previous step's grace. A ladder resets once the agent has been back within its limit for
/// `recovery_samples` consecutive samples. Every step is logged and recorded in the audit
/// trail (`ResourceViolation`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    /// Ladder for sustained overuse of CPU, memory, disk or network bandwidth (usage above
    /// limit × `overuse_tolerance` for `overuse_samples` consecutive samples), which happens
    /// when enforcement is off or a tier only counts a resource.
    pub overuse: Vec<EscalationStep>,
    /// Ladder for an agent running longer than its `execution_timeout`.
    pub execution_timeout: Vec<EscalationStep>,
    /// Ladder for an agent idle (no CPU progress above `idle_cpu_threshold`, no disk or
    /// network traffic, no recorded activity) for longer than its `idle_timeout`.
    pub idle: Vec<EscalationStep>,
    /// Consecutive samples above the limit before overuse counts as a violation.
    pub overuse_samples: u32,
    /// Consecutive samples within the limit before a violation's ladder resets.
    pub recovery_samples: u32,
    /// Usage may exceed a limit by this factor before it counts as overuse (measurement
    /// noise: CFS periods, sampling jitter).
    pub overuse_tolerance: f64,
    /// A throttle step multiplies the overused limit by this factor.
    pub throttle_factor: f64,
    /// CPU use (in cores) below which an agent counts as making no progress.
    pub idle_cpu_threshold: f64,
    /// Grace of steps that do not set their own: "0s" means the next sample.
    #[serde(with = "humantime_serde")]
    pub default_grace: Duration,
    /// How long a `stop` step waits between SIGTERM and SIGKILL.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        use EscalationAction::*;
        Self {
            overuse: vec![
                EscalationStep::new(Warn),
                EscalationStep::new(Throttle),
                EscalationStep::with_grace(Suspend, Duration::from_secs(300)),
                EscalationStep::new(Kill),
            ],
            execution_timeout: vec![EscalationStep::new(Kill)],
            idle: vec![EscalationStep::new(Stop)],
            overuse_samples: 3,
            recovery_samples: 3,
            overuse_tolerance: 1.1,
            throttle_factor: 0.5,
            idle_cpu_threshold: 0.01,
            default_grace: Duration::ZERO,
            stop_grace: Duration::from_secs(10),
        }
    }
}

impl Validate for EscalationConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.overuse_samples == 0 {
            issues.push(ConfigIssue::new(
                "resource.escalation.overuse_samples",
                "must be at least 1",
            ));
        }
        if self.recovery_samples == 0 {
            issues.push(ConfigIssue::new(
                "resource.escalation.recovery_samples",
                "must be at least 1",
            ));
        }
        if !self.overuse_tolerance.is_finite() || self.overuse_tolerance < 1.0 {
            issues.push(ConfigIssue::new(
                "resource.escalation.overuse_tolerance",
                format!("must be at least 1.0, got {}", self.overuse_tolerance),
            ));
        }
        if !self.throttle_factor.is_finite()
            || self.throttle_factor <= 0.0
            || self.throttle_factor >= 1.0
        {
            issues.push(ConfigIssue::new(
                "resource.escalation.throttle_factor",
                format!(
                    "must be between 0 and 1 (exclusive), got {}",
                    self.throttle_factor
                ),
            ));
        }
        if !self.idle_cpu_threshold.is_finite() || self.idle_cpu_threshold < 0.0 {
            issues.push(ConfigIssue::new(
                "resource.escalation.idle_cpu_threshold",
                format!(
                    "must be a number of cores >= 0, got {}",
                    self.idle_cpu_threshold
                ),
            ));
        }
        for (key, ladder) in [
            ("resource.escalation.overuse", &self.overuse),
            (
                "resource.escalation.execution_timeout",
                &self.execution_timeout,
            ),
            ("resource.escalation.idle", &self.idle),
        ] {
            if let Some(pos) = ladder.iter().position(|s| s.action.is_final()) {
                if pos + 1 < ladder.len() {
                    issues.push(ConfigIssue::new(
                        key,
                        format!(
                            "`{}` ends the agent, so it must be the last step (found at step {})",
                            ladder[pos].action,
                            pos + 1
                        ),
                    ));
                }
            }
        }
    }
}
