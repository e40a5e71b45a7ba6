//! The leader's scheduling loop and each node's builtin workers.
//!
//! Leader loop: on taking leadership it first extends every live lease by the election window
//! (so a failover never mass-expires leases) and applies its configured task limits
//! (`system.task_queue_size`, `task_planner.*`; the leader's configuration wins), then each round proposes a `Tick` when one is due
//! and the assignments `scheduler::plan_assignments` returns, all through the batching write path.
//!
//! Workers: each node registers its builtin slots, runs the tasks leased to them, renews all its
//! leases in one command per interval, and reports results with the lease's fencing token. Work
//! whose lease is lost (expired, cancelled, re-leased) is stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::scheduler::plan_assignments;
use maos_raft_store::tasks::{Slot, TaskCommand, TaskId, TaskResponse};
use maos_raft_store::{Command, Response};
use openraft::ServerState;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
            (table.tick_due(now_ms), plan_assignments(table, now_ms, settings.assignments_max, settings.lease_ms))
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

/// This node's builtin slots: `n<id>/<type>/<i>`.
pub fn builtin_slots(config: &Config) -> BTreeMap<String, Slot> {
    let node_id = config.node.id;
    config
        .workers
        .agent_types
        .iter()
        .flat_map(|agent_type| {
            (0..config.workers.slots_per_type).map(move |i| {
                let slot = Slot { node_id, agent_type: agent_type.clone(), capabilities: BTreeSet::new() };
                (format!("n{node_id}/{agent_type}/{i}"), slot)
            })
        })
        .collect()
}

/// What a builtin worker does with an input: `sleep:<ms>` sleeps then echoes, `fail` fails the
/// attempt (retryable), anything else is echoed.
async fn run_builtin(input: String) -> Result<String, String> {
    if input == "fail" {
        return Err("builtin worker asked to fail".into());
    }
    if let Some(ms) = input.strip_prefix("sleep:").and_then(|ms| ms.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(3_600_000))).await;
    }
    Ok(format!("echo: {input}"))
}

/// The longest a worker waits before looking at the state again without being woken.
const WORKER_POLL_INTERVAL: Duration = Duration::from_millis(50);

struct Running {
    token: u64,
    work: JoinHandle<()>,
}

/// Run this node's builtin workers until `stopped`.
pub async fn workers(core: Arc<NodeCore>, config: Config, mut stopped: watch::Receiver<bool>) {
    let slots = builtin_slots(&config);
    let settings = config.scheduler.clone();
    let mut running: BTreeMap<TaskId, Running> = BTreeMap::new();
    let mut last_renewal = tokio::time::Instant::now();
    // Wake on every change Raft reports (an apply, a new leader), or at least every interval, so
    // a new lease starts its work as soon as it is applied here.
    let mut changes = core.raft.metrics();
    loop {
        let raft_stopped_reporting = tokio::select! {
            woken = tokio::time::timeout(WORKER_POLL_INTERVAL, changes.changed()) => matches!(woken, Ok(Err(_))),
            _ = stopped.wait_for(|stop| *stop) => {
                running.values().for_each(|r| r.work.abort());
                return;
            }
        };
        if raft_stopped_reporting {
            // Raft no longer reports changes; fall back to the interval.
            tokio::time::sleep(WORKER_POLL_INTERVAL).await;
        }
        running.retain(|_, r| !r.work.is_finished());
        // What the replicated state says this node should be running.
        let (registered, leased) = {
            let state = core.state.read();
            let table = &state.app.tasks;
            let registered = slots.iter().all(|(id, slot)| table.slots.get(id) == Some(slot))
                && table.slots.values().filter(|s| s.node_id == core.id).count() == slots.len();
            let leased: BTreeMap<TaskId, (u64, String)> = slots
                .keys()
                .filter_map(|slot| table.slot_holder.get(slot))
                .filter_map(|task_id| {
                    let task = table.tasks.get(task_id)?;
                    let lease = task.lease.as_ref()?;
                    Some((task_id.clone(), (lease.token, task.spec.input.clone())))
                })
                .collect();
            (registered, leased)
        };
        if !registered && core.leader().is_some() {
            let command = Command::Task(TaskCommand::RegisterSlots { node_id: core.id, slots: slots.clone() });
            if let Err(error) = core.write(command).await {
                tracing::debug!(%error, "registering slots failed; retrying");
            }
            continue;
        }
        // Lease lost: stop the work.
        running.retain(|task_id, r| {
            let kept = leased.get(task_id).is_some_and(|(token, _)| *token == r.token);
            if !kept {
                tracing::info!(node_id = core.id, task_id = %task_id, token = r.token, "lease lost; stopping the work");
                r.work.abort();
            }
            kept
        });
        // New leases: start the work.
        for (task_id, (token, input)) in leased {
            if running.contains_key(&task_id) {
                continue;
            }
            let core = core.clone();
            let id = task_id.clone();
            let work = tokio::spawn(async move {
                let command = match run_builtin(input).await {
                    Ok(result) => TaskCommand::Complete { task_id: id.clone(), token, result },
                    Err(error) => TaskCommand::Fail { task_id: id.clone(), token, error, retryable: true },
                };
                if let Err(error) = core.write(Command::Task(command)).await {
                    tracing::warn!(task_id = %id, token, %error, "reporting the outcome failed; the lease will expire and the task retry");
                }
            });
            running.insert(task_id, Running { token, work });
        }
        // Renew even with nothing running: the renewal is also this node's liveness signal.
        if last_renewal.elapsed() >= Duration::from_millis(settings.lease_renew_interval_ms) {
            last_renewal = tokio::time::Instant::now();
            let leases = running.iter().map(|(id, r)| (id.clone(), r.token)).collect();
            let renew = TaskCommand::Renew { node_id: core.id, leases, lease_ms: settings.lease_ms };
            match core.write(Command::Task(renew)).await {
                Ok(Response::Task(TaskResponse::Renewed { lost, .. })) => {
                    for task_id in lost {
                        if let Some(r) = running.remove(&task_id) {
                            tracing::info!(node_id = core.id, task_id = %task_id, "lease not renewed; stopping the work");
                            r.work.abort();
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "lease renewal failed; retrying next interval"),
            }
        }
    }
}
