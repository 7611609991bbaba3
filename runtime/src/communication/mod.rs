//! Communication bus: agent identities (Ed25519), per-pair AES-256-GCM keys (X25519),
//! signed and encrypted envelopes, prioritized bounded mailboxes, topics, request/reply,
//! dead letters, and the frame protocol that carries messages into sandboxes.
//!
//! The seed's example:
//!
//! ```
//! # use std::time::Duration;
//! # use symbiont_runtime::types::*;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let agent_id = AgentId::new();
//! # let sender_id = AgentId::new();
//! # let recipient_id = agent_id;
//! # let capabilities = vec![Capability::Messaging];
//! use symbiont_runtime::communication::*;
//!
//! let config = CommunicationConfig {
//!     enable_encryption: true,
//!     max_message_size: 1024 * 1024, // 1MB
//!     delivery_timeout: Duration::from_secs(30),
//!     // ... other config
//!     ..Default::default()
//! };
//!
//! let comm_bus = DefaultCommunicationBus::new(config).await?;
//!
//! // Register agent
//! comm_bus.register_agent(agent_id, capabilities).await?;
//! # comm_bus.register_agent(sender_id, vec![Capability::Messaging]).await?;
//!
//! // Send message
//! let message = Message {
//!     id: MessageId::new(),
//!     from: sender_id,
//!     to: recipient_id,
//!     topic: "example_topic".to_string(),
//!     payload: b"Hello, agent!".to_vec(),
//!     priority: Priority::Normal,
//!     ttl: Duration::from_secs(300),
//! };
//!
//! comm_bus.send_message(message).await?;
//! # let got = comm_bus.receive(recipient_id).await?;
//! # assert_eq!(got.message.payload, b"Hello, agent!");
//! # Ok(())
//! # }
//! ```
//!
//! # What happens to a message
//! 1. **Admission** (before any crypto or copying): size (COMM_002), TTL and topic
//!    (COMM_005), sender registered (SEC_001), recipient registered (COMM_001), both hold
//!    [`Capability::Messaging`](crate::types::Capability::Messaging) (SEC_001, configurable),
//!    the [`DeliveryPolicy`] (SEC_001).
//! 2. **Room**: a slot is reserved in the recipient's bounded mailbox; a full mailbox makes
//!    the sender wait up to `delivery_timeout`, then COMM_003 (dead-lettered).
//! 3. **Sealing**: the payload is encrypted with AES-256-GCM under the pair's key (X25519 +
//!    HKDF-SHA256) with the canonical header as associated data, and the sender's Ed25519
//!    key signs `domain || header || ciphertext` ([`AuthMode::Signed`]); in
//!    [`AuthMode::Session`] a signed handshake agrees a per-session AEAD key instead and
//!    messages carry only the GCM tag.
//! 4. **Delivery**: the receiver pops envelopes in priority order (expired ones go to the
//!    dead-letter queue), verifies them (batch Ed25519 verification when several are ready),
//!    checks addressing, key epochs, TTL and the anti-replay window, decrypts, and hands out
//!    [`ReceivedMessage`]s. Any failure is SEC_001, audited with metadata only, and the
//!    envelope (ciphertext) is dead-lettered.
//!
//! Sandboxed agents take part through [`bridge`], which speaks the frame protocol of the
//! `symbiont-agent` crate over the sandbox's stdin/stdout. See `docs/communication.md` and
//! `docs/protocol.md`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};
use crate::types::AgentId;

pub mod bridge;
mod bus;
mod crypto;
mod keystore;
mod mailbox;
mod policy;

pub use bus::{
    AgentPublicKeys, BusStats, CommunicationBusBuilder, DefaultCommunicationBus, Message,
    ReceivedMessage,
};
pub use crypto::{
    Envelope, EnvelopeHeader, EnvelopeMode, HandshakeInit, HandshakeResponse, MessageKind,
};
pub use keystore::{KeyEncryptionKey, KEY_TABLE};
pub use mailbox::{DeadLetter, DeadLetterReason};
pub use policy::{AllowRegistered, DeliveryContext, DeliveryPolicy, PolicyDecision};

/// How messages are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every message is signed with the sender's Ed25519 key (non-repudiable: anyone with
    /// the sender's public key can check who sent it) and encrypted under the static pair key.
    #[default]
    Signed,
    /// A signed handshake (Ed25519 over both parties' ephemeral X25519 keys) authenticates a
    /// per-pair AEAD session; messages then carry only the AES-GCM tag. Much faster, but
    /// a message proves its origin only to the two parties (either could have made it), not
    /// to a third party.
    Session,
}

/// `[communication]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommunicationConfig {
    /// Encrypt payloads (AES-256-GCM). Authentication (signature or AEAD tag) is always on.
    pub enable_encryption: bool,
    /// Largest accepted payload in bytes.
    pub max_message_size: usize,
    /// How long a send may wait for room in a full mailbox, and how long a request waits
    /// for its reply.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// `signed` (Ed25519 per message) or `session` (signed handshake, then AEAD only).
    pub auth_mode: AuthMode,
    /// Most messages one mailbox holds.
    pub mailbox_capacity: usize,
    /// Most bytes one mailbox holds (at least `max_message_size`).
    pub mailbox_max_bytes: usize,
    /// TTL used when an agent frame gives none (`ttl_ms = 0`).
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// How long envelopes under a rotated-out key (or a retired session) still verify.
    #[serde(with = "humantime_serde")]
    pub key_rotation_grace: Duration,
    /// Age after which a session is replaced by a new handshake.
    #[serde(with = "humantime_serde")]
    pub session_lifetime: Duration,
    /// Most dead letters kept (oldest dropped first).
    pub dead_letter_capacity: usize,
    /// Width of the anti-replay window per (sender, recipient, priority), in messages.
    pub replay_window: usize,
    /// Require [`Capability::Messaging`](crate::types::Capability::Messaging) of senders and
    /// recipients.
    pub require_messaging_capability: bool,
    /// Also audit every accepted and delivered message (metadata only). Rejections, dead
    /// letters, registrations and key changes are always audited.
    pub audit_deliveries: bool,
    /// How often expired messages are swept to the dead-letter queue and expired keys purged.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for CommunicationConfig {
    fn default() -> Self {
        Self {
            enable_encryption: true,
            max_message_size: 1024 * 1024,
            delivery_timeout: Duration::from_secs(30),
            auth_mode: AuthMode::Signed,
            mailbox_capacity: 1024,
            mailbox_max_bytes: 64 * 1024 * 1024,
            default_ttl: Duration::from_secs(300),
            key_rotation_grace: Duration::from_secs(60),
            session_lifetime: Duration::from_secs(3600),
            dead_letter_capacity: 10_000,
            replay_window: 4096,
            require_messaging_capability: true,
            audit_deliveries: true,
            sweep_interval: Duration::from_secs(1),
        }
    }
}

impl CommunicationConfig {
    /// Largest frame body the sandbox bridge accepts: a base64 payload of
    /// `max_message_size` plus room for the JSON around it.
    pub fn max_frame_size(&self) -> usize {
        self.max_message_size.div_ceil(3) * 4 + 64 * 1024
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
        if self.max_message_size > u32::MAX as usize / 2 {
            issues.push(ConfigIssue::new(
                "communication.max_message_size",
                "must be below 2 GiB",
            ));
        }
        for (key, value) in [
            ("communication.delivery_timeout", self.delivery_timeout),
            ("communication.default_ttl", self.default_ttl),
            ("communication.session_lifetime", self.session_lifetime),
            ("communication.sweep_interval", self.sweep_interval),
        ] {
            if value.is_zero() {
                issues.push(ConfigIssue::new(key, "must be longer than 0s"));
            }
        }
        if self.mailbox_capacity == 0 {
            issues.push(ConfigIssue::new(
                "communication.mailbox_capacity",
                "must be at least 1",
            ));
        }
        if self.mailbox_max_bytes < self.max_message_size {
            issues.push(ConfigIssue::new(
                "communication.mailbox_max_bytes",
                format!(
                    "must be at least max_message_size ({} bytes)",
                    self.max_message_size
                ),
            ));
        }
        if self.dead_letter_capacity == 0 {
            issues.push(ConfigIssue::new(
                "communication.dead_letter_capacity",
                "must be at least 1",
            ));
        }
        if self.replay_window < 64 || self.replay_window > 1 << 20 {
            issues.push(ConfigIssue::new(
                "communication.replay_window",
                "must be between 64 and 1048576",
            ));
        }
    }
}

/// Why a message was refused by verification or policy (all SEC_001).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The Ed25519 signature does not verify (forged, or header/ciphertext altered).
    BadSignature,
    /// The AEAD tag does not verify (ciphertext, header or key altered).
    AuthenticationFailed,
    /// The sequence number was already accepted (or is older than the replay window).
    Replayed,
    /// The message's TTL had elapsed when it was presented.
    Expired,
    /// The envelope is addressed to another agent, or comes from another bus instance.
    WrongRecipient,
    /// The sender is not registered.
    UnknownSender,
    /// The key epoch or session it names is unknown or past its rotation grace period.
    KeyExpired,
    /// The delivery policy denied it.
    PolicyDenied,
    /// Sender or recipient lacks the Messaging capability.
    MissingCapability,
    /// The envelope is malformed (missing signature, length mismatch, unencrypted while
    /// encryption is required).
    Malformed,
    /// A reply came from an agent other than the one the request was sent to.
    SpoofedReply,
}

impl RejectReason {
    /// A short snake_case name, as recorded in the audit trail.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::BadSignature => "bad_signature",
            RejectReason::AuthenticationFailed => "authentication_failed",
            RejectReason::Replayed => "replayed",
            RejectReason::Expired => "expired",
            RejectReason::WrongRecipient => "wrong_recipient",
            RejectReason::UnknownSender => "unknown_sender",
            RejectReason::KeyExpired => "key_expired",
            RejectReason::PolicyDenied => "policy_denied",
            RejectReason::MissingCapability => "missing_capability",
            RejectReason::Malformed => "malformed",
            RejectReason::SpoofedReply => "spoofed_reply",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// A message was refused by verification or policy.
    #[error("security violation: message rejected ({reason}): {detail}")]
    Rejected {
        /// Why.
        reason: RejectReason,
        /// Details (ids, epochs; never payload).
        detail: String,
    },
    /// The payload is larger than `max_message_size`; refused before any work.
    #[error("message of {size} bytes exceeds max_message_size of {max} bytes")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The recipient's mailbox stayed full for the whole delivery timeout.
    #[error("mailbox of agent {agent} is full (waited {waited:?}); the message was dead-lettered")]
    MailboxFull {
        /// The recipient.
        agent: AgentId,
        /// How long the sender waited.
        waited: Duration,
    },
    /// A wait (a reply, a receive) took longer than allowed.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        operation: String,
        /// The limit.
        after: Duration,
    },
    /// The message is not valid as given (zero TTL, bad topic, reply to a non-request).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A sandbox bridge received a frame it cannot use.
    #[error("agent protocol error: {0}")]
    Protocol(String),
    /// Keys could not be stored or loaded.
    #[error("key store: {0}")]
    KeyStore(String),
}

impl CommunicationError {
    /// Stable code: COMM_001 delivery failed, COMM_002 too large, COMM_003 mailbox full,
    /// COMM_004 timeout, COMM_005 invalid message, COMM_006 protocol error, COMM_007 key
    /// store, SEC_001 security violation.
    pub fn code(&self) -> &'static str {
        match self {
            CommunicationError::DeliveryFailed(_) => "COMM_001",
            CommunicationError::TooLarge { .. } => "COMM_002",
            CommunicationError::MailboxFull { .. } => "COMM_003",
            CommunicationError::Timeout { .. } => "COMM_004",
            CommunicationError::InvalidMessage(_) => "COMM_005",
            CommunicationError::Protocol(_) => "COMM_006",
            CommunicationError::KeyStore(_) => "COMM_007",
            CommunicationError::Security(_) | CommunicationError::Rejected { .. } => "SEC_001",
        }
    }

    /// The rejection reason, for SEC_001 rejections.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            CommunicationError::Rejected { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        let mut issues = Vec::new();
        CommunicationConfig::default().validate(&mut issues);
        assert!(issues.is_empty(), "{issues:?}");
        let bad = CommunicationConfig {
            mailbox_capacity: 0,
            mailbox_max_bytes: 10,
            replay_window: 1,
            ..Default::default()
        };
        bad.validate(&mut issues);
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"communication.mailbox_capacity"));
        assert!(keys.contains(&"communication.mailbox_max_bytes"));
        assert!(keys.contains(&"communication.replay_window"));
    }

    #[test]
    fn config_parses_from_toml_with_modes() {
        let c: CommunicationConfig =
            toml::from_str("auth_mode = \"session\"\nkey_rotation_grace = \"5s\"\n")
                .expect("parses");
        assert_eq!(c.auth_mode, AuthMode::Session);
        assert_eq!(c.key_rotation_grace, Duration::from_secs(5));
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(
            CommunicationError::DeliveryFailed(String::new()).code(),
            "COMM_001"
        );
        assert_eq!(
            CommunicationError::Security(String::new()).code(),
            "SEC_001"
        );
        assert_eq!(
            CommunicationError::Rejected {
                reason: RejectReason::Replayed,
                detail: String::new()
            }
            .code(),
            "SEC_001"
        );
        assert_eq!(
            CommunicationError::TooLarge { size: 2, max: 1 }.code(),
            "COMM_002"
        );
    }
}
