//! Client commands that reach a coordinator on another host:
//! `--coordinator ssh://[USER@]HOST[:PORT][/SOCKET]`. An SSH connection ([`crate::ssh`]) opens a
//! channel to the coordinator's socket there (OpenSSH's `direct-streamlocal@openssh.com`), and a
//! thread copies between it and one end of a local socket pair, so a client speaks to a remote
//! coordinator exactly as to a local one. sshd and the socket's permissions are the only gate.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::Context as _;

use super::args::ClientOpts;
use crate::ssh::{self, HostKeyCheck, Target, Timing};

/// Where the coordinator's socket is when the address names none (under the user's home there,
/// which gbc asks the host for: sshd itself takes relative paths from `/`): the socket of a
/// coordinator run by that user with the default state dir.
pub const DEFAULT_REMOTE_SOCKET: &str = ".local/state/gbc/gbc.sock";

/// A coordinator's address, as `--coordinator` or `GBC_COORDINATOR` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// Its Unix socket on this host.
    Socket(PathBuf),
    /// Its socket on another host, through SSH.
    Ssh(SshAddress),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAddress {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
    pub socket: String,
}

impl std::fmt::Display for SshAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let socket = if self.socket.starts_with('/') { self.socket.clone() } else { format!("/~/{}", self.socket) };
        write!(f, "ssh://{user}{host}:{}{socket}", self.port)
    }
}

/// Parse an address: `ssh://[USER@]HOST[:PORT][/SOCKET]` (HOST may be `[IPv6]`; SOCKET is an
/// absolute path, or `~/PATH` for one under the user's home), anything else a socket path.
pub fn parse(s: &str) -> Result<Address, String> {
    let Some(rest) = s.strip_prefix("ssh://") else {
        if s.contains("://") {
            return Err(format!(
                "{s}: not a coordinator address (a socket path, or ssh://[USER@]HOST[:PORT][/SOCKET])"
            ));
        }
        return Ok(Address::Socket(PathBuf::from(s)));
    };
    let bad = |why: &str| format!("{s}: {why} (expected ssh://[USER@]HOST[:PORT][/SOCKET])");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_owned()), h),
        Some(_) => return Err(bad("empty user name")),
        None => (None, authority),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in the host"))?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(|| bad("junk after the ]"))?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => 22,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| bad(&format!("bad port {p:?}")))?,
    };
    let socket = match path {
        "" | "/" => DEFAULT_REMOTE_SOCKET.to_owned(),
        p if p.starts_with("/~/") => p[3..].to_owned(),
        p => p.to_owned(),
    };
    Ok(Address::Ssh(SshAddress { user, host: host.to_owned(), port, socket }))
}

/// How to log in: the options, else the environment, else the usual files.
fn target(addr: &SshAddress, opts: &ClientOpts) -> anyhow::Result<Target> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let home = env("HOME").map(PathBuf::from);
    let user = match &addr.user {
        Some(u) => u.clone(),
        None => env("USER")
            .or_else(|| env("LOGNAME"))
            .and_then(|u| u.into_string().ok())
            .with_context(|| format!("{addr}: no user name (give USER@ in the address, or set $USER)"))?,
    };
    let host_key = match opts.ssh_host_key.clone().or_else(|| env("GBC_SSH_HOST_KEY")?.into_string().ok()) {
        Some(line) => {
            ssh::parse_host_key(&line).map_err(|e| anyhow::anyhow!("--ssh-host-key: {e}"))?;
            HostKeyCheck::Pinned(line)
        }
        None => {
            let file = opts
                .ssh_known_hosts
                .clone()
                .or_else(|| env("GBC_SSH_KNOWN_HOSTS").map(PathBuf::from))
                .or_else(|| home.as_ref().map(|h| h.join(".ssh/known_hosts")))
                .with_context(|| format!("{addr}: no known_hosts file and no pinned host key (--ssh-host-key)"))?;
            HostKeyCheck::KnownHosts(file)
        }
    };
    let identity = match opts.ssh_identity.clone().or_else(|| env("GBC_SSH_IDENTITY").map(PathBuf::from)) {
        Some(f) => Some(f),
        // The agent's keys, else the usual key files.
        None if env("SSH_AUTH_SOCK").is_some() => None,
        None => Some(
            ["id_ed25519", "id_ecdsa", "id_rsa"]
                .iter()
                .filter_map(|k| home.as_ref().map(|h| h.join(".ssh").join(k)))
                .find(|p| p.exists())
                .with_context(|| {
                    format!("{addr}: no identity (--ssh-identity), no ssh-agent and no ~/.ssh/id_* key")
                })?,
        ),
    };
    if let Some(f) = &identity {
        ssh::check_identity(f).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(Target { host: addr.host.clone(), port: addr.port, user, identity, host_key })
}

/// Connect to the coordinator at `addr`: one end of a socket pair whose other end a thread
/// bridges to the coordinator's socket through SSH, for as long as this process lives.
pub fn connect(addr: &SshAddress, opts: &ClientOpts) -> anyhow::Result<UnixStream> {
    let target = target(addr, opts)?;
    let (mine, theirs) = UnixStream::pair().context("a socket pair")?;
    theirs.set_nonblocking(true)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let socket = addr.socket.clone();
    std::thread::Builder::new().name("gbc-ssh".into()).spawn(move || {
        let bridge = async move {
            let conn = ssh::Connection::open(&target, Timing::default()).await.map_err(|e| e.to_string())?;
            let socket = home_relative(&conn, socket).await?;
            let remote = conn.open_unix_socket(&socket).await.map_err(|e| e.to_string())?;
            let local = tokio::net::UnixStream::from_std(theirs).map_err(|e| e.to_string())?;
            Ok::<_, String>((conn, remote, local))
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        runtime.block_on(async move {
            match bridge.await {
                Ok((conn, mut remote, mut local)) => {
                    let _ = ready_tx.send(Ok(()));
                    // Until either side ends; the other then sees its end.
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                    drop(conn);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(mine),
        Ok(Err(e)) => Err(anyhow::anyhow!("{addr}: {e}")),
        Err(_) => Err(anyhow::anyhow!("{addr}: the SSH thread ended")),
    }
}

/// A relative socket path made absolute under the user's home there (sshd takes it from `/`).
async fn home_relative(conn: &ssh::Connection, socket: String) -> Result<String, String> {
    if socket.starts_with('/') {
        return Ok(socket);
    }
    let out = conn.run("printf '%s' \"$HOME\"", b"").await.map_err(|e| e.to_string())?;
    let home = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.info.status != Some(0) || !home.starts_with('/') {
        return Err(format!("could not learn the home directory there for ~/{socket}: {}", out.info.last_line()));
    }
    Ok(format!("{}/{socket}", home.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(user: Option<&str>, host: &str, port: u16, socket: &str) -> Address {
        Address::Ssh(SshAddress { user: user.map(str::to_owned), host: host.into(), port, socket: socket.into() })
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(parse("/run/gbc/gbc.sock"), Ok(Address::Socket("/run/gbc/gbc.sock".into())));
        assert_eq!(parse("gbc.sock"), Ok(Address::Socket("gbc.sock".into())));
        assert_eq!(parse("ssh://farm"), Ok(ssh(None, "farm", 22, DEFAULT_REMOTE_SOCKET)));
        assert_eq!(parse("ssh://farm/"), Ok(ssh(None, "farm", 22, DEFAULT_REMOTE_SOCKET)));
        assert_eq!(
            parse("ssh://ci@farm.example:2222/var/lib/gbc/gbc.sock"),
            Ok(ssh(Some("ci"), "farm.example", 2222, "/var/lib/gbc/gbc.sock"))
        );
        assert_eq!(parse("ssh://[::1]:2200/s"), Ok(ssh(None, "::1", 2200, "/s")));
        assert_eq!(parse("ssh://u@[fe80::1]/~/gbc/gbc.sock"), Ok(ssh(Some("u"), "fe80::1", 22, "gbc/gbc.sock")));
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let err = |s: &str| parse(s).err().unwrap_or_else(|| unreachable!("{s} parsed"));
        assert!(err("ssh://farm:x/s").contains("bad port \"x\""), "{}", err("ssh://farm:x/s"));
        assert!(err("ssh://farm:0").contains("bad port"));
        assert!(err("ssh://farm:70000").contains("bad port"));
        assert!(err("ssh://@farm").contains("empty user name"));
        assert!(err("ssh:///s").contains("no host"));
        assert!(err("ssh://[::1/s").contains("unclosed ["));
        assert!(err("http://farm/s").contains("not a coordinator address"));
    }

    #[test]
    fn addresses_print_back() {
        for s in ["ssh://ci@farm:2222/var/lib/gbc/gbc.sock", "ssh://[::1]:22/~/x.sock"] {
            let Ok(Address::Ssh(a)) = parse(s) else { unreachable!("{s}") };
            assert_eq!(a.to_string(), s);
        }
    }
}
