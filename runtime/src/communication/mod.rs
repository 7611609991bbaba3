//! Communication bus: agent identities (Ed25519), per-pair AES-256-GCM keys (X25519),
//! signed and encrypted envelopes, prioritized bounded mailboxes, topics, request/reply,
//! dead letters, and the frame protocol that carries messages into sandboxes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};

/// `[communication]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommunicationConfig {
    /// Encrypt payloads (AES-256-GCM). Signatures are always on.
    pub enable_encryption: bool,
    /// Largest accepted payload in bytes.
    pub max_message_size: usize,
    /// How long a send (or a request awaiting its reply) may wait.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
}

impl Default for CommunicationConfig {
    fn default() -> Self {
        Self {
            enable_encryption: true,
            max_message_size: 1024 * 1024,
            delivery_timeout: Duration::from_secs(30),
        }
    }
}

impl Validate for CommunicationConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.max_message_size == 0 {
            issues.push(ConfigIssue::new(
                "communication.max_message_size",
                "must be at least 1 byte",
            ));
        }
        if self.delivery_timeout.is_zero() {
            issues.push(ConfigIssue::new(
                "communication.delivery_timeout",
                "must be longer than 0s",
            ));
        }
    }
}

/// Errors of the communication bus.
#[derive(Debug, Error)]
pub enum CommunicationError {
    /// The message could not be delivered; says why.
    #[error("message delivery failed: {0}")]
    DeliveryFailed(String),
    /// A signature, key, replay or addressing check failed.
    #[error("security violation: {0}")]
    Security(String),
}

impl CommunicationError {
    /// Stable code: COMM_001 delivery failed, SEC_001 security violation.
    pub fn code(&self) -> &'static str {
        match self {
            CommunicationError::DeliveryFailed(_) => "COMM_001",
            CommunicationError::Security(_) => "SEC_001",
        }
    }
}
