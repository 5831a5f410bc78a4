//! Store paths: `<store dir>/<32 nix32 characters>-<name>`, for any store dir (`/gnu/store`,
//! `/nix/store`, ...), and the ways Nix computes them (`makeStorePath` and its callers).

use std::fmt;

use thiserror::Error;

use super::hash::{Hash, HashAlgo, hex, sha256};
use super::nix32;

/// Length of the hash part of a store path's base name.
pub const HASH_LEN: usize = 32;
/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("store dir {0:?} must be an absolute, normalised path without a trailing slash")]
    BadStoreDir(String),
    #[error("{0:?} is not in the store dir {1:?}")]
    NotInStore(String, String),
    #[error("{0:?} is not a store path: its base name must be <32 nix32 characters>-<name>")]
    BadBaseName(String),
    #[error("{path:?} is not a store path: {why}")]
    BadName { path: String, why: &'static str },
}

/// The directory a store lives in, as derivations see it (the logical store dir).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreDir(String);

impl StoreDir {
    pub fn new(dir: &str) -> Result<StoreDir, StorePathError> {
        let normal = dir.len() > 1
            && dir.starts_with('/')
            && !dir.ends_with('/')
            && dir[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            && !dir.contains('\0');
        if !normal {
            return Err(StorePathError::BadStoreDir(dir.to_owned()));
        }
        Ok(StoreDir(dir.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parse a full store path that must lie directly in this store dir.
    pub fn parse_path(&self, path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned(), self.0.clone()))?;
        StorePath::from_base_name(base).map_err(|e| e.with_path(path))
    }

    /// Parse a full store path, taking its store dir from the path itself.
    pub fn split_path(path: &str) -> Result<(StoreDir, StorePath), StorePathError> {
        let (dir, base) = path.rsplit_once('/').ok_or_else(|| StorePathError::BadBaseName(path.to_owned()))?;
        let dir = StoreDir::new(dir)?;
        let sp = StorePath::from_base_name(base).map_err(|e| e.with_path(path))?;
        Ok((dir, sp))
    }

    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path)
    }

    /// Nix's `makeStorePath`: the path for content of type `ty` with the given SHA-256 `inner` hash.
    pub fn make_store_path(&self, ty: &str, inner: &[u8; 32], name: &str) -> Result<StorePath, StorePathError> {
        check_name(name).map_err(|why| StorePathError::BadName { path: name.to_owned(), why })?;
        let s = format!("{ty}:sha256:{}:{}:{name}", hex::encode(inner), self.0);
        Ok(StorePath::from_digest(&compress_hash(&sha256(s.as_bytes())), name))
    }

    /// The path of output `output` of an input-addressed derivation named `drv_name` whose
    /// (masked) derivation hash modulo is `drv_hash`.
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &[u8; 32],
        drv_name: &str,
    ) -> Result<StorePath, StorePathError> {
        self.make_store_path(&format!("output:{output}"), drv_hash, &output_path_name(drv_name, output))
    }

    /// The path of content-addressed text (such as a `.drv` file) with the given references.
    pub fn make_text_path<'a>(
        &self,
        name: &str,
        content_hash: &[u8; 32],
        references: impl IntoIterator<Item = &'a str>,
    ) -> Result<StorePath, StorePathError> {
        self.make_store_path(&make_type("text", references, false), content_hash, name)
    }

    /// The path of a fixed output: recursive (NAR) SHA-256 hashes become `source` paths, everything
    /// else goes through the `fixed:out:` indirection.
    pub fn make_fixed_output_path(
        &self,
        recursive: bool,
        hash: &Hash,
        name: &str,
    ) -> Result<StorePath, StorePathError> {
        if let (true, HashAlgo::Sha256, Ok(digest)) = (recursive, hash.algo(), <[u8; 32]>::try_from(hash.digest())) {
            return self.make_store_path("source", &digest, name);
        }
        let inner = format!("fixed:out:{}{}:{}:", if recursive { "r:" } else { "" }, hash.algo(), hash.to_hex());
        self.make_store_path("output:out", &sha256(inner.as_bytes()), name)
    }
}

impl StoreDir {
    /// The path of a source added to the store by its NAR's SHA-256 (`builtins.path`, `./file`
    /// in Nix, `interned-file` in Guix), with its references; `self_ref` when it refers to itself.
    pub fn make_source_path<'a>(
        &self,
        name: &str,
        nar_hash: &[u8; 32],
        references: impl IntoIterator<Item = &'a str>,
        self_ref: bool,
    ) -> Result<StorePath, StorePathError> {
        self.make_store_path(&make_type("source", references, self_ref), nar_hash, name)
    }

    /// How `path` was made from its contents, if it was: a text file (`builtins.toFile`, a `.drv`,
    /// Guix's `plain-file`) whose contents hash to `flat_hash`, or a source whose NAR hashes to
    /// `nar_hash`, either with exactly `references` (full paths; `path` itself among them for a
    /// self-reference). None when neither gives `path`: it is not content-addressed this way.
    pub fn content_address(
        &self,
        path: &StorePath,
        references: &[String],
        nar_hash: &[u8; 32],
        flat_hash: Option<&[u8; 32]>,
    ) -> Option<ContentAddress> {
        let me = self.display(path);
        let others: Vec<&str> = references.iter().map(String::as_str).filter(|r| *r != me).collect();
        let self_ref = others.len() < references.len();
        if let Some(flat) = flat_hash
            && !self_ref
            && self.make_text_path(path.name(), flat, others.iter().copied()).ok().as_ref() == Some(path)
        {
            return Some(ContentAddress::Text(Hash::sha256(*flat)));
        }
        (self.make_source_path(path.name(), nar_hash, others.iter().copied(), self_ref).ok().as_ref() == Some(path))
            .then(|| ContentAddress::Source(Hash::sha256(*nar_hash)))
    }
}

/// How a content-addressed path was made; shown as a narinfo's `CA` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentAddress {
    /// `text:sha256:<nix32>`: the hash of the file's contents.
    Text(Hash),
    /// `fixed:r:sha256:<nix32>`: the hash of the NAR.
    Source(Hash),
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{}", h.to_nix32_string()),
            ContentAddress::Source(h) => write!(f, "fixed:r:{}", h.to_nix32_string()),
        }
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `type:ref1:ref2...[:self]`, references sorted as Nix sorts a `StorePathSet`.
fn make_type<'a>(ty: &str, references: impl IntoIterator<Item = &'a str>, self_ref: bool) -> String {
    let mut refs: Vec<&str> = references.into_iter().collect();
    refs.sort_unstable();
    refs.dedup();
    let mut s = ty.to_owned();
    for r in refs {
        s.push(':');
        s.push_str(r);
    }
    if self_ref {
        s.push_str(":self");
    }
    s
}

/// The name of output `output` of a derivation named `drv_name`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" { drv_name.to_owned() } else { format!("{drv_name}-{output}") }
}

/// XOR-fold a hash down to 20 bytes, as Nix's `compressHash`.
pub fn compress_hash(hash: &[u8]) -> [u8; 20] {
    let mut out = [0u8; 20];
    for (i, b) in hash.iter().enumerate() {
        out[i % 20] ^= b;
    }
    out
}

/// Check a store path name as Nix (2.8) does.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("its name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("its name is longer than 211 bytes");
    }
    if name.starts_with('.') {
        return Err("its name starts with a dot");
    }
    if !name.bytes().all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c)) {
        return Err("its name contains a character other than letters, digits and +-._?=");
    }
    Ok(())
}

/// A store path without its store dir: `<hash part>-<name>`. Ordered as Nix orders store paths, by
/// base name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

impl StorePath {
    /// Parse a base name `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let bad = || StorePathError::BadBaseName(base.to_owned());
        if base.len() < HASH_LEN + 2 || base.as_bytes()[HASH_LEN] != b'-' {
            return Err(bad());
        }
        if !nix32::is_nix32(&base.as_bytes()[..HASH_LEN]) {
            return Err(bad());
        }
        check_name(&base[HASH_LEN + 1..]).map_err(|why| StorePathError::BadName { path: base.to_owned(), why })?;
        Ok(StorePath { base: base.to_owned() })
    }

    fn from_digest(digest: &[u8; 20], name: &str) -> StorePath {
        StorePath { base: format!("{}-{name}", nix32::encode(digest)) }
    }

    /// The 32-character nix32 hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.base
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl StorePathError {
    fn with_path(self, path: &str) -> StorePathError {
        match self {
            StorePathError::BadBaseName(_) => StorePathError::BadBaseName(path.to_owned()),
            StorePathError::BadName { why, .. } => StorePathError::BadName { path: path.to_owned(), why },
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_in_any_store_dir() {
        for dir in ["/nix/store", "/gnu/store", "/opt/x/store"] {
            let sd = StoreDir::new(dir).unwrap_or_else(|e| unreachable!("{e}"));
            let p = format!("{dir}/3pysdbjixd4amzidam0kp6vwzpqy58y3-a.drv");
            let sp = sd.parse_path(&p).unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(sp.name(), "a.drv");
            assert_eq!(sd.display(&sp), p);
            assert_eq!(StoreDir::split_path(&p), Ok((sd, sp)));
        }
    }

    #[test]
    fn rejects_bad_paths() {
        let sd = StoreDir::new("/nix/store").unwrap_or_else(|e| unreachable!("{e}"));
        for bad in [
            "/gnu/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a",
            "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3",
            "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y-a",
            "/nix/store/epysdbjixd4amzidam0kp6vwzpqy58y3-a",
            "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-.a",
            "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a/b",
            "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a b",
            "/nix/store/../3pysdbjixd4amzidam0kp6vwzpqy58y3-a",
        ] {
            assert!(sd.parse_path(bad).is_err(), "{bad}");
        }
        for bad in ["", "/", "nix/store", "/nix/store/", "/nix//store", "/nix/./store"] {
            assert!(StoreDir::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compress_hash_folds() {
        let mut h = [0u8; 32];
        h[0] = 1;
        h[20] = 3;
        assert_eq!(compress_hash(&h)[0], 2);
    }
}
