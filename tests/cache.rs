//! The binary cache with a real Nix client: outputs the coordinator builds are published under
//! `<state>/cache` as zstd NARs with narinfos signed by the coordinator's key, and Nix fetches
//! them, verifying the signature (or refuses them, trusting another key).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use common::{Coordinator, http, nix, nix_realise, run, run_ok_str, salt};
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
        nix_realise(&[&drvs[0].1], &[]);
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

#[test]
fn the_cache_over_http_serves_nix_and_prometheus() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let c = Coordinator::start(&["--local-builds", "2", "--http", &addr]);
    let drvs = common::instantiate("tests/nix/queue.nix", None, &["top", "broken"], &salt());
    let out = run(&mut c.gbc(&["build", &drvs[0].1]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let top = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let _ = run(&mut c.gbc(&["build", &drvs[1].1]));
    let key = run_ok_str(&mut c.gbc(&["cache", "public-key"])).trim().to_owned();

    // Nix substitutes from it over HTTP.
    let dir = common::tempdir();
    let mut copy = nix("nix");
    copy.args(["copy", "--from", &format!("http://{addr}"), "--to"]).arg(dir.path().join("fresh")).args([
        "--option",
        "trusted-public-keys",
        &key,
        &top,
    ]);
    let out = run(&mut copy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (status, headers, body) = http(port, "GET", "/nix-cache-info", "");
    assert!(status.contains("200") && headers.contains("content-type: text/x-nix-cache-info"), "{status} {headers}");
    assert!(String::from_utf8_lossy(&body).contains("StoreDir: /nix/store"));
    let hash = &top["/nix/store/".len()..][..32];
    let (status, headers, body) = http(port, "GET", &format!("/{hash}.narinfo"), "");
    assert!(status.contains("200") && headers.contains("content-type: text/x-nix-narinfo"), "{status} {headers}");
    let info = NarInfo::parse(&String::from_utf8_lossy(&body)).unwrap();
    let nar_url = format!("/{}", info.url);
    let size = info.file_size.unwrap();
    // HEAD: the length, no body; a range: just those bytes.
    let (status, headers, body) = http(port, "HEAD", &nar_url, "");
    assert!(
        status.contains("200") && headers.contains(&format!("content-length: {size}")) && body.is_empty(),
        "{headers}"
    );
    assert!(headers.contains("accept-ranges: bytes"), "{headers}");
    let whole = std::fs::read(c.state.join("cache").join(&info.url)).unwrap();
    let (status, headers, body) = http(port, "GET", &nar_url, "Range: bytes=4-9\r\n");
    assert!(status.contains("206") && headers.contains("content-range: bytes 4-9/"), "{status} {headers}");
    assert_eq!(body, whole[4..10]);

    // A large NAR streams whole.
    let big: Vec<u8> = (0..(9u32 << 20) + 3).map(|i| (i % 251) as u8).collect();
    let big_name = "1".repeat(52) + ".nar.zst";
    std::fs::write(c.state.join("cache/nar").join(&big_name), &big).unwrap();
    let (status, headers, body) = http(port, "GET", &format!("/nar/{big_name}"), "");
    assert!(status.contains("200") && headers.contains(&format!("content-length: {}", big.len())), "{headers}");
    assert!(body == big, "{} bytes arrived", body.len());

    // Errors say nothing of files or the OS.
    for path in [
        "/0000000000000000000000000000000z.narinfo",
        "/nar/00000000000000000000000000000000000000000000000000zz.nar.zst",
        "/../keys/cache.secret",
        "/nar/..%2f..%2fkeys%2fcache.secret",
        "/keys/cache.secret",
        "/gbc.sqlite",
    ] {
        let (status, _, body) = http(port, "GET", path, "");
        assert!(status.contains("404"), "{path}: {status}");
        let body = String::from_utf8_lossy(&body);
        assert!(!body.contains('/') && !body.contains("os error") && !body.contains("No such"), "{path}: {body}");
    }

    // Metrics in Prometheus' text format, and the status page.
    let (status, headers, body) = http(port, "GET", "/metrics", "");
    let text = String::from_utf8_lossy(&body);
    // OpenMetrics, the text format Prometheus asks for first.
    assert!(status.contains("200") && headers.contains("application/openmetrics-text"), "{headers}");
    assert!(text.contains("gbc_builds{state=\"succeeded\"} 4"), "{text}");
    assert!(text.contains("gbc_builds{state=\"failed\"} 1"), "{text}");
    assert!(text.contains("gbc_machine_up{machine=\"localhost\"} 1"), "{text}");
    assert!(text.contains("gbc_machine_running_builds{machine=\"localhost\"} 0"), "{text}");
    assert!(text.contains("gbc_allocations_total 5"), "{text}");
    assert!(text.contains("gbc_received_bytes_total "), "{text}");
    assert!(text.contains("gbc_oldest_queued_age_seconds 0"), "{text}");
    let (status, _, body) = http(port, "GET", "/", "");
    let page = String::from_utf8_lossy(&body);
    assert!(status.contains("200") && page.contains("<td>localhost</td><td>up</td>"), "{page}");
    assert!(page.contains("-top.drv</td><td>succeeded</td>"), "{page}");
    assert!(page.contains("-broken.drv</td><td>failed: builder exited with status 1</td>"), "{page}");
}

#[test]
fn xz_lzip_and_uncompressed_caches_are_read_by_nix_too() {
    for compression in ["xz", "lzip", "none"] {
        let (_, addr) = common::free_addr();
        let c = Coordinator::start(&["--local-builds", "1", "--compression", compression, "--http", &addr]);
        let drvs = common::instantiate("tests/nix/queue.nix", None, &["right"], &salt());
        let out = run(&mut c.gbc(&["build", &drvs[0].1]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let right = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let info = narinfo(&c, &right);
        assert!(info.contains(&format!("Compression: {compression}\n")), "{info}");
        let out = nix_copy_from_cache(&c, &right);
        assert!(out.status.success(), "{compression}: {}", String::from_utf8_lossy(&out.stderr));
        // And over HTTP, as clients usually substitute.
        let key = run_ok_str(&mut c.gbc(&["cache", "public-key"])).trim().to_owned();
        let dir = common::tempdir();
        let out = run(nix("nix")
            .args(["copy", "--from", &format!("http://{addr}"), "--to"])
            .arg(dir.path().join("fresh"))
            .args(["--option", "trusted-public-keys", &key, &right]));
        assert!(out.status.success(), "{compression} over HTTP: {}", String::from_utf8_lossy(&out.stderr));
    }
    let bad = run(common::gbc().args(["coordinator", "--compression", "lz4"]));
    assert_eq!(bad.status.code(), Some(2));
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("invalid value 'lz4' for '--compression") && said.contains("zstd, xz, lzip, none"), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
}

#[test]
fn cache_gc_keeps_what_recent_builds_need_and_what_it_refers_to() {
    let c = Coordinator::start(&["--local-builds", "2"]);
    let salt = salt();
    let drvs = common::instantiate("tests/nix/queue.nix", None, &["top", "refsBase"], &salt);
    let out = run(&mut c.gbc(&["build", &drvs[0].1]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cache = c.state.join("cache");
    let narinfos = || -> BTreeSet<String> {
        std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".narinfo"))
            .collect()
    };
    let nars = || std::fs::read_dir(cache.join("nar")).unwrap().count();
    assert_eq!((narinfos().len(), nars()), (4, 4));
    // Not synchronisation: what is under test is a time window (--keep-since 2s).
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Built now: refs-base, whose output refers to base's (built 3 s ago, not rebuilt).
    let out = run(&mut c.gbc(&["build", &drvs[1].1]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let refs_base = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let base =
        std::fs::read_to_string(c.state.join("machines/localhost/agent/store").join(&refs_base["/nix/store/".len()..]))
            .unwrap()
            .trim()
            .to_owned();
    let hash = |p: &str| format!("{}.narinfo", &p["/nix/store/".len()..][..32]);

    let out = run(&mut c.gbc(&["cache", "gc", "--keep-since", "2s"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("removed 3 narinfos and 3 NARs"), "{said}");
    assert_eq!(narinfos(), BTreeSet::from([hash(&refs_base), hash(&base)]), "refs-base, and base which it refers to");
    assert_eq!(nars(), 2);
    // What is left is whole: Nix copies refs-base's closure.
    let key = run_ok_str(&mut c.gbc(&["cache", "public-key"])).trim().to_owned();
    let dir = common::tempdir();
    let mut copy = nix("nix");
    copy.args(["copy", "--from", &format!("file://{}", cache.display()), "--to"]).arg(dir.path().join("fresh")).args([
        "--option",
        "trusted-public-keys",
        &key,
        &refs_base,
    ]);
    let out = run(&mut copy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = run(&mut c.gbc(&["cache", "gc", "--keep-since", "soon"]));
    assert_eq!(bad.status.code(), Some(2));
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("--keep-since") && said.contains("\"soon\" is not a duration"), "{said}");
}

/// The narinfo the cache holds for `path`.
fn narinfo(c: &Coordinator, path: &str) -> String {
    let hash = &path.rsplit('/').next().unwrap()[..32];
    std::fs::read_to_string(c.state.join(format!("cache/{hash}.narinfo"))).unwrap_or_default()
}

/// Nix copies `path` from the coordinator's cache (a file:// store) into a fresh store, trusting
/// only the coordinator's key.
fn nix_copy_from_cache(c: &Coordinator, path: &str) -> std::process::Output {
    let key = run_ok_str(&mut c.gbc(&["cache", "public-key"])).trim().to_owned();
    let dir = common::tempdir();
    let mut copy = nix("nix");
    copy.args(["copy", "--from", &format!("file://{}", c.state.join("cache").display()), "--to"])
        .arg(dir.path().join("fresh"))
        .args(["--option", "trusted-public-keys", &key, path]);
    run(&mut copy)
}

#[test]
fn an_input_source_travels_from_the_client_and_the_build_succeeds() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drv = common::instantiate("tests/nix/queue.nix", None, &["needsSource"], &salt()).remove(0).1;
    let parsed = gbc::formats::derivation::Derivation::parse(&std::fs::read(&drv).unwrap()).unwrap();
    let source = parsed.input_srcs.iter().find(|s| s.ends_with("-needs-source.sh")).unwrap().clone();
    let out = run(&mut c.gbc(&["build", &drv]));
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.log());
    let theirs = nix_realise(&[&drv], &[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), theirs);

    // The source is in the cache as the text path it is, signed by the cache alone (no host built
    // it), and Nix takes it from there as valid.
    let info = narinfo(&c, &source);
    let flat = run_ok_str(nix("nix-hash").args(["--type", "sha256", "--flat", "--base32", &source]));
    assert!(info.contains(&format!("CA: text:sha256:{}\n", flat.trim())), "{info}");
    assert_eq!(info.matches("Sig: ").count(), 1, "{info}");
    // What it refers to travelled too: the data file (text) and the directory (a source, by NAR
    // hash), with the NAR hashes Nix has for them.
    let parsed = NarInfo::parse(&info).unwrap();
    let refs: Vec<String> = parsed.references.iter().map(|r| parsed.store_dir.display(r)).collect();
    assert_eq!(refs.len(), 2, "{info}");
    for r in &refs {
        let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", r]));
        let ours = NarInfo::parse(&narinfo(&c, r)).unwrap();
        assert_eq!(ours.nar_hash.to_nix32_string(), theirs.trim(), "{r}");
        let want = if r.ends_with("-needs-source-dir") { format!("fixed:r:{}", theirs.trim()) } else { "text:".into() };
        assert!(ours.ca.as_deref().unwrap_or_default().starts_with(&want), "{r}: {:?}", ours.ca);
    }
    let out = nix_copy_from_cache(&c, &source);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Built again: the source is not sent again (its narinfo would be rewritten), the cache has it.
    let inode = || {
        let hash = &source.rsplit('/').next().unwrap()[..32];
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(c.state.join(format!("cache/{hash}.narinfo"))).unwrap())
    };
    let before = inode();
    let out = run(&mut c.gbc(&["build", &drv]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((inode(), c.builds().len()), (before, 2));
}

/// A client connection that has submitted `drv` with `upload` and read the `wanted` reply.
fn upload_session(c: &Coordinator, drv: &str) -> (std::io::BufReader<std::os::unix::net::UnixStream>, Vec<String>) {
    use std::io::{BufRead as _, Write as _};
    let stream = std::os::unix::net::UnixStream::connect(c.state.join("gbc.sock")).unwrap();
    let mut r = std::io::BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let aterm = std::fs::read_to_string(drv).unwrap();
    let submit = serde_json::json!({"type": "submit", "derivations": [{"file": drv, "aterm": aterm}], "upload": true});
    writeln!(r.get_mut(), "{submit}").unwrap();
    let reply = reply(&mut r);
    assert_eq!(reply["type"], "wanted", "{reply}");
    let wanted = reply["paths"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
    (r, wanted)
}

fn reply(r: &mut std::io::BufReader<std::os::unix::net::UnixStream>) -> serde_json::Value {
    use std::io::BufRead as _;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Send `add_path` for `path` with this NAR; the reply.
fn add_path(
    r: &mut std::io::BufReader<std::os::unix::net::UnixStream>,
    path: &str,
    refs: &[String],
    nar: &[u8],
) -> serde_json::Value {
    use std::io::Write as _;
    let req = serde_json::json!({"type": "add_path", "path": path, "references": refs, "nar_size": nar.len()});
    writeln!(r.get_mut(), "{req}").unwrap();
    r.get_mut().write_all(nar).unwrap();
    reply(r)
}

fn nar_of(path: &std::path::Path) -> Vec<u8> {
    let mut nar = Vec::new();
    gbc::formats::nar::dump_path(path, &mut nar).unwrap();
    nar
}

#[test]
fn uploads_that_are_not_what_they_claim_are_refused_and_leave_nothing() {
    use std::io::{Read as _, Write as _};
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drv = common::instantiate("tests/nix/queue.nix", None, &["needsSource"], &salt()).remove(0).1;
    let script = {
        let parsed = gbc::formats::derivation::Derivation::parse(&std::fs::read(&drv).unwrap()).unwrap();
        parsed.input_srcs.iter().next().unwrap().clone()
    };
    let script_refs: Vec<String> =
        run_ok_str(nix("nix-store").args(["-q", "--references", &script])).lines().map(str::to_owned).collect();
    let dir = common::tempdir();
    let other = dir.path().join("other");
    std::fs::write(&other, "not the script").unwrap();
    let (_, wanted) = upload_session(&c, &drv);
    assert_eq!(wanted, std::slice::from_ref(&script));

    let cases: Vec<(&str, Vec<u8>, Vec<String>, &str)> = vec![
        // Other contents under the script's path.
        (&script, nar_of(&other), script_refs.clone(), "do not give this path"),
        // The right contents, references left out.
        (&script, nar_of(std::path::Path::new(&script)), Vec::new(), "do not give this path"),
        // Not a NAR at all.
        (&script, b"garbage that is not a NAR".to_vec(), script_refs.clone(), "not a NAR"),
        // A path that has nothing to do with the submission.
        (
            "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-other",
            nar_of(&other),
            Vec::new(),
            "no derivation of the submission",
        ),
    ];
    for (path, nar, refs, why) in cases {
        let (mut r, _) = upload_session(&c, &drv);
        let reply = add_path(&mut r, path, &refs, &nar);
        assert_eq!(reply["type"], "error", "{path}: {reply}");
        assert!(reply["message"].as_str().unwrap().contains(why), "{reply}");
        // The connection ends with the error: the stream may be out of step.
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).unwrap_or(0), 0);
    }
    // The right script, but its references were never uploaded: refused when the upload ends.
    let (mut r, _) = upload_session(&c, &drv);
    let reply = add_path(&mut r, &script, &script_refs, &nar_of(std::path::Path::new(&script)));
    assert_eq!(reply["type"], "added", "{reply}");
    writeln!(r.get_mut(), r#"{{"type":"uploaded"}}"#).unwrap();
    let reply = self::reply(&mut r);
    assert!(reply["message"].as_str().unwrap_or_default().contains("neither in the cache nor uploaded"), "{reply}");

    // Nothing was published, nothing was queued, no temporary file is left.
    let cache = c.state.join("cache");
    let narinfos = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "narinfo"))
        .count();
    assert_eq!(narinfos, 0);
    assert_eq!(std::fs::read_dir(cache.join("nar")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(cache.join(".tmp")).unwrap().count(), 0);
    assert!(c.builds().is_empty());
}

#[test]
fn a_coordinator_killed_mid_upload_keeps_nothing_of_it() {
    use std::io::Write as _;
    let mut c = Coordinator::start(&["--local-builds", "1"]);
    let drv = common::instantiate("tests/nix/queue.nix", None, &["needsSource"], &salt()).remove(0).1;
    let (mut r, wanted) = upload_session(&c, &drv);
    let script = wanted[0].clone();
    let nar = nar_of(std::path::Path::new(&script));
    let refs = run_ok_str(nix("nix-store").args(["-q", "--references", &script]));
    let req = serde_json::json!({"type": "add_path", "path": script, "references": refs.lines().collect::<Vec<_>>(), "nar_size": nar.len()});
    writeln!(r.get_mut(), "{req}").unwrap();
    r.get_mut().write_all(&nar[..nar.len() / 2]).unwrap();
    let tmp = c.state.join("cache/.tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(&tmp).unwrap().count() == 0 {
        assert!(std::time::Instant::now() < deadline, "the upload never started staging");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Killed with half a NAR staged: after the restart nothing of it is left, nothing was queued.
    c.kill9();
    drop(r);
    c.restart();
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert!(narinfo(&c, &script).is_empty());
    assert!(c.builds().is_empty());
    // The same submission, made again, uploads and builds.
    let out = run(&mut c.gbc(&["build", &drv]));
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.log());
    assert!(!narinfo(&c, &script).is_empty());
}
