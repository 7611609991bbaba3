//! `symbiont audit verify | tail | export` run as a real process on a real log.

use std::path::Path;
use std::process::{Command, Output};

use symbiont_runtime::integrations::audit_trail::{
    AuditConfig, AuditEvent, AuditEventType, AuditTrail, DurableAuditTrail,
};
use symbiont_runtime::AgentId;

fn symbiont(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_symbiont"))
        .args(args)
        .output()
        .expect("run symbiont")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes a log with 30 events into `<data>/audit` (key in `<data>/keys`); returns the
/// agent the even events are about.
fn write_log(data: &Path) -> AgentId {
    let agent = AgentId::new();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let config = AuditConfig {
            checkpoint_every: 8,
            ..Default::default()
        };
        let trail = DurableAuditTrail::open(&config, data).expect("open");
        for i in 0..30 {
            let event = AuditEvent::new(
                if i % 3 == 0 {
                    AuditEventType::MessageRejected
                } else {
                    AuditEventType::StateChanged
                },
                (i % 2 == 0).then_some(agent),
                format!("event {i}"),
            );
            trail.record_event(event).await.expect("record");
        }
        trail.close().await.expect("close");
    });
    agent
}

#[test]
fn verify_passes_on_a_good_log_and_fails_naming_the_entry_on_a_tampered_one() {
    let data = tempfile::tempdir().expect("tempdir");
    write_log(data.path());
    let dir = data.path().join("audit");
    let key = data.path().join("keys").join("audit.ed25519.pub");
    let dir_s = dir.to_str().expect("utf8");
    let key_s = key.to_str().expect("utf8");

    let good = symbiont(&["audit", "verify", "--dir", dir_s, "--public-key", key_s]);
    assert_eq!(
        good.status.code(),
        Some(0),
        "{}{}",
        text(&good.stdout),
        text(&good.stderr)
    );
    assert!(
        text(&good.stdout).starts_with("OK"),
        "{}",
        text(&good.stdout)
    );
    assert!(
        text(&good.stdout).contains("30 events"),
        "{}",
        text(&good.stdout)
    );

    // The same through the configuration's data directory.
    let config = data.path().join("runtime_config.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\n",
            data.path().to_str().expect("utf8")
        ),
    )
    .expect("config");
    let via_config = symbiont(&[
        "--config",
        config.to_str().expect("utf8"),
        "audit",
        "verify",
    ]);
    assert_eq!(
        via_config.status.code(),
        Some(0),
        "{}{}",
        text(&via_config.stdout),
        text(&via_config.stderr)
    );

    // Tamper with one event.
    let segment = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seg-"))
        })
        .expect("segment");
    let original = std::fs::read_to_string(&segment).expect("read");
    let seq = original
        .lines()
        .find(|l| l.contains("\"event 7\""))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["seq"].as_u64())
        .expect("seq of event 7");
    std::fs::write(&segment, original.replace("\"event 7\"", "\"event 8\"")).expect("tamper");

    let bad = symbiont(&["audit", "verify", "--dir", dir_s, "--public-key", key_s]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "{}{}",
        text(&bad.stdout),
        text(&bad.stderr)
    );
    let out = text(&bad.stdout);
    assert!(out.starts_with("FAILED"), "{out}");
    assert!(
        out.contains(&format!("Modified at seq {seq} in seg-")),
        "{out}"
    );

    let json = symbiont(&[
        "audit",
        "verify",
        "--dir",
        dir_s,
        "--public-key",
        key_s,
        "--json",
    ]);
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json report");
    assert_eq!(report["problem"]["kind"], "modified");
    assert_eq!(report["problem"]["seq"], seq);
}

#[test]
fn verify_fails_with_a_wrong_key_and_errors_without_one() {
    let data = tempfile::tempdir().expect("tempdir");
    write_log(data.path());
    let dir = data.path().join("audit");
    let other = data.path().join("other.pub");
    std::fs::write(&other, format!("{}\n", "11".repeat(32))).expect("write");
    let wrong = symbiont(&[
        "audit",
        "verify",
        "--dir",
        dir.to_str().expect("utf8"),
        "--public-key",
        other.to_str().expect("utf8"),
    ]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong.stdout));
    assert!(
        text(&wrong.stdout).contains("WrongKey"),
        "{}",
        text(&wrong.stdout)
    );

    let missing = symbiont(&[
        "audit",
        "verify",
        "--dir",
        dir.to_str().expect("utf8"),
        "--public-key",
        data.path().join("nope.pub").to_str().expect("utf8"),
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("nope.pub"),
        "{}",
        text(&missing.stderr)
    );

    let empty = tempfile::tempdir().expect("tempdir");
    let no_log = symbiont(&[
        "audit",
        "verify",
        "--dir",
        empty.path().to_str().expect("utf8"),
        "--public-key",
        data.path()
            .join("keys/audit.ed25519.pub")
            .to_str()
            .expect("utf8"),
    ]);
    assert_eq!(no_log.status.code(), Some(1), "{}", text(&no_log.stdout));
    assert!(text(&no_log.stdout).contains("NoLog"));
}

#[test]
fn tail_and_export_read_the_log() {
    let data = tempfile::tempdir().expect("tempdir");
    let agent = write_log(data.path());
    let dir = data.path().join("audit");
    let dir_s = dir.to_str().expect("utf8");

    let tail = symbiont(&["audit", "tail", "--dir", dir_s, "-n", "3"]);
    assert_eq!(tail.status.code(), Some(0), "{}", text(&tail.stderr));
    let lines: Vec<String> = text(&tail.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[2].contains("event 29") && lines[0].contains("event 27"),
        "{lines:?}"
    );

    let export = symbiont(&[
        "audit",
        "export",
        "--dir",
        dir_s,
        "--agent",
        &agent.to_string(),
        "--type",
        "MessageRejected",
        "--since",
        "1h",
    ]);
    assert_eq!(export.status.code(), Some(0), "{}", text(&export.stderr));
    let events: Vec<serde_json::Value> = text(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    // Even i (agent) and i % 3 == 0 (MessageRejected): 0, 6, 12, 18, 24.
    let details: Vec<_> = events
        .iter()
        .map(|e| e["details"].as_str().expect("details").to_string())
        .collect();
    assert_eq!(
        details,
        ["event 0", "event 6", "event 12", "event 18", "event 24"]
    );
    assert!(events.iter().all(|e| e["agent"] == agent.to_string()));

    let future = symbiont(&[
        "audit",
        "export",
        "--dir",
        dir_s,
        "--since",
        "2999-01-01T00:00:00Z",
    ]);
    assert_eq!(future.status.code(), Some(0));
    assert!(future.stdout.is_empty());

    let bad = symbiont(&["audit", "export", "--dir", dir_s, "--type", "bogus"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("unknown audit event type"),
        "{}",
        text(&bad.stderr)
    );
}
