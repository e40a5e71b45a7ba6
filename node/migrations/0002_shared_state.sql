-- MAOS shared state (format 2): the leader's mirror of the replicated key-value space (workflow
-- shared state and coordination keys), for SQL queries, reports and backups. The replicated
-- space stays the authority: compare-and-set, TTLs and lease fencing are decided there, in log
-- order. A row is the key's value at `revision`; a later write replaces it, a delete or an
-- expiry removes it.

CREATE TABLE shared_state (
    -- "C" collation: the primary key's index serves prefix scans (`key >= 'workflows/w1/'`).
    key         text COLLATE "C" PRIMARY KEY,
    value       text        NOT NULL,
    -- The cluster-wide write counter at this write; the mirror never replaces a row with an older one.
    revision    bigint      NOT NULL CHECK (revision > 0),
    updated_at  timestamptz NOT NULL,
    -- NULL: the key lasts until deleted.
    expires_at  timestamptz
);
-- Keys are read by prefix through the primary key; the few with a TTL are found by when they
-- expire (`WHERE expires_at > now()` for what is live, `<=` for what the leader will remove next).
CREATE INDEX shared_state_expiring ON shared_state (expires_at) WHERE expires_at IS NOT NULL;
