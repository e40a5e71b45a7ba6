//! The task service on port 8000: submit (one or a batch, optionally for planning), get, list,
//! results, watch, cancel, retry, complete.
//!
//! Input is checked here before it costs a log entry, and refusals name the field: an unknown
//! task type (no agent of any node or worker serves it), a bad priority, an oversized or empty
//! field, unknown or duplicate dependencies. The state machine checks again on apply.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use maos_client::proto::v1::task_service_server::TaskService;
use maos_client::proto::v1::{
    BatchSubmitItem, BatchSubmitRequest, BatchSubmitResponse, CancelTaskRequest, CancelTaskResponse, ChildResult,
    CompleteTaskRequest, CompleteTaskResponse, GetTaskRequest, ListTasksRequest, ListTasksResponse, RetryTaskRequest,
    SubmitTaskRequest, SubmitTaskResponse, TaskEvent, TaskResults, TaskView, WatchTaskRequest,
};
use maos_raft_store::runtime::MaosRuntime;
use maos_raft_store::tasks::{
    check_spec, Task, TaskCommand, TaskResponse, TaskSpec, TaskState, TaskTable, PLAN_KEY_LABEL,
};
use maos_raft_store::{Command, Response as Applied};
use openraft::AsyncRuntime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::api::principal::{principal_in, Principal};
use crate::api::status::{invalid, status_from, status_of_rejection, storage_status};
use crate::api::streams::{next_poll, stream_permit};
use crate::api::views::{event, fill_view, fingerprint, priority_from, state_from, state_to, task_view, Fingerprint};
use crate::raft::core::NodeCore;
use crate::storage::{ResultRef, Storage, TaskPayloads};
use crate::telemetry::traces;

/// A new task id: a UUIDv7 from this node's clock and its runtime's random source, which a
/// simulation seeds, so a simulated run replays with the same ids.
fn new_task_id(now_ms: u64) -> String {
    let bytes: [u8; 10] = rand::Rng::gen(&mut <MaosRuntime as AsyncRuntime>::thread_rng());
    uuid::Builder::from_unix_timestamp_millis(now_ms, &bytes).into_uuid().to_string()
}

/// Attempt timeout when a submit leaves it unset.
const TIMEOUT_DEFAULT_MS: u64 = 3_600_000;
/// Tasks in one batch submit, at most.
pub const BATCH_SUBMIT_MAX: usize = 1_000;
/// Tasks in one list page: the default and the most.
const PAGE_SIZE_DEFAULT: usize = 100;
pub const PAGE_SIZE_MAX: usize = 1_000;
/// Events queued on one watch before the server waits for the client to read.
const WATCH_QUEUE: usize = 64;
/// How long a watch waits for the task-data store to return before it ends with UNAVAILABLE.
const WATCH_STORE_WAIT: Duration = Duration::from_secs(30);
/// Children one watch follows, at most.
const WATCH_CHILDREN_MAX: usize = 256;

pub struct TaskApi {
    pub core: Arc<NodeCore>,
    /// Where inputs and results live (the replicated state, or PostgreSQL).
    pub storage: Arc<Storage>,
    /// The agent type that plans tasks submitted for planning (`task_planner.planner_type`).
    pub planner_type: String,
    /// `scheduler.accept_unserved_types`.
    pub accept_unserved_types: bool,
    /// Open streams (task and key watches, worker assignments) on this node, bounded.
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// The task type that is always planned.
pub const MIXED_TYPE: &str = "mixed";

/// Who made a request, for the audit log: its principal, or with auth off its peer address.
pub fn principal_of<T>(request: &Request<T>) -> String {
    let principal = principal_in(request.extensions());
    if principal != Principal::anonymous() {
        return principal.id;
    }
    crate::transport::PeerAddr::of(request.extensions())
        .map(|a| format!("peer {a}"))
        .unwrap_or_else(|| "peer unknown".into())
}

/// Hide what `principal` may not see of a task: the lease's fencing token, unless it is an
/// operator or admin.
fn redact(principal: &Principal, view: &mut TaskView) {
    if !principal.sees_fencing_tokens() {
        view.fencing_token = 0;
    }
}

/// The submitter a task records: the authenticated principal; with auth off what the client
/// claims (or `anonymous`). Fairness across submitters uses it. The claimed value is checked
/// (`spec_from`) either way, so a request the document forbids is refused with auth on too.
fn submitter_for(principal: &Principal, claimed: String) -> String {
    if *principal == Principal::anonymous() {
        claimed
    } else {
        principal.id.clone()
    }
}

/// A name of an agent type: 1..=64 characters of A-Z a-z 0-9 - _ . (what workers register and
/// `agents.types` accept), so a task of another type could never be served.
pub fn valid_type_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Identifiers a person types (idempotency keys, submitters): at most 128 printable ASCII
/// characters, so a length in characters is one in bytes.
fn check_identifier(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > 128 || !value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(invalid(format!("{field}: at most 128 printable ASCII characters (space to ~)")));
    }
    Ok(())
}

/// A refusal of `code` that names `field`, with the `google.rpc.BadRequest` detail programs read.
fn refused_field(code: tonic::Code, field: &str, message: String) -> Status {
    let details = tonic_types::ErrorDetails::with_bad_request_violation(field, message.clone());
    <Status as tonic_types::StatusExt>::with_error_details(code, format!("{field}: {message}"), details)
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

impl TaskApi {
    /// A principal that sees only its own tasks (a submitter) gets NOT_FOUND for another's, as
    /// for a task that does not exist, so ids cannot be probed.
    fn check_owner(&self, principal: &Principal, task_id: &str) -> Result<(), Status> {
        if principal.sees_all_tasks() || *principal == Principal::anonymous() {
            return Ok(());
        }
        let state = self.core.state.read();
        match state.app.tasks.tasks.get(task_id) {
            Some(task) if task.spec.submitter == principal.id => Ok(()),
            _ => Err(Status::not_found(format!("no task {task_id} submitted by {}", principal.id))),
        }
    }

    /// A submit request as a spec, checked without the state, and the input to stage in the
    /// task-data store (empty when the spec carries it).
    fn spec_from(&self, r: SubmitTaskRequest) -> Result<(TaskSpec, String), Status> {
        if !valid_type_name(&r.task_type) {
            return Err(invalid("task_type: 1..=64 characters of A-Z a-z 0-9 - _ . (an agent type's name)"));
        }
        check_identifier("idempotency_key", &r.idempotency_key)?;
        check_identifier("submitter", &r.submitter)?;
        let planner_type = (r.plan || r.task_type == MIXED_TYPE).then(|| self.planner_type.clone());
        let spec = TaskSpec {
            id: new_task_id((self.core.clock)()),
            task_type: r.task_type,
            priority: priority_from(r.priority)?,
            description: r.description,
            input: r.input,
            depends_on: r.depends_on,
            parent: non_empty(r.parent),
            max_retries: r.max_retries,
            timeout_ms: if r.timeout_ms == 0 { TIMEOUT_DEFAULT_MS } else { r.timeout_ms },
            idempotency_key: non_empty(r.idempotency_key),
            submitter: non_empty(r.submitter).unwrap_or_else(|| "anonymous".into()),
            labels: r.labels.into_iter().collect(),
            capabilities: r.capabilities.into_iter().collect(),
            planner_type,
            max_agents: (r.max_agents > 0).then_some(r.max_agents),
            input_stored: false,
            trace_parent: crate::telemetry::traces::current_traceparent(),
        };
        let mut spec = spec;
        self.storage.check_payload("input", &spec.input).map_err(|e| storage_status(&e))?;
        let staged = if self.storage.is_embedded() { String::new() } else { std::mem::take(&mut spec.input) };
        check_spec(&spec).map_err(|rejection| status_of_rejection(rejection.into()))?;
        let state = self.core.state.read();
        let table = &state.app.tasks;
        let routing = spec.routing_type();
        if !self.accept_unserved_types && !table.slots.values().any(|slot| slot.agent_type == routing) {
            let mut known: Vec<&str> = table.slots.values().map(|s| s.agent_type.as_str()).collect();
            known.dedup();
            known.sort_unstable();
            known.dedup();
            let field = if spec.planner_type.is_some() {
                "task_type (planner: task_planner.planner_type)"
            } else {
                "task_type"
            };
            // The state, not the request, is at fault: FAILED_PRECONDITION (REST 409).
            return Err(refused_field(
                tonic::Code::FailedPrecondition,
                field,
                format!(
                    "no agent serves type {routing:?} (served: {}); configure agents.types on a node or register a worker for it",
                    known.join(", ")
                ),
            ));
        }
        // Tasks a submit names must exist: NOT_FOUND (REST 404), as for any unknown task.
        if let Some(missing) = spec.depends_on.iter().find(|d| !table.tasks.contains_key(*d)) {
            return Err(refused_field(
                tonic::Code::NotFound,
                "depends_on",
                format!("task {missing:?} does not exist; submit it first"),
            ));
        }
        if let Some(parent) = spec.parent.as_ref().filter(|p| !table.tasks.contains_key(*p)) {
            return Err(refused_field(tonic::Code::NotFound, "parent", format!("task {parent:?} does not exist")));
        }
        Ok((spec, staged))
    }

    /// Submit one task: its input to the task-data store first, then its Raft entry, so an
    /// acknowledged task's data is durable. An input whose entry never commits is unreachable
    /// and swept (`storage::projector`); it is not deleted here, because a failed write may
    /// still commit.
    /// Submit one task as `principal` (the submitter it records; see [`submitter_for`]).
    async fn submit_one(
        &self,
        request: SubmitTaskRequest,
        principal: &Principal,
    ) -> Result<SubmitTaskResponse, Status> {
        if !traces::enabled() {
            return self.submit_spec(request, principal).await;
        }
        // The task keeps this span's context: its proposal, assignment and attempts join it.
        let span = tracing::info_span!(target: traces::TARGET, "submit", task_type = %request.task_type, task_id = tracing::field::Empty);
        let submitted = self.submit_spec(request, principal).instrument(span.clone()).await;
        if let Ok(answer) = &submitted {
            span.record("task_id", answer.task_id.as_str());
        }
        submitted
    }

    async fn submit_spec(
        &self,
        request: SubmitTaskRequest,
        principal: &Principal,
    ) -> Result<SubmitTaskResponse, Status> {
        let (mut spec, staged) = self.spec_from(request)?;
        spec.submitter = submitter_for(principal, std::mem::take(&mut spec.submitter));
        let our_id = spec.id.clone();
        if !staged.is_empty() {
            spec.input_stored = self.storage.stage_input(&spec.id, &staged).await.map_err(|e| storage_status(&e))?;
            if !spec.input_stored {
                spec.input = staged;
            }
        }
        let stored = spec.input_stored;
        match self.core.write(Command::Task(TaskCommand::Submit { spec: Box::new(spec) })).await.map_err(status_from)? {
            Applied::Task(TaskResponse::Submitted { task_id, duplicate }) => {
                if stored && task_id != our_id {
                    // The first submit's task stands, with its own input (a repeated
                    // idempotency key, or a resend answered from the caller's session).
                    self.storage.discard_input(&our_id).await;
                }
                Ok(SubmitTaskResponse { task_id, duplicate })
            }
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    /// Fill the payloads the store holds into `views` (inputs, results, checkpoints).
    async fn fill_views(&self, views: &mut [(TaskView, TaskPayloads)]) -> Result<(), Status> {
        let mut wanted = Vec::new();
        views.iter().for_each(|(_, payloads)| payloads.wanted(&mut wanted));
        if wanted.is_empty() {
            return Ok(());
        }
        let fetched = self.storage.fetch(wanted).await.map_err(|e| storage_status(&e))?;
        for (view, payloads) in views.iter_mut() {
            fill_view(view, payloads, &fetched);
        }
        Ok(())
    }

    fn not_found(task_id: &str) -> Status {
        Status::not_found(format!("task_id: task {task_id:?} does not exist"))
    }

    /// NOT_FOUND for a task this node does not hold: where finished tasks may have been evicted
    /// (`tasks.retention`) the message says so, and how to keep them readable.
    fn missing(&self, table: &TaskTable, task_id: &str) -> Status {
        if !table.may_have_evicted(task_id) {
            return Self::not_found(task_id);
        }
        let keep = if self.storage.is_embedded() {
            "configure database.primary_url to keep finished tasks readable after that"
        } else {
            "PostgreSQL holds no finished record of it either"
        };
        Status::not_found(format!(
            "task_id: task {task_id:?} is not held: finished tasks are evicted from the replicated state after tasks.retention (or once more than tasks.retained_max are held), and this one was evicted or never existed; {keep}"
        ))
    }

    /// The table to read `task_id` from: the applied state when it holds the task, else (with
    /// PostgreSQL) the evicted task's record and its children's read back from the mirror.
    async fn evicted(&self, task_id: &str) -> Result<TaskTable, Status> {
        let missing = self.missing(&self.core.state.read().app.tasks, task_id);
        self.storage.evicted_table(task_id).await.map_err(|e| storage_status(&e))?.ok_or(missing)
    }

    /// The view of `task_id` as this node has applied it (or, evicted, as PostgreSQL kept it),
    /// with its stored payloads.
    async fn view_of(&self, task_id: &str) -> Result<TaskView, Status> {
        let held = {
            let state = self.core.state.read();
            let table = &state.app.tasks;
            table.tasks.get(task_id).map(|task| [(task_view(table, task), TaskPayloads::of(table, task))])
        };
        let mut one = match held {
            Some(one) => one,
            None => {
                let table = self.evicted(task_id).await?;
                let task = table.tasks.get(task_id).ok_or_else(|| Self::not_found(task_id))?;
                [(task_view(&table, task), TaskPayloads::of(&table, task))]
            }
        };
        self.fill_views(&mut one).await?;
        let [(view, _)] = one;
        Ok(view)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send>>;

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn submit(&self, request: Request<SubmitTaskRequest>) -> Result<Response<SubmitTaskResponse>, Status> {
        let principal = principal_in(request.extensions());
        Ok(Response::new(self.submit_one(request.into_inner(), &principal).await?))
    }

    async fn batch_submit(
        &self,
        request: Request<BatchSubmitRequest>,
    ) -> Result<Response<BatchSubmitResponse>, Status> {
        let principal = principal_in(request.extensions());
        let tasks = request.into_inner().tasks;
        if tasks.is_empty() {
            return Err(invalid("tasks: a batch holds 1..=1000 tasks"));
        }
        if tasks.len() > BATCH_SUBMIT_MAX {
            return Err(Status::resource_exhausted(format!(
                "tasks: {} in one batch, over the limit of {BATCH_SUBMIT_MAX}; split it",
                tasks.len()
            )));
        }
        // Concurrent writes: the proposer batches them into few log entries.
        let answers = futures::future::join_all(tasks.into_iter().map(|task| self.submit_one(task, &principal))).await;
        let results = answers
            .into_iter()
            .map(|answer| match answer {
                Ok(SubmitTaskResponse { task_id, duplicate }) => {
                    BatchSubmitItem { task_id, duplicate, ..Default::default() }
                }
                Err(status) => BatchSubmitItem {
                    error: status.message().to_string(),
                    code: status.code() as i32,
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(BatchSubmitResponse { results }))
    }

    async fn get(&self, request: Request<GetTaskRequest>) -> Result<Response<TaskView>, Status> {
        let principal = principal_in(request.extensions());
        let GetTaskRequest { task_id, stale } = request.into_inner();
        if !stale {
            self.core.read_barrier().await.map_err(status_from)?;
        }
        self.check_owner(&principal, &task_id)?;
        let mut view = self.view_of(&task_id).await?;
        redact(&principal, &mut view);
        Ok(Response::new(view))
    }

    async fn list(&self, request: Request<ListTasksRequest>) -> Result<Response<ListTasksResponse>, Status> {
        let principal = principal_in(request.extensions());
        let mut r = request.into_inner();
        if !principal.sees_all_tasks() {
            // A submitter lists its own tasks only.
            r.submitter = principal.id.clone();
        }
        let states: Vec<TaskState> = r.states.iter().map(|s| state_from(*s)).collect::<Result<_, _>>()?;
        let page_size = match r.page_size as usize {
            0 => PAGE_SIZE_DEFAULT,
            n if n > PAGE_SIZE_MAX => {
                return Err(invalid(format!("page_size: at most {PAGE_SIZE_MAX}")));
            }
            n => n,
        };
        if !r.stale {
            self.core.read_barrier().await.map_err(status_from)?;
        }
        let mut page = Vec::new();
        let mut next_page_token = String::new();
        {
            let state = self.core.state.read();
            let table = &state.app.tasks;
            let start = match r.page_token.as_str() {
                "" => std::ops::Bound::Unbounded,
                token => std::ops::Bound::Excluded(token.to_string()),
            };
            for (id, task) in table.tasks.range((start, std::ops::Bound::Unbounded)) {
                let wanted = (states.is_empty() || states.contains(&task.state))
                    && (r.task_type.is_empty() || task.spec.task_type == r.task_type)
                    && (r.parent.is_empty() || task.spec.parent.as_deref() == Some(r.parent.as_str()))
                    && (r.submitter.is_empty() || task.spec.submitter == r.submitter);
                if !wanted {
                    continue;
                }
                if page.len() == page_size {
                    next_page_token =
                        page.last().map(|(t, _): &(TaskView, TaskPayloads)| t.task_id.clone()).unwrap_or_default();
                    break;
                }
                page.push((task_view(table, task), TaskPayloads::of(table, task)));
                let _ = id;
            }
        }
        self.fill_views(&mut page).await?;
        let tasks = page
            .into_iter()
            .map(|(mut view, _)| {
                redact(&principal, &mut view);
                view
            })
            .collect();
        Ok(Response::new(ListTasksResponse { tasks, next_page_token }))
    }

    async fn results(&self, request: Request<GetTaskRequest>) -> Result<Response<TaskResults>, Status> {
        let principal = principal_in(request.extensions());
        let GetTaskRequest { task_id, stale } = request.into_inner();
        if !stale {
            self.core.read_barrier().await.map_err(status_from)?;
        }
        self.check_owner(&principal, &task_id)?;
        let held = results_of(&self.core.state.read().app.tasks, &task_id);
        let (mut results, mut children, refs) = match held {
            Some(held) => held,
            None => {
                let table = self.evicted(&task_id).await?;
                results_of(&table, &task_id).ok_or_else(|| Self::not_found(&task_id))?
            }
        };
        let mut wanted = Vec::new();
        refs.iter().for_each(|r| r.wanted(&mut wanted));
        let fetched = self.storage.fetch(wanted).await.map_err(|e| storage_status(&e))?;
        let mut resolved = refs.iter().map(|r| r.resolve(&fetched).unwrap_or_default());
        results.result = resolved.next().unwrap_or_default();
        for (child, result) in children.iter_mut().zip(resolved) {
            child.result = result;
        }
        results.children = children;
        Ok(Response::new(results))
    }

    type WatchStream = EventStream;

    async fn watch(&self, request: Request<WatchTaskRequest>) -> Result<Response<EventStream>, Status> {
        let principal = principal_in(request.extensions());
        let WatchTaskRequest { task_id, include_children } = request.into_inner();
        self.core.read_barrier().await.map_err(status_from)?;
        self.check_owner(&principal, &task_id)?;
        if !self.core.state.read().app.tasks.tasks.contains_key(&task_id) {
            // Evicted: with PostgreSQL its final state is its only event left.
            let table = self.evicted(&task_id).await?;
            let task = table.tasks.get(&task_id).ok_or_else(|| Self::not_found(&task_id))?;
            let applied = self.core.state.read().last_applied.map(|id| id.index).unwrap_or(0);
            let (mut last, result) = (event(task, applied, true), ResultRef::of(&table, task));
            let mut wanted = Vec::new();
            result.wanted(&mut wanted);
            last.result =
                result.resolve(&self.storage.fetch(wanted).await.map_err(|e| storage_status(&e))?).unwrap_or_default();
            return Ok(Response::new(Box::pin(tokio_stream::iter([Ok(last)]))));
        }
        let permit = stream_permit(&self.streams)?;
        let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
        let core = self.core.clone();
        let storage = self.storage.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut seen: BTreeMap<String, Fingerprint> = BTreeMap::new();
            let mut changes = core.raft.metrics();
            loop {
                let (events, finished) = {
                    let state = core.state.read();
                    let table = &state.app.tasks;
                    let applied = state.last_applied.map(|id| id.index).unwrap_or(0);
                    let Some(root) = table.tasks.get(&task_id) else { return };
                    let finished = root.state.is_terminal();
                    let mut watched: Vec<&Task> = Vec::new();
                    if include_children {
                        let children = table.children.get(&task_id).into_iter().flatten().take(WATCH_CHILDREN_MAX);
                        watched.extend(children.filter_map(|id| table.tasks.get(id).map(|t| &**t)));
                        // Changes seen in one poll go out in the order they happened.
                        watched.sort_by_key(|t| t.updated_at_ms);
                    }
                    // The watched task last, so its final event ends the stream.
                    watched.push(root);
                    let mut events = Vec::new();
                    for task in watched {
                        let print = fingerprint(task);
                        if seen.get(&task.spec.id) != Some(&print) {
                            let last = finished && task.spec.id == task_id;
                            events.push((event(task, applied, last), ResultRef::of(table, task)));
                            seen.insert(task.spec.id.clone(), print);
                        }
                    }
                    (events, finished)
                };
                let mut wanted = Vec::new();
                events.iter().for_each(|(_, result)| result.wanted(&mut wanted));
                let deadline = tokio::time::Instant::now() + WATCH_STORE_WAIT;
                let fetched = match storage.fetch_retrying(wanted, deadline).await {
                    Ok(fetched) => fetched,
                    Err(error) => {
                        let _ = sender.send(Err(storage_status(&error))).await;
                        return;
                    }
                };
                for (mut event, result) in events {
                    if let ResultRef::Inline(_) = result {
                    } else {
                        event.result = result.resolve(&fetched).unwrap_or_default();
                    }
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if finished {
                    return;
                }
                if !next_poll(&mut changes, &sender).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn retry(&self, request: Request<RetryTaskRequest>) -> Result<Response<TaskView>, Status> {
        let principal = principal_of(&request);
        let task_id = request.into_inner().task_id;
        if task_id.is_empty() {
            return Err(invalid("task_id: must name a task"));
        }
        self.core.write(Command::Task(TaskCommand::Retry { task_id: task_id.clone() })).await.map_err(status_from)?;
        self.storage.audit(self.core.id, &principal, "task.retry", &task_id, serde_json::json!({}));
        self.core.read_barrier().await.map_err(status_from)?;
        Ok(Response::new(self.view_of(&task_id).await?))
    }

    async fn complete(&self, request: Request<CompleteTaskRequest>) -> Result<Response<CompleteTaskResponse>, Status> {
        let CompleteTaskRequest { task_id, fencing_token, result } = request.into_inner();
        let command = self
            .storage
            .complete_command(&self.core.state, &task_id, fencing_token, result)
            .await
            .map_err(|e| storage_status(&e))?;
        match self.core.write(Command::Task(command)).await.map_err(status_from)? {
            Applied::Task(TaskResponse::Completed) => Ok(Response::new(CompleteTaskResponse {})),
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    async fn cancel(&self, request: Request<CancelTaskRequest>) -> Result<Response<CancelTaskResponse>, Status> {
        let principal = principal_of(&request);
        self.check_owner(&principal_in(request.extensions()), &request.get_ref().task_id)?;
        let CancelTaskRequest { task_id, reason } = request.into_inner();
        let reason = non_empty(reason).unwrap_or_else(|| "cancelled by a client".into());
        let command = TaskCommand::Cancel { task_id: task_id.clone(), reason: reason.clone() };
        match self.core.write(Command::Task(command)).await.map_err(status_from)? {
            Applied::Task(TaskResponse::Cancelled { tasks }) => {
                let detail = serde_json::json!({ "reason": reason, "cancelled": tasks });
                self.storage.audit(self.core.id, &principal, "task.cancel", &task_id, detail);
                Ok(Response::new(CancelTaskResponse { cancelled: tasks }))
            }
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }
}

/// What `Results` answers for `task_id` from `table` (results not yet fetched), and where each
/// result comes from: the task's first, then its children's in order. `None`: not in `table`.
fn results_of(table: &TaskTable, task_id: &str) -> Option<(TaskResults, Vec<ChildResult>, Vec<ResultRef>)> {
    let task = table.tasks.get(task_id)?;
    let mut refs = vec![ResultRef::of(table, task)];
    let children: Vec<ChildResult> = table
        .children
        .get(task_id)
        .into_iter()
        .flatten()
        .filter_map(|id| table.tasks.get(id))
        .map(|child| {
            refs.push(ResultRef::of(table, child));
            ChildResult {
                task_id: child.spec.id.clone(),
                plan_key: child.spec.labels.get(PLAN_KEY_LABEL).cloned().unwrap_or_default(),
                state: state_to(child.state) as i32,
                result: String::new(),
                cause: child.cause.clone().unwrap_or_default(),
            }
        })
        .collect();
    let results = TaskResults {
        task_id: task_id.to_string(),
        state: state_to(task.state) as i32,
        result: String::new(),
        cause: task.cause.clone().unwrap_or_default(),
        children: Vec::new(),
    };
    Some((results, children, refs))
}
