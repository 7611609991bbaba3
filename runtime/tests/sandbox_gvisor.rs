//! Tier2 (gVisor) for real: every case of `container_cases` against dockerd with runsc.
//! Needs dockerd with runsc registered (run `bash scripts/setup.sh`); a missing daemon fails with that message.

mod container_cases;

use std::sync::Arc;

use container_cases as cases;
use symbiont_runtime::sandbox::gvisor::GvisorBackend;
use symbiont_runtime::sandbox::{SandboxBackend, SandboxConfig, SandboxError};

fn make(config: &SandboxConfig) -> Result<Arc<dyn SandboxBackend>, SandboxError> {
    Ok(Arc::new(GvisorBackend::new(config)?))
}

static GVISOR: cases::Tier = cases::Tier {
    name: "gvisor",
    make,
    disk_io: false,
    fork_bomb_ends_sandbox: true,
    shows_no_new_privs: false,
};

#[tokio::test]
async fn gvisor_program_output_and_exit_code() {
    cases::program_output_and_exit_code(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_stdin_reaches_the_program() {
    cases::stdin_reaches_the_program(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_workspace_files_keep_modes() {
    cases::workspace_files_keep_modes(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_memory_hog_is_oom_killed() {
    cases::memory_hog_is_oom_killed(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_fork_bomb_is_contained() {
    cases::fork_bomb_is_contained(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_busy_loop_gets_half_a_core() {
    cases::busy_loop_gets_half_a_core(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_network_only_with_capability() {
    cases::network_only_with_capability(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_root_is_read_only_without_filesystem() {
    cases::root_is_read_only_without_filesystem(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_host_secrets_are_unreadable() {
    cases::host_secrets_are_unreadable(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_capabilities_dropped_and_non_root() {
    cases::capabilities_dropped_and_non_root(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_timeout_kills_and_removes_the_container() {
    cases::timeout_kills_and_removes_the_container(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_kill_and_destroy_leave_nothing() {
    cases::kill_and_destroy_leave_nothing(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_pause_and_resume() {
    cases::pause_and_resume(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_exec_runs_inside() {
    cases::exec_runs_inside(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_disk_write_rate_is_limited() {
    cases::disk_write_rate_is_limited(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_network_rate_is_limited() {
    cases::network_rate_is_limited(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_update_limits_reach_the_kernel() {
    cases::update_limits_reach_the_kernel(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_stop_terms_then_kills() {
    cases::stop_terms_then_kills(&GVISOR).await;
}

#[tokio::test]
async fn gvisor_missing_runtime_says_how_to_install() {
    let mut config = SandboxConfig::default();
    config.gvisor.runtime = "runsc-not-registered".into();
    let backend = GvisorBackend::new(&config).expect("backend");
    let err = backend
        .probe()
        .await
        .expect_err("runtime is not registered");
    assert_eq!(err.code(), "SANDBOX_001", "{err}");
    let text = err.to_string();
    assert!(text.contains("runsc-not-registered"), "{text}");
    assert!(text.contains("scripts/setup.sh"), "{text}");
    assert!(text.contains("daemon.json"), "{text}");
}
