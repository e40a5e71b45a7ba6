//! `maos task …`: submit, list, show, cancel, retry, results and watch.

use std::time::Duration;

use anyhow::Context;
use maos_client::proto::v1::{ListTasksRequest, SubmitTaskRequest, TaskEvent, TaskState, TaskView};
use maos_client::views::state_name;
use maos_client::{Client, ClientError};

use super::args::TaskCommand;
use super::output::{event_json, event_line, print_task, print_tasks};
use super::progress::Progress;
use super::{client, TaskEnded};

/// `maos task …`.
pub async fn run(command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Submit {
            task_type,
            description,
            input,
            priority,
            depends_on,
            timeout,
            max_retries,
            max_agents,
            plan,
            idempotency_key,
            wait,
            target,
        } => {
            let request = submit_request(
                task_type,
                description,
                input,
                &priority,
                depends_on,
                timeout,
                max_retries,
                max_agents,
                plan,
                idempotency_key,
            )?;
            let client = client(&target)?;
            let answer = client.submit(request).await?;
            if target.json {
                println!("{}", serde_json::json!({"task_id": answer.task_id, "duplicate": answer.duplicate}));
            } else if answer.duplicate {
                println!("{} (already submitted with this idempotency key)", answer.task_id);
            } else {
                println!("{}", answer.task_id);
            }
            if wait {
                let last = watch(&client, &answer.task_id, true, target.json).await?;
                if !target.json {
                    println!("{}", last.result);
                }
            }
            Ok(())
        }
        TaskCommand::List { state, task_type, parent, limit, target } => {
            let request = ListTasksRequest {
                states: state,
                task_type: task_type.unwrap_or_default(),
                parent: parent.unwrap_or_default(),
                ..Default::default()
            };
            let tasks = list_all(&client(&target)?, request, limit.max(1)).await?;
            print_tasks(&tasks, target.json);
            Ok(())
        }
        TaskCommand::Show { task_id, target } => {
            print_task(&client(&target)?.task(&task_id).await?, target.json);
            Ok(())
        }
        TaskCommand::Cancel { task_id, reason, target } => {
            let cancelled = client(&target)?.cancel(&task_id, &reason).await?;
            if target.json {
                println!("{}", serde_json::json!({"cancelled": cancelled}));
            } else {
                println!("cancelled {} task(s): {}", cancelled.len(), cancelled.join(", "));
            }
            Ok(())
        }
        TaskCommand::Retry { task_id, target } => {
            print_task(&client(&target)?.retry(&task_id).await?, target.json);
            Ok(())
        }
        TaskCommand::Results { task_id, target } => {
            let results = client(&target)?.results(&task_id).await?;
            if target.json {
                let children: Vec<_> = results
                    .children
                    .iter()
                    .map(|c| {
                        serde_json::json!({"task_id": c.task_id, "plan_key": c.plan_key,
                        "state": state_name(c.state), "result": c.result, "cause": c.cause})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"task_id": results.task_id, "state": state_name(results.state),
                        "result": results.result, "cause": results.cause, "children": children})
                );
            } else {
                println!("{} {}", results.task_id, state_name(results.state));
                for child in &results.children {
                    println!("  {:<16} {:<10} {}", child.plan_key, state_name(child.state), child.result);
                }
                println!("{}", if results.result.is_empty() { &results.cause } else { &results.result });
            }
            Ok(())
        }
        TaskCommand::Watch { task_id, children, target } => {
            watch(&client(&target)?, &task_id, children, target.json).await.map(|_| ())
        }
    }
}

/// Watch `task_id` until it finishes; a FAILED or CANCELLED end is an error (exit code 7).
pub async fn watch(client: &Client, task_id: &str, children: bool, json: bool) -> anyhow::Result<TaskEvent> {
    /// Reconnects after the serving node went away, at most.
    const RECONNECTS_MAX: usize = 30;
    let mut reconnects = 0;
    let mut stream = client.watch(task_id, children).await?;
    let progress = Progress::new(json);
    progress.set_message(format!("watching task {task_id}"));
    // A workflow's bar counts its subtasks: each one seen, and whether it has ended.
    let mut subtasks: std::collections::BTreeMap<String, bool> = Default::default();
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if json {
                    println!("{}", event_json(&event));
                } else {
                    progress.println(event_line(&event, task_id));
                }
                let ended = [TaskState::Completed, TaskState::Failed, TaskState::Cancelled]
                    .iter()
                    .any(|s| *s as i32 == event.state);
                if event.task_id == task_id {
                    progress.set_message(format!("task {}", state_name(event.state)));
                    if subtasks.is_empty() {
                        progress.set_progress(u64::from(event.progress_percent.min(100)), 100, "%");
                    }
                } else {
                    subtasks.insert(event.task_id.clone(), ended);
                    let done = subtasks.values().filter(|ended| **ended).count() as u64;
                    progress.set_progress(done, subtasks.len() as u64, "subtasks ended");
                }
                if event.finished {
                    progress.finish();
                    if event.state != TaskState::Completed as i32 {
                        return Err(TaskEnded {
                            task_id: task_id.into(),
                            state: state_name(event.state),
                            cause: event.cause,
                        }
                        .into());
                    }
                    return Ok(event);
                }
            }
            Ok(None) => anyhow::bail!("the watch ended before task {task_id} finished"),
            // The node serving the watch went away: continue from another one.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                reconnects += 1;
                if reconnects > RECONNECTS_MAX {
                    return Err(ClientError::Server(status).into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                stream = client.watch(task_id, children).await?;
            }
            Err(status) => return Err(ClientError::Server(status).into()),
        }
    }
}

/// Every task matching `request`, page by page, up to `limit`.
pub async fn list_all(client: &Client, mut request: ListTasksRequest, limit: usize) -> anyhow::Result<Vec<TaskView>> {
    let mut tasks = Vec::new();
    loop {
        request.page_size = (limit - tasks.len()).min(1_000) as u32;
        let page = client.list_tasks(request.clone()).await?;
        tasks.extend(page.tasks);
        if page.next_page_token.is_empty() || tasks.len() >= limit {
            return Ok(tasks);
        }
        request.page_token = page.next_page_token;
    }
}

/// A submit request from the command line's pieces.
#[allow(clippy::too_many_arguments)]
pub fn submit_request(
    task_type: String,
    description: String,
    input: Option<String>,
    priority: &str,
    depends_on: Vec<String>,
    timeout_s: Option<u64>,
    max_retries: u32,
    max_agents: Option<u32>,
    plan: bool,
    idempotency_key: Option<String>,
) -> anyhow::Result<SubmitTaskRequest> {
    let priority = match priority.to_ascii_lowercase().as_str() {
        "low" => 1,
        "normal" => 2,
        "high" => 3,
        "critical" => 4,
        other => anyhow::bail!("--priority {other:?} is not one of low, normal, high, critical"),
    };
    let input = match input {
        Some(text) if text.starts_with('@') => {
            let path = &text[1..];
            std::fs::read_to_string(path).with_context(|| format!("--input @{path}: cannot read the file"))?
        }
        Some(text) => text,
        None => String::new(),
    };
    Ok(SubmitTaskRequest {
        task_type,
        priority,
        description,
        input,
        depends_on,
        max_retries,
        timeout_ms: timeout_s.map(|s| s.saturating_mul(1_000)).unwrap_or(0),
        idempotency_key: idempotency_key.unwrap_or_default(),
        plan,
        max_agents: max_agents.unwrap_or(0),
        ..Default::default()
    })
}
