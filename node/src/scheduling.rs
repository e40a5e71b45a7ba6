//! The leader's scheduling loop.
//!
//! Leader loop: on taking leadership it first extends every live lease by the election window
//! (so a failover never mass-expires leases) and applies its configured task limits
//! (`system.task_queue_size`, `task_planner.*`; the leader's configuration wins), then each round proposes a `Tick` when one is due
//! and the assignments `scheduler::plan_assignments` returns, all through the batching write path.
//!
//! What runs the leased work is each node's agent runtime (`agents`).

use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::scheduler::plan_assignments;
use maos_raft_store::tasks::TaskCommand;
use maos_raft_store::Command;
use openraft::ServerState;
use tokio::sync::watch;

use crate::config::Config;
use crate::core::NodeCore;

/// Run the leader loop until `stopped`.
pub async fn leader_loop(core: Arc<NodeCore>, config: Config, mut stopped: watch::Receiver<bool>) {
    let settings = config.scheduler.clone();
    // Long enough to cover an election: renewals cannot commit while there is no leader.
    let extension_ms = config.raft.election_timeout_max_ms * 2 + settings.lease_renew_interval_ms;
    let mut extended_in_term: Option<u64> = None;
    // After a round that assigned work, the next one starts at once: more may be ready.
    let mut busy = false;
    loop {
        let pause = if busy { Duration::ZERO } else { Duration::from_millis(settings.interval_ms) };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
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
        let (tick_due, plan) = {
            let state = core.state.read();
            let table = &state.app.tasks;
            (
                table.tick_due(now_ms) || state.app.kv_expiry_due(now_ms),
                plan_assignments(table, now_ms, settings.assignments_max, settings.lease_ms),
            )
        };
        if tick_due {
            if let Err(error) = core.write(Command::Task(TaskCommand::Tick)).await {
                tracing::debug!(%error, "tick not committed; next round");
            }
        }
        if !plan.is_empty() {
            busy = true;
            let writes = plan.into_iter().map(|assign| core.write(Command::Task(assign)));
            for result in futures::future::join_all(writes).await {
                if let Err(error) = result {
                    // Refused assignments (a slot taken meanwhile) are planned again next round.
                    tracing::debug!(%error, "assignment not applied");
                }
            }
        }
    }
}
