//! Chunks arriving on a channel, read as a byte stream from a plain thread: how async tasks hand
//! bytes to the synchronous parsers and compressors (the NAR reader, zstd) without buffering a
//! whole archive.

use std::io::{self, Read};

/// Where a [`ChunkReader`] takes its chunks from; `None` is the end of the stream.
pub trait ChunkSource {
    type Chunk: AsRef<[u8]>;
    fn next_chunk(&mut self) -> Option<Self::Chunk>;
}

impl<T: AsRef<[u8]>> ChunkSource for std::sync::mpsc::Receiver<T> {
    type Chunk = T;
    fn next_chunk(&mut self) -> Option<T> {
        self.recv().ok()
    }
}

impl<T: AsRef<[u8]>> ChunkSource for tokio::sync::mpsc::Receiver<T> {
    type Chunk = T;
    fn next_chunk(&mut self) -> Option<T> {
        self.blocking_recv()
    }
}

impl<T: AsRef<[u8]>> ChunkSource for tokio::sync::mpsc::UnboundedReceiver<T> {
    type Chunk = T;
    fn next_chunk(&mut self) -> Option<T> {
        self.blocking_recv()
    }
}

/// A reader over the chunks of a channel; EOF when every sender is gone. Blocks: use it from a
/// plain or `spawn_blocking` thread, never from an async task.
pub struct ChunkReader<S: ChunkSource> {
    source: S,
    current: Option<S::Chunk>,
    at: usize,
}

impl<S: ChunkSource> ChunkReader<S> {
    pub fn new(source: S) -> ChunkReader<S> {
        ChunkReader { source, current: None, at: 0 }
    }
}

impl<S: ChunkSource> Read for ChunkReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(c) = &self.current {
                let rest = &c.as_ref()[self.at..];
                if !rest.is_empty() {
                    let n = buf.len().min(rest.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.at += n;
                    return Ok(n);
                }
            }
            match self.source.next_chunk() {
                Some(c) => {
                    self.current = Some(c);
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
    }
}

/// A writer that feeds the same bytes to two others (a NAR to its hash or cache file and to a
/// reference scanner at once).
pub struct Both<A, B>(pub A, pub B);

impl<A: io::Write, B: io::Write> io::Write for Both<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_across_chunks_and_skips_empty_ones() {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for c in [&b"ab"[..], b"", b"cde", b"f"] {
            tx.send(c.to_vec()).unwrap_or_else(|e| unreachable!("{e}"));
        }
        drop(tx);
        let mut r = ChunkReader::new(rx);
        let mut small = [0u8; 2];
        assert_eq!(r.read(&mut small).ok(), Some(2));
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!((&small[..], &rest[..]), (&b"ab"[..], &b"cdef"[..]));
    }
}
