//! Tier1 (Docker) for real: every case of `container_cases` against dockerd with runc.
//! Needs dockerd (run `bash scripts/setup.sh`); a missing daemon fails with that message.

mod container_cases;

use std::sync::Arc;

use container_cases as cases;
use symbiont_runtime::sandbox::docker::DockerBackend;
use symbiont_runtime::sandbox::{SandboxBackend, SandboxConfig, SandboxError};

fn make(config: &SandboxConfig) -> Result<Arc<dyn SandboxBackend>, SandboxError> {
    Ok(Arc::new(DockerBackend::new(config)?))
}

static DOCKER: cases::Tier = cases::Tier {
    name: "docker",
    make,
    disk_io: true,
    fork_bomb_ends_sandbox: false,
    shows_no_new_privs: true,
};

#[tokio::test]
async fn docker_program_output_and_exit_code() {
    cases::program_output_and_exit_code(&DOCKER).await;
}

#[tokio::test]
async fn docker_stdin_reaches_the_program() {
    cases::stdin_reaches_the_program(&DOCKER).await;
}

#[tokio::test]
async fn docker_workspace_files_keep_modes() {
    cases::workspace_files_keep_modes(&DOCKER).await;
}

#[tokio::test]
async fn docker_memory_hog_is_oom_killed() {
    cases::memory_hog_is_oom_killed(&DOCKER).await;
}

#[tokio::test]
async fn docker_fork_bomb_is_contained() {
    cases::fork_bomb_is_contained(&DOCKER).await;
}

#[tokio::test]
async fn docker_busy_loop_gets_half_a_core() {
    cases::busy_loop_gets_half_a_core(&DOCKER).await;
}

#[tokio::test]
async fn docker_network_only_with_capability() {
    cases::network_only_with_capability(&DOCKER).await;
}

#[tokio::test]
async fn docker_root_is_read_only_without_filesystem() {
    cases::root_is_read_only_without_filesystem(&DOCKER).await;
}

#[tokio::test]
async fn docker_host_secrets_are_unreadable() {
    cases::host_secrets_are_unreadable(&DOCKER).await;
}

#[tokio::test]
async fn docker_capabilities_dropped_and_non_root() {
    cases::capabilities_dropped_and_non_root(&DOCKER).await;
}

#[tokio::test]
async fn docker_timeout_kills_and_removes_the_container() {
    cases::timeout_kills_and_removes_the_container(&DOCKER).await;
}

#[tokio::test]
async fn docker_kill_and_destroy_leave_nothing() {
    cases::kill_and_destroy_leave_nothing(&DOCKER).await;
}

#[tokio::test]
async fn docker_pause_and_resume() {
    cases::pause_and_resume(&DOCKER).await;
}

#[tokio::test]
async fn docker_exec_runs_inside() {
    cases::exec_runs_inside(&DOCKER).await;
}

#[tokio::test]
async fn docker_disk_write_rate_is_limited() {
    cases::disk_write_rate_is_limited(&DOCKER).await;
}

#[tokio::test]
async fn docker_network_rate_is_limited() {
    cases::network_rate_is_limited(&DOCKER).await;
}

#[tokio::test]
async fn docker_update_limits_reach_the_kernel() {
    cases::update_limits_reach_the_kernel(&DOCKER).await;
}

#[tokio::test]
async fn docker_stop_terms_then_kills() {
    cases::stop_terms_then_kills(&DOCKER).await;
}

#[tokio::test]
async fn docker_unreachable_daemon_says_how_to_install() {
    let mut config = SandboxConfig::default();
    config.docker.socket = "/nonexistent/docker.sock".into();
    let backend = DockerBackend::new(&config).expect("backend");
    let err = backend.probe().await.expect_err("no daemon there");
    assert_eq!(err.code(), "SANDBOX_001", "{err}");
    assert!(err.to_string().contains("scripts/setup.sh"), "{err}");
}
