//! Per-agent runtime state and the adapters through which the components act on agents:
//! the lifecycle driver ([`Ops`]), the sandbox spec source ([`Specs`]), the program's stdio
//! ([`Stdio`]: the message bridge and log capture), unexpected exits ([`Exits`]: the error
//! handler), recovery actions ([`Recovery`]), live load for placement ([`Load`]), agent
//! persistence in the store and the cron loop of definition `on schedule` handlers.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::driver::{ExitHandler, SpecBuilder, StdioHandler};
use super::executor::{self, TaskInput};
use super::{Inner, Link, Runtime};
use crate::communication::bridge::{spawn_bridge, BridgeConfig, BridgeEvent, BridgeSender};
use crate::communication::ReceivedMessage;
use crate::dsl::{CompiledAgent, LoadOptions, Trigger};
use crate::error::RuntimeError;
use crate::error_handler::RecoveryActions;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType};
use crate::lifecycle::{AgentDriver, HealthStatus};
use crate::resource::ResourceUsage;
use crate::sandbox::{Sandbox, SandboxError, SandboxExit, SandboxSpec, SandboxStdio};
use crate::scheduler::{AgentLoad, LoadSource, SchedulerError};
use crate::storage::{decode_json, encode_json, StorageError, Store};
use crate::types::{
    AgentId, AgentInstance, AgentState, Capability, ExecutionMode, SecurityTier, TaskId,
};

/// Store table of agent records.
const AGENTS_TABLE: &str = "agents";
/// Store table of runtime identities.
const IDENTITY_TABLE: &str = "runtime";
/// Log lines kept per agent.
const LOG_LINES: usize = 1000;

/// One line an agent's program wrote to stderr or logged through the frame protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the runtime read it.
    pub at: SystemTime,
    /// `stderr`, or the level of a `log` frame.
    pub stream: String,
    /// The text.
    pub line: String,
}

/// An agent as the API shows it: state, configuration summary, live usage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Id.
    pub id: AgentId,
    /// Name.
    pub name: String,
    /// State.
    pub state: AgentState,
    /// Execution mode (`persistent`, `ephemeral`, `scheduled`, `event-driven`).
    pub mode: String,
    /// Requested tier.
    pub tier: SecurityTier,
    /// Effective tier (after merging the definition).
    pub effective_tier: Option<SecurityTier>,
    /// Restarts made by recovery.
    pub restart_count: u32,
    /// Why it last failed.
    pub failure_reason: Option<String>,
    /// When it was created.
    pub created_at: SystemTime,
    /// When its state last changed.
    pub state_changed_at: SystemTime,
    /// Its handlers (`start`, `message:TOPIC`, `schedule:EXPR` or their names).
    pub handlers: Vec<String>,
    /// Its live sandbox, if it has one.
    pub sandbox_id: Option<String>,
    /// Live resource usage from the monitor.
    pub usage: Option<ResourceUsage>,
    /// Warnings of its tier on this host (e.g. "KVM unusable, using TCG").
    pub tier_warnings: Vec<String>,
    /// Notes of the definition merge (e.g. a limit capped by the configuration).
    pub notes: Vec<String>,
}

impl AgentStatus {
    pub(crate) fn new(
        agent: AgentInstance,
        usage: Option<ResourceUsage>,
        entry: Option<&AgentEntry>,
        tier_warnings: Vec<String>,
    ) -> Self {
        let compiled = entry.and_then(AgentEntry::compiled);
        AgentStatus {
            id: agent.id,
            name: agent.config.name.clone(),
            state: agent.state,
            mode: Runtime::mode_name(&agent.config.execution_mode).to_string(),
            tier: agent.config.security_tier,
            effective_tier: compiled.as_ref().map(|c| c.tier),
            restart_count: agent.restart_count,
            failure_reason: agent.failure_reason,
            created_at: agent.created_at,
            state_changed_at: agent.state_changed_at,
            handlers: compiled
                .as_ref()
                .map(|c| c.handlers.iter().map(|h| h.name.clone()).collect())
                .unwrap_or_default(),
            sandbox_id: entry.and_then(|e| e.sandbox_id.lock().clone()),
            usage,
            tier_warnings,
            notes: compiled.map(|c| c.notes.clone()).unwrap_or_default(),
        }
    }
}

/// What the store keeps per agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AgentRecord {
    pub(crate) instance: AgentInstance,
    /// Where `file ... from` paths of its definition are read.
    pub(crate) base_dir: Option<PathBuf>,
    /// Whether it should be running (restarted after a runtime restart).
    pub(crate) desired_running: bool,
}

/// A task result the program sent back, with the `output` frames that preceded it.
#[derive(Debug)]
pub(crate) struct TaskReply {
    pub(crate) ok: bool,
    pub(crate) output: Vec<u8>,
    pub(crate) error: Option<String>,
    pub(crate) outputs: Vec<Vec<u8>>,
}

/// A task delivered to a program, awaiting its result.
pub(crate) struct PendingTask {
    pub(crate) done: oneshot::Sender<TaskReply>,
    pub(crate) outputs: Vec<Vec<u8>>,
}

/// Tasks awaiting their results, by task id.
pub(crate) type PendingTasks = Arc<Mutex<HashMap<String, PendingTask>>>;

impl PendingTask {
    pub(crate) fn new(done: oneshot::Sender<TaskReply>) -> Self {
        PendingTask {
            done,
            outputs: Vec::new(),
        }
    }
}

/// The runtime's per-agent state.
pub(crate) struct AgentEntry {
    pub(crate) base_dir: Option<PathBuf>,
    compiled: RwLock<Option<Arc<CompiledAgent>>>,
    /// The persistent program's bridge.
    pub(crate) bridge: Mutex<Option<BridgeSender>>,
    /// Tasks delivered to the persistent program, awaiting their results.
    pub(crate) pending: PendingTasks,
    logs: Arc<Mutex<VecDeque<LogLine>>>,
    /// The mailbox consumer.
    pub(crate) dispatcher: Mutex<Option<JoinHandle<()>>>,
    /// Executions in flight (for state and least-connections).
    pub(crate) running: AtomicUsize,
    /// Sandboxes of in-flight ephemeral executions, to kill on cancel.
    pub(crate) task_sandboxes: Mutex<HashMap<TaskId, Arc<dyn Sandbox>>>,
    /// Requests being handled by a task, to reply to.
    pub(crate) requests: Mutex<HashMap<TaskId, ReceivedMessage>>,
    pub(crate) sandbox_id: Mutex<Option<String>>,
}

impl AgentEntry {
    pub(crate) fn new(base_dir: Option<PathBuf>) -> Self {
        AgentEntry {
            base_dir,
            compiled: RwLock::new(None),
            bridge: Mutex::new(None),
            pending: Arc::new(Mutex::new(HashMap::new())),
            logs: Arc::new(Mutex::new(VecDeque::new())),
            dispatcher: Mutex::new(None),
            running: AtomicUsize::new(0),
            task_sandboxes: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            sandbox_id: Mutex::new(None),
        }
    }

    pub(crate) fn compiled(&self) -> Option<Arc<CompiledAgent>> {
        self.compiled.read().clone()
    }

    pub(crate) fn logs(&self, tail: usize) -> Vec<LogLine> {
        let logs = self.logs.lock();
        logs.iter()
            .skip(logs.len().saturating_sub(tail))
            .cloned()
            .collect()
    }

    pub(crate) fn log_buffer(&self) -> Arc<Mutex<VecDeque<LogLine>>> {
        self.logs.clone()
    }

    pub(crate) fn push_log(&self, stream: &str, line: String) {
        push_log(&self.logs, stream, line);
    }
}

fn push_log(logs: &Mutex<VecDeque<LogLine>>, stream: &str, line: String) {
    let mut logs = logs.lock();
    if logs.len() >= LOG_LINES {
        logs.pop_front();
    }
    logs.push_back(LogLine {
        at: SystemTime::now(),
        stream: stream.to_string(),
        line,
    });
}

/// Serde helper: bytes as base64 text in JSON, or a plain string when given one.
pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

pub(crate) fn persist(inner: &Inner, record: &AgentRecord) -> Result<(), StorageError> {
    inner.store.put(
        AGENTS_TABLE,
        &record.instance.id.to_string(),
        &encode_json(record)?,
    )
}

pub(crate) fn unpersist(inner: &Inner, id: AgentId) -> Result<(), StorageError> {
    inner.store.delete(AGENTS_TABLE, &id.to_string())?;
    Ok(())
}

fn load_record(store: &dyn Store, id: AgentId) -> Result<Option<AgentRecord>, StorageError> {
    let key = id.to_string();
    store
        .get(AGENTS_TABLE, &key)?
        .map(|bytes| decode_json(AGENTS_TABLE, &key, &bytes))
        .transpose()
}

pub(crate) fn load_all(store: &dyn Store) -> Result<Vec<AgentRecord>, StorageError> {
    store
        .scan(AGENTS_TABLE)?
        .into_iter()
        .map(|(key, bytes)| decode_json(AGENTS_TABLE, &key, &bytes))
        .collect()
}

pub(crate) fn set_desired(inner: &Inner, id: AgentId, running: bool) -> Result<(), RuntimeError> {
    inner.lifecycle.get_state(id)?;
    if let Some(mut record) = load_record(&*inner.store, id)? {
        if record.desired_running != running {
            record.desired_running = running;
            persist(inner, &record)?;
        }
    }
    Ok(())
}

/// The operator's stable identity (created once, kept in the store).
pub(crate) fn operator_id(store: &dyn Store) -> Result<AgentId, StorageError> {
    if let Some(bytes) = store.get(IDENTITY_TABLE, "operator")? {
        return decode_json(IDENTITY_TABLE, "operator", &bytes);
    }
    let id = AgentId::new();
    store.put(IDENTITY_TABLE, "operator", &encode_json(&id)?)?;
    Ok(id)
}

/// Keeps each agent's stored record in step with its state (off the transition hot path).
pub(crate) fn spawn_persistence(inner: &Arc<Inner>) -> JoinHandle<()> {
    let mut events = inner.lifecycle.subscribe();
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "persistence lagged; re-saving every agent");
                    let Some(inner) = weak.upgrade() else { return };
                    for agent in inner.lifecycle.list_agents() {
                        save_state(&inner, agent);
                    }
                    continue;
                }
                Err(_) => return,
            };
            let Some(inner) = weak.upgrade() else { return };
            if let Ok(agent) = inner.lifecycle.get_agent(event.agent_id) {
                save_state(&inner, agent);
            }
            inner.scheduler.notify_agent_changed();
        }
    })
}

fn save_state(inner: &Inner, agent: AgentInstance) {
    let result = (|| {
        let Some(mut record) = load_record(&*inner.store, agent.id)? else {
            return Ok(());
        };
        record.instance = agent;
        persist(inner, &record)
    })();
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot persist agent state");
    }
}

/// Fires the `on schedule` handlers of every live agent's definition (UTC cron).
pub(crate) fn spawn_cron(weak: Weak<Inner>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut next: HashMap<(AgentId, String), SystemTime> = HashMap::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            ticker.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let now = SystemTime::now();
            let agents: Vec<(AgentId, Arc<AgentEntry>)> = inner
                .agents
                .read()
                .iter()
                .map(|(id, e)| (*id, e.clone()))
                .collect();
            let mut live = std::collections::HashSet::new();
            for (id, entry) in agents {
                let Ok(state) = inner.lifecycle.get_state(id) else {
                    continue;
                };
                if !matches!(state, AgentState::Running | AgentState::Waiting) {
                    continue;
                }
                let Some(compiled) = entry.compiled() else {
                    continue;
                };
                for handler in &compiled.handlers {
                    let Trigger::Schedule(cron) = &handler.trigger else {
                        continue;
                    };
                    let key = (id, handler.name.clone());
                    live.insert(key.clone());
                    let due = *next
                        .entry(key.clone())
                        .or_insert_with(|| cron.next_after(now).unwrap_or(now));
                    if due <= now {
                        next.insert(key, cron.next_after(now).unwrap_or(now));
                        let runtime = Runtime::from_inner(inner.clone());
                        let input = TaskInput::handler(&handler.name, "schedule");
                        if let Err(e) =
                            executor::schedule_handler(&runtime, id, handler, input, None).await
                        {
                            tracing::warn!(%id, handler = %handler.name, error = %e, "scheduled handler not queued");
                        }
                    }
                }
            }
            next.retain(|k, _| live.contains(k));
        }
    })
}

fn entry_of(inner: &Inner, id: AgentId) -> Arc<AgentEntry> {
    if let Some(e) = inner.agents.read().get(&id) {
        return e.clone();
    }
    inner
        .agents
        .write()
        .entry(id)
        .or_insert_with(|| Arc::new(AgentEntry::new(None)))
        .clone()
}

fn gone() -> RuntimeError {
    RuntimeError::Sandbox(SandboxError::op("runtime", "the runtime is shutting down"))
}

/// Agents that run one long-lived program (the others get a sandbox per execution).
pub(crate) fn is_persistent(agent: &AgentInstance) -> bool {
    matches!(agent.config.execution_mode, ExecutionMode::Persistent)
}

/// The spec of a persistent agent's program: its compiled definition's, plus its identity.
pub(crate) fn spec_for(
    inner: &Inner,
    agent_id: AgentId,
) -> Result<(SecurityTier, SandboxSpec), RuntimeError> {
    let entry = entry_of(inner, agent_id);
    let compiled = entry.compiled().ok_or_else(|| {
        RuntimeError::Sandbox(SandboxError::InvalidState {
            id: agent_id.to_string(),
            message: "the agent's definition is not compiled".into(),
        })
    })?;
    let mut spec = compiled.spec.clone();
    spec.agent_id = agent_id;
    spec.env
        .insert("SYMBIONT_AGENT_ID".into(), agent_id.to_string());
    Ok((compiled.tier, spec))
}

pub(crate) struct Specs(pub(crate) Link);

impl SpecBuilder for Specs {
    fn build(&self, agent: &AgentInstance) -> Result<(SecurityTier, SandboxSpec), RuntimeError> {
        let inner = self.0.get().ok_or_else(gone)?;
        spec_for(&inner, agent.id)
    }
}

/// Connects a started program to the bus (frames on stdin/stdout) and captures stderr.
pub(crate) struct Stdio(pub(crate) Link);

impl StdioHandler for Stdio {
    fn attach(&self, agent_id: AgentId, sandbox: Arc<dyn Sandbox>, stdio: SandboxStdio) {
        let Some(inner) = self.0.get() else { return };
        let entry = entry_of(&inner, agent_id);
        *entry.sandbox_id.lock() = Some(sandbox.id().to_string());
        spawn_stderr(entry.logs.clone(), agent_id, stdio.stderr);
        let bridge = spawn_bridge(
            inner.bus.clone(),
            agent_id,
            stdio.stdout,
            stdio.stdin,
            BridgeConfig {
                consume_mailbox: false,
                ..Default::default()
            },
        );
        match bridge {
            Ok(handle) => {
                *entry.bridge.lock() = Some(handle.sender());
                spawn_events(
                    handle,
                    entry.logs.clone(),
                    entry.pending.clone(),
                    agent_id,
                    Some(entry.clone()),
                );
            }
            Err(e) => tracing::error!(%agent_id, error = %e, "cannot bridge the agent to the bus"),
        }
        if let Err(e) = inner.resources.register_sandbox(agent_id, sandbox) {
            tracing::warn!(%agent_id, error = %e, "resource monitoring not started");
        }
    }
}

pub(crate) fn spawn_stderr(
    logs: Arc<Mutex<VecDeque<LogLine>>>,
    agent_id: AgentId,
    stderr: crate::sandbox::BoxedReader,
) {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(%agent_id, "agent stderr: {line}");
            push_log(&logs, "stderr", line);
        }
    });
}

/// Consumes a bridge's events: task results and outputs complete `pending`, logs are kept.
/// `program`: the agent whose persistent program this bridge serves; when its output ends,
/// the bridge leaves the agent's slot (if still there) together with the pending tasks, so a
/// task retried before the sandbox's exit is noticed is refused at once (SCHED_011) instead
/// of being written to a dead program and waiting for its timeout (regression test:
/// cross_tier.rs `killing_a_docker_agents_container_mid_task_...`).
pub(crate) fn spawn_events(
    mut handle: crate::communication::bridge::BridgeHandle,
    logs: Arc<Mutex<VecDeque<LogLine>>>,
    pending: PendingTasks,
    agent_id: AgentId,
    program: Option<Arc<AgentEntry>>,
) {
    let mine = handle.sender();
    tokio::spawn(async move {
        while let Some(event) = handle.next_event().await {
            match event {
                BridgeEvent::Output { task_id, payload } => {
                    if let Some(p) = pending.lock().get_mut(&task_id) {
                        p.outputs.push(payload);
                    }
                }
                BridgeEvent::TaskResult {
                    task_id,
                    ok,
                    output,
                    error,
                } => {
                    if let Some(p) = pending.lock().remove(&task_id) {
                        let _ = p.done.send(TaskReply {
                            ok,
                            output,
                            error,
                            outputs: p.outputs,
                        });
                    }
                }
                BridgeEvent::Log { level, message } => push_log(&logs, &level, message),
                BridgeEvent::AgentError { code, message, .. } => {
                    push_log(&logs, "error", format!("{code}: {message}"))
                }
                BridgeEvent::Heartbeat => {}
                BridgeEvent::Closed { error } => {
                    if let Some(e) = error {
                        push_log(&logs, "error", format!("bridge closed: {e}"));
                    }
                    // Whoever still waits learns the program is gone. Under the slot's
                    // lock: `run_in_program` registers a task under it too.
                    let mut slot = program.as_ref().map(|entry| entry.bridge.lock());
                    if let Some(slot) = slot.as_mut() {
                        if slot.as_ref().is_some_and(|s| s.same_bridge(&mine)) {
                            **slot = None;
                        }
                    }
                    pending.lock().clear();
                    drop(slot);
                    tracing::debug!(%agent_id, "agent output closed");
                    break;
                }
            }
        }
        handle.shutdown();
    });
}

/// A program that ended without being asked to: the error handler decides what happens.
pub(crate) struct Exits(pub(crate) Link);

impl ExitHandler for Exits {
    fn exited(&self, agent_id: AgentId, exit: SandboxExit) {
        let Some(inner) = self.0.get() else { return };
        let error: RuntimeError = if exit.is_resource_violation() {
            crate::resource::ResourceError::LimitExceeded {
                agent: agent_id,
                detail: format!("{:?} after {:?}", exit.reason, exit.duration),
            }
            .into()
        } else {
            SchedulerError::AgentCrashed {
                agent: agent_id,
                reason: format!(
                    "program ended ({:?}, code {:?}, signal {:?})",
                    exit.reason, exit.code, exit.signal
                ),
            }
            .into()
        };
        if let Some(entry) = inner.agents.read().get(&agent_id) {
            entry.push_log("runtime", format!("program ended: {error}"));
            *entry.bridge.lock() = None;
        }
        tokio::spawn(async move {
            if let Err(e) = inner.recovery.handle(agent_id, &error).await {
                tracing::warn!(%agent_id, error = %e, "recovery after exit failed");
            }
        });
    }
}

/// The lifecycle driver: definition, policy, admission, sandbox, bridge, handlers.
pub(crate) struct Ops(pub(crate) Link);

impl Ops {
    fn inner(&self) -> Result<Arc<Inner>, RuntimeError> {
        self.0.get().ok_or_else(gone)
    }
}

#[async_trait]
impl AgentDriver for Ops {
    async fn initialize(&self, agent: &AgentInstance) -> Result<(), RuntimeError> {
        let inner = self.inner()?;
        let entry = entry_of(&inner, agent.id);
        let compiled = crate::dsl::compile(
            &agent.config,
            &LoadOptions {
                base_dir: entry.base_dir.clone(),
                ..Default::default()
            },
        )?;
        compiled.policy.check_resources(&compiled.spec.limits)?;
        inner
            .policies
            .register(agent.id, agent.config.name.clone(), compiled.policy.clone());
        let backend = inner.registry.backend(compiled.tier)?;
        inner
            .resources
            .admit(agent.id, compiled.spec.limits.clone(), &*backend)
            .await?;
        // Messaging: granted, or implied by message handlers and handler outputs.
        let mut caps = compiled.spec.capabilities.clone();
        let talks = compiled.handlers.iter().any(|h| {
            matches!(h.trigger, Trigger::Message { .. })
                || !matches!(h.output, crate::dsl::HandlerOutput::None)
        });
        if talks && !caps.contains(&Capability::Messaging) {
            caps.push(Capability::Messaging);
        }
        inner.bus.register_agent(agent.id, caps).await?;
        for topic in compiled.topics() {
            inner.bus.subscribe(agent.id, topic.to_string()).await?;
        }
        *entry.compiled.write() = Some(Arc::new(compiled));
        {
            let mut dispatcher = entry.dispatcher.lock();
            if dispatcher.as_ref().is_none_or(|d| d.is_finished()) {
                *dispatcher = Some(executor::spawn_dispatcher(Arc::downgrade(&inner), agent.id));
            }
        }
        if is_persistent(agent) {
            inner.driver.initialize(agent).await?;
        }
        Ok(())
    }

    async fn start(&self, agent: &AgentInstance) -> Result<(), RuntimeError> {
        let inner = self.inner()?;
        if is_persistent(agent) {
            inner.driver.start(agent).await?;
        }
        let Some(compiled) = entry_of(&inner, agent.id).compiled() else {
            return Ok(());
        };
        let runtime = Runtime::from_inner(inner.clone());
        for handler in compiled
            .handlers
            .iter()
            .filter(|h| matches!(h.trigger, Trigger::Start))
        {
            // Queued now; dispatched once the agent is Running (right after this returns).
            executor::schedule_handler(
                &runtime,
                agent.id,
                handler,
                TaskInput::handler(&handler.name, "start"),
                None,
            )
            .await?;
        }
        Ok(())
    }

    async fn suspend(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let inner = self.inner()?;
        if inner.driver.sandbox(agent_id).is_some() {
            inner.driver.suspend(agent_id).await?;
        }
        for sandbox in entry_of(&inner, agent_id).task_sandboxes.lock().values() {
            let sandbox = sandbox.clone();
            tokio::spawn(async move { sandbox.pause().await });
        }
        Ok(())
    }

    async fn resume(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let inner = self.inner()?;
        if inner.driver.sandbox(agent_id).is_some() {
            inner.driver.resume(agent_id).await?;
        }
        for sandbox in entry_of(&inner, agent_id).task_sandboxes.lock().values() {
            let sandbox = sandbox.clone();
            tokio::spawn(async move { sandbox.resume().await });
        }
        Ok(())
    }

    async fn terminate(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let inner = self.inner()?;
        let result = inner.driver.terminate(agent_id).await;
        release(&inner, agent_id).await;
        result
    }

    async fn force_kill(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let inner = self.inner()?;
        let result = inner.driver.force_kill(agent_id).await;
        release(&inner, agent_id).await;
        result
    }

    async fn health_check(&self, agent_id: AgentId) -> HealthStatus {
        match self.0.get() {
            Some(inner) => inner.driver.health_check(agent_id).await,
            None => HealthStatus::Healthy,
        }
    }
}

/// After a stop: kill in-flight executions, stop consuming the mailbox, give resources back.
async fn release(inner: &Inner, agent_id: AgentId) {
    let entry = entry_of(inner, agent_id);
    *entry.bridge.lock() = None;
    entry.pending.lock().clear();
    if let Some(d) = entry.dispatcher.lock().take() {
        d.abort();
    }
    let sandboxes: Vec<_> = entry
        .task_sandboxes
        .lock()
        .drain()
        .map(|(_, s)| s)
        .collect();
    for sandbox in sandboxes {
        let _ = sandbox.kill().await;
        let _ = sandbox.destroy().await;
    }
    inner.resources.unregister(agent_id);
    if let Err(e) = inner.resources.deallocate_resources(agent_id).await {
        tracing::debug!(%agent_id, error = %e, "nothing to deallocate");
    }
}

/// Recovery actions for the error handler: through the lifecycle controller, and a restarted
/// persistent agent is started again.
pub(crate) struct Recovery(pub(crate) Link);

#[async_trait]
impl RecoveryActions for Recovery {
    async fn fail(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError> {
        let inner = self.0.get().ok_or_else(gone)?;
        RecoveryActions::fail(&inner.lifecycle, agent, reason).await
    }

    async fn restart(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError> {
        let inner = self.0.get().ok_or_else(gone)?;
        RecoveryActions::restart(&inner.lifecycle, agent, reason).await?;
        let desired = load_record(&*inner.store, agent)?
            .map(|r| r.desired_running)
            .unwrap_or(true);
        if desired && inner.lifecycle.get_state(agent)? == AgentState::Ready {
            inner.lifecycle.start_agent(agent).await?;
        }
        inner.audit.submit(AuditEvent::new(
            AuditEventType::RecoveryAction,
            Some(agent),
            format!("restarted: {reason}"),
        ));
        Ok(())
    }

    async fn suspend(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError> {
        let inner = self.0.get().ok_or_else(gone)?;
        RecoveryActions::suspend(&inner.lifecycle, agent, reason).await
    }

    async fn terminate(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError> {
        let inner = self.0.get().ok_or_else(gone)?;
        // Given up on: not restarted by the next start of the runtime either.
        set_desired(&inner, agent, false)?;
        RecoveryActions::terminate(&inner.lifecycle, agent, reason).await
    }
}

/// Live load for resource-based placement, from the resource monitor's samples.
pub(crate) struct Load(pub(crate) Link);

impl LoadSource for Load {
    fn load(&self, agent: AgentId) -> Option<AgentLoad> {
        let inner = self.0.get()?;
        let usage = inner.resources.usage(agent)?;
        let limits = &usage.limits;
        Some(AgentLoad {
            cpu: if limits.cpu_cores > 0.0 {
                usage.cpu_cores / limits.cpu_cores
            } else {
                0.0
            },
            memory: if limits.memory_mb > 0 {
                usage.memory_bytes as f64 / limits.memory_bytes() as f64
            } else {
                0.0
            },
        })
    }
}
