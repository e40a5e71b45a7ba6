//! The openraft state-machine store: [`StateMachineData`] in memory, snapshots persisted by an
//! engine ([`SnapshotPersistence`]).
//!
//! On start the store restores the latest persisted snapshot; openraft then re-applies the
//! committed log entries after it (the log store persists the committed index), so a restarted
//! node reaches the state it had without writing the whole state on every apply.
//!
//! Apply is all or nothing for the node: a panic while applying an entry stops the process at
//! once ([`torn_state`]), so no reader is ever served a half-applied entry; on restart the state
//! is rebuilt from the snapshot and the log. A poisoned lock is treated the same way.

use std::cell::Cell;
use std::io::Cursor;
use std::ops::Deref;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::state::StateMachineData;
use crate::{io_error, Entry, LogId, MaosNode, NodeId, Responses, Snapshot, SnapshotMeta, StorageError, TypeConfig};

/// The newest snapshot format this build writes. Older formats stay readable.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;

/// Run `work` (copying, serialising or parsing a whole state, writing it to disk) so that the
/// runtime keeps serving other tasks meanwhile: on a multi-threaded runtime this worker's other
/// tasks move to another thread (`block_in_place`), so a snapshot does not hold up heartbeats,
/// which a follower would take for a dead leader and a leader for lost followers. The simulation's
/// single-threaded runtime runs it in place, as before.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

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

/// Stop this process: the applied state may hold part of an entry (a panic while applying), and
/// serving it would show readers a state no replica ever agreed on. The snapshot and the log on
/// disk are intact, and a restart rebuilds the state from them.
fn torn_state(during: &str) -> ! {
    tracing::error!(during, "the replicated state may be torn by a panic while applying; stopping this node, which rebuilds its state from its snapshot and log when restarted");
    eprintln!("fatal: the replicated state may be torn by a panic while applying ({during}); stopping this node");
    std::process::abort()
}

/// A read handle on the applied state, shared with the node's API.
#[derive(Debug, Clone, Default)]
pub struct StateMachineHandle(Arc<RwLock<StateMachineData>>);

thread_local! {
    /// Reads of the applied state this thread holds (see [`StateMachineHandle::read`]).
    static READS_HELD: Cell<u32> = const { Cell::new(0) };
}

/// Refuse, in debug builds and so in every test, to take the state's lock on a thread that
/// already holds a read of it. std's `RwLock` lets a waiting writer go before new readers, so a
/// second read waits for apply, and apply waits for the first read: every task on that worker
/// stops, and the node stops answering Raft and its API. It only shows under write load, so it
/// is caught where it is tried rather than where it hangs.
fn check_not_reading(what: &str) {
    let held = READS_HELD.with(Cell::get);
    debug_assert!(
        held == 0,
        "{what} on a thread that already holds a read of the state: this deadlocks once apply waits to write; \
         pass the read you hold down instead"
    );
}

/// A read of the applied state: the lock's guard, counted so a nested read is caught.
pub struct StateRead<'a> {
    guard: RwLockReadGuard<'a, StateMachineData>,
}

impl Deref for StateRead<'_> {
    type Target = StateMachineData;

    fn deref(&self) -> &StateMachineData {
        &self.guard
    }
}

impl Drop for StateRead<'_> {
    fn drop(&mut self) {
        READS_HELD.with(|held| held.set(held.get().saturating_sub(1)));
    }
}

impl StateMachineHandle {
    /// Read the applied state. Hold the read briefly (apply waits for it) and never take a
    /// second one while holding it: pass the one held down instead.
    pub fn read(&self) -> StateRead<'_> {
        check_not_reading("a read of the state");
        // A poisoned lock means a panic while the state was held for writing: it may be torn.
        let guard = self.0.read().unwrap_or_else(|_| torn_state("a read of the state"));
        READS_HELD.with(|held| held.set(held.get() + 1));
        StateRead { guard }
    }

    /// Write the state (apply, snapshot install); the same rule as for reads.
    fn write(&self, what: &str) -> RwLockWriteGuard<'_, StateMachineData> {
        check_not_reading(what);
        self.0.write().unwrap_or_else(|_| torn_state(what))
    }

    fn replace(&self, data: StateMachineData) {
        *self.write("installing a snapshot") = data;
    }
}

/// How often apply checks [`StateMachineData::validate`]. It is also checked when a snapshot is
/// built and when the store opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// After every applied batch: tests and simulations.
    EveryBatch,
    /// After one applied batch in this many: served nodes. A check is a pass over the state
    /// under the write lock, about 0.55 µs per task held (55 ms at 100,000 tasks, measured with a
    /// debug build), so checking every batch would stall apply and readers on a large state.
    Sampled(u64),
}

/// What served nodes use: one batch in 4,096 (at 1,000 batches per second and 100,000 tasks,
/// about 1.4% of apply time).
pub const VALIDATION_SERVED: Validation = Validation::Sampled(4_096);

/// The openraft state machine for MAOS.
pub struct StateMachineStore<P: SnapshotPersistence> {
    data: StateMachineHandle,
    current_snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    persistence: P,
    validation: Validation,
    /// Batches applied by this store, for [`Validation::Sampled`].
    batches_applied: u64,
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
    let mut state = body.state;
    // Counts and orders derived from the records are not in the snapshot.
    state.app.tasks.rebuild_indexes();
    Ok(state)
}

fn invariant_error(error: crate::InvariantViolation) -> StorageError {
    io_error(ErrorSubject::StateMachine, ErrorVerb::Write, std::io::Error::other(error.to_string()))
}

impl<P: SnapshotPersistence> StateMachineStore<P> {
    /// Open the store, restoring the latest snapshot `persistence` holds.
    pub fn open(persistence: P, validation: Validation) -> Result<Self, StorageError> {
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
            validation,
            batches_applied: 0,
        })
    }

    /// A read handle on the applied state.
    pub fn handle(&self) -> StateMachineHandle {
        self.data.clone()
    }

    /// [`RaftSnapshotBuilder::build_snapshot`]'s work, off the runtime (see [`blocking`]).
    fn build_blocking(&mut self) -> Result<Snapshot, StorageError> {
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
        metrics::counter!("maos_raft_snapshot_builds_total").increment(1);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }

    /// [`RaftStateMachine::install_snapshot`]'s work, off the runtime (see [`blocking`]).
    fn install_blocking(&mut self, meta: &SnapshotMeta, bytes: Vec<u8>) -> Result<(), StorageError> {
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
        Ok(())
    }

    fn builder(&self) -> Self {
        Self {
            data: self.data.clone(),
            current_snapshot: self.current_snapshot.clone(),
            persistence: self.persistence.clone(),
            validation: self.validation,
            batches_applied: 0,
        }
    }
}

impl<P: SnapshotPersistence> RaftSnapshotBuilder<TypeConfig> for StateMachineStore<P> {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        blocking(|| self.build_blocking())
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
        let mut data = self.data.write("apply");
        let mut responses = Vec::new();
        for entry in entries {
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let applied = data.apply(&entry);
                #[cfg(test)]
                tests::maybe_panic_after_apply();
                applied
            }));
            let Ok(applied) = applied else { torn_state(&format!("entry {}", entry.log_id)) };
            // An entry this build cannot read halts this node rather than letting it diverge.
            let response = applied.map_err(|e| {
                io_error(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, std::io::Error::other(e.to_string()))
            })?;
            responses.push(response);
        }
        self.batches_applied += 1;
        let due = match self.validation {
            Validation::EveryBatch => true,
            Validation::Sampled(every) => self.batches_applied.is_multiple_of(every.max(1)),
        };
        if due {
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
        blocking(|| self.install_blocking(meta, snapshot.into_inner()))?;
        tracing::info!(snapshot_id = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "installed a snapshot");
        metrics::counter!("maos_raft_snapshot_installs_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self.current_snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(current.map(|stored| Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::os::unix::process::ExitStatusExt;

    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::{Command, Request};

    /// Keeps no snapshot (the test never takes one); `mem` has the real in-memory one.
    #[derive(Clone)]
    struct NoSnapshots;

    impl SnapshotPersistence for NoSnapshots {
        fn save_snapshot(&self, _: &StoredSnapshot) -> Result<(), StorageError> {
            Ok(())
        }
        fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
            Ok(None)
        }
    }

    thread_local! {
        /// Set by the test below: the next applied entry panics after changing the state.
        static PANIC_AFTER_APPLY: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn maybe_panic_after_apply() {
        if PANIC_AFTER_APPLY.with(|p| p.replace(false)) {
            panic!("injected: a panic in apply after the entry changed the state");
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "already holds a read of the state: this deadlocks once apply waits to write")]
    fn a_second_read_on_a_thread_holding_one_is_refused() {
        let handle = StateMachineHandle::default();
        // Reads one after another are fine.
        drop(handle.read());
        let first = handle.read();
        // What the agent runtime did when issuing credentials (before 2026-12-08): while apply
        // waited to write, this waited behind it, and both tokio workers stopped.
        let _second = handle.read();
        drop(first);
    }

    #[test]
    fn reads_on_other_threads_are_not_nested() {
        let handle = StateMachineHandle::default();
        let _held = handle.read();
        let other = handle.clone();
        std::thread::spawn(move || other.read().app.kv.len()).join().expect("another thread reads");
    }

    const CHILD: &str = "MAOS_TEST_APPLY_PANIC_CHILD";

    #[test]
    fn a_panic_while_applying_stops_the_process_instead_of_serving_a_torn_state() {
        if std::env::var_os(CHILD).is_some() {
            // The child: apply one entry that panics half-way. Nothing after it may run.
            let mut store = StateMachineStore::open(NoSnapshots, Validation::EveryBatch).expect("a store");
            let handle = store.handle();
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
                payload: EntryPayload::Normal(Request::new(
                    1,
                    vec![Command::KvPut { key: "k".into(), value: "v".into(), ttl_ms: None }],
                )),
            };
            PANIC_AFTER_APPLY.with(|p| p.set(true));
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                futures::executor::block_on(store.apply(vec![entry]))
            }));
            // A reader after the panic: it must never see the half-applied state.
            let served = handle.read().app.kv.len();
            println!("served a state with {served} keys after a panic in apply");
            std::process::exit(0);
        }
        let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "sm_store::tests::a_panic_while_applying_stops_the_process_instead_of_serving_a_torn_state",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("the child runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stdout.contains("served a state"), "a torn state was served:\n{stdout}");
        assert_eq!(output.status.signal(), Some(6), "the node must abort (SIGABRT): {:?}\n{stderr}", output.status);
        assert!(stderr.contains("may be torn by a panic while applying (entry"), "no clear log:\n{stderr}");
    }
}
