//! Helpers shared by the integration tests: running `gbc` and the reference Nix.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;

/// The `gbc` binary under test.
pub fn gbc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gbc"))
}

/// Nix settings for the tests: no network, no substituters, the `nix` command enabled.
const NIX_CONFIG: &str = "experimental-features = nix-command\nsubstituters =\nsandbox = false\n";

/// A command of the reference Nix. The tests need Debian's `nix-bin`; `scripts/test` installs it.
pub fn nix(program: &str) -> Command {
    static CHECK: Once = Once::new();
    CHECK.call_once(|| {
        let found = Command::new("nix-store").arg("--version").output().map(|o| o.status.success());
        assert!(
            matches!(found, Ok(true)),
            "the reference Nix (nix-store) is not installed: run scripts/test, which installs Debian's nix-bin"
        );
    });
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// Run a command, insisting it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

pub fn run_ok_str(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd)).expect("UTF-8 output")
}

/// Run a command and return everything about how it ended.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// `nix-instantiate` attributes of one of the test expressions (`tests/nix/*.nix`) with `salt`, in
/// the default store or `store`; returns attribute → `.drv` path, in the order given.
pub fn instantiate(file: &str, store: Option<&str>, attrs: &[&str], salt: &str) -> Vec<(String, String)> {
    let mut cmd = nix("nix-instantiate");
    if let Some(store) = store {
        cmd.args(["--store", store]);
    }
    cmd.arg(repo_path(file)).args(["--argstr", "salt", salt]);
    for a in attrs {
        cmd.args(["-A", a]);
    }
    let out = run_ok_str(&mut cmd);
    let paths: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), attrs.len(), "{out}");
    attrs.iter().map(|a| a.to_string()).zip(paths).collect()
}

/// A salt that makes this run's derivations new to the Nix store, so comparisons are live.
pub fn salt() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}
