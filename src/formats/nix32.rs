//! Nix's base-32 encoding ("nix32"): its own alphabet (no `e`, `o`, `u`, `t`) and its own byte order
//! (the last character encodes the lowest bits of the first byte).

use thiserror::Error;

/// The 32 characters Nix uses, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Nix32Error {
    #[error("invalid nix32 character {0:?}")]
    InvalidChar(char),
    #[error("nix32 string of length {0} does not encode a whole number of bytes")]
    BadLength(usize),
    #[error("nix32 string has bits set beyond its length")]
    TrailingBits,
}

/// Length of the nix32 encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 { 0 } else { (n * 8 - 1) / 5 + 1 }
}

/// Number of bytes a nix32 string of length `len` decodes to, if `len` is a valid encoded length.
pub fn decoded_len(len: usize) -> Option<usize> {
    let n = len * 5 / 8;
    (encoded_len(n) == len).then_some(n)
}

/// Encode bytes as nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = bytes[i] >> j;
        let high = if i + 1 < bytes.len() { (u16::from(bytes[i + 1]) << (8 - j)) as u8 } else { 0 };
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decode a nix32 string. The output length follows from the input length.
pub fn decode(s: &str) -> Result<Vec<u8>, Nix32Error> {
    let size = decoded_len(s.len()).ok_or(Nix32Error::BadLength(s.len()))?;
    let mut out = vec![0u8; size];
    for (n, &c) in s.as_bytes().iter().rev().enumerate() {
        let d = digit(c).ok_or(Nix32Error::InvalidChar(char::from(c)))?;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= d << j;
        let carry = (u16::from(d) >> (8 - j)) as u8;
        if i + 1 < size {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Nix32Error::TrailingBits);
        }
    }
    Ok(out)
}

/// Whether every byte of `s` is a nix32 character.
pub fn is_nix32(s: &[u8]) -> bool {
    s.iter().all(|&c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // sha256("") as printed by `nix-hash --type sha256 --flat --base32 /dev/null`.
        let empty = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
            0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(encode(&empty), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("0e"), Err(Nix32Error::InvalidChar('e')));
        assert_eq!(decode("000"), Err(Nix32Error::BadLength(3)));
        // "z" in the top position of a 1-byte encoding sets bits past the 8th.
        assert_eq!(decode("zz"), Err(Nix32Error::TrailingBits));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert!(is_nix32(s.as_bytes()));
            prop_assert_eq!(decode(&s).ok(), Some(bytes));
        }
    }
}
