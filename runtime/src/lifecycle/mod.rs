//! Agent lifecycle: the state machine, and [`DefaultLifecycleController`], which owns every
//! agent's state.
//!
//! The controller is the single writer of [`AgentState`]. Every change goes through
//! [`transition_allowed`] (an explicit table; an invalid transition is `AGENT_002`, never a
//! silent change), is published on a broadcast stream ([`DefaultLifecycleController::subscribe`])
//! and is submitted to the audit trail.
//!
//! What a state change *does* (create a sandbox, start a program, freeze it, kill it) is the
//! job of an [`AgentDriver`] plugged in by the runtime; the controller enforces the timeouts
//! around those steps (`initialization_timeout`, `termination_timeout`), runs health checks
//! every `state_check_interval`, enforces `max_agents`, and restarts Failed agents at most
//! `max_restart_attempts` times when `enable_auto_recovery` is on.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::broadcast;

use crate::config::{ConfigIssue, Validate};
use crate::error::RuntimeError;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType, AuditSink};
use crate::types::{AgentConfig, AgentId, AgentInstance, AgentState};

/// `[lifecycle]` configuration. The field set is the seed's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Longest an agent may spend Initializing before it is marked Failed.
    #[serde(with = "humantime_serde")]
    pub initialization_timeout: Duration,
    /// Longest a graceful termination may take before the agent is killed.
    #[serde(with = "humantime_serde")]
    pub termination_timeout: Duration,
    /// How often running agents are health-checked.
    #[serde(with = "humantime_serde")]
    pub state_check_interval: Duration,
    /// Restart Failed agents automatically.
    pub enable_auto_recovery: bool,
    /// Restarts per agent before it stays Failed.
    pub max_restart_attempts: u32,
    /// Most agents alive at once (Terminated agents do not count).
    pub max_agents: usize,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            initialization_timeout: Duration::from_secs(60),
            termination_timeout: Duration::from_secs(30),
            state_check_interval: Duration::from_secs(5),
            enable_auto_recovery: true,
            max_restart_attempts: 3,
            max_agents: 100,
        }
    }
}

impl Validate for LifecycleConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.max_agents == 0 {
            issues.push(ConfigIssue::new(
                "lifecycle.max_agents",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            (
                "lifecycle.initialization_timeout",
                self.initialization_timeout,
            ),
            ("lifecycle.termination_timeout", self.termination_timeout),
            ("lifecycle.state_check_interval", self.state_check_interval),
        ] {
            if value.is_zero() {
                issues.push(ConfigIssue::new(key, "must be longer than 0s"));
            }
        }
    }
}

/// True when the state machine allows `from → to`.
///
/// | from | to |
/// |---|---|
/// | Created | Initializing, Failed, Terminating |
/// | Initializing | Ready, Failed, Terminating |
/// | Ready | Running, Waiting, Suspended, Failed, Terminating |
/// | Running | Ready, Waiting, Suspended, Failed, Terminating |
/// | Waiting | Running, Ready, Suspended, Failed, Terminating |
/// | Suspended | Ready, Running, Waiting, Failed, Terminating |
/// | Failed | Initializing (restart), Terminating |
/// | Terminating | Terminated |
/// | Terminated | — |
pub const fn transition_allowed(from: AgentState, to: AgentState) -> bool {
    use AgentState::*;
    matches!(
        (from, to),
        (Created, Initializing | Failed | Terminating)
            | (Initializing, Ready | Failed | Terminating)
            | (Ready, Running | Waiting | Suspended | Failed | Terminating)
            | (Running, Ready | Waiting | Suspended | Failed | Terminating)
            | (Waiting, Running | Ready | Suspended | Failed | Terminating)
            | (Suspended, Ready | Running | Waiting | Failed | Terminating)
            | (Failed, Initializing | Terminating)
            | (Terminating, Terminated)
    )
}

/// Errors of the lifecycle controller.
#[derive(Debug, Error)]
pub enum LifecycleError {
    /// No agent with this id.
    #[error("agent {0} not found")]
    AgentNotFound(AgentId),
    /// The state machine does not allow this change.
    #[error("agent {agent}: invalid state transition {from:?} -> {to:?}")]
    InvalidTransition {
        /// The agent.
        agent: AgentId,
        /// Its current state.
        from: AgentState,
        /// The refused target.
        to: AgentState,
    },
    /// `max_agents` agents are already alive.
    #[error("cannot create agent: the limit of {max} agents is reached")]
    MaxAgentsReached {
        /// The configured limit.
        max: usize,
    },
    /// An agent with this id already exists.
    #[error("agent {0} already exists")]
    AlreadyExists(AgentId),
    /// Initialization failed or took longer than `initialization_timeout`; the agent is
    /// Failed.
    #[error("agent {agent} failed to initialize: {reason}")]
    InitializationFailed {
        /// The agent.
        agent: AgentId,
        /// Why.
        reason: String,
    },
    /// A driver step (start, suspend, resume, stop) failed.
    #[error("agent {agent}: {operation} failed: {reason}")]
    OperationFailed {
        /// The agent.
        agent: AgentId,
        /// Which step.
        operation: &'static str,
        /// Why.
        reason: String,
    },
    /// The agent's configuration is unusable.
    #[error("invalid agent configuration: {0}")]
    InvalidConfig(String),
    /// The controller's own configuration is unusable.
    #[error("invalid lifecycle configuration: {0}")]
    InvalidControllerConfig(String),
}

impl LifecycleError {
    /// Stable code. AGENT_001 not found, AGENT_002 invalid transition, AGENT_003 max agents,
    /// AGENT_004 already exists, AGENT_005 initialization failed, AGENT_006 operation failed,
    /// AGENT_007 invalid agent configuration, CONFIG_001 invalid controller configuration.
    pub fn code(&self) -> &'static str {
        match self {
            LifecycleError::AgentNotFound(_) => "AGENT_001",
            LifecycleError::InvalidTransition { .. } => "AGENT_002",
            LifecycleError::MaxAgentsReached { .. } => "AGENT_003",
            LifecycleError::AlreadyExists(_) => "AGENT_004",
            LifecycleError::InitializationFailed { .. } => "AGENT_005",
            LifecycleError::OperationFailed { .. } => "AGENT_006",
            LifecycleError::InvalidConfig(_) => "AGENT_007",
            LifecycleError::InvalidControllerConfig(_) => "CONFIG_001",
        }
    }
}

/// One published state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// The agent.
    pub agent_id: AgentId,
    /// The state before (`None` when the agent was just registered).
    pub from: Option<AgentState>,
    /// The state after.
    pub to: AgentState,
    /// Why it changed.
    pub reason: String,
    /// When.
    pub at: SystemTime,
}

/// The result of a health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthStatus {
    /// Working as expected.
    Healthy,
    /// Not working; the agent is marked Failed with this reason.
    Unhealthy(String),
}

/// What a state change does to the agent's sandbox. The runtime plugs in a driver backed by
/// the sandbox tiers; [`NoopDriver`] only tracks state.
#[async_trait]
pub trait AgentDriver: Send + Sync + 'static {
    /// Prepares the agent (parse its definition, admit its resources, create its sandbox).
    async fn initialize(&self, agent: &AgentInstance) -> Result<(), RuntimeError>;
    /// Starts its program.
    async fn start(&self, agent: &AgentInstance) -> Result<(), RuntimeError>;
    /// Freezes it.
    async fn suspend(&self, agent_id: AgentId) -> Result<(), RuntimeError>;
    /// Thaws it.
    async fn resume(&self, agent_id: AgentId) -> Result<(), RuntimeError>;
    /// Stops it gracefully and releases its sandbox and resources.
    async fn terminate(&self, agent_id: AgentId) -> Result<(), RuntimeError>;
    /// Kills it at once and releases everything (after a termination timed out).
    async fn force_kill(&self, agent_id: AgentId) -> Result<(), RuntimeError>;
    /// Tells whether it is still working.
    async fn health_check(&self, agent_id: AgentId) -> HealthStatus;
}

/// A driver that does nothing: the controller then only tracks states.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopDriver;

#[async_trait]
impl AgentDriver for NoopDriver {
    async fn initialize(&self, _agent: &AgentInstance) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn start(&self, _agent: &AgentInstance) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn suspend(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn resume(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn terminate(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn force_kill(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn health_check(&self, _agent_id: AgentId) -> HealthStatus {
        HealthStatus::Healthy
    }
}

/// How a termination ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TerminationOutcome {
    /// The driver stopped the agent within `termination_timeout`.
    Graceful,
    /// The graceful stop failed or timed out and the agent was killed.
    Forced,
}

/// The agent table plus a count of live (non-Terminated) agents, kept under one lock so the
/// `max_agents` check is O(1).
#[derive(Default)]
struct Agents {
    map: HashMap<AgentId, AgentInstance>,
    alive: usize,
}

struct Inner {
    config: LifecycleConfig,
    agents: RwLock<Agents>,
    driver: Arc<dyn AgentDriver>,
    audit: Option<AuditSink>,
    events: broadcast::Sender<LifecycleEvent>,
}

/// The lifecycle controller: owns every agent's state. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct DefaultLifecycleController {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DefaultLifecycleController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultLifecycleController")
            .field("config", &self.inner.config)
            .field("agents", &self.inner.agents.read().map.len())
            .finish()
    }
}

/// Capacity of the state-change broadcast; slow subscribers see `Lagged` beyond it.
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;

impl DefaultLifecycleController {
    /// A controller that only tracks states ([`NoopDriver`], no audit trail).
    pub async fn new(config: LifecycleConfig) -> Result<Self, LifecycleError> {
        Self::with_driver(config, Arc::new(NoopDriver), None).await
    }

    /// A controller driving agents through `driver` and auditing into `audit`.
    ///
    /// Starts the health-check loop (every `state_check_interval`) on the current Tokio
    /// runtime; it ends when the last handle is dropped.
    pub async fn with_driver(
        config: LifecycleConfig,
        driver: Arc<dyn AgentDriver>,
        audit: Option<AuditSink>,
    ) -> Result<Self, LifecycleError> {
        let mut issues = Vec::new();
        config.validate(&mut issues);
        if let Some(issue) = issues.first() {
            return Err(LifecycleError::InvalidControllerConfig(format!(
                "{}: {}",
                issue.key, issue.message
            )));
        }
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let controller = Self {
            inner: Arc::new(Inner {
                config,
                agents: RwLock::new(Agents::default()),
                driver,
                audit,
                events,
            }),
        };
        controller.spawn_health_loop();
        Ok(controller)
    }

    /// The configuration in force.
    pub fn config(&self) -> &LifecycleConfig {
        &self.inner.config
    }

    /// A stream of every state change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.inner.events.subscribe()
    }

    /// Registers a new agent in state Created. Refuses an invalid configuration (AGENT_007),
    /// a duplicate id (AGENT_004) and a registration past `max_agents` (AGENT_003).
    pub fn register_agent(&self, config: AgentConfig) -> Result<AgentId, LifecycleError> {
        self.register_instance(AgentInstance::new(config))
    }

    /// Registers an existing instance (e.g. one restored from the store) in its state.
    pub fn register_instance(&self, agent: AgentInstance) -> Result<AgentId, LifecycleError> {
        if let Err((field, why)) = agent.config.resource_limits.validate() {
            return Err(LifecycleError::InvalidConfig(format!(
                "resource_limits.{field}: {why}"
            )));
        }
        if agent.config.name.trim().is_empty() {
            return Err(LifecycleError::InvalidConfig(
                "name must not be empty".into(),
            ));
        }
        let id = agent.id;
        let state = agent.state;
        let name = agent.config.name.clone();
        {
            let mut agents = self.inner.agents.write();
            if agents.map.contains_key(&id) {
                return Err(LifecycleError::AlreadyExists(id));
            }
            if !state.is_final() {
                if agents.alive >= self.inner.config.max_agents {
                    return Err(LifecycleError::MaxAgentsReached {
                        max: self.inner.config.max_agents,
                    });
                }
                agents.alive += 1;
            }
            agents.map.insert(id, agent);
        }
        self.publish(id, None, state, "registered".into());
        if let Some(audit) = &self.inner.audit {
            audit.submit(
                AuditEvent::new(
                    AuditEventType::AgentCreated,
                    Some(id),
                    format!("agent `{name}` registered"),
                )
                .with("name", name),
            );
        }
        Ok(id)
    }

    /// Changes an agent's state if the table allows it; returns the published event.
    pub fn transition(
        &self,
        agent_id: AgentId,
        to: AgentState,
        reason: impl Into<String>,
    ) -> Result<LifecycleEvent, LifecycleError> {
        self.transition_if(agent_id, to, reason.into(), |_| true)
    }

    fn transition_if(
        &self,
        agent_id: AgentId,
        to: AgentState,
        reason: String,
        guard: impl FnOnce(&AgentInstance) -> bool,
    ) -> Result<LifecycleEvent, LifecycleError> {
        let from = {
            let mut agents = self.inner.agents.write();
            let agent = agents
                .map
                .get_mut(&agent_id)
                .ok_or(LifecycleError::AgentNotFound(agent_id))?;
            let from = agent.state;
            if !transition_allowed(from, to) || !guard(agent) {
                return Err(LifecycleError::InvalidTransition {
                    agent: agent_id,
                    from,
                    to,
                });
            }
            agent.state = to;
            agent.state_changed_at = SystemTime::now();
            if to == AgentState::Failed {
                agent.failure_reason = Some(reason.clone());
            }
            if to.is_final() {
                agents.alive -= 1;
            }
            from
        };
        Ok(self.publish(agent_id, Some(from), to, reason))
    }

    fn publish(
        &self,
        agent_id: AgentId,
        from: Option<AgentState>,
        to: AgentState,
        reason: String,
    ) -> LifecycleEvent {
        let event = LifecycleEvent {
            agent_id,
            from,
            to,
            reason,
            at: SystemTime::now(),
        };
        if let (Some(audit), Some(from)) = (&self.inner.audit, from) {
            audit.submit(
                AuditEvent::new(
                    AuditEventType::StateChanged,
                    Some(agent_id),
                    format!("{from:?} -> {to:?}: {}", event.reason),
                )
                .with("from", format!("{from:?}"))
                .with("to", format!("{to:?}")),
            );
        }
        // No subscriber is not an error: nobody is listening yet.
        let _ = self.inner.events.send(event.clone());
        event
    }

    /// A copy of the agent as it is now (AGENT_001 when unknown).
    pub fn get_agent(&self, agent_id: AgentId) -> Result<AgentInstance, LifecycleError> {
        self.inner
            .agents
            .read()
            .map
            .get(&agent_id)
            .cloned()
            .ok_or(LifecycleError::AgentNotFound(agent_id))
    }

    /// The agent's state (AGENT_001 when unknown).
    pub fn get_state(&self, agent_id: AgentId) -> Result<AgentState, LifecycleError> {
        self.inner
            .agents
            .read()
            .map
            .get(&agent_id)
            .map(|a| a.state)
            .ok_or(LifecycleError::AgentNotFound(agent_id))
    }

    /// Every agent, in no particular order.
    pub fn list_agents(&self) -> Vec<AgentInstance> {
        self.inner.agents.read().map.values().cloned().collect()
    }

    /// How many agents are registered (including Terminated ones not yet removed).
    pub fn agent_count(&self) -> usize {
        self.inner.agents.read().map.len()
    }

    /// Forgets a Terminated agent (AGENT_002 if it is not Terminated).
    pub fn remove_agent(&self, agent_id: AgentId) -> Result<AgentInstance, LifecycleError> {
        let mut agents = self.inner.agents.write();
        let state = agents
            .map
            .get(&agent_id)
            .map(|a| a.state)
            .ok_or(LifecycleError::AgentNotFound(agent_id))?;
        if !state.is_final() {
            return Err(LifecycleError::InvalidTransition {
                agent: agent_id,
                from: state,
                to: AgentState::Terminated,
            });
        }
        agents
            .map
            .remove(&agent_id)
            .ok_or(LifecycleError::AgentNotFound(agent_id))
    }

    /// Registers and initializes an agent: Created → Initializing → Ready.
    pub async fn create_agent(&self, config: AgentConfig) -> Result<AgentId, LifecycleError> {
        let id = self.register_agent(config)?;
        self.initialize_agent(id).await?;
        Ok(id)
    }

    /// Created/Failed → Initializing → Ready, through the driver, within
    /// `initialization_timeout`. On failure or timeout the agent is Failed (and auto-recovery
    /// may restart it) and AGENT_005 is returned.
    pub async fn initialize_agent(&self, agent_id: AgentId) -> Result<(), LifecycleError> {
        self.transition(agent_id, AgentState::Initializing, "initializing")?;
        self.run_initialization(agent_id).await
    }

    async fn run_initialization(&self, agent_id: AgentId) -> Result<(), LifecycleError> {
        let agent = self.get_agent(agent_id)?;
        let timeout = self.inner.config.initialization_timeout;
        let outcome = tokio::time::timeout(timeout, self.inner.driver.initialize(&agent)).await;
        let timed_out = outcome.is_err();
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{} ({})", e, e.code())),
            Err(_) => Some(format!(
                "initialization timed out after {}",
                humantime::format_duration(timeout)
            )),
        };
        match failure {
            None => {
                self.transition(agent_id, AgentState::Ready, "initialized")?;
                Ok(())
            }
            Some(reason) => {
                if timed_out {
                    // A hung initialization may have left half a sandbox behind.
                    if let Err(e) = self.inner.driver.force_kill(agent_id).await {
                        tracing::warn!(%agent_id, error = %e, "cleanup after initialization timeout failed");
                    }
                }
                // The agent may have been terminated meanwhile; then Failed is not reachable.
                if self
                    .transition(agent_id, AgentState::Failed, reason.clone())
                    .is_ok()
                {
                    self.maybe_recover(agent_id);
                }
                Err(LifecycleError::InitializationFailed {
                    agent: agent_id,
                    reason,
                })
            }
        }
    }

    /// Ready/Waiting/Suspended → Running, starting the program through the driver.
    pub async fn start_agent(&self, agent_id: AgentId) -> Result<(), LifecycleError> {
        let agent = self.get_agent(agent_id)?;
        if !transition_allowed(agent.state, AgentState::Running) {
            return Err(LifecycleError::InvalidTransition {
                agent: agent_id,
                from: agent.state,
                to: AgentState::Running,
            });
        }
        if let Err(e) = self.inner.driver.start(&agent).await {
            let reason = format!("start failed: {e} ({})", e.code());
            if self
                .transition(agent_id, AgentState::Failed, reason.clone())
                .is_ok()
            {
                self.maybe_recover(agent_id);
            }
            return Err(LifecycleError::OperationFailed {
                agent: agent_id,
                operation: "start",
                reason,
            });
        }
        self.transition(agent_id, AgentState::Running, "started")?;
        Ok(())
    }

    /// → Suspended, freezing the agent through the driver.
    pub async fn suspend_agent(
        &self,
        agent_id: AgentId,
        reason: impl Into<String>,
    ) -> Result<(), LifecycleError> {
        let state = self.get_state(agent_id)?;
        if !transition_allowed(state, AgentState::Suspended) {
            return Err(LifecycleError::InvalidTransition {
                agent: agent_id,
                from: state,
                to: AgentState::Suspended,
            });
        }
        self.inner
            .driver
            .suspend(agent_id)
            .await
            .map_err(|e| LifecycleError::OperationFailed {
                agent: agent_id,
                operation: "suspend",
                reason: e.to_string(),
            })?;
        self.transition(agent_id, AgentState::Suspended, reason)?;
        Ok(())
    }

    /// Suspended → Running, thawing the agent through the driver.
    pub async fn resume_agent(&self, agent_id: AgentId) -> Result<(), LifecycleError> {
        let state = self.get_state(agent_id)?;
        if state != AgentState::Suspended {
            return Err(LifecycleError::InvalidTransition {
                agent: agent_id,
                from: state,
                to: AgentState::Running,
            });
        }
        self.inner
            .driver
            .resume(agent_id)
            .await
            .map_err(|e| LifecycleError::OperationFailed {
                agent: agent_id,
                operation: "resume",
                reason: e.to_string(),
            })?;
        self.transition(agent_id, AgentState::Running, "resumed")?;
        Ok(())
    }

    /// Marks the agent Failed with `reason`; with auto-recovery on, schedules a restart
    /// unless `max_restart_attempts` restarts were already made.
    pub fn fail_agent(
        &self,
        agent_id: AgentId,
        reason: impl Into<String>,
    ) -> Result<(), LifecycleError> {
        self.transition(agent_id, AgentState::Failed, reason)?;
        self.maybe_recover(agent_id);
        Ok(())
    }

    /// Replaces the failure reason of a Failed agent (e.g. when recovery gives up on it).
    /// AGENT_002 when the agent is not Failed.
    pub fn set_failure_reason(
        &self,
        agent_id: AgentId,
        reason: impl Into<String>,
    ) -> Result<(), LifecycleError> {
        let mut agents = self.inner.agents.write();
        let agent = agents
            .map
            .get_mut(&agent_id)
            .ok_or(LifecycleError::AgentNotFound(agent_id))?;
        if agent.state != AgentState::Failed {
            return Err(LifecycleError::InvalidTransition {
                agent: agent_id,
                from: agent.state,
                to: AgentState::Failed,
            });
        }
        agent.failure_reason = Some(reason.into());
        Ok(())
    }

    /// Failed → Initializing → Ready, counting one restart. Refused (AGENT_006) once
    /// `max_restart_attempts` restarts were made.
    pub async fn restart_agent(&self, agent_id: AgentId) -> Result<(), LifecycleError> {
        let max = self.inner.config.max_restart_attempts;
        let mut attempt = 0;
        self.transition_if(
            agent_id,
            AgentState::Initializing,
            "restarting".into(),
            |agent| {
                attempt = agent.restart_count + 1;
                agent.restart_count < max
            },
        )
        .map_err(|e| match e {
            LifecycleError::InvalidTransition {
                from: AgentState::Failed,
                ..
            } => LifecycleError::OperationFailed {
                agent: agent_id,
                operation: "restart",
                reason: format!("restart limit of {max} reached"),
            },
            other => other,
        })?;
        if let Some(agent) = self.inner.agents.write().map.get_mut(&agent_id) {
            agent.restart_count = attempt;
        }
        tracing::info!(%agent_id, attempt, max, "restarting agent");
        self.run_initialization(agent_id).await
    }

    fn maybe_recover(&self, agent_id: AgentId) {
        if !self.inner.config.enable_auto_recovery {
            return;
        }
        let restarts = match self.get_agent(agent_id) {
            Ok(agent) => agent.restart_count,
            Err(_) => return,
        };
        if restarts >= self.inner.config.max_restart_attempts {
            tracing::warn!(%agent_id, restarts, "agent stays Failed: restart limit reached");
            if let Some(audit) = &self.inner.audit {
                audit.submit(AuditEvent::new(
                    AuditEventType::RecoveryAction,
                    Some(agent_id),
                    format!("no restart: limit of {restarts} restarts reached"),
                ));
            }
            return;
        }
        let controller = self.clone();
        tokio::spawn(async move {
            // Recursion through the spawned future is bounded by max_restart_attempts.
            let fut: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                Box::pin(controller.restart_agent(agent_id));
            if let Err(e) = fut.await {
                tracing::warn!(%agent_id, error = %e, "automatic restart failed");
            }
        });
    }

    /// → Terminating → Terminated. The driver gets `termination_timeout` to stop the agent
    /// gracefully; after that (or if it fails) the agent is killed. Either way it ends
    /// Terminated with its resources released.
    pub async fn terminate_agent(
        &self,
        agent_id: AgentId,
    ) -> Result<TerminationOutcome, LifecycleError> {
        self.transition(agent_id, AgentState::Terminating, "terminating")?;
        let timeout = self.inner.config.termination_timeout;
        let graceful = tokio::time::timeout(timeout, self.inner.driver.terminate(agent_id)).await;
        let outcome = match graceful {
            Ok(Ok(())) => TerminationOutcome::Graceful,
            Ok(Err(e)) => {
                tracing::warn!(%agent_id, error = %e, "graceful termination failed; killing");
                TerminationOutcome::Forced
            }
            Err(_) => {
                tracing::warn!(%agent_id, ?timeout, "termination timed out; killing");
                TerminationOutcome::Forced
            }
        };
        if outcome == TerminationOutcome::Forced {
            if let Err(e) = self.inner.driver.force_kill(agent_id).await {
                tracing::error!(%agent_id, error = %e, "force kill failed");
            }
        }
        let reason = match outcome {
            TerminationOutcome::Graceful => "terminated".to_string(),
            TerminationOutcome::Forced => format!(
                "forced termination after {}",
                humantime::format_duration(timeout)
            ),
        };
        self.transition(agent_id, AgentState::Terminated, reason)?;
        Ok(outcome)
    }

    /// Runs one round of health checks now (the loop does this every
    /// `state_check_interval`). Unhealthy agents are marked Failed. Returns how many failed.
    pub async fn run_health_checks(&self) -> usize {
        let candidates: Vec<AgentId> = self
            .inner
            .agents
            .read()
            .map
            .values()
            .filter(|a| {
                matches!(
                    a.state,
                    AgentState::Running | AgentState::Ready | AgentState::Waiting
                )
            })
            .map(|a| a.id)
            .collect();
        let mut failed = 0;
        for agent_id in candidates {
            if let HealthStatus::Unhealthy(reason) = self.inner.driver.health_check(agent_id).await
            {
                if self
                    .fail_agent(agent_id, format!("health check failed: {reason}"))
                    .is_ok()
                {
                    failed += 1;
                }
            }
        }
        failed
    }

    fn spawn_health_loop(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = self.inner.config.state_check_interval;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                DefaultLifecycleController { inner }
                    .run_health_checks()
                    .await;
            }
        });
    }
}

#[cfg(test)]
mod tests;
