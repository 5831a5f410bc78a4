//! Nix's wire format (little-endian u64 integers; strings as their length then their bytes padded
//! with zeros to a multiple of 8; string lists as a count then strings) as far as gbc speaks it:
//! the build hook's requests (Nix's `hook-instance.cc` and `derivation-goal.cc`, checked against
//! Debian's Nix 2.8) and `nix-store --export`'s format, which `nix-store --import` reads.

use std::io::{self, Read, Write};

use super::nar::padding;

/// The longest string accepted from the daemon (a setting's value can be long: 1 MiB).
const MAX_STRING: u64 = 1 << 20;
/// The most strings in one list (inputs of a derivation).
const MAX_STRINGS: u64 = 1 << 20;

/// `nix-store --export`'s marker after each path's NAR ("NIXE").
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{what}: {len} bytes is too long")]
    TooLong { what: &'static str, len: u64 },
    #[error("{what}: not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what}: padding is not zeros")]
    Padding { what: &'static str },
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub fn read_string(r: &mut impl Read, what: &'static str) -> Result<String, WireError> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(WireError::TooLong { what, len });
    }
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes)?;
    let mut pad = [0u8; 8];
    r.read_exact(&mut pad[..padding(len)])?;
    if pad.iter().any(|&b| b != 0) {
        return Err(WireError::Padding { what });
    }
    String::from_utf8(bytes).map_err(|_| WireError::NotUtf8 { what })
}

pub fn read_strings(r: &mut impl Read, what: &'static str) -> Result<Vec<String>, WireError> {
    let n = read_u64(r)?;
    if n > MAX_STRINGS {
        return Err(WireError::TooLong { what, len: n });
    }
    (0..n).map(|_| read_string(r, what)).collect()
}

pub fn write_u64<W: Write + ?Sized>(w: &mut W, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

/// A string as Nix writes it (a NAR's strings too: [`super::nar`] writes with this).
pub fn write_string<W: Write + ?Sized>(w: &mut W, s: &[u8]) -> io::Result<()> {
    write_u64(w, s.len() as u64)?;
    w.write_all(s)?;
    w.write_all(&[0u8; 8][..padding(s.len() as u64)])
}

pub fn write_strings<S: AsRef<[u8]>>(w: &mut impl Write, strings: &[S]) -> io::Result<()> {
    write_u64(w, strings.len() as u64)?;
    strings.iter().try_for_each(|s| write_string(w, s.as_ref()))
}

/// What the daemon sends a build hook first: its settings (name, value), ended by a 0.
pub fn read_settings(r: &mut impl Read) -> Result<Vec<(String, String)>, WireError> {
    let mut out = Vec::new();
    while read_u64(r)? != 0 {
        let name = read_string(r, "a setting's name")?;
        let value = read_string(r, "a setting's value")?;
        out.push((name, value));
    }
    Ok(out)
}

/// One derivation the daemon offers the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRequest {
    /// Whether the daemon could build it itself now (a free local build slot).
    pub am_willing: bool,
    pub system: String,
    pub drv_path: String,
    pub required_features: Vec<String>,
}

/// The next request: None when the daemon closed the pipe or sent something other than `try`
/// (its way of saying it is done).
pub fn read_hook_request(r: &mut impl Read) -> Result<Option<HookRequest>, WireError> {
    let word = match read_string(r, "the request") {
        Ok(w) => w,
        Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if word != "try" {
        return Ok(None);
    }
    let am_willing = read_u64(r)? != 0;
    let system = read_string(r, "the system")?;
    let drv_path = read_string(r, "the derivation")?;
    let required_features = read_strings(r, "the required features")?;
    Ok(Some(HookRequest { am_willing, system, drv_path, required_features }))
}

/// What the daemon sends after `# accept`: the inputs to copy there, then the outputs wanted
/// back. Nix 2.8 names the wanted outputs (`out`); later versions send their store paths.
pub fn read_accepted(r: &mut impl Read) -> Result<(Vec<String>, Vec<String>), WireError> {
    let inputs = read_strings(r, "the inputs")?;
    let wanted = read_strings(r, "the wanted outputs")?;
    Ok((inputs, wanted))
}

/// One path of a `nix-store --export` stream; `nar` is its NAR, written by the caller between
/// [`write_export_head`] and this.
pub fn write_export_tail(w: &mut impl Write, path: &str, references: &[String], deriver: &str) -> io::Result<()> {
    write_export_meta(w, path, references, deriver)?;
    // No signature follows (Nix reads and ignores one; Guix requires one).
    write_u64(w, 0)
}

/// What follows an item's NAR up to its signature: the magic, the path, its references and its
/// deriver. A signature covers the item's NAR and these ([`write_export_signed_tail`]).
pub fn write_export_meta(w: &mut impl Write, path: &str, references: &[String], deriver: &str) -> io::Result<()> {
    write_u64(w, EXPORT_MAGIC)?;
    write_string(w, path.as_bytes())?;
    write_strings(w, references)?;
    write_string(w, deriver.as_bytes())
}

/// [`write_export_tail`] with a signature (Guix's: [`crate::formats::gcrypt::export_signature`]).
pub fn write_export_signed_tail(
    w: &mut impl Write,
    path: &str,
    references: &[String],
    deriver: &str,
    signature: &str,
) -> io::Result<()> {
    write_export_meta(w, path, references, deriver)?;
    write_u64(w, 1)?;
    write_string(w, signature.as_bytes())
}

/// Before each path of an export stream: 1 ("a path follows"); after the last, [`write_export_end`].
pub fn write_export_head(w: &mut impl Write) -> io::Result<()> {
    write_u64(w, 1)
}

pub fn write_export_end(w: &mut impl Write) -> io::Result<()> {
    write_u64(w, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_bytes(word: &str, willing: u64, system: &str, drv: &str, features: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        write_string(&mut b, word.as_bytes()).unwrap_or_else(|e| unreachable!("{e}"));
        write_u64(&mut b, willing).unwrap_or_else(|e| unreachable!("{e}"));
        write_string(&mut b, system.as_bytes()).unwrap_or_else(|e| unreachable!("{e}"));
        write_string(&mut b, drv.as_bytes()).unwrap_or_else(|e| unreachable!("{e}"));
        write_strings(&mut b, features).unwrap_or_else(|e| unreachable!("{e}"));
        b
    }

    #[test]
    fn strings_are_padded_to_eight_bytes() {
        let mut b = Vec::new();
        write_string(&mut b, b"abc").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(b, [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]);
        let mut empty = Vec::new();
        write_string(&mut empty, b"").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(empty, [0; 8]);
        assert_eq!(read_string(&mut &b[..], "s").ok().as_deref(), Some("abc"));
    }

    #[test]
    fn requests_read_back_and_the_end_is_none() {
        let mut b = request_bytes("try", 1, "x86_64-linux", "/nix/store/x-a.drv", &["kvm", "big"]);
        b.extend(request_bytes("try", 0, "aarch64-linux", "/nix/store/y-b.drv", &[]));
        let mut r = &b[..];
        let first = read_hook_request(&mut r).ok().flatten();
        assert_eq!(
            first,
            Some(HookRequest {
                am_willing: true,
                system: "x86_64-linux".into(),
                drv_path: "/nix/store/x-a.drv".into(),
                required_features: vec!["kvm".into(), "big".into()],
            })
        );
        let second = read_hook_request(&mut r).ok().flatten();
        assert!(second.is_some_and(|s| !s.am_willing && s.required_features.is_empty()));
        assert!(matches!(read_hook_request(&mut r), Ok(None)), "EOF ends it");
        assert!(matches!(read_hook_request(&mut &request_bytes("done", 0, "", "", &[])[..]), Ok(None)));
    }

    #[test]
    fn bad_input_is_refused() {
        let mut b = Vec::new();
        write_u64(&mut b, MAX_STRING + 1).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(matches!(read_string(&mut &b[..], "s"), Err(WireError::TooLong { .. })));
        let bad_pad = [1u8, 0, 0, 0, 0, 0, 0, 0, b'a', 1, 0, 0, 0, 0, 0, 0];
        assert!(matches!(read_string(&mut &bad_pad[..], "s"), Err(WireError::Padding { .. })));
        let cut = [3u8, 0, 0, 0, 0, 0, 0, 0, b'a'];
        assert!(matches!(read_string(&mut &cut[..], "s"), Err(WireError::Io(_))));
    }
}
