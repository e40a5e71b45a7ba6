//! Display names of the API's enums and the JSON view of a task: one rendering shared by the
//! server's REST surface, the `maos` command line and the demo, so they never disagree.

use crate::proto::v1::{AgentState, Priority, TaskState, TaskView};

/// A task state's name as the API documents it (`COMPLETED`); `UNKNOWN` for a value this build
/// does not know.
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

/// A priority's name as REST and the command line show it (`high`); `normal` for unset.
pub fn priority_name(priority: i32) -> &'static str {
    match Priority::try_from(priority) {
        Ok(Priority::Low) => "low",
        Ok(Priority::High) => "high",
        Ok(Priority::Critical) => "critical",
        _ => "normal",
    }
}

/// An agent state's name (`BUSY`); `UNKNOWN` for a value this build does not know.
pub fn agent_state_name(state: i32) -> &'static str {
    match AgentState::try_from(state) {
        Ok(AgentState::Idle) => "IDLE",
        Ok(AgentState::Busy) => "BUSY",
        Ok(AgentState::Draining) => "DRAINING",
        Ok(AgentState::Failed) => "FAILED",
        Ok(AgentState::Terminated) => "TERMINATED",
        _ => "UNKNOWN",
    }
}

/// A task as JSON: the command line's `--json`, the same as the REST view (every field of
/// `TaskView`, with `priority` and `state` as words; a server test holds the two equal).
pub fn task_json(view: &TaskView) -> serde_json::Value {
    serde_json::json!({
        "task_id": view.task_id, "task_type": view.task_type, "priority": priority_name(view.priority),
        "state": state_name(view.state), "attempt": view.attempt, "result": view.result,
        "cause": view.cause, "slot": view.slot, "node_id": view.node_id,
        "fencing_token": view.fencing_token, "depends_on": view.depends_on, "parent": view.parent,
        "submitter": view.submitter, "children": view.children, "planning": view.planning,
        "expanded": view.expanded, "checkpoint": view.checkpoint,
        "checkpoint_attempt": view.checkpoint_attempt, "progress_percent": view.progress_percent,
        "progress_message": view.progress_message, "input_tokens": view.input_tokens,
        "output_tokens": view.output_tokens, "max_retries": view.max_retries,
        "description": view.description, "idempotency_key": view.idempotency_key, "input": view.input,
        "trace_id": view.trace_id,
    })
}
