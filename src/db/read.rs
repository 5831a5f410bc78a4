//! The queries behind `gbc builds`, `gbc show` and `gbc watch`: rows checked as they are read.

use rusqlite::OptionalExtension as _;

use super::{AttemptRow, BuildBrief, BuildId, BuildRecord, BuildRow, DbResult, ListFilter, OutputRow};
use crate::api::{AttemptStatus, BuildState};

/// A build state column; anything else is a corrupt row, not a state to guess.
pub(super) fn state_column(r: &rusqlite::Row<'_>, i: usize) -> DbResult<BuildState> {
    let state: String = r.get(i)?;
    BuildState::parse(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("build state {state:?}").into(),
        )
    })
}

/// An attempt's status column: NULL while it runs; a name gbc does not write is a corrupt row.
pub(super) fn status_column(r: &rusqlite::Row<'_>, i: usize) -> DbResult<Option<AttemptStatus>> {
    let Some(status): Option<String> = r.get(i)? else { return Ok(None) };
    AttemptStatus::parse(&status).map(Some).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("attempt status {status:?}").into(),
        )
    })
}

const SUMMARY_COLUMNS: &str = "b.id, b.uuid, d.path, b.state, b.priority, b.created_at, b.started_at, b.ended_at, \
                               b.attempts, b.reason";

pub(super) fn summary_row(conn: &rusqlite::Connection, r: &rusqlite::Row<'_>) -> DbResult<BuildRow> {
    let id: BuildId = r.get(0)?;
    let tags = conn
        .prepare_cached("SELECT key, value FROM build_tags WHERE build = ?1 ORDER BY key, value")?
        .query_map([id], |t| Ok((t.get(0)?, t.get(1)?)))?
        .collect::<DbResult<_>>()?;
    Ok(BuildRow {
        uuid: r.get(1)?,
        drv: r.get(2)?,
        state: state_column(r, 3)?,
        priority: r.get(4)?,
        tags,
        created_ms: r.get(5)?,
        started_ms: r.get(6)?,
        ended_ms: r.get(7)?,
        attempts: r.get(8)?,
        reason: r.get(9)?,
    })
}

pub(super) fn list(conn: &rusqlite::Connection, f: &ListFilter) -> DbResult<Vec<BuildRow>> {
    let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM builds b JOIN derivations d ON d.id = b.drv WHERE 1");
    let mut args: Vec<String> = Vec::new();
    if let Some(state) = f.state {
        args.push(state.as_str().to_owned());
        sql.push_str(&format!(" AND b.state = ?{}", args.len()));
    }
    for (k, v) in &f.tags {
        args.push(k.clone());
        args.push(v.clone());
        sql.push_str(&format!(
            " AND b.id IN (SELECT build FROM build_tags WHERE key = ?{} AND value = ?{})",
            args.len() - 1,
            args.len()
        ));
    }
    sql.push_str(&format!(" ORDER BY b.id DESC LIMIT {}", f.limit));
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(summary_row(conn, r)?);
    }
    Ok(out)
}

pub(super) const BRIEF_SELECT: &str = "SELECT b.id, b.uuid, d.path, b.state, b.reason,
        (SELECT machine FROM attempts a WHERE a.build = b.id ORDER BY n DESC LIMIT 1)
    FROM builds b JOIN derivations d ON d.id = b.drv";

pub(super) fn brief_row(r: &rusqlite::Row<'_>) -> DbResult<BuildBrief> {
    Ok(BuildBrief {
        id: r.get(0)?,
        uuid: r.get(1)?,
        drv: r.get(2)?,
        state: state_column(r, 3)?,
        reason: r.get(4)?,
        machine: r.get(5)?,
    })
}

pub(super) fn brief(conn: &rusqlite::Connection, uuid: &str) -> DbResult<Option<BuildBrief>> {
    conn.prepare_cached(&format!("{BRIEF_SELECT} WHERE b.uuid = ?1"))?.query_row([uuid], brief_row).optional()
}

pub(super) fn show(conn: &rusqlite::Connection, uuid: &str) -> DbResult<Option<BuildRecord>> {
    let sql = format!(
        "SELECT {SUMMARY_COLUMNS}, d.id, d.system, d.features FROM builds b JOIN derivations d ON d.id = b.drv WHERE b.uuid = ?1"
    );
    let Some((id, drv_id, system, features, summary)) = conn
        .prepare(&sql)?
        .query_row([uuid], |r| {
            let features: String = r.get(12)?;
            let features = features.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            Ok((
                r.get::<_, BuildId>(0)?,
                r.get::<_, i64>(10)?,
                r.get::<_, String>(11)?,
                features,
                summary_row(conn, r)?,
            ))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let outputs = conn
        .prepare("SELECT name, path FROM derivation_outputs WHERE drv = ?1 ORDER BY name")?
        .query_map([drv_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<DbResult<_>>()?;
    let dependencies = conn
        .prepare("SELECT b.uuid FROM build_deps x JOIN builds b ON b.id = x.dep WHERE x.build = ?1 ORDER BY b.id")?
        .query_map([id], |r| r.get(0))?
        .collect::<DbResult<_>>()?;
    let substitutes = conn
        .prepare("SELECT path FROM build_substitutes WHERE build = ?1 ORDER BY path")?
        .query_map([id], |r| r.get(0))?
        .collect::<DbResult<_>>()?;
    let mut attempt_list: Vec<(i64, AttemptRow)> = conn
        .prepare(
            "SELECT id, n, machine, started_at, ended_at, status, reason FROM attempts WHERE build = ?1 ORDER BY n",
        )?
        .query_map([id], |r| {
            Ok((
                r.get(0)?,
                AttemptRow {
                    n: r.get(1)?,
                    machine: r.get(2)?,
                    started_ms: r.get(3)?,
                    ended_ms: r.get(4)?,
                    status: status_column(r, 5)?,
                    reason: r.get(6)?,
                    outputs: Vec::new(),
                },
            ))
        })?
        .collect::<DbResult<_>>()?;
    let mut outs = conn.prepare(
        "SELECT name, path, nar_hash, nar_size, refs, signature FROM attempt_outputs WHERE attempt = ?1 ORDER BY name",
    )?;
    for (aid, a) in &mut attempt_list {
        a.outputs = outs
            .query_map([*aid], |r| {
                let refs: String = r.get(4)?;
                Ok(OutputRow {
                    name: r.get(0)?,
                    path: r.get(1)?,
                    nar_hash: r.get(2)?,
                    nar_size: r.get::<_, i64>(3)?.try_into().unwrap_or(0),
                    references: refs.lines().map(str::to_owned).collect(),
                    signature: r.get(5)?,
                })
            })?
            .collect::<DbResult<_>>()?;
    }
    Ok(Some(BuildRecord {
        build: summary,
        system,
        features,
        outputs,
        dependencies,
        substitutes,
        attempts: attempt_list.into_iter().map(|(_, a)| a).collect(),
    }))
}
