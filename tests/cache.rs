//! The binary cache with a real Nix client: outputs the coordinator builds are published under
//! `<state>/cache` as zstd NARs with narinfos signed by the coordinator's key, and Nix fetches
//! them, verifying the signature (or refuses them, trusting another key).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use common::{Coordinator, nix, run, run_ok_str, salt};
use gbc::formats::narinfo::NarInfo;

#[test]
fn nix_copies_what_the_coordinator_built_and_only_with_its_key() {
    let c = Coordinator::start(&["--local-builds", "2"]);
    let drvs = common::instantiate("tests/nix/queue.nix", None, &["top"], &salt());
    let out = run(&mut c.gbc(&["build", &drvs[0].1]));
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.log());
    let top = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let cache = c.state.join("cache");
    assert_eq!(
        std::fs::read_to_string(cache.join("nix-cache-info")).unwrap().lines().next(),
        Some("StoreDir: /nix/store")
    );
    let key = run_ok_str(&mut c.gbc(&["cache", "public-key"])).trim().to_owned();
    assert_eq!(key, std::fs::read_to_string(c.state.join("keys/cache.public")).unwrap().trim());

    // Every narinfo: signed by the coordinator and by the host that built it, its NAR where it says,
    // its references published too, its NarHash Nix's own.
    let mut paths = BTreeSet::new();
    for entry in std::fs::read_dir(&cache).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "narinfo") {
            continue;
        }
        let info = NarInfo::parse(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(info.compression.as_deref(), Some("zstd"));
        assert!(cache.join(&info.url).is_file(), "{}", info.url);
        assert_eq!(info.sigs.len(), 2, "the coordinator's and the host's: {:?}", info.sigs);
        for r in &info.references {
            assert!(cache.join(format!("{}.narinfo", r.hash_part())).is_file(), "reference {r:?} unpublished");
        }
        paths.insert(info.store_dir.display(&info.store_path));
    }
    assert_eq!(paths.len(), 4, "the diamond's four outputs: {paths:?}");
    assert!(paths.contains(&top));
    assert_eq!(std::fs::read_dir(cache.join(".tmp")).unwrap().count(), 0, "no temporary file left");

    // A fresh store fetches them all from the cache, checking the coordinator's signature...
    let dir = common::tempdir();
    let url = format!("file://{}", cache.display());
    let fresh = dir.path().join("fresh");
    let mut copy = nix("nix");
    copy.args(["copy", "--from", &url, "--to"]).arg(&fresh).args(["--option", "trusted-public-keys", &key]);
    let out = run(copy.args(&paths));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in &paths {
        let ours = run_ok_str(nix("nix-store").args(["--store"]).arg(&fresh).args(["-q", "--hash", p]));
        run_ok_str(nix("nix-store").args(["--realise", &drvs[0].1]));
        let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", p]));
        assert_eq!(ours, theirs, "{p}");
    }
    // ...and refuses them when it trusts another key.
    let other = run_ok_str(
        common::gbc()
            .args(["cache", "public-key", "--signing-key"])
            .arg(common::repo_path("keys/test-only-DO-NOT-TRUST.secret")),
    );
    let mut copy = nix("nix");
    copy.args(["copy", "--from", &url, "--to"]).arg(dir.path().join("other")).args([
        "--option",
        "trusted-public-keys",
        other.trim(),
    ]);
    let out = run(copy.arg(&top));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lacks a valid signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
