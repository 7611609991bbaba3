//! Plaintext hygiene of the communication bus: with encryption on, a message's payload is
//! never found in the store, the database files, the audit trail, the dead letters or the
//! logs (captured at TRACE). In its own test binary so that no other test's threads share
//! `tracing`'s global callsite state with the capturing subscriber.

mod bus_support;

use std::sync::Arc;
use std::time::Duration;

use symbiont_runtime::communication::*;
use symbiont_runtime::integrations::audit_trail::{AuditSink, MockAuditTrail};
use symbiont_runtime::storage::{SqliteStore, Store, SyncMode};
use symbiont_runtime::types::*;

use bus_support::{agents, msg, MSG};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A `tracing` writer capturing everything into a buffer.
#[derive(Clone, Default)]
struct Capture(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

#[tokio::test(start_paused = true)]
async fn payload_is_never_in_plaintext_in_store_audit_logs_or_dead_letters() {
    let logs = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db, SyncMode::Full).expect("db"));
    let audit = Arc::new(MockAuditTrail::new_sync());
    let config = CommunicationConfig {
        mailbox_capacity: 2,
        delivery_timeout: Duration::from_millis(100),
        audit_deliveries: true,
        ..Default::default()
    };
    let bus = DefaultCommunicationBus::builder(config)
        .audit(audit.clone() as AuditSink)
        .key_store(store.clone(), dir.path().join("comm.kek"))
        .build()
        .await
        .expect("bus");
    let ids = agents(&bus, 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let marker = format!("MARKER-{}-PLAINTEXT", uuid::Uuid::new_v4());
    let marker = marker.as_bytes();
    let m = |to| msg(a, to, "topic", marker);

    // Delivered, rejected (tampered, replayed, wrong recipient), expired, mailbox full,
    // request/reply, rotated keys, sessions are all exercised with the marker payload.
    bus.send_message(m(b)).await.expect("send");
    assert_eq!(bus.receive(b).await.expect("recv").message.payload, marker);
    let mut e = bus.seal(m(b), MessageKind::Direct).expect("seal");
    e.body[0] ^= 1;
    let _ = bus.open_envelope(b, &e);
    let e = bus.seal(m(b), MessageKind::Direct).expect("seal");
    let _ = bus.open_envelope(b, &e);
    let _ = bus.open_envelope(b, &e);
    let _ = bus.open_envelope(c, &e);
    let mut short = m(c);
    short.ttl = Duration::from_millis(10);
    bus.send_message(short).await.expect("send");
    bus.send_message(m(c)).await.expect("send");
    let _ = bus.send_message(m(c)).await; // full: COMM_003
    tokio::time::advance(Duration::from_millis(50)).await;
    let _ = bus.receive(c).await;
    bus.rotate_keys(a).await.expect("rotate");
    bus.send_message(m(b)).await.expect("send after rotation");
    let _ = bus.receive(b).await;
    bus.register_agent(AgentId::new(), MSG.to_vec())
        .await
        .expect("more keys");

    let needle_hex = hex::encode(marker);
    let scan = |what: &str, bytes: &[u8]| {
        assert!(!contains(bytes, marker), "plaintext found in {what}");
        assert!(
            !contains(bytes, needle_hex.as_bytes()),
            "hex plaintext found in {what}"
        );
    };
    // The store (every table, and the database files themselves).
    for table in [KEY_TABLE] {
        for (k, v) in store.scan(table).expect("scan") {
            scan(&format!("store {table}/{k}"), &v);
        }
    }
    for entry in std::fs::read_dir(dir.path()).expect("dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        scan(&path.display().to_string(), &bytes);
    }
    // The audit trail (every field of every event).
    let events = audit.events();
    assert!(
        events.len() >= 8,
        "the scenario must have produced audit events"
    );
    for ev in &events {
        let text = format!("{ev:?}");
        scan("audit event", text.as_bytes());
    }
    // Dead letters hold only ciphertext.
    let dl = bus.dead_letters();
    assert!(dl.len() >= 4, "{dl:?}");
    for d in &dl {
        if let Some(env) = &d.envelope {
            scan("dead letter envelope", &env.body);
        }
        scan("dead letter", format!("{d:?}").as_bytes());
    }
    // Everything logged at TRACE.
    let logged = logs.0.lock().clone();
    assert!(
        contains(&logged, b"message rejected"),
        "the capture must have seen the bus's logs"
    );
    scan("log output", &logged);
}
