//! The seed's shared vocabulary: identifiers, agent configuration, limits, capabilities,
//! priorities and agent states.
//!
//! Everything here is plain data. Behaviour lives in the component modules
//! ([`crate::lifecycle`], [`crate::sandbox`], ...); this module only owns the types they share
//! and their validation.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random (v4) identifier.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// The identifier's UUID.
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    };
}

id_type!(
    /// Identifies one agent for its whole life, across restarts of the runtime.
    AgentId
);
id_type!(
    /// Identifies one scheduled task.
    TaskId
);
id_type!(
    /// Identifies one message on the communication bus.
    MessageId
);
id_type!(
    /// Identifies one audit event.
    AuditId
);

/// How an agent's program is run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ExecutionMode {
    /// One long-lived sandbox; tasks and messages reach it over its I/O channel.
    #[default]
    Persistent,
    /// A fresh sandbox for every task, destroyed afterwards.
    Ephemeral,
    /// Runs on a cron schedule (`"0 */5 * * * *"`: seconds, minutes, hours, day, month,
    /// weekday; a five-field expression without seconds is accepted too).
    Scheduled {
        /// The cron expression.
        schedule: String,
    },
    /// Runs when a message arrives on one of its topics.
    EventDriven,
}

/// The isolation tier an agent's program runs in.
///
/// `Native` (the default) needs no daemon: Linux namespaces, cgroups, seccomp and Landlock
/// applied by the runtime itself. The numbered tiers are the seed's.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub enum SecurityTier {
    /// Native Linux sandbox built by the runtime (namespaces, cgroups, seccomp, Landlock).
    #[default]
    Native,
    /// Docker containers through the Docker Engine API.
    Tier1,
    /// gVisor (`runsc`): a user-space kernel between the agent and the host.
    Tier2,
    /// A microVM per agent (QEMU `microvm`, or Firecracker when installed).
    Tier3,
}

impl SecurityTier {
    /// All tiers, weakest isolation first.
    pub const ALL: [SecurityTier; 4] = [
        SecurityTier::Native,
        SecurityTier::Tier1,
        SecurityTier::Tier2,
        SecurityTier::Tier3,
    ];

    /// A short lower-case name (`native`, `docker`, `gvisor`, `microvm`).
    pub fn name(&self) -> &'static str {
        match self {
            SecurityTier::Native => "native",
            SecurityTier::Tier1 => "docker",
            SecurityTier::Tier2 => "gvisor",
            SecurityTier::Tier3 => "microvm",
        }
    }
}

impl fmt::Display for SecurityTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an agent is allowed to do beyond computing on its own workspace.
///
/// Capabilities not granted are denied: without `Network` the sandbox has no route anywhere,
/// without `FileSystem` nothing outside the private workspace is writable.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Capability {
    /// Write access to the file system outside `/workspace` (a writable root or the
    /// paths the agent's policy names).
    FileSystem,
    /// Network access (the sandbox gets an interface and a route to the host).
    Network,
    /// Sending and receiving messages on the communication bus.
    Messaging,
    /// A named capability checked by policies and integrations.
    Custom(String),
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capability::FileSystem => f.write_str("filesystem"),
            Capability::Network => f.write_str("network"),
            Capability::Messaging => f.write_str("messaging"),
            Capability::Custom(name) => write!(f, "custom:{name}"),
        }
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "filesystem" | "fs" => Ok(Capability::FileSystem),
            "network" | "net" => Ok(Capability::Network),
            "messaging" => Ok(Capability::Messaging),
            other => match other.strip_prefix("custom:") {
                Some(name) if !name.is_empty() => Ok(Capability::Custom(name.to_string())),
                _ => Err(format!(
                    "unknown capability `{s}` (expected filesystem, network, messaging or custom:<name>)"
                )),
            },
        }
    }
}

/// Scheduling and message priority. Ordered: `Low < Normal < High < Critical`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub enum Priority {
    /// Background work.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Ahead of normal work.
    High,
    /// Ahead of everything else.
    Critical,
}

impl Priority {
    /// All priorities, lowest first.
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];
}

/// The resources one agent may use. The kernel (or the tier) enforces each of them when
/// resource enforcement is on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceLimits {
    /// Memory ceiling in MiB (cgroup memory limit, container memory, VM RAM).
    pub memory_mb: u64,
    /// CPU share in cores (0.5 = half a core).
    pub cpu_cores: f64,
    /// Disk I/O ceiling in MB/s for reads and writes each; 0 = unlimited.
    pub disk_io_mbps: u64,
    /// Network bandwidth ceiling in Mb/s for each direction; 0 = unlimited.
    pub network_io_mbps: u64,
    /// Longest an execution may run before it is killed.
    #[serde(with = "humantime_serde")]
    pub execution_timeout: Duration,
    /// Longest an agent may sit idle before it is stopped.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            memory_mb: 512,
            cpu_cores: 1.0,
            disk_io_mbps: 50,
            network_io_mbps: 10,
            execution_timeout: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl ResourceLimits {
    /// The memory limit in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb.saturating_mul(1024 * 1024)
    }

    /// Checks that every limit is possible; returns the offending field and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.memory_mb == 0 {
            return Err(("memory_mb", "must be at least 1 MiB".into()));
        }
        if !self.cpu_cores.is_finite() || self.cpu_cores <= 0.0 {
            return Err((
                "cpu_cores",
                format!("must be a positive number, got {}", self.cpu_cores),
            ));
        }
        if self.cpu_cores > 4096.0 {
            return Err((
                "cpu_cores",
                format!("{} cores is not possible", self.cpu_cores),
            ));
        }
        if self.execution_timeout.is_zero() {
            return Err(("execution_timeout", "must be longer than 0s".into()));
        }
        if self.idle_timeout.is_zero() {
            return Err(("idle_timeout", "must be longer than 0s".into()));
        }
        Ok(())
    }
}

/// Everything needed to create an agent. The field set is the seed's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's identity.
    #[serde(default)]
    pub id: AgentId,
    /// A human-readable name; unique names are not required but recommended.
    pub name: String,
    /// The agent definition (see `docs/dsl.md`): what it runs and what it may do.
    #[serde(default)]
    pub dsl_source: String,
    /// How its program is run.
    #[serde(default)]
    pub execution_mode: ExecutionMode,
    /// The isolation tier.
    #[serde(default)]
    pub security_tier: SecurityTier,
    /// Its resource limits.
    #[serde(default)]
    pub resource_limits: ResourceLimits,
    /// What it may do beyond computing on its own workspace.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Extra policy statements, in the policy syntax of `docs/dsl.md`
    /// (for example `"deny network"`), added to those of the definition.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Free-form labels.
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    /// Default priority of its tasks and messages.
    #[serde(default)]
    pub priority: Priority,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            id: AgentId::new(),
            name: "agent".to_string(),
            dsl_source: String::new(),
            execution_mode: ExecutionMode::default(),
            security_tier: SecurityTier::default(),
            resource_limits: ResourceLimits::default(),
            capabilities: Vec::new(),
            policies: Vec::new(),
            metadata: HashMap::new(),
            priority: Priority::default(),
        }
    }
}

impl AgentConfig {
    /// True when the agent holds `cap`.
    pub fn has_capability(&self, cap: &Capability) -> bool {
        self.capabilities.contains(cap)
    }
}

/// The states of an agent's life. See [`crate::lifecycle::transition_allowed`] for the
/// transition table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AgentState {
    /// Registered, nothing started yet.
    Created,
    /// Its sandbox and resources are being prepared.
    Initializing,
    /// Prepared and idle, ready to run.
    Ready,
    /// Its program is running.
    Running,
    /// Frozen by an operator or by resource escalation.
    Suspended,
    /// Blocked on an external event (a message, a schedule, a resource).
    Waiting,
    /// Stopped by an error; may be restarted by recovery.
    Failed,
    /// Being shut down.
    Terminating,
    /// Gone; its resources are released. Final.
    Terminated,
}

impl AgentState {
    /// All states in the order of a normal life.
    pub const ALL: [AgentState; 9] = [
        AgentState::Created,
        AgentState::Initializing,
        AgentState::Ready,
        AgentState::Running,
        AgentState::Suspended,
        AgentState::Waiting,
        AgentState::Failed,
        AgentState::Terminating,
        AgentState::Terminated,
    ];

    /// True for `Terminated`, from which nothing leaves.
    pub fn is_final(&self) -> bool {
        matches!(self, AgentState::Terminated)
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One agent as the runtime holds it: its configuration and where it is in its life.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInstance {
    /// The agent's identity (equal to `config.id`).
    pub id: AgentId,
    /// Its configuration.
    pub config: AgentConfig,
    /// Its current state.
    pub state: AgentState,
    /// When it was created.
    pub created_at: SystemTime,
    /// When its state last changed.
    pub state_changed_at: SystemTime,
    /// How many times recovery has restarted it.
    pub restart_count: u32,
    /// Why it last failed, if it did.
    pub failure_reason: Option<String>,
}

impl AgentInstance {
    /// A new agent in state `Created`.
    pub fn new(config: AgentConfig) -> Self {
        let now = SystemTime::now();
        Self {
            id: config.id,
            config,
            state: AgentState::Created,
            created_at: now,
            state_changed_at: now,
            restart_count: 0,
            failure_reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_orders_low_to_critical() {
        assert!(Priority::Low < Priority::Normal);
        assert!(Priority::Normal < Priority::High);
        assert!(Priority::High < Priority::Critical);
    }

    #[test]
    fn ids_are_unique_and_round_trip_through_strings() {
        let a = AgentId::new();
        let b = AgentId::new();
        assert_ne!(a, b);
        let parsed: AgentId = a.to_string().parse().expect("parses");
        assert_eq!(a, parsed);
        assert!("not-a-uuid".parse::<AgentId>().is_err());
    }

    #[test]
    fn new_instance_starts_created_with_config_id() {
        let config = AgentConfig::default();
        let id = config.id;
        let agent = AgentInstance::new(config);
        assert_eq!(agent.id, id);
        assert_eq!(agent.state, AgentState::Created);
    }

    #[test]
    fn limits_validation_names_the_field() {
        let mut l = ResourceLimits {
            memory_mb: 0,
            ..Default::default()
        };
        assert_eq!(l.validate().map_err(|e| e.0), Err("memory_mb"));
        l.memory_mb = 1;
        l.cpu_cores = f64::NAN;
        assert_eq!(l.validate().map_err(|e| e.0), Err("cpu_cores"));
        l.cpu_cores = 0.5;
        assert!(l.validate().is_ok());
    }

    #[test]
    fn capability_parses_names_and_rejects_unknown() {
        assert_eq!("Network".parse::<Capability>(), Ok(Capability::Network));
        assert_eq!(
            "custom:gpu".parse::<Capability>(),
            Ok(Capability::Custom("gpu".into()))
        );
        assert!("teleport".parse::<Capability>().is_err());
    }

    #[test]
    fn agent_config_json_round_trip() {
        let config = AgentConfig {
            execution_mode: ExecutionMode::Scheduled {
                schedule: "0 * * * * *".into(),
            },
            capabilities: vec![Capability::Network, Capability::Custom("x".into())],
            ..Default::default()
        };
        let json = serde_json::to_string(&config).expect("serializes");
        let back: AgentConfig = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(config, back);
    }
}
