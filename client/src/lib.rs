//! `maos-client`: the MAOS protobuf API and the Rust SDK over it.
//!
//! [`proto`] holds the code generated from `client/proto/maos/v1/*.proto`; those files are the
//! API's source of truth and any language can generate a client from them.
//! [`Client`] is the Rust SDK: it knows every endpoint, puts a deadline on every call, and retries
//! a call that could not reach a working node on the next endpoint. Its writes go on a client
//! session ([`session`]), so a retry after an ambiguous failure never applies a write twice.
//! [`Worker`] runs agents outside the cluster: it registers agent types, receives assignments,
//! heartbeats its leases and reports with their fencing tokens.
//! [`views`] names the API's enums and renders a task as JSON, for every surface that shows one.
//!
//! Must not depend on: `maos-node`, `maos-raft-store`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

pub mod session;
pub mod views;
pub mod worker;

pub use session::SESSION_HEADER;

pub use worker::{Worker, WorkerAgentType, WorkerAssignment};

pub mod proto {
    pub mod v1 {
        tonic::include_proto!("maos.v1");

        /// The encoded descriptors of every `maos.v1` message and service (for server reflection).
        pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("maos_v1_descriptor");
    }
}

use proto::v1::agent_service_client::AgentServiceClient;
use proto::v1::cluster_service_client::ClusterServiceClient;
use proto::v1::kv_service_client::KvServiceClient;
use proto::v1::task_service_client::TaskServiceClient;
use proto::v1::{
    AgentRequest, AgentView, CancelTaskRequest, CompareAndSetRequest, GetRequest, GetTaskRequest, ListAgentsRequest,
    ListAgentsResponse, ListTasksRequest, ListTasksResponse, OpenSessionRequest, PutRequest, RetryTaskRequest,
    SpawnAgentRequest, StatusRequest, StatusResponse, SubmitTaskRequest, SubmitTaskResponse, TaskEvent, TaskResults,
    TaskView, WatchTaskRequest,
};
use session::{Known, Outstanding, Session};
use tonic::metadata::AsciiMetadataValue;

/// How long one call may take, retries included, unless the caller sets another.
pub const CALL_DEADLINE_DEFAULT: Duration = Duration::from_secs(10);
/// Upper bound on attempts per call, across all endpoints.
pub const ATTEMPTS_MAX: usize = 16;
/// Pause before trying the same endpoint list again after every endpoint failed.
const ROUND_BACKOFF: Duration = Duration::from_millis(100);

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint {endpoint:?} is not a valid address: {message}; use host:port or http://host:port")]
    InvalidEndpoint { endpoint: String, message: String },
    #[error("no endpoints given; pass at least one host:port")]
    NoEndpoints,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The call does not fit the current state: for a worker, its lease is gone (stale token).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("resource exhausted (retry later): {0}")]
    ResourceExhausted(String),
    #[error("no node could serve the call within {deadline_ms} ms: {last}")]
    Unavailable { deadline_ms: u64, last: String },
    /// The client's session ended while a write was retried: an earlier attempt of it may or
    /// may not have applied (read before writing again).
    #[error("session expired: {0}")]
    SessionExpired(String),
    #[error("server error: {0}")]
    Server(Status),
}

impl ClientError {
    /// The typed error for a gRPC status.
    pub fn from_status(status: Status) -> Self {
        use tonic_types::StatusExt;
        if status.code() == Code::Aborted
            && status.get_details_error_info().is_some_and(|info| info.reason == "SESSION_EXPIRED")
        {
            return ClientError::SessionExpired(status.message().to_string());
        }
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ClientError::InvalidArgument(status.message().to_string()),
            Code::FailedPrecondition => ClientError::FailedPrecondition(status.message().to_string()),
            Code::NotFound => ClientError::NotFound(status.message().to_string()),
            Code::ResourceExhausted => ClientError::ResourceExhausted(status.message().to_string()),
            _ => ClientError::Server(status),
        }
    }
}

/// A change of an agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentChange {
    Pause,
    Resume,
    Terminate,
}

/// A key unique to this process and call: time, process id and a counter.
fn idempotency_key() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("sdk-{nanos:x}-{:x}-{count:x}", std::process::id())
}

/// How long the server asked the caller to wait before calling again (`grpc-retry-pushback-ms`,
/// set when it refused a call before doing anything: a rate limit or a busy node), if it did.
fn pushback(status: &Status) -> Option<Duration> {
    let value = status.metadata().get("grpc-retry-pushback-ms")?.to_str().ok()?;
    value.parse::<u64>().ok().map(Duration::from_millis)
}

/// Whether a failed attempt may be retried on another node.
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
}

/// Turn `host:port` or a URL into an endpoint.
pub fn endpoint(address: &str) -> Result<Endpoint, ClientError> {
    endpoint_with(address, None)
}

/// How a client checks the nodes' API port over TLS (`security.tls.*` on the nodes).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM certificates of the CA that signed the nodes' certificates; `None`: the public web
    /// roots.
    pub ca_pem: Option<String>,
    /// The PEM certificate and key this client presents (mutual TLS: the nodes'
    /// `security.tls.client_ca_file`).
    pub identity: Option<(String, String)>,
}

impl Tls {
    /// Read the files a command line or a configuration names (`--ca-file`, `--cert`, `--key`).
    pub fn from_files(
        ca_file: Option<&std::path::Path>,
        cert_file: Option<&std::path::Path>,
        key_file: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map_err(|e| ClientError::InvalidArgument(format!("{what}: cannot read {}: {e}", path.display())))
        };
        let identity = match (cert_file, key_file) {
            (Some(cert), Some(key)) => Some((read("cert", cert)?, read("key", key)?)),
            (None, None) => None,
            _ => return Err(ClientError::InvalidArgument("cert and key: give both, or neither".into())),
        };
        Ok(Self { ca_pem: ca_file.map(|path| read("ca_file", path)).transpose()?, identity })
    }
}

/// Turn `host:port` or a URL into an endpoint; with `tls`, `host:port` means `https://` and the
/// nodes' certificates are checked as `tls` says (an `https://` address without it: against the
/// public web roots).
pub fn endpoint_with(address: &str, tls: Option<&Tls>) -> Result<Endpoint, ClientError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = if address.contains("://") { address.to_string() } else { format!("{scheme}://{address}") };
    let invalid = |message: String| ClientError::InvalidEndpoint { endpoint: address.to_string(), message };
    let mut endpoint = Endpoint::from_shared(url.clone()).map_err(|e| invalid(e.to_string()))?;
    if url.starts_with("https://") {
        let tls = tls.cloned().unwrap_or_default();
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &tls.ca_pem {
            Some(pem) => config.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => config.with_webpki_roots(),
        };
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).map_err(|e| invalid(format!("TLS: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// The caller's trace context as W3C `traceparent` (and `tracestate`): the current OpenTelemetry
/// span, which `tracing-opentelemetry` sets from the current `tracing` span, so the cluster's
/// spans of this call (and of a task it submits) join the caller's trace. Nothing without one.
fn propagate_trace(metadata: &mut tonic::metadata::MetadataMap) {
    use opentelemetry::trace::TraceContextExt;
    let context = opentelemetry::Context::current();
    let span = context.span();
    let span = span.span_context();
    if !span.is_valid() {
        return;
    }
    let parent = format!("00-{}-{}-{:02x}", span.trace_id(), span.span_id(), span.trace_flags().to_u8());
    if let Ok(value) = parent.parse() {
        metadata.insert("traceparent", value);
    }
    let state = span.trace_state().header();
    if let Some(value) = Some(state).filter(|s| !s.is_empty()).and_then(|s| s.parse().ok()) {
        metadata.insert("tracestate", value);
    }
}

/// Adds `authorization: Bearer <token>` to each request of a raw generated client.
#[derive(Debug, Clone)]
pub struct Authorization(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of a MAOS cluster.
#[derive(Debug)]
pub struct Client {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: AtomicUsize,
    deadline: Duration,
    /// Upper bound on one attempt, so an endpoint that hangs (partitioned, frozen) costs part of
    /// the deadline, not all of it.
    attempt_timeout: Duration,
    /// Sent as `authorization` with every call (an agent's credential, or a token).
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
    /// The session its writes go on.
    session: Session,
}

impl Client {
    /// A client of the nodes at `endpoints` (`host:port`). Connections open lazily.
    pub fn new<I, S>(endpoints: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new_with_tls(endpoints, None)
    }

    /// A client of the nodes at `endpoints` over TLS when `tls` is given (see [`endpoint_with`]).
    pub fn new_with_tls<I, S>(endpoints: I, tls: Option<&Tls>) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        let channels: Vec<Channel> =
            endpoints.iter().map(|e| endpoint_with(e, tls).map(|e| e.connect_lazy())).collect::<Result<_, _>>()?;
        Self::from_channels(endpoints.into_iter().zip(channels).collect())
    }

    /// A client over channels the caller built: a custom connector (a simulated network, a
    /// proxy) or TLS settings. `endpoints` names each channel for error messages.
    pub fn from_channels(endpoints: Vec<(String, Channel)>) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let (endpoints, channels) = endpoints.into_iter().unzip();
        Ok(Self {
            endpoints,
            channels,
            preferred: AtomicUsize::new(0),
            deadline: CALL_DEADLINE_DEFAULT,
            attempt_timeout: CALL_DEADLINE_DEFAULT / 3,
            authorization: None,
            session: Session::default(),
        })
    }

    /// Use `deadline` for every call, retries included; one attempt gets at most a third of it.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self.attempt_timeout = deadline / 3;
        self
    }

    /// Send `authorization: Bearer <token>` with every call (for an agent: the credential from
    /// its task envelope).
    pub fn with_credentials(mut self, token: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::InvalidArgument("token: must be printable ASCII".into()))?;
        self.authorization = Some(value);
        Ok(self)
    }

    /// Set the deadline and credentials on a request.
    fn prepare<T>(&self, request: &mut Request<T>, remaining: Duration) {
        request.set_timeout(remaining);
        self.authorize(request);
    }

    /// Set the credentials and the caller's trace context on a request.
    fn authorize<T>(&self, request: &mut Request<T>) {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        propagate_trace(request.metadata_mut());
    }

    /// Ask for sessions that end `ttl` after this client's last write (1 s to 24 h; the default
    /// is the cluster's `raft.session_ttl_ms`). A short-lived client (one command) should ask
    /// for little: the cluster keeps at most 4,096 sessions.
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session.ttl_ms = ttl.as_millis() as u64;
        self
    }

    /// Write without a client session, as clients did before sessions: a write retried after an
    /// ambiguous failure may then apply twice. For measuring what sessions cost.
    pub fn without_sessions(self) -> Self {
        self.session.unsupported("turned off by the caller".into());
        self
    }

    /// Bound one attempt on one endpoint to `timeout` (at most the call deadline).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// The endpoints this client was built with.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Run `call` against one endpoint after another until one answers or the deadline passes.
    pub(crate) async fn with_failover<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let started = tokio::time::Instant::now();
        let mut index = self.preferred.load(Ordering::Relaxed) % self.channels.len();
        let mut last = String::from("no attempt made");
        // Waits the server asked for (pushback) are bounded by the deadline, not counted as attempts.
        let mut attempt = 0;
        while attempt < ATTEMPTS_MAX {
            let remaining = self.deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                break;
            }
            let limit = remaining.min(self.attempt_timeout);
            let outcome = match tokio::time::timeout(limit, call(self.channels[index].clone(), limit)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer within {} ms", limit.as_millis()))),
            };
            match outcome {
                Ok(value) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                // Refused before anything was done, with when to call again: wait and retry here,
                // if that fits the deadline.
                Err(status) if pushback(&status).is_some_and(|wait| wait < remaining) => {
                    last = format!("{}: {}", self.endpoints[index], status.message());
                    let wait = pushback(&status).unwrap_or_default().max(Duration::from_millis(1));
                    tracing::debug!(endpoint = %self.endpoints[index], attempt, wait_ms = wait.as_millis() as u64, "the server pushed back; retrying after its wait");
                    tokio::time::sleep(wait).await;
                }
                Err(status) if retryable(&status) => {
                    attempt += 1;
                    last = format!("{}: {}", self.endpoints[index], status.message());
                    tracing::debug!(endpoint = %self.endpoints[index], attempt, error = %status.message(), "retrying on the next endpoint");
                    index = (index + 1) % self.channels.len();
                    if index == 0 {
                        tokio::time::sleep(ROUND_BACKOFF.min(remaining)).await;
                    }
                }
                Err(status) => return Err(ClientError::from_status(status)),
            }
        }
        Err(ClientError::Unavailable { deadline_ms: self.deadline.as_millis() as u64, last })
    }

    /// Write `key`; returns the key space's revision after the write (not a log index).
    pub async fn put(&self, key: &str, value: &str) -> Result<u64, ClientError> {
        let request = PutRequest { key: key.to_string(), value: value.to_string(), ttl_ms: 0 };
        let answer = self.unary_write(request, KvServiceClient::new, |mut kv, r| async move { kv.put(r).await });
        Ok(answer.await?.revision)
    }

    /// Write `key` only if its value is `expected` (`None`: the key must be absent):
    /// `Ok(Ok(revision))` when it wrote, `Ok(Err(current))` with the value found when not.
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<Result<u64, Option<String>>, ClientError> {
        let request = CompareAndSetRequest {
            key: key.to_string(),
            expected: expected.map(str::to_string),
            value: value.to_string(),
            ttl_ms: 0,
        };
        let response = self
            .unary_write(request, KvServiceClient::new, |mut kv, r| async move { kv.compare_and_set(r).await })
            .await?;
        Ok(if response.succeeded { Ok(response.revision) } else { Err(response.current) })
    }

    /// Read `key`: `Some((value, revision))` or `None` when absent.
    pub async fn get(&self, key: &str, stale: bool) -> Result<Option<(String, u64)>, ClientError> {
        self.with_failover(|channel, remaining| async move {
            let mut request = Request::new(GetRequest { key: key.to_string(), stale });
            self.prepare(&mut request, remaining);
            let response = KvServiceClient::new(channel).get(request).await?.into_inner();
            Ok(response.found.then_some((response.value, response.revision)))
        })
        .await
    }

    /// The status of the node at `endpoints()[index]`, without failover; `with_state_hash` also
    /// digests the whole applied state (costly on a large state).
    pub async fn status_of(&self, index: usize, with_state_hash: bool) -> Result<StatusResponse, ClientError> {
        let channel = self
            .channels
            .get(index)
            .cloned()
            .ok_or_else(|| ClientError::InvalidArgument(format!("endpoint index {index} is out of range")))?;
        let mut request = Request::new(StatusRequest { with_state_hash });
        self.prepare(&mut request, self.deadline);
        let outcome =
            match tokio::time::timeout(self.deadline, ClusterServiceClient::new(channel).status(request)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer within {} ms", self.deadline.as_millis()))),
            };
        match outcome {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if retryable(&status) => Err(ClientError::Unavailable {
                deadline_ms: self.deadline.as_millis() as u64,
                last: format!("{}: {}", self.endpoints[index], status.message()),
            }),
            Err(status) => Err(ClientError::from_status(status)),
        }
    }

    /// Submit a task. Without an idempotency key the SDK sets one, so a retry on another node
    /// after a timeout or a failover never creates a second task.
    pub async fn submit(&self, mut request: SubmitTaskRequest) -> Result<SubmitTaskResponse, ClientError> {
        if request.idempotency_key.is_empty() {
            request.idempotency_key = idempotency_key();
        }
        self.unary_write(request, TaskServiceClient::new, |mut service, r| async move { service.submit(r).await }).await
    }

    /// A task (linearizable read).
    pub async fn task(&self, task_id: &str) -> Result<TaskView, ClientError> {
        let request = GetTaskRequest { task_id: task_id.into(), stale: false };
        self.unary(request, TaskServiceClient::new, |mut service, r| async move { service.get(r).await }).await
    }

    /// One page of tasks.
    pub async fn list_tasks(&self, request: ListTasksRequest) -> Result<ListTasksResponse, ClientError> {
        self.unary(request, TaskServiceClient::new, |mut service, r| async move { service.list(r).await }).await
    }

    /// A task's result and its children's.
    pub async fn results(&self, task_id: &str) -> Result<TaskResults, ClientError> {
        let request = GetTaskRequest { task_id: task_id.into(), stale: false };
        self.unary(request, TaskServiceClient::new, |mut service, r| async move { service.results(r).await }).await
    }

    /// Cancel a task and its descendants; returns the tasks cancelled.
    pub async fn cancel(&self, task_id: &str, reason: &str) -> Result<Vec<String>, ClientError> {
        let request = CancelTaskRequest { task_id: task_id.into(), reason: reason.into() };
        let answer = self
            .unary_write(request, TaskServiceClient::new, |mut service, r| async move { service.cancel(r).await })
            .await?;
        Ok(answer.cancelled)
    }

    /// Run a failed or cancelled task again.
    pub async fn retry(&self, task_id: &str) -> Result<TaskView, ClientError> {
        let request = RetryTaskRequest { task_id: task_id.into() };
        self.unary_write(request, TaskServiceClient::new, |mut service, r| async move { service.retry(r).await }).await
    }

    /// A task's events until it finishes (from the first endpoint that accepts the watch; the
    /// stream itself has no deadline).
    pub async fn watch(
        &self,
        task_id: &str,
        include_children: bool,
    ) -> Result<tonic::Streaming<TaskEvent>, ClientError> {
        let request = WatchTaskRequest { task_id: task_id.into(), include_children };
        self.with_failover(|channel, _| {
            let mut request = Request::new(request.clone());
            self.authorize(&mut request);
            async move { Ok(TaskServiceClient::new(channel).watch(request).await?.into_inner()) }
        })
        .await
    }

    /// Agents of one node or worker (`node_id`), or of all (0).
    pub async fn agents(&self, node_id: u64) -> Result<ListAgentsResponse, ClientError> {
        let request = ListAgentsRequest { node_id };
        self.unary(request, AgentServiceClient::new, |mut service, r| async move { service.list(r).await }).await
    }

    /// Add an agent of `agent_type` to node `node_id` (0: the node that takes the call).
    /// Not retried after an answer that may hide a success (a spawn carries no idempotency key):
    /// only on the endpoint that answered last.
    pub async fn spawn_agent(&self, node_id: u64, agent_type: &str) -> Result<AgentView, ClientError> {
        let index = self.preferred.load(Ordering::Relaxed) % self.channels.len();
        let mut request = Request::new(SpawnAgentRequest { node_id, agent_type: agent_type.into() });
        self.prepare(&mut request, self.deadline);
        let mut service = AgentServiceClient::new(self.channels[index].clone());
        match tokio::time::timeout(self.deadline, service.spawn(request)).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(ClientError::from_status(status)),
            Err(_) => Err(ClientError::Unavailable {
                deadline_ms: self.deadline.as_millis() as u64,
                last: format!("{}: no answer; check `agent list` before spawning again", self.endpoints[index]),
            }),
        }
    }

    /// Pause (drain), resume or terminate an agent.
    pub async fn set_agent(&self, agent_id: &str, change: AgentChange) -> Result<AgentView, ClientError> {
        let request = AgentRequest { agent_id: agent_id.into() };
        self.unary_write(request, AgentServiceClient::new, move |mut service, r| async move {
            match change {
                AgentChange::Pause => service.pause(r).await,
                AgentChange::Resume => service.resume(r).await,
                AgentChange::Terminate => service.terminate(r).await,
            }
        })
        .await
    }

    /// One unary call with failover and a deadline; `call` gets a service client and the request.
    async fn unary<S, Req, Resp, F, Fut>(
        &self,
        request: Req,
        make: fn(Channel) -> S,
        call: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(S, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.with_failover(|channel, remaining| {
            let mut wrapped = Request::new(request.clone());
            self.prepare(&mut wrapped, remaining);
            let answer = call(make(channel), wrapped);
            async move { Ok(answer.await?.into_inner()) }
        })
        .await
    }

    /// [`Self::unary`] for a write: every attempt carries the same session and sequence.
    async fn unary_write<S, Req, Resp, F, Fut>(
        &self,
        request: Req,
        make: fn(Channel) -> S,
        call: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        F: Fn(S, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        self.with_session(|channel, remaining, session| {
            let mut wrapped = Request::new(request.clone());
            self.prepare(&mut wrapped, remaining);
            if let Some(value) = session {
                wrapped.metadata_mut().insert(SESSION_HEADER, value);
            }
            let answer = call(make(channel), wrapped);
            async move { Ok(answer.await?.into_inner()) }
        })
        .await
    }

    /// Run `call` with failover on this client's session (see [`session`]): `call` gets the
    /// `maos-session` value to send, the same for every attempt of this write.
    async fn with_session<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel, Duration, Option<AsciiMetadataValue>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        // At most one reopen: a session can expire once while a write waits.
        for _ in 0..2 {
            let Some(id) = self.session_id().await? else {
                return self.with_failover(|channel, remaining| call(channel, remaining, None)).await;
            };
            let (sequence, acknowledged) = self.session.begin();
            let _outstanding = Outstanding(&self.session, sequence);
            let header: AsciiMetadataValue = format!("{id}/{sequence}/{acknowledged}")
                .parse()
                .map_err(|_| ClientError::InvalidArgument("a session header is digits and slashes".into()))?;
            let mut attempts = 0;
            let result = self
                .with_failover(|channel, remaining| {
                    attempts += 1;
                    call(channel, remaining, Some(header.clone()))
                })
                .await;
            match result {
                // Refused on its first attempt: nothing of this write applied; reopen and resend.
                Err(ClientError::SessionExpired(_)) if attempts == 1 => self.session.forget(id),
                other => return other,
            }
        }
        Err(ClientError::SessionExpired("the client's session expired twice during one write".into()))
    }

    /// This client's session, opened on first use; `None` when the cluster will not open one.
    async fn session_id(&self) -> Result<Option<u64>, ClientError> {
        match self.session.known() {
            Known::Open(id) => return Ok(Some(id)),
            Known::Unsupported => return Ok(None),
            Known::Unknown => {}
        }
        let _opening = self.session.opening.lock().await;
        match self.session.known() {
            Known::Open(id) => return Ok(Some(id)),
            Known::Unsupported => return Ok(None),
            Known::Unknown => {}
        }
        let request = OpenSessionRequest { ttl_ms: self.session.ttl_ms };
        let opened =
            self.unary(request, ClusterServiceClient::new, |mut s, r| async move { s.open_session(r).await }).await;
        match opened {
            Ok(answer) => {
                self.session.opened(answer.session_id);
                Ok(Some(answer.session_id))
            }
            // An older node, or a credential that may not open one: write as before sessions.
            Err(ClientError::Server(status))
                if matches!(status.code(), Code::Unimplemented | Code::PermissionDenied) =>
            {
                self.session.unsupported(format!("{:?}: {}", status.code(), status.message()));
                Ok(None)
            }
            // The cluster's session table is full: this write goes without; the next tries again.
            Err(ClientError::ResourceExhausted(message)) => {
                tracing::warn!(%message, "no client session could be opened; this write is not protected from a double apply on retry");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// An interceptor that adds this client's `authorization` to every call of a raw client
    /// (`XServiceClient::with_interceptor(client.channel(0)?, client.authorization())`).
    pub fn authorization(&self) -> Authorization {
        Authorization(self.authorization.clone())
    }

    /// A raw channel to `endpoints()[index]`, for calls the SDK does not wrap yet.
    pub fn channel(&self, index: usize) -> Option<Channel> {
        self.channels.get(index).cloned()
    }
}
