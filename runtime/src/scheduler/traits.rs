//! The seams through which the scheduler acts on agents: [`TaskExecutor`] (run and kill one
//! execution), [`AgentDirectory`] (which agents exist, their state, group and schedule),
//! [`LoadSource`] (live resource figures) and [`FailurePolicy`] (retry or give up).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;

use super::TaskSource;
use crate::error::RuntimeError;
use crate::lifecycle::DefaultLifecycleController;
use crate::types::{AgentId, AgentState, ExecutionMode, Priority, TaskId};

/// The metadata key naming an agent's group (`AgentConfig::metadata["group"]`), used by
/// [`super::TaskTarget::Group`].
pub const GROUP_METADATA_KEY: &str = "group";

/// One execution of a task, as the executor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskContext {
    /// The task.
    pub task_id: TaskId,
    /// The agent chosen to run it.
    pub agent_id: AgentId,
    /// `ScheduledTask::agent_id` as scheduled (differs from `agent_id` for group targets).
    pub requested_agent: AgentId,
    /// Its priority.
    pub priority: Priority,
    /// This execution's number, from 1 (a re-run after a crash of the runtime or a retry
    /// has a higher number).
    pub attempt: u32,
    /// `ScheduledTask::retry_count`: how many retries the task allows.
    pub max_retries: u32,
    /// The timeout in force for this execution.
    pub timeout: Duration,
    /// The caller's idempotency key, to let the agent detect a repeated execution.
    pub idempotency_key: Option<String>,
    /// The task's input.
    pub payload: Bytes,
    /// Where the task came from.
    pub source: TaskSource,
}

/// What a successful execution produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskOutput {
    /// The agent's result bytes.
    pub data: Vec<u8>,
}

/// Why the scheduler stops an execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// Its timeout elapsed.
    Timeout,
    /// [`super::DefaultScheduler::cancel_task`] was called.
    Cancelled,
    /// The scheduler is shutting down.
    Shutdown,
}

/// Runs tasks on agents. The runtime implements it with the sandbox tiers: an Ephemeral
/// agent gets a fresh sandbox per task, a Persistent one receives the task as a frame on its
/// I/O channel.
#[async_trait]
pub trait TaskExecutor: Send + Sync + 'static {
    /// Runs one execution to its end. The scheduler drops this future when the execution
    /// times out or is cancelled, then calls [`TaskExecutor::cancel`].
    async fn execute(&self, task: &TaskContext) -> Result<TaskOutput, RuntimeError>;

    /// Kills what the execution left running (its sandbox process, container or VM). Called
    /// after the execution future was dropped; must be idempotent. The task's concurrency
    /// slot is released only once this returns.
    async fn cancel(&self, task: &TaskContext, reason: CancelReason) -> Result<(), RuntimeError>;
}

/// An agent with a cron schedule (`ExecutionMode::Scheduled`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledAgent {
    /// The agent.
    pub agent_id: AgentId,
    /// Its cron expression.
    pub schedule: String,
    /// The priority of the tasks its schedule creates.
    pub priority: Priority,
}

/// What the scheduler needs to know about agents. Calls are synchronous and cheap (an
/// in-memory lookup).
pub trait AgentDirectory: Send + Sync + 'static {
    /// The agent's state, or `None` when it is unknown.
    fn state(&self, agent: AgentId) -> Option<AgentState>;
    /// The agents of a group (in any state).
    fn group_members(&self, group: &str) -> Vec<AgentId>;
    /// The live agents with a cron schedule.
    fn scheduled_agents(&self) -> Vec<ScheduledAgent>;
}

impl AgentDirectory for DefaultLifecycleController {
    fn state(&self, agent: AgentId) -> Option<AgentState> {
        self.get_state(agent).ok()
    }

    fn group_members(&self, group: &str) -> Vec<AgentId> {
        let mut members: Vec<AgentId> = self
            .list_agents()
            .into_iter()
            .filter(|a| {
                a.config
                    .metadata
                    .get(GROUP_METADATA_KEY)
                    .map(String::as_str)
                    == Some(group)
            })
            .map(|a| a.id)
            .collect();
        members.sort();
        members
    }

    fn scheduled_agents(&self) -> Vec<ScheduledAgent> {
        self.list_agents()
            .into_iter()
            .filter(|a| !matches!(a.state, AgentState::Terminating | AgentState::Terminated))
            .filter_map(|a| match &a.config.execution_mode {
                ExecutionMode::Scheduled { schedule } => Some(ScheduledAgent {
                    agent_id: a.id,
                    schedule: schedule.clone(),
                    priority: a.config.priority,
                }),
                _ => None,
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
struct TableEntry {
    state: AgentState,
    group: Option<String>,
    schedule: Option<(String, Priority)>,
}

/// A standalone [`AgentDirectory`]: the agents a [`super::DefaultScheduler`] built with
/// [`super::DefaultScheduler::new`] knows, registered by hand. The runtime uses the
/// lifecycle controller instead.
#[derive(Debug, Default)]
pub struct AgentTable {
    agents: RwLock<HashMap<AgentId, TableEntry>>,
}

impl AgentTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an agent as Ready, optionally in a group.
    pub fn register(&self, agent: AgentId, group: Option<&str>) {
        self.agents.write().insert(
            agent,
            TableEntry {
                state: AgentState::Ready,
                group: group.map(str::to_string),
                schedule: None,
            },
        );
    }

    /// Sets an agent's state (unknown agents are ignored).
    pub fn set_state(&self, agent: AgentId, state: AgentState) {
        if let Some(e) = self.agents.write().get_mut(&agent) {
            e.state = state;
        }
    }

    /// Gives an agent a cron schedule (unknown agents are ignored).
    pub fn set_schedule(&self, agent: AgentId, schedule: &str, priority: Priority) {
        if let Some(e) = self.agents.write().get_mut(&agent) {
            e.schedule = Some((schedule.to_string(), priority));
        }
    }

    /// Forgets an agent.
    pub fn remove(&self, agent: AgentId) {
        self.agents.write().remove(&agent);
    }
}

impl AgentDirectory for AgentTable {
    fn state(&self, agent: AgentId) -> Option<AgentState> {
        self.agents.read().get(&agent).map(|e| e.state)
    }

    fn group_members(&self, group: &str) -> Vec<AgentId> {
        let mut members: Vec<AgentId> = self
            .agents
            .read()
            .iter()
            .filter(|(_, e)| e.group.as_deref() == Some(group))
            .map(|(id, _)| *id)
            .collect();
        members.sort();
        members
    }

    fn scheduled_agents(&self) -> Vec<ScheduledAgent> {
        self.agents
            .read()
            .iter()
            .filter(|(_, e)| !matches!(e.state, AgentState::Terminating | AgentState::Terminated))
            .filter_map(|(id, e)| {
                e.schedule.as_ref().map(|(s, p)| ScheduledAgent {
                    agent_id: *id,
                    schedule: s.clone(),
                    priority: *p,
                })
            })
            .collect()
    }
}

/// Live resource usage of one agent, as fractions of its own limits (1.0 = at the limit).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AgentLoad {
    /// CPU used over the last sample, as a fraction of `cpu_cores`.
    pub cpu: f64,
    /// Memory in use, as a fraction of `memory_mb`.
    pub memory: f64,
}

impl AgentLoad {
    /// The most loaded of the two figures.
    pub fn pressure(&self) -> f64 {
        self.cpu.max(self.memory)
    }
}

/// Live resource figures per agent; the resource manager implements it from its cgroup /
/// Docker / VM samples.
pub trait LoadSource: Send + Sync + 'static {
    /// The agent's latest figures, or `None` when none were sampled yet.
    fn load(&self, agent: AgentId) -> Option<AgentLoad>;
}

/// What to do after a failed execution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Run the task again after this delay.
    Retry {
        /// Delay before the retry becomes ready.
        after: Duration,
    },
    /// Stop: the task ends Failed (or TimedOut) with this reason.
    GiveUp {
        /// Why.
        reason: String,
    },
}

/// Decides whether a failed execution is retried. The error handler's
/// [`crate::error_handler::RecoveryPolicy`] implements it (classify, recover the agent,
/// back off); [`RetryCountPolicy`] is the built-in default.
#[async_trait]
pub trait FailurePolicy: Send + Sync + 'static {
    /// Called after an execution failed or timed out (never after a cancellation).
    async fn on_failure(&self, task: &TaskContext, error: &RuntimeError) -> RetryDecision;
    /// Called after an execution succeeded.
    fn on_success(&self, _task: &TaskContext) {}
}

/// The default policy: retry while `attempt <= retry_count`, after `base × 2^(attempt−1)`
/// capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryCountPolicy {
    /// First delay.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl RetryCountPolicy {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[async_trait]
impl FailurePolicy for RetryCountPolicy {
    async fn on_failure(&self, task: &TaskContext, error: &RuntimeError) -> RetryDecision {
        if task.attempt <= task.max_retries {
            RetryDecision::Retry {
                after: self.delay(task.attempt),
            }
        } else {
            RetryDecision::GiveUp {
                reason: format!(
                    "{}: {} (after {} attempt{})",
                    error.code(),
                    error,
                    task.attempt,
                    if task.attempt == 1 { "" } else { "s" }
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_count_policy_doubles_and_caps() {
        let p = RetryCountPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_millis(500),
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(400));
        assert_eq!(p.delay(4), Duration::from_millis(500));
        assert_eq!(p.delay(400), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn lifecycle_controller_is_a_directory_with_groups_and_schedules() {
        use crate::lifecycle::{DefaultLifecycleController, LifecycleConfig};
        use crate::types::AgentConfig;
        let lc = DefaultLifecycleController::new(LifecycleConfig::default())
            .await
            .expect("controller");
        let mut a = AgentConfig::default();
        a.metadata
            .insert(GROUP_METADATA_KEY.into(), "workers".into());
        let b = AgentConfig {
            execution_mode: ExecutionMode::Scheduled {
                schedule: "*/5 * * * * *".into(),
            },
            priority: Priority::High,
            ..Default::default()
        };
        let a_id = lc.create_agent(a).await.expect("a");
        let b_id = lc.create_agent(b).await.expect("b");
        assert_eq!(lc.state(a_id), Some(AgentState::Ready));
        assert_eq!(AgentDirectory::group_members(&lc, "workers"), vec![a_id]);
        assert_eq!(
            lc.scheduled_agents(),
            vec![ScheduledAgent {
                agent_id: b_id,
                schedule: "*/5 * * * * *".into(),
                priority: Priority::High
            }]
        );
        assert_eq!(lc.state(AgentId::new()), None);
    }
}
