//! Write trivial derivations (`echo $i > $out`, /bin/sh) for the coordinator benchmarks:
//! `bench-drvs DIR SYSTEM SALT FROM TO` writes trivial-FROM … trivial-(TO-1) as /nix/store .drv
//! files into DIR. No Nix needed, and quick enough for 100,000.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, system, salt, from, to] = args.as_slice() else {
        return Err("usage: bench-drvs DIR SYSTEM SALT FROM TO".into());
    };
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)?;
    let store = gbc::formats::store_path::StoreDir::new("/nix/store")?;
    for made in gbc::examples::trivial(&store, system, salt, from.parse()?..to.parse()?)? {
        let base = made.drv_path.rsplit('/').next().unwrap_or_default();
        std::fs::write(dir.join(base), &made.aterm)?;
    }
    Ok(())
}
