//! The container backend both container tiers share: one Engine API connection (version
//! negotiated, 20.10 speaks 1.41), the probe, the limit checks, the image and network
//! preparation and the workspace. A [`Flavor`] holds the few things that differ between
//! Tier1 (runc) and Tier2 (runsc).

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bollard::Docker;
use tokio::sync::{Mutex, OnceCell};

use super::container::ContainerSandbox;
use super::hostnet::{self, HostNetwork};
use super::image::{self, BaseImage};
use super::translate::{self, CreateInputs, SANDBOX_GID, SANDBOX_UID};
use super::DockerConfig;
use crate::sandbox::{
    EnforcementSupport, Sandbox, SandboxConfig, SandboxError, SandboxSpec, TierInfo,
};
use crate::types::{Capability, SecurityTier};

/// How `[sandbox] pids_limit` (a number of processes) becomes the container's `PidsLimit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PidsPolicy {
    /// runc: the program's processes and threads are host tasks; the limit applies as is.
    Processes,
    /// runsc: the pids cgroup counts the sandbox's host tasks (the Sentry's threads, the
    /// gofer, one ptrace stub per guest address space, ...), measured at about `overhead`
    /// plus `per_process` per guest process here.
    HostTasks {
        /// Host tasks of an idle sandbox.
        overhead: u64,
        /// Host tasks added per guest process.
        per_process: u64,
    },
}

impl PidsPolicy {
    /// The `PidsLimit` for a `pids_limit` of guest processes.
    pub(crate) fn container_limit(&self, pids_limit: u64) -> i64 {
        let n = match self {
            PidsPolicy::Processes => pids_limit,
            PidsPolicy::HostTasks {
                overhead,
                per_process,
            } => overhead.saturating_add(pids_limit.saturating_mul(*per_process)),
        };
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

/// What differs between the container tiers.
#[derive(Clone, Debug)]
pub(crate) struct Flavor {
    /// The tier.
    pub tier: SecurityTier,
    /// Backend name (`docker`, `gvisor`); also names state directories and containers.
    pub backend: &'static str,
    /// OCI runtime registered in dockerd (`runsc`); `None` = the daemon's default.
    pub runtime: Option<String>,
    /// Which limits this flavor enforces (measured, see `docs/sandbox-docker.md`).
    pub enforcement: EnforcementSupport,
    /// Image override for this tier (`[sandbox.gvisor] image`).
    pub image: Option<String>,
    /// How the pids limit is applied.
    pub pids: PidsPolicy,
    /// Whether `docker update` works (runsc has no `update` command).
    pub live_update: bool,
}

/// State shared by a backend and its sandboxes.
#[derive(Debug)]
pub(crate) struct Shared {
    pub flavor: Flavor,
    pub docker_config: DockerConfig,
    pub state_dir: PathBuf,
    pub pids_limit: u64,
    client: OnceCell<Docker>,
    runtime_checked: OnceCell<()>,
    base: OnceCell<BaseImage>,
    images: Mutex<HashSet<String>>,
    network: OnceCell<HostNetwork>,
    devices: OnceCell<Vec<String>>,
}

impl Shared {
    /// The negotiated Engine API client (connects on first use).
    pub(crate) async fn docker(&self) -> Result<&Docker, SandboxError> {
        self.client
            .get_or_try_init(|| async {
                let socket = self.docker_config.socket.to_string_lossy().into_owned();
                let docker = Docker::connect_with_socket(
                    &socket,
                    self.docker_config.api_timeout.as_secs().max(1),
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| self.daemon_unavailable(&e.to_string()))?;
                let docker = docker
                    .negotiate_version()
                    .await
                    .map_err(|e| self.daemon_unavailable(&e.to_string()))?;
                Ok(docker)
            })
            .await
    }

    fn daemon_unavailable(&self, why: &str) -> SandboxError {
        SandboxError::Unavailable {
            tier: self.flavor.tier,
            reason: format!(
                "cannot reach the Docker daemon at {} ({why}). Install and start it with \
                 `bash scripts/setup.sh` (installs docker.io and runs \
                 `dockerd >/var/log/dockerd.log 2>&1 &`)",
                self.docker_config.socket.display()
            ),
        }
    }

    /// Turns runsc's refusal of its netstack into the install hint it needs.
    pub(crate) fn start_error(&self, e: bollard::errors::Error) -> SandboxError {
        let text = e.to_string();
        if text.contains("root network namespace") {
            return SandboxError::Unavailable {
                tier: self.flavor.tier,
                reason: format!(
                    "runsc refused its network stack ({text}); this runsc misdetects the host \
                     network namespace on this kernel (gVisor issue #10704). Register it through \
                     the wrapper that works around it: `bash scripts/setup.sh`"
                ),
            };
        }
        SandboxError::op("start container", e)
    }

    fn runtime_missing(&self, runtime: &str, found: &[String]) -> SandboxError {
        SandboxError::Unavailable {
            tier: self.flavor.tier,
            reason: format!(
                "the Docker daemon has no `{runtime}` runtime (it has: {}). Install gVisor and \
                 register it: `bash scripts/setup.sh`, or by hand `apt-get install runsc`, add \
                 {{\"runtimes\":{{\"{runtime}\":{{\"path\":\"/usr/local/lib/symbiont/runsc\",\
                 \"runtimeArgs\":[\"--platform=ptrace\"]}}}}}} to /etc/docker/daemon.json (the \
                 wrapper is written by scripts/setup.d/20-docker.sh) and send SIGHUP to dockerd",
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            ),
        }
    }

    /// Checks (once) that the flavor's OCI runtime is registered.
    async fn check_runtime(&self) -> Result<(), SandboxError> {
        let Some(runtime) = self.flavor.runtime.clone() else {
            return Ok(());
        };
        self.runtime_checked
            .get_or_try_init(|| async {
                let info = self
                    .docker()
                    .await?
                    .info()
                    .await
                    .map_err(|e| self.daemon_unavailable(&e.to_string()))?;
                let mut found: Vec<String> = info
                    .runtimes
                    .map(|r| r.into_keys().collect())
                    .unwrap_or_default();
                found.sort();
                if found.iter().any(|r| r == &runtime) {
                    Ok(())
                } else {
                    Err(self.runtime_missing(&runtime, &found))
                }
            })
            .await
            .map(|_| ())
    }

    /// The base image (built once per process; deterministic).
    fn base(&self) -> Result<&BaseImage, SandboxError> {
        if let Some(b) = self.base.get() {
            return Ok(b);
        }
        let built = image::build_base(&self.docker_config.busybox).map_err(|e| {
            SandboxError::Unavailable {
                tier: self.flavor.tier,
                reason: e.to_string(),
            }
        })?;
        let _ = self.base.set(built);
        self.base
            .get()
            .ok_or_else(|| SandboxError::op("build base image", "image cache not set"))
    }

    /// Makes sure `name` exists in the daemon; the base image is imported when missing,
    /// any other image must already be there (there is no registry).
    pub(crate) async fn ensure_image(&self, name: &str) -> Result<(), SandboxError> {
        let mut known = self.images.lock().await;
        if known.contains(name) {
            return Ok(());
        }
        let docker = self.docker().await?;
        match docker.inspect_image(name).await {
            Ok(_) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                let base = self.base()?;
                if base.name != name {
                    return Err(SandboxError::InvalidSpec(format!(
                        "image `{name}` is not present in the Docker daemon and there is no \
                         registry to pull it from; import it first (`docker import` / \
                         `docker load`) or omit it to use the built-in {}",
                        base.name
                    )));
                }
                import_base(docker, base).await?;
            }
            Err(e) => return Err(SandboxError::op("inspect image", e)),
        }
        known.insert(name.to_string());
        Ok(())
    }

    /// The bridge network (created and plumbed on first use).
    async fn network(&self) -> Result<&HostNetwork, SandboxError> {
        self.network
            .get_or_try_init(|| async {
                let docker = self.docker().await?;
                hostnet::ensure_network(
                    docker,
                    &self.docker_config.network,
                    &self.docker_config.bridge,
                )
                .await
            })
            .await
    }

    /// The blkio throttles for a `disk_io_mbps` limit: every [`Self::throttle_devices`] at
    /// the limit's rate, or none for 0 (unlimited).
    pub(crate) async fn blkio_throttles(
        &self,
        disk_io_mbps: u64,
    ) -> Result<Vec<(String, u64)>, SandboxError> {
        if disk_io_mbps == 0 {
            return Ok(Vec::new());
        }
        let rate = translate::disk_bytes_per_sec(disk_io_mbps);
        Ok(self
            .throttle_devices()
            .await?
            .iter()
            .map(|d| (d.clone(), rate))
            .collect())
    }

    /// Block devices to throttle: the disk behind the state directory (workspaces) and the
    /// disk behind Docker's root (the container's writable layer).
    pub(crate) async fn throttle_devices(&self) -> Result<&Vec<String>, SandboxError> {
        self.devices
            .get_or_try_init(|| async {
                let mut devices = Vec::new();
                std::fs::create_dir_all(&self.state_dir)?;
                let workspace_disk = super::blkdev::disk_of(&self.state_dir)?;
                let Some(disk) = workspace_disk else {
                    return Err(SandboxError::LimitUnsupported {
                        tier: self.flavor.tier,
                        limit: format!(
                            "disk_io_mbps: the state directory {} is not on a block device \
                             (tmpfs/overlay), so no blkio throttle can apply; move \
                             [sandbox] state_dir to a disk or set disk_io_mbps = 0",
                            self.state_dir.display()
                        ),
                    });
                };
                devices.push(disk.to_string_lossy().into_owned());
                let info = self.docker().await?.info().await.ok();
                if let Some(root) = info.and_then(|i| i.docker_root_dir) {
                    if let Ok(Some(d)) = super::blkdev::disk_of(Path::new(&root)) {
                        let d = d.to_string_lossy().into_owned();
                        if !devices.contains(&d) {
                            devices.push(d);
                        }
                    }
                }
                Ok(devices)
            })
            .await
    }
}

/// Serialises base-image imports of all backends in this process (concurrent imports of the
/// same tag would leave untagged duplicates behind).
static IMPORT_LOCK: Mutex<()> = Mutex::const_new(());

async fn import_base(docker: &Docker, base: &BaseImage) -> Result<(), SandboxError> {
    use futures::StreamExt;
    let _guard = IMPORT_LOCK.lock().await;
    if docker.inspect_image(&base.name).await.is_ok() {
        return Ok(()); // another backend imported it meanwhile
    }
    tracing::info!(image = %base.name, bytes = base.tar.len(), "importing the base image");
    let options = bollard::query_parameters::CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(image::BASE_IMAGE_REPO)
        .tag(&base.tag)
        .changes(vec![
            "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "WORKDIR /workspace".to_string(),
        ])
        .build();
    let body = bollard::body_full(bytes::Bytes::from(base.tar.clone()));
    let mut stream = docker.create_image(Some(options), Some(body), None);
    while let Some(item) = stream.next().await {
        item.map_err(|e| SandboxError::op("import base image", e))?;
    }
    docker
        .inspect_image(&base.name)
        .await
        .map_err(|e| SandboxError::op("import base image", e))?;
    Ok(())
}

/// The shared container backend (wrapped by `DockerBackend` and `GvisorBackend`).
#[derive(Clone, Debug)]
pub(crate) struct ContainerBackend {
    shared: Arc<Shared>,
}

impl ContainerBackend {
    /// A backend of `flavor` for `[sandbox]`.
    pub(crate) fn new(config: &SandboxConfig, flavor: Flavor) -> Result<Self, SandboxError> {
        if config.state_dir.to_string_lossy().contains(':') {
            return Err(SandboxError::InvalidSpec(format!(
                "[sandbox] state_dir {} must not contain `:` (it is bind-mounted)",
                config.state_dir.display()
            )));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                flavor,
                docker_config: config.docker.clone(),
                state_dir: config.state_dir.clone(),
                pids_limit: config.pids_limit,
                client: OnceCell::new(),
                runtime_checked: OnceCell::new(),
                base: OnceCell::new(),
                images: Mutex::new(HashSet::new()),
                network: OnceCell::new(),
                devices: OnceCell::new(),
            }),
        })
    }

    /// Which limits this tier enforces.
    pub(crate) fn enforcement(&self) -> EnforcementSupport {
        self.shared.flavor.enforcement
    }

    /// The base image's name.
    pub(crate) fn base_image_name(&self) -> Result<String, SandboxError> {
        Ok(self.shared.base()?.name.clone())
    }

    /// Imports the base image if needed; returns the image this tier uses by default.
    pub(crate) async fn ensure_base_image(&self) -> Result<String, SandboxError> {
        let name = self.default_image()?;
        self.shared.ensure_image(&name).await?;
        Ok(name)
    }

    fn default_image(&self) -> Result<String, SandboxError> {
        match (&self.shared.flavor.image, &self.shared.docker_config.image) {
            (Some(image), _) | (None, Some(image)) => Ok(image.clone()),
            (None, None) => self.base_image_name(),
        }
    }

    /// Connects, checks the runtime and reports the daemon.
    pub(crate) async fn probe(&self) -> Result<TierInfo, SandboxError> {
        let shared = &self.shared;
        let docker = shared.docker().await?;
        let version = docker
            .version()
            .await
            .map_err(|e| shared.daemon_unavailable(&e.to_string()))?;
        shared.check_runtime().await?;
        let mut warnings = Vec::new();
        if let Some(runtime) = &shared.flavor.runtime {
            let info = docker
                .info()
                .await
                .map_err(|e| shared.daemon_unavailable(&e.to_string()))?;
            let registered = info.runtimes.and_then(|mut r| r.remove(runtime));
            if let Some(r) = registered {
                let args = r.runtime_args.unwrap_or_default();
                if args.iter().any(|a| a.contains("network=host")) {
                    warnings.push(format!(
                        "{runtime} runs with --network=host: sandboxes use the host kernel's \
                         network stack (inside their own namespace) instead of gVisor's netstack"
                    ));
                }
                if args.iter().any(|a| a.contains("platform=kvm")) {
                    warnings.push(format!(
                        "{runtime} uses the KVM platform, which hangs on this kind of machine; \
                         register it with --platform=ptrace (`bash scripts/setup.sh`)"
                    ));
                }
            }
        }
        let e = shared.flavor.enforcement;
        if !e.disk_io {
            warnings.push(format!(
                "{} cannot enforce disk_io_mbps (refused with RESOURCE_002)",
                shared.flavor.tier
            ));
        }
        Ok(TierInfo {
            tier: shared.flavor.tier,
            backend: shared.flavor.backend.to_string(),
            details: format!(
                "dockerd {} (API {}), runtime {}",
                version.version.unwrap_or_default(),
                docker.client_version(),
                shared.flavor.runtime.as_deref().unwrap_or("runc (default)")
            ),
            warnings,
        })
    }

    /// Refuses a limit this tier cannot enforce (RESOURCE_002).
    fn check_limits(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let e = self.shared.flavor.enforcement;
        let tier = self.shared.flavor.tier;
        if spec.limits.disk_io_mbps > 0 && !e.disk_io {
            return Err(SandboxError::LimitUnsupported {
                tier,
                limit: format!(
                    "disk_io_mbps = {}: gVisor's gofer writes through the host page cache \
                     (O_DIRECT is not passed through), so the blkio throttle never sees the \
                     sandbox's writes; use disk_io_mbps = 0 on this tier or Tier1",
                    spec.limits.disk_io_mbps
                ),
            });
        }
        if spec.limits.network_io_mbps > 0
            && spec.has_capability(&Capability::Network)
            && !e.network_io
        {
            return Err(SandboxError::LimitUnsupported {
                tier,
                limit: format!("network_io_mbps = {}", spec.limits.network_io_mbps),
            });
        }
        Ok(())
    }

    /// Prepares a container for `spec` without starting it.
    pub(crate) async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Sandbox>, SandboxError> {
        spec.validate()?;
        self.check_limits(&spec)?;
        let shared = &self.shared;
        shared.docker().await?;
        shared.check_runtime().await?;
        let image = match &spec.image {
            Some(image) => image.clone(),
            None => self.default_image()?,
        };
        shared.ensure_image(&image).await?;
        let blkio = shared.blkio_throttles(spec.limits.disk_io_mbps).await?;
        let network = if spec.has_capability(&Capability::Network) {
            Some(shared.network().await?.clone())
        } else {
            None
        };
        let shaping = match &network {
            Some(_) if spec.limits.network_io_mbps > 0 => Some(spec.limits.network_io_mbps),
            _ => None,
        };

        let short = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("symbiont-{}-{}", shared.flavor.backend, &short[..12]);
        let root = shared.state_dir.join(shared.flavor.backend).join(&id);
        let workspace = root.join("workspace");
        prepare_workspace(&workspace, &spec)?;

        let inputs = CreateInputs {
            sandbox_id: id.clone(),
            agent_id: spec.agent_id.to_string(),
            tier: shared.flavor.backend,
            image,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.to_string_lossy().into_owned(),
            workspace_host: workspace,
            network: network.as_ref().map(|n| n.name.clone()),
            host_addr: network.as_ref().map(|n| n.gateway.clone()),
            writable_root: spec.has_capability(&Capability::FileSystem),
            memory_bytes: i64::try_from(spec.limits.memory_bytes()).unwrap_or(i64::MAX),
            nano_cpus: translate::nano_cpus(spec.limits.cpu_cores),
            pids_limit: shared.flavor.pids.container_limit(shared.pids_limit),
            blkio,
            runtime: shared.flavor.runtime.clone(),
            tmp_size_mb: shared.docker_config.tmp_size_mb,
            gate: shaping.is_some(),
        };
        let body = translate::create_body(&inputs);
        let options = bollard::query_parameters::CreateContainerOptionsBuilder::new()
            .name(&id)
            .build();
        let docker = shared.docker().await?;
        if let Err(e) = docker.create_container(Some(options), body).await {
            let _ = std::fs::remove_dir_all(&root);
            return Err(SandboxError::op("create container", e));
        }
        tracing::debug!(sandbox = %id, tier = %shared.flavor.tier, "container created");
        Ok(Arc::new(ContainerSandbox::new(
            id,
            Arc::clone(&self.shared),
            spec,
            root,
            inputs.blkio,
            shaping,
        )))
    }
}

/// Creates the workspace directory with the spec's files, owned by the sandbox user.
fn prepare_workspace(workspace: &Path, spec: &SandboxSpec) -> Result<(), SandboxError> {
    let chown = |p: &Path| -> Result<(), SandboxError> {
        std::os::unix::fs::chown(p, Some(SANDBOX_UID), Some(SANDBOX_GID)).map_err(|e| {
            SandboxError::op("prepare workspace", format!("chown {}: {e}", p.display()))
        })
    };
    std::fs::create_dir_all(workspace).map_err(|e| {
        SandboxError::op("prepare workspace", format!("{}: {e}", workspace.display()))
    })?;
    std::fs::set_permissions(workspace, std::fs::Permissions::from_mode(0o755))?;
    chown(workspace)?;
    for file in &spec.files {
        let path = workspace.join(&file.path);
        let mut dir = workspace.to_path_buf();
        if let Some(parent) = file.path.parent() {
            for component in parent.components() {
                dir.push(component);
                if !dir.exists() {
                    std::fs::create_dir(&dir)?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
                    chown(&dir)?;
                }
            }
        }
        std::fs::write(&path, &file.contents)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode & 0o7777))?;
        chown(&path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gvisor_pids_limit_counts_host_tasks() {
        assert_eq!(PidsPolicy::Processes.container_limit(64), 64);
        let p = PidsPolicy::HostTasks {
            overhead: 64,
            per_process: 9,
        };
        assert_eq!(p.container_limit(10), 154);
    }

    #[test]
    fn workspace_files_keep_their_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path().join("ws");
        let mut spec = SandboxSpec::new(crate::types::AgentId::new(), ["/bin/true"]);
        spec.files.push(crate::sandbox::SandboxFile {
            path: "bin/run.sh".into(),
            contents: b"#!/bin/sh\necho hi\n".to_vec(),
            mode: 0o750,
        });
        prepare_workspace(&ws, &spec).expect("prepare");
        let meta = std::fs::metadata(ws.join("bin/run.sh")).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.uid(), SANDBOX_UID);
    }
}
