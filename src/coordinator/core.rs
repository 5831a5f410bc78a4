//! The core: the only writer of build state. It owns the in-memory queue and the machines' slots,
//! allocates, records attempt ends in batches (one transaction each) and tells the watchers. It
//! runs as one task fed by two channels (clients' commands, drivers' events), so it can be driven
//! in-process by tests with fake drivers and a paused clock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::config::Config;
use super::error::{Error, Result};
use super::machine::{AttemptResult, Driver, DriverCmd, DriverEvent};
use super::outcome::{self, Change, Known, missing_reason};
use super::queue::{self, BuildId, Queue, Slot};
use super::specs::MachineSpec;
use crate::api::{AttemptStatus, BuildState, Event, MachineInfo, NoMachine, Stats, now_ms};
use crate::db::{AttemptEnd, BuildChange, Db, Submission, SubmitOutcome};
use crate::protocol::HostFacts;

/// Requests to the core.
pub(crate) enum Command {
    /// The outcome, and the new builds no machine can take.
    Submit(Box<Submission>, oneshot::Sender<crate::db::Result<(SubmitOutcome, Vec<NoMachine>)>>),
    /// Why no machine can build this system with these features (None: one can).
    NoMachine(String, BTreeSet<String>, oneshot::Sender<Option<String>>),
    Cancel(String, oneshot::Sender<std::result::Result<(), CancelRefused>>),
    Machines(oneshot::Sender<Vec<MachineInfo>>),
    Stats(oneshot::Sender<Stats>, bool),
    /// The machines file changed: the machines it now lists.
    Reload(Vec<MachineSpec>),
    Shutdown,
}

/// Why a build can't be canceled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CancelRefused {
    #[error("no build {0}")]
    Unknown(String),
    #[error("build {0} has already {1}")]
    Ended(String, BuildState),
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
    /// Machines that came up or went down, for the hooks.
    machine_events: Vec<crate::api::HookEvent>,
}

struct Pending {
    change: Change,
    at_ms: i64,
    machine: Option<String>,
}

/// Starts machines' drivers: [`RealDrivers`] in a coordinator, fakes in the core's tests.
pub(super) trait Drivers: Send {
    /// Start the driver of machine `index`, which takes its commands from `commands` and reports
    /// to the core's driver channel.
    fn start(&mut self, index: usize, spec: &MachineSpec, commands: mpsc::UnboundedReceiver<DriverCmd>);
}

/// The drivers of a running coordinator: a [`Driver`] task per machine.
pub(super) struct RealDrivers {
    pub config: Config,
    pub log_written: Arc<tokio::sync::Notify>,
    pub cache: Arc<crate::cache::Cache>,
    pub substituters: Arc<crate::substituter::Substituters>,
    pub events: mpsc::UnboundedSender<DriverEvent>,
}

impl Drivers for RealDrivers {
    fn start(&mut self, index: usize, spec: &MachineSpec, commands: mpsc::UnboundedReceiver<DriverCmd>) {
        let driver = Driver {
            index,
            name: spec.name.clone(),
            transport: spec.transport.clone(),
            state_dir: self.config.state_dir.clone(),
            trusted: spec.trusted.clone(),
            cache: Some(self.cache.clone()),
            substituters: Some(self.substituters.clone()),
            host_substituters: spec.substituters.clone(),
            backoff: spec.backoff,
            ping: self.config.ping_interval,
            timeout_secs: self.config.timeout_secs,
            max_silent_secs: self.config.max_silent_secs,
            max_log_size: self.config.max_log_size,
            log_written: self.log_written.clone(),
            events: self.events.clone(),
        };
        tokio::spawn(driver.run(commands));
    }
}

pub(super) struct Core {
    config: Config,
    db: Arc<Db>,
    queue: Queue,
    known: HashMap<BuildId, Known>,
    machines: Vec<MachineState>,
    drivers: Box<dyn Drivers>,
    cache: Arc<crate::cache::Cache>,
    events: broadcast::Sender<Event>,
    stopping: Option<Instant>,
    stats: Stats,
    alloc_samples: VecDeque<u64>,
    /// Builds waiting to be tried again after their builder failed (`--retry-failed`), by when.
    held: std::collections::BTreeSet<(Instant, BuildId)>,
}

impl Core {
    /// A core over `db` (its queue loaded from it) with `machines` started by `drivers`.
    pub async fn new(
        config: Config,
        db: Arc<Db>,
        cache: Arc<crate::cache::Cache>,
        events: broadcast::Sender<Event>,
        drivers: Box<dyn Drivers>,
        machines: Vec<MachineSpec>,
    ) -> Result<Core> {
        let mut core = Core {
            config,
            db,
            queue: Queue::new(),
            known: HashMap::new(),
            machines: Vec::new(),
            drivers,
            cache,
            events,
            stopping: None,
            stats: Stats::default(),
            alloc_samples: VecDeque::new(),
            held: std::collections::BTreeSet::new(),
        };
        for spec in machines {
            core.add_machine(spec);
        }
        for b in core.db.load_queue().await? {
            core.queue.insert(b.id, b.priority, &b.system, &b.features, &b.deps);
            core.known.insert(
                b.id,
                Known { uuid: b.uuid.into(), drv: b.drv.into(), retries: b.retries, failures: b.failures },
            );
        }
        Ok(core)
    }

    pub fn queued_len(&self) -> usize {
        self.queue.queued_len()
    }

    /// Serve commands and driver events until told to stop (then running builds get the grace
    /// period) or every sender is gone.
    pub async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut drivers: mpsc::UnboundedReceiver<DriverEvent>,
    ) -> Result<()> {
        loop {
            let deadline = self.stopping.map(|s| s + self.config.grace);
            let release = self.held.first().map(|&(at, _)| at);
            tokio::select! {
                _ = sleep_until_opt(release) => {
                    let now = Instant::now();
                    while let Some(&(at, build)) = self.held.first() && at <= now {
                        self.held.pop_first();
                        self.queue.release(build);
                    }
                }
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

    async fn command(&mut self, cmd: Command) -> Result<()> {
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
                            Known { uuid: b.uuid.as_str().into(), drv: b.drv.as_str().into(), retries: 0, failures: 0 },
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

    fn emit_change(&self, c: Change, at_ms: i64, machine: Option<&str>) {
        self.emit(c.build, c.state, at_ms, machine, c.reason, c.retry);
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
    async fn allocate(&mut self) -> Result<()> {
        let t0 = std::time::Instant::now();
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
        let picked = t0.elapsed();
        let jobs = self.db.start_attempts(request, now).await?;
        tracing::trace!(
            picks = picks.len(),
            pick_us = picked.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "allocated"
        );
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
                return Err(Error::DriverStopped(name));
            }
            self.emit(build, BuildState::Running, now, Some(&name), None, false);
        }
        Ok(())
    }

    /// Decide what the attempts that lacked inputs mean (the Guix Build Coordinator's missing
    /// inputs behaviour): when a known derivation makes each missing path (and the cache can hold
    /// it), the build waits for builds of those derivations (queued or running ones, else new
    /// ones at its priority) and then runs again; otherwise it fails, naming what nobody can make.
    async fn resolve_missing(&mut self, batch: &mut Batch) -> Result<()> {
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

    async fn missing_inputs(&mut self, build: BuildId, paths: Vec<String>) -> Result<AttemptResult> {
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
            self.known.insert(
                b.id,
                Known { uuid: b.uuid.as_str().into(), drv: b.drv.as_str().into(), retries: 0, failures: 0 },
            );
            self.emit(b.id, BuildState::Queued, now, None, Some(format!("makes inputs build {waiting} lacks")), false);
        }
        let reason = format!("waiting for builds of its {}", missing_reason(&cacheable));
        Ok(AttemptResult::WaitFor { deps, reason })
    }

    /// Record a batch of attempt ends in one transaction, then tell the watchers.
    async fn commit(&mut self, mut batch: Batch) -> Result<()> {
        for ev in std::mem::take(&mut batch.machine_events) {
            self.db.record_event(ev).await?;
        }
        self.resolve_missing(&mut batch).await?;
        if batch.ends.is_empty() {
            return Ok(());
        }
        self.db.end_attempts(batch.ends).await?;
        for e in batch.events {
            let (build, terminal) = (e.change.build, e.change.state.is_terminal());
            self.emit_change(e.change, e.at_ms, e.machine.as_deref());
            if terminal {
                self.known.remove(&build);
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
                let mut ev = crate::api::HookEvent::new(crate::api::EventKind::MachineUp, now_ms());
                ev.machine = Some(m.spec.name.clone());
                ev.systems = facts.systems.clone();
                batch.machine_events.push(ev);
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
                if m.link == Link::Up {
                    let mut ev = crate::api::HookEvent::new(crate::api::EventKind::MachineDown, now_ms());
                    ev.machine = Some(m.spec.name.clone());
                    ev.reason = Some(error.clone());
                    batch.machine_events.push(ev);
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
        self.drivers.start(index, &spec, rx);
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
        if let AttemptResult::Success { outputs } = &result
            && !run.canceled
        {
            self.stats.bytes_received += outputs.iter().map(|o| o.nar_size).sum::<u64>();
        }
        let o = outcome::decide(
            &mut self.queue,
            &mut self.known,
            outcome::Policy { max_attempts: self.config.max_attempts, retry_failed: self.config.retry_failed },
            &machine_name,
            build,
            run.canceled,
            result,
        );
        if o.requeued {
            self.stats.retries += 1;
        }
        if let Some(failures) = o.held {
            let wait = retry_wait(self.config.retry_failed_delay, failures);
            self.held.insert((Instant::now() + wait, build));
        }
        let now = now_ms();
        batch.ends.push(AttemptEnd {
            build,
            attempt,
            status: o.status,
            reason: o.reason,
            outputs: o.outputs.into_iter().map(super::wire::output_row).collect(),
            change: o.change,
            now,
        });
        for c in o.changes {
            let machine = (c.build == build).then(|| machine_name.clone());
            batch.events.push(Pending { change: c, at_ms: now, machine });
        }
    }

    async fn cancel(&mut self, uuid: &str) -> Result<std::result::Result<(), CancelRefused>> {
        let Some(brief) = self.db.find(uuid).await? else {
            return Ok(Err(CancelRefused::Unknown(uuid.to_owned())));
        };
        if brief.state.is_terminal() {
            return Ok(Err(CancelRefused::Ended(uuid.to_owned(), brief.state)));
        }
        let id = brief.id;
        let mut changes =
            vec![Change { build: id, state: BuildState::Canceled, reason: Some("canceled".to_owned()), retry: false }];
        let cascade = outcome::cascade(&mut self.queue, &self.known, id, &mut changes);
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
        for c in changes {
            let build = c.build;
            self.emit_change(c, now, None);
            self.known.remove(&build);
        }
        Ok(Ok(()))
    }

    /// At the end of the grace period: every running build goes back to the queue.
    async fn requeue_running(&mut self, reason: &str) -> Result<()> {
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
        Ok(self.db.end_attempts(ends).await?)
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

/// The wait before a failed build's `failures`-th try again: `delay` × 3^(failures−1), at most an
/// hour (a hook's retries wait the same, jittered).
pub(super) fn retry_wait(delay: std::time::Duration, failures: u32) -> std::time::Duration {
    delay.saturating_mul(3u32.saturating_pow(failures.saturating_sub(1))).min(std::time::Duration::from_secs(3600))
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted[i.min(sorted.len() - 1)]
}

pub(super) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
