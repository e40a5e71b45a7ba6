-- MAOS task records (format 3): a finished task's whole record as the replicated state held it
-- (JSON of `maos_raft_store::tasks::Task`), written by the leader's projector when the task
-- finishes. Finished tasks leave the replicated state after `tasks.retention`; `Get`, `Results`
-- and `Watch` of such a task then answer from this row (and `task_results`). NULL for a task that
-- is not finished, or was mirrored before this migration.
ALTER TABLE tasks ADD COLUMN record text;
