//! The agent definition language carried in `AgentConfig::dsl_source`: its grammar, parser,
//! diagnostics, and the mapping of a definition onto a sandbox spec, handlers and policies.

use thiserror::Error;

/// Errors of the agent definition language.
#[derive(Debug, Error)]
pub enum DslError {
    /// The source does not parse or does not make sense; the message has line, column, an
    /// excerpt and a hint.
    #[error("{0}")]
    Invalid(String),
}

impl DslError {
    /// Stable code: DSL_001 invalid definition.
    pub fn code(&self) -> &'static str {
        "DSL_001"
    }
}
