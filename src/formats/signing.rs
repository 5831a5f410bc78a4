//! Ed25519 signing keys in Nix's formats: `name:base64` of the 64-byte secret key (seed followed by
//! the public key) or of the 32-byte public key, and signatures `name:base64` of 64 bytes.
//!
//! A secret key never shows in Debug output and is zeroed when dropped.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use thiserror::Error;
use zeroize::Zeroizing;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not of the form NAME:BASE64")]
    NoName,
    #[error("key name {0:?} is not valid: it must be non-empty, without ':' or white space")]
    BadName(String),
    #[error("key data is not valid base64")]
    BadBase64,
    #[error("{what} is {len} bytes, expected {expected}")]
    BadLength { what: &'static str, len: usize, expected: usize },
    #[error("secret key's public half does not match its seed")]
    Inconsistent,
    #[error("public key is not a valid Ed25519 point")]
    BadPoint,
    #[error("could not get random bytes: {0}")]
    Random(String),
}

fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(KeyError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Split `name:base64` and decode the base64 part to exactly `expected` bytes.
fn split(s: &str, what: &'static str, expected: usize) -> Result<(String, Zeroizing<Vec<u8>>), KeyError> {
    let (name, data) = s.trim().split_once(':').ok_or(KeyError::NoName)?;
    check_name(name)?;
    let bytes = Zeroizing::new(BASE64.decode(data).map_err(|_| KeyError::BadBase64)?);
    if bytes.len() != expected {
        return Err(KeyError::BadLength { what, len: bytes.len(), expected });
    }
    Ok((name.to_owned(), bytes))
}

/// A secret signing key with its name.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A new random key, as `nix-store --generate-binary-cache-key`.
    pub fn generate(name: &str) -> Result<SecretKey, KeyError> {
        check_name(name)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey { name: name.to_owned(), key: SigningKey::from_bytes(&seed) })
    }

    /// Parse Nix's secret key format.
    pub fn parse(s: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split(s, "secret key", 64)?;
        let pair: &[u8; 64] = bytes.as_slice().try_into().map_err(|_| KeyError::BadLength {
            what: "secret key",
            len: bytes.len(),
            expected: 64,
        })?;
        let key = SigningKey::from_keypair_bytes(pair).map_err(|_| KeyError::Inconsistent)?;
        Ok(SecretKey { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Nix's secret key format. Zeroed when dropped.
    pub fn to_nix_string(&self) -> Zeroizing<String> {
        let pair = Zeroizing::new(self.key.to_keypair_bytes());
        Zeroizing::new(format!("{}:{}", self.name, BASE64.encode(pair.as_slice())))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature { key_name: self.name.clone(), bytes: self.key.sign(message).to_bytes() }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey").field("name", &self.name).field("key", &"<redacted>").finish()
    }
}

/// A public key with its name.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split(s, "public key", 32)?;
        let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::BadPoint)?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::BadPoint)?;
        Ok(PublicKey { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` is this key's signature of `message` (the names must match too).
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        sig.key_name == self.name && self.key.verify(message, &ed25519_dalek::Signature::from_bytes(&sig.bytes)).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A detached signature, `keyname:base64`.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn parse(s: &str) -> Result<Signature, KeyError> {
        let (key_name, bytes) = split(s, "signature", 64)?;
        let bytes: [u8; 64] = bytes.as_slice().try_into().map_err(|_| KeyError::BadBase64)?;
        Ok(Signature { key_name, bytes })
    }

    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// A set of public keys trusted to sign: Nix's Ed25519 keys, and Guix's ECDSA keys (for a
/// narinfo's `Signature:`).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>, Vec<super::guix_ecdsa::PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> TrustedKeys {
        TrustedKeys(keys, Vec::new())
    }

    /// Also trust these Guix keys.
    pub fn with_guix(mut self, keys: Vec<super::guix_ecdsa::PublicKey>) -> TrustedKeys {
        self.1.extend(keys);
        self
    }

    pub fn guix(&self) -> &[super::guix_ecdsa::PublicKey] {
        &self.1
    }

    /// Every key of both sets.
    pub fn extend(&mut self, other: TrustedKeys) {
        self.0.extend(other.0);
        self.1.extend(other.1);
    }

    pub fn len(&self) -> usize {
        self.0.len() + self.1.len()
    }

    /// Each key as its format writes it (a Guix key as its s-expression on one line).
    pub fn to_strings(&self) -> Vec<String> {
        let guix = self.1.iter().map(|k| super::gcrypt::public_key_sx(k).to_text());
        self.0.iter().map(ToString::to_string).chain(guix).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty() && self.1.is_empty()
    }

    /// The first trusted key that made one of `sigs` over `message`.
    pub fn verify_any<'a>(&self, message: &[u8], sigs: impl IntoIterator<Item = &'a Signature>) -> Option<&PublicKey> {
        sigs.into_iter().find_map(|s| self.0.iter().find(|k| k.verify(message, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::generate("test-1").unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = key();
        let sig = k.sign(b"hello");
        assert!(k.public().verify(b"hello", &sig));
        assert!(!k.public().verify(b"hellO", &sig));
        let reparsed = Signature::parse(&sig.to_string());
        assert_eq!(reparsed.as_ref(), Ok(&sig));
        let k2 = SecretKey::parse(&k.to_nix_string()).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(k2.public(), k.public());
        assert_eq!(PublicKey::parse(&k.public().to_string()), Ok(k.public()));
    }

    #[test]
    fn names_must_match() {
        let k = key();
        let sig = k.sign(b"m");
        let renamed = PublicKey::parse(&k.public().to_string().replacen("test-1", "other", 1));
        assert!(renamed.is_ok_and(|p| !p.verify(b"m", &sig)));
    }

    #[test]
    fn a_different_key_does_not_verify() {
        let (a, b) = (key(), key());
        let trusted = TrustedKeys::new(vec![b.public()]);
        assert!(trusted.verify_any(b"m", [&a.sign(b"m")]).is_none());
        assert!(trusted.verify_any(b"m", [&a.sign(b"m"), &b.sign(b"m")]).is_some());
    }

    #[test]
    fn secret_keys_do_not_leak_through_debug() {
        let k = key();
        let secret = k.to_nix_string();
        let b64 = secret.split_once(':').map(|(_, b)| b.to_owned()).unwrap_or_default();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&b64) && dbg.contains("redacted"), "{dbg}");
    }

    #[test]
    fn malformed_keys_are_rejected() {
        assert_eq!(SecretKey::parse("nocolon").err(), Some(KeyError::NoName));
        assert_eq!(SecretKey::parse(":AAAA").err(), Some(KeyError::BadName(String::new())));
        assert_eq!(SecretKey::parse("a:!!").err(), Some(KeyError::BadBase64));
        assert!(matches!(SecretKey::parse("a:AAAA"), Err(KeyError::BadLength { .. })));
        // A public key where a secret key is expected.
        let public = key().public().to_string();
        assert!(matches!(SecretKey::parse(&public), Err(KeyError::BadLength { .. })));
        // Secret key whose second half is another key's public half.
        let (a, b) = (key(), key());
        let mut pair = BASE64.decode(a.to_nix_string().split_once(':').map(|x| x.1).unwrap_or("")).unwrap_or_default();
        let bp = BASE64
            .decode(b.public().to_string().split_once(':').map(|x| x.1.to_owned()).unwrap_or_default())
            .unwrap_or_default();
        pair[32..].copy_from_slice(&bp);
        assert_eq!(SecretKey::parse(&format!("x:{}", BASE64.encode(&pair))).err(), Some(KeyError::Inconsistent));
    }
}
