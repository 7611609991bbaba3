//! The durable audit trail for real: files on disk, real signatures, a real kill -9.
//!
//! Tampering tests edit, delete, insert, reorder and truncate entries of a log the trail
//! wrote and check that `verify_dir` fails and names the entry. The crash test re-executes
//! this test binary as a writer process (`writer_burst_acknowledges_durably` with
//! `SYMBIONT_AUDIT_CRASH_DIR` set), kills it with SIGKILL in the middle of a write burst,
//! and checks that the log verifies and that every acknowledged event is there.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use symbiont_runtime::integrations::audit_trail::{
    public_key_path, query_dir, tail_dir, verify_dir, AuditConfig, AuditEvent, AuditEventType,
    AuditKey, AuditPublicKey, AuditQuery, AuditTrail, DurableAuditTrail, FsyncPolicy, ProblemKind,
    VerifyReport, MIN_SEGMENT_SIZE, SEGMENT_HEADER_LEN,
};
use symbiont_runtime::AgentId;

const SEED: [u8; 32] = [42; 32];
const CRASH_DIR_ENV: &str = "SYMBIONT_AUDIT_CRASH_DIR";
const CRASH_ROUND_ENV: &str = "SYMBIONT_AUDIT_CRASH_ROUND";

fn key() -> AuditKey {
    AuditKey::from_seed(&SEED)
}

fn public() -> AuditPublicKey {
    key().public_key()
}

fn small_config() -> AuditConfig {
    AuditConfig {
        checkpoint_every: 10,
        segment_size: MIN_SEGMENT_SIZE,
        ..Default::default()
    }
}

fn open(dir: &Path, config: &AuditConfig) -> DurableAuditTrail {
    DurableAuditTrail::open_with_key(config, dir.to_path_buf(), key()).expect("open trail")
}

/// Writes `n` events ("event 0", "event 1", ...) and closes the trail.
async fn write_log(dir: &Path, config: &AuditConfig, n: usize) {
    let trail = open(dir, config);
    for i in 0..n {
        trail.submit(
            AuditEvent::new(AuditEventType::TaskStarted, None, format!("event {i}"))
                .with("i", i.to_string()),
        );
    }
    trail.flush().await.expect("flush");
    trail.close().await.expect("close");
}

fn verify(dir: &Path) -> VerifyReport {
    verify_dir(dir, &public()).expect("verify")
}

fn assert_problem(report: &VerifyReport, kind: ProblemKind, seq: u64) {
    let problem = report.problem.as_ref().unwrap_or_else(|| {
        panic!("expected {kind:?} at seq {seq}, but the log verified:\n{report}")
    });
    assert_eq!(problem.kind, kind, "{report}");
    assert_eq!(problem.seq, Some(seq), "{report}");
    assert!(report.to_string().contains("FAILED"), "{report}");
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-"))
        })
        .collect();
    out.sort();
    out
}

/// A segment file split into its header and its lines, for tampering.
struct Segment {
    path: PathBuf,
    header: Vec<u8>,
    lines: Vec<Vec<u8>>,
}

impl Segment {
    fn load(path: &Path) -> Self {
        let data = std::fs::read(path).expect("read segment");
        let header = data[..SEGMENT_HEADER_LEN as usize].to_vec();
        let body = &data[SEGMENT_HEADER_LEN as usize..];
        assert_eq!(
            body.last(),
            Some(&b'\n'),
            "a clean segment ends with a newline"
        );
        let lines = body[..body.len() - 1]
            .split(|b| *b == b'\n')
            .map(|l| l.to_vec())
            .collect();
        Self {
            path: path.to_path_buf(),
            header,
            lines,
        }
    }

    fn save(&self) {
        let mut data = self.header.clone();
        for line in &self.lines {
            data.extend_from_slice(line);
            data.push(b'\n');
        }
        std::fs::write(&self.path, data).expect("write segment");
    }

    fn json(&self, i: usize) -> serde_json::Value {
        serde_json::from_slice(&self.lines[i]).expect("json line")
    }

    fn seq(&self, i: usize) -> u64 {
        self.json(i)["seq"].as_u64().expect("seq")
    }

    /// Index of the line whose details are `details`.
    fn index_of(&self, details: &str) -> usize {
        (0..self.lines.len())
            .find(|i| self.json(*i)["details"] == details)
            .unwrap_or_else(|| panic!("no entry `{details}`"))
    }

    fn replace(&mut self, i: usize, from: &str, to: &str) {
        let text = String::from_utf8(self.lines[i].clone()).expect("utf8");
        assert!(text.contains(from));
        self.lines[i] = text.replacen(from, to, 1).into_bytes();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test]
async fn a_clean_log_verifies_with_every_entry_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 100).await;
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.events, 100);
    assert!(report.checkpoints >= 10, "{report}");
    assert_eq!(report.unsigned_tail, 0);
    assert_eq!(report.torn_tail, None);
    assert_eq!(report.signed_through, report.last_seq);
    assert!(report.to_string().starts_with("OK"), "{report}");
}

#[tokio::test]
async fn editing_an_entry_is_detected_and_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let i = seg.index_of("event 20");
    let seq = seg.seq(i);
    seg.replace(i, "event 20", "event 21");
    seg.save();
    assert_problem(&verify(dir.path()), ProblemKind::Modified, seq);
}

#[tokio::test]
async fn editing_the_last_entry_is_detected_through_the_signed_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 5).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let last = seg.lines.len() - 1;
    let seq = seg.seq(last);
    seg.replace(last, "\"close\"", "\"clone\"");
    seg.save();
    assert_problem(&verify(dir.path()), ProblemKind::Modified, seq);
}

#[tokio::test]
async fn editing_an_entrys_prev_field_names_that_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let i = seg.index_of("event 30");
    let seq = seg.seq(i);
    let prev = seg.json(i)["prev"].as_str().expect("prev").to_string();
    let forged = format!("{}0", &prev[..63]);
    let forged = if forged == prev {
        format!("{}1", &prev[..63])
    } else {
        forged
    };
    seg.replace(i, &prev, &forged);
    seg.save();
    assert_problem(&verify(dir.path()), ProblemKind::Modified, seq);
}

#[tokio::test]
async fn a_rehashed_rewrite_is_caught_by_the_next_checkpoint_signature() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let i = seg.index_of("event 20");
    seg.replace(i, "event 20", "event 99");
    // Re-chain everything after it, as an attacker without the key would.
    for j in i + 1..seg.lines.len() {
        let new_prev = sha256_hex(&seg.lines[j - 1]);
        let old_prev = seg.json(j)["prev"].as_str().expect("prev").to_string();
        seg.replace(j, &old_prev, &new_prev);
    }
    let checkpoint = (i + 1..seg.lines.len())
        .find(|j| seg.json(*j)["kind"] == "checkpoint")
        .expect("a checkpoint follows");
    let checkpoint_seq = seg.seq(checkpoint);
    seg.save();
    let report = verify(dir.path());
    assert_problem(&report, ProblemKind::BadSignature, checkpoint_seq);
    let message = &report.problem.as_ref().expect("problem").message;
    assert!(message.contains("re-hashed"), "{message}");
}

#[tokio::test]
async fn deleting_an_entry_is_detected_and_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let i = seg.index_of("event 20");
    let seq = seg.seq(i);
    seg.lines.remove(i);
    seg.save();
    assert_problem(&verify(dir.path()), ProblemKind::Missing, seq);
}

#[tokio::test]
async fn inserting_an_entry_is_detected_and_names_it() {
    // A forged copy placed before the genuine entry, with a correct `prev`.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let i = seg.index_of("event 20");
    let seq = seg.seq(i);
    let forged = String::from_utf8(seg.lines[i].clone())
        .expect("utf8")
        .replace("event 20", "forged");
    seg.lines.insert(i, forged.into_bytes());
    seg.save();
    let report = verify(dir.path());
    assert_problem(&report, ProblemKind::Inserted, seq);
    let offset = report
        .problem
        .as_ref()
        .and_then(|p| p.offset)
        .expect("offset");
    let data = std::fs::read(&seg.path).expect("read");
    assert!(
        data[offset as usize..].starts_with(seg.lines[i].as_slice()),
        "the offset names the forged line"
    );

    // A forged entry chained correctly after a genuine one, taking the next seq.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let i = seg.index_of("event 20");
    let seq = seg.seq(i) + 1;
    let mut forged: serde_json::Value = seg.json(i);
    forged["seq"] = seq.into();
    forged["prev"] = sha256_hex(&seg.lines[i]).into();
    forged["details"] = "forged".into();
    seg.lines
        .insert(i + 1, serde_json::to_vec(&forged).expect("json"));
    seg.save();
    assert_problem(&verify(dir.path()), ProblemKind::Inserted, seq);
}

#[tokio::test]
async fn reordering_entries_is_detected_and_names_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let i = seg.index_of("event 20");
    let seq = seg.seq(i);
    seg.lines.swap(i, i + 1);
    seg.save();
    assert_problem(&verify(dir.path()), ProblemKind::Reordered, seq);
}

#[tokio::test]
async fn truncating_the_log_is_detected() {
    // At a line boundary.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    let keep = seg.lines.len() - 5;
    let first_removed = seg.seq(keep);
    seg.lines.truncate(keep);
    seg.save();
    assert_problem(&verify(dir.path()), ProblemKind::Truncated, first_removed);

    // In the middle of the last line.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 50).await;
    let path = segments(dir.path())[0].clone();
    let seg = Segment::load(&path);
    let last_seq = seg.seq(seg.lines.len() - 1);
    let len = std::fs::metadata(&path).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(len - 20))
        .expect("truncate");
    assert_problem(&verify(dir.path()), ProblemKind::Truncated, last_seq);

    // A whole closed-over segment at the end.
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 1500).await;
    let segs = segments(dir.path());
    assert!(
        segs.len() >= 3,
        "expected several segments, got {}",
        segs.len()
    );
    let last = Segment::load(&segs[segs.len() - 1]);
    let first_of_last = last.seq(0);
    std::fs::remove_file(&segs[segs.len() - 1]).expect("rm");
    assert_problem(&verify(dir.path()), ProblemKind::Truncated, first_of_last);
}

#[tokio::test]
async fn deleting_whole_segments_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 1500).await;
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");

    // A middle one: a gap in the sequence.
    let middle_first = Segment::load(&segs[1]).seq(0);
    let saved = std::fs::read(&segs[1]).expect("read");
    std::fs::remove_file(&segs[1]).expect("rm");
    assert_problem(&verify(dir.path()), ProblemKind::Missing, middle_first);
    std::fs::write(&segs[1], saved).expect("restore");
    assert!(verify(dir.path()).is_ok());

    // The oldest, with no retention event to account for it.
    std::fs::remove_file(&segs[0]).expect("rm");
    assert_problem(&verify(dir.path()), ProblemKind::UnaccountedStart, 0);
}

#[tokio::test]
async fn a_wrong_public_key_fails_verification() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 20).await;
    let other = AuditKey::from_seed(&[7; 32]).public_key();
    let report = verify_dir(dir.path(), &other).expect("verify");
    let problem = report.problem.as_ref().expect("must fail");
    assert_eq!(problem.kind, ProblemKind::WrongKey, "{report}");
    assert!(report.to_string().contains(&other.to_hex()));
}

#[tokio::test]
async fn a_forged_head_slot_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 20).await;
    let mut seg = Segment::load(&segments(dir.path())[0]);
    // Copy the newer slot over the older one: it now sits in a slot it was not signed for.
    let (a, b) = seg.header.split_at_mut(512);
    let newer_is_b = String::from_utf8_lossy(b).contains("\"slot\":1");
    if newer_is_b {
        a.copy_from_slice(b);
    } else {
        b.copy_from_slice(a);
    }
    seg.save();
    let report = verify(dir.path());
    assert_eq!(
        report.problem.as_ref().map(|p| p.kind),
        Some(ProblemKind::Malformed),
        "{report}"
    );
}

#[tokio::test]
async fn a_torn_tail_verifies_up_to_the_last_entry_and_is_repaired_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 30).await;
    let path = segments(dir.path())[0].clone();
    let before = Segment::load(&path);
    let last_seq = before.seq(before.lines.len() - 1);
    // What a crash mid-write leaves: half a line after the signed end.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    f.write_all(br#"{"seq":99999,"prev":"ab"#).expect("append");
    drop(f);

    let report = verify(dir.path());
    assert!(report.is_ok(), "a torn tail is not tampering:\n{report}");
    let torn = report.torn_tail.as_ref().expect("torn tail reported");
    assert_eq!(torn.bytes, 23);
    assert_eq!(report.last_seq, Some(last_seq));

    // Reopen: the tail is cut, saved aside, the repair recorded, and the chain continues.
    let trail = open(dir.path(), &small_config());
    trail
        .record_event(AuditEvent::new(
            AuditEventType::TaskStarted,
            None,
            "after repair",
        ))
        .await
        .expect("record");
    trail.close().await.expect("close");
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.torn_tail, None);
    let repairs = query_dir(
        dir.path(),
        &AuditQuery {
            event_type: Some(AuditEventType::AuditMaintenance),
            ..Default::default()
        },
    )
    .expect("query");
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    let repair = &repairs[0].event;
    assert_eq!(repair.metadata["action"], "repair");
    assert_eq!(repair.metadata["bytes_removed"], "23");
    assert_eq!(repair.metadata["last_good_seq"], last_seq.to_string());
    let saved: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("torn-"))
        .collect();
    assert_eq!(saved.len(), 1);
    let saved_bytes = std::fs::read(dir.path().join(&saved[0])).expect("read");
    assert_eq!(saved_bytes, br#"{"seq":99999,"prev":"ab"#);
    let after = query_dir(dir.path(), &AuditQuery::default()).expect("query");
    assert_eq!(
        after.last().map(|r| r.event.details.as_str()),
        Some("after repair")
    );
}

#[tokio::test]
async fn damage_inside_the_signed_part_is_refused_on_open_not_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 30).await;
    let path = segments(dir.path())[0].clone();
    let mut seg = Segment::load(&path);
    let i = seg.index_of("event 10");
    seg.replace(i, "event 10", "event 11");
    seg.save();
    let before = std::fs::read(&path).expect("read");
    let err = DurableAuditTrail::open_with_key(&small_config(), dir.path().into(), key())
        .expect_err("must refuse");
    assert_eq!(err.code(), "AUDIT_004", "{err}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "nothing was cut"
    );
}

#[tokio::test]
async fn reopening_with_another_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 3).await;
    let err = DurableAuditTrail::open_with_key(
        &small_config(),
        dir.path().into(),
        AuditKey::from_seed(&[9; 32]),
    )
    .expect_err("must refuse");
    assert_eq!(err.code(), "AUDIT_003", "{err}");
}

#[tokio::test]
async fn the_key_is_generated_private_on_first_start_and_reused() {
    let data = tempfile::tempdir().expect("tempdir");
    let config = AuditConfig::default();
    let trail = DurableAuditTrail::open(&config, data.path()).expect("open");
    let key_path = data.path().join("keys").join("audit.ed25519");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path)
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let exported = AuditPublicKey::read_file(&public_key_path(&key_path)).expect("pub");
    assert_eq!(exported, trail.public_key());
    assert_eq!(trail.dir(), data.path().join("audit"));
    trail
        .record_event(AuditEvent::new(
            AuditEventType::ConfigurationLoaded,
            None,
            "x",
        ))
        .await
        .expect("record");
    trail.close().await.expect("close");
    drop(trail);
    let again = DurableAuditTrail::open(&config, data.path()).expect("reopen");
    assert_eq!(again.public_key(), exported);
    again.close().await.expect("close");
    let report = verify_dir(&data.path().join("audit"), &exported).expect("verify");
    assert!(report.is_ok(), "{report}");
}

#[tokio::test]
async fn retention_by_count_keeps_the_remainder_verifiable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = AuditConfig {
        max_segments: Some(2),
        ..small_config()
    };
    write_log(dir.path(), &config, 2000).await;
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 2, "{segs:?}");
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");
    let first = report.first_seq.expect("first");
    assert!(first > 0);
    assert!(
        report.retention_first_kept.is_some_and(|k| k >= first),
        "{report}"
    );

    // Deleting one more old segment by hand is not retention: caught.
    std::fs::remove_file(&segs[0]).expect("rm");
    assert_problem(&verify(dir.path()), ProblemKind::UnaccountedStart, 0);
}

#[tokio::test]
async fn retention_by_age_removes_only_old_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = AuditConfig {
        retention: Some(Duration::from_millis(300)),
        ..small_config()
    };
    let trail = open(dir.path(), &config);
    for i in 0..900 {
        trail.submit(AuditEvent::new(
            AuditEventType::TaskStarted,
            None,
            format!("old {i}"),
        ));
    }
    trail.flush().await.expect("flush");
    let old_segments = segments(dir.path());
    assert!(old_segments.len() >= 3);
    // Nothing is old enough yet.
    let outcome = trail.apply_retention().await.expect("retention");
    assert!(outcome.removed_segments.is_empty(), "{outcome:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The next rotation applies retention by itself.
    for i in 0..300 {
        trail.submit(AuditEvent::new(
            AuditEventType::TaskStarted,
            None,
            format!("new {i}"),
        ));
    }
    trail.flush().await.expect("flush");
    let outcome = trail.apply_retention().await.expect("retention");
    trail.close().await.expect("close");
    let now = segments(dir.path());
    assert!(
        !now.contains(&old_segments[0]) && !now.contains(&old_segments[1]),
        "old segments removed: {now:?}"
    );
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.first_seq, Some(outcome.first_kept_seq));
    assert_eq!(report.retention_first_kept, report.first_seq);
    let all = query_dir(dir.path(), &AuditQuery::default()).expect("query");
    assert_eq!(
        all.iter()
            .filter(|r| r.event.details.starts_with("new "))
            .count(),
        300
    );
    let removals = query_dir(
        dir.path(),
        &AuditQuery {
            event_type: Some(AuditEventType::AuditMaintenance),
            ..Default::default()
        },
    )
    .expect("query");
    assert!(removals
        .iter()
        .any(|r| r.event.metadata["action"] == "retention"));
}

#[tokio::test]
async fn queries_filter_by_agent_type_and_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trail = open(dir.path(), &small_config());
    let a = AgentId::new();
    let b = AgentId::new();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for i in 0..20u64 {
        let mut event = AuditEvent::new(
            if i % 2 == 0 {
                AuditEventType::StateChanged
            } else {
                AuditEventType::MessageRejected
            },
            Some(if i % 4 < 2 { a } else { b }),
            format!("e{i}"),
        );
        event.timestamp = t0 + Duration::from_secs(i);
        trail.record_event(event).await.expect("record");
    }
    trail.close().await.expect("close");
    let q = |query: AuditQuery| -> Vec<String> {
        query_dir(dir.path(), &query)
            .expect("query")
            .into_iter()
            .map(|r| r.event.details)
            .collect()
    };
    assert_eq!(
        q(AuditQuery {
            agent: Some(a),
            ..Default::default()
        }),
        ["e0", "e1", "e4", "e5", "e8", "e9", "e12", "e13", "e16", "e17"]
    );
    assert_eq!(
        q(AuditQuery {
            agent: Some(b),
            event_type: Some(AuditEventType::MessageRejected),
            ..Default::default()
        }),
        ["e3", "e7", "e11", "e15", "e19"]
    );
    assert_eq!(
        q(AuditQuery {
            since: Some(t0 + Duration::from_secs(5)),
            until: Some(t0 + Duration::from_secs(8)),
            ..Default::default()
        }),
        ["e5", "e6", "e7"]
    );
    assert_eq!(
        q(AuditQuery {
            event_type: Some(AuditEventType::StateChanged),
            limit: Some(2),
            ..Default::default()
        }),
        ["e0", "e2"]
    );
    let tail: Vec<_> = tail_dir(dir.path(), 3)
        .expect("tail")
        .into_iter()
        .map(|r| r.event.details)
        .collect();
    assert_eq!(tail, ["e17", "e18", "e19"]);
    let line = query_dir(dir.path(), &AuditQuery::default()).expect("q")[0].to_json_line();
    let json: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(json["type"], "StateChanged");
    assert_eq!(json["agent"], a.to_string());
    assert!(json["timestamp"]
        .as_str()
        .is_some_and(|t| t.starts_with("2023-11-14T22:13:20")));
}

#[tokio::test]
async fn concurrent_submitters_are_group_committed_exactly_once() {
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval,
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = AuditConfig {
            fsync: policy,
            fsync_interval: Duration::from_millis(5),
            queue_capacity: 64,
            ..small_config()
        };
        let trail = Arc::new(open(dir.path(), &config));
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let trail = Arc::clone(&trail);
            tasks.push(tokio::spawn(async move {
                for i in 0..100u64 {
                    let event = AuditEvent::new(AuditEventType::TaskStarted, None, "x")
                        .with("n", (t * 1000 + i).to_string());
                    if i % 2 == 0 {
                        trail.record_event(event).await.expect("record");
                    } else {
                        trail.submit(event);
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
        trail.flush().await.expect("flush");
        let report = trail.verify().expect("verify");
        assert!(report.is_ok(), "{policy:?}: {report}");
        assert_eq!(
            report.unsigned_tail, 0,
            "{policy:?}: flush covers everything"
        );
        let seen: Vec<u64> = trail
            .query(&AuditQuery::default())
            .expect("query")
            .iter()
            .map(|r| r.event.metadata["n"].parse().expect("n"))
            .collect();
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!(seen.len(), 1600, "{policy:?}");
        assert_eq!(unique.len(), 1600, "{policy:?}");
        trail.close().await.expect("close");
    }
}

/// The writer process of the crash test. Run on its own (no env var) it is an ordinary
/// test: a burst of acknowledged events, all present and verified afterwards. With
/// `SYMBIONT_AUDIT_CRASH_DIR` set it writes there forever, printing `ACK <round> <n>` once
/// event n is acknowledged, until it is killed.
#[test]
fn writer_burst_acknowledges_durably() {
    let child_dir = std::env::var_os(CRASH_DIR_ENV).map(PathBuf::from);
    let round: u64 = std::env::var(CRASH_ROUND_ENV)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let data_dir = child_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let limit = if child_dir.is_some() { u64::MAX } else { 3000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let config = AuditConfig {
            fsync: FsyncPolicy::Always,
            segment_size: 256 * 1024,
            checkpoint_every: 100,
            ..Default::default()
        };
        let trail = Arc::new(DurableAuditTrail::open(&config, &data_dir).expect("open"));
        let counter = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (trail, counter, acked) =
                (Arc::clone(&trail), Arc::clone(&counter), Arc::clone(&acked));
            let child = child_dir.is_some();
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    if n >= limit {
                        break;
                    }
                    let event = AuditEvent::new(
                        AuditEventType::TaskCompleted,
                        None,
                        format!("burst {round} {n}"),
                    )
                    .with("round", round.to_string())
                    .with("n", n.to_string());
                    trail.record_event(event).await.expect("record");
                    if child {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ACK {round} {n}").expect("stdout");
                        out.flush().expect("flush");
                    } else {
                        acked.lock().push(n);
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
        trail.close().await.expect("close");
        let report = verify_dir(&data_dir.join("audit"), &trail.public_key()).expect("verify");
        assert!(report.is_ok(), "{report}");
        let present: BTreeSet<String> = query_dir(&data_dir.join("audit"), &AuditQuery::default())
            .expect("query")
            .into_iter()
            .map(|r| r.event.metadata["n"].clone())
            .collect();
        let acked = acked.lock();
        assert_eq!(acked.len(), 3000);
        assert!(acked.iter().all(|n| present.contains(&n.to_string())));
    });
}

/// Starts the writer process, waits for `min_acks` acknowledgements, kills it with SIGKILL
/// mid-burst and returns every `(round, n)` it acknowledged.
fn run_and_kill_writer(data_dir: &Path, round: u64, min_acks: usize) -> BTreeSet<(u64, u64)> {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args([
            "writer_burst_acknowledges_durably",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, data_dir)
        .env(CRASH_ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the writer process");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            if parts.next() != Some("ACK") {
                continue;
            }
            let (Some(r), Some(n)) = (parts.next(), parts.next()) else {
                continue;
            };
            if let (Ok(r), Ok(n)) = (r.parse(), n.parse()) {
                let _ = tx.send((r, n));
            }
        }
    });
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < min_acks {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(ack) => {
                acked.insert(ack);
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the writer process acknowledged only {} events in 120 s",
                    acked.len()
                );
            }
        }
    }
    // Mid-burst: 32 writers are waiting on group commits right now.
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the writer was killed, not finished");
    reader.join().expect("reader");
    acked.extend(rx.try_iter());
    acked
}

#[test]
fn kill_9_during_a_write_burst_loses_nothing_acknowledged() {
    let data = tempfile::tempdir().expect("tempdir");
    let audit_dir = data.path().join("audit");
    let mut acked = BTreeSet::new();
    for round in 0..3 {
        acked.extend(run_and_kill_writer(
            data.path(),
            round,
            1500 + 500 * round as usize,
        ));
        // As the crash left it: verifies up to the last durable entry.
        let exported =
            AuditPublicKey::read_file(&data.path().join("keys").join("audit.ed25519.pub"))
                .expect("public key");
        let report = verify_dir(&audit_dir, &exported).expect("verify");
        assert!(report.is_ok(), "after kill -9 in round {round}:\n{report}");
        eprintln!("after kill -9 in round {round}:\n{report}");
    }

    // Restart in-process: repairs whatever tail the last kill tore, then appends on.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let trail = DurableAuditTrail::open(&AuditConfig::default(), data.path()).expect("reopen");
        trail
            .record_event(AuditEvent::new(
                AuditEventType::RuntimeLifecycle,
                None,
                "restarted",
            ))
            .await
            .expect("record after restart");
        trail.close().await.expect("close");
        let report = verify_dir(&audit_dir, &trail.public_key()).expect("verify");
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.torn_tail, None, "{report}");
        assert_eq!(report.unsigned_tail, 0, "{report}");
    });

    let present: BTreeSet<(u64, u64)> = query_dir(&audit_dir, &AuditQuery::default())
        .expect("query")
        .into_iter()
        .filter(|r| r.event.event_type == AuditEventType::TaskCompleted)
        .map(|r| {
            (
                r.event.metadata["round"].parse().expect("round"),
                r.event.metadata["n"].parse().expect("n"),
            )
        })
        .collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events are missing after kill -9, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(acked.len() >= 1500 + 2000 + 2500);
}

#[tokio::test]
async fn an_interrupted_rotation_verifies_and_is_repaired_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 700).await;
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    // The state a crash between creating the next segment file and writing it leaves:
    // the previous segment sealed, its successor empty.
    let last = segs[segs.len() - 1].clone();
    std::fs::remove_file(&last).expect("rm");
    std::fs::File::create(&last).expect("create empty");
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");
    assert!(report.torn_tail.is_some(), "{report}");

    let trail = open(dir.path(), &small_config());
    trail
        .record_event(AuditEvent::new(AuditEventType::TaskStarted, None, "after"))
        .await
        .expect("record");
    trail.close().await.expect("close");
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.torn_tail, None);
    let repairs = query_dir(
        dir.path(),
        &AuditQuery {
            event_type: Some(AuditEventType::AuditMaintenance),
            ..Default::default()
        },
    )
    .expect("query");
    assert!(
        repairs
            .iter()
            .any(|r| r.event.details.contains("empty segment")),
        "{repairs:?}"
    );
}

#[tokio::test]
async fn a_garbled_older_head_slot_fails_verify_and_is_rewritten_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &small_config(), 20).await;
    let path = segments(dir.path())[0].clone();
    let mut seg = Segment::load(&path);
    // Garble the slot with the lower generation.
    let gen = |b: &[u8]| -> u64 {
        serde_json::from_slice::<serde_json::Value>(b[..511].trim_ascii_end())
            .map(|v| v["gen"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    let older = if gen(&seg.header[..512]) < gen(&seg.header[512..]) {
        0
    } else {
        1
    };
    seg.header[older * 512 + 3] = b'#';
    seg.save();
    let report = verify(dir.path());
    assert_eq!(
        report.problem.as_ref().map(|p| p.kind),
        Some(ProblemKind::Malformed),
        "{report}"
    );

    let trail = open(dir.path(), &small_config());
    trail.close().await.expect("close");
    let report = verify(dir.path());
    assert!(report.is_ok(), "{report}");
    let repairs = query_dir(
        dir.path(),
        &AuditQuery {
            event_type: Some(AuditEventType::AuditMaintenance),
            ..Default::default()
        },
    )
    .expect("query");
    assert!(
        repairs
            .iter()
            .any(|r| r.event.details.contains("head slot")),
        "{repairs:?}"
    );
}
