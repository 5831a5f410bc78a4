-- gbc coordinator database, version 1. Times are Unix milliseconds.

-- Every derivation a submission brought, checked: its outputs match its contents.
CREATE TABLE derivations (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    system TEXT NOT NULL,
    -- requiredSystemFeatures, space-separated, sorted
    features TEXT NOT NULL,
    aterm TEXT NOT NULL,
    -- the store paths the build uses directly (input sources and used input outputs), newline-separated
    inputs TEXT NOT NULL
) STRICT;

CREATE TABLE derivation_outputs (
    drv INTEGER NOT NULL REFERENCES derivations(id),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (drv, name)
) STRICT, WITHOUT ROWID;
CREATE INDEX derivation_outputs_path ON derivation_outputs(path);

CREATE TABLE derivation_inputs (
    drv INTEGER NOT NULL REFERENCES derivations(id),
    input INTEGER NOT NULL REFERENCES derivations(id),
    PRIMARY KEY (drv, input)
) STRICT, WITHOUT ROWID;

-- The id orders builds by submission.
CREATE TABLE builds (
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    drv INTEGER NOT NULL REFERENCES derivations(id),
    priority INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    -- why it failed or was canceled
    reason TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    ended_at INTEGER,
    -- attempts so far, and how many of them failed to set up or lost their machine
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX builds_state ON builds(state, id);
CREATE INDEX builds_drv ON builds(drv, state);

CREATE TABLE build_tags (
    build INTEGER NOT NULL REFERENCES builds(id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (build, key, value)
) STRICT, WITHOUT ROWID;
CREATE INDEX build_tags_kv ON build_tags(key, value, build);

-- build waits for dep (dep was queued or running when build was submitted)
CREATE TABLE build_deps (
    build INTEGER NOT NULL REFERENCES builds(id),
    dep INTEGER NOT NULL REFERENCES builds(id),
    PRIMARY KEY (build, dep)
) STRICT, WITHOUT ROWID;
CREATE INDEX build_deps_dep ON build_deps(dep, build);

CREATE TABLE attempts (
    id INTEGER PRIMARY KEY,
    build INTEGER NOT NULL REFERENCES builds(id),
    n INTEGER NOT NULL,
    machine TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    -- NULL while running
    status TEXT,
    reason TEXT,
    UNIQUE (build, n)
) STRICT;
CREATE INDEX attempts_open ON attempts(ended_at) WHERE ended_at IS NULL;

CREATE TABLE attempt_outputs (
    attempt INTEGER NOT NULL REFERENCES attempts(id),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    nar_hash TEXT NOT NULL,
    nar_size INTEGER NOT NULL,
    -- newline-separated
    refs TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (attempt, name)
) STRICT, WITHOUT ROWID;
