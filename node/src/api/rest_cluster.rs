//! The agent and cluster routes of the REST API and their bodies (see `rest_tasks.rs` for the
//! conventions).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use maos_client::proto::v1::agent_service_server::AgentService;
use maos_client::proto::v1::cluster_service_server::ClusterService;
use maos_client::proto::v1::{
    AddNodeRequest, AgentRequest, AgentView, InitializeRequest, ListAgentsRequest, Member, OpenSessionRequest,
    RemoveNodeRequest, SpawnAgentRequest, StatusRequest, TransferLeaderRequest,
};
use maos_client::views::agent_state_name;
use serde::{Deserialize, Serialize};
use tonic::Request;
use utoipa::{IntoParams, ToSchema};

use crate::api::principal::Principal;
use crate::api::rest_error::{integer, ok, Answer, ApiError, ErrorBody, Services};

/// An agent's state.
#[derive(ToSchema)]
#[schema(rename_all = "UPPERCASE")]
#[allow(dead_code)] // only its schema is used: the field is a word
pub enum AgentState {
    Idle,
    Busy,
    Draining,
    Failed,
    Terminated,
}

/// An agent: gRPC's `AgentView` with `state` as a word.
#[derive(Serialize, ToSchema)]
#[schema(as = Agent)]
pub struct AgentBody {
    agent_id: String,
    /// A node, or an external worker's id.
    node_id: u64,
    agent_type: String,
    backend: String,
    capabilities: Vec<String>,
    #[schema(value_type = AgentState)]
    state: &'static str,
    /// While busy.
    task_id: String,
}

impl From<&AgentView> for AgentBody {
    fn from(v: &AgentView) -> Self {
        Self {
            agent_id: v.agent_id.clone(),
            node_id: v.node_id,
            agent_type: v.agent_type.clone(),
            backend: v.backend.clone(),
            capabilities: v.capabilities.clone(),
            state: agent_state_name(v.state),
            task_id: v.task_id.clone(),
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AgentsQuery {
    /// Only this node's or worker's agents (absent or 0: all).
    #[param(minimum = 0, maximum = 9007199254740991_u64)]
    node_id: Option<u64>,
}

/// The agents, and how many are busy and not terminated.
#[derive(Serialize, ToSchema)]
pub struct AgentList {
    agents: Vec<AgentBody>,
    /// Busy agents.
    active: u64,
    /// Agents not terminated.
    total: u64,
}

#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", summary = "Agents", params(AgentsQuery),
    responses(
        (status = 200, description = "the agents", body = AgentList),
        (status = 400, description = "a bad query", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
    ))]
pub(crate) async fn list_agents(
    State(s): State<Services>,
    query: Result<Query<AgentsQuery>, QueryRejection>,
) -> Answer {
    let Query(q) = query?;
    let node_id = ApiError::check_integer("node_id", q.node_id.unwrap_or(0))?;
    let list = s.agents.list(Request::new(ListAgentsRequest { node_id })).await?.into_inner();
    ok(AgentList { agents: list.agents.iter().map(AgentBody::from).collect(), active: list.active, total: list.total })
}

/// One more agent of a type a node runs.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Spawn)]
pub struct SpawnBody {
    /// A type the node is configured for (`agents.types`); another is refused with 409.
    #[schema(min_length = 1, example = "coder")]
    agent_type: String,
    /// The node (absent or 0: the node that answers).
    #[serde(default, deserialize_with = "integer::u64")]
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    node_id: u64,
}

#[utoipa::path(post, path = "/api/v1/agents", tag = "agents", summary = "Spawn an agent", request_body = SpawnBody,
    responses(
        (status = 201, description = "the agent", body = AgentBody),
        (status = 400, description = "invalid input; `field` names it", body = ErrorBody),
        (status = 409, description = "the node runs no agent of that type", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 429, description = "`system.max_agents` reached on that node", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn spawn_agent(State(s): State<Services>, body: Result<Json<SpawnBody>, JsonRejection>) -> Answer {
    let Json(body) = body?;
    let node_id = ApiError::check_integer("node_id", body.node_id)?;
    let view = s.agents.spawn(Request::new(SpawnAgentRequest { node_id, agent_type: body.agent_type })).await?;
    Ok((StatusCode::CREATED, Json(AgentBody::from(view.get_ref()))).into_response())
}

/// `POST /api/v1/agents/{agent id}/{pause|resume|terminate}`: agent ids hold slashes, so this is
/// a wildcard route.
#[utoipa::path(post, path = "/api/v1/agents/{agent_id}/{action}", tag = "agents",
    summary = "Pause (drain), resume or terminate an agent",
    description = "Agent ids hold slashes (`node-1/coder/0`); send them as they are or percent-encoded.",
    params(
        ("agent_id" = String, Path, min_length = 1),
        ("action" = String, Path, pattern = "^(pause|resume|terminate)$"),
    ),
    responses(
        (status = 200, description = "the agent", body = AgentBody),
        (status = 400, description = "a bad path", body = ErrorBody),
        (status = 404, description = "unknown agent", body = ErrorBody),
        (status = 409, description = "terminated, or the change is not allowed in its state", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn change_agent(State(s): State<Services>, rest: Result<Path<String>, PathRejection>) -> Answer {
    let Path(rest) = rest?;
    let Some((agent_id, action)) = rest.rsplit_once('/') else {
        return Err(ApiError::bad_request("path: expected /api/v1/agents/<agent id>/pause|resume|terminate".into()));
    };
    let request = Request::new(AgentRequest { agent_id: agent_id.to_string() });
    let view = match action {
        "pause" => s.agents.pause(request).await?,
        "resume" => s.agents.resume(request).await?,
        "terminate" => s.agents.terminate(request).await?,
        other => return Err(ApiError::bad_request(format!("action: {other:?} is not pause, resume or terminate"))),
    };
    ok(AgentBody::from(view.get_ref()))
}

/// A member of the cluster.
#[derive(Serialize, ToSchema)]
#[schema(as = Member)]
pub struct MemberBody {
    id: u64,
    raft_addr: String,
    api_addr: String,
    /// False for a learner.
    voter: bool,
}

fn members(members: &[Member]) -> Vec<MemberBody> {
    members
        .iter()
        .map(|m| MemberBody { id: m.id, raft_addr: m.raft_addr.clone(), api_addr: m.api_addr.clone(), voter: m.voter })
        .collect()
}

/// The answer to an initialize.
#[derive(Serialize, ToSchema)]
pub struct Initialized {
    /// The cluster existed already (this call changed nothing).
    already_initialized: bool,
    members: Vec<MemberBody>,
}

#[utoipa::path(post, path = "/api/v1/cluster/init", tag = "cluster",
    summary = "Form the cluster from the nodes' static peers (cluster.bootstrap: manual); idempotent",
    responses(
        (status = 200, description = "formed, or already formed", body = Initialized),
        (status = 409, description = "a peer is not ready (named), or the cluster did not form; retry", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn initialize(State(s): State<Services>) -> Answer {
    let answer = s.cluster.initialize(Request::new(InitializeRequest {})).await?.into_inner();
    ok(Initialized { already_initialized: answer.already_initialized, members: members(&answer.members) })
}

/// Tasks by state in this node's applied state.
#[derive(Serialize, ToSchema)]
pub struct TaskCounts {
    pending: u64,
    queued: u64,
    running: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    /// Open tasks the cluster accepts (`system.task_queue_size`, as applied).
    queue_limit: u64,
}

/// This node's view of the cluster: gRPC's `StatusResponse` (without the state hash).
#[derive(Serialize, ToSchema)]
pub struct ClusterStatus {
    node_id: u64,
    /// leader, follower, candidate or learner.
    role: String,
    term: u64,
    leader_id: Option<u64>,
    leader_api_addr: String,
    last_log_index: u64,
    last_applied_index: u64,
    cluster_id: String,
    cluster_name: String,
    members: Vec<MemberBody>,
    tasks: TaskCounts,
}

#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster", summary = "This node's view: role, term, leader, members, task counts",
    responses(
        (status = 200, description = "the status", body = ClusterStatus),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
    ))]
pub(crate) async fn cluster_status(State(s): State<Services>) -> Answer {
    let status = s.cluster.status(Request::new(StatusRequest { with_state_hash: false })).await?.into_inner();
    let tasks = status.tasks.unwrap_or_default();
    ok(ClusterStatus {
        node_id: status.node_id,
        role: status.role,
        term: status.current_term,
        leader_id: status.leader_id,
        leader_api_addr: status.leader_api_addr,
        last_log_index: status.last_log_index,
        last_applied_index: status.last_applied_index,
        cluster_id: status.cluster_id,
        cluster_name: status.cluster_name,
        members: members(&status.members),
        tasks: TaskCounts {
            pending: tasks.pending,
            queued: tasks.queued,
            running: tasks.running,
            completed: tasks.completed,
            failed: tasks.failed,
            cancelled: tasks.cancelled,
            queue_limit: tasks.queue_limit,
        },
    })
}

/// The voter to lead.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = TransferLeader)]
pub struct LeaderBody {
    #[serde(deserialize_with = "integer::u64")]
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    node_id: u64,
}

/// The leader after a transfer.
#[derive(Serialize, ToSchema)]
pub struct Leader {
    leader_id: u64,
    term: u64,
}

#[utoipa::path(post, path = "/api/v1/cluster/leader", tag = "cluster", summary = "Transfer leadership to a voter",
    request_body = LeaderBody,
    responses(
        (status = 200, description = "the new leader and term", body = Leader),
        (status = 400, description = "a learner, or invalid input", body = ErrorBody),
        (status = 404, description = "not a member", body = ErrorBody),
        (status = 409, description = "the target cannot lead now (a learner, lagging, or an election under way)", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable, or the target is unreachable; retry", body = ErrorBody),
        (status = 504, description = "no leader emerged in time; retry", body = ErrorBody),
    ))]
pub(crate) async fn transfer_leader(
    State(s): State<Services>,
    body: Result<Json<LeaderBody>, JsonRejection>,
) -> Answer {
    let Json(body) = body?;
    let node_id = ApiError::check_integer("node_id", body.node_id)?;
    let answer = s.cluster.transfer_leader(Request::new(TransferLeaderRequest { node_id })).await?.into_inner();
    ok(Leader { leader_id: answer.leader_id, term: answer.term })
}

/// A node to add.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AddNode)]
pub struct AddNodeBody {
    #[serde(deserialize_with = "integer::u64")]
    #[schema(minimum = 1, maximum = 9007199254740991_u64)]
    id: u64,
    /// `host:port` of its Raft listener: a DNS name or IPv4 address, or an IPv6 one in brackets;
    /// a port in 1..=65535.
    #[schema(
        pattern = "^([A-Za-z0-9._-]+|\\[[0-9A-Fa-f:.]+\\]):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$",
        example = "10.0.0.4:7000"
    )]
    raft_addr: String,
    /// `host:port` of its API listener (as `raft_addr`).
    #[schema(
        pattern = "^([A-Za-z0-9._-]+|\\[[0-9A-Fa-f:.]+\\]):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$",
        example = "10.0.0.4:8000"
    )]
    api_addr: String,
    /// Stay a learner (no vote).
    #[serde(default)]
    learner_only: bool,
}

/// The members after a change.
#[derive(Serialize, ToSchema)]
pub struct Members {
    members: Vec<MemberBody>,
}

/// The document's address grammar, which is stricter than the node's (`config::check_address`):
/// a DNS name or IPv4 address, or an IPv6 address in brackets; a port in 1..=65535 without a sign
/// or leading zeros.
fn check_address(field: &str, addr: &str) -> Result<(), ApiError> {
    let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
        let named = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        let bracketed = host.len() > 2
            && host.starts_with('[')
            && host.ends_with(']')
            && host[1..host.len() - 1].chars().all(|c| c.is_ascii_hexdigit() || ":.".contains(c));
        let port_ok = !port.starts_with('0')
            && port.len() <= 5
            && port.chars().all(|c| c.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0);
        (named || bracketed) && port_ok
    });
    if !valid {
        return Err(ApiError::bad_request(format!(
            "{field}: {addr:?} is not host:port (a name, an IPv4 address or a bracketed IPv6 one; a port in 1..=65535)"
        )));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/cluster/nodes", tag = "cluster",
    summary = "Add a node (learner, then voter unless learner_only)", request_body = AddNodeBody,
    responses(
        (status = 200, description = "the members", body = Members),
        (status = 400, description = "a bad id or address", body = ErrorBody),
        (status = 409, description = "the id is taken, the change is not allowed now, or the new node did not catch up in time (it stays a learner)", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
        (status = 504, description = "no answer in time", body = ErrorBody),
    ))]
pub(crate) async fn add_node(State(s): State<Services>, body: Result<Json<AddNodeBody>, JsonRejection>) -> Answer {
    let Json(b) = body?;
    let id = ApiError::check_integer("id", b.id)?;
    check_address("raft_addr", &b.raft_addr)?;
    check_address("api_addr", &b.api_addr)?;
    let request = AddNodeRequest { id, raft_addr: b.raft_addr, api_addr: b.api_addr, learner_only: b.learner_only };
    let answer = s.cluster.add_node(Request::new(request)).await?.into_inner();
    ok(Members { members: members(&answer.members) })
}

#[utoipa::path(delete, path = "/api/v1/cluster/nodes/{id}", tag = "cluster", summary = "Remove a node",
    params(("id" = u64, Path, minimum = 0, maximum = 9007199254740991_u64)),
    responses(
        (status = 200, description = "the members", body = Members),
        (status = 400, description = "a bad id", body = ErrorBody),
        (status = 404, description = "not a member", body = ErrorBody),
        (status = 409, description = "the change is not allowed now", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn remove_node(State(s): State<Services>, id: Result<Path<u64>, PathRejection>) -> Answer {
    let Path(id) = id?;
    let id = ApiError::check_integer("id", id)?;
    let answer = s.cluster.remove_node(Request::new(RemoveNodeRequest { id })).await?.into_inner();
    ok(Members { members: members(&answer.members) })
}

/// A client session to open.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = OpenSession)]
pub struct SessionBody {
    /// The session ends this long after its last write (0: the node's `raft.session_ttl_ms`).
    #[serde(default, deserialize_with = "integer::u64")]
    #[schema(minimum = 0, maximum = 86400)]
    ttl_seconds: u64,
}

/// An open client session: send `maos-session: <session_id>/<sequence>/<acknowledged>` with
/// each write (docs/API.md, "Client sessions").
#[derive(Serialize, ToSchema)]
pub struct SessionOpened {
    session_id: u64,
    ttl_ms: u64,
}

#[utoipa::path(post, path = "/api/v1/sessions", tag = "cluster", summary = "Open a client session for exactly-once writes",
    description = "Writes sent with the header `maos-session: <session_id>/<sequence>/<acknowledged>` apply once per sequence, through any node; a resend gets the first answer. See docs/API.md.",
    request_body = SessionBody,
    responses(
        (status = 201, description = "the session", body = SessionOpened),
        (status = 400, description = "invalid input; `field` names it", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 429, description = "4,096 sessions are open; retry when one ends", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn open_session(
    State(s): State<Services>,
    principal: Principal,
    body: Result<Json<SessionBody>, JsonRejection>,
) -> Answer {
    let Json(body) = body?;
    if body.ttl_seconds > 86_400 {
        return Err(ApiError::bad_request("ttl_seconds: at most 86400 (24 hours)".to_string()));
    }
    let request = OpenSessionRequest { ttl_ms: body.ttl_seconds * 1_000 };
    // The session is the caller's: only its writes go on it.
    let opened = s.cluster.open_session(principal.request(request)).await?.into_inner();
    let body = SessionOpened { session_id: opened.session_id, ttl_ms: opened.ttl_ms };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}
