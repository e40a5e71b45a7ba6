//! The node's metrics: one catalogue, one recorder per process, rendered by the Prometheus
//! exporter (no hand-written exposition text).
//!
//! Every metric is recorded through the `metrics` facade (`metrics::counter!` and friends), here,
//! in raft-store's apply (task events, counted on every node as it applies them, so each node's
//! series is complete), and in the layers above. [`install`] sets the process's global recorder
//! once; a process runs one node, so that is one registry per node. (A simulation that runs
//! several nodes in one process, `maos-chaos`, shares one registry among them; nothing there
//! reads it.)
//!
//! Label values are bounded: states, priorities, causes and outcomes are fixed sets; agent types
//! come from configuration; request methods are route templates or gRPC methods, bounded by
//! [`BoundedLabel`]; peers are cluster members. No task id or other unbounded value is a label.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// A metric's type as Prometheus sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    /// Label names (their values are bounded sets, see `docs/METRICS.md`).
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn metric(name: &'static str, kind: Kind, labels: &'static [&'static str], help: &'static str) -> Metric {
    Metric { name, kind, labels, help }
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric the node exports. `docs/METRICS.md` documents each (checked by a test).
pub const CATALOGUE: &[Metric] = &[
    // Task events, counted by apply on every node (raft-store `tasks/events.rs`).
    metric("maos_tasks_submitted_total", Counter, &["priority"], "Tasks submitted (applied on this node)."),
    metric("maos_tasks_completed_total", Counter, &[], "Tasks completed (applied on this node)."),
    metric("maos_tasks_failed_total", Counter, &["cause"], "Tasks failed for good, by cause (applied on this node)."),
    metric("maos_tasks_cancelled_total", Counter, &[], "Tasks cancelled, descendants included (applied on this node)."),
    metric("maos_task_attempts_total", Counter, &[], "Attempts started: leases granted (applied on this node)."),
    metric("maos_task_retries_total", Counter, &[], "Failed attempts whose task was queued again (applied on this node)."),
    metric("maos_task_lease_expiries_total", Counter, &[], "Leases that expired without a renewal (applied on this node)."),
    metric("maos_task_attempt_timeouts_total", Counter, &[], "Attempts stopped at their task's timeout (applied on this node)."),
    metric(
        "maos_task_queue_wait_seconds",
        Histogram,
        &["type", "priority"],
        "Time a task waited QUEUED (from submit, its dependencies completing, or a retry) until an attempt's lease, by leader time.",
    ),
    metric(
        "maos_task_attempt_duration_seconds",
        Histogram,
        &["type", "outcome"],
        "Time from an attempt's lease to its end, by leader time.",
    ),
    // Current state, read at scrape time from this node's applied view.
    metric("maos_tasks", Gauge, &["state"], "Tasks in the cluster by state (this node's applied view)."),
    metric("maos_task_queue_depth", Gauge, &[], "Tasks QUEUED: ready and waiting for an agent (this node's applied view)."),
    metric(
        "maos_client_sessions",
        Gauge,
        &[],
        "Open client sessions (exactly-once writes), of at most 4,096 (this node's applied view).",
    ),
    // Client API.
    metric(
        "maos_task_submit_duration_seconds",
        Histogram,
        &["surface"],
        "Time to answer a submit, by surface (grpc, rest), whatever the answer.",
    ),
    metric("maos_http_request_duration_seconds", Histogram, &["method", "route", "code"], "HTTP requests (REST, /health, /ready, /metrics) by method, route template and status code."),
    metric(
        "maos_requests_refused_total",
        Counter,
        &["reason"],
        "Calls the API port refused before serving them: reason rate (a caller over security.rate_limit) or busy (network.max_concurrent_requests in flight).",
    ),
    metric(
        "maos_rate_limit_local_fallbacks_total",
        Counter,
        &[],
        "Calls security.rate_limit counted on this node alone because Redis did not answer within 50 ms (looser than the shared limit, never stricter).",
    ),
    metric("maos_grpc_request_duration_seconds", Histogram, &["method", "code"], "gRPC calls by method and grpc-status (streams: until the response headers)."),
    // Raft.
    metric("maos_raft_term", Gauge, &[], "The Raft term this node is in."),
    metric("maos_raft_leader_id", Gauge, &[], "The leader this node knows (0: none)."),
    metric("maos_raft_is_leader", Gauge, &[], "1 when this node leads."),
    metric("maos_raft_leader_changes_total", Counter, &[], "Times this node saw the leader change (to another node or to none)."),
    metric("maos_raft_last_log_index", Gauge, &[], "The last log index this node holds."),
    metric("maos_raft_committed_index", Gauge, &[], "On the leader: the last log index a quorum of voters holds."),
    metric("maos_raft_last_applied_index", Gauge, &[], "The last log index this node applied."),
    metric("maos_raft_log_entries", Gauge, &[], "Entries in this node's log (last index less the purged one)."),
    metric("maos_raft_replication_lag_entries", Gauge, &["peer"], "On the leader: entries each member lacks of the leader's log."),
    metric("maos_raft_snapshot_builds_total", Counter, &[], "Snapshots this node built."),
    metric("maos_raft_snapshot_installs_total", Counter, &[], "Snapshots this node installed from the leader."),
    metric("maos_raft_commit_duration_seconds", Histogram, &[], "On the proposer: time from proposing a batch to its commit and apply."),
    metric("maos_raft_proposer_batch_commands", Histogram, &["path"], "Commands per proposed batch (path: leader entries, or follower forwards)."),
    metric("maos_raft_apply_batch_entries", Histogram, &[], "Log entries per apply call."),
    metric("maos_raft_apply_duration_seconds", Histogram, &[], "Time to apply one batch of entries."),
    metric("maos_raft_peer_unreachable_total", Counter, &["peer"], "Raft calls to a peer that failed to connect or timed out."),
    metric(
        "maos_clock_skew_seconds",
        Gauge,
        &[],
        "This node's wall clock less a quorum's (positive: ahead; 0 inside the interval they agree on).",
    ),
    metric(
        "maos_clock_synchronized",
        Gauge,
        &[],
        "1 when a quorum's clocks agree with this node's within raft.clock_skew_max_ms (as leader it may expire), else 0.",
    ),
    // Agents.
    metric("maos_agents_active", Gauge, &[], "Agents running an attempt on this node."),
    metric("maos_agents", Gauge, &[], "Agents of this node that are not terminated (the guide's maos_agents_total)."),
    metric("maos_agent_slots", Gauge, &["type", "state"], "Agent slots of this node by type and use (busy, idle)."),
    metric("maos_agent_spawns_total", Counter, &[], "Attempts started on this node."),
    metric("maos_agent_spawn_failures_total", Counter, &[], "Attempts whose agent could not be started."),
    metric("maos_agent_spawn_duration_seconds", Histogram, &["type"], "Time from this node starting an attempt to calling its agent's backend (the attempt's data loaded)."),
    metric("maos_agent_self_fenced_total", Counter, &[], "Attempts stopped because no lease renewal proved them live."),
    // Storage.
    metric("maos_storage_backend", Gauge, &["backend"], "The task-data store in use (1 for the named one)."),
    metric("maos_database_connection_errors_total", Counter, &[], "PostgreSQL operations that failed for want of a connection."),
    metric("maos_database_queries_total", Counter, &[], "PostgreSQL statements run."),
    metric("maos_database_query_duration_seconds", Histogram, &["statement"], "PostgreSQL statement latency by statement kind."),
    metric("maos_redis_errors_total", Counter, &[], "Redis commands that failed (reads then went to the source)."),
    metric("maos_cache_hits_total", Counter, &[], "Payload reads served by the Redis cache."),
    metric("maos_cache_misses_total", Counter, &[], "Payload reads the Redis cache did not hold."),
    metric("maos_task_events_recorded_total", Counter, &[], "Task events this node wrote to the event history."),
    metric("maos_orphan_payloads_removed_total", Counter, &[], "Payloads removed because no committed task refers to them."),
];

/// Histogram buckets for durations, in seconds: 0.5 ms to an hour.
const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0];
/// Histogram buckets for batch sizes: powers of two up to the batch limit (1,024 commands).
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
/// How often histograms are drained when nobody scrapes, so their samples stay bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use: every later call returns the same handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_commands".into()), COUNT_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_entries".into()), COUNT_BUCKETS));
        // The buckets above are constants and not empty, so the builder cannot refuse them.
        let builder = builder.unwrap_or_else(|error| unreachable!("constant histogram buckets refused: {error}"));
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            tracing::warn!(%error, "another metrics recorder is installed in this process; /metrics shows only what reaches it");
        }
        describe();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        });
        if let Err(error) = spawned {
            tracing::warn!(%error, "the metrics upkeep thread could not start; histograms drain on each scrape only");
        }
        handle
    })
}

/// The process's recorder if [`install`] has run (`metrics.enabled`), else `None`.
pub fn installed() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

fn describe() {
    for m in CATALOGUE {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.help),
            Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// A future timed into `maos_database_query_duration_seconds` under a statement kind (a fixed
/// name per statement in the code, so the label is bounded).
pub trait Timed: std::future::Future + Sized {
    fn timed(self, statement: &'static str) -> impl std::future::Future<Output = Self::Output> {
        async move {
            let started = std::time::Instant::now();
            let output = self.await;
            metrics::histogram!("maos_database_query_duration_seconds", "statement" => statement)
                .record(started.elapsed().as_secs_f64());
            output
        }
    }
}

impl<F: std::future::Future> Timed for F {}

/// A label whose values are bounded: the first `max` distinct values pass, later new ones are
/// reported as `other`, so a client sending made-up paths cannot grow the registry.
pub struct BoundedLabel {
    seen: Mutex<BTreeSet<String>>,
    max: usize,
}

impl BoundedLabel {
    pub const fn new(max: usize) -> Self {
        Self { seen: Mutex::new(BTreeSet::new()), max }
    }

    pub fn value(&self, candidate: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(candidate) {
            return candidate.to_string();
        }
        if seen.len() < self.max {
            seen.insert(candidate.to_string());
            return candidate.to_string();
        }
        "other".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_names_are_conformant_and_unique() {
        let mut names = BTreeSet::new();
        for m in CATALOGUE {
            assert!(names.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("maos_"), "{}", m.name);
            assert_eq!(m.kind == Counter, m.name.ends_with("_total"), "{}: only counters end in _total", m.name);
            if m.kind == Histogram {
                let suffixed = ["_seconds", "_commands", "_entries"].iter().any(|s| m.name.ends_with(s));
                assert!(suffixed, "{}: a histogram without buckets would be exported as a summary", m.name);
            }
        }
    }

    #[test]
    fn every_metric_is_documented_with_its_type_and_labels() {
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/METRICS.md"))
            .expect("docs/METRICS.md");
        for m in CATALOGUE {
            let row = docs
                .lines()
                .find(|line| line.starts_with(&format!("| `{}` |", m.name)))
                .unwrap_or_else(|| panic!("docs/METRICS.md has no row for {}", m.name));
            assert!(row.contains(&format!("| {} |", m.kind.name())), "{}: documented type differs: {row}", m.name);
            for label in m.labels {
                assert!(row.contains(&format!("`{label}`")), "{}: label {label} is not documented: {row}", m.name);
            }
        }
    }

    #[test]
    fn a_bounded_label_reports_new_values_past_its_bound_as_other() {
        let label = BoundedLabel::new(2);
        assert_eq!(label.value("a"), "a");
        assert_eq!(label.value("b"), "b");
        assert_eq!(label.value("c"), "other");
        assert_eq!(label.value("a"), "a");
    }
}
