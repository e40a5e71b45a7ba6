//! Agent slots and their holders (nodes and external workers): registration, operator state,
//! liveness, and which slot may run which task.

use std::collections::{BTreeMap, BTreeSet};

use super::check::invalid;
use super::types::{
    AgentState, Slot, Task, TaskId, TaskRejection, TaskResponse, TaskSpec, TaskTable, SLOTS_PER_NODE_MAX,
    WORKER_FORGET_MS, WORKER_ID_MIN,
};

impl TaskTable {
    /// `TaskCommand::RegisterSlots`: replace one holder's agent pool.
    pub(super) fn register_slots(
        &mut self,
        now_ms: u64,
        node_id: u64,
        slots: &BTreeMap<String, Slot>,
    ) -> Result<TaskResponse, TaskRejection> {
        if slots.len() > SLOTS_PER_NODE_MAX {
            return Err(invalid("slots", format!("{} slots, over the limit of {SLOTS_PER_NODE_MAX}", slots.len())));
        }
        if let Some((id, _)) = slots
            .iter()
            .find(|(id, slot)| id.is_empty() || id.len() > 128 || slot.node_id != node_id || slot.agent_type.is_empty())
        {
            return Err(invalid(
                "slots",
                format!("slot {id:?} needs a 1..=128 byte id, node {node_id} and an agent type"),
            ));
        }
        if let Some((id, _)) =
            slots.iter().find(|(id, _)| self.slots.get(*id).is_some_and(|existing| existing.node_id != node_id))
        {
            return Err(invalid("slots", format!("slot {id:?} belongs to another holder")));
        }
        self.node_seen_ms.insert(node_id, now_ms);
        // An operator's pause or termination outlives the node's re-registration.
        let previous: BTreeMap<String, AgentState> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.node_id == node_id)
            .map(|(id, slot)| (id.clone(), slot.state))
            .collect();
        self.slots.retain(|_, slot| slot.node_id != node_id);
        for (id, slot) in slots {
            let mut slot = slot.clone();
            slot.state = previous.get(id).copied().unwrap_or(slot.state);
            self.slots.insert(id.clone(), slot);
        }
        Ok(TaskResponse::SlotsRegistered { slots: slots.len() })
    }

    /// `TaskCommand::SetAgentState`: an operator's pause, resume or terminate of one agent.
    pub(super) fn set_agent_state(
        &mut self,
        now_ms: u64,
        agent_id: &str,
        state: AgentState,
    ) -> Result<TaskResponse, TaskRejection> {
        let slot = self
            .slots
            .get_mut(agent_id)
            .ok_or_else(|| TaskRejection::UnknownAgent { agent_id: agent_id.to_string() })?;
        let previous = slot.state;
        if previous == AgentState::Terminated {
            return Err(TaskRejection::AgentState {
                agent_id: agent_id.to_string(),
                state: previous,
                message: "a terminated agent stays terminated; spawn a new one".into(),
            });
        }
        slot.state = state;
        if state == AgentState::Terminated {
            if let Some(task_id) = self.slot_holder.get(agent_id).cloned() {
                let why = format!("agent {agent_id} was terminated");
                self.fail_attempt(now_ms, &task_id, &why, true, super::events::AttemptEnd::AgentTerminated);
            }
        }
        Ok(TaskResponse::AgentStateSet { previous })
    }

    /// `TaskCommand::AddAgent`: one more agent like the holder's existing ones of a type.
    pub(super) fn add_agent(
        &mut self,
        node_id: u64,
        agent_type: &str,
        agents_max: usize,
    ) -> Result<TaskResponse, TaskRejection> {
        let live = self.slots.values().filter(|s| s.node_id == node_id && s.state != AgentState::Terminated);
        if live.count() >= agents_max {
            return Err(TaskRejection::AgentLimit { node_id, limit: agents_max });
        }
        let (model_id, model) =
            self.slots.iter().find(|(_, s)| s.node_id == node_id && s.agent_type == *agent_type).ok_or_else(|| {
                invalid(
                    "agent_type",
                    format!("node {node_id} runs no agent of type {agent_type:?}; spawn a type it is configured for"),
                )
            })?;
        let prefix = match model_id.rsplit_once('/') {
            Some((prefix, _)) => prefix.to_string(),
            None => model_id.clone(),
        };
        let agent_id = (0..=self.slots.len())
            .map(|i| format!("{prefix}/{i}"))
            .find(|id| !self.slots.contains_key(id))
            .unwrap_or_else(|| format!("{prefix}/{}", self.slots.len() + 1));
        let slot = Slot { state: AgentState::Active, ..model.clone() };
        self.slots.insert(agent_id.clone(), slot);
        Ok(TaskResponse::AgentAdded { agent_id })
    }

    /// Drop the agents of external workers silent for [`WORKER_FORGET_MS`] that hold no lease,
    /// so workers that come and go under new names do not fill the table.
    pub(super) fn forget_gone_workers(&mut self, now_ms: u64) {
        let gone: BTreeSet<u64> = self
            .node_seen_ms
            .iter()
            .filter(|(holder, seen)| **holder >= WORKER_ID_MIN && seen.saturating_add(WORKER_FORGET_MS) <= now_ms)
            .map(|(holder, _)| *holder)
            .filter(|holder| {
                !self.slots.iter().any(|(id, slot)| slot.node_id == *holder && self.slot_holder.contains_key(id))
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        self.slots.retain(|_, slot| !gone.contains(&slot.node_id));
        self.node_seen_ms.retain(|holder, _| !gone.contains(holder));
    }

    /// Whether node `node_id` renewed or registered within `window_ms` of `now_ms`.
    pub fn node_alive(&self, node_id: u64, now_ms: u64, window_ms: u64) -> bool {
        self.node_seen_ms.get(&node_id).is_some_and(|seen| seen.saturating_add(window_ms) >= now_ms)
    }
}

/// End `task`'s lease, if any, and free its slot.
pub(super) fn release(
    slot_holder: &mut BTreeMap<String, TaskId>,
    lease_deadlines: &mut BTreeSet<(u64, TaskId)>,
    task: &mut Task,
) {
    if let Some(lease) = task.lease.take() {
        slot_holder.remove(&lease.slot);
        lease_deadlines.remove(&(lease.deadline_ms(), task.spec.id.clone()));
    }
}

/// Whether `slot` can run `spec` now: an active agent of the type the task needs next, with
/// every capability the task needs.
pub fn slot_fits(slot: &Slot, spec: &TaskSpec) -> bool {
    slot.state == AgentState::Active
        && slot.agent_type == spec.routing_type()
        && spec.capabilities.is_subset(&slot.capabilities)
}
