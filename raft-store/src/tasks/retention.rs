//! Retention: finished tasks leave the replicated state after `retention_ms`, or sooner once more
//! than `retained_max` are held, through [`TaskCommand::Evict`](super::TaskCommand::Evict)
//! proposed by the leader; idempotency keys of evicted tasks are kept for their window.
//!
//! Apply decides by the state and the command only: the leader names the tasks (and the finish
//! time it saw), apply re-checks every rule at the command's stamped time, so every replica
//! removes the same tasks.

use std::collections::BTreeSet;

use super::types::{
    RetiredKey, StateCounts, TaskId, TaskResponse, TaskState, TaskTable, EVICT_BATCH_MAX, KEY_EXPIRIES_PER_EVICT_MAX,
    RETIRED_KEYS_MAX,
};

impl TaskTable {
    /// `TaskCommand::Evict`: remove the named finished tasks that qualify, and forget the
    /// idempotency keys whose window ran out (a bounded number of each).
    pub(super) fn evict(&mut self, now_ms: u64, tasks: &[(TaskId, u64)]) -> TaskResponse {
        let (mut evicted, mut skipped) = (0, 0);
        for (task_id, finished_at_ms) in tasks.iter().take(EVICT_BATCH_MAX) {
            if self.evictable(now_ms, task_id, *finished_at_ms) {
                self.remove_finished(task_id);
                evicted += 1;
            } else {
                skipped += 1;
            }
        }
        skipped += tasks.len().saturating_sub(EVICT_BATCH_MAX);
        let keys_expired = self.expire_retired_keys(now_ms, KEY_EXPIRIES_PER_EVICT_MAX);
        TaskResponse::Evicted { evicted, skipped, keys_expired }
    }

    /// Whether `task_id` may leave the state at `now_ms`: held, finished at `finished_at_ms` (not
    /// retried since), due (retention over, or too many finished tasks held), no open child, no
    /// open dependent (it needs this task's result), and its parent gone (a parent settles on,
    /// and reports, its children's results).
    pub fn evictable(&self, now_ms: u64, task_id: &TaskId, finished_at_ms: u64) -> bool {
        self.qualifies(now_ms, task_id, finished_at_ms, |parent| !self.tasks.contains_key(parent))
    }

    fn qualifies(
        &self,
        now_ms: u64,
        task_id: &TaskId,
        finished_at_ms: u64,
        parent_gone: impl Fn(&TaskId) -> bool,
    ) -> bool {
        let Some(task) = self.tasks.get(task_id) else { return false };
        if !task.state.is_terminal() || task.updated_at_ms != finished_at_ms {
            return false;
        }
        let due = finished_at_ms.saturating_add(self.limits.retention_ms) <= now_ms
            || self.finished.len() > self.limits.retained_max;
        if !due {
            return false;
        }
        let open = |ids: Option<&BTreeSet<TaskId>>| {
            ids.into_iter().flatten().any(|id| self.tasks.get(id).is_some_and(|t| !t.state.is_terminal()))
        };
        !open(self.children.get(task_id))
            && !open(self.dependents.get(task_id))
            && task.spec.parent.as_ref().is_none_or(parent_gone)
    }

    /// Whether an `Evict` at `now_ms` could do anything: a finished task is past its retention,
    /// more than `retained_max` are held, or a retired key's window ran out. O(1).
    pub fn eviction_due(&self, now_ms: u64) -> bool {
        self.finished.len() > self.limits.retained_max
            || self.finished.first().is_some_and(|(at, _)| at.saturating_add(self.limits.retention_ms) <= now_ms)
            || self.retired_key_expiries.first().is_some_and(|(at, _)| *at <= now_ms)
    }

    /// The finished tasks an `Evict` at `now_ms` should name, oldest first: at most `max`,
    /// looking at no more than `scan_max` finished tasks (tasks still needed are passed over).
    pub fn eviction_candidates(&self, now_ms: u64, max: usize, scan_max: usize) -> Vec<(TaskId, u64)> {
        let mut over = self.finished.len().saturating_sub(self.limits.retained_max);
        let mut chosen = Vec::new();
        // Apply evicts in order, so a child named after its parent finds the parent gone.
        let mut chosen_ids: BTreeSet<&TaskId> = BTreeSet::new();
        for (finished_at_ms, task_id) in self.finished.iter().take(scan_max) {
            if chosen.len() >= max.min(EVICT_BATCH_MAX) {
                break;
            }
            let expired = finished_at_ms.saturating_add(self.limits.retention_ms) <= now_ms;
            if !expired && over == 0 {
                break;
            }
            let parent_gone = |parent: &TaskId| !self.tasks.contains_key(parent) || chosen_ids.contains(parent);
            if self.qualifies(now_ms, task_id, *finished_at_ms, parent_gone) {
                chosen_ids.insert(task_id);
                chosen.push((task_id.clone(), *finished_at_ms));
                over = over.saturating_sub(1);
            }
        }
        chosen
    }

    /// Remove one finished task and its index entries; keep its idempotency key for its window.
    fn remove_finished(&mut self, task_id: &TaskId) {
        let Some(task) = self.tasks.remove(task_id) else { return };
        self.counts.moved(Some(task.state), None);
        self.finished.remove(&(task.updated_at_ms, task_id.clone()));
        // What depends on it, and its children, are all finished (`evictable`): their records
        // keep naming it, the indexes forget it.
        self.dependents.remove(task_id);
        self.children.remove(task_id);
        for dependency in &task.spec.depends_on {
            if let Some(dependents) = self.dependents.get_mut(dependency) {
                dependents.remove(task_id);
                if dependents.is_empty() {
                    self.dependents.remove(dependency);
                }
            }
        }
        if let Some(parent) = &task.spec.parent {
            if let Some(children) = self.children.get_mut(parent) {
                children.remove(task_id);
                if children.is_empty() {
                    self.children.remove(parent);
                }
            }
        }
        if let Some(key) = &task.spec.idempotency_key {
            if self.by_idempotency_key.get(key) == Some(task_id) {
                self.by_idempotency_key.remove(key);
                let expires_at_ms = task.updated_at_ms.saturating_add(self.limits.idempotency_window_ms);
                self.retired_keys.insert(key.clone(), RetiredKey { task_id: task_id.clone(), expires_at_ms });
                self.retired_key_expiries.insert((expires_at_ms, key.clone()));
                while self.retired_keys.len() > RETIRED_KEYS_MAX {
                    let Some((_, soonest)) = self.retired_key_expiries.pop_first() else { break };
                    self.retired_keys.remove(&soonest);
                }
            }
        }
        self.evicted += 1;
        if self.evicted_id_max.as_ref().is_none_or(|max| task_id > max) {
            self.evicted_id_max = Some(task_id.clone());
        }
    }

    /// Forget at most `max` retired keys whose window ran out at `now_ms`.
    fn expire_retired_keys(&mut self, now_ms: u64, max: usize) -> usize {
        let mut expired = 0;
        while expired < max {
            match self.retired_key_expiries.first() {
                Some((at, _)) if *at <= now_ms => {}
                _ => break,
            }
            let Some((_, key)) = self.retired_key_expiries.pop_first() else { break };
            self.retired_keys.remove(&key);
            expired += 1;
        }
        expired
    }

    /// Whether a task id this table does not hold may have been evicted (ids are time-ordered:
    /// one above every evicted id never existed here).
    pub fn may_have_evicted(&self, task_id: &str) -> bool {
        self.evicted_id_max.as_deref().is_some_and(|max| task_id <= max)
    }

    /// Rebuild the derived indexes (counts by state, finished tasks, retired keys by expiry,
    /// lease deadlines)
    /// from the records, after the table was read from a snapshot.
    pub fn rebuild_indexes(&mut self) {
        self.counts = StateCounts::default();
        self.finished.clear();
        self.lease_deadlines.clear();
        for (id, task) in &self.tasks {
            self.counts.moved(None, Some(task.state));
            if let Some(lease) = &task.lease {
                self.lease_deadlines.insert((lease.deadline_ms(), id.clone()));
            }
            if task.state.is_terminal() {
                self.finished.insert((task.updated_at_ms, id.clone()));
            }
        }
        self.retired_key_expiries =
            self.retired_keys.iter().map(|(key, retired)| (retired.expires_at_ms, key.clone())).collect();
    }

    /// Tasks held in `state`, from the maintained counts.
    pub fn count(&self, state: TaskState) -> u64 {
        match state {
            TaskState::Pending => self.counts.pending,
            TaskState::Queued => self.counts.queued,
            TaskState::Running => self.counts.running,
            TaskState::Completed => self.counts.completed,
            TaskState::Failed => self.counts.failed,
            TaskState::Cancelled => self.counts.cancelled,
        }
    }
}
