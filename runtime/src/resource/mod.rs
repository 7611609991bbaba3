//! Resource manager: admission of agents' [`ResourceLimits`] against the host's capacity,
//! kernel enforcement of those limits through the sandbox tiers, and live monitoring of real
//! usage with an escalation ladder (warn → throttle → suspend/kill).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{ConfigIssue, Validate};
#[allow(unused_imports)]
use crate::types::ResourceLimits;

/// `[resource]` configuration. Totals of 0 are detected from the machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceManagerConfig {
    /// Memory available to agents, in bytes (0 = the machine's memory).
    pub total_memory: u64,
    /// CPU cores available to agents (0 = the machine's cores).
    pub total_cpu_cores: u32,
    /// Enforce limits through the kernel / the tier (`SYMBIONT_RESOURCE_ENFORCEMENT`).
    pub enforcement_enabled: bool,
    /// How often usage is sampled.
    #[serde(with = "humantime_serde")]
    pub monitoring_interval: Duration,
}

impl Default for ResourceManagerConfig {
    fn default() -> Self {
        Self {
            total_memory: 0,
            total_cpu_cores: 0,
            enforcement_enabled: true,
            monitoring_interval: Duration::from_secs(30),
        }
    }
}

impl Validate for ResourceManagerConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.monitoring_interval.is_zero() {
            issues.push(ConfigIssue::new(
                "resource.monitoring_interval",
                "must be longer than 0s",
            ));
        }
    }
}

/// Errors of the resource manager.
#[derive(Debug, Error)]
pub enum ResourceError {
    /// Not enough capacity left for the request; names what was short.
    #[error("insufficient resources: {0}")]
    Insufficient(String),
    /// The requested limits are impossible.
    #[error("invalid resource limits: {0}")]
    InvalidLimits(String),
}

impl ResourceError {
    /// Stable code: RESOURCE_001 insufficient, RESOURCE_004 invalid limits.
    pub fn code(&self) -> &'static str {
        match self {
            ResourceError::Insufficient(_) => "RESOURCE_001",
            ResourceError::InvalidLimits(_) => "RESOURCE_004",
        }
    }
}
