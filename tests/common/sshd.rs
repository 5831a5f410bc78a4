//! Real OpenSSH servers for the SSH tests: each [`Sshd`] is an `sshd` of its own on a free
//! loopback port, with its own host key, authorized_keys and config in a temp dir. Each stands
//! for one build host: [`Host`] adds a `gbc agent` state dir and signing key of its own.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{gbc, run_ok, run_ok_str};

/// The sshd binary: Debian's openssh-server, which `scripts/install-test-deps` installs.
const SSHD: &str = "/usr/sbin/sshd";

/// An SSH client key pair.
pub struct ClientKey {
    pub private: PathBuf,
    pub public: String,
}

pub fn client_key(dir: &Path, name: &str) -> ClientKey {
    let private = dir.join(name);
    run_ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&private));
    let public = std::fs::read_to_string(private.with_extension("pub")).unwrap().trim().to_owned();
    ClientKey { private, public }
}

/// The user the tests log in as: whoever runs them.
pub fn user() -> String {
    run_ok_str(Command::new("id").arg("-un")).trim().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Sshd {
    pub dir: PathBuf,
    /// Where it listens: 127.0.0.1, or its network namespace's address.
    pub addr: String,
    pub port: u16,
    /// Its network namespace and the host side of its veth pair, if it has one.
    netns: Option<(String, String)>,
    /// The host's public key line, as `ssh-keyscan` would show it.
    pub host_key: String,
    config: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    /// Start an sshd in `dir` (created) on loopback that lets `authorized` in.
    pub fn start(dir: &Path, authorized: &[&str]) -> Sshd {
        Sshd::start_at(dir, authorized, None)
    }

    /// Start an sshd in a network namespace of its own, reached through a veth pair whose link
    /// can be cut. None when that can't be done here (not root, no `ip`).
    pub fn start_in_netns(dir: &Path, authorized: &[&str]) -> Option<Sshd> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let is_root = run_ok_str(Command::new("id").arg("-u")).trim() == "0";
        if !is_root || Command::new("ip").arg("-V").output().is_err() {
            return None;
        }
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let ns = format!("gbc-{pid}-{k}");
        let (outer, inner) = (format!("gbo{}x{k}", pid % 100_000), format!("gbi{}x{k}", pid % 100_000));
        let net = format!("10.{}.{k}", 20 + pid % 200);
        let ip = |args: &str| {
            let out = Command::new("ip").args(args.split_whitespace()).output().unwrap();
            assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&format!("netns add {ns}"));
        ip(&format!("link add {outer} type veth peer name {inner}"));
        ip(&format!("link set {inner} netns {ns}"));
        ip(&format!("addr add {net}.1/24 dev {outer}"));
        ip(&format!("link set {outer} up"));
        ip(&format!("netns exec {ns} ip addr add {net}.2/24 dev {inner}"));
        ip(&format!("netns exec {ns} ip link set {inner} up"));
        ip(&format!("netns exec {ns} ip link set lo up"));
        Some(Sshd::start_at(dir, authorized, Some((ns, outer, format!("{net}.2")))))
    }

    fn start_at(dir: &Path, authorized: &[&str], netns: Option<(String, String, String)>) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: run scripts/test, which installs Debian's openssh-server"
        );
        std::fs::create_dir_all(dir).unwrap();
        // sshd insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let key = dir.join("host_key");
        run_ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "host", "-f"]).arg(&key));
        let host_key = std::fs::read_to_string(key.with_extension("pub")).unwrap().trim().to_owned();
        std::fs::write(dir.join("authorized_keys"), authorized.join("\n") + "\n").unwrap();
        let (addr, port, netns) = match netns {
            Some((ns, outer, addr)) => (addr, 22, Some((ns, outer))),
            None => ("127.0.0.1".to_owned(), free_port(), None),
        };
        let config = dir.join("sshd_config");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {addr}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin yes\n\
                 SetEnv XDG_CACHE_HOME={d}/cache\nLogLevel ERROR\nMaxStartups 100\n"
            ),
        )
        .unwrap();
        let mut s = Sshd { dir: dir.to_owned(), addr, port, netns, host_key, config, child: None };
        s.restart();
        s
    }

    /// Start it again on the same port (after [`Sshd::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("sshd.log")).unwrap();
        let mut cmd = match &self.netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, SSHD]);
                c
            }
            None => Command::new(SSHD),
        };
        let child = cmd
            .args(["-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.addr.as_str(), self.port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// Kill the server and every session it started, as a host that dies would.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let mut pids = descendants(child.id());
        pids.push(child.id());
        for pid in pids {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let _ = child.wait();
    }

    /// Kill this host as a host going down or the OOM killer would, leaves first: every process
    /// below its `gbc agent`s (the builds), deepest first, then, after `pause`, the agents, the
    /// sessions and the server.
    pub fn kill_builds_then_all(&mut self, pause: Duration) {
        let Some(child) = &self.child else { return };
        let agents: Vec<u32> = descendants(child.id()).into_iter().filter(|&p| is_agent(p)).collect();
        let mut below: Vec<(usize, u32)> = agents.iter().flat_map(|&a| with_depth(a)).collect();
        below.sort_by_key(|&(depth, _)| std::cmp::Reverse(depth));
        // Stopped first, all of them, then killed: a builder's shell must not go on (and succeed)
        // in the instant between its `sleep` being killed and itself.
        for signal in [rustix::process::Signal::STOP, rustix::process::Signal::KILL] {
            for &(_, pid) in &below {
                if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(p, signal);
                }
            }
        }
        std::thread::sleep(pause);
        self.kill();
    }

    /// Take the host's network link down (packets vanish; no connection sees a reset), or up again.
    pub fn set_link(&self, up: bool) {
        let (_, outer) = self.netns.as_ref().expect("a host in a network namespace");
        let out = Command::new("ip").args(["link", "set", outer, if up { "up" } else { "down" }]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.kill();
        if let Some((ns, outer)) = &self.netns {
            let _ = Command::new("ip").args(["link", "del", outer]).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Whether `pid` runs `gbc agent`.
fn is_agent(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline.split(|&b| b == 0);
    args.next().is_some_and(|exe| exe.ends_with(b"gbc")) && args.next() == Some(b"agent")
}

/// The processes below `pid`, each with its depth (1 for children).
fn with_depth(pid: u32) -> Vec<(usize, u32)> {
    let all = descendants(pid);
    let mut out = Vec::new();
    let mut level = vec![pid];
    let mut depth = 0;
    while !level.is_empty() {
        depth += 1;
        let next: Vec<u32> = all.iter().copied().filter(|&p| level.contains(&parent(p))).collect();
        out.extend(next.iter().map(|&p| (depth, p)));
        level = next;
    }
    out
}

fn parent(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// All processes below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok()) else { continue };
        parent_of.push((p, ppid));
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// A build host: an sshd, and the state dir and signing key its `gbc agent` uses.
pub struct Host {
    pub name: String,
    pub sshd: Sshd,
    pub agent_dir: PathBuf,
    pub signing_secret: PathBuf,
    pub signing_public: String,
}

impl Host {
    pub fn start(root: &Path, name: &str, client: &ClientKey) -> Host {
        let sshd = Sshd::start(&root.join(name), &[&client.public]);
        Host::with(root, name, sshd)
    }

    /// A host in a network namespace of its own (see [`Sshd::start_in_netns`]).
    pub fn start_in_netns(root: &Path, name: &str, client: &ClientKey) -> Option<Host> {
        let sshd = Sshd::start_in_netns(&root.join(name), &[&client.public])?;
        Some(Host::with(root, name, sshd))
    }

    fn with(root: &Path, name: &str, sshd: Sshd) -> Host {
        let dir = root.join(name);
        let agent_dir = dir.join("agent");
        std::fs::create_dir_all(&agent_dir).unwrap();
        let signing_secret = dir.join("signing.secret");
        let public = dir.join("signing.public");
        run_ok(gbc().args(["keygen", &format!("{name}-1")]).arg(&signing_secret).arg(&public));
        let signing_public = std::fs::read_to_string(public).unwrap().trim().to_owned();
        Host { name: name.to_owned(), sshd, agent_dir, signing_secret, signing_public }
    }

    /// This host's entry in machines.ron; `extra` adds fields. The agent is this build's gbc
    /// unless `extra` names another.
    pub fn entry(&self, client: &ClientKey, extra: &str) -> String {
        let agent = if extra.contains("agent: ") {
            String::new()
        } else {
            format!("agent: {:?}, ", format!("{} agent", env!("CARGO_BIN_EXE_gbc")))
        };
        format!(
            "(name: {:?}, host: {:?}, port: {}, user: {:?}, identity: {:?}, host_key: {:?},\n \
             {agent}signing_key: {:?}, sandbox_paths: {:?}, {extra})",
            self.name,
            self.sshd.addr,
            self.sshd.port,
            user(),
            client.private.display().to_string(),
            self.sshd.host_key,
            self.signing_public,
            super::HOST_SH,
        )
    }

    /// agent_args giving the agent its own state dir and key, and `systems`.
    pub fn agent_args(&self, systems: &[&str], features: &[&str]) -> String {
        let mut args = vec![
            "--state-dir".to_owned(),
            self.agent_dir.display().to_string(),
            "--signing-key".to_owned(),
            self.signing_secret.display().to_string(),
        ];
        for s in systems {
            args.push("--system".into());
            args.push((*s).into());
        }
        for f in features {
            args.push("--feature".into());
            args.push((*f).into());
        }
        format!("agent_args: {args:?}")
    }
}

/// A machines.ron with these entries.
pub fn machines_file(entries: &[String]) -> String {
    format!("(machines: [\n{}\n])\n", entries.join(",\n"))
}
