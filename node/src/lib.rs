//! `maos-node`: the MAOS server. The `maos` binary (`main.rs`, `cli/`) is its command line.
//!
//! Layout, one layer per module, each importing only the layers listed before it:
//! - [`transport`]: TCP or simulated connections; the rest of the node only sees tonic channels.
//! - `proto`: code generated from `node/proto/maos/raft/v1/raft.proto` (node-to-node API).
//! - [`config`]: YAML + `MAOS_*` environment + flags, validated with every problem named.
//! - [`telemetry`]: the metrics catalogue and recorder, rate-limited peer warnings, log format.
//! - [`raft`]: Raft traffic on port 7000, the write path (leader stamps time, followers forward),
//!   ReadIndex reads, proposal batching, cluster formation and housekeeping.
//! - [`storage`]: task data (inputs, results, checkpoints) in the replicated state or in
//!   PostgreSQL, with the optional Redis cache; the leader's mirrors; its own error type.
//! - [`agents`]: the agent runtime: this node's pool, the builtin, command and claude backends,
//!   supervision, checkpoints, scoped credentials.
//! - `scheduling`: the leader's scheduling loop.
//! - [`api`]: the client API on port 8000: gRPC services, REST, `/health`, `/ready`, `/metrics`;
//!   every error becomes a wire status here and nowhere else.
//! - `dashboard`: the read-only HTML dashboard on port 3001 with live updates over SSE.
//! - [`server`]: the composition root: `start()` wires every layer; `serve()` runs it on RocksDB.
//!
//! `node/tests/layering.rs` keeps the order true: a module that imports a later one fails it.
//! Test and demo harnesses (local clusters, PostgreSQL and Redis servers) are in `maos-testkit`.
//!
//! Depends on `maos-raft-store` for the replicated state and `maos-client` for the API types.

pub mod agents;
mod api;
pub mod config;
mod dashboard;
pub mod raft;
mod scheduling;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod transport;

/// Code generated from `node/proto/maos/raft/v1/raft.proto` (internal node-to-node API).
mod proto {
    tonic::include_proto!("maos.raft.v1");
}
