//! End-to-end tests of the composed [`Runtime`] on the native tier: definitions become real
//! sandboxes, tasks and messages reach the programs, policies and audit act.

mod e2e;

use std::time::Duration;

use symbiont_runtime::runtime::{SendRequest, TaskRequest};
use symbiont_runtime::scheduler::TaskStatus;
use symbiont_runtime::*;

use e2e::*;

const PY_ECHO: &str = r#"
agent echo {
  run ["/usr/bin/python3", "/workspace/echo_agent.py"]
  file "echo_agent.py" from "echo_agent.py"
  policy {
    allow send to any
    allow receive from any
  }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_agent_answers_a_task_from_inside_its_native_sandbox() {
    let h = native().await;
    let id = h
        .runtime
        .create_agent_from_definition(
            PY_ECHO,
            Some(repo().join("examples/agents")),
            AgentConfig::default(),
        )
        .await
        .expect("agent created");
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
    let id = h
        .runtime
        .create_agent_from_definition(
            PY_ECHO,
            Some(repo().join("examples/agents")),
            AgentConfig::default(),
        )
        .await
        .expect("agent created");
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
    h.runtime.shutdown().await.expect("shutdown");
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
