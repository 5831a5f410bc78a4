//! Keys and signatures against the real Nix: keys from either side work in the other, narinfos
//! signed by gbc are accepted by `nix copy` from a file:// binary cache, and untrusted ones refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{gbc, nix, nix_realise, run, run_ok, run_ok_str, salt, tempdir};

/// An input-addressed store path (a built output) that references another, so that Nix insists on
/// signatures (it accepts content-addressed paths without any) and fingerprints carry references.
/// Returns (x, y) where x refers to y.
fn store_paths_with_reference() -> (String, String) {
    let drv = run_ok_str(nix("nix-instantiate").arg(common::repo_path("tests/nix/derivations.nix")).args([
        "--argstr",
        "salt",
        &salt(),
        "-A",
        "refersToChainA",
    ]));
    let x = nix_realise(&[drv.trim()], &[]);
    let x = x.trim().to_owned();
    let refs = run_ok_str(nix("nix-store").args(["-q", "--references", &x]));
    let y = refs.lines().next().expect("x refers to y").to_owned();
    (x, y)
}

/// A file:// binary cache holding `path`'s closure, signed by `secret` if given.
fn make_cache(dir: &Path, path: &str, secret: Option<&Path>) -> String {
    let mut url = format!("file://{}?compression=none", dir.display());
    if let Some(s) = secret {
        url.push_str(&format!("&secret-key={}", s.display()));
    }
    run_ok(nix("nix").args(["copy", "--to", &url, path]));
    format!("file://{}", dir.display())
}

fn narinfos(cache: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 2, "narinfos for x and y");
    v
}

/// Copy `path` from the cache into a fresh store, trusting only `public_key`; true if Nix accepted.
fn nix_accepts(cache_url: &str, path: &str, public_key: &str, tmp: &Path) -> bool {
    let fresh = tmp.join(format!("store-{}", salt()));
    let out = run(nix("nix").args([
        "copy",
        "--from",
        cache_url,
        "--to",
        &format!("local?root={}", fresh.display()),
        "--option",
        "trusted-public-keys",
        public_key,
        path,
    ]));
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("signature"), "nix copy failed for another reason than signatures: {err}");
    }
    out.status.success()
}

fn keygen_gbc(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (s, p) = (dir.join(format!("{name}.secret")), dir.join(format!("{name}.public")));
    run_ok(gbc().arg("keygen").arg(name).arg(&s).arg(&p));
    (s, p)
}

fn keygen_nix(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (s, p) = (dir.join(format!("{name}.secret")), dir.join(format!("{name}.public")));
    run_ok(nix("nix-store").arg("--generate-binary-cache-key").arg(name).arg(&s).arg(&p));
    (s, p)
}

#[test]
fn narinfos_signed_by_gbc_are_accepted_by_nix_and_untrusted_ones_refused() {
    let tmp = tempdir();
    let (x, _y) = store_paths_with_reference();
    let cache = tmp.path().join("cache");
    let url = make_cache(&cache, &x, None);
    let (secret, public) = keygen_gbc(tmp.path(), "gbc-test-1");
    let (_, other_public) = keygen_gbc(tmp.path(), "gbc-other-1");

    let pk = fs::read_to_string(&public).unwrap();
    assert!(!nix_accepts(&url, &x, &pk, tmp.path()), "unsigned cache accepted");

    run_ok(gbc().arg("sign").arg("--key").arg(&secret).args(narinfos(&cache)));
    assert!(nix_accepts(&url, &x, &pk, tmp.path()), "Nix refused gbc's signatures");
    run_ok(gbc().arg("verify").arg("--trusted").arg(&public).args(narinfos(&cache)));

    let other = fs::read_to_string(&other_public).unwrap();
    assert!(!nix_accepts(&url, &x, &other, tmp.path()), "Nix accepted an untrusted key");
    let out = run(gbc().arg("verify").arg("--trusted").arg(&other_public).args(narinfos(&cache)));
    assert_eq!(out.status.code(), Some(1), "gbc accepted an untrusted key");
}

#[test]
fn nix_keys_work_in_gbc() {
    let tmp = tempdir();
    let (x, _y) = store_paths_with_reference();
    let (secret, public) = keygen_nix(tmp.path(), "nix-made-1");

    // Nix signs, gbc verifies.
    let signed_by_nix = tmp.path().join("signed-by-nix");
    make_cache(&signed_by_nix, &x, Some(&secret));
    let ok = run_ok_str(gbc().arg("verify").arg("--trusted").arg(&public).args(narinfos(&signed_by_nix)));
    assert!(ok.contains("signed by nix-made-1"), "{ok}");

    // gbc signs with Nix's key, Nix verifies.
    let cache = tmp.path().join("signed-by-gbc");
    let url = make_cache(&cache, &x, None);
    run_ok(gbc().arg("sign").arg("--key").arg(&secret).args(narinfos(&cache)));
    assert!(nix_accepts(&url, &x, &fs::read_to_string(&public).unwrap(), tmp.path()));
}

#[test]
fn gbc_keys_work_in_nix() {
    let tmp = tempdir();
    let (x, _y) = store_paths_with_reference();
    let (secret, public) = keygen_gbc(tmp.path(), "gbc-made-1");
    let cache = tmp.path().join("cache");
    let url = make_cache(&cache, &x, Some(&secret));
    assert!(nix_accepts(&url, &x, &fs::read_to_string(&public).unwrap(), tmp.path()));
    run_ok(gbc().arg("verify").arg("--trusted").arg(&public).args(narinfos(&cache)));
}

#[test]
fn a_tampered_narinfo_fails_verification_in_both() {
    let tmp = tempdir();
    let (x, y) = store_paths_with_reference();
    let (secret, public) = keygen_gbc(tmp.path(), "gbc-tamper-1");
    let cache = tmp.path().join("cache");
    let url = make_cache(&cache, &x, Some(&secret));
    // Drop x's reference to y: the signature no longer covers what the narinfo says.
    let y_base = Path::new(&y).file_name().unwrap().to_str().unwrap().to_owned();
    let x_info = cache.join(format!("{}.narinfo", &Path::new(&x).file_name().unwrap().to_str().unwrap()[..32]));
    let text = fs::read_to_string(&x_info).unwrap();
    assert!(text.contains(&y_base), "{text}");
    fs::write(&x_info, text.replace(&y_base, "")).unwrap();
    let out = run(gbc().arg("verify").arg("--trusted").arg(&public).arg(&x_info));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no valid signature"));
    assert!(!nix_accepts(&url, &x, &fs::read_to_string(&public).unwrap(), tmp.path()));
}
