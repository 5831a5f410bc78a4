//! The core driven in-process: a real database and cache in a temporary directory, fake drivers
//! (the test plays each machine's driver through its channels) and tokio's paused clock.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::*;
use crate::db::{Job, NewDerivation};
use crate::formats::nix32;

/// Fake drivers: each start hands the test the machine's command channel.
struct Fakes(mpsc::UnboundedSender<mpsc::UnboundedReceiver<DriverCmd>>);

impl Drivers for Fakes {
    fn start(&mut self, _index: usize, _spec: &MachineSpec, commands: mpsc::UnboundedReceiver<DriverCmd>) {
        let _ = self.0.send(commands);
    }
}

fn config(dir: &std::path::Path) -> Config {
    Config {
        state_dir: dir.to_owned(),
        socket: dir.join("gbc.sock"),
        local_builds: None,
        sandbox_paths: Vec::new(),
        max_attempts: 3,
        retry_failed: 0,
        retry_failed_delay: std::time::Duration::ZERO,
        grace: Duration::from_secs(60),
        timeout_secs: None,
        max_silent_secs: None,
        max_log_size: None,
        agent_program: PathBuf::from("/nonexistent/gbc"),
        machines_file: None,
        settings_file: None,
        overrides: Default::default(),
        settings: crate::coordinator_file::Settings::default(),
        reconnect_delay: Duration::from_secs(60),
        ssh_keepalive: Duration::from_secs(15),
        ping_interval: Duration::from_secs(30),
        compression: crate::cache::Compression::None,
        cache_store_dir: "/nix/store".into(),
        cache_key: None,
        guix_key: None,
        guix_signatures: false,
        http: None,
        http_limits: super::super::HttpLimits::default(),
    }
}

fn machine(name: &str) -> MachineSpec {
    MachineSpec {
        name: name.into(),
        caps: queue::Capabilities {
            systems: vec!["x86_64-linux".into()],
            features: vec![],
            mandatory_features: vec![],
        },
        parallel: 2,
        speed: 1.0,
        max_load: None,
        min_free_disk: None,
        transport: super::super::transport::Transport::Local { program: "/nonexistent/gbc".into(), args: vec![] },
        trusted: vec![],
        backoff: super::super::machine::Backoff::local(),
        substituters: Vec::new(),
    }
}

fn facts() -> HostFacts {
    HostFacts {
        systems: vec!["x86_64-linux".into()],
        features: vec![],
        cores: 4,
        load1: 0.0,
        free_space: 1 << 40,
        store_dirs: vec!["/nix/store".into()],
        signing_key: String::new(),
    }
}

/// A store path in /nix/store named `name`, its hash part made from the name.
fn path(name: &str) -> String {
    let digest = crate::formats::hash::sha256(name.as_bytes());
    format!("/nix/store/{}-{name}", &nix32::encode(&digest)[..32])
}

/// A derivation `name` whose output is `path(name)`, built from the derivations `deps`.
fn drv(name: &str, deps: &[&str]) -> NewDerivation {
    NewDerivation {
        path: path(&format!("{name}.drv")),
        system: "x86_64-linux".into(),
        features: BTreeSet::new(),
        aterm: String::new(),
        outputs: BTreeMap::from([("out".to_owned(), path(name))]),
        input_drvs: deps.iter().map(|d| path(&format!("{d}.drv"))).collect(),
        inputs: deps.iter().map(|d| path(d)).collect(),
    }
}

/// Submit `wanted` from the graph `drvs` (inputs first); `needed`: the input derivations to build.
fn submission(drvs: Vec<NewDerivation>, wanted: &[&str], needed: &[&str]) -> Submission {
    Submission {
        derivations: drvs,
        requested: wanted.iter().map(|w| path(&format!("{w}.drv"))).collect(),
        priority: 0,
        tags: vec![],
        ignore_if_built: false,
        now: now_ms(),
        needed: needed.iter().map(|n| path(&format!("{n}.drv"))).collect(),
        unpublished: BTreeSet::new(),
        substitutable: BTreeSet::new(),
    }
}

/// Ends the test process when a test has not finished after a minute of real time: a core that
/// never answers would otherwise hang the suite (a paused clock can't time it out: it advances
/// whenever the runtime waits, also for the database's thread).
struct Watchdog(Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    fn start(name: &'static str) -> Watchdog {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            for _ in 0..600 {
                std::thread::sleep(Duration::from_millis(100));
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
            eprintln!("{name}: still running after 60 s: the core stopped answering");
            std::process::exit(101);
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

struct Harness {
    _watchdog: Watchdog,
    _dir: tempfile::TempDir,
    db: Arc<Db>,
    commands: mpsc::Sender<Command>,
    events: mpsc::UnboundedSender<DriverEvent>,
    machines: Vec<mpsc::UnboundedReceiver<DriverCmd>>,
    watch: broadcast::Receiver<Event>,
    core: JoinHandle<Result<()>>,
}

impl Harness {
    async fn start(names: &[&str]) -> Harness {
        let watchdog = Watchdog::start(std::thread::current().name().map_or("a core test", |n| n.to_owned().leak()));
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let config = config(dir.path());
        let db = Arc::new(Db::open(&dir.path().join("gbc.sqlite")).await.unwrap_or_else(|e| unreachable!("{e}")));
        let key = crate::formats::signing::SecretKey::generate("test-1").unwrap_or_else(|e| unreachable!("{e}"));
        let store_dir = crate::formats::store_path::StoreDir::new("/nix/store").unwrap_or_else(|e| unreachable!("{e}"));
        let cache = Arc::new(
            crate::cache::Cache::open(&dir.path().join("cache"), store_dir, key, crate::cache::Compression::None)
                .unwrap_or_else(|e| unreachable!("{e}")),
        );
        let (events_tx, watch) = broadcast::channel(1024);
        let (started, mut started_rx) = mpsc::unbounded_channel();
        let specs = names.iter().map(|n| machine(n)).collect();
        let mut core = Core::new(config, db.clone(), cache, events_tx, Box::new(Fakes(started)), specs)
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut machines = Vec::new();
        while let Ok(rx) = started_rx.try_recv() {
            machines.push(rx);
        }
        let (commands, cmd_rx) = mpsc::channel(16);
        let (events, drv_rx) = mpsc::unbounded_channel();
        let core = tokio::spawn(async move { core.run(cmd_rx, drv_rx).await });
        let h = Harness { _watchdog: watchdog, _dir: dir, db, commands, events, machines, watch, core };
        for m in 0..names.len() {
            h.send(DriverEvent::Up { machine: m, facts: facts() });
        }
        h
    }

    fn send(&self, ev: DriverEvent) {
        self.events.send(ev).unwrap_or_else(|_| unreachable!("the core stopped"));
    }

    async fn submit(&self, sub: Submission) -> Vec<String> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Submit(Box::new(sub), tx)).await;
        let (outcome, _) = rx.await.unwrap_or_else(|e| unreachable!("{e}")).unwrap_or_else(|e| unreachable!("{e}"));
        outcome.requested
    }

    async fn command(&self, cmd: Command) {
        self.commands.send(cmd).await.unwrap_or_else(|_| unreachable!("the core stopped"));
    }

    /// The next job assigned to machine `m`.
    async fn job(&mut self, m: usize) -> Job {
        match self.machines[m].recv().await {
            Some(DriverCmd::Assign(job)) => *job,
            other => unreachable!("machine {m} got {other:?} instead of a job"),
        }
    }

    /// Whether machine `m` has been sent nothing (after letting the core run).
    async fn idle(&mut self, m: usize) -> bool {
        tokio::task::yield_now().await;
        self.machines[m].try_recv().is_err()
    }

    fn done(&self, m: usize, job: &Job, result: AttemptResult) {
        self.send(DriverEvent::Done { machine: m, build: job.build, attempt: job.attempt, result });
    }

    async fn show(&self, uuid: &str) -> crate::db::BuildRecord {
        self.db.show(uuid).await.unwrap_or_else(|e| unreachable!("{e}")).unwrap_or_else(|| unreachable!("no {uuid}"))
    }

    /// Wait for the event saying build `uuid` reached `state`.
    async fn until(&mut self, uuid: &str, state: BuildState) -> Event {
        loop {
            let ev = self.watch.recv().await.unwrap_or_else(|e| unreachable!("{e}"));
            if ev.build == uuid && ev.state == state {
                return ev;
            }
        }
    }
}

fn success() -> AttemptResult {
    AttemptResult::Success { outputs: vec![] }
}

#[tokio::test(start_paused = true)]
async fn builds_start_in_dependency_order_and_their_ends_are_recorded() {
    let mut h = Harness::start(&["m"]).await;
    let graph = vec![drv("base", &[]), drv("top", &["base"])];
    let top = h.submit(submission(graph, &["top"], &["base"])).await.remove(0);
    let first = h.job(0).await;
    assert_eq!(first.drv_path, path("base.drv"));
    assert!(h.idle(0).await, "top waits for base");
    h.done(0, &first, success());
    let second = h.job(0).await;
    assert_eq!((second.drv_path.as_str(), second.uuid.as_str()), (path("top.drv").as_str(), top.as_str()));
    h.done(0, &second, AttemptResult::Failed { status: AttemptStatus::BuildFailure, reason: "exit 1".into() });
    let ev = h.until(&top, BuildState::Failed).await;
    assert_eq!((ev.machine.as_deref(), ev.reason.as_deref()), (Some("m"), Some("exit 1")));
    let d = h.show(&top).await;
    assert_eq!(d.build.state, BuildState::Failed);
    assert_eq!(d.attempts[0].status, Some(AttemptStatus::BuildFailure));
}

#[tokio::test(start_paused = true)]
async fn a_lost_machine_s_builds_run_again_elsewhere() {
    let mut h = Harness::start(&["m", "n"]).await;
    let uuid = h.submit(submission(vec![drv("a", &[])], &["a"], &[])).await.remove(0);
    // Both machines are free and equal: whichever took it is lost.
    let (m0, m1) = h.machines.split_at_mut(1);
    let (lost, other) = tokio::select! {
        Some(DriverCmd::Assign(_)) = m0[0].recv() => (0, 1),
        Some(DriverCmd::Assign(_)) = m1[0].recv() => (1, 0),
    };
    h.send(DriverEvent::Down { machine: lost, error: "connection reset".into() });
    let again = h.job(other).await;
    assert_eq!(again.uuid, uuid);
    assert_eq!(again.n, 2);
    h.done(other, &again, success());
    h.until(&uuid, BuildState::Succeeded).await;
    let d = h.show(&uuid).await;
    let statuses: Vec<_> = d.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [Some(AttemptStatus::Interrupted), Some(AttemptStatus::Success)]);
    assert!(d.attempts[0].reason.as_deref().is_some_and(|r| r.contains("connection reset")), "{d:?}");
}

#[tokio::test(start_paused = true)]
async fn a_canceled_build_is_stopped_on_its_machine_and_its_dependents_fail() {
    let mut h = Harness::start(&["m"]).await;
    let graph = vec![drv("base", &[]), drv("top", &["base"])];
    let top = h.submit(submission(graph, &["top"], &["base"])).await.remove(0);
    let job = h.job(0).await;
    let (tx, rx) = oneshot::channel();
    h.command(Command::Cancel(job.uuid.clone(), tx)).await;
    assert_eq!(rx.await.ok(), Some(Ok(())));
    assert!(matches!(h.machines[0].recv().await, Some(DriverCmd::Cancel(b)) if b == job.build));
    let ev = h.until(&top, BuildState::Failed).await;
    assert!(ev.reason.as_deref().is_some_and(|r| r.starts_with(&format!("dependency {}", job.uuid))), "{ev:?}");
    // The agent's answer is recorded; the build stays canceled.
    h.done(0, &job, AttemptResult::Canceled);
    tokio::task::yield_now().await;
    let (tx, rx) = oneshot::channel();
    h.command(Command::Stats(tx, false)).await;
    assert_eq!(rx.await.map(|s| s.running).ok(), Some(0));
    assert_eq!(h.show(&job.uuid).await.build.state, BuildState::Canceled);
}

#[tokio::test(start_paused = true)]
async fn missing_inputs_are_built_first_when_a_known_derivation_makes_them() {
    let mut h = Harness::start(&["m"]).await;
    // base's output is taken to be in the cache (not needed), so only top is built...
    let graph = vec![drv("base", &[]), drv("top", &["base"])];
    let top = h.submit(submission(graph, &["top"], &[])).await.remove(0);
    let job = h.job(0).await;
    assert_eq!(job.uuid, top);
    // ...but the machine lacks it and the cache has not got it: base is built, then top again.
    h.done(0, &job, AttemptResult::MissingInputs { paths: vec![path("base")] });
    let base = h.job(0).await;
    assert_eq!(base.drv_path, path("base.drv"));
    assert!(h.idle(0).await);
    h.done(0, &base, success());
    let again = h.job(0).await;
    assert_eq!((again.uuid.as_str(), again.n), (top.as_str(), 2));
    let d = h.show(&top).await;
    assert_eq!(d.attempts[0].status, Some(AttemptStatus::MissingInputs));
}

/// The grace period on a paused clock: after the stop, a build that ends within it is recorded as
/// it ended; one still running when it runs out goes back to the queue as interrupted, and the
/// core returns at that moment, not before.
#[tokio::test(start_paused = true)]
async fn running_builds_get_the_grace_period_then_go_back_to_the_queue() {
    let mut h = Harness::start(&["m"]).await;
    let graph = vec![drv("a", &[]), drv("b", &[]), drv("c", &[])];
    let uuids = h.submit(submission(graph, &["a", "b", "c"], &[])).await;
    let (first, second) = (h.job(0).await, h.job(0).await);
    let stopped = tokio::time::Instant::now();
    h.command(Command::Shutdown).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    h.done(0, &first, success());
    h.until(&first.uuid, BuildState::Succeeded).await;
    assert!(h.idle(0).await, "no new build starts while stopping");
    let Harness { core, db, .. } = h;
    core.await.unwrap_or_else(|e| unreachable!("{e}")).unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(stopped.elapsed(), Duration::from_secs(60), "the core returned at the end of the grace period");
    let d = db.show(&second.uuid).await.ok().flatten().unwrap_or_else(|| unreachable!());
    assert_eq!(d.build.state, BuildState::Queued);
    assert_eq!(d.attempts[0].status, Some(AttemptStatus::Interrupted));
    let untouched = uuids.iter().find(|u| **u != first.uuid && **u != second.uuid).unwrap_or_else(|| unreachable!());
    let d = db.show(untouched).await.ok().flatten().unwrap_or_else(|| unreachable!());
    assert_eq!((d.build.state, d.attempts.len()), (BuildState::Queued, 0));
}
