//! The leader's mirrors in PostgreSQL: the task table with the events each task entered its
//! states by (`tasks`, `task_events`), and the replicated key space (`shared_state`).

use std::collections::BTreeMap;

use super::PgStore;
use crate::storage::StorageError;

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
    /// A finished task's record (JSON), served after the task leaves the replicated state.
    pub record: Option<String>,
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

impl PgStore {
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
        let records: Vec<Option<&str>> = rows.iter().map(|r| r.record.as_deref()).collect();
        let mut transaction = self.pool.begin().await.map_err(|e| self.error(e))?;
        self.counted();
        sqlx::query(
            "INSERT INTO tasks (task_id, task_type, priority, state, attempt, submitter, parent, cause, created_at, updated_at, record) \
             SELECT t.id, t.ty, t.pr, t.st, t.at, t.su, t.pa, t.ca, to_timestamp(t.cr / 1000.0), to_timestamp(t.up / 1000.0), t.re \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[]) \
                  AS t(id, ty, pr, st, at, su, pa, ca, cr, up, re) \
             ON CONFLICT (task_id) DO UPDATE SET state = EXCLUDED.state, attempt = EXCLUDED.attempt, \
                  cause = EXCLUDED.cause, updated_at = EXCLUDED.updated_at, record = EXCLUDED.record",
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
        .bind(&records)
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
}

/// Children of one finished task read back from the mirror, at most.
pub const MIRRORED_CHILDREN_MAX: i64 = 1_000;

impl PgStore {
    /// The mirrored record of finished task `task_id` and those of its finished children (at most
    /// [`MIRRORED_CHILDREN_MAX`]), as JSON; `None` when the mirror holds no finished record of it.
    pub async fn finished_records(&self, task_id: &str) -> Result<Option<(String, Vec<String>)>, StorageError> {
        self.counted();
        let record: Option<String> =
            sqlx::query_scalar("SELECT record FROM tasks WHERE task_id = $1 AND record IS NOT NULL")
                .bind(task_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
        let Some(record) = record else { return Ok(None) };
        self.counted();
        let children: Vec<String> = sqlx::query_scalar(
            "SELECT record FROM tasks WHERE parent = $1 AND record IS NOT NULL ORDER BY task_id LIMIT $2",
        )
        .bind(task_id)
        .bind(MIRRORED_CHILDREN_MAX)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(Some((record, children)))
    }
}
