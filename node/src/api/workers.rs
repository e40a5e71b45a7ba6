//! The worker service: external workers register agent slots under their own holder id (at
//! least `WORKER_ID_MIN`, derived from the worker's name), take assignments from a stream,
//! heartbeat with the same batched `Renew` a node sends, and report with the lease's token.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use maos_client::proto::v1::worker_service_server::WorkerService;
use maos_client::proto::v1::{
    Assignment, AssignmentsRequest, HeartbeatRequest, HeartbeatResponse, RegisterWorkerRequest, RegisterWorkerResponse,
    ReportProgressRequest, SaveCheckpointRequest, SubmitPlanRequest, SubmitPlanResponse, WorkerAck,
    WorkerCompleteRequest, WorkerFailRequest,
};
use maos_raft_store::tasks::{
    AgentState, PlannedTask, Slot, TaskCommand, TaskId, TaskResponse, TaskTable, TokenUsage, WORKER_ID_MIN,
};
use maos_raft_store::{Command, Response as Applied};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agents::envelope::{ApiAccess, Envelope};
use crate::agents::{envelope_for, load_envelope};
use crate::api::status::{invalid, status_from, storage_status};
use crate::api::streams::stream_permit;
use crate::config::Config;
use crate::raft::core::NodeCore;
use crate::storage::{EnvelopeNeeds, Storage};

/// Agent types one worker registers, at most.
const WORKER_TYPES_MAX: usize = 16;
/// Slots of one type one worker registers, at most.
const WORKER_SLOTS_MAX: u32 = 64;
/// The longest a stream waits before looking at the state again without being woken.
const STREAM_POLL: Duration = Duration::from_millis(50);

pub struct WorkerApi {
    pub core: Arc<NodeCore>,
    /// Where results and checkpoints go, and assignments' stored data comes from.
    pub storage: Arc<Storage>,
    pub config: Config,
    /// Ends open assignment streams when the node stops.
    pub stopped: tokio::sync::watch::Receiver<bool>,
    /// Shared with the task and key watches: open streams on this node.
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// A worker's holder id: stable for its name, and never a node id.
pub fn worker_id(name: &str) -> u64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    WORKER_ID_MIN | (u64::from_be_bytes(bytes) & (WORKER_ID_MIN - 1))
}

fn valid_name(name: &str) -> bool {
    crate::api::tasks::valid_type_name(name)
}

fn check_worker(table: &TaskTable, worker_id: u64) -> Result<(), Status> {
    if worker_id < WORKER_ID_MIN || !table.slots.values().any(|s| s.node_id == worker_id) {
        return Err(Status::not_found(format!(
            "worker_id: {worker_id} is not a registered worker; call Register first"
        )));
    }
    Ok(())
}

impl WorkerApi {
    async fn apply(&self, command: TaskCommand) -> Result<Applied, Status> {
        self.core.write(Command::Task(command)).await.map_err(status_from)
    }
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<Assignment, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let RegisterWorkerRequest { name, agent_types } = request.into_inner();
        if !valid_name(&name) {
            return Err(invalid("name: 1..=64 characters of A-Z a-z 0-9 - _ ."));
        }
        if agent_types.is_empty() || agent_types.len() > WORKER_TYPES_MAX {
            return Err(invalid(format!("agent_types: a worker serves 1..={WORKER_TYPES_MAX} types")));
        }
        let worker_id = worker_id(&name);
        let mut slots = BTreeMap::new();
        for (i, agent) in agent_types.iter().enumerate() {
            if !valid_name(&agent.agent_type) {
                return Err(invalid(format!("agent_types[{i}].agent_type: 1..=64 characters of A-Z a-z 0-9 - _ .")));
            }
            if agent.slots == 0 || agent.slots > WORKER_SLOTS_MAX {
                return Err(invalid(format!("agent_types[{i}].slots: must be in 1..={WORKER_SLOTS_MAX}")));
            }
            for n in 0..agent.slots {
                let slot = Slot {
                    node_id: worker_id,
                    agent_type: agent.agent_type.clone(),
                    capabilities: agent.capabilities.iter().cloned().collect(),
                    backend: "external".into(),
                    state: AgentState::Active,
                };
                slots.insert(format!("w:{name}/{}/{n}", agent.agent_type), slot);
            }
        }
        self.apply(TaskCommand::RegisterSlots { node_id: worker_id, slots }).await?;
        tracing::info!(worker = %name, worker_id, "external worker registered");
        Ok(Response::new(RegisterWorkerResponse {
            worker_id,
            lease_ms: self.config.scheduler.lease_ms,
            heartbeat_interval_ms: self.config.scheduler.lease_renew_interval_ms,
        }))
    }

    type AssignmentsStream = AssignmentStream;

    async fn assignments(&self, request: Request<AssignmentsRequest>) -> Result<Response<AssignmentStream>, Status> {
        let worker_id = request.into_inner().worker_id;
        self.core.read_barrier().await.map_err(status_from)?;
        check_worker(&self.core.state.read().app.tasks, worker_id)?;
        // `agents.defaults.batch_size`: assignments delivered ahead of the worker's reading.
        let (sender, receiver) = mpsc::channel(self.config.agents.defaults.batch_size.max(1));
        let core = self.core.clone();
        let storage = self.storage.clone();
        let checkpoint_interval_ms = self.config.system.checkpoint_interval.saturating_mul(1_000);
        let mut stopped = self.stopped.clone();
        let permit = stream_permit(&self.streams)?;
        tokio::spawn(async move {
            let _permit = permit;
            let mut sent: BTreeMap<TaskId, u64> = BTreeMap::new();
            let mut changes = core.raft.metrics();
            let no_api = |_: &str, _: u64| ApiAccess::default();
            loop {
                let now_ms = (core.clock)();
                let fresh: Vec<(Envelope, EnvelopeNeeds)> = {
                    let state = core.state.read();
                    let table = &state.app.tasks;
                    let mut held = BTreeMap::new();
                    let mut fresh = Vec::new();
                    for (slot_id, _) in table.slots.iter().filter(|(_, s)| s.node_id == worker_id) {
                        let Some(task_id) = table.slot_holder.get(slot_id) else { continue };
                        let Some(token) = table.tasks.get(task_id).and_then(|t| t.lease.as_ref()).map(|l| l.token)
                        else {
                            continue;
                        };
                        held.insert(task_id.clone(), token);
                        if sent.get(task_id) == Some(&token) {
                            continue;
                        }
                        if let Some(assignment) =
                            envelope_for(table, slot_id, task_id, now_ms, checkpoint_interval_ms, &no_api)
                        {
                            fresh.push(assignment);
                        }
                    }
                    sent.retain(|task_id, _| held.contains_key(task_id));
                    fresh
                };
                for (mut envelope, needs) in fresh {
                    let deadline = tokio::time::Instant::now() + STREAM_POLL;
                    if let Err(error) = load_envelope(&storage, &mut envelope, &needs, deadline).await {
                        // Not marked sent: the next look tries again.
                        tracing::debug!(task_id = %envelope.task_id, %error, "an assignment waits for the task-data store");
                        continue;
                    }
                    let assignment = Assignment {
                        task_id: envelope.task_id,
                        fencing_token: envelope.fencing_token,
                        attempt: envelope.attempt,
                        agent_id: envelope.agent_id,
                        task_type: envelope.task_type,
                        description: envelope.description,
                        input: envelope.input,
                        planning: envelope.planning,
                        dependency_results: envelope.dependency_results.into_iter().collect(),
                        checkpoint: envelope.checkpoint.map(|c| c.data).unwrap_or_default(),
                        timeout_ms: envelope.timeout_ms,
                        traceparent: envelope.trace_parent,
                    };
                    let (task_id, token) = (assignment.task_id.clone(), assignment.fencing_token);
                    if sender.send(Ok(assignment)).await.is_err() {
                        return;
                    }
                    sent.insert(task_id, token);
                }
                let raft_stopped = tokio::select! {
                    woken = tokio::time::timeout(STREAM_POLL, changes.changed()) => matches!(woken, Ok(Err(_))),
                    _ = sender.closed() => return,
                    _ = stopped.wait_for(|stop| *stop) => return,
                };
                if raft_stopped {
                    let _ = sender
                        .send(Err(Status::unavailable("the node is stopping; reconnect through another node")))
                        .await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let HeartbeatRequest { worker_id, leases } = request.into_inner();
        check_worker(&self.core.state.read().app.tasks, worker_id)?;
        let leases = leases.into_iter().map(|l| (l.task_id, l.fencing_token)).collect();
        let renew = TaskCommand::Renew { node_id: worker_id, leases, lease_ms: self.config.scheduler.lease_ms };
        match self.apply(renew).await? {
            Applied::Task(TaskResponse::Renewed { lost, .. }) => Ok(Response::new(HeartbeatResponse { lost })),
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    async fn report_progress(&self, request: Request<ReportProgressRequest>) -> Result<Response<WorkerAck>, Status> {
        let ReportProgressRequest { task_id, fencing_token, percent, message } = request.into_inner();
        let percent =
            u8::try_from(percent).ok().filter(|p| *p <= 100).ok_or_else(|| invalid("percent: must be in 0..=100"))?;
        self.apply(TaskCommand::ReportProgress { task_id, token: fencing_token, percent, message }).await?;
        Ok(Response::new(WorkerAck {}))
    }

    async fn save_checkpoint(&self, request: Request<SaveCheckpointRequest>) -> Result<Response<WorkerAck>, Status> {
        let SaveCheckpointRequest { task_id, fencing_token, data } = request.into_inner();
        let command = self
            .storage
            .checkpoint_command(&self.core.state, &task_id, fencing_token, data)
            .await
            .map_err(|e| storage_status(&e))?;
        self.apply(command).await?;
        Ok(Response::new(WorkerAck {}))
    }

    async fn complete(&self, request: Request<WorkerCompleteRequest>) -> Result<Response<WorkerAck>, Status> {
        let WorkerCompleteRequest { task_id, fencing_token, result, input_tokens, output_tokens } =
            request.into_inner();
        if input_tokens > 0 || output_tokens > 0 {
            let usage = TokenUsage { input_tokens, output_tokens };
            self.apply(TaskCommand::RecordUsage { task_id: task_id.clone(), token: fencing_token, usage }).await?;
        }
        let command = self
            .storage
            .complete_command(&self.core.state, &task_id, fencing_token, result)
            .await
            .map_err(|e| storage_status(&e))?;
        self.apply(command).await?;
        Ok(Response::new(WorkerAck {}))
    }

    async fn fail(&self, request: Request<WorkerFailRequest>) -> Result<Response<WorkerAck>, Status> {
        let WorkerFailRequest { task_id, fencing_token, error, retryable } = request.into_inner();
        self.apply(TaskCommand::Fail { task_id, token: fencing_token, error, retryable }).await?;
        Ok(Response::new(WorkerAck {}))
    }

    async fn submit_plan(&self, request: Request<SubmitPlanRequest>) -> Result<Response<SubmitPlanResponse>, Status> {
        let SubmitPlanRequest { task_id, fencing_token, subtasks } = request.into_inner();
        let subtasks = subtasks
            .into_iter()
            .map(|s| PlannedTask {
                key: s.key,
                task_type: s.task_type,
                description: s.description,
                input: s.input,
                depends_on: s.depends_on,
                capabilities: s.capabilities.into_iter().collect(),
            })
            .collect();
        match self.apply(TaskCommand::Expand { task_id, token: fencing_token, subtasks }).await? {
            Applied::Task(TaskResponse::Expanded { children, chained }) => {
                Ok(Response::new(SubmitPlanResponse { children, chained }))
            }
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }
}
