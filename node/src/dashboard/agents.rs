//! The agents: pools by node and type with their states and utilisation, and every agent,
//! live. Pause, resume and terminate are CLI commands until API principals and roles exist.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use maos_client::proto::v1::AgentState as WireAgentState;
use maos_client::views::agent_state_name;
use maud::{html, Markup};

use super::layout::{page as shell, Nav};
use super::sse::live as live_stream;
use super::Dashboard;
use crate::api::views::agent_state;

/// Agents listed one by one, at most (the pools above count them all).
const AGENTS_LISTED_MAX: usize = 500;

pub async fn page(State(dash): State<Arc<Dashboard>>) -> Markup {
    let body = html! {
        p.muted #agent-actions {
            "Pause, resume and terminate are not offered here while the dashboard is read-only; use "
            code { "maos agent pause|resume|terminate AGENT_ID" } "."
        }
        div #agents sse-swap="agents" { (render(&dash)) }
    };
    shell(&dash, "Agents", Nav::Agents, Some("/sse/agents"), body)
}

pub async fn live(State(dash): State<Arc<Dashboard>>) -> Response {
    live_stream(dash, Arc::new(|dash| Box::pin(async move { vec![("agents", render(&dash).into_string())] })))
}

#[derive(Default)]
struct Pool {
    idle: u64,
    busy: u64,
    draining: u64,
    failed: u64,
    terminated: u64,
}

fn render(dash: &Dashboard) -> Markup {
    let state = dash.core.state.read();
    let table = &state.app.tasks;
    let mut pools: BTreeMap<(u64, &str), Pool> = BTreeMap::new();
    for (id, slot) in &table.slots {
        let pool = pools.entry((slot.node_id, slot.agent_type.as_str())).or_default();
        match agent_state(table, id, slot) {
            WireAgentState::Idle => pool.idle += 1,
            WireAgentState::Busy => pool.busy += 1,
            WireAgentState::Draining => pool.draining += 1,
            WireAgentState::Failed => pool.failed += 1,
            WireAgentState::Terminated | WireAgentState::Unspecified => pool.terminated += 1,
        }
    }
    html! {
        h2 { "Pools by node and type" }
        table.grid #pools {
            thead { tr { th { "Node" } th { "Type" } th { "Idle" } th { "Busy" } th { "Draining" } th { "Failed" } th { "Terminated" } th { "Utilisation" } } }
            tbody {
                @for ((node, agent_type), p) in &pools {
                    @let working = p.idle + p.busy + p.draining;
                    @let percent = (p.busy * 100).checked_div(working).unwrap_or(0);
                    tr data-node=(node) data-type=(agent_type) {
                        td.num { (node) } td { (agent_type) }
                        td.num { (p.idle) } td.num { (p.busy) } td.num { (p.draining) } td.num { (p.failed) } td.num { (p.terminated) }
                        td {
                            svg.bar width="100" height="10" role="img" {
                                rect x="0" y="0" width="100" height="10" fill="#d9e2ec" {}
                                rect x="0" y="0" width=(percent) height="10" fill="#2680c2" {}
                            }
                            " " (percent) "%"
                        }
                    }
                }
            }
        }
        h2 { "Agents" }
        table.grid #agent-table {
            thead { tr { th { "Agent" } th { "Node" } th { "Type" } th { "Backend" } th { "State" } th { "Task" } } }
            tbody {
                @for (id, slot) in table.slots.iter().take(AGENTS_LISTED_MAX) {
                    @let agent = agent_state(table, id, slot);
                    tr {
                        td.mono { (id) } td.num { (slot.node_id) } td { (slot.agent_type) } td { (slot.backend) }
                        td { span class={ "badge agent-" (agent_state_name(agent as i32).to_ascii_lowercase()) } { (agent_state_name(agent as i32)) } }
                        td.mono { @if let Some(task) = table.slot_holder.get(id) { a href={ "/tasks/" (task) } { (task) } } }
                    }
                }
            }
        }
        @if table.slots.len() > AGENTS_LISTED_MAX { p.muted { (table.slots.len() - AGENTS_LISTED_MAX) " more agents not listed." } }
    }
}
