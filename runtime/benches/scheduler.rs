//! Scheduler benchmarks (see `docs/scheduler.md`, "Figures").
//!
//! 1. Throughput: schedule + dispatch + complete N no-op tasks, against a same-run baseline
//!    of raw Tokio (an mpsc channel into a `BinaryHeap`, one spawned no-op future per item).
//!    In-memory records (no store), and durable records (SQLite, `synchronous=FULL`,
//!    group-committed, many concurrent producers).
//! 2. Queueing delay of a Critical task under a full queue: refilled to
//!    `max_queued_tasks − 1` = 10,000 Low tasks before each sample, every unreserved slot
//!    busy with a 50 ms Low task (the default 5 of 256 slots are reserved for Critical): from
//!    the `schedule_task` call to the start of its execution; p50/p99 over 1,000 samples,
//!    against the same measurement on an idle scheduler. Also reported: the same with no-op
//!    Low tasks draining at full speed (a CPU-saturated dispatcher).
//!
//! Run: `cargo bench -p symbiont-runtime --bench scheduler`. Criterion prints its own
//! estimates; the summary table at the end gives the figures with baselines and ratios.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use criterion::{Criterion, Throughput};
use parking_lot::Mutex;
use symbiont_runtime::scheduler::*;
use symbiont_runtime::storage::{SqliteStore, Store, SyncMode};
use symbiont_runtime::{AgentId, Priority, RuntimeError, TaskId};

const N: usize = 100_000;
const DURABLE_N: usize = 20_000;
const PRODUCERS: usize = 256;

struct Noop;

#[async_trait]
impl TaskExecutor for Noop {
    async fn execute(&self, _task: &TaskContext) -> Result<TaskOutput, RuntimeError> {
        Ok(TaskOutput::default())
    }
    async fn cancel(&self, _task: &TaskContext, _reason: CancelReason) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// Records when the execution of the marked Critical task started; other tasks take
/// `other_task_time` (zero: no-op).
struct Marker {
    marked: Mutex<Option<(TaskId, tokio::sync::oneshot::Sender<Instant>)>>,
    other_task_time: Duration,
}

#[async_trait]
impl TaskExecutor for Marker {
    async fn execute(&self, task: &TaskContext) -> Result<TaskOutput, RuntimeError> {
        if task.priority == Priority::Critical {
            let now = Instant::now();
            let mut m = self.marked.lock();
            if m.as_ref().is_some_and(|(id, _)| *id == task.task_id) {
                if let Some((_, tx)) = m.take() {
                    let _ = tx.send(now);
                }
            }
        } else if !self.other_task_time.is_zero() {
            tokio::time::sleep(self.other_task_time).await;
        }
        Ok(TaskOutput::default())
    }
    async fn cancel(&self, _task: &TaskContext, _reason: CancelReason) -> Result<(), RuntimeError> {
        Ok(())
    }
}

fn task(agent: AgentId, priority: Priority) -> ScheduledTask {
    ScheduledTask {
        id: TaskId::new(),
        agent_id: agent,
        priority,
        scheduled_time: SystemTime::UNIX_EPOCH,
        timeout: Duration::from_secs(60),
        retry_count: 0,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn scheduler(
    store: Option<Arc<dyn Store>>,
    executor: Arc<dyn TaskExecutor>,
    max_queued: usize,
) -> (DefaultScheduler, AgentId) {
    let table = Arc::new(AgentTable::new());
    let agent = AgentId::new();
    table.register(agent, None);
    let s = DefaultScheduler::with_parts(
        SchedulerConfig {
            max_concurrent_tasks: 256,
            max_queued_tasks: max_queued,
            finished_task_retention: 1_000,
            ..Default::default()
        },
        SchedulerParts {
            directory: table,
            executor: Some(executor),
            load: None,
            failure_policy: None,
            store,
            audit: None,
        },
    )
    .await
    .expect("scheduler");
    (s, agent)
}

/// Schedules `n` no-op tasks of mixed priorities and waits until all completed.
async fn scheduler_run(n: usize) -> Duration {
    let (s, agent) = scheduler(None, Arc::new(Noop), n).await;
    let start = Instant::now();
    for i in 0..n {
        s.schedule_task(task(agent, Priority::ALL[i % 4]))
            .await
            .expect("scheduled");
    }
    s.wait_idle().await;
    let elapsed = start.elapsed();
    assert_eq!(s.stats().completed as usize, n);
    elapsed
}

/// The same work with durable records: `PRODUCERS` concurrent callers, group commits.
async fn durable_run(n: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("state.db"), SyncMode::Full).expect("sqlite"));
    let (s, agent) = scheduler(Some(store), Arc::new(Noop), n).await;
    let start = Instant::now();
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let s = s.clone();
        producers.push(tokio::spawn(async move {
            for i in (p..n).step_by(PRODUCERS) {
                s.schedule_task(task(agent, Priority::ALL[i % 4]))
                    .await
                    .expect("scheduled");
            }
        }));
    }
    for p in producers {
        p.await.expect("producer");
    }
    s.wait_idle().await;
    s.flush().await.expect("flush");
    let elapsed = start.elapsed();
    assert_eq!(s.stats().completed as usize, n);
    elapsed
}

/// Baseline: raw Tokio. Items go through an unbounded mpsc channel into a `BinaryHeap`; the
/// consumer pops them in priority order and spawns one no-op future each.
async fn baseline_run(n: usize) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u8, Reverse<u64>, TaskId)>();
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let start = Instant::now();
    let consumer = {
        let done = done.clone();
        let all_done = all_done.clone();
        tokio::spawn(async move {
            let mut heap = BinaryHeap::new();
            while let Some(item) = rx.recv().await {
                heap.push(item);
                while let Ok(item) = rx.try_recv() {
                    heap.push(item);
                }
                while let Some((_, _, _id)) = heap.pop() {
                    let done = done.clone();
                    let all_done = all_done.clone();
                    tokio::spawn(async move {
                        if done.fetch_add(1, Ordering::AcqRel) + 1 == n {
                            all_done.notify_one();
                        }
                    });
                }
            }
        })
    };
    for i in 0..n {
        tx.send(((i % 4) as u8, Reverse(i as u64), TaskId::new()))
            .expect("send");
    }
    all_done.notified().await;
    let elapsed = start.elapsed();
    drop(tx);
    consumer.await.expect("consumer");
    elapsed
}

/// Queueing delays (schedule call → execution start) of Critical tasks with `backlog` Low
/// tasks queued ahead of them, each Low task taking `low_time` (for `backlog` 0: an idle
/// scheduler).
async fn critical_delays(backlog: usize, low_time: Duration, samples: usize) -> Vec<Duration> {
    let max_queued = backlog + 1;
    let marker = Arc::new(Marker {
        marked: Mutex::new(None),
        other_task_time: low_time,
    });
    let (s, agent) = scheduler(None, marker.clone(), max_queued).await;
    let mut delays = Vec::with_capacity(samples);
    for _ in 0..samples {
        // Refill the queue to capacity − 1 (the executor keeps draining it).
        while s.stats().queued + s.stats().waiting + s.stats().delayed < backlog {
            let _ = s.schedule_task(task(agent, Priority::Low)).await;
        }
        let critical = task(agent, Priority::Critical);
        let (tx, rx) = tokio::sync::oneshot::channel();
        *marker.marked.lock() = Some((critical.id, tx));
        let t0 = Instant::now();
        s.schedule_task(critical).await.expect("critical scheduled");
        let started = rx.await.expect("critical ran");
        delays.push(started - t0);
    }
    delays.sort();
    delays
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn criterion_benches(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("scheduler_throughput");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("scheduler_in_memory_100k_noop", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += scheduler_run(N).await;
            }
            total
        })
    });
    g.bench_function("baseline_mpsc_binaryheap_100k_noop", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += baseline_run(N).await;
            }
            total
        })
    });
    g.finish();
}

fn summary() {
    let rt = runtime();
    let rounds = 5;
    let mut sched = Vec::new();
    let mut base = Vec::new();
    for _ in 0..rounds {
        // Interleaved so both see the same machine load.
        sched.push(rt.block_on(scheduler_run(N)));
        base.push(rt.block_on(baseline_run(N)));
    }
    let durable = median(
        (0..3)
            .map(|_| rt.block_on(durable_run(DURABLE_N)))
            .collect(),
    );
    let (sched, base) = (median(sched), median(base));
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let full = rt.block_on(critical_delays(10_000, Duration::from_millis(50), 1000));
    let saturated = rt.block_on(critical_delays(10_000, Duration::ZERO, 300));
    let empty = rt.block_on(critical_delays(0, Duration::ZERO, 1000));
    println!();
    println!("== scheduler summary (median of {rounds} interleaved rounds, 2 worker threads) ==");
    println!(
        "throughput, in-memory records : {:>10.0} tasks/s ({N} no-op tasks in {:?})",
        rate(N, sched),
        sched
    );
    println!(
        "baseline, raw mpsc+BinaryHeap : {:>10.0} tasks/s ({N} in {:?})",
        rate(N, base),
        base
    );
    println!(
        "ratio scheduler / baseline    : {:>10.2}",
        rate(N, sched) / rate(N, base)
    );
    println!(
        "throughput, durable (SQLite FULL, group commit, {PRODUCERS} producers): {:>8.0} tasks/s ({DURABLE_N} in {:?})",
        rate(DURABLE_N, durable),
        durable
    );
    println!(
        "critical queueing delay, full queue (10000 queued, 251 unreserved slots busy with 50 ms tasks, 5 reserved): p50 {:?}  p99 {:?}  max {:?}",
        percentile(&full, 0.5),
        percentile(&full, 0.99),
        full[full.len() - 1]
    );
    println!(
        "critical queueing delay, saturated dispatcher (10000 queued no-op tasks draining at full speed): p50 {:?}  p99 {:?}",
        percentile(&saturated, 0.5),
        percentile(&saturated, 0.99),
    );
    println!(
        "critical queueing delay, empty queue (baseline)   : p50 {:?}  p99 {:?}",
        percentile(&empty, 0.5),
        percentile(&empty, 0.99)
    );
    println!(
        "ratio p99 full / p99 empty    : {:>10.2}",
        percentile(&full, 0.99).as_secs_f64() / percentile(&empty, 0.99).as_secs_f64()
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
    summary();
}
