//! `gbc agent` driven as a real child process over its stdin/stdout: the hello exchange, builds
//! with inputs sent to it, signed outputs equal to Nix's, and a hostile peer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{gbc, nix, nix_realise, run_ok, run_ok_str, salt, tempdir};
use gbc::formats::hash::Hash;
use gbc::formats::narinfo::fingerprint;
use gbc::formats::signing::{PublicKey, Signature};
use gbc::protocol::{BuildStatus, Frame, FrameReader, HostFacts, Message, PROTOCOL_VERSION, PathMeta, write_frame};

struct Agent {
    child: Child,
    stdin: ChildStdin,
    frames: mpsc::Receiver<Frame>,
    host: HostFacts,
}

impl Agent {
    fn start(state: &std::path::Path) -> Agent {
        let mut child = gbc()
            .arg("agent")
            .arg("--state-dir")
            .arg(state)
            .args(common::sandbox_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, frames) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = FrameReader::from_read(stdout);
            while let Ok(Some(f)) = r.read() {
                if tx.send(f).is_err() {
                    break;
                }
            }
        });
        let hello = frames.recv_timeout(Duration::from_secs(30)).unwrap();
        let Message::Hello { protocol, host: Some(host), .. } = hello.message else { panic!("{hello:?}") };
        assert_eq!(protocol, PROTOCOL_VERSION);
        let mut agent = Agent { child, stdin, frames, host };
        agent.send(Message::Hello {
            protocol: PROTOCOL_VERSION,
            gbc_version: "test".into(),
            host: None,
            idle_secs: None,
        });
        agent
    }

    fn send(&mut self, m: Message) {
        self.send_frame(Frame::new(m));
    }

    fn send_frame(&mut self, f: Frame) {
        write_frame(&mut self.stdin, &f).unwrap();
        self.stdin.flush().unwrap();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    fn next(&self) -> Frame {
        self.frames.recv_timeout(Duration::from_secs(60)).expect("agent went quiet")
    }

    /// Frames until (and including) the first for which `done` is true; log and chunk frames kept.
    fn until(&self, done: impl Fn(&Message) -> bool) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let f = self.next();
            let stop = done(&f.message);
            out.push(f);
            if stop {
                return out;
            }
        }
    }

    fn send_nar(&mut self, transfer: u64, meta: PathMeta, nar: &[u8]) {
        self.send(Message::NarStart { transfer, build: None, meta });
        for chunk in nar.chunks(100_000) {
            self.send_frame(Frame {
                message: Message::NarChunk { transfer, payload: chunk.len() as u64 },
                payload: chunk.to_vec(),
            });
        }
        self.send(Message::NarEnd { transfer });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn instantiate(attrs: &[&str], salt: &str) -> BTreeMap<String, String> {
    common::instantiate("tests/nix/derivations.nix", None, attrs, salt).into_iter().collect()
}

fn build_msg(id: &str, drv: &str, inputs: Vec<String>) -> Message {
    Message::Build {
        build: id.into(),
        drv_path: drv.into(),
        drv: std::fs::read_to_string(drv).unwrap(),
        inputs,
        max_silent_secs: None,
        timeout_secs: None,
        cores: None,
    }
}

/// The NAR and metadata of a path in Nix's store.
fn nix_path(path: &str) -> (PathMeta, Vec<u8>) {
    let nar_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", path])).trim().to_owned();
    let references: Vec<String> =
        run_ok_str(nix("nix-store").args(["-q", "--references", path])).lines().map(str::to_owned).collect();
    let nar = run_ok(nix("nix-store").args(["--dump", path]));
    (PathMeta { path: path.into(), nar_hash, nar_size: nar.len() as u64, references, deriver: None }, nar)
}

#[test]
fn builds_with_inputs_sent_to_the_agent_and_signs_outputs_nix_agrees_with() {
    let drvs = instantiate(&["chainA", "chainB"], &salt());
    // Nix builds both, so we have chain-a's output to send and chain-b's hash to compare with.
    let b_out = nix_realise(&[&drvs["chainB"]], &[]).trim().to_owned();
    let a_out = nix_realise(&[&drvs["chainA"]], &[]).trim().to_owned();
    let tmp = tempdir();
    let mut agent = Agent::start(tmp.path());
    let key = PublicKey::parse(&agent.host.signing_key).unwrap();
    assert_eq!(agent.host.store_dirs, vec!["/gnu/store", "/nix/store"]);

    agent.send(build_msg("b", &drvs["chainB"], vec![a_out.clone()]));
    let f = agent.next();
    assert_eq!(f.message, Message::Inputs { build: "b".into(), missing: vec![a_out.clone()] });

    let (meta, nar) = nix_path(&a_out);
    agent.send_nar(5, meta, &nar);
    assert_eq!(agent.next().message, Message::PathAdded { transfer: 5, path: a_out.clone() });

    agent.send(Message::Start { build: "b".into() });
    let frames = agent.until(|m| matches!(m, Message::NarEnd { .. }));
    assert!(matches!(frames[0].message, Message::Started { .. }), "{:?}", frames[0]);
    let finished = frames.iter().find_map(|f| match &f.message {
        Message::Finished { status, outputs, .. } => Some((status.clone(), outputs.clone())),
        _ => None,
    });
    let (status, outputs) = finished.unwrap();
    assert_eq!(status, BuildStatus::Success);
    assert_eq!(outputs.len(), 1);
    let out = &outputs[0];
    assert_eq!(out.meta.path, b_out);
    let nix_hash = run_ok_str(nix("nix-store").args(["-q", "--hash", &b_out])).trim().to_owned();
    assert_eq!(out.meta.nar_hash, nix_hash);

    // The signature is the agent's, over the Nix fingerprint.
    let hash = Hash::parse(&out.meta.nar_hash).unwrap();
    let fp = fingerprint(&out.meta.path, &hash, out.meta.nar_size, &out.meta.references);
    assert!(key.verify(fp.as_bytes(), &Signature::parse(&out.signature).unwrap()));

    // The NAR that followed is exactly Nix's.
    let nar: Vec<u8> = frames
        .iter()
        .filter(|f| matches!(f.message, Message::NarChunk { .. }))
        .flat_map(|f| f.payload.clone())
        .collect();
    assert!(nar == run_ok(nix("nix-store").args(["--dump", &b_out])), "NAR differs from nix-store --dump");
}

#[test]
fn a_hostile_peer_gets_errors_and_nothing_half_written_becomes_valid() {
    let drvs = instantiate(&["chainA", "chainB"], &salt());
    let a_out = nix_realise(&[&drvs["chainA"]], &[]).trim().to_owned();
    let tmp = tempdir();
    let mut agent = Agent::start(tmp.path());

    agent.send_raw(b"this is not json\n");
    assert!(matches!(agent.next().message, Message::Error { ref message, .. } if message.contains("bad message")));
    agent.send_raw(b"{\"type\":\"self_destruct\"}\n");
    assert!(matches!(agent.next().message, Message::Error { ref message, .. } if message.contains("unknown variant")));
    let mut long = vec![b'x'; gbc::protocol::MAX_LINE + 100];
    long.push(b'\n');
    agent.send_raw(&long);
    assert!(matches!(agent.next().message, Message::Error { ref message, .. } if message.contains("longer than")));

    // A NAR whose contents do not match its declared hash.
    let (mut meta, nar) = nix_path(&a_out);
    // sha256 of the empty string: a well-formed hash that is not this NAR's.
    meta.nar_hash = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".into();
    agent.send_nar(1, meta, &nar);
    let f = agent.next();
    assert!(
        matches!(f.message, Message::Error { transfer: Some(1), ref message, .. } if message.contains("does not match")),
        "{f:?}"
    );

    // A path outside the accepted store dirs.
    let (mut meta, nar) = nix_path(&a_out);
    meta.path = a_out.replace("/nix/store/", "/etc/");
    agent.send_nar(2, meta, &nar);
    let f = agent.next();
    assert!(
        matches!(f.message, Message::Error { transfer: Some(2), ref message, .. } if message.contains("not a store path")),
        "{f:?}"
    );

    // A truncated NAR with the right hash declared.
    let (meta, nar) = nix_path(&a_out);
    agent.send_nar(3, meta, &nar[..nar.len() - 16]);
    let f = agent.next();
    assert!(matches!(f.message, Message::Error { transfer: Some(3), .. }), "{f:?}");

    // A derivation whose contents do not give its path.
    let mut m = build_msg("x", &drvs["chainB"], vec![]);
    if let Message::Build { drv, .. } = &mut m {
        *drv = drv.replacen("\"-c\"", "\"-e\"", 1);
    }
    agent.send(m);
    assert!(
        matches!(agent.next().message, Message::Error { build: Some(ref b), ref message, .. } if b == "x" && message.contains("contents give"))
    );

    // After all that, the session still works and chain-a's output is still not valid.
    agent.send(build_msg("b", &drvs["chainB"], vec![a_out.clone()]));
    assert_eq!(agent.next().message, Message::Inputs { build: "b".into(), missing: vec![a_out.clone()] });
    let leftovers = std::fs::read_dir(tmp.path().join("agent/store/.gbc-tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "temporary files left behind");
}

fn instantiate_builds(attrs: &[&str], salt: &str) -> BTreeMap<String, String> {
    common::instantiate("tests/nix/builds.nix", None, attrs, salt).into_iter().collect()
}

#[test]
fn builds_run_at_once_and_their_messages_interleave() {
    let drvs = instantiate_builds(&["pauseA", "pauseB", "slow"], &salt());
    let tmp = tempdir();
    let mut agent = Agent::start(tmp.path());
    for (id, attr) in [("a", "pauseA"), ("b", "pauseB"), ("s", "slow")] {
        agent.send(build_msg(id, &drvs[attr], vec![]));
        assert!(matches!(agent.next().message, Message::Inputs { ref missing, .. } if missing.is_empty()));
    }
    for id in ["a", "b", "s"] {
        agent.send(Message::Start { build: id.into() });
    }
    // Cancel the slow one while it runs.
    let mut events: Vec<(String, String)> = Vec::new();
    let mut finished = BTreeMap::new();
    let mut canceled_sent = false;
    let mut transfers: Vec<(u64, String)> = Vec::new();
    let mut nar_ends = 0;
    while finished.len() < 3 || nar_ends < 2 {
        let f = agent.next();
        match f.message {
            Message::Started { build } => {
                events.push((build.clone(), "started".into()));
                if build == "s" && !canceled_sent {
                    agent.send(Message::Cancel { build: "s".into() });
                    canceled_sent = true;
                }
            }
            Message::Log { build, .. } => events.push((build, String::from_utf8_lossy(&f.payload).trim().to_owned())),
            Message::Finished { build, status, .. } => {
                events.push((build.clone(), "finished".into()));
                finished.insert(build, status);
            }
            Message::NarStart { transfer, build, .. } => transfers.push((transfer, build.unwrap_or_default())),
            Message::NarEnd { .. } => nar_ends += 1,
            _ => {}
        }
    }
    assert_eq!(finished["a"], BuildStatus::Success);
    assert_eq!(finished["b"], BuildStatus::Success);
    assert_eq!(finished["s"], BuildStatus::Canceled);
    // The two outputs' NARs travel as different transfers: chunks name only the transfer.
    assert_eq!(transfers.len(), 2, "{transfers:?}");
    assert_ne!(transfers[0].0, transfers[1].0, "{transfers:?}");
    // Both pauses began before either ended: they ran at the same time.
    let pos = |b: &str, what: &str| events.iter().position(|(x, w)| x == b && w.contains(what)).unwrap();
    assert!(pos("a", "a begins") < pos("b", "finished") && pos("b", "b begins") < pos("a", "finished"), "{events:?}");
}

#[test]
fn a_kill_during_an_upload_leaves_nothing_valid() {
    let drvs = instantiate(&["chainA", "chainB"], &salt());
    let a_out = nix_realise(&[&drvs["chainA"]], &[]).trim().to_owned();
    let tmp = tempdir();
    let (meta, nar) = nix_path(&a_out);
    {
        let mut agent = Agent::start(tmp.path());
        agent.send(Message::NarStart { transfer: 1, build: None, meta });
        let half = &nar[..nar.len() / 2];
        agent.send_frame(Frame {
            message: Message::NarChunk { transfer: 1, payload: half.len() as u64 },
            payload: half.to_vec(),
        });
        // Killed once it is writing the half it got (drop kills the agent with SIGKILL).
        let tmp = tmp.path().join("agent/store/.gbc-tmp");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::fs::read_dir(&tmp).map_or(0, |d| d.count()) == 0 {
            assert!(std::time::Instant::now() < deadline, "the agent never started receiving");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut agent = Agent::start(tmp.path());
    agent.send(build_msg("b", &drvs["chainB"], vec![a_out.clone()]));
    assert_eq!(agent.next().message, Message::Inputs { build: "b".into(), missing: vec![a_out.clone()] });
    assert_eq!(std::fs::read_dir(tmp.path().join("agent/store/.gbc-tmp")).unwrap().count(), 0);
    let base = std::path::Path::new(&a_out).file_name().unwrap();
    assert!(!tmp.path().join("agent/store").join(base).exists());
    // Starting anyway ends the build with the list of what is missing.
    agent.send(Message::Start { build: "b".into() });
    let frames = agent.until(|m| matches!(m, Message::Finished { .. }));
    let Some(Message::Finished { status, .. }) = frames.last().map(|f| &f.message) else { unreachable!() };
    assert_eq!(*status, BuildStatus::MissingInputs { paths: vec![a_out.clone()] });
}

/// `gbc agent` with every stream piped, for tests that speak to it by hand.
fn spawn_piped(state: &std::path::Path) -> Child {
    gbc()
        .arg("agent")
        .arg("--state-dir")
        .arg(state)
        .args(common::sandbox_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn incompatible_protocol_versions_are_refused_clearly() {
    let tmp = tempdir();
    let mut child = spawn_piped(tmp.path());
    let mut stdin = child.stdin.take().unwrap();
    write_frame(
        &mut stdin,
        &Frame::new(Message::Hello { protocol: 999, gbc_version: "future".into(), host: None, idle_secs: None }),
    )
    .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("incompatible protocol version 999"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("incompatible protocol version 999") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn an_agent_that_hears_nothing_for_idle_secs_ends_its_session_and_frees_its_store() {
    let tmp = tempdir();
    let mut child = spawn_piped(tmp.path());
    // Its input stays open, as over a connection whose link was cut: only the silence tells.
    let mut stdin = child.stdin.take().unwrap();
    let hello = Message::Hello { protocol: PROTOCOL_VERSION, gbc_version: "t".into(), host: None, idle_secs: Some(1) };
    write_frame(&mut stdin, &Frame::new(hello)).unwrap();
    stdin.flush().unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the agent is still waiting");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("nothing from the coordinator for 1 s"), "{err}");
    // Its store is free for the next session.
    let mut next = spawn_piped(tmp.path());
    drop(next.stdin.take());
    let out = next.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(stdin);
}

/// Issue 13: a peer can't make the agent start unbounded threads: past 16 transfers under way, a
/// new one is refused with an error naming it, and the session goes on.
#[test]
fn transfers_under_way_are_bounded() {
    let tmp = tempdir();
    let mut agent = Agent::start(tmp.path());
    let meta = |i: u64| PathMeta {
        path: format!("/nix/store/{}-open-{i}", "0".repeat(32)),
        nar_hash: format!("sha256:{}", "0".repeat(52)),
        nar_size: 1000,
        references: vec![],
        deriver: None,
    };
    for i in 1..=17 {
        agent.send(Message::NarStart { transfer: i, build: None, meta: meta(i) });
    }
    match agent.next().message {
        Message::Error { transfer: Some(17), message, .. } => assert!(message.contains("16 transfers"), "{message}"),
        other => panic!("{other:?}"),
    }
    agent.send(Message::Ping {});
    assert!(matches!(agent.next().message, Message::Pong { .. }));
}
