//! RocksDB storage: the Raft log, vote, committed index, last purged id and the latest snapshot.
//!
//! Durability follows openraft's storage rules:
//! - `save_vote` and `truncate` return only after a synced write.
//! - `append` writes entries (readable at once) and hands the flush callback to a flusher thread,
//!   which syncs the WAL once for every callback queued behind it and then reports. openraft 0.9
//!   awaits each flush before its next command, so in practice one callback is queued at a time;
//!   concurrent proposals share one fsync because the proposer puts them in one entry.
//! - `purge` records the last purged id before deleting entries, so a crash in between leaves
//!   only already-purged entries behind, which are ignored.
//!
//! Column families: `meta` (format version, vote, committed, last purged), `logs` (entries keyed
//! by big-endian index), `snapshot` (latest snapshot meta and data, written in one synced batch).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, RaftLogReader};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::sm_store::{SnapshotPersistence, StoredSnapshot};
use crate::{io_error, Entry, LogId, StorageError, TypeConfig, Vote};

/// The newest on-disk format this build writes; a database with a newer one is refused.
pub const STORAGE_FORMAT_VERSION: u32 = 1;

const CF_META: &str = "meta";
const CF_LOGS: &str = "logs";
const CF_SNAPSHOT: &str = "snapshot";

const KEY_FORMAT: &[u8] = b"format_version";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// Upper bound on flush callbacks waiting for the flusher thread. openraft bounds its own
/// in-flight appends far below this; reaching it makes `append` wait (backpressure).
const FLUSH_QUEUE_CAPACITY: usize = 65_536;

/// Errors opening the database.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open RocksDB at {path}: {source}")]
    Rocks { path: String, source: rocksdb::Error },
    #[error("RocksDB at {path} has storage format {found}, newer than this build ({supported}); run a newer maos")]
    NewerFormat { path: String, found: u32, supported: u32 },
    #[error("RocksDB at {path} has an unreadable format marker; it was not written by maos")]
    BadFormatMarker { path: String },
}

/// An open RocksDB database shared by the log store and the snapshot persistence.
#[derive(Clone)]
pub struct RocksDb {
    db: Arc<DB>,
}

impl Debug for RocksDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDb").field("path", &self.db.path()).finish()
    }
}

impl RocksDb {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let shown = path.display().to_string();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let families = [CF_META, CF_LOGS, CF_SNAPSHOT]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&options, path, families)
            .map_err(|source| OpenError::Rocks { path: shown.clone(), source })?;
        let db = Arc::new(db);
        let meta = db.cf_handle(CF_META).ok_or_else(|| OpenError::BadFormatMarker { path: shown.clone() })?;
        match db.get_cf(&meta, KEY_FORMAT).map_err(|source| OpenError::Rocks { path: shown.clone(), source })? {
            Some(bytes) => {
                let raw: [u8; 4] =
                    bytes.as_slice().try_into().map_err(|_| OpenError::BadFormatMarker { path: shown.clone() })?;
                let found = u32::from_be_bytes(raw);
                if found > STORAGE_FORMAT_VERSION {
                    return Err(OpenError::NewerFormat { path: shown, found, supported: STORAGE_FORMAT_VERSION });
                }
            }
            None => {
                let mut sync = WriteOptions::default();
                sync.set_sync(true);
                db.put_cf_opt(&meta, KEY_FORMAT, STORAGE_FORMAT_VERSION.to_be_bytes(), &sync)
                    .map_err(|source| OpenError::Rocks { path: shown.clone(), source })?;
            }
        }
        Ok(Self { db })
    }

    /// Check, without writing anything, that an existing database at `path` has a format this
    /// build reads. A missing database passes.
    pub fn check_format(path: &Path) -> Result<(), OpenError> {
        let shown = path.display().to_string();
        if !path.join("CURRENT").exists() {
            return Ok(());
        }
        let db = DB::open_cf_for_read_only(&Options::default(), path, [CF_META, CF_LOGS, CF_SNAPSHOT], false)
            .map_err(|source| OpenError::Rocks { path: shown.clone(), source })?;
        let meta = db.cf_handle(CF_META).ok_or_else(|| OpenError::BadFormatMarker { path: shown.clone() })?;
        let Some(bytes) =
            db.get_cf(&meta, KEY_FORMAT).map_err(|source| OpenError::Rocks { path: shown.clone(), source })?
        else {
            return Err(OpenError::BadFormatMarker { path: shown });
        };
        let raw: [u8; 4] =
            bytes.as_slice().try_into().map_err(|_| OpenError::BadFormatMarker { path: shown.clone() })?;
        let found = u32::from_be_bytes(raw);
        if found > STORAGE_FORMAT_VERSION {
            return Err(OpenError::NewerFormat { path: shown, found, supported: STORAGE_FORMAT_VERSION });
        }
        Ok(())
    }

    /// The log store over this database. Starts the flusher thread.
    pub fn log_store(&self) -> RocksLogStore {
        let (flush_tx, flush_rx) = mpsc::channel(FLUSH_QUEUE_CAPACITY);
        // The flusher holds the database weakly, so closing every store closes the database
        // at once, even while the flusher still waits for its channel to close.
        let db = Arc::downgrade(&self.db);
        std::thread::Builder::new()
            .name("maos-log-flusher".into())
            .spawn(move || run_flusher(db, flush_rx))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the log flusher thread"));
        RocksLogStore { db: self.db.clone(), flush_tx }
    }

    /// Snapshot persistence over this database.
    pub fn snapshots(&self) -> RocksSnapshots {
        RocksSnapshots { db: self.db.clone() }
    }
}

/// Sync the WAL once for every batch of queued callbacks, then report each in order.
fn run_flusher(db: std::sync::Weak<DB>, mut flush_rx: mpsc::Receiver<LogFlushed<TypeConfig>>) {
    let mut batch = Vec::new();
    while let Some(first) = flush_rx.blocking_recv() {
        batch.push(first);
        while batch.len() < FLUSH_QUEUE_CAPACITY {
            match flush_rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let result = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the database is closed".to_string()),
        };
        for callback in batch.drain(..) {
            let outcome = result.clone().map_err(std::io::Error::other);
            callback.log_io_completed(outcome);
        }
    }
}

fn encode<T: Serialize>(value: &T, subject: ErrorSubject<u64>) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(value).map_err(|e| io_error(subject, ErrorVerb::Write, e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], subject: ErrorSubject<u64>) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| io_error(subject, ErrorVerb::Read, e))
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn sync_write() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

/// The Raft log in RocksDB.
#[derive(Clone)]
pub struct RocksLogStore {
    db: Arc<DB>,
    flush_tx: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl RocksLogStore {
    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db.cf_handle(name).ok_or_else(|| {
            io_error(
                ErrorSubject::Store,
                ErrorVerb::Read,
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("column family {name} is missing")),
            )
        })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8], subject: ErrorSubject<u64>) -> Result<Option<T>, StorageError> {
        let cf = self.cf(CF_META)?;
        match self.db.get_cf(cf, key).map_err(|e| io_error(subject.clone(), ErrorVerb::Read, e))? {
            Some(bytes) => decode(&bytes, subject).map(Some),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        subject: ErrorSubject<u64>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let cf = self.cf(CF_META)?;
        let bytes = encode(value, subject.clone())?;
        let options = if sync { sync_write() } else { WriteOptions::default() };
        self.db.put_cf_opt(cf, key, bytes, &options).map_err(|e| io_error(subject, ErrorVerb::Write, e))
    }
}

impl RaftLogReader<TypeConfig> for RocksLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + openraft::OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = self.cf(CF_LOGS)?;
        let mut entries = Vec::new();
        let iter = self.db.iterator_cf(cf, IteratorMode::From(&index_key(start), Direction::Forward));
        for item in iter {
            let (key, value) = item.map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let raw: [u8; 8] = key.as_ref().try_into().map_err(|_| {
                io_error(ErrorSubject::Logs, ErrorVerb::Read, std::io::Error::other("log key is not 8 bytes"))
            })?;
            let index = u64::from_be_bytes(raw);
            if !range.contains(&index) {
                break;
            }
            entries.push(decode(&value, ErrorSubject::Log(openraft::LogId::default()))?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for RocksLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED, ErrorSubject::Store)?;
        let cf = self.cf(CF_LOGS)?;
        let last = match self.db.iterator_cf(cf, IteratorMode::End).next() {
            Some(item) => {
                let (_, value) = item.map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                let entry: Entry = decode(&value, ErrorSubject::Logs)?;
                Some(entry.log_id)
            }
            None => None,
        };
        // A purge marker ahead of the remaining entries (the purge went past the local log, or
        // its unsynced delete was lost) still bounds the log from below.
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.max(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote, ErrorSubject::Vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing the latest committed index only means re-applying less on restart.
        self.put_meta(KEY_COMMITTED, &committed, ErrorSubject::Store, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED, ErrorSubject::Store)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let cf = self.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = encode(&entry, ErrorSubject::Log(entry.log_id))?;
            batch.put_cf(cf, index_key(entry.log_id.index), bytes);
        }
        self.db.write(batch).map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        if let Err(mpsc::error::SendError(callback)) = self.flush_tx.send(callback).await {
            // The flusher is gone (it failed to start): flush here instead.
            let result = self.db.flush_wal(true).map_err(|e| std::io::Error::other(e.to_string()));
            callback.log_io_completed(result);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let cf = self.cf(CF_LOGS)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(cf, index_key(u64::MAX));
        self.db.write_opt(batch, &sync_write()).map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.put_meta(KEY_LAST_PURGED, &log_id, ErrorSubject::Store, true)?;
        let cf = self.cf(CF_LOGS)?;
        self.db
            .delete_range_cf(cf, index_key(0), index_key(log_id.index.saturating_add(1)))
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

/// The latest snapshot in RocksDB.
#[derive(Clone)]
pub struct RocksSnapshots {
    db: Arc<DB>,
}

impl SnapshotPersistence for RocksSnapshots {
    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), StorageError> {
        let subject = ErrorSubject::Snapshot(Some(snapshot.meta.signature()));
        let cf = self.db.cf_handle(CF_SNAPSHOT).ok_or_else(|| {
            io_error(subject.clone(), ErrorVerb::Write, std::io::Error::other("snapshot column family is missing"))
        })?;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, KEY_SNAPSHOT_META, encode(&snapshot.meta, subject.clone())?);
        batch.put_cf(cf, KEY_SNAPSHOT_DATA, &snapshot.data);
        self.db.write_opt(batch, &sync_write()).map_err(|e| io_error(subject, ErrorVerb::Write, e))
    }

    fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        let subject = ErrorSubject::Snapshot(None);
        let cf = self.db.cf_handle(CF_SNAPSHOT).ok_or_else(|| {
            io_error(subject.clone(), ErrorVerb::Read, std::io::Error::other("snapshot column family is missing"))
        })?;
        let meta = self.db.get_cf(cf, KEY_SNAPSHOT_META).map_err(|e| io_error(subject.clone(), ErrorVerb::Read, e))?;
        let data = self.db.get_cf(cf, KEY_SNAPSHOT_DATA).map_err(|e| io_error(subject.clone(), ErrorVerb::Read, e))?;
        match (meta, data) {
            (Some(meta), Some(data)) => Ok(Some(StoredSnapshot { meta: decode(&meta, subject)?, data })),
            _ => Ok(None),
        }
    }
}
