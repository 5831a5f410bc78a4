//! SSH connections to build hosts (and to a coordinator's socket, for client commands run
//! elsewhere): the only module that touches russh.
//!
//! One [`Connection`] per host carries any number of exec channels ([`Connection::exec`]). Every
//! channel is drained by its own task as soon as it opens, because russh stops reading the whole
//! connection when one channel's buffer is full; stdout goes to a bounded queue the caller reads
//! at its own pace (when it is full the connection waits: russh widens the SSH window as data
//! arrives, not as it is read, so the queue is what bounds memory; a caller must therefore never
//! wait on writing to the same connection while its reader waits on it), stderr and the exit
//! status are read from the same `wait()` loop on the channel's read half (`split()`), which the
//! stream helpers would drop.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::keys::PrivateKeyWithHashAlg;
use russh::keys::PublicKeyOrCertificate;
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::{ChannelMsg, client};
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot};

/// How the host's key is checked.
#[derive(Debug, Clone, PartialEq)]
pub enum HostKeyCheck {
    /// An OpenSSH public key line; any other key is refused.
    Pinned(String),
    /// A known_hosts file in OpenSSH's format.
    KnownHosts(PathBuf),
}

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Private key file; None: the keys of the ssh-agent at `$SSH_AUTH_SOCK`.
    pub identity: Option<PathBuf>,
    pub host_key: HostKeyCheck,
}

/// Why a connection could not be made, one variant per diagnosis `gbc machines test` gives.
#[derive(Debug, Error)]
pub enum SshError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("no answer from {addr} within {secs} s")]
    Timeout { addr: String, secs: u64 },
    #[error("host key mismatch for {addr}: it presented {got}, but {expected}; nothing was sent")]
    HostKey { addr: String, got: String, expected: String },
    #[error("authentication refused for user {user} at {addr} with {with}")]
    Auth { addr: String, user: String, with: String },
    #[error("{what}: {message}")]
    Key { what: String, message: String },
    #[error("ssh connection to {addr}: {message}")]
    Protocol { addr: String, message: String },
}

impl SshError {
    /// A short name of the kind of failure, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            SshError::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused => {
                "connection refused"
            }
            SshError::Connect { .. } | SshError::Timeout { .. } => "host unreachable",
            SshError::HostKey { .. } => "host key mismatch",
            SshError::Auth { .. } | SshError::Key { .. } => "authentication refused",
            SshError::Protocol { .. } => "ssh error",
        }
    }
}

/// Why a host key line or a key file can't be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyLineError {
    #[error("{0:?} is not an OpenSSH public key line (\"ssh-ed25519 AAAA…\")")]
    NotAKeyLine(String),
    #[error("{line:?}: {message}")]
    Unreadable { line: String, message: String },
    #[error("{line:?}: the key is {actual}, not {declared}")]
    Algorithm { line: String, actual: String, declared: String },
    /// A private key file that can't be read, parsed or used without a passphrase.
    #[error("{0}")]
    Identity(String),
}

/// A host key as an OpenSSH public key line: `ssh-ed25519 AAAA… [comment]`, or as `ssh-keyscan`
/// prints it, with the host name first.
pub fn parse_host_key(line: &str) -> Result<russh::keys::PublicKey, KeyLineError> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (alg, b64) = match words.as_slice() {
        [a, b, ..] if a.starts_with("ssh-") || a.starts_with("ecdsa-") => (*a, *b),
        [_host, a, b, ..] => (*a, *b),
        _ => return Err(KeyLineError::NotAKeyLine(line.to_owned())),
    };
    let key = russh::keys::parse_public_key_base64(b64)
        .map_err(|e| KeyLineError::Unreadable { line: line.to_owned(), message: e.to_string() })?;
    if key.algorithm().as_str() != alg {
        let actual = key.algorithm().as_str().to_owned();
        return Err(KeyLineError::Algorithm { line: line.to_owned(), actual, declared: alg.to_owned() });
    }
    Ok(key)
}

/// Check that a private key file can be used (read and parsed, without a passphrase).
pub fn check_identity(path: &Path) -> Result<(), KeyLineError> {
    russh::keys::load_secret_key(path, None).map(|_| ()).map_err(|e| KeyLineError::Identity(e.to_string()))
}

fn openssh_line(key: &russh::keys::PublicKey) -> String {
    key.to_openssh().unwrap_or_else(|_| format!("a {} key", key.algorithm().as_str()))
}

/// Checks the server's key; remembers what it saw for the error message.
struct Checker {
    check: HostKeyCheck,
    host: String,
    port: u16,
    seen: Arc<Mutex<Option<(String, String)>>>,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(&mut self, presented: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let key = match presented {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                if let Ok(mut s) = self.seen.lock() {
                    *s = Some(("a host certificate".into(), "only plain host keys are pinned".into()));
                }
                return Ok(false);
            }
        };
        let got = openssh_line(key);
        // What was expected instead, when the key is not the one.
        let mismatch: Option<String> = match &self.check {
            HostKeyCheck::Pinned(line) => match parse_host_key(line) {
                Ok(pinned) if pinned.key_data() == key.key_data() => None,
                Ok(pinned) => Some(format!("the pinned host_key is {}", openssh_line(&pinned))),
                Err(e) => Some(format!("the pinned host_key does not parse: {e}")),
            },
            HostKeyCheck::KnownHosts(path) => {
                match russh::keys::check_known_hosts_path(&self.host, self.port, key, path) {
                    Ok(true) => None,
                    Ok(false) => Some(format!("{} has no {} key for it", path.display(), key.algorithm().as_str())),
                    Err(russh::keys::Error::KeyChanged { line }) => {
                        Some(format!("{} line {line} records another key", path.display()))
                    }
                    Err(e) => Some(format!("{}: {e}", path.display())),
                }
            }
        };
        match mismatch {
            None => Ok(true),
            Some(expected) => {
                if let Ok(mut s) = self.seen.lock() {
                    *s = Some((got, expected));
                }
                Ok(false)
            }
        }
    }
}

/// Timing of a connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Longest wait for TCP connect, the handshake and authentication.
    pub connect: Duration,
    /// A keepalive goes out after this long without traffic...
    pub keepalive: Duration,
    /// ...and the connection is dropped after this many unanswered in a row.
    pub keepalive_max: usize,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing { connect: Duration::from_secs(20), keepalive: Duration::from_secs(15), keepalive_max: 4 }
    }
}

/// An authenticated SSH connection.
pub struct Connection {
    handle: client::Handle<Checker>,
    addr: String,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("addr", &self.addr).finish()
    }
}

impl Connection {
    /// Connect, check the host key, authenticate.
    pub async fn open(target: &Target, timing: Timing) -> Result<Connection, SshError> {
        let addr = if target.host.contains(':') {
            format!("[{}]:{}", target.host, target.port)
        } else {
            format!("{}:{}", target.host, target.port)
        };
        let secs = timing.connect.as_secs();
        match tokio::time::timeout(timing.connect, Self::open_inner(target, timing, &addr)).await {
            Ok(r) => r,
            Err(_) => Err(SshError::Timeout { addr, secs }),
        }
    }

    async fn open_inner(target: &Target, timing: Timing, addr: &str) -> Result<Connection, SshError> {
        // AES-GCM first: with AES-NI it is the fastest of OpenSSH's ciphers.
        let preferred = russh::Preferred {
            cipher: Cow::Owned(vec![
                russh::cipher::AES_256_GCM,
                russh::cipher::AES_128_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
            ]),
            ..Default::default()
        };
        let config = client::Config {
            preferred,
            keepalive_interval: Some(timing.keepalive),
            keepalive_max: timing.keepalive_max,
            // The window is what the server may send ahead: 4 MiB keeps a 1 Gbit/s link busy up
            // to 30 ms away. A larger one costs more than it gains: OpenSSH's sshd reads up to a
            // window's worth into a buffer it grows, zeroes and packs, and that buffer no longer
            // fits in cache (16 MiB measured 0.7-1.3x OpenSSH's throughput by scripts/bench-ssh
            // where 2-4 MiB measured 1.2-1.8x).
            window_size: 4 << 20,
            maximum_packet_size: 65535,
            channel_buffer_size: 1024,
            nodelay: true,
            ..Default::default()
        };
        let seen = Arc::new(Mutex::new(None));
        let checker = Checker {
            check: target.host_key.clone(),
            host: target.host.clone(),
            port: target.port,
            seen: seen.clone(),
        };
        let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| SshError::Connect { addr: addr.to_owned(), source })?;
        let mut handle = match client::connect_stream(Arc::new(config), stream, checker).await {
            Ok(h) => h,
            Err(e) => {
                if let Some((got, expected)) = seen.lock().ok().and_then(|mut s| s.take()) {
                    return Err(SshError::HostKey { addr: addr.to_owned(), got, expected });
                }
                return Err(SshError::Protocol { addr: addr.to_owned(), message: e.to_string() });
            }
        };
        let proto = |e: russh::Error| SshError::Protocol { addr: addr.to_owned(), message: e.to_string() };
        let user = target.user.clone();
        match &target.identity {
            Some(path) => {
                let key = russh::keys::load_secret_key(path, None).map_err(|e| SshError::Key {
                    what: format!("identity {}", path.display()),
                    message: e.to_string(),
                })?;
                let hash = handle.best_supported_rsa_hash().await.map_err(proto)?.flatten();
                let r = handle
                    .authenticate_publickey(user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                    .await
                    .map_err(proto)?;
                if !r.success() {
                    let with = format!("key {}", path.display());
                    return Err(SshError::Auth { addr: addr.to_owned(), user, with });
                }
            }
            None => {
                let mut agent = AgentClient::connect_env().await.map_err(|e| SshError::Key {
                    what: "no identity file given and no usable ssh-agent ($SSH_AUTH_SOCK)".into(),
                    message: e.to_string(),
                })?;
                let ids = agent
                    .request_identities()
                    .await
                    .map_err(|e| SshError::Key { what: "ssh-agent".into(), message: e.to_string() })?;
                let mut ok = false;
                for id in ids {
                    let AgentIdentity::PublicKey { key, .. } = id else { continue };
                    let hash = handle.best_supported_rsa_hash().await.map_err(proto)?.flatten();
                    match handle.authenticate_publickey_with(user.clone(), key, hash, &mut agent).await {
                        Ok(r) if r.success() => {
                            ok = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => return Err(SshError::Key { what: "ssh-agent".into(), message: e.to_string() }),
                    }
                }
                if !ok {
                    let with = "the keys of the ssh-agent".to_owned();
                    return Err(SshError::Auth { addr: addr.to_owned(), user, with });
                }
            }
        }
        Ok(Connection { handle, addr: addr.to_owned() })
    }

    /// Run a command on a new channel. Its output starts being drained at once.
    pub async fn exec(&self, command: &str) -> Result<Exec, SshError> {
        let proto = |e: russh::Error| SshError::Protocol { addr: self.addr.clone(), message: e.to_string() };
        let channel = self.handle.channel_open_session().await.map_err(proto)?;
        channel.exec(true, command).await.map_err(proto)?;
        let (mut read, write) = channel.split();
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(STDOUT_QUEUE);
        let (end_tx, end_rx) = oneshot::channel::<ExitInfo>();
        let stdin: Box<dyn AsyncWrite + Send + Unpin> = Box::new(write.make_writer());
        tokio::spawn(async move {
            let mut info = ExitInfo::default();
            let mut out = Some(out_tx);
            while let Some(msg) = read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        // Waits while the queue is full: the connection then stops reading until
                        // the reader catches up (russh widens the SSH window as data arrives, so
                        // the queue is what bounds the memory an agent's output can take).
                        if let Some(tx) = &out
                            && tx.send(data).await.is_err()
                        {
                            out = None;
                        }
                    }
                    ChannelMsg::ExtendedData { data, .. } => info.add_stderr(&data),
                    ChannelMsg::ExitStatus { exit_status } => info.status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, error_message, .. } => {
                        info.signal = Some(format!("{signal_name:?} {error_message}").trim().to_owned());
                    }
                    ChannelMsg::Eof => out = None,
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            drop(out);
            let _ = end_tx.send(info);
        });
        Ok(Exec { stdin, stdout: out_rx, end: end_rx, _write: write })
    }

    /// A byte stream to the Unix socket `socket` on the host (OpenSSH's
    /// `direct-streamlocal@openssh.com`: sshd connects to it as the logged-in user, so the
    /// socket's permissions decide). The caller must keep reading it: it is the connection's
    /// only channel, and an unread one stops the connection.
    pub async fn open_unix_socket(
        &self,
        socket: &str,
    ) -> Result<impl tokio::io::AsyncRead + AsyncWrite + Unpin + Send + use<>, SshError> {
        let channel = self.handle.channel_open_direct_streamlocal(socket).await.map_err(|e| SshError::Protocol {
            addr: self.addr.clone(),
            message: match e {
                russh::Error::ChannelOpenFailure(reason) => {
                    format!("sshd would not connect to the socket {socket} ({reason:?}): no such socket, no access, or forwarding not allowed")
                }
                e => format!("opening a channel to the socket {socket}: {e}"),
            },
        })?;
        Ok(channel.into_stream())
    }

    /// Run a command to its end, feeding it `input`; its output, stderr and exit status.
    pub async fn run(&self, command: &str, input: &[u8]) -> Result<Output, SshError> {
        let mut exec = self.exec(command).await?;
        let write = async {
            let r = exec.stdin.write_all(input).await;
            let _ = exec.stdin.shutdown().await;
            r
        };
        let mut stdout = Vec::new();
        let read = async {
            while let Some(b) = exec.stdout.recv().await {
                stdout.extend_from_slice(&b);
            }
        };
        let (w, ()) = tokio::join!(write, read);
        let info = exec.end.await.unwrap_or_default();
        if let Err(e) = w
            && info.status.is_none()
        {
            return Err(SshError::Protocol { addr: self.addr.clone(), message: format!("sending to {command}: {e}") });
        }
        Ok(Output { stdout, info })
    }
}

/// Pieces of a command's output (SSH packets, at most 32 KiB each with OpenSSH) that may wait
/// for their reader: about 32 MiB.
pub const STDOUT_QUEUE: usize = 1024;

/// A running remote command.
pub struct Exec {
    /// Its standard input; shut it down to send EOF.
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    /// Its standard output, as it arrives; ends at EOF. At most [`STDOUT_QUEUE`] pieces wait.
    pub stdout: mpsc::Receiver<Bytes>,
    /// How it ended, once the channel closes.
    pub end: oneshot::Receiver<ExitInfo>,
    _write: russh::ChannelWriteHalf<client::Msg>,
}

/// How a remote command ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExitInfo {
    pub status: Option<u32>,
    pub signal: Option<String>,
    /// The last few KiB of its stderr.
    pub stderr: String,
}

impl ExitInfo {
    const KEEP: usize = 8 * 1024;

    fn add_stderr(&mut self, data: &[u8]) {
        self.stderr.push_str(&String::from_utf8_lossy(data));
        if self.stderr.len() > Self::KEEP {
            let mut cut = self.stderr.len() - Self::KEEP;
            while !self.stderr.is_char_boundary(cut) {
                cut += 1;
            }
            self.stderr.drain(..cut);
        }
    }

    /// The last non-empty line of stderr.
    pub fn last_line(&self) -> &str {
        self.stderr.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
    }

    /// Whether the shell said the command does not exist (127) or cannot run (126).
    pub fn not_runnable(&self) -> bool {
        matches!(self.status, Some(126 | 127))
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.status, &self.signal) {
            (Some(s), _) => write!(f, "exit status {s}")?,
            (None, Some(sig)) => write!(f, "killed by {sig}")?,
            (None, None) => f.write_str("the connection closed")?,
        }
        let last = self.last_line();
        if !last.is_empty() {
            write!(f, ": {last}")?;
        }
        Ok(())
    }
}

/// What [`Connection::run`] returns.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub info: ExitInfo,
}

/// Quote a word for a POSIX shell (the remote side of an exec runs the user's shell).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("gbc"), "gbc");
        assert_eq!(shell_quote("/a b"), "'/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn host_keys_as_keyscan_prints_them() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICt8gLdDAnGRd/jMz++Wkv8w45IPl6BGi/collfki9dG";
        assert!(parse_host_key(key).is_ok());
        assert!(parse_host_key(&format!("{key} comment")).is_ok());
        assert!(parse_host_key(&format!("[127.0.0.1]:2222 {key}")).is_ok());
        let e = parse_host_key("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAICt8gLdDAnGRd/jMz++Wkv8w45IPl6BGi/collfki9dG");
        assert!(e.is_err_and(|e| e.to_string().contains("not ssh-rsa")));
        assert!(parse_host_key("ssh-ed25519 AAAA").is_err());
        assert!(parse_host_key("nonsense").is_err());
    }

    #[test]
    fn stderr_keeps_the_tail() {
        let mut info = ExitInfo { status: Some(127), ..Default::default() };
        info.add_stderr("x".repeat(10_000).as_bytes());
        info.add_stderr(b"\nsh: 1: gbc: not found\n");
        assert!(info.stderr.len() <= ExitInfo::KEEP);
        assert_eq!(info.to_string(), "exit status 127: sh: 1: gbc: not found");
        assert!(info.not_runnable());
    }
}
