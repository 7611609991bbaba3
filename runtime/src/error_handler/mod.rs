//! Error handler: classifies an agent's error into an [`ErrorAction`], tracks per-agent
//! circuit breakers and backoff, and records every decision.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};

/// `[error_handler]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorHandlerConfig {
    /// Act on errors automatically (retry, restart) instead of only reporting them.
    pub enable_auto_recovery: bool,
    /// Recovery attempts per agent before it is left Failed.
    pub max_recovery_attempts: u32,
    /// Consecutive failures that open an agent's circuit breaker.
    pub circuit_breaker_threshold: u32,
}

impl Default for ErrorHandlerConfig {
    fn default() -> Self {
        Self {
            enable_auto_recovery: true,
            max_recovery_attempts: 3,
            circuit_breaker_threshold: 10,
        }
    }
}

impl Validate for ErrorHandlerConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.circuit_breaker_threshold == 0 {
            issues.push(ConfigIssue::new(
                "error_handler.circuit_breaker_threshold",
                "must be at least 1",
            ));
        }
    }
}

/// Errors of the error handler itself.
#[derive(Debug, Error)]
pub enum ErrorHandlerError {
    /// The agent's circuit breaker is open: no more attempts until it half-opens.
    #[error("circuit breaker open for agent {0}")]
    CircuitOpen(String),
}

impl ErrorHandlerError {
    /// Stable code: RECOVERY_001 circuit open.
    pub fn code(&self) -> &'static str {
        match self {
            ErrorHandlerError::CircuitOpen(_) => "RECOVERY_001",
        }
    }
}
