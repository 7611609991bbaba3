//! [`DefaultCommunicationBus`]: registration and keys, admission, sealing, routing into
//! mailboxes, verification and delivery, topics, request/reply, rotation, dead letters.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aes_gcm::Aes256Gcm;
use ed25519_dalek::{Signature, VerifyingKey};
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::crypto::{
    derive_pair_key, handshake_finish, handshake_init, handshake_respond, open_body_in_place,
    random_bytes, seal_body, sign_envelope, verify_envelope, Envelope, EnvelopeHeader,
    EnvelopeMode, Identity, MessageKind,
};
use super::keystore::{KeyEncryptionKey, KeyStore};
use super::mailbox::{
    DeadLetter, DeadLetterQueue, DeadLetterReason, Mailbox, ReplayWindow, Reserve,
};
use super::policy::{AllowRegistered, DeliveryContext, DeliveryPolicy, PolicyDecision};
use super::{AuthMode, CommunicationConfig, CommunicationError, RejectReason};
use crate::config::Validate;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType, AuditSink};
use crate::storage::Store;
use crate::types::{AgentId, Capability, MessageId, Priority};

type Result<T, E = CommunicationError> = std::result::Result<T, E>;

/// A message on the bus. The field set is the seed's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Unique id (also the correlation id of a request).
    pub id: MessageId,
    /// Sender.
    pub from: AgentId,
    /// Recipient (ignored by [`DefaultCommunicationBus::publish`]).
    pub to: AgentId,
    /// Topic.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Priority: a mailbox delivers `Critical` first, FIFO within one priority.
    pub priority: Priority,
    /// Time to live: after it, the message is dead-lettered and never delivered. On a
    /// received message: the time it had left.
    pub ttl: Duration,
}

/// A message as delivered: verified, decrypted, with how it got here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The message (`ttl` is what remained at delivery).
    pub message: Message,
    /// Direct, topic copy, request or reply.
    pub kind: MessageKind,
    /// For replies: the request's id.
    pub in_reply_to: Option<MessageId>,
    /// How it was authenticated.
    pub mode: EnvelopeMode,
    /// The sender's key epoch that authenticated it.
    pub sender_epoch: u32,
}

/// An agent's public keys (current epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPublicKeys {
    /// The agent.
    pub agent: AgentId,
    /// Key generation, 1 at registration, +1 per rotation.
    pub epoch: u32,
    /// Ed25519 verifying key.
    pub ed25519: [u8; 32],
    /// X25519 public key.
    pub x25519: [u8; 32],
}

/// Counters of the bus since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Messages accepted into a mailbox (or handed to a waiting requester).
    pub sent: u64,
    /// Messages delivered to their recipient.
    pub delivered: u64,
    /// Messages refused with SEC_001.
    pub rejected: u64,
    /// Messages that went to the dead-letter queue (including rejected ones).
    pub dead_lettered: u64,
    /// Dead letters dropped because the queue was full.
    pub dead_letters_dropped: u64,
    /// Sessions established by handshake.
    pub sessions_established: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    delivered: AtomicU64,
    rejected: AtomicU64,
    sessions: AtomicU64,
}

/// The bus clock: wall time at start plus tokio's monotonic time since (so tests can use
/// tokio's paused clock, and wall-clock jumps do not expire or revive messages).
struct Clock {
    base_wall_ms: u64,
    base: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            base_wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            base: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base_wall_ms + self.base.elapsed().as_millis() as u64
    }
}

fn dur_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct KeyRing {
    /// Oldest first; the last one is current.
    identities: Vec<Arc<Identity>>,
}

impl KeyRing {
    fn current(&self) -> Option<&Arc<Identity>> {
        self.identities.last()
    }
}

struct AgentEntry {
    id: AgentId,
    capabilities: RwLock<Vec<Capability>>,
    keys: RwLock<KeyRing>,
    mailbox: Mailbox,
    next_seq: AtomicU64,
    replay: Mutex<HashMap<(AgentId, Priority), ReplayWindow>>,
}

impl AgentEntry {
    fn current_identity(&self) -> Result<Arc<Identity>> {
        self.keys
            .read()
            .current()
            .cloned()
            .ok_or_else(|| CommunicationError::KeyStore(format!("agent {} has no key", self.id)))
    }

    fn has(&self, cap: &Capability) -> bool {
        self.capabilities.read().contains(cap)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PairKeyId {
    from: AgentId,
    to: AgentId,
    from_epoch: u32,
    to_epoch: u32,
}

struct Session {
    id: [u8; 16],
    initiator: AgentId,
    responder: AgentId,
    initiator_epoch: u32,
    responder_epoch: u32,
    i2r: Aes256Gcm,
    r2i: Aes256Gcm,
    established_ms: u64,
    retired_ms: Mutex<Option<u64>>,
}

impl Session {
    fn key_for(&self, from: AgentId, to: AgentId) -> Option<&Aes256Gcm> {
        if from == self.initiator && to == self.responder {
            Some(&self.i2r)
        } else if from == self.responder && to == self.initiator {
            Some(&self.r2i)
        } else {
            None
        }
    }
}

struct Pending {
    responder: AgentId,
    tx: oneshot::Sender<ReceivedMessage>,
}

struct BusInner {
    config: CommunicationConfig,
    instance: [u8; 16],
    clock: Clock,
    agents: RwLock<HashMap<AgentId, Arc<AgentEntry>>>,
    subscriptions: RwLock<HashMap<String, BTreeSet<AgentId>>>,
    pair_keys: RwLock<HashMap<PairKeyId, Arc<Aes256Gcm>>>,
    sessions: Mutex<HashMap<(AgentId, AgentId), Arc<Session>>>,
    sessions_by_id: RwLock<HashMap<[u8; 16], Arc<Session>>>,
    pending: Mutex<HashMap<(AgentId, MessageId), Pending>>,
    dead_letters: DeadLetterQueue,
    audit: Option<AuditSink>,
    policy: Arc<dyn DeliveryPolicy>,
    keystore: Option<KeyStore>,
    counters: Counters,
}

/// Builds a [`DefaultCommunicationBus`] with an audit sink, a delivery policy and a
/// persistent key store.
pub struct CommunicationBusBuilder {
    config: CommunicationConfig,
    audit: Option<AuditSink>,
    policy: Arc<dyn DeliveryPolicy>,
    store: Option<(Arc<dyn Store>, std::path::PathBuf)>,
}

impl std::fmt::Debug for CommunicationBusBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommunicationBusBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CommunicationBusBuilder {
    /// Records rejections, dead letters and key events (metadata only) into `sink`.
    pub fn audit(mut self, sink: AuditSink) -> Self {
        self.audit = Some(sink);
        self
    }

    /// Decides who may talk to whom (default: [`AllowRegistered`]).
    pub fn policy(mut self, policy: Arc<dyn DeliveryPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Persists agents' keys in `store`, wrapped under the key-encryption key in `kek_file`
    /// (created 0600 when absent). Without it, keys live in memory only.
    pub fn key_store(
        mut self,
        store: Arc<dyn Store>,
        kek_file: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.store = Some((store, kek_file.into()));
        self
    }

    /// Validates the configuration and starts the bus (and its expiry sweeper).
    pub async fn build(self) -> Result<DefaultCommunicationBus> {
        let mut issues = Vec::new();
        self.config.validate(&mut issues);
        if !issues.is_empty() {
            return Err(CommunicationError::InvalidMessage(format!(
                "invalid communication configuration: {}",
                issues
                    .iter()
                    .map(|i| format!("{}: {}", i.key, i.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        let keystore = match self.store {
            Some((store, kek)) => {
                Some(KeyStore::new(store, KeyEncryptionKey::load_or_create(kek)?))
            }
            None => None,
        };
        let inner = Arc::new(BusInner {
            instance: random_bytes::<16>().map_err(CommunicationError::KeyStore)?,
            clock: Clock::new(),
            agents: RwLock::new(HashMap::new()),
            subscriptions: RwLock::new(HashMap::new()),
            pair_keys: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            sessions_by_id: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            dead_letters: DeadLetterQueue::new(self.config.dead_letter_capacity),
            audit: self.audit,
            policy: self.policy,
            keystore,
            counters: Counters::default(),
            config: self.config,
        });
        spawn_sweeper(Arc::downgrade(&inner), inner.config.sweep_interval);
        Ok(DefaultCommunicationBus { inner })
    }
}

fn spawn_sweeper(weak: Weak<BusInner>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            let bus = DefaultCommunicationBus { inner };
            bus.sweep_expired();
        }
    });
}

/// The communication bus. Cheap to clone (a shared handle).
///
/// The bus API is privileged: it trusts the `from` of a [`Message`] to name a registered
/// agent and signs on that agent's behalf. Agents in sandboxes reach it only through the
/// [`bridge`](super::bridge), which fixes `from` to the bridged agent.
#[derive(Clone)]
pub struct DefaultCommunicationBus {
    inner: Arc<BusInner>,
}

impl std::fmt::Debug for DefaultCommunicationBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultCommunicationBus")
            .field("instance", &hex::encode(self.inner.instance))
            .field("agents", &self.inner.agents.read().len())
            .finish_non_exhaustive()
    }
}

/// Metadata of a message for audit, logs and dead letters. Never the payload.
struct Meta {
    id: MessageId,
    from: AgentId,
    to: AgentId,
    topic: String,
    priority: Priority,
    kind: MessageKind,
    size: usize,
}

impl Meta {
    fn of_message(m: &Message, kind: MessageKind) -> Self {
        Self {
            id: m.id,
            from: m.from,
            to: m.to,
            topic: m.topic.clone(),
            priority: m.priority,
            kind,
            size: m.payload.len(),
        }
    }

    fn of_envelope(e: &Envelope) -> Self {
        Self {
            id: e.header.message_id,
            from: e.header.from,
            to: e.header.to,
            topic: e.header.topic.clone(),
            priority: e.header.priority,
            kind: e.header.kind,
            size: e.body.len().saturating_sub(16),
        }
    }
}

impl DefaultCommunicationBus {
    /// A bus with no audit sink, the [`AllowRegistered`] policy and keys in memory only.
    pub async fn new(config: CommunicationConfig) -> Result<Self> {
        Self::builder(config).build().await
    }

    /// A builder for a bus with audit, policy and persistent keys.
    pub fn builder(config: CommunicationConfig) -> CommunicationBusBuilder {
        CommunicationBusBuilder {
            config,
            audit: None,
            policy: Arc::new(AllowRegistered),
            store: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &CommunicationConfig {
        &self.inner.config
    }

    // ----- registration and keys -------------------------------------------------------

    /// Registers `agent_id` with its capabilities: gives it an Ed25519 identity and an X25519
    /// key (or loads its persisted ones) and a mailbox. Registering again updates the
    /// capabilities and keeps keys and mailbox.
    pub async fn register_agent(
        &self,
        agent_id: AgentId,
        capabilities: Vec<Capability>,
    ) -> Result<()> {
        if let Some(existing) = self.inner.agents.read().get(&agent_id) {
            *existing.capabilities.write() = capabilities;
            return Ok(());
        }
        let now = self.now_ms();
        let grace = dur_ms(self.inner.config.key_rotation_grace);
        let mut identities = Vec::new();
        let mut loaded = false;
        if let Some(ks) = &self.inner.keystore {
            for id in ks.load(agent_id)? {
                match id.retired_ms {
                    Some(r) if r.saturating_add(grace) <= now => ks.delete(agent_id, id.epoch)?,
                    _ => identities.push(Arc::new(id)),
                }
            }
            loaded = !identities.is_empty();
        }
        if identities.is_empty() {
            let id = Identity::generate(1, now).map_err(CommunicationError::KeyStore)?;
            if let Some(ks) = &self.inner.keystore {
                ks.save(agent_id, &id)?;
            }
            identities.push(Arc::new(id));
        }
        let epoch = identities.last().map(|i| i.epoch).unwrap_or(1);
        let entry = Arc::new(AgentEntry {
            id: agent_id,
            capabilities: RwLock::new(capabilities),
            keys: RwLock::new(KeyRing { identities }),
            mailbox: Mailbox::new(
                self.inner.config.mailbox_capacity,
                self.inner.config.mailbox_max_bytes,
            ),
            next_seq: AtomicU64::new(1),
            replay: Mutex::new(HashMap::new()),
        });
        {
            let mut agents = self.inner.agents.write();
            if let Some(existing) = agents.get(&agent_id) {
                *existing.capabilities.write() = entry.capabilities.read().clone();
                return Ok(());
            }
            agents.insert(agent_id, entry);
        }
        self.audit(
            AuditEvent::new(
                AuditEventType::KeyRotated,
                Some(agent_id),
                if loaded {
                    "messaging identity loaded"
                } else {
                    "messaging identity generated"
                },
            )
            .with("epoch", epoch.to_string())
            .with("persisted", self.inner.keystore.is_some().to_string()),
        );
        tracing::debug!(agent = %agent_id, epoch, loaded, "agent registered on the bus");
        Ok(())
    }

    /// Removes an agent: its queued messages are dead-lettered, its subscriptions, sessions
    /// and keys (also the persisted ones) are deleted.
    pub async fn unregister_agent(&self, agent_id: AgentId) -> Result<()> {
        let entry = self
            .inner
            .agents
            .write()
            .remove(&agent_id)
            .ok_or_else(|| not_registered(agent_id))?;
        for env in entry.mailbox.close() {
            self.dead_letter(
                Meta::of_envelope(&env),
                DeadLetterReason::RecipientGone,
                Some(env),
            );
        }
        for subs in self.inner.subscriptions.write().values_mut() {
            subs.remove(&agent_id);
        }
        self.inner
            .sessions
            .lock()
            .retain(|(a, b), _| *a != agent_id && *b != agent_id);
        self.inner
            .sessions_by_id
            .write()
            .retain(|_, s| s.initiator != agent_id && s.responder != agent_id);
        self.inner
            .pair_keys
            .write()
            .retain(|k, _| k.from != agent_id && k.to != agent_id);
        self.inner.pending.lock().retain(|(r, _), _| *r != agent_id);
        if let Some(ks) = &self.inner.keystore {
            let epochs: Vec<u32> = entry
                .keys
                .read()
                .identities
                .iter()
                .map(|i| i.epoch)
                .collect();
            for e in epochs {
                ks.delete(agent_id, e)?;
            }
        }
        self.audit(AuditEvent::new(
            AuditEventType::KeyRotated,
            Some(agent_id),
            "messaging identity deleted (agent unregistered)",
        ));
        Ok(())
    }

    /// True when `agent_id` is registered.
    pub fn is_registered(&self, agent_id: AgentId) -> bool {
        self.inner.agents.read().contains_key(&agent_id)
    }

    /// The agent's current public keys.
    pub fn public_keys(&self, agent_id: AgentId) -> Result<AgentPublicKeys> {
        let entry = self.entry(agent_id)?;
        let id = entry.current_identity()?;
        Ok(AgentPublicKeys {
            agent: agent_id,
            epoch: id.epoch,
            ed25519: id.verifying.to_bytes(),
            x25519: id.x_public.to_bytes(),
        })
    }

    /// Replaces the agent's keys with a new generation. Envelopes sealed under the old keys
    /// (and sessions made with them) still verify for `key_rotation_grace`, then are refused
    /// (SEC_001, `key_expired`). Returns the new epoch.
    pub async fn rotate_keys(&self, agent_id: AgentId) -> Result<u32> {
        let entry = self.entry(agent_id)?;
        let now = self.now_ms();
        let (old, new) = {
            let mut ring = entry.keys.write();
            let old = ring.current().cloned();
            let epoch = old.as_ref().map(|i| i.epoch + 1).unwrap_or(1);
            let new =
                Arc::new(Identity::generate(epoch, now).map_err(CommunicationError::KeyStore)?);
            if let Some(old) = &old {
                let retired = Identity::from_secrets(
                    old.epoch,
                    &old.signing.to_bytes(),
                    old.x_secret.as_bytes(),
                    old.created_ms,
                    Some(now),
                );
                let n = ring.identities.len();
                ring.identities[n - 1] = Arc::new(retired);
            }
            ring.identities.push(new.clone());
            (ring.identities.iter().rev().nth(1).cloned(), new)
        };
        if let Some(ks) = &self.inner.keystore {
            ks.save(agent_id, &new)?;
            if let Some(old) = &old {
                ks.save(agent_id, old)?;
            }
        }
        // Sessions made with the old key are retired (they verify during the grace period).
        let retired: Vec<Arc<Session>> = {
            let mut sessions = self.inner.sessions.lock();
            let keys: Vec<_> = sessions
                .keys()
                .filter(|(a, b)| *a == agent_id || *b == agent_id)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| sessions.remove(k)).collect()
        };
        for s in retired {
            *s.retired_ms.lock() = Some(now);
        }
        self.audit(
            AuditEvent::new(
                AuditEventType::KeyRotated,
                Some(agent_id),
                "messaging keys rotated",
            )
            .with("epoch", new.epoch.to_string())
            .with(
                "grace_ms",
                dur_ms(self.inner.config.key_rotation_grace).to_string(),
            ),
        );
        self.purge_keys();
        Ok(new.epoch)
    }

    // ----- topics ----------------------------------------------------------------------

    /// Subscribes `agent_id` to `topic`: an exact topic name, or a prefix pattern ending in
    /// `.*` (`sensors.*` matches `sensors.temp`).
    pub async fn subscribe(&self, agent_id: AgentId, topic: impl Into<String>) -> Result<()> {
        let topic = topic.into();
        check_topic(&topic)?;
        let entry = self.entry(agent_id)?;
        if self.inner.config.require_messaging_capability && !entry.has(&Capability::Messaging) {
            return Err(CommunicationError::Rejected {
                reason: RejectReason::MissingCapability,
                detail: format!("agent {agent_id} lacks the messaging capability"),
            });
        }
        if let PolicyDecision::Deny(why) = self.inner.policy.check_subscribe(agent_id, &topic) {
            self.audit(
                AuditEvent::new(
                    AuditEventType::PolicyDecision,
                    Some(agent_id),
                    "subscribe denied",
                )
                .with("topic", topic.clone())
                .with("reason", why.clone())
                .with("code", "SEC_001"),
            );
            return Err(CommunicationError::Rejected {
                reason: RejectReason::PolicyDenied,
                detail: why,
            });
        }
        self.inner
            .subscriptions
            .write()
            .entry(topic)
            .or_default()
            .insert(agent_id);
        Ok(())
    }

    /// Removes a subscription made with [`subscribe`](Self::subscribe).
    pub async fn unsubscribe(&self, agent_id: AgentId, topic: &str) -> Result<()> {
        let mut subs = self.inner.subscriptions.write();
        if let Some(set) = subs.get_mut(topic) {
            set.remove(&agent_id);
            if set.is_empty() {
                subs.remove(topic);
            }
        }
        Ok(())
    }

    fn subscribers(&self, topic: &str) -> BTreeSet<AgentId> {
        let subs = self.inner.subscriptions.read();
        let mut out = BTreeSet::new();
        for (pattern, set) in subs.iter() {
            let matches = match pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => pattern == topic,
            };
            if matches {
                out.extend(set.iter().copied());
            }
        }
        out
    }

    // ----- sending ---------------------------------------------------------------------

    /// Sends one message: admission, room in the recipient's mailbox (waits up to
    /// `delivery_timeout`), encryption and signing, queueing.
    pub async fn send_message(&self, message: Message) -> Result<()> {
        self.send_kind(message, MessageKind::Direct, None).await
    }

    /// Sends a copy of `message` (its `to` is ignored) to every subscriber of its topic
    /// except the sender. Subscribers the policy denies, or whose mailbox stays full, are
    /// skipped (audited, dead-lettered). Returns how many copies were queued.
    pub async fn publish(&self, message: Message) -> Result<usize> {
        self.admit_basic(&message)?;
        let sender = self.sender_entry(&message, MessageKind::Topic)?;
        drop(sender);
        if let PolicyDecision::Deny(why) = self.inner.policy.check_publish(
            message.from,
            &message.topic,
            message.priority,
            message.payload.len(),
        ) {
            return Err(self.reject(
                Meta::of_message(&message, MessageKind::Topic),
                RejectReason::PolicyDenied,
                why,
                None,
            ));
        }
        let mut delivered = 0;
        for sub in self.subscribers(&message.topic) {
            if sub == message.from {
                continue;
            }
            let copy = Message {
                to: sub,
                ..message.clone()
            };
            match self.send_kind(copy, MessageKind::Topic, None).await {
                Ok(()) => delivered += 1,
                Err(e) => {
                    tracing::debug!(message_id = %message.id, subscriber = %sub, code = e.code(), "publication copy not delivered");
                }
            }
        }
        Ok(delivered)
    }

    /// Sends a request and waits up to `delivery_timeout` for its reply (COMM_004 after).
    pub async fn request(&self, message: Message) -> Result<ReceivedMessage> {
        let timeout = self.inner.config.delivery_timeout;
        self.request_with_timeout(message, timeout).await
    }

    /// Sends a request and waits up to `timeout` for its reply.
    pub async fn request_with_timeout(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        let key = (message.from, message.id);
        let (tx, rx) = oneshot::channel();
        self.inner.pending.lock().insert(
            key,
            Pending {
                responder: message.to,
                tx,
            },
        );
        struct Cleanup<'a>(&'a BusInner, (AgentId, MessageId));
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                self.0.pending.lock().remove(&self.1);
            }
        }
        let _cleanup = Cleanup(&self.inner, key);
        let id = message.id;
        match tokio::time::timeout_at(
            deadline,
            self.send_kind(message, MessageKind::Request, None),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(CommunicationError::Timeout {
                    operation: format!("request {id}"),
                    after: timeout,
                })
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CommunicationError::DeliveryFailed(format!(
                "request {id}: the requester was unregistered"
            ))),
            Err(_) => Err(CommunicationError::Timeout {
                operation: format!("reply to request {id}"),
                after: timeout,
            }),
        }
    }

    /// Answers a request delivered to its recipient. The reply is sealed by the request's
    /// recipient and verified before it reaches the waiting requester.
    pub async fn reply(&self, request: &ReceivedMessage, payload: Vec<u8>) -> Result<()> {
        let topic = request.message.topic.clone();
        self.reply_on(request, topic, payload).await
    }

    /// Answers a request with a reply on `topic` (e.g. an agent definition's
    /// `reply "TOPIC"`) instead of the request's own topic.
    pub async fn reply_on(
        &self,
        request: &ReceivedMessage,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<()> {
        if request.kind != MessageKind::Request {
            return Err(CommunicationError::InvalidMessage(format!(
                "message {} is not a request",
                request.message.id
            )));
        }
        let m = &request.message;
        let reply = Message {
            id: MessageId::new(),
            from: m.to,
            to: m.from,
            topic,
            payload,
            priority: m.priority,
            ttl: self.inner.config.default_ttl,
        };
        self.send_kind(reply, MessageKind::Reply, Some(m.id)).await
    }

    fn admit_basic(&self, message: &Message) -> Result<()> {
        let max = self.inner.config.max_message_size;
        if message.payload.len() > max {
            return Err(CommunicationError::TooLarge {
                size: message.payload.len(),
                max,
            });
        }
        if message.ttl.is_zero() {
            return Err(CommunicationError::InvalidMessage(
                "ttl must be longer than 0s".into(),
            ));
        }
        check_topic(&message.topic)
    }

    fn sender_entry(&self, message: &Message, kind: MessageKind) -> Result<Arc<AgentEntry>> {
        let Some(from) = self.inner.agents.read().get(&message.from).cloned() else {
            return Err(self.reject(
                Meta::of_message(message, kind),
                RejectReason::UnknownSender,
                format!("sender {} is not registered", message.from),
                None,
            ));
        };
        if self.inner.config.require_messaging_capability && !from.has(&Capability::Messaging) {
            return Err(self.reject(
                Meta::of_message(message, kind),
                RejectReason::MissingCapability,
                format!("sender {} lacks the messaging capability", message.from),
                None,
            ));
        }
        Ok(from)
    }

    /// Admission: everything that can refuse a message before crypto.
    fn admit(
        &self,
        message: &Message,
        kind: MessageKind,
    ) -> Result<(Arc<AgentEntry>, Arc<AgentEntry>)> {
        self.admit_basic(message)?;
        let from = self.sender_entry(message, kind)?;
        let Some(to) = self.inner.agents.read().get(&message.to).cloned() else {
            return Err(CommunicationError::DeliveryFailed(format!(
                "recipient {} is not registered",
                message.to
            )));
        };
        if self.inner.config.require_messaging_capability && !to.has(&Capability::Messaging) {
            return Err(self.reject(
                Meta::of_message(message, kind),
                RejectReason::MissingCapability,
                format!("recipient {} lacks the messaging capability", message.to),
                None,
            ));
        }
        let decision = {
            let fc = from.capabilities.read();
            let tc = to.capabilities.read();
            self.inner.policy.check(&DeliveryContext {
                from: message.from,
                to: message.to,
                topic: &message.topic,
                kind,
                priority: message.priority,
                size: message.payload.len(),
                from_capabilities: &fc,
                to_capabilities: &tc,
            })
        };
        if let PolicyDecision::Deny(why) = decision {
            return Err(self.reject(
                Meta::of_message(message, kind),
                RejectReason::PolicyDenied,
                why,
                None,
            ));
        }
        Ok((from, to))
    }

    async fn send_kind(
        &self,
        message: Message,
        kind: MessageKind,
        correlation: Option<MessageId>,
    ) -> Result<()> {
        let (from, to) = self.admit(&message, kind)?;
        if kind == MessageKind::Reply {
            return self.deliver_reply(&from, &to, message, correlation);
        }
        let size = message.payload.len() + message.topic.len() + 216;
        self.reserve(&to, size, &message, kind).await?;
        let meta_id = message.id;
        let env = match self.seal_with(&from, &to, message, kind, correlation) {
            Ok(env) => env,
            Err(e) => {
                to.mailbox.release(size);
                return Err(e);
            }
        };
        let audit = self
            .inner
            .config
            .audit_deliveries
            .then(|| Meta::of_envelope(&env));
        if let Err(env) = to.mailbox.push(size, env) {
            self.dead_letter(
                Meta::of_envelope(&env),
                DeadLetterReason::RecipientGone,
                Some(*env),
            );
            return Err(CommunicationError::DeliveryFailed(format!(
                "recipient {} was unregistered",
                to.id
            )));
        }
        self.inner.counters.sent.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(message_id = %meta_id, from = %from.id, to = %to.id, "message queued");
        if let Some(meta) = audit {
            self.audit(meta_event(
                AuditEventType::MessageSent,
                &meta,
                "message accepted",
            ));
        }
        Ok(())
    }

    async fn reserve(
        &self,
        to: &AgentEntry,
        size: usize,
        message: &Message,
        kind: MessageKind,
    ) -> Result<()> {
        let timeout = self.inner.config.delivery_timeout;
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let notified = to.mailbox.writable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match to.mailbox.reserve(size) {
                Reserve::Reserved => return Ok(()),
                Reserve::Closed => {
                    return Err(CommunicationError::DeliveryFailed(format!(
                        "recipient {} was unregistered",
                        to.id
                    )))
                }
                Reserve::Full => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // One last try: room may have been freed right at the deadline.
                if let Reserve::Reserved = to.mailbox.reserve(size) {
                    return Ok(());
                }
                self.dead_letter(
                    Meta::of_message(message, kind),
                    DeadLetterReason::MailboxFull,
                    None,
                );
                return Err(CommunicationError::MailboxFull {
                    agent: to.id,
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Seals `message` into an envelope without routing it (for transports and tests). The
    /// same admission checks as [`send_message`](Self::send_message) apply.
    pub fn seal(&self, message: Message, kind: MessageKind) -> Result<Envelope> {
        let (from, to) = self.admit(&message, kind)?;
        self.seal_with(&from, &to, message, kind, None)
    }

    fn seal_with(
        &self,
        from: &AgentEntry,
        to: &AgentEntry,
        message: Message,
        kind: MessageKind,
        correlation: Option<MessageId>,
    ) -> Result<Envelope> {
        let now = self.now_ms();
        let seq = from.next_seq.fetch_add(1, Ordering::Relaxed);
        let encrypt = self.inner.config.enable_encryption;
        let mut header = EnvelopeHeader {
            mode: EnvelopeMode::Signed,
            kind,
            message_id: message.id,
            from: from.id,
            to: to.id,
            correlation,
            topic: message.topic,
            priority: message.priority,
            created_ms: now,
            expires_ms: now.saturating_add(dur_ms(message.ttl)),
            seq,
            sender_epoch: 0,
            recipient_epoch: 0,
            session_id: [0; 16],
            instance: self.inner.instance,
            encrypted: encrypt,
            body_len: (message.payload.len() + 16) as u32,
        };
        match self.inner.config.auth_mode {
            AuthMode::Signed => {
                let me = from.current_identity()?;
                let them = to.current_identity()?;
                header.sender_epoch = me.epoch;
                header.recipient_epoch = them.epoch;
                let id = PairKeyId {
                    from: from.id,
                    to: to.id,
                    from_epoch: me.epoch,
                    to_epoch: them.epoch,
                };
                let cipher = self.pair_cipher(id, || {
                    derive_pair_key(
                        &self.inner.instance,
                        from.id,
                        to.id,
                        me.epoch,
                        them.epoch,
                        &me.x_secret,
                        &them.x_public,
                    )
                })?;
                let hb = header.to_bytes();
                let body = seal_body(&cipher, &header, &hb, message.payload, encrypt)
                    .map_err(CommunicationError::Security)?;
                let signature = sign_envelope(&me.signing, &hb, &body);
                Ok(Envelope {
                    header,
                    body,
                    signature: Some(signature),
                })
            }
            AuthMode::Session => {
                let session = self.session_for(from, to)?;
                header.mode = EnvelopeMode::Session;
                header.session_id = session.id;
                let (se, re) = if session.initiator == from.id {
                    (session.initiator_epoch, session.responder_epoch)
                } else {
                    (session.responder_epoch, session.initiator_epoch)
                };
                header.sender_epoch = se;
                header.recipient_epoch = re;
                let cipher = session.key_for(from.id, to.id).ok_or_else(|| {
                    CommunicationError::Security("session does not belong to this pair".into())
                })?;
                let hb = header.to_bytes();
                let body = seal_body(cipher, &header, &hb, message.payload, encrypt)
                    .map_err(CommunicationError::Security)?;
                Ok(Envelope {
                    header,
                    body,
                    signature: None,
                })
            }
        }
    }

    fn pair_cipher(
        &self,
        id: PairKeyId,
        derive: impl FnOnce() -> std::result::Result<Aes256Gcm, String>,
    ) -> Result<Arc<Aes256Gcm>> {
        if let Some(c) = self.inner.pair_keys.read().get(&id) {
            return Ok(c.clone());
        }
        let cipher = Arc::new(derive().map_err(CommunicationError::Security)?);
        self.inner
            .pair_keys
            .write()
            .entry(id)
            .or_insert_with(|| cipher.clone());
        Ok(cipher)
    }

    /// The live session between two agents, establishing one by signed handshake when none
    /// is usable (none yet, too old, or made with keys rotated since).
    fn session_for(&self, from: &AgentEntry, to: &AgentEntry) -> Result<Arc<Session>> {
        let pair = if from.id < to.id {
            (from.id, to.id)
        } else {
            (to.id, from.id)
        };
        let now = self.now_ms();
        let lifetime = dur_ms(self.inner.config.session_lifetime);
        let mut sessions = self.inner.sessions.lock();
        if let Some(s) = sessions.get(&pair) {
            if now.saturating_sub(s.established_ms) < lifetime {
                return Ok(s.clone());
            }
            *s.retired_ms.lock() = Some(now);
            sessions.remove(&pair);
        }
        // The initiator signs its ephemeral key; the responder verifies, signs its own over
        // the initiator's transcript; the initiator verifies that. Both derive the keys.
        let a = from.current_identity()?;
        let b = to.current_identity()?;
        let (init, eph) = handshake_init(self.inner.instance, from.id, to.id, &a, now)
            .map_err(CommunicationError::Security)?;
        let (resp, _responder_keys) =
            handshake_respond(&init, &a.verifying, &b).map_err(CommunicationError::Security)?;
        let keys = handshake_finish(&init, &eph, &resp, &b.verifying)
            .map_err(CommunicationError::Security)?;
        let session = Arc::new(Session {
            id: init.session_id,
            initiator: from.id,
            responder: to.id,
            initiator_epoch: a.epoch,
            responder_epoch: b.epoch,
            i2r: keys.i2r,
            r2i: keys.r2i,
            established_ms: now,
            retired_ms: Mutex::new(None),
        });
        sessions.insert(pair, session.clone());
        drop(sessions);
        self.inner
            .sessions_by_id
            .write()
            .insert(session.id, session.clone());
        self.inner.counters.sessions.fetch_add(1, Ordering::Relaxed);
        self.audit(
            AuditEvent::new(
                AuditEventType::KeyRotated,
                Some(from.id),
                "messaging session established",
            )
            .with("peer", to.id.to_string())
            .with("session", hex::encode(session.id))
            .with("initiator_epoch", a.epoch.to_string())
            .with("responder_epoch", b.epoch.to_string()),
        );
        Ok(session)
    }

    /// Hands a sealed envelope to the bus for delivery to `header.to` (for transports and
    /// tests). Only routing is checked here (recipient registered, room in its mailbox);
    /// the envelope is verified when it is delivered, like every other.
    pub async fn submit_envelope(&self, envelope: Envelope) -> Result<()> {
        let Some(to) = self.inner.agents.read().get(&envelope.header.to).cloned() else {
            return Err(self.reject(
                Meta::of_envelope(&envelope),
                RejectReason::WrongRecipient,
                format!("recipient {} is not registered", envelope.header.to),
                Some(envelope),
            ));
        };
        let max = self.inner.config.max_message_size + 16;
        if envelope.body.len() > max {
            return Err(CommunicationError::TooLarge {
                size: envelope.body.len(),
                max,
            });
        }
        let size = envelope.body.len() + envelope.header.topic.len() + 200;
        let meta = Message {
            id: envelope.header.message_id,
            from: envelope.header.from,
            to: envelope.header.to,
            topic: envelope.header.topic.clone(),
            payload: Vec::new(),
            priority: envelope.header.priority,
            ttl: Duration::from_secs(1),
        };
        self.reserve(&to, size, &meta, envelope.header.kind).await?;
        to.mailbox.push(size, envelope).map_err(|_| {
            CommunicationError::DeliveryFailed(format!("recipient {} was unregistered", to.id))
        })
    }

    fn deliver_reply(
        &self,
        from: &AgentEntry,
        to: &AgentEntry,
        message: Message,
        correlation: Option<MessageId>,
    ) -> Result<()> {
        let Some(corr) = correlation else {
            return Err(CommunicationError::InvalidMessage(
                "a reply needs the id of its request".into(),
            ));
        };
        let meta = Meta::of_message(&message, MessageKind::Reply);
        let key = (to.id, corr);
        let pending = {
            let mut p = self.inner.pending.lock();
            match p.get(&key) {
                Some(w) if w.responder != from.id => {
                    drop(p);
                    return Err(self.reject(
                        meta,
                        RejectReason::SpoofedReply,
                        format!("request {corr} was sent to another agent than {}", from.id),
                        None,
                    ));
                }
                Some(_) => p.remove(&key),
                None => None,
            }
        };
        let Some(pending) = pending else {
            self.dead_letter(meta, DeadLetterReason::ReplyUnclaimed, None);
            return Err(CommunicationError::DeliveryFailed(format!(
                "no request {corr} of agent {} is waiting for a reply (timed out or unknown)",
                to.id
            )));
        };
        let env = self.seal_with(from, to, message, MessageKind::Reply, Some(corr))?;
        let opened = self.open_with(to, vec![env]).pop();
        match opened {
            Some(Ok(received)) => {
                self.inner.counters.sent.fetch_add(1, Ordering::Relaxed);
                if let Err(received) = pending.tx.send(received) {
                    self.dead_letter(
                        Meta::of_message(&received.message, MessageKind::Reply),
                        DeadLetterReason::ReplyUnclaimed,
                        None,
                    );
                    return Err(CommunicationError::DeliveryFailed(format!(
                        "request {corr} stopped waiting for its reply"
                    )));
                }
                self.inner
                    .counters
                    .delivered
                    .fetch_add(1, Ordering::Relaxed);
                // A reply carries data between two agents like any other message: audited
                // the same way (regression test: cross_tier.rs
                // `..._exchange_a_request_and_reply_through_the_bus`).
                if self.inner.config.audit_deliveries {
                    self.audit(meta_event(
                        AuditEventType::MessageSent,
                        &meta,
                        "reply accepted",
                    ));
                    self.audit(meta_event(
                        AuditEventType::MessageDelivered,
                        &meta,
                        "reply delivered",
                    ));
                }
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(CommunicationError::DeliveryFailed(
                "reply could not be opened".into(),
            )),
        }
    }

    // ----- receiving -------------------------------------------------------------------

    /// Waits for the next message for `agent_id` (highest priority first) and returns it
    /// verified and decrypted.
    pub async fn receive(&self, agent_id: AgentId) -> Result<ReceivedMessage> {
        let mut batch = self.receive_batch(agent_id, 1).await?;
        batch
            .pop()
            .ok_or_else(|| CommunicationError::DeliveryFailed("mailbox returned no message".into()))
    }

    /// Like [`receive`](Self::receive) but gives up after `timeout` (`Ok(None)`).
    pub async fn receive_timeout(
        &self,
        agent_id: AgentId,
        timeout: Duration,
    ) -> Result<Option<ReceivedMessage>> {
        match tokio::time::timeout(timeout, self.receive(agent_id)).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The next message if one is ready, without waiting.
    pub fn try_receive(&self, agent_id: AgentId) -> Result<Option<ReceivedMessage>> {
        let entry = self.entry(agent_id)?;
        loop {
            let (out, more) = self.take_ready(&entry, 1);
            if let Some(m) = out.into_iter().next() {
                return Ok(Some(m));
            }
            if !more {
                return Ok(None);
            }
        }
    }

    /// Waits until at least one message is ready, then returns up to `max` of them in
    /// priority order, verified together (batch Ed25519 verification) and decrypted.
    /// Envelopes that fail verification are dropped from the batch (SEC_001, audited,
    /// dead-lettered).
    pub async fn receive_batch(
        &self,
        agent_id: AgentId,
        max: usize,
    ) -> Result<Vec<ReceivedMessage>> {
        let entry = self.entry(agent_id)?;
        let max = max.max(1);
        loop {
            let notified = entry.mailbox.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            loop {
                let (out, more) = self.take_ready(&entry, max);
                if !out.is_empty() {
                    return Ok(out);
                }
                if !more {
                    break;
                }
            }
            if entry.mailbox.is_closed() {
                return Err(CommunicationError::DeliveryFailed(format!(
                    "agent {agent_id} was unregistered"
                )));
            }
            notified.await;
        }
    }

    /// Pops up to `max` envelopes, dead-letters expired ones, opens the rest. The bool says
    /// whether anything was popped (so the caller retries when all were rejected).
    fn take_ready(&self, entry: &AgentEntry, max: usize) -> (Vec<ReceivedMessage>, bool) {
        let (live, expired) = entry.mailbox.pop(max, self.now_ms());
        let popped = !live.is_empty() || !expired.is_empty();
        for env in expired {
            self.dead_letter(
                Meta::of_envelope(&env),
                DeadLetterReason::Expired,
                Some(env),
            );
        }
        if live.is_empty() {
            return (Vec::new(), popped);
        }
        let out: Vec<ReceivedMessage> = self
            .open_with(entry, live)
            .into_iter()
            .filter_map(|r| r.ok())
            .collect();
        self.inner
            .counters
            .delivered
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        if self.inner.config.audit_deliveries {
            for m in &out {
                self.audit(meta_event(
                    AuditEventType::MessageDelivered,
                    &Meta::of_message(&m.message, m.kind),
                    "message delivered",
                ));
            }
        }
        (out, popped)
    }

    /// Verifies and decrypts one envelope for `recipient` (for transports and tests): the
    /// same checks as delivery (addressing, instance, TTL, sender, key epochs or session,
    /// signature, AEAD tag, replay). Marks its sequence number as seen.
    pub fn open_envelope(
        &self,
        recipient: AgentId,
        envelope: &Envelope,
    ) -> Result<ReceivedMessage> {
        let Some(entry) = self.inner.agents.read().get(&recipient).cloned() else {
            return Err(self.reject(
                Meta::of_envelope(envelope),
                RejectReason::WrongRecipient,
                format!("recipient {recipient} is not registered"),
                None,
            ));
        };
        self.open_with(&entry, vec![envelope.clone()])
            .pop()
            .unwrap_or_else(|| {
                Err(CommunicationError::DeliveryFailed(
                    "envelope could not be opened".into(),
                ))
            })
    }

    /// The verification pipeline. Results are in input order.
    fn open_with(
        &self,
        recipient: &AgentEntry,
        envelopes: Vec<Envelope>,
    ) -> Vec<Result<ReceivedMessage>> {
        let now = self.now_ms();
        let grace = dur_ms(self.inner.config.key_rotation_grace);
        enum Auth {
            Signed {
                key: VerifyingKey,
                cipher: Arc<Aes256Gcm>,
            },
            Session {
                session: Arc<Session>,
            },
        }
        struct Work {
            env: Envelope,
            hb: Vec<u8>,
            auth: Auth,
        }
        let mut results: Vec<Option<Result<ReceivedMessage>>> = Vec::with_capacity(envelopes.len());
        let mut work: Vec<(usize, Work)> = Vec::with_capacity(envelopes.len());

        // Phase 1: cheap checks and key lookup.
        for (i, env) in envelopes.into_iter().enumerate() {
            results.push(None);
            match self.precheck(recipient, &env, now, grace) {
                Ok(auth) => {
                    let hb = env.header.to_bytes();
                    work.push((
                        i,
                        Work {
                            env,
                            hb,
                            auth: match auth {
                                PreAuth::Signed(key, cipher) => Auth::Signed { key, cipher },
                                PreAuth::Session(session) => Auth::Session { session },
                            },
                        },
                    ));
                }
                Err((reason, detail)) => {
                    results[i] = Some(Err(self.reject(
                        Meta::of_envelope(&env),
                        reason,
                        detail,
                        Some(env),
                    )));
                }
            }
        }

        // Phase 2: signatures, verified as a batch when there are several.
        let signed: Vec<usize> = work
            .iter()
            .enumerate()
            .filter(|(_, (_, w))| matches!(w.auth, Auth::Signed { .. }))
            .map(|(k, _)| k)
            .collect();
        let mut sig_ok = vec![true; work.len()];
        if signed.len() >= 2 {
            let msgs: Vec<Vec<u8>> = signed
                .iter()
                .map(|&k| Envelope::signed_bytes(&work[k].1.hb, &work[k].1.env.body))
                .collect();
            let msg_refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
            let sigs: Vec<Signature> = signed
                .iter()
                .map(|&k| Signature::from_bytes(&work[k].1.env.signature.unwrap_or([0u8; 64])))
                .collect();
            let keys: Vec<VerifyingKey> = signed
                .iter()
                .map(|&k| match &work[k].1.auth {
                    Auth::Signed { key, .. } => *key,
                    Auth::Session { .. } => VerifyingKey::default(),
                })
                .collect();
            if ed25519_dalek::verify_batch(&msg_refs, &sigs, &keys).is_err() {
                // Find the culprits one by one.
                for (j, &k) in signed.iter().enumerate() {
                    sig_ok[k] = keys[j].verify_strict(msg_refs[j], &sigs[j]).is_ok();
                }
            }
        } else if let Some(&k) = signed.first() {
            let w = &work[k].1;
            if let (Auth::Signed { key, .. }, Some(sig)) = (&w.auth, &w.env.signature) {
                sig_ok[k] = verify_envelope(key, &w.hb, &w.env.body, sig);
            }
        }

        // Phase 3: replay window, AEAD (in place), delivery.
        for (k, (i, w)) in work.into_iter().enumerate() {
            let Work { env, hb, auth } = w;
            if !sig_ok[k] {
                let detail = format!(
                    "signature of message {} from {} does not verify",
                    env.header.message_id, env.header.from
                );
                results[i] = Some(Err(self.reject(
                    Meta::of_envelope(&env),
                    RejectReason::BadSignature,
                    detail,
                    Some(env),
                )));
                continue;
            }
            let cipher: &Aes256Gcm = match &auth {
                Auth::Signed { cipher, .. } => cipher.as_ref(),
                Auth::Session { session } => {
                    match session.key_for(env.header.from, env.header.to) {
                        Some(c) => c,
                        None => {
                            results[i] = Some(Err(self.reject(
                                Meta::of_envelope(&env),
                                RejectReason::WrongRecipient,
                                "session does not belong to this pair".into(),
                                Some(env),
                            )));
                            continue;
                        }
                    }
                }
            };
            results[i] = Some(self.finish_open(recipient, env, &hb, cipher, now));
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(CommunicationError::DeliveryFailed(
                        "envelope not processed".into(),
                    ))
                })
            })
            .collect()
    }

    fn precheck(
        &self,
        recipient: &AgentEntry,
        env: &Envelope,
        now: u64,
        grace: u64,
    ) -> std::result::Result<PreAuth, (RejectReason, String)> {
        let h = &env.header;
        if h.to != recipient.id {
            return Err((
                RejectReason::WrongRecipient,
                format!(
                    "message {} is addressed to {}, not {}",
                    h.message_id, h.to, recipient.id
                ),
            ));
        }
        if h.instance != self.inner.instance {
            return Err((
                RejectReason::WrongRecipient,
                format!(
                    "message {} was sealed by another bus instance",
                    h.message_id
                ),
            ));
        }
        if h.expires_ms <= now {
            return Err((
                RejectReason::Expired,
                format!(
                    "message {} expired {} ms ago",
                    h.message_id,
                    now - h.expires_ms
                ),
            ));
        }
        if h.body_len as usize != env.body.len() || env.body.len() < 16 {
            return Err((
                RejectReason::Malformed,
                format!(
                    "message {}: body length does not match its header",
                    h.message_id
                ),
            ));
        }
        if self.inner.config.enable_encryption && !h.encrypted {
            return Err((
                RejectReason::Malformed,
                format!(
                    "message {} is not encrypted but encryption is required",
                    h.message_id
                ),
            ));
        }
        let Some(sender) = self.inner.agents.read().get(&h.from).cloned() else {
            return Err((
                RejectReason::UnknownSender,
                format!("sender {} is not registered", h.from),
            ));
        };
        match h.mode {
            EnvelopeMode::Signed => {
                if env.signature.is_none() {
                    return Err((
                        RejectReason::Malformed,
                        format!("message {} carries no signature", h.message_id),
                    ));
                }
                let s = epoch_identity(&sender, h.sender_epoch, now, grace)?;
                let r = epoch_identity(recipient, h.recipient_epoch, now, grace)?;
                let id = PairKeyId {
                    from: h.from,
                    to: h.to,
                    from_epoch: h.sender_epoch,
                    to_epoch: h.recipient_epoch,
                };
                let cipher = self
                    .pair_cipher(id, || {
                        derive_pair_key(
                            &self.inner.instance,
                            h.from,
                            h.to,
                            h.sender_epoch,
                            h.recipient_epoch,
                            &r.x_secret,
                            &s.x_public,
                        )
                    })
                    .map_err(|e| (RejectReason::AuthenticationFailed, e.to_string()))?;
                Ok(PreAuth::Signed(s.verifying, cipher))
            }
            EnvelopeMode::Session => {
                let Some(session) = self.inner.sessions_by_id.read().get(&h.session_id).cloned()
                else {
                    return Err((
                        RejectReason::KeyExpired,
                        format!(
                            "session {} is unknown or expired",
                            hex::encode(h.session_id)
                        ),
                    ));
                };
                if let Some(r) = *session.retired_ms.lock() {
                    if r.saturating_add(grace) <= now {
                        return Err((
                            RejectReason::KeyExpired,
                            format!(
                                "session {} was retired and its grace period is over",
                                hex::encode(h.session_id)
                            ),
                        ));
                    }
                }
                Ok(PreAuth::Session(session))
            }
        }
    }

    /// Replay check, in-place AEAD decryption, replay mark. On failure the envelope is
    /// returned for the dead-letter queue only while its body is still ciphertext.
    fn finish_open(
        &self,
        recipient: &AgentEntry,
        mut env: Envelope,
        hb: &[u8],
        cipher: &Aes256Gcm,
        now: u64,
    ) -> Result<ReceivedMessage> {
        let window = self.inner.config.replay_window;
        let stream = (env.header.from, env.header.priority);
        let replayed = |env: &Envelope, why: &str| {
            format!(
                "message {} (seq {}) from {}: {why}",
                env.header.message_id, env.header.seq, env.header.from
            )
        };
        // 1. Replay check (not yet marked: only authentic envelopes may move the window).
        let seen = recipient
            .replay
            .lock()
            .get(&stream)
            .map(|w| w.check(env.header.seq))
            .unwrap_or_else(|| ReplayWindow::new(window).check(env.header.seq));
        if let Err(why) = seen {
            let detail = replayed(&env, why);
            return Err(self.reject(
                Meta::of_envelope(&env),
                RejectReason::Replayed,
                detail,
                Some(env),
            ));
        }
        // 2. Authenticate and decrypt in place (the body is untouched when the tag fails).
        if open_body_in_place(cipher, &env.header, hb, &mut env.body).is_err() {
            let detail = format!(
                "message {} from {} fails AEAD authentication",
                env.header.message_id, env.header.from
            );
            return Err(self.reject(
                Meta::of_envelope(&env),
                RejectReason::AuthenticationFailed,
                detail,
                Some(env),
            ));
        }
        // 3. Mark (a concurrent receiver may have taken the same sequence number meanwhile:
        //    then the decrypted body is dropped, never dead-lettered).
        let marked = recipient
            .replay
            .lock()
            .entry(stream)
            .or_insert_with(|| ReplayWindow::new(window))
            .check_and_mark(env.header.seq);
        if let Err(why) = marked {
            let detail = replayed(&env, why);
            let mut meta = Meta::of_envelope(&env);
            meta.size = env.body.len();
            zeroize::Zeroize::zeroize(&mut env.body);
            return Err(self.reject(meta, RejectReason::Replayed, detail, None));
        }
        let h = env.header;
        Ok(ReceivedMessage {
            message: Message {
                id: h.message_id,
                from: h.from,
                to: h.to,
                topic: h.topic,
                payload: env.body,
                priority: h.priority,
                ttl: Duration::from_millis(h.expires_ms.saturating_sub(now)),
            },
            kind: h.kind,
            in_reply_to: h.correlation,
            mode: h.mode,
            sender_epoch: h.sender_epoch,
        })
    }

    // ----- maintenance and inspection --------------------------------------------------

    /// Moves expired messages of every mailbox to the dead-letter queue and forgets keys
    /// and sessions past their grace period. Runs every `sweep_interval` on its own.
    pub fn sweep_expired(&self) {
        let now = self.now_ms();
        let agents: Vec<Arc<AgentEntry>> = self.inner.agents.read().values().cloned().collect();
        for a in agents {
            for env in a.mailbox.take_expired(now) {
                self.dead_letter(
                    Meta::of_envelope(&env),
                    DeadLetterReason::Expired,
                    Some(env),
                );
            }
        }
        self.purge_keys();
    }

    fn purge_keys(&self) {
        let now = self.now_ms();
        let grace = dur_ms(self.inner.config.key_rotation_grace);
        let gone = |r: Option<u64>| r.is_some_and(|r| r.saturating_add(grace) <= now);
        let agents: Vec<Arc<AgentEntry>> = self.inner.agents.read().values().cloned().collect();
        let mut purged: Vec<(AgentId, u32)> = Vec::new();
        for a in agents {
            let mut ring = a.keys.write();
            let n = ring.identities.len();
            let mut keep = Vec::with_capacity(n);
            for (i, id) in ring.identities.drain(..).enumerate() {
                if i + 1 < n && gone(id.retired_ms) {
                    purged.push((a.id, id.epoch));
                } else {
                    keep.push(id);
                }
            }
            ring.identities = keep;
        }
        if !purged.is_empty() {
            self.inner.pair_keys.write().retain(|k, _| {
                !purged.iter().any(|(a, e)| {
                    (k.from == *a && k.from_epoch == *e) || (k.to == *a && k.to_epoch == *e)
                })
            });
            for (a, e) in &purged {
                if let Some(ks) = &self.inner.keystore {
                    if let Err(err) = ks.delete(*a, *e) {
                        tracing::warn!(agent = %a, epoch = e, error = %err, "could not delete an expired key");
                    }
                }
                self.audit(
                    AuditEvent::new(
                        AuditEventType::KeyRotated,
                        Some(*a),
                        "old messaging key destroyed after grace period",
                    )
                    .with("epoch", e.to_string()),
                );
            }
        }
        self.inner
            .sessions_by_id
            .write()
            .retain(|_, s| !gone(*s.retired_ms.lock()));
    }

    /// The dead letters currently kept (oldest first).
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.dead_letters.snapshot()
    }

    /// Takes the dead letters out of the queue.
    pub fn drain_dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.dead_letters.drain()
    }

    /// (messages, bytes) held in `agent_id`'s mailbox.
    pub fn mailbox_usage(&self, agent_id: AgentId) -> Result<(usize, usize)> {
        Ok(self.entry(agent_id)?.mailbox.usage())
    }

    /// Counters since start.
    pub fn stats(&self) -> BusStats {
        let c = &self.inner.counters;
        BusStats {
            sent: c.sent.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            dead_lettered: self.inner.dead_letters.total(),
            dead_letters_dropped: self.inner.dead_letters.dropped(),
            sessions_established: c.sessions.load(Ordering::Relaxed),
        }
    }

    // ----- helpers ---------------------------------------------------------------------

    fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    fn entry(&self, agent_id: AgentId) -> Result<Arc<AgentEntry>> {
        self.inner
            .agents
            .read()
            .get(&agent_id)
            .cloned()
            .ok_or_else(|| not_registered(agent_id))
    }

    fn audit(&self, event: AuditEvent) {
        if let Some(sink) = &self.inner.audit {
            sink.submit(event);
        }
    }

    /// Records a SEC_001 rejection (audit, log, dead letter) and returns the error.
    fn reject(
        &self,
        meta: Meta,
        reason: RejectReason,
        detail: String,
        envelope: Option<Envelope>,
    ) -> CommunicationError {
        self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            code = "SEC_001",
            reason = reason.as_str(),
            message_id = %meta.id,
            from = %meta.from,
            to = %meta.to,
            size = meta.size,
            "message rejected: {detail}"
        );
        self.audit(
            meta_event(AuditEventType::MessageRejected, &meta, &detail)
                .with("code", "SEC_001")
                .with("reason", reason.as_str()),
        );
        self.dead_letter_inner(
            meta,
            DeadLetterReason::Rejected {
                code: "SEC_001".into(),
                reason: reason.as_str().into(),
            },
            envelope,
            false,
        );
        CommunicationError::Rejected { reason, detail }
    }

    fn dead_letter(&self, meta: Meta, reason: DeadLetterReason, envelope: Option<Envelope>) {
        self.dead_letter_inner(meta, reason, envelope, true)
    }

    fn dead_letter_inner(
        &self,
        meta: Meta,
        reason: DeadLetterReason,
        envelope: Option<Envelope>,
        audit: bool,
    ) {
        if audit {
            let (code, why) = match &reason {
                DeadLetterReason::Expired => ("COMM_001", "ttl expired before delivery"),
                DeadLetterReason::MailboxFull => ("COMM_003", "recipient mailbox full"),
                DeadLetterReason::RecipientGone => ("COMM_001", "recipient unregistered"),
                DeadLetterReason::ReplyUnclaimed => {
                    ("COMM_001", "no request waiting for this reply")
                }
                DeadLetterReason::BridgeClosed => ("COMM_001", "sandbox bridge closed"),
                DeadLetterReason::Rejected { .. } => ("SEC_001", "rejected"),
            };
            tracing::debug!(message_id = %meta.id, from = %meta.from, to = %meta.to, code, "dead letter: {why}");
            self.audit(
                meta_event(AuditEventType::MessageRejected, &meta, why)
                    .with("code", code)
                    .with("dead_letter", "true"),
            );
        }
        self.inner.dead_letters.push(DeadLetter {
            message_id: meta.id,
            from: meta.from,
            to: meta.to,
            topic: meta.topic,
            priority: meta.priority,
            kind: meta.kind,
            size: meta.size,
            reason,
            at: SystemTime::now(),
            envelope,
        });
    }

    /// Dead-letters messages a bridge took from the mailbox but could not write to its
    /// agent.
    pub(crate) fn dead_letter_undelivered(&self, m: &ReceivedMessage) {
        self.dead_letter(
            Meta {
                id: m.message.id,
                from: m.message.from,
                to: m.message.to,
                topic: m.message.topic.clone(),
                priority: m.message.priority,
                kind: m.kind,
                size: m.message.payload.len(),
            },
            DeadLetterReason::BridgeClosed,
            None,
        );
    }
}

enum PreAuth {
    Signed(VerifyingKey, Arc<Aes256Gcm>),
    Session(Arc<Session>),
}

fn epoch_identity(
    agent: &AgentEntry,
    epoch: u32,
    now: u64,
    grace: u64,
) -> std::result::Result<Arc<Identity>, (RejectReason, String)> {
    let ring = agent.keys.read();
    let Some(id) = ring.identities.iter().find(|i| i.epoch == epoch) else {
        return Err((
            RejectReason::KeyExpired,
            format!(
                "key epoch {epoch} of agent {} is unknown or destroyed",
                agent.id
            ),
        ));
    };
    if let Some(r) = id.retired_ms {
        if r.saturating_add(grace) <= now {
            return Err((
                RejectReason::KeyExpired,
                format!(
                    "key epoch {epoch} of agent {} was rotated out and its grace period is over",
                    agent.id
                ),
            ));
        }
    }
    Ok(id.clone())
}

fn meta_event(t: AuditEventType, meta: &Meta, details: &str) -> AuditEvent {
    AuditEvent::new(t, Some(meta.from), details)
        .with("message_id", meta.id.to_string())
        .with("from", meta.from.to_string())
        .with("to", meta.to.to_string())
        .with("topic", meta.topic.clone())
        .with("priority", format!("{:?}", meta.priority))
        .with("kind", format!("{:?}", meta.kind))
        .with("size", meta.size.to_string())
}

fn not_registered(agent: AgentId) -> CommunicationError {
    CommunicationError::DeliveryFailed(format!("agent {agent} is not registered"))
}

fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic.len() > 256 {
        return Err(CommunicationError::InvalidMessage(format!(
            "topic must be 1 to 256 bytes, got {}",
            topic.len()
        )));
    }
    if topic.chars().any(char::is_control) {
        return Err(CommunicationError::InvalidMessage(
            "topic must not contain control characters".into(),
        ));
    }
    Ok(())
}
