//! [`DefaultScheduler`]: the task table, the dispatcher loop and the execution of tasks.
//!
//! One mutex guards the task table and the queues; it is held only for in-memory work
//! (never across an await, a store write or an executor call). One dispatcher task moves
//! due tasks to the ready queue, fires cron schedules and starts executions while fewer than
//! `max_concurrent_tasks` run. Each execution runs in its own Tokio task, raced against its
//! timeout and its cancellation token; when either wins the execution future is dropped and
//! [`TaskExecutor::cancel`] kills what it left running before the slot is released.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::balance;
use super::cron_schedule::{parse_cron, CronSchedule};
use super::journal::{delete_op, put_op, Journal};
use super::queue::{rank, DelayQueue, ReadyQueues};
use super::traits::{
    AgentDirectory, AgentTable, CancelReason, FailurePolicy, LoadSource, RetryCountPolicy,
    RetryDecision, TaskContext, TaskExecutor, TaskOutput,
};
use super::{
    ScheduleReceipt, ScheduledTask, SchedulerConfig, SchedulerError, TaskOptions, TaskRecord,
    TaskSource, TaskStatus, TaskTarget, TASKS_TABLE,
};
use crate::config::Validate;
use crate::error::RuntimeError;
use crate::integrations::audit_trail::{AuditEvent, AuditEventType, AuditSink};
use crate::storage::{decode_json, Store};
use crate::types::{AgentId, AgentState, TaskId};

/// The collaborators of a [`DefaultScheduler`], given by the runtime.
#[derive(Clone)]
pub struct SchedulerParts {
    /// Which agents exist (the lifecycle controller in the runtime).
    pub directory: Arc<dyn AgentDirectory>,
    /// Runs tasks; `None` holds every task in the queue until
    /// [`DefaultScheduler::set_executor`] is called.
    pub executor: Option<Arc<dyn TaskExecutor>>,
    /// Live resource figures for `ResourceBased` placement.
    pub load: Option<Arc<dyn LoadSource>>,
    /// Decides retries of failed executions (default: [`RetryCountPolicy`] from the config).
    pub failure_policy: Option<Arc<dyn FailurePolicy>>,
    /// Where task records are written ahead (`None`: in memory only, lost at exit).
    pub store: Option<Arc<dyn Store>>,
    /// Where scheduling decisions are audited.
    pub audit: Option<AuditSink>,
}

impl SchedulerParts {
    /// Parts with a directory and an executor, nothing else.
    pub fn new(directory: Arc<dyn AgentDirectory>, executor: Arc<dyn TaskExecutor>) -> Self {
        Self {
            directory,
            executor: Some(executor),
            load: None,
            failure_policy: None,
            store: None,
            audit: None,
        }
    }
}

impl std::fmt::Debug for SchedulerParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerParts")
            .field("executor", &self.executor.is_some())
            .field("load", &self.load.is_some())
            .field("failure_policy", &self.failure_policy.is_some())
            .field("store", &self.store.is_some())
            .field("audit", &self.audit.is_some())
            .finish()
    }
}

/// Counters of a scheduler, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tasks in the ready queue.
    pub queued: usize,
    /// Tasks waiting for their time (or a retry's backoff).
    pub delayed: usize,
    /// Ready tasks whose agent is not available.
    pub waiting: usize,
    /// Tasks executing.
    pub running: usize,
    /// Tasks completed since start.
    pub completed: u64,
    /// Tasks failed since start.
    pub failed: u64,
    /// Tasks ended by their timeout since start.
    pub timed_out: u64,
    /// Tasks cancelled since start.
    pub cancelled: u64,
    /// Retries scheduled since start.
    pub retried: u64,
    /// Tasks re-queued from the store at start.
    pub recovered: u64,
    /// Cron firings skipped because the previous firing's task had not finished.
    pub cron_skipped: u64,
}

struct Entry {
    record: TaskRecord,
    /// Sequence of the queue entry that is current (older heap entries are stale).
    seq: u64,
    /// Rank in the ready queue (kept while the task waits for its agent).
    rank: i128,
    /// True once the task is in a queue (after its record was committed).
    enqueued: bool,
    cancel: Option<CancellationToken>,
    waiters: Vec<oneshot::Sender<TaskRecord>>,
}

struct CronEntry {
    schedule: CronSchedule,
    priority: crate::types::Priority,
    next_wall: SystemTime,
    next_due: Instant,
    active: Option<TaskId>,
}

/// Hash maps keyed by ids: foldhash (fast, randomly seeded per process).
type Map<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

#[derive(Default)]
struct State {
    tasks: Map<TaskId, Entry>,
    ready: ReadyQueues,
    delayed: DelayQueue,
    waiting: Vec<TaskId>,
    next_wait_recheck: Option<Instant>,
    running: usize,
    running_critical: usize,
    running_per_agent: Map<AgentId, usize>,
    n_queued: usize,
    n_delayed: usize,
    n_waiting: usize,
    idem: Map<String, TaskId>,
    finished: VecDeque<TaskId>,
    stats: SchedulerStats,
    cursors: HashMap<String, usize>,
    cron: HashMap<AgentId, CronEntry>,
    cron_invalid: HashSet<(AgentId, String)>,
    next_cron_sync: Option<Instant>,
    seq: u64,
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn waiting_total(&self) -> usize {
        self.n_queued + self.n_delayed + self.n_waiting
    }

    fn count(&mut self, status: TaskStatus, delta: isize) {
        let slot = match status {
            TaskStatus::Queued => &mut self.n_queued,
            TaskStatus::Delayed => &mut self.n_delayed,
            TaskStatus::Waiting => &mut self.n_waiting,
            _ => return,
        };
        *slot = slot.saturating_add_signed(delta);
    }

    /// Changes a task's status, keeping the counters right.
    fn set_status(&mut self, id: TaskId, to: TaskStatus) {
        let from = match self.tasks.get_mut(&id) {
            Some(e) => std::mem::replace(&mut e.record.status, to),
            None => return,
        };
        self.count(from, -1);
        self.count(to, 1);
    }

    fn release_slot(&mut self, agent: Option<AgentId>, critical: bool) {
        self.running = self.running.saturating_sub(1);
        if critical {
            self.running_critical = self.running_critical.saturating_sub(1);
        }
        if let Some(agent) = agent {
            if let Some(n) = self.running_per_agent.get_mut(&agent) {
                *n -= 1;
                if *n == 0 {
                    self.running_per_agent.remove(&agent);
                }
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.running == 0 && self.waiting_total() == 0
    }
}

struct Shared {
    config: SchedulerConfig,
    directory: Arc<dyn AgentDirectory>,
    table: Option<Arc<AgentTable>>,
    executor: RwLock<Option<Arc<dyn TaskExecutor>>>,
    load: Option<Arc<dyn LoadSource>>,
    policy: Arc<dyn FailurePolicy>,
    audit: Option<AuditSink>,
    journal: Option<Journal>,
    epoch: Instant,
    epoch_wall: SystemTime,
    state: Mutex<State>,
    wake: Notify,
    idle: Notify,
    shutdown: CancellationToken,
    force_recheck: std::sync::atomic::AtomicBool,
    /// Executions spawned whose task has not been polled yet.
    unstarted: std::sync::atomic::AtomicUsize,
}

/// Most executions dispatched but not yet started at once. Bounds how many spawned
/// executions a newly dispatched (e.g. Critical) task can find ahead of it in Tokio's run
/// queue; the dispatcher is woken when executions start.
const DISPATCH_WINDOW: usize = 32;

/// How long a shutdown waits for running executions before it logs which ones it waits for.
const SLOW_SHUTDOWN: Duration = Duration::from_secs(5);

struct ShutdownGuard(CancellationToken);

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The scheduler. Cheap to clone (a shared handle); when the last handle is dropped the
/// dispatcher stops and running executions are cancelled.
#[derive(Clone)]
pub struct DefaultScheduler {
    shared: Arc<Shared>,
    _guard: Arc<ShutdownGuard>,
}

impl std::fmt::Debug for DefaultScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultScheduler")
            .field("config", &self.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

struct Job {
    ctx: TaskContext,
    token: CancellationToken,
    /// The record to write ahead (only with a journal).
    record: Option<Box<TaskRecord>>,
    executor: Arc<dyn TaskExecutor>,
}

enum Placement {
    Run(AgentId),
    Wait,
    Fail(String),
}

fn dispatchable(state: AgentState) -> bool {
    matches!(
        state,
        AgentState::Ready | AgentState::Running | AgentState::Waiting
    )
}

impl DefaultScheduler {
    /// A standalone scheduler: agents are registered by hand in [`DefaultScheduler::agents`],
    /// records are kept in memory, and tasks stay queued until an executor is attached with
    /// [`DefaultScheduler::set_executor`]. The runtime uses [`DefaultScheduler::with_parts`].
    pub async fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        let table = Arc::new(AgentTable::new());
        let parts = SchedulerParts {
            directory: table.clone(),
            executor: None,
            load: None,
            failure_policy: None,
            store: None,
            audit: None,
        };
        Self::build(config, parts, Some(table)).await
    }

    /// A scheduler acting through `parts`. With a store, the tasks left queued, delayed or
    /// running by a previous run are recovered (re-queued) before this returns.
    pub async fn with_parts(
        config: SchedulerConfig,
        parts: SchedulerParts,
    ) -> Result<Self, SchedulerError> {
        Self::build(config, parts, None).await
    }

    async fn build(
        config: SchedulerConfig,
        parts: SchedulerParts,
        table: Option<Arc<AgentTable>>,
    ) -> Result<Self, SchedulerError> {
        let mut issues = Vec::new();
        config.validate(&mut issues);
        if let Some(issue) = issues.first() {
            return Err(SchedulerError::InvalidConfig(format!(
                "{}: {}",
                issue.key, issue.message
            )));
        }
        let journal = match &parts.store {
            Some(store) => Some(Journal::start(store.clone()).map_err(|e| {
                SchedulerError::InvalidConfig(format!("cannot start the task journal: {e}"))
            })?),
            None => None,
        };
        let policy: Arc<dyn FailurePolicy> = match parts.failure_policy {
            Some(p) => p,
            None => Arc::new(RetryCountPolicy {
                base: config.retry_backoff,
                max: config.retry_backoff_max,
            }),
        };
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            config,
            directory: parts.directory,
            table,
            executor: RwLock::new(parts.executor),
            load: parts.load,
            policy,
            audit: parts.audit,
            journal,
            epoch: Instant::now(),
            epoch_wall: SystemTime::now(),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            idle: Notify::new(),
            shutdown: shutdown.clone(),
            force_recheck: std::sync::atomic::AtomicBool::new(false),
            unstarted: std::sync::atomic::AtomicUsize::new(0),
        });
        if let Some(store) = &parts.store {
            shared.recover(store.as_ref()).await?;
        }
        tokio::spawn(dispatcher(shared.clone()));
        Ok(Self {
            shared,
            _guard: Arc::new(ShutdownGuard(shutdown)),
        })
    }

    /// The standalone agent table (only for a scheduler built with
    /// [`DefaultScheduler::new`]).
    pub fn agents(&self) -> Option<&AgentTable> {
        self.shared.table.as_deref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.config
    }

    /// Attaches (or replaces) the executor; queued tasks start dispatching.
    pub fn set_executor(&self, executor: Arc<dyn TaskExecutor>) {
        *self.shared.executor.write() = Some(executor);
        self.shared.wake.notify_one();
    }

    /// Schedules `task` on `task.agent_id`. Returns once the task is accepted (and, with a
    /// store, committed). SCHED_001 says why a task cannot be scheduled.
    pub async fn schedule_task(&self, task: ScheduledTask) -> Result<TaskId, SchedulerError> {
        self.schedule_task_with(task, TaskOptions::default())
            .await
            .map(|r| r.task_id)
    }

    /// Schedules `task` with a payload, an idempotency key or a group target.
    pub async fn schedule_task_with(
        &self,
        task: ScheduledTask,
        options: TaskOptions,
    ) -> Result<ScheduleReceipt, SchedulerError> {
        self.shared.accept(task, options, TaskSource::Api).await
    }

    /// Cancels a task: a queued one is dropped, a running one is killed through
    /// [`TaskExecutor::cancel`]. Returns its final record once it is final (and its
    /// execution's process is gone). SCHED_002 unknown, SCHED_008 already finished.
    pub async fn cancel_task(&self, id: TaskId) -> Result<TaskRecord, SchedulerError> {
        {
            let mut st = self.shared.state.lock();
            let entry = st.tasks.get(&id).ok_or(SchedulerError::TaskNotFound(id))?;
            let status = entry.record.status;
            match status {
                s if s.is_final() => {
                    return Err(SchedulerError::AlreadyFinished {
                        task: id,
                        status: s,
                    })
                }
                TaskStatus::Running => {
                    if let Some(token) = &entry.cancel {
                        token.cancel();
                    }
                }
                _ => {
                    let finished = self.shared.finish_locked(
                        &mut st,
                        id,
                        TaskStatus::Cancelled,
                        Some(format!(
                            "{}: {}",
                            "SCHED_004",
                            SchedulerError::Cancelled(id)
                        )),
                        Vec::new(),
                    );
                    drop(st);
                    self.shared.after_finish(finished);
                }
            }
        }
        self.wait_task(id).await
    }

    /// Waits until the task is final and returns its record.
    pub async fn wait_task(&self, id: TaskId) -> Result<TaskRecord, SchedulerError> {
        let rx = {
            let mut st = self.shared.state.lock();
            let entry = st
                .tasks
                .get_mut(&id)
                .ok_or(SchedulerError::TaskNotFound(id))?;
            if entry.record.status.is_final() {
                return Ok(entry.record.clone());
            }
            if self.shared.shutdown.is_cancelled() {
                return Err(SchedulerError::ShutDown);
            }
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            rx
        };
        rx.await.map_err(|_| SchedulerError::ShutDown)
    }

    /// The task's status (SCHED_002 when unknown).
    pub fn task_status(&self, id: TaskId) -> Result<TaskStatus, SchedulerError> {
        self.shared
            .state
            .lock()
            .tasks
            .get(&id)
            .map(|e| e.record.status)
            .ok_or(SchedulerError::TaskNotFound(id))
    }

    /// The task's full record (SCHED_002 when unknown).
    pub fn task(&self, id: TaskId) -> Result<TaskRecord, SchedulerError> {
        self.shared
            .state
            .lock()
            .tasks
            .get(&id)
            .map(|e| e.record.clone())
            .ok_or(SchedulerError::TaskNotFound(id))
    }

    /// Every known task (live and retained finished ones), oldest first.
    pub fn list_tasks(&self) -> Vec<TaskRecord> {
        let mut all: Vec<TaskRecord> = self
            .shared
            .state
            .lock()
            .tasks
            .values()
            .map(|e| e.record.clone())
            .collect();
        all.sort_by_key(|r| r.created_at);
        all
    }

    /// The known tasks in `status`, oldest first.
    pub fn list_tasks_with_status(&self, status: TaskStatus) -> Vec<TaskRecord> {
        let mut v: Vec<TaskRecord> = self
            .shared
            .state
            .lock()
            .tasks
            .values()
            .filter(|e| e.record.status == status)
            .map(|e| e.record.clone())
            .collect();
        v.sort_by_key(|r| r.created_at);
        v
    }

    /// Counters now.
    pub fn stats(&self) -> SchedulerStats {
        let st = self.shared.state.lock();
        SchedulerStats {
            queued: st.n_queued,
            delayed: st.n_delayed,
            waiting: st.n_waiting,
            running: st.running,
            ..st.stats
        }
    }

    /// Tells the scheduler that an agent's state changed (e.g. it became Ready again), so
    /// tasks waiting for it are reconsidered now rather than at the next periodic re-check.
    pub fn notify_agent_changed(&self) {
        self.shared
            .force_recheck
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// Re-reads the agents' cron schedules now (also done every `cron_sync_interval`).
    pub fn sync_cron(&self) {
        self.shared.state.lock().next_cron_sync = None;
        self.shared.wake.notify_one();
    }

    /// Waits until every record write issued so far is committed to the store (a no-op
    /// without a store).
    pub async fn flush(&self) -> Result<(), SchedulerError> {
        match &self.shared.journal {
            Some(journal) => journal
                .write(Vec::new())
                .await
                .map_err(|e| SchedulerError::SchedulingFailed(format!("flush failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits until no task is queued, delayed, waiting or running.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.state.lock().is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Stops dispatching, kills running executions ([`CancelReason::Shutdown`]) and waits
    /// until their slots are released. Their records stay `Running` in the store, so the
    /// next scheduler on the same store runs them again.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.cancel_running();
        let started = Instant::now();
        let mut warned = false;
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.state.lock().running == 0 {
                return;
            }
            if !warned && started.elapsed() >= SLOW_SHUTDOWN {
                warned = true;
                let st = self.shared.state.lock();
                let running: Vec<String> = st
                    .tasks
                    .iter()
                    .filter(|(_, e)| e.record.status == TaskStatus::Running)
                    .map(|(id, e)| format!("{id} on {:?}", e.record.assigned_agent))
                    .collect();
                tracing::warn!(
                    count = st.running,
                    ?running,
                    "scheduler shutdown still waiting for running executions"
                );
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(SLOW_SHUTDOWN) => {}
            }
        }
    }
}

impl Shared {
    /// Cancels every running execution's token (shutdown).
    fn cancel_running(&self) {
        let st = self.state.lock();
        for e in st.tasks.values() {
            if let Some(token) = &e.cancel {
                token.cancel();
            }
        }
    }

    /// The scheduler's wall clock: the later of the system clock and the monotonic clock
    /// anchored at start. A system clock stepped backwards does not hold tasks back, and a
    /// paused Tokio clock (tests) moves it.
    fn wall_now(&self) -> SystemTime {
        let anchored = self.epoch_wall + Instant::now().saturating_duration_since(self.epoch);
        anchored.max(SystemTime::now())
    }

    fn effective_timeout(&self, task: &ScheduledTask) -> Duration {
        if task.timeout.is_zero() {
            self.config.task_timeout
        } else {
            task.timeout.min(self.config.task_timeout)
        }
    }

    fn audit(&self, event: impl FnOnce() -> AuditEvent) {
        if let Some(audit) = &self.audit {
            audit.submit(event());
        }
    }

    /// Refuses targets that can never run the task.
    fn check_target(&self, target: &TaskTarget) -> Result<(), SchedulerError> {
        match target {
            TaskTarget::Agent(agent) => match self.directory.state(*agent) {
                None => Err(SchedulerError::SchedulingFailed(format!(
                    "unknown agent {agent}"
                ))),
                Some(AgentState::Terminating | AgentState::Terminated) => Err(
                    SchedulerError::SchedulingFailed(format!("agent {agent} is terminated")),
                ),
                Some(_) => Ok(()),
            },
            TaskTarget::Group(group) => {
                let members = self.directory.group_members(group);
                if members.iter().any(|a| {
                    self.directory.state(*a).is_some_and(|s| {
                        !matches!(s, AgentState::Terminating | AgentState::Terminated)
                    })
                }) {
                    Ok(())
                } else {
                    Err(SchedulerError::SchedulingFailed(format!(
                        "group `{group}` has no live agent"
                    )))
                }
            }
        }
    }

    async fn accept(
        &self,
        task: ScheduledTask,
        options: TaskOptions,
        source: TaskSource,
    ) -> Result<ScheduleReceipt, SchedulerError> {
        if self.shutdown.is_cancelled() {
            return Err(SchedulerError::ShutDown);
        }
        let target = options
            .target
            .clone()
            .unwrap_or(TaskTarget::Agent(task.agent_id));
        self.check_target(&target)?;
        let wall = self.wall_now();
        let now = Instant::now();
        let due = task
            .scheduled_time
            .duration_since(wall)
            .ok()
            .filter(|d| !d.is_zero())
            .map(|d| now + d);
        let id = task.id;
        let record = TaskRecord {
            task,
            target,
            payload: options.payload,
            idempotency_key: options.idempotency_key,
            source,
            status: if due.is_some() {
                TaskStatus::Delayed
            } else {
                TaskStatus::Queued
            },
            attempts: 0,
            assigned_agent: None,
            last_error: None,
            output: Vec::new(),
            recovered: false,
            created_at: wall,
            started_at: None,
            finished_at: None,
        };
        let durable = self.journal.is_some();
        let put = if durable {
            Some(put_op(&record).map_err(|e| {
                SchedulerError::SchedulingFailed(format!("task cannot be encoded: {e}"))
            })?)
        } else {
            None
        };
        let audit_info = self.audit.as_ref().map(|_| {
            (
                record.task.agent_id,
                record.task.priority,
                record.target.clone(),
            )
        });
        {
            let mut st = self.state.lock();
            if let Some(key) = &record.idempotency_key {
                if let Some(existing) = st.idem.get(key) {
                    return Ok(ScheduleReceipt {
                        task_id: *existing,
                        duplicate: true,
                    });
                }
            }
            if st.tasks.contains_key(&id) {
                return Err(SchedulerError::SchedulingFailed(format!(
                    "task {id} is already scheduled"
                )));
            }
            let waiting = st.waiting_total();
            if waiting >= self.config.max_queued_tasks {
                return Err(SchedulerError::SchedulingFailed(format!(
                    "queue full: {waiting} tasks waiting (scheduler.max_queued_tasks = {})",
                    self.config.max_queued_tasks
                )));
            }
            if let Some(key) = &record.idempotency_key {
                st.idem.insert(key.clone(), id);
            }
            let status = record.status;
            let seq = st.next_seq();
            st.tasks.insert(
                id,
                Entry {
                    rank: 0,
                    seq,
                    enqueued: false,
                    record,
                    cancel: None,
                    waiters: Vec::new(),
                },
            );
            st.count(status, 1);
            if !durable {
                self.enqueue_locked(&mut st, id, due, now);
            }
        }
        if let (Some(journal), Some(put)) = (&self.journal, put) {
            if let Err(e) = journal.write(vec![put]).await {
                let mut st = self.state.lock();
                if let Some(entry) = st.tasks.remove(&id) {
                    st.count(entry.record.status, -1);
                    if let Some(key) = &entry.record.idempotency_key {
                        st.idem.remove(key);
                    }
                }
                return Err(SchedulerError::SchedulingFailed(format!(
                    "task could not be persisted: {e}"
                )));
            }
            let mut st = self.state.lock();
            self.enqueue_locked(&mut st, id, due, now);
        }
        self.wake.notify_one();
        if let Some((agent, priority, target)) = audit_info {
            self.audit(|| {
                AuditEvent::new(
                    AuditEventType::TaskScheduled,
                    Some(agent),
                    format!("task {id} scheduled ({priority:?}, {source:?})"),
                )
                .with("task_id", id.to_string())
                .with("priority", format!("{priority:?}"))
                .with("target", format!("{target:?}"))
            });
        }
        Ok(ScheduleReceipt {
            task_id: id,
            duplicate: false,
        })
    }

    /// Puts an accepted task into the delay or ready queue (unless it was cancelled).
    fn enqueue_locked(&self, st: &mut State, id: TaskId, due: Option<Instant>, now: Instant) {
        let seq = st.next_seq();
        let aging = self.config.aging_interval;
        let epoch = self.epoch;
        let Some(entry) = st.tasks.get_mut(&id) else {
            return;
        };
        if entry.record.status.is_final() || entry.enqueued {
            return;
        }
        entry.enqueued = true;
        entry.seq = seq;
        match due {
            Some(due) => st.delayed.push(due, seq, id),
            None => {
                entry.rank = rank(epoch, now, entry.record.task.priority, aging);
                let (r, p) = (entry.rank, entry.record.task.priority);
                st.ready.push(r, seq, id, p);
            }
        }
    }

    fn place(&self, st: &mut State, target: &TaskTarget) -> Placement {
        match target {
            TaskTarget::Agent(agent) => match self.directory.state(*agent) {
                None => Placement::Fail(format!("unknown agent {agent}")),
                Some(AgentState::Terminating | AgentState::Terminated) => {
                    Placement::Fail(format!("agent {agent} is terminated"))
                }
                Some(s) if dispatchable(s) => Placement::Run(*agent),
                Some(_) => Placement::Wait,
            },
            TaskTarget::Group(group) => {
                let members = self.directory.group_members(group);
                let mut live = false;
                let candidates: Vec<AgentId> = members
                    .into_iter()
                    .filter(|a| match self.directory.state(*a) {
                        Some(s) => {
                            live |= !matches!(s, AgentState::Terminating | AgentState::Terminated);
                            dispatchable(s)
                        }
                        None => false,
                    })
                    .collect();
                if candidates.is_empty() {
                    return if live {
                        Placement::Wait
                    } else {
                        Placement::Fail(format!("group `{group}` has no live agent"))
                    };
                }
                let State {
                    cursors,
                    running_per_agent,
                    ..
                } = st;
                let cursor = cursors.entry(group.clone()).or_insert(0);
                match balance::choose(
                    self.config.load_balancing_strategy,
                    &candidates,
                    running_per_agent,
                    self.load.as_deref(),
                    cursor,
                ) {
                    Some(a) => Placement::Run(a),
                    None => Placement::Wait,
                }
            }
        }
    }

    /// One pass of the dispatcher: returns the executions to start, the cron tasks to
    /// schedule and when to look again.
    fn tick(&self, cron_list: Option<Vec<super::ScheduledAgent>>) -> Tick {
        let now = Instant::now();
        let wall = self.wall_now();
        let mut st = self.state.lock();
        let mut tick = Tick::default();

        // Cron: sync the schedules, then fire what is due.
        if let Some(list) = cron_list {
            self.sync_cron_locked(&mut st, list, now, wall);
            st.next_cron_sync = Some(now + self.config.cron_sync_interval);
        }
        self.fire_cron_locked(&mut st, now, &mut tick);

        // Delayed → ready (aging counts from the due time).
        let aging = self.config.aging_interval;
        while let Some((due, id)) = st.delayed.pop_due(now) {
            let seq = st.next_seq();
            let Some(entry) = st.tasks.get_mut(&id) else {
                continue;
            };
            if entry.record.status != TaskStatus::Delayed {
                continue;
            }
            entry.seq = seq;
            entry.rank = rank(self.epoch, due, entry.record.task.priority, aging);
            let (r, p) = (entry.rank, entry.record.task.priority);
            st.set_status(id, TaskStatus::Queued);
            st.ready.push(r, seq, id, p);
        }

        // Tasks waiting for their agent go back to the ready queue at their old rank.
        let forced = self
            .force_recheck
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        if !st.waiting.is_empty() && (forced || st.next_wait_recheck.is_some_and(|t| t <= now)) {
            let waiting = std::mem::take(&mut st.waiting);
            for id in waiting {
                let seq = st.next_seq();
                let Some(entry) = st.tasks.get_mut(&id) else {
                    continue;
                };
                if entry.record.status != TaskStatus::Waiting {
                    continue;
                }
                entry.seq = seq;
                let (r, p) = (entry.rank, entry.record.task.priority);
                st.set_status(id, TaskStatus::Queued);
                st.ready.push(r, seq, id, p);
            }
            st.next_wait_recheck = None;
        }

        // Dispatch while below the cap.
        let executor = self.executor.read().clone();
        if let Some(executor) = executor {
            if !self.shutdown.is_cancelled() {
                let cap = self.config.max_concurrent_tasks;
                let reserved = self.config.critical_reserved_slots.min(cap - 1);
                let unstarted = self.unstarted.load(std::sync::atomic::Ordering::Acquire);
                while st.running < cap && unstarted + tick.jobs.len() < DISPATCH_WINDOW {
                    let allow_other = st.running - st.running_critical < cap - reserved;
                    let Some((_, seq, id)) = st.ready.pop(allow_other) else {
                        break;
                    };
                    let target = match st.tasks.get(&id) {
                        Some(e) if e.seq == seq && e.record.status == TaskStatus::Queued => {
                            e.record.target.clone()
                        }
                        _ => continue,
                    };
                    match self.place(&mut st, &target) {
                        Placement::Run(agent) => {
                            let job = self.start_locked(&mut st, id, agent, &executor, wall);
                            tick.jobs.extend(job);
                        }
                        Placement::Wait => {
                            st.set_status(id, TaskStatus::Waiting);
                            st.waiting.push(id);
                            if st.next_wait_recheck.is_none() {
                                st.next_wait_recheck = Some(now + self.config.agent_wait_recheck);
                            }
                        }
                        Placement::Fail(reason) => {
                            let f = self.finish_locked(
                                &mut st,
                                id,
                                TaskStatus::Failed,
                                Some(format!("SCHED_001: task scheduling failed: {reason}")),
                                Vec::new(),
                            );
                            tick.finished.push(f);
                        }
                    }
                }
            }
        }

        self.unstarted
            .fetch_add(tick.jobs.len(), std::sync::atomic::Ordering::AcqRel);

        // When to look again.
        let mut next = st.delayed.next_due();
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(st.next_wait_recheck);
        consider(st.next_cron_sync);
        consider(st.cron.values().map(|c| c.next_due).min());
        tick.next_wake = next;
        tick.cron_sync_due = st.next_cron_sync.is_none_or(|t| t <= now);
        if st.is_idle() {
            self.idle.notify_waiters();
        }
        tick
    }

    fn start_locked(
        &self,
        st: &mut State,
        id: TaskId,
        agent: AgentId,
        executor: &Arc<dyn TaskExecutor>,
        wall: SystemTime,
    ) -> Option<Job> {
        // A token of its own (a child token would lock the parent on every start and end);
        // shutdown cancels the running tasks' tokens one by one.
        let token = CancellationToken::new();
        st.set_status(id, TaskStatus::Running);
        st.running += 1;
        let critical = st
            .tasks
            .get(&id)
            .is_some_and(|e| e.record.task.priority == crate::types::Priority::Critical);
        if critical {
            st.running_critical += 1;
        }
        *st.running_per_agent.entry(agent).or_insert(0) += 1;
        let entry = st.tasks.get_mut(&id)?;
        entry.record.attempts += 1;
        entry.record.assigned_agent = Some(agent);
        entry.record.started_at = Some(wall);
        entry.cancel = Some(token.clone());
        let timeout = self.effective_timeout(&entry.record.task);
        let r = &entry.record;
        let ctx = TaskContext {
            task_id: id,
            agent_id: agent,
            requested_agent: r.task.agent_id,
            priority: r.task.priority,
            attempt: r.attempts,
            max_retries: r.task.retry_count,
            timeout,
            idempotency_key: r.idempotency_key.clone(),
            payload: if r.payload.is_empty() {
                Bytes::new()
            } else {
                Bytes::from(r.payload.clone())
            },
            source: r.source,
        };
        let record = self.journal.as_ref().map(|_| Box::new(r.clone()));
        Some(Job {
            ctx,
            token,
            record,
            executor: executor.clone(),
        })
    }

    /// Makes a task final; returns what must happen outside the lock.
    fn finish_locked(
        &self,
        st: &mut State,
        id: TaskId,
        status: TaskStatus,
        error: Option<String>,
        output: Vec<u8>,
    ) -> Finished {
        let wall = self.wall_now();
        let was_running = st
            .tasks
            .get(&id)
            .is_some_and(|e| e.record.status == TaskStatus::Running);
        st.set_status(id, status);
        let mut finished = Finished::default();
        let Some(entry) = st.tasks.get_mut(&id) else {
            return finished;
        };
        entry.record.finished_at = Some(wall);
        if error.is_some() {
            entry.record.last_error = error;
        }
        entry.record.output = output;
        entry.cancel = None;
        let agent = entry.record.assigned_agent;
        let critical = entry.record.task.priority == crate::types::Priority::Critical;
        let waiters = std::mem::take(&mut entry.waiters);
        let record = (self.journal.is_some() || self.audit.is_some() || !waiters.is_empty())
            .then(|| Box::new(entry.record.clone()));
        if was_running {
            st.release_slot(agent, critical);
        }
        match status {
            TaskStatus::Completed => st.stats.completed += 1,
            TaskStatus::Failed => st.stats.failed += 1,
            TaskStatus::TimedOut => st.stats.timed_out += 1,
            TaskStatus::Cancelled => st.stats.cancelled += 1,
            _ => {}
        }
        st.finished.push_back(id);
        while st.finished.len() > self.config.finished_task_retention {
            let Some(old) = st.finished.pop_front() else {
                break;
            };
            if let Some(e) = st.tasks.remove(&old) {
                if let Some(key) = &e.record.idempotency_key {
                    if st.idem.get(key) == Some(&old) {
                        st.idem.remove(key);
                    }
                }
                if self.journal.is_some() {
                    finished.ops.push(delete_op(old.to_string()));
                }
            }
        }
        finished.waiters = waiters;
        finished.record = record;
        finished
    }

    /// Persists, notifies waiters and audits a finished task.
    fn after_finish(&self, f: Finished) {
        let Finished {
            record,
            waiters,
            mut ops,
        } = f;
        if let Some(journal) = &self.journal {
            if let Some(record) = &record {
                match put_op(record) {
                    Ok(op) => ops.insert(0, op),
                    Err(e) => {
                        tracing::error!(task = %record.task.id, error = %e, "task record not encodable")
                    }
                }
            }
            if !ops.is_empty() {
                journal.submit(ops);
            }
        }
        let Some(record) = record else {
            self.wake.notify_one();
            return;
        };
        if self.audit.is_some() {
            let (ty, what) = match record.status {
                TaskStatus::Completed => (AuditEventType::TaskCompleted, "completed"),
                TaskStatus::TimedOut => (AuditEventType::TaskFailed, "timed out"),
                TaskStatus::Cancelled => (AuditEventType::TaskFailed, "cancelled"),
                _ => (AuditEventType::TaskFailed, "failed"),
            };
            self.audit(|| {
                let mut e = AuditEvent::new(
                    ty,
                    Some(record.assigned_agent.unwrap_or(record.task.agent_id)),
                    format!(
                        "task {} {what} after {} attempt(s){}",
                        record.task.id,
                        record.attempts,
                        record
                            .last_error
                            .as_deref()
                            .filter(|_| record.status != TaskStatus::Completed)
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                )
                .with("task_id", record.task.id.to_string())
                .with("status", format!("{:?}", record.status))
                .with("attempts", record.attempts.to_string());
                if let Some(err) = &record.last_error {
                    e = e.with("error", err.clone());
                }
                e
            });
        }
        for w in waiters {
            let _ = w.send((*record).clone());
        }
        self.wake.notify_one();
    }

    /// Puts a failed running task back into the delay queue for a retry.
    fn retry(&self, id: TaskId, after: Duration, error: String) {
        let now = Instant::now();
        let ops = {
            let mut st = self.state.lock();
            let seq = st.next_seq();
            let Some(entry) = st.tasks.get_mut(&id) else {
                return;
            };
            let agent = entry.record.assigned_agent;
            let critical = entry.record.task.priority == crate::types::Priority::Critical;
            entry.record.last_error = Some(error);
            entry.cancel = None;
            entry.seq = seq;
            let record = entry.record.clone();
            st.set_status(id, TaskStatus::Delayed);
            st.release_slot(agent, critical);
            st.stats.retried += 1;
            st.delayed.push(now + after, seq, id);
            if self.journal.is_some() {
                let mut record = record;
                record.status = TaskStatus::Delayed;
                put_op(&record).ok()
            } else {
                None
            }
        };
        if let (Some(journal), Some(op)) = (&self.journal, ops) {
            journal.submit(vec![op]);
        }
        self.wake.notify_one();
    }

    /// Releases the slot of an execution stopped by shutdown, leaving its record Running in
    /// the store so that the next start re-runs it.
    fn abandon(&self, id: TaskId) {
        let mut st = self.state.lock();
        let (agent, critical) = st
            .tasks
            .get(&id)
            .map(|e| {
                (
                    e.record.assigned_agent,
                    e.record.task.priority == crate::types::Priority::Critical,
                )
            })
            .unwrap_or((None, false));
        st.set_status(id, TaskStatus::Queued);
        st.release_slot(agent, critical);
        if let Some(e) = st.tasks.get_mut(&id) {
            // Waiters learn of the shutdown (SCHED_010) instead of waiting forever.
            e.waiters.clear();
            e.cancel = None;
        }
        drop(st);
        self.idle.notify_waiters();
    }

    fn sync_cron_locked(
        &self,
        st: &mut State,
        list: Vec<super::ScheduledAgent>,
        now: Instant,
        wall: SystemTime,
    ) {
        let mut seen = HashSet::new();
        for agent in list {
            seen.insert(agent.agent_id);
            let unchanged = st
                .cron
                .get(&agent.agent_id)
                .is_some_and(|c| c.schedule.expression() == agent.schedule);
            if unchanged {
                if let Some(c) = st.cron.get_mut(&agent.agent_id) {
                    c.priority = agent.priority;
                }
                continue;
            }
            match parse_cron(&agent.schedule) {
                Ok(schedule) => {
                    let Some(next_wall) = schedule.next_after(wall) else {
                        st.cron.remove(&agent.agent_id);
                        continue;
                    };
                    let delay = next_wall.duration_since(wall).unwrap_or_default();
                    tracing::debug!(agent = %agent.agent_id, schedule = %agent.schedule, "cron schedule registered");
                    st.cron.insert(
                        agent.agent_id,
                        CronEntry {
                            schedule,
                            priority: agent.priority,
                            next_wall,
                            next_due: now + delay,
                            active: None,
                        },
                    );
                }
                Err(e) => {
                    st.cron.remove(&agent.agent_id);
                    if st
                        .cron_invalid
                        .insert((agent.agent_id, agent.schedule.clone()))
                    {
                        tracing::warn!(agent = %agent.agent_id, error = %e, "invalid cron schedule ignored");
                        self.audit(|| {
                            AuditEvent::new(
                                AuditEventType::TaskFailed,
                                Some(agent.agent_id),
                                format!("cron schedule ignored: {e} ({})", e.code()),
                            )
                        });
                    }
                }
            }
        }
        st.cron.retain(|id, _| seen.contains(id));
    }

    fn fire_cron_locked(&self, st: &mut State, now: Instant, tick: &mut Tick) {
        let due: Vec<AgentId> = st
            .cron
            .iter()
            .filter(|(_, c)| c.next_due <= now)
            .map(|(id, _)| *id)
            .collect();
        for agent in due {
            let busy = st
                .cron
                .get(&agent)
                .and_then(|c| c.active)
                .and_then(|t| st.tasks.get(&t))
                .is_some_and(|e| !e.record.status.is_final());
            let timeout = self.config.task_timeout;
            let Some(c) = st.cron.get_mut(&agent) else {
                continue;
            };
            let mut skipped = 0u64;
            if busy {
                skipped += 1;
            } else {
                let task = ScheduledTask {
                    id: TaskId::new(),
                    agent_id: agent,
                    priority: c.priority,
                    scheduled_time: c.next_wall,
                    timeout,
                    retry_count: 0,
                };
                c.active = Some(task.id);
                tick.cron_tasks.push(task);
            }
            // Advance from the firing time (no drift); skip firings already missed.
            loop {
                let Some(next_wall) = c.schedule.next_after(c.next_wall) else {
                    c.next_due = now + Duration::from_secs(365 * 24 * 3600 * 100);
                    break;
                };
                let step = next_wall.duration_since(c.next_wall).unwrap_or_default();
                c.next_wall = next_wall;
                c.next_due += step;
                if c.next_due > now {
                    break;
                }
                skipped += 1;
            }
            st.stats.cron_skipped += skipped;
        }
    }

    async fn recover(&self, store: &dyn Store) -> Result<(), SchedulerError> {
        let rows = store.scan(TASKS_TABLE).map_err(|e| {
            SchedulerError::InvalidConfig(format!("cannot read the task table: {e}"))
        })?;
        let now = Instant::now();
        let wall = self.wall_now();
        let mut finished = Vec::new();
        let mut updates = Vec::new();
        let mut recovered = Vec::new();
        {
            let mut st = self.state.lock();
            for (key, bytes) in rows {
                let mut record: TaskRecord = match decode_json(TASKS_TABLE, &key, &bytes) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "skipping an unreadable task record");
                        continue;
                    }
                };
                let id = record.task.id;
                if let Some(k) = &record.idempotency_key {
                    st.idem.insert(k.clone(), id);
                }
                if record.status.is_final() {
                    finished.push((record.finished_at, id));
                } else {
                    let due = record
                        .task
                        .scheduled_time
                        .duration_since(wall)
                        .ok()
                        .filter(|d| !d.is_zero() && record.status == TaskStatus::Delayed)
                        .map(|d| now + d);
                    if record.status == TaskStatus::Running {
                        record.last_error = Some(format!(
                            "the runtime stopped during attempt {}; re-queued",
                            record.attempts
                        ));
                    }
                    record.recovered = true;
                    record.status = if due.is_some() {
                        TaskStatus::Delayed
                    } else {
                        TaskStatus::Queued
                    };
                    if let Ok(op) = put_op(&record) {
                        updates.push(op);
                    }
                    recovered.push((id, record.task.agent_id, record.attempts, due));
                }
                let status = record.status;
                let seq = st.next_seq();
                st.tasks.insert(
                    id,
                    Entry {
                        record,
                        seq,
                        rank: 0,
                        enqueued: false,
                        cancel: None,
                        waiters: Vec::new(),
                    },
                );
                st.count(status, 1);
            }
            finished.sort();
            st.finished = finished.into_iter().map(|(_, id)| id).collect();
            for (id, _, _, due) in &recovered {
                self.enqueue_locked(&mut st, *id, *due, now);
            }
            st.stats.recovered = recovered.len() as u64;
        }
        if let Some(journal) = &self.journal {
            if !updates.is_empty() {
                journal.write(updates).await.map_err(|e| {
                    SchedulerError::InvalidConfig(format!("cannot persist recovered tasks: {e}"))
                })?;
            }
        }
        for (id, agent, attempts, _) in recovered {
            tracing::info!(task = %id, %agent, attempts, "task recovered from the store");
            self.audit(|| {
                AuditEvent::new(
                    AuditEventType::TaskScheduled,
                    Some(agent),
                    format!("task {id} recovered after a restart ({attempts} attempt(s) so far)"),
                )
                .with("task_id", id.to_string())
                .with("recovered", "true")
            });
        }
        Ok(())
    }
}

#[derive(Default)]
struct Finished {
    record: Option<Box<TaskRecord>>,
    waiters: Vec<oneshot::Sender<TaskRecord>>,
    ops: Vec<crate::storage::StoreOp>,
}

#[derive(Default)]
struct Tick {
    jobs: Vec<Job>,
    finished: Vec<Finished>,
    cron_tasks: Vec<ScheduledTask>,
    next_wake: Option<Instant>,
    cron_sync_due: bool,
}

async fn dispatcher(shared: Arc<Shared>) {
    let mut cron_list = Some(shared.directory.scheduled_agents());
    loop {
        let tick = shared.tick(cron_list.take());
        for job in tick.jobs {
            tokio::spawn(execute(shared.clone(), job));
        }
        for f in tick.finished {
            shared.after_finish(f);
        }
        for task in tick.cron_tasks {
            let shared = shared.clone();
            tokio::spawn(async move {
                let id = task.id;
                let agent = task.agent_id;
                if let Err(e) = shared
                    .accept(task, TaskOptions::default(), TaskSource::Cron)
                    .await
                {
                    tracing::warn!(%agent, task = %id, error = %e, "cron firing not scheduled");
                }
            });
        }
        if tick.cron_sync_due {
            cron_list = Some(shared.directory.scheduled_agents());
            continue;
        }
        let sleep = async {
            match tick.next_wake {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = sleep => {}
        }
    }
    // Dropped or shut down: kill what still runs.
    shared.cancel_running();
    shared.idle.notify_waiters();
}

enum Outcome {
    Done(Result<TaskOutput, RuntimeError>),
    TimedOut,
    Stopped,
}

async fn execute(shared: Arc<Shared>, job: Job) {
    let Job {
        ctx,
        token,
        record,
        executor,
    } = job;
    let id = ctx.task_id;
    tracing::trace!(task = %id, agent = %ctx.agent_id, attempt = ctx.attempt, "execution starts");
    let prev = shared
        .unstarted
        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    if prev >= DISPATCH_WINDOW {
        shared.wake.notify_one();
    }
    if let (Some(journal), Some(record)) = (&shared.journal, &record) {
        // Write-ahead: the attempt is durable before the agent sees the task.
        let written = match put_op(record) {
            Ok(op) => journal.write(vec![op]).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            let f = {
                let mut st = shared.state.lock();
                shared.finish_locked(
                    &mut st,
                    id,
                    TaskStatus::Failed,
                    Some(format!("{}: attempt could not be persisted: {e}", e.code())),
                    Vec::new(),
                )
            };
            shared.after_finish(f);
            return;
        }
    }
    if shared.audit.is_some() {
        shared.audit(|| {
            AuditEvent::new(
                AuditEventType::TaskStarted,
                Some(ctx.agent_id),
                format!("task {id} started (attempt {})", ctx.attempt),
            )
            .with("task_id", id.to_string())
            .with("attempt", ctx.attempt.to_string())
        });
    }
    let outcome = {
        let run = executor.execute(&ctx);
        tokio::select! {
            biased;
            r = run => Outcome::Done(r),
            _ = token.cancelled() => Outcome::Stopped,
            _ = tokio::time::sleep(ctx.timeout) => Outcome::TimedOut,
        }
        // The execution future is dropped here, before the kill hook runs.
    };
    let stop_reason = match &outcome {
        Outcome::Done(_) => None,
        Outcome::TimedOut => Some(CancelReason::Timeout),
        Outcome::Stopped if shared.shutdown.is_cancelled() => Some(CancelReason::Shutdown),
        Outcome::Stopped => Some(CancelReason::Cancelled),
    };
    tracing::trace!(task = %id, ?stop_reason, "execution ended");
    if let Some(reason) = stop_reason {
        if let Err(e) = executor.cancel(&ctx, reason).await {
            tracing::error!(task = %id, agent = %ctx.agent_id, error = %e, ?reason, "killing the execution failed");
        }
    }
    let finish = |status: TaskStatus, error: Option<String>, output: Vec<u8>| {
        let f = {
            let mut st = shared.state.lock();
            shared.finish_locked(&mut st, id, status, error, output)
        };
        shared.after_finish(f);
    };
    match (outcome, stop_reason) {
        (_, Some(CancelReason::Shutdown)) => shared.abandon(id),
        (_, Some(CancelReason::Cancelled)) => finish(
            TaskStatus::Cancelled,
            Some(format!("SCHED_004: {}", SchedulerError::Cancelled(id))),
            Vec::new(),
        ),
        (Outcome::Done(Ok(output)), _) => {
            shared.policy.on_success(&ctx);
            finish(TaskStatus::Completed, None, output.data);
        }
        // A failure while the scheduler shuts down (typically the agent's program being
        // stopped under it) takes no recovery action: the task stays Running in the store
        // and runs again after the restart.
        (Outcome::Done(Err(error)), _) if shared.shutdown.is_cancelled() => {
            tracing::debug!(task = %id, error = %error, "task failed during shutdown; kept for the next start");
            shared.abandon(id);
        }
        (Outcome::Done(Err(error)), _) => {
            let text = format!("{}: {}", error.code(), error);
            match shared.policy.on_failure(&ctx, &error).await {
                RetryDecision::Retry { after } => shared.retry(id, after, text),
                RetryDecision::GiveUp { reason } => {
                    tracing::debug!(task = %id, %reason, error = %text, "task failed");
                    finish(TaskStatus::Failed, Some(reason), Vec::new())
                }
            }
        }
        (_, _) => {
            let error = RuntimeError::Scheduler(SchedulerError::Timeout {
                task: id,
                after: ctx.timeout,
            });
            let text = format!("{}: {}", error.code(), error);
            match shared.policy.on_failure(&ctx, &error).await {
                RetryDecision::Retry { after } => shared.retry(id, after, text),
                RetryDecision::GiveUp { reason } => {
                    tracing::debug!(task = %id, %reason, error = %text, "task timed out");
                    finish(TaskStatus::TimedOut, Some(reason), Vec::new())
                }
            }
        }
    }
}
