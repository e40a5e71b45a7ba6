//! One attempt: its envelope (input, dependency results, checkpoint, credential), the backend
//! run with events forwarded under the lease's token, and the report of its outcome.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::tasks::{TaskCommand, TaskId, TaskTable, TASK_TEXT_BYTES_MAX};
use maos_raft_store::Command;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::envelope::{AgentEvent, ApiAccess, Envelope, EnvelopeCheckpoint, Outcome, OutcomeKind, ENVELOPE_FORMAT};
use super::{AgentMetrics, Backend};
use crate::raft::core::NodeCore;
use crate::storage::{EnvelopeNeeds, Payload, ResultRef, Storage, StorageError};
use crate::telemetry::traces;

/// Events (progress, checkpoints) queued from one agent before it is made to wait.
const EVENTS_QUEUED_MAX: usize = 64;

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
        trace_parent: task.spec.trace_parent.clone(),
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
pub(super) async fn report(
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
        OutcomeKind::Completed(output) if envelope.planning => match super::envelope::parse_plan(&output) {
            Ok(subtasks) => TaskCommand::Expand { task_id: task_id.clone(), token, subtasks },
            Err(error) => TaskCommand::Fail { task_id: task_id.clone(), token, error, retryable: true },
        },
        OutcomeKind::Completed(result) => {
            match storage.complete_command_retrying(&core.state, &task_id, token, result, deadline).await {
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
    // Inside the attempt's span, so in the task's trace when it has one.
    let span = match traces::enabled() && !envelope.trace_parent.is_empty() {
        true => tracing::info_span!(target: traces::TARGET, "complete", outcome = outcome_name(&command)),
        false => tracing::Span::none(),
    };
    match core.write(Command::Task(command)).instrument(span).await {
        Ok(_) => {}
        Err(crate::raft::core::CoreError::Rejected(maos_raft_store::Rejection::Task(
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

fn outcome_name(command: &TaskCommand) -> &'static str {
    match command {
        TaskCommand::Complete { .. } => "completed",
        TaskCommand::Expand { .. } => "planned",
        _ => "failed",
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
pub(super) async fn run_attempt(
    core: Arc<NodeCore>,
    storage: Arc<Storage>,
    backend: Arc<Backend>,
    (mut envelope, needs): (Envelope, EnvelopeNeeds),
    metrics: Arc<AgentMetrics>,
) -> bool {
    let started = std::time::Instant::now();
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
    metrics::histogram!("maos_agent_spawn_duration_seconds", "type" => envelope.task_type.clone())
        .record(started.elapsed().as_secs_f64());
    let _running = Running(metrics.clone());
    let (events, mut received) = mpsc::channel(EVENTS_QUEUED_MAX);
    let (task_id, token) = (envelope.task_id.clone(), envelope.fencing_token);
    let forward = |event: AgentEvent| {
        let task_id = task_id.clone();
        let core = core.clone();
        let storage = storage.clone();
        async move {
            let command = match event {
                AgentEvent::Checkpoint { data } => {
                    match storage.checkpoint_command(&core.state, &task_id, token, data).await {
                        Ok(command) => command,
                        Err(error) => {
                            tracing::warn!(task_id = %task_id, token, %error, "an agent's checkpoint was not saved");
                            return;
                        }
                    }
                }
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
    // One line per attempt, inside its span (task and agent ids), as Celery's workers log each task.
    tracing::info!(
        token,
        elapsed_ms = started.elapsed().as_millis() as u64,
        spawn_failed,
        "the agent ended; reporting"
    );
    report(&core, &storage, &envelope, outcome, deadline).await;
    spawn_failed
}
