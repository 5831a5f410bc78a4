//! `gbc coordinator`: the durable queue, allocation, and the machines' drivers.
//!
//! Tasks: the core ([`Core`]) owns the in-memory queue and the machines' slots and is the only
//! writer of build state; the client server (`server`) accepts connections on the Unix socket;
//! one driver (`machine`) per machine talks to its agent. They talk through channels; the
//! database is the truth, so a crash at any point loses nothing (see ARCHITECTURE.md).

mod http;
pub use http::HttpLimits;
pub mod logs;
pub mod machine;
pub mod probe;
pub mod queue;
mod server;
pub mod submit;
pub mod transport;
mod upload;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::api::{AttemptStatus, BuildState, Event, MachineInfo, NoMachine, Stats, now_ms};
use crate::db::{AttemptEnd, BuildChange, Db, Submission, SubmitOutcome};
use crate::formats::signing::PublicKey;
use crate::protocol::HostFacts;
use machine::{AttemptResult, Backoff, Driver, DriverCmd, DriverEvent};
use queue::{BuildId, Capabilities, Queue, Slot};
use transport::Transport;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Parallel builds of the built-in local machine (default: this host's cores).
    pub local_builds: Option<u32>,
    /// Attempts a build gets when setups fail or machines are lost, before it fails.
    pub max_attempts: u32,
    /// How long running builds may go on after SIGINT/SIGTERM before they are put back in the queue.
    pub grace: Duration,
    pub timeout_secs: Option<u64>,
    pub max_silent_secs: Option<u64>,
    /// Stop a build whose log passes this many bytes (None: no limit).
    pub max_log_size: Option<u64>,
    /// The `gbc` binary the local machine runs as its agent (and auto-deploy uploads).
    pub agent_program: PathBuf,
    /// The machines file, re-read when it changes.
    pub machines_file: Option<PathBuf>,
    /// First wait before reconnecting to a lost SSH host (then × 3 per failure).
    pub reconnect_delay: Duration,
    /// SSH keepalive interval; a connection is dropped after 4 unanswered in a row.
    pub ssh_keepalive: Duration,
    /// How often agents are asked for their load.
    pub ping_interval: Duration,
    /// The binary cache: NAR compression, the store dir it serves, and the key narinfos are
    /// signed with (default `<state>/keys/cache.secret`, created on first start).
    pub compression: crate::cache::Compression,
    pub cache_store_dir: String,
    pub cache_key: Option<PathBuf>,
    /// Where to serve the cache, metrics and a status page over HTTP.
    pub http: Option<std::net::SocketAddr>,
    pub http_limits: HttpLimits,
}

/// The cache's signing key: the one given, or `<state>/keys/cache.secret`, created (with
/// `cache.public` beside it) on first start.
pub fn cache_key(config: &Config) -> anyhow::Result<crate::formats::signing::SecretKey> {
    if let Some(path) = &config.cache_key {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        return crate::formats::signing::SecretKey::parse(&text)
            .with_context(|| format!("{}: not a secret key", path.display()));
    }
    let keys = config.state_dir.join("keys");
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    let key = crate::agent::load_or_create_key(&keys.join("cache.secret"), &format!("{host}-gbc-1"))?;
    let public = keys.join("cache.public");
    let line = format!("{}\n", key.public());
    if std::fs::read_to_string(&public).ok().as_deref() != Some(line.as_str()) {
        crate::store::write_atomically(&public, line.as_bytes())?;
    }
    Ok(key)
}

/// A machine the coordinator allocates to.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineSpec {
    pub name: String,
    pub caps: Capabilities,
    pub parallel: u32,
    pub speed: f64,
    /// No new build while load1 / cores is above this.
    pub max_load: Option<f64>,
    /// No new build while the agent's store has fewer free bytes.
    pub min_free_disk: Option<u64>,
    pub transport: Transport,
    /// Keys accepted on its outputs; empty: the key its agent announces (local machine only).
    pub trusted: Vec<PublicKey>,
    pub backoff: Backoff,
}

impl MachineSpec {
    /// Whether a change from `self` to `new` needs a new session (else it applies in place).
    fn same_session(&self, new: &MachineSpec) -> bool {
        self.transport == new.transport && self.trusted == new.trusted && self.backoff == new.backoff
    }
}

/// Requests to the core.
pub(crate) enum Command {
    /// The outcome, and the new builds no machine can take.
    Submit(Box<Submission>, oneshot::Sender<anyhow::Result<(SubmitOutcome, Vec<NoMachine>)>>),
    /// Why no machine can build this system with these features (None: one can).
    NoMachine(String, BTreeSet<String>, oneshot::Sender<Option<String>>),
    Cancel(String, oneshot::Sender<Result<(), String>>),
    Machines(oneshot::Sender<Vec<MachineInfo>>),
    Stats(oneshot::Sender<Stats>, bool),
    /// The machines file changed: the machines it now lists.
    Reload(Vec<MachineSpec>),
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connecting,
    Up,
    Down,
}

struct Running {
    attempt: i64,
    canceled: bool,
}

struct MachineState {
    spec: MachineSpec,
    link: Link,
    since_ms: i64,
    facts: Option<HostFacts>,
    last_error: Option<String>,
    running: HashMap<BuildId, Running>,
    /// Taken out of the machines file: no new builds; forgotten once its running builds end.
    retired: bool,
    tx: Option<mpsc::UnboundedSender<DriverCmd>>,
}

impl MachineState {
    /// Whether a build may start there now.
    fn accepts_builds(&self) -> bool {
        if self.link != Link::Up || self.retired || self.tx.is_none() {
            return false;
        }
        self.held_back().is_none()
    }

    /// Why a connected machine takes no new builds now, if it does not: its load or its disk.
    fn held_back(&self) -> Option<String> {
        let f = self.facts.as_ref()?;
        let per_core = f.load1 / f64::from(f.cores.max(1));
        if let Some(max) = self.spec.max_load.filter(|&max| per_core > max) {
            return Some(format!("load {per_core:.2} per core is above max_load {max}"));
        }
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        self.spec
            .min_free_disk
            .filter(|&min| f.free_space < min)
            .map(|min| format!("{:.1} GiB free is below min_free_disk ({:.1} GiB)", gib(f.free_space), gib(min)))
    }
}

/// Attempt ends decided but not yet committed, and the events to send once they are.
#[derive(Default)]
struct Batch {
    ends: Vec<AttemptEnd>,
    events: Vec<Pending>,
    /// Attempts that ended for lack of inputs: (machine, build, attempt, paths), decided before
    /// the batch commits.
    missing: Vec<(usize, BuildId, i64, Vec<String>)>,
}

struct Pending {
    build: BuildId,
    state: BuildState,
    at_ms: i64,
    machine: Option<String>,
    reason: Option<String>,
    retry: bool,
}

/// Identity of an active build, for events.
struct Known {
    uuid: Box<str>,
    drv: Box<str>,
    retries: u32,
}

struct Core {
    config: Config,
    db: Arc<Db>,
    queue: Queue,
    known: HashMap<BuildId, Known>,
    machines: Vec<MachineState>,
    /// Cloned into each new driver.
    drivers: mpsc::UnboundedSender<DriverEvent>,
    cache: Arc<crate::cache::Cache>,
    events: broadcast::Sender<Event>,
    stopping: Option<Instant>,
    stats: Stats,
    alloc_samples: VecDeque<u64>,
}

/// Run a coordinator until SIGINT or SIGTERM.
pub async fn run(config: Config, machines: Vec<MachineSpec>) -> anyhow::Result<()> {
    // The state is the coordinator's alone: its database, build logs (which may hold secrets),
    // keys. Older state dirs are tightened too.
    let private = |path: &std::path::Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("{}", path.display()))
    };
    std::fs::create_dir_all(&config.state_dir).with_context(|| format!("{}", config.state_dir.display()))?;
    private(&config.state_dir, 0o700)?;
    let db_path = config.state_dir.join("gbc.sqlite");
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // SQLite gives its -wal and -shm files the database file's mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&db_path)
            .with_context(|| format!("{}", db_path.display()))?;
    }
    private(&db_path, 0o600)?;
    let db = Arc::new(Db::open(&db_path).await?);
    let interrupted = db.recover(now_ms()).await?;
    for (uuid, n) in &interrupted {
        let _ = logs::compress(&logs::plain_path(&config.state_dir, uuid, *n));
    }
    if !interrupted.is_empty() {
        tracing::info!("{} builds that were running when the coordinator stopped are queued again", interrupted.len());
    }
    // The HTTP port is bound before the client socket, so that a coordinator whose socket answers
    // takes HTTP connections too (they wait in the backlog until it serves them).
    let http_listener = match config.http {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--http {addr}"))?),
        None => None,
    };
    let listener = server::bind(&config.socket)?;
    let store_dir = crate::formats::store_path::StoreDir::new(&config.cache_store_dir)
        .with_context(|| format!("cache store dir {}", config.cache_store_dir))?;
    let cache = Arc::new(
        crate::cache::Cache::open(&config.state_dir.join("cache"), store_dir, cache_key(&config)?, config.compression)
            .context("opening the binary cache")?,
    );

    let (events, _) = broadcast::channel(16 * 1024);
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(1024);
    let (drv_tx, drv_rx) = mpsc::unbounded_channel::<DriverEvent>();
    let mut core = Core {
        config: config.clone(),
        db: db.clone(),
        queue: Queue::new(),
        known: HashMap::new(),
        machines: Vec::new(),
        drivers: drv_tx,
        cache,
        events: events.clone(),
        stopping: None,
        stats: Stats::default(),
        alloc_samples: VecDeque::new(),
    };
    for spec in machines {
        core.add_machine(spec);
    }

    for b in db.load_queue().await? {
        core.queue.insert(b.id, b.priority, &b.system, &b.features, &b.deps);
        core.known.insert(b.id, Known { uuid: b.uuid.into(), drv: b.drv.into(), retries: b.retries });
    }
    tracing::info!("coordinator: {} builds queued; listening on {}", core.queue.queued_len(), config.socket.display());

    let _watcher = match &config.machines_file {
        Some(path) => Some(watch_machines(path.clone(), config.clone(), cmd_tx.clone())?),
        None => None,
    };
    let http_task = match http_listener {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!("serving the cache and metrics on http://{addr}");
            }
            let h = http::Http::new(
                config.state_dir.join("cache"),
                config.cache_store_dir.clone(),
                db.clone(),
                cmd_tx.clone(),
                config.http_limits,
            );
            Some(tokio::spawn(http::serve(Arc::new(h), listener)))
        }
        None => None,
    };
    let srv = server::Server {
        requests: tokio::sync::Semaphore::new(server::REQUEST_MEMORY / server::REQUEST_PIECE),
        db,
        cache: core.cache.clone(),
        commands: cmd_tx.clone(),
        events,
        state_dir: config.state_dir.clone(),
    };
    let server_task = tokio::spawn(server::serve(Arc::new(srv), listener));
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stopping: no new builds start; running builds get {:?} to finish", config.grace);
        let _ = cmd_tx.send(Command::Shutdown).await;
    });
    let result = core.run(cmd_rx, drv_rx).await;
    server_task.abort();
    signals.abort();
    if let Some(t) = http_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&core.config.socket);
    result
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

impl Core {
    async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut drivers: mpsc::UnboundedReceiver<DriverEvent>,
    ) -> anyhow::Result<()> {
        loop {
            let deadline = self.stopping.map(|s| tokio::time::Instant::from_std(s + self.config.grace));
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await?,
                    None => return Ok(()),
                },
                ev = drivers.recv() => match ev {
                    Some(ev) => {
                        // Take every event already waiting: their attempt ends share one commit.
                        let mut batch = Batch::default();
                        self.driver_event(ev, &mut batch);
                        while batch.ends.len() < 256 {
                            let Ok(ev) = drivers.try_recv() else { break };
                            self.driver_event(ev, &mut batch);
                        }
                        self.commit(batch).await?;
                    }
                    None => return Ok(()),
                },
                _ = sleep_until_opt(deadline) => {
                    self.requeue_running("the coordinator stopped before the build finished").await?;
                    return Ok(());
                }
            }
            if self.stopping.is_some() {
                if self.machines.iter().all(|m| m.running.is_empty()) {
                    return Ok(());
                }
            } else {
                self.allocate().await?;
            }
        }
    }

    async fn command(&mut self, cmd: Command) -> anyhow::Result<()> {
        match cmd {
            Command::Submit(sub, reply) => {
                let outcome = self.db.submit(*sub).await;
                let mut no_machine = Vec::new();
                if let Ok(o) = &outcome {
                    let now = now_ms();
                    for b in &o.created {
                        if let Some(reason) = self.why_no_machine(&b.system, &b.features) {
                            no_machine.push(NoMachine { build: b.uuid.clone(), drv: b.drv.clone(), reason });
                        }
                        self.queue.insert(b.id, b.priority, &b.system, &b.features, &b.deps);
                        self.known.insert(
                            b.id,
                            Known { uuid: b.uuid.as_str().into(), drv: b.drv.as_str().into(), retries: 0 },
                        );
                        self.emit(b.id, BuildState::Queued, now, None, None, false);
                    }
                }
                let _ = reply.send(outcome.map(|o| (o, no_machine)));
            }
            Command::NoMachine(system, features, reply) => {
                let _ = reply.send(self.why_no_machine(&system, &features));
            }
            Command::Cancel(uuid, reply) => {
                let r = self.cancel(&uuid).await?;
                let _ = reply.send(r);
            }
            Command::Machines(reply) => {
                let _ = reply.send(self.machine_infos());
            }
            Command::Stats(reply, reset) => {
                let mut s = self.stats.clone();
                s.queued = self.queue.queued_len() as u64;
                s.running = self.machines.iter().map(|m| m.running.len() as u64).sum();
                let mut v: Vec<u64> = self.alloc_samples.iter().copied().collect();
                v.sort_unstable();
                s.alloc_samples = v.len() as u64;
                s.alloc_p50_us = percentile(&v, 50);
                s.alloc_p99_us = percentile(&v, 99);
                let _ = reply.send(s);
                if reset {
                    self.alloc_samples.clear();
                }
            }
            Command::Reload(specs) => self.reload(specs),
            Command::Shutdown => {
                if self.stopping.is_none() {
                    self.stopping = Some(Instant::now());
                }
            }
        }
        Ok(())
    }

    fn emit(
        &self,
        id: BuildId,
        state: BuildState,
        at_ms: i64,
        machine: Option<&str>,
        reason: Option<String>,
        retry: bool,
    ) {
        let Some(k) = self.known.get(&id) else { return };
        let _ = self.events.send(Event {
            build: k.uuid.to_string(),
            drv: k.drv.to_string(),
            state,
            at_ms,
            machine: machine.map(str::to_owned),
            reason,
            retry,
            snapshot: false,
        });
    }

    /// Start as many builds as free machines can take, recording the attempts in one transaction.
    async fn allocate(&mut self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let mut picks: Vec<(BuildId, usize)> = Vec::new();
        {
            let up: Vec<usize> = (0..self.machines.len()).filter(|&i| self.machines[i].accepts_builds()).collect();
            let mut slots: Vec<Slot<'_>> = up
                .iter()
                .map(|&i| {
                    let m = &self.machines[i];
                    Slot {
                        name: &m.spec.name,
                        caps: &m.spec.caps,
                        running: m.running.len() as u32,
                        parallel: m.spec.parallel,
                        speed: m.spec.speed,
                    }
                })
                .collect();
            while picks.len() < 512 {
                let Some(p) = self.queue.pick(&slots) else { break };
                slots[p.machine].running += 1;
                picks.push((p.build, up[p.machine]));
            }
        }
        if picks.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let request = picks.iter().map(|&(b, m)| (b, self.machines[m].spec.name.clone())).collect();
        let jobs = self.db.start_attempts(request, now).await?;
        let per_build = t0.elapsed().as_micros() as u64 / picks.len() as u64;
        for _ in &picks {
            if self.alloc_samples.len() == 10_000 {
                self.alloc_samples.pop_front();
            }
            self.alloc_samples.push_back(per_build);
        }
        self.stats.allocations += picks.len() as u64;
        for (job, &(build, m)) in jobs.into_iter().zip(&picks) {
            let machine = &mut self.machines[m];
            machine.running.insert(build, Running { attempt: job.attempt, canceled: false });
            let name = machine.spec.name.clone();
            if machine.tx.as_ref().is_none_or(|tx| tx.send(DriverCmd::Assign(Box::new(job))).is_err()) {
                anyhow::bail!("the driver of {name} stopped");
            }
            self.emit(build, BuildState::Running, now, Some(&name), None, false);
        }
        Ok(())
    }

    /// Decide what the attempts that lacked inputs mean (the Guix Build Coordinator's missing
    /// inputs behaviour): when a known derivation makes each missing path (and the cache can hold
    /// it), the build waits for builds of those derivations (queued or running ones, else new
    /// ones at its priority) and then runs again; otherwise it fails, naming what nobody can make.
    async fn resolve_missing(&mut self, batch: &mut Batch) -> anyhow::Result<()> {
        for (machine, build, attempt, paths) in std::mem::take(&mut batch.missing) {
            let current =
                self.machines[machine].running.get(&build).is_some_and(|r| r.attempt == attempt && !r.canceled);
            let result = if current {
                self.missing_inputs(build, paths).await?
            } else {
                AttemptResult::Retry {
                    status: AttemptStatus::MissingInputs,
                    reason: missing_reason(&paths),
                    count: false,
                }
            };
            self.attempt_done(machine, build, attempt, result, batch);
        }
        Ok(())
    }

    async fn missing_inputs(&mut self, build: BuildId, paths: Vec<String>) -> anyhow::Result<AttemptResult> {
        let (cacheable, elsewhere): (Vec<String>, Vec<String>) =
            paths.into_iter().partition(|p| self.cache.store_dir().parse_path(p).is_ok());
        if !elsewhere.is_empty() {
            let reason = format!(
                "missing inputs outside the cache's store dir {}: {}",
                self.cache.store_dir(),
                elsewhere.join(" ")
            );
            return Ok(AttemptResult::Failed { status: AttemptStatus::MissingInputs, reason });
        }
        let mut nobody = Vec::new();
        let mut drvs = std::collections::BTreeSet::new();
        for (path, drv) in self.db.providers(cacheable.clone()).await? {
            match drv {
                Some(d) => {
                    drvs.insert(d);
                }
                None => nobody.push(path),
            }
        }
        if !nobody.is_empty() {
            nobody.sort();
            let reason = format!("missing inputs that no known derivation makes: {}", nobody.join(" "));
            return Ok(AttemptResult::Failed { status: AttemptStatus::MissingInputs, reason });
        }
        let now = now_ms();
        let (created, deps) = self.db.wait_for(build, drvs.into_iter().collect(), now).await?;
        let waiting = self.known.get(&build).map(|k| k.uuid.to_string()).unwrap_or_default();
        for b in &created {
            self.queue.insert(b.id, b.priority, &b.system, &b.features, &b.deps);
            self.known.insert(b.id, Known { uuid: b.uuid.as_str().into(), drv: b.drv.as_str().into(), retries: 0 });
            self.emit(b.id, BuildState::Queued, now, None, Some(format!("makes inputs build {waiting} lacks")), false);
        }
        let reason = format!("waiting for builds of its {}", missing_reason(&cacheable));
        Ok(AttemptResult::WaitFor { deps, reason })
    }

    /// Record a batch of attempt ends in one transaction, then tell the watchers.
    async fn commit(&mut self, mut batch: Batch) -> anyhow::Result<()> {
        self.resolve_missing(&mut batch).await?;
        if batch.ends.is_empty() {
            return Ok(());
        }
        self.db.end_attempts(batch.ends).await?;
        for e in batch.events {
            self.emit(e.build, e.state, e.at_ms, e.machine.as_deref(), e.reason, e.retry);
            if e.state.is_terminal() {
                self.known.remove(&e.build);
            }
        }
        self.forget_drained();
        Ok(())
    }

    fn driver_event(&mut self, ev: DriverEvent, batch: &mut Batch) {
        match ev {
            DriverEvent::Up { machine, facts } => {
                let m = &mut self.machines[machine];
                tracing::info!(machine = %m.spec.name, "up: {} (load {:.2})", facts.systems.join(" "), facts.load1);
                m.link = Link::Up;
                m.since_ms = now_ms();
                m.facts = Some(facts);
                m.last_error = None;
            }
            DriverEvent::Load { machine, load1, free_space } => {
                if let Some(f) = &mut self.machines[machine].facts {
                    f.load1 = load1;
                    f.free_space = free_space;
                }
            }
            DriverEvent::Sending { bytes } => self.stats.bytes_sent += bytes,
            DriverEvent::Down { machine, error } => {
                let m = &mut self.machines[machine];
                if m.link != Link::Down {
                    m.since_ms = now_ms();
                }
                m.link = Link::Down;
                m.last_error = Some(error.clone());
                let lost: Vec<(BuildId, i64)> = m.running.iter().map(|(&b, r)| (b, r.attempt)).collect();
                for (build, attempt) in lost {
                    let reason = format!("lost machine {}: {error}", self.machines[machine].spec.name);
                    let result = AttemptResult::Retry { status: AttemptStatus::Interrupted, reason, count: true };
                    self.attempt_done(machine, build, attempt, result, batch);
                }
            }
            DriverEvent::Done { machine, build, attempt, result: AttemptResult::MissingInputs { paths } } => {
                batch.missing.push((machine, build, attempt, paths));
            }
            DriverEvent::Done { machine, build, attempt, result: AttemptResult::StoreDirRefused { store_dir } } => {
                let result = self.store_dir_refused(machine, &store_dir);
                self.attempt_done(machine, build, attempt, result, batch);
            }
            DriverEvent::Done { machine, build, attempt, result } => {
                self.attempt_done(machine, build, attempt, result, batch);
            }
        }
    }

    /// A machine refused a derivation's store dir: another machine may take it (one that accepts
    /// it, or has not said yet), else no try will ever succeed.
    fn store_dir_refused(&self, machine: usize, store_dir: &str) -> AttemptResult {
        let mut accepted = BTreeSet::new();
        let mut may = false;
        for (_, m) in self.machines.iter().enumerate().filter(|(i, m)| *i == machine || !m.retired) {
            match &m.facts {
                Some(f) => {
                    may |= f.store_dirs.iter().any(|d| d == store_dir);
                    accepted.extend(f.store_dirs.iter().cloned());
                }
                None => may = true,
            }
        }
        let name = &self.machines[machine].spec.name;
        if may {
            let reason = format!("machine {name} does not accept the store dir {store_dir}");
            AttemptResult::Retry { status: AttemptStatus::SetupFailure, reason, count: true }
        } else {
            let accepted: Vec<String> = accepted.into_iter().collect();
            let reason = format!("no machine accepts the store dir {store_dir} (they accept: {})", accepted.join(" "));
            AttemptResult::Failed { status: AttemptStatus::SetupFailure, reason }
        }
    }

    /// Start a machine's driver and take it into allocation.
    fn add_machine(&mut self, spec: MachineSpec) {
        let index = self.machines.len();
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            index,
            name: spec.name.clone(),
            transport: spec.transport.clone(),
            state_dir: self.config.state_dir.clone(),
            trusted: spec.trusted.clone(),
            cache: Some(self.cache.clone()),
            backoff: spec.backoff,
            ping: self.config.ping_interval,
            timeout_secs: self.config.timeout_secs,
            max_silent_secs: self.config.max_silent_secs,
            max_log_size: self.config.max_log_size,
            events: self.drivers.clone(),
        };
        tokio::spawn(driver.run(rx));
        self.machines.push(MachineState {
            spec,
            link: Link::Connecting,
            since_ms: now_ms(),
            facts: None,
            last_error: None,
            running: HashMap::new(),
            retired: false,
            tx: Some(tx),
        });
    }

    /// Apply a new machine list: new machines start, removed ones drain, changed ones are
    /// updated in place or, when how to reach them changed, drained and started afresh.
    fn reload(&mut self, specs: Vec<MachineSpec>) {
        let mut keep = vec![false; self.machines.len()];
        for spec in specs {
            let current = self.machines.iter().position(|m| !m.retired && m.spec.name == spec.name);
            match current {
                Some(i) if self.machines[i].spec.same_session(&spec) => {
                    if self.machines[i].spec != spec {
                        tracing::info!(machine = %spec.name, "machine settings changed");
                    }
                    self.machines[i].spec = spec;
                    keep[i] = true;
                }
                Some(_) | None => {
                    tracing::info!(machine = %spec.name, "{} machine", if current.is_some() { "reconnecting changed" } else { "new" });
                    self.add_machine(spec);
                }
            }
        }
        for (i, keep) in keep.into_iter().enumerate() {
            let m = &mut self.machines[i];
            if !keep && !m.retired {
                tracing::info!(machine = %m.spec.name, "removed: {} running builds finish there", m.running.len());
                m.retired = true;
            }
        }
        self.forget_drained();
    }

    /// Stop the drivers of retired machines with nothing left running.
    fn forget_drained(&mut self) {
        for m in &mut self.machines {
            if m.retired && m.running.is_empty() && m.tx.is_some() {
                tracing::info!(machine = %m.spec.name, "drained and disconnected");
                m.tx = None;
            }
        }
    }

    /// Decide what an attempt's end means; it is recorded when the batch commits.
    fn attempt_done(&mut self, machine: usize, build: BuildId, attempt: i64, result: AttemptResult, batch: &mut Batch) {
        let m = &mut self.machines[machine];
        let Some(run) = m.running.remove(&build) else { return };
        if run.attempt != attempt {
            m.running.insert(build, run);
            return;
        }
        let machine_name = m.spec.name.clone();
        let now = now_ms();
        let mut events: Vec<(BuildId, BuildState, Option<String>, bool)> = Vec::new();
        let (status, reason, outputs, change) = if run.canceled {
            let (status, reason) = describe(&result);
            (status, reason, Vec::new(), BuildChange::Nothing)
        } else {
            match result {
                AttemptResult::Success { outputs } => {
                    self.stats.bytes_received += outputs.iter().map(|o| o.nar_size).sum::<u64>();
                    self.queue.succeeded(build);
                    events.push((build, BuildState::Succeeded, None, false));
                    (AttemptStatus::Success, None, outputs, BuildChange::Succeed)
                }
                AttemptResult::Failed { status, reason } => {
                    let change = self.fail(build, &reason, &mut events);
                    (status, Some(reason), Vec::new(), change)
                }
                AttemptResult::Canceled => {
                    let reason = "canceled by the agent".to_owned();
                    let change = self.fail(build, &reason, &mut events);
                    (AttemptStatus::Canceled, Some(reason), Vec::new(), change)
                }
                AttemptResult::WaitFor { deps, reason } => {
                    self.stats.retries += 1;
                    self.queue.requeue_after(build, &deps);
                    events.push((build, BuildState::Queued, Some(reason.clone()), true));
                    (
                        AttemptStatus::MissingInputs,
                        Some(reason),
                        Vec::new(),
                        BuildChange::Requeue { count_retry: false },
                    )
                }
                AttemptResult::StoreDirRefused { store_dir } => {
                    // Resolved before attempt_done; reaching here means a result out of turn.
                    let reason = format!("machine {machine_name} does not accept the store dir {store_dir}");
                    self.queue.requeue(build, Some(&machine_name));
                    events.push((build, BuildState::Queued, Some(reason.clone()), true));
                    (AttemptStatus::SetupFailure, Some(reason), Vec::new(), BuildChange::Requeue { count_retry: false })
                }
                AttemptResult::MissingInputs { paths } => {
                    // Resolved before attempt_done; reaching here means a result out of turn.
                    let reason = missing_reason(&paths);
                    self.queue.requeue(build, Some(&machine_name));
                    events.push((build, BuildState::Queued, Some(reason.clone()), true));
                    (
                        AttemptStatus::MissingInputs,
                        Some(reason),
                        Vec::new(),
                        BuildChange::Requeue { count_retry: false },
                    )
                }
                AttemptResult::Retry { status, reason, count } => {
                    let retries = self.known.get(&build).map_or(0, |k| k.retries) + u32::from(count);
                    if retries >= self.config.max_attempts {
                        let why = format!("gave up after {retries} attempts; the last: {reason}");
                        let change = self.fail(build, &why, &mut events);
                        (status, Some(reason), Vec::new(), change)
                    } else {
                        if let Some(k) = self.known.get_mut(&build) {
                            k.retries = retries;
                        }
                        self.stats.retries += 1;
                        self.queue.requeue(build, Some(&machine_name));
                        events.push((build, BuildState::Queued, Some(reason.clone()), true));
                        (status, Some(reason), Vec::new(), BuildChange::Requeue { count_retry: count })
                    }
                }
            }
        };
        batch.ends.push(AttemptEnd { build, attempt, status, reason, outputs, change, now });
        for (id, state, reason, retry) in events {
            let machine = (id == build).then(|| machine_name.clone());
            batch.events.push(Pending { build: id, state, at_ms: now, machine, reason, retry });
        }
    }

    /// Take a build out of the queue as failed, with its dependents.
    fn fail(
        &mut self,
        build: BuildId,
        reason: &str,
        events: &mut Vec<(BuildId, BuildState, Option<String>, bool)>,
    ) -> BuildChange {
        events.push((build, BuildState::Failed, Some(reason.to_owned()), false));
        let cascade = self.cascade(build, events);
        BuildChange::Fail { reason: reason.to_owned(), cascade }
    }

    fn cascade(
        &mut self,
        build: BuildId,
        events: &mut Vec<(BuildId, BuildState, Option<String>, bool)>,
    ) -> Vec<(BuildId, String)> {
        let mut out = Vec::new();
        for (dependent, cause) in self.queue.failed(build) {
            let why = match self.known.get(&cause) {
                Some(k) => format!("dependency {} ({}) did not succeed", k.uuid, k.drv),
                None => format!("dependency #{cause} did not succeed"),
            };
            events.push((dependent, BuildState::Failed, Some(why.clone()), false));
            out.push((dependent, why));
        }
        out
    }

    async fn cancel(&mut self, uuid: &str) -> anyhow::Result<Result<(), String>> {
        let Some(brief) = self.db.find(uuid).await? else {
            return Ok(Err(format!("no build {uuid}")));
        };
        if brief.state.is_terminal() {
            return Ok(Err(format!("build {uuid} has already {}", brief.state)));
        }
        let id = brief.id;
        let mut events = vec![(id, BuildState::Canceled, Some("canceled".to_owned()), false)];
        let cascade = self.cascade(id, &mut events);
        let now = now_ms();
        self.db.cancel(id, cascade, now).await?;
        for m in &mut self.machines {
            if let Some(r) = m.running.get_mut(&id) {
                r.canceled = true;
                if let Some(tx) = &m.tx {
                    let _ = tx.send(DriverCmd::Cancel(id));
                }
            }
        }
        for (b, state, reason, retry) in events {
            self.emit(b, state, now, None, reason, retry);
            self.known.remove(&b);
        }
        Ok(Ok(()))
    }

    /// At the end of the grace period: every running build goes back to the queue.
    async fn requeue_running(&mut self, reason: &str) -> anyhow::Result<()> {
        let now = now_ms();
        let mut ends = Vec::new();
        for m in &mut self.machines {
            for (build, r) in m.running.drain() {
                let change =
                    if r.canceled { BuildChange::Nothing } else { BuildChange::Requeue { count_retry: false } };
                ends.push(AttemptEnd {
                    build,
                    attempt: r.attempt,
                    status: AttemptStatus::Interrupted,
                    reason: Some(reason.to_owned()),
                    outputs: Vec::new(),
                    change,
                    now,
                });
            }
        }
        if !ends.is_empty() {
            tracing::info!("{} running builds go back to the queue", ends.len());
        }
        self.db.end_attempts(ends).await
    }

    /// Why no machine in service (retired ones are leaving) can build this, if none can.
    fn why_no_machine(&self, system: &str, features: &BTreeSet<String>) -> Option<String> {
        let caps = self.machines.iter().filter(|m| !m.retired).map(|m| &m.spec.caps);
        queue::why_no_machine(system, features, caps)
    }

    fn machine_infos(&self) -> Vec<MachineInfo> {
        self.machines
            .iter()
            .filter(|m| m.tx.is_some())
            .map(|m| MachineInfo {
                name: m.spec.name.clone(),
                state: match m.link {
                    _ if m.retired => "draining",
                    Link::Up => "up",
                    Link::Connecting => "connecting",
                    Link::Down => "down",
                }
                .into(),
                since_ms: m.since_ms,
                systems: m.spec.caps.systems.clone(),
                features: m.spec.caps.features.clone(),
                parallel_builds: m.spec.parallel,
                speed: m.spec.speed,
                running: m.running.keys().filter_map(|b| self.known.get(b).map(|k| k.uuid.to_string())).collect(),
                load1: m.facts.as_ref().map(|f| f.load1),
                free_space: m.facts.as_ref().map(|f| f.free_space),
                last_error: m.last_error.clone(),
                held_back: if m.link == Link::Up && !m.retired { m.held_back() } else { None },
            })
            .collect()
    }
}

/// Status and reason of an attempt's result, for the record.
fn describe(result: &AttemptResult) -> (AttemptStatus, Option<String>) {
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

fn missing_reason(paths: &[String]) -> String {
    format!("missing inputs: {}", paths.join(" "))
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted[i.min(sorted.len() - 1)]
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The built-in machine: this host, its agent a child process with its store in the state dir.
pub fn local_machine(config: &Config) -> MachineSpec {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let parallel = config.local_builds.unwrap_or(cores).max(1);
    let dir = config.state_dir.join("machines/localhost");
    let args = vec!["--state-dir".to_owned(), dir.display().to_string()];
    MachineSpec {
        name: "localhost".into(),
        caps: Capabilities {
            systems: vec![crate::agent::native_system()],
            features: Vec::new(),
            mandatory_features: Vec::new(),
        },
        parallel,
        speed: 1.0,
        max_load: None,
        min_free_disk: None,
        transport: Transport::Local { program: config.agent_program.clone(), args },
        trusted: Vec::new(),
        backoff: Backoff::local(),
    }
}

/// The enabled machines of a machines file, as the coordinator runs them.
pub fn host_machines(file: &crate::machines::MachinesFile, config: &Config) -> Result<Vec<MachineSpec>, String> {
    host_machines_where(file, config, |m| m.enabled)
}

/// The machines of a machines file that `keep` chooses, enabled or not.
pub fn host_machines_where(
    file: &crate::machines::MachinesFile,
    config: &Config,
    keep: impl Fn(&crate::machines::Machine) -> bool,
) -> Result<Vec<MachineSpec>, String> {
    let trusted_all = file
        .trusted_keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| format!("trusted key {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    file.machines.0.iter().filter(|m| keep(m)).map(|m| host_machine(m, &trusted_all, config)).collect()
}

fn host_machine(
    m: &crate::machines::Machine,
    trusted_all: &[PublicKey],
    config: &Config,
) -> Result<MachineSpec, String> {
    use crate::ssh::{HostKeyCheck, Target};
    let trusted = match &m.signing_key {
        Some(k) => vec![PublicKey::parse(k).map_err(|e| format!("machine {}: signing_key: {e}", m.name))?],
        None => trusted_all.to_vec(),
    };
    if trusted.is_empty() {
        return Err(format!("machine {}: no signing_key and no trusted_keys", m.name));
    }
    let user = match &m.user {
        Some(u) => u.clone(),
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .map_err(|_| format!("machine {}: no user given and $USER is not set", m.name))?,
    };
    let host_key = match (&m.host_key, &m.known_hosts) {
        (Some(k), _) => HostKeyCheck::Pinned(k.clone()),
        (None, Some(f)) => HostKeyCheck::KnownHosts(f.clone()),
        (None, None) => return Err(format!("machine {}: no host_key and no known_hosts", m.name)),
    };
    let target = Target { host: m.host.clone(), port: m.port, user, identity: m.identity.clone(), host_key };
    Ok(MachineSpec {
        name: m.name.clone(),
        caps: Capabilities {
            systems: m.systems.clone(),
            features: m.features.clone(),
            mandatory_features: m.mandatory_features.clone(),
        },
        parallel: m.parallel_builds,
        speed: m.speed,
        max_load: m.max_load,
        min_free_disk: m.min_free_disk,
        transport: Transport::Ssh(Box::new(transport::SshAgent {
            target,
            command: m.agent.clone(),
            args: m.agent_args.clone(),
            auto_deploy: m.auto_deploy,
            program: config.agent_program.clone(),
            timing: crate::ssh::Timing { keepalive: config.ssh_keepalive, ..Default::default() },
        })),
        trusted,
        backoff: Backoff::hosts(config.reconnect_delay),
    })
}

/// Re-read the machines file whenever its directory changes (editors save by renaming), and
/// hand the new machine list to the core; a file with an error keeps the previous machines.
fn watch_machines(
    path: PathBuf,
    config: Config,
    commands: mpsc::Sender<Command>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = path.parent().map(std::path::Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && ev.paths.iter().any(|p| p.file_name() == name.as_deref())
        {
            let _ = tx.send(());
        }
    })
    .context("watching the machines file")?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive).with_context(|| format!("watching {}", dir.display()))?;
    tokio::spawn(async move {
        let mut last = std::fs::read(&path).ok();
        while rx.recv().await.is_some() {
            // Let a burst of events (write, rename) settle.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let now = std::fs::read(&path).ok();
            if now == last {
                continue;
            }
            last = now;
            let specs =
                crate::machines::load(&path).map_err(|e| e.to_string()).and_then(|f| host_machines(&f, &config));
            match specs {
                Ok(specs) => {
                    tracing::info!("{}: re-read, {} machines", path.display(), specs.len());
                    if commands.send(Command::Reload(specs)).await.is_err() {
                        break;
                    }
                }
                Err(e) => tracing::error!("{e}; keeping the previous machines"),
            }
        }
    });
    Ok(watcher)
}
