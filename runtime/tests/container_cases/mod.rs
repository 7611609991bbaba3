//! The cases every container tier (Tier1 Docker, Tier2 gVisor) runs, with the same specs.
//! Each tier's test file (`sandbox_docker.rs`, `sandbox_gvisor.rs`) calls these with its
//! [`Tier`]; where a tier differs truthfully (e.g. gVisor cannot throttle disk I/O) the
//! [`Tier`] says so and the case asserts that behaviour instead.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use symbiont_runtime::sandbox::{
    ExitReason, Sandbox, SandboxBackend, SandboxConfig, SandboxError, SandboxExit, SandboxFile,
    SandboxSpec, SandboxStats,
};
use symbiont_runtime::{AgentId, Capability, ResourceLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How a tier is built and where it truthfully differs.
pub struct Tier {
    /// Name for messages.
    pub name: &'static str,
    /// Builds the backend from `[sandbox]`.
    pub make: fn(&SandboxConfig) -> Result<Arc<dyn SandboxBackend>, SandboxError>,
    /// The kernel throttles direct disk writes (false: `disk_io_mbps > 0` is refused).
    pub disk_io: bool,
    /// A fork bomb ends the whole sandbox (gVisor) instead of failing forks inside it.
    pub fork_bomb_ends_sandbox: bool,
    /// `/proc/self/status` shows `NoNewPrivs`.
    pub shows_no_new_privs: bool,
}

/// A backend with a private state directory on the disk (so blkio throttles apply).
pub struct Env {
    pub backend: Arc<dyn SandboxBackend>,
    pub config: SandboxConfig,
    pub tier: &'static Tier,
    _state: tempfile::TempDir,
}

pub const PIDS_LIMIT: u64 = 64;

/// Builds the tier's backend and probes it; a missing daemon or runtime fails the test with
/// the install message.
pub async fn env(tier: &'static Tier) -> Env {
    let state = tempfile::Builder::new()
        .prefix("symbiont-ctr-test-")
        .tempdir_in("/var/tmp")
        .expect("state dir on /var/tmp");
    let config = SandboxConfig {
        state_dir: state.path().to_path_buf(),
        pids_limit: PIDS_LIMIT,
        ..Default::default()
    };
    let backend = (tier.make)(&config).expect("backend");
    match backend.probe().await {
        Ok(info) => assert_eq!(info.tier, backend.tier()),
        Err(e) => panic!(
            "{} tier unavailable ({}): {e}\nrun `bash scripts/setup.sh` to install it",
            tier.name,
            e.code()
        ),
    }
    Env {
        backend,
        config,
        tier,
        _state: state,
    }
}

/// A spec with generous limits, no disk/network throttles and a 60 s safety timeout.
pub fn spec(argv: &[&str]) -> SandboxSpec {
    let mut spec = SandboxSpec::new(AgentId::new(), argv.iter().copied());
    spec.limits = ResourceLimits {
        memory_mb: 256,
        cpu_cores: 1.0,
        disk_io_mbps: 0,
        network_io_mbps: 0,
        ..Default::default()
    };
    spec.timeout = Some(Duration::from_secs(60));
    spec
}

pub fn sh(script: &str) -> SandboxSpec {
    spec(&["/bin/sh", "-c", script])
}

/// Output and exit of a finished program.
pub struct Finished {
    pub stdout: String,
    pub stderr: String,
    pub exit: SandboxExit,
}

/// Creates, starts, feeds `stdin` (then closes it), collects everything, waits, destroys.
pub async fn run(env: &Env, spec: SandboxSpec, stdin: &[u8]) -> Finished {
    let sandbox = env.backend.create(spec).await.expect("create");
    let finished = run_started(&sandbox, stdin).await;
    destroy_and_check(&sandbox).await;
    finished
}

pub async fn run_started(sandbox: &Arc<dyn Sandbox>, stdin: &[u8]) -> Finished {
    let mut io = sandbox.start().await.expect("start");
    io.stdin.write_all(stdin).await.expect("stdin");
    io.stdin.shutdown().await.expect("close stdin");
    let mut out = Vec::new();
    let mut err = Vec::new();
    let (a, b) = tokio::join!(
        io.stdout.read_to_end(&mut out),
        io.stderr.read_to_end(&mut err)
    );
    a.expect("stdout");
    b.expect("stderr");
    let exit = sandbox.wait().await.expect("wait");
    Finished {
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        exit,
    }
}

pub fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_socket_defaults().expect("docker client")
}

/// True when the daemon still knows a container of this sandbox id.
pub async fn container_exists(id: &str) -> bool {
    match docker()
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
    {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(e) => panic!("inspect {id}: {e}"),
    }
}

/// Destroys (twice: idempotent) and checks nothing is left: no container, no workspace.
pub async fn destroy_and_check(sandbox: &Arc<dyn Sandbox>) {
    sandbox.destroy().await.expect("destroy");
    sandbox.destroy().await.expect("destroy is idempotent");
    assert!(
        !container_exists(sandbox.id()).await,
        "container {} left behind",
        sandbox.id()
    );
    let labelled = docker()
        .list_containers(Some(
            bollard::query_parameters::ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&std::collections::HashMap::from([(
                    "label",
                    vec![format!("io.symbiont.sandbox={}", sandbox.id())],
                )]))
                .build(),
        ))
        .await
        .expect("list containers");
    assert!(labelled.is_empty(), "labelled container left behind");
}

pub fn workspace_dir(env: &Env, sandbox: &Arc<dyn Sandbox>) -> PathBuf {
    env.config
        .state_dir
        .join(env.backend.tier().name())
        .join(sandbox.id())
}

// ---------------------------------------------------------------------------------------
// The cases.
// ---------------------------------------------------------------------------------------

pub async fn program_output_and_exit_code(tier: &'static Tier) {
    let env = env(tier).await;
    let f = run(&env, sh("echo out; echo err >&2; exit 7"), b"").await;
    assert_eq!(f.stdout, "out\n");
    assert_eq!(f.stderr, "err\n");
    assert_eq!(f.exit.reason, ExitReason::Exited);
    assert_eq!(f.exit.code, Some(7));
    let ok = run(&env, spec(&["/bin/echo", "hi"]), b"").await;
    assert_eq!(ok.stdout, "hi\n");
    assert!(ok.exit.success(), "{:?}", ok.exit);
}

pub async fn stdin_reaches_the_program(tier: &'static Tier) {
    let env = env(tier).await;
    let f = run(&env, spec(&["/bin/cat"]), b"hello through stdin\n").await;
    assert_eq!(f.stdout, "hello through stdin\n");
    assert!(f.exit.success(), "{:?}", f.exit);
}

pub async fn workspace_files_keep_modes(tier: &'static Tier) {
    let env = env(tier).await;
    let mut s = sh("./bin/run.sh; stat -c '%a %u' data.txt; cat data.txt; pwd");
    s.files.push(SandboxFile {
        path: "bin/run.sh".into(),
        contents: b"#!/bin/sh\necho script ran\n".to_vec(),
        mode: 0o750,
    });
    s.files.push(SandboxFile {
        path: "data.txt".into(),
        contents: b"payload\n".to_vec(),
        mode: 0o640,
    });
    let f = run(&env, s, b"").await;
    assert_eq!(
        f.stdout, "script ran\n640 65534\npayload\n/workspace\n",
        "{}",
        f.stderr
    );
    assert!(f.exit.success());
}

pub async fn memory_hog_is_oom_killed(tier: &'static Tier) {
    let env = env(tier).await;
    let mut s = spec(&[
        "/bin/dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=300M",
        "count=1",
    ]);
    s.limits.memory_mb = 64;
    let f = run(&env, s, b"").await;
    assert_eq!(
        f.exit.reason,
        ExitReason::OutOfMemory,
        "{:?} {}",
        f.exit,
        f.stderr
    );
    assert!(f.exit.is_resource_violation());
}

/// The host answers quickly: spawning `true` takes well under a second.
async fn host_is_responsive() {
    for _ in 0..3 {
        let t = Instant::now();
        let status = tokio::process::Command::new("true")
            .status()
            .await
            .expect("spawn on host");
        assert!(status.success());
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "host took {:?} to spawn a process",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn fork_bomb_is_contained(tier: &'static Tier) {
    let env = env(tier).await;
    let mut s = sh("bomb() { bomb | bomb & }; bomb; exec sleep 40");
    s.timeout = Some(Duration::from_secs(45));
    let sandbox = env.backend.create(s).await.expect("create");
    let _io = sandbox.start().await.expect("start");
    tokio::time::sleep(Duration::from_secs(3)).await;
    host_is_responsive().await;
    if tier.fork_bomb_ends_sandbox {
        // gVisor: the host pids cgroup caps the Sentry; reaching it ends the sandbox.
        let exit = tokio::time::timeout(Duration::from_secs(30), sandbox.wait())
            .await
            .expect("the bomb must end the gVisor sandbox")
            .expect("wait");
        assert!(!exit.success(), "{exit:?}");
    } else {
        let stats = sandbox.stats().await.expect("stats");
        assert!(stats.pids > 0, "{stats:?}");
        assert!(
            stats.pids <= PIDS_LIMIT,
            "{} tasks despite pids_limit {PIDS_LIMIT}",
            stats.pids
        );
        sandbox.kill().await.expect("kill");
        assert_eq!(
            sandbox.wait().await.expect("wait").reason,
            ExitReason::Killed
        );
    }
    host_is_responsive().await;
    destroy_and_check(&sandbox).await;
}

fn cpu_rate(a: &SandboxStats, ta: Instant, b: &SandboxStats, tb: Instant) -> f64 {
    (b.cpu_usage_ns - a.cpu_usage_ns) as f64 / 1e9 / (tb - ta).as_secs_f64()
}

/// Cores a busy loop with `cpu_cores` gets, measured over 4 s from the tier's stats.
async fn busy_loop_rate(env: &Env, cpu_cores: f64) -> f64 {
    let mut s = sh("while :; do :; done");
    s.limits.cpu_cores = cpu_cores;
    let sandbox = env.backend.create(s).await.expect("create");
    let _io = sandbox.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (a, ta) = (sandbox.stats().await.expect("stats"), Instant::now());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (b, tb) = (sandbox.stats().await.expect("stats"), Instant::now());
    destroy_and_check(&sandbox).await;
    cpu_rate(&a, ta, &b, tb)
}

/// `cpu_cores = 0.5` is a ceiling the kernel enforces (never above 0.65), and when the host
/// has a spare core (shown in the same run by an unthrottled busy loop getting at least 0.8
/// cores) the sandbox gets about half a core (at least 0.35). On a saturated host (other
/// jobs on both cores) the CFS fair share is below 0.5 for everyone, so only the ceiling and
/// the ordering can be checked; the measured numbers are printed either way.
pub async fn busy_loop_gets_half_a_core(tier: &'static Tier) {
    let env = env(tier).await;
    let mut limited = busy_loop_rate(&env, 0.5).await;
    let mut reference = busy_loop_rate(&env, 2.0).await;
    if reference < 0.8 {
        // Busy host: measure once more, it may have calmed down.
        limited = busy_loop_rate(&env, 0.5).await;
        reference = reference.max(busy_loop_rate(&env, 2.0).await);
    }
    println!(
        "{}: cpu_cores = 0.5 got {limited:.3} cores; unthrottled reference got {reference:.3}",
        tier.name
    );
    assert!(
        limited <= 0.65,
        "busy loop with cpu_cores = 0.5 used {limited:.3} cores"
    );
    if reference >= 0.8 {
        assert!(
            limited >= 0.35,
            "busy loop with cpu_cores = 0.5 got only {limited:.3} cores while an \
             unthrottled one got {reference:.3}"
        );
    } else {
        println!("host saturated (reference < 0.8 cores): only the ceiling was checked");
        assert!(
            limited <= reference + 0.15,
            "{limited:.3} vs reference {reference:.3}"
        );
    }
}

/// A TCP server on the host's 127.0.0.1 that greets whoever connects.
async fn loopback_server() -> (u16, tokio::task::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok(Ok((mut conn, _))) =
            tokio::time::timeout(Duration::from_secs(15), listener.accept()).await
        {
            accepted += 1;
            let _ = conn.write_all(b"hello-from-host\n").await;
            let _ = conn.shutdown().await;
        }
        accepted
    });
    (port, task)
}

pub async fn network_only_with_capability(tier: &'static Tier) {
    let env = env(tier).await;
    let (port, server) = loopback_server().await;
    // Without Network: no route to the host, whatever address is tried.
    let script = format!(
        "for a in 127.0.0.1 172.17.0.1 172.18.0.1 \"$SYMBIONT_HOST_ADDR\"; do \
         [ -n \"$a\" ] && nc -w 2 $a {port} </dev/null; done; \
         echo \"addr=[$SYMBIONT_HOST_ADDR]\"; ls /sys/class/net"
    );
    let denied = run(&env, sh(&script), b"").await;
    assert!(
        !denied.stdout.contains("hello-from-host"),
        "reached the host without Network: {}",
        denied.stdout
    );
    assert!(denied.stdout.contains("addr=[]"), "{}", denied.stdout);
    // With Network: reachable at $SYMBIONT_HOST_ADDR.
    let mut allowed = sh(&format!(
        "nc -w 5 \"$SYMBIONT_HOST_ADDR\" {port} </dev/null"
    ));
    allowed.capabilities.push(Capability::Network);
    let f = run(&env, allowed, b"").await;
    assert_eq!(f.stdout, "hello-from-host\n", "stderr: {}", f.stderr);
    assert!(f.exit.success(), "{:?}", f.exit);
    assert_eq!(
        server.await.expect("server"),
        1,
        "exactly the networked run connected"
    );
}

pub async fn root_is_read_only_without_filesystem(tier: &'static Tier) {
    let env = env(tier).await;
    let script = "touch /var/tmp/x; echo var=$?; touch /x; echo root=$?; \
                  touch /workspace/ok; echo ws=$?; touch /tmp/t; echo tmp=$?";
    let f = run(&env, sh(script), b"").await;
    assert!(f.stdout.contains("ws=0"), "{}", f.stdout);
    assert!(f.stdout.contains("tmp=0"), "{}", f.stdout);
    assert!(
        !f.stdout.contains("var=0"),
        "wrote /var/tmp without FileSystem"
    );
    assert!(!f.stdout.contains("root=0"), "wrote / without FileSystem");
    assert!(
        f.stderr.contains("Read-only file system"),
        "expected EROFS, got: {}",
        f.stderr
    );
    let mut granted = sh(script);
    granted.capabilities.push(Capability::FileSystem);
    let g = run(&env, granted, b"").await;
    assert!(
        g.stdout.contains("var=0"),
        "FileSystem grants a writable root: {}",
        g.stdout
    );
}

pub async fn host_secrets_are_unreadable(tier: &'static Tier) {
    let env = env(tier).await;
    let keys = tempfile::Builder::new()
        .prefix("symbiont-keys-")
        .tempdir_in("/var/tmp")
        .expect("keys dir");
    let key = keys.path().join("signing.key");
    let secret = format!("SECRET-{}", uuid::Uuid::new_v4());
    std::fs::write(&key, &secret).expect("write key");
    let host_shadow = std::fs::read_to_string("/etc/shadow").expect("read host shadow");
    let shadow_line = host_shadow
        .lines()
        .next()
        .expect("shadow has lines")
        .to_string();
    let script = format!(
        "cat /etc/shadow; cat {k}; cat /proc/1/root/etc/shadow; cat /proc/1/root{k}; \
         find / -name signing.key 2>/dev/null; echo done",
        k = key.display()
    );
    let mut s = sh(&script);
    s.capabilities.push(Capability::FileSystem);
    s.capabilities.push(Capability::Network);
    let f = run(&env, s, b"").await;
    assert!(f.stdout.ends_with("done\n"), "{} {}", f.stdout, f.stderr);
    assert!(!f.stdout.contains(&secret), "the runtime's key leaked");
    assert!(!f.stdout.contains("signing.key"), "the key file is visible");
    assert!(
        !f.stdout.contains(&shadow_line),
        "the host's /etc/shadow leaked"
    );
}

pub async fn capabilities_dropped_and_non_root(tier: &'static Tier) {
    let env = env(tier).await;
    let f = run(
        &env,
        sh("id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status"),
        b"",
    )
    .await;
    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], "65534");
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(cap))
            .unwrap_or_else(|| panic!("{cap} missing: {}", f.stdout));
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    if tier.shows_no_new_privs {
        assert!(f.stdout.contains("NoNewPrivs:\t1"), "{}", f.stdout);
    }
}

pub async fn timeout_kills_and_removes_the_container(tier: &'static Tier) {
    let env = env(tier).await;
    let mut s = spec(&["/bin/sleep", "60"]);
    s.timeout = Some(Duration::from_secs(2));
    let sandbox = env.backend.create(s).await.expect("create");
    let _io = sandbox.start().await.expect("start");
    let t = Instant::now();
    let exit = sandbox.wait().await.expect("wait");
    assert_eq!(exit.reason, ExitReason::Timeout);
    assert!(exit.is_resource_violation());
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(
        !container_exists(sandbox.id()).await,
        "container must be gone after a timeout"
    );
    // A second waiter gets the same answer.
    assert_eq!(sandbox.wait().await.expect("wait again"), exit);
    destroy_and_check(&sandbox).await;
}

pub async fn kill_and_destroy_leave_nothing(tier: &'static Tier) {
    let env = env(tier).await;
    let sandbox = env
        .backend
        .create(spec(&["/bin/sleep", "60"]))
        .await
        .expect("create");
    let dir = workspace_dir(&env, &sandbox);
    assert!(dir.exists(), "workspace prepared at {}", dir.display());
    let _io = sandbox.start().await.expect("start");
    let waiter = {
        let sb = Arc::clone(&sandbox);
        tokio::spawn(async move { sb.wait().await })
    };
    sandbox.kill().await.expect("kill");
    let exit = waiter.await.expect("join").expect("wait");
    assert_eq!(exit.reason, ExitReason::Killed);
    assert!(
        !container_exists(sandbox.id()).await,
        "killed container removed"
    );
    destroy_and_check(&sandbox).await;
    assert!(!dir.exists(), "workspace removed");

    // Destroying a created-but-never-started sandbox leaves nothing either.
    let idle = env
        .backend
        .create(spec(&["/bin/true"]))
        .await
        .expect("create");
    assert!(container_exists(idle.id()).await);
    destroy_and_check(&idle).await;
    assert!(
        idle.start().await.is_err(),
        "a destroyed sandbox cannot start"
    );
}

pub async fn pause_and_resume(tier: &'static Tier) {
    let env = env(tier).await;
    let mut s = sh("while :; do :; done");
    s.limits.cpu_cores = 1.0;
    let sandbox = env.backend.create(s).await.expect("create");
    let _io = sandbox.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(500)).await;
    sandbox.pause().await.expect("pause");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a, ta) = (sandbox.stats().await.expect("stats"), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b, tb) = (sandbox.stats().await.expect("stats"), Instant::now());
    let paused = cpu_rate(&a, ta, &b, tb);
    assert!(paused < 0.01, "paused sandbox used {paused:.3} cores");
    sandbox.resume().await.expect("resume");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, tc) = (sandbox.stats().await.expect("stats"), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (d, td) = (sandbox.stats().await.expect("stats"), Instant::now());
    let resumed = cpu_rate(&c, tc, &d, td);
    assert!(
        resumed > 0.02 && resumed > paused + 0.015,
        "resumed sandbox used only {resumed:.3} cores (paused: {paused:.3})"
    );
    destroy_and_check(&sandbox).await;
}

pub async fn exec_runs_inside(tier: &'static Tier) {
    let env = env(tier).await;
    let mut s = spec(&["/bin/sleep", "60"]);
    s.files.push(SandboxFile {
        path: "note.txt".into(),
        contents: b"from the workspace\n".to_vec(),
        mode: 0o644,
    });
    let sandbox = env.backend.create(s).await.expect("create");
    let _io = sandbox.start().await.expect("start");
    let argv: Vec<String> = [
        "/bin/sh",
        "-c",
        "cat note.txt; id -u; echo oops >&2; exit 3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = sandbox
        .exec(&argv, Duration::from_secs(20))
        .await
        .expect("exec");
    assert_eq!(out.code, 3);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from the workspace\n65534\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    let slow: Vec<String> = ["/bin/sleep", "30"].iter().map(|s| s.to_string()).collect();
    let err = sandbox
        .exec(&slow, Duration::from_millis(500))
        .await
        .expect_err("exec timeout");
    assert_eq!(err.code(), "SANDBOX_004", "{err}");
    destroy_and_check(&sandbox).await;
}

/// Direct-I/O writes with `disk_io_mbps = 10` stay within 10 MB/s + 20% (measured from the
/// tier's blkio counters and the wall clock), or the tier refuses the limit (RESOURCE_002).
pub async fn disk_write_rate_is_limited(tier: &'static Tier) {
    let env = env(tier).await;
    let mut s = sh("dd if=/dev/zero of=/workspace/blob bs=1M count=60 oflag=direct; echo rc=$?");
    s.limits.disk_io_mbps = 10;
    if !tier.disk_io {
        assert!(!env.backend.enforcement().disk_io);
        let err = env.backend.create(s).await.err().expect("must refuse");
        assert_eq!(err.code(), "RESOURCE_002", "{err}");
        assert!(err.to_string().contains("disk_io_mbps"), "{err}");
        return;
    }
    assert!(env.backend.enforcement().disk_io);
    let sandbox = env.backend.create(s).await.expect("create");
    let mut io = sandbox.start().await.expect("start");
    let started = Instant::now();
    // Sample the tier's counters every 500 ms until the program exits. A stats call can
    // take a while on a loaded host (and a sample taken after the exit repeats the last
    // value), so each sample is timed at the middle of its call and the rate is taken
    // between the first sample that saw writes and the first that saw all of them.
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let exit = {
        let wait = sandbox.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                exit = &mut wait => break exit.expect("wait"),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let t0 = Instant::now();
                    if let Ok(st) = sandbox.stats().await {
                        let mid = t0 + (Instant::now() - t0) / 2;
                        samples.push((mid, st.disk_write_bytes));
                    }
                }
            }
        }
    };
    let overall = 60.0 * 1024.0 * 1024.0 / started.elapsed().as_secs_f64();
    let mut out = String::new();
    io.stdout.read_to_string(&mut out).await.expect("stdout");
    let first = samples.iter().find(|(_, v)| *v > 0).copied();
    let top = samples.iter().map(|(_, v)| *v).max().unwrap_or(0);
    let last = samples.iter().find(|(_, v)| *v == top).copied();
    let sampled = match (first, last) {
        (Some((ta, a)), Some((tb, b))) if tb > ta => (b - a) as f64 / (tb - ta).as_secs_f64(),
        _ => panic!("fewer than two distinct samples of the write counter: {samples:?}"),
    };
    assert!(exit.success() && out.contains("rc=0"), "{exit:?} {out}");
    let limit = 10e6 * 1.2;
    println!(
        "{}: disk_io_mbps = 10: sampled {:.2} MB/s, overall {:.2} MB/s",
        tier.name,
        sampled / 1e6,
        overall / 1e6
    );
    assert!(sampled > 2e6, "writes barely progressed: {sampled:.0} B/s");
    assert!(
        sampled <= limit,
        "sampled {:.2} MB/s > 12 MB/s",
        sampled / 1e6
    );
    assert!(
        overall <= limit,
        "overall {:.2} MB/s > 12 MB/s",
        overall / 1e6
    );
    destroy_and_check(&sandbox).await;
}

/// With `network_io_mbps = 8` both directions stay within 8 Mb/s + 20%.
pub async fn network_rate_is_limited(tier: &'static Tier) {
    let env = env(tier).await;
    let limit_bps = 8e6 * 1.2;

    // Host -> sandbox: the host sends 3 MB; the sandbox counts them.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    const DOWN: usize = 3_000_000;
    let sender = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let accepted = Instant::now();
        conn.write_all(&vec![b'x'; DOWN]).await.expect("send");
        conn.shutdown().await.expect("shutdown");
        accepted
    });
    let mut down = sh(&format!(
        "nc -w 30 \"$SYMBIONT_HOST_ADDR\" {port} </dev/null | wc -c"
    ));
    down.capabilities.push(Capability::Network);
    down.limits.network_io_mbps = 8;
    let sandbox = env.backend.create(down).await.expect("create");
    let mut io = sandbox.start().await.expect("start");
    let mut out = String::new();
    io.stdout.read_to_string(&mut out).await.expect("stdout");
    let done = Instant::now();
    let accepted = sender.await.expect("sender");
    sandbox.wait().await.expect("wait");
    assert_eq!(out.trim(), DOWN.to_string(), "all bytes arrive");
    let rate = DOWN as f64 * 8.0 / (done - accepted).as_secs_f64();
    println!(
        "{}: network_io_mbps = 8: download {:.2} Mb/s",
        tier.name,
        rate / 1e6
    );
    assert!(rate <= limit_bps, "download {:.2} Mb/s > 9.6", rate / 1e6);
    assert!(rate > 2e6, "download only {:.2} Mb/s", rate / 1e6);
    destroy_and_check(&sandbox).await;

    // Sandbox -> host: the sandbox sends; the host measures first to last byte.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let receiver = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 65536];
        let mut total = 0usize;
        let mut first = None;
        let mut last = Instant::now();
        loop {
            // An idle connection for 15 s counts as ended (never hang the suite).
            let n = match tokio::time::timeout(Duration::from_secs(15), conn.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => 0,
            };
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n;
            last = Instant::now();
        }
        (total, first.map(|f| last - f).unwrap_or_default())
    });
    let mut up = sh(&format!(
        "dd if=/dev/zero bs=64k count=48 2>/dev/null | nc -w 30 \"$SYMBIONT_HOST_ADDR\" {port}; echo rc=$?"
    ));
    up.capabilities.push(Capability::Network);
    up.limits.network_io_mbps = 8;
    let f = run(&env, up, b"").await;
    let (total, span) = receiver.await.expect("receiver");
    println!(
        "{}: network_io_mbps = 8: upload {total} bytes in {span:?} = {:.2} Mb/s (stderr: {})",
        tier.name,
        total as f64 * 8.0 / span.as_secs_f64().max(1e-3) / 1e6,
        f.stderr.trim()
    );
    assert_eq!(total, 48 * 65536, "{} {}", f.stdout, f.stderr);
    assert!(f.stdout.contains("rc=0"), "{} {}", f.stdout, f.stderr);
    let rate = total as f64 * 8.0 / span.as_secs_f64();
    assert!(rate <= limit_bps, "upload {:.2} Mb/s > 9.6", rate / 1e6);
    assert!(rate > 2e6, "upload only {:.2} Mb/s", rate / 1e6);
}

/// `update_limits` reaches the kernel: after lowering memory to 48 MiB, allocating 200 MB
/// inside is OOM-killed (an exec'd `dd` dies with SIGKILL, or — gVisor, where every guest
/// process lives in the one Sentry — the whole sandbox ends with `OutOfMemory`).
pub async fn update_limits_reach_the_kernel(tier: &'static Tier) {
    let env = env(tier).await;
    let argv: Vec<String> = [
        "/bin/dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=200M",
        "count=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Control: 200 MB fits under the spec's 256 MiB.
    let control = run(
        &env,
        spec(&argv.iter().map(String::as_str).collect::<Vec<_>>()),
        b"",
    )
    .await;
    assert!(
        control.exit.success(),
        "200 MB fits in 256 MiB: {:?}",
        control.exit
    );
    let sandbox = env
        .backend
        .create(spec(&["/bin/sleep", "60"]))
        .await
        .expect("create");
    let _io = sandbox.start().await.expect("start");
    let lower = ResourceLimits {
        memory_mb: 48,
        cpu_cores: 0.5,
        disk_io_mbps: 0,
        network_io_mbps: 0,
        ..Default::default()
    };
    // Lowered before anything big ran (lowering below what a sandbox already uses fails with
    // EBUSY from the kernel; gVisor's Sentry keeps memory it once used).
    sandbox.update_limits(&lower).await.expect("update limits");
    let after = sandbox.exec(&argv, Duration::from_secs(10)).await;
    match after {
        Ok(out) if out.code == 137 => {}
        other => {
            let exit = tokio::time::timeout(Duration::from_secs(10), sandbox.wait())
                .await
                .unwrap_or_else(|_| panic!("no OOM after lowering memory: {other:?}"))
                .expect("wait");
            assert_eq!(exit.reason, ExitReason::OutOfMemory, "{other:?} {exit:?}");
        }
    }
    if !tier.disk_io {
        let refused = ResourceLimits {
            disk_io_mbps: 5,
            ..lower
        };
        let err = sandbox
            .update_limits(&refused)
            .await
            .expect_err("refuse disk");
        assert_eq!(err.code(), "RESOURCE_002", "{err}");
    }
    destroy_and_check(&sandbox).await;
}

/// `stop` sends SIGTERM first (a program that handles it exits cleanly) and SIGKILL after the
/// grace period (a program that ignores it is killed); both are reported as `Killed` and the
/// container is removed.
pub async fn stop_terms_then_kills(tier: &'static Tier) {
    let env = env(tier).await;
    let polite = env
        .backend
        .create(sh(
            "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
        ))
        .await
        .expect("create");
    let mut io = polite.start().await.expect("start");
    let mut ready = [0u8; 6];
    io.stdout.read_exact(&mut ready).await.expect("ready");
    let exit = polite.stop(Duration::from_secs(10)).await.expect("stop");
    let mut rest = String::new();
    io.stdout.read_to_string(&mut rest).await.expect("rest");
    assert_eq!(exit.reason, ExitReason::Killed);
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(rest.contains("got-term"), "{rest}");
    assert!(!container_exists(polite.id()).await);
    destroy_and_check(&polite).await;

    let stubborn = env
        .backend
        .create(sh("trap '' TERM; echo ready; while :; do sleep 0.1; done"))
        .await
        .expect("create");
    let mut io = stubborn.start().await.expect("start");
    io.stdout.read_exact(&mut ready).await.expect("ready");
    let t = Instant::now();
    let exit = stubborn.stop(Duration::from_secs(1)).await.expect("stop");
    assert_eq!(exit.reason, ExitReason::Killed);
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "grace period honoured"
    );
    destroy_and_check(&stubborn).await;
}
