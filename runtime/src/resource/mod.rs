//! Resource manager: admission of agents' [`ResourceLimits`] against the host's capacity,
//! the check that the agent's tier can enforce them, and live monitoring of real usage with
//! an escalation ladder (warn → throttle → suspend → stop/kill).
//!
//! The kernel enforcement itself happens inside each sandbox tier (`SandboxSpec::limits`,
//! `Sandbox::update_limits`); this module decides, checks, samples and escalates.
//!
//! - **Admission** ([`DefaultResourceManager::allocate_resources`]): memory, CPU, disk and
//!   network capacity (configured totals, or the machine's, × the [`OvercommitPolicy`]) are
//!   reserved atomically; a request that does not fit is refused with RESOURCE_001 naming
//!   every short resource (`memory: requested 512 MiB, available 300 MiB of 8192 MiB`).
//! - **Enforceability** ([`DefaultResourceManager::allocate_for_tier`],
//!   [`DefaultResourceManager::admit`]): with enforcement on, a limit the tier cannot enforce
//!   is refused with RESOURCE_002, never silently ignored.
//! - **Monitoring**: every `monitoring_interval` each registered agent's usage is sampled
//!   (from its sandbox's `stats()` or any [`UsageSource`]) into a [`ResourceUsage`];
//!   violations walk the configured ladders, act through [`EnforcementActions`] and are
//!   recorded in the audit trail.
//!
//! # Example (the seed's)
//! ```
//! # use std::time::Duration;
//! # use symbiont_runtime::{AgentId, ResourceLimits};
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let agent_id = AgentId::new();
//! # let limits = ResourceLimits::default();
//! use symbiont_runtime::resource::*;
//!
//! let config = ResourceManagerConfig {
//!     total_memory: 8192 * 1024 * 1024, // 8GB
//!     total_cpu_cores: 8,
//!     enforcement_enabled: true,
//!     monitoring_interval: Duration::from_secs(30),
//!     // ... other config
//! #   ..Default::default()
//! };
//!
//! let resource_manager = DefaultResourceManager::new(config).await?;
//!
//! // Allocate resources
//! let allocation = resource_manager.allocate_resources(agent_id, limits).await?;
//! # assert_eq!(allocation.agent_id, agent_id);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use thiserror::Error;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Validate;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType, AuditSink};
use crate::lifecycle::DefaultLifecycleController;
use crate::sandbox::{EnforcementSupport, Sandbox, SandboxBackend};
use crate::types::{AgentId, AgentState, ResourceLimits, SecurityTier};

mod actions;
mod cgroup_stats;
mod config;
mod host;
mod ledger;
mod monitor;

pub use actions::{EnforcementActions, LifecycleEnforcement, SandboxDirectory};
pub use cgroup_stats::{
    parse_blkio_v1, parse_io_stat_v2, parse_keyed, read_interface_counters, CgroupLayout,
    CgroupStatsReader, CgroupUsageSource, InterfaceSide, CGROUP_ROOT,
};
pub use config::{
    EscalationAction, EscalationConfig, EscalationStep, OvercommitPolicy, ResourceManagerConfig,
    MAX_OVERCOMMIT,
};
pub use host::{own_cgroup_memory_limit, parse_meminfo_total, FixedHost, HostProbe, SystemHost};
pub use ledger::{
    unenforceable_limits, Capacity, CapacitySnapshot, HostTotals, ResourceAllocation,
    ResourceAmounts,
};
pub use monitor::{ActionRecord, ResourceUsage, UsageSource, ViolationKind, ViolationStatus};

use ledger::{Allocated, Ledger};
use monitor::{AgentMonitor, Monitored, PlannedAction};

/// Errors of the resource manager.
#[derive(Debug, Error)]
pub enum ResourceError {
    /// Not enough capacity left for the request; names every resource that was short.
    #[error("insufficient resources: {0}")]
    Insufficient(String),
    /// The agent's tier cannot enforce some of the requested limits (same code as
    /// `SandboxError::LimitUnsupported`).
    #[error(
        "{tier} sandbox cannot enforce {}; set disk/network limits to 0 (unlimited), choose a \
         tier that enforces them, or turn enforcement off (SYMBIONT_RESOURCE_ENFORCEMENT=false)",
        .limits.join(", ")
    )]
    Unenforceable {
        /// The tier.
        tier: SecurityTier,
        /// The limits it cannot enforce.
        limits: Vec<String>,
    },
    /// An agent exceeded a limit and was acted upon.
    #[error("agent {agent} exceeded its limits: {detail}")]
    LimitExceeded {
        /// The agent.
        agent: AgentId,
        /// What was exceeded.
        detail: String,
    },
    /// The requested limits are impossible.
    #[error("invalid resource limits: {0}")]
    InvalidLimits(String),
    /// The agent already holds an allocation with different limits.
    #[error(
        "agent {agent} already holds an allocation with different limits ({existing:?}); \
         deallocate it first or use update_allocation"
    )]
    AlreadyAllocated {
        /// The agent.
        agent: AgentId,
        /// The limits it holds.
        existing: Box<ResourceLimits>,
    },
    /// The agent holds no allocation.
    #[error("agent {0} holds no resource allocation")]
    NotAllocated(AgentId),
    /// An escalation step could not be carried out.
    #[error("{action} of agent {agent} failed: {message}")]
    Action {
        /// The agent.
        agent: AgentId,
        /// The step (`throttle`, `suspend`, `stop`, `kill`).
        action: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Reading an agent's usage failed.
    #[error("usage sample failed: {0}")]
    Usage(String),
    /// The manager's configuration is unusable, or the machine's totals cannot be detected.
    #[error("invalid resource configuration: {0}")]
    InvalidConfig(String),
}

impl ResourceError {
    /// Stable code: RESOURCE_001 insufficient, RESOURCE_002 limit not enforceable by the
    /// tier, RESOURCE_003 limit exceeded, RESOURCE_004 invalid limits, RESOURCE_005 already
    /// allocated with other limits, RESOURCE_006 no allocation, RESOURCE_007 enforcement
    /// action failed, RESOURCE_008 usage sample failed, CONFIG_001 invalid configuration.
    pub fn code(&self) -> &'static str {
        match self {
            ResourceError::Insufficient(_) => "RESOURCE_001",
            ResourceError::Unenforceable { .. } => "RESOURCE_002",
            ResourceError::LimitExceeded { .. } => "RESOURCE_003",
            ResourceError::InvalidLimits(_) => "RESOURCE_004",
            ResourceError::AlreadyAllocated { .. } => "RESOURCE_005",
            ResourceError::NotAllocated(_) => "RESOURCE_006",
            ResourceError::Action { .. } => "RESOURCE_007",
            ResourceError::Usage(_) => "RESOURCE_008",
            ResourceError::InvalidConfig(_) => "CONFIG_001",
        }
    }
}

/// What one monitoring round did.
#[derive(Debug, Default)]
pub struct MonitoringRound {
    /// Agents sampled.
    pub sampled: usize,
    /// Samples that failed or timed out.
    pub errors: usize,
    /// Escalation steps started (they run in their own tasks).
    pub actions: Vec<JoinHandle<ActionRecord>>,
}

impl MonitoringRound {
    /// Waits for the steps this round started and returns how they ended.
    pub async fn settle(self) -> Vec<ActionRecord> {
        let mut out = Vec::with_capacity(self.actions.len());
        for handle in self.actions {
            match handle.await {
                Ok(record) => out.push(record),
                Err(e) => tracing::error!(error = %e, "escalation step task failed"),
            }
        }
        out
    }
}

struct Inner {
    config: ResourceManagerConfig,
    host: HostTotals,
    ledger: Mutex<Ledger>,
    monitored: RwLock<HashMap<AgentId, Arc<Monitored>>>,
    sandboxes: SandboxDirectory,
    actions: RwLock<Option<Arc<dyn EnforcementActions>>>,
    audit: Option<AuditSink>,
}

/// The resource manager. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct DefaultResourceManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DefaultResourceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultResourceManager")
            .field("host", &self.inner.host)
            .field("agents", &self.inner.ledger.lock().snapshot().agents)
            .field("monitored", &self.inner.monitored.read().len())
            .finish()
    }
}

/// Builds a [`DefaultResourceManager`] with its optional parts.
pub struct ResourceManagerBuilder {
    config: ResourceManagerConfig,
    host: Arc<dyn HostProbe>,
    audit: Option<AuditSink>,
    actions: Option<Arc<dyn EnforcementActions>>,
    sandboxes: SandboxDirectory,
    spawn_monitor: bool,
}

impl ResourceManagerBuilder {
    /// Where totals left at 0 are detected (default: [`SystemHost`]).
    pub fn host(mut self, host: Arc<dyn HostProbe>) -> Self {
        self.host = host;
        self
    }

    /// The audit trail allocations and violations are recorded in.
    pub fn audit(mut self, audit: AuditSink) -> Self {
        self.audit = Some(audit);
        self
    }

    /// What escalation steps act through.
    pub fn actions(mut self, actions: Arc<dyn EnforcementActions>) -> Self {
        self.actions = Some(actions);
        self
    }

    /// The sandbox directory to fill from [`DefaultResourceManager::register_sandbox`]
    /// (share it with [`LifecycleEnforcement`]).
    pub fn sandboxes(mut self, sandboxes: SandboxDirectory) -> Self {
        self.sandboxes = sandboxes;
        self
    }

    /// Whether to start the background monitoring loop (default: yes). Without it, rounds
    /// run only through [`DefaultResourceManager::run_monitoring_round`].
    pub fn monitoring_loop(mut self, enabled: bool) -> Self {
        self.spawn_monitor = enabled;
        self
    }

    /// Validates the configuration, detects missing totals and starts monitoring.
    pub async fn build(self) -> Result<DefaultResourceManager, ResourceError> {
        let mut issues = Vec::new();
        self.config.validate(&mut issues);
        if !issues.is_empty() {
            return Err(ResourceError::InvalidConfig(
                issues
                    .iter()
                    .map(|i| format!("{}: {}", i.key, i.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        let cfg = &self.config;
        let memory_bytes = if cfg.total_memory > 0 {
            cfg.total_memory
        } else {
            self.host.memory_bytes().map_err(|e| {
                ResourceError::InvalidConfig(format!(
                    "cannot detect the machine's memory ({e}); set resource.total_memory"
                ))
            })?
        };
        let cpu_cores = if cfg.total_cpu_cores > 0 {
            cfg.total_cpu_cores
        } else {
            self.host.cpu_cores().map_err(|e| {
                ResourceError::InvalidConfig(format!(
                    "cannot detect the machine's CPU cores ({e}); set resource.total_cpu_cores"
                ))
            })?
        };
        let host = HostTotals {
            memory_bytes,
            cpu_cores,
            disk_io_mbps: cfg.total_disk_io_mbps,
            network_io_mbps: cfg.total_network_io_mbps,
        };
        let ledger = Ledger::new(host, cfg.overcommit.clone());
        let capacity = ledger.snapshot().capacity;
        tracing::info!(
            memory_mib = memory_bytes / (1024 * 1024),
            cpu_cores,
            disk_io_mbps = cfg.total_disk_io_mbps,
            network_io_mbps = cfg.total_network_io_mbps,
            capacity_cpu_millicores = capacity.cpu_millicores,
            capacity_memory_mib = capacity.memory_bytes / (1024 * 1024),
            "resource manager capacity"
        );
        if !cfg.enforcement_enabled {
            tracing::warn!(
                "resource enforcement is OFF (resource.enforcement_enabled = false or \
                 SYMBIONT_RESOURCE_ENFORCEMENT): limits a tier cannot enforce are admitted \
                 anyway; capacity is still accounted and usage still monitored and escalated"
            );
        }
        if self.actions.is_none() {
            let acting = [
                &cfg.escalation.overuse,
                &cfg.escalation.execution_timeout,
                &cfg.escalation.idle,
            ]
            .iter()
            .any(|l| l.iter().any(|s| s.action != EscalationAction::Warn));
            if acting {
                tracing::warn!(
                    "no enforcement actions are configured yet: escalation steps other than \
                     `warn` fail until DefaultResourceManager::set_enforcement_actions is called"
                );
            }
        }
        let inner = Arc::new(Inner {
            config: self.config,
            host,
            ledger: Mutex::new(ledger),
            monitored: RwLock::new(HashMap::new()),
            sandboxes: self.sandboxes,
            actions: RwLock::new(self.actions),
            audit: self.audit,
        });
        if self.spawn_monitor {
            spawn_monitor_loop(&inner);
        }
        Ok(DefaultResourceManager { inner })
    }
}

fn spawn_monitor_loop(inner: &Arc<Inner>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            "not inside a Tokio runtime: the resource monitoring loop is not running; \
             call run_monitoring_round yourself"
        );
        return;
    };
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let interval = inner.config.monitoring_interval;
    handle.spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let Some(inner) = weak.upgrade() else { break };
            let _ = run_round(&inner).await;
        }
    });
}

impl DefaultResourceManager {
    /// A manager with the machine's totals where the configuration says 0, no audit trail
    /// and no enforcement actions yet (see [`Self::builder`] and
    /// [`Self::set_enforcement_actions`]). Starts the monitoring loop on the current Tokio
    /// runtime; it ends when the last handle is dropped.
    pub async fn new(config: ResourceManagerConfig) -> Result<Self, ResourceError> {
        Self::builder(config).build().await
    }

    /// A builder for the optional parts (host probe, audit trail, actions, sandboxes).
    pub fn builder(config: ResourceManagerConfig) -> ResourceManagerBuilder {
        ResourceManagerBuilder {
            config,
            host: Arc::new(SystemHost),
            audit: None,
            actions: None,
            sandboxes: SandboxDirectory::new(),
            spawn_monitor: true,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ResourceManagerConfig {
        &self.inner.config
    }

    /// The totals capacity is derived from.
    pub fn host_totals(&self) -> HostTotals {
        self.inner.host
    }

    /// True when limits a tier cannot enforce are refused.
    pub fn enforcement_enabled(&self) -> bool {
        self.inner.config.enforcement_enabled
    }

    /// Sets (or replaces) what escalation steps act through.
    pub fn set_enforcement_actions(&self, actions: Arc<dyn EnforcementActions>) {
        *self.inner.actions.write() = Some(actions);
    }

    /// The directory of agents' sandboxes filled by [`Self::register_sandbox`].
    pub fn sandbox_directory(&self) -> SandboxDirectory {
        self.inner.sandboxes.clone()
    }

    // ---- admission ------------------------------------------------------------------

    /// Reserves `limits` for `agent_id` without a tier check (the seed's call). Refuses
    /// impossible limits (RESOURCE_004) and requests that do not fit (RESOURCE_001, naming
    /// what was short). Allocating again with the same limits returns the existing
    /// allocation; with different limits it is RESOURCE_005 (see
    /// [`Self::update_allocation`]).
    pub async fn allocate_resources(
        &self,
        agent_id: AgentId,
        limits: ResourceLimits,
    ) -> Result<ResourceAllocation, ResourceError> {
        self.allocate_inner(agent_id, &limits, None, false)
    }

    /// Like [`Self::allocate_resources`], first checking (when enforcement is on) that
    /// `tier`, with `support`, can enforce every limit (RESOURCE_002 otherwise).
    pub async fn allocate_for_tier(
        &self,
        agent_id: AgentId,
        limits: ResourceLimits,
        tier: SecurityTier,
        support: EnforcementSupport,
    ) -> Result<ResourceAllocation, ResourceError> {
        if let Err((field, why)) = limits.validate() {
            return Err(ResourceError::InvalidLimits(format!("{field}: {why}")));
        }
        let checked = self.inner.config.enforcement_enabled;
        if checked {
            if let Err(e) = self.check_enforceable(&limits, tier, &support) {
                self.refused(agent_id, &e);
                return Err(e);
            }
        }
        self.allocate_inner(agent_id, &limits, Some(tier), checked)
    }

    /// [`Self::allocate_for_tier`] with the tier and support of `backend`.
    pub async fn admit(
        &self,
        agent_id: AgentId,
        limits: ResourceLimits,
        backend: &dyn SandboxBackend,
    ) -> Result<ResourceAllocation, ResourceError> {
        self.allocate_for_tier(agent_id, limits, backend.tier(), backend.enforcement())
            .await
    }

    /// RESOURCE_002 naming every limit of `limits` that `tier` cannot enforce. Disk and
    /// network limits of 0 are unlimited and need no enforcement.
    pub fn check_enforceable(
        &self,
        limits: &ResourceLimits,
        tier: SecurityTier,
        support: &EnforcementSupport,
    ) -> Result<(), ResourceError> {
        let missing = unenforceable_limits(limits, support);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ResourceError::Unenforceable {
                tier,
                limits: missing,
            })
        }
    }

    fn allocate_inner(
        &self,
        agent_id: AgentId,
        limits: &ResourceLimits,
        tier: Option<SecurityTier>,
        checked: bool,
    ) -> Result<ResourceAllocation, ResourceError> {
        if let Err((field, why)) = limits.validate() {
            return Err(ResourceError::InvalidLimits(format!("{field}: {why}")));
        }
        let outcome = self
            .inner
            .ledger
            .lock()
            .allocate(agent_id, limits, tier, checked);
        match outcome {
            Ok(Allocated::New(allocation)) => {
                if let Some(audit) = &self.inner.audit {
                    audit.submit(
                        AuditEvent::new(
                            AuditEventType::ResourceAllocated,
                            Some(agent_id),
                            format!(
                                "allocated {} MiB, {} cores, {} MB/s disk, {} Mb/s network",
                                limits.memory_mb,
                                limits.cpu_cores,
                                limits.disk_io_mbps,
                                limits.network_io_mbps
                            ),
                        )
                        .with("memory_mb", limits.memory_mb.to_string())
                        .with("cpu_cores", limits.cpu_cores.to_string())
                        .with("disk_io_mbps", limits.disk_io_mbps.to_string())
                        .with("network_io_mbps", limits.network_io_mbps.to_string()),
                    );
                }
                Ok(allocation)
            }
            Ok(Allocated::Existing(allocation)) => Ok(allocation),
            Err(e) => {
                self.refused(agent_id, &e);
                Err(e)
            }
        }
    }

    #[cold]
    fn refused(&self, agent_id: AgentId, e: &ResourceError) {
        tracing::info!(%agent_id, code = e.code(), error = %e, "allocation refused");
        if let Some(audit) = &self.inner.audit {
            audit.submit(
                AuditEvent::new(
                    AuditEventType::ResourceViolation,
                    Some(agent_id),
                    format!("allocation refused: {e}"),
                )
                .with("code", e.code())
                .with("action", "refuse"),
            );
        }
    }

    /// Replaces an agent's limits atomically: either they fit (counting its old limits as
    /// given back) or nothing changes (RESOURCE_001). The monitor uses the new limits.
    pub async fn update_allocation(
        &self,
        agent_id: AgentId,
        limits: ResourceLimits,
    ) -> Result<ResourceAllocation, ResourceError> {
        if let Err((field, why)) = limits.validate() {
            return Err(ResourceError::InvalidLimits(format!("{field}: {why}")));
        }
        let allocation = self.inner.ledger.lock().resize(agent_id, &limits)?;
        if let Some(m) = self.inner.monitored.read().get(&agent_id) {
            m.state.lock().set_limits(limits.clone());
        }
        if let Some(audit) = &self.inner.audit {
            audit.submit(
                AuditEvent::new(
                    AuditEventType::ResourceAllocated,
                    Some(agent_id),
                    format!("allocation changed to {limits:?}"),
                )
                .with("memory_mb", limits.memory_mb.to_string())
                .with("cpu_cores", limits.cpu_cores.to_string()),
            );
        }
        Ok(allocation)
    }

    /// Gives the agent's resources back and stops monitoring it. RESOURCE_006 when it holds
    /// nothing.
    pub async fn deallocate_resources(
        &self,
        agent_id: AgentId,
    ) -> Result<ResourceAllocation, ResourceError> {
        let allocation = self
            .inner
            .ledger
            .lock()
            .release(agent_id)
            .ok_or(ResourceError::NotAllocated(agent_id))?;
        self.unregister(agent_id);
        if let Some(audit) = &self.inner.audit {
            audit.submit(AuditEvent::new(
                AuditEventType::ResourceDeallocated,
                Some(agent_id),
                format!(
                    "released {} MiB, {} cores",
                    allocation.limits.memory_mb, allocation.limits.cpu_cores
                ),
            ));
        }
        Ok(allocation)
    }

    /// The agent's allocation.
    pub fn allocation(&self, agent_id: AgentId) -> Option<ResourceAllocation> {
        self.inner.ledger.lock().get(&agent_id).cloned()
    }

    /// Every allocation.
    pub fn allocations(&self) -> Vec<ResourceAllocation> {
        self.inner.ledger.lock().allocations().cloned().collect()
    }

    /// Capacity, use and what is free.
    pub fn capacity(&self) -> CapacitySnapshot {
        self.inner.ledger.lock().snapshot()
    }

    // ---- monitoring -----------------------------------------------------------------

    /// Monitors `agent_id` through its sandbox (usage from `stats()`) and records the
    /// sandbox in the directory escalation acts on. The agent must hold an allocation
    /// (RESOURCE_006); its execution clock starts now. Registering again replaces the
    /// sandbox and restarts monitoring.
    pub fn register_sandbox(
        &self,
        agent_id: AgentId,
        sandbox: Arc<dyn Sandbox>,
    ) -> Result<(), ResourceError> {
        let source: Arc<dyn UsageSource> = Arc::new(sandbox.clone());
        self.register_usage_source(agent_id, source)?;
        self.inner.sandboxes.insert(agent_id, sandbox);
        Ok(())
    }

    /// Monitors `agent_id` through any usage source. The agent must hold an allocation
    /// (RESOURCE_006); its execution clock starts now.
    pub fn register_usage_source(
        &self,
        agent_id: AgentId,
        source: Arc<dyn UsageSource>,
    ) -> Result<(), ResourceError> {
        let limits = self
            .inner
            .ledger
            .lock()
            .get(&agent_id)
            .map(|a| a.limits.clone())
            .ok_or(ResourceError::NotAllocated(agent_id))?;
        let monitored = Arc::new(Monitored {
            agent_id,
            source,
            state: Mutex::new(AgentMonitor::new(agent_id, limits, Instant::now())),
        });
        self.inner.monitored.write().insert(agent_id, monitored);
        Ok(())
    }

    /// Stops monitoring the agent and forgets its sandbox (the allocation stays). Returns
    /// whether it was monitored.
    pub fn unregister(&self, agent_id: AgentId) -> bool {
        let was = self.inner.monitored.write().remove(&agent_id).is_some();
        self.inner.sandboxes.remove(agent_id);
        was
    }

    /// Notes that the agent made progress now (a task dispatched, a message delivered), so
    /// it does not count as idle.
    pub fn record_activity(&self, agent_id: AgentId) {
        if let Some(m) = self.inner.monitored.read().get(&agent_id) {
            m.state.lock().record_activity(Instant::now());
        }
    }

    /// Restarts the agent's execution clock (a new execution began).
    pub fn restart_execution_clock(&self, agent_id: AgentId) {
        if let Some(m) = self.inner.monitored.read().get(&agent_id) {
            m.state.lock().restart_execution_clock(Instant::now());
        }
    }

    /// Forgets the agent's violations and releases a suspend hold (call it when an
    /// operator resumes the agent). Throttled limits stay in force.
    pub fn clear_violations(&self, agent_id: AgentId) {
        if let Some(m) = self.inner.monitored.read().get(&agent_id) {
            m.state.lock().clear_violations(Instant::now());
        }
    }

    /// Keeps monitoring in step with `controller`'s state changes (runs until the
    /// controller or this manager is dropped):
    /// - Suspended: the agent is not counted as idle while frozen;
    /// - Suspended → Ready/Running/Waiting (a resume): violations are forgotten and a
    ///   suspend hold is released, as [`Self::clear_violations`] does;
    /// - Failed or Terminated: monitoring stops (a restart registers the new sandbox).
    pub fn follow_lifecycle(&self, controller: &DefaultLifecycleController) -> JoinHandle<()> {
        let mut events = controller.subscribe();
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "resource monitor missed lifecycle events");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let Some(inner) = weak.upgrade() else { break };
                let manager = DefaultResourceManager { inner };
                let id = event.agent_id;
                match event.to {
                    AgentState::Failed | AgentState::Terminated => {
                        manager.unregister(id);
                    }
                    to => {
                        let suspended = to == AgentState::Suspended;
                        if let Some(m) = manager.inner.monitored.read().get(&id) {
                            m.state.lock().set_suspended(suspended, Instant::now());
                        }
                    }
                }
            }
        })
    }

    /// The agent's latest usage.
    pub fn usage(&self, agent_id: AgentId) -> Option<ResourceUsage> {
        self.inner
            .monitored
            .read()
            .get(&agent_id)
            .map(|m| m.state.lock().usage())
    }

    /// Every monitored agent's latest usage.
    pub fn all_usage(&self) -> Vec<ResourceUsage> {
        let monitored: Vec<Arc<Monitored>> =
            self.inner.monitored.read().values().cloned().collect();
        monitored.iter().map(|m| m.state.lock().usage()).collect()
    }

    /// How much of its own limits the agent uses (the highest of CPU and memory use over
    /// their limits: 0.0 idle, 1.0 at a limit), from the last sample. For load balancing.
    pub fn load(&self, agent_id: AgentId) -> Option<f64> {
        self.inner
            .monitored
            .read()
            .get(&agent_id)
            .map(|m| m.state.lock().load())
    }

    /// `1 - load`, clamped to 0..=1: how much room the agent has left under its limits.
    pub fn headroom(&self, agent_id: AgentId) -> Option<f64> {
        self.load(agent_id).map(|l| (1.0 - l).clamp(0.0, 1.0))
    }

    /// The share of admission capacity still free (the lower of CPU and memory), 0..=1.
    pub fn host_headroom(&self) -> f64 {
        let s = self.capacity();
        let frac = |free: u64, cap: u64| {
            if cap == 0 {
                0.0
            } else {
                free as f64 / cap as f64
            }
        };
        frac(s.free.cpu_millicores, s.capacity.cpu_millicores)
            .min(frac(s.free.memory_bytes, s.capacity.memory_bytes))
    }

    /// Samples every monitored agent once now and starts the escalation steps due (the
    /// background loop does this every `monitoring_interval`).
    pub async fn run_monitoring_round(&self) -> MonitoringRound {
        run_round(&self.inner).await
    }
}

async fn run_round(inner: &Arc<Inner>) -> MonitoringRound {
    let agents: Vec<Arc<Monitored>> = inner.monitored.read().values().cloned().collect();
    let timeout = inner.config.sample_timeout;
    let mut samples = futures::stream::iter(agents.into_iter().map(|m| async move {
        let result = match tokio::time::timeout(timeout, m.source.sample()).await {
            Ok(Ok(stats)) => Ok(stats),
            Ok(Err(e)) => Err(format!("{e} ({})", e.code())),
            Err(_) => Err(format!(
                "usage sample timed out after {}",
                humantime::format_duration(timeout)
            )),
        };
        (m, result)
    }))
    .buffer_unordered(inner.config.sample_concurrency);

    let mut round = MonitoringRound::default();
    while let Some((m, result)) = samples.next().await {
        round.sampled += 1;
        if result.is_err() {
            round.errors += 1;
        }
        let now = Instant::now();
        let obs = m
            .state
            .lock()
            .observe(now, result, &inner.config.escalation);
        if !obs.cleared.is_empty() {
            let agent_id = m.agent_id;
            for kind in &obs.cleared {
                tracing::info!(%agent_id, kind = kind.name(), "violation cleared");
                if let Some(audit) = &inner.audit {
                    audit.submit(
                        AuditEvent::new(
                            AuditEventType::ResourceViolation,
                            Some(agent_id),
                            format!("{} cleared: back within limits", kind.name()),
                        )
                        .with("kind", kind.name())
                        .with("action", "cleared"),
                    );
                }
            }
        }
        if let Some(plan) = obs.plan {
            round
                .actions
                .push(tokio::spawn(execute(inner.clone(), m.clone(), plan)));
        }
    }
    round
}

async fn execute(inner: Arc<Inner>, m: Arc<Monitored>, plan: PlannedAction) -> ActionRecord {
    use EscalationAction::*;
    let agent_id = plan.agent_id;
    let actions = inner.actions.read().clone();
    let result: Result<(), ResourceError> = match (&actions, plan.action) {
        (Some(a), Warn) => a.warn(agent_id, &plan.reason).await,
        (None, Warn) => Ok(()),
        (None, other) => Err(ResourceError::Action {
            agent: agent_id,
            action: other.name(),
            message: "no enforcement actions are configured \
                      (DefaultResourceManager::set_enforcement_actions)"
                .into(),
        }),
        (Some(a), Throttle) => match &plan.new_limits {
            Some(limits) => a.throttle(agent_id, limits).await,
            None => Ok(()),
        },
        (Some(a), Suspend) => a.suspend(agent_id, &plan.reason).await,
        (Some(a), Stop) => a.stop(agent_id, &plan.reason).await,
        (Some(a), Kill) => a.kill(agent_id, &plan.reason).await,
    };
    let outcome = result.map_err(|e| format!("{e} ({})", e.code()));

    let step = plan.step + 1;
    match &outcome {
        Ok(()) => tracing::warn!(
            %agent_id, kind = plan.kind.name(), action = plan.action.name(), step,
            of = plan.ladder_len, reason = %plan.reason, "resource violation: step taken"
        ),
        Err(e) => tracing::error!(
            %agent_id, kind = plan.kind.name(), action = plan.action.name(), step,
            of = plan.ladder_len, reason = %plan.reason, error = %e,
            "resource violation: step failed"
        ),
    }
    if let Some(audit) = &inner.audit {
        let mut event = AuditEvent::new(
            AuditEventType::ResourceViolation,
            Some(agent_id),
            format!(
                "{}: {} (step {step} of {}) {}",
                plan.reason,
                plan.action,
                plan.ladder_len,
                match &outcome {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("failed: {e}"),
                }
            ),
        )
        .with("kind", plan.kind.name())
        .with("action", plan.action.name())
        .with("step", step.to_string())
        .with(
            "outcome",
            match &outcome {
                Ok(()) => "ok".to_string(),
                Err(e) => e.clone(),
            },
        );
        if let Some(l) = &plan.new_limits {
            event = event
                .with("new_cpu_cores", l.cpu_cores.to_string())
                .with("new_memory_mb", l.memory_mb.to_string())
                .with("new_disk_io_mbps", l.disk_io_mbps.to_string())
                .with("new_network_io_mbps", l.network_io_mbps.to_string());
        }
        audit.submit(event);
    }

    let retired = {
        let mut state = m.state.lock();
        state.finish(&plan, &outcome, Instant::now());
        state.is_retired()
    };
    if retired {
        let mut monitored = inner.monitored.write();
        if monitored
            .get(&agent_id)
            .is_some_and(|current| Arc::ptr_eq(current, &m))
        {
            monitored.remove(&agent_id);
        }
    }
    ActionRecord {
        agent_id,
        kind: plan.kind,
        action: plan.action,
        step,
        reason: plan.reason,
        new_limits: plan.new_limits,
        outcome,
    }
}

#[cfg(test)]
mod tests;
