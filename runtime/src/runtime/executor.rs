//! How tasks run: [`RuntimeExecutor`] implements the scheduler's `TaskExecutor` with real
//! sandboxes. A persistent agent's running program receives each task as a `task` frame and
//! answers with a `task_result` frame; an ephemeral, scheduled or event-driven agent gets a
//! fresh sandbox per execution. Cancelling (timeout, cancel, shutdown) kills the execution
//! for real: the per-task sandbox is killed and destroyed, and a persistent program that
//! is still busy with the task is restarted.
//!
//! The per-agent mailbox dispatcher turns messages on a definition's `on message` topics
//! into handler tasks (queued through the scheduler, so priorities, the concurrency cap,
//! timeouts and retries apply) and hands other messages to a persistent program as
//! `deliver` frames. A handler's output is routed as its definition says (`reply` to the
//! sender, `send` publishes on a topic).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use symbiont_agent::protocol::HandlerCall;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::agents::{
    is_persistent, spawn_events, spawn_stderr, spec_for, AgentEntry, PendingTask, Recovery,
    TaskReply,
};
use super::{Inner, Link, Runtime};
use crate::communication::bridge::{spawn_bridge, BridgeConfig, BridgeSender};
use crate::communication::{Message, MessageKind, ReceivedMessage};
use crate::dsl::{Handler, HandlerOutput, Trigger};
use crate::error::RuntimeError;
use crate::error_handler::RecoveryActions;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType};
use crate::sandbox::Sandbox;
use crate::scheduler::{
    CancelReason, ScheduleReceipt, ScheduledTask, SchedulerError, TaskContext, TaskExecutor,
    TaskOptions, TaskOutput,
};
use crate::types::{AgentId, AgentState, MessageId, TaskId};

/// The input of every task frame (JSON): which handler runs, why, and its payload.
/// Documented in `docs/protocol.md` ("task input").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInput {
    /// Handler name (`task` for tasks submitted through the API).
    pub handler: String,
    /// `task`, `start`, `message` or `schedule`.
    pub kind: String,
    /// The message's topic (message handlers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The message's sender (message handlers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AgentId>,
    /// The message's id (message handlers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
    /// The payload (base64).
    #[serde(with = "super::agents::b64", default)]
    pub payload: Vec<u8>,
}

impl TaskInput {
    /// Input of a task submitted through the API.
    pub fn task(payload: Vec<u8>) -> Self {
        TaskInput {
            handler: "task".into(),
            kind: "task".into(),
            topic: None,
            from: None,
            message_id: None,
            payload,
        }
    }

    /// Input of a `start` or `schedule` handler run.
    pub fn handler(name: &str, kind: &str) -> Self {
        TaskInput {
            handler: name.into(),
            kind: kind.into(),
            topic: None,
            from: None,
            message_id: None,
            payload: Vec::new(),
        }
    }

    /// Input of a message handler run.
    pub fn message(name: &str, m: &ReceivedMessage) -> Self {
        TaskInput {
            handler: name.into(),
            kind: "message".into(),
            topic: Some(m.message.topic.clone()),
            from: Some(m.message.from),
            message_id: Some(m.message.id),
            payload: m.message.payload.clone(),
        }
    }

    /// The JSON bytes carried in the task frame.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The handler description carried in the task frame (`None` for API tasks).
    pub fn call(&self) -> Option<HandlerCall> {
        (self.kind != "task").then(|| HandlerCall {
            name: self.handler.clone(),
            trigger: self.kind.clone(),
            topic: self.topic.clone(),
            from: self.from.map(|id| id.to_string()),
            message_id: self.message_id.map(|id| id.to_string()),
        })
    }

    /// Reads the JSON bytes back (anything else is a plain `task` payload).
    pub fn decode(bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes).unwrap_or_else(|_| TaskInput::task(bytes.to_vec()))
    }
}

/// Queues a handler run through the scheduler.
pub(crate) async fn schedule_handler(
    runtime: &Runtime,
    agent_id: AgentId,
    handler: &Handler,
    input: TaskInput,
    request: Option<ReceivedMessage>,
) -> Result<ScheduleReceipt, RuntimeError> {
    let inner = &runtime.inner;
    let agent = inner.lifecycle.get_agent(agent_id)?;
    let timeout = handler
        .timeout
        .unwrap_or(inner.config.scheduler.task_timeout)
        .min(agent.config.resource_limits.execution_timeout);
    let priority = request
        .as_ref()
        .map(|m| m.message.priority)
        .unwrap_or(agent.config.priority);
    let task = ScheduledTask {
        id: TaskId::new(),
        agent_id,
        priority,
        scheduled_time: SystemTime::now(),
        timeout,
        retry_count: 0,
    };
    let task_id = task.id;
    // A message is handled once even if it is delivered again after a crash.
    let idempotency_key = input
        .message_id
        .map(|id| format!("message:{id}:{}", handler.name));
    if let Some(request) = request {
        if let Some(entry) = inner.agents.read().get(&agent_id) {
            entry.requests.lock().insert(task_id, request);
        }
    }
    let receipt = inner
        .scheduler
        .schedule_task_with(
            task,
            TaskOptions {
                payload: input.encode(),
                idempotency_key,
                target: None,
            },
        )
        .await?;
    Ok(receipt)
}

/// Consumes an agent's mailbox: handler topics become tasks, other messages go to the
/// persistent program, or to the dead letters when nobody can take them.
pub(crate) fn spawn_dispatcher(weak: Weak<Inner>, agent_id: AgentId) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let bus = match weak.upgrade() {
                Some(inner) => inner.bus.clone(),
                None => return,
            };
            let batch = match bus.receive_batch(agent_id, 64).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::debug!(%agent_id, error = %e, "dispatcher stopped");
                    return;
                }
            };
            let Some(inner) = weak.upgrade() else { return };
            let entry = inner.agents.read().get(&agent_id).cloned();
            let Some(entry) = entry else { return };
            let runtime = Runtime::from_inner(inner.clone());
            for m in batch {
                dispatch_one(&runtime, &entry, agent_id, m).await;
            }
        }
    })
}

async fn dispatch_one(
    runtime: &Runtime,
    entry: &AgentEntry,
    agent_id: AgentId,
    m: ReceivedMessage,
) {
    let inner = &runtime.inner;
    inner.resources.record_activity(agent_id);
    let handler = entry.compiled().and_then(|c| {
        c.handlers
            .iter()
            .find(|h| matches!(&h.trigger, Trigger::Message { topic } if *topic == m.message.topic))
            .cloned()
    });
    // Replies to this agent's own requests are answers, not work.
    let is_reply = m.kind == MessageKind::Reply;
    if let (Some(handler), false) = (handler, is_reply) {
        let input = TaskInput::message(&handler.name, &m);
        let request = (m.kind == MessageKind::Request).then(|| m.clone());
        if let Err(e) = schedule_handler(runtime, agent_id, &handler, input, request).await {
            tracing::warn!(%agent_id, handler = %handler.name, error = %e, "message handler not queued");
            inner.bus.dead_letter_undelivered(&m);
        }
        return;
    }
    let bridge = entry.bridge.lock().clone();
    match bridge {
        Some(bridge) => {
            if let Err(e) = bridge.deliver_message(m.clone()).await {
                tracing::debug!(%agent_id, error = %e, "program gone; message dead-lettered");
                inner.bus.dead_letter_undelivered(&m);
            }
        }
        None => inner.bus.dead_letter_undelivered(&m),
    }
}

/// The scheduler's executor backed by the sandbox tiers.
pub(crate) struct RuntimeExecutor(pub(crate) Link);

fn gone() -> RuntimeError {
    SchedulerError::ShutDown.into()
}

#[async_trait]
impl TaskExecutor for RuntimeExecutor {
    async fn execute(&self, ctx: &TaskContext) -> Result<TaskOutput, RuntimeError> {
        let inner = self.0.get().ok_or_else(gone)?;
        let agent = inner.lifecycle.get_agent(ctx.agent_id)?;
        let entry = inner
            .agents
            .read()
            .get(&ctx.agent_id)
            .cloned()
            .ok_or_else(|| {
                SchedulerError::SchedulingFailed(format!(
                    "agent {} has no runtime state",
                    ctx.agent_id
                ))
            })?;
        let input = TaskInput::decode(&ctx.payload);
        let compiled = entry.compiled();
        if input.kind != "task" {
            if let Some(compiled) = &compiled {
                let decision = compiled.policy.check_exec(&input.handler);
                if let Err(e) = decision {
                    inner.audit.submit(
                        AuditEvent::new(
                            AuditEventType::PolicyDecision,
                            Some(ctx.agent_id),
                            format!("exec of handler `{}` denied: {e}", input.handler),
                        )
                        .with("decision", "deny")
                        .with("task_id", ctx.task_id.to_string()),
                    );
                    return Err(e.into());
                }
            }
        }
        inner.resources.record_activity(ctx.agent_id);
        let persistent = is_persistent(&agent);
        if entry.running.fetch_add(1, Ordering::SeqCst) == 0 && !persistent {
            let _ =
                inner
                    .lifecycle
                    .transition(ctx.agent_id, AgentState::Running, "executing a task");
        }
        let result = if persistent {
            run_in_program(&inner, &entry, ctx, &input).await
        } else {
            run_in_fresh_sandbox(&inner, &entry, ctx, &input).await
        };
        finish_execution(&inner, &entry, ctx.agent_id, persistent);
        let outputs = result?;
        let request = entry.requests.lock().remove(&ctx.task_id);
        if let Some(handler) = compiled.as_ref().and_then(|c| c.handler(&input.handler)) {
            for output in &outputs {
                route_output(
                    &inner,
                    ctx,
                    agent.config.priority,
                    handler,
                    &input,
                    request.as_ref(),
                    output,
                )
                .await?;
            }
        }
        Ok(TaskOutput {
            data: outputs.into_iter().last().unwrap_or_default(),
        })
    }

    async fn cancel(&self, ctx: &TaskContext, reason: CancelReason) -> Result<(), RuntimeError> {
        let Some(inner) = self.0.get() else {
            return Ok(());
        };
        let Some(entry) = inner.agents.read().get(&ctx.agent_id).cloned() else {
            return Ok(());
        };
        entry.requests.lock().remove(&ctx.task_id);
        let sandbox = entry.task_sandboxes.lock().remove(&ctx.task_id);
        if let Some(sandbox) = sandbox {
            // A per-task sandbox: kill it and everything in it.
            let _ = sandbox.kill().await;
            sandbox.destroy().await?;
            finish_execution(&inner, &entry, ctx.agent_id, false);
            return Ok(());
        }
        let waiting = entry
            .pending
            .lock()
            .remove(&ctx.task_id.to_string())
            .is_some();
        if waiting && reason != CancelReason::Shutdown {
            // The persistent program is still busy with it: the only way to stop that
            // execution for real is to restart the program.
            let why = format!(
                "task {} {:?}: program restarted to stop it",
                ctx.task_id, reason
            );
            entry.push_log("runtime", why.clone());
            if inner
                .lifecycle
                .fail_agent(ctx.agent_id, why.clone())
                .is_ok()
            {
                Recovery(self.0.clone()).restart(ctx.agent_id, &why).await?;
            }
        }
        Ok(())
    }
}

fn finish_execution(inner: &Inner, entry: &AgentEntry, agent_id: AgentId, persistent: bool) {
    let before = entry.running.fetch_sub(1, Ordering::SeqCst);
    if before == 1 && !persistent {
        let _ = inner
            .lifecycle
            .transition(agent_id, AgentState::Ready, "task finished");
    }
}

async fn run_in_program(
    inner: &Inner,
    entry: &AgentEntry,
    ctx: &TaskContext,
    input: &TaskInput,
) -> Result<Vec<Vec<u8>>, RuntimeError> {
    let (tx, rx) = oneshot::channel();
    let key = ctx.task_id.to_string();
    let mut tx = Some(tx);
    let deadline = tokio::time::Instant::now() + ctx.timeout;
    let bridge = loop {
        {
            // Under the slot's lock: when the program's output ends, the slot is emptied
            // and the pending tasks cleared under it, so the task is either refused here or
            // woken.
            let slot = entry.bridge.lock();
            if let Some(bridge) = slot.clone() {
                if let Some(tx) = tx.take() {
                    entry
                        .pending
                        .lock()
                        .insert(key.clone(), PendingTask::new(tx));
                }
                break bridge;
            }
        }
        // No program right now. While the agent is being (re)started (its sandbox booting:
        // seconds for a microVM), the task waits for it instead of failing attempt after
        // attempt (regression test: cross_tier.rs `killing_a_microvm_agents_vm_...`).
        // Otherwise a program that died is restarted by its exit handler and the task is
        // retried on it.
        let starting = matches!(
            inner.lifecycle.get_state(ctx.agent_id),
            Ok(AgentState::Created
                | AgentState::Initializing
                | AgentState::Ready
                | AgentState::Running
                | AgentState::Waiting)
        );
        if !starting || tokio::time::Instant::now() >= deadline {
            return Err(SchedulerError::Interrupted {
                agent: ctx.agent_id,
                reason: "its program is not running (being restarted)".into(),
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Err(e) = deliver(&bridge, ctx, input).await {
        entry.pending.lock().remove(&key);
        return Err(e.into());
    }
    let reply = rx.await.map_err(|_| SchedulerError::Interrupted {
        agent: ctx.agent_id,
        reason: "its program stopped before answering".into(),
    })?;
    reply_result(ctx, reply)
}

/// The outputs of a successful run (the `output` frames, then the result's own output when
/// not empty), or the failure the program reported.
fn reply_result(ctx: &TaskContext, reply: TaskReply) -> Result<Vec<Vec<u8>>, RuntimeError> {
    if reply.ok {
        let mut outputs = reply.outputs;
        if !reply.output.is_empty() {
            outputs.push(reply.output);
        }
        Ok(outputs)
    } else {
        Err(SchedulerError::ExecutionFailed {
            task: ctx.task_id,
            reason: reply
                .error
                .unwrap_or_else(|| "the program reported a failure".into()),
        }
        .into())
    }
}

async fn deliver(
    bridge: &BridgeSender,
    ctx: &TaskContext,
    input: &TaskInput,
) -> Result<(), crate::communication::CommunicationError> {
    match input.call() {
        Some(call) => {
            bridge
                .deliver_handler_task(ctx.task_id, call, input.payload.clone(), ctx.timeout)
                .await
        }
        None => {
            bridge
                .deliver_task(ctx.task_id, input.payload.clone(), ctx.timeout)
                .await
        }
    }
}

async fn run_in_fresh_sandbox(
    inner: &Inner,
    entry: &AgentEntry,
    ctx: &TaskContext,
    input: &TaskInput,
) -> Result<Vec<Vec<u8>>, RuntimeError> {
    let (tier, mut spec) = spec_for(inner, ctx.agent_id)?;
    spec.timeout = Some(ctx.timeout + Duration::from_secs(1));
    let backend = inner.registry.backend(tier)?;
    let sandbox: Arc<dyn Sandbox> = backend.create(spec).await?;
    entry
        .task_sandboxes
        .lock()
        .insert(ctx.task_id, sandbox.clone());
    let result = drive_fresh_sandbox(inner, entry, ctx, input, &sandbox).await;
    entry.task_sandboxes.lock().remove(&ctx.task_id);
    if let Err(e) = sandbox.destroy().await {
        tracing::warn!(sandbox = sandbox.id(), error = %e, "destroying a task sandbox failed");
    }
    result
}

async fn drive_fresh_sandbox(
    inner: &Inner,
    entry: &AgentEntry,
    ctx: &TaskContext,
    input: &TaskInput,
    sandbox: &Arc<dyn Sandbox>,
) -> Result<Vec<Vec<u8>>, RuntimeError> {
    let stdio = sandbox.start().await?;
    *entry.sandbox_id.lock() = Some(sandbox.id().to_string());
    let _ = inner
        .resources
        .register_sandbox(ctx.agent_id, sandbox.clone());
    inner.resources.restart_execution_clock(ctx.agent_id);
    let logs = entry.log_buffer();
    spawn_stderr(logs.clone(), ctx.agent_id, stdio.stderr);
    let handle = spawn_bridge(
        inner.bus.clone(),
        ctx.agent_id,
        stdio.stdout,
        stdio.stdin,
        BridgeConfig {
            consume_mailbox: false,
            ..Default::default()
        },
    )?;
    let sender = handle.sender();
    let pending = Arc::new(parking_lot::Mutex::new(std::collections::HashMap::new()));
    let (tx, rx) = oneshot::channel();
    pending
        .lock()
        .insert(ctx.task_id.to_string(), PendingTask::new(tx));
    spawn_events(handle, logs, pending, ctx.agent_id, None);
    deliver(&sender, ctx, input).await?;
    let outcome = tokio::select! {
        reply = rx => Ok(reply),
        exit = sandbox.wait() => Err(exit),
    };
    match outcome {
        Ok(Ok(reply)) => {
            // The program answered: end it (it may serve more frames; it gets a grace).
            drop(sender);
            let _ = sandbox.stop(Duration::from_secs(2)).await;
            reply_result(ctx, reply)
        }
        Ok(Err(_)) | Err(_) => {
            let exit = sandbox.wait().await?;
            if exit.is_resource_violation() {
                Err(crate::resource::ResourceError::LimitExceeded {
                    agent: ctx.agent_id,
                    detail: format!("{:?} after {:?}", exit.reason, exit.duration),
                }
                .into())
            } else {
                Err(SchedulerError::AgentCrashed {
                    agent: ctx.agent_id,
                    reason: format!(
                        "program ended before answering ({:?}, code {:?}, signal {:?})",
                        exit.reason, exit.code, exit.signal
                    ),
                }
                .into())
            }
        }
    }
}

async fn route_output(
    inner: &Inner,
    ctx: &TaskContext,
    priority: crate::types::Priority,
    handler: &Handler,
    input: &TaskInput,
    request: Option<&ReceivedMessage>,
    output: &[u8],
) -> Result<(), RuntimeError> {
    match &handler.output {
        HandlerOutput::None => Ok(()),
        HandlerOutput::Publish { topic } => {
            inner
                .bus
                .publish(Message {
                    id: MessageId::new(),
                    from: ctx.agent_id,
                    to: AgentId(uuid::Uuid::nil()),
                    topic: topic.clone(),
                    payload: output.to_vec(),
                    priority,
                    ttl: inner.config.communication.default_ttl,
                })
                .await?;
            Ok(())
        }
        HandlerOutput::Reply { topic } => {
            if let Some(request) = request.filter(|r| r.kind == MessageKind::Request) {
                inner
                    .bus
                    .reply_on(request, topic.clone(), output.to_vec())
                    .await?;
                return Ok(());
            }
            let Some(to) = input.from else {
                return Ok(());
            };
            inner
                .bus
                .send_message(Message {
                    id: MessageId::new(),
                    from: ctx.agent_id,
                    to,
                    topic: topic.clone(),
                    payload: output.to_vec(),
                    priority,
                    ttl: inner.config.communication.default_ttl,
                })
                .await?;
            Ok(())
        }
    }
}
