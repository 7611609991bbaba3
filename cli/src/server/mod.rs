//! The daemon's HTTP API (axum): the router and its route table, authentication, errors,
//! metrics and the OpenAPI document. [`serve`] runs it on a bound listener until a
//! shutdown signal, then lets in-flight requests finish.
//!
//! ```text
//! request ─▶ metrics::track ─▶ (body limit) ─▶ auth::require_token (all but /health)
//!         ─▶ routes::* ─▶ Runtime ─▶ JSON, or error::ApiError {code, message, status}
//! ```

pub mod auth;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod routes;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use symbiont_runtime::runtime::Runtime;

use crate::tokens::TokenSet;
use error::{ApiError, METHOD_NOT_ALLOWED, NO_ROUTE};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The runtime.
    pub runtime: Runtime,
    /// Valid API tokens.
    pub tokens: Arc<TokenSet>,
    /// Request counters.
    pub metrics: Arc<metrics::HttpMetrics>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// An HTTP method the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    /// GET
    Get,
    /// POST
    Post,
    /// DELETE
    Delete,
}

impl Verb {
    /// Upper-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Delete => "DELETE",
        }
    }

    fn filter(&self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// A router that remembers the (method, path) of every route it was given.
struct Routes {
    router: Router<AppState>,
    table: Vec<(Verb, &'static str)>,
}

impl Routes {
    fn new() -> Self {
        Routes {
            router: Router::new(),
            table: Vec::new(),
        }
    }

    fn add<H, T>(mut self, verb: Verb, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.router = self.router.route(path, on(verb.filter(), handler));
        self.table.push((verb, path));
        self
    }
}

/// The routes that need a token.
fn protected() -> Routes {
    use routes::*;
    use Verb::*;
    Routes::new()
        .add(Get, "/metrics", metrics)
        .add(Get, "/openapi.json", openapi)
        .add(Post, "/v1/agents", create_agent)
        .add(Get, "/v1/agents", list_agents)
        .add(Get, "/v1/agents/{id}", get_agent)
        .add(Delete, "/v1/agents/{id}", delete_agent)
        .add(Post, "/v1/agents/{id}/start", start_agent)
        .add(Post, "/v1/agents/{id}/suspend", suspend_agent)
        .add(Post, "/v1/agents/{id}/resume", resume_agent)
        .add(Post, "/v1/agents/{id}/stop", stop_agent)
        .add(Get, "/v1/agents/{id}/logs", agent_logs)
        .add(Post, "/v1/tasks", submit_task)
        .add(Get, "/v1/tasks", list_tasks)
        .add(Get, "/v1/tasks/{id}", get_task)
        .add(Post, "/v1/tasks/{id}/cancel", cancel_task)
        .add(Post, "/v1/messages", send_message)
        .add(Get, "/v1/messages/dead-letters", dead_letters)
        .add(Get, "/v1/audit", audit_query)
        .add(Get, "/v1/audit/verify", audit_verify)
}

/// The routes open to anyone.
fn public() -> Routes {
    Routes::new().add(Verb::Get, "/health", routes::health)
}

/// Every (method, path) the router serves, as registered (paths use `{param}`, like the
/// OpenAPI document).
pub fn route_table() -> Vec<(Verb, &'static str)> {
    let mut table = protected().table;
    table.extend(public().table);
    table.sort();
    table
}

/// A panicking handler answers 500 API_008 (the panic is logged) instead of dropping the
/// connection.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = what, "API handler panicked");
    ApiError::new(error::INTERNAL, "internal error (logged by the daemon)").into_response()
}

async fn no_route() -> Response {
    ApiError::new(NO_ROUTE, "no such route (see GET /openapi.json)").into_response()
}

async fn wrong_method() -> Response {
    ApiError::new(
        METHOD_NOT_ALLOWED,
        "this route does not take that method (see GET /openapi.json)",
    )
    .into_response()
}

/// Turns axum's own 413 (a body over the limit read by something else than our extractors)
/// into the API's error shape.
async fn json_errors(req: axum::extract::Request, next: Next) -> Response {
    let response = next.run(req).await;
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return error::body_too_large().into_response();
    }
    response
}

/// The whole application.
pub fn app(state: AppState, max_body_bytes: usize) -> Router {
    let protected = protected()
        .router
        .route_layer(from_fn_with_state(state.clone(), auth::require_token));
    protected
        .merge(public().router)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(from_fn_with_state(state.clone(), metrics::track))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits
/// for in-flight requests to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_a_json_500() {
        let response = panic_response(Box::new("boom"));
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], "API_008");
        assert_eq!(v["error"]["status"], 500);
    }

    #[test]
    fn the_route_table_has_no_duplicates_and_only_health_is_public() {
        let table = route_table();
        let unique: std::collections::BTreeSet<_> = table.iter().collect();
        assert_eq!(unique.len(), table.len());
        assert_eq!(public().table, vec![(Verb::Get, "/health")]);
    }
}
