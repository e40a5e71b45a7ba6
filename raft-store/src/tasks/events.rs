//! Task events as metrics, counted where apply makes them happen, so every replica counts every
//! event once as it applies the entry (each node's series is complete on its own; a restarted
//! node starts again from zero, as any Prometheus counter does). A command answered from a
//! session's memory is not applied again, so it is not counted again.
//!
//! Only the `metrics` facade is used: no exporter, no I/O. Durations come from the leader's time
//! stamps, never a clock. Label values are fixed sets, priorities, and agent types (a task with a
//! lease has its slot's type); never a task id.

use super::types::{Priority, Task};

/// Why a task failed for good: the `cause` label of `maos_tasks_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailCause {
    /// Its agent reported a failure that retrying cannot help.
    Error,
    /// A retryable failure (reported, expired lease, timeout, terminated agent) with no attempt left.
    RetriesExhausted,
    /// A dependency failed or was cancelled.
    Dependency,
    /// Its dependencies did not complete within `dependency_timeout`.
    DependencyTimeout,
    /// A subtask of its plan failed or was cancelled.
    Subtask,
}

impl FailCause {
    fn label(self) -> &'static str {
        match self {
            FailCause::Error => "error",
            FailCause::RetriesExhausted => "retries_exhausted",
            FailCause::Dependency => "dependency",
            FailCause::DependencyTimeout => "dependency_timeout",
            FailCause::Subtask => "subtask",
        }
    }
}

/// How an attempt ended: the `outcome` label of `maos_task_attempt_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AttemptEnd {
    Completed,
    /// Its agent reported a failure.
    Failed,
    /// The lease expired without a renewal.
    LeaseExpired,
    /// The attempt ran past its task's timeout.
    TimedOut,
    /// Its agent was terminated.
    AgentTerminated,
    /// The task was cancelled (or failed by its plan) while running.
    Cancelled,
    /// A planning attempt answered with a plan.
    Planned,
}

impl AttemptEnd {
    fn label(self) -> &'static str {
        match self {
            AttemptEnd::Completed => "completed",
            AttemptEnd::Failed => "failed",
            AttemptEnd::LeaseExpired => "lease_expired",
            AttemptEnd::TimedOut => "timed_out",
            AttemptEnd::AgentTerminated => "agent_terminated",
            AttemptEnd::Cancelled => "cancelled",
            AttemptEnd::Planned => "planned",
        }
    }
}

fn priority_label(priority: Priority) -> &'static str {
    match priority {
        Priority::Low => "low",
        Priority::Normal => "normal",
        Priority::High => "high",
        Priority::Critical => "critical",
    }
}

fn seconds(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

pub(super) fn submitted(task: &Task) {
    metrics::counter!("maos_tasks_submitted_total", "priority" => priority_label(task.spec.priority)).increment(1);
}

/// A lease was granted at `now_ms` to a task QUEUED since `queued_since_ms`.
pub(super) fn attempt_started(task: &Task, queued_since_ms: u64, now_ms: u64) {
    metrics::counter!("maos_task_attempts_total").increment(1);
    metrics::histogram!(
        "maos_task_queue_wait_seconds",
        "type" => task.spec.task_type.clone(),
        "priority" => priority_label(task.spec.priority)
    )
    .record(seconds(queued_since_ms, now_ms));
}

/// The running attempt of `task` ends at `now_ms` (call before its lease is released).
pub(super) fn attempt_ended(task: &Task, end: AttemptEnd, now_ms: u64) {
    let Some(lease) = &task.lease else { return };
    match end {
        AttemptEnd::LeaseExpired => metrics::counter!("maos_task_lease_expiries_total").increment(1),
        AttemptEnd::TimedOut => metrics::counter!("maos_task_attempt_timeouts_total").increment(1),
        _ => {}
    }
    // The attempt's deadline is its start plus the task's timeout.
    let started_ms = lease.attempt_deadline_ms.saturating_sub(task.spec.timeout_ms);
    metrics::histogram!(
        "maos_task_attempt_duration_seconds",
        "type" => task.spec.task_type.clone(),
        "outcome" => end.label()
    )
    .record(seconds(started_ms, now_ms));
}

pub(super) fn retried() {
    metrics::counter!("maos_task_retries_total").increment(1);
}

pub(super) fn completed() {
    metrics::counter!("maos_tasks_completed_total").increment(1);
}

pub(super) fn failed(cause: FailCause) {
    metrics::counter!("maos_tasks_failed_total", "cause" => cause.label()).increment(1);
}

pub(super) fn cancelled() {
    metrics::counter!("maos_tasks_cancelled_total").increment(1);
}
