//! The PostgreSQL task-data store (sqlx).
//!
//! Queries are built at run time (`sqlx::query`, not the `query!` macros): CI builds with no
//! database, and offline query data would be one more file to keep in step with the schema. The
//! schema is in `node/migrations/`, embedded in the binary by `sqlx::migrate!` and applied by
//! `maos db migrate` (or at start, with `database.auto_migrate`). The tests run every query
//! against a real server.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::mpsc;

use super::{Payload, StorageError, StorageMetrics};
use crate::config::DatabaseSection;

/// The schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Audit entries waiting to be written, at most; past it new entries are dropped (and logged).
const AUDIT_QUEUE_MAX: usize = 4_096;
/// Inputs or results waiting to be written, at most; past it writers wait (backpressure).
const WRITE_QUEUE_MAX: usize = 16_384;
/// Inputs or results written in one statement (one commit), at most.
const WRITE_BATCH_MAX: usize = 512;
/// Batches of each kind in flight at once.
const WRITERS: usize = 4;
/// Audit entries written in one statement, at most.
const AUDIT_BATCH_MAX: usize = 256;

/// One task row of the leader's mirror, with the event it entered its state by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub task_id: String,
    pub task_type: String,
    pub priority: String,
    pub state: String,
    pub attempt: i32,
    pub submitter: String,
    pub parent: Option<String>,
    pub cause: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub node_id: Option<i64>,
    pub fencing_token: Option<i64>,
}

/// One key of the leader's mirror of the replicated key-value space (`shared_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStateRow {
    pub key: String,
    pub value: String,
    pub revision: i64,
    pub updated_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

impl TaskRow {
    /// The event this row records, as published on Redis.
    pub fn event_json(&self) -> String {
        serde_json::json!({
            "task_id": self.task_id,
            "state": self.state,
            "attempt": self.attempt,
            "node_id": self.node_id,
            "fencing_token": self.fencing_token,
            "cause": self.cause,
            "at_ms": self.updated_at_ms,
        })
        .to_string()
    }
}

/// A migration as `maos db status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationStatus {
    pub version: i64,
    pub description: String,
    /// When it was applied; `None`: pending.
    pub installed_on: Option<String>,
}

/// One payload on its way to the database, and where its outcome goes. `token` is 0 for an
/// input (inputs are not fenced).
struct PayloadWrite {
    task_id: String,
    token: i64,
    value: String,
    done: tokio::sync::oneshot::Sender<Result<(), StorageError>>,
}

/// Reads waiting, at most; past it readers wait (backpressure).
const READ_QUEUE_MAX: usize = 16_384;
/// Reads merged into one set of queries, at most.
const READ_BATCH_MAX: usize = 256;
/// Merged reads in flight at once.
const READERS: usize = 4;

/// One caller's read, and where its answer goes.
struct PayloadRead {
    wanted: Vec<Payload>,
    done: tokio::sync::oneshot::Sender<Result<BTreeMap<Payload, String>, StorageError>>,
}

/// What a batch writer writes.
#[derive(Clone, Copy)]
enum WriteKind {
    Inputs,
    Results,
}

struct AuditEntry {
    node_id: i64,
    principal: String,
    action: String,
    target: String,
    detail: serde_json::Value,
}

pub struct PgStore {
    pub pool: PgPool,
    /// `host:port/database`, for messages (never the password).
    pub name: String,
    pub payload_bytes_max: usize,
    metrics: Arc<StorageMetrics>,
    audit: mpsc::Sender<AuditEntry>,
    /// Concurrent submits' inputs, and concurrent completions' results, are written in shared
    /// statements: one round trip and one commit for many, which is what bounds throughput.
    inputs: mpsc::Sender<PayloadWrite>,
    results: mpsc::Sender<PayloadWrite>,
    /// Concurrent reads (attempts starting, API reads) are merged the same way.
    reads: mpsc::Sender<PayloadRead>,
}

impl PgStore {
    /// A pool that connects on first use; must be called inside a tokio runtime.
    pub fn connect_lazy(
        url: &str,
        settings: &DatabaseSection,
        metrics: Arc<StorageMetrics>,
    ) -> Result<Self, StorageError> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StorageError::Unavailable {
            store: "PostgreSQL (database.primary_url)".into(),
            cause: format!("the URL is not valid: {}", redact(&e.to_string(), url)),
        })?;
        let name = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default database)")
        );
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool_size)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(settings.pool_timeout))
            .max_lifetime(Duration::from_secs(settings.pool_recycle))
            .connect_lazy_with(options);
        let (audit, queued) = mpsc::channel(AUDIT_QUEUE_MAX);
        let (inputs, queued_inputs) = mpsc::channel(WRITE_QUEUE_MAX);
        let (results, queued_results) = mpsc::channel(WRITE_QUEUE_MAX);
        let (reads, queued_reads) = mpsc::channel(READ_QUEUE_MAX);
        let payload_bytes_max = settings.payload_bytes_max;
        let store = Self { pool, name, payload_bytes_max, metrics, audit, inputs, results, reads };
        let queued_reads = Arc::new(tokio::sync::Mutex::new(queued_reads));
        for _ in 0..READERS {
            let (pool, name, metrics) = (store.pool.clone(), store.name.clone(), store.metrics.clone());
            tokio::spawn(read_batches(pool, name, metrics, queued_reads.clone()));
        }
        tokio::spawn(write_audit(store.pool.clone(), store.name.clone(), store.metrics.clone(), queued));
        for (kind, queued) in [(WriteKind::Inputs, queued_inputs), (WriteKind::Results, queued_results)] {
            let queued = Arc::new(tokio::sync::Mutex::new(queued));
            for _ in 0..WRITERS {
                let (pool, name, metrics) = (store.pool.clone(), store.name.clone(), store.metrics.clone());
                tokio::spawn(write_batches(kind, pool, name, metrics, queued.clone()));
            }
        }
        Ok(store)
    }

    /// Map a sqlx error: no connection (or a server going away) is UNAVAILABLE and counted.
    pub fn error(&self, error: sqlx::Error) -> StorageError {
        map_error(&self.name, &self.metrics, error)
    }
}

/// See [`PgStore::error`].
fn map_error(name: &str, metrics: &StorageMetrics, error: sqlx::Error) -> StorageError {
    let unavailable = |cause: String| {
        metrics.database_connection_errors_total.fetch_add(1, Ordering::Relaxed);
        StorageError::Unavailable { store: format!("PostgreSQL at {name}"), cause }
    };
    match &error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // 08: connection exception, 53: insufficient resources, 57: operator
            // intervention (shutdown, starting up).
            if ["08", "53", "57"].iter().any(|class| code.starts_with(class)) {
                unavailable(db.message().to_string())
            } else if code == "42P01" {
                StorageError::Unavailable {
                    store: format!("PostgreSQL at {name}"),
                    cause: format!("the schema is missing ({}); run `maos db migrate`", db.message()),
                }
            } else {
                StorageError::Corrupt {
                    store: format!("PostgreSQL at {name}"),
                    what: "valid answer".into(),
                    detail: format!("{} (SQLSTATE {code})", db.message()),
                }
            }
        }
        sqlx::Error::RowNotFound | sqlx::Error::ColumnNotFound(_) | sqlx::Error::ColumnDecode { .. } => {
            StorageError::Corrupt {
                store: format!("PostgreSQL at {name}"),
                what: "valid row".into(),
                detail: error.to_string(),
            }
        }
        _ => unavailable(error.to_string()),
    }
}

impl PgStore {
    fn counted(&self) {
        self.metrics.database_queries_total.fetch_add(1, Ordering::Relaxed);
    }

    pub async fn ping(&self) -> Result<(), String> {
        self.counted();
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(|e| self.error(e).to_string())
    }

    /// Apply pending migrations (concurrent callers wait on the migrator's advisory lock).
    pub async fn migrate(&self) -> Result<(), StorageError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => self.error(inner),
            other => StorageError::Corrupt {
                store: format!("PostgreSQL at {}", self.name),
                what: "schema this build knows".into(),
                detail: other.to_string(),
            },
        })
    }

    /// Every migration this build carries, and whether the database has it.
    pub async fn migration_status(&self) -> Result<Vec<MigrationStatus>, StorageError> {
        self.counted();
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        let mut applied: BTreeMap<i64, String> = BTreeMap::new();
        if exists {
            let rows = sqlx::query(
                "SELECT version, to_char(installed_on, 'YYYY-MM-DD\"T\"HH24:MI:SSOF') AS at FROM _sqlx_migrations WHERE success",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
            for row in rows {
                applied.insert(
                    row.try_get("version").map_err(|e| self.error(e))?,
                    row.try_get("at").map_err(|e| self.error(e))?,
                );
            }
        }
        Ok(MIGRATOR
            .iter()
            .map(|m| MigrationStatus {
                version: m.version,
                description: m.description.to_string(),
                installed_on: applied.get(&m.version).cloned(),
            })
            .collect())
    }

    /// Write a submit's input; answered once it is committed (with other submits' inputs).
    pub async fn put_input(&self, task_id: &str, input: &str) -> Result<(), StorageError> {
        self.queue(&self.inputs, task_id, 0, input).await
    }

    async fn queue(
        &self,
        queue: &mpsc::Sender<PayloadWrite>,
        task_id: &str,
        token: i64,
        value: &str,
    ) -> Result<(), StorageError> {
        let stopped = || StorageError::Unavailable {
            store: format!("PostgreSQL at {}", self.name),
            cause: "the batch writer stopped (the node is shutting down)".into(),
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        let write = PayloadWrite { task_id: task_id.into(), token, value: value.into(), done };
        queue.send(write).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub async fn delete_input(&self, task_id: &str) -> Result<(), StorageError> {
        self.counted();
        sqlx::query("DELETE FROM task_inputs WHERE task_id = $1")
            .bind(task_id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Write a result under `token`, only over a smaller token. The first write under a token
    /// wins (one result per attempt); a write under a smaller token than the row's is stale.
    pub async fn put_result(&self, task_id: &str, token: u64, result: &str) -> Result<(), StorageError> {
        let token_sql = token_i64(token)?;
        match self.queue(&self.results, task_id, token_sql, result).await {
            // The batch did not change the row: a retry of this attempt's write, or stale.
            Err(StorageError::Stale { .. }) => self.fence_outcome(task_id, token, "result", "task_results").await,
            other => other,
        }
    }

    /// Write a checkpoint under `token`, over the same or a smaller token (an attempt replaces
    /// its own).
    pub async fn put_checkpoint(&self, task_id: &str, token: u64, data: &str) -> Result<(), StorageError> {
        self.counted();
        // The condition is the fence: the row changes only under a token at least its own.
        let done = sqlx::query(
            "INSERT INTO task_checkpoints (task_id, fencing_token, data) VALUES ($1, $2, $3) \
             ON CONFLICT (task_id) DO UPDATE SET fencing_token = EXCLUDED.fencing_token, data = EXCLUDED.data, \
                 saved_at = now() \
             WHERE task_checkpoints.fencing_token <= EXCLUDED.fencing_token",
        )
        .bind(task_id)
        .bind(token_i64(token)?)
        .bind(data)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        self.fence_outcome(task_id, token, "checkpoint", "task_checkpoints").await
    }

    /// After a fenced write changed no row: success when the row holds this very token (a
    /// retried write; the first one stands), else stale.
    async fn fence_outcome(
        &self,
        task_id: &str,
        token: u64,
        what: &'static str,
        table: &str,
    ) -> Result<(), StorageError> {
        let token_sql = token_i64(token)?;
        self.counted();
        let current: i64 = sqlx::query_scalar(&format!("SELECT fencing_token FROM {table} WHERE task_id = $1"))
            .bind(task_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        if current == token_sql {
            // A retried write of this attempt's result: the first one stands.
            return Ok(());
        }
        Err(StorageError::Stale { what, task_id: task_id.into(), token, current: u64::try_from(current).unwrap_or(0) })
    }

    /// The payloads in `wanted` that the store holds (a result only under the wanted token).
    /// Concurrent callers' reads are merged into shared queries.
    pub async fn get_payloads(&self, wanted: &[Payload]) -> Result<BTreeMap<Payload, String>, StorageError> {
        let stopped = || StorageError::Unavailable {
            store: format!("PostgreSQL at {}", self.name),
            cause: "the batch reader stopped (the node is shutting down)".into(),
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        self.reads.send(PayloadRead { wanted: wanted.to_vec(), done }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Mirror task rows and record the events they entered their states by, in one transaction.
    pub async fn project(&self, rows: &[TaskRow]) -> Result<u64, StorageError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let column = |f: fn(&TaskRow) -> String| rows.iter().map(f).collect::<Vec<String>>();
        let ids = column(|r| r.task_id.clone());
        let types = column(|r| r.task_type.clone());
        let priorities = column(|r| r.priority.clone());
        let states = column(|r| r.state.clone());
        let submitters = column(|r| r.submitter.clone());
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let parents: Vec<Option<String>> = rows.iter().map(|r| r.parent.clone()).collect();
        let causes: Vec<Option<String>> = rows.iter().map(|r| r.cause.clone()).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_at_ms).collect();
        let updated: Vec<i64> = rows.iter().map(|r| r.updated_at_ms).collect();
        let nodes: Vec<Option<i64>> = rows.iter().map(|r| r.node_id).collect();
        let tokens: Vec<Option<i64>> = rows.iter().map(|r| r.fencing_token).collect();
        let mut transaction = self.pool.begin().await.map_err(|e| self.error(e))?;
        self.counted();
        sqlx::query(
            "INSERT INTO tasks (task_id, task_type, priority, state, attempt, submitter, parent, cause, created_at, updated_at) \
             SELECT t.id, t.ty, t.pr, t.st, t.at, t.su, t.pa, t.ca, to_timestamp(t.cr / 1000.0), to_timestamp(t.up / 1000.0) \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[]) \
                  AS t(id, ty, pr, st, at, su, pa, ca, cr, up) \
             ON CONFLICT (task_id) DO UPDATE SET state = EXCLUDED.state, attempt = EXCLUDED.attempt, \
                  cause = EXCLUDED.cause, updated_at = EXCLUDED.updated_at",
        )
        .bind(&ids)
        .bind(&types)
        .bind(&priorities)
        .bind(&states)
        .bind(&attempts)
        .bind(&submitters)
        .bind(&parents)
        .bind(&causes)
        .bind(&created)
        .bind(&updated)
        .execute(&mut *transaction)
        .await
        .map_err(|e| self.error(e))?;
        self.counted();
        // A task retried by an operator starts its attempts again: its later events update the
        // earlier rows of the same (attempt, state).
        let events = sqlx::query(
            "INSERT INTO task_events (task_id, state, attempt, node_id, fencing_token, cause, at) \
             SELECT t.id, t.st, t.at, t.no, t.tk, t.ca, to_timestamp(t.up / 1000.0) \
             FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[]) \
                  AS t(id, st, at, no, tk, ca, up) \
             ON CONFLICT (task_id, attempt, state) DO UPDATE SET at = EXCLUDED.at, node_id = EXCLUDED.node_id, \
                  fencing_token = EXCLUDED.fencing_token, cause = EXCLUDED.cause \
             WHERE task_events.at < EXCLUDED.at",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&attempts)
        .bind(&nodes)
        .bind(&tokens)
        .bind(&causes)
        .bind(&updated)
        .execute(&mut *transaction)
        .await
        .map_err(|e| self.error(e))?;
        transaction.commit().await.map_err(|e| self.error(e))?;
        Ok(events.rows_affected())
    }

    /// Every key of the shared-state mirror with its revision (a new leader starts from these).
    pub async fn shared_state_revisions(&self) -> Result<BTreeMap<String, i64>, StorageError> {
        self.counted();
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, revision FROM shared_state")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(rows.into_iter().collect())
    }

    /// Write the changed keys of the shared-state mirror and remove the keys gone from the
    /// replicated space, in one transaction. A row is never replaced by an older revision, and a
    /// removal applies only to the revision it was decided on: a deposed leader's late round
    /// cannot undo a newer leader's.
    pub async fn project_shared_state(
        &self,
        rows: &[SharedStateRow],
        removed: &[(String, i64)],
    ) -> Result<(), StorageError> {
        if rows.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let mut transaction = self.pool.begin().await.map_err(|e| self.error(e))?;
        if !rows.is_empty() {
            let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
            let values: Vec<&str> = rows.iter().map(|r| r.value.as_str()).collect();
            let revisions: Vec<i64> = rows.iter().map(|r| r.revision).collect();
            let updated: Vec<i64> = rows.iter().map(|r| r.updated_at_ms).collect();
            let expires: Vec<Option<i64>> = rows.iter().map(|r| r.expires_at_ms).collect();
            self.counted();
            sqlx::query(
                "INSERT INTO shared_state (key, value, revision, updated_at, expires_at) \
                 SELECT t.k, t.v, t.r, to_timestamp(t.u / 1000.0), to_timestamp(t.e / 1000.0) \
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) AS t(k, v, r, u, e) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, revision = EXCLUDED.revision, \
                      updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at \
                 WHERE shared_state.revision < EXCLUDED.revision",
            )
            .bind(&keys)
            .bind(&values)
            .bind(&revisions)
            .bind(&updated)
            .bind(&expires)
            .execute(&mut *transaction)
            .await
            .map_err(|e| self.error(e))?;
        }
        if !removed.is_empty() {
            let keys: Vec<&str> = removed.iter().map(|(k, _)| k.as_str()).collect();
            let revisions: Vec<i64> = removed.iter().map(|(_, r)| *r).collect();
            self.counted();
            sqlx::query(
                "DELETE FROM shared_state s USING UNNEST($1::text[], $2::bigint[]) AS g(k, r) \
                 WHERE s.key = g.k AND s.revision <= g.r",
            )
            .bind(&keys)
            .bind(&revisions)
            .execute(&mut *transaction)
            .await
            .map_err(|e| self.error(e))?;
        }
        transaction.commit().await.map_err(|e| self.error(e))
    }

    /// Inputs older than `age` that no task row refers to, at most `limit` (sweep candidates; the
    /// caller checks them against the replicated state before deleting).
    pub async fn orphan_candidates(&self, age: Duration, limit: i64) -> Result<Vec<String>, StorageError> {
        self.counted();
        sqlx::query_scalar(
            "SELECT i.task_id FROM task_inputs i \
             WHERE i.created_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.task_id = i.task_id) \
             ORDER BY i.created_at LIMIT $2",
        )
        .bind(age.as_secs_f64())
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    pub async fn delete_inputs(&self, task_ids: &[String]) -> Result<u64, StorageError> {
        self.counted();
        let done = sqlx::query("DELETE FROM task_inputs WHERE task_id = ANY($1)")
            .bind(task_ids)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(done.rows_affected())
    }

    /// Queue an audit entry; written in the background.
    pub fn audit(&self, node_id: u64, principal: &str, action: &str, target: &str, detail: serde_json::Value) {
        let entry = AuditEntry {
            node_id: i64::try_from(node_id).unwrap_or(i64::MAX),
            principal: pg_text(principal),
            action: pg_text(action),
            target: pg_text(target),
            detail: pg_json(&detail),
        };
        if self.audit.try_send(entry).is_err() {
            tracing::warn!(action, target, "the audit queue is full (PostgreSQL slow or down); an entry was dropped");
        }
    }
}

/// `text` as PostgreSQL text can hold it: a NUL (U+0000), which it cannot, becomes U+FFFD. Only
/// for the copies kept for reports (the mirror, the audit log); a payload with a NUL is refused.
pub fn pg_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// `value` with [`pg_text`] applied to every string in it (jsonb cannot hold `\u0000` either).
fn pg_json(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(text) => Value::String(pg_text(text)),
        Value::Array(items) => Value::Array(items.iter().map(pg_json).collect()),
        Value::Object(fields) => Value::Object(fields.iter().map(|(k, v)| (pg_text(k), pg_json(v))).collect()),
        other => other.clone(),
    }
}

/// The token as PostgreSQL's bigint.
fn token_i64(token: u64) -> Result<i64, StorageError> {
    i64::try_from(token).ok().filter(|t| *t > 0).ok_or(StorageError::InvalidToken { token })
}

/// `text` with the URL's password (if any) replaced.
pub(super) fn redact(text: &str, url: &str) -> String {
    match url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).and_then(|(auth, _)| auth.split_once(':')) {
        Some((_, password)) if !password.is_empty() => text.replace(password, "***"),
        _ => text.to_string(),
    }
}

/// Write queued payloads of one kind, a batch per statement, until the store is dropped.
/// Results are fenced like single writes: a row changes only under a larger token, and a write
/// that changed no row is answered `Stale` for the caller to resolve (see `put_result`).
async fn write_batches(
    kind: WriteKind,
    pool: PgPool,
    name: String,
    metrics: Arc<StorageMetrics>,
    queued: Arc<tokio::sync::Mutex<mpsc::Receiver<PayloadWrite>>>,
) {
    let mut batch: Vec<PayloadWrite> = Vec::with_capacity(WRITE_BATCH_MAX);
    loop {
        if queued.lock().await.recv_many(&mut batch, WRITE_BATCH_MAX).await == 0 {
            return;
        }
        // One row per task (a statement may not change a row twice): the largest token wins the
        // statement; the others learn their outcome from the row afterwards.
        let mut rows: BTreeMap<&str, (i64, &str)> = BTreeMap::new();
        for write in &batch {
            let entry = rows.entry(&write.task_id).or_insert((write.token, &write.value));
            if write.token > entry.0 {
                *entry = (write.token, &write.value);
            }
        }
        let ids: Vec<&str> = rows.keys().copied().collect();
        let tokens: Vec<i64> = rows.values().map(|(t, _)| *t).collect();
        let values: Vec<&str> = rows.values().map(|(_, v)| *v).collect();
        metrics.database_queries_total.fetch_add(1, Ordering::Relaxed);
        let written: Result<Vec<(String, i64)>, StorageError> = match kind {
            WriteKind::Inputs => sqlx::query(
                "INSERT INTO task_inputs (task_id, input) SELECT * FROM UNNEST($1::text[], $2::text[]) \
                 ON CONFLICT (task_id) DO UPDATE SET input = EXCLUDED.input",
            )
            .bind(&ids)
            .bind(&values)
            .execute(&pool)
            .await
            .map(|_| rows.iter().map(|(id, (t, _))| (id.to_string(), *t)).collect()),
            WriteKind::Results => {
                sqlx::query_as(
                    "INSERT INTO task_results (task_id, fencing_token, result) \
                 SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[]) \
                 ON CONFLICT (task_id) DO UPDATE SET fencing_token = EXCLUDED.fencing_token, \
                     result = EXCLUDED.result, written_at = now() \
                 WHERE task_results.fencing_token < EXCLUDED.fencing_token \
                 RETURNING task_id, fencing_token",
                )
                .bind(&ids)
                .bind(&tokens)
                .bind(&values)
                .fetch_all(&pool)
                .await
            }
        }
        .map_err(|e| map_error(&name, &metrics, e));
        let written: Result<std::collections::BTreeSet<(String, i64)>, StorageError> =
            written.map(|rows| rows.into_iter().collect());
        for write in batch.drain(..) {
            let outcome = match &written {
                Err(error) => Err(error.clone()),
                Ok(rows) if rows.contains(&(write.task_id.clone(), write.token)) => Ok(()),
                Ok(_) => {
                    Err(StorageError::Stale { what: "result", task_id: write.task_id.clone(), token: 0, current: 0 })
                }
            };
            // The writer may have gone (its deadline passed); an input is then an orphan.
            let _ = write.done.send(outcome);
        }
    }
}

/// The payloads in `wanted` that the store holds (a result only under the wanted token), in at
/// most three queries.
async fn query_payloads(
    pool: &PgPool,
    name: &str,
    metrics: &StorageMetrics,
    wanted: &[Payload],
) -> Result<BTreeMap<Payload, String>, StorageError> {
    let error = |e: sqlx::Error| map_error(name, metrics, e);
    let counted = || metrics.database_queries_total.fetch_add(1, Ordering::Relaxed);
    let mut inputs = Vec::new();
    let mut results: BTreeMap<String, u64> = BTreeMap::new();
    let mut checkpoints = Vec::new();
    for payload in wanted {
        match payload {
            Payload::Input(id) => inputs.push(id.clone()),
            Payload::Result(id, token) => {
                results.insert(id.clone(), *token);
            }
            Payload::Checkpoint(id) => checkpoints.push(id.clone()),
        }
    }
    let mut found = BTreeMap::new();
    if !inputs.is_empty() {
        counted();
        let rows = sqlx::query("SELECT task_id, input FROM task_inputs WHERE task_id = ANY($1)")
            .bind(&inputs)
            .fetch_all(pool)
            .await
            .map_err(error)?;
        for row in rows {
            let id: String = row.try_get("task_id").map_err(error)?;
            found.insert(Payload::Input(id), row.try_get("input").map_err(error)?);
        }
    }
    if !results.is_empty() {
        counted();
        let ids: Vec<&String> = results.keys().collect();
        let rows = sqlx::query("SELECT task_id, fencing_token, result FROM task_results WHERE task_id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await
            .map_err(error)?;
        for row in rows {
            let id: String = row.try_get("task_id").map_err(error)?;
            let token: i64 = row.try_get("fencing_token").map_err(error)?;
            let token = u64::try_from(token).unwrap_or(0);
            if results.get(&id) == Some(&token) {
                found.insert(Payload::Result(id, token), row.try_get("result").map_err(error)?);
            }
        }
    }
    if !checkpoints.is_empty() {
        counted();
        let rows = sqlx::query("SELECT task_id, data FROM task_checkpoints WHERE task_id = ANY($1)")
            .bind(&checkpoints)
            .fetch_all(pool)
            .await
            .map_err(error)?;
        for row in rows {
            let id: String = row.try_get("task_id").map_err(error)?;
            found.insert(Payload::Checkpoint(id), row.try_get("data").map_err(error)?);
        }
    }
    if found.len() < wanted.len() {
        let missing: Vec<&Payload> = wanted.iter().filter(|p| !found.contains_key(*p)).collect();
        tracing::warn!(?missing, "payloads the replicated state refers to are missing from PostgreSQL");
    }
    Ok(found)
}

/// Serve queued reads, merging every read waiting into one set of queries, until the store is
/// dropped.
async fn read_batches(
    pool: PgPool,
    name: String,
    metrics: Arc<StorageMetrics>,
    queued: Arc<tokio::sync::Mutex<mpsc::Receiver<PayloadRead>>>,
) {
    let mut batch: Vec<PayloadRead> = Vec::with_capacity(READ_BATCH_MAX);
    loop {
        if queued.lock().await.recv_many(&mut batch, READ_BATCH_MAX).await == 0 {
            return;
        }
        let mut wanted: Vec<Payload> = batch.iter().flat_map(|r| r.wanted.iter().cloned()).collect();
        wanted.sort();
        wanted.dedup();
        let found = query_payloads(&pool, &name, &metrics, &wanted).await;
        for read in batch.drain(..) {
            let answer = found
                .as_ref()
                .map_err(Clone::clone)
                .map(|found| read.wanted.iter().filter_map(|p| Some((p.clone(), found.get(p)?.clone()))).collect());
            let _ = read.done.send(answer);
        }
    }
}

async fn write_audit(pool: PgPool, name: String, metrics: Arc<StorageMetrics>, mut queued: mpsc::Receiver<AuditEntry>) {
    let mut batch = Vec::with_capacity(AUDIT_BATCH_MAX);
    while queued.recv_many(&mut batch, AUDIT_BATCH_MAX).await > 0 {
        let column = |f: fn(&AuditEntry) -> String| batch.iter().map(f).collect::<Vec<String>>();
        let nodes: Vec<i64> = batch.iter().map(|e| e.node_id).collect();
        let principals = column(|e| e.principal.clone());
        let actions = column(|e| e.action.clone());
        let targets = column(|e| e.target.clone());
        let details = column(|e| e.detail.to_string());
        let mut backoff = Duration::from_millis(100);
        // Bounded: an entry waits at most ~10 s for the database, then the batch is dropped.
        for _ in 0..8 {
            metrics.database_queries_total.fetch_add(1, Ordering::Relaxed);
            let written = sqlx::query(
                "INSERT INTO audit_log (node_id, principal, action, target, detail) \
                 SELECT n, p, a, t, d::jsonb FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[]) AS x(n, p, a, t, d)",
            )
            .bind(&nodes)
            .bind(&principals)
            .bind(&actions)
            .bind(&targets)
            .bind(&details)
            .execute(&pool)
            .await;
            match written {
                Ok(_) => break,
                Err(error) => {
                    metrics.database_connection_errors_total.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(database = %name, %error, "writing the audit log failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_url_error_is_redacted() {
        let url = "postgresql://maos:s3cret@db:5432/maos";
        assert_eq!(redact("bad url postgresql://maos:s3cret@db", url), "bad url postgresql://maos:***@db");
        assert_eq!(redact("no secret here", "postgresql://db/maos"), "no secret here");
    }

    #[test]
    fn report_copies_show_a_nul_as_the_replacement_character() {
        assert_eq!(pg_text("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        let detail = serde_json::json!({ "reason": "x\0y", "list": ["\0"], "n": 3, "k\0": null });
        let clean = pg_json(&detail);
        assert_eq!(
            clean,
            serde_json::json!({ "reason": "x\u{FFFD}y", "list": ["\u{FFFD}"], "n": 3, "k\u{FFFD}": null })
        );
        assert!(!clean.to_string().contains("\\u0000"));
    }

    #[test]
    fn every_migration_is_embedded() {
        let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert_eq!(versions, vec![1, 2], "node/migrations holds the schema in order");
    }
}
