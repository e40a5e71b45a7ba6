//! Task records, limits, commands, responses and refusals, and the table that holds them.

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
/// Bytes of a task's `trace_parent` at most (a W3C `traceparent` is 55).
pub const TRACE_PARENT_BYTES_MAX: usize = 128;
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
    /// The W3C `traceparent` of the submit's span when its trace is recorded (empty otherwise):
    /// the task's assignment, attempts and report join that trace, on whichever node they run.
    /// Plan children inherit it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_parent: String,
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

impl Lease {
    /// When `Tick` ends this attempt unless renewed: the lease's expiry or the attempt's
    /// deadline, whichever comes first.
    pub fn deadline_ms(&self) -> u64 {
        self.expires_at_ms.min(self.attempt_deadline_ms)
    }
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
    /// A finished task (COMPLETED, FAILED, CANCELLED) leaves the replicated state this long
    /// after it finished (`tasks.retention`), through [`TaskCommand::Evict`].
    #[serde(default = "default_retention_ms")]
    pub retention_ms: u64,
    /// Finished tasks held at most (`tasks.retained_max`); past it the oldest are evicted
    /// before their retention ends.
    #[serde(default = "default_retained_max")]
    pub retained_max: usize,
    /// An evicted task's idempotency key is kept this long after the task finished
    /// (`tasks.idempotency_window`, at least `retention_ms`); a resubmit after it creates a new task.
    #[serde(default = "default_idempotency_window_ms")]
    pub idempotency_window_ms: u64,
}

fn default_retention_ms() -> u64 {
    24 * 3_600_000
}

fn default_retained_max() -> usize {
    100_000
}

fn default_idempotency_window_ms() -> u64 {
    24 * 3_600_000
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
            retention_ms: default_retention_ms(),
            retained_max: default_retained_max(),
            idempotency_window_ms: default_idempotency_window_ms(),
        }
    }
}

/// Upper bound on the tasks one [`TaskCommand::Evict`] names.
pub const EVICT_BATCH_MAX: usize = 1_000;
/// Upper bound on idempotency keys one [`TaskCommand::Evict`] forgets because their window ran out.
pub const KEY_EXPIRIES_PER_EVICT_MAX: usize = 1_000;
/// Upper bound on idempotency keys kept for evicted tasks; past it the soonest to expire go first.
pub const RETIRED_KEYS_MAX: usize = 1_000_000;

/// Tasks by state, maintained by apply so that counting them costs nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    pub pending: u64,
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl StateCounts {
    fn slot(&mut self, state: TaskState) -> &mut u64 {
        match state {
            TaskState::Pending => &mut self.pending,
            TaskState::Queued => &mut self.queued,
            TaskState::Running => &mut self.running,
            TaskState::Completed => &mut self.completed,
            TaskState::Failed => &mut self.failed,
            TaskState::Cancelled => &mut self.cancelled,
        }
    }

    /// Count a task entering `to` (from `from`, or new when `None`).
    pub(super) fn moved(&mut self, from: Option<TaskState>, to: Option<TaskState>) {
        if let Some(from) = from {
            let count = self.slot(from);
            *count = count.saturating_sub(1);
        }
        if let Some(to) = to {
            *self.slot(to) += 1;
        }
    }
}

/// Move `task` to `state`, counting it.
pub(super) fn set_state(counts: &mut StateCounts, task: &mut Task, state: TaskState) {
    counts.moved(Some(task.state), Some(state));
    task.state = state;
}

/// The idempotency key of an evicted task, kept until its window runs out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredKey {
    pub task_id: TaskId,
    pub expires_at_ms: u64,
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
    /// Remove finished tasks from the state (proposed by the leader's housekeeping). Each entry
    /// is a task and the time it finished as the leader saw it; a task is removed only if it
    /// still finished then (so a task retried and finished again since is kept for a later
    /// round), it is due (its retention ran out, or more than `retained_max` finished tasks are
    /// held), no open task needs it (an open child, an open dependent) and its parent is gone.
    /// Tasks that do not qualify are skipped, never refused. Idempotency keys whose window ran
    /// out are forgotten too. At most [`EVICT_BATCH_MAX`] tasks.
    Evict {
        tasks: Vec<(TaskId, u64)>,
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
    Evicted { evicted: usize, skipped: usize, keys_expired: usize },
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
    /// Idempotency keys of evicted tasks, until their window runs out: a resubmit with one
    /// still answers with the evicted task.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retired_keys: BTreeMap<String, RetiredKey>,
    /// Tasks evicted so far, and the greatest evicted id: a missing id at or below it may have
    /// been evicted, one above it never existed (ids are time-ordered).
    #[serde(default)]
    pub evicted: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted_id_max: Option<TaskId>,
    /// Derived indexes, maintained by apply and rebuilt when a snapshot is read
    /// ([`TaskTable::rebuild_indexes`]): tasks by state, finished tasks by (finish time, id)
    /// (the eviction order), retired keys by expiry, leased tasks by their lease deadline.
    #[serde(skip)]
    pub counts: StateCounts,
    #[serde(skip)]
    pub finished: BTreeSet<(u64, TaskId)>,
    #[serde(skip)]
    pub retired_key_expiries: BTreeSet<(u64, String)>,
    /// Every task holding a lease, by ([`Lease::deadline_ms`], id): `Tick` and `tick_due` read
    /// only the entries that are due, `ExtendLeases` only the leased tasks.
    #[serde(skip)]
    pub lease_deadlines: BTreeSet<(u64, TaskId)>,
    /// Tasks closed by the command being applied; their parents are settled before the command
    /// returns. Always empty between commands.
    #[serde(skip)]
    pub(super) closed: Vec<TaskId>,
}
