//! `gbc realise` against Nix's own realisation of the same derivations, and the sandbox's promises:
//! failures, timeouts, big logs, isolation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Output;

use common::{gbc, nix, nix_realise, run, run_ok_str, salt, tempdir};

/// Instantiate attributes of a test expression; returns attribute → .drv path.
/// These tests run one at a time: under CPU load, Nix 2.8 sometimes kills its own build of
/// export-graph-structured (a bash builder) with SIGKILL. Reproduced without gbc: 5 of 12 Nix builds
/// of it died while a plain shell loop printed 160,000 lines in the background; none without load.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn instantiate(file: &str, attrs: &[&str], salt: &str) -> BTreeMap<String, String> {
    common::instantiate(file, None, attrs, salt).into_iter().collect()
}

fn realise(root: &Path, drv: &str, extra: &[&str]) -> Output {
    run(gbc().arg("realise").arg("--store-root").arg(root).args(common::sandbox_args()).args(extra).arg(drv))
}

fn record(root: &Path, path: &str) -> serde_json::Value {
    let base = Path::new(path).file_name().unwrap().to_str().unwrap();
    serde_json::from_slice(&fs::read(root.join(".gbc-db").join(format!("{base}.json"))).unwrap()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn outputs_equal_nix_realisation_in_hash_and_references() {
    let _serial = one_at_a_time();
    let attrs = [
        "single",
        "multi",
        "chainC",
        "fixedFlat",
        "fixedRecursive",
        "fixedSha1",
        "usesFixed",
        "passAsFile",
        "unicode",
        "refersToChainA",
        "placeholders",
        "structured",
        "checksPass",
        "exportGraph",
        "exportGraphStructured",
    ];
    let drvs = instantiate("tests/nix/derivations.nix", &attrs, &salt());
    let tmp = tempdir();
    let root = tmp.path().join("store");
    for (attr, drv) in &drvs {
        let out = realise(&root, drv, &[]);
        assert!(out.status.success(), "{attr}: {}", stderr(&out));
        let ours: BTreeSet<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
        let theirs: BTreeSet<String> = nix_realise(&[drv], &[]).lines().map(str::to_owned).collect();
        assert_eq!(ours, theirs, "{attr}: output paths");
        for path in &theirs {
            let rec = record(&root, path);
            let hash = run_ok_str(nix("nix-store").args(["-q", "--hash", path]));
            assert_eq!(rec["nar_hash"].as_str(), Some(hash.trim()), "{attr}: NarHash of {path}");
            let refs: Vec<String> =
                run_ok_str(nix("nix-store").args(["-q", "--references", path])).lines().map(str::to_owned).collect();
            let mut refs = refs;
            refs.sort();
            let our_refs: Vec<String> =
                rec["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
            assert_eq!(our_refs, refs, "{attr}: references of {path}");
            assert_eq!(rec["deriver"].as_str(), Some(drv.as_str()));
        }
    }
    // Realising again builds nothing and prints the same paths.
    let again = realise(&root, &drvs["chainC"], &[]);
    assert!(again.status.success() && again.stderr.is_empty(), "{}", stderr(&again));
}

#[test]
fn output_checks_fail_where_nix_s_fail() {
    let _serial = one_at_a_time();
    let attrs = ["checksSelf", "checksDisallowed", "checksIllegal", "checksTooLarge"];
    let drvs = instantiate("tests/nix/derivations.nix", &attrs, &salt());
    let tmp = tempdir();
    let root = tmp.path().join("store");
    for (attr, why) in [
        ("checksSelf", "is not allowed to refer to"),
        ("checksDisallowed", "is not allowed to refer to"),
        ("checksIllegal", "illegal reference specifier 'nonsense'"),
        ("checksTooLarge", "is too large at"),
    ] {
        let theirs = common::reference(|| {
            let mut c = nix("nix-store");
            c.args(["--realise", &drvs[attr]]);
            c
        });
        assert!(!theirs.status.success(), "{attr}: Nix built it");
        assert!(stderr(&theirs).contains(why), "{attr}: Nix says {}", stderr(&theirs));
        let ours = realise(&root, &drvs[attr], &[]);
        assert_eq!(ours.status.code(), Some(1), "{attr}: {}", stderr(&ours));
        assert!(stderr(&ours).contains(why), "{attr}: {}", stderr(&ours));
        // Nothing of it became valid.
        let record_dir = root.join(".gbc-db");
        let names: Vec<String> =
            fs::read_dir(&record_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.contains(&attr.replace("checks", "checks-").to_lowercase())), "{names:?}");
    }
}

#[test]
fn fixed_outputs_see_the_impure_variables_they_name() {
    let _serial = one_at_a_time();
    let drvs = instantiate("tests/nix/derivations.nix", &["fixedImpure"], &salt());
    let tmp = tempdir();
    let root = tmp.path().join("store");
    let ours = run(gbc()
        .args(["realise", "--store-root"])
        .arg(&root)
        .args(common::sandbox_args())
        .arg(&drvs["fixedImpure"])
        .env("GBC_TEST_PROXY", "proxy.example:3128"));
    assert!(ours.status.success(), "{}", stderr(&ours));
    let theirs = common::reference_ok(|| {
        let mut c = nix("nix-store");
        c.args(["--realise", &drvs["fixedImpure"]]).env("GBC_TEST_PROXY", "proxy.example:3128");
        c
    });
    assert_eq!(String::from_utf8_lossy(&ours.stdout), theirs);
    // Without the variable the output is not the declared one: both refuse it.
    let tmp2 = tempdir();
    let bare = run(gbc()
        .args(["realise", "--store-root"])
        .arg(tmp2.path().join("store"))
        .args(common::sandbox_args())
        .arg(&drvs["fixedImpure"])
        .env_remove("GBC_TEST_PROXY"));
    assert_eq!(bare.status.code(), Some(1), "{}", stderr(&bare));
    assert!(stderr(&bare).contains("hash mismatch"), "{}", stderr(&bare));
}

fn builds() -> BTreeMap<String, String> {
    instantiate(
        "tests/nix/builds.nix",
        &["failing", "noOutput", "fixedWrong", "slow", "silent", "chatty", "escape", "env"],
        &salt(),
    )
}

#[test]
fn failures_are_reported_with_their_cause() {
    let _serial = one_at_a_time();
    let drvs = builds();
    let tmp = tempdir();
    let root = tmp.path().join("store");

    let out = realise(&root, &drvs["failing"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("failing on purpose") && err.contains("exited with status 3"), "{err}");

    let out = realise(&root, &drvs["noOutput"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("did not create output \"out\""), "{}", stderr(&out));

    let out = realise(&root, &drvs["fixedWrong"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let wanted = run_ok_str(nix("nix-hash").args(["--type", "sha256", "--to-base32", &sha256_hex(b"goodbye")]));
    let got = run_ok_str(nix("nix-hash").args(["--type", "sha256", "--to-base32", &sha256_hex(b"hello")]));
    assert!(err.contains(wanted.trim()) && err.contains(got.trim()), "both hashes in: {err}");

    // Nothing of the failed builds is in the store, valid or not.
    let left: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(fs::read_dir(root.join(".gbc-db")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(root.join(".gbc-tmp")).unwrap().count(), 0, "build directories left behind");
}

fn sha256_hex(data: &[u8]) -> String {
    gbc::formats::hash::hex::encode(&gbc::formats::hash::sha256(data))
}

#[test]
fn timeouts_kill_the_build() {
    let _serial = one_at_a_time();
    let drvs = builds();
    let tmp = tempdir();
    let root = tmp.path().join("store");
    let out = realise(&root, &drvs["slow"], &["--timeout", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("timed out after 2s"), "{}", stderr(&out));
    let out = realise(&root, &drvs["silent"], &["--max-silent-time", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("about to go quiet") && err.contains("silent for more than 1s"), "{err}");
}

#[test]
fn ten_megabytes_of_log_arrive_intact() {
    let _serial = one_at_a_time();
    let drvs = builds();
    let tmp = tempdir();
    let out = realise(&tmp.path().join("store"), &drvs["chatty"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr[out.stderr.len().saturating_sub(500)..]));
    assert!(out.stderr.len() > 10_000_000, "{} bytes of log", out.stderr.len());
    assert!(out.stderr.starts_with(b"log line 0: "));
    assert!(out.stderr.ends_with(b"\xff\xfe not UTF-8\n"));
}

#[test]
fn the_sandbox_holds() {
    let _serial = one_at_a_time();
    let drvs = builds();
    let tmp = tempdir();
    let root = tmp.path().join("store");
    // Fill the store with unrelated paths first: the build must not see them.
    let unrelated = instantiate("tests/nix/derivations.nix", &["chainB"], &salt());
    assert!(realise(&root, &unrelated["chainB"], &[]).status.success());

    let out = realise(&root, &drvs["escape"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = String::from_utf8(out.stdout).unwrap();
    let report = fs::read_to_string(root.join(Path::new(path.trim()).file_name().unwrap())).unwrap();
    assert!(!report.contains("ALLOWED"), "{report}");
    assert_eq!(report.matches(": refused").count(), 5, "{report}");
    assert!(report.contains("tmp: own"), "{report}");
    assert!(
        fs::read_dir("/tmp").unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with("gbc-escaped"))
    );
    assert!(report.contains("uid=1000 gid=100"), "{report}");
    let interfaces: Vec<&str> =
        report.split("interfaces:\n").nth(1).unwrap().lines().take_while(|l| *l != "store:").map(str::trim).collect();
    assert_eq!(interfaces, vec!["lo"], "network namespace: {report}");
    let listing: BTreeSet<&str> =
        report.split("store:\n").nth(1).unwrap().lines().take_while(|l| !l.starts_with("pid=")).collect();
    let input = record(&root, path.trim())["references"].clone();
    let mut expected: BTreeSet<String> = input
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Path::new(r.as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    expected.insert(Path::new(path.trim()).file_name().unwrap().to_string_lossy().into_owned());
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    assert!(listing.is_subset(&expected) && listing.len() >= 2, "store seen inside: {listing:?}, closure {expected:?}");
    assert!(report.contains("hostname=localhost"), "{report}");
    // lo is up: the kernel has local host routes (127.0.0.1) only then.
    assert!(!report.contains("loopback: 0"), "lo is down: {report}");
    for escaped in ["/gbc-escaped", "/tmp/gbc-escaped", "/usr/gbc-escaped", "/nix/gbc-escaped"] {
        assert!(!Path::new(escaped).exists(), "{escaped} was written on the host");
    }
}

#[test]
fn the_environment_is_nix_s() {
    let _serial = one_at_a_time();
    let drvs = builds();
    let tmp = tempdir();
    let root = tmp.path().join("store");
    let out = realise(&root, &drvs["env"], &["--cores", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = String::from_utf8(out.stdout).unwrap();
    let env = fs::read_to_string(root.join(Path::new(path.trim()).file_name().unwrap())).unwrap();
    let attr = format!(".attr-{}", gbc::formats::nix32::encode(&gbc::formats::hash::sha256(b"big")));
    for line in [
        "HOME=/homeless-shelter",
        "NIX_BUILD_CORES=3",
        "NIX_BUILD_TOP=/build",
        "NIX_LOG_FD=2",
        "NIX_STORE=/nix/store",
        "PATH=/path-not-set",
        "PWD=/build",
        "TEMP=/build",
        "TEMPDIR=/build",
        "TERM=xterm-256color",
        "TMP=/build",
        "TMPDIR=/build",
        &format!("bigPath=/build/{attr}"),
    ] {
        assert!(env.lines().any(|l| l == line), "missing {line:?} in:\n{env}");
    }
    assert!(!env.lines().any(|l| l.starts_with("big=")), "passAsFile variables are not in the environment");
}

#[test]
fn an_unprivileged_user_can_build_too() {
    let _serial = one_at_a_time();
    // CI runs as root; drop to nobody for this one (user namespaces need no privilege).
    if !common::is_root() {
        return common::skip("dropping to nobody needs root (unprivileged builds are what every other test here runs)");
    }
    let drvs = instantiate("tests/nix/derivations.nix", &["chainB", "chainA"], &salt());
    let tmp = tempdir();
    // nobody must be able to reach the binary, the .drv files and the store root.
    let exe = tmp.path().join("gbc");
    fs::copy(env!("CARGO_BIN_EXE_gbc"), &exe).unwrap();
    let drv_dir = tmp.path().join("drvs");
    fs::create_dir(&drv_dir).unwrap();
    for d in drvs.values() {
        fs::copy(d, drv_dir.join(Path::new(d).file_name().unwrap())).unwrap();
    }
    let root = tmp.path().join("store");
    fs::create_dir(&root).unwrap();
    run_ok_str(std::process::Command::new("chown").args(["-R", "65534:65534"]).arg(tmp.path()));
    run_ok_str(std::process::Command::new("chmod").arg("755").arg(tmp.path()));
    let file = drv_dir.join(Path::new(&drvs["chainB"]).file_name().unwrap());
    let out = run(std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .arg("realise")
        .arg("--store-root")
        .arg(&root)
        .args(common::sandbox_args())
        .arg(&file)
        .env("HOME", tmp.path()));
    assert!(out.status.success(), "{}", stderr(&out));
    let path = String::from_utf8(out.stdout).unwrap();
    let theirs = nix_realise(&[&drvs["chainB"]], &[]);
    assert_eq!(path.trim(), theirs.trim());
    let hash = run_ok_str(nix("nix-store").args(["-q", "--hash", theirs.trim()]));
    assert_eq!(record(&root, path.trim())["nar_hash"].as_str(), Some(hash.trim()));
    let owner = std::os::unix::fs::MetadataExt::uid(
        &fs::symlink_metadata(root.join(Path::new(path.trim()).file_name().unwrap())).unwrap(),
    );
    assert_eq!(owner, 65534, "outputs belong to the agent's user");
}

#[test]
fn fixed_output_builds_keep_the_network() {
    let _serial = one_at_a_time();
    let host_interfaces = fs::read_to_string("/proc/net/dev").unwrap().lines().count() - 2;
    assert!(host_interfaces > 1, "this test needs a host with a network interface besides lo");
    let drvs = instantiate("tests/nix/builds.nix", &["fixedNetwork"], &salt());
    let tmp = tempdir();
    let out = realise(&tmp.path().join("store"), &drvs["fixedNetwork"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn without_user_namespaces_the_setup_failure_says_why() {
    let _serial = one_at_a_time();
    // Inside a user namespace of our own, allow no further ones (the limit is per namespace).
    let drvs = instantiate("tests/nix/derivations.nix", &["single"], &salt());
    let tmp = tempdir();
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec {} realise --store-root {} {}",
        env!("CARGO_BIN_EXE_gbc"),
        tmp.path().join("store").display(),
        drvs["single"]
    );
    let out = run(std::process::Command::new("unshare").args(["--user", "--map-root-user", "sh", "-c", &script]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("build setup failed") && err.contains("user namespaces"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn the_sandbox_shows_what_nix_s_shows() {
    let _serial = one_at_a_time();
    let drvs = instantiate("tests/nix/sandbox-view.nix", &["view"], &salt());
    let drv = &drvs["view"];
    let tmp = tempdir();
    let root = tmp.path().join("store");
    let ours = realise(&root, drv, &[]);
    assert!(ours.status.success(), "{}", stderr(&ours));
    let path = String::from_utf8_lossy(&ours.stdout).trim().to_owned();
    let paths: Vec<&str> = common::HOST_SH.iter().map(|p| p.trim_end_matches('?')).collect();
    let theirs = nix_realise(&[drv], &["--option", "sandbox", "true", "--option", "sandbox-paths", &paths.join(" ")]);
    assert_eq!(path, theirs.trim());
    // Nix adds /dev/kvm when the host has it (its "kvm" system feature); gbc does not.
    let view = |text: String| -> String {
        text.lines().filter(|l| !l.split_whitespace().any(|w| w == "kvm")).collect::<Vec<_>>().join("\n")
    };
    let ours = view(fs::read_to_string(root.join(Path::new(&path).file_name().unwrap())).unwrap());
    let theirs = view(fs::read_to_string(&path).unwrap());
    assert_eq!(ours, theirs);

    // Without sandbox paths, nothing of the host is there: not even a shell to start.
    let bare = run(gbc().arg("realise").arg("--store-root").arg(tmp.path().join("bare")).arg(drv));
    assert_eq!(bare.status.code(), Some(1), "{}", stderr(&bare));
    assert!(stderr(&bare).contains("/bin/sh"), "{}", stderr(&bare));
}

/// A `/gnu/store` derivation is built the way guix-daemon builds it. guix-daemon can't run here;
/// the expected values are read from Guix's `nix/libstore/build.cc` (`guestUID`/`guestGID`, the
/// `/etc/passwd` and `/etc/group` it writes, `tmpDirInSandbox`, the variables `startBuilder` sets).
#[test]
fn gnu_store_builds_follow_guix_daemon_s_conventions() {
    let _serial = one_at_a_time();
    let tmp = tempdir();
    let (store, real) = common::gnu_store(tmp.path());
    let drv = common::instantiate("tests/nix/sandbox-view.nix", Some(&store), &["view"], &salt()).remove(0).1;
    let file = real.join(Path::new(&drv).file_name().unwrap());
    let root = tmp.path().join("gbc");
    let out = realise(&root, file.to_str().unwrap(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(path.starts_with("/gnu/store/"), "{path}");
    let view = fs::read_to_string(root.join(Path::new(&path).file_name().unwrap())).unwrap();
    let section = |name: &str| -> Vec<String> {
        view.split(&format!("== {name}\n"))
            .nth(1)
            .unwrap()
            .lines()
            .take_while(|l| !l.starts_with("== "))
            .map(str::to_owned)
            .collect()
    };
    let top = "/tmp/guix-build-sandbox-view.drv-0";
    assert_eq!(section("build dir")[0], top, "{view}");
    assert_eq!(
        section("passwd"),
        ["nixbld:x:30001:30000:Nix build user:/:/noshell", "nobody:x:65534:65534:Nobody:/:/noshell"]
    );
    assert_eq!(section("group"), ["nixbld:!:30000:"]);
    assert_eq!(section("id"), ["uid=30001(nixbld) gid=30000(nixbld) groups=30000(nixbld)"]);
    assert_eq!(section("tmp")[0], "1777");
    assert!(section("tmp").contains(&"guix-build-sandbox-view.drv-0".to_owned()), "{view}");
    let env: BTreeMap<String, String> =
        section("env").iter().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        assert_eq!(env.get(k).map(String::as_str), Some(top), "{k}");
    }
    assert_eq!(env.get("NIX_STORE").map(String::as_str), Some("/gnu/store"));
    assert_eq!(env.get("HOME").map(String::as_str), Some("/homeless-shelter"));
    for k in ["NIX_LOG_FD", "TERM"] {
        assert!(!env.contains_key(k), "guix-daemon does not set {k}: {env:?}");
    }
}

#[test]
fn only_fixed_output_builds_reach_the_host_s_network() {
    let _serial = one_at_a_time();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let tmp = tempdir();
    fs::write(tmp.path().join("reached"), "reached\n").unwrap();
    let reached_hash =
        run_ok_str(nix("nix-hash").args(["--type", "sha256", "--flat", "--base32"]).arg(tmp.path().join("reached")));
    let mut cmd = nix("nix-instantiate");
    cmd.arg(common::repo_path("tests/nix/network.nix"));
    cmd.args(["--argstr", "salt", &salt(), "--argstr", "port", &port, "--argstr", "reachedHash", reached_hash.trim()]);
    let drvs: Vec<String> = run_ok_str(cmd.args(["-A", "plain", "-A", "fixed"])).lines().map(str::to_owned).collect();
    let root = tmp.path().join("store");
    for (drv, expected) in drvs.iter().zip(["unreachable\n", "reached\n"]) {
        let out = realise(&root, drv, &[]);
        assert!(out.status.success(), "{drv}: {}", stderr(&out));
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(fs::read_to_string(root.join(Path::new(&path).file_name().unwrap())).unwrap(), expected, "{drv}");
    }
}
