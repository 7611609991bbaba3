//! An example agent program using the SDK: echoes every message back to its sender on topic
//! `echo`, answers requests with the same payload, and completes tasks by returning their
//! input upper-cased. Run it under the runtime's bridge (it speaks frames on stdin/stdout).
//!
//! `ECHO_TASK_DELAY_MS=N` (optional) makes it work N milliseconds on each task before it
//! answers, so tests can act while a task is still running (e.g. kill the sandbox mid-task).
//!
//! `scripts/setup.d/40-static-agents.sh` builds it statically (no libc needed at run time)
//! for the container and microVM tiers, whose images have no Python.

use std::time::Duration;

use symbiont_agent::{Agent, DeliveryKind, Incoming};

fn main() -> Result<(), symbiont_agent::FrameError> {
    let task_delay = std::env::var("ECHO_TASK_DELAY_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    let mut agent = Agent::stdio()?;
    let me = agent.id().to_string();
    agent.log("info", &format!("echo agent {me} ready"))?;
    agent.subscribe("broadcast")?;
    while let Some(event) = agent.next_event()? {
        match event {
            Incoming::Message {
                message,
                kind: DeliveryKind::Request,
                ..
            } => {
                agent.reply(&message.id, &message.payload)?;
            }
            Incoming::Message { message, .. } => {
                agent.send(&message.from, "echo", &message.payload)?;
            }
            Incoming::Task { task_id, input, .. } => {
                if let Some(delay) = task_delay {
                    agent.log("info", &format!("task {task_id}: working {delay:?}"))?;
                    std::thread::sleep(delay);
                }
                agent.task_result(&task_id, true, &input.to_ascii_uppercase(), None)?;
            }
            Incoming::Error { code, message, .. } => {
                eprintln!("runtime error {code}: {message}");
            }
            Incoming::Ack { .. } => {}
        }
        agent.heartbeat()?;
    }
    Ok(())
}
