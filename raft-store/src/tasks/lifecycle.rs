//! A task's life: submit, assign, renew, report, complete, fail, cancel, retry, and the tick
//! that expires leases, attempts and dependency waits.

use std::collections::BTreeMap;

use super::check::{check_spec, check_text, check_token, expect_state, invalid};
use super::events::{self, AttemptEnd, FailCause};
use super::slots::{release, slot_fits};
use super::types::{
    set_state, Checkpoint, Lease, Progress, Task, TaskId, TaskRejection, TaskResponse, TaskSpec, TaskState, TaskTable,
    TokenUsage, CHECKPOINT_BYTES_MAX, PROGRESS_MESSAGE_BYTES_MAX, TASK_TEXT_BYTES_MAX, WORKER_FORGET_MS, WORKER_ID_MIN,
};

impl TaskTable {
    /// `TaskCommand::Submit`: add a task (PENDING, QUEUED, or FAILED after a failed dependency).
    pub(super) fn submit(&mut self, now_ms: u64, spec: &TaskSpec) -> Result<TaskResponse, TaskRejection> {
        check_spec(spec)?;
        if let Some(key) = &spec.idempotency_key {
            // A key outlives its task's eviction for the idempotency window.
            let existing = self.by_idempotency_key.get(key).or_else(|| self.retired_keys.get(key).map(|r| &r.task_id));
            if let Some(existing) = existing {
                return Ok(TaskResponse::Submitted { task_id: existing.clone(), duplicate: true });
            }
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
        } else {
            self.finished.insert((now_ms, spec.id.clone()));
        }
        self.counts.moved(None, Some(state));
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
        if let Some(task) = self.tasks.get(&spec.id) {
            events::submitted(task);
            if state == TaskState::Failed {
                events::failed(FailCause::Dependency);
            }
        }
        Ok(TaskResponse::Submitted { task_id: spec.id.clone(), duplicate: false })
    }

    /// `TaskCommand::Assign`: lease a QUEUED task to a free slot that fits it.
    pub(super) fn assign(
        &mut self,
        now_ms: u64,
        token: u64,
        task_id: &TaskId,
        slot: &str,
        node_id: u64,
        lease_ms: u64,
    ) -> Result<TaskResponse, TaskRejection> {
        let fits = match (self.tasks.get(task_id), self.slots.get(slot)) {
            (Some(task), Some(candidate)) => {
                slot_fits(candidate, &task.spec) && candidate.node_id == node_id && !self.slot_holder.contains_key(slot)
            }
            _ => false,
        };
        let parent_full = self
            .tasks
            .get(task_id)
            .and_then(|t| t.spec.parent.as_ref())
            .is_some_and(|parent| self.running_children(parent) >= self.branches_max(parent));
        if parent_full {
            return Err(TaskRejection::SlotUnavailable { task_id: task_id.clone(), slot: slot.to_string() });
        }
        let task = self.get_mut(task_id)?;
        expect_state(task, TaskState::Queued)?;
        if task.not_before_ms > now_ms {
            return Err(TaskRejection::NotYet { task_id: task_id.clone(), not_before_ms: task.not_before_ms });
        }
        if !fits {
            return Err(TaskRejection::SlotUnavailable { task_id: task_id.clone(), slot: slot.to_string() });
        }
        self.slot_holder.insert(slot.to_string(), task_id.clone());
        let task =
            self.tasks.get_mut(task_id).ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })?;
        let expires_at_ms = now_ms.saturating_add(lease_ms);
        // A QUEUED task's last update is when it became QUEUED (nothing touches it while it waits).
        let queued_since_ms = task.updated_at_ms;
        task.attempt += 1;
        set_state(&mut self.counts, task, TaskState::Running);
        task.progress = None;
        task.updated_at_ms = now_ms;
        let lease = Lease {
            slot: slot.to_string(),
            node_id,
            token,
            expires_at_ms,
            attempt_deadline_ms: now_ms.saturating_add(task.spec.timeout_ms),
        };
        self.lease_deadlines.insert((lease.deadline_ms(), task_id.clone()));
        task.lease = Some(Box::new(lease));
        events::attempt_started(task, queued_since_ms, now_ms);
        Ok(TaskResponse::Assigned { token, expires_at_ms })
    }

    /// `TaskCommand::Renew`: one node's heartbeat for all its leases.
    pub(super) fn renew(
        &mut self,
        now_ms: u64,
        node_id: u64,
        leases: &[(TaskId, u64)],
        lease_ms: u64,
    ) -> Result<TaskResponse, TaskRejection> {
        self.node_seen_ms.insert(node_id, now_ms);
        let (mut renewed, mut lost) = (Vec::new(), Vec::new());
        for (task_id, presented) in leases {
            match self.tasks.get_mut(task_id).and_then(|t| t.lease.as_mut()) {
                Some(lease) if lease.token == *presented && lease.node_id == node_id => {
                    self.lease_deadlines.remove(&(lease.deadline_ms(), task_id.clone()));
                    lease.expires_at_ms = lease.expires_at_ms.max(now_ms.saturating_add(lease_ms));
                    self.lease_deadlines.insert((lease.deadline_ms(), task_id.clone()));
                    renewed.push(task_id.clone());
                }
                _ => lost.push(task_id.clone()),
            }
        }
        Ok(TaskResponse::Renewed { renewed, lost })
    }

    /// `TaskCommand::ExtendLeases`: a new leader extends every live lease.
    pub(super) fn extend_leases(&mut self, now_ms: u64, by_ms: u64) -> Result<TaskResponse, TaskRejection> {
        // Only the leased tasks, through the deadline index (every entry moves, so rebuild it).
        let leased = std::mem::take(&mut self.lease_deadlines);
        for (_, task_id) in leased {
            if let Some(lease) = self.tasks.get_mut(&task_id).and_then(|t| t.lease.as_mut()) {
                lease.expires_at_ms = lease.expires_at_ms.max(now_ms).saturating_add(by_ms);
                self.lease_deadlines.insert((lease.deadline_ms(), task_id));
            }
        }
        Ok(TaskResponse::Extended { leases: self.lease_deadlines.len() })
    }

    /// `TaskCommand::SaveCheckpoint`: the running attempt's checkpoint.
    pub(super) fn save_checkpoint(
        &mut self,
        now_ms: u64,
        task_id: &TaskId,
        presented: u64,
        data: &str,
        stored: bool,
    ) -> Result<TaskResponse, TaskRejection> {
        check_text("checkpoint", data, CHECKPOINT_BYTES_MAX)?;
        let task = self.get_mut(task_id)?;
        check_token(task, presented)?;
        task.checkpoint =
            Some(Box::new(Checkpoint { data: data.to_string(), stored, attempt: task.attempt, saved_at_ms: now_ms }));
        task.updated_at_ms = now_ms;
        Ok(TaskResponse::CheckpointSaved)
    }

    /// `TaskCommand::ReportProgress`: the running attempt's progress.
    pub(super) fn report_progress(
        &mut self,
        task_id: &TaskId,
        presented: u64,
        percent: u8,
        message: &str,
    ) -> Result<TaskResponse, TaskRejection> {
        check_text("message", message, PROGRESS_MESSAGE_BYTES_MAX)?;
        if percent > 100 {
            return Err(invalid("percent", "must be in 0..=100"));
        }
        let task = self.get_mut(task_id)?;
        check_token(task, presented)?;
        task.progress = Some(Box::new(Progress { percent, message: message.to_string() }));
        Ok(TaskResponse::ProgressReported)
    }

    /// `TaskCommand::RecordUsage`: add the running attempt's model tokens.
    pub(super) fn record_usage(
        &mut self,
        task_id: &TaskId,
        presented: u64,
        usage: &TokenUsage,
    ) -> Result<TaskResponse, TaskRejection> {
        let task = self.get_mut(task_id)?;
        check_token(task, presented)?;
        task.usage.input_tokens = task.usage.input_tokens.saturating_add(usage.input_tokens);
        task.usage.output_tokens = task.usage.output_tokens.saturating_add(usage.output_tokens);
        Ok(TaskResponse::UsageRecorded)
    }

    /// `TaskCommand::Complete`: the running attempt's result.
    pub(super) fn complete(
        &mut self,
        now_ms: u64,
        task_id: &TaskId,
        presented: u64,
        result: &str,
        stored: bool,
    ) -> Result<TaskResponse, TaskRejection> {
        check_text("result", result, TASK_TEXT_BYTES_MAX)?;
        let task =
            self.tasks.get_mut(task_id).ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })?;
        check_token(task, presented)?;
        if task.spec.planner_type.is_some() && !task.expanded {
            return Err(invalid(
                "result",
                format!("task {task_id} is being planned: answer with a plan (Expand / SubmitPlan), not a result"),
            ));
        }
        if stored {
            task.result = None;
            task.result_token = Some(presented);
        } else {
            task.result = Some(result.to_string());
            task.result_token = None;
        }
        self.close(task_id, TaskState::Completed, None, now_ms);
        self.promote_dependents(now_ms, task_id);
        Ok(TaskResponse::Completed)
    }

    /// `TaskCommand::Fail`: the running attempt failed.
    pub(super) fn fail(
        &mut self,
        now_ms: u64,
        task_id: &TaskId,
        presented: u64,
        error: &str,
        retryable: bool,
    ) -> Result<TaskResponse, TaskRejection> {
        check_text("error", error, TASK_TEXT_BYTES_MAX)?;
        check_token(self.get_mut(task_id)?, presented)?;
        let (will_retry, attempt) = self.fail_attempt(now_ms, task_id, error, retryable, AttemptEnd::Failed);
        Ok(TaskResponse::AttemptFailed { will_retry, attempt })
    }

    /// `TaskCommand::Cancel`: cancel a task and its descendants; fail what depends on them.
    pub(super) fn cancel(
        &mut self,
        now_ms: u64,
        task_id: &TaskId,
        reason: &str,
    ) -> Result<TaskResponse, TaskRejection> {
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

    /// `TaskCommand::Retry`: run a FAILED or CANCELLED task again from its first attempt.
    pub(super) fn retry(&mut self, now_ms: u64, task_id: &TaskId) -> Result<TaskResponse, TaskRejection> {
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
        if let Some(parent) = task.spec.parent.as_ref().filter(|p| !self.tasks.contains_key(*p)) {
            return Err(invalid(
                "task_id",
                format!("its parent {parent} was evicted after tasks.retention; submit this task anew"),
            ));
        }
        if let Some(parent) =
            task.spec.parent.as_ref().filter(|p| self.tasks.get(*p).is_some_and(|p| p.state.is_terminal()))
        {
            return Err(invalid("task_id", format!("its parent {parent} has finished; retry the parent instead")));
        }
        if let Some(dependency) = task.spec.depends_on.iter().find(|d| !self.tasks.contains_key(*d)) {
            return Err(invalid(
                "depends_on",
                format!("dependency {dependency} was evicted after tasks.retention; submit this task anew"),
            ));
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
        self.finished.remove(&(task.updated_at_ms, task_id.clone()));
        let task =
            self.tasks.get_mut(task_id).ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })?;
        set_state(&mut self.counts, task, if ready { TaskState::Queued } else { TaskState::Pending });
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

    /// `TaskCommand::Tick`: expire leases, attempts and dependency waits past their time.
    pub(super) fn tick(&mut self, now_ms: u64) -> Result<TaskResponse, TaskRejection> {
        let mut failed_attempts = Vec::new();
        // Only the due leases, from the deadline index; failed in id order, as a scan would.
        let mut expired: Vec<(TaskId, String, AttemptEnd)> = self
            .lease_deadlines
            .range(..(now_ms.saturating_add(1), TaskId::new()))
            .filter_map(|(_, id)| {
                let task = self.tasks.get(id)?;
                let lease = task.lease.as_ref()?;
                if lease.expires_at_ms <= now_ms {
                    Some((id.clone(), "lease expired".to_string(), AttemptEnd::LeaseExpired))
                } else {
                    Some((
                        id.clone(),
                        format!("attempt timed out after {} ms", task.spec.timeout_ms),
                        AttemptEnd::TimedOut,
                    ))
                }
            })
            .collect();
        expired.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (task_id, why, end) in expired {
            self.fail_attempt(now_ms, &task_id, &why, true, end);
            failed_attempts.push(task_id);
        }
        let timeout = self.limits.dependency_timeout_ms;
        let waited_too_long: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| waits_on_dependencies(&self.tasks, t) && t.created_at_ms.saturating_add(timeout) <= now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for task_id in &waited_too_long {
            let cause = format!("dependencies not complete within {timeout} ms");
            self.finish_failed(now_ms, task_id, cause, FailCause::DependencyTimeout);
        }
        self.forget_gone_workers(now_ms);
        Ok(TaskResponse::Ticked { failed_attempts, failed_tasks: waited_too_long })
    }

    /// Whether a [`TaskCommand::Tick`](super::TaskCommand::Tick) at `now_ms` would change
    /// anything: a lease or attempt has run out, or a task has waited too long on its dependencies.
    pub fn tick_due(&self, now_ms: u64) -> bool {
        let timeout = self.limits.dependency_timeout_ms;
        self.lease_deadlines.first().is_some_and(|(deadline, _)| *deadline <= now_ms)
            || self
                .tasks
                .values()
                .any(|t| waits_on_dependencies(&self.tasks, t) && t.created_at_ms.saturating_add(timeout) <= now_ms)
            || self
                .node_seen_ms
                .iter()
                .any(|(holder, seen)| *holder >= WORKER_ID_MIN && seen.saturating_add(WORKER_FORGET_MS) <= now_ms)
    }

    fn get_mut(&mut self, task_id: &TaskId) -> Result<&mut Task, TaskRejection> {
        self.tasks
            .get_mut(task_id)
            .map(|t| &mut **t)
            .ok_or_else(|| TaskRejection::UnknownTask { task_id: task_id.clone() })
    }

    /// End the running attempt of `task_id`: back to QUEUED with backoff while attempts remain
    /// (and `retryable`), else FAILED. Returns (will retry, attempts so far).
    pub(super) fn fail_attempt(
        &mut self,
        now_ms: u64,
        task_id: &TaskId,
        error: &str,
        retryable: bool,
        end: AttemptEnd,
    ) -> (bool, u32) {
        let limits = self.limits.clone();
        let Some(task) = self.tasks.get_mut(task_id) else { return (false, 0) };
        events::attempt_ended(task, end, now_ms);
        release(&mut self.slot_holder, &mut self.lease_deadlines, task);
        task.cause = Some(error.to_string());
        task.updated_at_ms = now_ms;
        let attempt = task.attempt;
        if retryable && attempt <= task.spec.max_retries {
            let exponent = attempt.saturating_sub(1).min(30);
            let backoff =
                limits.retry_backoff_base_ms.saturating_mul(1u64 << exponent).min(limits.retry_backoff_max_ms);
            set_state(&mut self.counts, task, TaskState::Queued);
            task.not_before_ms = now_ms.saturating_add(backoff);
            events::retried();
            (true, attempt)
        } else {
            let cause = if retryable { FailCause::RetriesExhausted } else { FailCause::Error };
            self.finish_failed(now_ms, task_id, error.to_string(), cause);
            (false, attempt)
        }
    }

    /// Move `task_id` to the terminal `state` (keeping its cause unless `cause` is given), free its
    /// lease and count it closed. False, and nothing changed, when it is unknown or already ended.
    pub(super) fn close(&mut self, task_id: &TaskId, state: TaskState, cause: Option<String>, now_ms: u64) -> bool {
        debug_assert!(state.is_terminal());
        let Some(task) = self.tasks.get_mut(task_id).filter(|t| !t.state.is_terminal()) else { return false };
        let end = if state == TaskState::Completed { AttemptEnd::Completed } else { AttemptEnd::Cancelled };
        events::attempt_ended(task, end, now_ms);
        match state {
            TaskState::Completed => events::completed(),
            TaskState::Cancelled => events::cancelled(),
            // Counted by the caller, which knows the cause.
            _ => {}
        }
        release(&mut self.slot_holder, &mut self.lease_deadlines, task);
        self.open = self.open.saturating_sub(1);
        self.closed.push(task.spec.id.clone());
        set_state(&mut self.counts, task, state);
        if cause.is_some() {
            task.cause = cause;
        }
        task.updated_at_ms = now_ms;
        self.finished.insert((now_ms, task_id.clone()));
        true
    }

    pub(super) fn finish_failed(&mut self, now_ms: u64, task_id: &TaskId, cause: String, kind: FailCause) {
        if self.close(task_id, TaskState::Failed, Some(cause), now_ms) {
            events::failed(kind);
        }
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
            events::failed(FailCause::Dependency);
            if let Some(more) = self.dependents.get(&next) {
                stack.extend(more.iter().cloned());
            }
        }
    }

    /// Queue every PENDING dependent of `task_id` whose dependencies have all completed.
    pub(super) fn promote_dependents(&mut self, now_ms: u64, task_id: &TaskId) {
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
                set_state(&mut self.counts, task, TaskState::Queued);
                task.updated_at_ms = now_ms;
            }
        }
    }
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
