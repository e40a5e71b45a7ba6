//! The cluster service: status, formation, sessions, and membership changes and leadership
//! transfer (checked here, run by [`Membership`] on the leader).

use std::collections::BTreeMap;
use std::sync::Arc;

use maos_client::proto::v1::cluster_service_server::ClusterService;
use maos_client::proto::v1::*;
use maos_raft_store::{Command, MaosNode, Response as Applied};
use tonic::{Request, Response, Status};

use crate::api::status::{invalid, status_from};
use crate::api::views::task_counts;
use crate::config::check_address;
use crate::raft::core::NodeCore;
use crate::raft::membership::{MemberCall, MemberEntry, MemberReply, Membership};

/// The cluster service.
pub struct ClusterApi {
    pub core: Arc<NodeCore>,
    /// The members a new cluster forms with (`cluster.peers`, or this node alone).
    pub formation_peers: BTreeMap<u64, MaosNode>,
    pub membership: Arc<Membership>,
}

fn member_list(entries: Vec<MemberEntry>) -> Vec<Member> {
    entries
        .into_iter()
        .map(|e| Member { id: e.id, raft_addr: e.node.raft_addr, api_addr: e.node.api_addr, voter: e.voter })
        .collect()
}

impl ClusterApi {
    /// Run a membership call on the leader and return the members after it.
    async fn change(&self, call: MemberCall) -> Result<Vec<Member>, Status> {
        match self.membership.run(call).await? {
            MemberReply::Members(entries) => Ok(member_list(entries)),
            MemberReply::Leader { .. } => {
                Err(Status::internal("the leader answered a membership change with a leader"))
            }
        }
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
            member_list(self.membership.members())
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
        // Bound to the caller: a session id is a log position, which others may learn.
        let owner = crate::api::principal::principal_in(request.extensions()).id;
        let ttl_ms = match request.into_inner().ttl_ms {
            0 => self.core.session_ttl.as_millis() as u64,
            ttl_ms => ttl_ms,
        };
        // The state machine checks the bounds and names the field.
        match self.core.write(Command::OpenSession { ttl_ms, owner }).await.map_err(status_from)? {
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
            members: member_list(self.membership.members()),
            tasks: Some(tasks),
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let target = request.into_inner().node_id;
        // The leader prepares every transfer (only it knows how far the target has caught up) and
        // checks that the target is a voter.
        match self.membership.run(MemberCall::TransferLeader { target }).await? {
            MemberReply::Leader { leader_id, term } => Ok(Response::new(TransferLeaderResponse { leader_id, term })),
            MemberReply::Members(_) => Err(Status::internal("the leader answered a transfer with a member list")),
        }
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<AddNodeResponse>, Status> {
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
        let call = MemberCall::AddNode {
            id: add.id,
            raft_addr: add.raft_addr,
            api_addr: add.api_addr,
            learner_only: add.learner_only,
        };
        Ok(Response::new(AddNodeResponse { members: self.change(call).await? }))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeResponse>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(RemoveNodeResponse { members: self.change(MemberCall::RemoveNode { id }).await? }))
    }
}
