//! NAR (Nix ARchive): the canonical serialisation of a file system tree that store path hashes are
//! computed over.
//!
//! - [`writer`]: a writer whose types enforce the grammar (a node is written once, a directory is closed,
//!   entries come in strictly increasing byte order).
//! - [`reader`]: a streaming pull parser that validates everything it reads and never holds more
//!   than one buffer of file contents.
//! - [`dump`]: a file system tree into a NAR (`nix-store --dump`), and its hash.
//! - [`restore`]: a NAR into a new file system tree (`nix-store --restore`), which never writes outside
//!   its destination and appears atomically.
//!
//! Grammar (every string is a little-endian u64 length, the bytes, and zero padding to 8 bytes):
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <u64 size> <size bytes> <padding>
//! symlink   = "symlink" "target" <string>
//! directory = "directory" { "entry" "(" "name" <string> "node" node ")" }
//! ```

pub mod dump;
pub mod reader;
pub mod restore;
pub mod writer;

pub use dump::{DumpError, dump_path, nar_hash};
pub use reader::{Contents, Event, NarError, NarEvent, NarReader};
pub use restore::{RestoreError, restore};
pub use writer::{Directory, Node, begin};

/// The first string of every NAR.
pub const MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name accepted (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target accepted (Linux's `PATH_MAX` less the terminating NUL).
pub const MAX_TARGET_LEN: usize = 4095;
/// Deepest directory nesting accepted. Unpacking holds one file descriptor per level.
pub const MAX_DEPTH: usize = 512;

/// Why an entry name is not acceptable in a NAR, if it is not.
pub fn check_entry_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("an entry name is empty")
    } else if name == b"." || name == b".." {
        Err("an entry name is . or ..")
    } else if name.contains(&b'/') {
        Err("an entry name contains '/'")
    } else if name.contains(&0) {
        Err("an entry name contains a NUL byte")
    } else if name.len() > MAX_NAME_LEN {
        Err("an entry name is longer than 255 bytes")
    } else {
        Ok(())
    }
}

/// Why a symlink target is not acceptable, if it is not.
pub fn check_symlink_target(target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        Err("a symlink target is empty")
    } else if target.contains(&0) {
        Err("a symlink target contains a NUL byte")
    } else if target.len() > MAX_TARGET_LEN {
        Err("a symlink target is longer than 4095 bytes")
    } else {
        Ok(())
    }
}

/// Zero bytes that follow a string of length `len`.
pub(crate) fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

#[cfg(test)]
mod tests;
