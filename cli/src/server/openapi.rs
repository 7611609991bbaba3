//! The OpenAPI 3 document of the API (`GET /openapi.json`), generated with `utoipa` from
//! the handlers' annotations and the wire types' schemas. `cli/tests/api.rs` checks that
//! its paths and methods are exactly the router's.

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes;
use crate::api;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "symbiont",
        description = "The symbiont daemon's API: agents, tasks, messages, audit. Every route \
                       but /health takes `Authorization: Bearer <token>` (`symbiont token create`). \
                       Errors are `{\"error\": {\"code\", \"message\", \"status\"}}`; see docs/service.md.",
        license(name = "MIT")
    ),
    paths(
        routes::health,
        routes::metrics,
        routes::openapi,
        routes::create_agent,
        routes::list_agents,
        routes::get_agent,
        routes::delete_agent,
        routes::start_agent,
        routes::suspend_agent,
        routes::resume_agent,
        routes::stop_agent,
        routes::agent_logs,
        routes::submit_task,
        routes::list_tasks,
        routes::get_task,
        routes::cancel_task,
        routes::send_message,
        routes::dead_letters,
        routes::audit_query,
        routes::audit_verify,
    ),
    components(schemas(
        api::ErrorBody,
        api::ErrorDetail,
        api::HealthView,
        api::TierView,
        api::CreateAgentRequest,
        api::AgentConfigSchema,
        api::ResourceLimitsSchema,
        api::AgentView,
        api::UsageView,
        api::AgentList,
        api::LogLineView,
        api::LogsView,
        api::SubmitTaskRequest,
        api::TaskReceiptView,
        api::TaskView,
        api::TaskList,
        api::SendMessageRequest,
        api::MessageReceipt,
        api::DeadLetterView,
        api::DeadLetterList,
        api::AuditEventView,
        api::AuditList,
        api::VerifyView,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "agents", description = "Create, inspect and control agents"),
        (name = "tasks", description = "Submit, follow and cancel tasks"),
        (name = "messages", description = "Send messages; inspect dead letters"),
        (name = "audit", description = "Query and verify the audit trail"),
        (name = "system", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the operations refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A token from `symbiont token create`"))
                    .build(),
            ),
        );
    }
}

/// The document as JSON (built once).
pub fn document_json() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        doc.to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the document: {e}\"}}"))
    })
    .clone()
}
