//! Machine drivers: one task per machine keeps a session with its `gbc agent` open (`session`),
//! sends it the jobs the core assigns, writes their logs, checks what comes back (`checks`: output
//! paths, signatures, NAR hashes and references) and reports each attempt's end to the core. The
//! transport only has to carry frames: the built-in local machine runs the agent as a child
//! process; SSH machines run it over an exec channel.

mod checks;
mod inputs;
mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::queue::BuildId;
use super::transport::Transport;
use crate::api::{AttemptStatus, OutputInfo};
use crate::cache::Cache;
use crate::db::Job;
use crate::formats::host_key::HostPublicKey;
use crate::protocol::HostFacts;

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

/// Everything a driver needs.
pub struct Driver {
    pub index: usize,
    pub name: String,
    pub transport: Transport,
    pub state_dir: PathBuf,
    /// Keys whose signatures on outputs are accepted; empty: the key the agent announces (only for
    /// the local machine, whose agent the coordinator started itself).
    pub trusted: Vec<HostPublicKey>,
    /// Where verified outputs are published.
    pub cache: Option<Arc<Cache>>,
    /// Where inputs the cache lacks may come from before they count as missing.
    pub substituters: Option<Arc<crate::substituter::Substituters>>,
    /// Binary caches the host takes inputs from itself (machines.ron `substituters`), before
    /// the coordinator sends what it still lacks.
    pub host_substituters: Vec<String>,
    pub backoff: Backoff,
    /// How often the agent is asked for its load.
    pub ping: Duration,
    pub timeout_secs: Option<u64>,
    pub max_silent_secs: Option<u64>,
    /// Stop a build whose log passes this many bytes.
    pub max_log_size: Option<u64>,
    /// Woken whenever a log grows or is closed (for `gbc log --follow`).
    pub log_written: Arc<tokio::sync::Notify>,
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
        match connected {
            Ok(session) => self.serve(session, cmds).await,
            Err(e) => lost(e.to_string()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
            substituters: None,
            host_substituters: Vec::new(),
            backoff: Backoff::local(),
            ping: Duration::from_secs(30),
            timeout_secs: None,
            max_silent_secs: None,
            max_log_size: None,
            log_written: Arc::default(),
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

    /// The agent's side of a session, played by a test over channels.
    struct FakeAgent {
        to_driver: mpsc::Sender<Result<crate::protocol::Frame, crate::coordinator::transport::LinkError>>,
        from_driver: mpsc::Receiver<crate::protocol::Frame>,
    }

    impl FakeAgent {
        async fn say(&self, message: crate::protocol::Message, payload: Vec<u8>) {
            let _ = self.to_driver.send(Ok(crate::protocol::Frame { message, payload })).await;
        }

        /// The next message from the driver that `wanted` picks, answering pings on the way.
        async fn hear<T>(&mut self, mut wanted: impl FnMut(crate::protocol::Message) -> Option<T>) -> T {
            loop {
                let frame = self.from_driver.recv().await.unwrap_or_else(|| unreachable!("the session ended"));
                if let crate::protocol::Message::Ping {} = frame.message {
                    self.say(crate::protocol::Message::Pong { load1: 0.0, free_space: 1 << 40 }, vec![]).await;
                }
                if let Some(t) = wanted(frame.message) {
                    return t;
                }
            }
        }

        /// Build `drv` as the agent does: ask for no inputs, wait for `start`, log, report the one
        /// output `contents` (a regular file) signed by `key`, and send its NAR.
        async fn build(&mut self, key: &str, drv: &crate::examples::Made, contents: &[u8], signer: &SecretKeyForTest) {
            use crate::protocol::{BuildStatus, BuiltOutput, Message, PathMeta};
            self.say(Message::Inputs { build: key.into(), missing: vec![] }, vec![]).await;
            self.hear(|m| matches!(m, Message::Start { ref build } if build == key).then_some(())).await;
            self.say(Message::Log { build: key.into(), payload: 6 }, b"built\n".to_vec()).await;
            let mut nar = Vec::new();
            let node = crate::formats::nar::writer::begin(&mut nar).unwrap_or_else(|e| unreachable!("{e}"));
            node.regular(false, contents.len() as u64, contents).unwrap_or_else(|e| unreachable!("{e}"));
            let hash = crate::formats::hash::Hash::sha256(crate::formats::hash::sha256(&nar));
            let path = drv.outputs["out"].clone();
            let fingerprint = crate::formats::narinfo::fingerprint(&path, &hash, nar.len() as u64, &[]);
            let meta = PathMeta {
                path,
                nar_hash: format!("sha256:{}", hash.to_nix32()),
                nar_size: nar.len() as u64,
                references: vec![],
                deriver: None,
            };
            let signature = signer.0.sign(fingerprint.as_bytes()).to_string();
            let output = BuiltOutput { name: "out".into(), meta: meta.clone(), signature };
            self.say(
                Message::Finished { build: key.into(), status: BuildStatus::Success, outputs: vec![output] },
                vec![],
            )
            .await;
            let transfer = nar.len() as u64;
            self.say(Message::NarStart { transfer, build: Some(key.into()), meta }, vec![]).await;
            for chunk in nar.chunks(64 * 1024) {
                self.say(Message::NarChunk { transfer, payload: chunk.len() as u64 }, chunk.to_vec()).await;
            }
            self.say(Message::NarEnd { transfer }, vec![]).await;
        }
    }

    struct SecretKeyForTest(crate::formats::signing::SecretKey);

    /// Issue 13: while one output is being published (here: the cache's publishing lock is held,
    /// as a long publication holds it), another build on the same machine still has its frames
    /// read, its ping answered and its end reported; the first ends once publishing can go on.
    #[tokio::test]
    #[allow(clippy::await_holding_lock, reason = "the held lock is the slow publication")]
    async fn a_slow_publication_does_not_hold_up_the_machine_s_other_builds() {
        use crate::protocol::Message;
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let sd = crate::formats::store_path::StoreDir::new("/nix/store").unwrap_or_else(|e| unreachable!("{e}"));
        let cache_key = crate::formats::signing::SecretKey::generate("cache-1").unwrap_or_else(|e| unreachable!("{e}"));
        let cache = Arc::new(
            Cache::open(&dir.path().join("cache"), sd.clone(), cache_key, crate::cache::Compression::None)
                .unwrap_or_else(|e| unreachable!("{e}")),
        );
        let host = SecretKeyForTest(
            crate::formats::signing::SecretKey::generate("host-1").unwrap_or_else(|e| unreachable!("{e}")),
        );
        // The second build's output is not for the cache (another store dir): it needs no
        // publishing, only the session loop.
        let gnu = crate::formats::store_path::StoreDir::new("/gnu/store").unwrap_or_else(|e| unreachable!("{e}"));
        let made = |sd, salt| {
            crate::examples::trivial(sd, "x86_64-linux", salt, 0..1).unwrap_or_else(|e| unreachable!("{e}")).remove(0)
        };
        let drvs = [made(&sd, "slow-publish"), made(&gnu, "meanwhile")];
        let (events, mut core) = mpsc::unbounded_channel();
        let driver = Driver {
            index: 0,
            name: "m".into(),
            transport: Transport::Local { program: dir.path().join("unused"), args: vec![] },
            state_dir: dir.path().to_owned(),
            trusted: vec![HostPublicKey::Nix(host.0.public())],
            cache: Some(cache.clone()),
            substituters: None,
            host_substituters: Vec::new(),
            backoff: Backoff::local(),
            ping: Duration::from_millis(200),
            timeout_secs: None,
            max_silent_secs: None,
            max_log_size: None,
            log_written: Arc::default(),
            events,
        };
        let (to_agent, from_driver) = mpsc::channel(64);
        let (to_driver, rx) = mpsc::channel(64);
        let facts = HostFacts {
            systems: vec!["x86_64-linux".into()],
            features: vec![],
            cores: 1,
            load1: 0.0,
            free_space: 1 << 40,
            store_dirs: vec!["/nix/store".into(), "/gnu/store".into()],
            signing_key: host.0.public().to_string(),
        };
        let session = crate::coordinator::transport::Session::over(to_agent, rx, facts);
        let (cmds, mut cmd_rx) = mpsc::unbounded_channel();
        let serving = tokio::spawn(async move { driver.serve(session, &mut cmd_rx).await });
        let mut agent = FakeAgent { to_driver, from_driver };
        assert!(matches!(core.recv().await, Some(DriverEvent::Up { .. })));
        for (i, d) in drvs.iter().enumerate() {
            let job = Job {
                build: i as i64,
                uuid: format!("u{i}"),
                attempt: i as i64,
                n: 1,
                drv_path: d.drv_path.clone(),
                aterm: String::from_utf8(d.aterm.clone()).unwrap_or_else(|e| unreachable!("{e}")),
                inputs: vec![],
            };
            let _ = cmds.send(DriverCmd::Assign(Box::new(job)));
            agent.hear(|m| matches!(m, Message::Build { .. }).then_some(())).await;
        }
        // The first build's output arrives while publishing is held up...
        let held = cache.hold_publishing();
        agent.build("u0/1", &drvs[0], b"large output", &host).await;
        // ...and the second builds, is checked and reported all the same, a ping answered meanwhile.
        agent.build("u1/1", &drvs[1], b"small output", &host).await;
        let within = |what: &'static str| move |_| unreachable!("{what} within 30 s");
        let mut pinged = false;
        let second = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                tokio::select! {
                    ev = core.recv() => match ev {
                        Some(DriverEvent::Done { build: 1, result, .. }) if pinged => break result,
                        Some(DriverEvent::Done { build: 1, result, .. }) => {
                            agent.hear(|m| matches!(m, Message::Ping {}).then_some(())).await;
                            break result;
                        }
                        Some(DriverEvent::Load { .. }) => {}
                        other => unreachable!("{other:?}"),
                    },
                    () = agent.hear(|m| matches!(m, Message::Ping {}).then_some(())), if !pinged => pinged = true,
                }
            }
        })
        .await
        .unwrap_or_else(within("no end of the second build while the first was being published"));
        assert!(matches!(second, AttemptResult::Success { .. }), "{second:?}");
        assert!(!cache.has(&drvs[0].outputs["out"]), "the first is not published yet");
        drop(held);
        let first = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match core.recv().await {
                    Some(DriverEvent::Done { build: 0, result, .. }) => return result,
                    Some(DriverEvent::Load { .. }) => {}
                    other => unreachable!("{other:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(within("no end of the first build once publishing went on"));
        assert!(matches!(first, AttemptResult::Success { .. }), "{first:?}");
        assert!(cache.has(&drvs[0].outputs["out"]));
        // Both logs were written and compressed before their ends were reported.
        for uuid in ["u0", "u1"] {
            let log = super::super::logs::compressed_path(dir.path(), uuid, 1);
            assert!(log.exists(), "{}", log.display());
        }
        drop(cmds);
        let _ = serving.await;
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
