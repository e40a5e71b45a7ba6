//! The cluster service: status, formation, leadership transfer and membership changes (run on
//! the leader: here when this node leads, forwarded once otherwise).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
use maos_client::proto::v1::cluster_service_server::ClusterService;
use maos_client::proto::v1::*;
use maos_raft_store::{Command, MaosNode, NodeId, Response as Applied};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use crate::api::status::{invalid, status_from};
use crate::api::views::task_counts;
use crate::config::check_address;
use crate::raft::core::NodeCore;
use crate::raft::network::Channels;

/// Header marking a request already forwarded once, so forwarding never loops.
const FORWARDED_HEADER: &str = "x-maos-forwarded";

/// Header on the leader's request asking the transfer's target to stand for election now.
const ELECT_HEADER: &str = "x-maos-transfer-elect";

/// The cluster service.
pub struct ClusterApi {
    pub core: Arc<NodeCore>,
    /// The members a new cluster forms with (`cluster.peers`, or this node alone).
    pub formation_peers: BTreeMap<u64, MaosNode>,
    /// The term this node last led and when it saw itself elected (by [`track_leadership`]): a
    /// transfer waits until the leader's lease on its own vote, which runs from its election, is over.
    pub leader_since: std::sync::Mutex<Option<(u64, tokio::time::Instant)>>,
    /// Channels to other members' API ports (a forwarded membership call, a transfer's election
    /// call): plaintext, as port 8000 is without `security.tls`. Never the node's peer channels,
    /// which speak mutual TLS to Raft ports under `security.peer_tls`.
    pub api_channels: Channels,
}

/// Record when this node becomes leader, until `stopped`.
///
/// The instant is when the metrics showed the election, at or after openraft's own record of it,
/// so a lease computed from it ends no earlier than openraft's.
pub async fn track_leadership(api: Arc<ClusterApi>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut metrics = api.core.raft.metrics();
    loop {
        let led = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader).then_some(m.current_term)
        };
        if let Some(term) = led {
            let mut since = api.leader_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

fn member_list(core: &NodeCore) -> Vec<Member> {
    core.members()
        .into_iter()
        .map(|(id, (node, voter))| Member { id, raft_addr: node.raft_addr, api_addr: node.api_addr, voter })
        .collect()
}

impl ClusterApi {
    /// Run a membership change on the leader: here if this node leads, else forwarded once.
    async fn on_leader<T, Local, Fut, Remote, RFut>(
        &self,
        forwarded: bool,
        local: Local,
        remote: Remote,
    ) -> Result<T, Status>
    where
        Local: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
        Remote: FnOnce(ClusterServiceClient<tonic::transport::Channel>) -> RFut,
        RFut: std::future::Future<Output = Result<T, Status>>,
    {
        if self.core.is_leader() {
            return local().await;
        }
        if forwarded {
            return Err(Status::unavailable("leadership moved while forwarding; retry"));
        }
        let (leader, node) = self.core.leader().ok_or_else(|| Status::unavailable("no leader known; retry"))?;
        let channel = self
            .api_channels
            .get(&node.api_addr)
            .map_err(|e| Status::unavailable(format!("leader {leader} at {}: {e}", node.api_addr)))?;
        remote(ClusterServiceClient::new(channel)).await
    }
}

impl ClusterApi {
    /// When this leader's lease on its own vote ends: `election_timeout_max` after it was elected,
    /// or after now when the election was not seen (it is at most that far off).
    fn lease_ends(&self, core: &NodeCore) -> tokio::time::Instant {
        let lease = std::time::Duration::from_millis(core.raft.config().election_timeout_max);
        let term = core.raft.metrics().borrow().current_term;
        let since = *self.leader_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match since {
            Some((seen, at)) if seen == term => at + lease,
            _ => tokio::time::Instant::now() + lease,
        }
    }

    /// On the transfer's target: start an election and wait until it is decided.
    async fn stand_for_election(&self) -> Result<Response<TransferLeaderResponse>, Status> {
        let start_term = self.core.raft.metrics().borrow().current_term;
        if !self.core.is_leader() {
            self.core
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|e| Status::unavailable(format!("the election could not start: {e}")))?;
        }
        let deadline = tokio::time::Instant::now() + self.core.request_timeout;
        let mut metrics = self.core.raft.metrics();
        loop {
            let (leader, term) = {
                let m = metrics.borrow();
                (m.current_leader, m.current_term)
            };
            match leader {
                Some(leader) if leader == self.core.id => {
                    tracing::info!(node_id = self.core.id, term, "took over leadership by transfer");
                    return Ok(Response::new(TransferLeaderResponse { leader_id: leader, term }));
                }
                Some(other) if term > start_term || tokio::time::Instant::now() >= deadline => {
                    return Err(Status::failed_precondition(format!(
                        "node {other} won the election for term {term} (this node, {}, stood in term {}); try again",
                        self.core.id,
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
}

/// On the leader: hand leadership to `target` once it can win.
///
/// openraft 0.9 has no transfer of its own, and a member refuses to vote while it holds a lease
/// on the current leader (the leader's own lease runs `election_timeout_max` from its election,
/// a follower's from the last message it heard), and refuses a candidate whose log is shorter
/// than its own. A candidate that is refused has already raised its term, which deposes the
/// leader and costs several terms. So the target stands only when the leader will vote for it:
/// its lease has run out and the target holds every entry the leader has. With three voters
/// the leader's vote and the target's own are a majority.
async fn transfer_from_leader(
    core: &NodeCore,
    api_channels: &Channels,
    lease_ends: tokio::time::Instant,
    target: u64,
) -> Result<Response<TransferLeaderResponse>, Status> {
    let (term, leader) = {
        let m = core.raft.metrics();
        let m = m.borrow();
        (m.current_term, m.current_leader)
    };
    if target == core.id {
        return Ok(Response::new(TransferLeaderResponse { leader_id: core.id, term }));
    }
    let members = core.members();
    let Some((node, _)) = members.get(&target) else {
        return Err(Status::not_found(format!("node_id: {target} is not a member")));
    };
    let started = tokio::time::Instant::now();
    let deadline = started + core.request_timeout;
    // The leader's lease on its own vote: it runs from its election, which may be just now.
    tokio::time::sleep_until(lease_ends.min(deadline)).await;
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
    let channel = api_channels
        .get(&node.api_addr)
        .map_err(|e| Status::unavailable(format!("node {target} at {}: {e}", node.api_addr)))?;
    let mut request = mark_forwarded(TransferLeaderRequest { node_id: target });
    request.metadata_mut().insert(ELECT_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    let answer = ClusterServiceClient::new(channel).transfer_leader(request).await;
    match answer {
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            // Proposals are held, but one held past `TRANSFER_HOLD_MAX` may still lengthen the
            // log while the target stands.
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

fn forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}

fn mark_forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    request
}

fn membership_status(error: RaftError<u64, ClientWriteError<u64, MaosNode>>) -> Status {
    match &error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Status::unavailable(format!("{error}; retry")),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(_) => Status::unavailable(error.to_string()),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn initialize(&self, _: Request<InitializeRequest>) -> Result<Response<InitializeResponse>, Status> {
        let already_initialized = match crate::raft::formation::formation_check(&self.core, &self.formation_peers).await
        {
            crate::raft::formation::Formation::Formed { .. } => true,
            crate::raft::formation::Formation::NotReady { reason, .. } => {
                return Err(Status::failed_precondition(format!("the cluster cannot form yet: {reason}")));
            }
            crate::raft::formation::Formation::Ready => {
                self.core.raft.initialize(self.formation_peers.clone()).await.map_err(|error| {
                    Status::failed_precondition(format!("the cluster did not form: {error}; retry"))
                })?;
                tracing::info!(node_id = self.core.id, members = ?self.formation_peers.keys().collect::<Vec<_>>(), "initialised the cluster (maos cluster init)");
                false
            }
        };
        let members = if already_initialized {
            member_list(&self.core)
        } else {
            self.formation_peers
                .iter()
                .map(|(id, node)| Member {
                    id: *id,
                    raft_addr: node.raft_addr.clone(),
                    api_addr: node.api_addr.clone(),
                    voter: true,
                })
                .collect()
        };
        Ok(Response::new(InitializeResponse { already_initialized, members }))
    }

    async fn open_session(
        &self,
        request: Request<OpenSessionRequest>,
    ) -> Result<Response<OpenSessionResponse>, Status> {
        let ttl_ms = match request.into_inner().ttl_ms {
            0 => self.core.session_ttl.as_millis() as u64,
            ttl_ms => ttl_ms,
        };
        // The state machine checks the bounds and names the field.
        match self.core.write(Command::OpenSession { ttl_ms }).await.map_err(status_from)? {
            Applied::SessionOpened { client } => Ok(Response::new(OpenSessionResponse { session_id: client, ttl_ms })),
            other => Err(crate::api::status::unexpected(other)),
        }
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let with_state_hash = request.into_inner().with_state_hash;
        let metrics = self.core.raft.metrics().borrow().clone();
        let role = crate::raft::core::role_name(metrics.state);
        let leader_api_addr = self.core.leader().map(|(_, node)| node.api_addr).unwrap_or_default();
        let (state_hash, cluster_id, last_applied_index, tasks) = {
            let state = self.core.state.read();
            let counts = task_counts(&state.app.tasks);
            (
                if with_state_hash { state.state_hash() } else { String::new() },
                state.app.cluster.as_ref().map(|c| c.cluster_id.clone()).unwrap_or_default(),
                state.last_applied.map(|id| id.index).unwrap_or(0),
                counts,
            )
        };
        Ok(Response::new(StatusResponse {
            node_id: self.core.id,
            role: role.into(),
            current_term: metrics.current_term,
            leader_id: metrics.current_leader,
            leader_api_addr,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            last_applied_index,
            state_hash,
            cluster_id,
            cluster_name: self.core.cluster_name.clone(),
            members: member_list(&self.core),
            tasks: Some(tasks),
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let forwarded = forwarded(&request);
        let elect = request.metadata().contains_key(ELECT_HEADER);
        let target = request.into_inner().node_id;
        let members = self.core.members();
        match members.get(&target) {
            None => return Err(Status::not_found(format!("node_id: {target} is not a member"))),
            Some((_, false)) => {
                return Err(Status::failed_precondition(format!(
                    "node_id: {target} is a learner; only a voter can lead (make it a voter with add-node first)"
                )))
            }
            Some(_) => {}
        }
        if elect {
            // The leader prepared the transfer and asks this node (the target) to stand.
            return self.stand_for_election().await;
        }
        // The leader prepares every transfer: only it knows how far the target has caught up.
        let core = self.core.clone();
        self.on_leader(
            forwarded,
            || async move { transfer_from_leader(&core, &self.api_channels, self.lease_ends(&core), target).await },
            |mut client| async move {
                client.transfer_leader(mark_forwarded(TransferLeaderRequest { node_id: target })).await
            },
        )
        .await
    }
    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<AddNodeResponse>, Status> {
        let forwarded = forwarded(&request);
        let add = request.into_inner();
        if add.id == 0 {
            return Err(invalid("id: must be at least 1"));
        }
        check_address(&add.raft_addr).map_err(|e| invalid(format!("raft_addr: {e}")))?;
        check_address(&add.api_addr).map_err(|e| invalid(format!("api_addr: {e}")))?;
        if let Some((existing, _)) = self.core.members().get(&add.id) {
            if existing.raft_addr != add.raft_addr {
                return Err(Status::already_exists(format!(
                    "id: node {} is already a member at {}; remove it first or choose another id",
                    add.id, existing.raft_addr
                )));
            }
        }
        let core = self.core.clone();
        let remote_add = add.clone();
        self.on_leader(
            forwarded,
            || async move {
                still_leading(&core)?;
                let node = MaosNode { raft_addr: add.raft_addr.clone(), api_addr: add.api_addr.clone() };
                // openraft's own blocking wait counts a learner within `replication_lag_threshold`
                // entries of the leader as caught up, even one that never answered (a short log,
                // an unreachable node, a handshake refused); so wait here until the learner has
                // acknowledged the entry that added it. A learner that timed out stays a learner.
                let added = core.raft.add_learner(add.id, node, false).await.map_err(membership_status)?;
                let membership_index = added.log_id.index;
                let id = add.id;
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
                            "node {} was added as a learner but did not catch up within {} ms; check that it runs and is reachable at {}, then run add-node again, or remove-node {}",
                            add.id,
                            core.request_timeout.as_millis(),
                            add.raft_addr,
                            add.id
                        ))
                    })?;
                if !add.learner_only {
                    let voters = BTreeSet::from([add.id]);
                    still_leading(&core)?;
                    core.raft
                        .change_membership(ChangeMembers::AddVoterIds(voters), false)
                        .await
                        .map_err(membership_status)?;
                }
                Ok(Response::new(AddNodeResponse { members: member_list(&core) }))
            },
            |mut client| async move { client.add_node(mark_forwarded(remote_add)).await },
        )
        .await
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeResponse>, Status> {
        let forwarded = forwarded(&request);
        let id = request.into_inner().id;
        let members = self.core.members();
        let Some((_, voter)) = members.get(&id) else {
            return Err(Status::not_found(format!("id: node {id} is not a member")));
        };
        let voter = *voter;
        let core = self.core.clone();
        self.on_leader(
            forwarded,
            || async move {
                let ids = BTreeSet::from([id]);
                let change = if voter { ChangeMembers::RemoveVoters(ids) } else { ChangeMembers::RemoveNodes(ids) };
                still_leading(&core)?;
                core.raft.change_membership(change, false).await.map_err(membership_status)?;
                Ok(Response::new(RemoveNodeResponse { members: member_list(&core) }))
            },
            |mut client| async move { client.remove_node(mark_forwarded(RemoveNodeRequest { id })).await },
        )
        .await
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

/// While this node leads with a clock skewed beyond `raft.clock_skew_max_ms` (see
/// [`crate::raft::clock`]), hand leadership to a voter whose clock agrees with the quorum's.
/// Checked every probe interval; a failed transfer is tried again after [`HAND_OFF_RETRY`].
pub async fn hand_off_when_skewed(api: Arc<ClusterApi>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    use crate::raft::clock::{ClockStatus, PROBE_INTERVAL};
    let core = &api.core;
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
            outcome = transfer_from_leader(core, &api.api_channels, api.lease_ends(core), target) => outcome,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        if let Err(status) = outcome {
            tracing::warn!(node_id = core.id, target, error = %status.message(), "handing leadership on failed; trying again");
            tokio::time::sleep(HAND_OFF_RETRY).await;
        }
    }
}

/// Between two attempts of a skewed leader to hand leadership on.
const HAND_OFF_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
