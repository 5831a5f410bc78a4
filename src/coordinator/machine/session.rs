//! One session with an agent: a loop that reads the agent's frames, the core's commands and the
//! results of work done beside it, one method per message. Nothing slow runs in the loop: cache
//! lookups, finishing a received NAR, publishing outputs run as tasks that report back as
//! [`Work`]; logs are written and compressed by the session's log thread; inputs are sent, in
//! order (references first), by its input thread. So a large output being published never stops
//! another build on the machine from being read, recorded or pinged for.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::checks::{self, Received, Transfer};
use super::inputs::{Input, Inputs};
use super::{AttemptResult, Driver, DriverCmd, DriverEvent, SessionEnd, rejected, store_failure};
use crate::api::{AttemptStatus, OutputInfo};
use crate::cache::{self, Cache, StagedNar};
use crate::coordinator::logs;
use crate::coordinator::queue::BuildId;
use crate::coordinator::transport;
use crate::db::Job;
use crate::formats::derivation::Derivation;
use crate::formats::hash::Hash;
use crate::formats::host_key::HostPublicKey;
use crate::formats::narinfo::NarInfo;
use crate::formats::signing::Signature;
use crate::protocol::{BuiltOutput, Frame, Message, PathMeta};
use crate::substituter::{Found, Substituter};

/// One attempt in flight on this machine.
pub(super) struct Active {
    pub job: Job,
    /// Declared outputs of the derivation: name → path.
    pub expected: BTreeMap<String, String>,
    /// Set once the agent reports success: outputs whose NAR is still to come.
    pub claimed: Vec<BuiltOutput>,
    received: Vec<(OutputInfo, Option<StagedNar>)>,
    /// The derivation's system, for the narinfos.
    system: String,
    /// Whether the `build` message went out (it waits for the cache's closure of the inputs).
    sent: bool,
    /// Inputs sent to the agent that it has not yet added.
    awaiting_inputs: usize,
    /// The input closure as far as the cache knows it, all named in `build`: of these, the agent
    /// gets only the ones it says it lacks.
    pub announced: BTreeSet<String>,
    /// Set while the host takes inputs from its own substituters: what it lacked.
    substituting: Option<Vec<String>>,
    /// Log bytes written so far.
    log_bytes: u64,
    /// Set when the log passed the limit and the build was stopped for it.
    pub log_exceeded: Option<u64>,
}

/// What work done beside the loop reports back, for the attempt `key`.
pub(super) enum Work {
    /// The inputs' closure in the cache: the `build` message can go.
    Announced { key: String, announced: BTreeSet<String> },
    /// What the cache has of the inputs the agent lacks (in order, references first) and what it
    /// has not.
    /// `upstream`: what the cache lacks that a substituter has (in order, references first), to be
    /// sent as it is taken into the cache.
    Resolved {
        key: String,
        missing: Vec<String>,
        infos: Vec<NarInfo>,
        lacking: Vec<String>,
        upstream: Option<(Arc<Substituter>, Vec<Arc<Found>>)>,
    },
    /// An output's NAR arrived whole (or not).
    Received { key: String, meta: PathMeta, result: std::io::Result<Received> },
    /// The attempt's outputs are published (or not).
    Published { key: String, result: AttemptResult },
}

type Step = Result<(), SessionEnd>;

fn closed() -> SessionEnd {
    SessionEnd::Lost { error: "the agent closed its input".into(), was_up: true }
}

/// The state of a connected session.
pub(super) struct Live<'d> {
    d: &'d Driver,
    tx: transport::Outbox,
    trusted: Vec<HostPublicKey>,
    store_dirs: Vec<String>,
    active: HashMap<String, Active>,
    by_build: HashMap<BuildId, String>,
    transfers: HashMap<u64, Transfer>,
    /// Inputs being sent to the agent: transfer → (attempt key, path).
    uploads: HashMap<u64, (String, String)>,
    next_upload: u64,
    work: mpsc::UnboundedSender<Work>,
    logs: Logs,
    inputs: Option<Inputs>,
}

impl Driver {
    /// Serve a connected session until it breaks or the core goes away. Before it returns, every
    /// attempt it ended has been reported (its log closed first).
    pub(super) async fn serve(
        &self,
        mut session: transport::Session,
        cmds: &mut mpsc::UnboundedReceiver<DriverCmd>,
    ) -> SessionEnd {
        for note in &session.notes {
            tracing::info!(machine = %self.name, "{note}");
        }
        let facts = session.facts.clone();
        let trusted = if self.trusted.is_empty() {
            match HostPublicKey::parse(&facts.signing_key) {
                Ok(k) => vec![k],
                Err(e) => return super::lost(format!("the agent's signing key: {e}")),
            }
        } else {
            self.trusted.clone()
        };
        let store_dirs = facts.store_dirs.clone();
        if self.events.send(DriverEvent::Up { machine: self.index, facts }).is_err() {
            return SessionEnd::CoreGone;
        }
        let (work, mut work_rx) = mpsc::unbounded_channel();
        let mut live = Live {
            d: self,
            tx: session.tx.clone(),
            trusted,
            store_dirs,
            active: HashMap::new(),
            by_build: HashMap::new(),
            transfers: HashMap::new(),
            uploads: HashMap::new(),
            next_upload: 0,
            work,
            logs: Logs::start(self.name.clone(), self.events.clone(), self.log_written.clone()),
            inputs: self.cache.clone().map(|c| Inputs::start(c, session.tx.clone(), self.name.clone())),
        };
        let mut ping = tokio::time::interval(self.ping);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        let end = loop {
            let step = tokio::select! {
                _ = ping.tick() => live.send(Message::Ping {}),
                cmd = cmds.recv() => match cmd {
                    None => break SessionEnd::CoreGone,
                    Some(DriverCmd::Assign(job)) => live.assign(*job).await,
                    Some(DriverCmd::Cancel(build)) => live.cancel(build).await,
                },
                frame = session.rx.recv() => match frame {
                    None => break SessionEnd::Lost { error: "the agent exited".into(), was_up: true },
                    Some(Err(error)) => break SessionEnd::Lost { error: error.to_string(), was_up: true },
                    Some(Ok(frame)) => live.frame(frame).await,
                },
                Some(work) = work_rx.recv() => live.work(work).await,
            };
            if let Err(end) = step {
                break end;
            }
        };
        live.logs.finish().await;
        end
    }
}

impl Live<'_> {
    /// Queue a message for the agent (never waits: see [`transport::Outbox`]).
    fn send(&self, message: Message) -> Step {
        self.tx.send(Frame::new(message)).map_err(|_| closed())
    }

    /// End an attempt: its log is closed (on the log thread), then the core hears of it.
    async fn end(&mut self, key: &str, result: AttemptResult) {
        let Some(a) = self.active.remove(key) else { return };
        self.by_build.remove(&a.job.build);
        self.transfers.retain(|_, t| t.key != key);
        let done = DriverEvent::Done { machine: self.d.index, build: a.job.build, attempt: a.job.attempt, result };
        let plain = logs::plain_path(&self.d.state_dir, &a.job.uuid, a.job.n);
        self.logs.close(key.to_owned(), plain, done).await;
    }

    async fn assign(&mut self, job: Job) -> Step {
        let key = format!("{}/{}", job.uuid, job.n);
        let (expected, system) = match Derivation::parse(job.aterm.as_bytes()) {
            Ok(d) => (d.outputs.into_iter().map(|(n, o)| (n, o.path)).collect(), d.system),
            Err(e) => {
                let reason = format!("stored derivation does not parse: {e}");
                let status = AttemptStatus::SetupFailure;
                self.d.report(job.build, job.attempt, AttemptResult::Failed { status, reason });
                return Ok(());
            }
        };
        let store_dir = job.drv_path.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
        if !self.store_dirs.contains(&store_dir) {
            self.d.report(job.build, job.attempt, AttemptResult::StoreDirRefused { store_dir });
            return Ok(());
        }
        self.logs.open(key.clone(), logs::plain_path(&self.d.state_dir, &job.uuid, job.n)).await;
        self.by_build.insert(job.build, key.clone());
        // Name the inputs' whole closure (what the cache knows of it), so that the agent's answer
        // lists every path it lacks and no other is sent.
        let inputs = job.inputs.clone();
        self.active.insert(
            key.clone(),
            Active {
                job,
                expected,
                claimed: Vec::new(),
                received: Vec::new(),
                system,
                sent: false,
                awaiting_inputs: 0,
                announced: BTreeSet::new(),
                substituting: None,
                log_bytes: 0,
                log_exceeded: None,
            },
        );
        match &self.d.cache {
            Some(c) => {
                let (c, work, name) = (c.clone(), self.work.clone(), self.d.name.clone());
                tokio::task::spawn_blocking(move || {
                    let announced = c.with_closure(&inputs).unwrap_or_else(|e| {
                        tracing::error!(machine = %name, "reading the cache: {e}");
                        inputs.iter().cloned().collect()
                    });
                    let _ = work.send(Work::Announced { key, announced });
                });
                Ok(())
            }
            None => self.announced(key, inputs.into_iter().collect()).await,
        }
    }

    async fn announced(&mut self, key: String, announced: BTreeSet<String>) -> Step {
        let Some(a) = self.active.get_mut(&key) else { return Ok(()) };
        a.announced = announced;
        a.sent = true;
        let message = Message::Build {
            build: key,
            drv_path: a.job.drv_path.clone(),
            drv: a.job.aterm.clone(),
            inputs: a.announced.iter().cloned().collect(),
            max_silent_secs: self.d.max_silent_secs,
            timeout_secs: self.d.timeout_secs,
            cores: None,
        };
        self.send(message)
    }

    async fn cancel(&mut self, build: BuildId) -> Step {
        let Some(key) = self.by_build.get(&build).cloned() else { return Ok(()) };
        if self.active.get(&key).is_some_and(|a| a.sent) {
            // The agent's `finished` (canceled) ends it.
            let _ = self.send(Message::Cancel { build: key });
        } else {
            self.end(&key, AttemptResult::Canceled).await;
        }
        Ok(())
    }

    async fn work(&mut self, work: Work) -> Step {
        match work {
            Work::Announced { key, announced } => self.announced(key, announced).await,
            Work::Resolved { key, missing, infos, lacking, upstream } => {
                self.resolved(key, missing, infos, lacking, upstream).await
            }
            Work::Received { key, meta, result } => {
                self.received(key, meta, result).await;
                Ok(())
            }
            Work::Published { key, result } => {
                self.end(&key, result).await;
                Ok(())
            }
        }
    }

    async fn frame(&mut self, frame: Frame) -> Step {
        match frame.message {
            Message::Inputs { build, missing } => self.inputs(build, missing).await,
            Message::Substituted { build, added, error } => self.substituted(build, added, error).await,
            Message::PathAdded { transfer, .. } => self.path_added(transfer).await,
            Message::Error { message, transfer: Some(transfer), .. } if self.uploads.contains_key(&transfer) => {
                self.input_refused(transfer, message).await
            }
            Message::Started { .. } => Ok(()),
            Message::Pong { load1, free_space } => {
                let _ = self.d.events.send(DriverEvent::Load { machine: self.d.index, load1, free_space });
                Ok(())
            }
            Message::Log { build, .. } => self.log(build, frame.payload).await,
            Message::Finished { build, status, outputs } => {
                if let Some(a) = self.active.get_mut(&build)
                    && let Some(result) = checks::finished(a, status, outputs, &self.trusted)
                {
                    self.end(&build, result).await;
                }
                Ok(())
            }
            Message::NarStart { transfer, build: Some(build), meta } => {
                self.nar_start(transfer, build, meta).await;
                Ok(())
            }
            Message::NarChunk { transfer, .. } => {
                if let Some(t) = self.transfers.get_mut(&transfer) {
                    // A failed send: the staging thread stopped; its error comes at the end.
                    let _ = t.chunks.send(frame.payload).await;
                }
                Ok(())
            }
            Message::NarEnd { transfer } => {
                self.nar_end(transfer);
                Ok(())
            }
            Message::Error { message, build: Some(build), .. } => {
                if self.active.contains_key(&build) {
                    let reason = format!("the agent refused the build: {message}");
                    let result = AttemptResult::Retry { status: AttemptStatus::SetupFailure, reason, count: true };
                    self.end(&build, result).await;
                }
                Ok(())
            }
            Message::Error { message, .. } => {
                tracing::warn!(machine = %self.d.name, "agent error: {message}");
                Ok(())
            }
            other => {
                tracing::warn!(machine = %self.d.name, "unexpected message from the agent: {other:?}");
                Ok(())
            }
        }
    }

    /// The agent lacks `missing`: a host with substituters of its own takes them from there
    /// first; the rest comes from the coordinator.
    async fn inputs(&mut self, key: String, missing: Vec<String>) -> Step {
        let own = &self.d.host_substituters;
        let keys = self.d.substituters.as_ref().map(|s| s.get().keys().to_strings()).unwrap_or_default();
        match self.active.get_mut(&key) {
            Some(a) if !own.is_empty() && !missing.is_empty() && !keys.is_empty() => {
                a.substituting = Some(missing.clone());
                let (substituters, paths) = (own.clone(), missing);
                self.send(Message::Substitute { build: key, paths, substituters, keys })
            }
            Some(_) => self.inputs_from_coordinator(key, missing).await,
            None => Ok(()),
        }
    }

    /// The host took what it could from its substituters: the coordinator sends the rest.
    async fn substituted(&mut self, key: String, added: Vec<String>, error: Option<String>) -> Step {
        let Some(missing) = self.active.get_mut(&key).and_then(|a| a.substituting.take()) else { return Ok(()) };
        if let Some(e) = error {
            tracing::warn!(machine = %self.d.name, "its substituters: {e}; the coordinator sends the rest");
        }
        let added: HashSet<&str> = added.iter().map(String::as_str).collect();
        let rest: Vec<String> = missing.into_iter().filter(|p| !added.contains(p.as_str())).collect();
        if rest.is_empty() {
            return self.send(Message::Start { build: key });
        }
        self.inputs_from_coordinator(key, rest).await
    }

    /// What the cache can give the agent it gets (with the references it lacks), looked up beside
    /// the loop; what the cache lacks may come from upstream first.
    async fn inputs_from_coordinator(&mut self, key: String, missing: Vec<String>) -> Step {
        if !self.active.contains_key(&key) {
            return Ok(());
        }
        match &self.d.cache {
            Some(c) if !missing.is_empty() => {
                let (c, work, name) = (c.clone(), self.work.clone(), self.d.name.clone());
                let substituter = self.d.substituters.as_ref().map(|s| s.get()).filter(|s| !s.is_empty());
                tokio::task::spawn_blocking(move || {
                    let closure = |missing: &[String]| {
                        c.closure(missing).unwrap_or_else(|e| {
                            tracing::error!(machine = %name, "reading the cache: {e}");
                            (Vec::new(), missing.to_vec())
                        })
                    };
                    let (mut infos, mut lacking) = closure(&missing);
                    let mut upstream = None;
                    // What the cache lacks may come from upstream; if not, it counts as missing (and
                    // is built).
                    let in_dir: Vec<String> =
                        lacking.iter().filter(|p| c.store_dir().parse_path(p).is_ok()).cloned().collect();
                    if let (Some(s), false) = (substituter, in_dir.is_empty()) {
                        match s.closure(&in_dir, |p| c.has(p)) {
                            // All of it is upstream: sent to the host as it is taken into the cache,
                            // with what the cache has of its references.
                            Ok(found) if in_dir.len() == lacking.len() => {
                                let theirs: HashSet<String> = found.iter().map(|f| f.path()).collect();
                                let refs: BTreeSet<String> = found
                                    .iter()
                                    .flat_map(|f| f.info.references.iter().map(|r| f.info.store_dir.display(r)))
                                    .filter(|r| !theirs.contains(r))
                                    .collect();
                                let (more, still) = closure(&refs.into_iter().collect::<Vec<_>>());
                                if still.is_empty() {
                                    let sd = c.store_dir();
                                    let known: HashSet<String> =
                                        infos.iter().map(|i| sd.display(&i.store_path)).collect();
                                    infos.extend(
                                        more.into_iter().filter(|i| !known.contains(&sd.display(&i.store_path))),
                                    );
                                    lacking.clear();
                                    upstream = Some((s, found));
                                }
                            }
                            // Some of it no upstream has (it is built): what upstream has is taken
                            // into the cache meanwhile, for next time.
                            _ => {
                                let have: Vec<String> = s.query(&in_dir).into_keys().collect();
                                if !have.is_empty() {
                                    match s.substitute(&have, &c) {
                                        Ok(got) => {
                                            tracing::info!(machine = %name, "{} paths from substituters", got.len());
                                            (infos, lacking) = closure(&missing);
                                        }
                                        Err(e) => tracing::warn!(
                                            machine = %name,
                                            "inputs from substituters: {e}; they will be built"
                                        ),
                                    }
                                }
                            }
                        }
                    }
                    let _ = work.send(Work::Resolved { key, missing, infos, lacking, upstream });
                });
                Ok(())
            }
            _ => {
                let lacking = missing.clone();
                self.resolved(key, missing, Vec::new(), lacking, None).await
            }
        }
    }

    /// Send what the cache has, then what comes from upstream; the build starts once every one is
    /// added. What the agent was asked about and did not list, it has.
    async fn resolved(
        &mut self,
        key: String,
        missing: Vec<String>,
        infos: Vec<NarInfo>,
        lacking: Vec<String>,
        upstream: Option<(Arc<Substituter>, Vec<Arc<Found>>)>,
    ) -> Step {
        let Some(a) = self.active.get_mut(&key) else { return Ok(()) };
        let listed: HashSet<&str> = missing.iter().map(String::as_str).collect();
        let unneeded = |p: &str| a.announced.contains(p) && !listed.contains(p);
        let sd = self.d.cache.as_ref().map(|c| c.store_dir().clone());
        let infos: Vec<NarInfo> =
            infos.into_iter().filter(|i| sd.as_ref().is_none_or(|sd| !unneeded(&sd.display(&i.store_path)))).collect();
        let lacking: Vec<String> = lacking.into_iter().filter(|p| !unneeded(p)).collect();
        // Upstream paths the host has are still taken into the cache (it keeps whole closures).
        let (from, upstream): (_, Vec<(Arc<Found>, bool)>) = match upstream {
            Some((from, found)) => (Some(from), found.into_iter().map(|f| (f.clone(), !unneeded(&f.path()))).collect()),
            None => (None, Vec::new()),
        };
        if !lacking.is_empty() {
            let _ = self.send(Message::Cancel { build: key.clone() });
            self.end(&key, AttemptResult::MissingInputs { paths: lacking }).await;
            return Ok(());
        }
        let sends = infos.len() + upstream.iter().filter(|(_, send)| *send).count();
        let (Some(inputs), Some(sd), false) = (&self.inputs, sd, sends == 0) else {
            return self.send(Message::Start { build: key });
        };
        a.awaiting_inputs = sends;
        let bytes = infos.iter().map(|i| i.nar_size).sum::<u64>()
            + upstream.iter().filter(|(_, send)| *send).map(|(f, _)| f.info.nar_size).sum::<u64>();
        let _ = self.d.events.send(DriverEvent::Sending { bytes });
        for info in infos {
            self.next_upload += 1;
            self.uploads.insert(self.next_upload, (key.clone(), sd.display(&info.store_path)));
            inputs.send(Input::Cached(Box::new(info), self.next_upload));
        }
        if let Some(from) = from {
            for (found, send) in upstream {
                let transfer = send.then(|| {
                    self.next_upload += 1;
                    self.uploads.insert(self.next_upload, (key.clone(), found.path()));
                    self.next_upload
                });
                inputs.send(Input::Upstream { found, from: from.clone(), transfer });
            }
        }
        Ok(())
    }

    async fn path_added(&mut self, transfer: u64) -> Step {
        if let Some(inputs) = &self.inputs {
            // Its bytes were right after all (the host had it, or only the cache failed).
            inputs.abandoned.take(transfer);
        }
        if let Some((key, _)) = self.uploads.remove(&transfer)
            && let Some(a) = self.active.get_mut(&key)
        {
            a.awaiting_inputs -= 1;
            if a.awaiting_inputs == 0 {
                return self.send(Message::Start { build: key });
            }
        }
        Ok(())
    }

    async fn input_refused(&mut self, transfer: u64, message: String) -> Step {
        let abandoned = self.inputs.as_ref().and_then(|i| i.abandoned.take(transfer));
        if let Some((key, path)) = self.uploads.remove(&transfer)
            && self.active.contains_key(&key)
        {
            let _ = self.send(Message::Cancel { build: key.clone() });
            if let Some(why) = abandoned {
                // Upstream failed while sending it: not the host's fault; it is built instead.
                tracing::info!(machine = %self.d.name, "{path}: not from substituters ({why}): it goes to be built");
                self.end(&key, AttemptResult::MissingInputs { paths: vec![path] }).await;
                return Ok(());
            }
            let reason = format!("the agent refused input {path}: {message}");
            self.end(&key, AttemptResult::Retry { status: AttemptStatus::SetupFailure, reason, count: true }).await;
        }
        Ok(())
    }

    /// Past the limit the log is cut and the build stopped, as Nix's max-build-log-size does: a
    /// runaway build must not fill the disk.
    async fn log(&mut self, key: String, mut bytes: Vec<u8>) -> Step {
        let Some(a) = self.active.get_mut(&key) else { return Ok(()) };
        if a.log_exceeded.is_some() {
            return Ok(());
        }
        let over = self.d.max_log_size.filter(|&max| a.log_bytes + bytes.len() as u64 > max);
        if let Some(max) = over {
            bytes.truncate((max - a.log_bytes) as usize);
            a.log_exceeded = Some(max);
            bytes.extend_from_slice(
                format!("\ngbc: the log passed {max} bytes (--max-log-size): the build was stopped\n").as_bytes(),
            );
        }
        a.log_bytes += bytes.len() as u64;
        self.logs.write(key.clone(), bytes).await;
        if over.is_some() {
            self.send(Message::Cancel { build: key })?;
        }
        Ok(())
    }

    async fn nar_start(&mut self, transfer: u64, key: String, meta: PathMeta) {
        let Some(a) = self.active.get(&key) else { return };
        if !a.claimed.iter().any(|o| o.meta == meta) || self.transfers.contains_key(&transfer) {
            let reason = format!("the agent sent a NAR for {} that it did not claim as an output", meta.path);
            return self.end(&key, rejected(reason)).await;
        }
        match checks::possible_references(a, &meta, self.d.cache.as_deref()) {
            Ok(candidates) => {
                let t = checks::receive(self.d.cache.clone(), key, meta, candidates);
                self.transfers.insert(transfer, t);
            }
            Err(rejection) => self.end(&key, rejection).await,
        }
    }

    /// The NAR is complete: its staging thread finishes (beside the loop) and says what it got.
    fn nar_end(&mut self, transfer: u64) {
        let Some(Transfer { key, meta, chunks, done }) = self.transfers.remove(&transfer) else { return };
        if !self.active.contains_key(&key) {
            return;
        }
        drop(chunks);
        let work = self.work.clone();
        tokio::spawn(async move {
            let result = done.await.unwrap_or_else(|_| Err(std::io::Error::other("the thread storing it stopped")));
            let _ = work.send(Work::Received { key, meta, result });
        });
    }

    async fn received(&mut self, key: String, meta: PathMeta, result: std::io::Result<Received>) {
        let Some(a) = self.active.get_mut(&key) else { return };
        let staged = match result {
            Ok(r) => checks::check_received(&meta, r),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(rejected(format!("the host sent {} as bytes that are not a NAR: {e}", meta.path)))
            }
            Err(e) => Err(store_failure(&format!("could not store the NAR of {}", meta.path), &e)),
        };
        let staged = match staged {
            Ok(s) => s,
            Err(result) => return self.end(&key, result).await,
        };
        let Some(o) = a.claimed.iter().find(|o| o.meta == meta) else { return };
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
            let (cache, work, name) = (self.d.cache.clone(), self.work.clone(), self.d.name.clone());
            let (drv_path, system) = (a.job.drv_path.clone(), a.system.clone());
            tokio::spawn(async move {
                let result = publish(cache, &name, drv_path, system, received).await;
                let _ = work.send(Work::Published { key, result });
            });
        }
    }
}

/// Publish a build's verified outputs in the cache (on a blocking thread); the attempt succeeds
/// only once they are stored.
async fn publish(
    cache: Option<Arc<Cache>>,
    machine: &str,
    drv_path: String,
    system: String,
    received: Vec<(OutputInfo, Option<StagedNar>)>,
) -> AttemptResult {
    let outputs: Vec<OutputInfo> = received.iter().map(|(o, _)| o.clone()).collect();
    let Some(cache) = cache else { return AttemptResult::Success { outputs } };
    let mut staged = Vec::new();
    for (o, s) in received {
        let Some(s) = s else { continue };
        let Ok(nar_hash) = Hash::parse(&o.nar_hash) else {
            return rejected(format!("output {}: unreadable hash", o.name));
        };
        // A Nix key's signature (checked with the others) is kept beside the cache's; a Guix key's
        // has no place in a narinfo (its one `Signature:` is the cache's).
        let signatures = Signature::parse(&o.signature).into_iter().collect();
        let out = cache::Output {
            path: o.path,
            nar_hash,
            nar_size: o.nar_size,
            references: o.references,
            deriver: Some(drv_path.clone()),
            system: Some(system.clone()),
            signatures,
            cache_signs: true,
            ca: None,
        };
        staged.push((out, s));
    }
    if staged.is_empty() {
        return AttemptResult::Success { outputs };
    }
    // Every reference must be in the cache or among these outputs; otherwise the narinfo would
    // wait in `.pending/` for a path nobody is going to send.
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
            tracing::debug!(machine = %machine, "published {}", published.join(" "));
            AttemptResult::Success { outputs }
        }
        Ok(Ok(Err(reason))) => AttemptResult::Failed { status: AttemptStatus::MissingReference, reason },
        Ok(Err(e)) => store_failure("could not publish the outputs", &e),
        Err(e) => AttemptResult::Retry { status: AttemptStatus::StoreFailure, reason: e.to_string(), count: true },
    }
}

enum LogOp {
    Open(String, PathBuf),
    Write(String, Vec<u8>),
    /// Close and compress the log, then tell the core the attempt ended.
    Close(String, PathBuf, DriverEvent),
}

/// The session's log thread: it creates, writes (flushing each piece, so `gbc log` can follow)
/// and compresses the attempts' logs, off the runtime, in the order the loop sends them.
struct Logs {
    tx: Option<mpsc::Sender<LogOp>>,
    done: Option<oneshot::Receiver<()>>,
}

impl Logs {
    fn start(machine: String, events: mpsc::UnboundedSender<DriverEvent>, written: Arc<tokio::sync::Notify>) -> Logs {
        let (tx, mut rx) = mpsc::channel::<LogOp>(256);
        let (done_tx, done) = oneshot::channel();
        std::thread::spawn(move || {
            let mut files: HashMap<String, BufWriter<File>> = HashMap::new();
            while let Some(op) = rx.blocking_recv() {
                match op {
                    LogOp::Open(key, path) => match logs::create(&path) {
                        Ok(f) => {
                            files.insert(key, f);
                        }
                        Err(e) => tracing::error!(machine = %machine, "{}: {e}", path.display()),
                    },
                    LogOp::Write(key, bytes) => {
                        if let Some(f) = files.get_mut(&key)
                            && let Err(e) = f.write_all(&bytes).and_then(|()| f.flush())
                        {
                            tracing::error!(machine = %machine, "log of {key}: {e}");
                            files.remove(&key);
                        }
                        written.notify_waiters();
                    }
                    LogOp::Close(key, plain, event) => {
                        if let Some(mut f) = files.remove(&key) {
                            let _ = f.flush();
                        }
                        if let Err(e) = logs::compress(&plain) {
                            tracing::error!(machine = %machine, "compressing {}: {e}", plain.display());
                        }
                        written.notify_waiters();
                        let _ = events.send(event);
                    }
                }
            }
            let _ = done_tx.send(());
        });
        Logs { tx: Some(tx), done: Some(done) }
    }

    async fn op(&self, op: LogOp) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(op).await;
        }
    }

    async fn open(&self, key: String, path: PathBuf) {
        self.op(LogOp::Open(key, path)).await;
    }

    async fn write(&self, key: String, bytes: Vec<u8>) {
        self.op(LogOp::Write(key, bytes)).await;
    }

    async fn close(&self, key: String, plain: PathBuf, then: DriverEvent) {
        self.op(LogOp::Close(key, plain, then)).await;
    }

    /// Wait until everything sent is written and every ended attempt reported.
    async fn finish(&mut self) {
        self.tx = None;
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}
