//! The command line's contract: exit codes, one-line errors, key file handling, man pages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::{gbc, repo_path, run, run_ok, run_ok_str, tempdir};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every error is exactly one line, starting with `gbc: error:`.
fn assert_one_line_error(out: &std::process::Output, code: i32, needle: &str) {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("gbc: error: ") && err.contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn usage_errors_exit_2() {
    let out = run(gbc().args(["nar", "frobnicate"]));
    assert_eq!(out.status.code(), Some(2));
    let out = run(gbc().args(["verify", "x.narinfo"]));
    assert_eq!(out.status.code(), Some(2), "--trusted is required");
}

#[test]
fn io_errors_exit_2_naming_the_file() {
    let tmp = tempdir();
    let missing = tmp.path().join("missing");
    assert_one_line_error(&run(gbc().args(["nar", "hash"]).arg(&missing)), 2, "missing");
    assert_one_line_error(&run(gbc().args(["nar", "dump"]).arg(&missing)), 2, "missing");
    assert_one_line_error(&run(gbc().args(["drv", "show"]).arg(&missing)), 2, "missing");
}

#[test]
fn a_fifo_cannot_be_dumped() {
    let tmp = tempdir();
    let fifo = tmp.path().join("fifo");
    run_ok(std::process::Command::new("mkfifo").arg(&fifo));
    assert_one_line_error(&run(gbc().args(["nar", "hash"]).arg(&fifo)), 2, "a FIFO cannot be put in a NAR");
}

#[test]
fn restore_refuses_an_existing_destination() {
    let tmp = tempdir();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), "me").unwrap();
    let out = run(gbc().args(["nar", "restore"]).arg(&dest));
    assert_one_line_error(&out, 2, "already exists");
    assert_eq!(fs::read_to_string(dest.join("keep")).unwrap(), "me");
}

#[test]
fn restore_of_garbage_is_a_failed_check() {
    let tmp = tempdir();
    let input = fs::File::open(repo_path("Cargo.toml")).unwrap();
    let out = gbc().args(["nar", "restore"]).arg(tmp.path().join("d")).stdin(input).output().unwrap();
    assert_one_line_error(&out, 1, "bad magic");
    assert!(!tmp.path().join("d").exists());
}

#[test]
fn keygen_writes_private_files_and_never_overwrites() {
    let tmp = tempdir();
    let (s, p) = (tmp.path().join("k.secret"), tmp.path().join("k.public"));
    run_ok(gbc().args(["keygen", "cache.example.org-1"]).arg(&s).arg(&p));
    assert_eq!(fs::metadata(&s).unwrap().permissions().mode() & 0o777, 0o600);
    let secret = fs::read_to_string(&s).unwrap();
    assert!(secret.starts_with("cache.example.org-1:"));
    let out = run(gbc().args(["keygen", "x"]).arg(&s).arg(tmp.path().join("other.public")));
    assert_one_line_error(&out, 2, "refusing to overwrite");
    assert_eq!(fs::read_to_string(&s).unwrap(), secret, "secret key overwritten");
    let out = run(gbc().args(["keygen", "bad:name"]).arg(tmp.path().join("a")).arg(tmp.path().join("b")));
    assert_one_line_error(&out, 2, "key name");
    // Guix keys have no name: two files; the usual mistakes are named.
    let (gs, gp) = (tmp.path().join("g.sec"), tmp.path().join("g.pub"));
    run_ok(gbc().args(["keygen", "--format", "guix"]).arg(&gs).arg(&gp));
    assert_eq!(fs::metadata(&gs).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(fs::read_to_string(&gs).unwrap().starts_with("(private-key (ecc (curve Ed25519) (q #"));
    assert!(fs::read_to_string(&gp).unwrap().starts_with("(public-key (ecc (curve Ed25519) (q #"));
    let out =
        run(gbc().args(["keygen", "--format", "guix", "name"]).arg(tmp.path().join("c")).arg(tmp.path().join("d")));
    assert_one_line_error(&out, 2, "takes SECRET PUBLIC");
    let out = run(gbc().args(["keygen", "name"]).arg(tmp.path().join("c")));
    assert_one_line_error(&out, 2, "NAME SECRET PUBLIC");
    assert!(!tmp.path().join("c").exists() && !tmp.path().join("d").exists());
}

#[test]
fn a_narinfo_signed_for_guix_is_not_silently_unsigned() {
    let tmp = tempdir();
    let (s, p) = (tmp.path().join("k.secret"), tmp.path().join("k.public"));
    let (gs, gp) = (tmp.path().join("g.sec"), tmp.path().join("g.pub"));
    run_ok(gbc().args(["keygen", "k-1"]).arg(&s).arg(&p));
    run_ok(gbc().args(["keygen", "--format", "guix"]).arg(&gs).arg(&gp));
    let ni = tmp.path().join("b.narinfo");
    fs::write(&ni, NARINFO).unwrap();
    run_ok(gbc().args(["sign", "--host", "h", "--key"]).arg(&gs).arg(&ni));
    let signed = fs::read_to_string(&ni).unwrap();
    assert!(signed.starts_with(NARINFO) && signed.ends_with("\n") && signed.contains("\nSignature: 1;h;"), "{signed}");
    // A Sig: line alone would change the text the Signature: covers.
    assert_one_line_error(&run(gbc().arg("sign").arg("--key").arg(&s).arg(&ni)), 1, "give its Guix key too");
    assert_eq!(fs::read_to_string(&ni).unwrap(), signed, "left as it was");
    run_ok(gbc().arg("sign").arg("--key").arg(&s).arg("--key").arg(&gs).arg(&ni));
    let both = fs::read_to_string(&ni).unwrap();
    assert!(both.find("\nSig: k-1:") < both.find("\nSignature: "), "{both}");
    for trusted in [&p, &gp] {
        run_ok(gbc().arg("verify").arg("--trusted").arg(trusted).arg(&ni));
    }
    // Two Guix keys, a bad host name, a Guix public key given as a secret one.
    let out = run(gbc().arg("sign").arg("--key").arg(&gs).arg("--key").arg(&gs).arg(&ni));
    assert_one_line_error(&out, 2, "a second Guix key");
    assert_one_line_error(&run(gbc().args(["sign", "--host", "a;b", "--key"]).arg(&gs).arg(&ni)), 2, "host name");
    assert_one_line_error(&run(gbc().arg("sign").arg("--key").arg(&gp).arg(&ni)), 2, "g.pub: not a secret key");
    fs::write(tmp.path().join("bad.pub"), "(public-key (ecc (curve NIST P-256) (q #04#)))").unwrap();
    let out = run(gbc().arg("verify").arg("--trusted").arg(tmp.path().join("bad.pub")).arg(&ni));
    assert_one_line_error(&out, 2, "bad.pub: not a public key: not a Guix public key: expected (curve Ed25519)");
}

const NARINFO: &str = "StorePath: /gnu/store/6vza80pmr3wck2yvv8nwaphbnj11vrql-b
URL: nar/1impfw8zdgisxkghq9a3q7cn7jb9zyzgxdydiamp8z2nlyyl0h5h.nar
Compression: none
NarHash: sha256:1impfw8zdgisxkghq9a3q7cn7jb9zyzgxdydiamp8z2nlyyl0h5h
NarSize: 120
References: 3pysdbjixd4amzidam0kp6vwzpqy58y3-a
";

#[test]
fn sign_then_verify_with_any_of_several_trusted_files() {
    let tmp = tempdir();
    let (s, p) = (tmp.path().join("k.secret"), tmp.path().join("k.public"));
    let (_, p2) = (tmp.path().join("o.secret"), tmp.path().join("o.public"));
    run_ok(gbc().args(["keygen", "k-1"]).arg(&s).arg(&p));
    run_ok(gbc().args(["keygen", "o-1"]).arg(tmp.path().join("o.secret")).arg(&p2));
    let ni = tmp.path().join("b.narinfo");
    fs::write(&ni, NARINFO).unwrap();
    fs::set_permissions(&ni, fs::Permissions::from_mode(0o640)).unwrap();

    let out = run(gbc().arg("verify").arg("--trusted").arg(&p).arg(&ni));
    assert_one_line_error(&out, 1, "no valid signature");

    run_ok(gbc().arg("sign").arg("--key").arg(&s).arg(&ni));
    assert_eq!(fs::metadata(&ni).unwrap().permissions().mode() & 0o777, 0o640, "mode kept");
    let signed = fs::read_to_string(&ni).unwrap();
    assert!(signed.starts_with(NARINFO) && signed.contains("\nSig: k-1:"), "{signed}");
    let ok = run_ok_str(gbc().arg("verify").arg("--trusted").arg(&p2).arg("--trusted").arg(&p).arg(&ni));
    assert!(ok.contains("signed by k-1"));
    let out = run(gbc().arg("verify").arg("--trusted").arg(&p2).arg(&ni));
    assert_one_line_error(&out, 1, "b.narinfo: no valid signature");
}

#[test]
fn malformed_narinfos_and_keys_are_named() {
    let tmp = tempdir();
    let (s, p) = (tmp.path().join("k.secret"), tmp.path().join("k.public"));
    run_ok(gbc().args(["keygen", "k-1"]).arg(&s).arg(&p));
    let ni = tmp.path().join("bad.narinfo");
    fs::write(&ni, NARINFO.replace("NarSize: 120", "NarSize: many")).unwrap();
    assert_one_line_error(&run(gbc().arg("sign").arg("--key").arg(&s).arg(&ni)), 1, "bad.narinfo: line 5");
    assert_one_line_error(&run(gbc().arg("verify").arg("--trusted").arg(&p).arg(&ni)), 1, "bad.narinfo: line 5");
    // A public key given as the secret key.
    assert_one_line_error(&run(gbc().arg("sign").arg("--key").arg(&p).arg(&ni)), 2, "k.public: not a secret key");
}

#[test]
fn a_world_readable_secret_key_gets_a_warning() {
    let tmp = tempdir();
    let (s, p) = (tmp.path().join("k.secret"), tmp.path().join("k.public"));
    run_ok(gbc().args(["keygen", "k-1"]).arg(&s).arg(&p));
    let ni = tmp.path().join("b.narinfo");
    fs::write(&ni, NARINFO).unwrap();
    let out = run(gbc().arg("sign").arg("--key").arg(&s).arg(&ni));
    assert!(out.status.success() && out.stderr.is_empty(), "{}", stderr_of(&out));
    fs::set_permissions(&s, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(gbc().arg("sign").arg("--key").arg(&s).arg(&ni));
    assert!(out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("warning") && err.contains("k.secret") && err.contains("0644"), "{err}");
}

#[test]
fn demo_runs() {
    let out = run_ok_str(gbc().arg("demo"));
    assert!(
        out.contains("identical")
            && out.contains("Verified with")
            && out.contains(": true; after changing NarSize: false"),
        "{out}"
    );
}

#[test]
fn man_pages_are_up_to_date() {
    let tmp = tempdir();
    run_ok(gbc().arg("generate-man").arg(tmp.path()));
    let names = |dir: &Path| {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("gbc"))
            .collect();
        v.sort();
        v
    };
    let committed = repo_path("man");
    assert_eq!(names(tmp.path()), names(&committed), "run: cargo run -- generate-man man");
    for n in names(tmp.path()) {
        let fresh = fs::read(tmp.path().join(&n)).unwrap();
        assert!(fresh == fs::read(committed.join(&n)).unwrap(), "man/{n} is stale: run cargo run -- generate-man man");
    }
}

#[test]
fn keys_dir_holds_only_clearly_named_test_keys() {
    use gbc::formats::signing::{PublicKey, SecretKey};
    let dir = repo_path("keys");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "README.md" {
            continue;
        }
        assert!(name.contains("test-only-DO-NOT-TRUST"), "{name}: only test keys belong in keys/");
        let text = fs::read_to_string(&path).unwrap();
        if name.ends_with(".secret") {
            let key = SecretKey::parse(&text).unwrap();
            assert!(key.name().starts_with("gbc-test-only-DO-NOT-TRUST"), "{name}: {}", key.name());
            let public = fs::read_to_string(path.with_extension("public")).unwrap();
            assert_eq!(key.public(), PublicKey::parse(&public).unwrap(), "{name}: halves differ");
        } else {
            assert!(PublicKey::parse(&text).unwrap().name().starts_with("gbc-test-only-DO-NOT-TRUST"));
        }
        seen += 1;
    }
    assert!(seen >= 2);
}

#[test]
fn check_config_reads_coordinator_ron_too() {
    let tmp = tempdir();
    let conf = tmp.path().join("coordinator.ron");
    fs::write(&conf, "(\n  substituters: [\"https://cache.example.org\"],\n  substituter_keys: [\"nokey\"],\n)\n")
        .unwrap();
    assert_one_line_error(
        &run(gbc().arg("check-config").arg(&conf)),
        1,
        "coordinator.ron:3:22: substituter key \"nokey\"",
    );
    fs::write(&conf, include_str!("../coordinator.example.ron")).unwrap();
    let ok = run_ok_str(gbc().arg("check-config").arg(&conf));
    assert!(ok.ends_with("coordinator.ron: 2 substituters, 2 substituter keys, 2 hooks, ok\n"), "{ok}");
    // A hook that is wrong: where, and why.
    fs::write(&conf, "(hooks: [\n  (name: \"h\", url: \"ftp://x\"),\n])\n").unwrap();
    assert_one_line_error(
        &run(gbc().arg("check-config").arg(&conf)),
        1,
        "coordinator.ron:2:10: hook \"h\": url \"ftp://x\" is not http(s)",
    );
}
