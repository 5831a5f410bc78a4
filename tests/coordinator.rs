//! The coordinator end to end: a real `gbc coordinator` in a temporary state dir, its built-in local
//! machine, the client commands, derivations from `nix-instantiate`, and Nix's own realisation as
//! the reference for every output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Coordinator, Tmpfs, drv_name, lines, nix, nix_realise, run, run_ok_str, salt, stderr};
use serde_json::Value;

const QUEUE: &str = "tests/nix/queue.nix";

fn instantiate(attrs: &[&str], salt: &str) -> BTreeMap<String, String> {
    common::drvs(QUEUE, attrs, salt)
}

/// The NarHash of each output of a successful build, as the coordinator recorded it.
fn recorded_hashes(build: &Value) -> BTreeMap<String, String> {
    let attempts = build["attempt_list"].as_array().unwrap();
    let last = attempts.last().unwrap();
    assert_eq!(last["status"], "success", "{build}");
    last["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["path"].as_str().unwrap().to_owned(), o["nar_hash"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn a_diamond_builds_in_order_and_its_outputs_equal_nix_s() {
    let c = Coordinator::start(&["--local-builds", "2"]);
    let drvs = instantiate(&["top", "left", "right", "base"], &salt());
    // Only the top is submitted: its input derivations get builds of their own, in order.
    let out = run(&mut c.gbc(&["build", "--json", &drvs["top"]]));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    let printed = lines(&out);
    let theirs: Vec<String> = nix_realise(&[&drvs["top"]], &[]).lines().map(str::to_owned).collect();
    assert_eq!(printed, theirs, "gbc build prints the output paths");

    // Progress went to stderr as JSON events: every build ran after its dependencies succeeded.
    let events: Vec<Value> = stderr(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let when = |name: &str, st: &str| {
        events
            .iter()
            .position(|e| drv_name(e["drv"].as_str().unwrap()) == name && e["state"] == st)
            .unwrap_or_else(|| panic!("no {st} event for {name}: {events:?}"))
    };
    assert!(when("base", "succeeded") < when("left", "running"));
    assert!(when("base", "succeeded") < when("right", "running"));
    assert!(when("left", "succeeded") < when("top", "running"));
    assert!(when("right", "succeeded") < when("top", "running"));

    // Every output's NarHash is the one Nix computes for its own realisation.
    let list = c.builds();
    assert_eq!(list.len(), 4, "{list:?}");
    for b in &list {
        assert_eq!(b["state"], "succeeded");
        let detail = c.show(b["uuid"].as_str().unwrap());
        for (path, hash) in recorded_hashes(&detail) {
            nix_realise(&[detail["drv"].as_str().unwrap()], &[]);
            let nix_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", &path]));
            assert_eq!(hash, nix_hash.trim(), "{path}");
        }
    }

    // Submitting the same top again with --ignore-if-built returns the build that made it.
    let top_uuid = list.iter().find(|b| b["drv"] == drvs["top"].as_str()).unwrap()["uuid"].as_str().unwrap();
    let again = c.submit(&[&drvs["top"]], &["--ignore-if-built"]);
    assert_eq!(again, [top_uuid]);
    // Without it, a new build, whose inputs (already built) need no new builds.
    let fresh = c.submit(&[&drvs["top"]], &[]);
    assert_ne!(fresh, [top_uuid]);
    // With it, a succeeded build still comes first: the one before (or the fresh one, if it has
    // already succeeded too), never a queued or running one.
    let again = c.submit(&[&drvs["top"]], &["--ignore-if-built"]);
    assert!(again[0] == top_uuid || again == fresh, "{again:?}");
    assert_eq!(c.state(&again[0]), "succeeded");
    let w = run(c.gbc(&["watch"]).args(&fresh));
    assert!(w.status.success(), "{}", stderr(&w));
    let list = c.builds();
    assert_eq!(list.len(), 5);
}

#[test]
fn a_failure_fails_its_dependents_with_the_cause() {
    let c = Coordinator::start(&["--local-builds", "2"]);
    let drvs = instantiate(&["alsoAfterBroken", "broken", "base"], &salt());
    let out = run(&mut c.gbc(&["build", &drvs["alsoAfterBroken"], &drvs["base"]]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("also-after-broken") && err.contains("did not succeed"), "{err}");
    // The one that could be built was, and its path printed.
    assert_eq!(lines(&out).len(), 1);

    let list = c.builds();
    let by_name = |n: &str| list.iter().find(|b| drv_name(b["drv"].as_str().unwrap()) == n).unwrap();
    let broken = by_name("broken");
    assert_eq!(broken["state"], "failed");
    assert!(broken["reason"].as_str().unwrap().contains("status 1"), "{broken}");
    let after = by_name("after-broken");
    assert_eq!(after["state"], "failed");
    let why = after["reason"].as_str().unwrap();
    assert!(why.contains(broken["uuid"].as_str().unwrap()) && why.contains("broken.drv"), "{why}");
    assert_eq!(after["attempts"], 0, "a dependent of a failure never starts");
    let also = by_name("also-after-broken");
    assert!(also["reason"].as_str().unwrap().contains(after["uuid"].as_str().unwrap()), "{also}");
    assert_eq!(by_name("base")["state"], "succeeded");

    // The failed build's log says why; `watch` of it exits 1.
    let log = run_ok_str(&mut c.gbc(&["log", broken["uuid"].as_str().unwrap()]));
    assert!(log.contains("breaking on purpose"), "{log}");
    let w = run(&mut c.gbc(&["watch", broken["uuid"].as_str().unwrap()]));
    assert_eq!(w.status.code(), Some(1));
}

#[test]
fn higher_priority_goes_first() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["blocker", "p1", "p2", "p3"], &salt());
    let blocker = c.submit(&[&drvs["blocker"]], &[]);
    c.wait_for_state(&blocker[0], "running");
    let low = c.submit(&[&drvs["p1"]], &["--priority", "1"]);
    let high = c.submit(&[&drvs["p2"]], &["--priority", "5", "--tag", "kind=prio"]);
    let mid = c.submit(&[&drvs["p3"]], &["--priority", "3"]);
    let all = [&blocker[0], &low[0], &high[0], &mid[0]];
    let w = run(c.gbc(&["watch", "--json"]).args(all));
    assert!(w.status.success(), "{}", stderr(&w));
    let started: Vec<String> = String::from_utf8_lossy(&w.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["state"] == "running" && e.get("snapshot").is_none())
        .map(|e| e["build"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(started, [high[0].clone(), mid[0].clone(), low[0].clone()]);
    // Tags select.
    let tagged: Vec<Value> =
        serde_json::from_str(&run_ok_str(&mut c.gbc(&["builds", "--json", "--tag", "kind=prio"]))).unwrap();
    assert_eq!(tagged.len(), 1);
    assert_eq!(tagged[0]["uuid"], high[0].as_str());
}

#[test]
fn cancel_while_queued_and_while_running() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["slow", "afterSlow", "p1"], &salt());
    let slow = c.submit(&[&drvs["slow"]], &[]);
    c.wait_for_state(&slow[0], "running");
    let queued = c.submit(&[&drvs["p1"], &drvs["afterSlow"]], &[]);
    assert_eq!(c.state(&queued[0]), "queued");
    // A second submitter with --ignore-if-built shares the running and the queued build.
    let joined = c.submit(&[&drvs["slow"], &drvs["p1"]], &["--ignore-if-built"]);
    assert_eq!(joined, [slow[0].clone(), queued[0].clone()]);
    assert_eq!(c.builds().len(), 3, "no new build");

    run_ok_str(&mut c.gbc(&["cancel", &queued[0]]));
    assert_eq!(c.state(&queued[0]), "canceled");

    let t0 = Instant::now();
    run_ok_str(&mut c.gbc(&["cancel", &slow[0]]));
    assert_eq!(c.state(&slow[0]), "canceled");
    // Its dependent fails, naming it.
    let after = c.show(&queued[1]);
    assert_eq!(after["state"], "failed");
    assert!(after["reason"].as_str().unwrap().contains(&slow[0]), "{after}");
    // The agent stops the build and the slot frees up: a new build runs long before the 60 s.
    let again = c.submit(&[&drvs["p1"]], &[]);
    let w = run(c.gbc(&["watch"]).args(&again));
    assert!(w.status.success(), "{}\n{}", stderr(&w), c.log());
    assert!(t0.elapsed() < Duration::from_secs(30));
    let slow_detail = c.show(&slow[0]);
    assert_eq!(slow_detail["attempt_list"][0]["status"], "canceled", "{slow_detail}");

    // Canceling what has ended is an error that names it; the coordinator goes on.
    let out = run(&mut c.gbc(&["cancel", &slow[0]]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already canceled"), "{}", stderr(&out));
}

#[test]
fn a_running_build_s_log_can_be_followed() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["ticker"], &salt());
    let b = c.submit(&[&drvs["ticker"]], &[]);
    c.wait_for_state(&b[0], "running");
    let t0 = Instant::now();
    let mut follower = c.gbc(&["log", &b[0]]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(follower.stdout.take().unwrap());
    let mut followed = String::new();
    // The first tick comes while the build still runs: the log is streamed as it grows.
    while !followed.contains("tick") {
        assert_ne!(std::io::BufRead::read_line(&mut out, &mut followed).unwrap(), 0, "{followed}");
    }
    assert_eq!(c.state(&b[0]), "running", "{followed}");
    std::io::Read::read_to_string(&mut out, &mut followed).unwrap();
    assert!(follower.wait().unwrap().success());
    assert!(t0.elapsed() > Duration::from_millis(500), "it followed the build to its end");
    assert_eq!(c.state(&b[0]), "succeeded");
    let ticks: Vec<&str> = followed.lines().filter(|l| l.starts_with("tick")).collect();
    assert_eq!(ticks.len(), 6, "{followed}");
    // Once the build is over the log is read from its compressed copy, the same bytes.
    let after = run_ok_str(&mut c.gbc(&["log", "--no-follow", &b[0]]));
    assert_eq!(after, followed);
    let logs = c.state.join("logs");
    let files: Vec<String> = walk(&logs);
    assert!(files.iter().all(|f| f.ends_with(".log.zst")), "{files:?}");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn bad_input_gets_one_clear_line_and_the_coordinator_goes_on() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["base", "left"], &salt());
    let tmp = common::tempdir();

    // Not a derivation.
    let junk = tmp.path().join("junk.drv");
    std::fs::write(&junk, "this is not a derivation").unwrap();
    let out = run(c.gbc(&["submit"]).arg(&junk));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("junk.drv"), "{err}");

    // A derivation whose declared output is not what its contents give: the coordinator says so.
    let text = std::fs::read_to_string(&drvs["base"]).unwrap();
    let declared = text.split('"').nth(3).unwrap().to_owned(); // Derive([("out","<path>",...
    assert!(declared.starts_with("/nix/store/"), "{declared}");
    let forged = format!("/nix/store/{}-base", "0".repeat(32));
    let tampered = tmp.path().join("tampered.drv");
    std::fs::write(&tampered, text.replace(&declared, &forged)).unwrap();
    let out = run(c.gbc(&["submit"]).arg(&tampered));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("tampered.drv") && err.contains(&declared), "{err}");

    // An input derivation that does not match its path, named as such.
    let left_text = std::fs::read_to_string(&drvs["left"]).unwrap();
    let dir = tmp.path().join("copy");
    std::fs::create_dir(&dir).unwrap();
    let left_copy = dir.join(std::path::Path::new(&drvs["left"]).file_name().unwrap());
    std::fs::write(&left_copy, &left_text).unwrap();
    let base_copy = dir.join(std::path::Path::new(&drvs["base"]).file_name().unwrap());
    std::fs::write(&base_copy, text.replace("echo base", "echo BASE")).unwrap();
    let out = run(c.gbc(&["submit"]).arg(&left_copy));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&drvs["base"]) && err.contains("contents give"), "{err}");

    // Unknown UUIDs.
    let out = run(&mut c.gbc(&["show", "00000000-0000-0000-0000-000000000000"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no build 00000000-0000-0000-0000-000000000000"), "{}", stderr(&out));
    let out = run(&mut c.gbc(&["watch", "nope"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no build nope"));

    // A malformed client message gets an error reply; the same connection then works.
    let mut s = UnixStream::connect(c.state.join("gbc.sock")).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(r#""type":"hello""#), "{line}");
    s.write_all(b"{not json\n{\"type\":\"cancel\"}\n{\"type\":\"machines\"}\n").unwrap();
    for expect in ["malformed request", "malformed request", r#""type":"machines""#] {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(expect), "{expect}: {line}");
    }
    drop(s);

    // After all that, it still builds.
    let out = run(&mut c.gbc(&["build", &drvs["left"]]));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn an_input_nobody_can_provide_fails_the_build_at_once_naming_it() {
    let c = Coordinator::start(&["--local-builds", "1", "--max-attempts", "3"]);
    let drvs = instantiate(&["needsSource"], &salt());
    let out = run(&mut c.gbc(&["build", "--no-upload", &drvs["needsSource"]]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let list = c.builds();
    let d = c.show(list[0]["uuid"].as_str().unwrap());
    let attempts = d["attempt_list"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{d}");
    assert_eq!(attempts[0]["status"], "missing_inputs", "{d}");
    let reason = d["reason"].as_str().unwrap();
    assert!(reason.contains("no known derivation makes") && reason.contains("-needs-source.sh"), "{reason}");
}

#[test]
fn outputs_the_client_has_are_uploaded_and_an_input_the_cache_lost_is_built_again() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["base", "left", "blocker"], &salt());
    // This machine's Nix has base's output; the coordinator's cache and its build host do not.
    let base_out = nix_realise(&[&drvs["base"]], &[]).trim().to_owned();
    let blocker = c.submit(&[&drvs["blocker"]], &[]);
    c.wait_for_state(&blocker[0], "running");
    let left = c.submit(&[&drvs["left"]], &[]);
    // base's output was uploaded, so base gets no build of its own.
    let listed = c.builds();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let hash = &base_out.rsplit('/').next().unwrap()[..32];
    let narinfo = c.state.join(format!("cache/{hash}.narinfo"));
    let text = std::fs::read_to_string(&narinfo).unwrap();
    assert!(text.contains(&format!("Deriver: {}\n", drvs["base"].rsplit('/').next().unwrap())), "{text}");
    let theirs = run_ok_str(nix("nix-store").args(["-q", "--hash", &base_out]));
    assert!(text.contains(&format!("NarHash: {theirs}")), "{text}");

    // The cache loses it before left starts: left waits for a new build of base, then succeeds.
    std::fs::remove_file(&narinfo).unwrap();
    c.wait_for_state(&left[0], "succeeded");
    let d = c.show(&left[0]);
    let attempts = d["attempt_list"].as_array().unwrap();
    let statuses: Vec<&str> = attempts.iter().map(|a| a["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["missing_inputs", "success"], "{d}");
    assert!(attempts[0]["reason"].as_str().unwrap().contains(&base_out), "{d}");
    let listed = c.builds();
    let base_build = listed.iter().find(|b| b["drv"] == drvs["base"].as_str()).expect("a build of base");
    assert_eq!(base_build["state"], "succeeded");
    assert!(narinfo.exists());
    let theirs = nix_realise(&[&drvs["left"]], &[]);
    assert_eq!(recorded_hashes(&d).keys().cloned().collect::<Vec<_>>(), [theirs.trim().to_owned()]);
    let ours = recorded_hashes(&d).into_values().next().unwrap();
    assert_eq!(ours, run_ok_str(nix("nix-store").args(["-q", "--hash", theirs.trim()])).trim());
}

/// Issue 12: an output referring to a path the cache lacks was recorded as succeeded while its
/// narinfo waited in `.pending/` forever. Here the build host still has an input source the cache
/// lost, and the build's output refers to it: the build fails, naming the reference.
#[test]
fn an_output_referring_to_a_path_the_cache_lacks_fails_naming_it() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let first = instantiate(&["refsSharedSource"], &salt())["refsSharedSource"].clone();
    let out = run(&mut c.gbc(&["build", &first]));
    assert!(out.status.success(), "{}", stderr(&out));
    let refs = run_ok_str(nix("nix-store").args(["--query", "--references", &first]));
    let source = refs.lines().find(|l| l.ends_with("-shared-source")).unwrap().to_owned();
    let hash = &source.rsplit('/').next().unwrap()[..32];
    std::fs::remove_file(c.state.join(format!("cache/{hash}.narinfo"))).unwrap();

    let second = instantiate(&["refsSharedSource"], &salt())["refsSharedSource"].clone();
    let out = run(&mut c.gbc(&["build", "--no-upload", &second]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let listed = c.builds();
    let d = c.show(listed[0]["uuid"].as_str().unwrap());
    assert_eq!((&d["state"], &d["drv"]), (&Value::from("failed"), &Value::from(second.as_str())), "{d}");
    let attempts = d["attempt_list"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{d}");
    assert_eq!(attempts[0]["status"], "missing_reference", "{d}");
    let reason = d["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("refers to {source}, which the cache does not have")), "{d}");
    let pending: Vec<_> = std::fs::read_dir(c.state.join("cache/.pending")).unwrap().collect();
    assert!(pending.is_empty(), "{pending:?}");
}

#[test]
fn a_host_gets_only_the_inputs_it_lacks_not_their_whole_closure() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["base", "refsBase", "usesRefsBase"], &salt());
    // The client's Nix has refs-base's output (which refers to base's); the host builds base.
    let refs_base = nix_realise(&[&drvs["refsBase"]], &[]).trim().to_owned();
    let out = run(&mut c.gbc(&["build", &drvs["base"]]));
    assert!(out.status.success(), "{}", stderr(&out));
    let sent = |c: &Coordinator| -> u64 {
        let stats: Value = serde_json::from_str(&run_ok_str(&mut c.gbc(&["stats"]))).unwrap();
        stats["bytes_sent"].as_u64().unwrap()
    };
    assert_eq!(sent(&c), 0);
    // refs-base's output travels (uploaded, then sent to the host); base's, which the host has, not.
    let out = run(&mut c.gbc(&["build", &drvs["usesRefsBase"]]));
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    let size = run_ok_str(nix("nix-store").args(["-q", "--size", &refs_base]));
    assert_eq!(sent(&c), size.trim().parse::<u64>().unwrap());
}

#[test]
fn a_build_whose_log_passes_the_limit_is_stopped_and_its_log_cut() {
    let c = Coordinator::start(&["--local-builds", "1", "--max-log-size", "64K"]);
    let drvs = instantiate(&["chatty"], &salt());
    let out = run(&mut c.gbc(&["build", &drvs["chatty"]]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let list = c.builds();
    let uuid = list[0]["uuid"].as_str().unwrap();
    let d = c.show(uuid);
    assert_eq!(d["state"], "failed", "{d}");
    let attempts = d["attempt_list"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{d}");
    assert_eq!(attempts[0]["status"], "build_failure", "{d}");
    assert!(d["reason"].as_str().unwrap().contains("its log passed 65536 bytes"), "{d}");
    let log = run(&mut c.gbc(&["log", uuid])).stdout;
    let marker = b"\ngbc: the log passed 65536 bytes (--max-log-size): the build was stopped\n";
    assert_eq!(log.len(), 65536 + marker.len(), "{}", String::from_utf8_lossy(&log[log.len().saturating_sub(300)..]));
    assert!(log.ends_with(marker));
    assert!(String::from_utf8_lossy(&log).contains("line 0 of a chatty build"));
}

/// Issue 12: a full disk while publishing left builds "running" forever. Every attempt must end,
/// with the reason recorded, and nothing half-written stays in the cache.
#[test]
fn a_full_disk_while_publishing_ends_every_attempt_with_a_reason() {
    let mut cache = None;
    let c = Coordinator::start_prepared(&["--local-builds", "2", "--compression", "none"], |state| {
        cache = Tmpfs::mount(&state.join("cache"), "20m");
    });
    let Some(cache) = cache else { return };
    let drvs = instantiate(&["large.0", "large.1", "large.2", "large.3"], &salt());
    let drvs: Vec<&str> = drvs.values().map(String::as_str).collect();
    let uuids = c.submit(&drvs, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let ended = loop {
        let builds: Vec<Value> = uuids.iter().map(|u| c.show(u)).collect();
        if builds.iter().all(|b| b["state"] == "succeeded" || b["state"] == "failed") {
            break builds;
        }
        assert!(Instant::now() < deadline, "builds still not ended: {builds:?}\n{}", c.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let failed: Vec<&Value> = ended.iter().filter(|b| b["state"] == "failed").collect();
    assert!(!failed.is_empty() && failed.len() < 4, "20 MB hold two of the four 7 MB outputs: {ended:?}");
    for b in failed {
        for a in b["attempt_list"].as_array().unwrap() {
            assert_eq!(a["status"], "store_failure", "{b}");
            assert!(a["reason"].as_str().unwrap().starts_with("the cache's disk is full: "), "{b}");
        }
    }
    let left: Vec<_> = std::fs::read_dir(cache.path.join(".tmp")).unwrap().collect();
    assert!(left.is_empty(), "staged files left behind: {left:?}");
}

/// Issue 12: failures that can never succeed were tried three times. A builder that cannot be
/// started, a bad `exportReferencesGraph`, an output that is a fifo: each fails at its first try.
#[test]
fn permanent_failures_are_attempted_once() {
    let c = Coordinator::start(&["--local-builds", "2"]);
    let drvs = instantiate(&["noBuilder", "badExport", "fifoOutput"], &salt());
    let uuids = c.submit(&drvs.values().map(String::as_str).collect::<Vec<_>>(), &[]);
    let out = run(c.gbc(&["watch"]).args(&uuids));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let mut reasons = Vec::new();
    for u in &uuids {
        let d = c.show(u);
        assert_eq!(d["state"], "failed", "{d}");
        let attempts = d["attempt_list"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "{d}");
        assert_eq!(attempts[0]["status"], "build_failure", "{d}");
        reasons.push(d["reason"].as_str().unwrap().to_owned());
    }
    let all = reasons.join("\n");
    assert!(all.contains("starting the builder /nonexistent/builder-"), "{all}");
    assert!(all.contains("invalid file name '../escape' in 'exportReferencesGraph'"), "{all}");
    assert!(all.contains("-fifo-output: outputs may hold only files, directories and symlinks"), "{all}");
    assert!(!all.contains(".gbc-tmp"), "no host paths: {all}");
}

/// Issue 12: a derivation of a store dir no agent accepts was tried three times. With no machine
/// accepting it, it fails at its first try, naming the store dirs they do accept.
#[test]
fn a_store_dir_no_agent_accepts_fails_at_once() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let tmp = common::tempdir();
    let real = tmp.path().join("real");
    let store = format!(
        "local?store=/gbc-test/store&real={}&state={}&log={}",
        real.display(),
        tmp.path().join("state").display(),
        tmp.path().join("log").display()
    );
    let drvs = common::instantiate(QUEUE, Some(&store), &["base"], &salt());
    let file = real.join(drvs[0].1.rsplit('/').next().unwrap());
    let out = run(c.gbc(&["build"]).arg(&file));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let listed = c.builds();
    let d = c.show(listed[0]["uuid"].as_str().unwrap());
    assert_eq!(d["attempt_list"].as_array().unwrap().len(), 1, "{d}");
    let reason = d["reason"].as_str().unwrap();
    assert!(reason.starts_with("no machine accepts the store dir /gbc-test/store (they accept: "), "{reason}");
}

/// Issue 12: a full disk in a build host's store showed only "builder exited with status 1". The
/// cause reaches the reason and the log, and the build is tried again (as Nix's
/// `TransientFailure`).
#[test]
fn a_full_disk_in_the_agent_s_store_is_named_in_the_reason_and_the_log() {
    let mut store = None;
    let c = Coordinator::start_prepared(&["--local-builds", "1"], |state| {
        store = Tmpfs::mount(&state.join("machines/localhost/agent"), "5m");
    });
    let Some(_store) = store else { return };
    let drvs = instantiate(&["large.0"], &salt());
    let out = run(&mut c.gbc(&["build", &drvs["large.0"]]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let listed = c.builds();
    let uuid = listed[0]["uuid"].as_str().unwrap();
    let d = c.show(uuid);
    let attempts = d["attempt_list"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "tried again up to --max-attempts: {d}");
    for a in attempts {
        assert_eq!(a["status"], "transient_failure", "{d}");
        let reason = a["reason"].as_str().unwrap();
        assert!(reason.contains("may have been caused by lack of free disk space"), "{reason}");
    }
    let log = String::from_utf8_lossy(&run(&mut c.gbc(&["log", uuid])).stdout).into_owned();
    assert!(log.contains("No space left on device"), "{log}");
    assert!(log.contains("gbc: the build host's store has only"), "{log}");
}

/// Issue 12: with the agent running as root, a builder left a setuid-root binary that any local
/// user could run from the build directory while the build lasted. The build directory is the
/// agent's alone (0700), and the builder cannot set setuid or setgid bits (seccomp).
#[test]
fn a_build_cannot_leave_a_setuid_binary_another_user_can_run() {
    if !common::is_root() {
        return common::skip("the setuid probe needs the agent to run as root");
    }
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["setuidProbe"], &salt());
    let uuid = c.submit(&[&drvs["setuidProbe"]], &[]).remove(0);
    let tmp = c.state.join("machines/localhost/agent/store/.gbc-tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (build_dir, probe) = loop {
        let log = String::from_utf8_lossy(&run(&mut c.gbc(&["log", "--no-follow", &uuid])).stdout).into_owned();
        if log.contains("chmod exited") {
            let dir = std::fs::read_dir(&tmp)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("build-"));
            let dir = dir.expect("the build directory");
            let store = dir.join("root/nix/store");
            let probe = std::fs::read_dir(&store)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with("-setuid-probe"));
            assert!(log.contains("chmod exited 1"), "chmod of setuid bits must fail: {log}");
            break (dir, probe.expect("the probe's output"));
        }
        assert!(Instant::now() < deadline, "the probe did not run: {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
    assert_eq!(mode(&build_dir) & 0o777, 0o700, "{}", build_dir.display());
    assert_eq!(mode(&probe) & 0o6000, 0, "{} is setuid or setgid", probe.display());
    // The builder ran as a build user of its own, not as the agent's root.
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&probe).unwrap());
    assert_ne!(owner, 0, "{} belongs to root", probe.display());
    // Another user (nobody) can neither reach nor run it. (Through a shell: setpriv resolves the
    // program it is given before it drops root's rights.)
    let out = run(std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c", "\"$0\" -u"])
        .arg(&probe));
    assert!(!out.status.success(), "another user ran it: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));
    c.wait_for_state(&uuid, "succeeded");
}

/// Issue 12: a fixed-output build (which keeps the host's network) showed up as uid 0 to a host
/// abstract Unix socket. Its builder is a build user of its own.
#[test]
fn a_fixed_output_build_is_no_root_to_the_host_s_sockets() {
    use std::os::linux::net::SocketAddrExt as _;
    if !common::is_root() {
        return common::skip("build users need the agent to run as root");
    }
    let salt = salt();
    let name = format!("gbc-fod-probe-{salt}");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let peer = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        rustix::net::sockopt::socket_peercred(&stream).unwrap().uid.as_raw()
    });
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["fodProbe"], &salt);
    let out = run(&mut c.gbc(&["build", &drvs["fodProbe"]]));
    assert!(out.status.success(), "{}", stderr(&out));
    let uid = peer.join().unwrap();
    assert_ne!(uid, 0, "the builder reached the host as root");
}

/// Issue 12: `gbc.sqlite` was 0644 and `logs/` 0755/0644, so another local user read the database
/// and a build log holding a secret. The state dir is the coordinator's alone.
#[test]
fn the_state_dir_s_files_are_the_coordinator_s_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drvs = instantiate(&["base"], &salt());
    let out = run(&mut c.gbc(&["build", &drvs["base"]]));
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.state), 0o700);
    for db in ["gbc.sqlite", "gbc.sqlite-wal", "gbc.sqlite-shm"] {
        let p = c.state.join(db);
        if p.exists() || db == "gbc.sqlite" {
            assert_eq!(mode(&p), 0o600, "{db}");
        }
    }
    let logs = walk(&c.state.join("logs"));
    assert!(!logs.is_empty(), "a log was written");
    for file in &logs {
        let file = std::path::Path::new(file);
        assert_eq!(mode(file), 0o600, "{}", file.display());
        for dir in file.ancestors().skip(1).take_while(|d| d.starts_with(c.state.join("logs"))) {
            assert_eq!(mode(dir), 0o700, "{}", dir.display());
        }
    }
}

/// Issue 12: a derivation for a system no machine has waited forever without a word, and
/// `gbc build` just waited. Submission warns (and says so in `--json`), `gbc show` says why it
/// waits, and `gbc build` fails at once unless asked to wait.
#[test]
fn a_derivation_no_machine_can_build_is_named_at_once() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let drv = instantiate(&["otherSystem"], &salt())["otherSystem"].clone();
    let out = run(&mut c.gbc(&["submit", &drv]));
    assert!(out.status.success(), "{}", stderr(&out));
    let uuid = lines(&out).remove(0);
    let warning = stderr(&out);
    assert_eq!(warning.lines().count(), 1, "{warning}");
    assert!(warning.starts_with(&format!("gbc: warning: build {uuid} (")), "{warning}");
    assert!(warning.contains("waits: no machine builds riscv64-linux (the machines build: "), "{warning}");

    let out = run(&mut c.gbc(&["submit", "--json", &drv]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = v["no_machine"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{v}");
    assert_eq!(listed[0]["build"], v["builds"][0], "{v}");
    assert_eq!(listed[0]["drv"], drv.as_str(), "{v}");

    let d = c.show(&uuid);
    assert_eq!(d["state"], "queued", "{d}");
    assert!(d["waiting_for_machine"].as_str().unwrap().starts_with("no machine builds riscv64-linux"), "{d}");
    let text = run_ok_str(&mut c.gbc(&["show", &uuid]));
    assert!(text.contains("waiting    no machine builds riscv64-linux"), "{text}");

    let out = common::run_within(&mut c.gbc(&["build", &drv]), 60).expect("gbc build returns at once");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no machine builds riscv64-linux") && err.contains("stays queued"), "{err}");
    // Asked to wait, it waits.
    assert!(common::run_within(&mut c.gbc(&["build", "--wait-for-machine", &drv]), 3).is_none());
}

#[test]
fn without_a_coordinator_the_client_says_how_to_start_one() {
    let tmp = common::tempdir();
    let out = run(common::gbc().args(["builds", "--state-dir"]).arg(tmp.path()));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no coordinator is listening"), "{err}");
    assert!(err.contains(&format!("gbc coordinator --state-dir {}", tmp.path().display())), "{err}");
    // GBC_COORDINATOR names the socket.
    let out = run(common::gbc().arg("machines").env("GBC_COORDINATOR", tmp.path().join("x.sock")));
    assert!(stderr(&out).contains("x.sock"), "{}", stderr(&out));
}

#[test]
fn sigterm_lets_running_builds_finish_or_puts_them_back() {
    // With time enough, the running build finishes before the coordinator exits.
    let mut c = Coordinator::start(&["--local-builds", "1", "--grace", "30"]);
    let drvs = instantiate(&["blocker", "slow"], &salt());
    let b = c.submit(&[&drvs["blocker"]], &[]);
    c.wait_for_state(&b[0], "running");
    c.signal_and_wait(rustix::process::Signal::TERM);
    c.restart();
    assert_eq!(c.state(&b[0]), "succeeded");

    // Without, it goes back to the queue and runs again after the restart.
    c.kill9();
    c.args = ["--local-builds", "1", "--grace", "1"].map(String::from).to_vec();
    c.restart();
    let s = c.submit(&[&drvs["slow"]], &[]);
    c.wait_for_state(&s[0], "running");
    let took = c.signal_and_wait(rustix::process::Signal::INT);
    assert!(took < Duration::from_secs(20), "{took:?}");
    c.restart();
    let d = c.show(&s[0]);
    assert_eq!(d["attempt_list"][0]["status"], "interrupted", "{d}");
    c.wait_for_state(&s[0], "running");
    assert_eq!(c.show(&s[0])["attempts"], 2);
    run_ok_str(&mut c.gbc(&["cancel", &s[0]]));
}

/// A second coordinator on a state dir a live one uses is refused with one line (after waiting
/// out what could be a dead one's socket), and the first goes on answering.
#[test]
fn a_second_coordinator_on_the_same_state_dir_is_refused() {
    let c = Coordinator::start(&["--local-builds", "1"]);
    let out = run(common::gbc().arg("coordinator").arg("--state-dir").arg(&c.state).args(common::sandbox_args()));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("gbc.sock: another coordinator is already listening there"), "{err}");
    assert_eq!(c.machines().len(), 1);
}

#[test]
fn machines_shows_the_local_machine() {
    let c = Coordinator::start(&["--local-builds", "3"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m: Vec<Value> = serde_json::from_str(&run_ok_str(&mut c.gbc(&["machines", "--json"]))).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["name"], "localhost");
        assert_eq!(m[0]["parallel_builds"], 3);
        if m[0]["state"] == "up" {
            assert!(m[0]["load1"].is_number(), "{m:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{m:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let human = run_ok_str(&mut c.gbc(&["machines"]));
    assert!(human.starts_with("localhost  up since "), "{human}");
}

/// kill -9 at random moments of a run of a few hundred builds: after each restart nothing
/// submitted is lost, builds that were running run again, and every build ends exactly once.
#[test]
fn kill_9_at_random_moments_loses_nothing() {
    let n = 200;
    let salt = salt();
    let out = run_ok_str(nix("nix-instantiate").arg(common::repo_path(QUEUE)).args([
        "--argstr",
        "salt",
        &salt,
        "--arg",
        "n",
        &n.to_string(),
        "-A",
        "many",
    ]));
    let drvs: Vec<&str> = out.lines().collect();
    assert_eq!(drvs.len(), n);
    let mut c = Coordinator::start(&["--local-builds", "2"]);
    let mut uuids = c.submit(&drvs[..150], &[]);
    let mut next = common::clock_rng();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(200 + next() % 1500));
        if round == 2 {
            // Submitted, answered, killed at once: the builds must still be there.
            uuids.extend(c.submit(&drvs[150..], &[]));
        }
        c.kill9();
        c.restart();
        // Nothing submitted is lost.
        let list: Vec<Value> =
            serde_json::from_str(&run_ok_str(&mut c.gbc(&["builds", "--json", "--limit", "1000"]))).unwrap();
        let known: BTreeSet<&str> = list.iter().map(|b| b["uuid"].as_str().unwrap()).collect();
        for u in &uuids {
            assert!(known.contains(u.as_str()), "round {round}: {u} lost");
        }
    }
    let mut w = c.gbc(&["watch"]);
    w.args(&uuids).stdout(Stdio::null());
    let w = run(&mut w);
    assert!(w.status.success(), "{}\n{}", stderr(&w), c.log());

    let list: Vec<Value> =
        serde_json::from_str(&run_ok_str(&mut c.gbc(&["builds", "--json", "--limit", "1000"]))).unwrap();
    assert_eq!(list.len(), n, "exactly one build per submitted derivation");
    let mut interrupted = 0;
    for b in &list {
        assert_eq!(b["state"], "succeeded", "{b}");
        let d = c.show(b["uuid"].as_str().unwrap());
        let attempts = d["attempt_list"].as_array().unwrap();
        // Every attempt ended; exactly one succeeded, the last.
        assert!(attempts.iter().all(|a| a["status"].is_string()), "{d}");
        assert_eq!(attempts.iter().filter(|a| a["status"] == "success").count(), 1, "{d}");
        assert_eq!(attempts.last().unwrap()["status"], "success", "{d}");
        interrupted += attempts.iter().filter(|a| a["status"] == "interrupted").count();
    }
    eprintln!("{interrupted} attempts were interrupted by kill -9");
    // No half-written log remains.
    let files = walk(&c.state.join("logs"));
    assert!(files.iter().all(|f| f.ends_with(".log.zst")), "{files:?}");
}

/// coordinator.ron: an error stops the coordinator before it starts, naming file, line and column;
/// flags override the file; while running, a broken edit is logged and changes nothing, and a good
/// one is taken.
#[test]
fn coordinator_ron_is_checked_at_start_and_re_read_while_running() {
    let dir = common::tempdir();
    let conf = dir.path().join("coordinator.ron");
    let key = "cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    let good = |n: usize| {
        let urls: Vec<String> = (0..n).map(|i| format!("\"http://127.0.0.1:{}\"", 9000 + i)).collect();
        format!("(\n  substituters: [{}],\n  substituter_keys: [\"{key}\"],\n)\n", urls.join(", "))
    };
    let start = |conf: &std::path::Path, extra: &[&str]| {
        let mut cmd = common::gbc();
        cmd.arg("coordinator").arg("--state-dir").arg(dir.path().join("state")).arg("--config").arg(conf).args(extra);
        common::run_within(&mut cmd, 20).expect("a coordinator with a bad file stops at once")
    };
    std::fs::write(&conf, "(\n  substituters: [\"ftp://x\"],\n)\n").unwrap();
    let out = start(&conf, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("coordinator.ron:2:18: substituter \"ftp://x\": expected an http"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // A flag replaces the file's list, and keys are still required.
    std::fs::write(&conf, "(substituter_keys: [])\n").unwrap();
    let out = start(&conf, &["--substituter", "http://127.0.0.1:9"]);
    assert!(stderr(&out).contains("no substituter_keys"), "{}", stderr(&out));

    std::fs::write(&conf, good(2)).unwrap();
    let c = Coordinator::start(&["--config", conf.to_str().unwrap()]);
    c.wait_until("it says what it uses", 20, || c.log().contains("2 substituters, 1 substituter keys"));
    std::fs::write(&conf, good(3).replace("substituters", "substituterz")).unwrap();
    c.wait_until("the broken edit is logged", 20, || c.log().contains("keeping the previous settings"));
    assert!(c.log().contains("coordinator.ron:2:3: Unexpected field named `substituterz`"), "{}", c.log());
    std::fs::write(&conf, good(3)).unwrap();
    c.wait_until("the good edit is taken", 20, || c.log().contains("re-read: 3 substituters"));
}
