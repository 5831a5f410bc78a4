//! Hashes as Nix writes them: `sha256:<nix32>`, `<algo>:<hex>`, `<algo>:<base64>` and SRI `sha256-<base64>`.
//!
//! gbc computes SHA-256 only (NAR hashes, store path hashes); other algorithms are parsed so that
//! fixed-output derivations declared with them can be validated.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::thread;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use super::nix32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Digest size in bytes.
    pub fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    pub fn parse(s: &str) -> Result<HashAlgo, HashError> {
        Ok(match s {
            "md5" => HashAlgo::Md5,
            "sha1" => HashAlgo::Sha1,
            "sha256" => HashAlgo::Sha256,
            "sha512" => HashAlgo::Sha512,
            _ => return Err(HashError::UnknownAlgo(s.to_owned())),
        })
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    #[error("hash {0:?} has no algorithm prefix")]
    NoAlgo(String),
    #[error("hash {0:?} has a length that fits no encoding of {1}")]
    BadLength(String, HashAlgo),
    #[error("hash {0:?} is not valid {1}")]
    BadEncoding(String, &'static str),
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    digest: Vec<u8>,
}

impl Hash {
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.size() {
            return Err(HashError::BadLength(hex::encode(digest), algo));
        }
        Ok(Hash { algo, digest: digest.to_vec() })
    }

    pub fn sha256(digest: [u8; 32]) -> Hash {
        Hash { algo: HashAlgo::Sha256, digest: digest.to_vec() }
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// Parse a digest of a known algorithm in any of Nix's encodings (hex, nix32, base64), telling
    /// them apart by length as Nix does.
    pub fn parse_digest(algo: HashAlgo, s: &str) -> Result<Hash, HashError> {
        let size = algo.size();
        let digest = if s.len() == 2 * size {
            hex::decode(s).ok_or_else(|| HashError::BadEncoding(s.to_owned(), "hex"))?
        } else if s.len() == nix32::encoded_len(size) {
            nix32::decode(s).map_err(|_| HashError::BadEncoding(s.to_owned(), "nix32"))?
        } else if s.len() == size.div_ceil(3) * 4 {
            BASE64.decode(s).map_err(|_| HashError::BadEncoding(s.to_owned(), "base64"))?
        } else {
            return Err(HashError::BadLength(s.to_owned(), algo));
        };
        Hash::new(algo, &digest)
    }

    /// Parse `algo:digest` or SRI `algo-base64`.
    pub fn parse(s: &str) -> Result<Hash, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            return Hash::parse_digest(HashAlgo::parse(algo)?, rest);
        }
        if let Some((algo, rest)) = s.split_once('-') {
            let algo = HashAlgo::parse(algo)?;
            let digest = BASE64.decode(rest).map_err(|_| HashError::BadEncoding(s.to_owned(), "SRI base64"))?;
            return Hash::new(algo, &digest).map_err(|_| HashError::BadLength(s.to_owned(), algo));
        }
        Err(HashError::NoAlgo(s.to_owned()))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.digest)
    }

    pub fn to_nix32(&self) -> String {
        nix32::encode(&self.digest)
    }

    /// `algo:<nix32>`, the form of `nix-store -q --hash` and of narinfo files.
    pub fn to_nix32_string(&self) -> String {
        format!("{}:{}", self.algo, self.to_nix32())
    }

    /// `algo-<base64>` (Subresource Integrity).
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, BASE64.encode(&self.digest))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32_string())
    }
}

/// Lower-case hexadecimal, as Nix prints Base16.
pub mod hex {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";

    pub fn encode(bytes: &[u8]) -> String {
        let mut s = String::with_capacity(bytes.len() * 2);
        for &b in bytes {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s
    }

    /// Decode hexadecimal (either case); `None` on odd length or a non-hex character.
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        fn val(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            }
        }
        let s = s.as_bytes();
        if !s.len().is_multiple_of(2) {
            return None;
        }
        s.chunks_exact(2).map(|p| Some(val(p[0])? << 4 | val(p[1])?)).collect()
    }
}

/// SHA-256 of a byte string.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A writer that hashes (SHA-256) and counts everything written to it.
#[derive(Default, Clone)]
pub struct HashSink {
    hasher: Sha256,
    len: u64,
}

impl HashSink {
    pub fn new() -> HashSink {
        HashSink::default()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> (Hash, u64) {
        (Hash::sha256(self.hasher.finalize().into()), self.len)
    }
}

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes (SHA-256) on a helper thread, so that producing the bytes (reading files)
/// and hashing them overlap. Bytes are handed over in 1 MiB chunks through a short queue; the
/// chunks are recycled.
pub struct PipelinedHashSink {
    chunk: Vec<u8>,
    full: Option<mpsc::SyncSender<Vec<u8>>>,
    empty: mpsc::Receiver<Vec<u8>>,
    worker: Option<thread::JoinHandle<HashSink>>,
}

const PIPELINE_CHUNK: usize = 1 << 20;

impl PipelinedHashSink {
    pub fn new() -> io::Result<PipelinedHashSink> {
        let (full, full_rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let (empty_tx, empty) = mpsc::channel();
        let worker = thread::Builder::new().name("gbc-hash".to_owned()).spawn(move || {
            let mut sink = HashSink::new();
            for mut chunk in full_rx {
                sink.hasher.update(&chunk);
                sink.len += chunk.len() as u64;
                chunk.clear();
                let _ = empty_tx.send(chunk);
            }
            sink
        })?;
        Ok(PipelinedHashSink {
            chunk: Vec::with_capacity(PIPELINE_CHUNK),
            full: Some(full),
            empty,
            worker: Some(worker),
        })
    }

    fn send(&mut self) -> io::Result<()> {
        let next = self.empty.try_recv().unwrap_or_else(|_| Vec::with_capacity(PIPELINE_CHUNK));
        let chunk = std::mem::replace(&mut self.chunk, next);
        let full = self.full.as_ref().ok_or_else(|| io::Error::other("hash sink already finished"))?;
        full.send(chunk).map_err(|_| io::Error::other("the hashing thread stopped"))
    }

    /// Wait for the helper thread; the hash and length of everything written.
    pub fn finish(mut self) -> io::Result<(Hash, u64)> {
        if !self.chunk.is_empty() {
            self.send()?;
        }
        self.full = None;
        let worker = self.worker.take().ok_or_else(|| io::Error::other("hash sink already finished"))?;
        let sink = worker.join().map_err(|_| io::Error::other("the hashing thread panicked"))?;
        Ok(sink.finish())
    }
}

impl Write for PipelinedHashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.chunk.extend_from_slice(buf);
        if self.chunk.len() >= PIPELINE_CHUNK {
            self.send()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes with any supported algorithm (for checking fixed-output derivations).
pub enum AnyHashSink {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(Sha256),
    Sha512(sha2::Sha512),
}

impl AnyHashSink {
    pub fn new(algo: HashAlgo) -> AnyHashSink {
        match algo {
            HashAlgo::Md5 => AnyHashSink::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => AnyHashSink::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => AnyHashSink::Sha256(Sha256::new()),
            HashAlgo::Sha512 => AnyHashSink::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn finish(self) -> Hash {
        let (algo, digest): (HashAlgo, Vec<u8>) = match self {
            AnyHashSink::Md5(h) => (HashAlgo::Md5, h.finalize().to_vec()),
            AnyHashSink::Sha1(h) => (HashAlgo::Sha1, h.finalize().to_vec()),
            AnyHashSink::Sha256(h) => (HashAlgo::Sha256, h.finalize().to_vec()),
            AnyHashSink::Sha512(h) => (HashAlgo::Sha512, h.finalize().to_vec()),
        };
        Hash { algo, digest }
    }
}

impl Write for AnyHashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            AnyHashSink::Md5(h) => h.update(buf),
            AnyHashSink::Sha1(h) => h.update(buf),
            AnyHashSink::Sha256(h) => h.update(buf),
            AnyHashSink::Sha512(h) => h.update(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that hashes (SHA-256) and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    sink: HashSink,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> HashingReader<R> {
        HashingReader { inner, sink: HashSink::new() }
    }

    /// The hash and length of the bytes read so far.
    pub fn finish(self) -> (Hash, u64) {
        self.sink.finish()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.hasher.update(&buf[..n]);
        self.sink.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_every_encoding_of_the_same_digest() {
        let h = Hash::sha256(sha256(b""));
        assert_eq!(h.to_hex(), EMPTY_HEX);
        for s in [
            format!("sha256:{EMPTY_HEX}"),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".to_owned(),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
        ] {
            assert_eq!(Hash::parse(&s), Ok(h.clone()), "{s}");
        }
        assert_eq!(h.to_sri(), "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
    }

    #[test]
    fn rejects_malformed_hashes() {
        assert!(matches!(Hash::parse("sha256:abc"), Err(HashError::BadLength(..))));
        assert!(matches!(Hash::parse("sha3:abc"), Err(HashError::UnknownAlgo(_))));
        assert!(matches!(Hash::parse(EMPTY_HEX), Err(HashError::NoAlgo(_))));
        let bad_hex = format!("sha256:{}", "g".repeat(64));
        assert!(matches!(Hash::parse(&bad_hex), Err(HashError::BadEncoding(..))));
    }

    #[test]
    fn pipelined_sink_agrees_with_the_plain_one() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut piped = PipelinedHashSink::new().unwrap_or_else(|e| unreachable!("{e}"));
        for part in data.chunks(700_001) {
            piped.write_all(part).unwrap_or_else(|e| unreachable!("{e}"));
        }
        let mut plain = HashSink::new();
        plain.write_all(&data).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(piped.finish().ok(), Some(plain.finish()));
    }

    #[test]
    fn any_hash_sink_computes_each_algorithm() {
        // Digests of "hello" as printed by `nix-hash --type ALGO --flat` on a file holding it.
        for (algo, hex) in [
            (HashAlgo::Md5, "5d41402abc4b2a76b9719d911017c592"),
            (HashAlgo::Sha1, "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
        ] {
            let mut s = AnyHashSink::new(algo);
            s.write_all(b"hello").ok();
            assert_eq!(s.finish().to_hex(), hex);
        }
        let mut s = AnyHashSink::new(HashAlgo::Sha256);
        s.write_all(b"").ok();
        assert_eq!(s.finish().to_hex(), EMPTY_HEX);
    }

    #[test]
    fn hashing_reader_and_sink_agree() {
        let data = vec![7u8; 100_000];
        let mut r = HashingReader::new(&data[..]);
        io::copy(&mut r, &mut io::sink()).ok();
        let mut w = HashSink::new();
        w.write_all(&data).ok();
        assert_eq!(r.finish(), w.finish());
    }
}
