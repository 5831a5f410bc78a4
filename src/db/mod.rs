//! The coordinator's durable state in SQLite: the only module that touches rusqlite.
//!
//! One connection writes (tokio-rusqlite runs it on its own thread, so writes are serialised and
//! never block the async runtime); another reads, so listing builds never waits for a write (WAL
//! mode). Every change that must survive a crash is one transaction: a submission with all its
//! builds, the start of a round of attempts, the end of an attempt with the builds it decides.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use rusqlite::{OptionalExtension as _, Transaction, params};
use rusqlite_migration::{M, Migrations};

use crate::api::{AttemptStatus, BuildState, EventKind, HookEvent, OutputInfo};
use read::{BRIEF_SELECT, brief, brief_row, list, show};
use write::{end_attempt, fail_all, insert_build, submit};

mod events;
mod read;
mod write;

pub use events::{Backlog, Delivery, Pending, Subscriber};

/// A checked derivation, ready to store.
#[derive(Debug, Clone)]
pub struct NewDerivation {
    pub path: String,
    pub system: String,
    pub features: BTreeSet<String>,
    pub aterm: String,
    pub outputs: BTreeMap<String, String>,
    pub input_drvs: Vec<String>,
    /// Store paths the build uses directly.
    pub inputs: Vec<String>,
}

/// A submission: derivations in dependency order (inputs first), and the paths to build.
#[derive(Debug, Clone)]
pub struct Submission {
    pub derivations: Vec<NewDerivation>,
    pub requested: Vec<String>,
    pub priority: i64,
    pub tags: Vec<(String, String)>,
    pub ignore_if_built: bool,
    pub now: i64,
    /// The input derivations that must be built (the others' outputs are in the binary cache).
    pub needed: BTreeSet<String>,
    /// Derivations whose outputs the cache cannot hold (another store dir): for these, a build
    /// that succeeded counts as their outputs being available.
    pub unpublished: BTreeSet<String>,
    /// Input paths a substituter has: recorded with each new build that uses them directly.
    pub substitutable: BTreeSet<String>,
}

/// A build the queue must learn about.
#[derive(Debug, Clone)]
pub struct QueuedBuild {
    pub id: BuildId,
    pub uuid: String,
    pub drv: String,
    pub priority: i64,
    pub system: String,
    pub features: BTreeSet<String>,
    pub deps: Vec<BuildId>,
    /// Attempts so far that failed to set up or lost their machine.
    pub retries: u32,
    /// Attempts so far whose builder failed (for `--retry-failed`).
    pub failures: u32,
}

#[derive(Debug, Clone, Default)]
pub struct SubmitOutcome {
    /// One per requested derivation.
    pub requested: Vec<String>,
    /// Builds created for input derivations.
    pub dependencies: Vec<String>,
    /// Every new build, in dependency order.
    pub created: Vec<QueuedBuild>,
}

/// An attempt about to be sent to a machine.
#[derive(Debug, Clone)]
pub struct Job {
    pub build: BuildId,
    pub uuid: String,
    pub attempt: i64,
    pub n: u32,
    pub drv_path: String,
    pub aterm: String,
    pub inputs: Vec<String>,
}

/// What the end of an attempt does to its build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildChange {
    Succeed,
    /// Fail it; `cascade` lists dependents that fail with it, with the reason for each.
    Fail {
        reason: String,
        cascade: Vec<(BuildId, String)>,
    },
    Requeue {
        count_retry: bool,
    },
    /// The build already ended (canceled while running): only the attempt is recorded.
    Nothing,
}

/// The end of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    pub build: BuildId,
    pub attempt: i64,
    pub status: AttemptStatus,
    pub reason: Option<String>,
    pub outputs: Vec<OutputRow>,
    pub change: BuildChange,
    pub now: i64,
}

/// Filter for [`Db::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<BuildState>,
    pub tags: Vec<(String, String)>,
    pub limit: u32,
}

/// How a build stands, for watchers.
#[derive(Debug, Clone)]
pub struct BuildBrief {
    pub id: BuildId,
    pub uuid: String,
    pub drv: String,
    pub state: BuildState,
    pub reason: Option<String>,
    pub machine: Option<String>,
}

/// A build as `builds` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    pub uuid: String,
    pub drv: String,
    pub state: BuildState,
    pub priority: i64,
    pub tags: Vec<(String, String)>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub attempts: u32,
    pub reason: Option<String>,
}

/// One output an attempt recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRow {
    pub name: String,
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub signature: String,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub n: u32,
    pub machine: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub status: Option<AttemptStatus>,
    pub reason: Option<String>,
    pub outputs: Vec<OutputRow>,
}

/// Everything stored about one build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRecord {
    pub build: BuildRow,
    pub system: String,
    pub features: Vec<String>,
    /// Output name → store path, as the derivation declares them.
    pub outputs: BTreeMap<String, String>,
    /// UUIDs of the builds this one waits or waited for.
    pub dependencies: Vec<String>,
    /// Inputs a substituter had when it was submitted.
    pub substitutes: Vec<String>,
    pub attempts: Vec<AttemptRow>,
}

/// A build: its row id, which orders builds by submission.
pub type BuildId = i64;

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("schema.sql")),
        M::up(include_str!("migrate-2.sql")).foreign_key_check(),
        M::up(include_str!("migrate-3.sql")),
        M::up(include_str!("migrate-4.sql")),
    ])
}

fn configure(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk before the coordinator answers (a submitted build survives even a
    // power cut, not only kill -9).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(())
}

/// Whether a commit waits for the disk. Unsynced commits still survive the process's crash (the
/// log is written, not yet synced), and the write-ahead log keeps their order: a power cut can
/// only lose the latest ones, never one whose successor a synced commit kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    Synced,
    Unsynced,
}

type DbResult<T> = std::result::Result<T, rusqlite::Error>;

/// The coordinator's database.
pub struct Db {
    writer: tokio_rusqlite::Connection,
    reader: tokio_rusqlite::Connection,
    /// The hooks events are stored for ([`Db::set_subscribers`]).
    subscribers: std::sync::Mutex<std::sync::Arc<Vec<Subscriber>>>,
    /// Woken after a write that may have stored events.
    pub outbox: std::sync::Arc<tokio::sync::Notify>,
    /// Dropped with the database: stops its checkpoints.
    _checkpoints: std::sync::mpsc::Sender<()>,
}

/// How often the write-ahead log is copied back into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Checkpoint the write-ahead log from a thread and connection of its own, every
/// [`CHECKPOINT_EVERY`], until the returned sender is dropped. The writer never does it (its
/// automatic checkpoints are turned off): a checkpoint writes pages back and syncs the database
/// file, milliseconds a commit that happens to cross SQLite's threshold would otherwise wait for,
/// with the core waiting on that commit. A passive checkpoint takes no lock writers wait on.
fn start_checkpoints(path: &Path) -> rusqlite::Result<std::sync::mpsc::Sender<()>> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let name = path.display().to_string();
    let spawned = std::thread::Builder::new().name("gbc-checkpoint".into()).spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(CHECKPOINT_EVERY) {
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!("{name}: checkpointing its write-ahead log: {e}");
            }
        }
    });
    spawned.map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    Ok(tx)
}

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("{path}: migrating the schema: {source}")]
    Migrate { path: String, source: rusqlite_migration::Error },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database: the connection closed")]
    Closed,
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<tokio_rusqlite::Error<rusqlite::Error>> for Error {
    fn from(e: tokio_rusqlite::Error<rusqlite::Error>) -> Error {
        match e {
            tokio_rusqlite::Error::Error(e) | tokio_rusqlite::Error::Close((_, e)) => Error::Sqlite(e),
            _ => Error::Closed,
        }
    }
}

/// What opening the database can fail on, inside the connection's thread.
enum OpenError {
    Sqlite(rusqlite::Error),
    Migrate(rusqlite_migration::Error),
}

impl Db {
    /// Open (creating and migrating as needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<Db> {
        let name = path.display().to_string();
        let opened = |e| Error::Open { path: name.clone(), source: e };
        let writer = tokio_rusqlite::Connection::open(path).await.map_err(opened)?;
        let migrated = writer
            .call(|conn| -> std::result::Result<(), OpenError> {
                configure(conn).map_err(OpenError::Sqlite)?;
                // Off while migrating: a migration that rebuilds a table drops rows others refer
                // to and puts them back (SQLite's procedure); it checks the keys at its end.
                conn.pragma_update(None, "foreign_keys", "OFF").map_err(OpenError::Sqlite)?;
                migrations().to_latest(conn).map_err(OpenError::Migrate)?;
                conn.pragma_update(None, "foreign_keys", "ON").map_err(OpenError::Sqlite)
            })
            .await;
        match migrated {
            Ok(()) => {}
            Err(tokio_rusqlite::Error::Error(OpenError::Sqlite(e))) => return Err(opened(e)),
            Err(tokio_rusqlite::Error::Error(OpenError::Migrate(e))) => {
                return Err(Error::Migrate { path: name, source: e });
            }
            Err(_) => return Err(Error::Closed),
        }
        let reader = tokio_rusqlite::Connection::open(path).await.map_err(opened)?;
        reader
            .call(|conn| {
                configure(conn)?;
                conn.pragma_update(None, "foreign_keys", "ON")
            })
            .await?;
        let checkpoints = start_checkpoints(path).map_err(opened)?;
        writer.call(|conn| conn.pragma_update(None, "wal_autocheckpoint", 0)).await?;
        Ok(Db {
            writer,
            reader,
            _checkpoints: checkpoints,
            subscribers: std::sync::Mutex::new(std::sync::Arc::new(Vec::new())),
            outbox: std::sync::Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// From now on, store events for these hooks (the configuration's, as it is re-read).
    pub fn set_subscribers(&self, subs: Vec<Subscriber>) {
        *self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(subs);
    }

    fn subscribers(&self) -> std::sync::Arc<Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A write that may store events: the hook runner is woken after it commits.
    async fn write_events<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>, &events::Outbox) -> DbResult<R> + Send + 'static,
    ) -> Result<R> {
        self.write_events_as(Commit::Synced, f).await
    }

    async fn write_events_as<R: Send + 'static>(
        &self,
        commit: Commit,
        f: impl FnOnce(&Transaction<'_>, &events::Outbox) -> DbResult<R> + Send + 'static,
    ) -> Result<R> {
        let subs = self.subscribers();
        let (r, stored) = self
            .write_as(commit, move |tx| {
                let outbox = events::Outbox::new(subs);
                let r = f(tx, &outbox)?;
                Ok((r, outbox.stored()))
            })
            .await?;
        if stored {
            self.outbox.notify_one();
        }
        Ok(r)
    }

    /// Store one event outside any other change (a machine's coming and going).
    pub async fn record_event(&self, ev: HookEvent) -> Result<()> {
        if !self.subscribers().iter().any(|s| s.events.is_empty() || s.events.contains(&ev.event)) {
            return Ok(());
        }
        self.write_events(move |tx, outbox| outbox.emit(tx, &ev)).await
    }

    /// The events waiting for `hook`, oldest first, at most `limit`.
    pub async fn pending_events(&self, hook: String, limit: u32) -> Result<Vec<Pending>> {
        self.read(move |conn| events::pending(conn, &hook, limit)).await
    }

    /// Record what hook runs did (hook, event, outcome), in one transaction. Its commit does not
    /// wait for the disk (the next write's does): a record lost to a power cut only means an event
    /// delivered again, and the core's writes don't queue behind this one's sync.
    pub async fn record_deliveries(&self, done: Vec<(String, i64, Delivery)>) -> Result<()> {
        self.write_as(Commit::Unsynced, move |tx| events::record(tx, &done)).await
    }

    /// Per hook with stored deliveries, what they are.
    pub async fn hook_counts(&self) -> Result<Vec<Backlog>> {
        self.read(events::counts).await
    }

    /// Make the events `hook` gave up on wait for it again; how many.
    pub async fn retry_given_up(&self, hook: String) -> Result<u64> {
        let n = self.write(move |tx| events::retry_given_up(tx, &hook)).await?;
        self.outbox.notify_one();
        Ok(n)
    }

    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> DbResult<R> + Send + 'static,
    ) -> Result<R> {
        self.write_as(Commit::Synced, f).await
    }

    async fn write_as<R: Send + 'static>(
        &self,
        commit: Commit,
        f: impl FnOnce(&Transaction<'_>) -> DbResult<R> + Send + 'static,
    ) -> Result<R> {
        let r = self
            .writer
            .call(move |conn| {
                if commit == Commit::Unsynced {
                    conn.pragma_update(None, "synchronous", "NORMAL")?;
                }
                let written = conn.transaction().and_then(|tx| {
                    let r = f(&tx)?;
                    tx.commit()?;
                    Ok(r)
                });
                if commit == Commit::Unsynced {
                    conn.pragma_update(None, "synchronous", "FULL")?;
                }
                written
            })
            .await?;
        Ok(r)
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> DbResult<R> + Send + 'static,
    ) -> Result<R> {
        Ok(self.reader.call(move |conn| f(conn)).await?)
    }

    /// After a crash or a stop: attempts left open were interrupted, and their builds go back to
    /// the queue. Returns the interrupted attempts as (build uuid, attempt number).
    pub async fn recover(&self, now: i64) -> Result<Vec<(String, u32)>> {
        self.write(move |tx| {
            let open: Vec<(String, u32)> = tx
                .prepare("SELECT b.uuid, a.n FROM attempts a JOIN builds b ON b.id = a.build WHERE a.ended_at IS NULL")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<DbResult<_>>()?;
            tx.execute(
                "UPDATE attempts SET ended_at = ?1, status = 'interrupted', reason = 'the coordinator stopped'
                 WHERE ended_at IS NULL",
                [now],
            )?;
            tx.execute("UPDATE builds SET state = 'queued' WHERE state = 'running'", [])?;
            Ok(open)
        })
        .await
    }

    /// Every queued build, oldest first (so dependencies come before their dependents), with the
    /// dependencies that are still queued.
    pub async fn load_queue(&self) -> Result<Vec<QueuedBuild>> {
        self.read(|conn| {
            let mut deps: HashMap<BuildId, Vec<BuildId>> = HashMap::new();
            let mut stmt = conn.prepare(
                "SELECT d.build, d.dep FROM build_deps d JOIN builds b ON b.id = d.build
                 JOIN builds dep ON dep.id = d.dep
                 WHERE b.state = 'queued' AND dep.state IN ('queued', 'running')",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                deps.entry(r.get(0)?).or_default().push(r.get(1)?);
            }
            let mut stmt = conn.prepare(
                "SELECT b.id, b.uuid, d.path, b.priority, d.system, d.features, b.retries,
                        (SELECT COUNT(*) FROM attempts a WHERE a.build = b.id
                         AND a.status IN ('build_failure', 'timed_out', 'silent_too_long'))
                 FROM builds b
                 JOIN derivations d ON d.id = b.drv WHERE b.state = 'queued' ORDER BY b.id",
            )?;
            let builds = stmt
                .query_map([], |r| {
                    let id: BuildId = r.get(0)?;
                    let features: String = r.get(5)?;
                    Ok(QueuedBuild {
                        id,
                        uuid: r.get(1)?,
                        drv: r.get(2)?,
                        priority: r.get(3)?,
                        system: r.get(4)?,
                        features: split_words(&features),
                        deps: Vec::new(),
                        retries: r.get(6)?,
                        failures: r.get(7)?,
                    })
                })?
                .collect::<DbResult<Vec<_>>>()?;
            Ok(builds
                .into_iter()
                .map(|mut b| {
                    b.deps = deps.remove(&b.id).unwrap_or_default();
                    b
                })
                .collect())
        })
        .await
    }

    /// Store a submission: its derivations (once each), a build per requested derivation, and a
    /// build for each input derivation that has neither an active nor a successful one.
    pub async fn submit(&self, sub: Submission) -> Result<SubmitOutcome> {
        self.write_events(move |tx, subs| {
            let out = submit(tx, &sub)?;
            if subs.wants(EventKind::BuildSubmitted) {
                let requested: BTreeSet<&str> = out.requested.iter().map(String::as_str).collect();
                for b in &out.created {
                    let mut ev = HookEvent::new(EventKind::BuildSubmitted, sub.now);
                    ev.build = Some(b.uuid.clone());
                    ev.drv = Some(b.drv.clone());
                    ev.state = Some(BuildState::Queued);
                    ev.priority = Some(b.priority);
                    if requested.contains(b.uuid.as_str()) {
                        ev.tags = sub.tags.clone();
                    } else {
                        ev.reason = Some("an input of a submitted build".into());
                    }
                    subs.emit(tx, &ev)?;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Record the start of attempts (build, machine) and return what to send. The commit does not
    /// wait for the disk, which the core would wait for at every allocation: a start lost to a
    /// power cut, with its `build-started` events, leaves its builds queued, and they run again,
    /// as builds whose attempt a stop interrupted do.
    pub async fn start_attempts(&self, picks: Vec<(BuildId, String)>, now: i64) -> Result<Vec<Job>> {
        self.write_events_as(Commit::Unsynced, move |tx, subs| {
            let tell = subs.wants(EventKind::BuildStarted);
            let mut jobs = Vec::with_capacity(picks.len());
            let mut get = tx.prepare_cached(
                "SELECT b.uuid, b.attempts, d.path, d.aterm, d.inputs FROM builds b
                 JOIN derivations d ON d.id = b.drv WHERE b.id = ?1",
            )?;
            let mut upd = tx.prepare_cached(
                "UPDATE builds SET state = 'running', attempts = attempts + 1,
                 started_at = COALESCE(started_at, ?2) WHERE id = ?1",
            )?;
            let mut ins =
                tx.prepare_cached("INSERT INTO attempts (build, n, machine, started_at) VALUES (?1, ?2, ?3, ?4)")?;
            for (build, machine) in picks {
                let (uuid, attempts, drv_path, aterm, inputs): (String, u32, String, String, String) =
                    get.query_row([build], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
                upd.execute(params![build, now])?;
                let n = attempts + 1;
                ins.execute(params![build, n, machine, now])?;
                let attempt = tx.last_insert_rowid();
                let inputs = inputs.lines().map(str::to_owned).collect();
                if tell {
                    let mut ev = HookEvent::new(EventKind::BuildStarted, now);
                    ev.build = Some(uuid.clone());
                    ev.drv = Some(drv_path.clone());
                    ev.state = Some(BuildState::Running);
                    ev.machine = Some(machine.clone());
                    ev.attempt = Some(n);
                    subs.emit(tx, &ev)?;
                }
                jobs.push(Job { build, uuid, attempt, n, drv_path, aterm, inputs });
            }
            Ok(jobs)
        })
        .await
    }

    /// Record the end of attempts, and what they decide for their builds, in one transaction.
    pub async fn end_attempts(&self, ends: Vec<AttemptEnd>) -> Result<()> {
        self.write_events(move |tx, subs| {
            for end in &ends {
                let (changed, cascade) = end_attempt(tx, end)?;
                if !subs.is_empty() {
                    attempt_events(tx, subs, end, changed, &cascade)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// For each path, a derivation known to produce it, if any.
    pub async fn providers(&self, paths: Vec<String>) -> Result<Vec<(String, Option<i64>)>> {
        self.read(move |conn| {
            let mut find = conn.prepare_cached(
                "SELECT o.drv FROM derivation_outputs o WHERE o.path = ?1 ORDER BY o.drv DESC LIMIT 1",
            )?;
            let mut out = Vec::with_capacity(paths.len());
            for p in paths {
                let drv = find.query_row([&p], |r| r.get::<_, i64>(0)).optional()?;
                out.push((p, drv));
            }
            Ok(out)
        })
        .await
    }

    /// Make `build` wait for a build of each of `drvs`: a queued or running one, else a new one at
    /// its priority. Returns the builds created and every build it now waits for.
    pub async fn wait_for(&self, build: BuildId, drvs: Vec<i64>, now: i64) -> Result<(Vec<QueuedBuild>, Vec<BuildId>)> {
        self.write_events(move |tx, subs| {
            let priority: i64 = tx.query_row("SELECT priority FROM builds WHERE id = ?1", [build], |r| r.get(0))?;
            let mut active = tx.prepare_cached(
                "SELECT id FROM builds WHERE drv = ?1 AND state IN ('queued', 'running') ORDER BY id DESC LIMIT 1",
            )?;
            let mut describe = tx.prepare_cached("SELECT path, system, features FROM derivations WHERE id = ?1")?;
            let mut dep = tx.prepare_cached("INSERT OR IGNORE INTO build_deps (build, dep) VALUES (?1, ?2)")?;
            let (mut created, mut deps) = (Vec::new(), Vec::new());
            let tell = subs.wants(EventKind::BuildSubmitted);
            let waiting: Option<String> = if tell {
                tx.query_row("SELECT uuid FROM builds WHERE id = ?1", [build], |r| r.get(0)).optional()?
            } else {
                None
            };
            for drv in drvs {
                let id = match active.query_row([drv], |r| r.get::<_, BuildId>(0)).optional()? {
                    Some(id) => id,
                    None => {
                        let (path, system, features): (String, String, String) =
                            describe.query_row([drv], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                        let (id, uuid) = insert_build(tx, drv, priority, now)?;
                        if tell {
                            let mut ev = HookEvent::new(EventKind::BuildSubmitted, now);
                            ev.build = Some(uuid.clone());
                            ev.drv = Some(path.clone());
                            ev.state = Some(BuildState::Queued);
                            ev.priority = Some(priority);
                            ev.reason = Some(format!("makes inputs build {} lacks", waiting.as_deref().unwrap_or("?")));
                            subs.emit(tx, &ev)?;
                        }
                        created.push(QueuedBuild {
                            id,
                            uuid,
                            drv: path,
                            priority,
                            system,
                            features: features.split_whitespace().map(str::to_owned).collect(),
                            deps: Vec::new(),
                            retries: 0,
                            failures: 0,
                        });
                        id
                    }
                };
                dep.execute(params![build, id])?;
                deps.push(id);
            }
            Ok((created, deps))
        })
        .await
    }

    /// Cancel a queued or running build, failing its dependents (`cascade`). False when it had
    /// already ended.
    pub async fn cancel(&self, build: BuildId, cascade: Vec<(BuildId, String)>, now: i64) -> Result<bool> {
        self.write_events(move |tx, subs| {
            let n = tx.execute(
                "UPDATE builds SET state = 'canceled', reason = 'canceled', ended_at = ?2
                 WHERE id = ?1 AND state IN ('queued', 'running')",
                params![build, now],
            )?;
            let failed = fail_all(tx, &cascade, now)?;
            if n == 1 && subs.wants(EventKind::BuildCanceled) {
                let mut ev = events::build_event(tx, EventKind::BuildCanceled, build, now)?;
                ev.state = Some(BuildState::Canceled);
                ev.reason = Some("canceled".into());
                subs.emit(tx, &ev)?;
            }
            cascade_events(tx, subs, &failed, now)?;
            Ok(n == 1)
        })
        .await
    }

    /// A build's id and state, by UUID.
    pub async fn find(&self, uuid: &str) -> Result<Option<BuildBrief>> {
        let uuid = uuid.to_owned();
        self.read(move |conn| brief(conn, &uuid)).await
    }

    /// Where each of these builds stands (unknown UUIDs are left out).
    pub async fn briefs(&self, uuids: Vec<String>) -> Result<Vec<BuildBrief>> {
        self.read(move |conn| {
            let mut out = Vec::new();
            for u in &uuids {
                if let Some(b) = brief(conn, u)? {
                    out.push(b);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Every queued or running build.
    pub async fn active(&self) -> Result<Vec<BuildBrief>> {
        self.read(|conn| {
            let sql = format!("{BRIEF_SELECT} WHERE b.state IN ('queued', 'running') ORDER BY b.state, b.id");
            conn.prepare(&sql)?.query_map([], brief_row)?.collect()
        })
        .await
    }

    pub async fn list(&self, filter: ListFilter) -> Result<Vec<BuildRow>> {
        self.read(move |conn| list(conn, &filter)).await
    }

    /// The store paths builds since `since_ms` need: the outputs of attempts that succeeded since,
    /// and the inputs of builds created since or still queued or running (roots of a cache GC).
    pub async fn recent_paths(&self, since_ms: i64) -> Result<Vec<String>> {
        self.read(move |conn| {
            let mut out = Vec::new();
            let mut q = conn.prepare(
                "SELECT ao.path FROM attempt_outputs ao JOIN attempts a ON a.id = ao.attempt
                 WHERE a.status = 'success' AND a.ended_at >= ?1",
            )?;
            for p in q.query_map([since_ms], |r| r.get::<_, String>(0))? {
                out.push(p?);
            }
            let mut q = conn.prepare(
                "SELECT d.inputs FROM builds b JOIN derivations d ON d.id = b.drv
                 WHERE b.state IN ('queued', 'running') OR b.created_at >= ?1",
            )?;
            for inputs in q.query_map([since_ms], |r| r.get::<_, String>(0))? {
                out.extend(inputs?.lines().filter(|l| !l.is_empty()).map(str::to_owned));
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
        .await
    }

    /// How many builds are in each state (for metrics), and when the oldest queued one was
    /// created.
    pub async fn census(&self) -> Result<(Vec<(BuildState, u64)>, Option<i64>)> {
        self.read(|conn| {
            let mut counts = Vec::new();
            for state in BuildState::ALL {
                let n: i64 = conn
                    .prepare_cached("SELECT count(*) FROM builds WHERE state = ?1")?
                    .query_row([state.as_str()], |r| r.get(0))?;
                counts.push((state, n as u64));
            }
            let oldest: Option<i64> = conn
                .prepare_cached("SELECT min(created_at) FROM builds WHERE state = 'queued'")?
                .query_row([], |r| r.get(0))?;
            Ok((counts, oldest))
        })
        .await
    }

    pub async fn show(&self, uuid: &str) -> Result<Option<BuildRecord>> {
        let uuid = uuid.to_owned();
        self.read(move |conn| show(conn, &uuid)).await
    }
}

/// The events of an attempt's end: its build's (when it changed) and its failed dependents'.
fn attempt_events(
    tx: &Transaction<'_>,
    subs: &events::Outbox,
    end: &AttemptEnd,
    changed: bool,
    cascade: &[&(BuildId, String)],
) -> DbResult<()> {
    if changed {
        let (kind, state, retry) = match &end.change {
            BuildChange::Succeed => (EventKind::BuildSucceeded, BuildState::Succeeded, false),
            BuildChange::Fail { .. } => (EventKind::BuildFailed, BuildState::Failed, false),
            BuildChange::Requeue { .. } if end.status == AttemptStatus::MissingInputs => {
                (EventKind::BuildMissingInputs, BuildState::Queued, false)
            }
            BuildChange::Requeue { .. } => (EventKind::BuildFailed, BuildState::Queued, true),
            BuildChange::Nothing => return cascade_events(tx, subs, cascade, end.now),
        };
        if subs.wants(kind) {
            let mut ev = events::build_event(tx, kind, end.build, end.now)?;
            ev.state = Some(state);
            ev.retry = retry;
            ev.status = Some(end.status);
            ev.reason = match &end.change {
                BuildChange::Fail { reason, .. } => Some(reason.clone()),
                _ => end.reason.clone(),
            };
            if let Some((n, machine)) = events::attempt_of(tx, end.attempt)? {
                ev.attempt = Some(n);
                ev.machine = Some(machine);
            }
            ev.outputs = end
                .outputs
                .iter()
                .map(|o| OutputInfo {
                    name: o.name.clone(),
                    path: o.path.clone(),
                    nar_hash: o.nar_hash.clone(),
                    nar_size: o.nar_size,
                    references: o.references.clone(),
                    signature: o.signature.clone(),
                })
                .collect();
            subs.emit(tx, &ev)?;
        }
    }
    cascade_events(tx, subs, cascade, end.now)
}

/// `build-failed` for each dependent failed along with another build.
fn cascade_events(
    tx: &Transaction<'_>,
    subs: &events::Outbox,
    failed: &[&(BuildId, String)],
    now: i64,
) -> DbResult<()> {
    if !subs.wants(EventKind::BuildFailed) {
        return Ok(());
    }
    for (id, reason) in failed {
        let mut ev = events::build_event(tx, EventKind::BuildFailed, *id, now)?;
        ev.state = Some(BuildState::Failed);
        ev.reason = Some(reason.clone());
        subs.emit(tx, &ev)?;
    }
    Ok(())
}

fn split_words(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

fn join_lines<S: AsRef<str>>(items: &[S]) -> String {
    items.iter().map(AsRef::as_ref).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The write-ahead log gets back into the database by the checkpoint thread, with no commit
    /// doing it: the writer's automatic checkpoints are off, and writes far below their threshold
    /// (1,000 pages) still reach the database file within a few rounds of the thread.
    #[tokio::test]
    async fn the_log_is_checkpointed_beside_the_commits() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.path().join("gbc.db");
        let db = Db::open(&path).await.unwrap_or_else(|e| unreachable!("{e}"));
        let auto: i64 = db
            .writer
            .call(|c| c.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)))
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(auto, 0, "the writer checkpoints itself");
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let before = size();
        for _ in 0..20 {
            db.write(|tx| {
                tx.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)", [])?;
                tx.execute("INSERT INTO filler VALUES (zeroblob(16384))", [])
            })
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        }
        let deadline = std::time::Instant::now() + 10 * CHECKPOINT_EVERY;
        while size() < before + 20 * 16384 && std::time::Instant::now() < deadline {
            tokio::time::sleep(CHECKPOINT_EVERY / 5).await;
        }
        assert!(size() >= before + 20 * 16384, "database file {} bytes, {before} before the writes", size());
    }

    #[test]
    fn migrations_are_valid() {
        assert!(migrations().validate().is_ok());
    }

    /// Version 2 rebuilds `attempts` with a CHECK on its status: the rows of a version 1 database
    /// (and the outputs referring to them) survive, and a status gbc does not know is refused.
    #[test]
    fn attempt_statuses_are_checked_and_version_1_rows_survive() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap_or_else(|e| unreachable!("{e}"));
        conn.pragma_update(None, "foreign_keys", "OFF").unwrap_or_else(|e| unreachable!("{e}"));
        let ok = |r: rusqlite::Result<usize>| r.unwrap_or_else(|e| unreachable!("{e}"));
        migrations().to_version(&mut conn, 1).unwrap_or_else(|e| unreachable!("{e}"));
        ok(conn.execute("INSERT INTO derivations VALUES (1, '/nix/store/x.drv', 's', '', '', '')", []));
        ok(conn.execute(
            "INSERT INTO builds (id, uuid, drv, priority, state, created_at) VALUES (1, 'u', 1, 0, 'running', 0)",
            [],
        ));
        ok(conn.execute("INSERT INTO attempts VALUES (7, 1, 1, 'm', 0, 5, 'success', NULL)", []));
        ok(conn.execute("INSERT INTO attempts VALUES (8, 1, 2, 'm', 6, NULL, NULL, NULL)", []));
        ok(conn.execute("INSERT INTO attempt_outputs VALUES (7, 'out', '/nix/store/y', 'sha256:0', 1, '', 'k:s')", []));
        migrations().to_latest(&mut conn).unwrap_or_else(|e| unreachable!("{e}"));
        let rows: Vec<(i64, Option<String>)> = conn
            .prepare("SELECT id, status FROM attempts ORDER BY id")
            .and_then(|mut q| q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(rows, [(7, Some("success".to_owned())), (8, None)]);
        conn.pragma_update(None, "foreign_keys", "ON").unwrap_or_else(|e| unreachable!("{e}"));
        let n: i64 = conn
            .query_row("SELECT count(*) FROM attempt_outputs o JOIN attempts a ON a.id = o.attempt", [], |r| r.get(0))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(n, 1);
        for status in AttemptStatus::ALL {
            ok(conn.execute("UPDATE attempts SET status = ?1 WHERE id = 7", [status.as_str()]));
        }
        let bad = conn.execute("UPDATE attempts SET status = 'failure' WHERE id = 7", []);
        assert!(bad.is_err_and(|e| e.to_string().contains("CHECK")));
        let half = conn.execute("UPDATE attempts SET status = 'success' WHERE id = 8", []);
        assert!(half.is_err_and(|e| e.to_string().contains("CHECK")), "a running attempt has no status");
    }
}
