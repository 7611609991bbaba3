use super::*;
use crate::integrations::audit_trail::MockAuditTrail;
use crate::sandbox::SandboxError;
use std::sync::atomic::{AtomicU32, Ordering};

fn config() -> LifecycleConfig {
    LifecycleConfig {
        initialization_timeout: Duration::from_secs(60),
        termination_timeout: Duration::from_secs(30),
        state_check_interval: Duration::from_secs(5),
        enable_auto_recovery: false,
        max_restart_attempts: 3,
        max_agents: 100,
    }
}

fn agent(name: &str) -> AgentConfig {
    AgentConfig {
        name: name.into(),
        ..Default::default()
    }
}

/// A driver whose steps can be made to hang or fail, counting calls.
#[derive(Default)]
struct TestDriver {
    hang_init: bool,
    fail_init: bool,
    hang_terminate: bool,
    unhealthy: bool,
    inits: AtomicU32,
    kills: AtomicU32,
}

fn failure(message: &str) -> RuntimeError {
    RuntimeError::Sandbox(SandboxError::op("test", message))
}

#[async_trait]
impl AgentDriver for TestDriver {
    async fn initialize(&self, _agent: &AgentInstance) -> Result<(), RuntimeError> {
        self.inits.fetch_add(1, Ordering::SeqCst);
        if self.hang_init {
            std::future::pending::<()>().await;
        }
        if self.fail_init {
            return Err(failure("sandbox exploded"));
        }
        Ok(())
    }
    async fn start(&self, _agent: &AgentInstance) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn suspend(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn resume(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn terminate(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        if self.hang_terminate {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn force_kill(&self, _agent_id: AgentId) -> Result<(), RuntimeError> {
        self.kills.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn health_check(&self, _agent_id: AgentId) -> HealthStatus {
        if self.unhealthy {
            HealthStatus::Unhealthy("stopped answering".into())
        } else {
            HealthStatus::Healthy
        }
    }
}

/// Drives a fresh agent into `state` through valid transitions only.
fn agent_in_state(c: &DefaultLifecycleController, state: AgentState) -> AgentId {
    use AgentState::*;
    let id = c.register_agent(agent("a")).expect("register");
    let path: &[AgentState] = match state {
        Created => &[],
        Initializing => &[Initializing],
        Ready => &[Initializing, Ready],
        Running => &[Initializing, Ready, Running],
        Suspended => &[Initializing, Ready, Suspended],
        Waiting => &[Initializing, Ready, Waiting],
        Failed => &[Failed],
        Terminating => &[Terminating],
        Terminated => &[Terminating, Terminated],
    };
    for s in path {
        c.transition(id, *s, "setup").expect("setup path is valid");
    }
    assert_eq!(c.get_state(id).expect("state"), state);
    id
}

#[tokio::test]
async fn every_valid_transition_is_accepted_and_every_invalid_refused_with_agent_002() {
    let c = DefaultLifecycleController::new(LifecycleConfig {
        max_agents: 1000,
        ..config()
    })
    .await
    .expect("controller");
    let mut valid = 0;
    let mut invalid = 0;
    for from in AgentState::ALL {
        for to in AgentState::ALL {
            let id = agent_in_state(&c, from);
            let result = c.transition(id, to, "test");
            if transition_allowed(from, to) {
                let event = result.expect("valid transition accepted");
                assert_eq!(event.from, Some(from));
                assert_eq!(event.to, to);
                assert_eq!(c.get_state(id).expect("state"), to);
                valid += 1;
            } else {
                let err = result.expect_err("invalid transition refused");
                assert_eq!(err.code(), "AGENT_002", "{from:?} -> {to:?}");
                assert_eq!(c.get_state(id).expect("state"), from, "state unchanged");
                invalid += 1;
            }
        }
    }
    assert_eq!(valid + invalid, 81);
    assert_eq!(valid, 29, "the table has 29 edges");
}

#[test]
fn terminated_is_final() {
    for to in AgentState::ALL {
        assert!(!transition_allowed(AgentState::Terminated, to));
    }
}

#[tokio::test]
async fn unknown_agent_is_agent_001() {
    let c = DefaultLifecycleController::new(config())
        .await
        .expect("controller");
    let err = c
        .transition(AgentId::new(), AgentState::Ready, "x")
        .expect_err("unknown");
    assert_eq!(err.code(), "AGENT_001");
    assert_eq!(
        c.get_state(AgentId::new()).expect_err("unknown").code(),
        "AGENT_001"
    );
}

#[tokio::test]
async fn max_agents_is_refused_at_the_limit_and_terminated_agents_free_a_slot() {
    let c = DefaultLifecycleController::new(LifecycleConfig {
        max_agents: 3,
        ..config()
    })
    .await
    .expect("controller");
    let ids: Vec<_> = (0..3)
        .map(|i| {
            c.register_agent(agent(&format!("a{i}")))
                .expect("under limit")
        })
        .collect();
    let err = c.register_agent(agent("one too many")).expect_err("limit");
    assert_eq!(err.code(), "AGENT_003");
    c.terminate_agent(ids[0]).await.expect("terminate");
    c.register_agent(agent("fits again")).expect("slot freed");
}

#[tokio::test]
async fn duplicate_id_and_invalid_limits_are_refused() {
    let c = DefaultLifecycleController::new(config())
        .await
        .expect("controller");
    let cfg = agent("a");
    c.register_agent(cfg.clone()).expect("first");
    assert_eq!(c.register_agent(cfg).expect_err("dup").code(), "AGENT_004");
    let mut bad = agent("b");
    bad.resource_limits.memory_mb = 0;
    let err = c.register_agent(bad).expect_err("bad limits");
    assert_eq!(err.code(), "AGENT_007");
    assert!(err.to_string().contains("memory_mb"));
}

#[tokio::test(start_paused = true)]
async fn initialization_timeout_marks_the_agent_failed_and_cleans_up() {
    let driver = Arc::new(TestDriver {
        hang_init: true,
        ..Default::default()
    });
    let c = DefaultLifecycleController::with_driver(config(), driver.clone(), None)
        .await
        .expect("controller");
    let id = c.register_agent(agent("slow")).expect("register");
    let started = tokio::time::Instant::now();
    let err = c.initialize_agent(id).await.expect_err("times out");
    assert_eq!(err.code(), "AGENT_005");
    assert!(err.to_string().contains("timed out after 1m"), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    let a = c.get_agent(id).expect("agent");
    assert_eq!(a.state, AgentState::Failed);
    assert!(a.failure_reason.expect("reason").contains("timed out"));
    assert_eq!(
        driver.kills.load(Ordering::SeqCst),
        1,
        "half-built sandbox killed"
    );
}

#[tokio::test(start_paused = true)]
async fn termination_timeout_forces_the_kill_and_ends_terminated() {
    let driver = Arc::new(TestDriver {
        hang_terminate: true,
        ..Default::default()
    });
    let c = DefaultLifecycleController::with_driver(config(), driver.clone(), None)
        .await
        .expect("controller");
    let id = c.create_agent(agent("stubborn")).await.expect("create");
    let started = tokio::time::Instant::now();
    let outcome = c.terminate_agent(id).await.expect("terminates");
    assert_eq!(outcome, TerminationOutcome::Forced);
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    assert_eq!(c.get_state(id).expect("state"), AgentState::Terminated);
    assert_eq!(driver.kills.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn auto_recovery_stops_after_max_restart_attempts() {
    let driver = Arc::new(TestDriver {
        fail_init: true,
        ..Default::default()
    });
    let c = DefaultLifecycleController::with_driver(
        LifecycleConfig {
            enable_auto_recovery: true,
            max_restart_attempts: 3,
            ..config()
        },
        driver.clone(),
        None,
    )
    .await
    .expect("controller");
    let mut events = c.subscribe();
    let id = c.register_agent(agent("crashy")).expect("register");
    assert!(c.initialize_agent(id).await.is_err());
    // 1 initial attempt + 3 restarts, then it stays Failed.
    let mut failures = 0;
    while failures < 4 {
        let e = events.recv().await.expect("event");
        if e.to == AgentState::Failed {
            failures += 1;
        }
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(driver.inits.load(Ordering::SeqCst), 4);
    let a = c.get_agent(id).expect("agent");
    assert_eq!(a.state, AgentState::Failed);
    assert_eq!(a.restart_count, 3);
    let err = c.restart_agent(id).await.expect_err("limit");
    assert!(err.to_string().contains("restart limit of 3"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn without_auto_recovery_a_failed_agent_stays_failed() {
    let driver = Arc::new(TestDriver {
        fail_init: true,
        ..Default::default()
    });
    let c = DefaultLifecycleController::with_driver(config(), driver.clone(), None)
        .await
        .expect("controller");
    let id = c.register_agent(agent("crashy")).expect("register");
    assert!(c.initialize_agent(id).await.is_err());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(driver.inits.load(Ordering::SeqCst), 1);
    assert_eq!(c.get_state(id).expect("state"), AgentState::Failed);
}

#[tokio::test(start_paused = true)]
async fn health_checks_run_every_interval_and_fail_unhealthy_agents() {
    let driver = Arc::new(TestDriver {
        unhealthy: true,
        ..Default::default()
    });
    let c = DefaultLifecycleController::with_driver(config(), driver, None)
        .await
        .expect("controller");
    let id = c.create_agent(agent("sick")).await.expect("create");
    c.start_agent(id).await.expect("start");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.get_state(id).expect("state"), AgentState::Running);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = c.get_agent(id).expect("agent");
    assert_eq!(a.state, AgentState::Failed);
    assert!(a
        .failure_reason
        .expect("reason")
        .contains("stopped answering"));
}

#[tokio::test]
async fn full_life_is_published_and_audited() {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let c = DefaultLifecycleController::with_driver(
        config(),
        Arc::new(NoopDriver),
        Some(audit.clone()),
    )
    .await
    .expect("controller");
    let mut events = c.subscribe();
    let id = c.create_agent(agent("life")).await.expect("create");
    c.start_agent(id).await.expect("start");
    c.suspend_agent(id, "operator").await.expect("suspend");
    c.resume_agent(id).await.expect("resume");
    assert_eq!(
        c.terminate_agent(id).await.expect("terminate"),
        TerminationOutcome::Graceful
    );
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e.to);
    }
    use AgentState::*;
    assert_eq!(
        seen,
        [
            Created,
            Initializing,
            Ready,
            Running,
            Suspended,
            Running,
            Terminating,
            Terminated
        ]
    );
    let changes = audit.events_of(&AuditEventType::StateChanged);
    assert_eq!(changes.len(), 7);
    assert_eq!(audit.events_of(&AuditEventType::AgentCreated).len(), 1);
    c.remove_agent(id).expect("remove terminated");
    assert_eq!(c.agent_count(), 0);
}

#[tokio::test]
async fn removing_a_live_agent_is_refused() {
    let c = DefaultLifecycleController::new(config())
        .await
        .expect("controller");
    let id = c.register_agent(agent("a")).expect("register");
    assert_eq!(c.remove_agent(id).expect_err("alive").code(), "AGENT_002");
}

#[tokio::test]
async fn invalid_controller_config_is_refused() {
    let err = DefaultLifecycleController::new(LifecycleConfig {
        max_agents: 0,
        ..config()
    })
    .await
    .expect_err("0 agents");
    assert_eq!(err.code(), "CONFIG_001");
}
