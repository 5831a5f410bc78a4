-- gbc coordinator database, version 3: for each build, the input paths a substituter had when it
-- was submitted (they come from upstream instead of being built), for `gbc show`.
CREATE TABLE build_substitutes (
    build INTEGER NOT NULL REFERENCES builds(id),
    path TEXT NOT NULL,
    PRIMARY KEY (build, path)
) STRICT, WITHOUT ROWID;
