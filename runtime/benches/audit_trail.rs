//! Audit trail throughput, each against a bound measured in the same run.
//!
//! - `append/*`: durable appends through the public `AuditTrail` API with group commit
//!   (events are built before the clock starts: building them is the caller's cost).
//!   `always_record_1024_tasks`: 1024 concurrent tasks, each `record_event` waiting until
//!   its event is fsynced (fsync = "always"). `always_submit_4_producers_flush`: 4 threads
//!   `submit` then one `flush` (fsync = "always"). `never_submit_4_producers_flush`: the
//!   same without any fsync (the CPU cost alone).
//! - `verify/entries`: `verify_dir` over a 200,000-event log (checkpoint every 1024).
//! - `bound/*`: Ed25519 sign and verify (the same key types the trail uses), SHA-256 of a
//!   typical entry line, and `write + fdatasync` of a 64 KiB batch on the same disk.
//!
//! At the end a summary prints every rate and the ratios (see docs/audit.md).
//! Run: `cargo bench -p symbiont-runtime --bench audit_trail`

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use parking_lot::Mutex;
use symbiont_runtime::integrations::audit_trail::{
    verify_dir, AuditConfig, AuditEvent, AuditEventType, AuditKey, AuditTrail, DurableAuditTrail,
    FsyncPolicy,
};
use symbiont_runtime::AgentId;

/// (elements, seconds) accumulated per benchmark, across every sample criterion ran.
static RATES: Mutex<BTreeMap<&'static str, (f64, f64)>> = Mutex::new(BTreeMap::new());

fn record(name: &'static str, elements: u64, elapsed: Duration) {
    let mut rates = RATES.lock();
    let entry = rates.entry(name).or_insert((0.0, 0.0));
    entry.0 += elements as f64;
    entry.1 += elapsed.as_secs_f64();
}

fn rate(name: &str) -> Option<f64> {
    RATES
        .lock()
        .get(name)
        .filter(|(_, secs)| *secs > 0.0)
        .map(|(n, secs)| n / secs)
}

fn event(agent: AgentId, i: u64) -> AuditEvent {
    AuditEvent::new(
        AuditEventType::StateChanged,
        Some(agent),
        "Running -> Suspended (resource pressure)",
    )
    .with("from", "Running")
    .with("to", "Suspended")
    .with("i", i.to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn open(dir: &std::path::Path, fsync: FsyncPolicy) -> Arc<DurableAuditTrail> {
    let config = AuditConfig {
        fsync,
        ..Default::default()
    };
    Arc::new(
        DurableAuditTrail::open_with_key(&config, dir.to_path_buf(), AuditKey::from_seed(&[1; 32]))
            .expect("open"),
    )
}

const APPEND_BATCH: u64 = 20_480;

fn bench_append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(APPEND_BATCH));

    let dir = tempfile::tempdir().expect("tempdir");
    let trail = open(&dir.path().join("record"), FsyncPolicy::Always);
    let agent = AgentId::new();
    group.bench_function("always_record_1024_tasks", |b| {
        b.iter_custom(|iters| {
            let total = iters * APPEND_BATCH;
            let tasks = 1024u64;
            let per_task: Vec<Vec<AuditEvent>> = (0..tasks)
                .map(|t| {
                    (t..total)
                        .step_by(tasks as usize)
                        .map(|i| event(agent, i))
                        .collect()
                })
                .collect();
            let start = Instant::now();
            rt.block_on(async {
                let mut handles = Vec::with_capacity(tasks as usize);
                for events in per_task {
                    let trail = Arc::clone(&trail);
                    handles.push(tokio::spawn(async move {
                        for e in events {
                            trail.record_event(e).await.expect("record");
                        }
                    }));
                }
                for h in handles {
                    h.await.expect("join");
                }
            });
            let elapsed = start.elapsed();
            record("append/always_record_1024_tasks", total, elapsed);
            elapsed
        })
    });

    for (name, policy) in [
        ("always_submit_4_producers_flush", FsyncPolicy::Always),
        ("never_submit_4_producers_flush", FsyncPolicy::Never),
    ] {
        let trail = open(&dir.path().join(name), policy);
        let key: &'static str = Box::leak(format!("append/{name}").into_boxed_str());
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let total = iters * APPEND_BATCH;
                let batches: Vec<Vec<AuditEvent>> = (0..4u64)
                    .map(|p| (p..total).step_by(4).map(|i| event(agent, i)).collect())
                    .collect();
                let start = Instant::now();
                std::thread::scope(|s| {
                    for events in batches {
                        let trail = Arc::clone(&trail);
                        s.spawn(move || {
                            for e in events {
                                trail.submit(e);
                            }
                        });
                    }
                });
                rt.block_on(trail.flush()).expect("flush");
                let elapsed = start.elapsed();
                record(key, total, elapsed);
                elapsed
            })
        });
    }
    group.finish();
}

const VERIFY_EVENTS: u64 = 200_000;

fn bench_verify(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = AuditKey::from_seed(&[1; 32]);
    let public = key.public_key();
    let log = dir.path().join("log");
    let trail = open(&log, FsyncPolicy::Never);
    let agent = AgentId::new();
    for i in 0..VERIFY_EVENTS {
        trail.submit(event(agent, i));
    }
    rt.block_on(trail.close()).expect("close");
    let report = verify_dir(&log, &public).expect("verify");
    assert!(report.is_ok(), "{report}");
    let entries = report.entries;

    let mut group = c.benchmark_group("verify");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(entries));
    group.bench_function("entries", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let report = verify_dir(&log, &public).expect("verify");
                assert!(report.is_ok());
            }
            let elapsed = start.elapsed();
            record("verify/entries", iters * entries, elapsed);
            elapsed
        })
    });
    group.finish();
}

fn bench_bounds(c: &mut Criterion) {
    let key = AuditKey::from_seed(&[1; 32]);
    let public = key.public_key();
    let message = [7u8; 77];
    let sig = key.sign(&message);
    // A typical entry line as the trail writes it (the same event as the benches above).
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let trail = open(&dir.path().join("line"), FsyncPolicy::Never);
    rt.block_on(trail.record_event(event(AgentId::new(), 123_456)))
        .expect("record");
    rt.block_on(trail.close()).expect("close");
    let segment = std::fs::read_dir(dir.path().join("line"))
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().contains("seg-"))
        .expect("segment");
    let data = std::fs::read(segment).expect("read");
    let line = data[1024..]
        .split(|b| *b == b'\n')
        .find(|l| l.windows(11).any(|w| w == b"StateChange"))
        .expect("event line")
        .to_vec();
    println!("typical entry line: {} bytes", line.len());

    let mut group = c.benchmark_group("bound");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ed25519_sign", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(key.sign(std::hint::black_box(&message)));
            }
            let elapsed = start.elapsed();
            record("bound/ed25519_sign", iters, elapsed);
            elapsed
        })
    });
    group.bench_function("ed25519_verify", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                assert!(public.verify(std::hint::black_box(&message), &sig));
            }
            let elapsed = start.elapsed();
            record("bound/ed25519_verify", iters, elapsed);
            elapsed
        })
    });
    group.bench_function("sha256_entry_line", |b| {
        use sha2::Digest;
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(sha2::Sha256::digest(std::hint::black_box(&line)));
            }
            let elapsed = start.elapsed();
            record("bound/sha256_entry_line", iters, elapsed);
            elapsed
        })
    });
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let mut file = std::fs::File::create(dir.path().join("raw")).expect("create");
    let batch = vec![b'x'; 64 * 1024];
    group.bench_function("write_64k_fdatasync", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                file.write_all(&batch).expect("write");
                file.sync_data().expect("fdatasync");
            }
            let elapsed = start.elapsed();
            record("bound/write_64k_fdatasync", iters, elapsed);
            elapsed
        })
    });
    group.finish();
}

fn summary() {
    println!("\n== audit trail summary (same run) ==");
    for (name, (n, secs)) in RATES.lock().iter() {
        println!("{name:42} {:>14.0} /s", n / secs);
    }
    let ratio = |a: &str, b: &str, what: &str| {
        if let (Some(x), Some(y)) = (rate(a), rate(b)) {
            println!("{what:60} {:>8.2}x", x / y);
        }
    };
    println!();
    ratio(
        "append/always_record_1024_tasks",
        "bound/ed25519_sign",
        "durable appends (record, always) / Ed25519 signs",
    );
    ratio(
        "append/always_submit_4_producers_flush",
        "bound/ed25519_sign",
        "durable appends (submit, always) / Ed25519 signs",
    );
    ratio(
        "append/always_record_1024_tasks",
        "bound/write_64k_fdatasync",
        "durable appends (record, always) per raw fdatasync",
    );
    ratio(
        "verify/entries",
        "bound/ed25519_verify",
        "verified entries / Ed25519 verifications",
    );
    ratio(
        "verify/entries",
        "bound/sha256_entry_line",
        "verified entries / SHA-256 of entry lines (fraction of bound)",
    );
    println!("targets: durable appends >= 50000/s, verification >= 100000 entries/s");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    // `AUDIT_BENCH=append` (or `bound`, `verify`) runs one section only, setup included.
    let only = std::env::var("AUDIT_BENCH").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s == section);
    if run("bound") {
        bench_bounds(&mut c);
    }
    if run("append") {
        bench_append(&mut c);
    }
    if run("verify") {
        bench_verify(&mut c);
    }
    c.final_summary();
    summary();
}
