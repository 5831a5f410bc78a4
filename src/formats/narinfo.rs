//! `.narinfo` files: what a binary cache says about one store path, and the fingerprint its
//! signatures cover (`1;<path>;<narhash>;<narsize>;<comma-joined full reference paths>`).

use std::fmt::{self, Write as _};

use thiserror::Error;

use super::hash::{Hash, HashAlgo};
use super::signing::{PublicKey, SecretKey, Signature, TrustedKeys};
use super::store_path::{StoreDir, StorePath};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("line {line}: {msg}")]
    Line { line: usize, msg: String },
    #[error("missing required field {0}")]
    Missing(&'static str),
    #[error("NarHash must be SHA-256 to be signed or verified")]
    NotSha256,
}

/// A parsed narinfo. Unknown fields are kept, in order, and written back after the known ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_dir: StoreDir,
    pub store_path: StorePath,
    pub url: String,
    pub compression: Option<String>,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Base names, sorted.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
    pub extra: Vec<(String, String)>,
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let mut store: Option<(StoreDir, StorePath)> = None;
        let (mut url, mut compression, mut file_hash, mut file_size) = (None, None, None, None);
        let (mut nar_hash, mut nar_size, mut references, mut deriver) = (None, None, None, None);
        let (mut system, mut ca) = (None, None);
        let mut sigs = Vec::new();
        let mut extra = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let err = |msg: String| NarInfoError::Line { line: line_no, msg };
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or_else(|| err("expected \"Key: value\"".to_owned()))?;
            fn set<T>(slot: &mut Option<T>, v: T, key: &str, line: usize) -> Result<(), NarInfoError> {
                if slot.replace(v).is_some() {
                    return Err(NarInfoError::Line { line, msg: format!("{key} appears twice") });
                }
                Ok(())
            }
            let base = |v: &str| StorePath::from_base_name(v).map_err(|e| err(e.to_string()));
            let number = |v: &str| v.parse::<u64>().map_err(|_| err(format!("{key} is not a number: {v:?}")));
            match key {
                "StorePath" => {
                    set(&mut store, StoreDir::split_path(value).map_err(|e| err(e.to_string()))?, key, line_no)?
                }
                "URL" => set(&mut url, value.to_owned(), key, line_no)?,
                "Compression" => set(&mut compression, value.to_owned(), key, line_no)?,
                "FileHash" => set(&mut file_hash, Hash::parse(value).map_err(|e| err(e.to_string()))?, key, line_no)?,
                "FileSize" => set(&mut file_size, number(value)?, key, line_no)?,
                "NarHash" => set(&mut nar_hash, Hash::parse(value).map_err(|e| err(e.to_string()))?, key, line_no)?,
                "NarSize" => set(&mut nar_size, number(value)?, key, line_no)?,
                "References" => {
                    let mut refs =
                        value.split(' ').filter(|r| !r.is_empty()).map(base).collect::<Result<Vec<_>, _>>()?;
                    refs.sort();
                    refs.dedup();
                    set(&mut references, refs, key, line_no)?
                }
                "Deriver" if value == "unknown-deriver" => {}
                "Deriver" => set(&mut deriver, base(value)?, key, line_no)?,
                "System" => set(&mut system, value.to_owned(), key, line_no)?,
                "Sig" => sigs.push(Signature::parse(value).map_err(|e| err(format!("Sig: {e}")))?),
                "CA" => set(&mut ca, value.to_owned(), key, line_no)?,
                _ => extra.push((key.to_owned(), value.to_owned())),
            }
        }
        let (store_dir, store_path) = store.ok_or(NarInfoError::Missing("StorePath"))?;
        Ok(NarInfo {
            store_dir,
            store_path,
            url: url.filter(|u| !u.is_empty()).ok_or(NarInfoError::Missing("URL"))?,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.filter(|&n| n > 0).ok_or(NarInfoError::Missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }

    /// The string signatures cover.
    pub fn fingerprint(&self) -> Result<String, NarInfoError> {
        if self.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(NarInfoError::NotSha256);
        }
        let refs: Vec<String> = self.references.iter().map(|r| self.store_dir.display(r)).collect();
        Ok(fingerprint(&self.store_dir.display(&self.store_path), &self.nar_hash, self.nar_size, &refs))
    }

    /// Add (or replace) this key's signature.
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), NarInfoError> {
        let sig = key.sign(self.fingerprint()?.as_bytes());
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
        Ok(())
    }

    /// The trusted key that signed this narinfo, if any did.
    pub fn verify<'k>(&self, trusted: &'k TrustedKeys) -> Result<Option<&'k PublicKey>, NarInfoError> {
        Ok(trusted.verify_any(self.fingerprint()?.as_bytes(), &self.sigs))
    }
}

/// Nix's fingerprint of a store path: `1;<path>;<sha256:nix32 NAR hash>;<NAR size>;<references>`,
/// the references being full paths, sorted, comma-separated. `nar_hash` must be SHA-256.
pub fn fingerprint(path: &str, nar_hash: &Hash, nar_size: u64, references: &[String]) -> String {
    let mut refs: Vec<&str> = references.iter().map(String::as_str).collect();
    refs.sort_unstable();
    format!("1;{path};{};{nar_size};{}", nar_hash.to_nix32_string(), refs.join(","))
}

impl fmt::Display for NarInfo {
    /// Nix's field order and spelling.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "StorePath: {}", self.store_dir.display(&self.store_path));
        let _ = writeln!(s, "URL: {}", self.url);
        if let Some(c) = &self.compression {
            let _ = writeln!(s, "Compression: {c}");
        }
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {}", h.to_nix32_string());
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash.to_nix32_string());
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<String> = self.references.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {d}");
        }
        if let Some(sys) = &self.system {
            let _ = writeln!(s, "System: {sys}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k}: {v}");
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "StorePath: /nix/store/6vza80pmr3wck2yvv8nwaphbnj11vrql-b
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz
Compression: xz
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
FileSize: 4029176
NarHash: sha256:1impfw8zdgisxkghq9a3q7cn7jb9zyzgxdydiamp8z2nlyyl0h5h
NarSize: 18735072
References: 4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b-dev 3pysdbjixd4amzidam0kp6vwzpqy58y3-a
Deriver: h51sg24fc6mmgwnihsipf9ylc1w31byk-b.drv
";

    fn sample() -> NarInfo {
        NarInfo::parse(SAMPLE).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn fingerprint_has_sorted_full_references() {
        assert_eq!(
            sample().fingerprint().ok().as_deref(),
            Some(
                "1;/nix/store/6vza80pmr3wck2yvv8nwaphbnj11vrql-b;\
                 sha256:1impfw8zdgisxkghq9a3q7cn7jb9zyzgxdydiamp8z2nlyyl0h5h;18735072;\
                 /nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a,/nix/store/4ych3c9g82xl7b2la3qz4f3k0fnrn0a0-b-dev"
            )
        );
    }

    #[test]
    fn render_parse_round_trip_and_signing() {
        let key = SecretKey::generate("k").unwrap_or_else(|e| unreachable!("{e}"));
        let mut ni = sample();
        ni.sign(&key).unwrap_or_else(|e| unreachable!("{e}"));
        ni.sign(&key).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(ni.sigs.len(), 1, "signing twice keeps one signature per key");
        let back = NarInfo::parse(&ni.to_string()).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(back, ni);
        let trusted = TrustedKeys::new(vec![key.public()]);
        assert!(back.verify(&trusted).ok().flatten().is_some());
        let mut tampered = back.clone();
        tampered.nar_size += 1;
        assert_eq!(tampered.verify(&trusted), Ok(None));
    }

    #[test]
    fn malformed_narinfos_are_rejected_with_the_line() {
        let cases = [
            (SAMPLE.replace("NarSize: 18735072", "NarSize: lots"), "line 7"),
            (SAMPLE.replace("URL: ", "URL "), "line 2"),
            (SAMPLE.replace("Deriver: h51", "Deriver: !!!"), "line 9"),
            (format!("{SAMPLE}NarSize: 1\n"), "appears twice"),
            (SAMPLE.replace("StorePath: /nix/store/6vza", "StorePath: /nix/store/eeee"), "line 1"),
            (SAMPLE.replace("NarHash: sha256:1i", "NarHash: sha256:i"), "line 6"),
            (format!("{SAMPLE}Sig: nope\n"), "Sig:"),
            (SAMPLE.lines().filter(|l| !l.starts_with("NarHash")).collect::<Vec<_>>().join("\n"), "NarHash"),
        ];
        for (text, want) in cases {
            let e = NarInfo::parse(&text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }
}
