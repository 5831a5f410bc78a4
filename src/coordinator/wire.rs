//! The database's records as the client protocol shows them: the one place both meet.

use crate::api::{AttemptInfo, BuildDetail, BuildSummary, OutputInfo};
use crate::db::{AttemptRow, BuildRecord, BuildRow, OutputRow};

pub(super) fn summary(b: BuildRow) -> BuildSummary {
    BuildSummary {
        uuid: b.uuid,
        drv: b.drv,
        state: b.state,
        priority: b.priority,
        tags: b.tags,
        created_ms: b.created_ms,
        started_ms: b.started_ms,
        ended_ms: b.ended_ms,
        attempts: b.attempts,
        reason: b.reason,
    }
}

/// A build's details; `waiting_for_machine` is the core's to say.
pub(super) fn detail(r: BuildRecord) -> BuildDetail {
    BuildDetail {
        summary: summary(r.build),
        system: r.system,
        features: r.features,
        waiting_for_machine: None,
        outputs: r.outputs,
        dependencies: r.dependencies,
        from_substituters: r.substitutes,
        attempt_list: r.attempts.into_iter().map(attempt).collect(),
    }
}

fn attempt(a: AttemptRow) -> AttemptInfo {
    AttemptInfo {
        n: a.n,
        machine: a.machine,
        started_ms: a.started_ms,
        ended_ms: a.ended_ms,
        status: a.status,
        reason: a.reason,
        outputs: a.outputs.into_iter().map(output).collect(),
    }
}

fn output(o: OutputRow) -> OutputInfo {
    OutputInfo {
        name: o.name,
        path: o.path,
        nar_hash: o.nar_hash,
        nar_size: o.nar_size,
        references: o.references,
        signature: o.signature,
    }
}

/// An output as the database records it.
pub(super) fn output_row(o: OutputInfo) -> OutputRow {
    OutputRow {
        name: o.name,
        path: o.path,
        nar_hash: o.nar_hash,
        nar_size: o.nar_size,
        references: o.references,
        signature: o.signature,
    }
}
