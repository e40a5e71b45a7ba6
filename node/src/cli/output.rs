//! Tables for people and JSON for scripts: how the command line prints tasks, agents, events
//! and members.

use comfy_table::{presets, CellAlignment, Table};
use maos_client::proto::v1::{AgentView, Member, TaskEvent, TaskState, TaskView};
use maos_client::views::{agent_state_name, state_name, task_json};

/// A table for people: a heading row, columns padded to their widest value (comfy-table), no
/// borders, so a value always sits under its heading; `right` names the numeric columns.
pub fn table(headings: &[&str], right: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header(headings.iter().copied());
    for index in right {
        if let Some(column) = table.column_mut(*index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Print `table` without the padding comfy-table puts before the first column.
pub fn print_table(table: &Table) {
    for line in table.lines() {
        println!("{}", line.strip_prefix(' ').unwrap_or(&line).trim_end());
    }
}

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
    let mut rows = table(&["TASK", "TYPE", "STATE", "ATTEMPT", "NODE", "RESULT / CAUSE"], &[3, 4]);
    for v in views {
        let note = if v.cause.is_empty() || v.state == TaskState::Completed as i32 { &v.result } else { &v.cause };
        let node = if v.node_id > 0 { v.node_id.to_string() } else { "-".into() };
        rows.add_row(vec![
            v.task_id.clone(),
            short(&v.task_type, 24),
            state_name(v.state).to_string(),
            v.attempt.to_string(),
            node,
            short(note, 60),
        ]);
    }
    print_table(&rows);
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
    let mut rows = table(&["AGENT", "NODE", "TYPE", "BACKEND", "STATE", "TASK"], &[1]);
    for a in agents {
        rows.add_row(vec![
            a.agent_id.clone(),
            a.node_id.to_string(),
            short(&a.agent_type, 24),
            a.backend.clone(),
            agent_state_name(a.state).to_string(),
            a.task_id.clone(),
        ]);
    }
    print_table(&rows);
}

/// A task event as one JSON line (`--json`).
pub fn event_json(event: &TaskEvent) -> String {
    serde_json::json!({"task_id": event.task_id, "state": state_name(event.state),
        "attempt": event.attempt, "node_id": event.node_id, "progress_percent": event.progress_percent,
        "progress_message": event.progress_message, "cause": event.cause, "finished": event.finished})
    .to_string()
}

/// A task event as one line for people: which task (`task` for the watched one, the plan key's
/// tail for a subtask), its state, progress, attempt and node.
pub fn event_line(event: &TaskEvent, root: &str) -> String {
    let name = if event.task_id == root {
        "task".to_string()
    } else {
        event.task_id.rsplit('.').next().unwrap_or("").to_string()
    };
    let place = if event.node_id > 0 { format!(" node {}", event.node_id) } else { String::new() };
    format!(
        "{name:<14} {:<10} {:>3}% attempt {}{place} {}",
        state_name(event.state),
        event.progress_percent.min(100),
        event.attempt,
        short(&event.progress_message, 40)
    )
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
    let mut rows = table(&["ID", "ROLE", "RAFT", "API"], &[0]);
    for m in members {
        rows.add_row(vec![
            m.id.to_string(),
            if m.voter { "voter" } else { "learner" }.to_string(),
            m.raft_addr.clone(),
            m.api_addr.clone(),
        ]);
    }
    print_table(&rows);
}
