//! REST on port 8000 under `/api/v1`, mirroring the task, agent and cluster calls of the gRPC
//! API (the same service code answers both), with an OpenAPI document at `/api/v1/openapi.json`.
//!
//! Errors are JSON: `{"error": {"code": "INVALID_ARGUMENT", "message": "...", "field": "..."}}`
//! with HTTP 400 (bad input, malformed JSON), 404 (unknown id), 409 (wrong state, stale token),
//! 413 (body over [`BODY_BYTES_MAX`]), 429 (queue full: retry later), 503 (no leader reachable).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use maos_client::proto::v1::agent_service_server::AgentService;
use maos_client::proto::v1::cluster_service_server::ClusterService;
use maos_client::proto::v1::task_service_server::TaskService;
use maos_client::proto::v1::{
    AddNodeRequest, AgentRequest, AgentView, CancelTaskRequest, GetTaskRequest, InitializeRequest, ListAgentsRequest,
    ListTasksRequest, RemoveNodeRequest, RetryTaskRequest, SpawnAgentRequest, StatusRequest, SubmitTaskRequest,
    TransferLeaderRequest, WatchTaskRequest,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tonic::{Code, Request};

use maos_client::views::{parse_state, state_name, task_json};

use crate::api::agents::AgentApi;
use crate::api::cluster::ClusterApi;
use crate::api::openapi::openapi;
use crate::api::tasks::TaskApi;

/// Upper bound on a request body.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

#[derive(Clone)]
pub struct Services {
    pub tasks: Arc<TaskApi>,
    pub agents: Arc<AgentApi>,
    pub cluster: Arc<ClusterApi>,
}

/// A JSON error answer.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: String) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code: "INVALID_ARGUMENT", message }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        let (http, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
            Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Code::AlreadyExists => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "FAILED_PRECONDITION"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        };
        Self { status: http, code, message: status.message().to_string() }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "RESOURCE_EXHAUSTED" } else { "INVALID_ARGUMENT" };
        let status = if status == StatusCode::PAYLOAD_TOO_LARGE { status } else { StatusCode::BAD_REQUEST };
        Self { status, code, message: format!("body: {}", rejection.body_text()) }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(format!("query: {}", rejection.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Messages name the field first: "description: must not be empty".
        let field = self
            .message
            .split_once(':')
            .map(|(head, _)| head.trim())
            .filter(|head| !head.is_empty() && !head.contains(' '))
            .map(String::from);
        let body = json!({"error": {"code": self.code, "message": self.message, "field": field}});
        (self.status, Json(body)).into_response()
    }
}

type Answer = Result<Response, ApiError>;

fn ok(value: Value) -> Answer {
    Ok(Json(value).into_response())
}

fn agent_json(view: &AgentView) -> Value {
    let state = match maos_client::proto::v1::AgentState::try_from(view.state) {
        Ok(state) => state.as_str_name().trim_start_matches("AGENT_STATE_").to_string(),
        Err(_) => "UNKNOWN".into(),
    };
    json!({"agent_id": view.agent_id, "node_id": view.node_id, "agent_type": view.agent_type,
        "backend": view.backend, "capabilities": view.capabilities, "state": state, "task_id": view.task_id})
}

/// A submit in JSON: the gRPC message's fields, with `priority` as a word.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    task_type: String,
    description: String,
    #[serde(default)]
    input: String,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    parent: String,
    #[serde(default)]
    max_retries: u32,
    #[serde(default)]
    timeout_ms: u64,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    submitter: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    plan: bool,
    #[serde(default)]
    max_agents: u32,
}

impl SubmitBody {
    fn into_request(self) -> Result<SubmitTaskRequest, ApiError> {
        let priority = match self.priority.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("normal") => 2,
            Some("low") => 1,
            Some("high") => 3,
            Some("critical") => 4,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "priority: {other:?} is not one of low, normal, high, critical"
                )))
            }
        };
        Ok(SubmitTaskRequest {
            task_type: self.task_type,
            priority,
            description: self.description,
            input: self.input,
            depends_on: self.depends_on,
            parent: self.parent,
            max_retries: self.max_retries,
            timeout_ms: self.timeout_ms,
            idempotency_key: self.idempotency_key,
            submitter: self.submitter,
            labels: self.labels.into_iter().collect(),
            capabilities: self.capabilities,
            plan: self.plan,
            max_agents: self.max_agents,
        })
    }
}

async fn submit(State(s): State<Services>, body: Result<Json<SubmitBody>, JsonRejection>) -> Answer {
    let Json(body) = body?;
    let answer = s.tasks.submit(Request::new(body.into_request()?)).await?.into_inner();
    let status = if answer.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(json!({"task_id": answer.task_id, "duplicate": answer.duplicate}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Comma-separated states.
    state: Option<String>,
    #[serde(rename = "type")]
    task_type: Option<String>,
    parent: Option<String>,
    submitter: Option<String>,
    page_size: Option<u32>,
    page_token: Option<String>,
}

async fn list(State(s): State<Services>, query: Result<Query<ListQuery>, QueryRejection>) -> Answer {
    let Query(q) = query?;
    let states = match q.state.as_deref() {
        Some(text) => text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(parse_state)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::bad_request(format!("state: {e}")))?,
        None => Vec::new(),
    };
    let request = ListTasksRequest {
        states,
        task_type: q.task_type.unwrap_or_default(),
        parent: q.parent.unwrap_or_default(),
        submitter: q.submitter.unwrap_or_default(),
        page_size: q.page_size.unwrap_or(0),
        page_token: q.page_token.unwrap_or_default(),
        stale: false,
    };
    let page = s.tasks.list(Request::new(request)).await?.into_inner();
    ok(json!({"tasks": page.tasks.iter().map(task_json).collect::<Vec<_>>(), "next_page_token": page.next_page_token}))
}

async fn get_task(State(s): State<Services>, Path(task_id): Path<String>) -> Answer {
    let view = s.tasks.get(Request::new(GetTaskRequest { task_id, stale: false })).await?.into_inner();
    ok(task_json(&view))
}

async fn results(State(s): State<Services>, Path(task_id): Path<String>) -> Answer {
    let r = s.tasks.results(Request::new(GetTaskRequest { task_id, stale: false })).await?.into_inner();
    let children: Vec<Value> = r
        .children
        .iter()
        .map(|c| json!({"task_id": c.task_id, "plan_key": c.plan_key, "state": state_name(c.state), "result": c.result, "cause": c.cause}))
        .collect();
    ok(
        json!({"task_id": r.task_id, "state": state_name(r.state), "result": r.result, "cause": r.cause, "children": children}),
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: String,
}

async fn cancel(State(s): State<Services>, Path(task_id): Path<String>, body: axum::body::Bytes) -> Answer {
    // The body is optional; when present it must be the JSON object documented.
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        serde_json::from_slice::<CancelBody>(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?.reason
    };
    let answer = s.tasks.cancel(Request::new(CancelTaskRequest { task_id, reason })).await?.into_inner();
    ok(json!({"cancelled": answer.cancelled}))
}

async fn retry(State(s): State<Services>, Path(task_id): Path<String>) -> Answer {
    let view = s.tasks.retry(Request::new(RetryTaskRequest { task_id })).await?.into_inner();
    ok(task_json(&view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsQuery {
    node_id: Option<u64>,
}

async fn list_agents(State(s): State<Services>, query: Result<Query<AgentsQuery>, QueryRejection>) -> Answer {
    let Query(q) = query?;
    let list = s.agents.list(Request::new(ListAgentsRequest { node_id: q.node_id.unwrap_or(0) })).await?.into_inner();
    ok(
        json!({"agents": list.agents.iter().map(agent_json).collect::<Vec<_>>(), "active": list.active, "total": list.total}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnBody {
    agent_type: String,
    #[serde(default)]
    node_id: u64,
}

async fn spawn_agent(State(s): State<Services>, body: Result<Json<SpawnBody>, JsonRejection>) -> Answer {
    let Json(body) = body?;
    let request = SpawnAgentRequest { node_id: body.node_id, agent_type: body.agent_type };
    let view = s.agents.spawn(Request::new(request)).await?.into_inner();
    Ok((StatusCode::CREATED, Json(agent_json(&view))).into_response())
}

/// `POST /api/v1/agents/{agent id}/{pause|resume|terminate}`: agent ids hold slashes.
async fn change_agent(State(s): State<Services>, Path(rest): Path<String>) -> Answer {
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
    ok(agent_json(&view.into_inner()))
}

async fn initialize(State(s): State<Services>) -> Answer {
    let answer = s.cluster.initialize(Request::new(InitializeRequest {})).await?.into_inner();
    let members: Vec<Value> = answer
        .members
        .iter()
        .map(|m| json!({"id": m.id, "raft_addr": m.raft_addr, "api_addr": m.api_addr, "voter": m.voter}))
        .collect();
    ok(json!({"already_initialized": answer.already_initialized, "members": members}))
}

async fn cluster_status(State(s): State<Services>) -> Answer {
    let status = s.cluster.status(Request::new(StatusRequest { with_state_hash: false })).await?.into_inner();
    let members: Vec<Value> = status
        .members
        .iter()
        .map(|m| json!({"id": m.id, "raft_addr": m.raft_addr, "api_addr": m.api_addr, "voter": m.voter}))
        .collect();
    let tasks = status.tasks.unwrap_or_default();
    ok(json!({"node_id": status.node_id, "role": status.role, "term": status.current_term,
        "leader_id": status.leader_id, "leader_api_addr": status.leader_api_addr,
        "last_log_index": status.last_log_index, "last_applied_index": status.last_applied_index,
        "cluster_id": status.cluster_id, "cluster_name": status.cluster_name, "members": members,
        "tasks": {"pending": tasks.pending, "queued": tasks.queued, "running": tasks.running,
            "completed": tasks.completed, "failed": tasks.failed, "cancelled": tasks.cancelled,
            "queue_limit": tasks.queue_limit}}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaderBody {
    node_id: u64,
}

async fn transfer_leader(State(s): State<Services>, body: Result<Json<LeaderBody>, JsonRejection>) -> Answer {
    let Json(body) = body?;
    let answer =
        s.cluster.transfer_leader(Request::new(TransferLeaderRequest { node_id: body.node_id })).await?.into_inner();
    ok(json!({"leader_id": answer.leader_id, "term": answer.term}))
}

/// `GET /api/v1/tasks/{id}/events`: the task's events as server-sent events (`event: task`,
/// `data:` the event as JSON) until it finishes.
async fn events(
    State(s): State<Services>,
    Path(task_id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Answer {
    let Query(q) = query?;
    let request = WatchTaskRequest { task_id, include_children: q.children.unwrap_or(false) };
    let stream = s.tasks.watch(Request::new(request)).await?.into_inner();
    let events = stream.map(|item| {
        let event = match item {
            Ok(e) => Event::default().event("task").data(
                json!({"task_id": e.task_id, "state": state_name(e.state), "attempt": e.attempt, "node_id": e.node_id,
                    "progress_percent": e.progress_percent, "progress_message": e.progress_message, "cause": e.cause,
                    "result": e.result, "finished": e.finished})
                .to_string(),
            ),
            Err(status) => Event::default()
                .event("error")
                .data(json!({"code": status.code() as i32, "message": status.message()}).to_string()),
        };
        Ok::<_, std::convert::Infallible>(event)
    });
    Ok(Sse::new(events).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    children: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNodeBody {
    id: u64,
    raft_addr: String,
    api_addr: String,
    #[serde(default)]
    learner_only: bool,
}

fn members_json(members: &[maos_client::proto::v1::Member]) -> Value {
    Value::Array(
        members
            .iter()
            .map(|m| json!({"id": m.id, "raft_addr": m.raft_addr, "api_addr": m.api_addr, "voter": m.voter}))
            .collect(),
    )
}

async fn add_node(State(s): State<Services>, body: Result<Json<AddNodeBody>, JsonRejection>) -> Answer {
    let Json(b) = body?;
    let request =
        AddNodeRequest { id: b.id, raft_addr: b.raft_addr, api_addr: b.api_addr, learner_only: b.learner_only };
    let answer = s.cluster.add_node(Request::new(request)).await?.into_inner();
    ok(json!({"members": members_json(&answer.members)}))
}

async fn remove_node(State(s): State<Services>, Path(id): Path<u64>) -> Answer {
    let answer = s.cluster.remove_node(Request::new(RemoveNodeRequest { id })).await?.into_inner();
    ok(json!({"members": members_json(&answer.members)}))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "NOT_FOUND",
        message: "path: no such endpoint; see /api/v1/openapi.json".into(),
    }
}

/// The REST routes.
pub fn router(services: Services) -> Router {
    Router::new()
        .route("/api/v1/tasks", post(submit).get(list))
        .route("/api/v1/tasks/{task_id}", get(get_task))
        .route("/api/v1/tasks/{task_id}/results", get(results))
        .route("/api/v1/tasks/{task_id}/cancel", post(cancel))
        .route("/api/v1/tasks/{task_id}/retry", post(retry))
        .route("/api/v1/tasks/{task_id}/events", get(events))
        .route("/api/v1/agents", get(list_agents).post(spawn_agent))
        .route("/api/v1/agents/{*rest}", post(change_agent))
        .route("/api/v1/cluster", get(cluster_status))
        .route("/api/v1/cluster/leader", post(transfer_leader))
        .route("/api/v1/cluster/init", post(initialize))
        .route("/api/v1/cluster/nodes", post(add_node))
        .route("/api/v1/cluster/nodes/{id}", axum::routing::delete(remove_node))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/{*rest}", get(not_found).post(not_found))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(services)
}
