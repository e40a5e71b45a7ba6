//! The PostgreSQL task-data store (sqlx).
//!
//! Queries are built at run time (`sqlx::query`, not the `query!` macros): CI builds with no
//! database, and offline query data would be one more file to keep in step with the schema. The
//! schema is in `node/migrations/`, embedded in the binary by `sqlx::migrate!` and applied by
//! `maos db migrate` (or at start, with `database.auto_migrate`). The tests run every query
//! against a real server.
//!
//! - this file: the pool, migrations, payload reads and fenced writes (queued to `batch.rs`), the
//!   sweep's queries;
//! - `batch.rs`: the bounded batchers that merge concurrent writes and reads into shared statements;
//! - `mirror.rs`: the leader's mirrors of the task table (with event history) and the key space;
//! - `audit.rs`: the audit log's queue and writer.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::mpsc;

mod audit;
mod batch;
mod mirror;

pub use mirror::{SharedStateRow, TaskRow};

use self::audit::{write_audit, AuditEntry, AUDIT_QUEUE_MAX};
use self::batch::{read_batches, write_batches, PayloadRead, PayloadWrite, WriteKind, READERS, READ_QUEUE_MAX};
use super::{Payload, StorageError, StorageMetrics};
use crate::config::DatabaseSection;
use crate::telemetry::metrics::Timed;

/// The schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Inputs or results waiting to be written, at most; past it writers wait (backpressure).
const WRITE_QUEUE_MAX: usize = 16_384;
/// Inputs or results written in one statement (one commit), at most.
const WRITE_BATCH_MAX: usize = 512;
/// Batches of each kind in flight at once.
const WRITERS: usize = 4;

/// A migration as `maos db status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationStatus {
    pub version: i64,
    pub description: String,
    /// When it was applied; `None`: pending.
    pub installed_on: Option<String>,
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

    /// Whether the database answers and holds the schema (a node that cannot take a submit is
    /// not ready: `/ready` and the health service use this).
    pub async fn ping(&self) -> Result<(), String> {
        self.counted();
        let schema: bool = sqlx::query_scalar("SELECT to_regclass('task_inputs') IS NOT NULL")
            .fetch_one(&self.pool)
            .timed("ping")
            .await
            .map_err(|e| self.error(e).to_string())?;
        match schema {
            true => Ok(()),
            false => Err(StorageError::Unavailable {
                store: format!("PostgreSQL at {}", self.name),
                cause: "the schema is missing; run `maos db migrate` (with database.auto_migrate on, \
                        the node applies it itself once it can)"
                    .into(),
            }
            .to_string()),
        }
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
        assert_eq!(versions, vec![1, 2, 3], "node/migrations holds the schema in order");
    }
}
