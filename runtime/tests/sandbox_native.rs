//! Real tests of the native sandbox tier, driven only through `SandboxSpec` and the
//! `Sandbox` trait. They need root, cgroups, user namespaces, seccomp, Landlock, `tc` and
//! `iptables` (run `bash scripts/setup.sh`); anything missing fails the test with a message.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use symbiont_runtime::sandbox::native::{cgroup, NativeBackend};
use symbiont_runtime::sandbox::{
    ExitReason, Sandbox, SandboxBackend, SandboxConfig, SandboxFile, SandboxSpec,
};
use symbiont_runtime::{AgentId, Capability, ResourceLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SETUP_HINT: &str = "the native tier needs root, cgroups, user namespaces, seccomp and \
                          Landlock; run the tests as root after `bash scripts/setup.sh`";

struct Env {
    _state: tempfile::TempDir,
    backend: NativeBackend,
}

fn env() -> Env {
    env_with(|_| {})
}

fn env_with(f: impl FnOnce(&mut SandboxConfig)) -> Env {
    let state = tempfile::tempdir().expect("tempdir");
    let mut cfg = SandboxConfig {
        state_dir: state.path().join("sandboxes"),
        pids_limit: 64,
        ..Default::default()
    };
    f(&mut cfg);
    let backend = NativeBackend::new(cfg).unwrap_or_else(|e| panic!("{e}: {SETUP_HINT}"));
    Env {
        _state: state,
        backend,
    }
}

fn spec(argv: &[&str]) -> SandboxSpec {
    let mut s = SandboxSpec::new(AgentId::new(), argv.iter().map(|a| a.to_string()));
    s.limits = ResourceLimits {
        memory_mb: 256,
        cpu_cores: 1.0,
        disk_io_mbps: 0,
        network_io_mbps: 0,
        ..Default::default()
    };
    s.timeout = Some(Duration::from_secs(60));
    s
}

fn sh(script: &str) -> SandboxSpec {
    spec(&["/bin/sh", "-c", script])
}

/// Runs `spec` to completion; returns (exit, stdout, stderr).
async fn run(
    env: &Env,
    spec: SandboxSpec,
) -> (symbiont_runtime::sandbox::SandboxExit, String, String) {
    let sb = env.backend.create_native(spec).await.expect("create");
    let mut io = sb.start().await.expect("start");
    drop(io.stdin);
    let mut out = String::new();
    let mut err = String::new();
    let (a, b) = tokio::join!(
        io.stdout.read_to_string(&mut out),
        io.stderr.read_to_string(&mut err)
    );
    a.expect("stdout");
    b.expect("stderr");
    let exit = sb.wait().await.expect("wait");
    sb.destroy().await.expect("destroy");
    (exit, out, err)
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let layout = cgroup::CgroupLayout::detect(Path::new("/sys/fs/cgroup")).expect("layout");
    cgroup::SandboxCgroup::new(&layout, id).dirs()
}

#[tokio::test]
async fn runs_a_program_and_returns_output_and_exit_code() {
    let env = env();
    let (exit, out, err) = run(&env, sh("echo hello; echo oops >&2; exit 7")).await;
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert_eq!(exit.reason, ExitReason::Exited);
    assert_eq!(exit.code, Some(7));
    let (exit, out, _) = run(&env, spec(&["/bin/echo", "hi"])).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(out, "hi\n");
}

#[tokio::test]
async fn missing_program_fails_start_with_a_clear_error() {
    let env = env();
    let sb = env
        .backend
        .create(spec(&["/no/such/program"]))
        .await
        .expect("create");
    let err = sb.start().await.expect_err("must fail");
    assert!(err.to_string().contains("/no/such/program"), "{err}");
    assert!(err.to_string().contains("No such file"), "{err}");
    // Nothing to wait for, and it says so instead of hanging.
    let err = tokio::time::timeout(Duration::from_secs(5), sb.wait())
        .await
        .expect("wait must not hang")
        .expect_err("no exit");
    assert_eq!(err.code(), "SANDBOX_003");
    sb.destroy().await.expect("destroy");
}

/// Serializes the tests that measure rates or load the machine, so they do not disturb
/// each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn file(path: &str, contents: &[u8], mode: u32) -> SandboxFile {
    SandboxFile {
        path: path.into(),
        contents: contents.to_vec(),
        mode,
    }
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn iptables_mentions(id: &str) -> bool {
    let needle = format!("symbiont:{id}");
    ["filter", "nat"].iter().any(|t| {
        let out = std::process::Command::new("iptables")
            .args(["-w", "-t", t, "-S"])
            .output()
            .expect("iptables (apt-get install iptables)");
        String::from_utf8_lossy(&out.stdout).contains(&needle)
    })
}

/// Asserts that nothing of sandbox `id` is left: processes, cgroups, veth, rules, files.
fn assert_gone(id: &str, reaper: Option<i32>, veth: Option<&str>, root: &Path) {
    if let Some(p) = reaper {
        assert!(!pid_alive(p), "reaper {p} of {id} still alive");
    }
    for d in cgroup_dirs(id) {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    if let Some(v) = veth {
        assert!(
            !Path::new("/sys/class/net").join(v).exists(),
            "veth {v} left behind"
        );
    }
    assert!(!iptables_mentions(id), "iptables rules of {id} left behind");
    assert!(!root.exists(), "state {} left behind", root.display());
}

#[tokio::test]
async fn stdin_reaches_the_program() {
    let env = env();
    let sb = env
        .backend
        .create_native(spec(&["/bin/cat"]))
        .await
        .expect("create");
    let mut io = sb.start().await.expect("start");
    io.stdin
        .write_all(b"ping over stdin\n")
        .await
        .expect("write");
    io.stdin.shutdown().await.expect("close");
    drop(io.stdin);
    let mut out = String::new();
    io.stdout.read_to_string(&mut out).await.expect("read");
    assert_eq!(out, "ping over stdin\n");
    assert!(sb.wait().await.expect("wait").success());
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn files_are_placed_in_the_workspace_with_their_modes() {
    let env = env();
    let mut s = spec(&["/workspace/bin/run.sh"]);
    s.files = vec![
        file("bin/run.sh", b"#!/bin/sh\nstat -c '%a %U %n' /workspace/bin/run.sh /workspace/data.txt\ncat /workspace/data.txt\npwd\n", 0o755),
        file("data.txt", b"payload\n", 0o640),
    ];
    let (exit, out, err) = run(&env, s).await;
    assert!(exit.success(), "{exit:?} {err}");
    assert_eq!(
        out,
        "755 agent /workspace/bin/run.sh\n640 agent /workspace/data.txt\npayload\n/workspace\n"
    );
}

#[tokio::test]
async fn memory_hog_is_reported_as_out_of_memory() {
    let env = env();
    let mut s = spec(&[
        "/usr/bin/python3",
        "-c",
        "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n",
    ]);
    s.limits.memory_mb = 64;
    let (exit, _, err) = run(&env, s).await;
    assert_eq!(exit.reason, ExitReason::OutOfMemory, "{exit:?} {err}");
    assert!(exit.is_resource_violation());
}

#[tokio::test]
async fn fork_bomb_is_contained_and_the_host_stays_responsive() {
    let _heavy = HEAVY.lock().await;
    let env = env(); // pids_limit = 64
                     // `exec`, not a fork: the shell must outlive the bomb even when no pid is left.
    let mut s = sh("bomb() { bomb | bomb & }; bomb; exec sleep 30");
    s.timeout = Some(Duration::from_secs(4));
    let t0 = Instant::now();
    let sb = env.backend.create_native(s).await.expect("create");
    let id = sb.id().to_string();
    let _io = sb.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = sb.stats().await.expect("stats");
    assert!(stats.pids <= 64, "pids {} exceed the limit", stats.pids);
    // The host still forks and runs programs promptly.
    let t = Instant::now();
    let st = std::process::Command::new("/bin/true")
        .status()
        .expect("host fork");
    assert!(st.success());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "host took {:?} to run /bin/true",
        t.elapsed()
    );
    let exit = sb.wait().await.expect("wait");
    assert_eq!(exit.reason, ExitReason::Timeout);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    for d in cgroup_dirs(&id) {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn half_a_core_gets_about_half_a_core() {
    let _heavy = HEAVY.lock().await;
    let env = env();
    // Two busy loops want two cores; the quota allows half of one.
    let mut s = sh("while :; do :; done & while :; do :; done");
    s.limits.cpu_cores = 0.5;
    let sb = env.backend.create_native(s).await.expect("create");
    let _io = sb.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The quota is a ceiling: no window may exceed it. Other work on this shared machine can
    // push a window below half a core, so up to four 2-second windows are sampled and one
    // of them must land near 0.5.
    let mut ratios = Vec::new();
    for _ in 0..4 {
        let c0 = sb.stats().await.expect("stats").cpu_usage_ns;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c1 = sb.stats().await.expect("stats").cpu_usage_ns;
        let ratio = (c1 - c0) as f64 / t0.elapsed().as_nanos() as f64;
        ratios.push(ratio);
        if (0.35..=0.65).contains(&ratio) {
            break;
        }
    }
    sb.kill().await.expect("kill");
    assert_eq!(sb.wait().await.expect("wait").reason, ExitReason::Killed);
    sb.destroy().await.expect("destroy");
    eprintln!("cpu_cores = 0.5 measured windows: {ratios:.3?} cores");
    assert!(
        ratios.iter().all(|r| *r <= 0.65),
        "cpu_cores = 0.5 exceeded: {ratios:.3?} cores"
    );
    assert!(
        ratios.iter().any(|r| (0.35..=0.65).contains(r)),
        "cpu_cores = 0.5 never got about half a core: {ratios:.3?}"
    );
}

/// A TCP server on the host's loopback that greets one client.
fn greeter() -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        if let Some(Ok(mut c)) = l.incoming().next() {
            let _ = c.write_all(b"hello-from-host\n");
        }
    });
    (port, h)
}

const CONNECT_PY: &str = r#"
import os, socket, sys
port = int(sys.argv[1])
for t in sys.argv[2:]:
    addr = os.environ.get(t, t)
    try:
        s = socket.create_connection((addr, port), timeout=2)
        print(t, "connected", s.recv(64).decode().strip())
    except Exception as e:
        print(t, "failed", type(e).__name__)
"#;

#[tokio::test]
async fn without_network_the_host_is_unreachable() {
    let env = env();
    let (port, _srv) = greeter();
    let mut s = spec(&[
        "/usr/bin/python3",
        "-c",
        CONNECT_PY,
        &port.to_string(),
        "127.0.0.1",
        "10.213.0.1",
    ]);
    s.env.insert("PYTHONDONTWRITEBYTECODE".into(), "1".into());
    let (exit, out, err) = run(&env, s).await;
    assert!(exit.success(), "{exit:?} {err}");
    assert!(out.contains("127.0.0.1 failed"), "{out}");
    assert!(out.contains("10.213.0.1 failed"), "{out}");
    assert!(!out.contains("connected"), "{out}");
}

#[tokio::test]
async fn with_network_the_host_loopback_is_reachable_via_symbiont_host_addr() {
    let env = env();
    let (port, srv) = greeter();
    let mut s = spec(&[
        "/usr/bin/python3",
        "-c",
        CONNECT_PY,
        &port.to_string(),
        "SYMBIONT_HOST_ADDR",
    ]);
    s.capabilities.push(Capability::Network);
    let sb = env.backend.create_native(s).await.expect("create");
    let mut io = sb.start().await.expect("start");
    let veth = sb.host_interface().await.expect("veth while running");
    assert!(Path::new("/sys/class/net").join(&veth).exists());
    let mut out = String::new();
    io.stdout.read_to_string(&mut out).await.expect("read");
    let exit = sb.wait().await.expect("wait");
    assert!(exit.success(), "{exit:?}");
    assert_eq!(out, "SYMBIONT_HOST_ADDR connected hello-from-host\n");
    srv.join().expect("server");
    let id = sb.id().to_string();
    sb.destroy().await.expect("destroy");
    assert_gone(&id, None, Some(&veth), sb.state_dir());
}

#[tokio::test]
async fn without_filesystem_writes_stay_in_workspace_and_tmp() {
    let env = env();
    let script = "for f in /workspace/a /tmp/b /c /usr/d /etc/e /dev/null; do \
                    if echo x > $f 2>/dev/null; then echo \"$f ok\"; else echo \"$f denied\"; fi; \
                  done";
    let (exit, out, err) = run(&env, sh(script)).await;
    assert!(exit.success(), "{exit:?} {err}");
    assert_eq!(
        out,
        "/workspace/a ok\n/tmp/b ok\n/c denied\n/usr/d denied\n/etc/e denied\n/dev/null ok\n"
    );
}

#[tokio::test]
async fn with_filesystem_the_root_is_writable_but_host_binds_are_not() {
    let env = env();
    let mut s = sh("for f in /c /etc/e /usr/d; do \
                      if echo x > $f 2>/dev/null; then echo \"$f ok\"; else echo \"$f denied\"; fi; \
                    done");
    s.capabilities.push(Capability::FileSystem);
    let (exit, out, err) = run(&env, s).await;
    assert!(exit.success(), "{exit:?} {err}");
    assert_eq!(out, "/c ok\n/etc/e ok\n/usr/d denied\n");
}

#[tokio::test]
async fn host_secrets_are_never_readable() {
    let env = env();
    // A fake key in the runtime's data directory, outside the sandbox's view.
    let data = tempfile::tempdir().expect("tempdir");
    let key = data.path().join("keys").join("agent.key");
    std::fs::create_dir_all(key.parent().expect("parent")).expect("mkdir");
    std::fs::write(&key, "SECRET-KEY-MATERIAL").expect("write key");
    let state = env.backend.config().state_dir.clone();
    let script = format!(
        "cat /etc/shadow 2>&1; cat {key} 2>&1; ls {state} 2>&1; cat /proc/1/environ 2>&1; \
         echo; tr '\\0' ' ' < /proc/1/cmdline; echo; grep -c . /etc/passwd",
        key = key.display(),
        state = state.display()
    );
    let mut s = sh(&script);
    s.capabilities.push(Capability::FileSystem);
    let (_, out, _) = run(&env, s).await;
    assert!(!out.contains("SECRET-KEY-MATERIAL"), "{out}");
    assert!(!out.contains("root:$"), "{out}");
    assert!(out.contains("/etc/shadow: No such file"), "{out}");
    assert!(out.contains("agent.key: No such file"), "{out}");
    let state_line = out
        .lines()
        .find(|l| l.contains(&state.display().to_string()))
        .expect("ls line");
    assert!(state_line.contains("No such file"), "{out}");
    assert!(out.contains("/proc/1/environ: Permission denied"), "{out}");
    // PID 1 is a copy of the runtime process; its command line is scrubbed.
    assert!(out.contains("symbiont-init"), "{out}");
    assert!(!out.contains("sandbox_native"), "{out}");
    // The generated passwd has exactly root and agent.
    assert!(out.trim_end().ends_with('2'), "{out}");
}

const SECCOMP_PY: &str = r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, f):
    r = f()
    e = ctypes.get_errno()
    print(name, "ok" if r >= 0 else errno.errorcode.get(e, e))
attempt("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
attempt("unshare", lambda: libc.unshare(0x10000000))          # CLONE_NEWUSER
attempt("unshare_net", lambda: libc.unshare(0x40000000))      # CLONE_NEWNET
attempt("ptrace", lambda: libc.ptrace(0, 0, None, None))      # PTRACE_TRACEME
attempt("keyctl", lambda: libc.syscall(250, 0, -3, 0))        # KEYCTL_GET_KEYRING_ID
attempt("bpf", lambda: libc.syscall(321, 0, None, 0))
attempt("setns", lambda: libc.setns(0, 0))
attempt("clone_newuser", lambda: libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0))
attempt("clone3", lambda: libc.syscall(435, None, 0))
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("fork ok")
for line in open("/proc/self/status"):
    if line.split(":")[0] in ("Seccomp", "NoNewPrivs"):
        print(line.strip().replace("\t", " "))
"#;

#[tokio::test]
async fn seccomp_denies_mount_unshare_ptrace_and_friends_with_eperm() {
    let env = env();
    let (exit, out, err) = run(&env, spec(&["/usr/bin/python3", "-c", SECCOMP_PY])).await;
    assert!(exit.success(), "{exit:?} {err}");
    for expected in [
        "mount EPERM",
        "unshare EPERM",
        "unshare_net EPERM",
        "ptrace EPERM",
        "keyctl EPERM",
        "bpf EPERM",
        "setns EPERM",
        "clone_newuser EPERM",
        "clone3 ENOSYS",
        "fork ok",
        "Seccomp: 2",
        "NoNewPrivs: 1",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[tokio::test]
async fn the_program_is_not_host_root_and_holds_no_capabilities() {
    let env = env();
    let (exit, out, err) = run(
        &env,
        sh(
            "grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status; \
            cat /proc/self/uid_map; id -un",
        ),
    )
    .await;
    assert!(exit.success(), "{exit:?} {err}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            out.contains(&format!("{cap}:\t0000000000000000")),
            "{cap} not empty:\n{out}"
        );
    }
    assert!(out.contains("Uid:\t65534\t65534\t65534\t65534"), "{out}");
    // Sandbox id 0 maps to an unprivileged host id.
    let map = out
        .lines()
        .find(|l| l.split_whitespace().count() == 3)
        .expect("uid_map line");
    let f: Vec<u64> = map
        .split_whitespace()
        .map(|x| x.parse().expect("number"))
        .collect();
    assert_eq!(f[0], 0);
    assert!(f[1] >= 100_000, "sandbox root maps to host uid {}", f[1]);
    assert!(out.trim_end().ends_with("agent"), "{out}");
}

#[tokio::test]
async fn timeout_kills_and_leaves_nothing_behind() {
    let env = env();
    let mut s = sh("sleep 1000 & sleep 1000");
    s.timeout = Some(Duration::from_millis(800));
    let sb = env.backend.create_native(s).await.expect("create");
    let _io = sb.start().await.expect("start");
    let reaper = sb.reaper_pid();
    let id = sb.id().to_string();
    let t0 = Instant::now();
    let exit = sb.wait().await.expect("wait");
    assert_eq!(exit.reason, ExitReason::Timeout);
    assert!(exit.is_resource_violation());
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Gone already, before destroy.
    assert_gone(&id, reaper, None, sb.state_dir());
    sb.destroy()
        .await
        .expect("destroy is idempotent after a timeout");
}

#[tokio::test]
async fn kill_and_destroy_leave_no_process_cgroup_veth_or_rule() {
    let env = env();
    let mut s = sh("sleep 1000 & sleep 1000");
    s.capabilities.push(Capability::Network);
    let sb = env.backend.create_native(s).await.expect("create");
    let _io = sb.start().await.expect("start");
    let reaper = sb.reaper_pid().expect("running");
    let veth = sb.host_interface().await.expect("veth");
    let id = sb.id().to_string();
    assert!(iptables_mentions(&id));
    for d in cgroup_dirs(&id) {
        assert!(d.exists(), "{} missing while running", d.display());
    }
    sb.kill().await.expect("kill");
    let exit = sb.wait().await.expect("wait");
    assert_eq!(exit.reason, ExitReason::Killed);
    assert!(!pid_alive(reaper));
    sb.destroy().await.expect("destroy");
    sb.destroy().await.expect("idempotent");
    assert_gone(&id, Some(reaper), Some(&veth), sb.state_dir());
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_the_grace_period() {
    let env = env();
    let sb = env
        .backend
        .create_native(sh("trap '' TERM; sleep 1000 & wait; wait"))
        .await
        .expect("create");
    let _io = sb.start().await.expect("start");
    let reaper = sb.reaper_pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let exit = sb.stop(Duration::from_millis(500)).await.expect("stop");
    assert_eq!(exit.reason, ExitReason::Killed);
    assert!(
        t0.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t0.elapsed()
    );
    let id = sb.id().to_string();
    sb.destroy().await.expect("destroy");
    assert_gone(&id, reaper, None, sb.state_dir());

    // A program that honours SIGTERM ends within the grace period.
    let sb = env
        .backend
        .create_native(sh("sleep 1000"))
        .await
        .expect("create");
    let _io = sb.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let exit = sb.stop(Duration::from_secs(10)).await.expect("stop");
    assert_eq!(exit.reason, ExitReason::Killed);
    assert_eq!(exit.signal, Some(libc::SIGTERM));
    assert!(t0.elapsed() < Duration::from_secs(5));
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn pause_freezes_and_resume_thaws() {
    let _heavy = HEAVY.lock().await;
    let env = env();
    let sb = env
        .backend
        .create_native(sh("while :; do :; done"))
        .await
        .expect("create");
    let _io = sb.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(200)).await;
    sb.pause().await.expect("pause");
    let c0 = sb.stats().await.expect("stats").cpu_usage_ns;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c1 = sb.stats().await.expect("stats").cpu_usage_ns;
    assert!(
        c1 - c0 < 20_000_000,
        "a frozen sandbox used {} ms of CPU",
        (c1 - c0) / 1_000_000
    );
    sb.resume().await.expect("resume");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c2 = sb.stats().await.expect("stats").cpu_usage_ns;
    assert!(
        c2 - c1 > 200_000_000,
        "after resume only {} ms of CPU",
        (c2 - c1) / 1_000_000
    );
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn exec_runs_inside_the_running_sandbox() {
    let env = env();
    let mut s = sh("echo main > /tmp/marker; sleep 1000");
    s.files = vec![file("note.txt", b"from the spec\n", 0o644)];
    let sb = env.backend.create_native(s).await.expect("create");
    let _io = sb.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let argv: Vec<String> = [
        "/bin/sh",
        "-c",
        "cat /workspace/note.txt /tmp/marker; id -u; grep CapEff /proc/self/status; \
         ls /proc | grep -cE '^[0-9]+$'; echo err >&2; exit 3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = sb.exec(&argv, Duration::from_secs(10)).await.expect("exec");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.code, 3, "{stdout}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0..3], ["from the spec", "main", "65534"], "{stdout}");
    assert_eq!(lines[3], "CapEff:\t0000000000000000");
    // Its own PID namespace: the reaper, sh, sleep, the exec'd sh, ls and grep at most.
    let procs: usize = lines[4].parse().expect("count");
    assert!(procs <= 7, "sees {procs} processes");
    // A command that outlives its timeout is killed.
    let slow: Vec<String> = ["/bin/sleep", "30"].iter().map(|s| s.to_string()).collect();
    let err = sb
        .exec(&slow, Duration::from_millis(300))
        .await
        .expect_err("timeout");
    assert!(err.to_string().contains("did not finish"), "{err}");
    sb.destroy().await.expect("destroy");
    let err = sb
        .exec(&argv, Duration::from_secs(1))
        .await
        .expect_err("gone");
    assert_eq!(err.code(), "SANDBOX_003");
}

#[tokio::test]
async fn two_sandboxes_do_not_see_each_other() {
    let env = env();
    let mut a = sh("echo secret-a > /workspace/a.txt; python3 -c \"import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 7777)); s.listen(); time.sleep(1000)\"");
    a.capabilities.push(Capability::Network);
    let a = env.backend.create_native(a).await.expect("create a");
    let _ioa = a.start().await.expect("start a");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A's address: the host end's address + 1.
    let a_out = a
        .exec(
            &[
                "/bin/sh".into(),
                "-c".into(),
                "echo $SYMBIONT_HOST_ADDR".into(),
            ],
            Duration::from_secs(5),
        )
        .await
        .expect("exec a");
    let host_addr: std::net::Ipv4Addr = String::from_utf8_lossy(&a_out.stdout)
        .trim()
        .parse()
        .expect("host addr");
    let a_addr = std::net::Ipv4Addr::from(u32::from(host_addr) + 1);
    let script = format!(
        "ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; \
         cat /workspace/a.txt 2>&1; \
         python3 -c \"import socket\ntry:\n socket.create_connection(('{a_addr}', 7777), timeout=2); print('reached a')\nexcept Exception as e: print('blocked', type(e).__name__)\""
    );
    let mut b = sh(&script);
    b.capabilities.push(Capability::Network);
    let (exit, out, err) = run(&env, b).await;
    assert!(exit.success(), "{exit:?} {err}");
    let mut lines = out.lines();
    let pids: Vec<u32> = lines
        .next()
        .expect("pids")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    assert!(pids.len() <= 5 && pids.contains(&1), "B sees pids {pids:?}");
    assert!(out.contains("a.txt: No such file"), "{out}");
    assert!(out.contains("blocked"), "{out}");
    assert!(!out.contains("reached a"), "{out}");
    a.destroy().await.expect("destroy a");
}

#[tokio::test]
async fn direct_io_disk_writes_are_throttled_to_the_limit() {
    let _heavy = HEAVY.lock().await;
    let env = env();
    assert!(
        env.backend.enforcement().disk_io,
        "disk I/O throttling unavailable: the state dir must be on a block device"
    );
    let mut s = sh("dd if=/dev/zero of=/workspace/big bs=1M count=40 oflag=direct 2>&1");
    s.limits.disk_io_mbps = 10;
    let sb = env.backend.create_native(s).await.expect("create");
    let mut io = sb.start().await.expect("start");
    let t0 = Instant::now();
    let mut out = String::new();
    io.stdout.read_to_string(&mut out).await.expect("read");
    let exit = sb.wait().await.expect("wait");
    let wall = t0.elapsed().as_secs_f64();
    assert!(exit.success(), "{exit:?} {out}");
    let stats = sb.stats().await.expect("stats");
    sb.destroy().await.expect("destroy");
    let bytes = 40.0 * 1024.0 * 1024.0;
    let rate_mb = bytes / wall / 1e6;
    eprintln!(
        "direct-I/O write with disk_io_mbps = 10: {rate_mb:.2} MB/s ({wall:.2} s); dd: {out}"
    );
    assert!(stats.disk_write_bytes >= 40 << 20, "{stats:?}");
    assert!(rate_mb <= 12.0, "{rate_mb:.2} MB/s exceeds 10 MB/s + 20%");
    assert!(
        rate_mb >= 6.0,
        "{rate_mb:.2} MB/s is far below the 10 MB/s limit"
    );
}

const NET_PY: &str = r#"
import os, socket, sys, time
addr = os.environ["SYMBIONT_HOST_ADDR"]
down, up = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection((addr, down))
t = time.time(); n = 0
while True:
    b = s.recv(65536)
    if not b: break
    n += len(b)
print("down", n, time.time() - t)
s = socket.create_connection((addr, up))
buf = b"y" * 65536
t = time.time(); left = 4 << 20
while left > 0:
    k = s.send(buf[:min(left, len(buf))]); left -= k
s.shutdown(socket.SHUT_WR); s.recv(1)
print("up", 4 << 20, time.time() - t)
"#;

#[tokio::test]
async fn network_throughput_is_throttled_to_the_limit_both_ways() {
    let _heavy = HEAVY.lock().await;
    let env = env();
    const N: usize = 4 << 20;
    let down = TcpListener::bind("127.0.0.1:0").expect("bind");
    let up = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (dp, upp) = (
        down.local_addr().expect("a").port(),
        up.local_addr().expect("a").port(),
    );
    let srv_down = std::thread::spawn(move || {
        let (mut c, _) = down.accept().expect("accept");
        let buf = vec![b'x'; 65536];
        let t = Instant::now();
        let mut sent = 0;
        while sent < N {
            c.write_all(&buf).expect("send");
            sent += buf.len();
        }
        drop(c);
        t.elapsed()
    });
    let srv_up = std::thread::spawn(move || {
        let (mut c, _) = up.accept().expect("accept");
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        let t = Instant::now();
        loop {
            let n = c.read(&mut buf).expect("recv");
            if n == 0 {
                break;
            }
            got += n;
        }
        let e = t.elapsed();
        let _ = c.write_all(b"k");
        (got, e)
    });
    let mut s = spec(&[
        "/usr/bin/python3",
        "-c",
        NET_PY,
        &dp.to_string(),
        &upp.to_string(),
    ]);
    s.capabilities.push(Capability::Network);
    s.limits.network_io_mbps = 8;
    let sb = env.backend.create_native(s).await.expect("create");
    let mut io = sb.start().await.expect("start");
    let mut out = String::new();
    io.stdout.read_to_string(&mut out).await.expect("read");
    let exit = sb.wait().await.expect("wait");
    let stats = sb.stats().await.expect("stats");
    sb.destroy().await.expect("destroy");
    assert!(exit.success(), "{exit:?} {out}");
    let _ = srv_down.join().expect("down server");
    let (got, up_time) = srv_up.join().expect("up server");
    assert_eq!(got, N);
    let down_line = out
        .lines()
        .find(|l| l.starts_with("down"))
        .expect("down line");
    let f: Vec<&str> = down_line.split_whitespace().collect();
    let (n, secs): (f64, f64) = (f[1].parse().expect("n"), f[2].parse().expect("t"));
    let down_mbit = n * 8.0 / secs / 1e6;
    let up_mbit = N as f64 * 8.0 / up_time.as_secs_f64() / 1e6;
    eprintln!("network_io_mbps = 8: download {down_mbit:.2} Mbit/s, upload {up_mbit:.2} Mbit/s");
    assert_eq!(n as usize, N);
    assert!(stats.net_rx_bytes >= N as u64, "{stats:?}");
    assert!(stats.net_tx_bytes >= N as u64, "{stats:?}");
    for (dir, r) in [("download", down_mbit), ("upload", up_mbit)] {
        assert!(r <= 9.6, "{dir} {r:.2} Mbit/s exceeds 8 Mbit/s + 20%");
        assert!(r >= 4.0, "{dir} {r:.2} Mbit/s is far below 8 Mbit/s");
    }
}

#[tokio::test]
async fn update_limits_rewrites_the_cgroup_live() {
    let env = env();
    let sb = env
        .backend
        .create_native(sh("sleep 1000"))
        .await
        .expect("create");
    let _io = sb.start().await.expect("start");
    let mut l = ResourceLimits {
        memory_mb: 96,
        cpu_cores: 0.25,
        ..Default::default()
    };
    l.disk_io_mbps = 5;
    sb.update_limits(&l).await.expect("update");
    let dirs = sb.cgroup_dirs();
    let read = |ctrl: &str, f: &str| {
        let d = dirs
            .iter()
            .find(|d| d.starts_with(Path::new("/sys/fs/cgroup").join(ctrl)))
            .expect("dir");
        std::fs::read_to_string(d.join(f)).expect(f)
    };
    assert_eq!(
        read("memory", "memory.limit_in_bytes").trim(),
        (96u64 << 20).to_string()
    );
    assert_eq!(read("cpu", "cpu.cfs_quota_us").trim(), "25000");
    assert!(read("blkio", "blkio.throttle.write_bps_device").contains(" 5000000"));
    sb.destroy().await.expect("destroy");
}

#[tokio::test]
async fn probe_reports_cgroup_version_and_landlock() {
    let env = env();
    let info = env.backend.probe().await.expect("probe");
    assert!(
        info.details.contains("cgroup v1") || info.details.contains("cgroup v2"),
        "{info:?}"
    );
    assert!(info.details.contains("landlock ABI"), "{info:?}");
    let e = env.backend.enforcement();
    assert!(
        e.memory && e.cpu && e.pids && e.disk_io && e.network_io,
        "{e:?}"
    );
}

/// Regression: the exit used to be lost when the program ended before anyone called
/// `wait()` (a watch `send` with no subscriber drops the value), so `wait()` hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_after_the_program_already_exited_returns_its_exit() {
    let env = env();
    let sb = env
        .backend
        .create_native(spec(&["/bin/echo", "hi"]))
        .await
        .expect("create");
    let mut io = sb.start().await.expect("start");
    let mut first = [0u8; 1];
    io.stdout.read_exact(&mut first).await.expect("read");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exit = tokio::time::timeout(Duration::from_secs(5), sb.wait())
        .await
        .expect("wait must not hang")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    // And again, from another caller.
    assert_eq!(sb.wait().await.expect("second wait"), exit);
    sb.destroy().await.expect("destroy");
}

const LIFELINE_HELPER: &str = "SYMBIONT_TEST_LIFELINE_HELPER";

/// Runs this test binary again as a stand-in "runtime process" (selected by an environment
/// variable), lets it start a sandbox, SIGKILLs it, and checks that the sandbox died with it.
#[tokio::test]
async fn the_sandbox_dies_with_the_runtime_process() {
    if let Ok(state) = std::env::var(LIFELINE_HELPER) {
        // The helper role: start a sandbox, report its pids, wait to be killed.
        let backend = NativeBackend::new(SandboxConfig {
            state_dir: state.into(),
            pids_limit: 64,
            ..Default::default()
        })
        .expect("backend");
        let sb = backend
            .create_native(sh("sleep 1000 & sleep 1000"))
            .await
            .expect("create");
        let _io = sb.start().await.expect("start");
        let reaper = sb.reaper_pid().expect("reaper");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let children = std::fs::read_to_string(format!("/proc/{reaper}/task/{reaper}/children"))
            .expect("children");
        println!("\nLIFELINE {} {} {}", sb.id(), reaper, children.trim());
        tokio::time::sleep(Duration::from_secs(600)).await;
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mut helper = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "the_sandbox_dies_with_the_runtime_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LIFELINE_HELPER, state.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn helper");
    let mut stdout = std::io::BufReader::new(helper.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
        assert!(n > 0, "helper ended without starting a sandbox");
        // libtest may print "test name ... " on the same line first.
        if let Some(i) = line.find("LIFELINE ") {
            line = line[i..].to_string();
            break;
        }
    }
    let f: Vec<&str> = line.split_whitespace().collect();
    let id = f[1].to_string();
    let pids: Vec<i32> = f[2..].iter().map(|p| p.parse().expect("pid")).collect();
    assert!(pids.len() >= 2, "{line}");
    for p in &pids {
        assert!(pid_alive(*p), "{p} not running before the kill");
    }
    helper.kill().expect("SIGKILL the stand-in runtime");
    helper.wait().expect("reap helper");
    let gone = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|p| gone(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in &pids {
        assert!(gone(*p), "sandbox process {p} survived its runtime");
    }
    // The dead runtime could not clean up; the next runtime on this host sweeps what it
    // left (and nothing of live runtimes).
    assert!(
        cgroup_dirs(&id).iter().any(|d| d.exists()),
        "nothing left to sweep?"
    );
    let next = NativeBackend::new(SandboxConfig {
        state_dir: state.path().into(),
        ..Default::default()
    })
    .expect("backend");
    next.sweep_stale();
    for d in cgroup_dirs(&id) {
        assert!(!d.exists(), "stale cgroup {} not swept", d.display());
    }
    assert!(!state.path().join(&id).exists(), "stale state not swept");
}

const LOOPBACK_PY: &str = r#"
import os, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
c = socket.create_connection(s.getsockname(), timeout=2)
a, _ = s.accept(); a.sendall(b"lo-ok"); print(c.recv(16).decode())
print(os.readlink("/proc/self/ns/net"))
"#;

#[tokio::test]
async fn each_sandbox_has_its_own_working_loopback_with_or_without_the_netns_pool() {
    let host_ns = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    for pool in [0usize, 2] {
        let env = env_with(|c| c.native.netns_pool = pool);
        if pool > 0 {
            // Let the pool fill so the pooled path is the one exercised.
            let p = symbiont_runtime::sandbox::native::net::NetnsPool::global(pool).expect("pool");
            let t = Instant::now();
            while p.available() == 0 && t.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(p.available() > 0, "the network namespace pool never filled");
        }
        let a = env
            .backend
            .create_native(sh("sleep 1000"))
            .await
            .expect("create a");
        let _ioa = a.start().await.expect("start a");
        let (exit, out, err) = run(&env, spec(&["/usr/bin/python3", "-c", LOOPBACK_PY])).await;
        assert!(exit.success(), "pool {pool}: {exit:?} {err}");
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("lo-ok"), "pool {pool}: {out}");
        let b_ns = lines.next().expect("netns").to_string();
        let a_out = a
            .exec(
                &["/bin/readlink".into(), "/proc/self/ns/net".into()],
                Duration::from_secs(5),
            )
            .await
            .expect("exec a");
        let a_ns = String::from_utf8_lossy(&a_out.stdout).trim().to_string();
        assert!(a_ns.starts_with("net:["), "{a_ns}");
        assert_ne!(
            a_ns, b_ns,
            "pool {pool}: two sandboxes share a network namespace"
        );
        assert_ne!(
            Path::new(&a_ns),
            host_ns,
            "pool {pool}: sandbox in the host's namespace"
        );
        assert_ne!(
            Path::new(&b_ns),
            host_ns,
            "pool {pool}: sandbox in the host's namespace"
        );
        a.destroy().await.expect("destroy a");
    }
    // The runtime's own threads never stay in a sandbox's namespace.
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").expect("thread netns"),
        host_ns
    );
}
