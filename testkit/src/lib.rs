//! `maos-testkit`: harnesses that run real things on loopback, for tests, benchmarks and
//! `maos demo`.
//!
//! Layout:
//! - [`local_cluster`]: a cluster of real `maos serve` processes, free ports below the
//!   kernel's ephemeral range, a data directory and a log per node.
//! - [`local_services`]: real PostgreSQL and Redis servers in temporary directories.
//! - [`otlp`]: an OTLP/gRPC trace collector that counts (and can keep) the spans it receives.
//! - [`demo`]: the driver of `maos demo` (a planned workflow through a leader kill).
//!
//! Depends only on `maos-client`: it drives `maos` processes through the public API and knows
//! nothing of the server's internals. The server library never depends on it; only the `maos`
//! binary does, for `maos demo`.

pub mod demo;
pub mod local_cluster;
pub mod local_services;
pub mod otlp;
