//! The frame types of the symbiont agent protocol (see `docs/protocol.md`).
//!
//! Two enums, one per direction: [`RuntimeFrame`] (runtime → agent, written to the agent's
//! stdin) and [`AgentFrame`] (agent → runtime, written by the agent to its stdout). Each frame
//! is one JSON object with a `"type"` field naming the variant in `snake_case`. Binary payloads
//! travel as standard base64 strings (with padding).

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. The runtime sends it in [`RuntimeFrame::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Message priority on the wire. Ordered `Low < Normal < High < Critical`; a mailbox
/// delivers `Critical` first and is FIFO within one priority.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WirePriority {
    /// Background.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Ahead of normal.
    High,
    /// Ahead of everything.
    Critical,
}

/// How a delivered message reached the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryKind {
    /// Sent to this agent directly.
    Direct,
    /// Published on a topic this agent subscribed to.
    Topic,
    /// A request: the sender waits for a [`AgentFrame::Reply`] with `in_reply_to` = its id.
    Request,
    /// The reply to a request this agent made (`in_reply_to` names the request).
    Reply,
}

/// A message as an agent sees it (already verified and decrypted by the runtime).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// Message id (a UUID).
    pub id: String,
    /// Sender agent id (a UUID). Set by the runtime from the verified signature.
    pub from: String,
    /// Recipient agent id (a UUID).
    pub to: String,
    /// Topic.
    pub topic: String,
    /// Payload bytes (base64 on the wire).
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// Priority.
    #[serde(default)]
    pub priority: WirePriority,
    /// Remaining time to live in milliseconds when it was delivered.
    pub ttl_ms: u64,
}

/// Which handler of the agent's definition a task runs, and what triggered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerCall {
    /// The handler's name (`start`, `message:TOPIC`, `schedule:EXPR`, or its `as NAME`).
    pub name: String,
    /// What triggered it: `start`, `message` or `schedule`.
    pub trigger: String,
    /// For a message handler: the message's topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// For a message handler: the sender's agent id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For a message handler: the message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// Frames the runtime writes to the agent (the agent reads them from stdin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuntimeFrame {
    /// First frame of every connection.
    Hello {
        /// The agent's own id.
        agent_id: String,
        /// [`PROTOCOL_VERSION`] of the runtime.
        protocol_version: u32,
        /// Largest frame body (bytes) either side may send.
        max_frame_size: u32,
    },
    /// A message for the agent.
    Deliver {
        /// The message.
        message: WireMessage,
        /// How it got here.
        kind: DeliveryKind,
        /// For `kind = reply`: the id of the request it answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<String>,
    },
    /// A task for the agent to run; answer with [`AgentFrame::TaskResult`].
    Task {
        /// Task id.
        task_id: String,
        /// Task input bytes (base64 on the wire): the submitted input, or the message
        /// payload for a message handler.
        #[serde(with = "b64")]
        input: Vec<u8>,
        /// How long the runtime waits for the result, in milliseconds.
        timeout_ms: u64,
        /// The definition handler this task runs (absent for tasks submitted directly).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handler: Option<HandlerCall>,
    },
    /// An agent frame with id `ref_id` was accepted (the message is queued for its recipient).
    Ack {
        /// Id of the acknowledged frame (`send`, `publish`, `reply`, `subscribe`, ...).
        ref_id: String,
    },
    /// Something failed. `ref_id` names the agent frame it concerns, if any.
    Error {
        /// Id of the agent frame that failed, if the error concerns one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ref_id: Option<String>,
        /// Stable error code (`COMM_001`, `SEC_001`, ...).
        code: String,
        /// Explanation.
        message: String,
    },
}

/// Frames an agent writes to the runtime (to its stdout).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentFrame {
    /// Send a message to one agent.
    Send {
        /// New message id (a UUID chosen by the agent).
        id: String,
        /// Recipient agent id.
        to: String,
        /// Topic.
        topic: String,
        /// Payload (base64 on the wire).
        #[serde(with = "b64")]
        payload: Vec<u8>,
        /// Priority.
        #[serde(default)]
        priority: WirePriority,
        /// Time to live in milliseconds (`0`: the runtime's default).
        #[serde(default)]
        ttl_ms: u64,
    },
    /// Publish to every subscriber of `topic`.
    Publish {
        /// New message id.
        id: String,
        /// Topic.
        topic: String,
        /// Payload (base64 on the wire).
        #[serde(with = "b64")]
        payload: Vec<u8>,
        /// Priority.
        #[serde(default)]
        priority: WirePriority,
        /// Time to live in milliseconds (`0`: the runtime's default).
        #[serde(default)]
        ttl_ms: u64,
    },
    /// Send a request; the reply comes back as a `deliver` frame of kind `reply` with
    /// `in_reply_to` = `id`, or as an `error` frame with `ref_id` = `id` (COMM_004 on timeout).
    Request {
        /// New message id (also the correlation id).
        id: String,
        /// Recipient agent id.
        to: String,
        /// Topic.
        topic: String,
        /// Payload (base64 on the wire).
        #[serde(with = "b64")]
        payload: Vec<u8>,
        /// Priority.
        #[serde(default)]
        priority: WirePriority,
        /// Time to live in milliseconds (`0`: the runtime's default).
        #[serde(default)]
        ttl_ms: u64,
        /// How long to wait for the reply (`0`: the runtime's `delivery_timeout`).
        #[serde(default)]
        timeout_ms: u64,
    },
    /// Answer a request delivered earlier.
    Reply {
        /// New message id.
        id: String,
        /// Id of the request being answered.
        in_reply_to: String,
        /// Payload (base64 on the wire).
        #[serde(with = "b64")]
        payload: Vec<u8>,
    },
    /// Receive messages published on `topic` (exact name, or a prefix ending in `.*`).
    Subscribe {
        /// Frame id (acknowledged).
        id: String,
        /// Topic or pattern.
        topic: String,
    },
    /// Stop receiving `topic`.
    Unsubscribe {
        /// Frame id (acknowledged).
        id: String,
        /// Topic or pattern.
        topic: String,
    },
    /// One result of a running task (any number, before its `task_result`). For a
    /// definition handler the runtime routes each as the handler says (`reply` to the
    /// message's sender, `send` publishes on a topic).
    Output {
        /// Task id.
        task_id: String,
        /// The result bytes (base64 on the wire).
        #[serde(with = "b64")]
        payload: Vec<u8>,
    },
    /// The outcome of a task delivered with [`RuntimeFrame::Task`].
    TaskResult {
        /// Task id.
        task_id: String,
        /// True when the task succeeded.
        ok: bool,
        /// Output bytes (base64 on the wire).
        #[serde(with = "b64", default)]
        output: Vec<u8>,
        /// Why it failed, when `ok` is false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A log line (the runtime forwards it to its own log, tagged with the agent id).
    Log {
        /// `trace`, `debug`, `info`, `warn` or `error`.
        level: String,
        /// The line.
        message: String,
    },
    /// I am alive.
    Heartbeat {},
    /// The agent could not handle something the runtime sent.
    Error {
        /// The runtime frame it concerns, if any (a message or task id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ref_id: Option<String>,
        /// Agent-defined code.
        code: String,
        /// Explanation.
        message: String,
    },
}

/// Serde helper: `Vec<u8>` as a standard base64 string.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Deserializes base64 into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_frame_json_shape_is_stable() {
        let f = AgentFrame::Send {
            id: "m1".into(),
            to: "a".into(),
            topic: "t".into(),
            payload: b"hi".to_vec(),
            priority: WirePriority::High,
            ttl_ms: 5,
        };
        let json = serde_json::to_string(&f).expect("serializes");
        assert_eq!(
            json,
            r#"{"type":"send","id":"m1","to":"a","topic":"t","payload":"aGk=","priority":"high","ttl_ms":5}"#
        );
        let back: AgentFrame = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, f);
    }

    #[test]
    fn optional_fields_default() {
        let f: AgentFrame =
            serde_json::from_str(r#"{"type":"send","id":"x","to":"y","topic":"t","payload":""}"#)
                .expect("parses");
        match f {
            AgentFrame::Send {
                priority, ttl_ms, ..
            } => {
                assert_eq!(priority, WirePriority::Normal);
                assert_eq!(ttl_ms, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
        let hb: AgentFrame = serde_json::from_str(r#"{"type":"heartbeat"}"#).expect("parses");
        assert_eq!(hb, AgentFrame::Heartbeat {});
    }

    #[test]
    fn unknown_fields_and_bad_base64_are_refused() {
        assert!(serde_json::from_str::<AgentFrame>(r#"{"type":"heartbeat","x":1}"#).is_err());
        assert!(serde_json::from_str::<AgentFrame>(
            r#"{"type":"send","id":"x","to":"y","topic":"t","payload":"!!"}"#
        )
        .is_err());
    }
}
