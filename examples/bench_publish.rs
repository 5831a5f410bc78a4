//! Benchmark: publishing a large output in the binary cache, as the coordinator does when its NAR
//! arrives (check the agent's signature over its fingerprint; parse the NAR, scan it for the hash
//! parts of a 300-path input closure, hash it and compress it with zstd into a temporary file; sync,
//! rename, write and sign the narinfo), against `zstd -3` compressing the same NAR into a file on
//! the same file system. Run by scripts/bench-cache.
//!
//! Usage: bench_publish NAR_FILE WORK_DIR ROUNDS
//!        bench_publish fill NAR_FILE STATE_DIR COUNT
//!
//! The NAR arrives in 256 KiB chunks read from NAR_FILE, as the protocol delivers them. Prints
//! each round and the medians' ratio. `fill` instead publishes COUNT pieces of NAR_FILE as as many
//! store paths in STATE_DIR/cache (for the HTTP benchmark) and prints their hash parts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gbc::build::refs::RefScanner;
use gbc::cache::{Cache, Compression, Output};
use gbc::formats::hash::HashSink;
use gbc::formats::narinfo::fingerprint;
use gbc::formats::signing::SecretKey;
use gbc::formats::store_path::StoreDir;
use gbc::pipe::Both;
use gbc::protocol::NAR_CHUNK;

fn publish(nar_file: &Path, root: &Path, host: &SecretKey, path: &str) -> Duration {
    // What the agent claimed (computed beforehand, as the agent does).
    let mut f = std::fs::File::open(nar_file).unwrap();
    let mut sink = HashSink::new();
    std::io::copy(&mut f, &mut sink).unwrap();
    let (nar_hash, nar_size) = sink.finish();
    let sig = host.sign(fingerprint(path, &nar_hash, nar_size, &[]).as_bytes());

    let _ = std::fs::remove_dir_all(root);
    let cache = Cache::open(
        root,
        StoreDir::new("/nix/store").unwrap(),
        SecretKey::generate("bench-cache-1").unwrap(),
        Compression::Zstd,
    )
    .unwrap();
    let t0 = Instant::now();
    let public = host.public();
    assert!(public.verify(fingerprint(path, &nar_hash, nar_size, &[]).as_bytes(), &sig));
    // As the coordinator's receiving thread: chunks parsed as a NAR, scanned, staged.
    let candidates: Vec<String> = (0..300)
        .map(|i| {
            let digest = gbc::formats::hash::sha256(format!("input-{i}").as_bytes());
            let hash = gbc::formats::nix32::encode(&gbc::formats::store_path::compress_hash(&digest));
            format!("/nix/store/{hash}-input-{i}")
        })
        .collect();
    let scanner = RefScanner::new(candidates.iter().map(String::as_str));
    let chunks = Chunks { file: std::fs::File::open(nar_file).unwrap(), chunk: vec![0u8; NAR_CHUNK] };
    let (Both(w, scanner), _) = gbc::cache::check_nar(chunks, Both(cache.begin().unwrap(), scanner), false).unwrap();
    assert!(scanner.finish().is_empty());
    let staged = w.finish().unwrap();
    assert_eq!(staged.nar_hash, nar_hash);
    let out = Output {
        path: path.to_owned(),
        nar_hash,
        nar_size,
        references: vec![],
        deriver: None,
        system: Some("x86_64-linux".into()),
        signatures: vec![sig],
        cache_signs: true,
        ca: None,
    };
    let published = cache.publish(vec![(out, staged)]).unwrap();
    assert_eq!(published.len(), 1);
    t0.elapsed()
}

/// The NAR as the protocol delivers it: in chunks of at most [`NAR_CHUNK`] bytes.
struct Chunks {
    file: std::fs::File,
    chunk: Vec<u8>,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk.len());
        self.file.read(&mut buf[..n])
    }
}

fn zstd(nar_file: &Path, out: &Path) -> Duration {
    let t0 = Instant::now();
    let status = Command::new("zstd").args(["-3", "-q", "-f", "-o"]).arg(out).arg(nar_file).status().unwrap();
    assert!(status.success());
    // Synced, as the cache's file is.
    std::fs::File::open(out).unwrap().sync_all().unwrap();
    t0.elapsed()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Publish `count` slices of the file as separate paths; print each path's hash part.
fn fill(nar_file: &Path, state: &Path, count: usize) {
    let cache = Cache::open(
        &state.join("cache"),
        StoreDir::new("/nix/store").unwrap(),
        SecretKey::generate("bench-cache-1").unwrap(),
        Compression::Zstd,
    )
    .unwrap();
    let bytes = std::fs::read(nar_file).unwrap();
    let piece = bytes.len() / count;
    for i in 0..count {
        let slice = &bytes[i * piece..(i + 1) * piece];
        let digest = gbc::formats::hash::sha256(format!("bench-{i}").as_bytes());
        let hash = gbc::formats::nix32::encode(&gbc::formats::store_path::compress_hash(&digest));
        let path = format!("/nix/store/{hash}-bench-{i}");
        let mut w = cache.begin().unwrap();
        w.write_all(slice).unwrap();
        let staged = w.finish().unwrap();
        let out = Output {
            path,
            nar_hash: staged.nar_hash.clone(),
            nar_size: staged.nar_size,
            references: vec![],
            deriver: None,
            system: None,
            signatures: Vec::new(),
            cache_signs: true,
            ca: None,
        };
        cache.publish(vec![(out, staged)]).unwrap();
        println!("{hash}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args[1] == "fill" {
        return fill(Path::new(&args[2]), Path::new(&args[3]), args[4].parse().unwrap());
    }
    let (nar_file, work, rounds) = (Path::new(&args[1]), Path::new(&args[2]), args[3].parse::<usize>().unwrap());
    let host = SecretKey::generate("bench-host-1").unwrap();
    let path = "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-bench-output";
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let t = zstd(nar_file, &work.join("zstd-out.zst")).as_secs_f64();
        let o = publish(nar_file, &work.join("cache"), &host, path).as_secs_f64();
        println!("round {r}: publish {o:.3} s, zstd -3 {t:.3} s, ratio {:.2}", o / t);
        ours.push(o);
        theirs.push(t);
    }
    let (o, t) = (median(&mut ours), median(&mut theirs));
    println!("median: publish {o:.3} s, zstd -3 {t:.3} s, ratio {:.2} (target <= 1.3)", o / t);
}
