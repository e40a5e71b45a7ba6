//! The task service on port 8000: submit (optionally for planning), get, cancel, complete.

use std::sync::Arc;

use maos_client::proto::v1::task_service_server::TaskService;
use maos_client::proto::v1::{
    CancelTaskRequest, CancelTaskResponse, CompleteTaskRequest, CompleteTaskResponse, GetTaskRequest,
    Priority as WirePriority, SubmitTaskRequest, SubmitTaskResponse, TaskState as WireState, TaskView,
};
use maos_raft_store::tasks::{Priority, TaskCommand, TaskResponse, TaskSpec, TaskState};
use maos_raft_store::{Command, Response as Applied};
use tonic::{Request, Response, Status};

use crate::api::status_from;
use crate::core::NodeCore;

/// Attempt timeout when a submit leaves it unset.
const TIMEOUT_DEFAULT_MS: u64 = 3_600_000;

pub struct TaskApi {
    pub core: Arc<NodeCore>,
    /// The agent type that plans tasks submitted for planning (`task_planner.planner_type`).
    pub planner_type: String,
}

/// The task type that is always planned.
pub const MIXED_TYPE: &str = "mixed";

fn priority_from(wire: i32) -> Result<Priority, Status> {
    match WirePriority::try_from(wire) {
        Ok(WirePriority::Unspecified | WirePriority::Normal) => Ok(Priority::Normal),
        Ok(WirePriority::Low) => Ok(Priority::Low),
        Ok(WirePriority::High) => Ok(Priority::High),
        Ok(WirePriority::Critical) => Ok(Priority::Critical),
        Err(_) => Err(Status::invalid_argument(format!("priority: {wire} is not one of LOW, NORMAL, HIGH, CRITICAL"))),
    }
}

fn priority_to(priority: Priority) -> WirePriority {
    match priority {
        Priority::Low => WirePriority::Low,
        Priority::Normal => WirePriority::Normal,
        Priority::High => WirePriority::High,
        Priority::Critical => WirePriority::Critical,
    }
}

fn state_to(state: TaskState) -> WireState {
    match state {
        TaskState::Pending => WireState::Pending,
        TaskState::Queued => WireState::Queued,
        TaskState::Running => WireState::Running,
        TaskState::Completed => WireState::Completed,
        TaskState::Failed => WireState::Failed,
        TaskState::Cancelled => WireState::Cancelled,
    }
}

fn non_empty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn submit(&self, request: Request<SubmitTaskRequest>) -> Result<Response<SubmitTaskResponse>, Status> {
        let r = request.into_inner();
        let planner_type = (r.plan || r.task_type == MIXED_TYPE).then(|| self.planner_type.clone());
        let spec = TaskSpec {
            id: uuid::Uuid::now_v7().to_string(),
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
        };
        match self.core.write(Command::Task(TaskCommand::Submit { spec: Box::new(spec) })).await.map_err(status_from)? {
            Applied::Task(TaskResponse::Submitted { task_id, duplicate }) => {
                Ok(Response::new(SubmitTaskResponse { task_id, duplicate }))
            }
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    async fn get(&self, request: Request<GetTaskRequest>) -> Result<Response<TaskView>, Status> {
        let GetTaskRequest { task_id, stale } = request.into_inner();
        if !stale {
            self.core.read_barrier().await.map_err(status_from)?;
        }
        let state = self.core.state.read();
        let task = state
            .app
            .tasks
            .tasks
            .get(&task_id)
            .ok_or_else(|| Status::not_found(format!("task_id: task {task_id:?} does not exist")))?;
        let lease = task.lease.as_ref();
        Ok(Response::new(TaskView {
            task_id: task.spec.id.clone(),
            task_type: task.spec.task_type.clone(),
            priority: priority_to(task.spec.priority) as i32,
            state: state_to(task.state) as i32,
            attempt: task.attempt,
            result: task.result.clone().unwrap_or_default(),
            cause: task.cause.clone().unwrap_or_default(),
            slot: lease.map(|l| l.slot.clone()).unwrap_or_default(),
            node_id: lease.map(|l| l.node_id).unwrap_or(0),
            fencing_token: lease.map(|l| l.token).unwrap_or(0),
            depends_on: task.spec.depends_on.clone(),
            parent: task.spec.parent.clone().unwrap_or_default(),
            submitter: task.spec.submitter.clone(),
            children: state.app.tasks.children.get(&task_id).map(|c| c.iter().cloned().collect()).unwrap_or_default(),
            planning: task.spec.planner_type.is_some(),
            expanded: task.expanded,
            checkpoint: task.checkpoint.as_ref().map(|c| c.data.clone()).unwrap_or_default(),
            checkpoint_attempt: task.checkpoint.as_ref().map(|c| c.attempt).unwrap_or(0),
            progress_percent: task.progress.as_ref().map(|p| u32::from(p.percent)).unwrap_or(0),
            progress_message: task.progress.as_ref().map(|p| p.message.clone()).unwrap_or_default(),
            input_tokens: task.usage.input_tokens,
            output_tokens: task.usage.output_tokens,
            max_retries: task.spec.max_retries,
        }))
    }

    async fn complete(&self, request: Request<CompleteTaskRequest>) -> Result<Response<CompleteTaskResponse>, Status> {
        let CompleteTaskRequest { task_id, fencing_token, result } = request.into_inner();
        let command = Command::Task(TaskCommand::Complete { task_id, token: fencing_token, result });
        match self.core.write(command).await.map_err(status_from)? {
            Applied::Task(TaskResponse::Completed) => Ok(Response::new(CompleteTaskResponse {})),
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    async fn cancel(&self, request: Request<CancelTaskRequest>) -> Result<Response<CancelTaskResponse>, Status> {
        let CancelTaskRequest { task_id, reason } = request.into_inner();
        let reason = non_empty(reason).unwrap_or_else(|| "cancelled by a client".into());
        match self.core.write(Command::Task(TaskCommand::Cancel { task_id, reason })).await.map_err(status_from)? {
            Applied::Task(TaskResponse::Cancelled { tasks }) => {
                Ok(Response::new(CancelTaskResponse { cancelled: tasks }))
            }
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }
}
