//! The Tier3 microVM sandbox (QEMU microvm or Firecracker).

use serde::{Deserialize, Serialize};

use crate::config::{ConfigIssue, Validate};

/// `[sandbox.microvm]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MicrovmConfig {}

impl Validate for MicrovmConfig {
    fn validate(&self, _issues: &mut Vec<ConfigIssue>) {}
}
