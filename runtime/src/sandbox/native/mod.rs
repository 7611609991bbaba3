//! The native Linux sandbox: the embedded default tier, no daemon.
//!
//! A sandbox is a process tree the runtime clones itself (no helper binary) into fresh
//! user, PID, mount, network, IPC and UTS namespaces, placed in per-sandbox cgroups
//! (v1 or v2) and confined by capabilities, rlimits, Landlock and seccomp:
//!
//! - [`plan`]: spec → root skeleton, mount plan, generated `/etc`, environment;
//! - [`cgroup`]: memory / CPU / pids / block-I/O limits, freezer, kill, counters;
//! - [`seccomp`]: the compiled syscall filters;
//! - [`net`]: veth + NAT + token buckets for sandboxes holding `Capability::Network`;
//! - [`child`]: the async-signal-safe code between clone and exec (PID 1 reaper, exec helper);
//! - [`sandbox`]: [`NativeSandbox`], the `Sandbox` implementation.
//!
//! # Identity
//! The user namespace maps sandbox uids/gids `0..uid_count` to host ids
//! `uid_base..uid_base+uid_count` (default `1000000000..+65536`); the program runs as
//! sandbox uid/gid `65534` (`agent`), i.e. host uid `uid_base + 65534`, with no
//! capabilities. Root of the sandbox is therefore never host root.
//!
//! # Process model
//! The sandbox's PID 1 is cloned directly from the calling thread (a fork-like `clone3`
//! with the new namespaces; it joins the sandbox's cgroups itself before anything else, and
//! its network namespace comes from a pool created ahead of time). See [`child`] for what it
//! does and `docs/sandbox-native.md` for the whole design. It holds the read end of a
//! *lifeline* pipe whose write end only the runtime holds: when the runtime process dies
//! (or drops the sandbox), the pipe closes, the kernel sends PID 1 `SIGIO`, and it exits —
//! which makes the kernel kill everything else in the sandbox.

pub mod cgroup;
pub mod child;
pub mod net;
pub mod plan;
pub mod sandbox;
pub mod seccomp;

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigIssue, Validate};
use crate::sandbox::{
    EnforcementSupport, Sandbox, SandboxBackend, SandboxConfig, SandboxError, SandboxSpec, TierInfo,
};
use crate::types::SecurityTier;

pub use sandbox::NativeSandbox;

/// `[sandbox.native]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NativeConfig {
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// First host uid/gid of the range the user namespace maps (sandbox id 0).
    pub uid_base: u32,
    /// How many ids are mapped.
    pub uid_count: u32,
    /// The uid the program runs as inside the sandbox.
    pub sandbox_uid: u32,
    /// The gid the program runs as inside the sandbox.
    pub sandbox_gid: u32,
    /// Host paths exposed read-only (missing ones are skipped; symlinks are recreated).
    pub ro_binds: Vec<PathBuf>,
    /// IPv4 pool from which each networked sandbox gets a /30.
    pub subnet: String,
    /// `RLIMIT_NOFILE` of sandboxed processes.
    pub nofile_limit: u64,
    /// How long the child may take to set itself up and exec the program.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Network namespaces kept ready (with `lo` up) so that starts do not pay for creating
    /// one; 0 creates each at start.
    pub netns_pool: usize,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            uid_base: 1_000_000_000,
            uid_count: 65_536,
            sandbox_uid: 65_534,
            sandbox_gid: 65_534,
            ro_binds: [
                "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
            subnet: "10.213.0.0/16".to_string(),
            nofile_limit: 4096,
            start_timeout: Duration::from_secs(10),
            netns_pool: 4,
        }
    }
}

impl Validate for NativeConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        let k = |f: &str| format!("sandbox.native.{f}");
        if self.uid_base == 0 {
            issues.push(ConfigIssue::new(
                k("uid_base"),
                "must not be 0 (sandbox root would be host root)",
            ));
        }
        if u64::from(self.uid_base) + u64::from(self.uid_count) > u64::from(u32::MAX) {
            issues.push(ConfigIssue::new(
                k("uid_count"),
                "uid_base + uid_count must fit in 32 bits",
            ));
        }
        if self.sandbox_uid == 0 || self.sandbox_uid >= self.uid_count {
            issues.push(ConfigIssue::new(
                k("sandbox_uid"),
                format!("must be in 1..{}", self.uid_count),
            ));
        }
        if self.sandbox_gid == 0 || self.sandbox_gid >= self.uid_count {
            issues.push(ConfigIssue::new(
                k("sandbox_gid"),
                format!("must be in 1..{}", self.uid_count),
            ));
        }
        for (i, b) in self.ro_binds.iter().enumerate() {
            if plan::check_workdir(b).is_err() || b == Path::new("/") {
                issues.push(ConfigIssue::new(
                    format!("sandbox.native.ro_binds[{i}]"),
                    format!(
                        "{} must be an absolute, normalized path other than /",
                        b.display()
                    ),
                ));
            }
            if b.starts_with("/etc") || b.starts_with("/proc") || b.starts_with("/dev") {
                issues.push(ConfigIssue::new(
                    format!("sandbox.native.ro_binds[{i}]"),
                    format!(
                        "{} is generated by the sandbox and cannot be bound",
                        b.display()
                    ),
                ));
            }
        }
        if let Err(e) = net::Pool::parse(&self.subnet) {
            issues.push(ConfigIssue::new(k("subnet"), e));
        }
        if self.nofile_limit < 64 {
            issues.push(ConfigIssue::new(k("nofile_limit"), "must be at least 64"));
        }
        if self.netns_pool > 64 {
            issues.push(ConfigIssue::new(k("netns_pool"), "must be at most 64"));
        }
        if self.start_timeout.is_zero() {
            issues.push(ConfigIssue::new(
                k("start_timeout"),
                "must be longer than 0s",
            ));
        }
    }
}

/// The Landlock ABI the native tier targets (best effort below it).
pub const LANDLOCK_ABI: landlock::ABI = landlock::ABI::V5;

/// The kernel's Landlock ABI version, or `None` when Landlock is unavailable.
pub fn kernel_landlock_abi() -> Option<i64> {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only returns
    // the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    (v > 0).then_some(v)
}

/// Builds the Landlock ruleset that confines writes to `dirs` (recursively) and `files`.
/// `Ok(None)` when the kernel has no Landlock.
pub fn write_ruleset(dirs: &[PathBuf], files: &[PathBuf]) -> Result<Option<OwnedFd>, SandboxError> {
    use landlock::{AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr};
    let e = |what: &str, err: &dyn std::fmt::Display| {
        SandboxError::op("landlock", format!("{what}: {err}"))
    };
    if kernel_landlock_abi().is_none() {
        return Ok(None);
    }
    let dir_access = AccessFs::from_write(LANDLOCK_ABI);
    let file_access = AccessFs::from_write(LANDLOCK_ABI) & AccessFs::from_file(LANDLOCK_ABI);
    let mut rs = Ruleset::default()
        .handle_access(dir_access)
        .map_err(|x| e("handle", &x))?
        .create()
        .map_err(|x| e("create", &x))?;
    for d in dirs {
        let fd = PathFd::new(d).map_err(|x| e(&d.display().to_string(), &x))?;
        rs = rs
            .add_rule(PathBeneath::new(fd, dir_access))
            .map_err(|x| e(&d.display().to_string(), &x))?;
    }
    for f in files {
        let fd = PathFd::new(f).map_err(|x| e(&f.display().to_string(), &x))?;
        rs = rs
            .add_rule(PathBeneath::new(fd, file_access))
            .map_err(|x| e(&f.display().to_string(), &x))?;
    }
    Ok(rs.into())
}

/// What the host offers the native tier, computed once.
#[derive(Debug)]
pub(crate) struct Host {
    pub layout: cgroup::CgroupLayout,
    pub block_device: Option<(u32, u32)>,
    pub last_cap: u32,
    pub seccomp: Arc<seccomp::SeccompPrograms>,
    pub pool: net::Pool,
    pub enforcement: EnforcementSupport,
    pub devices: Vec<String>,
    pub entries: Vec<plan::HostEntry>,
    /// The shared read-only root skeleton (`<state_dir>/.template-<pid>-<rand>/root`).
    pub template: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(dir) = self.template.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Prefix of the shared skeleton directories in `state_dir`.
pub const TEMPLATE_PREFIX: &str = ".template-";

/// Prefix of every native sandbox id (and so of its cgroups and state directory).
pub const ID_PREFIX: &str = "nat-";

/// A fresh sandbox id: `nat-<runtime pid>-<agent id prefix>-<random>`. The runtime's pid
/// lets a later runtime recognise leftovers of one that died (see
/// [`NativeBackend::sweep_stale`]).
pub fn sandbox_id(agent: &crate::types::AgentId) -> String {
    let agent = agent.as_uuid().simple().to_string();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{ID_PREFIX}{}-{}-{}",
        std::process::id(),
        &agent[..8],
        &rand[..8]
    )
}

/// The runtime pid recorded in a sandbox id (or a shared skeleton's name), when it has one.
pub fn owner_pid(id: &str) -> Option<u32> {
    id.strip_prefix(ID_PREFIX)
        .or_else(|| id.strip_prefix(TEMPLATE_PREFIX))?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// True when the runtime that created sandbox `id` is gone.
fn owner_is_dead(id: &str) -> bool {
    owner_pid(id).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
}

fn command_exists(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}

/// Creates native sandboxes.
#[derive(Debug, Clone)]
pub struct NativeBackend {
    pub(crate) config: Arc<SandboxConfig>,
    pub(crate) host: Arc<Host>,
}

impl NativeBackend {
    /// A backend for `config` (`[sandbox]`: state directory, pids limit, `[sandbox.native]`).
    /// Detects the cgroup layout, compiles the seccomp filters and creates the state
    /// directory. Fails with SANDBOX_001 when the host cannot run native sandboxes.
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let mut issues = Vec::new();
        config.validate(&mut issues);
        if let Some(i) = issues.first() {
            return Err(SandboxError::InvalidSpec(format!(
                "{}: {}",
                i.key, i.message
            )));
        }
        let unavailable = |reason: String| SandboxError::Unavailable {
            tier: SecurityTier::Native,
            reason,
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(unavailable(
                "the native tier needs root (it creates cgroups, user namespaces with id \
                 ranges and veth pairs); run the runtime as root"
                    .into(),
            ));
        }
        let layout = cgroup::CgroupLayout::detect(&config.native.cgroup_root)?;
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            unavailable(format!(
                "cannot create state_dir {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let block_device = cgroup::block_device_of(&config.state_dir);
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        let seccomp = Arc::new(seccomp::compile()?);
        let pool = net::Pool::parse(&config.native.subnet).map_err(SandboxError::InvalidSpec)?;
        let ctrls = layout.available_controllers();
        let has = |c: &str| ctrls.iter().any(|x| x == c);
        let enforcement = EnforcementSupport {
            memory: has("memory"),
            cpu: has("cpu"),
            pids: has("pids"),
            disk_io: block_device.is_some() && (has("blkio") || has("io")),
            network_io: command_exists("tc"),
        };
        let devices: Vec<String> = plan::DEVICES
            .iter()
            .filter(|d| Path::new("/dev").join(d).exists())
            .map(|d| d.to_string())
            .collect();
        let entries = plan::host_entries(&config.native.ro_binds);
        let rand = uuid::Uuid::new_v4().simple().to_string();
        let template_dir = config.state_dir.join(format!(
            "{TEMPLATE_PREFIX}{}-{}",
            std::process::id(),
            &rand[..8]
        ));
        let n = &config.native;
        let made = plan::create_skeleton(&plan::Skeleton {
            root: &template_dir.join("root"),
            entries: &entries,
            devices: &devices,
            host_uid: 0,
            host_gid: 0,
            writable_root: false,
            etc: plan::etc_files("symbiont", n.sandbox_uid, n.sandbox_gid, None),
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&template_dir);
            return Err(e);
        }
        let backend = Self {
            config: Arc::new(config),
            host: Arc::new(Host {
                layout,
                block_device,
                last_cap,
                seccomp,
                pool,
                enforcement,
                devices,
                entries,
                template: template_dir.join("root"),
            }),
        };
        backend.sweep_stale();
        // Start filling the network namespace pool now, so the first start benefits.
        net::NetnsPool::global(backend.config.native.netns_pool);
        Ok(backend)
    }

    /// The cgroup hierarchy in use.
    pub fn cgroup_version(&self) -> cgroup::CgroupVersion {
        self.host.layout.version
    }

    /// The `[sandbox]` configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Removes what runtimes that died without cleaning up left behind: cgroups (killing any
    /// process still in them), iptables rules and state directories of sandboxes whose
    /// owning runtime process no longer exists. Sandboxes of live runtimes (other processes
    /// sharing this host) are never touched. Returns how many sandboxes were swept.
    pub fn sweep_stale(&self) -> usize {
        let mut ids = std::collections::BTreeSet::new();
        let parents: Vec<PathBuf> = match self.host.layout.version {
            cgroup::CgroupVersion::V1 => cgroup::V1_CONTROLLERS
                .iter()
                .map(|c| self.host.layout.root.join(c).join(cgroup::PARENT))
                .collect(),
            cgroup::CgroupVersion::V2 => vec![self.host.layout.root.join(cgroup::PARENT)],
        };
        for p in parents
            .iter()
            .chain(std::iter::once(&self.config.state_dir))
        {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if name.starts_with(ID_PREFIX) && owner_is_dead(&name) {
                        ids.insert(name);
                    } else if name.starts_with(TEMPLATE_PREFIX) && owner_is_dead(&name) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        for id in &ids {
            let cg = cgroup::SandboxCgroup::new(&self.host.layout, id);
            if cg.exists() {
                let _ = cg.kill_all();
                if let Err(e) = cg.remove(Duration::from_secs(2)) {
                    tracing::warn!(sandbox = %id, error = %e, "sweeping a stale cgroup");
                }
            }
            let _ = std::fs::remove_dir_all(self.config.state_dir.join(id));
        }
        let rules = net::sweep_rules(owner_is_dead);
        if !ids.is_empty() || rules > 0 {
            tracing::info!(
                sandboxes = ids.len(),
                iptables_rules = rules,
                "swept leftovers of dead runtimes"
            );
        }
        ids.len()
    }

    /// Like [`SandboxBackend::create`] but returns the concrete type, whose extra accessors
    /// (state directory, cgroup directories, veth, reaper pid) serve diagnostics and tests.
    pub async fn create_native(&self, spec: SandboxSpec) -> Result<NativeSandbox, SandboxError> {
        NativeSandbox::create(self.clone(), spec).await
    }
}

#[async_trait]
impl SandboxBackend for NativeBackend {
    fn tier(&self) -> SecurityTier {
        SecurityTier::Native
    }

    async fn probe(&self) -> Result<TierInfo, SandboxError> {
        let unavailable = |reason: String| SandboxError::Unavailable {
            tier: SecurityTier::Native,
            reason,
        };
        for ns in ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"] {
            if !Path::new("/proc/self/ns").join(ns).exists() {
                return Err(unavailable(format!(
                    "the kernel lacks {ns} namespaces (CONFIG_{}_NS)",
                    ns.to_uppercase()
                )));
            }
        }
        let max_userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if max_userns == 0 {
            return Err(unavailable(
                "user namespaces are disabled: `sysctl -w user.max_user_namespaces=15000`".into(),
            ));
        }
        // SAFETY: PR_GET_SECCOMP has no pointer arguments.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
            return Err(unavailable(
                "the kernel lacks seccomp (CONFIG_SECCOMP_FILTER)".into(),
            ));
        }
        let mut warnings = Vec::new();
        let landlock = match kernel_landlock_abi() {
            Some(v) => format!("landlock ABI {v}"),
            None => {
                warnings.push(
                    "Landlock is unavailable: writes outside /workspace are limited only by the \
                     read-only root (enable CONFIG_SECURITY_LANDLOCK and lsm=landlock)"
                        .to_string(),
                );
                "no landlock".to_string()
            }
        };
        if !self.host.enforcement.disk_io {
            warnings.push(format!(
                "disk I/O limits cannot be enforced: {} is not on a block device",
                self.config.state_dir.display()
            ));
        }
        if !self.host.enforcement.network_io {
            warnings.push("`tc` not found: network bandwidth limits cannot be enforced (apt-get install iproute2)".into());
        }
        if !command_exists("iptables") {
            warnings.push("`iptables` not found: sandboxes with Capability::Network cannot reach the host (apt-get install iptables)".into());
        }
        let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Ok(TierInfo {
            tier: SecurityTier::Native,
            backend: "native".into(),
            details: format!(
                "kernel {}, cgroup {} at {}, seccomp filter, {landlock}, user namespace \
                 0..{} -> host {}..{}",
                uname.trim(),
                self.host.layout.version,
                self.host.layout.root.display(),
                self.config.native.uid_count,
                self.config.native.uid_base,
                u64::from(self.config.native.uid_base) + u64::from(self.config.native.uid_count)
            ),
            warnings,
        })
    }

    fn enforcement(&self) -> EnforcementSupport {
        self.host.enforcement
    }

    async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let sb = NativeSandbox::create(self.clone(), spec).await?;
        Ok(Arc::new(sb))
    }
}

// ---- cloning -----------------------------------------------------------------------------

/// A freshly cloned child: its pid and pidfd.
#[derive(Debug)]
pub(crate) struct Cloned {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// Owned data behind a [`child::Program`].
#[derive(Debug, Clone)]
pub(crate) struct OwnedProgram {
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub workdir: CString,
}

/// Owned data behind a [`child::Confine`].
#[derive(Debug, Clone)]
pub(crate) struct OwnedConfine {
    pub uid: u32,
    pub gid: u32,
    pub last_cap: u32,
    pub landlock_child_fd: libc::c_int,
    pub seccomp: Arc<seccomp::SeccompPrograms>,
    pub rlimits: Vec<(libc::c_int, libc::rlimit64)>,
}

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn fprog(p: &seccompiler::BpfProgram) -> libc::sock_fprog {
    libc::sock_fprog {
        len: p.len() as u16,
        filter: p.as_ptr() as *mut libc::sock_filter,
    }
}

const OOM_SCORE_ADJ: &[u8] = b"500";

/// Pointer arrays that must outlive the clone.
struct ProgramPtrs {
    candidates: Vec<*const libc::c_char>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl OwnedProgram {
    fn ptrs(&self) -> ProgramPtrs {
        ProgramPtrs {
            candidates: null_terminated(&self.candidates),
            argv: null_terminated(&self.argv),
            envp: null_terminated(&self.envp),
        }
    }

    fn raw(&self, p: &ProgramPtrs) -> child::Program {
        child::Program {
            candidates: p.candidates.as_ptr(),
            argv: p.argv.as_ptr(),
            envp: p.envp.as_ptr(),
            workdir: self.workdir.as_ptr(),
            oom_score_adj: OOM_SCORE_ADJ.as_ptr() as *const libc::c_char,
            oom_score_adj_len: OOM_SCORE_ADJ.len(),
        }
    }
}

impl OwnedConfine {
    fn raw(&self) -> Result<child::Confine, SandboxError> {
        if self.rlimits.len() > child::MAX_RLIMITS {
            return Err(SandboxError::op("spawn", "too many rlimits"));
        }
        let zero = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let mut rlimits = [(0, zero); child::MAX_RLIMITS];
        for (i, r) in self.rlimits.iter().enumerate() {
            rlimits[i] = *r;
        }
        Ok(child::Confine {
            uid: self.uid,
            gid: self.gid,
            last_cap: self.last_cap,
            landlock_fd: self.landlock_child_fd,
            seccomp: [
                fprog(&self.seccomp.guard),
                fprog(&self.seccomp.deny),
                fprog(&self.seccomp.clone3),
            ],
            rlimits,
            n_rlimits: self.rlimits.len(),
        })
    }
}

fn fd_table(
    fds: &[(RawFd, libc::c_int)],
) -> Result<([(RawFd, libc::c_int); child::MAX_FDS], usize), SandboxError> {
    if fds.len() > child::MAX_FDS {
        return Err(SandboxError::op("spawn", "too many descriptors"));
    }
    let mut t = [(-1, -1); child::MAX_FDS];
    t[..fds.len()].copy_from_slice(fds);
    Ok((t, fds.len()))
}

/// One prepared mount step.
#[derive(Debug, Clone)]
pub(crate) struct OwnedMount {
    pub source: Option<CString>,
    pub target: CString,
    pub fstype: Option<CString>,
    pub flags: libc::c_ulong,
    pub pivot: bool,
}

/// How a cloned child gets into its sandbox's cgroups without a slow migration. Writing a
/// pid to `cgroup.procs` takes a global lock that waits for an RCU grace period (milliseconds
/// on a busy host); instead, on v1 the child moves *itself* by writing `0` to each
/// controller's `tasks` file (one thread, no global lock), first thing after the clone and
/// in parallel with the parent; on v2 it is cloned straight into the directory
/// (`CLONE_INTO_CGROUP`).
#[derive(Debug, Clone)]
pub(crate) enum CgroupEntry {
    /// v1: the `tasks` files the child writes `0` to.
    V1 { tasks: Vec<CString> },
    /// v2: the directory for `CLONE_INTO_CGROUP`.
    V2 { dir: PathBuf },
}

impl CgroupEntry {
    pub(crate) fn for_cgroup(cg: &cgroup::SandboxCgroup) -> Result<Self, SandboxError> {
        Ok(match cg.v2_dir() {
            Some(d) => CgroupEntry::V2 {
                dir: d.to_path_buf(),
            },
            None => CgroupEntry::V1 {
                tasks: cg
                    .thread_join_files()
                    .iter()
                    .map(|p| {
                        CString::new(p.as_os_str().as_encoded_bytes())
                            .map_err(|_| SandboxError::op("cgroup", "NUL in a cgroup path"))
                    })
                    .collect::<Result<_, _>>()?,
            },
        })
    }

    /// The v1 `tasks` paths (empty on v2).
    fn tasks(&self) -> &[CString] {
        match self {
            CgroupEntry::V1 { tasks } => tasks,
            CgroupEntry::V2 { .. } => &[],
        }
    }

    /// Runs `clone` with the v2 cgroup descriptor when there is one.
    fn clone_into(
        &self,
        clone: impl FnOnce(Option<libc::c_int>) -> Result<Cloned, SandboxError>,
    ) -> Result<Cloned, SandboxError> {
        match self {
            CgroupEntry::V2 { dir } => {
                let d = std::fs::File::open(dir)
                    .map_err(|e| SandboxError::op("cgroup", format!("{}: {e}", dir.display())))?;
                use std::os::fd::AsRawFd;
                clone(Some(d.as_raw_fd()))
            }
            CgroupEntry::V1 { .. } => clone(None),
        }
    }
}

/// Everything the reaper needs, owned, until [`ReaperJob::spawn`] turns it into pointers.
#[derive(Debug)]
pub(crate) struct ReaperJob {
    /// (parent fd, child fd); the parent fds are owned by `keep`.
    pub fds: Vec<(RawFd, libc::c_int)>,
    /// Child-side pipe ends, closed in the parent right after the clone.
    pub keep: Vec<OwnedFd>,
    pub mounts: Vec<OwnedMount>,
    pub hostname: CString,
    pub program: OwnedProgram,
    pub confine: OwnedConfine,
    pub timing: bool,
    pub cgroup: CgroupEntry,
    /// A pre-created network namespace to start in (else a new one is created).
    pub netns: Option<OwnedFd>,
}

/// Everything the exec helper needs.
#[derive(Debug)]
pub(crate) struct ExecJob {
    pub fds: Vec<(RawFd, libc::c_int)>,
    pub keep: Vec<OwnedFd>,
    pub cgroup: CgroupEntry,
    /// (child fd, CLONE_NEW* type).
    pub namespaces: Vec<(libc::c_int, libc::c_int)>,
    pub program: OwnedProgram,
    pub confine: OwnedConfine,
}

fn finish_clone(r: libc::c_long, pidfd: libc::c_int) -> Result<Cloned, SandboxError> {
    if r < 0 {
        return Err(SandboxError::op("clone", std::io::Error::last_os_error()));
    }
    // SAFETY: clone3 with CLONE_PIDFD stored a fresh descriptor we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Cloned {
        pid: r as i32,
        pidfd,
    })
}

/// Namespaces of a new sandbox.
pub(crate) const SANDBOX_NAMESPACES: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS) as u64;

/// The process's argv area (`arg_start`, length) from `/proc/self/stat`, read once.
fn argv_area() -> Option<(usize, usize)> {
    static AREA: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    *AREA.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised comm; arg_start/arg_end are fields 48 and 49.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let start: usize = f.get(48 - 3)?.parse().ok()?;
        let end: usize = f.get(49 - 3)?.parse().ok()?;
        (end > start && end - start < (1 << 20)).then_some((start, end - start))
    })
}

/// Runs `f` with the calling thread in network namespace `ns` (when given), so that a child
/// cloned meanwhile starts there; the thread returns to its own namespace afterwards.
fn with_netns(
    ns: Option<&OwnedFd>,
    f: impl FnOnce() -> Result<Cloned, SandboxError>,
) -> Result<Cloned, SandboxError> {
    use std::os::fd::AsRawFd;
    let Some(ns) = ns else { return f() };
    let home = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| SandboxError::op("netns", e))?;
    // SAFETY: setns on the calling thread with valid namespace descriptors.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(SandboxError::op("netns", std::io::Error::last_os_error()));
    }
    let r = f();
    // SAFETY: as above.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // A runtime thread left inside a sandbox's network namespace would open the
        // runtime's sockets there: unrecoverable.
        tracing::error!(
            error = %std::io::Error::last_os_error(),
            "cannot return to the host network namespace; aborting"
        );
        std::process::abort();
    }
    r
}

/// Stack of the program child between its vfork-style clone and exec.
const PROGRAM_STACK: usize = 256 * 1024;

impl ReaperJob {
    /// Clones the reaper (synchronously, on the calling thread).
    pub(crate) fn spawn(self) -> Result<Cloned, SandboxError> {
        let mounts: Vec<child::RawMount> = self
            .mounts
            .iter()
            .map(|m| child::RawMount {
                source: m.source.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                target: m.target.as_ptr(),
                fstype: m.fstype.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                flags: m.flags,
                pivot: m.pivot,
            })
            .collect();
        let ptrs = self.program.ptrs();
        let (fds, n_fds) = fd_table(&self.fds)?;
        let mut stack = vec![0u8; PROGRAM_STACK];
        let tasks = null_terminated(self.cgroup.tasks());
        let args = child::ReaperArgs {
            cgroup_tasks: tasks.as_ptr(),
            fds,
            n_fds,
            mounts: mounts.as_ptr(),
            n_mounts: mounts.len(),
            hostname: self.hostname.as_ptr(),
            hostname_len: self.hostname.as_bytes().len(),
            program: self.program.raw(&ptrs),
            confine: self.confine.raw()?,
            timing: self.timing,
            argv_area: argv_area().map_or(std::ptr::null_mut(), |(p, _)| p as *mut u8),
            argv_area_len: argv_area().map_or(0, |(_, l)| l),
            stack: stack.as_mut_ptr(),
            stack_len: stack.len(),
        };
        let netns = self.netns.as_ref();
        let r = self.cgroup.clone_into(|cgroup_fd| {
            with_netns(netns, || {
                let flags = if netns.is_some() {
                    SANDBOX_NAMESPACES & !(libc::CLONE_NEWNET as u64)
                } else {
                    SANDBOX_NAMESPACES
                };
                let mut pidfd: libc::c_int = -1;
                // SAFETY: fork-like clone; the child only runs reaper_main
                // (async-signal-safe, raw syscalls on `args`, whose pointers target data
                // alive in both address spaces).
                let r = unsafe { child::clone3_fork(flags, &mut pidfd, cgroup_fd) };
                if r == 0 {
                    // SAFETY: we are the child.
                    unsafe { child::reaper_main(&args) }
                }
                finish_clone(r, pidfd)
            })
        });
        drop(self.keep);
        drop(stack);
        r
    }
}

impl ExecJob {
    /// Clones the exec helper (synchronously, on the calling thread).
    pub(crate) fn spawn(self) -> Result<Cloned, SandboxError> {
        if self.namespaces.len() > child::MAX_NS {
            return Err(SandboxError::op("exec", "too many namespaces"));
        }
        let ptrs = self.program.ptrs();
        let (fds, n_fds) = fd_table(&self.fds)?;
        let tasks = null_terminated(self.cgroup.tasks());
        let mut namespaces = [(-1, 0); child::MAX_NS];
        namespaces[..self.namespaces.len()].copy_from_slice(&self.namespaces);
        let args = child::ExecArgs {
            cgroup_tasks: tasks.as_ptr(),
            fds,
            n_fds,
            namespaces,
            n_namespaces: self.namespaces.len(),
            program: self.program.raw(&ptrs),
            confine: self.confine.raw()?,
        };
        let r = self.cgroup.clone_into(|cgroup_fd| {
            let mut pidfd: libc::c_int = -1;
            // SAFETY: fork-like clone; the child only runs exec_main on prepared data.
            let r = unsafe { child::clone3_fork(0, &mut pidfd, cgroup_fd) };
            if r == 0 {
                // SAFETY: we are the child.
                unsafe { child::exec_main(&args) }
            }
            finish_clone(r, pidfd)
        });
        drop(self.keep);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_carry_the_owner_pid() {
        let id = sandbox_id(&crate::types::AgentId::new());
        assert!(id.starts_with(ID_PREFIX));
        assert_eq!(owner_pid(&id), Some(std::process::id()));
        assert!(!owner_is_dead(&id));
        assert!(owner_is_dead("nat-4000000000-aaaaaaaa-bbbbbbbb"));
        assert!(!owner_is_dead("nat-garbage"));
        assert!(id.len() < 40, "{id}");
    }

    #[test]
    fn default_config_is_valid() {
        let mut issues = Vec::new();
        NativeConfig::default().validate(&mut issues);
        assert!(issues.is_empty(), "{issues:?}");
    }

    #[test]
    fn config_rejects_dangerous_values() {
        let c = NativeConfig {
            uid_base: 0,
            sandbox_uid: 0,
            ro_binds: vec!["/etc".into(), "relative".into()],
            subnet: "10.0.0.0/31".into(),
            ..Default::default()
        };
        let mut issues = Vec::new();
        c.validate(&mut issues);
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        for k in [
            "sandbox.native.uid_base",
            "sandbox.native.sandbox_uid",
            "sandbox.native.ro_binds[0]",
            "sandbox.native.ro_binds[1]",
            "sandbox.native.subnet",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn config_parses_from_toml() {
        let c: NativeConfig = toml::from_str(
            "uid_base = 2000000\nsubnet = \"10.99.0.0/20\"\nstart_timeout = \"3s\"\n",
        )
        .expect("parse");
        assert_eq!(c.uid_base, 2_000_000);
        assert_eq!(c.start_timeout, Duration::from_secs(3));
        assert!(toml::from_str::<NativeConfig>("bogus = 1").is_err());
    }
}
