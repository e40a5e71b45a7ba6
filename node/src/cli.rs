//! The `maos` command line's client commands: tasks, agents, health, leadership.
//!
//! Tables by default, `--json` for scripts. Exit codes scripts can rely on ([`exit_code`]):
//! 0 success, 1 other error, 2 bad usage (clap), 3 input refused (INVALID_ARGUMENT /
//! FAILED_PRECONDITION), 4 not found, 5 cluster unavailable or unhealthy, 6 resource exhausted
//! (retry later), 7 the watched or awaited task ended FAILED or CANCELLED.

use std::time::Duration;

use anyhow::Context;
use maos_client::proto::v1::{
    AgentState, AgentView, ListTasksRequest, SubmitTaskRequest, TaskEvent, TaskState, TaskView,
};
use maos_client::{AgentChange, Client, ClientError};

/// Exit codes.
pub const EXIT_REFUSED: u8 = 3;
pub const EXIT_NOT_FOUND: u8 = 4;
pub const EXIT_UNAVAILABLE: u8 = 5;
pub const EXIT_EXHAUSTED: u8 = 6;
pub const EXIT_TASK_FAILED: u8 = 7;

/// A task that ended FAILED or CANCELLED (exit code 7).
#[derive(Debug, thiserror::Error)]
#[error("task {task_id} ended {state}: {cause}")]
pub struct TaskEnded {
    pub task_id: String,
    pub state: &'static str,
    pub cause: String,
}

/// The cluster or a node is not healthy (exit code 5).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unhealthy(pub String);

/// A check that found something to do (exit code 3), such as pending migrations.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The exit code for an error.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Refused>().is_some() {
        return EXIT_REFUSED;
    }
    if let Some(storage) = error.downcast_ref::<crate::storage::StorageError>() {
        return if storage.is_unavailable() { EXIT_UNAVAILABLE } else { 1 };
    }
    if error.downcast_ref::<TaskEnded>().is_some() {
        return EXIT_TASK_FAILED;
    }
    if error.downcast_ref::<Unhealthy>().is_some() {
        return EXIT_UNAVAILABLE;
    }
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::InvalidArgument(_) | ClientError::FailedPrecondition(_)) => EXIT_REFUSED,
        Some(ClientError::NotFound(_)) => EXIT_NOT_FOUND,
        Some(ClientError::Unavailable { .. }) => EXIT_UNAVAILABLE,
        Some(ClientError::ResourceExhausted(_)) => EXIT_EXHAUSTED,
        Some(ClientError::Server(status)) if status.code() == tonic::Code::DeadlineExceeded => EXIT_UNAVAILABLE,
        _ => 1,
    }
}

pub fn state_name(state: i32) -> &'static str {
    match TaskState::try_from(state) {
        Ok(TaskState::Pending) => "PENDING",
        Ok(TaskState::Queued) => "QUEUED",
        Ok(TaskState::Running) => "RUNNING",
        Ok(TaskState::Completed) => "COMPLETED",
        Ok(TaskState::Failed) => "FAILED",
        Ok(TaskState::Cancelled) => "CANCELLED",
        _ => "UNKNOWN",
    }
}

/// A state name from the command line (any case).
pub fn parse_state(text: &str) -> Result<i32, String> {
    let state = match text.to_ascii_uppercase().as_str() {
        "PENDING" => TaskState::Pending,
        "QUEUED" => TaskState::Queued,
        "RUNNING" => TaskState::Running,
        "COMPLETED" => TaskState::Completed,
        "FAILED" => TaskState::Failed,
        "CANCELLED" => TaskState::Cancelled,
        _ => return Err(format!("{text:?} is not one of pending, queued, running, completed, failed, cancelled")),
    };
    Ok(state as i32)
}

fn agent_state_name(state: i32) -> &'static str {
    match AgentState::try_from(state) {
        Ok(AgentState::Idle) => "IDLE",
        Ok(AgentState::Busy) => "BUSY",
        Ok(AgentState::Draining) => "DRAINING",
        Ok(AgentState::Failed) => "FAILED",
        Ok(AgentState::Terminated) => "TERMINATED",
        _ => "UNKNOWN",
    }
}

pub fn task_json(view: &TaskView) -> serde_json::Value {
    serde_json::json!({
        "task_id": view.task_id, "task_type": view.task_type, "state": state_name(view.state),
        "attempt": view.attempt, "max_retries": view.max_retries, "priority": view.priority,
        "node_id": view.node_id, "parent": view.parent, "children": view.children,
        "depends_on": view.depends_on, "submitter": view.submitter, "result": view.result,
        "cause": view.cause, "progress_percent": view.progress_percent,
        "progress_message": view.progress_message, "input_tokens": view.input_tokens,
        "output_tokens": view.output_tokens, "planning": view.planning, "expanded": view.expanded,
    })
}

fn short(text: &str, width: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() <= width {
        flat
    } else {
        let cut: String = flat.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

pub fn print_tasks(views: &[TaskView], json: bool) {
    if json {
        println!("{}", serde_json::Value::Array(views.iter().map(task_json).collect()));
        return;
    }
    println!("{:<38} {:<12} {:<10} {:>7} {:>5}  RESULT / CAUSE", "TASK", "TYPE", "STATE", "ATTEMPT", "NODE");
    for v in views {
        let note = if v.cause.is_empty() || v.state == TaskState::Completed as i32 { &v.result } else { &v.cause };
        let node = if v.node_id > 0 { v.node_id.to_string() } else { "-".into() };
        println!(
            "{:<38} {:<12} {:<10} {:>7} {:>5}  {}",
            v.task_id,
            short(&v.task_type, 12),
            state_name(v.state),
            v.attempt,
            node,
            short(note, 60)
        );
    }
}

pub fn print_task(view: &TaskView, json: bool) {
    if json {
        println!("{}", task_json(view));
        return;
    }
    let rows = [
        ("task", view.task_id.clone()),
        ("type", view.task_type.clone()),
        ("state", state_name(view.state).to_string()),
        ("attempt", format!("{} of at most {}", view.attempt, view.max_retries + 1)),
        ("running on", if view.node_id > 0 { format!("node {} ({})", view.node_id, view.slot) } else { "-".into() }),
        (
            "progress",
            if view.progress_message.is_empty() && view.progress_percent == 0 {
                "-".into()
            } else {
                format!("{}% {}", view.progress_percent, view.progress_message)
            },
        ),
        ("parent", if view.parent.is_empty() { "-".into() } else { view.parent.clone() }),
        ("children", view.children.len().to_string()),
        ("depends on", if view.depends_on.is_empty() { "-".into() } else { view.depends_on.join(", ") }),
        ("submitter", view.submitter.clone()),
        ("tokens", format!("{} in, {} out", view.input_tokens, view.output_tokens)),
        ("cause", if view.cause.is_empty() { "-".into() } else { view.cause.clone() }),
        ("result", if view.result.is_empty() { "-".into() } else { view.result.clone() }),
    ];
    for (name, value) in rows {
        println!("{name:<11} {value}");
    }
}

pub fn print_agents(agents: &[AgentView], json: bool) {
    if json {
        let rows: Vec<_> = agents
            .iter()
            .map(|a| {
                serde_json::json!({"agent_id": a.agent_id, "node_id": a.node_id, "agent_type": a.agent_type,
                    "backend": a.backend, "state": agent_state_name(a.state), "task_id": a.task_id,
                    "capabilities": a.capabilities})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!("{:<28} {:<12} {:<9} {:<11} TASK", "AGENT", "TYPE", "BACKEND", "STATE");
    for a in agents {
        println!(
            "{:<28} {:<12} {:<9} {:<11} {}",
            short(&a.agent_id, 28),
            short(&a.agent_type, 12),
            a.backend,
            agent_state_name(a.state),
            a.task_id
        );
    }
}

/// A one-line progress display of a task's events, redrawn in place on a terminal.
pub fn print_event(event: &TaskEvent, root: &str, json: bool) {
    if json {
        let line = serde_json::json!({"task_id": event.task_id, "state": state_name(event.state),
            "attempt": event.attempt, "node_id": event.node_id, "progress_percent": event.progress_percent,
            "progress_message": event.progress_message, "cause": event.cause, "finished": event.finished});
        println!("{line}");
        return;
    }
    let name = if event.task_id == root {
        "task".to_string()
    } else {
        event.task_id.rsplit('.').next().unwrap_or("").to_string()
    };
    let filled = (event.progress_percent.min(100) / 5) as usize;
    let bar = format!("[{}{}] {:>3}%", "#".repeat(filled), ".".repeat(20 - filled), event.progress_percent.min(100));
    let place = if event.node_id > 0 { format!(" node {}", event.node_id) } else { String::new() };
    println!(
        "{name:<14} {:<10} {bar} attempt {}{place} {}",
        state_name(event.state),
        event.attempt,
        short(&event.progress_message, 40)
    );
}

/// Watch `task_id` until it finishes; a FAILED or CANCELLED end is an error (exit code 7).
pub async fn watch(client: &Client, task_id: &str, children: bool, json: bool) -> anyhow::Result<TaskEvent> {
    /// Reconnects after the serving node went away, at most.
    const RECONNECTS_MAX: usize = 30;
    let mut reconnects = 0;
    let mut stream = client.watch(task_id, children).await?;
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                print_event(&event, task_id, json);
                if event.finished {
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

/// Change an agent and print it.
pub async fn change_agent(client: &Client, agent_id: &str, change: AgentChange, json: bool) -> anyhow::Result<()> {
    let view = client.set_agent(agent_id, change).await?;
    print_agents(&[view], json);
    Ok(())
}

/// `/health` and `/ready` of every endpoint, and with `all_components` the cluster's status; an
/// unhealthy answer is an error (exit code 5).
pub async fn health(endpoints: &[String], all_components: bool, json: bool) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
    let mut rows = Vec::new();
    let mut unhealthy = Vec::new();
    for endpoint in endpoints {
        let base = if endpoint.contains("://") { endpoint.clone() } else { format!("http://{endpoint}") };
        let mut row = serde_json::json!({"endpoint": endpoint});
        for probe in ["health", "ready"] {
            let answer = http.get(format!("{base}/{probe}")).send().await;
            let (ok, detail) = match answer {
                Ok(response) => {
                    let ok = response.status().is_success();
                    (ok, response.text().await.unwrap_or_default().trim().to_string())
                }
                Err(error) => (false, format!("unreachable: {error}")),
            };
            if !ok {
                unhealthy.push(format!("{endpoint} {probe}: {detail}"));
            }
            row[probe] = serde_json::json!({"ok": ok, "detail": detail});
        }
        if all_components {
            let client = Client::new([endpoint.clone()])?.with_deadline(Duration::from_secs(3));
            match client.status_of(0, false).await {
                Ok(status) => {
                    let tasks = status.tasks.unwrap_or_default();
                    row["raft"] = serde_json::json!({"node_id": status.node_id, "role": status.role,
                        "term": status.current_term, "leader_id": status.leader_id,
                        "applied": status.last_applied_index, "members": status.members.len()});
                    row["tasks"] = serde_json::json!({"queued": tasks.queued, "running": tasks.running,
                        "pending": tasks.pending, "queue_limit": tasks.queue_limit});
                }
                Err(error) => row["raft"] = serde_json::json!({"error": error.to_string()}),
            }
            // The task-data store, from the node's metrics (readiness above says whether it answers).
            match http.get(format!("{base}/metrics")).send().await {
                Ok(response) => {
                    let text = response.text().await.unwrap_or_default();
                    let backend = text
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("maos_storage_backend{backend=\"")?
                                .split_once('"')
                                .map(|(b, _)| b.to_string())
                        })
                        .unwrap_or_else(|| "unknown".into());
                    let sample = |name: &str| -> u64 {
                        text.lines()
                            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                            .unwrap_or(0.0) as u64
                    };
                    row["storage"] = serde_json::json!({"backend": backend,
                        "reachable": !row["ready"]["detail"].as_str().unwrap_or("").contains("task-data store"),
                        "database_connection_errors": sample("maos_database_connection_errors_total"),
                        "redis_errors": sample("maos_redis_errors_total"),
                        "cache_hits": sample("maos_cache_hits_total"), "cache_misses": sample("maos_cache_misses_total")});
                }
                Err(error) => row["storage"] = serde_json::json!({"error": error.to_string()}),
            }
            match client.agents(0).await {
                Ok(agents) => row["agents"] = serde_json::json!({"total": agents.total, "busy": agents.active}),
                Err(error) => row["agents"] = serde_json::json!({"error": error.to_string()}),
            }
        }
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        for row in &rows {
            let mark = |probe: &str| if row[probe]["ok"].as_bool() == Some(true) { "ok" } else { "FAIL" };
            println!(
                "{:<22} health {:<4} ready {:<4} {}",
                row["endpoint"].as_str().unwrap_or(""),
                mark("health"),
                mark("ready"),
                row["ready"]["detail"].as_str().unwrap_or("")
            );
            if all_components {
                println!("   raft:    {}", row["raft"]);
                println!("   storage: {}", row["storage"]);
                println!("   tasks:   {}", row["tasks"]);
                println!("   agents:  {}", row["agents"]);
            }
        }
    }
    if !unhealthy.is_empty() {
        return Err(Unhealthy(format!("unhealthy: {}", unhealthy.join("; "))).into());
    }
    Ok(())
}
