//! The leader's mirror of the task table (`tasks`, `task_events`) and of the key-value space
//! (`shared_state`) into PostgreSQL, its task events on Redis (`maos:events`), and the sweep of
//! staged inputs no committed task refers to.
//!
//! Only the leader writes, from its applied state. It remembers what it wrote; a new leader
//! starts with nothing remembered and writes every task once, which the tables' keys make
//! harmless, and reads the mirrored keys back so that it also removes those deleted since the
//! last leader's round. While PostgreSQL is down nothing is marked written, so the next round
//! after it returns writes what was missed: the mirror lags, it never loses a change.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use maos_raft_store::tasks::{TaskId, TaskState};
use tokio::sync::watch;

use super::postgres::{pg_text, PgStore, SharedStateRow, TaskRow};
use super::Storage;
use crate::raft::core::NodeCore;
use crate::raft::housekeeping::MirrorProgress;

/// Between rounds.
const ROUND_INTERVAL: Duration = Duration::from_millis(250);
/// Task rows, and key rows written or removed, in one round, at most.
const ROWS_PER_ROUND_MAX: usize = 2_000;
/// Between sweeps of orphaned inputs.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// The first sweep, after leadership is taken.
const FIRST_SWEEP_AFTER: Duration = Duration::from_secs(5);
/// Inputs removed per sweep, at most.
const SWEEP_BATCH_MAX: i64 = 1_000;

/// Run until `stopped`; returns at once with neither PostgreSQL nor Redis.
pub async fn run(
    core: Arc<NodeCore>,
    storage: Arc<Storage>,
    orphan_after: Duration,
    mirror: Option<Arc<MirrorProgress>>,
    mut stopped: watch::Receiver<bool>,
) {
    let (store, cache) = (storage.postgres(), storage.cache());
    if store.is_none() && cache.is_none() {
        return;
    }
    let mut written: BTreeMap<TaskId, (TaskState, u32)> = BTreeMap::new();
    // `None` until read back from the table in this term.
    let mut keys_written: Option<KeyMirror> = None;
    let mut led_term: Option<u64> = None;
    let mut projected_index = 0;
    // The first sweep comes soon after start, the rest every SWEEP_INTERVAL.
    let mut last_sweep = tokio::time::Instant::now()
        .checked_sub(SWEEP_INTERVAL.saturating_sub(FIRST_SWEEP_AFTER))
        .unwrap_or_else(tokio::time::Instant::now);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ROUND_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let term = core.raft.metrics().borrow().current_term;
        if core.leader().map(|(id, _)| id) != Some(core.id) {
            led_term = None;
            continue;
        }
        if led_term != Some(term) {
            // A new term under this node: write everything again.
            written.clear();
            keys_written = None;
            projected_index = 0;
            led_term = Some(term);
        }
        let (rows, marks, applied) = {
            let state = core.state.read();
            let applied = state.last_applied.map(|id| id.index).unwrap_or(0);
            let mut rows = Vec::new();
            let mut marks = Vec::new();
            if applied != projected_index {
                // Evicted tasks are mirrored already: forget them.
                if written.len() > state.app.tasks.tasks.len() {
                    written.retain(|id, _| state.app.tasks.tasks.contains_key(id));
                }
                for task in state.app.tasks.tasks.values() {
                    if written.get(&task.spec.id) == Some(&(task.state, task.attempt)) {
                        continue;
                    }
                    let lease = task.lease.as_ref();
                    marks.push((task.spec.id.clone(), (task.state, task.attempt)));
                    rows.push(TaskRow {
                        task_id: task.spec.id.clone(),
                        task_type: task.spec.task_type.clone(),
                        priority: format!("{:?}", task.spec.priority).to_uppercase(),
                        state: format!("{:?}", task.state).to_uppercase(),
                        attempt: i32::try_from(task.attempt).unwrap_or(i32::MAX),
                        submitter: pg_text(&task.spec.submitter),
                        parent: task.spec.parent.clone(),
                        cause: task.cause.as_deref().map(pg_text),
                        created_at_ms: i64::try_from(task.created_at_ms).unwrap_or(i64::MAX),
                        updated_at_ms: i64::try_from(task.updated_at_ms).unwrap_or(i64::MAX),
                        node_id: lease.and_then(|l| i64::try_from(l.node_id).ok()),
                        fencing_token: lease.and_then(|l| i64::try_from(l.token).ok()),
                        // A finished task's whole record, so it can be served after eviction.
                        record: task.state.is_terminal().then(|| serde_json::to_string(&**task).unwrap_or_default()),
                    });
                    if rows.len() == ROWS_PER_ROUND_MAX {
                        break;
                    }
                }
            }
            (rows, marks, applied)
        };
        let mut complete = rows.len() < ROWS_PER_ROUND_MAX;
        let recorded = match store {
            Some(store) if applied != projected_index => match mirror_keys(&core, store, &mut keys_written).await {
                Ok(all_keys) => {
                    complete &= all_keys;
                    store.project(&rows).await
                }
                Err(error) => Err(error),
            },
            _ => Ok(0),
        };
        match recorded {
            Ok(events) => {
                if let Some(cache) = cache {
                    cache.publish_events(&rows.iter().map(TaskRow::event_json).collect::<Vec<_>>()).await;
                }
                storage.metrics.events_recorded_total.fetch_add(events, Ordering::Relaxed);
                // What was written, not what is there now: a change since is written next round.
                written.extend(marks);
                if complete {
                    projected_index = applied;
                    if let (Some(mirror), Some(_)) = (&mirror, store) {
                        mirror.record(applied);
                    }
                }
                if failing {
                    tracing::info!("the task mirror caught up");
                    failing = false;
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "mirroring to PostgreSQL failed; retrying every round");
                }
                failing = true;
                continue;
            }
        }
        if last_sweep.elapsed() >= SWEEP_INTERVAL {
            last_sweep = tokio::time::Instant::now();
            sweep(&core, &storage, orphan_after).await;
        }
    }
}

/// What `shared_state` holds, as this leader knows it.
struct KeyMirror {
    /// Keys as they are in the replicated space (a row holds them as PostgreSQL text can: a
    /// NUL, which it cannot hold, shows as U+FFFD), with the revision written.
    written: BTreeMap<String, i64>,
    /// The space's write counter when `written` last matched it entirely: while the counter
    /// and the number of keys are unchanged, nothing was written, deleted or expired since.
    synced_at: Option<u64>,
}

/// Write the keys changed since the last round into `shared_state` and remove the keys gone
/// from the replicated space. Returns whether every change was written (a round is bounded).
async fn mirror_keys(
    core: &NodeCore,
    store: &PgStore,
    keys_written: &mut Option<KeyMirror>,
) -> Result<bool, super::StorageError> {
    let mirror = match keys_written {
        Some(mirror) => mirror,
        None => keys_written.insert(KeyMirror { written: store.shared_state_revisions().await?, synced_at: None }),
    };
    let known = &mut mirror.written;
    let (changed, rows, removed, revision) = {
        let state = core.state.read();
        let (kv, revision) = (&state.app.kv, state.app.kv_revision);
        if mirror.synced_at == Some(revision) && known.len() == kv.len() {
            return Ok(true);
        }
        let mut changed = Vec::new();
        let mut rows = Vec::new();
        for (key, value) in kv {
            let revision = i64::try_from(value.revision).unwrap_or(i64::MAX);
            if known.get(key) == Some(&revision) {
                continue;
            }
            if rows.len() == ROWS_PER_ROUND_MAX {
                break;
            }
            changed.push((key.clone(), revision));
            rows.push(SharedStateRow {
                key: pg_text(key),
                value: pg_text(&value.value),
                revision,
                updated_at_ms: i64::try_from(value.updated_at_ms).unwrap_or(i64::MAX),
                expires_at_ms: value.expires_at_ms.and_then(|at| i64::try_from(at).ok()),
            });
        }
        let removed: Vec<(String, i64)> = known
            .iter()
            .filter(|(key, _)| !kv.contains_key(*key))
            .take(ROWS_PER_ROUND_MAX)
            .map(|(k, r)| (k.clone(), *r))
            .collect();
        (changed, rows, removed, revision)
    };
    let gone: Vec<(String, i64)> = removed.iter().map(|(key, revision)| (pg_text(key), *revision)).collect();
    store.project_shared_state(&rows, &gone).await?;
    for (key, _) in &removed {
        known.remove(key);
    }
    let complete = rows.len() < ROWS_PER_ROUND_MAX && removed.len() < ROWS_PER_ROUND_MAX;
    known.extend(changed);
    mirror.synced_at = complete.then_some(revision);
    Ok(complete)
}

/// Delete staged inputs older than `orphan_after` that no task in the applied state refers to
/// (their submit never committed, or was a duplicate).
pub async fn sweep(core: &NodeCore, storage: &Storage, orphan_after: Duration) {
    let Some(store) = storage.postgres() else { return };
    let candidates = match store.orphan_candidates(orphan_after, SWEEP_BATCH_MAX).await {
        Ok(candidates) => candidates,
        Err(error) => {
            tracing::debug!(%error, "the orphan sweep could not run");
            return;
        }
    };
    let orphans: Vec<String> = {
        let state = core.state.read();
        candidates.into_iter().filter(|id| !state.app.tasks.tasks.contains_key(id)).collect()
    };
    if orphans.is_empty() {
        return;
    }
    match store.delete_inputs(&orphans).await {
        Ok(removed) => {
            storage.metrics.orphans_removed_total.fetch_add(removed, Ordering::Relaxed);
            tracing::info!(removed, "removed staged inputs that no committed task refers to");
        }
        Err(error) => tracing::debug!(%error, "removing orphaned inputs failed; the next sweep retries"),
    }
}
