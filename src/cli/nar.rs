//! `gbc nar dump|restore|hash`.

use std::io::{self, BufWriter, Write as _};
use std::path::Path;

use anyhow::Context as _;

use super::check_failed;
use crate::formats::nar::{self, RestoreError};

pub fn dump(path: &Path) -> anyhow::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, super::raw_stdout()?);
    nar::dump_path(path, &mut out)?;
    out.flush().context("standard output")?;
    Ok(())
}

pub fn restore(dest: &Path) -> anyhow::Result<()> {
    match nar::restore(io::stdin().lock(), dest) {
        Ok(_) => Ok(()),
        Err(RestoreError::Nar(e)) => Err(check_failed("standard input", e)),
        Err(e) => Err(e.into()),
    }
}

pub fn hash(path: &Path) -> anyhow::Result<()> {
    let (hash, _size) = nar::nar_hash(path)?;
    writeln!(io::stdout(), "{}", hash.to_nix32_string())?;
    Ok(())
}
