//! The Tier1 Docker sandbox (Docker Engine API), and the container machinery Tier2 (gVisor)
//! shares with it.
//!
//! What this module owns:
//! - [`DockerConfig`] (`[sandbox.docker]`) and [`DockerBackend`], the Tier1 [`SandboxBackend`];
//! - the container machinery both container tiers use (`backend`: connection, probe, limit
//!   checks, image and network preparation; `container`: the [`Sandbox`] handle; `image`: the
//!   locally built base image; `hostnet`: the `symbiont` bridge, the host-loopback DNAT and the
//!   `tbf` bandwidth shaping; `blkdev`: the block device behind the workspace; `translate`: the
//!   pure mapping from a [`SandboxSpec`] to the Engine API and back). The gVisor tier
//!   (`crate::sandbox::gvisor`) is the same code with `HostConfig.Runtime = "runsc"`.
//!
//! Every limit reaches the kernel through the container's cgroup (memory = memory+swap, CFS
//! quota from `NanoCpus`, `PidsLimit`, blkio throttles on the workspace's device) or a `tbf`
//! qdisc on each side of its veth pair. See `docs/sandbox-docker.md`.
//!
//! [`Sandbox`]: crate::sandbox::Sandbox

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigIssue, Validate};
use crate::sandbox::{
    EnforcementSupport, Sandbox, SandboxBackend, SandboxConfig, SandboxError, SandboxSpec, TierInfo,
};
use crate::types::SecurityTier;

pub(crate) mod backend;
pub(crate) mod blkdev;
pub(crate) mod container;
pub(crate) mod hostnet;
pub(crate) mod image;
pub(crate) mod translate;

pub use image::BASE_IMAGE_REPO;

/// `[sandbox.docker]` configuration (also read by the gVisor tier, which talks to the same
/// daemon).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The Docker Engine's Unix socket.
    pub socket: PathBuf,
    /// Image for sandboxes whose spec names none. `None` uses the base image the runtime
    /// builds itself from `busybox` (`symbiont/base:<content hash>`).
    pub image: Option<String>,
    /// The static busybox the base image is made of.
    pub busybox: PathBuf,
    /// The Docker network sandboxes holding `Capability::Network` join (created on first use).
    pub network: String,
    /// The Linux bridge device of that network (at most 15 characters).
    pub bridge: String,
    /// Size of the private `/tmp` tmpfs, in MiB.
    pub tmp_size_mb: u64,
    /// Longest any single Engine API call may take before it is abandoned.
    #[serde(with = "humantime_serde")]
    pub api_timeout: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            image: None,
            busybox: PathBuf::from("/bin/busybox"),
            network: "symbiont".to_string(),
            bridge: "symbiont0".to_string(),
            tmp_size_mb: 64,
            api_timeout: Duration::from_secs(120),
        }
    }
}

impl Validate for DockerConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        if self.socket.as_os_str().is_empty() {
            issues.push(ConfigIssue::new(
                "sandbox.docker.socket",
                "must not be empty",
            ));
        }
        if let Some(image) = &self.image {
            if image.trim().is_empty() {
                issues.push(ConfigIssue::new(
                    "sandbox.docker.image",
                    "must not be empty (omit it to use the built-in base image)",
                ));
            }
        }
        if self.busybox.as_os_str().is_empty() {
            issues.push(ConfigIssue::new(
                "sandbox.docker.busybox",
                "must not be empty",
            ));
        }
        if self.network.trim().is_empty() {
            issues.push(ConfigIssue::new(
                "sandbox.docker.network",
                "must not be empty",
            ));
        }
        if self.bridge.is_empty() || self.bridge.len() > 15 || self.bridge.contains('/') {
            issues.push(ConfigIssue::new(
                "sandbox.docker.bridge",
                "must be a Linux interface name of 1 to 15 characters",
            ));
        }
        if self.tmp_size_mb == 0 {
            issues.push(ConfigIssue::new(
                "sandbox.docker.tmp_size_mb",
                "must be at least 1",
            ));
        }
        if self.api_timeout < Duration::from_secs(1) {
            issues.push(ConfigIssue::new(
                "sandbox.docker.api_timeout",
                "must be at least 1s",
            ));
        }
    }
}

/// What the Docker tier enforces through the kernel: everything.
pub const DOCKER_ENFORCEMENT: EnforcementSupport = EnforcementSupport {
    memory: true,
    cpu: true,
    pids: true,
    disk_io: true,
    network_io: true,
};

/// Tier1: each sandbox is a Docker container (runc) created through the Engine API.
#[derive(Clone, Debug)]
pub struct DockerBackend {
    inner: backend::ContainerBackend,
}

impl DockerBackend {
    /// A backend for `[sandbox]` (`state_dir`, `pids_limit`, `[sandbox.docker]`). Connecting
    /// is lazy: nothing talks to the daemon until [`SandboxBackend::probe`] or
    /// [`SandboxBackend::create`].
    pub fn new(config: &SandboxConfig) -> Result<Self, SandboxError> {
        let flavor = backend::Flavor {
            tier: SecurityTier::Tier1,
            backend: "docker",
            runtime: None,
            enforcement: DOCKER_ENFORCEMENT,
            image: None,
            pids: backend::PidsPolicy::Processes,
            live_update: true,
        };
        Ok(Self {
            inner: backend::ContainerBackend::new(config, flavor)?,
        })
    }

    /// The name of the base image the runtime builds (and imports on first use), e.g.
    /// `symbiont/base:3f2a…`. Building is cheap and deterministic; importing happens in
    /// [`SandboxBackend::create`].
    pub fn base_image_name(&self) -> Result<String, SandboxError> {
        self.inner.base_image_name()
    }

    /// Makes sure the base image is imported (used by setup to warm the cache and by the
    /// benchmark). Returns its name.
    pub async fn ensure_base_image(&self) -> Result<String, SandboxError> {
        self.inner.ensure_base_image().await
    }
}

#[async_trait]
impl SandboxBackend for DockerBackend {
    fn tier(&self) -> SecurityTier {
        SecurityTier::Tier1
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

    #[test]
    fn default_docker_config_is_valid() {
        let mut issues = Vec::new();
        DockerConfig::default().validate(&mut issues);
        assert!(issues.is_empty(), "{issues:?}");
    }

    #[test]
    fn docker_config_rejects_long_bridge_names() {
        let config = DockerConfig {
            bridge: "a-very-long-bridge-name".into(),
            ..Default::default()
        };
        let mut issues = Vec::new();
        config.validate(&mut issues);
        assert!(issues.iter().any(|i| i.key == "sandbox.docker.bridge"));
    }
}
