//! The delivery policy hook: who may talk to whom.
//!
//! Before any cryptographic work, the bus checks that sender and recipient are registered,
//! that both hold [`Capability::Messaging`] when `require_messaging_capability` is on (the
//! default), and then asks the configured [`DeliveryPolicy`]. A denial is SEC_001, audited as
//! `MessageRejected` with the policy's reason. The policy engine implements this trait; the
//! default, [`AllowRegistered`], allows every pair of registered agents.

use crate::types::{AgentId, Capability, Priority};

use super::crypto::MessageKind;

/// What the policy is asked about. No payload: policies decide on metadata.
#[derive(Clone, Debug)]
pub struct DeliveryContext<'a> {
    /// Sender.
    pub from: AgentId,
    /// Recipient (for a publication: each subscriber in turn).
    pub to: AgentId,
    /// Topic.
    pub topic: &'a str,
    /// Kind of message.
    pub kind: MessageKind,
    /// Priority.
    pub priority: Priority,
    /// Payload size in bytes.
    pub size: usize,
    /// The sender's registered capabilities.
    pub from_capabilities: &'a [Capability],
    /// The recipient's registered capabilities.
    pub to_capabilities: &'a [Capability],
}

/// A policy's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyDecision {
    /// Deliver.
    Allow,
    /// Refuse, with the reason recorded in the audit trail and the SEC_001 error.
    Deny(String),
}

/// Decides whether a message may be delivered. Called on the send path for every message
/// (and for every subscriber of a publication), so it must be fast and must not block.
pub trait DeliveryPolicy: Send + Sync + 'static {
    /// Allow or deny delivery of the message described by `ctx`.
    fn check(&self, ctx: &DeliveryContext<'_>) -> PolicyDecision;

    /// Allow or deny `from` publishing on `topic` at all (checked once per publication,
    /// before any copy is made, so a denied publication is refused even when nobody is
    /// subscribed). Allowed by default; each copy still goes through [`DeliveryPolicy::check`].
    fn check_publish(
        &self,
        from: AgentId,
        topic: &str,
        priority: Priority,
        size: usize,
    ) -> PolicyDecision {
        let _ = (from, topic, priority, size);
        PolicyDecision::Allow
    }

    /// Allow or deny `agent` subscribing to `topic`. Allowed by default.
    fn check_subscribe(&self, agent: AgentId, topic: &str) -> PolicyDecision {
        let _ = (agent, topic);
        PolicyDecision::Allow
    }
}

/// Allows every message between registered agents (registration and the Messaging
/// capability are checked by the bus itself).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowRegistered;

impl DeliveryPolicy for AllowRegistered {
    fn check(&self, _ctx: &DeliveryContext<'_>) -> PolicyDecision {
        PolicyDecision::Allow
    }
}

impl<F> DeliveryPolicy for F
where
    F: Fn(&DeliveryContext<'_>) -> PolicyDecision + Send + Sync + 'static,
{
    fn check(&self, ctx: &DeliveryContext<'_>) -> PolicyDecision {
        self(ctx)
    }
}
