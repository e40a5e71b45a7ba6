//! Plain HTTP on the API port (8000), beside gRPC: `/health`, `/ready` and `/metrics`.
//!
//! - `/health`: 200 while the process serves requests (liveness).
//! - `/ready`: 200 when this node is a member of a cluster that has a leader it knows and its
//!   task-data store answers; 503 with the reason otherwise (readiness: a load balancer sends it
//!   no traffic until then). Redis is not part of readiness: the node works without it.
//! - `/metrics`: Prometheus text format: Raft state, tasks by state, this node's agents.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::agents::AgentMetrics;
use crate::api::views::task_counts;
use crate::raft::core::NodeCore;
use crate::storage::Storage;

#[derive(Clone)]
struct Shared {
    core: Arc<NodeCore>,
    agents: Arc<AgentMetrics>,
    storage: Arc<Storage>,
}

/// The HTTP routes, to be served with the gRPC services.
pub fn router(core: Arc<NodeCore>, agents: Arc<AgentMetrics>, storage: Arc<Storage>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Shared { core, agents, storage })
}

async fn ready(State(shared): State<Shared>) -> (StatusCode, String) {
    let core = &shared.core;
    let member = core.members().contains_key(&core.id);
    match (member, core.leader()) {
        (true, Some((leader, _))) => match shared.storage.check().await {
            Ok(store) => {
                (StatusCode::OK, format!("ready: node {} in a cluster led by node {leader}; {store}\n", core.id))
            }
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: node {}: {why}\n", core.id)),
        },
        (false, _) => match core.removal() {
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: node {} is not a member of a cluster yet (forming, or waiting to be added)\n",
                    core.id
                ),
            ),
        },
        (true, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: node {} knows no leader (election under way)\n", core.id),
        ),
    }
}

async fn metrics(State(shared): State<Shared>) -> impl IntoResponse {
    let core = &shared.core;
    let (term, leader, last_log, applied, is_leader) = {
        let metrics = core.raft.metrics();
        let m = metrics.borrow();
        (
            m.current_term,
            m.current_leader.unwrap_or(0),
            m.last_log_index.unwrap_or(0),
            m.last_applied.map(|id| id.index).unwrap_or(0),
            u8::from(m.current_leader == Some(core.id)),
        )
    };
    let mut text = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
    };
    gauge("maos_raft_term", "The Raft term this node is in.", term);
    gauge("maos_raft_leader_id", "The leader this node knows (0: none).", leader);
    gauge("maos_raft_is_leader", "1 when this node leads.", u64::from(is_leader));
    gauge("maos_raft_last_log_index", "The last log index this node holds.", last_log);
    gauge("maos_raft_last_applied_index", "The last log index this node applied.", applied);
    let (counts, agents) = {
        let state = core.state.read();
        (task_counts(&state.app.tasks), shared.agents.render(&state.app.tasks, core.id))
    };
    text.push_str(
        "# HELP maos_tasks Tasks in the cluster by state (this node's applied view).\n# TYPE maos_tasks gauge\n",
    );
    for (state, count) in [
        ("pending", counts.pending),
        ("queued", counts.queued),
        ("running", counts.running),
        ("completed", counts.completed),
        ("failed", counts.failed),
        ("cancelled", counts.cancelled),
    ] {
        text.push_str(&format!("maos_tasks{{state=\"{state}\"}} {count}\n"));
    }
    // Finished tasks stay in the table, so these only grow.
    text.push_str(&format!(
        "# HELP maos_tasks_completed_total Tasks completed.\n# TYPE maos_tasks_completed_total counter\nmaos_tasks_completed_total {}\n\
         # HELP maos_tasks_failed_total Tasks failed for good.\n# TYPE maos_tasks_failed_total counter\nmaos_tasks_failed_total {}\n",
        counts.completed, counts.failed
    ));
    text.push_str(&agents);
    text.push_str(&shared.storage.metrics.render(shared.storage.backend_name()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
