//! Sandboxes: where an agent's program actually runs.
//!
//! This module owns the tier-independent contract — [`SandboxSpec`] (what to run, with which
//! files, capabilities and limits), the [`SandboxBackend`] factory trait (one per tier) and the
//! [`Sandbox`] handle trait (start, stdio streams, exec, signal, stop, kill, wait, stats,
//! pause/resume, destroy) — and the [`SandboxRegistry`] that picks a backend from an agent's
//! [`SecurityTier`] and the `[sandbox]` configuration.
//!
//! The tiers live in submodules and are tested for real in `tests/`:
//! - `native`: namespaces + cgroups (v1 and v2) + seccomp + Landlock, no daemon (the default);
//! - `docker`: Tier1, Docker Engine API;
//! - `gvisor`: Tier2, `runsc`;
//! - `microvm`: Tier3, QEMU `microvm` or Firecracker.
//!
//! # Stdio framing
//! Every tier exposes the program's stdin, stdout and stderr as async byte streams
//! ([`SandboxStdio`]). Messages and tasks travel over stdin/stdout in the length-prefixed
//! frames documented in `docs/protocol.md`; stderr is free-form log text.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::types::{AgentId, Capability, ResourceLimits, SecurityTier};

pub mod docker;
pub mod gvisor;
pub mod microvm;
pub mod native;

/// A file the runtime places in the sandbox's workspace before the program starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxFile {
    /// Path relative to the workspace (`/workspace`); must not escape it.
    pub path: PathBuf,
    /// The file's bytes.
    pub contents: Vec<u8>,
    /// Unix permission bits (e.g. `0o755` for a script).
    pub mode: u32,
}

/// The tier-independent description of what to run and under which constraints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The agent this sandbox belongs to (names cgroups, containers, VMs).
    pub agent_id: AgentId,
    /// Program and arguments; `argv[0]` is a path inside the sandbox.
    pub argv: Vec<String>,
    /// Environment variables (nothing from the host's environment leaks in).
    pub env: HashMap<String, String>,
    /// Files placed in the workspace before start.
    pub files: Vec<SandboxFile>,
    /// Working directory inside the sandbox (default `/workspace`).
    pub workdir: PathBuf,
    /// Container or VM base image; `None` uses the tier's default
    /// (see `[sandbox]` configuration).
    pub image: Option<String>,
    /// Capabilities granted (`Network`, `FileSystem`, ...); everything else is denied.
    pub capabilities: Vec<Capability>,
    /// Resource limits the kernel or the tier enforces.
    pub limits: ResourceLimits,
    /// Wall-clock limit of the main program; when it elapses the sandbox is killed and
    /// [`ExitReason::Timeout`] is reported. `None` means no limit.
    pub timeout: Option<Duration>,
}

impl SandboxSpec {
    /// A spec running `argv` for `agent_id` with default limits and no capabilities.
    pub fn new(agent_id: AgentId, argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            agent_id,
            argv: argv.into_iter().map(Into::into).collect(),
            env: HashMap::new(),
            files: Vec::new(),
            workdir: PathBuf::from(WORKSPACE_DIR),
            image: None,
            capabilities: Vec::new(),
            limits: ResourceLimits::default(),
            timeout: None,
        }
    }

    /// True when `cap` is granted.
    pub fn has_capability(&self, cap: &Capability) -> bool {
        self.capabilities.contains(cap)
    }

    /// Checks the spec before any work is done: non-empty argv, workspace-relative file paths
    /// without `..`, valid limits.
    pub fn validate(&self) -> Result<(), SandboxError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(SandboxError::InvalidSpec("argv must name a program".into()));
        }
        for file in &self.files {
            let bad = file.path.is_absolute()
                || file
                    .path
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)));
            if bad {
                return Err(SandboxError::InvalidSpec(format!(
                    "file path {} must be relative to the workspace and must not contain `..`",
                    file.path.display()
                )));
            }
        }
        if let Err((field, why)) = self.limits.validate() {
            return Err(SandboxError::InvalidSpec(format!("limits.{field}: {why}")));
        }
        Ok(())
    }
}

/// The workspace directory inside every sandbox.
pub const WORKSPACE_DIR: &str = "/workspace";

/// Why a sandbox's main program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// It exited on its own (see `code`).
    Exited,
    /// A signal ended it that the runtime did not send (see `signal`).
    Signaled,
    /// The memory limit was hit and the kernel (or the VM) killed it. A resource violation.
    OutOfMemory,
    /// `SandboxSpec::timeout` elapsed and the runtime killed it. A resource violation.
    Timeout,
    /// `stop` or `kill` ended it.
    Killed,
}

/// How a sandbox's main program ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxExit {
    /// Why it ended.
    pub reason: ExitReason,
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// Time from start to exit.
    pub duration: Duration,
}

impl SandboxExit {
    /// True when the exit was caused by a limit (memory, time) rather than by the program.
    pub fn is_resource_violation(&self) -> bool {
        matches!(self.reason, ExitReason::OutOfMemory | ExitReason::Timeout)
    }

    /// True for a clean `exit(0)`.
    pub fn success(&self) -> bool {
        self.reason == ExitReason::Exited && self.code == Some(0)
    }
}

/// Resource usage read from the kernel or the tier. Counters are cumulative since start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxStats {
    /// Current memory use in bytes.
    pub memory_bytes: u64,
    /// Peak memory use in bytes, when the tier reports it.
    pub memory_peak_bytes: u64,
    /// CPU time consumed, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Bytes read from block devices.
    pub disk_read_bytes: u64,
    /// Bytes written to block devices.
    pub disk_write_bytes: u64,
    /// Bytes received on the sandbox's network interfaces.
    pub net_rx_bytes: u64,
    /// Bytes sent on the sandbox's network interfaces.
    pub net_tx_bytes: u64,
    /// Number of processes/threads.
    pub pids: u64,
    /// CPU time of the agent's program alone, in nanoseconds, when the tier measures it
    /// apart from its own overhead (microVM: the program's cgroup in the guest, while
    /// `cpu_usage_ns` is the whole VMM's host CPU, which an idle guest keeps above zero).
    /// `None`: `cpu_usage_ns` is the program's. Idle detection uses this when present.
    #[serde(default)]
    pub program_cpu_ns: Option<u64>,
}

impl SandboxStats {
    /// This sample with its cumulative counters (CPU, disk, network) never below
    /// `previous`'s: a counter of a sandbox never goes back, but a tier may report a
    /// partial sample (Docker answers an exiting container's stats with empty block-I/O
    /// lists). Gauges (memory, pids) are taken as sampled.
    pub fn monotonic_after(mut self, previous: &SandboxStats) -> SandboxStats {
        self.cpu_usage_ns = self.cpu_usage_ns.max(previous.cpu_usage_ns);
        self.disk_read_bytes = self.disk_read_bytes.max(previous.disk_read_bytes);
        self.disk_write_bytes = self.disk_write_bytes.max(previous.disk_write_bytes);
        self.net_rx_bytes = self.net_rx_bytes.max(previous.net_rx_bytes);
        self.net_tx_bytes = self.net_tx_bytes.max(previous.net_tx_bytes);
        self.memory_peak_bytes = self.memory_peak_bytes.max(previous.memory_peak_bytes);
        self.program_cpu_ns = match (self.program_cpu_ns, previous.program_cpu_ns) {
            (Some(now), Some(before)) => Some(now.max(before)),
            (now, before) => now.or(before),
        };
        self
    }
}

/// Output of a command run with [`Sandbox::exec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (`-1` when killed by a signal).
    pub code: i32,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// A boxed async writer (the program's stdin).
pub type BoxedWriter = Pin<Box<dyn AsyncWrite + Send>>;
/// A boxed async reader (the program's stdout or stderr).
pub type BoxedReader = Pin<Box<dyn AsyncRead + Send>>;

/// The main program's standard streams, handed out once by [`Sandbox::start`].
pub struct SandboxStdio {
    /// Write here to reach the program's stdin.
    pub stdin: BoxedWriter,
    /// The program's stdout.
    pub stdout: BoxedReader,
    /// The program's stderr.
    pub stderr: BoxedReader,
}

impl std::fmt::Debug for SandboxStdio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxStdio").finish_non_exhaustive()
    }
}

/// Which limits a tier can enforce through the kernel or its VMM. Admission refuses a limit
/// the chosen tier cannot enforce (RESOURCE_002) instead of silently ignoring it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcementSupport {
    /// Memory ceiling.
    pub memory: bool,
    /// CPU share.
    pub cpu: bool,
    /// Process count.
    pub pids: bool,
    /// Disk bandwidth.
    pub disk_io: bool,
    /// Network bandwidth.
    pub network_io: bool,
}

/// What a tier's probe found on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierInfo {
    /// The tier.
    pub tier: SecurityTier,
    /// Backend name, e.g. `native`, `docker`, `gvisor`, `qemu-microvm`.
    pub backend: String,
    /// Version or details of what was found (kernel features, daemon version, VMM version).
    pub details: String,
    /// Warnings the operator should see (e.g. "KVM unusable, using TCG").
    pub warnings: Vec<String>,
}

/// Creates sandboxes of one tier.
#[async_trait]
pub trait SandboxBackend: Send + Sync + 'static {
    /// The tier this backend implements.
    fn tier(&self) -> SecurityTier;

    /// Checks that the tier can run here. The error says exactly how to install what is
    /// missing (SANDBOX_001).
    async fn probe(&self) -> Result<TierInfo, SandboxError>;

    /// Which limits this tier enforces.
    fn enforcement(&self) -> EnforcementSupport;

    /// Prepares a sandbox for `spec` (root filesystem, cgroup, container, VM image) without
    /// starting the program.
    async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Sandbox>, SandboxError>;
}

/// One live sandbox. All methods take `&self` so a handle can be shared (`Arc<dyn Sandbox>`)
/// by the lifecycle controller, the scheduler and the resource monitor.
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    /// A unique id (container id, cgroup name, VM name).
    fn id(&self) -> &str;

    /// The tier it runs in.
    fn tier(&self) -> SecurityTier;

    /// Starts the main program and hands out its stdio streams. Callable once.
    async fn start(&self) -> Result<SandboxStdio, SandboxError>;

    /// Runs another command inside the running sandbox, under the same confinement, and
    /// collects its output.
    async fn exec(&self, argv: &[String], timeout: Duration) -> Result<ExecOutput, SandboxError>;

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the main program.
    async fn signal(&self, signal: i32) -> Result<(), SandboxError>;

    /// SIGTERM, then SIGKILL after `grace`; returns how the program ended.
    async fn stop(&self, grace: Duration) -> Result<SandboxExit, SandboxError>;

    /// Kills everything in the sandbox at once.
    async fn kill(&self) -> Result<(), SandboxError>;

    /// Waits for the main program to end. Callable from several tasks and after the end;
    /// all callers get the same [`SandboxExit`]. Enforces [`SandboxSpec::timeout`].
    async fn wait(&self) -> Result<SandboxExit, SandboxError>;

    /// Current resource usage, read from the kernel or the tier.
    async fn stats(&self) -> Result<SandboxStats, SandboxError>;

    /// Freezes every process (cgroup freezer, `docker pause`, VM stop).
    async fn pause(&self) -> Result<(), SandboxError>;

    /// Thaws what [`Sandbox::pause`] froze.
    async fn resume(&self) -> Result<(), SandboxError>;

    /// Applies new limits to the running sandbox (used to throttle).
    async fn update_limits(&self, limits: &ResourceLimits) -> Result<(), SandboxError>;

    /// Kills what is left and removes every trace (processes, cgroups, containers, VM files,
    /// network devices). Idempotent.
    async fn destroy(&self) -> Result<(), SandboxError>;
}

/// Errors of the sandbox layer.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The tier cannot run on this host; the message says how to install it.
    #[error("{tier} sandbox unavailable: {reason}")]
    Unavailable {
        /// The tier.
        tier: SecurityTier,
        /// What is missing and how to install it.
        reason: String,
    },
    /// The spec cannot be run as given.
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    /// A limit this tier cannot enforce.
    #[error("{tier} sandbox cannot enforce {limit}")]
    LimitUnsupported {
        /// The tier.
        tier: SecurityTier,
        /// Which limit.
        limit: String,
    },
    /// The operation is not valid in the sandbox's current state (e.g. start twice).
    #[error("sandbox {id}: {message}")]
    InvalidState {
        /// Sandbox id.
        id: String,
        /// What was wrong.
        message: String,
    },
    /// Setting up or operating the sandbox failed.
    #[error("sandbox {operation} failed: {message}")]
    Operation {
        /// What was being done (`create`, `start`, `cgroup setup`, ...).
        operation: String,
        /// The underlying error.
        message: String,
    },
    /// I/O with the sandbox failed.
    #[error("sandbox I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl SandboxError {
    /// Stable code: SANDBOX_001 unavailable, SANDBOX_002 invalid spec, RESOURCE_002 limit not
    /// enforceable, SANDBOX_003 invalid state, SANDBOX_004 operation failed.
    pub fn code(&self) -> &'static str {
        match self {
            SandboxError::Unavailable { .. } => "SANDBOX_001",
            SandboxError::InvalidSpec(_) => "SANDBOX_002",
            SandboxError::LimitUnsupported { .. } => "RESOURCE_002",
            SandboxError::InvalidState { .. } => "SANDBOX_003",
            SandboxError::Operation { .. } | SandboxError::Io(_) => "SANDBOX_004",
        }
    }

    /// Shorthand for an [`SandboxError::Operation`].
    pub fn op(operation: impl Into<String>, message: impl std::fmt::Display) -> Self {
        SandboxError::Operation {
            operation: operation.into(),
            message: message.to_string(),
        }
    }
}

/// `[sandbox]` configuration: shared settings plus one sub-table per tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Where sandboxes keep their root filesystems, workspaces and images.
    pub state_dir: PathBuf,
    /// Most processes/threads one sandbox may hold (contains fork bombs).
    pub pids_limit: u64,
    /// `[sandbox.native]`
    pub native: native::NativeConfig,
    /// `[sandbox.docker]`
    pub docker: docker::DockerConfig,
    /// `[sandbox.gvisor]`
    pub gvisor: gvisor::GvisorConfig,
    /// `[sandbox.microvm]`
    pub microvm: microvm::MicrovmConfig,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/symbiont/sandboxes"),
            pids_limit: 256,
            native: Default::default(),
            docker: Default::default(),
            gvisor: Default::default(),
            microvm: Default::default(),
        }
    }
}

impl crate::config::Validate for SandboxConfig {
    fn validate(&self, issues: &mut Vec<crate::config::ConfigIssue>) {
        if self.state_dir.as_os_str().is_empty() {
            issues.push(crate::config::ConfigIssue::new(
                "sandbox.state_dir",
                "must not be empty",
            ));
        }
        if self.pids_limit < 8 {
            issues.push(crate::config::ConfigIssue::new(
                "sandbox.pids_limit",
                "must be at least 8",
            ));
        }
        self.native.validate(issues);
        self.docker.validate(issues);
        self.gvisor.validate(issues);
        self.microvm.validate(issues);
    }
}

/// Picks the backend for a tier. Backends are registered by the runtime at start according to
/// the `[sandbox]` configuration.
#[derive(Default, Clone)]
pub struct SandboxRegistry {
    backends: HashMap<SecurityTier, Arc<dyn SandboxBackend>>,
}

impl std::fmt::Debug for SandboxRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxRegistry")
            .field("tiers", &self.backends.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SandboxRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the backend of its tier.
    pub fn register(&mut self, backend: Arc<dyn SandboxBackend>) {
        self.backends.insert(backend.tier(), backend);
    }

    /// The backend for `tier`, or SANDBOX_001 when none is registered.
    pub fn backend(&self, tier: SecurityTier) -> Result<Arc<dyn SandboxBackend>, SandboxError> {
        self.backends
            .get(&tier)
            .cloned()
            .ok_or_else(|| SandboxError::Unavailable {
                tier,
                reason: format!("no {tier} backend is configured in [sandbox]"),
            })
    }
}

/// Probes every tier this build knows with `config` and registers those that work here.
/// Returns the registry and what each probe found; a tier whose probe fails is left out
/// (an agent asking for it gets SANDBOX_001 with the probe's install hint).
pub async fn probe_registry(config: &SandboxConfig) -> (SandboxRegistry, Vec<TierInfo>) {
    let mut registry = SandboxRegistry::new();
    let mut infos = Vec::new();
    let candidates: Vec<Result<Arc<dyn SandboxBackend>, SandboxError>> = vec![
        native::NativeBackend::new(config.clone()).map(|b| Arc::new(b) as _),
        docker::DockerBackend::new(config).map(|b| Arc::new(b) as _),
        gvisor::GvisorBackend::new(config).map(|b| Arc::new(b) as _),
        Ok(Arc::new(microvm::MicrovmBackend::new(config))),
    ];
    for candidate in candidates {
        let backend = match candidate {
            Ok(backend) => backend,
            Err(e) => {
                tracing::warn!(error = %e, "sandbox tier not available");
                continue;
            }
        };
        match backend.probe().await {
            Ok(info) => {
                infos.push(info);
                registry.register(backend);
            }
            Err(e) => {
                tracing::warn!(tier = %backend.tier(), error = %e, "sandbox tier not available")
            }
        }
    }
    (registry, infos)
}

/// The non-empty lines `busybox <flag>` prints, trimmed (`--list`: applet names;
/// `--list-full`: their install paths). Empty when busybox cannot be run; the callers (the
/// container and microVM images) then fall back to a fixed list.
pub(crate) fn busybox_list(busybox: &std::path::Path, flag: &str) -> Vec<String> {
    std::process::Command::new(busybox)
        .arg(flag)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_sample_never_moves_cumulative_counters_back() {
        let before = SandboxStats {
            memory_bytes: 50,
            cpu_usage_ns: 10,
            disk_write_bytes: 40 << 20,
            net_rx_bytes: 7,
            program_cpu_ns: Some(3),
            ..Default::default()
        };
        // Docker's stats of an exiting container: empty block-I/O and network lists.
        let partial = SandboxStats {
            memory_bytes: 20,
            cpu_usage_ns: 12,
            ..Default::default()
        };
        let merged = partial.monotonic_after(&before);
        assert_eq!(merged.disk_write_bytes, 40 << 20);
        assert_eq!(merged.net_rx_bytes, 7);
        assert_eq!(merged.cpu_usage_ns, 12);
        assert_eq!(merged.memory_bytes, 20, "gauges are taken as sampled");
        assert_eq!(merged.program_cpu_ns, Some(3));
    }

    #[test]
    fn spec_rejects_escaping_file_paths() {
        let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/true"]);
        spec.files.push(SandboxFile {
            path: "../etc/passwd".into(),
            contents: vec![],
            mode: 0o644,
        });
        let err = spec.validate().expect_err("must refuse ..");
        assert_eq!(err.code(), "SANDBOX_002");
    }

    #[test]
    fn spec_rejects_empty_argv() {
        let spec = SandboxSpec::new(AgentId::new(), Vec::<String>::new());
        assert!(spec.validate().is_err());
    }

    #[test]
    fn exit_classifies_resource_violations() {
        let exit = SandboxExit {
            reason: ExitReason::OutOfMemory,
            code: None,
            signal: Some(9),
            duration: Duration::from_millis(5),
        };
        assert!(exit.is_resource_violation());
        assert!(!exit.success());
    }
}
