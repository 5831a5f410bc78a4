//! Write the example derivation graph to examples/diamond/ (or the directory given): a diamond of
//! /bin/sh derivations for /gnu/store with one that fails on purpose. No Nix or Guix needed; the
//! same input always gives the same files (a test checks the shipped ones are current).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/diamond")), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    for old in std::fs::read_dir(&dir)? {
        let old = old?.path();
        if old.extension().is_some_and(|e| e == "drv") {
            std::fs::remove_file(old)?;
        }
    }
    for made in gbc::examples::diamond("x86_64-linux")? {
        let base = made.drv_path.rsplit('/').next().unwrap_or_default();
        std::fs::write(dir.join(base), &made.aterm)?;
        println!("{} {}", made.drv_path, made.outputs["out"]);
    }
    Ok(())
}
