//! `maos-raft-store`: the replicated heart of MAOS.
//!
//! This crate holds the openraft type configuration ([`TypeConfig`]), the replicated commands
//! ([`command`]), the deterministic state machine ([`state`]), and two storage engines behind
//! openraft's storage traits: RocksDB ([`rocks`]) for real nodes and memory ([`mem`]) for
//! simulations. Both pass `openraft::testing`.
//!
//! Layout:
//! - [`auth`]: API keys (hashed) and the cluster's auth secret.
//! - [`command`]: versioned log payloads, results and typed refusals.
//! - [`state`]: `StateMachineData::apply`, `validate`, `state_hash`: pure, no clock, no I/O.
//! - [`tasks`]: tasks, leases with fencing tokens, retries, dependencies, cancellation, slots.
//!   `tasks/mod.rs` dispatches each command to the file of its concern: `types.rs` (records,
//!   limits, commands, responses, refusals, the table), `check.rs` (state-free spec and plan
//!   checks), `lifecycle.rs` (submit to completion, retries, the tick), `plan.rs` (expansion and
//!   the parent's settlement), `slots.rs` (agents, holders, liveness), `validate.rs` (invariants).
//! - [`scheduler`]: the leader's assignment decisions, a pure function of the table and a time.
//! - [`sm_store`]: the openraft state-machine store around that data, with snapshots.
//! - [`rocks`], [`mem`]: log storage and snapshot persistence engines.
//! - [`runtime`]: openraft's async runtime on tokio with a seedable random source,
//!   so simulations replay election timeouts exactly.
//!
//! Must not depend on: tonic, sqlx, redis, axum, or any clock. Time arrives in the command.

// openraft's traits fix the error type to its `StorageError` (about 224 bytes); helpers return it too.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod command;
pub mod mem;
pub mod rocks;
pub mod runtime;
pub mod scheduler;
pub mod sm_store;
pub mod state;
pub mod tasks;

use serde::{Deserialize, Serialize};

pub use command::{Command, Rejection, Request, Response, Responses};
pub use sm_store::{
    SnapshotPersistence, StateMachineHandle, StateMachineStore, StateRead, StoredSnapshot, Validation,
    VALIDATION_SERVED,
};
pub use state::{InvariantViolation, StateMachineData};

/// A node's id in the Raft group. `0` is never a valid id.
pub type NodeId = u64;

/// What the group knows about each member: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MaosNode {
    /// Address other nodes use for Raft traffic (port 7000 by default).
    pub raft_addr: String,
    /// Address clients and forwarding nodes use for the API (port 8000 by default).
    pub api_addr: String,
}

impl std::fmt::Display for MaosNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// The openraft type configuration shared by every MAOS node.
    pub TypeConfig:
        D = Request,
        R = Responses,
        NodeId = NodeId,
        Node = MaosNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = runtime::MaosRuntime,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MaosNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, MaosNode>;

/// Wrap an I/O failure in openraft's storage error for `subject` and `verb`.
pub(crate) fn io_error(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    error: impl std::error::Error + 'static,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&error)).into()
}
