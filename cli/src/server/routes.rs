//! The API's handlers: each is a thin translation between the wire types of [`crate::api`]
//! and one [`Runtime`] call. Every handler that changes state waits for the audit trail to
//! be flushed before it answers, so whatever a 2xx acknowledged is in the durable audit
//! log (and, for tasks, in the store) before the client hears of it.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use symbiont_runtime::integrations::audit_trail::{AuditEventType, AuditQuery};
use symbiont_runtime::runtime::{SendRequest, TaskRequest};
use symbiont_runtime::{AgentConfig, AgentId, TaskId};
use utoipa::IntoParams;

use super::error::{parse_id, ApiError, ApiJson, ApiQuery, ApiResult, INVALID_JSON};
use super::AppState;
use crate::api::*;

/// Waits until every audit event submitted so far is durable.
async fn durable(state: &AppState) -> ApiResult<()> {
    state
        .runtime
        .audit()
        .flush()
        .await
        .map_err(|e| ApiError::from(symbiont_runtime::RuntimeError::from(e)))
}

fn agent_id(text: &str) -> ApiResult<AgentId> {
    parse_id(text, "agent").map(AgentId)
}

fn task_id(text: &str) -> ApiResult<TaskId> {
    parse_id(text, "task").map(TaskId)
}

fn agent_view(state: &AppState, id: AgentId) -> ApiResult<AgentView> {
    Ok(state.runtime.agent_status(id)?.into())
}

// ----- health, metrics, OpenAPI ---------------------------------------------------------

/// Liveness and what the host offers. Needs no token.
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, description = "The daemon is up", body = HealthView)))]
pub async fn health(State(state): State<AppState>) -> Json<HealthView> {
    Json(state.runtime.health().into())
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4", body = String),
        (status = 401, description = "API_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = super::metrics::render(&state.runtime, &state.metrics);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses(
        (status = 200, description = "The OpenAPI 3 document of this API", body = Object),
        (status = 401, description = "API_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document_json(),
    )
        .into_response()
}

// ----- agents ---------------------------------------------------------------------------

/// Creates an agent (from a definition's text or a JSON `AgentConfig`), initializes it and,
/// unless `start` is false, starts it. Answers once it is running (or ready).
#[utoipa::path(post, path = "/v1/agents", tag = "agents",
    request_body = CreateAgentRequest,
    responses(
        (status = 201, description = "Created", body = AgentView),
        (status = 400, description = "API_002 invalid JSON, API_007 bad field, AGENT_007 invalid configuration", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 403, description = "SEC_001: the definition's own policy refuses its limits", body = ErrorBody),
        (status = 409, description = "AGENT_003 max_agents reached, AGENT_004 id taken, RESOURCE_001 insufficient resources", body = ErrorBody),
        (status = 413, description = "API_003", body = ErrorBody),
        (status = 422, description = "DSL_001 invalid definition, AGENT_005 initialization failed (the agent stays, Failed)", body = ErrorBody),
        (status = 503, description = "SANDBOX_001 tier unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_agent(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateAgentRequest>,
) -> ApiResult<(StatusCode, Json<AgentView>)> {
    let mut config_json = req.config.unwrap_or_else(|| serde_json::json!({}));
    let Some(object) = config_json.as_object_mut() else {
        return Err(ApiError::new(
            INVALID_JSON,
            "`config` must be a JSON object",
        ));
    };
    if !object.contains_key("name") {
        if req.definition.is_none() {
            return Err(ApiError::new(
                INVALID_JSON,
                "`config.name` is required when no `definition` is given",
            ));
        }
        object.insert("name".into(), serde_json::Value::String(String::new()));
    }
    let config: AgentConfig = serde_json::from_value(config_json).map_err(|e| {
        ApiError::new(
            INVALID_JSON,
            format!("`config` is not a valid AgentConfig: {e}"),
        )
    })?;
    if req.definition.is_none() && config.dsl_source.trim().is_empty() {
        return Err(ApiError::invalid(
            "give the agent's definition in `definition` (or in `config.dsl_source`)",
        ));
    }
    let base_dir = match req.base_dir {
        Some(dir) => {
            let path = PathBuf::from(&dir);
            if !path.is_absolute() {
                return Err(ApiError::invalid(format!(
                    "`base_dir` must be an absolute path on the daemon's host, not `{dir}`"
                )));
            }
            Some(path)
        }
        None => None,
    };
    let result = state
        .runtime
        .create_agent_with_options(
            config,
            req.definition.as_deref(),
            base_dir,
            req.start.unwrap_or(true),
        )
        .await;
    durable(&state).await?;
    let id = result?;
    Ok((StatusCode::CREATED, Json(agent_view(&state, id)?)))
}

/// Every agent.
#[utoipa::path(get, path = "/v1/agents", tag = "agents",
    responses(
        (status = 200, description = "The agents, oldest first", body = AgentList),
        (status = 401, description = "API_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_agents(State(state): State<AppState>) -> Json<AgentList> {
    let mut agents = state.runtime.list_agents();
    agents.sort_by_key(|a| (a.created_at, a.id));
    Json(AgentList {
        agents: agents.into_iter().map(AgentView::from).collect(),
    })
}

/// One agent: state and live resource usage.
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "API_007 not a UUID", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 404, description = "AGENT_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<AgentView>> {
    Ok(Json(agent_view(&state, agent_id(&id)?)?))
}

macro_rules! agent_action {
    ($(#[$doc:meta])* $name:ident, $path:literal, $call:ident) => {
        $(#[$doc])*
        #[utoipa::path(post, path = $path, tag = "agents",
            params(("id" = String, Path, description = "The agent's id")),
            responses(
                (status = 200, description = "Done; the agent as it is now", body = AgentView),
                (status = 400, description = "API_007 not a UUID", body = ErrorBody),
                (status = 401, description = "API_001", body = ErrorBody),
                (status = 404, description = "AGENT_001", body = ErrorBody),
                (status = 409, description = "AGENT_002 not allowed in its state", body = ErrorBody),
                (status = 500, description = "AGENT_006 the step failed", body = ErrorBody)),
            security(("bearer" = [])))]
        pub async fn $name(
            State(state): State<AppState>,
            Path(id): Path<String>,
        ) -> ApiResult<Json<AgentView>> {
            let id = agent_id(&id)?;
            let result = state.runtime.$call(id).await;
            durable(&state).await?;
            result?;
            Ok(Json(agent_view(&state, id)?))
        }
    };
}

agent_action!(
    /// Starts a ready (or suspended) agent.
    start_agent, "/v1/agents/{id}/start", start_agent);
agent_action!(
    /// Freezes an agent's sandbox.
    suspend_agent, "/v1/agents/{id}/suspend", suspend_agent);
agent_action!(
    /// Thaws a suspended agent.
    resume_agent, "/v1/agents/{id}/resume", resume_agent);
agent_action!(
    /// Stops an agent for good (its program gets `termination_timeout`, then is killed).
    stop_agent, "/v1/agents/{id}/stop", stop_agent);

/// Stops (if needed) and forgets an agent.
#[utoipa::path(delete, path = "/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "API_007 not a UUID", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 404, description = "AGENT_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = agent_id(&id)?;
    let result = state.runtime.delete_agent(id).await;
    durable(&state).await?;
    result?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/agents/{id}/logs` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// How many of the last lines (default 100, at most 1000).
    pub tail: Option<usize>,
}

/// The last lines the agent's program wrote to stderr or logged.
#[utoipa::path(get, path = "/v1/agents/{id}/logs", tag = "agents",
    params(("id" = String, Path, description = "The agent's id"), LogsQuery),
    responses(
        (status = 200, description = "The lines, oldest first", body = LogsView),
        (status = 400, description = "API_007", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 404, description = "AGENT_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn agent_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Json<LogsView>> {
    let id = agent_id(&id)?;
    let tail = q.tail.unwrap_or(100).min(1000);
    let lines = state.runtime.agent_logs(id, tail)?;
    Ok(Json(LogsView {
        agent_id: id.0,
        lines: lines.into_iter().map(LogLineView::from).collect(),
    }))
}

// ----- tasks ----------------------------------------------------------------------------

/// Queues a task. It is durable (write-ahead in the store, audited) when this answers.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    request_body = SubmitTaskRequest,
    responses(
        (status = 202, description = "Accepted and durable", body = TaskReceiptView),
        (status = 200, description = "Duplicate idempotency key: the earlier task", body = TaskReceiptView),
        (status = 400, description = "API_002 invalid JSON, API_007 bad field", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 404, description = "AGENT_001 unknown agent", body = ErrorBody),
        (status = 409, description = "SCHED_001 cannot be scheduled (terminated agent, queue full)", body = ErrorBody),
        (status = 413, description = "API_003", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn submit_task(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SubmitTaskRequest>,
) -> ApiResult<(StatusCode, Json<TaskReceiptView>)> {
    if req.agent_id.is_none() && req.group.is_none() {
        return Err(ApiError::invalid("a task needs `agent_id` or `group`"));
    }
    if let Some(id) = req.agent_id {
        state.runtime.agent_status(AgentId(id))?;
    }
    let input = match (req.input, req.input_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give `input` or `input_base64`, not both",
            ))
        }
        (Some(text), None) => text.into_bytes(),
        (None, Some(b)) => {
            unb64(&b).map_err(|e| ApiError::invalid(format!("input_base64: {e}")))?
        }
        (None, None) => Vec::new(),
    };
    let priority = req
        .priority
        .as_deref()
        .map(parse_priority)
        .transpose()
        .map_err(ApiError::invalid)?;
    let duration = |field: &str, v: Option<String>| -> ApiResult<Option<Duration>> {
        v.as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| ApiError::invalid(format!("{field}: {e}")))
    };
    let receipt = state
        .runtime
        .submit_task(TaskRequest {
            agent_id: req.agent_id.map(AgentId),
            group: req.group,
            priority,
            input,
            timeout: duration("timeout", req.timeout)?,
            retry_count: req.retry_count,
            delay: duration("delay", req.delay)?,
            idempotency_key: req.idempotency_key,
        })
        .await;
    durable(&state).await?;
    let receipt = receipt?;
    let status = if receipt.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(TaskReceiptView {
            task_id: receipt.task_id.0,
            duplicate: receipt.duplicate,
        }),
    ))
}

/// `GET /v1/tasks` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskListQuery {
    /// Only the tasks of this agent.
    pub agent: Option<String>,
    /// Only tasks with this status (`queued`, `running`, `completed`, ...).
    pub status: Option<String>,
    /// At most this many, the newest (default 1000).
    pub limit: Option<usize>,
}

/// Known tasks (unfinished ones, and finished ones within `finished_task_retention`).
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    params(TaskListQuery),
    responses(
        (status = 200, description = "Tasks, oldest first", body = TaskList),
        (status = 400, description = "API_007", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tasks(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<TaskListQuery>,
) -> ApiResult<Json<TaskList>> {
    let agent = q.agent.as_deref().map(agent_id).transpose()?;
    let mut tasks: Vec<_> = state
        .runtime
        .list_tasks()
        .into_iter()
        .filter(|t| {
            agent.is_none_or(|a| t.task.agent_id == a || t.assigned_agent == Some(a))
                && q.status
                    .as_deref()
                    .is_none_or(|s| status_name(t.status).eq_ignore_ascii_case(s))
        })
        .collect();
    tasks.sort_by_key(|t| (t.created_at, t.task.id));
    let limit = q.limit.unwrap_or(1000);
    let skip = tasks.len().saturating_sub(limit);
    Ok(Json(TaskList {
        tasks: tasks.into_iter().skip(skip).map(TaskView::from).collect(),
    }))
}

/// `GET /v1/tasks/{id}` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// Wait up to this long (e.g. `30s`, at most `5m`) for the task to finish.
    pub wait: Option<String>,
}

/// A task's status and, once finished, its output.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "The task's id"), TaskQuery),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 400, description = "API_007", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 404, description = "SCHED_002", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<TaskQuery>,
) -> ApiResult<Json<TaskView>> {
    let id = task_id(&id)?;
    let record = state.runtime.task(id)?;
    if let Some(wait) = q.wait.as_deref() {
        let wait = parse_duration(wait)
            .map_err(|e| ApiError::invalid(format!("wait: {e}")))?
            .min(Duration::from_secs(300));
        if !record.status.is_final() {
            // Finished or not, the answer is the record as it is then.
            let _ = tokio::time::timeout(wait, state.runtime.wait_task(id)).await;
            return Ok(Json(state.runtime.task(id)?.into()));
        }
    }
    Ok(Json(record.into()))
}

/// Cancels a task; a running execution is killed.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "The task's id")),
    responses(
        (status = 200, description = "Cancelled", body = TaskView),
        (status = 400, description = "API_007", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 404, description = "SCHED_002", body = ErrorBody),
        (status = 409, description = "SCHED_008 already finished", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskView>> {
    let id = task_id(&id)?;
    let result = state.runtime.cancel_task(id).await;
    durable(&state).await?;
    Ok(Json(result?.into()))
}

// ----- messages -------------------------------------------------------------------------

/// Sends a message to one agent, or publishes it on a topic, from the operator identity.
/// Signed and encrypted by the bus; the recipient's policy decides.
#[utoipa::path(post, path = "/v1/messages", tag = "messages",
    request_body = SendMessageRequest,
    responses(
        (status = 202, description = "Accepted into the mailbox", body = MessageReceipt),
        (status = 400, description = "API_002, API_007", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody),
        (status = 403, description = "SEC_001 refused by policy", body = ErrorBody),
        (status = 404, description = "AGENT_001 unknown recipient", body = ErrorBody),
        (status = 413, description = "API_003, COMM_002", body = ErrorBody),
        (status = 422, description = "COMM_001 not deliverable", body = ErrorBody),
        (status = 429, description = "COMM_003 mailbox full", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn send_message(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SendMessageRequest>,
) -> ApiResult<(StatusCode, Json<MessageReceipt>)> {
    if req.topic.trim().is_empty() {
        return Err(ApiError::invalid("`topic` must not be empty"));
    }
    if let Some(to) = req.to {
        state.runtime.agent_status(AgentId(to))?;
    }
    let payload = match (req.payload, req.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give `payload` or `payload_base64`, not both",
            ))
        }
        (Some(text), None) => text.into_bytes(),
        (None, Some(b)) => {
            unb64(&b).map_err(|e| ApiError::invalid(format!("payload_base64: {e}")))?
        }
        (None, None) => Vec::new(),
    };
    let priority = req
        .priority
        .as_deref()
        .map(parse_priority)
        .transpose()
        .map_err(ApiError::invalid)?
        .unwrap_or_default();
    let ttl = req
        .ttl
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("ttl: {e}")))?;
    let result = state
        .runtime
        .send_message(SendRequest {
            from: None,
            to: req.to.map(AgentId),
            topic: req.topic,
            payload,
            priority,
            ttl,
        })
        .await;
    durable(&state).await?;
    let id = result?;
    Ok((
        StatusCode::ACCEPTED,
        Json(MessageReceipt { message_id: id.0 }),
    ))
}

/// Messages that could not be delivered (payloads are never shown).
#[utoipa::path(get, path = "/v1/messages/dead-letters", tag = "messages",
    responses(
        (status = 200, description = "Dead letters, oldest first", body = DeadLetterList),
        (status = 401, description = "API_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn dead_letters(State(state): State<AppState>) -> Json<DeadLetterList> {
    Json(DeadLetterList {
        dead_letters: state
            .runtime
            .dead_letters()
            .into_iter()
            .map(DeadLetterView::from)
            .collect(),
    })
}

// ----- audit ----------------------------------------------------------------------------

/// `GET /v1/audit` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only events about this agent.
    pub agent: Option<String>,
    /// Only events of this type (`StateChanged`, `task_scheduled`, `custom:<name>`, ...).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Only events at or after this time: RFC 3339, or an age (`1h`, `30m`).
    pub since: Option<String>,
    /// Only events before this time (same forms).
    pub until: Option<String>,
    /// At most this many, the oldest first (default 1000, at most 100000).
    pub limit: Option<usize>,
    /// Instead of the oldest, the last this many matching events.
    pub tail: Option<usize>,
}

fn parse_time(field: &str, text: &str) -> ApiResult<std::time::SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    humantime::parse_duration(text)
        .ok()
        .and_then(|age| std::time::SystemTime::now().checked_sub(age))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "{field}: `{text}` is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor an age (1h, 30m)"
            ))
        })
}

/// Audit events by agent, type and time range (everything acknowledged so far).
#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(AuditParams),
    responses(
        (status = 200, description = "Matching events", body = AuditList),
        (status = 400, description = "API_007", body = ErrorBody),
        (status = 401, description = "API_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit_query(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditList>> {
    let event_type = q
        .event_type
        .as_deref()
        .map(|t| {
            t.parse::<AuditEventType>()
                .map_err(|e| ApiError::invalid(format!("type: {e}")))
        })
        .transpose()?;
    let tail = q.tail.map(|n| n.min(100_000));
    let query = AuditQuery {
        agent: q.agent.as_deref().map(agent_id).transpose()?,
        event_type,
        since: q
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: q
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        limit: match tail {
            Some(_) => None,
            None => Some(q.limit.unwrap_or(1000).min(100_000)),
        },
    };
    let unfiltered = query.agent.is_none()
        && query.event_type.is_none()
        && query.since.is_none()
        && query.until.is_none();
    let records = match tail {
        Some(n) if unfiltered => {
            durable(&state).await?;
            let dir = state.runtime.audit_dir().to_path_buf();
            tokio::task::spawn_blocking(move || {
                symbiont_runtime::integrations::audit_trail::tail_dir(&dir, n)
            })
            .await
            .map_err(|e| ApiError::new(super::error::INTERNAL, e.to_string()))?
            .map_err(|e| ApiError::from(symbiont_runtime::RuntimeError::from(e)))?
        }
        Some(n) => {
            let mut all = state.runtime.audit_query(&query).await?;
            let skip = all.len().saturating_sub(n);
            all.drain(..skip);
            all
        }
        None => state.runtime.audit_query(&query).await?,
    };
    Ok(Json(AuditList {
        events: records.into_iter().map(AuditEventView::from).collect(),
    }))
}

/// Verifies the audit trail's hash chain, sequence numbers, signatures and signed heads
/// with the runtime's public key. `ok` is false (still 200) when it does not verify.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    responses(
        (status = 200, description = "The verification report", body = VerifyView),
        (status = 401, description = "API_001", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit_verify(State(state): State<AppState>) -> ApiResult<Json<VerifyView>> {
    Ok(Json(state.runtime.audit_verify().await?.into()))
}
