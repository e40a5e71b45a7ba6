//! The task table's invariants, checked after every apply.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{StateCounts, TaskId, TaskState, TaskTable, CHECKPOINT_BYTES_MAX, RETIRED_KEYS_MAX};

impl TaskTable {
    /// The invariants of the task table.
    pub fn validate(&self) -> Result<(), String> {
        let mut counts = StateCounts::default();
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
            for dependency in task.spec.depends_on.iter().filter(|d| self.tasks.contains_key(*d)) {
                if !self.dependents.get(dependency).is_some_and(|d| d.contains(id)) {
                    return Err(format!("dependency index misses {dependency} -> {id}"));
                }
            }
            // Retention keeps what open tasks need: their dependencies and their parent.
            if !task.state.is_terminal() {
                if let Some(gone) = task.spec.depends_on.iter().find(|d| !self.tasks.contains_key(*d)) {
                    return Err(format!("open task {id} depends on {gone}, which is no longer held"));
                }
                if let Some(gone) = task.spec.parent.as_ref().filter(|p| !self.tasks.contains_key(*p)) {
                    return Err(format!("open task {id} has parent {gone}, which is no longer held"));
                }
            }
            if let Some(parent) = task.spec.parent.as_ref().filter(|p| self.tasks.contains_key(*p)) {
                if !self.children.get(parent).is_some_and(|c| c.contains(id)) {
                    return Err(format!("child index misses {parent} -> {id}"));
                }
            }
            counts.moved(None, Some(task.state));
            if task.state.is_terminal() && !self.finished.contains(&(task.updated_at_ms, id.clone())) {
                return Err(format!("finished task {id} is missing from the eviction order"));
            }
        }
        if counts != self.counts {
            return Err(format!("the state counts {:?} disagree with the tasks {counts:?}", self.counts));
        }
        let open = counts.pending + counts.queued + counts.running;
        if open != self.open as u64 {
            return Err(format!("{} open tasks counted, {open} held", self.open));
        }
        if self.finished.len() as u64 != counts.completed + counts.failed + counts.cancelled {
            return Err("the eviction order holds tasks that are not finished".into());
        }
        for (parent, children) in self.children.iter().chain(&self.dependents) {
            if !self.tasks.contains_key(parent) || children.iter().any(|c| !self.tasks.contains_key(c)) {
                return Err(format!("an index entry of {parent} names a task no longer held"));
            }
        }
        let held: BTreeMap<&String, &TaskId> =
            self.tasks.iter().filter_map(|(id, t)| t.lease.as_ref().map(|l| (&l.slot, id))).collect();
        let leases = self.tasks.values().filter(|t| t.lease.is_some()).count();
        if held.len() != leases {
            return Err("two live leases hold one slot".into());
        }
        let deadlines: BTreeSet<(u64, TaskId)> =
            self.tasks.iter().filter_map(|(id, t)| t.lease.as_ref().map(|l| (l.deadline_ms(), id.clone()))).collect();
        if deadlines != self.lease_deadlines {
            return Err(format!(
                "the lease deadline index ({} entries) disagrees with the leases ({} held)",
                self.lease_deadlines.len(),
                deadlines.len()
            ));
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
        for (key, retired) in &self.retired_keys {
            if self.tasks.contains_key(&retired.task_id) || self.by_idempotency_key.contains_key(key) {
                return Err(format!("retired idempotency key {key} names a held task or a live key"));
            }
            if !self.retired_key_expiries.contains(&(retired.expires_at_ms, key.clone())) {
                return Err(format!("retired idempotency key {key} is missing from its expiry index"));
            }
        }
        if self.retired_key_expiries.len() != self.retired_keys.len() || self.retired_keys.len() > RETIRED_KEYS_MAX {
            return Err("the retired keys' expiry index disagrees with the keys, or holds too many".into());
        }
        Ok(())
    }
}
