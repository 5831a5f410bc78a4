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
use tokio::sync::{mpsc, oneshot};
use tower::ServiceExt as _;

use super::Command;
use crate::api::{BuildState, MachineInfo, Stats, now_ms};
use crate::db::{Db, ListFilter};

pub(super) struct Http {
    pub cache: PathBuf,
    pub db: Arc<Db>,
    pub commands: mpsc::Sender<Command>,
}

pub(super) async fn serve(http: Arc<Http>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/", get(status))
        .route("/nix-cache-info", get(cache_info))
        .route("/metrics", get(metrics))
        .route("/nar/{file}", get(nar))
        .route("/{file}", get(narinfo))
        .fallback(|| async { not_found() })
        .with_state(http);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("HTTP server: {e}");
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
    let hash = [".nar.zst", ".nar.xz", ".nar"].iter().find_map(|ext| file.strip_suffix(ext));
    if !hash.is_some_and(|h| is_nix32(h, 52)) {
        return not_found();
    }
    let path = http.cache.join("nar").join(&file);
    let plain = request.method() == axum::http::Method::GET
        && !request.headers().contains_key(header::RANGE)
        && !request.headers().contains_key(header::IF_RANGE);
    if plain {
        return whole_file(path).await;
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
/// another copy.
async fn whole_file(path: PathBuf) -> Response {
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
    // Most NARs are small: one read, one piece.
    if len <= 8 << 20 {
        let read = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let mut buf = Vec::with_capacity(len as usize);
            std::io::Read::read_to_end(&mut file, &mut buf).map(|_| buf)
        })
        .await;
        return match read {
            Ok(Ok(buf)) if buf.len() as u64 == len => (headers, buf).into_response(),
            Ok(Ok(_)) => internal(&path.display().to_string(), "the file changed size"),
            Ok(Err(e)) => internal(&path.display().to_string(), e),
            Err(e) => internal(&path.display().to_string(), e),
        };
    }
    let (tx, rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        let sent = crate::cache::for_each_chunk(&mut file, 1 << 20, |chunk| {
            tx.blocking_send(Ok(bytes::Bytes::from(chunk))).is_ok()
        });
        if let Err(e) = sent {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) });
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

async fn status(State(http): State<Arc<Http>>) -> Response {
    let Some((machines, stats)) = snapshot(&http).await else { return internal("status", "the core stopped") };
    let recent = match http.db.list(ListFilter { state: None, tags: Vec::new(), limit: 50 }).await {
        Ok(r) => r,
        Err(e) => return internal("status", e),
    };
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
                format!("failed: {}", escape(b.reason.as_deref().unwrap_or("")))
            } else {
                b.state.as_str().to_owned()
            },
        );
    }
    page.push_str("</table>\n</body></html>\n");
    Html(page).into_response()
}
