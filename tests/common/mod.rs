//! Helpers shared by the integration tests: running `gbc` and the reference Nix.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;

pub mod files;
pub mod sshd;

/// The host paths the test derivations' `/bin/sh` builders need. A build sees nothing of the host
/// but what its machine names, so the tests name these, as a farm running such builders would.
pub const HOST_SH: [&str; 4] = ["/bin", "/usr", "/lib", "/lib64?"];

/// `--sandbox-path` for each of [`HOST_SH`], for `gbc realise`, `agent` and `coordinator`.
pub fn sandbox_args() -> Vec<String> {
    HOST_SH.iter().flat_map(|p| ["--sandbox-path".to_owned(), (*p).to_owned()]).collect()
}

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

/// Run a command, killing it if it has not ended after `secs` seconds (then None).
pub fn run_within(cmd: &mut Command, secs: u64) -> Option<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

/// How many times a reference command runs when Nix's *own* builder dies by a signal (Nix 2.8
/// sometimes kills its builder under load). gbc's side is never retried.
pub const REFERENCE_TRIES: u32 = 3;

/// Run a command of the reference Nix that `make` builds afresh for each try; a run that fails
/// because Nix's builder died by a signal ("failed due to signal") is tried again, up to
/// [`REFERENCE_TRIES`] times, and each retry is said on stderr. Returns the last run.
pub fn reference(mut make: impl FnMut() -> Command) -> Output {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut cmd = make();
        let out = run(&mut cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("failed due to signal") || tries == REFERENCE_TRIES {
            return out;
        }
        eprintln!(
            "reference Nix: its own builder was killed by a signal (try {tries} of {REFERENCE_TRIES}), trying again: {}",
            stderr.trim()
        );
    }
}

/// [`reference`], insisting it succeeds; returns stdout.
pub fn reference_ok(make: impl FnMut() -> Command) -> String {
    let out = reference(make);
    assert!(out.status.success(), "the reference Nix failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `nix-store --realise` of derivations by the reference Nix, with `options` (`--option NAME
/// VALUE` pairs, flattened); returns its output paths, one per line.
pub fn nix_realise(drvs: &[&str], options: &[&str]) -> String {
    reference_ok(|| {
        let mut c = nix("nix-store");
        c.arg("--realise").args(options).args(drvs);
        c
    })
}

/// Say that a test cannot run here, and why. Where every test must run (`scripts/test` as root
/// sets `GBC_TESTS_REQUIRE_ALL`), this fails the test instead: CI never passes a skipped one.
pub fn skip(why: &str) {
    assert!(std::env::var_os("GBC_TESTS_REQUIRE_ALL").is_none(), "cannot run, yet every test must: {why}");
    eprintln!("SKIPPED: {why}");
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    rustix::process::getuid().is_root()
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

/// A /gnu/store whose files Nix keeps under `real`, so no real /gnu/store is touched: the
/// `--store` argument for Nix, and `real`.
pub fn gnu_store(tmp: &Path) -> (String, PathBuf) {
    let real = tmp.join("real");
    let store = format!(
        "local?store=/gnu/store&real={}&state={}&log={}",
        real.display(),
        tmp.join("state").display(),
        tmp.join("log").display()
    );
    (store, real)
}

/// [`instantiate`] in the default store, as attribute → `.drv` path.
pub fn drvs(file: &str, attrs: &[&str], salt: &str) -> std::collections::BTreeMap<String, String> {
    instantiate(file, None, attrs, salt).into_iter().collect()
}

/// Pseudo-random numbers (xorshift) from a seed taken from the clock and printed, so that a failure
/// can be replayed by hand: for kill -9 at random moments.
pub fn clock_rng() -> impl FnMut() -> u64 {
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("seed {seed}");
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// A command's stderr, for messages.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command's stdout lines.
pub fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// `/nix/store/<hash>-NAME.drv` → NAME
pub fn drv_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap();
    base.split_once('-').unwrap().1.strip_suffix(".drv").unwrap()
}

/// A salt that makes this run's derivations new to the Nix store, so comparisons are live.
pub fn salt() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// A `gbc coordinator` running in its own temporary state dir, killed when dropped.
pub struct Coordinator {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub args: Vec<String>,
    child: Option<std::process::Child>,
}

impl Coordinator {
    /// Start one with these extra arguments (e.g. `--local-builds 2`) and wait until it listens.
    pub fn start(args: &[&str]) -> Coordinator {
        let dir = tempdir();
        let state = dir.path().join("state");
        let mut c = Coordinator { dir, state, args: args.iter().map(|s| s.to_string()).collect(), child: None };
        c.restart();
        c
    }

    /// Like [`Coordinator::start`], with `prepare` run on the state dir (not yet created) first.
    pub fn start_prepared(args: &[&str], prepare: impl FnOnce(&Path)) -> Coordinator {
        let dir = tempdir();
        let state = dir.path().join("state");
        prepare(&state);
        let mut c = Coordinator { dir, state, args: args.iter().map(|s| s.to_string()).collect(), child: None };
        c.restart();
        c
    }

    /// Start it again (after [`Coordinator::kill9`] or a stop) on the same state dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .unwrap();
        let child = gbc()
            .arg("coordinator")
            .arg("--state-dir")
            .arg(&self.state)
            .args(sandbox_args())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // Ready once it says hello: the socket is bound before the state is opened, and a
        // connection waits in the backlog until then.
        let hello = |sock: &Path| -> bool {
            use std::io::BufRead as _;
            let Ok(s) = std::os::unix::net::UnixStream::connect(sock) else { return false };
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line).is_ok() && line.contains("\"hello\"")
        };
        loop {
            if hello(&self.state.join("gbc.sock")) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the coordinator exited with {status}: {}", self.log());
            }
            assert!(std::time::Instant::now() < deadline, "the coordinator did not listen: {}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// `gbc show --json` of a build.
    pub fn show(&self, uuid: &str) -> serde_json::Value {
        serde_json::from_str(&run_ok_str(&mut self.gbc(&["show", "--json", uuid]))).unwrap()
    }

    /// `gbc builds --json`: the newest builds (up to 1000), newest first.
    pub fn builds(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&run_ok_str(&mut self.gbc(&["builds", "--json", "--limit", "1000"]))).unwrap()
    }

    /// A build's state.
    pub fn state(&self, uuid: &str) -> String {
        self.show(uuid)["state"].as_str().unwrap().to_owned()
    }

    /// `gbc machines --json`.
    pub fn machines(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&run_ok_str(&mut self.gbc(&["machines", "--json"]))).unwrap()
    }

    /// `gbc submit` of `drvs` with `extra` flags; the builds' UUIDs.
    pub fn submit<S: AsRef<std::ffi::OsStr>>(&self, drvs: &[S], extra: &[&str]) -> Vec<String> {
        let out = run(self.gbc(&["submit"]).args(extra).args(drvs));
        assert!(out.status.success(), "submit: {}", stderr(&out));
        let uuids = lines(&out);
        assert_eq!(uuids.len(), drvs.len());
        uuids
    }

    /// `gbc watch` of these builds, insisting they all succeed.
    pub fn watch_ok(&self, uuids: &[String]) {
        let out = run(self.gbc(&["watch"]).args(uuids));
        assert!(out.status.success(), "{}\n{}", stderr(&out), self.log());
    }

    /// Poll `ok` until it holds, failing (with the coordinator's log) after `secs` seconds.
    pub fn wait_until(&self, what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}:\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Wait (a minute at most) until a build is in state `wanted`.
    pub fn wait_for_state(&self, uuid: &str, wanted: &str) {
        self.wait_until(&format!("{uuid} is {wanted}"), 60, || self.state(uuid) == wanted);
    }

    /// What it printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// A client command (`gbc ARGS... --state-dir STATE`).
    pub fn gbc(&self, args: &[&str]) -> Command {
        let mut c = gbc();
        c.args(args).arg("--state-dir").arg(&self.state);
        c
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Send a signal and wait for the coordinator to exit; returns how long that took.
    pub fn signal_and_wait(&mut self, sig: rustix::process::Signal) -> std::time::Duration {
        let mut child = self.child.take().unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let t0 = std::time::Instant::now();
        rustix::process::kill_process(pid, sig).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "the coordinator exited with {status}: {}", self.log());
        t0.elapsed()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A small tmpfs mounted for a test (to fill a disk), unmounted when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (as mount's `size=` option) at `path` (created). None, with a line
    /// saying why the test is skipped, when mounting is not allowed here.
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { path: path.to_owned() }),
            Ok(o) => {
                skip(&format!("cannot mount a tmpfs here: {}", String::from_utf8_lossy(&o.stderr).trim()));
                None
            }
            Err(e) => {
                skip(&format!("cannot run mount: {e}"));
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// One HTTP/1.1 request over a fresh connection; the status line, headers and body.
pub fn http(port: u16, method: &str, path: &str, extra: &str) -> (String, String, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
    (status.to_owned(), headers.to_ascii_lowercase(), all[end + 4..].to_vec())
}

/// A free TCP port on loopback, and `127.0.0.1:PORT`.
pub fn free_addr() -> (u16, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    (port, format!("127.0.0.1:{port}"))
}

/// A process's resident memory in bytes (VmRSS).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// An upstream binary cache: the outputs of `attrs` of the Nix file `file`, built by Nix and copied
/// with their closure into a file:// cache in `dir/cache` (xz, as Nix compresses by default),
/// signed by a fresh key from `nix-store --generate-binary-cache-key`. Returns the output paths
/// and the public key.
pub fn upstream(file: &str, dir: &Path, attrs: &[&str], salt: &str) -> (Vec<String>, String) {
    let drvs = instantiate(file, None, attrs, salt);
    let outs: Vec<String> =
        nix_realise(&drvs.iter().map(|d| d.1.as_str()).collect::<Vec<_>>(), &[]).lines().map(str::to_owned).collect();
    let (sec, public) = (dir.join("up.sec"), dir.join("up.pub"));
    let out = run(nix("nix-store").args(["--generate-binary-cache-key", "up-1"]).arg(&sec).arg(&public));
    assert!(out.status.success(), "{}", stderr(&out));
    let url = format!("file://{}?secret-key={}", dir.join("cache").display(), sec.display());
    let out = run(nix("nix").args(["copy", "--to", &url]).args(&outs));
    assert!(out.status.success(), "nix copy: {}", stderr(&out));
    (outs, std::fs::read_to_string(public).unwrap().trim().to_owned())
}

/// Run a Guile program with guile-gcrypt; None when Guile or guile-gcrypt is missing.
pub fn guile(program: &str) -> Option<String> {
    let out = Command::new("guile").args(["--no-auto-compile", "-c", program]).output().ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no code for module"), "guile failed: {err}");
        return None;
    }
    Some(String::from_utf8(out.stdout).unwrap())
}
