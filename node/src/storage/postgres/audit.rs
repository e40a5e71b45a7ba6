//! The audit log: entries queued (bounded; a full queue drops and logs) and written in batches
//! in the background.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio::sync::mpsc;

use super::{pg_json, pg_text, PgStore};
use crate::storage::StorageMetrics;

/// Audit entries waiting to be written, at most; past it new entries are dropped (and logged).
pub(super) const AUDIT_QUEUE_MAX: usize = 4_096;
/// Audit entries written in one statement, at most.
pub(super) const AUDIT_BATCH_MAX: usize = 256;

pub(super) struct AuditEntry {
    pub(super) node_id: i64,
    pub(super) principal: String,
    pub(super) action: String,
    pub(super) target: String,
    pub(super) detail: serde_json::Value,
}

impl PgStore {
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

impl PgStore {
    /// The newest `limit` audit records at or after `since_ms` (of `principal`, if not empty).
    pub async fn audit_list(
        &self,
        since_ms: u64,
        principal: &str,
        limit: usize,
    ) -> Result<Vec<crate::storage::audit_file::AuditRecord>, crate::storage::StorageError> {
        self.counted();
        let rows: Vec<(i64, i64, String, String, String, serde_json::Value)> = sqlx::query_as(
            "SELECT (extract(epoch FROM at) * 1000)::bigint, node_id, principal, action, target, detail FROM audit_log \
             WHERE at >= to_timestamp($1::double precision / 1000) AND ($2 = '' OR principal = $2) \
             ORDER BY at DESC, id DESC LIMIT $3",
        )
        .bind(i64::try_from(since_ms).unwrap_or(i64::MAX))
        .bind(principal)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(|(at, node_id, principal, action, target, detail)| crate::storage::audit_file::AuditRecord {
                at_ms: u64::try_from(at).unwrap_or(0),
                node_id: u64::try_from(node_id).unwrap_or(0),
                principal,
                action,
                target,
                detail,
            })
            .collect())
    }
}

pub(super) async fn write_audit(
    pool: PgPool,
    name: String,
    metrics: Arc<StorageMetrics>,
    mut queued: mpsc::Receiver<AuditEntry>,
) {
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
