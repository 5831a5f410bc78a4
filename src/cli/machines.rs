//! `gbc check-config` and `gbc machines test`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use super::check_failed;
use super::realise::default_state_dir;
use crate::coordinator::{self, Config, probe};
use crate::machines::{self, MachinesFile};

fn machines_path(file: Option<PathBuf>, state_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match file {
        Some(f) => Ok(f),
        None => Ok(match state_dir {
            Some(s) => s,
            None => default_state_dir()?,
        }
        .join("machines.ron")),
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<MachinesFile> {
    machines::load(path).map_err(|e| check_failed("machines file", e))
}

pub fn check_config(file: Option<PathBuf>, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(f) = &file
        && f.file_name().is_some_and(|n| n.to_string_lossy().contains("coordinator"))
    {
        return check_coordinator_file(f);
    }
    let beside = file.is_none();
    let path = machines_path(file, state_dir)?;
    let parsed = load(&path)?;
    let mut out = std::io::stdout().lock();
    for m in &parsed.machines.0 {
        writeln!(
            out,
            "{}: {}@{}:{}, {} x {}{}{}",
            m.name,
            m.user.as_deref().unwrap_or("$USER"),
            m.host,
            m.port,
            m.parallel_builds,
            m.systems.join(" "),
            if m.features.is_empty() { String::new() } else { format!(" [{}]", m.features.join(" ")) },
            if m.enabled { "" } else { " (disabled)" },
        )?;
    }
    writeln!(out, "{}: {} machines, ok", path.display(), parsed.machines.0.len())?;
    drop(out);
    let coordinator = path.with_file_name("coordinator.ron");
    if beside && coordinator.exists() {
        return check_coordinator_file(&coordinator);
    }
    Ok(())
}

/// Check a coordinator.ron as the coordinator would (its key files read too).
fn check_coordinator_file(path: &std::path::Path) -> anyhow::Result<()> {
    use crate::coordinator_file::{Overrides, Settings};
    let s = Settings::load(Some(path), &Overrides::default()).map_err(|e| check_failed("coordinator settings", e))?;
    println!(
        "{}: {} substituters, {} substituter keys, {} hooks, ok",
        path.display(),
        s.substituters.len(),
        s.substituter_keys.len(),
        s.hooks.len()
    );
    Ok(())
}

pub fn test(file: Option<PathBuf>, state_dir: Option<PathBuf>, name: Option<String>) -> anyhow::Result<()> {
    let (path, specs) = specs(file, state_dir, name.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut failed = Vec::new();
    for spec in &specs {
        println!("{}:", spec.name);
        for step in runtime.block_on(probe::probe(spec)) {
            match step.outcome {
                Ok(said) => println!("  ok    {}: {said}", step.what),
                Err(f) => {
                    println!("  FAIL  {}: {}: {}", step.what, f.kind, f.message);
                    failed.push(format!("{} ({})", spec.name, f.kind));
                }
            }
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    if specs.is_empty() {
        println!("{}: no machines", path.display());
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow::Error::new(super::CheckFailed(format!("machines failing: {}", failed.join(", ")))))
    }
}

/// The machines of the file (all, or the one named), as the coordinator would reach them.
fn specs(
    file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    name: Option<&str>,
) -> anyhow::Result<(PathBuf, Vec<coordinator::MachineSpec>)> {
    let path = machines_path(file, state_dir)?;
    let parsed = load(&path)?;
    let specs = coordinator::host_machines_where(&parsed, &probe_config()?, |m| name.is_none_or(|n| m.name == n))
        .map_err(|e| check_failed(path.display(), e))?;
    if let Some(n) = name
        && specs.is_empty()
    {
        anyhow::bail!("{}: no machine named {n:?}", path.display());
    }
    Ok((path, specs))
}

/// A coordinator configuration for talking to machines from the command line.
fn probe_config() -> anyhow::Result<Config> {
    Ok(Config {
        state_dir: PathBuf::new(),
        socket: PathBuf::new(),
        local_builds: None,
        sandbox_paths: Vec::new(),
        max_attempts: 1,
        retry_failed: 0,
        retry_failed_delay: std::time::Duration::ZERO,
        grace: Duration::ZERO,
        timeout_secs: None,
        max_silent_secs: None,
        max_log_size: None,
        agent_program: std::env::current_exe()?,
        machines_file: None,
        settings_file: None,
        overrides: Default::default(),
        settings: crate::coordinator_file::Settings::default(),
        reconnect_delay: Duration::from_secs(60),
        ssh_keepalive: Duration::from_secs(15),
        ping_interval: Duration::from_secs(30),
        compression: crate::cache::Compression::Zstd,
        cache_store_dir: "/nix/store".into(),
        cache_key: None,
        guix_key: None,
        guix_signatures: false,
        http: None,
        http_limits: Default::default(),
    })
}

pub fn fetch(file: Option<PathBuf>, state_dir: Option<PathBuf>, name: &str, store_path: &str) -> anyhow::Result<()> {
    let (_, specs) = specs(file, state_dir, Some(name))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut fetched = Vec::new();
    for spec in &specs {
        fetched.push(runtime.block_on(probe::fetch(spec, store_path)).map_err(|e| anyhow::anyhow!("{name}: {e}"))?);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    for f in fetched {
        let secs = f.elapsed.as_secs_f64();
        println!("{} {} {:.3} {:.1}", f.nar_size, f.nar_hash, secs, f.nar_size as f64 / secs / 1e6);
    }
    Ok(())
}
