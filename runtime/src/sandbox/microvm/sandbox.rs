//! One microVM sandbox: boots the VM, speaks the guest protocol, supervises the VMM process.
//!
//! A supervisor task per VM owns the VMM child process and the channel's read half. It
//! demultiplexes guest frames into the stdout/stderr streams handed out by `start`, answers
//! pending `exec`/stats requests, enforces the spec's timeout, kills the VMM on request and,
//! once the VMM has exited, removes its cgroup and publishes the [`SandboxExit`] every
//! `wait` caller receives. A write task owns the channel's write half; stdin, signals and
//! requests reach it through a bounded queue.
//!
//! Backpressure: stdout/stderr are bounded queues. While the consumer does not read, the
//! supervisor stops reading the channel, the guest's writes block and so does the program —
//! exactly like a pipe — but timeouts and kills still act.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use symbiont_guest::protocol::{split_frame, GuestExit, GuestMsg, GuestStats, HostMsg, MAX_CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::codec::{Decoder, FramedRead};

use super::hostcg::HostCgroup;
use super::image::BuiltImage;
use super::vmm::{self, DiskPlan, VmPlan, Vmm};
use super::{qmp, HostEnv, MicrovmConfig};
use crate::sandbox::{
    ExecOutput, ExitReason, Sandbox, SandboxError, SandboxExit, SandboxSpec, SandboxStats,
    SandboxStdio,
};
use crate::types::{Capability, ResourceLimits, SecurityTier};

/// Everything `create` hands to a new sandbox.
pub(crate) struct Prepare {
    pub(crate) spec: SandboxSpec,
    pub(crate) env: Arc<HostEnv>,
    pub(crate) cfg: MicrovmConfig,
    pub(crate) run_root: PathBuf,
    pub(crate) image: BuiltImage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Starting,
    Running,
    Ended,
    Destroyed,
}

/// Why the runtime ended the VM (when it did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EndCause {
    Timeout,
    Killed,
}

type ExecReply = (i32, Vec<u8>, Vec<u8>);

struct Shared {
    exit_tx: watch::Sender<Option<SandboxExit>>,
    to_guest: Mutex<Option<mpsc::Sender<HostMsg>>>,
    pending_exec: Mutex<HashMap<u32, oneshot::Sender<ExecReply>>>,
    pending_stats: Mutex<HashMap<u32, oneshot::Sender<GuestStats>>>,
    next_id: AtomicU32,
    kill: Notify,
    cause: Mutex<Option<EndCause>>,
    vmm_pid: AtomicU32,
    cgroup: Mutex<Option<Arc<HostCgroup>>>,
    paused: AtomicBool,
}

impl Shared {
    fn sender(&self) -> Option<mpsc::Sender<HostMsg>> {
        self.to_guest.lock().clone()
    }
}

/// A Tier3 sandbox: one VM running one agent program.
pub struct MicrovmSandbox {
    id: String,
    spec: SandboxSpec,
    vmm: Vmm,
    vmm_binary: PathBuf,
    plan: VmPlan,
    run_dir: PathBuf,
    cfg: MicrovmConfig,
    image: BuiltImage,
    phase: Mutex<Phase>,
    start_error: Mutex<Option<String>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MicrovmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicrovmSandbox")
            .field("id", &self.id)
            .field("vmm", &self.vmm)
            .field("phase", &*self.phase.lock())
            .finish_non_exhaustive()
    }
}

/// Decodes guest frames from the channel.
struct GuestCodec;

impl Decoder for GuestCodec {
    type Item = GuestMsg;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<GuestMsg>, io::Error> {
        let (msg, used) = match split_frame(src) {
            Ok(None) => return Ok(None),
            Ok(Some((tag, payload, used))) => (GuestMsg::decode(tag, payload), used),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
        src.advance(used);
        msg.map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// How a VM's end is reported, from what the runtime did and what the guest said.
pub(crate) fn classify_exit(
    cause: Option<EndCause>,
    guest: Option<GuestExit>,
    console_shows_oom: bool,
    duration: Duration,
) -> SandboxExit {
    let (code, signal) = match guest {
        Some(g) => (g.code, g.signal),
        None => (None, Some(libc::SIGKILL)),
    };
    let reason = match (cause, guest) {
        (Some(EndCause::Timeout), _) => ExitReason::Timeout,
        (_, Some(g)) if g.oom_killed => ExitReason::OutOfMemory,
        (Some(EndCause::Killed), _) => ExitReason::Killed,
        (None, Some(g)) if g.signal.is_some() => ExitReason::Signaled,
        (None, Some(_)) => ExitReason::Exited,
        (None, None) if console_shows_oom => ExitReason::OutOfMemory,
        (None, None) => ExitReason::Signaled,
    };
    SandboxExit {
        reason,
        code,
        signal,
        duration,
    }
}

fn tail(path: &Path, max: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}

fn invalid_state(id: &str, message: impl Into<String>) -> SandboxError {
    SandboxError::InvalidState {
        id: id.to_string(),
        message: message.into(),
    }
}

fn reader_from(rx: mpsc::Receiver<Bytes>) -> crate::sandbox::BoxedReader {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, io::Error>(b), rx))
    });
    Box::pin(tokio_util::io::StreamReader::new(Box::pin(stream)))
}

impl MicrovmSandbox {
    pub(crate) async fn prepare(p: Prepare) -> Result<Arc<Self>, SandboxError> {
        let agent = p.spec.agent_id.as_uuid().simple().to_string();
        let id = format!(
            "symbiont-vm-{}-{}",
            &agent[..12],
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let run_dir = p.run_root.join(&id);
        tokio::fs::create_dir_all(&run_dir)
            .await
            .map_err(|e| SandboxError::op("create", format!("{}: {e}", run_dir.display())))?;
        let disk = if p.cfg.workspace_disk_mb > 0 {
            let path = run_dir.join("workspace.img");
            if let Err(e) = make_disk(&p.cfg, &path).await {
                let _ = tokio::fs::remove_dir_all(&run_dir).await;
                return Err(e);
            }
            Some(DiskPlan {
                path,
                bps: p.spec.limits.disk_io_mbps.saturating_mul(1_000_000),
            })
        } else {
            None
        };
        let plan = VmPlan {
            name: id.clone(),
            kernel: p.env.kernel.image.clone(),
            initrd: p.image.path.clone(),
            memory_mb: p.spec.limits.memory_mb + p.cfg.memory_overhead_mb,
            vcpus: (p.spec.limits.cpu_cores.ceil() as u32).max(1),
            accel: p.env.accel,
            channel: run_dir.join("ctl.sock"),
            qmp: run_dir.join("qmp.sock"),
            console_log: run_dir.join("console.log"),
            disk,
            network: p.spec.has_capability(&Capability::Network),
            extra_cmdline: {
                let mut words = super::kvm::accel_cmdline(p.env.accel);
                if p.cfg.guest_debug {
                    words.extend(["symbiont.debug".to_string(), "loglevel=7".to_string()]);
                }
                words
            },
        };
        let (exit_tx, _) = watch::channel(None);
        Ok(Arc::new(Self {
            id,
            spec: p.spec,
            vmm: p.env.vmm,
            vmm_binary: p.env.vmm_binary.clone(),
            plan,
            run_dir,
            cfg: p.cfg,
            image: p.image,
            phase: Mutex::new(Phase::Created),
            start_error: Mutex::new(None),
            shared: Arc::new(Shared {
                exit_tx,
                to_guest: Mutex::new(None),
                pending_exec: Mutex::new(HashMap::new()),
                pending_stats: Mutex::new(HashMap::new()),
                next_id: AtomicU32::new(1),
                kill: Notify::new(),
                cause: Mutex::new(None),
                vmm_pid: AtomicU32::new(0),
                cgroup: Mutex::new(None),
                paused: AtomicBool::new(false),
            }),
        }))
    }

    /// True when this sandbox's image came from the cache.
    pub fn image_cache_hit(&self) -> bool {
        self.image.cache_hit
    }

    /// The VM plan (memory, vCPUs, accelerator, devices).
    pub fn plan(&self) -> &VmPlan {
        &self.plan
    }

    /// The host pid of the VMM process while it runs.
    pub fn vmm_pid(&self) -> Option<u32> {
        match self.shared.vmm_pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    fn console_tail(&self) -> String {
        tail(&self.plan.console_log, 2000)
    }

    fn vmm_command(&self) -> Result<Command, SandboxError> {
        let mut cmd = Command::new(&self.vmm_binary);
        let log = std::fs::File::create(self.run_dir.join("vmm.log"))
            .map_err(|e| SandboxError::op("start", e))?;
        match self.vmm {
            Vmm::Qemu => {
                cmd.args(vmm::qemu_args(&self.plan)).stdout(Stdio::null());
            }
            Vmm::Firecracker => {
                let file = self.run_dir.join("firecracker.json");
                let doc = vmm::firecracker_config(&self.plan);
                std::fs::write(&file, doc.to_string()).map_err(|e| SandboxError::op("start", e))?;
                // Firecracker writes the serial console to its stdout.
                let console = std::fs::File::create(&self.plan.console_log)
                    .map_err(|e| SandboxError::op("start", e))?;
                cmd.args(vmm::firecracker_args(&file, &self.plan))
                    .stdout(Stdio::from(console));
            }
        }
        cmd.stdin(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let procs = self
            .shared
            .cgroup
            .lock()
            .as_ref()
            .map(|cg| cg.procs_files())
            .unwrap_or_default();
        // SAFETY: between fork and exec we only make async-signal-safe syscalls on data
        // prepared before the fork (open/write/close/prctl).
        unsafe {
            cmd.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // If the runtime dies, its VMs die with it: nothing is left behind.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(cmd)
    }

    async fn boot(&self) -> Result<SandboxStdio, SandboxError> {
        let boot_started = Instant::now();
        let listen_path = self.plan.channel_listen_path(self.vmm);
        let _ = std::fs::remove_file(&listen_path);
        let _ = std::fs::remove_file(&self.plan.qmp);
        let listener = UnixListener::bind(&listen_path)
            .map_err(|e| SandboxError::op("start", format!("{}: {e}", listen_path.display())))?;
        let limits = &self.spec.limits;
        let host_mem = (self.plan.memory_mb + self.cfg.vmm_overhead_mb).saturating_mul(1 << 20);
        let cg = HostCgroup::create(&format!("microvm-{}", self.id), limits.cpu_cores, host_mem)?;
        *self.shared.cgroup.lock() = Some(Arc::new(cg));
        let mut child = self.vmm_command()?.spawn().map_err(|e| {
            SandboxError::op(
                "start",
                format!("cannot run {}: {e}", self.vmm_binary.display()),
            )
        })?;
        let pid = child.id().unwrap_or(0);
        self.shared.vmm_pid.store(pid, Ordering::SeqCst);
        tracing::info!(sandbox = %self.id, pid, vmm = self.vmm.backend_name(), accel = %self.plan.accel,
            memory_mb = self.plan.memory_mb, vcpus = self.plan.vcpus,
            launch_us = boot_started.elapsed().as_micros() as u64, "microVM launched");

        let boot_timeout = self.cfg.boot_timeout;
        let accepted = tokio::select! {
            r = listener.accept() => r.map(|(s, _)| s).map_err(|e| SandboxError::op("start", e)),
            status = child.wait() => Err(SandboxError::op("start", format!(
                "the VMM exited before connecting ({}): {}",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                tail(&self.run_dir.join("vmm.log"), 2000)
            ))),
            _ = tokio::time::sleep(boot_timeout) => Err(SandboxError::op("start", format!(
                "the VMM did not connect within {boot_timeout:?}"
            ))),
        };
        drop(listener);
        let _ = std::fs::remove_file(&listen_path);
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill().await;
                self.cleanup_cgroup().await;
                return Err(e);
            }
        };
        let (read_half, mut write_half) = stream.into_split();

        // Host → guest writer.
        let (to_guest, mut from_host) = mpsc::channel::<HostMsg>(64);
        tokio::spawn(async move {
            while let Some(msg) = from_host.recv().await {
                if write_half.write_all(&msg.encode()).await.is_err() {
                    break;
                }
            }
        });
        let _ = to_guest.send(HostMsg::Hello).await;
        *self.shared.to_guest.lock() = Some(to_guest.clone());

        // stdin pump.
        let (stdin_user, mut stdin_pump) = tokio::io::duplex(MAX_CHUNK);
        let pump_tx = to_guest.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match stdin_pump.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if pump_tx
                            .send(HostMsg::Stdin(buf[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = pump_tx.send(HostMsg::StdinEof).await;
        });
        drop(to_guest);

        let (out_tx, out_rx) = mpsc::channel::<Bytes>(64);
        let (err_tx, err_rx) = mpsc::channel::<Bytes>(64);
        let (started_tx, started_rx) = oneshot::channel();
        let sup = Supervisor {
            shared: self.shared.clone(),
            child,
            frames: FramedRead::new(read_half, GuestCodec),
            out_tx: Some(out_tx),
            err_tx: Some(err_tx),
            started_tx: Some(started_tx),
            timeout: self.spec.timeout,
            console_log: self.plan.console_log.clone(),
            id: self.id.clone(),
            boot_started,
        };
        tokio::spawn(sup.run());

        let left = boot_timeout.saturating_sub(boot_started.elapsed());
        let started = tokio::time::timeout(left, started_rx).await;
        let failure = match started {
            Ok(Ok(Ok(guest_pid))) => {
                tracing::info!(sandbox = %self.id, guest_pid, boot_ms = boot_started.elapsed().as_millis() as u64,
                    "agent program started in the microVM");
                None
            }
            Ok(Ok(Err(msg))) => Some(msg),
            Ok(Err(_)) => Some("the VM ended before the program started".to_string()),
            Err(_) => Some(format!("the program did not start within {boot_timeout:?}")),
        };
        if let Some(msg) = failure {
            self.shared.kill.notify_one();
            let _ = self.wait_published(Duration::from_secs(10)).await;
            return Err(SandboxError::op(
                "start",
                format!("{msg}; console: {}", self.console_tail()),
            ));
        }
        Ok(SandboxStdio {
            stdin: Box::pin(stdin_user),
            stdout: reader_from(out_rx),
            stderr: reader_from(err_rx),
        })
    }

    async fn cleanup_cgroup(&self) {
        let cg = self.shared.cgroup.lock().take();
        if let Some(cg) = cg {
            cg.remove().await;
        }
    }

    async fn wait_published(&self, limit: Duration) -> Option<SandboxExit> {
        let mut rx = self.shared.exit_tx.subscribe();
        let res = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
        match res {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }

    fn running_sender(&self) -> Result<mpsc::Sender<HostMsg>, SandboxError> {
        if *self.phase.lock() != Phase::Running {
            return Err(invalid_state(&self.id, "not running"));
        }
        self.shared
            .sender()
            .ok_or_else(|| invalid_state(&self.id, "the program has ended"))
    }

    fn request_kill(&self, cause: EndCause) {
        {
            let mut c = self.shared.cause.lock();
            if c.is_none() {
                *c = Some(cause);
            }
        }
        self.shared.kill.notify_one();
    }

    async fn guest_stats(&self) -> Option<GuestStats> {
        if self.shared.paused.load(Ordering::SeqCst) {
            return None;
        }
        let tx = self.shared.sender()?;
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (reply_tx, reply_rx) = oneshot::channel();
        self.shared.pending_stats.lock().insert(id, reply_tx);
        if tx.send(HostMsg::Stats { id }).await.is_err() {
            self.shared.pending_stats.lock().remove(&id);
            return None;
        }
        let res = tokio::time::timeout(Duration::from_secs(3), reply_rx).await;
        self.shared.pending_stats.lock().remove(&id);
        res.ok().and_then(Result::ok)
    }
}

async fn make_disk(cfg: &MicrovmConfig, path: &Path) -> Result<(), SandboxError> {
    let f = std::fs::File::create(path).map_err(|e| SandboxError::op("create", e))?;
    f.set_len(cfg.workspace_disk_mb.saturating_mul(1 << 20))
        .map_err(|e| SandboxError::op("create", e))?;
    drop(f);
    let out = Command::new(&cfg.mkfs_ext4)
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
        .arg(format!(
            "lazy_itable_init=1,root_owner={0}:{0}",
            cfg.guest_uid
        ))
        .arg(path)
        .output()
        .await
        .map_err(|e| SandboxError::op("create", format!("{}: {e}", cfg.mkfs_ext4.display())))?;
    if !out.status.success() {
        return Err(SandboxError::op(
            "create",
            format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

enum Event {
    VmmExited,
    Kill,
    Timer,
    Frame(Option<io::Result<GuestMsg>>),
}

struct Supervisor {
    shared: Arc<Shared>,
    child: Child,
    frames: FramedRead<tokio::net::unix::OwnedReadHalf, GuestCodec>,
    out_tx: Option<mpsc::Sender<Bytes>>,
    err_tx: Option<mpsc::Sender<Bytes>>,
    started_tx: Option<oneshot::Sender<Result<u32, String>>>,
    timeout: Option<Duration>,
    console_log: PathBuf,
    id: String,
    boot_started: Instant,
}

impl Supervisor {
    async fn run(mut self) {
        let mut pending: Option<(bool, Bytes)> = None;
        let mut guest_exit: Option<GuestExit> = None;
        let mut program_started: Option<Instant> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut shutdown_by: Option<tokio::time::Instant> = None;
        let mut channel_open = true;
        let mut killing = false;
        loop {
            let timer = match (deadline, shutdown_by) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let event = tokio::select! {
                _ = self.child.wait() => Event::VmmExited,
                _ = self.shared.kill.notified() => Event::Kill,
                _ = tokio::time::sleep_until(timer.unwrap_or_else(tokio::time::Instant::now)), if timer.is_some() && !killing => Event::Timer,
                permit = async {
                    let tx = match &pending {
                        Some((true, _)) => self.err_tx.as_ref(),
                        _ => self.out_tx.as_ref(),
                    };
                    match tx {
                        Some(tx) => tx.reserve().await.ok(),
                        None => None,
                    }
                }, if pending.is_some() => {
                    if let (Some((_, data)), Some(permit)) = (pending.take(), permit) {
                        permit.send(data);
                    }
                    continue;
                }
                frame = self.frames.next(), if channel_open && pending.is_none() => Event::Frame(frame),
            };
            match event {
                Event::VmmExited => {
                    // Frames the guest sent just before the VM ended (an exit status, an
                    // error) may still sit in the socket.
                    while channel_open {
                        match tokio::time::timeout(Duration::from_millis(200), self.frames.next())
                            .await
                        {
                            Ok(Some(Ok(msg))) => {
                                let mut ignore = None;
                                self.handle(
                                    msg,
                                    &mut ignore,
                                    &mut guest_exit,
                                    &mut program_started,
                                    &mut deadline,
                                    &mut shutdown_by,
                                );
                            }
                            _ => channel_open = false,
                        }
                    }
                    break;
                }
                Event::Kill => {
                    killing = true;
                    let _ = self.child.start_kill();
                }
                Event::Timer => {
                    let now = tokio::time::Instant::now();
                    if deadline.is_some_and(|d| d <= now) {
                        deadline = None;
                        if guest_exit.is_none() {
                            tracing::info!(sandbox = %self.id, "timeout elapsed, killing the VM");
                            let mut c = self.shared.cause.lock();
                            if c.is_none() {
                                *c = Some(EndCause::Timeout);
                            }
                            drop(c);
                            killing = true;
                            let _ = self.child.start_kill();
                        }
                    }
                    if shutdown_by.is_some_and(|d| d <= now) {
                        shutdown_by = None;
                        killing = true;
                        let _ = self.child.start_kill();
                    }
                }
                Event::Frame(Some(Ok(msg))) => {
                    self.handle(
                        msg,
                        &mut pending,
                        &mut guest_exit,
                        &mut program_started,
                        &mut deadline,
                        &mut shutdown_by,
                    );
                }
                Event::Frame(Some(Err(e))) => {
                    tracing::warn!(sandbox = %self.id, "guest channel: {e}");
                    channel_open = false;
                    shutdown_by.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(5));
                }
                Event::Frame(None) => {
                    channel_open = false;
                    shutdown_by.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(5));
                }
            }
        }
        // The VMM is gone (reaped by child.wait above).
        self.shared.vmm_pid.store(0, Ordering::SeqCst);
        *self.shared.to_guest.lock() = None;
        self.shared.pending_exec.lock().clear();
        self.shared.pending_stats.lock().clear();
        self.out_tx = None;
        self.err_tx = None;
        if let Some(tx) = self.started_tx.take() {
            let _ = tx.send(Err("the VM exited before the program started".into()));
        }
        let cg = self.shared.cgroup.lock().take();
        if let Some(cg) = cg {
            cg.remove().await;
        }
        let console = tail(&self.console_log, 8000);
        let oom_panic = console.contains("Out of memory") && console.contains("Kernel panic");
        let cause = *self.shared.cause.lock();
        let duration = program_started.unwrap_or(self.boot_started).elapsed();
        let exit = classify_exit(cause, guest_exit, oom_panic, duration);
        if guest_exit.is_none() && cause.is_none() {
            tracing::warn!(sandbox = %self.id, "the VM ended without reporting an exit status; console: {console}");
        }
        tracing::info!(sandbox = %self.id, reason = ?exit.reason, code = ?exit.code, signal = ?exit.signal, "microVM ended");
        self.shared.exit_tx.send_replace(Some(exit));
    }

    fn handle(
        &mut self,
        msg: GuestMsg,
        pending: &mut Option<(bool, Bytes)>,
        guest_exit: &mut Option<GuestExit>,
        program_started: &mut Option<Instant>,
        deadline: &mut Option<tokio::time::Instant>,
        shutdown_by: &mut Option<tokio::time::Instant>,
    ) {
        match msg {
            GuestMsg::Started { pid } => {
                *program_started = Some(Instant::now());
                if let Some(t) = self.timeout {
                    *deadline = Some(tokio::time::Instant::now() + t);
                }
                if let Some(tx) = self.started_tx.take() {
                    let _ = tx.send(Ok(pid));
                }
            }
            GuestMsg::Stdout(data) | GuestMsg::Stderr(data) if data.is_empty() => {}
            GuestMsg::Stdout(data) => self.deliver(false, Bytes::from(data), pending),
            GuestMsg::Stderr(data) => self.deliver(true, Bytes::from(data), pending),
            GuestMsg::StdoutEof => self.out_tx = None,
            GuestMsg::StderrEof => self.err_tx = None,
            GuestMsg::Exit(x) => {
                *guest_exit = Some(x);
                *deadline = None;
                self.out_tx = None;
                self.err_tx = None;
                if let Some(tx) = self.shared.sender() {
                    let _ = tx.try_send(HostMsg::Shutdown);
                }
                shutdown_by.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(5));
            }
            GuestMsg::ExecDone {
                id,
                code,
                stdout,
                stderr,
            } => {
                if let Some(tx) = self.shared.pending_exec.lock().remove(&id) {
                    let _ = tx.send((code, stdout, stderr));
                }
            }
            GuestMsg::Stats { id, stats } => {
                if let Some(tx) = self.shared.pending_stats.lock().remove(&id) {
                    let _ = tx.send(stats);
                }
            }
            GuestMsg::Error(m) => {
                tracing::warn!(sandbox = %self.id, "guest init: {m}");
                if let Some(tx) = self.started_tx.take() {
                    let _ = tx.send(Err(m));
                }
            }
        }
    }

    fn deliver(&mut self, stderr: bool, data: Bytes, pending: &mut Option<(bool, Bytes)>) {
        let tx = if stderr { &self.err_tx } else { &self.out_tx };
        if let Some(tx) = tx {
            match tx.try_send(data) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(data)) => *pending = Some((stderr, data)),
                // The consumer dropped its reader: discard, as writing to a closed pipe would.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

fn proc_stats(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let cpu_ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12)
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (kb("VmRSS:"), kb("VmHWM:"), cpu_ticks * (1_000_000_000 / hz))
}

#[async_trait]
impl Sandbox for MicrovmSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn tier(&self) -> SecurityTier {
        SecurityTier::Tier3
    }

    async fn start(&self) -> Result<SandboxStdio, SandboxError> {
        {
            let mut phase = self.phase.lock();
            if *phase != Phase::Created {
                return Err(invalid_state(
                    &self.id,
                    format!("cannot start when {:?}", *phase),
                ));
            }
            *phase = Phase::Starting;
        }
        match self.boot().await {
            Ok(stdio) => {
                *self.phase.lock() = Phase::Running;
                Ok(stdio)
            }
            Err(e) => {
                *self.phase.lock() = Phase::Ended;
                *self.start_error.lock() = Some(e.to_string());
                Err(e)
            }
        }
    }

    async fn exec(&self, argv: &[String], timeout: Duration) -> Result<ExecOutput, SandboxError> {
        if argv.is_empty() {
            return Err(SandboxError::InvalidSpec("exec needs a program".into()));
        }
        let tx = self.running_sender()?;
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (reply_tx, reply_rx) = oneshot::channel();
        self.shared.pending_exec.lock().insert(id, reply_tx);
        let msg = HostMsg::Exec {
            id,
            argv: argv.to_vec(),
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
        };
        if tx.send(msg).await.is_err() {
            self.shared.pending_exec.lock().remove(&id);
            return Err(invalid_state(&self.id, "the program has ended"));
        }
        let res = tokio::time::timeout(timeout + Duration::from_secs(10), reply_rx).await;
        self.shared.pending_exec.lock().remove(&id);
        match res {
            Ok(Ok((code, stdout, stderr))) => Ok(ExecOutput {
                code,
                stdout,
                stderr,
            }),
            Ok(Err(_)) => Err(SandboxError::op("exec", "the VM ended during exec")),
            Err(_) => Err(SandboxError::op("exec", "no answer from the guest")),
        }
    }

    async fn signal(&self, signal: i32) -> Result<(), SandboxError> {
        let tx = self.running_sender()?;
        tx.send(HostMsg::Signal(signal))
            .await
            .map_err(|_| invalid_state(&self.id, "the program has ended"))
    }

    async fn stop(&self, grace: Duration) -> Result<SandboxExit, SandboxError> {
        let phase = *self.phase.lock();
        if phase == Phase::Created || phase == Phase::Starting {
            return Err(invalid_state(&self.id, "not started"));
        }
        if self.shared.exit_tx.borrow().is_none() {
            {
                let mut c = self.shared.cause.lock();
                if c.is_none() {
                    *c = Some(EndCause::Killed);
                }
            }
            if self.shared.paused.load(Ordering::SeqCst) {
                let _ = self.resume().await;
            }
            if let Some(tx) = self.shared.sender() {
                let _ = tx.send(HostMsg::Signal(libc::SIGTERM)).await;
            }
            if self.wait_published(grace).await.is_none() {
                self.request_kill(EndCause::Killed);
            }
        }
        self.wait().await
    }

    async fn kill(&self) -> Result<(), SandboxError> {
        let phase = *self.phase.lock();
        if matches!(phase, Phase::Created | Phase::Destroyed) {
            return Ok(());
        }
        if self.shared.exit_tx.borrow().is_some() {
            return Ok(());
        }
        self.request_kill(EndCause::Killed);
        if self.wait_published(Duration::from_secs(15)).await.is_none() {
            // The supervisor is stuck: kill the VMM directly.
            let pid = self.shared.vmm_pid.load(Ordering::SeqCst);
            if pid != 0 {
                // SAFETY: kill(2) on the VMM pid we spawned and have not seen exit.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            return Err(SandboxError::op("kill", "the VM did not end within 15s"));
        }
        Ok(())
    }

    async fn wait(&self) -> Result<SandboxExit, SandboxError> {
        if *self.phase.lock() == Phase::Created {
            return Err(invalid_state(&self.id, "not started"));
        }
        if let Some(e) = self.start_error.lock().clone() {
            return Err(invalid_state(&self.id, format!("failed to start: {e}")));
        }
        let mut rx = self.shared.exit_tx.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| SandboxError::op("wait", "supervisor gone"))?
            .clone();
        exit.ok_or_else(|| SandboxError::op("wait", "no exit status"))
    }

    async fn stats(&self) -> Result<SandboxStats, SandboxError> {
        let pid = self.shared.vmm_pid.load(Ordering::SeqCst);
        if pid == 0 {
            return Err(invalid_state(&self.id, "the VM is not running"));
        }
        let (rss, hwm, proc_cpu) = proc_stats(pid);
        let cg_cpu = self
            .shared
            .cgroup
            .lock()
            .as_ref()
            .and_then(|cg| cg.cpu_usage_ns());
        let (disk_read_bytes, disk_write_bytes) = if self.vmm == Vmm::Qemu {
            match qmp::execute(&self.plan.qmp, "query-blockstats", None).await {
                Ok(ret) => qmp::blockstats_bytes(&ret),
                Err(_) => (0, 0),
            }
        } else {
            (0, 0)
        };
        let guest = self.guest_stats().await;
        Ok(SandboxStats {
            // The agent's own memory (what its limit applies to) when the guest answers,
            // else what the whole VM costs the host.
            memory_bytes: guest.map(|g| g.memory_bytes).unwrap_or(rss),
            memory_peak_bytes: guest
                .map(|g| g.memory_peak_bytes)
                .filter(|p| *p > 0)
                .unwrap_or(hwm),
            // CPU is what the VMM process consumed on the host (the quota applies to it).
            cpu_usage_ns: cg_cpu.unwrap_or(proc_cpu),
            disk_read_bytes,
            disk_write_bytes,
            net_rx_bytes: guest.map(|g| g.net_rx_bytes).unwrap_or(0),
            net_tx_bytes: guest.map(|g| g.net_tx_bytes).unwrap_or(0),
            pids: guest.map(|g| g.pids).unwrap_or(0),
            // The program's own CPU (idle detection: the VMM keeps using CPU for an idle
            // guest, ~5 % of a core under TCG; regression test: resource.rs
            // `microvm_tier_idle_agent_is_stopped_after_idle_timeout`).
            program_cpu_ns: guest.map(|g| g.cpu_usec.saturating_mul(1000)),
        })
    }

    async fn pause(&self) -> Result<(), SandboxError> {
        let pid = self.shared.vmm_pid.load(Ordering::SeqCst);
        if pid == 0 || *self.phase.lock() != Phase::Running {
            return Err(invalid_state(&self.id, "not running"));
        }
        match self.vmm {
            Vmm::Qemu => {
                qmp::execute(&self.plan.qmp, "stop", None).await?;
            }
            Vmm::Firecracker => {
                // SAFETY: kill(2) on our VMM child.
                if unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } != 0 {
                    return Err(SandboxError::op("pause", io::Error::last_os_error()));
                }
            }
        }
        self.shared.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn resume(&self) -> Result<(), SandboxError> {
        let pid = self.shared.vmm_pid.load(Ordering::SeqCst);
        if pid == 0 {
            return Err(invalid_state(&self.id, "not running"));
        }
        match self.vmm {
            Vmm::Qemu => {
                qmp::execute(&self.plan.qmp, "cont", None).await?;
            }
            Vmm::Firecracker => {
                // SAFETY: kill(2) on our VMM child.
                if unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) } != 0 {
                    return Err(SandboxError::op("resume", io::Error::last_os_error()));
                }
            }
        }
        self.shared.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn update_limits(&self, limits: &ResourceLimits) -> Result<(), SandboxError> {
        let unsupported = |limit: &str| SandboxError::LimitUnsupported {
            tier: SecurityTier::Tier3,
            limit: format!("{limit} changes on a running VM"),
        };
        if limits.memory_mb != self.spec.limits.memory_mb {
            return Err(unsupported("memory_mb"));
        }
        if limits.network_io_mbps != self.spec.limits.network_io_mbps
            && self.spec.has_capability(&Capability::Network)
        {
            return Err(unsupported("network_io_mbps"));
        }
        if limits.disk_io_mbps != self.spec.limits.disk_io_mbps {
            if self.plan.disk.is_none() || self.vmm != Vmm::Qemu {
                return Err(unsupported("disk_io_mbps"));
            }
            let bps = limits.disk_io_mbps.saturating_mul(1_000_000);
            qmp::execute(
                &self.plan.qmp,
                "block_set_io_throttle",
                Some(serde_json::json!({
                    "device": "ws", "bps": 0, "bps_rd": bps, "bps_wr": bps,
                    "iops": 0, "iops_rd": 0, "iops_wr": 0
                })),
            )
            .await?;
        }
        let cg = self.shared.cgroup.lock().clone();
        match cg {
            Some(cg) => cg.set_cpu(limits.cpu_cores),
            None => Err(invalid_state(&self.id, "the VM is not running")),
        }
    }

    async fn destroy(&self) -> Result<(), SandboxError> {
        let phase = *self.phase.lock();
        if phase == Phase::Destroyed {
            return Ok(());
        }
        if matches!(phase, Phase::Running | Phase::Starting) {
            let _ = self.kill().await;
        }
        *self.phase.lock() = Phase::Destroyed;
        self.cleanup_cgroup().await;
        match tokio::fs::remove_dir_all(&self.run_dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SandboxError::op(
                "destroy",
                format!("{}: {e}", self.run_dir.display()),
            )),
        }
    }
}

impl Drop for MicrovmSandbox {
    fn drop(&mut self) {
        let pid = self.shared.vmm_pid.load(Ordering::SeqCst);
        if pid != 0 {
            // SAFETY: kill(2) on the VMM pid we spawned (the supervisor still owns the child
            // and reaps it).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_millis(5);

    #[test]
    fn exits_are_classified() {
        let exited = GuestExit {
            code: Some(3),
            signal: None,
            oom_killed: false,
        };
        let e = classify_exit(None, Some(exited), false, D);
        assert_eq!((e.reason, e.code), (ExitReason::Exited, Some(3)));
        let oom = GuestExit {
            code: None,
            signal: Some(9),
            oom_killed: true,
        };
        assert_eq!(
            classify_exit(None, Some(oom), false, D).reason,
            ExitReason::OutOfMemory
        );
        let term = GuestExit {
            code: None,
            signal: Some(15),
            oom_killed: false,
        };
        assert_eq!(
            classify_exit(None, Some(term), false, D).reason,
            ExitReason::Signaled
        );
        let stopped = classify_exit(Some(EndCause::Killed), Some(term), false, D);
        assert_eq!(
            (stopped.reason, stopped.signal),
            (ExitReason::Killed, Some(15))
        );
        let killed = classify_exit(Some(EndCause::Killed), None, false, D);
        assert_eq!(
            (killed.reason, killed.signal),
            (ExitReason::Killed, Some(9))
        );
        assert_eq!(
            classify_exit(Some(EndCause::Timeout), None, false, D).reason,
            ExitReason::Timeout
        );
        assert_eq!(
            classify_exit(None, None, true, D).reason,
            ExitReason::OutOfMemory
        );
        assert_eq!(
            classify_exit(None, None, false, D).reason,
            ExitReason::Signaled
        );
    }

    #[test]
    fn codec_splits_a_stream_into_messages() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&GuestMsg::Stdout(b"hi".to_vec()).encode());
        let second = GuestMsg::Started { pid: 7 }.encode();
        buf.extend_from_slice(&second[..3]);
        let mut codec = GuestCodec;
        assert_eq!(
            codec.decode(&mut buf).expect("ok"),
            Some(GuestMsg::Stdout(b"hi".to_vec()))
        );
        assert_eq!(codec.decode(&mut buf).expect("ok"), None);
        buf.extend_from_slice(&second[3..]);
        assert_eq!(
            codec.decode(&mut buf).expect("ok"),
            Some(GuestMsg::Started { pid: 7 })
        );
        buf.extend_from_slice(&[1, 0, 0, 0, 0x55]);
        assert!(codec.decode(&mut buf).is_err());
    }
}
