//! The Tier2 gVisor sandbox: the Docker tier's containers run by `runsc` (registered in
//! dockerd as the `runsc` runtime, selected with `HostConfig.Runtime`), so the program talks
//! to gVisor's user-space kernel instead of the host's.
//!
//! All the container machinery is shared with [`crate::sandbox::docker`]; this module only
//! holds what differs: the runtime name, the probe's install hint, and what gVisor enforces
//! here, measured on this kind of machine (runsc 20221219, ptrace platform, cgroup v1):
//! - memory: yes. The Sentry's memory is charged to the container's cgroup; a hog past the
//!   limit is OOM-killed and dockerd reports `OOMKilled`.
//! - CPU: yes. The CFS quota from `NanoCpus` applies to the Sentry's threads (a busy loop
//!   with 0.5 cores measures ~0.5 from the Docker stats).
//! - pids: yes, as host tasks. The pids cgroup counts the sandbox's host tasks (~50 for an
//!   idle sandbox, ~9 more per guest process), so the limit is
//!   `pids_overhead + pids_per_process × [sandbox] pids_limit`; a fork bomb that reaches it
//!   ends the whole sandbox (runsc exits), the host is unaffected.
//! - disk I/O: NO. The gofer writes through the host page cache (`O_DIRECT` is not passed
//!   through), so blkio throttling never sees the sandbox's writes (40 MB of `dd
//!   oflag=direct` ran at >30 MB/s with a 10 MB/s throttle). `disk_io_mbps > 0` is refused
//!   with RESOURCE_002.
//! - network: yes, by the host kernel: gVisor's netstack sends and receives through the
//!   container's veth, so the `tbf` qdiscs on both ends apply as for Tier1 (measured 7.6 Mb/s
//!   down and 7.7 Mb/s up under an 8 Mb/s limit).
//!
//! The packaged runsc refuses its netstack on kernels that show `net.core.rmem_default` in
//! every network namespace (gVisor issue #10704); `scripts/setup.d/20-docker.sh` registers it
//! through a wrapper that hides `/proc/sys/net` from runsc's own check (see
//! `docs/sandbox-docker.md`).

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigIssue, Validate};
use crate::sandbox::docker::backend::{ContainerBackend, Flavor, PidsPolicy};
use crate::sandbox::{
    EnforcementSupport, Sandbox, SandboxBackend, SandboxConfig, SandboxError, SandboxSpec, TierInfo,
};
use crate::types::SecurityTier;

/// `[sandbox.gvisor]` configuration. The daemon connection, network and base image come from
/// `[sandbox.docker]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GvisorConfig {
    /// Name under which runsc is registered in dockerd's `runtimes`.
    pub runtime: String,
    /// Image override for this tier (`None` = `[sandbox.docker] image` or the base image).
    pub image: Option<String>,
    /// Host tasks of an idle gVisor sandbox (added to the pids limit).
    pub pids_overhead: u64,
    /// Host tasks per guest process (multiplies `[sandbox] pids_limit`).
    pub pids_per_process: u64,
}

impl Default for GvisorConfig {
    fn default() -> Self {
        Self {
            runtime: "runsc".to_string(),
            image: None,
            pids_overhead: 64,
            pids_per_process: 9,
        }
    }
}

impl Validate for GvisorConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.runtime.trim().is_empty() {
            issues.push(ConfigIssue::new(
                "sandbox.gvisor.runtime",
                "must not be empty",
            ));
        }
        if let Some(image) = &self.image {
            if image.trim().is_empty() {
                issues.push(ConfigIssue::new(
                    "sandbox.gvisor.image",
                    "must not be empty (omit it to use the Docker tier's image)",
                ));
            }
        }
        if self.pids_per_process == 0 {
            issues.push(ConfigIssue::new(
                "sandbox.gvisor.pids_per_process",
                "must be at least 1",
            ));
        }
    }
}

/// What gVisor enforces here (see the module documentation for the measurements).
pub const GVISOR_ENFORCEMENT: EnforcementSupport = EnforcementSupport {
    memory: true,
    cpu: true,
    pids: true,
    disk_io: false,
    network_io: true,
};

/// Tier2: each sandbox is a Docker container run by gVisor's `runsc`.
#[derive(Clone, Debug)]
pub struct GvisorBackend {
    inner: ContainerBackend,
}

impl GvisorBackend {
    /// A backend for `[sandbox]` (`[sandbox.gvisor]` plus the daemon settings of
    /// `[sandbox.docker]`). Connecting is lazy.
    pub fn new(config: &SandboxConfig) -> Result<Self, SandboxError> {
        let g = &config.gvisor;
        let flavor = Flavor {
            tier: SecurityTier::Tier2,
            backend: "gvisor",
            runtime: Some(g.runtime.clone()),
            enforcement: GVISOR_ENFORCEMENT,
            image: g.image.clone(),
            pids: PidsPolicy::HostTasks {
                overhead: g.pids_overhead,
                per_process: g.pids_per_process,
            },
            live_update: false,
        };
        Ok(Self {
            inner: ContainerBackend::new(config, flavor)?,
        })
    }

    /// Makes sure this tier's image is present (imports the base image when needed).
    pub async fn ensure_base_image(&self) -> Result<String, SandboxError> {
        self.inner.ensure_base_image().await
    }
}

#[async_trait]
impl SandboxBackend for GvisorBackend {
    fn tier(&self) -> SecurityTier {
        SecurityTier::Tier2
    }

    async fn probe(&self) -> Result<TierInfo, SandboxError> {
        self.inner.probe().await
    }

    fn enforcement(&self) -> EnforcementSupport {
        self.inner.enforcement()
    }

    async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Sandbox>, SandboxError> {
        self.inner.create(spec).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AgentId;

    #[test]
    fn default_gvisor_config_is_valid() {
        let mut issues = Vec::new();
        GvisorConfig::default().validate(&mut issues);
        assert!(issues.is_empty(), "{issues:?}");
    }

    #[tokio::test]
    async fn gvisor_refuses_disk_rate_it_cannot_enforce() {
        let backend = GvisorBackend::new(&SandboxConfig::default()).expect("backend");
        assert!(!backend.enforcement().disk_io);
        let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/true"]);
        spec.limits.disk_io_mbps = 10;
        let err = backend.create(spec).await.err().expect("must refuse");
        assert_eq!(err.code(), "RESOURCE_002", "{err}");
    }
}
