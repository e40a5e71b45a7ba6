//! Plans: a planning attempt's subtasks become children; the parent settles on their outcome.

use std::collections::BTreeMap;

use super::check::{check_plan, check_spec, check_token, invalid};
use super::slots::release;
use super::types::{
    set_state, PlannedTask, Task, TaskId, TaskRejection, TaskResponse, TaskSpec, TaskState, TaskTable,
    AGGREGATE_BYTES_MAX, PLAN_KEY_LABEL,
};

impl TaskTable {
    /// Validate a plan and add its subtasks as children of `task_id`, or change nothing.
    pub(super) fn expand(
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
                trace_parent: parent.spec.trace_parent.clone(),
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
            super::events::attempt_ended(parent, super::events::AttemptEnd::Planned, now_ms);
            release(&mut self.slot_holder, &mut self.lease_deadlines, parent);
            set_state(&mut self.counts, parent, TaskState::Pending);
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
    pub(super) fn settle_parent(&mut self, now_ms: u64, parent_id: &TaskId) {
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
                    self.finish_failed(now_ms, parent_id, cause, super::events::FailCause::Subtask);
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
