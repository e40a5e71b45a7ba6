//! The Raft port's server side: openraft RPCs, forwarded proposals, ReadIndex, Hello, Clock and
//! membership calls between members.

use std::sync::Arc;

use maos_raft_store::command::BATCH_COMMANDS_MAX;
use maos_raft_store::Command;
use tonic::{Request, Response, Status};

use crate::proto::raft_service_server::RaftService;
use crate::proto::{
    ClockRequest, ClockResponse, HelloMember, HelloRequest, HelloResponse, RaftPayload, ReadIndexRequest,
    ReadIndexResponse,
};
use crate::raft::core::NodeCore;
use crate::raft::membership::{MemberCall, Membership};
use crate::raft::network::{decode, encode};
use crate::raft::proposer::ProposeOutcome;

/// Serves the Raft port for one node.
pub struct RaftServer {
    pub core: Arc<NodeCore>,
    pub membership: Arc<Membership>,
}

/// The answer to a forwarded command only a leader may propose itself.
fn refused_forward(name: &str) -> ProposeOutcome {
    tracing::warn!(command = name, "refused a forwarded command that only the leader proposes itself");
    ProposeOutcome::Applied(maos_raft_store::Response::Rejected(Command::not_forwardable(name)))
}

fn bad_payload(error: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("payload: {error}"))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value).map(Response::new).map_err(|e| Status::internal(format!("cannot encode reply: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request.get_ref()).map_err(bad_payload)?;
        let response = self.core.raft.append_entries(rpc).await;
        if matches!(response, Ok(ref r) if !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_))) {
            self.core.leader_contact.heard();
        }
        reply(&response)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.core.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.core.raft.install_snapshot(rpc).await)
    }

    async fn propose(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let commands: Vec<Command> = decode(request.get_ref()).map_err(bad_payload)?;
        if commands.len() > BATCH_COMMANDS_MAX {
            return Err(Status::invalid_argument(format!(
                "payload: {} commands, over the limit of {BATCH_COMMANDS_MAX}",
                commands.len()
            )));
        }
        if !self.core.is_leader() {
            let outcome = ProposeOutcome::NotLeader { leader_id: self.core.leader().map(|(id, _)| id) };
            return reply(&vec![outcome; commands.len()]);
        }
        // Submitted together, so they join the same batches as the leader's own proposals. What
        // only a leader proposes itself is refused, whoever forwards it.
        let proposals = commands.into_iter().map(|command| async move {
            match command.leader_only() {
                Some(name) => refused_forward(name),
                None => self.core.propose_local(command).await,
            }
        });
        let outcomes = match tokio::time::timeout(self.core.request_timeout, futures::future::join_all(proposals)).await
        {
            Ok(outcomes) => outcomes,
            Err(_) => return Err(Status::deadline_exceeded("not committed before the deadline")),
        };
        reply(&outcomes)
    }

    async fn read_index(&self, _request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        let read = tokio::time::timeout(self.core.request_timeout, self.core.raft.get_read_log_id())
            .await
            .map_err(|_| Status::unavailable("leadership not confirmed before the deadline"))?;
        match read {
            Ok((read_log_id, _applied)) => {
                Ok(Response::new(ReadIndexResponse { read_index: read_log_id.map(|id| id.index).unwrap_or(0) }))
            }
            Err(error) => Err(Status::unavailable(format!("not the leader: {error}"))),
        }
    }

    async fn member(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let call: MemberCall = decode(request.get_ref()).map_err(bad_payload)?;
        reply(&self.membership.serve(call).await?)
    }

    async fn clock(&self, _request: Request<ClockRequest>) -> Result<Response<ClockResponse>, Status> {
        Ok(Response::new(ClockResponse { node_id: self.core.id, wall_clock_ms: (self.core.wall_clock)() }))
    }

    async fn hello(&self, _request: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        // A node that cannot tell must not claim to be fresh: formation would count it as such.
        let initialized =
            self.core.raft.is_initialized().await.map_err(|e| Status::unavailable(format!("Raft has stopped: {e}")))?;
        let cluster_id = self.core.state.read().app.cluster.as_ref().map(|c| c.cluster_id.clone()).unwrap_or_default();
        let members = self
            .core
            .members()
            .into_iter()
            .map(|(id, (node, _))| HelloMember { id, raft_addr: node.raft_addr })
            .collect();
        let metrics = self.core.raft.metrics().borrow().clone();
        Ok(Response::new(HelloResponse {
            node_id: self.core.id,
            cluster_name: self.core.cluster_name.clone(),
            cluster_id,
            initialized,
            members,
            peers_digest: self.core.peers_digest.clone(),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            role: crate::raft::core::role_name(metrics.state).into(),
            current_term: metrics.current_term,
            last_applied_index: metrics.last_applied.map(|id| id.index).unwrap_or(0),
            leader_id: metrics.current_leader.unwrap_or(0),
        }))
    }
}
