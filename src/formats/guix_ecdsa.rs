//! The signature scheme of Guix's signing keys: ECDSA over the Ed25519 curve with deterministic
//! nonces (RFC 6979, HMAC-SHA256), as libgcrypt computes it for a key made by
//! `(genkey (ecdsa (curve Ed25519) (flags rfc6979)))` (`guix archive --generate-key`). It is not
//! EdDSA: the secret `d` is a scalar (big-endian), the public `q = d·G` is written as Ed25519's
//! compressed point, and a signature is `(r, s)` with `r` the affine x coordinate of `k·G` mod n,
//! `s = k⁻¹(e + r·d)` mod n, `e` the hash truncated to n's 253 bits (libgcrypt's
//! `_gcry_dsa_normalize_hash`), `k` from RFC 6979 (`_gcry_dsa_gen_rfc6979_k`).
//!
//! Point arithmetic is curve25519-dalek's; only the affine x coordinate, which dalek does not
//! expose, is recovered here from the compressed point (it depends on nothing secret: `r` is
//! public). Checked against libgcrypt through guile-gcrypt by `tests/guix_keys.rs`.

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use hmac::{Hmac, KeyInit, Mac};
use num_bigint::BigUint;
use sha2::Sha256;

/// Why bytes are not a key or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EcdsaError {
    #[error("the secret scalar must be at most 256 bits and not a multiple of the group order")]
    BadSecret,
    #[error("q is not a point of the Ed25519 curve (32 bytes, compressed)")]
    BadPoint,
}

/// n, the order of Ed25519's prime subgroup (2^252 + 27742317777372353535851937790883648493).
fn order() -> BigUint {
    (BigUint::from(1u8) << 252u32)
        + BigUint::parse_bytes(b"27742317777372353535851937790883648493", 10).unwrap_or_default()
}

/// p = 2^255 - 19.
fn field() -> BigUint {
    (BigUint::from(1u8) << 255u32) - BigUint::from(19u8)
}

/// n's bit length.
const QBITS: u64 = 253;

fn scalar_of(v: &BigUint) -> Scalar {
    let mut le = [0u8; 32];
    let bytes = v.to_bytes_le();
    le[..bytes.len().min(32)].copy_from_slice(&bytes[..bytes.len().min(32)]);
    Scalar::from_bytes_mod_order(le)
}

fn biguint_of(s: &Scalar) -> BigUint {
    BigUint::from_bytes_le(s.as_bytes())
}

/// `v` as 32 big-endian bytes (v < 2^256).
fn be32(v: &BigUint) -> [u8; 32] {
    let bytes = v.to_bytes_be();
    let mut out = [0u8; 32];
    out[32 - bytes.len().min(32)..].copy_from_slice(&bytes[bytes.len().saturating_sub(32)..]);
    out
}

/// The affine x coordinate of `point`, recovered from its compressed form (y and x's sign).
fn affine_x(point: &EdwardsPoint) -> BigUint {
    let compressed = point.compress().to_bytes();
    let sign = compressed[31] >> 7;
    let mut y_bytes = compressed;
    y_bytes[31] &= 0x7f;
    let p = field();
    let y = BigUint::from_bytes_le(&y_bytes);
    let one = BigUint::from(1u8);
    // d = -121665/121666 mod p
    let inv = |v: &BigUint| v.modpow(&(&p - BigUint::from(2u8)), &p);
    let d = (&p - BigUint::from(121665u32)) * inv(&BigUint::from(121666u32)) % &p;
    let y2 = &y * &y % &p;
    let u = (&y2 + &p - &one) % &p;
    let v = (&d * &y2 + &one) % &p;
    let x2 = u * inv(&v) % &p;
    let mut x = x2.modpow(&((&p + BigUint::from(3u8)) >> 3u32), &p);
    if &x * &x % &p != x2 {
        let sqrt_m1 = BigUint::from(2u8).modpow(&((&p - &one) >> 2u32), &p);
        x = x * sqrt_m1 % &p;
    }
    if x.bit(0) != (sign == 1) && x != BigUint::ZERO {
        x = &p - x;
    }
    x
}

/// RFC 6979's bits2int for n's bit length: the leftmost QBITS bits of `bytes`.
fn bits2int(bytes: &[u8]) -> BigUint {
    let v = BigUint::from_bytes_be(bytes);
    let bits = bytes.len() as u64 * 8;
    if bits > QBITS { v >> (bits - QBITS) } else { v }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// RFC 6979's nonces for secret `x` and hash `h1`, in order (the first is used unless it gives
/// r = 0 or s = 0).
struct Nonces {
    k: [u8; 32],
    v: [u8; 32],
    first: bool,
}

impl Nonces {
    /// `x_octets`: the secret as libgcrypt gives it to RFC 6979's int2octets (32 bytes, unreduced).
    fn new(x_octets: &[u8; 32], h1: &[u8; 32]) -> Nonces {
        let n = order();
        let h_octets = be32(&(bits2int(h1) % &n));
        let mut v = [1u8; 32];
        let mut k = [0u8; 32];
        k = hmac(&k, &[&v, &[0], x_octets, &h_octets]);
        v = hmac(&k, &[&v]);
        k = hmac(&k, &[&v, &[1], x_octets, &h_octets]);
        v = hmac(&k, &[&v]);
        Nonces { k, v, first: true }
    }

    /// The next candidate k in 1..n, as a scalar; constant time in k (bits2int is a fixed 3-bit
    /// shift of 32 bytes, the range check is dalek's canonical-scalar test).
    fn next_k(&mut self) -> Scalar {
        loop {
            if !self.first {
                self.k = hmac(&self.k, &[&self.v, &[0]]);
                self.v = hmac(&self.k, &[&self.v]);
            }
            self.first = false;
            // qlen (253) bits fit in one HMAC output: k = V >> 3.
            self.v = hmac(&self.k, &[&self.v]);
            let mut le = [0u8; 32];
            for (i, byte) in le.iter_mut().enumerate() {
                // Byte i (little-endian) of V >> 3, V big-endian.
                let hi = if i + 1 < 32 { self.v[30 - i] } else { 0 };
                *byte = (self.v[31 - i] >> 3) | (hi << 5);
            }
            let k: Option<Scalar> = Scalar::from_canonical_bytes(le).into();
            if let Some(k) = k
                && k != Scalar::ZERO
            {
                return k;
            }
        }
    }
}

/// A Guix public key: the point q.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    q: [u8; 32],
    point: EdwardsPoint,
}

impl PublicKey {
    /// From q, Ed25519's 32-byte compressed point (as `(q #…#)` holds it).
    pub fn from_q(q: &[u8]) -> Result<PublicKey, EcdsaError> {
        let q: [u8; 32] = q.try_into().map_err(|_| EcdsaError::BadPoint)?;
        let point = CompressedEdwardsY(q).decompress().ok_or(EcdsaError::BadPoint)?;
        Ok(PublicKey { q, point })
    }

    pub fn q(&self) -> &[u8; 32] {
        &self.q
    }

    /// Whether `(r, s)` (big-endian integers) is this key's signature of the SHA-256 `hash`.
    pub fn verify(&self, hash: &[u8; 32], r: &[u8], s: &[u8]) -> bool {
        let n = order();
        let (r, s) = (BigUint::from_bytes_be(r), BigUint::from_bytes_be(s));
        if r == BigUint::ZERO || s == BigUint::ZERO || r >= n || s >= n {
            return false;
        }
        let e = bits2int(hash) % &n;
        let w = scalar_of(&s).invert();
        let u1 = scalar_of(&e) * w;
        let u2 = scalar_of(&r) * w;
        let x = EdwardsPoint::vartime_double_scalar_mul_basepoint(&u2, &self.point, &u1);
        affine_x(&x) % &n == r
    }
}

/// A Guix secret key: the scalar d, and its public key.
pub struct SecretKey {
    /// d as written (32 big-endian bytes, possibly above n), and reduced.
    d: [u8; 32],
    scalar: Scalar,
    public: PublicKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl SecretKey {
    /// From d, a big-endian integer (as `(d #…#)` holds it).
    /// libgcrypt's keys for this curve hold any 256-bit d (q = d·G, d taken mod n).
    pub fn from_d(d: &[u8]) -> Result<SecretKey, EcdsaError> {
        // libgcrypt writes it without leading zero bytes.
        let start = d.iter().take_while(|b| **b == 0).count();
        let d = &d[start..];
        if d.len() > 32 {
            return Err(EcdsaError::BadSecret);
        }
        let mut be = [0u8; 32];
        be[32 - d.len()..].copy_from_slice(d);
        let mut le = be;
        le.reverse();
        let scalar = Scalar::from_bytes_mod_order(le);
        if scalar == Scalar::ZERO {
            return Err(EcdsaError::BadSecret);
        }
        let point = EdwardsPoint::mul_base(&scalar);
        let public = PublicKey { q: point.compress().to_bytes(), point };
        Ok(SecretKey { d: be, scalar, public })
    }

    /// A new key from the system's random source.
    pub fn generate() -> std::io::Result<SecretKey> {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
            // Uniform below n: take 253 bits, retry when out of range.
            bytes[0] &= 0x1f;
            if let Ok(key) = SecretKey::from_d(&bytes) {
                return Ok(key);
            }
        }
    }

    /// d as 32 big-endian bytes.
    pub fn d(&self) -> [u8; 32] {
        self.d
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The signature `(r, s)` of the SHA-256 `hash`, each 32 big-endian bytes, as libgcrypt's
    /// deterministic ECDSA makes it.
    pub fn sign(&self, hash: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        let n = order();
        let e = scalar_of(&(bits2int(hash) % &n));
        let mut nonces = Nonces::new(&self.d, hash);
        loop {
            let k = nonces.next_k();
            // r is public: recovering it with num-bigint leaks nothing.
            let r = affine_x(&EdwardsPoint::mul_base(&k)) % &n;
            if r == BigUint::ZERO {
                continue;
            }
            let s = k.invert() * (e + scalar_of(&r) * self.scalar);
            if s == Scalar::ZERO {
                continue;
            }
            return (be32(&r), be32(&biguint_of(&s)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::hash::sha256;

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let key = SecretKey::generate().unwrap_or_else(|e| unreachable!("{e}"));
        let hash = sha256(b"StorePath: /gnu/store/x\n");
        let (r, s) = key.sign(&hash);
        assert!(key.public().verify(&hash, &r, &s));
        assert_eq!(key.sign(&hash), (r, s), "deterministic");
        let other = sha256(b"StorePath: /gnu/store/y\n");
        assert!(!key.public().verify(&other, &r, &s));
        let mut bad = s;
        bad[31] ^= 1;
        assert!(!key.public().verify(&hash, &r, &bad));
        let stranger = SecretKey::generate().unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!stranger.public().verify(&hash, &r, &s));
        let round = SecretKey::from_d(&key.d()).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(round.public(), key.public());
    }

    fn hex(s: &str) -> Vec<u8> {
        crate::formats::hash::hex::decode(s).unwrap_or_else(|| unreachable!("hex"))
    }

    /// A key and a signature made by libgcrypt 1.10 through guile-gcrypt 0.4 (Debian's) on
    /// 2026-12-03: `(generate-key "(genkey (ecdsa (curve Ed25519) (flags rfc6979)))")`, then
    /// `(sign (bytevector->hash-data (sha256 "hello") #:key-type 'ecc) key)`.
    #[test]
    fn same_key_and_signature_as_libgcrypt() {
        let d = hex("57F02532F414FA263822DAF9C0F7FCEF85543107E5D7DA9FF07F31AE5AA3EA80");
        let key = SecretKey::from_d(&d).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(key.public().q().to_vec(), hex("FA13939C2FB287741F42C85ED9F44122B444EDE1DD5DCCFD712C516873E08127"));
        let hash = sha256(b"hello");
        let (r, s) = key.sign(&hash);
        assert_eq!(r.to_vec(), hex("056553EF57E5A6C5528B68C49C700CB3180907A343029993D3BF792672FD0526"));
        assert_eq!(s.to_vec(), hex("024A2189CAC447C0C1A406B165EA211C18109269942FD15C6814DD51078F3A91"));
        assert!(key.public().verify(&hash, &r, &s));
    }

    #[test]
    fn affine_x_matches_the_basepoint_s() {
        // Ed25519's base point x = 15112221349535400772501151409588531511454012693041857206046113283949847762202.
        let x = affine_x(&curve25519_dalek::constants::ED25519_BASEPOINT_POINT);
        let want =
            BigUint::parse_bytes(b"15112221349535400772501151409588531511454012693041857206046113283949847762202", 10);
        assert_eq!(Some(x), want);
    }
}
