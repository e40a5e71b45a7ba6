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
/// Upper bound on a saved checkpoint, in bytes.
pub const CHECKPOINT_BYTES_MAX: usize = 64 * 1024;
/// Upper bound on a progress message, in bytes.
pub const PROGRESS_MESSAGE_BYTES_MAX: usize = 256;
/// Upper bound on the subtasks of one plan.
pub const PLAN_SUBTASKS_MAX: usize = 64;
/// Upper bound on a plan key (a subtask's name within its plan), in bytes. A child's id is
/// `<parent id>.<key>`, which stays within the 64-byte id limit.
pub const PLAN_KEY_BYTES_MAX: usize = 24;
/// Upper bound on a parent's aggregated result; above it the aggregate names each child's id
/// and result size instead of carrying the results.
pub const AGGREGATE_BYTES_MAX: usize = 64 * 1024;
/// The label that carries a planned child's key.
pub const PLAN_KEY_LABEL: &str = "maos.plan_key";

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
    /// Set for a task submitted for planning: it first runs on an agent of this type, whose
    /// output is a plan of subtasks ([`TaskCommand::Expand`]).
    #[serde(default)]
    pub planner_type: Option<String>,
    /// Children of this task running at once, at most, below the cluster's
    /// `max_parallel_branches` (`None`: the cluster's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_agents: Option<u32>,
    /// The input lives in the node's task-data store (PostgreSQL) under the task id, not in
    /// `input`: the replicated state holds only this reference.
    #[serde(default, skip_serializing_if = "is_false")]
    pub input_stored: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl TaskSpec {
    /// The agent type that runs this task's next attempt: the planner's while it awaits a plan.
    pub fn routing_type(&self) -> &str {
        self.planner_type.as_deref().unwrap_or(&self.task_type)
    }
}

/// An agent's operator-set state. IDLE and BUSY are derived: an active agent is BUSY while a
/// lease holds its slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AgentState {
    /// Takes work.
    #[default]
    Active,
    /// Paused: finishes its current attempt, takes no more.
    Draining,
    /// Its backend could not start work; takes none until resumed.
    Failed,
    /// Removed by an operator; its attempt (if any) was failed and retried elsewhere.
    Terminated,
}

/// One agent: a place where one attempt at a time runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The holder whose runtime runs this agent: a node id, or an external worker's id
    /// (at least [`WORKER_ID_MIN`]).
    pub node_id: u64,
    pub agent_type: String,
    pub capabilities: BTreeSet<String>,
    /// `builtin`, `command`, `claude` or `external`: shown to operators.
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub state: AgentState,
}

impl Slot {
    /// Whether two registrations describe the same agent (the operator-set state aside).
    pub fn same_definition(&self, other: &Slot) -> bool {
        self.node_id == other.node_id
            && self.agent_type == other.agent_type
            && self.capabilities == other.capabilities
            && self.backend == other.backend
    }
}

/// Holder ids from here up belong to external workers; node ids stay below.
pub const WORKER_ID_MIN: u64 = 1 << 62;
/// An external worker silent this long, holding no lease, is forgotten with its agents.
pub const WORKER_FORGET_MS: u64 = 3_600_000;

/// Tokens an attempt consumed from a model API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The latest state an agent saved; a retried or reassigned attempt starts from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub data: String,
    /// The data lives in the task-data store (written under the saving lease's token); `data`
    /// is then empty.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stored: bool,
    /// The attempt that saved it.
    pub attempt: u32,
    pub saved_at_ms: u64,
}

/// What the running attempt last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub percent: u8,
    pub message: String,
}

/// One subtask of a plan, named by a key unique within the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedTask {
    pub key: String,
    pub task_type: String,
    pub description: String,
    #[serde(default)]
    pub input: String,
    /// Keys of subtasks of the same plan that must complete first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
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
    /// The result lives in the task-data store, written under this fencing token (the lease
    /// that completed the task); `result` is then `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_token: Option<u64>,
    /// Why the task (or its last attempt) failed or was cancelled.
    pub cause: Option<String>,
    #[serde(default)]
    pub checkpoint: Option<Box<Checkpoint>>,
    #[serde(default)]
    pub progress: Option<Box<Progress>>,
    /// Model tokens used by all attempts so far.
    #[serde(default)]
    pub usage: TokenUsage,
    /// Its plan was expanded into children: it waits (PENDING) for them, completes with their
    /// aggregated results, and fails when one fails.
    #[serde(default)]
    pub expanded: bool,
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
    /// Children of one parent running at once, at most; also the widest level a plan may have.
    pub max_parallel_branches: usize,
    /// A plan with fewer subtasks than this is not run in parallel: its subtasks are chained.
    #[serde(default = "default_parallelization_threshold")]
    pub parallelization_threshold: usize,
}

fn default_parallelization_threshold() -> usize {
    2
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            queue_size: 100_000,
            dependency_timeout_ms: 3_600_000,
            retry_backoff_base_ms: 1_000,
            retry_backoff_max_ms: 300_000,
            max_parallel_branches: 10,
            parallelization_threshold: default_parallelization_threshold(),
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
        /// Boxed: a spec is far larger than every other command.
        spec: Box<TaskSpec>,
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
        /// The result was written to the task-data store under `token`; `result` is empty.
        #[serde(default, skip_serializing_if = "is_false")]
        stored: bool,
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
    /// Run a FAILED or CANCELLED task again from its first attempt (its checkpoint kept).
    /// Tasks that failed because of it stay failed; retry them too.
    Retry {
        task_id: TaskId,
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
    /// Save the running attempt's checkpoint (replacing the previous one).
    SaveCheckpoint {
        task_id: TaskId,
        token: u64,
        data: String,
        /// The data was written to the task-data store under `token`; `data` is empty.
        #[serde(default, skip_serializing_if = "is_false")]
        stored: bool,
    },
    ReportProgress {
        task_id: TaskId,
        token: u64,
        percent: u8,
        message: String,
    },
    /// Add model tokens the running attempt used.
    RecordUsage {
        task_id: TaskId,
        token: u64,
        usage: TokenUsage,
    },
    /// A planning attempt's output: validate the plan and add its subtasks as children, all
    /// or nothing. The parent then waits for them.
    Expand {
        task_id: TaskId,
        token: u64,
        subtasks: Vec<PlannedTask>,
    },
    /// An operator's pause (DRAINING), resume (ACTIVE) or terminate of one agent.
    SetAgentState {
        agent_id: String,
        state: AgentState,
    },
    /// Add one agent to `node_id`'s pool, like its existing agents of `agent_type`, while the
    /// node has fewer than `agents_max` agents that are not terminated.
    AddAgent {
        node_id: u64,
        agent_type: String,
        agents_max: usize,
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
    Retried { state: TaskState },
    SlotsRegistered { slots: usize },
    CheckpointSaved,
    ProgressReported,
    UsageRecorded,
    Expanded { children: Vec<TaskId>, chained: bool },
    AgentStateSet { previous: AgentState },
    AgentAdded { agent_id: String },
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
    #[error("agent {agent_id} does not exist")]
    UnknownAgent { agent_id: String },
    #[error("agent {agent_id} is {state:?}: {message}")]
    AgentState { agent_id: String, state: AgentState, message: String },
    #[error("node {node_id} already runs {limit} agents (system.max_agents); terminate one first or raise the limit")]
    AgentLimit { node_id: u64, limit: usize },
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
    /// Tasks closed by the command being applied; their parents are settled before the command
    /// returns. Always empty between commands.
    #[serde(skip)]
    closed: Vec<TaskId>,
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
    if spec.max_agents == Some(0) {
        return Err(invalid("max_agents", "must be at least 1 (or unset for the cluster's limit)"));
    }
    if spec.planner_type.as_ref().is_some_and(|t| t.is_empty() || t.len() > 64) {
        return Err(invalid("planner_type", "must be 1..=64 bytes"));
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
        debug_assert!(self.closed.is_empty());
        let response = self.apply_command(now_ms, token, command);
        // Settle the parents of every task this command closed (which may close them in turn).
        while let Some(task_id) = self.closed.pop() {
            if let Some(parent) = self.tasks.get(&task_id).and_then(|t| t.spec.parent.clone()) {
                self.settle_parent(now_ms, &parent);
            }
        }
        response
    }

    fn apply_command(&mut self, now_ms: u64, token: u64, command: &TaskCommand) -> Result<TaskResponse, TaskRejection> {
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
                    .is_some_and(|parent| self.running_children(parent) >= self.branches_max(parent));
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
                task.progress = None;
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
            TaskCommand::Complete { task_id, token: presented, result, stored } => {
                check_text("result", result, TASK_TEXT_BYTES_MAX)?;
                let task = self
                    .tasks
                    .get_mut(task_id)
                    .ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })?;
                check_token(task, *presented)?;
                if task.spec.planner_type.is_some() && !task.expanded {
                    return Err(invalid(
                        "result",
                        format!(
                            "task {task_id} is being planned: answer with a plan (Expand / SubmitPlan), not a result"
                        ),
                    ));
                }
                if *stored {
                    task.result = None;
                    task.result_token = Some(*presented);
                } else {
                    task.result = Some(result.clone());
                    task.result_token = None;
                }
                self.close(task_id, TaskState::Completed, None, now_ms);
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
                    if !self.close(&next, TaskState::Cancelled, Some(format!("cancelled: {reason}")), now_ms) {
                        continue;
                    }
                    cancelled.push(next.clone());
                    self.fail_dependents(now_ms, &next, &format!("dependency {next} was cancelled"));
                }
                Ok(TaskResponse::Cancelled { tasks: cancelled })
            }
            TaskCommand::Retry { task_id } => self.retry(now_ms, task_id),
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
                    .filter(|(_, t)| {
                        waits_on_dependencies(&self.tasks, t) && t.created_at_ms.saturating_add(timeout) <= now_ms
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for task_id in &waited_too_long {
                    self.finish_failed(now_ms, task_id, format!("dependencies not complete within {timeout} ms"));
                }
                self.forget_gone_workers(now_ms);
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
                if let Some((id, _)) = slots
                    .iter()
                    .find(|(id, _)| self.slots.get(*id).is_some_and(|existing| existing.node_id != *node_id))
                {
                    return Err(invalid("slots", format!("slot {id:?} belongs to another holder")));
                }
                self.node_seen_ms.insert(*node_id, now_ms);
                // An operator's pause or termination outlives the node's re-registration.
                let previous: BTreeMap<String, AgentState> = self
                    .slots
                    .iter()
                    .filter(|(_, slot)| slot.node_id == *node_id)
                    .map(|(id, slot)| (id.clone(), slot.state))
                    .collect();
                self.slots.retain(|_, slot| slot.node_id != *node_id);
                for (id, slot) in slots {
                    let mut slot = slot.clone();
                    slot.state = previous.get(id).copied().unwrap_or(slot.state);
                    self.slots.insert(id.clone(), slot);
                }
                Ok(TaskResponse::SlotsRegistered { slots: slots.len() })
            }
            TaskCommand::SaveCheckpoint { task_id, token: presented, data, stored } => {
                check_text("checkpoint", data, CHECKPOINT_BYTES_MAX)?;
                let task = self.get_mut(task_id)?;
                check_token(task, *presented)?;
                task.checkpoint = Some(Box::new(Checkpoint {
                    data: data.clone(),
                    stored: *stored,
                    attempt: task.attempt,
                    saved_at_ms: now_ms,
                }));
                task.updated_at_ms = now_ms;
                Ok(TaskResponse::CheckpointSaved)
            }
            TaskCommand::ReportProgress { task_id, token: presented, percent, message } => {
                check_text("message", message, PROGRESS_MESSAGE_BYTES_MAX)?;
                if *percent > 100 {
                    return Err(invalid("percent", "must be in 0..=100"));
                }
                let task = self.get_mut(task_id)?;
                check_token(task, *presented)?;
                task.progress = Some(Box::new(Progress { percent: *percent, message: message.clone() }));
                Ok(TaskResponse::ProgressReported)
            }
            TaskCommand::RecordUsage { task_id, token: presented, usage } => {
                let task = self.get_mut(task_id)?;
                check_token(task, *presented)?;
                task.usage.input_tokens = task.usage.input_tokens.saturating_add(usage.input_tokens);
                task.usage.output_tokens = task.usage.output_tokens.saturating_add(usage.output_tokens);
                Ok(TaskResponse::UsageRecorded)
            }
            TaskCommand::Expand { task_id, token: presented, subtasks } => {
                self.expand(now_ms, task_id, *presented, subtasks)
            }
            TaskCommand::SetAgentState { agent_id, state } => {
                let slot = self
                    .slots
                    .get_mut(agent_id)
                    .ok_or_else(|| TaskRejection::UnknownAgent { agent_id: agent_id.clone() })?;
                let previous = slot.state;
                if previous == AgentState::Terminated {
                    return Err(TaskRejection::AgentState {
                        agent_id: agent_id.clone(),
                        state: previous,
                        message: "a terminated agent stays terminated; spawn a new one".into(),
                    });
                }
                slot.state = *state;
                if *state == AgentState::Terminated {
                    if let Some(task_id) = self.slot_holder.get(agent_id).cloned() {
                        self.fail_attempt(now_ms, &task_id, &format!("agent {agent_id} was terminated"), true);
                    }
                }
                Ok(TaskResponse::AgentStateSet { previous })
            }
            TaskCommand::AddAgent { node_id, agent_type, agents_max } => {
                let live = self.slots.values().filter(|s| s.node_id == *node_id && s.state != AgentState::Terminated);
                if live.count() >= *agents_max {
                    return Err(TaskRejection::AgentLimit { node_id: *node_id, limit: *agents_max });
                }
                let (model_id, model) = self
                    .slots
                    .iter()
                    .find(|(_, s)| s.node_id == *node_id && s.agent_type == *agent_type)
                    .ok_or_else(|| {
                        invalid("agent_type", format!("node {node_id} runs no agent of type {agent_type:?}; spawn a type it is configured for"))
                    })?;
                let prefix = match model_id.rsplit_once('/') {
                    Some((prefix, _)) => prefix.to_string(),
                    None => model_id.clone(),
                };
                let agent_id = (0..=self.slots.len())
                    .map(|i| format!("{prefix}/{i}"))
                    .find(|id| !self.slots.contains_key(id))
                    .unwrap_or_else(|| format!("{prefix}/{}", self.slots.len() + 1));
                let slot = Slot { state: AgentState::Active, ..model.clone() };
                self.slots.insert(agent_id.clone(), slot);
                Ok(TaskResponse::AgentAdded { agent_id })
            }
        }
    }

    fn retry(&mut self, now_ms: u64, task_id: &TaskId) -> Result<TaskResponse, TaskRejection> {
        let task = self.tasks.get(task_id).ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })?;
        if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
            return Err(TaskRejection::WrongState {
                task_id: task_id.clone(),
                state: task.state,
                expected: TaskState::Failed,
            });
        }
        if task.expanded {
            return Err(invalid(
                "task_id",
                format!("task {task_id} was planned into subtasks; retry the subtasks that failed"),
            ));
        }
        if let Some(parent) =
            task.spec.parent.as_ref().filter(|p| self.tasks.get(*p).is_some_and(|p| p.state.is_terminal()))
        {
            return Err(invalid("task_id", format!("its parent {parent} has finished; retry the parent instead")));
        }
        if let Some(dependency) = task
            .spec
            .depends_on
            .iter()
            .find(|d| matches!(self.tasks[*d].state, TaskState::Failed | TaskState::Cancelled))
        {
            return Err(invalid("depends_on", format!("dependency {dependency} did not complete; retry it first")));
        }
        if self.open >= self.limits.queue_size {
            return Err(TaskRejection::QueueFull { limit: self.limits.queue_size });
        }
        let ready = task.spec.depends_on.iter().all(|d| self.tasks[d].state == TaskState::Completed);
        let task = self.get_mut(task_id)?;
        task.state = if ready { TaskState::Queued } else { TaskState::Pending };
        task.attempt = 0;
        task.not_before_ms = 0;
        task.cause = None;
        task.result = None;
        task.progress = None;
        task.created_at_ms = now_ms;
        task.updated_at_ms = now_ms;
        let state = task.state;
        self.open += 1;
        Ok(TaskResponse::Retried { state })
    }

    /// Validate a plan and add its subtasks as children of `task_id`, or change nothing.
    fn expand(
        &mut self,
        now_ms: u64,
        task_id: &TaskId,
        presented: u64,
        subtasks: &[PlannedTask],
    ) -> Result<TaskResponse, TaskRejection> {
        let parent = self.tasks.get(task_id).ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })?;
        check_token(parent, presented)?;
        if parent.spec.planner_type.is_none() {
            return Err(invalid("plan", format!("task {task_id} was not submitted for planning")));
        }
        let order = check_plan(subtasks, self.limits.max_parallel_branches)?;
        // A plan wider than the task's own max_agents still runs; its branches take turns.
        if self.open + subtasks.len() > self.limits.queue_size {
            return Err(TaskRejection::QueueFull { limit: self.limits.queue_size });
        }
        // Below the threshold the plan is not parallelised: each subtask waits for the previous.
        let chained = subtasks.len() < self.limits.parallelization_threshold;
        let child_id = |key: &str| format!("{task_id}.{key}");
        let mut specs = Vec::with_capacity(subtasks.len());
        let mut previous: Option<TaskId> = None;
        for &i in &order {
            let planned = &subtasks[i];
            let mut depends_on: Vec<TaskId> = planned.depends_on.iter().map(|k| child_id(k)).collect();
            if let Some(previous) = previous.as_ref().filter(|p| chained && !depends_on.contains(p)) {
                depends_on.push(previous.clone());
            }
            let spec = TaskSpec {
                id: child_id(&planned.key),
                task_type: planned.task_type.clone(),
                priority: parent.spec.priority,
                description: planned.description.clone(),
                input: planned.input.clone(),
                depends_on,
                parent: Some(task_id.clone()),
                max_retries: parent.spec.max_retries,
                timeout_ms: parent.spec.timeout_ms,
                idempotency_key: None,
                submitter: parent.spec.submitter.clone(),
                labels: BTreeMap::from([(PLAN_KEY_LABEL.to_string(), planned.key.clone())]),
                capabilities: planned.capabilities.clone(),
                planner_type: None,
                max_agents: None,
                input_stored: false,
            };
            check_spec(&spec).map_err(|rejection| match rejection {
                TaskRejection::InvalidSpec { field, message } => {
                    invalid(&format!("plan.subtasks[{}].{field}", planned.key), message)
                }
                other => other,
            })?;
            if self.tasks.contains_key(&spec.id) {
                return Err(TaskRejection::DuplicateId { task_id: spec.id });
            }
            if !self.slots.values().any(|slot| slot.agent_type == spec.task_type) {
                return Err(invalid(
                    &format!("plan.subtasks[{}].task_type", planned.key),
                    format!("no agent serves type {:?}; use a type of the cluster's agents", spec.task_type),
                ));
            }
            previous = Some(spec.id.clone());
            specs.push(spec);
        }
        // Everything is checked; from here nothing can be refused.
        if let Some(parent) = self.tasks.get_mut(task_id) {
            release(&mut self.slot_holder, parent);
            parent.state = TaskState::Pending;
            parent.expanded = true;
            parent.updated_at_ms = now_ms;
        }
        let mut children = Vec::with_capacity(specs.len());
        for spec in specs {
            let submitted = self.submit(now_ms, &spec);
            debug_assert!(submitted.is_ok(), "{submitted:?}");
            children.push(spec.id);
        }
        Ok(TaskResponse::Expanded { children, chained })
    }

    /// An expanded parent completes when all its children have, with their results aggregated,
    /// and fails (cancelling the rest) when one fails or is cancelled.
    fn settle_parent(&mut self, now_ms: u64, parent_id: &TaskId) {
        let Some(parent) = self.tasks.get(parent_id) else { return };
        if !parent.expanded || parent.state != TaskState::Pending {
            return;
        }
        let children: Vec<TaskId> =
            self.children.get(parent_id).map(|c| c.iter().cloned().collect()).unwrap_or_default();
        let mut all_completed = true;
        for child_id in &children {
            let Some(child) = self.tasks.get(child_id) else { continue };
            match child.state {
                TaskState::Completed => {}
                TaskState::Failed | TaskState::Cancelled => {
                    let cause = format!(
                        "subtask {} ({child_id}) {}: {}",
                        plan_key(child),
                        if child.state == TaskState::Failed { "failed" } else { "was cancelled" },
                        child.cause.as_deref().unwrap_or("no cause recorded")
                    );
                    for sibling in &children {
                        let why = Some(format!("cancelled: sibling subtask {child_id} did not complete"));
                        self.close(sibling, TaskState::Cancelled, why, now_ms);
                    }
                    self.finish_failed(now_ms, parent_id, cause);
                    return;
                }
                _ => all_completed = false,
            }
        }
        if !all_completed {
            return;
        }
        let finished: Vec<&Task> = children.iter().filter_map(|id| self.tasks.get(id)).map(|t| &**t).collect();
        // Results kept in the task-data store are aggregated by the reader (see `Task::result_token`).
        let result = finished.iter().all(|t| t.result.is_some()).then(|| {
            aggregate_results(
                finished.iter().map(|t| (plan_key(t), t.spec.id.as_str(), t.result.as_deref().unwrap_or_default())),
            )
        });
        if let Some(parent) = self.tasks.get_mut(parent_id) {
            parent.result = result;
            self.close(parent_id, TaskState::Completed, None, now_ms);
        }
        self.promote_dependents(now_ms, parent_id);
    }

    /// Whether a [`TaskCommand::Tick`] at `now_ms` would change anything: a lease or attempt has
    /// run out, or a task has waited too long on its dependencies.
    pub fn tick_due(&self, now_ms: u64) -> bool {
        let timeout = self.limits.dependency_timeout_ms;
        self.tasks.values().any(|t| match &t.lease {
            Some(lease) => lease.expires_at_ms <= now_ms || lease.attempt_deadline_ms <= now_ms,
            None => waits_on_dependencies(&self.tasks, t) && t.created_at_ms.saturating_add(timeout) <= now_ms,
        }) || self
            .node_seen_ms
            .iter()
            .any(|(holder, seen)| *holder >= WORKER_ID_MIN && seen.saturating_add(WORKER_FORGET_MS) <= now_ms)
    }

    /// Drop the agents of external workers silent for [`WORKER_FORGET_MS`] that hold no lease,
    /// so workers that come and go under new names do not fill the table.
    fn forget_gone_workers(&mut self, now_ms: u64) {
        let gone: BTreeSet<u64> = self
            .node_seen_ms
            .iter()
            .filter(|(holder, seen)| **holder >= WORKER_ID_MIN && seen.saturating_add(WORKER_FORGET_MS) <= now_ms)
            .map(|(holder, _)| *holder)
            .filter(|holder| {
                !self.slots.iter().any(|(id, slot)| slot.node_id == *holder && self.slot_holder.contains_key(id))
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        self.slots.retain(|_, slot| !gone.contains(&slot.node_id));
        self.node_seen_ms.retain(|holder, _| !gone.contains(holder));
    }

    /// Whether node `node_id` renewed or registered within `window_ms` of `now_ms`.
    pub fn node_alive(&self, node_id: u64, now_ms: u64, window_ms: u64) -> bool {
        self.node_seen_ms.get(&node_id).is_some_and(|seen| seen.saturating_add(window_ms) >= now_ms)
    }

    /// Children of `parent` that may run at once: its own `max_agents` within the cluster's limit.
    pub fn branches_max(&self, parent: &TaskId) -> usize {
        let own = self.tasks.get(parent).and_then(|p| p.spec.max_agents).map_or(usize::MAX, |n| n as usize);
        own.min(self.limits.max_parallel_branches)
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
                result_token: None,
                cause,
                checkpoint: None,
                progress: None,
                usage: TokenUsage::default(),
                expanded: false,
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

    /// Move `task_id` to the terminal `state` (keeping its cause unless `cause` is given), free its
    /// lease and count it closed. False, and nothing changed, when it is unknown or already ended.
    fn close(&mut self, task_id: &TaskId, state: TaskState, cause: Option<String>, now_ms: u64) -> bool {
        debug_assert!(state.is_terminal());
        let Some(task) = self.tasks.get_mut(task_id).filter(|t| !t.state.is_terminal()) else { return false };
        release(&mut self.slot_holder, task);
        self.open = self.open.saturating_sub(1);
        self.closed.push(task.spec.id.clone());
        task.state = state;
        if cause.is_some() {
            task.cause = cause;
        }
        task.updated_at_ms = now_ms;
        true
    }

    fn finish_failed(&mut self, now_ms: u64, task_id: &TaskId, cause: String) {
        self.close(task_id, TaskState::Failed, Some(cause), now_ms);
        self.fail_dependents(now_ms, task_id, &format!("dependency {task_id} failed"));
    }

    /// Fail every open task that depends (directly or not) on `task_id`.
    fn fail_dependents(&mut self, now_ms: u64, task_id: &TaskId, cause: &str) {
        let mut stack: Vec<TaskId> =
            self.dependents.get(task_id).map(|d| d.iter().cloned().collect()).unwrap_or_default();
        while let Some(next) = stack.pop() {
            if !self.close(&next, TaskState::Failed, Some(cause.to_string()), now_ms) {
                continue;
            }
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
            if task.expanded && self.children.get(id).is_none_or(BTreeSet::is_empty) {
                return Err(format!("task {id} is expanded but has no children"));
            }
            if task.checkpoint.as_ref().is_some_and(|c| c.data.len() > CHECKPOINT_BYTES_MAX) {
                return Err(format!("task {id} holds a checkpoint over {CHECKPOINT_BYTES_MAX} bytes"));
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

/// End `task`'s lease, if any, and free its slot.
fn release(slot_holder: &mut BTreeMap<String, TaskId>, task: &mut Task) {
    if let Some(lease) = task.lease.take() {
        slot_holder.remove(&lease.slot);
    }
}

/// Whether `slot` can run `spec` now: an active agent of the type the task needs next, with
/// every capability the task needs.
pub fn slot_fits(slot: &Slot, spec: &TaskSpec) -> bool {
    slot.state == AgentState::Active
        && slot.agent_type == spec.routing_type()
        && spec.capabilities.is_subset(&slot.capabilities)
}

/// A PENDING task waiting on its dependencies (not an expanded parent waiting on children).
/// A PENDING task waiting on dependencies it was submitted with: not an expanded parent (it
/// waits on children) and not a planned subtask (it waits on its siblings, each bounded by its
/// own retries and timeout; a plan's later steps may start long after the plan was made).
fn waits_on_dependencies(tasks: &BTreeMap<TaskId, Box<Task>>, task: &Task) -> bool {
    task.state == TaskState::Pending
        && !task.expanded
        && !task.spec.parent.as_ref().and_then(|p| tasks.get(p)).is_some_and(|parent| parent.expanded)
}

/// A task's key within its parent's plan (its id when it has none).
pub fn plan_key(task: &Task) -> &str {
    task.spec.labels.get(PLAN_KEY_LABEL).map(String::as_str).unwrap_or(&task.spec.id)
}

/// Children's results, given as (plan key, task id, result), as one JSON object by plan key (a
/// result that is JSON stays JSON). Past [`AGGREGATE_BYTES_MAX`] each entry names the child and
/// its result size instead.
pub fn aggregate_results<'a>(children: impl Iterator<Item = (&'a str, &'a str, &'a str)> + Clone) -> String {
    let value_of = |result: &str| {
        serde_json::from_str::<serde_json::Value>(result).unwrap_or_else(|_| serde_json::Value::String(result.into()))
    };
    let full: serde_json::Map<String, serde_json::Value> =
        children.clone().map(|(key, _, result)| (key.to_string(), value_of(result))).collect();
    let text = serde_json::Value::Object(full).to_string();
    if text.len() <= AGGREGATE_BYTES_MAX {
        return text;
    }
    let summary: serde_json::Map<String, serde_json::Value> = children
        .map(|(key, task_id, result)| {
            (key.to_string(), serde_json::json!({ "task_id": task_id, "result_bytes": result.len() }))
        })
        .collect();
    serde_json::Value::Object(summary).to_string()
}

/// Check a plan on its own: size, keys, dependencies inside the plan, no cycle, and no level
/// wider than `branches_max`. Returns the subtasks' indexes in dependency order.
pub fn check_plan(subtasks: &[PlannedTask], branches_max: usize) -> Result<Vec<usize>, TaskRejection> {
    if subtasks.is_empty() || subtasks.len() > PLAN_SUBTASKS_MAX {
        return Err(invalid(
            "plan.subtasks",
            format!("{} subtasks; a plan has 1..={PLAN_SUBTASKS_MAX}", subtasks.len()),
        ));
    }
    if let Some(planned) = subtasks.iter().find(|p| p.depends_on.len() > PLAN_SUBTASKS_MAX) {
        return Err(invalid(
            &format!("plan.subtasks[{}].depends_on", planned.key),
            format!("{} dependencies; a plan has at most {PLAN_SUBTASKS_MAX} subtasks", planned.depends_on.len()),
        ));
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, planned) in subtasks.iter().enumerate() {
        let key = planned.key.as_str();
        if key.is_empty()
            || key.len() > PLAN_KEY_BYTES_MAX
            || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "plan.subtasks.key",
                format!("{key:?} must be 1..={PLAN_KEY_BYTES_MAX} characters of A-Z a-z 0-9 - _"),
            ));
        }
        if index.insert(key, i).is_some() {
            return Err(invalid("plan.subtasks.key", format!("{key:?} is used twice")));
        }
    }
    for planned in subtasks {
        if let Some(missing) = planned.depends_on.iter().find(|d| !index.contains_key(d.as_str())) {
            return Err(invalid(
                &format!("plan.subtasks[{}].depends_on", planned.key),
                format!("{missing:?} is not a key of this plan"),
            ));
        }
    }
    // Kahn's algorithm, level by level: a level is what can run at once.
    let mut remaining: Vec<usize> = subtasks.iter().map(|p| p.depends_on.len()).collect();
    let mut level: Vec<usize> = (0..subtasks.len()).filter(|&i| remaining[i] == 0).collect();
    let mut order = Vec::with_capacity(subtasks.len());
    while !level.is_empty() {
        if level.len() > branches_max {
            return Err(invalid(
                "plan.subtasks",
                format!(
                    "{} subtasks could run at once, over task_planner.max_parallel_branches ({branches_max})",
                    level.len()
                ),
            ));
        }
        order.extend(&level);
        let mut next = Vec::new();
        for (i, planned) in subtasks.iter().enumerate() {
            if remaining[i] == 0 {
                continue;
            }
            let done = planned.depends_on.iter().filter(|d| level.iter().any(|&l| subtasks[l].key == **d)).count();
            remaining[i] -= done;
            if remaining[i] == 0 {
                next.push(i);
            }
        }
        level = next;
    }
    if order.len() != subtasks.len() {
        return Err(invalid("plan.subtasks.depends_on", "the plan has a dependency cycle"));
    }
    Ok(order)
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
