//! The task list: newest first, filtered by state, type, priority and submitter, in pages of
//! `PAGE_SIZE`, live. A page costs one pass over the applied task table under its read lock
//! (to count the matches), and renders only its own rows.

use std::ops::Bound;
use std::sync::Arc;

use axum::extract::{Query, RawQuery, State};
use axum::response::{IntoResponse, Response};
use maos_raft_store::tasks::{Priority, Task, TaskState};
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{
    bad_request, clipped, page as shell, parse_priority, parse_state, priority_name, state_badge, time_of, Nav,
};
use super::sse::live as live_stream;
use super::Dashboard;

/// Rows per page.
pub const PAGE_SIZE: usize = 50;
/// Description bytes shown in a row.
const DESCRIPTION_SHOWN: usize = 120;
/// Longest filter value accepted (longer cannot match: type and submitter are bounded).
const FILTER_BYTES_MAX: usize = 256;

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    state: String,
    #[serde(default, rename = "type")]
    task_type: String,
    #[serde(default)]
    priority: String,
    #[serde(default)]
    submitter: String,
    /// Show tasks older than this id (the next page).
    #[serde(default)]
    before: String,
}

/// The checked filters.
struct Filter {
    state: Option<TaskState>,
    task_type: String,
    priority: Option<Priority>,
    submitter: String,
    before: String,
}

impl Filter {
    fn from_query(q: ListQuery) -> Result<Self, String> {
        for (field, value) in [("type", &q.task_type), ("submitter", &q.submitter), ("before", &q.before)] {
            if value.len() > FILTER_BYTES_MAX {
                return Err(format!("{field}: at most {FILTER_BYTES_MAX} bytes"));
            }
        }
        let state = match q.state.trim() {
            "" | "any" => None,
            text => Some(parse_state(text).ok_or_else(|| {
                format!("state: {text:?} is not one of pending, queued, running, completed, failed, cancelled")
            })?),
        };
        let priority = match q.priority.trim() {
            "" | "any" => None,
            text => Some(
                parse_priority(text)
                    .ok_or_else(|| format!("priority: {text:?} is not one of low, normal, high, critical"))?,
            ),
        };
        Ok(Self {
            state,
            task_type: q.task_type.trim().to_string(),
            priority,
            submitter: q.submitter.trim().to_string(),
            before: q.before,
        })
    }

    fn matches(&self, task: &Task) -> bool {
        self.state.is_none_or(|s| task.state == s)
            && (self.task_type.is_empty() || task.spec.task_type == self.task_type)
            && self.priority.is_none_or(|p| task.spec.priority == p)
            && (self.submitter.is_empty() || task.spec.submitter == self.submitter)
    }

    /// The query string of these filters with another `before`.
    fn query_with(&self, before: &str) -> String {
        let mut pairs = Vec::new();
        if let Some(state) = self.state {
            pairs.push(format!("state={}", super::layout::state_name(state).to_ascii_lowercase()));
        }
        if !self.task_type.is_empty() {
            pairs.push(format!("type={}", encode(&self.task_type)));
        }
        if let Some(priority) = self.priority {
            pairs.push(format!("priority={}", priority_name(priority)));
        }
        if !self.submitter.is_empty() {
            pairs.push(format!("submitter={}", encode(&self.submitter)));
        }
        if !before.is_empty() {
            pairs.push(format!("before={}", encode(before)));
        }
        pairs.join("&")
    }
}

/// Percent-encoding of a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn page(
    State(dash): State<Arc<Dashboard>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad_request(&dash, Nav::Tasks, &format!("the query is malformed: {e}")),
    };
    let filter = match Filter::from_query(query) {
        Ok(filter) => filter,
        Err(problem) => return bad_request(&dash, Nav::Tasks, &problem),
    };
    let live = format!("/sse/tasks?{}", raw.unwrap_or_default());
    let body = html! {
        (filters(&filter))
        div #task-list sse-swap="list" { (list(&dash, &filter)) }
    };
    shell(&dash, "Tasks", Nav::Tasks, Some(&live), body).into_response()
}

pub async fn live(State(dash): State<Arc<Dashboard>>, Query(query): Query<ListQuery>) -> Response {
    let filter = match Filter::from_query(query) {
        Ok(filter) => Arc::new(filter),
        Err(problem) => return bad_request(&dash, Nav::Tasks, &problem),
    };
    live_stream(
        dash,
        Arc::new(move |dash| {
            let filter = filter.clone();
            Box::pin(async move { vec![("list", list(&dash, &filter).into_string())] })
        }),
    )
}

fn filters(filter: &Filter) -> Markup {
    let state = filter.state.map(|s| super::layout::state_name(s).to_ascii_lowercase()).unwrap_or_default();
    let priority = filter.priority.map(priority_name).unwrap_or_default();
    html! {
        form.filters #filters method="get" action="/tasks" {
            label { "State " select name="state" {
                @for option in ["", "pending", "queued", "running", "completed", "failed", "cancelled"] {
                    option value=(option) selected[option == state] { @if option.is_empty() { "any" } @else { (option) } }
                }
            } }
            label { "Type " input name="type" value=(filter.task_type) size="12"; }
            label { "Priority " select name="priority" {
                @for option in ["", "low", "normal", "high", "critical"] {
                    option value=(option) selected[option == priority] { @if option.is_empty() { "any" } @else { (option) } }
                }
            } }
            label { "Submitter " input name="submitter" value=(filter.submitter) size="12"; }
            button type="submit" { "Filter" }
            a href="/tasks" { "Clear" }
        }
    }
}

/// The matching count, one page of rows and the pager.
fn list(dash: &Dashboard, filter: &Filter) -> Markup {
    let state = dash.core.state.read();
    let table = &state.app.tasks;
    let matching = table.tasks.values().filter(|t| filter.matches(t)).count();
    let upper = if filter.before.is_empty() { Bound::Unbounded } else { Bound::Excluded(filter.before.clone()) };
    let mut rows = table.tasks.range((Bound::Unbounded, upper)).rev().map(|(_, t)| &**t).filter(|t| filter.matches(t));
    let page: Vec<&Task> = rows.by_ref().take(PAGE_SIZE).collect();
    let more = rows.next().is_some();
    html! {
        p #task-count data-matching=(matching) { (matching) " matching tasks of " (table.tasks.len()) "; newest first, " (PAGE_SIZE) " per page" }
        table.grid #task-table {
            thead { tr { th { "Task" } th { "Type" } th { "State" } th { "Priority" } th { "Submitter" } th { "Attempt" } th { "Node" } th { "Description" } th { "Updated (UTC)" } } }
            tbody {
                @for task in &page {
                    @let id = &task.spec.id;
                    @let is_workflow = table.children.contains_key(id) || task.spec.planner_type.is_some();
                    tr data-task-id=(id) {
                        td.mono {
                            a href={ "/tasks/" (id) } { (id) }
                            @if is_workflow { " " a.dag href={ "/workflows/" (id) } { "DAG" } }
                        }
                        td { (task.spec.task_type) }
                        td { (state_badge(task.state)) }
                        td { (priority_name(task.spec.priority)) }
                        td { (task.spec.submitter) }
                        td.num { (task.attempt) }
                        td.num { @if let Some(lease) = &task.lease { (lease.node_id) } @else { "-" } }
                        td.description { (clipped(&task.spec.description, DESCRIPTION_SHOWN)) }
                        td.mono { (time_of(task.updated_at_ms)) }
                    }
                }
            }
        }
        p.pager {
            @if !filter.before.is_empty() { a #page-newest href={ "/tasks?" (filter.query_with("")) } { "« newest" } " " }
            @if let (true, Some(last)) = (more, page.last()) {
                a #page-older href={ "/tasks?" (filter.query_with(&last.spec.id)) } { "older »" }
            }
        }
    }
}
