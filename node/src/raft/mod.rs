//! The replicated core of a node: Raft traffic on port 7000 and the paths every API shares.
//!
//! - `network.rs`, `service.rs`: Raft RPCs as versioned payloads (client and server sides), plus
//!   `Propose` (batched forwarded writes), `ReadIndex`, `Hello` and `Clock`.
//! - `proposer.rs`: one bounded [`proposer::Batcher`] for the leader's log entries and a
//!   follower's forwarded writes; the leader's [`proposer::Clock`] and [`proposer::ProposeOutcome`].
//! - `core.rs`: [`core::NodeCore`], the write path (leader stamps and proposes; followers
//!   forward) and the read barrier (ReadIndex).
//! - `clock.rs`, `clock_watch.rs`: the bounded leader clock: every node reads its peers' clocks
//!   (`Clock`, in `clock_watch.rs`), and Marzullo's interval over a quorum gives cluster time and
//!   whether this node may expire (`clock.rs`, no I/O).
//! - `formation.rs`: `Hello`, the formation check and initialising a new cluster.
//! - `housekeeping.rs`: the cluster identity and this node's registration.
//! - `membership.rs`: membership changes and leadership transfer, run on the leader; members
//!   forward them, and a transfer's leader asks its target to stand, over the Raft port (`Member`).
//! - `leader_watch.rs`: a follower stands for election as soon as a lost leader's lease has run
//!   out when the leader's Raft port refuses connections (its process is gone).
//!
//! Imports only `config`, `transport` and the generated `proto` from this crate: nothing here
//! knows about task data, agents or the client API.

// `core` is public for `server::RunningNode::core`; the rest is this crate's own.
pub mod clock;
pub(crate) mod clock_watch;
pub mod core;
pub(crate) mod formation;
pub(crate) mod housekeeping;
pub(crate) mod leader_watch;
pub(crate) mod membership;
pub(crate) mod network;
pub(crate) mod proposer;
pub(crate) mod service;

pub use formation::{probe_raft_port, RaftPortProbe};
