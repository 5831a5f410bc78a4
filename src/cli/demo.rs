//! `gbc demo`: a tour of the format tools on embedded examples, needing nothing but gbc.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;

use anyhow::Context as _;

use crate::formats::derivation::{Derivation, DrvGraph};
use crate::formats::nar;
use crate::formats::narinfo::NarInfo;
use crate::formats::signing::{SecretKey, TrustedKeys};
use crate::formats::store_path::{StoreDir, StorePath};

/// Two derivations written by Nix 2.8: chain-b reads chain-a's output.
const CHAIN_A: (&str, &[u8]) = (
    "/nix/store/1h45s9lqz6rc7vrxkxajb6xh8dbd0pq2-chain-a.drv",
    include_bytes!("../../tests/fixtures/drv/1h45s9lqz6rc7vrxkxajb6xh8dbd0pq2-chain-a.drv"),
);
const CHAIN_B: (&str, &[u8]) = (
    "/nix/store/8za5xq2rx9g4ci16bn7hk150r7nhw8n8-chain-b.drv",
    include_bytes!("../../tests/fixtures/drv/8za5xq2rx9g4ci16bn7hk150r7nhw8n8-chain-b.drv"),
);

pub fn run() -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    let tmp = tempdir()?;
    let result = tour(&mut out, &tmp);
    let _ = fs::remove_dir_all(&tmp);
    result
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| anyhow::anyhow!("random bytes: {e}"))?;
    let dir = std::env::temp_dir().join(format!("gbc-demo-{}", crate::formats::hash::hex::encode(&r)));
    fs::create_dir(&dir).with_context(|| dir.display().to_string())?;
    Ok(dir)
}

fn tour(out: &mut impl io::Write, tmp: &std::path::Path) -> anyhow::Result<()> {
    writeln!(out, "gbc demo: the store formats gbc's builds and binary cache rest on\n")?;

    // 1. A tree, its NAR and hash.
    let tree = tmp.join("hello");
    fs::create_dir_all(tree.join("bin"))?;
    fs::write(tree.join("bin/hello"), "#!/bin/sh\necho hello\n")?;
    fs::set_permissions(tree.join("bin/hello"), fs::Permissions::from_mode(0o755))?;
    fs::write(tree.join("README"), "A tiny package.\n")?;
    std::os::unix::fs::symlink("bin/hello", tree.join("run"))?;
    let (hash, size) = nar::nar_hash(&tree)?;
    writeln!(out, "1. NAR of a small tree (an executable, a file, a symlink):")?;
    writeln!(out, "   {size} bytes, hash {}", hash.to_nix32_string())?;

    // 2. Restore it elsewhere and hash again.
    let mut bytes = Vec::new();
    nar::dump_path(&tree, &mut bytes)?;
    let copy = tmp.join("copy");
    nar::restore(&bytes[..], &copy)?;
    let (hash2, _) = nar::nar_hash(&copy)?;
    writeln!(
        out,
        "2. Restored from the NAR and hashed again: {}",
        if hash2 == hash { "identical" } else { "DIFFERENT" }
    )?;
    let mut bad = bytes.clone();
    bad.truncate(bytes.len() - 9);
    let err = nar::restore(&bad[..], &tmp.join("bad")).err().map(|e| e.to_string()).unwrap_or_default();
    writeln!(out, "   A truncated copy is refused, leaving nothing behind: {err}")?;

    // 3. A derivation: parse, check its .drv path and outputs.
    let store = StoreDir::new("/nix/store")?;
    let drv = Derivation::parse(CHAIN_B.1)?;
    let loaded: BTreeMap<&str, &[u8]> = BTreeMap::from([CHAIN_A]);
    let mut graph = DrvGraph::new();
    graph.resolve_inputs(&store, &drv, &mut |p: &str| -> Result<Vec<u8>, io::Error> {
        loaded.get(p).map(|b| b.to_vec()).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    })?;
    let drv_path = drv.drv_path(&store, "chain-b")?;
    let outputs = drv.validate_outputs(&store, "chain-b", &graph.lookup())?;
    writeln!(out, "3. Derivation chain-b (built on chain-a), written by Nix:")?;
    writeln!(out, "   .drv path from its contents: {}", store.display(&drv_path))?;
    for (o, p) in &outputs {
        writeln!(out, "   output {o}: {} (matches the declared path)", store.display(p))?;
    }
    let mut forged = drv.clone();
    let victim = "/nix/store/00000000000000000000000000000000-chain-b";
    forged.outputs.entry("out".to_owned()).and_modify(|o| o.path = victim.to_owned());
    let err = forged.validate_outputs(&store, "chain-b", &graph.lookup()).err().map(|e| e.to_string());
    writeln!(out, "   A copy claiming another output path is rejected: {}", err.unwrap_or_default())?;

    // 4. A signed narinfo for the tree, as a binary cache would serve it.
    let key = SecretKey::generate("demo-cache-1")?;
    let path = store.make_fixed_output_path(true, &hash, "hello")?;
    let mut info = NarInfo {
        store_dir: store.clone(),
        store_path: path.clone(),
        url: format!("nar/{}.nar", hash.to_nix32()),
        compression: Some("none".to_owned()),
        file_hash: Some(hash.clone()),
        file_size: Some(size),
        nar_hash: hash,
        nar_size: size,
        references: Vec::<StorePath>::new(),
        deriver: None,
        system: None,
        sigs: Vec::new(),
        ca: None,
        extra: Vec::new(),
        guix_signature: None,
    };
    info.sign(&key)?;
    writeln!(out, "4. The tree as store path {} in a binary cache, signed:\n", store.display(&path))?;
    for line in info.to_string().lines() {
        writeln!(out, "   {line}")?;
    }
    let trusted = TrustedKeys::new(vec![key.public()]);
    let ok = info.verify(&trusted)?.is_some();
    info.nar_size += 1;
    let tampered = info.verify(&trusted)?.is_some();
    writeln!(out, "\n   Verified with {}: {ok}; after changing NarSize: {tampered}", key.public())?;
    writeln!(out, "\nThe same operations are commands: gbc nar dump|restore|hash, gbc drv show|path,")?;
    writeln!(out, "gbc keygen, gbc sign, gbc verify (see gbc --help).")?;
    Ok(())
}
