//! The client socket: line-delimited JSON requests ([`crate::api`]), one task per connection.
//! Reads go straight to the database's read connection; changes go through the core. A bad request
//! gets an `error` reply and the connection (and the coordinator) go on.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::Command;
use super::logs;
use crate::api::{self, BuildState, Event, Reply, Request};
use crate::db::{BuildBrief, Db, ListFilter, Submission};

pub(super) struct Server {
    pub db: Arc<Db>,
    pub cache: Arc<crate::cache::Cache>,
    pub commands: mpsc::Sender<Command>,
    pub events: broadcast::Sender<Event>,
    pub state_dir: PathBuf,
}

/// Bind the socket, replacing a stale one (nobody listening) but never a live coordinator's.
pub(super) fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{}: another coordinator is already listening there", path.display());
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(anyhow::Error::new(e).context(format!("{}", path.display())));
        }
        _ => {}
    }
    let listener = UnixListener::bind(path).with_context(|| format!("{}", path.display()))?;
    // Only the owner may talk to the coordinator.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{}", path.display()))?;
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

type Out = BufWriter<tokio::net::unix::OwnedWriteHalf>;

async fn send(out: &mut Out, reply: &Reply) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    Ok(())
}

async fn send_now(out: &mut Out, reply: &Reply) -> anyhow::Result<()> {
    send(out, reply).await?;
    out.flush().await?;
    Ok(())
}

impl Server {
    async fn connection(&self, stream: UnixStream) -> anyhow::Result<()> {
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
            line.clear();
            let n = (&mut input).take(api::MAX_REQUEST as u64 + 1).read_until(b'\n', &mut line).await?;
            if n == 0 {
                return Ok(());
            }
            if line.len() > api::MAX_REQUEST {
                send_now(&mut out, &Reply::Error { message: "request too long".into() }).await?;
                return Ok(());
            }
            let request: Request = match serde_json::from_slice(&line) {
                Ok(r) => r,
                Err(e) => {
                    send_now(&mut out, &Reply::Error { message: format!("malformed request: {e}") }).await?;
                    continue;
                }
            };
            if let Err(e) = self.handle(request, &mut out).await {
                send_now(&mut out, &Reply::Error { message: format!("{e:#}") }).await?;
            }
            out.flush().await?;
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| anyhow::anyhow!("the coordinator is stopping"))?;
        rx.await.map_err(|_| anyhow::anyhow!("the coordinator is stopping"))
    }

    async fn handle(&self, request: Request, out: &mut Out) -> anyhow::Result<()> {
        match request {
            Request::Submit { derivations, inputs, priority, tags, ignore_if_built } => {
                let checked = tokio::task::spawn_blocking(move || super::submit::check(&derivations, &inputs)).await?;
                let checked = checked.map_err(anyhow::Error::msg)?;
                let sub = Submission {
                    derivations: checked.derivations,
                    requested: checked.requested,
                    priority,
                    tags,
                    ignore_if_built,
                    now: api::now_ms(),
                };
                let outcome = self.ask(|tx| Command::Submit(Box::new(sub), tx)).await??;
                send(out, &Reply::Submitted { builds: outcome.requested, dependencies: outcome.dependencies }).await
            }
            Request::Watch { builds } => self.watch(builds, out).await,
            Request::Builds { state, tags, limit } => {
                let filter = ListFilter { state, tags, limit: limit.unwrap_or(50).min(100_000) };
                send(out, &Reply::Builds { builds: self.db.list(filter).await? }).await
            }
            Request::Show { build } => match self.db.show(&build).await? {
                Some(detail) => send(out, &Reply::Build { build: Box::new(detail) }).await,
                None => anyhow::bail!("no build {build}"),
            },
            Request::Log { build, attempt, follow } => self.log(&build, attempt, follow, out).await,
            Request::Cancel { build } => {
                self.ask(|tx| Command::Cancel(build.clone(), tx)).await?.map_err(anyhow::Error::msg)?;
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
        }
    }

    /// Stream the events of `uuids` (of every build, when empty) until they have all ended: first
    /// where each stands, then each change.
    async fn watch(&self, uuids: Vec<String>, out: &mut Out) -> anyhow::Result<()> {
        // Subscribe before looking, so no change falls between the two.
        let mut rx = self.events.subscribe();
        let all = uuids.is_empty();
        let briefs = if all { self.db.active().await? } else { self.db.briefs(uuids.clone()).await? };
        if !all && briefs.len() < uuids.len() {
            let unknown: Vec<&String> = uuids.iter().filter(|u| !briefs.iter().any(|b| &b.uuid == *u)).collect();
            let list: Vec<&str> = unknown.iter().map(|u| u.as_str()).collect();
            anyhow::bail!("no build {}", list.join(", "));
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
                Err(broadcast::error::RecvError::Closed) => anyhow::bail!("the coordinator is stopping"),
            }
        }
        send(out, &Reply::End).await
    }

    /// Send a build's log; with `follow`, keep sending until the build ends.
    async fn log(&self, uuid: &str, attempt: Option<u32>, follow: bool, out: &mut Out) -> anyhow::Result<()> {
        let Some(detail) = self.db.show(uuid).await? else { anyhow::bail!("no build {uuid}") };
        let mut n = match attempt {
            Some(n) => {
                if !detail.attempt_list.iter().any(|a| a.n == n) {
                    anyhow::bail!("build {uuid} has no attempt {n}");
                }
                n
            }
            None => detail.attempt_list.last().map_or(0, |a| a.n),
        };
        let mut offset = 0u64;
        loop {
            if n > 0 {
                loop {
                    let stored = logs::find(&self.state_dir, uuid, n);
                    let done = !matches!(stored, logs::Stored::Plain(_));
                    let chunk = tokio::task::block_in_place(|| logs::read_from(&stored, offset, 1 << 20))?;
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
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if !follow || attempt.is_some() {
                break;
            }
            // The attempt is over: the build has ended, or a new attempt starts (or will).
            let Some(now) = self.db.show(uuid).await? else { break };
            let latest = now.attempt_list.last().map_or(0, |a| a.n);
            if latest > n {
                n = latest;
                offset = 0;
                continue;
            }
            if now.summary.state.is_terminal() {
                break;
            }
            out.flush().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        send(out, &Reply::End).await
    }
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
