//! `symbiont task submit|status|cancel|list`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use super::Context;
use crate::api::{b64, SubmitTaskRequest, TaskList, TaskReceiptView, TaskView};
use crate::client::Client;
use crate::output::{print_json, print_table, spinner, table};

/// `symbiont task ...`
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Queue a task for an agent (durable once acknowledged).
    Submit(SubmitArgs),
    /// A task's status and output.
    Status(StatusArgs),
    /// Cancel a task (a running execution is killed).
    Cancel(IdArg),
    /// List tasks.
    List(ListArgs),
}

/// `symbiont task submit`
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The agent to run it.
    #[arg(long, value_name = "ID", required_unless_present = "group")]
    pub agent: Option<String>,
    /// Or a group of replicas.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// The input text.
    #[arg(long, value_name = "TEXT", conflicts_with = "input_file")]
    pub input: Option<String>,
    /// Read the input from a file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    /// low, normal, high or critical.
    #[arg(long)]
    pub priority: Option<String>,
    /// Timeout, e.g. 30s.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Retries after a failure.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// A key making the submission idempotent.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait for the task to finish and print its output (exit 1 unless it completed).
    #[arg(long)]
    pub wait: bool,
}

/// `symbiont task status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The task's id.
    pub id: String,
    /// Wait for it to finish.
    #[arg(long)]
    pub wait: bool,
}

/// A task id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The task's id.
    pub id: String,
}

/// `symbiont task list`
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this agent's tasks.
    #[arg(long)]
    pub agent: Option<String>,
    /// Only tasks with this status.
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// Runs one `symbiont task` command.
pub async fn run(cmd: TaskCommand, ctx: &Context) -> Result<ExitCode> {
    let client = ctx.client()?;
    match cmd {
        TaskCommand::Submit(args) => submit(&client, args, ctx).await,
        TaskCommand::Status(args) => {
            let task = if args.wait {
                wait(&client, &args.id, ctx).await?
            } else {
                client.get(&format!("/v1/tasks/{}", args.id)).await?
            };
            show(&task, ctx)?;
            Ok(exit_for(&task, args.wait))
        }
        TaskCommand::Cancel(id) => {
            let task: TaskView = client
                .post_empty(&format!("/v1/tasks/{}/cancel", id.id))
                .await?;
            if ctx.json {
                print_json(&task)?;
            } else {
                println!("task {} is {}", task.id, task.status);
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::List(args) => {
            let mut query = format!("/v1/tasks?limit={}", args.limit);
            if let Some(a) = &args.agent {
                query.push_str(&format!("&agent={a}"));
            }
            if let Some(s) = &args.status {
                query.push_str(&format!("&status={s}"));
            }
            let list: TaskList = client.get(&query).await?;
            if ctx.json {
                print_json(&list)?;
            } else {
                let mut t = table(&["id", "agent", "status", "priority", "attempts", "created"]);
                for task in &list.tasks {
                    t.add_row(vec![
                        task.id.to_string(),
                        task.agent_id.to_string(),
                        task.status.clone(),
                        task.priority.clone(),
                        task.attempts.to_string(),
                        task.created_at.clone(),
                    ]);
                }
                print_table(&t);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn exit_for(task: &TaskView, waited: bool) -> ExitCode {
    if waited && task.status != "completed" {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

async fn submit(client: &Client, args: SubmitArgs, ctx: &Context) -> Result<ExitCode> {
    let input = match (&args.input, &args.input_file) {
        (Some(text), _) => Some(text.clone().into_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context("reading the input from stdin")?;
            Some(buf)
        }
        (None, Some(path)) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        (None, None) => None,
    };
    let (input, input_base64) = match input {
        Some(bytes) => match String::from_utf8(bytes) {
            Ok(text) => (Some(text), None),
            Err(e) => (None, Some(b64(e.as_bytes()))),
        },
        None => (None, None),
    };
    let agent_id = args
        .agent
        .as_deref()
        .map(|a| uuid::Uuid::parse_str(a).with_context(|| format!("`{a}` is not an agent id")))
        .transpose()?;
    let receipt: TaskReceiptView = client
        .post(
            "/v1/tasks",
            &SubmitTaskRequest {
                agent_id,
                group: args.group,
                priority: args.priority,
                input,
                input_base64,
                timeout: args.timeout,
                retry_count: args.retries,
                delay: None,
                idempotency_key: args.idempotency_key,
            },
        )
        .await?;
    if !args.wait {
        if ctx.json {
            print_json(&receipt)?;
        } else if receipt.duplicate {
            println!("task {} (already submitted with this key)", receipt.task_id);
        } else {
            println!("task {} queued", receipt.task_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let task = wait(client, &receipt.task_id.to_string(), ctx).await?;
    show(&task, ctx)?;
    Ok(exit_for(&task, true))
}

/// Long-polls the task until it reaches a final status, under a spinner.
async fn wait(client: &Client, id: &str, ctx: &Context) -> Result<TaskView> {
    let bar = spinner(&format!("task {id}"), ctx.json);
    loop {
        let task: TaskView = client.get(&format!("/v1/tasks/{id}?wait=20s")).await?;
        bar.set_message(format!("task {id} {}", task.status));
        if matches!(
            task.status.as_str(),
            "completed" | "failed" | "timedout" | "cancelled"
        ) {
            bar.finish_and_clear();
            return Ok(task);
        }
    }
}

fn show(task: &TaskView, ctx: &Context) -> Result<()> {
    if ctx.json {
        return print_json(task);
    }
    println!("task {} is {}", task.id, task.status);
    println!("  agent:    {}", task.agent_id);
    println!("  priority: {}", task.priority);
    println!("  attempts: {}", task.attempts);
    if task.recovered {
        println!("  recovered after a daemon restart");
    }
    if let Some(e) = &task.last_error {
        println!("  error:    {e}");
    }
    match (&task.output, task.output_base64.is_empty()) {
        (_, true) => {}
        (Some(text), false) => println!("  output:   {text}"),
        (None, false) => println!("  output (base64): {}", task.output_base64),
    }
    Ok(())
}
