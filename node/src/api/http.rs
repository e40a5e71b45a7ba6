//! Plain HTTP on the API port (8000), beside gRPC: `/health`, `/ready` and `/metrics`.
//!
//! - `/health`: 200 while the process serves requests (liveness).
//! - `/ready`: 200 when this node is a member of a cluster that has a leader it knows, its
//!   task-data store answers with its schema, and its agent pool is registered; 503 with the
//!   reason otherwise (readiness: a load balancer sends it no traffic until then). Redis is not
//!   part of readiness: the node works without it.
//! - `/metrics`: Prometheus text format, rendered by the exporter from the process's registry
//!   (`telemetry::metrics`; every metric in `docs/METRICS.md`). Current-state gauges (Raft, tasks
//!   by state, agents) are set here from this node's applied view just before rendering. With
//!   `metrics.enabled: false` no recorder is installed and `/metrics` answers 404 naming the key.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::agents::AgentMetrics;
use crate::api::views::task_counts;
use crate::raft::clock::ClockStatus;
use crate::raft::core::NodeCore;
use crate::storage::Storage;

#[derive(Clone)]
struct Shared {
    core: Arc<NodeCore>,
    agents: Arc<AgentMetrics>,
    storage: Arc<Storage>,
    /// Said with every ready answer: how this node is exposed when it is insecure on purpose.
    warning: Option<Arc<str>>,
}

/// What a ready answer must say of `config`: auth off beyond loopback (`security.allow_insecure`).
pub fn insecure_warning(config: &crate::config::Config) -> Option<String> {
    let exposed = [&config.network.listen_addr, &config.dashboard.listen]
        .into_iter()
        .any(|addr| !crate::config::is_loopback(addr));
    (!config.security.auth.enabled && exposed).then(|| {
        "WARNING: auth is off on a non-loopback address (security.allow_insecure): anyone who reaches port 8000 can do anything".to_string()
    })
}

/// The HTTP routes, to be served with the gRPC services.
pub fn router(
    core: Arc<NodeCore>,
    agents: Arc<AgentMetrics>,
    storage: Arc<Storage>,
    warning: Option<String>,
) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Shared { core, agents, storage, warning: warning.map(Arc::from) })
}

async fn ready(State(shared): State<Shared>) -> (StatusCode, String) {
    match readiness(&shared.core, &shared.agents, &shared.storage).await {
        Ok(why) => match &shared.warning {
            Some(warning) => (StatusCode::OK, format!("ready: {why}; {warning}\n")),
            None => (StatusCode::OK, format!("ready: {why}\n")),
        },
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// Whether this node can take work now, and why (`/ready`, and the gRPC health service): a
/// member that knows a leader, whose task-data store answers with its schema, and whose agent
/// pool is in the replicated state (so a submit it takes finds its types served).
pub async fn readiness(core: &NodeCore, agents: &AgentMetrics, storage: &Storage) -> Result<String, String> {
    let id = core.id;
    if !core.members().contains_key(&id) {
        return Err(match core.removal() {
            Some(why) => why,
            None => format!("node {id} is not a member of a cluster yet (forming, or waiting to be added)"),
        });
    }
    let Some((leader, _)) = core.leader() else {
        return Err(format!("node {id} knows no leader (election under way)"));
    };
    let store = storage.check().await.map_err(|why| format!("node {id}: {why}"))?;
    if !agents.pool_registered.load(Ordering::Relaxed) {
        return Err(format!("node {id}: its agent pool is not registered in the cluster yet"));
    }
    let clock = match core.clock_bound.status() {
        ClockStatus::Skewed { skew_ms } => {
            let how = format!(
                "its clock is {} ms {} a quorum's (raft.clock_skew_max_ms = {})",
                skew_ms.unsigned_abs(),
                if skew_ms > 0 { "ahead of" } else { "behind" },
                core.clock_bound.skew_max_ms()
            );
            if leader == id {
                return Err(format!(
                    "node {id} leads but {how}: it expires nothing and hands leadership to a node whose clock agrees; fix its time synchronisation (NTP)"
                ));
            }
            format!("; {how}: it would expire nothing as leader")
        }
        ClockStatus::Unknown | ClockStatus::Synchronized { .. } => String::new(),
    };
    Ok(format!("node {id} in a cluster led by node {leader}; {store}{clock}"))
}

async fn metrics(State(shared): State<Shared>) -> axum::response::Response {
    let Some(recorder) = crate::telemetry::metrics::installed() else {
        let off = "metrics are off on this node (metrics.enabled: false); set metrics.enabled: true (MAOS_METRICS_ENABLED=true) and restart it to serve them\n";
        return (StatusCode::NOT_FOUND, off).into_response();
    };
    let core = &shared.core;
    {
        let metrics = core.raft.metrics();
        let m = metrics.borrow();
        let last_log = m.last_log_index.unwrap_or(0);
        let purged = m.purged.map(|id| id.index).unwrap_or(0);
        metrics::gauge!("maos_raft_term").set(m.current_term as f64);
        let clock = core.clock_bound.status();
        metrics::gauge!("maos_clock_skew_seconds").set(clock.skew_ms() as f64 / 1_000.0);
        metrics::gauge!("maos_clock_synchronized").set(f64::from(u8::from(core.clock_bound.may_expire())));
        metrics::gauge!("maos_raft_leader_id").set(m.current_leader.unwrap_or(0) as f64);
        metrics::gauge!("maos_raft_is_leader").set(f64::from(u8::from(m.current_leader == Some(core.id))));
        metrics::gauge!("maos_raft_last_log_index").set(last_log as f64);
        metrics::gauge!("maos_raft_last_applied_index").set(m.last_applied.map(|id| id.index).unwrap_or(0) as f64);
        metrics::gauge!("maos_raft_log_entries").set(last_log.saturating_sub(purged) as f64);
        // On the leader, what each member holds of its log and what a quorum holds (committed);
        // elsewhere no series (openraft 0.9 does not report a follower's commit index).
        if let Some(replication) = &m.replication {
            let held = |peer: &u64| match *peer == core.id {
                true => last_log,
                false => replication.get(peer).copied().flatten().map(|id| id.index).unwrap_or(0),
            };
            for peer in replication.keys() {
                let lag = last_log.saturating_sub(held(peer));
                metrics::gauge!("maos_raft_replication_lag_entries", "peer" => peer.to_string()).set(lag as f64);
            }
            let mut voters: Vec<u64> = m.membership_config.membership().voter_ids().map(|v| held(&v)).collect();
            voters.sort_unstable_by(|a, b| b.cmp(a));
            if let Some(committed) = voters.get(voters.len() / 2) {
                metrics::gauge!("maos_raft_committed_index").set(*committed as f64);
            }
        }
    }
    let (counts, agents, sessions) = {
        let state = core.state.read();
        (task_counts(&state.app.tasks), AgentMetrics::counts(&state.app.tasks, core.id), state.app.sessions.len())
    };
    metrics::gauge!("maos_client_sessions").set(sessions as f64);
    for (state, count) in [
        ("pending", counts.pending),
        ("queued", counts.queued),
        ("running", counts.running),
        ("completed", counts.completed),
        ("failed", counts.failed),
        ("cancelled", counts.cancelled),
    ] {
        metrics::gauge!("maos_tasks", "state" => state).set(count as f64);
    }
    metrics::gauge!("maos_task_queue_depth").set(counts.queued as f64);
    shared.agents.publish(agents);
    shared.storage.metrics.publish(shared.storage.backend_name());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], recorder.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_warns_only_when_auth_is_off_beyond_loopback() {
        let mut config = crate::config::Config::default();
        assert_eq!(insecure_warning(&config), None, "auth on");
        config.security.auth.enabled = false;
        config.security.allow_insecure = true;
        let said = insecure_warning(&config).unwrap_or_default();
        assert!(said.contains("security.allow_insecure"), "{said:?}");
        config.network.listen_addr = "127.0.0.1:8000".into();
        config.dashboard.listen = "127.0.0.1:3001".into();
        assert_eq!(insecure_warning(&config), None, "loopback only");
    }
}
