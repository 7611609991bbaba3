//! The Tier2 gVisor sandbox (runsc).

use serde::{Deserialize, Serialize};

use crate::config::{ConfigIssue, Validate};

/// `[sandbox.gvisor]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GvisorConfig {}

impl Validate for GvisorConfig {
    fn validate(&self, _issues: &mut Vec<ConfigIssue>) {}
}
