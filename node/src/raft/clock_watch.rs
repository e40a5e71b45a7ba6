//! Sampling the voters' clocks for [`crate::raft::clock::ClockBound`]: every node calls each
//! voter's `Clock` twice a second, timed by its monotonic clock, and assesses its own clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::proto::ClockRequest;
use crate::raft::clock::{ClockStatus, PROBE_INTERVAL};
use crate::raft::core::NodeCore;
use crate::raft::proposer::Clock;

/// A peer's answer later than this is no sample (its round trip would make it too wide anyway).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// The voters this node measures against: the membership's, or while there is none yet the
/// formation peers (`cluster.peers`), so the first leader is measured before it stamps.
fn targets(core: &NodeCore, formation: &BTreeMap<u64, String>) -> BTreeMap<u64, String> {
    let members: BTreeMap<u64, String> = core.voters().into_iter().map(|(id, node)| (id, node.raft_addr)).collect();
    if members.is_empty() {
        formation.clone()
    } else {
        members
    }
}

/// Read every voter's clock each [`PROBE_INTERVAL`] and assess this node's, until `stopped`.
pub(crate) async fn measure(
    core: Arc<NodeCore>,
    wall_clock: Clock,
    formation: BTreeMap<u64, String>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut last = ClockStatus::Unknown;
    loop {
        let voters = targets(&core, &formation);
        let probes = voters.iter().filter(|(id, _)| **id != core.id).map(|(id, addr)| {
            let (core, wall_clock) = (core.clone(), wall_clock.clone());
            async move {
                let mut client = core.channels.raft_client(addr).ok()?;
                let sent = tokio::time::Instant::now();
                let sent_wall_ms = wall_clock();
                let answer = match tokio::time::timeout(PROBE_TIMEOUT, client.clock(ClockRequest {})).await {
                    Ok(Ok(answer)) => answer,
                    failed => {
                        tracing::debug!(node_id = core.id, peer = id, ?failed, "reading a peer's clock failed");
                        return None;
                    }
                };
                let answer = answer.into_inner();
                let received = tokio::time::Instant::now();
                // A peer at another address than the membership says is no sample of it.
                (answer.node_id == *id).then_some((*id, sent_wall_ms, answer.wall_clock_ms, received - sent, received))
            }
        });
        for (peer, sent_wall_ms, read_ms, round_trip, received) in
            futures::future::join_all(probes).await.into_iter().flatten()
        {
            core.clock_bound.record(peer, sent_wall_ms, read_ms, round_trip, received);
        }
        let ids: BTreeSet<u64> = voters.keys().copied().collect();
        let status = core.clock_bound.assess(core.id, &ids, tokio::time::Instant::now());
        report(&core, last, status);
        last = status;
        // Until the first measurement, rounds come five times as often: a new cluster's first
        // stamps wait for it (`ClockBound::first_measured`).
        let pause = if core.clock_bound.measured() { PROBE_INTERVAL } else { PROBE_INTERVAL / 5 };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

fn report(core: &NodeCore, last: ClockStatus, status: ClockStatus) {
    let max = core.clock_bound.skew_max_ms();
    if std::mem::discriminant(&last) != std::mem::discriminant(&status) {
        tracing::debug!(node_id = core.id, ?last, ?status, "clock status changed");
    }
    match (last, status) {
        (ClockStatus::Skewed { .. }, ClockStatus::Skewed { .. }) => {}
        (_, ClockStatus::Skewed { skew_ms }) => tracing::warn!(
            node_id = core.id,
            skew_ms,
            max_ms = max,
            "this node's clock is {} ms {} a quorum's, beyond raft.clock_skew_max_ms: as leader it stamps the quorum's time, expires nothing and hands leadership on; fix its time synchronisation (NTP)",
            skew_ms.unsigned_abs(),
            if skew_ms > 0 { "ahead of" } else { "behind" }
        ),
        (ClockStatus::Skewed { .. }, ClockStatus::Synchronized { skew_ms }) => {
            tracing::info!(node_id = core.id, skew_ms, "this node's clock agrees with a quorum's again")
        }
        _ => {}
    }
}
