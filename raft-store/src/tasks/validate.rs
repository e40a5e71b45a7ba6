//! The task table's invariants, checked after every apply.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{TaskId, TaskState, TaskTable, CHECKPOINT_BYTES_MAX};

impl TaskTable {
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
