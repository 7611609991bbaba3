//! Carrying out [`ErrorAction`]s: the [`RecoveryActions`] seam (implemented for the
//! lifecycle controller, whose driver acts on the sandboxes), the [`RecoveryExecutor`]
//! (honours the circuit breaker, sleeps retry backoffs, audits what it did) and the
//! [`RecoveryPolicy`] that plugs the error handler into the scheduler's retries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{DefaultErrorHandler, ErrorAction, ErrorHandlerError};
use crate::error::RuntimeError;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType};
use crate::lifecycle::DefaultLifecycleController;
use crate::scheduler::{FailurePolicy, RetryDecision, TaskContext};
use crate::types::{AgentId, AgentState};

/// What recovery does to an agent. The runtime's implementation acts on the agent's
/// sandbox; the one for [`DefaultLifecycleController`] goes through its driver.
#[async_trait]
pub trait RecoveryActions: Send + Sync + 'static {
    /// Marks the agent Failed with `reason` (without restarting it): nothing is dispatched
    /// to it until it is restarted. Updates the reason when it is Failed already.
    async fn fail(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError>;
    /// Restarts the agent in a fresh sandbox (Failed → Initializing → Ready).
    async fn restart(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError>;
    /// Freezes the agent.
    async fn suspend(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError>;
    /// Terminates the agent and releases its sandbox.
    async fn terminate(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError>;
}

#[async_trait]
impl RecoveryActions for DefaultLifecycleController {
    async fn fail(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError> {
        match self.get_state(agent)? {
            AgentState::Failed => self.set_failure_reason(agent, reason)?,
            AgentState::Terminating | AgentState::Terminated => {}
            // A plain transition: the controller's own auto-restart is not triggered, the
            // error handler decides about restarts.
            _ => {
                self.transition(agent, AgentState::Failed, reason)?;
            }
        }
        Ok(())
    }

    async fn restart(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError> {
        if self.get_state(agent)? != AgentState::Failed {
            RecoveryActions::fail(self, agent, reason).await?;
        }
        self.restart_agent(agent).await?;
        Ok(())
    }

    async fn suspend(&self, agent: AgentId, reason: &str) -> Result<(), RuntimeError> {
        if self.get_state(agent)? == AgentState::Suspended {
            return Ok(());
        }
        self.suspend_agent(agent, reason.to_string()).await?;
        Ok(())
    }

    async fn terminate(&self, agent: AgentId, _reason: &str) -> Result<(), RuntimeError> {
        if matches!(
            self.get_state(agent)?,
            AgentState::Terminating | AgentState::Terminated
        ) {
            return Ok(());
        }
        self.terminate_agent(agent).await?;
        Ok(())
    }
}

/// What the executor did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryOutcome {
    /// The retry may go ahead now; `waited` was slept (backoff, or the open breaker).
    Retry {
        /// Time slept before returning.
        waited: Duration,
    },
    /// The agent was restarted.
    Restarted,
    /// The agent was suspended.
    Suspended,
    /// The agent was terminated.
    Terminated,
    /// The agent was left Failed with this reason.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Performs [`ErrorAction`]s through [`RecoveryActions`]. Cheap to clone.
#[derive(Clone)]
pub struct RecoveryExecutor {
    handler: DefaultErrorHandler,
    actions: Arc<dyn RecoveryActions>,
}

impl std::fmt::Debug for RecoveryExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryExecutor")
            .field("handler", &self.handler)
            .finish()
    }
}

impl RecoveryExecutor {
    /// An executor deciding with `handler` and acting through `actions`.
    pub fn new(handler: DefaultErrorHandler, actions: Arc<dyn RecoveryActions>) -> Self {
        Self { handler, actions }
    }

    /// The error handler.
    pub fn handler(&self) -> &DefaultErrorHandler {
        &self.handler
    }

    /// Decides about `error` and carries the action out.
    pub async fn handle(
        &self,
        agent: AgentId,
        error: &RuntimeError,
    ) -> Result<RecoveryOutcome, ErrorHandlerError> {
        let action = self.handler.decide(agent, error);
        self.execute(agent, &action, &format!("{}: {error}", error.code()))
            .await
    }

    /// Carries `action` out for `agent` (`cause`: the error, for reasons and audit). Waits
    /// while the agent's breaker is open; for `Retry`, sleeps the backoff. A failed
    /// `Restart` leaves the agent Failed and returns RECOVERY_002.
    pub async fn execute(
        &self,
        agent: AgentId,
        action: &ErrorAction,
        cause: &str,
    ) -> Result<RecoveryOutcome, ErrorHandlerError> {
        let outcome = match action {
            ErrorAction::Retry { backoff, .. } => {
                let breaker = self.handler.admission(agent).unwrap_or_default();
                let waited = (*backoff).max(breaker);
                tokio::time::sleep(waited).await;
                // The retry is the probe when the breaker was open.
                let _ = self.handler.admission(agent);
                Ok(RecoveryOutcome::Retry { waited })
            }
            ErrorAction::Restart => {
                self.contain(agent, action, cause).await;
                self.finish_restart(agent, cause).await
            }
            ErrorAction::Suspend => self
                .act(agent, "suspend", self.actions.suspend(agent, cause))
                .await
                .map(|()| RecoveryOutcome::Suspended),
            ErrorAction::Terminate => self
                .act(agent, "terminate", self.actions.terminate(agent, cause))
                .await
                .map(|()| RecoveryOutcome::Terminated),
            ErrorAction::Escalate { reason } => self
                .act(agent, "fail", self.actions.fail(agent, reason))
                .await
                .map(|()| RecoveryOutcome::Failed {
                    reason: reason.clone(),
                }),
        };
        self.audit_outcome(agent, action, &outcome);
        outcome
    }

    /// The immediate part of an action: for `Restart`, mark the agent Failed so that no more
    /// work reaches it while it waits for its breaker.
    async fn contain(&self, agent: AgentId, action: &ErrorAction, cause: &str) {
        if matches!(action, ErrorAction::Restart) {
            if let Err(e) = self.actions.fail(agent, cause).await {
                tracing::warn!(%agent, error = %e, "could not mark the agent Failed before its restart");
            }
        }
    }

    /// Waits for the breaker, then restarts; on failure leaves the agent Failed.
    async fn finish_restart(
        &self,
        agent: AgentId,
        cause: &str,
    ) -> Result<RecoveryOutcome, ErrorHandlerError> {
        self.wait_breaker(agent).await;
        match self.actions.restart(agent, cause).await {
            Ok(()) => Ok(RecoveryOutcome::Restarted),
            Err(e) => {
                let reason = format!("restart failed ({}: {e}); last error {cause}", e.code());
                if let Err(e2) = self.actions.fail(agent, &reason).await {
                    tracing::warn!(%agent, error = %e2, "could not mark the agent Failed");
                }
                Err(ErrorHandlerError::ActionFailed {
                    agent,
                    action: "restart",
                    reason,
                })
            }
        }
    }

    async fn wait_breaker(&self, agent: AgentId) {
        while let Some(wait) = self.handler.admission(agent) {
            tracing::info!(%agent, ?wait, "circuit open: recovery deferred");
            if let Some(audit) = self.handler.audit() {
                audit.submit(
                    AuditEvent::new(
                        AuditEventType::RecoveryAction,
                        Some(agent),
                        format!(
                            "circuit open: recovery deferred by {}",
                            humantime::format_duration(Duration::from_millis(
                                wait.as_millis() as u64
                            ))
                        ),
                    )
                    .with("decision", "defer")
                    .with("wait_ms", wait.as_millis().to_string()),
                );
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn act(
        &self,
        agent: AgentId,
        action: &'static str,
        fut: impl std::future::Future<Output = Result<(), RuntimeError>>,
    ) -> Result<(), ErrorHandlerError> {
        fut.await.map_err(|e| ErrorHandlerError::ActionFailed {
            agent,
            action,
            reason: format!("{}: {e}", e.code()),
        })
    }

    fn audit_outcome(
        &self,
        agent: AgentId,
        action: &ErrorAction,
        outcome: &Result<RecoveryOutcome, ErrorHandlerError>,
    ) {
        let Some(audit) = self.handler.audit() else {
            return;
        };
        let (details, result) = match outcome {
            Ok(o) => (
                format!("performed {}: {o:?}", action.name()),
                "ok".to_string(),
            ),
            Err(e) => (
                format!("{} failed: {e}", action.name()),
                e.code().to_string(),
            ),
        };
        audit.submit(
            AuditEvent::new(AuditEventType::RecoveryAction, Some(agent), details)
                .with("performed", action.name())
                .with("result", result),
        );
    }
}

/// The scheduler's [`FailurePolicy`] backed by the error handler: each failed execution is
/// classified; the agent is recovered (restarted after its breaker admits it, suspended,
/// terminated or left Failed) and the task is retried while `ScheduledTask::retry_count`
/// allows — after the backoff for a `Retry`, and once the agent is Ready again for a
/// `Restart` (the task waits for its agent). A success closes the agent's breaker.
#[derive(Clone, Debug)]
pub struct RecoveryPolicy {
    executor: RecoveryExecutor,
}

impl RecoveryPolicy {
    /// A policy recovering through `executor`.
    pub fn new(executor: RecoveryExecutor) -> Self {
        Self { executor }
    }
}

#[async_trait]
impl FailurePolicy for RecoveryPolicy {
    async fn on_failure(&self, task: &TaskContext, error: &RuntimeError) -> RetryDecision {
        let agent = task.agent_id;
        let cause = format!("{}: {error}", error.code());
        let handler = self.executor.handler();
        let action = handler.decide(agent, error);
        let task_left = task.attempt <= task.max_retries;
        let give_up = |why: String| RetryDecision::GiveUp {
            reason: format!("{cause} ({why})"),
        };
        match &action {
            ErrorAction::Retry { backoff, .. } => {
                if !task_left {
                    return give_up(format!("no retry left after {} attempt(s)", task.attempt));
                }
                let breaker = handler.admission(agent).unwrap_or_default();
                RetryDecision::Retry {
                    after: (*backoff).max(breaker),
                }
            }
            ErrorAction::Restart => {
                // Contain now; wait for the breaker and restart in the background, without
                // holding the task's concurrency slot. The retried task waits for the agent.
                self.executor.contain(agent, &action, &cause).await;
                let executor = self.executor.clone();
                let why = cause.clone();
                tokio::spawn(async move {
                    let outcome = executor.finish_restart(agent, &why).await;
                    executor.audit_outcome(agent, &ErrorAction::Restart, &outcome);
                    if let Err(e) = outcome {
                        tracing::warn!(%agent, error = %e, "restart after a task failure failed");
                    }
                });
                if task_left {
                    RetryDecision::Retry {
                        after: Duration::ZERO,
                    }
                } else {
                    give_up(format!(
                        "agent restarting; no retry left after {} attempt(s)",
                        task.attempt
                    ))
                }
            }
            ErrorAction::Suspend => {
                let outcome = self.executor.execute(agent, &action, &cause).await;
                if task_left && outcome.is_ok() {
                    RetryDecision::Retry {
                        after: Duration::ZERO,
                    }
                } else {
                    give_up("agent suspended".into())
                }
            }
            ErrorAction::Terminate => {
                let _ = self.executor.execute(agent, &action, &cause).await;
                give_up("agent terminated".into())
            }
            ErrorAction::Escalate { reason } => {
                let _ = self.executor.execute(agent, &action, &cause).await;
                RetryDecision::GiveUp {
                    reason: reason.clone(),
                }
            }
        }
    }

    fn on_success(&self, task: &TaskContext) {
        self.executor.handler().record_success(task.agent_id);
    }
}
