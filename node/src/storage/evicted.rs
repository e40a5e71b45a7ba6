//! Finished tasks after they left the replicated state (`tasks.retention`): with PostgreSQL the
//! leader's mirror kept each one's final record (`tasks.record`) and its result (`task_results`),
//! so reads of an evicted task answer from there; embedded, an evicted task is gone.

use maos_raft_store::tasks::{Task, TaskTable};

use super::{Storage, StorageError};

impl Storage {
    /// An evicted task and its children as a small table read back from the mirror, for the
    /// same views and result resolution as a held task; `None` embedded, or when the mirror
    /// holds no finished record of it.
    pub async fn evicted_table(&self, task_id: &str) -> Result<Option<TaskTable>, StorageError> {
        let Some(store) = self.postgres() else { return Ok(None) };
        let Some((record, children)) = store.finished_records(task_id).await? else { return Ok(None) };
        let parse = |json: &str| {
            serde_json::from_str::<Task>(json).map_err(|e| StorageError::Corrupt {
                store: format!("PostgreSQL at {}", store.name),
                what: format!("readable record of finished task {task_id}"),
                detail: e.to_string(),
            })
        };
        let mut table = TaskTable::default();
        let task = parse(&record)?;
        for child in children {
            let child = parse(&child)?;
            table.children.entry(task.spec.id.clone()).or_default().insert(child.spec.id.clone());
            table.tasks.insert(child.spec.id.clone(), Box::new(child));
        }
        table.tasks.insert(task.spec.id.clone(), Box::new(task));
        Ok(Some(table))
    }
}
