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

/// guix-daemon's side of its build hook protocol (nix/libstore/build.cc, nix/libutil/util.cc's
/// `Agent`): the hook's stdin is the request pipe, its stdout and stderr one pipe the daemon reads
/// replies from, fd 4 the build log (a file here).
struct GuixDaemonSide {
    child: std::process::Child,
    to: Option<std::process::ChildStdin>,
    from: std::io::BufReader<std::io::PipeReader>,
    log: std::path::PathBuf,
    /// What the hook wrote that was not a reply.
    chatter: String,
}

impl GuixDaemonSide {
    fn start(c: &Coordinator, dir: &std::path::Path, import: &std::path::Path, extra: &[&str]) -> GuixDaemonSide {
        let (reader, writer) = std::io::pipe().unwrap();
        let log = dir.join(format!("hook-{}.log", salt()));
        let system = format!("{}-linux", std::env::consts::ARCH);
        // Through the shipped `guix` wrapper, as guix-daemon would run it.
        let child = Command::new("sh")
            .args(["-c", "exec \"$@\" 4>\"$GBC_TEST_LOG\"", "sh"])
            .arg(repo_path("scripts/guix-offload-wrapper"))
            .args(["offload", system.as_str(), "3600", "0", "0"])
            .args(extra)
            .env("GBC", env!("CARGO_BIN_EXE_gbc"))
            .env("GBC_GUIX_IMPORT", import)
            .env("GBC_COORDINATOR", c.state.join("gbc.sock"))
            .env("GBC_TEST_LOG", &log)
            .stdin(std::process::Stdio::piped())
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .spawn()
            .unwrap();
        let mut side =
            GuixDaemonSide { child, to: None, from: std::io::BufReader::new(reader), log, chatter: String::new() };
        side.to = side.child.stdin.take();
        side
    }

    fn line(&mut self, line: &str) {
        use std::io::Write as _;
        writeln!(self.to.as_mut().unwrap(), "{line}").unwrap();
    }

    /// As `tryBuildHook` does: `format("%1% %2% %3% %4%")`, then the first line starting `# `.
    fn request(&mut self, drv: &str, features: &[&str]) -> String {
        use std::io::BufRead as _;
        let system = format!("{}-linux", std::env::consts::ARCH);
        self.line(&format!("1 {system} {drv} {}", features.join(",")));
        loop {
            let mut line = String::new();
            assert!(self.from.read_line(&mut line).unwrap() > 0, "the hook closed its output: {}", self.chatter);
            if let Some(reply) = line.strip_prefix("# ") {
                return reply.trim_end().to_owned();
            }
            self.chatter.push_str(&line);
        }
    }

    /// After `# accept`: the inputs (the derivation's closure) and the missing outputs, each a
    /// line of paths followed by spaces; then the pipe is closed.
    fn send_paths(&mut self, drv: &str) {
        let closure = run_ok_str(nix("nix-store").args(["-qR", drv]));
        let outputs = run_ok_str(nix("nix-store").args(["-q", "--outputs", drv]));
        let line = |paths: &str| paths.lines().map(|p| format!("{p} ")).collect::<String>();
        self.line(&line(&closure));
        self.line(&line(&outputs));
        self.to = None;
    }

    /// What the hook wrote to fd 4 so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// [`GuixDaemonSide::send_paths`], then the hook's exit status, its log and its chatter.
    fn send_paths_and_wait(mut self, drv: &str) -> (i32, String, String) {
        use std::io::Read as _;
        self.send_paths(drv);
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        self.from.read_to_string(&mut rest).unwrap();
        self.chatter.push_str(&rest);
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        (status.code().unwrap_or(-1), log, self.chatter)
    }
}

/// Read one item of an export stream after its NAR (`nar_len` bytes from `at`): returns where
/// the signed part ends, the path and the signature.
fn export_item_tail(bytes: &[u8], at: usize, nar_len: usize) -> (usize, String, Vec<u8>, usize) {
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap()) as usize;
    let string_at = |i: usize| {
        let n = u64_at(i);
        (bytes[i + 8..i + 8 + n].to_vec(), i + 8 + n.div_ceil(8) * 8)
    };
    let mut i = at + nar_len;
    assert_eq!(u64_at(i), 0x4558_494e, "the export magic follows the NAR");
    let (path, next) = string_at(i + 8);
    i = next;
    let refs = u64_at(i);
    i += 8;
    for _ in 0..refs {
        i = string_at(i).1;
    }
    i = string_at(i).1; // the deriver
    let signed_end = i;
    assert_eq!(u64_at(i), 1, "a signature follows");
    let (signature, next) = string_at(i + 8);
    (signed_end, String::from_utf8(path).unwrap(), signature, next)
}

#[test]
fn guix_daemon_s_hook_protocol() {
    // The wrapper sends all but `offload` to the real guix.
    let out = run(Command::new(repo_path("scripts/guix-offload-wrapper"))
        .args(["build", "--dry-run", "hello"])
        .env("REAL_GUIX", "/bin/echo"));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "build --dry-run hello\n");
    let dir = common::tempdir();
    let export = dir.path().join("export");
    let import = dir.path().join("import");
    std::fs::write(&import, format!("#!/bin/sh\nexec cat > {}\n", export.display())).unwrap();
    std::fs::set_permissions(&import, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let c = Coordinator::start(&["--local-builds", "1", "--guix-signatures"]);
    c.wait_until("the local machine is up", 30, || c.machines().iter().any(|m| m["state"] == "up"));
    let salt = salt();
    let drvs = common::drvs(QUEUE, &["hookFirst", "hookBroken", "hookLocal", "slow"], &salt);

    // While the one machine is full, --postpone postpones; once it is free the same request is
    // accepted, the log goes to fd 4, and the outputs come as a signed export stream.
    let slow = c.submit(&[&drvs["slow"]], &[]);
    c.wait_for_state(&slow[0], "running");
    let mut hook = GuixDaemonSide::start(&c, dir.path(), &import, &["--postpone"]);
    assert_eq!(hook.request(&drvs["hookFirst"], &[]), "postpone", "{}", hook.chatter);
    run_ok_str(&mut c.gbc(&["cancel", &slow[0]]));
    c.wait_until("the machine is free", 30, || c.machines()[0]["running"].as_array().is_some_and(Vec::is_empty));
    assert_eq!(hook.request(&drvs["hookFirst"], &[]), "accept", "{}", hook.chatter);
    let (code, log, chatter) = hook.send_paths_and_wait(&drvs["hookFirst"]);
    assert_eq!(code, 0, "{chatter}\n{log}");
    assert!(log.contains(&format!("building first {salt}")), "the build log is on fd 4: {log:?}");
    let out = run_ok_str(nix("nix-store").args(["-q", "--outputs", &drvs["hookFirst"]])).trim().to_owned();
    let build = c.builds().into_iter().find(|b| b["drv"] == drvs["hookFirst"].as_str()).unwrap();
    assert_eq!(build["tags"], serde_json::json!([["via", "guix-daemon"]]), "{build}");
    let detail = c.show(build["uuid"].as_str().unwrap());
    let ours = detail["attempt_list"].as_array().unwrap().last().unwrap()["outputs"][0]["nar_hash"].clone();

    // The stream is one Nix imports (it reads past the signature): the output, with its hash.
    let stream = std::fs::read(&export).unwrap();
    let store = format!("local?root={}", dir.path().join("store").display());
    let mut imp = nix("nix-store")
        .args(["--import", "--store", &store])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut imp.stdin.take().unwrap(), &stream).unwrap();
    let done = imp.wait_with_output().unwrap();
    assert!(done.status.success());
    assert_eq!(String::from_utf8(done.stdout).unwrap().trim(), out);
    assert_eq!(run_ok_str(nix("nix-store").args(["--store", &store, "-q", "--hash", &out])).trim(), ours);

    // Its item is what guix-daemon's `restore-file-set` takes: 1, the NAR, the magic, path,
    // references and deriver, then a signature over the SHA-256 of all from the NAR on, which
    // libgcrypt verifies with the coordinator's Guix key; then 0.
    let nar =
        common::run_ok(nix("nix-store").arg("--dump").arg(dir.path().join("store").join(out.trim_start_matches('/'))));
    assert_eq!(u64::from_le_bytes(stream[..8].try_into().unwrap()), 1);
    assert_eq!(&stream[8..8 + nar.len()], &nar[..]);
    let (signed_end, path, signature, end) = export_item_tail(&stream, 8, nar.len());
    assert_eq!(path, out);
    assert_eq!(&stream[end..], &[0u8; 8], "the stream ends after the one item");
    let hash = gbc::formats::hash::hex::encode(&gbc::formats::hash::sha256(&stream[8..signed_end]));
    let public = std::fs::read_to_string(c.state.join("keys/guix-signing-key.pub")).unwrap();
    let program = format!(
        r#"(use-modules (gcrypt pk-crypto) (gcrypt base16))
           (define sig (string->canonical-sexp {signature:?}))
           (define data (find-sexp-token sig 'data))
           (define subject (find-sexp-token sig 'public-key))
           (display (list (bytevector->base16-string (hash-data->bytevector data))
                          (equal? (canonical-sexp->sexp subject) (canonical-sexp->sexp (string->canonical-sexp {public:?})))
                          (verify (find-sexp-token sig 'sig-val) data subject)))"#,
        signature = String::from_utf8(signature).unwrap(),
    );
    match common::guile(&program) {
        Some(said) => assert_eq!(said, format!("({hash} #t #t)"), "libgcrypt on the export's signature"),
        None => common::skip("guile with guile-gcrypt is not installed: the export's signature was not checked"),
    }

    // One hook declines what no machine can build and then takes a failing build: exit 100,
    // the reason in the log.
    let mut hook = GuixDaemonSide::start(&c, dir.path(), &import, &[]);
    assert_eq!(hook.request(&drvs["hookLocal"], &["gbc-test-local"]), "decline", "{}", hook.chatter);
    assert_eq!(hook.request(&drvs["hookBroken"], &[]), "accept", "{}", hook.chatter);
    let (code, log, chatter) = hook.send_paths_and_wait(&drvs["hookBroken"]);
    assert_eq!(code, 100, "{chatter}\n{log}");
    assert!(log.contains("breaking on purpose") && log.contains("failed"), "{log}");

    // Two daemons' hooks share one build; the daemon kills a hook (SIGKILL) when it no longer
    // wants the build: the build goes on while the other hook follows it, and is canceled when
    // that one is killed too.
    let salt2 = format!("{salt}-2");
    let slow2 = common::drvs(QUEUE, &["slow"], &salt2).remove("slow").unwrap();
    let mut first = GuixDaemonSide::start(&c, dir.path(), &import, &[]);
    assert_eq!(first.request(&slow2, &[]), "accept", "{}", first.chatter);
    first.send_paths(&slow2);
    let starting = format!("starting {salt2}");
    c.wait_until("the first hook follows the build", 30, || first.log().contains(&starting));
    let mut second = GuixDaemonSide::start(&c, dir.path(), &import, &[]);
    assert_eq!(second.request(&slow2, &[]), "accept", "{}", second.chatter);
    second.send_paths(&slow2);
    c.wait_until("the second hook follows the build", 30, || second.log().contains(&starting));
    let shared: Vec<_> = c.builds().into_iter().filter(|b| b["drv"] == slow2.as_str()).collect();
    assert_eq!(shared.len(), 1, "one build for both: {shared:?}");
    let uuid = shared[0]["uuid"].as_str().unwrap().to_owned();
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(c.state(&uuid), "running", "the other hook still follows it");
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    c.wait_for_state(&uuid, "canceled");
}
