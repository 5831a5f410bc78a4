//! How the coordinator reaches a machine's agent: a child process for the built-in local machine,
//! an exec channel on an SSH connection for build hosts. Either way the result is a [`Session`]:
//! frames in, frames out, after the hello exchange. SSH sessions deploy the coordinator's own
//! binary when the host has no compatible agent and the machine allows it (`auto_deploy`).

use std::io::{BufWriter, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

use crate::formats::hash::HashSink;
use crate::pipe::ChunkReader;
use crate::protocol::{Frame, FrameReader, HostFacts, Message, PROTOCOL_VERSION, write_frame};
use crate::ssh::{self, Connection, ExitInfo, SshError, Target, Timing, shell_quote};

/// How to reach a machine's agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// `program agent ARGS...` as a child process.
    Local { program: PathBuf, args: Vec<String> },
    /// `agent ARGS...` on an SSH host.
    Ssh(Box<SshAgent>),
}

/// An agent on an SSH host.
#[derive(Debug, Clone, PartialEq)]
pub struct SshAgent {
    pub target: Target,
    /// The remote command, as the remote shell reads it (`gbc agent`).
    pub command: String,
    /// Arguments added to it, each quoted.
    pub args: Vec<String>,
    /// Upload `program` to the host when its agent is missing or incompatible.
    pub auto_deploy: bool,
    /// This coordinator's own `gbc`, the binary auto-deploy uploads.
    pub program: PathBuf,
    pub timing: Timing,
}

/// Frames to an agent, in two queues the writer merges, control first: `control` (requests,
/// pings, cancels: small and few) never blocks its sender, so a driver waiting on nothing can
/// always go on reading what the agent sends; `bulk` (NAR chunks) is bounded and blocks when the
/// link is busy. Without the split, a driver blocked on a full queue of chunks would stop reading
/// the agent, and an SSH connection blocked on delivering the agent's output would never drain it.
#[derive(Debug, Clone)]
pub struct Outbox {
    control: mpsc::UnboundedSender<Frame>,
    bulk: mpsc::Sender<Frame>,
}

/// The agent's input is closed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the agent closed its input")]
pub struct Closed;

impl Outbox {
    /// The outbox over `out`, the writer's channel; its merging task ends when both halves are
    /// dropped or the writer is gone.
    fn new(out: mpsc::Sender<Frame>) -> Outbox {
        let (control, mut control_rx) = mpsc::unbounded_channel::<Frame>();
        let (bulk, mut bulk_rx) = mpsc::channel::<Frame>(64);
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    biased;
                    Some(f) = control_rx.recv() => f,
                    Some(f) = bulk_rx.recv() => f,
                    else => break,
                };
                if out.send(frame).await.is_err() {
                    break;
                }
            }
        });
        Outbox { control, bulk }
    }

    /// Queue a control message; never waits.
    pub fn send(&self, frame: Frame) -> Result<(), Closed> {
        self.control.send(frame).map_err(|_| Closed)
    }

    /// Queue a bulk frame, waiting while the bulk queue is full.
    pub async fn send_bulk(&self, frame: Frame) -> Result<(), Closed> {
        self.bulk.send(frame).await.map_err(|_| Closed)
    }

    /// [`Outbox::send_bulk`] from a plain thread.
    pub fn blocking_send_bulk(&self, frame: Frame) -> Result<(), Closed> {
        self.bulk.blocking_send(frame).map_err(|_| Closed)
    }
}

/// Frames to and from one agent session. Dropping it ends the session.
pub struct Session {
    pub tx: Outbox,
    pub rx: mpsc::Receiver<Result<Frame, LinkError>>,
    pub facts: HostFacts,
    /// The agent's gbc version.
    pub version: String,
    /// What the session notes for people: "deployed gbc to …".
    pub notes: Vec<String>,
    _connection: Option<Arc<Connection>>,
}

#[cfg(test)]
impl Session {
    /// A session over channels the test plays the agent on.
    pub(crate) fn over(
        tx: mpsc::Sender<Frame>,
        rx: mpsc::Receiver<Result<Frame, LinkError>>,
        facts: HostFacts,
    ) -> Session {
        Session { tx: Outbox::new(tx), rx, facts, version: String::new(), notes: Vec::new(), _connection: None }
    }
}

/// Why an agent's frames stopped coming.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The agent exited or its connection closed: why, as far as is known.
    #[error("{0}")]
    Closed(String),
    #[error("agent protocol error: {0}")]
    Protocol(#[from] crate::protocol::ProtocolError),
}

/// Why a session could not be started.
#[derive(Debug)]
pub enum ConnectError {
    Ssh(SshError),
    /// The agent command could not be run (exit status 126/127).
    AgentMissing(String),
    /// The agent speaks another protocol version.
    Incompatible(String),
    /// Anything else: the agent exited, said something else than hello, deploying failed.
    Other(String),
}

impl ConnectError {
    /// A short diagnosis, for `gbc machines test`.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Ssh(e) => e.kind(),
            ConnectError::AgentMissing(_) => "agent missing",
            ConnectError::Incompatible(_) => "protocol mismatch",
            ConnectError::Other(_) => "agent failed",
        }
    }
}

impl std::error::Error for ConnectError {}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Ssh(e) => write!(f, "{e}"),
            ConnectError::AgentMissing(m) | ConnectError::Incompatible(m) | ConnectError::Other(m) => f.write_str(m),
        }
    }
}

impl Transport {
    /// Start a session: connect, start the agent, exchange hellos. `idle` tells the agent how long
    /// the coordinator may stay silent (it pings more often) before the agent takes it for gone.
    pub async fn connect(&self, name: &str, idle: Option<Duration>) -> Result<Session, ConnectError> {
        match self {
            Transport::Local { program, args } => {
                let (tx, rx) = spawn_local(name, program, args)?;
                start(tx, rx, None, None, idle).await
            }
            Transport::Ssh(agent) => connect_ssh(name, agent, idle).await,
        }
    }
}

type Channels = (mpsc::Sender<Frame>, mpsc::Receiver<Result<Frame, LinkError>>);

fn spawn_local(name: &str, program: &Path, args: &[String]) -> Result<Channels, ConnectError> {
    let mut child = Command::new(program)
        .arg("agent")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ConnectError::Other(format!("cannot start {} agent: {e}", program.display())))?;
    let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ConnectError::Other("the agent's pipes are missing".into()));
    };
    let last_err = Arc::new(Mutex::new(String::new()));
    let (stderr_done, stderr_closed) = std::sync::mpsc::channel::<()>();
    {
        let last_err = last_err.clone();
        let name = name.to_owned();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                tracing::warn!(machine = %name, "agent: {line}");
                if let Ok(mut l) = last_err.lock() {
                    *l = line;
                }
            }
            let _ = stderr_done.send(());
        });
    }
    let rx = spawn_reader(stdout, move || {
        // Why the agent stopped is the last line of its stderr: wait until that closes too (a
        // process it left behind could hold it open: not for long).
        let _ = stderr_closed.recv_timeout(Duration::from_secs(2));
        let why = last_err.lock().map(|l| l.clone()).unwrap_or_default();
        if why.is_empty() { "the agent exited".to_owned() } else { format!("the agent exited: {why}") }
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(64);
    std::thread::spawn(move || {
        let mut w = BufWriter::with_capacity(256 * 1024, stdin);
        while let Some(frame) = out_rx.blocking_recv() {
            if write_frame(&mut w, &frame).is_err() {
                break;
            }
            if out_rx.is_empty() && w.flush().is_err() {
                break;
            }
        }
        // Closing the agent's input ends its session: it stops its builds and exits.
        drop(w);
        let _ = child.wait();
    });
    Ok((out_tx, rx))
}

/// Parse frames from `r` on a thread of its own; at the end, `why` says why.
fn spawn_reader(
    r: impl Read + Send + 'static,
    why: impl FnOnce() -> String + Send + 'static,
) -> mpsc::Receiver<Result<Frame, LinkError>> {
    let (in_tx, in_rx) = mpsc::channel::<Result<Frame, LinkError>>(64);
    std::thread::spawn(move || {
        let mut reader = FrameReader::from_read(r);
        loop {
            match reader.read() {
                Ok(Some(frame)) => {
                    if in_tx.blocking_send(Ok(frame)).is_err() {
                        break;
                    }
                }
                Ok(None) => {
                    let _ = in_tx.blocking_send(Err(LinkError::Closed(why())));
                    break;
                }
                Err(e) => {
                    let _ = in_tx.blocking_send(Err(LinkError::Protocol(e)));
                    break;
                }
            }
        }
    });
    in_rx
}

/// Exchange hellos on fresh channels.
async fn start(
    tx: mpsc::Sender<Frame>,
    mut rx: mpsc::Receiver<Result<Frame, LinkError>>,
    connection: Option<Arc<Connection>>,
    exit: Option<Arc<Mutex<Option<ExitInfo>>>>,
    idle: Option<Duration>,
) -> Result<Session, ConnectError> {
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        gbc_version: env!("CARGO_PKG_VERSION").into(),
        host: None,
        idle_secs: idle.map(|d| d.as_secs().max(1)),
    };
    // A failed send shows up as the reader's end below.
    let _ = tx.send(Frame::new(hello)).await;
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
    let exited = |why: String| {
        let info = exit.as_ref().and_then(|e| e.lock().ok().and_then(|i| i.clone()));
        match info {
            Some(i) if i.not_runnable() => ConnectError::AgentMissing(format!("the agent could not be started: {i}")),
            _ => ConnectError::Other(why),
        }
    };
    let (facts, version) = match first {
        Err(_) => return Err(ConnectError::Other("the agent did not say hello within 60 s".into())),
        Ok(None) => return Err(exited("the agent exited".into())),
        Ok(Some(Err(e))) => return Err(exited(e.to_string())),
        Ok(Some(Ok(Frame { message: Message::Hello { protocol, host: Some(facts), gbc_version, .. }, .. })))
            if protocol == PROTOCOL_VERSION =>
        {
            (facts, gbc_version)
        }
        Ok(Some(Ok(Frame { message: Message::Hello { protocol, gbc_version, .. }, .. }))) => {
            return Err(ConnectError::Incompatible(format!(
                "the agent (gbc {gbc_version}) speaks protocol version {protocol}; this coordinator speaks {PROTOCOL_VERSION}"
            )));
        }
        Ok(Some(Ok(Frame { message: Message::Error { message, .. }, .. }))) => {
            return Err(ConnectError::Other(format!("the agent refused the session: {message}")));
        }
        Ok(Some(Ok(other))) => {
            return Err(ConnectError::Other(format!("the agent's first message is not hello: {:?}", other.message)));
        }
    };
    Ok(Session { tx: Outbox::new(tx), rx, facts, version, notes: Vec::new(), _connection: connection })
}

/// Start `command` on an exec channel and exchange hellos.
async fn exec_agent(
    name: &str,
    conn: &Arc<Connection>,
    command: &str,
    idle: Option<Duration>,
) -> Result<Session, ConnectError> {
    let exec = conn.exec(command).await.map_err(ConnectError::Ssh)?;
    let exit: Arc<Mutex<Option<ExitInfo>>> = Arc::new(Mutex::new(None));
    let ssh::Exec { mut stdin, stdout, end, .. } = exec;
    let ended = {
        let exit = exit.clone();
        let name = name.to_owned();
        move || {
            let info = end.blocking_recv().unwrap_or_default();
            for line in info.stderr.lines().filter(|l| !l.trim().is_empty()) {
                tracing::warn!(machine = %name, "agent: {line}");
            }
            let why = format!("the agent ended ({info})");
            if let Ok(mut e) = exit.lock() {
                *e = Some(info);
            }
            why
        }
    };
    let rx = spawn_reader(ChunkReader::new(stdout), ended);
    let (tx, mut out_rx) = mpsc::channel::<Frame>(64);
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(512 * 1024);
        while let Some(frame) = out_rx.recv().await {
            if write_frame(&mut buf, &frame).is_err() {
                break;
            }
            // Frames queued together go out in one write.
            if out_rx.is_empty() || buf.len() >= 256 * 1024 {
                if stdin.write_all(&buf).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
                buf.clear();
            }
        }
        // EOF on the agent's input ends its session.
        let _ = stdin.shutdown().await;
    });
    start(tx, rx, Some(conn.clone()), Some(exit), idle).await
}

async fn connect_ssh(name: &str, agent: &SshAgent, idle: Option<Duration>) -> Result<Session, ConnectError> {
    let conn = Arc::new(Connection::open(&agent.target, agent.timing).await.map_err(ConnectError::Ssh)?);
    let with_args = |command: String| {
        agent.args.iter().fold(command, |mut c, a| {
            c.push(' ');
            c.push_str(&shell_quote(a));
            c
        })
    };
    let first = exec_agent(name, &conn, &with_args(agent.command.clone()), idle).await;
    match first {
        Err(e @ (ConnectError::AgentMissing(_) | ConnectError::Incompatible(_))) if agent.auto_deploy => {
            tracing::info!(machine = %name, "{e}; deploying this coordinator's gbc");
            let (remote, note) = deploy(&conn, &agent.program).await?;
            let command = with_args(format!("{} agent", shell_quote_remote_path(&remote)));
            let mut session = exec_agent(name, &conn, &command, idle).await?;
            session.notes.push(note);
            Ok(session)
        }
        other => other,
    }
}

/// The remote directory deployed binaries go to (expanded by the remote shell).
const DEPLOY_DIR: &str = "${XDG_CACHE_HOME:-$HOME/.cache}/gbc";

/// A path under [`DEPLOY_DIR`] for the remote shell: the variable part unquoted.
fn shell_quote_remote_path(file: &str) -> String {
    format!("\"{DEPLOY_DIR}\"/{}", shell_quote(file))
}

/// SHA-256 of this coordinator's binary, hex, computed once (blocking: it reads the file).
fn program_hash(program: &Path) -> std::io::Result<&'static str> {
    static HASH: OnceLock<String> = OnceLock::new();
    if let Some(h) = HASH.get() {
        return Ok(h);
    }
    let mut sink = HashSink::new();
    std::fs::File::open(program).and_then(|mut f| std::io::copy(&mut f, &mut sink))?;
    Ok(HASH.get_or_init(|| sink.finish().0.to_hex()))
}

/// Make sure the host has this coordinator's binary, named by its hash, uploading it if not.
/// Returns the file name under [`DEPLOY_DIR`] and a note for people.
async fn deploy(conn: &Connection, program: &Path) -> Result<(String, String), ConnectError> {
    let fail = |what: &str, e: SshError| ConnectError::Other(format!("auto-deploy: {what}: {e}"));
    let arch = conn.run("uname -m", b"").await.map_err(|e| fail("uname -m", e))?;
    let remote_arch = String::from_utf8_lossy(&arch.stdout).trim().to_owned();
    let local_arch = std::env::consts::ARCH;
    if remote_arch != local_arch {
        return Err(ConnectError::Other(format!(
            "auto-deploy: the host is {remote_arch}, this coordinator's gbc is built for {local_arch}; install gbc there and set `agent`"
        )));
    }
    let hashing = {
        let program = program.to_owned();
        tokio::task::spawn_blocking(move || program_hash(&program))
    };
    let hash = match hashing.await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Err(ConnectError::Other(format!("auto-deploy: {}: {e}", program.display()))),
        Err(e) => return Err(ConnectError::Other(format!("auto-deploy: {e}"))),
    };
    let file = format!("gbc-{}", &hash[..32]);
    let target = shell_quote_remote_path(&file);
    let present = conn.run(&format!("test -x {target}"), b"").await.map_err(|e| fail("checking", e))?;
    if present.info.status == Some(0) {
        return Ok((file.clone(), format!("using the deployed {DEPLOY_DIR}/{file}")));
    }
    let binary = tokio::fs::read(program)
        .await
        .map_err(|e| ConnectError::Other(format!("auto-deploy: {}: {e}", program.display())))?;
    // Upload to a temporary name, check the hash there, then rename: a file with the final name
    // is always complete and the right one.
    let script = format!(
        "set -e; d=\"{DEPLOY_DIR}\"; t=\"$d/.{file}.$$\"; mkdir -p \"$d\"; trap 'rm -f \"$t\"' EXIT; \
         cat > \"$t\"; echo \"{hash}  $t\" | sha256sum -c --status; chmod 755 \"$t\"; mv -f \"$t\" \"$d/{file}\"; trap - EXIT"
    );
    let out = conn.run(&format!("sh -c {}", shell_quote(&script)), &binary).await.map_err(|e| fail("upload", e))?;
    if out.info.status != Some(0) {
        return Err(ConnectError::Other(format!("auto-deploy: uploading to {DEPLOY_DIR}/{file} failed: {}", out.info)));
    }
    Ok((file.clone(), format!("deployed this coordinator's gbc to {DEPLOY_DIR}/{file}")))
}
