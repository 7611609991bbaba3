//! The communication bus for real: round trips through Ed25519 + X25519 + AES-256-GCM, every
//! tampering case, TTL expiry, priority order, backpressure, rotation with grace, sessions,
//! request/reply, persisted keys, plaintext hygiene, the sandbox bridge over in-memory
//! streams, and the Python and Rust example agents driven through the bridge.

mod bus_support;

use std::sync::Arc;
use std::time::Duration;

use symbiont_runtime::communication::bridge::{spawn_bridge, BridgeConfig, BridgeEvent};
use symbiont_runtime::communication::*;
use symbiont_runtime::integrations::audit_trail::{AuditEventType, AuditSink, MockAuditTrail};
use symbiont_runtime::storage::{SqliteStore, Store, SyncMode};
use symbiont_runtime::types::*;

use bus_support::{agents, msg, MSG};

use symbiont_agent::protocol::{AgentFrame, DeliveryKind, RuntimeFrame, WirePriority};
use symbiont_agent::r#async::{read_frame, write_frame};

async fn bus_with(config: CommunicationConfig) -> (DefaultCommunicationBus, Arc<MockAuditTrail>) {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let bus = DefaultCommunicationBus::builder(config)
        .audit(audit.clone() as AuditSink)
        .build()
        .await
        .expect("bus starts");
    (bus, audit)
}

/// True when the audit trail holds a SEC_001 rejection with `reason`.
fn audited_rejection(audit: &MockAuditTrail, reason: RejectReason) -> bool {
    audit
        .events_of(&AuditEventType::MessageRejected)
        .iter()
        .any(|e| {
            e.metadata.get("code").map(String::as_str) == Some("SEC_001")
                && e.metadata.get("reason").map(String::as_str) == Some(reason.as_str())
        })
}

fn assert_rejected(r: Result<ReceivedMessage, CommunicationError>, reason: RejectReason) {
    match r {
        Err(e) => {
            assert_eq!(e.code(), "SEC_001", "{e}");
            assert_eq!(e.reject_reason(), Some(reason), "{e}");
        }
        Ok(m) => panic!(
            "expected a {reason} rejection, got a delivery of {}",
            m.message.id
        ),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn round_trip_is_encrypted_and_signed() {
    let (bus, _audit) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let secret = b"the plaintext of round_trip_is_encrypted_and_signed";

    let env = bus
        .seal(msg(a, b, "t", secret), MessageKind::Direct)
        .expect("seal");
    assert!(env.header.encrypted);
    assert!(!contains(&env.body, secret), "body must be ciphertext");
    assert_eq!(env.body.len(), secret.len() + 16, "ciphertext + GCM tag");
    // The signature is a real Ed25519 signature by the sender's published key over
    // domain || header || body.
    let keys = bus.public_keys(a).expect("keys");
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&keys.ed25519).expect("vk");
    let mut signed = b"symbiont/v1/envelope-signature\0".to_vec();
    signed.extend_from_slice(&env.header.to_bytes());
    signed.extend_from_slice(&env.body);
    let sig = ed25519_dalek::Signature::from_bytes(&env.signature.expect("signed"));
    vk.verify_strict(&signed, &sig).expect("signature verifies");

    let opened = bus.open_envelope(b, &env).expect("opens");
    assert_eq!(opened.message.payload, secret);
    assert_eq!(opened.mode, EnvelopeMode::Signed);

    bus.send_message(msg(a, b, "greeting", b"hello"))
        .await
        .expect("send");
    let got = bus.receive(b).await.expect("receive");
    assert_eq!(got.message.from, a);
    assert_eq!(got.message.to, b);
    assert_eq!(got.message.topic, "greeting");
    assert_eq!(got.message.payload, b"hello");
    assert_eq!(got.kind, MessageKind::Direct);
    assert_eq!(bus.stats().delivered, 1);
}

#[tokio::test(start_paused = true)]
async fn every_tampering_case_is_rejected_with_sec_001_and_audited() {
    let config = CommunicationConfig {
        key_rotation_grace: Duration::from_secs(10),
        ..Default::default()
    };
    let (bus, audit) = bus_with(config).await;
    let ids = agents(&bus, 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let seal = || {
        bus.seal(msg(a, b, "orders", b"buy 10"), MessageKind::Direct)
            .expect("seal")
    };

    // Forged signature.
    let mut e = seal();
    if let Some(s) = e.signature.as_mut() {
        s[5] ^= 0x40;
    }
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    // Signature by another agent's key (a valid signature, wrong signer).
    let mut e = seal();
    let by_c = bus
        .seal(msg(c, b, "orders", b"buy 10"), MessageKind::Direct)
        .expect("seal");
    e.signature = by_c.signature;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    // Missing signature.
    let mut e = seal();
    e.signature = None;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::Malformed);
    // Altered ciphertext.
    let mut e = seal();
    e.body[0] ^= 1;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    // Altered header fields: topic, priority, TTL, kind, correlation.
    let mut e = seal();
    e.header.topic = "refunds".into();
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    let mut e = seal();
    e.header.priority = Priority::Critical;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    let mut e = seal();
    e.header.expires_ms += 1_000_000;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    let mut e = seal();
    e.header.kind = MessageKind::Request;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    // Altered recipient: redirected to C (C cannot verify it), or opened by C unchanged.
    let mut e = seal();
    e.header.to = c;
    assert_rejected(bus.open_envelope(c, &e), RejectReason::BadSignature);
    let e = seal();
    assert_rejected(bus.open_envelope(c, &e), RejectReason::WrongRecipient);
    // Altered sender: claims to come from C.
    let mut e = seal();
    e.header.from = c;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::BadSignature);
    // Unknown sender.
    let mut e = seal();
    e.header.from = AgentId::new();
    assert_rejected(bus.open_envelope(b, &e), RejectReason::UnknownSender);
    let stranger = AgentId::new();
    let err = bus
        .send_message(msg(stranger, b, "t", b"x"))
        .await
        .expect_err("unregistered sender");
    assert_eq!(err.reject_reason(), Some(RejectReason::UnknownSender));
    // Downgrade to plaintext.
    let mut e = seal();
    e.header.encrypted = false;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::Malformed);
    // Replay.
    let e = seal();
    bus.open_envelope(b, &e).expect("first time is fine");
    assert_rejected(bus.open_envelope(b, &e), RejectReason::Replayed);
    // Expired: presented after its TTL.
    let mut m = msg(a, b, "t", b"late");
    m.ttl = Duration::from_secs(1);
    let e = bus.seal(m, MessageKind::Direct).expect("seal");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_rejected(bus.open_envelope(b, &e), RejectReason::Expired);

    // Old key: within the grace period it still verifies, after it is refused.
    let in_flight_1 = seal();
    let in_flight_2 = seal();
    let epoch = bus.rotate_keys(a).await.expect("rotate");
    assert_eq!(epoch, 2);
    let fresh = seal();
    assert_eq!(fresh.header.sender_epoch, 2, "new messages use the new key");
    bus.open_envelope(b, &in_flight_1)
        .expect("old key verifies during grace");
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_rejected(bus.open_envelope(b, &in_flight_2), RejectReason::KeyExpired);
    bus.open_envelope(b, &fresh).expect("new key verifies");
    // The recipient's rotation too: a message sealed to B's old key.
    let to_old_b = seal();
    bus.rotate_keys(b).await.expect("rotate b");
    tokio::time::advance(Duration::from_secs(11)).await;
    bus.sweep_expired();
    assert_rejected(bus.open_envelope(b, &to_old_b), RejectReason::KeyExpired);

    for reason in [
        RejectReason::BadSignature,
        RejectReason::Malformed,
        RejectReason::WrongRecipient,
        RejectReason::UnknownSender,
        RejectReason::Replayed,
        RejectReason::Expired,
        RejectReason::KeyExpired,
    ] {
        assert!(audited_rejection(&audit, reason), "{reason} not audited");
    }
    assert!(bus.stats().rejected >= 18);
}

#[tokio::test]
async fn forged_envelope_submitted_for_delivery_is_never_delivered() {
    let (bus, audit) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let mut forged = bus
        .seal(msg(a, b, "t", b"forged"), MessageKind::Direct)
        .expect("seal");
    forged.body[3] ^= 0xff;
    let forged_id = forged.header.message_id;
    bus.submit_envelope(forged).await.expect("routed");
    let good = bus
        .seal(msg(a, b, "t", b"genuine"), MessageKind::Direct)
        .expect("seal");
    bus.submit_envelope(good).await.expect("routed");
    let got = bus.receive(b).await.expect("receive");
    assert_eq!(got.message.payload, b"genuine");
    assert!(bus
        .receive_timeout(b, Duration::from_millis(50))
        .await
        .expect("ok")
        .is_none());
    assert!(audited_rejection(&audit, RejectReason::BadSignature));
    let dl = bus.dead_letters();
    assert!(dl.iter().any(|d| d.message_id == forged_id
        && matches!(&d.reason, DeadLetterReason::Rejected { code, .. } if code == "SEC_001")));
}

#[tokio::test(start_paused = true)]
async fn expired_messages_go_to_dead_letters_and_are_never_delivered() {
    let (bus, audit) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let mut short = msg(a, b, "t", b"short-lived");
    short.ttl = Duration::from_millis(100);
    let short_id = short.id;
    bus.send_message(short).await.expect("send");
    let mut swept = msg(a, b, "t", b"swept");
    swept.ttl = Duration::from_millis(100);
    let swept_id = swept.id;
    tokio::time::advance(Duration::from_millis(200)).await;
    // The first expired while queued: it is dead-lettered at delivery time.
    assert!(bus
        .receive_timeout(b, Duration::from_millis(10))
        .await
        .expect("ok")
        .is_none());
    // The second is taken out by the periodic sweeper without anyone receiving.
    bus.send_message(swept).await.expect("send");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(bus.mailbox_usage(b).expect("usage").0, 0);
    let dl = bus.dead_letters();
    for id in [short_id, swept_id] {
        let d = dl
            .iter()
            .find(|d| d.message_id == id)
            .expect("dead-lettered");
        assert_eq!(d.reason, DeadLetterReason::Expired);
        assert!(d.envelope.is_some());
    }
    assert!(audit
        .events_of(&AuditEventType::MessageRejected)
        .iter()
        .any(|e| e.metadata.get("message_id") == Some(&short_id.to_string())));
}

#[tokio::test]
async fn mailbox_delivers_critical_first_and_fifo_within_a_priority() {
    let (bus, _) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let order = [
        (Priority::Low, "low-1"),
        (Priority::Normal, "normal-1"),
        (Priority::Critical, "critical-1"),
        (Priority::High, "high-1"),
        (Priority::Normal, "normal-2"),
        (Priority::Critical, "critical-2"),
        (Priority::Low, "low-2"),
    ];
    for (p, text) in order {
        let mut m = msg(a, b, "t", text.as_bytes());
        m.priority = p;
        bus.send_message(m).await.expect("send");
    }
    let mut got = Vec::new();
    for _ in 0..order.len() {
        let m = bus.receive(b).await.expect("receive");
        got.push(String::from_utf8(m.message.payload).expect("utf8"));
    }
    assert_eq!(
        got,
        [
            "critical-1",
            "critical-2",
            "high-1",
            "normal-1",
            "normal-2",
            "low-1",
            "low-2"
        ]
    );
    // A batch keeps the same order.
    for (p, text) in order {
        let mut m = msg(a, b, "t", text.as_bytes());
        m.priority = p;
        bus.send_message(m).await.expect("send");
    }
    let batch = bus.receive_batch(b, 16).await.expect("batch");
    let texts: Vec<_> = batch
        .into_iter()
        .map(|m| String::from_utf8(m.message.payload).expect("utf8"))
        .collect();
    assert_eq!(texts, got);
}

#[tokio::test(start_paused = true)]
async fn full_mailbox_makes_the_sender_wait_then_comm_003() {
    let config = CommunicationConfig {
        mailbox_capacity: 4,
        delivery_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let (bus, _) = bus_with(config).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    for i in 0..4 {
        bus.send_message(msg(a, b, "t", format!("{i}").as_bytes()))
            .await
            .expect("fits");
    }
    let start = tokio::time::Instant::now();
    let m = msg(a, b, "t", b"one too many");
    let id = m.id;
    let err = bus.send_message(m).await.expect_err("full");
    assert_eq!(err.code(), "COMM_003", "{err}");
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert!(bus
        .dead_letters()
        .iter()
        .any(|d| d.message_id == id && d.reason == DeadLetterReason::MailboxFull));

    // A sender waiting for room goes through as soon as the consumer takes one.
    let bus2 = bus.clone();
    let waiter = tokio::spawn(async move { bus2.send_message(msg(a, b, "t", b"late")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    bus.receive(b).await.expect("make room");
    waiter
        .await
        .expect("join")
        .expect("sent after room was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_keeps_memory_bounded_and_loses_nothing() {
    let config = CommunicationConfig {
        mailbox_capacity: 8,
        mailbox_max_bytes: 8 * 1024,
        max_message_size: 1024,
        delivery_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let (bus, _) = bus_with(config).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    const N: usize = 200;
    let producer = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..N {
                bus.send_message(msg(a, b, "t", &(i as u32).to_be_bytes()))
                    .await
                    .expect("send waits instead of failing");
            }
        })
    };
    let mut max_seen = (0, 0);
    for i in 0..N {
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let usage = bus.mailbox_usage(b).expect("usage");
        max_seen = (max_seen.0.max(usage.0), max_seen.1.max(usage.1));
        let m = bus.receive(b).await.expect("receive");
        assert_eq!(m.message.payload, (i as u32).to_be_bytes(), "in order");
    }
    producer.await.expect("producer");
    assert!(max_seen.0 <= 8, "mailbox held {} messages", max_seen.0);
    assert!(max_seen.1 <= 8 * 1024, "mailbox held {} bytes", max_seen.1);
    assert!(
        max_seen.0 >= 4,
        "the producer should have been ahead: {max_seen:?}"
    );
    assert!(bus.dead_letters().is_empty());
}

#[tokio::test]
async fn oversized_message_is_refused_with_comm_002() {
    let config = CommunicationConfig {
        max_message_size: 100,
        ..Default::default()
    };
    let (bus, audit) = bus_with(config).await;
    let ids = agents(&bus, 2).await;
    let before = audit.events().len();
    let err = bus
        .send_message(msg(ids[0], ids[1], "t", &[0u8; 101]))
        .await
        .expect_err("too large");
    assert_eq!(err.code(), "COMM_002");
    assert_eq!(bus.stats().sent, 0);
    assert_eq!(bus.mailbox_usage(ids[1]).expect("usage"), (0, 0));
    assert_eq!(audit.events().len(), before);
    bus.send_message(msg(ids[0], ids[1], "t", &[0u8; 100]))
        .await
        .expect("at the limit is fine");
    let mut zero_ttl = msg(ids[0], ids[1], "t", b"x");
    zero_ttl.ttl = Duration::ZERO;
    assert_eq!(
        bus.send_message(zero_ttl).await.expect_err("ttl").code(),
        "COMM_005"
    );
    let err = bus
        .send_message(msg(ids[0], AgentId::new(), "t", b"x"))
        .await
        .expect_err("unknown recipient");
    assert_eq!(err.code(), "COMM_001");
    assert!(err.to_string().contains("not registered"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn request_reply_and_timeout() {
    let config = CommunicationConfig {
        delivery_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let (bus, _) = bus_with(config).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let responder = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let req = bus.receive(b).await.expect("request arrives");
            assert_eq!(req.kind, MessageKind::Request);
            let mut answer = req.message.payload.clone();
            answer.reverse();
            bus.reply(&req, answer).await.expect("reply");
        })
    };
    let req = msg(a, b, "math", b"abc");
    let req_id = req.id;
    let reply = bus.request(req).await.expect("reply arrives");
    assert_eq!(reply.message.payload, b"cba");
    assert_eq!(reply.kind, MessageKind::Reply);
    assert_eq!(reply.in_reply_to, Some(req_id));
    assert_eq!(reply.message.from, b);
    responder.await.expect("responder");

    // Nobody answers: COMM_004 after delivery_timeout; a late reply is dead-lettered.
    let start = tokio::time::Instant::now();
    let err = bus
        .request(msg(a, b, "math", b"ignored"))
        .await
        .expect_err("times out");
    assert_eq!(err.code(), "COMM_004", "{err}");
    assert!(start.elapsed() >= Duration::from_secs(2));
    let late = bus.receive(b).await.expect("the request is still queued");
    let err = bus
        .reply(&late, b"too late".to_vec())
        .await
        .expect_err("late");
    assert_eq!(err.code(), "COMM_001");
    assert!(bus
        .dead_letters()
        .iter()
        .any(|d| d.reason == DeadLetterReason::ReplyUnclaimed));
}

#[tokio::test]
async fn only_the_addressed_agent_can_answer_a_request() {
    let (bus, audit) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let bus2 = bus.clone();
    let req = msg(a, b, "q", b"?");
    let pending =
        tokio::spawn(async move { bus2.request_with_timeout(req, Duration::from_secs(5)).await });
    let delivered = bus.receive(b).await.expect("request");
    // C forges a reply by re-addressing the request it never got.
    let mut stolen = delivered.clone();
    stolen.message.to = c;
    let err = bus
        .reply(&stolen, b"evil".to_vec())
        .await
        .expect_err("spoof");
    assert_eq!(err.reject_reason(), Some(RejectReason::SpoofedReply));
    assert!(audited_rejection(&audit, RejectReason::SpoofedReply));
    bus.reply(&delivered, b"good".to_vec())
        .await
        .expect("real reply");
    let reply = pending.await.expect("join").expect("reply");
    assert_eq!(reply.message.payload, b"good");
}

#[tokio::test]
async fn publish_reaches_every_subscriber() {
    let (bus, _) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 4).await;
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    bus.subscribe(b, "news.*").await.expect("sub");
    bus.subscribe(c, "news.sports").await.expect("sub");
    bus.subscribe(d, "weather").await.expect("sub");
    bus.subscribe(a, "news.*")
        .await
        .expect("publisher's own subscription");
    let n = bus
        .publish(msg(a, a, "news.sports", b"goal"))
        .await
        .expect("publish");
    assert_eq!(n, 2, "b and c, not d, not the publisher");
    for r in [b, c] {
        let m = bus.receive(r).await.expect("copy");
        assert_eq!(m.kind, MessageKind::Topic);
        assert_eq!(m.message.payload, b"goal");
        assert_eq!(m.message.to, r);
    }
    assert!(bus
        .receive_timeout(d, Duration::from_millis(20))
        .await
        .expect("ok")
        .is_none());
    bus.unsubscribe(b, "news.*").await.expect("unsub");
    assert_eq!(
        bus.publish(msg(a, a, "news.sports", b"again"))
            .await
            .expect("publish"),
        1
    );
}

#[tokio::test]
async fn policy_and_capabilities_decide_who_may_talk() {
    let (a, b, c) = (AgentId::new(), AgentId::new(), AgentId::new());
    let policy = move |ctx: &DeliveryContext<'_>| {
        if ctx.to == c && ctx.topic == "secrets" {
            PolicyDecision::Deny(format!("{} may not send secrets to {}", ctx.from, ctx.to))
        } else {
            PolicyDecision::Allow
        }
    };
    let audit = Arc::new(MockAuditTrail::new_sync());
    let bus = DefaultCommunicationBus::builder(CommunicationConfig::default())
        .audit(audit.clone() as AuditSink)
        .policy(Arc::new(policy))
        .build()
        .await
        .expect("bus");
    bus.register_agent(a, MSG.to_vec()).await.expect("a");
    bus.register_agent(b, vec![Capability::Network])
        .await
        .expect("b");
    bus.register_agent(c, MSG.to_vec()).await.expect("c");

    let err = bus
        .send_message(msg(a, c, "secrets", b"x"))
        .await
        .expect_err("denied");
    assert_eq!(err.reject_reason(), Some(RejectReason::PolicyDenied));
    assert!(audited_rejection(&audit, RejectReason::PolicyDenied));
    bus.send_message(msg(a, c, "weather", b"x"))
        .await
        .expect("allowed topic");
    let err = bus
        .send_message(msg(b, c, "weather", b"x"))
        .await
        .expect_err("b lacks messaging");
    assert_eq!(err.reject_reason(), Some(RejectReason::MissingCapability));
    let err = bus
        .send_message(msg(a, b, "weather", b"x"))
        .await
        .expect_err("b may not receive");
    assert_eq!(err.code(), "SEC_001");
    assert!(audited_rejection(&audit, RejectReason::MissingCapability));
    // Granting the capability (re-registration updates it) opens the path.
    bus.register_agent(b, MSG.to_vec()).await.expect("update");
    bus.send_message(msg(a, b, "weather", b"x"))
        .await
        .expect("now allowed");
}

#[tokio::test(start_paused = true)]
async fn session_mode_round_trip_tampering_and_rotation() {
    let config = CommunicationConfig {
        auth_mode: AuthMode::Session,
        key_rotation_grace: Duration::from_secs(5),
        ..Default::default()
    };
    let (bus, audit) = bus_with(config).await;
    let ids = agents(&bus, 2).await;
    let (a, b) = (ids[0], ids[1]);
    bus.send_message(msg(a, b, "t", b"over the session"))
        .await
        .expect("send");
    let got = bus.receive(b).await.expect("receive");
    assert_eq!(got.message.payload, b"over the session");
    assert_eq!(got.mode, EnvelopeMode::Session);
    bus.send_message(msg(b, a, "t", b"back"))
        .await
        .expect("reverse");
    assert_eq!(
        bus.receive(a).await.expect("receive").message.payload,
        b"back"
    );
    assert_eq!(
        bus.stats().sessions_established,
        1,
        "one handshake per pair"
    );

    let e = bus
        .seal(msg(a, b, "t", b"sealed"), MessageKind::Direct)
        .expect("seal");
    assert!(
        e.signature.is_none(),
        "session messages carry only the AEAD tag"
    );
    assert!(!contains(&e.body, b"sealed"));
    let mut altered = e.clone();
    altered.body[0] ^= 1;
    assert_rejected(
        bus.open_envelope(b, &altered),
        RejectReason::AuthenticationFailed,
    );
    let mut altered = e.clone();
    altered.header.topic = "x".into();
    assert_rejected(
        bus.open_envelope(b, &altered),
        RejectReason::AuthenticationFailed,
    );
    let mut reflected = e.clone();
    std::mem::swap(&mut reflected.header.from, &mut reflected.header.to);
    assert_rejected(
        bus.open_envelope(a, &reflected),
        RejectReason::AuthenticationFailed,
    );
    let mut unknown = e.clone();
    unknown.header.session_id = [7; 16];
    assert_rejected(bus.open_envelope(b, &unknown), RejectReason::KeyExpired);
    bus.open_envelope(b, &e).expect("genuine");
    assert_rejected(bus.open_envelope(b, &e), RejectReason::Replayed);

    // Rotation retires the session: in-flight messages verify during the grace period,
    // new ones use a new handshake, and after the grace the old session is refused.
    let in_flight_1 = bus
        .seal(msg(a, b, "t", b"1"), MessageKind::Direct)
        .expect("seal");
    let in_flight_2 = bus
        .seal(msg(a, b, "t", b"2"), MessageKind::Direct)
        .expect("seal");
    bus.rotate_keys(a).await.expect("rotate");
    let fresh = bus
        .seal(msg(a, b, "t", b"3"), MessageKind::Direct)
        .expect("seal");
    assert_ne!(fresh.header.session_id, in_flight_1.header.session_id);
    assert_eq!(bus.stats().sessions_established, 2);
    bus.open_envelope(b, &in_flight_1).expect("within grace");
    tokio::time::advance(Duration::from_secs(6)).await;
    bus.sweep_expired();
    assert_rejected(bus.open_envelope(b, &in_flight_2), RejectReason::KeyExpired);
    bus.open_envelope(b, &fresh).expect("new session");
    assert!(audited_rejection(
        &audit,
        RejectReason::AuthenticationFailed
    ));
}

#[tokio::test]
async fn keys_persist_wrapped_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    let kek = dir.path().join("keys/comm.kek");
    let a = AgentId::new();
    let first = {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, SyncMode::Full).expect("db"));
        let bus = DefaultCommunicationBus::builder(CommunicationConfig::default())
            .key_store(store, &kek)
            .build()
            .await
            .expect("bus");
        bus.register_agent(a, MSG.to_vec()).await.expect("register");
        bus.rotate_keys(a).await.expect("rotate");
        bus.public_keys(a).expect("keys")
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kek).expect("kek").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, SyncMode::Full).expect("db"));
    let rows = store.scan(KEY_TABLE).expect("scan");
    assert_eq!(
        rows.len(),
        2,
        "both epochs are stored while the old one is in grace"
    );
    let bus = DefaultCommunicationBus::builder(CommunicationConfig::default())
        .key_store(store.clone(), &kek)
        .build()
        .await
        .expect("bus");
    bus.register_agent(a, MSG.to_vec()).await.expect("register");
    assert_eq!(
        bus.public_keys(a).expect("keys"),
        first,
        "same identity after restart"
    );
    // Without the right KEK the keys do not load.
    let other = DefaultCommunicationBus::builder(CommunicationConfig::default())
        .key_store(store, dir.path().join("other.kek"))
        .build()
        .await
        .expect("bus");
    let err = other
        .register_agent(a, MSG.to_vec())
        .await
        .expect_err("wrong KEK");
    assert_eq!(err.code(), "COMM_007");
}

// ----- the sandbox bridge -------------------------------------------------------------

const MAX: usize = 1 << 20;

async fn next_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> RuntimeFrame {
    tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<_, RuntimeFrame>(r, MAX),
    )
    .await
    .expect("a frame within 10s")
    .expect("readable")
    .expect("not at end")
}

#[tokio::test]
async fn bridge_over_in_memory_streams() {
    let (bus, _) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 2).await;
    let (sandboxed, peer) = (ids[0], ids[1]);
    // Agent side of the two pipes.
    let (mut agent_out, bridge_in) = tokio::io::duplex(4096);
    let (bridge_out, mut agent_in) = tokio::io::duplex(4096);
    let mut handle = spawn_bridge(
        bus.clone(),
        sandboxed,
        bridge_in,
        bridge_out,
        BridgeConfig::default(),
    )
    .expect("bridge");

    match next_frame(&mut agent_in).await {
        RuntimeFrame::Hello { agent_id, .. } => assert_eq!(agent_id, sandboxed.to_string()),
        other => panic!("expected hello, got {other:?}"),
    }
    // The agent sends; the runtime signs and encrypts as the agent.
    let id = MessageId::new().to_string();
    write_frame(
        &mut agent_out,
        &AgentFrame::Send {
            id: id.clone(),
            to: peer.to_string(),
            topic: "hello".into(),
            payload: b"from the sandbox".to_vec(),
            priority: WirePriority::High,
            ttl_ms: 0,
        },
        MAX,
    )
    .await
    .expect("write");
    assert_eq!(
        next_frame(&mut agent_in).await,
        RuntimeFrame::Ack { ref_id: id }
    );
    let got = bus.receive(peer).await.expect("peer receives");
    assert_eq!(got.message.from, sandboxed);
    assert_eq!(got.message.payload, b"from the sandbox");
    assert_eq!(got.message.priority, Priority::High);

    // A message for the agent arrives as a deliver frame, decrypted.
    bus.send_message(msg(peer, sandboxed, "news", b"for the sandbox"))
        .await
        .expect("send");
    match next_frame(&mut agent_in).await {
        RuntimeFrame::Deliver { message, kind, .. } => {
            assert_eq!(kind, DeliveryKind::Direct);
            assert_eq!(message.payload, b"for the sandbox");
            assert_eq!(message.from, peer.to_string());
        }
        other => panic!("expected deliver, got {other:?}"),
    }

    // Bad input is answered with an error frame and the bridge carries on.
    write_frame(
        &mut agent_out,
        &AgentFrame::Send {
            id: "not-a-uuid".into(),
            to: peer.to_string(),
            topic: "t".into(),
            payload: vec![],
            priority: WirePriority::Normal,
            ttl_ms: 0,
        },
        MAX,
    )
    .await
    .expect("write");
    match next_frame(&mut agent_in).await {
        RuntimeFrame::Error { code, ref_id, .. } => {
            assert_eq!(code, "COMM_006");
            assert_eq!(ref_id.as_deref(), Some("not-a-uuid"));
        }
        other => panic!("expected error, got {other:?}"),
    }
    use tokio::io::AsyncWriteExt;
    agent_out
        .write_all(&[0, 0, 0, 5, b'{', b'x', b'}', b' ', b' '])
        .await
        .expect("garbage");
    match next_frame(&mut agent_in).await {
        RuntimeFrame::Error { code, .. } => assert_eq!(code, "COMM_006"),
        other => panic!("expected error, got {other:?}"),
    }
    // Sends to an unknown agent are COMM_001 with the cause.
    let id = MessageId::new().to_string();
    write_frame(
        &mut agent_out,
        &AgentFrame::Send {
            id: id.clone(),
            to: AgentId::new().to_string(),
            topic: "t".into(),
            payload: vec![1],
            priority: WirePriority::Normal,
            ttl_ms: 0,
        },
        MAX,
    )
    .await
    .expect("write");
    match next_frame(&mut agent_in).await {
        RuntimeFrame::Error {
            code,
            ref_id,
            message,
        } => {
            assert_eq!(code, "COMM_001");
            assert_eq!(ref_id, Some(id));
            assert!(message.contains("not registered"), "{message}");
        }
        other => panic!("expected error, got {other:?}"),
    }

    // Tasks in, results and logs out.
    let task = TaskId::new();
    handle
        .deliver_task(task, b"work".to_vec(), Duration::from_secs(5))
        .await
        .expect("task");
    match next_frame(&mut agent_in).await {
        RuntimeFrame::Task { task_id, input, .. } => {
            assert_eq!(task_id, task.to_string());
            assert_eq!(input, b"work");
        }
        other => panic!("expected task, got {other:?}"),
    }
    for f in [
        AgentFrame::Log {
            level: "info".into(),
            message: "working".into(),
        },
        AgentFrame::Heartbeat {},
        AgentFrame::TaskResult {
            task_id: task.to_string(),
            ok: true,
            output: b"done".to_vec(),
            error: None,
        },
    ] {
        write_frame(&mut agent_out, &f, MAX).await.expect("write");
    }
    assert_eq!(
        handle.next_event().await,
        Some(BridgeEvent::Log {
            level: "info".into(),
            message: "working".into()
        })
    );
    assert_eq!(handle.next_event().await, Some(BridgeEvent::Heartbeat));
    assert_eq!(
        handle.next_event().await,
        Some(BridgeEvent::TaskResult {
            task_id: task.to_string(),
            ok: true,
            output: b"done".to_vec(),
            error: None
        })
    );

    // Requests delivered to the agent are answered with reply frames.
    let bus2 = bus.clone();
    let asking = tokio::spawn(async move {
        bus2.request_with_timeout(msg(peer, sandboxed, "q", b"2+2"), Duration::from_secs(5))
            .await
    });
    let request_id = match next_frame(&mut agent_in).await {
        RuntimeFrame::Deliver { message, kind, .. } => {
            assert_eq!(kind, DeliveryKind::Request);
            message.id
        }
        other => panic!("expected request, got {other:?}"),
    };
    let rid = MessageId::new().to_string();
    write_frame(
        &mut agent_out,
        &AgentFrame::Reply {
            id: rid.clone(),
            in_reply_to: request_id,
            payload: b"4".to_vec(),
        },
        MAX,
    )
    .await
    .expect("write");
    assert_eq!(
        next_frame(&mut agent_in).await,
        RuntimeFrame::Ack { ref_id: rid }
    );
    let reply = asking.await.expect("join").expect("reply");
    assert_eq!(reply.message.payload, b"4");
    assert_eq!(reply.message.from, sandboxed);

    // Closing the agent's output stops the bridge.
    drop(agent_out);
    loop {
        match handle.next_event().await {
            Some(BridgeEvent::Closed { error }) => {
                assert_eq!(error, None);
                break;
            }
            Some(_) => continue,
            None => panic!("bridge ended without a Closed event"),
        }
    }
}

fn python3() -> &'static str {
    let p = "/usr/bin/python3";
    assert!(
        std::path::Path::new(p).exists(),
        "python3 is required for the example agent test: run `bash scripts/setup.sh` \
         (installs python3) or `apt-get install python3`"
    );
    p
}

async fn expect_from(
    bus: &DefaultCommunicationBus,
    agent: AgentId,
    topic: &str,
) -> ReceivedMessage {
    let m = bus
        .receive_timeout(agent, Duration::from_secs(10))
        .await
        .expect("receive")
        .unwrap_or_else(|| panic!("nothing on {topic} within 10s"));
    assert_eq!(m.message.topic, topic);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_agent_through_the_bridge() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/agents/echo_agent.py"
    );
    let mut child = tokio::process::Command::new(python3())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    let (bus, _) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 3).await;
    let (py, a, b) = (ids[0], ids[1], ids[2]);
    let mut handle = spawn_bridge(
        bus.clone(),
        py,
        child.stdout.take().expect("stdout"),
        child.stdin.take().expect("stdin"),
        BridgeConfig::default(),
    )
    .expect("bridge");
    // Wait until the agent subscribed ("ready" log comes first).
    match tokio::time::timeout(Duration::from_secs(10), handle.next_event()).await {
        Ok(Some(BridgeEvent::Log { message, .. })) => {
            assert!(message.contains("ready"), "{message}")
        }
        other => panic!("expected the ready log, got {other:?}"),
    }

    // Echo of a direct message.
    bus.send_message(msg(a, py, "chat", b"hi there"))
        .await
        .expect("send");
    let echo = expect_from(&bus, a, "echo").await;
    assert_eq!(echo.message.payload, b"echo:hi there");
    assert_eq!(echo.message.from, py);

    // Request/reply with the Python agent.
    let reply = bus
        .request_with_timeout(msg(a, py, "rev", b"abc"), Duration::from_secs(10))
        .await
        .expect("python replies");
    assert_eq!(reply.message.payload, b"cba");

    // Tasks.
    let task = TaskId::new();
    handle
        .deliver_task(task, b"shout".to_vec(), Duration::from_secs(5))
        .await
        .expect("task");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), handle.next_event()).await {
            Ok(Some(BridgeEvent::TaskResult {
                task_id,
                ok,
                output,
                ..
            })) => {
                assert_eq!(task_id, task.to_string());
                assert!(ok);
                assert_eq!(output, b"SHOUT");
                break;
            }
            Ok(Some(_)) => continue,
            other => panic!("expected a task result, got {other:?}"),
        }
    }

    // Its subscription (made over the protocol) receives publications.
    let mut subscribed = false;
    for _ in 0..50 {
        if bus
            .publish(msg(a, a, "broadcast", b"all hands"))
            .await
            .expect("publish")
            == 1
        {
            subscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(subscribed, "the python agent never subscribed");
    assert_eq!(
        expect_from(&bus, a, "echo").await.message.payload,
        b"echo:all hands"
    );

    // The Python agent makes a request of its own (to b) and relays the answer to a.
    let responder = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let q = bus
                .receive_timeout(b, Duration::from_secs(10))
                .await
                .expect("receive")
                .expect("question arrives");
            assert_eq!(q.message.from, py);
            assert_eq!(q.kind, MessageKind::Request);
            bus.reply(&q, b"pong".to_vec()).await.expect("reply");
        })
    };
    bus.send_message(msg(a, py, "ask", b.to_string().as_bytes()))
        .await
        .expect("send");
    assert_eq!(
        expect_from(&bus, a, "answer").await.message.payload,
        b"pong"
    );
    responder.await.expect("responder");

    handle.shutdown();
    drop(child.stdin.take());
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_sdk_agent_through_the_bridge() {
    use std::os::fd::OwnedFd;
    // Two OS pipes: the SDK agent uses blocking std I/O on one end, the bridge tokio on the
    // other, like a sandboxed program's stdin/stdout.
    let (to_agent_r, to_agent_w) = std::io::pipe().expect("pipe");
    let (from_agent_r, from_agent_w) = std::io::pipe().expect("pipe");
    let agent_thread = std::thread::spawn(move || {
        let mut agent =
            symbiont_agent::Agent::connect(std::io::BufReader::new(to_agent_r), from_agent_w)
                .expect("hello");
        let mut handled = 0;
        while let Some(ev) = agent.next_event().expect("frame") {
            if let symbiont_agent::Incoming::Message { message, .. } = ev {
                let mut p = b"rust:".to_vec();
                p.extend_from_slice(&message.payload);
                agent.send(&message.from, "echo", &p).expect("send");
                handled += 1;
            }
        }
        handled
    });
    let reader =
        tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(from_agent_r)).expect("rx");
    let writer =
        tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(to_agent_w)).expect("tx");
    let (bus, _) = bus_with(CommunicationConfig::default()).await;
    let ids = agents(&bus, 2).await;
    let (rs, a) = (ids[0], ids[1]);
    let handle =
        spawn_bridge(bus.clone(), rs, reader, writer, BridgeConfig::default()).expect("bridge");
    for i in 0..20u8 {
        bus.send_message(msg(a, rs, "n", &[i])).await.expect("send");
    }
    for i in 0..20u8 {
        let m = expect_from(&bus, a, "echo").await;
        assert_eq!(m.message.payload, [b'r', b'u', b's', b't', b':', i]);
    }
    handle.shutdown();
    // Dropping the bridge's writer ends the agent's input; it exits its loop.
    let handled = tokio::task::spawn_blocking(move || agent_thread.join().expect("agent"))
        .await
        .expect("join");
    assert_eq!(handled, 20);
}
