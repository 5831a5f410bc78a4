//! Upstream binary caches made by real Nix (`nix copy --to file://…`, xz as Nix compresses by
//! default, signed with a key from `nix-store --generate-binary-cache-key`), served on loopback:
//! what gbc's substituter takes from them, and what it refuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::files::Files;
use common::{nix, nix_realise, run, run_ok_str, salt, stderr};
use gbc::cache::{Cache, Compression};
use gbc::coordinator_file::{CoordinatorFile, Overrides, Settings};
use gbc::formats::narinfo::NarInfo;
use gbc::formats::signing::SecretKey;
use gbc::formats::store_path::StoreDir;
use gbc::substituter::Substituter;

/// An upstream built by Nix from tests/nix/queue.nix (see [`common::upstream`]).
fn upstream(dir: &Path, attrs: &[&str], salt: &str) -> (Vec<String>, String) {
    common::upstream("tests/nix/queue.nix", dir, attrs, salt)
}

fn settings(url: &str, key: &str) -> Settings {
    let overrides = Overrides {
        substituters: Some(vec![url.to_owned()]),
        substituter_keys: Some(vec![key.to_owned()]),
        narinfo_ttl: Some(Duration::from_secs(60)),
        ..Overrides::default()
    };
    Settings::resolve(&CoordinatorFile::default(), &overrides, Path::new(".")).unwrap()
}

fn gbc_cache(dir: &Path) -> Cache {
    let key = SecretKey::generate("gbc-test-1").unwrap();
    Cache::open(&dir.join("gbc-cache"), StoreDir::new("/nix/store").unwrap(), key, Compression::Zstd).unwrap()
}

fn nar_files(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("nar")).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default()
}

/// What the cache holds besides its directories: narinfos, NARs, and anything staged.
fn cache_contents(root: &Path) -> usize {
    let narinfos = std::fs::read_dir(root)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "narinfo"))
        .count();
    narinfos + nar_files(root).len() + std::fs::read_dir(root.join(".tmp")).unwrap().count()
}

/// The paths an upstream has are found (and those it lacks are not); their closure is taken into
/// gbc's cache with upstream's signatures, NAR hashes equal to Nix's, and Nix copies them from
/// there trusting only the upstream key.
#[test]
fn a_nix_made_cache_s_paths_are_taken_with_their_closure() {
    let tmp = common::tempdir();
    let salt = salt();
    let (outs, key) = upstream(tmp.path(), &["left", "refsBase"], &salt);
    let top = common::instantiate("tests/nix/queue.nix", None, &["top"], &salt);
    let top_out =
        gbc::formats::derivation::Derivation::parse(&std::fs::read(&top[0].1).unwrap()).unwrap().outputs["out"]
            .path
            .clone();
    let files = Files::serve_dir(&tmp.path().join("cache"));
    let cache = gbc_cache(tmp.path());
    let sub = Substituter::new(&settings(&files.url(""), &key), StoreDir::new("/nix/store").unwrap());

    let asked: Vec<String> = outs.iter().cloned().chain([top_out.clone()]).collect();
    let found = sub.query(&asked);
    assert_eq!(
        found.keys().cloned().collect::<Vec<_>>(),
        {
            let mut o = outs.clone();
            o.sort();
            o
        },
        "left and refs-base, not top"
    );
    let published = sub.substitute(&outs, &cache).unwrap();
    assert_eq!(published.len(), 3, "left, refs-base and base (its reference): {published:?}");
    for p in &published {
        let hash = &p["/nix/store/".len()..][..32];
        let text = std::fs::read_to_string(tmp.path().join(format!("gbc-cache/{hash}.narinfo"))).unwrap();
        let info = NarInfo::parse(&text).unwrap();
        let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", p]));
        assert_eq!(info.nar_hash.to_nix32_string(), theirs.trim(), "{p}");
        assert_eq!(
            info.sigs.iter().map(|s| s.key_name().to_owned()).collect::<Vec<_>>(),
            ["up-1"],
            "upstream's only: {text}"
        );
    }
    // Remembered: asking again costs no lookup.
    let lookups = sub.stats.lookups.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(sub.query(&outs).len(), 2);
    assert_eq!(sub.stats.lookups.load(std::sync::atomic::Ordering::Relaxed), lookups);

    let fresh = tmp.path().join("fresh");
    let out = run(nix("nix")
        .args(["copy", "--from", &format!("file://{}", tmp.path().join("gbc-cache").display()), "--to"])
        .arg(&fresh)
        .args(["--option", "trusted-public-keys", &key])
        .args(&outs));
    assert!(out.status.success(), "nix copy from gbc's cache: {}", stderr(&out));
}

/// A narinfo signed by a key that is not trusted counts as missing; a NAR that is not the one its
/// narinfo describes, and one whose server dies halfway, fail the substitution and leave nothing
/// in the cache.
#[test]
fn untrusted_narinfos_bad_nars_and_cut_transfers_leave_nothing() {
    let tmp = common::tempdir();
    let salt = salt();
    let (outs, key) = upstream(tmp.path(), &["left", "right"], &salt);
    let store_dir = || StoreDir::new("/nix/store").unwrap();
    let other = SecretKey::generate("other-1").unwrap().public().to_string();

    let files = Files::serve_dir(&tmp.path().join("cache"));
    let sub = Substituter::new(&settings(&files.url(""), &other), store_dir());
    assert!(sub.query(&outs).is_empty(), "signed by up-1, which is not trusted");

    // left's NAR file replaced by right's: a valid NAR, not left's.
    let narinfo = |p: &str| {
        let text =
            std::fs::read_to_string(tmp.path().join(format!("cache/{}.narinfo", &p["/nix/store/".len()..][..32])))
                .unwrap();
        NarInfo::parse(&text).unwrap()
    };
    let (left, right) = (narinfo(&outs[0]), narinfo(&outs[1]));
    let swapped = tmp.path().join("swapped");
    copy_dir(&tmp.path().join("cache"), &swapped);
    std::fs::copy(tmp.path().join("cache").join(&right.url), swapped.join(&left.url)).unwrap();
    let files = Files::serve_dir(&swapped);
    let cache_dir = tmp.path().join("one");
    let cache = gbc_cache(&cache_dir);
    let sub = Substituter::new(&settings(&files.url(""), &key), store_dir());
    let e = sub.substitute(&outs[..1], &cache).unwrap_err();
    assert!(
        e.contains("is not the one its narinfo describes") || e.contains("longer than its narinfo's NarSize"),
        "{e}"
    );
    assert_eq!(cache_contents(&cache_dir.join("gbc-cache")), 0, "nothing kept");

    // The server dies halfway through each NAR.
    let files = Files::serve_dir(&tmp.path().join("cache"));
    let cache_dir = tmp.path().join("two");
    let cache = gbc_cache(&cache_dir);
    let sub = Substituter::new(&settings(&files.url("/cut"), &key), store_dir());
    let e = sub.substitute(&outs[..1], &cache).unwrap_err();
    assert!(e.contains("/cut/nar/"), "{e}");
    assert_eq!(cache_contents(&cache_dir.join("gbc-cache")), 0, "nothing kept");
    // The upstream is now skipped for a while: asked again, it is not asked.
    let before = files.requests.lock().unwrap().len();
    assert!(sub.query(&outs[1..]).is_empty());
    assert_eq!(files.requests.lock().unwrap().len(), before, "backed off");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            copy_dir(&p, &to.join(p.file_name().unwrap()));
        } else {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// chain-c's inputs (chain-b, and multi's dev output) built by Nix into an upstream cache: the
/// coordinator, given that upstream and its key, builds chain-c only, taking the inputs from
/// upstream into its cache and sending them to the build host; chain-c's NarHash is Nix's, and Nix
/// copies it from gbc's cache.
#[test]
fn a_submission_builds_only_what_upstream_lacks() {
    let tmp = common::tempdir();
    let salt = salt();
    let (_, key) = upstream_of(tmp.path(), &["chainB", "multi"], &salt);
    let files = Files::serve_dir(&tmp.path().join("cache"));
    let url = files.url("");
    let c = common::Coordinator::start(&["--local-builds", "1", "--substituter", &url, "--substituter-key", &key]);
    let drvs = common::instantiate("tests/nix/derivations.nix", None, &["chainC", "chainB"], &salt);
    let (drv, chain_b) = (drvs[0].1.clone(), drvs[1].1.clone());
    // chain-b itself is upstream: with --skip-substitutable it is not built, and its output is
    // printed.
    let out = run(&mut c.gbc(&["build", "--skip-substitutable", "--no-upload", &chain_b]));
    assert!(out.status.success(), "{}", stderr(&out));
    let b_out = gbc::formats::derivation::Derivation::parse(&std::fs::read(&chain_b).unwrap()).unwrap().outputs["out"]
        .path
        .clone();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), b_out);
    assert!(stderr(&out).contains("-chain-b.drv: available, not built"), "{}", stderr(&out));
    assert!(c.builds().is_empty(), "nothing built");
    let out = run(&mut c.gbc(&["submit", "--json", "--no-upload", &drv]));
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["dependencies"].as_array().unwrap().len(), 0, "nothing below chain-c is built: {reply}");
    let substitutable: Vec<&str> =
        reply["substitutable"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(substitutable.len(), 2, "chain-b and multi's dev: {reply}");
    let uuid = reply["builds"][0].as_str().unwrap().to_owned();
    c.watch_ok(std::slice::from_ref(&uuid));
    assert_eq!(c.builds().len(), 1, "one build only");
    for p in &substitutable {
        assert!(
            c.state.join(format!("cache/{}.narinfo", &p["/nix/store/".len()..][..32])).exists(),
            "{p} in the cache"
        );
    }
    let d = c.show(&uuid);
    let mut from: Vec<&str> = d["from_substituters"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    from.sort_unstable();
    let mut want = substitutable.clone();
    want.sort_unstable();
    assert_eq!(from, want, "gbc show names the inputs that came from upstream: {d}");
    let human = run_ok_str(&mut c.gbc(&["show", &uuid]));
    assert_eq!(human.lines().filter(|l| l.starts_with("upstream   /nix/store/")).count(), 2, "{human}");
    let ours = &d["attempt_list"][0]["outputs"][0];
    let theirs = nix_realise(&[&drv], &[]);
    assert_eq!(ours["path"].as_str().unwrap(), theirs.trim());
    let nix_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", theirs.trim()]));
    assert_eq!(ours["nar_hash"].as_str().unwrap(), nix_hash.trim());
    let cache_key = run_ok_str(&mut c.gbc(&["cache", "public-key"])).trim().to_owned();
    let out = run(nix("nix")
        .args(["copy", "--from", &format!("file://{}", c.state.join("cache").display()), "--to"])
        .arg(tmp.path().join("fresh"))
        .args(["--option", "trusted-public-keys", &format!("{cache_key} {key}"), theirs.trim()]));
    assert!(out.status.success(), "nix copy: {}", stderr(&out));

    // --no-substitutes: the whole graph is built here.
    let c = common::Coordinator::start(&["--local-builds", "1", "--substituter", &url, "--substituter-key", &key]);
    let out = run(&mut c.gbc(&["submit", "--json", "--no-upload", "--no-substitutes", &drv]));
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["dependencies"].as_array().unwrap().len(), 3, "chain-a, chain-b and multi: {reply}");
    assert!(reply["substitutable"].as_array().unwrap().is_empty(), "{reply}");
}

/// Upstream failures are not build failures: an untrusted upstream is not used (and says so), and
/// an upstream that dies mid-transfer at build time makes the coordinator build the inputs
/// instead; chain-c succeeds both times.
#[test]
fn when_upstream_fails_the_inputs_are_built() {
    let tmp = common::tempdir();
    let salt = salt();
    let (_, key) = upstream_of(tmp.path(), &["chainB", "multi"], &salt);
    let files = Files::serve_dir(&tmp.path().join("cache"));
    let drv = common::instantiate("tests/nix/derivations.nix", None, &["chainC"], &salt).remove(0).1;
    let other = SecretKey::generate("other-1").unwrap().public().to_string();
    for (url, key, said, up) in [
        (files.url(""), other.as_str(), "no valid signature by a trusted key", 1),
        (files.url("/cut"), key.as_str(), "it will be built", 0),
    ] {
        let (port, addr) = common::free_addr();
        let c = common::Coordinator::start(&[
            "--local-builds",
            "1",
            "--substituter",
            &url,
            "--substituter-key",
            key,
            "--http",
            &addr,
        ]);
        let out = run(&mut c.gbc(&["build", "--no-upload", &drv]));
        assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
        c.wait_until("the log says why upstream was not used", 10, || c.log().contains(said));
        let built: Vec<String> = c.builds().iter().map(|b| b["drv"].as_str().unwrap().to_owned()).collect();
        assert!(built.iter().any(|d| d.ends_with("-chain-b.drv")), "chain-b was built: {built:?}");
        // /metrics says whether the upstream is still asked (a refused narinfo is no failure; a
        // dying server is, and backs it off).
        let (_, _, body) = common::http(port, "GET", "/metrics", "");
        let metrics = String::from_utf8_lossy(&body);
        assert!(metrics.contains(&format!("gbc_substituter_up{{url=\"{url}\"}} {up}")), "{metrics}");
        let refused = metrics.lines().find(|l| l.starts_with("gbc_substituter_refused_total ")).unwrap_or_default();
        let failures = metrics.lines().find(|l| l.starts_with("gbc_substituter_failures_total ")).unwrap_or_default();
        if up == 1 {
            assert!(!refused.ends_with(" 0") && failures.ends_with(" 0"), "{refused} {failures}");
        } else {
            assert!(!failures.ends_with(" 0"), "{failures}");
        }
    }
}

/// [`upstream`] of tests/nix/derivations.nix.
fn upstream_of(dir: &Path, attrs: &[&str], salt: &str) -> (Vec<String>, String) {
    common::upstream("tests/nix/derivations.nix", dir, attrs, salt)
}

/// Every compression Nix writes is read: caches made by `nix copy` with zstd, bzip2, gzip and lzip
/// (xz and none are in the other tests). With `sign_substitutes`, the cache signs what it takes
/// too.
#[test]
fn every_compression_nix_writes_is_read() {
    let tmp = common::tempdir();
    let salt = salt();
    let (outs, _) = upstream(tmp.path(), &["refsBase"], &salt);
    let (sec, public) = (tmp.path().join("c.sec"), tmp.path().join("c.pub"));
    let out = run(nix("nix-store").args(["--generate-binary-cache-key", "c-1"]).arg(&sec).arg(&public));
    assert!(out.status.success(), "{}", stderr(&out));
    let key = std::fs::read_to_string(&public).unwrap().trim().to_owned();
    for compression in ["zstd", "bzip2", "gzip", "lzip"] {
        let dir = tmp.path().join(compression);
        let url =
            format!("file://{}?compression={compression}&secret-key={}", dir.join("cache").display(), sec.display());
        let out = run(nix("nix").args(["copy", "--to", &url]).args(&outs));
        assert!(out.status.success(), "nix copy with {compression}: {}", stderr(&out));
        let upstream_text =
            std::fs::read_to_string(dir.join(format!("cache/{}.narinfo", &outs[0]["/nix/store/".len()..][..32])))
                .unwrap();
        assert!(upstream_text.contains(&format!("\nCompression: {compression}\n")), "{upstream_text}");
        let files = Files::serve_dir(&dir.join("cache"));
        let cache = gbc_cache(&dir);
        let mut s = settings(&files.url(""), &key);
        s.sign_substitutes = true;
        let sub = Substituter::new(&s, StoreDir::new("/nix/store").unwrap());
        let published = sub.substitute(&outs, &cache).unwrap_or_else(|e| panic!("{compression}: {e}"));
        assert_eq!(published.len(), 2, "refs-base and base: {published:?}");
        for p in &published {
            let text =
                std::fs::read_to_string(dir.join(format!("gbc-cache/{}.narinfo", &p["/nix/store/".len()..][..32])))
                    .unwrap();
            let info = NarInfo::parse(&text).unwrap();
            let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", p]));
            assert_eq!(info.nar_hash.to_nix32_string(), theirs.trim(), "{compression}: {p}");
            let mut signers: Vec<&str> = info.sigs.iter().map(|s| s.key_name()).collect();
            signers.sort_unstable();
            assert_eq!(signers, ["c-1", "gbc-test-1"], "upstream's and, told to, the cache's: {text}");
            // What the cache serves too (zstd, lzip) is kept as upstream served it, byte for byte;
            // the rest is recompressed with the cache's compression (zstd).
            let theirs = NarInfo::parse(
                &std::fs::read_to_string(dir.join(format!("cache/{}.narinfo", &p["/nix/store/".len()..][..32])))
                    .unwrap(),
            )
            .unwrap();
            let kept = matches!(compression, "zstd" | "lzip");
            assert_eq!(info.compression.as_deref(), Some(if kept { compression } else { "zstd" }), "{text}");
            assert_eq!(info.file_hash == theirs.file_hash, kept, "{compression}: {text}\n{theirs:?}");
        }
        // And Nix reads every NAR back from gbc's cache.
        let mut copy = nix("nix");
        copy.args(["copy", "--from", &format!("file://{}", dir.join("gbc-cache").display()), "--to"])
            .arg(dir.join("fresh"))
            .args(["--option", "trusted-public-keys", &key]);
        let out = run(copy.args(&published));
        assert!(out.status.success(), "{compression}: {}", stderr(&out));
    }
}
