//! `gbc agent`: the build-host side of the protocol (see [`crate::protocol`] and docs/protocol.md).
//!
//! The coordinator runs it over an SSH exec channel, or as a child process for the local machine,
//! and talks to it on stdin/stdout. Threads: the caller's thread reads frames and dispatches; one
//! thread owns the output and writes frames in order; each build and each incoming NAR has its own
//! thread. The agent trusts no peer: every message is checked, a refused one gets an `error` reply
//! and the session goes on; an incoming NAR becomes a valid path only after its hash and size match.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, BufRead, BufWriter, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::build::{self, BuildRequest, BuildSettings, Outcome};
use crate::formats::derivation::{Derivation, name_from_drv_path};
use crate::formats::hash::Hash;
use crate::formats::host_key::HostSecretKey;
use crate::formats::nar;
use crate::formats::narinfo;
use crate::formats::signing::SecretKey;
use crate::formats::store_path::{StoreDir, StorePath};
use crate::pipe::ChunkReader;
use crate::protocol::{
    BuildStatus, BuiltOutput, ChunkWriter, Frame, FrameReader, HostFacts, MAX_PAYLOAD, Message, NAR_CHUNK,
    PROTOCOL_VERSION, PathMeta, ProtocolError,
};
use crate::store::{LocalStore, PathInfo, remove_tree};

/// How an agent runs.
pub struct AgentConfig {
    pub store: LocalStore,
    /// Signs every output's fingerprint: a Nix key, or a Guix one (see [`crate::formats::host_key`]).
    pub signing_key: HostSecretKey,
    /// The host name a Guix key's signatures give.
    pub host_name: String,
    pub settings: BuildSettings,
    pub store_dirs: Vec<StoreDir>,
    pub systems: Vec<String>,
    pub features: Vec<String>,
}

/// The system this host builds for natively, in Nix's spelling.
pub fn native_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Load a build host's signing key at `path`, Nix's or Guix's format, creating a Nix key named
/// `name` (mode 0600) on first use.
pub fn load_or_create_host_key(path: &Path, name: &str) -> io::Result<HostSecretKey> {
    match fs::read(path) {
        Ok(text) => {
            let text = zeroize::Zeroizing::new(text);
            HostSecretKey::parse(&text)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => load_or_create_key(path, name).map(HostSecretKey::Nix),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Load the signing key at `path`, creating it (mode 0600) on first use.
pub fn load_or_create_key(path: &Path, name: &str) -> io::Result<SecretKey> {
    match fs::read_to_string(path) {
        Ok(text) => SecretKey::parse(&text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = SecretKey::generate(name).map_err(io::Error::other)?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            crate::store::write_new(path, key.to_nix_string().as_bytes(), 0o600)?;
            Ok(key)
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// The session's output, shared by every thread that sends. A frame is written whole under the lock,
/// payload straight from the sender's buffer (no copy, no hand-off to another thread), and flushed.
#[derive(Clone)]
struct Tx(Arc<Mutex<Box<dyn Write + Send>>>, Arc<AtomicU64>);

impl Tx {
    /// A number for a NAR this agent sends: unique in the session, since `nar_chunk` and `nar_end`
    /// name only the transfer, and the NARs of concurrent builds interleave.
    fn next_transfer(&self) -> u64 {
        self.1.fetch_add(1, Ordering::Relaxed)
    }

    fn frame(&self, message: &Message, payload: &[u8]) -> io::Result<()> {
        let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut out = self.0.lock().map_err(|_| io::Error::other("output lock poisoned"))?;
        // One system call for header and payload where possible: a separate tiny write would take a
        // page of the pipe of its own and split the payload's write in two.
        let mut slices = [IoSlice::new(&line), IoSlice::new(payload)];
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let n = out.write_vectored(slices)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
        out.flush()
    }
}

struct Pending {
    drv_path: String,
    drv: Derivation,
    store_dir: StoreDir,
    name: String,
    outputs: std::collections::BTreeMap<String, StorePath>,
    inputs: BTreeSet<String>,
    max_silent: Option<u64>,
    timeout: Option<u64>,
    cores: Option<u32>,
}

/// Serve one session on `input`/`output` until the peer closes `input`.
pub fn serve<R: BufRead + Send + 'static, W: Write + Send + 'static>(
    config: AgentConfig,
    input: R,
    output: W,
) -> io::Result<()> {
    let tx = Tx(Arc::new(Mutex::new(Box::new(output))), Arc::new(AtomicU64::new(0)));
    session(&Arc::new(config), input, &tx)
}

fn send(tx: &Tx, message: Message) {
    let _ = tx.frame(&message, &[]);
}

fn reply_error(tx: &Tx, message: String, build: Option<String>, transfer: Option<u64>) {
    send(tx, Message::Error { message, build, transfer });
}

fn session<R: BufRead + Send + 'static>(config: &Arc<AgentConfig>, input: R, tx: &Tx) -> io::Result<()> {
    let facts = host_facts(config);
    send(
        tx,
        Message::Hello {
            protocol: PROTOCOL_VERSION,
            gbc_version: env!("CARGO_PKG_VERSION").to_owned(),
            host: Some(facts),
            idle_secs: None,
        },
    );
    let mut reader = FrameReader::new(input);

    // The peer's hello first.
    let idle = match reader.read() {
        Ok(Some(Frame { message: Message::Hello { protocol, idle_secs, .. }, .. })) if protocol == PROTOCOL_VERSION => {
            idle_secs.map(Duration::from_secs)
        }
        Ok(Some(Frame { message: Message::Hello { protocol, .. }, .. })) => {
            let msg = format!("incompatible protocol version {protocol}: this agent speaks version {PROTOCOL_VERSION}");
            reply_error(tx, msg.clone(), None, None);
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        }
        Ok(Some(_)) | Err(ProtocolError::BadLine { .. }) => {
            let msg = "the first message must be hello".to_owned();
            reply_error(tx, msg.clone(), None, None);
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        }
        Ok(None) => return Ok(()),
        Err(e) => return Err(io::Error::other(e.to_string())),
    };
    // Frames are read on a thread of their own, so that silence can be timed: a coordinator whose
    // connection vanished without a reset (a cut link) never closes our input, and this session
    // would hold the store's lock against the next one for as long as TCP takes to notice.
    let (frames_tx, frames) = mpsc::sync_channel::<Result<Option<Frame>, ProtocolError>>(16);
    std::thread::spawn(move || {
        loop {
            let r = reader.read();
            let more = matches!(r, Ok(Some(_)) | Err(ProtocolError::BadLine { .. }));
            if frames_tx.send(r).is_err() || !more {
                break;
            }
        }
    });

    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut running: HashMap<String, (Arc<AtomicBool>, JoinHandle<()>)> = HashMap::new();
    let mut transfers: HashMap<u64, Option<mpsc::SyncSender<Vec<u8>>>> = HashMap::new();
    let mut transfer_threads: Vec<JoinHandle<()>> = Vec::new();
    loop {
        running.retain(|_, (_, h)| !h.is_finished());
        transfer_threads.retain(|h| !h.is_finished());
        let next = match idle {
            Some(d) => frames.recv_timeout(d),
            None => frames.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let frame = match next {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(Err(ProtocolError::BadLine { line, reason })) => {
                reply_error(tx, format!("line {line}: {reason}"), None, None);
                continue;
            }
            Ok(Err(e)) => {
                reply_error(tx, e.to_string(), None, None);
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let secs = idle.map_or(0, |d| d.as_secs());
                tracing::warn!("nothing from the coordinator for {secs} s: taking it for gone");
                break;
            }
        };
        match frame.message {
            Message::Build { build, drv_path, drv, inputs, max_silent_secs, timeout_secs, cores } => {
                match check_build(config, &drv_path, &drv, inputs) {
                    Ok(mut p) => {
                        (p.max_silent, p.timeout, p.cores) = (max_silent_secs, timeout_secs, cores);
                        match missing_inputs(config, &p) {
                            Ok(missing) => {
                                send(tx, Message::Inputs { build: build.clone(), missing });
                                pending.insert(build, p);
                            }
                            Err(e) => reply_error(tx, e.to_string(), Some(build), None),
                        }
                    }
                    Err(e) => reply_error(tx, format!("{drv_path}: {e}"), Some(build), None),
                }
            }
            Message::Start { build } => match pending.remove(&build) {
                Some(p) => {
                    let cancel = Arc::new(AtomicBool::new(false));
                    let (config, tx2, id, c) = (Arc::clone(config), tx.clone(), build.clone(), Arc::clone(&cancel));
                    let handle = std::thread::spawn(move || run_build(&config, &tx2, &id, p, c));
                    running.insert(build, (cancel, handle));
                }
                None => reply_error(tx, format!("no build {build:?} is waiting to start"), Some(build), None),
            },
            Message::Cancel { build } => {
                if pending.remove(&build).is_some() {
                    send(tx, Message::Finished { build, status: BuildStatus::Canceled, outputs: vec![] });
                } else if let Some((cancel, _)) = running.get(&build) {
                    cancel.store(true, Ordering::Relaxed);
                } else {
                    reply_error(tx, format!("no build {build:?} to cancel"), Some(build), None);
                }
            }
            Message::NarStart { transfer, meta, .. } => {
                let slot = match transfers.entry(transfer) {
                    Entry::Occupied(mut open) => {
                        let msg = format!("transfer {transfer} is already open");
                        reply_error(tx, msg, None, Some(transfer));
                        // Its chunks are no longer attributable: swallow them.
                        open.insert(None);
                        continue;
                    }
                    Entry::Vacant(slot) => slot,
                };
                if transfer_threads.len() >= MAX_TRANSFERS {
                    let msg = format!("{MAX_TRANSFERS} transfers are under way already: send it again when one ends");
                    reply_error(tx, msg, None, Some(transfer));
                    slot.insert(None);
                    continue;
                }
                match receive_nar(config, tx, transfer, meta) {
                    Ok((chunks, handle)) => {
                        slot.insert(Some(chunks));
                        transfer_threads.push(handle);
                    }
                    Err(e) => {
                        reply_error(tx, e.to_string(), None, Some(transfer));
                        slot.insert(None);
                    }
                }
            }
            Message::NarChunk { transfer, .. } => match transfers.get(&transfer) {
                Some(Some(chunks)) => {
                    if chunks.send(frame.payload).is_err() {
                        transfers.insert(transfer, None);
                    }
                }
                Some(None) => {}
                None => reply_error(tx, format!("no open transfer {transfer}"), None, Some(transfer)),
            },
            Message::NarEnd { transfer } => {
                if transfers.remove(&transfer).is_none() {
                    reply_error(tx, format!("no open transfer {transfer}"), None, Some(transfer));
                }
            }
            Message::Fetch { transfer, path } if transfer_threads.len() >= MAX_TRANSFERS => {
                let msg = format!("fetch {path}: {MAX_TRANSFERS} transfers are under way already");
                reply_error(tx, msg, None, Some(transfer));
            }
            Message::Substitute { build, paths, substituters, keys } => {
                // On its own thread: downloads take a while, the session goes on meanwhile.
                let (config, tx) = (Arc::clone(config), tx.clone());
                transfer_threads.push(std::thread::spawn(move || {
                    let (added, error) = substitute(&config, &paths, substituters, keys);
                    send(&tx, Message::Substituted { build, added, error });
                }));
            }
            Message::Fetch { transfer, path } => {
                // On its own thread, like a build's outputs: the session goes on meanwhile.
                let (config, tx) = (Arc::clone(config), tx.clone());
                transfer_threads.push(std::thread::spawn(move || {
                    let sent =
                        store_dir_of(&config, &path).and_then(|(sd, _)| match config.store.query(&sd, &path)? {
                            Some(info) => send_nar(&config, &tx, None, transfer, &sd, &meta_of(&info)),
                            None => Err(invalid(format!("{path} is not valid in this agent's store"))),
                        });
                    if let Err(e) = sent {
                        reply_error(&tx, format!("fetch {path}: {e}"), None, Some(transfer));
                    }
                }));
            }
            Message::Ping {} => {
                let facts = host_facts(config);
                send(tx, Message::Pong { load1: facts.load1, free_space: facts.free_space });
            }
            other => reply_error(tx, format!("unexpected message {:?} from the coordinator", kind(&other)), None, None),
        }
    }
    // The peer is gone: stop builds, finish transfers (their senders are dropped: EOF).
    transfers.clear();
    for (cancel, handle) in running.into_values() {
        cancel.store(true, Ordering::Relaxed);
        let _ = handle.join();
    }
    for h in transfer_threads {
        let _ = h.join();
    }
    Ok(())
}

/// NARs received or fetched at once, each on a thread of its own (the coordinator sends inputs one
/// after the other; this bounds what a misbehaving peer can start).
const MAX_TRANSFERS: usize = 16;

fn kind(m: &Message) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

fn host_facts(config: &AgentConfig) -> HostFacts {
    let load1 = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0);
    let free_space = rustix::fs::statvfs(config.store.root()).map(|s| s.f_bavail * s.f_frsize).unwrap_or(0);
    HostFacts {
        systems: config.systems.clone(),
        features: config.features.clone(),
        cores: config.settings.cores,
        load1,
        free_space,
        store_dirs: config.store_dirs.iter().map(|d| d.as_str().to_owned()).collect(),
        signing_key: config.signing_key.public().to_string(),
    }
}

/// Find the accepted store dir that `path` lies in.
fn store_dir_of(config: &AgentConfig, path: &str) -> io::Result<(StoreDir, StorePath)> {
    for sd in &config.store_dirs {
        if let Ok(sp) = sd.parse_path(path) {
            return Ok((sd.clone(), sp));
        }
    }
    let dirs: Vec<&str> = config.store_dirs.iter().map(StoreDir::as_str).collect();
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{path:?} is not a store path in {}", dirs.join(" or "))))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Check a build request as far as the agent can without the input derivations: the ATerm parses,
/// gives `drv_path`, and its outputs and inputs lie in an accepted store dir.
fn check_build(config: &AgentConfig, drv_path: &str, aterm: &str, inputs: Vec<String>) -> io::Result<Pending> {
    let (store_dir, sp) = store_dir_of(config, drv_path)?;
    let name = name_from_drv_path(&sp).map_err(|e| invalid(e.to_string()))?.to_owned();
    let drv = Derivation::parse(aterm.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    let computed = drv.drv_path(&store_dir, &name).map_err(|e| invalid(e.to_string()))?;
    if computed != sp {
        return Err(invalid(format!("the derivation's contents give {}", store_dir.display(&computed))));
    }
    let mut outputs = std::collections::BTreeMap::new();
    for (o, out) in &drv.outputs {
        let p = store_dir.parse_path(&out.path).map_err(|e| invalid(e.to_string()))?;
        if drv.env.get(o) != Some(&out.path) {
            return Err(invalid(format!("output {o:?} does not match its environment variable")));
        }
        outputs.insert(o.clone(), p);
    }
    let mut all_inputs: BTreeSet<String> = drv.input_srcs.clone();
    for i in inputs {
        store_dir.parse_path(&i).map_err(|e| invalid(e.to_string()))?;
        all_inputs.insert(i);
    }
    Ok(Pending {
        drv_path: drv_path.to_owned(),
        drv,
        store_dir,
        name,
        outputs,
        inputs: all_inputs,
        max_silent: None,
        timeout: None,
        cores: None,
    })
}

fn missing_inputs(config: &AgentConfig, p: &Pending) -> io::Result<Vec<String>> {
    let (_, missing) = config.store.closure(&p.store_dir, p.inputs.iter().map(String::as_str))?;
    Ok(missing.into_iter().collect())
}

fn run_build(config: &AgentConfig, tx: &Tx, id: &str, p: Pending, cancel: Arc<AtomicBool>) {
    let mut settings = config.settings.clone();
    settings.max_silent = p.max_silent.map(Duration::from_secs).or(settings.max_silent);
    settings.timeout = p.timeout.map(Duration::from_secs).or(settings.timeout);
    if let Some(c) = p.cores {
        settings.cores = c;
    }
    settings.cancel = Some(cancel);
    let req = BuildRequest {
        drv_path: &p.drv_path,
        drv: &p.drv,
        store_dir: &p.store_dir,
        name: &p.name,
        outputs: &p.outputs,
        inputs: p.inputs.clone(),
    };
    send(tx, Message::Started { build: id.to_owned() });
    let outcome = build::build(&config.store, &req, &settings, &mut |chunk| {
        for part in chunk.chunks(MAX_PAYLOAD) {
            let _ = tx.frame(&Message::Log { build: id.to_owned(), payload: part.len() as u64 }, part);
        }
    });
    let status = match outcome {
        Outcome::Success { outputs, .. } => {
            let mut built = Vec::new();
            for (name, info) in &outputs {
                match sign_output(config, name, info) {
                    Ok(b) => built.push(b),
                    Err(e) => {
                        let status = BuildStatus::SetupFailure { reason: format!("signing {}: {e}", info.path) };
                        send(tx, Message::Finished { build: id.to_owned(), status, outputs: vec![] });
                        return;
                    }
                }
            }
            send(tx, Message::Finished { build: id.to_owned(), status: BuildStatus::Success, outputs: built.clone() });
            for out in &built {
                if let Err(e) = send_nar(config, tx, Some(id), tx.next_transfer(), &p.store_dir, &out.meta) {
                    reply_error(tx, format!("sending {}: {e}", out.meta.path), Some(id.to_owned()), None);
                }
            }
            return;
        }
        Outcome::Failed { exit_code, reason } => BuildStatus::BuildFailure { exit_code, reason },
        Outcome::TimedOut(d) => BuildStatus::TimedOut { seconds: d.as_secs() },
        Outcome::SilentTooLong(d) => BuildStatus::SilentTooLong { seconds: d.as_secs() },
        Outcome::Canceled => BuildStatus::Canceled,
        Outcome::SetupFailure(reason) => BuildStatus::SetupFailure { reason },
        Outcome::TransientFailure(reason) => BuildStatus::TransientFailure { reason },
        Outcome::MissingInputs(paths) => BuildStatus::MissingInputs { paths },
    };
    send(tx, Message::Finished { build: id.to_owned(), status, outputs: vec![] });
}

/// The wire form of a store path's record (wire and store types are kept apart on purpose).
fn meta_of(info: &PathInfo) -> PathMeta {
    PathMeta {
        path: info.path.clone(),
        nar_hash: info.nar_hash.clone(),
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
    }
}

fn sign_output(config: &AgentConfig, name: &str, info: &PathInfo) -> io::Result<BuiltOutput> {
    let hash = Hash::parse(&info.nar_hash).map_err(|e| invalid(e.to_string()))?;
    let fp = narinfo::fingerprint(&info.path, &hash, info.nar_size, &info.references);
    Ok(BuiltOutput {
        name: name.to_owned(),
        meta: meta_of(info),
        signature: config.signing_key.sign_fingerprint(&fp, &config.host_name),
    })
}

/// Send a valid path's NAR as transfer `transfer`, tagged with its build when it is an output.
fn send_nar(
    config: &AgentConfig,
    tx: &Tx,
    build: Option<&str>,
    transfer: u64,
    sd: &StoreDir,
    meta: &PathMeta,
) -> io::Result<()> {
    let sp = sd.parse_path(&meta.path).map_err(|e| invalid(e.to_string()))?;
    send(tx, Message::NarStart { transfer, build: build.map(str::to_owned), meta: meta.clone() });
    let chunks = ChunkWriter::new(transfer, |message, payload| tx.frame(message, payload));
    // Through a buffer of one chunk, so that files are read a chunk at a time straight into it.
    let mut chunks = BufWriter::with_capacity(NAR_CHUNK, chunks);
    let result = nar::dump_path(&config.store.physical(&sp), &mut chunks)
        .map_err(|e| io::Error::new(e.source.kind(), e.to_string()))
        .and_then(|()| chunks.flush());
    send(tx, Message::NarEnd { transfer });
    result
}

/// Start receiving a NAR for `meta.path`: returns where to send its chunks.
fn receive_nar(
    config: &Arc<AgentConfig>,
    tx: &Tx,
    transfer: u64,
    meta: PathMeta,
) -> io::Result<(mpsc::SyncSender<Vec<u8>>, JoinHandle<()>)> {
    let (sd, sp) = store_dir_of(config, &meta.path)?;
    let want = Hash::parse(&meta.nar_hash).map_err(|e| invalid(format!("nar_hash: {e}")))?;
    for r in &meta.references {
        sd.parse_path(r).map_err(|e| invalid(format!("reference: {e}")))?;
    }
    let (chunks_tx, chunks_rx) = mpsc::sync_channel::<Vec<u8>>(16);
    let (config, tx) = (Arc::clone(config), tx.clone());
    let handle = std::thread::spawn(move || {
        let reader = ChunkReader::new(chunks_rx);
        match add_path(&config, &sd, &sp, &want, &meta, reader) {
            Ok(()) => send(&tx, Message::PathAdded { transfer, path: meta.path.clone() }),
            Err(e) => reply_error(&tx, format!("{}: {e}", meta.path), None, Some(transfer)),
        }
    });
    Ok((chunks_tx, handle))
}

/// Take `paths` and the closure of each that the store lacks from the binary caches `urls`,
/// trusting `keys`, each NAR checked as it is unpacked; stops at the first failure. Returns what
/// was added, and why the rest was not.
fn substitute(
    config: &AgentConfig,
    paths: &[String],
    urls: Vec<String>,
    keys: Vec<String>,
) -> (Vec<String>, Option<String>) {
    use crate::coordinator_file::{CoordinatorFile, Overrides, Settings};
    let mut added = Vec::new();
    let overrides = Overrides { substituters: Some(urls), substituter_keys: Some(keys), ..Overrides::default() };
    let settings = match Settings::resolve(&CoordinatorFile::default(), &overrides, Path::new("/")) {
        Ok(s) => s,
        Err(e) => return (added, Some(e)),
    };
    let mut by_dir: std::collections::BTreeMap<String, (StoreDir, Vec<String>)> = Default::default();
    for p in paths {
        match store_dir_of(config, p) {
            Ok((sd, _)) => by_dir.entry(sd.as_str().to_owned()).or_insert_with(|| (sd, Vec::new())).1.push(p.clone()),
            Err(e) => return (added, Some(format!("{p}: {e}"))),
        }
    }
    for (sd, paths) in by_dir.into_values() {
        let sub = crate::substituter::Substituter::new(&settings, sd.clone());
        let wanted = match sub.closure(&paths, |p| config.store.is_valid(&sd, p).unwrap_or(false)) {
            Ok(w) => w,
            Err(e) => return (added, Some(e)),
        };
        for f in wanted {
            let meta = PathMeta {
                path: f.path(),
                nar_hash: f.info.nar_hash.to_nix32_string(),
                nar_size: f.info.nar_size,
                references: f.info.references.iter().map(|r| sd.display(r)).collect(),
                deriver: f.info.deriver.as_ref().map(|d| sd.display(d)),
            };
            let result = sub.open_nar(&f).and_then(|(nar, url)| {
                add_path(config, &sd, &f.info.store_path, &f.info.nar_hash, &meta, nar)
                    .map_err(|e| sub.failed_at(&f, format!("{url}: {e}")))
            });
            match result {
                Ok(()) => added.push(meta.path),
                Err(e) => return (added, Some(e)),
            }
        }
    }
    (added, None)
}

fn add_path(
    config: &AgentConfig,
    sd: &StoreDir,
    sp: &StorePath,
    want: &Hash,
    meta: &PathMeta,
    mut reader: impl io::Read,
) -> io::Result<()> {
    let store = &config.store;
    if store.is_valid(sd, &meta.path)? {
        io::copy(&mut reader, &mut io::sink())?;
        return Ok(());
    }
    let tmp: PathBuf = store.temp_dir("nar")?;
    let unpacked = tmp.join(sp.as_str());
    let result = (|| {
        let restored = nar::restore(&mut reader, &unpacked);
        // Drain whatever is left so the session's reader is never blocked on us.
        io::copy(&mut reader, &mut io::sink())?;
        let (hash, size) = restored.map_err(|e| invalid(e.to_string()))?;
        if hash != *want || size != meta.nar_size {
            return Err(invalid(format!(
                "NAR does not match: declared {} ({} bytes), received {} ({size} bytes)",
                want.to_nix32_string(),
                meta.nar_size,
                hash.to_nix32_string()
            )));
        }
        store.clear_stale(sd, &meta.path)?;
        fs::rename(&unpacked, store.physical(sp))?;
        let mut references = meta.references.clone();
        references.sort();
        store.register(
            sd,
            &PathInfo {
                path: meta.path.clone(),
                nar_hash: hash.to_nix32_string(),
                nar_size: size,
                references,
                deriver: meta.deriver.clone(),
            },
        )
    })();
    let cleaned = remove_tree(&tmp);
    result.and(cleaned)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::formats::hash::sha256;
    use crate::protocol::write_frame;

    /// An output that tests can read after the session.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn config(root: &Path) -> AgentConfig {
        let store = LocalStore::open(root).unwrap_or_else(|e| unreachable!("{e}"));
        AgentConfig {
            store,
            signing_key: HostSecretKey::Nix(
                SecretKey::generate("test-agent-1").unwrap_or_else(|e| unreachable!("{e}")),
            ),
            host_name: "test-host".to_owned(),
            settings: BuildSettings::default(),
            store_dirs: vec![StoreDir::new("/gnu/store").unwrap_or_else(|e| unreachable!("{e}"))],
            systems: vec![native_system()],
            features: vec!["kvm".to_owned()],
        }
    }

    fn frames(messages: &[(Message, Vec<u8>)], raw_after_hello: &[u8]) -> Vec<u8> {
        let mut input = Vec::new();
        for (i, (m, p)) in messages.iter().enumerate() {
            write_frame(&mut input, &Frame { message: m.clone(), payload: p.clone() }).ok();
            if i == 0 {
                input.extend_from_slice(raw_after_hello);
            }
        }
        input
    }

    fn replies(output: &Shared) -> Vec<Message> {
        let bytes = output.0.lock().map(|b| b.clone()).unwrap_or_default();
        let mut r = FrameReader::new(&bytes[..]);
        let mut out = Vec::new();
        while let Ok(Some(f)) = r.read() {
            out.push(f.message);
        }
        out
    }

    const PATH: &str = "/gnu/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-hello";

    fn nar_of(contents: &[u8]) -> Vec<u8> {
        let mut nar = Vec::new();
        let root = nar::begin(&mut nar).unwrap_or_else(|e| unreachable!("{e}"));
        root.regular(false, contents.len() as u64, contents).unwrap_or_else(|e| unreachable!("{e}"));
        nar
    }

    fn upload(transfer: u64, nar: &[u8], declared: &[u8], path: &str) -> Vec<(Message, Vec<u8>)> {
        let meta = PathMeta {
            path: path.to_owned(),
            nar_hash: Hash::sha256(sha256(declared)).to_nix32_string(),
            nar_size: declared.len() as u64,
            references: vec![],
            deriver: None,
        };
        vec![
            (Message::NarStart { transfer, build: None, meta }, vec![]),
            (Message::NarChunk { transfer, payload: nar.len() as u64 }, nar.to_vec()),
            (Message::NarEnd { transfer }, vec![]),
        ]
    }

    #[test]
    fn transcript_hello_errors_and_uploads() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let cfg = config(&tmp.path().join("store"));
        let public = cfg.signing_key.public().to_string();
        let good = nar_of(b"hello\n");
        let mut bad = good.clone();
        // Same length, one letter of the contents changed: a valid NAR with the wrong hash.
        let at = bad.windows(5).position(|w| w == b"hello").unwrap_or_default();
        bad[at] = b'j';
        let mut msgs = vec![(
            Message::Hello { protocol: PROTOCOL_VERSION, gbc_version: "t".into(), host: None, idle_secs: None },
            vec![],
        )];
        msgs.extend(upload(1, &good, &good, PATH));
        msgs.extend(upload(2, &bad, &good, &PATH.replace("-hello", "-other")));
        msgs.extend(upload(3, &good, &good, "/etc/passwd"));
        msgs.push((Message::Cancel { build: "nope".into() }, vec![]));
        msgs.push((Message::Started { build: "x".into() }, vec![]));
        let input = frames(&msgs, b"not json\n{\"type\":\"teleport\"}\n");
        let output = Shared::default();
        serve(cfg, Cursor::new(input), output.clone()).unwrap_or_else(|e| unreachable!("{e}"));

        let got = replies(&output);
        let Some(Message::Hello { protocol, host: Some(host), .. }) = got.first() else { unreachable!("{got:?}") };
        assert_eq!(*protocol, PROTOCOL_VERSION);
        assert_eq!((host.signing_key.as_str(), host.features.as_slice()), (public.as_str(), &["kvm".to_owned()][..]));
        let rest = &got[1..];
        let errors: Vec<&str> = rest
            .iter()
            .filter_map(|m| match m {
                Message::Error { message, .. } => Some(message.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 6, "{rest:?}");
        for want in ["bad message", "unknown variant", "does not match", "not a store path", "no build", "unexpected"] {
            assert!(errors.iter().any(|e| e.contains(want)), "no error about {want:?}: {errors:?}");
        }
        assert!(rest.contains(&Message::PathAdded { transfer: 1, path: PATH.to_owned() }), "{rest:?}");

        // Only the good upload is valid; nothing else is left in the store.
        let store = LocalStore::open(&tmp.path().join("store")).unwrap_or_else(|e| unreachable!("{e}"));
        let sd = StoreDir::new("/gnu/store").unwrap_or_else(|e| unreachable!("{e}"));
        assert!(store.is_valid(&sd, PATH).unwrap_or(false));
        assert!(!store.is_valid(&sd, &PATH.replace("-hello", "-other")).unwrap_or(true));
        let names: Vec<String> = fs::read_dir(tmp.path().join("store"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert_eq!(names, vec!["3pysdbjixd4amzidam0kp6vwzpqy58y3-hello".to_owned()]);
        assert_eq!(fs::read_dir(tmp.path().join("store/.gbc-tmp")).map(|d| d.count()).unwrap_or(1), 0);
    }

    #[test]
    fn transcript_fetch_and_ping() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let hello = (
            Message::Hello { protocol: PROTOCOL_VERSION, gbc_version: "t".into(), host: None, idle_secs: None },
            vec![],
        );
        let good = nar_of(b"hello\n");
        // One session adds the path (its NAR is unpacked on a thread of its own)...
        let mut msgs = vec![hello.clone()];
        msgs.extend(upload(1, &good, &good, PATH));
        serve(config(&tmp.path().join("store")), Cursor::new(frames(&msgs, b"")), Shared::default())
            .unwrap_or_else(|e| unreachable!("{e}"));
        // ...the next fetches it back, asks for one that isn't there, and pings.
        let msgs = vec![
            hello,
            (Message::Fetch { transfer: 7, path: PATH.to_owned() }, vec![]),
            (Message::Fetch { transfer: 8, path: PATH.replace("-hello", "-other") }, vec![]),
            (Message::Ping {}, vec![]),
        ];
        let output = Shared::default();
        serve(config(&tmp.path().join("store")), Cursor::new(frames(&msgs, b"")), output.clone())
            .unwrap_or_else(|e| unreachable!("{e}"));
        let bytes = output.0.lock().map(|b| b.clone()).unwrap_or_default();
        let mut r = FrameReader::new(&bytes[..]);
        let mut nar = Vec::new();
        let mut got = Vec::new();
        while let Ok(Some(f)) = r.read() {
            if let Message::NarChunk { transfer: 7, .. } = f.message {
                nar.extend_from_slice(&f.payload);
            }
            got.push(f.message);
        }
        assert_eq!(nar, good);
        let start = got.iter().find_map(|m| match m {
            Message::NarStart { transfer: 7, build: None, meta } => Some(meta.clone()),
            _ => None,
        });
        assert_eq!(start.map(|m| (m.path, m.nar_size)), Some((PATH.to_owned(), good.len() as u64)));
        assert!(got.contains(&Message::NarEnd { transfer: 7 }), "{got:?}");
        assert!(
            got.iter().any(
                |m| matches!(m, Message::Error { transfer: Some(8), message, .. } if message.contains("not valid"))
            ),
            "{got:?}"
        );
        assert!(got.iter().any(|m| matches!(m, Message::Pong { free_space, .. } if *free_space > 0)), "{got:?}");
    }

    #[test]
    fn transcript_refuses_a_session_without_hello() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let input = frames(&[(Message::Start { build: "b".into() }, vec![])], b"");
        let output = Shared::default();
        assert!(serve(config(tmp.path()), Cursor::new(input), output.clone()).is_err());
        let got = replies(&output);
        assert!(
            matches!(got.get(1), Some(Message::Error { message, .. }) if message.contains("must be hello")),
            "{got:?}"
        );
    }
}
