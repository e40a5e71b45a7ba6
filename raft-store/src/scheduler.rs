//! The scheduler's decisions: a pure function from the task table and a time to assignments.
//!
//! The leader runs it in a loop and proposes what it returns as one batch; apply re-checks every
//! assignment, so a plan made from a slightly old view can only be refused, never corrupt state.
//!
//! Order: priority (CRITICAL first); within a priority, submitters take turns (fairness), and
//! each submitter's tasks go first-come first-served (creation time, then id, which is
//! time-ordered). A task goes to the first free slot (of a node seen within a lease time) of its type that has every capability it
//! needs; a parent's children never run more than `max_parallel_branches` at once; a retried task
//! waits for its `not_before_ms`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};

use crate::tasks::{slot_fits, AgentState, Priority, TaskCommand, TaskId, TaskState, TaskTable};

/// One priority's ready tasks: submitter → (creation time, id).
type BySubmitter<'a> = BTreeMap<&'a str, Vec<(u64, &'a TaskId)>>;

/// Plan at most `assignments_max` assignments at `now_ms`, each with a lease of `lease_ms`.
/// Only slots of nodes seen within `lease_ms` are used.
pub fn plan_assignments(table: &TaskTable, now_ms: u64, assignments_max: usize, lease_ms: u64) -> Vec<TaskCommand> {
    // Free slots of live nodes by agent type, in slot id order.
    let mut free: BTreeMap<&str, Vec<(&String, &crate::tasks::Slot)>> = BTreeMap::new();
    for (id, slot) in &table.slots {
        if slot.state == AgentState::Active
            && !table.slot_holder.contains_key(id)
            && table.node_alive(slot.node_id, now_ms, lease_ms)
        {
            free.entry(slot.agent_type.as_str()).or_default().push((id, slot));
        }
    }
    if free.is_empty() || assignments_max == 0 {
        return Vec::new();
    }
    // Ready tasks: priority (highest first) → submitter → first-come first-served.
    let mut ready: BTreeMap<Reverse<Priority>, BySubmitter> = BTreeMap::new();
    for (id, task) in &table.tasks {
        if task.state == TaskState::Queued
            && task.not_before_ms <= now_ms
            && free.contains_key(task.spec.routing_type())
        {
            ready
                .entry(Reverse(task.spec.priority))
                .or_default()
                .entry(task.spec.submitter.as_str())
                .or_default()
                .push((task.created_at_ms, id));
        }
    }
    let mut running_children: BTreeMap<&TaskId, usize> = BTreeMap::new();
    let mut plan = Vec::new();
    for by_submitter in ready.into_values() {
        let mut turns: VecDeque<VecDeque<(u64, &TaskId)>> = by_submitter
            .into_values()
            .map(|mut queue| {
                queue.sort();
                queue.into()
            })
            .collect();
        while let Some(mut queue) = turns.pop_front() {
            if plan.len() >= assignments_max || free.values().all(Vec::is_empty) {
                return plan;
            }
            let Some((_, task_id)) = queue.pop_front() else { continue };
            let task = &table.tasks[task_id];
            let parent_allows = match &task.spec.parent {
                Some(parent) => {
                    let running = running_children.entry(parent).or_insert_with(|| table.running_children(parent));
                    *running < table.branches_max(parent)
                }
                None => true,
            };
            if parent_allows {
                let candidates = free.get_mut(task.spec.routing_type());
                if let Some(candidates) = candidates {
                    if let Some(position) = candidates.iter().position(|(_, slot)| slot_fits(slot, &task.spec)) {
                        let (slot_id, slot) = candidates.remove(position);
                        if let Some(parent) = &task.spec.parent {
                            *running_children.entry(parent).or_default() += 1;
                        }
                        plan.push(TaskCommand::Assign {
                            task_id: task_id.clone(),
                            slot: slot_id.clone(),
                            node_id: slot.node_id,
                            lease_ms,
                        });
                    }
                }
            }
            if !queue.is_empty() {
                turns.push_back(queue);
            }
        }
    }
    plan
}
