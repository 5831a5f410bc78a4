//! `.narinfo` files: what a binary cache says about one store path, and the fingerprint its
//! signatures cover (`1;<path>;<narhash>;<narsize>;<comma-joined full reference paths>`).

use std::fmt::{self, Write as _};

use thiserror::Error;

use super::guix_ecdsa::{PublicKey as GuixPublicKey, SecretKey as GuixSecretKey};
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

/// Why a narinfo is not accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error(transparent)]
    Malformed(#[from] NarInfoError),
    /// No signature checks out; the reasons found, if any (e.g. Guix's signature's).
    #[error("no valid signature by a trusted key{}", if .0.is_empty() { String::new() } else { format!(" ({})", .0.join("; ")) })]
    Untrusted(Vec<String>),
}

/// The trusted key a narinfo was found signed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer<'k> {
    /// A `Sig:` line over the fingerprint.
    Nix(&'k PublicKey),
    /// The `Signature:` line over the text above it.
    Guix(&'k GuixPublicKey),
}

impl fmt::Display for Signer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signer::Nix(k) => f.write_str(k.name()),
            Signer::Guix(k) => write!(f, "Guix key {}", super::hash::hex::encode(k.q()).to_uppercase()),
        }
    }
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
    /// Guix's signature, `1;HOST;BASE64` (see [`super::gcrypt`]): written last, as it covers the
    /// text above it.
    pub guix_signature: Option<String>,
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let mut store: Option<(StoreDir, StorePath)> = None;
        let (mut url, mut compression, mut file_hash, mut file_size) = (None, None, None, None);
        let (mut nar_hash, mut nar_size, mut references, mut deriver) = (None, None, None, None);
        let (mut system, mut ca, mut guix_signature) = (None, None, None);
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
                "Signature" => set(&mut guix_signature, value.to_owned(), key, line_no)?,
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
            guix_signature,
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

    /// Add (or replace) this key's signature. A Guix signature is dropped: the new line changes
    /// the text it covers (sign with the Guix key afterwards).
    pub fn sign(&mut self, key: &SecretKey) -> Result<(), NarInfoError> {
        let sig = key.sign(self.fingerprint()?.as_bytes());
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
        self.guix_signature = None;
        Ok(())
    }

    /// Sign (or sign again) in Guix's format: `Signature:` over the text of every other field, as
    /// `guix publish` does, naming `host`. Guix has one signature per narinfo.
    pub fn sign_guix(&mut self, key: &GuixSecretKey, host: &str) -> Result<(), NarInfoError> {
        if self.nar_hash.algo() != HashAlgo::Sha256 {
            return Err(NarInfoError::NotSha256);
        }
        self.guix_signature = None;
        self.guix_signature = Some(super::gcrypt::narinfo_signature(&self.to_string(), key, host));
        Ok(())
    }

    /// The trusted key that signed this narinfo, if any did.
    pub fn verify<'k>(&self, trusted: &'k TrustedKeys) -> Result<Option<&'k PublicKey>, NarInfoError> {
        Ok(trusted.verify_any(self.fingerprint()?.as_bytes(), &self.sigs))
    }
}

/// The text a Guix `Signature:` covers and the field's value, found as `guix substitute` finds them
/// (the text before the first `Signature:`), or None without one. Stricter than Guix: the field
/// must start a line and be the last field (whatever came after it would be unsigned), and
/// StorePath, NarHash and References must be above it (Guix's own requirement).
pub fn guix_signed_part(text: &str) -> Result<Option<(&str, &str)>, NarInfoError> {
    const FIELD: &str = "Signature:";
    let Some(at) = text.find(FIELD) else { return Ok(None) };
    let (signed, rest) = text.split_at(at);
    let line = signed.matches('\n').count() + 1;
    let err = |line: usize, msg: String| Err(NarInfoError::Line { line, msg });
    if !signed.is_empty() && !signed.ends_with('\n') {
        return err(line, "\"Signature:\" inside a field (Guix would sign only the text before it)".into());
    }
    let (field, after) = rest.split_once('\n').unwrap_or((rest, ""));
    if let Some(n) = after.lines().position(|l| !l.trim().is_empty()) {
        return err(
            line + 1 + n,
            "a field after Signature: (it must be the last field: what follows is not signed)".into(),
        );
    }
    for name in ["StorePath", "NarHash", "References"] {
        if !signed.lines().any(|l| l.split_once(':').is_some_and(|(k, _)| k == name)) {
            return err(line, format!("{name} is not above Signature:, so it is not signed"));
        }
    }
    let value = field[FIELD.len()..].trim();
    Ok(Some((signed, value)))
}

/// Check a narinfo's text as a client would: a `Sig:` by one of the trusted Nix keys over its
/// fingerprint (as Nix does), or else its `Signature:` by one of the trusted Guix keys over the
/// text above it (as `guix substitute` does, see [`guix_signed_part`]).
pub fn verify_text<'k>(text: &str, trusted: &'k TrustedKeys) -> Result<Signer<'k>, VerifyError> {
    let info = NarInfo::parse(text)?;
    if let Some(key) = info.verify(trusted)? {
        return Ok(Signer::Nix(key));
    }
    let mut reasons = Vec::new();
    match guix_signed_part(text) {
        Err(e) => reasons.push(format!("Signature: {e}")),
        Ok(None) => {}
        Ok(Some((signed, value))) => match super::gcrypt::verify_narinfo_signature(signed, value, trusted.guix()) {
            Ok(key) => return Ok(Signer::Guix(key)),
            Err(reason) => reasons.push(reason),
        },
    }
    Err(VerifyError::Untrusted(reasons))
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
        if let Some(sig) = &self.guix_signature {
            let _ = writeln!(s, "Signature: {sig}");
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
    fn guix_signatures_cover_the_text_above_and_must_come_last() {
        let key = GuixSecretKey::generate().unwrap_or_else(|e| unreachable!("{e}"));
        let nix = SecretKey::generate("k").unwrap_or_else(|e| unreachable!("{e}"));
        let mut ni = sample();
        ni.sign(&nix).unwrap_or_else(|e| unreachable!("{e}"));
        ni.sign_guix(&key, "h").unwrap_or_else(|e| unreachable!("{e}"));
        let text = ni.to_string();
        assert!(
            text.ends_with('\n') && text.lines().last().is_some_and(|l| l.starts_with("Signature: 1;h;")),
            "{text}"
        );
        assert_eq!(NarInfo::parse(&text).as_ref(), Ok(&ni), "round trip");
        let trusted = TrustedKeys::default().with_guix(vec![key.public().clone()]);
        assert!(matches!(verify_text(&text, &trusted), Ok(Signer::Guix(_))));
        let both = TrustedKeys::new(vec![nix.public()]).with_guix(vec![key.public().clone()]);
        assert!(matches!(verify_text(&text, &both), Ok(Signer::Nix(_))), "Nix's is checked first");
        // Signing for Nix afterwards drops the Guix signature it would invalidate.
        let mut again = ni.clone();
        again.sign(&nix).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(again.guix_signature, None);
        let refused = |text: &str, want: &str| {
            let e = verify_text(text, &trusted).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        refused(&text.replace("NarSize: 18735072", "NarSize: 18735073"), "changed after it was signed");
        refused(&format!("{text}System: x\n"), "line 12: a field after Signature:");
        let refs = text.lines().find(|l| l.starts_with("References: ")).unwrap_or_default();
        let moved = format!("{}{refs}\n", text.replace(&format!("{refs}\n"), ""));
        refused(&moved, "a field after Signature:");
        refused(&moved.replace(&format!("\n{refs}\n"), "\n"), "References is not above Signature:");
        refused(&text.replace("Signature:", "X-Note: Signature:"), "inside a field");
        assert_eq!(
            verify_text(&text, &TrustedKeys::default()).err(),
            Some(VerifyError::Untrusted(vec!["Signature: signed by a key that is not trusted".into()]))
        );
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
