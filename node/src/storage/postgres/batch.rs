//! Bounded batchers: concurrent input and result writes, and payload reads, merged into one
//! `UNNEST`/`ANY` statement per batch; results stay fenced.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use sqlx::Row;
use tokio::sync::mpsc;

use super::{map_error, WRITE_BATCH_MAX};
use crate::storage::{Payload, StorageError, StorageMetrics};
use crate::telemetry::metrics::Timed;

/// One payload on its way to the database, and where its outcome goes. `token` is 0 for an
/// input (inputs are not fenced).
pub(super) struct PayloadWrite {
    pub(super) task_id: String,
    pub(super) token: i64,
    pub(super) value: String,
    pub(super) done: tokio::sync::oneshot::Sender<Result<(), StorageError>>,
}

/// Reads waiting, at most; past it readers wait (backpressure).
pub(super) const READ_QUEUE_MAX: usize = 16_384;
/// Reads merged into one set of queries, at most.
pub(super) const READ_BATCH_MAX: usize = 256;
/// Merged reads in flight at once.
pub(super) const READERS: usize = 4;

/// One caller's read, and where its answer goes.
pub(super) struct PayloadRead {
    pub(super) wanted: Vec<Payload>,
    pub(super) done: tokio::sync::oneshot::Sender<Result<BTreeMap<Payload, String>, StorageError>>,
}

/// What a batch writer writes.
#[derive(Clone, Copy)]
pub(super) enum WriteKind {
    Inputs,
    Results,
}

/// Write queued payloads of one kind, a batch per statement, until the store is dropped.
/// Results are fenced like single writes: a row changes only under a larger token, and a write
/// that changed no row is answered `Stale` for the caller to resolve (see `put_result`).
pub(super) async fn write_batches(
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
            .timed("write_inputs")
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
                .timed("write_results")
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
pub(super) async fn query_payloads(
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
            .timed("read_inputs")
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
            .timed("read_results")
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
            .timed("read_checkpoints")
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
pub(super) async fn read_batches(
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
