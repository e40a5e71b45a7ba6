//! The client API on port 8000: key-value and cluster services, and the mapping of refusals to gRPC codes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use maos_client::proto::v1::cluster_service_client::ClusterServiceClient;
use maos_client::proto::v1::cluster_service_server::ClusterService;
use maos_client::proto::v1::kv_service_server::KvService;
use maos_client::proto::v1::*;
use maos_raft_store::state::check_command;
use maos_raft_store::{Command, MaosNode, Rejection, Response as Applied};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::agents::credential::{AgentScope, Credentials};
use crate::config::check_address;
use crate::core::{CoreError, NodeCore};
use crate::storage::Storage;

/// Keys one watch follows, at most; events queued on it.
const WATCH_KEYS_MAX: usize = 10_000;
const WATCH_QUEUE: usize = 256;

/// Header marking a request already forwarded once, so forwarding never loops.
const FORWARDED_HEADER: &str = "x-maos-forwarded";

pub fn status_from(error: CoreError) -> Status {
    match error {
        CoreError::Rejected(rejection) => status_of_rejection(rejection),
        CoreError::Unavailable { .. } | CoreError::Stopped(_) => Status::unavailable(error.to_string()),
    }
}

/// INVALID_ARGUMENT naming `field`, with a `google.rpc.BadRequest` detail a program can read.
pub fn invalid_field(field: &str, message: &str) -> Status {
    let details = ErrorDetails::with_bad_request_violation(field, message);
    Status::with_error_details(tonic::Code::InvalidArgument, format!("{field}: {message}"), details)
}

/// INVALID_ARGUMENT from a message that starts with the field (`"description: must not be
/// empty"`); the field also goes into a `google.rpc.BadRequest` detail.
pub fn invalid(message: impl Into<String>) -> Status {
    let message = message.into();
    match message.split_once(": ") {
        Some((field, rest)) if !field.is_empty() && !field.contains(' ') => invalid_field(field, rest),
        _ => Status::invalid_argument(message),
    }
}

/// The gRPC code of a refusal: the caller's fix differs by case.
pub fn status_of_rejection(rejection: Rejection) -> Status {
    use maos_raft_store::tasks::TaskRejection as T;
    let message = rejection.to_string();
    match rejection {
        Rejection::InvalidField { field, message } | Rejection::Task(T::InvalidSpec { field, message }) => {
            invalid_field(&field, &message)
        }
        Rejection::TooLarge { .. }
        | Rejection::KeySpaceFull { .. }
        | Rejection::Task(T::QueueFull { .. } | T::AgentLimit { .. }) => Status::resource_exhausted(message),
        Rejection::Task(T::UnknownTask { .. } | T::UnknownAgent { .. }) => Status::not_found(message),
        Rejection::Task(
            T::StaleToken { .. }
            | T::WrongState { .. }
            | T::AgentState { .. }
            | T::NotYet { .. }
            | T::SlotUnavailable { .. },
        ) => Status::failed_precondition(message),
        _ => invalid(message),
    }
}

/// Tasks by state, and the queue bound.
pub fn task_counts(table: &maos_raft_store::tasks::TaskTable) -> TaskCounts {
    let mut counts = TaskCounts { queue_limit: table.limits.queue_size as u64, ..Default::default() };
    for task in table.tasks.values() {
        use maos_raft_store::tasks::TaskState::*;
        match task.state {
            Pending => counts.pending += 1,
            Queued => counts.queued += 1,
            Running => counts.running += 1,
            Completed => counts.completed += 1,
            Failed => counts.failed += 1,
            Cancelled => counts.cancelled += 1,
        }
    }
    counts
}

fn unexpected(response: Applied) -> Status {
    Status::internal(format!("unexpected result from the state machine: {response:?}"))
}

/// The key-value service.
pub struct KvApi {
    pub core: Arc<NodeCore>,
    /// With Redis configured, `scratch/` keys live there.
    pub storage: Arc<Storage>,
    pub credentials: Arc<Credentials>,
    /// Shared with the task and worker services: open streams on this node.
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// Keys under this prefix are scratch state: they need a TTL and, with Redis configured, live
/// there (fast, not replicated, lost with Redis) instead of in the replicated state.
pub const SCRATCH_PREFIX: &str = "scratch/";

/// The key prefix an agent's credential may use for its workflow's shared state (the same under
/// [`SCRATCH_PREFIX`] for its scratch state).
pub fn workflow_prefix(table: &maos_raft_store::tasks::TaskTable, task_id: &str) -> String {
    let mut root = task_id.to_string();
    // Bounded: a parent chain cannot be longer than the table.
    for _ in 0..table.tasks.len() {
        match table.tasks.get(&root).and_then(|t| t.spec.parent.clone()) {
            Some(parent) => root = parent,
            None => break,
        }
    }
    format!("workflows/{root}/")
}

fn ttl(ttl_ms: u64) -> Option<u64> {
    (ttl_ms > 0).then_some(ttl_ms)
}

impl KvApi {
    /// A call carrying an agent credential may only touch its workflow's keys, and only while its
    /// lease is current. Calls without one are clients' (unrestricted until API principals exist).
    fn check_scope<T>(&self, request: &Request<T>, key: &str) -> Result<Option<AgentScope>, Status> {
        let Some(header) = request.metadata().get("authorization") else { return Ok(None) };
        let credential = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).ok_or_else(|| {
            Status::unauthenticated("authorization: expected `Bearer <credential>` from the task envelope")
        })?;
        let scope = self.credentials.verify(credential.trim()).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let state = self.core.state.read();
        let table = &state.app.tasks;
        let current = table.tasks.get(&scope.task_id).and_then(|t| t.lease.as_ref()).map(|l| l.token);
        if current != Some(scope.token) {
            return Err(Status::permission_denied(format!(
                "the credential's lease on task {} is no longer current; this attempt has ended",
                scope.task_id
            )));
        }
        let prefix = workflow_prefix(table, &scope.task_id);
        let scratch = format!("{SCRATCH_PREFIX}{}", prefix.trim_start_matches("workflows/"));
        if !key.starts_with(&prefix) && !key.starts_with(&scratch) {
            return Err(Status::permission_denied(format!(
                "key {key:?} is outside this agent's workflow; use keys under {prefix} (or {scratch} for scratch state)"
            )));
        }
        Ok(Some(scope))
    }

    /// Scratch keys in Redis have no watch or compare-and-set: those need the replicated log.
    fn refuse_scratch_in_redis(&self, key: &str, what: &str) -> Result<(), Status> {
        if self.storage.cache().is_some() && key.starts_with(SCRATCH_PREFIX) {
            return Err(Status::failed_precondition(format!(
                "{key:?}: scratch keys live in Redis, which has no {what} here; use workflows/ keys for coordination"
            )));
        }
        Ok(())
    }

    /// Write `command`; on behalf of an agent it is fenced by the agent's lease, checked again
    /// when it applies.
    async fn write(&self, scope: Option<AgentScope>, command: Command) -> Result<Applied, Status> {
        let command = match scope {
            Some(AgentScope { task_id, token }) => Command::Fenced { task_id, token, command: Box::new(command) },
            None => command,
        };
        self.core.write(command).await.map_err(|error| match error {
            CoreError::Rejected(Rejection::Task(maos_raft_store::tasks::TaskRejection::StaleToken {
                task_id, ..
            })) => Status::permission_denied(format!(
                "the credential's lease on task {task_id} is no longer current; this attempt has ended"
            )),
            other => status_from(other),
        })
    }
}

#[tonic::async_trait]
impl KvService for KvApi {
    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let scope = self.check_scope(&request, &request.get_ref().key)?;
        let PutRequest { key, value, ttl_ms } = request.into_inner();
        let scratch = key.starts_with(SCRATCH_PREFIX);
        if scratch && ttl_ms == 0 {
            return Err(invalid(
                "ttl_ms: scratch keys (scratch/...) need a TTL; use workflows/ keys for lasting state",
            ));
        }
        let command = Command::KvPut { key, value, ttl_ms: ttl(ttl_ms) };
        if let (true, Some(cache), Command::KvPut { key, value, .. }) = (scratch, self.storage.cache(), &command) {
            // The replicated space's limits hold in Redis too.
            check_command(&command).map_err(status_of_rejection)?;
            let revision = cache.scratch_put(key, value, ttl_ms).await.map_err(|e| e.status())?;
            return Ok(Response::new(PutResponse { revision }));
        }
        match self.write(scope, command).await? {
            Applied::KvWritten { revision } => Ok(Response::new(PutResponse { revision })),
            other => Err(unexpected(other)),
        }
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.check_scope(&request, &request.get_ref().key)?;
        let GetRequest { key, stale } = request.into_inner();
        if key.is_empty() {
            return Err(invalid("key: must not be empty"));
        }
        if let Some(cache) = self.storage.cache().filter(|_| key.starts_with(SCRATCH_PREFIX)) {
            let found = cache.scratch_get(&key).await.map_err(|e| e.status())?;
            let (found, (value, revision)) = (found.is_some(), found.unwrap_or_default());
            return Ok(Response::new(GetResponse { found, value, revision, applied_index: 0 }));
        }
        if !stale {
            self.core.read_barrier().await.map_err(status_from)?;
        }
        let state = self.core.state.read();
        let applied_index = state.last_applied.map(|id| id.index).unwrap_or(0);
        Ok(Response::new(match state.app.kv_get(&key, (self.core.clock)()) {
            Some(value) => {
                GetResponse { found: true, value: value.value.clone(), revision: value.revision, applied_index }
            }
            None => GetResponse { found: false, value: String::new(), revision: 0, applied_index },
        }))
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let scope = self.check_scope(&request, &request.get_ref().key)?;
        let key = request.into_inner().key;
        if let Some(cache) = self.storage.cache().filter(|_| key.starts_with(SCRATCH_PREFIX)) {
            let existed = cache.scratch_delete(&key).await.map_err(|e| e.status())?;
            return Ok(Response::new(DeleteResponse { existed }));
        }
        match self.write(scope, Command::KvDelete { key }).await? {
            Applied::KvDeleted { existed } => Ok(Response::new(DeleteResponse { existed })),
            other => Err(unexpected(other)),
        }
    }

    type WatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<KeyEvent, Status>> + Send>>;

    async fn watch(&self, request: Request<WatchKeysRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let scope = self.check_scope(&request, &request.get_ref().prefix)?;
        let prefix = request.into_inner().prefix;
        self.refuse_scratch_in_redis(&prefix, "watch")?;
        self.core.read_barrier().await.map_err(status_from)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_QUEUE);
        let core = self.core.clone();
        // One poll: the events since `seen` (key -> revision), cloning only changed values.
        let poll = move |core: &NodeCore,
                         seen: &mut BTreeMap<String, u64>,
                         initial: bool|
              -> Result<Vec<KeyEvent>, Status> {
            let state = core.state.read();
            if let Some(scope) = &scope {
                let current = state.app.tasks.tasks.get(&scope.task_id).and_then(|t| t.lease.as_ref()).map(|l| l.token);
                if current != Some(scope.token) {
                    return Err(Status::permission_denied(format!(
                        "the credential's lease on task {} is no longer current; this attempt has ended",
                        scope.task_id
                    )));
                }
            }
            let now_ms = (core.clock)();
            let applied_index = state.last_applied.map(|id| id.index).unwrap_or(0);
            let mut events = Vec::new();
            let mut present = BTreeSet::new();
            for (key, value) in state.app.kv.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)) {
                if !value.live_at(now_ms) {
                    continue;
                }
                if present.len() == WATCH_KEYS_MAX {
                    return Err(Status::resource_exhausted(format!(
                        "prefix: more than {WATCH_KEYS_MAX} keys under {prefix:?}; watch a narrower prefix"
                    )));
                }
                present.insert(key.as_str());
                if seen.get(key) != Some(&value.revision) {
                    seen.insert(key.clone(), value.revision);
                    let (value, revision) = (value.value.clone(), value.revision);
                    events.push(KeyEvent { key: key.clone(), value, revision, deleted: false, applied_index, initial });
                }
            }
            let gone: Vec<String> = seen.keys().filter(|k| !present.contains(k.as_str())).cloned().collect();
            for key in gone {
                seen.remove(&key);
                events.push(KeyEvent { key, deleted: true, applied_index, ..Default::default() });
            }
            Ok(events)
        };
        let mut seen = BTreeMap::new();
        let first = poll(&core, &mut seen, true)?;
        let permit = crate::task_api::stream_permit(&self.streams)?;
        tokio::spawn(async move {
            let _permit = permit;
            let mut changes = core.raft.metrics();
            let mut events = first;
            loop {
                for event in events {
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if !crate::task_api::next_poll(&mut changes, &sender).await {
                    return;
                }
                events = match poll(&core, &mut seen, false) {
                    Ok(events) => events,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }

    async fn compare_and_set(
        &self,
        request: Request<CompareAndSetRequest>,
    ) -> Result<Response<CompareAndSetResponse>, Status> {
        let scope = self.check_scope(&request, &request.get_ref().key)?;
        let CompareAndSetRequest { key, expected, value, ttl_ms } = request.into_inner();
        self.refuse_scratch_in_redis(&key, "compare-and-set")?;
        match self.write(scope, Command::KvCompareAndSet { key, expected, value, ttl_ms: ttl(ttl_ms) }).await? {
            Applied::KvWritten { revision } => {
                Ok(Response::new(CompareAndSetResponse { succeeded: true, revision, current: None }))
            }
            Applied::KvCompareFailed { current } => {
                Ok(Response::new(CompareAndSetResponse { succeeded: false, revision: 0, current }))
            }
            other => Err(unexpected(other)),
        }
    }
}

/// The cluster service.
pub struct ClusterApi {
    pub core: Arc<NodeCore>,
    /// The members a new cluster forms with (`cluster.peers`, or this node alone).
    pub formation_peers: BTreeMap<u64, MaosNode>,
}

fn member_list(core: &NodeCore) -> Vec<Member> {
    core.members()
        .into_iter()
        .map(|(id, (node, voter))| Member { id, raft_addr: node.raft_addr, api_addr: node.api_addr, voter })
        .collect()
}

impl ClusterApi {
    /// Run a membership change on the leader: here if this node leads, else forwarded once.
    async fn on_leader<T, Local, Fut, Remote, RFut>(
        &self,
        forwarded: bool,
        local: Local,
        remote: Remote,
    ) -> Result<T, Status>
    where
        Local: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
        Remote: FnOnce(ClusterServiceClient<tonic::transport::Channel>) -> RFut,
        RFut: std::future::Future<Output = Result<T, Status>>,
    {
        if self.core.is_leader() {
            return local().await;
        }
        if forwarded {
            return Err(Status::unavailable("leadership moved while forwarding; retry"));
        }
        let (leader, node) = self.core.leader().ok_or_else(|| Status::unavailable("no leader known; retry"))?;
        let channel = self
            .core
            .channels
            .get(&node.api_addr)
            .map_err(|e| Status::unavailable(format!("leader {leader} at {}: {e}", node.api_addr)))?;
        remote(ClusterServiceClient::new(channel)).await
    }
}

fn forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}

fn mark_forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    request
}

fn membership_status(error: RaftError<u64, ClientWriteError<u64, MaosNode>>) -> Status {
    match &error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Status::unavailable(format!("{error}; retry")),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(_) => Status::unavailable(error.to_string()),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn initialize(&self, _: Request<InitializeRequest>) -> Result<Response<InitializeResponse>, Status> {
        let already_initialized = match crate::node::formation_check(&self.core, &self.formation_peers).await {
            crate::node::Formation::Formed { .. } => true,
            crate::node::Formation::NotReady { reason, .. } => {
                return Err(Status::failed_precondition(format!("the cluster cannot form yet: {reason}")));
            }
            crate::node::Formation::Ready => {
                self.core.raft.initialize(self.formation_peers.clone()).await.map_err(|error| {
                    Status::failed_precondition(format!("the cluster did not form: {error}; retry"))
                })?;
                tracing::info!(node_id = self.core.id, members = ?self.formation_peers.keys().collect::<Vec<_>>(), "initialised the cluster (maos cluster init)");
                false
            }
        };
        let members = if already_initialized {
            member_list(&self.core)
        } else {
            self.formation_peers
                .iter()
                .map(|(id, node)| Member {
                    id: *id,
                    raft_addr: node.raft_addr.clone(),
                    api_addr: node.api_addr.clone(),
                    voter: true,
                })
                .collect()
        };
        Ok(Response::new(InitializeResponse { already_initialized, members }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let with_state_hash = request.into_inner().with_state_hash;
        let metrics = self.core.raft.metrics().borrow().clone();
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let leader_api_addr = self.core.leader().map(|(_, node)| node.api_addr).unwrap_or_default();
        let (state_hash, cluster_id, last_applied_index, tasks) = {
            let state = self.core.state.read();
            let counts = task_counts(&state.app.tasks);
            (
                if with_state_hash { state.state_hash() } else { String::new() },
                state.app.cluster.as_ref().map(|c| c.cluster_id.clone()).unwrap_or_default(),
                state.last_applied.map(|id| id.index).unwrap_or(0),
                counts,
            )
        };
        Ok(Response::new(StatusResponse {
            node_id: self.core.id,
            role: role.into(),
            current_term: metrics.current_term,
            leader_id: metrics.current_leader,
            leader_api_addr,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            last_applied_index,
            state_hash,
            cluster_id,
            cluster_name: self.core.cluster_name.clone(),
            members: member_list(&self.core),
            tasks: Some(tasks),
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let forwarded = forwarded(&request);
        let target = request.into_inner().node_id;
        let members = self.core.members();
        match members.get(&target) {
            None => return Err(Status::not_found(format!("node_id: {target} is not a member"))),
            Some((_, false)) => return Err(invalid(format!("node_id: {target} is a learner; only a voter can lead"))),
            Some(_) => {}
        }
        if target != self.core.id {
            if forwarded {
                return Err(Status::unavailable("the transfer was forwarded to the wrong node; retry"));
            }
            let (node, _) = &members[&target];
            let channel = self
                .core
                .channels
                .get(&node.api_addr)
                .map_err(|e| Status::unavailable(format!("node {target} at {}: {e}", node.api_addr)))?;
            let answer = ClusterServiceClient::new(channel)
                .transfer_leader(mark_forwarded(TransferLeaderRequest { node_id: target }))
                .await?;
            return Ok(answer);
        }
        let start_term = self.core.raft.metrics().borrow().current_term;
        if !self.core.is_leader() {
            self.core
                .raft
                .trigger()
                .elect()
                .await
                .map_err(|e| Status::unavailable(format!("the election could not start: {e}")))?;
        }
        let deadline = tokio::time::Instant::now() + self.core.request_timeout;
        let mut metrics = self.core.raft.metrics();
        loop {
            let (leader, term) = {
                let m = metrics.borrow();
                (m.current_leader, m.current_term)
            };
            match leader {
                Some(leader) if leader == self.core.id => {
                    return Ok(Response::new(TransferLeaderResponse { leader_id: leader, term }))
                }
                Some(other) if term > start_term || tokio::time::Instant::now() >= deadline => {
                    return Err(Status::failed_precondition(format!(
                        "node {other} won the election for term {term}; try again"
                    )))
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::deadline_exceeded("no leader emerged in time; try again"))
                }
                _ => {}
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline, metrics.changed()).await {
                return Err(Status::unavailable("the node is stopping"));
            }
        }
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<AddNodeResponse>, Status> {
        let forwarded = forwarded(&request);
        let add = request.into_inner();
        if add.id == 0 {
            return Err(invalid("id: must be at least 1"));
        }
        check_address(&add.raft_addr).map_err(|e| invalid(format!("raft_addr: {e}")))?;
        check_address(&add.api_addr).map_err(|e| invalid(format!("api_addr: {e}")))?;
        if let Some((existing, _)) = self.core.members().get(&add.id) {
            if existing.raft_addr != add.raft_addr {
                return Err(Status::already_exists(format!(
                    "id: node {} is already a member at {}; remove it first or choose another id",
                    add.id, existing.raft_addr
                )));
            }
        }
        let core = self.core.clone();
        let remote_add = add.clone();
        self.on_leader(
            forwarded,
            || async move {
                let node = MaosNode { raft_addr: add.raft_addr.clone(), api_addr: add.api_addr.clone() };
                // Blocking: returns once the learner has caught up, or not at all if it is
                // unreachable, hence the deadline. A learner that timed out stays a learner.
                tokio::time::timeout(core.request_timeout, core.raft.add_learner(add.id, node, true))
                    .await
                    .map_err(|_| {
                        Status::deadline_exceeded(format!(
                            "node {} was added as a learner but did not catch up within {} ms; check that it runs and is reachable at {}, then run add-node again, or remove-node {}",
                            add.id,
                            core.request_timeout.as_millis(),
                            add.raft_addr,
                            add.id
                        ))
                    })?
                    .map_err(membership_status)?;
                if !add.learner_only {
                    let voters = BTreeSet::from([add.id]);
                    core.raft
                        .change_membership(ChangeMembers::AddVoterIds(voters), false)
                        .await
                        .map_err(membership_status)?;
                }
                Ok(Response::new(AddNodeResponse { members: member_list(&core) }))
            },
            |mut client| async move { client.add_node(mark_forwarded(remote_add)).await },
        )
        .await
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<RemoveNodeResponse>, Status> {
        let forwarded = forwarded(&request);
        let id = request.into_inner().id;
        let members = self.core.members();
        let Some((_, voter)) = members.get(&id) else {
            return Err(Status::not_found(format!("id: node {id} is not a member")));
        };
        let voter = *voter;
        let core = self.core.clone();
        self.on_leader(
            forwarded,
            || async move {
                let ids = BTreeSet::from([id]);
                let change = if voter { ChangeMembers::RemoveVoters(ids) } else { ChangeMembers::RemoveNodes(ids) };
                core.raft.change_membership(change, false).await.map_err(membership_status)?;
                Ok(Response::new(RemoveNodeResponse { members: member_list(&core) }))
            },
            |mut client| async move { client.remove_node(mark_forwarded(RemoveNodeRequest { id })).await },
        )
        .await
    }
}
