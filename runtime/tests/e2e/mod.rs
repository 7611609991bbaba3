//! Shared harness of the end-to-end tests: a full [`Runtime`] on a temporary data directory
//! with real sandbox tiers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use symbiont_runtime::config::RuntimeConfig;
use symbiont_runtime::runtime::Runtime;
use symbiont_runtime::sandbox::native::NativeBackend;
use symbiont_runtime::sandbox::{SandboxBackend, SandboxRegistry};
use symbiont_runtime::storage::StorageBackend;
use symbiont_runtime::AgentState;

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
    if let Ok(level) = std::env::var("SYMBIONT_TEST_LOG") {
        symbiont_runtime::init_logging(&level, symbiont_runtime::config::LogFormat::Text);
    }
    let backend = NativeBackend::new(config.sandbox.clone()).unwrap_or_else(|e| {
        panic!("the native tier must work here ({e}); run as root: `bash scripts/setup.sh`")
    });
    let info = backend.probe().await.expect("native probe");
    let mut registry = SandboxRegistry::new();
    registry.register(Arc::new(backend));
    Runtime::start_with_registry(config, registry, vec![info])
        .await
        .expect("runtime starts")
}

/// A fresh native runtime in a temporary directory.
pub async fn native() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = native_runtime(config(dir.path())).await;
    Harness { runtime, dir }
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
