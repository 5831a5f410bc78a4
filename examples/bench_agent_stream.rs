//! Benchmark: streaming a large output NAR from `gbc agent` through the protocol, against piping
//! the same bytes through `cat` over the same kind of pipe. Run by scripts/bench-agent.
//!
//! Usage: bench_agent_stream GBC_BINARY WORK_DIR SIZE_BYTES ROUNDS
//!
//! Builds (once) a derivation whose output is SIZE_BYTES of random data, in an agent store under
//! WORK_DIR, then per round: asks a fresh agent to build it again (the output is valid, so the agent
//! only streams its NAR) and times from `finished` to `nar_end` as a reader that parses every frame
//! sees it; and times `cat NAR_FILE` into a reader that discards the bytes, over a pipe of the same
//! size as the agent's (1 MiB). Prints the medians and their ratio.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gbc::formats::derivation::{Derivation, Output};
use gbc::formats::store_path::StoreDir;
use gbc::protocol::{Frame, FrameReader, Message, PROTOCOL_VERSION, write_frame};

fn derivation(size: u64) -> (String, Derivation) {
    let sd = StoreDir::new("/gnu/store").unwrap();
    let name = "bench-big-output";
    let script = format!("/usr/bin/head -c {size} /dev/urandom > $out");
    // Any valid path will do before hashing: the hash masks output paths.
    let placeholder = format!("/gnu/store/00000000000000000000000000000000-{name}");
    let mut drv = Derivation {
        outputs: BTreeMap::from([(
            "out".to_owned(),
            Output { path: placeholder.clone(), hash_algo: String::new(), hash: String::new() },
        )]),
        input_drvs: BTreeMap::new(),
        input_srcs: Default::default(),
        system: "x86_64-linux".to_owned(),
        builder: "/bin/sh".to_owned(),
        args: vec!["-c".to_owned(), script],
        env: BTreeMap::from([
            ("builder".to_owned(), "/bin/sh".to_owned()),
            ("name".to_owned(), name.to_owned()),
            ("out".to_owned(), placeholder.clone()),
            ("system".to_owned(), "x86_64-linux".to_owned()),
        ]),
    };
    // Output paths as Nix computes them: hash the derivation with its outputs blanked.
    let paths = drv.hash_modulo(&sd, name, true, &|_| None).unwrap();
    let out = sd.display(&sd.make_output_path("out", &paths["out"], name).unwrap());
    drv.outputs.get_mut("out").unwrap().path = out.clone();
    drv.env.insert("out".to_owned(), out);
    let drv_path = sd.display(&drv.drv_path(&sd, name).unwrap());
    (drv_path, drv)
}

/// Build (or just re-announce) the derivation with a fresh agent; returns the time from `finished`
/// to `nar_end`, and the NAR size.
fn agent_round(gbc: &Path, state: &Path, drv_path: &str, drv: &Derivation) -> (Duration, u64) {
    let mut child = Command::new(gbc)
        .arg("agent")
        .arg("--state-dir")
        .arg(state)
        // The builder is the host's /bin/sh.
        .args([
            "--sandbox-path",
            "/bin",
            "--sandbox-path",
            "/usr",
            "--sandbox-path",
            "/lib",
            "--sandbox-path",
            "/lib64?",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut reader = FrameReader::from_read(child.stdout.take().unwrap());
    let send = |stdin: &mut std::process::ChildStdin, m: Message| {
        write_frame(stdin, &Frame::new(m)).unwrap();
        stdin.flush().unwrap();
    };
    send(
        &mut stdin,
        Message::Hello { protocol: PROTOCOL_VERSION, gbc_version: "bench".into(), host: None, idle_secs: None },
    );
    let aterm = String::from_utf8(drv.to_aterm()).unwrap();
    send(
        &mut stdin,
        Message::Build {
            build: "b".into(),
            drv_path: drv_path.into(),
            drv: aterm,
            inputs: vec![],
            max_silent_secs: None,
            timeout_secs: None,
            cores: None,
        },
    );
    send(&mut stdin, Message::Start { build: "b".into() });
    let mut started = None;
    let mut bytes = 0u64;
    let mut payload = Vec::new();
    loop {
        let message = reader.read_message(&mut payload).unwrap().expect("agent closed the stream");
        match message {
            Message::Finished { status, .. } => {
                assert_eq!(status, gbc::protocol::BuildStatus::Success);
                started = Some(Instant::now());
            }
            Message::NarChunk { .. } => bytes += payload.len() as u64,
            Message::NarEnd { .. } => break,
            Message::Error { message, .. } => panic!("agent: {message}"),
            _ => {}
        }
    }
    let took = started.unwrap().elapsed();
    drop(stdin);
    child.wait().unwrap();
    (took, bytes)
}

/// `cat FILE` into this process over a pipe, discarding; returns the time taken.
fn cat_round(file: &Path) -> Duration {
    let start = Instant::now();
    let mut child = Command::new("cat").arg(file).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    // The same kind of pipe as the agent's: it grows its stdout pipe to 1 MiB.
    rustix::pipe::fcntl_setpipe_size(&out, 1 << 20).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while out.read(&mut buf).unwrap() > 0 {}
    child.wait().unwrap();
    start.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (gbc, work, size, rounds) =
        (Path::new(&args[1]), Path::new(&args[2]), args[3].parse::<u64>().unwrap(), args[4].parse::<usize>().unwrap());
    let (drv_path, drv) = derivation(size);
    let state = work.join("state");
    // First round builds the output (not timed); later rounds only stream it.
    let (_, nar_size) = agent_round(gbc, &state, &drv_path, &drv);
    let nar_file = work.join("output.nar");
    let status = Command::new(gbc)
        .args(["nar", "dump"])
        .arg(state.join("agent/store").join(Path::new(&drv.outputs["out"].path).file_name().unwrap()))
        .stdout(std::fs::File::create(&nar_file).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::metadata(&nar_file).unwrap().len(), nar_size);

    let (mut agent, mut cat) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        agent.push(agent_round(gbc, &state, &drv_path, &drv).0);
        cat.push(cat_round(&nar_file));
    }
    let (a, c) = (median(agent), median(cat));
    let gb = nar_size as f64 / 1e9;
    println!("NAR of {:.2} GB, {rounds} rounds each, medians", gb);
    println!("agent protocol (finished → nar_end): {:.3} s ({:.2} GB/s)", a.as_secs_f64(), gb / a.as_secs_f64());
    println!("cat NAR | reader:                    {:.3} s ({:.2} GB/s)", c.as_secs_f64(), gb / c.as_secs_f64());
    let ratio = a.as_secs_f64() / c.as_secs_f64();
    println!("ratio {ratio:.2} {}", if ratio <= 1.15 { "ok (target <= 1.15)" } else { "MISSED (target <= 1.15)" });
    if ratio > 1.15 {
        std::process::exit(1);
    }
}
