//! Tables for people and JSON for scripts: how the command line prints tasks, agents, events
//! and members.

use maos_client::proto::v1::{AgentView, Member, TaskEvent, TaskState, TaskView};
use maos_client::views::{agent_state_name, state_name, task_json};

pub fn short(text: &str, width: usize) -> String {
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

pub fn print_members(members: &[Member], json: bool) {
    if json {
        let rows: Vec<_> = members
            .iter()
            .map(
                |m| serde_json::json!({"id": m.id, "raft_addr": m.raft_addr, "api_addr": m.api_addr, "voter": m.voter}),
            )
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!("{:<6} {:<8} {:<24} {:<24}", "ID", "ROLE", "RAFT", "API");
    for m in members {
        println!("{:<6} {:<8} {:<24} {:<24}", m.id, if m.voter { "voter" } else { "learner" }, m.raft_addr, m.api_addr);
    }
}
