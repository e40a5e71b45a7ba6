//! Task data: inputs, results and checkpoints, behind one boundary with two implementations
//! chosen by configuration.
//!
//! - **Embedded** (no `database.primary_url`): the data lives in the replicated state machine,
//!   within its size limits (`TASK_TEXT_BYTES_MAX`, `CHECKPOINT_BYTES_MAX`). A cluster with no
//!   outside service is still fully replicated.
//! - **PostgreSQL** (`postgres.rs`): inputs, results and checkpoints are rows; the replicated
//!   state holds only references (`TaskSpec::input_stored`, `Task::result_token`,
//!   `Checkpoint::stored`). Results and checkpoints are written under the lease's fencing token and
//!   the write is conditional on it in SQL, so a stale owner changes no row. The leader also mirrors
//!   the task table and its event history into PostgreSQL (`projector.rs`), and API nodes append to
//!   the audit log.
//!
//! Redis (`cache.rs`) is optional on top of either: a read cache of stored payloads and agents'
//! scratch state. Nothing here is needed for correctness; when Redis is down reads go to the
//! source.
//!
//! Errors are this layer's own ([`StorageError`]); the API maps them to wire statuses
//! (`api/status.rs`). Nothing here knows tonic or the node's write path.
//!
//! Order of writes: a payload is written to the store before the Raft command that refers to it,
//! so every reference a client can see points at durable data. A payload whose command never
//! committed is unreachable (nothing refers to it) and is swept (`projector.rs`).

pub mod audit_file;
pub(crate) mod cache;
mod evicted;
pub mod postgres;
pub(crate) mod projector;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::tasks::{
    aggregate_results, plan_key, Task, TaskCommand, TaskId, TaskTable, CHECKPOINT_BYTES_MAX, TASK_TEXT_BYTES_MAX,
};

use maos_raft_store::StateMachineHandle;

use crate::config::Config;

/// How deep a planned parent's aggregate follows nested plans when it is assembled on read.
const AGGREGATE_DEPTH_MAX: usize = 4;
/// Between retries of a write the store refused as unavailable.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A payload kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Payload {
    Input(TaskId),
    /// A result under the fencing token of the lease that completed the task.
    Result(TaskId, u64),
    Checkpoint(TaskId),
}

/// Where one task's result comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultRef {
    /// In the replicated state (or none yet).
    Inline(Option<String>),
    Stored(Payload),
    /// A planned parent whose children's results are stored: (plan key, child id, its result).
    Aggregate(Vec<(String, TaskId, ResultRef)>),
}

impl ResultRef {
    pub fn of(table: &TaskTable, task: &Task) -> Self {
        Self::at_depth(table, task, 0)
    }

    fn at_depth(table: &TaskTable, task: &Task, depth: usize) -> Self {
        if let Some(token) = task.result_token {
            return Self::Stored(Payload::Result(task.spec.id.clone(), token));
        }
        let aggregated_on_read = task.expanded
            && task.result.is_none()
            && task.state == maos_raft_store::tasks::TaskState::Completed
            && depth < AGGREGATE_DEPTH_MAX;
        if !aggregated_on_read {
            return Self::Inline(task.result.clone());
        }
        let children = table.children.get(&task.spec.id).into_iter().flatten().filter_map(|id| table.tasks.get(id));
        Self::Aggregate(
            children
                .map(|child| {
                    (plan_key(child).to_string(), child.spec.id.clone(), Self::at_depth(table, child, depth + 1))
                })
                .collect(),
        )
    }

    /// The payloads this result needs from the store.
    pub fn wanted(&self, out: &mut Vec<Payload>) {
        match self {
            Self::Inline(_) => {}
            Self::Stored(payload) => out.push(payload.clone()),
            Self::Aggregate(children) => children.iter().for_each(|(_, _, child)| child.wanted(out)),
        }
    }

    /// The result, from the inline text or `fetched`.
    pub fn resolve(&self, fetched: &BTreeMap<Payload, String>) -> Option<String> {
        match self {
            Self::Inline(text) => text.clone(),
            Self::Stored(payload) => fetched.get(payload).cloned(),
            Self::Aggregate(children) => {
                let resolved: Vec<(&str, &str, String)> = children
                    .iter()
                    .map(|(key, id, child)| (key.as_str(), id.as_str(), child.resolve(fetched).unwrap_or_default()))
                    .collect();
                Some(aggregate_results(resolved.iter().map(|(k, id, r)| (*k, *id, r.as_str()))))
            }
        }
    }
}

/// Run `call` until it succeeds, fails otherwise than UNAVAILABLE, or the next try would pass
/// `deadline`; the tries back off from 100 ms to 2 s.
async fn retrying<T, F, Fut>(deadline: tokio::time::Instant, what: &str, mut call: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        match call().await {
            Err(error) if error.is_unavailable() && tokio::time::Instant::now() + backoff < deadline => {
                tracing::warn!(%error, "{what} waits for the task-data store");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

/// The payloads one task's view or envelope needs: its input, result and checkpoint.
#[derive(Debug, Clone, Default)]
pub struct TaskPayloads {
    pub input: Option<Payload>,
    pub result: Option<ResultRef>,
    pub checkpoint: Option<Payload>,
}

impl TaskPayloads {
    pub fn of(table: &TaskTable, task: &Task) -> Self {
        let id = &task.spec.id;
        Self {
            input: task.spec.input_stored.then(|| Payload::Input(id.clone())),
            result: Some(ResultRef::of(table, task)).filter(|r| !matches!(r, ResultRef::Inline(_))),
            checkpoint: task.checkpoint.as_ref().filter(|c| c.stored).map(|_| Payload::Checkpoint(id.clone())),
        }
    }

    pub fn wanted(&self, out: &mut Vec<Payload>) {
        out.extend(self.input.iter().cloned());
        out.extend(self.checkpoint.iter().cloned());
        if let Some(result) = &self.result {
            result.wanted(out);
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("the task-data store ({store}) is unavailable: {cause}; nothing was changed, retry when it is back")]
    Unavailable { store: String, cause: String },
    #[error("{what} of task {task_id}: fencing token {token} is stale (the store holds token {current}); this attempt no longer owns the task")]
    Stale { what: &'static str, task_id: TaskId, token: u64, current: u64 },
    #[error(
        "fencing_token: {token} is not a token MAOS issued (they are in 1..=2^63-1); use the one from the assignment"
    )]
    InvalidToken { token: u64 },
    #[error("{field}: {bytes} bytes, over the limit of {limit} ({hint})")]
    TooLarge { field: &'static str, bytes: usize, limit: usize, hint: &'static str },
    /// PostgreSQL text cannot hold U+0000; refused on every backend so that data moves between them.
    #[error("{field}: a NUL character (U+0000) at byte {at}, which task data cannot hold; encode binary data (for example as base64) or pass a reference")]
    NulCharacter { field: &'static str, at: usize },
    #[error("the task-data store ({store}) has no {what}: {detail}")]
    Corrupt { store: String, what: String, detail: String },
}

impl StorageError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// The payload itself is refused (too large, or holding a NUL): retrying cannot help.
    pub fn is_refused_payload(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::NulCharacter { .. })
    }
}

/// Counters on `/metrics`.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    pub database_connection_errors_total: AtomicU64,
    pub database_queries_total: AtomicU64,
    pub redis_errors_total: AtomicU64,
    pub cache_hits_total: AtomicU64,
    pub cache_misses_total: AtomicU64,
    pub events_recorded_total: AtomicU64,
    pub orphans_removed_total: AtomicU64,
}

impl StorageMetrics {
    /// Record the counters in the process's metrics registry (`/metrics`).
    pub fn publish(&self, backend: &'static str) {
        metrics::gauge!("maos_storage_backend", "backend" => backend).set(1.0);
        for (name, value) in [
            ("maos_database_connection_errors_total", &self.database_connection_errors_total),
            ("maos_database_queries_total", &self.database_queries_total),
            ("maos_redis_errors_total", &self.redis_errors_total),
            ("maos_cache_hits_total", &self.cache_hits_total),
            ("maos_cache_misses_total", &self.cache_misses_total),
            ("maos_task_events_recorded_total", &self.events_recorded_total),
            ("maos_orphan_payloads_removed_total", &self.orphans_removed_total),
        ] {
            metrics::counter!(name).absolute(value.load(Ordering::Relaxed));
        }
    }
}

enum Backend {
    Embedded,
    Postgres(postgres::PgStore),
}

/// The node's task-data store, and the cache in front of it.
pub struct Storage {
    backend: Backend,
    /// Embedded: the audit log's JSON lines in the data dir.
    audit_file: Option<audit_file::AuditFile>,
    cache: Option<cache::Cache>,
    pub metrics: Arc<StorageMetrics>,
}

impl Storage {
    /// The store `config` names. Connections are made on first use, so a node starts (and keeps
    /// its leases) while PostgreSQL or Redis is down.
    pub fn from_config(config: &Config) -> Result<Self, StorageError> {
        let metrics = Arc::new(StorageMetrics::default());
        let backend = match &config.database.primary_url {
            Some(url) => Backend::Postgres(postgres::PgStore::connect_lazy(url, &config.database, metrics.clone())?),
            None => Backend::Embedded,
        };
        let cache = match &config.redis.url {
            Some(url) => Some(cache::Cache::new(url, &config.redis, metrics.clone())?),
            None => None,
        };
        let audit_file =
            matches!(backend, Backend::Embedded).then(|| audit_file::AuditFile::start(&config.node.data_dir));
        Ok(Self { backend, audit_file, cache, metrics })
    }

    /// The newest `limit` audit records at or after `since_ms` (of `principal`, if not empty):
    /// from PostgreSQL's `audit_log` (every node's), else from this node's `audit.jsonl`.
    pub async fn audit_list(
        &self,
        since_ms: u64,
        principal: &str,
        limit: usize,
    ) -> Result<Vec<audit_file::AuditRecord>, StorageError> {
        match (&self.backend, &self.audit_file) {
            (Backend::Postgres(store), _) => store.audit_list(since_ms, principal, limit).await,
            (Backend::Embedded, Some(file)) => file
                .list(since_ms, principal, limit)
                .map_err(|e| StorageError::Unavailable { store: "the audit file".into(), cause: e.to_string() }),
            (Backend::Embedded, None) => Ok(Vec::new()),
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self.backend, Backend::Embedded)
    }

    pub fn postgres(&self) -> Option<&postgres::PgStore> {
        match &self.backend {
            Backend::Postgres(store) => Some(store),
            Backend::Embedded => None,
        }
    }

    pub fn cache(&self) -> Option<&cache::Cache> {
        self.cache.as_ref()
    }

    /// `embedded` or `postgresql`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Embedded => "embedded",
            Backend::Postgres(_) => "postgresql",
        }
    }

    /// Whether the store answers (for `/ready`); `Ok` names it.
    pub async fn check(&self) -> Result<String, String> {
        match &self.backend {
            Backend::Embedded => Ok("task data embedded in the replicated state".into()),
            Backend::Postgres(store) => store.ping().await.map(|()| format!("PostgreSQL at {}", store.name)),
        }
    }

    /// Write a submit's input before its Raft entry; returns whether it is stored (the spec then
    /// carries a reference instead of the text). The caller has checked it (`check_payload`).
    pub async fn stage_input(&self, task_id: &str, input: &str) -> Result<bool, StorageError> {
        match &self.backend {
            Backend::Embedded => Ok(false),
            Backend::Postgres(_) if input.is_empty() => Ok(false),
            Backend::Postgres(store) => {
                store.put_input(task_id, input).await?;
                // Written through, so the attempt that runs it reads it from the cache.
                if let Some(cache) = &self.cache {
                    cache.put_payloads(&BTreeMap::from([(Payload::Input(task_id.into()), input.to_string())]));
                }
                Ok(true)
            }
        }
    }

    /// Drop the staged input of a submit that turned out a duplicate (its first submit's task
    /// stands); the sweep removes any this misses.
    pub async fn discard_input(&self, task_id: &str) {
        if let Backend::Postgres(store) = &self.backend {
            if let Err(error) = store.delete_input(task_id).await {
                tracing::debug!(task_id, %error, "a staged input was left for the sweep");
            }
        }
    }

    /// Refuse a write under `token` when this node already knows a newer lease on the task: the
    /// store is never touched for a token known to be stale. (A token newer than this node knows
    /// is let through; the conditional write in SQL and the Raft command then decide.)
    fn check_known_token(
        &self,
        state: &StateMachineHandle,
        what: &'static str,
        task_id: &str,
        token: u64,
    ) -> Result<(), StorageError> {
        let state = state.read();
        let current = state.app.tasks.tasks.get(task_id).and_then(|t| t.lease.as_ref()).map(|l| l.token);
        match current {
            Some(current) if current > token => {
                Err(StorageError::Stale { what, task_id: task_id.into(), token, current })
            }
            _ => Ok(()),
        }
    }

    /// Refuse a payload `field` over this store's limit for it, or holding a NUL, naming the fix.
    pub fn check_payload(&self, field: &'static str, text: &str) -> Result<(), StorageError> {
        let bytes = text.len();
        let (limit, hint) = match (&self.backend, field) {
            (Backend::Embedded, "checkpoint") => {
                (CHECKPOINT_BYTES_MAX, "keep checkpoints small: save a reference to bulky state")
            }
            (Backend::Embedded, _) => {
                (TASK_TEXT_BYTES_MAX, "configure database.primary_url for larger payloads, or pass a reference")
            }
            (Backend::Postgres(store), _) => {
                (store.payload_bytes_max, "raise database.payload_bytes_max, or pass a reference (a URL or a path)")
            }
        };
        if bytes > limit {
            return Err(StorageError::TooLarge { field, bytes, limit, hint });
        }
        match text.find('\0') {
            Some(at) => Err(StorageError::NulCharacter { field, at }),
            None => Ok(()),
        }
    }

    /// The `Complete` command for `result`, after writing it under `token` where it is stored.
    pub async fn complete_command(
        &self,
        state: &StateMachineHandle,
        task_id: &str,
        token: u64,
        result: String,
    ) -> Result<TaskCommand, StorageError> {
        self.check_payload("result", &result)?;
        let Backend::Postgres(store) = &self.backend else {
            return Ok(TaskCommand::Complete { task_id: task_id.into(), token, result, stored: false });
        };
        self.check_known_token(state, "result", task_id, token)?;
        store.put_result(task_id, token, &result).await?;
        Ok(TaskCommand::Complete { task_id: task_id.into(), token, result: String::new(), stored: true })
    }

    /// The `SaveCheckpoint` command for `data`, after writing it under `token` where it is stored.
    pub async fn checkpoint_command(
        &self,
        state: &StateMachineHandle,
        task_id: &str,
        token: u64,
        data: String,
    ) -> Result<TaskCommand, StorageError> {
        self.check_payload("checkpoint", &data)?;
        let Backend::Postgres(store) = &self.backend else {
            return Ok(TaskCommand::SaveCheckpoint { task_id: task_id.into(), token, data, stored: false });
        };
        self.check_known_token(state, "checkpoint", task_id, token)?;
        store.put_checkpoint(task_id, token, &data).await?;
        Ok(TaskCommand::SaveCheckpoint { task_id: task_id.into(), token, data: String::new(), stored: true })
    }

    /// Like [`Self::complete_command`], retrying while the store is unavailable, until `deadline`.
    pub async fn complete_command_retrying(
        &self,
        state: &StateMachineHandle,
        task_id: &str,
        token: u64,
        result: String,
        deadline: tokio::time::Instant,
    ) -> Result<TaskCommand, StorageError> {
        retrying(deadline, "a result", || self.complete_command(state, task_id, token, result.clone())).await
    }

    /// The stored payloads in `wanted` (the cache first, then the store). Inputs and results never
    /// change once referenced, so a cached copy is always current; checkpoints are not cached.
    pub async fn fetch(&self, mut wanted: Vec<Payload>) -> Result<BTreeMap<Payload, String>, StorageError> {
        wanted.sort();
        wanted.dedup();
        let mut found = BTreeMap::new();
        let Backend::Postgres(store) = &self.backend else {
            return Ok(found);
        };
        if wanted.is_empty() {
            return Ok(found);
        }
        if let Some(cache) = &self.cache {
            found = cache.get_payloads(&wanted).await;
        }
        let missing: Vec<Payload> = wanted.into_iter().filter(|p| !found.contains_key(p)).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        let loaded = store.get_payloads(&missing).await?;
        if let Some(cache) = &self.cache {
            cache.put_payloads(&loaded);
        }
        found.extend(loaded);
        Ok(found)
    }

    /// [`Self::fetch`], retrying while the store is unavailable, until `deadline`.
    pub async fn fetch_retrying(
        &self,
        wanted: Vec<Payload>,
        deadline: tokio::time::Instant,
    ) -> Result<BTreeMap<Payload, String>, StorageError> {
        retrying(deadline, "an attempt's data", || self.fetch(wanted.clone())).await
    }

    /// Append to the audit log (PostgreSQL only; best effort, off the request's path).
    pub fn audit(&self, node_id: u64, principal: &str, action: &str, target: &str, detail: serde_json::Value) {
        if let Backend::Postgres(store) = &self.backend {
            store.audit(node_id, principal, action, target, detail);
        } else if let Some(file) = &self.audit_file {
            let at_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            file.record(audit_file::AuditRecord {
                at_ms,
                node_id,
                principal: principal.to_string(),
                action: action.to_string(),
                target: target.to_string(),
                detail,
            });
        }
    }
}

/// The stored payloads an attempt's envelope needs: its input, its dependencies' results and its
/// checkpoint.
#[derive(Debug, Clone, Default)]
pub struct EnvelopeNeeds {
    pub input: Option<Payload>,
    pub dependencies: Vec<(TaskId, ResultRef)>,
    pub checkpoint: Option<Payload>,
}

impl EnvelopeNeeds {
    pub fn wanted(&self) -> Vec<Payload> {
        let mut out: Vec<Payload> = self.input.iter().chain(self.checkpoint.iter()).cloned().collect();
        self.dependencies.iter().for_each(|(_, result)| result.wanted(&mut out));
        out
    }

    pub fn is_empty(&self) -> bool {
        self.input.is_none() && self.dependencies.is_empty() && self.checkpoint.is_none()
    }

    /// Fill `fetched` into the envelope's parts: (input, dependency results, checkpoint data).
    pub fn fill(
        &self,
        fetched: &BTreeMap<Payload, String>,
        input: &mut String,
        dependency_results: &mut BTreeMap<String, String>,
        checkpoint: Option<&mut String>,
    ) {
        if let Some(text) = self.input.as_ref().and_then(|p| fetched.get(p)) {
            *input = text.clone();
        }
        for (task_id, result) in &self.dependencies {
            if let Some(text) = result.resolve(fetched) {
                dependency_results.insert(task_id.clone(), text);
            }
        }
        if let (Some(data), Some(text)) = (checkpoint, self.checkpoint.as_ref().and_then(|p| fetched.get(p))) {
            *data = text.clone();
        }
    }
}
