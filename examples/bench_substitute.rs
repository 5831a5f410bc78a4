//! For `scripts/bench-substitute`:
//!
//! - `bench_substitute gen DIR N`: an upstream cache in `DIR/cache` with N narinfos (made-up store
//!   paths and hashes, no NARs) signed by a fresh key; `DIR/paths` lists the paths, `DIR/key.pub`
//!   holds the public key.
//! - `bench_substitute query URL KEY PATHS_FILE ROUNDS`: ask the substituter at URL for every path
//!   of PATHS_FILE, as the coordinator does at submission (`Substituter::query`), once cold and
//!   ROUNDS - 1 times more within the TTL; prints the seconds of each round and how many paths
//!   were found.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use gbc::coordinator_file::{CoordinatorFile, Overrides, Settings};
use gbc::formats::hash::{Hash, HashAlgo};
use gbc::formats::narinfo::NarInfo;
use gbc::formats::signing::SecretKey;
use gbc::formats::store_path::{StoreDir, StorePath};
use gbc::substituter::Substituter;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["gen", dir, n] => generate(Path::new(dir), n.parse()?),
        ["query", url, key, paths, rounds] => query(url, key, Path::new(paths), rounds.parse()?),
        _ => anyhow::bail!("usage: bench_substitute gen DIR N | query URL KEY PATHS_FILE ROUNDS"),
    }
}

fn generate(dir: &Path, n: usize) -> anyhow::Result<()> {
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache)?;
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")?;
    let key = SecretKey::generate("bench-upstream-1")?;
    std::fs::write(dir.join("key.pub"), key.public().to_string())?;
    let store_dir = StoreDir::new("/nix/store")?;
    let mut paths = std::io::BufWriter::new(std::fs::File::create(dir.join("paths"))?);
    for i in 0..n {
        let digest = gbc::formats::hash::sha256(format!("bench path {i}").as_bytes());
        let hash_part = gbc::formats::nix32::encode(&digest[..20]);
        let store_path = StorePath::from_base_name(&format!("{hash_part}-bench-{i}"))?;
        let nar_hash = Hash::new(HashAlgo::Sha256, &gbc::formats::hash::sha256(format!("nar {i}").as_bytes()))?;
        let mut info = NarInfo {
            store_dir: store_dir.clone(),
            store_path: store_path.clone(),
            url: format!("nar/{}.nar", nar_hash.to_nix32()),
            compression: Some("none".into()),
            file_hash: None,
            file_size: None,
            nar_hash,
            nar_size: 1000 + i as u64,
            references: Vec::new(),
            deriver: None,
            system: None,
            sigs: Vec::new(),
            ca: None,
            extra: Vec::new(),
            guix_signature: None,
        };
        info.sign(&key)?;
        std::fs::write(cache.join(format!("{hash_part}.narinfo")), info.to_string())?;
        writeln!(paths, "{}", store_dir.display(&store_path))?;
    }
    paths.flush()?;
    Ok(())
}

fn query(url: &str, key: &str, paths: &Path, rounds: usize) -> anyhow::Result<()> {
    let paths: Vec<String> = std::fs::read_to_string(paths)?.lines().map(str::to_owned).collect();
    let overrides = Overrides {
        substituters: Some(vec![url.to_owned()]),
        substituter_keys: Some(vec![key.to_owned()]),
        narinfo_ttl: Some(Duration::from_secs(3600)),
        ..Overrides::default()
    };
    let settings =
        Settings::resolve(&CoordinatorFile::default(), &overrides, Path::new(".")).map_err(anyhow::Error::msg)?;
    let sub = Substituter::new(&settings, StoreDir::new("/nix/store")?);
    for _ in 0..rounds {
        let t0 = Instant::now();
        let found = sub.query(&paths);
        println!("{:.4} {}", t0.elapsed().as_secs_f64(), found.len());
    }
    Ok(())
}
