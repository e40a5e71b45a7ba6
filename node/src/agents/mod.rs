//! The agent runtime: this node's pool of agents, supervised.
//!
//! The pool comes from `agents.types` (plus agents spawned at run time, which live in the
//! replicated state): one agent per slot, registered through Raft so the scheduler sees it. The
//! runtime watches the applied state; for each lease granted to one of its agents it builds the
//! [`Envelope`], starts the agent's backend (process and model agents within
//! `system.agent_spawn_rate`), forwards progress and checkpoints with the lease's
//! fencing token, and reports the outcome: `Complete`, `Fail`, or for a planning attempt
//! `Expand`. It renews all its leases in one command per interval, which is also the node's
//! liveness signal. When a lease is lost (expired, cancelled, re-leased, agent terminated) the
//! attempt is dropped, which kills a command agent's whole process group.
//!
//! An agent whose backend fails to start three times in a row is marked FAILED (no more work)
//! until an operator resumes it.

mod attempt;
pub(crate) mod builtin;
pub mod claude;
pub mod command;
pub(crate) mod credential;
pub mod envelope;
pub mod keeper;
mod runtime;

pub use attempt::{envelope_for, load_envelope};
pub use runtime::AgentRuntime;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::tasks::{AgentState, Slot, TaskTable};
use tokio::sync::mpsc;

use crate::config::{parse_bytes, BackendKind, Config};
use claude::{ApiKey, ClaudeBackend};
use command::CommandBackend;
use envelope::{AgentEvent, Envelope, Outcome};

/// How an agent type runs.
pub enum Backend {
    Builtin,
    Command(CommandBackend),
    Claude(ClaudeBackend),
}

impl Backend {
    /// Run one attempt. Dropping the future stops the agent.
    pub async fn run(&self, envelope: &Envelope, events: mpsc::Sender<AgentEvent>) -> Outcome {
        match self {
            Backend::Builtin => builtin::run(envelope).await,
            Backend::Command(backend) => backend.run(envelope, events).await,
            Backend::Claude(backend) => backend.run(envelope).await,
        }
    }

    fn is_builtin(&self) -> bool {
        matches!(self, Backend::Builtin)
    }
}

/// Counters of this node's agents (exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Attempts started (`maos_agent_spawns_total`).
    pub spawns_total: AtomicU64,
    /// Attempts whose agent could not be started (`maos_agent_spawn_failures_total`).
    pub spawn_failures_total: AtomicU64,
    /// Attempts running now.
    pub running: AtomicU64,
    /// Attempts this node stopped because no renewal proved their lease live
    /// (`maos_agent_self_fenced_total`).
    pub self_fenced_total: AtomicU64,
    /// Whether the replicated state holds this node's agent pool as configured (part of `/ready`).
    pub pool_registered: AtomicBool,
    /// The `maos_agent_slots` series published so far, so a type that is gone reads 0.
    published_slots: std::sync::Mutex<std::collections::BTreeSet<(String, &'static str)>>,
}

/// This node's agents as `/metrics` shows them.
#[derive(Debug, PartialEq, Eq)]
pub struct AgentCounts {
    /// Agents running an attempt (`maos_agents_active`).
    pub active: usize,
    /// Agents not terminated (`maos_agents`).
    pub agents: usize,
    /// Slots by (type, busy or idle) (`maos_agent_slots`).
    pub slots: BTreeMap<(String, &'static str), usize>,
}

impl AgentMetrics {
    /// The agents of node `node_id` in `table`.
    pub fn counts(table: &TaskTable, node_id: u64) -> AgentCounts {
        let mine = || table.slots.iter().filter(move |(_, slot)| slot.node_id == node_id);
        let agents = mine().filter(|(_, s)| s.state != AgentState::Terminated).count();
        let active = mine().filter(|(id, _)| table.slot_holder.contains_key(*id)).count();
        let mut slots: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
        for (id, slot) in mine().filter(|(_, s)| s.state != AgentState::Terminated) {
            let state = if table.slot_holder.contains_key(id) { "busy" } else { "idle" };
            *slots.entry((slot.agent_type.clone(), state)).or_default() += 1;
        }
        AgentCounts { active, agents, slots }
    }

    /// Record `counts` and the counters in the process's metrics registry.
    pub fn publish(&self, counts: AgentCounts) {
        metrics::gauge!("maos_agents_active").set(counts.active as f64);
        metrics::gauge!("maos_agents").set(counts.agents as f64);
        metrics::counter!("maos_agent_spawns_total").absolute(self.spawns_total.load(Ordering::Relaxed));
        metrics::counter!("maos_agent_spawn_failures_total")
            .absolute(self.spawn_failures_total.load(Ordering::Relaxed));
        metrics::counter!("maos_agent_self_fenced_total").absolute(self.self_fenced_total.load(Ordering::Relaxed));
        let mut published = self.published_slots.lock().unwrap_or_else(|p| p.into_inner());
        for key in published.iter() {
            if !counts.slots.contains_key(key) {
                metrics::gauge!("maos_agent_slots", "type" => key.0.clone(), "state" => key.1).set(0.0);
            }
        }
        for ((agent_type, state), count) in counts.slots {
            metrics::gauge!("maos_agent_slots", "type" => agent_type.clone(), "state" => state).set(count as f64);
            published.insert((agent_type, state));
        }
    }
}

/// Why the runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{key}: {message}")]
    Config { key: String, message: String },
}

/// The backends of this node's agent types, built from configuration; `command` agents are
/// also watched by `keeper` when there is one.
pub fn backends(
    config: &Config,
    keeper: Option<Arc<keeper::Keeper>>,
) -> Result<BTreeMap<String, Arc<Backend>>, RuntimeError> {
    let defaults = &config.agents.defaults;
    let claude = &config.agents.claude;
    // The key and HTTP client are shared by every claude type; made once, only if one exists.
    let claude_shared = match config.agents.types.iter().find(|(_, t)| t.backend == BackendKind::Claude) {
        Some((name, _)) => {
            let key = ApiKey::from_environment(claude.api_key_file.as_deref())
                .map_err(|message| RuntimeError::Config { key: format!("agents.types.{name}.backend"), message })?;
            let http = ClaudeBackend::http_client(Duration::from_secs(claude.request_timeout))
                .map_err(|message| RuntimeError::Config { key: "agents.claude".into(), message })?;
            Some((key, http))
        }
        None => None,
    };
    let known_types: Vec<String> = config.agents.types.keys().cloned().collect();
    let mut built = BTreeMap::new();
    for (name, agent) in &config.agents.types {
        let memory = agent.max_memory.as_deref().unwrap_or(&defaults.max_memory);
        let max_memory_bytes = parse_bytes(memory)
            .map_err(|message| RuntimeError::Config { key: format!("agents.types.{name}.max_memory"), message })?;
        let timeout = Duration::from_secs(agent.timeout.unwrap_or(defaults.timeout));
        let backend = match agent.backend {
            BackendKind::Builtin => Backend::Builtin,
            BackendKind::Command => Backend::Command(CommandBackend {
                program: agent.command.clone(),
                env: agent.env.clone(),
                max_memory_bytes,
                timeout,
                keeper: keeper.clone(),
            }),
            BackendKind::Claude => {
                let Some((key, http)) = &claude_shared else { unreachable!("made above when a claude type exists") };
                Backend::Claude(ClaudeBackend {
                    http: http.clone(),
                    base_url: claude.base_url.clone(),
                    key: key.clone(),
                    model: claude.model.clone(),
                    max_tokens: claude.max_tokens,
                    system_prompt: agent.system_prompt.clone(),
                    max_retries: claude.max_retries,
                    known_types: known_types.clone(),
                })
            }
        };
        built.insert(name.clone(), Arc::new(backend));
    }
    Ok(built)
}

/// This node's configured agents: `n<node>/<type>/<i>`.
pub fn configured_slots(config: &Config) -> BTreeMap<String, Slot> {
    let node_id = config.node.id;
    config
        .agents
        .types
        .iter()
        .flat_map(|(agent_type, agent)| {
            (0..agent.slots).map(move |i| {
                let slot = Slot {
                    node_id,
                    agent_type: agent_type.clone(),
                    capabilities: agent.capabilities.iter().cloned().collect(),
                    backend: agent.backend.name().into(),
                    state: AgentState::Active,
                };
                (format!("n{node_id}/{agent_type}/{i}"), slot)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_metrics_count_this_nodes_agents_by_type_and_use() {
        let mut table = TaskTable::default();
        let slot = |node_id, agent_type: &str, state| Slot {
            node_id,
            agent_type: agent_type.into(),
            state,
            ..Slot::default()
        };
        table.slots.insert("n1/coder/0".into(), slot(1, "coder", AgentState::Active));
        table.slots.insert("n1/coder/1".into(), slot(1, "coder", AgentState::Active));
        table.slots.insert("n1/coder/2".into(), slot(1, "coder", AgentState::Terminated));
        table.slots.insert("n2/coder/0".into(), slot(2, "coder", AgentState::Active));
        table.slot_holder.insert("n1/coder/0".into(), "task".into());
        let counts = AgentMetrics::counts(&table, 1);
        let slots = BTreeMap::from([(("coder".to_string(), "busy"), 1), (("coder".to_string(), "idle"), 1)]);
        assert_eq!(counts, AgentCounts { active: 1, agents: 2, slots });
    }
}
