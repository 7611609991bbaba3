//! The HTTP API's wire types, shared by the daemon (`server`) and the CLI's client.
//!
//! These are the API's contract, deliberately decoupled from the runtime's internal
//! structs: times are RFC 3339 strings, binary data is offered both as UTF-8 text (when it
//! is text) and base64, enums are lower-case strings. Each type derives `ToSchema` so the
//! OpenAPI document (`GET /openapi.json`) describes exactly what is sent.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use symbiont_runtime::communication::DeadLetter;
use symbiont_runtime::integrations::audit_trail::{AuditRecord, VerifyReport};
use symbiont_runtime::resource::ResourceUsage;
use symbiont_runtime::runtime::{AgentStatus, HealthReport, LogLine, TaskInput};
use symbiont_runtime::scheduler::{TaskRecord, TaskTarget};
use symbiont_runtime::{AgentState, Priority};
use utoipa::ToSchema;
use uuid::Uuid;

/// The body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// One error: its stable code, a human message and the HTTP status.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code (`AGENT_001`, `API_002`, ...): see `docs/errors.md` and `docs/service.md`.
    pub code: String,
    /// What went wrong and, where it helps, what to do.
    pub message: String,
    /// The HTTP status code of the response.
    pub status: u16,
}

/// `GET /health`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthView {
    /// `ok` when every component answers.
    pub status: String,
    /// The daemon's version.
    pub version: String,
    /// Seconds since the runtime started.
    pub uptime_secs: u64,
    /// Number of agents by state (`running`, `ready`, ...).
    pub agents: BTreeMap<String, usize>,
    /// What each sandbox tier's probe found on this host.
    pub tiers: Vec<TierView>,
}

/// A sandbox tier available on this host.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TierView {
    /// `native`, `docker`, `gvisor` or `microvm`.
    pub tier: String,
    /// The backend implementing it.
    pub backend: String,
    /// Versions and details found by the probe.
    pub details: String,
    /// Warnings the operator should see.
    pub warnings: Vec<String>,
}

impl From<HealthReport> for HealthView {
    fn from(h: HealthReport) -> Self {
        HealthView {
            status: h.status,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: h.uptime_secs,
            agents: h
                .agents
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            tiers: h
                .tiers
                .into_iter()
                .map(|t| TierView {
                    tier: t.tier.name().to_string(),
                    backend: t.backend,
                    details: t.details,
                    warnings: t.warnings,
                })
                .collect(),
        }
    }
}

/// `POST /v1/agents`: create an agent from a definition's text, or from a JSON
/// `AgentConfig` (whose `dsl_source` holds the definition), or both (the definition then
/// replaces `config.dsl_source` and names the agent unless `config.name` is set).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentRequest {
    /// The agent definition (the text of a `.agent` file; see `docs/dsl.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// Absolute directory on the daemon's host that `file ... from` paths of the definition
    /// are read from (the CLI sends the definition file's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dir: Option<String>,
    /// The agent's configuration (the runtime's `AgentConfig`; every field but `name` is
    /// optional). With `definition`, `name` may be left empty to take the definition's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<AgentConfigSchema>)]
    pub config: Option<serde_json::Value>,
    /// Start the agent once it is initialized (default true). With false, the agent is
    /// registered, its definition compiled and its sandbox prepared, and it waits in
    /// `ready` for `POST /v1/agents/{id}/start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<bool>,
}

/// The runtime's `AgentConfig` as JSON (documentation of `CreateAgentRequest.config`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigSchema {
    /// The agent's id (a fresh one when absent). Clients may choose it to follow the
    /// agent's progress while the create request is in flight.
    pub id: Option<Uuid>,
    /// A human-readable name.
    pub name: String,
    /// The agent definition (see `docs/dsl.md`).
    pub dsl_source: Option<String>,
    /// `"Persistent"` (default), `"Ephemeral"`, `"EventDriven"` or
    /// `{"Scheduled": {"schedule": "0 */5 * * * *"}}`.
    #[schema(value_type = Object)]
    pub execution_mode: Option<serde_json::Value>,
    /// `Native` (default), `Tier1` (Docker), `Tier2` (gVisor), `Tier3` (microVM).
    pub security_tier: Option<String>,
    /// Resource limits.
    pub resource_limits: Option<ResourceLimitsSchema>,
    /// `FileSystem`, `Network`, `Messaging` or `{"Custom": "name"}`.
    #[schema(value_type = Vec<Object>)]
    pub capabilities: Option<Vec<serde_json::Value>>,
    /// Extra policy statements (`"deny network"`).
    pub policies: Option<Vec<String>>,
    /// Free-form labels.
    pub metadata: Option<BTreeMap<String, String>>,
    /// `Low`, `Normal` (default), `High`, `Critical`.
    pub priority: Option<String>,
}

/// The runtime's `ResourceLimits` as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimitsSchema {
    /// Memory ceiling in MiB.
    pub memory_mb: Option<u64>,
    /// CPU share in cores.
    pub cpu_cores: Option<f64>,
    /// Disk I/O ceiling in MB/s; 0 = unlimited.
    pub disk_io_mbps: Option<u64>,
    /// Network ceiling in Mb/s; 0 = unlimited.
    pub network_io_mbps: Option<u64>,
    /// Longest execution, e.g. `"1h"`.
    pub execution_timeout: Option<String>,
    /// Longest idle time, e.g. `"5m"`.
    pub idle_timeout: Option<String>,
}

/// An agent: state, configuration summary and live resource usage.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// `created`, `initializing`, `ready`, `running`, `suspended`, `waiting`, `failed`,
    /// `terminating` or `terminated`.
    pub state: String,
    /// `persistent`, `ephemeral`, `scheduled` or `event-driven`.
    pub mode: String,
    /// Requested tier.
    pub tier: String,
    /// Tier in force after merging the definition.
    pub effective_tier: Option<String>,
    /// Restarts made by recovery.
    pub restart_count: u32,
    /// Why it last failed.
    pub failure_reason: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When its state last changed (RFC 3339).
    pub state_changed_at: String,
    /// Its handlers.
    pub handlers: Vec<String>,
    /// Its live sandbox.
    pub sandbox_id: Option<String>,
    /// Live resource usage (absent before the first sample).
    pub usage: Option<UsageView>,
    /// Warnings of its tier on this host.
    pub tier_warnings: Vec<String>,
    /// Notes of the definition merge.
    pub notes: Vec<String>,
}

/// Live resource usage of an agent's sandbox, from the resource monitor.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    /// When it was sampled (RFC 3339).
    pub sampled_at: Option<String>,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Peak memory, bytes.
    pub memory_peak_bytes: u64,
    /// CPU cores used over the last interval.
    pub cpu_cores: f64,
    /// CPU time since start, nanoseconds.
    pub cpu_time_ns: u64,
    /// Bytes read from block devices.
    pub disk_read_bytes: u64,
    /// Bytes written to block devices.
    pub disk_write_bytes: u64,
    /// Bytes received.
    pub net_rx_bytes: u64,
    /// Bytes sent.
    pub net_tx_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// Memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// CPU limit, cores.
    pub cpu_limit_cores: f64,
}

/// Lower-case name of an agent state.
pub fn state_name(state: AgentState) -> String {
    format!("{state:?}").to_ascii_lowercase()
}

/// RFC 3339 with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl From<&ResourceUsage> for UsageView {
    fn from(u: &ResourceUsage) -> Self {
        UsageView {
            sampled_at: u.sampled_at.map(rfc3339),
            memory_bytes: u.memory_bytes,
            memory_peak_bytes: u.memory_peak_bytes,
            cpu_cores: u.cpu_cores,
            cpu_time_ns: u.cpu_time_ns,
            disk_read_bytes: u.disk_read_bytes,
            disk_write_bytes: u.disk_write_bytes,
            net_rx_bytes: u.net_rx_bytes,
            net_tx_bytes: u.net_tx_bytes,
            pids: u.pids,
            memory_limit_bytes: u.limits.memory_bytes(),
            cpu_limit_cores: u.limits.cpu_cores,
        }
    }
}

impl From<AgentStatus> for AgentView {
    fn from(a: AgentStatus) -> Self {
        AgentView {
            id: a.id.0,
            name: a.name,
            state: state_name(a.state),
            mode: a.mode,
            tier: a.tier.name().to_string(),
            effective_tier: a.effective_tier.map(|t| t.name().to_string()),
            restart_count: a.restart_count,
            failure_reason: a.failure_reason,
            created_at: rfc3339(a.created_at),
            state_changed_at: rfc3339(a.state_changed_at),
            handlers: a.handlers,
            sandbox_id: a.sandbox_id,
            usage: a.usage.as_ref().map(UsageView::from),
            tier_warnings: a.tier_warnings,
            notes: a.notes,
        }
    }
}

/// `GET /v1/agents`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    /// Every agent, oldest first.
    pub agents: Vec<AgentView>,
}

/// One log line of an agent's program.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LogLineView {
    /// When the runtime read it (RFC 3339).
    pub at: String,
    /// `stderr`, `runtime`, or the level of a `log` frame.
    pub stream: String,
    /// The text.
    pub line: String,
}

impl From<LogLine> for LogLineView {
    fn from(l: LogLine) -> Self {
        LogLineView {
            at: rfc3339(l.at),
            stream: l.stream,
            line: l.line,
        }
    }
}

/// `GET /v1/agents/{id}/logs`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LogsView {
    /// The agent.
    pub agent_id: Uuid,
    /// The last lines, oldest first.
    pub lines: Vec<LogLineView>,
}

/// `POST /v1/tasks`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitTaskRequest {
    /// The agent to run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Uuid>,
    /// Or a group of replicas to balance over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `low`, `normal`, `high` or `critical` (default: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// The input as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The input as standard base64 (instead of `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_base64: Option<String>,
    /// Timeout, e.g. `"30s"` (default: `[scheduler] task_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retries allowed after a failure.
    #[serde(default)]
    pub retry_count: u32,
    /// Run no earlier than this long from now, e.g. `"5s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
    /// A caller-chosen key: a second submit with the same key returns the first task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The answer to `POST /v1/tasks`: the task is durable when this is returned.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskReceiptView {
    /// The task's id (the earlier task's when `duplicate`).
    pub task_id: Uuid,
    /// True when the idempotency key was known and nothing new was scheduled.
    pub duplicate: bool,
}

/// A task and its outcome.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// Id.
    pub id: Uuid,
    /// The agent it was submitted for (nil for a group).
    pub agent_id: Uuid,
    /// The group it was submitted for.
    pub group: Option<String>,
    /// `delayed`, `queued`, `waiting`, `running`, `completed`, `failed`, `timedout` or
    /// `cancelled`.
    pub status: String,
    /// Priority.
    pub priority: String,
    /// `api`, `start`, `message`, `schedule`, ... (what queued it).
    pub kind: String,
    /// The handler that runs it (`task` for API tasks).
    pub handler: String,
    /// Its input as text (absent when not UTF-8).
    pub input: Option<String>,
    /// Its input, base64.
    pub input_base64: String,
    /// Its output as text (absent when not UTF-8).
    pub output: Option<String>,
    /// Its output, base64.
    pub output_base64: String,
    /// Executions started so far.
    pub attempts: u32,
    /// Retries allowed.
    pub retry_count: u32,
    /// The agent of the last execution.
    pub assigned_agent: Option<Uuid>,
    /// The last error, as `CODE: message`.
    pub last_error: Option<String>,
    /// True when it was re-queued after a restart of the daemon.
    pub recovered: bool,
    /// Timeout in milliseconds.
    pub timeout_ms: u64,
    /// The caller's idempotency key.
    pub idempotency_key: Option<String>,
    /// When it was accepted (RFC 3339).
    pub created_at: String,
    /// When its last execution started.
    pub started_at: Option<String>,
    /// When it reached a final status.
    pub finished_at: Option<String>,
}

/// Lower-case name of a task status.
pub fn status_name(status: symbiont_runtime::scheduler::TaskStatus) -> String {
    format!("{status:?}").to_ascii_lowercase()
}

fn priority_name(p: Priority) -> String {
    format!("{p:?}").to_ascii_lowercase()
}

/// Parses `low`, `normal`, `high`, `critical` (any case).
pub fn parse_priority(text: &str) -> Result<Priority, String> {
    Priority::ALL
        .into_iter()
        .find(|p| format!("{p:?}").eq_ignore_ascii_case(text.trim()))
        .ok_or_else(|| format!("`{text}` is not a priority (low, normal, high, critical)"))
}

/// Standard base64.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard base64.
pub fn unb64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|e| format!("not valid base64: {e}"))
}

impl From<TaskRecord> for TaskView {
    fn from(r: TaskRecord) -> Self {
        let input = TaskInput::decode(&r.payload);
        let group = match &r.target {
            TaskTarget::Group(g) => Some(g.clone()),
            _ => None,
        };
        TaskView {
            id: r.task.id.0,
            agent_id: r.task.agent_id.0,
            group,
            status: status_name(r.status),
            priority: priority_name(r.task.priority),
            kind: input.kind.clone(),
            handler: input.handler.clone(),
            input: String::from_utf8(input.payload.clone()).ok(),
            input_base64: b64(&input.payload),
            output: String::from_utf8(r.output.clone()).ok(),
            output_base64: b64(&r.output),
            attempts: r.attempts,
            retry_count: r.task.retry_count,
            assigned_agent: r.assigned_agent.map(|a| a.0),
            last_error: r.last_error,
            recovered: r.recovered,
            timeout_ms: u64::try_from(r.task.timeout.as_millis()).unwrap_or(u64::MAX),
            idempotency_key: r.idempotency_key,
            created_at: rfc3339(r.created_at),
            started_at: r.started_at.map(rfc3339),
            finished_at: r.finished_at.map(rfc3339),
        }
    }
}

/// `GET /v1/tasks`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    /// The tasks, oldest first.
    pub tasks: Vec<TaskView>,
}

/// `POST /v1/messages`: send to one agent (`to`) or publish on `topic` (no `to`). The
/// sender is the runtime's operator identity.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessageRequest {
    /// The recipient; absent: publish to every subscriber of `topic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Uuid>,
    /// The topic.
    pub topic: String,
    /// The payload as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload as standard base64 (instead of `payload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// `low`, `normal` (default), `high` or `critical`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// Time to live, e.g. `"30s"` (default: `[communication] default_ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// The answer to `POST /v1/messages`: the message was accepted into the recipient's
/// mailbox (or handed to every subscriber).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageReceipt {
    /// The message's id.
    pub message_id: Uuid,
}

/// A message that could not be delivered.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// Message id.
    pub message_id: Uuid,
    /// Sender.
    pub from: Uuid,
    /// Recipient.
    pub to: Uuid,
    /// Topic.
    pub topic: String,
    /// Priority.
    pub priority: String,
    /// `direct`, `topic`, `request` or `reply`.
    pub kind: String,
    /// Payload size in bytes (payloads are never shown).
    pub size: usize,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            message_id: d.message_id.0,
            from: d.from.0,
            to: d.to.0,
            topic: d.topic,
            priority: priority_name(d.priority),
            kind: format!("{:?}", d.kind).to_ascii_lowercase(),
            size: d.size,
            reason: format!("{:?}", d.reason),
            at: rfc3339(d.at),
        }
    }
}

/// `GET /v1/messages/dead-letters`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterList {
    /// Oldest first.
    pub dead_letters: Vec<DeadLetterView>,
}

/// One audit event as stored in the log.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEventView {
    /// Sequence number in the log.
    pub seq: u64,
    /// Segment file.
    pub segment: String,
    /// Event id.
    pub id: Uuid,
    /// When (RFC 3339).
    pub timestamp: String,
    /// Event type (`StateChanged`, `custom:<name>`, ...).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The agent concerned.
    pub agent: Option<Uuid>,
    /// Description.
    pub details: String,
    /// Structured fields.
    pub metadata: BTreeMap<String, String>,
}

impl From<AuditRecord> for AuditEventView {
    fn from(r: AuditRecord) -> Self {
        AuditEventView {
            seq: r.seq,
            segment: r.segment,
            id: r.event.id.0,
            timestamp: rfc3339(r.event.timestamp),
            event_type: r.event.event_type.to_string(),
            agent: r.event.agent_id.map(|a| a.0),
            details: r.event.details,
            metadata: r.event.metadata.into_iter().collect(),
        }
    }
}

/// `GET /v1/audit`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    /// Matching events, oldest first.
    pub events: Vec<AuditEventView>,
}

/// `GET /v1/audit/verify`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VerifyView {
    /// True when the chain, sequence numbers, signatures and signed heads all check out.
    pub ok: bool,
    /// The log directory.
    pub dir: String,
    /// The public key used (hex).
    pub public_key: String,
    /// Segments checked.
    pub segments: usize,
    /// Entries checked.
    pub entries: u64,
    /// Of which events.
    pub events: u64,
    /// Of which signed checkpoints.
    pub checkpoints: u64,
    /// First sequence number.
    pub first_seq: Option<u64>,
    /// Last valid sequence number.
    pub last_seq: Option<u64>,
    /// The newest signature covers the log up to here.
    pub signed_through: Option<u64>,
    /// The first problem, when it does not verify.
    pub problem: Option<String>,
    /// The human-readable report.
    pub report: String,
}

impl From<VerifyReport> for VerifyView {
    fn from(r: VerifyReport) -> Self {
        VerifyView {
            ok: r.is_ok(),
            dir: r.dir.display().to_string(),
            public_key: r.public_key.clone(),
            segments: r.segments,
            entries: r.entries,
            events: r.events,
            checkpoints: r.checkpoints,
            first_seq: r.first_seq,
            last_seq: r.last_seq,
            signed_through: r.signed_through,
            problem: r.problem.as_ref().map(|p| format!("{p:?}")),
            report: r.to_string(),
        }
    }
}

/// Parses a humantime duration (`30s`, `5m`, `1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}` is not a duration: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use symbiont_runtime::AgentConfig;

    /// The documented schema of `config` must accept exactly what the runtime's
    /// `AgentConfig` serializes to (so the OpenAPI document stays true).
    #[test]
    fn agent_config_schema_matches_the_runtime_agent_config() {
        let mut config = AgentConfig::default();
        config.metadata.insert("k".into(), "v".into());
        config.policies.push("deny network".into());
        config.capabilities = vec![symbiont_runtime::Capability::Messaging];
        let json = serde_json::to_value(&config).expect("serialize");
        let mirror: AgentConfigSchema = serde_json::from_value(json.clone()).expect("mirror");
        assert_eq!(mirror.name, config.name);
        let limits = json.get("resource_limits").cloned().expect("limits");
        let _: ResourceLimitsSchema = serde_json::from_value(limits).expect("limits mirror");
    }

    #[test]
    fn priorities_parse_in_any_case() {
        assert_eq!(parse_priority("HIGH"), Ok(Priority::High));
        assert_eq!(parse_priority("low"), Ok(Priority::Low));
        assert!(parse_priority("urgent").is_err());
    }
}
