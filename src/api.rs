//! The client protocol: what `gbc submit`, `watch`, `builds`... say to the coordinator over its Unix
//! socket. One tagged enum each way, versioned; specified for people in docs/client-protocol.md.
//!
//! Framing: one JSON object per line. The coordinator speaks first (`hello`), then answers each
//! request with one reply, except `watch` and `log`, which stream until `end`. Log bytes travel raw:
//! a `log` reply line carries `"bytes": N` and exactly N bytes follow its newline.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; a client refuses a coordinator that speaks another version.
pub const CLIENT_PROTOCOL_VERSION: u32 = 2;
/// Longest request line the coordinator reads (a submission of 10,000 derivations is ~10 MB).
pub const MAX_REQUEST: usize = 256 << 20;

/// Build states. `queued` includes builds waiting for their dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl BuildState {
    pub const ALL: [BuildState; 5] =
        [BuildState::Queued, BuildState::Running, BuildState::Succeeded, BuildState::Failed, BuildState::Canceled];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<BuildState> {
        BuildState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, BuildState::Succeeded | BuildState::Failed | BuildState::Canceled)
    }
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an attempt ended: the `status` of an attempt in the client protocol and in the database
/// (whose CHECK lists the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    /// The outputs were checked and published.
    Success,
    /// The builder failed (final).
    BuildFailure,
    /// The build ran longer than its timeout (final).
    TimedOut,
    /// The build printed nothing for longer than its max-silent time (final).
    SilentTooLong,
    /// The machine could not set the build up (tried again).
    SetupFailure,
    /// The build was killed by something outside it, or its store ran out of space (tried again).
    TransientFailure,
    /// The machine lacked inputs (the build waits for builds that make them, or fails).
    MissingInputs,
    /// An output refers to a path the cache does not have (final).
    MissingReference,
    /// What the machine sent back failed a check: signature, hash, references (tried again).
    Rejected,
    /// The coordinator could not store what the machine sent (tried again).
    StoreFailure,
    /// The machine was lost or the coordinator stopped (tried again).
    Interrupted,
    Canceled,
}

impl AttemptStatus {
    pub const ALL: [AttemptStatus; 12] = [
        AttemptStatus::Success,
        AttemptStatus::BuildFailure,
        AttemptStatus::TimedOut,
        AttemptStatus::SilentTooLong,
        AttemptStatus::SetupFailure,
        AttemptStatus::TransientFailure,
        AttemptStatus::MissingInputs,
        AttemptStatus::MissingReference,
        AttemptStatus::Rejected,
        AttemptStatus::StoreFailure,
        AttemptStatus::Interrupted,
        AttemptStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Success => "success",
            AttemptStatus::BuildFailure => "build_failure",
            AttemptStatus::TimedOut => "timed_out",
            AttemptStatus::SilentTooLong => "silent_too_long",
            AttemptStatus::SetupFailure => "setup_failure",
            AttemptStatus::TransientFailure => "transient_failure",
            AttemptStatus::MissingInputs => "missing_inputs",
            AttemptStatus::MissingReference => "missing_reference",
            AttemptStatus::Rejected => "rejected",
            AttemptStatus::StoreFailure => "store_failure",
            AttemptStatus::Interrupted => "interrupted",
            AttemptStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<AttemptStatus> {
        AttemptStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for AttemptStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A derivation file as the client read it: `file` is how the user named it (for messages), `aterm`
/// its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrvFile {
    pub file: String,
    pub aterm: String,
}

/// Client → coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Queue one build per entry of `derivations`. `inputs` holds every input derivation of theirs,
    /// recursively, keyed by store path; the coordinator checks all of them. With `upload`, the
    /// coordinator first answers `wanted` and takes the client's `missing`, `add_path` and
    /// `uploaded` requests before it stores the submission and answers `submitted`.
    Submit {
        derivations: Vec<DrvFile>,
        #[serde(default)]
        inputs: BTreeMap<String, String>,
        #[serde(default)]
        priority: i64,
        #[serde(default)]
        tags: Vec<(String, String)>,
        #[serde(default)]
        ignore_if_built: bool,
        #[serde(default)]
        upload: bool,
        /// Whether inputs may come from the coordinator's substituters (default: yes).
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        substitutes: bool,
        /// Build no submitted derivation whose outputs are all available (in the cache or
        /// upstream): report it in `available` instead.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        skip_substitutable: bool,
    },
    /// Which of these store paths the binary cache lacks.
    Missing {
        paths: Vec<String>,
    },
    /// Only while uploading for a submission: exactly `nar_size` bytes of NAR follow this line.
    /// A source must be the text or source path its contents and `references` give; any other
    /// path must be an output of a derivation of the submission.
    AddPath {
        path: String,
        #[serde(default)]
        references: Vec<String>,
        nar_size: u64,
    },
    /// Only while uploading for a submission: publish what was added, then store the submission.
    Uploaded,
    /// Stream events of these builds (every build when empty) until they have all ended.
    Watch {
        #[serde(default)]
        builds: Vec<String>,
    },
    /// Recent builds, newest first.
    Builds {
        #[serde(default)]
        state: Option<BuildState>,
        #[serde(default)]
        tags: Vec<(String, String)>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Show {
        build: String,
    },
    /// A build's log (its latest attempt, or `attempt`); with `follow`, until the build ends.
    Log {
        build: String,
        #[serde(default)]
        attempt: Option<u32>,
        #[serde(default)]
        follow: bool,
        /// With `follow`: cancel the build if this client goes before it ends, unless another
        /// client following it with this flag is still there (a daemon's build hook, which the
        /// daemon kills when it no longer wants the build).
        #[serde(default)]
        cancel_if_left: bool,
    },
    Cancel {
        build: String,
    },
    Machines,
    /// Counters and timings, for benchmarks and monitoring; `reset` starts the timing samples
    /// afresh (after this reply).
    Stats {
        #[serde(default)]
        reset: bool,
    },
    /// Remove from the binary cache what no build since `keep_since_ms` needs (their outputs,
    /// the inputs of builds created since or still queued or running, and everything those refer to).
    CacheGc {
        keep_since_ms: i64,
    },
    /// The hooks, their backlogs and last errors.
    Hooks,
    /// Run again the events `hook` gave up on.
    HooksRetry {
        hook: String,
    },
    /// A path of the binary cache: its metadata, then its NAR (uncompressed); with
    /// `guix_signature`, then the coordinator's Guix signature of it as an export item.
    Nar {
        path: String,
        #[serde(default)]
        guix_signature: bool,
    },
}

/// A build as listed by `builds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildSummary {
    pub uuid: String,
    pub drv: String,
    pub state: BuildState,
    pub priority: i64,
    pub tags: Vec<(String, String)>,
    /// Unix time, milliseconds.
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
    pub attempts: u32,
    /// Why it failed or was canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One output as an attempt produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputInfo {
    pub name: String,
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub signature: String,
}

/// One try at a build, on one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptInfo {
    pub n: u32,
    pub machine: String,
    pub started_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
    /// How it ended; absent while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AttemptStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputInfo>,
}

/// Everything about one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub summary: BuildSummary,
    pub system: String,
    /// requiredSystemFeatures.
    #[serde(default)]
    pub features: Vec<String>,
    /// For a queued build no machine can take: why (the machines as they are now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for_machine: Option<String>,
    /// Output name → store path, as the derivation declares them.
    pub outputs: BTreeMap<String, String>,
    /// Builds this one waits for or waited for.
    pub dependencies: Vec<String>,
    /// Inputs a substituter had when it was submitted: taken from upstream, not built.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_substituters: Vec<String>,
    pub attempt_list: Vec<AttemptInfo>,
}

/// A submitted derivation that was not built: every output of it is available (`gbc submit
/// --skip-substitutable`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Available {
    pub drv: String,
    pub outputs: BTreeMap<String, String>,
}

/// A build that no machine can take, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoMachine {
    pub build: String,
    pub drv: String,
    pub reason: String,
}

/// A machine as `machines` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub name: String,
    /// `up`, `connecting` or `down`.
    pub state: String,
    /// Unix ms of the last change of `state`.
    pub since_ms: i64,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub parallel_builds: u32,
    pub speed: f64,
    pub running: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_space: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why an up machine takes no new builds now (its load, its free disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_back: Option<String>,
}

/// What happened to a build, as `watch` streams it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub build: String,
    pub drv: String,
    pub state: BuildState,
    /// Unix ms.
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Set on an event that puts a build back in the queue after an attempt that did not count
    /// against it (a machine lost, a setup failure).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
    /// True for events describing where a build stood when `watch` began, rather than a change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

/// What hooks are told of (docs/hooks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    BuildSubmitted,
    BuildStarted,
    BuildSucceeded,
    BuildFailed,
    BuildCanceled,
    BuildMissingInputs,
    MachineUp,
    MachineDown,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::BuildSubmitted,
        EventKind::BuildStarted,
        EventKind::BuildSucceeded,
        EventKind::BuildFailed,
        EventKind::BuildCanceled,
        EventKind::BuildMissingInputs,
        EventKind::MachineUp,
        EventKind::MachineDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BuildSubmitted => "build-submitted",
            EventKind::BuildStarted => "build-started",
            EventKind::BuildSucceeded => "build-succeeded",
            EventKind::BuildFailed => "build-failed",
            EventKind::BuildCanceled => "build-canceled",
            EventKind::BuildMissingInputs => "build-missing-inputs",
            EventKind::MachineUp => "machine-up",
            EventKind::MachineDown => "machine-down",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The version of [`HookEvent`]'s shape: a change that could break a hook reading it is a new one.
pub const HOOK_EVENT_VERSION: u32 = 1;

/// One event as a hook gets it (docs/hooks.md). The build fields are those of [`Event`] (what
/// `gbc watch --json` prints) where the two meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookEvent {
    pub version: u32,
    /// Increasing; the same event delivered twice has the same id.
    pub id: i64,
    pub event: EventKind,
    /// Unix ms.
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drv: Option<String>,
    /// The build's state after the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BuildState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The attempt's number (from 1), for events that end or start one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How the attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AttemptStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `build-failed`: the build goes back to the queue (another attempt comes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
    /// `build-succeeded`: the outputs, as published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputInfo>,
    /// `build-submitted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<(String, String)>,
    /// `machine-up`: the systems it builds for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub systems: Vec<String>,
}

impl HookEvent {
    /// An event of `kind` at `at_ms`, its id to be given when it is stored.
    pub fn new(kind: EventKind, at_ms: i64) -> HookEvent {
        HookEvent {
            version: HOOK_EVENT_VERSION,
            id: 0,
            event: kind,
            at_ms,
            build: None,
            drv: None,
            state: None,
            machine: None,
            attempt: None,
            status: None,
            reason: None,
            retry: false,
            outputs: Vec::new(),
            priority: None,
            tags: Vec::new(),
            systems: Vec::new(),
        }
    }
}

/// A hook as `gbc hooks` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookInfo {
    pub name: String,
    /// Its events (every one when empty).
    pub events: Vec<EventKind>,
    /// Events waiting for it (running or backing off included, given up excluded).
    pub backlog: u64,
    pub running: u64,
    /// Events it gave up on (`gbc hooks retry` runs them again).
    pub given_up: u64,
    /// Since the coordinator started.
    pub runs: u64,
    pub failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// False for a hook the configuration no longer has, with events still stored for it.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub configured: bool,
}

/// Coordinator counters and timings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub queued: u64,
    pub running: u64,
    pub allocations: u64,
    pub retries: u64,
    /// NAR bytes of the outputs accepted.
    #[serde(default)]
    pub bytes_received: u64,
    /// NAR bytes of inputs sent from the cache to build hosts.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Allocation time per build over the last allocations (choosing it and recording the attempt),
    /// microseconds.
    pub alloc_p50_us: u64,
    pub alloc_p99_us: u64,
    pub alloc_samples: u64,
}

/// What a cache GC did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub kept_narinfos: u64,
    pub removed_narinfos: u64,
    pub removed_nars: u64,
    pub freed_bytes: u64,
}

/// Coordinator → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Hello {
        protocol: u32,
        gbc_version: String,
    },
    /// Answer to a `submit` with `upload`: the paths its derivations use that the cache lacks.
    Wanted {
        paths: Vec<String>,
    },
    Missing {
        paths: Vec<String>,
    },
    /// The NAR of an `add_path` arrived and is ready to publish.
    Added {
        path: String,
    },
    /// `builds`: one UUID per submitted derivation, in order; `dependencies`: builds queued for
    /// input derivations that had none.
    Submitted {
        builds: Vec<String>,
        dependencies: Vec<String>,
        /// New builds no machine can take now: they wait until the machines change.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        no_machine: Vec<NoMachine>,
        /// Input paths that will come from substituters instead of being built.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        substitutable: Vec<String>,
        /// With `skip_substitutable`: the submitted derivations not built (`builds` has the others).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        available: Vec<Available>,
    },
    Event {
        #[serde(flatten)]
        event: Event,
    },
    Builds {
        builds: Vec<BuildSummary>,
    },
    Build {
        build: Box<BuildDetail>,
    },
    /// Exactly `bytes` raw log bytes follow this line.
    Log {
        bytes: u64,
    },
    /// Answer to `nar`: exactly `nar_size` bytes of NAR follow this line.
    Nar {
        path: String,
        nar_hash: String,
        nar_size: u64,
        /// Full store paths.
        references: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deriver: Option<String>,
    },
    /// After a `nar` asked with `guix_signature`: the signature (an s-expression's text) of the
    /// export item made of the NAR and then the magic, path, references and deriver (`""` if
    /// none) the `nar` reply named, by the coordinator's Guix key.
    ExportSignature {
        signature: String,
    },
    Canceled {
        build: String,
    },
    Machines {
        machines: Vec<MachineInfo>,
    },
    Stats {
        stats: Stats,
    },
    CacheGc {
        gc: GcReport,
    },
    Hooks {
        hooks: Vec<HookInfo>,
    },
    /// `hooks_retry`: how many given-up events go again.
    HooksRetried {
        hook: String,
        events: u64,
    },
    /// End of a `watch` or `log` stream.
    End,
    Error {
        message: String,
    },
}

/// Current time as Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_refuse_unknown_fields() {
        let r = Request::Submit {
            derivations: vec![DrvFile { file: "a.drv".into(), aterm: "Derive(...)".into() }],
            inputs: BTreeMap::new(),
            priority: 3,
            tags: vec![("k".into(), "v".into())],
            ignore_if_built: true,
            upload: false,
            substitutes: false,
            skip_substitutable: true,
        };
        let line = serde_json::to_string(&r).unwrap_or_default();
        assert!(line.starts_with(r#"{"type":"submit""#), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).ok(), Some(r));
        assert!(serde_json::from_str::<Request>(r#"{"type":"cancel","build":"x","extra":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"machines"}"#).is_ok());
        assert_eq!(serde_json::from_str::<Request>(r#"{"type":"stats"}"#).ok(), Some(Request::Stats { reset: false }));
    }

    #[test]
    fn states_parse_their_own_names() {
        for s in BuildState::ALL {
            assert_eq!(BuildState::parse(s.as_str()), Some(s));
        }
        assert_eq!(BuildState::parse("done"), None);
    }
}
