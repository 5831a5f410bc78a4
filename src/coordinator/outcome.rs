//! What an attempt's end means for its build and the builds that depend on it: pure functions over
//! the in-memory queue and the table of active builds. The core records what they decide in one
//! transaction per batch and then tells the watchers.

use std::collections::HashMap;

use super::machine::AttemptResult;
use super::queue::{BuildId, Queue};
use crate::api::{AttemptStatus, BuildState, OutputInfo};
use crate::db::BuildChange;

/// Identity of an active (queued or running) build, for events and messages.
#[derive(Debug, Clone)]
pub(super) struct Known {
    pub uuid: Box<str>,
    pub drv: Box<str>,
    /// Attempts so far that counted towards `max_attempts`.
    pub retries: u32,
    /// Attempts so far whose builder failed (towards `--retry-failed`).
    pub failures: u32,
}

/// A change of a build's state, to be told to watchers once recorded.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Change {
    pub build: BuildId,
    pub state: BuildState,
    pub reason: Option<String>,
    /// The build goes back to the queue after an attempt that could not run.
    pub retry: bool,
}

/// What an attempt's end decides.
#[derive(Debug)]
pub(super) struct Outcome {
    pub status: AttemptStatus,
    pub reason: Option<String>,
    pub outputs: Vec<OutputInfo>,
    pub change: BuildChange,
    /// The attempt's build first, then the dependents a failure takes with it.
    pub changes: Vec<Change>,
    /// The build goes back to the queue (a retry, in the statistics).
    pub requeued: bool,
    /// It is held out of allocation until released: its builder failed this many times so far.
    pub held: Option<u32>,
}

/// Decide what `result` means for `build`, whose attempt ran on `machine`: update the queue (and
/// the build's retry count in `known`) and say what to record. A canceled build's attempt is only
/// recorded: the cancel already decided the build.
/// How many times builds are tried.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    /// Attempts that fail to set up or lose their machine, before the build fails.
    pub max_attempts: u32,
    /// Tries again after the builder failed (`--retry-failed`).
    pub retry_failed: u32,
}

pub(super) fn decide(
    queue: &mut Queue,
    known: &mut HashMap<BuildId, Known>,
    policy: Policy,
    machine: &str,
    build: BuildId,
    canceled: bool,
    result: AttemptResult,
) -> Outcome {
    let Policy { max_attempts, retry_failed } = policy;
    let outcome = |status, reason: Option<String>, change, changes, requeued| Outcome {
        status,
        reason,
        outputs: Vec::new(),
        change,
        changes,
        requeued,
        held: None,
    };
    if canceled {
        let (status, reason) = describe(&result);
        return outcome(status, reason, BuildChange::Nothing, Vec::new(), false);
    }
    let requeue = |queue: &mut Queue, status, reason: String, count_retry| {
        queue.requeue(build, Some(machine));
        let changes = vec![Change { build, state: BuildState::Queued, reason: Some(reason.clone()), retry: true }];
        outcome(status, Some(reason), BuildChange::Requeue { count_retry }, changes, true)
    };
    match result {
        AttemptResult::Success { outputs } => {
            queue.succeeded(build);
            let changes = vec![Change { build, state: BuildState::Succeeded, reason: None, retry: false }];
            Outcome { outputs, ..outcome(AttemptStatus::Success, None, BuildChange::Succeed, changes, false) }
        }
        AttemptResult::Failed { status, reason }
            if matches!(
                status,
                AttemptStatus::BuildFailure | AttemptStatus::TimedOut | AttemptStatus::SilentTooLong
            ) && known.get(&build).is_some_and(|k| k.failures < retry_failed) =>
        {
            let failures = known.get_mut(&build).map_or(1, |k| {
                k.failures += 1;
                k.failures
            });
            queue.requeue_held(build, Some(machine));
            let why = format!("{reason}; tried again (--retry-failed: {failures} of {retry_failed})");
            let changes = vec![Change { build, state: BuildState::Queued, reason: Some(why), retry: true }];
            let o = outcome(status, Some(reason), BuildChange::Requeue { count_retry: false }, changes, true);
            Outcome { held: Some(failures), ..o }
        }
        AttemptResult::Failed { status, reason } => {
            let (change, changes) = fail(queue, known, build, &reason);
            outcome(status, Some(reason), change, changes, false)
        }
        AttemptResult::Canceled => {
            let reason = "canceled by the agent".to_owned();
            let (change, changes) = fail(queue, known, build, &reason);
            outcome(AttemptStatus::Canceled, Some(reason), change, changes, false)
        }
        AttemptResult::WaitFor { deps, reason } => {
            queue.requeue_after(build, &deps);
            let changes = vec![Change { build, state: BuildState::Queued, reason: Some(reason.clone()), retry: true }];
            outcome(
                AttemptStatus::MissingInputs,
                Some(reason),
                BuildChange::Requeue { count_retry: false },
                changes,
                true,
            )
        }
        // Both are resolved by the core before they get here; one out of turn goes back to the
        // queue without counting.
        AttemptResult::StoreDirRefused { store_dir } => {
            let reason = format!("machine {machine} does not accept the store dir {store_dir}");
            requeue(queue, AttemptStatus::SetupFailure, reason, false)
        }
        AttemptResult::MissingInputs { paths } => {
            requeue(queue, AttemptStatus::MissingInputs, missing_reason(&paths), false)
        }
        AttemptResult::Retry { status, reason, count } => {
            let retries = known.get(&build).map_or(0, |k| k.retries) + u32::from(count);
            if retries >= max_attempts {
                let why = format!("gave up after {retries} attempts; the last: {reason}");
                let (change, changes) = fail(queue, known, build, &why);
                outcome(status, Some(reason), change, changes, false)
            } else {
                if let Some(k) = known.get_mut(&build) {
                    k.retries = retries;
                }
                requeue(queue, status, reason, count)
            }
        }
    }
}

/// Take a build out of the queue as failed, with its dependents.
fn fail(
    queue: &mut Queue,
    known: &HashMap<BuildId, Known>,
    build: BuildId,
    reason: &str,
) -> (BuildChange, Vec<Change>) {
    let mut changes = vec![Change { build, state: BuildState::Failed, reason: Some(reason.to_owned()), retry: false }];
    let cascade = cascade(queue, known, build, &mut changes);
    (BuildChange::Fail { reason: reason.to_owned(), cascade }, changes)
}

/// The queued builds that can't run now that `build` won't succeed: each fails, naming the
/// dependency that took it down.
pub(super) fn cascade(
    queue: &mut Queue,
    known: &HashMap<BuildId, Known>,
    build: BuildId,
    changes: &mut Vec<Change>,
) -> Vec<(BuildId, String)> {
    let mut out = Vec::new();
    for (dependent, cause) in queue.failed(build) {
        let why = match known.get(&cause) {
            Some(k) => format!("dependency {} ({}) did not succeed", k.uuid, k.drv),
            None => format!("dependency #{cause} did not succeed"),
        };
        changes.push(Change { build: dependent, state: BuildState::Failed, reason: Some(why.clone()), retry: false });
        out.push((dependent, why));
    }
    out
}

/// Status and reason of an attempt's result, for the record.
pub(super) fn describe(result: &AttemptResult) -> (AttemptStatus, Option<String>) {
    match result {
        AttemptResult::Success { .. } => (AttemptStatus::Success, None),
        AttemptResult::Failed { status, reason } | AttemptResult::Retry { status, reason, .. } => {
            (*status, Some(reason.clone()))
        }
        AttemptResult::Canceled => (AttemptStatus::Canceled, Some("canceled".into())),
        AttemptResult::MissingInputs { paths } => (AttemptStatus::MissingInputs, Some(missing_reason(paths))),
        AttemptResult::WaitFor { reason, .. } => (AttemptStatus::MissingInputs, Some(reason.clone())),
        AttemptResult::StoreDirRefused { store_dir } => {
            (AttemptStatus::SetupFailure, Some(format!("the machine does not accept the store dir {store_dir}")))
        }
    }
}

pub(super) fn missing_reason(paths: &[String]) -> String {
    format!("missing inputs: {}", paths.join(" "))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::coordinator::queue::{Capabilities, Slot};

    /// A queue of `base` ← `mid` ← `top` (each needs the one before), plus `other`, with `base`
    /// running on machine m.
    fn graph() -> (Queue, HashMap<BuildId, Known>) {
        let mut q = Queue::new();
        let none = BTreeSet::new();
        q.insert(1, 0, "x86_64-linux", &none, &[]);
        q.insert(2, 0, "x86_64-linux", &none, &[1]);
        q.insert(3, 0, "x86_64-linux", &none, &[2]);
        q.insert(4, 0, "x86_64-linux", &none, &[]);
        let caps = Capabilities { systems: vec!["x86_64-linux".into()], features: vec![], mandatory_features: vec![] };
        let slot = Slot { name: "m", caps: &caps, running: 0, parallel: 1, speed: 1.0 };
        assert_eq!(q.pick(&[slot]).map(|p| p.build), Some(1));
        let known = (1..=4)
            .map(|id| {
                (
                    id,
                    Known {
                        uuid: format!("u{id}").into(),
                        drv: format!("/nix/store/d{id}.drv").into(),
                        retries: 0,
                        failures: 0,
                    },
                )
            })
            .collect();
        (q, known)
    }

    fn ready(q: &mut Queue) -> BTreeSet<BuildId> {
        let caps = Capabilities { systems: vec!["x86_64-linux".into()], features: vec![], mandatory_features: vec![] };
        let mut out = BTreeSet::new();
        loop {
            let slot = Slot { name: "n", caps: &caps, running: 0, parallel: 1, speed: 1.0 };
            match q.pick(&[slot]) {
                Some(p) => out.insert(p.build),
                None => return out,
            };
        }
    }

    fn p(max_attempts: u32, retry_failed: u32) -> Policy {
        Policy { max_attempts, retry_failed }
    }

    fn states(o: &Outcome) -> Vec<(BuildId, BuildState)> {
        o.changes.iter().map(|c| (c.build, c.state)).collect()
    }

    fn retry(status: AttemptStatus, count: bool) -> AttemptResult {
        AttemptResult::Retry { status, reason: "it broke".into(), count }
    }

    #[test]
    fn success_frees_the_dependents() {
        let (mut q, mut known) = graph();
        let out = OutputInfo {
            name: "out".into(),
            path: "/nix/store/o".into(),
            nar_hash: "sha256:0".into(),
            nar_size: 1,
            references: vec![],
            signature: "k:s".into(),
        };
        let o =
            decide(&mut q, &mut known, p(3, 0), "m", 1, false, AttemptResult::Success { outputs: vec![out.clone()] });
        assert_eq!((o.status, &o.outputs, &o.change), (AttemptStatus::Success, &vec![out], &BuildChange::Succeed));
        assert_eq!(states(&o), [(1, BuildState::Succeeded)]);
        assert_eq!(ready(&mut q), BTreeSet::from([2, 4]), "mid is ready now, top still waits for it");
    }

    #[test]
    fn a_build_failure_fails_its_dependents_and_names_the_cause() {
        let (mut q, mut known) = graph();
        let failed = AttemptResult::Failed { status: AttemptStatus::BuildFailure, reason: "exit 1".into() };
        let o = decide(&mut q, &mut known, p(3, 0), "m", 1, false, failed);
        assert_eq!(o.status, AttemptStatus::BuildFailure);
        assert_eq!(states(&o), [(1, BuildState::Failed), (2, BuildState::Failed), (3, BuildState::Failed)]);
        let BuildChange::Fail { reason, cascade } = &o.change else { unreachable!("{:?}", o.change) };
        assert_eq!(reason, "exit 1");
        assert_eq!(
            cascade,
            &[
                (2, "dependency u1 (/nix/store/d1.drv) did not succeed".to_owned()),
                (3, "dependency u2 (/nix/store/d2.drv) did not succeed".to_owned())
            ]
        );
        assert!(!o.requeued);
        assert_eq!(ready(&mut q), BTreeSet::from([4]));
    }

    #[test]
    fn with_retry_failed_a_build_failure_is_held_then_tried_again_until_they_run_out() {
        let (mut q, mut known) = graph();
        let failed = || AttemptResult::Failed { status: AttemptStatus::BuildFailure, reason: "exit 1".into() };
        let o = decide(&mut q, &mut known, p(3, 1), "m", 1, false, failed());
        assert_eq!((o.held, &o.change), (Some(1), &BuildChange::Requeue { count_retry: false }));
        assert_eq!(states(&o), [(1, BuildState::Queued)], "its dependents wait on");
        assert_eq!(ready(&mut q), BTreeSet::from([4]), "held: 1 is not allocated");
        q.release(1);
        assert_eq!(ready(&mut q), BTreeSet::from([1]), "released: allocated again");
        let o = decide(&mut q, &mut known, p(3, 1), "m", 1, false, failed());
        assert_eq!(o.held, None);
        assert_eq!(states(&o), [(1, BuildState::Failed), (2, BuildState::Failed), (3, BuildState::Failed)]);
        // A refused output is not the builder's failure: not tried again.
        let (mut q, mut known) = graph();
        let refused = AttemptResult::Failed { status: AttemptStatus::MissingReference, reason: "no".into() };
        assert_eq!(decide(&mut q, &mut known, p(3, 5), "m", 1, false, refused).held, None);
    }

    #[test]
    fn a_setup_failure_goes_back_to_the_queue_avoiding_the_machine_until_attempts_run_out() {
        let (mut q, mut known) = graph();
        let o = decide(&mut q, &mut known, p(2, 0), "m", 1, false, retry(AttemptStatus::SetupFailure, true));
        assert_eq!((o.status, &o.change), (AttemptStatus::SetupFailure, &BuildChange::Requeue { count_retry: true }));
        assert_eq!(
            o.changes,
            [Change { build: 1, state: BuildState::Queued, reason: Some("it broke".into()), retry: true }]
        );
        assert!(o.requeued);
        assert_eq!(known[&1].retries, 1);
        // Picked again (by another machine), it fails once more: the second of two attempts.
        assert!(ready(&mut q).contains(&1));
        let o = decide(&mut q, &mut known, p(2, 0), "n", 1, false, retry(AttemptStatus::SetupFailure, true));
        let BuildChange::Fail { reason, cascade } = &o.change else { unreachable!("{:?}", o.change) };
        assert_eq!(reason, "gave up after 2 attempts; the last: it broke");
        assert_eq!(cascade.len(), 2);
        assert_eq!(o.status, AttemptStatus::SetupFailure);
    }

    #[test]
    fn a_lost_machine_counts_but_a_build_that_never_started_does_not() {
        let (mut q, mut known) = graph();
        let o = decide(&mut q, &mut known, p(1, 0), "m", 1, false, retry(AttemptStatus::Interrupted, false));
        assert_eq!(o.change, BuildChange::Requeue { count_retry: false });
        assert_eq!(known[&1].retries, 0);
        assert!(ready(&mut q).contains(&1));
        let o = decide(&mut q, &mut known, p(1, 0), "m", 1, false, retry(AttemptStatus::Interrupted, true));
        assert!(matches!(o.change, BuildChange::Fail { .. }), "{:?}", o.change);
    }

    #[test]
    fn missing_inputs_wait_for_the_builds_that_make_them() {
        let (mut q, mut known) = graph();
        q.insert(5, 0, "x86_64-linux", &BTreeSet::new(), &[]);
        let wait =
            AttemptResult::WaitFor { deps: vec![5], reason: "waiting for builds of its missing inputs: p".into() };
        let o = decide(&mut q, &mut known, p(1, 0), "m", 1, false, wait);
        assert_eq!((o.status, &o.change), (AttemptStatus::MissingInputs, &BuildChange::Requeue { count_retry: false }));
        assert_eq!(states(&o), [(1, BuildState::Queued)]);
        assert_eq!(ready(&mut q), BTreeSet::from([4, 5]), "base waits for build 5 now");
        let o = decide(&mut q, &mut known, p(1, 0), "m", 5, false, AttemptResult::Success { outputs: vec![] });
        assert_eq!(o.status, AttemptStatus::Success);
        assert_eq!(ready(&mut q), BTreeSet::from([1]));
    }

    #[test]
    fn a_canceled_build_s_attempt_is_only_recorded() {
        let (mut q, mut known) = graph();
        let o = decide(&mut q, &mut known, p(3, 0), "m", 1, true, AttemptResult::Success { outputs: vec![] });
        assert_eq!((o.status, &o.change, o.changes.len()), (AttemptStatus::Success, &BuildChange::Nothing, 0));
        let o = decide(&mut q, &mut known, p(3, 0), "m", 1, true, AttemptResult::Canceled);
        assert_eq!((o.status, o.reason.as_deref()), (AttemptStatus::Canceled, Some("canceled")));
    }

    #[test]
    fn the_agent_canceling_a_build_fails_it() {
        let (mut q, mut known) = graph();
        let o = decide(&mut q, &mut known, p(3, 0), "m", 1, false, AttemptResult::Canceled);
        assert_eq!(o.status, AttemptStatus::Canceled);
        assert_eq!(states(&o)[0], (1, BuildState::Failed));
        assert_eq!(o.changes.len(), 3);
    }
}
