//! `gbc agent`: set up from the command line, then serve on stdin/stdout.

use std::io;
use std::path::PathBuf;

use anyhow::Context as _;

use super::args::AgentOpts;
use super::realise::default_state_dir;
use crate::agent::{AgentConfig, load_or_create_host_key, native_system, serve};
use crate::build::BuildSettings;
use crate::formats::store_path::StoreDir;
use crate::store::LocalStore;

pub fn run(opts: AgentOpts) -> anyhow::Result<()> {
    // The agent's stderr ends up in the coordinator's log (it relays each line, naming the
    // machine): plain lines, no time of their own.
    let filter = tracing_subscriber::EnvFilter::try_from_env("GBC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .with_writer(io::stderr)
        .try_init();
    let state = match opts.state_dir {
        Some(s) => s,
        None => default_state_dir()?,
    };
    let scratch = opts.scratch_store.then(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Scratch(state.join(format!("agent/scratch-{}-{nanos}", std::process::id())))
    });
    let store_root = match (&scratch, opts.store_root) {
        (Some(s), _) => s.0.clone(),
        (None, Some(r)) => r,
        (None, None) => state.join("agent/store"),
    };
    let store = LocalStore::open(&store_root)?;
    let key_file = opts.signing_key.unwrap_or_else(|| state.join("agent/signing-key.secret"));
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    let signing_key = load_or_create_host_key(&key_file, &format!("gbc-agent-{host}-1"))?;
    let dirs = if opts.store_dirs.is_empty() {
        vec!["/gnu/store".to_owned(), "/nix/store".to_owned()]
    } else {
        opts.store_dirs
    };
    let store_dirs = dirs
        .iter()
        .map(|d| StoreDir::new(d).with_context(|| format!("--store-dir {d}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut settings = BuildSettings::default();
    if let Some(c) = opts.cores {
        settings.cores = c;
    }
    settings.sandbox_paths = opts.sandbox_paths;
    let systems = if opts.systems.is_empty() { vec![native_system()] } else { opts.systems };
    let config =
        AgentConfig { store, signing_key, host_name: host, settings, store_dirs, systems, features: opts.features };
    // The raw descriptor, buffered once (std's stdin has a buffer of its own, behind a lock).
    let stdin = std::fs::File::from(rustix::io::dup(io::stdin())?);
    let input = io::BufReader::with_capacity(16 * 1024, stdin);
    serve(config, input, io::BufWriter::with_capacity(64 * 1024, super::raw_stdout()?))?;
    drop(scratch);
    Ok(())
}

/// A scratch store, removed (made writable first: store paths are read-only) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        fn writable(dir: &std::path::Path) {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    writable(&entry.path());
                }
            }
        }
        writable(&self.0);
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("removing the scratch store {}: {e}", self.0.display());
        }
    }
}
