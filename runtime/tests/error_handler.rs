//! Error handler behaviour with the real lifecycle controller and scheduler: a crash loop
//! opens the breaker and ends Failed with the reason, a half-open probe closes the breaker
//! on success, backoff grows exponentially with bounded jitter, actions are carried out on
//! the agent, and every decision is audited. Time is Tokio's paused clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use symbiont_runtime::communication::CommunicationError;
use symbiont_runtime::error_handler::*;
use symbiont_runtime::integrations::audit_trail::{AuditEventType, MockAuditTrail};
use symbiont_runtime::lifecycle::{DefaultLifecycleController, LifecycleConfig};
use symbiont_runtime::sandbox::SandboxError;
use symbiont_runtime::scheduler::*;
use symbiont_runtime::{AgentConfig, AgentId, AgentState, Priority, RuntimeError, TaskId};
use tokio::time::Instant;

/// Fails the first `failures` executions with `error`, then succeeds; records start times.
struct Flaky {
    failures: u32,
    error: fn(&TaskContext) -> RuntimeError,
    starts: Mutex<Vec<(Instant, u32)>>,
}

#[async_trait]
impl TaskExecutor for Flaky {
    async fn execute(&self, task: &TaskContext) -> Result<TaskOutput, RuntimeError> {
        let n = {
            let mut s = self.starts.lock();
            s.push((Instant::now(), task.attempt));
            s.len() as u32
        };
        if n <= self.failures {
            Err((self.error)(task))
        } else {
            Ok(TaskOutput::default())
        }
    }

    async fn cancel(&self, _task: &TaskContext, _reason: CancelReason) -> Result<(), RuntimeError> {
        Ok(())
    }
}

fn crash(task: &TaskContext) -> RuntimeError {
    SchedulerError::AgentCrashed {
        agent: task.agent_id,
        reason: "program exited with status 139".into(),
    }
    .into()
}

fn transient(_task: &TaskContext) -> RuntimeError {
    SandboxError::op("exec", "connection reset").into()
}

struct World {
    lifecycle: DefaultLifecycleController,
    handler: DefaultErrorHandler,
    scheduler: DefaultScheduler,
    audit: Arc<MockAuditTrail>,
    agent: AgentId,
}

async fn world(config: ErrorHandlerConfig, executor: Arc<dyn TaskExecutor>) -> World {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let lifecycle = DefaultLifecycleController::with_driver(
        LifecycleConfig {
            max_restart_attempts: 10,
            enable_auto_recovery: false,
            ..Default::default()
        },
        Arc::new(symbiont_runtime::lifecycle::NoopDriver),
        Some(audit.clone()),
    )
    .await
    .expect("lifecycle");
    let agent = lifecycle
        .create_agent(AgentConfig {
            name: "crashy".into(),
            ..Default::default()
        })
        .await
        .expect("agent");
    let handler = DefaultErrorHandler::with_seed(config, Some(audit.clone()), 7).expect("handler");
    let recovery = RecoveryExecutor::new(handler.clone(), Arc::new(lifecycle.clone()));
    let scheduler = DefaultScheduler::with_parts(
        SchedulerConfig::default(),
        SchedulerParts {
            directory: Arc::new(lifecycle.clone()),
            executor: Some(executor),
            load: None,
            failure_policy: Some(Arc::new(RecoveryPolicy::new(recovery))),
            store: None,
            audit: Some(audit.clone()),
        },
    )
    .await
    .expect("scheduler");
    World {
        lifecycle,
        handler,
        scheduler,
        audit,
        agent,
    }
}

fn task(agent: AgentId, retry_count: u32) -> ScheduledTask {
    ScheduledTask {
        id: TaskId::new(),
        agent_id: agent,
        priority: Priority::Normal,
        scheduled_time: SystemTime::now(),
        timeout: Duration::from_secs(60),
        retry_count,
    }
}

fn decisions(audit: &MockAuditTrail) -> Vec<String> {
    audit
        .events_of(&AuditEventType::RecoveryAction)
        .iter()
        .filter_map(|e| e.metadata.get("decision").cloned())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_crash_looping_agent_opens_its_breaker_and_ends_failed_with_the_reason() {
    let exec = Arc::new(Flaky {
        failures: u32::MAX,
        error: crash,
        starts: Mutex::new(Vec::new()),
    });
    let w = world(
        ErrorHandlerConfig {
            max_recovery_attempts: 3,
            circuit_breaker_threshold: 2,
            circuit_breaker_open_duration: Duration::from_secs(10),
            ..Default::default()
        },
        exec.clone(),
    )
    .await;
    let id = w
        .scheduler
        .schedule_task(task(w.agent, 50))
        .await
        .expect("scheduled");
    let record = w.scheduler.wait_task(id).await.expect("final");

    // The task gave up with the handler's reason after 1 + 3 recoveries.
    assert_eq!(record.status, TaskStatus::Failed);
    assert_eq!(record.attempts, 4);
    let reason = record.last_error.expect("reason");
    assert!(reason.contains("gave up after 3 attempt(s)"), "{reason}");

    // The agent ends Failed, with the reason, after exactly three restarts.
    let agent = w.lifecycle.get_agent(w.agent).expect("agent");
    assert_eq!(agent.state, AgentState::Failed);
    assert_eq!(agent.restart_count, 3);
    let why = agent.failure_reason.expect("failure reason");
    assert!(why.contains("recovery gave up after 3"), "{why}");
    assert!(why.contains("SCHED_006"), "{why}");

    // The breaker opened at the second failure and slowed the loop to one probe per period.
    assert!(matches!(
        w.handler.circuit_state(w.agent),
        CircuitState::Open { .. }
    ));
    // Opened at failure 2, re-opened by the failed probes at failures 3 and 4.
    assert_eq!(w.handler.circuit_openings(w.agent), 3);
    let starts: Vec<Instant> = exec.starts.lock().iter().map(|s| s.0).collect();
    assert_eq!(starts.len(), 4);
    assert!(
        starts[1] - starts[0] < Duration::from_secs(1),
        "closed breaker restarts at once"
    );
    for gap in [starts[2] - starts[1], starts[3] - starts[2]] {
        assert!(
            gap >= Duration::from_secs(10),
            "gap {gap:?} under the open period"
        );
    }
    let d = decisions(&w.audit);
    assert_eq!(d.iter().filter(|x| *x == "restart").count(), 3, "{d:?}");
    assert_eq!(d.iter().filter(|x| *x == "escalate").count(), 1, "{d:?}");
    assert!(d.iter().filter(|x| *x == "defer").count() >= 2, "{d:?}");
    assert!(w
        .audit
        .events_of(&AuditEventType::RecoveryAction)
        .iter()
        .any(|e| e.metadata.contains_key("circuit_opened")));
    // The lifecycle controller audited the Failed state too.
    assert!(w
        .audit
        .events_of(&AuditEventType::StateChanged)
        .iter()
        .any(|e| e.details.contains("recovery gave up")));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_agent_is_restarted_and_its_task_retried_on_it() {
    let exec = Arc::new(Flaky {
        failures: 1,
        error: crash,
        starts: Mutex::new(Vec::new()),
    });
    let w = world(ErrorHandlerConfig::default(), exec.clone()).await;
    let id = w
        .scheduler
        .schedule_task(task(w.agent, 1))
        .await
        .expect("scheduled");
    let record = w.scheduler.wait_task(id).await.expect("final");
    assert_eq!(record.status, TaskStatus::Completed);
    assert_eq!(record.attempts, 2);
    let agent = w.lifecycle.get_agent(w.agent).expect("agent");
    assert_eq!(agent.state, AgentState::Ready);
    assert_eq!(agent.restart_count, 1);
    // The success refilled the budget and kept the breaker closed.
    assert_eq!(w.handler.recovery_attempts(w.agent), 0);
    assert_eq!(w.handler.circuit_state(w.agent), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_that_succeeds_closes_the_breaker() {
    let exec = Arc::new(Flaky {
        failures: 2,
        error: transient,
        starts: Mutex::new(Vec::new()),
    });
    let w = world(
        ErrorHandlerConfig {
            circuit_breaker_threshold: 2,
            circuit_breaker_open_duration: Duration::from_secs(5),
            backoff_base: Duration::from_millis(100),
            max_recovery_attempts: 5,
            ..Default::default()
        },
        exec.clone(),
    )
    .await;
    let id = w
        .scheduler
        .schedule_task(task(w.agent, 5))
        .await
        .expect("scheduled");
    let record = w.scheduler.wait_task(id).await.expect("final");
    assert_eq!(record.status, TaskStatus::Completed);
    assert_eq!(record.attempts, 3);
    let starts: Vec<Instant> = exec.starts.lock().iter().map(|s| s.0).collect();
    // First retry after the (jittered) backoff, second held by the open breaker.
    assert!(starts[1] - starts[0] < Duration::from_millis(200));
    assert!(starts[2] - starts[1] >= Duration::from_secs(5));
    assert_eq!(w.handler.circuit_state(w.agent), CircuitState::Closed);
    assert!(decisions(&w.audit).contains(&"close_circuit".to_string()));
    // Transient errors never touched the agent's state.
    assert_eq!(
        w.lifecycle.get_state(w.agent).expect("state"),
        AgentState::Ready
    );
}

#[tokio::test(start_paused = true)]
async fn the_breaker_cycles_closed_open_half_open_and_back() {
    let agent = AgentId::new();
    let h = DefaultErrorHandler::new(ErrorHandlerConfig {
        circuit_breaker_threshold: 3,
        circuit_breaker_open_duration: Duration::from_secs(30),
        max_recovery_attempts: 100,
        ..Default::default()
    })
    .await
    .expect("handler");
    let err: RuntimeError = SandboxError::op("exec", "EAGAIN").into();
    for _ in 0..2 {
        h.handle_error(agent, &err).await.expect("ok");
        assert_eq!(h.circuit_state(agent), CircuitState::Closed);
    }
    h.handle_error(agent, &err).await.expect("ok");
    assert_eq!(
        h.circuit_state(agent),
        CircuitState::Open {
            remaining: Duration::from_secs(30)
        }
    );
    assert_eq!(
        h.check_circuit(agent).expect_err("open").code(),
        "RECOVERY_001"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(h.admission(agent), Some(Duration::from_secs(20)));
    tokio::time::advance(Duration::from_secs(20)).await;
    assert_eq!(h.admission(agent), None);
    assert_eq!(h.circuit_state(agent), CircuitState::HalfOpen);
    // The probe fails: open again for a full period.
    h.handle_error(agent, &err).await.expect("ok");
    assert_eq!(
        h.circuit_state(agent),
        CircuitState::Open {
            remaining: Duration::from_secs(30)
        }
    );
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(h.admission(agent), None);
    h.record_success(agent);
    assert_eq!(h.circuit_state(agent), CircuitState::Closed);
    assert!(h.check_circuit(agent).is_ok());
    assert_eq!(h.consecutive_failures(agent), 0);
}

#[tokio::test(start_paused = true)]
async fn retry_backoff_grows_exponentially_with_bounded_jitter_and_is_slept() {
    let agent = AgentId::new();
    let config = ErrorHandlerConfig {
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        jitter: 0.3,
        max_recovery_attempts: 10,
        circuit_breaker_threshold: 100,
        ..Default::default()
    };
    let h = DefaultErrorHandler::with_seed(config, None, 42).expect("handler");
    let err: RuntimeError = SandboxError::op("exec", "EAGAIN").into();
    let mut seen = Vec::new();
    for n in 1..=8u32 {
        let ErrorAction::Retry {
            max_attempts,
            backoff,
        } = h.handle_error(agent, &err).await.expect("ok")
        else {
            panic!("transient errors are retried");
        };
        assert_eq!(max_attempts, 10 - n + 1);
        let nominal = (Duration::from_millis(100) * 2u32.pow(n - 1)).min(Duration::from_secs(5));
        assert!(
            backoff >= nominal.mul_f64(0.7)
                && backoff <= nominal.mul_f64(1.3).min(Duration::from_secs(5)),
            "attempt {n}: {backoff:?} outside ±30 % of {nominal:?}"
        );
        seen.push((backoff, nominal));
    }
    // Exponential: the 6th delay is at least 8× the 1st even with jitter at its extremes.
    assert!(seen[5].0 >= seen[0].0 * 8);
    // Jitter is real: not every delay is the nominal one.
    assert!(seen.iter().any(|(b, n)| b != n));

    // The executor sleeps the backoff.
    let lifecycle = DefaultLifecycleController::new(LifecycleConfig::default())
        .await
        .expect("lifecycle");
    let exec = RecoveryExecutor::new(h.clone(), Arc::new(lifecycle));
    let t0 = Instant::now();
    let out = exec
        .execute(
            agent,
            &ErrorAction::Retry {
                max_attempts: 1,
                backoff: Duration::from_millis(750),
            },
            "SANDBOX_004: EAGAIN",
        )
        .await
        .expect("retry");
    assert_eq!(
        out,
        RecoveryOutcome::Retry {
            waited: Duration::from_millis(750)
        }
    );
    assert_eq!(t0.elapsed(), Duration::from_millis(750));
}

#[tokio::test(start_paused = true)]
async fn the_executor_suspends_terminates_and_fails_agents_through_the_lifecycle() {
    let audit = Arc::new(MockAuditTrail::new_sync());
    let lifecycle = DefaultLifecycleController::new(LifecycleConfig {
        enable_auto_recovery: false,
        max_restart_attempts: 1,
        ..Default::default()
    })
    .await
    .expect("lifecycle");
    let new_agent = || async {
        lifecycle
            .create_agent(AgentConfig::default())
            .await
            .expect("agent")
    };
    let h = DefaultErrorHandler::with_audit(
        ErrorHandlerConfig {
            on_resource_violation: ResourceViolationAction::Suspend,
            ..Default::default()
        },
        Some(audit.clone()),
    )
    .await
    .expect("handler");
    let exec = RecoveryExecutor::new(h, Arc::new(lifecycle.clone()));

    let a = new_agent().await;
    let violation: RuntimeError = SchedulerError::LimitExceeded {
        agent: a,
        limit: "memory".into(),
    }
    .into();
    assert_eq!(
        exec.handle(a, &violation).await.expect("suspend"),
        RecoveryOutcome::Suspended
    );
    assert_eq!(lifecycle.get_state(a).expect("a"), AgentState::Suspended);

    let b = new_agent().await;
    let forged: RuntimeError = CommunicationError::Security("forged signature".into()).into();
    assert_eq!(
        exec.handle(b, &forged).await.expect("terminate"),
        RecoveryOutcome::Terminated
    );
    assert_eq!(lifecycle.get_state(b).expect("b"), AgentState::Terminated);

    let c = new_agent().await;
    let permanent: RuntimeError = SandboxError::InvalidSpec("empty argv".into()).into();
    let out = exec.handle(c, &permanent).await.expect("escalate");
    assert!(matches!(out, RecoveryOutcome::Failed { .. }));
    let c_agent = lifecycle.get_agent(c).expect("c");
    assert_eq!(c_agent.state, AgentState::Failed);
    assert!(c_agent
        .failure_reason
        .expect("reason")
        .contains("not recoverable automatically: SANDBOX_002"));

    // A restart the lifecycle refuses (its own limit) leaves the agent Failed: RECOVERY_002.
    let d = new_agent().await;
    let crash: RuntimeError = SchedulerError::AgentCrashed {
        agent: d,
        reason: "SIGSEGV".into(),
    }
    .into();
    assert_eq!(
        exec.handle(d, &crash).await.expect("first restart"),
        RecoveryOutcome::Restarted
    );
    assert_eq!(lifecycle.get_state(d).expect("d"), AgentState::Ready);
    let err = exec.handle(d, &crash).await.expect_err("limit");
    assert_eq!(err.code(), "RECOVERY_002");
    let d_agent = lifecycle.get_agent(d).expect("d");
    assert_eq!(d_agent.state, AgentState::Failed);
    assert!(d_agent
        .failure_reason
        .expect("reason")
        .contains("restart failed"));

    let performed: Vec<String> = audit
        .events_of(&AuditEventType::RecoveryAction)
        .iter()
        .filter_map(|e| e.metadata.get("performed").cloned())
        .collect();
    for p in ["suspend", "terminate", "escalate", "restart"] {
        assert!(
            performed.iter().any(|x| x == p),
            "{p} not audited: {performed:?}"
        );
    }
}
