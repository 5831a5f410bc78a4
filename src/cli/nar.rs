//! `gbc nar dump|restore|hash`.

use std::io::{self, BufWriter, Write as _};
use std::path::Path;

use anyhow::Context as _;

use super::check_failed;
use crate::formats::nar::{self, RestoreError};

/// When standard output is a pipe, grow it to 1 MiB: with the default 64 KiB, writer and reader
/// take turns sixteen times as often, which costs more than the copying on a busy machine.
fn grow_stdout_pipe() {
    let stdout = io::stdout();
    let is_pipe = rustix::fs::fstat(&stdout)
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo);
    if is_pipe {
        let _ = rustix::pipe::fcntl_setpipe_size(&stdout, 1 << 20);
    }
}

pub fn dump(path: &Path) -> anyhow::Result<()> {
    grow_stdout_pipe();
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 20, stdout);
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
