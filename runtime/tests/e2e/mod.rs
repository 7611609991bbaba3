//! Shared harness of the end-to-end tests: a full [`Runtime`] on a temporary data directory
//! with real sandbox tiers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use symbiont_runtime::config::RuntimeConfig;
use symbiont_runtime::runtime::Runtime;
use symbiont_runtime::sandbox::docker::DockerBackend;
use symbiont_runtime::sandbox::gvisor::GvisorBackend;
use symbiont_runtime::sandbox::microvm::MicrovmBackend;
use symbiont_runtime::sandbox::native::NativeBackend;
use symbiont_runtime::sandbox::{SandboxBackend, SandboxRegistry};
use symbiont_runtime::storage::StorageBackend;
use symbiont_runtime::{AgentConfig, AgentId, AgentState, SecurityTier};

/// A runtime and the directory it lives in (removed on drop).
pub struct Harness {
    pub runtime: Runtime,
    pub dir: tempfile::TempDir,
}

/// The repository root (for `examples/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A configuration on `dir` with fast intervals for tests.
pub fn config(dir: &Path) -> RuntimeConfig {
    let mut config = RuntimeConfig::default();
    config.storage.data_dir = dir.join("data");
    config.storage.backend = StorageBackend::Sqlite;
    config.sandbox.state_dir = dir.join("sandboxes");
    config.lifecycle.state_check_interval = Duration::from_millis(500);
    config.lifecycle.termination_timeout = Duration::from_secs(5);
    config.resource.monitoring_interval = Duration::from_millis(500);
    config.scheduler.task_timeout = Duration::from_secs(30);
    config
}

/// Starts a runtime with the native tier only (no VM probe, no daemon needed).
pub async fn native_runtime(config: RuntimeConfig) -> Runtime {
    runtime_with(config, &[]).await
}

/// A runtime with the native tier plus `extra`, each probed: a tier that cannot run here
/// FAILS the test with the command that installs it.
pub async fn runtime_with(config: RuntimeConfig, extra: &[SecurityTier]) -> Runtime {
    if let Ok(level) = std::env::var("SYMBIONT_TEST_LOG") {
        symbiont_runtime::init_logging(&level, symbiont_runtime::config::LogFormat::Text);
    }
    let mut backends: Vec<Arc<dyn SandboxBackend>> = vec![Arc::new(
        NativeBackend::new(config.sandbox.clone()).unwrap_or_else(|e| {
            panic!("the native tier must work here ({e}); run as root: `bash scripts/setup.sh`")
        }),
    )];
    for tier in extra {
        let backend: Arc<dyn SandboxBackend> = match tier {
            SecurityTier::Tier1 => Arc::new(
                DockerBackend::new(&config.sandbox)
                    .unwrap_or_else(|e| panic!("docker tier: {e}; run `bash scripts/setup.sh`")),
            ),
            SecurityTier::Tier2 => Arc::new(
                GvisorBackend::new(&config.sandbox)
                    .unwrap_or_else(|e| panic!("gVisor tier: {e}; run `bash scripts/setup.sh`")),
            ),
            SecurityTier::Tier3 => Arc::new(MicrovmBackend::new(&config.sandbox)),
            SecurityTier::Native => continue,
        };
        backends.push(backend);
    }
    let mut registry = SandboxRegistry::new();
    let mut infos = Vec::new();
    for backend in backends {
        let info = backend.probe().await.unwrap_or_else(|e| {
            panic!(
                "sandbox tier {} is not usable here ({}): {e}\nrun `bash scripts/setup.sh` to install it",
                backend.tier(),
                e.code()
            )
        });
        infos.push(info);
        registry.register(backend);
    }
    Runtime::start_with_registry(config, registry, infos)
        .await
        .expect("runtime starts")
}

/// A runtime in a fresh temporary directory with the native tier plus `extra`.
pub async fn harness(extra: &[SecurityTier]) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = runtime_with(config(dir.path()), extra).await;
    Harness { runtime, dir }
}

/// The Python echo agent of `examples/agents/` on the native tier (see its docstring:
/// echoes messages, reverses requests, upper-cases tasks, relays "ask").
pub const PY_ECHO: &str = r#"
agent echo {
  run ["/usr/bin/python3", "/workspace/echo_agent.py"]
  file "echo_agent.py" from "echo_agent.py"
  policy {
    allow send to any
    allow receive from any
  }
}
"#;

/// Creates (and starts) the Python echo agent.
pub async fn py_echo(runtime: &Runtime) -> AgentId {
    runtime
        .create_agent_from_definition(
            PY_ECHO,
            Some(repo().join("examples/agents")),
            AgentConfig::default(),
        )
        .await
        .expect("the python echo agent is created")
}

/// A fresh native runtime in a temporary directory.
pub async fn native() -> Harness {
    harness(&[]).await
}

/// Waits until the agent reaches `state` (or panics after `timeout`).
pub async fn wait_state(
    runtime: &Runtime,
    id: symbiont_runtime::AgentId,
    state: AgentState,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = runtime.agent_status(id).expect("agent exists");
        if now.state == state {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "agent {id} did not reach {state:?} within {timeout:?}: {:?} ({:?}); logs: {:?}",
                now.state,
                now.failure_reason,
                runtime.agent_logs(id, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it returns `Some` (or panics after `timeout` with `what`).
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
