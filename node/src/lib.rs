//! `maos-node`: the MAOS server and the `maos` command line.
//!
//! Layout:
//! - [`config`]: YAML + `MAOS_*` environment + flags, validated with every problem named.
//! - [`transport`]: TCP or simulated connections; the rest of the node only sees tonic channels.
//! - [`raft_network`], [`raft_service`]: Raft traffic on port 7000 (client and server sides).
//! - [`core`]: the shared write path (leader stamps time, followers forward) and ReadIndex reads.
//! - [`proposer`]: batches concurrent commands into one log entry on the leader.
//! - [`api`], [`task_api`], [`agent_api`]: the client API on port 8000 (key-value, cluster, task,
//!   agent and worker services).
//! - [`http`]: `/health`, `/ready` and `/metrics` on the API port, beside gRPC; [`rest`]: the
//!   REST mirror under `/api/v1` with its OpenAPI document.
//! - [`scheduling`]: the leader's scheduling loop.
//! - [`agents`]: the agent runtime: this node's pool, the builtin, command and claude backends,
//!   supervision, checkpoints, scoped credentials.
//! - [`cli`]: the command line's client commands (tasks, agents, health), their output and exit codes.
//! - [`node`]: starting a node, forming the cluster with no coordinator, housekeeping.
//! - [`data_dir`]: the data directory's identity and the checks made before touching it.
//! - [`storage`]: task data (inputs, results, checkpoints) in the replicated state or in
//!   PostgreSQL, with the optional Redis cache; the leader's task mirror and event history.
//! - [`serve`]: `maos serve` on RocksDB; [`local_cluster`]: real local clusters of processes
//!   for the demo, tests and benchmarks; [`local_services`]: real PostgreSQL and Redis servers for
//!   the same; [`demo`]: `maos demo`.
//!
//! Depends on `maos-raft-store` for the replicated state and `maos-client` for the API types.

pub mod agent_api;
pub mod agents;
pub mod api;
pub mod cli;
pub mod config;
pub mod core;
pub mod data_dir;
pub mod demo;
pub mod http;
pub mod local_cluster;
pub mod local_services;
pub mod node;
pub mod proposer;
pub mod raft_network;
pub mod raft_service;
pub mod rest;
pub mod scheduling;
pub mod serve;
pub mod storage;
pub mod task_api;
pub mod transport;

/// Code generated from `node/proto/maos/raft/v1/raft.proto` (internal node-to-node API).
pub mod proto {
    tonic::include_proto!("maos.raft.v1");
}
