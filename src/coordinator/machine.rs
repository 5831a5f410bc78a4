//! Machine drivers: one task per machine keeps a session with its `gbc agent` open, sends it the
//! jobs the core assigns, writes their logs, checks what comes back (output paths, signatures, NAR
//! hashes) and reports each attempt's end to the core. The transport only has to carry frames:
//! the built-in local machine runs the agent as a child process; SSH machines will run it over an
//! exec channel.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::logs;
use super::queue::BuildId;
use crate::api::OutputInfo;
use crate::db::Job;
use crate::formats::derivation::Derivation;
use crate::formats::hash::HashSink;
use crate::formats::narinfo;
use crate::formats::signing::{PublicKey, Signature};
use crate::protocol::{
    BuildStatus, BuiltOutput, Frame, FrameReader, HostFacts, Message, PROTOCOL_VERSION, PathMeta, write_frame,
};

/// Core → driver.
#[derive(Debug)]
pub enum DriverCmd {
    Assign(Box<Job>),
    Cancel(BuildId),
}

/// How an attempt ended, as the driver saw it.
#[derive(Debug, Clone)]
pub enum AttemptResult {
    Success {
        outputs: Vec<OutputInfo>,
    },
    /// The build itself failed: final.
    Failed {
        status: String,
        reason: String,
    },
    /// The machine could not run it (setup failure, missing inputs, a rejected result, the machine
    /// lost): try again, elsewhere if possible. `count` is false when it never started.
    Retry {
        status: String,
        reason: String,
        count: bool,
    },
    Canceled,
}

/// Driver → core.
#[derive(Debug)]
pub enum DriverEvent {
    Up { machine: usize, facts: HostFacts },
    Down { machine: usize, error: String },
    Done { machine: usize, build: BuildId, attempt: i64, result: AttemptResult },
}

/// How to reach a machine's agent.
#[derive(Debug, Clone)]
pub enum Transport {
    /// `program agent ARGS...` as a child process.
    Local { program: PathBuf, args: Vec<String> },
}

/// Frames to and from one agent session.
struct Session {
    tx: mpsc::Sender<Frame>,
    rx: mpsc::Receiver<Result<Frame, String>>,
}

impl Transport {
    fn connect(&self, name: &str) -> anyhow::Result<Session> {
        match self {
            Transport::Local { program, args } => spawn_local(name, program, args),
        }
    }
}

fn spawn_local(name: &str, program: &PathBuf, args: &[String]) -> anyhow::Result<Session> {
    let mut child = Command::new(program)
        .arg("agent")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {} agent: {e}", program.display()))?;
    let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        anyhow::bail!("agent pipes missing");
    };
    let last_err = Arc::new(Mutex::new(String::new()));
    {
        let last_err = last_err.clone();
        let name = name.to_owned();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                tracing::warn!(machine = %name, "agent: {line}");
                if let Ok(mut l) = last_err.lock() {
                    *l = line;
                }
            }
        });
    }
    let (in_tx, in_rx) = mpsc::channel::<Result<Frame, String>>(64);
    std::thread::spawn(move || {
        let mut reader = FrameReader::from_read(stdout);
        loop {
            match reader.read() {
                Ok(Some(frame)) => {
                    if in_tx.blocking_send(Ok(frame)).is_err() {
                        break;
                    }
                }
                Ok(None) => {
                    // Give the stderr thread a moment to record why the agent stopped.
                    std::thread::sleep(Duration::from_millis(50));
                    let why = last_err.lock().map(|l| l.clone()).unwrap_or_default();
                    let why =
                        if why.is_empty() { "the agent exited".to_owned() } else { format!("the agent exited: {why}") };
                    let _ = in_tx.blocking_send(Err(why));
                    break;
                }
                Err(e) => {
                    let _ = in_tx.blocking_send(Err(format!("agent protocol error: {e}")));
                    break;
                }
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(64);
    std::thread::spawn(move || {
        let mut w = BufWriter::with_capacity(256 * 1024, stdin);
        while let Some(frame) = out_rx.blocking_recv() {
            if write_frame(&mut w, &frame).is_err() {
                break;
            }
            if out_rx.is_empty() && w.flush().is_err() {
                break;
            }
        }
        // Closing the agent's input ends its session: it stops its builds and exits.
        drop(w);
        let _ = child.wait();
    });
    Ok(Session { tx: out_tx, rx: in_rx })
}

/// One attempt in flight on this machine.
struct Active {
    job: Job,
    log: Option<BufWriter<File>>,
    /// Declared outputs of the derivation: name → path.
    expected: BTreeMap<String, String>,
    /// Set once the agent reports success: outputs whose NAR is still to come.
    claimed: Vec<BuiltOutput>,
    received: Vec<OutputInfo>,
}

struct Transfer {
    key: String,
    meta: PathMeta,
    hash: HashSink,
}

/// Everything a driver needs.
pub struct Driver {
    pub index: usize,
    pub name: String,
    pub transport: Transport,
    pub state_dir: PathBuf,
    /// Keys whose signatures on outputs are accepted; empty: the key the agent announces (the
    /// local machine, whose agent the coordinator started itself).
    pub trusted: Vec<PublicKey>,
    pub timeout_secs: Option<u64>,
    pub max_silent_secs: Option<u64>,
    pub events: mpsc::UnboundedSender<DriverEvent>,
}

impl Driver {
    /// Keep a session open, reconnecting with backoff, until the core goes away.
    pub async fn run(self, mut cmds: mpsc::UnboundedReceiver<DriverCmd>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let (error, was_up) = match self.session(&mut cmds).await {
                SessionEnd::CoreGone => return,
                SessionEnd::Lost { error, was_up } => (error, was_up),
            };
            if was_up {
                backoff = Duration::from_millis(250);
            }
            tracing::warn!(machine = %self.name, "{error}");
            if self.events.send(DriverEvent::Down { machine: self.index, error }).is_err() {
                return;
            }
            // Wait before reconnecting; jobs assigned meanwhile go back at once.
            let deadline = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    cmd = cmds.recv() => match cmd {
                        None => return,
                        Some(DriverCmd::Assign(job)) => self.report(job.build, job.attempt, not_connected()),
                        Some(DriverCmd::Cancel(_)) => {}
                    },
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    fn report(&self, build: BuildId, attempt: i64, result: AttemptResult) {
        let _ = self.events.send(DriverEvent::Done { machine: self.index, build, attempt, result });
    }

    async fn session(&self, cmds: &mut mpsc::UnboundedReceiver<DriverCmd>) -> SessionEnd {
        let mut session = match self.transport.connect(&self.name) {
            Ok(s) => s,
            Err(e) => return lost(format!("{e:#}")),
        };
        // Handshake.
        let hello =
            Message::Hello { protocol: PROTOCOL_VERSION, gbc_version: env!("CARGO_PKG_VERSION").into(), host: None };
        if session.tx.send(Frame::new(hello)).await.is_err() {
            return lost("the agent closed its input");
        }
        let facts = match tokio::time::timeout(Duration::from_secs(60), session.rx.recv()).await {
            Err(_) => return lost("the agent did not say hello within 60 s"),
            Ok(None) => return lost("the agent exited"),
            Ok(Some(Err(e))) => return lost(e),
            Ok(Some(Ok(Frame { message: Message::Hello { protocol, host: Some(facts), .. }, .. })))
                if protocol == PROTOCOL_VERSION =>
            {
                facts
            }
            Ok(Some(Ok(Frame { message: Message::Error { message, .. }, .. }))) => return lost(message),
            Ok(Some(Ok(other))) => {
                return lost(format!("the agent's first message is not a compatible hello: {:?}", other.message));
            }
        };
        let trusted = if self.trusted.is_empty() {
            match PublicKey::parse(&facts.signing_key) {
                Ok(k) => vec![k],
                Err(e) => return lost(format!("the agent's signing key: {e}")),
            }
        } else {
            self.trusted.clone()
        };
        if self.events.send(DriverEvent::Up { machine: self.index, facts }).is_err() {
            return SessionEnd::CoreGone;
        }

        let mut active: HashMap<String, Active> = HashMap::new();
        let mut by_build: HashMap<BuildId, String> = HashMap::new();
        let mut transfers: HashMap<u64, Transfer> = HashMap::new();
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => return SessionEnd::CoreGone,
                    Some(DriverCmd::Assign(job)) => {
                        let key = format!("{}/{}", job.uuid, job.n);
                        let expected = match Derivation::parse(job.aterm.as_bytes()) {
                            Ok(d) => d.outputs.into_iter().map(|(n, o)| (n, o.path)).collect(),
                            Err(e) => {
                                let reason = format!("stored derivation does not parse: {e}");
                                self.report(job.build, job.attempt, AttemptResult::Failed { status: "setup_failure".into(), reason });
                                continue;
                            }
                        };
                        let log_path = logs::plain_path(&self.state_dir, &job.uuid, job.n);
                        let log = logs::create(&log_path).map_err(|e| tracing::error!(machine = %self.name, "{}: {e}", log_path.display())).ok();
                        let msg = Message::Build {
                            build: key.clone(),
                            drv_path: job.drv_path.clone(),
                            drv: job.aterm.clone(),
                            inputs: job.inputs.clone(),
                            max_silent_secs: self.max_silent_secs,
                            timeout_secs: self.timeout_secs,
                            cores: None,
                        };
                        by_build.insert(job.build, key.clone());
                        active.insert(key, Active { job: *job, log, expected, claimed: Vec::new(), received: Vec::new() });
                        if session.tx.send(Frame::new(msg)).await.is_err() {
                            return SessionEnd::Lost { error: "the agent closed its input".into(), was_up: true };
                        }
                    }
                    Some(DriverCmd::Cancel(build)) => {
                        if let Some(key) = by_build.get(&build) {
                            let _ = session.tx.send(Frame::new(Message::Cancel { build: key.clone() })).await;
                        }
                    }
                },
                frame = session.rx.recv() => {
                    let frame = match frame {
                        None => return SessionEnd::Lost { error: "the agent exited".into(), was_up: true },
                        Some(Err(e)) => return SessionEnd::Lost { error: e, was_up: true },
                        Some(Ok(f)) => f,
                    };
                    let mut ended: Vec<(String, AttemptResult)> = Vec::new();
                    match frame.message {
                        Message::Inputs { build, missing } => {
                            if !active.contains_key(&build) {
                                continue;
                            }
                            if missing.is_empty() {
                                if session.tx.send(Frame::new(Message::Start { build })).await.is_err() {
                                    return SessionEnd::Lost { error: "the agent closed its input".into(), was_up: true };
                                }
                            } else {
                                let _ = session.tx.send(Frame::new(Message::Cancel { build: build.clone() })).await;
                                let reason = format!("missing inputs: {}", missing.join(" "));
                                ended.push((build, AttemptResult::Retry { status: "missing_inputs".into(), reason, count: true }));
                            }
                        }
                        Message::Started { .. } => {}
                        Message::Log { build, .. } => {
                            if let Some(a) = active.get_mut(&build)
                                && let Some(log) = &mut a.log
                                && let Err(e) = log.write_all(&frame.payload).and_then(|()| log.flush())
                            {
                                tracing::error!(machine = %self.name, "log of {build}: {e}");
                                a.log = None;
                            }
                        }
                        Message::Finished { build, status, outputs } => {
                            if let Some(a) = active.get_mut(&build)
                                && let Some(result) = finished(a, status, outputs, &trusted)
                            {
                                ended.push((build, result));
                            }
                        }
                        Message::NarStart { transfer, build: Some(build), meta } => {
                            let Some(a) = active.get_mut(&build) else { continue };
                            if a.claimed.iter().any(|o| o.meta == meta) && !transfers.contains_key(&transfer) {
                                transfers.insert(transfer, Transfer { key: build, meta, hash: HashSink::new() });
                            } else {
                                let reason = format!("the agent sent a NAR for {} that it did not claim as an output", meta.path);
                                ended.push((build, rejected(reason)));
                            }
                        }
                        Message::NarChunk { transfer, .. } => {
                            if let Some(t) = transfers.get_mut(&transfer) {
                                let _ = t.hash.write_all(&frame.payload);
                            }
                        }
                        Message::NarEnd { transfer } => {
                            if let Some(t) = transfers.remove(&transfer)
                                && let Some(a) = active.get_mut(&t.key)
                            {
                                let (hash, size) = t.hash.finish();
                                let got = format!("sha256:{}", hash.to_nix32());
                                if got != t.meta.nar_hash || size != t.meta.nar_size {
                                    let reason = format!(
                                        "the NAR of {} does not match its claim: {got}, {size} bytes, claimed {}, {} bytes",
                                        t.meta.path, t.meta.nar_hash, t.meta.nar_size
                                    );
                                    ended.push((t.key, rejected(reason)));
                                } else if let Some(o) = a.claimed.iter().find(|o| o.meta == t.meta) {
                                    a.received.push(OutputInfo {
                                        name: o.name.clone(),
                                        path: o.meta.path.clone(),
                                        nar_hash: o.meta.nar_hash.clone(),
                                        nar_size: o.meta.nar_size,
                                        references: o.meta.references.clone(),
                                        signature: o.signature.clone(),
                                    });
                                    if a.received.len() == a.claimed.len() {
                                        let outputs = std::mem::take(&mut a.received);
                                        ended.push((t.key, AttemptResult::Success { outputs }));
                                    }
                                }
                            }
                        }
                        Message::Error { message, build: Some(build), .. } => {
                            if active.contains_key(&build) {
                                let reason = format!("the agent refused the build: {message}");
                                ended.push((build, AttemptResult::Retry { status: "setup_failure".into(), reason, count: true }));
                            }
                        }
                        Message::Error { message, .. } => tracing::warn!(machine = %self.name, "agent error: {message}"),
                        other => tracing::warn!(machine = %self.name, "unexpected message from the agent: {other:?}"),
                    }
                    for (key, result) in ended {
                        let Some(a) = active.remove(&key) else { continue };
                        by_build.remove(&a.job.build);
                        transfers.retain(|_, t| t.key != key);
                        let (build, attempt) = (a.job.build, a.job.attempt);
                        self.close_log(a).await;
                        self.report(build, attempt, result);
                    }
                }
            }
        }
    }

    /// Finish an attempt's log: compressed, then the plain file removed.
    async fn close_log(&self, a: Active) {
        if let Some(mut log) = a.log {
            let _ = log.flush();
        }
        let plain = logs::plain_path(&self.state_dir, &a.job.uuid, a.job.n);
        let name = self.name.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = logs::compress(&plain) {
                tracing::error!(machine = %name, "compressing {}: {e}", plain.display());
            }
        })
        .await;
    }
}

enum SessionEnd {
    /// The core stopped: nothing more to do.
    CoreGone,
    /// Could not connect (`was_up` false), or the session broke.
    Lost { error: String, was_up: bool },
}

fn lost(error: impl Into<String>) -> SessionEnd {
    SessionEnd::Lost { error: error.into(), was_up: false }
}

fn not_connected() -> AttemptResult {
    AttemptResult::Retry { status: "interrupted".into(), reason: "the machine is not connected".into(), count: false }
}

fn rejected(reason: String) -> AttemptResult {
    AttemptResult::Retry { status: "rejected".into(), reason, count: true }
}

/// What a `finished` message means for an attempt; None when the outputs' NARs are still to come.
fn finished(
    a: &mut Active,
    status: BuildStatus,
    outputs: Vec<BuiltOutput>,
    trusted: &[PublicKey],
) -> Option<AttemptResult> {
    let failed = |status: &str, reason: String| Some(AttemptResult::Failed { status: status.into(), reason });
    let retry =
        |status: &str, reason: String| Some(AttemptResult::Retry { status: status.into(), reason, count: true });
    match status {
        BuildStatus::Success => match check_outputs(&a.expected, &outputs, trusted) {
            Ok(()) => {
                a.claimed = outputs;
                None
            }
            Err(reason) => Some(rejected(reason)),
        },
        BuildStatus::BuildFailure { exit_code, reason } => {
            let reason = match exit_code {
                Some(c) if reason.is_empty() => format!("the builder exited with status {c}"),
                _ => reason,
            };
            failed("build_failure", reason)
        }
        BuildStatus::TimedOut { seconds } => failed("timed_out", format!("timed out after {seconds} s")),
        BuildStatus::SilentTooLong { seconds } => failed("silent_too_long", format!("no output for {seconds} s")),
        BuildStatus::SetupFailure { reason } => retry("setup_failure", reason),
        BuildStatus::MissingInputs { paths } => retry("missing_inputs", format!("missing inputs: {}", paths.join(" "))),
        BuildStatus::Canceled => Some(AttemptResult::Canceled),
    }
}

/// The agent's claimed outputs must be exactly the derivation's, each signed by a trusted key.
fn check_outputs(
    expected: &BTreeMap<String, String>,
    outputs: &[BuiltOutput],
    trusted: &[PublicKey],
) -> Result<(), String> {
    if outputs.len() != expected.len() {
        return Err(format!("the agent reported {} outputs, the derivation has {}", outputs.len(), expected.len()));
    }
    for o in outputs {
        if expected.get(&o.name) != Some(&o.meta.path) {
            return Err(format!("the agent reported output {} at {}, not the derivation's path", o.name, o.meta.path));
        }
        let hash = crate::formats::hash::Hash::parse(&o.meta.nar_hash)
            .map_err(|e| format!("output {}: bad NAR hash {}: {e}", o.name, o.meta.nar_hash))?;
        let fp = narinfo::fingerprint(&o.meta.path, &hash, o.meta.nar_size, &o.meta.references);
        let sig = Signature::parse(&o.signature).map_err(|e| format!("output {}: bad signature: {e}", o.name))?;
        if !trusted.iter().any(|k| k.name() == sig.key_name() && k.verify(fp.as_bytes(), &sig)) {
            return Err(format!("output {}: not signed by a trusted key (signature by {})", o.name, sig.key_name()));
        }
    }
    Ok(())
}
