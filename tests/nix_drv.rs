//! `gbc drv` against derivations written by the real `nix-instantiate`, in /nix/store and in a
//! /gnu/store that Nix keeps in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::{gbc, nix, run, run_ok, run_ok_str, salt, tempdir};
use gbc::formats::derivation::Derivation;

const ATTRS: &[&str] = &[
    "single",
    "multi",
    "chainA",
    "chainB",
    "chainC",
    "fixedFlat",
    "fixedRecursive",
    "fixedSha1",
    "usesFixed",
    "passAsFile",
    "withSource",
    "unicode",
    "refersToChainA",
    "placeholders",
    "structured",
    // Its inputs include chain-a both directly and through refers-to-chain-a.
    "checksDisallowed",
];

/// Instantiate every attribute; returns (attribute, .drv path as Nix printed it).
fn instantiate(store: Option<&str>, salt: &str) -> Vec<(String, String)> {
    common::instantiate("tests/nix/derivations.nix", store, ATTRS, salt)
}

/// The output paths Nix recorded for a derivation, via `nix show-derivation`.
fn nix_outputs(store: Option<&str>, drv: &str) -> BTreeMap<String, String> {
    let mut cmd = nix("nix");
    cmd.arg("show-derivation");
    if let Some(store) = store {
        cmd.args(["--store", store]);
    }
    let json: serde_json::Value = serde_json::from_slice(&run_ok(cmd.arg(drv))).unwrap();
    json[drv]["outputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["path"].as_str().unwrap().to_owned()))
        .collect()
}

/// Check `gbc drv path` on `file` against what Nix says about `drv`.
fn check_drv_path(file: &Path, drv: &str, nix_outs: &BTreeMap<String, String>) {
    let out = run_ok_str(gbc().args(["drv", "path"]).arg(file));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(drv), "{}", file.display());
    let ours: BTreeMap<String, String> = lines
        .map(|l| {
            let (o, p) = l.split_once(' ').unwrap();
            (o.to_owned(), p.to_owned())
        })
        .collect();
    assert_eq!(&ours, nix_outs, "{drv}");
}

#[test]
fn drv_paths_and_output_paths_match_nix() {
    for (attr, drv) in instantiate(None, &salt()) {
        let outs = nix_outputs(None, &drv);
        assert!(!outs.is_empty(), "{attr}");
        check_drv_path(Path::new(&drv), &drv, &outs);
    }
}

#[test]
fn aterm_round_trip_is_byte_identical() {
    for (attr, drv) in instantiate(None, &salt()) {
        let bytes = fs::read(&drv).unwrap();
        let parsed = Derivation::parse(&bytes).unwrap_or_else(|e| panic!("{attr}: {e}"));
        assert!(parsed.to_aterm() == bytes, "{attr}: round trip differs");
    }
}

#[test]
fn drv_show_matches_nix_show_derivation() {
    for (attr, drv) in instantiate(None, &salt()) {
        let ours: serde_json::Value = serde_json::from_slice(&run_ok(gbc().args(["drv", "show", &drv]))).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_slice(&run_ok(nix("nix").args(["show-derivation", &drv]))).unwrap();
        assert_eq!(ours, theirs[&drv], "{attr}");
    }
}

#[test]
fn gnu_store_derivations_match_nix() {
    let tmp = tempdir();
    let (store, real) = common::gnu_store(tmp.path());
    for (attr, drv) in instantiate(Some(&store), &salt()) {
        assert!(drv.starts_with("/gnu/store/"), "{attr}: {drv}");
        let file = real.join(Path::new(&drv).file_name().unwrap());
        let outs = nix_outputs(Some(&store), &drv);
        assert!(outs.values().all(|p| p.starts_with("/gnu/store/")), "{outs:?}");
        // Inputs are read from beside the file, since /gnu/store does not exist here.
        check_drv_path(&file, &drv, &outs);
    }
}

#[test]
fn tampered_derivations_are_rejected_naming_the_file() {
    let tmp = tempdir();
    let drvs: BTreeMap<String, String> = instantiate(None, &salt()).into_iter().collect();
    let chain_b = &drvs["chainB"];
    let other_out = nix_outputs(None, &drvs["single"])["out"].clone();
    let own_out = nix_outputs(None, chain_b)["out"].clone();
    let text = fs::read_to_string(chain_b).unwrap();

    // Another package's output path, in both the outputs and the environment.
    let forged = tmp.path().join("forged.drv");
    fs::write(&forged, text.replace(&own_out, &other_out)).unwrap();
    // Copy the input beside it so only the output check can fail.
    let chain_a = &drvs["chainA"];
    fs::copy(chain_a, tmp.path().join(Path::new(chain_a).file_name().unwrap())).unwrap();
    let out = run(gbc().args(["drv", "path"]).arg(&forged));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forged.drv") && err.contains("should be") && err.lines().count() == 1, "{err}");

    // Same contents under its genuine name, but modified: the name no longer matches.
    let named = tmp.path().join(Path::new(chain_b).file_name().unwrap());
    fs::write(&named, text.replacen("\"-c\"", "\"-e\"", 1)).unwrap();
    let out = run(gbc().args(["drv", "path"]).arg(&named));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not its own name"), "{err}");

    // Not a derivation at all.
    let junk = tmp.path().join("junk.drv");
    fs::write(&junk, "hello").unwrap();
    let out = run(gbc().args(["drv", "path"]).arg(&junk));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.drv: byte 0: expected"));

    // A file that does not exist is an I/O error.
    let out = run(gbc().args(["drv", "path"]).arg(tmp.path().join("missing.drv")));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_missing_input_derivation_is_reported() {
    let tmp = tempdir();
    let (store, real) = common::gnu_store(tmp.path());
    let drvs: BTreeMap<String, String> = instantiate(Some(&store), &salt()).into_iter().collect();
    let chain_b = real.join(Path::new(&drvs["chainB"]).file_name().unwrap());
    let chain_a = real.join(Path::new(&drvs["chainA"]).file_name().unwrap());
    fs::remove_file(&chain_a).unwrap();
    let out = run(gbc().args(["drv", "path"]).arg(&chain_b));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chain-a.drv") && err.contains("not found"), "{err}");
}

/// Text paths (with references) and source paths, as Nix makes them, are recognised from their
/// contents; the wrong references are not.
#[test]
fn content_addresses_match_nix_s_text_and_source_paths() {
    use gbc::formats::store_path::{ContentAddress, StoreDir};
    let s = salt();
    let expr = format!(
        r#"let a = builtins.toFile "a" "x {s}"; in builtins.toString [ a (builtins.toFile "b" "see ${{a}}") ]"#
    );
    let printed = run_ok_str(nix("nix-instantiate").args(["--eval", "--strict", "--read-write-mode", "-E", &expr]));
    let paths: Vec<String> = printed.trim().trim_matches('"').split(' ').map(str::to_owned).collect();
    let (a, b) = (&paths[0], &paths[1]);
    let dir = tempdir();
    let tree = dir.path().join(format!("tree-{}", s.replace('-', "")));
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("f"), &s).unwrap();
    let added = run_ok_str(nix("nix-store").arg("--add").arg(&tree)).trim().to_owned();

    let sd = StoreDir::new("/nix/store").unwrap();
    let address = |p: &str, refs: &[String]| {
        let (hash, _) = gbc::formats::nar::nar_hash(Path::new(p)).unwrap();
        let nar: [u8; 32] = hash.digest().try_into().unwrap();
        let flat = Path::new(p).is_file().then(|| gbc::formats::hash::sha256(&fs::read(p).unwrap()));
        sd.content_address(&sd.parse_path(p).unwrap(), refs, &nar, flat.as_ref())
    };
    assert!(matches!(address(a, &[]), Some(ContentAddress::Text(_))));
    assert!(matches!(address(b, std::slice::from_ref(a)), Some(ContentAddress::Text(_))));
    assert_eq!(address(b, &[]), None, "b refers to a");
    let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", &added]));
    match address(&added, &[]) {
        Some(ContentAddress::Source(h)) => assert_eq!(h.to_nix32_string(), theirs.trim()),
        other => panic!("{added}: {other:?}"),
    }
    assert_eq!(address(&added, std::slice::from_ref(a)), None);
}
