//! Standing for election as soon as the leader's process is known to be gone.
//!
//! openraft's own timer starts an election `election_timeout_max` (the lease every voter holds
//! on the leader it last heard) plus a random `election_timeout` after the last message from the
//! leader: a dead leader costs up to twice `election_timeout_max`, and more when the first
//! candidate's log was behind and it was refused.
//!
//! Most leaders are lost with their process (kill, crash, OOM kill, a restart) while their host
//! still answers: a connection to the leader's Raft port is then refused at once. So a voter that
//! has not heard from the leader for two heartbeats tries the leader's Raft port; when it is
//! refused, it asks the other voters how long their logs are (`Hello`): the one with the longest
//! log (the lowest id among equals) stands as soon as the voters' lease on the old leader has run
//! out, the others a few heartbeats later in case it cannot, so they rarely split the vote or
//! stand with a log the rest must refuse; each stands again, after a random delay, while it hears
//! from no leader and no other voter has stood (a winner's first append can take a while to
//! arrive under load; standing against it would depose it).
//!
//! A node that has just started has heard from no leader yet, and a leader busy with a write load
//! may take longer than one election timeout to reach it again: the new node's vote would then
//! depose a working leader. So a node does not start elections of its own until it has heard
//! from a leader or [`START_GRACE_MIN`] (or twice `election_timeout_max`, if longer) has passed;
//! a cluster that starts or restarts as a whole elects that much later.
//!
//! A leader that is partitioned, frozen or whose host is down does not refuse: the attempt times
//! out and openraft's timer decides, as before. Standing early cannot break safety, which is
//! Raft's: voters still refuse while their lease holds and refuse a candidate whose log is
//! behind; the most it costs is a term.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::runtime::MaosRuntime;
use maos_raft_store::{MaosNode, NodeId};
use openraft::AsyncRuntime;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::raft::core::NodeCore;
use crate::raft::formation::hello_within;
use crate::transport::Transport;

/// Elections one watch starts for one lost leader at most; openraft's timer goes on after.
const ATTEMPTS_MAX: u32 = 8;

/// The least time a started node waits to hear from a leader before its own elections start.
const START_GRACE_MIN: Duration = Duration::from_secs(1);

/// A random delay in `[0, up_to)`, from the runtime's RNG (seeded in the simulation).
fn jitter(up_to: Duration) -> Duration {
    let millis = (up_to.as_millis() as u64).max(1);
    Duration::from_millis(<MaosRuntime as AsyncRuntime>::thread_rng().gen_range(0..millis))
}

/// Whether this voter should stand first for `lost`'s place: no other voter that answers within
/// `within` has a longer log (the id decides between equal logs). With the leader gone, the logs
/// no longer grow, so the one with the longest is the one the others will vote for.
async fn stands_first(core: &NodeCore, lost: NodeId, within: Duration) -> bool {
    let mine = (core.raft.metrics().borrow().last_log_index.unwrap_or(0), Reverse(core.id));
    let others: Vec<(NodeId, MaosNode)> =
        core.voters().into_iter().filter(|(id, _)| *id != core.id && *id != lost).collect();
    let answers = futures::future::join_all(others.iter().map(|(id, node)| async move {
        let hello = hello_within(&core.channels, &node.raft_addr, core.id, &core.cluster_name, within).await;
        hello.ok().map(|h| (h.last_log_index, Reverse(*id)))
    }))
    .await;
    answers.into_iter().flatten().all(|theirs| theirs < mine)
}

/// Hold this node's own elections until it hears from a leader or `grace` has passed (see the
/// module doc). A lone voter elects itself at once.
async fn start_grace(core: &NodeCore, grace: Duration, heartbeat: Duration, stopped: &mut watch::Receiver<bool>) {
    if core.voters().len() <= 1 {
        return;
    }
    core.raft.runtime_config().elect(false);
    let until = Instant::now() + grace;
    while Instant::now() < until && core.leader_contact.last().is_none() {
        tokio::select! {
            _ = tokio::time::sleep(heartbeat / 2) => {}
            _ = stopped.wait_for(|stop| *stop) => break,
        }
    }
    core.raft.runtime_config().elect(true);
}

/// Watch the leader from this node while it follows; see the module doc.
pub(crate) async fn run(core: Arc<NodeCore>, transport: Arc<dyn Transport>, mut stopped: watch::Receiver<bool>) {
    let config = core.raft.config().clone();
    let heartbeat = Duration::from_millis(config.heartbeat_interval);
    let lease = Duration::from_millis(config.election_timeout_max);
    start_grace(&core, (lease * 2).max(START_GRACE_MIN), heartbeat, &mut stopped).await;
    let mut ticks = tokio::time::interval(heartbeat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let Some(last) = core.leader_contact.last() else { continue };
        if last.elapsed() < heartbeat * 2 {
            continue;
        }
        let Some((leader, node)) = core.leader() else { continue };
        if leader == core.id || !core.voters().contains_key(&core.id) {
            continue;
        }
        if !transport.refused(&node.raft_addr, heartbeat).await {
            continue;
        }
        let term = core.raft.metrics().borrow().current_term;
        let first = stands_first(&core, leader, heartbeat).await;
        tracing::info!(
            leader,
            term,
            raft_addr = %node.raft_addr,
            first,
            "the leader's Raft port refuses connections; standing for election when its lease runs out"
        );
        // The voter with the longest log stands as soon as the lease allows; the others a few
        // heartbeats later, in case it cannot.
        let delay = if first { heartbeat / 2 + jitter(heartbeat / 2) } else { heartbeat * 3 + jitter(heartbeat) };
        let mut at = last + lease + delay;
        // The term this node expects to find before it stands: the lost leader's, then that of
        // its own last candidacy. Any other means some voter stood meanwhile (and may have won
        // before its first append reached this node): its election is left to run.
        let mut expected = term;
        for attempt in 1..=ATTEMPTS_MAX {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stopped.wait_for(|stop| *stop) => return,
            }
            let now_term = core.raft.metrics().borrow().current_term;
            if core.leader_contact.last() != Some(last) || core.is_leader() || now_term != expected {
                break;
            }
            tracing::info!(leader, attempt, "standing for election: the lost leader's lease has run out");
            if let Err(error) = core.raft.trigger().elect().await {
                tracing::warn!(%error, "could not start an election");
                break;
            }
            expected = term + u64::from(attempt);
            at = Instant::now() + heartbeat * 2 + jitter(heartbeat * 2);
        }
    }
}
