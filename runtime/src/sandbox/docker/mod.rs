//! The Tier1 Docker sandbox (Docker Engine API).

use serde::{Deserialize, Serialize};

use crate::config::{ConfigIssue, Validate};

/// `[sandbox.docker]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {}

impl Validate for DockerConfig {
    fn validate(&self, _issues: &mut Vec<ConfigIssue>) {}
}
