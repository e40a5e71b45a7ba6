//! External workers: agents that run outside the cluster, under the same leases and fencing.
//!
//! ```no_run
//! # async fn example() -> Result<(), maos_client::ClientError> {
//! use maos_client::{Client, Worker, WorkerAgentType};
//! let client = Client::new(["127.0.0.1:8000", "127.0.0.1:8001"])?;
//! let worker = Worker::register(client, "scraper-1", vec![WorkerAgentType::new("scraper", 4)]).await?;
//! worker
//!     .run(|assignment| async move { Ok(format!("scraped {}", assignment.input)) })
//!     .await
//! # }
//! ```
//!
//! [`Worker::run`] keeps one assignment stream open (reconnecting through any endpoint),
//! heartbeats every lease it holds once per interval (the heartbeat is also its liveness: a worker
//! that stops loses its leases, and its tasks are leased again elsewhere), runs each assignment's
//! handler, and completes or fails it with the lease's token. A lease reported lost stops its
//! handler.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tonic::Request;

use crate::proto::v1::worker_service_client::WorkerServiceClient;
use crate::proto::v1::{
    Assignment, AssignmentsRequest, HeartbeatRequest, LeaseRef, PlannedSubtask, RegisterWorkerRequest,
    ReportProgressRequest, SaveCheckpointRequest, SubmitPlanRequest, WorkerCompleteRequest, WorkerFailRequest,
};
use crate::{Client, ClientError};

pub use crate::proto::v1::Assignment as WorkerAssignment;

/// Pause before reopening a broken assignment stream.
const STREAM_RETRY: Duration = Duration::from_millis(200);

/// One agent type a worker serves.
#[derive(Debug, Clone)]
pub struct WorkerAgentType {
    pub agent_type: String,
    pub capabilities: Vec<String>,
    /// Attempts of this type run at once.
    pub slots: u32,
}

impl WorkerAgentType {
    pub fn new(agent_type: &str, slots: u32) -> Self {
        Self { agent_type: agent_type.into(), capabilities: Vec::new(), slots }
    }
}

/// A registered external worker.
pub struct Worker {
    client: Arc<Client>,
    worker_id: u64,
    heartbeat_interval: Duration,
}

/// Leases the worker holds: task → (token, handler).
type Held = Arc<Mutex<BTreeMap<String, (u64, JoinHandle<()>)>>>;

impl Worker {
    /// Register `name` (stable across restarts) serving `agent_types`.
    pub async fn register(client: Client, name: &str, agent_types: Vec<WorkerAgentType>) -> Result<Self, ClientError> {
        let request = RegisterWorkerRequest {
            name: name.to_string(),
            agent_types: agent_types
                .into_iter()
                .map(|t| crate::proto::v1::WorkerAgentType {
                    agent_type: t.agent_type,
                    capabilities: t.capabilities,
                    slots: t.slots,
                })
                .collect(),
        };
        let response = client
            .with_failover(|channel, remaining| {
                let mut request = Request::new(request.clone());
                client.prepare(&mut request, remaining);
                async move { Ok(WorkerServiceClient::new(channel).register(request).await?.into_inner()) }
            })
            .await?;
        Ok(Self {
            client: Arc::new(client),
            worker_id: response.worker_id,
            heartbeat_interval: Duration::from_millis(response.heartbeat_interval_ms.max(1)),
        })
    }

    pub fn id(&self) -> u64 {
        self.worker_id
    }

    /// Renew `leases` (task id, token); returns the tasks whose lease is gone.
    pub async fn heartbeat(&self, leases: &[(String, u64)]) -> Result<Vec<String>, ClientError> {
        let request = HeartbeatRequest {
            worker_id: self.worker_id,
            leases: leases
                .iter()
                .map(|(task_id, token)| LeaseRef { task_id: task_id.clone(), fencing_token: *token })
                .collect(),
        };
        heartbeat(&self.client, request).await
    }

    /// Report progress of an attempt.
    pub async fn report_progress(
        &self,
        task_id: &str,
        token: u64,
        percent: u32,
        message: &str,
    ) -> Result<(), ClientError> {
        let request =
            ReportProgressRequest { task_id: task_id.into(), fencing_token: token, percent, message: message.into() };
        self.client
            .with_failover(|channel, remaining| {
                let mut request = Request::new(request.clone());
                self.client.prepare(&mut request, remaining);
                async move { WorkerServiceClient::new(channel).report_progress(request).await.map(|_| ()) }
            })
            .await
    }

    /// Save an attempt's checkpoint: a retried attempt receives it.
    pub async fn save_checkpoint(&self, task_id: &str, token: u64, data: &str) -> Result<(), ClientError> {
        let request = SaveCheckpointRequest { task_id: task_id.into(), fencing_token: token, data: data.into() };
        self.client
            .with_failover(|channel, remaining| {
                let mut request = Request::new(request.clone());
                self.client.prepare(&mut request, remaining);
                async move { WorkerServiceClient::new(channel).save_checkpoint(request).await.map(|_| ()) }
            })
            .await
    }

    /// Run assignments with `handler` until the worker cannot reach the cluster within a call
    /// deadline. `Ok(result)` completes the task, `Err(error)` fails the attempt (retryably).
    /// For a planning assignment (`assignment.planning`), `Ok` carries the plan as JSON
    /// (see [`parse_plan`]) and is submitted with `SubmitPlan`.
    pub async fn run<F, Fut>(self, handler: F) -> Result<(), ClientError>
    where
        F: Fn(Assignment) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let held: Held = Arc::default();
        let beat =
            tokio::spawn(heartbeat_loop(self.client.clone(), self.worker_id, self.heartbeat_interval, held.clone()));
        let outcome = self.receive(handler, held.clone()).await;
        beat.abort();
        for (_, (_, work)) in std::mem::take(&mut *held.lock().unwrap_or_else(|p| p.into_inner())) {
            work.abort();
        }
        outcome
    }

    async fn receive<F, Fut>(&self, handler: Arc<F>, held: Held) -> Result<(), ClientError>
    where
        F: Fn(Assignment) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let endpoints = self.client.endpoints().len();
        let mut failures = 0usize;
        let mut index = 0usize;
        loop {
            let Some(channel) = self.client.channel(index % endpoints) else { return Err(ClientError::NoEndpoints) };
            let mut request = Request::new(AssignmentsRequest { worker_id: self.worker_id });
            self.client.authorize(&mut request);
            let stream = WorkerServiceClient::new(channel).assignments(request).await;
            let mut stream = match stream {
                Ok(stream) => stream.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    return Err(ClientError::NotFound(status.message().into()))
                }
                Err(status) => {
                    failures += 1;
                    if failures > crate::ATTEMPTS_MAX {
                        return Err(ClientError::Unavailable { deadline_ms: 0, last: status.message().into() });
                    }
                    index += 1;
                    tokio::time::sleep(STREAM_RETRY).await;
                    continue;
                }
            };
            failures = 0;
            while let Ok(Some(assignment)) = stream.message().await {
                self.start(assignment, handler.clone(), held.clone());
            }
            index += 1;
            tokio::time::sleep(STREAM_RETRY).await;
        }
    }

    fn start<F, Fut>(&self, assignment: Assignment, handler: Arc<F>, held: Held)
    where
        F: Fn(Assignment) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let (task_id, token, planning) = (assignment.task_id.clone(), assignment.fencing_token, assignment.planning);
        let mut leases = held.lock().unwrap_or_else(|p| p.into_inner());
        if leases.get(&task_id).is_some_and(|(held_token, _)| *held_token == token) {
            // Sent again after a reconnect: it is already running.
            return;
        }
        let client = self.client.clone();
        let done = held.clone();
        let id = task_id.clone();
        let work = tokio::spawn(async move {
            let report = match handler(assignment).await {
                Ok(output) if planning => match parse_plan(&output) {
                    Ok(subtasks) => Report::Plan(subtasks),
                    Err(error) => Report::Fail(error),
                },
                Ok(result) => Report::Complete(result),
                Err(error) => Report::Fail(error),
            };
            let reported = client
                .with_failover(|channel, remaining| {
                    let report = report.clone();
                    let id = id.clone();
                    let auth = client.authorization();
                    async move {
                        let mut service = WorkerServiceClient::with_interceptor(channel, auth);
                        match report {
                            Report::Complete(result) => {
                                let complete = WorkerCompleteRequest {
                                    task_id: id,
                                    fencing_token: token,
                                    result,
                                    ..Default::default()
                                };
                                let mut request = Request::new(complete);
                                request.set_timeout(remaining);
                                service.complete(request).await.map(|_| ())
                            }
                            Report::Plan(subtasks) => {
                                let mut request =
                                    Request::new(SubmitPlanRequest { task_id: id, fencing_token: token, subtasks });
                                request.set_timeout(remaining);
                                service.submit_plan(request).await.map(|_| ())
                            }
                            Report::Fail(error) => {
                                let fail =
                                    WorkerFailRequest { task_id: id, fencing_token: token, error, retryable: true };
                                let mut request = Request::new(fail);
                                request.set_timeout(remaining);
                                service.fail(request).await.map(|_| ())
                            }
                        }
                    }
                })
                .await;
            if let Err(error) = reported {
                tracing::warn!(task_id = %id, token, %error, "reporting the outcome failed; the lease will expire and the task retry");
            }
            let mut leases = done.lock().unwrap_or_else(|p| p.into_inner());
            // Only this lease's entry: a newer lease on the same task is someone else's business.
            if leases.get(&id).is_some_and(|(held_token, _)| *held_token == token) {
                leases.remove(&id);
            }
        });
        if let Some((_, old)) = leases.insert(task_id, (token, work)) {
            old.abort();
        }
    }
}

/// What a handler's answer becomes.
#[derive(Clone)]
enum Report {
    Complete(String),
    Plan(Vec<PlannedSubtask>),
    Fail(String),
}

/// Read a planning handler's answer: `{"subtasks": [{"key", "task_type", "description",
/// "input", "depends_on", "capabilities"}]}` (prose or a code fence around it is ignored).
pub fn parse_plan(output: &str) -> Result<Vec<PlannedSubtask>, String> {
    let shape = "a plan is {\"subtasks\": [{\"key\", \"task_type\", \"description\", \"input\", \"depends_on\"}]}";
    let (Some(start), Some(end)) = (output.find('{'), output.rfind('}')) else {
        return Err(format!("the planner's answer holds no JSON object; {shape}"));
    };
    let value: serde_json::Value = output
        .get(start..=end)
        .and_then(|text| serde_json::from_str(text).ok())
        .ok_or_else(|| format!("the planner's answer is not valid JSON; {shape}"))?;
    let subtasks =
        value["subtasks"].as_array().ok_or_else(|| format!("the planner's answer has no subtasks list; {shape}"))?;
    let text = |v: &serde_json::Value, field: &str| v[field].as_str().unwrap_or_default().to_string();
    let list = |v: &serde_json::Value, field: &str| -> Vec<String> {
        v[field].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    Ok(subtasks
        .iter()
        .map(|s| PlannedSubtask {
            key: text(s, "key"),
            task_type: text(s, "task_type"),
            description: text(s, "description"),
            input: text(s, "input"),
            depends_on: list(s, "depends_on"),
            capabilities: list(s, "capabilities"),
        })
        .collect())
}

async fn heartbeat(client: &Client, request: HeartbeatRequest) -> Result<Vec<String>, ClientError> {
    client
        .with_failover(|channel, remaining| {
            let mut request = Request::new(request.clone());
            client.prepare(&mut request, remaining);
            async move { Ok(WorkerServiceClient::new(channel).heartbeat(request).await?.into_inner().lost) }
        })
        .await
}

async fn heartbeat_loop(client: Arc<Client>, worker_id: u64, interval: Duration, held: Held) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let leases: Vec<LeaseRef> = held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(task_id, (token, _))| LeaseRef { task_id: task_id.clone(), fencing_token: *token })
            .collect();
        match heartbeat(&client, HeartbeatRequest { worker_id, leases }).await {
            Ok(lost) => {
                let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                for task_id in lost {
                    if let Some((_, work)) = held.remove(&task_id) {
                        tracing::info!(task_id = %task_id, "lease lost; stopping the handler");
                        work.abort();
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed; retrying next interval"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_plan;

    #[test]
    fn plans_parse_from_a_handler_answer() {
        let plan = parse_plan("```json\n{\"subtasks\": [{\"key\": \"a\", \"task_type\": \"coder\", \"description\": \"d\", \"depends_on\": [\"b\"]}]}\n```")
            .expect("plan");
        assert_eq!((plan[0].key.as_str(), plan[0].depends_on.clone()), ("a", vec!["b".to_string()]));
        assert!(parse_plan("nothing").is_err());
        assert!(parse_plan("{\"steps\": 1}").expect_err("shape").contains("subtasks"));
    }
}
