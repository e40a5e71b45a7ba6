//! The key-value service: the coordination space (compare-and-set, TTLs, watches), with agent
//! credential scopes and, with Redis, `scratch/` keys kept there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use maos_client::proto::v1::kv_service_server::KvService;
use maos_client::proto::v1::*;
use maos_raft_store::state::check_command;
use maos_raft_store::{Command, Rejection, Response as Applied};
use tonic::{Request, Response, Status};

use crate::agents::credential::{AgentScope, Credentials};
use crate::api::status::{invalid, status_from, status_of_rejection, storage_status, unexpected};
use crate::api::streams::{next_poll, stream_permit};
use crate::raft::core::{CoreError, NodeCore};
use crate::storage::Storage;

/// Keys one watch follows, at most; events queued on it.
const WATCH_KEYS_MAX: usize = 10_000;
const WATCH_QUEUE: usize = 256;

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
    /// A call carrying an agent credential (`maos1:…`) may only touch its workflow's keys, and
    /// only while its lease is current. Other calls passed the auth layer (`auth.rs`) as a
    /// principal with the key-value permission: unrestricted.
    fn check_scope<T>(&self, request: &Request<T>, key: &str) -> Result<Option<AgentScope>, Status> {
        let Some(header) = request.metadata().get("authorization") else { return Ok(None) };
        let Some(credential) = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).map(str::trim) else {
            return Ok(None);
        };
        if !credential.starts_with(crate::agents::credential::PREFIX) {
            return Ok(None);
        }
        let scope = self.credentials.verify(credential).map_err(|e| Status::unauthenticated(e.to_string()))?;
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
            let revision = cache.scratch_put(key, value, ttl_ms).await.map_err(|e| storage_status(&e))?;
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
            let found = cache.scratch_get(&key).await.map_err(|e| storage_status(&e))?;
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
            let existed = cache.scratch_delete(&key).await.map_err(|e| storage_status(&e))?;
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
        let permit = stream_permit(&self.streams)?;
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
                if !next_poll(&mut changes, &sender).await {
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
