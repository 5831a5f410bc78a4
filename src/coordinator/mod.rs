//! `gbc coordinator`: the durable queue, allocation, and the machines' drivers.
//!
//! Tasks: the core (`core`) owns the in-memory queue and the machines' slots and is the only
//! writer of build state; the client server (`server`) accepts connections on the Unix socket;
//! one driver (`machine`) per machine talks to its agent. They talk through channels; the
//! database is the truth, so a crash at any point loses nothing (see ARCHITECTURE.md).
//!
//! The parts: `config` (settings, keys), `specs` (machines.ron → the machines the core runs, and
//! the file's watcher), `core` (allocation, commits, cancel), `outcome` (what an attempt's end
//! decides: pure), `machine` (drivers), `transport` (how sessions start), `server`, `http`.

mod config;
mod core;
mod error;
mod hooks;
mod http;
pub mod logs;
pub mod machine;
mod outcome;
pub mod probe;
pub mod queue;
mod server;
mod specs;
pub mod submit;
pub mod transport;
mod upload;
mod wire;

pub use config::{Config, cache_key};
pub use error::Error;
use error::{IoPath as _, Result};
pub use http::HttpLimits;
pub use specs::{MachineSpec, host_machines, host_machines_where, local_machine};

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use self::core::{Command, Core, RealDrivers};
use crate::api::now_ms;
use crate::db::Db;
use machine::DriverEvent;

/// Where a coordinator takes connections: its client socket and, when asked, its HTTP port.
pub struct Listeners {
    socket: tokio::net::UnixListener,
    http: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Bind what `config` names. The HTTP port is bound before the client socket, so that a
    /// coordinator whose socket answers takes HTTP connections too (they wait in the backlog until
    /// it serves them). Fails when another coordinator listens on the socket.
    pub async fn bind(config: &Config) -> Result<Listeners> {
        let http = match config.http {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Http { addr, source })?)
            }
            None => None,
        };
        let socket = server::bind(&config.socket)?;
        Ok(Listeners { socket, http })
    }
}

/// Re-read coordinator.ron whenever it changes: settings that check out replace the ones in force;
/// an edit with an error is logged and changes nothing.
fn watch_settings(
    path: std::path::PathBuf,
    overrides: crate::coordinator_file::Overrides,
    substituters: Arc<crate::substituter::Substituters>,
    hooks: Arc<hooks::Hooks>,
) -> specs::FileWatch {
    specs::watch_file(path, move |path| {
        let (overrides, substituters, hooks) = (overrides.clone(), substituters.clone(), hooks.clone());
        async move {
            let p = path.clone();
            let reread =
                tokio::task::spawn_blocking(move || crate::coordinator_file::Settings::load(Some(&p), &overrides));
            match reread.await {
                Ok(Ok(s)) => {
                    tracing::info!(
                        "{}: re-read: {} substituters, {} substituter keys, {} hooks",
                        path.display(),
                        s.substituters.len(),
                        s.substituter_keys.len(),
                        s.hooks.len()
                    );
                    substituters.update(&s);
                    hooks.update(s.hooks.clone());
                }
                Ok(Err(e)) => tracing::error!("{e}; keeping the previous settings"),
                Err(e) => tracing::error!("{}: {e}; keeping the previous settings", path.display()),
            }
            true
        }
    })
}

/// Run a coordinator on `listeners` until `shutdown` completes: then no new build starts, running
/// builds get the grace period to finish, and the rest go back to the queue.
pub async fn run(
    config: Config,
    machines: Vec<MachineSpec>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let db = Arc::new(open_state(&config).await?);
    let store_dir = crate::formats::store_path::StoreDir::new(&config.cache_store_dir)
        .map_err(|source| Error::StoreDir { dir: config.cache_store_dir.clone(), source })?;
    let guix = store_dir.as_str() == "/gnu/store" || config.guix_signatures || config.guix_key.is_some();
    let mut cache =
        crate::cache::Cache::open(&config.state_dir.join("cache"), store_dir, cache_key(&config)?, config.compression)
            .map_err(Error::Cache)?;
    if guix {
        // Guix clients check `Signature:` lines, not Nix's `Sig:` (Nix ignores `Signature:`).
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        cache = cache.with_guix_key(config::guix_key(&config)?, host);
    }
    let cache = Arc::new(cache);
    let substituters = Arc::new(crate::substituter::Substituters::new(&config.settings, cache.store_dir().clone()));

    // Events are stored for the hooks from the first change on; they run beside the core.
    let hooks = hooks::Hooks::new(config.settings.hooks.clone(), db.clone());
    let hooks_task = tokio::spawn(hooks::run(db.clone(), hooks.clone(), config.socket.clone()));

    let (events, _) = broadcast::channel(16 * 1024);
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(1024);
    let (drv_tx, drv_rx) = mpsc::unbounded_channel::<DriverEvent>();
    let log_written = Arc::new(tokio::sync::Notify::new());
    let drivers = RealDrivers {
        config: config.clone(),
        log_written: log_written.clone(),
        cache: cache.clone(),
        substituters: substituters.clone(),
        events: drv_tx,
    };
    let mut core =
        Core::new(config.clone(), db.clone(), cache.clone(), events.clone(), Box::new(drivers), machines).await?;
    tracing::info!("coordinator: {} builds queued; listening on {}", core.queued_len(), config.socket.display());

    let _watcher =
        config.machines_file.as_ref().map(|path| specs::watch_machines(path.clone(), config.clone(), cmd_tx.clone()));
    // The settings in force, re-read when coordinator.ron changes (the flags stay over it). Said
    // once the watcher is in place, so that an edit made after this line is seen.
    let _settings_watcher = config
        .settings_file
        .as_ref()
        .map(|path| watch_settings(path.clone(), config.overrides.clone(), substituters.clone(), hooks.clone()));
    tracing::info!(
        "settings: {} substituters, {} substituter keys, {} hooks",
        config.settings.substituters.len(),
        config.settings.substituter_keys.len(),
        config.settings.hooks.len()
    );
    let http_task = listeners.http.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("serving the cache and metrics on http://{addr}");
        }
        let h = http::Http::new(
            config.state_dir.join("cache"),
            config.cache_store_dir.clone(),
            db.clone(),
            cmd_tx.clone(),
            config.http_limits,
            substituters.clone(),
            hooks.clone(),
        );
        tokio::spawn(http::serve(Arc::new(h), listener))
    });
    let srv = server::Server {
        requests: tokio::sync::Semaphore::new(server::REQUEST_MEMORY / server::REQUEST_PIECE),
        db,
        cache,
        substituters,
        commands: cmd_tx.clone(),
        events,
        log_written,
        state_dir: config.state_dir.clone(),
        hooks,
        followers: Default::default(),
    };
    let server_task = tokio::spawn(server::serve(Arc::new(srv), listeners.socket));
    let grace = config.grace;
    let stopper = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("stopping: no new builds start; running builds get {grace:?} to finish");
        let _ = cmd_tx.send(Command::Shutdown).await;
    });
    let result = core.run(cmd_rx, drv_rx).await;
    server_task.abort();
    stopper.abort();
    hooks_task.abort();
    if let Some(t) = http_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    result
}

/// Make the state dir the coordinator's alone (its database, build logs, which may hold
/// secrets, keys; older state dirs are tightened too), open the database and recover from a
/// stop: builds that were running go back to the queue.
async fn open_state(config: &Config) -> Result<Db> {
    let private = |path: &std::path::Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).at(path)
    };
    std::fs::create_dir_all(&config.state_dir).at(&config.state_dir)?;
    private(&config.state_dir, 0o700)?;
    let db_path = config.state_dir.join("gbc.sqlite");
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // SQLite gives its -wal and -shm files the database file's mode.
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&db_path).at(&db_path)?;
    }
    private(&db_path, 0o600)?;
    let db = Db::open(&db_path).await?;
    let interrupted = db.recover(now_ms()).await?;
    let state_dir = config.state_dir.clone();
    let count = interrupted.len();
    // Their logs are compressed as every ended attempt's is (off the runtime).
    let _ = tokio::task::spawn_blocking(move || {
        for (uuid, n) in &interrupted {
            let _ = logs::compress(&logs::plain_path(&state_dir, uuid, *n));
        }
    })
    .await;
    if count > 0 {
        tracing::info!("{count} builds that were running when the coordinator stopped are queued again");
    }
    Ok(db)
}
