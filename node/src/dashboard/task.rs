//! One task: its state history and attempts (as this node observed them), progress,
//! checkpoint, usage, input and result (each cut to `PAYLOAD_SHOWN_MAX` and escaped), live.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maos_client::proto::v1::TaskView;
use maos_raft_store::tasks::{TaskState, PLAN_KEY_LABEL};
use maud::{html, Markup};

use super::layout::{clipped, not_found, page as shell, priority_name, state_badge, state_name, time_of, Nav};
use super::recorder::TaskHistory;
use super::sse::live as live_stream;
use super::Dashboard;
use crate::api::views::{fill_view, task_view};
use crate::storage::TaskPayloads;

/// Bytes of an input, result or checkpoint shown, at most.
pub const PAYLOAD_SHOWN_MAX: usize = 16 * 1024;

/// What the page shows of a task, read under one lock, with its payloads fetched after.
struct Snapshot {
    view: TaskView,
    state: TaskState,
    priority: &'static str,
    created_ms: u64,
    updated_ms: u64,
    plan_key: Option<String>,
    timeout_ms: u64,
    capabilities: Vec<String>,
    history: Option<TaskHistory>,
    /// Why the payloads could not be read, if they could not.
    payload_error: Option<String>,
}

async fn snapshot(dash: &Dashboard, id: &str) -> Option<Snapshot> {
    let (mut snap, payloads) = {
        let state = dash.core.state.read();
        let table = &state.app.tasks;
        let task = table.tasks.get(id)?;
        let snap = Snapshot {
            view: task_view(table, task),
            state: task.state,
            priority: priority_name(task.spec.priority),
            created_ms: task.created_at_ms,
            updated_ms: task.updated_at_ms,
            plan_key: task.spec.labels.get(PLAN_KEY_LABEL).cloned(),
            timeout_ms: task.spec.timeout_ms,
            capabilities: task.spec.capabilities.iter().cloned().collect(),
            history: None,
            payload_error: None,
        };
        (snap, TaskPayloads::of(table, task))
    };
    snap.history = dash.recorder.history(id);
    let mut wanted = Vec::new();
    payloads.wanted(&mut wanted);
    if !wanted.is_empty() {
        match dash.storage.fetch(wanted).await {
            Ok(fetched) => fill_view(&mut snap.view, &payloads, &fetched),
            Err(error) => snap.payload_error = Some(error.to_string()),
        }
    }
    Some(snap)
}

pub async fn page(State(dash): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    let Some(snap) = snapshot(&dash, &id).await else {
        return not_found(&dash, &format!("There is no task {id:?} in this node's applied state."));
    };
    let live = format!("/sse/tasks/{id}");
    let body = html! { div #task sse-swap="task" { (render(&snap)) } };
    shell(&dash, &format!("Task {id}"), Nav::Tasks, Some(&live), body).into_response()
}

pub async fn live(State(dash): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    let id = Arc::new(id);
    live_stream(
        dash,
        Arc::new(move |dash| {
            let id = id.clone();
            Box::pin(async move {
                match snapshot(&dash, &id).await {
                    Some(snap) => vec![("task", render(&snap).into_string())],
                    None => {
                        vec![("task", html! { p.error { "The task is gone from this node's state." } }.into_string())]
                    }
                }
            })
        }),
    )
}

fn render(snap: &Snapshot) -> Markup {
    let v = &snap.view;
    let is_workflow = !v.children.is_empty() || v.planning;
    html! {
        dl.facts {
            dt { "State" } dd #task-state { (state_badge(snap.state)) @if !v.cause.is_empty() { " " span.cause { (v.cause) } } }
            dt { "Type" } dd { (v.task_type) }
            dt { "Description" } dd #task-description { (clipped(&v.description, PAYLOAD_SHOWN_MAX)) }
            dt { "Priority" } dd { (snap.priority) }
            dt { "Submitter" } dd { (v.submitter) }
            dt { "Attempt" } dd { (v.attempt) " of at most " (v.max_retries + 1) }
            dt { "Created / updated (UTC)" } dd.mono { (time_of(snap.created_ms)) " / " (time_of(snap.updated_ms)) }
            dt { "Attempt timeout" } dd { (snap.timeout_ms) " ms" }
            @if !snap.capabilities.is_empty() { dt { "Capabilities" } dd { (snap.capabilities.join(", ")) } }
            @if let Some(key) = &snap.plan_key { dt { "Plan key" } dd { (key) } }
            @if !v.parent.is_empty() { dt { "Parent" } dd.mono { a href={ "/workflows/" (v.parent) } { (v.parent) } } }
            @if !v.depends_on.is_empty() {
                dt { "Depends on" } dd.mono { @for d in &v.depends_on { a href={ "/tasks/" (d) } { (d) } " " } }
            }
            @if is_workflow { dt { "Workflow" } dd { a #workflow-link href={ "/workflows/" (v.task_id) } { "DAG of " (v.children.len()) " subtasks" } } }
            @if v.node_id != 0 { dt { "Running on" } dd { "node " (v.node_id) ", agent " span.mono { (v.slot) } } }
            dt { "Progress" } dd #task-progress {
                progress max="100" value=(v.progress_percent) { (v.progress_percent) "%" }
                " " (v.progress_percent) "% " (v.progress_message)
            }
            dt { "Usage" } dd { (v.input_tokens) " input tokens, " (v.output_tokens) " output tokens" }
        }
        @if let Some(error) = &snap.payload_error { p.error { "The task-data store did not answer: " (error) } }
        h2 { "Input" } pre #task-input { (clipped(&v.input, PAYLOAD_SHOWN_MAX)) }
        h2 { "Result" } pre #task-result { @if v.result.is_empty() { "(none yet)" } @else { (clipped(&v.result, PAYLOAD_SHOWN_MAX)) } }
        h2 { "Checkpoint" }
        @if v.checkpoint.is_empty() { p.muted { "None saved." } }
        @else { p.muted { "Saved by attempt " (v.checkpoint_attempt) } pre { (clipped(&v.checkpoint, PAYLOAD_SHOWN_MAX)) } }
        (attempts(snap.history.as_ref()))
        (history(snap.history.as_ref()))
    }
}

fn attempts(history: Option<&TaskHistory>) -> Markup {
    html! {
        h2 { "Attempts" }
        @match history.filter(|h| !h.attempts.is_empty()) {
            None => p.muted { "None observed by this node." },
            Some(h) => table.grid #attempts {
                thead { tr { th { "Attempt" } th { "Node" } th { "Agent" } th { "Start (UTC)" } th { "End (UTC)" } th { "Outcome" } } }
                tbody {
                    @for a in &h.attempts {
                        tr {
                            td.num { (a.attempt) }
                            td.num { @if a.node_id == 0 { "-" } @else { (a.node_id) } }
                            td.mono { @if a.agent.is_empty() { "(ran between two samples)" } @else { (a.agent) } }
                            td.mono { (time_of(a.started_ms)) }
                            td.mono { @match a.ended_ms { Some(ms) => (time_of(ms)), None => "running" } }
                            td { @match &a.outcome {
                                Some((state, cause)) => { (outcome(*state)) @if let Some(c) = cause { " " span.cause { (c) } } },
                                None => "-",
                            } }
                        }
                    }
                }
            },
        }
    }
}

/// What an attempt's end means: the state the task moved to.
fn outcome(state: TaskState) -> &'static str {
    match state {
        TaskState::Completed => "completed",
        TaskState::Failed => "failed",
        TaskState::Queued | TaskState::Pending => "ended; to be retried",
        TaskState::Cancelled => "cancelled",
        TaskState::Running => "lease moved",
    }
}

fn history(history: Option<&TaskHistory>) -> Markup {
    html! {
        h2 { "State history" }
        p.muted { "As this node saw it apply since it started (changes less than 500 ms apart show as one)." }
        @match history {
            None => p.muted { "None observed." },
            Some(h) => table.grid #history {
                thead { tr { th { "Time (UTC)" } th { "State" } th { "Attempt" } th { "Node" } th { "Cause" } } }
                tbody {
                    @for t in &h.transitions {
                        tr data-state=(state_name(t.state)) {
                            td.mono { (time_of(t.at_ms)) } td { (state_badge(t.state)) } td.num { (t.attempt) }
                            td.num { @if t.node_id == 0 { "-" } @else { (t.node_id) } }
                            td { (t.cause.as_deref().unwrap_or("")) }
                        }
                    }
                }
            },
        }
    }
}
