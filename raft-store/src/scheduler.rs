//! The scheduler's decisions: a pure function from the task table and a time to assignments.
//!
//! The leader runs it in a loop and proposes what it returns as one batch; apply re-checks every
//! assignment, so a plan made from a slightly old view can only be refused, never corrupt state.
//!
//! Order: priority (CRITICAL first); within a priority, submitters take turns (fairness), and
//! each submitter's tasks go first-come first-served (creation time, then id, which is
//! time-ordered). A task goes to a free slot (of a node seen within a lease time) of its type that
//! has every capability it needs, on the least-loaded such node: the most free slots, then the
//! fewest running attempts, then a rendezvous hash of the task and the node, so equal nodes share
//! the work evenly and the plan stays a pure function of its inputs. A parent's children never
//! run more than `max_parallel_branches` at once; a retried task waits for its `not_before_ms`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};

use crate::tasks::{slot_fits, AgentState, Priority, Slot, TaskCommand, TaskId, TaskSpec, TaskState, TaskTable};

/// One priority's ready tasks: submitter → (creation time, id).
type BySubmitter<'a> = BTreeMap<&'a str, Vec<(u64, &'a TaskId)>>;

/// Free slots of live nodes: agent type → node → slots, in slot id order.
type FreeSlots<'a> = BTreeMap<&'a str, BTreeMap<u64, Vec<(&'a String, &'a Slot)>>>;

/// Load of a node while a plan is made: (free slots of any type, attempts running).
#[derive(Debug, Clone, Copy, Default)]
struct NodeLoad {
    free: usize,
    running: usize,
}

/// A stable hash of the task and the node: the last tie-break between equally loaded nodes
/// (rendezvous hashing), the same on every replica and every run. FNV-1a over the task id, then
/// splitmix64's finaliser over it and the node, so every bit of both moves the result.
fn rendezvous(task_id: &str, node_id: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in task_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mix = |mut x: u64| {
        x ^= x >> 30;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    };
    mix(hash ^ mix(node_id))
}

/// How a node ranks for the next task: more free slots, then fewer running attempts, then the
/// larger rendezvous hash. The largest wins.
type Rank = (usize, Reverse<usize>, u64);

/// The free slot for `spec` on the least-loaded node that has one that fits, taken out of `free`.
fn take_slot<'a>(
    free: &mut FreeSlots<'a>,
    load: &mut BTreeMap<u64, NodeLoad>,
    task_id: &str,
    spec: &TaskSpec,
) -> Option<(&'a String, &'a Slot)> {
    let by_node = free.get_mut(spec.routing_type())?;
    let mut best: Option<(Rank, u64, usize)> = None;
    for (node_id, slots) in by_node.iter() {
        let Some(position) = slots.iter().position(|(_, slot)| slot_fits(slot, spec)) else { continue };
        let node = load.get(node_id).copied().unwrap_or_default();
        let key = (node.free, Reverse(node.running), rendezvous(task_id, *node_id));
        if best.as_ref().is_none_or(|(best_key, _, _)| key > *best_key) {
            best = Some((key, *node_id, position));
        }
    }
    let (_, node_id, position) = best?;
    let taken = by_node.get_mut(&node_id)?.remove(position);
    let node = load.entry(node_id).or_default();
    node.free = node.free.saturating_sub(1);
    node.running += 1;
    Some(taken)
}

/// Plan at most `assignments_max` assignments at `now_ms`, each with a lease of `lease_ms`.
/// Only slots of nodes seen within `lease_ms` are used.
pub fn plan_assignments(table: &TaskTable, now_ms: u64, assignments_max: usize, lease_ms: u64) -> Vec<TaskCommand> {
    let mut free: FreeSlots = BTreeMap::new();
    let mut load: BTreeMap<u64, NodeLoad> = BTreeMap::new();
    let mut free_total = 0usize;
    for (id, slot) in &table.slots {
        if table.slot_holder.contains_key(id) {
            load.entry(slot.node_id).or_default().running += 1;
        } else if slot.state == AgentState::Active && table.node_alive(slot.node_id, now_ms, lease_ms) {
            free.entry(slot.agent_type.as_str()).or_default().entry(slot.node_id).or_default().push((id, slot));
            load.entry(slot.node_id).or_default().free += 1;
            free_total += 1;
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
            if plan.len() >= assignments_max || free_total == 0 {
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
                if let Some((slot_id, slot)) = take_slot(&mut free, &mut load, task_id, &task.spec) {
                    free_total -= 1;
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
            if !queue.is_empty() {
                turns.push_back(queue);
            }
        }
    }
    plan
}
