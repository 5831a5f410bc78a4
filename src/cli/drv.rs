//! `gbc drv show|path`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::check_failed;
use crate::formats::derivation::{self, Derivation, DrvGraph, GraphError};
use crate::formats::store_path::{StoreDir, StorePath};

fn read_drv(file: &Path) -> anyhow::Result<Derivation> {
    let bytes = fs::read(file).with_context(|| format!("{}", file.display()))?;
    Derivation::parse(&bytes).map_err(|e| check_failed(file.display(), e))
}

/// The derivation as JSON, in the shape of `nix show-derivation`'s value for one derivation.
pub fn to_json(drv: &Derivation) -> Value {
    let outputs: serde_json::Map<String, Value> = drv
        .outputs
        .iter()
        .map(|(name, o)| {
            let mut v = json!({ "path": o.path });
            if !o.hash_algo.is_empty() {
                v["hashAlgo"] = json!(o.hash_algo);
                v["hash"] = json!(o.hash);
            }
            (name.clone(), v)
        })
        .collect();
    json!({
        "outputs": outputs,
        "inputDrvs": drv.input_drvs,
        "inputSrcs": drv.input_srcs,
        "system": drv.system,
        "builder": drv.builder,
        "args": drv.args,
        "env": drv.env,
    })
}

pub fn show(file: &Path) -> anyhow::Result<()> {
    let drv = read_drv(file)?;
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &to_json(&drv))?;
    writeln!(out)?;
    Ok(())
}

fn identify(file: &Path, drv: &Derivation) -> anyhow::Result<(StoreDir, String, Option<StorePath>)> {
    let base = file.file_name().and_then(|b| b.to_str()).unwrap_or_default();
    derivation::identify(base, drv).map_err(|e| check_failed(file.display(), e))
}

/// Where to read an input derivation from: beside `file`, else at its own store path.
pub(super) fn input_locations(file: &Path, drv_path: &str) -> Vec<PathBuf> {
    let base = Path::new(drv_path).file_name().map(PathBuf::from).unwrap_or_default();
    let sibling = file.parent().map(|d| d.join(&base)).unwrap_or(base);
    vec![sibling, PathBuf::from(drv_path)]
}

/// A derivation file whose contents have been checked: they give its own name (when it is named
/// like a store path), every input derivation gives its path, and the declared outputs are right.
pub(super) struct CheckedDrv {
    pub drv: Derivation,
    pub store_dir: StoreDir,
    pub name: String,
    pub drv_path: StorePath,
    pub outputs: BTreeMap<String, StorePath>,
}

/// Read and check `file`, resolving its inputs into `graph` (shared between calls, so each input is
/// hashed once). Input derivations are read from beside `file`, else from their store path.
pub(super) fn load_checked(file: &Path, graph: &mut DrvGraph) -> anyhow::Result<CheckedDrv> {
    let drv = read_drv(file)?;
    let (store_dir, name, claimed) = identify(file, &drv)?;
    let drv_path = drv.drv_path(&store_dir, &name).map_err(|e| check_failed(file.display(), e))?;
    if let Some(claimed) = &claimed
        && *claimed != drv_path
    {
        return Err(check_failed(
            file.display(),
            format!("its contents give the path {}, not its own name", store_dir.display(&drv_path)),
        ));
    }
    let mut load = |p: &str| read_first(&input_locations(file, p));
    graph.resolve_inputs(&store_dir, &drv, &mut load).map_err(|e| match e {
        GraphError::Load { .. } => anyhow::Error::new(e).context(file.display().to_string()),
        e => check_failed(file.display(), format!("input derivation {e}")),
    })?;
    let outputs =
        drv.validate_outputs(&store_dir, &name, &graph.lookup()).map_err(|e| check_failed(file.display(), e))?;
    Ok(CheckedDrv { drv, store_dir, name, drv_path, outputs })
}

/// The first of `places` that exists, read.
pub(super) fn read_first(places: &[PathBuf]) -> Result<Vec<u8>, io::Error> {
    for place in places {
        match fs::read(place) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => return other,
        }
    }
    let tried: Vec<String> = places.iter().map(|p| p.display().to_string()).collect();
    Err(io::Error::new(io::ErrorKind::NotFound, format!("not found (looked at {})", tried.join(" and "))))
}

pub fn path(file: &Path) -> anyhow::Result<()> {
    let checked = load_checked(file, &mut DrvGraph::new())?;
    let sd = &checked.store_dir;
    let mut out = io::stdout().lock();
    writeln!(out, "{}", sd.display(&checked.drv_path))?;
    for (output, path) in &checked.outputs {
        writeln!(out, "{output} {}", sd.display(path))?;
    }
    Ok(())
}
