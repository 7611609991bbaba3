//! The native Linux sandbox (namespaces, cgroups v1/v2, seccomp, Landlock).

use serde::{Deserialize, Serialize};

use crate::config::{ConfigIssue, Validate};

/// `[sandbox.native]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NativeConfig {}

impl Validate for NativeConfig {
    fn validate(&self, _issues: &mut Vec<ConfigIssue>) {}
}
