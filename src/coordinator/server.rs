//! The client socket: line-delimited JSON requests ([`crate::api`]), one task per connection.
//! Reads go straight to the database's read connection; changes go through the core. A bad request
//! gets an `error` reply and the connection (and the coordinator) go on.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};

use super::Command;
use super::logs;
use super::submit::Checked;
use super::upload::Uploads;
use crate::api::{self, BuildState, Event, Reply, Request};
use crate::db::{BuildBrief, Db, ListFilter, Submission};
use crate::pipe::ChunkReader;

fn busy() -> String {
    format!(
        "the coordinator is reading {} MiB of other requests, all it reads at once: try again",
        REQUEST_MEMORY >> 20
    )
}

pub(super) struct Server {
    /// Shares of [`REQUEST_MEMORY`], one per [`REQUEST_PIECE`].
    pub requests: Semaphore,
    pub db: Arc<Db>,
    pub cache: Arc<crate::cache::Cache>,
    /// Asked, at submission, which outputs upstream caches have.
    pub substituters: Arc<crate::substituter::Substituters>,
    pub commands: mpsc::Sender<Command>,
    pub events: broadcast::Sender<Event>,
    /// Woken whenever a build log grows or is closed.
    pub log_written: Arc<tokio::sync::Notify>,
    pub state_dir: PathBuf,
    pub hooks: Arc<super::hooks::Hooks>,
    /// Per build (UUID): how many clients follow its log asking for it to be canceled if they
    /// all go (`log` with `cancel_if_left`).
    pub followers: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// How long a socket may keep taking connections after its coordinator died (see [`bind`]).
const STALE_HOLDER_WAIT: Duration = Duration::from_secs(3);

/// Bind the socket, replacing a stale one (nobody listening) but never a live coordinator's.
pub(super) fn bind(path: &Path) -> super::error::Result<UnixListener> {
    use super::error::IoPath as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    // A socket that takes connections is a live coordinator's, unless the process that held it
    // was just killed while starting a child: until that child's exec closes its copy of the
    // listener (close-on-exec), connections still queue. Such a holder goes within milliseconds.
    let deadline = std::time::Instant::now() + STALE_HOLDER_WAIT;
    while std::os::unix::net::UnixStream::connect(path).is_ok() {
        if std::time::Instant::now() >= deadline {
            return Err(super::Error::AlreadyRunning(path.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(path),
        _ => {}
    }
    let listener = UnixListener::bind(path).at(path)?;
    // Only the owner may talk to the coordinator.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).at(path)?;
    Ok(listener)
}

pub(super) async fn serve(server: Arc<Server>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let server = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = server.connection(stream).await {
                        tracing::debug!("client connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("accepting a client: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a request was not done: said to the client on one line.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// What the client asked for can't be done, and why.
    #[error("{0}")]
    Refused(String),
    #[error("the coordinator is stopping")]
    Stopping,
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    #[error(transparent)]
    Upload(#[from] super::upload::UploadError),
    #[error(transparent)]
    Check(#[from] super::submit::CheckError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

type Result<T> = std::result::Result<T, RequestError>;

type Out = BufWriter<tokio::net::unix::OwnedWriteHalf>;
type In = BufReader<tokio::net::unix::OwnedReadHalf>;

async fn send(out: &mut Out, reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    Ok(())
}

async fn send_now(out: &mut Out, reply: &Reply) -> Result<()> {
    send(out, reply).await?;
    out.flush().await?;
    Ok(())
}

impl Server {
    async fn connection(&self, stream: UnixStream) -> Result<()> {
        let (r, w) = stream.into_split();
        let mut out = BufWriter::new(w);
        send_now(
            &mut out,
            &Reply::Hello { protocol: api::CLIENT_PROTOCOL_VERSION, gbc_version: env!("CARGO_PKG_VERSION").into() },
        )
        .await?;
        let mut input = BufReader::new(r);
        let mut line = Vec::new();
        loop {
            let request = match read_request(&mut input, &mut line, &self.requests).await? {
                Incoming::End => return Ok(()),
                Incoming::Request(r) => r,
                Incoming::TooLong => {
                    send_now(&mut out, &Reply::Error { message: "request too long".into() }).await?;
                    return Ok(());
                }
                Incoming::Busy => {
                    send_now(&mut out, &Reply::Error { message: busy() }).await?;
                    return Ok(());
                }
                Incoming::Malformed(e) => {
                    send_now(&mut out, &Reply::Error { message: format!("malformed request: {e}") }).await?;
                    continue;
                }
            };
            // After a failed upload or NAR the stream may be mid-NAR: the connection ends with the
            // error (which a client reading a NAR sees as a NAR cut short).
            let fatal = matches!(
                request,
                Request::Submit { upload: true, .. }
                    | Request::AddPath { .. }
                    | Request::Uploaded
                    | Request::Nar { .. }
            );
            if let Err(e) = self.handle(request, &mut input, &mut out).await {
                send_now(&mut out, &Reply::Error { message: e.to_string() }).await?;
                if fatal {
                    return Ok(());
                }
            }
            out.flush().await?;
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| RequestError::Stopping)?;
        rx.await.map_err(|_| RequestError::Stopping)
    }

    async fn handle(&self, request: Request, input: &mut In, out: &mut Out) -> Result<()> {
        match request {
            Request::Submit {
                derivations,
                inputs,
                priority,
                tags,
                ignore_if_built,
                upload,
                substitutes,
                skip_substitutable,
            } => {
                let checked = tokio::task::spawn_blocking(move || super::submit::check(&derivations, &inputs)).await?;
                let checked = checked?;
                if upload {
                    self.uploads(&checked, input, out).await?;
                }
                let cache = self.cache.clone();
                let substituter = Some(self.substituters.get()).filter(|s| substitutes && !s.is_empty());
                let (checked, needed, unpublished, substitutable, skipped) = tokio::task::spawn_blocking(move || {
                    let mut checked = checked;
                    // Available: in the cache, or (asked a level at a time) upstream.
                    let mut upstream = BTreeSet::new();
                    let mut available = |paths: Vec<String>| {
                        let (have, lack): (Vec<String>, Vec<String>) = paths.into_iter().partition(|p| cache.has(p));
                        let mut have: BTreeSet<String> = have.into_iter().collect();
                        if let Some(s) = &substituter {
                            let found: Vec<String> = s.query(&lack).into_keys().collect();
                            upstream.extend(found.iter().cloned());
                            have.extend(found);
                        }
                        have
                    };
                    let mut skipped = Vec::new();
                    if skip_substitutable {
                        let requested: BTreeSet<&String> = checked.requested.iter().collect();
                        let asked: Vec<&crate::db::NewDerivation> =
                            checked.derivations.iter().filter(|d| requested.contains(&d.path)).collect();
                        let have = available(asked.iter().flat_map(|d| d.outputs.values().cloned()).collect());
                        skipped = asked
                            .into_iter()
                            .filter(|d| d.outputs.values().all(|o| have.contains(o)))
                            .map(|d| api::Available { drv: d.path.clone(), outputs: d.outputs.clone() })
                            .collect::<Vec<_>>();
                        checked.requested.retain(|r| !skipped.iter().any(|a| a.drv == *r));
                    }
                    let needed = checked.needed_in_rounds(&mut available);
                    let unpublished = checked
                        .derivations
                        .iter()
                        .filter(|d| d.outputs.values().any(|o| cache.store_dir().parse_path(o).is_err()))
                        .map(|d| d.path.clone())
                        .collect();
                    (checked, needed, unpublished, upstream.into_iter().collect::<Vec<String>>(), skipped)
                })
                .await?;
                let sub = Submission {
                    derivations: checked.derivations,
                    requested: checked.requested,
                    priority,
                    tags,
                    ignore_if_built,
                    now: api::now_ms(),
                    needed,
                    unpublished,
                    substitutable: substitutable.iter().cloned().collect(),
                };
                let (outcome, no_machine) = self.ask(|tx| Command::Submit(Box::new(sub), tx)).await??;
                let reply = Reply::Submitted {
                    builds: outcome.requested,
                    dependencies: outcome.dependencies,
                    no_machine,
                    substitutable,
                    available: skipped,
                };
                send(out, &reply).await
            }
            Request::Missing { paths } => {
                let cache = self.cache.clone();
                let paths = tokio::task::spawn_blocking(move || lacking(&cache, paths, |_| false)).await?;
                send(out, &Reply::Missing { paths }).await
            }
            Request::AddPath { .. } | Request::Uploaded => {
                Err(RequestError::Refused("add_path and uploaded come only after a submit with upload".into()))
            }
            Request::Watch { builds } => self.watch(builds, out).await,
            Request::Builds { state, tags, limit } => {
                let filter = ListFilter { state, tags, limit: limit.unwrap_or(50).min(100_000) };
                let builds = self.db.list(filter).await?.into_iter().map(super::wire::summary).collect();
                send(out, &Reply::Builds { builds }).await
            }
            Request::Show { build } => match self.db.show(&build).await?.map(super::wire::detail) {
                Some(mut detail) => {
                    if detail.summary.state == BuildState::Queued {
                        let (system, features) = (detail.system.clone(), detail.features.iter().cloned().collect());
                        detail.waiting_for_machine = self.ask(|tx| Command::NoMachine(system, features, tx)).await?;
                    }
                    send(out, &Reply::Build { build: Box::new(detail) }).await
                }
                None => Err(RequestError::Refused(format!("no build {build}"))),
            },
            Request::Log { build, attempt, follow, cancel_if_left } if follow && cancel_if_left => {
                self.follow_or_cancel(&build, attempt, input, out).await
            }
            Request::Log { build, attempt, follow, .. } => self.log(&build, attempt, follow, out).await,
            Request::Cancel { build } => {
                self.ask(|tx| Command::Cancel(build.clone(), tx))
                    .await?
                    .map_err(|e| RequestError::Refused(e.to_string()))?;
                send(out, &Reply::Canceled { build }).await
            }
            Request::Machines => {
                let machines = self.ask(Command::Machines).await?;
                send(out, &Reply::Machines { machines }).await
            }
            Request::Stats { reset } => {
                let stats = self.ask(|tx| Command::Stats(tx, reset)).await?;
                send(out, &Reply::Stats { stats }).await
            }
            Request::CacheGc { keep_since_ms } => {
                let roots = self.db.recent_paths(keep_since_ms).await?;
                let cache = self.cache.clone();
                let reply = match tokio::task::spawn_blocking(move || cache.gc(&roots)).await {
                    Ok(Ok(gc)) => Reply::CacheGc { gc },
                    Ok(Err(e)) => Reply::Error { message: format!("cache gc: {e}") },
                    Err(e) => Reply::Error { message: format!("cache gc: {e}") },
                };
                send(out, &reply).await
            }
            Request::Hooks => {
                let hooks = self.hooks.infos(&self.db).await?;
                send(out, &Reply::Hooks { hooks }).await
            }
            Request::Nar { path, guix_signature } => self.nar(&path, guix_signature, out).await,
            Request::HooksRetry { hook } => {
                let known = self.hooks.infos(&self.db).await?.iter().any(|h| h.name == hook);
                if !known {
                    return Err(RequestError::Refused(format!("no hook is called {hook:?}")));
                }
                let events = self.db.retry_given_up(hook.clone()).await?;
                send(out, &Reply::HooksRetried { hook, events }).await
            }
        }
    }

    /// A submission's uploads: say what the cache lacks, take what the client sends until it
    /// says `uploaded`, and publish it all.
    async fn uploads(&self, checked: &Checked, input: &mut In, out: &mut Out) -> Result<()> {
        let wanted = {
            let cache = self.cache.clone();
            tokio::task::block_in_place(|| super::upload::wanted(&cache, checked))
        };
        send_now(out, &Reply::Wanted { paths: wanted }).await?;
        let mut uploads = Uploads::new(self.cache.clone(), checked);
        let mut line = Vec::new();
        loop {
            let request = match read_request(input, &mut line, &self.requests).await? {
                Incoming::Request(r) => r,
                Incoming::End => {
                    return Err(RequestError::Refused("the client left before it finished uploading".into()));
                }
                Incoming::TooLong => return Err(RequestError::Refused("request too long".into())),
                Incoming::Busy => return Err(RequestError::Refused(busy())),
                Incoming::Malformed(e) => return Err(RequestError::Refused(format!("malformed request: {e}"))),
            };
            match request {
                Request::Missing { paths } => {
                    let (cache, up) = (self.cache.clone(), &uploads);
                    let paths = tokio::task::block_in_place(|| lacking(&cache, paths, |p| up.has(p)));
                    send_now(out, &Reply::Missing { paths }).await?;
                }
                Request::AddPath { path, references, nar_size } => {
                    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
                    let p = path.clone();
                    let adding = tokio::task::spawn_blocking(move || {
                        let r = uploads.add(&p, references, ChunkReader::new(rx));
                        (uploads, r)
                    });
                    let read = forward(input, nar_size, tx).await;
                    let (u, added) = adding.await?;
                    uploads = u;
                    read.map_err(|e| RequestError::Refused(format!("reading the NAR of {path}: {e}")))?;
                    added?;
                    send_now(out, &Reply::Added { path }).await?;
                }
                Request::Uploaded => break,
                _ => {
                    return Err(RequestError::Refused(
                        "expected add_path, missing or uploaded while uploading for a submission".into(),
                    ));
                }
            }
        }
        tokio::task::spawn_blocking(move || uploads.publish()).await??;
        Ok(())
    }

    /// Stream the events of `uuids` (of every build, when empty) until they have all ended: first
    /// where each stands, then each change.
    async fn watch(&self, uuids: Vec<String>, out: &mut Out) -> Result<()> {
        // Subscribe before looking, so no change falls between the two.
        let mut rx = self.events.subscribe();
        let all = uuids.is_empty();
        let briefs = if all { self.db.active().await? } else { self.db.briefs(uuids.clone()).await? };
        if !all && briefs.len() < uuids.len() {
            let unknown: Vec<&String> = uuids.iter().filter(|u| !briefs.iter().any(|b| &b.uuid == *u)).collect();
            let list: Vec<&str> = unknown.iter().map(|u| u.as_str()).collect();
            return Err(RequestError::Refused(format!("no build {}", list.join(", "))));
        }
        let mut pending: std::collections::HashSet<String> = std::collections::HashSet::new();
        for b in &briefs {
            send(out, &snapshot(b)).await?;
            if !b.state.is_terminal() {
                pending.insert(b.uuid.clone());
            }
        }
        out.flush().await?;
        while !pending.is_empty() {
            match rx.recv().await {
                Ok(ev) => {
                    let watched = pending.contains(&ev.build) || (all && ev.state == BuildState::Queued);
                    if !watched {
                        continue;
                    }
                    if ev.state.is_terminal() {
                        pending.remove(&ev.build);
                    } else {
                        pending.insert(ev.build.clone());
                    }
                    send(out, &Reply::Event { event: ev }).await?;
                    if rx.is_empty() {
                        out.flush().await?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow to keep up: look again at where the pending builds stand.
                    let briefs = self.db.briefs(pending.iter().cloned().collect()).await?;
                    for b in &briefs {
                        send(out, &snapshot(b)).await?;
                        if b.state.is_terminal() {
                            pending.remove(&b.uuid);
                        }
                    }
                    out.flush().await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(RequestError::Stopping),
            }
        }
        send(out, &Reply::End).await
    }

    /// A cached path's NAR, uncompressed, after its metadata; with `guix_signature`, then the
    /// Guix signature of the export item it makes.
    async fn nar(&self, path: &str, guix_signature: bool, out: &mut Out) -> Result<()> {
        let info = tokio::task::block_in_place(|| self.cache.narinfo(path))?;
        let Some(info) = info else {
            return Err(RequestError::Refused(format!("{path} is not in the binary cache")));
        };
        let no_key = || {
            RequestError::Refused("this coordinator signs nothing for Guix (its cache is not /gnu/store: start it with --guix-signatures)".into())
        };
        if guix_signature && !self.cache.has_guix_key() {
            return Err(no_key());
        }
        let store = self.cache.store_dir();
        let mut nar = tokio::task::block_in_place(|| self.cache.open_nar(&info))?;
        let references: Vec<String> = info.references.iter().map(|r| store.display(r)).collect();
        let deriver = info.deriver.as_ref().map(|d| store.display(d));
        send(
            out,
            &Reply::Nar {
                path: path.to_owned(),
                nar_hash: info.nar_hash.to_nix32_string(),
                nar_size: info.nar_size,
                references: references.clone(),
                deriver: deriver.clone(),
            },
        )
        .await?;
        // What is signed is what was sent: the NAR's bytes as read, then the item's metadata.
        let mut item = guix_signature.then(crate::formats::hash::HashSink::new);
        let mut left = info.nar_size;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = tokio::task::block_in_place(|| std::io::Read::read(&mut nar, &mut buf[..want]))?;
            if n == 0 {
                // The client sees the connection end before the size it was told: it fails.
                return Err(RequestError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{path}: the cache's NAR is shorter than its narinfo says"),
                )));
            }
            if let Some(h) = item.as_mut() {
                std::io::Write::write_all(h, &buf[..n])?;
            }
            out.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        if let Some(mut h) = item {
            crate::formats::nix_wire::write_export_meta(&mut h, path, &references, deriver.as_deref().unwrap_or(""))?;
            let hash: [u8; 32] = h
                .finish()
                .0
                .digest()
                .try_into()
                .map_err(|_| RequestError::Io(std::io::Error::other("the export item's hash is not 32 bytes")))?;
            let signature = self.cache.guix_export_signature(&hash).ok_or_else(no_key)?;
            send(out, &Reply::ExportSignature { signature }).await?;
        }
        Ok(())
    }

    /// Follow a build's log; if the client goes first (its connection ends) and no other client
    /// following the build this way is left, cancel the build.
    async fn follow_or_cancel(&self, uuid: &str, attempt: Option<u32>, input: &mut In, out: &mut Out) -> Result<()> {
        let count = |delta: isize| -> usize {
            let mut f = self.followers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = f.entry(uuid.to_owned()).or_default();
            *n = n.saturating_add_signed(delta);
            let left = *n;
            if left == 0 {
                f.remove(uuid);
            }
            left
        };
        count(1);
        // The client sends nothing more while it follows: what it sends is read and dropped, and
        // its end is the end of its connection.
        let left = async {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(input, &mut sink).await;
        };
        let followed = tokio::select! {
            r = self.log(uuid, attempt, true, out) => Some(r),
            () = left => None,
        };
        let others = count(-1);
        match followed {
            Some(r) => r,
            None => {
                if others == 0 {
                    match self.ask(|tx| Command::Cancel(uuid.to_owned(), tx)).await? {
                        Ok(()) => tracing::info!("canceled build {uuid}: the build hook following it went"),
                        // Ended meanwhile: nothing to cancel.
                        Err(e) => tracing::debug!("build {uuid}, whose follower went: {e}"),
                    }
                }
                Ok(())
            }
        }
    }

    /// Send a build's log; with `follow`, keep sending until the build ends.
    async fn log(&self, uuid: &str, attempt: Option<u32>, follow: bool, out: &mut Out) -> Result<()> {
        let Some(detail) = self.db.show(uuid).await? else {
            return Err(RequestError::Refused(format!("no build {uuid}")));
        };
        let mut n = match attempt {
            Some(n) => {
                if !detail.attempts.iter().any(|a| a.n == n) {
                    return Err(RequestError::Refused(format!("build {uuid} has no attempt {n}")));
                }
                n
            }
            None => detail.attempts.last().map_or(0, |a| a.n),
        };
        // Following is driven by what happens, not by polling: the drivers' log threads wake
        // `log_written` after each piece, the core's events say when an attempt or the build ends.
        let mut events = self.events.subscribe();
        let mut offset = 0u64;
        loop {
            if n > 0 {
                loop {
                    let written = self.log_written.notified();
                    tokio::pin!(written);
                    // Registered before reading, so a piece written meanwhile still wakes us.
                    written.as_mut().enable();
                    let (stored, chunk) =
                        tokio::task::block_in_place(|| logs::find_and_read(&self.state_dir, uuid, n, offset, 1 << 20))?;
                    let done = !matches!(stored, logs::Stored::Plain(_));
                    if !chunk.is_empty() {
                        send(out, &Reply::Log { bytes: chunk.len() as u64 }).await?;
                        out.write_all(&chunk).await?;
                        offset += chunk.len() as u64;
                        continue;
                    }
                    if done || !follow {
                        break;
                    }
                    out.flush().await?;
                    // The log may also have been compressed between `find` and the read; a
                    // minute's wait at most covers a wake-up missed for any other reason.
                    let _ = tokio::time::timeout(Duration::from_secs(60), written).await;
                }
            }
            if !follow || attempt.is_some() {
                break;
            }
            // The attempt is over (or its log not begun): the build has ended, or a new attempt
            // starts (or will), or the log begins.
            let written = self.log_written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let Some(now) = self.db.show(uuid).await? else { break };
            let latest = now.attempts.last().map_or(0, |a| a.n);
            if latest > n {
                n = latest;
                offset = 0;
                continue;
            }
            if now.build.state.is_terminal() {
                break;
            }
            out.flush().await?;
            let deadline = tokio::time::sleep(Duration::from_secs(60));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.build != uuid => continue,
                        Err(broadcast::error::RecvError::Closed) => return Err(RequestError::Stopping),
                        _ => break,
                    },
                    () = &mut written => break,
                    () = &mut deadline => break,
                }
            }
        }
        send(out, &Reply::End).await
    }
}

/// What the next line from a client holds.
enum Incoming {
    Request(Request),
    /// The client closed the connection.
    End,
    TooLong,
    /// Other connections' requests take all the memory requests may have.
    Busy,
    Malformed(serde_json::Error),
}

/// Request lines are read this much at a time; past the first piece, each takes a share of the
/// memory all connections' requests may use together ([`REQUEST_MEMORY`]).
pub(super) const REQUEST_PIECE: usize = 1 << 20;
/// What the request lines being read may take together: one request of the largest size and then
/// some. A connection whose line finds none left gets an error rather than waiting, so that lines
/// growing side by side can never wait for each other.
pub(super) const REQUEST_MEMORY: usize = api::MAX_REQUEST + (64 << 20);

async fn read_request(input: &mut In, line: &mut Vec<u8>, budget: &Semaphore) -> std::io::Result<Incoming> {
    line.clear();
    // What a large request took goes back once it is handled.
    line.shrink_to(REQUEST_PIECE);
    let mut shares = Vec::new();
    loop {
        if !line.is_empty() {
            match budget.try_acquire() {
                Ok(share) => shares.push(share),
                Err(_) => return Ok(Incoming::Busy),
            }
        }
        let n = (&mut *input).take(REQUEST_PIECE as u64).read_until(b'\n', line).await?;
        if n == 0 && line.is_empty() {
            return Ok(Incoming::End);
        }
        if line.len() > api::MAX_REQUEST {
            return Ok(Incoming::TooLong);
        }
        if n < REQUEST_PIECE || line.ends_with(b"\n") {
            break;
        }
    }
    Ok(serde_json::from_slice(line).map_or_else(Incoming::Malformed, Incoming::Request))
}

/// Of `paths`, those the cache lacks and `have` does not cover, in the order given.
fn lacking(cache: &crate::cache::Cache, paths: Vec<String>, have: impl Fn(&str) -> bool) -> Vec<String> {
    paths.into_iter().filter(|p| !cache.has(p) && !have(p)).collect()
}

/// Read exactly `n` bytes from `input` into `tx` in chunks; once the receiver is gone (it found
/// the NAR bad), the rest is read and dropped, so the stream stays in step.
async fn forward(input: &mut In, n: u64, tx: mpsc::Sender<Vec<u8>>) -> std::io::Result<()> {
    let mut tx = Some(tx);
    let mut left = n;
    while left > 0 {
        let mut chunk = vec![0u8; left.min(1 << 20) as usize];
        input.read_exact(&mut chunk).await?;
        left -= chunk.len() as u64;
        if let Some(t) = &tx
            && t.send(chunk).await.is_err()
        {
            tx = None;
        }
    }
    Ok(())
}

fn snapshot(b: &BuildBrief) -> Reply {
    Reply::Event {
        event: Event {
            build: b.uuid.clone(),
            drv: b.drv.clone(),
            state: b.state,
            at_ms: api::now_ms(),
            machine: b.machine.clone(),
            reason: b.reason.clone(),
            retry: false,
            snapshot: true,
        },
    }
}
