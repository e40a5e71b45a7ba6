//! The process's log output: `system.log_level` and `system.log_format` (`text` or `json`).
//!
//! JSON is one object per line: `timestamp`, `level`, `target`, the event's fields flattened
//! (`message` among them), `span` (the innermost span's fields) and `spans` (every enclosing
//! span's), so `node_id`, `term`, `task_id` and `agent_id` ride along where they apply. openraft's
//! per-call peer failures are replaced by [`super::peers::PeerWarnings`]' rate-limited ones.

use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::prelude::*;

use super::peers::is_openraft_peer_noise;

/// Install the process's subscriber. `RUST_LOG`, when set, wins over `level`. A second call
/// (a subscriber already installed) changes nothing.
pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},openraft=warn", level.to_lowercase())));
    let registry = tracing_subscriber::registry().with(filter).with(filter_fn(|m| !is_openraft_peer_noise(m)));
    let installed = if format.eq_ignore_ascii_case("json") {
        let layer =
            tracing_subscriber::fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(true);
        registry.with(layer).try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_target(false)).try_init()
    };
    if installed.is_err() {
        tracing::debug!("a log subscriber was already installed");
    }
}
