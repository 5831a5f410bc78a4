//! libgcrypt's s-expressions, as Guix keeps keys and signatures in them (`/etc/guix/signing-key.pub`,
//! the ACL, a narinfo's `Signature:`), and Guix's key and signature shapes on top of
//! [`super::guix_ecdsa`].
//!
//! The reader takes libgcrypt's "advanced" format (what `canonical-sexp->string` prints): lists,
//! tokens, `"strings"`, `#hex#` and canonical `LEN:bytes`; the writer prints the same format, with
//! binary values in `#HEX#` as libgcrypt does.

use base64::Engine as _;

use super::guix_ecdsa::{self, PublicKey, SecretKey};

/// A datum: a list, or a byte string (a token, a string and a hex value are all bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sx {
    List(Vec<Sx>),
    Atom(Vec<u8>),
}

impl Sx {
    fn atom(s: impl AsRef<[u8]>) -> Sx {
        Sx::Atom(s.as_ref().to_vec())
    }

    fn list(items: impl IntoIterator<Item = Sx>) -> Sx {
        Sx::List(items.into_iter().collect())
    }

    /// The first sub-list, at any depth, whose head is `token` (libgcrypt's `find-token`).
    pub fn find(&self, token: &str) -> Option<&Sx> {
        let Sx::List(items) = self else { return None };
        if items.first() == Some(&Sx::atom(token)) {
            return Some(self);
        }
        items.iter().find_map(|i| i.find(token))
    }

    /// The bytes of `(token VALUE)`, found anywhere below.
    pub fn value(&self, token: &str) -> Option<&[u8]> {
        match self.find(token)? {
            Sx::List(items) => match items.get(1)? {
                Sx::Atom(v) => Some(v),
                Sx::List(_) => None,
            },
            Sx::Atom(_) => None,
        }
    }

    /// libgcrypt's advanced format on one line: tokens bare, strings quoted, binary as `#HEX#`.
    pub fn to_text(&self) -> String {
        match self {
            Sx::List(items) => format!("({})", items.iter().map(Sx::to_text).collect::<Vec<_>>().join(" ")),
            Sx::Atom(bytes) => {
                let token = !bytes.is_empty()
                    && !bytes[0].is_ascii_digit()
                    && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"-./_:*+=".contains(b));
                if token {
                    String::from_utf8_lossy(bytes).into_owned()
                } else {
                    format!("#{}#", super::hash::hex::encode(bytes).to_uppercase())
                }
            }
        }
    }
}

/// Why text is not an s-expression gbc reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("s-expression, byte {offset}: {msg}")]
pub struct SxError {
    pub offset: usize,
    pub msg: String,
}

/// Read one s-expression in libgcrypt's advanced or canonical format.
pub fn parse(text: &[u8]) -> Result<Sx, SxError> {
    let mut pos = 0;
    let sx = datum(text, &mut pos, 0)?;
    skip_blank(text, &mut pos);
    if pos != text.len() {
        return Err(SxError { offset: pos, msg: "more than one expression".into() });
    }
    Ok(sx)
}

fn skip_blank(s: &[u8], pos: &mut usize) {
    while s.get(*pos).is_some_and(|c| c.is_ascii_whitespace()) {
        *pos += 1;
    }
}

fn datum(s: &[u8], pos: &mut usize, depth: usize) -> Result<Sx, SxError> {
    let err = |pos: usize, msg: &str| SxError { offset: pos, msg: msg.into() };
    if depth > 64 {
        return Err(err(*pos, "nested too deeply"));
    }
    skip_blank(s, pos);
    match s.get(*pos) {
        None => Err(err(*pos, "unexpected end")),
        Some(b'(') => {
            *pos += 1;
            let mut items = Vec::new();
            loop {
                skip_blank(s, pos);
                match s.get(*pos) {
                    None => return Err(err(*pos, "unterminated list")),
                    Some(b')') => {
                        *pos += 1;
                        return Ok(Sx::List(items));
                    }
                    Some(_) => items.push(datum(s, pos, depth + 1)?),
                }
            }
        }
        Some(b')') => Err(err(*pos, "unexpected )")),
        Some(b'#') => {
            let start = *pos + 1;
            let end = s[start..].iter().position(|c| *c == b'#').ok_or_else(|| err(*pos, "unterminated #hex#"))?;
            let digits: Vec<u8> = s[start..start + end].iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
            let bytes =
                super::hash::hex::decode(&String::from_utf8_lossy(&digits)).ok_or_else(|| err(start, "bad hex"))?;
            *pos = start + end + 1;
            Ok(Sx::Atom(bytes))
        }
        Some(b'"') => {
            let mut out = Vec::new();
            *pos += 1;
            loop {
                match s.get(*pos) {
                    None => return Err(err(*pos, "unterminated string")),
                    Some(b'"') => {
                        *pos += 1;
                        return Ok(Sx::Atom(out));
                    }
                    Some(b'\\') => {
                        let e = *s.get(*pos + 1).ok_or_else(|| err(*pos, "unterminated string"))?;
                        out.push(match e {
                            b'n' => b'\n',
                            b't' => b'\t',
                            b'r' => b'\r',
                            other => other,
                        });
                        *pos += 2;
                    }
                    Some(c) => {
                        out.push(*c);
                        *pos += 1;
                    }
                }
            }
        }
        Some(c) if c.is_ascii_digit() => {
            // Canonical `LEN:bytes`.
            let start = *pos;
            while s.get(*pos).is_some_and(u8::is_ascii_digit) {
                *pos += 1;
            }
            if s.get(*pos) != Some(&b':') {
                return Err(err(start, "a token may not start with a digit"));
            }
            let len: usize = std::str::from_utf8(&s[start..*pos])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| err(start, "bad length"))?;
            *pos += 1;
            let bytes = s.get(*pos..*pos + len).ok_or_else(|| err(*pos, "short canonical string"))?;
            *pos += len;
            Ok(Sx::Atom(bytes.to_vec()))
        }
        Some(_) => {
            let start = *pos;
            while s.get(*pos).is_some_and(|c| c.is_ascii_alphanumeric() || b"-./_:*+=".contains(c)) {
                *pos += 1;
            }
            if *pos == start {
                return Err(err(start, "unexpected character"));
            }
            Ok(Sx::Atom(s[start..*pos].to_vec()))
        }
    }
}

/// What is wrong with a Guix key or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuixKeyError {
    #[error(transparent)]
    Syntax(#[from] SxError),
    #[error("not a Guix {0}")]
    Shape(&'static str),
    #[error(transparent)]
    Key(#[from] guix_ecdsa::EcdsaError),
}

/// `(public-key (ecc (curve Ed25519) (q #…#)))`, what `guix archive --authorize` takes.
pub fn public_key_sx(key: &PublicKey) -> Sx {
    Sx::list([
        Sx::atom("public-key"),
        Sx::list([
            Sx::atom("ecc"),
            Sx::list([Sx::atom("curve"), Sx::atom("Ed25519")]),
            Sx::list([Sx::atom("q"), Sx::Atom(key.q().to_vec())]),
        ]),
    ])
}

/// `(private-key (ecc (curve Ed25519) (q #…#) (d #…#)))`, as `/etc/guix/signing-key.sec` holds it.
pub fn secret_key_sx(key: &SecretKey) -> Sx {
    Sx::list([
        Sx::atom("private-key"),
        Sx::list([
            Sx::atom("ecc"),
            Sx::list([Sx::atom("curve"), Sx::atom("Ed25519")]),
            Sx::list([Sx::atom("q"), Sx::Atom(key.public().q().to_vec())]),
            Sx::list([Sx::atom("d"), Sx::Atom(key.d().to_vec())]),
        ]),
    ])
}

fn ed25519(sx: &Sx, what: &'static str) -> Result<(), GuixKeyError> {
    match sx.value("curve") {
        Some(b"Ed25519") => Ok(()),
        _ => Err(GuixKeyError::Shape(what)),
    }
}

/// The `(public-key (ecc (curve Ed25519) (q …)))` in `sx`.
fn public_key_in(sx: &Sx) -> Result<PublicKey, GuixKeyError> {
    const SHAPE: GuixKeyError = GuixKeyError::Shape("public key: expected (public-key (ecc (curve Ed25519) (q …)))");
    let key = sx.find("public-key").ok_or(SHAPE)?;
    ed25519(key, "public key: expected (curve Ed25519)")?;
    Ok(PublicKey::from_q(key.value("q").ok_or(SHAPE)?)?)
}

/// Read a public key file's text.
pub fn parse_public_key(text: &[u8]) -> Result<PublicKey, GuixKeyError> {
    public_key_in(&parse(text)?)
}

/// Read every public key of a file: one `(public-key …)`, or an ACL as /etc/guix/acl holds it,
/// `(acl (entry (public-key …) (tag (guix import))) …)`, whose entries must all have that tag (as
/// Guix's `acl->public-keys` requires).
pub fn parse_public_keys(text: &[u8]) -> Result<Vec<PublicKey>, GuixKeyError> {
    let sx = parse(text)?;
    match &sx {
        Sx::List(items) if items.first() == Some(&Sx::atom("acl")) => {
            let import = Sx::list([Sx::atom("tag"), Sx::list([Sx::atom("guix"), Sx::atom("import")])]);
            items[1..]
                .iter()
                .map(|entry| match entry {
                    Sx::List(e) if e.first() == Some(&Sx::atom("entry")) && e.get(2) == Some(&import) => {
                        public_key_in(entry)
                    }
                    _ => Err(GuixKeyError::Shape("ACL: expected (entry (public-key …) (tag (guix import))) entries")),
                })
                .collect()
        }
        _ => Ok(vec![public_key_in(&sx)?]),
    }
}

/// Read a secret key file's text; its q must be its d's.
pub fn parse_secret_key(text: &[u8]) -> Result<SecretKey, GuixKeyError> {
    let sx = parse(text)?;
    const SHAPE: GuixKeyError =
        GuixKeyError::Shape("secret key: expected (private-key (ecc (curve Ed25519) (q …) (d …)))");
    let key = sx.find("private-key").ok_or(SHAPE)?;
    ed25519(key, "secret key: expected (curve Ed25519)")?;
    let secret = SecretKey::from_d(key.value("d").ok_or(SHAPE)?)?;
    if key.value("q").is_some_and(|q| q != secret.public().q()) {
        return Err(GuixKeyError::Shape("secret key (its q is not its d's)"));
    }
    Ok(secret)
}

/// The value of a narinfo's `Signature:` field for `signed` (the narinfo's text up to that
/// field): `1;HOST;BASE64` of `(signature (data …) (sig-val …) (public-key …))`, as `guix
/// publish` writes it.
pub fn narinfo_signature(signed: &str, key: &SecretKey, host: &str) -> String {
    let sig = signature_sx(&super::hash::sha256(signed.as_bytes()), key);
    format!("1;{host};{}", base64::engine::general_purpose::STANDARD.encode(sig.to_text()))
}

/// The signature of an item of an export stream (the archive format of `guix archive --export`
/// and of what the daemon's build hooks hand back), over `hash`, the SHA-256 of the item from its
/// NAR to its deriver: the s-expression's text, as `guix authenticate sign` writes it and
/// `restore-file-set` in `(guix nar)` checks it against /etc/guix/acl.
pub fn export_signature(hash: &[u8; 32], key: &SecretKey) -> String {
    signature_sx(hash, key).to_text()
}

/// `(signature (data …) (sig-val …) (public-key …))` over `hash`, as Guix's `signature-sexp`.
fn signature_sx(hash: &[u8; 32], key: &SecretKey) -> Sx {
    let (r, s) = key.sign(hash);
    Sx::list([
        Sx::atom("signature"),
        Sx::list([
            Sx::atom("data"),
            Sx::list([Sx::atom("flags"), Sx::atom("rfc6979")]),
            Sx::list([Sx::atom("hash"), Sx::atom("sha256"), Sx::Atom(hash.to_vec())]),
        ]),
        Sx::list([
            Sx::atom("sig-val"),
            Sx::list([
                Sx::atom("ecdsa"),
                Sx::list([Sx::atom("r"), Sx::Atom(r.to_vec())]),
                Sx::list([Sx::atom("s"), Sx::Atom(s.to_vec())]),
            ]),
        ]),
        public_key_sx(key.public()),
    ])
}

/// The signature s-expression in a `Signature:` value `1;HOST;BASE64`, and the key it names.
fn decode_signature(value: &str) -> Result<(Sx, PublicKey), String> {
    let mut parts = value.split(';');
    let (Some("1"), Some(_host), Some(b64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(format!("Signature: {value:?} is not '1;HOST;BASE64'"));
    };
    let text =
        base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| format!("Signature: base64: {e}"))?;
    let sx = parse(&text).map_err(|e| format!("Signature: {e}"))?;
    let signer = public_key_in(&sx).map_err(|e| format!("Signature: {e}"))?;
    Ok((sx, signer))
}

/// The key a `Signature:` value says made it (not checked).
pub fn signature_key(value: &str) -> Option<PublicKey> {
    decode_signature(value).ok().map(|(_, k)| k)
}

/// Check a narinfo's `Signature:` field `value` against `signed` (its text up to the field) and
/// the `trusted` keys, as `guix substitute` does; returns the key that signed it.
pub fn verify_narinfo_signature<'k>(
    signed: &str,
    value: &str,
    trusted: &'k [PublicKey],
) -> Result<&'k PublicKey, String> {
    let (sx, signer) = decode_signature(value)?;
    let key = trusted.iter().find(|k| **k == signer).ok_or("Signature: signed by a key that is not trusted")?;
    let hash = super::hash::sha256(signed.as_bytes());
    if sx.find("data").and_then(|d| d.find("hash")).and_then(|h| match h {
        Sx::List(items) => items.get(2).cloned(),
        Sx::Atom(_) => None,
    }) != Some(Sx::Atom(hash.to_vec()))
    {
        return Err("Signature: the narinfo changed after it was signed (hash mismatch)".into());
    }
    let (r, s) = (sx.value("r").ok_or("Signature: no r")?, sx.value("s").ok_or("Signature: no s")?);
    if !key.verify(&hash, r, s) {
        return Err("Signature: invalid signature".into());
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_libgcrypt_prints() {
        // `canonical-sexp->string` of a key guile-gcrypt generated (see guix_ecdsa's tests).
        let text = b"(public-key \n (ecc \n  (curve Ed25519)\n  (q #FA13939C2FB287741F42C85ED9F44122B444EDE1DD5DCCFD712C516873E08127#)\n  )\n )\n";
        let key = parse_public_key(text).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            public_key_sx(&key).to_text(),
            "(public-key (ecc (curve Ed25519) (q #FA13939C2FB287741F42C85ED9F44122B444EDE1DD5DCCFD712C516873E08127#)))"
        );
        assert_eq!(parse(b"(a 3:b c \"x y\")"), Ok(Sx::list([Sx::atom("a"), Sx::atom("b c"), Sx::atom("x y")])));
        for bad in [&b"(a"[..], b"(a))", b"#12", b"(1a)", b""] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_public_key(b"(public-key (ecc (curve NIST P-256) (q #00#)))").is_err());
    }

    #[test]
    fn narinfo_signatures_round_trip_and_refuse_what_they_must() {
        let key = SecretKey::generate().unwrap_or_else(|e| unreachable!("{e}"));
        let secret = parse_secret_key(secret_key_sx(&key).to_text().as_bytes()).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(secret.public(), key.public());
        let signed = "StorePath: /gnu/store/aaaa-x\nNarHash: sha256:0000\nReferences: \n";
        let value = narinfo_signature(signed, &key, "gbc");
        let trusted = [key.public().clone()];
        assert!(verify_narinfo_signature(signed, &value, &trusted).is_ok());
        assert!(
            verify_narinfo_signature(&signed.replace("aaaa", "bbbb"), &value, &trusted)
                .err()
                .is_some_and(|e| e.contains("changed"))
        );
        let other = [SecretKey::generate().unwrap_or_else(|e| unreachable!("{e}")).public().clone()];
        assert!(verify_narinfo_signature(signed, &value, &other).err().is_some_and(|e| e.contains("not trusted")));
        assert!(verify_narinfo_signature(signed, "2;gbc;AAAA", &trusted).is_err());
    }
}
