//! The openraft state-machine store: [`StateMachineData`] in memory, snapshots persisted by an
//! engine ([`SnapshotPersistence`]).
//!
//! On start the store restores the latest persisted snapshot; openraft then re-applies the
//! committed log entries after it (the log store persists the committed index), so a restarted
//! node reaches the state it had without writing the whole state on every apply.

use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::state::StateMachineData;
use crate::{io_error, Entry, LogId, MaosNode, NodeId, Responses, Snapshot, SnapshotMeta, StorageError, TypeConfig};

/// The newest snapshot format this build writes. Older formats stay readable.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;

/// A snapshot as persisted: its metadata and its serialised [`SnapshotBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// The bytes of a snapshot, as sent between nodes and persisted.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotBody {
    format_version: u16,
    state: StateMachineData,
}

/// Where a state-machine store keeps its latest snapshot.
pub trait SnapshotPersistence: Clone + Send + Sync + 'static {
    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StorageError>;
    fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError>;
}

/// A read handle on the applied state, shared with the node's API.
#[derive(Debug, Clone, Default)]
pub struct StateMachineHandle(Arc<RwLock<StateMachineData>>);

impl StateMachineHandle {
    /// Read the applied state. Hold the guard briefly: apply waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, StateMachineData> {
        // A poisoned lock means an earlier panic while applying; the data is still the last
        // consistent value because apply assigns whole entries.
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn replace(&self, data: StateMachineData) {
        *self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = data;
    }
}

/// The openraft state machine for MAOS.
pub struct StateMachineStore<P: SnapshotPersistence> {
    data: StateMachineHandle,
    current_snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    persistence: P,
    /// Run [`StateMachineData::validate`] after every applied batch. On in tests and
    /// simulations; in production it costs a pass over the state per batch, so it runs when a
    /// snapshot is built instead.
    validate_every_apply: bool,
}

fn decode_snapshot(bytes: &[u8]) -> Result<StateMachineData, StorageError> {
    let body: SnapshotBody =
        serde_json::from_slice(bytes).map_err(|e| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
    if body.format_version > SNAPSHOT_FORMAT_VERSION {
        let message = format!(
            "snapshot format {} is newer than this build understands ({SNAPSHOT_FORMAT_VERSION}); upgrade this node",
            body.format_version
        );
        return Err(io_error(
            ErrorSubject::Snapshot(None),
            ErrorVerb::Read,
            std::io::Error::new(std::io::ErrorKind::InvalidData, message),
        ));
    }
    Ok(body.state)
}

fn invariant_error(error: crate::InvariantViolation) -> StorageError {
    io_error(ErrorSubject::StateMachine, ErrorVerb::Write, std::io::Error::other(error.to_string()))
}

impl<P: SnapshotPersistence> StateMachineStore<P> {
    /// Open the store, restoring the latest snapshot `persistence` holds.
    pub fn open(persistence: P, validate_every_apply: bool) -> Result<Self, StorageError> {
        let snapshot = persistence.load_snapshot()?;
        let data = match &snapshot {
            Some(stored) => decode_snapshot(&stored.data)?,
            None => StateMachineData::default(),
        };
        data.validate().map_err(invariant_error)?;
        Ok(Self {
            data: StateMachineHandle(Arc::new(RwLock::new(data))),
            current_snapshot: Arc::new(Mutex::new(snapshot)),
            persistence,
            validate_every_apply,
        })
    }

    /// A read handle on the applied state.
    pub fn handle(&self) -> StateMachineHandle {
        self.data.clone()
    }

    fn builder(&self) -> Self {
        Self {
            data: self.data.clone(),
            current_snapshot: self.current_snapshot.clone(),
            persistence: self.persistence.clone(),
            validate_every_apply: self.validate_every_apply,
        }
    }
}

impl<P: SnapshotPersistence> RaftSnapshotBuilder<TypeConfig> for StateMachineStore<P> {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // Copy under the read lock, then check and serialise without it, so apply is held up
        // only for the copy.
        let state = self.data.read().clone();
        state.validate().map_err(invariant_error)?;
        let (last_log_id, last_membership) = (state.last_applied, state.last_membership.clone());
        let body = SnapshotBody { format_version: SNAPSHOT_FORMAT_VERSION, state };
        let bytes = serde_json::to_vec(&body).map_err(|e| io_error(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
        let snapshot_id = match last_log_id {
            Some(log_id) => format!("{}-{}-{}", log_id.leader_id.term, log_id.index, bytes.len()),
            None => format!("empty-{}", bytes.len()),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        // openraft builds snapshots on a separate task, so an install may have landed a newer
        // snapshot since the state was read above. Saving under the lock and keeping whichever is
        // newer means the persisted snapshot never goes back past a purged log.
        let mut current = self.current_snapshot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(newer) = current.as_ref().filter(|c| c.meta.last_log_id >= last_log_id) {
            return Ok(Snapshot { meta: newer.meta.clone(), snapshot: Box::new(Cursor::new(newer.data.clone())) });
        }
        let stored = StoredSnapshot { meta: meta.clone(), data: bytes.clone() };
        self.persistence.save_snapshot(&stored)?;
        *current = Some(stored);
        tracing::debug!(snapshot_id = %meta.snapshot_id, bytes = bytes.len(), "built a snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl<P: SnapshotPersistence> RaftStateMachine<TypeConfig> for StateMachineStore<P> {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, MaosNode>), StorageError> {
        let data = self.data.read();
        Ok((data.last_applied, data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Responses>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut data = self.data.0.write().unwrap_or_else(|p| p.into_inner());
        let mut responses = Vec::new();
        for entry in entries {
            // An entry this build cannot read halts this node rather than letting it diverge.
            let response = data.apply(&entry).map_err(|e| {
                io_error(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, std::io::Error::other(e.to_string()))
            })?;
            responses.push(response);
        }
        if self.validate_every_apply {
            data.validate().map_err(invariant_error)?;
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builder()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let mut state = decode_snapshot(&bytes)?;
        // The meta is authoritative for what the snapshot covers.
        state.last_applied = meta.last_log_id;
        state.last_membership = meta.last_membership.clone();
        state.validate().map_err(invariant_error)?;
        let stored = StoredSnapshot { meta: meta.clone(), data: bytes };
        let mut current = self.current_snapshot.lock().unwrap_or_else(|p| p.into_inner());
        self.persistence.save_snapshot(&stored)?;
        self.data.replace(state);
        *current = Some(stored);
        tracing::info!(snapshot_id = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "installed a snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self.current_snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(current.map(|stored| Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}
