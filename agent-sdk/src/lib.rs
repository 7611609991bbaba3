//! # symbiont-agent
//!
//! The client library for agent programs running inside a symbiont sandbox. The runtime and
//! the agent talk over the agent's stdin (runtime → agent) and stdout (agent → runtime) in
//! length-prefixed frames: a 4-byte big-endian length, then a JSON object (see
//! `docs/protocol.md`). The runtime verifies and decrypts messages before they reach the
//! agent, and signs and encrypts what the agent sends: no key ever enters the sandbox.
//!
//! Agents must not print anything else on stdout (use stderr or [`Agent::log`]).
//!
//! ```no_run
//! use symbiont_agent::{Agent, Incoming};
//!
//! fn main() -> Result<(), symbiont_agent::FrameError> {
//!     let mut agent = Agent::stdio()?;
//!     while let Some(event) = agent.next_event()? {
//!         match event {
//!             Incoming::Message { message, .. } => {
//!                 agent.send(&message.from, "echo", &message.payload)?;
//!             }
//!             Incoming::Task { task_id, input, .. } => {
//!                 agent.task_result(&task_id, true, &input, None)?;
//!             }
//!             _ => {}
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! - [`protocol`]: the frame types, shared with the runtime;
//! - [`codec`]: blocking framing over `std::io`;
//! - `r#async` (feature `tokio`): the same framing over tokio streams and a `tokio_util` codec.

pub mod codec;
pub mod protocol;

#[cfg(feature = "tokio")]
pub mod r#async;

use std::io::{BufReader, BufWriter, Read, Write};

pub use codec::{FrameError, DEFAULT_MAX_FRAME};
pub use protocol::{
    AgentFrame, DeliveryKind, RuntimeFrame, WireMessage, WirePriority, PROTOCOL_VERSION,
};

/// What the runtime sent, as an agent program handles it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A message (direct, topic, request or reply).
    Message {
        /// The message.
        message: WireMessage,
        /// How it got here.
        kind: DeliveryKind,
        /// For replies: the request it answers.
        in_reply_to: Option<String>,
    },
    /// A task to run; answer with [`Agent::task_result`].
    Task {
        /// Task id.
        task_id: String,
        /// Input bytes.
        input: Vec<u8>,
        /// How long the runtime waits, in milliseconds.
        timeout_ms: u64,
        /// The definition handler it runs, if any.
        handler: Option<protocol::HandlerCall>,
    },
    /// A frame the agent sent was accepted.
    Ack {
        /// Its id.
        ref_id: String,
    },
    /// A frame the agent sent failed, or the runtime reports a problem.
    Error {
        /// The frame it concerns.
        ref_id: Option<String>,
        /// Stable code (`COMM_001`, `SEC_001`, ...).
        code: String,
        /// Explanation.
        message: String,
    },
}

/// A connection to the runtime: reads [`RuntimeFrame`]s, writes [`AgentFrame`]s.
#[derive(Debug)]
pub struct Agent<R: Read, W: Write> {
    reader: R,
    writer: W,
    id: String,
    max_frame: usize,
}

impl Agent<BufReader<std::io::Stdin>, BufWriter<std::io::Stdout>> {
    /// Connects over the process's stdin/stdout and reads the runtime's `hello`.
    pub fn stdio() -> Result<Self, FrameError> {
        Self::connect(
            BufReader::new(std::io::stdin()),
            BufWriter::new(std::io::stdout()),
        )
    }
}

impl<R: Read, W: Write> Agent<R, W> {
    /// Connects over any pair of streams and reads the runtime's `hello`.
    pub fn connect(mut reader: R, writer: W) -> Result<Self, FrameError> {
        match codec::read_frame::<_, RuntimeFrame>(&mut reader, DEFAULT_MAX_FRAME)? {
            Some(RuntimeFrame::Hello {
                agent_id,
                protocol_version,
                max_frame_size,
            }) => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(FrameError::Malformed(format!(
                        "runtime speaks protocol {protocol_version}, this SDK {PROTOCOL_VERSION}"
                    )));
                }
                Ok(Self {
                    reader,
                    writer,
                    id: agent_id,
                    max_frame: max_frame_size as usize,
                })
            }
            Some(other) => Err(FrameError::Malformed(format!(
                "expected hello, got {other:?}"
            ))),
            None => Err(FrameError::Truncated { got: 0, want: 4 }),
        }
    }

    /// This agent's id, as the runtime told it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next frame from the runtime; `Ok(None)` when the runtime closed the stream.
    pub fn next_event(&mut self) -> Result<Option<Incoming>, FrameError> {
        loop {
            let Some(frame) =
                codec::read_frame::<_, RuntimeFrame>(&mut self.reader, self.max_frame)?
            else {
                return Ok(None);
            };
            let incoming = match frame {
                RuntimeFrame::Hello { .. } => continue,
                RuntimeFrame::Deliver {
                    message,
                    kind,
                    in_reply_to,
                } => Incoming::Message {
                    message,
                    kind,
                    in_reply_to,
                },
                RuntimeFrame::Task {
                    task_id,
                    input,
                    timeout_ms,
                    handler,
                } => Incoming::Task {
                    task_id,
                    input,
                    timeout_ms,
                    handler,
                },
                RuntimeFrame::Ack { ref_id } => Incoming::Ack { ref_id },
                RuntimeFrame::Error {
                    ref_id,
                    code,
                    message,
                } => Incoming::Error {
                    ref_id,
                    code,
                    message,
                },
            };
            return Ok(Some(incoming));
        }
    }

    /// Writes any frame.
    pub fn write(&mut self, frame: &AgentFrame) -> Result<(), FrameError> {
        let bytes = codec::encode_frame(frame, self.max_frame)?;
        self.writer.write_all(&bytes)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Sends `payload` to agent `to` on `topic` (normal priority, default TTL). Returns the
    /// new message id; an `ack` or `error` frame with this id follows.
    pub fn send(&mut self, to: &str, topic: &str, payload: &[u8]) -> Result<String, FrameError> {
        self.send_with(to, topic, payload, WirePriority::Normal, 0)
    }

    /// Sends with an explicit priority and TTL (milliseconds, 0 = default).
    pub fn send_with(
        &mut self,
        to: &str,
        topic: &str,
        payload: &[u8],
        priority: WirePriority,
        ttl_ms: u64,
    ) -> Result<String, FrameError> {
        let id = new_id();
        self.write(&AgentFrame::Send {
            id: id.clone(),
            to: to.into(),
            topic: topic.into(),
            payload: payload.to_vec(),
            priority,
            ttl_ms,
        })?;
        Ok(id)
    }

    /// Publishes `payload` on `topic`. Returns the message id.
    pub fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<String, FrameError> {
        let id = new_id();
        self.write(&AgentFrame::Publish {
            id: id.clone(),
            topic: topic.into(),
            payload: payload.to_vec(),
            priority: WirePriority::Normal,
            ttl_ms: 0,
        })?;
        Ok(id)
    }

    /// Sends a request; its reply arrives later as [`Incoming::Message`] with
    /// `in_reply_to` = the returned id (or [`Incoming::Error`] with `ref_id` = it).
    pub fn request(
        &mut self,
        to: &str,
        topic: &str,
        payload: &[u8],
        timeout_ms: u64,
    ) -> Result<String, FrameError> {
        let id = new_id();
        self.write(&AgentFrame::Request {
            id: id.clone(),
            to: to.into(),
            topic: topic.into(),
            payload: payload.to_vec(),
            priority: WirePriority::Normal,
            ttl_ms: 0,
            timeout_ms,
        })?;
        Ok(id)
    }

    /// Answers the request with id `request_id`.
    pub fn reply(&mut self, request_id: &str, payload: &[u8]) -> Result<String, FrameError> {
        let id = new_id();
        self.write(&AgentFrame::Reply {
            id: id.clone(),
            in_reply_to: request_id.into(),
            payload: payload.to_vec(),
        })?;
        Ok(id)
    }

    /// Subscribes to `topic` (exact, or a prefix ending in `.*`).
    pub fn subscribe(&mut self, topic: &str) -> Result<String, FrameError> {
        let id = new_id();
        self.write(&AgentFrame::Subscribe {
            id: id.clone(),
            topic: topic.into(),
        })?;
        Ok(id)
    }

    /// Sends one result of task `task_id` (any number before its `task_result`); the
    /// runtime routes each as the agent's definition handler says.
    pub fn output(&mut self, task_id: &str, payload: &[u8]) -> Result<(), FrameError> {
        self.write(&AgentFrame::Output {
            task_id: task_id.to_string(),
            payload: payload.to_vec(),
        })
    }

    /// Reports a task's outcome.
    pub fn task_result(
        &mut self,
        task_id: &str,
        ok: bool,
        output: &[u8],
        error: Option<&str>,
    ) -> Result<(), FrameError> {
        self.write(&AgentFrame::TaskResult {
            task_id: task_id.into(),
            ok,
            output: output.to_vec(),
            error: error.map(str::to_string),
        })
    }

    /// Sends a log line to the runtime's log.
    pub fn log(&mut self, level: &str, message: &str) -> Result<(), FrameError> {
        self.write(&AgentFrame::Log {
            level: level.into(),
            message: message.into(),
        })
    }

    /// Tells the runtime this agent is alive.
    pub fn heartbeat(&mut self) -> Result<(), FrameError> {
        self.write(&AgentFrame::Heartbeat {})
    }
}

/// A fresh message id (UUID v4).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_reads_hello_then_messages_and_writes_frames() {
        let mut input = Vec::new();
        codec::write_frame(
            &mut input,
            &RuntimeFrame::Hello {
                agent_id: "me".into(),
                protocol_version: PROTOCOL_VERSION,
                max_frame_size: 4096,
            },
        )
        .expect("hello");
        let msg = WireMessage {
            id: "m".into(),
            from: "you".into(),
            to: "me".into(),
            topic: "t".into(),
            payload: vec![0, 1, 2, 255],
            priority: WirePriority::Critical,
            ttl_ms: 10,
        };
        codec::write_frame(
            &mut input,
            &RuntimeFrame::Deliver {
                message: msg.clone(),
                kind: DeliveryKind::Direct,
                in_reply_to: None,
            },
        )
        .expect("deliver");
        let mut output = Vec::new();
        let mut agent = Agent::connect(&input[..], &mut output).expect("connect");
        assert_eq!(agent.id(), "me");
        let got = agent.next_event().expect("next").expect("a frame");
        assert_eq!(
            got,
            Incoming::Message {
                message: msg,
                kind: DeliveryKind::Direct,
                in_reply_to: None
            }
        );
        assert_eq!(agent.next_event().expect("eof"), None);
        let id = agent.send("you", "t", b"back").expect("send");
        drop(agent);
        let sent: AgentFrame = codec::read_frame(&mut &output[..], 4096)
            .expect("read")
            .expect("frame");
        match sent {
            AgentFrame::Send {
                id: sid, payload, ..
            } => {
                assert_eq!(sid, id);
                assert_eq!(payload, b"back");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_protocol_version_is_refused() {
        let mut input = Vec::new();
        codec::write_frame(
            &mut input,
            &RuntimeFrame::Hello {
                agent_id: "me".into(),
                protocol_version: PROTOCOL_VERSION + 1,
                max_frame_size: 4096,
            },
        )
        .expect("hello");
        assert!(Agent::connect(&input[..], Vec::new()).is_err());
    }
}
