//! The hooks' outbox: events are written by the transactions that make the changes they tell of
//! (so a crash can't keep one and lose the other), with a delivery row for each hook that wants
//! them; the hook runner reads the rows and removes each once its hook has taken the event.

use std::collections::BTreeSet;

use rusqlite::{OptionalExtension as _, Transaction, params};

use super::{BuildId, DbResult};
use crate::api::{EventKind, HookEvent};

/// A hook as the outbox knows it: its name and the events it wants (every one when empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub name: String,
    pub events: BTreeSet<EventKind>,
}

impl Subscriber {
    fn wants(&self, kind: EventKind) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }
}

/// The hooks a transaction stores events for, and whether it stored any.
pub(super) struct Outbox {
    subs: std::sync::Arc<Vec<Subscriber>>,
    stored: std::cell::Cell<bool>,
}

impl Outbox {
    pub(super) fn new(subs: std::sync::Arc<Vec<Subscriber>>) -> Outbox {
        Outbox { subs, stored: std::cell::Cell::new(false) }
    }

    /// Whether any hook wants events of `kind` (else there is nothing to gather for them).
    pub(super) fn wants(&self, kind: EventKind) -> bool {
        self.subs.iter().any(|s| s.wants(kind))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Whether an event was stored.
    pub(super) fn stored(&self) -> bool {
        self.stored.get()
    }

    /// Store `ev` for every hook that wants it (nothing when none does).
    pub(super) fn emit(&self, tx: &Transaction<'_>, ev: &HookEvent) -> DbResult<()> {
        emit(tx, &self.subs, ev)?;
        self.stored.set(self.stored.get() || self.wants(ev.event));
        Ok(())
    }
}

/// Store `ev` for every hook that wants it (nothing when none does).
fn emit(tx: &Transaction<'_>, subs: &[Subscriber], ev: &HookEvent) -> DbResult<()> {
    let wanting: Vec<&str> = subs.iter().filter(|s| s.wants(ev.event)).map(|s| s.name.as_str()).collect();
    if wanting.is_empty() {
        return Ok(());
    }
    let body = serde_json::to_string(ev).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
    tx.prepare_cached("INSERT INTO events (kind, at, body) VALUES (?1, ?2, ?3)")?.execute(params![
        ev.event.as_str(),
        ev.at_ms,
        body
    ])?;
    let id = tx.last_insert_rowid();
    let mut ins = tx.prepare_cached("INSERT INTO deliveries (hook, event, build) VALUES (?1, ?2, ?3)")?;
    for hook in wanting {
        ins.execute(params![hook, id, ev.build])?;
    }
    Ok(())
}

/// A build event of `kind` about build `id`, its UUID and derivation filled in.
pub(super) fn build_event(tx: &Transaction<'_>, kind: EventKind, id: BuildId, at_ms: i64) -> DbResult<HookEvent> {
    let (uuid, drv): (String, String) = tx
        .prepare_cached("SELECT b.uuid, d.path FROM builds b JOIN derivations d ON d.id = b.drv WHERE b.id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut ev = HookEvent::new(kind, at_ms);
    ev.build = Some(uuid);
    ev.drv = Some(drv);
    Ok(ev)
}

/// An attempt's number and machine.
pub(super) fn attempt_of(tx: &Transaction<'_>, attempt: i64) -> DbResult<Option<(u32, String)>> {
    tx.prepare_cached("SELECT n, machine FROM attempts WHERE id = ?1")?
        .query_row([attempt], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// One event waiting for a hook.
#[derive(Debug, Clone)]
pub struct Pending {
    pub event: i64,
    pub build: Option<String>,
    pub tries: u32,
    pub next_at: i64,
    /// The JSON as the hook gets it (with its id).
    pub body: String,
    pub kind: String,
    pub at_ms: i64,
}

/// What became of a run of a hook on an event.
#[derive(Debug, Clone)]
pub enum Delivery {
    Taken,
    /// Failed: try again at `next_at`, or give up (`next_at` None), keeping `error`.
    Failed {
        tries: u32,
        next_at: Option<i64>,
        error: String,
    },
}

/// The hook's waiting events, oldest first, at most `limit` (given-up ones left out).
pub(super) fn pending(conn: &rusqlite::Connection, hook: &str, limit: u32) -> DbResult<Vec<Pending>> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.event, d.build, d.tries, d.next_at, e.body, e.kind, e.at FROM deliveries d
         JOIN events e ON e.id = d.event WHERE d.hook = ?1 AND d.given_up = 0 ORDER BY d.event LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![hook, limit], |r| {
        let id: i64 = r.get(0)?;
        let body: String = r.get(4)?;
        Ok(Pending {
            event: id,
            build: r.get(1)?,
            tries: r.get(2)?,
            next_at: r.get(3)?,
            body: with_id(&body, id),
            kind: r.get(5)?,
            at_ms: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// The stored body with its id set: it was serialised before the id was known, with `"id":0`
/// right after `"version"` (the struct's field order), so the first `"id":0,` is the id.
fn with_id(body: &str, id: i64) -> String {
    body.replacen("\"id\":0,", &format!("\"id\":{id},"), 1)
}

/// Record what runs did, and drop the events no hook waits for any more.
pub(super) fn record(tx: &Transaction<'_>, done: &[(String, i64, Delivery)]) -> DbResult<()> {
    let mut del = tx.prepare_cached("DELETE FROM deliveries WHERE hook = ?1 AND event = ?2")?;
    let mut upd = tx.prepare_cached(
        "UPDATE deliveries SET tries = ?3, next_at = ?4, given_up = ?5, last_error = ?6 WHERE hook = ?1 AND event = ?2",
    )?;
    let mut orphan = tx.prepare_cached(
        "DELETE FROM events WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event = ?1)",
    )?;
    for (hook, event, what) in done {
        match what {
            Delivery::Taken => {
                del.execute(params![hook, event])?;
                orphan.execute([event])?;
            }
            Delivery::Failed { tries, next_at, error } => {
                upd.execute(params![hook, event, tries, next_at.unwrap_or(0), next_at.is_none(), error])?;
            }
        }
    }
    Ok(())
}

/// What the outbox holds for one hook.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    pub hook: String,
    /// Events waiting (running and backing off included).
    pub waiting: u64,
    pub given_up: u64,
    /// The error of its latest event that failed.
    pub last_error: Option<String>,
}

/// Per hook with stored deliveries, what they are.
pub(super) fn counts(conn: &rusqlite::Connection) -> DbResult<Vec<Backlog>> {
    let mut stmt = conn.prepare_cached(
        "SELECT hook, SUM(given_up = 0), SUM(given_up = 1),
                (SELECT last_error FROM deliveries d2 WHERE d2.hook = d.hook AND d2.last_error IS NOT NULL
                 ORDER BY d2.event DESC LIMIT 1)
         FROM deliveries d GROUP BY hook ORDER BY hook",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Backlog {
            hook: r.get(0)?,
            waiting: r.get::<_, i64>(1)? as u64,
            given_up: r.get::<_, i64>(2)? as u64,
            last_error: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Make the events `hook` gave up on wait for it again; how many.
pub(super) fn retry_given_up(tx: &Transaction<'_>, hook: &str) -> DbResult<u64> {
    let n = tx.execute(
        "UPDATE deliveries SET given_up = 0, tries = 0, next_at = 0 WHERE hook = ?1 AND given_up = 1",
        [hook],
    )?;
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_set_in_the_stored_body() {
        let mut ev = HookEvent::new(EventKind::BuildFailed, 5);
        ev.reason = Some("\"id\":0, in a reason".into());
        let body = serde_json::to_string(&ev).unwrap_or_default();
        let back: HookEvent = serde_json::from_str(&with_id(&body, 42)).unwrap_or_else(|e| unreachable!("{e}"));
        ev.id = 42;
        assert_eq!(back, ev);
    }
}
