//! Communication bus benchmarks: end-to-end throughput (sign, encrypt, route, verify,
//! decrypt, deliver) of 256-byte messages in per-message Ed25519 mode and in session mode,
//! the raw Ed25519 sign+verify bound measured in the same run on the same two threads, and
//! p99 latency at half of the measured peak load.
//!
//! `cargo bench -p symbiont-runtime --bench communication`
//!
//! Criterion reports each throughput; the summary printed at the end repeats each
//! measurement (median of several runs) and prints the ratios against the same-run bounds.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use symbiont_runtime::communication::{
    AuthMode, CommunicationConfig, DefaultCommunicationBus, Message,
};
use symbiont_runtime::types::{AgentId, Capability, MessageId, Priority};

const PAYLOAD: usize = 256;
const THREADS: usize = 2;
const PAIRS: usize = 4;
const BATCH: usize = 64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// What the bus signs per message: domain + header (~170 bytes) + ciphertext and tag.
fn signed_bytes() -> Vec<u8> {
    vec![0x5a; 31 + 170 + PAYLOAD + 16]
}

fn signing_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Raw bound: sign then verify (strict, one by one), on `THREADS` threads.
fn raw_sign_verify(total: usize) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                let key = signing_key(t as u8 + 1);
                let vk = key.verifying_key();
                let mut msg = signed_bytes();
                for i in 0..total / THREADS {
                    msg[0] = i as u8;
                    let sig = key.sign(&msg);
                    assert!(vk.verify_strict(&msg, &sig).is_ok());
                }
            });
        }
    });
    start.elapsed()
}

/// Raw bound with batch verification (the strategy the bus uses when several envelopes are
/// ready), on `THREADS` threads.
fn raw_sign_batch_verify(total: usize) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                let key = signing_key(t as u8 + 1);
                let vk = key.verifying_key();
                let mut done = 0;
                while done < total / THREADS {
                    let n = BATCH.min(total / THREADS - done);
                    let msgs: Vec<Vec<u8>> = (0..n)
                        .map(|i| {
                            let mut m = signed_bytes();
                            m[0] = i as u8;
                            m
                        })
                        .collect();
                    let sigs: Vec<Signature> = msgs.iter().map(|m| key.sign(m)).collect();
                    let refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
                    let keys: Vec<VerifyingKey> = vec![vk; n];
                    assert!(ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok());
                    done += n;
                }
            });
        }
    });
    start.elapsed()
}

async fn setup(mode: AuthMode) -> (DefaultCommunicationBus, Vec<(AgentId, AgentId)>) {
    let bus = DefaultCommunicationBus::new(CommunicationConfig {
        auth_mode: mode,
        ..Default::default()
    })
    .await
    .expect("bus");
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let (a, b) = (AgentId::new(), AgentId::new());
        bus.register_agent(a, vec![Capability::Messaging])
            .await
            .expect("register");
        bus.register_agent(b, vec![Capability::Messaging])
            .await
            .expect("register");
        pairs.push((a, b));
    }
    (bus, pairs)
}

fn message(from: AgentId, to: AgentId, payload: Vec<u8>) -> Message {
    Message {
        id: MessageId::new(),
        from,
        to,
        topic: "bench".into(),
        payload,
        priority: Priority::Normal,
        ttl: Duration::from_secs(300),
    }
}

/// End to end: `PAIRS` senders each send `total / PAIRS` messages to their receiver, which
/// takes them in batches; returns the time until the last one is delivered.
async fn end_to_end(
    bus: &DefaultCommunicationBus,
    pairs: &[(AgentId, AgentId)],
    total: usize,
) -> Duration {
    let per = total / pairs.len();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for &(a, b) in pairs {
        let bus_s = bus.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                bus_s
                    .send_message(message(a, b, vec![0x42; PAYLOAD]))
                    .await
                    .expect("send");
            }
        }));
        let bus_r = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            while got < per {
                let batch = bus_r.receive_batch(b, BATCH).await.expect("receive");
                for m in &batch {
                    assert_eq!(m.message.payload.len(), PAYLOAD);
                }
                got += batch.len();
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    start.elapsed()
}

/// Sends at `rate` msg/s (spread over the pairs, in 1 ms ticks) for `duration`; returns the
/// sorted latencies from just before `send_message` to delivery.
async fn latency_at(
    bus: &DefaultCommunicationBus,
    pairs: &[(AgentId, AgentId)],
    rate: f64,
    duration: Duration,
) -> Vec<Duration> {
    let base = Instant::now();
    let ticks = duration.as_millis() as usize;
    let per_tick_total = rate / 1000.0;
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for &(a, b) in pairs {
        let per_tick = per_tick_total / pairs.len() as f64;
        let expected = (per_tick * ticks as f64).floor() as usize;
        let bus_s = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(1));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut owed = 0.0f64;
            let mut sent = 0usize;
            while sent < expected {
                interval.tick().await;
                owed += per_tick;
                while owed >= 1.0 && sent < expected {
                    owed -= 1.0;
                    let t = base.elapsed().as_nanos() as u64;
                    let mut payload = vec![0x42; PAYLOAD];
                    payload[..8].copy_from_slice(&t.to_be_bytes());
                    bus_s
                        .send_message(message(a, b, payload))
                        .await
                        .expect("send");
                    sent += 1;
                }
            }
        }));
        let bus_r = bus.clone();
        receivers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(expected);
            while lat.len() < expected {
                for m in bus_r.receive_batch(b, BATCH).await.expect("receive") {
                    let now = base.elapsed().as_nanos() as u64;
                    let mut t = [0u8; 8];
                    t.copy_from_slice(&m.message.payload[..8]);
                    lat.push(Duration::from_nanos(now - u64::from_be_bytes(t)));
                }
            }
            lat
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let mut all = Vec::new();
    for r in receivers {
        all.extend(r.await.expect("receiver"));
    }
    all.sort();
    all
}

/// CPU time (user + system) used so far by this process, from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After ')': state is index 0, so utime (field 14) is index 11, stime index 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Runs `f`, returning (messages per wall second, messages per CPU second of the process).
fn measured(n: usize, f: impl FnOnce() -> Duration) -> (f64, f64) {
    let cpu0 = cpu_time();
    let wall = f();
    let cpu = cpu_time()
        .saturating_sub(cpu0)
        .max(Duration::from_millis(10));
    (rate(n, wall), n as f64 / cpu.as_secs_f64())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

const SIGNED_N: usize = 16_000;
const SESSION_N: usize = 160_000;
const RAW_N: usize = 8_000;

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("communication");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(15));

    g.throughput(Throughput::Elements(RAW_N as u64));
    g.bench_function("raw_sign_verify_2threads", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| raw_sign_verify(RAW_N)).sum())
    });
    g.bench_function("raw_sign_batch_verify_2threads", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| raw_sign_batch_verify(RAW_N)).sum())
    });

    let (bus, pairs) = rt.block_on(setup(AuthMode::Signed));
    g.throughput(Throughput::Elements(SIGNED_N as u64));
    g.bench_function("end_to_end_signed_256B", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| rt.block_on(end_to_end(&bus, &pairs, SIGNED_N)))
                .sum()
        })
    });

    let (bus, pairs) = rt.block_on(setup(AuthMode::Session));
    g.throughput(Throughput::Elements(SESSION_N as u64));
    g.bench_function("end_to_end_session_256B", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| rt.block_on(end_to_end(&bus, &pairs, SESSION_N)))
                .sum()
        })
    });
    g.finish();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median2(v: Vec<(f64, f64)>) -> (f64, f64) {
    (
        median(v.iter().map(|x| x.0).collect()),
        median(v.iter().map(|x| x.1).collect()),
    )
}

/// Same-run summary: medians of repeated runs, the ratios, and latency at half load. Each
/// rate is given per wall second and per CPU second of this process; the machine is shared,
/// so `per CPU second x 2` is what the two cores give when nothing else runs.
fn summary() {
    const RUNS: usize = 7;
    let rt = runtime();
    let (sbus, spairs) = rt.block_on(setup(AuthMode::Signed));
    let (xbus, xpairs) = rt.block_on(setup(AuthMode::Session));
    // Interleaved rounds: the machine is shared, so each round measures the bounds and the
    // bus back to back and the ratios are taken per round (then the median).
    let mut rounds = Vec::new();
    for _ in 0..RUNS {
        let raw = measured(RAW_N, || raw_sign_verify(RAW_N));
        let raw_batch = measured(RAW_N, || raw_sign_batch_verify(RAW_N));
        let signed = measured(SIGNED_N, || {
            rt.block_on(end_to_end(&sbus, &spairs, SIGNED_N))
        });
        let session = measured(SESSION_N, || {
            rt.block_on(end_to_end(&xbus, &xpairs, SESSION_N))
        });
        rounds.push([raw, raw_batch, signed, session]);
    }
    let col = |i: usize| median2(rounds.iter().map(|r| r[i]).collect());
    let (raw, raw_batch, signed, session) = (col(0), col(1), col(2), col(3));
    let ratio = |i: usize, j: usize| {
        (
            median(rounds.iter().map(|r| r[i].0 / r[j].0).collect()),
            median(rounds.iter().map(|r| r[i].1 / r[j].1).collect()),
        )
    };
    let (vs_a, vs_b) = (ratio(2, 0), ratio(2, 1));
    let window = Duration::from_secs(3);
    let lat_signed = rt.block_on(latency_at(&sbus, &spairs, signed.0 / 2.0, window));
    let lat_session = rt.block_on(latency_at(&xbus, &xpairs, session.0 / 2.0, window));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = THREADS as f64;

    println!(
        "\n== communication bus summary: 256-byte payloads, {THREADS} threads, median of {RUNS} =="
    );
    println!("load average during the run: {}", load.trim());
    println!(
        "{:<42} {:>14} {:>16} {:>18}",
        "", "per wall s", "per CPU s", "x2 cores (idle)"
    );
    for (name, (w, c)) in [
        ("raw Ed25519 sign+verify_strict (bound A)", raw),
        ("raw Ed25519 sign+verify_batch (bound B)", raw_batch),
        ("end to end, signed mode", signed),
        ("end to end, session mode", session),
    ] {
        println!("{name:<42} {w:>14.0} {c:>16.0} {:>18.0}", c * cores);
    }
    let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
    println!(
        "signed vs bound A (median of per-round ratios): {:.1}% wall, {:.1}% CPU (target >= 80%: {})",
        100.0 * vs_a.0,
        100.0 * vs_a.1,
        verdict(vs_a.0 >= 0.8)
    );
    println!(
        "signed vs bound B (median of per-round ratios): {:.1}% wall, {:.1}% CPU (target >= 80%: {})",
        100.0 * vs_b.0,
        100.0 * vs_b.1,
        verdict(vs_b.0 >= 0.8)
    );
    println!(
        "signed >= 20000 msg/s: wall {} ({:.0}), two idle cores {} ({:.0})",
        verdict(signed.0 >= 20_000.0),
        signed.0,
        verdict(signed.1 * cores >= 20_000.0),
        signed.1 * cores
    );
    println!(
        "session >= 300000 msg/s: wall {} ({:.0}), two idle cores {} ({:.0})",
        verdict(session.0 >= 300_000.0),
        session.0,
        verdict(session.1 * cores >= 300_000.0),
        session.1 * cores
    );
    for (name, rate, lat) in [
        ("signed", signed.0 / 2.0, &lat_signed),
        ("session", session.0 / 2.0, &lat_session),
    ] {
        println!(
            "latency at half peak, {name:<7} ({rate:>8.0} msg/s, {} msgs): p50 {:?}  p99 {:?}  p99.9 {:?}  max {:?}",
            lat.len(),
            pct(lat, 0.50),
            pct(lat, 0.99),
            pct(lat, 0.999),
            lat.last().copied().unwrap_or_default()
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    // `cargo bench -- <filter>` or `--list`: skip the summary unless the run is full.
    let args: Vec<String> = std::env::args().collect();
    let filtered = args.iter().skip(1).any(|a| !a.starts_with('-'));
    if !filtered && !args.iter().any(|a| a == "--list" || a == "--test") {
        summary();
    }
}
