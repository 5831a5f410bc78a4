//! Hooks (issue 17): events from a real coordinator delivered to commands and to an HTTP server on
//! loopback, retried, given up and run again, killed at their timeout, acting back on the
//! coordinator, and never lost across kill -9.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Coordinator, nix, run, run_ok_str, salt, stderr};
use serde_json::Value;

const QUEUE: &str = "tests/nix/queue.nix";

/// A coordinator.ron with these hooks (RON text of each), in `dir`.
fn config(dir: &Path, hooks: &[String]) -> String {
    let path = dir.join("coordinator.ron");
    std::fs::write(&path, format!("(hooks: [\n{}\n])\n", hooks.join(",\n"))).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A hook that appends each event (one JSON line) to `file`, and its environment to `file`.env.
fn recorder(name: &str, file: &Path, extra: &str) -> String {
    let f = file.display();
    format!(
        r#"(name: "{name}", command: ["/bin/sh", "-c", "/bin/cat >> {f}; echo \"$GBC_EVENT $GBC_EVENT_ID $GBC_BUILD $GBC_DERIVATION $GBC_COORDINATOR\" >> {f}.env"]{extra})"#
    )
}

fn events(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn many(n: usize, salt: &str) -> Vec<String> {
    let out = run_ok_str(nix("nix-instantiate").arg(common::repo_path(QUEUE)).args([
        "--argstr",
        "salt",
        salt,
        "--arg",
        "n",
        &n.to_string(),
        "-A",
        "many",
    ]));
    out.lines().map(str::to_owned).collect()
}

fn hooks(c: &Coordinator) -> Vec<Value> {
    serde_json::from_str(&run_ok_str(&mut c.gbc(&["hooks", "--json"]))).unwrap()
}

fn hook<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter().find(|h| h["name"] == name).unwrap_or_else(|| panic!("no hook {name}: {list:?}"))
}

/// A hook that writes its niceness (nice(1)'s) to `file` on `machine-up`.
fn nice_recorder(name: &str, file: &Path, extra: &str) -> String {
    format!(
        r#"(name: "{name}", events: ["machine-up"], command: ["/bin/sh", "-c", "nice > {}"]{extra})"#,
        file.display()
    )
}

/// A hook gets each event once, as documented: JSON on stdin with its id, time and version, the
/// build's fields as `gbc watch --json` has them, outputs with their NAR hashes; the environment
/// names the event, build, derivation and the coordinator's socket. A hook that wants only some
/// events gets only those. Commands run 10 steps nicer than the coordinator unless told.
#[test]
fn hooks_get_the_events_they_want_with_their_environment() {
    let dir = common::tempdir();
    let (all, some) = (dir.path().join("all"), dir.path().join("some"));
    let niced = |n: &str| dir.path().join(format!("nice-{n}"));
    let conf = config(
        dir.path(),
        &[
            recorder("all", &all, ""),
            recorder("some", &some, r#", events: ["build-succeeded", "machine-up"]"#),
            nice_recorder("nice-default", &niced("default"), ""),
            nice_recorder("nice-3", &niced("3"), ", nice: 3"),
            nice_recorder("nice-0", &niced("0"), ", nice: 0"),
        ],
    );
    let c = Coordinator::start(&["--local-builds", "1", "--config", &conf]);
    let drvs = common::drvs(QUEUE, &["left"], &salt());
    let out = run(&mut c.gbc(&["build", "--no-upload", &drvs["left"]]));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    let builds = c.builds();
    assert_eq!(builds.len(), 2, "left and base: {builds:?}");
    c.wait_until("both builds' events are delivered", 30, || {
        events(&all).iter().filter(|e| e["event"] == "build-succeeded").count() == 2
    });
    let got = events(&all);
    let kinds: BTreeMap<String, usize> = got.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e["event"].as_str().unwrap().to_owned()).or_default() += 1;
        m
    });
    let want: BTreeMap<String, usize> =
        [("build-submitted", 2), ("build-started", 2), ("build-succeeded", 2), ("machine-up", 1)]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect();
    assert_eq!(kinds, want, "{got:#?}");
    let ids: BTreeSet<i64> = got.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), got.len(), "every event has its own id: {got:#?}");
    for e in &got {
        assert_eq!(e["version"], 1, "{e}");
        assert!(e["at_ms"].as_i64().unwrap() > 0, "{e}");
    }
    for b in &builds {
        let uuid = b["uuid"].as_str().unwrap();
        let mine: Vec<&Value> = got.iter().filter(|e| e["build"] == uuid).collect();
        let order: Vec<&str> = mine.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(order, ["build-submitted", "build-started", "build-succeeded"], "{mine:#?}");
        let done = mine[2];
        assert_eq!(done["drv"], b["drv"]);
        assert_eq!(done["state"], "succeeded");
        assert_eq!(done["machine"], "localhost");
        assert_eq!(done["attempt"], 1);
        let show: Value = serde_json::from_str(&run_ok_str(&mut c.gbc(&["show", "--json", uuid]))).unwrap();
        let outputs = &show["attempt_list"][0]["outputs"];
        assert_eq!(done["outputs"][0]["nar_hash"], outputs[0]["nar_hash"], "{done}\n{show}");
        assert_eq!(done["outputs"][0]["path"], outputs[0]["path"]);
    }
    let submitted = got.iter().find(|e| e["event"] == "build-submitted" && e["drv"] == drvs["left"].as_str()).unwrap();
    assert_eq!(submitted["state"], "queued");
    // The environment, per event.
    let env = std::fs::read_to_string(all.with_extension("env")).unwrap_or_default();
    let socket = c.state.join("gbc.sock");
    let line = env.lines().find(|l| l.starts_with("build-succeeded ") && l.contains(&drvs["left"])).unwrap();
    let uuid =
        got.iter().find(|e| e["event"] == "build-succeeded" && e["drv"] == drvs["left"].as_str()).unwrap()["build"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(line.contains(&uuid) && line.ends_with(socket.to_str().unwrap()), "{line}");
    // The other hook, only its events.
    c.wait_until("the other hook's events are delivered", 30, || events(&some).len() == 3);
    let kinds: BTreeSet<String> = events(&some).iter().map(|e| e["event"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds, BTreeSet::from(["build-succeeded".to_owned(), "machine-up".to_owned()]));
    // Taken events leave the outbox once their runs are recorded (batched, soon after).
    c.wait_until("both backlogs are empty", 10, || hooks(&c).iter().all(|h| h["backlog"] == 0));
    let list = hooks(&c);
    assert_eq!(hook(&list, "all")["runs"], 7, "{list:?}");
    assert_eq!(hook(&list, "some")["events"], serde_json::json!(["build-succeeded", "machine-up"]));
    // Each hook's niceness, from the coordinator's (this test's).
    let ours: i32 = run_ok_str(&mut std::process::Command::new("nice")).trim().parse().unwrap();
    for (n, steps) in [("default", 10), ("3", 3), ("0", 0)] {
        let got = std::fs::read_to_string(niced(n)).unwrap_or_default();
        assert_eq!(got.trim().parse::<i32>().ok(), Some((ours + steps).min(19)), "hook nice-{n}: {got:?}");
    }
}

/// A failing hook is run again until it succeeds; one that keeps failing is given up, shows in
/// `gbc hooks` with its error, and `gbc hooks retry` runs it again; one that hangs is killed at
/// its timeout. A failed build's event says why, and so does its dependents'.
#[test]
fn failing_hooks_are_retried_given_up_and_run_again() {
    let dir = common::tempdir();
    let count = dir.path().join("count");
    let flaky_log = dir.path().join("flaky");
    let flaky = format!(
        r#"(name: "flaky", events: ["build-failed"], retry_delay_secs: 0, max_retries: 5,
           command: ["/bin/sh", "-c", "n=$(/bin/cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}; [ $n -ge 2 ] || exit 3; /bin/cat >> {flaky}"])"#,
        count = count.display(),
        flaky = flaky_log.display()
    );
    let broken = r#"(name: "broken", events: ["build-submitted"], retry_delay_secs: 0, max_retries: 1,
           command: ["/bin/sh", "-c", "echo 'no way' >&2; exit 1"])"#
        .to_owned();
    let hang = r#"(name: "hang", events: ["build-started"], timeout_secs: 1, max_retries: 0,
           command: ["/bin/sh", "-c", "/bin/sleep 30 & /bin/sleep 30"])"#
        .to_owned();
    let conf = config(dir.path(), &[flaky, broken, hang]);
    let (port, addr) = common::free_addr();
    let c = Coordinator::start(&["--local-builds", "1", "--config", &conf, "--http", &addr]);
    let drvs = common::drvs(QUEUE, &["afterBroken"], &salt());
    let out = run(&mut c.gbc(&["build", "--no-upload", &drvs["afterBroken"]]));
    assert!(!out.status.success());
    c.wait_until("the flaky hook got both failures on its third runs", 30, || events(&flaky_log).len() == 2);
    let failed = events(&flaky_log);
    assert!(failed.iter().any(|e| e["reason"].as_str().unwrap_or("").contains("exit")), "{failed:#?}");
    assert!(failed.iter().any(|e| e["drv"] == drvs["afterBroken"].as_str() && e["state"] == "failed"), "{failed:#?}");
    c.wait_until("the broken hook gives up and the hanging one is killed", 30, || {
        let list = hooks(&c);
        hook(&list, "broken")["given_up"] == 2 && hook(&list, "hang")["given_up"] == 1
    });
    let list = hooks(&c);
    let broken = hook(&list, "broken");
    assert!(broken["last_error"].as_str().unwrap().ends_with("exit status: 1: no way"), "{broken}");
    assert_eq!((broken["runs"].as_u64(), broken["failures"].as_u64()), (Some(4), Some(4)), "two events, two runs each");
    let hang = hook(&list, "hang");
    assert!(hang["last_error"].as_str().unwrap().contains("killed after its timeout of 1 s"), "{hang}");
    assert_eq!(hook(&list, "flaky")["backlog"], 0);
    let text = run_ok_str(&mut c.gbc(&["hooks"]));
    assert!(text.contains("broken  build-submitted  backlog 0  running 0  given up 2"), "{text}");
    // Run again: it fails again (twice each), and is given up again.
    let out = run_ok_str(&mut c.gbc(&["hooks", "retry", "broken"]));
    assert_eq!(out.trim(), "broken: 2 events to run again");
    c.wait_until("the retried events ran and were given up again", 30, || {
        let list = hooks(&c);
        hook(&list, "broken")["runs"] == 8 && hook(&list, "broken")["given_up"] == 2
    });
    let out = run(&mut c.gbc(&["hooks", "retry", "nosuch"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no hook is called \"nosuch\""), "{}", stderr(&out));
    assert!(c.log().contains("given up after 2 runs (gbc hooks retry broken runs it again)"), "{}", c.log());
    let (_, _, body) = common::http(port, "GET", "/metrics", "");
    let metrics = String::from_utf8_lossy(&body);
    for line in [
        "gbc_hook_given_up{hook=\"broken\"} 2",
        "gbc_hook_runs_total{hook=\"broken\"} 8",
        "gbc_hook_failures_total{hook=\"broken\"} 8",
        "gbc_hook_backlog{hook=\"flaky\"} 0",
        "gbc_hook_delivered_total{hook=\"flaky\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(metrics.contains("gbc_hook_latency_milliseconds_total{hook=\"flaky\"}"), "{metrics}");
}

/// A webhook gets each event as a POST of its JSON (a 500 is retried), and a hook acts back on
/// the coordinator: on `left`'s success it submits `right`, which is built.
#[test]
fn webhooks_and_hooks_that_submit() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let got = bodies.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (mut len, mut kind, mut line) = (0usize, String::new(), String::new());
            r.read_line(&mut line).unwrap();
            let request = line.clone();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                let l = line.trim().to_ascii_lowercase();
                if l.is_empty() {
                    break;
                }
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if let Some(v) = l.strip_prefix("x-gbc-event:") {
                    kind = v.trim().to_owned();
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            // The first request fails: it comes again.
            let status = if n == 0 { "500 Internal Server Error" } else { "204 No Content" };
            if n > 0 {
                assert!(request.starts_with("POST /events "), "{request}");
                got.lock().unwrap().push((kind, String::from_utf8(body).unwrap()));
            }
            let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let dir = common::tempdir();
    let drvs = common::drvs(QUEUE, &["left", "right"], &salt());
    let web = format!(
        r#"(name: "web", events: ["build-succeeded"], url: "http://127.0.0.1:{port}/events", retry_delay_secs: 0)"#
    );
    let follow = format!(
        r#"(name: "follow", events: ["build-succeeded"],
           command: ["/bin/sh", "-c", "[ \"$GBC_DERIVATION\" = {left} ] && {gbc} submit {right} || true"])"#,
        left = drvs["left"],
        right = drvs["right"],
        gbc = env!("CARGO_BIN_EXE_gbc")
    );
    let conf = config(dir.path(), &[web, follow]);
    let c = Coordinator::start(&["--local-builds", "1", "--config", &conf]);
    let out = run(&mut c.gbc(&["build", "--no-upload", &drvs["left"]]));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    c.wait_until("the hook's submission of right succeeds", 60, || {
        c.builds().iter().any(|b| b["drv"] == drvs["right"].as_str() && b["state"] == "succeeded")
    });
    c.wait_until("the webhook has the three successes (base, left, right)", 30, || bodies.lock().unwrap().len() == 3);
    let got = bodies.lock().unwrap().clone();
    for (kind, body) in &got {
        assert_eq!(kind, "build-succeeded");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["event"], "build-succeeded", "{v}");
    }
    let drvs_seen: BTreeSet<String> = got
        .iter()
        .map(|(_, b)| serde_json::from_str::<Value>(b).unwrap()["drv"].as_str().unwrap().to_owned())
        .collect();
    assert!(drvs_seen.contains(&drvs["right"]), "{drvs_seen:?}");
    let list = hooks(&c);
    assert_eq!(hook(&list, "web")["failures"], 1, "{list:?}");
    assert!(hook(&list, "web")["last_error"].as_str().unwrap().contains("HTTP 500"), "{list:?}");
}

/// Kill -9 at random moments while 200 builds run and their events are delivered: every build's
/// `build-submitted` and `build-succeeded` arrive at least once, and no event of a build that did
/// not happen. The hook is ordered (with parallelism 4): each build's events arrive in the order
/// they happened, the first time each arrives.
#[test]
fn no_event_is_lost_across_kill_9() {
    let dir = common::tempdir();
    let log = dir.path().join("events");
    let conf = config(dir.path(), &[recorder("record", &log, ", parallelism: 4, ordered: true")]);
    let drvs = many(200, &salt());
    let mut c = Coordinator::start(&["--local-builds", "2", "--config", &conf]);
    let mut uuids = c.submit(&drvs[..120], &[]);
    let mut next = common::clock_rng();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(200 + next() % 1500));
        if round == 1 {
            uuids.extend(c.submit(&drvs[120..], &[]));
        }
        c.kill9();
        c.restart();
    }
    c.watch_ok(&uuids);
    let wanted: BTreeSet<&str> = uuids.iter().map(String::as_str).collect();
    c.wait_until("every build's events are delivered", 120, || {
        let got = events(&log);
        let done = |kind: &str| -> BTreeSet<String> {
            got.iter().filter(|e| e["event"] == kind).map(|e| e["build"].as_str().unwrap().to_owned()).collect()
        };
        wanted.iter().all(|u| done("build-submitted").contains(*u) && done("build-succeeded").contains(*u))
    });
    let mut firsts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ids: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in events(&log) {
        if let Some(b) = e["build"].as_str() {
            assert!(wanted.contains(b), "an event of a build nobody submitted: {e}");
            let kind = e["event"].as_str().unwrap().to_owned();
            let seen = firsts.entry(b.to_owned()).or_default();
            if !seen.contains(&kind) {
                seen.push(kind);
                ids.entry(b.to_owned()).or_default().push(e["id"].as_i64().unwrap());
            }
        }
    }
    for (build, order) in &ids {
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{build}: events out of order: {:?}", firsts[build]);
    }
}

/// `--retry-failed 2`: a builder that fails twice then succeeds ends succeeded, its three attempts
/// recorded. The builder is Nix's builtin:fetchurl against a loopback server that answers 404 to
/// the first two requests (a failure the fetcher does not retry itself); another URL always
/// answers 404, and its build fails after its two tries again.
#[test]
fn retry_failed_tries_a_failed_build_again() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let contents = format!("fetched {}\n", salt());
    let body = contents.clone();
    std::thread::spawn(move || {
        let mut asked = 0;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            r.read_line(&mut line).unwrap();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
                    break;
                }
            }
            let ok = line.starts_with("GET /flaky ") && {
                asked += 1;
                asked > 2
            };
            let _ = if ok {
                write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            } else {
                write!(s, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            };
        }
    });
    let dir = common::tempdir();
    let file = dir.path().join("contents");
    std::fs::write(&file, &contents).unwrap();
    let hash =
        run_ok_str(nix("nix-hash").args(["--type", "sha256", "--flat", "--base32"]).arg(&file)).trim().to_owned();
    let drv = |path: &str, name: &str| {
        let expr = format!(
            r#"import <nix/fetchurl.nix> {{ url = "http://127.0.0.1:{port}/{path}"; sha256 = "{hash}"; name = "{name}"; }}"#
        );
        run_ok_str(nix("nix-instantiate").args(["-E", &expr])).trim().to_owned()
    };
    let (flaky, gone) = (drv("flaky", "flaky-retried"), drv("gone", "gone-retried"));
    let c = Coordinator::start(&["--local-builds", "1", "--retry-failed", "2", "--retry-failed-delay", "0"]);
    let out = run(&mut c.gbc(&["build", "--no-upload", &flaky]));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    let show = |drv: &str| -> Value {
        let uuid = c.builds().iter().find(|b| b["drv"] == drv).unwrap()["uuid"].as_str().unwrap().to_owned();
        serde_json::from_str(&run_ok_str(&mut c.gbc(&["show", "--json", &uuid]))).unwrap()
    };
    let statuses = |v: &Value| -> Vec<String> {
        v["attempt_list"].as_array().unwrap().iter().map(|a| a["status"].as_str().unwrap().to_owned()).collect()
    };
    let v = show(&flaky);
    assert_eq!(statuses(&v), ["build_failure", "build_failure", "success"], "{v}");
    assert_eq!(v["state"], "succeeded");
    let out = run(&mut c.gbc(&["build", "--no-upload", &gone]));
    assert!(!out.status.success());
    let v = show(&gone);
    assert_eq!(statuses(&v), ["build_failure", "build_failure", "build_failure"], "{v}");
    assert_eq!(v["state"], "failed");
}

/// Hooks are re-read with coordinator.ron: a hook added while running gets the events from then
/// on; a broken edit is logged and changes nothing.
#[test]
fn hooks_are_re_read_while_running() {
    let dir = common::tempdir();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let conf = config(dir.path(), &[recorder("first", &first, r#", events: ["build-succeeded"]"#)]);
    let c = Coordinator::start(&["--local-builds", "1", "--config", &conf]);
    let drvs = common::drvs(QUEUE, &["base", "left"], &salt());
    assert!(run(&mut c.gbc(&["build", "--no-upload", &drvs["base"]])).status.success());
    c.wait_until("the first hook has base", 30, || events(&first).len() == 1);
    std::fs::write(&conf, "(hooks: [(name: \"x\", events: [\"nope\"], command: [\"x\"])])").unwrap();
    c.wait_until("the broken edit is logged", 20, || c.log().contains("keeping the previous settings"));
    assert!(c.log().contains("no event is called \"nope\""), "{}", c.log());
    config(
        dir.path(),
        &[
            recorder("first", &first, r#", events: ["build-succeeded"]"#),
            recorder("second", &second, r#", events: ["build-succeeded"]"#),
        ],
    );
    c.wait_until("the good edit is taken", 20, || c.log().contains("2 hooks"));
    assert!(run(&mut c.gbc(&["build", "--no-upload", &drvs["left"]])).status.success());
    c.wait_until("both hooks have left", 30, || events(&first).len() == 2 && events(&second).len() == 1);
    assert_eq!(events(&second)[0]["drv"], drvs["left"].as_str());
}
