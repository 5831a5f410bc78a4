//! How a coordinator runs: its settings, and the cache's signing key.

use std::path::PathBuf;
use std::time::Duration;

use super::HttpLimits;
use super::error::{Error, IoPath as _, Result};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Parallel builds of the built-in local machine (default: this host's cores).
    pub local_builds: Option<u32>,
    /// Host paths the local machine's builds see.
    pub sandbox_paths: Vec<crate::build::sandbox::SandboxPath>,
    /// Attempts a build gets when setups fail or machines are lost, before it fails.
    pub max_attempts: u32,
    /// Times a build whose builder failed (or timed out, or fell silent) goes back to the queue,
    /// and the wait before the first (then × 3 each).
    pub retry_failed: u32,
    pub retry_failed_delay: Duration,
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
    /// The coordinator.ron file, re-read when it changes, and the flags over it.
    pub settings_file: Option<PathBuf>,
    pub overrides: crate::coordinator_file::Overrides,
    /// The settings in force at start.
    pub settings: crate::coordinator_file::Settings,
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
    /// The Guix-format key narinfos of a `/gnu/store` cache are also signed with (default
    /// `<state>/keys/guix-signing-key.sec`, created on first start).
    pub guix_key: Option<PathBuf>,
    /// Sign in Guix's format in a cache of another store dir too.
    pub guix_signatures: bool,
    /// Where to serve the cache, metrics and a status page over HTTP.
    pub http: Option<std::net::SocketAddr>,
    pub http_limits: HttpLimits,
}

/// The cache's signing key: the one given, or `<state>/keys/cache.secret`, created (with
/// `cache.public` beside it) on first start.
pub fn cache_key(config: &Config) -> Result<crate::formats::signing::SecretKey> {
    if let Some(path) = &config.cache_key {
        let text = std::fs::read_to_string(path).at(path)?;
        return crate::formats::signing::SecretKey::parse(&text)
            .map_err(|source| Error::Key { path: path.clone(), source });
    }
    let keys = config.state_dir.join("keys");
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    let secret = keys.join("cache.secret");
    let key = crate::agent::load_or_create_key(&secret, &format!("{host}-gbc-1")).at(&secret)?;
    write_public(&keys.join("cache.public"), &format!("{}\n", key.public()))?;
    Ok(key)
}

/// Keep a public key file beside its secret one, rewriting it only when it differs.
fn write_public(path: &std::path::Path, line: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() != Some(line) {
        crate::store::write_atomically(path, line.as_bytes()).at(path)?;
    }
    Ok(())
}

/// The cache's Guix signing key: the one given, or `<state>/keys/guix-signing-key.sec`, created
/// (with `guix-signing-key.pub` beside it, what `guix archive --authorize` takes) on first start.
/// A key of its own: Guix signs with ECDSA, Nix with EdDSA, and one key is not used for both.
pub fn guix_key(config: &Config) -> Result<crate::formats::guix_ecdsa::SecretKey> {
    use crate::formats::gcrypt;
    let load = |path: &std::path::Path| -> Result<_> {
        let text = std::fs::read(path).at(path)?;
        gcrypt::parse_secret_key(&text).map_err(|source| Error::GuixKey { path: path.to_owned(), source })
    };
    if let Some(path) = &config.guix_key {
        return load(path);
    }
    let keys = config.state_dir.join("keys");
    let secret = keys.join("guix-signing-key.sec");
    // Read it, or make it on first start (as `load_or_create_key` does Nix's).
    let key = match std::fs::read(&secret) {
        Ok(text) => {
            gcrypt::parse_secret_key(&text).map_err(|source| Error::GuixKey { path: secret.clone(), source })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&keys).at(&keys)?;
            let key = crate::formats::guix_ecdsa::SecretKey::generate().at(&secret)?;
            let text = format!("{}\n", gcrypt::secret_key_sx(&key).to_text());
            crate::store::write_new(&secret, text.as_bytes(), 0o600).at(&secret)?;
            key
        }
        Err(e) => return Err(e).at(&secret),
    };
    write_public(&keys.join("guix-signing-key.pub"), &format!("{}\n", gcrypt::public_key_sx(key.public()).to_text()))?;
    Ok(key)
}
