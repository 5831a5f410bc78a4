//! `gbc nar` against the real `nix-store --dump`, `nix-hash` and `nix-store --restore`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{gbc, nix, run_ok, run_ok_str, tempdir};

/// A tree with every kind of entry the NAR format has and the awkward cases around them.
fn make_tree(root: &Path, big_file: bool) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("bin/owner-exec-only"), b"x").unwrap();
    fs::set_permissions(root.join("bin/owner-exec-only"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(root.join("bin/group-exec-only"), b"x").unwrap();
    fs::set_permissions(root.join("bin/group-exec-only"), fs::Permissions::from_mode(0o654)).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("seven"), b"1234567").unwrap();
    fs::write(root.join("eight"), b"12345678").unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    symlink("bin/tool", root.join("relative-link")).unwrap();
    symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    symlink("does/not/exist", root.join("dangling-link")).unwrap();
    symlink("..", root.join("dotdot-link")).unwrap();
    let mut deep = root.join("deep");
    for i in 0..60 {
        deep = deep.join(format!("level-{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom"), b"deep").unwrap();
    fs::write(root.join("grüße-世界-✓"), "unicode".as_bytes()).unwrap();
    fs::write(root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9-\xff")), b"not UTF-8").unwrap();
    // Names that sort differently bytewise than by any locale.
    for name in ["B", "a", "_", "Z", "0", "a.b", "a-b", "ab"] {
        fs::write(root.join("sorting").join(name), name)
            .or_else(|_| {
                fs::create_dir_all(root.join("sorting"))?;
                fs::write(root.join("sorting").join(name), name)
            })
            .unwrap();
    }
    if big_file {
        // 100 MB of xorshift output: incompressible, and not a multiple of 8 bytes.
        let mut f = fs::File::create(root.join("big")).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        let mut left: usize = 100_000_003;
        while left > 0 {
            for chunk in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            let n = left.min(buf.len());
            f.write_all(&buf[..n]).unwrap();
            left -= n;
        }
    }
}

/// Pipe a command's stdout into a SHA-256 (via `sha256sum`), so 100 MB NARs are never held twice.
fn stream_digest(cmd: &mut Command) -> String {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut sum = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut from = child.stdout.take().unwrap();
    let mut to = sum.stdin.take().unwrap();
    std::io::copy(&mut from, &mut to).unwrap();
    drop(to);
    assert!(child.wait().unwrap().success(), "{cmd:?} failed");
    let mut out = String::new();
    sum.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    sum.wait().unwrap();
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn dump_is_byte_identical_to_nix_store_dump() {
    let tmp = tempdir();
    let root = tmp.path().join("tree");
    make_tree(&root, true);
    let ours = stream_digest(gbc().args(["nar", "dump"]).arg(&root));
    let theirs = stream_digest(nix("nix-store").arg("--dump").arg(&root));
    assert_eq!(ours, theirs);
}

#[test]
fn dump_of_single_files_and_symlinks_matches_nix() {
    let tmp = tempdir();
    make_tree(&tmp.path().join("t"), false);
    for p in ["t/bin/tool", "t/empty", "t/seven", "t/relative-link", "t/dangling-link", "t/empty-dir"] {
        let path = tmp.path().join(p);
        let ours = run_ok(gbc().args(["nar", "dump"]).arg(&path));
        let theirs = run_ok(nix("nix-store").arg("--dump").arg(&path));
        assert!(ours == theirs, "{p}: NARs differ");
    }
}

#[test]
fn hash_equals_nix_hash() {
    let tmp = tempdir();
    let root = tmp.path().join("tree");
    make_tree(&root, true);
    let ours = run_ok_str(gbc().args(["nar", "hash"]).arg(&root));
    let theirs = run_ok_str(nix("nix-hash").args(["--type", "sha256", "--base32"]).arg(&root));
    assert_eq!(ours.trim(), format!("sha256:{}", theirs.trim()));
}

#[test]
fn hash_equals_nix_store_query_hash_of_a_store_path() {
    let tmp = tempdir();
    let root = tmp.path().join("gbc-test-src");
    make_tree(&root, false);
    fs::write(root.join("salt"), common::salt()).unwrap();
    let path = run_ok_str(nix("nix-store").arg("--add").arg(&root));
    let path = path.trim();
    let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", path]));
    let ours = run_ok_str(gbc().args(["nar", "hash", path]));
    assert_eq!(ours, theirs);
}

fn restore_with(cmd: &mut Command, nar: &[u8]) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let nar = nar.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&nar);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[test]
fn restore_round_trips_with_nix_in_both_directions() {
    let tmp = tempdir();
    let root = tmp.path().join("tree");
    make_tree(&root, false);
    let nar = run_ok(nix("nix-store").arg("--dump").arg(&root));

    // Nix's NAR unpacked by gbc, then dumped by Nix again.
    let ours = tmp.path().join("restored-by-gbc");
    let out = restore_with(gbc().args(["nar", "restore"]).arg(&ours), &nar);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(run_ok(nix("nix-store").arg("--dump").arg(&ours)) == nar, "gbc's restore differs");
    let tool = fs::metadata(ours.join("bin/tool")).unwrap().permissions().mode();
    assert_eq!(tool & 0o111, 0o111, "executable bits");

    // gbc's NAR unpacked by Nix.
    let gbc_nar = run_ok(gbc().args(["nar", "dump"]).arg(&root));
    let theirs = tmp.path().join("restored-by-nix");
    let out = restore_with(nix("nix-store").arg("--restore").arg(&theirs), &gbc_nar);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(run_ok(gbc().args(["nar", "dump"]).arg(&theirs)) == nar);
}

#[test]
fn restore_of_a_bad_nar_fails_cleanly() {
    let tmp = tempdir();
    make_tree(&tmp.path().join("tree"), false);
    let mut nar = run_ok(gbc().args(["nar", "dump"]).arg(tmp.path().join("tree")));
    nar.truncate(nar.len() / 2);
    let dest = tmp.path().join("dest");
    let out = restore_with(gbc().args(["nar", "restore"]).arg(&dest), &nar);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated") && err.lines().count() == 1, "{err}");
    let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![OsStr::new("tree").to_owned()], "restore left files behind");
}

/// `nix-store --export`'s stream, as gbc writes it for `nix-store --import` (what `gbc offload
/// nix` hands the daemon): byte for byte what Nix exports for a built path with a reference and
/// a deriver, and Nix imports it back.
#[test]
fn export_streams_are_nix_store_export_s() {
    use gbc::formats::nix_wire;
    let salt = common::salt();
    let drvs = common::drvs("tests/nix/queue.nix", &["base", "refsBase"], &salt);
    let out = common::nix_realise(&[&drvs["refsBase"]], &[]);
    let path = out.trim();
    let refs: Vec<String> =
        run_ok_str(nix("nix-store").args(["-q", "--references", path])).lines().map(str::to_owned).collect();
    assert_eq!(refs.len(), 1, "refs-base refers to base: {refs:?}");
    let deriver = run_ok_str(nix("nix-store").args(["-q", "--deriver", path])).trim().to_owned();
    assert_eq!(deriver, drvs["refsBase"]);
    let nar = run_ok(nix("nix-store").args(["--dump", path]));
    let mut ours = Vec::new();
    nix_wire::write_export_head(&mut ours).unwrap();
    ours.extend_from_slice(&nar);
    nix_wire::write_export_tail(&mut ours, path, &refs, &deriver).unwrap();
    nix_wire::write_export_end(&mut ours).unwrap();
    let theirs = run_ok(nix("nix-store").args(["--export", path]));
    assert_eq!(ours, theirs, "ours differs from nix-store --export");

    // Imported into a store that lacks the path (a fresh chroot store), it is valid there.
    let tmp = tempdir();
    let store = format!("local?root={}", tmp.path().display());
    let base = &refs[0];
    let base_export = run_ok(nix("nix-store").args(["--export", base]));
    for stream in [&base_export, &ours] {
        let mut import = nix("nix-store")
            .args(["--import", "--store", &store])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        import.stdin.take().unwrap().write_all(stream).unwrap();
        let done = import.wait_with_output().unwrap();
        assert!(done.status.success());
    }
    let check = run_ok_str(nix("nix-store").args(["--store", &store, "--verify-path", path]));
    assert_eq!(check, "");
    let hash = run_ok_str(nix("nix-store").args(["--store", &store, "-q", "--hash", path]));
    assert_eq!(hash, run_ok_str(nix("nix-store").args(["-q", "--hash", path])));
}
