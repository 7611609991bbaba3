//! The seed's integration tests (`cargo test --test integration_tests`): the composed
//! [`Runtime`] end to end on the native tier. Definitions become real sandboxes, tasks and
//! messages reach the programs, policies and the audit trail act, faults are recovered.

mod e2e;

use std::time::Duration;

use symbiont_runtime::runtime::{SendRequest, TaskRequest};
use symbiont_runtime::scheduler::TaskStatus;
use symbiont_runtime::*;

use e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_agent_answers_a_task_from_inside_its_native_sandbox() {
    let h = native().await;
    let id = py_echo(&h.runtime).await;
    wait_state(&h.runtime, id, AgentState::Running, Duration::from_secs(10)).await;
    let status = h.runtime.agent_status(id).expect("status");
    assert!(status.sandbox_id.is_some(), "{status:?}");
    let receipt = h
        .runtime
        .submit_task(TaskRequest {
            agent_id: Some(id),
            input: b"hello sandbox".to_vec(),
            ..Default::default()
        })
        .await
        .expect("task queued");
    let record = tokio::time::timeout(
        Duration::from_secs(20),
        h.runtime.wait_task(receipt.task_id),
    )
    .await
    .expect("task finishes")
    .expect("task record");
    assert_eq!(record.status, TaskStatus::Completed, "{record:?}");
    assert_eq!(record.output, b"HELLO SANDBOX");
    h.runtime.shutdown().await.expect("shutdown");
    let report = h.runtime.audit_verify().await.expect("verify runs");
    assert!(report.is_ok(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_a_persistent_program_and_its_answer_comes_back() {
    let h = native().await;
    let id = py_echo(&h.runtime).await;
    wait_state(&h.runtime, id, AgentState::Running, Duration::from_secs(10)).await;
    // The echo agent answers a direct message with "echo:<payload>" to the sender.
    let operator = h.runtime.operator_id();
    h.runtime
        .send_message(SendRequest {
            from: None,
            to: Some(id),
            topic: "greeting".into(),
            payload: b"hi".to_vec(),
            priority: Priority::Normal,
            ttl: None,
        })
        .await
        .expect("sent");
    let echoed = tokio::time::timeout(Duration::from_secs(10), h.runtime.bus().receive(operator))
        .await
        .expect("an answer arrives")
        .expect("received");
    assert_eq!(echoed.message.payload, b"echo:hi");
    assert_eq!(echoed.message.from, id);
    assert_eq!(echoed.message.topic, "echo");
    h.runtime.shutdown().await.expect("shutdown");
}

/// Creates an agent from `examples/agents/NAME.agent`.
async fn example(runtime: &symbiont_runtime::runtime::Runtime, name: &str) -> AgentId {
    let dir = repo().join("examples/agents");
    let source =
        std::fs::read_to_string(dir.join(format!("{name}.agent"))).expect("example exists");
    runtime
        .create_agent_from_definition(&source, Some(dir), AgentConfig::default())
        .await
        .unwrap_or_else(|e| panic!("example {name} starts: {e} ({})", e.code()))
}

/// Asks the reporter for its report (a request on `report-request`; the reply comes back on
/// `report`).
async fn ask_report(runtime: &symbiont_runtime::runtime::Runtime, reporter: AgentId) -> String {
    let reply = runtime
        .bus()
        .request_with_timeout(
            symbiont_runtime::communication::Message {
                id: MessageId::new(),
                from: runtime.operator_id(),
                to: reporter,
                topic: "report-request".into(),
                payload: b"{}".to_vec(),
                priority: Priority::Normal,
                ttl: Duration::from_secs(30),
            },
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| {
            let tasks: Vec<_> = runtime
                .list_tasks()
                .into_iter()
                .map(|t| (t.status, t.last_error, String::from_utf8_lossy(&t.payload).to_string(), String::from_utf8_lossy(&t.output).to_string()))
                .collect();
            let all: Vec<_> = runtime.list_agents().into_iter().map(|a| (a.name.clone(), runtime.agent_logs(a.id, 30))).collect();
            panic!(
                "the reporter did not answer: {e}\ntasks: {tasks:#?}\nlogs: {all:#?}\ndead letters: {:#?}",
                runtime.dead_letters()
            )
        });
    let doc: serde_json::Value = serde_json::from_slice(&reply.message.payload).expect("json");
    doc["report"].as_str().expect("a report").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_pipeline_turns_inbox_files_into_a_report_across_three_sandboxes() {
    let h = native().await;
    let reporter = example(&h.runtime, "reporter").await;
    let summarizer = example(&h.runtime, "summarizer").await;
    let collector = example(&h.runtime, "collector").await;
    for id in [reporter, summarizer, collector] {
        wait_state(&h.runtime, id, AgentState::Running, Duration::from_secs(15)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let report = loop {
        let report = ask_report(&h.runtime, reporter).await;
        if report.contains("2 document(s)") {
            break report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no full report yet: {report}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(report.contains("| meeting.txt |"), "{report}");
    assert!(report.contains("| release-notes.txt |"), "{report}");
    // Every hop was signed, encrypted and audited; the trail verifies.
    tracing::info!("TEST: shutting down");
    tokio::time::timeout(Duration::from_secs(30), h.runtime.shutdown())
        .await
        .expect("shutdown finishes")
        .expect("shutdown");
    let sent = h
        .runtime
        .audit_query(&symbiont_runtime::integrations::audit_trail::AuditQuery {
            event_type: Some(
                symbiont_runtime::integrations::audit_trail::AuditEventType::MessageSent,
            ),
            ..Default::default()
        })
        .await
        .expect("query");
    assert!(
        sent.len() >= 4,
        "documents, summaries and the report were sent: {}",
        sent.len()
    );
    assert!(h.runtime.audit_verify().await.expect("verify").is_ok());
}

/// Creates an agent from definition text whose `file ... from` paths are relative to
/// `examples/agents/` (for `programs/frames.py`).
async fn define(
    runtime: &symbiont_runtime::runtime::Runtime,
    source: &str,
) -> Result<AgentId, RuntimeError> {
    runtime
        .create_agent_from_definition(
            source,
            Some(repo().join("examples/agents")),
            AgentConfig::default(),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_the_policy_denies_is_refused_with_sec_001_and_audited() {
    let h = native().await;
    let id = define(
        &h.runtime,
        r#"
agent talker {
  run ["/usr/bin/python3", "/workspace/talker.py"]
  file "frames.py" from "programs/frames.py"
  file "talker.py" = """
      import json, sys, uuid
      from frames import read_frame, write_frame, b64
      read_frame()
      for topic in ["allowed", "forbidden"]:
          write_frame({"type": "publish", "id": str(uuid.uuid4()), "topic": topic, "payload": b64(b"x")})
      while True:
          frame = read_frame()
          if frame is None:
              break
          print(json.dumps(frame), file=sys.stderr, flush=True)
      """
  policy {
    allow send to topic "allowed"
    audit all
  }
}
"#,
    )
    .await
    .expect("created");
    let refused = eventually(
        "the refusal reaches the program",
        Duration::from_secs(10),
        || {
            h.runtime
                .agent_logs(id, 50)
                .ok()?
                .into_iter()
                .find(|l| l.line.contains("\"type\": \"error\"") && l.line.contains("SEC_001"))
        },
    )
    .await;
    assert!(refused.line.contains("forbidden"), "{refused:?}");
    let logs = h.runtime.agent_logs(id, 50).expect("logs");
    assert!(
        logs.iter().any(|l| l.line.contains("\"type\": \"ack\"")),
        "the allowed publish was acknowledged: {logs:?}"
    );
    h.runtime.shutdown().await.expect("shutdown");
    let rejected = h
        .runtime
        .audit_query(&symbiont_runtime::integrations::audit_trail::AuditQuery {
            agent: Some(id),
            event_type: Some(
                symbiont_runtime::integrations::audit_trail::AuditEventType::MessageRejected,
            ),
            ..Default::default()
        })
        .await
        .expect("query");
    assert!(
        rejected.iter().any(|r| format!("{r:?}").contains("policy")),
        "the denial is in the audit trail: {rejected:?}"
    );
}

const NET_PROBE: &str = r#"
agent PROBE_NAME {
  run ["/usr/bin/python3", "/workspace/probe.py"]
  CAPS
  file "frames.py" from "programs/frames.py"
  file "probe.py" = """
      import os, socket
      from frames import serve
      def probe(doc, handler):
          host = os.environ.get("SYMBIONT_HOST_ADDR", "127.0.0.1")
          try:
              s = socket.create_connection((host, int(doc["port"])), timeout=3)
              return [{"connected": True, "data": s.recv(16).decode()}]
          except OSError as e:
              return [{"connected": False, "error": str(e)}]
      serve({"task": probe})
      """
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_the_network_capability_cannot_connect_and_one_with_it_can() {
    let h = native().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"pong").await;
        }
    });
    let closed = define(
        &h.runtime,
        &NET_PROBE
            .replace("PROBE_NAME", "closed")
            .replace("CAPS", ""),
    )
    .await
    .expect("created");
    let open = define(
        &h.runtime,
        &NET_PROBE
            .replace("PROBE_NAME", "open")
            .replace("CAPS", "capabilities [network]"),
    )
    .await
    .expect("created");
    let mut results = Vec::new();
    for id in [closed, open] {
        let receipt = h
            .runtime
            .submit_task(TaskRequest {
                agent_id: Some(id),
                input: format!("{{\"port\": {port}}}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("queued");
        let record = h.runtime.wait_task(receipt.task_id).await.expect("done");
        assert_eq!(record.status, TaskStatus::Completed, "{record:?}");
        let out: serde_json::Value = serde_json::from_slice(&record.output).expect("json");
        results.push(out);
    }
    assert_eq!(results[0]["connected"], false, "no network: {}", results[0]);
    assert_eq!(results[1]["connected"], true, "network: {}", results[1]);
    assert_eq!(results[1]["data"], "pong");
    h.runtime.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_handler_fires_on_its_schedule_and_its_output_is_published() {
    let h = native().await;
    let operator = h.runtime.operator_id();
    h.runtime
        .bus()
        .subscribe(operator, "ticks")
        .await
        .expect("subscribe");
    define(
        &h.runtime,
        r#"
agent ticker {
  run ["/usr/bin/python3", "/workspace/tick.py"]
  file "frames.py" from "programs/frames.py"
  file "tick.py" = """
      from frames import serve
      count = 0
      def tick(doc, handler):
          global count
          count += 1
          return [{"tick": count, "handler": handler["name"]}]
      serve({"schedule": tick})
      """
  on schedule "* * * * * *" as every-second send "ticks"
  policy { allow send to topic "ticks" }
}
"#,
    )
    .await
    .expect("created");
    let mut ticks = Vec::new();
    while ticks.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(10), h.runtime.bus().receive(operator))
            .await
            .expect("a tick within 10 s")
            .expect("received");
        let doc: serde_json::Value = serde_json::from_slice(&m.message.payload).expect("json");
        assert_eq!(doc["handler"], "every-second");
        ticks.push(doc["tick"].as_u64().expect("count"));
    }
    assert_eq!(ticks, [1, 2]);
    h.runtime.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_definition_leaves_the_agent_failed_with_the_diagnostics() {
    let h = native().await;
    let config = AgentConfig {
        name: "broken".into(),
        dsl_source: "agent broken {\n  run [\"/bin/true\"]\n  capabilities [netwrok]\n}\n".into(),
        ..Default::default()
    };
    let id = config.id;
    let err = h.runtime.create_agent(config).await.expect_err("refused");
    assert_eq!(err.code(), "AGENT_005", "{err}");
    let status = h.runtime.agent_status(id).expect("status");
    assert_eq!(status.state, AgentState::Failed);
    let reason = status.failure_reason.expect("reason");
    assert!(
        reason.contains("DSL_001") && reason.contains("netwrok") && reason.contains("did you mean"),
        "{reason}"
    );
    h.runtime.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_running_agent_mid_task_restarts_it_and_retries_the_task() {
    let h = native().await;
    let id = define(
        &h.runtime,
        r#"
agent worker {
  run ["/usr/bin/python3", "/workspace/work.py"]
  file "frames.py" from "programs/frames.py"
  file "work.py" = """
      import time
      from frames import serve
      def work(doc, handler):
          time.sleep(4)
          return [{"done": doc}]
      serve({"task": work})
      """
}
"#,
    )
    .await
    .expect("created");
    wait_state(&h.runtime, id, AgentState::Running, Duration::from_secs(10)).await;
    let receipt = h
        .runtime
        .submit_task(TaskRequest {
            agent_id: Some(id),
            input: b"\"job\"".to_vec(),
            retry_count: 3,
            ..Default::default()
        })
        .await
        .expect("queued");
    eventually("the task runs", Duration::from_secs(10), || {
        (h.runtime.task(receipt.task_id).ok()?.status == TaskStatus::Running).then_some(())
    })
    .await;
    // Chaos: the agent's whole sandbox dies mid-task.
    let sandbox = h.runtime.sandboxes().sandbox(id).expect("a live sandbox");
    let first = sandbox.id().to_string();
    sandbox.kill().await.expect("kill");
    let record = match tokio::time::timeout(
        Duration::from_secs(30),
        h.runtime.wait_task(receipt.task_id),
    )
    .await
    {
        Ok(r) => r.expect("record"),
        Err(_) => {
            let t = h.runtime.task(receipt.task_id).expect("task");
            let a = h.runtime.agent_status(id).expect("agent");
            panic!(
                "task did not finish: {:?} attempts {} error {:?}\nagent: {:?} restarts {} reason {:?}\nlogs: {:#?}",
                t.status, t.attempts, t.last_error, a.state, a.restart_count, a.failure_reason,
                h.runtime.agent_logs(id, 40).expect("logs").into_iter().map(|l| l.line).collect::<Vec<_>>()
            )
        }
    };
    assert_eq!(record.status, TaskStatus::Completed, "{record:?}");
    assert!(record.attempts >= 2, "retried: {record:?}");
    let status = h.runtime.agent_status(id).expect("status");
    assert!(status.restart_count >= 1, "restarted: {status:?}");
    assert_eq!(status.state, AgentState::Running, "{status:?}");
    let second = h.runtime.sandboxes().sandbox(id).expect("a new sandbox");
    assert_ne!(second.id(), first, "a fresh sandbox");
    h.runtime.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_agent_opens_its_breaker_and_ends_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.error_handler.max_recovery_attempts = 3;
    let runtime = native_runtime(cfg).await;
    let config = AgentConfig {
        name: "crashy".into(),
        dsl_source: "agent crashy { run [\"/bin/sh\", \"-c\", \"exit 3\"] }".into(),
        ..Default::default()
    };
    let id = config.id;
    let _ = runtime.create_agent(config).await;
    let status = eventually("the agent gives up", Duration::from_secs(90), || {
        let s = runtime.agent_status(id).ok()?;
        (s.state == AgentState::Failed && s.restart_count >= 3).then_some(s)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = runtime.agent_status(id).expect("status");
    assert_eq!(later.state, AgentState::Failed, "stays Failed: {later:?}");
    assert_eq!(
        later.restart_count, status.restart_count,
        "no more restarts"
    );
    assert!(later.failure_reason.is_some(), "{later:?}");
    runtime.shutdown().await.expect("shutdown");
    let actions = runtime
        .audit_query(&symbiont_runtime::integrations::audit_trail::AuditQuery {
            agent: Some(id),
            event_type: Some(
                symbiont_runtime::integrations::audit_trail::AuditEventType::RecoveryAction,
            ),
            ..Default::default()
        })
        .await
        .expect("query");
    assert!(
        actions.len() >= 3,
        "every decision audited: {}",
        actions.len()
    );
}
