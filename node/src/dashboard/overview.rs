//! The overview: every member with its role, health, term and applied index; the leader;
//! throughput and queue-depth charts; task counts; recent cluster events.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use maud::{html, Markup};

use super::layout::{page as shell, time_of, Nav};
use super::recorder::Sample;
use super::sse::{live as live_stream, Fragments};
use super::Dashboard;
use crate::api::views::task_counts;

/// Events listed on the overview.
const EVENTS_SHOWN: usize = 30;
/// Chart size in SVG units.
const CHART_WIDTH: f64 = 480.0;
const CHART_HEIGHT: f64 = 120.0;

fn page_of(dash: &Dashboard) -> Markup {
    let body = html! {
        section.leader sse-swap="leader" { (leader(dash)) }
        section {
            h2 { "Nodes" }
            div #nodes sse-swap="nodes" { (nodes(dash)) }
        }
        section {
            h2 { "Tasks" }
            div #summary sse-swap="summary" { (summary(dash)) }
        }
        section.charts #charts sse-swap="charts" { (charts(dash)) }
        section {
            h2 { "Recent cluster events" }
            div #events sse-swap="events" { (events(dash)) }
        }
    };
    shell(dash, "Overview", Nav::Overview, Some("/sse/overview"), body)
}

pub async fn page(State(dash): State<Arc<Dashboard>>) -> Markup {
    page_of(&dash)
}

pub async fn live(State(dash): State<Arc<Dashboard>>) -> Response {
    live_stream(
        dash,
        Arc::new(|dash| {
            Box::pin(async move {
                let fragments: Fragments = vec![
                    ("leader", leader(&dash).into_string()),
                    ("nodes", nodes(&dash).into_string()),
                    ("summary", summary(&dash).into_string()),
                    ("charts", charts(&dash).into_string()),
                    ("events", events(&dash).into_string()),
                ];
                fragments
            })
        }),
    )
}

fn leader(dash: &Dashboard) -> Markup {
    match dash.core.leader() {
        Some((id, node)) => html! {
            p #leader data-leader-id=(id) { "Leader: " strong { "node " (id) } " (" (node.api_addr) ")" }
        },
        None => html! { p #leader data-leader-id="" { "Leader: " strong { "none known" } " (election under way)" } },
    }
}

fn nodes(dash: &Dashboard) -> Markup {
    let mut members = dash.recorder.members();
    if members.is_empty() {
        members = dash
            .core
            .members()
            .into_iter()
            .map(|(id, (node, voter))| super::recorder::MemberView {
                id,
                api_addr: node.api_addr,
                voter,
                error: "not polled yet".into(),
                ..Default::default()
            })
            .collect();
    }
    let leader = dash.core.leader().map(|(id, _)| id);
    html! {
        table.grid #node-table {
            thead { tr { th { "Node" } th { "API address" } th { "Role" } th { "Health" } th { "Term" } th { "Applied index" } th { "Voter" } } }
            tbody {
                @for m in &members {
                    tr data-node-id=(m.id) data-role=(if m.reachable { m.role.as_str() } else { "unreachable" }) {
                        td { "node " (m.id) @if Some(m.id) == leader { " ★" } @if m.id == dash.core.id { " (this node)" } }
                        td.mono { (m.api_addr) }
                        td { @if m.reachable { (m.role) } @else { "-" } }
                        td {
                            @if m.reachable { span.badge.health-up { "up" } }
                            @else { span.badge.health-down title=(m.error) { "unreachable" } }
                        }
                        td.num { @if m.reachable { (m.term) } @else { "-" } }
                        td.num { @if m.reachable { (m.applied_index) } @else { "-" } }
                        td { @if m.voter { "voter" } @else { "learner" } }
                    }
                }
            }
        }
    }
}

fn summary(dash: &Dashboard) -> Markup {
    let counts = task_counts(&dash.core.state.read().app.tasks);
    let cell = |label: &str, state: &str, value: u64| {
        html! { a.count href={ "/tasks?state=" (state) } { span.value data-count=(state) { (value) } span.label { (label) } } }
    };
    html! {
        div.counts {
            (cell("pending", "pending", counts.pending))
            (cell("queued", "queued", counts.queued))
            (cell("running", "running", counts.running))
            (cell("completed", "completed", counts.completed))
            (cell("failed", "failed", counts.failed))
            (cell("cancelled", "cancelled", counts.cancelled))
        }
        p.muted { "Queue bound (system.task_queue_size): " (counts.queue_limit) }
    }
}

/// Completed tasks per second between consecutive samples.
fn throughput(samples: &[Sample]) -> Vec<f64> {
    samples
        .windows(2)
        .map(|w| {
            let seconds = (w[1].at_ms.saturating_sub(w[0].at_ms)).max(1) as f64 / 1000.0;
            (w[1].completed.saturating_sub(w[0].completed)) as f64 / seconds
        })
        .collect()
}

fn charts(dash: &Dashboard) -> Markup {
    let samples = dash.recorder.samples();
    let queue: Vec<f64> = samples.iter().map(|s| s.queued as f64).collect();
    let running: Vec<f64> = samples.iter().map(|s| s.running as f64).collect();
    html! {
        figure { figcaption { "Throughput (tasks completed per second, last 2 minutes)" } (chart("throughput", &throughput(&samples), None)) }
        figure { figcaption { "Queue depth (queued; running dashed)" } (chart("queue", &queue, Some(&running))) }
    }
}

/// A line chart of `values` (and a dashed `second` series) as inline SVG, scaled to the max.
fn chart(id: &str, values: &[f64], second: Option<&[f64]>) -> Markup {
    let max = values.iter().chain(second.unwrap_or(&[])).copied().fold(0.0_f64, f64::max).max(1.0);
    let points = |series: &[f64]| {
        let step = CHART_WIDTH / (super::recorder::SAMPLES_MAX.max(2) - 1) as f64;
        let offset = CHART_WIDTH - step * series.len().saturating_sub(1) as f64;
        series
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!("{:.1},{:.1}", offset + i as f64 * step, CHART_HEIGHT - v / max * (CHART_HEIGHT - 10.0))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let last = values.last().copied().unwrap_or(0.0);
    html! {
        svg.chart id={ "chart-" (id) } viewBox={ "0 0 " (CHART_WIDTH) " " (CHART_HEIGHT + 16.0) } width=(CHART_WIDTH) height=(CHART_HEIGHT + 16.0) role="img" {
            rect x="0" y="0" width=(CHART_WIDTH) height=(CHART_HEIGHT) fill="#f7f9fb" stroke="#d9e2ec" {}
            @if let Some(second) = second {
                polyline points=(points(second)) fill="none" stroke="#829ab1" stroke-width="1.5" stroke-dasharray="4 3" {}
            }
            polyline points=(points(values)) fill="none" stroke="#2680c2" stroke-width="2" {}
            text x="4" y="12" font-size="11" fill="#486581" { "max " (format!("{max:.1}")) }
            text x="4" y=(CHART_HEIGHT + 13.0) font-size="11" fill="#486581" { "now " (format!("{last:.1}")) }
        }
    }
}

fn events(dash: &Dashboard) -> Markup {
    let events = dash.recorder.events(EVENTS_SHOWN);
    html! {
        @if events.is_empty() { p.muted { "None observed yet." } }
        @else {
            table.grid {
                thead { tr { th { "Time (UTC)" } th { "Kind" } th { "What" } } }
                tbody {
                    @for e in &events {
                        tr data-kind=(e.kind) { td.mono { (time_of(e.at_ms)) } td { (e.kind) } td { (e.text) } }
                    }
                }
            }
        }
        p.muted { "As observed by node " (dash.core.id) " since it started." }
    }
}
