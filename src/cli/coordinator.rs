//! `gbc coordinator`: set up from the command line and run until stopped.

use anyhow::Context as _;

use super::args::CoordinatorOpts;
use super::realise::default_state_dir;
use crate::coordinator::{self, Config};

pub fn run(opts: CoordinatorOpts) -> anyhow::Result<()> {
    let state_dir = match opts.state_dir {
        Some(s) => s,
        None => default_state_dir()?,
    };
    let machines_file = match opts.machines {
        Some(f) => Some(f),
        None => Some(state_dir.join("machines.ron")).filter(|f| f.exists()),
    };
    let settings_file = match opts.config {
        Some(f) => Some(f),
        None => Some(state_dir.join("coordinator.ron")).filter(|f| f.exists()),
    };
    let overrides = crate::coordinator_file::Overrides {
        substituters: (!opts.substituters.is_empty()).then_some(opts.substituters),
        substituter_keys: (!opts.substituter_keys.is_empty()).then_some(opts.substituter_keys),
        narinfo_ttl: opts.narinfo_ttl,
        narinfo_negative_ttl: opts.narinfo_negative_ttl,
        sign_substitutes: opts.sign_substitutes,
    };
    let settings = crate::coordinator_file::Settings::load(settings_file.as_deref(), &overrides)
        .map_err(|e| super::check_failed("coordinator settings", e))?;
    let file = match &machines_file {
        Some(f) => Some(crate::machines::load(f).map_err(|e| super::check_failed("machines file", e))?),
        None => None,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GBC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    let config = Config {
        socket: state_dir.join("gbc.sock"),
        state_dir,
        local_builds: opts.local_builds,
        sandbox_paths: opts.sandbox_paths.clone(),
        max_attempts: opts.max_attempts,
        retry_failed: opts.retry_failed,
        retry_failed_delay: opts.retry_failed_delay,
        grace: opts.grace,
        timeout_secs: opts.timeout.map(|d| d.as_secs()),
        max_silent_secs: opts.max_silent_time.map(|d| d.as_secs()),
        max_log_size: (opts.max_log_size > 0).then_some(opts.max_log_size),
        agent_program: std::env::current_exe().context("finding the gbc binary")?,
        machines_file,
        settings_file,
        overrides,
        settings,
        reconnect_delay: opts.reconnect_delay,
        ssh_keepalive: opts.ssh_keepalive,
        ping_interval: opts.ping_interval,
        compression: opts.compression.into(),
        cache_store_dir: opts.cache_store_dir,
        cache_key: opts.signing_key,
        guix_key: opts.guix_signing_key,
        guix_signatures: opts.guix_signatures,
        http: opts.http,
        http_limits: coordinator::HttpLimits {
            header_timeout: opts.http_header_timeout,
            idle_timeout: opts.http_idle_timeout,
            max_connections: usize::try_from(opts.http_max_connections).unwrap_or(usize::MAX),
            read_ahead: coordinator::HttpLimits::DEFAULT_READ_AHEAD,
        },
    };
    let mut machines = Vec::new();
    match &file {
        Some(file) => {
            if opts.local_builds.is_some() {
                machines.push(coordinator::local_machine(&config));
            }
            machines.extend(coordinator::host_machines(file, &config)?);
        }
        None => machines.push(coordinator::local_machine(&config)),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listeners = coordinator::Listeners::bind(&config).await?;
        coordinator::run(config, machines, listeners, stop_signal()).await
    })?;
    Ok(())
}

/// Completes at the first SIGINT or SIGTERM (never, if they cannot be caught).
async fn stop_signal() {
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
