-- MAOS task data (format 1). The replicated state machine decides; these tables hold what is
-- large or queried: inputs, results, checkpoints, a mirror of the task table with its event
-- history, and the audit log. Workflow shared state stays in the replicated key-value space,
-- where compare-and-set, TTLs and fencing are linearizable. Written by `maos serve` (see node/src/storage/).

-- A submit's input, written before the Raft entry that refers to it. A row no committed task
-- refers to is an orphan and is swept (created_at orders the sweep).
CREATE TABLE task_inputs (
    task_id     text        PRIMARY KEY,
    input       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX task_inputs_created_at ON task_inputs (created_at);

-- One result per task, under the fencing token of the lease that wrote it. A write carries its
-- token and applies only over a smaller one, so a stale owner changes no row.
CREATE TABLE task_results (
    task_id        text        PRIMARY KEY,
    fencing_token  bigint      NOT NULL CHECK (fencing_token > 0),
    result         text        NOT NULL,
    written_at     timestamptz NOT NULL DEFAULT now()
);

-- The latest checkpoint per task; the same attempt may replace its own.
CREATE TABLE task_checkpoints (
    task_id        text        PRIMARY KEY,
    fencing_token  bigint      NOT NULL CHECK (fencing_token > 0),
    data           text        NOT NULL,
    saved_at       timestamptz NOT NULL DEFAULT now()
);

-- The leader's mirror of the replicated task table, for SQL queries and reports.
CREATE TABLE tasks (
    task_id      text        PRIMARY KEY,
    task_type    text        NOT NULL,
    priority     text        NOT NULL,
    state        text        NOT NULL,
    attempt      integer     NOT NULL,
    submitter    text        NOT NULL,
    parent       text,
    cause        text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
-- Open tasks are few and looked at often; finished ones are many and looked at rarely.
CREATE INDEX tasks_open ON tasks (priority, created_at) WHERE state IN ('PENDING', 'QUEUED', 'RUNNING');
CREATE INDEX tasks_submitter ON tasks (submitter, created_at);
CREATE INDEX tasks_parent ON tasks (parent) WHERE parent IS NOT NULL;

-- Each state a task entered, per attempt. A new leader mirrors every task again; the unique key
-- makes that harmless.
CREATE TABLE task_events (
    id             bigserial   PRIMARY KEY,
    task_id        text        NOT NULL,
    state          text        NOT NULL,
    attempt        integer     NOT NULL,
    node_id        bigint,
    fencing_token  bigint,
    cause          text,
    at             timestamptz NOT NULL,
    UNIQUE (task_id, attempt, state)
);
CREATE INDEX task_events_at ON task_events (at);

-- Who changed what, through the API.
CREATE TABLE audit_log (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    node_id    bigint      NOT NULL,
    principal  text        NOT NULL,
    action     text        NOT NULL,
    target     text        NOT NULL,
    detail     jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_target ON audit_log (target, at);
