//! The process's log output: `system.log_level` and `system.log_format` (`text` or `json`).
//!
//! JSON is one object per line: `timestamp`, `level`, `target`, the event's fields flattened
//! (`message` among them), `span` (the innermost span's fields) and `spans` (every enclosing
//! span's), so `node_id`, `term`, `task_id` and `agent_id` ride along where they apply. openraft's
//! per-call peer failures are replaced by [`super::peers::PeerWarnings`]' rate-limited ones.

use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Layer, Registry};

use super::peers::is_openraft_peer_noise;

/// A layer over the process's registry (the trace exporter's, from [`super::traces`]).
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Install the process's subscriber: the log output, and `traces` when tracing is on. `RUST_LOG`,
/// when set, wins over `level`; it filters the logs only, so a quiet log level keeps the traces.
/// A second call (a subscriber already installed) changes nothing.
pub fn init(level: &str, format: &str, traces: Option<BoxedLayer>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},openraft=warn", level.to_lowercase())));
    let filter = filter.and(filter_fn(|m| !is_openraft_peer_noise(m)));
    let logs: BoxedLayer = if format.eq_ignore_ascii_case("json") {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_target(false).with_filter(filter).boxed()
    };
    let layers: Vec<BoxedLayer> = std::iter::once(logs).chain(traces).collect();
    if tracing_subscriber::registry().with(layers).try_init().is_err() {
        tracing::debug!("a log subscriber was already installed");
    }
}
