//! An example agent program using the SDK: echoes every message back to its sender on topic
//! `echo`, answers requests with the same payload, and completes tasks by returning their
//! input upper-cased. Run it under the runtime's bridge (it speaks frames on stdin/stdout).

use symbiont_agent::{Agent, DeliveryKind, Incoming};

fn main() -> Result<(), symbiont_agent::FrameError> {
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
