//! `gbc offload nix` as the build hook of the real Nix (Debian's 2.8): `nix-build` and
//! `nix-store --realise` with `--max-jobs 0` go through a coordinator, and their outputs become
//! valid in the local store with Nix's own NarHashes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::sshd::{Host, client_key, machines_file};
use common::{Coordinator, nix, repo_path, run, run_ok_str, salt, stderr};

const QUEUE: &str = "tests/nix/queue.nix";

/// A Nix command whose build hook is gbc (through the wrapper Nix 2.8 needs) and whose
/// coordinator is `c`.
fn with_hook(c: &Coordinator, program: &str) -> Command {
    let mut cmd = nix(program);
    cmd.args(["--option", "build-hook"])
        .arg(repo_path("scripts/gbc-nix-build-hook"))
        .env("GBC", env!("CARGO_BIN_EXE_gbc"))
        .env("GBC_COORDINATOR", c.state.join("gbc.sock"));
    cmd
}

#[test]
fn nix_builds_through_the_coordinator() {
    // The coordinator drives two build hosts behind real sshds.
    let dir = common::tempdir();
    let client = client_key(dir.path(), "client");
    let hosts = [Host::start(dir.path(), "alpha", &client), Host::start(dir.path(), "beta", &client)];
    let system = format!("{}-linux", std::env::consts::ARCH);
    let entries: Vec<String> = hosts
        .iter()
        .map(|h| h.entry(&client, &format!("systems: [{system:?}], {}", h.agent_args(&[&system], &[]))))
        .collect();
    let file = dir.path().join("machines.ron");
    std::fs::write(&file, machines_file(&entries)).unwrap();
    let c = Coordinator::start(&["--machines", file.to_str().unwrap()]);
    c.wait_until("alpha and beta are up", 30, || {
        let m = c.machines();
        ["alpha", "beta"].iter().all(|n| m.iter().any(|m| m["name"] == *n && m["state"] == "up"))
    });
    let salt = salt();
    let drvs = common::drvs(QUEUE, &["hookFirst", "hookSecond", "hookThird", "hookBroken", "hookLocal"], &salt);

    // A chain, with nothing built here (--max-jobs 0): every step went through gbc.
    let out = run(with_hook(&c, "nix-build").arg(repo_path(QUEUE)).args([
        "--argstr",
        "salt",
        &salt,
        "-A",
        "hookSecond",
        "--no-out-link",
        "--max-jobs",
        "0",
    ]));
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("building first") && log.contains("building second"), "the log reaches Nix: {log}");
    assert!(log.contains("on 'gbc'"), "{log}");
    let second = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let builds = c.builds();
    assert_eq!(builds.len(), 2, "{builds:?}");
    for b in &builds {
        assert_eq!(b["state"], "succeeded", "{b}");
        let detail = c.show(b["uuid"].as_str().unwrap());
        let attempt = detail["attempt_list"].as_array().unwrap().last().unwrap().clone();
        assert!(["alpha", "beta"].contains(&attempt["machine"].as_str().unwrap()), "{attempt}");
        for o in attempt["outputs"].as_array().unwrap() {
            let path = o["path"].as_str().unwrap();
            assert_eq!(run_ok_str(nix("nix-store").args(["--verify-path", path])), "");
            let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", path]));
            assert_eq!(theirs.trim(), o["nar_hash"].as_str().unwrap(), "{path}");
            let deriver = run_ok_str(nix("nix-store").args(["-q", "--deriver", path]));
            assert_eq!(deriver.trim(), b["drv"].as_str().unwrap());
        }
    }
    let refs = run_ok_str(nix("nix-store").args(["-q", "--references", &second]));
    assert!(refs.contains("-hook-first"), "second refers to first: {refs}");

    // nix-store --realise of the next link.
    let out = run(with_hook(&c, "nix-store").args(["--realise", &drvs["hookThird"], "--max-jobs", "0"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(c.builds().len(), 3);

    // A failing derivation fails the Nix build, the reason in its output.
    let out = run(with_hook(&c, "nix-store").args(["--realise", &drvs["hookBroken"], "--max-jobs", "0"]));
    assert!(!out.status.success());
    let log = stderr(&out);
    assert!(log.contains("breaking on purpose"), "{log}");
    assert!(log.contains("gbc: build") && log.contains("failed"), "{log}");

    // A feature no machine has: declined, and built here when Nix may (by Nix's own builder,
    // which the reference harness tries again if Nix kills it).
    let out = common::reference(|| {
        let mut cmd = with_hook(&c, "nix-store");
        cmd.args(["--realise", &drvs["hookLocal"], "--max-jobs", "1", "--option", "system-features", "gbc-test-local"]);
        cmd
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("on 'gbc'"), "{}", stderr(&out));
    assert_eq!(c.builds().len(), 4, "the coordinator got nothing more than broken");
}
