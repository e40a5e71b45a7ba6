//! Warnings about a peer that cannot be reached, rate-limited.
//!
//! A peer that is down makes every Raft call to it fail: heartbeats every few hundred
//! milliseconds, votes, retries. Logging each would bury everything else (one leader kill gave
//! the survivors thousands of lines). Instead the first failure of a peer is one WARN, then at
//! most one WARN per peer per [`PEER_WARNING_INTERVAL`] with the count of failures suppressed
//! since; when the peer answers again, one INFO says so. A peer being down is a WARN, not an
//! ERROR: the cluster works around it, and whether a person must act is the alerts' call
//! (`MaosNodeDown`). Every failure is also counted in `maos_raft_peer_unreachable_total`.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one warning per peer in this time.
pub const PEER_WARNING_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Down {
    since: Instant,
    warned_at: Instant,
    failures: u64,
    suppressed: u64,
}

/// This node's view of which peers failed, for rate-limiting its warnings.
#[derive(Debug, Default)]
pub struct PeerWarnings {
    down: Mutex<BTreeMap<u64, Down>>,
}

impl PeerWarnings {
    /// A call `rpc` to `peer` at `addr` failed to connect or timed out.
    pub fn failed(&self, peer: u64, addr: &str, rpc: &str, error: &dyn Display) {
        metrics::counter!("maos_raft_peer_unreachable_total", "peer" => peer.to_string()).increment(1);
        let now = Instant::now();
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match down.get_mut(&peer) {
            None => {
                down.insert(peer, Down { since: now, warned_at: now, failures: 1, suppressed: 0 });
                tracing::warn!(peer, addr, rpc, %error, "peer unreachable; further failures are summarised every {} s", PEER_WARNING_INTERVAL.as_secs());
            }
            Some(state) => {
                state.failures += 1;
                if now.duration_since(state.warned_at) >= PEER_WARNING_INTERVAL {
                    let down_for_s = now.duration_since(state.since).as_secs();
                    tracing::warn!(peer, addr, rpc, %error, suppressed = state.suppressed, down_for_s, "peer still unreachable");
                    state.warned_at = now;
                    state.suppressed = 0;
                } else {
                    state.suppressed += 1;
                }
            }
        }
    }

    /// A call to `peer` succeeded: if it had failed, say once that it is back.
    pub fn answered(&self, peer: u64) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = down.remove(&peer) {
            let down_for_s = state.since.elapsed().as_secs();
            tracing::info!(peer, failures = state.failures, down_for_s, "peer reachable again");
        }
    }

    /// Whether `peer` is currently known down (for tests).
    pub fn is_down(&self, peer: u64) -> bool {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&peer)
    }
}

/// openraft's own events about a failed call to a peer, which [`PeerWarnings`] replaces: its
/// replication task warns and errors on every failed AppendEntries, and its core errors on every
/// failed or timed-out vote or leadership confirmation. Storage errors, which it also reports
/// from these modules, have other fields and stay.
pub fn is_openraft_peer_noise(metadata: &tracing::Metadata<'_>) -> bool {
    let target = metadata.target();
    let fields = metadata.fields();
    let has = |name: &str| fields.field(name).is_some();
    if target.starts_with("openraft::replication") {
        // `warn!(error=%err, "error replication to target={}")` for every failure (a storage
        // error is logged again at ERROR with the same field, and kept), and
        // `error!(err = display(&err), "RPCError")`.
        // And `warn!(interval, "backoff mode: drain events without processing them")` at every
        // retry while a peer is unreachable (each heartbeat, `raft/network.rs`).
        return (*metadata.level() == tracing::Level::WARN && (has("error") || has("interval"))) || has("err");
    }
    if target.starts_with("openraft::engine::handler::replication_handler") {
        // `warn!(request_id, result, "update progress error")` and `warn!("heartbeat error: …")`
        // after every failed replication call; its ERROR (`update_matching`) stays.
        return *metadata.level() == tracing::Level::WARN;
    }
    if target.starts_with("openraft::core") {
        // `error!(target = .., error = .., "timeout" | "while requesting vote" |
        // "timeout while confirming leadership for read request")`.
        return *metadata.level() == tracing::Level::ERROR && has("target") && has("error");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_down_until_it_answers() {
        let warnings = PeerWarnings::default();
        for _ in 0..1_000 {
            warnings.failed(2, "127.0.0.1:7002", "append_entries", &"connection refused");
        }
        assert!(warnings.is_down(2));
        {
            let down = warnings.down.lock().unwrap_or_else(|p| p.into_inner());
            assert_eq!(down[&2].failures, 1_000);
            assert_eq!(down[&2].suppressed, 999, "one warning, the rest suppressed within the interval");
        }
        warnings.answered(2);
        assert!(!warnings.is_down(2));
    }
}
