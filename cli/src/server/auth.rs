//! Bearer-token authentication: every route but `GET /health` goes through
//! [`require_token`], which checks the `Authorization: Bearer <token>` header against the
//! hashes of `<data_dir>/api_tokens.json` (see [`crate::tokens`]).

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, UNAUTHENTICATED};
use super::AppState;
use crate::tokens::AuthFailure;

/// The authentication middleware.
pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.tokens.check(header) {
        Ok(()) => next.run(req).await,
        Err(failure) => {
            let message = match failure {
                AuthFailure::Missing => {
                    "authentication required: send `Authorization: Bearer <token>` (create a \
                     token with `symbiont token create`)"
                }
                AuthFailure::Invalid => "the bearer token is not valid (or was revoked)",
                AuthFailure::NoTokens => {
                    "no API token exists yet: create one with `symbiont token create` on the \
                     daemon's host"
                }
            };
            ApiError::new(UNAUTHENTICATED, message).into_response()
        }
    }
}
