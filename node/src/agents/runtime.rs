//! The runtime's loop: register this node's pool, start an attempt for each new lease within the
//! spawn rate, renew every lease in one command per interval, drop attempts whose lease is lost.
//!
//! Self-fencing: fencing tokens refuse a stale owner's *reports*; this loop also stops its own
//! *work*. Each attempt is live only as long as this node can prove its lease is, by its own
//! monotonic clock: a renewal sent at `t` and committed proves the lease until `t + lease_ms`
//! (the leader stamps it after `t`), less [`self_fence_margin`]. An attempt past that is
//! stopped, whether or not this node's applied state has heard of an expiry: a node cut off from
//! its majority stops its agents before the majority can lease their tasks again.
//!
//! Restarts: a lease of this node's slots granted before this process started belongs to an
//! attempt the restart interrupted. It is never run again as the same attempt: it is failed
//! (retryably), so the task runs again as a new attempt that receives the last checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::state::fencing_token;
use maos_raft_store::tasks::{AgentState, Slot, TaskCommand, TaskId, TaskResponse};
use maos_raft_store::{Command, Response, StateMachineData};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::credential::Credentials;
use super::envelope::ApiAccess;
use super::keeper::Keeper;
use crate::config::Config;
use crate::raft::core::{CoreError, NodeCore};
use crate::storage::Storage;
use crate::telemetry::traces;

use super::attempt::run_attempt;
use super::{configured_slots, envelope_for, AgentMetrics, Backend};

/// The longest the runtime waits before looking at the state again without being woken.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Consecutive start failures after which an agent is marked FAILED.
const SPAWN_FAILURES_MAX: u32 = 3;
/// Self-fencing assumes this node's clock and the leader's run at rates within this share of
/// each other over one lease (quartz drifts by well under 0.01%; 2% also covers a paused VM's
/// catch-up), as Chubby and etcd leases assume a bounded drift rate.
const SELF_FENCE_DRIFT_PERCENT: u64 = 2;
/// Self-fencing's allowance for this loop's poll interval and for stopping an agent.
const SELF_FENCE_SLACK: Duration = Duration::from_millis(100);

/// How much before its lease can be proven to end an attempt is stopped.
pub(super) fn self_fence_margin(lease_ms: u64) -> Duration {
    Duration::from_millis(lease_ms.saturating_mul(SELF_FENCE_DRIFT_PERCENT) / 100) + SELF_FENCE_SLACK
}

/// A token bucket: at most `rate` starts per second, bursts up to `rate`.
struct SpawnRate {
    rate: f64,
    tokens: f64,
    refilled: tokio::time::Instant,
}

impl SpawnRate {
    fn new(rate: u32, now: tokio::time::Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, tokens: rate, refilled: now }
    }

    fn try_take(&mut self, now: tokio::time::Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * self.rate).min(self.rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Attempt {
    token: u64,
    slot: String,
    work: JoinHandle<bool>,
    /// Until when this node can prove the lease is live (see the module doc).
    live_until: tokio::time::Instant,
}

/// A renewal on its way, off the loop's path: the loop keeps fencing while it waits.
struct Renewal {
    sent: tokio::time::Instant,
    leases: BTreeMap<TaskId, u64>,
    call: JoinHandle<Result<Response, CoreError>>,
}

/// This node's agent runtime.
pub struct AgentRuntime {
    pub core: Arc<NodeCore>,
    pub storage: Arc<Storage>,
    pub config: Config,
    pub backends: BTreeMap<String, Arc<Backend>>,
    pub credentials: Arc<Credentials>,
    pub metrics: Arc<AgentMetrics>,
    /// The index after the last entry of the log as this node opened it: leases granted by
    /// earlier entries belong to an earlier run of this node.
    pub log_end_at_start: u64,
    /// Told how long each attempt is proven live, so it fences `command` agents even while this
    /// process is stalled (`keeper.rs`); `None` without command agents.
    pub keeper: Option<Arc<Keeper>>,
}

impl AgentRuntime {
    /// Run until `stopped`.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let configured = configured_slots(&self.config);
        let settings = self.config.scheduler.clone();
        let checkpoint_interval_ms = self.config.system.checkpoint_interval.saturating_mul(1_000);
        let tls = &self.config.security.tls;
        let scheme = if tls.enabled() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{}", self.config.advertised_api_addr());
        let ca_file = tls.ca_file.as_ref().map(|path| path.display().to_string());
        let credentials = self.credentials.clone();
        // Called with the read of the state the caller already holds (see `Credentials::issue`).
        let api = move |state: &StateMachineData, task_id: &str, token: u64| ApiAccess {
            endpoint: endpoint.clone(),
            credential: credentials.issue(state, task_id, token),
            ca_file: ca_file.clone(),
        };
        let mut rate = SpawnRate::new(self.config.system.agent_spawn_rate, tokio::time::Instant::now());
        let mut running: BTreeMap<TaskId, Attempt> = BTreeMap::new();
        // Attempts that ended here, until this node's state no longer shows their lease: their
        // outcome may not have applied here yet (or at all), and they must not run again.
        let mut ended: BTreeMap<TaskId, u64> = BTreeMap::new();
        let mut start_failures: BTreeMap<String, u32> = BTreeMap::new();
        let mut last_renewal = tokio::time::Instant::now();
        let mut renewal: Option<Renewal> = None;
        let mut renewals_failed: u32 = 0;
        let lease = Duration::from_millis(settings.lease_ms);
        let renew_interval = Duration::from_millis(settings.lease_renew_interval_ms);
        let margin = self_fence_margin(settings.lease_ms);
        // Leases granted by an entry already in the log at this moment were granted to an earlier
        // run of this node: their tokens are below the next entry's first. Told by the log, not
        // by a clock, so a clock that is off cannot make this run's leases look old.
        let first_token_of_this_run = fencing_token(self.log_end_at_start, 0);
        let mut changes = self.core.raft.metrics();
        // What the keeper was last told, by fencing token.
        let mut kept: BTreeMap<u64, tokio::time::Instant> = BTreeMap::new();
        loop {
            if let Some(keeper) = &self.keeper {
                tell_keeper(keeper, &running, &mut kept);
            }
            let raft_stopped_reporting = tokio::select! {
                woken = tokio::time::timeout(POLL_INTERVAL, changes.changed()) => matches!(woken, Ok(Err(_))),
                _ = stopped.wait_for(|stop| *stop) => {
                    running.values().for_each(|a| a.work.abort());
                    if let Some(renewal) = renewal.take() {
                        renewal.call.abort();
                    }
                    return;
                }
            };
            if raft_stopped_reporting {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            // Finished attempts: count start failures per agent.
            let finished: Vec<TaskId> =
                running.iter().filter(|(_, a)| a.work.is_finished()).map(|(id, _)| id.clone()).collect();
            for task_id in finished {
                let Some(attempt) = running.remove(&task_id) else { continue };
                ended.insert(task_id.clone(), attempt.token);
                let spawn_failed = attempt.work.await.unwrap_or(false);
                let failures = start_failures.entry(attempt.slot.clone()).or_default();
                *failures = if spawn_failed { *failures + 1 } else { 0 };
                if *failures >= SPAWN_FAILURES_MAX {
                    *failures = 0;
                    tracing::error!(node_id = self.core.id, agent_id = %attempt.slot, "the agent failed to start {SPAWN_FAILURES_MAX} times in a row; marking it FAILED until resumed");
                    let command =
                        TaskCommand::SetAgentState { agent_id: attempt.slot.clone(), state: AgentState::Failed };
                    if let Err(error) = self.core.write(Command::Task(command)).await {
                        tracing::warn!(agent_id = %attempt.slot, %error, "marking the agent FAILED did not apply");
                    }
                }
            }
            // What the replicated state says: the pool, and the leases on it.
            let now_ms = (self.core.clock)();
            let (spawned, registered, new_leases, held, interrupted) = {
                let state = self.core.state.read();
                let table = &state.app.tasks;
                let access = |task_id: &str, token: u64| api(&state, task_id, token);
                // Agents spawned at run time live in the replicated state only; terminated ones
                // are dropped at the next registration (configured ones stay, terminated).
                let spawned: BTreeMap<String, Slot> = table
                    .slots
                    .iter()
                    .filter(|(id, s)| {
                        s.node_id == self.core.id && !configured.contains_key(*id) && s.state != AgentState::Terminated
                    })
                    .map(|(id, s)| (id.clone(), s.clone()))
                    .collect();
                let own = table.slots.values().filter(|s| s.node_id == self.core.id).count();
                let registered = own == configured.len() + spawned.len()
                    && configured.iter().all(|(id, slot)| table.slots.get(id).is_some_and(|s| s.same_definition(slot)));
                let mut held: BTreeMap<TaskId, u64> = BTreeMap::new();
                let mut new_leases = Vec::new();
                let mut interrupted = Vec::new();
                for (slot_id, slot) in configured.iter().chain(spawned.iter()) {
                    let Some(task_id) = table.slot_holder.get(slot_id) else { continue };
                    let Some((task, lease)) = table.tasks.get(task_id).and_then(|t| Some((t, t.lease.as_deref()?)))
                    else {
                        continue;
                    };
                    let token = lease.token;
                    if ended.get(task_id) == Some(&token) {
                        // Its outcome is on its way; no renewal, no second run.
                        continue;
                    }
                    if running.get(task_id).is_none_or(|a| a.token != token) {
                        if token < first_token_of_this_run {
                            ended.insert(task_id.clone(), token);
                            interrupted.push((task_id.clone(), token, task.attempt));
                            continue;
                        }
                        if let Some(envelope) =
                            envelope_for(table, slot_id, task_id, now_ms, checkpoint_interval_ms, &access)
                        {
                            let lease_left = Duration::from_millis(lease.expires_at_ms.saturating_sub(now_ms));
                            new_leases.push((slot_id.clone(), slot.agent_type.clone(), envelope, lease_left));
                        }
                    }
                    held.insert(task_id.clone(), token);
                }
                (spawned, registered, new_leases, held, interrupted)
            };
            self.metrics.pool_registered.store(registered, std::sync::atomic::Ordering::Relaxed);
            // Leases of an earlier run of this node: their attempts were interrupted. Failed
            // retryably (in the background), so each task runs again as a new attempt.
            for (task_id, token, attempt) in interrupted {
                tracing::info!(node_id = self.core.id, task_id = %task_id, token, attempt, "a lease from before this node restarted: its attempt was interrupted; handing the task on as a new attempt");
                let error = format!(
                    "node {} restarted during attempt {attempt}; the attempt was interrupted and the task runs again as a new attempt",
                    self.core.id
                );
                self.report_in_background(TaskCommand::Fail { task_id, token, error, retryable: true });
            }
            if !registered && self.core.leader().is_some() {
                let pool = configured.iter().map(|(id, s)| (id.clone(), s.clone())).chain(spawned).collect();
                let command = Command::Task(TaskCommand::RegisterSlots { node_id: self.core.id, slots: pool });
                match self.core.write(command).await {
                    Ok(_) => continue,
                    // Still renew below: a refused registration must not make the node look dead.
                    Err(error) => {
                        tracing::warn!(node_id = self.core.id, %error, "registering the agent pool failed; retrying")
                    }
                }
            }
            {
                let state = self.core.state.read();
                let table = &state.app.tasks;
                ended.retain(|task_id, token| {
                    table.tasks.get(task_id).and_then(|t| t.lease.as_ref()).is_some_and(|l| l.token == *token)
                });
            }
            // Lease lost: stop the attempt (dropping it kills a command agent's process group).
            running.retain(|task_id, attempt| {
                let kept = held.get(task_id) == Some(&attempt.token);
                if !kept {
                    tracing::info!(node_id = self.core.id, task_id = %task_id, token = attempt.token, "lease lost; stopping the agent");
                    attempt.work.abort();
                }
                kept
            });
            // A renewal that came back proves every lease it renewed for a lease from its sending.
            if let Some(done) = renewal.take_if(|r| r.call.is_finished()) {
                match done.call.await {
                    Ok(Ok(Response::Task(TaskResponse::Renewed { lost, .. }))) => {
                        renewals_failed = 0;
                        for task_id in &lost {
                            if let Some(attempt) = running.remove(task_id) {
                                tracing::info!(node_id = self.core.id, task_id = %task_id, "lease not renewed; stopping the agent");
                                attempt.work.abort();
                            }
                        }
                        let proven = (done.sent + lease).checked_sub(margin).unwrap_or(done.sent);
                        for (task_id, token) in done.leases.iter().filter(|(id, _)| !lost.contains(*id)) {
                            if let Some(attempt) = running.get_mut(task_id).filter(|a| a.token == *token) {
                                attempt.live_until = attempt.live_until.max(proven);
                            }
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        renewals_failed += 1;
                        if renewals_failed == 1 {
                            tracing::warn!(node_id = self.core.id, %error, "lease renewal failed; agents stop before their leases could expire unless a renewal succeeds");
                        } else {
                            tracing::debug!(node_id = self.core.id, %error, renewals_failed, "lease renewal failed again");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(node_id = self.core.id, %error, "the lease renewal task ended abnormally")
                    }
                }
            }
            // Self-fencing: stop every attempt whose lease this node cannot prove live any more.
            let now = tokio::time::Instant::now();
            let unproven: Vec<TaskId> =
                running.iter().filter(|(_, a)| now >= a.live_until).map(|(id, _)| id.clone()).collect();
            for task_id in unproven {
                let Some(attempt) = running.remove(&task_id) else { continue };
                attempt.work.abort();
                ended.insert(task_id.clone(), attempt.token);
                self.metrics.self_fenced_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(node_id = self.core.id, task_id = %task_id, token = attempt.token, "no renewal proves this lease live any more; stopping the agent before the lease can expire (self-fencing)");
                let error = format!(
                    "node {} could not renew the lease in time and stopped the agent (self-fencing)",
                    self.core.id
                );
                self.report_in_background(TaskCommand::Fail { task_id, token: attempt.token, error, retryable: true });
            }
            // New leases: start their agents.
            for (slot_id, agent_type, (envelope, needs), lease_left) in new_leases {
                let backend = self.backends.get(&agent_type).cloned();
                let Some(backend) = backend else {
                    // A spawned agent of a type this node's configuration no longer has.
                    let error = format!("node {} has no backend for agent type {agent_type:?}", self.core.id);
                    let fail = TaskCommand::Fail {
                        task_id: envelope.task_id.clone(),
                        token: envelope.fencing_token,
                        error,
                        retryable: true,
                    };
                    if let Err(error) = self.core.write(Command::Task(fail)).await {
                        tracing::warn!(task_id = %envelope.task_id, %error, "failing an attempt with no backend did not apply");
                    }
                    continue;
                };
                if !backend.is_builtin() && !rate.try_take(tokio::time::Instant::now()) {
                    // Over system.agent_spawn_rate: started on a later wake-up (the lease is renewed meanwhile).
                    continue;
                }
                tracing::debug!(node_id = self.core.id, task_id = %envelope.task_id, agent_id = %slot_id, attempt = envelope.attempt, "starting an attempt");
                let task_id = envelope.task_id.clone();
                let token = envelope.fencing_token;
                // In the task's trace when it has one (exported); else only in the logs.
                let span = if traces::enabled() && !envelope.trace_parent.is_empty() {
                    let span = tracing::info_span!(
                        target: traces::TARGET,
                        "attempt",
                        task_id = %envelope.task_id,
                        agent_id = %slot_id,
                        attempt = envelope.attempt,
                        node_id = self.core.id,
                    );
                    traces::follow(&span, &envelope.trace_parent);
                    span
                } else {
                    tracing::info_span!(
                        "attempt",
                        task_id = %envelope.task_id,
                        agent_id = %slot_id,
                        attempt = envelope.attempt
                    )
                };
                let work = tokio::spawn(tracing::Instrument::instrument(
                    run_attempt(
                        self.core.clone(),
                        self.storage.clone(),
                        backend,
                        (envelope, needs),
                        self.metrics.clone(),
                    ),
                    span,
                ));
                let live_until = tokio::time::Instant::now() + lease.min(lease_left).saturating_sub(margin);
                running.insert(task_id, Attempt { token, slot: slot_id, work, live_until });
            }
            // Renew even with nothing running: the renewal is also this node's liveness signal.
            // One at a time, each bounded, so a renewal stuck on a lost leader is given up and
            // the next one goes to whoever leads by then.
            if renewal.is_none() && last_renewal.elapsed() >= renew_interval {
                let sent = tokio::time::Instant::now();
                last_renewal = sent;
                let leases = held.into_iter().collect::<Vec<_>>();
                let renew =
                    TaskCommand::Renew { node_id: self.core.id, leases: leases.clone(), lease_ms: settings.lease_ms };
                let core = self.core.clone();
                let call =
                    tokio::spawn(async move { core.write_within(Command::Task(renew), 2 * renew_interval).await });
                renewal = Some(Renewal { sent, leases: leases.into_iter().collect(), call });
            }
        }
    }

    /// Report `command` for an attempt this loop stopped, without waiting for it: a node that
    /// cannot reach the leader must keep fencing. If it never applies, the lease expires instead.
    fn report_in_background(&self, command: TaskCommand) {
        let core = self.core.clone();
        tokio::spawn(async move {
            if let Err(error) = core.write(Command::Task(command)).await {
                tracing::debug!(node_id = core.id, %error, "reporting a stopped attempt did not apply; its lease expires instead");
            }
        });
    }
}

/// Tell `keeper` how long each running attempt is proven live, when that changed, and forget
/// the attempts that left.
fn tell_keeper(keeper: &Keeper, running: &BTreeMap<TaskId, Attempt>, kept: &mut BTreeMap<u64, tokio::time::Instant>) {
    for attempt in running.values() {
        if kept.get(&attempt.token) != Some(&attempt.live_until) {
            keeper.prove(attempt.token, attempt.live_until.into_std());
            kept.insert(attempt.token, attempt.live_until);
        }
    }
    kept.retain(|token, _| {
        let live = running.values().any(|a| a.token == *token);
        if !live {
            keeper.release(*token);
        }
        live
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_limited_to_the_spawn_rate() {
        let start = tokio::time::Instant::now();
        let mut rate = SpawnRate::new(10, start);
        let burst = (0..20).filter(|_| rate.try_take(start)).count();
        assert_eq!(burst, 10, "a full bucket allows one second's worth at once");
        let later = start + Duration::from_millis(300);
        assert_eq!((0..20).filter(|_| rate.try_take(later)).count(), 3, "then 10 per second");
    }
}
