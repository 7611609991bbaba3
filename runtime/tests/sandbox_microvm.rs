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

fn env_with(microvm: MicrovmConfig) -> Env {
    let state = tempfile::Builder::new()
        .prefix("symbiont-mvm-test")
        .tempdir()
        .expect("tempdir");
    let cfg = SandboxConfig {
        state_dir: std::env::var("MVM_KEEP").map(std::path::PathBuf::from).unwrap_or_else(|_| state.path().to_path_buf()),
        microvm,
        ..Default::default()
    };
    Env {
        backend: Arc::new(MicrovmBackend::new(&cfg)),
        _state: state,
    }
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

async fn read_all(mut r: symbiont_runtime::sandbox::BoxedReader) -> String {
    let mut s = String::new();
    r.read_to_string(&mut s).await.expect("read");
    s
}

/// Runs a spec to completion and returns (stdout, stderr, exit).
async fn run(env: &Env, spec: SandboxSpec) -> (String, String, symbiont_runtime::sandbox::SandboxExit) {
    let sb = create(env, spec).await;
    let SandboxStdio { stdin, stdout, stderr } = sb.start().await.expect("start");
    drop(stdin);
    let (out, err) = tokio::join!(read_all(stdout), read_all(stderr));
    let exit = sb.wait().await.expect("wait");
    sb.destroy().await.expect("destroy");
    (out, err, exit)
}

fn qemu_running(id: &str) -> bool {
    let out = std::process::Command::new("pgrep")
        .args(["-f", id])
        .output()
        .expect("pgrep");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn program_output_and_exit_code_come_back() {
    let env = env();
    let (out, err, exit) = run(&env, spec(&["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"])).await;
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert_eq!(exit.reason, ExitReason::Exited);
    assert_eq!(exit.code, Some(3));
}
