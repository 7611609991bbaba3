//! What a parsed agent definition says: metadata, the program, its files, capabilities and
//! limits, its handlers and its policy statements.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::diagnostics::Diagnostics;
use crate::policy::PolicyStatement;
use crate::types::{Capability, SecurityTier};

/// A parsed and checked agent definition.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentDefinition {
    /// The agent's name (`agent NAME { ... }`).
    pub name: String,
    /// `version = "1.2.0"` (semantic version).
    pub version: Option<String>,
    /// `description = "..."`.
    pub description: Option<String>,
    /// `tier = native|docker|gvisor|microvm`.
    pub tier: Option<SecurityTier>,
    /// `image = "..."`: base image for container and VM tiers.
    pub image: Option<String>,
    /// `workdir = "/workspace/sub"`: working directory inside the sandbox.
    pub workdir: Option<PathBuf>,
    /// `run [...]`: the program and its arguments.
    pub argv: Vec<String>,
    /// `env NAME = "value"` / `env { ... }`.
    pub env: BTreeMap<String, String>,
    /// `file "path" = "..."` / `file "path" from "host"`.
    pub files: Vec<WorkspaceFile>,
    /// `capabilities [...]`, as written.
    pub capabilities: Vec<Capability>,
    /// `limits { ... }`.
    pub limits: LimitOverrides,
    /// `on start|message|schedule ...`.
    pub handlers: Vec<Handler>,
    /// The statements of every `policy { ... }` block, in order.
    pub policy: Vec<PolicyStatement>,
    /// Warnings found while checking (never errors: a definition with errors is refused).
    pub warnings: Diagnostics,
}

/// A file placed in the workspace before the program starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceFile {
    /// Path relative to the workspace.
    pub path: PathBuf,
    /// Unix permission bits (default `0o644`).
    pub mode: u32,
    /// The bytes (inline content, or the host file's contents read at load time).
    pub contents: Vec<u8>,
    /// The host file it was read from, when given with `from`.
    pub host_path: Option<PathBuf>,
}

/// `limits { ... }`: every field optional; see `docs/dsl.md` for how they merge with
/// `AgentConfig::resource_limits`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitOverrides {
    /// `memory = 256MiB`
    pub memory_mb: Option<u64>,
    /// `cpu = 0.5`
    pub cpu_cores: Option<f64>,
    /// `disk_io = 20` (MB/s)
    pub disk_io_mbps: Option<u64>,
    /// `network_io = 5` (Mb/s)
    pub network_io_mbps: Option<u64>,
    /// `timeout = 30s`
    pub execution_timeout: Option<Duration>,
    /// `idle_timeout = 5m`
    pub idle_timeout: Option<Duration>,
}

/// What the runtime does with a handler's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandlerOutput {
    /// Nothing is sent.
    None,
    /// The output is sent back to the message's sender on this topic.
    Reply {
        /// Topic of the reply.
        topic: String,
    },
    /// The output is published on this topic.
    Publish {
        /// Topic it is published on.
        topic: String,
    },
}

impl HandlerOutput {
    /// The topic the output goes to, if any.
    pub fn topic(&self) -> Option<&str> {
        match self {
            HandlerOutput::None => None,
            HandlerOutput::Reply { topic } | HandlerOutput::Publish { topic } => Some(topic),
        }
    }
}

/// A validated cron schedule (5-field `min hour dom mon dow`, or 6/7-field with seconds
/// first and an optional year).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CronSchedule {
    /// The expression as written.
    pub expression: String,
    /// The expression with a seconds field (`0 ` prepended to 5-field forms), as the `cron`
    /// crate reads it.
    pub normalized: String,
}

impl CronSchedule {
    /// Parses and validates an expression; the error says what is wrong.
    pub fn parse(expression: &str) -> Result<Self, String> {
        let fields = expression.split_whitespace().count();
        let normalized = match fields {
            5 => format!("0 {}", expression.trim()),
            6 | 7 => expression.split_whitespace().collect::<Vec<_>>().join(" "),
            n => {
                return Err(format!(
                    "a cron schedule has 5 fields (minute hour day-of-month month day-of-week) \
                     or 6-7 with seconds first and an optional year; this one has {n}"
                ))
            }
        };
        cron::Schedule::from_str(&normalized).map_err(|e| {
            // The crate's message repeats the expression with a caret; keep its last line.
            let text = e.to_string();
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty() && l.trim() != "^")
                .unwrap_or("invalid expression")
                .trim()
                .to_string()
        })?;
        Ok(CronSchedule {
            expression: expression.to_string(),
            normalized,
        })
    }

    /// The first time strictly after `after` (UTC) the schedule fires.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        let schedule = cron::Schedule::from_str(&self.normalized).ok()?;
        let after: chrono::DateTime<chrono::Utc> = after.into();
        schedule.after(&after).next().map(SystemTime::from)
    }
}

/// When a handler runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// Once, when the agent's program has started.
    Start,
    /// When a message arrives on this topic (and the receive policy allows it).
    Message {
        /// The topic.
        topic: String,
    },
    /// On a cron schedule (UTC).
    Schedule(CronSchedule),
}

/// One handler: the scheduler and the bus drive it, the program receives a frame naming it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handler {
    /// Its name: `as NAME`, or `start`, `message:TOPIC`, `schedule:EXPR`. Policies name
    /// handlers in `exec` rules; frames to the program carry it.
    pub name: String,
    /// When it runs.
    pub trigger: Trigger,
    /// Where its output goes.
    pub output: HandlerOutput,
    /// Longest one run may take (`timeout 10s`); `None`: the agent's execution timeout.
    pub timeout: Option<Duration>,
}
