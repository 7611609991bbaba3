//! # symbiont-runtime
//!
//! A secure runtime for autonomous agents. Every agent's program runs inside a real sandbox
//! (native namespaces/cgroups/seccomp/Landlock by default; Docker, gVisor or a microVM on
//! request) whose memory, CPU, disk and network limits the kernel enforces; tasks are
//! scheduled by priority with timeouts and retries; messages between agents are signed
//! (Ed25519) and encrypted (AES-256-GCM); faults are retried, restarted and circuit-broken;
//! and everything is recorded in a durable, hash-chained, signed audit trail.
//!
//! ```
//! use symbiont_runtime::*;
//! use std::time::Duration;
//!
//! let agent = AgentInstance::new(AgentConfig {
//!     name: "example_agent".to_string(),
//!     resource_limits: ResourceLimits { memory_mb: 256, ..Default::default() },
//!     ..Default::default()
//! });
//! assert_eq!(agent.state, AgentState::Created);
//! ```
//!
//! ## Modules, one owner each
//! - [`types`]: the seed's shared types (re-exported at the crate root);
//! - [`config`]: `runtime_config.toml` and `SYMBIONT_*` variables;
//! - [`error`]: [`RuntimeError`] and its stable codes;
//! - [`lifecycle`]: agent states and the controller that owns them;
//! - [`sandbox`]: where agents' programs run (native, Docker, gVisor, microVM);
//! - [`resource`]: admission, enforcement and monitoring of limits;
//! - [`scheduler`]: tasks by priority with timeouts, retries and load balancing;
//! - [`communication`]: the signed and encrypted message bus;
//! - [`error_handler`]: recovery actions and circuit breakers;
//! - [`integrations::audit_trail`]: the tamper-evident audit trail;
//! - [`dsl`], [`policy`]: agent definitions and the policies the runtime enforces;
//! - [`storage`]: the embedded durable store.

pub mod communication;
pub mod config;
pub mod dsl;
pub mod error;
pub mod error_handler;
pub mod integrations;
pub mod lifecycle;
pub mod policy;
pub mod resource;
pub mod runtime;
pub mod sandbox;
pub mod scheduler;
pub mod storage;
pub mod types;

pub use error::{Result, RuntimeError};
pub use types::*;

/// Installs the global `tracing` subscriber: level from `SYMBIONT_LOG_LEVEL` (or `default`
/// when unset), human-readable or JSON lines on stderr. Safe to call more than once.
pub fn init_logging(default: &str, format: config::LogFormat) {
    let filter = std::env::var(config::ENV_LOG_LEVEL).unwrap_or_else(|_| default.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Text => builder.try_init(),
        config::LogFormat::Json => builder.json().try_init(),
    };
}

/// The seed README's code blocks, compiled and run as doctests (see `docs/seed-api.md`).
#[cfg(doctest)]
#[doc = include_str!("../../docs/seed-api.md")]
pub struct SeedApiDoctests;

/// The README's Rust blocks, compiled as doctests so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
