//! The sandbox bridge: connects an agent program's stdin/stdout (any `AsyncRead` /
//! `AsyncWrite`, e.g. a sandbox's [`SandboxStdio`](crate::sandbox::SandboxStdio)) to the bus.
//!
//! The program speaks the frame protocol of the `symbiont-agent` crate (`docs/protocol.md`):
//! the bridge reads its [`AgentFrame`]s and acts on the bus **as that agent** (a frame has no
//! `from`: the bridge sets it, so an agent cannot speak for another), and writes the
//! messages delivered to the agent (verified and decrypted by the bus) as [`RuntimeFrame`]s.
//! Signing and encryption happen here, at the sandbox boundary; no key enters the sandbox.
//!
//! Tasks go in with [`BridgeHandle::deliver_task`]; task results, log lines, heartbeats and
//! agent errors come out as [`BridgeEvent`]s.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use symbiont_agent::protocol::{
    AgentFrame, DeliveryKind, HandlerCall, RuntimeFrame, WireMessage, WirePriority,
};
use symbiont_agent::r#async::{read_frame, write_frame};
use symbiont_agent::{FrameError, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{CommunicationError, DefaultCommunicationBus, Message, MessageKind, ReceivedMessage};
use crate::types::{AgentId, MessageId, Priority, TaskId};

/// Settings of one bridge.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// Most messages taken from the mailbox (and verified together) at once.
    pub receive_batch: usize,
    /// Frames queued for the agent's stdin before delivery waits (backpressure).
    pub outbound_queue: usize,
    /// Events queued for the runtime before log lines and heartbeats are dropped.
    pub event_queue: usize,
    /// Requests delivered to the agent that it may still answer (oldest forgotten first).
    pub open_requests: usize,
    /// Take the agent's messages from its mailbox and write them to it. `false` when the
    /// runtime consumes the mailbox itself (e.g. to run handlers) and hands the rest over
    /// with [`BridgeSender::deliver_message`].
    pub consume_mailbox: bool,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            receive_batch: 64,
            outbound_queue: 256,
            event_queue: 1024,
            open_requests: 1024,
            consume_mailbox: true,
        }
    }
}

/// Something the agent reported to the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BridgeEvent {
    /// A task's outcome.
    TaskResult {
        /// Task id as given to [`BridgeHandle::deliver_task`].
        task_id: String,
        /// Success.
        ok: bool,
        /// Output bytes.
        output: Vec<u8>,
        /// Failure reason.
        error: Option<String>,
    },
    /// One result of a running task (an `output` frame).
    Output {
        /// Task id as given to [`BridgeHandle::deliver_task`].
        task_id: String,
        /// The result bytes.
        payload: Vec<u8>,
    },
    /// A log line (also forwarded to `tracing`).
    Log {
        /// Level name as sent.
        level: String,
        /// The line.
        message: String,
    },
    /// The agent is alive.
    Heartbeat,
    /// The agent reported an error.
    AgentError {
        /// The frame it concerns.
        ref_id: Option<String>,
        /// Its code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The agent's stdout ended (or broke the protocol); the bridge stopped.
    Closed {
        /// Why, when it was not a clean end of stream.
        error: Option<String>,
    },
}

/// A running bridge.
#[derive(Debug)]
pub struct BridgeHandle {
    agent: AgentId,
    frames: mpsc::Sender<RuntimeFrame>,
    events: mpsc::Receiver<BridgeEvent>,
    reader: JoinHandle<()>,
    delivery: JoinHandle<()>,
    open: Arc<Mutex<OpenRequests>>,
}

/// A cloneable handle that writes tasks and messages to a bridged agent, while the
/// [`BridgeHandle`] owner reads its events.
#[derive(Clone, Debug)]
pub struct BridgeSender {
    agent: AgentId,
    frames: mpsc::Sender<RuntimeFrame>,
    open: Arc<Mutex<OpenRequests>>,
}

impl BridgeSender {
    /// The bridged agent.
    pub fn agent(&self) -> AgentId {
        self.agent
    }

    /// Sends a task to the agent (a `task` frame); its result arrives as
    /// [`BridgeEvent::TaskResult`] on the [`BridgeHandle`].
    pub async fn deliver_task(
        &self,
        task_id: TaskId,
        input: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CommunicationError> {
        send_task(&self.frames, self.agent, task_id, input, timeout, None).await
    }

    /// Sends a task that runs one of the agent's definition handlers.
    pub async fn deliver_handler_task(
        &self,
        task_id: TaskId,
        handler: HandlerCall,
        input: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CommunicationError> {
        send_task(
            &self.frames,
            self.agent,
            task_id,
            input,
            timeout,
            Some(handler),
        )
        .await
    }

    /// Writes a message taken from the agent's mailbox by the runtime as a `deliver` frame
    /// (requests stay answerable with a `reply` frame).
    pub async fn deliver_message(&self, m: ReceivedMessage) -> Result<(), CommunicationError> {
        if m.kind == MessageKind::Request {
            self.open.lock().insert(m.clone());
        }
        self.frames.send(deliver_frame(m)).await.map_err(|_| {
            CommunicationError::DeliveryFailed(format!("bridge of agent {} is closed", self.agent))
        })
    }

    /// True once the bridge's writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.frames.is_closed()
    }

    /// True when `other` sends to the same bridge (the same program's stdin).
    pub fn same_bridge(&self, other: &BridgeSender) -> bool {
        self.frames.same_channel(&other.frames)
    }
}

async fn send_task(
    frames: &mpsc::Sender<RuntimeFrame>,
    agent: AgentId,
    task_id: TaskId,
    input: Vec<u8>,
    timeout: Duration,
    handler: Option<HandlerCall>,
) -> Result<(), CommunicationError> {
    frames
        .send(RuntimeFrame::Task {
            task_id: task_id.to_string(),
            input,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            handler,
        })
        .await
        .map_err(|_| {
            CommunicationError::DeliveryFailed(format!("bridge of agent {agent} is closed"))
        })
}

impl BridgeHandle {
    /// The bridged agent.
    pub fn agent(&self) -> AgentId {
        self.agent
    }

    /// Sends a task to the agent (a `task` frame); its result arrives as
    /// [`BridgeEvent::TaskResult`].
    pub async fn deliver_task(
        &self,
        task_id: TaskId,
        input: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CommunicationError> {
        send_task(&self.frames, self.agent, task_id, input, timeout, None).await
    }

    /// A cloneable sender for tasks and messages to this agent.
    pub fn sender(&self) -> BridgeSender {
        BridgeSender {
            agent: self.agent,
            frames: self.frames.clone(),
            open: self.open.clone(),
        }
    }

    /// The next event from the agent; `None` after [`BridgeEvent::Closed`] was taken.
    pub async fn next_event(&mut self) -> Option<BridgeEvent> {
        self.events.recv().await
    }

    /// Stops the bridge. Messages still in the agent's mailbox stay there.
    pub fn shutdown(self) {
        self.reader.abort();
        self.delivery.abort();
    }

    /// True once the agent's output has ended.
    pub fn is_closed(&self) -> bool {
        self.reader.is_finished()
    }
}

#[derive(Debug)]
struct OpenRequests {
    map: HashMap<String, ReceivedMessage>,
    order: VecDeque<String>,
    cap: usize,
}

impl OpenRequests {
    fn insert(&mut self, m: ReceivedMessage) {
        let id = m.message.id.to_string();
        while self.order.len() >= self.cap.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.map.insert(id, m);
    }

    fn take(&mut self, id: &str) -> Option<ReceivedMessage> {
        let m = self.map.remove(id)?;
        self.order.retain(|x| x != id);
        Some(m)
    }
}

fn wire_priority(p: Priority) -> WirePriority {
    match p {
        Priority::Low => WirePriority::Low,
        Priority::Normal => WirePriority::Normal,
        Priority::High => WirePriority::High,
        Priority::Critical => WirePriority::Critical,
    }
}

fn priority(p: WirePriority) -> Priority {
    match p {
        WirePriority::Low => Priority::Low,
        WirePriority::Normal => Priority::Normal,
        WirePriority::High => Priority::High,
        WirePriority::Critical => Priority::Critical,
    }
}

/// The `deliver` frame for a received message.
pub fn deliver_frame(m: ReceivedMessage) -> RuntimeFrame {
    let kind = match m.kind {
        MessageKind::Direct => DeliveryKind::Direct,
        MessageKind::Topic => DeliveryKind::Topic,
        MessageKind::Request => DeliveryKind::Request,
        MessageKind::Reply => DeliveryKind::Reply,
    };
    RuntimeFrame::Deliver {
        message: WireMessage {
            id: m.message.id.to_string(),
            from: m.message.from.to_string(),
            to: m.message.to.to_string(),
            topic: m.message.topic,
            payload: m.message.payload,
            priority: wire_priority(m.message.priority),
            ttl_ms: u64::try_from(m.message.ttl.as_millis()).unwrap_or(u64::MAX),
        },
        kind,
        in_reply_to: m.in_reply_to.map(|id| id.to_string()),
    }
}

fn error_frame(ref_id: Option<String>, e: &CommunicationError) -> RuntimeFrame {
    RuntimeFrame::Error {
        ref_id,
        code: e.code().to_string(),
        message: e.to_string(),
    }
}

/// Starts a bridge for `agent` (which must be registered on `bus`) over the program's
/// stdout (`from_agent`) and stdin (`to_agent`).
pub fn spawn_bridge<R, W>(
    bus: DefaultCommunicationBus,
    agent: AgentId,
    from_agent: R,
    to_agent: W,
    config: BridgeConfig,
) -> Result<BridgeHandle, CommunicationError>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    if !bus.is_registered(agent) {
        return Err(CommunicationError::DeliveryFailed(format!(
            "agent {agent} is not registered"
        )));
    }
    let max_frame = bus.config().max_frame_size();
    let (frames_tx, frames_rx) = mpsc::channel::<RuntimeFrame>(config.outbound_queue.max(1));
    let (events_tx, events_rx) = mpsc::channel::<BridgeEvent>(config.event_queue.max(1));
    let open = Arc::new(Mutex::new(OpenRequests {
        map: HashMap::new(),
        order: VecDeque::new(),
        cap: config.open_requests,
    }));

    tokio::spawn(writer_loop(agent, to_agent, frames_rx, max_frame));

    let hello = RuntimeFrame::Hello {
        agent_id: agent.to_string(),
        protocol_version: PROTOCOL_VERSION,
        max_frame_size: u32::try_from(max_frame).unwrap_or(u32::MAX),
    };
    // The channel is empty and has room: the hello is always the first frame.
    let _ = frames_tx.try_send(hello);

    let delivery = if config.consume_mailbox {
        tokio::spawn(delivery_loop(
            bus.clone(),
            agent,
            frames_tx.clone(),
            open.clone(),
            config.receive_batch,
        ))
    } else {
        tokio::spawn(async {})
    };
    let reader = tokio::spawn(reader_loop(
        bus,
        agent,
        from_agent,
        frames_tx.clone(),
        events_tx,
        open.clone(),
        max_frame,
        delivery.abort_handle(),
    ));
    Ok(BridgeHandle {
        agent,
        frames: frames_tx,
        events: events_rx,
        reader,
        delivery,
        open,
    })
}

async fn writer_loop<W: AsyncWrite + Send + Unpin>(
    agent: AgentId,
    mut to_agent: W,
    mut frames: mpsc::Receiver<RuntimeFrame>,
    max_frame: usize,
) {
    while let Some(frame) = frames.recv().await {
        if let Err(e) = write_frame(&mut to_agent, &frame, max_frame).await {
            tracing::warn!(agent = %agent, error = %e, "cannot write to the agent; bridge output closed");
            return;
        }
    }
}

async fn delivery_loop(
    bus: DefaultCommunicationBus,
    agent: AgentId,
    frames: mpsc::Sender<RuntimeFrame>,
    open: Arc<Mutex<OpenRequests>>,
    batch: usize,
) {
    loop {
        let msgs = match bus.receive_batch(agent, batch).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(agent = %agent, error = %e, "bridge delivery stopped");
                return;
            }
        };
        let mut iter = msgs.into_iter();
        while let Some(m) = iter.next() {
            if m.kind == MessageKind::Request {
                open.lock().insert(m.clone());
            }
            let undelivered = m.clone();
            if frames.send(deliver_frame(m)).await.is_err() {
                bus.dead_letter_undelivered(&undelivered);
                for rest in iter {
                    bus.dead_letter_undelivered(&rest);
                }
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn reader_loop<R: AsyncRead + Send + Unpin>(
    bus: DefaultCommunicationBus,
    agent: AgentId,
    mut from_agent: R,
    frames: mpsc::Sender<RuntimeFrame>,
    events: mpsc::Sender<BridgeEvent>,
    open: Arc<Mutex<OpenRequests>>,
    max_frame: usize,
    delivery: tokio::task::AbortHandle,
) {
    let closed = loop {
        let frame = match read_frame::<_, AgentFrame>(&mut from_agent, max_frame).await {
            Ok(Some(f)) => f,
            Ok(None) => break None,
            Err(FrameError::Malformed(why)) => {
                let e = CommunicationError::Protocol(format!("malformed frame: {why}"));
                tracing::warn!(agent = %agent, code = e.code(), "agent sent a malformed frame");
                let _ = frames.send(error_frame(None, &e)).await;
                continue;
            }
            Err(e) => {
                let e = CommunicationError::Protocol(e.to_string());
                let _ = frames.send(error_frame(None, &e)).await;
                break Some(e.to_string());
            }
        };
        handle_frame(&bus, agent, frame, &frames, &events, &open).await;
    };
    delivery.abort();
    let _ = events.send(BridgeEvent::Closed { error: closed }).await;
}

fn parse_agent(s: &str) -> Result<AgentId, CommunicationError> {
    AgentId::from_str(s)
        .map_err(|_| CommunicationError::Protocol(format!("`{s}` is not an agent id")))
}

fn parse_message_id(s: &str) -> Result<MessageId, CommunicationError> {
    MessageId::from_str(s)
        .map_err(|_| CommunicationError::Protocol(format!("`{s}` is not a message id (a UUID)")))
}

fn ttl(bus: &DefaultCommunicationBus, ms: u64) -> Duration {
    if ms == 0 {
        bus.config().default_ttl
    } else {
        Duration::from_millis(ms)
    }
}

async fn handle_frame(
    bus: &DefaultCommunicationBus,
    agent: AgentId,
    frame: AgentFrame,
    frames: &mpsc::Sender<RuntimeFrame>,
    events: &mpsc::Sender<BridgeEvent>,
    open: &Arc<Mutex<OpenRequests>>,
) {
    let answer = |id: String, r: Result<(), CommunicationError>| match r {
        Ok(()) => RuntimeFrame::Ack { ref_id: id },
        Err(e) => error_frame(Some(id), &e),
    };
    let reply_frame = match frame {
        AgentFrame::Send {
            id,
            to,
            topic,
            payload,
            priority: p,
            ttl_ms,
        } => {
            let r = async {
                let message = Message {
                    id: parse_message_id(&id)?,
                    from: agent,
                    to: parse_agent(&to)?,
                    topic,
                    payload,
                    priority: priority(p),
                    ttl: ttl(bus, ttl_ms),
                };
                bus.send_message(message).await
            }
            .await;
            Some(answer(id, r))
        }
        AgentFrame::Publish {
            id,
            topic,
            payload,
            priority: p,
            ttl_ms,
        } => {
            let r = async {
                let message = Message {
                    id: parse_message_id(&id)?,
                    from: agent,
                    to: agent,
                    topic,
                    payload,
                    priority: priority(p),
                    ttl: ttl(bus, ttl_ms),
                };
                bus.publish(message).await.map(|_| ())
            }
            .await;
            Some(answer(id, r))
        }
        AgentFrame::Request {
            id,
            to,
            topic,
            payload,
            priority: p,
            ttl_ms,
            timeout_ms,
        } => {
            let built = (|| {
                Ok::<_, CommunicationError>(Message {
                    id: parse_message_id(&id)?,
                    from: agent,
                    to: parse_agent(&to)?,
                    topic,
                    payload,
                    priority: priority(p),
                    ttl: ttl(bus, ttl_ms),
                })
            })();
            match built {
                Err(e) => Some(error_frame(Some(id), &e)),
                Ok(message) => {
                    let timeout = if timeout_ms == 0 {
                        bus.config().delivery_timeout
                    } else {
                        Duration::from_millis(timeout_ms)
                    };
                    let bus = bus.clone();
                    let frames = frames.clone();
                    tokio::spawn(async move {
                        let frame = match bus.request_with_timeout(message, timeout).await {
                            Ok(reply) => deliver_frame(reply),
                            Err(e) => error_frame(Some(id), &e),
                        };
                        let _ = frames.send(frame).await;
                    });
                    None
                }
            }
        }
        AgentFrame::Reply {
            id,
            in_reply_to,
            payload,
        } => {
            let request = open.lock().take(&in_reply_to);
            let r = match request {
                Some(req) => bus.reply(&req, payload).await,
                None => Err(CommunicationError::DeliveryFailed(format!(
                    "no open request {in_reply_to} was delivered to this agent"
                ))),
            };
            Some(answer(id, r))
        }
        AgentFrame::Subscribe { id, topic } => {
            let r = bus.subscribe(agent, topic).await;
            Some(answer(id, r))
        }
        AgentFrame::Unsubscribe { id, topic } => {
            let r = bus.unsubscribe(agent, &topic).await;
            Some(answer(id, r))
        }
        AgentFrame::Output { task_id, payload } => {
            let _ = events.send(BridgeEvent::Output { task_id, payload }).await;
            None
        }
        AgentFrame::TaskResult {
            task_id,
            ok,
            output,
            error,
        } => {
            let _ = events
                .send(BridgeEvent::TaskResult {
                    task_id,
                    ok,
                    output,
                    error,
                })
                .await;
            None
        }
        AgentFrame::Log { level, message } => {
            match level.as_str() {
                "error" => tracing::error!(agent = %agent, "{message}"),
                "warn" => tracing::warn!(agent = %agent, "{message}"),
                "debug" => tracing::debug!(agent = %agent, "{message}"),
                "trace" => tracing::trace!(agent = %agent, "{message}"),
                _ => tracing::info!(agent = %agent, "{message}"),
            }
            let _ = events.try_send(BridgeEvent::Log { level, message });
            None
        }
        AgentFrame::Heartbeat {} => {
            let _ = events.try_send(BridgeEvent::Heartbeat);
            None
        }
        AgentFrame::Error {
            ref_id,
            code,
            message,
        } => {
            tracing::warn!(agent = %agent, code = %code, "agent reported an error: {message}");
            let _ = events
                .send(BridgeEvent::AgentError {
                    ref_id,
                    code,
                    message,
                })
                .await;
            None
        }
    };
    if let Some(f) = reply_frame {
        let _ = frames.send(f).await;
    }
}
