//! Helpers shared by the communication bus test binaries: registered agents and messages.

use std::time::Duration;

use symbiont_runtime::communication::*;
use symbiont_runtime::types::*;

/// The capability every test agent holds.
pub const MSG: [Capability; 1] = [Capability::Messaging];

/// Registers `n` fresh agents with the Messaging capability.
pub async fn agents(bus: &DefaultCommunicationBus, n: usize) -> Vec<AgentId> {
    let mut out = Vec::new();
    for _ in 0..n {
        let id = AgentId::new();
        bus.register_agent(id, MSG.to_vec())
            .await
            .expect("register");
        out.push(id);
    }
    out
}

/// A normal-priority message with a 300 s TTL.
pub fn msg(from: AgentId, to: AgentId, topic: &str, payload: &[u8]) -> Message {
    Message {
        id: MessageId::new(),
        from,
        to,
        topic: topic.to_string(),
        payload: payload.to_vec(),
        priority: Priority::Normal,
        ttl: Duration::from_secs(300),
    }
}
