//! Every error the API returns: `{"error": {"code", "message", "status"}}` with an HTTP
//! status that fits the stable code. [`status_for`] is the one mapping table (documented
//! in `docs/service.md`); the API's own codes (`API_xxx`) cover what happens before the
//! runtime is reached (authentication, malformed requests, unknown routes).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use symbiont_runtime::RuntimeError;

use crate::api::{ErrorBody, ErrorDetail};

/// Missing, invalid or revoked bearer token.
pub const UNAUTHENTICATED: &str = "API_001";
/// The body is not valid JSON, or not the JSON this route takes.
pub const INVALID_JSON: &str = "API_002";
/// The body is larger than `[api] max_body_bytes`.
pub const BODY_TOO_LARGE: &str = "API_003";
/// The body is not declared as `application/json`.
pub const UNSUPPORTED_MEDIA_TYPE: &str = "API_004";
/// No such route.
pub const NO_ROUTE: &str = "API_005";
/// The route exists, not with this method.
pub const METHOD_NOT_ALLOWED: &str = "API_006";
/// A path or query parameter, or a field's value, is invalid.
pub const INVALID_PARAMETER: &str = "API_007";
/// An unexpected failure inside the daemon.
pub const INTERNAL: &str = "API_008";

/// The HTTP status of each stable code. Unknown codes are 500.
pub fn status_for(code: &str) -> StatusCode {
    mapped_status(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The mapping table itself: `None` for a code it does not name.
pub fn mapped_status(code: &str) -> Option<StatusCode> {
    Some(match code {
        // Agents.
        "AGENT_001" => StatusCode::NOT_FOUND,
        "AGENT_002" => StatusCode::CONFLICT,
        "AGENT_003" => StatusCode::CONFLICT,
        "AGENT_004" => StatusCode::CONFLICT,
        "AGENT_005" => StatusCode::UNPROCESSABLE_ENTITY,
        "AGENT_006" => StatusCode::INTERNAL_SERVER_ERROR,
        "AGENT_007" => StatusCode::BAD_REQUEST,
        // Definitions and policies.
        "DSL_001" => StatusCode::UNPROCESSABLE_ENTITY,
        "SEC_001" => StatusCode::FORBIDDEN,
        "SEC_002" => StatusCode::UNPROCESSABLE_ENTITY,
        // Sandboxes.
        "SANDBOX_001" => StatusCode::SERVICE_UNAVAILABLE,
        "SANDBOX_002" => StatusCode::UNPROCESSABLE_ENTITY,
        "SANDBOX_003" => StatusCode::CONFLICT,
        "SANDBOX_004" => StatusCode::INTERNAL_SERVER_ERROR,
        // Resources.
        "RESOURCE_001" => StatusCode::CONFLICT,
        "RESOURCE_002" => StatusCode::UNPROCESSABLE_ENTITY,
        "RESOURCE_003" => StatusCode::CONFLICT,
        "RESOURCE_004" => StatusCode::UNPROCESSABLE_ENTITY,
        "RESOURCE_005" => StatusCode::CONFLICT,
        "RESOURCE_006" => StatusCode::NOT_FOUND,
        "RESOURCE_007" | "RESOURCE_008" => StatusCode::INTERNAL_SERVER_ERROR,
        // Scheduler.
        "SCHED_001" => StatusCode::CONFLICT,
        "SCHED_002" => StatusCode::NOT_FOUND,
        "SCHED_003" => StatusCode::GATEWAY_TIMEOUT,
        "SCHED_004" => StatusCode::CONFLICT,
        "SCHED_005" | "SCHED_006" => StatusCode::INTERNAL_SERVER_ERROR,
        "SCHED_007" => StatusCode::TOO_MANY_REQUESTS,
        "SCHED_008" => StatusCode::CONFLICT,
        "SCHED_009" => StatusCode::BAD_REQUEST,
        "SCHED_010" | "SCHED_011" => StatusCode::SERVICE_UNAVAILABLE,
        // Communication.
        "COMM_001" => StatusCode::UNPROCESSABLE_ENTITY,
        "COMM_002" => StatusCode::PAYLOAD_TOO_LARGE,
        "COMM_003" => StatusCode::TOO_MANY_REQUESTS,
        "COMM_004" => StatusCode::GATEWAY_TIMEOUT,
        "COMM_005" => StatusCode::BAD_REQUEST,
        "COMM_006" | "COMM_007" => StatusCode::INTERNAL_SERVER_ERROR,
        // Recovery.
        "RECOVERY_001" => StatusCode::SERVICE_UNAVAILABLE,
        "RECOVERY_002" => StatusCode::INTERNAL_SERVER_ERROR,
        // Configuration, storage, audit.
        "CONFIG_001" => StatusCode::BAD_REQUEST,
        "STORAGE_001" | "STORAGE_002" => StatusCode::INTERNAL_SERVER_ERROR,
        "AUDIT_001" | "AUDIT_002" | "AUDIT_003" | "AUDIT_004" | "AUDIT_005" => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        // The API's own.
        UNAUTHENTICATED => StatusCode::UNAUTHORIZED,
        INVALID_JSON => StatusCode::BAD_REQUEST,
        BODY_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        NO_ROUTE => StatusCode::NOT_FOUND,
        METHOD_NOT_ALLOWED => StatusCode::METHOD_NOT_ALLOWED,
        INVALID_PARAMETER => StatusCode::BAD_REQUEST,
        INTERNAL => StatusCode::INTERNAL_SERVER_ERROR,
        _ => return None,
    })
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Stable code.
    pub code: &'static str,
    /// Message.
    pub message: String,
}

impl ApiError {
    /// An error with `code` (its status comes from [`status_for`]).
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// A bad path/query parameter or field value (400, API_007).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMETER, message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        status_for(self.code)
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(
                code = self.code,
                status = status.as_u16(),
                "{}",
                self.message
            );
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                status: status.as_u16(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"symbiont\""),
            );
        }
        response
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

/// Maps a JSON body rejection to the API's codes with a message that says what to fix.
pub fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            INVALID_JSON,
            format!(
                "the request body is not valid JSON: {}",
                inner_message(&e.body_text())
            ),
        ),
        JsonRejection::JsonDataError(e) => ApiError::new(
            INVALID_JSON,
            format!(
                "the request body does not match what this route takes: {}",
                inner_message(&e.body_text())
            ),
        ),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            UNSUPPORTED_MEDIA_TYPE,
            "the request body must be JSON with `Content-Type: application/json`",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => body_too_large(),
        other => ApiError::new(
            INVALID_JSON,
            format!("the request body could not be read: {}", other.body_text()),
        ),
    }
}

/// The 413 error.
pub fn body_too_large() -> ApiError {
    ApiError::new(
        BODY_TOO_LARGE,
        "the request body is larger than the daemon accepts ([api] max_body_bytes)",
    )
}

/// axum's messages repeat a generic prefix; keep the part naming the position and cause.
fn inner_message(text: &str) -> String {
    text.split_once(": ")
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_else(|| text.to_string())
}

/// A JSON body extractor whose rejections are API errors.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// A query-string extractor whose rejections are API errors (400, API_007).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::invalid(format!(
        "invalid query string: {}",
        inner_message(&rejection.body_text())
    ))
}

/// Parses an id path segment.
pub fn parse_id(text: &str, what: &str) -> ApiResult<uuid::Uuid> {
    uuid::Uuid::parse_str(text).map_err(|_| {
        ApiError::invalid(format!(
            "`{text}` is not a {what} id (a UUID like 0b6f6f4e-2f1c-4a8e-9a53-3f8f5c1d2e7a)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_code_has_a_fitting_status() {
        assert_eq!(status_for("AGENT_001"), StatusCode::NOT_FOUND);
        assert_eq!(status_for("SCHED_002"), StatusCode::NOT_FOUND);
        assert_eq!(status_for("SEC_001"), StatusCode::FORBIDDEN);
        assert_eq!(status_for("RESOURCE_001"), StatusCode::CONFLICT);
        assert_eq!(status_for("DSL_001"), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status_for(UNAUTHENTICATED), StatusCode::UNAUTHORIZED);
        assert_eq!(status_for(INVALID_JSON), StatusCode::BAD_REQUEST);
        assert_eq!(status_for(BODY_TOO_LARGE), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status_for("NOPE_999"), StatusCode::INTERNAL_SERVER_ERROR);
        // Every code of docs/errors.md is in the table, and the table in
        // docs/service.md says the same as the code.
        let doc = include_str!("../../../docs/errors.md");
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let code = line.split('`').nth(1).expect("code");
            assert!(mapped_status(code).is_some(), "{code} has no HTTP status");
        }
        let service = include_str!("../../../docs/service.md");
        let section = service
            .split("## Error mapping")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/service.md has an `## Error mapping` section");
        let mut rows = 0;
        for line in section.lines().filter(|l| l.starts_with("| `")) {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let codes = cells.next().expect("codes");
            let status: u16 = cells
                .next()
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no status in `{line}`"));
            for code in codes.split(',').map(|c| c.trim().trim_matches('`')) {
                assert_eq!(
                    mapped_status(code).map(|s| s.as_u16()),
                    Some(status),
                    "docs/service.md says {code} -> {status}"
                );
                rows += 1;
            }
        }
        assert!(
            rows > 40,
            "the error mapping table lists every code ({rows})"
        );
    }
}
