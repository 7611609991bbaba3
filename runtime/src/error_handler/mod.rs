//! Error handler: classifies an agent's error into an [`ErrorAction`], tracks per-agent
//! circuit breakers, recovery budgets and backoff, and records every decision. The
//! [`RecoveryExecutor`] then performs the action through [`RecoveryActions`] (implemented for
//! the lifecycle controller), and [`RecoveryPolicy`] plugs all of it into the scheduler.
//!
//! # Decision table (by error code)
//! | class | codes | action |
//! |---|---|---|
//! | transient | `SANDBOX_004`, `RESOURCE_001`, `SCHED_003`, `SCHED_005`, `COMM_*` (not `SEC_*`), `STORAGE_*`, `AUDIT_*`, any other | `Retry { max_attempts, backoff }` |
//! | crash | `SCHED_006`, `SANDBOX_003`, `AGENT_005`, `AGENT_006` | `Restart` |
//! | resource violation | `SCHED_007`, `RESOURCE_*` other than 001/002/004 | `Restart` or `Suspend` (`on_resource_violation`) |
//! | security violation | `SEC_*` | `Terminate` or `Escalate` (`on_security_violation`) |
//! | permanent | `CONFIG_*`, `DSL_*`, `SANDBOX_001`, `SANDBOX_002`, `RESOURCE_002`, `RESOURCE_004`, `SCHED_001`, `SCHED_009`, `AGENT_001..004`, `AGENT_007`, `RECOVERY_*` | `Escalate` |
//!
//! Before the table: with `enable_auto_recovery = false` every non-security error is
//! `Escalate` (reported, not acted on); once an agent has used `max_recovery_attempts`
//! recoveries (Retry, Restart, Suspend) without a success in between, the action is
//! `Escalate` and the executor leaves the agent Failed with the reason. A success
//! ([`DefaultErrorHandler::record_success`]) closes the breaker and refills the budget.
//!
//! # Circuit breaker
//! Every error counts as a failure of the agent. After `circuit_breaker_threshold`
//! consecutive failures the breaker opens: recovery actions wait until
//! `circuit_breaker_open_duration` has passed ([`DefaultErrorHandler::admission`]), then one
//! probe runs (half-open); a success closes it, a failure opens it again. A crash loop is thus
//! slowed to one attempt per open period and ends Failed when the budget is spent.
//!
//! # Example (the seed's)
//! ```
//! # use symbiont_runtime::{AgentId, RuntimeError};
//! # use symbiont_runtime::scheduler::SchedulerError;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let agent_id = AgentId::new();
//! # let error: RuntimeError = SchedulerError::AgentCrashed { agent: agent_id, reason: "exit 1".into() }.into();
//! use symbiont_runtime::error_handler::*;
//!
//! let config = ErrorHandlerConfig {
//!     enable_auto_recovery: true,
//!     max_recovery_attempts: 3,
//!     circuit_breaker_threshold: 10,
//!     // ... other config
//! #   ..Default::default()
//! };
//!
//! let error_handler = DefaultErrorHandler::new(config).await?;
//!
//! // Handle an error
//! let action = error_handler.handle_error(agent_id, error).await?;
//!
//! match action {
//!     ErrorAction::Retry { max_attempts, backoff } => {
//!         // Implement retry logic
//! #       let _ = (max_attempts, backoff);
//!     }
//!     ErrorAction::Restart => {
//!         // Restart the agent
//!     }
//!     ErrorAction::Terminate => {
//!         // Terminate the agent
//!     }
//!     // ... other actions
//! #   _ => {}
//! }
//! # assert_eq!(error_handler.recovery_attempts(agent_id), 1);
//! # Ok(())
//! # }
//! ```

mod backoff;
mod breaker;
mod recovery;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::time::Instant;

use crate::config::{ConfigIssue, Validate};
use crate::error::RuntimeError;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType, AuditSink};
use crate::types::AgentId;

pub use backoff::Backoff;
pub use breaker::CircuitState;
pub use recovery::{RecoveryActions, RecoveryExecutor, RecoveryOutcome, RecoveryPolicy};

/// What to do with an agent whose sandbox hit a resource limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ResourceViolationAction {
    /// Restart it in a fresh sandbox.
    #[default]
    Restart,
    /// Freeze it until an operator resumes it.
    Suspend,
}

/// What to do with an agent that tried to break a security boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SecurityViolationAction {
    /// Terminate it at once.
    #[default]
    Terminate,
    /// Leave it Failed for an operator.
    Escalate,
}

/// `[error_handler]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorHandlerConfig {
    /// Act on errors automatically (retry, restart) instead of only reporting them.
    pub enable_auto_recovery: bool,
    /// Recovery attempts per agent (without a success in between) before it is left Failed.
    pub max_recovery_attempts: u32,
    /// Consecutive failures that open an agent's circuit breaker.
    pub circuit_breaker_threshold: u32,
    /// How long an open breaker holds recovery back before a half-open probe.
    #[serde(with = "humantime_serde")]
    pub circuit_breaker_open_duration: Duration,
    /// First retry delay (doubles per attempt).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Relative jitter of retry delays, in `[0, 1]` (0.2 = ±20 %).
    pub jitter: f64,
    /// Action for resource violations.
    pub on_resource_violation: ResourceViolationAction,
    /// Action for security violations.
    pub on_security_violation: SecurityViolationAction,
}

impl Default for ErrorHandlerConfig {
    fn default() -> Self {
        Self {
            enable_auto_recovery: true,
            max_recovery_attempts: 3,
            circuit_breaker_threshold: 10,
            circuit_breaker_open_duration: Duration::from_secs(30),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            jitter: 0.2,
            on_resource_violation: ResourceViolationAction::Restart,
            on_security_violation: SecurityViolationAction::Terminate,
        }
    }
}

impl Validate for ErrorHandlerConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.circuit_breaker_threshold == 0 {
            issues.push(ConfigIssue::new(
                "error_handler.circuit_breaker_threshold",
                "must be at least 1",
            ));
        }
        if self.circuit_breaker_open_duration.is_zero() {
            issues.push(ConfigIssue::new(
                "error_handler.circuit_breaker_open_duration",
                "must be longer than 0s",
            ));
        }
        if self.backoff_base > self.backoff_max {
            issues.push(ConfigIssue::new(
                "error_handler.backoff_base",
                "must not be longer than error_handler.backoff_max",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            issues.push(ConfigIssue::new(
                "error_handler.jitter",
                format!("must be between 0 and 1, got {}", self.jitter),
            ));
        }
    }
}

/// What the runtime should do about an agent's error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    /// Retry the failed operation after `backoff`; `max_attempts` recoveries are left in the
    /// agent's budget (this one included).
    Retry {
        /// Recoveries left, this one included.
        max_attempts: u32,
        /// Delay before the retry (exponential, jittered).
        backoff: Duration,
    },
    /// Restart the agent in a fresh sandbox.
    Restart,
    /// Freeze the agent.
    Suspend,
    /// Terminate the agent.
    Terminate,
    /// Give up on automatic recovery: the agent is left Failed with `reason` for an operator.
    Escalate {
        /// Why.
        reason: String,
    },
}

impl ErrorAction {
    /// A short name (`retry`, `restart`, `suspend`, `terminate`, `escalate`).
    pub fn name(&self) -> &'static str {
        match self {
            ErrorAction::Retry { .. } => "retry",
            ErrorAction::Restart => "restart",
            ErrorAction::Suspend => "suspend",
            ErrorAction::Terminate => "terminate",
            ErrorAction::Escalate { .. } => "escalate",
        }
    }
}

/// The kind of an error, which decides the action (see the module's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Likely to succeed when tried again.
    Transient,
    /// The agent's program died.
    Crash,
    /// The agent hit one of its resource limits.
    ResourceViolation,
    /// The agent tried to break a security boundary.
    SecurityViolation,
    /// Not fixable by retrying or restarting (configuration, missing tier, unknown agent).
    Permanent,
}

/// Classifies an error by its stable code (see the module's table).
pub fn classify(error: &RuntimeError) -> ErrorClass {
    classify_code(error.code())
}

/// Classifies a stable error code (see the module's table).
pub fn classify_code(code: &str) -> ErrorClass {
    let prefix = code.split('_').next().unwrap_or(code);
    match code {
        "SCHED_006" | "SANDBOX_003" | "AGENT_005" | "AGENT_006" => ErrorClass::Crash,
        "SCHED_007" => ErrorClass::ResourceViolation,
        "RESOURCE_001" | "SANDBOX_004" | "SCHED_003" | "SCHED_005" | "SCHED_011" => {
            ErrorClass::Transient
        }
        "RESOURCE_002" | "RESOURCE_004" | "SANDBOX_001" | "SANDBOX_002" | "SCHED_001"
        | "SCHED_009" | "AGENT_001" | "AGENT_002" | "AGENT_003" | "AGENT_004" | "AGENT_007" => {
            ErrorClass::Permanent
        }
        _ => match prefix {
            "SEC" => ErrorClass::SecurityViolation,
            "RESOURCE" => ErrorClass::ResourceViolation,
            "CONFIG" | "DSL" | "RECOVERY" => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        },
    }
}

/// Errors of the error handler itself.
#[derive(Debug, Error)]
pub enum ErrorHandlerError {
    /// The agent's circuit breaker is open: no more attempts until it half-opens.
    #[error("circuit breaker open for agent {0}")]
    CircuitOpen(String),
    /// The handler's configuration is unusable.
    #[error("invalid error handler configuration: {0}")]
    InvalidConfig(String),
    /// A recovery action could not be carried out.
    #[error("recovery action {action} on agent {agent} failed: {reason}")]
    ActionFailed {
        /// The agent.
        agent: AgentId,
        /// The action (`restart`, `suspend`, ...).
        action: &'static str,
        /// Why.
        reason: String,
    },
}

impl ErrorHandlerError {
    /// Stable code: RECOVERY_001 circuit open, RECOVERY_002 action failed, CONFIG_001
    /// invalid configuration.
    pub fn code(&self) -> &'static str {
        match self {
            ErrorHandlerError::CircuitOpen(_) => "RECOVERY_001",
            ErrorHandlerError::ActionFailed { .. } => "RECOVERY_002",
            ErrorHandlerError::InvalidConfig(_) => "CONFIG_001",
        }
    }
}

struct AgentRecovery {
    breaker: breaker::Breaker,
    attempts: u32,
    last_error: Option<String>,
}

struct Inner {
    config: ErrorHandlerConfig,
    agents: Mutex<HashMap<AgentId, AgentRecovery>>,
    rng: Mutex<fastrand::Rng>,
    audit: Option<AuditSink>,
}

/// The error handler. Cheap to clone (a shared handle).
#[derive(Clone)]
pub struct DefaultErrorHandler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DefaultErrorHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultErrorHandler")
            .field("config", &self.inner.config)
            .field("agents", &self.inner.agents.lock().len())
            .finish()
    }
}

impl DefaultErrorHandler {
    /// A handler without an audit trail.
    pub async fn new(config: ErrorHandlerConfig) -> Result<Self, ErrorHandlerError> {
        Self::with_audit(config, None).await
    }

    /// A handler auditing every decision into `audit`.
    pub async fn with_audit(
        config: ErrorHandlerConfig,
        audit: Option<AuditSink>,
    ) -> Result<Self, ErrorHandlerError> {
        Self::build(config, audit, fastrand::Rng::new())
    }

    /// A handler whose jitter comes from a seeded generator (reproducible tests).
    pub fn with_seed(
        config: ErrorHandlerConfig,
        audit: Option<AuditSink>,
        seed: u64,
    ) -> Result<Self, ErrorHandlerError> {
        Self::build(config, audit, fastrand::Rng::with_seed(seed))
    }

    fn build(
        config: ErrorHandlerConfig,
        audit: Option<AuditSink>,
        rng: fastrand::Rng,
    ) -> Result<Self, ErrorHandlerError> {
        let mut issues = Vec::new();
        config.validate(&mut issues);
        if let Some(issue) = issues.first() {
            return Err(ErrorHandlerError::InvalidConfig(format!(
                "{}: {}",
                issue.key, issue.message
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                agents: Mutex::new(HashMap::new()),
                rng: Mutex::new(rng),
                audit,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &ErrorHandlerConfig {
        &self.inner.config
    }

    /// The retry backoff parameters.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: self.inner.config.backoff_base,
            max: self.inner.config.backoff_max,
            jitter: self.inner.config.jitter,
        }
    }

    /// Decides what to do about `error` of `agent_id` (see the module's table), counts it
    /// against the agent's breaker and budget, and audits the decision.
    pub async fn handle_error<E: Borrow<RuntimeError> + Send>(
        &self,
        agent_id: AgentId,
        error: E,
    ) -> Result<ErrorAction, ErrorHandlerError> {
        Ok(self.decide(agent_id, error.borrow()))
    }

    /// The synchronous core of [`DefaultErrorHandler::handle_error`].
    pub fn decide(&self, agent_id: AgentId, error: &RuntimeError) -> ErrorAction {
        let cfg = &self.inner.config;
        let class = classify(error);
        let code = error.code();
        let text = format!("{code}: {error}");
        let now = Instant::now();
        let (action, opened, state, attempts) = {
            let mut agents = self.inner.agents.lock();
            let rec = agents.entry(agent_id).or_insert_with(|| AgentRecovery {
                breaker: breaker::Breaker::new(),
                attempts: 0,
                last_error: None,
            });
            let opened = rec.breaker.on_failure(
                now,
                cfg.circuit_breaker_threshold,
                cfg.circuit_breaker_open_duration,
            );
            rec.last_error = Some(text.clone());
            let action = if class == ErrorClass::SecurityViolation {
                match cfg.on_security_violation {
                    SecurityViolationAction::Terminate => ErrorAction::Terminate,
                    SecurityViolationAction::Escalate => ErrorAction::Escalate {
                        reason: format!("security violation: {text}"),
                    },
                }
            } else if !cfg.enable_auto_recovery {
                ErrorAction::Escalate {
                    reason: format!("automatic recovery is disabled; {text}"),
                }
            } else if class == ErrorClass::Permanent {
                ErrorAction::Escalate {
                    reason: format!("not recoverable automatically: {text}"),
                }
            } else if rec.attempts >= cfg.max_recovery_attempts {
                ErrorAction::Escalate {
                    reason: format!(
                        "recovery gave up after {} attempt(s); last error {text}",
                        rec.attempts
                    ),
                }
            } else {
                rec.attempts += 1;
                match class {
                    ErrorClass::Crash => ErrorAction::Restart,
                    ErrorClass::ResourceViolation => match cfg.on_resource_violation {
                        ResourceViolationAction::Restart => ErrorAction::Restart,
                        ResourceViolationAction::Suspend => ErrorAction::Suspend,
                    },
                    _ => {
                        let unit = self.inner.rng.lock().f64();
                        ErrorAction::Retry {
                            max_attempts: cfg.max_recovery_attempts - rec.attempts + 1,
                            backoff: self.backoff().delay(rec.attempts, unit),
                        }
                    }
                }
            };
            (action, opened, rec.breaker.state(now), rec.attempts)
        };
        if opened {
            tracing::warn!(agent = %agent_id, "circuit breaker opened");
        }
        tracing::info!(agent = %agent_id, %code, ?class, action = action.name(), "error handled");
        if let Some(audit) = &self.inner.audit {
            let mut event = AuditEvent::new(
                AuditEventType::RecoveryAction,
                Some(agent_id),
                format!("{} after {text}", action.name()),
            )
            .with("decision", action.name())
            .with("error_code", code)
            .with("class", format!("{class:?}"))
            .with("circuit", format!("{state:?}"))
            .with("recovery_attempts", attempts.to_string());
            match &action {
                ErrorAction::Retry { backoff, .. } => {
                    event = event.with("backoff_ms", backoff.as_millis().to_string());
                }
                ErrorAction::Escalate { reason } => event = event.with("reason", reason.clone()),
                _ => {}
            }
            if opened {
                event = event.with("circuit_opened", "true");
            }
            audit.submit(event);
        }
        action
    }

    /// Records a success of the agent: its breaker closes and its budget is refilled.
    pub fn record_success(&self, agent_id: AgentId) {
        let mut agents = self.inner.agents.lock();
        if let Some(rec) = agents.get_mut(&agent_id) {
            let was = rec.breaker.state(Instant::now());
            rec.breaker.on_success();
            rec.attempts = 0;
            if was != CircuitState::Closed {
                drop(agents);
                tracing::info!(agent = %agent_id, "circuit breaker closed");
                if let Some(audit) = &self.inner.audit {
                    audit.submit(
                        AuditEvent::new(
                            AuditEventType::RecoveryAction,
                            Some(agent_id),
                            "circuit breaker closed after a successful probe",
                        )
                        .with("decision", "close_circuit"),
                    );
                }
            }
        }
    }

    /// How long a recovery action for the agent must wait now (`None`: go). When the open
    /// period has passed the breaker turns half-open and this call's action is the probe.
    pub fn admission(&self, agent_id: AgentId) -> Option<Duration> {
        self.inner
            .agents
            .lock()
            .get_mut(&agent_id)
            .and_then(|r| r.breaker.admit(Instant::now()))
    }

    /// RECOVERY_001 when the agent's breaker is open (work for it should not be sent now).
    pub fn check_circuit(&self, agent_id: AgentId) -> Result<(), ErrorHandlerError> {
        match self.circuit_state(agent_id) {
            CircuitState::Open { remaining } => Err(ErrorHandlerError::CircuitOpen(format!(
                "{agent_id} (half-open in {})",
                humantime::format_duration(Duration::from_millis(remaining.as_millis() as u64))
            ))),
            _ => Ok(()),
        }
    }

    /// The agent's breaker state.
    pub fn circuit_state(&self, agent_id: AgentId) -> CircuitState {
        self.inner
            .agents
            .lock()
            .get(&agent_id)
            .map(|r| r.breaker.state(Instant::now()))
            .unwrap_or(CircuitState::Closed)
    }

    /// Recoveries used by the agent since its last success.
    pub fn recovery_attempts(&self, agent_id: AgentId) -> u32 {
        self.inner
            .agents
            .lock()
            .get(&agent_id)
            .map(|r| r.attempts)
            .unwrap_or(0)
    }

    /// Consecutive failures of the agent.
    pub fn consecutive_failures(&self, agent_id: AgentId) -> u32 {
        self.inner
            .agents
            .lock()
            .get(&agent_id)
            .map(|r| r.breaker.consecutive_failures())
            .unwrap_or(0)
    }

    /// How many times the agent's breaker has opened.
    pub fn circuit_openings(&self, agent_id: AgentId) -> u32 {
        self.inner
            .agents
            .lock()
            .get(&agent_id)
            .map(|r| r.breaker.times_opened())
            .unwrap_or(0)
    }

    /// The agent's last error, as `CODE: message`.
    pub fn last_error(&self, agent_id: AgentId) -> Option<String> {
        self.inner
            .agents
            .lock()
            .get(&agent_id)
            .and_then(|r| r.last_error.clone())
    }

    /// Forgets the agent's history (e.g. after an operator fixed and restarted it).
    pub fn reset(&self, agent_id: AgentId) {
        self.inner.agents.lock().remove(&agent_id);
    }

    pub(crate) fn audit(&self) -> Option<&AuditSink> {
        self.inner.audit.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::communication::CommunicationError;
    use crate::sandbox::SandboxError;
    use crate::scheduler::SchedulerError;

    fn crash(agent: AgentId) -> RuntimeError {
        SchedulerError::AgentCrashed {
            agent,
            reason: "exit status 1".into(),
        }
        .into()
    }

    #[test]
    fn the_table_classifies_by_code() {
        assert_eq!(classify_code("SCHED_006"), ErrorClass::Crash);
        assert_eq!(classify_code("SANDBOX_004"), ErrorClass::Transient);
        assert_eq!(classify_code("RESOURCE_003"), ErrorClass::ResourceViolation);
        assert_eq!(classify_code("RESOURCE_001"), ErrorClass::Transient);
        assert_eq!(classify_code("RESOURCE_004"), ErrorClass::Permanent);
        assert_eq!(classify_code("SEC_001"), ErrorClass::SecurityViolation);
        assert_eq!(classify_code("COMM_001"), ErrorClass::Transient);
        assert_eq!(classify_code("CONFIG_001"), ErrorClass::Permanent);
        assert_eq!(classify_code("SANDBOX_001"), ErrorClass::Permanent);
        assert_eq!(
            classify(&SandboxError::op("start", "EAGAIN").into()),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(&CommunicationError::Security("bad signature".into()).into()),
            ErrorClass::SecurityViolation
        );
    }

    #[tokio::test]
    async fn actions_follow_the_table_and_the_config() {
        let agent = AgentId::new();
        let h = DefaultErrorHandler::new(ErrorHandlerConfig {
            max_recovery_attempts: 100,
            circuit_breaker_threshold: 100,
            ..Default::default()
        })
        .await
        .expect("handler");
        assert_eq!(
            h.handle_error(agent, crash(agent)).await.expect("ok"),
            ErrorAction::Restart
        );
        assert!(matches!(
            h.handle_error(agent, &RuntimeError::from(SandboxError::op("exec", "EIO")))
                .await
                .expect("ok"),
            ErrorAction::Retry { .. }
        ));
        let violation: RuntimeError = SchedulerError::LimitExceeded {
            agent,
            limit: "memory".into(),
        }
        .into();
        assert_eq!(
            h.handle_error(agent, &violation).await.expect("ok"),
            ErrorAction::Restart
        );
        let sec: RuntimeError = CommunicationError::Security("forged".into()).into();
        assert_eq!(
            h.handle_error(agent, &sec).await.expect("ok"),
            ErrorAction::Terminate
        );
        let cfg: RuntimeError = SandboxError::InvalidSpec("no argv".into()).into();
        assert!(matches!(
            h.handle_error(agent, cfg).await.expect("ok"),
            ErrorAction::Escalate { .. }
        ));

        let h = DefaultErrorHandler::new(ErrorHandlerConfig {
            on_resource_violation: ResourceViolationAction::Suspend,
            on_security_violation: SecurityViolationAction::Escalate,
            ..Default::default()
        })
        .await
        .expect("handler");
        assert_eq!(
            h.handle_error(agent, &violation).await.expect("ok"),
            ErrorAction::Suspend
        );
        assert!(matches!(
            h.handle_error(agent, &sec).await.expect("ok"),
            ErrorAction::Escalate { reason } if reason.contains("security violation")
        ));

        let h = DefaultErrorHandler::new(ErrorHandlerConfig {
            enable_auto_recovery: false,
            ..Default::default()
        })
        .await
        .expect("handler");
        assert!(matches!(
            h.handle_error(agent, crash(agent)).await.expect("ok"),
            ErrorAction::Escalate { reason } if reason.contains("disabled")
        ));
        assert_eq!(
            h.handle_error(agent, &sec).await.expect("ok"),
            ErrorAction::Terminate
        );
    }

    #[tokio::test]
    async fn the_budget_is_spent_then_escalates_and_a_success_refills_it() {
        let agent = AgentId::new();
        let h = DefaultErrorHandler::new(ErrorHandlerConfig {
            max_recovery_attempts: 2,
            ..Default::default()
        })
        .await
        .expect("handler");
        assert_eq!(h.decide(agent, &crash(agent)), ErrorAction::Restart);
        assert_eq!(h.decide(agent, &crash(agent)), ErrorAction::Restart);
        match h.decide(agent, &crash(agent)) {
            ErrorAction::Escalate { reason } => {
                assert!(reason.contains("gave up after 2"), "{reason}");
                assert!(reason.contains("SCHED_006"), "{reason}");
            }
            other => panic!("expected escalate, got {other:?}"),
        }
        h.record_success(agent);
        assert_eq!(h.recovery_attempts(agent), 0);
        assert_eq!(h.decide(agent, &crash(agent)), ErrorAction::Restart);
    }

    #[test]
    fn invalid_config_is_refused_with_its_key() {
        let err = DefaultErrorHandler::with_seed(
            ErrorHandlerConfig {
                jitter: 1.5,
                ..Default::default()
            },
            None,
            1,
        )
        .expect_err("invalid");
        assert!(err.to_string().contains("error_handler.jitter"), "{err}");
    }
}
