//! Finding references as Nix does: the store paths (of the input closure and of the outputs
//! themselves) whose 32-character hash parts occur anywhere in an output's NAR serialisation.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};

use crate::formats::nix32;
use crate::formats::store_path::HASH_LEN;

/// A writer that scans everything written through it for known hash parts.
pub struct RefScanner {
    /// Hash part → full path.
    candidates: HashMap<[u8; HASH_LEN], String>,
    found: BTreeSet<String>,
    /// The last `HASH_LEN - 1` bytes of the previous write, so hashes split across writes are seen.
    tail: Vec<u8>,
}

impl RefScanner {
    /// `paths` are full store paths; their base names start with the hash part.
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a str>) -> RefScanner {
        let mut candidates = HashMap::new();
        for p in paths {
            let base = p.rsplit('/').next().unwrap_or(p);
            if let Some(h) = base.as_bytes().get(..HASH_LEN).and_then(|h| <[u8; HASH_LEN]>::try_from(h).ok()) {
                candidates.insert(h, p.to_owned());
            }
        }
        RefScanner { candidates, found: BTreeSet::new(), tail: Vec::new() }
    }

    /// The full paths whose hash parts were seen.
    pub fn finish(self) -> BTreeSet<String> {
        self.found
    }

    fn scan(&mut self, data: &[u8]) {
        let mut i = 0;
        // Nix's approach: look at the last byte of a candidate window; if it is not a nix32
        // character, no window containing it can match, so jump past it.
        while i + HASH_LEN <= data.len() {
            let window = &data[i..i + HASH_LEN];
            match window.iter().rposition(|c| !nix32::ALPHABET.contains(c)) {
                Some(bad) => i += bad + 1,
                None => {
                    if let Ok(key) = <[u8; HASH_LEN]>::try_from(window)
                        && let Some(path) = self.candidates.get(&key)
                    {
                        self.found.insert(path.clone());
                    }
                    i += 1;
                }
            }
        }
    }
}

impl Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.candidates.is_empty() {
            return Ok(buf.len());
        }
        // Scan the seam between the previous write and this one, then this write.
        let head = &buf[..buf.len().min(HASH_LEN - 1)];
        if !self.tail.is_empty() {
            let mut seam = self.tail.clone();
            seam.extend_from_slice(head);
            self.scan(&seam);
        }
        self.scan(buf);
        // Keep the last `HASH_LEN - 1` bytes seen, which a short write takes partly from the
        // previous tail.
        if buf.len() >= HASH_LEN - 1 {
            self.tail = buf[buf.len() - (HASH_LEN - 1)..].to_vec();
        } else {
            self.tail.extend_from_slice(buf);
            let excess = self.tail.len().saturating_sub(HASH_LEN - 1);
            self.tail.drain(..excess);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/gnu/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a";
    const B: &str = "/gnu/store/4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b";

    #[test]
    fn finds_hashes_anywhere_even_split_across_writes() {
        let text = format!("xx{}yy and {}", &A[11..], B);
        for split in 0..text.len() {
            let mut s = RefScanner::new([A, B]);
            s.write_all(&text.as_bytes()[..split]).ok();
            s.write_all(&text.as_bytes()[split..]).ok();
            assert_eq!(s.finish(), BTreeSet::from([A.to_owned(), B.to_owned()]), "split at {split}");
        }
    }

    #[test]
    fn finds_hashes_written_a_few_bytes_at_a_time() {
        let text = format!("[{}]", &B[11..]);
        for step in 1..8 {
            let mut s = RefScanner::new([A, B]);
            for piece in text.as_bytes().chunks(step) {
                s.write_all(piece).ok();
            }
            assert_eq!(s.finish(), BTreeSet::from([B.to_owned()]), "{step} bytes at a time");
        }
    }

    #[test]
    fn ignores_near_misses() {
        let mut s = RefScanner::new([A]);
        s.write_all(b"3pysdbjixd4amzidam0kp6vwzpqy58y 3pysdbjixd4amzidam0kp6vwzpqy58yz").ok();
        assert!(s.finish().is_empty());
    }
}
