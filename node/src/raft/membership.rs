//! Membership changes and leadership transfer. They run on the leader: a member asked on its API
//! port forwards the call once to the leader's Raft port (`Member`), and the leader preparing a
//! transfer asks the target to stand over the same RPC. Member-to-member calls so go where only
//! members are answered (mutual TLS, the cluster secret), never to an API port, whose
//! credentials and TLS are the clients' (an API port with auth on refused them, one with TLS
//! could not be reached over plaintext).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::{MaosNode, NodeId};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::raft::core::NodeCore;
use crate::raft::network::{decode, encode};

/// A call for the leader (or, `StandForElection`, from the leader to a transfer's target).
/// Callers check their input first (the API names the field), so these are well formed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberCall {
    AddNode {
        id: NodeId,
        raft_addr: String,
        api_addr: String,
        learner_only: bool,
    },
    RemoveNode {
        id: NodeId,
    },
    TransferLeader {
        target: NodeId,
    },
    /// From the leader, which prepared the transfer: stand for election now.
    StandForElection,
}

/// A member as the leader knows it after the change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberEntry {
    pub id: NodeId,
    pub node: MaosNode,
    pub voter: bool,
}

/// The answer to a [`MemberCall`]; a refusal travels as the gRPC status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberReply {
    /// After `AddNode` or `RemoveNode`: the members.
    Members(Vec<MemberEntry>),
    /// After `TransferLeader` or `StandForElection`: who leads, in which term.
    Leader { leader_id: NodeId, term: u64 },
}

/// Runs membership calls for one node.
pub struct Membership {
    pub core: Arc<NodeCore>,
    /// The term this node last led and when it saw itself elected (by [`Membership::track_leadership`]):
    /// a transfer waits until the leader's lease on its own vote, which runs from its election, is over.
    leader_since: std::sync::Mutex<Option<(u64, tokio::time::Instant)>>,
}

/// Between two attempts of a skewed leader to hand leadership on.
const HAND_OFF_RETRY: Duration = Duration::from_secs(2);

impl Membership {
    pub fn new(core: Arc<NodeCore>) -> Self {
        Self { core, leader_since: Default::default() }
    }

    /// The members as this node knows them.
    pub fn members(&self) -> Vec<MemberEntry> {
        members(&self.core)
    }

    /// Run `call`, asked on this node's API port: here when this node leads, else forwarded once
    /// to the leader's Raft port.
    pub async fn run(&self, call: MemberCall) -> Result<MemberReply, Status> {
        if self.core.is_leader() {
            return self.on_leader(call).await;
        }
        let (leader, node) = self.core.leader().ok_or_else(|| Status::unavailable("no leader known; retry"))?;
        // An add-node waits for the learner and then for two membership entries; a transfer for
        // the leader's lease, the target's catching up and its election.
        self.call(leader, &node.raft_addr, &call, self.core.request_timeout * 3).await
    }

    /// Serve `call` from another member (the Raft port's `Member`): never forwarded again.
    pub async fn serve(&self, call: MemberCall) -> Result<MemberReply, Status> {
        match call {
            MemberCall::StandForElection => self.stand_for_election().await,
            call if self.core.is_leader() => self.on_leader(call).await,
            _ => Err(Status::unavailable("leadership moved while forwarding; retry")),
        }
    }

    async fn on_leader(&self, call: MemberCall) -> Result<MemberReply, Status> {
        match call {
            MemberCall::AddNode { id, raft_addr, api_addr, learner_only } => {
                self.add_node(id, MaosNode { raft_addr, api_addr }, learner_only).await
            }
            MemberCall::RemoveNode { id } => self.remove_node(id).await,
            MemberCall::TransferLeader { target } => self.transfer(target).await,
            MemberCall::StandForElection => self.stand_for_election().await,
        }
    }

    /// `call` on the member `id` at `raft_addr`, within `timeout`.
    async fn call(
        &self,
        id: NodeId,
        raft_addr: &str,
        call: &MemberCall,
        timeout: Duration,
    ) -> Result<MemberReply, Status> {
        let unreachable =
            |e: &dyn std::fmt::Display| Status::unavailable(format!("node {id} at {raft_addr}: {e}; retry"));
        let mut client = self.core.channels.raft_client(raft_addr).map_err(|e| unreachable(&e))?;
        let payload = encode(call).map_err(|e| Status::internal(format!("cannot encode the call: {e}")))?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(timeout);
        let reply = match tokio::time::timeout(timeout, client.member(request)).await {
            Err(elapsed) => return Err(Status::deadline_exceeded(format!("node {id} at {raft_addr}: {elapsed}"))),
            Ok(reply) => reply?,
        };
        decode(reply.get_ref()).map_err(|e| Status::internal(format!("node {id} answered a bad payload: {e}")))
    }

    async fn add_node(&self, id: NodeId, node: MaosNode, learner_only: bool) -> Result<MemberReply, Status> {
        let core = &self.core;
        still_leading(core)?;
        let raft_addr = node.raft_addr.clone();
        // openraft's own blocking wait counts a learner within `replication_lag_threshold`
        // entries of the leader as caught up, even one that never answered (a short log, an
        // unreachable node, a handshake refused); so wait here until the learner has
        // acknowledged the entry that added it. A learner that timed out stays a learner.
        let added = core.raft.add_learner(id, node, false).await.map_err(membership_status)?;
        let membership_index = added.log_id.index;
        let acknowledged = move |metrics: &openraft::RaftMetrics<NodeId, MaosNode>| {
            let matched = metrics.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten());
            matched.is_some_and(|log_id| log_id.index >= membership_index)
        };
        core.raft
            .wait(Some(core.request_timeout))
            .metrics(acknowledged, "the new learner acknowledges the entry that added it")
            .await
            .map_err(|_| {
                // The node's state, not the call, is at fault: it does not run, cannot be
                // reached, or was refused in the handshake.
                Status::failed_precondition(format!(
                    "node {id} was added as a learner but did not catch up within {} ms; check that it runs and is reachable at {raft_addr}, then run add-node again, or remove-node {id}",
                    core.request_timeout.as_millis(),
                ))
            })?;
        if !learner_only {
            still_leading(core)?;
            core.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(membership_status)?;
        }
        Ok(MemberReply::Members(members(core)))
    }

    async fn remove_node(&self, id: NodeId) -> Result<MemberReply, Status> {
        let core = &self.core;
        let Some((_, voter)) = core.members().get(&id).cloned() else {
            return Err(Status::not_found(format!("id: node {id} is not a member")));
        };
        let ids = BTreeSet::from([id]);
        let change = if voter { ChangeMembers::RemoveVoters(ids) } else { ChangeMembers::RemoveNodes(ids) };
        still_leading(core)?;
        core.raft.change_membership(change, false).await.map_err(membership_status)?;
        Ok(MemberReply::Members(members(core)))
    }

    /// When this leader's lease on its own vote ends: `election_timeout_max` after it was elected,
    /// or after now when the election was not seen (it is at most that far off).
    fn lease_ends(&self) -> tokio::time::Instant {
        let lease = Duration::from_millis(self.core.raft.config().election_timeout_max);
        let term = self.core.raft.metrics().borrow().current_term;
        let since = *self.leader_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match since {
            Some((seen, at)) if seen == term => at + lease,
            _ => tokio::time::Instant::now() + lease,
        }
    }

    /// On the leader: hand leadership to `target` once it can win.
    ///
    /// openraft 0.9 has no transfer of its own, and a member refuses to vote while it holds a
    /// lease on the current leader (the leader's own lease runs `election_timeout_max` from its
    /// election, a follower's from the last message it heard), and refuses a candidate whose log
    /// is shorter than its own. A candidate that is refused has already raised its term, which
    /// deposes the leader and costs several terms. So the target stands only when the leader will
    /// vote for it: its lease has run out and the target holds every entry the leader has. With
    /// three voters the leader's vote and the target's own are a majority.
    async fn transfer(&self, target: NodeId) -> Result<MemberReply, Status> {
        let core = &self.core;
        let (term, leader) = {
            let m = core.raft.metrics();
            let m = m.borrow();
            (m.current_term, m.current_leader)
        };
        if target == core.id {
            return Ok(MemberReply::Leader { leader_id: core.id, term });
        }
        let node = match core.members().get(&target) {
            None => return Err(Status::not_found(format!("node_id: {target} is not a member"))),
            Some((_, false)) => return Err(learner(target)),
            Some((node, true)) => node.clone(),
        };
        let deadline = tokio::time::Instant::now() + core.request_timeout;
        // The leader's lease on its own vote: it runs from its election, which may be just now.
        tokio::time::sleep_until(self.lease_ends().min(deadline)).await;
        // From here until the target has won or failed, this node appends nothing new, so the
        // target can hold its whole log when it stands.
        let _held = core.proposal_hold.hold().await;
        let mut metrics = core.raft.metrics();
        let caught_up_at = loop {
            let (last, matched, still_leader) = {
                let m = metrics.borrow();
                let matched = m.replication.as_ref().and_then(|r| r.get(&target).cloned());
                (m.last_log_index.unwrap_or(0), matched, m.current_leader == Some(core.id))
            };
            if !still_leader {
                return Err(Status::unavailable(format!(
                    "this node lost the leadership of term {term} while preparing the transfer; retry"
                )));
            }
            let matched_index = matched.flatten().map(|id| id.index);
            if matched_index.is_some_and(|index| index >= last) {
                break last;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(match matched_index {
                    None => Status::unavailable(format!(
                        "node {target} at {} has acknowledged no entry from leader {}; check that it runs and is reachable",
                        node.raft_addr,
                        leader.unwrap_or(core.id)
                    )),
                    Some(index) => Status::failed_precondition(format!(
                        "node {target} is behind by {} entries (it holds up to {index}, the leader {last}) after {} ms; retry when it has caught up",
                        last.saturating_sub(index),
                        core.request_timeout.as_millis()
                    )),
                });
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline, metrics.changed()).await {
                return Err(Status::unavailable("the node is stopping"));
            }
        };
        tracing::info!(node_id = core.id, term, target, caught_up_at, "transferring leadership");
        let answer = self.call(target, &node.raft_addr, &MemberCall::StandForElection, core.request_timeout * 2).await;
        match answer {
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                // Proposals are held, but one held past `TRANSFER_HOLD_MAX` may still lengthen
                // the log while the target stands.
                let last = core.raft.metrics().borrow().last_log_index.unwrap_or(0);
                if last <= caught_up_at {
                    return Err(status);
                }
                Err(Status::failed_precondition(format!(
                    "{}: node {target} held every entry up to {caught_up_at} when it stood, but writes kept arriving (node {}'s log reached {last}), so node {} could not vote for it; transfer when writes pause",
                    status.message(),
                    core.id,
                    core.id
                )))
            }
            answer => answer,
        }
    }

    /// On the transfer's target: start an election and wait until it is decided.
    async fn stand_for_election(&self) -> Result<MemberReply, Status> {
        let core = &self.core;
        if !core.voters().contains_key(&core.id) {
            return Err(learner(core.id));
        }
        let start_term = core.raft.metrics().borrow().current_term;
        if !core.is_leader() {
            core.raft
                .trigger()
                .elect()
                .await
                .map_err(|e| Status::unavailable(format!("the election could not start: {e}")))?;
        }
        let deadline = tokio::time::Instant::now() + core.request_timeout;
        let mut metrics = core.raft.metrics();
        loop {
            let (leader, term) = {
                let m = metrics.borrow();
                (m.current_leader, m.current_term)
            };
            match leader {
                Some(leader) if leader == core.id => {
                    tracing::info!(node_id = core.id, term, "took over leadership by transfer");
                    return Ok(MemberReply::Leader { leader_id: leader, term });
                }
                Some(other) if term > start_term || tokio::time::Instant::now() >= deadline => {
                    return Err(Status::failed_precondition(format!(
                        "node {other} won the election for term {term} (this node, {}, stood in term {}); try again",
                        core.id,
                        start_term + 1
                    )))
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::deadline_exceeded("no leader emerged in time; try again"))
                }
                _ => {}
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline, metrics.changed()).await {
                return Err(Status::unavailable("the node is stopping"));
            }
        }
    }

    /// Record when this node becomes leader, until `stopped`.
    ///
    /// The instant is when the metrics showed the election, at or after openraft's own record of
    /// it, so a lease computed from it ends no earlier than openraft's.
    pub async fn track_leadership(self: Arc<Self>, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let mut metrics = self.core.raft.metrics();
        loop {
            let led = {
                let m = metrics.borrow_and_update();
                (m.state == ServerState::Leader).then_some(m.current_term)
            };
            if let Some(term) = led {
                let mut since = self.leader_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if since.map(|(seen, _)| seen) != Some(term) {
                    *since = Some((term, tokio::time::Instant::now()));
                }
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = stopped.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// While this node leads with a clock skewed beyond `raft.clock_skew_max_ms` (see
    /// [`crate::raft::clock`]), hand leadership to a voter whose clock agrees with the quorum's.
    /// Checked every probe interval; a failed transfer is tried again after [`HAND_OFF_RETRY`].
    pub async fn hand_off_when_skewed(self: Arc<Self>, mut stopped: tokio::sync::watch::Receiver<bool>) {
        use crate::raft::clock::{ClockStatus, PROBE_INTERVAL};
        let core = &self.core;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = stopped.wait_for(|stop| *stop) => return,
            }
            let ClockStatus::Skewed { skew_ms } = core.clock_bound.status() else { continue };
            if !core.is_leader() {
                continue;
            }
            let voters: BTreeSet<u64> = core.voters().into_keys().collect();
            let Some(target) = core.clock_bound.agreeing_peer(core.id, &voters) else {
                tracing::warn!(node_id = core.id, skew_ms, "the leader's clock is skewed and no voter's clock agrees with the quorum's to hand leadership to; expiring nothing meanwhile");
                continue;
            };
            tracing::warn!(
                node_id = core.id,
                skew_ms,
                target,
                "the leader's clock is skewed: handing leadership to a node whose clock agrees"
            );
            let outcome = tokio::select! {
                outcome = self.transfer(target) => outcome,
                _ = stopped.wait_for(|stop| *stop) => return,
            };
            if let Err(status) = outcome {
                tracing::warn!(node_id = core.id, target, error = %status.message(), "handing leadership on failed; trying again");
                tokio::time::sleep(HAND_OFF_RETRY).await;
            }
        }
    }
}

fn members(core: &NodeCore) -> Vec<MemberEntry> {
    core.members().into_iter().map(|(id, (node, voter))| MemberEntry { id, node, voter }).collect()
}

fn learner(id: NodeId) -> Status {
    Status::failed_precondition(format!(
        "node_id: {id} is a learner; only a voter can lead (make it a voter with add-node first)"
    ))
}

fn membership_status(error: RaftError<u64, ClientWriteError<u64, MaosNode>>) -> Status {
    match &error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Status::unavailable(format!("{error}; retry")),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(_) => Status::unavailable(error.to_string()),
    }
}

/// A membership change starts only on a node that leads right now. openraft 0.9 asserts that only
/// a leader appends a membership entry, and a change that reaches a leader while it steps down
/// (after a transfer, or a removal of itself) trips that assertion in its core; such a change is
/// refused here as retryable instead (UNAVAILABLE, REST 503). It narrows the window, it does not
/// close it: the step-down can still land between this check and the change.
fn still_leading(core: &NodeCore) -> Result<(), Status> {
    if core.is_leader() {
        Ok(())
    } else {
        Err(Status::unavailable("membership: this node is no longer the leader (leadership is moving); retry"))
    }
}
