//! The audit trail: the seed's [`AuditEvent`] API, the [`AuditTrail`] trait every component
//! records into, the durable trail the runtime records into, and the in-memory
//! [`MockAuditTrail`] for users' own tests.
//!
//! [`DurableAuditTrail`] is an append-only log of segment files: every entry carries its
//! sequence number and the SHA-256 of the previous entry, signed checkpoints (Ed25519) are
//! written every N entries / T seconds and at the start of every segment, and every segment
//! holds a signed head naming its last entry, so editing, deleting, inserting, reordering and
//! truncating are all caught by [`verify_dir`]. A dedicated writer thread group-commits
//! whatever was submitted under the configured [`FsyncPolicy`]. [`query_dir`] / [`tail_dir`]
//! read the log back. The on-disk format is specified in `docs/audit.md`.
//!
//! Submodules: `format` (the bytes on disk), `keys` (the audit key pair), `writer` (the
//! durable trail), `verify` (the verifier) and `query` (reading the log back).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};
use crate::types::{AgentId, AuditId};

mod format;
mod keys;
mod query;
mod verify;
mod writer;

pub use format::{segment_file_name, AUDIT_FORMAT_VERSION, SEGMENT_HEADER_LEN};
pub use keys::{public_key_path, AuditKey, AuditPublicKey};
pub use query::{query_dir, scan_dir, tail_dir, AuditQuery, AuditRecord};
pub use verify::{verify_dir, ProblemKind, TornTail, VerifyProblem, VerifyReport};
pub use writer::{AuditStats, DurableAuditTrail, RetentionOutcome, SEAL_DELAY};

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
    /// The audit trail itself was maintained: a torn tail repaired on restart, old segments
    /// removed by retention (metadata `action` = `repair` / `retention`).
    AuditMaintenance,
    /// A user-defined event.
    Custom(String),
}

impl AuditEventType {
    /// Every built-in type (all but [`AuditEventType::Custom`]), in declaration order.
    pub const BUILT_IN: [AuditEventType; 20] = [
        AuditEventType::AgentCreated,
        AuditEventType::StateChanged,
        AuditEventType::AgentDeleted,
        AuditEventType::ResourceAllocated,
        AuditEventType::ResourceDeallocated,
        AuditEventType::ResourceViolation,
        AuditEventType::TaskScheduled,
        AuditEventType::TaskStarted,
        AuditEventType::TaskCompleted,
        AuditEventType::TaskFailed,
        AuditEventType::MessageSent,
        AuditEventType::MessageDelivered,
        AuditEventType::MessageRejected,
        AuditEventType::PolicyDecision,
        AuditEventType::SecurityViolation,
        AuditEventType::KeyRotated,
        AuditEventType::RecoveryAction,
        AuditEventType::ConfigurationLoaded,
        AuditEventType::RuntimeLifecycle,
        AuditEventType::AuditMaintenance,
    ];

    /// The name written on disk and accepted by `--type`: the variant's name
    /// (`StateChanged`), or `custom:<name>` for [`AuditEventType::Custom`].
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        Cow::Borrowed(match self {
            AuditEventType::AgentCreated => "AgentCreated",
            AuditEventType::StateChanged => "StateChanged",
            AuditEventType::AgentDeleted => "AgentDeleted",
            AuditEventType::ResourceAllocated => "ResourceAllocated",
            AuditEventType::ResourceDeallocated => "ResourceDeallocated",
            AuditEventType::ResourceViolation => "ResourceViolation",
            AuditEventType::TaskScheduled => "TaskScheduled",
            AuditEventType::TaskStarted => "TaskStarted",
            AuditEventType::TaskCompleted => "TaskCompleted",
            AuditEventType::TaskFailed => "TaskFailed",
            AuditEventType::MessageSent => "MessageSent",
            AuditEventType::MessageDelivered => "MessageDelivered",
            AuditEventType::MessageRejected => "MessageRejected",
            AuditEventType::PolicyDecision => "PolicyDecision",
            AuditEventType::SecurityViolation => "SecurityViolation",
            AuditEventType::KeyRotated => "KeyRotated",
            AuditEventType::RecoveryAction => "RecoveryAction",
            AuditEventType::ConfigurationLoaded => "ConfigurationLoaded",
            AuditEventType::RuntimeLifecycle => "RuntimeLifecycle",
            AuditEventType::AuditMaintenance => "AuditMaintenance",
            AuditEventType::Custom(name) => return Cow::Owned(format!("custom:{name}")),
        })
    }
}

impl fmt::Display for AuditEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for AuditEventType {
    type Err = String;

    /// Parses a name as written by [`AuditEventType::name`]; built-in names are matched
    /// case-insensitively and with or without underscores (`state_changed`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(name) = s.strip_prefix("custom:") {
            return Ok(AuditEventType::Custom(name.to_string()));
        }
        let wanted: String = s
            .chars()
            .filter(|c| *c != '_' && *c != '-')
            .collect::<String>()
            .to_ascii_lowercase();
        AuditEventType::BUILT_IN
            .iter()
            .find(|t| t.name().to_ascii_lowercase() == wanted)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "unknown audit event type `{s}` (expected one of {}, or custom:<name>)",
                    AuditEventType::BUILT_IN
                        .iter()
                        .map(|t| t.name().into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
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

/// When the durable trail calls `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every group commit is synced before it is acknowledged: nothing acknowledged is lost,
    /// even on power loss.
    #[default]
    Always,
    /// Commits are acknowledged once written to the OS; the log is synced (and its head
    /// signed) every `fsync_interval`. A process crash loses nothing acknowledged; a power
    /// loss may lose up to one interval.
    Interval,
    /// Never synced explicitly (the OS writes back when it likes): for tests and benchmarks.
    Never,
}

/// `[audit]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Directory of the log's segments (default: `<storage.data_dir>/audit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// The Ed25519 audit key (default: `<storage.data_dir>/keys/audit.ed25519`, mode 0600,
    /// generated on first start; the public key is written beside it as `<key_path>.pub`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_path: Option<PathBuf>,
    /// `always`, `interval` or `never`.
    pub fsync: FsyncPolicy,
    /// The sync period when `fsync = "interval"`.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// A segment is closed and a new one started once it reaches this many bytes.
    pub segment_size: u64,
    /// A signed checkpoint is written after this many entries...
    pub checkpoint_every: u64,
    /// ...or this long after the previous one, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// How many submitted events may wait for the writer; `submit` blocks and
    /// `record_event` waits when the queue is full.
    pub queue_capacity: usize,
    /// Remove segments whose every entry is older than this (never the active segment).
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
    /// Keep at most this many segments (the oldest are removed first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_segments: Option<usize>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            key_path: None,
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(100),
            segment_size: 64 * 1024 * 1024,
            checkpoint_every: 1024,
            checkpoint_interval: Duration::from_secs(10),
            queue_capacity: 16 * 1024,
            retention: None,
            max_segments: None,
        }
    }
}

/// Smallest accepted `audit.segment_size`.
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;

impl AuditConfig {
    /// The log directory: `dir`, or `<data_dir>/audit`.
    pub fn resolved_dir(&self, data_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| data_dir.join("audit"))
    }

    /// The private key file: `key_path`, or `<data_dir>/keys/audit.ed25519`.
    pub fn resolved_key_path(&self, data_dir: &Path) -> PathBuf {
        self.key_path
            .clone()
            .unwrap_or_else(|| data_dir.join("keys").join("audit.ed25519"))
    }
}

impl Validate for AuditConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.fsync == FsyncPolicy::Interval && self.fsync_interval.is_zero() {
            issues.push(ConfigIssue::new(
                "audit.fsync_interval",
                "must be longer than 0 when fsync = \"interval\"",
            ));
        }
        if self.segment_size < MIN_SEGMENT_SIZE {
            issues.push(ConfigIssue::new(
                "audit.segment_size",
                format!("must be at least {MIN_SEGMENT_SIZE} bytes"),
            ));
        }
        if self.checkpoint_every == 0 {
            issues.push(ConfigIssue::new(
                "audit.checkpoint_every",
                "must be at least 1",
            ));
        }
        if self.checkpoint_interval.is_zero() {
            issues.push(ConfigIssue::new(
                "audit.checkpoint_interval",
                "must be longer than 0",
            ));
        }
        if self.queue_capacity == 0 {
            issues.push(ConfigIssue::new(
                "audit.queue_capacity",
                "must be at least 1",
            ));
        }
        if self.retention.is_some_and(|r| r.is_zero()) {
            issues.push(ConfigIssue::new(
                "audit.retention",
                "must be longer than 0 (omit it to keep everything)",
            ));
        }
        if self.max_segments == Some(0) {
            issues.push(ConfigIssue::new(
                "audit.max_segments",
                "must be at least 1 (omit it to keep everything)",
            ));
        }
    }
}

/// Errors of the audit trail.
#[derive(Debug, Error)]
pub enum AuditError {
    /// The event could not be written (I/O error, or the trail is closed or failed).
    #[error("audit write failed: {0}")]
    Write(String),
    /// Verification found a broken entry.
    #[error("audit verification failed: {0}")]
    Verification(String),
    /// The audit key is missing, unreadable, too widely readable, or not the log's key.
    #[error("audit key: {0}")]
    Key(String),
    /// The log is damaged where it is covered by a signature; the trail refuses to open
    /// (and so to repair away evidence). Run `symbiont audit verify`.
    #[error("audit log damaged: {0}")]
    Corrupt(String),
    /// The log could not be read.
    #[error("audit read failed: {0}")]
    Read(String),
}

impl AuditError {
    /// Stable code: AUDIT_001 write failed, AUDIT_002 verification failed, AUDIT_003 key
    /// problem, AUDIT_004 log damaged (refusing to open), AUDIT_005 read failed.
    pub fn code(&self) -> &'static str {
        match self {
            AuditError::Write(_) => "AUDIT_001",
            AuditError::Verification(_) => "AUDIT_002",
            AuditError::Key(_) => "AUDIT_003",
            AuditError::Corrupt(_) => "AUDIT_004",
            AuditError::Read(_) => "AUDIT_005",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeConfig;

    #[test]
    fn audit_section_parses_with_durations_and_policy() {
        let config = RuntimeConfig::from_toml_str(
            r#"
[audit]
dir = "/srv/audit"
fsync = "interval"
fsync_interval = "50ms"
segment_size = 1048576
checkpoint_every = 500
checkpoint_interval = "5s"
retention = "30days"
max_segments = 10
"#,
        )
        .expect("valid");
        let audit = config.audit;
        assert_eq!(audit.fsync, FsyncPolicy::Interval);
        assert_eq!(audit.fsync_interval, Duration::from_millis(50));
        assert_eq!(audit.retention, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(audit.max_segments, Some(10));
        assert_eq!(
            audit.resolved_dir(Path::new("/var/lib/symbiont")),
            PathBuf::from("/srv/audit")
        );
        assert_eq!(
            AuditConfig::default().resolved_key_path(Path::new("/d")),
            PathBuf::from("/d/keys/audit.ed25519")
        );
    }

    #[test]
    fn impossible_audit_values_name_their_keys() {
        let err = RuntimeConfig::from_toml_str(
            "[audit]\nsegment_size = 10\ncheckpoint_every = 0\nmax_segments = 0\n",
        )
        .expect_err("invalid");
        let text = err.to_string();
        for key in [
            "audit.segment_size",
            "audit.checkpoint_every",
            "audit.max_segments",
        ] {
            assert!(text.contains(key), "{text}");
        }
        assert!(RuntimeConfig::from_toml_str("[audit]\nfsync = \"sometimes\"\n").is_err());
    }

    #[test]
    fn event_type_names_round_trip() {
        for t in AuditEventType::BUILT_IN {
            assert_eq!(t.name().parse::<AuditEventType>(), Ok(t.clone()));
        }
        let custom = AuditEventType::Custom("Billing".into());
        assert_eq!(custom.to_string(), "custom:Billing");
        assert_eq!("custom:Billing".parse::<AuditEventType>(), Ok(custom));
        assert_eq!(
            "message_rejected".parse::<AuditEventType>(),
            Ok(AuditEventType::MessageRejected)
        );
        assert!("Nope".parse::<AuditEventType>().is_err());
    }
}
