//! Hooks: the events of the database's outbox delivered to programs and URLs (docs/hooks.md),
//! beside the core: a slow hook delays only itself. One task reads each hook's waiting events
//! (oldest first), runs up to its parallelism at once, and records what the runs did in one
//! transaction per batch; an event leaves the outbox only once its hook has taken it, so after a
//! crash the events whose runs were under way are run again (at least once, never lost).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::core::sleep_until_opt;
use crate::api::{HookEvent, HookInfo, now_ms};
use crate::coordinator_file::{HookSpec, HookTarget};
use crate::db::{Db, Delivery, Pending, Subscriber};

/// How much of a failing command's stderr its error keeps.
const STDERR_KEPT: usize = 2048;

/// Counters of one hook since the coordinator started.
#[derive(Debug, Default, Clone)]
pub struct HookStats {
    pub runs: u64,
    pub failures: u64,
    pub running: u64,
    /// From each taken event's time to its delivery: sum (ms) and count.
    pub latency_ms_sum: u64,
    pub delivered: u64,
    pub last_error: Option<String>,
}

/// The hooks in force and their counters, shared with the client server and /metrics.
pub struct Hooks {
    specs: Mutex<Vec<HookSpec>>,
    stats: Mutex<BTreeMap<String, HookStats>>,
    changed: tokio::sync::Notify,
    /// Told which hooks to store events for, with each configuration.
    db: Arc<Db>,
    /// Where commands are started, per nice value ([`Hooks::spawn`]).
    spawners: Mutex<BTreeMap<u8, std::sync::mpsc::Sender<SpawnJob>>>,
}

impl Hooks {
    pub fn new(specs: Vec<HookSpec>, db: Arc<Db>) -> Arc<Hooks> {
        let hooks = Arc::new(Hooks {
            specs: Mutex::default(),
            stats: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            db,
            spawners: Mutex::default(),
        });
        hooks.update(specs);
        hooks
    }

    pub fn specs(&self) -> Vec<HookSpec> {
        self.specs.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Take a new configuration (it applies to events stored from now on, and to the runs to come).
    pub fn update(&self, specs: Vec<HookSpec>) {
        *self.specs.lock().unwrap_or_else(PoisonError::into_inner) = specs;
        // Events from now on are stored for these hooks.
        self.db.set_subscribers(self.subscribers());
        self.changed.notify_one();
    }

    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.specs().into_iter().map(|h| Subscriber { name: h.name, events: h.events }).collect()
    }

    pub fn stats(&self) -> BTreeMap<String, HookStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Start `cmd` from a thread `nice` steps nicer than the coordinator, so that its process runs
    /// at that lower CPU priority from its first instruction (the exec and the dynamic loading
    /// included, most of a short hook's work: a priority set after the spawn would miss them). One
    /// thread per nice value, started on first use and stopped with the hooks; it also keeps the
    /// spawns off the threads the core's task runs on.
    async fn spawn(&self, nice: u8, cmd: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        let gone = || std::io::Error::other("the hooks' spawning thread is gone");
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut spawners = self.spawners.lock().unwrap_or_else(PoisonError::into_inner);
            let spawner = match spawners.entry(nice) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(start_spawner(nice)?),
            };
            spawner.send((cmd, tx)).map_err(|_| gone())?;
        }
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    fn with_stats(&self, hook: &str, f: impl FnOnce(&mut HookStats)) {
        f(self.stats.lock().unwrap_or_else(PoisonError::into_inner).entry(hook.to_owned()).or_default());
    }

    /// What `gbc hooks` shows: every configured hook, and any other that still has events stored.
    pub async fn infos(&self, db: &Db) -> crate::db::Result<Vec<HookInfo>> {
        let stored: HashMap<String, crate::db::Backlog> =
            db.hook_counts().await?.into_iter().map(|b| (b.hook.clone(), b)).collect();
        let stats = self.stats();
        let specs = self.specs();
        let mut names: Vec<(String, bool)> = specs.iter().map(|h| (h.name.clone(), true)).collect();
        let mut others: Vec<&String> = stored.keys().filter(|n| !specs.iter().any(|h| &h.name == *n)).collect();
        others.sort();
        names.extend(others.into_iter().map(|n| (n.clone(), false)));
        Ok(names
            .into_iter()
            .map(|(name, configured)| {
                let crate::db::Backlog { waiting: backlog, given_up, last_error: stored_error, .. } =
                    stored.get(&name).cloned().unwrap_or_default();
                let s = stats.get(&name).cloned().unwrap_or_default();
                let events = specs.iter().find(|h| h.name == name).map(|h| h.events.iter().copied().collect());
                HookInfo {
                    events: events.unwrap_or_default(),
                    backlog,
                    running: s.running,
                    given_up,
                    runs: s.runs,
                    failures: s.failures,
                    last_error: s.last_error.or(stored_error),
                    configured,
                    name,
                }
            })
            .collect())
    }
}

/// What a finished run reports to the loop.
struct Ran {
    hook: String,
    pending: Pending,
    result: Result<(), String>,
}

/// One hook's view of its waiting events: the window last read (oldest first), and whether it
/// must be read again. Each read costs the core's next commits a little (measured: reading after
/// every event and every run made the core's allocations twice as slow), so the runner reads
/// only when something changed or the window is used up, and at most once per [`READ_EVERY`].
#[derive(Default)]
struct Window {
    events: Vec<Pending>,
    /// The read returned as many as asked: more may wait beyond it.
    full: bool,
    /// New events were stored (or retries re-armed, or runs recorded as failed) since the read.
    stale: bool,
    read_at: Option<tokio::time::Instant>,
}

/// Deliver events until the coordinator stops. `socket` is given to commands as
/// `GBC_COORDINATOR`, so that they can act back (submit, cancel).
pub async fn run(db: Arc<Db>, hooks: Arc<Hooks>, socket: PathBuf) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Ran>();
    // Per hook: the events being run (they count against its parallelism), and those whose runs
    // ended but are not recorded yet (neither is run again meanwhile).
    let mut running: HashMap<String, HashSet<i64>> = HashMap::new();
    let mut ended: HashMap<String, HashSet<i64>> = HashMap::new();
    let mut windows: HashMap<String, Window> = HashMap::new();
    let mut unrecorded: Vec<Ran> = Vec::new();
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        let specs = hooks.specs();
        windows.retain(|name, _| specs.iter().any(|h| &h.name == name));
        let mut wake: Option<tokio::time::Instant> = None;
        let mut wake_at = |at: tokio::time::Instant| wake = Some(wake.map_or(at, |w: tokio::time::Instant| w.min(at)));
        for spec in &specs {
            let now_running = running.entry(spec.name.clone()).or_default();
            let now_ended = ended.entry(spec.name.clone()).or_default();
            let free = (spec.parallelism as usize).saturating_sub(now_running.len());
            if free == 0 {
                continue;
            }
            let window = windows.entry(spec.name.clone()).or_default();
            let now = now_ms();
            let startable =
                |p: &Pending| !now_running.contains(&p.event) && !now_ended.contains(&p.event) && p.next_at <= now;
            let used_up = !window.events.iter().any(startable);
            if window.read_at.is_none() || window.stale || (window.full && used_up) {
                let due = window.read_at.map(|t| t + READ_EVERY).filter(|&due| due > tokio::time::Instant::now());
                if let Some(due) = due {
                    wake_at(due);
                } else {
                    let limit = (spec.parallelism * 8).max(64) + (now_running.len() + now_ended.len()) as u32;
                    match db.pending_events(spec.name.clone(), limit).await {
                        Ok(events) => {
                            window.full = events.len() >= limit as usize;
                            window.events = events;
                            window.stale = false;
                            window.read_at = Some(tokio::time::Instant::now());
                        }
                        Err(e) => {
                            tracing::error!(hook = %spec.name, "reading its events: {e}");
                            wake_at(tokio::time::Instant::now() + Duration::from_secs(1));
                            continue;
                        }
                    }
                }
            }
            let mut started = 0;
            // For ordered hooks: builds with an earlier event still undelivered (or unrecorded).
            let mut held: HashSet<&str> = HashSet::new();
            for p in &window.events {
                let build = p.build.as_deref();
                let blocked = spec.ordered && build.is_some_and(|b| held.contains(b));
                if spec.ordered
                    && let Some(b) = build
                {
                    held.insert(b);
                }
                if blocked || now_running.contains(&p.event) || now_ended.contains(&p.event) {
                    continue;
                }
                if p.next_at > now {
                    wake_at(tokio::time::Instant::now() + Duration::from_millis((p.next_at - now) as u64));
                    continue;
                }
                if started == free {
                    break;
                }
                started += 1;
                now_running.insert(p.event);
                hooks.with_stats(&spec.name, |s| s.running += 1);
                let (spec, socket, done, p) = (spec.clone(), socket.clone(), done_tx.clone(), p.clone());
                let hooks = hooks.clone();
                tokio::spawn(async move {
                    let result = run_one(&hooks, &spec, &p, &socket).await;
                    let _ = done.send(Ran { hook: spec.name.clone(), pending: p, result });
                });
            }
        }
        tokio::select! {
            first = done_rx.recv() => {
                let Some(first) = first else { return };
                let mut got = vec![first];
                while let Ok(more) = done_rx.try_recv() {
                    got.push(more);
                }
                // The slots are free at once; the record waits a moment to gather more runs into
                // one transaction (the database's writer is the core's too).
                for ran in got {
                    if let Some(r) = running.get_mut(&ran.hook) {
                        r.remove(&ran.pending.event);
                    }
                    ended.entry(ran.hook.clone()).or_default().insert(ran.pending.event);
                    hooks.with_stats(&ran.hook, |s| s.running = s.running.saturating_sub(1));
                    unrecorded.push(ran);
                }
                flush_at.get_or_insert(tokio::time::Instant::now() + RECORD_EVERY);
            }
            _ = sleep_until_opt(flush_at) => {
                flush_at = None;
                let batch = std::mem::take(&mut unrecorded);
                // What the windows show of these events is out of date: taken ones are gone,
                // failed ones wait for their next run.
                for ran in &batch {
                    if let Some(w) = windows.get_mut(&ran.hook) {
                        w.events.retain(|p| p.event != ran.pending.event);
                        w.stale |= ran.result.is_err();
                    }
                }
                record(&db, &hooks, &specs, batch, &mut ended).await;
            }
            _ = db.outbox.notified() => windows.values_mut().for_each(|w| w.stale = true),
            _ = hooks.changed.notified() => windows.values_mut().for_each(|w| w.stale = true),
            _ = sleep_until_opt(wake) => {}
        }
    }
}

/// The shortest time between two reads of a hook's events (what an event may wait for its run
/// beyond its hook's being free).
const READ_EVERY: Duration = Duration::from_millis(250);

/// How long ended runs wait to be recorded together.
const RECORD_EVERY: Duration = Duration::from_millis(250);

/// Write what runs did; their events stay "ended" here until it is written (so none is run
/// twice by this coordinator).
async fn record(
    db: &Db,
    hooks: &Hooks,
    specs: &[HookSpec],
    batch: Vec<Ran>,
    ended: &mut HashMap<String, HashSet<i64>>,
) {
    let mut rows = Vec::with_capacity(batch.len());
    let now = now_ms();
    for ran in &batch {
        let spec = specs.iter().find(|h| h.name == ran.hook);
        let delivery = match &ran.result {
            Ok(()) => {
                hooks.with_stats(&ran.hook, |s| {
                    s.runs += 1;
                    s.delivered += 1;
                    s.latency_ms_sum += (now - ran.pending.at_ms).max(0) as u64;
                });
                Delivery::Taken
            }
            Err(error) => {
                let tries = ran.pending.tries + 1;
                let (max, delay) = spec.map_or((0, Duration::ZERO), |h| (h.max_retries, h.retry_delay));
                let next_at = (tries <= max).then(|| now + backoff(delay, tries).as_millis() as i64);
                match next_at {
                    Some(at) => tracing::warn!(
                        hook = %ran.hook,
                        "event {} ({}): {error}; run again in {} s",
                        ran.pending.event,
                        ran.pending.kind,
                        (at - now) / 1000
                    ),
                    None => tracing::error!(
                        hook = %ran.hook,
                        "event {} ({}): {error}; given up after {tries} runs (gbc hooks retry {} runs it again)",
                        ran.pending.event,
                        ran.pending.kind,
                        ran.hook
                    ),
                }
                hooks.with_stats(&ran.hook, |s| {
                    s.runs += 1;
                    s.failures += 1;
                    s.last_error = Some(error.clone());
                });
                Delivery::Failed { tries, next_at, error: error.clone() }
            }
        };
        rows.push((ran.hook.clone(), ran.pending.event, delivery));
    }
    // Until this is written the events count as running: retried with the next batch if it fails.
    let mut wait = Duration::from_millis(100);
    while let Err(e) = db.record_deliveries(rows.clone()).await {
        tracing::error!("recording hook runs: {e}; trying again");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
    for ran in batch {
        if let Some(r) = ended.get_mut(&ran.hook) {
            r.remove(&ran.pending.event);
        }
    }
}

/// The delay before the `tries`-th run after failures: `delay` × 3^(tries−1), at most an hour,
/// jittered by ±25% (so that events that failed together don't all come back together).
fn backoff(delay: Duration, tries: u32) -> Duration {
    let base = super::core::retry_wait(delay, tries);
    let mut r = [0u8; 2];
    let jitter = if getrandom::fill(&mut r).is_ok() { f64::from(u16::from_le_bytes(r)) / 65535.0 } else { 0.5 };
    base.mul_f64(0.75 + jitter / 2.0)
}

/// One run of `spec` on one event.
async fn run_one(hooks: &Hooks, spec: &HookSpec, p: &Pending, socket: &std::path::Path) -> Result<(), String> {
    match &spec.target {
        HookTarget::Command(argv) => run_command(hooks, argv, spec, p, socket).await,
        HookTarget::Url(url) => {
            let (url, body, timeout, kind) = (url.clone(), p.body.clone(), spec.timeout, p.kind.clone());
            tokio::task::spawn_blocking(move || post(&url, &body, timeout, &kind))
                .await
                .unwrap_or_else(|e| Err(format!("the request's thread: {e}")))
        }
    }
}

async fn run_command(
    hooks: &Hooks,
    argv: &[String],
    spec: &HookSpec,
    p: &Pending,
    socket: &std::path::Path,
) -> Result<(), String> {
    let timeout = spec.timeout;
    let Some((program, args)) = argv.split_first() else { return Err("no command".into()) };
    let ev: Option<HookEvent> = serde_json::from_str(&p.body).ok();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("GBC_EVENT", &p.kind)
        .env("GBC_EVENT_ID", p.event.to_string())
        .env("GBC_BUILD", p.build.as_deref().unwrap_or(""))
        .env("GBC_DERIVATION", ev.as_ref().and_then(|e| e.drv.as_deref()).unwrap_or(""))
        .env("GBC_COORDINATOR", socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills whatever it started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = hooks.spawn(spec.nice, cmd).await.map_err(|e| format!("{program}: {e}"))?;
    let pid = child.id();
    let mut stdin = child.stdin.take();
    let mut stderr = child.stderr.take();
    // One write (of a line up to the pipe's 4 KiB, atomic): a hook never sees half a line.
    let line = format!("{}\n", p.body);
    let work = async {
        if let Some(mut i) = stdin.take() {
            // A hook that does not read its stdin is fine: a broken pipe is not its failure.
            let _ = i.write_all(line.as_bytes()).await;
        }
        let mut err = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_end(&mut err).await;
        }
        (child.wait().await, err)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), err)) => {
            let text = String::from_utf8_lossy(&err[err.len().saturating_sub(STDERR_KEPT)..]).into_owned();
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned();
            Err(if last.is_empty() { format!("{program}: {status}") } else { format!("{program}: {status}: {last}") })
        }
        Ok((Err(e), _)) => Err(format!("{program}: {e}")),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            Err(format!("{program}: killed after its timeout of {} s", timeout.as_secs()))
        }
    }
}

/// A command to start, and where to send the child.
type SpawnJob = (tokio::process::Command, tokio::sync::oneshot::Sender<std::io::Result<tokio::process::Child>>);

fn start_spawner(nice: u8) -> std::io::Result<std::sync::mpsc::Sender<SpawnJob>> {
    let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
    // tokio's process reaping needs its runtime: the thread enters it.
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new().name(format!("gbc-hooks-nice-{nice}")).spawn(move || {
        let _entered = runtime.enter();
        // Linux keeps a nice value per thread (the priority "of process 0" is this thread's), and
        // children take their creator's.
        if nice != 0 {
            let niced = rustix::process::getpriority_process(None)
                .and_then(|now| rustix::process::setpriority_process(None, (now + i32::from(nice)).min(19)));
            if let Err(e) = niced {
                tracing::warn!("hooks {nice} steps nicer than the coordinator: {e}; they run as nice as it");
            }
        }
        while let Ok((mut cmd, reply)) = rx.recv() {
            let _ = reply.send(cmd.spawn());
        }
    })?;
    Ok(tx)
}

fn post(url: &str, body: &str, timeout: Duration, kind: &str) -> Result<(), String> {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build().into();
    let response = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Gbc-Event", kind)
        .send(body)
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) { Ok(()) } else { Err(format!("{url}: HTTP {status}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_three_jittered_and_capped() {
        let d = Duration::from_secs(60);
        for (tries, base) in [(1, 60.0), (2, 180.0), (3, 540.0), (9, 3600.0)] {
            let b = backoff(d, tries).as_secs_f64();
            assert!(b >= base * 0.75 - 0.01 && b <= base * 1.25 + 0.01, "try {tries}: {b} s");
        }
    }
}
