//! The agent service on port 8000: lists and changes agent pools (spawn, pause, resume,
//! terminate) through Raft. External workers are `workers.rs`.

use std::sync::Arc;

use maos_client::proto::v1::agent_service_server::AgentService;
use maos_client::proto::v1::{
    AgentRequest, AgentState as WireAgentState, AgentView, ListAgentsRequest, ListAgentsResponse, SpawnAgentRequest,
};
use maos_raft_store::tasks::{AgentState, TaskCommand, TaskResponse, WORKER_ID_MIN};
use maos_raft_store::{Command, Response as Applied};
use tonic::{Request, Response, Status};

use crate::api::status::{invalid, status_from};
use crate::api::views::agent_view;
use crate::config::Config;
use crate::raft::core::NodeCore;

pub struct AgentApi {
    pub core: Arc<NodeCore>,
    pub config: Config,
}

impl AgentApi {
    async fn agent_view(&self, agent_id: &str) -> Result<Response<AgentView>, Status> {
        self.core.read_barrier().await.map_err(status_from)?;
        let state = self.core.state.read();
        let table = &state.app.tasks;
        let slot = table
            .slots
            .get(agent_id)
            .ok_or_else(|| Status::not_found(format!("agent_id: {agent_id:?} does not exist")))?;
        Ok(Response::new(agent_view(table, agent_id, slot)))
    }

    async fn set_state(&self, agent_id: String, state: AgentState) -> Result<Response<AgentView>, Status> {
        if agent_id.is_empty() {
            return Err(invalid("agent_id: must name an agent (see `maos agent list`)"));
        }
        let command = TaskCommand::SetAgentState { agent_id: agent_id.clone(), state };
        self.core.write(Command::Task(command)).await.map_err(status_from)?;
        self.agent_view(&agent_id).await
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn list(&self, request: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        let node_id = request.into_inner().node_id;
        self.core.read_barrier().await.map_err(status_from)?;
        let state = self.core.state.read();
        let table = &state.app.tasks;
        let agents: Vec<AgentView> = table
            .slots
            .iter()
            .filter(|(_, slot)| node_id == 0 || slot.node_id == node_id)
            .map(|(id, slot)| agent_view(table, id, slot))
            .collect();
        let active = agents.iter().filter(|a| a.state == WireAgentState::Busy as i32).count() as u64;
        let total = agents.iter().filter(|a| a.state != WireAgentState::Terminated as i32).count() as u64;
        Ok(Response::new(ListAgentsResponse { agents, active, total }))
    }

    async fn spawn(&self, request: Request<SpawnAgentRequest>) -> Result<Response<AgentView>, Status> {
        let SpawnAgentRequest { node_id, agent_type } = request.into_inner();
        let node_id = if node_id == 0 { self.core.id } else { node_id };
        if node_id >= WORKER_ID_MIN {
            return Err(invalid("node_id: an external worker registers its own agents; spawn on a node"));
        }
        if agent_type.is_empty() {
            return Err(invalid("agent_type: must name a type the node runs"));
        }
        // The node's configuration, not the request, is at fault: FAILED_PRECONDITION (REST 409).
        // The state machine checks again when it applies the command.
        let runs =
            self.core.state.read().app.tasks.slots.values().any(|s| s.node_id == node_id && s.agent_type == agent_type);
        if !runs {
            return Err(Status::failed_precondition(format!(
                "agent_type: node {node_id} runs no agent of type {agent_type:?}; spawn a type it is configured for"
            )));
        }
        let command = TaskCommand::AddAgent { node_id, agent_type, agents_max: self.config.system.max_agents };
        match self.core.write(Command::Task(command)).await.map_err(status_from)? {
            Applied::Task(TaskResponse::AgentAdded { agent_id }) => self.agent_view(&agent_id).await,
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    async fn pause(&self, request: Request<AgentRequest>) -> Result<Response<AgentView>, Status> {
        self.set_state(request.into_inner().agent_id, AgentState::Draining).await
    }

    async fn resume(&self, request: Request<AgentRequest>) -> Result<Response<AgentView>, Status> {
        self.set_state(request.into_inner().agent_id, AgentState::Active).await
    }

    async fn terminate(&self, request: Request<AgentRequest>) -> Result<Response<AgentView>, Status> {
        self.set_state(request.into_inner().agent_id, AgentState::Terminated).await
    }
}
