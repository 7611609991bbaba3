//! Task scheduler: a priority queue with aging, delayed and cron tasks, a hard concurrency
//! cap, load balancing across agents, and durable task records.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};

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
    /// Default timeout of a task.
    #[serde(with = "humantime_serde")]
    pub task_timeout: Duration,
    /// Placement strategy.
    pub load_balancing_strategy: LoadBalancingStrategy,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_tasks: 100,
            task_timeout: Duration::from_secs(300),
            load_balancing_strategy: LoadBalancingStrategy::ResourceBased,
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
        if self.task_timeout.is_zero() {
            issues.push(ConfigIssue::new(
                "scheduler.task_timeout",
                "must be longer than 0s",
            ));
        }
    }
}

/// Errors of the scheduler.
#[derive(Debug, Error)]
pub enum SchedulerError {
    /// The task cannot be scheduled; says why.
    #[error("task scheduling failed: {0}")]
    SchedulingFailed(String),
}

impl SchedulerError {
    /// Stable code: SCHED_001 scheduling failed.
    pub fn code(&self) -> &'static str {
        match self {
            SchedulerError::SchedulingFailed(_) => "SCHED_001",
        }
    }
}
