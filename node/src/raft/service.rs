//! The Raft port's server side: openraft RPCs, forwarded proposals, ReadIndex, Hello and Clock.

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
use crate::raft::network::{decode, encode};
use crate::raft::proposer::ProposeOutcome;

/// Serves the Raft port for one node.
pub struct RaftServer {
    pub core: Arc<NodeCore>,
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
        // Submitted together, so they join the same batches as the leader's own proposals.
        let proposals = commands.into_iter().map(|command| self.core.propose_local(command));
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
        Ok(Response::new(HelloResponse {
            node_id: self.core.id,
            cluster_name: self.core.cluster_name.clone(),
            cluster_id,
            initialized,
            members,
            peers_digest: self.core.peers_digest.clone(),
            last_log_index: self.core.raft.metrics().borrow().last_log_index.unwrap_or(0),
        }))
    }
}
