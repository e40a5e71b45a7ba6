//! Telemetry: the node's metrics (through the `metrics` facade, rendered by the Prometheus
//! exporter), logs and traces, and the small helpers other layers use to record them.
//!
//! - `metrics.rs`: the catalogue of every metric the node exports (name, type, labels, help,
//!   documented in `docs/METRICS.md`), the process's recorder, and `/metrics`' rendering.
//! - `peers.rs`: rate-limited warnings about a peer that cannot be reached.
//! - `logs.rs`: the log subscriber (`system.log_level`, `system.log_format`).
//! - `traces.rs`: OpenTelemetry spans over OTLP/gRPC (`tracing.*`), and the W3C trace context
//!   helpers the layers above use to follow a caller's or a task's trace.
//!
//! Must not import any other layer: every layer above records into it.

pub mod logs;
pub mod metrics;
pub mod peers;
pub mod traces;
