//! One workflow: a planned task's subtasks drawn as a DAG in SVG, each node coloured by its
//! state, live. Columns are dependency depth (the longest chain of dependencies before a
//! subtask); at most `DAG_NODES_MAX` subtasks are drawn.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maos_raft_store::tasks::{TaskState, PLAN_KEY_LABEL};
use maud::{html, Markup};

use super::layout::{not_found, page as shell, state_badge, state_colour, state_name, Nav};
use super::sse::live as live_stream;
use super::Dashboard;

/// Subtasks drawn, at most (a plan holds at most `PLAN_SUBTASKS_MAX`).
pub const DAG_NODES_MAX: usize = 256;
const BOX_WIDTH: f64 = 170.0;
const BOX_HEIGHT: f64 = 44.0;
const COLUMN_GAP: f64 = 60.0;
const ROW_GAP: f64 = 16.0;
const MARGIN: f64 = 10.0;
/// Characters of a plan key written in a box.
const LABEL_CHARS: usize = 22;

struct DagNode {
    id: String,
    key: String,
    state: TaskState,
    attempt: u32,
    depends_on: Vec<String>,
}

struct Workflow {
    state: TaskState,
    description: String,
    cause: String,
    nodes: Vec<DagNode>,
    more: usize,
}

fn workflow(dash: &Dashboard, id: &str) -> Option<Workflow> {
    let state = dash.core.state.read();
    let table = &state.app.tasks;
    let parent = table.tasks.get(id)?;
    let children = table.children.get(id);
    let total = children.map(|c| c.len()).unwrap_or(0);
    let nodes: Vec<DagNode> = children
        .into_iter()
        .flatten()
        .filter_map(|child| table.tasks.get(child))
        .take(DAG_NODES_MAX)
        .map(|t| DagNode {
            id: t.spec.id.clone(),
            key: t.spec.labels.get(PLAN_KEY_LABEL).cloned().unwrap_or_else(|| t.spec.id.clone()),
            state: t.state,
            attempt: t.attempt,
            depends_on: t.spec.depends_on.clone(),
        })
        .collect();
    Some(Workflow {
        state: parent.state,
        description: parent.spec.description.clone(),
        cause: parent.cause.clone().unwrap_or_default(),
        more: total.saturating_sub(nodes.len()),
        nodes,
    })
}

pub async fn page(State(dash): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    let Some(flow) = workflow(&dash, &id) else {
        return not_found(&dash, &format!("There is no task {id:?} in this node's applied state."));
    };
    let live = format!("/sse/workflows/{id}");
    let body = html! {
        p { "Workflow task " a.mono href={ "/tasks/" (id) } { (id) } ": " (flow.description) }
        div #workflow sse-swap="dag" { (render(&flow)) }
    };
    shell(&dash, "Workflow", Nav::Tasks, Some(&live), body).into_response()
}

pub async fn live(State(dash): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    let id = Arc::new(id);
    live_stream(
        dash,
        Arc::new(move |dash| {
            let id = id.clone();
            Box::pin(async move {
                let html = match workflow(&dash, &id) {
                    Some(flow) => render(&flow),
                    None => html! { p.error { "The workflow is gone from this node's state." } },
                };
                vec![("dag", html.into_string())]
            })
        }),
    )
}

/// Each subtask's column: the longest chain of dependencies inside the workflow before it.
fn depths(nodes: &[DagNode]) -> Vec<usize> {
    let index: BTreeMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let mut depth = vec![0usize; nodes.len()];
    // A plan is acyclic (checked on submit), so `nodes.len()` relaxation rounds settle it; the
    // bound also keeps a malformed one from looping.
    for _ in 0..nodes.len() {
        let mut changed = false;
        for (i, node) in nodes.iter().enumerate() {
            for dep in node.depends_on.iter().filter_map(|d| index.get(d.as_str())) {
                if depth[*dep] + 1 > depth[i] && depth[*dep] < nodes.len() {
                    depth[i] = depth[*dep] + 1;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

fn render(flow: &Workflow) -> Markup {
    let depth = depths(&flow.nodes);
    let columns = depth.iter().copied().max().map_or(0, |d| d + 1);
    let mut rows_in = vec![0usize; columns];
    let mut place = Vec::with_capacity(flow.nodes.len());
    for d in &depth {
        place.push((*d, rows_in[*d]));
        rows_in[*d] += 1;
    }
    let rows = rows_in.iter().copied().max().unwrap_or(0);
    let xy = |(col, row): (usize, usize)| {
        (MARGIN + col as f64 * (BOX_WIDTH + COLUMN_GAP), MARGIN + row as f64 * (BOX_HEIGHT + ROW_GAP))
    };
    let width = MARGIN * 2.0 + columns as f64 * (BOX_WIDTH + COLUMN_GAP) - COLUMN_GAP.min(columns as f64 * COLUMN_GAP);
    let height = MARGIN * 2.0 + rows as f64 * (BOX_HEIGHT + ROW_GAP);
    let index: BTreeMap<&str, usize> = flow.nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
    let done = flow.nodes.iter().filter(|n| n.state == TaskState::Completed).count();
    html! {
        p #workflow-summary {
            "Workflow " span #workflow-state data-state=(state_name(flow.state)) { (state_badge(flow.state)) }
            " · " (done) " of " (flow.nodes.len() + flow.more) " subtasks completed"
            @if !flow.cause.is_empty() { " · " span.cause { (flow.cause) } }
        }
        @if flow.nodes.is_empty() { p.muted { "Not expanded yet: the planner has not produced its plan." } }
        @else {
            svg #dag.dag width=(width.max(200.0)) height=(height) viewBox={ "0 0 " (width.max(200.0)) " " (height) } role="img" {
                defs {
                    marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                        path d="M 0 0 L 10 5 L 0 10 z" fill="#627d98" {}
                    }
                }
                @for (i, node) in flow.nodes.iter().enumerate() {
                    @for dep in node.depends_on.iter().filter_map(|d| index.get(d.as_str())) {
                        @let (x1, y1) = xy(place[*dep]);
                        @let (x2, y2) = xy(place[i]);
                        line x1=(x1 + BOX_WIDTH) y1=(y1 + BOX_HEIGHT / 2.0) x2=(x2) y2=(y2 + BOX_HEIGHT / 2.0)
                            stroke="#627d98" stroke-width="1.5" marker-end="url(#arrow)" {}
                    }
                }
                @for (i, node) in flow.nodes.iter().enumerate() {
                    @let (x, y) = xy(place[i]);
                    a href={ "/tasks/" (node.id) } {
                        g.dag-node data-key=(node.key) data-state=(state_name(node.state)) {
                            rect x=(x) y=(y) width=(BOX_WIDTH) height=(BOX_HEIGHT) rx="6" fill=(state_colour(node.state)) stroke="#243b53" {}
                            text x=(x + 8.0) y=(y + 18.0) font-size="12" fill="#ffffff" { (node.key.chars().take(LABEL_CHARS).collect::<String>()) }
                            text x=(x + 8.0) y=(y + 35.0) font-size="11" fill="#ffffff" { (state_name(node.state)) " · attempt " (node.attempt) }
                        }
                    }
                }
            }
            @if flow.more > 0 { p.muted { (flow.more) " more subtasks not drawn (at most " (DAG_NODES_MAX) ")." } }
            p.legend {
                @for s in [TaskState::Pending, TaskState::Queued, TaskState::Running, TaskState::Completed, TaskState::Failed, TaskState::Cancelled] {
                    (state_badge(s)) " "
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, deps: &[&str]) -> DagNode {
        DagNode {
            id: id.into(),
            key: id.into(),
            state: TaskState::Pending,
            attempt: 0,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn columns_follow_the_longest_dependency_chain() {
        let nodes =
            [node("a", &[]), node("b", &[]), node("c", &["a"]), node("d", &["c", "b"]), node("e", &["outside"])];
        assert_eq!(depths(&nodes), vec![0, 0, 1, 2, 0]);
    }

    #[test]
    fn user_text_in_a_plan_key_is_escaped() {
        let mut n = node("x", &[]);
        n.key = "<script>alert(1)</script>".into();
        let flow = Workflow {
            state: TaskState::Running,
            description: String::new(),
            cause: String::new(),
            nodes: vec![n],
            more: 0,
        };
        let html = render(&flow).into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
    }
}
