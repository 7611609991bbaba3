//! The runtime's one top-level error and its stable codes.
//!
//! Each component owns its error enum (`LifecycleError`, `SandboxError`, ...) with a
//! `code()` method; [`RuntimeError`] wraps them and [`RuntimeError::code`] gives the stable
//! code that the CLI, the HTTP API and the docs (`docs/errors.md`) use. Codes never change
//! meaning once published.

use thiserror::Error;

use crate::communication::CommunicationError;
use crate::config::ConfigError;
use crate::dsl::DslError;
use crate::error_handler::ErrorHandlerError;
use crate::integrations::audit_trail::AuditError;
use crate::lifecycle::LifecycleError;
use crate::policy::PolicyError;
use crate::resource::ResourceError;
use crate::sandbox::SandboxError;
use crate::scheduler::SchedulerError;
use crate::storage::StorageError;

/// Any error the runtime returns. `code()` gives its stable code.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// Agent lifecycle (AGENT_xxx).
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// Resource admission, enforcement and monitoring (RESOURCE_xxx).
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// Task scheduling (SCHED_xxx).
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// Messaging (COMM_xxx, SEC_xxx for cryptographic rejections).
    #[error(transparent)]
    Communication(#[from] CommunicationError),
    /// Error handling and recovery (RECOVERY_xxx).
    #[error(transparent)]
    ErrorHandler(#[from] ErrorHandlerError),
    /// Sandboxes (SANDBOX_xxx, RESOURCE_xxx for limit violations).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The audit trail (AUDIT_xxx).
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Configuration (CONFIG_xxx).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Agent definitions (DSL_xxx).
    #[error(transparent)]
    Dsl(#[from] DslError),
    /// Policy decisions (SEC_xxx).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The embedded store (STORAGE_xxx).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl RuntimeError {
    /// The stable error code, e.g. `AGENT_001`. See `docs/errors.md`.
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::Lifecycle(e) => e.code(),
            RuntimeError::Resource(e) => e.code(),
            RuntimeError::Scheduler(e) => e.code(),
            RuntimeError::Communication(e) => e.code(),
            RuntimeError::ErrorHandler(e) => e.code(),
            RuntimeError::Sandbox(e) => e.code(),
            RuntimeError::Audit(e) => e.code(),
            RuntimeError::Config(e) => e.code(),
            RuntimeError::Dsl(e) => e.code(),
            RuntimeError::Policy(e) => e.code(),
            RuntimeError::Storage(e) => e.code(),
        }
    }
}

/// Shorthand for results carrying a [`RuntimeError`].
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
