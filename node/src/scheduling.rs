//! The leader's scheduling loop.
//!
//! Leader loop: on taking leadership it first extends every live lease by the election window
//! (so a failover never mass-expires leases) and applies its configured task limits
//! (`system.task_queue_size`, `task_planner.*`; the leader's configuration wins), then each round proposes a `Tick` when one is due
//! and the assignments `scheduler::plan_assignments` returns, all through the batching write path.
//! A round runs when an applied change that moves tasks or agents wakes it (at most one per
//! `ROUND_GAP_MIN`), and in any case `scheduler.interval_ms` after the previous round.
//!
//! What runs the leased work is each node's agent runtime (`agents`).

use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::scheduler::plan_assignments;
use maos_raft_store::tasks::{TaskCommand, TaskTable};
use maos_raft_store::Command;
use openraft::ServerState;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::Config;
use crate::raft::core::NodeCore;
use crate::telemetry::traces;

/// The least time between two scheduling rounds: bounds the planning work a stream of applied
/// changes can cause (each round reads the task table).
const ROUND_GAP_MIN: Duration = Duration::from_millis(2);

/// The span of an assignment of a task whose trace is recorded (with tracing on), in that trace.
fn assign_span(table: &TaskTable, assign: &TaskCommand) -> tracing::Span {
    let TaskCommand::Assign { task_id, slot, node_id, .. } = assign else { return tracing::Span::none() };
    match table.tasks.get(task_id) {
        Some(task) if !task.spec.trace_parent.is_empty() => {
            let span = tracing::info_span!(target: traces::TARGET, "assign", task_id = %task_id, agent_id = %slot, assigned_node = *node_id);
            traces::follow(&span, &task.spec.trace_parent);
            span
        }
        _ => tracing::Span::none(),
    }
}

/// What a scheduling round depends on, cheaply: this node's role and term, and the task count,
/// open tasks, held and registered slots. A wake-up that leaves it unchanged plans nothing new;
/// time-driven work (backoff, expiry, TTLs, paused agents resumed) waits for the interval round,
/// which wake-ups never postpone.
fn fingerprint(core: &NodeCore) -> (bool, u64, usize, usize, usize, usize) {
    let (leader, term) = {
        let metrics = core.raft.metrics();
        let m = metrics.borrow();
        (m.state == ServerState::Leader, m.current_term)
    };
    let state = core.state.read();
    let table = &state.app.tasks;
    (leader, term, table.tasks.len(), table.open_tasks(), table.slot_holder.len(), table.slots.len())
}

/// Run the leader loop until `stopped`.
pub async fn leader_loop(core: Arc<NodeCore>, config: Config, mut stopped: watch::Receiver<bool>) {
    let settings = config.scheduler.clone();
    // Long enough to cover an election: renewals cannot commit while there is no leader.
    let extension_ms = config.raft.election_timeout_max_ms * 2 + settings.lease_renew_interval_ms;
    let mut extended_in_term: Option<u64> = None;
    // After a round that assigned work, the next one starts at once: more may be ready.
    let mut busy = false;
    // Applied changes (a submit, a completion, a registration) wake the loop, so new work is
    // assigned within a round trip rather than an interval; rounds stay ROUND_GAP_MIN apart.
    let mut changes = core.raft.metrics();
    let mut last_round = tokio::time::Instant::now();
    let interval = Duration::from_millis(settings.interval_ms);
    let mut last_expiry_check = last_round;
    let mut last_fingerprint = fingerprint(&core);
    loop {
        // The interval round is due at a fixed time after the last round, however many
        // wake-ups are skipped meanwhile.
        let due = if busy { tokio::time::Instant::now() } else { last_round + interval };
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(due) => None,
            changed = changes.changed(), if !busy => Some(changed.is_ok()),
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        match woken {
            Some(true) => {
                // Most applied entries (key-value writes, renewals) change nothing the planner
                // reads: skip the round unless tasks or agents moved.
                if fingerprint(&core) == last_fingerprint {
                    continue;
                }
                tokio::time::sleep_until(last_round + ROUND_GAP_MIN).await;
            }
            // Raft no longer reports changes: rounds follow the interval.
            Some(false) => tokio::time::sleep_until(due).await,
            None => {}
        }
        last_round = tokio::time::Instant::now();
        last_fingerprint = fingerprint(&core);
        busy = false;
        let (state, term) = {
            let metrics = core.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.state, metrics.current_term)
        };
        if state != ServerState::Leader {
            extended_in_term = None;
            continue;
        }
        if extended_in_term != Some(term) {
            match core.write(Command::Task(TaskCommand::ExtendLeases { by_ms: extension_ms })).await {
                Ok(_) => extended_in_term = Some(term),
                Err(error) => {
                    tracing::warn!(node_id = core.id, term, %error, "extending leases after the election failed; retrying");
                    continue;
                }
            }
        }
        let limits = config.task_limits();
        if core.state.read().app.tasks.limits != limits {
            if let Err(error) = core.write(Command::Task(TaskCommand::Configure { limits })).await {
                tracing::warn!(%error, "applying the configured task limits failed; retrying");
                continue;
            }
        }
        let now_ms = (core.clock)();
        // Expiry is about time, not about what was applied: it is checked once per interval
        // (the check reads every task), not on every wake.
        // Only a leader whose clock a quorum's agree with expires anything (raft::clock).
        let check_expiry = last_expiry_check.elapsed() >= interval && core.clock_bound.may_expire();
        if check_expiry {
            last_expiry_check = tokio::time::Instant::now();
        }
        let (tick_due, plan, spans) = {
            let state = core.state.read();
            let table = &state.app.tasks;
            let plan = plan_assignments(table, now_ms, settings.assignments_max, settings.lease_ms);
            let spans: Vec<tracing::Span> = match traces::enabled() {
                true => plan.iter().map(|assign| assign_span(table, assign)).collect(),
                false => Vec::new(),
            };
            (
                check_expiry
                    && (table.tick_due(now_ms) || state.app.kv_expiry_due(now_ms) || state.app.auth.expiry_due(now_ms)),
                plan,
                spans,
            )
        };
        if tick_due {
            if let Err(error) = core.write(Command::Task(TaskCommand::Tick)).await {
                tracing::debug!(%error, "tick not committed; next round");
            }
        }
        if !plan.is_empty() {
            busy = true;
            let mut spans = spans.into_iter();
            let writes = plan.into_iter().map(|assign| {
                let span = spans.next().unwrap_or_else(tracing::Span::none);
                core.write(Command::Task(assign)).instrument(span)
            });
            for result in futures::future::join_all(writes).await {
                if let Err(error) = result {
                    // Refused assignments (a slot taken meanwhile) are planned again next round.
                    tracing::debug!(%error, "assignment not applied");
                }
            }
        }
    }
}
