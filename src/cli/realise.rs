//! `gbc realise`: build one derivation (and, first, the input derivations whose outputs are missing)
//! into a local store, with the same code the agent uses.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use super::check_failed;
use super::drv::{CheckedDrv, input_locations, load_checked};
use crate::build::{self, BuildRequest, BuildSettings, Outcome};
use crate::formats::derivation::DrvGraph;
use crate::store::LocalStore;

/// The default state directory: `$GBC_STATE_DIR`, else `$XDG_STATE_HOME/gbc`, else
/// `~/.local/state/gbc`.
pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("GBC_STATE_DIR").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x));
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("gbc"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).context("neither XDG_STATE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/state/gbc"))
}

pub struct Options {
    pub store_root: Option<PathBuf>,
    pub cores: Option<u32>,
    pub max_silent: Option<Duration>,
    pub timeout: Option<Duration>,
    pub sandbox_paths: Vec<build::sandbox::SandboxPath>,
}

pub fn run(file: &Path, opts: &Options) -> anyhow::Result<()> {
    let root = match &opts.store_root {
        Some(r) => r.clone(),
        None => default_state_dir()?.join("agent/store"),
    };
    let store = LocalStore::open(&root)?;
    let mut settings = BuildSettings::default();
    if let Some(c) = opts.cores {
        settings.cores = c;
    }
    settings.max_silent = opts.max_silent;
    settings.timeout = opts.timeout;
    settings.sandbox_paths = opts.sandbox_paths.clone();
    let mut done = BTreeMap::new();
    let outputs = realise(&store, &settings, file, &mut DrvGraph::new(), &mut done)?;
    let mut out = io::stdout().lock();
    for path in outputs.values() {
        writeln!(out, "{path}")?;
    }
    Ok(())
}

/// Realise `file`, its missing inputs first; returns output name → path. `graph` holds the hashes
/// of derivations already checked; `done` memoises by file.
fn realise(
    store: &LocalStore,
    settings: &BuildSettings,
    file: &Path,
    graph: &mut DrvGraph,
    done: &mut BTreeMap<PathBuf, BTreeMap<String, String>>,
) -> anyhow::Result<BTreeMap<String, String>> {
    if let Some(outs) = done.get(file) {
        return Ok(outs.clone());
    }
    let CheckedDrv { drv, store_dir, name, drv_path, outputs } = load_checked(file, graph)?;
    let drv_path = store_dir.display(&drv_path);

    let mut inputs: BTreeSet<String> = drv.input_srcs.clone();
    // Sources the store lacks come from beside the file or from their own path, checked.
    for src in &drv.input_srcs {
        if store.is_valid(&store_dir, src)? {
            continue;
        }
        if let Some(found) = input_locations(file, src).into_iter().find(|p| p.symlink_metadata().is_ok()) {
            store.add_source(&store_dir, src, &found)?.map_err(|why| check_failed(file.display(), why))?;
        }
    }
    for (input, used) in &drv.input_drvs {
        let input_file = input_locations(file, input)
            .into_iter()
            .find(|p| p.exists())
            .with_context(|| format!("{}: input derivation {input} not found", file.display()))?;
        let outs = realise(store, settings, &input_file, graph, done)?;
        for o in used {
            let p = outs.get(o).with_context(|| format!("{input} has no output {o:?}"))?;
            inputs.insert(p.clone());
        }
    }

    let req =
        BuildRequest { drv_path: &drv_path, drv: &drv, store_dir: &store_dir, name: &name, outputs: &outputs, inputs };
    let mut stderr = io::stderr();
    let outcome = build::build(store, &req, settings, &mut |chunk| {
        let _ = stderr.write_all(chunk);
    });
    let result: BTreeMap<String, String> = match outcome {
        Outcome::Success { outputs, .. } => outputs.into_iter().map(|(o, info)| (o, info.path)).collect(),
        Outcome::Failed { reason, .. } => {
            return Err(check_failed(&drv_path, format!("build failed: {reason}")));
        }
        Outcome::TimedOut(d) => {
            return Err(check_failed(&drv_path, format!("build timed out after {}s", d.as_secs())));
        }
        Outcome::SilentTooLong(d) => {
            return Err(check_failed(&drv_path, format!("build was silent for more than {}s", d.as_secs())));
        }
        Outcome::MissingInputs(m) => {
            return Err(check_failed(&drv_path, format!("inputs missing from the store: {}", m.join(" "))));
        }
        Outcome::Canceled => anyhow::bail!("{drv_path}: build canceled"),
        Outcome::SetupFailure(why) => anyhow::bail!("{drv_path}: build setup failed: {why}"),
        Outcome::TransientFailure(why) => {
            return Err(check_failed(&drv_path, format!("build failed (perhaps not for good): {why}")));
        }
    };
    done.insert(file.to_owned(), result.clone());
    Ok(result)
}
