//! The HTTP side under hostile clients (issue 12): idle and half-sent connections are closed,
//! connections past the cap wait without starving the client socket, clients that stop reading a
//! NAR hold no more than the shared read-ahead, and failure reasons shown over HTTP name no host
//! path. The client socket's request lines are bounded together too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Coordinator, Tmpfs, free_addr, http, rss, run, run_ok_str, salt};

const QUEUE: &str = "tests/nix/queue.nix";

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_and_half_sent_http_connections_are_closed_and_the_client_socket_still_answers() {
    let (port, addr) = free_addr();
    let c = Coordinator::start(&[
        "--http",
        &addr,
        "--http-header-timeout",
        "2",
        "--http-idle-timeout",
        "3",
        "--http-max-connections",
        "20",
    ]);
    // 20 idle connections fill the cap; 40 more wait past it, half of them with half a header.
    let mut idle: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let mut half: Vec<TcpStream> = (0..30)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n").unwrap();
            s
        })
        .collect();
    // Meanwhile the client socket answers as ever.
    let t0 = Instant::now();
    let out = run(&mut c.gbc(&["builds"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t0.elapsed() < Duration::from_secs(10), "gbc builds took {:?}", t0.elapsed());
    // Every one of them is closed by the server in time: the first 20 after the header timeout,
    // the rest once they get a slot and time out in turn.
    for s in idle.iter_mut().chain(half.iter_mut()) {
        assert!(closed_within(s, Duration::from_secs(30)), "a connection stayed open");
    }
    // A kept-alive connection that goes quiet after its request is closed too.
    let mut kept = TcpStream::connect(("127.0.0.1", port)).unwrap();
    kept.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    assert!(closed_within(&mut kept, Duration::from_secs(15)), "a quiet kept-alive connection stayed open");
    // And the server still serves.
    let (status, _, body) = http(port, "GET", "/nix-cache-info", "");
    assert!(status.contains("200"), "{status}");
    assert!(String::from_utf8_lossy(&body).contains("StoreDir:"));
}

#[test]
fn clients_that_stop_reading_a_nar_hold_no_more_than_the_shared_read_ahead() {
    let (port, addr) = free_addr();
    let c = Coordinator::start(&["--local-builds", "1", "--compression", "none", "--http", &addr]);
    let drvs = common::instantiate(QUEUE, None, &["huge"], &salt());
    let out = run(&mut c.gbc(&["build", &drvs[0].1]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let hash = &path["/nix/store/".len()..][..32];
    let (_, _, body) = http(port, "GET", &format!("/{hash}.narinfo"), "");
    let info = gbc::formats::narinfo::NarInfo::parse(&String::from_utf8_lossy(&body)).unwrap();
    assert!(info.nar_size > 30 << 20, "{}", info.nar_size);
    let before = rss(c.pid());
    // 150 clients ask for it and read nothing.
    let stalled: Vec<TcpStream> = (0..150)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(s, "GET /{} HTTP/1.1\r\nHost: localhost\r\n\r\n", info.url).unwrap();
            s
        })
        .collect();
    // Not synchronisation: time for the stalled readers to cost what they would (nothing to wait
    // for: what is under test is that nothing happens).
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss(c.pid()).saturating_sub(before);
    assert!(grown < 200 << 20, "the coordinator grew by {} MiB for 150 stalled readers", grown >> 20);
    drop(stalled);
    // The NAR is whole for a client that reads.
    let (status, _, body) = http(port, "GET", &format!("/{}", info.url), "");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.len() as u64, info.nar_size);
}

#[test]
fn failure_reasons_over_http_name_no_host_path() {
    let (port, addr) = free_addr();
    // A full cache disk gives reasons that name the cache's files.
    let mut cache = None;
    let args = ["--local-builds", "2", "--compression", "none", "--max-attempts", "1", "--http", &addr];
    let c = Coordinator::start_prepared(&args, |state| cache = Tmpfs::mount(&state.join("cache"), "20m"));
    let Some(_cache) = cache else { return };
    let drvs = common::instantiate(QUEUE, None, &["large.0", "large.1", "large.2", "large.3", "fifoOutput"], &salt());
    let drvs: Vec<&str> = drvs.iter().map(|(_, d)| d.as_str()).collect();
    let out = run(c.gbc(&["build"]).args(&drvs));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let state = c.state.display().to_string();
    let shown = run_ok_str(&mut c.gbc(&["builds", "--json"]));
    assert!(shown.contains(&format!("{state}/cache/.tmp/")), "the local client sees the whole reason: {shown}");
    let (status, _, body) = http(port, "GET", "/", "");
    assert!(status.contains("200"), "{status}");
    let page = String::from_utf8_lossy(&body);
    assert!(page.contains("the cache&#39;s disk is full") || page.contains("the cache's disk is full"), "{page}");
    assert!(page.contains("-fifo-output: outputs may hold only files"), "store paths stay: {page}");
    assert!(!page.contains(&state) && !page.contains("/tmp/"), "a host path on the status page: {page}");
}

#[test]
fn huge_request_lines_on_the_client_socket_are_bounded_together() {
    use std::os::unix::net::UnixStream;
    let c = Coordinator::start(&[]);
    let before = rss(c.pid());
    // Six clients each send most of a 250 MB line at once, and none ends it.
    let piece = vec![b' '; 1 << 20];
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let socket = c.state.join("gbc.sock");
            let piece = piece.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(socket).unwrap();
                let mut hello = [0u8; 256];
                let _ = s.read(&mut hello).unwrap();
                let mut sent = 0usize;
                while sent < 250 << 20 {
                    if s.write_all(&piece).is_err() {
                        break;
                    }
                    sent += piece.len();
                }
                s.shutdown(std::net::Shutdown::Write).ok();
                let mut reply = String::new();
                let _ = s.read_to_string(&mut reply);
                (sent, reply)
            })
        })
        .collect();
    let mut peak = 0;
    let mut results = Vec::new();
    for h in clients {
        peak = peak.max(rss(c.pid()));
        results.push(h.join().unwrap());
    }
    peak = peak.max(rss(c.pid()));
    let grown = peak.saturating_sub(before);
    let refused = results.iter().filter(|(_, reply)| reply.contains("try again")).count();
    assert!(
        refused >= 4,
        "at most one 250 MB line fits at a time: {:?}",
        results.iter().map(|r| &r.1).collect::<Vec<_>>()
    );
    assert!(grown < 700 << 20, "the coordinator grew by {} MiB", grown >> 20);
    // The client socket still answers.
    run_ok_str(&mut c.gbc(&["builds"]));
}
