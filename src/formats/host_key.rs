//! Keys of either kind, told apart by their text: Nix's Ed25519 keys (`NAME:base64`) and Guix's
//! ECDSA keys (libgcrypt s-expressions, starting with `(`).
//!
//! A build host signs each output's Nix fingerprint (see [`super::narinfo::fingerprint`]) with one:
//! a Nix key gives `NAME:base64`, the form of a narinfo's `Sig:` line, which the cache keeps beside
//! its own; a Guix key (a host that already has /etc/guix/signing-key.sec, say from `guix
//! offload`) gives `1;HOST;BASE64` of a libgcrypt signature s-expression over the SHA-256 of the
//! fingerprint, the form of a narinfo's `Signature:` over other text: checked, not published.

use std::fmt;

use super::gcrypt::{self, GuixKeyError};
use super::guix_ecdsa;
use super::signing::{KeyError, PublicKey, SecretKey, Signature, TrustedKeys};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostKeyError {
    #[error(transparent)]
    Nix(#[from] KeyError),
    #[error(transparent)]
    Guix(#[from] GuixKeyError),
}

fn is_guix(text: &[u8]) -> bool {
    text.trim_ascii_start().starts_with(b"(")
}

/// A secret key of either kind.
pub enum HostSecretKey {
    Nix(SecretKey),
    Guix(guix_ecdsa::SecretKey),
}

impl HostSecretKey {
    /// Read a secret key file's text.
    pub fn parse(text: &[u8]) -> Result<HostSecretKey, HostKeyError> {
        if is_guix(text) {
            return Ok(HostSecretKey::Guix(gcrypt::parse_secret_key(text)?));
        }
        let text = std::str::from_utf8(text).map_err(|_| KeyError::NoName)?;
        Ok(HostSecretKey::Nix(SecretKey::parse(text)?))
    }

    pub fn public(&self) -> HostPublicKey {
        match self {
            HostSecretKey::Nix(k) => HostPublicKey::Nix(k.public()),
            HostSecretKey::Guix(k) => HostPublicKey::Guix(k.public().clone()),
        }
    }

    /// Sign an output's fingerprint; `host` is the name a Guix signature gives.
    pub fn sign_fingerprint(&self, fingerprint: &str, host: &str) -> String {
        match self {
            HostSecretKey::Nix(k) => k.sign(fingerprint.as_bytes()).to_string(),
            HostSecretKey::Guix(k) => gcrypt::narinfo_signature(fingerprint, k, host),
        }
    }
}

impl fmt::Debug for HostSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostSecretKey::Nix(k) => k.fmt(f),
            HostSecretKey::Guix(_) => f.write_str("guix_ecdsa::SecretKey(redacted)"),
        }
    }
}

/// A public key of either kind; shown as its own format writes it (Guix's on one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPublicKey {
    Nix(PublicKey),
    Guix(guix_ecdsa::PublicKey),
}

impl HostPublicKey {
    pub fn parse(text: &str) -> Result<HostPublicKey, HostKeyError> {
        if is_guix(text.as_bytes()) {
            return Ok(HostPublicKey::Guix(gcrypt::parse_public_key(text.as_bytes())?));
        }
        Ok(HostPublicKey::Nix(PublicKey::parse(text)?))
    }

    /// Whether `signature` (as [`HostSecretKey::sign_fingerprint`] makes it) is this key's over
    /// `fingerprint`.
    pub fn verify_fingerprint(&self, fingerprint: &str, signature: &str) -> bool {
        match self {
            HostPublicKey::Nix(k) => Signature::parse(signature).is_ok_and(|s| k.verify(fingerprint.as_bytes(), &s)),
            HostPublicKey::Guix(k) => {
                gcrypt::verify_narinfo_signature(fingerprint, signature, std::slice::from_ref(k)).is_ok()
            }
        }
    }
}

impl fmt::Display for HostPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPublicKey::Nix(k) => k.fmt(f),
            HostPublicKey::Guix(k) => f.write_str(&gcrypt::public_key_sx(k).to_text()),
        }
    }
}

/// Read the public keys a text holds: Nix keys (`NAME:base64`, separated by white space), or Guix
/// keys (one `(public-key …)`, or an ACL of them as /etc/guix/acl holds).
pub fn parse_trusted_keys(text: &str) -> Result<TrustedKeys, HostKeyError> {
    if is_guix(text.as_bytes()) {
        return Ok(TrustedKeys::default().with_guix(gcrypt::parse_public_keys(text.as_bytes())?));
    }
    let keys = text.split_whitespace().map(PublicKey::parse).collect::<Result<Vec<_>, _>>()?;
    Ok(TrustedKeys::new(keys))
}

/// Who made a host signature, for messages: a Nix key's name, or a Guix key's q in hex.
pub fn describe_signature(signature: &str) -> String {
    if let Ok(s) = Signature::parse(signature) {
        return s.key_name().to_owned();
    }
    gcrypt::signature_key(signature)
        .map(|k| format!("Guix key {}", super::hash::hex::encode(k.q()).to_uppercase()))
        .unwrap_or_else(|| "an unreadable signature".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_sign_and_verify_fingerprints_and_refuse_others() {
        let nix = SecretKey::generate("h-1").unwrap_or_else(|e| unreachable!("{e}"));
        let guix = guix_ecdsa::SecretKey::generate().unwrap_or_else(|e| unreachable!("{e}"));
        let keys = [
            HostSecretKey::parse(nix.to_nix_string().as_bytes()),
            HostSecretKey::parse(gcrypt::secret_key_sx(&guix).to_text().as_bytes()),
        ]
        .map(|k| k.unwrap_or_else(|e| unreachable!("{e}")));
        for key in &keys {
            let public = HostPublicKey::parse(&key.public().to_string()).unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(public, key.public(), "the public key reads back");
            let sig = key.sign_fingerprint("1;/nix/store/x;sha256:0;1;", "host");
            assert!(public.verify_fingerprint("1;/nix/store/x;sha256:0;1;", &sig));
            assert!(!public.verify_fingerprint("1;/nix/store/y;sha256:0;1;", &sig));
            let other = keys.iter().find(|k| k.public() != public).map(HostSecretKey::public);
            assert!(other.is_some_and(|o| !o.verify_fingerprint("1;/nix/store/x;sha256:0;1;", &sig)));
        }
        let guix_sig = keys[1].sign_fingerprint("f", "host");
        assert!(describe_signature(&guix_sig).starts_with("Guix key "), "{}", describe_signature(&guix_sig));
        assert_eq!(describe_signature(&keys[0].sign_fingerprint("f", "host")), "h-1");
        assert!(HostPublicKey::parse("(public-key (rsa))").is_err());
        assert!(HostSecretKey::parse(b"nope").is_err());
    }
}
