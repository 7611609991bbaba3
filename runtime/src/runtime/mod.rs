//! The composition root: [`Runtime`] builds every component from a [`RuntimeConfig`] and
//! wires them together, so that a library user starts a full runtime in a few lines and the
//! `symbiont` service is a thin shell around it.
//!
//! ```text
//! create:  AgentConfig ─▶ lifecycle(Created) ─▶ dsl::compile ─▶ policy ─▶ resource::admit
//!          ─▶ sandbox::create(SandboxSpec) ─▶ lifecycle(Ready) ─▶ start ─▶ bridge ─▶ Running
//! run:     scheduler pops a task ─▶ RuntimeExecutor ─▶ task frame to the program (persistent)
//!          or a fresh sandbox per task (ephemeral) ─▶ result ─▶ handler output routing
//! talk:    agent frame ─▶ bridge ─▶ bus (policy, sign+encrypt) ─▶ mailbox ─▶ dispatcher
//!          ─▶ handler task, or deliver frame to the recipient's program
//! watch:   resource monitor samples sandbox stats ─▶ escalation ─▶ lifecycle / sandbox
//! fail:    a program exits unexpectedly ─▶ error handler ─▶ restart / suspend / terminate
//! ```
//!
//! Every step emits audit events into one durable, hash-chained, signed trail.

mod agents;
pub mod driver;
mod executor;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::communication::{
    DefaultCommunicationBus, DeliveryContext, DeliveryPolicy, Message, MessageKind, PolicyDecision,
};
use crate::config::RuntimeConfig;
use crate::dsl::{self, CompiledAgent, LoadOptions};
use crate::error::RuntimeError;
use crate::error_handler::{DefaultErrorHandler, RecoveryExecutor, RecoveryPolicy};
use crate::integrations::audit_trail::{
    query_dir, verify_dir, AuditEvent, AuditEventType, AuditQuery, AuditRecord, AuditSink,
    DurableAuditTrail, VerifyReport,
};
use crate::lifecycle::{DefaultLifecycleController, LifecycleError, LifecycleEvent};
use crate::policy::{AgentPolicies, MessageMeta, PolicySet};
use crate::resource::{DefaultResourceManager, LifecycleEnforcement, ResourceUsage};
use crate::sandbox::{SandboxRegistry, TierInfo};
use crate::scheduler::{
    DefaultScheduler, ScheduleReceipt, ScheduledTask, SchedulerParts, TaskOptions, TaskRecord,
    TaskTarget,
};
use crate::storage::Store;
use crate::types::{
    AgentConfig, AgentId, AgentInstance, AgentState, ExecutionMode, MessageId, Priority, TaskId,
};

pub use agents::{AgentStatus, LogLine};
pub use driver::SandboxDriver;
pub use executor::TaskInput;

use agents::{AgentEntry, AgentRecord};

/// A late-bound weak reference to the runtime, for the adapters built before it.
#[derive(Clone, Default)]
pub(crate) struct Link(Arc<OnceLock<Weak<Inner>>>);

impl Link {
    pub(crate) fn get(&self) -> Option<Arc<Inner>> {
        self.0.get().and_then(Weak::upgrade)
    }
}

/// The operator identity: messages sent through the API or CLI come from it.
pub const OPERATOR_NAME: &str = "operator";

pub(crate) struct Inner {
    pub(crate) config: RuntimeConfig,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) audit_trail: Arc<DurableAuditTrail>,
    pub(crate) audit: AuditSink,
    pub(crate) lifecycle: DefaultLifecycleController,
    pub(crate) driver: Arc<SandboxDriver>,
    pub(crate) registry: SandboxRegistry,
    pub(crate) tiers: Vec<TierInfo>,
    pub(crate) resources: DefaultResourceManager,
    pub(crate) scheduler: DefaultScheduler,
    pub(crate) errors: DefaultErrorHandler,
    pub(crate) recovery: RecoveryExecutor,
    pub(crate) bus: DefaultCommunicationBus,
    pub(crate) policies: Arc<AgentPolicies>,
    pub(crate) agents: RwLock<HashMap<AgentId, Arc<AgentEntry>>>,
    pub(crate) operator: AgentId,
    pub(crate) background: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) started_at: SystemTime,
}

/// A running runtime: every component, wired. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("agents", &self.inner.agents.read().len())
            .field("tiers", &self.inner.tiers)
            .finish()
    }
}

/// What `Runtime::submit_task` takes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskRequest {
    /// The agent to run it (or the group's first member with `group`).
    pub agent_id: Option<AgentId>,
    /// A group of replicas to balance over instead of one agent.
    pub group: Option<String>,
    /// Priority (default: the agent's).
    pub priority: Option<Priority>,
    /// Input handed to the program.
    #[serde(with = "crate::runtime::agents::b64")]
    pub input: Vec<u8>,
    /// Timeout (default: `[scheduler] task_timeout`).
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Retries allowed after a failure.
    pub retry_count: u32,
    /// Run no earlier than this long from now.
    #[serde(with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// Caller-chosen key to detect duplicates.
    pub idempotency_key: Option<String>,
}

/// What `Runtime::send_message` takes. `from` defaults to the operator identity.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// Sender (default: the operator).
    #[serde(default)]
    pub from: Option<AgentId>,
    /// Recipient; `None` publishes on `topic`.
    #[serde(default)]
    pub to: Option<AgentId>,
    /// Topic.
    pub topic: String,
    /// Payload.
    #[serde(with = "crate::runtime::agents::b64")]
    pub payload: Vec<u8>,
    /// Priority.
    #[serde(default)]
    pub priority: Priority,
    /// Time to live (default: `[communication] default_ttl`).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

/// Health of the runtime and its tiers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthReport {
    /// `ok` when every component answers.
    pub status: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Agents by state.
    pub agents: HashMap<String, usize>,
    /// What each tier's probe found (including warnings such as "KVM unusable, using TCG").
    pub tiers: Vec<TierInfo>,
}

impl Runtime {
    /// Builds and starts every component from `config` with the sandbox tiers this host
    /// offers (see [`crate::sandbox::probe_registry`]); restores persisted agents and tasks.
    pub async fn start(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let (registry, tiers) = crate::sandbox::probe_registry(&config.sandbox).await;
        Self::start_with_registry(config, registry, tiers).await
    }

    /// Like [`Runtime::start`] with a given set of sandbox backends.
    pub async fn start_with_registry(
        config: RuntimeConfig,
        registry: SandboxRegistry,
        tiers: Vec<TierInfo>,
    ) -> Result<Runtime, RuntimeError> {
        config.validate()?;
        for tier in &tiers {
            for warning in &tier.warnings {
                tracing::warn!(tier = %tier.tier, "{warning}");
            }
        }
        let store = config.storage.open()?;
        let trail = Arc::new(DurableAuditTrail::open(
            &config.audit,
            &config.storage.data_dir,
        )?);
        let audit: AuditSink = trail.clone();
        audit.submit(
            AuditEvent::new(
                AuditEventType::ConfigurationLoaded,
                None,
                "runtime configuration loaded",
            )
            .with("max_agents", config.lifecycle.max_agents.to_string())
            .with(
                "enforcement",
                config.resource.enforcement_enabled.to_string(),
            )
            .with(
                "encryption",
                config.communication.enable_encryption.to_string(),
            ),
        );

        let link = Link::default();
        let policies = Arc::new(AgentPolicies::new(Some(audit.clone())));

        let bus = DefaultCommunicationBus::builder(config.communication.clone())
            .audit(audit.clone())
            .policy(Arc::new(BusPolicy {
                policies: policies.clone(),
            }))
            .key_store(
                store.clone(),
                config.storage.data_dir.join("keys").join("bus.kek"),
            )
            .build()
            .await?;

        let resources = DefaultResourceManager::builder(config.resource.clone())
            .audit(audit.clone())
            .build()
            .await?;

        let driver = Arc::new(SandboxDriver::new(
            registry.clone(),
            Arc::new(agents::Specs(link.clone())),
            Arc::new(agents::Stdio(link.clone())),
            Arc::new(agents::Exits(link.clone())),
            config.lifecycle.termination_timeout / 2,
        ));

        // The error handler owns recovery; the lifecycle's own auto-restart would race it.
        let mut lifecycle_config = config.lifecycle.clone();
        let auto_recovery = lifecycle_config.enable_auto_recovery;
        lifecycle_config.enable_auto_recovery = false;
        let lifecycle = DefaultLifecycleController::with_driver(
            lifecycle_config,
            Arc::new(agents::Ops(link.clone())),
            Some(audit.clone()),
        )
        .await?;

        resources.set_enforcement_actions(Arc::new(LifecycleEnforcement::new(
            lifecycle.clone(),
            resources.sandbox_directory(),
            config.resource.escalation.stop_grace,
        )));
        let follow = resources.follow_lifecycle(&lifecycle);

        let mut error_config = config.error_handler.clone();
        error_config.enable_auto_recovery &= auto_recovery;
        let errors = DefaultErrorHandler::with_audit(error_config, Some(audit.clone())).await?;
        let recovery =
            RecoveryExecutor::new(errors.clone(), Arc::new(agents::Recovery(link.clone())));

        let scheduler = DefaultScheduler::with_parts(
            config.scheduler.clone(),
            SchedulerParts {
                directory: Arc::new(lifecycle.clone()),
                executor: None,
                load: Some(Arc::new(agents::Load(link.clone()))),
                failure_policy: Some(Arc::new(RecoveryPolicy::new(recovery.clone()))),
                store: Some(store.clone()),
                audit: Some(audit.clone()),
            },
        )
        .await?;

        // The operator identity sends on behalf of API and CLI users.
        let operator = agents::operator_id(&*store)?;
        bus.register_agent(operator, vec![crate::types::Capability::Messaging])
            .await?;
        policies.register(
            operator,
            OPERATOR_NAME,
            Arc::new(PolicySet::from_sources(&[
                "allow send to any",
                "allow receive from any",
            ])?),
        );

        let inner = Arc::new(Inner {
            config,
            store,
            audit_trail: trail,
            audit,
            lifecycle,
            driver,
            registry,
            tiers,
            resources,
            scheduler,
            errors,
            recovery,
            bus,
            policies,
            agents: RwLock::new(HashMap::new()),
            operator,
            background: Mutex::new(vec![follow]),
            started_at: SystemTime::now(),
        });
        let _ = link.0.set(Arc::downgrade(&inner));

        let runtime = Runtime { inner };
        runtime.spawn_background();
        runtime.restore().await?;
        // Only now: tasks recovered from the store must find their agents registered, or
        // the scheduler would fail them as "unknown agent" (regression test:
        // cli/tests/crash_recovery.rs).
        runtime
            .inner
            .scheduler
            .set_executor(Arc::new(executor::RuntimeExecutor(link.clone())));
        runtime.inner.audit.submit(AuditEvent::new(
            AuditEventType::RuntimeLifecycle,
            None,
            "runtime started",
        ));
        Ok(runtime)
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Runtime { inner }
    }

    /// The configuration in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// The lifecycle controller.
    pub fn lifecycle(&self) -> &DefaultLifecycleController {
        &self.inner.lifecycle
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &DefaultScheduler {
        &self.inner.scheduler
    }

    /// The resource manager.
    pub fn resources(&self) -> &DefaultResourceManager {
        &self.inner.resources
    }

    /// The communication bus.
    pub fn bus(&self) -> &DefaultCommunicationBus {
        &self.inner.bus
    }

    /// The error handler.
    pub fn error_handler(&self) -> &DefaultErrorHandler {
        &self.inner.errors
    }

    /// The audit trail every component records into.
    pub fn audit(&self) -> &AuditSink {
        &self.inner.audit
    }

    /// The embedded store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The sandbox driver (the live sandboxes of persistent agents).
    pub fn sandboxes(&self) -> &SandboxDriver {
        &self.inner.driver
    }

    /// What each tier's probe found.
    pub fn tiers(&self) -> &[TierInfo] {
        &self.inner.tiers
    }

    /// The operator identity (sender of API and CLI messages).
    pub fn operator_id(&self) -> AgentId {
        self.inner.operator
    }

    fn spawn_background(&self) {
        let mut background = self.inner.background.lock();
        background.push(agents::spawn_persistence(&self.inner));
        background.push(agents::spawn_cron(Arc::downgrade(&self.inner)));
    }

    /// Registers, persists, initializes and (unless `start` is false) starts an agent.
    /// A bad definition leaves the agent Failed with the rendered diagnostics (AGENT_005).
    pub async fn create_agent(&self, config: AgentConfig) -> Result<AgentId, RuntimeError> {
        self.create_agent_with(config, None, true).await
    }

    /// Creates an agent from a definition file's text: its name comes from the definition
    /// unless `config.name` is set, and host files are read relative to `base_dir`.
    pub async fn create_agent_from_definition(
        &self,
        source: &str,
        base_dir: Option<PathBuf>,
        config: AgentConfig,
    ) -> Result<AgentId, RuntimeError> {
        self.create_agent_with_options(config, Some(source), base_dir, true)
            .await
    }

    /// The general form of [`Runtime::create_agent`] and
    /// [`Runtime::create_agent_from_definition`]: with `definition`, it replaces
    /// `config.dsl_source` (and names the agent unless `config.name` is set); host files are
    /// read relative to `base_dir`. With `start` false the agent is initialized (definition
    /// compiled, sandbox prepared) and left Ready until [`Runtime::start_agent`].
    pub async fn create_agent_with_options(
        &self,
        mut config: AgentConfig,
        definition: Option<&str>,
        base_dir: Option<PathBuf>,
        start: bool,
    ) -> Result<AgentId, RuntimeError> {
        let Some(source) = definition else {
            return self.create_agent_with(config, base_dir, start).await;
        };
        let definition = dsl::load(
            source,
            "definition",
            &LoadOptions {
                base_dir: base_dir.clone(),
                ..Default::default()
            },
        )
        .map_err(|d| RuntimeError::Dsl(crate::dsl::DslError::Invalid(d.render())))?;
        if config.name.is_empty() || config.name == AgentConfig::default().name {
            config.name = definition.name.clone();
        }
        config.dsl_source = source.to_string();
        self.create_agent_with(config, base_dir, start).await
    }

    async fn create_agent_with(
        &self,
        config: AgentConfig,
        base_dir: Option<PathBuf>,
        start: bool,
    ) -> Result<AgentId, RuntimeError> {
        let id = config.id;
        let capabilities = config.capabilities.clone();
        self.inner.lifecycle.register_agent(config)?;
        let record = AgentRecord {
            instance: self.inner.lifecycle.get_agent(id)?,
            base_dir,
            desired_running: start,
        };
        agents::persist(&self.inner, &record)?;
        self.inner
            .agents
            .write()
            .insert(id, Arc::new(AgentEntry::new(record.base_dir.clone())));
        self.inner.bus.register_agent(id, capabilities).await?;
        self.inner.lifecycle.initialize_agent(id).await?;
        if start {
            self.inner.lifecycle.start_agent(id).await?;
        }
        Ok(id)
    }

    /// Every agent with its state and live usage.
    pub fn list_agents(&self) -> Vec<AgentStatus> {
        self.inner
            .lifecycle
            .list_agents()
            .into_iter()
            .map(|a| self.status_of(a))
            .collect()
    }

    /// One agent with its state, live usage and handlers (AGENT_001 when unknown).
    pub fn agent_status(&self, id: AgentId) -> Result<AgentStatus, RuntimeError> {
        let agent = self.inner.lifecycle.get_agent(id)?;
        Ok(self.status_of(agent))
    }

    fn status_of(&self, agent: AgentInstance) -> AgentStatus {
        let entry = self.inner.agents.read().get(&agent.id).cloned();
        let usage: Option<ResourceUsage> = self.inner.resources.usage(agent.id);
        let tier_warnings = self
            .inner
            .tiers
            .iter()
            .filter(|t| t.tier == agent.config.security_tier)
            .flat_map(|t| t.warnings.clone())
            .collect();
        AgentStatus::new(agent, usage, entry.as_deref(), tier_warnings)
    }

    /// Starts a Ready (or Suspended/Waiting) agent.
    pub async fn start_agent(&self, id: AgentId) -> Result<(), RuntimeError> {
        agents::set_desired(&self.inner, id, true)?;
        self.inner.lifecycle.start_agent(id).await?;
        Ok(())
    }

    /// Freezes an agent's sandbox (Suspended).
    pub async fn suspend_agent(&self, id: AgentId) -> Result<(), RuntimeError> {
        self.inner
            .lifecycle
            .suspend_agent(id, "suspended by operator")
            .await?;
        Ok(())
    }

    /// Thaws a Suspended agent.
    pub async fn resume_agent(&self, id: AgentId) -> Result<(), RuntimeError> {
        self.inner.lifecycle.resume_agent(id).await?;
        Ok(())
    }

    /// Stops an agent for good: its program gets `termination_timeout` to exit, then it is
    /// killed; its sandbox and resources are released (Terminated).
    pub async fn stop_agent(&self, id: AgentId) -> Result<(), RuntimeError> {
        agents::set_desired(&self.inner, id, false)?;
        let state = self.inner.lifecycle.get_state(id)?;
        if state != AgentState::Terminated && state != AgentState::Terminating {
            self.inner.lifecycle.terminate_agent(id).await?;
        }
        Ok(())
    }

    /// Stops (if needed) and forgets an agent: its record, keys and policy are removed.
    pub async fn delete_agent(&self, id: AgentId) -> Result<(), RuntimeError> {
        self.stop_agent(id).await?;
        self.inner.lifecycle.remove_agent(id)?;
        self.inner.agents.write().remove(&id);
        self.inner.policies.unregister(id);
        if let Err(e) = self.inner.bus.unregister_agent(id).await {
            tracing::debug!(%id, error = %e, "bus unregister");
        }
        agents::unpersist(&self.inner, id)?;
        self.inner.audit.submit(AuditEvent::new(
            AuditEventType::AgentDeleted,
            Some(id),
            "agent deleted",
        ));
        Ok(())
    }

    /// The last `tail` lines the agent's program wrote to stderr or logged (AGENT_001 when
    /// unknown).
    pub fn agent_logs(&self, id: AgentId, tail: usize) -> Result<Vec<LogLine>, RuntimeError> {
        self.inner.lifecycle.get_state(id)?;
        Ok(self
            .inner
            .agents
            .read()
            .get(&id)
            .map(|e| e.logs(tail))
            .unwrap_or_default())
    }

    /// Queues a task. Durable before it returns (write-ahead), executed at least once.
    pub async fn submit_task(&self, req: TaskRequest) -> Result<ScheduleReceipt, RuntimeError> {
        let target = match (&req.agent_id, &req.group) {
            (_, Some(group)) => TaskTarget::Group(group.clone()),
            (Some(id), None) => TaskTarget::Agent(*id),
            (None, None) => {
                return Err(crate::scheduler::SchedulerError::SchedulingFailed(
                    "a task needs an agent_id or a group".into(),
                )
                .into())
            }
        };
        let agent_id = match &target {
            TaskTarget::Agent(id) => *id,
            TaskTarget::Group(_) => req.agent_id.unwrap_or(AgentId(uuid::Uuid::nil())),
        };
        let priority = match (req.priority, &target) {
            (Some(p), _) => p,
            (None, TaskTarget::Agent(id)) => self
                .inner
                .lifecycle
                .get_agent(*id)
                .map(|a| a.config.priority)
                .unwrap_or_default(),
            (None, TaskTarget::Group(_)) => Priority::Normal,
        };
        let task = ScheduledTask {
            id: TaskId::new(),
            agent_id,
            priority,
            scheduled_time: SystemTime::now() + req.delay.unwrap_or_default(),
            timeout: req
                .timeout
                .unwrap_or(self.inner.config.scheduler.task_timeout),
            retry_count: req.retry_count,
        };
        let input = TaskInput::task(req.input);
        let receipt = self
            .inner
            .scheduler
            .schedule_task_with(
                task,
                TaskOptions {
                    payload: input.encode(),
                    idempotency_key: req.idempotency_key,
                    target: Some(target),
                },
            )
            .await?;
        Ok(receipt)
    }

    /// A task's record (SCHED_002 when unknown).
    pub fn task(&self, id: TaskId) -> Result<TaskRecord, RuntimeError> {
        Ok(self.inner.scheduler.task(id)?)
    }

    /// Every known task.
    pub fn list_tasks(&self) -> Vec<TaskRecord> {
        self.inner.scheduler.list_tasks()
    }

    /// Cancels a task; a running execution is killed.
    pub async fn cancel_task(&self, id: TaskId) -> Result<TaskRecord, RuntimeError> {
        Ok(self.inner.scheduler.cancel_task(id).await?)
    }

    /// Waits for a task to finish.
    pub async fn wait_task(&self, id: TaskId) -> Result<TaskRecord, RuntimeError> {
        Ok(self.inner.scheduler.wait_task(id).await?)
    }

    /// Sends (or, without `to`, publishes) a message, signed and encrypted by the bus.
    pub async fn send_message(&self, req: SendRequest) -> Result<MessageId, RuntimeError> {
        let message = Message {
            id: MessageId::new(),
            from: req.from.unwrap_or(self.inner.operator),
            to: req.to.unwrap_or(AgentId(uuid::Uuid::nil())),
            topic: req.topic,
            payload: req.payload,
            priority: req.priority,
            ttl: req
                .ttl
                .unwrap_or(self.inner.config.communication.default_ttl),
        };
        let id = message.id;
        if req.to.is_some() {
            self.inner.bus.send_message(message).await?;
        } else {
            self.inner.bus.publish(message).await?;
        }
        Ok(id)
    }

    /// Messages that could not be delivered (expired, refused, undeliverable).
    pub fn dead_letters(&self) -> Vec<crate::communication::DeadLetter> {
        self.inner.bus.dead_letters()
    }

    /// Audit events matching `query` (everything flushed so far).
    pub async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, RuntimeError> {
        self.inner.audit.flush().await?;
        let dir = self.inner.audit_trail.dir().to_path_buf();
        let query = query.clone();
        tokio::task::spawn_blocking(move || query_dir(&dir, &query))
            .await
            .map_err(|e| crate::integrations::audit_trail::AuditError::Read(e.to_string()))?
            .map_err(Into::into)
    }

    /// Counters of the audit trail (events submitted, events durable).
    pub fn audit_stats(&self) -> crate::integrations::audit_trail::AuditStats {
        self.inner.audit_trail.stats()
    }

    /// The audit log's directory.
    pub fn audit_dir(&self) -> &std::path::Path {
        self.inner.audit_trail.dir()
    }

    /// Verifies the audit trail's chain and signatures with the runtime's public key.
    pub async fn audit_verify(&self) -> Result<VerifyReport, RuntimeError> {
        self.inner.audit.flush().await?;
        let dir = self.inner.audit_trail.dir().to_path_buf();
        let key = self.inner.audit_trail.public_key();
        tokio::task::spawn_blocking(move || verify_dir(&dir, &key))
            .await
            .map_err(|e| crate::integrations::audit_trail::AuditError::Read(e.to_string()))?
            .map_err(Into::into)
    }

    /// Health of the runtime and its tiers.
    pub fn health(&self) -> HealthReport {
        let mut agents: HashMap<String, usize> = HashMap::new();
        for a in self.inner.lifecycle.list_agents() {
            *agents.entry(format!("{:?}", a.state)).or_default() += 1;
        }
        HealthReport {
            status: "ok".into(),
            uptime_secs: self
                .inner
                .started_at
                .elapsed()
                .map(|d| d.as_secs())
                .unwrap_or(0),
            agents,
            tiers: self.inner.tiers.clone(),
        }
    }

    /// Stops every agent within `termination_timeout`, stops the scheduler and flushes the
    /// audit trail. Persisted agents that were running come back at the next start.
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        self.inner.audit.submit(AuditEvent::new(
            AuditEventType::RuntimeLifecycle,
            None,
            "runtime stopping",
        ));
        tracing::debug!("shutdown: stopping the scheduler");
        let term = self.inner.config.lifecycle.termination_timeout;
        let drained = tokio::time::timeout(term, self.inner.scheduler.shutdown())
            .await
            .is_ok();
        if !drained {
            // Stopping the agents below kills whatever those executions wait for.
            tracing::warn!(
                timeout = %humantime::format_duration(term),
                "executions still running at shutdown after termination_timeout; stopping the agents under them"
            );
        }
        tracing::debug!("shutdown: stopping agents");
        let live: Vec<AgentId> = self
            .inner
            .lifecycle
            .list_agents()
            .into_iter()
            .filter(|a| !matches!(a.state, AgentState::Terminated | AgentState::Terminating))
            .map(|a| a.id)
            .collect();
        let stops = live.into_iter().map(|id| {
            let lifecycle = self.inner.lifecycle.clone();
            async move {
                // Desired state stays as it was: a running agent comes back next start.
                if let Err(e) = lifecycle.terminate_agent(id).await {
                    tracing::warn!(%id, error = %e, "stopping agent at shutdown");
                }
            }
        });
        futures::future::join_all(stops).await;
        tracing::debug!("shutdown: agents stopped");
        if !drained
            && tokio::time::timeout(term, self.inner.scheduler.shutdown())
                .await
                .is_err()
        {
            tracing::error!("executions still running after their agents were stopped");
        }
        for handle in self.inner.background.lock().drain(..) {
            handle.abort();
        }
        self.inner.audit.flush().await?;
        Ok(())
    }

    async fn restore(&self) -> Result<(), RuntimeError> {
        let records = agents::load_all(&*self.inner.store)?;
        let mut restored = 0usize;
        for record in records {
            let id = record.instance.id;
            if record.instance.state == AgentState::Terminated && !record.desired_running {
                // Stopped on purpose: keep it visible, in its final state. (An agent that
                // was running when the runtime shut down was terminated by the shutdown but
                // still wants to run: it is restored below.)
                let _ = self.inner.lifecycle.register_instance(record.instance);
                self.inner
                    .agents
                    .write()
                    .insert(id, Arc::new(AgentEntry::new(record.base_dir)));
                continue;
            }
            let mut instance = record.instance.clone();
            instance.state = AgentState::Created;
            let caps = instance.config.capabilities.clone();
            if let Err(e) = self.inner.lifecycle.register_instance(instance) {
                tracing::error!(%id, error = %e, "cannot restore agent");
                continue;
            }
            self.inner
                .agents
                .write()
                .insert(id, Arc::new(AgentEntry::new(record.base_dir.clone())));
            self.inner.bus.register_agent(id, caps).await?;
            restored += 1;
            let result = async {
                self.inner.lifecycle.initialize_agent(id).await?;
                if record.desired_running {
                    self.inner.lifecycle.start_agent(id).await?;
                    if record.instance.state == AgentState::Suspended {
                        // Suspended before the restart (by an operator or an escalation):
                        // it comes back suspended, not running.
                        self.inner
                            .lifecycle
                            .suspend_agent(id, "suspended before the runtime restarted")
                            .await?;
                    }
                }
                Ok::<(), LifecycleError>(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(%id, error = %e, "restored agent did not come back");
            }
        }
        if restored > 0 {
            tracing::info!(restored, "agents restored from the store");
        }
        self.inner.scheduler.notify_agent_changed();
        Ok(())
    }

    /// The next lifecycle events (for tests and the CLI's progress display).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<LifecycleEvent> {
        self.inner.lifecycle.subscribe()
    }

    /// The compiled definition of an agent (after initialization).
    pub fn compiled(&self, id: AgentId) -> Option<Arc<CompiledAgent>> {
        self.inner.agents.read().get(&id).and_then(|e| e.compiled())
    }

    /// An execution mode's short name.
    pub fn mode_name(mode: &ExecutionMode) -> &'static str {
        match mode {
            ExecutionMode::Persistent => "persistent",
            ExecutionMode::Ephemeral => "ephemeral",
            ExecutionMode::Scheduled { .. } => "scheduled",
            ExecutionMode::EventDriven => "event-driven",
        }
    }
}

/// The bus's delivery policy: the sender's `send` rules, then the recipient's `receive`
/// rules, from each agent's compiled policy.
struct BusPolicy {
    policies: Arc<AgentPolicies>,
}

impl DeliveryPolicy for BusPolicy {
    fn check_publish(
        &self,
        from: AgentId,
        topic: &str,
        priority: Priority,
        size: usize,
    ) -> PolicyDecision {
        let meta = MessageMeta {
            topic,
            priority,
            size,
            metadata: None,
        };
        match self.policies.check_send(from, None, meta) {
            Ok(_) => PolicyDecision::Allow,
            Err(e) => PolicyDecision::Deny(e.to_string()),
        }
    }

    fn check(&self, ctx: &DeliveryContext<'_>) -> PolicyDecision {
        let meta = MessageMeta {
            topic: ctx.topic,
            priority: ctx.priority,
            size: ctx.size,
            metadata: None,
        };
        let to = match ctx.kind {
            MessageKind::Topic => None,
            _ => Some(ctx.to),
        };
        let result = self
            .policies
            .check_send(ctx.from, to, meta)
            .and_then(|_| self.policies.check_receive(ctx.to, ctx.from, meta));
        match result {
            Ok(_) => PolicyDecision::Allow,
            Err(e) => PolicyDecision::Deny(e.to_string()),
        }
    }
}
