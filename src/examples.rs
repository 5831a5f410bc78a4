//! Derivations gbc makes itself, with no Nix or Guix: the example graph shipped in `examples/`
//! (regenerate it with `cargo run --example make-examples`; a test checks the files are current)
//! and the trivial derivations the benchmarks submit by the thousand.

use std::collections::{BTreeMap, BTreeSet};

use crate::formats::derivation::{Derivation, DrvError, DrvGraph, Output, instantiate};
use crate::formats::store_path::StoreDir;

/// One derivation made here: its `.drv` path and its ATerm.
#[derive(Debug, Clone)]
pub struct Made {
    pub name: String,
    pub drv_path: String,
    pub aterm: Vec<u8>,
    pub outputs: BTreeMap<String, String>,
}

/// A `/bin/sh -c SCRIPT` derivation with one output, `out`, like Nix's `derivation { builder =
/// "/bin/sh"; args = [ "-c" script ]; ... }`. `inputs` are earlier derivations it reads the `out`
/// of.
pub fn shell(
    store_dir: &StoreDir,
    graph: &mut DrvGraph,
    system: &str,
    name: &str,
    script: &str,
    inputs: &[&Made],
) -> Result<Made, DrvError> {
    let mut drv = Derivation {
        outputs: BTreeMap::from([("out".to_owned(), Output::default())]),
        input_drvs: inputs.iter().map(|m| (m.drv_path.clone(), BTreeSet::from(["out".to_owned()]))).collect(),
        input_srcs: BTreeSet::new(),
        system: system.to_owned(),
        builder: "/bin/sh".to_owned(),
        args: vec!["-c".to_owned(), script.to_owned()],
        env: BTreeMap::from([
            ("builder".to_owned(), "/bin/sh".to_owned()),
            ("name".to_owned(), name.to_owned()),
            ("system".to_owned(), system.to_owned()),
        ]),
    };
    let path = instantiate(&mut drv, store_dir, name, &graph.lookup())?;
    let drv_path = store_dir.display(&path);
    let hashes = drv.hash_modulo(store_dir, name, false, &graph.lookup())?;
    graph.insert(&drv_path, hashes);
    let outputs = drv.outputs.iter().map(|(o, out)| (o.clone(), out.path.clone())).collect();
    Ok(Made { name: name.to_owned(), drv_path, aterm: drv.to_aterm(), outputs })
}

/// The example graph: a diamond (`base` → `left`, `right` → `top`) and, beside it, `broken`, which
/// fails on purpose, and `after-broken`, which needs it and so never runs.
pub fn diamond(system: &str) -> Result<Vec<Made>, DrvError> {
    let sd = StoreDir::new("/gnu/store")?;
    let mut g = DrvGraph::new();
    let base = shell(
        &sd,
        &mut g,
        system,
        "example-base",
        "echo 'base: the foundation everything else reads'; /bin/sleep 1; echo base > $out",
        &[],
    )?;
    let left = shell(
        &sd,
        &mut g,
        system,
        "example-left",
        &format!(
            "echo 'left: reading base'; /bin/sleep 1; read b < {}; echo \"$b + left\" > $out",
            base.outputs["out"]
        ),
        &[&base],
    )?;
    let right = shell(
        &sd,
        &mut g,
        system,
        "example-right",
        &format!(
            "echo 'right: reading base'; /bin/sleep 1; read b < {}; echo \"$b + right\" > $out",
            base.outputs["out"]
        ),
        &[&base],
    )?;
    let top = shell(
        &sd,
        &mut g,
        system,
        "example-top",
        &format!(
            "echo 'top: joining left and right'; /bin/cat {} {} > $out",
            left.outputs["out"], right.outputs["out"]
        ),
        &[&left, &right],
    )?;
    let broken = shell(
        &sd,
        &mut g,
        system,
        "example-broken",
        &format!("echo 'broken: read base, now failing on purpose' >&2; /bin/cat {} >&2; exit 1", base.outputs["out"]),
        &[&base],
    )?;
    let after = shell(
        &sd,
        &mut g,
        system,
        "example-after-broken",
        &format!("/bin/cat {} {} > $out", broken.outputs["out"], top.outputs["out"]),
        &[&broken, &top],
    )?;
    Ok(vec![base, left, right, top, broken, after])
}

/// `n` independent trivial derivations (`echo $i > $out`) in `store_dir`, made distinct by `salt`.
pub fn trivial(
    store_dir: &StoreDir,
    system: &str,
    salt: &str,
    range: std::ops::Range<u64>,
) -> Result<Vec<Made>, DrvError> {
    let mut g = DrvGraph::new();
    range
        .map(|i| shell(store_dir, &mut g, system, &format!("trivial-{i}"), &format!("echo {i} {salt} > $out"), &[]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_derivation_is_byte_for_byte_what_nix_instantiates() -> Result<(), Box<dyn std::error::Error>> {
        // tests/fixtures/drv/*-single.drv was written by nix-instantiate (Nix 2.8) from
        // tests/nix/derivations.nix's `single` with an empty salt.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/drv");
        let file = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with("-single.drv"))
            .ok_or("no single.drv fixture")?;
        let sd = StoreDir::new("/nix/store")?;
        let made = shell(&sd, &mut DrvGraph::new(), "x86_64-linux", "single", "echo single  > $out", &[])?;
        assert_eq!(made.drv_path, format!("/nix/store/{}", file.file_name().to_string_lossy()));
        assert_eq!(made.aterm, std::fs::read(file.path())?);
        Ok(())
    }

    #[test]
    fn the_shipped_examples_are_current() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diamond"));
        let made = diamond("x86_64-linux")?;
        let mut shipped: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".drv"))
            .collect();
        shipped.sort();
        let mut expected: Vec<String> =
            made.iter().map(|m| m.drv_path.rsplit('/').next().unwrap_or_default().to_owned()).collect();
        expected.sort();
        assert_eq!(shipped, expected, "examples/diamond is stale: run cargo run --example make-examples");
        for m in &made {
            let base = m.drv_path.rsplit('/').next().unwrap_or_default();
            assert_eq!(std::fs::read(dir.join(base))?, m.aterm, "{base} is stale");
        }
        Ok(())
    }
}
