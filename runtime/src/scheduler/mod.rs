//! Task scheduler: a bounded priority queue with aging, delayed and cron tasks, a hard
//! concurrency cap, timeouts that kill the execution, cancellation, load balancing across
//! agents from their live load, and write-ahead durable task records.
//!
//! The scheduler acts on agents only through narrow traits that the runtime implements:
//! - [`TaskExecutor`] runs one task on one agent (a fresh sandbox per task for an Ephemeral
//!   agent, a frame over the I/O channel for a Persistent one) and kills it on
//!   [`TaskExecutor::cancel`];
//! - [`AgentDirectory`] says which agents exist, their state, their group and their cron
//!   schedule (implemented for [`crate::lifecycle::DefaultLifecycleController`] and by the
//!   standalone [`AgentTable`]);
//! - [`LoadSource`] gives live resource figures for `ResourceBased` placement;
//! - [`FailurePolicy`] decides whether a failed task is retried (the error handler's
//!   [`crate::error_handler::RecoveryPolicy`] plugs in here).
//!
//! # Ordering and aging
//! Ready tasks are served in strict priority order (Critical > High > Normal > Low), FIFO
//! within a priority, with **aging**: a task gains one priority level for every
//! `aging_interval` it has waited in the ready queue. Formally each ready task has the rank
//! `ready_since − level × aging_interval` (level: Low 0, Normal 1, High 2, Critical 3) and
//! the smallest rank runs first. Tasks that became ready within one `aging_interval` of each
//! other are therefore served strictly by priority, and a Low task is overtaken by at most
//! the tasks that became ready before `ready_since + 3 × aging_interval`: it is never starved.
//! `critical_reserved_slots` of the `max_concurrent_tasks` slots are usable by Critical tasks
//! only, so a Critical task starts at once even when other work fills the queue and every
//! other slot.
//!
//! # Durability
//! With a store ([`SchedulerParts::store`]) every task record is written ahead:
//! [`DefaultScheduler::schedule_task`] returns only once the record is committed, and an
//! execution starts only once its attempt is committed. Writes are group-committed by one
//! writer thread. After a crash (even `kill -9`) the next scheduler built on the same store
//! re-queues every task that was queued, delayed or running: execution is **at least once**.
//! A task that was running at the crash runs again with `attempt = attempts + 1`; its
//! [`TaskRecord::attempts`] shows how many executions were started and
//! [`TaskRecord::recovered`] is set. Give a task an idempotency key
//! ([`TaskOptions::idempotency_key`]) to detect duplicates: scheduling the same key again
//! returns the first task's id with [`ScheduleReceipt::duplicate`] set, and executors see the
//! key and the attempt number in [`TaskContext`].
//!
//! # Example (the seed's)
//! ```
//! # use std::time::{Duration, SystemTime};
//! # use symbiont_runtime::{AgentId, Priority, TaskId};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let agent_id = AgentId::new();
//! use symbiont_runtime::scheduler::*;
//!
//! let config = SchedulerConfig {
//!     max_concurrent_tasks: 100,
//!     task_timeout: Duration::from_secs(300),
//!     load_balancing_strategy: LoadBalancingStrategy::ResourceBased,
//!     // ... other config
//! #   ..Default::default()
//! };
//!
//! let scheduler = DefaultScheduler::new(config).await?;
//! # scheduler.agents().expect("standalone scheduler").register(agent_id, None);
//!
//! // Schedule a task
//! let task = ScheduledTask {
//!     id: TaskId::new(),
//!     agent_id,
//!     priority: Priority::High,
//!     scheduled_time: SystemTime::now(),
//!     timeout: Duration::from_secs(60),
//!     retry_count: 0,
//! };
//!
//! scheduler.schedule_task(task).await?;
//! # assert_eq!(scheduler.stats().queued, 1);
//! # Ok(())
//! # }
//! ```

mod balance;
mod cron_schedule;
mod engine;
mod journal;
mod queue;
mod traits;

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};
use crate::types::{AgentId, Priority, TaskId};

pub use cron_schedule::{parse_cron, CronSchedule};
pub use engine::{DefaultScheduler, SchedulerParts, SchedulerStats};
pub use traits::{
    AgentDirectory, AgentLoad, AgentTable, CancelReason, FailurePolicy, LoadSource,
    RetryCountPolicy, RetryDecision, ScheduledAgent, TaskContext, TaskExecutor, TaskOutput,
    GROUP_METADATA_KEY,
};

/// The store table holding task records (key: task id).
pub const TASKS_TABLE: &str = "scheduler_tasks";

/// How a task is placed among the agents able to take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LoadBalancingStrategy {
    /// In turn.
    RoundRobin,
    /// The one with the fewest running tasks.
    LeastConnections,
    /// The one with the most headroom by live resource usage.
    #[default]
    ResourceBased,
}

/// `[scheduler]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Hard cap on tasks running at once.
    pub max_concurrent_tasks: usize,
    /// Default timeout of a task, and the ceiling of a task's own timeout.
    #[serde(with = "humantime_serde")]
    pub task_timeout: Duration,
    /// Placement strategy.
    pub load_balancing_strategy: LoadBalancingStrategy,
    /// Slots of `max_concurrent_tasks` that only Critical tasks may use (at most
    /// `max_concurrent_tasks − 1`), so that a Critical task starts at once even when the
    /// others fill every other slot and the queue. The cap still holds for all tasks.
    pub critical_reserved_slots: usize,
    /// Most tasks waiting (queued, delayed or waiting for their agent) at once; beyond it
    /// `schedule_task` fails with SCHED_001 "queue full".
    pub max_queued_tasks: usize,
    /// A waiting task gains one priority level per `aging_interval` waited.
    #[serde(with = "humantime_serde")]
    pub aging_interval: Duration,
    /// First delay of the built-in retry policy (doubles per attempt).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest delay of the built-in retry policy.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// How often tasks whose agent is not available (initializing, suspended, failed) are
    /// checked again.
    #[serde(with = "humantime_serde")]
    pub agent_wait_recheck: Duration,
    /// How often the agents' cron schedules are re-read from the directory.
    #[serde(with = "humantime_serde")]
    pub cron_sync_interval: Duration,
    /// Finished tasks kept (in memory and in the store) for status queries and duplicate
    /// detection; the oldest are forgotten beyond it.
    pub finished_task_retention: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_tasks: 100,
            task_timeout: Duration::from_secs(300),
            load_balancing_strategy: LoadBalancingStrategy::ResourceBased,
            critical_reserved_slots: 5,
            max_queued_tasks: 10_000,
            aging_interval: Duration::from_secs(10),
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            agent_wait_recheck: Duration::from_millis(250),
            cron_sync_interval: Duration::from_secs(5),
            finished_task_retention: 10_000,
        }
    }
}

impl Validate for SchedulerConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.max_concurrent_tasks == 0 {
            issues.push(ConfigIssue::new(
                "scheduler.max_concurrent_tasks",
                "must be at least 1",
            ));
        }
        if self.max_queued_tasks == 0 {
            issues.push(ConfigIssue::new(
                "scheduler.max_queued_tasks",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("scheduler.task_timeout", self.task_timeout),
            ("scheduler.aging_interval", self.aging_interval),
            ("scheduler.agent_wait_recheck", self.agent_wait_recheck),
            ("scheduler.cron_sync_interval", self.cron_sync_interval),
        ] {
            if value.is_zero() {
                issues.push(ConfigIssue::new(key, "must be longer than 0s"));
            }
        }
        if self.retry_backoff > self.retry_backoff_max {
            issues.push(ConfigIssue::new(
                "scheduler.retry_backoff",
                "must not be longer than scheduler.retry_backoff_max",
            ));
        }
    }
}

/// One task to run on an agent. The field set is the seed's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledTask {
    /// The task's identity.
    pub id: TaskId,
    /// The agent that runs it (with a [`TaskTarget::Group`] target: the requesting agent,
    /// recorded but not used for placement).
    pub agent_id: AgentId,
    /// Its priority.
    pub priority: Priority,
    /// Not before this time (a time in the past or now: as soon as possible).
    pub scheduled_time: SystemTime,
    /// Longest one execution may run (capped by `scheduler.task_timeout`; 0 = that default).
    pub timeout: Duration,
    /// How many times a failed or timed-out execution is retried (0 = run once).
    pub retry_count: u32,
}

/// Which agents may run a task.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskTarget {
    /// Exactly this agent.
    Agent(AgentId),
    /// Any agent of this group (replicas), chosen by the load-balancing strategy. An agent's
    /// group is its `metadata["group"]` ([`GROUP_METADATA_KEY`]).
    Group(String),
}

/// Extra options of [`DefaultScheduler::schedule_task_with`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskOptions {
    /// Input handed to the executor (and so to the agent's program).
    pub payload: Vec<u8>,
    /// A caller-chosen key: scheduling a second task with the same key returns the first
    /// task instead (while the first is remembered, see `finished_task_retention`).
    pub idempotency_key: Option<String>,
    /// Where to run (default: `TaskTarget::Agent(task.agent_id)`).
    pub target: Option<TaskTarget>,
}

/// What [`DefaultScheduler::schedule_task_with`] accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleReceipt {
    /// The task's id (the earlier task's when `duplicate`).
    pub task_id: TaskId,
    /// True when the idempotency key was already known and nothing new was scheduled.
    pub duplicate: bool,
}

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskStatus {
    /// Waiting for its `scheduled_time` (or for a retry's backoff).
    Delayed,
    /// In the ready queue.
    Queued,
    /// Ready, but its agent (or every agent of its group) is not available yet
    /// (created, initializing, suspended or failed).
    Waiting,
    /// Executing.
    Running,
    /// Finished successfully. Final.
    Completed,
    /// Failed (error, or a timeout with no retry left, or its agent was terminated). Final.
    Failed,
    /// Its last execution exceeded its timeout and was killed; no retry left. Final.
    TimedOut,
    /// Cancelled. Final.
    Cancelled,
}

impl TaskStatus {
    /// True for the states a task never leaves.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TaskStatus::Completed
                | TaskStatus::Failed
                | TaskStatus::TimedOut
                | TaskStatus::Cancelled
        )
    }
}

/// Where a task came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskSource {
    /// `schedule_task` / `schedule_task_with`.
    Api,
    /// The agent's cron schedule (`ExecutionMode::Scheduled`).
    Cron,
}

/// Everything known about one task; what the store holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task as scheduled.
    pub task: ScheduledTask,
    /// Where it may run.
    pub target: TaskTarget,
    /// Its input.
    #[serde(with = "hex_bytes")]
    pub payload: Vec<u8>,
    /// The caller's idempotency key.
    pub idempotency_key: Option<String>,
    /// Where it came from.
    pub source: TaskSource,
    /// Its status.
    pub status: TaskStatus,
    /// Executions started so far (a re-run after a crash counts).
    pub attempts: u32,
    /// The agent of the last execution.
    pub assigned_agent: Option<AgentId>,
    /// The last error, as `CODE: message`.
    pub last_error: Option<String>,
    /// The output of the successful execution.
    #[serde(with = "hex_bytes")]
    pub output: Vec<u8>,
    /// True when it was re-queued after a restart of the runtime.
    pub recovered: bool,
    /// When it was accepted.
    pub created_at: SystemTime,
    /// When its last execution started.
    pub started_at: Option<SystemTime>,
    /// When it reached a final status.
    pub finished_at: Option<SystemTime>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Errors of the scheduler.
#[derive(Debug, Error)]
pub enum SchedulerError {
    /// The task cannot be scheduled; says why (unknown agent, queue full, agent terminated,
    /// empty group, duplicate id, not persisted).
    #[error("task scheduling failed: {0}")]
    SchedulingFailed(String),
    /// No task with this id (or it was forgotten after `finished_task_retention`).
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// An execution exceeded its timeout and was killed.
    #[error("task {task} timed out after {}", humantime::format_duration(*after))]
    Timeout {
        /// The task.
        task: TaskId,
        /// The timeout in force.
        after: Duration,
    },
    /// The task was cancelled.
    #[error("task {0} was cancelled")]
    Cancelled(TaskId),
    /// The task's execution failed (the agent's program reported an error).
    #[error("task {task} failed: {reason}")]
    ExecutionFailed {
        /// The task.
        task: TaskId,
        /// Why.
        reason: String,
    },
    /// The execution was cut off because the agent's long-lived program ended; the runtime
    /// restarts the program (once, from its exit) and the task is retried on it.
    #[error("task interrupted on agent {agent}: {reason}")]
    Interrupted {
        /// The agent.
        agent: AgentId,
        /// What happened.
        reason: String,
    },
    /// The agent's program died while running the task (a crash, not a reported error).
    #[error("agent {agent} crashed: {reason}")]
    AgentCrashed {
        /// The agent.
        agent: AgentId,
        /// What happened (exit code, signal).
        reason: String,
    },
    /// The agent's sandbox hit one of its resource limits while running the task
    /// (killed by the memory limit, by its execution timeout, ...).
    #[error("agent {agent} exceeded its {limit} limit")]
    LimitExceeded {
        /// The agent.
        agent: AgentId,
        /// Which limit (`memory`, `cpu`, `pids`, `execution_timeout`, ...).
        limit: String,
    },
    /// The task already finished; it cannot be cancelled.
    #[error("task {task} already finished ({status:?})")]
    AlreadyFinished {
        /// The task.
        task: TaskId,
        /// Its final status.
        status: TaskStatus,
    },
    /// A cron expression could not be parsed.
    #[error("invalid cron schedule `{expression}`: {reason}")]
    InvalidSchedule {
        /// The expression.
        expression: String,
        /// The parser's explanation.
        reason: String,
    },
    /// The scheduler's configuration is unusable.
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(String),
    /// The scheduler was shut down.
    #[error("the scheduler is shut down")]
    ShutDown,
}

impl SchedulerError {
    /// Stable code: SCHED_001 scheduling failed, SCHED_002 task not found, SCHED_003
    /// timeout, SCHED_004 cancelled, SCHED_005 execution failed, SCHED_006 agent crashed,
    /// SCHED_007 limit exceeded, SCHED_008 already finished, SCHED_009 invalid cron
    /// schedule, SCHED_010 shut down, SCHED_011 interrupted by a program restart,
    /// CONFIG_001 invalid configuration.
    pub fn code(&self) -> &'static str {
        match self {
            SchedulerError::SchedulingFailed(_) => "SCHED_001",
            SchedulerError::TaskNotFound(_) => "SCHED_002",
            SchedulerError::Timeout { .. } => "SCHED_003",
            SchedulerError::Cancelled(_) => "SCHED_004",
            SchedulerError::ExecutionFailed { .. } => "SCHED_005",
            SchedulerError::AgentCrashed { .. } => "SCHED_006",
            SchedulerError::LimitExceeded { .. } => "SCHED_007",
            SchedulerError::AlreadyFinished { .. } => "SCHED_008",
            SchedulerError::InvalidSchedule { .. } => "SCHED_009",
            SchedulerError::ShutDown => "SCHED_010",
            SchedulerError::Interrupted { .. } => "SCHED_011",
            SchedulerError::InvalidConfig(_) => "CONFIG_001",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_zero_cap_is_not() {
        let mut issues = Vec::new();
        SchedulerConfig::default().validate(&mut issues);
        assert!(issues.is_empty(), "{issues:?}");
        SchedulerConfig {
            max_concurrent_tasks: 0,
            aging_interval: Duration::ZERO,
            ..Default::default()
        }
        .validate(&mut issues);
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            ["scheduler.max_concurrent_tasks", "scheduler.aging_interval"]
        );
    }

    #[test]
    fn task_record_round_trips_through_json_with_binary_payload() {
        let record = TaskRecord {
            task: ScheduledTask {
                id: TaskId::new(),
                agent_id: AgentId::new(),
                priority: Priority::Low,
                scheduled_time: SystemTime::now(),
                timeout: Duration::from_millis(1500),
                retry_count: 2,
            },
            target: TaskTarget::Group("workers".into()),
            payload: vec![0, 159, 255],
            idempotency_key: Some("k".into()),
            source: TaskSource::Api,
            status: TaskStatus::Running,
            attempts: 1,
            assigned_agent: None,
            last_error: None,
            output: Vec::new(),
            recovered: false,
            created_at: SystemTime::now(),
            started_at: None,
            finished_at: None,
        };
        let json = serde_json::to_vec(&record).expect("encode");
        let back: TaskRecord = serde_json::from_slice(&json).expect("decode");
        assert_eq!(record, back);
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(
            SchedulerError::SchedulingFailed("x".into()).code(),
            "SCHED_001"
        );
        assert_eq!(
            SchedulerError::TaskNotFound(TaskId::new()).code(),
            "SCHED_002"
        );
        assert_eq!(
            SchedulerError::Timeout {
                task: TaskId::new(),
                after: Duration::from_secs(1)
            }
            .code(),
            "SCHED_003"
        );
    }
}
