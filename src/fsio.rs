//! Writing large files that are not read back soon (NARs into the cache, and into a host's store):
//! drop-behind, as `dd oflag=nocache` and rsync's `--drop-cache` do. Without it, a NAR of several
//! GiB fills the page cache with dirty pages (evicting what the coordinator does read: narinfos,
//! the database, logs) that the fsync before publishing then has to flush all at once; with it,
//! writeback starts as each window is written and the pages leave once written, so the same few
//! pages are used again and the fsync waits for the last window only.

use std::io::{self, Write};
use std::num::NonZeroU64;
use std::os::fd::AsFd;

use rustix::fs::{Advice, fadvise};

/// Bytes between two pieces of advice.
const WINDOW: u64 = 32 << 20;

/// A writer that, after each window, starts that window's writeback and drops the window before
/// the previous one from the page cache (written by then). Advice only: errors of it are ignored.
pub struct DropBehind<F: AsFd + Write> {
    file: F,
    written: u64,
    advised: u64,
}

impl<F: AsFd + Write> DropBehind<F> {
    pub fn new(file: F) -> DropBehind<F> {
        DropBehind { file, written: 0, advised: 0 }
    }

    /// The file, with what is still cached of it left to the kernel.
    pub fn into_inner(self) -> F {
        self.file
    }

    fn advise(&self, offset: u64) {
        // POSIX_FADV_DONTNEED writes dirty pages back (without waiting) and drops clean ones.
        let _ = fadvise(self.file.as_fd(), offset, NonZeroU64::new(WINDOW), Advice::DontNeed);
    }
}

impl<F: AsFd + Write> Write for DropBehind<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        while self.written - self.advised >= WINDOW {
            self.advise(self.advised);
            if self.advised >= 2 * WINDOW {
                self.advise(self.advised - 2 * WINDOW);
            }
            self.advised += WINDOW;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// What is written arrives whole, across windows and at odd sizes.
    #[test]
    fn writes_arrive_whole() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(2 * WINDOW + 12345)).map(|i| (i % 251) as u8).collect();
        let mut w = DropBehind::new(std::fs::File::create(&path)?);
        for piece in data.chunks(1_000_003) {
            w.write_all(piece)?;
        }
        w.into_inner().sync_all()?;
        let mut back = Vec::new();
        std::fs::File::open(&path)?.read_to_end(&mut back)?;
        assert!(back == data, "{} bytes back of {}", back.len(), data.len());
        Ok(())
    }
}
