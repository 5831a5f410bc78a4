//! A small HTTP/1.1 file server on loopback for download tests: serves a fixed set of paths (the
//! query ignored, as a static server does: enough for git's "dumb" HTTP protocol),
//! answers 404 for the rest, `/redirect/PATH` with a 302 to `/PATH`, `/flaky/PATH` with a 503
//! the first time, then as `/PATH`, and `/cut/PATH` as `/PATH` but for a file under a `nar/`
//! directory, whose connection is closed halfway through (a server dying mid-transfer); as a
//! proxy, it opens a
//! `CONNECT` tunnel to itself. One thread per connection; each connection serves one request.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

pub struct Files {
    pub port: u16,
    /// Every request path, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl Files {
    pub fn start(files: BTreeMap<String, Vec<u8>>) -> Files {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files = Arc::new(files);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (files, seen) = (files.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    // As a proxy: `CONNECT HOST:PORT` opens a tunnel, in which the next request is served.
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).map_or(true, |n| n == 0) {
                            return;
                        }
                        let mut words = line.split_whitespace();
                        let (method, path) =
                            (words.next().unwrap_or("").to_owned(), words.next().unwrap_or("/").to_owned());
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).map_or(true, |n| n == 0) || h == "\r\n" {
                                break;
                            }
                        }
                        if method == "CONNECT" {
                            seen.lock().unwrap().push(format!("CONNECT {path}"));
                            if write!(conn, "HTTP/1.1 200 Connection established\r\n\r\n").is_err() {
                                return;
                            }
                            continue;
                        }
                        let first = {
                            let mut seen = seen.lock().unwrap();
                            let first = !seen.contains(&path);
                            seen.push(path.clone());
                            first
                        };
                        let _ = if let Some(to) = path.strip_prefix("/redirect") {
                            write!(
                                conn,
                                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            )
                        } else if path.starts_with("/flaky/") && first {
                            write!(
                                conn,
                                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            )
                        } else if let Some(body) = files.get(
                            path.trim_start_matches("/flaky")
                                .trim_start_matches("/cut")
                                .split('?')
                                .next()
                                .unwrap_or(""),
                        ) {
                            let cut = path.starts_with("/cut/") && path.contains("/nar/");
                            let sent = if cut { &body[..body.len() / 2] } else { &body[..] };
                            write!(
                                conn,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .and_then(|()| conn.write_all(sent))
                        } else {
                            write!(
                                conn,
                                "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
                            )
                        };
                        return;
                    }
                });
            }
        });
        Files { port, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Serve every file under `dir`, at its path below it.
    pub fn serve_dir(dir: &std::path::Path) -> Files {
        fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut BTreeMap<String, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    out.insert(format!("/{rel}"), std::fs::read(&path).unwrap());
                }
            }
        }
        let mut files = BTreeMap::new();
        walk(dir, dir, &mut files);
        Files::start(files)
    }
}
