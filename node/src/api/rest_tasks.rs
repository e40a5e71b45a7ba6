//! The task routes of the REST API and their bodies. Each body type is the gRPC message's
//! fields in JSON, with the bounds that validation enforces as schema constraints, so the
//! OpenAPI document (`openapi.rs`) states them; `priority` and `state` are words.

use std::collections::BTreeMap;

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::Json;
use futures::StreamExt;
use maos_client::proto::v1::task_service_server::TaskService;
use maos_client::proto::v1::{
    CancelTaskRequest, GetTaskRequest, ListTasksRequest, RetryTaskRequest, SubmitTaskRequest, TaskEvent, TaskView,
    WatchTaskRequest,
};
use maos_client::views::{priority_name, state_name};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{Array, ArrayBuilder, Object, ObjectBuilder, Type};
use utoipa::{IntoParams, ToSchema};

use crate::api::principal::Principal;
use crate::api::rest_error::{integer, ok, Answer, ApiError, ErrorBody, Services};
use crate::api::tasks::PAGE_SIZE_MAX;

/// A task's priority.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // only its schema is used: the field is a word
pub enum Priority {
    Low,
    Normal,
    High,
    Critical,
}

/// A task's state.
#[derive(ToSchema)]
#[schema(rename_all = "UPPERCASE")]
#[allow(dead_code)] // only its schema is used: the field is a word
pub enum TaskState {
    Pending,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// A submit: gRPC's `SubmitTaskRequest` in JSON, with `priority` as a word.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Submit)]
pub struct SubmitBody {
    /// An agent type a node or worker serves (`mixed` is planned first). A type nothing serves
    /// is refused with 409 unless `scheduler.accept_unserved_types` is set.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", min_length = 1, max_length = 64, example = "coder")]
    task_type: String,
    /// What to do: at most 16 KiB of UTF-8 (16384 bytes), with a character that is not white space.
    #[schema(
        pattern = "[^\\t\\n\\x0B\\f\\r \\x85\\xA0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]",
        min_length = 1,
        max_length = 16384,
        example = "summarise the report"
    )]
    description: String,
    /// The task's input: at most 16 KiB of UTF-8 with the embedded store (the document a node
    /// serves states its own limit: `database.payload_bytes_max` with PostgreSQL); no NUL.
    #[serde(default)]
    #[schema(pattern = "^[^\\x00]*$", max_length = 16384)]
    input: String,
    /// `normal` when absent.
    #[serde(default)]
    #[schema(value_type = Option<Priority>)]
    priority: Option<String>,
    /// Tasks that must complete first; each must exist (404 otherwise).
    #[serde(default)]
    #[schema(schema_with = depends_on_schema)]
    depends_on: Vec<String>,
    /// The parent task (empty: none); it must exist (404 otherwise).
    #[serde(default)]
    parent: String,
    #[serde(default, deserialize_with = "integer::u32")]
    #[schema(minimum = 0, maximum = 100)]
    max_retries: u32,
    /// An attempt's time limit (0: one hour).
    #[serde(default, deserialize_with = "integer::u64")]
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    timeout_ms: u64,
    /// A second submit with the same key answers the first task (200, `duplicate`); empty:
    /// none. Printable ASCII.
    #[serde(default)]
    #[schema(pattern = "^[ -~]*$", max_length = 128)]
    idempotency_key: String,
    /// Who submits (empty: `anonymous`). Printable ASCII.
    #[serde(default)]
    #[schema(pattern = "^[ -~]*$", max_length = 128)]
    submitter: String,
    #[serde(default)]
    #[schema(schema_with = labels_schema)]
    labels: BTreeMap<String, String>,
    /// Capabilities an agent must have to run it.
    #[serde(default)]
    capabilities: Vec<String>,
    /// Plan first (see gRPC's `SubmitTaskRequest.plan`).
    #[serde(default)]
    plan: bool,
    /// Subtasks running at once, at most (0: `task_planner.max_parallel_branches`).
    #[serde(default, deserialize_with = "integer::u32")]
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    max_agents: u32,
}

/// Up to 256 distinct task ids (the attribute macro has no `uniqueItems`).
fn depends_on_schema() -> Array {
    ArrayBuilder::new()
        .items(ObjectBuilder::new().schema_type(Type::String))
        .max_items(Some(maos_raft_store::tasks::DEPENDENCIES_MAX))
        .unique_items(true)
        .build()
}

/// Up to 32 labels, text to text (the attribute macro has no `maxProperties`).
fn labels_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
        .max_properties(Some(maos_raft_store::tasks::LABELS_MAX))
        .build()
}

impl SubmitBody {
    fn into_request(self) -> Result<SubmitTaskRequest, ApiError> {
        let priority = match self.priority.as_deref() {
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
            timeout_ms: ApiError::check_integer("timeout_ms", self.timeout_ms)?,
            idempotency_key: self.idempotency_key,
            submitter: self.submitter,
            labels: self.labels.into_iter().collect(),
            capabilities: self.capabilities,
            plan: self.plan,
            max_agents: self.max_agents,
        })
    }
}

/// The answer to a submit.
#[derive(Serialize, ToSchema)]
#[schema(as = Submitted)]
pub struct SubmittedBody {
    task_id: String,
    /// True when the idempotency key named an earlier task, which this is.
    duplicate: bool,
}

/// A task: every field of gRPC's `TaskView`, with `priority` and `state` as words.
#[derive(Serialize, ToSchema)]
#[schema(as = Task)]
pub struct TaskBody {
    task_id: String,
    task_type: String,
    #[schema(value_type = Priority)]
    priority: &'static str,
    #[schema(value_type = TaskState)]
    state: &'static str,
    attempt: u32,
    result: String,
    cause: String,
    /// While running: the agent slot, its node and the attempt's fencing token (0 unless the
    /// caller is an operator or admin).
    slot: String,
    node_id: u64,
    fencing_token: u64,
    depends_on: Vec<String>,
    parent: String,
    submitter: String,
    children: Vec<String>,
    /// Awaits (or ran) a planner.
    planning: bool,
    /// Its plan was expanded into `children`.
    expanded: bool,
    /// The latest checkpoint's data and the attempt that saved it.
    checkpoint: String,
    checkpoint_attempt: u32,
    progress_percent: u32,
    progress_message: String,
    input_tokens: u64,
    output_tokens: u64,
    max_retries: u32,
    description: String,
    idempotency_key: String,
    input: String,
    /// The W3C trace id of its submit when that was traced (sampled); empty otherwise.
    trace_id: String,
}

impl From<&TaskView> for TaskBody {
    fn from(v: &TaskView) -> Self {
        Self {
            task_id: v.task_id.clone(),
            task_type: v.task_type.clone(),
            priority: priority_name(v.priority),
            state: state_name(v.state),
            attempt: v.attempt,
            result: v.result.clone(),
            cause: v.cause.clone(),
            slot: v.slot.clone(),
            node_id: v.node_id,
            fencing_token: v.fencing_token,
            depends_on: v.depends_on.clone(),
            parent: v.parent.clone(),
            submitter: v.submitter.clone(),
            children: v.children.clone(),
            planning: v.planning,
            expanded: v.expanded,
            checkpoint: v.checkpoint.clone(),
            checkpoint_attempt: v.checkpoint_attempt,
            progress_percent: v.progress_percent,
            progress_message: v.progress_message.clone(),
            input_tokens: v.input_tokens,
            output_tokens: v.output_tokens,
            max_retries: v.max_retries,
            description: v.description.clone(),
            idempotency_key: v.idempotency_key.clone(),
            input: v.input.clone(),
            trace_id: v.trace_id.clone(),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks", summary = "Submit a task", request_body = SubmitBody,
    responses(
        (status = 201, description = "submitted", body = SubmittedBody),
        (status = 200, description = "already submitted with this idempotency key: the original task", body = SubmittedBody),
        (status = 400, description = "invalid input; `field` names it", body = ErrorBody),
        (status = 404, description = "a task named in `depends_on` or `parent` does not exist", body = ErrorBody),
        (status = 409, description = "no agent serves `task_type` (or the planner type); or an expired session", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 429, description = "the task queue is full; retry later", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable, or the task-data store is down; retry", body = ErrorBody),
    ))]
pub(crate) async fn submit(
    State(s): State<Services>,
    who: Principal,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> Answer {
    let Json(body) = body?;
    let answer = s.tasks.submit(who.request(body.into_request()?)).await?.into_inner();
    let status = if answer.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(SubmittedBody { task_id: answer.task_id, duplicate: answer.duplicate })).into_response())
}

/// The filters and page of a list.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Comma-separated states, lowercase (`queued,running`); absent or empty: all.
    #[param(
        pattern = "^((pending|queued|running|completed|failed|cancelled)(,(pending|queued|running|completed|failed|cancelled))*)?$"
    )]
    state: Option<String>,
    /// Only tasks of this type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    task_type: Option<String>,
    /// Only children of this task.
    parent: Option<String>,
    /// Only tasks of this submitter.
    submitter: Option<String>,
    /// Tasks in one page (100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    page_size: Option<u32>,
    /// `next_page_token` of the previous page.
    page_token: Option<String>,
}

/// A page of tasks in submission order.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskPage)]
pub struct TaskPage {
    tasks: Vec<TaskBody>,
    /// Pass as `page_token` for the next page; empty on the last.
    next_page_token: String,
}

fn parse_states(text: &str) -> Result<Vec<i32>, ApiError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|word| match word {
            "pending" | "queued" | "running" | "completed" | "failed" | "cancelled" => {
                maos_client::views::parse_state(word).map_err(|e| ApiError::bad_request(format!("state: {e}")))
            }
            other => Err(ApiError::bad_request(format!(
                "state: {other:?} is not one of pending, queued, running, completed, failed, cancelled (lowercase, comma-separated)"
            ))),
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", summary = "List tasks in submission order, a page at a time",
    params(ListQuery),
    responses(
        (status = 200, description = "a page", body = TaskPage),
        (status = 400, description = "a bad filter or page size; `field` names it", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable, or the task-data store is down; retry", body = ErrorBody),
    ))]
pub(crate) async fn list(
    State(s): State<Services>,
    who: Principal,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Answer {
    let Query(q) = query?;
    let states = parse_states(q.state.as_deref().unwrap_or_default())?;
    // gRPC's 0 means the default (proto3 cannot tell it from absent); here absent means that.
    let page_size = match q.page_size {
        None => 0,
        Some(n) if n == 0 || n as usize > PAGE_SIZE_MAX => {
            return Err(ApiError::bad_request(format!("page_size: must be 1..={PAGE_SIZE_MAX} (or absent for 100)")))
        }
        Some(n) => n,
    };
    let request = ListTasksRequest {
        states,
        task_type: q.task_type.unwrap_or_default(),
        parent: q.parent.unwrap_or_default(),
        submitter: q.submitter.unwrap_or_default(),
        page_size,
        page_token: q.page_token.unwrap_or_default(),
        stale: false,
    };
    let page = s.tasks.list(who.request(request)).await?.into_inner();
    ok(TaskPage { tasks: page.tasks.iter().map(TaskBody::from).collect(), next_page_token: page.next_page_token })
}

#[utoipa::path(get, path = "/api/v1/tasks/{task_id}", tag = "tasks", summary = "A task",
    params(("task_id" = String, Path, min_length = 1)),
    responses(
        (status = 200, description = "the task", body = TaskBody),
        (status = 400, description = "a bad path", body = ErrorBody),
        (status = 404, description = "unknown task", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable, or the task-data store is down; retry", body = ErrorBody),
    ))]
pub(crate) async fn get_task(
    State(s): State<Services>,
    who: Principal,
    task_id: Result<Path<String>, PathRejection>,
) -> Answer {
    let Path(task_id) = task_id?;
    let view = s.tasks.get(who.request(GetTaskRequest { task_id, stale: false })).await?.into_inner();
    ok(TaskBody::from(&view))
}

/// A subtask's result.
#[derive(Serialize, ToSchema)]
pub struct ChildResult {
    task_id: String,
    /// Its key in the plan that made it.
    plan_key: String,
    #[schema(value_type = TaskState)]
    state: &'static str,
    result: String,
    cause: String,
}

/// A task's result and its subtasks'.
#[derive(Serialize, ToSchema)]
pub struct TaskResults {
    task_id: String,
    #[schema(value_type = TaskState)]
    state: &'static str,
    result: String,
    cause: String,
    children: Vec<ChildResult>,
}

#[utoipa::path(get, path = "/api/v1/tasks/{task_id}/results", tag = "tasks", summary = "A task's result and its subtasks'",
    params(("task_id" = String, Path, min_length = 1)),
    responses(
        (status = 200, description = "the results", body = TaskResults),
        (status = 400, description = "a bad path", body = ErrorBody),
        (status = 404, description = "unknown task", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable, or the task-data store is down; retry", body = ErrorBody),
    ))]
pub(crate) async fn results(
    State(s): State<Services>,
    who: Principal,
    task_id: Result<Path<String>, PathRejection>,
) -> Answer {
    let Path(task_id) = task_id?;
    let r = s.tasks.results(who.request(GetTaskRequest { task_id, stale: false })).await?.into_inner();
    let children = r
        .children
        .iter()
        .map(|c| ChildResult {
            task_id: c.task_id.clone(),
            plan_key: c.plan_key.clone(),
            state: state_name(c.state),
            result: c.result.clone(),
            cause: c.cause.clone(),
        })
        .collect();
    ok(TaskResults { task_id: r.task_id, state: state_name(r.state), result: r.result, cause: r.cause, children })
}

/// Why a task is cancelled (optional).
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Cancel)]
pub struct CancelBody {
    /// Recorded as the tasks' cause (default: "cancelled by a client").
    #[serde(default)]
    reason: String,
}

/// The tasks a cancel ended: the task and its unfinished subtasks.
#[derive(Serialize, ToSchema)]
pub struct Cancelled {
    cancelled: Vec<String>,
}

#[utoipa::path(post, path = "/api/v1/tasks/{task_id}/cancel", tag = "tasks", summary = "Cancel a task and its subtasks",
    params(("task_id" = String, Path, min_length = 1)),
    request_body(content = Option<CancelBody>, description = "optional; an empty body cancels with the default reason"),
    responses(
        (status = 200, description = "the tasks cancelled", body = Cancelled),
        (status = 400, description = "a body that is not the object documented", body = ErrorBody),
        (status = 404, description = "unknown task", body = ErrorBody),
        (status = 409, description = "already finished", body = ErrorBody),
        (status = 413, description = "body over 1 MiB", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn cancel(
    State(s): State<Services>,
    who: Principal,
    task_id: Result<Path<String>, PathRejection>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Answer {
    let Path(task_id) = task_id?;
    let body = body?;
    // The body is optional (absent, empty or `null`); when present it must be the JSON object documented.
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        let body = serde_json::from_slice::<Option<CancelBody>>(&body)
            .map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
        body.unwrap_or_default().reason
    };
    let answer = s.tasks.cancel(who.request(CancelTaskRequest { task_id, reason })).await?.into_inner();
    ok(Cancelled { cancelled: answer.cancelled })
}

#[utoipa::path(post, path = "/api/v1/tasks/{task_id}/retry", tag = "tasks", summary = "Run a failed or cancelled task again",
    params(("task_id" = String, Path, min_length = 1)),
    responses(
        (status = 200, description = "the task, queued again", body = TaskBody),
        (status = 400, description = "a bad path", body = ErrorBody),
        (status = 404, description = "unknown task", body = ErrorBody),
        (status = 409, description = "not failed or cancelled", body = ErrorBody),
        (status = 429, description = "the task queue is full; retry later", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn retry(
    State(s): State<Services>,
    who: Principal,
    task_id: Result<Path<String>, PathRejection>,
) -> Answer {
    let Path(task_id) = task_id?;
    let view = s.tasks.retry(who.request(RetryTaskRequest { task_id })).await?.into_inner();
    ok(TaskBody::from(&view))
}

/// One server-sent event as the stream carries it.
#[derive(ToSchema)]
#[allow(dead_code)] // only its schema is used: axum writes the events
pub struct ServerSentEvent {
    /// `task` (`data`: a `TaskEventBody` in JSON) or `error` (`data`: `{"code", "message"}`, the
    /// stream's last event).
    #[schema(pattern = "^(task|error)$")]
    event: String,
    /// The event in JSON.
    data: String,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Also the events of its children (a planned task's subtasks).
    children: Option<bool>,
}

/// One server-sent event `task`: gRPC's `TaskEvent` with `state` as a word.
#[derive(Serialize, ToSchema)]
pub struct TaskEventBody {
    task_id: String,
    #[schema(value_type = TaskState)]
    state: &'static str,
    attempt: u32,
    node_id: u64,
    progress_percent: u32,
    progress_message: String,
    cause: String,
    result: String,
    /// The applied log index the event was seen at.
    applied_index: u64,
    /// The watched task is finished: the stream ends after this event.
    finished: bool,
}

impl From<&TaskEvent> for TaskEventBody {
    fn from(e: &TaskEvent) -> Self {
        Self {
            task_id: e.task_id.clone(),
            state: state_name(e.state),
            attempt: e.attempt,
            node_id: e.node_id,
            progress_percent: e.progress_percent,
            progress_message: e.progress_message.clone(),
            cause: e.cause.clone(),
            result: e.result.clone(),
            applied_index: e.applied_index,
            finished: e.finished,
        }
    }
}

#[utoipa::path(get, path = "/api/v1/tasks/{task_id}/events", tag = "tasks",
    summary = "The task's events as server-sent events until it finishes",
    description = "Each event is `event: task` with `data:` a `TaskEventBody` in JSON; a store failure ends the stream with `event: error` (`{\"code\", \"message\"}`).",
    params(("task_id" = String, Path, min_length = 1), EventsQuery),
    responses(
        (status = 200, description = "the event stream", content_type = "text/event-stream", body = ServerSentEvent),
        (status = 400, description = "a bad query", body = ErrorBody),
        (status = 404, description = "unknown task", body = ErrorBody),
        (status = 429, description = "too many open streams on this node; retry later", body = ErrorBody),
        (status = 500, description = "a bug; please report it", body = ErrorBody),
        (status = 503, description = "no leader reachable; retry", body = ErrorBody),
    ))]
pub(crate) async fn events(
    State(s): State<Services>,
    who: Principal,
    task_id: Result<Path<String>, PathRejection>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Answer {
    let Path(task_id) = task_id?;
    let Query(q) = query?;
    let request = WatchTaskRequest { task_id, include_children: q.children.unwrap_or(false) };
    let stream = s.tasks.watch(who.request(request)).await?.into_inner();
    let events = stream.map(|item| {
        let event = match item {
            Ok(e) => {
                Event::default().event("task").data(serde_json::to_string(&TaskEventBody::from(&e)).unwrap_or_default())
            }
            Err(status) => Event::default()
                .event("error")
                .data(serde_json::json!({"code": status.code() as i32, "message": status.message()}).to_string()),
        };
        Ok::<_, std::convert::Infallible>(event)
    });
    Ok(Sse::new(events).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_task_is_the_command_lines_json_and_carries_every_grpc_field() {
        let view = TaskView {
            task_id: "t".into(),
            priority: 3,
            state: 4,
            description: "d".into(),
            idempotency_key: "k".into(),
            input: "i".into(),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            ..Default::default()
        };
        let rest = serde_json::to_value(TaskBody::from(&view)).expect("serialises");
        assert_eq!(rest, maos_client::views::task_json(&view));
        let fields = rest.as_object().map(|o| o.len()).unwrap_or(0);
        // TaskView's fields, counted from the message (tasks.proto).
        assert_eq!(fields, 27, "{rest}");
        assert_eq!((rest["priority"].as_str(), rest["state"].as_str()), (Some("high"), Some("COMPLETED")));
    }
}
