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
