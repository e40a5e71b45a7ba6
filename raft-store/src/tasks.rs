//! Tasks, leases and fencing in the replicated state: the pure part of scheduling.
//!
//! Every transition is a [`TaskCommand`] applied with the leader's time stamp and a fencing token
//! derived from the log position, and every refusal is a typed [`TaskRejection`] that changes
//! nothing. The scheduler (leader-only, in `maos-node`) reads this table and proposes commands;
//! it never changes the table itself.
//!
//! States: PENDING (waiting on dependencies) → QUEUED (ready, possibly not before a retry time)
//! → RUNNING (leased to one slot) → COMPLETED / FAILED / CANCELLED. A failed or expired attempt
//! returns the task to QUEUED with a backoff while attempts remain.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A task's id: time-ordered (UUIDv7), chosen by the node that accepted the submit.
pub type TaskId = String;

/// Upper bound on a task's inline input, description, result or error, in bytes.
pub const TASK_TEXT_BYTES_MAX: usize = 16 * 1024;
/// Upper bound on a task's dependencies.
pub const DEPENDENCIES_MAX: usize = 256;
/// Upper bound on a task's labels.
pub const LABELS_MAX: usize = 32;
/// Upper bound on `max_retries`.
pub const RETRIES_MAX: u32 = 100;

/// Scheduling priority; higher runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    Low,
    Normal,
    High,
    Critical,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Pending,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed | TaskState::Cancelled)
    }
}

/// What a client submits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: TaskId,
    pub task_type: String,
    pub priority: Priority,
    pub description: String,
    pub input: String,
    pub depends_on: Vec<TaskId>,
    pub parent: Option<TaskId>,
    pub max_retries: u32,
    /// Wall time one attempt may run before it counts as failed.
    pub timeout_ms: u64,
    pub idempotency_key: Option<String>,
    pub submitter: String,
    pub labels: BTreeMap<String, String>,
    /// Capabilities the agent slot must have, beyond matching `task_type`.
    #[serde(default)]
    pub capabilities: BTreeSet<String>,
}

/// One place an agent can run one attempt at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub node_id: u64,
    pub agent_type: String,
    pub capabilities: BTreeSet<String>,
}

/// One attempt's hold on one agent slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The agent slot, `node/agent/slot`.
    pub slot: String,
    pub node_id: u64,
    /// Derived from the log position that granted the lease; every later lease on any task has a
    /// larger token. Heartbeats, completions and failures must present it.
    pub token: u64,
    pub expires_at_ms: u64,
    /// When this attempt must end, whatever its lease renewals.
    pub attempt_deadline_ms: u64,
}

/// A task as the state machine holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub spec: TaskSpec,
    pub state: TaskState,
    /// Attempts started so far; never above `max_retries + 1`.
    pub attempt: u32,
    /// A retried task is not assigned before this time.
    pub not_before_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Boxed: most tasks are not running, and the box keeps every task record smaller.
    pub lease: Option<Box<Lease>>,
    pub result: Option<String>,
    /// Why the task (or its last attempt) failed or was cancelled.
    pub cause: Option<String>,
}

/// Limits every replica applies identically (set through [`TaskCommand::Configure`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLimits {
    /// Open (non-terminal) tasks at most; more submits are refused, retryably.
    pub queue_size: usize,
    /// How long a task may wait on its dependencies.
    pub dependency_timeout_ms: u64,
    pub retry_backoff_base_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// Children of one parent running at once, at most.
    pub max_parallel_branches: usize,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            queue_size: 100_000,
            dependency_timeout_ms: 3_600_000,
            retry_backoff_base_ms: 1_000,
            retry_backoff_max_ms: 300_000,
            max_parallel_branches: 10,
        }
    }
}

/// Upper bound on slots one node registers.
pub const SLOTS_PER_NODE_MAX: usize = 4_096;

/// Task commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TaskCommand {
    Submit {
        spec: TaskSpec,
    },
    Assign {
        task_id: TaskId,
        slot: String,
        node_id: u64,
        lease_ms: u64,
    },
    /// One node's heartbeat for all its leases (sent even with none: it also says the node is
    /// alive, which the scheduler needs before it uses the node's slots).
    Renew {
        node_id: u64,
        leases: Vec<(TaskId, u64)>,
        lease_ms: u64,
    },
    Complete {
        task_id: TaskId,
        token: u64,
        result: String,
    },
    Fail {
        task_id: TaskId,
        token: u64,
        error: String,
        retryable: bool,
    },
    Cancel {
        task_id: TaskId,
        reason: String,
    },
    /// Expire leases and attempts past their time, and tasks past their dependency timeout.
    Tick,
    /// A new leader extends every live lease so that an election never expires them.
    ExtendLeases {
        by_ms: u64,
    },
    Configure {
        limits: TaskLimits,
    },
    /// Replace node `node_id`'s slots (its agent pool). Leases on slots that disappear stay until
    /// they end; no new work goes to them.
    RegisterSlots {
        node_id: u64,
        slots: BTreeMap<String, Slot>,
    },
}

/// Results of task commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TaskResponse {
    Submitted { task_id: TaskId, duplicate: bool },
    Assigned { token: u64, expires_at_ms: u64 },
    Renewed { renewed: Vec<TaskId>, lost: Vec<TaskId> },
    Completed,
    AttemptFailed { will_retry: bool, attempt: u32 },
    Cancelled { tasks: Vec<TaskId> },
    Ticked { failed_attempts: Vec<TaskId>, failed_tasks: Vec<TaskId> },
    Extended { leases: usize },
    Configured,
    SlotsRegistered { slots: usize },
}

/// Why a task command was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
// Its own tag name: it travels inside `Rejection`, whose tag is `reason`.
#[serde(tag = "task_reason", rename_all = "snake_case")]
pub enum TaskRejection {
    #[error("field `{field}` is invalid: {message}")]
    InvalidSpec { field: String, message: String },
    #[error("task {task_id} does not exist")]
    UnknownTask { task_id: TaskId },
    #[error("depends_on: task {task_id} does not exist; submit it first")]
    UnknownDependency { task_id: TaskId },
    #[error("task id {task_id} is already used by another task")]
    DuplicateId { task_id: TaskId },
    #[error("the task queue is full ({limit} open tasks); retry later")]
    QueueFull { limit: usize },
    #[error("task {task_id}: fencing token {presented} is stale (the current lease has {current:?}); this attempt no longer owns the task")]
    StaleToken { task_id: TaskId, presented: u64, current: Option<u64> },
    #[error("task {task_id} is {state:?}, not {expected:?}")]
    WrongState { task_id: TaskId, state: TaskState, expected: TaskState },
    #[error("task {task_id} is not assignable before {not_before_ms} (retry backoff)")]
    NotYet { task_id: TaskId, not_before_ms: u64 },
    #[error("slot {slot} is unknown, busy, or does not fit task {task_id} (type and capabilities)")]
    SlotUnavailable { task_id: TaskId, slot: String },
}

/// All tasks and their indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTable {
    /// Boxed records: a B-tree node then holds small entries, so its slack costs little.
    pub tasks: BTreeMap<TaskId, Box<Task>>,
    pub by_idempotency_key: BTreeMap<String, TaskId>,
    /// Task → tasks that depend on it.
    pub dependents: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// Task → its children (tasks naming it as parent).
    pub children: BTreeMap<TaskId, BTreeSet<TaskId>>,
    /// Registered agent slots by id (`node/agent/slot`).
    pub slots: BTreeMap<String, Slot>,
    /// Slot → the task whose lease holds it.
    pub slot_holder: BTreeMap<String, TaskId>,
    /// Node → the leader-stamped time of its last renewal or slot registration. The scheduler
    /// only uses slots of nodes seen within a lease time, so a dead node's slots get no work.
    #[serde(default)]
    pub node_seen_ms: BTreeMap<u64, u64>,
    /// Tasks not yet terminal, kept as a count so the queue bound costs O(1) per submit.
    #[serde(default)]
    pub open: usize,
    pub limits: TaskLimits,
}

fn invalid(field: &str, message: impl Into<String>) -> TaskRejection {
    TaskRejection::InvalidSpec { field: field.into(), message: message.into() }
}

fn check_text(field: &str, value: &str, limit: usize) -> Result<(), TaskRejection> {
    if value.len() > limit {
        return Err(invalid(field, format!("{} bytes, over the limit of {limit}", value.len())));
    }
    Ok(())
}

/// Check a spec on its own (no state needed); also used by nodes before proposing.
pub fn check_spec(spec: &TaskSpec) -> Result<(), TaskRejection> {
    if spec.id.is_empty() || spec.id.len() > 64 {
        return Err(invalid("id", "must be 1..=64 bytes"));
    }
    if spec.task_type.is_empty() || spec.task_type.len() > 64 {
        return Err(invalid("task_type", "must be 1..=64 bytes"));
    }
    if spec.description.trim().is_empty() {
        return Err(invalid("description", "must not be empty"));
    }
    check_text("description", &spec.description, TASK_TEXT_BYTES_MAX)?;
    check_text("input", &spec.input, TASK_TEXT_BYTES_MAX)?;
    if spec.depends_on.len() > DEPENDENCIES_MAX {
        return Err(invalid(
            "depends_on",
            format!("{} dependencies, over the limit of {DEPENDENCIES_MAX}", spec.depends_on.len()),
        ));
    }
    if spec.depends_on.contains(&spec.id) {
        return Err(invalid("depends_on", "a task cannot depend on itself"));
    }
    if spec.depends_on.iter().collect::<BTreeSet<_>>().len() != spec.depends_on.len() {
        return Err(invalid("depends_on", "lists a task twice"));
    }
    if spec.parent.as_ref() == Some(&spec.id) {
        return Err(invalid("parent", "a task cannot be its own parent"));
    }
    if spec.max_retries > RETRIES_MAX {
        return Err(invalid("max_retries", format!("must be at most {RETRIES_MAX}")));
    }
    if spec.timeout_ms == 0 {
        return Err(invalid("timeout_ms", "must be at least 1"));
    }
    if spec.labels.len() > LABELS_MAX {
        return Err(invalid("labels", format!("at most {LABELS_MAX} labels")));
    }
    if let Some(key) = &spec.idempotency_key {
        if key.is_empty() || key.len() > 128 {
            return Err(invalid("idempotency_key", "must be 1..=128 bytes"));
        }
    }
    Ok(())
}

impl TaskTable {
    /// Tasks not yet terminal.
    pub fn open_tasks(&self) -> usize {
        self.open
    }

    /// Apply one command at `now_ms`; `token` is the fencing token this log position grants.
    pub fn apply(&mut self, now_ms: u64, token: u64, command: &TaskCommand) -> Result<TaskResponse, TaskRejection> {
        match command {
            TaskCommand::Submit { spec } => self.submit(now_ms, spec),
            TaskCommand::Assign { task_id, slot, node_id, lease_ms } => {
                let fits = match (self.tasks.get(task_id), self.slots.get(slot)) {
                    (Some(task), Some(candidate)) => {
                        slot_fits(candidate, &task.spec)
                            && candidate.node_id == *node_id
                            && !self.slot_holder.contains_key(slot)
                    }
                    _ => false,
                };
                let parent_full = self
                    .tasks
                    .get(task_id)
                    .and_then(|t| t.spec.parent.as_ref())
                    .is_some_and(|parent| self.running_children(parent) >= self.limits.max_parallel_branches);
                if parent_full {
                    return Err(TaskRejection::SlotUnavailable { task_id: task_id.clone(), slot: slot.clone() });
                }
                let task = self.get_mut(task_id)?;
                expect_state(task, TaskState::Queued)?;
                if task.not_before_ms > now_ms {
                    return Err(TaskRejection::NotYet { task_id: task_id.clone(), not_before_ms: task.not_before_ms });
                }
                if !fits {
                    return Err(TaskRejection::SlotUnavailable { task_id: task_id.clone(), slot: slot.clone() });
                }
                self.slot_holder.insert(slot.clone(), task_id.clone());
                let task = self.get_mut(task_id)?;
                let expires_at_ms = now_ms.saturating_add(*lease_ms);
                task.attempt += 1;
                task.state = TaskState::Running;
                task.updated_at_ms = now_ms;
                task.lease = Some(Box::new(Lease {
                    slot: slot.clone(),
                    node_id: *node_id,
                    token,
                    expires_at_ms,
                    attempt_deadline_ms: now_ms.saturating_add(task.spec.timeout_ms),
                }));
                Ok(TaskResponse::Assigned { token, expires_at_ms })
            }
            TaskCommand::Renew { node_id, leases, lease_ms } => {
                self.node_seen_ms.insert(*node_id, now_ms);
                let (mut renewed, mut lost) = (Vec::new(), Vec::new());
                for (task_id, presented) in leases {
                    match self.tasks.get_mut(task_id).and_then(|t| t.lease.as_mut()) {
                        Some(lease) if lease.token == *presented && lease.node_id == *node_id => {
                            lease.expires_at_ms = lease.expires_at_ms.max(now_ms.saturating_add(*lease_ms));
                            renewed.push(task_id.clone());
                        }
                        _ => lost.push(task_id.clone()),
                    }
                }
                Ok(TaskResponse::Renewed { renewed, lost })
            }
            TaskCommand::Complete { task_id, token: presented, result } => {
                check_text("result", result, TASK_TEXT_BYTES_MAX)?;
                let task = self
                    .tasks
                    .get_mut(task_id)
                    .ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })?;
                check_token(task, *presented)?;
                task.result = Some(result.clone());
                close(&mut self.open, &mut self.slot_holder, task, TaskState::Completed, None, now_ms);
                self.promote_dependents(now_ms, task_id);
                Ok(TaskResponse::Completed)
            }
            TaskCommand::Fail { task_id, token: presented, error, retryable } => {
                check_text("error", error, TASK_TEXT_BYTES_MAX)?;
                check_token(self.get_mut(task_id)?, *presented)?;
                let (will_retry, attempt) = self.fail_attempt(now_ms, task_id, error, *retryable);
                Ok(TaskResponse::AttemptFailed { will_retry, attempt })
            }
            TaskCommand::Cancel { task_id, reason } => {
                let task = self.get_mut(task_id)?;
                if task.state.is_terminal() {
                    return Err(TaskRejection::WrongState {
                        task_id: task_id.clone(),
                        state: task.state,
                        expected: TaskState::Running,
                    });
                }
                let mut cancelled = Vec::new();
                let mut stack = vec![task_id.clone()];
                while let Some(next) = stack.pop() {
                    if let Some(children) = self.children.get(&next) {
                        stack.extend(children.iter().cloned());
                    }
                    let Some(task) = self.tasks.get_mut(&next) else { continue };
                    if task.state.is_terminal() {
                        continue;
                    }
                    let cause = Some(format!("cancelled: {reason}"));
                    close(&mut self.open, &mut self.slot_holder, task, TaskState::Cancelled, cause, now_ms);
                    cancelled.push(next.clone());
                    self.fail_dependents(now_ms, &next, &format!("dependency {next} was cancelled"));
                }
                Ok(TaskResponse::Cancelled { tasks: cancelled })
            }
            TaskCommand::Tick => {
                let mut failed_attempts = Vec::new();
                let expired: Vec<(TaskId, String)> = self
                    .tasks
                    .iter()
                    .filter_map(|(id, task)| {
                        let lease = task.lease.as_ref()?;
                        if lease.expires_at_ms <= now_ms {
                            Some((id.clone(), "lease expired".to_string()))
                        } else if lease.attempt_deadline_ms <= now_ms {
                            Some((id.clone(), format!("attempt timed out after {} ms", task.spec.timeout_ms)))
                        } else {
                            None
                        }
                    })
                    .collect();
                for (task_id, why) in expired {
                    self.fail_attempt(now_ms, &task_id, &why, true);
                    failed_attempts.push(task_id);
                }
                let timeout = self.limits.dependency_timeout_ms;
                let waited_too_long: Vec<TaskId> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.state == TaskState::Pending && t.created_at_ms.saturating_add(timeout) <= now_ms)
                    .map(|(id, _)| id.clone())
                    .collect();
                for task_id in &waited_too_long {
                    self.finish_failed(now_ms, task_id, format!("dependencies not complete within {timeout} ms"));
                }
                Ok(TaskResponse::Ticked { failed_attempts, failed_tasks: waited_too_long })
            }
            TaskCommand::ExtendLeases { by_ms } => {
                let mut leases = 0;
                for lease in self.tasks.values_mut().filter_map(|t| t.lease.as_mut()) {
                    lease.expires_at_ms = lease.expires_at_ms.max(now_ms).saturating_add(*by_ms);
                    leases += 1;
                }
                Ok(TaskResponse::Extended { leases })
            }
            TaskCommand::Configure { limits } => {
                if limits.queue_size == 0 {
                    return Err(invalid("queue_size", "must be at least 1"));
                }
                if limits.max_parallel_branches == 0 {
                    return Err(invalid("max_parallel_branches", "must be at least 1"));
                }
                self.limits = limits.clone();
                Ok(TaskResponse::Configured)
            }
            TaskCommand::RegisterSlots { node_id, slots } => {
                if slots.len() > SLOTS_PER_NODE_MAX {
                    return Err(invalid(
                        "slots",
                        format!("{} slots, over the limit of {SLOTS_PER_NODE_MAX}", slots.len()),
                    ));
                }
                if let Some((id, _)) = slots.iter().find(|(id, slot)| {
                    id.is_empty() || id.len() > 128 || slot.node_id != *node_id || slot.agent_type.is_empty()
                }) {
                    return Err(invalid(
                        "slots",
                        format!("slot {id:?} needs a 1..=128 byte id, node {node_id} and an agent type"),
                    ));
                }
                self.node_seen_ms.insert(*node_id, now_ms);
                self.slots.retain(|_, slot| slot.node_id != *node_id);
                self.slots.extend(slots.iter().map(|(id, slot)| (id.clone(), slot.clone())));
                Ok(TaskResponse::SlotsRegistered { slots: slots.len() })
            }
        }
    }

    /// Whether a [`TaskCommand::Tick`] at `now_ms` would change anything: a lease or attempt has
    /// run out, or a task has waited too long on its dependencies.
    pub fn tick_due(&self, now_ms: u64) -> bool {
        let timeout = self.limits.dependency_timeout_ms;
        self.tasks.values().any(|t| match &t.lease {
            Some(lease) => lease.expires_at_ms <= now_ms || lease.attempt_deadline_ms <= now_ms,
            None => t.state == TaskState::Pending && t.created_at_ms.saturating_add(timeout) <= now_ms,
        })
    }

    /// Whether node `node_id` renewed or registered within `window_ms` of `now_ms`.
    pub fn node_alive(&self, node_id: u64, now_ms: u64, window_ms: u64) -> bool {
        self.node_seen_ms.get(&node_id).is_some_and(|seen| seen.saturating_add(window_ms) >= now_ms)
    }

    /// Children of `parent` running now.
    pub fn running_children(&self, parent: &TaskId) -> usize {
        self.children
            .get(parent)
            .map(|c| c.iter().filter(|id| self.tasks.get(*id).is_some_and(|t| t.state == TaskState::Running)).count())
            .unwrap_or(0)
    }

    fn get_mut(&mut self, task_id: &TaskId) -> Result<&mut Task, TaskRejection> {
        self.tasks
            .get_mut(task_id)
            .map(|t| &mut **t)
            .ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })
    }

    fn submit(&mut self, now_ms: u64, spec: &TaskSpec) -> Result<TaskResponse, TaskRejection> {
        check_spec(spec)?;
        if let Some(existing) = spec.idempotency_key.as_ref().and_then(|k| self.by_idempotency_key.get(k)) {
            return Ok(TaskResponse::Submitted { task_id: existing.clone(), duplicate: true });
        }
        if self.tasks.contains_key(&spec.id) {
            return Err(TaskRejection::DuplicateId { task_id: spec.id.clone() });
        }
        if let Some(missing) = spec.depends_on.iter().find(|d| !self.tasks.contains_key(*d)) {
            return Err(TaskRejection::UnknownDependency { task_id: missing.clone() });
        }
        if let Some(parent) = spec.parent.as_ref().filter(|p| !self.tasks.contains_key(*p)) {
            return Err(invalid("parent", format!("task {parent} does not exist")));
        }
        if self.open_tasks() >= self.limits.queue_size {
            return Err(TaskRejection::QueueFull { limit: self.limits.queue_size });
        }
        // Dependencies exist before their dependents, so the graph stays acyclic.
        let failed_dependency =
            spec.depends_on.iter().find(|d| matches!(self.tasks[*d].state, TaskState::Failed | TaskState::Cancelled));
        let all_done = spec.depends_on.iter().all(|d| self.tasks[d].state == TaskState::Completed);
        let (state, cause) = match failed_dependency {
            Some(dependency) => (TaskState::Failed, Some(format!("dependency {dependency} did not complete"))),
            None if all_done => (TaskState::Queued, None),
            None => (TaskState::Pending, None),
        };
        for dependency in &spec.depends_on {
            self.dependents.entry(dependency.clone()).or_default().insert(spec.id.clone());
        }
        if let Some(parent) = &spec.parent {
            self.children.entry(parent.clone()).or_default().insert(spec.id.clone());
        }
        if let Some(key) = &spec.idempotency_key {
            self.by_idempotency_key.insert(key.clone(), spec.id.clone());
        }
        if !state.is_terminal() {
            self.open += 1;
        }
        self.tasks.insert(
            spec.id.clone(),
            Box::new(Task {
                spec: spec.clone(),
                state,
                attempt: 0,
                not_before_ms: 0,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                lease: None,
                result: None,
                cause,
            }),
        );
        Ok(TaskResponse::Submitted { task_id: spec.id.clone(), duplicate: false })
    }

    /// End the running attempt of `task_id`: back to QUEUED with backoff while attempts remain
    /// (and `retryable`), else FAILED. Returns (will retry, attempts so far).
    fn fail_attempt(&mut self, now_ms: u64, task_id: &TaskId, error: &str, retryable: bool) -> (bool, u32) {
        let limits = self.limits.clone();
        let Some(task) = self.tasks.get_mut(task_id) else { return (false, 0) };
        release(&mut self.slot_holder, task);
        task.cause = Some(error.to_string());
        task.updated_at_ms = now_ms;
        let attempt = task.attempt;
        if retryable && attempt <= task.spec.max_retries {
            let exponent = attempt.saturating_sub(1).min(30);
            let backoff =
                limits.retry_backoff_base_ms.saturating_mul(1u64 << exponent).min(limits.retry_backoff_max_ms);
            task.state = TaskState::Queued;
            task.not_before_ms = now_ms.saturating_add(backoff);
            (true, attempt)
        } else {
            self.finish_failed(now_ms, task_id, error.to_string());
            (false, attempt)
        }
    }

    fn finish_failed(&mut self, now_ms: u64, task_id: &TaskId, cause: String) {
        if let Some(task) = self.tasks.get_mut(task_id).filter(|t| !t.state.is_terminal()) {
            close(&mut self.open, &mut self.slot_holder, task, TaskState::Failed, Some(cause), now_ms);
        }
        self.fail_dependents(now_ms, task_id, &format!("dependency {task_id} failed"));
    }

    /// Fail every open task that depends (directly or not) on `task_id`.
    fn fail_dependents(&mut self, now_ms: u64, task_id: &TaskId, cause: &str) {
        let mut stack: Vec<TaskId> =
            self.dependents.get(task_id).map(|d| d.iter().cloned().collect()).unwrap_or_default();
        while let Some(next) = stack.pop() {
            let Some(task) = self.tasks.get_mut(&next) else { continue };
            if task.state.is_terminal() {
                continue;
            }
            close(&mut self.open, &mut self.slot_holder, task, TaskState::Failed, Some(cause.to_string()), now_ms);
            if let Some(more) = self.dependents.get(&next) {
                stack.extend(more.iter().cloned());
            }
        }
    }

    /// Queue every PENDING dependent of `task_id` whose dependencies have all completed.
    fn promote_dependents(&mut self, now_ms: u64, task_id: &TaskId) {
        let candidates: Vec<TaskId> =
            self.dependents.get(task_id).map(|d| d.iter().cloned().collect()).unwrap_or_default();
        for candidate in candidates {
            let ready = self.tasks.get(&candidate).is_some_and(|t| {
                t.state == TaskState::Pending
                    && t.spec
                        .depends_on
                        .iter()
                        .all(|d| self.tasks.get(d).is_some_and(|d| d.state == TaskState::Completed))
            });
            if let (true, Some(task)) = (ready, self.tasks.get_mut(&candidate)) {
                task.state = TaskState::Queued;
                task.updated_at_ms = now_ms;
            }
        }
    }

    /// The invariants of the task table.
    pub fn validate(&self) -> Result<(), String> {
        for (id, task) in &self.tasks {
            if *id != task.spec.id {
                return Err(format!("task stored under {id} has id {}", task.spec.id));
            }
            match (task.state, &task.lease) {
                (TaskState::Running, None) => return Err(format!("task {id} is RUNNING without a lease")),
                (state, Some(_)) if state != TaskState::Running => {
                    return Err(format!("task {id} is {state:?} but holds a lease"))
                }
                _ => {}
            }
            if task.attempt > task.spec.max_retries + 1 {
                return Err(format!("task {id} has {} attempts, over max_retries + 1", task.attempt));
            }
            if matches!(task.state, TaskState::Queued | TaskState::Running) {
                if let Some(d) = task
                    .spec
                    .depends_on
                    .iter()
                    .find(|d| self.tasks.get(*d).map(|t| t.state) != Some(TaskState::Completed))
                {
                    return Err(format!("task {id} is {:?} before its dependency {d} completed", task.state));
                }
            }
            for dependency in &task.spec.depends_on {
                if !self.dependents.get(dependency).is_some_and(|d| d.contains(id)) {
                    return Err(format!("dependency index misses {dependency} -> {id}"));
                }
            }
        }
        let held: BTreeMap<&String, &TaskId> =
            self.tasks.iter().filter_map(|(id, t)| t.lease.as_ref().map(|l| (&l.slot, id))).collect();
        let leases = self.tasks.values().filter(|t| t.lease.is_some()).count();
        if held.len() != leases {
            return Err("two live leases hold one slot".into());
        }
        if held.len() != self.slot_holder.len()
            || held.iter().any(|(slot, id)| self.slot_holder.get(*slot) != Some(*id))
        {
            return Err("the slot index disagrees with the leases".into());
        }
        for (key, id) in &self.by_idempotency_key {
            if self.tasks.get(id).and_then(|t| t.spec.idempotency_key.as_ref()) != Some(key) {
                return Err(format!("idempotency key {key} points at {id}, which does not carry it"));
            }
        }
        Ok(())
    }
}

/// Move an open `task` to the terminal `state`: end its lease, count it closed, and record
/// `cause` when one is given.
fn close(
    open: &mut usize,
    slot_holder: &mut BTreeMap<String, TaskId>,
    task: &mut Task,
    state: TaskState,
    cause: Option<String>,
    now_ms: u64,
) {
    debug_assert!(!task.state.is_terminal() && state.is_terminal());
    release(slot_holder, task);
    *open = open.saturating_sub(1);
    task.state = state;
    if cause.is_some() {
        task.cause = cause;
    }
    task.updated_at_ms = now_ms;
}

/// End `task`'s lease, if any, and free its slot.
fn release(slot_holder: &mut BTreeMap<String, TaskId>, task: &mut Task) {
    if let Some(lease) = task.lease.take() {
        slot_holder.remove(&lease.slot);
    }
}

/// Whether `slot` can run `spec`: same type, and every capability the task needs.
pub fn slot_fits(slot: &Slot, spec: &TaskSpec) -> bool {
    slot.agent_type == spec.task_type && spec.capabilities.is_subset(&slot.capabilities)
}

fn expect_state(task: &Task, expected: TaskState) -> Result<(), TaskRejection> {
    if task.state != expected {
        return Err(TaskRejection::WrongState { task_id: task.spec.id.clone(), state: task.state, expected });
    }
    Ok(())
}

fn check_token(task: &Task, presented: u64) -> Result<(), TaskRejection> {
    match &task.lease {
        Some(lease) if lease.token == presented => Ok(()),
        _ if task.state.is_terminal() => Err(TaskRejection::WrongState {
            task_id: task.spec.id.clone(),
            state: task.state,
            expected: TaskState::Running,
        }),
        lease => Err(TaskRejection::StaleToken {
            task_id: task.spec.id.clone(),
            presented,
            current: lease.as_ref().map(|l| l.token),
        }),
    }
}
