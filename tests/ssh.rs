//! SSH build hosts with real OpenSSH: each host is an `sshd` of its own on loopback running this
//! build's `gbc agent` with its own store; the coordinator reaches them through machines.ron.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::sshd::{ClientKey, Host, client_key, machines_file};
use common::{Coordinator, drv_name, gbc, nix, nix_realise, run, run_ok_str, salt};
use serde_json::Value;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const HOSTS: &str = "tests/nix/hosts.nix";

/// `nix-instantiate` of attributes of tests/nix/hosts.nix (lists give several paths each).
fn instantiate(attrs: &[&str], salt: &str, extra: &[&str]) -> Vec<String> {
    let mut cmd = nix("nix-instantiate");
    cmd.arg(common::repo_path(HOSTS)).args(["--argstr", "salt", salt]).args(extra);
    for a in attrs {
        cmd.args(["-A", a]);
    }
    run_ok_str(&mut cmd).lines().map(str::to_owned).collect()
}

/// Two hosts, as in most tests below: alpha builds x86_64-linux with the `big` feature, 2 at a
/// time at speed 2; beta builds x86_64-linux and i686-linux, 1 at a time.
struct Farm {
    dir: tempfile::TempDir,
    client: ClientKey,
    alpha: Host,
    beta: Host,
    file: PathBuf,
}

impl Farm {
    fn start() -> Farm {
        let dir = common::tempdir();
        let client = client_key(dir.path(), "client");
        let alpha = Host::start(dir.path(), "alpha", &client);
        let beta = Host::start(dir.path(), "beta", &client);
        let file = dir.path().join("machines.ron");
        let farm = Farm { dir, client, alpha, beta, file };
        farm.write(&[farm.alpha_entry(), farm.beta_entry()]);
        farm
    }

    fn alpha_entry(&self) -> String {
        self.alpha_with("")
    }

    /// alpha's entry with `extra` fields in front (an `agent` there replaces the default).
    fn alpha_with(&self, extra: &str) -> String {
        let args = self.alpha.agent_args(&["x86_64-linux"], &["big"]);
        self.alpha.entry(
            &self.client,
            &format!("{extra}systems: [\"x86_64-linux\"], features: [\"big\"], parallel_builds: 2, speed: 2.0, {args}"),
        )
    }

    /// Build one derivation with both hosts up: alpha (the faster) is expected to take it and
    /// have its result rejected, beta to build it then. Returns why alpha's attempt was rejected.
    fn rejected_on_alpha_then_built_on_beta(&self) -> String {
        let c = self.coordinator(&[]);
        wait_up(&c, &["alpha", "beta"]);
        let uuid = c.submit(&instantiate(&["plain"], &salt(), &["--arg", "n", "1"]), &[]).remove(0);
        c.watch_ok(std::slice::from_ref(&uuid));
        let d = c.show(&uuid);
        let attempts = d["attempt_list"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "rejected on alpha, then built on beta: {d}");
        let first = (attempts[0]["machine"].as_str(), attempts[0]["status"].as_str());
        assert_eq!(first, (Some("alpha"), Some("rejected")), "{d}");
        assert!(attempts[0].get("outputs").is_none(), "nothing recorded from the rejected attempt: {d}");
        let second = (attempts[1]["machine"].as_str(), attempts[1]["status"].as_str());
        assert_eq!(second, (Some("beta"), Some("success")), "{d}");
        attempts[0]["reason"].as_str().unwrap().to_owned()
    }

    /// Run alpha's agent behind a Perl proxy (`SCRIPT ARGS... GBC agent`) that tampers with what
    /// it sends.
    fn alpha_behind_proxy(&self, script: &str, args: &[&str]) {
        let file = self.dir.path().join("proxy.pl");
        std::fs::write(&file, script).unwrap();
        let command = format!("perl {} {} {} agent", file.display(), args.join(" "), env!("CARGO_BIN_EXE_gbc"));
        self.write(&[self.alpha_with(&format!("agent: {command:?}, ")), self.beta_entry()]);
    }

    fn beta_entry(&self) -> String {
        let args = self.beta.agent_args(&["x86_64-linux", "i686-linux"], &[]);
        self.beta.entry(&self.client, &format!("systems: [\"x86_64-linux\", \"i686-linux\"], {args}"))
    }

    /// Write the machines file atomically, as editors do.
    fn write(&self, entries: &[String]) {
        let tmp = self.dir.path().join(".machines.ron.tmp");
        std::fs::write(&tmp, machines_file(entries)).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn coordinator(&self, extra: &[&str]) -> Coordinator {
        let mut args = vec!["--machines", self.file.to_str().unwrap()];
        args.extend_from_slice(extra);
        Coordinator::start(&args)
    }
}

/// The most builds running at once on each machine, from the attempts' start and end times.
fn peak_per_machine(details: &[Value]) -> BTreeMap<String, usize> {
    let mut edges: BTreeMap<String, Vec<(i64, i32)>> = BTreeMap::new();
    for d in details {
        for a in d["attempt_list"].as_array().unwrap() {
            let m = a["machine"].as_str().unwrap().to_owned();
            let e = edges.entry(m).or_default();
            e.push((a["started_ms"].as_i64().unwrap(), 1));
            e.push((a["ended_ms"].as_i64().unwrap(), -1));
        }
    }
    edges
        .into_iter()
        .map(|(m, mut e)| {
            // Ends before starts at the same instant.
            e.sort();
            let (mut now, mut peak) = (0i32, 0i32);
            for (_, d) in e {
                now += d;
                peak = peak.max(now);
            }
            (m, peak as usize)
        })
        .collect()
}

#[test]
fn builds_go_to_the_hosts_that_fit_and_their_outputs_equal_nix_s() {
    let farm = Farm::start();
    let c = farm.coordinator(&[]);
    wait_up(&c, &["alpha", "beta"]);
    let drvs = instantiate(&["plain", "big", "i686"], &salt(), &[]);
    assert_eq!(drvs.len(), 16);
    let mut cmd = c.gbc(&["build", "--json"]);
    let out = run(cmd.args(&drvs));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());

    let details: Vec<Value> = c.builds().iter().map(|b| c.show(b["uuid"].as_str().unwrap())).collect();
    assert_eq!(details.len(), 16);
    let mut plain_on: BTreeMap<String, usize> = BTreeMap::new();
    for d in &details {
        assert_eq!(d["state"], "succeeded", "{d}");
        let name = drv_name(d["drv"].as_str().unwrap());
        let attempts = d["attempt_list"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{d}");
        let machine = attempts[0]["machine"].as_str().unwrap().to_owned();
        if name.starts_with("big-") {
            assert_eq!(machine, "alpha", "only alpha has the big feature");
        } else if name.starts_with("i686-") {
            assert_eq!(machine, "beta", "only beta builds i686-linux");
        } else {
            *plain_on.entry(machine).or_default() += 1;
        }
    }
    // Both hosts took plain builds; the faster one with more slots took at least as many.
    let (on_alpha, on_beta) = (plain_on.get("alpha").copied().unwrap_or(0), plain_on.get("beta").copied().unwrap_or(0));
    assert!(on_beta > 0 && on_alpha >= on_beta, "{plain_on:?}");
    // Never more at once than parallel_builds allows.
    let peaks = peak_per_machine(&details);
    assert!(peaks["alpha"] <= 2 && peaks["beta"] <= 1, "{peaks:?}");
    assert_eq!(peaks["alpha"], 2, "alpha's two slots were both used");

    // The same derivations realised by Nix itself give the same NarHashes.
    let theirs = nix_realise(
        &drvs.iter().map(String::as_str).collect::<Vec<_>>(),
        &["--option", "extra-platforms", "i686-linux", "--option", "system-features", "big"],
    );
    assert_eq!(theirs.lines().count(), 16);
    for d in &details {
        let outputs = d["attempt_list"][0]["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), 1);
        let path = outputs[0]["path"].as_str().unwrap();
        let nix_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", path]));
        assert_eq!(outputs[0]["nar_hash"].as_str().unwrap(), nix_hash.trim(), "{path}");
    }
    let m: Vec<Value> = serde_json::from_str(&run_ok_str(&mut c.gbc(&["machines", "--json"]))).unwrap();
    assert_eq!(m.len(), 2, "no built-in localhost next to a machines file: {m:?}");
    assert!(m.iter().all(|m| m["state"] == "up"), "{m:?}");

    // Issue 13: `gbc machines test` works beside the running coordinator, whose agent holds
    // alpha's store: it tests with a scratch store, says so, and leaves nothing behind.
    let probe = run(gbc().args(["machines", "test", "alpha", "--machines"]).arg(&farm.file));
    let said = stdout(&probe);
    assert!(probe.status.success(), "{said}\n{}", stderr(&probe));
    assert!(said.contains("tested with a scratch store") && said.contains("there and back"), "{said}");
    // (The agent removes its scratch store once its input closes, after the command returned.)
    let scratch_left = || {
        std::fs::read_dir(farm.alpha.agent_dir.join("agent"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("scratch-"))
    };
    c.wait_until("the scratch store is removed", 30, || !scratch_left());
    assert_eq!(machine_state(&c, "alpha").as_deref(), Some("up"), "the coordinator's session is untouched");
}

fn machine_state(c: &Coordinator, name: &str) -> Option<String> {
    c.machines().iter().find(|m| m["name"] == name).map(|m| m["state"].as_str().unwrap().to_owned())
}

fn wait_up(c: &Coordinator, names: &[&str]) {
    c.wait_until(&format!("{names:?} are up"), 30, || {
        let m = c.machines();
        names.iter().all(|n| m.iter().any(|m| m["name"] == *n && m["state"] == "up"))
    });
}

#[test]
fn a_host_lost_mid_build_hands_the_build_to_the_other_and_comes_back() {
    let mut farm = Farm::start();
    let c = farm.coordinator(&["--reconnect-delay", "1"]);
    c.wait_until("both hosts are up", 30, || {
        machine_state(&c, "alpha").as_deref() == Some("up") && machine_state(&c, "beta").as_deref() == Some("up")
    });
    let salt = salt();
    let slow = instantiate(&["slow"], &salt, &[]);
    let uuid = c.submit(&slow, &[]).remove(0);
    let mut on = String::new();
    c.wait_until("the slow build runs", 30, || {
        let d = c.show(&uuid);
        match d["attempt_list"].as_array().and_then(|a| a.last()) {
            Some(a) if d["state"] == "running" => {
                on = a["machine"].as_str().unwrap().to_owned();
                true
            }
            _ => false,
        }
    });
    let (lost, other) = if on == "alpha" { ("alpha", "beta") } else { ("beta", "alpha") };
    if on == "alpha" {
        farm.alpha.sshd.kill()
    } else {
        farm.beta.sshd.kill()
    }

    // The build goes back to the queue and finishes on the other host.
    c.watch_ok(std::slice::from_ref(&uuid));
    let d = c.show(&uuid);
    let attempts = d["attempt_list"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{d}");
    assert_eq!(attempts[0]["machine"], lost);
    assert_eq!(attempts[0]["status"], "interrupted", "{d}");
    assert!(attempts[0]["reason"].as_str().unwrap().contains(&format!("lost machine {lost}")), "{d}");
    assert_eq!(attempts[1]["machine"], other);
    assert_eq!(attempts[1]["status"], "success");
    assert_eq!(machine_state(&c, lost).as_deref(), Some("down"));

    // The host comes back: the coordinator reconnects by itself and uses it again, for builds only
    // it can do.
    if on == "alpha" {
        farm.alpha.sshd.restart()
    } else {
        farm.beta.sshd.restart()
    }
    c.wait_until("the lost host is up again", 30, || machine_state(&c, lost).as_deref() == Some("up"));
    let only_there = instantiate(&[if lost == "alpha" { "big" } else { "i686" }], &salt, &[]);
    let uuids = c.submit(&only_there, &[]);
    c.watch_ok(&uuids);
    for u in &uuids {
        assert_eq!(c.show(u)["attempt_list"][0]["machine"], lost);
    }
}

/// Issue 12: a builder killed by a signal failed its build for good. As in Nix (a
/// `TransientFailure`), it is tried again, elsewhere when possible.
#[test]
fn a_builder_killed_by_a_signal_is_tried_again_elsewhere() {
    let mut farm = Farm::start();
    let c = farm.coordinator(&["--max-attempts", "5"]);
    wait_up(&c, &["alpha", "beta"]);
    let uuids = c.submit(&instantiate(&["fourSeconds"], &salt(), &[]), &[]);
    c.wait_until("alpha's two builders have started", 30, || {
        let alpha = c.machines().into_iter().find(|m| m["name"] == "alpha").unwrap();
        let running: Vec<String> =
            alpha["running"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect();
        running.len() == 2
            && running.iter().all(|u| {
                String::from_utf8_lossy(&run(&mut c.gbc(&["log", "--no-follow", u])).stdout).contains("starting")
            })
    });
    farm.alpha.sshd.kill_builds_then_all(Duration::from_secs(1));
    c.watch_ok(&uuids);
    let details: Vec<Value> = uuids.iter().map(|u| c.show(u)).collect();
    let on_alpha: Vec<&Value> = details
        .iter()
        .flat_map(|d| d["attempt_list"].as_array().unwrap())
        .filter(|a| a["machine"] == "alpha")
        .collect();
    let transient: Vec<&&Value> = on_alpha.iter().filter(|a| a["status"] == "transient_failure").collect();
    assert!(!transient.is_empty(), "the builds killed on alpha were reported: {details:?}");
    for a in transient {
        assert!(a["reason"].as_str().unwrap().contains("killed by"), "{a}");
    }
    // A build whose builder was killed ran again and succeeded, on beta once alpha was gone.
    for d in &details {
        let attempts = d["attempt_list"].as_array().unwrap();
        if attempts.iter().any(|a| a["status"] == "transient_failure") {
            let last = attempts.last().unwrap();
            assert_eq!((&last["machine"], &last["status"]), (&Value::from("beta"), &Value::from("success")), "{d}");
        }
    }
}

#[test]
fn a_host_with_the_wrong_key_gets_nothing() {
    let farm = Farm::start();
    // alpha's entry pins beta's host key.
    let alpha = farm.alpha_entry().replace(&farm.alpha.sshd.host_key, &farm.beta.sshd.host_key);
    farm.write(&[alpha, farm.beta_entry()]);
    let c = farm.coordinator(&[]);
    let uuids = c.submit(&instantiate(&["plain"], &salt(), &["--arg", "n", "3"]), &[]);
    c.watch_ok(&uuids);
    for u in &uuids {
        assert_eq!(c.show(u)["attempt_list"][0]["machine"], "beta");
    }
    let m = c.machines();
    let alpha = m.iter().find(|m| m["name"] == "alpha").unwrap();
    assert_eq!(alpha["state"], "down");
    assert!(alpha["last_error"].as_str().unwrap().contains("host key mismatch"), "{alpha}");
    // Its agent never ran: no store, no key was created there.
    assert_eq!(std::fs::read_dir(&farm.alpha.agent_dir).unwrap().count(), 0);
}

#[test]
fn outputs_signed_by_a_key_that_is_not_the_host_s_are_rejected() {
    let farm = Farm::start();
    // alpha's agent signs with its own key, but the machines file says its key is beta's.
    let alpha = farm.alpha_entry().replace(&farm.alpha.signing_public, &farm.beta.signing_public);
    farm.write(&[alpha, farm.beta_entry()]);
    let why = farm.rejected_on_alpha_then_built_on_beta();
    assert!(why.contains("not signed by a trusted key") && why.contains("alpha-1"), "{why}");
}

/// A host may sign with a Guix key (the /etc/guix/signing-key.sec a `guix offload` host has): its
/// outputs are accepted when machines.ron pins that key, rejected when it pins another Guix key.
#[test]
fn a_host_signing_with_a_guix_key_is_checked_against_its_guix_key() {
    let farm = Farm::start();
    let keys: Vec<(String, String)> = ["mine", "other"]
        .iter()
        .map(|name| {
            let (sec, public) =
                (farm.dir.path().join(format!("{name}.sec")), farm.dir.path().join(format!("{name}.pub")));
            common::run_ok(gbc().args(["keygen", "--format", "guix"]).arg(&sec).arg(&public));
            (sec.display().to_string(), std::fs::read_to_string(&public).unwrap().trim().to_owned())
        })
        .collect();
    let alpha_with = |public: &str| {
        farm.alpha_entry()
            .replace(&farm.alpha.signing_secret.display().to_string(), &keys[0].0)
            .replace(&farm.alpha.signing_public, public)
    };
    // Pinned to another Guix key: rejected, naming the key that signed.
    farm.write(&[alpha_with(&keys[1].1), farm.beta_entry()]);
    let why = farm.rejected_on_alpha_then_built_on_beta();
    assert!(why.contains("not signed by a trusted key (signature by Guix key "), "{why}");
    // Pinned to its own: built there; the narinfo has the cache's Sig: only.
    farm.write(&[alpha_with(&keys[0].1)]);
    let c = farm.coordinator(&[]);
    let drvs = instantiate(&["plain"], &salt(), &["--arg", "n", "1"]);
    let uuids = c.submit(&drvs, &[]);
    c.watch_ok(&uuids);
    let d = c.show(&uuids[0]);
    assert_eq!(d["attempt_list"][0]["machine"], "alpha", "{d}");
    let out = d["attempt_list"][0]["outputs"][0]["path"].as_str().unwrap().to_owned();
    let hash = &out.rsplit('/').next().unwrap()[..32];
    let narinfo = std::fs::read_to_string(c.state.join(format!("cache/{hash}.narinfo"))).unwrap();
    assert_eq!(narinfo.matches("\nSig: ").count(), 1, "{narinfo}");
}

/// Inputs an upstream cache has (chain-a, chain-b and multi, built by Nix) reach an SSH host
/// through the coordinator: only chain-c is built, on the host, with Nix's NarHash.
#[test]
fn a_host_gets_inputs_from_upstream_through_the_coordinator() {
    let farm = Farm::start();
    let salt = salt();
    let attrs = ["chainA", "chainB", "multi"];
    let (_, key) = common::upstream("tests/nix/derivations.nix", farm.dir.path(), &attrs, &salt);
    let files = common::files::Files::serve_dir(&farm.dir.path().join("cache"));
    farm.write(&[farm.alpha_entry()]);
    let url = files.url("");
    let c = farm.coordinator(&["--substituter", &url, "--substituter-key", &key]);
    let drv = common::instantiate("tests/nix/derivations.nix", None, &["chainC"], &salt).remove(0).1;
    let out = run(&mut c.gbc(&["submit", "--json", "--no-upload", &drv]));
    assert!(out.status.success(), "{}", common::stderr(&out));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(reply["dependencies"].as_array().unwrap().is_empty(), "{reply}");
    let uuid = reply["builds"][0].as_str().unwrap().to_owned();
    c.watch_ok(std::slice::from_ref(&uuid));
    let d = c.show(&uuid);
    assert_eq!(d["attempt_list"][0]["machine"], "alpha", "{d}");
    let ours = &d["attempt_list"][0]["outputs"][0];
    let theirs = nix_realise(&[&drv], &[]);
    let nix_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", theirs.trim()]));
    assert_eq!((ours["path"].as_str().unwrap(), ours["nar_hash"].as_str().unwrap()), (theirs.trim(), nix_hash.trim()));
    assert_eq!(c.builds().len(), 1);
}

/// A host with `substituters` of its own takes its inputs from upstream itself (the coordinator's
/// cache never gets them); when its substituter fails mid-transfer, the coordinator sends them
/// instead (from its own substituter), and says so.
#[test]
fn a_host_with_its_own_substituters_takes_inputs_itself_and_falls_back() {
    let farm = Farm::start();
    let salt = salt();
    let (_, key) = common::upstream("tests/nix/derivations.nix", farm.dir.path(), &["chainB", "multi"], &salt);
    let files = common::files::Files::serve_dir(&farm.dir.path().join("cache"));
    let drv = common::instantiate("tests/nix/derivations.nix", None, &["chainC"], &salt).remove(0).1;
    let b_out = gbc::formats::derivation::Derivation::parse(
        &std::fs::read(common::instantiate("tests/nix/derivations.nix", None, &["chainB"], &salt).remove(0).1).unwrap(),
    )
    .unwrap()
    .outputs["out"]
        .path
        .clone();
    let in_cache =
        |c: &Coordinator| c.state.join(format!("cache/{}.narinfo", &b_out["/nix/store/".len()..][..32])).exists();
    for (host_url, fallback) in [(files.url(""), false), (files.url("/cut"), true)] {
        farm.write(&[farm.alpha_with(&format!("substituters: [{host_url:?}], "))]);
        let c = farm.coordinator(&["--substituter", &files.url(""), "--substituter-key", &key]);
        let out = run(&mut c.gbc(&["build", "--no-upload", &drv]));
        assert!(out.status.success(), "{}\n{}", common::stderr(&out), c.log());
        assert_eq!(c.builds().len(), 1, "only chain-c is built");
        if fallback {
            assert!(c.log().contains("its substituters: "), "{}", c.log());
            assert!(in_cache(&c), "the coordinator took chain-b into its cache to send it");
        } else {
            assert!(!in_cache(&c), "the host took chain-b itself: the coordinator never had it");
        }
        // The next round's host starts with an empty store.
        drop(c);
        std::fs::remove_dir_all(&farm.alpha.agent_dir).unwrap();
        std::fs::create_dir_all(&farm.alpha.agent_dir).unwrap();
    }
}

#[test]
fn auto_deploy_uploads_gbc_to_a_host_without_it() {
    let farm = Farm::start();
    let args = farm.beta.agent_args(&["x86_64-linux"], &[]);
    let beta = farm
        .beta
        .entry(&farm.client, &format!("systems: [\"x86_64-linux\"], agent: \"gbc agent\", auto_deploy: true, {args}"));
    farm.write(std::slice::from_ref(&beta));
    // Without auto_deploy: a clear diagnosis.
    let plain = beta.replace("auto_deploy: true", "auto_deploy: false");
    let no_deploy = farm.dir.path().join("no-deploy.ron");
    std::fs::write(&no_deploy, machines_file(&[plain])).unwrap();
    let out = run(gbc().args(["machines", "test", "--machines"]).arg(&no_deploy));
    assert!(stdout(&out).contains("agent missing") && stdout(&out).contains("auto_deploy"), "{}", stdout(&out));

    let out = run(gbc().args(["machines", "test", "--machines"]).arg(&farm.file));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("deployed this coordinator's gbc"), "{}", stdout(&out));
    let deployed: Vec<_> =
        std::fs::read_dir(farm.beta.sshd.dir.join("cache/gbc")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(deployed.len(), 1, "one binary, no temporary files left: {deployed:?}");
    assert_eq!(std::fs::read(&deployed[0]).unwrap(), std::fs::read(env!("CARGO_BIN_EXE_gbc")).unwrap());

    // An agent that speaks another protocol version is replaced the same way.
    let fake_agent = farm.dir.path().join("old-agent");
    std::fs::write(
        &fake_agent,
        "#!/bin/sh\necho '{\"type\":\"hello\",\"protocol\":99,\"gbc_version\":\"0.0.1\"}'\nsleep 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake_agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let old = beta.replace("agent: \"gbc agent\"", &format!("agent: {:?}", fake_agent.display().to_string()));
    let old_file = farm.dir.path().join("old.ron");
    std::fs::write(&old_file, machines_file(&[old])).unwrap();
    let out = run(gbc().args(["machines", "test", "--machines"]).arg(&old_file));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("using the deployed"), "{}", stdout(&out));

    // The coordinator finds it there and builds with it.
    let c = farm.coordinator(&[]);
    let uuids = c.submit(&instantiate(&["plain"], &salt(), &["--arg", "n", "2"]), &[]);
    c.watch_ok(&uuids);
    assert!(c.log().contains("using the deployed"), "{}", c.log());
}

#[test]
fn machines_file_edits_apply_while_running() {
    let farm = Farm::start();
    farm.write(&[farm.alpha_entry()]);
    let c = farm.coordinator(&[]);
    c.wait_until("alpha is up", 30, || machine_state(&c, "alpha").as_deref() == Some("up"));
    assert_eq!(c.machines().len(), 1);
    // A bad edit is logged and changes nothing.
    std::fs::write(&farm.file, "(machines: [(name: \"x\")])").unwrap();
    c.wait_until("the bad edit is logged", 10, || c.log().contains("keeping the previous machines"));
    assert_eq!(machine_state(&c, "alpha").as_deref(), Some("up"));

    // A new machine is used.
    farm.write(&[farm.alpha_entry(), farm.beta_entry()]);
    c.wait_until("beta is up", 30, || machine_state(&c, "beta").as_deref() == Some("up"));
    let salt = salt();
    let i686 = c.submit(&instantiate(&["i686"], &salt, &[]), &[]);
    c.watch_ok(&i686);
    assert_eq!(c.show(&i686[0])["attempt_list"][0]["machine"], "beta");

    // A removed machine finishes what it runs, then goes.
    let slow = c.submit(&instantiate(&["slow"], &salt, &[]), &[]).remove(0);
    c.wait_until("the slow build runs on alpha", 30, || c.show(&slow)["state"] == "running");
    assert_eq!(c.show(&slow)["attempt_list"][0]["machine"], "alpha");
    farm.write(&[farm.beta_entry()]);
    c.wait_until("alpha drains", 10, || machine_state(&c, "alpha").as_deref() == Some("draining"));
    let after = c.submit(&instantiate(&["plain"], &salt, &["--arg", "n", "2"]), &[]);
    c.watch_ok(&after);
    for u in &after {
        assert_eq!(c.show(u)["attempt_list"][0]["machine"], "beta", "nothing new starts on a removed machine");
    }
    c.watch_ok(std::slice::from_ref(&slow));
    let d = c.show(&slow);
    assert_eq!(d["attempt_list"].as_array().unwrap().len(), 1, "it finished where it ran: {d}");
    c.wait_until("alpha is gone", 10, || machine_state(&c, "alpha").is_none());
}

#[test]
fn a_host_whose_link_is_cut_is_found_out_by_keepalives_and_comes_back() {
    let dir = common::tempdir();
    let client = client_key(dir.path(), "client");
    // gamma is in a network namespace of its own: cutting its link drops packets silently, so only
    // keepalives can tell (a killed sshd would at least reset the connection).
    let Some(gamma) = Host::start_in_netns(dir.path(), "gamma", &client) else {
        return common::skip("network namespaces need root and iproute2");
    };
    let beta = Host::start(dir.path(), "beta", &client);
    let file = dir.path().join("machines.ron");
    let x86 = "systems: [\"x86_64-linux\"]";
    std::fs::write(
        &file,
        machines_file(&[
            gamma.entry(&client, &format!("{x86}, speed: 10.0, {}", gamma.agent_args(&["x86_64-linux"], &[]))),
            beta.entry(&client, &format!("{x86}, {}", beta.agent_args(&["x86_64-linux"], &[]))),
        ]),
    )
    .unwrap();
    let c = Coordinator::start(&[
        "--machines",
        file.to_str().unwrap(),
        "--ssh-keepalive",
        "1",
        "--reconnect-delay",
        "1",
        "--ping-interval",
        "1",
    ]);
    c.wait_until("both hosts are up", 30, || {
        machine_state(&c, "gamma").as_deref() == Some("up") && machine_state(&c, "beta").as_deref() == Some("up")
    });
    let salt = salt();
    let uuid = c.submit(&instantiate(&["slow"], &salt, &[]), &[]).remove(0);
    c.wait_until("the slow build runs", 30, || c.show(&uuid)["state"] == "running");
    assert_eq!(c.show(&uuid)["attempt_list"][0]["machine"], "gamma", "the fastest free host gets it");
    gamma.sshd.set_link(false);

    c.watch_ok(std::slice::from_ref(&uuid));
    let d = c.show(&uuid);
    let attempts = d["attempt_list"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{d}");
    assert_eq!((attempts[0]["machine"].as_str(), attempts[0]["status"].as_str()), (Some("gamma"), Some("interrupted")));
    assert_eq!((attempts[1]["machine"].as_str(), attempts[1]["status"].as_str()), (Some("beta"), Some("success")));
    assert_eq!(machine_state(&c, "gamma").as_deref(), Some("down"));

    // The link comes back: the coordinator reconnects on its own and uses gamma again.
    gamma.sshd.set_link(true);
    c.wait_until("gamma is up again", 60, || machine_state(&c, "gamma").as_deref() == Some("up"));
    let uuids = c.submit(&instantiate(&["plain"], &salt, &["--arg", "n", "1"]), &[]);
    c.watch_ok(&uuids);
    assert_eq!(c.show(&uuids[0])["attempt_list"][0]["machine"], "gamma");

    // Cut while gamma is idle: only keepalives notice; it comes back all the same.
    gamma.sshd.set_link(false);
    c.wait_until("gamma is down", 30, || machine_state(&c, "gamma").as_deref() == Some("down"));
    // Not synchronisation: the link stays down a while (reconnections fail meanwhile).
    std::thread::sleep(Duration::from_secs(5));
    gamma.sshd.set_link(true);
    c.wait_until("gamma is up once more", 60, || machine_state(&c, "gamma").as_deref() == Some("up"));
}

/// A proxy for an agent's output that flips one bit of the contents in the first NAR chunk it sees
/// (Perl, which every Debian has).
const LIAR: &str = r#"
use strict;
$| = 1;
binmode STDOUT;
open(my $in, "-|", @ARGV) or die "cannot start @ARGV: $!";
binmode $in;
my $done = 0;
while (my $line = <$in>) {
    print $line;
    next unless $line =~ /"payload":(\d+)/;
    my ($n, $buf) = ($1, '');
    while (length($buf) < $n) {
        my $r = read($in, $buf, $n - length($buf), length($buf));
        last unless $r;
    }
    if (!$done && $line =~ /"type":"nar_chunk"/) {
        # Byte 96 of a NAR of one regular file is the first byte of its contents: the archive
        # stays well-formed, only its hash changes.
        substr($buf, 96, 1) = chr(ord(substr($buf, 96, 1)) ^ 1);
        $done = 1;
    }
    print $buf;
}
"#;

#[test]
fn a_nar_that_does_not_hash_to_the_agent_s_claim_is_rejected() {
    let farm = Farm::start();
    farm.alpha_behind_proxy(LIAR, &[]);
    let why = farm.rejected_on_alpha_then_built_on_beta();
    assert!(why.contains("does not match its claim"), "{why}");
}

/// A proxy for an agent's output that replaces every output's NAR with bytes that are not a NAR,
/// and makes the claim match them: their hash and size, signed with the host's own key (by
/// `gbc sign` over a narinfo of the forged claim). Arguments: GBC SECRET-KEY AGENT-COMMAND...
const FORGER: &str = r#"
use strict;
use JSON::PP;
use Digest::SHA qw(sha256_hex);
use File::Temp qw(tempfile);
$| = 1;
binmode STDOUT;
my ($gbc, $key, @agent) = @ARGV;
my $bogus = "this is not a NAR at all";
my $hex = sha256_hex($bogus);
my $nix32 = `nix-hash --type sha256 --to-base32 $hex`;
chomp $nix32;
my $hash = "sha256:$nix32";
open(my $in, "-|", @agent) or die "cannot start @agent: $!";
binmode $in;
my $json = JSON::PP->new->canonical;
my (%forged_meta, %forged_transfer);
sub sign {
    my ($meta) = @_;
    my ($fh, $file) = tempfile(SUFFIX => '.narinfo');
    my $refs = join(' ', map { (split m{/}, $_)[-1] } @{$meta->{references}});
    print $fh "StorePath: $meta->{path}\nURL: nar/x.nar\nCompression: none\nNarHash: $hash\nNarSize: " . length($bogus) . "\nReferences: $refs\n";
    close $fh;
    system($gbc, 'sign', '--key', $key, $file) == 0 or die "gbc sign failed";
    open(my $r, '<', $file) or die;
    my ($sig) = map { /^Sig: (.*)$/ ? $1 : () } <$r>;
    unlink $file;
    return $sig;
}
while (my $line = <$in>) {
    my $m = $json->decode($line);
    my $buf = '';
    if (defined $m->{payload}) {
        while (length($buf) < $m->{payload}) {
            my $r = read($in, $buf, $m->{payload} - length($buf), length($buf));
            last unless $r;
        }
    }
    if ($m->{type} eq 'finished' && $m->{status}{kind} eq 'success') {
        for my $o (@{$m->{outputs}}) {
            $o->{meta}{nar_hash} = $hash;
            $o->{meta}{nar_size} = length($bogus);
            $o->{signature} = sign($o->{meta});
            $forged_meta{$o->{meta}{path}} = $o->{meta};
        }
        print $json->encode($m), "\n";
    } elsif ($m->{type} eq 'nar_start' && defined $m->{build} && $forged_meta{$m->{meta}{path}}) {
        $m->{meta} = $forged_meta{$m->{meta}{path}};
        $forged_transfer{$m->{transfer}} = 1;
        print $json->encode($m), "\n";
    } elsif ($m->{type} eq 'nar_chunk' && $forged_transfer{$m->{transfer}}) {
        # swallowed: the forged bytes go out whole before the end
    } elsif ($m->{type} eq 'nar_end' && $forged_transfer{$m->{transfer}}) {
        print $json->encode({ type => 'nar_chunk', transfer => $m->{transfer}, payload => length($bogus) }), "\n", $bogus;
        print $line;
    } else {
        print $line, $buf;
    }
}
"#;

#[test]
fn a_host_cannot_publish_bytes_that_are_not_a_nar() {
    let farm = Farm::start();
    let key = farm.alpha.signing_secret.display().to_string();
    farm.alpha_behind_proxy(FORGER, &[env!("CARGO_BIN_EXE_gbc"), &key]);
    let why = farm.rejected_on_alpha_then_built_on_beta();
    assert!(why.contains("not a NAR"), "{why}");
}

#[test]
fn full_or_disabled_hosts_get_no_builds_and_known_hosts_files_pin_keys() {
    let farm = Farm::start();
    // alpha wants more free disk than any machine has; a third entry is disabled; beta's key is
    // checked against a known_hosts file instead of a pinned line.
    let alpha = farm.alpha_entry().replacen("systems:", "min_free_disk: 1000000000000000000, systems:", 1);
    let known = farm.dir.path().join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{} {}\n", farm.beta.sshd.port, farm.beta.sshd.host_key)).unwrap();
    let beta = farm.beta_entry().replacen(
        &format!("host_key: {:?}", farm.beta.sshd.host_key),
        &format!("known_hosts: {:?}", known.display().to_string()),
        1,
    );
    assert!(beta.contains("known_hosts") && !beta.contains("host_key"), "{beta}");
    let off = farm.beta_entry().replacen("name: \"beta\"", "name: \"off\"", 1).replacen(
        "systems:",
        "enabled: false, systems:",
        1,
    );
    farm.write(&[alpha, beta, off]);
    let c = farm.coordinator(&[]);
    wait_up(&c, &["alpha", "beta"]);
    let names: Vec<String> = c.machines().iter().map(|m| m["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["alpha", "beta"], "a disabled machine is not used");
    let uuids = c.submit(&instantiate(&["plain"], &salt(), &["--arg", "n", "3"]), &[]);
    c.watch_ok(&uuids);
    for u in &uuids {
        assert_eq!(c.show(u)["attempt_list"][0]["machine"], "beta", "alpha's store is too full");
    }
    // `gbc machines` says why alpha takes nothing.
    let listed = c.machines();
    let held = listed[0]["held_back"].as_str().unwrap_or_default();
    assert!(held.contains("below min_free_disk"), "{listed:?}");
    assert!(listed[1].get("held_back").is_none(), "{listed:?}");
    let text = run_ok_str(&mut c.gbc(&["machines"]));
    assert!(text.contains("no new builds:"), "{text}");

    // A known_hosts file that records another key for the host refuses it.
    std::fs::write(&known, format!("[127.0.0.1]:{} {}\n", farm.beta.sshd.port, farm.alpha.sshd.host_key)).unwrap();
    let out = run(gbc().args(["machines", "test", "beta", "--machines"]).arg(&farm.file));
    assert!(
        stdout(&out).contains("host key mismatch") && stdout(&out).contains("records another key"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_chain_across_three_hosts_gets_its_inputs_from_the_coordinator() {
    let dir = common::tempdir();
    let client = client_key(dir.path(), "client");
    let hosts: Vec<Host> = ["alpha", "beta", "gamma"].iter().map(|n| Host::start(dir.path(), n, &client)).collect();
    let file = dir.path().join("machines.ron");
    std::fs::write(
        &file,
        machines_file(&[
            hosts[0].entry(
                &client,
                &format!("systems: [\"x86_64-linux\"], {}", hosts[0].agent_args(&["x86_64-linux"], &[])),
            ),
            hosts[1]
                .entry(&client, &format!("systems: [\"i686-linux\"], {}", hosts[1].agent_args(&["i686-linux"], &[]))),
            hosts[2].entry(
                &client,
                &format!(
                    "systems: [\"x86_64-linux\"], features: [\"big\"], mandatory_features: [\"big\"], {}",
                    hosts[2].agent_args(&["x86_64-linux"], &["big"])
                ),
            ),
        ]),
    )
    .unwrap();
    let c = Coordinator::start(&["--machines", file.to_str().unwrap()]);
    wait_up(&c, &["alpha", "beta", "gamma"]);
    let drvs = instantiate(&["chainA", "chainB", "chainC"], &salt(), &[]);
    let out = run(&mut c.gbc(&["build", &drvs[2]]));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());

    let mut on = BTreeMap::new();
    for b in c.builds() {
        let d = c.show(b["uuid"].as_str().unwrap());
        let attempts = d["attempt_list"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "every step built at its first attempt: {d}");
        on.insert(drv_name(d["drv"].as_str().unwrap()).to_owned(), d);
    }
    let machine = |n: &str| on[n]["attempt_list"][0]["machine"].as_str().unwrap().to_owned();
    assert_eq!(
        (machine("chain-a"), machine("chain-b"), machine("chain-c")),
        ("alpha".into(), "beta".into(), "gamma".into())
    );
    // beta and gamma got their inputs from the coordinator: they are in their stores now.
    let a_out = on["chain-a"]["outputs"]["out"].as_str().unwrap().to_owned();
    let b_out = on["chain-b"]["outputs"]["out"].as_str().unwrap().to_owned();
    let in_store = |h: &Host, p: &str| h.agent_dir.join("agent/store").join(&p["/nix/store/".len()..]).exists();
    assert!(in_store(&hosts[1], &a_out) && in_store(&hosts[2], &b_out), "inputs were not sent");
    assert!(!in_store(&hosts[2], &a_out), "only the closure of the inputs is sent");

    // The same NarHashes as Nix's own realisation.
    nix_realise(
        &drvs.iter().map(String::as_str).collect::<Vec<_>>(),
        &["--option", "extra-platforms", "i686-linux", "--option", "system-features", "big"],
    );
    for d in on.values() {
        let o = &d["attempt_list"][0]["outputs"][0];
        let nix_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", o["path"].as_str().unwrap()]));
        assert_eq!(o["nar_hash"].as_str().unwrap(), nix_hash.trim(), "{d}");
    }
}
