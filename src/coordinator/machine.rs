//! Machine drivers: one task per machine keeps a session with its `gbc agent` open, sends it the
//! jobs the core assigns, writes their logs, checks what comes back (output paths, signatures, NAR
//! hashes) and reports each attempt's end to the core. The transport only has to carry frames:
//! the built-in local machine runs the agent as a child process; SSH machines will run it over an
//! exec channel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::logs;
use super::queue::BuildId;
use super::transport::Transport;
use crate::api::{AttemptStatus, OutputInfo};
use crate::build::refs::RefScanner;
use crate::cache::{self, Cache, StagedNar};
use crate::db::Job;
use crate::formats::derivation::Derivation;
use crate::formats::hash::Hash;
use crate::formats::hash::HashSink;
use crate::formats::narinfo;
use crate::formats::signing::{PublicKey, Signature};
use crate::pipe::{Both, ChunkReader};
use crate::protocol::{BuildStatus, BuiltOutput, Frame, HostFacts, Message, NAR_CHUNK, PathMeta};

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
        status: AttemptStatus,
        reason: String,
    },
    /// The machine could not run it (setup failure, missing inputs, a rejected result, the machine
    /// lost): try again, elsewhere if possible. `count` is false when it never started.
    Retry {
        status: AttemptStatus,
        reason: String,
        count: bool,
    },
    /// The machine lacks these inputs and the cache does not have them: the core finds builds
    /// to make them, or fails the build.
    MissingInputs {
        paths: Vec<String>,
    },
    /// The machine does not take derivations of this store dir: the core tries another machine,
    /// or fails the build when none takes it.
    StoreDirRefused {
        store_dir: String,
    },
    /// (Core only.) Back to the queue until these builds, which make its missing inputs, succeed.
    WaitFor {
        deps: Vec<BuildId>,
        reason: String,
    },
    Canceled,
}

/// Driver → core.
#[derive(Debug)]
pub enum DriverEvent {
    Up {
        machine: usize,
        facts: HostFacts,
    },
    /// Fresh load figures from a ping.
    Load {
        machine: usize,
        load1: f64,
        free_space: u64,
    },
    /// Inputs of this many NAR bytes are on their way to a host.
    Sending {
        bytes: u64,
    },
    Down {
        machine: usize,
        error: String,
    },
    Done {
        machine: usize,
        build: BuildId,
        attempt: i64,
        result: AttemptResult,
    },
}

/// One attempt in flight on this machine.
struct Active {
    job: Job,
    log: Option<BufWriter<File>>,
    /// Declared outputs of the derivation: name → path.
    expected: BTreeMap<String, String>,
    /// Set once the agent reports success: outputs whose NAR is still to come.
    claimed: Vec<BuiltOutput>,
    received: Vec<(OutputInfo, Option<StagedNar>)>,
    /// The derivation's system, for the narinfos.
    system: String,
    /// Inputs sent to the agent that it has not yet added.
    awaiting_inputs: usize,
    /// The input closure as far as the cache knows it, all named in `build`: of these, the agent
    /// gets only the ones it says it lacks.
    announced: BTreeSet<String>,
    /// Log bytes written so far.
    log_bytes: u64,
    /// Set when the log passed the limit and the build was stopped for it.
    log_exceeded: Option<u64>,
}

/// A NAR arriving: its chunks go to a thread that hashes them and stages them in the cache.
struct Transfer {
    key: String,
    meta: PathMeta,
    chunks: mpsc::Sender<Vec<u8>>,
    done: tokio::sync::oneshot::Receiver<std::io::Result<Received>>,
}

/// What the staging thread made of a NAR.
struct Received {
    nar_hash: String,
    nar_size: u64,
    /// The candidate paths whose hash parts occur in it.
    references: BTreeSet<String>,
    staged: Option<StagedNar>,
}

/// Send a path from the cache to the agent as transfer `transfer`, on a thread of its own (it reads
/// and decompresses). Should the NAR be unreadable, what arrives does not match its hash, and the
/// agent says so.
fn send_input(cache: Arc<Cache>, info: crate::formats::narinfo::NarInfo, transfer: u64, tx: mpsc::Sender<Frame>) {
    std::thread::spawn(move || {
        let sd = cache.store_dir();
        let meta = PathMeta {
            path: sd.display(&info.store_path),
            nar_hash: format!("sha256:{}", info.nar_hash.to_nix32()),
            nar_size: info.nar_size,
            references: info.references.iter().map(|r| sd.display(r)).collect(),
            deriver: info.deriver.as_ref().map(|d| sd.display(d)),
        };
        if tx.blocking_send(Frame::new(Message::NarStart { transfer, build: None, meta })).is_err() {
            return;
        }
        let sent = cache.open_nar(&info).and_then(|mut nar| {
            cache::for_each_chunk(&mut nar, NAR_CHUNK, |chunk| {
                let message = Message::NarChunk { transfer, payload: chunk.len() as u64 };
                tx.blocking_send(Frame { message, payload: chunk }).is_ok()
            })
        });
        if let Err(e) = sent {
            tracing::error!("reading {} from the cache: {e}", info.url);
        }
        let _ = tx.blocking_send(Frame::new(Message::NarEnd { transfer }));
    });
}

/// Start a thread that checks a NAR's chunks against the NAR grammar as they arrive, hashes them,
/// scans them for the hash parts of `candidates` (the references it may have) and, when there is a
/// cache for its store dir, compresses them into it. A build host is not trusted to send a NAR:
/// bytes that are not one end the transfer with an `InvalidData` error.
fn receive(cache: Option<Arc<Cache>>, key: String, meta: PathMeta, candidates: BTreeSet<String>) -> Transfer {
    let (chunks, rx) = mpsc::channel::<Vec<u8>>(16);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let staging = cache.filter(|c| c.store_dir().parse_path(&meta.path).is_ok());
    std::thread::spawn(move || {
        let result = (|| {
            let nar = ChunkReader::new(rx);
            let scanner = RefScanner::new(candidates.iter().map(String::as_str));
            let (nar_hash, nar_size, staged, scanner) = match staging {
                Some(c) => {
                    let (Both(writer, scanner), _) = cache::check_nar(nar, Both(c.begin()?, scanner))?;
                    let s = writer.finish()?;
                    (s.nar_hash.clone(), s.nar_size, Some(s), scanner)
                }
                None => {
                    let (Both(hash, scanner), _) = cache::check_nar(nar, Both(HashSink::new(), scanner))?;
                    let (h, n) = hash.finish();
                    (h, n, None, scanner)
                }
            };
            let references = scanner.finish();
            Ok(Received { nar_hash: format!("sha256:{}", nar_hash.to_nix32()), nar_size, references, staged })
        })();
        let _ = done_tx.send(result);
    });
    Transfer { key, meta, chunks, done }
}

/// Everything a driver needs.
pub struct Driver {
    pub index: usize,
    pub name: String,
    pub transport: Transport,
    pub state_dir: PathBuf,
    /// Keys whose signatures on outputs are accepted; empty: the key the agent announces (only for
    /// the local machine, whose agent the coordinator started itself).
    pub trusted: Vec<PublicKey>,
    /// Where verified outputs are published.
    pub cache: Option<Arc<Cache>>,
    pub backoff: Backoff,
    /// How often the agent is asked for its load.
    pub ping: Duration,
    pub timeout_secs: Option<u64>,
    pub max_silent_secs: Option<u64>,
    /// Stop a build whose log passes this many bytes.
    pub max_log_size: Option<u64>,
    pub events: mpsc::UnboundedSender<DriverEvent>,
}

impl Driver {
    /// Keep a session open, reconnecting with backoff, until the core goes away.
    pub async fn run(self, mut cmds: mpsc::UnboundedReceiver<DriverCmd>) {
        let mut failures = 0u32;
        loop {
            let (error, was_up) = match self.session(&mut cmds).await {
                SessionEnd::CoreGone => return,
                SessionEnd::Lost { error, was_up } => (error, was_up),
            };
            if was_up {
                failures = 0;
            }
            let delay = self.backoff.delay(failures);
            failures = failures.saturating_add(1);
            tracing::warn!(machine = %self.name, "{error}; next try in {:.0?}", delay);
            if self.events.send(DriverEvent::Down { machine: self.index, error }).is_err() {
                return;
            }
            // Wait before reconnecting; jobs assigned meanwhile go back at once.
            let deadline = tokio::time::Instant::now() + delay;
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
        }
    }

    fn report(&self, build: BuildId, attempt: i64, result: AttemptResult) {
        let _ = self.events.send(DriverEvent::Done { machine: self.index, build, attempt, result });
    }

    async fn session(&self, cmds: &mut mpsc::UnboundedReceiver<DriverCmd>) -> SessionEnd {
        // The agent takes the coordinator for gone after four pings' worth of silence.
        let connecting = self.transport.connect(&self.name, Some(self.ping * 4));
        tokio::pin!(connecting);
        // Assignments can't arrive before `Up`, but the core may go away meanwhile.
        let connected = loop {
            tokio::select! {
                r = &mut connecting => break r,
                cmd = cmds.recv() => match cmd {
                    None => return SessionEnd::CoreGone,
                    Some(DriverCmd::Assign(job)) => self.report(job.build, job.attempt, not_connected()),
                    Some(DriverCmd::Cancel(_)) => {}
                },
            }
        };
        let mut session = match connected {
            Ok(s) => s,
            Err(e) => return lost(e.to_string()),
        };
        for note in &session.notes {
            tracing::info!(machine = %self.name, "{note}");
        }
        let facts = session.facts.clone();
        let facts_store_dirs = facts.store_dirs.clone();
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
        // Inputs being sent to the agent: transfer → (build key, path).
        let mut uploads: HashMap<u64, (String, String)> = HashMap::new();
        let mut next_upload: u64 = 0;
        let mut ping = tokio::time::interval(self.ping);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    if session.tx.send(Frame::new(Message::Ping {})).await.is_err() {
                        return SessionEnd::Lost { error: "the agent closed its input".into(), was_up: true };
                    }
                }
                cmd = cmds.recv() => match cmd {
                    None => return SessionEnd::CoreGone,
                    Some(DriverCmd::Assign(job)) => {
                        let key = format!("{}/{}", job.uuid, job.n);
                        let (expected, system) = match Derivation::parse(job.aterm.as_bytes()) {
                            Ok(d) => (d.outputs.into_iter().map(|(n, o)| (n, o.path)).collect(), d.system),
                            Err(e) => {
                                let reason = format!("stored derivation does not parse: {e}");
                                self.report(job.build, job.attempt, AttemptResult::Failed { status: AttemptStatus::SetupFailure, reason });
                                continue;
                            }
                        };
                        let store_dir = job.drv_path.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
                        if !facts_store_dirs.contains(&store_dir) {
                            self.report(job.build, job.attempt, AttemptResult::StoreDirRefused { store_dir });
                            continue;
                        }
                        let log_path = logs::plain_path(&self.state_dir, &job.uuid, job.n);
                        let log = logs::create(&log_path).map_err(|e| tracing::error!(machine = %self.name, "{}: {e}", log_path.display())).ok();
                        // Name the inputs' whole closure (what the cache knows of it), so that
                        // the agent's answer lists every path it lacks and no other is sent.
                        let announced: BTreeSet<String> = match &self.cache {
                            Some(c) => {
                                let (c, i) = (c.clone(), job.inputs.clone());
                                match tokio::task::spawn_blocking(move || c.with_closure(&i)).await {
                                    Ok(Ok(all)) => all,
                                    Ok(Err(e)) => {
                                        tracing::error!(machine = %self.name, "reading the cache: {e}");
                                        job.inputs.iter().cloned().collect()
                                    }
                                    Err(_) => job.inputs.iter().cloned().collect(),
                                }
                            }
                            None => job.inputs.iter().cloned().collect(),
                        };
                        let msg = Message::Build {
                            build: key.clone(),
                            drv_path: job.drv_path.clone(),
                            drv: job.aterm.clone(),
                            inputs: announced.iter().cloned().collect(),
                            max_silent_secs: self.max_silent_secs,
                            timeout_secs: self.timeout_secs,
                            cores: None,
                        };
                        by_build.insert(job.build, key.clone());
                        active.insert(key, Active { job: *job, log, expected, claimed: Vec::new(), received: Vec::new(), system, awaiting_inputs: 0, announced, log_bytes: 0, log_exceeded: None });
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
                            // What the cache can give, the agent gets (with the references it
                            // lacks); the build starts once every one is added.
                            let (infos, lacking) = match &self.cache {
                                Some(c) if !missing.is_empty() => {
                                    let (c, m) = (c.clone(), missing.clone());
                                    match tokio::task::spawn_blocking(move || c.closure(&m)).await {
                                        Ok(Ok(r)) => r,
                                        Ok(Err(e)) => {
                                            tracing::error!(machine = %self.name, "reading the cache: {e}");
                                            (Vec::new(), missing.clone())
                                        }
                                        Err(_) => (Vec::new(), missing.clone()),
                                    }
                                }
                                _ => (Vec::new(), missing.clone()),
                            };
                            // What the agent was asked about and did not list, it has.
                            let asked = active.get(&build).map(|a| &a.announced);
                            let listed: std::collections::HashSet<&str> = missing.iter().map(String::as_str).collect();
                            let unneeded = |p: &str| asked.is_some_and(|a| a.contains(p)) && !listed.contains(p);
                            let sd = self.cache.as_ref().map(|c| c.store_dir().clone());
                            let infos: Vec<_> = infos
                                .into_iter()
                                .filter(|i| sd.as_ref().is_none_or(|sd| !unneeded(&sd.display(&i.store_path))))
                                .collect();
                            let lacking: Vec<String> = lacking.into_iter().filter(|p| !unneeded(p)).collect();
                            if !lacking.is_empty() {
                                let _ = session.tx.send(Frame::new(Message::Cancel { build: build.clone() })).await;
                                ended.push((build, AttemptResult::MissingInputs { paths: lacking }));
                            } else if infos.is_empty() {
                                if session.tx.send(Frame::new(Message::Start { build })).await.is_err() {
                                    return SessionEnd::Lost { error: "the agent closed its input".into(), was_up: true };
                                }
                            } else if let (Some(cache), Some(a)) = (&self.cache, active.get_mut(&build)) {
                                a.awaiting_inputs = infos.len();
                                let _ = self.events.send(DriverEvent::Sending { bytes: infos.iter().map(|i| i.nar_size).sum() });
                                for info in infos {
                                    next_upload += 1;
                                    uploads.insert(next_upload, (build.clone(), cache.store_dir().display(&info.store_path)));
                                    send_input(cache.clone(), info, next_upload, session.tx.clone());
                                }
                            }
                        }
                        Message::PathAdded { transfer, .. } => {
                            if let Some((key, _)) = uploads.remove(&transfer)
                                && let Some(a) = active.get_mut(&key)
                            {
                                a.awaiting_inputs -= 1;
                                if a.awaiting_inputs == 0
                                    && session.tx.send(Frame::new(Message::Start { build: key })).await.is_err()
                                {
                                    return SessionEnd::Lost { error: "the agent closed its input".into(), was_up: true };
                                }
                            }
                        }
                        Message::Error { message, transfer: Some(transfer), .. } if uploads.contains_key(&transfer) => {
                            if let Some((key, path)) = uploads.remove(&transfer)
                                && active.contains_key(&key)
                            {
                                let _ = session.tx.send(Frame::new(Message::Cancel { build: key.clone() })).await;
                                let reason = format!("the agent refused input {path}: {message}");
                                ended.push((key, AttemptResult::Retry { status: AttemptStatus::SetupFailure, reason, count: true }));
                            }
                        }
                        Message::Started { .. } => {}
                        Message::Pong { load1, free_space } => {
                            let _ = self.events.send(DriverEvent::Load { machine: self.index, load1, free_space });
                        }
                        Message::Log { build, .. } => {
                            let Some(a) = active.get_mut(&build) else { continue };
                            if a.log_exceeded.is_some() {
                                continue;
                            }
                            // Past the limit the log is cut and the build stopped, as Nix's
                            // max-build-log-size does: a runaway build must not fill the disk.
                            let mut bytes = &frame.payload[..];
                            let over = self.max_log_size.filter(|&max| a.log_bytes + bytes.len() as u64 > max);
                            if let Some(max) = over {
                                bytes = &bytes[..(max - a.log_bytes) as usize];
                                a.log_exceeded = Some(max);
                                if session.tx.send(Frame::new(Message::Cancel { build: build.clone() })).await.is_err() {
                                    return SessionEnd::Lost { error: "the agent closed its input".into(), was_up: true };
                                }
                            }
                            a.log_bytes += bytes.len() as u64;
                            if let Some(log) = &mut a.log {
                                let mut written = log.write_all(bytes);
                                if let Some(max) = over {
                                    written = written.and_then(|()| write!(log, "\ngbc: the log passed {max} bytes (--max-log-size): the build was stopped\n"));
                                }
                                if let Err(e) = written.and_then(|()| log.flush()) {
                                    tracing::error!(machine = %self.name, "log of {build}: {e}");
                                    a.log = None;
                                }
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
                                match possible_references(a, &meta, self.cache.as_deref()) {
                                    Ok(candidates) => {
                                        transfers.insert(transfer, receive(self.cache.clone(), build, meta, candidates));
                                    }
                                    Err(reason) => ended.push((build, rejected(reason))),
                                }
                            } else {
                                let reason = format!("the agent sent a NAR for {} that it did not claim as an output", meta.path);
                                ended.push((build, rejected(reason)));
                            }
                        }
                        Message::NarChunk { transfer, .. } => {
                            if let Some(t) = transfers.get_mut(&transfer) {
                                // A failed send: the staging thread stopped; its error comes at the end.
                                let _ = t.chunks.send(frame.payload).await;
                            }
                        }
                        Message::NarEnd { transfer } => {
                            if let Some(t) = transfers.remove(&transfer)
                                && active.contains_key(&t.key)
                            {
                                let Transfer { key, meta, chunks, done } = t;
                                drop(chunks);
                                let received = match done.await {
                                    Ok(r) => r,
                                    Err(_) => Err(std::io::Error::other("the thread storing it stopped")),
                                };
                                let output = match received {
                                    Ok(r) => check_received(&meta, r),
                                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                                        Err(rejected(format!("the host sent {} as bytes that are not a NAR: {e}", meta.path)))
                                    }
                                    Err(e) => Err(store_failure(&format!("could not store the NAR of {}", meta.path), &e)),
                                };
                                match output {
                                    Err(result) => ended.push((key, result)),
                                    Ok(staged) => {
                                        let Some(a) = active.get_mut(&key) else { continue };
                                        if let Some(o) = a.claimed.iter().find(|o| o.meta == meta) {
                                            let info = OutputInfo {
                                                name: o.name.clone(),
                                                path: o.meta.path.clone(),
                                                nar_hash: o.meta.nar_hash.clone(),
                                                nar_size: o.meta.nar_size,
                                                references: o.meta.references.clone(),
                                                signature: o.signature.clone(),
                                            };
                                            a.received.push((info, staged));
                                            if a.received.len() == a.claimed.len() {
                                                let received = std::mem::take(&mut a.received);
                                                let result = self.publish(&a.job, &a.system, received).await;
                                                ended.push((key, result));
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        Message::Error { message, build: Some(build), .. } => {
                            if active.contains_key(&build) {
                                let reason = format!("the agent refused the build: {message}");
                                ended.push((build, AttemptResult::Retry { status: AttemptStatus::SetupFailure, reason, count: true }));
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

    /// Publish a build's verified outputs in the cache (on a blocking thread); the attempt
    /// succeeds only once they are stored.
    async fn publish(&self, job: &Job, system: &str, received: Vec<(OutputInfo, Option<StagedNar>)>) -> AttemptResult {
        let outputs: Vec<OutputInfo> = received.iter().map(|(o, _)| o.clone()).collect();
        let Some(cache) = self.cache.clone() else { return AttemptResult::Success { outputs } };
        let mut staged = Vec::new();
        for (o, s) in received {
            let Some(s) = s else { continue };
            let (Ok(nar_hash), Ok(sig)) = (Hash::parse(&o.nar_hash), Signature::parse(&o.signature)) else {
                return rejected(format!("output {}: unreadable hash or signature", o.name));
            };
            let out = cache::Output {
                path: o.path,
                nar_hash,
                nar_size: o.nar_size,
                references: o.references,
                deriver: Some(job.drv_path.clone()),
                system: Some(system.to_owned()),
                host_signature: Some(sig),
                ca: None,
            };
            staged.push((out, s));
        }
        if staged.is_empty() {
            return AttemptResult::Success { outputs };
        }
        // Every reference must be in the cache or among these outputs; otherwise the narinfo
        // would wait in `.pending/` for a path nobody is going to send.
        let publishing = tokio::task::spawn_blocking(move || {
            let here: BTreeSet<&str> = staged.iter().map(|(o, _)| o.path.as_str()).collect();
            for (o, _) in &staged {
                if let Some(r) = o.references.iter().find(|r| !here.contains(r.as_str()) && !cache.has(r)) {
                    return Ok(Err(format!(
                        "its output {} refers to {r}, which the cache does not have (the build host had it): \
                         submit the path with the derivation (gbc submit uploads the sources it lacks) or a derivation that makes it",
                        o.path
                    )));
                }
            }
            cache.publish(staged).map(Ok)
        });
        match publishing.await {
            Ok(Ok(Ok(published))) => {
                tracing::debug!(machine = %self.name, "published {}", published.join(" "));
                AttemptResult::Success { outputs }
            }
            Ok(Ok(Err(reason))) => AttemptResult::Failed { status: AttemptStatus::MissingReference, reason },
            Ok(Err(e)) => store_failure("could not publish the outputs", &e),
            Err(e) => AttemptResult::Retry { status: AttemptStatus::StoreFailure, reason: e.to_string(), count: true },
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

/// How long to wait before reconnecting after the `n`th failure in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub factor: u32,
    pub max: Duration,
    /// Add up to this fraction of the delay, at random, so that hosts lost together don't all
    /// come back in the same instant.
    pub jitter: f64,
}

impl Backoff {
    /// For SSH hosts, like Hydra: 60 s × 3^n plus up to 10%, at most an hour.
    pub fn hosts(first: Duration) -> Backoff {
        Backoff { first, factor: 3, max: Duration::from_secs(3600), jitter: 0.1 }
    }

    /// For the local agent, a child process: quick retries.
    pub fn local() -> Backoff {
        Backoff { first: Duration::from_millis(250), factor: 2, max: Duration::from_secs(30), jitter: 0.0 }
    }

    pub fn delay(&self, failures: u32) -> Duration {
        let base = self.first.saturating_mul(self.factor.saturating_pow(failures.min(30))).min(self.max);
        let mut r = [0u8; 4];
        let unit =
            if getrandom::fill(&mut r).is_ok() { f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX) } else { 0.5 };
        base + base.mul_f64(self.jitter * unit)
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
    AttemptResult::Retry {
        status: AttemptStatus::Interrupted,
        reason: "the machine is not connected".into(),
        count: false,
    }
}

fn rejected(reason: String) -> AttemptResult {
    AttemptResult::Retry { status: AttemptStatus::Rejected, reason, count: true }
}

/// The coordinator could not store what a host sent: worth another try, and when the disk is full
/// the reason says so first.
fn store_failure(what: &str, e: &std::io::Error) -> AttemptResult {
    let reason = match e.kind() {
        std::io::ErrorKind::StorageFull => format!("the cache's disk is full: {what}: {e}"),
        _ => format!("{what}: {e}"),
    };
    AttemptResult::Retry { status: AttemptStatus::StoreFailure, reason, count: true }
}

/// The paths an output of this attempt may refer to, which its NAR is scanned for: the input
/// closure named in `build`, the inputs, the derivation's outputs, and what the host claims. When
/// the output goes into the cache, whose closure of the inputs is complete, a claimed reference
/// outside that set is refused at once: no build could have found it.
fn possible_references(a: &Active, meta: &PathMeta, cache: Option<&Cache>) -> Result<BTreeSet<String>, String> {
    let mut candidates: BTreeSet<String> = a.announced.clone();
    candidates.extend(a.job.inputs.iter().cloned());
    candidates.extend(a.expected.values().cloned());
    if cache.is_some_and(|c| c.store_dir().parse_path(&meta.path).is_ok())
        && let Some(r) = meta.references.iter().find(|r| !candidates.contains(*r))
    {
        return Err(format!(
            "the host says {} refers to {r}, which is not among the build's inputs or outputs",
            meta.path
        ));
    }
    candidates.extend(meta.references.iter().cloned());
    Ok(candidates)
}

/// Compare what arrived with what the host claimed: the NAR's hash and size, and its references
/// (every claimed one occurs in it, and no possible one that is not claimed).
fn check_received(meta: &PathMeta, r: Received) -> Result<Option<StagedNar>, AttemptResult> {
    if r.nar_hash != meta.nar_hash || r.nar_size != meta.nar_size {
        return Err(rejected(format!(
            "the NAR of {} does not match its claim: {}, {} bytes, claimed {}, {} bytes",
            meta.path, r.nar_hash, r.nar_size, meta.nar_hash, meta.nar_size
        )));
    }
    let claimed: BTreeSet<String> = meta.references.iter().cloned().collect();
    if r.references != claimed {
        let unclaimed: Vec<&String> = r.references.difference(&claimed).collect();
        let absent: Vec<&String> = claimed.difference(&r.references).collect();
        return Err(rejected(format!(
            "the references of {} are not the ones claimed: found but not claimed {unclaimed:?}, claimed but not found {absent:?}",
            meta.path
        )));
    }
    Ok(r.staged)
}

/// What a `finished` message means for an attempt; None when the outputs' NARs are still to come.
fn finished(
    a: &mut Active,
    status: BuildStatus,
    outputs: Vec<BuiltOutput>,
    trusted: &[PublicKey],
) -> Option<AttemptResult> {
    let failed = |status, reason: String| Some(AttemptResult::Failed { status, reason });
    if let Some(max) = a.log_exceeded {
        return failed(AttemptStatus::BuildFailure, format!("its log passed {max} bytes (--max-log-size)"));
    }
    let retry = |status, reason: String| Some(AttemptResult::Retry { status, reason, count: true });
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
            failed(AttemptStatus::BuildFailure, reason)
        }
        BuildStatus::TimedOut { seconds } => failed(AttemptStatus::TimedOut, format!("timed out after {seconds} s")),
        BuildStatus::SilentTooLong { seconds } => {
            failed(AttemptStatus::SilentTooLong, format!("no output for {seconds} s"))
        }
        BuildStatus::SetupFailure { reason } => retry(AttemptStatus::SetupFailure, reason),
        BuildStatus::TransientFailure { reason } => retry(AttemptStatus::TransientFailure, reason),
        BuildStatus::MissingInputs { paths } => Some(AttemptResult::MissingInputs { paths }),
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a";
    const B: &str = "/nix/store/4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b";

    fn meta(references: &[&str]) -> PathMeta {
        PathMeta {
            path: "/nix/store/2fddh7wrp08zszglvp7wdvxjs8hwjmah-out".into(),
            nar_hash: "sha256:1np9qahxc6apzpgil734ihi7r55ax34iiifyhlj20jvf3a0yyr10".into(),
            nar_size: 120,
            references: references.iter().map(|r| r.to_string()).collect(),
            deriver: None,
        }
    }

    fn received(m: &PathMeta, references: &[&str]) -> Received {
        let references = references.iter().map(|r| r.to_string()).collect();
        Received { nar_hash: m.nar_hash.clone(), nar_size: m.nar_size, references, staged: None }
    }

    fn rejection(r: Result<Option<StagedNar>, AttemptResult>) -> String {
        match r {
            Err(AttemptResult::Retry { status: AttemptStatus::Rejected, reason, .. }) => reason,
            other => unreachable!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn an_output_s_references_must_be_exactly_the_ones_its_nar_holds() {
        let m = meta(&[A]);
        assert!(check_received(&m, received(&m, &[A])).is_ok());
        let hidden = rejection(check_received(&m, received(&m, &[A, B])));
        assert!(
            hidden.contains("found but not claimed [\"/nix/store/4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b\"]"),
            "{hidden}"
        );
        let invented = rejection(check_received(&m, received(&m, &[])));
        assert!(
            invented.contains("claimed but not found [\"/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a\"]"),
            "{invented}"
        );
        let mut other = received(&m, &[A]);
        other.nar_size += 1;
        assert!(rejection(check_received(&m, other)).contains("does not match its claim"));
    }

    /// On a paused clock: a machine that can't be reached is tried again after 250 ms, 500 ms,
    /// 1 s... (the local machine's backoff), each failure reported, and a job assigned meanwhile
    /// goes back to the core at once instead of waiting for the connection.
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_machine_is_retried_with_backoff_and_its_jobs_come_back_at_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let (events, mut rx) = mpsc::unbounded_channel();
        let driver = Driver {
            index: 3,
            name: "gone".into(),
            transport: Transport::Local { program: dir.path().join("no-such-gbc"), args: vec![] },
            state_dir: dir.path().to_owned(),
            trusted: vec![],
            cache: None,
            backoff: Backoff::local(),
            ping: Duration::from_secs(30),
            timeout_secs: None,
            max_silent_secs: None,
            max_log_size: None,
            events,
        };
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(driver.run(cmd_rx));
        let t0 = tokio::time::Instant::now();
        let mut downs = Vec::new();
        while downs.len() < 4 {
            match rx.recv().await {
                Some(DriverEvent::Down { machine: 3, error }) => {
                    assert!(error.contains("no-such-gbc"), "{error}");
                    downs.push(t0.elapsed());
                }
                other => unreachable!("{other:?}"),
            }
        }
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(downs, [ms(0), ms(250), ms(750), ms(1750)]);
        let job = Job {
            build: 7,
            uuid: "u".into(),
            n: 1,
            attempt: 9,
            drv_path: "/nix/store/x.drv".into(),
            aterm: String::new(),
            inputs: vec![],
        };
        let _ = cmds.send(DriverCmd::Assign(Box::new(job)));
        match rx.recv().await {
            Some(DriverEvent::Done {
                build: 7, attempt: 9, result: AttemptResult::Retry { count: false, .. }, ..
            }) => {}
            other => unreachable!("{other:?}"),
        }
        assert!(t0.elapsed() < ms(1750 + 2000), "the job came back before the next try");
        drop(cmds);
        let _ = task.await;
    }

    #[test]
    fn host_backoff_is_60s_times_3_to_the_n_with_jitter_capped() {
        let b = Backoff::hosts(Duration::from_secs(60));
        for (n, base) in [(0u32, 60u64), (1, 180), (2, 540), (3, 1620), (4, 3600), (40, 3600)] {
            let d = b.delay(n);
            let base = Duration::from_secs(base);
            assert!(d >= base && d <= base.mul_f64(1.1), "failure {n}: {d:?}");
        }
        let local = Backoff::local();
        assert_eq!(
            (local.delay(0), local.delay(3), local.delay(20)),
            (Duration::from_millis(250), Duration::from_secs(2), Duration::from_secs(30))
        );
    }
}
