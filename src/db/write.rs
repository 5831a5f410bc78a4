//! The transactions that change the queue: a submission, attempt ends.

use std::collections::{BTreeSet, HashMap};

use rusqlite::{OptionalExtension as _, Transaction, params};
use uuid::Uuid;

use super::{
    AttemptEnd, BuildChange, BuildId, DbResult, NewDerivation, QueuedBuild, Submission, SubmitOutcome, join_lines,
};

/// A submission that contradicts itself (a checked one never does): refused, nothing stored.
fn inconsistent(what: String) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(what.into())
}

pub(super) fn submit(tx: &Transaction<'_>, sub: &Submission) -> DbResult<SubmitOutcome> {
    // Store each derivation once.
    let mut drv_ids: HashMap<&str, i64> = HashMap::with_capacity(sub.derivations.len());
    {
        let mut find = tx.prepare_cached("SELECT id FROM derivations WHERE path = ?1")?;
        let mut ins = tx.prepare_cached(
            "INSERT INTO derivations (path, system, features, aterm, inputs) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut ins_out = tx.prepare_cached("INSERT INTO derivation_outputs (drv, name, path) VALUES (?1, ?2, ?3)")?;
        let mut ins_in = tx.prepare_cached("INSERT OR IGNORE INTO derivation_inputs (drv, input) VALUES (?1, ?2)")?;
        for d in &sub.derivations {
            if let Some(id) = find.query_row([&d.path], |r| r.get::<_, i64>(0)).optional()? {
                drv_ids.insert(&d.path, id);
                continue;
            }
            let features = d.features.iter().cloned().collect::<Vec<_>>().join(" ");
            ins.execute(params![d.path, d.system, features, d.aterm, join_lines(&d.inputs)])?;
            let id = tx.last_insert_rowid();
            drv_ids.insert(&d.path, id);
            for (name, path) in &d.outputs {
                ins_out.execute(params![id, name, path])?;
            }
            for input in &d.input_drvs {
                if let Some(&input_id) = drv_ids.get(input.as_str()) {
                    ins_in.execute(params![id, input_id])?;
                }
            }
        }
    }

    let mut out = SubmitOutcome::default();
    // The build each derivation's dependents wait for: Some(active build) or None (succeeded).
    let mut resolved: HashMap<&str, Option<BuildId>> = HashMap::new();
    let requested: BTreeSet<&str> = sub.requested.iter().map(String::as_str).collect();
    let mut requested_ids: HashMap<&str, String> = HashMap::new();
    let mut existing = tx.prepare_cached(
        "SELECT id, state FROM builds WHERE drv = ?1 AND (state IN ('queued', 'running') OR (?2 AND state = 'succeeded'))
         ORDER BY state = 'succeeded', id DESC LIMIT 1",
    )?;
    // A build that made, or is making, the same outputs: a succeeded one first, else the newest
    // queued or running one.
    let mut same_outputs = tx.prepare_cached(
        "SELECT b.id, b.uuid, b.state FROM builds b JOIN derivation_outputs o ON o.drv = b.drv
         WHERE o.path = ?1 AND b.state IN ('succeeded', 'queued', 'running')
         ORDER BY b.state = 'succeeded' DESC, b.id DESC LIMIT 1",
    )?;
    for d in &sub.derivations {
        let Some(&drv_id) = drv_ids.get(d.path.as_str()) else {
            return Err(inconsistent(format!("derivation {} was not stored", d.path)));
        };
        let is_requested = requested.contains(d.path.as_str());
        if is_requested
            && sub.ignore_if_built
            && let Some(first_output) = d.outputs.values().next()
            && let Some((id, uuid, state)) = same_outputs
                .query_row([first_output], |r| {
                    Ok((r.get::<_, BuildId>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .optional()?
        {
            requested_ids.insert(&d.path, uuid);
            // What else this submission builds on it waits for it unless it is done.
            resolved.insert(&d.path, (state != "succeeded").then_some(id));
            continue;
        }
        if !is_requested && !sub.needed.contains(&d.path) {
            resolved.insert(&d.path, None);
            continue;
        }
        let succeeded_counts = sub.unpublished.contains(&d.path);
        if !is_requested
            && let Some((id, state)) = existing
                .query_row(params![drv_id, succeeded_counts], |r| Ok((r.get::<_, BuildId>(0)?, r.get::<_, String>(1)?)))
                .optional()?
        {
            resolved.insert(&d.path, (state != "succeeded").then_some(id));
            continue;
        }
        let deps: Vec<BuildId> =
            d.input_drvs.iter().filter_map(|p| resolved.get(p.as_str()).copied().flatten()).collect();
        let created = new_build(tx, drv_id, d, &deps, sub, is_requested)?;
        if is_requested {
            requested_ids.insert(&d.path, created.uuid.clone());
        } else {
            out.dependencies.push(created.uuid.clone());
        }
        resolved.insert(&d.path, Some(created.id));
        out.created.push(created);
    }
    out.requested = sub
        .requested
        .iter()
        .map(|p| {
            requested_ids
                .get(p.as_str())
                .cloned()
                .ok_or_else(|| inconsistent(format!("{p} was requested but not among the derivations")))
        })
        .collect::<DbResult<_>>()?;
    Ok(out)
}

pub(super) fn new_build(
    tx: &Transaction<'_>,
    drv_id: i64,
    d: &NewDerivation,
    deps: &[BuildId],
    sub: &Submission,
    tagged: bool,
) -> DbResult<QueuedBuild> {
    let (id, uuid) = insert_build(tx, drv_id, sub.priority, sub.now)?;
    if tagged {
        let mut ins = tx.prepare_cached("INSERT OR IGNORE INTO build_tags (build, key, value) VALUES (?1, ?2, ?3)")?;
        for (k, v) in &sub.tags {
            ins.execute(params![id, k, v])?;
        }
    }
    let mut ins = tx.prepare_cached("INSERT OR IGNORE INTO build_deps (build, dep) VALUES (?1, ?2)")?;
    for dep in deps {
        ins.execute(params![id, dep])?;
    }
    let mut ins = tx.prepare_cached("INSERT OR IGNORE INTO build_substitutes (build, path) VALUES (?1, ?2)")?;
    for path in d.inputs.iter().filter(|p| sub.substitutable.contains(*p)) {
        ins.execute(params![id, path])?;
    }
    Ok(QueuedBuild {
        id,
        uuid,
        drv: d.path.clone(),
        priority: sub.priority,
        system: d.system.clone(),
        features: d.features.clone(),
        deps: deps.to_vec(),
        retries: 0,
        failures: 0,
    })
}

/// A new queued build of a stored derivation: its id and UUID.
pub(super) fn insert_build(tx: &Transaction<'_>, drv_id: i64, priority: i64, now: i64) -> DbResult<(BuildId, String)> {
    let uuid = Uuid::new_v4().to_string();
    tx.prepare_cached("INSERT INTO builds (uuid, drv, priority, state, created_at) VALUES (?1, ?2, ?3, 'queued', ?4)")?
        .execute(params![uuid, drv_id, priority, now])?;
    Ok((tx.last_insert_rowid(), uuid))
}

/// Fail these queued builds; returns those that were queued (now failed), with their reasons.
pub(super) fn fail_all<'a>(
    tx: &Transaction<'_>,
    builds: &'a [(BuildId, String)],
    now: i64,
) -> DbResult<Vec<&'a (BuildId, String)>> {
    let mut upd = tx.prepare_cached(
        "UPDATE builds SET state = 'failed', reason = ?2, ended_at = ?3 WHERE id = ?1 AND state = 'queued'",
    )?;
    let mut failed = Vec::new();
    for b @ (id, reason) in builds {
        if upd.execute(params![id, reason, now])? == 1 {
            failed.push(b);
        }
    }
    Ok(failed)
}

/// Record an attempt's end and what it does to its build; returns whether the build changed (it
/// had not ended meanwhile) and the dependents that failed with it.
pub(super) fn end_attempt<'a>(
    tx: &Transaction<'_>,
    end: &'a AttemptEnd,
) -> DbResult<(bool, Vec<&'a (BuildId, String)>)> {
    tx.prepare_cached(
        "UPDATE attempts SET ended_at = ?2, status = ?3, reason = ?4 WHERE id = ?1 AND ended_at IS NULL",
    )?
    .execute(params![end.attempt, end.now, end.status.as_str(), end.reason])?;
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO attempt_outputs (attempt, name, path, nar_hash, nar_size, refs, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for o in &end.outputs {
        ins.execute(params![
            end.attempt,
            o.name,
            o.path,
            o.nar_hash,
            i64::try_from(o.nar_size).unwrap_or(i64::MAX),
            join_lines(&o.references),
            o.signature
        ])?;
    }
    let changed = match &end.change {
        BuildChange::Succeed => tx
            .prepare_cached(
                "UPDATE builds SET state = 'succeeded', reason = NULL, ended_at = ?2 WHERE id = ?1 AND state = 'running'",
            )?
            .execute(params![end.build, end.now])?,
        BuildChange::Fail { reason, cascade } => {
            let n = tx
                .prepare_cached(
                    "UPDATE builds SET state = 'failed', reason = ?2, ended_at = ?3 WHERE id = ?1 AND state = 'running'",
                )?
                .execute(params![end.build, reason, end.now])?;
            return Ok((n == 1, fail_all(tx, cascade, end.now)?));
        }
        BuildChange::Requeue { count_retry } => tx
            .prepare_cached(
                "UPDATE builds SET state = 'queued', retries = retries + ?2 WHERE id = ?1 AND state = 'running'",
            )?
            .execute(params![end.build, i64::from(*count_retry)])?,
        BuildChange::Nothing => 0,
    };
    Ok((changed == 1, Vec::new()))
}
