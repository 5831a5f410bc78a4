//! `gbc coordinator --http ADDR:PORT`: the binary cache over HTTP (`/nix-cache-info`,
//! `/<hash>.narinfo`, `/nar/<file>`, with HEAD and ranges), Prometheus metrics (`/metrics`), and
//! a small read-only status page (`/`). The only module that touches axum.
//!
//! Requests name files only through patterns checked here (a nix32 hash, a known extension), so no
//! request reaches outside the cache; error responses say only "not found" or "internal error"
//! (details go to the log), never a path or an OS error.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tower::ServiceExt as _;

use super::Command;
use crate::api::{BuildState, MachineInfo, Stats, now_ms};
use crate::db::{Db, ListFilter};

/// Bounds on what HTTP clients can take, however many there are and however they behave: a
/// request's header must arrive in time, a connection on which nothing moves is closed, no more
/// than so many connections are served at once (the rest wait in the kernel's backlog, holding no
/// file descriptor of ours), and NAR bytes read ahead for all clients together are bounded.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Bytes.
    pub read_ahead: usize,
}

impl HttpLimits {
    pub const DEFAULT_READ_AHEAD: usize = 64 << 20;
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
            read_ahead: HttpLimits::DEFAULT_READ_AHEAD,
        }
    }
}

/// File descriptors kept for everything but HTTP connections: the client socket and its
/// connections, the database, machines, logs, builds.
const FD_RESERVE: u64 = 256;

/// The unit of read-ahead accounting.
const KIB: usize = 1024;

pub(super) struct Http {
    cache: PathBuf,
    /// The cache's store dir: its paths may appear in what the status page shows.
    store_dir: String,
    db: Arc<Db>,
    commands: mpsc::Sender<Command>,
    limits: HttpLimits,
    /// Read-ahead in KiB, shared by all connections.
    read_ahead: Arc<Semaphore>,
    substituters: Arc<crate::substituter::Substituters>,
    hooks: Arc<super::hooks::Hooks>,
}

impl Http {
    pub(super) fn new(
        cache: PathBuf,
        store_dir: String,
        db: Arc<Db>,
        commands: mpsc::Sender<Command>,
        limits: HttpLimits,
        substituters: Arc<crate::substituter::Substituters>,
        hooks: Arc<super::hooks::Hooks>,
    ) -> Http {
        let read_ahead = Arc::new(Semaphore::new(limits.read_ahead.div_ceil(KIB).max(1)));
        Http { cache, store_dir, db, commands, limits, read_ahead, substituters, hooks }
    }
}

/// Serve HTTP on `listener` until the task is dropped.
pub(super) async fn serve(http: Arc<Http>, listener: tokio::net::TcpListener) {
    let limits = http.limits;
    let max_connections = limits.max_connections.min(connection_room());
    if max_connections < limits.max_connections {
        tracing::warn!(
            "serving at most {max_connections} HTTP connections at once (not {}): the file descriptor limit leaves no more room",
            limits.max_connections
        );
    }
    let app = Router::new()
        .route("/", get(status))
        .route("/nix-cache-info", get(cache_info))
        .route("/metrics", get(metrics))
        .route("/nar/{file}", get(nar))
        .route("/{file}", get(narinfo))
        .fallback(|| async { not_found() })
        .with_state(http);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        // A slot first: past the cap, connections wait in the backlog, not in our descriptors.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("HTTP: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let progress = Arc::new(Progress::new());
            let io = hyper_util::rt::TokioIo::new(Watched { inner: stream, progress: progress.clone() });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let connection = builder.serve_connection(io, service);
            tokio::select! {
                r = connection => if let Err(e) = r {
                    tracing::debug!("HTTP connection: {e}");
                },
                () = progress.stalled(limits.idle_timeout) => tracing::debug!("HTTP connection idle: closed"),
            }
            drop(slot);
        });
    }
}

/// How many HTTP connections the file descriptor limit has room for, after raising the soft
/// limit to the hard one and keeping [`FD_RESERVE`] for the rest.
fn connection_room() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    // Each connection takes one descriptor, and a NAR being read one more.
    let fds = limit.current.unwrap_or(u64::MAX);
    usize::try_from(fds.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX).max(1)
}

/// When bytes last moved on a connection.
struct Progress {
    start: std::time::Instant,
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Progress {
        Progress { start: std::time::Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `idle`.
    async fn stalled(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if std::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A connection's stream, noting every read and write that moves bytes.
struct Watched {
    inner: tokio::net::TcpStream,
    progress: Arc<Progress>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.touch();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.progress.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.progress.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!("HTTP {what}: {e}");
    (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
}

/// A small text file of the cache, with its content type.
async fn small_file(path: PathBuf, content_type: &'static str) -> Response {
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], bytes).into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => not_found(),
        Err(e) => internal(&path.display().to_string(), e),
    }
}

async fn cache_info(State(http): State<Arc<Http>>) -> Response {
    small_file(http.cache.join("nix-cache-info"), "text/x-nix-cache-info").await
}

fn is_nix32(s: &str, len: usize) -> bool {
    s.len() == len && crate::formats::nix32::decode(s).is_ok()
}

async fn narinfo(State(http): State<Arc<Http>>, Path(file): Path<String>) -> Response {
    match file.strip_suffix(".narinfo") {
        Some(hash) if is_nix32(hash, 32) => small_file(http.cache.join(file), "text/x-nix-narinfo").await,
        _ => not_found(),
    }
}

async fn nar(State(http): State<Arc<Http>>, Path(file): Path<String>, request: Request) -> Response {
    let hash = crate::cache::Compression::ALL.iter().find_map(|c| file.strip_suffix(c.extension()));
    if !hash.is_some_and(|h| is_nix32(h, 52)) {
        return not_found();
    }
    let path = http.cache.join("nar").join(&file);
    let plain = request.method() == axum::http::Method::GET
        && !request.headers().contains_key(header::RANGE)
        && !request.headers().contains_key(header::IF_RANGE);
    if plain {
        return whole_file(path, http.read_ahead.clone()).await;
    }
    let mime: mime::Mime = match "application/x-nix-nar".parse() {
        Ok(m) => m,
        Err(e) => return internal("mime", e),
    };
    // HEAD, ranges and conditional requests: ServeFile (its errors carry no details). Its reads go
    // through tokio's blocking pool one at a time; 1 MiB ones cost less in hand-offs than 64 KiB.
    let service = tower_http::services::ServeFile::new_with_mime(path, &mime).with_buf_chunk_size(1 << 20);
    match service.oneshot(request).await {
        Ok(r) => r.into_response(),
        Err(e) => internal("serving a NAR", e),
    }
}

/// A whole NAR, the common case (what Nix asks for): a small one read at once, a large one read
/// ahead on a blocking thread in 1 MiB pieces; either way the bytes go to the socket without
/// another copy. Every piece read holds its share of the read-ahead shared by all connections until
/// the connection asks for the piece after it (so what waits in a slow client's connection counts
/// too): however many clients stop reading, the NAR bytes in memory stay bounded.
async fn whole_file(path: PathBuf, read_ahead: Arc<Semaphore>) -> Response {
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return not_found(),
        Err(e) => return internal(&path.display().to_string(), e),
    };
    let len = match file.metadata() {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return not_found(),
        Err(e) => return internal(&path.display().to_string(), e),
    };
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/x-nix-nar")),
        (header::CONTENT_LENGTH, HeaderValue::from(len)),
        (header::ACCEPT_RANGES, HeaderValue::from_static("bytes")),
    ];
    type Piece = (bytes::Bytes, tokio::sync::OwnedSemaphorePermit);
    let (tx, rx) = mpsc::channel::<std::io::Result<Piece>>(4);
    // Most NARs are small: one read, one piece.
    let piece = if len <= 8 << 20 { len as usize } else { 1 << 20 };
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        let permits = |n: usize| {
            let n = u32::try_from(n.div_ceil(KIB)).unwrap_or(u32::MAX);
            runtime.block_on(read_ahead.clone().acquire_many_owned(n)).ok()
        };
        // Each piece's share is taken before it is read.
        let mut left = len;
        while left > 0
            && let Some(permit) = permits(piece)
        {
            let mut chunk = Vec::with_capacity(piece);
            match std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, piece as u64), &mut chunk) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(std::io::Error::other("the file changed size")));
                    break;
                }
                Ok(n) => {
                    left = left.saturating_sub(n as u64);
                    if tx.blocking_send(Ok((bytes::Bytes::from(chunk), permit))).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    // The piece before is released only when the next is asked for.
    let stream = futures_util::stream::unfold((rx, None), |(mut rx, _previous)| async move {
        match rx.recv().await? {
            Ok((bytes, permit)) => Some((Ok(bytes), (rx, Some(permit)))),
            Err(e) => Some((Err(e), (rx, None))),
        }
    });
    (headers, axum::body::Body::from_stream(stream)).into_response()
}

/// The core's view: machines and counters.
async fn snapshot(http: &Http) -> Option<(Vec<MachineInfo>, Stats)> {
    let (mtx, mrx) = oneshot::channel();
    let (stx, srx) = oneshot::channel();
    http.commands.send(Command::Machines(mtx)).await.ok()?;
    http.commands.send(Command::Stats(stx, false)).await.ok()?;
    Some((mrx.await.ok()?, srx.await.ok()?))
}

async fn metrics(State(http): State<Arc<Http>>) -> Response {
    let Some((machines, stats)) = snapshot(&http).await else { return internal("metrics", "the core stopped") };
    let (counts, oldest) = match http.db.census().await {
        Ok(c) => c,
        Err(e) => return internal("metrics", e),
    };
    let mut registry = Registry::with_prefix("gbc");
    let builds = Family::<Vec<(String, String)>, Gauge>::default();
    for (state, n) in counts {
        builds.get_or_create(&vec![("state".into(), state.as_str().into())]).set(n as i64);
    }
    registry.register("builds", "Builds by state", builds);
    let running = Family::<Vec<(String, String)>, Gauge>::default();
    let up = Family::<Vec<(String, String)>, Gauge>::default();
    for m in &machines {
        let label = vec![("machine".to_owned(), m.name.clone())];
        running.get_or_create(&label).set(m.running.len() as i64);
        up.get_or_create(&label).set(i64::from(m.state == "up"));
    }
    registry.register("machine_running_builds", "Builds running on each machine", running);
    registry.register("machine_up", "Whether each machine is connected (1) or not (0)", up);
    let counter = |n: u64| {
        let c: Counter = Counter::default();
        c.inc_by(n);
        c
    };
    registry.register("allocations", "Attempts started since the coordinator started", counter(stats.allocations));
    registry.register("retries", "Attempts retried since the coordinator started", counter(stats.retries));
    registry.register(
        "received_bytes",
        "NAR bytes of outputs accepted since the coordinator started",
        counter(stats.bytes_received),
    );
    registry.register(
        "sent_bytes",
        "NAR bytes of inputs sent from the cache to build hosts since the coordinator started",
        counter(stats.bytes_sent),
    );
    let age = Gauge::<i64>::default();
    age.set(oldest.map_or(0, |t| (now_ms() - t).max(0) / 1000));
    registry.register("oldest_queued_age_seconds", "Age of the oldest queued build", age);
    let substituter = http.substituters.get();
    let asked = Family::<Vec<(String, String)>, Gauge>::default();
    for (url, ok) in substituter.health() {
        asked.get_or_create(&vec![("url".to_owned(), url)]).set(i64::from(ok));
    }
    registry.register(
        "substituter_up",
        "Whether each substituter is asked (0 while it is backed off after a failure, or serves another store dir)",
        asked,
    );
    let s = &substituter.stats;
    let load = |c: &std::sync::atomic::AtomicU64| counter(c.load(std::sync::atomic::Ordering::Relaxed));
    registry.register("substituter_lookups", "Narinfos asked of substituters", load(&s.lookups));
    registry.register("substituter_hits", "Narinfos found upstream and accepted", load(&s.hits));
    registry.register(
        "substituter_refused",
        "Upstream narinfos refused (signature, store path, compression)",
        load(&s.refused),
    );
    registry.register("substituter_failures", "Substituter requests that failed (then backed off)", load(&s.failures));
    registry.register(
        "substituter_fetched_bytes",
        "Compressed NAR bytes downloaded from substituters",
        load(&s.fetched_bytes),
    );
    match http.hooks.infos(&http.db).await {
        Ok(infos) => {
            let stats = http.hooks.stats();
            let gauge = || Family::<Vec<(String, String)>, Gauge>::default();
            let count = || Family::<Vec<(String, String)>, Counter>::default();
            let (backlog, given_up, runs, failures, latency, delivered) =
                (gauge(), gauge(), count(), count(), count(), count());
            for h in &infos {
                let label = vec![("hook".to_owned(), h.name.clone())];
                backlog.get_or_create(&label).set(h.backlog as i64);
                given_up.get_or_create(&label).set(h.given_up as i64);
                runs.get_or_create(&label).inc_by(h.runs);
                failures.get_or_create(&label).inc_by(h.failures);
                let s = stats.get(&h.name).cloned().unwrap_or_default();
                latency.get_or_create(&label).inc_by(s.latency_ms_sum);
                delivered.get_or_create(&label).inc_by(s.delivered);
            }
            registry.register(
                "hook_backlog",
                "Events waiting for each hook (running and backing off included)",
                backlog,
            );
            registry.register(
                "hook_given_up",
                "Events each hook gave up on (gbc hooks retry runs them again)",
                given_up,
            );
            registry.register("hook_runs", "Runs of each hook since the coordinator started", runs);
            registry.register("hook_failures", "Runs of each hook that failed (then retried or given up)", failures);
            registry.register("hook_delivered", "Events each hook took since the coordinator started", delivered);
            registry.register(
                "hook_latency_milliseconds",
                "Summed time from each delivered event to its delivery (divide by gbc_hook_delivered)",
                latency,
            );
        }
        Err(e) => tracing::error!("metrics: reading the hooks' backlogs: {e}"),
    }
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &registry) {
        return internal("metrics", e);
    }
    let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, HeaderValue::from_static(ct))], text).into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A failure reason fit for the world: paths on the coordinator's or a build host's file system
/// (its state dir, a temporary file) become `[path]`; store paths (in `store_dirs`) stay, they
/// are what the reason is about. Only local clients of the socket see reasons whole.
fn public_reason(reason: &str, store_dirs: &[&str]) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(start) = rest.find('/') {
        // A path starts at a '/' that begins a word.
        let starts_word = rest[..start].chars().next_back().is_none_or(|c| c.is_whitespace() || "\"'(=[,".contains(c));
        if !starts_word {
            out.push_str(&rest[..=start]);
            rest = &rest[start + 1..];
            continue;
        }
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let mut end = tail.find(|c: char| c.is_whitespace() || "\"'),;]".contains(c)).unwrap_or(tail.len());
        // A path followed by ':' (as errors print them) ends there.
        if let Some(colon) = tail[..end].find(':') {
            end = colon;
        }
        let path = &tail[..end];
        let in_store = store_dirs.iter().any(|d| {
            path.strip_prefix(d)
                .and_then(|p| p.strip_prefix('/'))
                .is_some_and(|base| base.len() > 33 && base.as_bytes()[32] == b'-' && is_nix32(&base[..32], 32))
        });
        out.push_str(if in_store { path } else { "[path]" });
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

async fn status(State(http): State<Arc<Http>>) -> Response {
    let Some((machines, stats)) = snapshot(&http).await else { return internal("status", "the core stopped") };
    let recent = match http.db.list(ListFilter { state: None, tags: Vec::new(), limit: 50 }).await {
        Ok(r) => r,
        Err(e) => return internal("status", e),
    };
    let store_dirs = [http.store_dir.as_str(), "/nix/store", "/gnu/store"];
    let mut page = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>gbc</title></head><body>\n<h1>gbc coordinator</h1>\n",
    );
    let _ = writeln!(page, "<p>{} queued, {} running.</p>", stats.queued, stats.running);
    page.push_str("<h2>Machines</h2>\n<table>\n<tr><th>name</th><th>state</th><th>running</th><th>load</th><th>systems</th></tr>\n");
    for m in &machines {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td></tr>",
            escape(&m.name),
            escape(&m.state),
            m.running.len(),
            m.parallel_builds,
            m.load1.map(|l| format!("{l:.2}")).unwrap_or_default(),
            escape(&m.systems.join(" ")),
        );
    }
    page.push_str(
        "</table>\n<h2>Recent builds</h2>\n<table>\n<tr><th>build</th><th>derivation</th><th>state</th></tr>\n",
    );
    for b in &recent {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&b.uuid),
            escape(&b.drv),
            if b.state == BuildState::Failed {
                format!("failed: {}", escape(&public_reason(b.reason.as_deref().unwrap_or(""), &store_dirs)))
            } else {
                b.state.as_str().to_owned()
            },
        );
    }
    page.push_str("</table>\n</body></html>\n");
    Html(page).into_response()
}

#[cfg(test)]
mod tests {
    use super::public_reason;

    #[test]
    fn public_reasons_keep_store_paths_and_hide_host_paths() {
        let dirs = ["/gnu/store", "/nix/store"];
        let out = "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a";
        let cases = [
            (
                format!(
                    "the cache's disk is full: could not store the NAR of {out}: /var/lib/gbc/cache/.tmp/ab.nar: No space left on device (os error 28)"
                ),
                format!(
                    "the cache's disk is full: could not store the NAR of {out}: [path]: No space left on device (os error 28)"
                ),
            ),
            (
                format!("{out}/fifo: outputs may hold only files, directories and symlinks"),
                format!("{out}/fifo: outputs may hold only files, directories and symlinks"),
            ),
            (
                "/srv/gbc/machines/localhost/agent/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a/x: EIO".to_owned(),
                "[path]: EIO".to_owned(),
            ),
            (
                "builder exited with status 1 (a/b and 1/2 are no paths)".to_owned(),
                "builder exited with status 1 (a/b and 1/2 are no paths)".to_owned(),
            ),
            (
                "starting the builder '/opt/x/y': missing".to_owned(),
                "starting the builder '[path]': missing".to_owned(),
            ),
        ];
        for (reason, public) in cases {
            assert_eq!(public_reason(&reason, &dirs), public);
        }
    }
}
