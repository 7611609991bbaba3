//! Agents in different sandbox tiers under one [`Runtime`], for real, and chaos per tier.
//!
//! - Cross-tier messaging: a native agent (the Python echo agent) and a Docker (Tier1) or
//!   microVM (Tier3) agent (the static Rust echo agent) exchange a request and its reply
//!   through the bus; the audit trail records both directions and verifies.
//! - Chaos (issue 6): the container (killed with `docker kill`) or the VM (its QEMU process
//!   killed with SIGKILL) of an agent dies mid-task; the agent is restarted in a fresh
//!   sandbox and the task retried to completion.
//!
//! The container and VM images have no Python, so these agents run
//! `agent-sdk/examples/echo_agent.rs` built statically by `scripts/setup.d/40-static-agents.sh`
//! (installed to `/var/lib/symbiont/agents/echo_agent`). A missing binary, daemon, runsc or
//! guest kernel FAILS the test with the command to run: `bash scripts/setup.sh`.

mod e2e;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use symbiont_runtime::integrations::audit_trail::{AuditEventType, AuditQuery};
use symbiont_runtime::runtime::{Runtime, SendRequest, TaskRequest};
use symbiont_runtime::scheduler::TaskStatus;
use symbiont_runtime::*;

use e2e::*;

/// Where `scripts/setup.d/40-static-agents.sh` installs the static agents.
fn static_agents() -> PathBuf {
    let dir = std::env::var_os("SYMBIONT_STATIC_AGENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/symbiont/agents"));
    let bin = dir.join("echo_agent");
    assert!(
        bin.is_file(),
        "the static echo agent {} is missing: run `bash scripts/setup.sh` \
         (scripts/setup.d/40-static-agents.sh builds agent-sdk/examples/echo_agent.rs with \
         crt-static for the container and microVM tiers)",
        bin.display()
    );
    dir
}

/// The static Rust echo agent in `TIER`; `ENV` is replaced by `env` statements.
const STATIC_ECHO: &str = r#"
agent NAME {
  tier = TIER
  run ["/workspace/echo_agent"]
  file "echo_agent" mode 0755 from "echo_agent"
  ENV
  limits {
    memory     = 128MiB
    cpu        = 1
    disk_io    = 0
    network_io = 0
  }
  policy {
    allow send to any
    allow receive from any
  }
}
"#;

fn static_echo(name: &str, tier: &str, env: &str) -> String {
    STATIC_ECHO
        .replace("NAME", name)
        .replace("TIER", tier)
        .replace("ENV", env)
}

async fn create_static(runtime: &Runtime, name: &str, tier: &str, env: &str) -> AgentId {
    runtime
        .create_agent_from_definition(
            &static_echo(name, tier, env),
            Some(static_agents()),
            AgentConfig::default(),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the {tier} agent {name} could not be created ({}): {e}\n\
                 if a tier is missing, run `bash scripts/setup.sh`",
                e.code()
            )
        })
}

/// `MessageSent` audit events (from, to, topic, kind), oldest first.
async fn sent(runtime: &Runtime) -> Vec<(String, String, String, String)> {
    runtime
        .audit_query(&AuditQuery {
            event_type: Some(AuditEventType::MessageSent),
            ..Default::default()
        })
        .await
        .expect("audit query")
        .into_iter()
        .map(|r| {
            let g = |k: &str| r.event.metadata.get(k).cloned().unwrap_or_default();
            (g("from"), g("to"), g("topic"), g("kind"))
        })
        .collect()
}

/// The operator asks the native relay to question `inner` (another tier); the relay's
/// request crosses the bus into `inner`'s sandbox, the reply comes back, and the relay
/// forwards it to the operator on topic `answer`. Checks the answer and the audit trail.
async fn relay_round_trip(h: &Harness, relay: AgentId, inner: AgentId) {
    let operator = h.runtime.operator_id();
    h.runtime
        .send_message(SendRequest {
            from: None,
            to: Some(relay),
            topic: "ask".into(),
            payload: inner.to_string().into_bytes(),
            priority: Priority::Normal,
            ttl: None,
        })
        .await
        .expect("sent");
    let answer = tokio::time::timeout(Duration::from_secs(20), h.runtime.bus().receive(operator))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no answer within 20 s; relay logs: {:#?}\ninner logs: {:#?}\ndead letters: {:#?}",
                h.runtime.agent_logs(relay, 30),
                h.runtime.agent_logs(inner, 30),
                h.runtime.dead_letters()
            )
        })
        .expect("received");
    assert_eq!(answer.message.from, relay);
    assert_eq!(answer.message.topic, "answer");
    // The Rust echo agent replies with the request's payload; an error would come back as
    // its code (e.g. "COMM_004").
    let rejected = h
        .runtime
        .audit_query(&AuditQuery {
            event_type: Some(AuditEventType::MessageRejected),
            ..Default::default()
        })
        .await
        .expect("audit query");
    assert_eq!(
        String::from_utf8_lossy(&answer.message.payload),
        "ping",
        "the reply of the agent in the other tier\nrelay logs: {:#?}\ninner logs: {:#?}\n\
         dead letters: {:#?}\nrejected: {rejected:#?}",
        h.runtime.agent_logs(relay, 30),
        h.runtime.agent_logs(inner, 30),
        h.runtime.dead_letters()
    );
}

/// Both directions between `a` and `b` are in the audit trail, and the trail verifies.
async fn assert_audited_both_ways(runtime: &Runtime, a: AgentId, b: AgentId) {
    let (a, b) = (a.to_string(), b.to_string());
    let events = sent(runtime).await;
    assert!(
        events
            .iter()
            .any(|e| e.0 == a && e.1 == b && e.2 == "question" && e.3 == "Request"),
        "the request {a} -> {b} is audited as MessageSent: {events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.0 == b && e.1 == a && e.3 == "Reply"),
        "the reply {b} -> {a} is audited as MessageSent: {events:#?}"
    );
    let report = runtime.audit_verify().await.expect("verify runs");
    assert!(report.is_ok(), "{report:?}");
}

fn tier_of(runtime: &Runtime, id: AgentId) -> SecurityTier {
    runtime
        .sandboxes()
        .sandbox(id)
        .expect("a live sandbox")
        .tier()
}

/// A runtime with `tier`, the static echo agent `inner` running in it (named `tier_name` in
/// the DSL, given `boot` to start) and the Python echo agent `relay` running natively.
async fn inner_and_relay(
    tier: SecurityTier,
    tier_name: &str,
    boot: Duration,
) -> (Harness, AgentId, AgentId) {
    let h = harness(&[tier]).await;
    let inner = create_static(&h.runtime, "inner", tier_name, "").await;
    let relay = py_echo(&h.runtime).await;
    wait_state(&h.runtime, inner, AgentState::Running, boot).await;
    wait_state(
        &h.runtime,
        relay,
        AgentState::Running,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(tier_of(&h.runtime, inner), tier);
    (h, inner, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_agent_and_docker_agent_exchange_a_request_and_reply_through_the_bus() {
    let (h, inner, relay) =
        inner_and_relay(SecurityTier::Tier1, "docker", Duration::from_secs(60)).await;
    assert_eq!(tier_of(&h.runtime, relay), SecurityTier::Native);
    relay_round_trip(&h, relay, inner).await;
    // And the other way: a direct message into the container, echoed back by the program.
    h.runtime
        .send_message(SendRequest {
            from: None,
            to: Some(inner),
            topic: "greeting".into(),
            payload: b"from the host".to_vec(),
            priority: Priority::Normal,
            ttl: None,
        })
        .await
        .expect("sent");
    let echoed = tokio::time::timeout(
        Duration::from_secs(10),
        h.runtime.bus().receive(h.runtime.operator_id()),
    )
    .await
    .expect("an echo arrives")
    .expect("received");
    assert_eq!(echoed.message.from, inner);
    assert_eq!(echoed.message.topic, "echo");
    assert_eq!(echoed.message.payload, b"from the host");
    h.runtime.shutdown().await.expect("shutdown");
    assert_audited_both_ways(&h.runtime, relay, inner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_agent_and_microvm_agent_exchange_a_request_and_reply_through_the_bus() {
    let (h, inner, relay) =
        inner_and_relay(SecurityTier::Tier3, "microvm", Duration::from_secs(120)).await;
    relay_round_trip(&h, relay, inner).await;
    h.runtime.shutdown().await.expect("shutdown");
    assert_audited_both_ways(&h.runtime, relay, inner).await;
}

// ---- chaos per tier -----------------------------------------------------------------------

/// How long each task of the chaos agents works before it answers.
const TASK_MS: u64 = 3000;

/// Submits a task to `id` and waits until it runs; returns its id.
async fn running_task(runtime: &Runtime, id: AgentId) -> TaskId {
    let receipt = runtime
        .submit_task(TaskRequest {
            agent_id: Some(id),
            input: b"job".to_vec(),
            retry_count: 3,
            ..Default::default()
        })
        .await
        .expect("queued");
    eventually("the task runs", Duration::from_secs(20), || {
        (runtime.task(receipt.task_id).ok()?.status == TaskStatus::Running).then_some(())
    })
    .await;
    receipt.task_id
}

/// A runtime with `tier` and a static echo agent `worker` in it (named `tier_name` in the DSL,
/// given `boot` to start) whose tasks take [`TASK_MS`], with one task running. Returns the
/// harness, the agent, the task and the id of the agent's sandbox.
async fn worker_mid_task(
    tier: SecurityTier,
    tier_name: &str,
    boot: Duration,
) -> (Harness, AgentId, TaskId, String) {
    let h = harness(&[tier]).await;
    let env = format!("env ECHO_TASK_DELAY_MS = \"{TASK_MS}\"");
    let id = create_static(&h.runtime, "worker", tier_name, &env).await;
    wait_state(&h.runtime, id, AgentState::Running, boot).await;
    let task = running_task(&h.runtime, id).await;
    let first = h
        .runtime
        .sandboxes()
        .sandbox(id)
        .expect("a live sandbox")
        .id()
        .to_string();
    (h, id, task, first)
}

/// After the sandbox `first` of `id` was killed mid-task: the task completes on a retry in
/// a fresh sandbox of the same tier and the agent runs again.
async fn assert_recovered(
    runtime: &Runtime,
    id: AgentId,
    task: TaskId,
    first: &str,
    tier: SecurityTier,
    within: Duration,
) -> String {
    let t0 = Instant::now();
    let record = match tokio::time::timeout(within, runtime.wait_task(task)).await {
        Ok(r) => r.expect("record"),
        Err(_) => {
            let t = runtime.task(task).expect("task");
            let a = runtime.agent_status(id).expect("agent");
            panic!(
                "task did not finish: {:?} attempts {} error {:?}\nagent: {:?} restarts {} reason {:?}\nlogs: {:#?}",
                t.status, t.attempts, t.last_error, a.state, a.restart_count, a.failure_reason,
                runtime.agent_logs(id, 40).expect("logs").into_iter().map(|l| l.line).collect::<Vec<_>>()
            )
        }
    };
    eprintln!(
        "task finished {:?} after the kill (attempts {})",
        t0.elapsed(),
        record.attempts
    );
    assert_eq!(record.status, TaskStatus::Completed, "{record:?}");
    assert_eq!(record.output, b"JOB");
    assert!(record.attempts >= 2, "retried: {record:?}");
    let status = runtime.agent_status(id).expect("status");
    assert!(status.restart_count >= 1, "restarted: {status:?}");
    assert_eq!(status.state, AgentState::Running, "{status:?}");
    let second = runtime.sandboxes().sandbox(id).expect("a new sandbox");
    assert_ne!(second.id(), first, "a fresh sandbox");
    assert_eq!(second.tier(), tier, "restarted in its own tier");
    second.id().to_string()
}

fn docker(args: &[&str]) -> std::process::Output {
    std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker CLI: {e}; run `bash scripts/setup.sh`"))
}

/// The names of running containers labelled with `sandbox` (the sandbox id).
fn containers_of(sandbox: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=io.symbiont.sandbox={sandbox}"),
        "--format",
        "{{.Names}} {{.State}}",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_docker_agents_container_mid_task_restarts_it_and_retries_the_task() {
    let (h, id, task, first) =
        worker_mid_task(SecurityTier::Tier1, "docker", Duration::from_secs(60)).await;
    assert_eq!(
        containers_of(&first),
        vec![format!("{first} running")],
        "the container runs"
    );
    // Chaos from outside the runtime: dockerd kills the container.
    let out = docker(&["kill", "--signal", "KILL", &first]);
    assert!(
        out.status.success(),
        "docker kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = assert_recovered(
        &h.runtime,
        id,
        task,
        &first,
        SecurityTier::Tier1,
        Duration::from_secs(60),
    )
    .await;
    eventually(
        "the killed container is removed",
        Duration::from_secs(10),
        || containers_of(&first).is_empty().then_some(()),
    )
    .await;
    h.runtime.shutdown().await.expect("shutdown");
    eventually(
        "the second container is removed at shutdown",
        Duration::from_secs(10),
        || containers_of(&second).is_empty().then_some(()),
    )
    .await;
}

/// The pids of QEMU processes whose command line names `sandbox`.
fn qemu_of(sandbox: &str) -> Vec<i32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", sandbox])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("qemu"))
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_microvm_agents_vm_mid_task_restarts_it_and_retries_the_task() {
    let (h, id, task, first) =
        worker_mid_task(SecurityTier::Tier3, "microvm", Duration::from_secs(120)).await;
    let pids = qemu_of(&first);
    assert_eq!(pids.len(), 1, "one QEMU process for {first}: {pids:?}");
    // Chaos from outside the runtime: the VM's QEMU process dies.
    // SAFETY: kill(2) on a pid we just found; no memory is involved.
    let rc = unsafe { libc::kill(pids[0], libc::SIGKILL) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let second = assert_recovered(
        &h.runtime,
        id,
        task,
        &first,
        SecurityTier::Tier3,
        Duration::from_secs(150),
    )
    .await;
    assert!(qemu_of(&first).is_empty(), "the killed VM is gone");
    h.runtime.shutdown().await.expect("shutdown");
    assert!(qemu_of(&second).is_empty(), "no VM left after shutdown");
}
