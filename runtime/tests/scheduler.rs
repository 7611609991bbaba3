//! Scheduler behaviour against test executors and real child processes: priority and aging,
//! delayed and cron tasks (paused Tokio clock), the concurrency cap, timeouts and
//! cancellation that kill a real process, status queries, SCHED_001 reasons, load balancing,
//! retries, idempotency, audit, and durability across a real `kill -9`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use symbiont_runtime::integrations::audit_trail::{AuditEventType, MockAuditTrail};
use symbiont_runtime::scheduler::*;
use symbiont_runtime::storage::{MemoryStore, SqliteStore, Store, SyncMode};
use symbiont_runtime::{AgentId, AgentState, Priority, RuntimeError, TaskId};
use tokio::time::Instant;

type Behaviour =
    Arc<dyn Fn(TaskContext) -> BoxFuture<'static, Result<TaskOutput, RuntimeError>> + Send + Sync>;

/// An executor that records every execution (task, agent, start instant) and runs a
/// behaviour per execution.
struct Recorder {
    behaviour: Behaviour,
    started: Mutex<Vec<(TaskId, AgentId, Instant, u32)>>,
    cancels: Mutex<Vec<(TaskId, CancelReason)>>,
}

impl Recorder {
    fn new(
        f: impl Fn(TaskContext) -> BoxFuture<'static, Result<TaskOutput, RuntimeError>>
            + Send
            + Sync
            + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            behaviour: Arc::new(f),
            started: Mutex::new(Vec::new()),
            cancels: Mutex::new(Vec::new()),
        })
    }

    fn noop() -> Arc<Self> {
        Self::new(|_| Box::pin(async { Ok(TaskOutput::default()) }))
    }

    fn sleeping(d: Duration) -> Arc<Self> {
        Self::new(move |_| {
            Box::pin(async move {
                tokio::time::sleep(d).await;
                Ok(TaskOutput::default())
            })
        })
    }

    fn order(&self) -> Vec<TaskId> {
        self.started.lock().iter().map(|s| s.0).collect()
    }
}

#[async_trait]
impl TaskExecutor for Recorder {
    async fn execute(&self, task: &TaskContext) -> Result<TaskOutput, RuntimeError> {
        self.started
            .lock()
            .push((task.task_id, task.agent_id, Instant::now(), task.attempt));
        (self.behaviour)(task.clone()).await
    }

    async fn cancel(&self, task: &TaskContext, reason: CancelReason) -> Result<(), RuntimeError> {
        self.cancels.lock().push((task.task_id, reason));
        Ok(())
    }
}

fn task(agent: AgentId, priority: Priority) -> ScheduledTask {
    ScheduledTask {
        id: TaskId::new(),
        agent_id: agent,
        priority,
        scheduled_time: SystemTime::now(),
        timeout: Duration::from_secs(60),
        retry_count: 0,
    }
}

async fn scheduler_with(
    config: SchedulerConfig,
    table: Arc<AgentTable>,
    executor: Option<Arc<dyn TaskExecutor>>,
) -> DefaultScheduler {
    DefaultScheduler::with_parts(
        config,
        SchedulerParts {
            directory: table,
            executor,
            load: None,
            failure_policy: None,
            store: None,
            audit: None,
        },
    )
    .await
    .expect("scheduler")
}

fn one_agent() -> (Arc<AgentTable>, AgentId) {
    let table = Arc::new(AgentTable::new());
    let agent = AgentId::new();
    table.register(agent, None);
    (table, agent)
}

#[tokio::test(start_paused = true)]
async fn ready_tasks_run_in_strict_priority_order_fifo_within_a_priority() {
    let (table, agent) = one_agent();
    let config = SchedulerConfig {
        max_concurrent_tasks: 1,
        ..Default::default()
    };
    let s = scheduler_with(config, table, None).await;
    let prios = [
        Priority::Low,
        Priority::Normal,
        Priority::Critical,
        Priority::High,
        Priority::Low,
        Priority::Critical,
        Priority::Normal,
        Priority::High,
    ];
    let mut tasks = Vec::new();
    for p in prios {
        let t = task(agent, p);
        tasks.push((t.id, p));
        s.schedule_task(t).await.expect("scheduled");
    }
    assert_eq!(s.stats().queued, 8);
    let rec = Recorder::noop();
    s.set_executor(rec.clone());
    s.wait_idle().await;
    let mut expected = tasks.clone();
    // Stable sort: FIFO within a priority.
    expected.sort_by_key(|(_, p)| std::cmp::Reverse(*p));
    let expected: Vec<TaskId> = expected.into_iter().map(|(id, _)| id).collect();
    assert_eq!(rec.order(), expected);
    assert_eq!(s.stats().completed, 8, "{:?}", s.stats());
}

/// Floods the scheduler with High tasks faster than it serves them and returns when (if at
/// all) the Low task scheduled first started, relative to the start.
async fn low_task_start_under_high_flood(aging: Duration) -> Option<Duration> {
    let (table, agent) = one_agent();
    let config = SchedulerConfig {
        max_concurrent_tasks: 1,
        aging_interval: aging,
        max_queued_tasks: 100_000,
        ..Default::default()
    };
    let rec = Recorder::sleeping(Duration::from_millis(100));
    let s = scheduler_with(config, table, Some(rec.clone())).await;
    let t0 = Instant::now();
    // Keep the agent busy with a High task so the Low one has to queue.
    s.schedule_task(task(agent, Priority::High))
        .await
        .expect("first");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let low = task(agent, Priority::Low);
    let low_id = low.id;
    s.schedule_task(low).await.expect("low");
    // 30 s of High tasks, two per service time.
    for _ in 0..600 {
        s.schedule_task(task(agent, Priority::High))
            .await
            .expect("high");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = rec
        .started
        .lock()
        .iter()
        .find(|(id, ..)| *id == low_id)
        .map(|(_, _, at, _)| *at - t0);
    started
}

#[tokio::test(start_paused = true)]
async fn aging_runs_a_low_task_under_a_flood_of_high_tasks() {
    // Aging 1 s: the Low task outranks every High task that became ready more than 2 s after
    // it; about 40 were ahead of it (100 ms each), so it starts after about 4 s.
    let started = low_task_start_under_high_flood(Duration::from_secs(1))
        .await
        .expect("the Low task was starved despite aging");
    assert!(
        started >= Duration::from_secs(2) && started <= Duration::from_millis(4500),
        "Low task started after {started:?}"
    );
    // Control: with aging effectively off, the same flood starves it for the whole 30 s.
    let started = low_task_start_under_high_flood(Duration::from_secs(3600)).await;
    assert!(
        started.is_none(),
        "without aging the Low task should starve, started after {started:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_with_a_future_scheduled_time_waits_for_it() {
    let (table, agent) = one_agent();
    let rec = Recorder::noop();
    let s = scheduler_with(SchedulerConfig::default(), table, Some(rec.clone())).await;
    let t0 = Instant::now();
    let mut t = task(agent, Priority::Critical);
    t.scheduled_time = SystemTime::now() + Duration::from_secs(10);
    let id = s.schedule_task(t).await.expect("scheduled");
    assert_eq!(s.task_status(id).expect("status"), TaskStatus::Delayed);
    tokio::time::sleep(Duration::from_millis(9_900)).await;
    assert!(rec.order().is_empty(), "ran before its time");
    assert_eq!(s.stats().delayed, 1);
    let record = s.wait_task(id).await.expect("finished");
    assert_eq!(record.status, TaskStatus::Completed);
    let at = rec.started.lock()[0].2 - t0;
    assert!(
        at >= Duration::from_secs(10) && at < Duration::from_millis(10_050),
        "fired at {at:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn cron_agents_fire_on_their_six_and_five_field_schedules() {
    let table = Arc::new(AgentTable::new());
    let every10s = AgentId::new();
    let every_minute = AgentId::new();
    table.register(every10s, None);
    table.register(every_minute, None);
    table.set_schedule(every10s, "*/10 * * * * *", Priority::High);
    table.set_schedule(every_minute, "* * * * *", Priority::Low);
    let rec = Recorder::noop();
    let s = scheduler_with(SchedulerConfig::default(), table, Some(rec.clone())).await;
    s.sync_cron();
    tokio::time::sleep(Duration::from_secs(125)).await;
    let started = rec.started.lock().clone();
    let times = |agent: AgentId| -> Vec<Instant> {
        started
            .iter()
            .filter(|(_, a, ..)| *a == agent)
            .map(|(_, _, at, _)| *at)
            .collect()
    };
    let fast = times(every10s);
    let slow = times(every_minute);
    assert!(
        (12..=13).contains(&fast.len()),
        "10 s schedule fired {} times in 125 s",
        fast.len()
    );
    for w in fast.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(9_990) && gap <= Duration::from_millis(10_010),
            "gap {gap:?}"
        );
    }
    assert!(
        (2..=3).contains(&slow.len()),
        "1 min schedule fired {} times in 125 s",
        slow.len()
    );
    for w in slow.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(59_990) && gap <= Duration::from_millis(60_010),
            "gap {gap:?}"
        );
    }
    let records = s.list_tasks();
    assert!(records.iter().all(|r| r.source == TaskSource::Cron));
    assert!(records
        .iter()
        .filter(|r| r.task.agent_id == every10s)
        .all(|r| r.task.priority == Priority::High));
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_agent_of_the_lifecycle_controller_runs_on_its_cron_schedule() {
    use symbiont_runtime::lifecycle::{DefaultLifecycleController, LifecycleConfig};
    use symbiont_runtime::{AgentConfig, ExecutionMode};
    let lifecycle = DefaultLifecycleController::new(LifecycleConfig::default())
        .await
        .expect("lifecycle");
    let agent = lifecycle
        .create_agent(AgentConfig {
            name: "reporter".into(),
            execution_mode: ExecutionMode::Scheduled {
                schedule: "*/15 * * * * *".into(),
            },
            priority: Priority::High,
            ..Default::default()
        })
        .await
        .expect("agent");
    let rec = Recorder::noop();
    let s = DefaultScheduler::with_parts(
        SchedulerConfig::default(),
        SchedulerParts::new(Arc::new(lifecycle.clone()), rec.clone()),
    )
    .await
    .expect("scheduler");
    tokio::time::sleep(Duration::from_secs(61)).await;
    let runs = rec.started.lock().len();
    assert!((4..=5).contains(&runs), "{runs} runs in 61 s");
    assert!(rec.started.lock().iter().all(|(_, a, ..)| *a == agent));
    // Terminated agents stop firing (their schedule is dropped at the next sync).
    lifecycle.terminate_agent(agent).await.expect("terminate");
    s.sync_cron();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(rec.started.lock().len(), runs);
}

#[tokio::test(start_paused = true)]
async fn a_cron_firing_is_skipped_while_the_previous_one_still_runs() {
    let table = Arc::new(AgentTable::new());
    let agent = AgentId::new();
    table.register(agent, None);
    table.set_schedule(agent, "*/10 * * * * *", Priority::Normal);
    let rec = Recorder::sleeping(Duration::from_secs(25));
    let s = scheduler_with(SchedulerConfig::default(), table, Some(rec.clone())).await;
    tokio::time::sleep(Duration::from_secs(61)).await;
    let runs = rec.started.lock().len();
    assert!((2..=3).contains(&runs), "{runs} runs");
    assert!(s.stats().cron_skipped >= 3, "{:?}", s.stats());
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_cap_holds_under_load_across_agents() {
    let table = Arc::new(AgentTable::new());
    let agents: Vec<AgentId> = (0..8).map(|_| AgentId::new()).collect();
    for a in &agents {
        table.register(*a, Some("pool"));
    }
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let rec = Recorder::new(move |_| {
        let (n, p) = (n.clone(), p.clone());
        Box::pin(async move {
            let running = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(running, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(7)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok(TaskOutput::default())
        })
    });
    let config = SchedulerConfig {
        max_concurrent_tasks: 5,
        critical_reserved_slots: 2,
        load_balancing_strategy: LoadBalancingStrategy::LeastConnections,
        ..Default::default()
    };
    let s = scheduler_with(config, table, Some(rec.clone())).await;
    let mut ids = Vec::new();
    for i in 0..400 {
        let t = task(agents[i % agents.len()], Priority::ALL[i % 4]);
        let target = if i % 2 == 0 {
            Some(TaskTarget::Group("pool".into()))
        } else {
            None
        };
        let r = s
            .schedule_task_with(
                t,
                TaskOptions {
                    target,
                    ..Default::default()
                },
            )
            .await
            .expect("scheduled");
        ids.push(r.task_id);
        assert!(s.stats().running <= 5);
    }
    s.wait_idle().await;
    assert_eq!(peak.load(Ordering::SeqCst), 5, "peak concurrency");
    assert_eq!(s.stats().completed, 400);
}

#[tokio::test(start_paused = true)]
async fn a_critical_task_starts_at_once_in_a_reserved_slot_when_the_queue_is_full() {
    let (table, agent) = one_agent();
    // Low tasks hang; Critical tasks finish at once.
    let rec = Recorder::new(|ctx| {
        Box::pin(async move {
            if ctx.priority != Priority::Critical {
                std::future::pending::<()>().await;
            }
            Ok(TaskOutput::default())
        })
    });
    let config = SchedulerConfig {
        max_concurrent_tasks: 4,
        critical_reserved_slots: 1,
        max_queued_tasks: 50,
        ..Default::default()
    };
    let s = scheduler_with(config, table, Some(rec.clone())).await;
    for _ in 0..52 {
        s.schedule_task(task(agent, Priority::Low))
            .await
            .expect("low");
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let stats = s.stats();
    assert_eq!(
        stats.running, 3,
        "Low tasks use the unreserved slots only: {stats:?}"
    );
    assert_eq!(stats.queued, 49, "{stats:?}");
    let t0 = Instant::now();
    let c = s
        .schedule_task(task(agent, Priority::Critical))
        .await
        .expect("one place left in the queue");
    let r = s.wait_task(c).await.expect("critical");
    assert_eq!(r.status, TaskStatus::Completed);
    assert_eq!(
        Instant::now(),
        t0,
        "no time passed: it did not wait for a slot"
    );
    assert!(s.stats().running <= 4);
}

/// An executor whose tasks run `sleep 100` as a real child process and whose cancel hook
/// kills it.
struct ProcessExecutor {
    children: Mutex<HashMap<TaskId, tokio::process::Child>>,
    pids: Mutex<HashMap<TaskId, u32>>,
    cancels: Mutex<Vec<CancelReason>>,
}

#[async_trait]
impl TaskExecutor for ProcessExecutor {
    async fn execute(&self, task: &TaskContext) -> Result<TaskOutput, RuntimeError> {
        let child = tokio::process::Command::new("sleep")
            .arg("100")
            .kill_on_drop(false)
            .spawn()
            .map_err(symbiont_runtime::sandbox::SandboxError::from)?;
        let pid = child.id().expect("running child has a pid");
        self.pids.lock().insert(task.task_id, pid);
        self.children.lock().insert(task.task_id, child);
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut children = self.children.lock();
            let Some(child) = children.get_mut(&task.task_id) else {
                break;
            };
            if child
                .try_wait()
                .map_err(symbiont_runtime::sandbox::SandboxError::from)?
                .is_some()
            {
                children.remove(&task.task_id);
                break;
            }
        }
        Ok(TaskOutput::default())
    }

    async fn cancel(&self, task: &TaskContext, reason: CancelReason) -> Result<(), RuntimeError> {
        self.cancels.lock().push(reason);
        let child = self.children.lock().remove(&task.task_id);
        if let Some(mut child) = child {
            child
                .kill()
                .await
                .map_err(symbiont_runtime::sandbox::SandboxError::from)?;
        }
        Ok(())
    }
}

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie is not running either.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn process_executor() -> Arc<ProcessExecutor> {
    Arc::new(ProcessExecutor {
        children: Mutex::new(HashMap::new()),
        pids: Mutex::new(HashMap::new()),
        cancels: Mutex::new(Vec::new()),
    })
}

#[tokio::test]
async fn a_timeout_kills_the_real_child_process_of_the_execution() {
    let (table, agent) = one_agent();
    let exec = process_executor();
    let s = scheduler_with(SchedulerConfig::default(), table, Some(exec.clone())).await;
    let mut t = task(agent, Priority::Normal);
    t.timeout = Duration::from_secs(1);
    let id = s.schedule_task(t).await.expect("scheduled");
    // The process is really running first.
    let pid = loop {
        if let Some(pid) = exec.pids.lock().get(&id).copied() {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(process_alive(pid), "sleep 100 should be running");
    let record = s.wait_task(id).await.expect("finished");
    assert_eq!(record.status, TaskStatus::TimedOut);
    assert!(
        record
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("SCHED_003")),
        "{:?}",
        record.last_error
    );
    assert_eq!(exec.cancels.lock().as_slice(), [CancelReason::Timeout]);
    assert!(!process_alive(pid), "pid {pid} survived the timeout");
    assert_eq!(s.stats().running, 0);
}

#[tokio::test]
async fn the_scheduler_wide_task_timeout_caps_a_longer_task_timeout() {
    let (table, agent) = one_agent();
    let exec = process_executor();
    let config = SchedulerConfig {
        task_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let s = scheduler_with(config, table, Some(exec.clone())).await;
    let id = s
        .schedule_task(task(agent, Priority::Normal))
        .await
        .expect("scheduled");
    let record = s.wait_task(id).await.expect("finished");
    assert_eq!(record.status, TaskStatus::TimedOut);
    let pid = exec.pids.lock()[&id];
    assert!(!process_alive(pid));
}

#[tokio::test]
async fn cancelling_a_running_task_kills_its_process_and_a_queued_one_never_runs() {
    let (table, agent) = one_agent();
    let exec = process_executor();
    let config = SchedulerConfig {
        max_concurrent_tasks: 1,
        ..Default::default()
    };
    let s = scheduler_with(config, table, Some(exec.clone())).await;
    let running = s
        .schedule_task(task(agent, Priority::High))
        .await
        .expect("a");
    let queued = s
        .schedule_task(task(agent, Priority::Low))
        .await
        .expect("b");
    let pid = loop {
        if let Some(pid) = exec.pids.lock().get(&running).copied() {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(s.task_status(queued).expect("status"), TaskStatus::Queued);
    let rec = s.cancel_task(queued).await.expect("cancel queued");
    assert_eq!(rec.status, TaskStatus::Cancelled);
    assert_eq!(rec.attempts, 0);
    let rec = s.cancel_task(running).await.expect("cancel running");
    assert_eq!(rec.status, TaskStatus::Cancelled);
    assert!(!process_alive(pid), "pid {pid} survived cancellation");
    assert_eq!(exec.cancels.lock().as_slice(), [CancelReason::Cancelled]);
    let again = s.cancel_task(running).await.expect_err("already final");
    assert_eq!(again.code(), "SCHED_008");
    let unknown = s.cancel_task(TaskId::new()).await.expect_err("unknown");
    assert_eq!(unknown.code(), "SCHED_002");
    assert_eq!(s.stats().cancelled, 2);
}

#[tokio::test(start_paused = true)]
async fn status_queries_follow_a_task_through_its_life() {
    let (table, agent) = one_agent();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let rec = Recorder::new(move |ctx| {
        let g = g.clone();
        Box::pin(async move {
            g.notified().await;
            Ok(TaskOutput {
                data: ctx.payload.to_vec(),
            })
        })
    });
    let s = scheduler_with(SchedulerConfig::default(), table, Some(rec.clone())).await;
    let r = s
        .schedule_task_with(
            task(agent, Priority::Normal),
            TaskOptions {
                payload: b"hello".to_vec(),
                ..Default::default()
            },
        )
        .await
        .expect("scheduled");
    while s.task_status(r.task_id).expect("status") != TaskStatus::Running {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(s.list_tasks_with_status(TaskStatus::Running).len(), 1);
    let rec_now = s.task(r.task_id).expect("record");
    assert_eq!(rec_now.assigned_agent, Some(agent));
    assert_eq!(rec_now.attempts, 1);
    gate.notify_one();
    let done = s.wait_task(r.task_id).await.expect("done");
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.output, b"hello");
    assert!(done.finished_at.is_some());
    assert_eq!(s.list_tasks().len(), 1);
    assert_eq!(
        s.task_status(TaskId::new()).expect_err("unknown").code(),
        "SCHED_002"
    );
}

#[tokio::test(start_paused = true)]
async fn sched_001_says_why_a_task_cannot_be_scheduled() {
    let (table, agent) = one_agent();
    let config = SchedulerConfig {
        max_queued_tasks: 2,
        ..Default::default()
    };
    let s = scheduler_with(config, table.clone(), None).await;
    let expect_reason = |r: Result<TaskId, SchedulerError>, needle: &str| {
        let e = r.expect_err(needle);
        assert_eq!(e.code(), "SCHED_001");
        assert!(e.to_string().contains(needle), "{e}");
    };
    expect_reason(
        s.schedule_task(task(AgentId::new(), Priority::Normal))
            .await,
        "unknown agent",
    );
    let gone = AgentId::new();
    table.register(gone, None);
    table.set_state(gone, AgentState::Terminated);
    expect_reason(
        s.schedule_task(task(gone, Priority::Normal)).await,
        "terminated",
    );
    let e = s
        .schedule_task_with(
            task(agent, Priority::Normal),
            TaskOptions {
                target: Some(TaskTarget::Group("nobody".into())),
                ..Default::default()
            },
        )
        .await
        .expect_err("empty group");
    assert_eq!(e.code(), "SCHED_001");
    assert!(e.to_string().contains("no live agent"), "{e}");
    let dup = task(agent, Priority::Normal);
    s.schedule_task(dup.clone()).await.expect("1");
    expect_reason(s.schedule_task(dup).await, "already scheduled");
    s.schedule_task(task(agent, Priority::Normal))
        .await
        .expect("2");
    expect_reason(
        s.schedule_task(task(agent, Priority::Critical)).await,
        "queue full",
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_waits_for_its_suspended_agent_and_fails_if_it_is_terminated() {
    let table = Arc::new(AgentTable::new());
    let (a, b) = (AgentId::new(), AgentId::new());
    table.register(a, None);
    table.register(b, None);
    table.set_state(a, AgentState::Suspended);
    table.set_state(b, AgentState::Suspended);
    let rec = Recorder::noop();
    let s = scheduler_with(SchedulerConfig::default(), table.clone(), Some(rec.clone())).await;
    let ta = s.schedule_task(task(a, Priority::Normal)).await.expect("a");
    let tb = s.schedule_task(task(b, Priority::Normal)).await.expect("b");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.task_status(ta).expect("a"), TaskStatus::Waiting);
    assert_eq!(s.stats().waiting, 2);
    table.set_state(a, AgentState::Ready);
    table.set_state(b, AgentState::Terminated);
    s.notify_agent_changed();
    assert_eq!(
        s.wait_task(ta).await.expect("a").status,
        TaskStatus::Completed
    );
    let rb = s.wait_task(tb).await.expect("b");
    assert_eq!(rb.status, TaskStatus::Failed);
    assert!(
        rb.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("SCHED_001") && e.contains("terminated")),
        "{:?}",
        rb.last_error
    );
}

struct FixedLoad(Mutex<HashMap<AgentId, AgentLoad>>);
impl LoadSource for FixedLoad {
    fn load(&self, agent: AgentId) -> Option<AgentLoad> {
        self.0.lock().get(&agent).copied()
    }
}

async fn group_counts(
    strategy: LoadBalancingStrategy,
    load: Option<Arc<FixedLoad>>,
    agents: &[AgentId],
    table: Arc<AgentTable>,
    tasks: usize,
    task_time: Duration,
) -> HashMap<AgentId, usize> {
    let rec = Recorder::sleeping(task_time);
    let s = DefaultScheduler::with_parts(
        SchedulerConfig {
            load_balancing_strategy: strategy,
            ..Default::default()
        },
        SchedulerParts {
            directory: table,
            executor: Some(rec.clone()),
            load: load.map(|l| l as Arc<dyn LoadSource>),
            failure_policy: None,
            store: None,
            audit: None,
        },
    )
    .await
    .expect("scheduler");
    for _ in 0..tasks {
        s.schedule_task_with(
            task(agents[0], Priority::Normal),
            TaskOptions {
                target: Some(TaskTarget::Group("g".into())),
                ..Default::default()
            },
        )
        .await
        .expect("scheduled");
        tokio::task::yield_now().await;
    }
    s.wait_idle().await;
    let mut counts = HashMap::new();
    for (_, a, ..) in rec.started.lock().iter() {
        *counts.entry(*a).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn group_tasks_are_balanced_by_each_strategy() {
    let table = Arc::new(AgentTable::new());
    let agents: Vec<AgentId> = (0..3).map(|_| AgentId::new()).collect();
    for a in &agents {
        table.register(*a, Some("g"));
    }
    let outsider = AgentId::new();
    table.register(outsider, Some("other"));

    let rr = group_counts(
        LoadBalancingStrategy::RoundRobin,
        None,
        &agents,
        table.clone(),
        30,
        Duration::ZERO,
    )
    .await;
    assert!(agents.iter().all(|a| rr.get(a) == Some(&10)), "{rr:?}");
    assert!(!rr.contains_key(&outsider));

    // Least connections: agent 0 stays busy with long tasks, so it takes fewer.
    let s_table = table.clone();
    let lc = group_counts(
        LoadBalancingStrategy::LeastConnections,
        None,
        &agents,
        s_table,
        30,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(lc.values().sum::<usize>(), 30);
    assert!(lc.values().all(|n| *n == 10), "{lc:?}");

    // Resource based: agent 0 is hot on memory, agent 1 on CPU; agent 2 gets the tasks.
    let load = Arc::new(FixedLoad(Mutex::new(HashMap::from([
        (
            agents[0],
            AgentLoad {
                cpu: 0.1,
                memory: 0.95,
            },
        ),
        (
            agents[1],
            AgentLoad {
                cpu: 0.8,
                memory: 0.1,
            },
        ),
        (
            agents[2],
            AgentLoad {
                cpu: 0.2,
                memory: 0.2,
            },
        ),
    ]))));
    let rb = group_counts(
        LoadBalancingStrategy::ResourceBased,
        Some(load.clone()),
        &agents,
        table.clone(),
        12,
        Duration::from_millis(10),
    )
    .await;
    assert_eq!(rb.get(&agents[2]), Some(&12), "{rb:?}");
    // Live: when agent 2 heats up and agent 1 cools down, placement follows.
    load.0.lock().insert(
        agents[2],
        AgentLoad {
            cpu: 0.9,
            memory: 0.9,
        },
    );
    load.0.lock().insert(
        agents[1],
        AgentLoad {
            cpu: 0.05,
            memory: 0.05,
        },
    );
    let rb = group_counts(
        LoadBalancingStrategy::ResourceBased,
        Some(load),
        &agents,
        table,
        12,
        Duration::from_millis(10),
    )
    .await;
    assert_eq!(rb.get(&agents[1]), Some(&12), "{rb:?}");
}

#[tokio::test(start_paused = true)]
async fn least_connections_avoids_an_agent_busy_with_a_long_task() {
    let table = Arc::new(AgentTable::new());
    let agents: Vec<AgentId> = (0..2).map(|_| AgentId::new()).collect();
    for a in &agents {
        table.register(*a, Some("g"));
    }
    let rec = Recorder::new(|ctx| {
        Box::pin(async move {
            let d = if ctx.payload.as_ref() == b"long" {
                Duration::from_secs(100)
            } else {
                Duration::from_millis(10)
            };
            tokio::time::sleep(d).await;
            Ok(TaskOutput::default())
        })
    });
    let s = scheduler_with(
        SchedulerConfig {
            load_balancing_strategy: LoadBalancingStrategy::LeastConnections,
            ..Default::default()
        },
        table,
        Some(rec.clone()),
    )
    .await;
    let opts = |payload: &[u8]| TaskOptions {
        payload: payload.to_vec(),
        target: Some(TaskTarget::Group("g".into())),
        ..Default::default()
    };
    let long = s
        .schedule_task_with(task(agents[0], Priority::Normal), opts(b"long"))
        .await
        .expect("long");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let busy = s.task(long.task_id).expect("long").assigned_agent;
    for _ in 0..10 {
        s.schedule_task_with(task(agents[0], Priority::Normal), opts(b"short"))
            .await
            .expect("short");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = rec.started.lock().clone();
    let on_busy = started.iter().filter(|(_, a, ..)| Some(*a) == busy).count();
    assert_eq!(on_busy, 1, "only the long task runs on the busy agent");
}

#[tokio::test(start_paused = true)]
async fn failed_executions_are_retried_up_to_retry_count_with_backoff() {
    let (table, agent) = one_agent();
    let rec = Recorder::new(|ctx| {
        Box::pin(async move {
            if ctx.attempt < 3 {
                Err(SchedulerError::ExecutionFailed {
                    task: ctx.task_id,
                    reason: format!("attempt {} failed", ctx.attempt),
                }
                .into())
            } else {
                Ok(TaskOutput::default())
            }
        })
    });
    let config = SchedulerConfig {
        retry_backoff: Duration::from_millis(100),
        ..Default::default()
    };
    let s = scheduler_with(config, table, Some(rec.clone())).await;
    let mut t = task(agent, Priority::Normal);
    t.retry_count = 2;
    let ok = s.schedule_task(t).await.expect("scheduled");
    let r = s.wait_task(ok).await.expect("done");
    assert_eq!(r.status, TaskStatus::Completed);
    assert_eq!(r.attempts, 3);
    let starts: Vec<Instant> = rec.started.lock().iter().map(|s| s.2).collect();
    assert_eq!(starts[1] - starts[0], Duration::from_millis(100));
    assert_eq!(starts[2] - starts[1], Duration::from_millis(200));

    let mut t = task(agent, Priority::Normal);
    t.retry_count = 1;
    let failing = s.schedule_task(t).await.expect("scheduled");
    let r = s.wait_task(failing).await.expect("done");
    assert_eq!(r.status, TaskStatus::Failed);
    assert_eq!(r.attempts, 2);
    assert!(
        r.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("SCHED_005")),
        "{:?}",
        r.last_error
    );
    assert_eq!(s.stats().retried, 3);
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_key_detects_a_duplicate() {
    let (table, agent) = one_agent();
    let s = scheduler_with(SchedulerConfig::default(), table, Some(Recorder::noop())).await;
    let opts = || TaskOptions {
        idempotency_key: Some("invoice-42".into()),
        ..Default::default()
    };
    let first = s
        .schedule_task_with(task(agent, Priority::Normal), opts())
        .await
        .expect("first");
    assert!(!first.duplicate);
    s.wait_task(first.task_id).await.expect("done");
    let second = s
        .schedule_task_with(task(agent, Priority::Normal), opts())
        .await
        .expect("second");
    assert!(second.duplicate);
    assert_eq!(second.task_id, first.task_id);
    assert_eq!(s.list_tasks().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn every_scheduling_decision_is_audited() {
    let (table, agent) = one_agent();
    let audit = Arc::new(MockAuditTrail::new_sync());
    let rec = Recorder::new(|ctx| {
        Box::pin(async move {
            if ctx.payload.as_ref() == b"fail" {
                Err(SchedulerError::ExecutionFailed {
                    task: ctx.task_id,
                    reason: "no".into(),
                }
                .into())
            } else {
                Ok(TaskOutput::default())
            }
        })
    });
    let s = DefaultScheduler::with_parts(
        SchedulerConfig::default(),
        SchedulerParts {
            directory: table,
            executor: Some(rec),
            load: None,
            failure_policy: None,
            store: None,
            audit: Some(audit.clone()),
        },
    )
    .await
    .expect("scheduler");
    let ok = s
        .schedule_task(task(agent, Priority::Normal))
        .await
        .expect("ok");
    let bad = s
        .schedule_task_with(
            task(agent, Priority::Normal),
            TaskOptions {
                payload: b"fail".to_vec(),
                ..Default::default()
            },
        )
        .await
        .expect("bad")
        .task_id;
    s.wait_task(ok).await.expect("ok");
    s.wait_task(bad).await.expect("bad");
    for (ty, n) in [
        (AuditEventType::TaskScheduled, 2),
        (AuditEventType::TaskStarted, 2),
        (AuditEventType::TaskCompleted, 1),
        (AuditEventType::TaskFailed, 1),
    ] {
        let events = audit.events_of(&ty);
        assert_eq!(events.len(), n, "{ty:?}");
        assert!(events.iter().all(|e| e.agent_id == Some(agent)));
    }
    let failed = &audit.events_of(&AuditEventType::TaskFailed)[0];
    assert_eq!(failed.metadata["task_id"], bad.to_string());
    assert!(failed.metadata["error"].contains("SCHED_005"));
}

#[tokio::test]
async fn a_graceful_shutdown_leaves_running_tasks_to_the_next_start() {
    let (table, agent) = one_agent();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let parts = |exec: Arc<dyn TaskExecutor>| SchedulerParts {
        directory: table.clone(),
        executor: Some(exec),
        load: None,
        failure_policy: None,
        store: Some(store.clone()),
        audit: None,
    };
    let hang = Recorder::new(|_| Box::pin(std::future::pending()));
    let s1 = DefaultScheduler::with_parts(SchedulerConfig::default(), parts(hang.clone()))
        .await
        .expect("s1");
    let id = s1
        .schedule_task(task(agent, Priority::Normal))
        .await
        .expect("scheduled");
    while s1.task_status(id).expect("status") != TaskStatus::Running {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let waiter = {
        let s1 = s1.clone();
        tokio::spawn(async move { s1.wait_task(id).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    s1.shutdown().await;
    let waited = waiter.await.expect("join").expect_err("shut down");
    assert_eq!(waited.code(), "SCHED_010");
    assert_eq!(
        hang.cancels.lock().as_slice(),
        [(id, CancelReason::Shutdown)]
    );
    assert_eq!(
        s1.schedule_task(task(agent, Priority::Normal))
            .await
            .expect_err("shut down")
            .code(),
        "SCHED_010"
    );
    s1.flush().await.expect("flush");
    drop(s1);
    let done = Recorder::noop();
    let s2 = DefaultScheduler::with_parts(SchedulerConfig::default(), parts(done.clone()))
        .await
        .expect("s2");
    let r = s2.wait_task(id).await.expect("recovered");
    assert_eq!(r.status, TaskStatus::Completed);
    assert_eq!(r.attempts, 2);
    assert!(r.recovered);
    assert_eq!(s2.stats().recovered, 1);
}

#[tokio::test]
async fn dropping_the_last_handle_kills_running_executions() {
    let (table, agent) = one_agent();
    let exec = process_executor();
    let s = scheduler_with(SchedulerConfig::default(), table, Some(exec.clone())).await;
    let id = s
        .schedule_task(task(agent, Priority::Normal))
        .await
        .expect("scheduled");
    let pid = loop {
        if let Some(pid) = exec.pids.lock().get(&id).copied() {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} outlived its scheduler"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(exec.cancels.lock().as_slice(), [CancelReason::Shutdown]);
}

// ---- durability across a real kill -9 -------------------------------------------------

const CHILD_ENV: &str = "SYMBIONT_SCHED_KILL9_CHILD_DIR";
const KILL9_AGENT: &str = "6f1d7a52-3c3e-4a8e-9a55-0d1f3b6c2a11";
const KILL9_TASKS: usize = 6;

fn kill9_agent() -> AgentId {
    KILL9_AGENT.parse().expect("constant uuid")
}

/// Runs only as the child of `queued_and_running_tasks_survive_a_kill_9` (it re-executes
/// this test binary with `SYMBIONT_SCHED_KILL9_CHILD_DIR` set): schedules tasks into a
/// SQLite store, lets two of them start, signals readiness and waits to be killed.
#[tokio::test]
async fn kill9_child_process_entry() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("state.db"), SyncMode::Full).expect("store"));
    let table = Arc::new(AgentTable::new());
    table.register(kill9_agent(), None);
    let marks = dir.clone();
    let exec = Recorder::new(move |ctx| {
        let marks = marks.clone();
        Box::pin(async move {
            let key = ctx.idempotency_key.unwrap_or_default();
            std::fs::write(marks.join(format!("started-{key}-{}", ctx.attempt)), b"")
                .expect("mark");
            std::future::pending().await
        })
    });
    let s = DefaultScheduler::with_parts(
        SchedulerConfig {
            max_concurrent_tasks: 2,
            critical_reserved_slots: 0,
            ..Default::default()
        },
        SchedulerParts {
            directory: table,
            executor: Some(exec),
            load: None,
            failure_policy: None,
            store: Some(store),
            audit: None,
        },
    )
    .await
    .expect("scheduler");
    for i in 0..KILL9_TASKS {
        let r = s
            .schedule_task_with(
                task(kill9_agent(), Priority::Normal),
                TaskOptions {
                    payload: format!("job {i}").into_bytes(),
                    idempotency_key: Some(format!("job-{i}")),
                    ..Default::default()
                },
            )
            .await
            .expect("scheduled");
        println!("scheduled {} job-{i}", r.task_id);
    }
    while s.stats().running < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The attempts are committed before the executor runs; both marks exist.
    while std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("started-"))
        .count()
        < 2
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::write(dir.join("ready"), b"").expect("ready");
    std::future::pending::<()>().await;
}

/// Kills the child if the test fails before it does (no orphan outlives the test).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn started_marks(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("started-"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn queued_and_running_tasks_survive_a_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = KillOnDrop(
        std::process::Command::new(exe)
            .args(["--exact", "kill9_child_process_entry", "--nocapture"])
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn child"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !dir.path().join("ready").exists() {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            panic!("child exited early: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "child never got ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SIGKILL: no destructor, no flush, no goodbye.
    child.0.kill().expect("kill -9");
    let status = child.0.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "child ended by {status}");
    let before = started_marks(dir.path());
    assert_eq!(before.len(), 2, "{before:?}");

    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("state.db"), SyncMode::Full).expect("store"));
    let table = Arc::new(AgentTable::new());
    table.register(kill9_agent(), None);
    let rec = Recorder::noop();
    let s = DefaultScheduler::with_parts(
        SchedulerConfig::default(),
        SchedulerParts {
            directory: table,
            executor: Some(rec.clone()),
            load: None,
            failure_policy: None,
            store: Some(store),
            audit: None,
        },
    )
    .await
    .expect("restarted scheduler");
    assert_eq!(s.stats().recovered, KILL9_TASKS as u64);
    s.wait_idle().await;
    let records = s.list_tasks();
    assert_eq!(records.len(), KILL9_TASKS);
    let mut rerun = 0;
    for r in &records {
        assert_eq!(r.status, TaskStatus::Completed, "{r:?}");
        assert!(r.recovered);
        let key = r.idempotency_key.clone().expect("key");
        let i: usize = key.trim_start_matches("job-").parse().expect("index");
        assert_eq!(r.payload, format!("job {i}").into_bytes());
        if before.contains(&format!("started-{key}-1")) {
            // Running at the crash: re-run, and the record says so.
            assert_eq!(r.attempts, 2, "{r:?}");
            assert!(r
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("during attempt 1")));
            rerun += 1;
        } else {
            assert_eq!(r.attempts, 1, "{r:?}");
        }
    }
    assert_eq!(rerun, 2);
    // The executor saw attempt 2 for the two re-runs.
    let attempts: Vec<u32> = rec.started.lock().iter().map(|s| s.3).collect();
    assert_eq!(attempts.iter().filter(|a| **a == 2).count(), 2);
    // A caller retrying its request after the crash is told it is a duplicate.
    let again = s
        .schedule_task_with(
            task(kill9_agent(), Priority::Normal),
            TaskOptions {
                idempotency_key: Some("job-0".into()),
                ..Default::default()
            },
        )
        .await
        .expect("schedule");
    assert!(again.duplicate);
    s.flush().await.expect("flush");
    drop(s);
    // The final statuses are durable too: a third start finds nothing to run.
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("state.db"), SyncMode::Full).expect("store"));
    let table = Arc::new(AgentTable::new());
    table.register(kill9_agent(), None);
    let s = DefaultScheduler::with_parts(
        SchedulerConfig::default(),
        SchedulerParts {
            directory: table,
            executor: Some(Recorder::noop()),
            load: None,
            failure_policy: None,
            store: Some(store),
            audit: None,
        },
    )
    .await
    .expect("third start");
    assert_eq!(s.stats().recovered, 0);
    assert_eq!(
        s.list_tasks_with_status(TaskStatus::Completed).len(),
        KILL9_TASKS
    );
}
