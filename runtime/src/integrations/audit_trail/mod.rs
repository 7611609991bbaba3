//! The audit trail: the seed's [`AuditEvent`] API, the [`AuditTrail`] trait every component
//! records into, and the in-memory [`MockAuditTrail`] for users' own tests.
//!
//! The runtime itself always records into the durable, hash-chained, signed trail
//! (see `docs/audit.md`); [`MockAuditTrail`] keeps events in memory only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};
use crate::types::{AgentId, AuditId};

/// What happened. Components record one of these for every decision they make.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuditEventType {
    /// An agent was registered.
    AgentCreated,
    /// An agent changed state (details: `from -> to`, reason).
    StateChanged,
    /// An agent was removed.
    AgentDeleted,
    /// Resources were allocated to an agent.
    ResourceAllocated,
    /// Resources were released.
    ResourceDeallocated,
    /// An agent exceeded a limit, or a limit was enforced on it.
    ResourceViolation,
    /// A task was queued.
    TaskScheduled,
    /// A task started running.
    TaskStarted,
    /// A task finished successfully.
    TaskCompleted,
    /// A task failed (error, timeout, cancellation).
    TaskFailed,
    /// A message was accepted for delivery (metadata only, never the payload).
    MessageSent,
    /// A message was delivered.
    MessageDelivered,
    /// A message was refused (signature, replay, TTL, policy, size).
    MessageRejected,
    /// A policy allowed or denied an action.
    PolicyDecision,
    /// Something tried to break a security boundary.
    SecurityViolation,
    /// A key was generated or rotated.
    KeyRotated,
    /// The error handler chose an action.
    RecoveryAction,
    /// A configuration was loaded.
    ConfigurationLoaded,
    /// The runtime started or stopped.
    RuntimeLifecycle,
    /// A user-defined event.
    Custom(String),
}

/// One audit record. The field set is the seed's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unique id.
    pub id: AuditId,
    /// When it happened.
    pub timestamp: SystemTime,
    /// What happened.
    pub event_type: AuditEventType,
    /// The agent concerned, if any.
    pub agent_id: Option<AgentId>,
    /// A human-readable description (never a message payload).
    pub details: String,
    /// Structured fields.
    pub metadata: HashMap<String, String>,
}

impl AuditEvent {
    /// A new event stamped now.
    pub fn new(
        event_type: AuditEventType,
        agent_id: Option<AgentId>,
        details: impl Into<String>,
    ) -> Self {
        Self {
            id: AuditId::new(),
            timestamp: SystemTime::now(),
            event_type,
            agent_id,
            details: details.into(),
            metadata: HashMap::new(),
        }
    }

    /// Adds a metadata field.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// Where components record audit events.
#[async_trait]
pub trait AuditTrail: Send + Sync + 'static {
    /// Records `event` and returns once it is as durable as the trail's policy promises
    /// (for the durable trail with `fsync = "always"`: on disk).
    async fn record_event(&self, event: AuditEvent) -> Result<(), AuditError>;

    /// Queues `event` without waiting (hot paths such as state transitions). It becomes
    /// durable with the next group commit; [`AuditTrail::flush`] waits for that.
    fn submit(&self, event: AuditEvent);

    /// Waits until everything submitted so far is durable.
    async fn flush(&self) -> Result<(), AuditError>;
}

/// A shared handle to the audit trail, given to every component.
pub type AuditSink = Arc<dyn AuditTrail>;

/// An audit trail in memory, for tests. Nothing is chained, signed or persisted.
#[derive(Debug, Default)]
pub struct MockAuditTrail {
    events: Mutex<Vec<AuditEvent>>,
}

impl MockAuditTrail {
    /// An empty in-memory trail.
    pub async fn new() -> Result<Self, AuditError> {
        Ok(Self::default())
    }

    /// An empty in-memory trail (for non-async contexts).
    pub fn new_sync() -> Self {
        Self::default()
    }

    /// Every event recorded so far, in order.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().clone()
    }

    /// Events of one type.
    pub fn events_of(&self, event_type: &AuditEventType) -> Vec<AuditEvent> {
        self.events
            .lock()
            .iter()
            .filter(|e| &e.event_type == event_type)
            .cloned()
            .collect()
    }
}

#[async_trait]
impl AuditTrail for MockAuditTrail {
    async fn record_event(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.events.lock().push(event);
        Ok(())
    }

    fn submit(&self, event: AuditEvent) {
        self.events.lock().push(event);
    }

    async fn flush(&self) -> Result<(), AuditError> {
        Ok(())
    }
}

/// `[audit]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Directory of the log's segments (default: `<storage.data_dir>/audit`).
    pub dir: Option<PathBuf>,
}

impl Validate for AuditConfig {
    fn validate(&self, _issues: &mut Vec<ConfigIssue>) {}
}

/// Errors of the audit trail.
#[derive(Debug, Error)]
pub enum AuditError {
    /// The event could not be written.
    #[error("audit write failed: {0}")]
    Write(String),
    /// Verification found a broken entry.
    #[error("audit verification failed: {0}")]
    Verification(String),
}

impl AuditError {
    /// Stable code: AUDIT_001 write failed, AUDIT_002 verification failed.
    pub fn code(&self) -> &'static str {
        match self {
            AuditError::Write(_) => "AUDIT_001",
            AuditError::Verification(_) => "AUDIT_002",
        }
    }
}
