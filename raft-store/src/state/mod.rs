//! The replicated state and its deterministic apply.
//!
//! [`StateMachineData`] is a pure value: `apply` takes an entry and returns the new state and a
//! [`Response`], with no clock, randomness or I/O. Ordered maps only, so iteration (and therefore
//! serialisation and the state hash) is identical on every replica.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{EntryPayload, LogId, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::command::{
    Command, Rejection, Request, Response, Responses, ADDRESS_BYTES_MAX, BATCH_COMMANDS_MAX, CLUSTER_NAME_BYTES_MAX,
    KEYS_MAX, KEY_BYTES_MAX, REQUEST_FORMAT_VERSION, SESSION_OWNER_BYTES_MAX, SESSION_TTL_MS_MAX, SESSION_TTL_MS_MIN,
    VALUE_BYTES_MAX,
};

mod sessions;

use crate::auth::AuthState;
use crate::tasks::{
    check_plan, check_spec, TaskCommand, TaskRejection, TaskTable, EVICT_BATCH_MAX, SLOTS_PER_NODE_MAX,
};
use crate::{Entry, MaosNode, NodeId};
pub use sessions::ClientSession;

/// The identity recorded by the node that initialised the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub cluster_id: String,
    pub cluster_name: String,
}

/// A node's advertised addresses, as last registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub raft_addr: String,
    pub api_addr: String,
    /// Leader-stamped time of the registration.
    pub registered_at_ms: u64,
}

/// A coordination key's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvValue {
    pub value: String,
    /// The cluster-wide write counter at this write: unique per write, increasing.
    pub revision: u64,
    /// Leader-stamped time of that write.
    pub updated_at_ms: u64,
    /// When the key stops existing (shared state with a TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

impl KvValue {
    /// Whether the key still exists at `now_ms`.
    pub fn live_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|at| at > now_ms)
    }
}

/// The application part of the state: what the state hash covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppState {
    pub cluster: Option<ClusterIdentity>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub kv: BTreeMap<String, KvValue>,
    /// Cluster-wide key-value write counter: every successful write takes the next value.
    pub kv_revision: u64,
    /// Keys with a TTL by expiry time; `Tick` removes the expired ones.
    #[serde(default)]
    pub kv_expiries: BTreeSet<(u64, String)>,
    /// Tasks, leases and their indexes.
    pub tasks: TaskTable,
    /// Highest leader stamp applied so far. Stamps from a new leader whose clock is behind are
    /// raised to this, so replicated time never goes backwards.
    pub clock_ms: u64,
    /// Open client sessions by id (`sessions.rs`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sessions: BTreeMap<u64, ClientSession>,
    /// Sessions by expiry time.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub session_expiries: BTreeSet<(u64, u64)>,
    /// API keys and the auth secret.
    #[serde(default, skip_serializing_if = "AuthState::is_empty")]
    pub auth: AuthState,
}

/// Everything the state machine holds, including Raft's own bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMachineData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, MaosNode>,
    pub app: AppState,
}

/// A log entry written by a newer build than this one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log entry {index} has request format {found}, newer than this build understands ({REQUEST_FORMAT_VERSION}); upgrade this node")]
pub struct UnsupportedFormat {
    pub index: u64,
    pub found: u16,
}

/// A broken invariant: a bug, never an operating error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state machine invariant broken: {0}")]
pub struct InvariantViolation(pub String);

impl StateMachineData {
    /// Apply one committed entry. Deterministic: the same entries give the same state everywhere.
    ///
    /// An entry in a format newer than this build understands is an error, not a refusal: an
    /// older replica must stop rather than apply differently from newer ones. Nothing changes.
    pub fn apply(&mut self, entry: &Entry) -> Result<Responses, UnsupportedFormat> {
        if let EntryPayload::Normal(request) = &entry.payload {
            if request.format_version > REQUEST_FORMAT_VERSION {
                return Err(UnsupportedFormat { index: entry.log_id.index, found: request.format_version });
            }
        }
        self.last_applied = Some(entry.log_id);
        Ok(match &entry.payload {
            EntryPayload::Blank => Vec::new(),
            EntryPayload::Membership(membership) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                Vec::new()
            }
            EntryPayload::Normal(request) => self.apply_request(entry.log_id.index, request),
        })
    }

    fn apply_request(&mut self, index: u64, request: &Request) -> Responses {
        let now_ms = request.stamped_at_ms.max(self.app.clock_ms);
        self.app.clock_ms = now_ms;
        if request.commands.len() > BATCH_COMMANDS_MAX {
            let rejection = Rejection::BatchTooLarge { count: request.commands.len(), limit: BATCH_COMMANDS_MAX };
            return vec![Response::Rejected(rejection); request.commands.len()];
        }
        request
            .commands
            .iter()
            .enumerate()
            .map(|(position, command)| {
                match apply_command(&mut self.app, now_ms, fencing_token(index, position), command) {
                    Ok(response) => response,
                    Err(rejection) => Response::Rejected(rejection),
                }
            })
            .collect()
    }

    /// Check the invariants that must hold after every apply.
    pub fn validate(&self) -> Result<(), InvariantViolation> {
        let applied = self.last_applied.map(|id| id.index);
        if let Some(membership_log_id) = self.last_membership.log_id() {
            if Some(membership_log_id.index) > applied {
                return Err(InvariantViolation(format!(
                    "membership log id {membership_log_id} is ahead of last applied {applied:?}"
                )));
            }
        }
        for (key, value) in &self.app.kv {
            if key.is_empty() || key.len() > KEY_BYTES_MAX {
                return Err(InvariantViolation(format!("key {key:?} breaks the key size bounds")));
            }
            if value.value.len() > VALUE_BYTES_MAX {
                return Err(InvariantViolation(format!("value of {key:?} is over the size bound")));
            }
            if value.revision == 0 || value.revision > self.app.kv_revision || value.updated_at_ms > self.app.clock_ms {
                return Err(InvariantViolation(format!(
                    "key {key:?} has revision {} / time {} beyond the counter {} / clock {}",
                    value.revision, value.updated_at_ms, self.app.kv_revision, self.app.clock_ms
                )));
            }
        }
        let with_ttl = self.app.kv.iter().filter_map(|(key, value)| value.expires_at_ms.map(|at| (at, key)));
        if !with_ttl.clone().all(|(at, key)| self.app.kv_expiries.contains(&(at, key.clone())))
            || with_ttl.count() != self.app.kv_expiries.len()
        {
            return Err(InvariantViolation("the expiry index disagrees with the keys' TTLs".into()));
        }
        if self.app.kv.len() > KEYS_MAX {
            return Err(InvariantViolation(format!("{} keys exceed the bound {KEYS_MAX}", self.app.kv.len())));
        }
        self.app.tasks.validate().map_err(InvariantViolation)?;
        sessions::validate(&self.app).map_err(InvariantViolation)?;
        self.app.auth.validate().map_err(InvariantViolation)?;
        for (node_id, record) in &self.app.nodes {
            if *node_id == 0 || record.raft_addr.is_empty() || record.api_addr.is_empty() {
                return Err(InvariantViolation(format!("node record {node_id} is incomplete")));
            }
        }
        Ok(())
    }

    /// A digest of the application state. Replicas that applied the same entries have the same hash.
    pub fn state_hash(&self) -> String {
        // Serialising ordered maps of plain data to JSON cannot fail.
        let bytes = serde_json::to_vec(&self.app).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }
}

fn check_len(field: &str, value: &str, limit: usize) -> Result<(), Rejection> {
    if value.len() > limit {
        return Err(Rejection::TooLarge { field: field.to_string(), actual: value.len(), limit });
    }
    Ok(())
}

fn check_non_empty(field: &str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::InvalidField { field: field.to_string(), message: "must not be empty".into() });
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), Rejection> {
    check_non_empty("key", key)?;
    check_len("key", key, KEY_BYTES_MAX)
}

fn check_room(app: &AppState, key: &str) -> Result<(), Rejection> {
    if app.kv.len() >= KEYS_MAX && !app.kv.contains_key(key) {
        return Err(Rejection::KeySpaceFull { limit: KEYS_MAX });
    }
    Ok(())
}

/// Validate a command against the state without changing it. Used by apply and, before proposing,
/// by the node, so most bad input is refused before it costs a log entry.
/// A session's owner: a principal id of at most [`SESSION_OWNER_BYTES_MAX`] bytes.
fn check_owner(owner: &str) -> Result<(), Rejection> {
    if owner.len() > SESSION_OWNER_BYTES_MAX {
        return Err(Rejection::InvalidField {
            field: "owner".into(),
            message: format!("a session owner is at most {SESSION_OWNER_BYTES_MAX} bytes"),
        });
    }
    Ok(())
}

pub fn check_command(command: &Command) -> Result<(), Rejection> {
    match command {
        Command::InitCluster { cluster_id, cluster_name } => {
            check_non_empty("cluster_id", cluster_id)?;
            check_len("cluster_id", cluster_id, CLUSTER_NAME_BYTES_MAX)?;
            check_non_empty("cluster_name", cluster_name)?;
            check_len("cluster_name", cluster_name, CLUSTER_NAME_BYTES_MAX)
        }
        Command::RegisterNode { node_id, raft_addr, api_addr } => {
            if *node_id == 0 {
                return Err(Rejection::InvalidField { field: "node_id".into(), message: "must be at least 1".into() });
            }
            check_non_empty("raft_addr", raft_addr)?;
            check_len("raft_addr", raft_addr, ADDRESS_BYTES_MAX)?;
            check_non_empty("api_addr", api_addr)?;
            check_len("api_addr", api_addr, ADDRESS_BYTES_MAX)
        }
        Command::KvPut { key, value, ttl_ms } | Command::KvCompareAndSet { key, value, ttl_ms, .. } => {
            check_key(key)?;
            check_len("value", value, VALUE_BYTES_MAX)?;
            if ttl_ms.is_some_and(|ttl| ttl == 0 || ttl > TTL_MS_MAX) {
                return Err(Rejection::InvalidField {
                    field: "ttl_ms".into(),
                    message: format!("must be in 1..={TTL_MS_MAX} (30 days)"),
                });
            }
            Ok(())
        }
        Command::KvDelete { key } => check_key(key),
        Command::Task(TaskCommand::Submit { spec }) => Ok(check_spec(spec)?),
        Command::Task(TaskCommand::Expand { subtasks, .. }) => {
            // The state-free rules (the width limit is checked at apply, against the limits).
            check_plan(subtasks, usize::MAX)?;
            Ok(())
        }
        Command::Task(TaskCommand::Renew { leases, .. }) if leases.len() > SLOTS_PER_NODE_MAX => {
            Err(Rejection::InvalidField {
                field: "leases".into(),
                message: format!("{} leases in one renewal, over the limit of {SLOTS_PER_NODE_MAX}", leases.len()),
            })
        }
        Command::Task(TaskCommand::Evict { tasks }) if tasks.len() > EVICT_BATCH_MAX => Err(Rejection::InvalidField {
            field: "tasks".into(),
            message: format!("{} tasks in one eviction, over the limit of {EVICT_BATCH_MAX}", tasks.len()),
        }),
        Command::Task(_) => Ok(()),
        Command::Auth(command) => Ok(crate::auth::check(command)?),
        Command::OpenSession { ttl_ms, owner } => {
            check_owner(owner)?;
            if !(SESSION_TTL_MS_MIN..=SESSION_TTL_MS_MAX).contains(ttl_ms) {
                return Err(Rejection::InvalidField {
                    field: "ttl_ms".into(),
                    message: format!(
                        "a session's time to live must be in {SESSION_TTL_MS_MIN}..={SESSION_TTL_MS_MAX} ms"
                    ),
                });
            }
            Ok(())
        }
        Command::Session { sequence, acknowledged, owner, command, .. } => {
            check_owner(owner)?;
            if *sequence == 0 || acknowledged >= sequence {
                return Err(Rejection::InvalidField {
                    field: "sequence".into(),
                    message: "sequences start at 1 and exceed the acknowledged one".into(),
                });
            }
            match command.as_ref() {
                Command::Session { .. } | Command::OpenSession { .. } => Err(Rejection::InvalidField {
                    field: "command".into(),
                    message: "a session command does not carry another session command".into(),
                }),
                _ => check_command(command),
            }
        }
        Command::Fenced { task_id, command, .. } => {
            check_non_empty("task_id", task_id)?;
            match command.as_ref() {
                Command::KvPut { .. } | Command::KvCompareAndSet { .. } | Command::KvDelete { .. } => {
                    check_command(command)
                }
                _ => Err(Rejection::InvalidField {
                    field: "command".into(),
                    message: "only key-value writes are made on behalf of a lease".into(),
                }),
            }
        }
    }
}

/// The fencing token granted by the command at `position` in the entry at log `index`: unique,
/// and larger for every later command in the log (a batch holds fewer than 2,048 commands).
pub fn fencing_token(index: u64, position: usize) -> u64 {
    index.saturating_mul(2048).saturating_add(position as u64)
}

/// Upper bound on a key's time to live.
pub const TTL_MS_MAX: u64 = 30 * 24 * 3_600_000;

fn write_kv(app: &mut AppState, key: &str, value: &str, ttl_ms: Option<u64>, now_ms: u64) -> u64 {
    app.kv_revision += 1;
    let revision = app.kv_revision;
    let expires_at_ms = ttl_ms.map(|ttl| now_ms.saturating_add(ttl));
    let replaced = app
        .kv
        .insert(key.to_string(), KvValue { value: value.to_string(), revision, updated_at_ms: now_ms, expires_at_ms });
    if let Some(at) = replaced.and_then(|old| old.expires_at_ms) {
        app.kv_expiries.remove(&(at, key.to_string()));
    }
    if let Some(at) = expires_at_ms {
        app.kv_expiries.insert((at, key.to_string()));
    }
    revision
}

fn remove_kv(app: &mut AppState, key: &str) -> bool {
    match app.kv.remove(key) {
        Some(old) => {
            if let Some(at) = old.expires_at_ms {
                app.kv_expiries.remove(&(at, key.to_string()));
            }
            true
        }
        None => false,
    }
}

impl AppState {
    /// Whether a key's TTL has run out at `now_ms`, so a `Tick` would remove it.
    pub fn kv_expiry_due(&self, now_ms: u64) -> bool {
        self.kv_expiries.first().is_some_and(|(at, _)| *at <= now_ms)
    }

    /// A key's value if it exists and has not expired at `now_ms`.
    pub fn kv_get(&self, key: &str, now_ms: u64) -> Option<&KvValue> {
        self.kv.get(key).filter(|v| v.live_at(now_ms))
    }

    fn purge_expired_kv(&mut self, now_ms: u64) {
        while let Some((at, key)) = self.kv_expiries.first().cloned() {
            if at > now_ms {
                break;
            }
            self.kv_expiries.pop_first();
            self.kv.remove(&key);
        }
    }
}

fn apply_command(app: &mut AppState, now_ms: u64, token: u64, command: &Command) -> Result<Response, Rejection> {
    check_command(command)?;
    match command {
        Command::InitCluster { cluster_id, cluster_name } => {
            match &app.cluster {
                Some(existing) if existing.cluster_id != *cluster_id => {
                    return Err(Rejection::ClusterIdentityConflict {
                        existing_id: existing.cluster_id.clone(),
                        proposed_id: cluster_id.clone(),
                    })
                }
                Some(_) => {}
                None => {
                    app.cluster =
                        Some(ClusterIdentity { cluster_id: cluster_id.clone(), cluster_name: cluster_name.clone() })
                }
            }
            Ok(Response::Applied)
        }
        Command::RegisterNode { node_id, raft_addr, api_addr } => {
            app.nodes.insert(
                *node_id,
                NodeRecord { raft_addr: raft_addr.clone(), api_addr: api_addr.clone(), registered_at_ms: now_ms },
            );
            Ok(Response::Applied)
        }
        Command::KvPut { key, value, ttl_ms } => {
            check_room(app, key)?;
            Ok(Response::KvWritten { revision: write_kv(app, key, value, *ttl_ms, now_ms) })
        }
        Command::KvCompareAndSet { key, expected, value, ttl_ms } => {
            let current = app.kv_get(key, now_ms).map(|v| v.value.clone());
            if current != *expected {
                return Ok(Response::KvCompareFailed { current });
            }
            check_room(app, key)?;
            Ok(Response::KvWritten { revision: write_kv(app, key, value, *ttl_ms, now_ms) })
        }
        Command::KvDelete { key } => {
            let existed = app.kv_get(key, now_ms).is_some();
            remove_kv(app, key);
            Ok(Response::KvDeleted { existed })
        }
        Command::Fenced { task_id, token: presented, command } => {
            let current = app.tasks.tasks.get(task_id).and_then(|t| t.lease.as_ref()).map(|l| l.token);
            if current != Some(*presented) {
                return Err(Rejection::Task(TaskRejection::StaleToken {
                    task_id: task_id.clone(),
                    presented: *presented,
                    current,
                }));
            }
            apply_command(app, now_ms, token, command)
        }
        Command::Auth(command) => {
            app.auth.apply(now_ms, command)?;
            Ok(Response::Applied)
        }
        Command::OpenSession { ttl_ms, owner } => sessions::open(app, now_ms, token, *ttl_ms, owner),
        Command::Session { client, sequence, acknowledged, owner, command } => {
            sessions::apply(app, now_ms, token, (*client, *sequence, *acknowledged), owner, command)
        }
        Command::Task(command) => {
            if matches!(command, TaskCommand::Tick) {
                app.purge_expired_kv(now_ms);
                app.auth.purge_expired(now_ms);
            }
            Ok(Response::Task(app.tasks.apply(now_ms, token, command)?))
        }
    }
}

#[cfg(test)]
mod tests;
