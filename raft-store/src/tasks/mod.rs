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
//!
//! Layout: `types` (records, limits, commands, responses, refusals, the table), `check`
//! (state-free checks of specs and plans), `lifecycle` (submit to completion, retries, the tick),
//! `plan` (expansion into subtasks and the parent's settlement), `slots` (agents, holders,
//! liveness), `retention` (eviction of finished tasks, retired idempotency keys, the derived
//! indexes), `validate` (invariants), `events` (task events counted as metrics as they apply). This
//! file applies a command by dispatching it.

mod check;
mod events;
mod lifecycle;
mod plan;
mod retention;
mod slots;
mod types;
mod validate;

use check::invalid;

pub use check::{check_plan, check_spec};
pub use plan::{aggregate_results, plan_key};
pub use slots::slot_fits;
pub use types::{
    AgentState, Checkpoint, Lease, PlannedTask, Priority, Progress, RetiredKey, Slot, StateCounts, Task, TaskCommand,
    TaskId, TaskLimits, TaskRejection, TaskResponse, TaskSpec, TaskState, TaskTable, TokenUsage, AGGREGATE_BYTES_MAX,
    CHECKPOINT_BYTES_MAX, DEPENDENCIES_MAX, EVICT_BATCH_MAX, KEY_EXPIRIES_PER_EVICT_MAX, LABELS_MAX,
    PLAN_KEY_BYTES_MAX, PLAN_KEY_LABEL, PLAN_SUBTASKS_MAX, PROGRESS_MESSAGE_BYTES_MAX, RETIRED_KEYS_MAX, RETRIES_MAX,
    SLOTS_PER_NODE_MAX, TASK_TEXT_BYTES_MAX, WORKER_FORGET_MS, WORKER_ID_MIN,
};

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
                self.assign(now_ms, token, task_id, slot, *node_id, *lease_ms)
            }
            TaskCommand::Renew { node_id, leases, lease_ms } => self.renew(now_ms, *node_id, leases, *lease_ms),
            TaskCommand::Complete { task_id, token: presented, result, stored } => {
                self.complete(now_ms, task_id, *presented, result, *stored)
            }
            TaskCommand::Fail { task_id, token: presented, error, retryable } => {
                self.fail(now_ms, task_id, *presented, error, *retryable)
            }
            TaskCommand::Cancel { task_id, reason } => self.cancel(now_ms, task_id, reason),
            TaskCommand::Retry { task_id } => self.retry(now_ms, task_id),
            TaskCommand::Tick => self.tick(now_ms),
            TaskCommand::ExtendLeases { by_ms } => self.extend_leases(now_ms, *by_ms),
            TaskCommand::Configure { limits } => self.configure(limits),
            TaskCommand::RegisterSlots { node_id, slots } => self.register_slots(now_ms, *node_id, slots),
            TaskCommand::SaveCheckpoint { task_id, token: presented, data, stored } => {
                self.save_checkpoint(now_ms, task_id, *presented, data, *stored)
            }
            TaskCommand::ReportProgress { task_id, token: presented, percent, message } => {
                self.report_progress(task_id, *presented, *percent, message)
            }
            TaskCommand::RecordUsage { task_id, token: presented, usage } => {
                self.record_usage(task_id, *presented, usage)
            }
            TaskCommand::Expand { task_id, token: presented, subtasks } => {
                self.expand(now_ms, task_id, *presented, subtasks)
            }
            TaskCommand::SetAgentState { agent_id, state } => self.set_agent_state(now_ms, agent_id, *state),
            TaskCommand::AddAgent { node_id, agent_type, agents_max } => {
                self.add_agent(*node_id, agent_type, *agents_max)
            }
            TaskCommand::Evict { tasks } => Ok(self.evict(now_ms, tasks)),
        }
    }

    /// `TaskCommand::Configure`: replace the limits.
    fn configure(&mut self, limits: &TaskLimits) -> Result<TaskResponse, TaskRejection> {
        if limits.queue_size == 0 {
            return Err(invalid("queue_size", "must be at least 1"));
        }
        if limits.max_parallel_branches == 0 {
            return Err(invalid("max_parallel_branches", "must be at least 1"));
        }
        if limits.retention_ms == 0 {
            return Err(invalid("retention_ms", "must be at least 1 (tasks.retention)"));
        }
        if limits.retained_max == 0 {
            return Err(invalid("retained_max", "must be at least 1 (tasks.retained_max)"));
        }
        if limits.idempotency_window_ms < limits.retention_ms {
            return Err(invalid(
                "idempotency_window_ms",
                "must be at least retention_ms (tasks.idempotency_window >= tasks.retention)",
            ));
        }
        self.limits = limits.clone();
        Ok(TaskResponse::Configured)
    }
}
