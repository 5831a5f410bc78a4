//! machines.ron and `gbc machines test` against real OpenSSH servers: every diagnosis by name, the
//! ssh-agent, and one-line errors naming file and position.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::sshd::{Host, client_key, machines_file};
use common::{gbc, run};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn machines_test_reports_each_host_and_diagnoses_each_failure() {
    let dir = common::tempdir();
    let client = client_key(dir.path(), "client");
    let stranger = client_key(dir.path(), "stranger");
    let good = Host::start(dir.path(), "good", &client);
    let other = Host::start(dir.path(), "other", &client);
    let args = good.agent_args(&["x86_64-linux"], &["big"]);
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fake_agent = dir.path().join("old-agent");
    std::fs::write(
        &fake_agent,
        "#!/bin/sh\necho '{\"type\":\"hello\",\"protocol\":99,\"gbc_version\":\"0.0.1\",\"host\":null}'\nsleep 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake_agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let entries = vec![
        good.entry(&client, &format!("systems: [\"x86_64-linux\"], features: [\"big\"], {args}")),
        // Presents `other`'s host key where `good`'s is pinned.
        good.entry(&client, &format!("systems: [\"x86_64-linux\"], {args}"))
            .replace("name: \"good\"", "name: \"wrong-key\"")
            .replace(&good.sshd.host_key, &other.sshd.host_key),
        good.entry(&client, &format!("systems: [\"x86_64-linux\"], {args}"))
            .replace("name: \"good\"", "name: \"refused\"")
            .replace(&format!("port: {}", good.sshd.port), &format!("port: {closed_port}")),
        good.entry(&stranger, &format!("systems: [\"x86_64-linux\"], {args}"))
            .replace("name: \"good\"", "name: \"stranger\""),
        good.entry(&client, "systems: [\"x86_64-linux\"], agent: \"no-such-gbc agent\"")
            .replace("name: \"good\"", "name: \"missing\""),
        good.entry(&client, &format!("systems: [\"x86_64-linux\"], agent: {:?}", fake_agent.display().to_string()))
            .replace("name: \"good\"", "name: \"old\""),
    ];
    let file = dir.path().join("machines.ron");
    std::fs::write(&file, machines_file(&entries)).unwrap();

    let check = run(gbc().arg("check-config").arg(&file));
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(stdout(&check).contains("6 machines, ok"), "{}", stdout(&check));

    let out = run(gbc().args(["machines", "test", "--machines"]).arg(&file));
    let said = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{said}\n{}", stderr(&out));
    let section = |name: &str| -> String {
        let start = said.find(&format!("{name}:\n")).unwrap_or_else(|| panic!("no {name} in {said}"));
        said[start..].lines().skip(1).take_while(|l| l.starts_with("  ")).collect::<Vec<_>>().join("\n")
    };
    let g = section("good");
    assert!(!g.contains("FAIL"), "{g}");
    assert!(g.contains("systems x86_64-linux; features big"), "{g}");
    assert!(g.contains(&format!("{} (trusted)", good.signing_public)), "{g}");
    assert!(g.contains("gbc-machines-test") && g.contains("there and back"), "{g}");
    assert!(section("wrong-key").contains("FAIL  connect and start the agent: host key mismatch"), "{said}");
    assert!(section("refused").contains("connection refused"), "{said}");
    assert!(section("stranger").contains("authentication refused"), "{said}");
    assert!(section("missing").contains("agent missing"), "{said}");
    assert!(section("old").contains("protocol mismatch") && section("old").contains("version 99"), "{said}");
    assert!(stderr(&out).contains("machines failing: wrong-key (host key mismatch)"), "{}", stderr(&out));

    // One machine by name.
    let one = run(gbc().args(["machines", "test", "good", "--machines"]).arg(&file));
    assert!(one.status.success() && !stdout(&one).contains("refused"), "{}", stdout(&one));

    // Without an identity file, the keys of the ssh-agent at $SSH_AUTH_SOCK.
    let sock = dir.path().join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let add = run(std::process::Command::new("ssh-add").arg(&client.private).env("SSH_AUTH_SOCK", &sock));
    assert!(add.status.success(), "{}", stderr(&add));
    let with_agent = dir.path().join("with-agent.ron");
    let entry = good.entry(&client, &format!("systems: [\"x86_64-linux\"], {args}"));
    let entry = entry.replace(&format!("identity: {:?}, ", client.private.display().to_string()), "");
    assert!(!entry.contains("identity"), "{entry}");
    std::fs::write(&with_agent, machines_file(&[entry])).unwrap();
    let out = run(gbc().args(["machines", "test", "--machines"]).arg(&with_agent).env("SSH_AUTH_SOCK", &sock));
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = run(gbc().args(["machines", "test", "--machines"]).arg(&with_agent).env_remove("SSH_AUTH_SOCK"));
    assert!(stdout(&out).contains("authentication refused") && stdout(&out).contains("ssh-agent"), "{}", stdout(&out));
}

#[test]
fn a_bad_machines_file_gets_one_line_naming_file_and_position() {
    let dir = common::tempdir();
    let file = dir.path().join("machines.ron");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICt8gLdDAnGRd/jMz++Wkv8w45IPl6BGi/collfki9dG";
    let sig = "farm-1:xhEUSJFW7Y4RUUMyYjUwjPk+fYSVH0SruBaiw7GI2t8=";
    let machine = |extra: &str| {
        format!(
            "(name: \"m\", host: \"h\", host_key: \"{key}\", systems: [\"x86_64-linux\"], signing_key: \"{sig}\"{extra})"
        )
    };
    for (text, line, want) in [
        (format!("(machines: [\n{},\n])", machine(", parallel_builds: 0")), 2, "parallel_builds must be at least 1"),
        (format!("(machines: [\n{},\n{},\n])", machine(""), machine("")), 3, "machine name \"m\" is used twice"),
        (format!("(machines: [\n{}])", machine(", colour: 3")), 2, "colour"),
        (format!("(machines: [\n{}])", machine(", identity: \"missing-key\"")), 2, "missing-key: cannot read"),
    ] {
        std::fs::write(&file, &text).unwrap();
        let out = run(gbc().arg("check-config").arg(&file));
        assert_eq!(out.status.code(), Some(1), "{text}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        let at = format!("{}:{line}:", file.display());
        assert!(err.starts_with("gbc: error: machines file: ") && err.contains(&at) && err.contains(want), "{err}");
        // The coordinator refuses to start on it, with the same line.
        let c =
            run(gbc().args(["coordinator", "--state-dir"]).arg(dir.path().join("state")).arg("--machines").arg(&file));
        assert_eq!(stderr(&c), err);
    }
}
