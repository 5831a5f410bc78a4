-- gbc coordinator database, version 4: the hooks' outbox (docs/hooks.md). An event is written in
-- the transaction of the change it tells of, with one delivery row for each hook that wants it;
-- a delivery row goes once its hook has taken the event, and an event once no delivery of it is
-- left. So after a crash every event is still there for every hook that had not taken it.
CREATE TABLE events (
    -- AUTOINCREMENT: ids are never reused, though delivered events are deleted
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    at INTEGER NOT NULL,
    -- the event's JSON as hooks get it, but for its id (the row's)
    body TEXT NOT NULL
) STRICT;

CREATE TABLE deliveries (
    hook TEXT NOT NULL,
    event INTEGER NOT NULL REFERENCES events(id),
    -- the build's UUID, for hooks that take one build's events in order
    build TEXT,
    -- runs that failed so far
    tries INTEGER NOT NULL DEFAULT 0,
    -- not before (Unix ms)
    next_at INTEGER NOT NULL DEFAULT 0,
    -- 1 once the hook's retries are spent: kept for `gbc hooks retry`
    given_up INTEGER NOT NULL DEFAULT 0 CHECK (given_up IN (0, 1)),
    last_error TEXT,
    PRIMARY KEY (hook, event)
) STRICT, WITHOUT ROWID;
CREATE INDEX deliveries_event ON deliveries(event);
