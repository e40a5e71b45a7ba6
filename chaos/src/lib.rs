//! `maos-chaos`: deterministic turmoil simulations of whole MAOS clusters.
//!
//! The real node code ([`maos_node::server::start`]) runs on the in-memory Raft store over
//! turmoil's simulated TCP ([`SimTransport`]). One seed derives every parameter of a run: the
//! fault schedule, message latencies, election timeouts (through openraft's runtime random
//! source) and tokio's own scheduling choices (the workspace builds with `--cfg tokio_unstable`),
//! so a failing seed replays exactly.
//!
//! A run has a safety phase (writes under a leader crash and a partition) and a heal-and-liveness
//! phase (everything repaired, a final write must commit, all replicas must converge). Invariants
//! checked, each from the Raft paper (Ongaro and Ousterhout, 2014, figure 3):
//! - Election Safety: at most one leader per term ([`invariants::election_safety`]).
//! - State Machine Safety: replicas that applied the same index hold the same state, checked at
//!   every index a replica is seen at while the run goes on
//!   ([`invariants::state_machine_safety`]); after healing all hold the same state
//!   ([`invariants::converged`]).
//! - Leader Completeness, as a client sees it: every acknowledged write is in the final state
//!   ([`invariants::acknowledged_writes_present`]).
//! - Linearizability (Herlihy and Wing, 1990): the puts, compare-and-sets and reads of clients
//!   sharing keys through different nodes have a linearization ([`invariants::linearizable`],
//!   checked by [`linearizability`], a Wing–Gong search with Lowe's memoisation, as Porcupine).
//!
//! The in-memory log store acknowledges appends at once, so a simulated crash never loses an
//! unflushed entry; RocksDB's group-commit path is exercised by the multi-process tests instead.
//!
//! Uses only the public faces of `maos-node`, `maos-raft-store` and `maos-client`.
//!
//! [`fault_run`] is the same workload and the same checks over real `maos serve` processes on
//! hosts of their own ([`netns`]): `kill -9`, pauses and real partitions, not replayable, run for
//! as long as asked.

pub mod fault_run;
pub mod invariants;
pub mod linearizability;
pub mod netns;
pub mod scenario;
pub mod sweep;
pub mod transport;
pub mod workload;

pub use scenario::{run, Outcome, ScenarioPlan};
pub use sweep::{sweep, Sweep};
