//! Client commands reaching a coordinator on "another host": `--coordinator ssh://…` through a
//! real OpenSSH sshd on loopback, which connects the client to the coordinator's Unix socket
//! (`direct-streamlocal@openssh.com`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sshd::{Sshd, client_key, user};
use common::{Coordinator, gbc, nix, nix_realise, run, run_ok_str, salt, stderr, tempdir};

const QUEUE: &str = "tests/nix/queue.nix";

/// A client command run as if elsewhere: no state dir of its own, the coordinator reached
/// through sshd only.
#[derive(Clone)]
struct Remote {
    url: String,
    identity: std::path::PathBuf,
    host_key: String,
}

impl Remote {
    fn gbc(&self, args: &[&str]) -> Command {
        let mut cmd = gbc();
        cmd.args(args)
            .args(["--coordinator", &self.url, "--ssh-host-key", &self.host_key, "--ssh-identity"])
            .arg(&self.identity)
            .env("GBC_STATE_DIR", "/nonexistent/gbc")
            .env_remove("GBC_COORDINATOR")
            .env_remove("SSH_AUTH_SOCK");
        cmd
    }
}

#[test]
fn client_commands_reach_a_coordinator_through_sshd() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let tmp = tempdir();
    let key = client_key(tmp.path(), "client");
    let sshd = Sshd::start(&tmp.path().join("sshd"), &[&key.public]);
    let url = format!("ssh://{}@127.0.0.1:{}{}", user(), sshd.port, c.state.join("gbc.sock").display());
    let remote = Remote { url: url.clone(), identity: key.private.clone(), host_key: sshd.host_key.clone() };

    // A host presenting another key is refused before anything is sent.
    let other = client_key(tmp.path(), "other");
    let wrong = Remote { host_key: other.public.clone(), ..remote.clone() };
    let out = run(&mut wrong.gbc(&["machines"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("host key mismatch") && err.contains("nothing was sent"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let machines = run_ok_str(&mut remote.gbc(&["machines", "--json"]));
    assert!(machines.contains(r#""state":"up""#), "{machines}");

    // A socket named under the user's home there (gbc asks the host for $HOME).
    let home = std::env::var("HOME").unwrap();
    let up = "../".repeat(std::path::Path::new(&home).components().count() - 1);
    let socket = c.state.join("gbc.sock");
    let relative = format!("{up}{}", socket.display().to_string().trim_start_matches('/'));
    let from_home = Remote { url: format!("ssh://{}@127.0.0.1:{}/~/{relative}", user(), sshd.port), ..remote.clone() };
    let machines = run_ok_str(&mut from_home.gbc(&["machines", "--json"]));
    assert!(machines.contains(r#""state":"up""#), "{machines}");

    // A socket that is not there: sshd's refusal, said in one line.
    let missing = Remote { url: format!("{url}.nope"), ..remote.clone() };
    let out = run(&mut missing.gbc(&["builds"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("gbc.sock.nope"), "{}", stderr(&out));

    // An upload: this machine's Nix has base's output, the coordinator's cache does not.
    let drvs = common::drvs(QUEUE, &["base", "left", "ticker", "blocker"], &salt());
    let base_out = nix_realise(&[&drvs["base"]], &[]).trim().to_owned();
    let out = run(&mut remote.gbc(&["build", &drvs["left"]]));
    assert!(out.status.success(), "{}", stderr(&out));
    let hash = &base_out.rsplit('/').next().unwrap()[..32];
    let narinfo = std::fs::read_to_string(c.state.join(format!("cache/{hash}.narinfo"))).unwrap();
    let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", &base_out]));
    assert!(narinfo.contains(&format!("NarHash: {theirs}")), "{narinfo}");
    let listed: serde_json::Value = serde_json::from_str(&run_ok_str(&mut remote.gbc(&["builds", "--json"]))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "base was uploaded, not built: {listed}");

    // A running build's log, followed through SSH as it grows.
    let submitted = run_ok_str(&mut remote.gbc(&["submit", &drvs["ticker"]]));
    let uuid = submitted.split_whitespace().next().unwrap().to_owned();
    c.wait_for_state(&uuid, "running");
    let t0 = Instant::now();
    let mut follower = remote.gbc(&["log", &uuid]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(follower.stdout.take().unwrap());
    let mut followed = String::new();
    while !followed.contains("tick") {
        assert_ne!(out.read_line(&mut followed).unwrap(), 0, "{followed}");
    }
    assert_eq!(c.state(&uuid), "running", "the log came while the build ran: {followed}");
    std::io::Read::read_to_string(&mut out, &mut followed).unwrap();
    assert!(follower.wait().unwrap().success());
    assert!(t0.elapsed() > Duration::from_millis(500), "it followed the build to its end");
    assert_eq!(followed.lines().filter(|l| l.starts_with("tick")).count(), 6, "{followed}");
    let shown: serde_json::Value =
        serde_json::from_str(&run_ok_str(&mut remote.gbc(&["show", "--json", &uuid]))).unwrap();
    assert_eq!(shown["state"], "succeeded", "{shown}");

    // Cancel, and watch say so.
    let submitted = run_ok_str(&mut remote.gbc(&["submit", &drvs["blocker"]]));
    let blocker = submitted.split_whitespace().next().unwrap().to_owned();
    let out = run(&mut remote.gbc(&["cancel", &blocker]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(c.state(&blocker), "canceled");
    let out = run(&mut remote.gbc(&["watch", &blocker]));
    assert_ne!(out.status.code(), Some(0), "a canceled build is not a success");
}
