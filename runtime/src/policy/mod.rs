//! The policy engine: rules over the actions the runtime controls (send, receive, network,
//! writable paths, exec, resource requests), deny-overrides-allow evaluation, audit selection.

use thiserror::Error;

/// Errors of the policy engine.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// A policy denied the action.
    #[error("security violation: policy denies {0}")]
    Denied(String),
}

impl PolicyError {
    /// Stable code: SEC_001 for a denial.
    pub fn code(&self) -> &'static str {
        "SEC_001"
    }
}
