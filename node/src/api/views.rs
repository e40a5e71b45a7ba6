//! Views of replicated records as the API's messages (tasks, events, agents, counts), and the
//! conversions between the state machine's enums and the wire's. Shared by the gRPC services,
//! REST and `/metrics`; the JSON rendering of a task lives in `maos_client::views`.

use maos_client::proto::v1::{
    AgentState as WireAgentState, AgentView, Priority as WirePriority, TaskCounts, TaskEvent, TaskState as WireState,
    TaskView,
};
use maos_raft_store::tasks::{AgentState, Priority, Slot, Task, TaskState, TaskTable};
use tonic::Status;

use crate::api::status::invalid;
use crate::storage::{Payload, TaskPayloads};

/// Tasks by state (counts apply maintains: no scan), and the queue bound.
pub fn task_counts(table: &maos_raft_store::tasks::TaskTable) -> TaskCounts {
    let counts = &table.counts;
    TaskCounts {
        queue_limit: table.limits.queue_size as u64,
        pending: counts.pending,
        queued: counts.queued,
        running: counts.running,
        completed: counts.completed,
        failed: counts.failed,
        cancelled: counts.cancelled,
    }
}

pub fn priority_from(wire: i32) -> Result<Priority, Status> {
    match WirePriority::try_from(wire) {
        Ok(WirePriority::Unspecified | WirePriority::Normal) => Ok(Priority::Normal),
        Ok(WirePriority::Low) => Ok(Priority::Low),
        Ok(WirePriority::High) => Ok(Priority::High),
        Ok(WirePriority::Critical) => Ok(Priority::Critical),
        Err(_) => Err(invalid(format!("priority: {wire} is not one of LOW, NORMAL, HIGH, CRITICAL"))),
    }
}

pub fn priority_to(priority: Priority) -> WirePriority {
    match priority {
        Priority::Low => WirePriority::Low,
        Priority::Normal => WirePriority::Normal,
        Priority::High => WirePriority::High,
        Priority::Critical => WirePriority::Critical,
    }
}

pub fn state_to(state: TaskState) -> WireState {
    match state {
        TaskState::Pending => WireState::Pending,
        TaskState::Queued => WireState::Queued,
        TaskState::Running => WireState::Running,
        TaskState::Completed => WireState::Completed,
        TaskState::Failed => WireState::Failed,
        TaskState::Cancelled => WireState::Cancelled,
    }
}

pub fn state_from(wire: i32) -> Result<TaskState, Status> {
    match WireState::try_from(wire) {
        Ok(WireState::Pending) => Ok(TaskState::Pending),
        Ok(WireState::Queued) => Ok(TaskState::Queued),
        Ok(WireState::Running) => Ok(TaskState::Running),
        Ok(WireState::Completed) => Ok(TaskState::Completed),
        Ok(WireState::Failed) => Ok(TaskState::Failed),
        Ok(WireState::Cancelled) => Ok(TaskState::Cancelled),
        _ => {
            Err(invalid(format!("states: {wire} is not one of PENDING, QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED")))
        }
    }
}

/// Put the stored payloads `fetched` into `view`.
pub fn fill_view(view: &mut TaskView, payloads: &TaskPayloads, fetched: &std::collections::BTreeMap<Payload, String>) {
    if let Some(input) = payloads.input.as_ref().and_then(|p| fetched.get(p)) {
        view.input = input.clone();
    }
    if let Some(result) = &payloads.result {
        view.result = result.resolve(fetched).unwrap_or_default();
    }
    if let Some(checkpoint) = payloads.checkpoint.as_ref().and_then(|p| fetched.get(p)) {
        view.checkpoint = checkpoint.clone();
    }
}

/// The view of one task.
pub fn task_view(table: &TaskTable, task: &Task) -> TaskView {
    let lease = task.lease.as_ref();
    TaskView {
        task_id: task.spec.id.clone(),
        task_type: task.spec.task_type.clone(),
        priority: priority_to(task.spec.priority) as i32,
        state: state_to(task.state) as i32,
        attempt: task.attempt,
        result: task.result.clone().unwrap_or_default(),
        cause: task.cause.clone().unwrap_or_default(),
        slot: lease.map(|l| l.slot.clone()).unwrap_or_default(),
        node_id: lease.map(|l| l.node_id).unwrap_or(0),
        fencing_token: lease.map(|l| l.token).unwrap_or(0),
        depends_on: task.spec.depends_on.clone(),
        parent: task.spec.parent.clone().unwrap_or_default(),
        submitter: task.spec.submitter.clone(),
        children: table.children.get(&task.spec.id).map(|c| c.iter().cloned().collect()).unwrap_or_default(),
        planning: task.spec.planner_type.is_some(),
        expanded: task.expanded,
        checkpoint: task.checkpoint.as_ref().map(|c| c.data.clone()).unwrap_or_default(),
        checkpoint_attempt: task.checkpoint.as_ref().map(|c| c.attempt).unwrap_or(0),
        progress_percent: task.progress.as_ref().map(|p| u32::from(p.percent)).unwrap_or(0),
        progress_message: task.progress.as_ref().map(|p| p.message.clone()).unwrap_or_default(),
        input_tokens: task.usage.input_tokens,
        output_tokens: task.usage.output_tokens,
        max_retries: task.spec.max_retries,
        description: task.spec.description.clone(),
        idempotency_key: task.spec.idempotency_key.clone().unwrap_or_default(),
        input: task.spec.input.clone(),
        trace_id: trace_id(&task.spec.trace_parent).to_string(),
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), empty without one.
fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32).unwrap_or("")
}

pub fn event(task: &Task, applied_index: u64, finished: bool) -> TaskEvent {
    TaskEvent {
        task_id: task.spec.id.clone(),
        state: state_to(task.state) as i32,
        attempt: task.attempt,
        node_id: task.lease.as_ref().map(|l| l.node_id).unwrap_or(0),
        progress_percent: task.progress.as_ref().map(|p| u32::from(p.percent)).unwrap_or(0),
        progress_message: task.progress.as_ref().map(|p| p.message.clone()).unwrap_or_default(),
        cause: task.cause.clone().unwrap_or_default(),
        result: task.result.clone().unwrap_or_default(),
        applied_index,
        finished,
    }
}

/// What a watch reports of a task: an event is sent when this changes.
pub type Fingerprint = (TaskState, u32, u64, Option<(u8, String)>, Option<String>);

pub fn fingerprint(task: &Task) -> Fingerprint {
    (
        task.state,
        task.attempt,
        task.lease.as_ref().map(|l| l.token).unwrap_or(0),
        task.progress.as_ref().map(|p| (p.percent, p.message.clone())),
        task.cause.clone(),
    )
}

/// An agent's state as the API shows it.
pub fn agent_state(table: &TaskTable, agent_id: &str, slot: &Slot) -> WireAgentState {
    match slot.state {
        AgentState::Active if table.slot_holder.contains_key(agent_id) => WireAgentState::Busy,
        AgentState::Active => WireAgentState::Idle,
        AgentState::Draining => WireAgentState::Draining,
        AgentState::Failed => WireAgentState::Failed,
        AgentState::Terminated => WireAgentState::Terminated,
    }
}

pub fn agent_view(table: &TaskTable, agent_id: &str, slot: &Slot) -> AgentView {
    AgentView {
        agent_id: agent_id.to_string(),
        node_id: slot.node_id,
        agent_type: slot.agent_type.clone(),
        backend: slot.backend.clone(),
        capabilities: slot.capabilities.iter().cloned().collect(),
        state: agent_state(table, agent_id, slot) as i32,
        task_id: table.slot_holder.get(agent_id).cloned().unwrap_or_default(),
    }
}
