//! The agent runtime: this node's pool of agents, supervised.
//!
//! The pool comes from `agents.types` (plus agents spawned at run time, which live in the
//! replicated state): one agent per slot, registered through Raft so the scheduler sees it. The
//! runtime watches the applied state; for each lease granted to one of its agents it builds the
//! [`Envelope`], starts the agent's backend (process and model agents within
//! `system.agent_spawn_rate`), forwards progress and checkpoints with the lease's
//! fencing token, and reports the outcome: `Complete`, `Fail`, or for a planning attempt
//! `Expand`. It renews all its leases in one command per interval, which is also the node's
//! liveness signal. When a lease is lost (expired, cancelled, re-leased, agent terminated) the
//! attempt is dropped, which kills a command agent's whole process group.
//!
//! An agent whose backend fails to start three times in a row is marked FAILED (no more work)
//! until an operator resumes it.

pub mod builtin;
pub mod claude;
pub mod command;
pub mod credential;
pub mod envelope;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::tasks::{AgentState, Slot, TaskCommand, TaskId, TaskResponse, TaskTable, TASK_TEXT_BYTES_MAX};
use maos_raft_store::{Command, Response};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{parse_bytes, BackendKind, Config};
use crate::core::NodeCore;
use crate::storage::{EnvelopeNeeds, Payload, ResultRef, Storage, StorageError};
use claude::{ApiKey, ClaudeBackend};
use command::CommandBackend;
use credential::Credentials;
use envelope::{AgentEvent, ApiAccess, Envelope, EnvelopeCheckpoint, Outcome, OutcomeKind, ENVELOPE_FORMAT};

/// The longest the runtime waits before looking at the state again without being woken.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Consecutive start failures after which an agent is marked FAILED.
const SPAWN_FAILURES_MAX: u32 = 3;
/// Events (progress, checkpoints) queued from one agent before it is made to wait.
const EVENTS_QUEUED_MAX: usize = 64;

/// How an agent type runs.
pub enum Backend {
    Builtin,
    Command(CommandBackend),
    Claude(ClaudeBackend),
}

impl Backend {
    /// Run one attempt. Dropping the future stops the agent.
    pub async fn run(&self, envelope: &Envelope, events: mpsc::Sender<AgentEvent>) -> Outcome {
        match self {
            Backend::Builtin => builtin::run(envelope).await,
            Backend::Command(backend) => backend.run(envelope, events).await,
            Backend::Claude(backend) => backend.run(envelope).await,
        }
    }

    fn is_builtin(&self) -> bool {
        matches!(self, Backend::Builtin)
    }
}

/// Counters of this node's agents (exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Attempts started (`maos_agent_spawns_total`).
    pub spawns_total: AtomicU64,
    /// Attempts whose agent could not be started (`maos_agent_spawn_failures_total`).
    pub spawn_failures_total: AtomicU64,
    /// Attempts running now.
    pub running: AtomicU64,
}

impl AgentMetrics {
    /// The agent metrics in Prometheus text format, for node `node_id` in `table`.
    pub fn render(&self, table: &TaskTable, node_id: u64) -> String {
        let mine = || table.slots.iter().filter(move |(_, slot)| slot.node_id == node_id);
        let total = mine().filter(|(_, s)| s.state != AgentState::Terminated).count();
        let active = mine().filter(|(id, _)| table.slot_holder.contains_key(*id)).count();
        let mut by_type: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (id, slot) in mine().filter(|(_, s)| s.state != AgentState::Terminated) {
            let state = if table.slot_holder.contains_key(id) { "busy" } else { "idle" };
            *by_type.entry((slot.agent_type.as_str(), state)).or_default() += 1;
        }
        let mut text = format!(
            "# HELP maos_agents_active Agents running an attempt on this node.\n# TYPE maos_agents_active gauge\nmaos_agents_active {active}\n\
             # HELP maos_agents_total Agents of this node that are not terminated.\n# TYPE maos_agents_total gauge\nmaos_agents_total {total}\n\
             # HELP maos_agent_spawns_total Attempts started on this node.\n# TYPE maos_agent_spawns_total counter\nmaos_agent_spawns_total {}\n\
             # HELP maos_agent_spawn_failures_total Attempts whose agent could not be started.\n# TYPE maos_agent_spawn_failures_total counter\nmaos_agent_spawn_failures_total {}\n\
             # HELP maos_agent_slots Agent slots of this node by type and use.\n# TYPE maos_agent_slots gauge\n",
            self.spawns_total.load(Ordering::Relaxed),
            self.spawn_failures_total.load(Ordering::Relaxed),
        );
        for ((agent_type, state), count) in by_type {
            text.push_str(&format!("maos_agent_slots{{type=\"{agent_type}\",state=\"{state}\"}} {count}\n"));
        }
        text
    }
}

/// Why the runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{key}: {message}")]
    Config { key: String, message: String },
}

/// The backends of this node's agent types, built from configuration.
pub fn backends(config: &Config) -> Result<BTreeMap<String, Arc<Backend>>, RuntimeError> {
    let defaults = &config.agents.defaults;
    let claude = &config.agents.claude;
    // The key and HTTP client are shared by every claude type; made once, only if one exists.
    let claude_shared = match config.agents.types.iter().find(|(_, t)| t.backend == BackendKind::Claude) {
        Some((name, _)) => {
            let key = ApiKey::from_environment(claude.api_key_file.as_deref())
                .map_err(|message| RuntimeError::Config { key: format!("agents.types.{name}.backend"), message })?;
            let http = ClaudeBackend::http_client(Duration::from_secs(claude.request_timeout))
                .map_err(|message| RuntimeError::Config { key: "agents.claude".into(), message })?;
            Some((key, http))
        }
        None => None,
    };
    let known_types: Vec<String> = config.agents.types.keys().cloned().collect();
    let mut built = BTreeMap::new();
    for (name, agent) in &config.agents.types {
        let memory = agent.max_memory.as_deref().unwrap_or(&defaults.max_memory);
        let max_memory_bytes = parse_bytes(memory)
            .map_err(|message| RuntimeError::Config { key: format!("agents.types.{name}.max_memory"), message })?;
        let timeout = Duration::from_secs(agent.timeout.unwrap_or(defaults.timeout));
        let backend = match agent.backend {
            BackendKind::Builtin => Backend::Builtin,
            BackendKind::Command => Backend::Command(CommandBackend {
                program: agent.command.clone(),
                env: agent.env.clone(),
                max_memory_bytes,
                timeout,
            }),
            BackendKind::Claude => {
                let Some((key, http)) = &claude_shared else { unreachable!("made above when a claude type exists") };
                Backend::Claude(ClaudeBackend {
                    http: http.clone(),
                    base_url: claude.base_url.clone(),
                    key: key.clone(),
                    model: claude.model.clone(),
                    max_tokens: claude.max_tokens,
                    system_prompt: agent.system_prompt.clone(),
                    max_retries: claude.max_retries,
                    known_types: known_types.clone(),
                })
            }
        };
        built.insert(name.clone(), Arc::new(backend));
    }
    Ok(built)
}

/// This node's configured agents: `n<node>/<type>/<i>`.
pub fn configured_slots(config: &Config) -> BTreeMap<String, Slot> {
    let node_id = config.node.id;
    config
        .agents
        .types
        .iter()
        .flat_map(|(agent_type, agent)| {
            (0..agent.slots).map(move |i| {
                let slot = Slot {
                    node_id,
                    agent_type: agent_type.clone(),
                    capabilities: agent.capabilities.iter().cloned().collect(),
                    backend: agent.backend.name().into(),
                    state: AgentState::Active,
                };
                (format!("n{node_id}/{agent_type}/{i}"), slot)
            })
        })
        .collect()
}

/// The envelope of the attempt holding `slot_id`'s lease, if any, and what it still needs from
/// the task-data store (see [`load_envelope`]).
pub fn envelope_for(
    table: &TaskTable,
    slot_id: &str,
    task_id: &TaskId,
    now_ms: u64,
    checkpoint_interval_ms: u64,
    api: &dyn Fn(&str, u64) -> ApiAccess,
) -> Option<(Envelope, EnvelopeNeeds)> {
    let task = table.tasks.get(task_id)?;
    let lease = task.lease.as_ref()?;
    let mut needs = EnvelopeNeeds::default();
    let mut dependency_results = BTreeMap::new();
    for dependency in task.spec.depends_on.iter().filter_map(|d| table.tasks.get(d)) {
        match ResultRef::of(table, dependency) {
            ResultRef::Inline(Some(result)) => {
                dependency_results.insert(dependency.spec.id.clone(), result);
            }
            ResultRef::Inline(None) => {}
            stored => needs.dependencies.push((dependency.spec.id.clone(), stored)),
        }
    }
    let needs = EnvelopeNeeds {
        input: task.spec.input_stored.then(|| Payload::Input(task_id.clone())),
        checkpoint: task.checkpoint.as_ref().filter(|c| c.stored).map(|_| Payload::Checkpoint(task_id.clone())),
        ..needs
    };
    let envelope = Envelope {
        format: ENVELOPE_FORMAT,
        task_id: task_id.clone(),
        attempt: task.attempt,
        agent_id: slot_id.to_string(),
        task_type: task.spec.task_type.clone(),
        description: task.spec.description.clone(),
        input: task.spec.input.clone(),
        planning: task.spec.planner_type.is_some(),
        dependency_results,
        checkpoint: task.checkpoint.as_ref().map(|c| EnvelopeCheckpoint { data: c.data.clone(), attempt: c.attempt }),
        fencing_token: lease.token,
        timeout_ms: lease.attempt_deadline_ms.saturating_sub(now_ms).max(1),
        checkpoint_interval_ms,
        api: api(task_id, lease.token),
    };
    Some((envelope, needs))
}

/// Fill the payloads `needs` names into `envelope`, retrying while the store is unavailable
/// until `deadline`.
pub async fn load_envelope(
    storage: &Storage,
    envelope: &mut Envelope,
    needs: &EnvelopeNeeds,
    deadline: tokio::time::Instant,
) -> Result<(), StorageError> {
    if needs.is_empty() {
        return Ok(());
    }
    let fetched = storage.fetch_retrying(needs.wanted(), deadline).await?;
    let checkpoint = envelope.checkpoint.as_mut().map(|c| &mut c.data);
    needs.fill(&fetched, &mut envelope.input, &mut envelope.dependency_results, checkpoint);
    Ok(())
}

/// Report one attempt's outcome through Raft: usage, then `Expand`, `Complete` or `Fail`. A
/// result goes to the task-data store first; while the store is down this waits (the lease is
/// still renewed) until `deadline`, the attempt's end.
async fn report(
    core: &NodeCore,
    storage: &Storage,
    envelope: &Envelope,
    outcome: Outcome,
    deadline: tokio::time::Instant,
) {
    let task_id = envelope.task_id.clone();
    let token = envelope.fencing_token;
    if outcome.usage != Default::default() {
        let usage = TaskCommand::RecordUsage { task_id: task_id.clone(), token, usage: outcome.usage };
        if let Err(error) = core.write(Command::Task(usage)).await {
            tracing::warn!(task_id = %task_id, token, %error, "recording token usage failed");
        }
    }
    let command = match outcome.kind {
        OutcomeKind::Completed(output) if envelope.planning => match envelope::parse_plan(&output) {
            Ok(subtasks) => TaskCommand::Expand { task_id: task_id.clone(), token, subtasks },
            Err(error) => TaskCommand::Fail { task_id: task_id.clone(), token, error, retryable: true },
        },
        OutcomeKind::Completed(result) => {
            match storage.complete_command_retrying(core, &task_id, token, result, deadline).await {
                Ok(complete) => complete,
                Err(error) if error.is_refused_payload() => {
                    TaskCommand::Fail { task_id: task_id.clone(), token, error: error.to_string(), retryable: false }
                }
                Err(error) => {
                    tracing::warn!(task_id = %task_id, token, %error, "the result could not be stored; the lease will expire and the task retry");
                    return;
                }
            }
        }
        OutcomeKind::Failed { error, retryable } => {
            let error = truncate(error, TASK_TEXT_BYTES_MAX);
            TaskCommand::Fail { task_id: task_id.clone(), token, error, retryable }
        }
    };
    let planning = matches!(command, TaskCommand::Expand { .. });
    match core.write(Command::Task(command)).await {
        Ok(_) => {}
        Err(crate::core::CoreError::Rejected(maos_raft_store::Rejection::Task(
            rejection @ maos_raft_store::tasks::TaskRejection::InvalidSpec { .. },
        ))) if planning => {
            // The plan broke a rule: the attempt fails with the reason, and may plan again.
            let error = format!("the plan was refused: {rejection}");
            let fail = TaskCommand::Fail { task_id: task_id.clone(), token, error, retryable: true };
            if let Err(error) = core.write(Command::Task(fail)).await {
                tracing::warn!(task_id = %task_id, token, %error, "reporting the refused plan failed");
            }
        }
        Err(error) => {
            tracing::info!(task_id = %task_id, token, %error, "the outcome was not applied; the lease may be gone or will expire and the task retry")
        }
    }
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let cut = (0..=limit.saturating_sub(3)).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// Run one attempt to its end and report it; returns whether the agent failed to start.
async fn run_attempt(
    core: Arc<NodeCore>,
    storage: Arc<Storage>,
    backend: Arc<Backend>,
    (mut envelope, needs): (Envelope, EnvelopeNeeds),
    metrics: Arc<AgentMetrics>,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(envelope.timeout_ms);
    if let Err(error) = load_envelope(&storage, &mut envelope, &needs, deadline).await {
        // The attempt's time ran out waiting for its data; its lease expires and it retries.
        tracing::warn!(task_id = %envelope.task_id, %error, "the attempt's data could not be loaded");
        return false;
    }
    struct Running(Arc<AgentMetrics>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.running.fetch_sub(1, Ordering::Relaxed);
        }
    }
    metrics.running.fetch_add(1, Ordering::Relaxed);
    metrics.spawns_total.fetch_add(1, Ordering::Relaxed);
    let _running = Running(metrics.clone());
    let (events, mut received) = mpsc::channel(EVENTS_QUEUED_MAX);
    let (task_id, token) = (envelope.task_id.clone(), envelope.fencing_token);
    let forward = |event: AgentEvent| {
        let task_id = task_id.clone();
        let core = core.clone();
        let storage = storage.clone();
        async move {
            let command = match event {
                AgentEvent::Checkpoint { data } => match storage.checkpoint_command(&core, &task_id, token, data).await
                {
                    Ok(command) => command,
                    Err(error) => {
                        tracing::warn!(task_id = %task_id, token, %error, "an agent's checkpoint was not saved");
                        return;
                    }
                },
                AgentEvent::Progress { percent, message } => {
                    TaskCommand::ReportProgress { task_id: task_id.clone(), token, percent, message }
                }
            };
            if let Err(error) = core.write(Command::Task(command)).await {
                tracing::info!(task_id = %task_id, token, %error, "an agent's report was not applied");
            }
        }
    };
    let outcome = {
        let run = backend.run(&envelope, events);
        tokio::pin!(run);
        loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                Some(event) = received.recv() => forward(event).await,
            }
        }
    };
    // Reports sent before the agent ended are applied before its outcome.
    while let Some(event) = received.recv().await {
        forward(event).await;
    }
    let spawn_failed = outcome.spawn_failed;
    if spawn_failed {
        metrics.spawn_failures_total.fetch_add(1, Ordering::Relaxed);
    }
    report(&core, &storage, &envelope, outcome, deadline).await;
    spawn_failed
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
}

/// This node's agent runtime.
pub struct AgentRuntime {
    pub core: Arc<NodeCore>,
    pub storage: Arc<Storage>,
    pub config: Config,
    pub backends: BTreeMap<String, Arc<Backend>>,
    pub credentials: Arc<Credentials>,
    pub metrics: Arc<AgentMetrics>,
}

impl AgentRuntime {
    /// Run until `stopped`.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let configured = configured_slots(&self.config);
        let settings = self.config.scheduler.clone();
        let checkpoint_interval_ms = self.config.system.checkpoint_interval.saturating_mul(1_000);
        let endpoint = format!("http://{}", self.config.advertised_api_addr());
        let credentials = self.credentials.clone();
        let api = move |task_id: &str, token: u64| ApiAccess {
            endpoint: endpoint.clone(),
            credential: credentials.issue(task_id, token),
        };
        let mut rate = SpawnRate::new(self.config.system.agent_spawn_rate, tokio::time::Instant::now());
        let mut running: BTreeMap<TaskId, Attempt> = BTreeMap::new();
        // Attempts that ended here, until this node's state no longer shows their lease: their
        // outcome may not have applied here yet (or at all), and they must not run again.
        let mut ended: BTreeMap<TaskId, u64> = BTreeMap::new();
        let mut start_failures: BTreeMap<String, u32> = BTreeMap::new();
        let mut last_renewal = tokio::time::Instant::now();
        let mut changes = self.core.raft.metrics();
        loop {
            let raft_stopped_reporting = tokio::select! {
                woken = tokio::time::timeout(POLL_INTERVAL, changes.changed()) => matches!(woken, Ok(Err(_))),
                _ = stopped.wait_for(|stop| *stop) => {
                    running.values().for_each(|a| a.work.abort());
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
            let (spawned, registered, new_leases, held) = {
                let state = self.core.state.read();
                let table = &state.app.tasks;
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
                for (slot_id, slot) in configured.iter().chain(spawned.iter()) {
                    let Some(task_id) = table.slot_holder.get(slot_id) else { continue };
                    let Some(token) = table.tasks.get(task_id).and_then(|t| t.lease.as_ref()).map(|l| l.token) else {
                        continue;
                    };
                    if ended.get(task_id) == Some(&token) {
                        // Its outcome is on its way; no renewal, no second run.
                        continue;
                    }
                    held.insert(task_id.clone(), token);
                    if running.get(task_id).is_none_or(|a| a.token != token) {
                        if let Some(envelope) =
                            envelope_for(table, slot_id, task_id, now_ms, checkpoint_interval_ms, &api)
                        {
                            new_leases.push((slot_id.clone(), slot.agent_type.clone(), envelope));
                        }
                    }
                }
                (spawned, registered, new_leases, held)
            };
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
            // New leases: start their agents.
            for (slot_id, agent_type, (envelope, needs)) in new_leases {
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
                let work = tokio::spawn(run_attempt(
                    self.core.clone(),
                    self.storage.clone(),
                    backend,
                    (envelope, needs),
                    self.metrics.clone(),
                ));
                running.insert(task_id, Attempt { token, slot: slot_id, work });
            }
            // Renew even with nothing running: the renewal is also this node's liveness signal.
            if last_renewal.elapsed() >= Duration::from_millis(settings.lease_renew_interval_ms) {
                last_renewal = tokio::time::Instant::now();
                let leases = held.into_iter().collect();
                let renew = TaskCommand::Renew { node_id: self.core.id, leases, lease_ms: settings.lease_ms };
                match self.core.write(Command::Task(renew)).await {
                    Ok(Response::Task(TaskResponse::Renewed { lost, .. })) => {
                        for task_id in lost {
                            if let Some(attempt) = running.remove(&task_id) {
                                tracing::info!(node_id = self.core.id, task_id = %task_id, "lease not renewed; stopping the agent");
                                attempt.work.abort();
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, "lease renewal failed; retrying next interval"),
                }
            }
        }
    }
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

    #[test]
    fn agent_metrics_count_this_nodes_agents_by_type_and_use() {
        let mut table = TaskTable::default();
        let slot = |node_id, agent_type: &str, state| Slot {
            node_id,
            agent_type: agent_type.into(),
            state,
            ..Slot::default()
        };
        table.slots.insert("n1/coder/0".into(), slot(1, "coder", AgentState::Active));
        table.slots.insert("n1/coder/1".into(), slot(1, "coder", AgentState::Active));
        table.slots.insert("n1/coder/2".into(), slot(1, "coder", AgentState::Terminated));
        table.slots.insert("n2/coder/0".into(), slot(2, "coder", AgentState::Active));
        table.slot_holder.insert("n1/coder/0".into(), "task".into());
        let metrics = AgentMetrics::default();
        metrics.spawn_failures_total.fetch_add(2, Ordering::Relaxed);
        let text = metrics.render(&table, 1);
        for line in [
            "maos_agents_active 1\n",
            "maos_agents_total 2\n",
            "maos_agent_spawn_failures_total 2\n",
            "maos_agent_slots{type=\"coder\",state=\"busy\"} 1\n",
            "maos_agent_slots{type=\"coder\",state=\"idle\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
