//! One container sandbox: the [`Sandbox`] handle of the Docker and gVisor tiers.
//!
//! `start` attaches to the container's stdio (before starting it, so no byte is lost), starts
//! it, and spawns two tasks: a pump that demultiplexes the attach stream into the stdout and
//! stderr readers, and a monitor that waits for the container to stop, enforces
//! `SandboxSpec::timeout` (SIGKILL to the container), classifies the exit from the daemon's
//! final state (`State.OOMKilled`, exit code) and publishes it to every `wait()` caller. On a
//! timeout or a kill the monitor removes the container before publishing, so afterwards it
//! is gone from the daemon.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::ExecConfig;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, InspectContainerOptions, KillContainerOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::backend::Shared;
use super::hostnet;
use super::translate::{self, Intervention, SANDBOX_GID, SANDBOX_UID};
use crate::sandbox::{
    BoxedWriter, ExecOutput, ExitReason, Sandbox, SandboxError, SandboxExit, SandboxSpec,
    SandboxStats, SandboxStdio,
};
use crate::types::{Capability, ResourceLimits, SecurityTier};

/// Buffer between the attach stream and each of the stdout/stderr readers. When a reader is
/// not drained the pump (and with it the container's writes) waits.
const STDIO_BUFFER: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Started,
    Destroyed,
}

fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

struct Inner {
    id: String,
    shared: Arc<Shared>,
    spec: SandboxSpec,
    root: PathBuf,
    blkio: parking_lot::Mutex<Vec<(String, u64)>>,
    /// The last stats sample (keeps cumulative counters monotonic across partial samples).
    last_stats: parking_lot::Mutex<SandboxStats>,
    /// Current `tbf` rate in Mb/s (0 = none).
    shaped_mbps: AtomicU64,
    phase: tokio::sync::Mutex<Phase>,
    intervention: parking_lot::Mutex<Intervention>,
    exit_tx: watch::Sender<Option<SandboxExit>>,
    pid: AtomicI64,
}

impl Inner {
    fn tier(&self) -> SecurityTier {
        self.shared.flavor.tier
    }

    fn intervene(&self, why: Intervention) {
        let mut current = self.intervention.lock();
        if *current == Intervention::None && self.exit_tx.borrow().is_none() {
            *current = why;
        }
    }

    fn invalid(&self, message: impl Into<String>) -> SandboxError {
        SandboxError::InvalidState {
            id: self.id.clone(),
            message: message.into(),
        }
    }

    async fn kill_container(&self, signal: i32) -> Result<(), SandboxError> {
        let docker = self.shared.docker().await?;
        let options = KillContainerOptionsBuilder::new()
            .signal(&signal.to_string())
            .build();
        match docker.kill_container(&self.id, Some(options)).await {
            Ok(()) => Ok(()),
            // Not running (409) or already removed (404): nothing left to signal.
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(()),
            Err(e) => Err(SandboxError::op("kill container", e)),
        }
    }

    async fn remove_container(&self) -> Result<(), SandboxError> {
        let docker = self.shared.docker().await?;
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(&self.id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            // Removal already in progress.
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(SandboxError::op("remove container", e)),
        }
    }

    /// `(exit code, OOM killed)` of the stopped container, `None` when it is gone.
    async fn final_state(&self) -> Option<(Option<i64>, bool)> {
        let docker = self.shared.docker().await.ok()?;
        let info = docker
            .inspect_container(&self.id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        let state = info.state?;
        Some((state.exit_code, state.oom_killed.unwrap_or(false)))
    }

    /// Returns once the container is no longer running (or no longer exists).
    async fn until_stopped(&self) {
        loop {
            if let Ok(docker) = self.shared.docker().await {
                let mut stream = docker.wait_container(&self.id, None::<WaitContainerOptions>);
                match stream.next().await {
                    Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) => return,
                    Some(Err(e)) if is_status(&e, 404) => return,
                    other => tracing::debug!(sandbox = %self.id, ?other, "wait interrupted"),
                }
                match docker
                    .inspect_container(&self.id, None::<InspectContainerOptions>)
                    .await
                {
                    Ok(info) => {
                        let running = info.state.and_then(|s| s.running).unwrap_or(false);
                        if !running {
                            return;
                        }
                    }
                    Err(e) if is_status(&e, 404) => return,
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn monitor(self: Arc<Self>, started: Instant) {
        let stopped = self.until_stopped();
        tokio::pin!(stopped);
        let timed_out = match self.spec.timeout {
            Some(limit) => tokio::select! {
                _ = &mut stopped => false,
                _ = tokio::time::sleep(limit) => true,
            },
            None => {
                (&mut stopped).await;
                false
            }
        };
        if timed_out {
            self.intervene(Intervention::Timeout);
            tracing::info!(sandbox = %self.id, "timeout elapsed, killing the container");
            if let Err(e) = self.kill_container(libc::SIGKILL).await {
                tracing::warn!(sandbox = %self.id, error = %e, "kill on timeout failed");
            }
            stopped.await;
        }
        let duration = started.elapsed();
        let (code, mut oom) = self.final_state().await.unwrap_or((None, false));
        let intervention = *self.intervention.lock();
        if code == Some(137) && !oom && intervention == Intervention::None {
            // A SIGKILL nobody here sent: the daemon may record the OOM event a moment after
            // the exit (seen with runsc), so look again before calling it a plain signal.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some((_, true)) = self.final_state().await {
                    oom = true;
                    break;
                }
            }
        }
        let exit = translate::classify_exit(code, oom, intervention, duration);
        if matches!(intervention, Intervention::Timeout | Intervention::Killed) {
            if let Err(e) = self.remove_container().await {
                tracing::warn!(sandbox = %self.id, error = %e, "removing the container failed");
            }
        }
        tracing::debug!(sandbox = %self.id, ?exit, "sandbox exited");
        self.exit_tx.send_replace(Some(exit));
    }

    async fn published_exit(&self) -> Result<SandboxExit, SandboxError> {
        let mut rx = self.exit_tx.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| self.invalid("exit channel closed"))?;
        exit.clone()
            .ok_or_else(|| self.invalid("exit missing after publication"))
    }

    async fn exit_within(&self, limit: Duration) -> Option<SandboxExit> {
        tokio::time::timeout(limit, self.published_exit())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// A container sandbox (Tier1 or Tier2).
pub(crate) struct ContainerSandbox {
    inner: Arc<Inner>,
}

impl ContainerSandbox {
    pub(crate) fn new(
        id: String,
        shared: Arc<Shared>,
        spec: SandboxSpec,
        root: PathBuf,
        blkio: Vec<(String, u64)>,
        shaping: Option<u64>,
    ) -> Self {
        let (exit_tx, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                id,
                shared,
                spec,
                root,
                blkio: parking_lot::Mutex::new(blkio),
                last_stats: parking_lot::Mutex::new(SandboxStats::default()),
                shaped_mbps: AtomicU64::new(shaping.unwrap_or(0)),
                phase: tokio::sync::Mutex::new(Phase::Created),
                intervention: parking_lot::Mutex::new(Intervention::None),
                exit_tx,
                pid: AtomicI64::new(0),
            }),
        }
    }
}

impl Drop for ContainerSandbox {
    fn drop(&mut self) {
        // A handle dropped without `destroy()` (e.g. by a panicking caller) must not leave its
        // container or workspace behind. The caller's runtime may be shutting down (or be the
        // current-thread runtime we are blocking), so the cleanup runs on its own thread with
        // its own runtime and connection.
        let destroyed = matches!(
            self.inner.phase.try_lock().map(|p| *p),
            Ok(Phase::Destroyed)
        );
        if destroyed {
            return;
        }
        let id = self.inner.id.clone();
        let root = self.inner.root.clone();
        let socket = self.inner.shared.docker_config.socket.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("cleanup-{id}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async {
                        // API 1.41 (dockerd 20.10) is understood by every newer daemon.
                        let docker = Docker::connect_with_socket(
                            &socket.to_string_lossy(),
                            30,
                            &bollard::ClientVersion {
                                major_version: 1,
                                minor_version: 41,
                            },
                        );
                        if let Ok(docker) = docker {
                            let options = RemoveContainerOptionsBuilder::new()
                                .force(true)
                                .v(true)
                                .build();
                            let _ = docker.remove_container(&id, Some(options)).await;
                        }
                    });
                }
                let _ = std::fs::remove_dir_all(&root);
            });
        // Joined so the cleanup is done when the handle is gone (it never needs the caller's
        // runtime, so blocking here cannot deadlock).
        match spawned {
            Ok(thread) => {
                let _ = thread.join();
            }
            Err(e) => {
                tracing::warn!(sandbox = %self.inner.id, error = %e, "cleanup thread not started")
            }
        }
    }
}

/// The program's stdin: the attach connection's write half. Shutting it down (or dropping
/// it) closes the program's stdin.
struct StdinWriter {
    inner: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    closed: bool,
}

impl AsyncWrite for StdinWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.inner.as_mut() {
            Some(w) => w.as_mut().poll_write(cx, buf),
            None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.inner.as_mut() {
            Some(w) => w.as_mut().poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = match self.inner.as_mut() {
            Some(w) => w.as_mut().poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        };
        if let Poll::Ready(Ok(())) = result {
            self.closed = true;
        }
        result
    }
}

impl Drop for StdinWriter {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let (Some(mut w), Ok(handle)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        {
            handle.spawn(async move {
                let _ = w.shutdown().await;
            });
        }
    }
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<LogOutput, DockerError>> + Send>>;

/// Demultiplexes Docker's attach stream into the stdout and stderr pipes.
async fn pump(
    mut output: OutputStream,
    mut stdout: tokio::io::DuplexStream,
    mut stderr: tokio::io::DuplexStream,
) {
    let (mut out_open, mut err_open) = (true, true);
    while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                if out_open && stdout.write_all(&message).await.is_err() {
                    out_open = false;
                }
            }
            Ok(LogOutput::StdErr { message }) => {
                if err_open && stderr.write_all(&message).await.is_err() {
                    err_open = false;
                }
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(e) => {
                tracing::debug!(error = %e, "attach stream ended");
                break;
            }
        }
    }
    let _ = stdout.shutdown().await;
    let _ = stderr.shutdown().await;
}

/// Collects an exec's output.
async fn collect(mut output: OutputStream) -> Result<(Vec<u8>, Vec<u8>), SandboxError> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(item) = output.next().await {
        match item.map_err(|e| SandboxError::op("exec output", e))? {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                out.extend_from_slice(&message)
            }
            LogOutput::StdErr { message } => err.extend_from_slice(&message),
            LogOutput::StdIn { .. } => {}
        }
    }
    Ok((out, err))
}

/// The cgroup v1 directory of `controller` (or the v2 directory) holding `pid`.
fn cgroup_dir_of(pid: i64, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == controller) {
            return Some(PathBuf::from(format!("/sys/fs/cgroup/{controller}{path}")));
        }
    }
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(PathBuf::from(format!("/sys/fs/cgroup{v2}")))
}

#[async_trait]
impl Sandbox for ContainerSandbox {
    fn id(&self) -> &str {
        &self.inner.id
    }

    fn tier(&self) -> SecurityTier {
        self.inner.tier()
    }

    async fn start(&self) -> Result<SandboxStdio, SandboxError> {
        let inner = &self.inner;
        let mut phase = inner.phase.lock().await;
        match *phase {
            Phase::Created => {}
            Phase::Started => return Err(inner.invalid("already started")),
            Phase::Destroyed => return Err(inner.invalid("destroyed")),
        }
        if inner.exit_tx.borrow().is_some() {
            return Err(inner.invalid("killed before start"));
        }
        let docker = inner.shared.docker().await?;
        let options = AttachContainerOptionsBuilder::new()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .logs(false)
            .build();
        let attach = docker
            .attach_container(&inner.id, Some(options))
            .await
            .map_err(|e| SandboxError::op("attach container", e))?;
        let started = Instant::now();
        docker
            .start_container(
                &inner.id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| inner.shared.start_error(e))?;
        *phase = Phase::Started;
        drop(phase);
        tokio::spawn(Arc::clone(inner).monitor(started));

        let (stdout_w, stdout_r) = tokio::io::duplex(STDIO_BUFFER);
        let (stderr_w, stderr_r) = tokio::io::duplex(STDIO_BUFFER);
        tokio::spawn(pump(attach.output, stdout_w, stderr_w));
        let mut stdin = StdinWriter {
            inner: Some(attach.input),
            closed: false,
        };

        let mbps = inner.shaped_mbps.load(Ordering::SeqCst);
        if mbps > 0 {
            // The program waits at the start gate until both qdiscs are in place.
            let shaped = async {
                let info = docker
                    .inspect_container(&inner.id, None::<InspectContainerOptions>)
                    .await
                    .map_err(|e| SandboxError::op("inspect container", e))?;
                let pid = info.state.and_then(|s| s.pid).unwrap_or(0);
                if pid <= 0 {
                    return Err(SandboxError::op("shape network", "container has no pid"));
                }
                inner.pid.store(pid, Ordering::SeqCst);
                hostnet::shape(pid, mbps).await?;
                stdin.write_all(b"go\n").await?;
                stdin.flush().await?;
                Ok(())
            };
            if let Err(e) = shaped.await {
                tracing::warn!(sandbox = %inner.id, error = %e, "network shaping failed");
                inner.intervene(Intervention::Killed);
                let _ = inner.kill_container(libc::SIGKILL).await;
                return Err(SandboxError::LimitUnsupported {
                    tier: inner.tier(),
                    limit: format!("network_io_mbps = {mbps} (installing tbf failed: {e})"),
                });
            }
        }
        Ok(SandboxStdio {
            stdin: Box::pin(stdin) as BoxedWriter,
            stdout: Box::pin(stdout_r),
            stderr: Box::pin(stderr_r),
        })
    }

    async fn exec(&self, argv: &[String], timeout: Duration) -> Result<ExecOutput, SandboxError> {
        let inner = &self.inner;
        if argv.is_empty() {
            return Err(SandboxError::InvalidSpec("exec needs a program".into()));
        }
        if *inner.phase.lock().await != Phase::Started {
            return Err(inner.invalid("exec needs a started sandbox"));
        }
        let docker = inner.shared.docker().await?;
        let config = ExecConfig {
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            cmd: Some(argv.to_vec()),
            user: Some(format!("{SANDBOX_UID}:{SANDBOX_GID}")),
            working_dir: Some(inner.spec.workdir.to_string_lossy().into_owned()),
            privileged: Some(false),
            ..Default::default()
        };
        let exec = docker
            .create_exec(&inner.id, config)
            .await
            .map_err(|e| match e {
                DockerError::DockerResponseServerError {
                    status_code: 409, ..
                } => inner.invalid("exec needs a running sandbox"),
                e => SandboxError::op("create exec", e),
            })?;
        let started = docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| SandboxError::op("start exec", e))?;
        let output = match started {
            bollard::exec::StartExecResults::Attached { output, .. } => output,
            bollard::exec::StartExecResults::Detached => {
                return Err(SandboxError::op("start exec", "exec was detached"))
            }
        };
        match tokio::time::timeout(timeout, collect(output)).await {
            Ok(collected) => {
                let (stdout, stderr) = collected?;
                let mut code = None;
                for _ in 0..50 {
                    let info = docker
                        .inspect_exec(&exec.id)
                        .await
                        .map_err(|e| SandboxError::op("inspect exec", e))?;
                    if info.running != Some(true) {
                        code = info.exit_code;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(ExecOutput {
                    code: code.and_then(|c| i32::try_from(c).ok()).unwrap_or(-1),
                    stdout,
                    stderr,
                })
            }
            Err(_) => {
                if let Ok(info) = docker.inspect_exec(&exec.id).await {
                    if let Some(pid) = info.pid.filter(|p| *p > 0) {
                        if let Ok(pid) = libc::pid_t::try_from(pid) {
                            // SAFETY: kill(2) with a pid the daemon reported for this exec
                            // and a constant signal; no memory is shared with the callee.
                            unsafe {
                                libc::kill(pid, libc::SIGKILL);
                            }
                        }
                    }
                }
                Err(SandboxError::op(
                    "exec",
                    format!("`{}` did not finish within {timeout:?}", argv.join(" ")),
                ))
            }
        }
    }

    async fn signal(&self, signal: i32) -> Result<(), SandboxError> {
        if *self.inner.phase.lock().await != Phase::Started {
            return Err(self.inner.invalid("not running"));
        }
        self.inner.kill_container(signal).await
    }

    async fn stop(&self, grace: Duration) -> Result<SandboxExit, SandboxError> {
        let inner = &self.inner;
        if *inner.phase.lock().await == Phase::Created {
            self.kill().await?;
            return inner.published_exit().await;
        }
        inner.intervene(Intervention::Killed);
        inner.kill_container(libc::SIGTERM).await?;
        if let Some(exit) = inner.exit_within(grace).await {
            return Ok(exit);
        }
        inner.kill_container(libc::SIGKILL).await?;
        inner.published_exit().await
    }

    async fn kill(&self) -> Result<(), SandboxError> {
        let inner = &self.inner;
        let phase = *inner.phase.lock().await;
        inner.intervene(Intervention::Killed);
        match phase {
            Phase::Created => {
                inner.remove_container().await?;
                inner.exit_tx.send_if_modified(|e| {
                    if e.is_none() {
                        *e = Some(SandboxExit {
                            reason: ExitReason::Killed,
                            code: None,
                            signal: Some(libc::SIGKILL),
                            duration: Duration::ZERO,
                        });
                        true
                    } else {
                        false
                    }
                });
                Ok(())
            }
            Phase::Started => {
                inner.kill_container(libc::SIGKILL).await?;
                inner.published_exit().await.map(|_| ())
            }
            Phase::Destroyed => Ok(()),
        }
    }

    async fn wait(&self) -> Result<SandboxExit, SandboxError> {
        let inner = &self.inner;
        let phase = *inner.phase.lock().await;
        if phase == Phase::Created && inner.exit_tx.borrow().is_none() {
            return Err(inner.invalid("not started"));
        }
        inner.published_exit().await
    }

    async fn stats(&self) -> Result<SandboxStats, SandboxError> {
        let inner = &self.inner;
        let docker = inner.shared.docker().await?;
        let options = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let sample = docker
            .stats(&inner.id, Some(options))
            .next()
            .await
            .ok_or_else(|| SandboxError::op("stats", "no sample"))?
            .map_err(|e| match e {
                e if is_status(&e, 404) => inner.invalid("container is gone"),
                e => SandboxError::op("stats", e),
            })?;
        let mut last = inner.last_stats.lock();
        *last = translate::stats_from_docker(&sample).monotonic_after(&last);
        Ok(last.clone())
    }

    async fn pause(&self) -> Result<(), SandboxError> {
        let docker = self.inner.shared.docker().await?;
        // runc gives up freezing a busy cgroup on a loaded host ("unable to freeze"); the
        // freezer itself works, so try again a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match docker.pause_container(&self.inner.id).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 && is_status(&e, 500) => {
                    tracing::debug!(sandbox = %self.inner.id, error = %e, attempt, "pause retry");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(SandboxError::op("pause container", e)),
            }
        }
    }

    async fn resume(&self) -> Result<(), SandboxError> {
        let docker = self.inner.shared.docker().await?;
        docker
            .unpause_container(&self.inner.id)
            .await
            .map_err(|e| SandboxError::op("unpause container", e))
    }

    async fn update_limits(&self, limits: &ResourceLimits) -> Result<(), SandboxError> {
        let inner = &self.inner;
        if let Err((field, why)) = limits.validate() {
            return Err(SandboxError::InvalidSpec(format!("limits.{field}: {why}")));
        }
        let flavor = &inner.shared.flavor;
        if limits.disk_io_mbps > 0 && !flavor.enforcement.disk_io {
            return Err(SandboxError::LimitUnsupported {
                tier: flavor.tier,
                limit: format!("disk_io_mbps = {}", limits.disk_io_mbps),
            });
        }
        let memory = i64::try_from(limits.memory_bytes()).unwrap_or(i64::MAX);
        let nano = translate::nano_cpus(limits.cpu_cores);
        let docker = inner.shared.docker().await?;
        let info = docker
            .inspect_container(&inner.id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| SandboxError::op("inspect container", e))?;
        let pid = info.state.and_then(|s| s.pid).unwrap_or(0);
        if flavor.live_update {
            let blkio: Vec<(String, u64)> = if limits.disk_io_mbps > 0 {
                inner.shared.blkio_throttles(limits.disk_io_mbps).await?
            } else {
                // Rate 0 removes a throttle.
                inner
                    .blkio
                    .lock()
                    .iter()
                    .map(|(d, _)| (d.clone(), 0))
                    .collect()
            };
            docker
                .update_container(&inner.id, translate::update_body(memory, nano, &blkio))
                .await
                .map_err(|e| SandboxError::op("update container", e))?;
            *inner.blkio.lock() = blkio.into_iter().filter(|(_, r)| *r > 0).collect();
        } else {
            // runsc has no `update`: write the sandbox's cgroup directly (the same knobs the
            // daemon would set), found from its init process.
            if pid <= 0 {
                return Err(inner.invalid("update needs a running sandbox"));
            }
            let write = |controller: &str, file: &str, value: String| -> Result<(), SandboxError> {
                let dir = cgroup_dir_of(pid, controller).ok_or_else(|| {
                    SandboxError::op(
                        "update limits",
                        format!("no {controller} cgroup for pid {pid}"),
                    )
                })?;
                std::fs::write(dir.join(file), &value).map_err(|e| {
                    SandboxError::op(
                        "update limits",
                        format!("{}/{file} = {value}: {e}", dir.display()),
                    )
                })
            };
            let current: i64 = cgroup_dir_of(pid, "memory")
                .and_then(|d| std::fs::read_to_string(d.join("memory.limit_in_bytes")).ok())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            // memsw must stay >= memory at every step.
            if memory >= current {
                write("memory", "memory.memsw.limit_in_bytes", memory.to_string())?;
                write("memory", "memory.limit_in_bytes", memory.to_string())?;
            } else {
                write("memory", "memory.limit_in_bytes", memory.to_string())?;
                write("memory", "memory.memsw.limit_in_bytes", memory.to_string())?;
            }
            let period: i64 = 100_000;
            let quota = (limits.cpu_cores * period as f64).round() as i64;
            write("cpu", "cpu.cfs_period_us", period.to_string())?;
            write("cpu", "cpu.cfs_quota_us", quota.max(1000).to_string())?;
        }
        let net = inner.spec.has_capability(&Capability::Network);
        let old = inner.shaped_mbps.load(Ordering::SeqCst);
        if net && pid > 0 && limits.network_io_mbps != old {
            if limits.network_io_mbps > 0 {
                hostnet::shape(pid, limits.network_io_mbps).await?;
            } else {
                hostnet::unshape(pid).await?;
            }
            inner
                .shaped_mbps
                .store(limits.network_io_mbps, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn destroy(&self) -> Result<(), SandboxError> {
        let inner = &self.inner;
        let mut phase = inner.phase.lock().await;
        if *phase == Phase::Destroyed {
            return Ok(());
        }
        inner.intervene(Intervention::Killed);
        inner.remove_container().await?;
        if *phase == Phase::Started {
            // The monitor sees the container gone and publishes the exit.
            if inner.exit_within(Duration::from_secs(30)).await.is_none() {
                tracing::warn!(sandbox = %inner.id, "no exit recorded 30 s after removal");
            }
        } else {
            inner.exit_tx.send_if_modified(|e| {
                let fresh = e.is_none();
                if fresh {
                    *e = Some(SandboxExit {
                        reason: ExitReason::Killed,
                        code: None,
                        signal: None,
                        duration: Duration::ZERO,
                    });
                }
                fresh
            });
        }
        match std::fs::remove_dir_all(&inner.root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SandboxError::op("remove workspace", e)),
        }
        *phase = Phase::Destroyed;
        tracing::debug!(sandbox = %inner.id, "sandbox destroyed");
        Ok(())
    }
}
