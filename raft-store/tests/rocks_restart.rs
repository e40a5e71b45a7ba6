//! What RocksDB persists survives a reopen: vote, log, committed index, purge point, snapshot.

use std::io::Cursor;

use maos_raft_store::rocks::RocksDb;
use maos_raft_store::{Command, Entry, Request, StateMachineStore, Validation};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, Vote};

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn put(term: u64, index: u64, key: &str, value: &str) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Request::new(
            1_000 + index,
            vec![Command::KvPut { key: key.into(), value: value.into(), ttl_ms: None }],
        )),
    }
}

#[tokio::test]
async fn a_reopened_store_has_what_was_written() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hash_before;
    {
        let db = RocksDb::open(dir.path())?;
        let mut log = db.log_store();
        let mut sm = StateMachineStore::open(db.snapshots(), Validation::EveryBatch)?;
        log.save_vote(&Vote::new(3, 1)).await?;
        let entries: Vec<Entry> = (1..=10).map(|i| put(3, i, &format!("k{i}"), "v")).collect();
        log.blocking_append(entries.clone()).await?;
        sm.apply(entries[..6].to_vec()).await?;
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(3, 6)));
        sm.apply(entries[6..8].to_vec()).await?;
        log.save_committed(Some(log_id(3, 8))).await?;
        log.purge(log_id(3, 4)).await?;
        hash_before = sm.handle().read().state_hash();
    }
    let db = RocksDb::open(dir.path())?;
    let mut log = db.log_store();
    let mut sm = StateMachineStore::open(db.snapshots(), Validation::EveryBatch)?;
    assert_eq!(log.read_vote().await?, Some(Vote::new(3, 1)));
    assert_eq!(log.read_committed().await?, Some(log_id(3, 8)));
    let state = log.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 4)));
    assert_eq!(state.last_log_id, Some(log_id(3, 10)));
    let remaining = log.try_get_log_entries(0..100).await?;
    assert_eq!(remaining.first().map(|e| e.log_id.index), Some(5));
    assert_eq!(remaining.len(), 6);
    // The state machine restarts from the snapshot at 6; re-applying 7..=8 restores the rest.
    let (applied, _) = sm.applied_state().await?;
    assert_eq!(applied, Some(log_id(3, 6)));
    sm.apply(log.try_get_log_entries(7..=8).await?).await?;
    assert_eq!(sm.handle().read().state_hash(), hash_before);
    let current = sm.get_current_snapshot().await?.expect("the snapshot survives a reopen");
    assert_eq!(current.meta.last_log_id, Some(log_id(3, 6)));
    Ok(())
}

#[tokio::test]
async fn an_installed_snapshot_replaces_the_state_and_survives_a_reopen() -> anyhow::Result<()> {
    let source_dir = tempfile::tempdir()?;
    let target_dir = tempfile::tempdir()?;
    let source_db = RocksDb::open(source_dir.path())?;
    let mut source = StateMachineStore::open(source_db.snapshots(), Validation::EveryBatch)?;
    source.apply((1..=5).map(|i| put(2, i, &format!("k{i}"), "v")).collect::<Vec<_>>()).await?;
    let snapshot = source.get_snapshot_builder().await.build_snapshot().await?;
    let expected_hash = source.handle().read().state_hash();
    {
        let target_db = RocksDb::open(target_dir.path())?;
        let mut target = StateMachineStore::open(target_db.snapshots(), Validation::EveryBatch)?;
        target.apply(vec![put(1, 1, "stale", "x")]).await?;
        let bytes = snapshot.snapshot.into_inner();
        target.install_snapshot(&snapshot.meta, Box::new(Cursor::new(bytes))).await?;
        assert_eq!(target.handle().read().state_hash(), expected_hash);
    }
    let target_db = RocksDb::open(target_dir.path())?;
    let target = StateMachineStore::open(target_db.snapshots(), Validation::EveryBatch)?;
    assert_eq!(target.handle().read().state_hash(), expected_hash);
    assert!(!target.handle().read().app.kv.contains_key("stale"));
    Ok(())
}

#[test]
fn a_database_from_a_newer_build_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    drop(RocksDb::open(dir.path())?);
    {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(false);
        let db = rocksdb::DB::open_cf(&options, dir.path(), ["meta", "logs", "snapshot"])?;
        let meta = db.cf_handle("meta").expect("meta column family");
        db.put_cf(&meta, b"format_version", 99u32.to_be_bytes())?;
    }
    let error = RocksDb::check_format(dir.path()).expect_err("the read-only check refuses a newer format");
    assert!(error.to_string().contains("newer than this build"), "{error}");
    let error = RocksDb::open(dir.path()).expect_err("a newer format must be refused");
    assert!(error.to_string().contains("newer than this build"), "{error}");
    RocksDb::check_format(&dir.path().join("absent")).expect("no database yet passes");
    Ok(())
}
