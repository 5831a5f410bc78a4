//! The machines the coordinator allocates to: the built-in local one and those of a machines file
//! (turned into specs the drivers run), and the watcher that re-reads that file.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use super::config::Config;
use super::core::Command;
use super::machine::Backoff;
use super::queue::Capabilities;
use super::transport::{self, Transport};
use crate::formats::host_key::{HostKeyError, HostPublicKey};

/// Why a machines file's entry can't be run.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("trusted key {key:?}: {source}")]
    TrustedKey { key: String, source: HostKeyError },
    #[error("machine {machine}: signing_key: {source}")]
    SigningKey { machine: String, source: HostKeyError },
    #[error("machine {0}: no signing_key and no trusted_keys")]
    NoKey(String),
    #[error("machine {0}: no user given and $USER is not set")]
    NoUser(String),
    #[error("machine {0}: no host_key and no known_hosts")]
    NoHostKey(String),
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
    pub trusted: Vec<HostPublicKey>,
    pub backoff: Backoff,
    /// Binary caches the host takes inputs from itself.
    pub substituters: Vec<String>,
}

impl MachineSpec {
    /// Whether a change from `self` to `new` needs a new session (else it applies in place).
    pub(super) fn same_session(&self, new: &MachineSpec) -> bool {
        self.transport == new.transport
            && self.trusted == new.trusted
            && self.backoff == new.backoff
            && self.substituters == new.substituters
    }
}

/// The built-in machine: this host, its agent a child process with its store in the state dir.
pub fn local_machine(config: &Config) -> MachineSpec {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let parallel = config.local_builds.unwrap_or(cores).max(1);
    let dir = config.state_dir.join("machines/localhost");
    let mut args = vec!["--state-dir".to_owned(), dir.display().to_string()];
    args.extend(sandbox_args(&config.sandbox_paths));
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
        substituters: Vec::new(),
        backoff: Backoff::local(),
    }
}

/// `--sandbox-path SPEC` for each of `paths`, as the agent takes them.
fn sandbox_args(paths: &[crate::build::sandbox::SandboxPath]) -> impl Iterator<Item = String> + '_ {
    paths.iter().flat_map(|p| ["--sandbox-path".to_owned(), p.to_string()])
}

/// The enabled machines of a machines file, as the coordinator runs them.
pub fn host_machines(file: &crate::machines::MachinesFile, config: &Config) -> Result<Vec<MachineSpec>, SpecError> {
    host_machines_where(file, config, |m| m.enabled)
}

/// The machines of a machines file that `keep` chooses, enabled or not.
pub fn host_machines_where(
    file: &crate::machines::MachinesFile,
    config: &Config,
    keep: impl Fn(&crate::machines::Machine) -> bool,
) -> Result<Vec<MachineSpec>, SpecError> {
    let trusted_all = file
        .trusted_keys
        .iter()
        .map(|k| HostPublicKey::parse(k).map_err(|source| SpecError::TrustedKey { key: k.clone(), source }))
        .collect::<Result<Vec<_>, _>>()?;
    file.machines.0.iter().filter(|m| keep(m)).map(|m| host_machine(m, &trusted_all, config)).collect()
}

fn host_machine(
    m: &crate::machines::Machine,
    trusted_all: &[HostPublicKey],
    config: &Config,
) -> Result<MachineSpec, SpecError> {
    use crate::ssh::{HostKeyCheck, Target};
    let trusted = match &m.signing_key {
        Some(k) => {
            vec![HostPublicKey::parse(k).map_err(|source| SpecError::SigningKey { machine: m.name.clone(), source })?]
        }
        None => trusted_all.to_vec(),
    };
    if trusted.is_empty() {
        return Err(SpecError::NoKey(m.name.clone()));
    }
    let user = match &m.user {
        Some(u) => u.clone(),
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .map_err(|_| SpecError::NoUser(m.name.clone()))?,
    };
    let host_key = match (&m.host_key, &m.known_hosts) {
        (Some(k), _) => HostKeyCheck::Pinned(k.clone()),
        (None, Some(f)) => HostKeyCheck::KnownHosts(f.clone()),
        (None, None) => return Err(SpecError::NoHostKey(m.name.clone())),
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
            args: m.agent_args.iter().cloned().chain(sandbox_args(&m.sandbox_paths)).collect(),
            auto_deploy: m.auto_deploy,
            program: config.agent_program.clone(),
            timing: crate::ssh::Timing { keepalive: config.ssh_keepalive, ..Default::default() },
        })),
        trusted,
        backoff: Backoff::hosts(config.reconnect_delay),
        substituters: m.substituters.clone(),
    })
}

/// How often a watched file's metadata is looked at ([`watch_file`]).
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Re-read the machines file whenever it changes, and hand the new machine list to the core; a
/// file with an error keeps the previous machines.
pub(super) fn watch_machines(path: PathBuf, config: Config, commands: mpsc::Sender<Command>) -> FileWatch {
    watch_file(path, move |path| {
        let (c, commands) = (config.clone(), commands.clone());
        async move {
            let p = path.clone();
            let reread = tokio::task::spawn_blocking(move || crate::machines::load(&p).map(|f| host_machines(&f, &c)));
            match reread.await {
                Ok(Ok(Ok(specs))) => {
                    tracing::info!("{}: re-read, {} machines", path.display(), specs.len());
                    return commands.send(Command::Reload(specs)).await.is_ok();
                }
                Ok(Err(e)) => tracing::error!("{e}; keeping the previous machines"),
                Ok(Ok(Err(e))) => tracing::error!("{}: {e}; keeping the previous machines", path.display()),
                Err(e) => tracing::error!("{}: {e}; keeping the previous machines", path.display()),
            }
            true
        }
    })
}

/// A watch of a file ([`watch_file`]); it ends when dropped.
pub(super) struct FileWatch(tokio::task::JoinHandle<()>);

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Call `changed` whenever the file at `path` changes, until it returns false. The file is read
/// every [`WATCH_EVERY`] and compared with what it held (these files are small), not watched
/// through inotify: an editor replaces a file by a rename, which only a watch of its directory
/// sees, and that directory is usually the state dir, where every database write would wake the
/// watcher (measured: a coordinator.ron in the state dir made each allocation ~1.2× slower).
pub(super) fn watch_file<F, Fut>(path: PathBuf, changed: F) -> FileWatch
where
    F: Fn(PathBuf) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    // What the file holds now, read before returning: a change made once this returns is one
    // the task compares against it.
    let mut last = std::fs::read(&path).ok();
    FileWatch(tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = tokio::fs::read(&path).await.ok();
            if now == last {
                continue;
            }
            // It may be halfway written (or between an editor's rename and write): taken once it
            // holds still.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tokio::fs::read(&path).await.ok() != now {
                continue;
            }
            last = now;
            if !changed(path.clone()).await {
                break;
            }
        }
    }))
}
