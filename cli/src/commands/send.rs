//! `symbiont send` and `symbiont dead-letters`.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Args;

use super::Context;
use crate::api::{DeadLetterList, MessageReceipt, SendMessageRequest};
use crate::output::{print_json, print_table, table};

/// `symbiont send`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The recipient agent; without it the message is published on `--topic`.
    #[arg(long, value_name = "ID", required_unless_present = "topic")]
    pub to: Option<String>,
    /// The topic (default with `--to`: `message`).
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// The payload text.
    #[arg(long, value_name = "TEXT")]
    pub payload: String,
    /// low, normal, high or critical.
    #[arg(long)]
    pub priority: Option<String>,
    /// Time to live, e.g. 30s.
    #[arg(long)]
    pub ttl: Option<String>,
}

/// Sends one message.
pub async fn run(args: SendArgs, ctx: &Context) -> Result<ExitCode> {
    let client = ctx.client()?;
    let to = args
        .to
        .as_deref()
        .map(|t| uuid::Uuid::parse_str(t).with_context(|| format!("`{t}` is not an agent id")))
        .transpose()?;
    let receipt: MessageReceipt = client
        .post(
            "/v1/messages",
            &SendMessageRequest {
                to,
                topic: args.topic.unwrap_or_else(|| "message".into()),
                payload: Some(args.payload),
                payload_base64: None,
                priority: args.priority,
                ttl: args.ttl,
            },
        )
        .await?;
    if ctx.json {
        print_json(&receipt)?;
    } else {
        println!("message {} accepted", receipt.message_id);
    }
    Ok(ExitCode::SUCCESS)
}

/// Lists dead letters.
pub async fn dead_letters(ctx: &Context) -> Result<ExitCode> {
    let list: DeadLetterList = ctx.client()?.get("/v1/messages/dead-letters").await?;
    if ctx.json {
        print_json(&list)?;
    } else {
        let mut t = table(&["message", "from", "to", "topic", "size", "reason", "at"]);
        for d in &list.dead_letters {
            t.add_row(vec![
                d.message_id.to_string(),
                d.from.to_string(),
                d.to.to_string(),
                d.topic.clone(),
                d.size.to_string(),
                d.reason.clone(),
                d.at.clone(),
            ]);
        }
        print_table(&t);
    }
    Ok(ExitCode::SUCCESS)
}
