-- gbc coordinator database, version 2: an attempt's status is one of the names gbc writes
-- (api::AttemptStatus), checked like a build's state. SQLite cannot add a CHECK to a column, so
-- the table is rebuilt with the same rows and ids, as SQLite's documentation says (migrations run
-- with foreign keys off; the migration then checks them: attempt_outputs refers to these ids).

CREATE TABLE attempts_v2 (
    id INTEGER PRIMARY KEY,
    build INTEGER NOT NULL REFERENCES builds(id),
    n INTEGER NOT NULL,
    machine TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    -- NULL while running
    status TEXT CHECK (status IN ('success', 'build_failure', 'timed_out', 'silent_too_long',
        'setup_failure', 'transient_failure', 'missing_inputs', 'missing_reference', 'rejected',
        'store_failure', 'interrupted', 'canceled')),
    reason TEXT,
    UNIQUE (build, n),
    CHECK ((status IS NULL) = (ended_at IS NULL))
) STRICT;
INSERT INTO attempts_v2 (id, build, n, machine, started_at, ended_at, status, reason)
    SELECT id, build, n, machine, started_at, ended_at, status, reason FROM attempts;
DROP TABLE attempts;
ALTER TABLE attempts_v2 RENAME TO attempts;
CREATE INDEX attempts_open ON attempts(ended_at) WHERE ended_at IS NULL;
