//! `gbc machines test`: try a machine step by step and say what fails, like `guix offload test`.

use std::time::{Duration, Instant};

use super::MachineSpec;
use super::transport::ConnectError;
use crate::formats::hash::{Hash, HashSink, sha256};
use crate::formats::nar::writer;
use crate::formats::store_path::StoreDir;
use crate::protocol::{Frame, Message, NAR_CHUNK, PathMeta};

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    pub what: &'static str,
    pub outcome: Result<String, Failure>,
}

#[derive(Debug, Clone)]
pub struct Failure {
    /// A short diagnosis: "connection refused", "host key mismatch"...
    pub kind: &'static str,
    pub message: String,
}

fn fail(kind: &'static str, message: impl Into<String>) -> Failure {
    Failure { kind, message: message.into() }
}

/// Run the steps until one fails.
pub async fn probe(spec: &MachineSpec) -> Vec<Step> {
    let mut steps = Vec::new();
    let t0 = Instant::now();
    let mut connected = spec.transport.connect(&spec.name, None).await;
    // A coordinator running there holds the agent's store: test with a scratch store instead.
    let mut scratch = false;
    if let (Err(ConnectError::Other(m)), super::transport::Transport::Ssh(agent)) = (&connected, &spec.transport)
        && m.contains(crate::store::IN_USE)
    {
        let mut agent = agent.clone();
        agent.args.push("--scratch-store".into());
        connected = super::transport::Transport::Ssh(agent).connect(&spec.name, None).await;
        scratch = true;
    }
    let mut session = match connected {
        Ok(s) => s,
        Err(e) => {
            let kind = e.kind();
            let message = match &e {
                ConnectError::AgentMissing(m) => {
                    format!("{m} (install gbc on the host and set `agent`, or set auto_deploy: true)")
                }
                _ => e.to_string(),
            };
            steps.push(Step { what: "connect and start the agent", outcome: Err(fail(kind, message)) });
            return steps;
        }
    };
    let mut said = format!("host key checked, agent gbc {} up in {:.2?}", session.version, t0.elapsed());
    if scratch {
        said.push_str("; its store is in use (a running coordinator's agent holds it): tested with a scratch store");
    }
    for note in &session.notes {
        said.push_str("; ");
        said.push_str(note);
    }
    steps.push(Step { what: "connect and start the agent", outcome: Ok(said) });

    let f = session.facts.clone();
    let facts = format!(
        "systems {}; features {}; {} cores, load {:.2}; {:.1} GiB free in its store",
        f.systems.join(" "),
        if f.features.is_empty() { "none".to_owned() } else { f.features.join(" ") },
        f.cores,
        f.load1,
        f.free_space as f64 / f64::from(1u32 << 30),
    );
    steps.push(Step { what: "host facts", outcome: Ok(facts) });

    let missing: Vec<&String> = spec.caps.systems.iter().filter(|s| !f.systems.contains(s)).collect();
    if !missing.is_empty() {
        let message = format!(
            "the machines file lists systems the agent does not build: {} (give the agent --system, in agent_args)",
            missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
        );
        steps.push(Step { what: "systems", outcome: Err(fail("systems mismatch", message)) });
        return steps;
    }

    let agent_key = crate::formats::host_key::HostPublicKey::parse(&f.signing_key).ok();
    let key_ok = spec.trusted.is_empty() || agent_key.is_some_and(|a| spec.trusted.contains(&a));
    let signing = if key_ok {
        Ok(format!("{} (trusted)", f.signing_key))
    } else {
        Err(fail(
            "untrusted signing key",
            format!(
                "the agent signs with {}, which is neither this machine's signing_key nor in trusted_keys: its outputs would be rejected",
                f.signing_key
            ),
        ))
    };
    let untrusted = signing.is_err();
    steps.push(Step { what: "signing key", outcome: signing });
    if untrusted {
        return steps;
    }

    steps.push(Step { what: "send and fetch a NAR", outcome: round_trip(&mut session, &f.store_dirs).await });
    steps
}

/// Send a small NAR, wait for the agent to add it, fetch it back, compare.
async fn round_trip(session: &mut super::transport::Session, store_dirs: &[String]) -> Result<String, Failure> {
    let dir = store_dirs.first().ok_or_else(|| fail("agent failed", "the agent accepts no store dir"))?;
    let sd = StoreDir::new(dir).map_err(|e| fail("agent failed", format!("store dir {dir}: {e}")))?;
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| fail("local error", e.to_string()))?;
    let contents = format!("gbc machines test {}\n", Hash::sha256(sha256(&nonce)).to_nix32()).into_bytes();
    let path = sd
        .make_text_path("gbc-machines-test", &sha256(&contents), [])
        .map_err(|e| fail("local error", e.to_string()))?;
    let path = sd.display(&path);
    let mut nar = Vec::new();
    writer::begin(&mut nar)
        .and_then(|n| n.regular(false, contents.len() as u64, &contents[..]))
        .map_err(|e| fail("local error", e.to_string()))?;
    let mut sink = HashSink::new();
    std::io::Write::write_all(&mut sink, &nar).map_err(|e| fail("local error", e.to_string()))?;
    let (hash, size) = sink.finish();
    let meta = PathMeta {
        path: path.clone(),
        nar_hash: format!("sha256:{}", hash.to_nix32()),
        nar_size: size,
        references: vec![],
        deriver: None,
    };
    let t0 = Instant::now();
    let gone = || fail("connection lost", "the agent went away");
    let frames = [
        Frame::new(Message::NarStart { transfer: 1, build: None, meta: meta.clone() }),
        Frame { message: Message::NarChunk { transfer: 1, payload: nar.len() as u64 }, payload: nar.clone() },
        Frame::new(Message::NarEnd { transfer: 1 }),
        Frame::new(Message::Fetch { transfer: 2, path: path.clone() }),
    ];
    // Fetch goes out only after the agent said the path is added.
    for f in frames.iter().take(3) {
        session.tx.send_bulk(f.clone()).await.map_err(|_| gone())?;
    }
    let mut back = Vec::new();
    let mut added = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let frame = match tokio::time::timeout_at(deadline, session.rx.recv()).await {
            Err(_) => return Err(fail("agent failed", "no answer within 60 s")),
            Ok(None) => return Err(gone()),
            Ok(Some(Err(e))) => return Err(fail("connection lost", e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        match frame.message {
            Message::PathAdded { transfer: 1, .. } => {
                added = true;
                session.tx.send(frames[3].clone()).map_err(|_| gone())?;
            }
            Message::Error { message, .. } => {
                let what = if added { "fetching it back" } else { "sending it" };
                return Err(fail("agent failed", format!("{what}: {message}")));
            }
            Message::NarStart { transfer: 2, meta: got, .. } if got.nar_hash != meta.nar_hash => {
                return Err(fail("agent failed", format!("the agent describes {path} as {}", got.nar_hash)));
            }
            Message::NarChunk { transfer: 2, .. } => back.extend_from_slice(&frame.payload),
            Message::NarEnd { transfer: 2 } => break,
            _ => {}
        }
    }
    if back != nar {
        return Err(fail("agent failed", format!("{path} came back different ({} bytes)", back.len())));
    }
    debug_assert!(nar.len() < NAR_CHUNK);
    Ok(format!("{path}: {size} bytes there and back in {:.2?}", t0.elapsed()))
}

/// What [`fetch`] measured.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub nar_size: u64,
    pub nar_hash: String,
    /// From the request to the last byte, hashed.
    pub elapsed: Duration,
}

/// Why `gbc machines fetch` failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Connect(#[from] super::transport::ConnectError),
    #[error(transparent)]
    Link(#[from] super::transport::LinkError),
    #[error("the agent went away")]
    Gone,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the agent: {0}")]
    Agent(String),
    #[error("{0}")]
    Mismatch(String),
}

/// Fetch a valid path's NAR from a machine's agent and hash it as it arrives, the way the
/// coordinator receives outputs (for `gbc machines fetch`, a benchmark of the transport).
pub async fn fetch(spec: &MachineSpec, path: &str) -> Result<Fetched, FetchError> {
    let mut session = spec.transport.connect(&spec.name, None).await?;
    let t0 = Instant::now();
    session.tx.send(Frame::new(Message::Fetch { transfer: 1, path: path.to_owned() })).map_err(|_| FetchError::Gone)?;
    let mut sink = HashSink::new();
    let mut claimed = None;
    loop {
        let frame = match session.rx.recv().await {
            None => return Err(FetchError::Gone),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(f)) => f,
        };
        match frame.message {
            Message::NarStart { transfer: 1, meta, .. } => claimed = Some(meta),
            Message::NarChunk { transfer: 1, .. } => {
                std::io::Write::write_all(&mut sink, &frame.payload)?;
            }
            Message::NarEnd { transfer: 1 } => break,
            Message::Error { message, .. } => return Err(FetchError::Agent(message)),
            _ => {}
        }
    }
    let elapsed = t0.elapsed();
    let (hash, size) = sink.finish();
    let nar_hash = format!("sha256:{}", hash.to_nix32());
    match claimed {
        Some(m) if m.nar_hash == nar_hash && m.nar_size == size => Ok(Fetched { nar_size: size, nar_hash, elapsed }),
        Some(m) => Err(FetchError::Mismatch(format!(
            "the NAR does not match the agent's claim {} ({} bytes)",
            m.nar_hash, m.nar_size
        ))),
        None => Err(FetchError::Mismatch("no nar_start".into())),
    }
}
