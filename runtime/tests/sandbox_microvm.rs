//! Tier3 microVM sandbox, for real: QEMU `microvm`, Debian's cloud kernel, our guest init.
//!
//! Needs `bash scripts/setup.sh` (QEMU, the guest kernel, the static guest init). Missing
//! pieces make the tests FAIL with the command to run, never skip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use symbiont_runtime::sandbox::microvm::{MicrovmBackend, MicrovmConfig};
use symbiont_runtime::sandbox::{
    ExitReason, Sandbox, SandboxBackend, SandboxConfig, SandboxFile, SandboxSpec, SandboxStdio,
};
use symbiont_runtime::{AgentId, Capability};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Env {
    backend: Arc<MicrovmBackend>,
    _state: tempfile::TempDir,
}

fn env() -> Env {
    env_with(MicrovmConfig::default())
}

fn logging() {
    symbiont_runtime::init_logging(
        "symbiont_runtime=info",
        symbiont_runtime::config::LogFormat::Text,
    );
}

fn env_with(microvm: MicrovmConfig) -> Env {
    logging();
    let state = tempfile::Builder::new()
        .prefix("symbiont-mvm-test")
        .tempdir()
        .expect("tempdir");
    let cfg = SandboxConfig {
        state_dir: state.path().to_path_buf(),
        microvm,
        ..Default::default()
    };
    Env {
        backend: Arc::new(MicrovmBackend::new(&cfg)),
        _state: state,
    }
}

/// The value, or a failure saying the tier is missing and how to install it.
fn available<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("microVM tier unavailable: {e}; run `bash scripts/setup.sh`"))
}

fn spec(argv: &[&str]) -> SandboxSpec {
    let mut s = SandboxSpec::new(AgentId::new(), argv.iter().copied());
    s.limits.memory_mb = 128;
    s.limits.network_io_mbps = 0;
    s
}

async fn create(env: &Env, spec: SandboxSpec) -> Arc<dyn Sandbox> {
    match env.backend.create(spec).await {
        Ok(s) => s,
        Err(e) => panic!(
            "microVM tier unavailable ({}): {e}\nrun `bash scripts/setup.sh` to install it",
            e.code()
        ),
    }
}

/// `wait()` with a watchdog, so a bug fails the test instead of hanging the suite.
async fn wait_exit(sb: &Arc<dyn Sandbox>) -> symbiont_runtime::sandbox::SandboxExit {
    tokio::time::timeout(Duration::from_secs(300), sb.wait())
        .await
        .expect("wait() returned within 300s")
        .expect("wait")
}

async fn read_all(mut r: symbiont_runtime::sandbox::BoxedReader) -> String {
    let mut s = String::new();
    r.read_to_string(&mut s).await.expect("read");
    s
}

/// Runs a spec to completion and returns (stdout, stderr, exit).
async fn run(
    env: &Env,
    spec: SandboxSpec,
) -> (String, String, symbiont_runtime::sandbox::SandboxExit) {
    let sb = create(env, spec).await;
    let SandboxStdio {
        stdin,
        stdout,
        stderr,
    } = sb.start().await.expect("start");
    drop(stdin);
    let (out, err) = tokio::join!(read_all(stdout), read_all(stderr));
    let exit = wait_exit(&sb).await;
    sb.destroy().await.expect("destroy");
    (out, err, exit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn program_output_and_exit_code_come_back() {
    let env = env();
    let (out, err, exit) = run(
        &env,
        spec(&["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"]),
    )
    .await;
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert_eq!(exit.reason, ExitReason::Exited);
    assert_eq!(exit.code, Some(3));
}

fn vmm_processes(id: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-af", id])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("qemu") || l.contains("firecracker"))
        .map(str::to_string)
        .collect()
}

fn assert_no_vmm(id: &str) {
    let left = vmm_processes(id);
    assert!(
        left.is_empty(),
        "VMM processes left behind for {id}: {left:?}"
    );
    for d in [
        "/sys/fs/cgroup/cpu/symbiont",
        "/sys/fs/cgroup/memory/symbiont",
        "/sys/fs/cgroup/symbiont",
    ] {
        let cg = std::path::Path::new(d).join(format!("microvm-{id}"));
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_reaches_the_program() {
    let env = env();
    let sb = create(
        &env,
        spec(&[
            "/bin/sh",
            "-c",
            "read a; read b; echo \"got:$a+$b\"; cat | wc -c",
        ]),
    )
    .await;
    let SandboxStdio {
        mut stdin,
        stdout,
        stderr,
    } = sb.start().await.expect("start");
    stdin.write_all(b"one\ntwo\n").await.expect("write");
    stdin
        .write_all(&vec![b'x'; 100_000])
        .await
        .expect("write bulk");
    stdin.shutdown().await.expect("close stdin");
    drop(stdin);
    let (out, _err) = tokio::join!(read_all(stdout), read_all(stderr));
    let exit = wait_exit(&sb).await;
    sb.destroy().await.expect("destroy");
    assert_eq!(out, "got:one+two\n100000\n");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_files_are_placed_and_the_program_is_unprivileged() {
    let env = env();
    let mut s = spec(&["/bin/sh", "-c", "cat data/input.txt; ./run.sh; pwd; id -u; touch /workspace/new && echo writable; touch /etc/x 2>/dev/null || echo ro-etc"]);
    s.files.push(SandboxFile {
        path: "data/input.txt".into(),
        contents: b"file contents\n".to_vec(),
        mode: 0o644,
    });
    s.files.push(SandboxFile {
        path: "run.sh".into(),
        contents: b"#!/bin/sh\necho script ran\n".to_vec(),
        mode: 0o755,
    });
    let (out, err, exit) = run(&env, s).await;
    assert!(exit.success(), "{exit:?} {err}");
    assert_eq!(
        out,
        "file contents\nscript ran\n/workspace\n1000\nwritable\nro-etc\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocating_past_the_vm_memory_is_an_oom_kill() {
    let env = env();
    // The shell keeps the whole command output in memory: it grows until the guest's memory
    // cgroup (64 MiB) is full and the guest kernel's OOM killer ends the agent.
    let mut s = spec(&[
        "/bin/sh",
        "-c",
        "echo start; x=$(yes $(printf %01000d 0) | head -c 200000000); echo survived ${#x}",
    ]);
    s.limits.memory_mb = 64;
    let sb = create(&env, s).await;
    let id = sb.id().to_string();
    let SandboxStdio {
        stdin,
        stdout,
        stderr,
    } = sb.start().await.expect("start");
    drop(stdin);
    let (out, _err) = tokio::join!(read_all(stdout), read_all(stderr));
    let exit = wait_exit(&sb).await;
    assert_eq!(exit.reason, ExitReason::OutOfMemory, "{exit:?} out={out}");
    assert!(exit.is_resource_violation());
    assert!(!out.contains("survived"));
    assert_no_vmm(&id);
    sb.destroy().await.expect("destroy");
    // The host is unaffected: another VM runs normally right after.
    let (out, _, exit) = run(&env, spec(&["/bin/sh", "-c", "echo fine"])).await;
    assert!(exit.success());
    assert_eq!(out, "fine\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_network_the_guest_has_only_lo() {
    let env = env();
    let (out, _, exit) = run(&env, spec(&["/bin/sh", "-c", "ls /sys/class/net; echo ADDR=${SYMBIONT_HOST_ADDR:-none}; nc -w 2 10.0.2.2 22 </dev/null && echo connected || echo unreachable"])).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(out, "lo\nADDR=none\nunreachable\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_network_the_guest_reaches_a_host_loopback_server() {
    let env = env();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 5];
        conn.read_exact(&mut buf).await.expect("read");
        conn.write_all(b"pong from host\n").await.expect("write");
        buf
    });
    let mut s = spec(&["/bin/sh", "-c", &format!("ls /sys/class/net | tr '\\n' ' '; echo; (echo ping; sleep 3) | nc $SYMBIONT_HOST_ADDR {port}")]);
    s.capabilities.push(Capability::Network);
    let (out, err, exit) = run(&env, s).await;
    assert!(exit.success(), "{exit:?} {err}");
    assert_eq!(out, "eth0 lo \npong from host\n");
    assert_eq!(server.await.expect("server"), b"ping\n");
}

/// The guest kernel's CRNG is seeded at boot, before anything waits for it: the input pool
/// holds its full 256 credited bits (`entropy_avail`, Linux >= 5.18) when the program starts.
/// Under TCG the entropy comes from the CPU's RDRAND, under KVM from a virtio-rng device.
/// Without either the pool starts near 0, and programs that poll /dev/random for readiness
/// (static Rust agents did) blocked forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_crng_is_seeded_at_boot() {
    let env = env();
    let (out, err, exit) = run(
        &env,
        spec(&["/bin/sh", "-c", "cat /proc/sys/kernel/random/entropy_avail"]),
    )
    .await;
    assert!(exit.success(), "{exit:?} {err}");
    assert_eq!(
        out, "256\n",
        "credited entropy bits when the program started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_are_not_reachable_from_the_guest() {
    let env = env();
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "TOP-SECRET-symbiont-4711").expect("write secret");
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let root_hash_marker = shadow.lines().next().unwrap_or("root:").to_string();
    let script = format!(
        "cat /etc/shadow 2>&1; cat {} 2>&1; grep -rs TOP-SECRET /etc /root /tmp /workspace /run | head -1; ls /; exit 0",
        secret.display()
    );
    let (out, _, exit) = run(&env, spec(&["/bin/sh", "-c", &script])).await;
    assert!(exit.success());
    assert!(!out.contains("TOP-SECRET"), "{out}");
    assert!(!out.contains(&root_hash_marker), "{out}");
    assert!(out.contains("No such file"), "{out}");
    assert!(!out.contains("work\n"), "host root visible: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_vm_and_leaves_no_qemu() {
    let env = env();
    let mut s = spec(&["/bin/sh", "-c", "echo begin; sleep 600"]);
    s.timeout = Some(Duration::from_secs(2));
    let sb = create(&env, s).await;
    let id = sb.id().to_string();
    let SandboxStdio {
        stdin,
        stdout,
        stderr,
    } = sb.start().await.expect("start");
    assert!(!vmm_processes(&id).is_empty(), "the VM runs under QEMU");
    let t = Instant::now();
    drop(stdin);
    let (out, _) = tokio::join!(read_all(stdout), read_all(stderr));
    let exit = wait_exit(&sb).await;
    assert_eq!(out, "begin\n");
    assert_eq!(exit.reason, ExitReason::Timeout);
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_no_vmm(&id);
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_stop_and_destroy_leave_no_qemu() {
    let env = env();
    // kill
    let sb = create(&env, spec(&["/bin/sleep", "600"])).await;
    let id = sb.id().to_string();
    let _io = sb.start().await.expect("start");
    sb.kill().await.expect("kill");
    assert_no_vmm(&id);
    assert_eq!(wait_exit(&sb).await.reason, ExitReason::Killed);
    sb.destroy().await.expect("destroy");
    // stop: SIGTERM reaches the program, which ends within the grace period
    let sb = create(
        &env,
        spec(&[
            "/bin/sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 1; done",
        ]),
    )
    .await;
    let id = sb.id().to_string();
    let SandboxStdio { stdout, .. } = sb.start().await.expect("start");
    let mut stdout = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line)
        .await
        .expect("ready");
    assert_eq!(line, "ready\n");
    let exit = sb.stop(Duration::from_secs(20)).await.expect("stop");
    assert_eq!(exit.reason, ExitReason::Killed);
    assert_eq!(exit.code, Some(7), "the program handled SIGTERM: {exit:?}");
    assert_no_vmm(&id);
    sb.destroy().await.expect("destroy");
    // destroy while running
    let sb = create(&env, spec(&["/bin/sleep", "600"])).await;
    let id = sb.id().to_string();
    let _io = sb.start().await.expect("start");
    sb.destroy().await.expect("destroy");
    assert_no_vmm(&id);
    sb.destroy().await.expect("destroy is idempotent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_cache_is_reused_on_the_second_start() {
    let env = env();
    let mut s = spec(&["/bin/sh", "-c", "cat hello.txt"]);
    s.files.push(SandboxFile {
        path: "hello.txt".into(),
        contents: b"cached\n".to_vec(),
        mode: 0o644,
    });
    let before = env.backend.cache_stats();
    let (out, _, _) = run(&env, s.clone()).await;
    assert_eq!(out, "cached\n");
    let after_first = env.backend.cache_stats();
    assert_eq!(
        after_first.misses,
        before.misses + 1,
        "first start builds the image"
    );
    let (out, _, _) = run(&env, s).await;
    assert_eq!(out, "cached\n");
    let after_second = env.backend.cache_stats();
    assert_eq!(
        after_second.hits,
        after_first.hits + 1,
        "second start reuses it"
    );
    assert_eq!(after_second.misses, after_first.misses, "nothing rebuilt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_baseline_boots_the_agents_own_image_bare() {
    use symbiont_runtime::sandbox::microvm::kvm;
    let env = env();
    let s = spec(&["/bin/sh", "-c", "echo ready"]);
    let image = available(env.backend.image_for(&s).await);
    assert!(image.is_file(), "{}", image.display());
    // The image is the one the agent boots: creating the sandbox builds nothing new.
    let before = env.backend.cache_stats();
    let sb = create(&env, s).await;
    let after = env.backend.cache_stats();
    assert_eq!(after.misses, before.misses, "create reuses the image");
    assert_eq!(after.hits, before.hits + 1);
    sb.destroy().await.expect("destroy");
    // Bare boot of the same kernel and initramfs, busybox instead of the guest init and no
    // devices: it prints its line and powers off.
    let accel = env.backend.accel().await.expect("accel");
    let kernel = env.backend.kernel_image().await.expect("kernel");
    let qemu = kvm::which(std::path::Path::new("qemu-system-x86_64")).expect("qemu");
    let boot = kvm::bare_boot(
        &qemu,
        &kernel,
        &image,
        kvm::BareInit::Busybox,
        accel,
        192,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("bare boot of the agent image: {e}"));
    assert!(boot.first_line <= boot.total, "{boot:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_boot_runs_the_extracted_vmlinux_and_the_packaged_image_still_boots() {
    use symbiont_runtime::sandbox::microvm::vmlinux;
    let env = env();
    let booted = available(env.backend.kernel_image().await);
    let packaged = available(env.backend.packaged_kernel_image().await);
    assert_ne!(booted, packaged, "the default boots the extracted ELF");
    let elf = std::fs::read(&booted).expect("read vmlinux");
    assert!(
        vmlinux::has_pvh_note(&elf),
        "{} has a PVH note",
        booted.display()
    );
    let (out, _, exit) = run(&env, spec(&["/bin/sh", "-c", "echo direct"])).await;
    assert_eq!((out.as_str(), exit.code), ("direct\n", Some(0)));

    let firmware = env_with(MicrovmConfig {
        direct_boot: false,
        ..Default::default()
    });
    assert_eq!(
        firmware.backend.kernel_image().await.expect("kernel"),
        packaged,
        "direct_boot = false boots the packaged image"
    );
    let (out, _, exit) = run(&firmware, spec(&["/bin/sh", "-c", "echo packaged"])).await;
    assert_eq!((out.as_str(), exit.code), ("packaged\n", Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_probe_decides_the_accelerator_and_warns_on_fallback() {
    use symbiont_runtime::sandbox::microvm::{kvm, Accel};
    let env = env();
    let info = available(env.backend.probe().await);
    let accel = env.backend.accel().await.expect("accel");
    // Check KVM independently: boot the minimal guest under -accel kvm ourselves.
    let kernel = env.backend.kernel_image().await.expect("kernel");
    let initrd = env.backend.minimal_initramfs().expect("initramfs");
    let qemu = kvm::which(std::path::Path::new("qemu-system-x86_64")).expect("qemu");
    let kvm_works = matches!(
        kvm::probe_kvm(&qemu, &kernel, &initrd, Duration::from_secs(5)).await,
        kvm::KvmProbe::Works
    );
    if kvm_works {
        assert_eq!(accel, Accel::Kvm);
        assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    } else {
        assert_eq!(
            accel,
            Accel::Tcg,
            "KVM does not run guests here: TCG fallback"
        );
        assert!(
            info.warnings
                .iter()
                .any(|w| w.contains("KVM unusable") && w.contains("TCG")),
            "the fallback is visible in TierInfo.warnings: {:?}",
            info.warnings
        );
        assert!(info.details.contains("accel tcg"), "{}", info.details);
    }
    assert_no_vmm("symbiont-bare-boot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stats_pause_and_resume_act_on_the_running_vm() {
    let env = env();
    let mut s = spec(&["/bin/sh", "-c", "echo up; sleep 600"]);
    s.limits.cpu_cores = 1.0;
    let sb = create(&env, s).await;
    let id = sb.id().to_string();
    let _io = sb.start().await.expect("start");
    let out = sb
        .exec(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "echo exec-ok; id -u; echo err >&2; exit 4".into(),
            ],
            Duration::from_secs(20),
        )
        .await
        .expect("exec");
    assert_eq!(out.code, 4);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-ok\n1000\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let stats = sb.stats().await.expect("stats");
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert!(stats.cpu_usage_ns > 0, "{stats:?}");
    assert!(
        stats.pids >= 1,
        "the program is in the agent cgroup: {stats:?}"
    );
    assert!(
        stats.disk_write_bytes > 0 || stats.disk_read_bytes > 0,
        "workspace disk counters from QMP: {stats:?}"
    );
    sb.pause().await.expect("pause");
    let cpu_paused_a = sb.stats().await.expect("stats").cpu_usage_ns;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu_paused_b = sb.stats().await.expect("stats").cpu_usage_ns;
    assert!(
        cpu_paused_b - cpu_paused_a < 300_000_000,
        "a paused VM burns (almost) no CPU: {} ms",
        (cpu_paused_b - cpu_paused_a) / 1_000_000
    );
    sb.resume().await.expect("resume");
    let out = sb
        .exec(
            &["/bin/echo".into(), "after-resume".into()],
            Duration::from_secs(20),
        )
        .await
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after-resume\n");
    sb.destroy().await.expect("destroy");
    assert_no_vmm(&id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_guest_init_is_a_clear_sandbox_001() {
    let env = env_with(MicrovmConfig {
        guest_init: "/nonexistent/symbiont-guest".into(),
        accel: symbiont_runtime::sandbox::microvm::AccelMode::Tcg,
        ..Default::default()
    });
    let Err(err) = env.backend.create(spec(&["/bin/true"])).await else {
        panic!("create must fail without the guest init");
    };
    assert_eq!(err.code(), "SANDBOX_001");
    let msg = err.to_string();
    assert!(
        msg.contains("cargo build -p symbiont-guest") && msg.contains("crt-static"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_fails_start_with_the_reason() {
    let env = env();
    let sb = create(&env, spec(&["/no/such/program"])).await;
    let id = sb.id().to_string();
    let err = sb.start().await.expect_err("cannot start");
    assert_eq!(err.code(), "SANDBOX_004");
    assert!(err.to_string().contains("/no/such/program"), "{err}");
    assert_no_vmm(&id);
    sb.destroy().await.expect("destroy");
}

/// Starts a long-running program and returns the sandbox (for measurements via exec/stats).
async fn idle_vm(env: &Env, s: SandboxSpec) -> (Arc<dyn Sandbox>, SandboxStdio) {
    let sb = create(env, s).await;
    let io = sb.start().await.expect("start");
    (sb, io)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_disk_writes_stay_within_the_limit() {
    let env = env();
    let mut s = spec(&["/bin/sleep", "600"]);
    s.limits.disk_io_mbps = 4;
    let (sb, _io) = idle_vm(&env, s).await;
    let bytes = 16u64 << 20;
    let t = Instant::now();
    let out = sb
        .exec(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "dd if=/dev/zero of=/workspace/blob bs=1048576 count=16 oflag=direct 2>&1".into(),
            ],
            Duration::from_secs(120),
        )
        .await
        .expect("exec dd");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.code, 0, "{}", String::from_utf8_lossy(&out.stdout));
    let rate = bytes as f64 / secs / 1e6;
    eprintln!(
        "disk: {bytes} bytes in {secs:.2}s = {rate:.2} MB/s (limit 4): {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        rate <= 4.0 * 1.2,
        "direct writes at {rate:.2} MB/s exceed 4 MB/s + 20%"
    );
    assert!(
        rate >= 4.0 * 0.4,
        "writes at {rate:.2} MB/s: far below the limit, the measurement says nothing"
    );
    let stats = sb.stats().await.expect("stats");
    assert!(
        stats.disk_write_bytes >= bytes,
        "QMP block stats count the writes: {stats:?}"
    );
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_throughput_stays_within_the_limit_both_ways() {
    let env = env();
    // 2 Mb/s: well below what a TCG guest reaches unlimited (~5 Mb/s up, ~17 Mb/s down
    // here), so an unenforced limit would show.
    let bytes = 1_500_000usize;
    // Upload: the guest sends to a host loopback server, which times the transfer.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up_port = up.local_addr().expect("addr").port();
    let upload = tokio::spawn(async move {
        let (mut conn, _) = up.accept().await.expect("accept");
        let mut buf = vec![0u8; 65536];
        let mut total = 0usize;
        let mut first: Option<Instant> = None;
        loop {
            let n = conn.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n;
        }
        (total, first.map(|f| f.elapsed()).unwrap_or_default())
    });
    // Download: the host sends; the guest counts and reports when it has everything.
    let down = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let down_port = down.local_addr().expect("addr").port();
    let mut s = spec(&["/bin/sh", "-c", &format!(
        "head -c {bytes} /dev/zero | nc $SYMBIONT_HOST_ADDR {up_port}; echo uploaded; nc $SYMBIONT_HOST_ADDR {down_port} | wc -c"
    )]);
    s.capabilities.push(Capability::Network);
    s.limits.network_io_mbps = 2;
    let sb = create(&env, s).await;
    let SandboxStdio {
        stdin,
        stdout,
        stderr: _stderr,
    } = sb.start().await.expect("start");
    drop(stdin);
    let (up_total, up_time) = upload.await.expect("upload");
    let up_rate = up_total as f64 * 8.0 / up_time.as_secs_f64() / 1e6;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    assert_eq!(
        lines.next_line().await.expect("read").as_deref(),
        Some("uploaded")
    );
    let (mut conn, _) = down.accept().await.expect("accept");
    let t = Instant::now();
    let payload = vec![7u8; bytes];
    conn.write_all(&payload).await.expect("send");
    drop(conn);
    let received = lines.next_line().await.expect("read").unwrap_or_default();
    let down_time = t.elapsed();
    let down_rate = bytes as f64 * 8.0 / down_time.as_secs_f64() / 1e6;
    eprintln!("net: up {up_total} B in {up_time:?} = {up_rate:.2} Mb/s; down {received} B in {down_time:?} = {down_rate:.2} Mb/s (limit 2)");
    assert_eq!(up_total, bytes);
    assert_eq!(received.trim(), bytes.to_string());
    assert!(
        up_rate <= 2.0 * 1.2,
        "upload at {up_rate:.2} Mb/s exceeds 2 Mb/s + 20%"
    );
    assert!(
        down_rate <= 2.0 * 1.2,
        "download at {down_rate:.2} Mb/s exceeds 2 Mb/s + 20%"
    );
    assert!(
        up_rate >= 2.0 * 0.4 && down_rate >= 2.0 * 0.4,
        "shaping (not dropping) keeps TCP near the rate: up {up_rate:.2}, down {down_rate:.2} Mb/s"
    );
    let exit = wait_exit(&sb).await;
    assert!(exit.success(), "{exit:?}");
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vmm_gets_no_more_cpu_than_its_share() {
    let env = env();
    let mut s = spec(&["/bin/sh", "-c", "while :; do :; done"]);
    s.limits.cpu_cores = 0.5;
    let (sb, _io) = idle_vm(&env, s).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = sb.stats().await.expect("stats").cpu_usage_ns;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = sb.stats().await.expect("stats").cpu_usage_ns;
    let cores = (b - a) as f64 / 1e9 / t.elapsed().as_secs_f64();
    // The quota sits on the VMM's host cgroup (v1 here, v2 elsewhere).
    let v1 =
        std::path::Path::new("/sys/fs/cgroup/cpu/symbiont").join(format!("microvm-{}", sb.id()));
    let v2 = std::path::Path::new("/sys/fs/cgroup/symbiont").join(format!("microvm-{}", sb.id()));
    let (quota, cpu_stat) = if v1.exists() {
        (
            std::fs::read_to_string(v1.join("cpu.cfs_quota_us")).expect("quota"),
            std::fs::read_to_string(v1.join("cpu.stat")).expect("cpu.stat"),
        )
    } else {
        (
            std::fs::read_to_string(v2.join("cpu.max")).expect("cpu.max"),
            std::fs::read_to_string(v2.join("cpu.stat")).expect("cpu.stat"),
        )
    };
    eprintln!(
        "cpu: the VMM used {cores:.2} cores (limit 0.5); quota {}; {}",
        quota.trim(),
        cpu_stat.replace('\n', " ")
    );
    assert!(
        quota.trim().starts_with("50000"),
        "quota of 0.5 cores: {quota}"
    );
    assert!(cores <= 0.5 * 1.2, "{cores:.2} cores exceeds 0.5 + 20%");
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_after_the_vm_has_ended_returns_the_exit() {
    // Regression: the exit status was lost when nobody was waiting at the moment it was
    // published, and a later wait() hung.
    let env = env();
    let sb = create(&env, spec(&["/bin/sh", "-c", "exit 5"])).await;
    let SandboxStdio {
        stdin,
        stdout,
        stderr,
    } = sb.start().await.expect("start");
    drop(stdin);
    let _ = tokio::join!(read_all(stdout), read_all(stderr));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = wait_exit(&sb).await;
    let second = wait_exit(&sb).await;
    assert_eq!(first.code, Some(5));
    assert_eq!(first, second, "every caller gets the same exit");
    sb.destroy().await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_dropped_without_destroy_leaves_nothing_behind() {
    let env = env();
    let sb = create(&env, spec(&["/bin/sleep", "600"])).await;
    let id = sb.id().to_string();
    let io = sb.start().await.expect("start");
    assert!(!vmm_processes(&id).is_empty());
    drop(io);
    drop(sb);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let cg = std::path::Path::new("/sys/fs/cgroup/cpu/symbiont").join(format!("microvm-{id}"));
        if vmm_processes(&id).is_empty() && !cg.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_vmm(&id);
    assert!(
        !env._state.path().join("microvm/run").join(&id).exists(),
        "run directory removed"
    );
}
