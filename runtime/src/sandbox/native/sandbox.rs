//! [`NativeSandbox`]: one native sandbox's life — create, start, exec, signal, wait, stats,
//! pause/resume, live limit updates and teardown.
//!
//! State lives on the host under `<state_dir>/<id>/root` (the sandbox's root skeleton,
//! including `/workspace` and `/tmp`) and in the kernel (cgroups `symbiont/<id>` in each
//! controller, the namespaces of the reaper process, the veth pair). A monitor task watches
//! the reaper's pidfd and report pipe, enforces `SandboxSpec::timeout`, classifies the exit
//! and publishes it on a watch channel so any number of callers can `wait()`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Mutex as AsyncMutex};

use super::cgroup::{CgroupLimits, SandboxCgroup};
use super::child::{self, kind, Report, REPORT_LEN};
use super::net::{self, NetAttachment};
use super::plan::{self, MountStep};
use super::{
    CgroupEntry, ExecJob, NativeBackend, OwnedConfine, OwnedMount, OwnedProgram, ReaperJob,
};
use crate::sandbox::{
    ExecOutput, ExitReason, SandboxError, SandboxExit, SandboxSpec, SandboxStats, SandboxStdio,
};
use crate::types::{Capability, ResourceLimits, SecurityTier};

/// Where a sandbox is in its life.
#[derive(Debug)]
enum Phase {
    Created,
    Running,
    Exited,
    /// `start` failed; nothing runs.
    Failed,
    Destroyed,
}

#[derive(Debug)]
struct Reaper {
    pid: i32,
    pidfd: Arc<OwnedFd>,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    reaper: Option<Reaper>,
    monitor: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    id: String,
    backend: NativeBackend,
    spec: SandboxSpec,
    dir: PathBuf,
    paths: SandboxPaths,
    cgroup: SandboxCgroup,
    landlock: Option<OwnedFd>,
    limits: parking_lot::Mutex<ResourceLimits>,
    state: parking_lot::Mutex<State>,
    net: AsyncMutex<Option<NetAttachment>>,
    env: parking_lot::Mutex<Vec<String>>,
    exit_tx: watch::Sender<Option<SandboxExit>>,
    /// Write end of the reaper's lifeline; dropping it ends the sandbox.
    lifeline: parking_lot::Mutex<Option<OwnedFd>>,
    killed: AtomicBool,
    timed_out: AtomicBool,
    started_at: parking_lot::Mutex<Option<Instant>>,
}

/// A native sandbox (see the module docs of [`crate::sandbox::native`]).
#[derive(Debug)]
pub struct NativeSandbox {
    inner: Arc<Inner>,
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SandboxError::op("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reaps the process behind `pidfd` (non-blocking); true when it was reaped (or is gone).
fn pidfd_reap(pidfd: &OwnedFd) -> bool {
    // SAFETY: waitid(P_PIDFD) writes into a zeroed siginfo.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        );
        r != 0 || info.si_pid() != 0
    }
}

/// Waits (async) until the process behind `pidfd` has exited, then reaps it.
async fn pidfd_wait(pidfd: Arc<OwnedFd>) -> Result<(), SandboxError> {
    let dup = pidfd.try_clone().map_err(SandboxError::Io)?;
    // SAFETY: `dup` is an open OwnedFd moved into the AsyncFd, which owns it until drop.
    let afd = unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE) }
        .map_err(|e| SandboxError::op("pidfd", e))?;
    loop {
        let mut guard = afd.readable().await?;
        if pidfd_reap(&pidfd) {
            return Ok(());
        }
        guard.clear_ready();
    }
}

async fn read_report<R: AsyncRead + Unpin>(r: &mut R) -> Option<Report> {
    let mut buf = [0u8; REPORT_LEN];
    match r.read_exact(&mut buf).await {
        Ok(_) => Some(Report::from_bytes(&buf)),
        Err(_) => None,
    }
}

fn os_error(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// Turns a raw wait status plus what the runtime knows into a [`SandboxExit`].
pub fn classify(
    status: Option<i32>,
    timed_out: bool,
    killed: bool,
    oom_kills: u64,
    duration: Duration,
) -> SandboxExit {
    let (code, signal) = match status {
        Some(s) if libc::WIFEXITED(s) => (Some(libc::WEXITSTATUS(s)), None),
        Some(s) if libc::WIFSIGNALED(s) => (None, Some(libc::WTERMSIG(s))),
        // The reaper died before it could report: only a SIGKILL does that.
        _ => (None, Some(libc::SIGKILL)),
    };
    let reason = if timed_out {
        ExitReason::Timeout
    } else if oom_kills > 0 && code != Some(0) {
        ExitReason::OutOfMemory
    } else if killed {
        ExitReason::Killed
    } else if signal.is_some() {
        ExitReason::Signaled
    } else {
        ExitReason::Exited
    };
    SandboxExit {
        reason,
        code,
        signal,
        duration,
    }
}

fn cgroup_limits(backend: &NativeBackend, limits: &ResourceLimits) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: limits.memory_bytes(),
        cpu_cores: limits.cpu_cores,
        pids_max: backend.config.pids_limit,
        block_device: backend.host.block_device,
        disk_bps: limits.disk_io_mbps.saturating_mul(1_000_000),
    }
}

impl NativeSandbox {
    /// Prepares the root skeleton, workspace files, cgroups and Landlock ruleset.
    pub(crate) async fn create(
        backend: NativeBackend,
        spec: SandboxSpec,
    ) -> Result<Self, SandboxError> {
        spec.validate()?;
        plan::check_workdir(&spec.workdir)?;
        if let Some(image) = &spec.image {
            // The native root is built from the host's read-only binds
            // (`[sandbox.native] ro_binds`); images belong to the container and VM tiers.
            tracing::warn!(%image, "the native tier ignores `image`; the program runs on host binaries");
        }
        for f in &spec.files {
            plan::check_relative(&f.path)?;
        }
        let enf = backend.host.enforcement;
        let unsupported = |limit: &str| SandboxError::LimitUnsupported {
            tier: SecurityTier::Native,
            limit: limit.to_string(),
        };
        if !enf.memory {
            return Err(unsupported("memory"));
        }
        if !enf.cpu {
            return Err(unsupported("cpu"));
        }
        if !enf.pids {
            return Err(unsupported("pids"));
        }
        if spec.limits.disk_io_mbps > 0 && !enf.disk_io {
            return Err(unsupported("disk_io_mbps"));
        }
        if spec.limits.network_io_mbps > 0
            && spec.has_capability(&Capability::Network)
            && !enf.network_io
        {
            return Err(unsupported("network_io_mbps"));
        }
        let id = super::sandbox_id(&spec.agent_id);
        let dir = backend.config.state_dir.join(&id);
        let paths = SandboxPaths::new(&backend, &spec, &dir);
        let cgroup = SandboxCgroup::new(&backend.host.layout, &id);
        let limits = spec.limits.clone();
        let env = plan::environment(&spec, None)?;
        let (exit_tx, _) = watch::channel(None);
        // About 2 ms of filesystem and cgroupfs work, done inline: a hop to the blocking
        // pool costs more than that on a busy host, and start latency is what matters.
        let landlock = match prepare_host(&backend, &spec, &paths, &dir, &cgroup) {
            Ok(l) => l,
            Err(e) => {
                let _ = cgroup.remove(Duration::from_millis(500));
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        tracing::debug!(sandbox = %id, "native sandbox created");
        Ok(Self {
            inner: Arc::new(Inner {
                id,
                backend,
                spec,
                dir,
                paths,
                cgroup,
                landlock,
                limits: parking_lot::Mutex::new(limits),
                state: parking_lot::Mutex::new(State {
                    phase: Phase::Created,
                    reaper: None,
                    monitor: None,
                }),
                net: AsyncMutex::new(None),
                env: parking_lot::Mutex::new(env),
                exit_tx,
                lifeline: parking_lot::Mutex::new(None),
                killed: AtomicBool::new(false),
                timed_out: AtomicBool::new(false),
                started_at: parking_lot::Mutex::new(None),
            }),
        })
    }

    /// The host directory holding this sandbox's root (for diagnostics and tests).
    pub fn root_dir(&self) -> &Path {
        &self.inner.paths.root
    }

    /// The host directory holding all of this sandbox's state (`<state_dir>/<id>`).
    pub fn state_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The cgroup directories of this sandbox (for diagnostics and leak checks).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.inner.cgroup.dirs()
    }

    /// The host-side veth while the sandbox is attached to the network.
    pub async fn host_interface(&self) -> Option<String> {
        self.inner
            .net
            .lock()
            .await
            .as_ref()
            .map(|n| n.host_if.clone())
    }

    /// The host pid of the sandbox's PID 1 while it runs.
    pub fn reaper_pid(&self) -> Option<i32> {
        self.inner.state.lock().reaper.as_ref().map(|r| r.pid)
    }
}

/// Where a sandbox's root and private directories are on the host.
#[derive(Debug, Clone)]
struct SandboxPaths {
    /// The skeleton that becomes `/`: the backend's shared read-only template, or (with
    /// `Capability::FileSystem`) the sandbox's own writable copy.
    root: PathBuf,
    /// Bound at `/workspace`.
    workspace: PathBuf,
    /// Bound at `/tmp`.
    tmp: PathBuf,
    /// Bound read-only at `/etc` when the skeleton's is not the sandbox's (a networked
    /// sandbox on the shared template needs its own `hosts`/`resolv.conf`).
    etc_bind: Option<PathBuf>,
    /// Where the generated `/etc` files of this sandbox live (rewritten at start when the
    /// network address is known).
    etc_dir: Option<PathBuf>,
}

impl SandboxPaths {
    fn new(b: &NativeBackend, spec: &SandboxSpec, dir: &Path) -> Self {
        if spec.has_capability(&Capability::FileSystem) {
            let root = dir.join("root");
            Self {
                workspace: root.join("workspace"),
                tmp: root.join("tmp"),
                etc_bind: None,
                etc_dir: Some(root.join("etc")),
                root,
            }
        } else {
            let net = spec.has_capability(&Capability::Network);
            Self {
                root: b.host.template.clone(),
                workspace: dir.join("workspace"),
                tmp: dir.join("tmp"),
                etc_bind: net.then(|| dir.join("etc")),
                etc_dir: net.then(|| dir.join("etc")),
            }
        }
    }
}

fn prepare_host(
    b: &NativeBackend,
    spec: &SandboxSpec,
    paths: &SandboxPaths,
    dir: &Path,
    cgroup: &SandboxCgroup,
) -> Result<Option<OwnedFd>, SandboxError> {
    let t0 = Instant::now();
    let n = &b.config.native;
    let host_uid = n.uid_base + n.sandbox_uid;
    let host_gid = n.uid_base + n.sandbox_gid;
    let writable_root = spec.has_capability(&Capability::FileSystem);
    let etc = plan::etc_files("symbiont", n.sandbox_uid, n.sandbox_gid, None);
    if writable_root {
        plan::create_skeleton(&plan::Skeleton {
            root: &paths.root,
            entries: &b.host.entries,
            devices: &b.host.devices,
            host_uid,
            host_gid,
            writable_root,
            etc,
        })?;
    } else {
        plan::create_private_dirs(
            dir,
            host_uid,
            host_gid,
            paths.etc_bind.is_some().then_some(etc.as_slice()),
        )?;
    }
    let t1 = Instant::now();
    plan::place_files(&paths.workspace, &spec.files, host_uid, host_gid)?;
    cgroup.create(&cgroup_limits(b, &spec.limits))?;
    let t2 = Instant::now();
    tracing::trace!(
        skeleton_us = (t1 - t0).as_micros() as u64,
        cgroup_us = (t2 - t1).as_micros() as u64,
        "prepared host side"
    );
    if writable_root {
        return Ok(None);
    }
    let files: Vec<PathBuf> = plan::WRITABLE_DEVICES
        .iter()
        .filter(|d| b.host.devices.iter().any(|x| x == *d))
        .map(|d| Path::new("/dev").join(d))
        .collect();
    super::write_ruleset(&[paths.workspace.clone(), paths.tmp.clone()], &files)
}

impl Inner {
    fn owned_program(&self, argv: &[String]) -> Result<OwnedProgram, SandboxError> {
        let env = self.env.lock().clone();
        let candidates = plan::exec_candidates(&argv[0], &env);
        Ok(OwnedProgram {
            candidates: plan::cstrings(&candidates, "argv[0]")?,
            argv: plan::cstrings(argv, "argv")?,
            envp: plan::cstrings(&env, "environment")?,
            workdir: plan::cstrings(&[self.spec.workdir.display().to_string()], "workdir")?
                .remove(0),
        })
    }

    fn owned_confine(&self, landlock_child_fd: libc::c_int) -> OwnedConfine {
        let n = &self.backend.config.native;
        let lim = |cur: u64, max: u64| libc::rlimit64 {
            rlim_cur: cur,
            rlim_max: max,
        };
        OwnedConfine {
            uid: n.sandbox_uid,
            gid: n.sandbox_gid,
            last_cap: self.backend.host.last_cap,
            landlock_child_fd: if self.landlock.is_some() {
                landlock_child_fd
            } else {
                -1
            },
            seccomp: self.backend.host.seccomp.clone(),
            rlimits: vec![
                (
                    libc::RLIMIT_NOFILE as libc::c_int,
                    lim(n.nofile_limit, n.nofile_limit),
                ),
                (libc::RLIMIT_CORE as libc::c_int, lim(0, 0)),
            ],
        }
    }

    fn mounts(&self) -> Result<Vec<OwnedMount>, SandboxError> {
        let steps = plan::mount_plan(&plan::MountInputs {
            root: &self.paths.root,
            entries: &self.backend.host.entries,
            devices: &self.backend.host.devices,
            writable_root: self.spec.has_capability(&Capability::FileSystem),
            workspace: &self.paths.workspace,
            tmp: &self.paths.tmp,
            etc: self.paths.etc_bind.as_deref(),
            locked: &plan::locked_flags,
        });
        let c = |p: &Path| {
            plan::cstrings(&[p.display().to_string()], "mount path").map(|mut v| v.remove(0))
        };
        steps
            .iter()
            .map(|s| match s {
                MountStep::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                } => Ok(OwnedMount {
                    source: source.as_deref().map(c).transpose()?,
                    target: c(target)?,
                    fstype: fstype
                        .as_deref()
                        .map(|f| plan::cstrings(&[f], "fstype").map(|mut v| v.remove(0)))
                        .transpose()?,
                    flags: *flags,
                    pivot: false,
                }),
                MountStep::PivotRoot { new_root } => Ok(OwnedMount {
                    source: None,
                    target: c(new_root)?,
                    fstype: None,
                    flags: 0,
                    pivot: true,
                }),
            })
            .collect()
    }

    fn describe_stage(&self, stage: i32) -> String {
        if stage >= child::stage::MOUNT_BASE {
            let i = (stage - child::stage::MOUNT_BASE) as usize;
            let steps = plan::mount_plan(&plan::MountInputs {
                root: &self.paths.root,
                entries: &self.backend.host.entries,
                devices: &self.backend.host.devices,
                writable_root: self.spec.has_capability(&Capability::FileSystem),
                workspace: &self.paths.workspace,
                tmp: &self.paths.tmp,
                etc: self.paths.etc_bind.as_deref(),
                locked: &plan::locked_flags,
            });
            return steps
                .get(i)
                .map(|s| s.describe())
                .unwrap_or_else(|| format!("mount step {i}"));
        }
        child::stage_name(stage).to_string()
    }

    fn write_id_maps(&self, pid: i32) -> Result<(), SandboxError> {
        let n = &self.backend.config.native;
        let map = format!("0 {} {}\n", n.uid_base, n.uid_count);
        for f in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{f}"), &map)
                .map_err(|e| SandboxError::op("user namespace", format!("{f}: {e}")))?;
        }
        Ok(())
    }

    fn kill_now(&self) {
        if let Some(r) = self.state.lock().reaper.as_ref() {
            let _ = pidfd_signal(&r.pidfd, libc::SIGKILL);
        }
    }

    /// Kills every process: the reaper (the kernel then kills its whole PID namespace) and
    /// the cgroup (exec helpers and anything else in it).
    async fn kill_all(self: &Arc<Self>) -> Result<(), SandboxError> {
        self.kill_now();
        let cg = self.cgroup.clone();
        if cg.exists() {
            tokio::task::spawn_blocking(move || cg.kill_all())
                .await
                .map_err(|e| SandboxError::op("kill", e))??;
        }
        Ok(())
    }

    /// Removes cgroups, network and files. Processes must be dead.
    async fn release(self: &Arc<Self>) -> Result<(), SandboxError> {
        self.lifeline.lock().take();
        if let Some(mut n) = self.net.lock().await.take() {
            n.detach().await;
        }
        let cg = self.cgroup.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SandboxError> {
            // Killed tasks may take a moment to leave the cgroup.
            if cg.exists() {
                let _ = cg.kill_all();
            }
            cg.remove(Duration::from_secs(5))?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(SandboxError::op(
                    "destroy",
                    format!("removing {}: {e}", dir.display()),
                )),
            }
        })
        .await
        .map_err(|e| SandboxError::op("destroy", e))?
    }

    async fn monitor(
        self: Arc<Self>,
        mut report: pipe::Receiver,
        pidfd: Arc<OwnedFd>,
        started: Instant,
    ) {
        let deadline = self.spec.timeout.map(|t| started + t);
        let mut status: Option<i32> = None;
        let exited = pidfd_wait(pidfd.clone());
        tokio::pin!(exited);
        let mut report_open = true;
        loop {
            let sleep = async {
                match deadline {
                    Some(d) if !self.timed_out.load(Ordering::SeqCst) => {
                        tokio::time::sleep_until(d.into()).await
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                r = read_report(&mut report), if report_open => match r {
                    Some(rec) if rec.kind == kind::EXITED => status = Some(rec.a),
                    Some(rec) if rec.kind == kind::SETUP_ERROR => tracing::warn!(
                        sandbox = %self.id,
                        "sandbox init failed after start: {}: {}",
                        child::stage_name(rec.a),
                        os_error(rec.b)
                    ),
                    Some(_) => {}
                    None => report_open = false,
                },
                r = &mut exited => {
                    if let Err(e) = r {
                        tracing::warn!(sandbox = %self.id, error = %e, "waiting for the reaper");
                    }
                    break;
                }
                _ = sleep => {
                    tracing::info!(sandbox = %self.id, "timeout elapsed; killing the sandbox");
                    self.timed_out.store(true, Ordering::SeqCst);
                    if let Err(e) = self.kill_all().await {
                        tracing::warn!(sandbox = %self.id, error = %e, "kill on timeout");
                    }
                }
            }
        }
        // The reaper is gone: drain what it wrote (all writers are closed now).
        while report_open {
            match tokio::time::timeout(Duration::from_millis(500), read_report(&mut report)).await {
                Ok(Some(rec)) if rec.kind == kind::EXITED => status = Some(rec.a),
                Ok(Some(_)) => {}
                _ => report_open = false,
            }
        }
        let exit = classify(
            status,
            self.timed_out.load(Ordering::SeqCst),
            self.killed.load(Ordering::SeqCst),
            self.cgroup.oom_kills(),
            started.elapsed(),
        );
        tracing::debug!(sandbox = %self.id, ?exit, "native sandbox exited");
        {
            let mut st = self.state.lock();
            st.reaper = None;
            if matches!(st.phase, Phase::Running) {
                st.phase = Phase::Exited;
            }
        }
        if exit.reason == ExitReason::Timeout {
            // A timed-out sandbox is gone: no process, cgroup or device is left behind.
            if let Err(e) = self.kill_all().await {
                tracing::warn!(sandbox = %self.id, error = %e, "kill after timeout");
            }
            if let Err(e) = self.release().await {
                tracing::warn!(sandbox = %self.id, error = %e, "release after timeout");
            }
        }
        // send_replace stores the value even when nobody is subscribed yet.
        self.exit_tx.send_replace(Some(exit));
    }

    fn running_reaper(&self) -> Result<(i32, Arc<OwnedFd>), SandboxError> {
        let st = self.state.lock();
        match (&st.phase, &st.reaper) {
            (Phase::Running, Some(r)) => Ok((r.pid, r.pidfd.clone())),
            _ => Err(SandboxError::InvalidState {
                id: self.id.clone(),
                message: format!("not running ({:?})", st.phase),
            }),
        }
    }
}

struct StartGuard {
    inner: Arc<Inner>,
    pidfd: Option<Arc<OwnedFd>>,
    armed: bool,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(p) = &self.pidfd {
            let _ = pidfd_signal(p, libc::SIGKILL);
            // SAFETY: waitid(P_PIDFD) on our own child, blocking until the SIGKILL lands
            // (a few milliseconds at most); avoids leaving a zombie behind.
            unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PIDFD,
                    p.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED,
                );
            }
        }
        let mut st = self.inner.state.lock();
        st.reaper = None;
        st.phase = Phase::Failed;
    }
}

#[async_trait]
impl crate::sandbox::Sandbox for NativeSandbox {
    fn id(&self) -> &str {
        &self.inner.id
    }

    fn tier(&self) -> SecurityTier {
        SecurityTier::Native
    }

    async fn start(&self) -> Result<SandboxStdio, SandboxError> {
        let inner = &self.inner;
        {
            let mut st = inner.state.lock();
            if !matches!(st.phase, Phase::Created) {
                return Err(SandboxError::InvalidState {
                    id: inner.id.clone(),
                    message: format!("start called in phase {:?}", st.phase),
                });
            }
            st.phase = Phase::Running;
        }
        let mut guard = StartGuard {
            inner: inner.clone(),
            pidfd: None,
            armed: true,
        };
        if inner.spec.has_capability(&Capability::Network) {
            let att = net::lease(&inner.id, inner.backend.host.pool).await?;
            let host_addr = att.host_addr;
            *inner.net.lock().await = Some(att);
            let n = &inner.backend.config.native;
            if let Some(etc) = &inner.paths.etc_dir {
                plan::write_etc(
                    etc,
                    &plan::etc_files("symbiont", n.sandbox_uid, n.sandbox_gid, Some(host_addr)),
                )?;
            }
            *inner.env.lock() = plan::environment(&inner.spec, Some(host_addr))?;
        }
        let (stdin_r, stdin_w) = pipe_pair()?;
        let (stdout_r, stdout_w) = pipe_pair()?;
        let (stderr_r, stderr_w) = pipe_pair()?;
        let (sync_r, sync_w) = pipe_pair()?;
        let (report_r, report_w) = pipe_pair()?;
        let (lifeline_r, lifeline_w) = pipe_pair()?;
        let landlock_raw: RawFd = inner.landlock.as_ref().map_or(-1, |f| f.as_raw_fd());
        let job = ReaperJob {
            fds: vec![
                (stdin_r.as_raw_fd(), child::FD_STDIN),
                (stdout_w.as_raw_fd(), child::FD_STDOUT),
                (stderr_w.as_raw_fd(), child::FD_STDERR),
                (sync_r.as_raw_fd(), child::FD_SYNC),
                (report_w.as_raw_fd(), child::FD_REPORT),
                (landlock_raw, child::FD_LANDLOCK),
                (lifeline_r.as_raw_fd(), child::FD_LIFELINE),
            ],
            keep: vec![stdin_r, stdout_w, stderr_w, sync_r, report_w, lifeline_r],
            mounts: inner.mounts()?,
            hostname: plan::cstrings(&["symbiont"], "hostname")?.remove(0),
            program: inner.owned_program(&inner.spec.argv)?,
            confine: inner.owned_confine(child::FD_LANDLOCK),
            timing: tracing::enabled!(tracing::Level::TRACE),
            cgroup: CgroupEntry::for_cgroup(&inner.cgroup)?,
            netns: net::NetnsPool::global(inner.backend.config.native.netns_pool)
                .and_then(|p| p.take()),
        };
        let timing = job.timing;
        let mut marks: Vec<(&'static str, i32)> = Vec::new();
        let base_us = child::monotonic_us();
        let mark = |name: &'static str, marks: &mut Vec<(&'static str, i32)>| {
            if timing {
                marks.push((name, child::monotonic_us()));
            }
        };
        let started = Instant::now();
        // The Landlock descriptor must stay open until the clone: `inner` holds it.
        let cloned = job.spawn()?;
        *inner.lifeline.lock() = Some(lifeline_w);
        let pid = cloned.pid;
        let pidfd = Arc::new(cloned.pidfd);
        mark("cloned", &mut marks);
        guard.pidfd = Some(pidfd.clone());
        inner.state.lock().reaper = Some(Reaper {
            pid,
            pidfd: pidfd.clone(),
        });
        inner.write_id_maps(pid)?;
        mark("id maps written", &mut marks);
        if inner.spec.has_capability(&Capability::Network) {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
                .map_err(|e| SandboxError::op("network setup", e))?;
            let mbps = inner.limits.lock().network_io_mbps;
            let mut guard = inner.net.lock().await;
            let att = guard
                .as_mut()
                .ok_or_else(|| SandboxError::op("network setup", "no lease"))?;
            att.connect(pid as u32, OwnedFd::from(ns), mbps).await?;
        }
        let mut report = pipe::Receiver::from_owned_fd(report_r)?;
        // Go.
        {
            let mut f = std::fs::File::from(sync_w);
            use std::io::Write;
            f.write_all(b"g")
                .map_err(|e| SandboxError::op("start", format!("releasing the child: {e}")))?;
        }
        mark("go sent", &mut marks);
        let timeout = inner.backend.config.native.start_timeout;
        let first = tokio::time::timeout(timeout, async {
            loop {
                match read_report(&mut report).await {
                    Some(r) if r.kind == kind::TIMING => {
                        marks.push((child::mark::name(r.a), r.b));
                    }
                    other => break other,
                }
            }
        })
        .await
        .map_err(|_| {
            SandboxError::op(
                "start",
                format!("the sandbox did not start within {timeout:?}"),
            )
        })?;
        if timing {
            marks.push(("started", child::monotonic_us()));
            let line = marks
                .iter()
                .map(|(n, t)| format!("{n} +{}us", (t - base_us) & 0x7fff_ffff))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::trace!(sandbox = %inner.id, "start timings: {line}");
        }
        match first {
            Some(r) if r.kind == kind::STARTED => {}
            Some(r) if r.kind == kind::SETUP_ERROR => {
                return Err(SandboxError::op(
                    "start",
                    format!("{}: {}", inner.describe_stage(r.a), os_error(r.b)),
                ));
            }
            Some(r) if r.kind == kind::EXEC_ERROR => {
                return Err(SandboxError::op(
                    "start",
                    format!("exec {}: {}", inner.spec.argv[0], os_error(r.a)),
                ));
            }
            other => {
                return Err(SandboxError::op(
                    "start",
                    format!("the sandbox's init ended during setup ({other:?})"),
                ));
            }
        }
        *inner.started_at.lock() = Some(started);
        guard.armed = false;
        let monitor = tokio::spawn(inner.clone().monitor(report, pidfd, started));
        inner.state.lock().monitor = Some(monitor);
        Ok(SandboxStdio {
            stdin: Box::pin(pipe::Sender::from_owned_fd(stdin_w)?),
            stdout: Box::pin(pipe::Receiver::from_owned_fd(stdout_r)?),
            stderr: Box::pin(pipe::Receiver::from_owned_fd(stderr_r)?),
        })
    }

    async fn exec(&self, argv: &[String], timeout: Duration) -> Result<ExecOutput, SandboxError> {
        let inner = &self.inner;
        if argv.is_empty() || argv[0].is_empty() {
            return Err(SandboxError::InvalidSpec("argv must name a program".into()));
        }
        let (pid, _) = inner.running_reaper()?;
        // The network namespace first (a pooled one is owned by the host's user namespace,
        // so it must be joined while we are still host root), then the user namespace (it
        // owns the others), the mount namespace last.
        let ns_list: [(&str, libc::c_int); 7] = [
            ("net", libc::CLONE_NEWNET),
            ("user", libc::CLONE_NEWUSER),
            ("ipc", libc::CLONE_NEWIPC),
            ("uts", libc::CLONE_NEWUTS),
            ("cgroup", libc::CLONE_NEWCGROUP),
            ("pid", libc::CLONE_NEWPID),
            ("mnt", libc::CLONE_NEWNS),
        ];
        let mut ns_fds = Vec::new();
        for (name, _) in &ns_list {
            let f = std::fs::File::open(format!("/proc/{pid}/ns/{name}"))
                .map_err(|e| SandboxError::op("exec", format!("namespace {name}: {e}")))?;
            ns_fds.push(OwnedFd::from(f));
        }
        let (stdin_r, stdin_w) = pipe_pair()?;
        drop(stdin_w);
        let (stdout_r, stdout_w) = pipe_pair()?;
        let (stderr_r, stderr_w) = pipe_pair()?;
        let (report_r, report_w) = pipe_pair()?;
        let landlock_raw: RawFd = inner.landlock.as_ref().map_or(-1, |f| f.as_raw_fd());
        let mut fds = vec![
            (stdin_r.as_raw_fd(), child::FD_STDIN),
            (stdout_w.as_raw_fd(), child::FD_STDOUT),
            (stderr_w.as_raw_fd(), child::FD_STDERR),
            (report_w.as_raw_fd(), child::EXEC_FD_REPORT),
            (landlock_raw, child::EXEC_FD_LANDLOCK),
        ];
        let mut namespaces = Vec::new();
        for (i, ((_, t), fd)) in ns_list.iter().zip(&ns_fds).enumerate() {
            let child_fd = child::EXEC_FD_NS + i as libc::c_int;
            fds.push((fd.as_raw_fd(), child_fd));
            namespaces.push((child_fd, *t));
        }
        let mut keep = vec![stdin_r, stdout_w, stderr_w, report_w];
        keep.extend(ns_fds);
        if inner.cgroup.is_frozen() {
            // The helper would freeze as soon as it joined the cgroup.
            return Err(SandboxError::InvalidState {
                id: inner.id.clone(),
                message: "paused: resume before exec".into(),
            });
        }
        let job = ExecJob {
            fds,
            keep,
            cgroup: CgroupEntry::for_cgroup(&inner.cgroup)?,
            namespaces,
            program: inner.owned_program(argv)?,
            confine: inner.owned_confine(child::EXEC_FD_LANDLOCK),
        };
        let cloned = job.spawn()?;
        let helper = Arc::new(cloned.pidfd);
        let mut report = pipe::Receiver::from_owned_fd(report_r)?;
        let mut out = pipe::Receiver::from_owned_fd(stdout_r)?;
        let mut err = pipe::Receiver::from_owned_fd(stderr_r)?;
        let work = async {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            let mut status = None;
            let mut failure = None;
            let mut target = None;
            let reports = async {
                while let Some(r) = read_report(&mut report).await {
                    match r.kind {
                        kind::STARTED => target = Some(r.a),
                        kind::EXITED => status = Some(r.a),
                        kind::SETUP_ERROR => {
                            failure = Some(format!("{}: {}", child::stage_name(r.a), os_error(r.b)))
                        }
                        kind::EXEC_ERROR => {
                            failure = Some(format!("exec {}: {}", argv[0], os_error(r.a)))
                        }
                        _ => {}
                    }
                }
            };
            let (a, b, _, w) = tokio::join!(
                out.read_to_end(&mut stdout),
                err.read_to_end(&mut stderr),
                reports,
                pidfd_wait(helper.clone())
            );
            a?;
            b?;
            w?;
            Ok::<_, SandboxError>((stdout, stderr, status, failure, target))
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok((stdout, stderr, status, failure, _))) => {
                if let Some(f) = failure {
                    return Err(SandboxError::op("exec", f));
                }
                let code = match status {
                    Some(s) if libc::WIFEXITED(s) => libc::WEXITSTATUS(s),
                    _ => -1,
                };
                Ok(ExecOutput {
                    code,
                    stdout,
                    stderr,
                })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // The helper's death SIGKILLs the command (parent-death signal).
                let _ = pidfd_signal(&helper, libc::SIGKILL);
                Err(SandboxError::op(
                    "exec",
                    format!("{} did not finish within {timeout:?}", argv[0]),
                ))
            }
        }
    }

    async fn signal(&self, signal: i32) -> Result<(), SandboxError> {
        let (pid, pidfd) = self.inner.running_reaper()?;
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            // Not catchable by the reaper: deliver to the program directly.
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(c, signal);
                }
            }
            return Ok(());
        }
        // The reaper forwards catchable signals to the program.
        pidfd_signal(&pidfd, signal).map_err(|e| SandboxError::op("signal", e))
    }

    async fn stop(&self, grace: Duration) -> Result<SandboxExit, SandboxError> {
        let mut rx = self.inner.exit_tx.subscribe();
        let current = rx.borrow().clone();
        if let Some(e) = current {
            return Ok(e);
        }
        self.inner.running_reaper()?;
        self.inner.killed.store(true, Ordering::SeqCst);
        let _ = self.signal(libc::SIGTERM).await;
        let timed_out = tokio::time::timeout(grace, rx.wait_for(|e| e.is_some()))
            .await
            .is_err();
        if timed_out {
            self.inner.kill_all().await?;
        }
        self.wait().await
    }

    async fn kill(&self) -> Result<(), SandboxError> {
        self.inner.killed.store(true, Ordering::SeqCst);
        self.inner.kill_all().await
    }

    async fn wait(&self) -> Result<SandboxExit, SandboxError> {
        let current = self.inner.exit_tx.borrow().clone();
        if let Some(e) = current {
            return Ok(e);
        }
        match self.inner.state.lock().phase {
            Phase::Created => {
                return Err(SandboxError::InvalidState {
                    id: self.inner.id.clone(),
                    message: "wait before start".into(),
                })
            }
            Phase::Failed => {
                return Err(SandboxError::InvalidState {
                    id: self.inner.id.clone(),
                    message: "start failed; there is nothing to wait for".into(),
                })
            }
            _ => {}
        }
        let mut rx = self.inner.exit_tx.subscribe();
        let r = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| SandboxError::op("wait", "monitor ended without an exit"))?;
        r.clone()
            .ok_or_else(|| SandboxError::op("wait", "no exit recorded"))
    }

    async fn stats(&self) -> Result<SandboxStats, SandboxError> {
        if matches!(self.inner.state.lock().phase, Phase::Destroyed) {
            return Err(SandboxError::InvalidState {
                id: self.inner.id.clone(),
                message: "destroyed".into(),
            });
        }
        let cg = self.inner.cgroup.clone();
        let mut s = tokio::task::spawn_blocking(move || cg.stats())
            .await
            .map_err(|e| SandboxError::op("stats", e))??;
        if let Some(n) = self.inner.net.lock().await.as_ref() {
            let (host_rx, host_tx) = n.host_counters();
            s.net_rx_bytes = host_tx;
            s.net_tx_bytes = host_rx;
        }
        Ok(s)
    }

    async fn pause(&self) -> Result<(), SandboxError> {
        self.inner.running_reaper()?;
        let cg = self.inner.cgroup.clone();
        tokio::task::spawn_blocking(move || cg.freeze())
            .await
            .map_err(|e| SandboxError::op("pause", e))?
    }

    async fn resume(&self) -> Result<(), SandboxError> {
        self.inner.running_reaper()?;
        let cg = self.inner.cgroup.clone();
        tokio::task::spawn_blocking(move || cg.thaw())
            .await
            .map_err(|e| SandboxError::op("resume", e))?
    }

    async fn update_limits(&self, limits: &ResourceLimits) -> Result<(), SandboxError> {
        if let Err((field, why)) = limits.validate() {
            return Err(SandboxError::InvalidSpec(format!("limits.{field}: {why}")));
        }
        let enf = self.inner.backend.host.enforcement;
        if limits.disk_io_mbps > 0 && !enf.disk_io {
            return Err(SandboxError::LimitUnsupported {
                tier: SecurityTier::Native,
                limit: "disk_io_mbps".into(),
            });
        }
        if matches!(self.inner.state.lock().phase, Phase::Destroyed) {
            return Err(SandboxError::InvalidState {
                id: self.inner.id.clone(),
                message: "destroyed".into(),
            });
        }
        let cg = self.inner.cgroup.clone();
        let cl = cgroup_limits(&self.inner.backend, limits);
        tokio::task::spawn_blocking(move || cg.apply(&cl))
            .await
            .map_err(|e| SandboxError::op("update limits", e))??;
        let old = self.inner.limits.lock().network_io_mbps;
        if old != limits.network_io_mbps {
            if let Some(n) = self.inner.net.lock().await.as_ref() {
                net::set_rate(n, limits.network_io_mbps)?;
            }
        }
        *self.inner.limits.lock() = limits.clone();
        Ok(())
    }

    async fn destroy(&self) -> Result<(), SandboxError> {
        let inner = &self.inner;
        let monitor = {
            let mut st = inner.state.lock();
            if matches!(st.phase, Phase::Destroyed) {
                return Ok(());
            }
            st.monitor.take()
        };
        inner.killed.store(true, Ordering::SeqCst);
        inner.kill_all().await?;
        if let Some(m) = monitor {
            if tokio::time::timeout(Duration::from_secs(10), m)
                .await
                .is_err()
            {
                tracing::warn!(sandbox = %inner.id, "monitor did not finish after kill");
            }
        }
        inner.release().await?;
        inner.state.lock().phase = Phase::Destroyed;
        tracing::debug!(sandbox = %inner.id, "native sandbox destroyed");
        Ok(())
    }
}

impl Drop for NativeSandbox {
    fn drop(&mut self) {
        let inner = &self.inner;
        if matches!(inner.state.lock().phase, Phase::Destroyed) {
            return;
        }
        // Best effort, synchronously: nothing may outlive its handle.
        inner.kill_now();
        inner.lifeline.lock().take();
        if inner.cgroup.exists() {
            let _ = inner.cgroup.kill_all();
            let _ = inner.cgroup.remove(Duration::from_secs(2));
        }
        if let Ok(mut n) = inner.net.try_lock() {
            if let Some(mut att) = n.take() {
                att.detach_blocking();
            }
        }
        let _ = std::fs::remove_dir_all(&inner.dir);
        tracing::debug!(sandbox = %inner.id, "native sandbox dropped without destroy; cleaned up");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_distinguishes_exit_kinds() {
        let d = Duration::from_millis(1);
        let exited = classify(Some(3 << 8), false, false, 0, d);
        assert_eq!((exited.reason, exited.code), (ExitReason::Exited, Some(3)));
        let sig = classify(Some(libc::SIGSEGV), false, false, 0, d);
        assert_eq!(
            (sig.reason, sig.signal),
            (ExitReason::Signaled, Some(libc::SIGSEGV))
        );
        let oom = classify(Some(libc::SIGKILL), false, false, 1, d);
        assert_eq!(oom.reason, ExitReason::OutOfMemory);
        assert!(oom.is_resource_violation());
        // An OOM kill of a helper the program survived is not a violation of the program.
        let ok = classify(Some(0), false, false, 1, d);
        assert_eq!(ok.reason, ExitReason::Exited);
        let t = classify(None, true, true, 0, d);
        assert_eq!(
            (t.reason, t.signal),
            (ExitReason::Timeout, Some(libc::SIGKILL))
        );
        let k = classify(Some(libc::SIGTERM), false, true, 0, d);
        assert_eq!(k.reason, ExitReason::Killed);
    }
}
